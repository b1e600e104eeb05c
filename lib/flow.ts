/**
 * Flow control from TypeScript: pausing queues; per (queue, key) concurrency limits, rate
 * limits and holds; fairness weights. The tables are sql/015_flow.sql's and the functions
 * that change them sql/functions/flow.sql's (`shoal.pause_queue`, `shoal.set_rate_limit`,
 * ...): this module calls those, so SQL, the CLI and TypeScript change flow control one way,
 * and reads it back for `shoal status` and `/metrics` in one statement ({@link flowStatus}).
 * The claim enforces them (sql/functions/claim.sql, "Flow control").
 *
 * The key of a concurrency limit, a rate limit or a hold is a job's flow key: its
 * `concurrencyKey` when one was given at enqueue, else its fairness key (`fairnessKey`; `""`
 * for a job enqueued without one). A limit without a key is the queue's default for every key
 * that has no limit of its own. A weight is a fairness key's.
 *
 * A limit may also name a task (THE TASK RULE in sql/functions/flow.sql). A task that some
 * concurrency or rate limit of a queue names has limits of its own there: its jobs on that
 * queue are counted apart, per key, and only the limits naming it apply to them (its default
 * and its keys' own); the queue's other limits do not. Every other job counts under the
 * queue's limits as before. So a limit of 3 naming task `export` lets each key run 3 exports
 * at once whatever else it runs, a limit of 0 naming a task pauses that task alone, and a cap
 * across keys is a task's default on jobs that share one key. A hold names a key and
 * optionally a task: it holds what a job of that task and key counts under (the task's own
 * limits if it has some on the queue, else the queue's for the key). In {@link flowStatus},
 * `task` is null on the rows of the queue's own limits and holds.
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
  MAX_INT4,
  refusal,
} from "./args.ts";
import type { Db } from "./db.ts";
import { MAX_FAIRNESS_KEY_LENGTH } from "./names.ts";
import { MAX_HOLD_MS } from "./queue.ts";

/** The largest limit (the column's check in sql/015_flow.sql says the same). */
export const MAX_RUNNING_LIMIT = 1_000_000;
/** The most starts a rate limit allows per period (sql/015_flow.sql's check). */
export const MAX_RATE_STARTS = 1_000_000;
/** The longest period of a rate limit: a day (sql/015_flow.sql's check). */
export const MAX_RATE_PERIOD_MS = 86_400_000;
/** The heaviest fairness weight (sql/015_flow.sql's check). */
export const MAX_FAIRNESS_WEIGHT = 1000;

/** A paused queue: no consumer claims its jobs until it is resumed. */
export interface PausedQueue {
  queue: string;
  paused_at: Date;
}

/** A concurrency limit and the slots it counts now. */
export interface ConcurrencyLimit {
  queue: string;
  /** The task whose jobs it counts apart; null: the queue's jobs no limit counts apart. */
  task: string | null;
  /** The flow key it caps; null: the queue's default for every key without its own row. */
  key: string | null;
  /** Most jobs of one key claimed at once. */
  max_running: number;
  /**
   * Claimed jobs that hold a slot under this row now (the slot rule in
   * sql/functions/flow.sql): the key's, or for a default the sum over the keys that have no
   * row of their own, among the jobs of its task (or, for a row without a task, of the
   * queue's jobs no limit counts apart). Jobs in a consumer's prefetch buffer count: they are
   * claimed.
   */
  slots_held: number;
}

/** A rate limit: a token bucket of `max_starts` tokens refilled at `max_starts` per period. */
export interface RateLimit {
  queue: string;
  /** The task whose jobs it counts apart; null: the queue's jobs no limit counts apart. */
  task: string | null;
  /** The flow key it limits; null: the queue's default for every key without its own row. */
  key: string | null;
  /** Most claims of one key per period on average, and the largest burst. */
  max_starts: number;
  period_ms: number;
}

/**
 * A held key: none of its jobs on the queue is claimed before `held_until` (with a task, none
 * of that task's jobs of the key, the task having limits of its own on the queue).
 */
export interface HeldKey {
  queue: string;
  /** The task whose jobs of the key are held; null: the key's jobs no limit counts apart. */
  task: string | null;
  key: string;
  held_until: Date;
}

/** A fairness key's weight on a queue (keys without one weigh 1). */
export interface FairnessWeight {
  queue: string;
  key: string;
  weight: number;
}

/**
 * Flow control as it stands: `shoal status`'s `flow`. Each list by queue, then task (rows
 * without one first), then key.
 */
export interface FlowStatus {
  paused: PausedQueue[];
  /** Concurrency limits, each queue's (and each task's) default first. */
  limits: ConcurrencyLimit[];
  /** Each queue's (and each task's) default first. */
  rate_limits: RateLimit[];
  /** Holds not yet ended. */
  holds: HeldKey[];
  weights: FairnessWeight[];
}

export interface SetConcurrencyLimitOptions {
  queue: string;
  /** 0 to 1,000,000; 0 holds every job of the key back. */
  maxRunning: number;
  /** The flow key it caps; omitted or null: the queue's default for every key. */
  key?: string | null;
  /**
   * The task whose jobs it counts apart (THE TASK RULE); omitted or null: the queue's jobs
   * that no limit counts apart.
   */
  task?: string | null;
}

export interface ClearConcurrencyLimitOptions {
  queue: string;
  /** The flow key whose own limit goes; omitted or null: the queue's default. */
  key?: string | null;
  /** The task whose limit goes; omitted or null: a limit that names no task. */
  task?: string | null;
}

export interface SetRateLimitOptions {
  queue: string;
  /** 1 to 1,000,000 claims per period per key. */
  maxStarts: number;
  /** The period in milliseconds: 1 to 86,400,000 (a day). */
  periodMs: number;
  /** The flow key it limits; omitted or null: the queue's default for every key. */
  key?: string | null;
  /**
   * The task whose jobs it counts apart (THE TASK RULE); omitted or null: the queue's jobs
   * that no limit counts apart.
   */
  task?: string | null;
}

export interface ClearRateLimitOptions {
  queue: string;
  /** The flow key whose own rate limit goes; omitted or null: the queue's default. */
  key?: string | null;
  /** The task whose rate limit goes; omitted or null: a rate limit that names no task. */
  task?: string | null;
}

export interface HoldKeyOptions {
  queue: string;
  /** The flow key held (`""`: jobs with neither a concurrency nor a fairness key). */
  key: string;
  /** 0 to 86,400,000 ms (a day); 0 lifts the key's hold. */
  forMs: number;
  /**
   * Hold only this task's jobs of the key, if the task has limits of its own on the queue
   * (else the hold is the key's, as without a task); omitted or null: the key's jobs that no
   * limit counts apart.
   */
  task?: string | null;
}

export interface SetFairnessWeightOptions {
  queue: string;
  /** The fairness key weighted (`""`: jobs enqueued without one). */
  key: string;
  /** 1 to 1000. */
  weight: number;
}

export interface ClearFairnessWeightOptions {
  queue: string;
  key: string;
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
 * Check a limit's key: a string of at most 256 characters (a fairness or concurrency key's
 * length; `""` is the key of jobs enqueued without one), or unless `required` null or omitted
 * for the queue's default.
 */
function checkLimitKey(fn: string, value: unknown, required = false): void {
  checkString(fn, "options.key", value, {
    optional: !required,
    nullable: !required,
    empty: true,
  });
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
 * Check a limit's task: a task name, or null or omitted for the queue's jobs that no limit
 * counts apart.
 */
function checkLimitTask(fn: string, value: unknown): void {
  if (value !== null) checkNameArg(fn, "options.task", "task", value, { optional: true });
}

/**
 * At most `maxRunning` jobs of the queue run at once per key, across every consumer: with a
 * `key`, for that key alone (over the default); without, for every key of the queue that has
 * no limit of its own. With a `task`, of that task's jobs, which from then on are counted
 * apart from the queue's others and under its limits alone (THE TASK RULE); `maxRunning` 0
 * then pauses the task. Replaces the limit it names; takes effect at the next claim (jobs
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
  checkOptions(fn, options, "options", ["queue", "maxRunning", "key", "task"]);
  checkNameArg(fn, "options.queue", "queue", options.queue);
  checkInteger(fn, "options.maxRunning", options.maxRunning, { min: 0, max: MAX_RUNNING_LIMIT });
  checkLimitKey(fn, options.key);
  checkLimitTask(fn, options.task);
  await db`
    select shoal.set_concurrency_limit(${options.queue}::text, ${options.maxRunning}::integer,
                                       ${options.key ?? null}::text, ${
    options.task ?? null
  }::text)`;
}

/**
 * Remove a limit: a key's own (the queue's default applies to it again, if any), or without
 * `key` the queue's default; with `task`, the task's. A task whose last limit goes has none
 * of its own any more: its jobs count under the queue's limits again. False when there was
 * none.
 */
export async function clearConcurrencyLimit(
  db: Db,
  options: ClearConcurrencyLimitOptions,
): Promise<boolean> {
  const fn = "clearConcurrencyLimit";
  checkDb(fn, db);
  checkObject(fn, "options", options);
  // A misspelt key option must not clear the queue's default instead.
  checkOptions(fn, options, "options", ["queue", "key", "task"]);
  checkNameArg(fn, "options.queue", "queue", options.queue);
  checkLimitKey(fn, options.key);
  checkLimitTask(fn, options.task);
  const [row] = await db<{ cleared: boolean }[]>`
    select shoal.clear_concurrency_limit(${options.queue}::text, ${options.key ?? null}::text,
                                         ${options.task ?? null}::text) as cleared`;
  return row!.cleared;
}

/**
 * At most `maxStarts` claims of the queue's jobs per `periodMs` per key, across every
 * consumer: a token bucket, so the rate on average and a burst of up to `maxStarts` after a
 * quiet spell. With a `key`, for that key alone (over the default); without, for every key
 * of the queue that has no rate limit of its own. With a `task`, of that task's jobs, which
 * from then on are counted apart from the queue's others and under its limits alone (THE TASK
 * RULE). Replaces the rate limit it names; takes effect at the next claim. Jobs over the limit
 * wait unclaimed.
 */
export async function setRateLimit(db: Db, options: SetRateLimitOptions): Promise<void> {
  const fn = "setRateLimit";
  checkDb(fn, db);
  checkObject(fn, "options", options);
  // A misspelt option must not count as missing: a "fairnessKey" would set the default.
  checkOptions(fn, options, "options", ["queue", "maxStarts", "periodMs", "key", "task"]);
  checkNameArg(fn, "options.queue", "queue", options.queue);
  checkInteger(fn, "options.maxStarts", options.maxStarts, { min: 1, max: MAX_RATE_STARTS });
  checkInteger(fn, "options.periodMs", options.periodMs, { min: 1, max: MAX_RATE_PERIOD_MS });
  checkLimitKey(fn, options.key);
  checkLimitTask(fn, options.task);
  await db`
    select shoal.set_rate_limit(${options.queue}::text, ${options.maxStarts}::integer,
                                ${options.periodMs}::integer, ${options.key ?? null}::text,
                                ${options.task ?? null}::text)`;
}

/**
 * Remove a rate limit: a key's own (the queue's default applies to it again, if any), or
 * without `key` the queue's default; with `task`, the task's. A task whose last limit goes
 * has none of its own any more: its jobs count under the queue's limits again. False when
 * there was none.
 */
export async function clearRateLimit(db: Db, options: ClearRateLimitOptions): Promise<boolean> {
  const fn = "clearRateLimit";
  checkDb(fn, db);
  checkObject(fn, "options", options);
  // A misspelt key option must not clear the queue's default instead.
  checkOptions(fn, options, "options", ["queue", "key", "task"]);
  checkNameArg(fn, "options.queue", "queue", options.queue);
  checkLimitKey(fn, options.key);
  checkLimitTask(fn, options.task);
  const [row] = await db<{ cleared: boolean }[]>`
    select shoal.clear_rate_limit(${options.queue}::text, ${options.key ?? null}::text,
                                  ${options.task ?? null}::text) as cleared`;
  return row!.cleared;
}

/**
 * Hold a key: none of its jobs on the queue is claimed for the next `forMs` (say, after a
 * server's 429; a handler can do it with `RetryLaterError`'s `holdKey`). A hold already
 * reaching further stays; `forMs` 0 lifts the hold. Jobs of the key already claimed go on.
 * With a `task` that has limits of its own on the queue, only that task's jobs of the key are
 * held; a task without holds the key's jobs that no limit counts apart, as no task does.
 * Returns when the hold ends (the database's clock; now when lifted).
 */
export async function holdKey(db: Db, options: HoldKeyOptions): Promise<Date> {
  const fn = "holdKey";
  checkDb(fn, db);
  checkObject(fn, "options", options);
  checkOptions(fn, options, "options", ["queue", "key", "forMs", "task"]);
  checkNameArg(fn, "options.queue", "queue", options.queue);
  checkLimitKey(fn, options.key, true);
  checkInteger(fn, "options.forMs", options.forMs, { min: 0, max: MAX_HOLD_MS });
  checkLimitTask(fn, options.task);
  const [row] = await db<{ until: Date }[]>`
    select shoal.hold_key(${options.queue}::text, ${options.key}::text,
                          ${options.forMs}::bigint, ${options.task ?? null}::text) as until`;
  return row!.until;
}

/**
 * Whether `task` has limits of its own on `queue` (a concurrency or rate limit naming it),
 * as shoal.flow_scope says: the task then, else `""` (its jobs count under the queue's
 * limits, and a hold naming it holds the key's jobs that no limit counts apart).
 */
export async function flowScope(db: Db, queue: string, task: string): Promise<string> {
  checkDb("flowScope", db);
  checkNameArg("flowScope", "queue", "queue", queue);
  checkNameArg("flowScope", "task", "task", task);
  const [row] = await db<{ scope: string }[]>`
    select shoal.flow_scope(${queue}::text, ${task}::text) as scope`;
  return row!.scope;
}

/**
 * Weigh a fairness key on a queue: under contention it starts `weight` jobs for each job of
 * a key of weight 1. Applies to the key's jobs enqueued from now on (a job's place in the
 * claim order is fixed at enqueue). Replaces the key's weight.
 */
export async function setFairnessWeight(
  db: Db,
  options: SetFairnessWeightOptions,
): Promise<void> {
  const fn = "setFairnessWeight";
  checkDb(fn, db);
  checkObject(fn, "options", options);
  checkOptions(fn, options, "options", ["queue", "key", "weight"]);
  checkNameArg(fn, "options.queue", "queue", options.queue);
  checkLimitKey(fn, options.key, true);
  checkInteger(fn, "options.weight", options.weight, { min: 1, max: MAX_FAIRNESS_WEIGHT });
  await db`
    select shoal.set_fairness_weight(${options.queue}::text, ${options.key}::text,
                                     ${options.weight}::integer)`;
}

/** A key's weight back to 1, for jobs enqueued from now on. False when it had none. */
export async function clearFairnessWeight(
  db: Db,
  options: ClearFairnessWeightOptions,
): Promise<boolean> {
  const fn = "clearFairnessWeight";
  checkDb(fn, db);
  checkObject(fn, "options", options);
  checkOptions(fn, options, "options", ["queue", "key"]);
  checkNameArg(fn, "options.queue", "queue", options.queue);
  checkLimitKey(fn, options.key, true);
  const [row] = await db<{ cleared: boolean }[]>`
    select shoal.clear_fairness_weight(${options.queue}::text, ${options.key}::text)
      as cleared`;
  return row!.cleared;
}

/**
 * Remove up to `limit` slot rows that hold nothing (their job is gone, or was acked, retried
 * or claimed again by a path that left its row): the reaper's housekeeping. Returns how many
 * went. Counting is right without it (the slot rule); it keeps the table small.
 */
export async function pruneSlots(db: Db, limit: number): Promise<number> {
  checkDb("pruneSlots", db);
  checkInteger("pruneSlots", "limit", limit, { min: 1, max: MAX_INT4 });
  const [row] = await db<{ pruned: number }[]>`
    select shoal.prune_slots(${limit}::integer) as pruned`;
  return row!.pruned;
}

/**
 * Whether flow control left anything for {@link pruneSlots} to remove (shoal.has_flow_leftovers:
 * slot rows that hold nothing, keys that remember nothing): the reaper's cheap check before
 * it opens a transaction.
 */
export async function hasStaleSlots(db: Db): Promise<boolean> {
  const [row] = await db<{ found: boolean }[]>`select shoal.has_flow_leftovers() as found`;
  return row!.found;
}

/** One row of {@link flowStatus}'s statement; which columns are set depends on `kind`. */
interface FlowRow {
  kind: "paused" | "limit" | "rate" | "hold" | "weight";
  queue: string;
  /** A limit's or hold's task; null when it names none, and for pauses and weights. */
  task: string | null;
  key: string | null;
  /** max_running, max_starts or weight. */
  n: number | null;
  /** slots_held or period_ms. */
  m: number | null;
  /** paused_at or held_until. */
  at: Date | null;
}

/**
 * Flow control as it stands, in one statement (a `/metrics` scrape reads it beside the queue
 * counts): the paused queues, the concurrency limits with the slots each counts now, the rate
 * limits, the holds not yet ended and the fairness weights.
 */
export async function flowStatus(db: Db): Promise<FlowStatus> {
  checkDb("flowStatus", db);
  const rows = await db<FlowRow[]>`
    select 'paused' as kind, p.queue::text as queue, null::text as task, null::text as key,
      null::integer as n, null::integer as m, p.paused_at as at
    from shoal.queue_pauses p
    union all
    select 'limit', l.queue::text, nullif(l.task, ''), l.key, l.max_running,
      case when l.key is not null then shoal.slots_held(l.queue, l.key, l.task)
      else shoal.default_slots_held(l.queue, l.task) end,
      null
    from shoal.concurrency_limits l
    union all
    select 'rate', r.queue::text, nullif(r.task, ''), r.key, r.max_starts, r.period_ms, null
    from shoal.rate_limits r
    union all
    select 'hold', k.queue, nullif(k.task, ''), k.key, null, null, k.held_until
    from shoal.flow_keys k
    where k.held_until > now()
    union all
    select 'weight', w.queue::text, null, w.key, w.weight, null, null
    from shoal.fairness_weights w
    order by 2, 3 nulls first, 4 nulls first`;
  const status: FlowStatus = { paused: [], limits: [], rate_limits: [], holds: [], weights: [] };
  for (const r of rows) {
    switch (r.kind) {
      case "paused":
        status.paused.push({ queue: r.queue, paused_at: r.at! });
        break;
      case "limit":
        status.limits.push({
          queue: r.queue,
          task: r.task,
          key: r.key,
          max_running: r.n!,
          slots_held: r.m!,
        });
        break;
      case "rate":
        status.rate_limits.push({
          queue: r.queue,
          task: r.task,
          key: r.key,
          max_starts: r.n!,
          period_ms: r.m!,
        });
        break;
      case "hold":
        status.holds.push({ queue: r.queue, task: r.task, key: r.key!, held_until: r.at! });
        break;
      case "weight":
        status.weights.push({ queue: r.queue, key: r.key!, weight: r.n! });
        break;
    }
  }
  return status;
}
