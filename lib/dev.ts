/**
 * `shoal dev`: everything on one machine with no setup. Unless a database is configured
 * (`--database-url` or a non-empty DATABASE_URL), starts a local Postgres under
 * `<dir>/pg` (kept for the next run), migrates, runs every role in this process (consumer,
 * reaper, scheduler), enqueues a small demo (jobs, a fan-out workflow, a schedule every 5
 * seconds) and prints its progress. When `stop` aborts (Ctrl-C), the roles shut down
 * gracefully and the Postgres this started is stopped.
 *
 * @module
 */
import { type ConsumerOptions, defaultWorkerId } from "./consumer.ts";
import { getExecution, listExecutions, startExecution } from "./execution.ts";
import { DASHBOARD_POOL_MAX, type RoleHttp, type Roles, runRoles, startHttp } from "./roles.ts";
import { upsertSchedule } from "./schedule.ts";
import { delay } from "./sleep.ts";
import { closePool, connect, databaseNow, namingDatabase, redactUrl, type Sql } from "./db.ts";
import { countDeadSince } from "./dead.ts";
import { type LocalPg, localPgUrl, startLocalPg } from "./local_pg.ts";
import { describeError } from "./log.ts";
import { describeMigration, loadMigrations, migrate } from "./migrate.ts";
import { enqueueMany, type JobSpec } from "./queue.ts";
import { type QueueStatus, queueStatus } from "./status.ts";
import type { TaskRegistry } from "./tasks.ts";

export interface DevOptions {
  tasks: TaskRegistry;
  /** Use this database instead of starting one; empty or undefined starts one. */
  databaseUrl?: string;
  /** Where the local Postgres lives (`<dir>/pg`). */
  dir: string;
  prepare: boolean;
  consumer: ConsumerOptions;
  /** Where progress goes (stdout for the CLI). */
  print: (text: string) => void;
  /** Serve /healthz, /readyz, /metrics and the dashboard here on the dev pool (`shoal dev --http`). */
  http?: string;
  /** /metrics counts each queue with a scan instead of estimating (`--metrics-exact`). */
  metricsExact?: boolean;
  /** The dashboard at / refuses every action (`--read-only`). */
  readOnly?: boolean;
}

export const DEMO_QUEUE = "demo";
/** The demo schedule fires here, so the demo queue itself drains and says "done". */
export const DEMO_CRON_QUEUE = "demo-cron";
/** Leader timing for the single dev process: a quick hand-over, a snappy scheduler. */
const DEV_LEASE_MS = 10_000;
const DEV_INTERVAL_MS = 1000;
/** How often the progress line is refreshed. */
const PROGRESS_EVERY_MS = 500;

/** The demo: quick jobs, slow jobs, a delayed job, and one that fails into the dead letters. */
export function demoJobs(): JobSpec[] {
  const jobs: JobSpec[] = [];
  for (let i = 0; i < 20; i++) {
    jobs.push({ task: "shoal.sleep", queue: DEMO_QUEUE, payload: { ms: 200 + 100 * (i % 5) } });
  }
  for (let i = 0; i < 30; i++) jobs.push({ task: "shoal.noop", queue: DEMO_QUEUE, payload: { i } });
  jobs.push({
    task: "shoal.sleep",
    queue: DEMO_QUEUE,
    payload: { ms: 100 },
    runAt: new Date(Date.now() + 3000),
  });
  jobs.push({
    task: "shoal.fail",
    queue: DEMO_QUEUE,
    payload: { message: "the demo asked this job to fail" },
    maxAttempts: 2,
  });
  return jobs;
}

async function demoStatus(sql: Sql): Promise<QueueStatus> {
  const found = (await queueStatus(sql)).find((q) => q.queue === DEMO_QUEUE);
  return found ??
    {
      queue: DEMO_QUEUE,
      ready: 0,
      scheduled: 0,
      running: 0,
      prefetched: 0,
      dead: 0,
      oldest_ready_age_s: 0,
      exact: true,
    };
}

/** The demo workflow: ten children fanned out, one callback when all have arrived. */
function demoWorkflow() {
  return {
    task: "shoal.chord",
    queue: DEMO_QUEUE,
    payload: {
      children: Array.from({ length: 10 }, (_, i) => ({
        task: "shoal.sleep",
        payload: { ms: 300 + 50 * i },
      })),
      callback: { task: "shoal.noop", payload: { note: "all ten children arrived" } },
    },
  };
}

/** "workflow 7: running, 4/10 children arrived" */
async function workflowLine(sql: Sql, id: string): Promise<string> {
  const execution = await getExecution(sql, id);
  const summary = (await listExecutions(sql, { limit: 50 })).find((e) => e.id === id);
  const open = summary?.barriers[0];
  const progress = open ? `, ${open.arrived}/${open.total} children arrived` : "";
  return `workflow ${id}: ${execution?.status ?? "gone"}${progress}`;
}

/**
 * One progress line. `dead` counts the demo queue's jobs dead-lettered during this run (not
 * its dead-letter total, which holds earlier runs' too).
 */
function progressLine(q: QueueStatus, dead: number, url: string, workflow: string): string {
  if (q.ready + q.scheduled + q.running + q.prefetched === 0) {
    return `demo: done: nothing left to run, ${dead} dead-lettered, ${workflow} (list the dead: DATABASE_URL=${url} deno task shoal dead list --queue ${DEMO_QUEUE})`;
  }
  return `demo: ${q.ready} ready, ${q.scheduled} scheduled, ${q.running} running, ${q.prefetched} prefetched, ${dead} dead; ${workflow}`;
}

/** Every role, for the demo: the consumer also takes the demo queues and retries quickly. */
function devRoles(options: DevOptions): Roles {
  const leader = { holder: defaultWorkerId(), leaseMs: DEV_LEASE_MS, intervalMs: DEV_INTERVAL_MS };
  return {
    consumer: {
      tasks: options.tasks,
      options: {
        ...options.consumer,
        queues: [...new Set([...options.consumer.queues, DEMO_QUEUE, DEMO_CRON_QUEUE])],
        retryBaseMs: 500,
      },
    },
    reaper: { ...leader, deadRetentionMs: 14 * 86_400_000 },
    scheduler: { ...leader, listen: options.consumer.listen },
  };
}

/** Enqueue the demo, then print its progress until `stop` aborts. */
async function runDemo(sql: Sql, url: string, options: DevOptions, stop: AbortSignal) {
  // Earlier runs' dead jobs stay in the table: the line counts those that die from now on.
  const started = await databaseNow(sql);
  const enqueued = await enqueueMany(sql, demoJobs());
  const workflow = await startExecution(sql, demoWorkflow());
  await upsertSchedule(sql, {
    name: "demo-every-5s",
    cron: "*/5 * * * * *",
    task: "shoal.noop",
    queue: DEMO_CRON_QUEUE,
  });
  options.print(
    `Enqueued ${enqueued.length} demo jobs on queue "${DEMO_QUEUE}" (one fails on purpose), ` +
      `workflow ${workflow} (a fan-out of 10 children and a callback), ` +
      `and schedule demo-every-5s (shoal.noop on "${DEMO_CRON_QUEUE}").\n` +
      `Enqueue more from another terminal:\n` +
      `  DATABASE_URL=${url} deno task shoal enqueue --queue ${DEMO_QUEUE} --task shoal.sleep --payload '{"ms":500}'\n` +
      `Press Ctrl-C to stop.\n`,
  );
  let last = "";
  while (!stop.aborted) {
    const line = progressLine(
      await demoStatus(sql),
      await countDeadSince(sql, DEMO_QUEUE, started),
      url,
      await workflowLine(sql, workflow),
    );
    if (line !== last) options.print(line + "\n");
    last = line;
    await delay(PROGRESS_EVERY_MS, stop);
  }
}

/** Migrate, then run every role and the demo on `sql` until `stop` aborts. */
async function runAll(
  sql: Sql,
  url: string,
  options: DevOptions,
  stop: AbortSignal,
  http: RoleHttp | null,
) {
  options.print(`${describeMigration(await migrate(sql, await loadMigrations()))}\n`);
  if (stop.aborted) return; // Ctrl-C while migrating: start nothing
  // The roles get their own controller: one that fails stops the others (and the demo)
  // gracefully, while a Ctrl-C after that is still a first, graceful one.
  const halt = new AbortController();
  const onStop = () => halt.abort();
  stop.addEventListener("abort", onStop, { once: true });
  let demoFailed = false;
  try {
    await runRoles(sql, devRoles(options), {
      stop: halt,
      http,
      beside: (stopping) =>
        runDemo(sql, url, options, stopping).catch((error) => {
          demoFailed = true;
          throw error;
        }),
    });
  } catch (error) {
    if (demoFailed) throw error;
    throw new Error(`The dev roles stopped: ${describeError(error)}`, { cause: error });
  } finally {
    stop.removeEventListener("abort", onStop);
  }
}

/** The file that keeps the dev Postgres's port between runs, next to its data. */
function portFile(dir: string): string {
  return `${dir}/pg/port`;
}

/**
 * The port the dev Postgres in `dir` listened on last time, or null: none stored yet, or
 * not a port (`warn` says so; the next start writes a good one).
 */
export async function storedDevPort(
  dir: string,
  warn?: (text: string) => void,
): Promise<number | null> {
  let text: string;
  try {
    text = (await Deno.readTextFile(portFile(dir))).trim();
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return null;
    throw error;
  }
  const port = Number(text);
  if (/^\d+$/.test(text) && port >= 1024 && port <= 65535) return port;
  warn?.(`Ignoring ${portFile(dir)}: "${text.slice(0, 20)}" is not a port from 1024 to 65535\n`);
  return null;
}

/** How to start the dev Postgres, for messages (in a checkout, or with a compiled binary). */
const START_DEV = "`deno task dev` (`shoal dev`)";

/**
 * For a command given no database: where shoal dev's local one is (its URL, once a run
 * stored its port in `dir`), or how to get one.
 */
export async function localDatabaseHint(dir: string): Promise<string> {
  const port = await storedDevPort(dir);
  return port === null
    ? `or run ${START_DEV}, which starts a local one and prints its DATABASE_URL`
    : `the local one of ${START_DEV} is DATABASE_URL=${localPgUrl(port)} while it runs`;
}

/**
 * For a command that cannot reach `url`: when it is shoal dev's local database (the port
 * stored in `dir`, on 127.0.0.1), how to start it; undefined otherwise.
 */
export async function unreachableDevHint(url: string, dir: string): Promise<string | undefined> {
  const port = await storedDevPort(dir);
  if (port === null) return undefined;
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    return undefined; // checked at the boundary already: not a URL dev printed
  }
  const local = ["127.0.0.1", "localhost"].includes(parsed.hostname);
  return local && Number(parsed.port) === port
    ? `it is the local database of ${START_DEV}: start that first`
    : undefined;
}

/** When the database given to shoal dev fails it: how to use a local one instead. */
const LOCAL_INSTEAD =
  "to use a local database instead, leave DATABASE_URL empty and --database-url out (`DATABASE_URL= deno task dev`)";

/**
 * Start the dev Postgres on the port of its last run, so a DATABASE_URL printed then still
 * works; when another program holds that port, say so and keep the new one for next time.
 */
async function startDevPg(options: DevOptions): Promise<LocalPg> {
  const dir = `${options.dir}/pg`;
  const stored = await storedDevPort(options.dir, options.print);
  options.print(`Starting a local Postgres in ${dir} ...\n`);
  const pg = await startLocalPg({ dir, port: stored ?? undefined });
  if (pg.portTaken !== undefined) {
    options.print(
      `Port ${pg.portTaken} of the last run is taken by another program: Postgres listens on ${pg.port} now, and its DATABASE_URL changed\n`,
    );
  }
  await Deno.writeTextFile(portFile(options.dir), `${pg.port}\n`);
  options.print(
    `Postgres is up on 127.0.0.1:${pg.port} (binaries: ${pg.binDir}), the same port next run:\n` +
      `  DATABASE_URL=${pg.url}\n`,
  );
  return pg;
}

/** `shoal dev`: resolves once `stop` aborted and everything it started has stopped. */
export async function runDev(options: DevOptions, stop: AbortSignal): Promise<void> {
  const pg = options.databaseUrl ? null : await startDevPg(options);
  try {
    if (stop.aborted) return;
    const url = options.databaseUrl || pg!.url;
    if (!pg) options.print(`Using the database at ${redactUrl(url)}\n`);
    const sql = connect(url, { applicationName: "shoal dev", prepare: options.prepare, max: 12 });
    let http: RoleHttp | null = null;
    try {
      // Its database window (/readyz) follows the consumer's poll, as for `--role consumer`.
      http = await startHttp(sql, options.http, { consumer: devRoles(options).consumer }, {
        exactCounts: options.metricsExact,
        readOnly: options.readOnly,
        dashboardPool: () =>
          connect(url, {
            applicationName: "shoal dev dashboard",
            prepare: options.prepare,
            max: DASHBOARD_POOL_MAX,
          }),
      });
      await runAll(sql, pg ? url : redactUrl(url), options, stop, http);
    } catch (error) {
      // A failure of the database given to dev: name it, and offer the local one instead.
      throw namingDatabase(error, url, pg ? undefined : LOCAL_INSTEAD);
    } finally {
      await http?.close();
      await closePool(sql);
    }
  } finally {
    if (pg) {
      await pg.stop();
      options.print(`Stopped Postgres (its data stays in ${pg.dir} for next time)\n`);
    }
  }
}
