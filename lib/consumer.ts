/**
 * The consumer role: claim jobs from named queues into free slots, run their handlers,
 * ack, retry, dead-letter; heartbeat what runs; hand everything back on shutdown.
 *
 * The loop claims, in one statement, enough jobs to fill its free slots plus a prefetch
 * buffer: buffered jobs are claimed (heartbeated, fenced) but not started, and start as
 * slots free up, so a busy consumer claims in large batches instead of one statement per
 * freed slot. The buffer holds only what this process finishes in about a quarter of a
 * second at its recent pace (at most `prefetch`): fast jobs are claimed hundreds at a
 * time, slow jobs are not hoarded away from idle consumers. The loop claims again once
 * the buffer is half empty, then sleeps until a NOTIFY
 * for one of its queues, a drained buffer (when the last claim was full), the poll
 * interval, or the stop signal. On shutdown the buffer is handed back at once.
 *
 * @module
 */
import type { Sql } from "./db.ts";
import {
  backoffWithJitter,
  isDataError,
  retryOnce,
  settleWithin,
  STATEMENT_DEADLINE_MS,
} from "./db.ts";
import { formatDuration, MAX_TIMER_MS } from "./duration.ts";
import { Sleeper } from "./sleep.ts";
import { describeError, type Logger, logger } from "./log.ts";
import { metrics } from "./metrics.ts";
import {
  ack,
  backoffMs,
  claim,
  type ClaimResult,
  enqueue,
  extend,
  fail,
  type Job,
  type JobRef,
  release,
} from "./queue.ts";
import {
  type CheckedFanOut,
  checkFanOut,
  completeJobs,
  type Completion,
  fanOut,
  type FanOutSpec,
} from "./barrier.ts";
import { PermanentError, RetryLaterError, type TaskContext, type TaskRegistry } from "./tasks.ts";

export interface ConsumerOptions {
  queues: string[];
  concurrency: number;
  /**
   * Most jobs claimed beyond the free slots, started as slots free up (default 0). The
   * buffer is sized to about a quarter second of this process's recent throughput, up
   * to this many: fewer, larger claims for fast jobs, none held back for slow ones.
   */
  prefetch?: number;
  visibilityTimeoutMs: number;
  pollIntervalMs: number;
  /** LISTEN for enqueue notifications (off behind PgBouncer in transaction mode). */
  listen: boolean;
  shutdownGraceMs: number;
  /** Timeout for tasks that do not set their own. */
  taskTimeoutMs: number;
  /** Who holds claims, for status and pg_stat_activity; host:pid by default. */
  workerId?: string;
  /** Backoff base for retries (attempt n waits about base × 2^(n-1)). */
  retryBaseMs?: number;
  maxPayloadBytes?: number;
  /** Largest fan-out a handler may open (default 100,000 children). */
  maxFanOut?: number;
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

export interface ConsumerDeps {
  sql: Sql;
  tasks: TaskRegistry;
}

/** One job in flight. */
interface Running {
  job: Job;
  controller: AbortController;
  /**
   * "settling": finished, its ack or failure is being recorded (not extended, not
   * released). "released" (handed back at shutdown) or "lost" (no longer ours): its
   * outcome is discarded.
   */
  settled: "running" | "settling" | "released" | "lost";
  done: Promise<void>;
  /** performance.now() when the handler started, for the duration histogram. */
  startedAt: number;
  /** performance.now() past which the handler is aborted (its task's timeout). */
  timeoutAt: number;
  timeoutMs: number;
  /** What the handler returned (jobs of an execution only), as JSON. */
  result?: unknown;
  /** A fan-out the handler asked for, checked, opened with its ack. */
  fanOut?: CheckedFanOut;
}

/**
 * Acks finished jobs in batches: while one ack statement is in flight, the jobs that
 * finish meanwhile wait and go together in the next one.
 */
class AckBatcher {
  #plain: JobRef[] = [];
  #workflow: Completion[] = [];
  #waiters: (() => void)[] = [];
  #flushing: Promise<void> | null = null;

  constructor(private readonly sql: Sql) {}

  /** A plain job: a bare delete. */
  add(ref: JobRef): Promise<void> {
    this.#plain.push(ref);
    return this.#sent();
  }

  /** A job of an execution: its result feeds barriers and the execution's completion. */
  addCompletion(done: Completion): Promise<void> {
    this.#workflow.push(done);
    return this.#sent();
  }

  /** Resolves once the batch holding what was just added has been sent (or given up). */
  #sent(): Promise<void> {
    const sent = new Promise<void>((resolve) => this.#waiters.push(resolve));
    this.#flushing ??= this.#flush();
    return sent;
  }

  async #flush(): Promise<void> {
    while (this.#plain.length > 0 || this.#workflow.length > 0) {
      const plain = this.#plain.splice(0);
      const workflow = this.#workflow.splice(0);
      const waiters = this.#waiters.splice(0);
      await Promise.all([
        this.#send("ack", plain.length, () => ack(this.sql, plain)),
        this.#send("complete", workflow.length, () => completeJobs(this.sql, workflow)),
      ]);
      for (const resolve of waiters) resolve();
    }
    this.#flushing = null;
  }

  async #send(what: string, count: number, run: () => Promise<unknown>): Promise<void> {
    if (count === 0) return;
    try {
      await retryOnce(what, run);
    } catch (error) {
      // The jobs stay claimed and are redelivered after their deadline (at-least-once).
      logger("consumer").error("Cannot {what} {count} jobs, they will be redelivered: {error}", {
        what,
        count,
        error: describeError(error),
      });
    }
  }

  /** Resolves once every ack handed in so far has been sent. */
  async drain(): Promise<void> {
    while (this.#flushing) await this.#flushing;
  }
}

/**
 * After a probe that found nothing, the next waits this long (ms): at most 40 empty probes
 * a second, while a job that ranks ahead of the buffer waits at most this much longer.
 */
const PROBE_QUIET_MS = 25;

/** Seconds of recent throughput the prefetch buffer holds. */
const BUFFER_SECONDS = 0.25;

/**
 * Jobs finished per second, smoothed: each window of at least 100 ms folds into a moving
 * average, so the estimate follows a change of pace within a second or so.
 */
class Pace {
  #windowStart = performance.now();
  #inWindow = 0;
  #rate = 0;

  count(): void {
    this.#inWindow++;
  }

  perSecond(): number {
    const now = performance.now();
    const elapsed = now - this.#windowStart;
    if (elapsed >= 100) {
      const windowRate = (this.#inWindow * 1000) / elapsed;
      // Idle for a long stretch: start from the new window, not from a stale average.
      this.#rate = elapsed > 2000 ? windowRate : 0.5 * this.#rate + 0.5 * windowRate;
      this.#windowStart = now;
      this.#inWindow = 0;
    }
    return this.#rate;
  }
}

/**
 * Announced start times of delayed jobs, soonest first, with one timer for the soonest.
 * Bounded: past the cap the latest are dropped and left to the poll.
 */
class DueWake {
  static readonly CAP = 1000;
  #dues: number[] = [];
  #timer: ReturnType<typeof setTimeout> | undefined;
  #armedFor = Infinity;

  constructor(private readonly wake: () => void) {}

  at(epochMs: number): void {
    const i = this.#dues.findIndex((due) => due >= epochMs);
    if (i >= 0 && this.#dues[i] === epochMs) return;
    this.#dues.splice(i < 0 ? this.#dues.length : i, 0, epochMs);
    if (this.#dues.length > DueWake.CAP) this.#dues.pop();
    this.#arm();
  }

  #arm(): void {
    const next = this.#dues[0];
    if (next === undefined || next === this.#armedFor) return;
    clearTimeout(this.#timer);
    this.#armedFor = next;
    // A few ms late rather than early: the claim compares run_at with the server's clock.
    const wait = Math.min(MAX_TIMER_MS, Math.max(0, next - Date.now() + 5));
    this.#timer = setTimeout(() => this.#fire(), wait);
  }

  #fire(): void {
    this.#timer = undefined;
    this.#armedFor = Infinity;
    const now = Date.now();
    while (this.#dues.length > 0 && this.#dues[0]! <= now) this.#dues.shift();
    this.wake();
    this.#arm();
  }

  stop(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#dues = [];
  }
}

/**
 * Calls `sweep` often enough for the shortest timeout it was asked to watch: every 5% of
 * it, between 5 ms and 250 ms, so a timeout fires at most that late. One interval for all
 * running jobs: a timer set and cleared per job was several percent of a busy consumer.
 */
class TimeoutSweep {
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

class TimeoutError extends Error {
  override name = "TimeoutError";
}
class ShutdownError extends Error {
  override name = "ShutdownError";
}
class ClaimLostError extends Error {
  override name = "ClaimLostError";
}

/**
 * A handler threw (or rejected with) `null`, which settle() would read as "no error": it is
 * a failure like any other non-Error value, and described the same way.
 */
class NullThrown extends Error {
  override name = "non-Error thrown";
  constructor() {
    super("null");
  }
}

/** Settle with the handler, or reject as soon as the signal aborts (even if it never settles). */
/**
 * Whether `a` ranks no later than `b` in claim order (priority first, then fair_seq), the
 * bound a probe claims within: a job level with `b` counts, whatever its id.
 */
function ranksBy(a: Job, b: Job): boolean {
  if (a.priority !== b.priority) return a.priority > b.priority;
  return BigInt(a.fair_seq) <= BigInt(b.fair_seq);
}

function raceAbort<T>(work: Promise<T>, signal: AbortSignal): Promise<T> {
  work.catch(() => {}); // a rejection after the abort won the race is already accounted for
  return new Promise<T>((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason);
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    work.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
  });
}

export function defaultWorkerId(): string {
  return `${Deno.hostname()}:${Deno.pid}`;
}

/**
 * Run the consumer until `stop` aborts, then shut down gracefully: stop claiming, give
 * in-flight handlers `shutdownGraceMs` to finish, abort and release the rest (visible
 * now, attempt not burned), flush acks. The caller closes the pool.
 */
export async function runConsumer(
  deps: ConsumerDeps,
  options: ConsumerOptions,
  stop: AbortSignal,
): Promise<void> {
  const { sql, tasks } = deps;
  const log = logger("consumer");
  const workerId = options.workerId ?? defaultWorkerId();
  const queues = new Set(options.queues);
  const running = new Map<string, Running>();
  /** Finished jobs whose ack has not been sent yet (still heartbeated). */
  const acking = new Map<string, JobRef>();
  const acks = new AckBatcher(sql);
  const waker = new Sleeper();
  let lastClaimFull = false;
  const prefetch = options.prefetch ?? 0;
  /** Claimed, not started yet, in claim order. */
  let buffer: Job[] = [];
  const pace = new Pace();
  /** The buffer's size now: a quarter second of recent throughput, at most `prefetch`. */
  const target = () => Math.min(prefetch, Math.floor(pace.perSecond() * BUFFER_SECONDS));
  /** Claim again once the buffer is down to this. */
  const lowWater = () => Math.floor(target() / 2);

  /** Room for a claim: free slots plus the buffer's free space. */
  const room = () => options.concurrency + target() - running.size - buffer.length;

  /**
   * Jobs were announced (a NOTIFY, a delayed job due): wake the loop, and probe for any that
   * rank ahead of jobs already buffered.
   */
  function announce(): void {
    waker.wake();
    probeSoon();
  }

  // Probes. With more than the free slots' worth buffered (less empties soon enough), an
  // announcement claims at once the jobs ranking no later than the last buffered one, and
  // admit() puts them first. A probe runs beside the loop's own claim, which may be in
  // flight for a while with hundreds of jobs: waiting for it would let that many buffered
  // jobs start first. One probe at a time; after one that found nothing the next waits
  // PROBE_QUIET_MS, so a steady stream of NOTIFYs does not become back-to-back probes.
  let probing: Promise<void> | null = null;
  let quietUntil = 0;
  let quietTimer: ReturnType<typeof setTimeout> | undefined;
  function probeSoon(): void {
    if (probing || quietTimer || stop.aborted || buffer.length <= options.concurrency) return;
    const wait = quietUntil - performance.now();
    if (wait > 0) {
      quietTimer = setTimeout(() => {
        quietTimer = undefined;
        probeSoon();
      }, wait);
      return;
    }
    probing = probe().then((again) => {
      probing = null;
      if (again) probeSoon();
    });
  }

  /** One probe; resolves to whether it came back full (more may be waiting). Never throws. */
  async function probe(): Promise<boolean> {
    const last = buffer[buffer.length - 1]!;
    const limit = Math.max(options.concurrency, target());
    try {
      const result = await settleWithin(
        "claim",
        claim(sql, {
          queues: options.queues,
          limit,
          workerId,
          visibilityMs: options.visibilityTimeoutMs,
          before: { priority: last.priority, fair_seq: last.fair_seq },
        }),
        STATEMENT_DEADLINE_MS,
      );
      claimed(result);
      const got = result.jobs.length + result.poisoned.length;
      if (got === 0) quietUntil = performance.now() + PROBE_QUIET_MS;
      return got === limit;
    } catch (error) {
      // The loop's next claim takes these jobs in any case (and reports a lasting fault).
      log.warn("Cannot probe for jobs ranking ahead of the buffer: {error}", {
        error: describeError(error),
      });
      quietUntil = performance.now() + 1000;
      return false;
    }
  }

  /** Count and report a claim's outcome, then take its jobs in. */
  function claimed({ jobs, poisoned }: ClaimResult): void {
    metrics.jobsClaimed(jobs);
    metrics.jobsPoisoned(poisoned);
    for (const p of poisoned) {
      log.error(
        "Job {job_id} ({task}) dead-lettered unrun: claimed {attempt} times without finishing",
        { job_id: p.id, task: p.task, attempt: p.attempts },
      );
    }
    admit(jobs);
  }

  /**
   * Take claimed jobs in: those that rank no later than the last buffered job arrived after
   * the buffer was claimed (a higher priority, or a quiet fairness key's burst) and go
   * first, in their claim order; the rest join the end. Then free slots take jobs from the
   * front.
   */
  const admit = (jobs: Job[]) => {
    const last = buffer[buffer.length - 1];
    if (last === undefined) buffer = buffer.concat(jobs);
    else {
      const ahead = jobs.filter((job) => ranksBy(job, last));
      const behind = ahead.length === 0 ? jobs : jobs.filter((job) => !ranksBy(job, last));
      buffer = ahead.length === 0 ? buffer.concat(behind) : [...ahead, ...buffer, ...behind];
    }
    while (running.size < options.concurrency && buffer.length > 0 && !stop.aborted) {
      start(buffer.shift()!);
    }
  };

  const finish = (r: Running) => {
    running.delete(r.job.id);
    pace.count();
    // A freed slot takes the next buffered job, unless we are shutting down.
    if (!stop.aborted && buffer.length > 0) start(buffer.shift()!);
    if (lastClaimFull && buffer.length <= lowWater()) waker.wake();
  };

  /**
   * The handler finished and asked for a fan-out: ack, barrier and children in one go.
   * Returns a PermanentError when the database refused the fan-out itself (a limit or a
   * rule it checks again, such as its own payload limit): the same spec would be refused
   * on every redelivery, so the caller fails the job now instead of re-running it.
   */
  async function openFanOut(r: Running, spec: CheckedFanOut): Promise<PermanentError | null> {
    const ref = { id: r.job.id, token: r.job.token };
    try {
      const execution = await retryOnce(
        "fan-out",
        () =>
          fanOut(sql, ref, spec, {
            maxChildren: options.maxFanOut,
            maxPayloadBytes: options.maxPayloadBytes,
          }),
      );
      if (execution === null) {
        log.warn("Job {job_id} lost its claim before its fan-out: nothing enqueued", {
          job_id: r.job.id,
        });
      }
    } catch (error) {
      if (isDataError(error)) {
        return new PermanentError(`Cannot fan out: ${(error as Error).message}`, { cause: error });
      }
      log.error("Cannot fan out from job {job_id}, it will be redelivered: {error}", {
        job_id: r.job.id,
        error: describeError(error),
      });
    }
    return null;
  }

  async function settle(r: Running, error: unknown | null): Promise<void> {
    if (r.settled !== "running") return;
    // From here the outcome is ours to record: a heartbeat must not report the claim lost
    // when the failure below moves the token on, and shutdown must not release it.
    r.settled = "settling";
    const ms = performance.now() - r.startedAt;
    const ref = { id: r.job.id, token: r.job.token };
    if (error === null) {
      if (r.fanOut) error = await openFanOut(r, r.fanOut);
      else {
        // Until its ack is sent, the job is still heartbeated: a slow ack must not let its
        // deadline pass and the job run a second time elsewhere.
        acking.set(ref.id, ref);
        const sent = r.job.execution_id !== null
          ? acks.addCompletion({ ...ref, result: r.result })
          : acks.add(ref);
        sent.finally(() => acking.delete(ref.id));
      }
      if (error === null) {
        metrics.jobFinished(r.job, "completed", ms);
        return;
      }
    }
    const permanent = error instanceof PermanentError;
    const message = error instanceof TimeoutError ? error.message : describeError(error);
    try {
      const outcome = await retryOnce(
        "fail",
        () =>
          fail(sql, ref, {
            error: message,
            permanent,
            // A handler that knows when to come back (a server's Retry-After) says so.
            retryInMs: error instanceof RetryLaterError
              ? error.delayMs
              : backoffMs(r.job.attempts, options.retryBaseMs),
          }),
      );
      metrics.jobFinished(r.job, outcome, ms);
      const level = outcome === "dead" ? "error" : "warn";
      log[level]("Job {job_id} ({task}) failed on attempt {attempt}, {outcome}: {error}", {
        job_id: r.job.id,
        task: r.job.task,
        attempt: r.job.attempts,
        outcome: outcome === "dead" ? "dead-lettered" : outcome,
        error: message,
      });
    } catch (failError) {
      log.error("Cannot record failure of job {job_id}, it will be redelivered: {error}", {
        job_id: r.job.id,
        error: describeError(failError),
      });
    }
  }

  function start(job: Job): void {
    const controller = new AbortController();
    const task = tasks.get(job.task);
    const timeoutMs = task?.timeoutMs ?? options.taskTimeoutMs;
    let jobLog: Logger | undefined;
    const startedAt = performance.now();
    const r: Running = {
      job,
      controller,
      settled: "running",
      done: Promise.resolve(),
      startedAt,
      timeoutAt: startedAt + timeoutMs,
      timeoutMs,
    };
    const fanOutOnAck = (spec: FanOutSpec) => {
      if (r.fanOut) throw new Error("A job can fan out once: combine the children in one call");
      // Checked now, so a bad fan-out fails the handler before anything is enqueued; sent
      // as checked (not serialised and checked a second time).
      let checked: CheckedFanOut;
      try {
        checked = checkFanOut(spec, {
          maxChildren: options.maxFanOut,
          maxPayloadBytes: options.maxPayloadBytes,
        });
      } catch (cause) {
        // The same spec would fail the same way on every retry.
        throw new PermanentError(`Cannot fan out: ${(cause as Error).message}`, { cause });
      }
      r.fanOut = checked;
    };
    const ctx: TaskContext = {
      job,
      signal: controller.signal,
      // Made on first use: most handlers never log, and at full speed a child logger per
      // job is a measurable share of the consumer's time.
      get log(): Logger {
        return jobLog ??= log.with({ job_id: job.id, task: job.task, attempt: job.attempts });
      },
      db: sql,
      enqueue: (name, payload = {}, opts = {}) => {
        const definition = tasks.get(name); // its queue and retry budget, like the CLI's
        return enqueue(sql, name, payload, {
          queue: definition?.queue,
          maxAttempts: definition?.maxAttempts,
          maxPayloadBytes: options.maxPayloadBytes,
          ...opts,
        });
      },
      fanOut: fanOutOnAck,
    };
    running.set(job.id, r);
    timeouts.watch(timeoutMs);
    const work = (async () => {
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
      const value = await task.handler(payload, ctx);
      // A job of an execution hands its result on (to its barrier's callback, or as the
      // execution's result): it must survive JSON, or the job fails here, not later.
      if (job.execution_id !== null && !r.fanOut) r.result = toJson(value, job.task);
    })();
    r.done = raceAbort(work, controller.signal)
      .then(() => settle(r, null), (error) => settle(r, error === null ? new NullThrown() : error))
      .finally(() => finish(r));
  }

  async function heartbeat(): Promise<void> {
    const live = [...running.values()].filter((r) => r.settled === "running");
    const waiting = [...buffer];
    if (live.length === 0 && acking.size === 0 && waiting.length === 0) return;
    const refs = [
      ...live.map((r) => ({ id: r.job.id, token: r.job.token })),
      ...acking.values(),
      ...waiting.map((job) => ({ id: job.id, token: job.token })),
    ];
    try {
      const kept = new Set(
        await retryOnce("extend", () => extend(sql, refs, options.visibilityTimeoutMs)),
      );
      dropLostFromBuffer(waiting, kept);
      for (const r of live) {
        if (!kept.has(r.job.id) && running.get(r.job.id) === r && r.settled === "running") {
          r.settled = "lost";
          r.controller.abort(
            new ClaimLostError(
              "The job's claim was lost: redelivered elsewhere, or its execution was cancelled or failed",
            ),
          );
          log.warn("Lost the claim on job {job_id}: aborted its handler", { job_id: r.job.id });
        }
      }
    } catch (error) {
      log.error("Cannot extend {count} running jobs: {error}", {
        count: refs.length,
        error: describeError(error),
      });
    }
  }

  /**
   * Buffered jobs the heartbeat could not extend (their execution ended, or the claim
   * moved on) leave the buffer unstarted; they are handed back so the next claim acks
   * an ended execution's job at once instead of after its deadline.
   */
  function dropLostFromBuffer(waiting: Job[], kept: Set<string>): void {
    const asked = new Set(waiting.map((job) => job.id));
    // Only jobs still buffered: one that started meanwhile is the next heartbeat's.
    const lost = buffer.filter((job) => asked.has(job.id) && !kept.has(job.id));
    if (lost.length === 0) return;
    buffer = buffer.filter((job) => !lost.includes(job));
    log.warn("Dropped {count} buffered jobs whose claim was lost before they started", {
      count: lost.length,
    });
    const handing = handBack(lost, "lost");
    handingBack.add(handing);
    handing.finally(() => handingBack.delete(handing));
  }

  /** Hand-backs in flight, awaited before the pool closes. */
  const handingBack = new Set<Promise<void>>();

  /** Release unstarted jobs (attempt not burned): visible at once for any consumer. */
  async function handBack(jobs: Job[], why: "lost" | "shutdown"): Promise<void> {
    try {
      const released = await retryOnce(
        "release",
        () => release(sql, jobs.map((job) => ({ id: job.id, token: job.token }))),
      );
      log.info("Handed back {count} buffered jobs ({why})", { count: released.length, why });
    } catch (error) {
      log.error(
        "Cannot hand back {count} buffered jobs, they return after their deadline: {error}",
        {
          count: jobs.length,
          error: describeError(error),
        },
      );
    }
  }

  /** Task timeouts: one sweep over running jobs, not a timer per job. */
  const timeouts = new TimeoutSweep(() => {
    const now = performance.now();
    for (const r of running.values()) {
      if (r.settled === "running" && now >= r.timeoutAt && !r.controller.signal.aborted) {
        r.controller.abort(
          new TimeoutError(`Task timed out after ${formatDuration(r.timeoutMs)}`),
        );
      }
    }
  });

  const heartbeatEvery = Math.max(50, Math.floor(options.visibilityTimeoutMs / 3));
  let beating: Promise<void> | null = null;
  const heartbeatTimer = setInterval(() => {
    beating ??= heartbeat().finally(() => (beating = null));
  }, heartbeatEvery);

  /** Wakes the loop when the earliest announced delayed job becomes due. */
  const dueWake = new DueWake(announce);
  let unlisten: (() => Promise<void>) | null = null;
  if (options.listen) {
    try {
      const sub = await sql.listen(
        "shoal_jobs",
        (payload) => {
          // "queue" (jobs are ready), or "queue@<epoch ms>" (the earliest start of
          // delayed jobs just enqueued): '@' cannot occur in a queue name.
          const at = payload.indexOf("@");
          const queue = at < 0 ? payload : payload.slice(0, at);
          if (!queues.has(queue)) return;
          const due = at < 0 ? NaN : Number(payload.slice(at + 1));
          if (Number.isFinite(due) && due > Date.now()) dueWake.at(due);
          else announce();
        },
        announce, // (re)connected: catch up on anything missed
      );
      unlisten = sub.unlisten;
    } catch (error) {
      log.warn("Cannot LISTEN, polling every {interval}: {error}", {
        interval: formatDuration(options.pollIntervalMs),
        error: describeError(error),
      });
    }
  }

  log.info(
    "Consumer {worker} started on {queues} with concurrency {concurrency}, prefetch {prefetch}",
    {
      worker: workerId,
      queues: options.queues.join(","),
      concurrency: options.concurrency,
      prefetch,
    },
  );

  let errorStreak = 0;
  while (!stop.aborted) {
    const limit = room();
    if (limit > 0 && buffer.length <= lowWater()) {
      try {
        // A claim on a connection Postgres just killed can stay unsettled for good (see
        // settleWithin); past the deadline it counts as a lost connection and is retried.
        const result = await settleWithin(
          "claim",
          claim(sql, {
            queues: options.queues,
            limit,
            workerId,
            visibilityMs: options.visibilityTimeoutMs,
          }),
          STATEMENT_DEADLINE_MS,
        );
        errorStreak = 0;
        claimed(result);
        lastClaimFull = result.jobs.length + result.poisoned.length === limit;
        if (lastClaimFull && !stop.aborted && room() > 0 && buffer.length <= lowWater()) continue;
      } catch (error) {
        errorStreak++;
        const wait = backoffWithJitter(errorStreak, 1000, 30_000);
        log.error("Cannot claim jobs, retrying in {wait}: {error}", {
          wait: formatDuration(wait),
          error: describeError(error),
        });
        await waker.sleep(wait, stop);
        continue;
      }
    } else {
      lastClaimFull = true;
    }
    await waker.sleep(options.pollIntervalMs, stop);
  }

  await shutdown();

  async function shutdown(): Promise<void> {
    log.info("Consumer stopping: {count} jobs in flight, grace {grace}", {
      count: running.size,
      grace: formatDuration(options.shutdownGraceMs),
    });
    // A probe in flight would add to the buffer after it was handed back.
    clearTimeout(quietTimer);
    await probing;
    // Buffered jobs never started: hand them back now, not after the grace period.
    const unstarted = buffer;
    buffer = [];
    if (unstarted.length > 0) handingBack.add(handBack(unstarted, "shutdown"));
    if (running.size > 0) {
      let graceTimer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([
        Promise.allSettled([...running.values()].map((r) => r.done)),
        new Promise((resolve) => (graceTimer = setTimeout(resolve, options.shutdownGraceMs))),
      ]);
      clearTimeout(graceTimer);
    }
    const left = [...running.values()].filter((r) => r.settled === "running");
    for (const r of left) {
      r.settled = "released";
      r.controller.abort(new ShutdownError("The consumer is shutting down"));
    }
    clearInterval(heartbeatTimer);
    dueWake.stop();
    if (left.length > 0) {
      try {
        const released = await retryOnce(
          "release",
          () => release(sql, left.map((r) => ({ id: r.job.id, token: r.job.token }))),
        );
        log.info("Released {count} unfinished jobs for immediate redelivery", {
          count: released.length,
        });
      } catch (error) {
        log.error("Cannot release {count} jobs, they return after their deadline: {error}", {
          count: left.length,
          error: describeError(error),
        });
      }
    }
    // Failures and fan-outs already being recorded finish before the pool closes.
    await Promise.allSettled([...running.values()].map((r) => r.done));
    timeouts.stop();
    await Promise.all(handingBack);
    await acks.drain();
    await beating;
    if (unlisten) {
      await unlisten().catch((error) =>
        log.warn("Cannot UNLISTEN: {error}", { error: describeError(error) })
      );
    }
    log.info("Consumer stopped");
  }
}
