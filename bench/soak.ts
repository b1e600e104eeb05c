/**
 * The soaks: one consumer process (default settings) under a steady producer for minutes,
 * sampled at a fixed period.
 *
 * - W8: the producer offers a share (70%) of W2's drain rate measured earlier in the same
 *   bench run (or `--soak-rate`), for `--soak`; every sample reads the jobs done since the
 *   last one and the jobs table's size (pg_total_relation_size, indexes and TOAST
 *   included) and live/dead tuples (pg_stat_user_tables). Targets: last-minute throughput
 *   within 10% of the first minute's, table size flat once steady.
 * - W9: the same rate, while another session holds a REPEATABLE READ transaction open
 *   with a snapshot (so the xmin horizon stops vacuum) for a minute, between a baseline
 *   and an after phase. Targets: throughput while it is held ≥ 80% of W8's, and the
 *   backlog back to the baseline's within 30 s of its end.
 *
 * "Done" is counted, at each sample, as the jobs the system removed from its table since
 * the soak began (`System.removed`, the server's statistics), or else as the jobs the
 * producer has committed minus those still in the system's queue (`System.count`, a scan).
 *
 * @module
 */
import { connect, type Sql } from "../lib/db.ts";
import { median, say, sleep, withFreshDb } from "./harness.ts";
import type { ConsumerProcess, Producer, System } from "./systems.ts";
import { type BenchContext, type Benchmark, drain, type Metric } from "./workloads.ts";

/** The producer's tick: it sends what is due every this many ms, in one call. */
const TICK_MS = 100;
/** Most jobs in one producer call (when it has fallen behind). */
const MAX_BATCH = 5_000;
/** How much bigger the late table may be than the early one and still count as flat. */
export const FLAT_GROWTH = 1.2;

/** The producer rate of a soak, and where it came from (stated in the report). */
interface SteadyRate {
  rate: number;
  source: string;
}

/** Calibrations done in this bench run, per system, when W2 was not measured. */
const calibrated = new Map<string, number>();

async function steadyRate(system: System, ctx: BenchContext): Promise<SteadyRate> {
  const share = ctx.soak.rateShare;
  if (ctx.soak.fixedRate !== null) {
    return { rate: ctx.soak.fixedRate, source: `--soak-rate ${ctx.soak.fixedRate}` };
  }
  const w2 = ctx.figure(`W2/${system.name}`, "rate");
  if (!Number.isNaN(w2)) {
    return {
      rate: share * w2,
      source: `${Math.round(share * 100)}% of W2/${system.name}'s median in this run (${
        Math.round(w2)
      } jobs/s)`,
    };
  }
  let measured = calibrated.get(system.name);
  if (measured === undefined) {
    say(`Calibrating the soak rate: one W2 drain of ${system.name}...`);
    const run = await drain(system).run(ctx);
    measured = run.values.rate!;
    calibrated.set(system.name, measured);
  }
  return {
    rate: share * measured,
    source: `${Math.round(share * 100)}% of one W2/${system.name} drain run for calibration ` +
      `(W2 not selected: ${Math.round(measured)} jobs/s)`,
  };
}

/** Sends `rate` jobs/s in calls every TICK_MS until stopped; counts what has committed. */
class SteadyProducer {
  committed = 0;
  #stopped = false;
  #done: Promise<void> = Promise.resolve();
  #startedAt = 0;

  constructor(readonly producer: Producer, readonly rate: number) {}

  start(): void {
    this.#startedAt = performance.now();
    this.#done = this.#loop();
  }

  async #loop(): Promise<void> {
    let sent = 0;
    while (!this.#stopped) {
      const due = Math.floor((this.rate * (performance.now() - this.#startedAt)) / 1000) - sent;
      if (due > 0) {
        const n = Math.min(due, MAX_BATCH);
        const jobs = Array.from({ length: n }, () => ({ kind: "noop" as const }));
        await this.producer.enqueueBatch(jobs, { notify: true });
        sent += n;
        this.committed = sent;
      }
      await sleep(TICK_MS);
    }
  }

  /** Stop; returns the rate actually offered. */
  async stop(): Promise<number> {
    this.#stopped = true;
    await this.#done;
    return this.committed / ((performance.now() - this.#startedAt) / 1000);
  }
}

/** One sample of a soak. */
export interface SoakSample {
  /** Seconds since the producer started. */
  t: number;
  /** Jobs done per second since the previous sample. */
  rate: number;
  /** Jobs committed but not done. */
  backlog: number;
  size_mb: number;
  live: number;
  dead: number;
  autovacuums: number;
}

interface TableStats {
  size_mb: number;
  live: number;
  dead: number;
  autovacuums: number;
}

async function tableStats(sql: Sql, table: string): Promise<TableStats> {
  const [row] = await sql<TableStats[]>`
    select pg_total_relation_size(${table}::regclass)::float8 / 1048576 as size_mb,
      coalesce(s.n_live_tup, 0)::float8 as live, coalesce(s.n_dead_tup, 0)::float8 as dead,
      coalesce(s.autovacuum_count, 0)::float8 as autovacuums
    from (select 1) x
    left join pg_stat_user_tables s on s.relid = ${table}::regclass`;
  return row!;
}

/** Samples done-rate, backlog and table statistics every `everyMs`. */
class SoakSampler {
  readonly samples: SoakSample[] = [];
  #stopped = false;
  #done: Promise<void> = Promise.resolve();

  constructor(
    readonly system: System,
    readonly sql: Sql,
    readonly producer: SteadyProducer,
    readonly everyMs: number,
  ) {}

  start(): void {
    this.#done = this.#loop();
  }

  async #loop(): Promise<void> {
    const t0 = performance.now();
    let lastDone = 0;
    let lastT = 0;
    let next = t0 + this.everyMs;
    const removed0 = this.system.removed ? await this.system.removed(this.sql) : 0;
    while (!this.#stopped) {
      const wait = next - performance.now();
      if (wait > 0) await sleep(Math.min(wait, 250));
      if (performance.now() < next) continue;
      next += this.everyMs;
      // Committed first: a job done is one the producer had committed (with count(), it is
      // in the snapshot of the count that follows).
      const committed = this.producer.committed;
      const done = this.system.removed
        ? await this.system.removed(this.sql) - removed0
        : committed - await this.system.count(this.sql);
      const backlog = committed - done;
      const stats = await tableStats(this.sql, this.system.jobsTable);
      const t = (performance.now() - t0) / 1000;
      this.samples.push({ t, rate: (done - lastDone) / (t - lastT), backlog, ...stats });
      lastDone = done;
      lastT = t;
    }
  }

  async stop(): Promise<SoakSample[]> {
    this.#stopped = true;
    await this.#done;
    return this.samples;
  }
}

/** Jobs done per second over the samples whose end lies in (from, to]. */
function rateBetween(samples: SoakSample[], from: number, to: number): number {
  let jobs = 0;
  let seconds = 0;
  let prevT = 0;
  for (const s of samples) {
    if (s.t > from && s.t <= to) {
      jobs += s.rate * (s.t - prevT);
      seconds += s.t - prevT;
    }
    prevT = s.t;
  }
  return seconds > 0 ? jobs / seconds : Number.NaN;
}

function maxSize(samples: SoakSample[], from: number, to: number): number {
  const sizes = samples.filter((s) => s.t > from && s.t <= to).map((s) => s.size_mb);
  return sizes.length === 0 ? Number.NaN : Math.max(...sizes);
}

/** Start one consumer and a steady producer, run `body`, and always stop both. */
async function underSteadyLoad<T>(
  system: System,
  url: string,
  rate: number,
  body: (producer: SteadyProducer, consumer: ConsumerProcess) => Promise<T>,
): Promise<{ result: T; offered: number }> {
  const producer = await system.openProducer(url, { max: 1 });
  const consumer = system.spawnConsumer(url, { stamp: false });
  let steady: SteadyProducer | undefined;
  try {
    await producer.warm(1);
    await consumer.started;
    steady = new SteadyProducer(producer, rate);
    steady.start();
    const result = await body(steady, consumer);
    const offered = await steady.stop();
    return { result, offered };
  } finally {
    await steady?.stop();
    await producer.close();
    await consumer.stop();
  }
}

const W8_METRICS: Metric[] = [
  { key: "rate", unit: "jobs/s", better: "higher" },
  { key: "last_vs_first", unit: "×", better: "higher" },
  { key: "size_growth", unit: "×", better: "lower" },
  { key: "end_size_mb", unit: "MB", better: "lower" },
];

/** The first and last "minute" of a soak: minutes when it lasts 4 or more, else quarters. */
function windows(seconds: number): { edge: number; label: string } {
  return seconds >= 240
    ? { edge: 60, label: "first and last minute" }
    : { edge: seconds / 4, label: "first and last quarter (soak shorter than 4 min)" };
}

/** W8: a steady producer at a share of W2's rate for `--soak`, sampled. */
export function soak(system: System): Benchmark {
  return {
    id: `W8/${system.name}`,
    workload: "W8",
    system: system.name,
    title: "soak: steady producer, 1 consumer process, sampled",
    settings: `${system.defaultSettings}; producer: one connection, enqueues what is due ` +
      `every ${TICK_MS} ms in one call (NOTIFY on), open loop`,
    metrics: W8_METRICS,
    once: true,
    run: async (ctx) => {
      const { rate, source } = await steadyRate(system, ctx);
      const seconds = ctx.soak.soakMs / 1000;
      return await withFreshDb(ctx.server, "w8", async (db) => {
        await system.install(db.sql, db.url);
        const { result: samples, offered } = await underSteadyLoad(
          system,
          db.url,
          rate,
          async (producer) => {
            const sampler = new SoakSampler(system, db.sql, producer, ctx.soak.soakSampleMs);
            sampler.start();
            await sleep(ctx.soak.soakMs);
            return await sampler.stop();
          },
        );
        const { edge, label } = windows(seconds);
        const end = samples.at(-1)?.t ?? seconds;
        const first = rateBetween(samples, 0, edge);
        const last = rateBetween(samples, end - edge, end);
        // "Steady" starts after the first quarter: compare the table late with it early.
        const early = maxSize(samples, end / 4, end / 2);
        const late = maxSize(samples, (3 * end) / 4, end);
        return {
          values: {
            rate: median(samples.map((s) => s.rate)),
            last_vs_first: last / first,
            size_growth: late / early,
            end_size_mb: samples.at(-1)?.size_mb ?? Number.NaN,
          },
          details: {
            soak_s: seconds,
            sample_s: ctx.soak.soakSampleMs / 1000,
            target_rate: rate,
            rate_source: source,
            offered_rate: offered,
            first_window_rate: first,
            last_window_rate: last,
            windows: label,
            early_max_size_mb: early,
            late_max_size_mb: late,
            max_backlog: Math.max(...samples.map((s) => s.backlog)),
            end_dead_tuples: samples.at(-1)?.dead ?? Number.NaN,
            samples,
          },
        };
      });
    },
  };
}

const W9_METRICS: Metric[] = [
  { key: "held_rate", unit: "jobs/s", better: "higher" },
  { key: "held_vs_w8", unit: "×", better: "higher" },
  { key: "recovery_s", unit: "s", better: "lower" },
];

/**
 * Hold a REPEATABLE READ transaction with a snapshot for `ms` on its own connection;
 * resolves once it has committed, with the xmin it held.
 */
async function holdSnapshot(url: string, sql: Sql, ms: number): Promise<string | null> {
  const holder = connect(url, { applicationName: "bench snapshot holder", max: 1 });
  try {
    return await holder.begin("isolation level repeatable read", async (tx) => {
      const [me] = await tx<{ pid: number }[]>`
        select pg_backend_pid() as pid from pg_catalog.pg_class limit 1`;
      const [held] = await sql<{ xmin: string | null }[]>`
        select backend_xmin::text as xmin from pg_stat_activity where pid = ${me!.pid}::integer`;
      await sleep(ms);
      return held?.xmin ?? null;
    });
  } finally {
    await holder.end({ timeout: 5 });
  }
}

/** W9: W8's rate, with another session holding a snapshot open for a while. */
export function heldSnapshot(system: System): Benchmark {
  return {
    id: `W9/${system.name}`,
    workload: "W9",
    system: system.name,
    title: "steady rate while another session holds a snapshot open",
    settings: `${system.defaultSettings}; producer as W8; the holder: begin isolation level ` +
      "repeatable read; select … from pg_catalog.pg_class; then idle in transaction; commit",
    metrics: W9_METRICS,
    once: true,
    run: async (ctx) => {
      const { rate, source } = await steadyRate(system, ctx);
      const { holdBeforeMs, holdMs, holdAfterMs, holdSampleMs } = ctx.soak;
      return await withFreshDb(ctx.server, "w9", async (db) => {
        await system.install(db.sql, db.url);
        const { result, offered } = await underSteadyLoad(
          system,
          db.url,
          rate,
          async (producer) => {
            const sampler = new SoakSampler(system, db.sql, producer, holdSampleMs);
            const t0 = performance.now();
            sampler.start();
            await sleep(holdBeforeMs);
            const holdFrom = (performance.now() - t0) / 1000;
            const xmin = await holdSnapshot(db.url, db.sql, holdMs);
            const holdTo = (performance.now() - t0) / 1000;
            await sleep(holdAfterMs);
            return { samples: await sampler.stop(), holdFrom, holdTo, xmin };
          },
        );
        const { samples, holdFrom, holdTo, xmin } = result;
        const baseline = samples.filter((s) => s.t <= holdFrom);
        const baselineRate = rateBetween(samples, 0, holdFrom);
        const heldRate = rateBetween(samples, holdFrom, holdTo);
        const w8 = ctx.figure(`W8/${system.name}`, "rate");
        const reference = Number.isNaN(w8) ? baselineRate : w8;
        // Caught up: the backlog is back to what the baseline saw (half a second of jobs at least).
        const caughtUp = Math.max(
          2 * Math.max(0, ...baseline.map((s) => s.backlog)),
          rate * 0.5,
        );
        const atEnd = samples.filter((s) => s.t <= holdTo).at(-1);
        const back = samples.find((s) => s.t > holdTo && s.backlog <= caughtUp);
        const recovered = atEnd !== undefined && atEnd.backlog <= caughtUp ? 0 : back?.t;
        return {
          values: {
            held_rate: heldRate,
            held_vs_w8: heldRate / reference,
            recovery_s: recovered === undefined ? Number.NaN : Math.max(0, recovered - holdTo),
          },
          details: {
            target_rate: rate,
            rate_source: source,
            offered_rate: offered,
            reference_rate: reference,
            reference: Number.isNaN(w8)
              ? "W9's own baseline phase (W8 not run)"
              : `W8/${system.name}'s median`,
            baseline_rate: baselineRate,
            after_rate: rateBetween(samples, holdTo, Number.POSITIVE_INFINITY),
            recovered: recovered !== undefined,
            caught_up_backlog: caughtUp,
            max_backlog: Math.max(...samples.map((s) => s.backlog)),
            held_xmin: xmin,
            hold_from_s: holdFrom,
            hold_to_s: holdTo,
            sample_s: holdSampleMs / 1000,
            samples,
          },
        };
      });
    },
  };
}
