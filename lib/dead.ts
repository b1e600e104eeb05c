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
import { conditions, type Db, type Fragment, keysetPage } from "./db.ts";

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
    ${options.queue === undefined ? db`` : db`where queue = ${options.queue}::text`}
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
    with picked as (
      select id from shoal.dead_jobs where id = ${id}::bigint for update
    ),
    ${revival(db)}
    select case when not exists (select 1 from dead) then 'not_found'
                when exists (select 1 from ended) then 'execution_ended'
                when exists (select 1 from removed) then 'retried'
                else 'duplicate' end as outcome,
      (select count(*) from woken) as woken -- referenced, so the notify runs`;
  return row!.outcome;
}

/**
 * THE REVIVAL RULE, for retryDead() and retryDeadMatching(): the CTEs that put back on their
 * queues the dead jobs named by a `picked` CTE before them (ids, locked `for update`). `dead`:
 * their rows; `ended`: those whose execution has ended (the next claim would ack them unrun, their
 * dead rows gone with them: they stay dead); `revived`: the others, runnable now with their
 * attempts reset, stamped like new jobs (the stamping rule in sql/functions/queue.sql) and
 * with a token past every one of their previous life (a worker still holding one is fenced
 * off), except where a live job holds the dedupe key; `removed`: their dead rows; `woken`:
 * idle consumers of their queues woken (sql/functions/wake.sql; select from it so it runs).
 */
function revival(db: Db): Fragment {
  return db`
    dead as (select d.* from shoal.dead_jobs d join picked p on p.id = d.id),
    ended as (
      select d.id from dead d join shoal.executions e on e.id = d.execution_id
      where e.status in ('completed', 'failed', 'cancelled')
    ),
    revived as (
      insert into shoal.jobs (id, queue, task, payload, priority, fairness_key, fair_seq,
        max_attempts, token, key, execution_id, barrier_id, child_index, errors, created_at,
        concurrency_key, traceparent)
      overriding system value
      select d.id, d.queue, d.task, d.payload, d.priority, d.fairness_key,
        shoal.fair_seq_next(d.queue, d.fairness_key, d.priority),
        d.max_attempts, d.token + 1, d.key, d.execution_id, d.barrier_id, d.child_index,
        d.errors, d.created_at, d.concurrency_key, d.traceparent
      from dead d
      where d.id not in (select id from ended)
      order by d.id
      on conflict (queue, key) where key is not null do nothing
      returning id, queue
    ),
    removed as (
      delete from shoal.dead_jobs where id in (select id from revived) returning id
    ),
    woken as (
      select shoal.notify_jobs(array_agg(distinct r.queue::text), null) from revived r
      having count(*) > 0
    )`;
}

export interface PurgeDeadOptions {
  queue?: string;
  task?: string;
  /** Only those with an id up to this one (the newest a page showed). */
  throughId?: string;
  /** Only those that died more than this long ago. */
  olderThanMs?: number;
  /** At most this many, oldest first (the reaper's cap per tick); all when omitted. */
  limit?: number;
}

/** The most dead jobs one purge statement deletes: a purge of millions runs in batches. */
export const PURGE_BATCH = 10_000;

/**
 * Delete dead jobs, oldest first, in statements of at most {@link PURGE_BATCH}; returns how
 * many. Each statement counts what it deleted in the database (no ids sent back).
 */
export async function purgeDead(db: Db, options: PurgeDeadOptions = {}): Promise<number> {
  checkDb("purgeDead", db);
  // Unknown keys refused: a misspelt filter must not purge every dead job.
  checkOptions("purgeDead", options, "options", [
    "queue",
    "task",
    "throughId",
    "olderThanMs",
    "limit",
  ]);
  checkString("purgeDead", "options.queue", options.queue, { optional: true });
  checkString("purgeDead", "options.task", options.task, { optional: true });
  if (options.throughId !== undefined) checkId("purgeDead", "options.throughId", options.throughId);
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
  const where = deadConditions(db, options);
  if (options.olderThanMs !== undefined) {
    where.push(db`and died_at < now() - ${options.olderThanMs}::bigint * interval '1 ms'`);
  }
  let purged = 0;
  for (;;) {
    const batch = Math.min(PURGE_BATCH, (options.limit ?? Infinity) - purged);
    if (batch <= 0) break;
    const [row] = await db<{ n: number }[]>`
      with d as (
        delete from shoal.dead_jobs
        where id in (
          select id from shoal.dead_jobs
          where true ${conditions(db, where)}
          order by died_at
          limit ${batch}::integer)
        returning 1)
      select count(*)::integer as n from d`;
    purged += row!.n;
    if (row!.n < batch) break;
  }
  return purged;
}

/** The dashboard's filters of dead jobs, as `and ...` fragments (see db.ts conditions()). */
function deadConditions(
  db: Db,
  filter: { queue?: string; task?: string; throughId?: string },
): Fragment[] {
  const where: Fragment[] = [];
  if (filter.throughId !== undefined) where.push(db`and id <= ${filter.throughId}::bigint`);
  if (filter.queue !== undefined) where.push(db`and queue = ${filter.queue}::text`);
  if (filter.task !== undefined) where.push(db`and task = ${filter.task}::text`);
  return where;
}

/**
 * How many dead jobs a purge with `filter` would delete now, counted up to `cap` (a figure
 * of `cap` means at least that many): the confirmation page's figure.
 */
export async function countDeadMatching(
  db: Db,
  filter: { queue?: string; task?: string; throughId?: string },
  cap: number,
): Promise<number> {
  const [row] = await db<{ n: number }[]>`
    select count(*)::integer as n from (
      select 1 from shoal.dead_jobs where true ${conditions(db, deadConditions(db, filter))}
      limit ${cap}::integer
    ) matching`;
  return row!.n;
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
  // Each combination of filters is its own statement text (see lib/queue.ts
  // listJobsStatement()): the window reads along the primary key, or the queue's index.
  const window: Fragment[] = [];
  const after: Fragment[] = [];
  if (options.beforeId !== undefined) window.push(db`and d.id < ${options.beforeId}::bigint`);
  if (options.queue !== undefined) window.push(db`and d.queue = ${options.queue}::text`);
  if (options.task !== undefined) after.push(db`and d.task = ${options.task}::text`);
  if (options.executionId !== undefined) {
    after.push(db`and d.execution_id = ${options.executionId}::bigint`);
  }
  if (options.key !== undefined) after.push(db`and d.key = ${options.key}::text`);
  if (options.fairnessKey !== undefined) {
    after.push(db`and d.fairness_key = ${options.fairnessKey}::text`);
  }
  const rows = await db<(DeadListRow & { scanned_to: string | null; scanned: number })[]>`
    with window_ as (
      select d.id, d.queue, d.task, d.priority, d.fairness_key, d.attempts, d.max_attempts,
        d.key, d.execution_id, d.reason, d.created_at, d.died_at
      from shoal.dead_jobs d
      where true ${conditions(db, window)}
      order by d.id desc
      limit ${scan}::integer
    ),
    bounds as (select min(id) as scanned_to, count(*)::integer as scanned from window_)
    select w.*, b.scanned_to, b.scanned
    from bounds b left join lateral (
      select * from window_ d
      where true ${conditions(db, after)}
      order by d.id desc
      limit ${limit}::integer
    ) w on true`;
  return keysetPage(rows, limit, scan);
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

/** The most dead jobs one retry statement of retryDeadMatching() puts back. */
export const MAX_RETRY_BATCH = 1000;
/** The most dead jobs one retryDeadMatching() call reads: past this it stops, `more` set. */
export const MAX_RETRY_TOTAL = 10_000;

/** What retryDeadMatching() retries: the dashboard's filters, up to the newest id shown. */
export interface RetryMatchingFilter {
  queue?: string;
  task?: string;
  /** Only dead jobs with an id up to this one: those the page showed, and older. */
  throughId: string;
}

/**
 * Retry the dead jobs matching `filter`, newest first, in set-based statements of at most
 * {@link MAX_RETRY_BATCH} read along the primary key (or the queue's index), at most
 * {@link MAX_RETRY_TOTAL} per call, with retryDead()'s rules (a live job holding the dedupe
 * key: "duplicate"; an ended execution: "execution_ended"; either stays dead). `more`: the
 * cap stopped it before the oldest match.
 */
export async function retryDeadMatching(
  db: Db,
  filter: RetryMatchingFilter,
): Promise<Record<Exclude<RetryDeadOutcome, "not_found">, number> & { more: boolean }> {
  const fn = "retryDeadMatching";
  checkDb(fn, db);
  checkOptions(fn, filter, "filter", ["queue", "task", "throughId"]);
  checkString(fn, "filter.queue", filter.queue, { optional: true });
  checkString(fn, "filter.task", filter.task, { optional: true });
  checkId(fn, "filter.throughId", filter.throughId);
  const counts = { retried: 0, duplicate: 0, execution_ended: 0, more: false };
  let through = filter.throughId;
  let read = 0;
  while (read < MAX_RETRY_TOTAL) {
    const batch = Math.min(MAX_RETRY_BATCH, MAX_RETRY_TOTAL - read);
    const where = deadConditions(db, { ...filter, throughId: through });
    const [row] = await db<
      { picked: number; oldest: string | null; retried: number; ended: number }[]
    >`
      with picked as (
        select id from shoal.dead_jobs
        where true ${conditions(db, where)}
        order by id desc
        limit ${batch}::integer
        for update
      ),
      ${revival(db)}
      select (select count(*)::integer from picked) as picked,
        (select min(id)::text from picked) as oldest,
        (select count(*)::integer from removed) as retried,
        (select count(*)::integer from ended) as ended,
        (select count(*) from woken) as woken -- referenced, so the notify runs`;
    const { picked, oldest, retried, ended } = row!;
    read += picked;
    counts.retried += retried;
    counts.execution_ended += ended;
    counts.duplicate += picked - retried - ended;
    if (picked < batch || oldest === null) return counts;
    // Those left (duplicates, ended executions) are not read again.
    through = String(BigInt(oldest) - 1n);
    if (through === "0") return counts;
  }
  counts.more = true;
  return counts;
}

/** Most dead jobs deadByQueueWithin() reads: past this, a queue's figure is a lower bound. */
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
