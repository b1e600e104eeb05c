/**
 * Task definitions: what a consumer knows how to run. A task has a name, a default
 * queue, a handler, a retry budget, a timeout and an optional payload check. The stock
 * binary registers the built-ins below; a team's own entry file registers its tasks and
 * calls shoal's `main` (see examples/).
 *
 * @module
 */
import type { FanOutSpec } from "./barrier.ts";
import type { Db } from "./db.ts";
import { MAX_TIMER_MS } from "./duration.ts";
import type { Logger } from "./log.ts";
import { checkName } from "./names.ts";
import type { EnqueueOptions, Job } from "./queue.ts";
// These two import this module back: they only use its exports inside functions, so the
// cycle is safe whichever module loads first.
import { sqlTask, type SqlTaskSettings } from "./sql_task.ts";
import { httpTask, type HttpTaskSettings } from "./http_task.ts";

/** What a handler gets besides its payload. */
export interface TaskContext {
  job: Job;
  /** Aborted on timeout, shutdown, a lost claim, or its execution's cancel: stop promptly. */
  signal: AbortSignal;
  /** A logger that tags every line with the job id, task and attempt. */
  log: Logger;
  /** Enqueue another job (outside this job's ack; at-least-once like everything else). */
  enqueue(
    task: string,
    payload?: Record<string, unknown>,
    options?: EnqueueOptions,
  ): Promise<string>;
  /** The pool, for handlers that do their own database work. */
  db: Db;
  /**
   * Fan out children with a callback (fan-in). Nothing is enqueued unless the handler
   * then returns normally: the barrier and the children are committed with this job's
   * ack, in one transaction. The callback gets `payload.results`, in child order.
   */
  fanOut(spec: FanOutSpec): void;
}

export interface TaskDefinition<P = Record<string, unknown>> {
  /** Unique task name: letters, digits and `_.:-`. */
  name: string;
  /** Queue its jobs go to unless the enqueue says otherwise (default `default`). */
  queue?: string;
  /** Attempts before dead-lettering, for jobs enqueued through this definition (default 25). */
  maxAttempts?: number;
  /** Abort the handler and count a failure after this long (default: the consumer's --task-timeout). */
  timeoutMs?: number;
  /** Check and convert the payload; throw to reject it (a permanent failure, no retry). */
  parse?: (payload: Record<string, unknown>) => P;
  /**
   * Do the work. For a job of an execution, the return value (JSON) is its result: a
   * fan-out child's goes to the callback's `results`, the last job's to the execution.
   */
  handler: (payload: P, ctx: TaskContext) => unknown | Promise<unknown>;
}

/** A task with its payload type erased, as the registry stores it. */
// deno-lint-ignore no-explicit-any
export type AnyTask = TaskDefinition<any>;

/** Throw from a handler to dead-letter the job at once, without retries. */
export class PermanentError extends Error {
  override name = "PermanentError";
}

/** The longest delay a RetryLaterError may ask for: one hour, the backoff's own ceiling. */
export const MAX_RETRY_LATER_MS = 3_600_000;

/**
 * Throw from a handler to retry after a delay it chooses (say, a server's `Retry-After`)
 * instead of the exponential backoff. The attempt still counts: a job out of attempts is
 * dead-lettered. The delay is clamped to 0 to MAX_RETRY_LATER_MS.
 */
export class RetryLaterError extends Error {
  override name = "RetryLaterError";
  /** Milliseconds until the next attempt. */
  readonly delayMs: number;

  constructor(message: string, delayMs: number, options?: ErrorOptions) {
    super(message, options);
    // NaN (a garbled header, say) means "no preference": retry soon, not never.
    const ms = Number.isNaN(delayMs) ? 0 : Math.round(delayMs);
    this.delayMs = Math.min(MAX_RETRY_LATER_MS, Math.max(0, ms));
  }
}

/** Define a task (validates its name and limits at definition time). */
export function defineTask<P = Record<string, unknown>>(
  definition: TaskDefinition<P>,
): TaskDefinition<P> {
  checkName("task", definition.name);
  if (definition.queue !== undefined) checkName("queue", definition.queue);
  if (
    definition.maxAttempts !== undefined &&
    (!Number.isInteger(definition.maxAttempts) || definition.maxAttempts < 1 ||
      definition.maxAttempts > 1000)
  ) {
    throw new RangeError(`Invalid maxAttempts for task ${definition.name}: expected 1 to 1000`);
  }
  if (
    definition.timeoutMs !== undefined &&
    (!Number.isFinite(definition.timeoutMs) || definition.timeoutMs <= 0 ||
      definition.timeoutMs > MAX_TIMER_MS)
  ) {
    throw new RangeError(
      `Invalid timeoutMs for task ${definition.name}: expected a positive number up to ${MAX_TIMER_MS} (24 days)`,
    );
  }
  return definition;
}

/** The tasks one process knows, by name. */
export class TaskRegistry {
  #tasks = new Map<string, AnyTask>();

  constructor(tasks: AnyTask[] = []) {
    for (const task of tasks) this.add(task);
  }

  /** Register a task; a second task with the same name is an error. */
  add(task: AnyTask): this {
    if (this.#tasks.has(task.name)) {
      throw new Error(`Cannot register task ${task.name}: it is defined twice`);
    }
    this.#tasks.set(task.name, task);
    return this;
  }

  get(name: string): AnyTask | undefined {
    return this.#tasks.get(name);
  }

  /**
   * Swap a registered task for another of the same name: a built-in configured from
   * flags after the registry was built. A name not registered is an error.
   */
  replace(task: AnyTask): this {
    if (!this.#tasks.has(task.name)) {
      throw new Error(`Cannot replace task ${task.name}: it is not registered`);
    }
    this.#tasks.set(task.name, task);
    return this;
  }

  names(): string[] {
    return [...this.#tasks.keys()].sort();
  }
}

function abortableDelay(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason);
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

/** `shoal.noop`: does nothing; for benchmarks and smoke tests. */
export const noopTask: AnyTask = defineTask({ name: "shoal.noop", handler: () => {} });

/** `shoal.sleep` `{ms}`: waits, honouring the abort signal; for demos and tests. */
export const sleepTask: AnyTask = defineTask<{ ms: number }>({
  name: "shoal.sleep",
  parse(payload) {
    const ms = payload.ms;
    if (typeof ms !== "number" || !Number.isFinite(ms) || ms < 0 || ms > 86_400_000) {
      throw new TypeError("ms must be a number of milliseconds from 0 to 86400000");
    }
    return { ms };
  },
  handler: ({ ms }, ctx) => abortableDelay(ms, ctx.signal),
});

/** `shoal.fail` `{message, permanent?}`: throws; for demos and tests of retries and dead letters. */
export const failTask: AnyTask = defineTask<{ message: string; permanent: boolean }>({
  name: "shoal.fail",
  parse(payload) {
    const message = payload.message ?? "shoal.fail was asked to fail";
    if (typeof message !== "string") throw new TypeError("message must be a string");
    return { message, permanent: payload.permanent === true };
  },
  handler({ message, permanent }) {
    throw permanent ? new PermanentError(message) : new Error(message);
  },
});

/**
 * `shoal.chord`: a fan-out any language can start with plain SQL. Payload:
 * `{"children": [{"task", "payload"?, "queue"?}, ...], "callback": {"task", "payload"?,
 * "queue"?}, "on_error"?: {...}, "expires_in_ms"?: n}`.
 */
export const chordTask: AnyTask = defineTask<FanOutSpec>({
  name: "shoal.chord",
  parse(payload) {
    const job = (j: unknown, what: string) => {
      if (j === null || typeof j !== "object" || Array.isArray(j)) {
        throw new TypeError(`${what} must be an object with a task`);
      }
      const o = j as Record<string, unknown>;
      return {
        task: o.task as string,
        payload: o.payload as Record<string, unknown> | undefined,
        queue: o.queue as string | undefined,
        maxAttempts: o.max_attempts as number | undefined,
      };
    };
    if (!Array.isArray(payload.children)) throw new TypeError("children must be an array");
    return {
      children: payload.children.map((c, i) => job(c, `children[${i}]`)),
      callback: job(payload.callback, "callback"),
      onError: payload.on_error === undefined ? undefined : job(payload.on_error, "on_error"),
      expiresInMs: payload.expires_in_ms as number | undefined,
    };
  },
  handler(spec, ctx) {
    ctx.fanOut(spec);
  },
});

/** Settings of the built-in tasks that reach outside shoal; each allows nothing by default. */
export interface BuiltinSettings {
  /** `shoal.http`: the hosts it may POST to (see lib/http_task.ts). */
  http?: HttpTaskSettings;
  /** `shoal.sql`: the schemas whose functions it may call (see lib/sql_task.ts). */
  sql?: SqlTaskSettings;
}

/** The tasks every stock shoal binary knows. */
export function builtinTasks(settings: BuiltinSettings = {}): AnyTask[] {
  return [
    noopTask,
    sleepTask,
    failTask,
    chordTask,
    httpTask(settings.http ?? {}),
    sqlTask(settings.sql ?? {}),
  ];
}
