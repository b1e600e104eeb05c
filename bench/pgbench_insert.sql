-- pgbench floor: a bare single-row insert, one transaction.
insert into bench_floor.jobs (task, payload) values ('noop', '{}');
