/**
 * The consumer role: claim jobs from named queues into free slots, run their handlers,
 * record their outcomes; heartbeat what runs; hand everything back on shutdown.
 *
 * A thin loop over parts with tests of their own:
 * - `PrefetchBuffer` (lib/prefetch.ts): claimed jobs waiting for a slot, how many to
 *   claim (the pace), when to probe, and where claimed jobs go (admission order);
 * - `JobRun` (lib/run_job.ts): one job's context, handler, timeout, abort and outcome;
 * - `Completer` (lib/completer.ts): records every outcome (batched acks and completions
 *   capped per statement, failures, fan-outs), and applies backpressure;
 * - `claimOnce` and `heartbeatOnce` (below): the claim, written once, and the one
 *   statement that extends everything this process holds.
 *
 * The loop claims, in one statement, enough jobs to fill its free slots plus the prefetch
 * buffer: buffered jobs are claimed (heartbeated, fenced) but not started, and start as
 * slots free up, so a busy consumer claims in large batches instead of one statement per
 * freed slot. It claims again once the buffer is half empty, then sleeps until a NOTIFY
 * for one of its queues, a drained buffer (when the last claim was full), room in the
 * completer's backlog, the poll interval, or the stop signal. On shutdown the buffer is
 * handed back at once.
 *
 * At start it registers itself and its tasks in the catalog (lib/catalog.ts: where jobs of
 * its tasks go when an enqueue names no queue), refreshes that about once a minute, and
 * removes its consumer row on a graceful stop.
 *
 * @module
 */
import {
  checkBoolean,
  checkInteger,
  checkNameList,
  checkObject,
  checkPool,
  checkSignal,
  checkString,
  MAX_INT4,
  shown,
} from "./args.ts";
import type { Db, Sql } from "./db.ts";
import {
  backoffWithJitter,
  isReadOnlyStandby,
  retryOnce,
  settleWithin,
  STATEMENT_DEADLINE_MS,
} from "./db.ts";
import { formatDuration, MAX_TIMER_MS } from "./duration.ts";
import { Sleeper } from "./sleep.ts";
import { describeError, type Logger, logger } from "./log.ts";
import { metrics } from "./metrics.ts";
import {
  claim,
  type ClaimOptions,
  type ClaimResult,
  extend,
  type Job,
  type JobRef,
  jobTraceparents,
  release,
  saveProgress,
} from "./queue.ts";
import { type Tracer, tracer } from "./tracing.ts";
import type { TaskRegistry } from "./tasks.ts";
import {
  CATALOG_REFRESH_MS,
  type ConsumerRegistration,
  ConsumerTotals,
  type InFlight,
  MAX_REPORTED_QUEUES,
  refreshConsumer,
  registerConsumer,
  registrationsOf,
  reportInFlight,
  type TaskRegistration,
  unregisterConsumer,
} from "./catalog.ts";
import { HEAD_SCAN_TIMEOUT_MS, HeadScans } from "./head_scan.ts";
import { HOLD_MAX_MS, PrefetchBuffer, type Rank, ranksBy } from "./prefetch.ts";
import { JobRun, type RunEnv, TimeoutSweep } from "./run_job.ts";
import { Completer } from "./completer.ts";
import { CheckpointBatcher } from "./checkpoints.ts";
import type { ProgressReport } from "./progress.ts";

/** SQLSTATE of a statement cancelled by statement_timeout (or a cancel request). */
const QUERY_CANCELED = "57014";

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
  /** Most jobs per ack or complete statement (default BATCH_CAP, lib/completer.ts). */
  ackBatchCap?: number;
  /** Unrecorded outcomes at which claiming pauses (default BACKLOG_LIMIT, lib/completer.ts). */
  ackBacklogLimit?: number;
  /** Called on every turn of the loop (the liveness check, lib/liveness.ts). */
  onTurn?: () => void;
  /** How often the catalog hears that this consumer is alive (default CATALOG_REFRESH_MS). */
  catalogRefreshMs?: number;
}

/** The longest wait between claims after failed ones (the backoff's cap). */
const CLAIM_BACKOFF_CAP_MS = 30_000;

/**
 * The longest one turn of the consumer's loop takes, database reachable or not: a claim
 * (bounded by the statement deadline), then a sleep of at most the poll interval or the
 * claim backoff's cap.
 */
export function longestConsumerTurnMs(options: Pick<ConsumerOptions, "pollIntervalMs">): number {
  return STATEMENT_DEADLINE_MS + Math.max(options.pollIntervalMs, CLAIM_BACKOFF_CAP_MS);
}

export interface ConsumerDeps {
  sql: Sql;
  tasks: TaskRegistry;
}

/**
 * Throw unless runConsumer()'s arguments can work: the bounds are what the loop needs,
 * the flags (lib/config.ts) may be narrower.
 */
function checkConsumerArgs(deps: ConsumerDeps, options: ConsumerOptions, stop: AbortSignal): void {
  const fn = "runConsumer";
  const ms = (min: number) => ({ min, max: MAX_TIMER_MS });
  const count = (min: number) => ({ min, max: MAX_INT4, optional: true });
  checkObject(fn, "deps", deps, { what: "an object ({ sql, tasks })" });
  checkPool(fn, deps.sql, "deps.sql");
  // By shape, not instanceof: a registry from another copy of this module works as well.
  const tasks = deps.tasks as Partial<TaskRegistry> | null | undefined;
  if (typeof tasks?.get !== "function" || typeof tasks.names !== "function") {
    throw new TypeError(
      `Invalid deps.tasks for ${fn}(): expected a TaskRegistry (new TaskRegistry(tasks)), not ${
        shown(deps.tasks)
      }`,
    );
  }
  checkObject(fn, "options", options);
  checkNameList(fn, "options.queues", "queue", options.queues);
  checkInteger(fn, "options.concurrency", options.concurrency, { min: 1, max: MAX_INT4 });
  checkInteger(fn, "options.prefetch", options.prefetch, count(0));
  // Heartbeats come at most every 50 ms: a shorter visibility could not be kept.
  checkInteger(fn, "options.visibilityTimeoutMs", options.visibilityTimeoutMs, ms(100));
  checkInteger(fn, "options.pollIntervalMs", options.pollIntervalMs, ms(1));
  checkBoolean(fn, "options.listen", options.listen);
  checkInteger(fn, "options.shutdownGraceMs", options.shutdownGraceMs, ms(0));
  checkInteger(fn, "options.taskTimeoutMs", options.taskTimeoutMs, ms(1));
  checkString(fn, "options.workerId", options.workerId, { optional: true });
  checkInteger(fn, "options.retryBaseMs", options.retryBaseMs, { ...ms(0), optional: true });
  checkInteger(fn, "options.maxPayloadBytes", options.maxPayloadBytes, count(1));
  checkInteger(fn, "options.maxFanOut", options.maxFanOut, count(0));
  checkInteger(fn, "options.ackBatchCap", options.ackBatchCap, count(1));
  checkInteger(fn, "options.ackBacklogLimit", options.ackBacklogLimit, count(1));
  checkSignal(fn, "stop", stop);
}

export function defaultWorkerId(): string {
  return `${Deno.hostname()}:${Deno.pid}`;
}

/**
 * Claim jobs once, within the statement deadline (a claim on a connection Postgres just
 * killed can stay unsettled for good: past the deadline it counts as a lost connection),
 * and report what it found: claimed jobs to the metrics, poisoned ones (dead-lettered
 * unrun) to the metrics and the log. The loop's claim and a probe's both come here.
 */
export async function claimOnce(db: Db, options: ClaimOptions): Promise<ClaimResult> {
  const traced = tracer();
  const startedAt = traced === null ? 0 : Date.now();
  const result = await settleWithin("claim", claim(db, options), STATEMENT_DEADLINE_MS);
  if (traced !== null && result.jobs.length > 0) {
    // The claim's span ends with the claim, not with the read below.
    traced.claimed(options.queues, startedAt, result.jobs);
    await linkProducers(db, traced, result.jobs);
  }
  metrics.jobsClaimed(result.jobs);
  metrics.jobsPoisoned(result.poisoned);
  for (const p of result.poisoned) {
    logger("consumer").error(
      "Job {job_id} ({task}) dead-lettered unrun: claimed {attempt} times without finishing",
      { job_id: p.id, task: p.task, attempt: p.attempts },
    );
  }
  return result;
}

/**
 * How long a traced claim waits for its jobs' traceparents before running them unlinked.
 * The read is one lookup by primary key (a round trip); a database slow enough to miss
 * this delays no run longer.
 */
export const TRACE_READ_TIMEOUT_MS = 250;

/**
 * With tracing on: read the claimed jobs' traceparents (one statement; the claim itself
 * ships no column more), so that each run's span links to its producer. Never throws: the
 * jobs are claimed, and run unlinked when the read fails or takes over
 * TRACE_READ_TIMEOUT_MS.
 *
 * The jobs wait for this read (bounded) rather than start while it runs: a span's links
 * are given when it starts (what a sampler sees), and a link added later would miss every
 * run that ends before the read returns, the fast ones first. So the claim's span ends
 * before the read (it measures the claim only), and the read is bounded instead.
 */
async function linkProducers(db: Db, traced: Tracer, jobs: readonly Job[]): Promise<void> {
  try {
    const rows = await settleWithin(
      "traceparents",
      jobTraceparents(db, jobs.map((j) => j.id)),
      TRACE_READ_TIMEOUT_MS,
    );
    if (rows.length > 0) {
      const byId = new Map(rows.map((r) => [r.id, r.traceparent]));
      for (const job of jobs) {
        const traceparent = byId.get(job.id);
        if (traceparent !== undefined) traced.remember(job, traceparent);
      }
    }
  } catch (error) {
    logger("tracing").warn(
      "Cannot read the trace context of {count} claimed jobs, their runs are not linked to their producers: {error}",
      { count: jobs.length, error: describeError(error) },
    );
  }
}

/** A registration's settings as a log line shows them: `queue app, 3 attempts, timeout 30s`. */
function describeSettings(
  t: { queue: string | null; max_attempts: number | null; timeout_ms: number | null },
): string {
  return [
    t.queue === null ? "no queue of its own" : `queue ${t.queue}`,
    t.max_attempts === null ? "no max attempts of its own" : `${t.max_attempts} attempts`,
    t.timeout_ms === null
      ? "the consumer's --task-timeout"
      : `timeout ${formatDuration(t.timeout_ms)}`,
  ].join(", ");
}

/**
 * Register a consumer and its tasks in the catalog (retried once on a lost connection), and
 * warn once per task whose settings differ from those registered before while other live
 * consumers run it: the warning names both registrations; the last one wins. Throws when
 * the statement fails.
 */
export async function registerOnce(db: Db, consumer: ConsumerRegistration): Promise<void> {
  // Within the statement deadline, as every statement of a role: one stalled on a connection
  // a restart killed would otherwise hold the consumer's start (or its shutdown) for good.
  const conflicts = await retryOnce(
    "register",
    () => settleWithin("register", registerConsumer(db, consumer), STATEMENT_DEADLINE_MS),
  );
  const mine = new Map<string, TaskRegistration>(consumer.tasks.map((t) => [t.name, t]));
  for (const other of conflicts) {
    const own = mine.get(other.name)!;
    const ours = describeSettings({
      queue: own.queue,
      max_attempts: own.maxAttempts,
      timeout_ms: own.timeoutMs,
    });
    logger("catalog").warn(
      "Task {task} registered by {worker} ({settings}) differs from its registration by {other_worker} ({other_settings}) while live consumers {live_workers} run it: the last registration wins, so jobs enqueued without a queue or max attempts now take {worker}'s settings",
      {
        task: other.name,
        worker: consumer.workerId,
        settings: ours,
        other_worker: other.registered_by,
        other_settings: describeSettings(other),
        live_workers: other.live_workers.join(","),
      },
    );
  }
}

/**
 * Keeps a consumer's catalog rows current: registers at start, refreshes every interval
 * (registering again if the start failed), and unregisters on stop. Never throws: a catalog
 * write that fails is logged and tried again at the next refresh; the consumer runs on.
 */
class CatalogPresence {
  #registered = false;
  #timer: ReturnType<typeof setInterval> | undefined;
  #inFlight: Promise<void> | null = null;
  #everyMs = CATALOG_REFRESH_MS;

  constructor(
    private readonly db: Db,
    private readonly consumer: ConsumerRegistration,
    private readonly totals: ConsumerTotals,
  ) {}

  /** Register now, then refresh every `everyMs`. */
  async start(everyMs: number): Promise<void> {
    this.#everyMs = everyMs;
    await this.#beat();
    this.#timer = setInterval(() => {
      this.#inFlight ??= this.#beat().finally(() => (this.#inFlight = null));
    }, everyMs);
  }

  async #beat(): Promise<void> {
    try {
      if (this.#registered) {
        const cameBack = await retryOnce(
          "refresh",
          () =>
            settleWithin(
              "refresh",
              refreshConsumer(this.db, this.consumer),
              STATEMENT_DEADLINE_MS,
            ),
        );
        // Its row starts again from empty totals: so do ours, or they would count twice.
        if (cameBack) this.#restartTotals();
      } else {
        await registerOnce(this.db, this.consumer);
        this.#registered = true;
        this.#restartTotals(); // the registration wrote empty totals
      }
    } catch (error) {
      logger("catalog").error(
        "Cannot {what} consumer {worker} in the task catalog, trying again in {wait}: {error}",
        {
          what: this.#registered ? "refresh" : "register",
          worker: this.consumer.workerId,
          wait: formatDuration(this.#everyMs),
          error: describeError(error),
        },
      );
    }
  }

  /** The row holds empty totals now (written by the registration): so do we. */
  #restartTotals(): void {
    this.totals.reset();
    this.#reported = this.totals.version;
  }

  /** Whether the last report recorded held jobs (an empty one need not be sent again). */
  #holding = false;
  /** The totals' version the last report recorded (0: nothing finished, nothing to send). */
  #reported = 0;
  #warnedCap = false;

  /**
   * Record what the consumer holds, by queue, valid for `validMs`, and what it finished, by
   * queue (`totals`, in the same update); nothing when it held nothing at the last report
   * either and finished nothing since (an idle consumer sends no statement). Never throws,
   * and not retried: the next heartbeat reports again.
   */
  async report(
    inFlight: ReadonlyMap<string, InFlight>,
    validMs: number,
    totals: ConsumerTotals,
    heartbeatMs: number,
  ): Promise<void> {
    const version = totals.version;
    if (inFlight.size === 0 && !this.#holding && version === this.#reported) return;
    if (totals.dropped && !this.#warnedCap) {
      this.#warnedCap = true;
      logger("catalog").warn(
        "Consumer {worker} reports finished jobs of its first {count} queues only: the rates of its other queues are missing from the dashboard",
        { worker: this.consumer.workerId, count: MAX_REPORTED_QUEUES },
      );
    }
    try {
      await settleWithin(
        "report",
        reportInFlight(this.db, this.consumer.workerId, inFlight, validMs, {
          totals: totals.toJSON(),
          heartbeatMs,
        }),
        STATEMENT_DEADLINE_MS,
      );
      this.#holding = inFlight.size > 0;
      this.#reported = version;
    } catch (error) {
      logger("catalog").warn(
        "Cannot record the jobs consumer {worker} holds and finished, trying again at its next heartbeat: {error}",
        { worker: this.consumer.workerId, error: describeError(error) },
      );
    }
  }

  /** Stop refreshing and remove the consumer's row (its tasks stay in the catalog). */
  async stop(): Promise<void> {
    clearInterval(this.#timer);
    // A refresh landing after the delete would bring the row back.
    await this.#inFlight;
    try {
      await retryOnce(
        "unregister",
        () =>
          settleWithin(
            "unregister",
            unregisterConsumer(this.db, this.consumer.workerId),
            STATEMENT_DEADLINE_MS,
          ),
      );
    } catch (error) {
      logger("catalog").warn(
        "Cannot remove consumer {worker} from the task catalog, it counts as live for a few more minutes: {error}",
        { worker: this.consumer.workerId, error: describeError(error) },
      );
    }
  }
}

/** What one heartbeat extends: every job this process holds, in one statement. */
export interface HeartbeatTargets<R extends { readonly job: Job }> {
  /** Runs whose handler is still running. */
  running: readonly R[];
  /** Claimed jobs waiting in the prefetch buffer. */
  buffered: readonly Job[];
  /** Finished jobs whose ack has not been sent yet (the completer's). */
  unsent: readonly JobRef[];
}

/** The running and buffered jobs whose claim the heartbeat could not extend. */
export interface HeartbeatLost<R> {
  running: R[];
  buffered: Job[];
}

/**
 * Extend the claims of running, buffered and unsent jobs in one statement (retried once
 * on a lost connection), recording the running ones as started (the claim recorded those
 * that started at once; those started from the buffer since are recorded here), and return
 * the running and buffered ones no longer ours: their claim moved on, or their execution
 * ended. Throws when the statement fails.
 */
export async function heartbeatOnce<R extends { readonly job: Job }>(
  db: Db,
  targets: HeartbeatTargets<R>,
  visibilityMs: number,
): Promise<HeartbeatLost<R>> {
  const refs: JobRef[] = [];
  for (const r of targets.running) refs.push(r.job);
  for (const job of targets.buffered) refs.push(job);
  for (const ref of targets.unsent) refs.push(ref);
  const started = targets.running.map((r) => r.job.id);
  const kept = new Set(
    await retryOnce("extend", () => extend(db, refs, visibilityMs, started)),
  );
  return {
    running: targets.running.filter((r) => !kept.has(r.job.id)),
    buffered: targets.buffered.filter((job) => !kept.has(job.id)),
  };
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

/** Why jobs are handed back: buffered ones whose claim was lost, or at shutdown; or runs unfinished at shutdown. */
type HandBackReason = "lost" | "shutdown" | "unfinished";

/** Release jobs (attempt not burned): visible at once for any consumer. Never throws. */
async function handBack(db: Db, refs: JobRef[], why: HandBackReason): Promise<void> {
  const log = logger("consumer");
  try {
    const released = await retryOnce("release", () => release(db, refs));
    if (why === "unfinished") {
      log.info("Released {count} unfinished jobs for immediate redelivery", {
        count: released.length,
      });
    } else log.info("Handed back {count} buffered jobs ({why})", { count: released.length, why });
  } catch (error) {
    const message = why === "unfinished"
      ? "Cannot release {count} jobs, they return after their deadline: {error}"
      : "Cannot hand back {count} buffered jobs, they return after their deadline: {error}";
    log.error(message, { count: refs.length, error: describeError(error) });
  }
}

/**
 * LISTEN for jobs on `queues`: `ready` when jobs are ready (and on every (re)connect, to
 * catch up on anything missed), `due` with the epoch ms when delayed jobs start. Returns
 * how to stop listening, or null when LISTEN is refused (the loop polls instead).
 */
async function listenForJobs(
  sql: Sql,
  queues: ReadonlySet<string>,
  on: { ready: (rank?: Rank) => void; due: (epochMs: number) => void },
  options: { pollIntervalMs: number },
): Promise<(() => Promise<void>) | null> {
  try {
    const sub = await sql.listen(
      "shoal_jobs",
      (payload) => {
        const wake = parseWake(payload);
        if (!queues.has(wake.queue)) return;
        if (wake.due !== undefined && wake.due > Date.now()) on.due(wake.due);
        else on.ready(wake.rank);
      },
      () => on.ready(),
    );
    return sub.unlisten;
  } catch (error) {
    logger("consumer").warn("Cannot LISTEN, polling every {interval}: {error}", {
      interval: formatDuration(options.pollIntervalMs),
      error: describeError(error),
    });
    return null;
  }
}

/** One shoal_jobs notification, as the wake protocol (sql/functions/wake.sql) writes it. */
export interface Wake {
  queue: string;
  /** "queue@<epoch ms>": when the jobs start. */
  due?: number;
  /** "queue#<priority>:<fair_seq>": where the first of them ranks. */
  rank?: Rank;
}

/**
 * Read a shoal_jobs payload: "queue", "queue@<epoch ms>" or "queue#<priority>:<fair_seq>"
 * ('@' and '#' cannot occur in a queue name). A part that does not parse is left out: the
 * jobs are then announced as ready, rank unknown.
 */
export function parseWake(payload: string): Wake {
  const at = payload.indexOf("@");
  if (at >= 0) {
    const due = Number(payload.slice(at + 1));
    return Number.isFinite(due)
      ? { queue: payload.slice(0, at), due }
      : { queue: payload.slice(0, at) };
  }
  const hash = payload.indexOf("#");
  if (hash < 0) return { queue: payload };
  const queue = payload.slice(0, hash);
  const match = /^(-?\d{1,5}):(-?\d{1,19})$/.exec(payload.slice(hash + 1));
  if (match === null) return { queue };
  return { queue, rank: { priority: Number(match[1]), fair_seq: match[2]! } };
}

/** What probes use of the consumer. */
interface ProbeParts {
  buffer: PrefetchBuffer;
  completer: Completer;
  claim: (limit: number, before: ClaimOptions["before"]) => Promise<ClaimResult>;
  /** Takes claimed jobs in (ranking ahead of the buffer, they go first). */
  admit: (jobs: Job[]) => void;
  /** Starts buffered jobs into free slots (after the buffer stops holding them back). */
  fill: () => void;
  /** Whether the loop's own claim is in flight. */
  claiming: () => boolean;
  log: Logger;
}

/**
 * Probes. With more than the free slots' worth buffered, an announcement (a NOTIFY, a
 * delayed job due) claims at once the jobs ranking no later than the last buffered one,
 * and the buffer's admission order puts them first. A probe runs beside the loop's own
 * claim, which may be in flight for a while with hundreds of jobs: waiting for it would
 * let that many buffered jobs start first. One probe at a time; the buffer paces them
 * (PROBE_QUIET_MS after one that found nothing), and none runs while the completer is full.
 */
class Probes {
  #probing: Promise<void> | null = null;
  #quietTimer: ReturnType<typeof setTimeout> | undefined;
  /** A job ranking ahead was announced while a probe was in flight: probe again after it. */
  #again = false;
  /** Ends a hold that outlasts HOLD_MAX_MS. */
  #holdTimer: ReturnType<typeof setTimeout> | undefined;
  /** The hold ends when the loop's claim in flight is in (claimed()). */
  #unholdAfterClaim = false;

  constructor(private readonly parts: ProbeParts, private readonly stop: AbortSignal) {}

  /** Whether a probe's claim is in flight. */
  get probing(): boolean {
    return this.#probing !== null;
  }

  /** Probe now if one is worth it, or once the buffer's pause is over. */
  soon(): void {
    if (this.#probing || this.#quietTimer || this.stop.aborted) return;
    const { buffer, completer } = this.parts;
    const before = buffer.probeBound();
    if (!before || completer.full) return;
    const wait = buffer.probeWait();
    if (wait > 0) {
      this.#quietTimer = setTimeout(() => {
        this.#quietTimer = undefined;
        this.soon();
      }, wait);
      return;
    }
    this.#run(before);
  }

  /**
   * A job ranking at `rank` was announced. When it would start ahead of buffered jobs,
   * probe at once (no pause after an empty probe: this one has something to find), and
   * hold back the buffered jobs ranking after it until the probe is in, at most
   * HOLD_MAX_MS: otherwise they keep starting for the probe's round trip.
   */
  ahead(rank: Rank): void {
    const { buffer, completer } = this.parts;
    if (this.stop.aborted || completer.full || !buffer.wouldJump(rank)) return;
    buffer.hold(rank);
    clearTimeout(this.#holdTimer);
    this.#holdTimer = setTimeout(() => this.#unhold(), HOLD_MAX_MS);
    if (this.#probing) {
      // It may have started before the job committed.
      this.#again = true;
      return;
    }
    clearTimeout(this.#quietTimer);
    this.#quietTimer = undefined;
    this.#run(buffer.probeBound()!);
  }

  #run(before: NonNullable<ClaimOptions["before"]>): void {
    const limit = this.parts.buffer.probeLimit();
    this.#probing = this.#probe(before, limit).then((got) => {
      this.#probing = null;
      const again = this.#again;
      this.#again = false;
      const bound = this.parts.buffer.probeBound();
      if (again && bound && !this.stop.aborted && !this.parts.completer.full) {
        this.#run(bound);
        return;
      }
      // Found nothing: the loop's own claim in flight may hold the job, locked (a probe
      // skips locked rows); it goes first once that claim is in.
      if (got === 0 && this.parts.buffer.holding && this.parts.claiming()) {
        this.#unholdAfterClaim = true;
      } else this.#unhold();
      if (got === limit) this.soon();
    });
  }

  /** The loop's claim is in (admitted, or failed). */
  claimed(): void {
    if (!this.#unholdAfterClaim) return;
    this.#unholdAfterClaim = false;
    this.#unhold();
  }

  /** The announced jobs are in (or the hold ran out): let held-back jobs start. */
  #unhold(): void {
    clearTimeout(this.#holdTimer);
    this.#holdTimer = undefined;
    if (!this.parts.buffer.holding) return;
    this.parts.buffer.unhold();
    this.parts.fill();
  }

  /** After the stop signal: no pending probe starts; resolves once one in flight is in. */
  async settle(): Promise<void> {
    clearTimeout(this.#quietTimer);
    this.#quietTimer = undefined;
    this.#again = false;
    await this.#probing;
    clearTimeout(this.#holdTimer);
    this.#holdTimer = undefined;
    this.parts.buffer.unhold();
  }

  /** One probe of at most `limit` jobs; resolves to how many it claimed. Never throws. */
  async #probe(before: ClaimOptions["before"], limit: number): Promise<number> {
    const { buffer, claim, admit, log } = this.parts;
    try {
      const { jobs, poisoned } = await claim(limit, before);
      admit(jobs);
      const got = jobs.length + poisoned.length;
      buffer.probed(got);
      return got;
    } catch (error) {
      // The loop's next claim takes these jobs in any case (and reports a lasting fault).
      log.warn("Cannot probe for jobs ranking ahead of the buffer: {error}", {
        error: describeError(error),
      });
      buffer.probeFailed();
      return 0;
    }
  }
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
  checkConsumerArgs(deps, options, stop);
  const { sql, tasks } = deps;
  const log = logger("consumer");
  const workerId = options.workerId ?? defaultWorkerId();
  const queues = new Set(options.queues);
  const prefetch = options.prefetch ?? 0;
  const running = new Map<string, JobRun>();
  const buffer = new PrefetchBuffer({ concurrency: options.concurrency, prefetch });
  const waker = new Sleeper();
  /** What this consumer finished, by queue: written with its heartbeat (lib/catalog.ts). */
  const totals = new ConsumerTotals();
  const completer = new Completer(sql, {
    totals,
    batchCap: options.ackBatchCap,
    backlogLimit: options.ackBacklogLimit,
    retryBaseMs: options.retryBaseMs,
    maxPayloadBytes: options.maxPayloadBytes,
    maxFanOut: options.maxFanOut,
    onRoom: () => waker.wake(),
  });
  // Checkpoint steps' records, batched across this consumer's runs (lib/checkpoints.ts); the
  // completions of jobs of executions finishing meanwhile ride in their rounds' statements.
  const checkpoints = new CheckpointBatcher(sql, { completions: completer });
  completer.ridesWith(() => checkpoints.busy);
  const env: RunEnv = {
    sql,
    tasks,
    log,
    taskTimeoutMs: options.taskTimeoutMs,
    maxPayloadBytes: options.maxPayloadBytes,
    maxFanOut: options.maxFanOut,
    onSettled: settled,
    checkpoints,
  };
  /** Task timeouts: one sweep over running jobs, not a timer per job. */
  const timeouts = new TimeoutSweep(() => {
    const now = performance.now();
    for (const run of running.values()) run.abortIfOverdue(now);
  });
  /** Hand-backs in flight, awaited before the pool closes. */
  const handingBack = new Set<Promise<void>>();
  /** Resolves a shutdown's wait once the last run has left its slot. */
  let onIdle: (() => void) | null = null;
  let lastClaimFull = false;

  /**
   * The claim, written once: the loop's fills room, a probe's is bounded by `before`.
   * `starting`: how many of the batch (the first, in claim order) start at once, recorded
   * as started by the claim itself.
   */
  const claimJobs = (
    limit: number,
    before?: ClaimOptions["before"],
    starting = 0,
    fromHead = false,
  ) =>
    claimCounted({
      queues: options.queues,
      limit,
      workerId,
      visibilityMs: options.visibilityTimeoutMs,
      before,
      starting,
      ...(fromHead ? { fromHead, timeoutMs: HEAD_SCAN_TIMEOUT_MS } : { fromHead }),
    });

  /** A claim, its poisoned jobs (dead-lettered unrun) counted in this consumer's totals. */
  async function claimCounted(claimOptions: ClaimOptions): Promise<ClaimResult> {
    const result = await claimOnce(sql, claimOptions);
    for (const p of result.poisoned) totals.add(p.queue, "dead");
    return result;
  }

  /**
   * The loop's claim. With nothing buffered, and a claim from the head due, it is that claim
   * (beside the loop it would claim for the same free slots): cancelled in the server after
   * HEAD_SCAN_TIMEOUT_MS, when a claim from near the head follows at once.
   */
  async function loopClaim(limit: number, starting: number): Promise<ClaimResult> {
    if (buffer.size === 0 && headScans.due()) {
      const began = performance.now();
      try {
        const result = await claimJobs(limit, undefined, starting, true);
        headScans.done(performance.now() - began);
        return result;
      } catch (error) {
        headScans.done(performance.now() - began);
        if ((error as { code?: unknown }).code !== QUERY_CANCELED) throw error;
        log.warn(
          "A claim from the head of {queues} was cancelled after {timeout}: the next in {wait}",
          {
            queues: options.queues.join(","),
            timeout: formatDuration(HEAD_SCAN_TIMEOUT_MS),
            wait: formatDuration(headScans.wait()),
          },
        );
      }
    }
    return await claimJobs(limit, undefined, starting);
  }
  /** When a claim walks the claim index from its head, beside the loop (lib/head_scan.ts). */
  const headScans = new HeadScans();
  /** The claim from the head in flight, if any. */
  let headScanning: Promise<void> | null = null;

  /**
   * Claim from the head beside the loop when one is due: it finds jobs ranking before where
   * the loop's claims start (a retry or delayed job due, an expired claim). Cancelled in the
   * server after HEAD_SCAN_TIMEOUT_MS; the pause after it grows with its time. Never throws.
   */
  function headScanSoon(): void {
    if (headScanning !== null || stop.aborted || completer.full || !headScans.due()) return;
    // Only jobs ranking ahead of those buffered (they start first, as a probe's do), so it
    // never claims for the slots the loop claims for; with nothing buffered the loop's own
    // claim is the one from the head (loopClaim).
    const before = buffer.lastRank();
    if (before === undefined) return;
    const began = performance.now();
    headScanning = claimCounted({
      queues: options.queues,
      limit: buffer.probeLimit(),
      workerId,
      visibilityMs: options.visibilityTimeoutMs,
      before,
      starting: 0,
      fromHead: true,
      timeoutMs: HEAD_SCAN_TIMEOUT_MS,
    }).then(
      ({ jobs }) => {
        headScans.done(performance.now() - began);
        admit(jobs);
      },
      (error) => {
        headScans.done(performance.now() - began);
        log.warn("Cannot claim from the head of {queues}, the next try in {wait}: {error}", {
          queues: options.queues.join(","),
          wait: formatDuration(headScans.wait()),
          error: describeError(error),
        });
      },
    ).finally(() => (headScanning = null));
  }
  const probes = new Probes(
    { buffer, completer, claim: claimJobs, admit, fill, claiming: () => claiming, log },
    stop,
  );

  /**
   * Jobs were announced (a NOTIFY, a delayed job due): wake the loop, and probe for any that
   * rank ahead of jobs already buffered. With the first one's rank known (the wake
   * protocol's "queue#priority:fair_seq"), only when it ranks ahead of them, at once, holding
   * back the buffered jobs behind it until it is in.
   */
  function announce(rank?: Rank): void {
    waker.wake();
    if (rank === undefined) probes.soon();
    else {
      // A claim in flight may have looked before the job committed: look again after it.
      if (claiming && (aheadAfterClaim === undefined || ranksBy(rank, aheadAfterClaim))) {
        aheadAfterClaim = rank;
      }
      probes.ahead(rank);
    }
  }
  /** Whether the loop's claim is in flight. */
  let claiming = false;
  /** The first job announced ranking ahead while the loop's claim was in flight. */
  let aheadAfterClaim: Rank | undefined;

  /**
   * How many jobs of a claim sent now are sure to start as soon as it returns: the free
   * slots, when nothing is buffered (a buffered job takes a freed slot first) and no probe
   * is in flight (its jobs could take them first). Slots only free up meanwhile, so at
   * least these start: the claim records them as started; any more that start are recorded
   * by the next heartbeat.
   */
  function startingAtOnce(): number {
    if (buffer.size > 0 || probes.probing) return 0;
    return Math.max(0, options.concurrency - running.size);
  }

  /** Take claimed jobs into the buffer, then start from its front while slots are free. */
  function admit(jobs: Job[]): void {
    buffer.admit(jobs);
    fill();
  }

  /** Start buffered jobs while slots are free (none the buffer holds back). */
  function fill(): void {
    while (running.size < options.concurrency && !stop.aborted) {
      const job = buffer.next();
      if (job === undefined) return;
      start(job);
    }
  }

  function start(job: Job): void {
    const run = new JobRun(job, env);
    running.set(job.id, run);
    timeouts.watch(run.timeoutMs);
  }

  /** A run settled (env.onSettled): record its outcome and free its slot. */
  function settled(run: JobRun): void {
    // An ack is only queued: the slot frees now. A failure or fan-out keeps it until
    // recorded.
    const recording = completer.record(run);
    if (recording) recording.finally(() => finish(run));
    else finish(run);
  }

  function finish(run: JobRun): void {
    running.delete(run.job.id);
    headScanSoon();
    buffer.jobFinished();
    // A freed slot takes the next buffered job, unless we are shutting down.
    if (!stop.aborted) {
      const next = buffer.next();
      if (next !== undefined) start(next);
    }
    if (lastClaimFull && buffer.size <= buffer.lowWater()) waker.wake();
    if (running.size === 0 && onIdle) {
      onIdle();
      onIdle = null;
    }
  }

  /** Resolves once no run holds a slot. */
  function idle(): Promise<void> {
    if (running.size === 0) return Promise.resolve();
    return new Promise((resolve) => (onIdle = resolve));
  }

  /**
   * The jobs this consumer holds by queue: running (a slot held, the outcome maybe still
   * being recorded) and buffered. `shoal status` and /metrics read them for queues too
   * large to count (lib/catalog.ts reportInFlight).
   */
  function inFlight(buffered: readonly Job[]): Map<string, InFlight> {
    const byQueue = new Map<string, InFlight>();
    const of = (queue: string) => {
      let counts = byQueue.get(queue);
      if (!counts) byQueue.set(queue, counts = { running: 0, prefetched: 0 });
      return counts;
    };
    for (const run of running.values()) of(run.job.queue).running++;
    for (const job of buffered) of(job.queue).prefetched++;
    return byQueue;
  }

  /**
   * Write what the running handlers reported through ctx.progress since the last beat: one
   * statement for all of them, none when none reported (lib/progress.ts). A failed write is
   * logged and dropped: progress is advisory, and the next report replaces it.
   */
  async function writeProgress(live: readonly JobRun[]): Promise<void> {
    const reports: ProgressReport[] = [];
    for (const run of live) {
      const progress = run.takeProgress();
      if (progress !== undefined) reports.push({ id: run.job.id, token: run.job.token, progress });
    }
    if (reports.length === 0) return;
    try {
      await retryOnce("progress", () => saveProgress(sql, reports));
    } catch (error) {
      log.warn("Cannot record the progress of {count} jobs: {error}", {
        count: reports.length,
        error: describeError(error),
      });
    }
  }

  async function heartbeat(): Promise<void> {
    const live: JobRun[] = [];
    for (const run of running.values()) if (run.state === "running") live.push(run);
    const targets = { running: live, buffered: buffer.snapshot(), unsent: completer.unsent() };
    const count = live.length + targets.buffered.length + targets.unsent.length;
    // After the extend, which matters more; valid as long as the claims it counts, so the
    // report of a consumer that died lapses with them.
    const report = () =>
      presence.report(
        inFlight(targets.buffered),
        options.visibilityTimeoutMs,
        totals,
        heartbeatEvery,
      );
    if (count === 0) return await report();
    try {
      const lost = await heartbeatOnce(sql, targets, options.visibilityTimeoutMs);
      dropLostFromBuffer(lost.buffered);
      await writeProgress(live);
      for (const run of lost.running) {
        // Only a run still running: one that settled meanwhile is the completer's.
        if (running.get(run.job.id) !== run || run.state !== "running") continue;
        run.lose();
        log.warn("Lost the claim on job {job_id}: aborted its handler", { job_id: run.job.id });
      }
    } catch (error) {
      log.error("Cannot extend {count} running jobs: {error}", {
        count,
        error: describeError(error),
      });
      return; // nor would the report go through: the next heartbeat sends one
    }
    await report();
  }

  /**
   * Buffered jobs the heartbeat could not extend (their execution ended, or the claim
   * moved on) leave the buffer unstarted; they are handed back so the next claim acks
   * an ended execution's job at once instead of after its deadline.
   */
  function dropLostFromBuffer(lost: Job[]): void {
    // Only jobs still buffered: one that started meanwhile is the next heartbeat's.
    const dropped = lost.length === 0 ? lost : buffer.remove(lost);
    if (dropped.length === 0) return;
    log.warn("Dropped {count} buffered jobs whose claim was lost before they started", {
      count: dropped.length,
    });
    handBackTracked(dropped, "lost");
  }

  /** Hand jobs back (see handBack()), tracked so that shutdown awaits it. */
  function handBackTracked(refs: JobRef[], why: HandBackReason): Promise<void> {
    const handing = handBack(sql, refs, why);
    handingBack.add(handing);
    handing.finally(() => handingBack.delete(handing));
    return handing;
  }

  const presence = new CatalogPresence(sql, {
    workerId,
    queues: [...queues],
    tasks: registrationsOf(tasks.names().map((name) => tasks.get(name)!)),
  }, totals);
  const heartbeatEvery = Math.max(50, Math.floor(options.visibilityTimeoutMs / 3));
  let beating: Promise<void> | null = null;
  const heartbeatTimer = setInterval(() => {
    beating ??= heartbeat().finally(() => (beating = null));
  }, heartbeatEvery);

  await presence.start(options.catalogRefreshMs ?? CATALOG_REFRESH_MS);

  /**
   * Wakes the loop when the earliest announced delayed job or retry becomes due; its stamp
   * may rank before where claiming has got to, so the next claim walks from the head.
   */
  const dueWake = new DueWake(() => {
    headScans.request();
    headScanSoon();
    announce();
  });
  const unlisten = options.listen
    ? await listenForJobs(sql, queues, { ready: announce, due: (at) => dueWake.at(at) }, options)
    : null;

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
  /** A claim refused as on a read-only standby: the loop stops, and the role fails. */
  let standby: unknown = null;
  while (!stop.aborted) {
    options.onTurn?.();
    headScanSoon();
    if (buffer.wantsClaim(running.size) && !completer.full) {
      const limit = buffer.room(running.size);
      try {
        claiming = true;
        let claimed: ClaimResult;
        const starting = startingAtOnce();
        try {
          claimed = await loopClaim(limit, starting);
        } finally {
          claiming = false;
        }
        const { jobs, poisoned } = claimed;
        errorStreak = 0;
        admit(jobs);
        probes.claimed();
        if (aheadAfterClaim !== undefined) {
          probes.ahead(aheadAfterClaim);
          aheadAfterClaim = undefined;
        }
        // Full, or every slot that starts at once filled: a key under flow control is
        // claimed only into those (sql/functions/claim.sql), so there may be more to claim
        // as soon as a slot frees.
        lastClaimFull = jobs.length + poisoned.length === limit ||
          (starting > 0 && jobs.length + poisoned.length >= starting);
        if (lastClaimFull && !stop.aborted && buffer.wantsClaim(running.size)) continue;
      } catch (error) {
        probes.claimed();
        if (isReadOnlyStandby(error)) {
          standby = error;
          break;
        }
        errorStreak++;
        const wait = backoffWithJitter(errorStreak, 1000, CLAIM_BACKOFF_CAP_MS);
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
  // The pool reconnected to a standby (the URL's one host was demoted, or resolves to a
  // replica now): every claim would fail the same way. Running handlers were given their
  // grace above (their outcomes cannot be recorded there: they run again elsewhere after
  // their deadlines); the process ends with lib/db.ts standbyError's one line.
  if (standby !== null) throw standby;

  /**
   * Stop claiming; hand the buffer back at once; give running handlers the grace period,
   * then abort and release the rest; wait for every outcome and hand-back to be recorded.
   */
  async function shutdown(): Promise<void> {
    log.info("Consumer stopping: {count} jobs in flight, grace {grace}", {
      count: running.size,
      grace: formatDuration(options.shutdownGraceMs),
    });
    // A probe or a claim from the head in flight would add to the buffer after it was
    // handed back.
    await probes.settle();
    await headScanning;
    // Buffered jobs never started: hand them back now, not after the grace period.
    const unstarted = buffer.takeAll();
    if (unstarted.length > 0) handBackTracked(unstarted, "shutdown");
    if (running.size > 0) {
      let graceTimer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([
        idle(),
        new Promise((resolve) => (graceTimer = setTimeout(resolve, options.shutdownGraceMs))),
      ]);
      clearTimeout(graceTimer);
    }
    const left = [...running.values()].filter((run) => run.state === "running");
    for (const run of left) run.release();
    clearInterval(heartbeatTimer);
    dueWake.stop();
    if (left.length > 0) await handBackTracked(left.map((run) => run.job), "unfinished");
    // Failures and fan-outs already being recorded finish before the pool closes.
    await idle();
    timeouts.stop();
    await Promise.all(handingBack);
    // Checkpoint records of released runs still in flight are sent before the pool closes.
    await env.checkpoints!.drain();
    await completer.drain();
    await beating;
    await presence.stop();
    if (unlisten) {
      await unlisten().catch((error) =>
        log.warn("Cannot UNLISTEN: {error}", { error: describeError(error) })
      );
    }
    log.info("Consumer stopped");
  }
}
