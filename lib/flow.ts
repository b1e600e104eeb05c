/**
 * Flow control from TypeScript: pausing queues and capping running jobs per (queue, key).
 * The tables are sql/015_flow.sql's and the functions that change them sql/functions/flow.sql's
 * (`shoal.pause_queue`, `shoal.set_concurrency_limit`, ...): this module calls those, so SQL,
 * the CLI and TypeScript change flow control one way, and reads it back for `shoal status`
 * and `/metrics` in one statement ({@link flowStatus}). The claim enforces both
 * (sql/functions/claim.sql, "Flow control").
 *
 * The key of a limit is a job's fairness key (`fairnessKey` at enqueue; `""` for a job
 * enqueued without one). A limit without a key is the queue's default for every key that
 * has no limit of its own.
 *
 * @module
 */
import {
  checkDb,
  checkInteger,
  checkNameArg,
  checkObject,
  checkOptions,
  checkString,
  refusal,
} from "./args.ts";
import type { Db } from "./db.ts";
import { MAX_FAIRNESS_KEY_LENGTH } from "./names.ts";

/** The largest limit (the column's check in sql/015_flow.sql says the same). */
export const MAX_RUNNING_LIMIT = 1_000_000;

/** A paused queue: no consumer claims its jobs until it is resumed. */
export interface PausedQueue {
  queue: string;
  paused_at: Date;
}

/** A concurrency limit and the slots it counts now. */
export interface ConcurrencyLimit {
  queue: string;
  /** The fairness key it caps; null: the queue's default for every key without its own row. */
  key: string | null;
  /** Most jobs of one key claimed at once. */
  max_running: number;
  /**
   * Claimed jobs that hold a slot under this row now (the slot rule in
   * sql/functions/flow.sql): the key's, or for a default the sum over the queue's keys that
   * have no row of their own. Jobs in a consumer's prefetch buffer count: they are claimed.
   */
  slots_held: number;
}

/** Flow control as it stands: `shoal status`'s `flow`. */
export interface FlowStatus {
  /** By queue name. */
  paused: PausedQueue[];
  /** By queue name, each queue's default first, then by key. */
  limits: ConcurrencyLimit[];
}

export interface SetConcurrencyLimitOptions {
  queue: string;
  /** 0 to 1,000,000; 0 holds every job of the key back. */
  maxRunning: number;
  /** The fairness key it caps; omitted or null: the queue's default for every key. */
  key?: string | null;
}

export interface ClearConcurrencyLimitOptions {
  queue: string;
  /** The fairness key whose own limit goes; omitted or null: the queue's default. */
  key?: string | null;
}

/**
 * Stop claiming a queue's jobs from the next claim on; jobs already claimed run to their end,
 * enqueues and schedule fires still land. False when it was paused already.
 */
export async function pauseQueue(db: Db, queue: string): Promise<boolean> {
  checkDb("pauseQueue", db);
  checkNameArg("pauseQueue", "queue", "queue", queue);
  const [row] = await db<{ paused: boolean }[]>`
    select shoal.pause_queue(${queue}::text) as paused`;
  return row!.paused;
}

/** Claim a paused queue's jobs again, waking its consumers. False when it was not paused. */
export async function resumeQueue(db: Db, queue: string): Promise<boolean> {
  checkDb("resumeQueue", db);
  checkNameArg("resumeQueue", "queue", "queue", queue);
  const [row] = await db<{ resumed: boolean }[]>`
    select shoal.resume_queue(${queue}::text) as resumed`;
  return row!.resumed;
}

/**
 * Check a limit's key: a string of at most 256 characters (a fairness key's length; `""` is
 * the key of jobs enqueued without one), or null or omitted for the queue's default.
 */
function checkLimitKey(fn: string, value: unknown): void {
  checkString(fn, "options.key", value, { optional: true, nullable: true, empty: true });
  if (typeof value === "string" && value.length > MAX_FAIRNESS_KEY_LENGTH) {
    throw refusal(
      `options.key for ${fn}()`,
      `a string of at most ${MAX_FAIRNESS_KEY_LENGTH} characters`,
      value,
      RangeError,
    );
  }
}

/**
 * At most `maxRunning` jobs of the queue run at once per key, across every consumer: with a
 * `key`, for that key alone (over the default); without, for every key of the queue that has
 * no limit of its own. Replaces the limit it names; takes effect at the next claim (jobs
 * already claimed over a lowered limit run to their end).
 */
export async function setConcurrencyLimit(
  db: Db,
  options: SetConcurrencyLimitOptions,
): Promise<void> {
  const fn = "setConcurrencyLimit";
  checkDb(fn, db);
  checkObject(fn, "options", options);
  // A misspelt option must not count as missing: a "fairnessKey" would set the default.
  checkOptions(fn, options, "options", ["queue", "maxRunning", "key"]);
  checkNameArg(fn, "options.queue", "queue", options.queue);
  checkInteger(fn, "options.maxRunning", options.maxRunning, { min: 0, max: MAX_RUNNING_LIMIT });
  checkLimitKey(fn, options.key);
  await db`
    select shoal.set_concurrency_limit(${options.queue}::text, ${options.maxRunning}::integer,
                                       ${options.key ?? null}::text)`;
}

/**
 * Remove a limit: a key's own (the queue's default applies to it again, if any), or without
 * `key` the queue's default. False when there was none.
 */
export async function clearConcurrencyLimit(
  db: Db,
  options: ClearConcurrencyLimitOptions,
): Promise<boolean> {
  const fn = "clearConcurrencyLimit";
  checkDb(fn, db);
  checkObject(fn, "options", options);
  // A misspelt key option must not clear the queue's default instead.
  checkOptions(fn, options, "options", ["queue", "key"]);
  checkNameArg(fn, "options.queue", "queue", options.queue);
  checkLimitKey(fn, options.key);
  const [row] = await db<{ cleared: boolean }[]>`
    select shoal.clear_concurrency_limit(${options.queue}::text, ${options.key ?? null}::text)
      as cleared`;
  return row!.cleared;
}

/**
 * The paused queues and the concurrency limits with the slots each counts now, in one
 * statement (a `/metrics` scrape reads it beside the queue counts).
 */
export async function flowStatus(db: Db): Promise<FlowStatus> {
  checkDb("flowStatus", db);
  const rows = await db<{
    kind: "paused" | "limit";
    queue: string;
    key: string | null;
    max_running: number | null;
    slots_held: number | null;
    paused_at: Date | null;
  }[]>`
    select 'paused' as kind, p.queue::text as queue, null::text as key,
      null::integer as max_running, null::integer as slots_held, p.paused_at
    from shoal.queue_pauses p
    union all
    select 'limit', l.queue::text, l.key, l.max_running,
      case when l.key is not null then shoal.slots_held(l.queue, l.key)
      else shoal.default_slots_held(l.queue) end,
      null::timestamptz
    from shoal.concurrency_limits l
    order by 1 desc, 2, 3 nulls first`;
  const status: FlowStatus = { paused: [], limits: [] };
  for (const r of rows) {
    if (r.kind === "paused") status.paused.push({ queue: r.queue, paused_at: r.paused_at! });
    else {
      status.limits.push({
        queue: r.queue,
        key: r.key,
        max_running: r.max_running!,
        slots_held: r.slots_held!,
      });
    }
  }
  return status;
}
