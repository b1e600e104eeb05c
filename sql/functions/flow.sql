-- shoal functions: flow control (the tables: sql/015_flow.sql).
--
-- Owns pausing queues and the concurrency limits per (queue, key):
--   shoal.pause_queue, shoal.resume_queue          a queue's pause (claim.sql skips it)
--   shoal.set_concurrency_limit,                   a limit per queue (every key) or per key
--   shoal.clear_concurrency_limit
--   shoal.concurrency_limit                        the limit that applies to a key
--   shoal.flow_lock                                the claim's lock on a key (below)
--   shoal.slots_held                               the slots a key holds (below)
--   shoal.free_slots                               a finished claim gives its slot back
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
-- effect at the next claim; a raised limit wakes the queue's consumers.
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

-- The slots a key holds (the slot rule above).
create or replace function shoal.slots_held(queue text, key text) returns integer
language sql stable as $$
  select count(*)::integer
  from shoal.concurrency_slots s
  join shoal.jobs j on j.id = s.job_id
  where s.queue = $1 and s.key = $2
    and j.token = s.token and j.locked_by is not null and j.run_at > now()
$$;

-- The claims of these jobs ended (acked, retried, handed back, dead-lettered): remove their
-- slots and wake the consumers of each queue where one was freed, so a job held back by the
-- limit starts now instead of at a consumer's poll. Called in the statement that ends them.
-- Returns how many slots were freed.
create or replace function shoal.free_slots(ids bigint[]) returns integer
language plpgsql volatile as $$
declare
  queues text[];
  freed_count integer;
begin
  with freed as (
    delete from shoal.concurrency_slots s where s.job_id = any(ids) returning s.queue
  )
  select array_agg(distinct f.queue), count(*) into queues, freed_count from freed f;
  if freed_count > 0 then
    perform shoal.notify_jobs(queues, null);
  end if;
  return freed_count;
end
$$;
