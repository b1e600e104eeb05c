/**
 * BullMQ's processes for `deno task bench` (see bench/peers.ts), on its PostgreSQL backend
 * (`createPostgresBackend`), run by the Node.js that bench/peers/package.json pins.
 *
 *   DATABASE_URL=... node bullmq.cjs migrate            install the schema, then exit
 *   DATABASE_URL=... node bullmq.cjs work '<json>'      run a worker until SIGTERM
 *
 * `<json>` is `{ queue, connection, worker }`: the queue's name, the connection options
 * besides the URL (the pool BullMQ builds for itself) and the `new Worker()` options (the
 * settings live in bench/peers.ts, which states them in the report). Jobs named `noop` do
 * nothing; `stamp` jobs take their clock first, then record it beside the producer's `t` in
 * `bench.starts`, on the worker's own pool (as graphile-worker's `helpers.query` does).
 * Prints `{"event":"started","at":EPOCH_MS}` once the worker is connected and running.
 *
 * CommonJS on purpose: `deno task check` type-checks bench/, and would try (and fail) to
 * resolve an ESM import of a package that only npm installs, under bench/peers/node_modules.
 */
const process = require("node:process");
const { Client } = require("pg");
const { createPostgresBackend, runMigrations, Worker } = require("bullmq");

function epochMs() {
  return performance.timeOrigin + performance.now();
}

function out(line) {
  process.stdout.write(line + "\n");
}

function fail(error) {
  process.stderr.write(`bullmq bench process: ${error?.stack ?? error}\n`);
  process.exit(1);
}

/** The explicit deployment step BullMQ's PostgreSQL guide asks for: `runMigrations(client)`. */
async function migrate(connectionString) {
  const client = new Client({ connectionString });
  await client.connect();
  try {
    await runMigrations(client);
  } finally {
    await client.end();
  }
}

async function work(connectionString, config) {
  const worker = new Worker(
    config.queue,
    async (job) => {
      if (job.name !== "stamp") return;
      const startedAt = epochMs();
      await worker.getBackend().connection.pool.query(
        "insert into bench.starts (job_id, enqueued_at, started_at) values ($1::text, $2::float8, $3::float8)",
        [String(job.id), Number(job.data.t), startedAt],
      );
    },
    { ...config.worker, connection: { ...config.connection, connectionString } },
    createPostgresBackend,
  );
  // A worker error (a lost connection, a failed claim) is a failed run: the bench sees
  // the exit and reports the output. A job that fails is one too.
  worker.on("error", fail);
  worker.on(
    "failed",
    (job, error) => fail(`job ${job?.id} (${job?.name}) failed: ${error?.stack}`),
  );
  await worker.waitUntilReady();
  out(JSON.stringify({ event: "started", at: epochMs() }));
  let stopping = false;
  const stop = () => {
    if (stopping) return;
    stopping = true;
    worker.close().then(() => process.exit(0), fail);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

async function main() {
  const connectionString = process.env.DATABASE_URL;
  if (!connectionString) throw new Error("DATABASE_URL is not set");
  const [command, json] = process.argv.slice(2);
  if (command === "migrate") {
    await migrate(connectionString);
    return;
  }
  if (command !== "work" || !json) {
    throw new Error("Usage: bullmq.cjs migrate | work '<json>'");
  }
  await work(connectionString, JSON.parse(json));
}

main().catch(fail);
