-- shoal 005: fan-out / fan-in at about the cost of plain jobs.
--
-- fan_out inserts its children itself, in one insert ... select over the spec, instead of
-- building a JSON envelope per child for the generic enqueue_jobs path: children have no
-- dedupe key, and all share the parent's priority and fairness key, so one stamp base per
-- queue is all the stamping they need.
--
-- complete_jobs acks a batch in one statement on the common path: delete the jobs (fenced
-- by their tokens), record the arrivals of barrier children, and subtract them from their
-- barriers' counters. Only barriers that filled (the callback fires) and jobs that may end
-- their execution (callbacks, plain steps) take further statements.
--
-- Lock order is unchanged: jobs (in id order), then barriers (in id order), then
-- executions.

-- The same rule as 001's, checked about ten times faster: a bounded repeat ({0,127}) makes
-- Postgres's regex engine build a large automaton and costs microseconds per match, twice
-- per inserted job (queue and task). "Starts with a letter or digit, then letters, digits
-- or _.:-, 1 to 128 characters in all" is unchanged (the class is ASCII: characters are
-- bytes). Dropped if present and added again, so this runs whatever an earlier migration
-- of a parallel branch did to it.
alter domain shoal.name drop constraint if exists name_format;
alter domain shoal.name add constraint name_format
  check (value ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]*$' and length(value) <= 128);

-- Nothing looks jobs up by barrier (teardown goes by execution): one index fewer to
-- maintain for every child enqueued.
drop index shoal.jobs_barrier_idx;

-- An arrival's foreign key ran a query per arrival to find (and key-share lock) a barrier
-- that complete_jobs has just locked itself: complete_jobs is the only writer of
-- arrivals, and it records an arrival only for a barrier it holds. What the key did
-- besides, removing a barrier's arrivals with it (however the barrier goes: filled,
-- failed, cancelled, expired, or with its execution), this trigger does, once per
-- statement.
alter table shoal.arrivals drop constraint arrivals_barrier_id_fkey;

create function shoal.delete_arrivals_of_barriers() returns trigger
language plpgsql as $$
begin
  delete from shoal.arrivals a using gone g where a.barrier_id = g.id;
  return null;
end
$$;

create trigger barriers_delete_arrivals after delete on shoal.barriers
referencing old table as gone
for each statement execute function shoal.delete_arrivals_of_barriers();

-- Same contract as in 003 (see there): the children are validated with enqueue_jobs'
-- messages, then inserted in child order in one statement.
create or replace function shoal.fan_out(
  parent_id bigint, parent_token bigint, spec jsonb, max_children integer default 100000
) returns bigint
language plpgsql volatile as $$
declare
  -- The rule of the shoal.name domain, in its fast form (see above).
  name_pattern constant text := '^[A-Za-z0-9][A-Za-z0-9_.:-]*$';
  limit_bytes integer := shoal.max_payload_bytes();
  -- Looked up once: pg_get_serial_sequence per row costs four catalog reads a child.
  job_ids constant regclass := pg_get_serial_sequence('shoal.jobs', 'id')::regclass;
  parent shoal.jobs;
  execution bigint;
  n integer;
  barrier bigint;
  callback jsonb;
  error_callback jsonb;
  bad record;
  queues text[];
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

  -- The children too, with the messages enqueue_jobs gives (a child is "job" n, from 1).
  -- A child is read the way the insert below reads it: its task and queue as text (a
  -- missing queue is the parent's), a missing payload is {}.
  select c.ord, c.child->'payload' as payload, c.child->>'max_attempts' as max_attempts
  into bad
  from jsonb_array_elements(spec->'children') with ordinality as c(child, ord)
  where coalesce(jsonb_typeof(c.child->'payload'), 'object') <> 'object'
     or octet_length(coalesce(c.child->'payload', '{}'::jsonb)::text) > limit_bytes
     or coalesce((c.child->>'max_attempts')::numeric not between 1 and 1000
                 or (c.child->>'max_attempts')::numeric
                    <> trunc((c.child->>'max_attempts')::numeric), false)
     or not coalesce(c.child->>'task' ~ name_pattern and length(c.child->>'task') <= 128, false)
     or not coalesce(c.child->>'queue' ~ name_pattern and length(c.child->>'queue') <= 128, true)
  order by c.ord
  limit 1;
  if found then
    if coalesce(jsonb_typeof(bad.payload), 'object') <> 'object' then
      raise exception 'Cannot enqueue job %: payload must be a JSON object, not %',
        bad.ord, jsonb_typeof(bad.payload) using errcode = '22023';
    elsif octet_length(coalesce(bad.payload, '{}'::jsonb)::text) > limit_bytes then
      raise exception 'Cannot enqueue job %: payload is % bytes, over the limit of % bytes',
        bad.ord, octet_length(bad.payload::text), limit_bytes using errcode = '54000';
    elsif bad.max_attempts is not null
          and (bad.max_attempts::numeric not between 1 and 1000
               or bad.max_attempts::numeric <> trunc(bad.max_attempts::numeric)) then
      raise exception 'Cannot enqueue job %: max_attempts must be from 1 to 1000', bad.ord
        using errcode = '22023';
    else
      raise exception 'Cannot enqueue job %: queue and task must be names of 1 to 128 letters, digits or _.:- (starting with a letter or digit)',
        bad.ord using errcode = '22023';
    end if;
  end if;

  delete from shoal.jobs where id = parent_id and token = parent_token returning * into parent;
  if not found then
    return null;
  end if;

  execution := parent.execution_id;
  if execution is null then
    insert into shoal.executions (status, label, started_at)
    values ('running', parent.task, now()) returning id into execution;
  end if;

  callback := shoal.fan_out_callback(spec->'callback', 'callback', parent);
  if spec ? 'on_error' and jsonb_typeof(spec->'on_error') <> 'null' then
    error_callback := shoal.fan_out_callback(spec->'on_error', 'on_error', parent);
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

  -- Ids are drawn in child order, and each queue's children are stamped in child order
  -- from one base (shoal.fair_seq_base, as every enqueue), so they run in child order.
  with kids as (
    select c.ord, c.child->>'task' as task, coalesce(c.child->>'queue', parent.queue) as queue,
           coalesce(c.child->'payload', '{}'::jsonb) as payload,
           coalesce((c.child->>'max_attempts')::integer, 25) as max_attempts
    from jsonb_array_elements(spec->'children') with ordinality as c(child, ord)
  ),
  bases as (
    select q.queue, shoal.fair_seq_base(q.queue, parent.fairness_key, parent.priority) as base
    from (select distinct k.queue from kids k) q
  ),
  numbered as (
    select nextval(job_ids) as new_id, o.*
    from (select k.*, b.base + row_number() over (partition by k.queue order by k.ord)
                   as fair_seq
          from kids k join bases b on b.queue = k.queue
          order by k.ord) o
  ),
  inserted as (
    insert into shoal.jobs (id, queue, task, payload, priority, fairness_key, fair_seq,
                            max_attempts, execution_id, barrier_id, child_index)
    select x.new_id, x.queue, x.task, x.payload, parent.priority, parent.fairness_key,
           x.fair_seq, x.max_attempts, execution, barrier, (x.ord - 1)::integer
    from numbered x
  )
  select array_agg(b.queue) into queues from bases b;

  perform pg_notify('shoal_jobs', q.queue) from unnest(queues) as q(queue);
  return execution;
end
$$;

-- Same contract as in 003 (see there). The first statement does all a barrier child
-- needs: lock the jobs in id order and delete those whose token still matches, lock
-- their barriers in id order (a child of an aborted or expired barrier finds none and
-- records nothing), insert the arrivals (once per child index: a redelivered child that
-- arrived before inserts nothing and subtracts nothing), subtract them from the counters.
-- The counter is read and written on the barrier's newest version (a concurrent batch of
-- siblings committed first is waited for), so no arrival is ever lost from it.
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
  steps shoal.completed[];
  filled bigint[];
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
              coalesce(results->(l.ord::integer - 1), 'null'::jsonb) as result, l.ord
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
         (select array_agg(row(d.id, d.execution_id, d.barrier_id, d.child_index, d.result,
                               d.ord)::shoal.completed)
          from deleted d where d.execution_id is not null and d.barrier_id is null),
         (select array_agg(c.id order by c.id) from counted c where c.remaining <= 0)
  into finished, steps, filled;

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

  -- Executions whose last job may just have finished (a callback or a plain step; a
  -- barrier child never ends its execution, see 003). Locked first, then checked by a
  -- new statement, so two last jobs finishing at once cannot both miss the completion.
  if steps is not null then
    for e in
      select x.id from shoal.executions x
      where x.id in (select c.execution_id from unnest(steps) c)
        and x.status in ('pending', 'running')
      order by x.id
      for update
    loop
      update shoal.executions x
      set status = 'completed', finished_at = now(), updated_at = now(),
          result = (select c.result from unnest(steps) c
                    where c.execution_id = e.id order by c.ord desc limit 1)
      where x.id = e.id
        and not exists (select 1 from shoal.jobs j where j.execution_id = e.id)
        and not exists (select 1 from shoal.barriers y where y.execution_id = e.id);
    end loop;
  end if;

  return query select f.id from unnest(finished) as f(id);
end
$$;
