/**
 * The workloads, each written once against the `System` interface so the same code
 * measures shoal, the hand-written floor and (issue 5) peer queues:
 *
 * - W1a enqueue one job per call, N calls in flight over one pool of N;
 * - W1b enqueue in bulk calls;
 * - W2  drain pre-enqueued no-op jobs with one real consumer process, from the moment
 *       it starts working to the moment its queue is empty;
 * - W3  start latency: jobs offered at a steady rate to an idle consumer process;
 *       latency = the handler's clock at its start minus the producer's clock just
 *       before it called enqueue (same machine, same wall clock);
 * - W4  fan-out: one workflow of N no-op children plus one no-op callback, started the
 *       way a user would before the consumer is up, drained by one real consumer process
 *       from the moment it starts working until the workflow is completed (systems with
 *       a `fanOut` driver only);
 * - W5..W15 live beside this file: fairness.ts (W5 noisy neighbour at three backlogs, and a
 *   higher-priority job behind a full prefetch buffer), memory.ts (W6 consumer RSS),
 *   scaling.ts (W7 1, 2, 4 and 8 consumer processes), soak.ts (W8 steady-rate soak, W9 the
 *   same with a transaction held open), idle.ts (W10 statements sent by an idle fleet),
 *   claim_size.ts (W11 claim time at 10k, 1M and 10M ready jobs), schedules.ts (W12 1,000
 *   per-second schedules and the scheduler's ceiling), counts.ts (W13 status and a /metrics
 *   scrape with 10,000,000 jobs), flow.ts (W14 a binding concurrency limit per key) and
 *   events.ts (W15 emit_event to the resumed handler's start, jobs each waiting on a key).
 *
 * Every run gets a fresh database with the system's schema installed from empty.
 *
 * @module
 */
import type { Sql } from "../lib/db.ts";
import {
  backendCpuSeconds,
  type BenchServer,
  countStarts,
  cpuSeconds,
  createStartsTable,
  epochMs,
  percentile,
  pollUntil,
  readStarts,
  sleep,
  withFreshDb,
} from "./harness.ts";
import { profileRead, profileReset, type StatementProfile } from "./profile.ts";
import type { BenchJob, ConsumerProcess, FanOutDriver, Producer, System } from "./systems.ts";

/** How much work each workload does. */
export interface Sizes {
  /** Jobs enqueued by W1a and W1b and drained by W2. */
  jobs: number;
  /** Jobs per call in W1b (and when W2 pre-enqueues). */
  bulkBatch: number;
  /** Jobs offered in W3. */
  latencyJobs: number;
  /** W3's offered rate, jobs per second. */
  latencyRate: number;
  /** Children of W4's one fan-out. */
  fanOutChildren: number;
  /** W5: ready jobs of fairness key A when key B arrives; one benchmark per size. */
  neighbourSizes: number[];
  /** W5: jobs key B enqueues (in one call). */
  newcomerJobs: number;
  /** W5's priority variant: ready jobs of key A when the higher-priority job arrives. */
  priorityBacklog: number;
  /** W11: ready jobs in the queue; one benchmark per size, the first and last compared. */
  claimSizes: number[];
  /** W11: claims timed per size, after `claimWarmup` untimed ones. */
  claimCount: number;
  claimWarmup: number;
  /** W11: jobs per claim. */
  claimBatch: number;
  /** W6: how long the idle consumer is sampled, ms. */
  idleRssMs: number;
  /** W7: jobs drained by 1, 2, 4 and 8 consumer processes. */
  scalingJobs: number;
  /** W10: how long the idle fleet is counted, ms. */
  idleFleetMs: number;
  /** W13: jobs in the table that status and /metrics count. */
  countsJobs: number;
  /** W15/steps: executions of 5 no-op steps each, drained by one consumer. */
  stepExecutions: number;
}

/** The soak workloads' timing (W8, W9). */
export interface SoakSizes {
  /** W8's length, ms (`--soak`). */
  soakMs: number;
  /** W8's sampling period, ms. */
  soakSampleMs: number;
  /** W9's phases, ms: before, while and after another session holds a snapshot open. */
  holdBeforeMs: number;
  holdMs: number;
  holdAfterMs: number;
  /** W9's sampling period, ms. */
  holdSampleMs: number;
  /** The steady producer's rate as a share of W2/shoal's rate in the same run. */
  rateShare: number;
  /** `--soak-rate`: a fixed producer rate (jobs/s) instead of the share of W2's. */
  fixedRate: number | null;
}

export interface BenchContext {
  server: BenchServer;
  sizes: Sizes;
  /** Collect pg_stat_statements per run (the server was started with it preloaded). */
  profile: boolean;
  soak: SoakSizes;
  /** The median so far in this bench run of a benchmark's metric; NaN when not measured. */
  figure(id: string, key: string): number;
  /**
   * A server with pg_stat_statements preloaded (W10): a second throwaway cluster started
   * on first use, so the other figures keep a server without it.
   */
  statementsServer(): Promise<BenchServer>;
}

export interface Metric {
  key: string;
  unit: string;
  better: "higher" | "lower";
}

export interface RunResult {
  values: Record<string, number>;
  /** Anything else worth keeping in the JSON (durations, counts, profiles). */
  details: Record<string, unknown>;
}

/** One measured thing: a workload applied to one system, or a floor. */
export interface Benchmark {
  /** Unique, stable id: `W2/shoal`, `W2/shoal/c100`, `W1a/pgbench` ... */
  id: string;
  workload:
    | "W1a"
    | "W1b"
    | "W2"
    | "W3"
    | "W4"
    | "W5"
    | "W6"
    | "W7"
    | "W8"
    | "W9"
    | "W10"
    | "W11"
    | "W12"
    | "W13"
    | "W14"
    | "W15";
  /** Which system (or floor) this measures. */
  system: string;
  /** What it measures, in a few words. */
  title: string;
  /** Every setting that matters to the figure. */
  settings: string;
  metrics: Metric[];
  /** Run once per bench run, whatever `--runs` says, unless `--runs` is given explicitly (soaks). */
  once?: boolean;
  /**
   * Runs per bench run when `--runs` is not given and the bench is not `--quick` (3 unless
   * set): W5's figures are medians of 5, as issue 14 asks.
   */
  runs?: number;
  run(ctx: BenchContext): Promise<RunResult>;
}

const RATE: Metric[] = [{ key: "rate", unit: "jobs/s", better: "higher" }];
/** W2 also states its time per job, the figure W4's time per child is set beside. */
const DRAIN: Metric[] = [...RATE, { key: "ms_per_job", unit: "ms/job", better: "lower" }];
const FAN_OUT: Metric[] = [
  { key: "ms_per_child", unit: "ms/child", better: "lower" },
  { key: "rate", unit: "children/s", better: "higher" },
];
const LATENCY: Metric[] = [
  { key: "p50", unit: "ms", better: "lower" },
  { key: "p95", unit: "ms", better: "lower" },
  { key: "p99", unit: "ms", better: "lower" },
];

/** Pre-enqueue `total` no-op jobs in calls of `batch` through one producer connection. */
export async function enqueueAll(
  system: System,
  url: string,
  total: number,
  batch: number,
): Promise<void> {
  const producer = await system.openProducer(url, { max: 1 });
  try {
    for (let done = 0; done < total; done += batch) {
      const jobs: BenchJob[] = Array.from(
        { length: Math.min(batch, total - done) },
        () => ({ kind: "noop" }),
      );
      await producer.enqueueBatch(jobs, { notify: false });
    }
  } finally {
    await producer.close();
  }
}

export async function checkCount(system: System, sql: Sql, expected: number): Promise<void> {
  const found = await system.count(sql);
  if (found !== expected) {
    throw new Error(`${system.name} holds ${found} jobs after enqueueing ${expected}`);
  }
}

/** W1a: one job per call, `inFlight` calls at a time over one pool of `inFlight`. */
export function enqueueOneByOne(
  system: System,
  options: { inFlight: number; notify: boolean },
): Benchmark {
  return {
    id: `W1a/${system.name}${options.notify ? "" : "/no-notify"}`,
    workload: "W1a",
    system: system.name,
    title: `enqueue 1 job per call, ${options.inFlight} in flight`,
    settings: `${options.inFlight} calls in flight over one pool of ${options.inFlight}, NOTIFY ${
      options.notify ? "on (default)" : "off"
    }`,
    metrics: RATE,
    run: (ctx) =>
      withFreshDb(ctx.server, "w1a", async (db) => {
        await system.install(db.sql, db.url);
        const producer = await system.openProducer(db.url, { max: options.inFlight });
        try {
          await producer.warm(options.inFlight);
          if (ctx.profile) await profileReset(db.sql);
          const total = ctx.sizes.jobs;
          let next = 0;
          const t0 = performance.now();
          await Promise.all(Array.from({ length: options.inFlight }, async () => {
            while (next < total) {
              next++;
              await producer.enqueueOne({ kind: "noop" }, { notify: options.notify });
            }
          }));
          const seconds = (performance.now() - t0) / 1000;
          const profile = ctx.profile ? await profileRead(db.sql, total) : undefined;
          await checkCount(system, db.sql, total);
          return { values: { rate: total / seconds }, details: { seconds, jobs: total, profile } };
        } finally {
          await producer.close();
        }
      }),
  };
}

/** W1b: `batch` jobs per call, one call at a time. */
export function enqueueBulk(system: System, options: { batch: number }): Benchmark {
  return {
    id: `W1b/${system.name}`,
    workload: "W1b",
    system: system.name,
    title: `enqueue in bulk, ${options.batch} jobs per call`,
    settings: `${options.batch} jobs per call, one call at a time, NOTIFY on (default)`,
    metrics: RATE,
    run: (ctx) =>
      withFreshDb(ctx.server, "w1b", async (db) => {
        await system.install(db.sql, db.url);
        const producer = await system.openProducer(db.url, { max: 1 });
        try {
          await producer.warm(1);
          if (ctx.profile) await profileReset(db.sql);
          const total = ctx.sizes.jobs;
          const t0 = performance.now();
          for (let done = 0; done < total; done += options.batch) {
            const jobs: BenchJob[] = Array.from(
              { length: Math.min(options.batch, total - done) },
              () => ({ kind: "noop" }),
            );
            await producer.enqueueBatch(jobs, { notify: true });
          }
          const seconds = (performance.now() - t0) / 1000;
          const profile = ctx.profile ? await profileRead(db.sql, total) : undefined;
          await checkCount(system, db.sql, total);
          return { values: { rate: total / seconds }, details: { seconds, jobs: total, profile } };
        } finally {
          await producer.close();
        }
      }),
  };
}

/**
 * W2: drain pre-enqueued no-op jobs with one consumer process. With `limit` (shoal only,
 * issue 15), a default concurrency limit of that many per key is set on the queue first: a
 * limit configured that never binds (bench/flow.ts).
 */
export function drain(
  system: System,
  options: { concurrency?: number; limit?: number } = {},
): Benchmark {
  const variant = (options.concurrency === undefined ? "" : `/c${options.concurrency}`) +
    (options.limit === undefined ? "" : "/limited");
  const limited = options.limit === undefined
    ? ""
    : `; shoal.set_concurrency_limit('default', ${options.limit}) (not binding)`;
  return {
    id: `W2/${system.name}${variant}`,
    workload: "W2",
    system: system.name,
    title:
      (options.concurrency === undefined
        ? "drain no-op jobs, 1 consumer process, default settings"
        : `drain no-op jobs, 1 consumer process, concurrency ${options.concurrency}`) +
      (options.limit === undefined ? "" : ", under a concurrency limit that never binds"),
    settings:
      (options.concurrency === undefined
        ? system.defaultSettings
        : `${system.defaultSettings}; but --concurrency ${options.concurrency}`) + limited,
    metrics: DRAIN,
    run: (ctx) =>
      withFreshDb(ctx.server, "w2", async (db) => {
        await system.install(db.sql, db.url);
        if (options.limit !== undefined) {
          await db.sql`select shoal.set_concurrency_limit('default', ${options.limit})`;
        }
        const total = ctx.sizes.jobs;
        await enqueueAll(system, db.url, total, ctx.sizes.bulkBatch);
        await checkCount(system, db.sql, total);
        if (ctx.profile) await profileReset(db.sql);
        const consumer = system.spawnConsumer(db.url, {
          concurrency: options.concurrency,
          stamp: false,
        });
        let profile: StatementProfile | undefined;
        let startedAt: number;
        let endedAt: number;
        let cpu: Record<string, number | null>;
        try {
          startedAt = await consumer.started;
          const consumerCpuAtStart = await cpuSeconds(consumer.pid);
          endedAt = await pollUntil(
            `${system.name} to drain ${total} jobs`,
            stallGuard(
              `${system.name} finished no job`,
              consumer,
              () => system.isEmpty(db.sql),
              () => system.count(db.sql),
            ),
            { everyMs: 10, timeoutMs: 600_000 },
          );
          // Where the time went: the consumer's CPU during the drain, and its server
          // backends' CPU since they connected (a few ms of that is start-up).
          const consumerCpuAtEnd = await cpuSeconds(consumer.pid);
          cpu = {
            consumer_cpu_s: consumerCpuAtStart === null || consumerCpuAtEnd === null
              ? null
              : consumerCpuAtEnd - consumerCpuAtStart,
            backends_cpu_s: await backendCpuSeconds(db.sql),
          };
          if (ctx.profile) profile = await profileRead(db.sql, total);
        } finally {
          await consumer.stop();
        }
        const seconds = (endedAt - startedAt) / 1000;
        return {
          values: { rate: total / seconds, ms_per_job: (seconds * 1000) / total },
          details: { seconds, jobs: total, ...cpu, profile },
        };
      }),
  };
}

/** A consumer that makes no progress for this long is stuck: fail the run instead of waiting. */
const STALL_MS = 30_000;

/**
 * Wrap a "done yet?" check so that it also reads a progress figure (jobs left, children
 * arrived) every few seconds and throws, with the consumer's output, when that figure has
 * not changed for STALL_MS.
 */
export function stallGuard(
  what: string,
  consumer: ConsumerProcess,
  isDone: () => Promise<boolean>,
  progress: () => Promise<number>,
): () => Promise<boolean> {
  let last = Number.NaN;
  let movedAt = performance.now();
  let checkedAt = performance.now();
  return async () => {
    if (await isDone()) return true;
    const now = performance.now();
    if (now - checkedAt >= 5_000) {
      checkedAt = now;
      const figure = await progress();
      if (figure !== last) {
        last = figure;
        movedAt = now;
      } else if (now - movedAt >= STALL_MS) {
        throw new Error(
          `${what} in ${STALL_MS / 1000} s (progress stuck at ${figure}); consumer output:\n${
            consumer.output().slice(-3000)
          }`,
        );
      }
    }
    return false;
  };
}

/** When a polled fan-out was first seen open (children enqueued) and then closed (callback enqueued). */
interface FanOutPhases {
  openedAt: number | null;
  closedAt: number | null;
}

/** Polls a fan-out: whether it completed, the phases seen, and a progress figure. */
interface FanOutWatch {
  /** True once completed; throws, with the consumer's output, once it cannot complete. */
  completed(): Promise<boolean>;
  /** Distinct states seen so far (open, each batch of arrivals, close, completion). */
  progress(): Promise<number>;
  phases: FanOutPhases;
}

function watchFanOut(
  system: string,
  driver: FanOutDriver,
  sql: Sql,
  handle: string,
  consumer: ConsumerProcess,
): FanOutWatch {
  const phases: FanOutPhases = { openedAt: null, closedAt: null };
  let lastState = "";
  let statesSeen = 0;
  return {
    phases,
    progress: () => Promise.resolve(statesSeen),
    async completed() {
      const state = await driver.state(sql, handle);
      if (state.failure !== null) {
        throw new Error(
          `${system} fan-out did not complete: ${state.failure}; consumer output:\n${
            consumer.output().slice(-3000)
          }`,
        );
      }
      if (state.open && phases.openedAt === null) phases.openedAt = epochMs();
      if (!state.open && phases.openedAt !== null && phases.closedAt === null) {
        phases.closedAt = epochMs();
      }
      const key = `${state.status}/${state.open}/${state.arrived}`;
      if (key !== lastState) {
        lastState = key;
        statesSeen++;
      }
      return state.completed;
    },
  };
}

/**
 * W4: one fan-out of `fanOutChildren` no-op children and a no-op callback, started before
 * the consumer is up (like W2's pre-enqueued jobs), drained by one consumer process with
 * default settings. Measured from the consumer's start of work until the workflow is
 * completed; then the run fails unless nothing is left behind.
 */
export function fanOutDrain(system: System): Benchmark {
  const driver = system.fanOut;
  if (!driver) throw new Error(`${system.name} has no fan-out: W4 cannot measure it`);
  return {
    id: `W4/${system.name}`,
    workload: "W4",
    system: system.name,
    title: "fan-out of no-op children plus one callback, 1 consumer process, default settings",
    settings: `${system.defaultSettings}; started with ${driver.how} before the consumer starts`,
    metrics: FAN_OUT,
    run: (ctx) =>
      withFreshDb(ctx.server, "w4", async (db) => {
        await system.install(db.sql, db.url);
        const children = ctx.sizes.fanOutChildren;
        const handle = await driver.start(db.sql, { children, queue: "default" });
        if (ctx.profile) await profileReset(db.sql);
        const consumer = system.spawnConsumer(db.url, { stamp: false });
        const watch = watchFanOut(system.name, driver, db.sql, handle, consumer);
        let profile: StatementProfile | undefined;
        let startedAt: number;
        let endedAt: number;
        let cpu: Record<string, number | null>;
        try {
          startedAt = await consumer.started;
          const consumerCpuAtStart = await cpuSeconds(consumer.pid);
          endedAt = await pollUntil(
            `${system.name} to complete a fan-out of ${children} children`,
            stallGuard(
              `${system.name} fan-out made no progress`,
              consumer,
              () => watch.completed(),
              () => watch.progress(),
            ),
            { everyMs: 10, timeoutMs: 600_000 },
          );
          const consumerCpuAtEnd = await cpuSeconds(consumer.pid);
          cpu = {
            consumer_cpu_s: consumerCpuAtStart === null || consumerCpuAtEnd === null
              ? null
              : consumerCpuAtEnd - consumerCpuAtStart,
            backends_cpu_s: await backendCpuSeconds(db.sql),
          };
          if (ctx.profile) profile = await profileRead(db.sql, children);
        } finally {
          await consumer.stop();
        }
        // Checked after the consumer has exited, so nothing it does late goes unseen.
        const left = await driver.leftovers(db.sql, handle);
        if (left.length > 0) {
          throw new Error(`${system.name} fan-out left rows behind: ${left.join("; ")}`);
        }
        const seconds = (endedAt - startedAt) / 1000;
        return {
          values: { ms_per_child: (seconds * 1000) / children, rate: children / seconds },
          details: {
            seconds,
            children,
            ...phaseDetails(startedAt, endedAt, watch.phases),
            ...cpu,
            profile,
          },
        };
      }),
  };
}

/**
 * The phases the 10 ms polls saw: until the fan-out was open (the chord job ran and its
 * children were enqueued), while it was open (children running), and from the callback's
 * enqueue to the workflow's completion. Missing when a phase fell between two polls.
 */
function phaseDetails(
  startedAt: number,
  endedAt: number,
  phases: FanOutPhases,
): Record<string, number> {
  if (phases.openedAt === null || phases.closedAt === null) return {};
  return {
    open_s: (phases.openedAt - startedAt) / 1000,
    children_s: (phases.closedAt - phases.openedAt) / 1000,
    callback_s: (endedAt - phases.closedAt) / 1000,
  };
}

/** W3: start latency of jobs offered one by one at a steady rate to an idle consumer. */
export function startLatency(system: System): Benchmark {
  return {
    id: `W3/${system.name}`,
    workload: "W3",
    system: system.name,
    title: "start latency at a steady offered rate",
    settings:
      `${system.defaultSettings}; producer: 1 job per call over a pool of 4, NOTIFY on, open loop`,
    metrics: LATENCY,
    run: (ctx) =>
      withFreshDb(ctx.server, "w3", async (db) => {
        await system.install(db.sql, db.url);
        await createStartsTable(db.sql);
        const consumer = system.spawnConsumer(db.url, { stamp: true });
        let producer: Producer | undefined;
        let details: Record<string, unknown>;
        let latencies: number[];
        try {
          producer = await system.openProducer(db.url, { max: 4 });
          await consumer.started;
          await producer.warm(4);
          await sleep(500); // let the consumer settle into its idle wait
          if (ctx.profile) await profileReset(db.sql);
          const { count, callMs, seconds } = await offer(producer, ctx.sizes);
          await pollUntil(
            `${count} recorded job starts`,
            async () => (await countStarts(db.sql)) >= count,
            { everyMs: 50, timeoutMs: 60_000 },
          );
          const rows = await readStarts(db.sql);
          latencies = rows.map((r) => r.started_at - r.enqueued_at);
          details = {
            jobs: count,
            offered_rate: count / seconds,
            enqueue_call_p50_ms: percentile(callMs, 50),
            enqueue_call_p99_ms: percentile(callMs, 99),
            duplicates: rows.length - new Set(rows.map((r) => r.job_id)).size,
            max_ms: Math.max(...latencies),
            min_ms: Math.min(...latencies),
            profile: ctx.profile ? await profileRead(db.sql, count) : undefined,
          };
        } finally {
          await producer?.close();
          await consumer.stop();
        }
        return {
          values: {
            p50: percentile(latencies, 50),
            p95: percentile(latencies, 95),
            p99: percentile(latencies, 99),
          },
          details,
        };
      }),
  };
}

/** Offer `latencyJobs` stamp jobs at `latencyRate`, open loop: a slow call never delays the next. */
async function offer(
  producer: Producer,
  sizes: Sizes,
): Promise<{ count: number; callMs: number[]; seconds: number }> {
  const count = sizes.latencyJobs;
  const interval = 1000 / sizes.latencyRate;
  const callMs: number[] = [];
  const calls: Promise<void>[] = [];
  const t0 = performance.now();
  for (let i = 0; i < count; i++) {
    const wait = t0 + i * interval - performance.now();
    if (wait > 0) await sleep(wait);
    const enqueuedAt = epochMs();
    calls.push(
      producer.enqueueOne({ kind: "stamp", enqueuedAt }, { notify: true })
        .then(() => {
          callMs.push(epochMs() - enqueuedAt);
        }),
    );
  }
  await Promise.all(calls);
  return { count, callMs, seconds: (performance.now() - t0) / 1000 };
}
