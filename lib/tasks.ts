/**
 * Task definitions: what a consumer knows how to run. A task has a name, a default
 * queue, a handler, a retry budget, a timeout and an optional payload check. The stock
 * binary registers the built-ins (lib/builtin_tasks.ts); a team's own entry file
 * registers its tasks and calls shoal's `main` (see examples/).
 *
 * @module
 */
import {
  checkArray,
  checkFunction,
  checkInteger,
  checkNameArg,
  checkObject,
  refusal,
  shown,
} from "./args.ts";
import type { FanOutSpec } from "./barrier.ts";
import type { Db } from "./db.ts";
import type { EventResult } from "./events.ts";
import { MAX_TIMER_MS } from "./duration.ts";
import type { Tx } from "./job_transaction.ts";
import type { Logger } from "./log.ts";
import type { DependencyOptions, EnqueueOptions, Job } from "./queue.ts";

/** What a handler gets besides its payload. */
export interface TaskContext {
  job: Job;
  /** Aborted on timeout, shutdown, a lost claim, or its execution's cancel: stop promptly. */
  signal: AbortSignal;
  /** A logger that tags every line with the job id, task and attempt. */
  log: Logger;
  /**
   * Enqueue another job (outside this job's ack; at-least-once like everything else), as
   * `enqueue()` does: given a definition, its payload is type-checked and the definition's
   * queue and attempts apply unless `options` set them.
   */
  enqueue<P, I>(
    task: TaskDefinition<P, I>,
    payload: NoInfer<I>,
    options?: EnqueueOptions & DependencyOptions,
  ): Promise<string>;
  /**
   * Enqueue another job by task name; a queue or max attempts not given is the definition's
   * when this consumer defines the task, else the task's in the catalog.
   */
  enqueue(
    task: string,
    payload?: Record<string, unknown>,
    options?: EnqueueOptions & DependencyOptions,
  ): Promise<string>;
  /** The pool, for handlers that do their own database work. */
  db: Db;
  /**
   * Fan out children with a callback (fan-in). Nothing is enqueued unless the handler
   * then returns normally: the barrier and the children are committed with this job's
   * ack, in one transaction. The callback gets `payload.results`, in child order.
   */
  fanOut(spec: FanOutSpec): void;
  /**
   * Complete the job in a transaction of your own (exactly-once database effects,
   * docs/workflows.md): `fn` runs in a transaction on the consumer's pool that then acks the
   * job, so `fn`'s writes, any enqueue made through `tx` (`enqueue(tx, ...)`), a fan-out asked
   * for before it returns, and the ack commit together, and only while this claim's token is
   * current. A stale worker (its job redelivered meanwhile) rolls all of it back. `fn`'s value
   * is the job's result (jobs of an execution) and what this returns; once it commits the job
   * is done, so return right after it: the handler's own return value is not used. Once per
   * run.
   */
  transaction<T>(fn: (tx: Tx) => T | Promise<T>): Promise<T>;
  /**
   * Run a named step once per job (docs/workflows.md): `fn` runs in a transaction that ends by
   * recording its result (JSON), fenced by this claim's token, so its writes and its record
   * commit together. A later run of the job (a retry, a redelivery, a wake from a sleep) gets
   * the recorded result back without running `fn`. Names follow the task name rule; await each
   * step before the next.
   *
   * With `{ transaction: false }` (a checkpoint step) `fn` runs with no transaction and only its
   * result is recorded, fenced the same way, in one statement with other handlers' steps: far
   * cheaper, but `fn` runs again if the process dies before its record commits, so keep it to
   * work outside the database, idempotent by the job's id and the step's name.
   */
  step<T>(
    name: string,
    fn: (tx: Tx) => T | Promise<T>,
    options?: StepOptions & { transaction?: true },
  ): Promise<T>;
  step<T>(
    name: string,
    fn: () => T | Promise<T>,
    options: StepOptions & { transaction: false },
  ): Promise<T>;
  /**
   * A durable sleep (docs/workflows.md): hand the job back until `until` (a duration such as
   * "2d", milliseconds, or an instant) without holding a slot or a connection, and without
   * counting an attempt; the run ends here (this throws a SuspendedError: let it propagate).
   * When the job runs again its steps return their recorded results and this same sleep returns
   * at once. The sleep is itself a recorded step: names are shared with `step`.
   */
  sleep(name: string, until: string | number | Date): Promise<void>;
  /**
   * Wait for the event `name` with `options.key` (docs/workflows.md "Events"): returns
   * `{ timedOut: false, payload }` once it is emitted (`emitEvent()`, `shoal.emit_event`,
   * `shoal event emit`), or `{ timedOut: true, payload: null }` once `options.timeout` (a
   * duration, milliseconds or an instant; default none) came first. An event emitted before
   * the wait started (kept a day) is taken at once. Otherwise the job is handed back like a
   * sleep, holding nothing and counting no attempt, and this run ends here (this throws a
   * SuspendedError: let it propagate); the job runs again when the event comes or the timeout
   * does, and this same call then returns the result, as on every later run. The wait is a
   * recorded step named `options.step` (default the event's name).
   */
  // deno-lint-ignore no-explicit-any
  waitForEvent<T = any>(name: string, options?: WaitOptions): Promise<EventResult<T>>;
  /**
   * Report progress (`done` of `total`, an optional message of up to 200 characters). Cheap to
   * call often: kept in memory and written by the consumer's next heartbeat (one statement for
   * all its jobs that reported since), shown by `shoal status --json`. Throws a TypeError on a
   * negative or non-finite number.
   */
  progress(done: number, total: number, message?: string): void;
}

/** Options of `ctx.step` (docs/workflows.md, "Steps"). */
export interface StepOptions {
  /**
   * true (the default): `fn(tx)` runs in a transaction that commits with the step's record.
   * false: a checkpoint step: `fn()` runs with no transaction, its result recorded in a batch.
   */
  transaction?: boolean;
}

/** The options of `ctx.waitForEvent`. */
export interface WaitOptions {
  /** The event's key (at most 512 characters; default "": an event without a key). */
  key?: string;
  /** Give up after a duration ("2d"), milliseconds, or at an instant; default: never. */
  timeout?: string | number | Date;
  /** The wait's record name (the step name rule; default the event's name). */
  step?: string;
}

/**
 * A task: its name, settings and handler.
 *
 * Two payload types:
 * - `P`, what the handler gets: the payload as `parse` returns it, or without `parse` the
 *   payload as enqueued (after a JSON round trip: keep `P` to JSON data, no `Date`s).
 * - `I`, what a typed producer enqueues, `enqueue(db, thisTask, payload)`, checked at
 *   compile time; `P` unless given. A `parse` that converts (a string to a `Date`, a renamed
 *   field, a default filled in) declares the input it reads:
 *   `defineTask<Parsed, Input>({ parse, handler })`. Without `parse` the handler gets what
 *   was sent, so `I` must be assignable to `P` (defineTask refuses another at compile time).
 *
 * `parse` itself still takes `Record<string, unknown>`, never `I`: jobs also arrive by
 * name, from SQL, other languages and older producers, which no compiler checked.
 */
export interface TaskDefinition<P = Record<string, unknown>, I = P> {
  /** Unique task name: letters, digits and `_.:-`. */
  name: string;
  /**
   * Queue its jobs go to unless the enqueue says otherwise (default `default`). Consumers
   * register it in the task catalog, so enqueues by name from anywhere honour it.
   */
  queue?: string;
  /** Attempts before dead-lettering, unless the enqueue says otherwise (default 25; registered too). */
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
  /**
   * Type only, never set: the payload type `I` producers enqueue, which is how `enqueue`
   * reads it back from a definition. Leave it out.
   */
  readonly "~input"?: I;
}

/** A task with its payload types erased, as the registry stores it. */
// deno-lint-ignore no-explicit-any
export type AnyTask = TaskDefinition<any, any>;

/** The payload a typed producer enqueues for a task: `TaskInput<typeof sendWelcome>`. */
export type TaskInput<T> = T extends TaskDefinition<infer _P, infer I> ? I : never;

/**
 * What a definition needs besides TaskDefinition: `parse` when its input type `I` is not
 * assignable to the handler's `P` (nothing else would turn one into the other).
 */
type ParseWhenInputDiffers<P, I> = [I] extends [P] ? unknown
  : { parse: (payload: Record<string, unknown>) => P };

/** What an enqueue takes from its task argument: a name, with a definition's settings. */
export interface TaskSettings {
  name: string;
  queue?: string;
  maxAttempts?: number;
}

/** How messages name the task argument unless told: `Invalid task: ...`. */
const TASK = (): string => "task";

/**
 * Read the task argument of an enqueue: a task name, or a definition (an object with a
 * string `name`, as defineTask returns), whose queue and attempts come with it. Anything
 * else is a TypeError, `subject` naming the argument (`task for enqueue()`). The values
 * themselves are checked where the job is.
 */
export function taskSettings(task: unknown, subject: () => string = TASK): TaskSettings {
  if (typeof task === "string") return { name: task };
  if (task !== null && typeof task === "object" && typeof (task as AnyTask).name === "string") {
    const { name, queue, maxAttempts } = task as AnyTask;
    return { name, queue, maxAttempts };
  }
  const got = task === null
    ? "null"
    : Array.isArray(task)
    ? "an array"
    : typeof task === "object"
    ? "an object without a string name"
    : typeof task;
  throw new TypeError(
    `Invalid ${subject()}: expected a task name or a definition from defineTask, got ${got}`,
  );
}

/** Throw from a handler to dead-letter the job at once, without retries. */
export class PermanentError extends Error {
  override name = "PermanentError";
}

/** The longest delay a RetryLaterError may ask for: one hour, the backoff's own ceiling. */
export const MAX_RETRY_LATER_MS = 3_600_000;

/** Options of a RetryLaterError: an Error's, and whether the whole key waits. */
export interface RetryLaterOptions extends ErrorOptions {
  /**
   * Hold the job's whole flow key (its concurrency key, else its fairness key) for the
   * delay, not only this job: no job of the key is claimed until it ends (flow control,
   * `shoal.hold_key`), as a server's 429 asks. When the job's task has limits of its own on
   * its queue, the hold is the key's within them: only that task's jobs of the key wait, and
   * the key's other jobs go on (THE TASK RULE in sql/functions/flow.sql).
   */
  holdKey?: boolean;
}

/**
 * Throw from a handler to retry after a delay it chooses (say, a server's `Retry-After`)
 * instead of the exponential backoff. The attempt still counts: a job out of attempts is
 * dead-lettered. The delay is clamped to 0 to MAX_RETRY_LATER_MS. With `holdKey`, every job
 * of its flow key on its queue (of its task, when the task has limits of its own there) waits
 * out the delay too.
 */
export class RetryLaterError extends Error {
  override name = "RetryLaterError";
  /** Milliseconds until the next attempt. */
  readonly delayMs: number;
  /** Whether the job's whole key waits out the delay. */
  readonly holdKey: boolean;

  constructor(message: string, delayMs: number, options?: RetryLaterOptions) {
    super(message, options);
    this.holdKey = options?.holdKey === true;
    if (typeof delayMs !== "number") {
      // Thrown from a handler, this fails the attempt with a message saying why.
      throw new TypeError(
        `Invalid delayMs for new RetryLaterError(): expected a number of milliseconds, not ${
          shown(delayMs)
        }`,
      );
    }
    // NaN (a garbled header, say) means "no preference": retry soon, not never.
    const ms = Number.isNaN(delayMs) ? 0 : Math.round(delayMs);
    this.delayMs = Math.min(MAX_RETRY_LATER_MS, Math.max(0, ms));
  }
}

/**
 * Define a task (validates its name, limits and functions at definition time). `P` is the
 * handler's payload, `I` what producers enqueue (default `P`; see TaskDefinition).
 */
export function defineTask<P = Record<string, unknown>, I = P>(
  definition: TaskDefinition<P, I> & ParseWhenInputDiffers<P, I>,
): TaskDefinition<P, I> {
  const fn = "defineTask";
  checkObject(fn, "definition", definition, { what: "a task definition ({ name, handler, ... })" });
  const { name, queue, maxAttempts, timeoutMs, handler, parse } = definition;
  checkNameArg(fn, "definition.name", "task", name);
  checkNameArg(fn, "definition.queue", "queue", queue, { optional: true });
  checkInteger(fn, "definition.maxAttempts", maxAttempts, { min: 1, max: 1000, optional: true });
  // Past MAX_TIMER_MS a timer fires at once; fractions of a millisecond are fine, 0 is not.
  if (
    timeoutMs !== undefined &&
    !(typeof timeoutMs === "number" && timeoutMs > 0 && timeoutMs <= MAX_TIMER_MS)
  ) {
    throw refusal(
      `definition.timeoutMs for ${fn}()`,
      `a positive number of milliseconds up to ${MAX_TIMER_MS} (24 days)`,
      timeoutMs,
      typeof timeoutMs === "number" ? RangeError : TypeError,
    );
  }
  checkFunction(fn, "definition.handler", handler);
  checkFunction(fn, "definition.parse", parse, { optional: true });
  return definition;
}

/**
 * Throw unless `task` looks like a task definition: a valid name and a handler (and a
 * parse function if any). defineTask() checks the rest; a task written as a plain object
 * is refused here, at registration, rather than failing every job it gets.
 */
export function checkTask(fn: string, arg: string, task: unknown): void {
  checkObject(fn, arg, task, { what: "a task from defineTask()" });
  const { name, handler, parse } = task as AnyTask;
  checkNameArg(fn, `${arg}.name`, "task", name);
  checkFunction(fn, `${arg}.handler`, handler);
  checkFunction(fn, `${arg}.parse`, parse, { optional: true });
}

/** The tasks one process knows, by name. */
export class TaskRegistry {
  #tasks = new Map<string, AnyTask>();

  constructor(tasks: AnyTask[] = []) {
    checkArray("new TaskRegistry", "tasks", tasks, "an array of tasks");
    tasks.forEach((task, i) => checkTask("new TaskRegistry", `tasks[${i}]`, task));
    for (const task of tasks) this.add(task);
  }

  /** Register a task; a second task with the same name is an error. */
  add(task: AnyTask): this {
    checkTask("TaskRegistry.add", "task", task);
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
    checkTask("TaskRegistry.replace", "task", task);
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
