-- shoal 009: the task catalog, and schedules that follow their task's queue.
--
-- Every consumer registers the tasks it runs when it starts (lib/catalog.ts owns both
-- tables). Enqueues that are not given a queue or max_attempts take them from the catalog
-- (the rule is stated once, at the top of sql/functions/queue.sql), so a task's settings
-- hold however its jobs arrive: TypeScript, SQL, the CLI, schedules, fan-outs.
--
-- shoal.tasks: one row per task name ever registered; the last registration wins. Rows are
-- kept when their consumers stop: a job enqueued while no consumer runs still goes where
-- its task is defined. Each setting is the definition's own, null when it sets none: a
-- null queue or max_attempts leaves the enqueue its fallback (`default`, or a fan-out's
-- producer's queue; 25 attempts), a null timeout_ms means each consumer's --task-timeout.
-- timeout_ms is recorded for people; nothing reads it back.
create table shoal.tasks (
  name shoal.name primary key,
  queue shoal.name,
  max_attempts integer,
  timeout_ms integer,
  -- The worker id (host:pid) of the consumer that wrote these settings last.
  registered_by text not null,
  registered_at timestamptz not null default now(),
  -- Refreshed by every consumer that runs the task, about once a minute.
  last_seen_at timestamptz not null default now(),
  constraint tasks_max_attempts_range check (max_attempts between 1 and 1000),
  constraint tasks_timeout_positive check (timeout_ms > 0)
);

-- shoal.consumers: one row per running consumer, the queues it claims from and the tasks
-- it knows. A graceful stop deletes its row; a consumer that died is no longer live once
-- its last_seen_at is a few minutes old, and the reaper removes its row a day later.
-- `shoal status` reads it to tell ready jobs that no live consumer runs.
create table shoal.consumers (
  worker_id text primary key,
  queues text[] not null,
  tasks text[] not null,
  started_at timestamptz not null default now(),
  last_seen_at timestamptz not null default now()
);

-- A schedule without a queue fires into its task's catalog queue, looked up at each fire.
-- `shoal schedule add` without --queue (and a schedules file entry without "queue") has
-- always stored 'default', so an existing 'default' cannot be told from one typed by hand:
-- such rows now follow their task's catalog queue (and stay on default for a task the
-- catalog does not know). Pin a schedule to default by adding it again with --queue default.
alter table shoal.schedules alter column queue drop default, alter column queue drop not null;
update shoal.schedules set queue = null where queue = 'default';
