/**
 * Fault 5: PgBouncer (Debian's package) in transaction pooling mode between shoal and
 * Postgres. Every statement may land on a different server connection: no session state,
 * no LISTEN (`--no-listen`), no named prepared statements (`--no-prepare`). The mixed run
 * passes through it. A machine without pgbouncer fails this test, never skips it.
 */
import { assert, assertEquals } from "../assert.ts";
import {
  createRunsTable,
  exitWithin,
  figure,
  freePort,
  type ShoalProcess,
  sleep,
  spawnShoal,
  TEST_MAIN,
  testDb,
  waitFor,
  waitForOutput,
} from "../helpers.ts";
import { byKey, installClaimAudit, loadRuns, overlapOf } from "../flow_runs.ts";
import { enqueueMany, type JobSpec } from "../../lib/queue.ts";
import type { Sql } from "../../lib/db.ts";
import { MixedRun, report, type Role, tail } from "./harness.ts";

/** Where Debian puts pgbouncer (/usr/sbin), or anywhere on PATH. */
async function findPgBouncer(): Promise<string> {
  const dirs = [...(Deno.env.get("PATH") ?? "").split(":"), "/usr/sbin", "/usr/bin"];
  for (const dir of dirs.filter((d) => d !== "")) {
    try {
      await Deno.stat(`${dir}/pgbouncer`);
      return `${dir}/pgbouncer`;
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    }
  }
  throw new Error(
    "pgbouncer is not installed: the fault suite needs it (Debian: apt-get install -y pgbouncer)",
  );
}

interface Bouncer {
  /** `url` rewritten to go through PgBouncer. */
  url: string;
  /** The pooler's log so far. */
  log(): Promise<string>;
  [Symbol.asyncDispose](): Promise<void>;
}

/**
 * Start PgBouncer as the postgres OS user (it refuses to run as root) on a free loopback
 * port, in transaction pooling mode, in front of the server `url` names.
 */
async function startPgBouncer(url: string): Promise<Bouncer> {
  const bin = await findPgBouncer();
  const target = new URL(url);
  const dir = await Deno.makeTempDir({ prefix: "shoal-pgbouncer-" });
  const uid = Number(
    new TextDecoder().decode(
      (await new Deno.Command("id", { args: ["-u", "postgres"] }).output())
        .stdout,
    ).trim(),
  );
  await Deno.chown(dir, uid, null);
  await Deno.chmod(dir, 0o755);
  const port = freePort();
  const logFile = `${dir}/pgbouncer.log`;
  await Deno.writeTextFile(`${dir}/userlist.txt`, '"postgres" ""\n');
  await Deno.writeTextFile(
    `${dir}/pgbouncer.ini`,
    [
      "[databases]",
      `* = host=127.0.0.1 port=${target.port}`,
      "[pgbouncer]",
      "listen_addr = 127.0.0.1",
      `listen_port = ${port}`,
      "unix_socket_dir =",
      "auth_type = trust",
      `auth_file = ${dir}/userlist.txt`,
      "pool_mode = transaction",
      "max_client_conn = 500",
      "default_pool_size = 20",
      "ignore_startup_parameters = extra_float_digits,options",
      `logfile = ${logFile}`,
      `pidfile = ${dir}/pgbouncer.pid`,
      "",
    ].join("\n"),
  );
  const child = new Deno.Command("runuser", {
    args: ["-u", "postgres", "--", bin, `${dir}/pgbouncer.ini`],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  const readLog = async () => {
    try {
      return await Deno.readTextFile(logFile);
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) return "";
      throw error;
    }
  };
  let exited = false;
  const status = child.status.then((s) => {
    exited = true;
    return s;
  });
  try {
    await waitFor(
      "pgbouncer to listen",
      async () => {
        if (exited) throw new Error(`pgbouncer exited at start:\n${await readLog()}`);
        const conn = await Deno.connect({ hostname: "127.0.0.1", port });
        conn.close();
        return true;
      },
      20_000,
      100,
    );
  } catch (error) {
    child.kill("SIGKILL");
    await status;
    throw error;
  }
  const via = new URL(url);
  via.port = String(port);
  return {
    url: via.toString(),
    log: readLog,
    async [Symbol.asyncDispose]() {
      if (!exited) child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
      await status;
      clearTimeout(timer);
      await Deno.remove(dir, { recursive: true });
    },
  };
}

/** Behind a transaction pooler: no LISTEN, no named prepared statements. */
function pooledFlags(role: Role): string[] {
  return role === "reaper" ? ["--no-prepare"] : ["--no-listen", "--no-prepare"];
}

Deno.test("the mixed run passes through PgBouncer in transaction pooling mode", async () => {
  const started = Date.now();
  await using db = await testDb();
  await using bouncer = await startPgBouncer(db.url);
  await using run = await MixedRun.prepare({ url: bouncer.url, sql: db.sql, flags: pooledFlags });
  await run.start();
  await run.waitForSlots(2);
  await run.enqueueWave(60);
  await sleep(2000);
  await run.enqueueWave(60);
  await run.finish();
  const figures = await run.check();
  const logins = (await bouncer.log()).split("\n").filter((l) => l.includes(`db=${db.name}`));
  assert(logins.length >= run.members.length, `only ${logins.length} logins through pgbouncer`);
  report("through PgBouncer (transaction pooling)", figures, started);
});

/** Jobs of `queue` still in shoal.jobs, and how many of those are claimed. */
async function jobsOf(sql: Sql, queue: string): Promise<{ n: number; claimed: number }> {
  const [row] = await sql<{ n: number; claimed: number }[]>`
    select count(*)::int as n, (count(*) filter (where locked_by is not null))::int as claimed
    from shoal.jobs where queue = ${queue}::text`;
  return row!;
}

Deno.test("behind PgBouncer in transaction mode, consumers keep a concurrency limit, a task's own and a pause", async () => {
  await using db = await testDb();
  await using bouncer = await startPgBouncer(db.url);
  await createRunsTable(db.sql);
  // Runs are keyed "task/key": test.record_export has a limit of its own (1 per key).
  await installClaimAudit(db.sql, true);
  await db.sql`select shoal.set_concurrency_limit('flow', 2)`;
  await db.sql`select shoal.set_concurrency_limit('flow', 1, task => 'test.record_export')`;
  const limits: Record<string, number> = {
    "test.record/a": 2,
    "test.record/b": 2,
    "test.record_export/a": 1,
    "test.record_export/b": 1,
  };
  await db.sql`select shoal.pause_queue('held')`;
  const jobs: JobSpec[] = [];
  for (let i = 0; i < 12; i++) {
    for (const key of ["a", "b"]) {
      jobs.push({ task: "test.record", queue: "flow", fairnessKey: key, payload: { ms: 150 } });
      if (i < 6) {
        jobs.push({
          task: "test.record_export",
          queue: "flow",
          fairnessKey: key,
          payload: { ms: 150 },
        });
      }
    }
  }
  for (let i = 0; i < 6; i++) jobs.push({ task: "test.record", queue: "held", payload: { ms: 0 } });
  await enqueueMany(db.sql, jobs);

  // Polling (no LISTEN through the pooler): a freed slot is found at the next poll. Two
  // processes started together would poll in step, the first always ahead of the second
  // and running every job; polls of 100 and 70 ms drift apart, so both take slots.
  const procs: ShoalProcess[] = ["100ms", "70ms"].map((poll) =>
    spawnShoal([
      "--role",
      "consumer",
      "--queues",
      "flow,held",
      "--concurrency",
      "20",
      "--poll-interval",
      poll,
      "--no-listen",
      "--no-prepare",
      "--visibility-timeout",
      "5s",
      "--shutdown-grace",
      "5s",
      "--log-format",
      "json",
    ], { url: bouncer.url, mainModule: TEST_MAIN })
  );
  await using _procs = {
    [Symbol.asyncDispose]: async () =>
      void await Promise.all(procs.map((p) => p[Symbol.asyncDispose]())),
  };
  try {
    await Promise.all(procs.map((p) => waitForOutput(p, "started on", 30_000)));
    await waitFor(
      "the limited queue to drain",
      async () => (await jobsOf(db.sql, "flow")).n === 0,
      30_000,
    );
  } catch (error) {
    const said = procs.map((p) => tail(p.output(), 15)).join("\n");
    throw new Error(`${(error as Error).message}; the consumers said:\n${said}`, { cause: error });
  }

  const runs = await loadRuns(db.sql, "flow");
  assertEquals(runs.length, jobs.length - 6, "one run per job of the limited queue");
  assertEquals(runs.filter((r) => r.attempt !== 1), [], "runs beyond the first attempt");
  const pids = runs.map((r) => r.pid);
  assertEquals(new Set(pids).size, 2, `one consumer ran every job: ${pids.join(",")}`);
  for (const [key, keyRuns] of byKey(runs)) {
    const limit = limits[key]!;
    const o = overlapOf(keyRuns);
    figure(
      `[fault] through PgBouncer, ${key} (limit ${limit}): at most ${o.max} at once, ` +
        `${o.mean.toFixed(2)} on average over ${o.windowMs.toFixed(0)} ms while jobs waited`,
    );
    assert(o.max <= limit, `key ${key} ran ${o.max} jobs at once over its limit of ${limit}`);
    assertEquals(o.max, limit, `key ${key} never used its limit`);
    // Used, at polls: a slot freed waits at most the longer poll (100 ms) and a claim for the next
    // 150 ms job, so a key runs about 60% of its limit at worst. A key counted full when it
    // is not (a lock kept past its claim's transaction, say) would fall far below half.
    assert(o.mean >= 0.5 * limit, `key ${key} ran ${o.mean.toFixed(2)} on average of ${limit}`);
  }
  // The paused queue: polled all along, never claimed.
  assertEquals(await jobsOf(db.sql, "held"), { n: 6, claimed: 0 });
  const [held] = await db.sql<{ claims: number; attempts: number }[]>`
    select (select count(*)::int from test_claims where queue = 'held') as claims,
      (select coalesce(max(attempts), 0)::int from shoal.jobs where queue = 'held') as attempts`;
  assertEquals(held, { claims: 0, attempts: 0 }, "the paused queue's jobs");

  await db.sql`select shoal.resume_queue('held')`;
  await waitFor(
    "the resumed queue to drain",
    async () => (await jobsOf(db.sql, "held")).n === 0,
    10_000,
  );
  assertEquals((await loadRuns(db.sql, "held")).length, 6);
  const [dead] = await db.sql<{ n: number }[]>`select count(*)::int as n from shoal.dead_jobs`;
  assertEquals(dead!.n, 0, "dead letters");
  const logins = (await bouncer.log()).split("\n").filter((l) => l.includes(`db=${db.name}`));
  assert(logins.length >= procs.length, `only ${logins.length} logins through pgbouncer`);
  for (const p of procs) p.kill("SIGTERM");
  for (const p of procs) assertEquals((await exitWithin(p, 20_000)).code, 0, tail(p.output()));
});

Deno.test("behind PgBouncer in transaction mode, a rate limit and a held key hold", async () => {
  await using db = await testDb();
  await using bouncer = await startPgBouncer(db.url);
  await createRunsTable(db.sql);
  await installClaimAudit(db.sql);
  const perSecond = 10;
  await db.sql`select shoal.set_rate_limit('flow', ${perSecond}, 1000)`;
  const jobs: JobSpec[] = [];
  for (let i = 0; i < 25; i++) {
    jobs.push({ task: "test.record", queue: "flow", fairnessKey: "a", payload: { ms: 0 } });
  }
  for (let i = 0; i < 5; i++) {
    jobs.push({ task: "test.record", queue: "flow", fairnessKey: "held", payload: { ms: 0 } });
  }
  await enqueueMany(db.sql, jobs);
  await db.sql`select shoal.hold_key('flow', 'held', 60000)`;
  const proc = spawnShoal([
    "--role",
    "consumer",
    "--queues",
    "flow",
    "--concurrency",
    "20",
    "--poll-interval",
    "50ms",
    "--no-listen",
    "--no-prepare",
    "--log-format",
    "json",
  ], { url: bouncer.url, mainModule: TEST_MAIN });
  await using _proc = { [Symbol.asyncDispose]: () => proc[Symbol.asyncDispose]() };
  await waitForOutput(proc, "started on", 30_000);
  await waitFor(
    "key a's 25 jobs",
    async () => (await loadRuns(db.sql, "flow")).filter((r) => r.key === "a").length === 25,
    20_000,
  );
  const runs = (await loadRuns(db.sql, "flow")).filter((r) => r.key === "a");
  // A bucket of 10 refilled at 10 a second: 10 at once, then one every 100 ms. The 25th
  // starts no sooner than 1.5 s after the first; any second holds at most 10 + 10 starts.
  const spanMs = (runs[24]!.start - runs[0]!.start) / 1000;
  figure(`[fault] through PgBouncer, rate ${perSecond}/s: 25 starts over ${spanMs.toFixed(0)} ms`);
  assert(spanMs >= 1400, `25 starts in ${spanMs.toFixed(0)} ms under ${perSecond} a second`);
  for (const r of runs) {
    const inSecond = runs.filter((o) => o.start >= r.start && o.start < r.start + 1_000_000);
    assert(inSecond.length <= 2 * perSecond, `${inSecond.length} starts within 1 s`);
  }
  // The held key: never claimed while held; lifted, its jobs run.
  const [held] = await db.sql<{ claims: number }[]>`
    select count(*)::int as claims from test_claims where key = 'held'`;
  assertEquals(held!.claims, 0, "claims of the held key");
  await db.sql`select shoal.hold_key('flow', 'held', 0)`;
  await waitFor(
    "the held key's jobs after the hold is lifted",
    async () => (await loadRuns(db.sql, "flow")).filter((r) => r.key === "held").length === 5,
    10_000,
  );
  proc.kill("SIGTERM");
  assertEquals((await exitWithin(proc, 20_000)).code, 0, tail(proc.output()));
});
