/**
 * Fan-out / fan-in (the Celery chord, done in one database): `shoal.barriers` and
 * `shoal.arrivals`. A handler fans out N children with a callback; each child's ack, its
 * arrival (once per child index, fenced by its job token), the decrement and, for the
 * last child, the callback's enqueue commit in one transaction (`shoal.complete_jobs`).
 * The SQL functions (`shoal.fan_out`, `shoal.complete_jobs`, ...) live in
 * `sql/functions/workflow.sql`; the tables are created by `sql/003_executions.sql`.
 *
 * @module
 */
import { checkDb, checkInteger, checkOptions, MAX_INT4 } from "./args.ts";
import type { Db, Fragment } from "./db.ts";
import { checkName, checkPayload, DEFAULT_MAX_PAYLOAD_BYTES } from "./names.ts";
import { checkRef, checkRefs, type JobRef } from "./queue.ts";
import { type AnyTask, taskSettings } from "./tasks.ts";

/**
 * One job of a fan-out: a child, the callback, or the error callback. Its task is a name,
 * or a definition (from defineTask) whose queue and attempts apply unless set here. The
 * payload is not type-checked against a definition: a callback's is completed by shoal
 * (`results`, `error`), so it is not what its handler receives.
 */
export interface FanOutJob {
  task: string | AnyTask;
  payload?: Record<string, unknown>;
  /** Default: the definition's queue, else the producer's queue. */
  queue?: string;
  /** Default: the definition's, else 25. */
  maxAttempts?: number;
}

export interface FanOutSpec {
  children: FanOutJob[];
  /** Runs once after the last child, with `payload.results` in child order. */
  callback: FanOutJob;
  /** Runs once if a child fails for good or the fan-out expires (`payload.error`). */
  onError?: FanOutJob;
  /** Fail the execution if the children have not all arrived by then (default 24 h). */
  expiresInMs?: number;
}

export const DEFAULT_MAX_CHILDREN = 100_000;
/** The longest a fan-out may stay open: 10 years (shoal.fan_out in sql/functions/workflow.sql checks the same). */
export const MAX_EXPIRES_IN_MS = 315_576_000_000;

/**
 * One job of a fan-out as the JSON `shoal.fan_out` takes. Built as text: a payload's JSON
 * comes from checkPayload() and goes into the statement as it is, never parsed back.
 */
function jobJson(job: FanOutJob, what: string, maxPayloadBytes: number): string {
  if (job === null || typeof job !== "object") {
    throw new TypeError(`Invalid ${what}: expected an object`);
  }
  // A definition's settings apply where the job does not set its own.
  const task = taskSettings(job.task);
  const queue = job.queue ?? task.queue;
  const maxAttempts = job.maxAttempts ?? task.maxAttempts;
  let json = `{"task":${JSON.stringify(checkName("task", task.name))}`;
  if (queue !== undefined) json += `,"queue":${JSON.stringify(checkName("queue", queue))}`;
  if (job.payload !== undefined) json += `,"payload":${checkPayload(job.payload, maxPayloadBytes)}`;
  if (maxAttempts !== undefined) {
    if (!Number.isInteger(maxAttempts) || maxAttempts < 1 || maxAttempts > 1000) {
      throw new RangeError(`Invalid ${what} maxAttempts: expected 1 to 1000`);
    }
    json += `,"max_attempts":${maxAttempts}`;
  }
  return json + "}";
}

/**
 * A fan-out checked by checkFanOut(): the JSON `shoal.fan_out` takes. Handing it to
 * fanOut() skips checking it again (the database checks what it receives regardless).
 */
export class CheckedFanOut {
  constructor(
    /** The spec as JSON text: children, callback, on_error, expires_in_ms. */
    readonly json: string,
    readonly children: number,
  ) {}

  /**
   * The same fan-out carrying `traceparent` (lib/tracing.ts: the fan-out's span), which
   * `shoal.fan_out` stores with its children and callbacks. The caller checked it.
   */
  withTraceparent(traceparent: string): CheckedFanOut {
    // The JSON is an object built by checkFanOut(): its closing brace is its last character.
    return new CheckedFanOut(
      `${this.json.slice(0, -1)},"traceparent":${JSON.stringify(traceparent)}}`,
      this.children,
    );
  }
}

/**
 * Validate a fan-out at the boundary (before anything is enqueued) and return it as the
 * JSON `shoal.fan_out` takes. A fan-out larger than `maxChildren` is a RangeError.
 */
export function checkFanOut(
  spec: FanOutSpec,
  options: { maxChildren?: number; maxPayloadBytes?: number } = {},
): CheckedFanOut {
  const maxChildren = options.maxChildren ?? DEFAULT_MAX_CHILDREN;
  const maxBytes = options.maxPayloadBytes ?? DEFAULT_MAX_PAYLOAD_BYTES;
  if (spec === null || typeof spec !== "object" || !Array.isArray(spec.children)) {
    throw new TypeError("Invalid fan-out: children must be an array");
  }
  if (spec.children.length > maxChildren) {
    throw new RangeError(
      `Invalid fan-out: ${spec.children.length} children, over the limit of ${maxChildren}`,
    );
  }
  const children = spec.children.map((c, i) => jobJson(c, `child ${i}`, maxBytes));
  let json = `{"children":[${children.join(",")}],"callback":${
    jobJson(spec.callback, "callback", maxBytes)
  }`;
  if (spec.onError !== undefined) {
    json += `,"on_error":${jobJson(spec.onError, "error callback", maxBytes)}`;
  }
  if (spec.expiresInMs !== undefined) {
    // Bounded, or a huge value would pass here and fail in SQL (timestamp out of range) on
    // every redelivery of the parent instead of failing its handler once.
    if (
      !Number.isInteger(spec.expiresInMs) || spec.expiresInMs <= 0 ||
      spec.expiresInMs > MAX_EXPIRES_IN_MS
    ) {
      throw new RangeError(
        "Invalid fan-out expiresInMs: expected a positive integer of at most 10 years",
      );
    }
    json += `,"expires_in_ms":${spec.expiresInMs}`;
  }
  return new CheckedFanOut(json + "}", children.length);
}

/**
 * Fan out from a claimed job, in one transaction with its ack. Returns the execution id,
 * or null when the job's claim was stale (nothing changed). A spec already checked by
 * checkFanOut() is sent as it is.
 */
export async function fanOut(
  db: Db,
  parent: JobRef,
  spec: FanOutSpec | CheckedFanOut,
  options: { maxChildren?: number; maxPayloadBytes?: number } = {},
): Promise<string | null> {
  checkDb("fanOut", db);
  checkRef("fanOut", "parent", parent);
  checkOptions("fanOut", options);
  checkInteger("fanOut", "options.maxChildren", options.maxChildren, {
    min: 0,
    max: MAX_INT4,
    optional: true,
  });
  checkInteger("fanOut", "options.maxPayloadBytes", options.maxPayloadBytes, {
    min: 1,
    max: MAX_INT4,
    optional: true,
  });
  const checked = spec instanceof CheckedFanOut ? spec : checkFanOut(spec, options);
  const [row] = await db<{ execution: string | null }[]>`
    select shoal.fan_out(${parent.id}::bigint, ${parent.token}::bigint,
      ${checked.json}::text::jsonb,
      ${options.maxChildren ?? DEFAULT_MAX_CHILDREN}::integer) as execution`;
  return row!.execution;
}

/** A finished job of an execution, with its handler's result. */
export interface Completion extends JobRef {
  result: unknown;
}

/**
 * Complete jobs that belong to executions (barrier children, callbacks, plain steps) in
 * one statement: ack, arrival, decrement, callback, execution completion. Returns the
 * ids that were still ours.
 */
export async function completeJobs(db: Db, done: Completion[]): Promise<string[]> {
  checkDb("completeJobs", db);
  checkRefs("completeJobs", "done", done);
  if (done.length === 0) return [];
  const rows = await db<{ id: string }[]>`
    select id from shoal.complete_jobs(
      ${done.map((d) => d.id)}::bigint[], ${done.map((d) => d.token)}::bigint[],
      ${JSON.stringify(done.map((d) => d.result ?? null))}::text::jsonb)`;
  return rows.map((r) => r.id);
}

/**
 * completeJobs()'s call as a fragment yielding the `id`s still ours, for a statement that
 * completes jobs beside other work in one commit (lib/steps.ts recordCheckpoints(): a round of
 * checkpoint records carries the completions handed in meanwhile). `after` is evaluated before
 * the call (an argument depends on it): the caller's lock of every job of its statement, in id
 * order, so the call's own lock of its jobs finds them held and the lock order holds.
 */
export function completeJobsFragment(
  db: Db,
  done: readonly Completion[],
  after: Fragment,
): Fragment {
  return db`
    select c.id from shoal.complete_jobs(
      case when (${after}) is not null then ${done.map((d) => d.id)}::bigint[] end,
      ${done.map((d) => d.token)}::bigint[],
      ${JSON.stringify(done.map((d) => d.result ?? null))}::text::jsonb) c`;
}

/** The reaper's sweep: fail executions whose fan-out expired; returns how many. */
export async function expireBarriers(db: Db, limit: number): Promise<number> {
  const [row] = await db<{ n: number }[]>`select shoal.expire_barriers(${limit}::integer) as n`;
  return row!.n;
}

/** Whether any fan-out is past its deadline (the reaper's cheap check each tick). */
export async function hasExpiredBarriers(db: Db): Promise<boolean> {
  const [row] = await db<{ found: boolean }[]>`
    select exists (select 1 from shoal.barriers where expires_at < now()) as found`;
  return row!.found;
}
