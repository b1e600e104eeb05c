-- shoal 006: a faster enqueue, with the same results.
--
-- The insert itself moves into two functions that take plain columns instead of one jsonb
-- document: shoal.insert_job (one job) and shoal.insert_jobs (column arrays, one element
-- per job). TypeScript validates each job before it calls them (lib/queue.ts), so they
-- check only what TypeScript cannot know, the database's payload limit; the domains and
-- check constraints of shoal.jobs stay the last line. The public SQL entry points
-- (shoal.enqueue, shoal.enqueue_many) keep their signatures, checks and messages:
-- shoal.enqueue_jobs still validates its jsonb, then hands the columns to insert_jobs,
-- so every insert into shoal.jobs outside callbacks and dead-letter retries goes through
-- these two functions.
--
-- A job without a dedupe key is inserted by a plain INSERT: ON CONFLICT makes every row a
-- speculative insertion (one more WAL record each), so only keyed jobs pay for it.

-- Names: 005 already rewrote the shoal.name rule in its fast form ("one of [A-Za-z0-9],
-- then any of [A-Za-z0-9_.:-], at most 128 in all"); enqueue_jobs' own validation below
-- uses the same form.

-- The stamping index of 001 ran fair_seq descending, so every new job (stamped above its
-- key's last one) went to the far left of its group: no rightmost-page fast path and
-- frequent page splits (1,000 rows into a 20,000-row table took about 12 ms instead of
-- 4 ms). Ascending, new jobs append; the stamp lookup (order by fair_seq desc limit 1)
-- walks it backward just as cheaply.
drop index shoal.jobs_fairness_idx;
create index jobs_fairness_idx on shoal.jobs (queue, fairness_key, priority, fair_seq);

-- The stamp base of 001, unchanged, now in PL/pgSQL: a SQL function with subqueries is
-- never inlined, so Postgres planned its body again on every call (most of a single
-- enqueue's server time); PL/pgSQL keeps the plan for the session.
create or replace function shoal.fair_seq_base(queue text, fairness_key text, priority integer)
returns bigint
language plpgsql stable as $$
begin
  return greatest(
    (select j.fair_seq from shoal.jobs j
     where j.queue = $1 and j.fairness_key = $2 and j.priority = $3
     order by j.fair_seq desc limit 1),
    (select j.fair_seq - 1 from shoal.jobs j
     where j.queue = $1 and j.priority = $3 and j.run_at <= now()
     order by j.fair_seq, j.id limit 1),
    0);
end
$$;

-- What NOTIFY shoal_jobs says about jobs just enqueued on a queue: the queue name when one
-- can run now, else "queue@<epoch ms>" of the soonest, so a listening consumer sets a
-- timer for it instead of finding it at its next poll ('@' cannot occur in a queue name).
create function shoal.wake_payload(queue text, run_at timestamptz) returns text
language sql stable as $$
  select case when run_at is null or run_at <= now() then queue
              else queue || '@' || floor(extract(epoch from run_at) * 1000)::bigint::text end
$$;

-- Wake listening consumers for jobs on these queues starting at these instants (element i
-- of each array is one job; a null run_at is now): one NOTIFY per distinct payload, so a
-- consumer sets a timer for every start time it hears of, not only the soonest of a
-- batch. At most 100 payloads per queue and call, soonest first; later ones are left
-- to the consumers' poll.
create function shoal.notify_jobs(queues text[], run_ats timestamptz[]) returns void
language plpgsql volatile as $$
begin
  -- PERFORM runs the whole query (a SQL function returning void would stop at one row).
  perform pg_notify('shoal_jobs', w.payload)
  from (
    select p.payload,
           row_number() over (partition by p.queue order by p.at) as n
    from (
      select u.queue, shoal.wake_payload(u.queue, u.run_at) as payload,
             min(coalesce(u.run_at, now())) as at
      from unnest(queues, run_ats) as u(queue, run_at)
      group by 1, 2
    ) p
  ) w
  where w.n <= 100;
end
$$;

-- One job. Returns its id and inserted = true, or, when a job holding the same dedupe key
-- is pending or running on the queue, that job's id and inserted = false. Nulls take the
-- column defaults. notify sends NOTIFY shoal_jobs with the queue name (delivered at commit).
create function shoal.insert_job(
  queue text,
  task text,
  payload jsonb,
  run_at timestamptz default null,
  priority integer default null,
  fairness_key text default null,
  max_attempts integer default null,
  key text default null,
  notify boolean default true,
  execution_id bigint default null,
  barrier_id bigint default null,
  child_index integer default null,
  out id bigint,
  out inserted boolean
)
language plpgsql volatile as $$
#variable_conflict use_column
declare
  limit_bytes integer := shoal.max_payload_bytes();
  p integer := coalesce(insert_job.priority, 0);
  fk text := coalesce(insert_job.fairness_key, '');
  new_id bigint;
begin
  if octet_length(insert_job.payload::text) > limit_bytes then
    raise exception 'Cannot enqueue job 1: payload is % bytes, over the limit of % bytes',
      octet_length(insert_job.payload::text), limit_bytes using errcode = '54000';
  end if;
  if insert_job.key is null then
    insert into shoal.jobs as j (queue, task, payload, run_at, priority, fairness_key, fair_seq,
                                 max_attempts, execution_id, barrier_id, child_index)
    values (insert_job.queue, insert_job.task, insert_job.payload,
            coalesce(insert_job.run_at, now()), p, fk,
            shoal.fair_seq_base(insert_job.queue, fk, p) + 1,
            coalesce(insert_job.max_attempts, 25), insert_job.execution_id,
            insert_job.barrier_id, insert_job.child_index)
    returning j.id into new_id;
    inserted := true;
  else
    -- Each statement here sees rows committed since the last one: when the insert meets a
    -- key whose holder then finishes before the lookup, insert again.
    loop
      insert into shoal.jobs as j (queue, task, payload, run_at, priority, fairness_key,
                                   fair_seq, max_attempts, key, execution_id, barrier_id,
                                   child_index)
      values (insert_job.queue, insert_job.task, insert_job.payload,
              coalesce(insert_job.run_at, now()), p, fk,
              shoal.fair_seq_base(insert_job.queue, fk, p) + 1,
              coalesce(insert_job.max_attempts, 25), insert_job.key, insert_job.execution_id,
              insert_job.barrier_id, insert_job.child_index)
      on conflict (queue, key) where key is not null do nothing
      returning j.id into new_id;
      if found then
        inserted := true;
        exit;
      end if;
      select j.id into new_id from shoal.jobs j
      where j.queue = insert_job.queue and j.key = insert_job.key;
      if found then
        inserted := false;
        exit;
      end if;
    end loop;
  end if;
  id := new_id;
  if insert_job.notify then
    perform shoal.notify_jobs(array[insert_job.queue], array[insert_job.run_at]);
  end if;
end
$$;

-- Many jobs: element i of every array is job i (arrays left null mean all nulls: the
-- column defaults). Returns one row per job in input order, as shoal.insert_job would
-- for each; ids are drawn in input order. A job whose dedupe key is held (by an older
-- job or an earlier element of the same call) returns the holder's id. notify sends one
-- NOTIFY per queue.
create function shoal.insert_jobs(
  queues text[],
  tasks text[],
  payloads jsonb[],
  run_ats timestamptz[] default null,
  priorities integer[] default null,
  fairness_keys text[] default null,
  max_attempts integer[] default null,
  keys text[] default null,
  notify boolean default true,
  execution_ids bigint[] default null,
  barrier_ids bigint[] default null,
  child_indexes integer[] default null
) returns table (ord bigint, id bigint, inserted boolean)
language plpgsql volatile as $$
#variable_conflict use_column
declare
  n integer := coalesce(cardinality(queues), 0);
  limit_bytes integer := shoal.max_payload_bytes();
  seq regclass := pg_get_serial_sequence('shoal.jobs', 'id')::regclass;
  bad record;
  ids bigint[];
  missed bigint[];
  held boolean[];
  o bigint;
  base bigint;
  found_id bigint;
  one record;
begin
  if n = 0 then
    return;
  end if;
  if coalesce(cardinality(tasks), -1) <> n or coalesce(cardinality(payloads), -1) <> n
     or coalesce(cardinality(run_ats), n) <> n or coalesce(cardinality(priorities), n) <> n
     or coalesce(cardinality(fairness_keys), n) <> n
     or coalesce(cardinality(insert_jobs.max_attempts), n) <> n
     or coalesce(cardinality(keys), n) <> n or coalesce(cardinality(execution_ids), n) <> n
     or coalesce(cardinality(barrier_ids), n) <> n
     or coalesce(cardinality(child_indexes), n) <> n then
    raise exception 'Cannot enqueue: every column array must hold one element per job'
      using errcode = '22023';
  end if;

  select u.ord, octet_length(u.p::text) as bytes into bad
  from unnest(payloads) with ordinality as u(p, ord)
  where octet_length(u.p::text) > limit_bytes
  limit 1;
  if found then
    raise exception 'Cannot enqueue job %: payload is % bytes, over the limit of % bytes',
      bad.ord, bad.bytes, limit_bytes using errcode = '54000';
  end if;

  -- The common batch: no dedupe keys and one (queue, fairness key, priority) group. The
  -- rows go straight from the arrays, stamped base + position, with ids from the column
  -- default drawn in input order; no grouping, sorting or conflict handling to pay for.
  if (keys is null or cardinality(array_remove(keys, null)) = 0)
     and cardinality(array_remove(queues, queues[1])) = 0
     and (fairness_keys is null or cardinality(array_remove(fairness_keys, fairness_keys[1])) = 0)
     and (priorities is null or cardinality(array_remove(priorities, priorities[1])) = 0) then
    base := shoal.fair_seq_base(queues[1], coalesce(fairness_keys[1], ''),
                                coalesce(priorities[1], 0));
    with ins as (
      insert into shoal.jobs as j (queue, task, payload, run_at, priority, fairness_key,
                                   fair_seq, max_attempts, execution_id, barrier_id,
                                   child_index)
      select u.queue, u.task, u.payload, coalesce(u.run_at, now()), coalesce(u.priority, 0),
             coalesce(u.fairness_key, ''), base + u.ord, coalesce(u.max_attempts, 25),
             u.execution_id, u.barrier_id, u.child_index
      from unnest(queues, tasks, payloads, run_ats, priorities, fairness_keys,
                  insert_jobs.max_attempts, execution_ids, barrier_ids, child_indexes)
        with ordinality as u(queue, task, payload, run_at, priority, fairness_key,
                             max_attempts, execution_id, barrier_id, child_index, ord)
      returning j.id
    )
    select array_agg(ins.id order by ins.id) into ids from ins;
  else
    with input as materialized (
      -- Ids are drawn here, in input order (stamping below sorts by group).
      select u.ord, nextval(seq) as new_id, u.queue, u.task, u.payload,
             coalesce(u.run_at, now()) as run_at, coalesce(u.priority, 0) as priority,
             coalesce(u.fairness_key, '') as fairness_key,
             coalesce(u.max_attempts, 25) as max_attempts, u.key, u.execution_id, u.barrier_id,
             u.child_index
      from unnest(queues, tasks, payloads, run_ats, priorities, fairness_keys,
                  insert_jobs.max_attempts, keys, execution_ids, barrier_ids, child_indexes)
        with ordinality as u(queue, task, payload, run_at, priority, fairness_key, max_attempts,
                             key, execution_id, barrier_id, child_index, ord)
    ),
    groups as materialized (
      -- One stamp base per (queue, fairness key, priority).
      select g.queue, g.fairness_key, g.priority,
             shoal.fair_seq_base(g.queue, g.fairness_key, g.priority) as base
      from (select distinct i.queue, i.fairness_key, i.priority from input i) g
    ),
    stamped as materialized (
      select i.*, g.base + row_number() over (
               partition by i.queue, i.fairness_key, i.priority order by i.ord) as fair_seq
      from input i
      join groups g on g.queue = i.queue and g.fairness_key = i.fairness_key
        and g.priority = i.priority
    ),
    plain as (
      insert into shoal.jobs (id, queue, task, payload, run_at, priority, fairness_key, fair_seq,
                              max_attempts, execution_id, barrier_id, child_index)
      select s.new_id, s.queue, s.task, s.payload, s.run_at, s.priority, s.fairness_key,
             s.fair_seq, s.max_attempts, s.execution_id, s.barrier_id, s.child_index
      from stamped s where s.key is null order by s.ord
    ),
    keyed as (
      insert into shoal.jobs as j (id, queue, task, payload, run_at, priority, fairness_key,
                                   fair_seq, max_attempts, key, execution_id, barrier_id,
                                   child_index)
      select s.new_id, s.queue, s.task, s.payload, s.run_at, s.priority, s.fairness_key,
             s.fair_seq, s.max_attempts, s.key, s.execution_id, s.barrier_id, s.child_index
      from stamped s where s.key is not null order by s.ord
      on conflict (queue, key) where key is not null do nothing
      returning j.id
    )
    select array_agg(s.new_id order by s.ord),
           array_agg(s.ord order by s.ord) filter (
             where s.key is not null and s.new_id not in (select k.id from keyed k))
    into ids, missed
    from stamped s;

    -- Elements that met a dedupe key were not inserted (their planned id does not exist):
    -- find the job that holds the key (this statement sees rows committed since the
    -- insert); if the holder finished meanwhile, insert_job inserts after all.
    if missed is not null then
      held := array_fill(false, array[n]);
      foreach o in array missed loop
        select j.id into found_id from shoal.jobs j
        where j.queue = queues[o] and j.key = keys[o];
        if found then
          ids[o] := found_id;
          held[o] := true;
          continue;
        end if;
        select r.id, r.inserted into one
        from shoal.insert_job(queues[o], tasks[o], payloads[o], run_ats[o], priorities[o],
                              fairness_keys[o], insert_jobs.max_attempts[o], keys[o], false,
                              execution_ids[o], barrier_ids[o], child_indexes[o]) r;
        ids[o] := one.id;
        held[o] := not one.inserted;
      end loop;
    end if;
  end if;

  if insert_jobs.notify then
    perform shoal.notify_jobs(queues, run_ats);
  end if;

  return query
    select u.ord, u.id, not coalesce(held[u.ord], false)
    from unnest(ids) with ordinality as u(id, ord);
end
$$;

-- The jsonb body behind shoal.enqueue_many and shoal's own functions (start_execution,
-- fan_out): the same validation and messages as before, then the columns go to
-- insert_jobs.
create or replace function shoal.enqueue_jobs(jobs jsonb, notify boolean default true)
returns table (ord bigint, id bigint, inserted boolean)
language plpgsql volatile as $$
declare
  limit_bytes integer := shoal.max_payload_bytes();
  bad record;
  cols record;
begin
  if jsonb_typeof(jobs) is distinct from 'array' then
    raise exception 'Cannot enqueue: jobs must be a JSON array' using errcode = '22023';
  end if;

  -- Validate before inserting anything, so one bad element rejects the whole batch with
  -- a message that names it (the table's check constraints are the last line).
  select e.ord, e.j into bad from jsonb_array_elements(jobs) with ordinality as e(j, ord)
  where jsonb_typeof(e.j) <> 'object'
     or jsonb_typeof(e.j->'queue') is distinct from 'string'
     or jsonb_typeof(e.j->'task') is distinct from 'string'
     or coalesce(jsonb_typeof(e.j->'payload'), 'object') <> 'object'
     or octet_length(coalesce(e.j->'payload', '{}')::text) > limit_bytes
     or not (e.j->>'queue' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]*$' and length(e.j->>'queue') <= 128)
     or not (e.j->>'task' ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]*$' and length(e.j->>'task') <= 128)
     or coalesce(length(e.j->>'key') not between 1 and 512, false)
     or coalesce(length(e.j->>'fairness_key') > 256, false)
     or coalesce((e.j->>'max_attempts')::numeric not between 1 and 1000, false)
     or coalesce((e.j->>'priority')::numeric not between -32767 and 32767, false)
  limit 1;
  if found then
    if jsonb_typeof(bad.j) <> 'object' then
      raise exception 'Cannot enqueue job %: each job must be a JSON object', bad.ord
        using errcode = '22023';
    elsif coalesce(jsonb_typeof(bad.j->'payload'), 'object') <> 'object' then
      raise exception 'Cannot enqueue job %: payload must be a JSON object, not %',
        bad.ord, jsonb_typeof(bad.j->'payload') using errcode = '22023';
    elsif octet_length((bad.j->'payload')::text) > limit_bytes then
      raise exception 'Cannot enqueue job %: payload is % bytes, over the limit of % bytes',
        bad.ord, octet_length((bad.j->'payload')::text), limit_bytes using errcode = '54000';
    elsif coalesce(length(bad.j->>'key') not between 1 and 512, false) then
      raise exception 'Cannot enqueue job %: key must be 1 to 512 characters', bad.ord
        using errcode = '22023';
    elsif coalesce(length(bad.j->>'fairness_key') > 256, false) then
      raise exception 'Cannot enqueue job %: fairness_key must be at most 256 characters', bad.ord
        using errcode = '22023';
    elsif coalesce((bad.j->>'max_attempts')::numeric not between 1 and 1000, false) then
      raise exception 'Cannot enqueue job %: max_attempts must be from 1 to 1000', bad.ord
        using errcode = '22023';
    elsif coalesce((bad.j->>'priority')::numeric not between -32767 and 32767, false) then
      raise exception 'Cannot enqueue job %: priority must be from -32767 to 32767', bad.ord
        using errcode = '22023';
    else
      raise exception 'Cannot enqueue job %: queue and task must be names of 1 to 128 letters, digits or _.:- (starting with a letter or digit)',
        bad.ord using errcode = '22023';
    end if;
  end if;

  select array_agg(e.j->>'queue' order by e.ord) as queues,
         array_agg(e.j->>'task' order by e.ord) as tasks,
         array_agg(coalesce(e.j->'payload', '{}'::jsonb) order by e.ord) as payloads,
         array_agg((e.j->>'run_at')::timestamptz order by e.ord) as run_ats,
         array_agg((e.j->>'priority')::integer order by e.ord) as priorities,
         array_agg(e.j->>'fairness_key' order by e.ord) as fairness_keys,
         array_agg((e.j->>'max_attempts')::integer order by e.ord) as max_attempts,
         array_agg(e.j->>'key' order by e.ord) as keys,
         -- Workflow membership (set by shoal's own fan-out and start_execution).
         array_agg((e.j->>'execution_id')::bigint order by e.ord) as execution_ids,
         array_agg((e.j->>'barrier_id')::bigint order by e.ord) as barrier_ids,
         array_agg((e.j->>'child_index')::integer order by e.ord) as child_indexes
  into cols
  from jsonb_array_elements(jobs) with ordinality as e(j, ord);

  return query
    select r.ord, r.id, r.inserted
    from shoal.insert_jobs(cols.queues, cols.tasks, cols.payloads, cols.run_ats,
                           cols.priorities, cols.fairness_keys, cols.max_attempts, cols.keys,
                           notify, cols.execution_ids, cols.barrier_ids, cols.child_indexes) r;
end
$$;

-- Enqueue one job: the entry point for any language, with 001's checks and messages in
-- 001's order, then the same insert as TypeScript's (no jsonb document to build, strip
-- and unpack on the way).
--   select shoal.enqueue('emails', 'send_welcome', '{"user": 42}', priority => 5);
create or replace function shoal.enqueue(
  queue text,
  task text,
  payload jsonb default '{}',
  run_at timestamptz default null,
  priority integer default 0,
  key text default null,
  fairness_key text default null,
  max_attempts integer default 25,
  notify boolean default true
) returns bigint
language plpgsql volatile as $$
#variable_conflict use_variable
declare
  limit_bytes integer := shoal.max_payload_bytes();
  name_pattern constant text := '^[A-Za-z0-9][A-Za-z0-9_.:-]*$';
begin
  if jsonb_typeof(payload) is distinct from 'object' then
    raise exception 'Cannot enqueue job 1: payload must be a JSON object, not %',
      coalesce(jsonb_typeof(payload), 'null') using errcode = '22023';
  elsif octet_length(payload::text) > limit_bytes then
    raise exception 'Cannot enqueue job 1: payload is % bytes, over the limit of % bytes',
      octet_length(payload::text), limit_bytes using errcode = '54000';
  elsif length(key) not between 1 and 512 then
    raise exception 'Cannot enqueue job 1: key must be 1 to 512 characters'
      using errcode = '22023';
  elsif length(fairness_key) > 256 then
    raise exception 'Cannot enqueue job 1: fairness_key must be at most 256 characters'
      using errcode = '22023';
  elsif max_attempts not between 1 and 1000 then
    raise exception 'Cannot enqueue job 1: max_attempts must be from 1 to 1000'
      using errcode = '22023';
  elsif priority not between -32767 and 32767 then
    raise exception 'Cannot enqueue job 1: priority must be from -32767 to 32767'
      using errcode = '22023';
  elsif not coalesce(queue ~ name_pattern and length(queue) <= 128
                     and task ~ name_pattern and length(task) <= 128, false) then
    raise exception 'Cannot enqueue job 1: queue and task must be names of 1 to 128 letters, digits or _.:- (starting with a letter or digit)'
      using errcode = '22023';
  end if;
  return (select i.id
          from shoal.insert_job(queue, task, payload, run_at, priority, fairness_key,
                                max_attempts, key, notify) i);
end
$$;
