-- shoal 022: a queue's rules in one row, for the claim's fast check (THE SIMPLE RULES in
-- sql/functions/flow.sql).
--
-- A claim of a queue under a concurrency limit that does not bind checks its picks against
-- the limits in one statement. Read from shoal.concurrency_limits and shoal.rate_limits,
-- that check opened ten index scans on every claim (the queue's default, each key's own,
-- the tasks with limits of their own, the rate limits): 88,000 more instructions per job
-- than no limit, for a claim of 10 (callgrind, a server-side loop of claims). Most limited
-- queues have one rule, a default per key. This row says so, with the limit: the check
-- then reads it and the keys' rows alone.
--
-- One row per queue with any concurrency or rate limit, written only by the functions that
-- set and clear limits, under the queue's rules lock (shoal.flow_rules_refresh). A queue
-- with limits and no row (none here before this migration) takes the full check: correct,
-- only slower; applying the function files writes every queue's row again.
create table shoal.flow_rules (
  queue text primary key,
  -- The queue's default concurrency limit (task '', key null) when it is the queue's only
  -- limit: no key's own, no task's own, no rate limit. Null otherwise.
  simple_max integer,
  updated_at timestamptz not null default now()
);
