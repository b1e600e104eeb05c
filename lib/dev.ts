/**
 * `shoal dev`: everything on one machine with no setup. Starts a local Postgres under
 * `.shoal/` (unless DATABASE_URL is set), migrates, runs the roles in this process,
 * enqueues a small demo and prints its progress; Ctrl-C stops it all. The database is
 * kept in `.shoal/pg` for the next run.
 *
 * @module
 */
import { type ConsumerOptions, runConsumer } from "./consumer.ts";
import { connect } from "./db.ts";
import { startLocalPg } from "./local_pg.ts";
import { logger } from "./log.ts";
import { loadMigrations, migrate } from "./migrate.ts";
import { enqueueMany, type JobSpec } from "./queue.ts";
import { queueStatus } from "./status.ts";
import type { TaskRegistry } from "./tasks.ts";

export interface DevOptions {
  tasks: TaskRegistry;
  databaseUrl?: string;
  dir: string;
  prepare: boolean;
  consumer: ConsumerOptions;
  print: (text: string) => void;
}

const DEMO_QUEUE = "demo";

/** The demo: quick jobs, slow jobs, a delayed job, and one that fails into the dead letters. */
function demoJobs(): JobSpec[] {
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

export async function runDev(options: DevOptions, stop: AbortSignal): Promise<void> {
  const log = logger("dev");
  const pg = options.databaseUrl ? null : await startLocalPg({ dir: `${options.dir}/pg` });
  const url = options.databaseUrl ?? pg!.url;
  if (pg) {
    log.info("Started a local Postgres in {dir}/pg on port {port}", {
      dir: options.dir,
      port: pg.port,
    });
  }
  const sql = connect(url, { applicationName: "shoal dev", prepare: options.prepare, max: 12 });
  try {
    await migrate(sql, await loadMigrations());
    const queues = [...new Set([...options.consumer.queues, DEMO_QUEUE])];
    const consumer = runConsumer(
      { sql, tasks: options.tasks },
      { ...options.consumer, queues, retryBaseMs: 500 },
      stop,
    );
    const enqueued = await enqueueMany(sql, demoJobs());
    options.print(
      `shoal dev: ${enqueued.length} demo jobs on queue "${DEMO_QUEUE}"; database ${
        pg ? `postgres://postgres@127.0.0.1:${pg.port}/postgres` : "from DATABASE_URL"
      }\nEnqueue more from another terminal:\n  DATABASE_URL=${
        pg ? `postgres://postgres@127.0.0.1:${pg.port}/postgres` : "..."
      } deno task shoal enqueue --queue ${DEMO_QUEUE} --task shoal.sleep --payload '{"ms":500}'\nPress Ctrl-C to stop.\n`,
    );
    let last = "";
    while (!stop.aborted) {
      const q = (await queueStatus(sql)).find((s) => s.queue === DEMO_QUEUE);
      const line = q
        ? `demo: ${q.ready} ready, ${q.scheduled} scheduled, ${q.running} running, ${q.dead} dead`
        : "demo: done";
      if (line !== last) options.print(line + "\n");
      last = line;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, 1000);
        stop.addEventListener("abort", () => {
          clearTimeout(timer);
          resolve();
        }, { once: true });
      });
    }
    await consumer;
  } finally {
    await sql.end({ timeout: 5 });
    if (pg) await pg.stop();
  }
}
