-- shoal 013: what each consumer holds, for counting without scanning.
--
-- Past a few thousand jobs, `shoal status` and /metrics estimate the job counts instead of
-- scanning shoal.jobs (the count rule, sql/functions/counts.sql). A sample cannot see a
-- state as rare as running or prefetched (a fleet's concurrency and prefetch among
-- millions of jobs), and no index may find claimed jobs (an index on a column the claim
-- writes would make every claim and heartbeat rewrite every index entry). So each
-- consumer reports what it holds with its heartbeat (lib/catalog.ts writes it, one update
-- per consumer and heartbeat while it holds jobs, nothing per job):
--
-- in_flight: {"queue": {"running": n, "prefetched": m}, ...} at its last heartbeat;
-- in_flight_until: when those claims would lapse unless extended (the heartbeat's time plus
-- the visibility timeout), so a consumer that died stops counting when its claims expire.
alter table shoal.consumers
  add column in_flight jsonb,
  add column in_flight_until timestamptz;
