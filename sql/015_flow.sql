-- shoal 015: flow control: paused queues, and per (queue, key) concurrency limits, rate
-- limits, holds and fairness weights.
--
-- Both are read by the claim (sql/functions/claim.sql, "Flow control"), whose statements
-- and the functions that change these tables live in sql/functions/flow.sql.

-- A paused queue: no consumer claims its jobs until it is resumed. Enqueues (and the
-- scheduler's fires) still land; jobs already claimed run to their end.
create table shoal.queue_pauses (
  queue shoal.name primary key,
  paused_at timestamptz not null default now()
);

-- A job's flow key: the key its concurrency limit, rate limit and holds count it under. Its
-- concurrency key when one was given at enqueue, else its fairness key. Checked for new
-- rows only (not valid): every existing row has none.
alter table shoal.jobs add column concurrency_key text,
  add constraint jobs_concurrency_key_length
    check (concurrency_key is null or length(concurrency_key) <= 256) not valid;
alter table shoal.dead_jobs add column concurrency_key text;
-- A key's jobs in claim order, for a claim that looks key by key (claim.sql, "Flow
-- control"): for concurrency keys here, for fairness keys in jobs_fairness_idx, rebuilt
-- with its priority descending (the claim order; the stamping rule's lookup of a key's
-- last stamp at one priority reads it backwards, as before). Rebuilding locks shoal.jobs
-- for as long as the build takes (seconds per million jobs).
drop index shoal.jobs_fairness_idx;
create index jobs_fairness_idx on shoal.jobs (queue, fairness_key, priority desc, fair_seq);
create index jobs_concurrency_idx on shoal.jobs (queue, concurrency_key, priority desc, fair_seq)
  where concurrency_key is not null;

-- At most max_running jobs of a queue run at once per key (a job's flow key, above),
-- across every consumer. A row with a null key is the queue's default for every key; a row naming
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

-- At most max_starts claims per period_ms per key, across every consumer: a token bucket of
-- max_starts tokens refilled at max_starts per period. A null key is the queue's default
-- for every key; a row naming a key overrides it.
create table shoal.rate_limits (
  queue shoal.name not null,
  key text,
  max_starts integer not null,
  period_ms integer not null,
  updated_at timestamptz not null default now(),
  constraint rate_limits_key_length check (key is null or length(key) <= 256),
  constraint rate_limits_max_starts check (max_starts between 1 and 1000000),
  constraint rate_limits_period check (period_ms between 1 and 86400000)
);
create unique index rate_limits_key_idx on shoal.rate_limits (queue, key)
  where key is not null;
create unique index rate_limits_default_idx on shoal.rate_limits (queue)
  where key is null;

-- What flow control remembers of a key: its token bucket (tokens at refilled_at; null
-- tokens: full), a hold (no job of the key is claimed before held_until: a handler told
-- to slow down, say by an HTTP 429), and whether a claim last found the key full with its
-- jobs waiting (then a freed slot wakes the queue's consumers: shoal.free_slots). Rewritten
-- by claims of rate-limited keys: room for updates on the same page.
create table shoal.flow_keys (
  queue text not null,
  key text not null,
  tokens double precision,
  refilled_at timestamptz not null default now(),
  held_until timestamptz,
  waiting boolean not null default false,
  primary key (queue, key)
) with (fillfactor = 50);
create index flow_keys_held_idx on shoal.flow_keys (queue, held_until)
  where held_until is not null;
-- Whether a queue has keys with jobs waiting (every claim of a limited queue asks).
create index flow_keys_waiting_idx on shoal.flow_keys (queue) where waiting;

-- A fairness key's weight on its queue: under contention it starts `weight` jobs for each
-- job of a key of weight 1 (the stamping rule in sql/functions/queue.sql: `weight` of its
-- jobs share each stamp). Keys without a row weigh 1.
create table shoal.fairness_weights (
  queue shoal.name not null,
  key text not null,
  weight integer not null,
  updated_at timestamptz not null default now(),
  primary key (queue, key),
  constraint fairness_weights_key_length check (length(key) <= 256),
  constraint fairness_weights_weight check (weight between 1 and 1000)
);
