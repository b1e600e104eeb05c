/**
 * Prometheus metrics of one shoal process, exposed by `--http` at `/metrics`
 * (lib/http_server.ts). Roles report through the small functions of {@link Metrics}
 * (`jobsClaimed`, `jobFinished`, `leaderStatus`, `scheduleFired`, ...); queue gauges are
 * read at scrape time by one query, and the flow-control gauges (paused queues, concurrency
 * limits and the slots they count, rate limits, held keys, fairness weights) by one more,
 * both cached for a second so scrapes cannot hammer Postgres.
 * Past a few thousand jobs that query estimates instead of counting (countJobs() in
 * lib/queue.ts; `shoal_queue_counts_exact` says which), unless `exactCounts` asks for a
 * scan per read (`--metrics-exact`).
 *
 * The exposition format comes from prom-client (runs under Deno through npm, with no
 * Node-only dependency on this path: default Node process metrics are not collected).
 * It is loaded only by a process that serves /metrics ({@link enableMetrics}): it holds
 * about 10 MB of memory, a sixth of an idle consumer. Without it the roles report to a
 * {@link ProcessMetrics} that does nothing.
 * Progress reports (`ctx.progress`) are summed up per queue at scrape time, in the same read:
 * how many running jobs report, their mean done/total, and the age of the stalest report.
 * Labels are bounded by what the operator configures (queues, tasks, leases, schedules,
 * limits and weights) and by the keys held at once, never by job ids or payloads.
 *
 * @module
 */
import type { Counter, Gauge, Histogram, Registry } from "prom-client";
import { type Db, replicaLag } from "./db.ts";
import { describeError, logger } from "./log.ts";
import { delay } from "./sleep.ts";
import {
  countJobs,
  PROGRESS_TOTALS_CAP,
  progressTotals,
  type QueueCounts,
  type QueueProgress,
} from "./queue.ts";
import { type FlowStatus, flowStatus } from "./flow.ts";

type PromClient = typeof import("prom-client");
let prom: PromClient | null = null;

/** Load prom-client; {@link Metrics} can be built once this resolved. */
export async function loadPromClient(): Promise<void> {
  prom ??= await import("prom-client");
}

/** How a job's attempt ended, as the consumer recorded it. */
export type JobOutcome =
  /** Acked (or its fan-out opened). */
  | "completed"
  /** Failed and rescheduled with a backoff. */
  | "retried"
  /** Failed for good: moved to the dead-letter table. */
  | "dead"
  /** Failed, but its claim had moved on (redelivered elsewhere): nothing recorded. */
  | "stale";

/** What a job metric is labelled by. */
export interface JobLabels {
  queue: string;
  task: string;
}

/** Seconds: from a fast handler to the default 15 minute task timeout and beyond. */
const DURATION_BUCKETS = [
  0.005,
  0.01,
  0.025,
  0.05,
  0.1,
  0.25,
  0.5,
  1,
  2.5,
  5,
  10,
  30,
  60,
  300,
  900,
  3600,
];
/** Seconds a schedule fired after its slot (the scheduler sleeps at most --interval). */
const LAG_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300];
/** A scrape reuses queue gauges read less than this long ago. */
export const QUEUE_CACHE_MS = 1000;
/**
 * A scrape waits this long for the queue read, then answers with the last values (the
 * read carries on and updates them): a slow or locked table must not time out the scrape.
 */
export const QUEUE_WAIT_MS = 2000;

/** The `key` label of a queue's default concurrency limit (a label cannot be null). */
export const EVERY_KEY_LABEL = "*";

/** The Prometheus text format's content type. */
export const CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8";

/** How a process's /metrics reads the queue gauges. */
export interface MetricsOptions {
  /**
   * Count every job on each read (a scan of shoal.jobs) instead of estimating a large
   * table (`--metrics-exact`). A read slower than QUEUE_WAIT_MS answers with the last values.
   */
  exactCounts?: boolean;
  /**
   * The gauges are read from `--read-database-url`: export its lag as
   * `shoal_read_replica_lag_seconds` (lib/db.ts replicaLag(); 0 when it names a primary).
   */
  readReplica?: boolean;
}

interface PerTask {
  claimed: { inc(n?: number): void };
  completed: { inc(n?: number): void };
  duration: { observe(seconds: number): void };
}

/** One registry and its metrics; the process-wide one is {@link metrics}. */
export class Metrics {
  readonly registry: Registry;
  readonly #claimed: Counter<"queue" | "task">;
  readonly #completed: Counter<"queue" | "task">;
  readonly #failed: Counter<"queue" | "task">;
  readonly #retried: Counter<"queue" | "task">;
  readonly #dead: Counter<"queue" | "task">;
  readonly #duration: Histogram<"queue" | "task">;
  readonly #depth: Gauge<"queue">;
  readonly #scheduled: Gauge<"queue">;
  readonly #running: Gauge<"queue">;
  readonly #prefetched: Gauge<"queue">;
  readonly #oldest: Gauge<"queue">;
  readonly #exact: Gauge<"queue">;
  readonly #exactCounts: boolean;
  readonly #paused: Gauge<"queue">;
  readonly #limit: Gauge<"queue" | "key" | "task">;
  readonly #slotsHeld: Gauge<"queue" | "key" | "task">;
  readonly #rateLimit: Gauge<"queue" | "key" | "task">;
  readonly #keyHeld: Gauge<"queue" | "key" | "task">;
  readonly #weight: Gauge<"queue" | "key">;
  readonly #progressJobs: Gauge<"queue">;
  readonly #progressRatio: Gauge<"queue">;
  readonly #progressAge: Gauge<"queue">;
  readonly #leader: Gauge<"lease">;
  readonly #fires: Counter<"schedule">;
  readonly #lag: Histogram<"schedule">;
  /** Only with a read replica: how far behind the primary the gauges' reads are. */
  readonly #replicaLag: Gauge<string> | null;
  #queuesReadAt = -Infinity;
  #queuesReading: Promise<void> | null = null;

  constructor(options: MetricsOptions = {}) {
    if (prom === null) throw new Error("Metrics needs loadPromClient() first");
    this.#exactCounts = options.exactCounts ?? false;
    const { Counter, Gauge, Histogram, Registry } = prom;
    this.registry = new Registry();
    const registers = [this.registry];
    this.#replicaLag = options.readReplica
      ? new Gauge({
        name: "shoal_read_replica_lag_seconds",
        help: "How far behind the primary the replica the gauges are read from is " +
          "(--read-database-url; 0 when caught up, or when it is a primary)",
        registers,
      })
      : null;
    const jobCounter = (name: string, help: string) =>
      new Counter({ name, help, labelNames: ["queue", "task"] as const, registers });
    const queueGauge = (name: string, help: string) =>
      new Gauge({ name, help, labelNames: ["queue"] as const, registers });
    this.#claimed = jobCounter("shoal_jobs_claimed_total", "Jobs claimed by this consumer");
    this.#completed = jobCounter("shoal_jobs_completed_total", "Jobs that finished and were acked");
    this.#failed = jobCounter(
      "shoal_jobs_failed_total",
      "Attempts that failed (then retried, dead-lettered, or stale when the claim had moved on)",
    );
    this.#retried = jobCounter(
      "shoal_jobs_retried_total",
      "Failed attempts rescheduled with a backoff",
    );
    this.#dead = jobCounter(
      "shoal_jobs_dead_lettered_total",
      "Jobs moved to the dead-letter table (failed for good, or poisoned: claimed too often)",
    );
    this.#duration = new Histogram({
      name: "shoal_job_duration_seconds",
      help: "Handler run time of finished attempts, whatever their outcome",
      labelNames: ["queue", "task"] as const,
      buckets: DURATION_BUCKETS,
      registers,
    });
    this.#depth = queueGauge("shoal_queue_depth", "Jobs ready to run now (read at scrape time)");
    this.#scheduled = queueGauge(
      "shoal_queue_scheduled",
      "Jobs waiting for a future run_at: delayed, or backing off before a retry",
    );
    this.#running = queueGauge(
      "shoal_queue_running",
      "Jobs claimed within their deadline whose handler started",
    );
    this.#prefetched = queueGauge(
      "shoal_queue_prefetched",
      "Jobs claimed within their deadline, waiting in a consumer's prefetch buffer",
    );
    this.#oldest = queueGauge(
      "shoal_queue_oldest_ready_age_seconds",
      "How long the oldest ready job has waited (0 when none)",
    );
    this.#exact = queueGauge(
      "shoal_queue_counts_exact",
      "1 when the queue's gauges are counts, 0 when estimates (a large table: " +
        "ready and scheduled sampled, running and prefetched as consumers reported)",
    );
    this.#paused = queueGauge(
      "shoal_queue_paused",
      "1 for a paused queue: its jobs are not claimed until it is resumed",
    );
    // `task`: the task whose jobs the limit counts apart, or a hold holds ("" for the queue's
    // jobs that no limit counts apart: THE TASK RULE in sql/functions/flow.sql).
    const limitGauge = (name: string, help: string) =>
      new Gauge({ name, help, labelNames: ["queue", "key", "task"] as const, registers });
    this.#limit = limitGauge(
      "shoal_concurrency_limit",
      `Most running jobs per fairness key (key "${EVERY_KEY_LABEL}": the queue's default for ` +
        'keys without a limit of their own; task: the task whose jobs it counts apart, "" none)',
    );
    this.#slotsHeld = limitGauge(
      "shoal_concurrency_slots_held",
      "Claimed jobs (prefetched ones included) counted against the limit of the same labels",
    );
    this.#rateLimit = limitGauge(
      "shoal_rate_limit",
      `Most claims per second per key on average (key "${EVERY_KEY_LABEL}": the queue's default ` +
        "for keys without a rate limit of their own; task: the task whose jobs it counts apart, " +
        '"" none)',
    );
    this.#keyHeld = limitGauge(
      "shoal_key_held",
      "1 while a key is held: none of its jobs on the queue (with a task, of that task's jobs) " +
        "is claimed until the hold ends",
    );
    this.#weight = new Gauge({
      name: "shoal_fairness_weight",
      help: "A fairness key's weight: jobs it starts per job of a weight-1 key under contention",
      labelNames: ["queue", "key"] as const,
      registers,
    });
    this.#progressJobs = queueGauge(
      "shoal_progress_jobs",
      "Claimed jobs whose handler reported progress (ctx.progress); at most " +
        `${PROGRESS_TOTALS_CAP} are read`,
    );
    this.#progressRatio = queueGauge(
      "shoal_progress_ratio",
      "Mean of done/total (each capped at 1) over the claimed jobs reporting a total above 0; " +
        "absent when none does",
    );
    this.#progressAge = queueGauge(
      "shoal_progress_stalest_age_seconds",
      "Seconds since the oldest last report of a claimed job was written: a handler that " +
        "stopped reporting while it still holds its job shows here",
    );
    this.#leader = new Gauge({
      name: "shoal_leader",
      help: "1 while this process holds the lease, else 0",
      labelNames: ["lease"] as const,
      registers,
    });
    this.#fires = new Counter({
      name: "shoal_schedule_fires_total",
      help: "Jobs this scheduler enqueued for a schedule",
      labelNames: ["schedule"] as const,
      registers,
    });
    this.#lag = new Histogram({
      name: "shoal_schedule_fire_lag_seconds",
      help: "How long after its slot a schedule fired",
      labelNames: ["schedule"] as const,
      buckets: LAG_BUCKETS,
      registers,
    });
  }

  /**
   * The labelled children of the hot per-job metrics, by queue and task: looking a child
   * up by its label object on every job cost a few microseconds a job at full speed.
   */
  #perTask = new Map<string, PerTask>();

  #children(job: JobLabels): PerTask {
    const key = `${job.queue}\u0000${job.task}`;
    let children = this.#perTask.get(key);
    if (!children) {
      const l = labels(job);
      children = {
        claimed: this.#claimed.labels(l),
        completed: this.#completed.labels(l),
        duration: this.#duration.labels(l),
      };
      this.#perTask.set(key, children);
    }
    return children;
  }

  /** The consumer claimed these jobs. */
  jobsClaimed(jobs: readonly JobLabels[]): void {
    let last: JobLabels | null = null;
    let run = 0;
    // A batch is mostly one task: count runs of equal labels, then add each run once.
    for (const job of jobs) {
      if (last && (job.queue !== last.queue || job.task !== last.task)) {
        this.#children(last).claimed.inc(run);
        run = 0;
      }
      last = job;
      run++;
    }
    if (last) this.#children(last).claimed.inc(run);
  }

  /** One attempt ended: `ms` is the handler's run time. */
  jobFinished(job: JobLabels, outcome: JobOutcome, ms: number): void {
    const children = this.#children(job);
    children.duration.observe(Math.max(0, ms) / 1000);
    if (outcome === "completed") {
      children.completed.inc();
      return;
    }
    const l = labels(job);
    this.#failed.inc(l);
    if (outcome === "retried") this.#retried.inc(l);
    else if (outcome === "dead") this.#dead.inc(l);
  }

  /** Jobs dead-lettered without running (poisoned: claimed too often without finishing). */
  jobsPoisoned(jobs: readonly JobLabels[]): void {
    for (const job of jobs) this.#dead.inc(labels(job));
  }

  /** Whether this process holds `lease` now. */
  leaderStatus(lease: string, leading: boolean): void {
    this.#leader.set({ lease }, leading ? 1 : 0);
  }

  /** The scheduler enqueued a schedule's job `lagMs` after its slot. */
  scheduleFired(schedule: string, lagMs: number): void {
    this.#fires.inc({ schedule });
    this.#lag.observe({ schedule }, Math.max(0, lagMs) / 1000);
  }

  /**
   * Read the queue, flow-control and progress gauges from the database (three statements, and the lag of a read replica), unless
   * they were read less than {@link QUEUE_CACHE_MS} ago; concurrent scrapes share one read. A
   * failed read keeps the last values of its gauges (the health check reports the database)
   * and is logged; the next scrape reads again.
   */
  async refreshQueues(db: Db, now: number = performance.now()): Promise<void> {
    if (now - this.#queuesReadAt < QUEUE_CACHE_MS) return;
    this.#queuesReading ??= (async () => {
      try {
        // One after the other: a scrape holds one connection of the role's pool at a time.
        // Live jobs only: the dead-letter table is not read.
        const counts = await settled(countJobs(db, { exact: this.#exactCounts }));
        const flow = await settled(flowStatus(db));
        const progress = await settled(progressTotals(db));
        const lag = this.#replicaLag ? await settled(replicaLag(db)) : null;
        if (counts.status === "fulfilled") this.#setQueueGauges(counts.value);
        else warnUnread("queue depths", counts.reason);
        if (flow.status === "fulfilled") this.#setFlowGauges(flow.value);
        else warnUnread("flow control", flow.reason);
        if (progress.status === "fulfilled") this.#setProgressGauges(progress.value);
        else warnUnread("progress", progress.reason);
        if (lag?.status === "fulfilled") {
          // Unknown (nothing replayed since the replica started): no sample, not a made-up 0.
          if (lag.value.lag_s === null) this.#replicaLag!.reset();
          else this.#replicaLag!.set(lag.value.lag_s);
        } else if (lag) warnUnread("the read replica's lag", lag.reason);
        if ([counts, flow, progress, lag ?? counts].every((r) => r.status === "fulfilled")) {
          this.#queuesReadAt = now;
        }
      } finally {
        this.#queuesReading = null;
      }
    })();
    await this.#queuesReading;
  }

  #setQueueGauges(rows: QueueCounts[]): void {
    const gauges = [
      this.#depth,
      this.#scheduled,
      this.#running,
      this.#prefetched,
      this.#oldest,
      this.#exact,
    ];
    for (const gauge of gauges) {
      gauge.reset(); // a queue that emptied out disappears instead of freezing
    }
    for (const r of rows) {
      this.#depth.set({ queue: r.queue }, r.ready);
      this.#scheduled.set({ queue: r.queue }, r.scheduled);
      this.#running.set({ queue: r.queue }, r.running);
      this.#prefetched.set({ queue: r.queue }, r.prefetched);
      this.#oldest.set({ queue: r.queue }, r.oldest_ready_age_s);
      this.#exact.set({ queue: r.queue }, r.exact ? 1 : 0);
    }
  }

  #setFlowGauges(flow: FlowStatus): void {
    // A resumed queue, a cleared limit or an ended hold disappears instead of freezing.
    for (const gauge of [this.#paused, this.#limit, this.#slotsHeld]) gauge.reset();
    for (const gauge of [this.#rateLimit, this.#keyHeld, this.#weight]) gauge.reset();
    for (const p of flow.paused) this.#paused.set({ queue: p.queue }, 1);
    for (const l of flow.limits) {
      const labels = { queue: l.queue, key: l.key ?? EVERY_KEY_LABEL, task: l.task ?? "" };
      this.#limit.set(labels, l.max_running);
      this.#slotsHeld.set(labels, l.slots_held);
    }
    for (const r of flow.rate_limits) {
      const labels = { queue: r.queue, key: r.key ?? EVERY_KEY_LABEL, task: r.task ?? "" };
      this.#rateLimit.set(labels, (r.max_starts * 1000) / r.period_ms);
    }
    for (const h of flow.holds) {
      this.#keyHeld.set({ queue: h.queue, key: h.key, task: h.task ?? "" }, 1);
    }
    for (const w of flow.weights) this.#weight.set({ queue: w.queue, key: w.key }, w.weight);
  }

  #setProgressGauges(rows: QueueProgress[]): void {
    // A queue whose reporting jobs ended disappears instead of freezing.
    for (const gauge of [this.#progressJobs, this.#progressRatio, this.#progressAge]) {
      gauge.reset();
    }
    for (const r of rows) {
      this.#progressJobs.set({ queue: r.queue }, r.jobs);
      if (r.ratio !== null) this.#progressRatio.set({ queue: r.queue }, r.ratio);
      this.#progressAge.set({ queue: r.queue }, r.stalest_s);
    }
  }

  /**
   * The exposition text. With `db`, queue gauges are refreshed first (see refreshQueues),
   * waiting at most {@link QUEUE_WAIT_MS}.
   */
  async render(db?: Db, waitMs: number = QUEUE_WAIT_MS): Promise<string> {
    if (db) {
      const gaveUp = new AbortController();
      await Promise.race([this.refreshQueues(db), delay(waitMs, gaveUp.signal)]);
      gaveUp.abort(); // clears the timer when the read won
    }
    return await this.registry.metrics();
  }
}

/** A read's outcome as a value: one failed read leaves the other's gauges updated. */
async function settled<T>(promise: Promise<T>): Promise<PromiseSettledResult<T>> {
  const [result] = await Promise.allSettled([promise]);
  return result!;
}

/** A failed read of gauges for /metrics: logged, the last values kept. */
function warnUnread(what: string, error: unknown): void {
  logger("metrics").warn(`Cannot read ${what} for /metrics: {error}`, {
    error: describeError(error),
  });
}

function labels(job: JobLabels): JobLabels {
  return { queue: job.queue, task: job.task };
}

/**
 * What the roles report to: forwards to a {@link Metrics} once {@link enableMetrics} ran
 * (a process serving /metrics), and does nothing otherwise.
 */
export class ProcessMetrics {
  #impl: Metrics | null = null;

  attach(impl: Metrics): void {
    this.#impl = impl;
  }

  /** Whether the metrics are real: without them, callers may skip measuring what they report. */
  get enabled(): boolean {
    return this.#impl !== null;
  }

  jobsClaimed(jobs: readonly JobLabels[]): void {
    this.#impl?.jobsClaimed(jobs);
  }

  jobFinished(job: JobLabels, outcome: JobOutcome, ms: number): void {
    this.#impl?.jobFinished(job, outcome, ms);
  }

  jobsPoisoned(jobs: readonly JobLabels[]): void {
    this.#impl?.jobsPoisoned(jobs);
  }

  leaderStatus(lease: string, leading: boolean): void {
    this.#impl?.leaderStatus(lease, leading);
  }

  scheduleFired(name: string, lagMs: number): void {
    this.#impl?.scheduleFired(name, lagMs);
  }

  /** The exposition text, or "" when metrics are not enabled. */
  render(db?: Db, waitMs?: number): Promise<string> {
    return this.#impl ? this.#impl.render(db, waitMs) : Promise.resolve("");
  }
}

/** The process-wide metrics every role reports to. */
export const metrics: ProcessMetrics = new ProcessMetrics();

/** Load prom-client and make the process-wide metrics real; returns the registry's owner. */
export async function enableMetrics(options: MetricsOptions = {}): Promise<Metrics> {
  await loadPromClient();
  const impl = new Metrics(options);
  metrics.attach(impl);
  return impl;
}
