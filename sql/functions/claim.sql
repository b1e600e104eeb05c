-- shoal functions: the claim (shoal.claim_jobs), one function whose plan cannot flip.
--
-- A queue table's size swings from empty to millions of rows faster than autovacuum
-- re-analyzes it. With statistics taken while it was small, the planner would read every
-- ready row of the queue through a bitmap scan and sort them all to return one batch:
-- cheap for the 100 rows it believes are there, ruinous for the 50,000 that are. Inside
-- this function sorts and bitmap scans are off, so the claim walks jobs_claim_idx in
-- claim order and stops after the batch (and JIT, which the disabled sorts' cost would
-- trigger, is off). The settings hold for its statements only. The index's last column is
-- `id + 0` (sql/014_claim_index_id.sql: no lookup by id may walk it), so the walks here
-- order by that expression.
--
-- The steps are separate statements reaching shoal.jobs by primary key, so each plan
-- stays simple; plain jobs (no execution, attempts left) take two statements: pick and
-- lock, then update.
--
-- Probes: a consumer claims ahead of its free slots (its prefetch buffer). A job enqueued
-- after that, which ranks ahead of buffered jobs (a higher priority, or a quiet fairness
-- key's burst, see the stamping rule in queue.sql), would otherwise wait behind the whole
-- buffer. On a NOTIFY the consumer probes: with the two bounds given, the claim takes only
-- jobs ranking no later than its last buffered job, and those start first. Each job's
-- fair_seq is returned so the consumer can tell where it ranks.
--
-- Started or prefetched: the jobs beyond the caller's free slots wait in its prefetch
-- buffer, claimed but not started. With _starting the caller says how many start at once
-- (the first, in claim order; null: all): the claim records those as started (started_at,
-- in the update it makes anyway); the caller's heartbeat records the others once they start.
--
-- Where a claim starts. The jobs at the head of jobs_claim_idx are mostly finished: an ack
-- deletes its row, and the claims that walk past the entry mark it dead. While another
-- session holds a snapshot open (a long transaction, an idle-in-transaction session, a
-- replica's hot_standby_feedback) they cannot: every walk from the head fetched the heap
-- row of every job acked since the snapshot began, so each claim cost more than the last
-- (at 20,000 acks, 5,187 buffers and 6.9 ms for a claim of 10, against 24 and 0.05 ms).
-- So the consumer's claims (_from_head false) start a little before where claiming has got
-- to: per queue and priority, shoal.queue_heads records the greatest stamp claimed (written
-- here, at most every 100 ms per row) and the one before it, and the claim walks from
-- head_lead stamps before the one before. Every new job is stamped at or above the head it
-- read minus fair_burst() (the stamping rule in queue.sql): a job whose transaction read
-- the head just before a rewrite, and committed after, still lies above the bound. Only
-- jobs whose transaction stayed open across two rewrites (100 ms or more) may lie below.
-- A priority no claim has recorded yet is walked whole: none of its jobs was ever claimed,
-- so none finished. While a snapshot is held a claim walks at most the entries of the jobs
-- claimed in the last 200 ms or so, plus head_lead stamps' worth.
-- What such a claim cannot see: a job ranking before that point and visible again (a
-- retry or a delayed job due, a job whose claim expired, one stamped in a transaction that
-- committed long after). The consumer claims from the head (_from_head true, the default)
-- when it starts, when an announced delayed job or retry falls due, and at least every
-- second otherwise, cancelled after 2 s (lib/head_scan.ts).
--
-- Flow control (sql/functions/flow.sql). A paused queue is left out of the claim. In a
-- queue under flow control (a concurrency limit, a rate limit, a hold), a job counts in a
-- bucket: its flow key, and its task when the task has limits of its own (THE TASK RULE);
-- "key" below is a bucket. Each key met is
-- locked (shoal.flow_lock) and what it may take counted (shoal.flow_allow: free slots,
-- tokens); the jobs that fit, in claim order, are locked SKIP LOCKED (one another claim
-- took meanwhile is left) and those of a key under a concurrency limit are named, with
-- their new tokens, in one slot row per key. While no key of the queue has jobs waiting
-- (flow_keys.waiting, kept by shoal.flow_claimed) the usual walk picks, and its picks are
-- checked as one window: a limit that does not bind costs that check (the keys' bounds
-- read, one slot row and one bound written per key). Once a key has jobs waiting, they lie behind where claiming has got
-- to, where a claim from near the heads would not look: the queue's jobs are read in claim
-- order, unlocked, a window at a time from its head. A key's jobs beyond what it may take
-- are skipped, not held up behind: the next window looks past them, growing fourfold, or,
-- when nothing in a window fit, starts below its lowest priority, until the batch is full
-- or flow_scan jobs were read (the bound of a claim's work when every key is full: no busy
-- loop). Probes find nothing while keys wait.
--
-- It follows the lock order stated at the top of workflow.sql (jobs are taken SKIP LOCKED).
--
-- The signatures before _starting and _from_head existed are dropped: beside this one, a
-- call with six or seven arguments would match both. Callers that pass fewer still reach
-- this one.
drop function if exists shoal.claim_jobs(text[], integer, text, integer, integer, bigint);
drop function if exists shoal.claim_jobs(text[], integer, text, integer, integer, bigint, integer);
create or replace function shoal.claim_jobs(_queues text[], _limit integer, _worker text,
                                 _visibility_ms integer,
                                 _before_priority integer default null,
                                 _before_fair_seq bigint default null,
                                 _starting integer default null,
                                 _from_head boolean default true)
returns table (id bigint, queue text, task text, payload jsonb, priority integer,
               fairness_key text, fair_seq bigint, attempts integer, max_attempts integer, token bigint,
               key text, execution_id bigint, created_at timestamptz, deadline timestamptz,
               poisoned boolean)
language plpgsql volatile
set enable_sort = off
set enable_bitmapscan = off
-- A disabled sort the planner cannot avoid costs 1e10, which would trigger JIT
-- compilation (hundreds of milliseconds) on every call.
set jit = off
-- Plan each statement once per session: the plans do not depend on the values, and
-- planning three statements on every call tripled the cost of claiming one job.
set plan_cache_mode = force_generic_plan
-- No sequential scans: a plan made once per session must not depend on the table's size
-- when it was made. A consumer that started on a near-empty table planned the update of
-- the picked rows as a scan of the whole table (cheapest for one page) and kept that plan
-- as the table grew: each claim of 250 then read 160,000 rows (200 ms) until the first
-- autovacuum's ANALYZE replaced the plan, and W9's consumer fell from 30,000 to 150 jobs/s
-- (auto_explain on the bench's server). Every statement here reaches its rows by an index.
set enable_seqscan = off
as $$
#variable_conflict use_column
declare
  -- How far before a recorded head the walk starts (stamps): fair_burst(), and room for a
  -- session whose shoal.fair_burst is set higher than this one's ("Where a claim starts").
  head_lead constant bigint := shoal.fair_burst() + 1000;
  picked bigint[] := '{}';
  -- Where each picked row is, locked by this transaction until it commits: the update
  -- below reaches them by a TID scan, which no statistics can turn into an index walk.
  picked_ctids tid[] := '{}';
  -- Queue, priority and stamp of each picked job, for shoal.queue_heads.
  --
  -- Only `picked` is kept in claim order (its first _starting jobs start at once). The
  -- other arrays are read as sets (the update reaches the rows by TID; the heads take the
  -- greatest and least stamp per queue and priority), so their aggregates take no ORDER BY:
  -- before Postgres 16 each ordered aggregate sorts its input apart, and four more sorts
  -- per band statement were about 30 µs of a 480 µs claim of one job (one job enqueued,
  -- claimed and deleted at a time, 1,500 times, on a throwaway cluster).
  picked_queues text[] := '{}';
  picked_priorities integer[] := '{}';
  picked_seqs bigint[] := '{}';
  -- The flow key and task of each job picked by the usual walk (aligned with picked_queues).
  picked_keys text[] := '{}';
  picked_tasks text[] := '{}';
  -- What the claim from near the heads read of shoal.queue_heads: how many rows its queues
  -- have at the recorded priorities, and when the stalest was written. With every row
  -- there and none due for a rewrite, and nothing picked at an unrecorded priority, the
  -- rewrite below would change nothing and is skipped: a statement less on most claims
  -- (a claim of one job took 474–516 µs against 357–378 before the heads existed).
  heads_known bigint;
  heads_oldest timestamptz;
  from_gap boolean := false;
  got record;
  in_workflow boolean := false;
  spent boolean := false;
  levels integer[];
  lvl integer;
  above integer;
  below integer;
  upto bigint;
  ended bigint[];
  dead_ids bigint[];
  all_start boolean;
  starting bigint[];
  -- Flow control: whether a claimed queue has a concurrency limit; the keys met with a
  -- limit ("queue\nkey") and their slots left for this claim; every key checked; the
  -- window's offset and size; the candidates and the jobs of one window that fit.
  limited boolean;
  -- Whether a claimed queue has a rate limit (limited then too).
  rated boolean;
  -- The tasks with limits of their own on the claimed queues, 'queue\ntask' each: their jobs
  -- count in buckets of their own (THE TASK RULE in flow.sql, shoal.bucket_task). Read after
  -- the first statement took the rules locks (null until then). A bucket's tag below is
  -- 'queue\ntask\nkey' (task '' for the queue's own buckets).
  scoped_tasks text[];
  windowed boolean := false;
  flow_scan constant integer := greatest(_limit * 16, 2000);
  key_tags text[] := '{}';
  key_queues text[] := '{}';
  key_keys text[] := '{}';
  key_tasks text[] := '{}';
  key_allowed integer[] := '{}';
  key_taken integer[] := '{}';
  key_tokens double precision[] := '{}';
  key_held integer[] := '{}';
  key_waiting boolean[] := '{}';
  -- Each key's bound on its slots (shoal.flow_allow; null: none kept), whether it is under a
  -- concurrency limit (its claimed jobs take slots) and whether this claim holds its lock;
  -- the keys whose claimed jobs get a slot row.
  key_bounds integer[] := '{}';
  key_slotted boolean[] := '{}';
  key_locked boolean[] := '{}';
  slot_tags text[] := '{}';
  -- Whether the usual walk's picks stood with no more than their keys' bounds read.
  fast boolean := false;
  -- The claimed queues under flow control, and whether each had simple rules (THE SIMPLE
  -- RULES in flow.sql) by the first statement: the check then reads shoal.flow_rules, which
  -- it reads again to be sure (that statement's snapshot may be older than the rules lock).
  ruled text[];
  simple boolean;
  -- The keys of the picks with no flow_keys row (the short check counts them) and their picks.
  fresh_queues text[];
  fresh_keys text[];
  fresh_counts integer[];
  -- The keys whose count is due (their bound grew by 10,000 since the last: THE BOUND), in
  -- claim order of the arrays: counted after this claim's slot rows are written, under the
  -- locks the claim holds, so the count is not the long way's.
  due_queues text[];
  due_keys text[];
  due_tasks text[];
  due_limits integer[];
  checked_tags text[] := '{}';
  scan_from integer := 0;
  scan_size integer;
  scan_read integer := 0;
  band_top integer := 32767;
  -- The windowed walk's first look: every key of the queues (up to flow_keys_max), each
  -- key's first jobs it may take.
  flow_keys_max constant integer := 1000;
  per_key_done boolean := false;
  disc record;
  disc_n bigint := 0;
  per_key_fetch boolean := false;
  -- The keys the next step meets: a window's, or every key of the first look.
  meet_queues text[];
  meet_keys text[];
  meet_tasks text[];
  cand record;
  fit record;
begin
  -- Flow control: paused queues are left out; is any other limited? In a limited queue, keys
  -- with jobs waiting for a slot (or a token, or a hold's end) keep those jobs behind where
  -- claiming has got to: walk from the head, in windows (windowed). Otherwise the usual
  -- walk, whose picks are then checked. A probe finds nothing while keys wait. (One
  -- statement: `and` reads the waiting keys of limited queues only; offset 0 keeps the
  -- subquery whole, so each queue's flow control is looked up once.)
  select coalesce(array_agg(q.name), '{}'),
         coalesce(bool_or(q.limited or q.rated), false),
         coalesce(bool_or(q.rated), false),
         coalesce(bool_or((q.limited or q.rated)
                          and exists (select 1 from shoal.flow_keys k
                                      where k.queue = q.name and k.waiting)), false),
         coalesce(array_agg(q.name) filter (where q.limited or q.rated), '{}'),
         -- (Read for the limited queues only: a FILTER skips its aggregate's argument.)
         coalesce(bool_and(exists (select 1 from shoal.flow_rules r
                                   where r.queue = q.name and r.simple_max is not null))
                    filter (where q.limited or q.rated), false)
  into _queues, limited, rated, windowed, ruled, simple
  from (
    select q.name,
           exists (select 1 from shoal.concurrency_limits l where l.queue = q.name)
           or exists (select 1 from shoal.flow_keys k
                      where k.queue = q.name and k.held_until > now()) as limited,
           exists (select 1 from shoal.rate_limits l where l.queue = q.name) as rated
    from unnest(_queues) as q(name)
    where not exists (select 1 from shoal.queue_pauses p where p.queue = q.name)
    offset 0
  ) q
  -- THE RULES LOCK (flow.sql): a limited queue is claimed under its rules lock, shared, read
  -- in later statements; refused (its limits are changing), it is left out of this claim.
  where not (q.limited or q.rated) or shoal.flow_rules_shared(q.name);
  if cardinality(_queues) = 0 then
    return;
  end if;
  if windowed and _before_priority is not null then
    return;
  end if;

  if windowed then
    -- The windowed walk below.
    null;
  elsif _from_head and _before_priority is null then
    -- Priority first, then fair across fairness keys, then oldest. A queue listed twice is
    -- the caller's to avoid (it would pick the same rows twice).
    select array_agg(c.id order by c.priority desc, c.fair_seq, c.id) as ids,
           array_agg(c.ctid) as ctids,
           array_agg(c.queue) as queues,
           array_agg(c.priority) as priorities,
           array_agg(c.fair_seq) as seqs,
           array_agg(c.flow_key) as keys,
           array_agg(c.task) as tasks,
           bool_or(c.execution_id is not null) as in_workflow,
           bool_or(c.attempts >= c.max_attempts) as spent
    into got
    from (
      select c.* from unnest(_queues) as q(name)
      cross join lateral (
        select j.id, j.ctid, j.queue, j.priority, j.fair_seq, j.execution_id, j.attempts,
               j.max_attempts, coalesce(j.concurrency_key, j.fairness_key) as flow_key, j.task
        from shoal.jobs j
        where j.queue = q.name and j.run_at <= now()
        order by j.priority desc, j.fair_seq, j.id + 0
        limit _limit
        for update skip locked
      ) c
      order by c.priority desc, c.fair_seq, c.id
      limit _limit
    ) c;
    picked := got.ids;
    picked_ctids := got.ctids;
    picked_queues := got.queues;
    picked_priorities := got.priorities;
    picked_seqs := got.seqs;
    picked_keys := got.keys;
    picked_tasks := got.tasks;
    in_workflow := got.in_workflow;
    spent := got.spent;
  elsif _from_head then
    -- A probe: only jobs ranking no later than the caller's last buffered job (a higher
    -- priority, or a fairness key's burst stamped ahead of the queue's head). Both bounds
    -- are ranges of jobs_claim_idx, so a probe that finds nothing reads little.
    select array_agg(c.id order by c.priority desc, c.fair_seq, c.id) as ids,
           array_agg(c.ctid) as ctids,
           array_agg(c.queue) as queues,
           array_agg(c.priority) as priorities,
           array_agg(c.fair_seq) as seqs,
           array_agg(c.flow_key) as keys,
           array_agg(c.task) as tasks,
           bool_or(c.execution_id is not null) as in_workflow,
           bool_or(c.attempts >= c.max_attempts) as spent
    into got
    from (
      select c.* from (
        select h.* from unnest(_queues) as q(name)
        cross join lateral (
          select j.id, j.ctid, j.queue, j.priority, j.fair_seq, j.execution_id, j.attempts,
                 j.max_attempts, coalesce(j.concurrency_key, j.fairness_key) as flow_key, j.task
          from shoal.jobs j
          where j.queue = q.name and j.priority > _before_priority and j.run_at <= now()
          order by j.priority desc, j.fair_seq, j.id + 0
          limit _limit
          for update skip locked
        ) h
        union all
        select e.* from unnest(_queues) as q(name)
        cross join lateral (
          select j.id, j.ctid, j.queue, j.priority, j.fair_seq, j.execution_id, j.attempts,
                 j.max_attempts, coalesce(j.concurrency_key, j.fairness_key) as flow_key, j.task
          from shoal.jobs j
          where j.queue = q.name and j.priority = _before_priority
            and j.fair_seq <= _before_fair_seq and j.run_at <= now()
          order by j.priority desc, j.fair_seq, j.id + 0
          limit _limit
          for update skip locked
        ) e
      ) c
      order by c.priority desc, c.fair_seq, c.id
      limit _limit
    ) c;
    picked := got.ids;
    picked_ctids := got.ctids;
    picked_queues := got.queues;
    picked_priorities := got.priorities;
    picked_seqs := got.seqs;
    picked_keys := got.keys;
    picked_tasks := got.tasks;
    in_workflow := got.in_workflow;
    spent := got.spent;
  else
    -- From near the heads ("Where a claim starts"), in claim order: band by band, each
    -- priority with a recorded head from HEAD_LEAD before it, and each stretch of
    -- priorities between recorded ones whole (none of their jobs was ever claimed), until
    -- the batch is full. A probe stops at its bound.
    select array_agg(distinct h.priority order by h.priority desc), count(*), min(h.updated_at)
    into levels, heads_known, heads_oldest
    from shoal.queue_heads h where h.queue = any(_queues);
    above := 32768;
    for i in 1 .. coalesce(cardinality(levels), 0) + 1 loop
      lvl := levels[i];
      -- The priorities strictly between the next recorded one and `above`.
      below := greatest(coalesce(lvl, -32769), coalesce(_before_priority, -32769));
      if above - below > 1 then
        select array_agg(c.id order by c.priority desc, c.fair_seq, c.id) as ids,
               array_agg(c.ctid) as ctids,
               array_agg(c.queue) as queues,
               array_agg(c.priority) as priorities,
               array_agg(c.fair_seq) as seqs,
               array_agg(c.flow_key) as keys,
               array_agg(c.task) as tasks,
               bool_or(c.execution_id is not null) as in_workflow,
               bool_or(c.attempts >= c.max_attempts) as spent
        into got
        from (
          select c.* from unnest(_queues) as q(name)
          cross join lateral (
            select j.id, j.ctid, j.queue, j.priority, j.fair_seq, j.execution_id, j.attempts,
                   j.max_attempts, coalesce(j.concurrency_key, j.fairness_key) as flow_key, j.task
            from shoal.jobs j
            where j.queue = q.name and j.priority < above and j.priority > below
              and j.run_at <= now()
            order by j.priority desc, j.fair_seq, j.id + 0
            limit _limit - cardinality(picked)
            for update skip locked
          ) c
          order by c.priority desc, c.fair_seq, c.id
          limit _limit - cardinality(picked)
        ) c;
        if got.ids is not null then
          picked := picked || got.ids;
          picked_ctids := picked_ctids || got.ctids;
          picked_queues := picked_queues || got.queues;
          picked_priorities := picked_priorities || got.priorities;
          picked_seqs := picked_seqs || got.seqs;
          picked_keys := picked_keys || got.keys;
          picked_tasks := picked_tasks || got.tasks;
          in_workflow := in_workflow or got.in_workflow;
          spent := spent or got.spent;
          from_gap := true;
        end if;
      end if;
      exit when lvl is null or cardinality(picked) >= _limit
        or lvl < coalesce(_before_priority, -32769);
      upto := case when lvl = _before_priority then _before_fair_seq
                   else 9223372036854775807 end;
      select array_agg(c.id order by c.fair_seq, c.id) as ids,
             array_agg(c.ctid) as ctids,
             array_agg(c.queue) as queues,
             array_agg(c.fair_seq) as seqs,
             array_agg(c.flow_key) as keys,
             array_agg(c.task) as tasks,
             bool_or(c.execution_id is not null) as in_workflow,
             bool_or(c.attempts >= c.max_attempts) as spent
      into got
      from (
        select c.* from unnest(_queues) as q(name)
        left join shoal.queue_heads h on h.queue = q.name and h.priority = lvl
        cross join lateral (
          select j.id, j.ctid, j.queue, j.fair_seq, j.execution_id, j.attempts, j.max_attempts,
                 coalesce(j.concurrency_key, j.fairness_key) as flow_key, j.task
          from shoal.jobs j
          where j.queue = q.name and j.priority = lvl
            and j.fair_seq >= coalesce(h.previous - head_lead, -9223372036854775808)
            and j.fair_seq <= upto and j.run_at <= now()
          order by j.priority desc, j.fair_seq, j.id + 0
          limit _limit - cardinality(picked)
          for update skip locked
        ) c
        order by c.fair_seq, c.id
        limit _limit - cardinality(picked)
      ) c;
      if got.ids is not null then
        picked := picked || got.ids;
          picked_ctids := picked_ctids || got.ctids;
        picked_queues := picked_queues || got.queues;
        picked_priorities := picked_priorities || array_fill(lvl, array[cardinality(got.ids)]);
        picked_seqs := picked_seqs || got.seqs;
        picked_keys := picked_keys || got.keys;
        picked_tasks := picked_tasks || got.tasks;
        in_workflow := in_workflow or got.in_workflow;
        spent := spent or got.spent;
      end if;
      exit when cardinality(picked) >= _limit;
      above := lvl;
    end loop;
  end if;
  if limited then
    if not windowed then
      -- The usual walk's picks, checked as one window (already locked: the lock below takes
      -- them again). What does not fit stays locked, unclaimed, until this claim commits.
      -- Their keys first (picked_keys: a multiset, not in claim order); the picks in claim
      -- order only when some key may not take all of its.
      if picked is null or cardinality(picked) = 0 then
        return;
      end if;
      meet_queues := picked_queues;
      meet_keys := picked_keys;
      if simple then
        -- THE SIMPLE RULES: the same check, with the queues' rules read from one row each
        -- (a job's bucket is (queue, key, ''), its limit the queue's default). Rules that
        -- are no longer simple (changed after the first statement read them) send the claim
        -- the long way, which reads the limits themselves. A key with no flow_keys row yet
        -- (met for the first time, or forgotten) is locked here and counted below.
        with fr as (
          select coalesce(array_agg(r.queue), '{}') as queues,
                 coalesce(array_agg(r.simple_max), '{}') as maxes,
                 count(r.simple_max) = cardinality(ruled) as simple
          from shoal.flow_rules r where r.queue = any(ruled)
        ),
        k as (
          select u.queue, u.key, count(*)::integer as n
          from unnest(picked_queues, picked_keys) as u(queue, key)
          group by u.queue, u.key
        ),
        -- (Each key's limit found in the rules' arrays: a join would add a plan node or
        -- two, started on every claim.)
        c as (
          select k.queue, k.key, k.n, fr.simple,
                 fr.maxes[array_position(fr.queues, k.queue)] as max_running,
                 f.queue is null as fresh, f.slots_bound, f.slots_counted, f.held_until
          from k
          cross join fr
          left join shoal.flow_keys f on f.queue = k.queue and f.key = k.key and f.task = ''
        ),
        ok as (
          select coalesce(bool_and(
                   c.simple
                   and (c.held_until is null or c.held_until <= now())
                   and (c.max_running is null
                        or (coalesce(c.slots_bound, case when c.fresh then 0 end)
                            + 2 * _limit <= c.max_running))), true) as all_ok,
                 count(*) filter (where c.max_running is not null) as limited_keys
          from c
        ),
        locked as (
          select c.queue, c.key, c.n, c.max_running, c.fresh,
                 c.slots_bound - c.slots_counted >= 10000 as due
          from c, ok
          where ok.all_ok and c.max_running is not null
            and shoal.flow_lock(c.queue, c.key, '')
        ),
        raised as (
          update shoal.flow_keys f set slots_bound = f.slots_bound + l.n
          from locked l
          where f.queue = l.queue and f.key = l.key and f.task = ''
            and f.slots_bound + 2 * _limit <= l.max_running
          returning f.queue, f.key, l.due, l.max_running
        ),
        r as (
          select count(*) as n,
                 coalesce(array_agg(r.queue || E'\n\n' || r.key), '{}') as tags,
                 array_agg(r.queue) filter (where r.due) as due_queues,
                 array_agg(r.key) filter (where r.due) as due_keys,
                 array_agg(''::text) filter (where r.due) as due_tasks,
                 array_agg(r.max_running) filter (where r.due) as due_limits
          from raised r
        ),
        n as (
          select count(*) as n, array_agg(l.queue) as queues, array_agg(l.key) as keys,
                 array_agg(l.n) as counts
          from locked l where l.fresh
        )
        select ok.all_ok and r.n + n.n = ok.limited_keys, r.tags,
               case when ok.all_ok then '{}'::text[] end,
               r.due_queues, r.due_keys, r.due_tasks, r.due_limits,
               n.queues, n.keys, n.counts
        into fast, slot_tags, scoped_tasks, due_queues, due_keys, due_tasks, due_limits,
             fresh_queues, fresh_keys, fresh_counts
        from ok, r, n;
        if fast and fresh_queues is not null then
          -- The keys met for the first time, locked above: counted now (THE BOUND), by a
          -- statement whose snapshot sees every claim committed before their locks were
          -- free. A key with no slot row holds nothing: its bound is what this claim takes.
          -- One with rows (its flow_keys row was removed), or whose row another statement
          -- wrote meanwhile (a hold), goes the long way.
          with counted as (
            insert into shoal.flow_keys as f (queue, key, task, slots_bound, slots_counted)
            select u.queue, u.key, '', u.n, 0
            from unnest(fresh_queues, fresh_keys, fresh_counts) as u(queue, key, n)
            where not exists (select 1 from shoal.concurrency_slots s
                              where s.queue = u.queue and s.key = u.key and s.task = '')
            on conflict (queue, key, task) do nothing
            returning f.queue, f.key
          )
          select count(*) = cardinality(fresh_queues),
                 slot_tags || coalesce(array_agg(c.queue || E'\n\n' || c.key), '{}')
          into fast, slot_tags
          from counted c;
        end if;
      else
        -- A limit that cannot bind: every key of the picks is under no flow control, or only
        -- under a concurrency limit whose bound leaves room for two batches (THE BOUND in
        -- flow.sql), with no count due. Then the picks stand, and each such key's bound is
        -- raised by its picks under its lock (a key another claim holds, or a bound that grew
        -- meanwhile, sends the claim the long way: a raise already made only overstates the
        -- bound). One statement, where the long way takes a dozen.
        with sc as (
          select coalesce(array_agg(t.tag), '{}') as tags
          from shoal.scoped_task_tags t where t.queue = any(_queues)
        ),
        k as (
          select b.queue, b.key, b.task, count(*)::integer as n
          from (select u.queue, u.key, shoal.bucket_task(u.queue, u.task, sc.tags) as task
                from unnest(picked_queues, picked_keys, picked_tasks) as u(queue, key, task), sc) b
          group by b.queue, b.key, b.task
        ),
        c as (
          select k.queue, k.key, k.task, k.n,
                 coalesce(lk.max_running, ld.max_running) as max_running,
                 -- (`rated`: only where some claimed queue has a rate limit.)
                 rated and exists (select 1 from shoal.rate_limits r
                                   where r.queue = k.queue and r.task = k.task
                                     and (r.key = k.key or r.key is null))
                   as rated,
                 f.slots_bound, f.slots_counted, f.held_until
          from k
          left join shoal.concurrency_limits lk
            on lk.queue = k.queue and lk.task = k.task and lk.key = k.key
          left join shoal.concurrency_limits ld
            on ld.queue = k.queue and ld.task = k.task and ld.key is null
          left join shoal.flow_keys f on f.queue = k.queue and f.key = k.key and f.task = k.task
        ),
        ok as (
          select coalesce(bool_and(
                   not c.rated and (c.held_until is null or c.held_until <= now())
                   and (c.max_running is null
                        or (c.slots_bound is not null
                            and c.slots_bound + 2 * _limit <= c.max_running))), true) as all_ok,
                 count(*) filter (where c.max_running is not null) as limited_keys
          from c
        ),
        -- The keys under a concurrency limit, locked (a CTE that calls a volatile function is
        -- run as written: only these keys are locked, whatever the plan of the update).
        locked as (
          select c.queue, c.key, c.task, c.n, c.max_running,
                 c.slots_bound - c.slots_counted >= 10000 as due
          from c, ok
          where ok.all_ok and c.max_running is not null
            and shoal.flow_lock(c.queue, c.key, c.task)
        ),
        raised as (
          update shoal.flow_keys f set slots_bound = f.slots_bound + l.n
          from locked l
          where f.queue = l.queue and f.key = l.key and f.task = l.task
            and f.slots_bound + 2 * _limit <= l.max_running
          returning f.queue, f.key, f.task, l.due, l.max_running
        ),
        -- Everything read back in one aggregate (each scalar subquery is a plan node of its
        -- own, started on every claim).
        r as (
          select count(*) as n,
                 coalesce(array_agg(r.queue || E'\n' || r.task || E'\n' || r.key), '{}') as tags,
                 array_agg(r.queue) filter (where r.due) as due_queues,
                 array_agg(r.key) filter (where r.due) as due_keys,
                 array_agg(r.task) filter (where r.due) as due_tasks,
                 array_agg(r.max_running) filter (where r.due) as due_limits
          from raised r
        )
        select ok.all_ok and r.n = ok.limited_keys, r.tags, sc.tags,
               r.due_queues, r.due_keys, r.due_tasks, r.due_limits
        into fast, slot_tags, scoped_tasks, due_queues, due_keys, due_tasks, due_limits
        from ok, r, sc;
      end if;
    end if;
    if not fast then
      -- The long way counts what it must itself (shoal.flow_allow).
      due_queues := null;
      if scoped_tasks is null then
        scoped_tasks := shoal.scoped_tasks(_queues);
      end if;
      if not windowed then
        -- The picks' buckets, for the check below.
        meet_tasks := array(select shoal.bucket_task(u.queue, u.task, scoped_tasks)
                            from unnest(picked_queues, picked_tasks) with ordinality as u(queue, task, n)
                            order by u.n);
      end if;
      scan_size := greatest(_limit * 2, 64);
      loop
        -- Windowed, first: every key with jobs in the queues, found by a skip scan of the
        -- fairness index (and of the concurrency index for concurrency keys), up to
        -- flow_keys_max of them; then each key's first jobs, as many as it may take, read
        -- without locks through the same index: a key's run of jobs in the claim order costs
        -- nothing to pass, however long (a key that enqueued in one batch, or whose
        -- priority ranks above the rest).
        if windowed and not per_key_done and cardinality(scoped_tasks) > 0 then
          -- A key's jobs of several buckets (tasks with limits of their own): the windows.
          per_key_done := true;
          scan_from := 0;
          continue;
        elsif windowed and not per_key_done then
          per_key_done := true;
          select array_agg(d.queue) as queues, array_agg(d.key) as keys,
                 array_agg(d.kind) as kinds, count(*) as n
          into disc
          from (
            select q.name as queue, k.key, 'f' as kind from unnest(_queues) as q(name)
            cross join lateral (
              with recursive r(key) as (
                (select j.fairness_key from shoal.jobs j where j.queue = q.name
                 order by j.fairness_key limit 1)
                union all
                select (select j.fairness_key from shoal.jobs j
                        where j.queue = q.name and j.fairness_key > r.key
                        order by j.fairness_key limit 1)
                from r where r.key is not null
              )
              select r.key from r where r.key is not null limit flow_keys_max + 1
            ) k
            union all
            select q.name, k.key, 'c' from unnest(_queues) as q(name)
            cross join lateral (
              with recursive r(key) as (
                (select j.concurrency_key from shoal.jobs j
                 where j.queue = q.name and j.concurrency_key is not null
                 order by j.concurrency_key limit 1)
                union all
                select (select j.concurrency_key from shoal.jobs j
                        where j.queue = q.name and j.concurrency_key > r.key
                        order by j.concurrency_key limit 1)
                from r where r.key is not null
              )
              select r.key from r where r.key is not null limit flow_keys_max + 1
            ) k
          ) d;
          disc_n := disc.n;
          if disc_n > 0 and disc_n <= flow_keys_max then
            meet_queues := disc.queues;
            meet_keys := disc.keys;
            meet_tasks := array_fill(''::text, array[disc_n::integer]);
            per_key_fetch := true;
          else
            scan_from := 0;
            continue;
          end if;
        -- Windowed, then (more keys than that): the next window of ready jobs in claim order,
        -- read without locks.
        elsif windowed then
          select array_agg(c.id order by c.priority desc, c.fair_seq, c.id) as ids,
                 array_agg(c.ctid order by c.priority desc, c.fair_seq, c.id) as ctids,
                 array_agg(c.queue order by c.priority desc, c.fair_seq, c.id) as queues,
                 array_agg(c.fairness_key order by c.priority desc, c.fair_seq, c.id) as keys,
                 array_agg(shoal.bucket_task(c.queue, c.task, scoped_tasks)
                           order by c.priority desc, c.fair_seq, c.id) as tasks,
                 min(c.priority) as low,
                 count(*) as n
          into cand
          from (
            select c.* from unnest(_queues) as q(name)
            cross join lateral (
              select j.id, j.ctid, j.queue, j.priority, j.fair_seq,
                     coalesce(j.concurrency_key, j.fairness_key) as fairness_key, j.task
              from shoal.jobs j
              where j.queue = q.name and j.priority <= band_top and j.run_at <= now()
              order by j.priority desc, j.fair_seq, j.id + 0
              limit scan_from + scan_size
            ) c
            order by c.priority desc, c.fair_seq, c.id
            offset scan_from
            limit scan_size
          ) c;
          exit when cand.ids is null;
        end if;
        if windowed and not per_key_fetch then
          meet_queues := cand.queues;
          meet_keys := cand.keys;
          meet_tasks := cand.tasks;
        end if;

        -- Keys first met (of the window, or every key of the first look): how many of each
        -- it may take (shoal.flow_allow returns those under flow control, locked; a key
        -- another claim holds gets none).
        select coalesce(array_agg(d.queue || E'\n' || d.task || E'\n' || d.key), '{}') as tags,
               array_agg(d.queue) as queues, array_agg(d.key) as keys,
               array_agg(d.task) as tasks
        into fit
        from (select distinct u.queue, u.key, u.task
              from unnest(meet_queues, meet_keys, meet_tasks) as u(queue, key, task)) d
        where d.queue || E'\n' || d.task || E'\n' || d.key <> all(checked_tags);
        checked_tags := checked_tags || fit.tags;
        if fit.queues is not null then
          select key_tags || coalesce(array_agg(a.queue || E'\n' || a.task || E'\n' || a.key), '{}'),
                 key_queues || coalesce(array_agg(a.queue), '{}'),
                 key_keys || coalesce(array_agg(a.key), '{}'),
                 key_tasks || coalesce(array_agg(a.task), '{}'),
                 key_allowed || coalesce(array_agg(a.allowed), '{}'),
                 key_tokens || coalesce(array_agg(a.tokens), '{}'),
                 key_waiting || coalesce(array_agg(a.waiting), '{}'),
                 key_bounds || coalesce(array_agg(a.bound), '{}'),
                 key_slotted || coalesce(array_agg(a.slotted), '{}'),
                 key_locked || coalesce(array_agg(a.locked), '{}')
          into key_tags, key_queues, key_keys, key_tasks, key_allowed, key_tokens, key_waiting,
               key_bounds, key_slotted, key_locked
          from shoal.flow_allow(fit.queues, fit.keys, fit.tasks, 2 * _limit) a;
          key_taken := key_taken || array_fill(0, array[cardinality(key_tags) - cardinality(key_taken)]);
          key_held := key_held || array_fill(0, array[cardinality(key_tags) - cardinality(key_held)]);
        end if;
        if per_key_fetch then
          -- The first look's jobs: each key's first ones, as many as it may take.
          per_key_fetch := false;
          -- One more than a key may take, so that a key with jobs beyond it shows as
          -- waiting (held) to the check below.
          select array_agg(c.id order by c.priority desc, c.fair_seq, c.id) as ids,
                 array_agg(c.ctid order by c.priority desc, c.fair_seq, c.id) as ctids,
                 array_agg(c.queue order by c.priority desc, c.fair_seq, c.id) as queues,
                 array_agg(c.key order by c.priority desc, c.fair_seq, c.id) as keys,
                 array_agg(''::text) as tasks,
                 min(c.priority) as low,
                 count(*) as n
          into cand
          from (
            select d.queue, d.key, d.kind,
                   least(coalesce(a.allowed - a.taken, _limit), _limit) + 1 as take
            from unnest(disc.queues, disc.keys, disc.kinds) as d(queue, key, kind)
            left join unnest(key_tags, key_allowed, key_taken) as a(tag, allowed, taken)
              on a.tag = d.queue || E'\n\n' || d.key
          ) d
          cross join lateral (
            (select j.id, j.ctid, j.queue, j.priority, j.fair_seq, d.key from shoal.jobs j
             where d.kind = 'f' and j.queue = d.queue and j.fairness_key = d.key
               and j.concurrency_key is null and j.run_at <= now()
             order by j.priority desc, j.fair_seq
             limit d.take)
            union all
            (select j.id, j.ctid, j.queue, j.priority, j.fair_seq, d.key from shoal.jobs j
             where d.kind = 'c' and j.queue = d.queue and j.concurrency_key = d.key
               and j.run_at <= now()
             order by j.priority desc, j.fair_seq
             limit d.take)
          ) c;
          exit when cand.ids is null;
        end if;
        if not windowed then
          -- Every key of the usual walk's picks may take twice the batch: all of them fit
          -- (the check below would keep every one), and the picks stand as they are.
          if (select coalesce(bool_and(a >= 2 * _limit), true) from unnest(key_allowed) as a) then
            key_taken := array(
              select (select count(*)
                      from unnest(meet_queues, meet_tasks, meet_keys) as c(queue, task, key)
                      where c.queue || E'\n' || c.task || E'\n' || c.key = k.tag)::integer
              from unnest(key_tags) with ordinality as k(tag, n)
              order by k.n);
            exit;
          end if;
          select array_agg(j.id order by x.n) as ids,
                 array_agg(j.ctid order by x.n) as ctids,
                 array_agg(j.queue order by x.n) as queues,
                 array_agg(coalesce(j.concurrency_key, j.fairness_key) order by x.n) as keys,
                 array_agg(shoal.bucket_task(j.queue, j.task, scoped_tasks) order by x.n) as tasks,
                 min(j.priority) as low,
                 count(*) as n
          into cand
          from unnest(picked) with ordinality as x(id, n)
          join shoal.jobs j on j.id = x.id;
          picked := '{}';
          picked_ctids := '{}';
          picked_queues := '{}';
          picked_priorities := '{}';
          picked_seqs := '{}';
          picked_keys := '{}';
          picked_tasks := '{}';
          in_workflow := false;
          spent := false;
        end if;

        -- The window's jobs that fit, in claim order: a limited key's while it has slots
        -- left, any other's; no more than the batch has room for. Locked now, SKIP LOCKED,
        -- and only while still ready (another claim may have taken one since the read).
        with u as (
          select u.*, k.slots_left,
                 row_number() over (partition by u.queue, u.task, u.key order by u.n) as key_rank
          from unnest(cand.ids, cand.ctids, cand.queues, cand.keys, cand.tasks)
            with ordinality as u(id, ctid, queue, key, task, n)
          left join (select k.tag, k.allowed - k.taken as slots_left
                     from unnest(key_tags, key_allowed, key_taken) as k(tag, allowed, taken)) k
            on k.tag = u.queue || E'\n' || u.task || E'\n' || u.key
          where u.id <> all(picked)
        ),
        fits as (
          select g.ctid, g.n
          from (
            select f.ctid, f.n, row_number() over (order by f.n) as take_rank
            from (select u.ctid, u.n, u.slots_left, u.key_rank,
                         row_number() over (order by u.n) as fit_rank
                  from u where u.slots_left is null or u.key_rank <= u.slots_left) f
            -- A key under flow control goes into a prefetch buffer (past the first _starting
            -- of the batch, which start at once) only while it keeps a whole batch's worth
            -- of slots free after this job: there a job would hold its slot unstarted, so a
            -- key near its limit gets only slots that start its jobs at once.
            where f.slots_left is null or _starting is null
               or cardinality(picked) + f.fit_rank <= _starting
               or f.slots_left - f.key_rank >= _limit
          ) g
          where g.take_rank <= _limit - cardinality(picked)
        ),
        taken as (
          select j.id, j.ctid, j.queue, j.priority, j.fair_seq, j.flow_key, j.task,
                 j.execution_id, j.attempts, j.max_attempts, f.n
          from fits f
          cross join lateral (
            select j.id, j.ctid, j.queue, j.priority, j.fair_seq,
                   coalesce(j.concurrency_key, j.fairness_key) as flow_key,
                   shoal.bucket_task(j.queue, j.task, scoped_tasks) as task, j.execution_id,
                   j.attempts, j.max_attempts
            from shoal.jobs j
            where j.ctid = f.ctid and j.run_at <= now()
            for update skip locked
          ) j
        )
        select array_agg(t.id order by t.n) as ids,
               array_agg(t.ctid) as ctids,
               array_agg(t.queue) as queues,
               array_agg(t.priority) as priorities,
               array_agg(t.fair_seq) as seqs,
               array_agg(t.queue || E'\n' || t.task || E'\n' || t.flow_key) as tags,
               bool_or(t.execution_id is not null) as in_workflow,
               bool_or(t.attempts >= t.max_attempts) as spent,
               -- Keys with jobs beyond their slots left (waiting for one to free).
               (select array_agg(u.queue || E'\n' || u.task || E'\n' || u.key) from u
                where u.slots_left is not null and u.key_rank > u.slots_left) as held,
               -- Keys that may fill a prefetch buffer too: none under flow control, or one
               -- with a batch's worth of slots to spare.
               (select bool_or(u.slots_left is null or u.slots_left - u.key_rank >= _limit)
                from u) as free_keys
        into got
        from taken t;
        if got.held is not null then
          key_held := array(
            select k.held + (select count(*) from unnest(got.held) as h(tag)
                             where h.tag = k.tag)::integer
            from unnest(key_tags, key_held) with ordinality as k(tag, held, n)
            order by k.n);
        end if;
        if got.ids is not null then
          picked := picked || got.ids;
          picked_ctids := picked_ctids || got.ctids;
          picked_queues := picked_queues || got.queues;
          picked_priorities := picked_priorities || got.priorities;
          picked_seqs := picked_seqs || got.seqs;
          in_workflow := in_workflow or got.in_workflow;
          spent := spent or got.spent;
          key_taken := array(
            select k.taken + (select count(*) from unnest(got.tags) as t(tag)
                              where t.tag = k.tag)::integer
            from unnest(key_tags, key_taken) with ordinality as k(tag, taken, n)
            order by k.n);
        end if;
        -- The first look saw every key: nothing more to find.
        exit when disc_n between 1 and flow_keys_max;
        -- Every slot that starts a job at once is filled, and only keys under flow control
        -- were met: what is left of the batch would be a prefetch they may not use.
        exit when cardinality(picked) >= _limit
          or (cardinality(picked) >= _starting and not coalesce(got.free_keys, false));
        if not windowed then
          -- The usual walk's picks are checked: when some did not fit, the batch's room is
          -- looked for from the head, in windows.
          exit when got.held is null;
          windowed := true;
          continue;
        end if;
        scan_read := scan_read + cand.n;
        exit when scan_read >= flow_scan;
        if got.ids is null and cand.low > -32768
           and (cardinality(scoped_tasks) = 0 or scan_from + cand.n >= flow_scan / 2) then
          -- Nothing fit: the rest of this window's lowest priority is full keys' backlog (at
          -- one priority, keys interleave by their stamps, so another key's jobs lie near its
          -- head): look below it. Where a task has limits of its own, a key's jobs of another
          -- bucket may lie right behind its full bucket's backlog (not stamped apart): only
          -- once half of flow_scan was read from this band's top.
          band_top := cand.low - 1;
          scan_from := 0;
          scan_size := greatest(_limit * 2, 64);
        else
          exit when cand.n < scan_size;
          scan_from := scan_from + scan_size;
          scan_size := scan_size * 4;
        end if;
        scan_size := least(scan_size, flow_scan - scan_read);
      end loop;
      -- What this claim took from the buckets and the slots' bounds, and which keys it found
      -- full with jobs waiting: written only when something changed.
      if exists (select 1 from unnest(key_tokens, key_taken, key_held, key_waiting, key_bounds)
                   as k(tokens, taken, held, waiting, bound)
                 where ((k.tokens is not null or k.bound is not null) and k.taken > 0)
                    or (k.held > 0) <> k.waiting) then
        perform shoal.flow_claimed(key_queues, key_keys, key_tasks, key_tokens, key_taken,
                                   key_held, key_waiting, key_bounds, key_locked);
      end if;
      -- The keys under a concurrency limit: their claimed jobs get a slot row.
      slot_tags := array(select k.tag from unnest(key_tags, key_slotted) as k(tag, slotted)
                         where k.slotted);
    end if;
  end if;

  if picked is null or cardinality(picked) = 0 then
    return;
  end if;

  -- Where claiming has got to, for the next claims and the stamping rule: the greatest
  -- stamp picked per queue and priority, written when the row is 100 ms old or missing (a
  -- new row's previous is the least stamp picked: jobs stamped from the index's head
  -- before it existed lie above that, less fair_burst()). Skipped when it would change
  -- nothing (heads_known, above); a claim from the head always runs it. A row another
  -- claim is rewriting (locked until that claim commits) is skipped, not waited for: once
  -- it commits the row is under 100 ms old and this claim would not rewrite it anyway.
  -- Waiting had every consumer of a queue queue up on its row: with 8 consumer processes
  -- (W7 --profile) the rewrite took 5.3 ms a call, 1.2 ms with 2 processes.
  if from_gap or heads_oldest is null or heads_oldest <= now() - interval '100 ms'
     or heads_known < cardinality(levels) * cardinality(_queues) then
    with top as (
      select u.queue, u.priority, max(u.seq) as seq, min(u.seq) as first
      from unnest(picked_queues, picked_priorities, picked_seqs) as u(queue, priority, seq)
      group by 1, 2
    ),
    due as (
      select h.queue, h.priority, t.seq from shoal.queue_heads h
      join top t on h.queue = t.queue and h.priority = t.priority
      where h.fair_seq < t.seq and h.updated_at <= now() - interval '100 ms'
      for update of h skip locked
    ),
    moved as (
      update shoal.queue_heads h set previous = h.fair_seq, fair_seq = d.seq, updated_at = now()
      from due d
      where h.queue = d.queue and h.priority = d.priority
    )
    insert into shoal.queue_heads (queue, priority, fair_seq, previous)
    select t.queue, t.priority, t.seq, t.first from top t
    where not exists (select 1 from shoal.queue_heads h
                      where h.queue = t.queue and h.priority = t.priority)
    on conflict do nothing;
  end if;

  if in_workflow then
    -- A job whose execution already ended (cancelled, failed, completed) is acked unrun.
    with gone as (
      delete from shoal.jobs j
      using shoal.executions e
      where j.id = any(picked) and e.id = j.execution_id
        and e.status in ('completed', 'failed', 'cancelled')
      returning j.id
    )
    select array_agg(gone.id) into ended from gone;
    if ended is not null then
      picked := array(select p from unnest(picked) with ordinality as x(p, n)
                      where p <> all(ended) order by n);
    end if;
  end if;

  if spent then
    -- Claimed max_attempts times without ever finishing (a crash loop): dead-lettered
    -- unrun. Burying it fails its execution (a trigger on dead_jobs), so its siblings are
    -- not handed out only to be aborted at their first heartbeat.
    with poison as (
      delete from shoal.jobs j
      where j.id = any(picked) and j.attempts >= j.max_attempts
      returning j.*
    ),
    buried as (
      insert into shoal.dead_jobs (id, queue, task, payload, priority, fairness_key, attempts,
        max_attempts, token, key, execution_id, barrier_id, child_index, errors, reason,
        created_at, concurrency_key, traceparent)
      select p.id, p.queue, p.task, p.payload, p.priority, p.fairness_key, p.attempts,
        p.max_attempts, p.token, p.key, p.execution_id, p.barrier_id, p.child_index, p.errors,
        format('Claimed %s times without finishing: its worker crashed or was killed every time',
          p.attempts),
        p.created_at, p.concurrency_key, p.traceparent
      from poison p
      returning dead_jobs.id, dead_jobs.execution_id
    )
    select array_agg(b.id) into dead_ids from buried b;
    return query
      select d.id, d.queue, d.task, '{}'::jsonb, d.priority, d.fairness_key, 0::bigint,
        d.attempts,
        d.max_attempts, d.token, d.key, d.execution_id, d.created_at, now(), true
      from shoal.dead_jobs d where d.id = any(dead_ids);
    picked := array(
      select p from unnest(picked) with ordinality as x(p, n)
      join shoal.jobs j on j.id = x.p
      where j.execution_id is null or j.execution_id not in (
        select d.execution_id from shoal.dead_jobs d
        where d.id = any(dead_ids) and d.execution_id is not null)
      order by x.n);
  end if;

  if ended is not null or dead_ids is not null then
    picked_ctids := array(select j.ctid from shoal.jobs j where j.id = any(picked));
  end if;

  -- The first _starting of the batch start at once (all when null): one comparison per row
  -- when all or none do, a search of the starting few otherwise.
  all_start := _starting is null or _starting >= cardinality(picked);
  starting := case when all_start then '{}' else picked[1:greatest(_starting, 0)] end;

  return query
    with claimed as (
      update shoal.jobs j
      set attempts = j.attempts + 1, token = j.token + 1, locked_by = _worker,
          locked_at = now(), run_at = now() + _visibility_ms * interval '1 ms',
          started_at = case when all_start or j.id = any(starting) then now() end
      where j.ctid = any(picked_ctids)
      returning j.id, j.queue, j.task, j.payload, j.priority, j.fairness_key, j.fair_seq,
        j.attempts, j.max_attempts, j.token, j.key, j.execution_id, j.created_at, j.run_at,
        coalesce(j.concurrency_key, j.fairness_key) as flow_key
    ),
    -- A limited key's jobs hold a slot each, under their new token (the slot rule): one
    -- row per key for this claim. (Grouped first, so each key's tag is made once.)
    slotted as (
      insert into shoal.concurrency_slots (queue, key, task, job_ids, tokens)
      select g.queue, g.flow_key, g.task, g.ids, g.tokens
      from (select c.queue, c.flow_key, shoal.bucket_task(c.queue, c.task, scoped_tasks) as task,
                   array_agg(c.id) as ids, array_agg(c.token) as tokens
            from claimed c where limited
            group by 1, 2, 3) g
      where g.queue || E'\n' || g.task || E'\n' || g.flow_key = any(slot_tags)
    )
    -- In claim order, so the caller starts them in that order.
    select c.id, c.queue::text, c.task::text, c.payload::jsonb, c.priority, c.fairness_key,
      c.fair_seq, c.attempts, c.max_attempts, c.token, c.key, c.execution_id, c.created_at, c.run_at, false
    from claimed c
    order by c.priority desc, c.fair_seq, c.id;

  if due_queues is not null then
    -- Counted now (this claim's slot rows included): the rows whose jobs all ended go.
    perform shoal.flow_count(due_queues, due_keys, due_tasks,
                             array_fill(true, array[cardinality(due_queues)]), due_limits,
                             array_fill(0, array[cardinality(due_queues)]),
                             2 * _limit);
  end if;

  if in_workflow then
    -- An execution starts running when its first job is claimed.
    update shoal.executions e
    set status = 'running', started_at = now(), updated_at = now()
    where e.id = any(array(
        select distinct j.execution_id from shoal.jobs j
        where j.id = any(picked) and j.execution_id is not null))
      and e.status = 'pending';
  end if;
end
$$;
