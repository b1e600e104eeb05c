-- shoal 019: what each consumer has finished, by queue, for per-queue rates.
--
-- The dashboard's throughput and failure rate per queue. Completed jobs leave no row behind
-- and Postgres's table statistics are neither per queue nor exact (they count cancelled and
-- rolled-back rows, and arrive late from idle sessions). Counters kept by triggers or an
-- extra statement per job are ruled out (the count rule, sql/functions/counts.sql). So each
-- consumer keeps its own cumulative counts in memory (what its metrics count) and adds them
-- to the update its heartbeat already sends (lib/catalog.ts reportInFlight): no statement
-- per job, and at most that one update per heartbeat interval (sent as before while it holds
-- jobs, and now also after an interval in which it finished some; an idle consumer sends
-- nothing). Readers difference them over time per consumer (lib/catalog.ts TotalsHistory).
--
-- totals: {"queue": {"completed": n, "failed": n, "dead": n}, ...} since the consumer
--   started: completed (acked, or its fan-out opened), failed (attempts that failed and were
--   retried with a backoff), dead (dead-lettered: failed for good, or poisoned). Emptied
--   when a consumer registers (a restart under the same worker id starts from nothing).
-- totals_at: when they were written (the database's clock, as the readers'), so a reader
--   places each step at the time it happened, not when it looked.
-- heartbeat_ms: how often the consumer reports: the figures' resolution.
--
-- A jsonb column rather than a table of (worker_id, queue) rows: one row update per
-- heartbeat, as before, instead of one per queue (more WAL, more dead versions, and a
-- statement that grows with the queues). The document is bounded: a consumer reports at most
-- 32 queues (MAX_REPORTED_QUEUES), about 1.5 kB with names of a few characters, under the
-- row size (about 2 kB) past which Postgres compresses values and then moves them out of line
-- (TOAST); longer names are compressed first (the inner keys repeat), which keeps most such
-- documents in line too. No index covers these columns and fillfactor leaves room on the page,
-- so the update can be HOT (no index entry written); the setting applies to pages written
-- from now on, and the table holds a row per running consumer.
alter table shoal.consumers
  add column totals jsonb,
  add column totals_at timestamptz,
  add column heartbeat_ms integer;
alter table shoal.consumers set (fillfactor = 50);
