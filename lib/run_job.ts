/**
 * Running one claimed job: its context, its payload check, its handler under a timeout and
 * an abort signal, and the outcome it ends with. Recording the outcome in the database is
 * the completer's (lib/completer.ts); this module never writes.
 *
 * Outcomes: "completed" (with a result for jobs of an execution), "fan-out" (children
 * to open with the ack), "failed" (permanent, retry later, or retry with backoff), "lost"
 * (the claim moved on: the outcome is discarded), "released" (handed back at shutdown:
 * discarded too), "committed" (the handler's `ctx.transaction` already acked the job in
 * its own transaction, lib/job_transaction.ts: nothing left to write) and "suspended" (its
 * `ctx.sleep` or `ctx.waitForEvent` handed the job back until its wake time or its event,
 * lib/steps.ts and lib/events.ts: nothing left either).
 *
 * @module
 */
import type { Db, Sql } from "./db.ts";
import { formatDuration } from "./duration.ts";
import { describeError, type Logger } from "./log.ts";
import { checkOptions } from "./args.ts";
import {
  backoffMs,
  CTX_ENQUEUE,
  type DependencyOptions,
  enqueueOne,
  type EnqueueOptions,
  type Job,
} from "./queue.ts";
import { type CheckedFanOut, checkFanOut, type FanOutSpec } from "./barrier.ts";
import { type RunSpan, tracer } from "./tracing.ts";
import { checkProgress, type Progress } from "./progress.ts";
import { finishJob, openJobTransaction, type Tx } from "./job_transaction.ts";
import { CheckpointBatcher } from "./checkpoints.ts";
import {
  checkEventKey,
  checkEventName,
  type EventResult,
  waitForEvent,
  type WaitSpec,
} from "./events.ts";
import {
  checkStepName,
  loadSteps,
  type RecordedStep,
  recordStep,
  suspendJob,
  type Wake,
  wakeOf,
} from "./steps.ts";
import {
  type AnyTask,
  PermanentError,
  RetryLaterError,
  type StepOptions,
  type TaskContext,
  type TaskRegistry,
  type WaitOptions,
} from "./tasks.ts";

export class TimeoutError extends Error {
  override name = "TimeoutError";
}
export class ShutdownError extends Error {
  override name = "ShutdownError";
}
export class ClaimLostError extends Error {
  override name = "ClaimLostError";
}
/**
 * Thrown by `ctx.sleep` once the job is handed back until its wake time, and by
 * `ctx.waitForEvent` once it is handed back until its event or timeout: the run ends there.
 * Let it propagate (rethrow it from a catch-all); whatever the handler does after it is
 * discarded.
 */
export class SuspendedError extends Error {
  override name = "SuspendedError";
}

/**
 * A handler threw (or rejected with) `null`, which would read as "no error": it is a
 * failure like any other non-Error value, and described the same way.
 */
class NullThrown extends Error {
  override name = "non-Error thrown";
  constructor() {
    super("null");
  }
}

/** What every run of one consumer shares (made once, not per job). */
export interface RunEnv {
  sql: Sql;
  tasks: TaskRegistry;
  /** The consumer's logger; a job's own is derived from it on first use. */
  log: Logger;
  /** Timeout for tasks that do not set their own. */
  taskTimeoutMs: number;
  maxPayloadBytes?: number;
  /** Largest fan-out a handler may open. */
  maxFanOut?: number;
  /**
   * Called once per run as it settles, `state` saying how: one function for every run
   * instead of a promise chain per job. Never called from inside the constructor,
   * abortIfOverdue(), lose() or release() (a microtask later for those).
   */
  onSettled?: (run: JobRun) => void;
  /**
   * Records checkpoint steps (`ctx.step(name, fn, { transaction: false })`) in batches across
   * the consumer's runs (lib/checkpoints.ts). Without one, the first checkpoint step makes one
   * here, shared by every run of this env from then on.
   */
  checkpoints?: CheckpointBatcher;
}

/**
 * "running" until the handler settles; then the outcome to record ("completed",
 * "fan-out", "failed"), or one to discard: "lost" (the heartbeat found the claim gone) or
 * "released" (shutdown handed the job back).
 */
export type RunState =
  | "running"
  | "completed"
  | "fan-out"
  | "failed"
  | "lost"
  | "released"
  | "committed"
  | "suspended";

/** How a failed run is recorded (the options of queue.ts's fail()): message, final or not, when. */
export interface Failure {
  error: string;
  permanent: boolean;
  retryInMs: number;
  /** Hold the job's whole key this long (a RetryLaterError with holdKey). */
  holdKeyMs?: number;
}

/**
 * One job in a slot. The outcome is kept on the run itself (state, result, fan-out,
 * error) rather than in a separate object, and what most handlers never use is made on
 * first use (the AbortController, the context's logger and functions): at full speed
 * every allocation per job counts (bench/consumer_cpu.ts measures them). One async
 * function runs the handler and settles the run; an abort settles it at once, whatever
 * the handler does later.
 */
export class JobRun {
  readonly job: Job;
  state: RunState = "running";
  /** performance.now() when the handler started, for the duration histogram. */
  readonly startedAt: number = performance.now();
  readonly timeoutMs: number;
  /** performance.now() past which the handler is aborted (its task's timeout). */
  readonly timeoutAt: number;
  /** What the handler returned (jobs of an execution only), as JSON. */
  result: unknown = undefined;
  /** A fan-out the handler asked for, checked, opened with its ack. */
  fanOut: CheckedFanOut | undefined = undefined;
  /** Why the run failed (state "failed"). */
  error: unknown = undefined;
  /** The run's span, with tracing on (lib/tracing.ts); the completer ends it. */
  readonly span: RunSpan | undefined;
  readonly #env: RunEnv;
  /** The handler's AbortController, made when something first asks for it. */
  #controller: AbortController | undefined = undefined;
  /** Why the run was aborted, once it was: a controller made after that starts aborted. */
  #abortReason: Error | undefined = undefined;
  /** The outcome is fixed (state says how); `#notified` once onSettled has been called. */
  #settled = false;
  #notified = false;
  /** False while the constructor runs: a handler that throws at once is notified later. */
  #constructed = false;
  #settledPromise: Promise<void> | undefined = undefined;
  #resolveSettled: (() => void) | undefined = undefined;
  /** ctx.transaction was called: the job completes in it, so a second call is refused. */
  #transacted = false;
  /** The handler's last ctx.progress report not yet written by a heartbeat (lib/progress.ts). */
  #progress: Progress | undefined = undefined;
  /** The job's recorded steps and sleeps (lib/steps.ts), read on this run's first use. */
  #recorded: Promise<Map<string, RecordedStep>> | undefined = undefined;
  /** Names of checkpoint steps whose record is in flight (a second call of one is refused). */
  #checkpointing: Set<string> | undefined = undefined;

  constructor(job: Job, env: RunEnv) {
    this.job = job;
    this.#env = env;
    const task = env.tasks.get(job.task);
    this.timeoutMs = task?.timeoutMs ?? env.taskTimeoutMs;
    this.timeoutAt = this.startedAt + this.timeoutMs;
    this.span = tracer()?.startRun(job);
    // Not awaited: it never rejects, and settles the run itself.
    this.#run(task);
    this.#constructed = true;
  }

  /** The handler's AbortController (its context's `signal`): aborted on timeout, loss, shutdown. */
  get controller(): AbortController {
    if (this.#controller === undefined) {
      this.#controller = new AbortController();
      if (this.#abortReason !== undefined) this.#controller.abort(this.#abortReason);
    }
    return this.#controller;
  }

  /**
   * Resolves (never rejects) once the handler settled or the run was aborted, and `state`
   * says how; right after `env.onSettled` was called for it.
   */
  get settled(): Promise<void> {
    this.#settledPromise ??= this.#notified
      ? Promise.resolve()
      : new Promise((resolve) => (this.#resolveSettled = resolve));
    return this.#settledPromise;
  }

  /** Abort the handler if it is past its timeout (the consumer's one sweep calls this). */
  abortIfOverdue(now: number): void {
    if (this.state === "running" && now >= this.timeoutAt && this.#abortReason === undefined) {
      this.#abort(new TimeoutError(`Task timed out after ${formatDuration(this.timeoutMs)}`));
    }
  }

  /** The claim is gone: abort the handler and discard whatever it ends with. */
  lose(): void {
    this.state = "lost";
    this.#abort(
      new ClaimLostError(
        "The job's claim was lost: redelivered elsewhere, or its execution was cancelled or failed",
      ),
    );
  }

  /** Shutdown hands the job back: abort the handler and discard its outcome. */
  release(): void {
    this.state = "released";
    this.#abort(new ShutdownError("The consumer is shutting down"));
  }

  /**
   * The context's fanOut(): check the spec now, so a bad fan-out fails the handler before
   * anything is enqueued; it is sent as checked (not serialised and checked a second time).
   */
  askFanOut(spec: FanOutSpec): void {
    if (this.fanOut) throw new Error("A job can fan out once: combine the children in one call");
    if (this.state === "committed") {
      throw new Error("Cannot fan out: the job already completed in ctx.transaction");
    }
    try {
      this.fanOut = checkFanOut(spec, {
        maxChildren: this.#env.maxFanOut,
        maxPayloadBytes: this.#env.maxPayloadBytes,
      });
    } catch (cause) {
      // The same spec would fail the same way on every retry.
      throw new PermanentError(`Cannot fan out: ${(cause as Error).message}`, { cause });
    }
  }

  /**
   * The context's transaction(): run `fn` in a transaction on the consumer's pool that ends
   * by acking the job (completing it with `fn`'s value as its result, or opening its fan-out),
   * committed only while the claim's token is current (lib/job_transaction.ts). Once it
   * commits the run is over ("committed"): the handler's own return value is not used. A
   * claim found gone rolls everything back and the run ends as lost.
   */
  async transact<T>(fn: (tx: Tx) => T | Promise<T>): Promise<T> {
    if (this.#transacted) {
      throw new Error("A job completes in one transaction: ctx.transaction was already called");
    }
    this.#checkOpen("open ctx.transaction");
    this.#transacted = true;
    const job = this.job;
    const env = this.#env;
    // Traced: the transaction's span, ended with its outcome before the run settles.
    const span = this.span?.transaction();
    let value: T;
    try {
      value = await env.sql.begin(async (tx) => {
        // Checked first without a lock, so a run whose claim is gone does no work; the ack
        // below checks again under the row's lock, which is what fences the commit.
        if (!(await openJobTransaction(tx, job, this.timeoutMs))) throw lostClaim(job.id);
        const out = await (span === undefined ? fn(tx) : span.within(() => fn(tx)));
        const result = job.execution_id !== null && !this.fanOut ? toJson(out, job.task) : null;
        const ours = await finishJob(tx, job, {
          result,
          fanOut: this.fanOut,
          maxChildren: env.maxFanOut,
          maxPayloadBytes: env.maxPayloadBytes,
        });
        if (!ours) throw lostClaim(job.id);
        this.result = result;
        return out;
      }) as T;
    } catch (error) {
      span?.end(...spanFailure(error));
      this.#lostIf(error);
      throw error;
    }
    span?.end("committed");
    if (this.state === "running") {
      this.state = "committed";
      this.#settle(null, false);
    }
    return value;
  }

  /**
   * The context's step(): return the step's recorded result when an earlier run (or this one)
   * committed it, else run `fn` in a transaction that ends by recording its JSON result, fenced
   * by the token (lib/steps.ts). Returns the result as JSON gives it back, on the first run as
   * on a replay. A claim found gone rolls the step back and the run ends as lost.
   */
  async step<T>(
    name: string,
    fn: (tx: Tx) => T | Promise<T>,
    transaction = true,
  ): Promise<T> {
    this.#checkOpen("run a step");
    const recorded = await this.#steps();
    const done = recorded.get(name);
    if (done !== undefined) {
      if (done.kind !== "step") {
        throw new PermanentError(
          `Cannot run step "${name}" of job ${this.job.id}: a ${done.kind} of that name was recorded`,
        );
      }
      // Traced: a short span saying the step was replayed, its function not run.
      this.span?.replayed(name);
      return done.result as T;
    }
    this.#checkOpen("run a step");
    if (!transaction) return await this.#checkpoint(name, fn as () => T | Promise<T>, recorded);
    const job = this.job;
    const span = this.span?.step(name);
    let result: unknown = null;
    try {
      await this.#env.sql.begin(async (tx) => {
        if (!(await openJobTransaction(tx, job, this.timeoutMs))) throw lostClaim(job.id);
        const out = await (span === undefined ? fn(tx) : span.within(() => fn(tx)));
        result = toJson(out, `${job.task} (step "${name}")`);
        const outcome = await recordStep(tx, job, name, result);
        if (outcome === "lost") throw lostClaim(job.id);
        if (outcome === "duplicate") {
          throw duplicateStep(name, job.id);
        }
      });
    } catch (error) {
      span?.end(...spanFailure(error));
      this.#lostIf(error);
      throw error;
    }
    span?.end("recorded");
    recorded.set(name, stepRecord(result));
    return result as T;
  }

  /**
   * A checkpoint step (`{ transaction: false }`): run `fn` with no transaction, then hand its
   * JSON result to the consumer's batcher (lib/checkpoints.ts), which records it fenced by the
   * token; return once its batch committed. A claim found gone records nothing and the run
   * ends as lost. `fn` runs again if this process dies before the batch commits.
   */
  async #checkpoint<T>(
    name: string,
    fn: () => T | Promise<T>,
    recorded: Map<string, RecordedStep>,
  ): Promise<T> {
    const job = this.job;
    const inFlight = this.#checkpointing ??= new Set();
    if (inFlight.has(name)) throw duplicateStep(name, job.id);
    inFlight.add(name);
    const span = this.span?.step(name);
    let result: unknown;
    try {
      const out = await (span === undefined ? fn() : span.within(() => fn()));
      result = toJson(out, `${job.task} (step "${name}")`);
      this.#checkOpen("record a step");
      const batcher = this.#env.checkpoints ??= new CheckpointBatcher(this.#env.sql);
      const outcome = await batcher.record({ job, name, result });
      if (outcome === "lost") throw lostClaim(job.id);
      if (outcome === "duplicate") throw duplicateStep(name, job.id);
    } catch (error) {
      span?.end(...spanFailure(error));
      this.#lostIf(error);
      throw error;
    } finally {
      inFlight.delete(name);
    }
    span?.end("recorded");
    recorded.set(name, stepRecord(result));
    return result as T;
  }

  /**
   * The context's sleep(): a sleep recorded by an earlier run whose time has come (by the
   * database's clock) returns at once; otherwise the sleep is recorded (or keeps its recorded
   * wake time) and the job handed back until then, without counting an attempt, fenced by the
   * token (lib/steps.ts suspendJob). The run then ends ("suspended") and this throws a
   * SuspendedError so the handler stops.
   */
  async sleep(name: string, wake: Wake): Promise<void> {
    this.#checkOpen("sleep");
    if (this.fanOut) {
      // The fan-out opens with the job's ack, which a sleep never sends: it would be lost.
      throw new Error(`Cannot sleep "${name}" in job ${this.job.id}: it asked for a fan-out`);
    }
    const recorded = await this.#steps();
    const done = recorded.get(name);
    if (done !== undefined) {
      if (done.kind !== "sleep") {
        throw new PermanentError(
          `Cannot sleep "${name}" in job ${this.job.id}: a ${done.kind} of that name was recorded`,
        );
      }
      if (done.due) {
        this.span?.slept(name, done.wake_at!, "woke");
        return;
      }
    }
    this.#checkOpen("sleep");
    const job = this.job;
    // Not retried on a lost connection: had the first try committed, the second would find the
    // token moved on. An error fails the run instead, and the retry sleeps again.
    const until = await suspendJob(
      this.#env.sql,
      job,
      name,
      done?.wake_at ? { at: done.wake_at } : wake,
    );
    if (until === null) {
      const lost = lostClaim(job.id);
      this.#lostIf(lost);
      throw lost;
    }
    // Traced: an event on the run's span, which then ends with outcome "suspended".
    this.span?.slept(name, until, "suspended");
    if (this.state === "running") {
      this.state = "suspended";
      this.#settle(null, false);
    }
    this.#env.log.info("Job {job_id} ({task}) sleeps until {wake_at} ({step})", {
      job_id: job.id,
      task: job.task,
      wake_at: until.toISOString(),
      step: name,
    });
    throw new SuspendedError(
      `Job ${job.id} sleeps until ${until.toISOString()} ("${name}"): this run ends here`,
    );
  }

  /**
   * The context's waitForEvent(): a wait recorded by an earlier run as received or timed out
   * returns that at once; otherwise, under the event's lock and fenced by the token
   * (lib/events.ts waitForEvent), a kept event is taken (the run goes on), or the wait is
   * recorded and the job handed back until its event or its timeout, without counting an
   * attempt: the run then ends ("suspended") and this throws a SuspendedError.
   */
  async waitForEvent<T>(wait: WaitSpec): Promise<EventResult<T>> {
    this.#checkOpen("wait for an event");
    const job = this.job;
    const what = `Cannot wait for event "${wait.event}" in job ${job.id} (as "${wait.name}")`;
    if (this.fanOut) {
      // The fan-out opens with the job's ack, which a wait never sends: it would be lost.
      throw new Error(`${what}: it asked for a fan-out`);
    }
    const recorded = await this.#steps();
    const done = recorded.get(wait.name);
    if (done !== undefined && done.kind === "wait" && done.wait_state !== "waiting") {
      return done.wait_state === "received"
        ? { timedOut: false, payload: done.result as T }
        : { timedOut: true, payload: null };
    }
    this.#checkOpen("wait for an event");
    // Not retried on a lost connection: had the first try committed, the second would find the
    // token moved on. An error fails the run instead, and the retry waits again.
    const outcome = await waitForEvent(this.#env.sql, job, wait);
    switch (outcome.state) {
      case "received":
        return { timedOut: false, payload: outcome.payload as T };
      case "timed_out":
        return { timedOut: true, payload: null };
      case "other":
        throw new PermanentError(
          outcome.event === undefined
            ? `${what}: a ${outcome.kind} of that name was recorded`
            : `${what} with key "${wait.key}": it was recorded waiting for event "${outcome.event.name}" with key "${outcome.event.key}"`,
        );
      case "lost": {
        const lost = lostClaim(job.id);
        this.#lostIf(lost);
        throw lost;
      }
    }
    if (this.state === "running") {
      this.state = "suspended";
      this.#settle(null, false);
    }
    const until = outcome.until;
    this.#env.log.info("Job {job_id} ({task}) waits for event {event} ({step})", {
      job_id: job.id,
      task: job.task,
      event: wait.event,
      step: wait.name,
    });
    throw new SuspendedError(
      `Job ${job.id} waits for event "${wait.event}" until it comes or ${until.toISOString()} ("${wait.name}"): this run ends here`,
    );
  }

  /** The context's progress(): kept until the next heartbeat takes it (no write per call). */
  reportProgress(progress: Progress): void {
    this.#progress = progress;
  }

  /** The progress reported since the last call, for the heartbeat to write; else undefined. */
  takeProgress(): Progress | undefined {
    const progress = this.#progress;
    this.#progress = undefined;
    return progress;
  }

  /**
   * The job's records, read once per run (read again after a failed read). A job's first
   * claim has nothing to read: records are written only under a claim's token (lib/steps.ts),
   * tokens only grow (each claim adds one; a dead-lettered job comes back with its token), so a
   * run holding token 1 is the job's first and no record of it can exist yet. That is the
   * common case, and saves it a round trip before its first step.
   */
  #steps(): Promise<Map<string, RecordedStep>> {
    if (this.#recorded === undefined && this.job.token === FIRST_TOKEN) {
      this.#recorded = Promise.resolve(new Map());
    }
    if (this.#recorded === undefined) {
      const reading = loadSteps(this.#env.sql, this.job.id);
      this.#recorded = reading;
      reading.catch(() => {
        // The handler gets this rejection from its own await; the next step reads again.
        if (this.#recorded === reading) this.#recorded = undefined;
      });
    }
    return this.#recorded;
  }

  /** Throw unless the run may still write: running, and not completed by ctx.transaction. */
  #checkOpen(what: string): void {
    if (this.state !== "running") {
      throw new ClaimLostError(`Cannot ${what}: the run already ended (${this.state})`);
    }
    if (this.#transacted) {
      throw new Error(`Cannot ${what}: the job completes in its ctx.transaction`);
    }
  }

  /** A transaction rolled back because the claim moved on: say so, and end the run as lost. */
  #lostIf(error: unknown): void {
    if (!(error instanceof ClaimLostError)) return;
    this.#env.log.warn("Job {job_id} lost its claim: its transaction rolled back", {
      job_id: this.job.id,
    });
    if (this.state === "running") this.lose();
  }

  /** Abort the handler's signal (the first reason stays) and settle the run now. */
  #abort(reason: Error): void {
    if (this.#abortReason === undefined) {
      this.#abortReason = reason;
      this.#controller?.abort(reason);
    }
    // Notified on a later microtask: the caller may be iterating over the running jobs.
    this.#settle(reason, true);
  }

  /** Fix the outcome, unless the run was settled (aborted, lost, released) first. */
  #settle(error: unknown | null, later: boolean): void {
    if (this.#settled) return;
    this.#settled = true;
    if (this.state === "running") {
      if (error !== null) {
        this.state = "failed";
        this.error = error;
      } else this.state = this.fanOut ? "fan-out" : "completed";
    }
    if (later || !this.#constructed) queueMicrotask(() => this.#notify());
    else this.#notify();
  }

  #notify(): void {
    this.#notified = true;
    this.#env.onSettled?.(this);
    this.#resolveSettled?.();
  }

  /** Check the payload, run the handler, keep its result; settles the run, never rejects. */
  async #run(task: ReturnType<TaskRegistry["get"]>): Promise<void> {
    const job = this.job;
    let error: unknown = null;
    try {
      if (!task) {
        throw new Error(`Unknown task "${job.task}": no handler is registered in this consumer`);
      }
      let payload: unknown = job.payload;
      if (task.parse) {
        try {
          payload = task.parse(job.payload);
        } catch (cause) {
          throw new PermanentError(
            `Invalid payload for task ${job.task}: ${
              cause instanceof Error ? cause.message : describeError(cause)
            }`,
            { cause },
          );
        }
      }
      const ctx = new RunContext(this, this.#env);
      const span = this.span;
      // With tracing on, the handler runs with its span active: spans it makes are children.
      const value = await (span === undefined
        ? task.handler(payload, ctx)
        : span.within(() =>
          task.handler(payload, ctx)
        ));
      // A job of an execution hands its result on (to its barrier's callback, or as the
      // execution's result): it must survive JSON, or the job fails here, not later.
      if (job.execution_id !== null && !this.fanOut) this.result = toJson(value, job.task);
    } catch (thrown) {
      // A handler that throws null would read as "no error": a failure like any non-Error.
      error = thrown === null ? new NullThrown() : thrown;
    }
    this.#settle(error, false);
  }
}

/**
 * How a step's or transaction's span ends after `error` rolled it back: "lost" when the claim
 * moved on (not an error of the handler's), else "failed" with the error's description.
 */
function spanFailure(error: unknown): [string, string?] {
  return error instanceof ClaimLostError ? ["lost"] : ["failed", describeError(error)];
}

/** The token of a job's first claim (a new job's is 0; every claim adds one). */
const FIRST_TOKEN = "1";

/** A step's record as this run keeps it once recorded. */
function stepRecord(result: unknown): RecordedStep {
  return {
    kind: "step",
    result,
    wake_at: null,
    due: false,
    wait_state: null,
    event_name: null,
    event_key: null,
  };
}

/** Two calls of one step at once in a run: the second finds the first's record. */
function duplicateStep(name: string, id: string): Error {
  return new Error(
    `Cannot record step "${name}" of job ${id}: it was recorded meanwhile by this run (await each step before starting the next)`,
  );
}

/** The error a handler's transaction or step rolls back with when its claim moved on. */
function lostClaim(id: string): ClaimLostError {
  return new ClaimLostError(
    `Job ${id} lost its claim before its transaction committed: rolled back (redelivered elsewhere, or its execution ended)`,
  );
}

/**
 * A handler's context. Its logger, signal and functions are made on first use, and are
 * getters (not methods) so that a handler may take them off the context
 * (`const { enqueue } = ctx`).
 */
class RunContext implements TaskContext {
  readonly job: Job;
  readonly db: Db;
  readonly #run: JobRun;
  readonly #env: RunEnv;
  #log: Logger | undefined = undefined;
  #enqueue: TaskContext["enqueue"] | undefined = undefined;
  #fanOut: TaskContext["fanOut"] | undefined = undefined;

  constructor(run: JobRun, env: RunEnv) {
    this.job = run.job;
    this.db = env.sql;
    this.#run = run;
    this.#env = env;
  }

  get signal(): AbortSignal {
    return this.#run.controller.signal;
  }

  get log(): Logger {
    const job = this.job;
    // A child logger per job was a measurable share of a busy consumer's time.
    return this.#log ??= this.#env.log.with({
      job_id: job.id,
      task: job.task,
      attempt: job.attempts,
    });
  }

  get enqueue(): TaskContext["enqueue"] {
    const env = this.#env;
    return this.#enqueue ??= async (
      task: string | AnyTask,
      payload: unknown = {},
      opts?: EnqueueOptions & DependencyOptions,
    ) => {
      // Checked before the spread: a string's characters would spread into options.
      checkOptions("ctx.enqueue", opts);
      const options = { maxPayloadBytes: env.maxPayloadBytes, ...opts };
      // Traced: the job links to this run (unless the handler gave a traceparent of its own).
      const span = this.#run.span;
      if (span !== undefined && options.traceparent === undefined) {
        options.traceparent = span.traceparent;
      }
      // A definition brings its own queue and attempts, and so does a name this consumer
      // defines (as for `shoal enqueue`); any other name takes the task's from the catalog
      // (the catalog rule). enqueueOne() refuses anything that is neither.
      const definition = typeof task === "string" ? env.tasks.get(task) : task;
      return await enqueueOne(env.sql, definition ?? task, payload, options, CTX_ENQUEUE);
    };
  }

  get fanOut(): TaskContext["fanOut"] {
    const run = this.#run;
    return this.#fanOut ??= (spec: FanOutSpec) => run.askFanOut(spec);
  }

  get step(): TaskContext["step"] {
    const run = this.#run;
    return (<T>(
      name: string,
      fn: (tx: Tx) => T | Promise<T>,
      options?: StepOptions,
    ): Promise<T> => {
      let transaction: boolean;
      try {
        checkStepName("ctx.step", name);
        if (typeof fn !== "function") {
          throw new TypeError(`Invalid fn for ctx.step(): expected a function, got ${typeof fn}`);
        }
        transaction = stepTransaction(options);
      } catch (error) {
        return Promise.reject(error);
      }
      return run.step(name, fn, transaction);
    }) as TaskContext["step"];
  }

  get sleep(): TaskContext["sleep"] {
    const run = this.#run;
    return (name: string, until: string | number | Date): Promise<void> => {
      let wake: Wake;
      try {
        checkStepName("ctx.sleep", name);
        wake = wakeOf(until);
      } catch (error) {
        return Promise.reject(error);
      }
      return run.sleep(name, wake);
    };
  }

  get waitForEvent(): TaskContext["waitForEvent"] {
    const run = this.#run;
    // deno-lint-ignore no-explicit-any
    return <T = any>(name: string, options: WaitOptions = {}): Promise<EventResult<T>> => {
      let wait: WaitSpec;
      try {
        wait = waitSpecOf(name, options);
      } catch (error) {
        return Promise.reject(error);
      }
      return run.waitForEvent<T>(wait);
    };
  }

  get progress(): TaskContext["progress"] {
    const run = this.#run;
    return (done: number, total: number, message?: string): void =>
      run.reportProgress(checkProgress(done, total, message));
  }

  get transaction(): TaskContext["transaction"] {
    const run = this.#run;
    return <T>(fn: (tx: Tx) => T | Promise<T>): Promise<T> => {
      if (typeof fn !== "function") {
        return Promise.reject(
          new TypeError(`Invalid fn for ctx.transaction(): expected a function, got ${typeof fn}`),
        );
      }
      return run.transact(fn);
    };
  }
}

/**
 * How a failure is recorded: a PermanentError is final; a RetryLaterError says when. The
 * error text is stored as it is described, but for NUL characters, which Postgres text
 * cannot hold: fail() would refuse the whole failure, and the job would run again until
 * its attempts were spent. Each becomes U+FFFD, the replacement character.
 */
export function failureOf(error: unknown, attempts: number, retryBaseMs?: number): Failure {
  const text = error instanceof TimeoutError ? error.message : describeError(error);
  const later = error instanceof RetryLaterError ? error : null;
  return {
    error: text.includes("\0") ? text.replaceAll("\0", "\uFFFD") : text,
    permanent: error instanceof PermanentError,
    // A handler that knows when to come back (a server's Retry-After) says so.
    retryInMs: later ? later.delayMs : backoffMs(attempts, retryBaseMs),
    ...(later?.holdKey ? { holdKeyMs: later.delayMs } : {}),
  };
}

/** Whether ctx.step's options ask for a transaction (the default) or a checkpoint; else a TypeError. */
function stepTransaction(options: unknown): boolean {
  checkOptions("ctx.step", options, "options", ["transaction"]);
  const transaction = (options as StepOptions | undefined)?.transaction;
  if (transaction === undefined) return true;
  if (typeof transaction !== "boolean") {
    throw new TypeError(
      `Invalid options.transaction for ctx.step(): expected true or false, got ${typeof transaction}`,
    );
  }
  return transaction;
}

/** The wait ctx.waitForEvent(name, options) asks for, checked; else a TypeError. */
function waitSpecOf(name: unknown, options: unknown): WaitSpec {
  const event = checkEventName("ctx.waitForEvent", name);
  checkOptions("ctx.waitForEvent", options, "options", ["key", "timeout", "step"]);
  const { key = "", timeout, step = event } = (options ?? {}) as WaitOptions;
  checkEventKey("ctx.waitForEvent", key);
  checkStepName("ctx.waitForEvent", step);
  const wake = timeout === undefined ? null : wakeOf(timeout, "timeout for ctx.waitForEvent()");
  return { name: step, event, key, timeout: wake };
}

/** A handler's return value as plain JSON (undefined becomes null). */
function toJson(value: unknown, task: string): unknown {
  if (value === undefined) return null;
  try {
    const text = JSON.stringify(value);
    return text === undefined ? null : JSON.parse(text);
  } catch (cause) {
    // The same handler returns the same kind of value on every retry: fail for good.
    throw new PermanentError(
      `Cannot store the result of task ${task} as JSON: ${(cause as Error).message}`,
      { cause },
    );
  }
}

/**
 * Calls `sweep` often enough for the shortest timeout it was asked to watch: every 5% of
 * it, between 5 ms and 250 ms, so a timeout fires at most that late. One interval for all
 * running jobs: a timer set and cleared per job was several percent of a busy consumer.
 */
export class TimeoutSweep {
  #everyMs = Infinity;
  #timer: ReturnType<typeof setInterval> | undefined;

  constructor(private readonly sweep: () => void) {}

  watch(timeoutMs: number): void {
    const every = Math.min(250, Math.max(5, Math.floor(timeoutMs / 20)));
    if (every >= this.#everyMs) return;
    this.#everyMs = every;
    clearInterval(this.#timer);
    this.#timer = setInterval(this.sweep, every);
  }

  stop(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
  }
}
