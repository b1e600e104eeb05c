/**
 * W6, consumer memory: the resident set (VmRSS from /proc/<pid>/status) of one consumer
 * process of a system, sampled while it sits idle on an empty queue and while it drains
 * W2's pre-enqueued no-op jobs (each phase in its own fresh database, its own process).
 * Figures: the peak and the median ("steady") of the samples taken in each phase; the
 * process's own high-water mark (VmHWM, boot included) goes into the details.
 *
 * @module
 */
import { median, memoryOf, pollUntil, sleep, withFreshDb } from "./harness.ts";
import type { ConsumerProcess, System } from "./systems.ts";
import {
  type BenchContext,
  type Benchmark,
  checkCount,
  enqueueAll,
  type Metric,
  stallGuard,
} from "./workloads.ts";

/** Sampling period while idle, and while draining (a drain lasts a second or two). */
const IDLE_SAMPLE_MS = 250;
const DRAIN_SAMPLE_MS = 20;

const METRICS: Metric[] = [
  { key: "idle_peak_mb", unit: "MB", better: "lower" },
  { key: "idle_steady_mb", unit: "MB", better: "lower" },
  { key: "w2_peak_mb", unit: "MB", better: "lower" },
  { key: "w2_steady_mb", unit: "MB", better: "lower" },
];

/** Samples a process's RSS every `everyMs` until stopped. */
class RssSampler {
  readonly samples: number[] = [];
  hwmMb = Number.NaN;
  #stopped = false;
  readonly #done: Promise<void>;

  constructor(readonly pid: number, everyMs: number) {
    this.#done = this.#loop(everyMs);
  }

  async #loop(everyMs: number): Promise<void> {
    while (!this.#stopped) {
      const memory = await memoryOf(this.pid);
      if (memory === null) return;
      this.samples.push(memory.rssMb);
      this.hwmMb = memory.hwmMb;
      await sleep(everyMs);
    }
  }

  async stop(): Promise<{ peak: number; steady: number; hwm: number; count: number }> {
    this.#stopped = true;
    await this.#done;
    if (this.samples.length === 0) throw new Error(`No RSS sample of process ${this.pid}`);
    return {
      peak: Math.max(...this.samples),
      steady: median(this.samples),
      hwm: this.hwmMb,
      count: this.samples.length,
    };
  }
}

async function idlePhase(system: System, ctx: BenchContext) {
  return await withFreshDb(ctx.server, "w6_idle", async (db) => {
    await system.install(db.sql, db.url);
    const consumer = system.spawnConsumer(db.url, { stamp: false });
    try {
      await consumer.started;
      const sampler = new RssSampler(consumer.pid, IDLE_SAMPLE_MS);
      await sleep(ctx.sizes.idleRssMs);
      return await sampler.stop();
    } finally {
      await consumer.stop();
    }
  });
}

async function drainPhase(system: System, ctx: BenchContext) {
  return await withFreshDb(ctx.server, "w6_w2", async (db) => {
    await system.install(db.sql, db.url);
    const total = ctx.sizes.jobs;
    await enqueueAll(system, db.url, total, ctx.sizes.bulkBatch);
    await checkCount(system, db.sql, total);
    const consumer: ConsumerProcess = system.spawnConsumer(db.url, { stamp: false });
    try {
      await consumer.started;
      const sampler = new RssSampler(consumer.pid, DRAIN_SAMPLE_MS);
      const t0 = performance.now();
      await pollUntil(
        `${system.name} to drain ${total} jobs`,
        stallGuard(
          `${system.name} finished no job`,
          consumer,
          () => system.isEmpty(db.sql),
          () => system.count(db.sql),
        ),
        { everyMs: 10, timeoutMs: 600_000 },
      );
      const seconds = (performance.now() - t0) / 1000;
      return { ...await sampler.stop(), seconds };
    } finally {
      await consumer.stop();
    }
  });
}

/** W6: one consumer process's RSS, idle and under W2. */
export function consumerMemory(system: System): Benchmark {
  return {
    id: `W6/${system.name}`,
    workload: "W6",
    system: system.name,
    title: "consumer RSS: idle, and while draining W2's jobs",
    settings: `${system.defaultSettings}; idle: empty queue, RSS every ${IDLE_SAMPLE_MS} ms ` +
      `from its started line on; under W2: RSS every ${DRAIN_SAMPLE_MS} ms during the drain`,
    metrics: METRICS,
    run: async (ctx) => {
      const idle = await idlePhase(system, ctx);
      const busy = await drainPhase(system, ctx);
      return {
        values: {
          idle_peak_mb: idle.peak,
          idle_steady_mb: idle.steady,
          w2_peak_mb: busy.peak,
          w2_steady_mb: busy.steady,
        },
        details: {
          idle_samples: idle.count,
          idle_hwm_mb: idle.hwm,
          w2_samples: busy.count,
          w2_hwm_mb: busy.hwm,
          w2_seconds: busy.seconds,
        },
      };
    },
  };
}
