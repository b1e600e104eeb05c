/**
 * The dashboard's server time per page at size (issue 16: every page in 200 ms or less with
 * 10,000,000 jobs). Not part of `deno task bench`: run it alone,
 *
 *   deno run -A bench/dashboard_pages.ts [JOBS]        (JOBS defaults to 10,000,000)
 *
 * It loads W13's table (bench/counts.ts load(): JOBS jobs over four queues, some claimed,
 * some scheduled), 100,000 dead jobs, 10,000 executions and a running one with 1,000 jobs, 1,000
 * keyed jobs, then asks each page SAMPLES + 1 times (past the five runs after which Postgres may
 * plan a statement generically)
 * in process (createDashboard().fetch, no network) and prints the median of its Server-Timing
 * figure (the time from the request's arrival to its response, database reads included).
 *
 * @module
 */
import { createDashboard } from "../lib/dashboard/app.tsx";
import { loadMigrations, migrate } from "../lib/migrate.ts";
import { load } from "./counts.ts";
import { freshDb, median, say, startServer } from "./harness.ts";

const SAMPLES = 7;
const TARGET_MS = 200;

const total = Number(Deno.args[0] ?? 10_000_000);
if (!Number.isSafeInteger(total) || total < 2000) {
  throw new Error(`Invalid JOBS "${Deno.args[0]}": expected an integer of at least 2000`);
}
const server = await startServer({ profile: false });
try {
  const db = await freshDb(server, "dashboard pages");
  try {
    await migrate(db.sql, await loadMigrations());
    const loading = performance.now();
    await load(db.sql, total);
    await db.sql`
      insert into shoal.dead_jobs (id, queue, task, payload, priority, fairness_key, attempts,
        max_attempts, errors, reason, created_at, died_at)
      select 20000000000 + i, 'w13_email', 'w13_email.send', '{}', 0, '', 3, 3,
        '[{"attempt": 3, "at": "2026-01-01T00:00:00Z", "error": "boom"}]', 'attempts exhausted',
        now() - interval '1 hour', now() - interval '1 ms' * i
      from generate_series(1, 100000) i`;
    await db.sql`
      insert into shoal.executions (status, label)
      select 'completed', 'bench' from generate_series(1, 10000)`;
    // A running execution with 1,000 live jobs, and 1,000 keyed jobs, among the newest.
    const [execution] = await db.sql<{ id: string }[]>`
      insert into shoal.executions (status, label, started_at)
      values ('running', 'bench fan-out', now()) returning id`;
    await db.sql`
      insert into shoal.jobs (queue, task, execution_id)
      select 'w13_email', 'w13_email.send', ${execution!.id}::bigint
      from generate_series(1, 1000)`;
    await db.sql`
      insert into shoal.jobs (queue, task, key)
      select 'w13_hook', 'w13_hook.call', 'order-' || i from generate_series(1, 1000) i`;
    await db.sql.unsafe("vacuum (analyze) shoal.jobs, shoal.dead_jobs, shoal.executions");
    const loadedS = ((performance.now() - loading) / 1000).toFixed(0);
    const [job] = await db.sql<{ id: string }[]>`select max(id) as id from shoal.jobs`;
    const [dead] = await db.sql<{ id: string }[]>`select max(id) as id from shoal.dead_jobs`;
    const dashboard = createDashboard({ db: db.sql, readOnly: false, access: {} });
    const pages = [
      "/",
      "/overview/live",
      "/jobs",
      "/jobs?queue=w13_hook",
      "/jobs?queue=w13_rare",
      "/jobs?state=running",
      "/jobs?task=w13_report.render&state=scheduled",
      `/jobs/${job!.id}`,
      "/dead",
      "/dead?queue=w13_email",
      "/executions",
      "/executions?status=failed",
      `/executions/${execution!.id}`,
      `/jobs?execution=${execution!.id}`,
      "/jobs?key=order-500",
      "/jobs?queue=w13_hook&key=order-500",
      `/dead/purge?through=${dead!.id}`,
      `/dead/purge?queue=w13_email&task=w13_email.send&through=${dead!.id}`,
      "/schedules",
      "/queues",
      "/leases",
    ];
    say(`${total} jobs loaded in ${loadedS} s; median of ${SAMPLES} (ms, server time):`);
    let worst = 0;
    for (const path of pages) {
      const times: number[] = [];
      for (let i = 0; i < SAMPLES + 1; i++) {
        const response = await dashboard.fetch(new Request(`http://127.0.0.1${path}`));
        await response.text();
        if (response.status !== 200) throw new Error(`${path}: HTTP ${response.status}`);
        const ms = Number(
          /app;dur=([\d.]+)/.exec(response.headers.get("server-timing") ?? "")?.[1],
        );
        if (i > 0) times.push(ms); // the first warms the pool and the plan cache
      }
      const m = median(times);
      worst = Math.max(worst, m);
      say(`  ${path.padEnd(48)} ${m.toFixed(1)}`);
    }
    say(`slowest page ${worst.toFixed(1)} ms (target ${TARGET_MS} ms)`);
  } finally {
    await db.drop();
  }
} finally {
  await server.stop();
}
