-- shoal functions: flow control (the tables: sql/015_flow.sql).
--
-- Owns pausing queues and, per (queue, key), concurrency limits, rate limits and holds (a
-- key is a job's flow key: its concurrency key when one was given at enqueue, else its
-- fairness key) and fairness weights (by fairness key):
--   shoal.pause_queue, shoal.resume_queue          a queue's pause (claim.sql skips it)
--   shoal.set_concurrency_limit,                   at most N running per key: per queue
--   shoal.clear_concurrency_limit                  (every key) or per key
--   shoal.concurrency_limit                        the limit that applies to a key
--   shoal.set_rate_limit, shoal.clear_rate_limit   at most N claims per period per key
--   shoal.hold_key                                 no claim of a key's jobs for a while
--   shoal.set_fairness_weight,                     a key's share under contention (the
--   shoal.clear_fairness_weight                    stamping rule in queue.sql reads it)
--   shoal.flow_allow                               how many of a key's jobs a claim may take
--   shoal.flow_claimed                             what a claim took and held back
--   shoal.flow_lock                                the claim's lock on a key
--   shoal.held_slots (a view), shoal.slots_held,   the slot rule (below); a key's slots
--   shoal.default_slots_held                       held; those of keys under a default
--   shoal.free_slots, shoal.prune_slots,           finished claims give their slots back;
--   shoal.has_flow_leftovers                       the reaper removes what is left
--
-- THE SLOT RULE. A key's running jobs are the rows of shoal.concurrency_slots whose job
-- still carries the token it was claimed with, is claimed and is within its deadline: a
-- job acked, retried, handed back, dead-lettered, cancelled or past its deadline holds no
-- slot, whoever removes its row and when. Only the claim (claim.sql, "Flow control") adds
-- slots, and only while it holds the key's lock (shoal.flow_lock): it takes the lock, then
-- in a later statement (whose snapshot sees every claim committed before the lock was
-- free) counts the slots held, and claims at most the limit less that many of the key's
-- jobs. Claims never wait for a key: one held by another claim counts as full for this one
-- (no waits, no deadlocks; that claim takes the key's free slots).

-- Pause a queue: consumers stop claiming its jobs at their next claim; running jobs finish,
-- enqueues and schedules still land. Returns false when it was paused already.
create or replace function shoal.pause_queue(queue text) returns boolean
language plpgsql volatile as $$
begin
  insert into shoal.queue_pauses (queue) values (pause_queue.queue::shoal.name)
  on conflict do nothing;
  return found;
end
$$;

-- Resume a paused queue and wake its consumers. Returns false when it was not paused.
create or replace function shoal.resume_queue(queue text) returns boolean
language plpgsql volatile as $$
begin
  delete from shoal.queue_pauses p where p.queue = resume_queue.queue;
  if not found then
    return false;
  end if;
  perform shoal.notify_jobs(array[resume_queue.queue], null);
  return true;
end
$$;

-- At most max_running jobs of the queue run at once per key: with a null key, for every key
-- of the queue (its default); with a key, for that key alone (over the default). Takes
-- effect at the next claim; a raised limit wakes the queue's consumers. Jobs of the key (or
-- queue) claimed before the first limit covered them get their slot rows here, so they
-- count at once (this reads the queue's jobs once: on a queue of millions, seconds).
create or replace function shoal.set_concurrency_limit(queue text, max_running integer,
                                                       key text default null)
returns void
language plpgsql volatile as $$
#variable_conflict use_column
begin
  if set_concurrency_limit.max_running is null or max_running not between 0 and 1000000 then
    raise exception 'Cannot set a concurrency limit: max_running must be an integer from 0 to 1000000, not %',
      coalesce(set_concurrency_limit.max_running::text, 'null') using errcode = '22023';
  end if;
  if set_concurrency_limit.key is not null and length(set_concurrency_limit.key) > 256 then
    raise exception 'Cannot set a concurrency limit: a key has at most 256 characters'
      using errcode = '22023';
  end if;
  if set_concurrency_limit.key is null then
    insert into shoal.concurrency_limits as l (queue, key, max_running)
    values (set_concurrency_limit.queue::shoal.name, null, set_concurrency_limit.max_running)
    on conflict (queue) where key is null
    do update set max_running = excluded.max_running, updated_at = now();
  else
    insert into shoal.concurrency_limits as l (queue, key, max_running)
    values (set_concurrency_limit.queue::shoal.name, set_concurrency_limit.key,
            set_concurrency_limit.max_running)
    on conflict (queue, key) where key is not null
    do update set max_running = excluded.max_running, updated_at = now();
  end if;
  insert into shoal.concurrency_slots (job_id, queue, key, token)
  select j.id, j.queue, coalesce(j.concurrency_key, j.fairness_key), j.token
  from shoal.jobs j
  where j.queue = set_concurrency_limit.queue and j.locked_by is not null
    and j.run_at > now()
    and (set_concurrency_limit.key is null
         or coalesce(j.concurrency_key, j.fairness_key) = set_concurrency_limit.key)
  on conflict (job_id) do nothing;
  perform shoal.notify_jobs(array[set_concurrency_limit.queue], null);
end
$$;

-- Remove a limit (a queue's default with a null key, or one key's). Returns false when
-- there was none. Wakes the queue's consumers: jobs held back may run now.
create or replace function shoal.clear_concurrency_limit(queue text, key text default null)
returns boolean
language plpgsql volatile as $$
begin
  delete from shoal.concurrency_limits l
  where l.queue = clear_concurrency_limit.queue
    and l.key is not distinct from clear_concurrency_limit.key;
  if not found then
    return false;
  end if;
  perform shoal.notify_jobs(array[clear_concurrency_limit.queue], null);
  return true;
end
$$;

-- The limit on a key's running jobs in a queue: the key's own, else the queue's default;
-- null when neither is set.
create or replace function shoal.concurrency_limit(queue text, key text) returns integer
language sql stable as $$
  select coalesce(
    (select l.max_running from shoal.concurrency_limits l
     where l.queue = $1 and l.key = $2),
    (select l.max_running from shoal.concurrency_limits l
     where l.queue = $1 and l.key is null))
$$;

-- The claim's lock on a (queue, key), held to the end of its transaction; false when another
-- transaction holds it. A transaction-level advisory lock with two int4 keys (its own space:
-- the migration lock's single bigint key cannot meet it); keys whose hashes collide share a
-- lock, which only makes one of them count as full for a moment.
create or replace function shoal.flow_lock(queue text, key text) returns boolean
language sql volatile as $$
  select pg_try_advisory_xact_lock(1936224620, hashtext($1 || E'\n' || $2))
$$;

-- The slot rows that hold a slot now: the slot rule above, written once.
create or replace view shoal.held_slots as
  select s.job_id, s.queue, s.key
  from shoal.concurrency_slots s
  join shoal.jobs j on j.id = s.job_id
  where j.token = s.token and j.locked_by is not null and j.run_at > now();

-- The slots a key holds.
create or replace function shoal.slots_held(queue text, key text) returns integer
language sql stable as $$
  select count(*)::integer from shoal.held_slots h where h.queue = $1 and h.key = $2
$$;

-- The slots held by a queue's keys that have no concurrency limit of their own (those its
-- default counts), by the slot rule.
create or replace function shoal.default_slots_held(queue text) returns integer
language sql stable as $$
  select count(*)::integer
  from shoal.held_slots h
  where h.queue = $1
    and not exists (select 1 from shoal.concurrency_limits o
                    where o.queue = h.queue and o.key = h.key)
$$;

-- The claims of these jobs ended (acked, retried, handed back, dead-lettered): remove their
-- slots, and wake the consumers of each queue where one was freed of a key with jobs waiting
-- for it (flow_keys.waiting), so a job held back by the limit starts now instead of at a
-- consumer's poll; a key that never fills wakes nobody. Called in the statement that ends
-- them. Returns how many slots were freed.
create or replace function shoal.free_slots(ids bigint[]) returns integer
language plpgsql volatile as $$
declare
  queues text[];
  freed_count integer;
begin
  with freed as (
    delete from shoal.concurrency_slots s where s.job_id = any(ids)
    returning s.queue, s.key
  )
  select (select array_agg(distinct f.queue) from freed f
          where exists (select 1 from shoal.flow_keys k
                        where k.queue = f.queue and k.key = f.key and k.waiting)),
         (select count(*) from freed)
  into queues, freed_count;
  if queues is not null then
    perform shoal.notify_jobs(queues, null);
  end if;
  return freed_count;
end
$$;

-- At most max_starts claims per period_ms per key (a token bucket: the rate on average, a
-- burst of up to max_starts after a quiet spell): with a null key for every key of the
-- queue, with a key for that key alone. Takes effect at the next claim.
create or replace function shoal.set_rate_limit(queue text, max_starts integer,
                                                period_ms integer, key text default null)
returns void
language plpgsql volatile as $$
#variable_conflict use_column
begin
  if set_rate_limit.max_starts is null or set_rate_limit.max_starts not between 1 and 1000000 then
    raise exception 'Cannot set a rate limit: max_starts must be an integer from 1 to 1000000, not %',
      coalesce(set_rate_limit.max_starts::text, 'null') using errcode = '22023';
  end if;
  if set_rate_limit.period_ms is null or set_rate_limit.period_ms not between 1 and 86400000 then
    raise exception 'Cannot set a rate limit: period_ms must be an integer from 1 to 86400000 (a day), not %',
      coalesce(set_rate_limit.period_ms::text, 'null') using errcode = '22023';
  end if;
  if set_rate_limit.key is not null and length(set_rate_limit.key) > 256 then
    raise exception 'Cannot set a rate limit: a key has at most 256 characters'
      using errcode = '22023';
  end if;
  if set_rate_limit.key is null then
    insert into shoal.rate_limits (queue, key, max_starts, period_ms)
    values (set_rate_limit.queue::shoal.name, null, set_rate_limit.max_starts,
            set_rate_limit.period_ms)
    on conflict (queue) where key is null
    do update set max_starts = excluded.max_starts, period_ms = excluded.period_ms,
                  updated_at = now();
  else
    insert into shoal.rate_limits (queue, key, max_starts, period_ms)
    values (set_rate_limit.queue::shoal.name, set_rate_limit.key, set_rate_limit.max_starts,
            set_rate_limit.period_ms)
    on conflict (queue, key) where key is not null
    do update set max_starts = excluded.max_starts, period_ms = excluded.period_ms,
                  updated_at = now();
  end if;
  perform shoal.notify_jobs(array[set_rate_limit.queue], null);
end
$$;

-- Remove a rate limit (the queue's default with a null key, or one key's). Returns false
-- when there was none.
create or replace function shoal.clear_rate_limit(queue text, key text default null)
returns boolean
language plpgsql volatile as $$
begin
  delete from shoal.rate_limits l
  where l.queue = clear_rate_limit.queue and l.key is not distinct from clear_rate_limit.key;
  if not found then
    return false;
  end if;
  perform shoal.notify_jobs(array[clear_rate_limit.queue], null);
  return true;
end
$$;

-- Hold a key: no job of it is claimed for the next for_ms milliseconds (a hold already
-- reaching further stays; 0 lifts the hold). Jobs of the key already running go on. The
-- queue's consumers hear when it ends (a wake for that instant). Returns the end.
create or replace function shoal.hold_key(queue text, key text, for_ms bigint)
returns timestamptz
language plpgsql volatile as $$
#variable_conflict use_column
declare
  until timestamptz;
begin
  if hold_key.for_ms is null or hold_key.for_ms not between 0 and 86400000 then
    raise exception 'Cannot hold a key: for_ms must be an integer from 0 to 86400000 (a day), not %',
      coalesce(hold_key.for_ms::text, 'null') using errcode = '22023';
  end if;
  if hold_key.key is null or length(hold_key.key) > 256 then
    raise exception 'Cannot hold a key: the key must be a string of at most 256 characters'
      using errcode = '22023';
  end if;
  until := now() + hold_key.for_ms * interval '1 ms';
  if hold_key.for_ms = 0 then
    -- Lift a hold: a key never held has nothing to lift.
    update shoal.flow_keys k set held_until = null
    where k.queue = hold_key.queue and k.key = hold_key.key and k.held_until is not null;
    perform shoal.notify_jobs(array[hold_key.queue], null);
    return now();
  end if;
  insert into shoal.flow_keys as k (queue, key, held_until)
  values (hold_key.queue::shoal.name, hold_key.key, until)
  on conflict (queue, key) do update
  set held_until = greatest(k.held_until, excluded.held_until)
  returning k.held_until into until;
  perform shoal.notify_jobs(array[hold_key.queue], array[until]);
  return until;
end
$$;

-- How many jobs of each (queue, key) a claim may take now (the claim, claim.sql "Flow
-- control", calls it for each key it meets; element i of both arrays is one key). Only keys
-- under flow control come back: with a concurrency limit (its free slots), a rate limit
-- (the whole tokens in its bucket; tokens returns the bucket's fill now, for
-- shoal.spend_tokens) or a hold (none). Each is locked first (shoal.flow_lock): a key
-- another claim holds gets none. The slots and buckets are read by a statement after the
-- locks, whose snapshot sees every claim committed before they were free (the slot rule).
drop function if exists shoal.spend_tokens(text[], text[], double precision[], integer[]);
drop function if exists shoal.flow_allow(text[], text[]);
create or replace function shoal.flow_allow(queues text[], keys text[])
returns table (queue text, key text, allowed integer, tokens double precision,
               waiting boolean)
language plpgsql volatile
-- Plan once per session: left to choose, Postgres planned the count again on every call
-- (0.5 ms of a 0.6 ms call).
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
  qs text[];
  ks text[];
  locks boolean[];
begin
  select array_agg(x.queue), array_agg(x.key), array_agg(shoal.flow_lock(x.queue, x.key))
  into qs, ks, locks
  from unnest(queues, keys) as x(queue, key)
  where exists (select 1 from shoal.concurrency_limits l
                where l.queue = x.queue and (l.key = x.key or l.key is null))
     or exists (select 1 from shoal.rate_limits l
                where l.queue = x.queue and (l.key = x.key or l.key is null))
     or exists (select 1 from shoal.flow_keys k
                where k.queue = x.queue and k.key = x.key and k.held_until > now());
  if qs is null then
    return;
  end if;
  -- One statement for every key (a function call per key cost 0.3 ms a claim of one key).
  return query
    with x as (
      select x.* from unnest(qs, ks, locks) as x(queue, key, locked)
    ),
    held as (
      select h.queue, h.key, count(*) as n
      from shoal.held_slots h
      join x on h.queue = x.queue and h.key = x.key
      group by 1, 2
    )
    select x.queue, x.key,
           case when not x.locked or coalesce(k.held_until > now(), false) then 0
                else greatest(least(
                       coalesce(coalesce(lk.max_running, ld.max_running) - coalesce(h.n, 0),
                                1000000000),
                       coalesce(floor(b.tokens)::bigint, 1000000000)), 0)::integer
           end,
           b.tokens,
           coalesce(k.waiting, false)
    from x
    left join held h on h.queue = x.queue and h.key = x.key
    left join shoal.flow_keys k on k.queue = x.queue and k.key = x.key
    left join shoal.concurrency_limits lk on lk.queue = x.queue and lk.key = x.key
    left join shoal.concurrency_limits ld on ld.queue = x.queue and ld.key is null
    left join lateral (
      select least(r.max_starts::double precision,
                   coalesce(k.tokens, r.max_starts)
                   + extract(epoch from now() - k.refilled_at) * 1000 * r.max_starts / r.period_ms)
             as tokens
      from shoal.rate_limits r
      where r.queue = x.queue and (r.key = x.key or r.key is null)
      order by r.key nulls last
      limit 1
    ) b on true;
end
$$;

-- A claim took taken[i] jobs of key i, whose bucket held tokens[i] (shoal.flow_allow; null:
-- no rate limit), and held held[i] of its jobs back: write the buckets back; record which
-- keys have jobs waiting for a slot (waiting[i]: what flow_allow read), so that a freed slot
-- of theirs wakes the queue (shoal.free_slots) and one of a key that never fills does not;
-- and when a bucket is empty, wake the queue's consumers for the instant its next token is
-- due (the jobs it holds back start then, not at a poll). A key becomes waiting only at the
-- end of the claim that first finds it full: a slot freed meanwhile wakes nobody, and the
-- job waits for a poll, once per key that fills.
create or replace function shoal.flow_claimed(queues text[], keys text[],
                                              tokens double precision[], taken integer[],
                                              held integer[], waiting boolean[])
returns void
language plpgsql volatile as $$
begin
  insert into shoal.flow_keys as k (queue, key, tokens, refilled_at, waiting)
  select x.queue, x.key, case when x.tokens is not null then x.tokens - x.taken end, now(),
         x.held > 0
  from unnest(queues, keys, tokens, taken, held, waiting)
    as x(queue, key, tokens, taken, held, waiting)
  where (x.tokens is not null and x.taken > 0) or (x.held > 0) <> x.waiting
  on conflict (queue, key) do update
  set tokens = case when excluded.tokens is not null then excluded.tokens else k.tokens end,
      refilled_at = case when excluded.tokens is not null then now() else k.refilled_at end,
      waiting = excluded.waiting;

  perform shoal.notify_jobs(array_agg(x.queue), array_agg(
            now() + (1 - (x.tokens - x.taken)) * r.period_ms / r.max_starts * interval '1 ms'))
  from unnest(queues, keys, tokens, taken, held) as x(queue, key, tokens, taken, held)
  cross join lateral (
    select l.max_starts, l.period_ms from shoal.rate_limits l
    where l.queue = x.queue and (l.key = x.key or l.key is null)
    order by l.key nulls last limit 1
  ) r
  where x.tokens is not null and x.tokens - x.taken < 1 and x.held > 0
  having count(*) > 0;
end
$$;

-- Flow control's leftovers (the reaper's housekeeping; acks, failures and hand-backs remove
-- their own slot rows at once), max_rows of each kind at most: slot rows that hold nothing,
-- their job gone or claimed again (a row of a job still claimed is kept even past its
-- deadline: a worker that resumes and extends it still holds its slot); and what a key
-- remembers once it says nothing (no hold in effect, no jobs waiting, a bucket untouched for
-- longer than any period, so full again). Returns how many rows went.
create or replace function shoal.prune_slots(max_rows integer default 10000) returns integer
language sql volatile as $$
  with stale as (
    select s.job_id from shoal.concurrency_slots s
    where not exists (select 1 from shoal.jobs j
                      where j.id = s.job_id and j.token = s.token and j.locked_by is not null)
    limit max_rows
  ),
  gone as (
    delete from shoal.concurrency_slots s using stale x where s.job_id = x.job_id returning 1
  ),
  quiet as (
    select k.queue, k.key from shoal.flow_keys k
    where (k.held_until is null or k.held_until < now()) and not k.waiting
      and k.refilled_at < now() - interval '1 day'
    limit max_rows
  ),
  forgotten as (
    delete from shoal.flow_keys k using quiet q
    where k.queue = q.queue and k.key = q.key
      and (k.held_until is null or k.held_until < now()) and not k.waiting
    returning 1
  )
  select ((select count(*) from gone) + (select count(*) from forgotten))::integer
$$;

-- Whether shoal.prune_slots has anything to remove: the reaper's cheap check.
create or replace function shoal.has_flow_leftovers() returns boolean
language sql stable as $$
  select exists (select 1 from shoal.concurrency_slots s
                 where not exists (select 1 from shoal.jobs j
                                   where j.id = s.job_id and j.token = s.token
                                     and j.locked_by is not null))
      or exists (select 1 from shoal.flow_keys k
                 where (k.held_until is null or k.held_until < now()) and not k.waiting
                   and k.refilled_at < now() - interval '1 day')
$$;

-- A fairness key's weight on a queue (1 to 1000; 1 is every key's without a row): under
-- contention the key starts `weight` jobs for each job of a key of weight 1. Applies to jobs
-- enqueued from now on (a job's place in the claim order is stamped at enqueue).
create or replace function shoal.set_fairness_weight(queue text, key text, weight integer)
returns void
language plpgsql volatile as $$
#variable_conflict use_column
begin
  if set_fairness_weight.weight is null or set_fairness_weight.weight not between 1 and 1000 then
    raise exception 'Cannot set a fairness weight: weight must be an integer from 1 to 1000, not %',
      coalesce(set_fairness_weight.weight::text, 'null') using errcode = '22023';
  end if;
  if set_fairness_weight.key is null or length(set_fairness_weight.key) > 256 then
    raise exception 'Cannot set a fairness weight: the key must be a string of at most 256 characters'
      using errcode = '22023';
  end if;
  insert into shoal.fairness_weights (queue, key, weight)
  values (set_fairness_weight.queue::shoal.name, set_fairness_weight.key,
          set_fairness_weight.weight)
  on conflict (queue, key) do update set weight = excluded.weight, updated_at = now();
end
$$;

-- Back to weight 1. Returns false when the key had no weight of its own.
create or replace function shoal.clear_fairness_weight(queue text, key text) returns boolean
language plpgsql volatile as $$
begin
  delete from shoal.fairness_weights w
  where w.queue = clear_fairness_weight.queue and w.key = clear_fairness_weight.key;
  return found;
end
$$;
