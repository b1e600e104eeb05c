-- shoal functions: flow control (the tables: sql/015_flow.sql).
--
-- Owns pausing queues and, per (queue, key), concurrency limits, rate limits and holds (a
-- key is a job's flow key: its concurrency key when one was given at enqueue, else its
-- fairness key) and fairness weights (by fairness key):
--   shoal.pause_queue, shoal.resume_queue          a queue's pause (claim.sql skips it)
--   shoal.set_concurrency_limit,                   at most N running per key: per queue
--   shoal.clear_concurrency_limit                  (every key) or per key, of a task's own
--   shoal.concurrency_limit                        the limit that applies to a key
--   shoal.flow_scope                               whether a task is counted apart
--   shoal.flow_adopt, shoal.flow_forget_task       slot rows for jobs claimed before
--   shoal.set_rate_limit, shoal.clear_rate_limit   at most N claims per period per key
--   shoal.hold_key                                 no claim of a key's jobs for a while
--   shoal.set_fairness_weight,                     a key's share under contention (the
--   shoal.clear_fairness_weight                    stamping rule in queue.sql reads it)
--   shoal.flow_allow                               how many of a key's jobs a claim may take
--   shoal.flow_claimed                             what a claim took and held back
--   shoal.flow_lock, shoal.flow_lock_id            the claim's lock on a key
--   shoal.flow_rules_lock, shoal.flow_rules_shared a queue's rules: changed, or claimed by
--   shoal.flow_rules_refresh                       a queue's rules in one row (THE SIMPLE RULES)
--   shoal.scoped_tasks                             the tasks with limits of their own
--   shoal.held_slots (a view), shoal.slots_held,   the slot rule (below); a key's slots
--   shoal.default_slots_held                       held; those of keys under a default
--   shoal.slots_freed                              a freed slot wakes the held-back
--   (shoal.free_slots)                             (its revision-5 name, for old binaries)
--   shoal.prune_slots, shoal.has_flow_leftovers    the reaper removes what is left
--
-- THE TASK RULE. A row of shoal.concurrency_limits or shoal.rate_limits names a task, or
-- none (task ''). A task named by some row of a queue has limits of its own there: its
-- jobs on that queue are counted apart, per key, in the bucket (queue, key, task), and only
-- the rows naming it apply to them (its default, key null, and its keys' own); the rows
-- naming no task do not. Every other job counts in (queue, key, ''). A bucket is what a
-- concurrency limit, a rate limit and a hold are about; below, "a key" is a bucket. The task
-- of a job's bucket is shoal.flow_scope(queue, task), the claim's scoped_tasks.
--
-- THE RULES LOCK. Which bucket a job counts in, and whether it counts at all, is read by a
-- claim once; a change of a queue's limits must not land between that read and the claim's
-- commit (the claim would count its jobs in buckets no later claim reads, or in none). So a
-- claim of a limited queue holds the queue's rules lock shared from its first statement to
-- its commit (shoal.flow_rules_shared: refused, the queue is left out of that claim, as if
-- paused for a moment) and reads the rules in a later statement; every function that sets
-- or clears a limit takes it exclusive first (shoal.flow_rules_lock), waiting for the claims
-- in flight to commit. Then no claim runs while the rules change, and what changes them
-- sees every job claimed under the old ones (shoal.flow_adopt). (A queue's first limit is
-- the exception: a claim that found the queue unlimited took no lock.)
--
-- THE SIMPLE RULES. A queue whose only limit is its default concurrency limit (task '', key
-- null: no key's own, no task's own, no rate limit) has simple rules: every job of it counts
-- in (queue, key, '') under that limit. shoal.flow_rules holds a row per queue with any
-- limit, naming the limit when the rules are simple (simple_max), written by every function
-- that sets or clears a limit, under the rules lock exclusive (shoal.flow_rules_refresh). A
-- claim's check of its picks reads that row, in a statement after it took the rules lock
-- shared (so the row is the rules it claims under), instead of the limits themselves.
--
-- THE SLOT RULE. A key's running jobs are the entries of its shoal.concurrency_slots rows
-- (one row per claim that took jobs of it) whose job still carries the token it was
-- claimed with, is claimed and is within its deadline: a job acked, retried, handed back,
-- dead-lettered, cancelled or past its deadline holds no slot, whoever removes its entry
-- and when. Only the claim (claim.sql, "Flow control") adds slots, and only while it holds
-- the key's lock (shoal.flow_lock): it takes the lock, then in a later statement (whose
-- snapshot sees every claim committed before the lock was free) reads what the key holds,
-- and claims at most the limit less that many of the key's jobs. Claims never wait for a
-- key: one held by another claim counts as full for this one (no waits, no deadlocks; that
-- claim takes the key's free slots).
--
-- THE BOUND. Counting a key's slots probes each entry's job; a limit that never binds need
-- not. A key's bound (flow_keys.slots_bound) is never less than the entries its slot rows
-- name: each claim adds what it took, under the key's lock; each count sets it to the
-- entries left after removing the rows whose jobs all ended, or, when that leaves no room
-- to spare the next claim a count, to null; null (unknown: a key never counted, one near
-- its limit, or one whose rows were added outside a claim) stays null until a count that
-- leaves room, and costs no write per claim. A claim counts only when the
-- bound is unknown, could reach the limit with what the claim may take, or has grown by
-- 10,000 since the last count (so a key's dead rows are removed by its own claims even
-- where no reaper runs: then after writing its own slot rows, its picks standing, and not
-- the long way, which cost a claim of 500 jobs 3 µs a job on average, against 0.6 for the
-- count alone). Otherwise its slots held are at most the bound, and the limit less the
-- bound is what it may take. (shoal.flow_count counts.)

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

-- A task name given to a flow control function: null and '' are none (''), anything else
-- must be a task name (lib/names.ts NAME_PATTERN). `what` starts the error: 'Cannot set a
-- rate limit'.
create or replace function shoal.flow_task(task text, what text) returns text
language plpgsql immutable as $$
begin
  if task is null or task = '' then
    return '';
  end if;
  if task !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$' then
    raise exception '%: task must be 1 to 128 letters, digits or _.:- starting with a letter or digit',
      what using errcode = '22023';
  end if;
  return task;
end
$$;

-- The task of a job's bucket in a claim, which read the tasks with limits of their own on
-- its queues ('queue\ntask' each, scoped) once: THE TASK RULE.
create or replace function shoal.bucket_task(queue text, task text, scoped text[]) returns text
language sql immutable as $$
  select case when cardinality($3) > 0 and $1 || E'\n' || $2 = any($3) then $2 else '' end
$$;

-- THE RULES LOCK of a queue (above): its own space of advisory locks (class 1936224621).
create or replace function shoal.flow_rules_shared(queue text) returns boolean
language sql volatile as $$
  select pg_try_advisory_xact_lock_shared(1936224621, hashtext($1))
$$;

-- The exclusive lock waits at most 5 s: while it waits, new claims of the queue are refused
-- (they queue behind it), so a claim held open in a long transaction must not stall the
-- queue for longer than that. The caller's lock_timeout is restored after.
create or replace function shoal.flow_rules_lock(queue text) returns void
language plpgsql volatile as $$
declare
  before text := current_setting('lock_timeout');
begin
  perform set_config('lock_timeout', '5s', true);
  perform pg_advisory_xact_lock(1936224621, hashtext(queue));
  perform set_config('lock_timeout', before, true);
exception when lock_not_available then
  raise exception 'Cannot change the limits of queue "%": a claim of it stayed in flight for 5 s (a claim inside a long transaction?)',
    queue using errcode = '55P03';
end
$$;

-- The tasks with limits of their own (THE TASK RULE): a row per limit naming a task, tagged
-- 'queue\ntask' (a task named by several limits appears as often). A view, so a claim's
-- statement reads it in its own plan (a function call is a statement of its own: 11 µs a
-- call in a server-side loop). Each branch matches one partial index (a claim plans with
-- sequential scans off: a scan the indexes cannot serve would cost it a parallel plan), and
-- says `task > ''` (the same rows: '' sorts first) so that the index's range starts past the
-- rows naming no task: a queue's thousands of keys' own limits are not read on every claim.
create or replace view shoal.scoped_task_tags as
  select l.queue::text as queue, l.queue || E'\n' || l.task as tag
  from shoal.concurrency_limits l where l.key is null and l.task > ''
  union all
  select l.queue::text, l.queue || E'\n' || l.task
  from shoal.concurrency_limits l where l.key is not null and l.task > ''
  union all
  select l.queue::text, l.queue || E'\n' || l.task
  from shoal.rate_limits l where l.key is null and l.task > ''
  union all
  select l.queue::text, l.queue || E'\n' || l.task
  from shoal.rate_limits l where l.key is not null and l.task > '';

-- The tasks with limits of their own on these queues, 'queue\ntask' each (read by a claim
-- holding the queues' rules locks). PL/pgSQL, whose plan is kept for the session: as a SQL
-- function its query was planned again on every call (150 µs of a claim of 10 under a
-- limit, tests/scratch probe of claim + ack in a loop).
create or replace function shoal.scoped_tasks(queues text[]) returns text[]
language plpgsql stable as $$
begin
  return (select coalesce(array_agg(distinct t.tag), '{}')
          from shoal.scoped_task_tags t where t.queue = any(queues));
end
$$;

-- The task of the bucket a job of `task` on `queue` counts in (THE TASK RULE): the task when
-- a limit of the queue names it, else ''. (The claim reads scoped_tasks once for all its
-- jobs; this is the same rule for one.)
create or replace function shoal.flow_scope(queue text, task text) returns text
language sql stable as $$
  select shoal.bucket_task($1, coalesce($2, ''), shoal.scoped_tasks(array[$1]))
$$;

-- The claim's lock on a bucket (queue, key, task), held to the end of its transaction; false
-- when another transaction holds it. A transaction-level advisory lock with two int4 keys
-- (its own space: the migration lock's single bigint key cannot meet it); buckets whose
-- hashes collide share a lock, which only makes one of them count as full for a moment.
-- shoal.flow_lock_id is its second key; a bucket of no task ('') keeps the id it had before
-- tasks had limits.
drop function if exists shoal.flow_lock(text, text);
drop function if exists shoal.flow_lock_id(text, text);
create or replace function shoal.flow_lock_id(queue text, key text, task text) returns integer
language sql immutable as $$
  select hashtext($1 || E'\n' || $2 || case when $3 = '' then '' else E'\n\n' || $3 end)
$$;

create or replace function shoal.flow_lock(queue text, key text, task text) returns boolean
language sql volatile as $$
  select pg_try_advisory_xact_lock(1936224620, shoal.flow_lock_id($1, $2, $3))
$$;

-- The slot entries that hold a slot now: the slot rule above, written once.
create or replace view shoal.held_slots as
  select u.job_id, s.queue, s.key, s.task
  from shoal.concurrency_slots s
  cross join lateral unnest(s.job_ids, s.tokens) as u(job_id, token)
  join shoal.jobs j on j.id = u.job_id
  where j.token = u.token and j.locked_by is not null and j.run_at > now();

-- Running jobs the limits count and no slot row names: jobs claimed before a limit covered
-- them (the queue's first limit, a task's first, a key's), or whose bucket changed when a
-- task gained or lost limits of its own. Each gets an entry in a slot row of its bucket now
-- (THE TASK RULE, as the tables say in this transaction), so it counts at once. With a key,
-- only that key's buckets. Its caller holds the queue's rules lock (no claim of the queue
-- runs meanwhile); the bounds become unknown (rows added outside a claim). A job whose bucket
-- changed keeps its entry in the old one too, until it ends: the change errs toward fewer
-- running jobs. Reads the queue's claimed jobs once: on a queue of millions, seconds.
create or replace function shoal.flow_adopt(queue text, key text default null)
returns void
language plpgsql volatile as $$
#variable_conflict use_column
begin
  insert into shoal.concurrency_slots (queue, key, task, job_ids, tokens)
  select j.queue, j.key, j.task, array_agg(j.id), array_agg(j.token)
  from (select j.id, j.queue, coalesce(j.concurrency_key, j.fairness_key) as key,
               shoal.flow_scope(j.queue, j.task) as task, j.token
        from shoal.jobs j
        where j.queue = flow_adopt.queue and j.locked_by is not null
          and j.run_at > now()) j
  where (flow_adopt.key is null or j.key = flow_adopt.key)
    and not exists (select 1 from shoal.concurrency_slots s
                    cross join lateral unnest(s.job_ids, s.tokens) as u(id, token)
                    where s.queue = j.queue and s.key = j.key and s.task = j.task
                      and u.id = j.id and u.token = j.token)
  group by j.queue, j.key, j.task;
  -- Rows added outside a claim: the bounds are unknown until the buckets' next counts.
  update shoal.flow_keys k set slots_bound = null
  where k.queue = flow_adopt.queue
    and (flow_adopt.key is null or k.key = flow_adopt.key)
    and k.slots_bound is not null;
end
$$;

-- A task left with no limit of its own on a queue (THE TASK RULE): what its buckets remember
-- goes (holds, token buckets, slot rows: no limit reads them now, and a hold of them could
-- not be lifted by name), and its running jobs get entries in the queue's buckets. Its caller
-- holds the queue's rules lock.
create or replace function shoal.flow_forget_task(queue text, task text) returns void
language plpgsql volatile as $$
begin
  delete from shoal.flow_keys k where k.queue = $1 and k.task = $2;
  delete from shoal.concurrency_slots s where s.queue = $1 and s.task = $2;
  perform shoal.flow_adopt($1, null);
end
$$;

-- A queue's row of shoal.flow_rules (THE SIMPLE RULES), from its limits as they stand: none
-- when it has no limit. Its caller holds the queue's rules lock exclusive.
create or replace function shoal.flow_rules_refresh(queue text) returns void
language sql volatile as $$
  with rules as (
    select exists (select 1 from shoal.concurrency_limits l where l.queue = $1)
           or exists (select 1 from shoal.rate_limits r where r.queue = $1) as limited,
           case when not exists (select 1 from shoal.rate_limits r where r.queue = $1)
                 and not exists (select 1 from shoal.concurrency_limits l
                                 where l.queue = $1 and (l.key is not null or l.task <> ''))
                then (select l.max_running from shoal.concurrency_limits l
                      where l.queue = $1 and l.task = '' and l.key is null)
           end as simple_max
  ),
  gone as (
    delete from shoal.flow_rules f
    where f.queue = $1 and not (select r.limited from rules r)
  )
  insert into shoal.flow_rules as f (queue, simple_max)
  select $1, r.simple_max from rules r where r.limited
  on conflict (queue) do update set simple_max = excluded.simple_max, updated_at = now()
$$;

-- At most max_running jobs of the queue run at once per key: with a null key, for every key
-- of the queue (its default); with a key, for that key alone (over the default); with a task,
-- for that task's jobs, counted apart (THE TASK RULE). Takes effect at the next claim; a
-- raised limit wakes the queue's consumers. Jobs claimed before the limit covered them count
-- at once (shoal.flow_adopt).
drop function if exists shoal.set_concurrency_limit(text, integer, text);
create or replace function shoal.set_concurrency_limit(queue text, max_running integer,
                                                       key text default null,
                                                       task text default null)
returns void
language plpgsql volatile as $$
#variable_conflict use_column
declare
  t text := shoal.flow_task(set_concurrency_limit.task, 'Cannot set a concurrency limit');
  -- Whether the task had limits of its own already (its jobs in buckets of their own).
  was_scoped boolean;
begin
  if set_concurrency_limit.max_running is null or max_running not between 0 and 1000000 then
    raise exception 'Cannot set a concurrency limit: max_running must be an integer from 0 to 1000000, not %',
      coalesce(set_concurrency_limit.max_running::text, 'null') using errcode = '22023';
  end if;
  if set_concurrency_limit.key is not null and length(set_concurrency_limit.key) > 256 then
    raise exception 'Cannot set a concurrency limit: a key has at most 256 characters'
      using errcode = '22023';
  end if;
  perform shoal.flow_rules_lock(set_concurrency_limit.queue);
  was_scoped := t <> '' and shoal.flow_scope(set_concurrency_limit.queue, t) <> '';
  if set_concurrency_limit.key is null then
    insert into shoal.concurrency_limits as l (queue, task, key, max_running)
    values (set_concurrency_limit.queue::shoal.name, t, null, set_concurrency_limit.max_running)
    on conflict (queue, task) where key is null
    do update set max_running = excluded.max_running, updated_at = now();
  else
    insert into shoal.concurrency_limits as l (queue, task, key, max_running)
    values (set_concurrency_limit.queue::shoal.name, t, set_concurrency_limit.key,
            set_concurrency_limit.max_running)
    on conflict (queue, task, key) where key is not null
    do update set max_running = excluded.max_running, updated_at = now();
  end if;
  perform shoal.flow_rules_refresh(set_concurrency_limit.queue);
  -- A task's first limit moves its jobs to buckets of their own: all of the queue's keys.
  perform shoal.flow_adopt(set_concurrency_limit.queue,
                           case when t = '' or was_scoped then set_concurrency_limit.key end);
  perform shoal.notify_jobs(array[set_concurrency_limit.queue], null);
end
$$;

-- Remove a limit (a queue's default with a null key, or one key's; of a task's own with a
-- task). Returns false when there was none. Wakes the queue's consumers: jobs held back may
-- run now. A task left with no limit of its own counts in the queue's buckets again
-- (shoal.flow_forget_task).
drop function if exists shoal.clear_concurrency_limit(text, text);
create or replace function shoal.clear_concurrency_limit(queue text, key text default null,
                                                         task text default null)
returns boolean
language plpgsql volatile as $$
declare
  t text := shoal.flow_task(clear_concurrency_limit.task, 'Cannot clear a concurrency limit');
begin
  perform shoal.flow_rules_lock(clear_concurrency_limit.queue);
  delete from shoal.concurrency_limits l
  where l.queue = clear_concurrency_limit.queue and l.task = t
    and l.key is not distinct from clear_concurrency_limit.key;
  if not found then
    return false;
  end if;
  perform shoal.flow_rules_refresh(clear_concurrency_limit.queue);
  if t <> '' and shoal.flow_scope(clear_concurrency_limit.queue, t) = '' then
    perform shoal.flow_forget_task(clear_concurrency_limit.queue, t);
  end if;
  perform shoal.notify_jobs(array[clear_concurrency_limit.queue], null);
  return true;
end
$$;

-- The limit on the running jobs of a key in a queue (of a task's jobs, with a task: THE TASK
-- RULE): the key's own, else the default; null when neither is set.
drop function if exists shoal.concurrency_limit(text, text);
create or replace function shoal.concurrency_limit(queue text, key text, task text default null)
returns integer
language sql stable as $$
  select coalesce(
    (select l.max_running from shoal.concurrency_limits l
     where l.queue = $1 and l.task = shoal.flow_scope($1, coalesce($3, '')) and l.key = $2),
    (select l.max_running from shoal.concurrency_limits l
     where l.queue = $1 and l.task = shoal.flow_scope($1, coalesce($3, '')) and l.key is null))
$$;

-- The slots a bucket holds.
drop function if exists shoal.slots_held(text, text);
create or replace function shoal.slots_held(queue text, key text, task text default '')
returns integer
language sql stable as $$
  select count(*)::integer from shoal.held_slots h
  where h.queue = $1 and h.key = $2 and h.task = $3
$$;

-- The slots held by a queue's keys (of a task's own buckets, with a task) that have no
-- concurrency limit of their own (those the default counts), by the slot rule.
drop function if exists shoal.default_slots_held(text);
create or replace function shoal.default_slots_held(queue text, task text default '')
returns integer
language sql stable as $$
  select count(*)::integer
  from shoal.held_slots h
  where h.queue = $1 and h.task = $2
    and not exists (select 1 from shoal.concurrency_limits o
                    where o.queue = h.queue and o.task = h.task and o.key = h.key)
$$;

-- Claims of jobs of these (queue, key) pairs ended (acked, retried, handed back,
-- dead-lettered): their slots are free by the slot rule, whoever removes their entries.
-- Wake the consumers of each queue where such a key has jobs waiting for a slot
-- (flow_keys.waiting), so a job held back by the limit starts now instead of at a
-- consumer's poll; a key that never fills wakes nobody. The buckets of every task with the
-- key are asked (the callers know a job's key, not its bucket): at worst a wake too many.
-- Called in the statement that ends them. Returns how many queues were woken.
create or replace function shoal.slots_freed(queues text[], keys text[]) returns integer
language plpgsql volatile as $$
declare
  woken text[];
begin
  select array_agg(distinct k.queue) into woken
  from (select distinct u.queue, u.key from unnest(queues, keys) as u(queue, key)) u
  join shoal.flow_keys k on k.queue = u.queue and k.key = u.key
  where k.waiting;
  if woken is not null then
    perform shoal.notify_jobs(woken, null);
  end if;
  return coalesce(cardinality(woken), 0);
end
$$;

-- The revision-5 binaries' call, kept for a rolling deploy: it names job ids, whose slot
-- entries it cannot find, so it wakes every queue with keys waiting.
create or replace function shoal.free_slots(ids bigint[]) returns integer
language sql volatile as $$
  select coalesce(shoal.slots_freed(array_agg(k.queue), array_agg(k.key)), 0)
  from shoal.flow_keys k where k.waiting
$$;

-- At most max_starts claims per period_ms per key (a token bucket: the rate on average, a
-- burst of up to max_starts after a quiet spell): with a null key for every key of the
-- queue, with a key for that key alone; with a task, for that task's jobs, counted apart
-- (THE TASK RULE). Takes effect at the next claim.
drop function if exists shoal.set_rate_limit(text, integer, integer, text);
create or replace function shoal.set_rate_limit(queue text, max_starts integer,
                                                period_ms integer, key text default null,
                                                task text default null)
returns void
language plpgsql volatile as $$
#variable_conflict use_column
declare
  t text := shoal.flow_task(set_rate_limit.task, 'Cannot set a rate limit');
  scoped boolean;
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
  perform shoal.flow_rules_lock(set_rate_limit.queue);
  scoped := t <> '' and shoal.flow_scope(set_rate_limit.queue, t) <> '';
  if set_rate_limit.key is null then
    insert into shoal.rate_limits (queue, task, key, max_starts, period_ms)
    values (set_rate_limit.queue::shoal.name, t, null, set_rate_limit.max_starts,
            set_rate_limit.period_ms)
    on conflict (queue, task) where key is null
    do update set max_starts = excluded.max_starts, period_ms = excluded.period_ms,
                  updated_at = now();
  else
    insert into shoal.rate_limits (queue, task, key, max_starts, period_ms)
    values (set_rate_limit.queue::shoal.name, t, set_rate_limit.key, set_rate_limit.max_starts,
            set_rate_limit.period_ms)
    on conflict (queue, task, key) where key is not null
    do update set max_starts = excluded.max_starts, period_ms = excluded.period_ms,
                  updated_at = now();
  end if;
  perform shoal.flow_rules_refresh(set_rate_limit.queue);
  if t <> '' and not scoped then
    -- The task's first limit: its running jobs leave the queue's buckets.
    perform shoal.flow_adopt(set_rate_limit.queue, null);
  end if;
  perform shoal.notify_jobs(array[set_rate_limit.queue], null);
end
$$;

-- Remove a rate limit (the queue's default with a null key, or one key's; of a task's own
-- with a task). Returns false when there was none. A task left with no limit of its own
-- counts in the queue's buckets again (shoal.flow_forget_task).
drop function if exists shoal.clear_rate_limit(text, text);
create or replace function shoal.clear_rate_limit(queue text, key text default null,
                                                  task text default null)
returns boolean
language plpgsql volatile as $$
declare
  t text := shoal.flow_task(clear_rate_limit.task, 'Cannot clear a rate limit');
begin
  perform shoal.flow_rules_lock(clear_rate_limit.queue);
  delete from shoal.rate_limits l
  where l.queue = clear_rate_limit.queue and l.task = t
    and l.key is not distinct from clear_rate_limit.key;
  if not found then
    return false;
  end if;
  perform shoal.flow_rules_refresh(clear_rate_limit.queue);
  if t <> '' and shoal.flow_scope(clear_rate_limit.queue, t) = '' then
    perform shoal.flow_forget_task(clear_rate_limit.queue, t);
  end if;
  perform shoal.notify_jobs(array[clear_rate_limit.queue], null);
  return true;
end
$$;

-- Hold a key: no job of it is claimed for the next for_ms milliseconds (a hold already
-- reaching further stays; 0 lifts the hold). Jobs of the key already running go on. The
-- queue's consumers hear when it ends (a wake for that instant). With a task, the bucket
-- that task's jobs of the key count in (THE TASK RULE: its own when it has limits of its
-- own, else the queue's). Returns the end.
drop function if exists shoal.hold_key(text, text, bigint);
create or replace function shoal.hold_key(queue text, key text, for_ms bigint,
                                          task text default null)
returns timestamptz
language plpgsql volatile as $$
#variable_conflict use_column
declare
  until timestamptz;
  t text := shoal.flow_scope(hold_key.queue, shoal.flow_task(hold_key.task, 'Cannot hold a key'));
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
    where k.queue = hold_key.queue and k.key = hold_key.key and k.task = t
      and k.held_until is not null;
    perform shoal.notify_jobs(array[hold_key.queue], null);
    return now();
  end if;
  insert into shoal.flow_keys as k (queue, key, task, held_until)
  values (hold_key.queue::shoal.name, hold_key.key, t, until)
  on conflict (queue, key, task) do update
  set held_until = greatest(k.held_until, excluded.held_until)
  returning k.held_until into until;
  perform shoal.notify_jobs(array[hold_key.queue], array[until]);
  return until;
end
$$;

-- Count the slots of the buckets i where counted[i] (THE BOUND), each locked by the caller:
-- each slot row's entries still claimed and those holding a slot; a row none of whose jobs
-- is still claimed holds nothing now or later and goes (one whose job is past its deadline
-- but still claimed stays: its worker may extend it). A bucket's bound is then the entries
-- its rows name, kept only where that leaves room for `want` more under its limit
-- (limits[i]; stored[i]: its bound before). Returns, for each counted bucket i, the slots
-- it holds and its bound (null: unknown). One statement for every bucket.
create or replace function shoal.flow_count(queues text[], keys text[], tasks text[],
                                            counted boolean[], limits integer[],
                                            stored integer[], want integer)
returns table (n bigint, held integer, bound integer)
language plpgsql volatile
set plan_cache_mode = force_generic_plan
as $$
begin
  return query
    with counting as (
      select x.queue, x.key, x.task, x.n, x.max_running, x.bound as stored
      from unnest(queues, keys, tasks, counted, limits, stored) with ordinality
        as x(queue, key, task, counted, max_running, bound, n)
      where x.counted
    ),
    slot_rows as (
      select s.ctid as row_id, s.queue, s.key, s.task, c.n, cardinality(s.job_ids) as entries,
             e.claimed, e.held
      from counting c
      join shoal.concurrency_slots s on s.queue = c.queue and s.key = c.key and s.task = c.task
      cross join lateral (
        select count(*) as claimed, count(*) filter (where j.run_at > now()) as held
        from unnest(s.job_ids, s.tokens) as u(id, token)
        join shoal.jobs j on j.id = u.id and j.token = u.token and j.locked_by is not null
      ) e
    ),
    emptied as (
      delete from shoal.concurrency_slots s using slot_rows r
      where s.queue = r.queue and s.key = r.key and s.task = r.task and s.ctid = r.row_id
        and r.claimed = 0
    ),
    summed as (
      select c.queue, c.key, c.task, c.n, c.stored, coalesce(sum(r.held), 0)::integer as held,
             coalesce(sum(r.entries) filter (where r.claimed > 0), 0)::integer as entries,
             coalesce(sum(r.entries) filter (where r.claimed > 0), 0) + want
               <= c.max_running as roomy
      from counting c
      left join slot_rows r on r.n = c.n
      group by c.queue, c.key, c.task, c.n, c.stored, c.max_running
    ),
    -- A bound is kept only where it spares the next claim a count. A key near its limit is
    -- counted by every claim anyway: its bound is made unknown once, and then nothing is
    -- written for it (a limit that binds writes no row per claim).
    recorded as (
      insert into shoal.flow_keys as k (queue, key, task, slots_bound, slots_counted)
      select c.queue, c.key, c.task, c.entries, c.entries from summed c where c.roomy
      on conflict (queue, key, task) do update
      set slots_bound = excluded.slots_bound, slots_counted = excluded.slots_counted
    ),
    unknown as (
      update shoal.flow_keys k set slots_bound = null
      from summed c
      where not c.roomy and c.stored is not null and k.queue = c.queue and k.key = c.key
        and k.task = c.task
    )
    select c.n, c.held, case when c.roomy then c.entries end from summed c;
end
$$;

-- How many jobs of each bucket (queue, key, task) a claim may take now (the claim, claim.sql
-- "Flow control", calls it for each bucket it meets; element i of the arrays is one; want: the
-- most it could take of one key). Only keys under flow control come back: with a
-- concurrency limit (its free slots; slotted; bound: its bound after this call, null when
-- unknown, see THE BOUND), a
-- rate limit (the whole tokens in its bucket; tokens returns the bucket's fill now, for
-- shoal.flow_claimed) or a hold (none). Each is locked first (shoal.flow_lock): a key
-- another claim holds gets none. What the keys hold is read by a statement after the
-- locks, whose snapshot sees every claim committed before they were free (the slot rule).
drop function if exists shoal.flow_allow(text[], text[]);
drop function if exists shoal.flow_allow(text[], text[], integer);
create or replace function shoal.flow_allow(queues text[], keys text[], tasks text[],
                                            want integer)
returns table (queue text, key text, task text, allowed integer, tokens double precision,
               waiting boolean, bound integer, slotted boolean, locked boolean)
language plpgsql volatile
-- Plan once per session: left to choose, Postgres planned the count again on every call
-- (0.5 ms of a 0.6 ms call).
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
  qs text[];
  ks text[];
  ts text[];
  locks boolean[];
  -- Aligned with qs: each key's concurrency limit, bound, whether its slots are counted
  -- now, slots held (the bound when not counted), hold in effect, waiting, bucket's fill.
  limits integer[];
  bounds integer[];
  counts boolean[];
  held integer[];
  holds boolean[];
  waits boolean[];
  buckets double precision[];
begin
  select array_agg(x.queue), array_agg(x.key), array_agg(x.task),
         array_agg(shoal.flow_lock(x.queue, x.key, x.task))
  into qs, ks, ts, locks
  from unnest(queues, keys, tasks) as x(queue, key, task)
  where exists (select 1 from shoal.concurrency_limits l
                where l.queue = x.queue and l.task = x.task
                  and (l.key = x.key or l.key is null))
     or exists (select 1 from shoal.rate_limits l
                where l.queue = x.queue and l.task = x.task
                  and (l.key = x.key or l.key is null))
     or exists (select 1 from shoal.flow_keys k
                where k.queue = x.queue and k.key = x.key and k.task = x.task
                  and k.held_until > now());
  if qs is null then
    return;
  end if;
  -- What each key holds, and which need their slots counted (THE BOUND): the locked keys
  -- under a concurrency limit whose bound is unknown, could reach the limit with what this
  -- claim may take, or grew by 10,000 since the last count. One statement for every key (a
  -- function call per key cost 0.3 ms a claim of one key).
  -- (Each aggregate in the order of qs: the joins may return the keys in another.)
  select array_agg(coalesce(lk.max_running, ld.max_running) order by x.n),
         array_agg(k.slots_bound order by x.n),
         array_agg(x.locked and coalesce(lk.max_running, ld.max_running) is not null
                   and (k.slots_bound is null
                        or k.slots_bound + want > coalesce(lk.max_running, ld.max_running)
                        or k.slots_bound - k.slots_counted >= 10000) order by x.n),
         array_agg(k.held_until > now() order by x.n), array_agg(k.waiting order by x.n),
         array_agg(b.tokens order by x.n)
  into limits, bounds, counts, holds, waits, buckets
  from unnest(qs, ks, ts, locks) with ordinality as x(queue, key, task, locked, n)
  left join shoal.flow_keys k on k.queue = x.queue and k.key = x.key and k.task = x.task
  left join shoal.concurrency_limits lk
    on lk.queue = x.queue and lk.task = x.task and lk.key = x.key
  left join shoal.concurrency_limits ld
    on ld.queue = x.queue and ld.task = x.task and ld.key is null
  left join lateral (
    select least(r.max_starts::double precision,
                 coalesce(k.tokens, r.max_starts)
                 + extract(epoch from now() - k.refilled_at) * 1000 * r.max_starts / r.period_ms)
           as tokens
    from shoal.rate_limits r
    where r.queue = x.queue and r.task = x.task and (r.key = x.key or r.key is null)
    order by r.key nulls last
    limit 1
  ) b on true;
  held := bounds;
  if true = any(counts) then
    select array_agg(coalesce(c.held, x.bound) order by x.n),
           array_agg(case when c.n is null then x.bound else c.bound end order by x.n)
    into held, bounds
    from unnest(bounds) with ordinality as x(bound, n)
    left join shoal.flow_count(qs, ks, ts, counts, limits, bounds, want) c on c.n = x.n;
    -- The holds again, by a statement after the count: a failure told to hold its key (a
    -- 429) frees its slot and holds the key in one commit (lib/queue.ts fail()), which
    -- takes no key lock. Committed after the holds were read above and before the count,
    -- the count saw the slot free and the holds did not see the hold: a job of the held key
    -- was claimed (tests/flow_process_test.ts, the 429 test, 1 run in 6 under load).
    select array_agg(coalesce(k.held_until > now(), false) order by x.n)
    into holds
    from unnest(qs, ks, ts) with ordinality as x(queue, key, task, n)
    left join shoal.flow_keys k on k.queue = x.queue and k.key = x.key and k.task = x.task;
  end if;
  return query
    select x.queue, x.key, x.task,
           case when not x.locked or coalesce(x.hold, false) then 0
                else greatest(least(coalesce(x.max_running - x.held, 1000000000),
                                    coalesce(floor(x.tokens)::bigint, 1000000000)), 0)::integer
           end,
           x.tokens, coalesce(x.waiting, false),
           case when x.max_running is not null then x.bound end,
           x.max_running is not null, x.locked
    from unnest(qs, ks, ts, locks, limits, held, bounds, holds, waits, buckets)
      as x(queue, key, task, locked, max_running, held, bound, hold, waiting, tokens);
end
$$;

-- A claim took taken[i] jobs of bucket i (queues[i], keys[i], tasks[i]), whose token bucket
-- held tokens[i] and whose slots' bound
-- was bounds[i] (shoal.flow_allow; null: no rate limit, no bound kept; locked[i]: whether
-- the claim holds the key's lock, else nothing is written for it), and held
-- held[i] of its jobs back: write the buckets and bounds back; record which
-- keys have jobs waiting for a slot (waiting[i]: what flow_allow read), so that a freed slot
-- of theirs wakes the queue (shoal.slots_freed) and one of a key that never fills does not;
-- and when a bucket is empty, wake the queue's consumers for the instant its next token is
-- due (the jobs it holds back start then, not at a poll). A key becomes waiting only at the
-- end of the claim that first finds it full: a slot freed meanwhile wakes nobody, and the
-- job waits for a poll, once per key that fills. Of a key another claim held, only the flag
-- is set, where no claim has its row locked.
drop function if exists shoal.flow_claimed(text[], text[], double precision[], integer[],
                                          integer[], boolean[]);
drop function if exists shoal.flow_claimed(text[], text[], double precision[], integer[],
                                          integer[], boolean[], integer[]);
drop function if exists shoal.flow_claimed(text[], text[], double precision[], integer[],
                                          integer[], boolean[], integer[], boolean[]);
create or replace function shoal.flow_claimed(queues text[], keys text[], tasks text[],
                                              tokens double precision[], taken integer[],
                                              held integer[], waiting boolean[],
                                              bounds integer[], locked boolean[])
returns void
language plpgsql volatile as $$
begin
  insert into shoal.flow_keys as k (queue, key, task, tokens, refilled_at, waiting, slots_bound)
  select x.queue, x.key, x.task, case when x.tokens is not null then x.tokens - x.taken end,
         now(), x.held > 0, x.bound + x.taken
  from unnest(queues, keys, tasks, tokens, taken, held, waiting, bounds, locked)
    as x(queue, key, task, tokens, taken, held, waiting, bound, locked)
  where (((x.tokens is not null or x.bound is not null) and x.taken > 0)
         or (x.held > 0) <> x.waiting)
    -- Only a key this claim held when it read it (locked[i]): what it read of another is
    -- stale once that claim commits, and writing it meanwhile would wait for that claim.
    and x.locked
  on conflict (queue, key, task) do update
  set tokens = case when excluded.tokens is not null then excluded.tokens else k.tokens end,
      refilled_at = case when excluded.tokens is not null then now() else k.refilled_at end,
      waiting = excluded.waiting,
      -- A bound made unknown meanwhile (slot rows added outside a claim) stays unknown.
      slots_bound = case when excluded.slots_bound is not null and k.slots_bound is not null
                         then excluded.slots_bound else k.slots_bound end;

  -- A key another claim held, with jobs this claim had to leave: marked waiting (so its
  -- freed slots wake the queue), the flag alone, and only where no claim has the row
  -- locked (skipped, not waited for). At worst one wake too many.
  with w as (
    select k.queue, k.key, k.task from shoal.flow_keys k
    join unnest(queues, keys, tasks, held, locked) as x(queue, key, task, held, locked)
      on k.queue = x.queue and k.key = x.key and k.task = x.task
    where not x.locked and x.held > 0 and not k.waiting
    for update of k skip locked
  )
  update shoal.flow_keys k set waiting = true
  from w where k.queue = w.queue and k.key = w.key and k.task = w.task;

  perform shoal.notify_jobs(array_agg(x.queue), array_agg(
            now() + (1 - (x.tokens - x.taken)) * r.period_ms / r.max_starts * interval '1 ms'))
  from unnest(queues, keys, tasks, tokens, taken, held)
    as x(queue, key, task, tokens, taken, held)
  cross join lateral (
    select l.max_starts, l.period_ms from shoal.rate_limits l
    where l.queue = x.queue and l.task = x.task and (l.key = x.key or l.key is null)
    order by l.key nulls last limit 1
  ) r
  where x.tokens is not null and x.tokens - x.taken < 1 and x.held > 0
  having count(*) > 0;
end
$$;

-- Whether a bucket (queue, key, task) has an unclaimed job (ready or not): a job of the
-- queue whose flow key is `key` and whose bucket's task is `task` (THE TASK RULE), found
-- through the concurrency key's index, then the fairness key's.
drop function if exists shoal.has_unclaimed(text, text);
create or replace function shoal.has_unclaimed(queue text, key text, task text) returns boolean
language sql stable as $$
  select exists (select 1 from shoal.jobs j
                 where j.queue = $1 and j.concurrency_key = $2 and j.locked_by is null
                   and shoal.flow_scope(j.queue, j.task) = $3)
      or exists (select 1 from shoal.jobs j
                 where j.queue = $1 and j.fairness_key = $2 and j.concurrency_key is null
                   and j.locked_by is null and shoal.flow_scope(j.queue, j.task) = $3)
$$;

-- Flow control's leftovers (the reaper's housekeeping; a claim that counts a key removes its
-- emptied slot rows too), max_rows of each kind at most, each under its key's lock (a key
-- a claim holds is left for the next time): slot rows naming jobs that hold nothing, their
-- job gone or claimed again or no longer claimed, rewritten without them or removed when
-- none is left (a job still claimed stays even past its deadline: a worker that resumes
-- and extends it still holds its slot); and what a key remembers once it says nothing (no
-- hold in effect, no jobs waiting, a bucket untouched for longer than any period, so full
-- again; its bound, if it had slots, is unknown until it is counted again); and the waiting
-- flag of a key with no job left unclaimed. Returns how many rows were rewritten or removed.
create or replace function shoal.prune_slots(max_rows integer default 10000) returns integer
language sql volatile as $$
  with stale as (
    select s.ctid as row_id, s.queue, s.key, s.task from shoal.concurrency_slots s
    where exists (select 1 from unnest(s.job_ids, s.tokens) as u(id, token)
                  where not exists (select 1 from shoal.jobs j
                                    where j.id = u.id and j.token = u.token
                                      and j.locked_by is not null))
      and shoal.flow_lock(s.queue, s.key, s.task)
    limit max_rows
  ),
  kept as (
    select x.row_id, x.queue, x.key, x.task,
           array_agg(u.id order by u.n) filter (where j.id is not null) as job_ids,
           array_agg(u.token order by u.n) filter (where j.id is not null) as tokens
    from stale x
    join shoal.concurrency_slots s
      on s.queue = x.queue and s.key = x.key and s.task = x.task and s.ctid = x.row_id
    cross join lateral unnest(s.job_ids, s.tokens) with ordinality as u(id, token, n)
    left join shoal.jobs j on j.id = u.id and j.token = u.token and j.locked_by is not null
    group by x.row_id, x.queue, x.key, x.task
  ),
  rewritten as (
    update shoal.concurrency_slots s set job_ids = k.job_ids, tokens = k.tokens
    from kept k
    where s.queue = k.queue and s.key = k.key and s.task = k.task and s.ctid = k.row_id
      and k.job_ids is not null
    returning 1
  ),
  emptied as (
    delete from shoal.concurrency_slots s using kept k
    where s.queue = k.queue and s.key = k.key and s.task = k.task and s.ctid = k.row_id
      and k.job_ids is null
    returning 1
  ),
  -- A key marked waiting with no job of it left unclaimed (its waiting jobs cancelled, or
  -- counted in a task's own buckets since): it would keep its queue's claims windowed.
  -- (The key's lock only once it is known to have nothing waiting: offset 0 keeps the
  -- check first.)
  unwaited as (
    update shoal.flow_keys k set waiting = false
    where k.ctid = any(array(
      select w.ctid
      from (select w.ctid, w.queue, w.key, w.task from shoal.flow_keys w
            where w.waiting and not shoal.has_unclaimed(w.queue, w.key, w.task)
            offset 0) w
      where shoal.flow_lock(w.queue, w.key, w.task)
      limit max_rows))
    returning 1
  ),
  quiet as (
    select k.queue, k.key, k.task from shoal.flow_keys k
    where (k.held_until is null or k.held_until < now()) and not k.waiting
      and k.refilled_at < now() - interval '1 day'
      and shoal.flow_lock(k.queue, k.key, k.task)
    limit max_rows
  ),
  forgotten as (
    delete from shoal.flow_keys k using quiet q
    where k.queue = q.queue and k.key = q.key and k.task = q.task
      and (k.held_until is null or k.held_until < now()) and not k.waiting
    returning 1
  )
  select ((select count(*) from rewritten) + (select count(*) from emptied)
          + (select count(*) from unwaited) + (select count(*) from forgotten))::integer
$$;

-- Whether shoal.prune_slots has anything to remove: the reaper's cheap check.
create or replace function shoal.has_flow_leftovers() returns boolean
language sql stable as $$
  select exists (select 1 from shoal.concurrency_slots s
                 cross join lateral unnest(s.job_ids, s.tokens) as u(id, token)
                 where not exists (select 1 from shoal.jobs j
                                   where j.id = u.id and j.token = u.token
                                     and j.locked_by is not null))
      or exists (select 1 from shoal.flow_keys k
                 where (k.held_until is null or k.held_until < now()) and not k.waiting
                   and k.refilled_at < now() - interval '1 day')
      or exists (select 1 from shoal.flow_keys k
                 where k.waiting and not shoal.has_unclaimed(k.queue, k.key, k.task))
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

-- THE SIMPLE RULES as this file states them, for every queue with limits (the rows of an
-- earlier revision, or none, written again), each under its queue's rules lock.
do $$
declare
  q text;
begin
  for q in select l.queue from shoal.concurrency_limits l
           union select r.queue from shoal.rate_limits r
           union select f.queue from shoal.flow_rules f
  loop
    perform shoal.flow_rules_lock(q);
    perform shoal.flow_rules_refresh(q);
  end loop;
end
$$;
