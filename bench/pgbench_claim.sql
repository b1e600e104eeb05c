-- pgbench floor: the bare SKIP LOCKED claim + delete of :batch rows, one transaction.
-- `id = any(array(...))` keeps the delete on the primary key whatever the statistics say.
delete from bench_floor.jobs
where id = any(array(
  select id from bench_floor.jobs order by id limit :batch for update skip locked
))
returning id, task, payload;
