-- shoal functions: events that jobs wait for (issue 17; lib/events.ts, ctx.waitForEvent in
-- lib/run_job.ts). The table shoal.events and the wait records' columns of shoal.job_steps
-- are created by 025.
--
-- An event is (name, key, payload). Emitting one stores it (kept a day, the reaper's
-- event-retention sweep) and delivers it to EVERY job waiting on (name, key) at that moment
-- (broadcast): each such wait record goes from 'waiting' to 'received' with the payload, and
-- its job, if it is handed back (not claimed), becomes runnable now, in the same transaction.
-- A wait that starts later takes the oldest kept event of its (name, key) that its job has not
-- received yet: an event emitted before the wait starts is not lost.
--
-- Exactly one delivery per wait: a record leaves 'waiting' once, and only while holding its
-- job's row lock (jobs first, then job_steps: the lock order of workflow.sql). The job's side
-- (the run that starts a wait, or records its timeout) holds that lock fenced by its claim's
-- token; this side takes it in shoal.emit_event. An emit and a timeout racing: whichever takes
-- the row first decides, and emit_event never delivers to a wait whose timeout has come.

-- THE EVENT LOCK of (name, key): a transaction-level advisory lock in its own class
-- (1936224622; flow.sql uses 1936224620 and 1936224621). shoal.emit_event takes it before it
-- stores an event and looks for waits; a run that starts a wait takes it before it looks for
-- a kept event and records its wait (lib/events.ts lockEvent). So either the wait finds the
-- event or the emit finds the wait: an event cannot slip between the two (a lost wake-up).
-- Two emits of one (name, key) take turns; two of different pairs may share a hash and take
-- turns too, which costs a wait, never a wrong delivery.
create or replace function shoal.lock_event(name text, key text) returns void
language sql volatile as $$
  select pg_advisory_xact_lock(1936224622, hashtext($1 || ' ' || $2))
$$;

-- Emit an event: store it and deliver it to every job waiting on (name, key). Returns how
-- many waits received it. For any language:
--   select shoal.emit_event('order.approved', 'order-42', '{"by": "ana"}');
-- name follows the task name rule; key is any text of up to 512 characters ('' when the
-- event has no key); payload a JSON object within shoal.max_payload_bytes().
create or replace function shoal.emit_event(name text, key text default '',
                                            payload jsonb default '{}') returns integer
language plpgsql volatile as $$
declare
  _event shoal.events;
  _received integer;
begin
  if emit_event.name is null or emit_event.name !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$' then
    raise exception using errcode = '22023', message = format(
      'Cannot emit event %s: its name must be 1 to 128 letters, digits or _.:- starting with a letter or digit',
      coalesce(quote_literal(left(emit_event.name, 140)), 'null'));
  end if;
  if emit_event.key is null or length(emit_event.key) > 512 then
    raise exception using errcode = '22023', message = format(
      'Cannot emit event %s: its key must be text of at most 512 characters, not %s',
      emit_event.name, coalesce(length(emit_event.key) || ' characters', 'null'));
  end if;
  if coalesce(jsonb_typeof(emit_event.payload), 'null') <> 'object' then
    raise exception using errcode = '22023', message = format(
      'Cannot emit event %s: its payload must be a JSON object, not %s',
      emit_event.name, coalesce(jsonb_typeof(emit_event.payload), 'null'));
  end if;
  if octet_length(emit_event.payload::text) > shoal.max_payload_bytes() then
    raise exception using errcode = '54000', message = format(
      'Cannot emit event %s: its payload is %s bytes, over the limit of %s bytes',
      emit_event.name, octet_length(emit_event.payload::text), shoal.max_payload_bytes());
  end if;

  perform shoal.lock_event(emit_event.name, emit_event.key);
  insert into shoal.events (name, key, payload)
  values (emit_event.name, emit_event.key, emit_event.payload)
  returning * into _event;

  -- Lock the jobs of the open waits first, in id order (the lock order); the next statement,
  -- with a snapshot taken after the locks, sees every wait state their holders committed.
  perform 1 from shoal.jobs j
  where j.id in (select s.job_id from shoal.job_steps s
                 where s.wait_state = 'waiting' and s.event_name = _event.name
                   and s.event_key = _event.key)
  order by j.id
  for update;

  with received as (
    update shoal.job_steps s
    set wait_state = 'received', result = _event.payload, event_id = _event.id
    where s.wait_state = 'waiting' and s.event_name = _event.name and s.event_key = _event.key
      -- a wait whose timeout has come is the timeout's (its run records it), and a wait of a
      -- job that is gone (cancelled) receives nothing: the reaper removes its record
      and (s.wake_at is null or s.wake_at > now())
      and exists (select 1 from shoal.jobs j where j.id = s.job_id)
    returning s.job_id
  ),
  woken as (
    -- A job handed back by its wait runs now, level with where claiming has got to (as a
    -- job handed back at shutdown: lib/queue.ts release()). A claimed one (a run about to
    -- record its wait again) finds the record received under the same row lock.
    update shoal.jobs j
    set run_at = now(),
        fair_seq = greatest(j.fair_seq, coalesce(shoal.level_head(j.queue, j.priority),
                                                  j.fair_seq))
    from received r
    where j.id = r.job_id and j.locked_by is null
    returning j.queue, j.priority, j.fair_seq
  ),
  notified as (
    select shoal.notify_jobs(array_agg(w.queue), null, array_agg(w.priority),
                             array_agg(w.fair_seq))
    from woken w
  )
  select count(*)::integer into _received
  from received r cross join (select count(*) from notified) n;
  return _received;
end
$$;
