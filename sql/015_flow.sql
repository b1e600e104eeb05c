-- shoal 015: flow control: paused queues and concurrency limits per (queue, key).
--
-- Both are read by the claim (sql/functions/claim.sql, "Flow control"), whose statements
-- and the functions that change these tables live in sql/functions/flow.sql.

-- A paused queue: no consumer claims its jobs until it is resumed. Enqueues (and the
-- scheduler's fires) still land; jobs already claimed run to their end.
create table shoal.queue_pauses (
  queue shoal.name primary key,
  paused_at timestamptz not null default now()
);

-- At most max_running jobs of a queue run at once per key (a job's fairness key), across
-- every consumer. A row with a null key is the queue's default for every key; a row naming
-- a key overrides that default for the key alone (a tenant's tier).
create table shoal.concurrency_limits (
  queue shoal.name not null,
  key text,
  max_running integer not null,
  updated_at timestamptz not null default now(),
  constraint concurrency_limits_key_length check (key is null or length(key) <= 256),
  constraint concurrency_limits_max_running check (max_running between 0 and 1000000)
);
create unique index concurrency_limits_key_idx on shoal.concurrency_limits (queue, key)
  where key is not null;
create unique index concurrency_limits_default_idx on shoal.concurrency_limits (queue)
  where key is null;

-- The slots held: one row per claimed job that a limit counted, written by the claim. A
-- row holds its slot only while its job still carries the token it was claimed with, is
-- claimed (locked_by) and is within its deadline (run_at): nothing else has to remove it
-- for the count to be right, so no path that ends a claim (ack, retry, hand-back, dead
-- letter, cancel, an expired deadline) can leak a slot. Those that end claims often
-- delete their rows at once (shoal.free_slots); the reaper removes what is left.
create table shoal.concurrency_slots (
  job_id bigint primary key,
  queue text not null,
  key text not null,
  token bigint not null
);
create index concurrency_slots_key_idx on shoal.concurrency_slots (queue, key);
