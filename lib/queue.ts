/**
 * The job queue: the statements on `shoal.jobs` and `shoal.dead_jobs` that enqueue,
 * claim, ack, extend, release and fail jobs (the dead-letter admin lives in dead.ts,
 * workflow completion in barrier.ts). Each function takes the database (a pool or the
 * caller's transaction) first and an options object second. The table's DDL is in the numbered migrations
 * (`sql/001_queue.sql` and later); the SQL functions enqueue calls, `shoal.insert_job(s)`,
 * and the `shoal.enqueue*` entry points live in `sql/functions/queue.sql`, the claim in
 * `sql/functions/claim.sql`, and the wake (`shoal.notify_jobs`) that every path making jobs
 * visible calls in `sql/functions/wake.sql`.
 *
 * Fencing: a claim hands out `token`; ack, fail, extend and release only touch a row
 * whose token still matches, so a worker whose job was redelivered changes nothing.
 *
 * The reads of the jobs tables live here too: per-queue counts (`shoal status`, /metrics),
 * their cumulative totals (`status --watch` rates) and the stuck-job report (the reaper).
 *
 * @module
 */
import {
  checkArray,
  checkBigintText,
  checkBoolean,
  checkDb,
  checkId,
  checkInteger,
  checkNameList,
  checkNumber,
  checkObject,
  checkOneOf,
  checkOptions,
  checkPool,
  checkString,
  checkToken,
  integerRefusal,
  isBigintFrom,
  isIntegerIn,
  isName,
  MAX_INT4,
  MAX_SPAN_MS,
  MAX_TIMER_MS,
  nameRefusal,
  refusal,
} from "./args.ts";
import { conditions, type Db, type Fragment, keysetPage, type Sql } from "./db.ts";
import { describeError, logger } from "./log.ts";
import {
  checkPayload,
  DEFAULT_MAX_PAYLOAD_BYTES,
  MAX_FAIRNESS_KEY_LENGTH,
  MAX_KEY_LENGTH,
} from "./names.ts";
import {
  type JobProgress,
  MAX_PROGRESS_JOBS,
  type ProgressReport,
  type WrittenProgress,
} from "./progress.ts";
import { type AnyTask, type TaskDefinition, taskSettings } from "./tasks.ts";
import { isTraceparent, TRACEPARENT_EXPECTED, tracer } from "./tracing.ts";

/** A claimed job, as a handler sees it. Bigint ids and tokens are strings. */
export interface Job {
  id: string;
  queue: string;
  task: string;
  payload: Record<string, unknown>;
  priority: number;
  fairness_key: string;
  /**
   * Its place among its queue's jobs of the same priority (a virtual-time stamp; claims run
   * priority first, then fair_seq, then id). A bigint, as a string.
   */
  fair_seq: string;
  /** Attempts so far, this one included (1 on the first run). */
  attempts: number;
  max_attempts: number;
  /** The fencing token of this claim. */
  token: string;
  key: string | null;
  execution_id: string | null;
  created_at: Date;
  /** The visibility deadline: redelivered after this unless extended. */
  deadline: Date;
}

/**
 * Where and how a job runs; every field optional. A queue or max attempts not given is the
 * task's in the catalog (what its consumers registered), else `default` and 25: the
 * catalog rule, stated in `sql/functions/queue.sql`.
 */
export interface EnqueueOptions {
  /**
   * Queue name; unless given, the definition's queue (enqueued through one), else the task's
   * catalog queue (`default` for a task never registered).
   */
  queue?: string;
  /** Earliest start; now unless given. */
  runAt?: Date;
  /** Higher runs first within a queue; default 0. */
  priority?: number;
  /** Dedupe key: while a job with this key is pending or running on the queue, enqueue returns its id. */
  key?: string;
  /** Jobs sharing a queue are served fairly across fairness keys (a tenant id, say). */
  fairnessKey?: string;
  /**
   * The key the queue's concurrency limits, rate limits and holds count this job under
   * (flow control, lib/flow.ts); its fairness key unless given.
   */
  concurrencyKey?: string;
  /**
   * Runs before the job is dead-lettered; unless given, the definition's, else the task's
   * catalog value (25 for a task never registered).
   */
  maxAttempts?: number;
  /**
   * The W3C trace context the job was enqueued under ("00-<trace id>-<span id>-<flags>"):
   * a traced consumer links the job's run to that span (lib/tracing.ts). Unless given, the
   * span active in the caller's context when this process has tracing on, else none.
   */
  traceparent?: string;
}

/**
 * What enqueue() and ctx.enqueue() take besides EnqueueOptions: the jobs this one runs after
 * (docs/workflows.md, "Dependencies"; `shoal.enqueue_after` in sql/functions/workflow.sql).
 */
export interface DependencyOptions {
  /**
   * Ids of jobs of one running execution (pending, running, sleeping, waiting, or completed)
   * that must complete before this job runs. The job joins their execution, is not
   * claimable until the last of them completes, and then receives their results in
   * `payload.dependencies`, keyed by job id. Takes no `key` and no `runAt`.
   */
  after?: readonly string[];
  /**
   * When a dependency fails for good: `"fail"` (the default) fails the execution, which
   * removes this job; `"run"` runs it anyway, the failure in `payload.dependency_errors`.
   */
  onDependencyFailure?: "fail" | "run";
}

/** The greatest job id (a bigint). */
const MAX_INT8 = 9223372036854775807n;

/** The most jobs one job may wait for (`shoal.enqueue_after` checks the same). */
export const MAX_DEPENDENCIES = 1000;

/** One job to enqueue by task name: its payload is not type-checked. */
export interface JobSpec extends EnqueueOptions {
  task: string;
  payload?: Record<string, unknown>;
}

/**
 * One job to enqueue through a task definition: the payload is the task's input type `I`
 * (see TaskDefinition), the queue and attempts the definition's unless set here.
 */
// deno-lint-ignore no-explicit-any
export interface TaskJobSpec<I = any> extends EnqueueOptions {
  // deno-lint-ignore no-explicit-any
  task: TaskDefinition<any, I>;
  payload: I;
}

/** One job to enqueue: by name, or through its task's definition. */
type AnyJobSpec = JobSpec | TaskJobSpec;

/**
 * The jobs enqueueMany() accepts, element by element: a job given a definition must carry
 * that task's payload type. A list written inline or built by `.map()` is checked; one
 * declared as `TaskJobSpec[]` is not (its definitions' payload types are erased to `any`).
 */
export type CheckedJobs<T extends readonly (JobSpec | TaskJobSpec)[]> = {
  [K in keyof T]: CheckedJob<T[K]>;
};
/**
 * One job checked like CheckedJobs' (a union of jobs member by member): given a definition,
 * it must carry that task's payload type.
 */
export type CheckedJob<S> = S extends { task: TaskDefinition<infer _P, infer I> } ? TaskJobSpec<I>
  : S;

export interface Enqueued {
  id: string;
  /** False when a job holding the same dedupe key was found instead. */
  inserted: boolean;
}

export const DEFAULT_QUEUE = "default";
export const DEFAULT_MAX_ATTEMPTS = 25;
/** Keep this many entries of a job's error history. */
const ERROR_HISTORY = 25;
/** Longest error message stored per attempt. */
const MAX_ERROR_LENGTH = 4000;
/** The longest hold of a key (shoal.hold_key refuses more): a day. */
export const MAX_HOLD_MS = 86_400_000;

export interface EnqueueManyOptions {
  /** Wake idle consumers with NOTIFY (default true). */
  notify?: boolean;
  /** Refuse payloads larger than this before sending (Postgres checks its own limit too). */
  maxPayloadBytes?: number;
}

/**
 * One validated job, as the columns `shoal.insert_job(s)` take (null: the column default;
 * for queue and max attempts, the task's in the catalog).
 */
interface JobColumns {
  queue: string | null;
  task: string;
  /** The payload's JSON text. */
  payload: string;
  /** ISO 8601. */
  runAt: string | null;
  priority: number | null;
  fairnessKey: string | null;
  concurrencyKey: string | null;
  maxAttempts: number | null;
  key: string | null;
  /** A W3C traceparent (lib/tracing.ts), or null. */
  traceparent: string | null;
}

/** The calls a job is checked for, as messages name them. */
type JobCall =
  | "enqueue"
  | "ctx.enqueue"
  | "enqueueMany"
  | "startExecution"
  | "startWorkflow"
  | "shoal enqueue";

/**
 * How messages name a job's fields, by the call the job came through: `options.runAt for
 * enqueue()`, `jobs[2].payload for enqueueMany()`, `job.task for startExecution()`, or the
 * flag of `shoal enqueue` (`--run-at`). A batch moves `index` along; a name is built only
 * when a check fails, so a valid job costs no string.
 */
export class JobArgs {
  /** The job's place in enqueueMany()'s `jobs`. */
  index = 0;
  /** The payload's name, for checkPayload(). */
  readonly payload = (): string => this.name("payload");
  /** The task argument's name, for taskSettings(). */
  readonly task = (): string => this.name("task");

  constructor(readonly fn: JobCall) {}

  /** A field of the job, or with `fromTask` of the definition it was given, as its caller wrote it. */
  name(field: string, fromTask = false): string {
    const path = fromTask ? `task.${field}` : field;
    switch (this.fn) {
      case "shoal enqueue":
        return fromTask ? "--task" : `--${field.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`;
      case "enqueueMany":
        return `jobs[${this.index}].${path} for enqueueMany()`;
      case "startExecution":
        return `job.${path} for startExecution()`;
      case "startWorkflow":
        return `spec.steps[${this.index}].${path} for startWorkflow()`;
      default: // enqueue(db, task, payload, options) and ctx.enqueue(task, payload, options)
        return `${
          fromTask || field === "task" || field === "payload" ? path : `options.${path}`
        } for ${this.fn}()`;
    }
  }
}

/** The names of enqueue()'s, ctx.enqueue()'s and the CLI's jobs: one job a call, no index. */
const ENQUEUE = new JobArgs("enqueue");
export const CTX_ENQUEUE: JobArgs = new JobArgs("ctx.enqueue");
export const CLI_ENQUEUE: JobArgs = new JobArgs("shoal enqueue");

/** A dedupe or fairness key: a string of 1 to `max` characters without NUL. */
function keyField(args: JobArgs, value: unknown, max: number, field: string): string {
  if (typeof value === "string" && value.length > 0 && value.length <= max) {
    // Postgres text cannot hold NUL; refuse here rather than fail the whole batch there.
    if (!value.includes("\0")) return value;
    throw new TypeError(`Invalid ${args.name(field)}: contains a NUL character`);
  }
  const Kind = typeof value === "string" && value.length > max ? RangeError : TypeError;
  throw refusal(args.name(field), `a string of 1 to ${max} characters`, value, Kind);
}

/**
 * The traceparent of the span active where a call was made (tracing on in this process),
 * or null: what the call's jobs without a traceparent of their own carry. Read once per
 * call, not per job (a batch of thousands asks the context manager once).
 */
function activeTraceparent(): string | null {
  return tracer()?.activeTraceparent() ?? null;
}

/**
 * Validate a job at the boundary; throws a TypeError or RangeError with one line naming
 * the field and the call (`args`). `active` is the call's activeTraceparent().
 */
function checkColumns(
  spec: AnyJobSpec,
  maxPayloadBytes: number,
  args: JobArgs,
  active: string | null,
): JobColumns {
  // Dependencies are enqueue()'s alone (enqueueAfter() takes them off first): anywhere else
  // they would be dropped without a word.
  const deps = spec as DependencyOptions;
  if (deps.after !== undefined || deps.onDependencyFailure !== undefined) {
    throw new TypeError(
      `Invalid ${
        args.name(deps.after !== undefined ? "after" : "onDependencyFailure")
      }: only enqueue() and ctx.enqueue() take dependencies (or startWorkflow()'s steps)`,
    );
  }
  // A definition's settings apply where the job does not set its own. Not given at all:
  // null, so the insert takes the task's catalog queue and attempts (the catalog rule). A
  // null from plain JavaScript counts as not given, as it always has.
  const settings = taskSettings(spec.task, args.task);
  const byTask = typeof spec.task !== "string";
  const ownQueue = spec.queue !== undefined && spec.queue !== null;
  const given = ownQueue ? spec.queue : settings.queue;
  const queue = given === undefined || given === null ? null : given;
  if (queue !== null && !isName(queue)) {
    throw nameRefusal(args.name("queue", !ownQueue), "queue", queue);
  }
  const task = settings.name;
  if (!isName(task)) throw nameRefusal(args.name(byTask ? "name" : "task", byTask), "task", task);
  const maxAttempts = spec.maxAttempts ?? settings.maxAttempts;
  // Only a missing payload defaults to {}: null is a caller's mistake and is refused.
  const payload = checkPayload(
    spec.payload === undefined ? {} : spec.payload,
    maxPayloadBytes,
    args.payload,
  );
  let runAt: string | null = null;
  if (spec.runAt !== undefined) {
    if (!(spec.runAt instanceof Date) || Number.isNaN(spec.runAt.getTime())) {
      throw refusal(args.name("runAt"), "a valid Date", spec.runAt);
    }
    runAt = spec.runAt.toISOString();
  }
  if (spec.priority !== undefined && !isIntegerIn(spec.priority, -32767, 32767)) {
    throw integerRefusal(args.name("priority"), spec.priority, -32767, 32767);
  }
  if (maxAttempts !== undefined) {
    if (!isIntegerIn(maxAttempts, 1, 1000)) {
      throw integerRefusal(
        args.name("maxAttempts", spec.maxAttempts === undefined),
        maxAttempts,
        1,
        1000,
      );
    }
  }
  const key = spec.key === undefined ? null : keyField(args, spec.key, MAX_KEY_LENGTH, "key");
  const fairnessKey = spec.fairnessKey === undefined
    ? null
    : keyField(args, spec.fairnessKey, MAX_FAIRNESS_KEY_LENGTH, "fairnessKey");
  // The same limit as a fairness key's: flow control's keys are both.
  const concurrencyKey = spec.concurrencyKey === undefined
    ? null
    : keyField(args, spec.concurrencyKey, MAX_FAIRNESS_KEY_LENGTH, "concurrencyKey");
  let traceparent: string | null = null;
  if (spec.traceparent !== undefined && spec.traceparent !== null) {
    if (!isTraceparent(spec.traceparent)) {
      throw refusal(args.name("traceparent"), TRACEPARENT_EXPECTED, spec.traceparent);
    }
    traceparent = spec.traceparent;
  } else {
    // Tracing on in this process: the span active where enqueue was called, if any.
    traceparent = active;
  }
  return {
    queue,
    task,
    payload,
    runAt,
    priority: spec.priority ?? null,
    fairnessKey,
    concurrencyKey,
    maxAttempts: maxAttempts ?? null,
    key,
    traceparent,
  };
}

/**
 * enqueueOne() for a job with dependencies: checked here, held by `shoal.enqueue_after` until
 * they complete. Its wake, if any, is the release's (at the last dependency's ack).
 */
async function enqueueAfter(
  db: Db,
  task: string | AnyTask,
  payload: unknown,
  options: EnqueueOptions & EnqueueManyOptions & DependencyOptions,
  maxBytes: number,
  args: JobArgs,
): Promise<string> {
  const { after, onDependencyFailure, ...rest } = options;
  if (!Array.isArray(after) || after.length === 0 || after.length > MAX_DEPENDENCIES) {
    throw refusal(args.name("after"), `an array of 1 to ${MAX_DEPENDENCIES} job ids`, after);
  }
  for (const id of after) {
    if (typeof id !== "string" || !/^[1-9][0-9]{0,18}$/.test(id) || BigInt(id) > MAX_INT8) {
      throw refusal(args.name("after"), "job ids (strings of digits)", id);
    }
  }
  if (
    onDependencyFailure !== undefined && onDependencyFailure !== "fail" &&
    onDependencyFailure !== "run"
  ) {
    throw refusal(args.name("onDependencyFailure"), '"fail" or "run"', onDependencyFailure);
  }
  for (const field of ["key", "runAt"] as const) {
    if (rest[field] !== undefined) {
      throw new TypeError(
        `Invalid ${
          args.name(field)
        }: a job with dependencies takes no ${field} (it runs when they complete)`,
      );
    }
  }
  const job = checkColumns(
    { ...rest, task, payload } as AnyJobSpec,
    maxBytes,
    args,
    activeTraceparent(),
  );
  const [row] = await db<{ id: string }[]>`
    select shoal.enqueue_after(
      ${after as string[]}::bigint[], ${job.task}::text, ${job.payload}::text::jsonb,
      queue => ${job.queue}::text, priority => ${job.priority ?? 0}::integer,
      fairness_key => ${job.fairnessKey}::text, max_attempts => ${job.maxAttempts}::integer,
      concurrency_key => ${job.concurrencyKey}::text, traceparent => ${job.traceparent}::text,
      on_dependency_failure => ${onDependencyFailure ?? "fail"}::text) as id`;
  return row!.id;
}

/**
 * Validate a job at the boundary and return the row `shoal.enqueue_many` takes; throws
 * a TypeError or RangeError with one clear line, naming the field as `args` says.
 */
export function checkJobSpec(
  spec: AnyJobSpec,
  maxPayloadBytes: number,
  args: JobArgs,
): Record<string, unknown> {
  const columns = checkColumns(spec, maxPayloadBytes, args, activeTraceparent());
  const row: Record<string, unknown> = {
    task: columns.task,
    payload: JSON.parse(columns.payload),
  };
  if (columns.queue !== null) row.queue = columns.queue;
  if (columns.runAt !== null) row.run_at = columns.runAt;
  if (columns.priority !== null) row.priority = columns.priority;
  if (columns.maxAttempts !== null) row.max_attempts = columns.maxAttempts;
  if (columns.key !== null) row.key = columns.key;
  if (columns.fairnessKey !== null) row.fairness_key = columns.fairnessKey;
  if (columns.concurrencyKey !== null) row.concurrency_key = columns.concurrencyKey;
  if (columns.traceparent !== null) row.traceparent = columns.traceparent;
  return row;
}

/**
 * NOTIFY coalescing for one pool. A NOTIFY takes a database-wide lock from its
 * transaction's pre-commit to the end of its commit, so concurrent enqueues that each
 * notify commit one after another, each waiting for its own WAL flush. An enqueue that
 * runs alone on its pool notifies inline (delivered at its commit: no extra round trip);
 * one that overlaps others commits without it and then waits for a shared
 * `select shoal.notify_jobs(...)` that starts after its commit, so an idle consumer is still
 * woken for every committed job, and many commits share one notifying transaction.
 * Only for pools: inside a caller's transaction (or on a reserved connection, which may be
 * in one) the commit is not ours to see, so the NOTIFY stays inline.
 */
class Wakeups {
  /** Enqueues with NOTIFY on that run on this pool now, their wait for a flush included. */
  active = 0;
  /**
   * Committed jobs owed a NOTIFY, not yet taken by a flush: their queue (null: their task's
   * in the catalog) and start (null: now), deduplicated; shoal.notify_jobs turns them into
   * payloads.
   */
  #owed = new Map<string, { queue: string | null; task: string; runAt: string | null }>();
  /** The flush on the wire, if any. */
  #sending: Promise<void> | null = null;
  /** The flush that starts when the one on the wire ends; it takes what is owed then. */
  #next: Promise<void> | null = null;

  constructor(readonly sql: Sql) {}

  /** Owe a NOTIFY for these committed jobs; resolves once it is sent. */
  owe(jobs: readonly JobColumns[]): Promise<void> {
    for (const { queue, task, runAt } of jobs) {
      // Without a queue, the task stands for it (a name holds no space).
      const where = queue === null ? `task ${task}` : queue;
      this.#owed.set(`${where} ${runAt}`, { queue, task, runAt });
    }
    this.#next ??= this.#afterSending().then(() => this.#send());
    return this.#next;
  }

  async #afterSending(): Promise<void> {
    // #send never rejects (it logs), so this only orders the flushes.
    await this.#sending;
  }

  async #send(): Promise<void> {
    this.#sending = this.#next;
    this.#next = null;
    const owed = [...this.#owed.values()];
    this.#owed.clear();
    const queues = owed.map((o) => o.queue);
    const runAts = owed.map((o) => o.runAt);
    try {
      if (queues.includes(null)) {
        // Jobs enqueued by task name went to their task's queue: the catalog rule finds it
        // again (a registration in between sends this wake astray; the poll still finds them).
        await this.sql`
          select shoal.notify_jobs(s.queues, ${runAts}::timestamptz[])
          from shoal.task_settings_many(${owed.map((o) => o.task)}::text[], ${queues}::text[],
                                        null) s`;
      } else {
        await this.sql`select shoal.notify_jobs(${queues}::text[], ${runAts}::timestamptz[])`;
      }
    } catch (error) {
      // The jobs are committed: failing the enqueue would invite a duplicate. Consumers
      // still find them at their next poll.
      logger("queue").warn(
        "Cannot wake consumers of {queue} after enqueue, they pick the jobs up at their next poll: {error}",
        {
          queue: [...new Set(owed.map((o) => o.queue ?? `(the queue of ${o.task})`))].join(","),
          error: describeError(error),
        },
      );
    } finally {
      this.#sending = null;
    }
  }
}

const wakeups = new WeakMap<Sql, Wakeups>();

/** The pool's NOTIFY coalescer, or null when `db` is a transaction or a reserved connection. */
function wakeupsOf(db: Db): Wakeups | null {
  // Only a pool has begin() at runtime (postgres.js's transaction and reserved handles
  // do not), and only a pool commits each statement on its own.
  if (typeof (db as { begin?: unknown }).begin !== "function") return null;
  const sql = db as Sql;
  let found = wakeups.get(sql);
  if (found === undefined) {
    found = new Wakeups(sql);
    wakeups.set(sql, found);
  }
  return found;
}

/**
 * Insert validated jobs; `notify` sends the NOTIFY inside the statement's transaction.
 * Jobs with a traceparent go through statements of their own: the untraced ones stay the
 * statements they were, with no argument more to send.
 */
async function insertJobs(db: Db, jobs: JobColumns[], notify: boolean): Promise<Enqueued[]> {
  if (jobs.length === 1) {
    const job = jobs[0]!;
    if (job.traceparent !== null) return await insertTraced(db, job, notify);
    const rows = await db<Enqueued[]>`
      select id, inserted from shoal.insert_job(
        ${job.queue}::text, ${job.task}::text, ${job.payload}::text::jsonb,
        ${job.runAt}::timestamptz, ${job.priority}::integer, ${job.fairnessKey}::text,
        ${job.maxAttempts}::integer, ${job.key}::text, ${notify}::boolean,
        concurrency_key => ${job.concurrencyKey}::text)`;
    return [{ id: rows[0]!.id, inserted: rows[0]!.inserted }];
  }
  const queues = jobs.map((j) => j.queue);
  const tasks = jobs.map((j) => j.task);
  const payloads = jobs.map((j) => j.payload);
  const runAts = column(jobs, (j) => j.runAt);
  const priorities = column(jobs, (j) => j.priority);
  const fairnessKeys = column(jobs, (j) => j.fairnessKey);
  const maxAttempts = column(jobs, (j) => j.maxAttempts);
  const keys = column(jobs, (j) => j.key);
  const concurrencyKeys = column(jobs, (j) => j.concurrencyKey);
  const traceparents = column(jobs, (j) => j.traceparent);
  const rows = traceparents === null
    ? await db<Enqueued[]>`
    select id, inserted from shoal.insert_jobs(
      ${queues}::text[], ${tasks}::text[], ${payloads}::text[]::jsonb[],
      ${runAts}::timestamptz[], ${priorities}::integer[], ${fairnessKeys}::text[],
      ${maxAttempts}::integer[], ${keys}::text[], ${notify}::boolean,
      concurrency_keys => ${concurrencyKeys}::text[])`
    : await db<Enqueued[]>`
    select id, inserted from shoal.insert_jobs(
      ${queues}::text[], ${tasks}::text[], ${payloads}::text[]::jsonb[],
      ${runAts}::timestamptz[], ${priorities}::integer[], ${fairnessKeys}::text[],
      ${maxAttempts}::integer[], ${keys}::text[], ${notify}::boolean,
      concurrency_keys => ${concurrencyKeys}::text[], traceparents => ${traceparents}::text[])`;
  return rows.map((r) => ({ id: r.id, inserted: r.inserted }));
}

/** insertJobs() for one job with a traceparent. */
async function insertTraced(db: Db, job: JobColumns, notify: boolean): Promise<Enqueued[]> {
  const rows = await db<Enqueued[]>`
    select id, inserted from shoal.insert_job(
      ${job.queue}::text, ${job.task}::text, ${job.payload}::text::jsonb,
      ${job.runAt}::timestamptz, ${job.priority}::integer, ${job.fairnessKey}::text,
      ${job.maxAttempts}::integer, ${job.key}::text, ${notify}::boolean,
      concurrency_key => ${job.concurrencyKey}::text, traceparent => ${job.traceparent}::text)`;
  return [{ id: rows[0]!.id, inserted: rows[0]!.inserted }];
}

/**
 * The traceparents stored with these jobs (ids as claimed), those that have one: what a
 * traced consumer reads after each claim, one statement per claim, so that the claim
 * itself stays as it is (and ships no column more) with tracing off.
 */
export async function jobTraceparents(
  db: Db,
  ids: readonly string[],
): Promise<{ id: string; traceparent: string }[]> {
  if (ids.length === 0) return [];
  return await db<{ id: string; traceparent: string }[]>`
    select j.id, j.traceparent from shoal.jobs j
    where j.id = any(${ids}::bigint[]) and j.traceparent is not null`;
}

/** One optional column of a batch, or null (all defaults) when no job sets it. */
function column<T>(jobs: JobColumns[], pick: (job: JobColumns) => T | null): (T | null)[] | null {
  let values: (T | null)[] | null = null;
  for (let i = 0; i < jobs.length; i++) {
    const value = pick(jobs[i]!);
    if (value !== null && values === null) values = new Array<T | null>(jobs.length).fill(null);
    if (values !== null) values[i] = value;
  }
  return values;
}

/** What enqueueMany() takes, for messages. */
const JOBS = "an array of jobs ({ task, payload?, ... })";
const JOB = "a job ({ task, payload?, ... })";

/**
 * Throw unless `options` (of an enqueue named `fn`) is an object, or undefined, whose
 * `notify` and `maxPayloadBytes` are right: "false" would notify here and not in SQL, and
 * NaN would turn the size limit off.
 */
function checkBatchOptions(fn: string, options: unknown): void {
  checkOptions(fn, options);
  if (options === undefined) return;
  const { notify, maxPayloadBytes } = options as EnqueueManyOptions;
  checkBoolean(fn, "options.notify", notify, { optional: true });
  checkInteger(fn, "options.maxPayloadBytes", maxPayloadBytes, {
    min: 1,
    max: MAX_INT4,
    optional: true,
  });
}

/**
 * Enqueue many jobs in one statement (inside the caller's transaction when `db` is one).
 * Each job names its task (`task: "name"`) or carries its definition (`task: sendWelcome`:
 * its payload type-checked, its queue and attempts the definition's unless the job sets
 * them). Results are in input order. On a pool, the promise resolves once the jobs are
 * committed and idle consumers have been notified.
 */
export async function enqueueMany<T extends readonly (JobSpec | TaskJobSpec)[]>(
  db: Db,
  jobs: CheckedJobs<T>,
  options: EnqueueManyOptions = {},
): Promise<Enqueued[]> {
  checkDb("enqueueMany", db);
  checkArray("enqueueMany", "jobs", jobs, JOBS);
  checkBatchOptions("enqueueMany", options);
  const specs = jobs as readonly AnyJobSpec[];
  if (specs.length === 0) return [];
  const maxBytes = options.maxPayloadBytes ?? DEFAULT_MAX_PAYLOAD_BYTES;
  const args = new JobArgs("enqueueMany");
  const columns: JobColumns[] = [];
  const active = activeTraceparent();
  for (let i = 0; i < specs.length; i++) {
    const spec = specs[i]!;
    args.index = i;
    // Tested before the checker is called: its argument's name would be a string per job.
    if (spec === null || typeof spec !== "object" || Array.isArray(spec)) {
      checkObject("enqueueMany", `jobs[${i}]`, spec, { what: JOB });
    }
    columns.push(checkColumns(spec, maxBytes, args, active));
  }
  return await insertChecked(db, columns, options.notify ?? true);
}

/** Insert checked jobs, with the NOTIFY inline or coalesced (see Wakeups). */
async function insertChecked(
  db: Db,
  columns: JobColumns[],
  notify: boolean,
): Promise<Enqueued[]> {
  const pool = notify ? wakeupsOf(db) : null;
  if (pool === null) return await insertJobs(db, columns, notify);
  const alone = pool.active === 0;
  pool.active++;
  try {
    const results = await insertJobs(db, columns, alone);
    if (!alone) await pool.owe(columns);
    return results;
  } finally {
    pool.active--;
  }
}

/**
 * Enqueue one job through its task's definition (from defineTask): the payload must be the
 * task's input type (TaskDefinition's `I`: the handler's payload unless the definition
 * declares another), and the job goes to the definition's queue with its attempts unless
 * `options` set them. Returns the job id (or that of the job already holding its dedupe key).
 *
 * ```ts
 * await enqueue(db, sendWelcome, { userId: 1 }); // { userId: "1" } does not compile
 * ```
 */
export function enqueue<P, I>(
  db: Db,
  task: TaskDefinition<P, I>,
  payload: NoInfer<I>,
  options?: EnqueueOptions & EnqueueManyOptions & DependencyOptions,
): Promise<string>;
/**
 * Enqueue one job by task name, for producers that do not import the task's code: the
 * payload is not type-checked, and the job goes to `options.queue` (else `default`).
 * Returns the job id (or that of the job already holding its dedupe key).
 */
export function enqueue(
  db: Db,
  task: string,
  payload?: Record<string, unknown>,
  options?: EnqueueOptions & EnqueueManyOptions & DependencyOptions,
): Promise<string>;
export async function enqueue(
  db: Db,
  task: string | AnyTask,
  payload: unknown = {},
  options: EnqueueOptions & EnqueueManyOptions & DependencyOptions = {},
): Promise<string> {
  checkDb("enqueue", db);
  return await enqueueOne(db, task, payload, options, ENQUEUE);
}

/**
 * enqueue()'s work, its messages naming the call `args` stands for (enqueue(),
 * ctx.enqueue()); `db` is checked already.
 */
export async function enqueueOne(
  db: Db,
  task: string | AnyTask,
  payload: unknown,
  options: EnqueueOptions & EnqueueManyOptions & DependencyOptions,
  args: JobArgs,
): Promise<string> {
  checkBatchOptions(args.fn, options);
  const maxBytes = options.maxPayloadBytes ?? DEFAULT_MAX_PAYLOAD_BYTES;
  if (options.after !== undefined || options.onDependencyFailure !== undefined) {
    return await enqueueAfter(db, task, payload, options, maxBytes, args);
  }
  const spec = { ...options, task, payload } as AnyJobSpec;
  const [result] = await insertChecked(
    db,
    [checkColumns(spec, maxBytes, args, activeTraceparent())],
    options.notify ?? true,
  );
  return result!.id;
}

export interface ClaimOptions {
  queues: string[];
  /** At most this many jobs (the consumer's free slots). */
  limit: number;
  /** Who holds the claim, shown in status (host:pid). */
  workerId: string;
  /** How long the claim hides the job before it is redelivered. */
  visibilityMs: number;
  /**
   * A probe: claim only jobs ranking no later than this one (a higher priority, or the
   * same priority and a fair_seq no greater), such as jobs that arrived after a
   * consumer's buffered ones and rank ahead of them.
   */
  before?: { priority: number; fair_seq: string };
  /**
   * How many of the claimed jobs (the first, in claim order) the caller starts at once: the
   * claim records them as started, the rest as prefetched (claimed, waiting in the caller's
   * buffer) until `extend` records their start. All when omitted.
   */
  starting?: number;
  /**
   * Walk the claim index from its head (true, the default), or from a little before where
   * claiming has got to (false): the consumer's claims, which stay as fast while another
   * session holds a snapshot open, but miss jobs ranking before that point that became
   * visible again (a retry or delayed job due, an expired claim) until a claim from the
   * head (sql/functions/claim.sql, "Where a claim starts").
   */
  fromHead?: boolean;
  /**
   * Cancel the claim in the server after this many ms (SQLSTATE 57014): it runs in a
   * transaction of its own with a local statement_timeout, so `db` must be a pool. For a
   * claim from the head, whose walk a held snapshot can make arbitrarily long.
   */
  timeoutMs?: number;
}

export interface ClaimResult {
  jobs: Job[];
  /** Jobs found with their attempts already spent (a crash loop), dead-lettered unrun. */
  poisoned: { id: string; task: string; queue: string; attempts: number }[];
}

/**
 * Claim up to `limit` visible jobs in one round trip: priority first, then fair across
 * fairness keys, then oldest. A job claimed `max_attempts` times without ever finishing
 * is moved to the dead-letter table instead of being run again.
 */
export async function claim(db: Db, options: ClaimOptions): Promise<ClaimResult> {
  checkDb("claim", db);
  checkObject("claim", "options", options);
  checkNameList("claim", "options.queues", "queue", options.queues);
  checkInteger("claim", "options.limit", options.limit, { min: 1, max: MAX_INT4 });
  checkString("claim", "options.workerId", options.workerId);
  // 0 hides nothing: the claim is redeliverable at once (tests of redelivery use it).
  checkInteger("claim", "options.visibilityMs", options.visibilityMs, {
    min: 0,
    max: MAX_TIMER_MS,
  });
  if (options.before !== undefined) {
    checkObject("claim", "options.before", options.before);
    checkInteger("claim", "options.before.priority", options.before.priority, {
      min: -32767,
      max: 32767,
    });
    checkBigintText("claim", "options.before.fair_seq", options.before.fair_seq);
  }
  checkInteger("claim", "options.starting", options.starting, {
    min: 0,
    max: MAX_INT4,
    optional: true,
  });
  checkBoolean("claim", "options.fromHead", options.fromHead, { optional: true });
  if (options.timeoutMs !== undefined) {
    checkInteger("claim", "options.timeoutMs", options.timeoutMs, { min: 1, max: MAX_INT4 });
    checkPool("claim", db, "db");
  }
  // A queue listed twice would pick its jobs twice and fill the batch with duplicates.
  const queues = [...new Set(options.queues)];
  const rows = options.timeoutMs === undefined
    ? await claimRows(db, queues, options)
    : await (db as Sql).begin(async (tx) => {
      await tx`select set_config('statement_timeout', ${String(options.timeoutMs)}, true)`;
      return await claimRows(tx, queues, options);
    });
  const jobs: Job[] = [];
  const poisoned: ClaimResult["poisoned"] = [];
  for (const row of rows) {
    if (row.token === null) {
      poisoned.push({ id: row.id, task: row.task, queue: row.queue, attempts: row.attempts });
    } else jobs.push(row as Job);
  }
  return { jobs, poisoned };
}

/** The claim's one statement (its text lives in sql/functions/claim.sql, plan pinned). */
async function claimRows(
  db: Db,
  queues: string[],
  options: ClaimOptions,
): Promise<(Omit<Job, "token"> & { token: string | null })[]> {
  // A poisoned job (dead-lettered unrun) comes back with a null token, which no claimed job
  // has: each other row is a Job as it is, with no copy per job to drop a `poisoned` column.
  return await db<(Omit<Job, "token"> & { token: string | null })[]>`
    select id, queue, task, payload, priority, fairness_key, fair_seq, attempts, max_attempts,
      case when poisoned then null else token end as token, key, execution_id, created_at,
      deadline
    from shoal.claim_jobs(${queues}::text[], ${options.limit}::integer,
                          ${options.workerId}::text, ${options.visibilityMs}::integer,
                          ${options.before?.priority ?? null}::integer,
                          ${options.before?.fair_seq ?? null}::bigint,
                          ${options.starting ?? null}::integer,
                          ${options.fromHead ?? true}::boolean)`;
}

/** A claimed job's identity and fencing token. */
export interface JobRef {
  id: string;
  token: string;
}

/** Throw unless `ref` is a job ref (a claimed Job will do): an id and a token. */
export function checkRef(fn: string, arg: string, ref: unknown): void {
  checkObject(fn, arg, ref, { what: "a job ref ({ id, token })" });
  checkId(fn, `${arg}.id`, (ref as JobRef).id);
  checkToken(fn, `${arg}.token`, (ref as JobRef).token);
}

/** Throw unless `refs` is an array of job refs. */
export function checkRefs(fn: string, arg: string, refs: unknown): void {
  checkArray(fn, arg, refs, "an array of job refs ({ id, token })");
  for (let i = 0; i < (refs as unknown[]).length; i++) {
    const ref = (refs as unknown[])[i];
    // The element's name is built only for a refusal: heartbeats check thousands of refs.
    if (!isRef(ref)) checkRef(fn, `${arg}[${i}]`, ref);
  }
}

/** Whether `ref` passes checkRef(). */
function isRef(ref: unknown): boolean {
  return typeof ref === "object" && ref !== null && !Array.isArray(ref) &&
    isBigintFrom((ref as JobRef).id, 1) && isBigintFrom((ref as JobRef).token, 0);
}

/**
 * Lock the jobs that are still ours (id and token match) in id order: a fragment for a
 * `with` clause yielding `id` and `token` (lib/steps.ts fences checkpoint records, a sleep's
 * record and a wait's read with it; one job is a list of one). Cancelling or expiring an
 * execution takes its jobs in id order too: two statements that each take many jobs of one
 * execution in their own order deadlock. A token that moved on while we waited for the lock
 * drops the row (the lock re-checks the join against the newest version).
 *
 * Each row is reached through the primary key, one lookup per id, whatever the planner
 * believes: a locking subquery is never flattened into a join, so no plan can turn into a
 * join filter quadratic in the batch, or (a custom plan that sees a large array) a hash
 * join over a scan of the whole table. Either made a slow ack slower: a batch of acks that
 * grows while a slow one runs feeds on itself. Callers reach the locked rows again with
 * `j.id = any(array(select id from locked))`, a primary-key lookup too, not a join.
 */
export function lockOurs(db: Db, ids: readonly string[], tokens: readonly string[]): Fragment {
  return db`
    select x.id, x.token
    from (select u.id, u.token from unnest(${ids}::bigint[], ${tokens}::bigint[]) as u(id, token)
          order by u.id) a
    cross join lateral (
      select j.id, j.token from shoal.jobs j where j.id = a.id and j.token = a.token for update of j
    ) x`;
}

/** Ack (delete) finished jobs in one statement. Returns the ids that were still ours. */
export async function ack(db: Db, refs: JobRef[]): Promise<string[]> {
  checkDb("ack", db);
  checkRefs("ack", "refs", refs);
  if (refs.length === 0) return [];
  const rows = await db<{ id: string }[]>`
    with locked as (${lockOurs(db, idsOf(refs), tokensOf(refs))}),
    gone as (
      delete from shoal.jobs j where j.id = any(array(select l.id from locked l))
      returning j.id, j.queue, coalesce(j.concurrency_key, j.fairness_key) as flow_key
    ),
    -- Their concurrency slots are free (sql/functions/flow.sql); referenced, so it runs.
    -- With no key waiting for a slot anywhere, no function call.
    freed as (
      select case when exists (select 1 from shoal.flow_keys k where k.waiting)
                  then shoal.slots_freed(array_agg(g.queue), array_agg(g.flow_key)) end
      from gone g
    )
    select g.id from gone g cross join (select count(*) from freed) f`;
  return rows.map((r) => r.id);
}

/**
 * ack() for the consumer's completer, which holds finished jobs as two arrays, ids and
 * tokens (no object per job), taken from its own claims: they are not checked again, and
 * no row comes back per job. Returns how many were still ours.
 */
export async function ackClaimed(
  db: Db,
  ids: readonly string[],
  tokens: readonly string[],
): Promise<number> {
  if (ids.length === 0) return 0;
  const [row] = await db<{ acked: number }[]>`
    with locked as (${lockOurs(db, ids, tokens)}),
    gone as (
      delete from shoal.jobs j where j.id = any(array(select l.id from locked l))
      returning j.queue, coalesce(j.concurrency_key, j.fairness_key) as flow_key
    )
    -- Their concurrency slots are free (sql/functions/flow.sql); with no key waiting for a
    -- slot anywhere, no function call: a call per ack cost W2 about 3%.
    select count(*)::integer as acked,
      case when exists (select 1 from shoal.flow_keys k where k.waiting)
           then shoal.slots_freed(array_agg(g.queue), array_agg(g.flow_key)) end
    from gone g`;
  return row!.acked;
}

const idsOf = (refs: readonly JobRef[]): string[] => refs.map((r) => r.id);
const tokensOf = (refs: readonly JobRef[]): string[] => refs.map((r) => r.token);

/**
 * Push the visibility deadline of claimed jobs, and record as started those of `started`
 * (ids among `refs`) not recorded yet: a buffered job's start costs no write of its own.
 * Returns the ids that are still ours: not a job whose execution has ended (its row can
 * outlive a failure that found it locked), so its handler is aborted and the next claim
 * acks it unrun.
 */
export async function extend(
  db: Db,
  refs: JobRef[],
  visibilityMs: number,
  started: string[] = [],
): Promise<string[]> {
  checkDb("extend", db);
  checkRefs("extend", "refs", refs);
  checkInteger("extend", "visibilityMs", visibilityMs, { min: 0, max: MAX_TIMER_MS });
  checkArray("extend", "started", started, "an array of job ids");
  for (const id of started) checkId("extend", "started", id);
  if (refs.length === 0) return [];
  // `started` holds running handlers only (not the buffer): a search of a few per row.
  const rows = await db<{ id: string }[]>`
    with locked as (${lockOurs(db, idsOf(refs), tokensOf(refs))})
    update shoal.jobs j set run_at = now() + ${visibilityMs}::integer * interval '1 ms',
      started_at = coalesce(j.started_at,
        case when j.id = any(${started}::bigint[]) then now() end)
    where j.id = any(array(select l.id from locked l))
      and not exists (
        select 1 from shoal.executions e
        where e.id = j.execution_id and e.status in ('completed', 'failed', 'cancelled'))
    returning j.id`;
  return rows.map((r) => r.id);
}

/**
 * Hand a claimed job back until `runAt` (text of a timestamptz, as Postgres wrote it, sent as
 * text: a JS Date, or postgres.js's timestamptz serializer, would drop its microseconds) because
 * its handler suspended it (a durable sleep or a wait for an event, lib/steps.ts): unlocked, the token moved on (the run that suspended cannot
 * write again), the claim's attempt given back (a suspension is not a failed run), visible at
 * `runAt`, with the wake announced (sql/functions/wake.sql) and its concurrency slot freed,
 * and its progress report cleared (the run it described is over). Fenced by the token. Returns the job's new run_at, or null when the claim was no longer ours
 * (nothing changed). Run it in the transaction that recorded the suspension, after it.
 */
export async function suspendClaim(db: Db, job: JobRef, runAt: string): Promise<Date | null> {
  const [row] = await db<{ run_at: Date | null }[]>`
    with suspended as (
      update shoal.jobs j
      set locked_by = null, locked_at = null, started_at = null, token = j.token + 1,
          attempts = greatest(j.attempts - 1, 0), run_at = ${runAt}::text::timestamptz,
          progress = null
      where j.id = ${job.id}::bigint and j.token = ${job.token}::bigint
      returning j.queue, j.run_at, coalesce(j.concurrency_key, j.fairness_key) as flow_key
    ),
    woken as (
      select shoal.notify_jobs(array_agg(x.queue), array_agg(x.run_at)) from suspended x
    ),
    freed as (
      select shoal.slots_freed(array_agg(x.queue), array_agg(x.flow_key)) from suspended x
    )
    -- (the joins make the notify and the slot release run: a WITH select runs when referenced)
    select (select x.run_at from suspended x) as run_at,
      (select count(*) from woken) as woken, (select count(*) from freed) as freed`;
  return row!.run_at;
}

/**
 * Hand jobs back without burning an attempt (graceful shutdown): visible now, ownership
 * revoked (token bumped). Returns the ids that were still ours.
 */
export async function release(db: Db, refs: JobRef[]): Promise<string[]> {
  checkDb("release", db);
  checkRefs("release", "refs", refs);
  if (refs.length === 0) return [];
  const rows = await db<{ id: string }[]>`
    with locked as (${lockOurs(db, idsOf(refs), tokensOf(refs))}),
    released as (
      -- Level with where claiming has got to (the stamping rule's callback place): handed
      -- back, they run next, and claims that start near the head find them at once.
      update shoal.jobs j
      set locked_by = null, locked_at = null, started_at = null, run_at = now(),
          token = j.token + 1, attempts = greatest(j.attempts - 1, 0),
          fair_seq = greatest(j.fair_seq, coalesce(shoal.level_head(j.queue, j.priority),
                                                    j.fair_seq))
      where j.id = any(array(select l.id from locked l))
      returning j.id, j.queue, j.priority, j.fair_seq,
        coalesce(j.concurrency_key, j.fairness_key) as flow_key
    ),
    -- Visible at once: wake idle consumers rather than leave the jobs to their poll.
    woken as (
      select shoal.notify_jobs(array_agg(r.queue), null, array_agg(r.priority),
                               array_agg(r.fair_seq))
      from released r
    ),
    -- Their concurrency slots are free (sql/functions/flow.sql).
    freed as (select shoal.slots_freed(array_agg(r.queue), array_agg(r.flow_key)) from released r)
    -- (a plain select in a WITH runs only when referenced: the joins make it run once)
    select r.id from released r cross join (select count(*) from woken) w
      cross join (select count(*) from freed) f`;
  return rows.map((r) => r.id);
}

export interface FailOptions {
  /** Recorded on the row and in the error history; truncated to 4,000 characters. */
  error: string;
  /** Wait this long before the next attempt. */
  retryInMs: number;
  /** Dead-letter now whatever the attempts left (for example an invalid payload). */
  permanent?: boolean;
  /**
   * Hold the job's flow key (its concurrency key, else its fairness key) on its queue this
   * long: no job of the key is claimed until then (sql/functions/flow.sql shoal.hold_key; at
   * most a day).
   */
  holdKeyMs?: number;
}

export type FailOutcome = "retried" | "dead" | "stale";

/**
 * Record a failed attempt: retry after `retryInMs`, or move the job to the dead-letter
 * table when its attempts are spent (or the failure is permanent). "stale" means the job
 * was no longer ours and nothing changed. A dead-lettered job of an execution fails that
 * execution in the same transaction (a trigger on dead_jobs: see lib/execution.ts).
 */
export async function fail(db: Db, ref: JobRef, options: FailOptions): Promise<FailOutcome> {
  checkDb("fail", db);
  checkRef("fail", "ref", ref);
  checkObject("fail", "options", options);
  checkString("fail", "options.error", options.error, { empty: true });
  checkNumber("fail", "options.retryInMs", options.retryInMs, { min: 0, max: MAX_SPAN_MS });
  checkBoolean("fail", "options.permanent", options.permanent, { optional: true });
  checkInteger("fail", "options.holdKeyMs", options.holdKeyMs, {
    min: 0,
    max: MAX_HOLD_MS,
    optional: true,
  });
  const message = options.error.length > MAX_ERROR_LENGTH
    ? options.error.slice(0, MAX_ERROR_LENGTH - 1) + "…"
    : options.error;
  const [row] = await db<{ outcome: FailOutcome }[]>`
    with target as (
      select j.id, (j.attempts >= j.max_attempts or ${
    options.permanent ?? false
  }::boolean) as final,
        jsonb_path_query_array(
          j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempts, 'at', now(), 'error', ${message}::text)),
          ${`$[last-${ERROR_HISTORY - 1} to last]`}::jsonpath) as errors
      from shoal.jobs j
      where j.id = ${ref.id}::bigint and j.token = ${ref.token}::bigint
      for update
    ),
    dead as (
      delete from shoal.jobs j using target t where j.id = t.id and t.final
      returning j.*, t.errors as new_errors
    ),
    buried as (
      insert into shoal.dead_jobs (id, queue, task, payload, priority, fairness_key, attempts,
        max_attempts, token, key, execution_id, barrier_id, child_index, errors, reason,
        created_at, concurrency_key, traceparent)
      select d.id, d.queue, d.task, d.payload, d.priority, d.fairness_key, d.attempts,
        d.max_attempts, d.token, d.key, d.execution_id, d.barrier_id, d.child_index, d.new_errors,
        ${message}::text, d.created_at, d.concurrency_key, d.traceparent
      from dead d
      returning id
    ),
    retried as (
      update shoal.jobs j
      set locked_by = null, locked_at = null, started_at = null, token = j.token + 1,
          last_error = ${message}::text,
          errors = t.errors, run_at = now() + ${
    Math.round(options.retryInMs)
  }::bigint * interval '1 ms'
      from target t where j.id = t.id and not t.final
      returning j.id, j.queue, j.task, coalesce(j.concurrency_key, j.fairness_key) as flow_key,
        j.run_at
    ),
    -- Announce when the retry is due, so a listening consumer wakes for it on time
    -- instead of at its next poll.
    woken as (
      select shoal.notify_jobs(array_agg(r.queue), array_agg(r.run_at)) from retried r
    ),
    -- Retried or dead, its concurrency slot is free (sql/functions/flow.sql): a retry waits
    -- out its backoff without holding one.
    freed as (
      select shoal.slots_freed(array_agg(x.queue), array_agg(x.flow_key))
      from (select d.queue, coalesce(d.concurrency_key, d.fairness_key) as flow_key from dead d
            union all select r.queue, r.flow_key from retried r) x
    ),
    -- Told to hold its whole key (a 429, say): no job of the key is claimed meanwhile (of
    -- its task's, when its task has limits of its own: THE TASK RULE in flow.sql).
    held as (
      select shoal.hold_key(x.queue, x.flow_key, ${options.holdKeyMs ?? 0}::bigint, x.task)
      from (select d.queue, d.task, coalesce(d.concurrency_key, d.fairness_key) as flow_key
            from dead d
            union all select r.queue, r.task, r.flow_key from retried r) x
      where ${options.holdKeyMs ?? 0}::bigint > 0
    )
    select case when exists (select 1 from buried) then 'dead'
                when exists (select 1 from retried) then 'retried'
                else 'stale' end as outcome,
      (select count(*) from woken) as woken, -- referenced, so the notify runs
      (select count(*) from freed) as freed,
      (select count(*) from held) as held`;
  return row!.outcome;
}

/**
 * The delay before attempt `attempts + 1`: exponential from `baseMs` with ±25% jitter so a
 * burst of failures does not retry in lockstep, and never more than `maxMs`.
 */
export function backoffMs(attempts: number, baseMs = 1000, maxMs = 3_600_000): number {
  const exponential = Math.min(maxMs, baseMs * 2 ** Math.max(0, attempts - 1));
  // Cap after the jitter too: maxMs is a promise to the caller, not a midpoint.
  return Math.min(maxMs, Math.round(exponential * (0.75 + Math.random() * 0.5)));
}

/** One queue's jobs by state, as countJobs() reports them. */
export interface QueueCounts {
  queue: string;
  /** Visible now: pending and due, or claimed by a worker whose deadline passed. */
  ready: number;
  /** Pending with a future run_at (delayed, or waiting out a retry backoff). */
  scheduled: number;
  /** Claimed within their visibility deadline, handler started (see `prefetched`). */
  running: number;
  /**
   * Claimed within their visibility deadline, not started: waiting in a consumer's prefetch
   * buffer. A buffered job that starts counts here until its consumer's next heartbeat.
   */
  prefetched: number;
  /** Dead-lettered jobs: counted only with `{ dead: true }`, absent otherwise. */
  dead?: number;
  /** Seconds the oldest ready job has been visible (to the microsecond); 0 when none. */
  oldest_ready_age_s: number;
  /**
   * The ready jobs by task (tasks with none left out): only with `{ readyByTask: true }`,
   * absent otherwise.
   */
  ready_by_task?: Record<string, number>;
  /**
   * True when every figure of the row is a count; false when they are estimates (a large
   * table: see {@link CountOptions}).
   */
  exact: boolean;
}

/**
 * How countJobs() counts. Past a few thousand jobs it estimates instead of scanning the
 * table, by the count rule of `sql/functions/counts.sql`: a queue small enough to read
 * whole along the claim index is still counted, the others' ready and scheduled jobs come
 * from a block sample, their running and prefetched jobs from what live consumers reported
 * at their last heartbeat, their oldest ready age from the head of the claim order. The
 * limits' defaults live in that file; tests give small ones to take the estimating path.
 */
export interface CountOptions {
  /** Count dead letters too (`shoal status`); /metrics leaves them out. */
  dead?: boolean;
  /** Return each queue's ready jobs by task (`shoal status`, for the unserved jobs). */
  readyByTask?: boolean;
  /** Count every row, whatever the size: a scan of both tables (`shoal status --exact`). */
  exact?: boolean;
  /** Count exactly while Postgres counts at most this many live jobs (default 10,000). */
  exactLimit?: number;
  /** Pages a sample reads; a table of at most this many is counted (default 256). */
  samplePages?: number;
  /** Jobs read at the head of each (queue, priority) in claim order (default 200). */
  probe?: number;
}

/**
 * Ready, scheduled, running and prefetched jobs and the oldest ready age per queue, ordered
 * by queue, counted or estimated as {@link CountOptions} says (`shoal.job_counts`). With
 * `dead`, the dead-letter table is counted too (`shoal status`), and a queue holding only
 * dead jobs is listed; without it (/metrics, read every few seconds) the statement does not
 * name that table, which can be large: it is neither read nor locked.
 */
export async function countJobs(db: Db, options: CountOptions = {}): Promise<QueueCounts[]> {
  const dead = options.dead ?? false;
  const byTask = options.readyByTask ?? false;
  const exact = options.exact ?? false;
  const limit = options.exactLimit ?? null;
  const pages = options.samplePages ?? null;
  const probe = options.probe ?? null;
  const deadCounts = dead
    ? db`select queue, dead, exact
         from shoal.dead_counts(${exact}::boolean, ${limit}::integer, ${pages}::integer)`
    : db`select null::text as queue, 0::bigint as dead, true as exact where false`;
  const rows = await db<
    {
      queue: string;
      ready: string;
      scheduled: string;
      running: string;
      prefetched: string;
      dead: string;
      oldest_ready_age_s: number;
      ready_by_task: Record<string, number> | null;
      exact: boolean;
    }[]
  >`
    with live as (
      select * from shoal.job_counts(${exact}::boolean, ${limit}::integer, ${pages}::integer,
                                     ${probe}::integer)
    ),
    dead as (${deadCounts})
    select coalesce(l.queue, d.queue) as queue, coalesce(l.ready, 0) as ready,
      coalesce(l.scheduled, 0) as scheduled, coalesce(l.running, 0) as running,
      coalesce(l.prefetched, 0) as prefetched,
      coalesce(d.dead, 0) as dead, coalesce(l.oldest_ready_age_s, 0)::float8 as oldest_ready_age_s,
      l.ready_by_task, coalesce(l.exact, true) and coalesce(d.exact, true) as exact
    from live l full join dead d on d.queue = l.queue
    order by 1`;
  return rows.map((r) => ({
    queue: r.queue,
    ready: Number(r.ready),
    scheduled: Number(r.scheduled),
    running: Number(r.running),
    prefetched: Number(r.prefetched),
    ...(dead ? { dead: Number(r.dead) } : {}),
    oldest_ready_age_s: r.oldest_ready_age_s,
    ...(byTask ? { ready_by_task: r.ready_by_task ?? {} } : {}),
    exact: r.exact,
  }));
}

/**
 * Cumulative counts Postgres keeps for the jobs tables (pg_stat_user_tables): rows deleted
 * from shoal.jobs (acks, dead-letter moves, cancellations) and rows inserted into
 * shoal.dead_jobs. Each backend reports them within about a second, so rates from two
 * samples are estimates; they restart at 0 when the statistics are reset.
 */
export interface JobTotals {
  deleted: number;
  dead: number;
}

/** The jobs tables' cumulative totals, with the database clock they were read at. */
export async function jobTotals(db: Db): Promise<{ at: Date; totals: JobTotals }> {
  const [row] = await db<{ at: Date; deleted: string | null; dead: string | null }[]>`
    select clock_timestamp() as at,
      (select n_tup_del from pg_stat_user_tables
        where schemaname = 'shoal' and relname = 'jobs') as deleted,
      (select n_tup_ins from pg_stat_user_tables
        where schemaname = 'shoal' and relname = 'dead_jobs') as dead`;
  return {
    at: row!.at,
    totals: { deleted: Number(row!.deleted ?? 0), dead: Number(row!.dead ?? 0) },
  };
}

/** A claimed job that keeps outliving its deadline. */
export interface StuckJob {
  id: string;
  queue: string;
  task: string;
  attempts: number;
}

/**
 * Jobs claimed at least `minAttempts` times whose current claim's deadline has passed
 * (their worker crashed, or its handler blocks its event loop), longest overdue first, at
 * most `limit`. A read for the reaper's report: the next claim redelivers them.
 */
export async function listStuckJobs(
  db: Db,
  options: { minAttempts: number; limit: number },
): Promise<StuckJob[]> {
  return await db<StuckJob[]>`
    select id, queue, task, attempts from shoal.jobs
    where locked_by is not null and run_at < now()
      and attempts >= ${options.minAttempts}::integer
    order by run_at limit ${options.limit}::integer`;
}

/**
 * A job's state as the dashboard names it, read from its row: `ready` (visible now: pending
 * and due, or claimed by a worker whose deadline passed), `scheduled` (pending, run_at in the
 * future), `running` (claimed, handler started), `prefetched` (claimed, in a consumer's
 * buffer). Dead jobs live in shoal.dead_jobs (lib/dead.ts).
 */
export type LiveJobState = "ready" | "scheduled" | "running" | "prefetched";
export const LIVE_JOB_STATES: readonly LiveJobState[] = [
  "ready",
  "scheduled",
  "running",
  "prefetched",
];

/** A job as a listing shows it: no payload (it may be large), its state read from the row. */
export interface JobListRow {
  id: string;
  queue: string;
  task: string;
  state: LiveJobState;
  priority: number;
  fairness_key: string;
  key: string | null;
  attempts: number;
  max_attempts: number;
  execution_id: string | null;
  run_at: Date;
  created_at: Date;
  last_error: string | null;
}

/** What listJobs() filters on; every field optional. */
export interface JobFilter {
  queue?: string;
  task?: string;
  state?: LiveJobState;
  /** The dedupe key, exactly. */
  key?: string;
  fairnessKey?: string;
  executionId?: string;
}

export interface ListJobsOptions extends JobFilter {
  /** Only jobs with a smaller id (the keyset cursor of the previous page). */
  beforeId?: string;
  /** Most rows returned (default 50). */
  limit?: number;
  /** Most jobs read per call, newest first, before the filters (default 10,000). */
  scan?: number;
}

/** A page of jobs, newest first, and where the next page starts (null: no older job). */
export interface JobPage<T> {
  rows: T[];
  /** Pass as `beforeId` for the next page; null when the scan reached the oldest job. */
  next: string | null;
}

/** The default window listJobs() and listDeadPage() read per call. */
export const LIST_SCAN_ROWS = 10_000;

/**
 * A page of jobs, newest first (by id), keyset-paginated. The work is bounded whatever the
 * table's size: it reads at most `scan` jobs backwards along the primary key from
 * `beforeId` (or along the execution index when filtering by execution), then filters
 * them. A filter that matches rarely may so return fewer than `limit` rows (even none)
 * with a `next` cursor: the next page goes on searching from there. Never OFFSET, never a
 * count.
 */
export async function listJobs(
  db: Db,
  options: ListJobsOptions = {},
): Promise<JobPage<JobListRow>> {
  const fn = "listJobs";
  checkDb(fn, db);
  checkOptions(fn, options, "options", [
    "queue",
    "task",
    "state",
    "key",
    "fairnessKey",
    "executionId",
    "beforeId",
    "limit",
    "scan",
  ]);
  checkString(fn, "options.queue", options.queue, { optional: true });
  checkString(fn, "options.task", options.task, { optional: true });
  checkOneOf(fn, "options.state", options.state, LIVE_JOB_STATES, { optional: true });
  checkString(fn, "options.key", options.key, { optional: true });
  checkString(fn, "options.fairnessKey", options.fairnessKey, { optional: true, empty: true });
  if (options.executionId !== undefined) checkId(fn, "options.executionId", options.executionId);
  if (options.beforeId !== undefined) checkId(fn, "options.beforeId", options.beforeId);
  checkInteger(fn, "options.limit", options.limit, { min: 1, max: 1000, optional: true });
  checkInteger(fn, "options.scan", options.scan, { min: 1, max: 1_000_000, optional: true });
  const limit = options.limit ?? 50;
  const scan = options.scan ?? LIST_SCAN_ROWS;
  const rows = await db<(JobListRow & { scanned_to: string | null; scanned: number })[]>`
    ${listJobsStatement(db, options)}`;
  return keysetPage(rows, limit, scan);
}

/**
 * listJobs()'s statement, built from fragments so that each combination of filters is its own
 * statement text: Postgres then plans each with its index, even once it switches a prepared
 * statement to a generic plan (after five runs), which a `($1 is null or col = $1)` would
 * keep from any index. The window, read newest first, holds the filters an index serves:
 * the execution (jobs_execution_idx), the queue with its fairness key (jobs_fairness_idx)
 * or with its dedupe key (jobs_dedupe_idx); the others filter the window after.
 */
export function listJobsStatement(db: Db, options: ListJobsOptions = {}): Fragment {
  const limit = options.limit ?? 50;
  const scan = options.scan ?? LIST_SCAN_ROWS;
  const { queue, task, state, key, fairnessKey, executionId, beforeId } = options;
  const window: Fragment[] = [];
  const after: Fragment[] = [];
  if (beforeId !== undefined) window.push(db`and j.id < ${beforeId}::bigint`);
  if (executionId !== undefined) window.push(db`and j.execution_id = ${executionId}::bigint`);
  if (queue !== undefined) window.push(db`and j.queue = ${queue}::text`);
  const keyed = queue !== undefined ? window : after;
  if (key !== undefined) keyed.push(db`and j.key = ${key}::text`);
  if (fairnessKey !== undefined) keyed.push(db`and j.fairness_key = ${fairnessKey}::text`);
  if (task !== undefined) after.push(db`and j.task = ${task}::text`);
  if (state !== undefined) after.push(db`and j.state = ${state}::text`);
  return db`
    with window_ as (
      select j.id, j.queue, j.task, j.priority, j.fairness_key, j.key, j.attempts,
        j.max_attempts, j.execution_id, j.run_at, j.created_at, j.last_error,
        shoal.job_state(j.run_at, j.locked_by, j.started_at) as state
      from shoal.jobs j
      where true ${conditions(db, window)}
      order by j.id desc
      limit ${scan}::integer
    ),
    bounds as (select min(id) as scanned_to, count(*)::integer as scanned from window_)
    select w.*, b.scanned_to, b.scanned
    from bounds b left join lateral (
      select * from window_ j
      where true ${conditions(db, after)}
      order by j.id desc
      limit ${limit}::integer
    ) w on true`;
}

/** One job with everything the dashboard's job page shows. */
export interface JobDetail extends JobListRow {
  payload: Record<string, unknown>;
  concurrency_key: string | null;
  /** The consumer holding its claim (worker id), null when pending. */
  locked_by: string | null;
  locked_at: Date | null;
  started_at: Date | null;
  /** Each failed attempt: its number, when, and the error. */
  errors: { attempt: number; at: string; error: string }[];
  barrier_id: string | null;
  child_index: number | null;
}

/** A live job by id, or null (done, dead-lettered, or never enqueued). */
export async function getJob(db: Db, id: string): Promise<JobDetail | null> {
  checkDb("getJob", db);
  checkId("getJob", "id", id);
  const [row] = await db<JobDetail[]>`
    select j.id, j.queue, j.task, j.priority, j.fairness_key, j.key, j.attempts, j.max_attempts,
      j.execution_id, j.run_at, j.created_at, j.last_error, j.payload, j.concurrency_key,
      j.locked_by, j.locked_at, j.started_at, j.errors, j.barrier_id, j.child_index,
      shoal.job_state(j.run_at, j.locked_by, j.started_at) as state
    from shoal.jobs j where j.id = ${id}::bigint`;
  return row ?? null;
}

/**
 * Write the reports of jobs still ours (id and token match), locked in id order as every batch
 * that locks jobs does (lockOurs above: no deadlock with a cancel taking them in that
 * order). Returns how many were written.
 */
export async function saveProgress(db: Db, reports: readonly ProgressReport[]): Promise<number> {
  if (reports.length === 0) return 0;
  const ids = reports.map((r) => r.id);
  const tokens = reports.map((r) => r.token);
  const values = JSON.stringify(reports.map((r) => r.progress));
  const [row] = await db<{ n: number }[]>`
    with input as (
      select u.id, u.token, v.value as progress
      from unnest(${ids}::bigint[], ${tokens}::bigint[]) with ordinality as u(id, token, ord)
      join jsonb_array_elements(${values}::text::jsonb) with ordinality as v(value, ord)
        on v.ord = u.ord
      order by u.id
    ),
    locked as (
      select x.id, i.progress from input i
      cross join lateral (
        select j.id from shoal.jobs j where j.id = i.id and j.token = i.token for update of j
      ) x
    ),
    written as (
      update shoal.jobs j set progress = l.progress || jsonb_build_object('at', now())
      from locked l where j.id = l.id
      returning 1
    )
    select count(*)::integer as n from written`;
  return row!.n;
}

/** The claimed jobs with a reported progress, by id, at most `limit`. */
export async function listProgress(db: Db, limit = 20): Promise<JobProgress[]> {
  checkDb("listProgress", db);
  checkInteger("listProgress", "limit", limit, { min: 1, max: MAX_INT4 });
  const rows = await db<JobProgress[]>`
    select j.id::text as job_id, j.queue, j.task,
      (j.progress->>'done')::float8 as done, (j.progress->>'total')::float8 as total,
      j.progress->>'message' as message, (j.progress->>'at')::timestamptz as at
    from shoal.jobs j
    where j.progress is not null and j.locked_by is not null
    order by j.id
    limit ${limit}::integer`;
  return [...rows];
}

/**
 * The last written progress of up to {@link MAX_PROGRESS_JOBS} jobs, by job id (jobs without
 * one, or gone, are absent): one statement along the primary key. The dashboard's job and
 * execution pages read it; a job keeps its progress while it waits for a retry.
 */
export async function progressOf(
  db: Db,
  jobIds: readonly string[],
): Promise<Map<string, WrittenProgress>> {
  checkDb("progressOf", db);
  if (jobIds.length > MAX_PROGRESS_JOBS) {
    throw refusal("jobIds for progressOf()", `at most ${MAX_PROGRESS_JOBS} ids`, jobIds.length);
  }
  jobIds.forEach((id, i) => checkId("progressOf", `jobIds[${i}]`, id));
  if (jobIds.length === 0) return new Map();
  const rows = await db<({ job_id: string } & WrittenProgress)[]>`
    select j.id::text as job_id,
      (j.progress->>'done')::float8 as done, (j.progress->>'total')::float8 as total,
      j.progress->>'message' as message, (j.progress->>'at')::timestamptz as at
    from shoal.jobs j
    where j.id = any(${jobIds as string[]}::bigint[]) and j.progress is not null`;
  return new Map(rows.map(({ job_id, ...p }) => [job_id, p]));
}

/** Most reporting jobs progressTotals() reads: /metrics never scans a table without bound. */
export const PROGRESS_TOTALS_CAP = 10_000;

/** One queue's running jobs with a progress report, as progressTotals() sums them up. */
export interface QueueProgress {
  queue: string;
  /** Claimed jobs whose handler reported progress. */
  jobs: number;
  /** Mean of done / total (capped at 1) over those with a total above 0; null when none has. */
  ratio: number | null;
  /** Seconds since the oldest of their last reports was written (a stalled handler shows here). */
  stalest_s: number;
}

/**
 * Claimed jobs with a progress report, summed up per queue for /metrics (never one figure per
 * job: a job id is no label). Reads at most {@link PROGRESS_TOTALS_CAP} of them, by id, through
 * the partial index that holds only jobs that ever reported (sql/021_progress.sql).
 */
export async function progressTotals(db: Db): Promise<QueueProgress[]> {
  checkDb("progressTotals", db);
  const rows = await db<QueueProgress[]>`
    select p.queue, count(*)::integer as jobs,
      avg(least(p.done, p.total) / nullif(p.total, 0)) as ratio, -- least() would skip a null
      greatest(extract(epoch from now() - min(p.at)), 0)::float8 as stalest_s
    from (
      select j.queue, (j.progress->>'done')::float8 as done,
        (j.progress->>'total')::float8 as total, (j.progress->>'at')::timestamptz as at
      from shoal.jobs j
      where j.progress is not null and j.locked_by is not null
      order by j.id
      limit ${PROGRESS_TOTALS_CAP}::integer
    ) p
    group by p.queue
    order by p.queue`;
  return [...rows];
}
