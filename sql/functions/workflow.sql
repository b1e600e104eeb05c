-- shoal functions: executions (workflow runs) and barriers (fan-out / fan-in, the chord).
-- The tables (shoal.executions, shoal.barriers, shoal.arrivals) and the triggers that call
-- the trigger functions here are created by 003 and 005.
--
-- An execution is the unit a user cares about: pending -> running -> completed | failed |
-- cancelled. Jobs may belong to one (jobs.execution_id). A barrier is an open fan-out:
-- `remaining` children still to arrive, the callback to enqueue when the last one does,
-- an optional error callback, and an expiry. Each child's arrival is a row keyed by
-- (barrier, child index), so a redelivered child can never arrive twice.
--
-- THE LOCK ORDER, everywhere (these functions, the claim in claim.sql, and the statements
-- of lib/queue.ts): jobs, then barriers (by id), then executions. Within jobs, a statement
-- that locks many jobs of one execution takes them in id order, and failing an execution
-- never waits for a job: its caller may already hold one (a child failing for good) while
-- another caller holds the rest (a sibling failing at the same moment).
--
-- Two takers come before that order, and one outside it. An event's lock (shoal.lock_event,
-- events.sql) is taken before the rows of the jobs waiting for it. enqueue_after (below)
-- locks the execution and no job: called inside a handler's ctx.transaction, whose ack then
-- locks the handler's own job, it takes an execution before a job. A cancel or an expiry
-- locking that job at the same moment then deadlocks with it, and Postgres ends one of the
-- two: the handler's transaction (its run fails and is retried) or the cancel (its caller
-- gets the deadlock error, 40P01, and cancels again).

-- Refuse illegal transitions, whoever writes: terminal states are final (the trigger
-- executions_transition).
create or replace function shoal.check_execution_transition() returns trigger
language plpgsql as $$
begin
  if new.status is distinct from old.status and not (
       (old.status = 'pending' and new.status in ('running', 'completed', 'failed', 'cancelled'))
    or (old.status = 'running' and new.status in ('completed', 'failed', 'cancelled'))) then
    raise exception 'Cannot move execution % from % to %', old.id, old.status, new.status
      using errcode = '22023';
  end if;
  return new;
end
$$;

-- Insert one callback (or error callback) at the head of its queue (the stamping rule in
-- queue.sql) and wake its consumers. Callbacks bypass the payload limit: their results
-- come from shoal, not from a caller. spec->>'traceparent', when its fan-out had one
-- (shoal.fan_out), is the fan-out's span: a traced consumer links the callback's run to it.
create or replace function shoal.insert_callback(
  spec jsonb, payload jsonb, execution_id bigint, barrier_id bigint, child_index integer
) returns bigint
language plpgsql volatile as $$
declare
  new_id bigint;
  new_seq bigint;
  q text := spec->>'queue';
  p integer := coalesce((spec->>'priority')::integer, 0);
begin
  insert into shoal.jobs as j (queue, task, payload, priority, fairness_key, fair_seq,
                               max_attempts, execution_id, barrier_id, child_index,
                               concurrency_key, traceparent)
  values (q, spec->>'task', payload, p, coalesce(spec->>'fairness_key', ''),
          coalesce(shoal.level_head(q, p), 1),
          coalesce((spec->>'max_attempts')::integer, 25),
          execution_id, barrier_id, child_index, spec->>'concurrency_key',
          spec->>'traceparent')
  returning j.id, j.fair_seq into new_id, new_seq;
  perform shoal.notify_jobs(array[q], null, array[p], array[new_seq]);
  return new_id;
end
$$;

-- Fail an execution and tear down everything it holds: its jobs, its barriers (firing
-- each one's error callback once, outside the execution so it still runs) and their
-- arrivals. A terminal execution is left as it is. Returns whether it was failed here.
create or replace function shoal.fail_execution(execution bigint, reason text) returns boolean
language plpgsql volatile as $$
declare
  b record;
begin
  -- Nothing of a finished execution is torn down again (and no error callback fires twice).
  if not exists (select 1 from shoal.executions
                 where id = execution and status in ('pending', 'running')) then
    return false;
  end if;
  -- Skip jobs another transaction holds: whoever holds them is acking, failing, cancelling
  -- or claiming them. Waiting here would deadlock two siblings that fail at once (each
  -- holds its own row and wants the other's). A job that survives this way is acked
  -- unrun by its next claim (its execution has ended) or finds nothing when it finishes.
  delete from shoal.jobs where id in (
    select j.id from shoal.jobs j where j.execution_id = execution
    for update skip locked);
  for b in
    delete from shoal.barriers where execution_id = execution returning *
  loop
    if b.error_callback is not null then
      perform shoal.insert_callback(
        b.error_callback,
        coalesce(b.error_callback->'payload', '{}'::jsonb)
          || jsonb_build_object('execution_id', execution, 'error', reason),
        null, null, null);
    end if;
  end loop;
  update shoal.executions
  set status = 'failed', error = reason, finished_at = now(), updated_at = now()
  where id = execution and status in ('pending', 'running');
  if not found then
    return false;
  end if;
  -- Its held jobs go after the update, in a statement of their own: an enqueue_after that
  -- held the execution's lock with a dependant not yet committed has committed by now (the
  -- update waited for it), and this statement sees that dependant (THE LOCK ORDER).
  perform shoal.end_dependencies(execution);
  return true;
end
$$;

-- A job of an execution that is dead-lettered (failed out, permanent, or poison) fails
-- its execution with the job's reason, in the same transaction (the trigger
-- dead_jobs_fail_execution on shoal.dead_jobs).
-- Unless every job waiting for it runs anyway (on_dependency_failure 'run', "Dependencies"
-- below): then the failure is recorded for them and the execution goes on.
create or replace function shoal.on_job_dead() returns trigger
language plpgsql as $$
begin
  if new.execution_id is not null
     and shoal.dependency_failed(new.execution_id, new.id, new.task, new.reason) then
    return null;
  end if;
  perform shoal.fail_execution(new.execution_id,
    format('Job %s (%s) failed: %s', new.id, new.task, new.reason));
  return null;
end
$$;

-- Cancel an execution: its jobs go (running handlers see their claim vanish at their
-- next heartbeat and are aborted), its barriers go, no callback runs.
create or replace function shoal.cancel_execution(execution bigint) returns boolean
language plpgsql volatile as $$
begin
  if not exists (select 1 from shoal.executions
                 where id = execution and status in ('pending', 'running')) then
    return false;
  end if;
  delete from shoal.jobs where id in (
    select j.id from shoal.jobs j where j.execution_id = execution order by j.id for update);
  delete from shoal.barriers where execution_id = execution;
  update shoal.executions
  set status = 'cancelled', finished_at = now(), updated_at = now()
  where id = execution and status in ('pending', 'running');
  if not found then
    return false;
  end if;
  -- After the update, as in fail_execution: a dependant enqueued meanwhile goes too.
  perform shoal.end_dependencies(execution);
  return true;
end
$$;

-- Start an execution with its first job: the entry point for any language. A null queue or
-- max_attempts (the defaults) follows the catalog rule (queue.sql); as in shoal.enqueue,
-- queue and task default to null only so that task may be named alone. Returns the
-- execution's id; shoal.start_execution_result says whether it was started by this call.
--   select shoal.start_execution('default', 'shoal.chord', '{"children": [...], ...}');
--   select shoal.start_execution(task => 'app.report', payload => '{"day": "2024-05-01"}');
--   select shoal.start_execution(task => 'app.ship', payload => '{"order": 42}', key => 'order-42');
-- traceparent (issue 16): the W3C trace context of the producer's span, stored with the
-- first job (checked as shoal.enqueue_jobs checks it), which a traced consumer links the
-- job's run to. Revision 7 added it: the signature before it goes, so that calls naming
-- fewer arguments are not ambiguous between the two.
-- key (issue 17, idempotent start): see shoal.start_execution_result. Added after
-- traceparent, so the signature without it goes too.
drop function if exists shoal.start_execution(text, text, jsonb, integer, text, integer,
                                              timestamptz);
drop function if exists shoal.start_execution(text, text, jsonb, integer, text, integer,
                                              timestamptz, text);
create or replace function shoal.start_execution_result(
  queue text default null,
  task text default null,
  payload jsonb default '{}',
  priority integer default 0,
  fairness_key text default null,
  max_attempts integer default null,
  run_at timestamptz default null,
  traceparent text default null,
  key text default null
) returns table (id bigint, created boolean)
language plpgsql volatile as $$
#variable_conflict use_column
declare
  execution bigint;
  problem text[];
begin
  -- The key's rule, as lib/names.ts checkExecutionKey states it: 1 to 512 characters, none
  -- of them a control character (C0, DEL or C1), so that it prints on one line.
  if start_execution_result.key is not null
     and (length(start_execution_result.key) not between 1 and 512
          or start_execution_result.key ~ '[\u0001-\u001f\u007f-\u009f]') then
    raise exception 'Cannot start execution: key must be 1 to 512 printable characters'
      using errcode = '22023';
  end if;
  -- The job is checked first, as enqueue_jobs checks it below: a retried start whose key is
  -- held must be refused for a bad job as the first start was, not answered with the holder.
  problem := coalesce(
    shoal.job_error(1, start_execution_result.queue, start_execution_result.task,
                    start_execution_result.payload, start_execution_result.priority,
                    start_execution_result.fairness_key, start_execution_result.max_attempts,
                    null),
    shoal.traceparent_error('Cannot enqueue job 1', start_execution_result.traceparent));
  if problem is not null then
    raise exception using errcode = problem[1], message = problem[2];
  end if;
  if start_execution_result.key is null then
    -- No key, no conflict to look for: the plain insert every start made before keys.
    insert into shoal.executions (label) values (start_execution_result.task)
    returning id into execution;
  else
    -- Idempotent start. The unique index executions_key (023) lets one insert of a key in:
    -- a concurrent start of the same key waits for the inserting transaction, then finds the
    -- conflict (it committed) or inserts (it rolled back). Who lost reads the holder. The only
    -- way that read finds nothing is the reaper releasing the key in between (a tombstone past
    -- its window): then the key is free and the insert is tried again.
    for attempt in 1..10 loop
      insert into shoal.executions as x (label, key)
      values (start_execution_result.task, start_execution_result.key)
      on conflict (key) where key is not null do nothing
      returning x.id into execution;
      exit when execution is not null;
      select x.id into execution from shoal.executions x where x.key = start_execution_result.key;
      if found then
        return query select execution, false;
        return;
      end if;
    end loop;
    if execution is null then
      raise exception 'Cannot start execution: key % was taken and released 10 times in a row',
        start_execution_result.key using errcode = '40001';
    end if;
  end if;
  -- No dedupe key on the job: a key already held would leave the execution without it.
  perform shoal.enqueue_jobs(jsonb_build_array(
    jsonb_strip_nulls(jsonb_build_object(
      'queue', start_execution_result.queue, 'task', start_execution_result.task,
      'priority', start_execution_result.priority,
      'fairness_key', start_execution_result.fairness_key,
      'max_attempts', start_execution_result.max_attempts,
      'run_at', start_execution_result.run_at, 'execution_id', execution,
      'traceparent', start_execution_result.traceparent))
    || jsonb_build_object('payload', start_execution_result.payload)));
  return query select execution, true;
end
$$;

create or replace function shoal.start_execution(
  queue text default null,
  task text default null,
  payload jsonb default '{}',
  priority integer default 0,
  fairness_key text default null,
  max_attempts integer default null,
  run_at timestamptz default null,
  traceparent text default null,
  key text default null
) returns bigint
language sql volatile as $$
  select r.id from shoal.start_execution_result(queue, task, payload, priority, fairness_key,
                                                max_attempts, run_at, traceparent, key) r
$$;

-- The callback or error callback of a fan-out as the barrier stores it, checked now: a
-- callback that cannot be enqueued would otherwise fail the last child's ack, over and
-- over, until the fan-out expired. Children are checked by shoal.job_error. Its queue and
-- max_attempts follow the catalog rule (queue.sql) as the fan-out opens, falling back to
-- the producer's queue: the barrier stores them resolved, so the callback lands where its
-- task was registered then. Without a parent (the check before the parent is locked)
-- nothing is looked up.
create or replace function shoal.fan_out_callback(spec jsonb, what text, parent shoal.jobs)
returns jsonb
language plpgsql stable as $$
declare
  name_pattern constant text := '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$';
  q text;
  m integer;
begin
  if jsonb_typeof(spec) is distinct from 'object'
     or jsonb_typeof(spec->'task') is distinct from 'string'
     or not (spec->>'task' ~ name_pattern) then
    raise exception 'Cannot fan out: % must be an object with a task name of 1 to 128 letters, digits or _.:-', what
      using errcode = '22023';
  end if;
  if spec ? 'queue' and (jsonb_typeof(spec->'queue') is distinct from 'string'
                         or not (spec->>'queue' ~ name_pattern)) then
    raise exception 'Cannot fan out: % queue must be a name of 1 to 128 letters, digits or _.:-', what
      using errcode = '22023';
  end if;
  if coalesce(jsonb_typeof(spec->'payload'), 'object') <> 'object' then
    raise exception 'Cannot fan out: % payload must be a JSON object', what using errcode = '22023';
  end if;
  if spec ? 'max_attempts' and (jsonb_typeof(spec->'max_attempts') is distinct from 'number'
       or (spec->>'max_attempts')::numeric not between 1 and 1000
       or (spec->>'max_attempts')::numeric <> trunc((spec->>'max_attempts')::numeric)) then
    raise exception 'Cannot fan out: % max_attempts must be an integer from 1 to 1000', what
      using errcode = '22023';
  end if;
  q := spec->>'queue';
  m := (spec->>'max_attempts')::integer;
  if parent.id is not null then
    select s.queue, s.max_attempts into q, m
    from shoal.task_settings(spec->>'task', q, m, parent.queue) s;
  end if;
  -- Nulls are stripped from the envelope only: the payload is the caller's, kept as given.
  return jsonb_strip_nulls(jsonb_build_object(
      'task', spec->>'task',
      'queue', q,
      'max_attempts', m,
      'priority', parent.priority,
      'fairness_key', nullif(parent.fairness_key, ''),
      'concurrency_key', parent.concurrency_key))
    || jsonb_build_object('payload', coalesce(spec->'payload', '{}'::jsonb));
end
$$;

-- Fan out from a running job, in one transaction with that job's ack: remove the parent
-- (fenced by its token), open a barrier, enqueue the children. The fan-out belongs to the
-- parent's execution, or to a new one. Zero children enqueue the callback at once with
-- an empty result list. Returns the execution id, or null when the parent's claim was
-- stale (nothing changed).
--
-- spec: {"children": [{"task", "payload"?, "queue"?, "max_attempts"?}, ...],
--        "callback": {"task", "payload"?, "queue"?, "max_attempts"?},
--        "on_error"?: {...same...}, "expires_in_ms"?: integer, "traceparent"?: text}
--
-- traceparent (issue 16): the W3C trace context of the fan-out's span, sent by a traced
-- consumer only. The children carry it, and so do the callbacks (stored in the barrier's
-- callback envelopes), so each of their runs links to the fan-out.
--
-- The children are checked with the job checks (a child is "job" n, from 1) and inserted by
-- shoal.insert_jobs in child order, with the parent's priority and fairness key: ids are
-- drawn and each queue's children stamped in child order, so they run in child order. A
-- child's queue and max_attempts follow the catalog rule (queue.sql), falling back to the
-- parent's queue; so do the callbacks' (shoal.fan_out_callback).
create or replace function shoal.fan_out(
  parent_id bigint, parent_token bigint, spec jsonb, max_children integer default 100000
) returns bigint
language plpgsql volatile as $$
declare
  parent shoal.jobs;
  execution bigint;
  n integer;
  barrier bigint;
  callback jsonb;
  error_callback jsonb;
  problem text[];
  kids record;
  kid_queues text[];
  kid_attempts integer[];
  trace text;
begin
  if jsonb_typeof(spec) is distinct from 'object'
     or jsonb_typeof(spec->'children') is distinct from 'array' then
    raise exception 'Cannot fan out: children must be a JSON array' using errcode = '22023';
  end if;
  if spec ? 'expires_in_ms' and (jsonb_typeof(spec->'expires_in_ms') is distinct from 'number'
       or (spec->>'expires_in_ms')::numeric <= 0
       or (spec->>'expires_in_ms')::numeric <> trunc((spec->>'expires_in_ms')::numeric)
       or (spec->>'expires_in_ms')::numeric > 315576000000) then
    raise exception 'Cannot fan out: expires_in_ms must be a positive integer of at most 10 years'
      using errcode = '22023';
  end if;
  if spec ? 'traceparent' then
    if jsonb_typeof(spec->'traceparent') is distinct from 'string' then
      raise exception 'Cannot fan out: traceparent must be a string' using errcode = '22023';
    end if;
    problem := shoal.traceparent_error('Cannot fan out', spec->>'traceparent');
    if problem is not null then
      raise exception using errcode = problem[1], message = problem[2];
    end if;
    trace := spec->>'traceparent';
  end if;
  n := jsonb_array_length(spec->'children');
  if n > max_children then
    raise exception 'Cannot fan out % children: the limit is %', n, max_children
      using errcode = '54000';
  end if;

  -- Checked before the parent goes, against a row of its shape, so an invalid spec is an
  -- error even from a stale claim (the parent itself only lends its queue and priority).
  perform shoal.fan_out_callback(spec->'callback', 'callback', null::shoal.jobs);
  if spec ? 'on_error' and jsonb_typeof(spec->'on_error') <> 'null' then
    perform shoal.fan_out_callback(spec->'on_error', 'on_error', null::shoal.jobs);
  end if;

  -- The children too, read the way the insert below reads them: task and queue as text, a
  -- missing payload is {}. A child without a queue takes its task's or its parent's (a
  -- valid name, so any valid name stands in for it here); key, fairness key and priority
  -- are the parent's.
  select x.problem into problem
  from (
    select shoal.job_error(c.ord, coalesce(c.child->>'queue', 'parent'), c.child->>'task',
                           c.child->'payload', null, null,
                           (c.child->>'max_attempts')::numeric, null) as problem
    from jsonb_array_elements(spec->'children') with ordinality as c(child, ord)
  ) x
  where x.problem is not null
  limit 1;
  if problem is not null then
    raise exception using errcode = problem[1], message = problem[2];
  end if;

  -- A job others depend on completes with a result; a fan-out would end it without one
  -- and leave its dependants waiting ("Dependencies" below).
  if exists (select 1 from shoal.job_dependencies d where d.dependency_id = parent_id) then
    raise exception 'Cannot fan out from job %: other jobs depend on it (fan out from a job before it instead)', parent_id
      using errcode = '22023';
  end if;

  delete from shoal.jobs where id = parent_id and token = parent_token returning * into parent;
  if not found then
    return null;
  end if;
  if parent.execution_id is not null then
    -- The check above cannot see a dependant enqueue_after has not committed yet (it holds
    -- the execution's lock while it adds one): take that lock (jobs, then executions: THE
    -- LOCK ORDER) and look again, in a statement that sees what it committed. Either it
    -- committed first and the fan-out is refused, or it waits for this one and then finds
    -- the parent gone (it refuses a dependency that is no job of the execution).
    perform 1 from shoal.executions e where e.id = parent.execution_id for update;
    if exists (select 1 from shoal.job_dependencies d where d.dependency_id = parent_id) then
      raise exception 'Cannot fan out from job %: other jobs depend on it (fan out from a job before it instead)', parent_id
        using errcode = '22023';
    end if;
  end if;
  perform shoal.slots_freed(array[parent.queue::text],
                           array[coalesce(parent.concurrency_key, parent.fairness_key)]);

  execution := parent.execution_id;
  if execution is null then
    insert into shoal.executions (status, label, started_at)
    values ('running', parent.task, now()) returning id into execution;
  end if;

  callback := shoal.fan_out_callback(spec->'callback', 'callback', parent);
  if spec ? 'on_error' and jsonb_typeof(spec->'on_error') <> 'null' then
    error_callback := shoal.fan_out_callback(spec->'on_error', 'on_error', parent);
  end if;
  if trace is not null then
    callback := callback || jsonb_build_object('traceparent', trace);
    error_callback := error_callback || jsonb_build_object('traceparent', trace);
  end if;

  if n = 0 then
    -- The chord with an empty header: the callback runs now, with no results.
    perform shoal.insert_callback(
      callback, (callback->'payload') || jsonb_build_object('results', '[]'::jsonb),
      execution, parent.barrier_id, parent.child_index);
    return execution;
  end if;

  insert into shoal.barriers (execution_id, total, remaining, callback, error_callback,
                              parent_barrier_id, parent_child_index, expires_at)
  values (execution, n, n, callback, error_callback, parent.barrier_id, parent.child_index,
          now() + coalesce((spec->>'expires_in_ms')::bigint, 86400000) * interval '1 ms')
  returning id into barrier;

  select array_agg(c.child->>'queue' order by c.ord) as queues,
         array_agg(c.child->>'task' order by c.ord) as tasks,
         array_agg(coalesce(c.child->'payload', '{}'::jsonb) order by c.ord) as payloads,
         array_agg((c.child->>'max_attempts')::integer order by c.ord) as max_attempts,
         array_agg((c.ord - 1)::integer order by c.ord) as child_indexes
  into kids
  from jsonb_array_elements(spec->'children') with ordinality as c(child, ord);
  select s.queues, s.max_attempts into kid_queues, kid_attempts
  from shoal.task_settings_many(kids.tasks, kids.queues, kids.max_attempts, parent.queue) s;

  perform shoal.insert_jobs(
    kid_queues, kids.tasks, kids.payloads, null,
    array_fill(parent.priority, array[n]), array_fill(parent.fairness_key, array[n]),
    kid_attempts, null, true,
    array_fill(execution, array[n]), array_fill(barrier, array[n]), kids.child_indexes,
    array_fill(parent.concurrency_key, array[n]),
    case when trace is not null then array_fill(trace, array[n]) end);
  return execution;
end
$$;

-- Complete (ack) a batch of claimed jobs, fenced by their tokens, with their results
-- (a JSON array aligned with ids). In one transaction: the jobs go; a barrier child's
-- arrival is recorded (once per child index) and its barrier decremented; a barrier that
-- reaches zero enqueues its callback with the results in child order and is removed; an
-- execution left with no job and no barrier completes with the result of its last job.
-- Returns the ids that were still ours.
--
-- The first statement does all a barrier child needs: lock the jobs in id order and
-- delete those whose token still matches, lock their barriers in id order (a child of an
-- aborted or expired barrier finds none and records nothing), insert the arrivals (once per
-- child index: a redelivered child that arrived before inserts nothing and subtracts
-- nothing), subtract them from the counters. The counter is read and written on the
-- barrier's newest version (a concurrent batch of siblings committed first is waited for),
-- so no arrival is ever lost from it. Only barriers that filled (the callback fires) and
-- jobs that may end their execution (callbacks, plain steps) take further statements.
--
-- The results of a barrier that filled are read by a later statement, whose snapshot is
-- taken after its lock was granted: it sees every arrival that counted, its own and those
-- committed by other batches since this statement began.
create or replace function shoal.complete_jobs(
  ids bigint[], tokens bigint[], results jsonb default '[]'
)
returns table (id bigint)
language plpgsql volatile as $$
declare
  finished bigint[];
  finished_queues text[];
  finished_keys text[];
  steps shoal.completed[];
  filled bigint[];
  live bigint[];
  ended_ids bigint[];
  b record;
  e record;
  ordered jsonb;
begin
  -- Each side reaches shoal.jobs by primary key: a join filter between the input and the
  -- locked rows is quadratic in the batch, and a consumer's batch holds hundreds.
  with locked as (
    select j.id, u.ord from unnest(ids, tokens) with ordinality as u(id, token, ord)
    join shoal.jobs j on j.id = u.id and j.token = u.token
    order by j.id for update of j
  ),
  deleted as (
    delete from shoal.jobs j using locked l where j.id = l.id
    returning j.id, j.execution_id, j.barrier_id, j.child_index,
              coalesce(results->(l.ord::integer - 1), 'null'::jsonb) as result, l.ord,
              j.queue, coalesce(j.concurrency_key, j.fairness_key) as flow_key
  ),
  open_barriers as (
    select x.id from shoal.barriers x
    where x.id in (select d.barrier_id from deleted d where d.barrier_id is not null)
    order by x.id
    for update
  ),
  arrived as (
    insert into shoal.arrivals as a (barrier_id, child_index, result)
    select d.barrier_id, d.child_index, d.result from deleted d
    where d.barrier_id in (select o.id from open_barriers o)
    on conflict do nothing
    returning a.barrier_id
  ),
  counted as (
    update shoal.barriers x set remaining = x.remaining - c.n
    from (select a.barrier_id, count(*)::integer as n from arrived a group by a.barrier_id) c
    where x.id = c.barrier_id
    returning x.id, x.remaining
  )
  select (select array_agg(d.id) from deleted d),
         (select array_agg(d.queue) from deleted d),
         (select array_agg(d.flow_key) from deleted d),
         (select array_agg(row(d.id, d.execution_id, d.barrier_id, d.child_index, d.result,
                               d.ord)::shoal.completed)
          from deleted d where d.execution_id is not null and d.barrier_id is null),
         (select array_agg(c.id order by c.id) from counted c where c.remaining <= 0)
  into finished, finished_queues, finished_keys, steps, filled;

  -- Their concurrency slots are free now (the slot rule, flow.sql): wake the held-back.
  -- With no key waiting for a slot anywhere, no call.
  if finished is not null and exists (select 1 from shoal.flow_keys k where k.waiting) then
    perform shoal.slots_freed(finished_queues, finished_keys);
  end if;

  -- The slow path, once per fan-out: enqueue the callback with the results in child
  -- order and remove the barrier (its arrivals go with it). Already locked, in id order.
  if filled is not null then
    for b in
      select x.* from shoal.barriers x where x.id = any(filled) order by x.id
    loop
      select coalesce(jsonb_agg(a.result order by a.child_index), '[]'::jsonb) into ordered
      from shoal.arrivals a where a.barrier_id = b.id;
      perform shoal.insert_callback(
        b.callback, (b.callback->'payload') || jsonb_build_object('results', ordered),
        b.execution_id, b.parent_barrier_id, b.parent_child_index);
      delete from shoal.barriers x where x.id = b.id;
    end loop;
  end if;

  -- Executions whose last job may just have finished: a callback or a plain step. A
  -- barrier child never ends its execution: its barrier is still open, or its arrival just
  -- enqueued the callback (a job of the same execution), or the barrier was torn down with
  -- the execution. Locked first (all of the batch's, in id order, in one statement), then
  -- checked by a new statement, so two last jobs finishing at once cannot both miss the
  -- completion. A batch's executions complete together: one statement locks them, one
  -- completes every one left with no job, barrier or held job, one removes their recorded
  -- results (the common case, an execution of one job, pays these three and nothing per
  -- execution).
  --
  -- Under the same lock, an execution that did not end has each step's result recorded and
  -- the jobs waiting for it counted down (released at zero: "Dependencies" below); the lock
  -- serialises two dependencies of one job completing at once, so it is released exactly
  -- once. An execution that ends here has no held job (its completion requires none, and a
  -- job is held only under its execution's lock or as the execution starts), hence no edge
  -- (every edge leads to a held job): of what end_dependencies removes, only its recorded
  -- results are left. Recording its last results would only insert rows deleted at once:
  -- it completes first, and records nothing.
  if steps is not null then
    select array_agg(l.id order by l.id) into live
    from (
      select x.id from shoal.executions x
      where x.id = any(array(select distinct c.execution_id from unnest(steps) c))
        and x.status in ('pending', 'running')
      order by x.id
      for update
    ) l;
  end if;

  if live is not null then
    with last as (
      select distinct on (c.execution_id) c.execution_id, c.result
      from unnest(steps) c
      where c.execution_id = any(live)
      order by c.execution_id, c.ord desc
    ),
    ended as (
      update shoal.executions x
      set status = 'completed', finished_at = now(), updated_at = now(), result = l.result
      from last l
      where x.id = l.execution_id
        and not exists (select 1 from shoal.jobs j where j.execution_id = x.id)
        and not exists (select 1 from shoal.barriers y where y.execution_id = x.id)
        and not exists (select 1 from shoal.held_jobs h where h.execution_id = x.id)
      returning x.id
    )
    select array_agg(n.id) into ended_ids from ended n;

    if ended_ids is not null then
      delete from shoal.job_results r where r.execution_id = any(ended_ids);
    end if;

    -- The executions that go on, in id order (the order they were locked in). When every one
    -- ended (the common case) not even the query runs.
    if ended_ids is null or cardinality(ended_ids) < cardinality(live) then
      for e in
        select u.id from unnest(live) as u(id)
        where ended_ids is null or u.id <> all(ended_ids)
        order by u.id
      loop
        perform shoal.dependencies_done(e.id, array(
          select c.id from unnest(steps) c where c.execution_id = e.id order by c.id),
          array(select c.result from unnest(steps) c where c.execution_id = e.id order by c.id),
          null);
      end loop;
    end if;
  end if;

  return query select f.id from unnest(finished) as f(id);
end
$$;

-- The reaper's recovery sweep: fail executions whose barrier expired (which removes the
-- barrier, its arrivals and the execution's remaining jobs). Returns how many.
--
-- A child may be arriving at that very moment. Following the lock order (jobs, then
-- barriers), the sweep first locks the execution's jobs, which waits out a completion in
-- flight, then locks the barrier and re-reads it: a barrier whose last child just arrived
-- is gone (its callback is enqueued, the execution goes on), and the reason counts the
-- arrivals as they are now. Either the callback runs or the execution fails, never both.
create or replace function shoal.expire_barriers(max_rows integer default 1000) returns integer
language plpgsql volatile as $$
declare
  b record;
  current record;
  n integer := 0;
begin
  -- Every job of every execution this sweep may fail, locked up front in one id order:
  -- the same order complete_jobs takes a batch spanning executions in, so never a deadlock.
  perform 1 from shoal.jobs j
  where j.execution_id in (select x.execution_id from shoal.barriers x
                           where x.expires_at < now() order by x.expires_at limit max_rows)
  order by j.id for update;
  for b in
    select x.id, x.execution_id from shoal.barriers x
    where x.expires_at < now()
    order by x.expires_at
    limit max_rows
  loop
    select x.total, x.remaining into current from shoal.barriers x
    where x.id = b.id and x.expires_at < now()
    for update;
    continue when not found;
    if shoal.fail_execution(b.execution_id,
         format('Fan-out expired with %s of %s children arrived',
                current.total - current.remaining, current.total)) then
      n := n + 1;
    else
      -- Its execution had already ended: the barrier is a leftover, not a failure.
      delete from shoal.barriers x where x.id = b.id;
    end if;
  end loop;
  return n;
end
$$;

-- Remove a barrier's arrivals with it, however the barrier goes (filled, failed, cancelled,
-- expired, or with its execution): the trigger barriers_delete_arrivals, once per statement.
-- arrivals has no foreign key to barriers (005): complete_jobs is its only writer, and
-- records an arrival only for a barrier it holds locked.
create or replace function shoal.delete_arrivals_of_barriers() returns trigger
language plpgsql as $$
begin
  delete from shoal.arrivals a using gone g where a.barrier_id = g.id;
  return null;
end
$$;

-- DEPENDENCIES (sql/024_dependencies.sql; docs/workflows.md, "Dependencies"). A job of an
-- execution may wait for others of the same execution: declared all at once as a workflow
-- (shoal.start_workflow) or one at a time (shoal.enqueue_after). A job that waits is held in
-- shoal.held_jobs, not in shoal.jobs, so no claim ever sees it or pays for it. Completing a
-- step of an execution (shoal.complete_jobs, under the execution's lock) that does not end it
-- records its result in shoal.job_results and counts down the jobs waiting for it (shoal.dependencies_done);
-- one that reaches zero is released (shoal.release_held) with its dependencies' results in
-- payload.dependencies, keyed by the names its edges give them. A dependency that fails for
-- good fails the execution (which removes every held job), unless each job waiting for it
-- runs anyway (on_dependency_failure 'run': shoal.dependency_failed). Whatever ends an
-- execution empties its held jobs, edges and results (shoal.end_dependencies). A fan-out
-- child cannot be a dependency (its result goes to its callback), and a job others depend
-- on cannot fan out (shoal.fan_out refuses it).
--
-- Locks: the execution's row is the lock of its dependencies. complete_jobs and
-- dependency_failed take it after the job (the lock order: jobs, then executions);
-- enqueue_after takes it before reading any job and locks none, and each check after it is a
-- new statement, so a dependency completing meanwhile either committed (its result is read)
-- or waits for the lock and then sees the new edge.

-- Remove an ending execution's held jobs, their edges and its recorded results.
create or replace function shoal.end_dependencies(execution bigint) returns void
language plpgsql volatile as $$
begin
  -- Every edge leads to a held job: a released job's edges go with its release.
  with gone as (
    delete from shoal.held_jobs h where h.execution_id = execution returning h.id
  )
  delete from shoal.job_dependencies d using gone g where d.dependant_id = g.id;
  delete from shoal.job_results r where r.execution_id = execution;
end
$$;

-- Record that jobs of a running execution finished (the caller holds the execution's lock):
-- with a result (errors[i] null) or failed for good (errors[i], the reason). A job already
-- recorded (a dead-lettered job retried and completed after its dependants ran) counts
-- nothing, so no dependant is counted down twice for one dependency. Releases the jobs whose
-- last dependency this was.
create or replace function shoal.dependencies_done(
  execution bigint, ids bigint[], results jsonb[], errors text[]
) returns void
language plpgsql volatile as $$
declare
  recorded bigint[];
  ready bigint[];
begin
  with rec as (
    insert into shoal.job_results as r (job_id, execution_id, result, error)
    select u.id, execution, u.result, u.error
    from unnest(ids, results, coalesce(errors, array_fill(null::text, array[cardinality(ids)])))
      as u(id, result, error)
    on conflict do nothing
    returning r.job_id
  )
  select array_agg(rec.job_id) into recorded from rec;
  if recorded is null then
    return;
  end if;
  with edges as (
    select d.dependant_id as id, count(*)::integer as n
    from shoal.job_dependencies d where d.dependency_id = any(recorded)
    group by d.dependant_id
  ),
  counted as (
    update shoal.held_jobs h set waiting = h.waiting - e.n
    from edges e where h.id = e.id
    returning h.id, h.waiting
  )
  select array_agg(c.id order by c.id) into ready from counted c where c.waiting = 0;
  if ready is not null then
    perform shoal.release_held(ready);
  end if;
end
$$;

-- Move held jobs whose dependencies have all finished into shoal.jobs, under the id they were
-- given when held, with payload.dependencies ({name: result}) and, when some failed,
-- payload.dependency_errors ({name: reason}). Stamped level with the head of their queue and
-- woken as a callback is (shoal.insert_callback): the work before them was admitted already.
-- Their payload may grow past the payload limit: the results come from shoal.
create or replace function shoal.release_held(ids bigint[]) returns void
language plpgsql volatile as $$
declare
  h record;
  deps jsonb;
  errs jsonb;
  q text;
  p integer;
  new_seq bigint;
begin
  for h in
    select x.* from shoal.held_jobs x where x.id = any(ids) order by x.id for update
  loop
    select jsonb_object_agg(d.name, coalesce(r.result, 'null'::jsonb)),
           jsonb_object_agg(d.name, r.error) filter (where r.error is not null)
    into deps, errs
    from shoal.job_dependencies d join shoal.job_results r on r.job_id = d.dependency_id
    where d.dependant_id = h.id;
    q := h.job->>'queue';
    p := coalesce((h.job->>'priority')::integer, 0);
    insert into shoal.jobs as j (id, queue, task, payload, priority, fairness_key, fair_seq,
                                 max_attempts, execution_id, concurrency_key, traceparent)
    values (h.id, q, h.job->>'task',
            coalesce(h.job->'payload', '{}'::jsonb)
              || jsonb_build_object('dependencies', coalesce(deps, '{}'::jsonb))
              || case when errs is null then '{}'::jsonb
                      else jsonb_build_object('dependency_errors', errs) end,
            p, coalesce(h.job->>'fairness_key', ''), coalesce(shoal.level_head(q, p), 1),
            (h.job->>'max_attempts')::integer, h.execution_id, h.job->>'concurrency_key',
            h.job->>'traceparent')
    returning j.fair_seq into new_seq;
    perform shoal.notify_jobs(array[q], null, array[p], array[new_seq]);
    delete from shoal.job_dependencies d where d.dependant_id = h.id;
    delete from shoal.held_jobs x where x.id = h.id;
  end loop;
end
$$;

-- A job of an execution was dead-lettered (shoal.on_job_dead). When jobs wait for it and
-- every one of them runs anyway (on_dependency_failure 'run'), its failure is recorded for
-- them, those it was the last dependency of are released, and the execution goes on: true.
-- Otherwise false, and the caller fails the execution.
create or replace function shoal.dependency_failed(
  execution bigint, failed_job bigint, task text, reason text
) returns boolean
language plpgsql volatile as $$
begin
  -- Cheap first: most jobs have no dependants.
  if not exists (select 1 from shoal.job_dependencies d where d.dependency_id = failed_job) then
    return false;
  end if;
  -- Locked before the dependants are read: no one adds a dependant meanwhile.
  perform 1 from shoal.executions x
  where x.id = execution and x.status in ('pending', 'running')
  for update;
  if not found
     or exists (select 1 from shoal.job_dependencies d
                join shoal.held_jobs h on h.id = d.dependant_id
                where d.dependency_id = failed_job and h.on_dependency_failure = 'fail') then
    return false;
  end if;
  perform shoal.dependencies_done(execution, array[failed_job], array[null::jsonb],
    array[format('Job %s (%s) failed: %s', failed_job, task, reason)]);
  return true;
end
$$;

-- Enqueue a job that runs after others complete: the entry point for any language, and what
-- enqueue(..., { after }) calls. `after` names jobs of one running execution (pending,
-- running, sleeping or held ones, or ones that completed); the new job joins that execution,
-- is held until they have all completed, and then receives their results in
-- payload.dependencies keyed by job id (as text). Returns its id. The job takes no dedupe key
-- and no run_at. A dependency that failed already refuses the job unless
-- on_dependency_failure is 'run'.
--   select shoal.enqueue_after(array[41, 42], 'report.merge', '{"day": "2024-05-01"}');
create or replace function shoal.enqueue_after(
  after bigint[],
  task text,
  payload jsonb default '{}',
  queue text default null,
  priority integer default 0,
  fairness_key text default null,
  max_attempts integer default null,
  concurrency_key text default null,
  traceparent text default null,
  on_dependency_failure text default 'fail'
) returns bigint
language plpgsql volatile as $$
#variable_conflict use_variable
declare
  deps bigint[];
  execution bigint;
  problem text[];
  bad record;
  waiting integer;
  q text;
  m integer;
  new_id bigint;
begin
  if coalesce(cardinality(after), 0) = 0 or array_position(after, null) is not null then
    raise exception 'Cannot enqueue: after must name at least one job id' using errcode = '22023';
  end if;
  if cardinality(after) > 1000 then
    raise exception 'Cannot enqueue: after names % jobs, over the limit of 1000', cardinality(after)
      using errcode = '54000';
  end if;
  if on_dependency_failure is null or on_dependency_failure not in ('fail', 'run') then
    raise exception 'Cannot enqueue: on_dependency_failure must be ''fail'' or ''run'''
      using errcode = '22023';
  end if;
  problem := shoal.job_error(1, queue, task, payload, priority, fairness_key, max_attempts, null,
                             concurrency_key);
  if problem is null then
    problem := shoal.traceparent_error('Cannot enqueue job 1', traceparent);
  end if;
  if problem is not null then
    raise exception using errcode = problem[1], message = problem[2];
  end if;
  deps := array(select distinct u from unnest(after) u order by u);

  -- The execution is the first dependency's, as the caller named them.
  execution := coalesce(
    (select j.execution_id from shoal.jobs j where j.id = after[1]),
    (select h.execution_id from shoal.held_jobs h where h.id = after[1]),
    (select r.execution_id from shoal.job_results r where r.job_id = after[1]));
  perform 1 from shoal.executions x
  where x.id = execution and x.status in ('pending', 'running')
  for update;
  if not found then
    raise exception 'Cannot enqueue: job % is not a job of a running execution (after takes jobs of one running execution)', after[1]
      using errcode = '22023';
  end if;

  -- Each dependency as it stands now that the lock is held.
  select u.id, s.state into bad
  from unnest(deps) u(id)
  -- A recorded outcome comes first: a job that failed for good and was then retried from the
  -- dead-letter table is back in shoal.jobs, but its completion records nothing new (its
  -- outcome is recorded once), so a job waiting for it would wait for good.
  cross join lateral (select case
    when exists (select 1 from shoal.job_results r
                 where r.job_id = u.id and r.execution_id = execution and r.error is null)
      then 'done'
    when exists (select 1 from shoal.job_results r
                 where r.job_id = u.id and r.execution_id = execution)
      then 'failed'
    when exists (select 1 from shoal.jobs j
                 where j.id = u.id and j.execution_id = execution and j.barrier_id is null)
      then 'waiting'
    when exists (select 1 from shoal.held_jobs h where h.id = u.id and h.execution_id = execution)
      then 'waiting'
    when exists (select 1 from shoal.jobs j where j.id = u.id and j.execution_id = execution)
      then 'child'
    else 'unknown' end as state) s
  where s.state in ('unknown', 'child')
     or (s.state = 'failed' and on_dependency_failure = 'fail')
  order by u.id
  limit 1;
  if found then
    raise exception '%', case bad.state
      when 'child' then format('Cannot enqueue: job %s is a fan-out child, which cannot be a dependency', bad.id)
      when 'failed' then format('Cannot enqueue: job %s failed (on_dependency_failure ''run'' runs a job after a failed one)', bad.id)
      else format('Cannot enqueue: job %s is not a job of execution %s (the execution of the first job after names)', bad.id, execution) end
      using errcode = '22023';
  end if;
  waiting := (select count(*)::integer from unnest(deps) u(id)
              where not exists (select 1 from shoal.job_results r where r.job_id = u.id)
                and (exists (select 1 from shoal.jobs j
                             where j.id = u.id and j.execution_id = execution)
                     or exists (select 1 from shoal.held_jobs h where h.id = u.id)));

  select s.queue, s.max_attempts into q, m
  from shoal.task_settings(task, queue, max_attempts) s;
  new_id := nextval(pg_get_serial_sequence('shoal.jobs', 'id')::regclass);
  insert into shoal.held_jobs (id, execution_id, job, waiting, on_dependency_failure)
  values (new_id, execution,
          jsonb_strip_nulls(jsonb_build_object(
            'queue', q, 'task', task, 'priority', priority, 'fairness_key', fairness_key,
            'max_attempts', m, 'concurrency_key', concurrency_key, 'traceparent', traceparent))
          || jsonb_build_object('payload', coalesce(payload, '{}'::jsonb)),
          waiting, on_dependency_failure);
  insert into shoal.job_dependencies (dependency_id, dependant_id, name)
  select u, new_id, u::text from unnest(deps) u;
  if waiting = 0 then
    perform shoal.release_held(array[new_id]);
  end if;
  return new_id;
end
$$;

-- Start a workflow: an execution whose steps are declared at once, each running after the
-- steps it names in `after`. The entry point for any language, and what startWorkflow()
-- calls. Returns the execution id. Refused whole, with one line, when a step is invalid,
-- two share an id, a step names an unknown one, or the steps form a cycle. Steps without
-- `after` are enqueued now (as enqueue_jobs would, in step order); the others are held.
-- A step receives the results of the steps it names in payload.dependencies, keyed by
-- their ids.
--   steps: [{"id", "task", "payload"?, "queue"?, "priority"?, "max_attempts"?,
--            "fairness_key"?, "concurrency_key"?, "traceparent"?, "after"?: [ids],
--            "on_dependency_failure"?: "fail" | "run"}, ...]   (1 to 1000)
--   select shoal.start_workflow('[{"id": "a", "task": "t.fetch"},
--                                 {"id": "b", "task": "t.sum", "after": ["a"]}]');
create or replace function shoal.start_workflow(steps jsonb, label text default null)
returns bigint
language plpgsql volatile as $$
declare
  name_pattern constant text := '^[A-Za-z0-9][A-Za-z0-9_.:-]*$';
  n integer;
  bad record;
  problem text[];
  graph jsonb;
  done text[] := '{}';
  -- Kahn's algorithm over the steps' ordinals (1..n, in step order): the edges sorted by
  -- dependency (edge_from, edge_to), where each step's edges start and how many there are,
  -- each step's dependencies not yet placed, and the steps placed, in order.
  edge_from integer[];
  edge_to integer[];
  first_edge integer[];
  edge_count integer[];
  unplaced integer[];
  placed integer[];
  head integer := 1;
  v integer;
  w integer;
  cur text;
  nxt text;
  path text[];
  execution bigint;
  roots record;
  ids jsonb := '{}';
  r record;
begin
  if jsonb_typeof(steps) is distinct from 'array' or jsonb_array_length(steps) = 0 then
    raise exception 'Cannot start workflow: steps must be a JSON array of 1 to 1000 steps'
      using errcode = '22023';
  end if;
  n := jsonb_array_length(steps);
  if n > 1000 then
    raise exception 'Cannot start workflow: % steps, over the limit of 1000', n
      using errcode = '54000';
  end if;
  if label is not null and length(label) > 200 then
    raise exception 'Cannot start workflow: label must be at most 200 characters'
      using errcode = '22023';
  end if;

  -- The shape of each step, in order; the first problem names its step.
  select s.ord, s.step into bad
  from jsonb_array_elements(steps) with ordinality s(step, ord)
  where jsonb_typeof(s.step) is distinct from 'object'
     or jsonb_typeof(s.step->'id') is distinct from 'string'
     or not (s.step->>'id' ~ name_pattern and length(s.step->>'id') <= 128)
  order by s.ord limit 1;
  if found then
    raise exception 'Cannot start workflow: step % must be an object with an id of 1 to 128 letters, digits or _.:- (starting with a letter or digit)', bad.ord
      using errcode = '22023';
  end if;
  select s.step->>'id' as id into bad
  from jsonb_array_elements(steps) with ordinality s(step, ord)
  where coalesce(jsonb_typeof(s.step->'after'), 'array') <> 'array'
     or exists (select 1 from jsonb_array_elements(coalesce(s.step->'after', '[]')) a
                where jsonb_typeof(a) <> 'string')
     or jsonb_array_length(coalesce(s.step->'after', '[]')) > 1000
     or coalesce(s.step->>'on_dependency_failure', 'fail') not in ('fail', 'run')
     or coalesce(jsonb_typeof(s.step->'on_dependency_failure'), 'string') <> 'string'
     or coalesce(jsonb_typeof(s.step->'task'), 'null') <> 'string'
     or coalesce(jsonb_typeof(s.step->'priority'), 'number') <> 'number'
     or coalesce(jsonb_typeof(s.step->'max_attempts'), 'number') <> 'number'
     or coalesce(jsonb_typeof(s.step->'queue'), 'string') <> 'string'
     or coalesce(jsonb_typeof(s.step->'fairness_key'), 'string') <> 'string'
     or coalesce(jsonb_typeof(s.step->'concurrency_key'), 'string') <> 'string'
     or coalesce(jsonb_typeof(s.step->'traceparent'), 'string') <> 'string'
  order by s.ord limit 1;
  if found then
    raise exception 'Cannot start workflow: step "%" must have a task name, after as an array of step ids, on_dependency_failure ''fail'' or ''run'', numbers for priority and max_attempts and strings for queue and keys', bad.id
      using errcode = '22023';
  end if;
  select s.step->>'id' as id into bad
  from jsonb_array_elements(steps) s(step)
  group by s.step->>'id' having count(*) > 1
  limit 1;
  if found then
    raise exception 'Cannot start workflow: two steps have the id "%"', bad.id
      using errcode = '22023';
  end if;
  select x.problem into problem
  from (select shoal.job_error(s.ord, s.step->>'queue', s.step->>'task', s.step->'payload',
                               (s.step->>'priority')::numeric, s.step->>'fairness_key',
                               (s.step->>'max_attempts')::numeric, null,
                               s.step->>'concurrency_key')
               as problem
        from jsonb_array_elements(steps) with ordinality s(step, ord)) x
  where x.problem is not null
  limit 1;
  if problem is null then
    select x.problem into problem
    from (select shoal.traceparent_error(format('Cannot enqueue job %s', s.ord),
                                         s.step->>'traceparent') as problem
          from jsonb_array_elements(steps) with ordinality s(step, ord)
          where s.step ? 'traceparent') x
    where x.problem is not null
    limit 1;
  end if;
  if problem is not null then
    raise exception using errcode = problem[1], message = problem[2];
  end if;

  -- References, then cycles.
  graph := (select jsonb_object_agg(s.step->>'id', coalesce(s.step->'after', '[]'::jsonb))
            from jsonb_array_elements(steps) s(step));
  select g.key as id, a.ref into bad
  from jsonb_each(graph) g
  cross join jsonb_array_elements_text(g.value) a(ref)
  where not graph ? a.ref
  limit 1;
  if found then
    raise exception 'Cannot start workflow: step "%" depends on unknown step "%"', bad.id, bad.ref
      using errcode = '22023';
  end if;
  -- Place the steps whose dependencies are all placed, one at a time (Kahn's algorithm);
  -- what is never placed lies on a cycle or after one. Linear in steps and edges: peeling
  -- them off round by round took 15 s for a chain of 1,000 steps.
  with m as (
    select s.step->>'id' as id, s.ord::integer as ord, s.step
    from jsonb_array_elements(steps) with ordinality s(step, ord)
  ),
  e as (
    select distinct d.ord as d, m.ord as s
    from m
    cross join jsonb_array_elements_text(coalesce(m.step->'after', '[]')) a(ref)
    join m d on d.id = a.ref
  )
  select coalesce(array_agg(e.d order by e.d, e.s), '{}'),
         coalesce(array_agg(e.s order by e.d, e.s), '{}')
  into edge_from, edge_to
  from e;
  select array_agg(coalesce(x.first, 0) order by g.i), array_agg(coalesce(x.n, 0) order by g.i),
         array_agg(coalesce(y.n, 0) order by g.i)
  into first_edge, edge_count, unplaced
  from generate_series(1, n) g(i)
  left join (select u.d, min(u.k)::integer as first, count(*)::integer as n
             from unnest(edge_from) with ordinality u(d, k) group by u.d) x on x.d = g.i
  left join (select u.s, count(*)::integer as n
             from unnest(edge_to) u(s) group by u.s) y on y.s = g.i;
  placed := array(select u.i from unnest(unplaced) with ordinality u(n, i)
                  where u.n = 0 order by u.i);
  while head <= cardinality(placed) loop
    v := placed[head];
    head := head + 1;
    for k in first_edge[v] .. first_edge[v] + edge_count[v] - 1 loop
      w := edge_to[k];
      unplaced[w] := unplaced[w] - 1;
      if unplaced[w] = 0 then
        placed := placed || w;
      end if;
    end loop;
  end loop;
  done := array(select s.step->>'id'
                from jsonb_array_elements(steps) with ordinality s(step, ord)
                where s.ord = any(placed));
  if cardinality(done) < n then
    -- Every step left has a dependency left: follow them from the first such step (in step
    -- order) until one comes round again. That one's loop is the cycle to name.
    cur := (select s.step->>'id' from jsonb_array_elements(steps) with ordinality s(step, ord)
            where not (s.step->>'id') = any(done) order by s.ord limit 1);
    path := array[cur];
    loop
      nxt := (select a.ref from jsonb_array_elements_text(graph->cur) with ordinality a(ref, o)
              where not a.ref = any(done) order by a.o limit 1);
      if nxt = any(path) then
        path := path[array_position(path, nxt):] || nxt;
        raise exception 'Cannot start workflow: step "%" depends on itself through %', nxt,
          (select string_agg(format('"%s"', p.v), ' -> ' order by p.o)
           from unnest(path[2:]) with ordinality p(v, o))
          using errcode = '22023';
      end if;
      path := path || nxt;
      cur := nxt;
    end loop;
  end if;

  insert into shoal.executions (label) values (coalesce(label, steps->0->>'task'))
  returning id into execution;

  -- Roots: enqueued now, in step order.
  select array_agg(s.step->>'id' order by s.ord) as names,
         array_agg(s.step->>'queue' order by s.ord) as queues,
         array_agg(s.step->>'task' order by s.ord) as tasks,
         array_agg(coalesce(s.step->'payload', '{}'::jsonb) order by s.ord) as payloads,
         array_agg((s.step->>'priority')::integer order by s.ord) as priorities,
         array_agg(s.step->>'fairness_key' order by s.ord) as fairness_keys,
         array_agg((s.step->>'max_attempts')::integer order by s.ord) as max_attempts,
         array_agg(s.step->>'concurrency_key' order by s.ord) as concurrency_keys,
         array_agg(s.step->>'traceparent' order by s.ord) as traceparents
  into roots
  from jsonb_array_elements(steps) with ordinality s(step, ord)
  where jsonb_array_length(coalesce(s.step->'after', '[]'::jsonb)) = 0;
  for r in
    select i.ord, i.id from shoal.insert_jobs(
      roots.queues, roots.tasks, roots.payloads, null, roots.priorities, roots.fairness_keys,
      roots.max_attempts, null, true, array_fill(execution, array[cardinality(roots.names)]),
      null, null, roots.concurrency_keys, roots.traceparents) i
  loop
    ids := ids || jsonb_build_object(roots.names[r.ord], r.id);
  end loop;

  -- The others: held, each waiting for its distinct dependencies.
  with held as (
    insert into shoal.held_jobs (id, execution_id, job, waiting, on_dependency_failure)
    select nextval(pg_get_serial_sequence('shoal.jobs', 'id')::regclass), execution,
           jsonb_strip_nulls(jsonb_build_object(
             'step', s.step->>'id', 'queue', t.queue, 'task', s.step->>'task',
             'priority', (s.step->>'priority')::integer,
             'fairness_key', s.step->>'fairness_key', 'max_attempts', t.max_attempts,
             'concurrency_key', s.step->>'concurrency_key',
             'traceparent', s.step->>'traceparent'))
           || jsonb_build_object('payload', coalesce(s.step->'payload', '{}'::jsonb)),
           (select count(distinct a.ref)::integer
            from jsonb_array_elements_text(s.step->'after') a(ref)),
           coalesce(s.step->>'on_dependency_failure', 'fail')
    from jsonb_array_elements(steps) with ordinality s(step, ord)
    cross join lateral shoal.task_settings(s.step->>'task', s.step->>'queue',
                                           (s.step->>'max_attempts')::integer) t
    where jsonb_array_length(coalesce(s.step->'after', '[]'::jsonb)) > 0
    order by s.ord
    returning id, job->>'step' as step
  )
  select ids || jsonb_object_agg(held.step, held.id) into ids from held;

  insert into shoal.job_dependencies (dependency_id, dependant_id, name)
  select distinct (ids->>a.ref)::bigint, (ids->>(s.step->>'id'))::bigint, a.ref
  from jsonb_array_elements(steps) s(step)
  cross join jsonb_array_elements_text(coalesce(s.step->'after', '[]'::jsonb)) a(ref);
  return execution;
end
$$;
