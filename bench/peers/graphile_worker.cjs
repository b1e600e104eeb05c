/**
 * graphile-worker's worker process for `deno task bench` (see bench/peers.ts), run by the
 * Node.js that bench/peers/package.json pins (graphile-worker needs Node >= 22.18).
 *
 *   DATABASE_URL=... node graphile_worker.cjs migrate          install the schema, then exit
 *   DATABASE_URL=... node graphile_worker.cjs work '<json>'    run a worker until SIGTERM
 *
 * `<json>` is `preset.worker` (concurrency, pool, local queue, batching: the settings live
 * in bench/peers.ts, which states them in the report). Tasks: `noop` does nothing; `stamp`
 * takes its clock first, then records it beside the producer's `t` in `bench.starts`.
 * Prints `{"event":"started","at":EPOCH_MS}` once the worker is connected and listening.
 *
 * CommonJS on purpose: `deno task check` type-checks bench/, and would try (and fail) to
 * resolve an ESM import of a package that only npm installs, under bench/peers/node_modules.
 */
const process = require("node:process");
const { run, runMigrations } = require("graphile-worker");

function epochMs() {
  return performance.timeOrigin + performance.now();
}

function out(line) {
  process.stdout.write(line + "\n");
}

/** The `stamp` task: the clock is taken before anything else the job does. */
async function stamp(payload, helpers) {
  const startedAt = epochMs();
  await helpers.query(
    "insert into bench.starts (job_id, enqueued_at, started_at) values ($1::text, $2::float8, $3::float8)",
    [String(helpers.job.id), Number(payload.t), startedAt],
  );
}

async function main() {
  const connectionString = process.env.DATABASE_URL;
  if (!connectionString) throw new Error("DATABASE_URL is not set");
  const [command, settings] = process.argv.slice(2);
  if (command === "migrate") {
    await runMigrations({ connectionString });
    return;
  }
  if (command !== "work" || !settings) {
    throw new Error("Usage: graphile_worker.cjs migrate | work '<preset.worker JSON>'");
  }
  const runner = await run({
    // The bench stops the worker with SIGTERM and expects a clean exit code: graphile-worker's
    // own handlers re-raise the signal after shutting down, so we handle it ourselves.
    noHandleSignals: true,
    taskList: { noop: async () => {}, stamp },
    preset: { worker: { ...JSON.parse(settings), connectionString } },
  });
  out(JSON.stringify({ event: "started", at: epochMs() }));
  let stopping = false;
  const stop = () => {
    if (stopping) return;
    stopping = true;
    runner.stop().then(
      () => process.exit(0),
      (error) => {
        process.stderr.write(`graphile-worker: stop failed: ${error.message}\n`);
        process.exit(1);
      },
    );
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
  await runner.promise;
}

main().catch((error) => {
  process.stderr.write(`graphile-worker bench worker: ${error.stack ?? error}\n`);
  process.exit(1);
});
