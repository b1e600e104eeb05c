/**
 * Events' figure (issue 17), shoal only (this tree's ctx.waitForEvent and emit_event):
 *
 * - W15 (`eventLatency`): N jobs of `bench.await` (bench/bench_main.ts), each waiting for the
 *   event `bench.go` with its own key, handed back by one consumer process; then one event
 *   per job, emitted one at a time at a steady pace through `emitEvent()` on the bench's
 *   pool. Latency = the resumed handler's clock at its start minus the emitter's clock just
 *   before it called emit_event (same machine, same wall clock), as W3 measures enqueue to
 *   start. N is a tenth of W3's jobs (200; 20 with --quick), at 40 events/s. Issue 17 names
 *   this figure W13; the bench's W13 (and W14) were taken, so it is W15.
 *
 * @module
 */
import { emitEvent } from "../lib/events.ts";
import { enqueueMany, type JobSpec } from "../lib/queue.ts";
import {
  countStarts,
  createStartsTable,
  epochMs,
  percentile,
  pollUntil,
  readStarts,
  sleep,
  withFreshDb,
} from "./harness.ts";
import type { System } from "./systems.ts";
import type { Benchmark, Metric } from "./workloads.ts";

/** W15's pace: events per second, one at a time. */
export const W15_RATE = 40;
const EVENT = "bench.go";

const METRICS: Metric[] = [
  { key: "p50", unit: "ms", better: "lower" },
  { key: "p99", unit: "ms", better: "lower" },
];

/** W15: from emit_event to the resumed handler's start, `waits` jobs each on its own key. */
export function eventLatency(system: System, waits: number): Benchmark {
  return {
    id: `W15/${system.name}/emit`,
    workload: "W15",
    system: system.name,
    title: "emit_event to the resumed handler's start",
    settings: `${system.defaultSettings}; ${waits} jobs waiting, each on its own key; ` +
      `1 event per key emitted one at a time at ${W15_RATE}/s through emitEvent() on a pool of 1`,
    metrics: METRICS,
    run: (ctx) =>
      withFreshDb(ctx.server, "w15", async (db) => {
        await system.install(db.sql, db.url);
        await createStartsTable(db.sql);
        const jobs: JobSpec[] = Array.from({ length: waits }, (_, i) => ({
          task: "bench.await",
          payload: { key: `k${i}` },
        }));
        await enqueueMany(db.sql, jobs);
        const consumer = system.spawnConsumer(db.url, { stamp: true });
        let latencies: number[];
        let details: Record<string, unknown>;
        try {
          await consumer.started;
          await pollUntil(
            `${waits} jobs waiting for their events`,
            async () => {
              const [row] = await db.sql<{ n: number }[]>`
                select count(*)::integer as n from shoal.job_steps s
                join shoal.jobs j on j.id = s.job_id
                where s.wait_state = 'waiting' and j.locked_by is null`;
              return row!.n >= waits;
            },
            { everyMs: 50, timeoutMs: 60_000 },
          );
          await sleep(500); // let the consumer settle into its idle wait
          const interval = 1000 / W15_RATE;
          const callMs: number[] = [];
          const t0 = performance.now();
          for (let i = 0; i < waits; i++) {
            const wait = t0 + i * interval - performance.now();
            if (wait > 0) await sleep(wait);
            const t = epochMs();
            const received = await emitEvent(db.sql, EVENT, `k${i}`, { t });
            callMs.push(epochMs() - t);
            if (received !== 1) throw new Error(`Event k${i} reached ${received} waits, not 1`);
          }
          await pollUntil(
            `${waits} resumed starts`,
            async () => (await countStarts(db.sql)) >= waits,
            { everyMs: 50, timeoutMs: 60_000 },
          );
          const rows = await readStarts(db.sql);
          latencies = rows.map((r) => r.started_at - r.enqueued_at);
          details = {
            waits,
            rate: W15_RATE,
            emit_call_p50_ms: percentile(callMs, 50),
            emit_call_p99_ms: percentile(callMs, 99),
            duplicates: rows.length - new Set(rows.map((r) => r.job_id)).size,
            max_ms: Math.max(...latencies),
            min_ms: Math.min(...latencies),
          };
        } finally {
          await consumer.stop();
        }
        return {
          values: { p50: percentile(latencies, 50), p99: percentile(latencies, 99) },
          details,
        };
      }),
  };
}
