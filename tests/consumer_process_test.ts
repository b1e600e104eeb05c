/**
 * Process tests: real `shoal --role consumer` processes (tests/fixtures/test_main.ts, a
 * user-style entry file with test tasks) receiving real signals. Every timing bound here
 * is generous: it only separates "promptly" from "waited for a 60 s job".
 */
import { assert, assertEquals } from "./assert.ts";
import {
  createRunsTable,
  emptyDb,
  exitWithin,
  logLines,
  runShoal,
  type ShoalProcess,
  spawnShoal,
  TEST_MAIN,
  testDb,
  waitFor,
  waitForOutput,
} from "./helpers.ts";
import { enqueue, enqueueMany } from "../lib/queue.ts";
import type { Sql } from "../lib/db.ts";

/** Written once the consumer loop runs (after migrations, checks and signal traps). */
const STARTED = "started on";

function consumer(url: string, flags: string[] = []): ShoalProcess {
  return spawnShoal([
    "--role",
    "consumer",
    "--poll-interval",
    "100ms",
    "--log-format",
    "json",
    "--visibility-timeout",
    "2s",
    "--shutdown-grace",
    "1s",
    ...flags,
  ], { url, mainModule: TEST_MAIN });
}

interface RunRow {
  job_id: string;
  token: string;
  attempt: number;
  pid: number;
  note: string | null;
  started_at: Date;
  finished_at: Date | null;
}

async function runsOf(sql: Sql, jobId: string): Promise<RunRow[]> {
  return await sql<RunRow[]>`
    select job_id, token, attempt, pid, note, started_at, finished_at
    from test_runs where job_id = ${jobId}::bigint order by id`;
}

interface JobState {
  attempts: number;
  token: string;
  locked_by: string | null;
  locked_at: Date | null;
  visible: boolean;
  deadline: Date;
}

async function jobState(sql: Sql, jobId: string): Promise<JobState | undefined> {
  const [row] = await sql<JobState[]>`
    select attempts, token, locked_by, locked_at, run_at <= now() as visible, run_at as deadline
    from shoal.jobs where id = ${jobId}::bigint`;
  return row;
}

Deno.test("SIGTERM during a long job releases it at once without burning an attempt and exits 0", async () => {
  await using db = await testDb();
  await createRunsTable(db.sql);
  await using proc = consumer(db.url, ["--shutdown-grace", "1s"]);
  await waitForOutput(proc, STARTED);
  const id = await enqueue(db.sql, "test.record", { ms: 60_000 });
  await waitFor("the job to start", async () => (await runsOf(db.sql, id)).length === 1);
  const claimed = await jobState(db.sql, id);
  assertEquals(claimed?.attempts, 1);

  proc.kill("SIGTERM");
  const { code, elapsedMs, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 0, output);
  assert(elapsedMs < 10_000, `shutdown took ${elapsedMs} ms with a 1s grace`);

  const released = await jobState(db.sql, id);
  if (!released) throw new Error("the released job must still be queued");
  assertEquals(released.visible, true, "released jobs are visible now, not after a deadline");
  assertEquals(released.locked_by, null);
  assertEquals(released.attempts, 0, "a release must not burn an attempt");
  assert(BigInt(released.token) > BigInt(claimed!.token), "a release revokes the old token");
  const [run] = await runsOf(db.sql, id);
  assertEquals(run?.finished_at, null, "the handler was aborted, not run to the end");
  const messages = logLines(output).map((l) => String(l.message));
  assert(messages.some((m) => m.includes("Released 1 unfinished jobs")), output);
});

Deno.test("SIGTERM with a short job in flight lets it finish and acks it within the grace", async () => {
  await using db = await testDb();
  await createRunsTable(db.sql);
  await using proc = consumer(db.url, ["--shutdown-grace", "20s"]);
  await waitForOutput(proc, STARTED);
  const id = await enqueue(db.sql, "test.record", { ms: 1500 });
  await waitFor("the job to start", async () => (await runsOf(db.sql, id)).length === 1);

  proc.kill("SIGTERM");
  const { code, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 0, output);
  const runs = await runsOf(db.sql, id);
  assertEquals(runs.length, 1);
  assert(runs[0]!.finished_at !== null, "the handler ran to its end");
  assertEquals(await jobState(db.sql, id), undefined, "the finished job was acked");
  const [dead] = await db.sql`select count(*)::int as n from shoal.dead_jobs`;
  assertEquals(dead!.n, 0);
});

Deno.test("a second SIGTERM exits at once while the first still waits on the grace", async () => {
  await using db = await testDb();
  await createRunsTable(db.sql);
  await using proc = consumer(db.url, ["--shutdown-grace", "60s"]);
  await waitForOutput(proc, STARTED);
  const id = await enqueue(db.sql, "test.record", { ms: 60_000 });
  await waitFor("the job to start", async () => (await runsOf(db.sql, id)).length === 1);

  proc.kill("SIGTERM");
  await waitForOutput(proc, "shutting down");
  await new Promise((resolve) => setTimeout(resolve, 200));
  assert(!proc.output().includes("Consumer stopped"), "still waiting on the grace period");
  proc.kill("SIGTERM");
  const { code, elapsedMs, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 143, output);
  assert(elapsedMs < 10_000, `the second signal took ${elapsedMs} ms to exit`);
  assert(output.includes("again: exiting now"), output);
});

Deno.test("SIGKILL during a job: redelivered after its visibility deadline, never before", async () => {
  await using db = await testDb();
  await createRunsTable(db.sql);
  const vt = ["--visibility-timeout", "4s"];
  await using first = consumer(db.url, vt);
  await waitForOutput(first, STARTED);
  const id = await enqueue(db.sql, "test.record", { ms: 60_000 });
  await waitFor("the first run", async () => (await runsOf(db.sql, id)).length === 1);

  first.kill("SIGKILL");
  const killed = await exitWithin(first, 20_000);
  assertEquals(killed.signal, "SIGKILL");
  // Nothing extends the claim any more: this is the deadline the job must wait out.
  const { deadline, attempts } = (await jobState(db.sql, id))!;
  assertEquals(attempts, 1);

  await using second = consumer(db.url, vt);
  await waitForOutput(second, STARTED);
  const [ready] = await db.sql<{ before: boolean }[]>`
    select now() < ${deadline}::timestamptz as before`;
  assert(
    ready!.before,
    "the second consumer must be up before the deadline, or this proves nothing",
  );

  await waitFor("the redelivery", async () => (await runsOf(db.sql, id)).length === 2, 20_000);
  const runs = await runsOf(db.sql, id);
  assertEquals(runs.map((r) => r.attempt), [1, 2]);
  assertEquals(runs[1]!.pid, second.child.pid);
  const redelivered = (await jobState(db.sql, id))!;
  assertEquals(redelivered.attempts, 2);
  assert(
    redelivered.locked_at!.getTime() >= deadline.getTime(),
    `claimed again at ${
      redelivered.locked_at!.toISOString()
    }, before the deadline ${deadline.toISOString()}`,
  );
});

Deno.test("a job longer than the visibility timeout is never redelivered while heartbeated", async () => {
  await using db = await testDb();
  await createRunsTable(db.sql);
  const vt = ["--visibility-timeout", "1s"];
  await using a = consumer(db.url, vt);
  await using b = consumer(db.url, vt);
  await Promise.all([waitForOutput(a, STARTED), waitForOutput(b, STARTED)]);
  const id = await enqueue(db.sql, "test.record", { ms: 4000 });

  await waitFor("the job to be acked, or run twice", async () => {
    return (await jobState(db.sql, id)) === undefined || (await runsOf(db.sql, id)).length > 1;
  }, 20_000);
  const runs = await runsOf(db.sql, id);
  assertEquals(runs.length, 1, "exactly one run: the idle consumer never got the job");
  const run = runs[0]!;
  if (!run.finished_at) throw new Error("the run never finished");
  assert(run.finished_at.getTime() - run.started_at.getTime() >= 4000);
  assert([a.child.pid, b.child.pid].includes(run.pid));
});

Deno.test("two consumers draining one queue run every job exactly once", async () => {
  await using db = await testDb();
  await createRunsTable(db.sql);
  const flags = ["--concurrency", "8", "--visibility-timeout", "10s"];
  await using a = consumer(db.url, flags);
  await using b = consumer(db.url, flags);
  await Promise.all([waitForOutput(a, STARTED), waitForOutput(b, STARTED)]);
  const count = 300;
  await enqueueMany(
    db.sql,
    Array.from({ length: count }, () => ({ task: "test.record", payload: { ms: 5 } })),
  );

  await waitFor("the queue to drain", async () => {
    const [row] = await db.sql<{ n: number }[]>`select count(*)::int as n from shoal.jobs`;
    return row!.n === 0;
  }, 30_000);
  const [stats] = await db.sql<
    { runs: number; jobs: number; finished: number; pids: number }[]
  >`
    select count(*)::int as runs, count(distinct job_id)::int as jobs,
      count(finished_at)::int as finished, count(distinct pid)::int as pids
    from test_runs`;
  assertEquals(stats, { runs: count, jobs: count, finished: count, pids: 2 });
  const [dead] = await db.sql<{ n: number }[]>`select count(*)::int as n from shoal.dead_jobs`;
  assertEquals(dead!.n, 0);
});

Deno.test("failing handlers are recorded failures with clear reasons and the consumer keeps running", async () => {
  await using db = await testDb();
  await createRunsTable(db.sql);
  // One slot: the job after the hanging one only runs if the hang's slot is given back.
  await using proc = consumer(db.url, ["--concurrency", "1"]);
  await waitForOutput(proc, STARTED);
  let exited = false;
  proc.exited().then(() => (exited = true));

  const specs = [
    { task: "test.slow", maxAttempts: 1 },
    { task: "test.throw_string", maxAttempts: 1 },
    { task: "test.hang", maxAttempts: 1 },
    { task: "no.such_task", maxAttempts: 1 },
    { task: "test.strict", payload: { n: "seven" } },
    { task: "test.record", payload: {} },
  ];
  const ids = (await enqueueMany(
    db.sql,
    specs.map((s, i) => ({ ...s, priority: specs.length - i })),
  )).map((e) => e.id);
  const [slow, throwString, hang, unknown, strict, after] = ids as [
    string,
    string,
    string,
    string,
    string,
    string,
  ];

  await waitFor("the job after the failures to finish", async () => {
    const runs = await runsOf(db.sql, after);
    return runs.length === 1 && runs[0]!.finished_at !== null;
  }, 20_000);
  await waitFor("all five failures to be dead-lettered", async () => {
    const [row] = await db.sql<{ n: number }[]>`select count(*)::int as n from shoal.dead_jobs`;
    return row!.n === 5;
  });
  const dead = new Map(
    (await db.sql<{ id: string; reason: string; attempts: number }[]>`
      select id, reason, attempts from shoal.dead_jobs`).map((r) => [r.id, r]),
  );
  const reason = (id: string) => dead.get(id)?.reason ?? "(not dead-lettered)";
  assert(reason(slow).includes("Task timed out after 300ms"), reason(slow));
  assert(reason(throwString).includes("non-Error thrown"), reason(throwString));
  assert(reason(throwString).includes("a plain string, not an Error"), reason(throwString));
  assert(reason(hang).includes("Task timed out after 300ms"), reason(hang));
  assert(reason(unknown).includes('Unknown task "no.such_task"'), reason(unknown));
  assert(
    reason(strict).includes("Invalid payload for task test.strict: n must be an integer"),
    reason(strict),
  );
  assertEquals(dead.get(strict)?.attempts, 1, "an invalid payload dead-letters without retries");
  // The timeout reached the handler through its signal, not only the consumer's race.
  const [slowRun] = await runsOf(db.sql, slow);
  assertEquals(slowRun?.note, "aborted: Task timed out after 300ms");

  assertEquals(exited, false, `the consumer died:\n${proc.output()}`);
  proc.kill("SIGTERM");
  const { code, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 0, output);
  assert(!output.includes("    at "), `no stack trace expected:\n${output}`);
});

Deno.test("a running consumer shows its role as application_name in pg_stat_activity", async () => {
  await using db = await testDb();
  await using proc = consumer(db.url);
  await waitForOutput(proc, STARTED);
  const names = await db.sql<{ application_name: string }[]>`
    select distinct application_name from pg_stat_activity
    where datname = current_database() and pid <> pg_backend_pid()`;
  assert(
    names.some((r) => r.application_name === "shoal consumer"),
    JSON.stringify(names),
  );
  proc.kill("SIGTERM");
  assertEquals((await exitWithin(proc, 20_000)).code, 0);
});

Deno.test("--role consumer on an empty database refuses until migrated, and --migrate starts it", async () => {
  await using db = await emptyDb();
  await using refused = consumer(db.url);
  const { code, output } = await exitWithin(refused, 20_000);
  assertEquals(code, 1, output);
  const lines = output.trim().split("\n");
  assertEquals(lines.length, 1, output);
  assert(lines[0]!.includes("run shoal migrate (or start with --migrate)"), output);

  await using started = consumer(db.url, ["--migrate"]);
  await waitForOutput(started, STARTED);
  const [row] = await db.sql<{ present: boolean }[]>`
    select to_regclass('shoal.jobs') is not null as present`;
  assertEquals(row!.present, true);
  started.kill("SIGTERM");
  assertEquals((await exitWithin(started, 20_000)).code, 0);
});

/** How many runs of other jobs started after `after` (a test_runs id) and before job `id`'s. */
async function startedBefore(sql: Sql, id: string, after: number): Promise<number> {
  const [row] = await sql<{ n: number }[]>`
    select count(*)::int as n from test_runs r
    where r.id > ${after}::bigint
      and r.id < (select min(x.id) from test_runs x where x.job_id = ${id}::bigint)`;
  return row!.n;
}

async function lastRunId(sql: Sql): Promise<number> {
  const [row] = await sql<{ id: number }[]>`select coalesce(max(id), 0)::int as id from test_runs`;
  return row!.id;
}

Deno.test("jobs that rank ahead of a full prefetch buffer start first: an urgent job, a quiet key's burst", async () => {
  await using db = await testDb();
  await createRunsTable(db.sql);
  // 4 slots of 10 ms jobs: about 400 jobs/s, so the buffer holds about 100 of key A's jobs
  // and claims again once it is down to about 50.
  await enqueueMany(
    db.sql,
    Array.from({ length: 1_000 }, () => ({
      task: "test.record",
      payload: { ms: 10 },
      fairnessKey: "A",
    })),
  );
  await using c = consumer(db.url, ["--concurrency", "4", "--poll-interval", "30s"]);
  await waitFor("the buffer to fill", async () => (await lastRunId(db.sql)) >= 150, 30_000);
  const [buffered] = await db.sql<{ n: number }[]>`
    select count(*)::int as n from shoal.jobs j
    where j.attempts > 0 and not exists (select from test_runs r where r.job_id = j.id)`;
  assert(buffered!.n >= 25, `only ${buffered!.n} jobs were claimed ahead of their start`);

  const before = await lastRunId(db.sql);
  const urgent = await enqueue(db.sql, "test.record", { ms: 0 }, { priority: 5, fairnessKey: "A" });
  await waitFor(
    "the urgent job to start",
    async () => (await db.sql`select 1 from test_runs where job_id = ${urgent}::bigint`).length > 0,
    20_000,
  );
  const overtaken = await startedBefore(db.sql, urgent, before);
  assert(overtaken <= 10, `${overtaken} buffered jobs started before the urgent one`);

  // A quiet key's 30 jobs are stamped ahead of A's next job: they start before the buffer.
  const mark = await lastRunId(db.sql);
  const burst = await enqueueMany(
    db.sql,
    Array.from(
      { length: 30 },
      () => ({ task: "test.record", payload: { ms: 0 }, fairnessKey: "B" }),
    ),
  );
  const lastB = burst[burst.length - 1]!.id;
  await waitFor(
    "key B's jobs to start",
    async () => (await db.sql`select 1 from test_runs where job_id = ${lastB}::bigint`).length > 0,
    20_000,
  );
  const aMeanwhile = await startedBefore(db.sql, lastB, mark) - (burst.length - 1);
  assert(aMeanwhile <= 10, `${aMeanwhile} of key A's jobs started before key B's last`);
  c.kill("SIGTERM");
  assertEquals((await exitWithin(c, 20_000)).code, 0);
});

Deno.test("shoal status tells a consumer's running jobs from those waiting in its prefetch buffer", async () => {
  await using db = await testDb();
  // Quick jobs set the pace (the buffer holds a quarter second of it); then two sleepers take
  // both slots (one for 8 s, one for good) and 100 more wait behind them, some in the buffer.
  await enqueueMany(db.sql, Array.from({ length: 400 }, () => ({ task: "shoal.noop" })));
  const short = await enqueue(db.sql, "shoal.sleep", { ms: 8_000 });
  await enqueue(db.sql, "shoal.sleep", { ms: 600_000 });
  await enqueueMany(
    db.sql,
    Array.from({ length: 100 }, () => ({ task: "shoal.sleep", payload: { ms: 600_000 } })),
  );
  // A heartbeat every third of the 2 s visibility timeout records buffered jobs that started.
  await using proc = consumer(db.url, ["--concurrency", "2", "--prefetch", "50"]);
  const queue = async () => {
    const { code, stdout, stderr } = await runShoal(["status", "--json"], { url: db.url });
    assertEquals(code, 0, stderr);
    return JSON.parse(stdout).queues.find((q: { queue: string }) => q.queue === "default");
  };
  const claimed = async () => {
    const [row] = await db.sql<{ n: number }[]>`
      select count(*)::int as n from shoal.jobs where locked_by is not null`;
    return row!.n;
  };

  // Both slots run a sleeper; the buffer holds the rest of what the consumer claimed.
  const first = await waitFor(
    "two running and some prefetched",
    async () => {
      const q = await queue();
      return q.running === 2 && q.prefetched > 0 ? q : null;
    },
    20_000,
    200,
  );
  assertEquals(first.prefetched, (await claimed()) - 2, JSON.stringify(first));
  assertEquals(first.ready + first.prefetched, 100, JSON.stringify(first));
  const text = await runShoal(["status"], { url: db.url });
  assert(text.stdout.includes("running  prefetched  dead"), text.stdout);
  assert(
    new RegExp(`^default\\s+${first.ready}\\s+0\\s+2\\s+${first.prefetched}\\s+0\\s`, "m")
      .test(text.stdout),
    text.stdout,
  );

  // The short sleeper ends: a buffered job takes its slot and, at the next heartbeat at
  // most, counts as running; the buffer is one shorter.
  await waitFor(
    "the short sleeper to finish",
    async () => {
      const [row] = await db.sql`select 1 from shoal.jobs where id = ${short}::bigint`;
      return row === undefined;
    },
    20_000,
    200,
  );
  await waitFor(
    "the started job to count as running",
    async () => {
      const q = await queue();
      return q.running === 2 && q.prefetched === first.prefetched - 1;
    },
    5_000,
    200,
  );

  proc.kill("SIGTERM");
  const { code, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 0, output);
  // Handed back or released: neither running nor prefetched (the 100 and the long sleeper).
  const after = await queue();
  assertEquals([after.running, after.prefetched, after.ready], [0, 0, 101], JSON.stringify(after));
});
