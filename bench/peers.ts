/**
 * The peers measured beside shoal (issue 5, issue 14): graphile-worker, pg-boss and BullMQ
 * on its PostgreSQL backend, each as a `System`, at the exact versions
 * bench/peers/package.json pins, configured the way its documentation recommends for speed.
 * Every setting is in this file and goes into the report.
 *
 * graphile-worker and pg-boss need Node.js 22 (their `engines`), newer than this machine's:
 * bench/peers/package.json pins one from the npm registry (`node`), and
 * `ensurePeersInstalled()` runs `npm ci` there when node_modules is missing. Every peer's
 * workers (and schema installs) run on that Node.js, as their docs intend, from the scripts
 * beside it (graphile_worker.cjs, pg_boss.cjs, bullmq.cjs).
 *
 * Enqueueing happens in the bench process, like shoal's: graphile-worker through its SQL API
 * (`graphile_worker.add_job` / `add_jobs`) on the same postgres.js client as shoal; pg-boss
 * and BullMQ through their own clients (`send` / `insert`, `add` / `addBulk`), loaded into
 * Deno with `npm:` imports.
 *
 * @module
 */
import { createPostgresBackend, Queue } from "npm:bullmq@6.7.6";
import pg from "npm:pg@8.23.1";
import { PgBoss } from "npm:pg-boss@12.38.0";
import type { Sql } from "../lib/db.ts";
import { Child, say } from "./harness.ts";
import {
  type BenchJob,
  type ConsumerProcess,
  type Producer,
  type SqlEnqueue,
  sqlProducer,
  type System,
} from "./systems.ts";

const PEERS = new URL("peers/", import.meta.url);
const NODE = new URL("node_modules/.bin/node", PEERS).pathname;

/** The versions pinned in bench/peers/package.json (checked against what npm installed). */
export const PEER_VERSIONS: Record<string, string> = {
  "graphile-worker": "0.18.0",
  "pg-boss": "12.38.0",
  bullmq: "6.7.6",
  /** node-postgres, BullMQ's PostgreSQL driver (its optional peer dependency). */
  pg: "8.23.1",
  node: "22.23.3",
};

async function installedVersion(name: string): Promise<string | null> {
  try {
    const text = await Deno.readTextFile(new URL(`node_modules/${name}/package.json`, PEERS));
    return String((JSON.parse(text) as { version?: unknown }).version);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return null;
    throw error;
  }
}

async function installedMismatches(): Promise<string[]> {
  const wrong: string[] = [];
  for (const [name, version] of Object.entries(PEER_VERSIONS)) {
    const found = await installedVersion(name);
    if (found !== version) wrong.push(`${name} ${found ?? "missing"} (want ${version})`);
  }
  try {
    await Deno.stat(NODE);
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
    wrong.push(`${NODE} missing`);
  }
  return wrong;
}

/** Install bench/peers/node_modules from its lockfile (`npm ci`) unless it is already there. */
export async function ensurePeersInstalled(): Promise<void> {
  const wrong = await installedMismatches();
  if (wrong.length === 0) return;
  say(`Installing the peers with npm ci in bench/peers (${wrong.join(", ")})...`);
  const out = await new Deno.Command("npm", {
    args: ["ci", "--no-audit", "--no-fund"],
    cwd: PEERS,
    stdout: "piped",
    stderr: "piped",
  }).output().catch((error: unknown) => {
    throw new Error("Cannot run npm to install the peers in bench/peers", { cause: error });
  });
  if (!out.success) {
    const text = new TextDecoder().decode(out.stderr).slice(-2000);
    throw new Error(`npm ci in bench/peers failed with code ${out.code}: ${text}`);
  }
  const still = await installedMismatches();
  if (still.length > 0) {
    throw new Error(`npm ci in bench/peers left the wrong packages: ${still.join(", ")}`);
  }
}

/** Run one of the peer scripts to completion on the pinned Node.js; throw with its output. */
async function runNode(label: string, args: string[], url: string): Promise<void> {
  const child = new Child(label, args, { DATABASE_URL: url }, NODE);
  const status = await child.exited();
  if (status.code !== 0) {
    throw new Error(`${label} exited with code ${status.code}: ${child.output().slice(-2000)}`);
  }
}

/** A worker process on the pinned Node.js that prints `{"event":"started","at":…}` when ready. */
function spawnNodeWorker(
  label: string,
  args: string[],
  env: Record<string, string>,
): ConsumerProcess {
  const child = new Child(label, args, env, NODE);
  const started = child.waitForLine(
    "its started line",
    (line) => line.startsWith('{"event":"started"'),
    60_000,
  ).then((line) => (JSON.parse(line) as { at: number }).at);
  started.catch(() => {}); // the workload awaits it; a failure is reported there
  return {
    pid: child.process.pid,
    started,
    async stop() {
      const status = await child.stop();
      if (status.code !== 0) {
        throw new Error(
          `${label} exited with code ${status.code}; its output:\n${child.output().slice(-3000)}`,
        );
      }
    },
    output: () => child.output(),
  };
}

function script(name: string): string {
  return new URL(name, PEERS).pathname;
}

/** A benchmark job as a task name and a payload (the same for every peer). */
function peerJob(job: BenchJob): { task: string; payload: Record<string, unknown> } {
  return job.kind === "noop"
    ? { task: "noop", payload: {} }
    : { task: "stamp", payload: { t: job.enqueuedAt } };
}

// ---------------------------------------------------------------------------------------------
// graphile-worker

/**
 * `preset.worker` as graphile-worker's performance page sets it for its own benchmark:
 * https://worker.graphile.org/docs/performance (concurrency 24, pool 25, local queue 500,
 * batched completion and failure). LISTEN/NOTIFY is always on in graphile-worker; the poll
 * interval and prepared statements are its defaults, stated here so the report shows them.
 */
export const GRAPHILE_WORKER_PRESET = {
  concurrentJobs: 24,
  maxPoolSize: 25,
  localQueue: { size: 500 },
  completeJobBatchDelay: 0,
  failJobBatchDelay: 0,
  pollInterval: 2000,
  preparedStatements: true,
};

/** graphile-worker's SQL API: the documented `add_job` and `add_jobs` functions. */
const graphileEnqueue: SqlEnqueue = {
  async enqueueOne(sql, job) {
    const { task, payload } = peerJob(job);
    // Sent as text and cast: postgres.js would JSON-encode a string parameter typed json again.
    await sql`
      select id from graphile_worker.add_job(${task}::text, ${
      JSON.stringify(payload)
    }::text::json)`;
  },
  async enqueueBatch(sql, jobs) {
    const specs = jobs.map((job) => {
      const { task, payload } = peerJob(job);
      return { identifier: task, payload };
    });
    // json_populate_recordset fills the job_spec columns it is given and leaves the rest null,
    // as graphile-worker's own addJobs() does.
    await sql`
      select count(*) from graphile_worker.add_jobs(array(
        select s from json_populate_recordset(
          null::graphile_worker.job_spec, ${JSON.stringify(specs)}::text::json) s))`;
  },
};

export const graphileWorker: System = {
  name: "graphile-worker",
  defaultSettings: `graphile-worker ${
    PEER_VERSIONS["graphile-worker"]
  } on Node.js ${PEER_VERSIONS.node}, 1 worker process (run() with a taskList: noop, stamp): concurrentJobs ${GRAPHILE_WORKER_PRESET.concurrentJobs}, maxPoolSize ${GRAPHILE_WORKER_PRESET.maxPoolSize}, localQueue.size ${GRAPHILE_WORKER_PRESET.localQueue.size} (ttl 5 min, no refetchDelay: defaults), completeJobBatchDelay ${GRAPHILE_WORKER_PRESET.completeJobBatchDelay} ms, failJobBatchDelay ${GRAPHILE_WORKER_PRESET.failJobBatchDelay} ms, LISTEN/NOTIFY on (always), pollInterval ${GRAPHILE_WORKER_PRESET.pollInterval} ms, prepared statements on, NO_LOG_SUCCESS=1 (no log line per job)`,
  async install(_sql, url) {
    await runNode("graphile-worker migrate", [script("graphile_worker.cjs"), "migrate"], url);
  },
  openProducer: (url, options) => Promise.resolve(sqlProducer(url, options, graphileEnqueue)),
  jobsTable: "graphile_worker._private_jobs",
  spawnConsumer(url) {
    return spawnNodeWorker(
      "graphile-worker worker",
      [script("graphile_worker.cjs"), "work", JSON.stringify(GRAPHILE_WORKER_PRESET)],
      { DATABASE_URL: url, NO_LOG_SUCCESS: "1" },
    );
  },
  async isEmpty(sql: Sql) {
    const [row] = await sql<{ empty: boolean }[]>`
      select not exists (select 1 from graphile_worker._private_jobs order by id limit 1) as empty`;
    return row!.empty;
  },
  async count(sql: Sql) {
    const [row] = await sql<{ n: number }[]>`
      select count(*)::integer as n from graphile_worker._private_jobs`;
    return row!.n;
  },
};

// ---------------------------------------------------------------------------------------------
// pg-boss

const PG_BOSS_QUEUE = "bench";

/**
 * pg-boss's settings: LISTEN/NOTIFY on (`useListenNotify` on the instance, `notify` on the
 * queue: both off by default), batch fetch of 100 per `work()` call with `burstWhenBatchFull`
 * (fetch again at once while batches come back full), polling intervals at their defaults.
 */
export const PG_BOSS_CONFIG = {
  queue: PG_BOSS_QUEUE,
  queueOptions: { notify: true },
  constructor: { useListenNotify: true, max: 10 },
  work: {
    batchSize: 100,
    burstWhenBatchFull: true,
    localConcurrency: 1,
    pollingIntervalSeconds: 2,
    notifyPollingIntervalSeconds: 30,
  },
};

function pgBossData(job: BenchJob): Record<string, unknown> {
  return job.kind === "noop" ? {} : { t: job.enqueuedAt };
}

/** pg-boss's own client in this process: `send` one job per call, `insert` a batch. */
async function pgBossProducer(url: string, max: number): Promise<Producer> {
  const boss = new PgBoss({
    connectionString: url,
    max,
    application_name: "bench producer",
    // A producer only: no maintenance, no cron, no migration (the install did it).
    supervise: false,
    schedule: false,
    migrate: false,
  });
  // pg-boss emits errors it cannot throw to a caller (background work); a producer has
  // none, but an EventEmitter without an error listener would crash the bench.
  boss.on("error", (error: Error) => say(`pg-boss producer error: ${error.message}`));
  await boss.start();
  const db = boss.getDb();
  return {
    async enqueueOne(job) {
      await boss.send(PG_BOSS_QUEUE, pgBossData(job));
    },
    async enqueueBatch(jobs) {
      await boss.insert(PG_BOSS_QUEUE, jobs.map((job) => ({ data: pgBossData(job) })));
    },
    async warm(count) {
      await Promise.all(
        Array.from({ length: count }, () => db.executeSql("select pg_sleep(0.05)", [])),
      );
    },
    async close() {
      await boss.stop({ graceful: false, close: true });
    },
  };
}

export const pgBoss: System = {
  name: "pg-boss",
  defaultSettings: `pg-boss ${
    PEER_VERSIONS["pg-boss"]
  } on Node.js ${PEER_VERSIONS.node}, 1 worker process (one boss.work() on queue "${PG_BOSS_QUEUE}", a batch handler): useListenNotify true, queue created with notify true (LISTEN/NOTIFY on), pool max ${PG_BOSS_CONFIG.constructor.max}, batchSize ${PG_BOSS_CONFIG.work.batchSize}, burstWhenBatchFull true, localConcurrency ${PG_BOSS_CONFIG.work.localConcurrency}, pollingIntervalSeconds ${PG_BOSS_CONFIG.work.pollingIntervalSeconds}, notifyPollingIntervalSeconds ${PG_BOSS_CONFIG.work.notifyPollingIntervalSeconds}, standard queue policy, supervise/schedule on (defaults); producer: pg-boss in the bench process (Deno, npm:pg-boss), supervise/schedule/migrate off`,
  async install(_sql, url) {
    await runNode(
      "pg-boss install",
      [script("pg_boss.cjs"), "install", JSON.stringify(PG_BOSS_CONFIG)],
      url,
    );
  },
  openProducer: (url, options) => pgBossProducer(url, options.max),
  // The root of its job tables (a partitioned parent in some installs: W8/W9 do not run pg-boss).
  jobsTable: "pgboss.job",
  spawnConsumer(url) {
    return spawnNodeWorker(
      "pg-boss worker",
      [script("pg_boss.cjs"), "work", JSON.stringify(PG_BOSS_CONFIG)],
      { DATABASE_URL: url },
    );
  },
  async isEmpty(sql: Sql) {
    // Completed jobs stay in the table (kept for `deletion_seconds`): only these are left to do.
    const [row] = await sql<{ empty: boolean }[]>`
      select not exists (
        select 1 from pgboss.job
        where name = ${PG_BOSS_QUEUE}::text and state in ('created', 'retry', 'active')
      ) as empty`;
    return row!.empty;
  },
  async count(sql: Sql) {
    const [row] = await sql<{ n: number }[]>`
      select count(*)::integer as n from pgboss.job
      where name = ${PG_BOSS_QUEUE}::text and state in ('created', 'retry', 'active')`;
    return row!.n;
  },
};

// ---------------------------------------------------------------------------------------------
// BullMQ on its PostgreSQL backend

const BULLMQ_QUEUE = "bench";

/**
 * BullMQ 6's settings, from its PostgreSQL guide (https://docs.bullmq.io/guide/postgresql):
 * the backend bound with `createPostgresBackend` as the constructors' last argument, the
 * schema installed by an explicit `runMigrations()` (connections do not migrate), the
 * default schema `bullmq`, a pool BullMQ builds itself from a connection config (plus its
 * own LISTEN connection, outside the pool) sized to the worker's concurrency ("give each
 * backend enough pool connections (max) for its concurrency"), and `removeOnComplete` so
 * finished jobs do not pile up ("let retention do its work").
 *
 * BullMQ has no batch option (batches are BullMQ Pro's): each of the `concurrency` slots
 * claims one job per statement, the completion fused with the next claim. Its default
 * concurrency is 1; 24 is graphile-worker's (the other peer that runs jobs in parallel
 * slots), inside the 8–32 the guide's own processing figures use; the pool has one more
 * connection than slots, for the lock renewals and stalled checks beside them. Everything
 * else is BullMQ's default: drainDelay 5 s (how long an idle worker blocks on LISTEN
 * before it looks again), lockDuration 30 s, stalledInterval 30 s, no metrics, no limiter.
 */
export const BULLMQ_CONFIG = {
  queue: BULLMQ_QUEUE,
  connection: { max: 25 },
  worker: { concurrency: 24, removeOnComplete: true },
};

function bullmqData(job: BenchJob): Record<string, unknown> {
  return job.kind === "noop" ? {} : { t: job.enqueuedAt };
}

/**
 * BullMQ's own client in this process: `Queue.add` one job per call, `addBulk` a batch.
 * Deno loads bullmq's CommonJS build, which cannot `require` its optional `pg` peer here,
 * so the queue gets a `pg.Pool` built from the pinned node-postgres: the guide's third
 * connection form, with the `search_path` BullMQ would otherwise set itself.
 */
async function bullmqProducer(url: string, max: number): Promise<Producer> {
  const pool = new pg.Pool({
    connectionString: url,
    max,
    application_name: "bench producer",
    options: "-c search_path=bullmq",
  });
  const queue = new Queue(BULLMQ_QUEUE, { connection: pool }, createPostgresBackend);
  try {
    await queue.waitUntilReady();
  } catch (error) {
    await pool.end();
    throw new Error("Cannot open a BullMQ queue on the bench database", { cause: error });
  }
  return {
    async enqueueOne(job) {
      await queue.add(job.kind, bullmqData(job));
    },
    async enqueueBatch(jobs) {
      await queue.addBulk(jobs.map((job) => ({ name: job.kind, data: bullmqData(job) })));
    },
    async warm(count) {
      await Promise.all(Array.from({ length: count }, () => pool.query("select pg_sleep(0.05)")));
    },
    async close() {
      // The queue does not own a pool it was given: it is ended here, after the queue.
      await queue.close();
      await pool.end();
    },
  };
}

export const bullmq: System = {
  name: "bullmq",
  defaultSettings:
    `BullMQ ${PEER_VERSIONS.bullmq} on its PostgreSQL backend (createPostgresBackend, pg ${PEER_VERSIONS.pg}) on Node.js ${PEER_VERSIONS.node}, 1 worker process (one Worker on queue "${BULLMQ_QUEUE}", named jobs noop and stamp): concurrency ${BULLMQ_CONFIG.worker.concurrency} (default 1; graphile-worker's), connection { connectionString, max ${BULLMQ_CONFIG.connection.max} } (a pool BullMQ builds, plus its own LISTEN connection), schema bullmq (default), removeOnComplete true, no batching (not in open-source BullMQ), LISTEN/NOTIFY on (always), drainDelay 5 s, lockDuration 30 s, stalledInterval 30 s, no metrics (defaults); schema installed by runMigrations(); producer: BullMQ in the bench process (Deno, npm:bullmq) on a pg.Pool with search_path bullmq`,
  async install(_sql, url) {
    await runNode("bullmq migrate", [script("bullmq.cjs"), "migrate"], url);
  },
  openProducer: (url, options) => bullmqProducer(url, options.max),
  jobsTable: "bullmq.job",
  spawnConsumer(url) {
    return spawnNodeWorker(
      "bullmq worker",
      [script("bullmq.cjs"), "work", JSON.stringify(BULLMQ_CONFIG)],
      { DATABASE_URL: url },
    );
  },
  // Jobs still to do: completed ones are removed (removeOnComplete), a failed one ends the run.
  async isEmpty(sql: Sql) {
    const [row] = await sql<{ empty: boolean }[]>`
      select not exists (
        select 1 from bullmq.job
        where queue = ${BULLMQ_QUEUE}::text
          and state in ('waiting', 'active', 'delayed', 'waiting-children')
        order by queue, id limit 1
      ) as empty`;
    return row!.empty;
  },
  async count(sql: Sql) {
    const [row] = await sql<{ n: number }[]>`
      select count(*)::integer as n from bullmq.job
      where queue = ${BULLMQ_QUEUE}::text
        and state in ('waiting', 'active', 'delayed', 'waiting-children')`;
    return row!.n;
  },
};

/** The peers, in the order the report lists them. */
export const PEER_SYSTEMS: System[] = [graphileWorker, pgBoss, bullmq];
