-- shoal 020: a job's recorded steps and sleeps (issue 17, durable workflows; lib/steps.ts).
--
-- One row per (job, name): a step's JSON result, committed in the same transaction as the
-- step's own writes and fenced by the claim's token, or a durable sleep's wake time. A run
-- that finds a row returns its result (a step) or goes on at once once the time has come (a
-- sleep), so a redelivered or woken job never repeats a step that committed.
--
-- No foreign key to shoal.jobs, on purpose: a key with `on delete cascade` fires a check per
-- deleted job on every ack, also of the great majority of jobs that record no step. Rows of
-- jobs that are gone (acked, cancelled, purged from the dead-letter table) are removed by the
-- reaper's step-retention sweep an hour after their last record instead; a dead-lettered
-- job keeps its steps, so retrying it does not repeat them.
create table shoal.job_steps (
  job_id bigint not null,
  name text not null check (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$'),
  kind text not null check (kind in ('step', 'sleep')),
  -- A step's result (JSON null for a step that returned nothing); null for a sleep.
  result jsonb,
  -- A sleep's wake time; null for a step.
  wake_at timestamptz,
  recorded_at timestamptz not null default now(),
  primary key (job_id, name),
  check ((kind = 'sleep') = (wake_at is not null))
);

-- The retention sweep reads the oldest records first.
create index job_steps_recorded_at on shoal.job_steps (recorded_at);
