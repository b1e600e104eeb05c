-- shoal 017: limits of a task's own. A concurrency or rate limit may name a task: the
-- task's jobs on that queue are then counted apart from the queue's other jobs, per key
-- (at most 3 exports per customer, whatever else the customer runs). The rule, and what
-- applies to a task's jobs, is THE TASK RULE in sql/functions/flow.sql.
--
-- Each flow control table says which jobs a row is about with a task column: '' for rows
-- about the queue's jobs that no limit counts apart (every row before this migration), a
-- task name for that task's own. Not null, so the unique indexes and the claim's joins
-- compare it as a value.
alter table shoal.concurrency_limits add column task text not null default '',
  add constraint concurrency_limits_task_name
    check (task = '' or task ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$');
drop index shoal.concurrency_limits_key_idx;
drop index shoal.concurrency_limits_default_idx;
create unique index concurrency_limits_key_idx on shoal.concurrency_limits (queue, task, key)
  where key is not null;
create unique index concurrency_limits_default_idx on shoal.concurrency_limits (queue, task)
  where key is null;

alter table shoal.rate_limits add column task text not null default '',
  add constraint rate_limits_task_name
    check (task = '' or task ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$');
drop index shoal.rate_limits_key_idx;
drop index shoal.rate_limits_default_idx;
create unique index rate_limits_key_idx on shoal.rate_limits (queue, task, key)
  where key is not null;
create unique index rate_limits_default_idx on shoal.rate_limits (queue, task)
  where key is null;

-- A key's memory and its slot rows, per (queue, key, task): the key first, so an ack's wake
-- (shoal.slots_freed, which knows a job's key) finds a key's rows whatever their task.
alter table shoal.flow_keys add column task text not null default '';
alter table shoal.flow_keys drop constraint flow_keys_pkey;
alter table shoal.flow_keys add primary key (queue, key, task);

alter table shoal.concurrency_slots add column task text not null default '';
drop index shoal.concurrency_slots_key_idx;
create index concurrency_slots_key_idx on shoal.concurrency_slots (queue, key, task);
