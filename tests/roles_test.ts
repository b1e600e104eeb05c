/**
 * lib/roles.ts, the one module that starts, signals and stops the roles for both
 * `shoal --role ...` and `shoal dev`: runRoles() in process against real Postgres, and
 * real processes (the CLI and `shoal dev`) receiving real repeated signals.
 * tests/consumer_process_test.ts (a second SIGTERM), tests/leader_process_test.ts (a role
 * failing at start), tests/dev_test.ts (Ctrl-C) and tests/fault/outage_test.ts (SIGTERM
 * during the startup wait) cover the rest through processes.
 */
import { assert, assertEquals } from "./assert.ts";
import {
  createRunsTable,
  exitWithin,
  FAST_CONSUMER,
  type ShoalProcess,
  sleep,
  spawnShoal,
  TEST_MAIN,
  testDb,
  waitFor,
  waitForOutput,
} from "./helpers.ts";
import { dbWindowMs, type RoleHttp, type Roles, runRoles } from "../lib/roles.ts";
import { LoopWatch } from "../lib/liveness.ts";
import { TaskRegistry } from "../lib/tasks.ts";
import { enqueue } from "../lib/queue.ts";

/** A stand-in for the `--http` server that records what the roles told it. */
function recordingHttp(loops: LoopWatch = new LoopWatch()): RoleHttp & { calls: string[] } {
  const calls: string[] = [];
  return {
    calls,
    loops,
    ready: () => void calls.push("ready"),
    stopping: () => void calls.push("stopping"),
    close: () => {
      calls.push("close");
      return Promise.resolve();
    },
  };
}

/** Settle `promise` within `ms`, or fail: a role left running would otherwise hang the test. */
async function settledWithin<T>(
  what: string,
  promise: Promise<T>,
  ms = 15_000,
): Promise<PromiseSettledResult<T>> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not settle within ${ms} ms`)), ms);
  });
  try {
    const [result] = await Promise.race([Promise.allSettled([promise]), timeout]);
    return result!;
  } finally {
    clearTimeout(timer);
  }
}

const LEADER = { holder: "roles-test", leaseMs: 2000, intervalMs: 100 };

Deno.test("dbWindowMs() is three of the roles' longest wait, never under a second", () => {
  const consumer = (pollIntervalMs: number) => ({
    tasks: new TaskRegistry([]),
    options: { ...FAST_CONSUMER, pollIntervalMs },
  });
  assertEquals(dbWindowMs({ consumer: consumer(100) }), 1000);
  assertEquals(dbWindowMs({ consumer: consumer(30_000) }), 90_000);
  assertEquals(
    dbWindowMs({ reaper: { ...LEADER, intervalMs: 5000, deadRetentionMs: 1 } }),
    15_000,
  );
  assertEquals(
    dbWindowMs({
      consumer: consumer(2000),
      reaper: { ...LEADER, intervalMs: 5000, deadRetentionMs: 1 },
      scheduler: { ...LEADER, intervalMs: 7000, listen: false },
    }),
    21_000,
  );
});

Deno.test("runRoles() has each role's loop report its turns to the server's LoopWatch", async () => {
  await using db = await testDb();
  // A clock the test moves: a loop that turns after the jump shows "0ms ago".
  let now = 0;
  const http = recordingHttp(new LoopWatch(() => now));
  const stop = new AbortController();
  const roles: Roles = {
    consumer: { tasks: new TaskRegistry([]), options: FAST_CONSUMER },
    reaper: { ...LEADER, deadRetentionMs: 60_000 },
    scheduler: { ...LEADER, listen: false },
  };
  const running = runRoles(db.sql, roles, { stop, http });
  try {
    await waitFor("the three loops to be watched", () => http.calls.includes("ready"));
    now = 10 * 60_000; // past every loop's limit: stuck unless it turns again
    const line = await waitFor("each loop to turn again", () => {
      const { stuck, line } = http.loops.check();
      return stuck ? null : line;
    });
    assertEquals(line, "ok: consumer 0ms ago, reaper 0ms ago, scheduler 0ms ago");
  } finally {
    stop.abort();
    await settledWithin("runRoles", running);
  }
});

Deno.test("runRoles() stops every role when one fails, and rejects with the first failure in role order", async () => {
  await using db = await testDb();
  const stop = new AbortController();
  const http = recordingHttp();
  const roles: Roles = {
    consumer: { tasks: new TaskRegistry([]), options: FAST_CONSUMER },
    // An interval not shorter than the lease: each leader refuses to start.
    reaper: { ...LEADER, intervalMs: 2000, deadRetentionMs: 60_000 },
    scheduler: { ...LEADER, intervalMs: 2000, listen: false },
  };
  const result = await settledWithin("runRoles", runRoles(db.sql, roles, { stop, http }));
  if (result.status !== "rejected") throw new Error("runRoles should reject");
  assert(String(result.reason).includes("Invalid timing for the reaper"), String(result.reason));
  assert(stop.signal.aborted, "a failing role aborts the shared stop");
  assertEquals(http.calls, ["ready", "stopping"], "the server is told, and not closed by runRoles");
});

Deno.test("runRoles() starts nothing when prepare resolves false, and runs the roles once it resolves true", async () => {
  await using db = await testDb();
  // A reaper that would fail at once if it started.
  const roles: Roles = { reaper: { ...LEADER, intervalMs: 2000, deadRetentionMs: 60_000 } };
  const stop = new AbortController();
  const http = recordingHttp();
  const prepared = await settledWithin(
    "runRoles",
    runRoles(db.sql, roles, {
      stop,
      http,
      prepare: () => {
        stop.abort(); // a signal while waiting for the database
        return Promise.resolve(false);
      },
    }),
  );
  assertEquals(prepared.status, "fulfilled", "no role ran, so none failed");
  assertEquals(http.calls, ["stopping"]);

  const again = new AbortController();
  const started = await settledWithin(
    "runRoles",
    runRoles(db.sql, roles, { stop: again, prepare: () => Promise.resolve(true) }),
  );
  assertEquals(started.status, "rejected", "the same roles do run after a true prepare");
});

Deno.test("runRoles() runs beside until it returns, then stops the roles; its error wins over a role's", async () => {
  await using db = await testDb();
  await createRunsTable(db.sql);
  const consumer = { tasks: new TaskRegistry([]), options: FAST_CONSUMER };
  // beside returns: the roles stop and runRoles resolves.
  const stop = new AbortController();
  let sawStop = false;
  const done = await settledWithin(
    "runRoles",
    runRoles(db.sql, { consumer }, {
      stop,
      beside: async (stopping) => {
        await sleep(200);
        sawStop = stopping.aborted;
      },
    }),
  );
  assertEquals(done.status, "fulfilled");
  assertEquals(sawStop, false, "beside ran while the roles did");
  assert(stop.signal.aborted, "beside returning stops the roles");

  // beside throws after a role failed (which stopped it): beside's error is the one reported.
  const broken = await settledWithin(
    "runRoles",
    runRoles(db.sql, { consumer, reaper: { ...LEADER, intervalMs: 2000, deadRetentionMs: 1 } }, {
      stop: new AbortController(),
      beside: async (stopping) => {
        await waitFor("the failing reaper to stop everything", () => stopping.aborted);
        throw new Error("the demo broke");
      },
    }),
  );
  if (broken.status !== "rejected") throw new Error("runRoles should reject");
  assertEquals(String(broken.reason), "Error: the demo broke");
});

/** True while `proc` has not exited (checked right now, without waiting). */
async function running(proc: ShoalProcess): Promise<boolean> {
  return await Promise.race([proc.exited().then(() => false), sleep(0).then(() => true)]);
}

/**
 * Start a role process, wait for `started` in its output, enqueue a 60 s job and wait
 * until it runs: with a 60 s grace, the first signal then waits on it.
 */
async function withLongJob(
  args: string[],
  options: { url: string; mainModule?: string },
  started: string,
  enqueueLongJob: () => Promise<string>,
  jobRunning: (id: string) => Promise<boolean>,
): Promise<ShoalProcess> {
  const proc = spawnShoal(args, options);
  try {
    await waitForOutput(proc, started, 60_000);
    const id = await enqueueLongJob();
    await waitFor("the long job to start", () => jobRunning(id), 30_000);
  } catch (error) {
    await proc[Symbol.asyncDispose]();
    throw error;
  }
  return proc;
}

Deno.test("--role consumer: a SIGINT repeated within a second is ignored, the next one exits 130 at once", async () => {
  await using db = await testDb();
  await createRunsTable(db.sql);
  await using proc = await withLongJob(
    [
      "--role",
      "consumer",
      "--poll-interval",
      "100ms",
      "--shutdown-grace",
      "60s",
      "--log-level",
      "debug",
    ],
    { url: db.url, mainModule: TEST_MAIN },
    "started on",
    () => enqueue(db.sql, "test.record", { ms: 60_000 }),
    async (id) => (await db.sql`select 1 from test_runs where job_id = ${id}::bigint`).length === 1,
  );
  proc.kill("SIGINT");
  await waitForOutput(proc, "Received SIGINT: shutting down");
  proc.kill("SIGINT"); // as `deno task` forwards its copy of the terminal's Ctrl-C
  await waitForOutput(proc, "Ignored SIGINT repeated within a second of the first");
  await sleep(1200);
  assert(await running(proc), `exited on the repeated SIGINT:\n${proc.output()}`);
  assert(!proc.output().includes("Consumer stopped"), "still waiting on the grace period");
  proc.kill("SIGINT");
  const { code, elapsedMs, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 130, output);
  assert(elapsedMs < 10_000, `the second signal took ${elapsedMs} ms to exit`);
  assert(output.includes("Received SIGINT again: exiting now"), output);
});

Deno.test("shoal dev: the first SIGTERM waits on the grace period, a second exits 143 at once", async () => {
  await using db = await testDb();
  const dir = await Deno.makeTempDir({ prefix: "shoal-roles-test-" });
  try {
    await using dev = await withLongJob(
      ["dev", "--dir", dir, "--poll-interval", "100ms", "--shutdown-grace", "60s"],
      { url: db.url },
      "Press Ctrl-C to stop.",
      () => enqueue(db.sql, "shoal.sleep", { ms: 60_000 }, { queue: "demo" }),
      async (id) =>
        (await db.sql`
          select 1 from shoal.jobs where id = ${id}::bigint and locked_by is not null`)
          .length === 1,
    );
    dev.kill("SIGTERM");
    await waitForOutput(dev, "Received SIGTERM: shutting down");
    await sleep(500);
    assert(await running(dev), `exited on the first SIGTERM:\n${dev.output()}`);
    dev.kill("SIGTERM");
    const { code, elapsedMs, output } = await exitWithin(dev, 20_000);
    assertEquals(code, 143, output);
    assert(elapsedMs < 10_000, `the second signal took ${elapsedMs} ms to exit`);
    assert(output.includes("Received SIGTERM again: exiting now"), output);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
