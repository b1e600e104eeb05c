/**
 * The completer: the one place a consumer records what its jobs ended with.
 *
 * - Completed plain jobs are acked (deleted) and completed jobs of an execution are
 *   completed (arrival, decrement, callback, execution result) in batches: while one
 *   statement is in flight, the jobs that finish meanwhile wait and go together in the
 *   next, at most BATCH_CAP per statement. Draining at shutdown, the backlog goes in up to
 *   DRAIN_STATEMENTS statements of each kind at once.
 * - Failures and fan-outs are one statement each (their SQL takes one job), awaited by
 *   the run so its slot stays taken until they are recorded.
 * - Backpressure: once the backlog (outcomes handed in, not yet recorded) reaches
 *   BACKLOG_LIMIT, `full` is true and the consumer stops claiming; `onRoom` fires when
 *   the backlog falls below it again.
 * - While the consumer's checkpoint batcher has a round due (lib/checkpoints.ts), completions
 *   of jobs of executions wait for it and go in its statement (one commit for both): the
 *   completer is the batcher's CompletionSource. They go on their own once no round is due.
 * - Until their statement is done, batched jobs are still claimed and must not reach
 *   their deadline: `unsent()` lists them for the consumer's one heartbeat statement.
 *
 * @module
 */
import type { Sql } from "./db.ts";
import { isDataError, retryOnce } from "./db.ts";
import { describeError, logger } from "./log.ts";
import { metrics } from "./metrics.ts";
import { ackClaimed, fail, type JobRef } from "./queue.ts";
import { type CheckedFanOut, completeJobs, type Completion, fanOut } from "./barrier.ts";
import type { CompletionSource } from "./checkpoints.ts";
import { PermanentError } from "./tasks.ts";
import { failureOf, type JobRun } from "./run_job.ts";
import type { ConsumerTotals } from "./catalog.ts";

/**
 * Most jobs per ack or complete statement. River's completer uses the same 5,000. A
 * batch this large is already about a tenth of a second of a fast consumer's work (W2
 * finishes some 45,000 no-op jobs a second), so a larger cap would not make fewer round
 * trips matter; it would only make one statement hold more row locks for longer, send a
 * larger array, and redo more work when a lost connection retries it. Normal batches
 * (what finishes during one round trip) stay far below it: the cap only splits the
 * backlog that builds up while the database is slow or away.
 */
export const BATCH_CAP = 5_000;

/**
 * The backlog at which the consumer stops claiming: four full statements behind (River's
 * completer also waits at 4 × its cap). Below it, finished jobs keep their slot free
 * while their ack waits, so a fast consumer is never slowed by one slow statement; above
 * it, claiming more would only grow a backlog the database cannot keep up with, and the
 * heartbeat that extends every unsent job would grow with it.
 */
export const BACKLOG_LIMIT = 4 * BATCH_CAP;

/**
 * Statements of each kind at once while draining at shutdown. One at a time, a backlog at
 * its limit takes four statements in a row; against a database that stalls them (each may
 * take its deadline and a retry, 20 s), a shutdown would wait 80 s instead of the 20 s one
 * uncapped statement took before the cap. Four at once hand in a full backlog in one
 * round; the pool has room for them then (no handler runs any more).
 */
export const DRAIN_STATEMENTS = 4;

export interface CompleterOptions {
  /** Most jobs per statement (default BATCH_CAP). */
  batchCap?: number;
  /** Backlog at which `full` turns true (default BACKLOG_LIMIT). */
  backlogLimit?: number;
  /** Backoff base for retries (attempt n waits about base × 2^(n-1)). */
  retryBaseMs?: number;
  maxPayloadBytes?: number;
  /** Largest fan-out a handler may open. */
  maxFanOut?: number;
  /** Called when the backlog falls below the limit after reaching it. */
  onRoom?: () => void;
  /** Counts each outcome by queue (the consumer's totals, written with its heartbeat). */
  totals?: ConsumerTotals;
}

const NONE: readonly never[] = [];

/** Plain jobs to ack: ids and tokens side by side, so a backlog holds no object per job. */
interface AckBatch {
  ids: string[];
  tokens: string[];
}

/** Records finished runs; see the module comment. */
export class Completer implements CompletionSource {
  readonly #sql: Sql;
  readonly #cap: number;
  readonly #limit: number;
  readonly #options: CompleterOptions;
  readonly #log = logger("consumer");
  /** Plain jobs to ack, not sent yet: id and token only, so a backlog holds no payloads. */
  #acks: AckBatch = { ids: [], tokens: [] };
  /** Jobs of an execution to complete, not sent yet. */
  #completions: Completion[] = [];
  /** The batches of the statements in flight. */
  #sendingAcks: readonly AckBatch[] = NONE;
  #sendingCompletions: readonly (readonly Completion[])[] = NONE;
  /** How many jobs those statements carry (counted once per flush, read for every job). */
  #sending = 0;
  /** Draining (shutdown): send up to DRAIN_STATEMENTS batches of each kind at once. */
  #draining = false;
  /** Failures and fan-outs being recorded. */
  #recording = 0;
  #flushing: Promise<void> | null = null;
  /** Whether the backlog reached the limit and onRoom has not fired since. */
  #wasFull = false;
  /** Whether a checkpoint round is due, to carry completions (ridesWith()); none: never. */
  #roundDue: (() => boolean) | undefined = undefined;
  /** Completions taken by a checkpoint round, until its statement is done. */
  #riding: Completion[] = [];

  constructor(sql: Sql, options: CompleterOptions = {}) {
    this.#sql = sql;
    this.#options = options;
    this.#cap = options.batchCap ?? BATCH_CAP;
    this.#limit = options.backlogLimit ?? BACKLOG_LIMIT;
    if (!(this.#cap >= 1) || !(this.#limit >= 1)) {
      throw new RangeError(
        `Invalid completer limits (batch cap ${this.#cap}, backlog ${this.#limit}): expected at least 1`,
      );
    }
  }

  /** Outcomes handed in and not recorded yet. */
  get backlog(): number {
    return this.#acks.ids.length + this.#completions.length + this.#sending + this.#recording +
      this.#riding.length;
  }

  /**
   * Let completions of executions ride with a checkpoint batcher's rounds (lib/checkpoints.ts,
   * whose CompletionSource this is): while `roundDue()` (the batcher's `busy`) says a round is
   * due, they wait for its next statement instead of going in one of their own.
   */
  ridesWith(roundDue: () => boolean): void {
    this.#roundDue = roundDue;
  }

  /** CompletionSource: the completions waiting, for the round's statement (at most the cap). */
  take(): Completion[] {
    if (this.#completions.length === 0) return [];
    const taken = this.#completions.length <= this.#cap
      ? this.#completions.splice(0)
      : this.#completions.splice(0, this.#cap);
    for (const c of taken) this.#riding.push(c);
    return taken;
  }

  /** CompletionSource: the round's statement committed them. */
  sent(batch: readonly Completion[]): void {
    this.#unride(batch);
    this.#roomCheck();
  }

  /** CompletionSource: the round's statement failed: send them on their own. */
  failed(batch: readonly Completion[]): void {
    this.#unride(batch);
    this.#completions.unshift(...batch);
    this.#flushing ??= this.#flush();
  }

  /** CompletionSource: no round is due any more: send what waited for one. */
  idle(): void {
    if (this.#completions.length > 0) this.#flushing ??= this.#flush();
  }

  #unride(batch: readonly Completion[]): void {
    const gone = new Set(batch);
    this.#riding = this.#riding.filter((c) => !gone.has(c));
  }

  /** Whether the backlog is at its limit: the consumer claims nothing until it falls. */
  get full(): boolean {
    return this.backlog >= this.#limit;
  }

  /**
   * Record a settled run. A completion is queued for the next batch and nothing is
   * returned (no promise per ack: there is nothing to wait for); a failure or a fan-out
   * returns a promise that resolves once recorded (or given up), never rejects. Lost and
   * released runs are discarded.
   */
  record(run: JobRun): Promise<void> | undefined {
    // The handler's duration, measured when it settled (not when its outcome is recorded);
    // without metrics nothing reads it, and a clock read per job is not free.
    const ms = metrics.enabled ? performance.now() - run.startedAt : 0;
    switch (run.state) {
      case "completed":
        this.#complete(run, ms);
        // Traced: the run's span ends as its ack is queued (acks go in batches).
        run.span?.end("completed");
        return undefined;
      case "committed":
        // Acked already, in the handler's own transaction (ctx.transaction).
        metrics.jobFinished(run.job, "completed", ms);
        run.span?.end("completed");
        return undefined;
      case "fan-out":
        return this.#tracked(() => this.#fanOut(run, run.fanOut!, ms));
      case "failed":
        return this.#tracked(() => this.#fail(run, run.error, ms));
      // running (not settled: a caller's bug), lost or released: nothing to record; suspended
      // (ctx.sleep, ctx.waitForEvent): recorded already, by the sleep or the wait itself
      default:
        run.span?.end(run.state);
        return undefined;
    }
  }

  /** The jobs handed in but not acked yet, for the heartbeat. */
  unsent(): JobRef[] {
    const refs: JobRef[] = [];
    for (const batch of [this.#acks, ...this.#sendingAcks]) {
      for (let i = 0; i < batch.ids.length; i++) {
        refs.push({ id: batch.ids[i]!, token: batch.tokens[i]! });
      }
    }
    for (const c of this.#completions) refs.push({ id: c.id, token: c.token });
    for (const batch of this.#sendingCompletions) {
      for (const c of batch) refs.push({ id: c.id, token: c.token });
    }
    for (const c of this.#riding) refs.push({ id: c.id, token: c.token });
    return refs;
  }

  /**
   * Resolves once every completion handed in so far has been sent (or given up). Failures
   * and fan-outs are awaited by whoever recorded them (the consumer keeps their slot).
   */
  async drain(): Promise<void> {
    this.#draining = true;
    // Completions left waiting for a round that did not come (the batcher drains first).
    if (this.#completions.length > 0) this.#flushing ??= this.#flush();
    try {
      while (this.#flushing) await this.#flushing;
    } finally {
      this.#draining = false;
    }
  }

  #complete(run: JobRun, ms: number): void {
    const job = run.job;
    // Until its ack is sent, the job is still heartbeated (unsent()): a slow ack must not
    // let its deadline pass and the job run a second time elsewhere.
    let rides = false;
    if (job.execution_id !== null) {
      this.#completions.push({ id: job.id, token: job.token, result: run.result });
      // A checkpoint round is due: its statement takes it (take()), or idle() sends it.
      rides = this.#roundDue?.() ?? false;
    } else {
      // The ref alone, not the job: a backlog of thousands must not keep their payloads.
      this.#acks.ids.push(job.id);
      this.#acks.tokens.push(job.token);
    }
    metrics.jobFinished(job, "completed", ms);
    this.#options.totals?.add(job.queue, "completed");
    this.#noteGrowth();
    if (!rides) this.#flushing ??= this.#flush();
  }

  async #flush(): Promise<void> {
    while (this.#acks.ids.length > 0 || this.#completions.length > 0) {
      const statements = this.#draining ? DRAIN_STATEMENTS : 1;
      const acks = this.#takeAckBatches(statements);
      const completions = takeBatches(this.#completions, this.#cap, statements);
      this.#sendingAcks = acks;
      this.#sendingCompletions = completions;
      this.#sending = 0;
      for (const batch of acks) this.#sending += batch.ids.length;
      for (const batch of completions) this.#sending += batch.length;
      await Promise.all([
        ...acks.map((batch) =>
          this.#send("ack", batch.ids.length, () => ackClaimed(this.#sql, batch.ids, batch.tokens))
        ),
        ...completions.map((batch) =>
          this.#send("complete", batch.length, () => completeJobs(this.#sql, batch))
        ),
      ]);
      this.#sendingAcks = NONE;
      this.#sendingCompletions = NONE;
      this.#sending = 0;
      this.#roomCheck();
    }
    this.#flushing = null;
  }

  /** Up to `count` ack batches of at most the cap, taken from the front of the acks. */
  #takeAckBatches(count: number): AckBatch[] {
    const { ids, tokens } = this.#acks;
    if (ids.length === 0) return [];
    if (ids.length <= this.#cap) {
      this.#acks = { ids: [], tokens: [] };
      return [{ ids, tokens }];
    }
    const batches: AckBatch[] = [];
    while (ids.length > 0 && batches.length < count) {
      batches.push({ ids: ids.splice(0, this.#cap), tokens: tokens.splice(0, this.#cap) });
    }
    return batches;
  }

  async #send(what: string, count: number, run: () => Promise<unknown>): Promise<void> {
    if (count === 0) return;
    try {
      await retryOnce(what, run);
    } catch (error) {
      // The jobs stay claimed and are redelivered after their deadline (at-least-once).
      this.#log.error("Cannot {what} {count} jobs, they will be redelivered: {error}", {
        what,
        count,
        error: describeError(error),
      });
    }
  }

  /** Count a failure or fan-out in the backlog while it is recorded. */
  async #tracked(record: () => Promise<void>): Promise<void> {
    this.#recording++;
    this.#noteGrowth();
    try {
      await record();
    } finally {
      this.#recording--;
      this.#roomCheck();
    }
  }

  /** The backlog grew: remember when it reached the limit, to call onRoom once it falls. */
  #noteGrowth(): void {
    if (this.#wasFull || this.backlog < this.#limit) return;
    this.#wasFull = true;
    this.#log.warn("Outcomes are recorded slower than jobs finish: claiming paused at {count}", {
      count: this.backlog,
    });
  }

  /** The backlog shrank: below the limit after reaching it, the consumer may claim again. */
  #roomCheck(): void {
    if (this.#wasFull && this.backlog < this.#limit) {
      this.#wasFull = false;
      this.#log.info("Outcomes caught up: claiming again at {count}", { count: this.backlog });
      this.#options.onRoom?.();
    }
  }

  /**
   * The handler finished and asked for a fan-out: ack, barrier and children in one go.
   * When the database refuses the fan-out itself (a limit or a rule it checks again,
   * such as its own payload limit), the same spec would be refused on every redelivery:
   * the job fails for good now instead of running again.
   */
  async #fanOut(run: JobRun, spec: CheckedFanOut, ms: number): Promise<void> {
    const job = run.job;
    // Traced: the fan-out's span, whose context its children and callbacks carry.
    const span = run.span?.fanOut(spec.children);
    const sent = span === undefined ? spec : spec.withTraceparent(span.traceparent);
    try {
      const execution = await retryOnce(
        "fan-out",
        () =>
          fanOut(this.#sql, job, sent, {
            maxChildren: this.#options.maxFanOut,
            maxPayloadBytes: this.#options.maxPayloadBytes,
          }),
      );
      span?.end();
      if (execution === null) {
        this.#log.warn("Job {job_id} lost its claim before its fan-out: nothing enqueued", {
          job_id: job.id,
        });
        // Nothing was recorded: the run ends as lost, as a lost ack's does.
        run.span?.end("lost");
        return;
      }
    } catch (error) {
      span?.end(describeError(error));
      if (isDataError(error)) {
        const refused = new PermanentError(`Cannot fan out: ${(error as Error).message}`, {
          cause: error,
        });
        return await this.#fail(run, refused, ms);
      }
      this.#log.error("Cannot fan out from job {job_id}, it will be redelivered: {error}", {
        job_id: job.id,
        error: describeError(error),
      });
      run.span?.end("unrecorded", describeError(error));
      return;
    }
    metrics.jobFinished(job, "completed", ms);
    this.#options.totals?.add(job.queue, "completed");
    run.span?.end("completed");
  }

  /** Record a failure: retry later, or dead-letter when final. */
  async #fail(run: JobRun, error: unknown, ms: number): Promise<void> {
    const job = run.job;
    const failure = failureOf(error, job.attempts, this.#options.retryBaseMs);
    try {
      const outcome = await retryOnce("fail", () => fail(this.#sql, job, failure));
      metrics.jobFinished(job, outcome, ms);
      if (outcome === "retried") this.#options.totals?.add(job.queue, "failed");
      else if (outcome === "dead") this.#options.totals?.add(job.queue, "dead");
      run.span?.end(outcome, failure.error);
      const level = outcome === "dead" ? "error" : "warn";
      this.#log[level]("Job {job_id} ({task}) failed on attempt {attempt}, {outcome}: {error}", {
        job_id: job.id,
        task: job.task,
        attempt: job.attempts,
        outcome: outcome === "dead" ? "dead-lettered" : outcome,
        error: failure.error,
      });
    } catch (failError) {
      this.#log.error("Cannot record failure of job {job_id}, it will be redelivered: {error}", {
        job_id: job.id,
        error: describeError(failError),
      });
      run.span?.end("unrecorded", failure.error);
    }
  }
}

/** Up to `count` batches of at most `cap` items, taken from the front of `queue`. */
export function takeBatches<T>(queue: T[], cap: number, count: number): T[][] {
  const batches: T[][] = [];
  while (queue.length > 0 && batches.length < count) {
    batches.push(queue.length <= cap ? queue.splice(0) : queue.splice(0, cap));
  }
  return batches;
}
