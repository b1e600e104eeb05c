-- shoal functions: putting jobs on shoal.jobs (the table and its indexes: 001, 004, 006).
--
-- Owns the limits, the job checks, the catalog rule, the stamping rule and the insert of
-- new jobs:
--   shoal.max_payload_bytes, shoal.fair_burst       limits, set per database or role
--   shoal.payload_error, shoal.job_error           the job checks (below)
--   shoal.task_settings, shoal.task_settings_many  the catalog rule (below)
--   shoal.level_head, shoal.fair_place,            the stamping rule (below)
--   shoal.fair_stamp, shoal.fair_seq_next
--   shoal.insert_job, shoal.insert_jobs             the one insert of new jobs, with its wake
--   shoal.traceparent_error                         the trace context check (below)
--   shoal.enqueue_jobs, shoal.enqueue_many,         the SQL entry points (checked, then
--   shoal.enqueue                                   insert_job(s))
-- Fan-out children go through insert_jobs too. Callbacks (shoal.insert_callback in
-- workflow.sql) and dead-letter retries (lib/dead.ts) write their own row, because they
-- carry what a new job has not (a place at the head of the queue; the id, token and history
-- of the job's earlier life); they follow the stamping rule below and wake through
-- shoal.notify_jobs like every other path.
--
-- THE JOB CHECKS, one rule for every way in (lib/queue.ts checks the same before it calls
-- insert_job(s), so those check only what TypeScript cannot know, the payload limit). In
-- this order, the first that fails names the job ("Cannot enqueue job <n>: ..."):
--   payload      a JSON object (a missing one is {}), at most shoal.max_payload_bytes() bytes
--                as text (SQLSTATE 54000; every other refusal is 22023)
--   key          1 to 512 characters, when given
--   fairness_key at most 256 characters
--   concurrency_key at most 256 characters (a job's flow key when given: flow.sql)
--   max_attempts an integer from 1 to 1000
--   priority     from -32767 to 32767
--   queue, task  names: a letter or digit, then letters, digits or _.:-, 1 to 128 in all
--                (a missing queue, null, is the task's: the catalog rule below)
-- The domains and check constraints of shoal.jobs stay the last line behind these.
--
-- THE CATALOG RULE, one for every way a new job comes in (TypeScript, SQL, the CLI,
-- schedules, fan-out children and callbacks). Consumers register the tasks they run in
-- shoal.tasks when they start (lib/catalog.ts). A job's queue and max_attempts are
--   1. the ones given (explicit arguments always win);
--   2. else (null) its task's in shoal.tasks, where its definition sets one;
--   3. else (a task the catalog has never seen, or whose definition sets none) queue
--      'default' (for a fan-out's child or callback: its producer's queue) and 25 attempts.
-- Applied where the job row is decided: at the insert (insert_job, insert_jobs and the
-- paths through them), at each fire of a schedule (lib/scheduler.ts enqueues then), and
-- when a fan-out opens for its callbacks (shoal.fan_out_callback stores them resolved in
-- the barrier). shoal.task_settings(_many) apply it: one primary-key probe per distinct
-- task of a call that misses either value, none when both are given.
--
-- THE STAMPING RULE. fair_seq is a virtual-time stamp per (queue, priority); the claim runs
-- priority first, then fair_seq, then id. A new job is stamped
--   shoal.fair_stamp(shoal.fair_place(queue, fairness_key, priority), n)
-- where n numbers the call's jobs of that (queue, fairness_key, priority) from 1 in input
-- order: after its key's own last job, and for a key without a backlog up to fair_burst()
-- places ahead of where claiming has got to at that priority (shoal.level_head, below). A
-- key that arrives behind another key's backlog interleaves with it instead of waiting for
-- it. A key of weight w (shoal.fairness_weights, set in flow.sql) puts w jobs on each stamp:
-- under contention it starts w jobs for each of a key of weight 1 (weights 1:2:4 share
-- 1:2:4). A callback is work already admitted (its fan-out's children ran): it is stamped level
-- with the head, so it runs next; so is a job handed back unstarted (release() in
-- lib/queue.ts), unless it already ranks after the head. Every stamp a path gives lies at or above
-- level_head - fair_burst(), where the consumer's claims start looking (claim.sql), except
-- a job that kept an old stamp (a retry, a delayed job, a job whose claim expired): the
-- consumer finds those with a claim from the index's head (claim.sql, "Where a claim starts").

-- Limits shared by every way in (TypeScript, SQL, CLI). A database or role may override
-- the payload limit with: alter database db set shoal.max_payload_bytes = '2097152'.
create or replace function shoal.max_payload_bytes() returns integer
language sql stable as $$
  select coalesce(nullif(current_setting('shoal.max_payload_bytes', true), '')::integer, 1048576)
$$;

-- How many places ahead of its queue's next job a fairness key without a backlog starts.
-- Change it per database with: alter database db set shoal.fair_burst = '20' (0 turns the
-- burst off).
create or replace function shoal.fair_burst() returns integer
language sql stable as $$
  select greatest(coalesce(nullif(current_setting('shoal.fair_burst', true), '')::integer, 100), 0)
$$;

-- Where a queue's claims have got to at a priority: the greatest stamp claimed there
-- (shoal.queue_heads, kept by shoal.claim_jobs, at most 100 ms old), or, at a priority no
-- claim has recorded yet, one less than its first ready job's stamp (null: none). Read
-- instead of the head of jobs_claim_idx: while another session holds a snapshot open, the
-- entries of jobs finished since pile up at that head and cannot be skipped cheaply
-- (sql/012_queue_heads.sql). A recorded head runs up to 100 ms behind, so a quiet key's
-- burst may start up to that much further ahead than fair_burst() places.
create or replace function shoal.level_head(queue text, priority integer) returns bigint
language plpgsql stable as $$
declare
  head bigint;
begin
  select h.fair_seq into head from shoal.queue_heads h where h.queue = $1 and h.priority = $2;
  if found then
    return head;
  end if;
  return (select j.fair_seq - 1 from shoal.jobs j
          where j.queue = $1 and j.priority = $2 and j.run_at <= now()
          order by j.fair_seq, j.id + 0 limit 1);
end
$$;

-- Where a key's next jobs at this priority go (the stamping rule above): base, the stamp
-- they follow; used, how many of the key's jobs base already holds; weight, how many a stamp
-- holds. From the key's own last job (base its stamp), else from the burst's place (base
-- full). Stamps may go negative: only their order matters. The key's own last job is
-- looked for only above the burst's place: below it, it would not change the result, and
-- the index entries there are mostly of finished jobs. PL/pgSQL, not SQL: a SQL function
-- with subqueries is never inlined, and would be planned again on every call.
create or replace function shoal.fair_place(queue text, fairness_key text, priority integer,
                                            out base bigint, out used bigint,
                                            out weight integer)
language plpgsql stable as $$
declare
  burst_at bigint := shoal.level_head($1, $3) - shoal.fair_burst();
  own bigint;
begin
  weight := coalesce((select w.weight from shoal.fairness_weights w
                      where w.queue = $1 and w.key = $2), 1);
  select j.fair_seq into own from shoal.jobs j
  where j.queue = $1 and j.fairness_key = $2 and j.priority = $3
    and j.fair_seq >= coalesce(burst_at, -9223372036854775808)
  order by j.fair_seq desc limit 1;
  if own is null then
    base := coalesce(burst_at, 0);
    used := weight;
  elsif weight = 1 then
    base := own;
    used := 1;
  else
    base := own;
    select count(*) into used from (
      select 1 from shoal.jobs j
      where j.queue = $1 and j.fairness_key = $2 and j.priority = $3 and j.fair_seq = own
      limit weight) x;
  end if;
end
$$;

-- The stamp of the n-th (from 1) of a call's jobs of one key at one priority, from its
-- place (shoal.fair_place): `weight` jobs to a stamp. SQL, inlined into the insert.
create or replace function shoal.fair_stamp(base bigint, used bigint, weight integer, n bigint)
returns bigint
language sql immutable as $$
  select base + (used + n - 1) / weight
$$;

-- The stamp of one new job of a key at a priority (the stamping rule above).
create or replace function shoal.fair_seq_next(queue text, fairness_key text, priority integer)
returns bigint
language sql stable as $$
  select shoal.fair_stamp(p.base, p.used, p.weight, 1) from shoal.fair_place($1, $2, $3) p
$$;

-- The stamp before a key's next job (that job: this + 1), as callers from before weights
-- existed (revision 4) compute it: kept while such a binary may still run.
create or replace function shoal.fair_seq_base(queue text, fairness_key text, priority integer)
returns bigint
language sql stable as $$
  select shoal.fair_seq_next($1, $2, $3) - 1
$$;

-- The payload part of the job checks, for job number ord: null when the payload passes,
-- else {SQLSTATE, message}. A null payload is a missing one ({}).
--
-- Both check functions are single-expression SQL functions, so Postgres inlines them into
-- the statement that calls them: checking a batch of 100,000 fan-out children costs what
-- the same expressions written out in that statement cost, not a function call per row.
-- The caller raises the first error it finds:
--   raise exception using errcode = problem[1], message = problem[2];
create or replace function shoal.payload_error(ord bigint, payload jsonb) returns text[]
language sql stable as $$
  select case
    when coalesce(jsonb_typeof(payload), 'object') <> 'object' then
      array['22023', format('Cannot enqueue job %s: payload must be a JSON object, not %s',
                            ord, jsonb_typeof(payload))]
    when octet_length(payload::text) > shoal.max_payload_bytes() then
      array['54000', format('Cannot enqueue job %s: payload is %s bytes, over the limit of %s bytes',
                            ord, octet_length(payload::text), shoal.max_payload_bytes())]
  end
$$;

-- A trace context (sql/018_traceparent.sql): null when it is null or a W3C traceparent of
-- version 00 in lower case with a trace id and span id that are not all zeros, else
-- {SQLSTATE, message}, the message starting with `refused` ('Cannot enqueue job 3',
-- 'Cannot fan out'). The one home of the format in SQL, worded as TypeScript's
-- TRACEPARENT_EXPECTED (lib/tracing.ts; tests/tracing_test.ts compares them). Separate from
-- job_error: shoal.enqueue calls it with its argument (a null costs one test),
-- shoal.enqueue_jobs only for a batch in which some element has a traceparent key, and the
-- table keeps a length check only (018).
drop function if exists shoal.traceparent_error(bigint, text);
create or replace function shoal.traceparent_error(refused text, traceparent text)
returns text[]
language sql immutable as $$
  select case
    when traceparent is not null
         and (traceparent !~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
              or substr(traceparent, 4, 32) = repeat('0', 32)
              or substr(traceparent, 37, 16) = repeat('0', 16)) then
      array['22023', refused || ': traceparent must be a W3C traceparent '
                     '"00-<32 hex trace id>-<16 hex span id>-<2 hex flags>" in lower case, '
                     'with a trace id and span id not all zeros']
  end
$$;

-- The job checks (above) for job number ord: null when it passes, else {SQLSTATE, message}.
-- Null arguments are missing values (they take the column defaults, or the catalog's for
-- queue and max_attempts), except task.
drop function if exists shoal.job_error(bigint, text, text, jsonb, numeric, text, numeric, text);
create or replace function shoal.job_error(
  ord bigint, queue text, task text, payload jsonb, priority numeric, fairness_key text,
  max_attempts numeric, key text, concurrency_key text default null
) returns text[]
language sql stable as $$
  select coalesce(shoal.payload_error(ord, payload), case
    when length(key) not between 1 and 512 then
      array['22023', format('Cannot enqueue job %s: key must be 1 to 512 characters', ord)]
    when length(fairness_key) > 256 then
      array['22023',
            format('Cannot enqueue job %s: fairness_key must be at most 256 characters', ord)]
    when length(concurrency_key) > 256 then
      array['22023',
            format('Cannot enqueue job %s: concurrency_key must be at most 256 characters', ord)]
    when max_attempts not between 1 and 1000 or max_attempts <> trunc(max_attempts) then
      array['22023', format('Cannot enqueue job %s: max_attempts must be from 1 to 1000', ord)]
    when priority not between -32767 and 32767 then
      array['22023', format('Cannot enqueue job %s: priority must be from -32767 to 32767', ord)]
    -- "[A-Za-z0-9_.:-]*" and a length check, not a bounded repeat ({0,127}): Postgres's regex
    -- engine builds a large automaton for the bounded form and matches ten times slower.
    when not coalesce(coalesce(queue ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]*$' and length(queue) <= 128,
                               queue is null)
                      and task ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]*$' and length(task) <= 128,
                      false) then
      array['22023', format('Cannot enqueue job %s: queue and task must be names of 1 to 128 letters, digits or _.:- (starting with a letter or digit)', ord)]
  end)
$$;

-- The catalog rule (above) for one job: queue and max_attempts as given; a null one is the
-- task's in shoal.tasks, else fallback_queue and 25. PL/pgSQL, so its probe is planned once.
create or replace function shoal.task_settings(
  task text,
  inout queue text,
  inout max_attempts integer,
  fallback_queue text default 'default'
)
language plpgsql stable as $$
declare
  known_queue text;
  known_attempts integer;
begin
  if queue is null or max_attempts is null then
    select t.queue, t.max_attempts into known_queue, known_attempts
    from shoal.tasks t where t.name = task_settings.task;
    queue := coalesce(queue, known_queue, fallback_queue);
    max_attempts := coalesce(max_attempts, known_attempts, 25);
  end if;
end
$$;

-- The catalog rule (above) for a batch: element i of each array is job i (a null
-- max_attempts array is all nulls). Returns both arrays complete, in input order. Nothing
-- is read when no value is missing; a batch of one task (the common case, and any fan-out
-- of one task) costs one probe and two array replacements; otherwise one probe per
-- distinct task that misses a value.
create or replace function shoal.task_settings_many(
  tasks text[],
  inout queues text[],
  inout max_attempts integer[],
  fallback_queue text default 'default'
)
language plpgsql stable as $$
declare
  n integer := coalesce(cardinality(tasks), 0);
  one record;
  known jsonb;
begin
  if n = 0 or (array_position(queues, null) is null and max_attempts is not null
               and array_position(max_attempts, null) is null) then
    return;
  end if;
  if cardinality(array_remove(tasks, tasks[1])) = 0 then
    select s.queue, s.max_attempts into one
    from shoal.task_settings(tasks[1], null, null, fallback_queue) s;
    queues := array_replace(queues, null, one.queue);
    max_attempts := coalesce(array_replace(max_attempts, null, one.max_attempts),
                             array_fill(one.max_attempts, array[n]));
    return;
  end if;
  -- The known tasks as one {name: [queue, max_attempts]} object, then a lookup in it per
  -- job: no join, whose plan (estimated on arrays of unknown size) could turn quadratic.
  -- LIMIT keeps the lateral a subquery: one index probe per distinct task, never a scan of
  -- the catalog.
  select jsonb_object_agg(w.t, jsonb_build_array(c.queue, c.max_attempts)) into known
  from (select distinct v.t from unnest(tasks, queues, max_attempts) as v(t, q, m)
        where v.q is null or v.m is null) w
  cross join lateral (select k.queue, k.max_attempts from shoal.tasks k
                      where k.name = w.t limit 1) c;
  select array_agg(coalesce(u.q, known->u.t->>0, fallback_queue) order by u.ord),
         array_agg(coalesce(u.m, (known->u.t->>1)::integer, 25) order by u.ord)
  into queues, max_attempts
  from unnest(tasks, queues, max_attempts) with ordinality as u(t, q, m, ord);
end
$$;

-- One job. Returns its id and inserted = true, or, when a job holding the same dedupe key
-- is pending or running on the queue, that job's id and inserted = false. A null queue or
-- max_attempts follows the catalog rule; other nulls take the column defaults. notify wakes
-- consumers (shoal.notify_jobs, delivered at commit).
--
-- A job without a dedupe key is inserted by a plain INSERT: ON CONFLICT makes every row a
-- speculative insertion (one more WAL record each), so only keyed jobs pay for it.
drop function if exists shoal.insert_job(text, text, jsonb, timestamptz, integer, text, integer,
                                         text, boolean, bigint, bigint, integer);
-- Revision 7 added traceparent (issue 16): the signature before it goes, so that calls
-- naming fewer arguments are not ambiguous between the two.
drop function if exists shoal.insert_job(text, text, jsonb, timestamptz, integer, text, integer,
                                         text, boolean, bigint, bigint, integer, text);
create or replace function shoal.insert_job(
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
  concurrency_key text default null,
  traceparent text default null,
  out id bigint,
  out inserted boolean
)
language plpgsql volatile as $$
#variable_conflict use_column
declare
  p integer := coalesce(insert_job.priority, 0);
  fk text := coalesce(insert_job.fairness_key, '');
  problem text[] := shoal.payload_error(1, insert_job.payload);
  q text := insert_job.queue;
  m integer := insert_job.max_attempts;
  new_id bigint;
  new_seq bigint;
begin
  if problem is not null then
    raise exception using errcode = problem[1], message = problem[2];
  end if;
  if q is null or m is null then
    select s.queue, s.max_attempts into q, m from shoal.task_settings(insert_job.task, q, m) s;
  end if;
  if insert_job.key is null then
    insert into shoal.jobs as j (queue, task, payload, run_at, priority, fairness_key, fair_seq,
                                 max_attempts, execution_id, barrier_id, child_index,
                                 concurrency_key, traceparent)
    values (q, insert_job.task, insert_job.payload,
            coalesce(insert_job.run_at, now()), p, fk,
            shoal.fair_seq_next(q, fk, p),
            m, insert_job.execution_id,
            insert_job.barrier_id, insert_job.child_index, insert_job.concurrency_key,
            insert_job.traceparent)
    returning j.id, j.fair_seq into new_id, new_seq;
    inserted := true;
  else
    -- Each statement here sees rows committed since the last one: when the insert meets a
    -- key whose holder then finishes before the lookup, insert again.
    loop
      insert into shoal.jobs as j (queue, task, payload, run_at, priority, fairness_key,
                                   fair_seq, max_attempts, key, execution_id, barrier_id,
                                   child_index, concurrency_key, traceparent)
      values (q, insert_job.task, insert_job.payload,
              coalesce(insert_job.run_at, now()), p, fk,
              shoal.fair_seq_next(q, fk, p),
              m, insert_job.key, insert_job.execution_id,
              insert_job.barrier_id, insert_job.child_index, insert_job.concurrency_key,
              insert_job.traceparent)
      on conflict (queue, key) where key is not null do nothing
      returning j.id, j.fair_seq into new_id, new_seq;
      if found then
        inserted := true;
        exit;
      end if;
      select j.id into new_id from shoal.jobs j
      where j.queue = q and j.key = insert_job.key;
      if found then
        inserted := false;
        exit;
      end if;
    end loop;
  end if;
  id := new_id;
  if insert_job.notify then
    -- Ranked when a job was inserted (a held key's job is not new: no rank to announce).
    perform shoal.notify_jobs(array[q], array[insert_job.run_at], array[p], array[new_seq]);
  end if;
end
$$;

-- Many jobs: element i of every array is job i (arrays left null mean all nulls: the
-- column defaults; null queues and max_attempts follow the catalog rule, resolved before
-- anything else). Returns one row per job in input order, as shoal.insert_job would
-- for each; ids are drawn in input order. A job whose dedupe key is held (by an older
-- job or an earlier element of the same call) returns the holder's id. notify wakes
-- consumers (shoal.notify_jobs). The insert behind every enqueue path and fan-out children.
drop function if exists shoal.insert_jobs(text[], text[], jsonb[], timestamptz[], integer[],
                                          text[], integer[], text[], boolean, bigint[],
                                          bigint[], integer[]);
drop function if exists shoal.insert_jobs(text[], text[], jsonb[], timestamptz[], integer[],
                                          text[], integer[], text[], boolean, bigint[],
                                          bigint[], integer[], text[]);
create or replace function shoal.insert_jobs(
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
  child_indexes integer[] default null,
  concurrency_keys text[] default null,
  traceparents text[] default null
) returns table (ord bigint, id bigint, inserted boolean)
language plpgsql volatile as $$
#variable_conflict use_column
declare
  n integer := coalesce(cardinality(queues), 0);
  seq regclass := pg_get_serial_sequence('shoal.jobs', 'id')::regclass;
  problem text[];
  ids bigint[];
  -- Each job's priority and stamp, in input order, for the wake.
  ranks_p integer[];
  ranks_s bigint[];
  missed bigint[];
  held boolean[];
  o bigint;
  -- The single group's place (shoal.fair_place).
  place record;
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
     or coalesce(cardinality(child_indexes), n) <> n
     or coalesce(cardinality(concurrency_keys), n) <> n
     or coalesce(cardinality(traceparents), n) <> n then
    raise exception 'Cannot enqueue: every column array must hold one element per job'
      using errcode = '22023';
  end if;

  select x.problem into problem
  from (select shoal.payload_error(u.ord, u.p) as problem
        from unnest(payloads) with ordinality as u(p, ord)) x
  where x.problem is not null
  limit 1;
  if problem is not null then
    raise exception using errcode = problem[1], message = problem[2];
  end if;

  if array_position(queues, null) is not null or insert_jobs.max_attempts is null
     or array_position(insert_jobs.max_attempts, null) is not null then
    select s.queues, s.max_attempts into insert_jobs.queues, insert_jobs.max_attempts
    from shoal.task_settings_many(insert_jobs.tasks, insert_jobs.queues,
                                  insert_jobs.max_attempts) s;
  end if;

  -- The common batch: no dedupe keys and one (queue, fairness key, priority) group. The
  -- rows go straight from the arrays, stamped by their position, with ids from the column
  -- default drawn in input order; no grouping, sorting or conflict handling to pay for.
  if (keys is null or cardinality(array_remove(keys, null)) = 0)
     and cardinality(array_remove(queues, queues[1])) = 0
     and (fairness_keys is null or cardinality(array_remove(fairness_keys, fairness_keys[1])) = 0)
     and (priorities is null or cardinality(array_remove(priorities, priorities[1])) = 0) then
    select * into place from shoal.fair_place(queues[1], coalesce(fairness_keys[1], ''),
                                              coalesce(priorities[1], 0));
    with ins as (
      insert into shoal.jobs as j (queue, task, payload, run_at, priority, fairness_key,
                                   fair_seq, max_attempts, execution_id, barrier_id,
                                   child_index, concurrency_key, traceparent)
      select u.queue, u.task, u.payload, coalesce(u.run_at, now()), coalesce(u.priority, 0),
             coalesce(u.fairness_key, ''),
             shoal.fair_stamp(place.base, place.used, place.weight, u.ord),
             coalesce(u.max_attempts, 25),
             u.execution_id, u.barrier_id, u.child_index, u.concurrency_key, u.traceparent
      from unnest(queues, tasks, payloads, run_ats, priorities, fairness_keys,
                  insert_jobs.max_attempts, execution_ids, barrier_ids, child_indexes,
                  concurrency_keys, traceparents)
        with ordinality as u(queue, task, payload, run_at, priority, fairness_key,
                             max_attempts, execution_id, barrier_id, child_index,
                             concurrency_key, traceparent, ord)
      returning j.id, j.fair_seq
    )
    select array_agg(ins.id order by ins.id), array_agg(ins.fair_seq order by ins.id)
    into ids, ranks_s from ins;
    ranks_p := array_fill(coalesce(priorities[1], 0), array[n]);
  else
    with input as materialized (
      -- Ids are drawn here, in input order (stamping below sorts by group).
      select u.ord, nextval(seq) as new_id, u.queue, u.task, u.payload,
             coalesce(u.run_at, now()) as run_at, coalesce(u.priority, 0) as priority,
             coalesce(u.fairness_key, '') as fairness_key,
             coalesce(u.max_attempts, 25) as max_attempts, u.key, u.execution_id, u.barrier_id,
             u.child_index, u.concurrency_key, u.traceparent
      from unnest(queues, tasks, payloads, run_ats, priorities, fairness_keys,
                  insert_jobs.max_attempts, keys, execution_ids, barrier_ids, child_indexes,
                  concurrency_keys, traceparents)
        with ordinality as u(queue, task, payload, run_at, priority, fairness_key, max_attempts,
                             key, execution_id, barrier_id, child_index, concurrency_key,
                             traceparent, ord)
    ),
    groups as materialized (
      -- One place per (queue, fairness key, priority).
      select g.queue, g.fairness_key, g.priority, p.base, p.used, p.weight
      from (select distinct i.queue, i.fairness_key, i.priority from input i) g
      cross join lateral shoal.fair_place(g.queue, g.fairness_key, g.priority) p
    ),
    stamped as materialized (
      select i.*, shoal.fair_stamp(g.base, g.used, g.weight, row_number() over (
               partition by i.queue, i.fairness_key, i.priority order by i.ord)) as fair_seq
      from input i
      join groups g on g.queue = i.queue and g.fairness_key = i.fairness_key
        and g.priority = i.priority
    ),
    plain as (
      insert into shoal.jobs (id, queue, task, payload, run_at, priority, fairness_key, fair_seq,
                              max_attempts, execution_id, barrier_id, child_index,
                              concurrency_key, traceparent)
      select s.new_id, s.queue, s.task, s.payload, s.run_at, s.priority, s.fairness_key,
             s.fair_seq, s.max_attempts, s.execution_id, s.barrier_id, s.child_index,
             s.concurrency_key, s.traceparent
      from stamped s where s.key is null order by s.ord
    ),
    keyed as (
      insert into shoal.jobs as j (id, queue, task, payload, run_at, priority, fairness_key,
                                   fair_seq, max_attempts, key, execution_id, barrier_id,
                                   child_index, concurrency_key, traceparent)
      select s.new_id, s.queue, s.task, s.payload, s.run_at, s.priority, s.fairness_key,
             s.fair_seq, s.max_attempts, s.key, s.execution_id, s.barrier_id, s.child_index,
             s.concurrency_key, s.traceparent
      from stamped s where s.key is not null order by s.ord
      on conflict (queue, key) where key is not null do nothing
      returning j.id
    )
    select array_agg(s.new_id order by s.ord),
           array_agg(s.ord order by s.ord) filter (
             where s.key is not null and s.new_id not in (select k.id from keyed k)),
           array_agg(s.priority order by s.ord), array_agg(s.fair_seq order by s.ord)
    into ids, missed, ranks_p, ranks_s
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
                              execution_ids[o], barrier_ids[o], child_indexes[o],
                              concurrency_keys[o], traceparents[o]) r;
        ids[o] := one.id;
        held[o] := not one.inserted;
      end loop;
    end if;
  end if;

  if insert_jobs.notify then
    -- A job that met a held key ranks where it would have (a harmless hint: no new job).
    perform shoal.notify_jobs(queues, run_ats, ranks_p, ranks_s);
  end if;

  return query
    select u.ord, u.id, not coalesce(held[u.ord], false)
    from unnest(ids) with ordinality as u(id, ord);
end
$$;

-- Enqueue many jobs from one jsonb document: the body behind shoal.enqueue_many and shoal's
-- own functions (start_execution). jobs is a JSON array of objects with the keys queue, task,
-- payload, run_at, priority, fairness_key, max_attempts, key, concurrency_key, traceparent
-- (only task is required; queue
-- and max_attempts follow the catalog rule) and, from shoal's own functions only, workflow membership (execution_id,
-- barrier_id, child_index). Every element is checked before anything is inserted, so one
-- bad element rejects the whole batch with a message that names it; then the columns go to
-- insert_jobs. Returns one row per element, in input order.
create or replace function shoal.enqueue_jobs(jobs jsonb, notify boolean default true)
returns table (ord bigint, id bigint, inserted boolean)
language plpgsql volatile as $$
declare
  problem text[];
  cols record;
  traced boolean;
begin
  if jsonb_typeof(jobs) is distinct from 'array' then
    raise exception 'Cannot enqueue: jobs must be a JSON array' using errcode = '22023';
  end if;
  -- Whether any element has a traceparent key: one scan of the document in C, so that a
  -- batch without one (most) has no traceparent check per element and no array of nulls.
  traced := jobs @? '$[*].traceparent';

  -- queue and task count only as JSON strings (a number is not a name); a queue that is
  -- missing or JSON null is the task's (the catalog rule).
  select x.problem into problem
  from (
    select case
             when jsonb_typeof(e.j) <> 'object' then
               array['22023',
                     format('Cannot enqueue job %s: each job must be a JSON object', e.ord)]
             else coalesce(shoal.job_error(
               e.ord,
               case when coalesce(jsonb_typeof(e.j->'queue'), 'null') in ('string', 'null')
                    then e.j->>'queue' else '' end,
               case when jsonb_typeof(e.j->'task') = 'string' then e.j->>'task' end,
               e.j->'payload', (e.j->>'priority')::numeric, e.j->>'fairness_key',
               (e.j->>'max_attempts')::numeric, e.j->>'key', e.j->>'concurrency_key'),
               -- A traceparent is checked only in a batch that has one, and only where
               -- one is given (a JSON null is none).
               case when not traced then null
                    when jsonb_typeof(e.j->'traceparent') not in ('string', 'null') then
                      array['22023', format('Cannot enqueue job %s: traceparent must be a string',
                                            e.ord)]
                    else shoal.traceparent_error(format('Cannot enqueue job %s', e.ord),
                                                 e.j->>'traceparent') end)
           end as problem
    from jsonb_array_elements(jobs) with ordinality as e(j, ord)
  ) x
  where x.problem is not null
  limit 1;
  if problem is not null then
    raise exception using errcode = problem[1], message = problem[2];
  end if;

  select array_agg(e.j->>'queue' order by e.ord) as queues,
         array_agg(e.j->>'task' order by e.ord) as tasks,
         array_agg(coalesce(e.j->'payload', '{}'::jsonb) order by e.ord) as payloads,
         array_agg((e.j->>'run_at')::timestamptz order by e.ord) as run_ats,
         array_agg((e.j->>'priority')::integer order by e.ord) as priorities,
         array_agg(e.j->>'fairness_key' order by e.ord) as fairness_keys,
         array_agg((e.j->>'max_attempts')::integer order by e.ord) as max_attempts,
         array_agg(e.j->>'key' order by e.ord) as keys,
         array_agg(e.j->>'concurrency_key' order by e.ord) as concurrency_keys,
         array_agg(e.j->>'traceparent' order by e.ord) filter (where traced) as traceparents,
         -- Workflow membership (set by shoal's own start_execution).
         array_agg((e.j->>'execution_id')::bigint order by e.ord) as execution_ids,
         array_agg((e.j->>'barrier_id')::bigint order by e.ord) as barrier_ids,
         array_agg((e.j->>'child_index')::integer order by e.ord) as child_indexes
  into cols
  from jsonb_array_elements(jobs) with ordinality as e(j, ord);

  return query
    select r.ord, r.id, r.inserted
    from shoal.insert_jobs(cols.queues, cols.tasks, cols.payloads, cols.run_ats,
                           cols.priorities, cols.fairness_keys, cols.max_attempts, cols.keys,
                           notify, cols.execution_ids, cols.barrier_ids, cols.child_indexes,
                           cols.concurrency_keys, cols.traceparents) r;
end
$$;

-- Enqueue many jobs in one statement, for any language: shoal.enqueue_jobs without
-- workflow membership (those keys are stripped, so a caller cannot make a job arrive at
-- someone's fan-out). Returns one row per input element, in input order; an element whose
-- dedupe key is already pending or running on its queue is not inserted and returns that
-- job's id. notify wakes idle consumers.
create or replace function shoal.enqueue_many(jobs jsonb, notify boolean default true)
returns table (ord bigint, id bigint, inserted boolean)
language sql volatile as $$
  select e.ord, e.id, e.inserted from shoal.enqueue_jobs(
    case when jsonb_typeof(jobs) = 'array' then (
      select coalesce(jsonb_agg(
               case when jsonb_typeof(x.j) = 'object'
                    then x.j - 'execution_id' - 'barrier_id' - 'child_index' else x.j end
               order by x.o), '[]'::jsonb)
      from jsonb_array_elements(jobs) with ordinality as x(j, o))
    else jobs end,
    notify) as e
$$;

-- Enqueue one job: the entry point for any language. The job checks, then the same insert
-- as TypeScript's (no jsonb document to build, strip and unpack on the way). A null queue or
-- max_attempts (the defaults) follows the catalog rule; every argument may be named:
--   select shoal.enqueue('emails', 'send_welcome', '{"user": 42}', priority => 5);
--   select shoal.enqueue(null, 'send_welcome', '{"user": 42}');     -- the task's queue
--   select shoal.enqueue(task => 'send_welcome', payload => '{"user": 42}');
--   select shoal.enqueue(task => 'send_welcome', traceparent => '00-<trace id>-<span id>-01');
-- (traceparent: the W3C trace context of the producer's span, which a traced consumer links
-- the job's run to; shoal.traceparent_error says what is accepted.)
-- (queue and task default to null only so that task may be named without a queue; a job
-- without a task is refused.)
drop function if exists shoal.enqueue(text, text, jsonb, timestamptz, integer, text, text,
                                      integer, boolean);
drop function if exists shoal.enqueue(text, text, jsonb, timestamptz, integer, text, text,
                                      integer, boolean, text);
create or replace function shoal.enqueue(
  queue text default null,
  task text default null,
  payload jsonb default '{}',
  run_at timestamptz default null,
  priority integer default 0,
  key text default null,
  fairness_key text default null,
  max_attempts integer default null,
  notify boolean default true,
  concurrency_key text default null,
  traceparent text default null
) returns bigint
language plpgsql volatile as $$
#variable_conflict use_variable
declare
  -- A null payload is refused here ("not null"), not taken for a missing one.
  problem text[] := coalesce(shoal.job_error(1, queue, task, coalesce(payload, 'null'::jsonb),
                                             priority, fairness_key, max_attempts, key,
                                             concurrency_key),
                             shoal.traceparent_error('Cannot enqueue job 1', traceparent));
begin
  if problem is not null then
    raise exception using errcode = problem[1], message = problem[2];
  end if;
  return (select i.id
          from shoal.insert_job(queue, task, payload, run_at, priority, fairness_key,
                                max_attempts, key, notify,
                                concurrency_key => concurrency_key,
                                traceparent => traceparent) i);
end
$$;
