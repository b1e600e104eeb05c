-- shoal 002: leader leases and cron schedules.
--
-- A lease row names a leader term: holder, fencing token (incremented on every new
-- term) and expiry, all on the database clock. Leader-only statements lock the row
-- FOR SHARE with the term's token, so an ex-leader (paused past its lease) can never
-- act once a successor holds it: the successor's acquire waits for, or invalidates, it.

create table shoal.leases (
  name text primary key,
  holder text not null,
  token bigint not null,
  acquired_at timestamptz not null,
  expires_at timestamptz not null,
  constraint leases_name check (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$'),
  constraint leases_holder_length check (length(holder) between 1 and 256)
);

-- A schedule fires `task` on `queue` at each slot of its cron expression in its time
-- zone. next_run_at is null for a new or re-enabled row: the scheduler then records a
-- baseline without firing. source tells rows synced from a schedules file (which a
-- later sync may remove) from rows managed with `shoal schedule add`.
create table shoal.schedules (
  name text primary key,
  cron text not null,
  tz text not null default 'UTC',
  task text not null,
  queue text not null default 'default',
  payload jsonb not null default '{}',
  priority integer not null default 0,
  enabled boolean not null default true,
  source text not null default 'manual',
  next_run_at timestamptz,
  last_run_at timestamptz,
  last_error text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint schedules_name check (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$'),
  constraint schedules_task check (task ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$'),
  constraint schedules_queue check (queue ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$'),
  constraint schedules_payload_object check (jsonb_typeof(payload) = 'object'),
  constraint schedules_cron_length check (length(cron) between 1 and 256),
  constraint schedules_tz_length check (length(tz) between 1 and 64),
  constraint schedules_source check (source in ('manual', 'file')),
  constraint schedules_priority_range check (priority between -32768 and 32767)
);

create index schedules_due_idx on shoal.schedules (next_run_at) where enabled;

-- Wake the scheduler when schedules change, whoever changes them.
create function shoal.notify_schedules_changed() returns trigger
language plpgsql as $$
begin
  perform pg_notify('shoal_schedules', '');
  return null;
end
$$;

create trigger schedules_changed
after insert or delete or update of cron, tz, enabled on shoal.schedules
for each statement execute function shoal.notify_schedules_changed();
