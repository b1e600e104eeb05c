/**
 * pg-boss's processes for `deno task bench` (see bench/peers.ts), run by the Node.js that
 * bench/peers/package.json pins (pg-boss needs Node >= 22.12).
 *
 *   DATABASE_URL=... node pg_boss.cjs install '<json>'   install the schema and create the queue
 *   DATABASE_URL=... node pg_boss.cjs work '<json>'      run a worker until SIGTERM
 *
 * `<json>` is `{ queue, queueOptions, constructor, work }`: the queue's name and
 * `createQueue` options, the `new PgBoss()` options and the `boss.work()` options (the
 * settings live in bench/peers.ts, which states them in the report). The handler gets a
 * batch: jobs whose data carries `t` (start-latency jobs) have the handler's clock, taken
 * first, recorded beside `t` in `bench.starts` (one insert per batch); the others do nothing.
 * Prints `{"event":"started","at":EPOCH_MS}` once the worker is polling.
 *
 * CommonJS on purpose: `deno task check` type-checks bench/, and would try (and fail) to
 * resolve an ESM import of a package that only npm installs, under bench/peers/node_modules.
 */
const process = require("node:process");
const { PgBoss } = require("pg-boss");

function epochMs() {
  return performance.timeOrigin + performance.now();
}

function out(line) {
  process.stdout.write(line + "\n");
}

function fail(error) {
  process.stderr.write(`pg-boss bench process: ${error?.stack ?? error}\n`);
  process.exit(1);
}

async function install(connectionString, config) {
  const boss = new PgBoss({ connectionString, supervise: false, schedule: false });
  boss.on("error", fail);
  await boss.start();
  await boss.createQueue(config.queue, config.queueOptions);
  await boss.stop({ graceful: false });
}

async function work(connectionString, config) {
  const boss = new PgBoss({ ...config.constructor, connectionString });
  // A worker error is a failed run: the bench sees the exit and reports the output.
  boss.on("error", fail);
  boss.on(
    "warning",
    (warning) => process.stderr.write(`pg-boss warning: ${JSON.stringify(warning)}\n`),
  );
  await boss.start();
  const db = boss.getDb();
  await boss.work(config.queue, config.work, async (jobs) => {
    const startedAt = epochMs();
    const stamped = jobs.filter((job) => typeof job.data?.t === "number");
    if (stamped.length === 0) return;
    await db.executeSql(
      `insert into bench.starts (job_id, enqueued_at, started_at)
       select id, t, $3::float8 from unnest($1::text[], $2::float8[]) as s(id, t)`,
      [stamped.map((job) => job.id), stamped.map((job) => job.data.t), startedAt],
    );
  });
  out(JSON.stringify({ event: "started", at: epochMs() }));
  let stopping = false;
  const stop = () => {
    if (stopping) return;
    stopping = true;
    boss.stop({ graceful: true }).then(() => process.exit(0), fail);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

async function main() {
  const connectionString = process.env.DATABASE_URL;
  if (!connectionString) throw new Error("DATABASE_URL is not set");
  const [command, json] = process.argv.slice(2);
  if ((command !== "install" && command !== "work") || !json) {
    throw new Error("Usage: pg_boss.cjs install|work '<json>'");
  }
  const config = JSON.parse(json);
  if (command === "install") await install(connectionString, config);
  else await work(connectionString, config);
}

main().catch(fail);
