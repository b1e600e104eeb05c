/**
 * W13, counting without scanning (issue 14, item 5): with 10,000,000 jobs in shoal.jobs, how
 * long `shoal status --json` takes to read and print its figures, and one /metrics scrape.
 *
 * - The table: one `insert … select` from generate_series, then `vacuum (analyze)` as
 *   autovacuum would do to a table of that size: queues w13_email (60%), w13_report (30%),
 *   w13_hook (10%) with three tasks each, 100 fairness keys, 1% at priority 5, 10% scheduled
 *   within a day, the first 400 claimed (200 started), the ready ones visible from ~3 hours
 *   ago (oldest first); and w13_rare with 1,000 jobs, few enough to be counted beside them.
 * - status: what `shoal status --json` does once connected (status() and its JSON) over a
 *   warm pool, SAMPLES times; the command as a process (Deno's start, connecting) once, in
 *   the details.
 * - scrape: GET /metrics of a `--role scheduler --http` process (its queue gauges are read at
 *   scrape time), SAMPLES times, each more than QUEUE_CACHE_MS after the last so that every
 *   one reads the database.
 * - the details keep the full count (`status --exact`, the scan every call made before) and
 *   how far each queue's estimated ready count was from it.
 *
 * Medians of SAMPLES within one run: loading the table takes minutes, so it runs once per
 * bench run unless --runs is given. The shoal system of this tree only (status() is this
 * tree's).
 *
 * @module
 */
import { freePort } from "../lib/local_pg.ts";
import { QUEUE_CACHE_MS } from "../lib/metrics.ts";
import { status } from "../lib/status.ts";
import type { Sql } from "../lib/db.ts";
import { Child, median, pollUntil, say, sleep, withFreshDb } from "./harness.ts";
import type { System } from "./systems.ts";
import type { Benchmark, Metric } from "./workloads.ts";

const MAIN = new URL("../main.ts", import.meta.url).pathname;
/** Measurements of each kind per run. */
const SAMPLES = 7;
/** Jobs of the small queue, read whole by its probe. */
const RARE_JOBS = 1_000;
/** The target for either figure, ms. */
export const COUNTS_TARGET_MS = 50;

const METRICS: Metric[] = [
  { key: "status_ms", unit: "ms", better: "lower" },
  { key: "scrape_ms", unit: "ms", better: "lower" },
];

/**
 * Fill shoal.jobs with `total` jobs in one statement (see the module's description); also the
 * table bench/dashboard_pages.ts renders the dashboard over.
 */
export async function load(sql: Sql, total: number): Promise<void> {
  const bulk = total - RARE_JOBS;
  await sql`
    insert into shoal.jobs (queue, task, payload, priority, fairness_key, fair_seq, run_at,
                            attempts, token, locked_by, locked_at, started_at, created_at)
    select q.queue, q.queue || '.' || (array['send', 'render', 'notify'])[1 + i % 3], '{}',
      case when i % 100 = 0 then 5 else 0 end, 'tenant-' || (i % 100), i,
      case when i <= 400 then now() + interval '30 min'
           when i % 10 = 1 then now() + interval '1 minute' * (i % 1440)
           else now() - interval '1 ms' * (${bulk}::bigint - i) end,
      case when i <= 400 then 1 else 0 end, case when i <= 400 then 1 else 0 end,
      case when i <= 400 then 'w13:' || (i % 4) end,
      case when i <= 400 then now() end,
      case when i <= 200 then now() end,
      now() - interval '1 ms' * (${bulk}::bigint - i)
    from generate_series(1, ${bulk}::bigint) i
    cross join lateral (
      select case when i % 10 < 6 then 'w13_email' when i % 10 < 9 then 'w13_report'
                  else 'w13_hook' end as queue
    ) q`;
  await sql`
    insert into shoal.jobs (queue, task, fair_seq, run_at)
    select 'w13_rare', 'w13_rare.sync', i, now() - interval '1 s' * (${RARE_JOBS}::integer - i)
    from generate_series(1, ${RARE_JOBS}::integer) i`;
  await sql.unsafe("vacuum (analyze) shoal.jobs");
}

/** Milliseconds `body` takes. */
async function timed(body: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await body();
  return performance.now() - t0;
}

/** W13 for shoal (this tree). */
export function countsAtScale(system: System, total: number): Benchmark {
  const spawn = system.spawnRole;
  const jobs = total.toLocaleString("en-US");
  return {
    id: `W13/${system.name}`,
    workload: "W13",
    system: system.name,
    title: `status --json and one /metrics scrape with ${jobs} jobs`,
    settings: `${jobs} jobs in 4 queues (one of ${RARE_JOBS}), vacuumed; median of ${SAMPLES}: ` +
      "status() and its JSON over a warm pool; GET /metrics of a --role scheduler --http " +
      `process, ${QUEUE_CACHE_MS} ms+ apart so each reads the database`,
    metrics: METRICS,
    once: true,
    run: async (ctx) => {
      if (!spawn) throw new Error(`${system.name} has no maintenance role to serve /metrics`);
      return await withFreshDb(ctx.server, "w13 counts", async (db) => {
        await system.install(db.sql, db.url);
        const loadS = (await timed(() => load(db.sql, total))) / 1000;
        say(`W13: ${jobs} jobs loaded and vacuumed in ${loadS.toFixed(0)} s`);

        const statusSamples: number[] = [];
        let estimated = await status(db.sql);
        for (let i = 0; i < SAMPLES; i++) {
          statusSamples.push(
            await timed(async () => {
              estimated = await status(db.sql);
              JSON.stringify(estimated);
            }),
          );
        }
        const port = freePort();
        const scheduler = spawn(db.url, "scheduler", ["--http", `127.0.0.1:${port}`]);
        const scrapeSamples: number[] = [];
        try {
          await scheduler.started;
          const url = `http://127.0.0.1:${port}/metrics`;
          await pollUntil("/metrics to answer", async () => (await fetch(url)).ok, {
            everyMs: 100,
            timeoutMs: 30_000,
          });
          for (let i = 0; i < SAMPLES; i++) {
            await sleep(QUEUE_CACHE_MS + 100);
            scrapeSamples.push(
              await timed(async () => {
                const response = await fetch(url);
                if (!response.ok) throw new Error(`GET /metrics answered ${response.status}`);
                await response.text();
              }),
            );
          }
        } finally {
          await scheduler.stop();
        }

        const errors: Record<string, number | null> = {};
        const exactMs = await timed(async () => {
          const counted = await status(db.sql, { exact: true });
          estimated.queues.forEach((q) => {
            const exact = counted.queues.find((c) => c.queue === q.queue);
            errors[q.queue] = exact && exact.ready > 0
              ? Math.round(1000 * 100 * (q.ready - exact.ready) / exact.ready) / 1000
              : null;
          });
        });
        const cliMs = await timed(async () => {
          const child = new Child("shoal status --json", ["run", "-A", MAIN, "status", "--json"], {
            DATABASE_URL: db.url,
          });
          const { code } = await child.exited();
          if (code !== 0) throw new Error(`shoal status exited ${code}: ${child.output()}`);
        });
        return {
          values: { status_ms: median(statusSamples), scrape_ms: median(scrapeSamples) },
          details: {
            jobs: total,
            load_s: loadS,
            status_samples_ms: statusSamples,
            scrape_samples_ms: scrapeSamples,
            exact_status_ms: exactMs,
            cli_status_ms: cliMs,
            estimated_queues: estimated.queues,
            ready_error_pct: errors,
          },
        };
      });
    },
  };
}
