-- shoal functions: a job's steps, read and recorded from SQL (issue 17; docs/workflows.md "From
-- SQL (any language)"). The table shoal.job_steps is created by 020 and 025; lib/steps.ts owns
-- its other statements, and ctx.step records through shoal.record_step_result below, so the
-- statement that records a step has one home.
--
-- A worker in any language that claimed a job (its id and token, shoal.claim_jobs) runs a step
-- in its own transaction, the step's effects and its record together:
--
--   begin;
--   select result from shoal.step_result(42, 7, 'charge');  -- a row: recorded, skip the work
--   insert into payments (order_id, cents) values (42, 500); -- no row: the step's effects
--   select shoal.record_step(42, 7, 'charge', '{"receipt": "r-42"}');
--   commit;
--
-- THE FENCE, as ctx.step's: both functions lock the job's row where its id and token match
-- (jobs before job_steps: the lock order of workflow.sql). A token that moved on (the job was
-- redelivered, retried, handed back, or is gone) raises SQLSTATE SH003 (SH001 and SH002 are
-- shoal.sql's, sql_task.sql): the caller's transaction aborts, and its effects with it.
--
-- step_result locks as well, so a step's read, effects and record are one critical section of
-- the job: a second session of the same claim (a retry sent while the first try's commit is
-- still in flight) waits for the first to end, then reads its record instead of doing the
-- effects again. The lock is held until the caller's commit: keep the transaction short.
--
-- Names follow the name rule of the shoal.name domain (001, 005): the domain is checked here,
-- not restated. A result is any JSON value, as ctx.step's (which has no size limit either: a
-- result comes from the job's own worker, not from a producer); SQL null is recorded as JSON
-- null, as ctx.step records a step that returned nothing.

-- Refuse a step name the domain refuses, or a null one (22023), naming the function `fn`
-- called with it. Worded as lib/steps.ts checkStepName() words it (tests/sql_steps_test.ts).
create or replace function shoal.check_step_name(fn text, name text) returns void
language plpgsql stable as $$
declare
  -- The domain's rule in words, as lib/names.ts NAME_RULE says it (for the message only).
  name_rule constant text := '1 to 128 letters, digits or _.:- starting with a letter or digit';
begin
  if check_step_name.name is null then
    raise exception using errcode = '22023',
      message = format('Invalid name for %s(): expected a step name (%s), not null', fn,
                       name_rule);
  end if;
  perform check_step_name.name::shoal.name;
exception when check_violation then
  raise exception using errcode = '22023',
    message = format('Invalid name for %s(): expected a step name (%s), not %s', fn, name_rule,
                     -- shown as lib/args.ts shown() shows a string: its first 40 characters
                     to_json(case when length(check_step_name.name) > 40
                                  then left(check_step_name.name, 40) || '…'
                                  else check_step_name.name end));
end
$$;

-- Check a call's arguments and lock its job's row where id and token match; else raise SH003.
-- `what` says what the caller was doing ('read', 'record'), for the message.
create or replace function shoal.lock_step_job(fn text, what text, job_id bigint, token bigint,
                                               name text) returns void
language plpgsql volatile as $$
begin
  if lock_step_job.job_id is null or lock_step_job.token is null then
    raise exception using errcode = '22023',
      message = format('Invalid arguments for %s(): %s', fn,
                       'job_id and token (the claim''s) must not be null');
  end if;
  perform shoal.check_step_name(fn, lock_step_job.name);
  perform 1 from shoal.jobs j
  where j.id = lock_step_job.job_id and j.token = lock_step_job.token
  for update;
  if not found then
    raise exception using errcode = 'SH003',
      message = format('Cannot %s step "%s" of job %s: its claim (token %s) is no longer current',
                       what, lock_step_job.name, lock_step_job.job_id, lock_step_job.token),
      hint = 'The job was redelivered, retried, handed back or has ended: roll back and stop.';
  end if;
end
$$;

-- The recorded result of step `name` of the job whose claim (id, token) the caller holds:
-- one row when the step committed, no row when it has not. Not a bare jsonb: a step that
-- returned nothing is recorded as JSON null, and most drivers read a JSON null and an SQL null
-- alike, so "recorded with null" would look like "not recorded" and the step would run again.
--   select result from shoal.step_result(42, 7, 'charge');
-- Locks the job's row (THE FENCE, above); a record of that name that is a sleep or a wait is
-- refused (22023), as ctx.step refuses it.
create or replace function shoal.step_result(job_id bigint, token bigint, name text)
returns table (result jsonb)
language plpgsql volatile as $$
#variable_conflict use_column
declare
  _kind text;
  _result jsonb;
begin
  perform shoal.lock_step_job('shoal.step_result', 'read', step_result.job_id,
                              step_result.token, step_result.name);
  -- A statement of its own, after the lock: its snapshot sees what the lock waited for.
  select s.kind, s.result into _kind, _result
  from shoal.job_steps s where s.job_id = step_result.job_id and s.name = step_result.name;
  if not found then
    return;
  end if;
  if _kind <> 'step' then
    raise exception using errcode = '22023',
      message = format('Cannot read step "%s" of job %s: a %s of that name was recorded',
                       step_result.name, step_result.job_id, _kind);
  end if;
  return query select _result;
end
$$;

-- Record step `name` of the job whose claim (id, token) the caller holds, with `result`, in
-- the caller's transaction (THE FENCE, above). A step recorded already (by an earlier try
-- whose commit reply was lost, or by another session of the same claim that got there first)
-- is left as it is: `created` is false and `recorded_result` is the recorded one. Only the
-- first record of a name counts, so every caller sees the same result. (Not named `result`:
-- a column of the returned table may not share the name of an argument.)
--   select * from shoal.record_step_result(42, 7, 'charge', '{"receipt": "r-42"}');
-- ctx.step records through it (lib/steps.ts recordStep()), and refuses a step that was not
-- recorded by its own call: its effects then roll back.
create or replace function shoal.record_step_result(job_id bigint, token bigint, name text,
                                                    result jsonb default 'null')
returns table (recorded_result jsonb, created boolean)
language plpgsql volatile as $$
#variable_conflict use_column
declare
  _kind text;
  _result jsonb;
begin
  perform shoal.lock_step_job('shoal.record_step', 'record', record_step_result.job_id,
                              record_step_result.token, record_step_result.name);
  insert into shoal.job_steps as s (job_id, name, kind, result)
  values (record_step_result.job_id, record_step_result.name, 'step',
          coalesce(record_step_result.result, 'null'::jsonb))
  on conflict (job_id, name) do nothing
  returning s.result into _result;
  if found then
    return query select _result, true;
    return;
  end if;
  -- Recorded before. Every writer of the job's records holds its row's lock, as this call
  -- does now: the record read here (a statement of its own, with a snapshot taken after the
  -- lock) is the one that stays.
  select s.kind, s.result into _kind, _result
  from shoal.job_steps s
  where s.job_id = record_step_result.job_id and s.name = record_step_result.name;
  if _kind is distinct from 'step' then
    raise exception using errcode = '22023',
      message = format('Cannot record step "%s" of job %s: a %s of that name was recorded',
                       record_step_result.name, record_step_result.job_id,
                       coalesce(_kind, 'record that is gone'));
  end if;
  return query select _result, false;
end
$$;

-- shoal.record_step_result's recorded_result alone: this call's result, or the one recorded
-- before it.
--   select shoal.record_step(42, 7, 'charge', '{"receipt": "r-42"}');
create or replace function shoal.record_step(job_id bigint, token bigint, name text,
                                             result jsonb default 'null')
returns jsonb
language sql volatile as $$
  select r.recorded_result from shoal.record_step_result(job_id, token, name, result) r
$$;
