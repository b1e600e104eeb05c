-- shoal functions: counting jobs without scanning them, for `shoal status`, /metrics and
-- anyone with SQL (`select * from shoal.job_counts()`).
--
--   shoal.job_state(run_at, locked_by, started_at)   the state rule (below)
--   shoal.job_tallies(...)                          live jobs by queue, task and state
--   shoal.job_counts(...)                           the same by queue: what status shows
--   shoal.dead_counts(...)                          dead letters by queue
--
-- THE STATE RULE. A live job is ready (due: pending and due, or claimed by a worker whose
-- deadline passed), scheduled (not due, unclaimed: delayed or backing off), running
-- (claimed, its handler started) or prefetched (claimed, waiting in a consumer's buffer).
-- The state is a matter of run_at against the clock, so no write marks the moment a
-- scheduled job becomes ready: counters kept by triggers could not follow it.
--
-- THE COUNT RULE. Counting every row costs a scan: 3 to 6 s for 10,000,000 jobs here, on
-- every scrape. Counters kept by triggers cost every enqueue: measured with pgbench (4
-- clients, one queue), a statement-level trigger keeping one row per queue took single
-- enqueues from about 6,400 to 4,400 per second (-30%), and to 2,000 per second (-69%) while
-- another session held a snapshot open (every version of the counter row stays, and each
-- update walks them). An index that finds ready or claimed jobs ((queue, run_at)) makes the
-- claim and the heartbeat rewrite every index entry instead of updating in place (no HOT
-- update was left): claims of 10 jobs fell from about 435 to 305 per second (-30%). So:
--
-- - Exact when cheap: `_exact` asks for a full count; a table of at most `_sample_pages`
--   pages is counted in full (no more than the sample would read); a table Postgres counts
--   (pg_stat_user_tables.n_live_tup, kept by every insert and delete at no cost of ours) at
--   no more than `_exact_limit` jobs is read along the claim index, at most `_exact_limit`+1
--   rows (a file left large by a drained backlog is not read through).
-- - Otherwise each queue is counted if that is cheap, else estimated:
--   * probes: the first `_probe` jobs of each (queue, priority) range of jobs_claim_idx in
--     claim order (one index descent per range, found by a skip scan; past 25 ranges the
--     rows per range shrink so that all of them read at most 25 × `_probe`). A queue whose
--     every range fits is counted;
--   * a block sample of about `_sample_pages` pages (TABLESAMPLE SYSTEM, the same pages for
--     a minute) sizes the others, scaled to the live rows Postgres counts (or, when that
--     count is missing, to the sampled share of the pages). The smallest five that look no
--     larger than 10 × `_probe` jobs are read along the claim index, and counted if they fit;
--   * the rest are estimated: ready and scheduled jobs by task from the sample, scaled as
--     above less the counted rows, never below what the probe saw (rough for a queue or task
--     of a few percent of the table: its rows share pages); running and prefetched jobs as
--     live consumers reported them at their last heartbeat (shoal.consumers.in_flight,
--     migration 012) or as the probe saw them, whichever is more: a sample cannot see states
--     this rare, and no index may find them (above); the oldest ready age from the probes
--     (and the sample): the stamping rule (queue.sql) puts a queue's longest waiting jobs at
--     the head of each priority's claim order (a key's jobs in enqueue order, a newcomer at
--     most fair_burst() places ahead of the head), the walk every claim and stamp makes.
--   With 10,000,000 jobs in four queues the whole of `shoal status` took 10 to 16 ms (W13),
--   this function alone up to 40 ms when the sample's pages came from the disk (about 90 µs
--   a page on the loaded machine here) rather than from shared buffers.
create or replace function shoal.job_state(run_at timestamptz, locked_by text,
                                           started_at timestamptz)
returns text
language sql stable as $$
  select case when run_at <= now() then 'ready'
              when locked_by is null then 'scheduled'
              when started_at is not null then 'running'
              else 'prefetched' end
$$;

-- Live jobs by queue, task and state (the count rule above): n jobs, the oldest ready one's
-- run_at, and whether n is a count or an estimate. Running and prefetched jobs of an
-- estimated queue come as one row per state with a null task. Null arguments take the
-- defaults (a full count only when asked; 10,000 jobs; 256 pages; 200 rows per probe).
create or replace function shoal.job_tallies(_exact boolean default false,
                                             _exact_limit integer default null,
                                             _sample_pages integer default null,
                                             _probe integer default null)
returns table (queue text, task text, state text, n bigint, oldest_ready timestamptz,
               exact boolean)
language plpgsql volatile
-- As in the claim: walk jobs_claim_idx in its order and stop, whatever the statistics say
-- (bitmap scans and sorts off), and no JIT for the cost a disabled sort would show.
set enable_sort = off
set enable_bitmapscan = off
set jit = off
as $$
#variable_conflict use_column
declare
  exact_limit constant integer := coalesce(_exact_limit, 10000);
  sample_pages constant integer := greatest(coalesce(_sample_pages, 256), 1);
  probe constant integer := greatest(coalesce(_probe, 200), 1);
  walk_limit constant integer := 10 * probe;
  walk_queues constant integer := 5;
  pages constant bigint := pg_relation_size('shoal.jobs'::regclass)
                           / current_setting('block_size')::bigint;
  -- The same pages for a minute: scrapes and redraws within it read them from shared
  -- buffers, and the figures do not jitter from one sample to the next.
  sample_seed constant float8 := extract(epoch from date_trunc('minute', now()));
  live bigint;
  percent real;
  pair_queues text[];
  pair_priorities integer[];
  per_pair integer;
begin
  if coalesce(_exact, false) or pages <= sample_pages then
    return query
      select j.queue::text, j.task::text, shoal.job_state(j.run_at, j.locked_by, j.started_at),
             count(*), min(j.run_at) filter (where j.run_at <= now()), true
      from shoal.jobs j
      group by 1, 2, 3;
    return;
  end if;

  select s.n_live_tup into live from pg_stat_user_tables s where s.relid = 'shoal.jobs'::regclass;
  if coalesce(live, 0) <= exact_limit then
    return query
      with walk as materialized (
        select j.queue, j.task, j.run_at, j.locked_by, j.started_at from shoal.jobs j
        order by j.queue, j.priority desc, j.fair_seq, j.id + 0
        limit exact_limit + 1
      )
      select w.queue::text, w.task::text, shoal.job_state(w.run_at, w.locked_by, w.started_at),
             count(*), min(w.run_at) filter (where w.run_at <= now()), true
      from walk w
      where (select count(*) from walk) <= exact_limit
      group by 1, 2, 3;
    if found then
      return;
    end if;
    live := null; -- more jobs than Postgres had counted: its count is stale, not a scale
  end if;

  -- The (queue, priority) ranges of the claim index, one descent each (a skip scan).
  with recursive pairs as (
    (select j.queue::text as queue, j.priority from shoal.jobs j
     order by j.queue, j.priority desc limit 1)
    union all
    select nx.queue, nx.priority from pairs p cross join lateral (
      (select j.queue::text as queue, j.priority from shoal.jobs j
       where j.queue = p.queue and j.priority < p.priority
       order by j.queue, j.priority desc limit 1)
      union all
      (select j.queue::text as queue, j.priority from shoal.jobs j
       where j.queue > p.queue
       order by j.queue, j.priority desc limit 1)
      limit 1
    ) nx
  )
  select array_agg(p.queue), array_agg(p.priority) into pair_queues, pair_priorities
  from pairs p;
  per_pair := greatest(1, least(probe, 25 * probe / greatest(cardinality(pair_queues), 1)));
  percent := least(100, 100.0 * sample_pages / pages);

  return query
    with probed as materialized (
      select p.queue, p.ord, h.task::text as task, h.run_at, h.locked_by, h.started_at
      from unnest(pair_queues, pair_priorities) with ordinality as p(queue, priority, ord)
      cross join lateral (
        select j.task, j.run_at, j.locked_by, j.started_at from shoal.jobs j
        where j.queue = p.queue and j.priority = p.priority
        order by j.fair_seq, j.id + 0
        limit per_pair + 1
      ) h
    ),
    -- Queues whose every range the probes read to its end.
    whole as (
      select r.queue from (
        select pr.queue, pr.ord, count(*) as rows from probed pr group by 1, 2
      ) r
      group by r.queue having bool_and(r.rows <= per_pair)
    ),
    sampled as materialized (
      select j.queue::text as queue, j.task::text as task,
             shoal.job_state(j.run_at, j.locked_by, j.started_at) as state, count(*) as n,
             min(j.run_at) filter (where j.run_at <= now()) as oldest_ready
      from shoal.jobs j tablesample system (percent) repeatable (sample_seed)
      where j.queue not in (select w.queue from whole w)
      group by 1, 2, 3
    ),
    -- Jobs per sampled row, to size the other queues: the live rows Postgres counts, less
    -- those of the queues read whole, over the rows sampled; or one over the share of pages
    -- sampled.
    first_scale as (
      select case
        when live is not null and (select sum(s.n) from sampled s) > 0 then
          greatest(live - (select count(*) from probed pr
                           where pr.queue in (select w.queue from whole w)), 0)::float8
            / (select sum(s.n) from sampled s)
        else 100.0 / percent
      end as factor
    ),
    -- The other queues by size as sampled, never below what their probes read.
    sized as (
      select q.queue,
             greatest(coalesce((select sum(s.n) from sampled s where s.queue = q.queue), 0)
                        * (select f.factor from first_scale f),
                      (select count(*) from probed pr where pr.queue = q.queue)) as size
      from (select distinct p.queue from unnest(pair_queues) as p(queue)) q
      where q.queue not in (select w.queue from whole w)
    ),
    -- Those that look small, smallest first: read along the claim index, counted if they fit.
    walked as materialized (
      select m.queue, w.task::text as task, w.run_at, w.locked_by, w.started_at
      from (
        select z.queue from sized z where z.size <= walk_limit order by z.size limit walk_queues
      ) m
      cross join lateral (
        select j.task, j.run_at, j.locked_by, j.started_at from shoal.jobs j
        where j.queue = m.queue
        order by j.queue, j.priority desc, j.fair_seq, j.id + 0
        limit walk_limit + 1
      ) w
    ),
    counted as (
      select w.queue from whole w
      union all
      select w.queue from walked w group by w.queue having count(*) <= walk_limit
    ),
    tallied as (
      select r.queue, r.task, shoal.job_state(r.run_at, r.locked_by, r.started_at) as state,
             count(*) as n, min(r.run_at) filter (where r.run_at <= now()) as oldest_ready
      from (
        select pr.queue, pr.task, pr.run_at, pr.locked_by, pr.started_at from probed pr
        where pr.queue in (select w.queue from whole w)
        union all
        select w.queue, w.task, w.run_at, w.locked_by, w.started_at from walked w
        where w.queue in (select c.queue from counted c)
      ) r
      group by 1, 2, 3
    ),
    -- What the probes of the estimated queues read at their heads.
    seen as (
      select pr.queue, pr.task, shoal.job_state(pr.run_at, pr.locked_by, pr.started_at) as state,
             count(*) as n, min(pr.run_at) filter (where pr.run_at <= now()) as oldest_ready
      from probed pr
      where pr.queue not in (select c.queue from counted c)
      group by 1, 2, 3
    ),
    estimated_sample as (
      select * from sampled s where s.queue not in (select c.queue from counted c)
    ),
    -- Jobs per sampled row of the estimated queues, as first_scale, less every counted row.
    scale as (
      select case
        when live is not null and (select sum(s.n) from estimated_sample s) > 0 then
          greatest(live - coalesce((select sum(t.n) from tallied t), 0), 0)::float8
            / (select sum(s.n) from estimated_sample s)
        else 100.0 / percent
      end as factor
    ),
    reported as (
      select r.key as queue, st.state, sum((r.value ->> st.state)::bigint) as n
      from shoal.consumers c
      cross join lateral jsonb_each(
        case when jsonb_typeof(c.in_flight) = 'object' then c.in_flight end) r
      cross join (values ('running'), ('prefetched')) st(state)
      where c.in_flight_until > now() and jsonb_typeof(r.value -> st.state) = 'number'
      group by 1, 2
    )
    select t.queue, t.task, t.state, t.n, t.oldest_ready, true from tallied t
    union all
    select coalesce(s.queue, e.queue), coalesce(s.task, e.task), coalesce(s.state, e.state),
           greatest(round(coalesce(s.n, 0) * (select sc.factor from scale sc))::bigint,
                    coalesce(e.n, 0)),
           least(s.oldest_ready, e.oldest_ready), false
    from estimated_sample s
    full join seen e on e.queue = s.queue and e.task = s.task and e.state = s.state
    where coalesce(s.state, e.state) in ('ready', 'scheduled')
    union all
    select z.queue, null, st.state,
           greatest(coalesce((select r.n from reported r
                              where r.queue = z.queue and r.state = st.state), 0),
                    coalesce((select sum(e.n) from seen e
                              where e.queue = z.queue and e.state = st.state), 0))::bigint,
           null, false
    from sized z cross join (values ('running'), ('prefetched')) st(state)
    where z.queue not in (select c.queue from counted c);
end
$$;

-- Live jobs by queue, as `shoal status` and /metrics show them: each state's count, the
-- oldest ready job's age in seconds (0 when none), the ready jobs by task, and whether all of
-- it is counted (true) or estimated (false). Arguments as for job_tallies.
create or replace function shoal.job_counts(_exact boolean default false,
                                            _exact_limit integer default null,
                                            _sample_pages integer default null,
                                            _probe integer default null)
returns table (queue text, ready bigint, scheduled bigint, running bigint, prefetched bigint,
               oldest_ready_age_s float8, ready_by_task jsonb, exact boolean)
language sql volatile as $$
  select t.queue,
         coalesce(sum(t.n) filter (where t.state = 'ready'), 0)::bigint,
         coalesce(sum(t.n) filter (where t.state = 'scheduled'), 0)::bigint,
         coalesce(sum(t.n) filter (where t.state = 'running'), 0)::bigint,
         coalesce(sum(t.n) filter (where t.state = 'prefetched'), 0)::bigint,
         coalesce(extract(epoch from now() - min(t.oldest_ready)), 0)::float8,
         coalesce(jsonb_object_agg(t.task, t.n)
                    filter (where t.state = 'ready' and t.n > 0 and t.task is not null), '{}'),
         bool_and(t.exact)
  from shoal.job_tallies(_exact, _exact_limit, _sample_pages, _probe) t
  group by t.queue
  order by t.queue
$$;

-- Dead letters by queue, and whether each is counted or estimated: counted in full when
-- asked or when the table is at most `_sample_pages` pages; otherwise each queue is counted
-- along dead_jobs_queue_idx up to `_exact_limit` (an index-only scan: dead letters are
-- never updated, so their pages are all-visible once vacuumed), and a queue past that is
-- estimated from a block sample, as live jobs are. Null arguments take the defaults.
create or replace function shoal.dead_counts(_exact boolean default false,
                                             _exact_limit integer default null,
                                             _sample_pages integer default null)
returns table (queue text, dead bigint, exact boolean)
language plpgsql volatile
set enable_sort = off
set enable_bitmapscan = off
set jit = off
as $$
#variable_conflict use_column
declare
  exact_limit constant integer := coalesce(_exact_limit, 10000);
  sample_pages constant integer := greatest(coalesce(_sample_pages, 256), 1);
  pages constant bigint := pg_relation_size('shoal.dead_jobs'::regclass)
                           / current_setting('block_size')::bigint;
  sample_seed constant float8 := extract(epoch from date_trunc('minute', now()));
  live bigint;
  percent real;
begin
  if coalesce(_exact, false) or pages <= sample_pages then
    return query select d.queue, count(*), true from shoal.dead_jobs d group by 1;
    return;
  end if;
  select s.n_live_tup into live
  from pg_stat_user_tables s where s.relid = 'shoal.dead_jobs'::regclass;
  percent := least(100, 100.0 * sample_pages / pages);
  return query
    with recursive queues as (
      (select d.queue from shoal.dead_jobs d order by d.queue limit 1)
      union all
      select nx.queue from queues q cross join lateral (
        select d.queue from shoal.dead_jobs d where d.queue > q.queue order by d.queue limit 1
      ) nx
    ),
    bounded as materialized (
      select q.queue, (select count(*) from (
        select 1 from shoal.dead_jobs d where d.queue = q.queue limit exact_limit + 1) b) as n
      from queues q
    ),
    sampled as (
      select d.queue, count(*) as n
      from shoal.dead_jobs d tablesample system (percent) repeatable (sample_seed)
      where d.queue in (select b.queue from bounded b where b.n > exact_limit)
      group by 1
    ),
    scale as (
      select case
        when live is not null and (select sum(s.n) from sampled s) > 0 then
          greatest(live - coalesce((select sum(b.n) from bounded b where b.n <= exact_limit), 0),
                   0)::float8 / (select sum(s.n) from sampled s)
        else 100.0 / percent
      end as factor
    )
    select b.queue,
           case when b.n <= exact_limit then b.n
                else greatest(b.n, round(coalesce(s.n, 0) * (select sc.factor from scale sc))::bigint)
           end,
           b.n <= exact_limit
    from bounded b left join sampled s on s.queue = b.queue;
end
$$;
