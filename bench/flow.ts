/**
 * Flow control's figures (issue 15), shoal only (this tree: the peers sell limits or leave
 * them to the job):
 *
 * - W14 (`flowLimits`): 20 fairness keys under a default concurrency limit of 2 each, 500
 *   jobs per key (10,000 in all) of `bench.hold` (20 ms each), drained by 2 consumer
 *   processes of concurrency 40 (80 slots for 40 allowed: the limit binds, and across
 *   processes). Figures: throughput beside the ideal (20 keys × 2 slots ÷ 20 ms = 2,000
 *   jobs/s, every slot busy all the time) and the most jobs of one key ever running at once,
 *   from each handler's own start and finish (must be ≤ 2). The issue names this workload
 *   W12; the bench's W12 was already the scheduler's ceiling (issue 14), so it is W14.
 * - `W2/shoal/limited` (drain() in workloads.ts with `limit`): W2 with a default limit
 *   configured that never binds, beside W2/shoal in the same run (target ≥ 0.9×).
 * - `W10/shoal/limited` (idle.ts with `limited`): the idle fleet with 1,000 jobs waiting
 *   behind a limit of 0: a binding limit must not make consumers spin.
 *
 * @module
 */
import type { Sql } from "../lib/db.ts";
import { enqueueMany, type JobSpec } from "../lib/queue.ts";
import { pollUntil, withFreshDb } from "./harness.ts";
import type { ConsumerProcess, System } from "./systems.ts";
import type { Benchmark, Metric } from "./workloads.ts";

/** W14's shape. */
export const W14 = {
  keys: 20,
  jobsPerKey: 500,
  limit: 2,
  jobMs: 20,
  consumers: 2,
  concurrency: 40,
} as const;
/** W14's ideal rate: every allowed slot busy all the time. */
export const W14_IDEAL = (W14.keys * W14.limit * 1000) / W14.jobMs;
const QUEUE = "default";

const METRICS: Metric[] = [
  { key: "rate", unit: "jobs/s", better: "higher" },
  { key: "of_ideal", unit: "% of ideal", better: "higher" },
  { key: "max_overlap", unit: "jobs of one key", better: "lower" },
];

async function createSpansTable(sql: Sql): Promise<void> {
  await sql`create schema if not exists bench`;
  await sql`
    create unlogged table bench.spans (
      job_id text not null,
      flow_key text not null,
      started_at double precision not null,
      finished_at double precision not null
    )`;
}

/**
 * The most spans of one key open at once: each start +1, each finish -1 (a finish first at
 * the same instant: a slot handed on is not an overlap), summed in time order per key.
 */
async function maxOverlap(sql: Sql): Promise<number> {
  const [row] = await sql<{ most: number | null }[]>`
    select max(running)::integer as most from (
      select sum(step) over (partition by flow_key order by at, step
                             rows between unbounded preceding and current row) as running
      from (
        select flow_key, started_at as at, 1 as step from bench.spans
        union all
        select flow_key, finished_at, -1 from bench.spans
      ) e
    ) r`;
  return row!.most ?? 0;
}

/** W14: a binding concurrency limit per key, across two consumer processes. */
export function flowLimits(system: System): Benchmark {
  const total = W14.keys * W14.jobsPerKey;
  return {
    id: `W14/${system.name}`,
    workload: "W14",
    system: system.name,
    title:
      `${W14.keys} keys limited to ${W14.limit} running each, ${total.toLocaleString("en-US")} ` +
      `jobs of ${W14.jobMs} ms, ${W14.consumers} consumer processes`,
    settings: `${system.defaultSettings}; but --concurrency ${W14.concurrency} in each of ` +
      `${W14.consumers} processes; shoal.set_concurrency_limit('${QUEUE}', ${W14.limit}); ` +
      `${W14.jobsPerKey} jobs per key enqueued key by key before the consumers start; ideal ` +
      `${W14_IDEAL.toLocaleString("en-US")} jobs/s (keys × limit ÷ job time)`,
    metrics: METRICS,
    run: (ctx) =>
      withFreshDb(ctx.server, "w14", async (db) => {
        await system.install(db.sql, db.url);
        await createSpansTable(db.sql);
        await db.sql`select shoal.set_concurrency_limit(${QUEUE}, ${W14.limit})`;
        for (let k = 0; k < W14.keys; k++) {
          const jobs: JobSpec[] = Array.from({ length: W14.jobsPerKey }, () => ({
            task: "bench.hold",
            queue: QUEUE,
            payload: { ms: W14.jobMs },
            fairnessKey: `k${k}`,
          }));
          await enqueueMany(db.sql, jobs, { notify: false });
        }
        const consumers: ConsumerProcess[] = [];
        let startedAt: number;
        let endedAt: number;
        try {
          for (let i = 0; i < W14.consumers; i++) {
            consumers.push(
              system.spawnConsumer(db.url, { concurrency: W14.concurrency, stamp: true }),
            );
          }
          startedAt = Math.min(...await Promise.all(consumers.map((c) => c.started)));
          endedAt = await pollUntil(
            `${system.name} to run ${total} limited jobs`,
            async () => {
              const [row] = await db.sql<{ n: number }[]>`
                select count(*)::integer as n from bench.spans`;
              return row!.n >= total;
            },
            { everyMs: 20, timeoutMs: 300_000 },
          );
        } finally {
          await Promise.all(consumers.map((c) => c.stop()));
        }
        const [first] = await db.sql<{ first: number; last: number }[]>`
          select min(started_at) as first, max(finished_at) as last from bench.spans`;
        const seconds = (endedAt - startedAt) / 1000;
        const rate = total / seconds;
        return {
          values: {
            rate,
            of_ideal: (100 * rate) / W14_IDEAL,
            max_overlap: await maxOverlap(db.sql),
          },
          details: {
            seconds,
            jobs: total,
            // From the first handler's start to the last one's finish: the ideal's own span.
            handler_span_s: (first!.last - first!.first) / 1000,
          },
        };
      }),
  };
}
