/**
 * The dead-letter table, `shoal.dead_jobs`: jobs whose attempts ran out, that failed
 * permanently, or that crashed their workers every time. Listing, retrying (back onto
 * the queue with a fresh budget, same id) and purging.
 *
 * @module
 */
import {
  checkDb,
  checkId,
  checkInteger,
  checkOptions,
  checkString,
  MAX_INT4,
  MAX_SPAN_MS,
} from "./args.ts";
import type { Db } from "./db.ts";

export interface DeadJob {
  id: string;
  queue: string;
  task: string;
  payload: Record<string, unknown>;
  priority: number;
  fairness_key: string;
  attempts: number;
  max_attempts: number;
  key: string | null;
  execution_id: string | null;
  errors: { attempt: number; at: string; error: string }[];
  reason: string;
  created_at: Date;
  died_at: Date;
}

export interface ListDeadOptions {
  queue?: string;
  limit?: number;
}

/** Newest dead jobs first. */
export async function listDead(db: Db, options: ListDeadOptions = {}): Promise<DeadJob[]> {
  checkDb("listDead", db);
  checkOptions("listDead", options);
  // Any text: a queue no job can be on finds nothing.
  checkString("listDead", "options.queue", options.queue, { optional: true });
  checkInteger("listDead", "options.limit", options.limit, {
    min: 1,
    max: MAX_INT4,
    optional: true,
  });
  return await db<DeadJob[]>`
    select id, queue, task, payload, priority, fairness_key, attempts, max_attempts, key,
      execution_id, errors, reason, created_at, died_at
    from shoal.dead_jobs
    where ${options.queue ?? null}::text is null or queue = ${options.queue ?? null}::text
    order by died_at desc, id desc
    limit ${options.limit ?? 100}::integer`;
}

export type RetryDeadOutcome = "retried" | "not_found" | "duplicate" | "execution_ended";

/**
 * Put a dead job back on its queue, runnable now, with its attempts reset. "duplicate"
 * means a live job holds its dedupe key, "execution_ended" that its execution has ended
 * (the next claim would ack it unrun); either way the dead row is kept.
 */
export async function retryDead(db: Db, id: string): Promise<RetryDeadOutcome> {
  checkDb("retryDead", db);
  checkId("retryDead", "id", id);
  const [row] = await db<{ outcome: RetryDeadOutcome }[]>`
    with dead as (
      select * from shoal.dead_jobs where id = ${id}::bigint for update
    ),
    -- A job of an ended execution would be acked unrun by its next claim, its dead row
    -- gone with it: it stays dead instead.
    ended as (
      select 1 from dead d join shoal.executions e on e.id = d.execution_id
      where e.status in ('completed', 'failed', 'cancelled')
    ),
    revived as (
      insert into shoal.jobs (id, queue, task, payload, priority, fairness_key, fair_seq,
        max_attempts, token, key, execution_id, barrier_id, child_index, errors, created_at,
        concurrency_key, traceparent)
      overriding system value
      select d.id, d.queue, d.task, d.payload, d.priority, d.fairness_key,
        -- Stamped like a new job (the stamping rule in sql/functions/queue.sql).
        shoal.fair_seq_next(d.queue, d.fairness_key, d.priority),
        d.max_attempts,
        -- Past every token of its previous life: a worker still holding one is fenced off.
        d.token + 1,
        d.key, d.execution_id, d.barrier_id, d.child_index, d.errors, d.created_at,
        d.concurrency_key, d.traceparent
      from dead d
      where not exists (select 1 from ended)
      on conflict (queue, key) where key is not null do nothing
      returning id, queue
    ),
    removed as (
      delete from shoal.dead_jobs where id in (select id from revived) returning id
    ),
    -- Runnable now: wake idle consumers (sql/functions/wake.sql).
    woken as (
      select shoal.notify_jobs(array_agg(r.queue::text), null) from revived r
    )
    select case when not exists (select 1 from dead) then 'not_found'
                when exists (select 1 from ended) then 'execution_ended'
                when exists (select 1 from removed) then 'retried'
                else 'duplicate' end as outcome,
      (select count(*) from woken) as woken -- referenced, so the notify runs`;
  return row!.outcome;
}

export interface PurgeDeadOptions {
  queue?: string;
  /** Only those that died more than this long ago. */
  olderThanMs?: number;
  /** At most this many, oldest first (the reaper's cap per tick); all when omitted. */
  limit?: number;
}

/** Delete dead jobs, oldest first; returns how many. */
export async function purgeDead(db: Db, options: PurgeDeadOptions = {}): Promise<number> {
  checkDb("purgeDead", db);
  // Unknown keys refused: a misspelt filter must not purge every dead job.
  checkOptions("purgeDead", options, "options", ["queue", "olderThanMs", "limit"]);
  checkString("purgeDead", "options.queue", options.queue, { optional: true });
  checkInteger("purgeDead", "options.olderThanMs", options.olderThanMs, {
    min: 0,
    max: MAX_SPAN_MS,
    optional: true,
  });
  checkInteger("purgeDead", "options.limit", options.limit, {
    min: 1,
    max: MAX_INT4,
    optional: true,
  });
  const rows = await db`
    delete from shoal.dead_jobs
    where id in (
      select id from shoal.dead_jobs
      where (${options.queue ?? null}::text is null or queue = ${options.queue ?? null}::text)
        and died_at < now() - ${options.olderThanMs ?? 0}::bigint * interval '1 ms'
      order by died_at
      limit ${options.limit ?? null}::integer)
    returning id`;
  return rows.length;
}

/**
 * Dead jobs of `queue` that died at or after `since` (a time read from the database clock):
 * what one stretch of work dead-lettered. Counted, never a difference of two totals, so a
 * purge or a retry from elsewhere can lower it but never below zero.
 */
export async function countDeadSince(db: Db, queue: string, since: Date): Promise<number> {
  const [row] = await db<{ n: number }[]>`
    select count(*)::integer as n from shoal.dead_jobs
    where queue = ${queue}::text and died_at >= ${since}::timestamptz`;
  return row!.n;
}

/** Whether any dead job is older than `ms` (the reaper's cheap check before purging). */
export async function hasDeadOlderThan(db: Db, ms: number): Promise<boolean> {
  const [row] = await db<{ found: boolean }[]>`
    select exists (
      select 1 from shoal.dead_jobs where died_at < now() - ${ms}::bigint * interval '1 ms'
    ) as found`;
  return row!.found;
}

/** What listDeadPage() filters on. */
export interface DeadFilter {
  queue?: string;
  task?: string;
  executionId?: string;
  /** The dedupe key, exactly. */
  key?: string;
  fairnessKey?: string;
}

/** A dead job as a listing shows it (no payload, no error history). */
export type DeadListRow = Omit<DeadJob, "payload" | "errors">;

/**
 * A page of dead jobs, newest first by id (a job keeps its id when it dies), keyset-paginated
 * and bounded as lib/queue.ts listJobs() is: at most `scan` dead jobs read along the primary
 * key from `beforeId`, then filtered; `next` continues the search (null: none older).
 */
export async function listDeadPage(
  db: Db,
  options: DeadFilter & { beforeId?: string; limit?: number; scan?: number } = {},
): Promise<{ rows: DeadListRow[]; next: string | null }> {
  const fn = "listDeadPage";
  checkDb(fn, db);
  checkOptions(fn, options, "options", [
    "queue",
    "task",
    "executionId",
    "key",
    "fairnessKey",
    "beforeId",
    "limit",
    "scan",
  ]);
  checkString(fn, "options.queue", options.queue, { optional: true });
  checkString(fn, "options.task", options.task, { optional: true });
  checkString(fn, "options.key", options.key, { optional: true });
  checkString(fn, "options.fairnessKey", options.fairnessKey, { optional: true, empty: true });
  if (options.executionId !== undefined) checkId(fn, "options.executionId", options.executionId);
  if (options.beforeId !== undefined) checkId(fn, "options.beforeId", options.beforeId);
  checkInteger(fn, "options.limit", options.limit, { min: 1, max: 1000, optional: true });
  checkInteger(fn, "options.scan", options.scan, { min: 1, max: 1_000_000, optional: true });
  const limit = options.limit ?? 50;
  const scan = options.scan ?? 10_000;
  const rows = await db<(DeadListRow & { scanned_to: string | null; scanned: number })[]>`
    with window_ as (
      select d.id, d.queue, d.task, d.priority, d.fairness_key, d.attempts, d.max_attempts,
        d.key, d.execution_id, d.reason, d.created_at, d.died_at
      from shoal.dead_jobs d
      where d.id < coalesce(${options.beforeId ?? null}::bigint, 9223372036854775807)
      order by d.id desc
      limit ${scan}::integer
    ),
    bounds as (select min(id) as scanned_to, count(*)::integer as scanned from window_)
    select w.*, b.scanned_to, b.scanned
    from bounds b left join lateral (
      select * from window_ w
      where (${options.queue ?? null}::text is null or w.queue = ${options.queue ?? null}::text)
        and (${options.task ?? null}::text is null or w.task = ${options.task ?? null}::text)
        and (${options.executionId ?? null}::bigint is null
             or w.execution_id = ${options.executionId ?? null}::bigint)
        and (${options.key ?? null}::text is null or w.key = ${options.key ?? null}::text)
        and (${options.fairnessKey ?? null}::text is null
             or w.fairness_key = ${options.fairnessKey ?? null}::text)
      order by w.id desc
      limit ${limit}::integer
    ) w on true`;
  const first = rows[0];
  const found = rows.filter((r) => r.id !== null).map(({ scanned_to: _, scanned: __, ...r }) => r);
  let next: string | null = null;
  if (found.length === limit) next = found[found.length - 1]!.id;
  else if (first && first.scanned === scan) next = first.scanned_to;
  return { rows: found, next };
}

/** A dead job by id, or null. */
export async function getDead(db: Db, id: string): Promise<DeadJob | null> {
  checkDb("getDead", db);
  checkId("getDead", "id", id);
  const [row] = await db<DeadJob[]>`
    select id, queue, task, payload, priority, fairness_key, attempts, max_attempts, key,
      execution_id, errors, reason, created_at, died_at
    from shoal.dead_jobs where id = ${id}::bigint`;
  return row ?? null;
}

/** The most dead jobs one retryDeadMatching() call puts back. */
export const MAX_RETRY_BATCH = 1000;

/**
 * Retry the newest dead jobs matching `filter` (at most {@link MAX_RETRY_BATCH} per call,
 * each through retryDead(), so each keeps its outcome rule). Returns the outcomes counted.
 */
export async function retryDeadMatching(
  db: Db,
  filter: DeadFilter,
): Promise<Record<RetryDeadOutcome, number>> {
  const counts: Record<RetryDeadOutcome, number> = {
    retried: 0,
    not_found: 0,
    duplicate: 0,
    execution_ended: 0,
  };
  let beforeId: string | undefined;
  let left = MAX_RETRY_BATCH;
  while (left > 0) {
    const page = await listDeadPage(db, { ...filter, beforeId, limit: Math.min(left, 500) });
    for (const row of page.rows) counts[await retryDead(db, row.id)]++;
    left -= page.rows.length;
    if (page.next === null) break;
    beforeId = page.next;
  }
  return counts;
}

/** Most dead jobs deadByQueueSince() reads: past this, a queue's figure is a lower bound. */
export const RECENT_DEAD_CAP = 100_000;

/**
 * Dead jobs per queue that died within the last `withinMs` on the database clock (the
 * overview's recent failures per queue), read along the died_at index and capped at
 * {@link RECENT_DEAD_CAP} rows so a failure storm cannot make the page slow.
 */
export async function deadByQueueWithin(db: Db, withinMs: number): Promise<Map<string, number>> {
  checkDb("deadByQueueWithin", db);
  checkInteger("deadByQueueWithin", "withinMs", withinMs, { min: 0, max: MAX_SPAN_MS });
  const rows = await db<{ queue: string; n: number }[]>`
    select queue, count(*)::integer as n from (
      select queue from shoal.dead_jobs
      where died_at >= now() - ${withinMs}::bigint * interval '1 ms' 
      order by died_at desc limit ${RECENT_DEAD_CAP}::integer
    ) recent
    group by queue`;
  return new Map(rows.map((r) => [r.queue, r.n]));
}
