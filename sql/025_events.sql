-- shoal 025: events a job can wait for (issue 17, durable workflows; lib/events.ts).
--
-- shoal.events keeps every emitted event (name, key, JSON payload) for a retention window
-- (the reaper's event-retention sweep, a day), so that an event emitted before a job starts to
-- wait for it is not lost: a wait that starts takes the oldest kept event of its (name, key)
-- that the job has not received yet. shoal.emit_event (sql/functions/events.sql) stores the
-- event and delivers it to every job already waiting on (name, key).
create table shoal.events (
  id bigint generated always as identity primary key,
  name text not null check (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$'),
  key text not null check (length(key) <= 512),
  payload jsonb not null,
  emitted_at timestamptz not null default now()
);

-- A wait looks up the kept events of its (name, key) in emission order.
create index events_name_key on shoal.events (name, key, id);
-- The retention sweep reads the oldest events first.
create index events_emitted_at on shoal.events (emitted_at);

-- A wait for an event is a job record of kind 'wait' (beside 'step' and 'sleep'):
--   event_name, event_key  what it waits for
--   wake_at                its timeout's instant (null: no timeout)
--   wait_state             'waiting', then once 'received' (result holds the event's payload,
--                          event_id the event) or 'timed_out'
-- A record leaves 'waiting' once, under the lock of its job's row (fenced by the claim's token
-- on the job's side, by shoal.emit_event on the event's side).
alter table shoal.job_steps drop constraint job_steps_kind_check;
alter table shoal.job_steps drop constraint job_steps_check;
alter table shoal.job_steps
  add column event_name text,
  add column event_key text,
  add column event_id bigint,
  add column wait_state text check (wait_state in ('waiting', 'received', 'timed_out')),
  add constraint job_steps_kind_check check (kind in ('step', 'sleep', 'wait')),
  add constraint job_steps_wake_at_check check (kind = 'wait' or (kind = 'sleep') = (wake_at is not null)),
  add constraint job_steps_wait_check check (case when kind = 'wait' then
    wait_state is not null and event_name is not null and event_key is not null
    and (wait_state = 'received') = (event_id is not null)
  else
    wait_state is null and event_name is null and event_key is null and event_id is null
  end);

-- shoal.emit_event finds the open waits of an event (few rows: only 'waiting' ones).
create index job_steps_waiting on shoal.job_steps (event_name, event_key)
  where wait_state = 'waiting';
