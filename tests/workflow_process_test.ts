/**
 * Fan-out / fan-in with real `shoal --role consumer` processes (tests/fixtures/test_main.ts):
 * consumers SIGKILLed mid-fan-out, a callback that crashes, `shoal cancel` aborting running
 * handlers, and `shoal status --json` showing an open fan-out. The tasks record what they
 * saw in tables; triggers record every callback insert and execution status change, so
 * "exactly once" is counted inside the database, not inferred.
 */
import { assert, assertEquals } from "./assert.ts";
import {
  auditTransitions,
  createRunsTable,
  exitWithin,
  runShoal,
  type ShoalProcess,
  sleep,
  spawnShoal,
  TEST_MAIN,
  testDb,
  transitions,
  waitFor,
  waitForOutput,
} from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import { completeJobs, fanOut } from "../lib/barrier.ts";
import { failExecution, startExecution } from "../lib/execution.ts";
import { claim } from "../lib/queue.ts";

/** Written once the consumer loop runs. */
const STARTED = "started on";

function consumer(url: string, queues: string, flags: string[] = []): ShoalProcess {
  return spawnShoal([
    "--role",
    "consumer",
    "--queues",
    queues,
    "--concurrency",
    "20",
    "--poll-interval",
    "100ms",
    "--visibility-timeout",
    "2s",
    "--shutdown-grace",
    "1s",
    "--log-format",
    "json",
    ...flags,
  ], { url, mainModule: TEST_MAIN });
}

/** SIGTERM each process and check it exits 0 (a hung one is killed and fails the test). */
async function stopAll(procs: ShoalProcess[]): Promise<void> {
  for (const p of procs) p.kill("SIGTERM");
  const exits = await Promise.all(procs.map((p) => exitWithin(p, 20_000)));
  for (const e of exits) assertEquals(e.code, 0, e.output.slice(-2000));
}

/**
 * The tables the fixture's tasks write (`test_runs`, `test_callbacks`) and the audit the
 * database keeps: every job insert of `test.collect`, every execution status change, and
 * every job claimed for a second time or more.
 */
async function prepare(sql: Sql): Promise<void> {
  await createRunsTable(sql);
  await sql`
    create table test_callbacks (
      id bigint generated always as identity primary key,
      job_id bigint not null, attempt integer not null, pid integer not null,
      results jsonb not null, at timestamptz not null default clock_timestamp())`;
  await sql`create table test_inserts (task text not null)`;
  await sql`
    create function test_audit_insert() returns trigger language plpgsql as $$
    begin
      insert into test_inserts (task) values (new.task);
      return null;
    end $$`;
  await sql`
    create trigger test_audit_insert after insert on shoal.jobs
    for each row when (new.task = 'test.collect') execute function test_audit_insert()`;
  await auditTransitions(sql);
  await sql`create table test_redelivered (job_id bigint primary key)`;
  await sql`
    create function test_audit_redelivery() returns trigger language plpgsql as $$
    begin
      insert into test_redelivered (job_id) values (new.id) on conflict do nothing;
      return null;
    end $$`;
  await sql`
    create trigger test_audit_redelivery after update of attempts on shoal.jobs
    for each row when (new.attempts > 1) execute function test_audit_redelivery()`;
}

interface CallbackRun {
  attempt: number;
  pid: number;
  results: { i: number; pid: number }[];
}

async function callbackRuns(sql: Sql): Promise<CallbackRun[]> {
  return [
    ...await sql<CallbackRun[]>`select attempt, pid, results from test_callbacks order by id`,
  ];
}

async function count(sql: Sql, table: string): Promise<number> {
  // The table name comes from this file's own fixed list, never from input.
  const [row] = await sql<{ n: number }[]>`select count(*)::int as n from ${sql(table)}`;
  return row!.n;
}

/** Jobs, barriers and arrivals left (all zero once an execution has ended cleanly). */
async function leftovers(sql: Sql): Promise<number[]> {
  return [
    await count(sql, "shoal.jobs"),
    await count(sql, "shoal.barriers"),
    await count(sql, "shoal.arrivals"),
  ];
}

async function execution(
  sql: Sql,
  id: string,
): Promise<{ status: string; error: string | null; result: unknown }> {
  const [row] = await sql<{ status: string; error: string | null; result: unknown }[]>`
    select status, error, result from shoal.executions where id = ${id}::bigint`;
  if (!row) throw new Error(`Execution ${id} does not exist`);
  return { ...row };
}

/** Wait until the execution has ended; returns its status. */
async function ended(sql: Sql, id: string, timeoutMs = 20_000): Promise<string> {
  return await waitFor(
    `execution ${id} to end`,
    async () => {
      const { status } = await execution(sql, id);
      return status === "pending" || status === "running" ? null : status;
    },
    timeoutMs,
    100,
  );
}

async function startChord(sql: Sql, spec: Record<string, unknown>): Promise<string> {
  const [row] = await sql<{ id: string }[]>`
    select shoal.start_execution('work', 'shoal.chord', ${JSON.stringify(spec)}::text::jsonb)
      as id`;
  return row!.id;
}

function range(n: number): number[] {
  return Array.from({ length: n }, (_, i) => i);
}

Deno.test("1,000 children over 3 consumers, one SIGKILLed every 0.5 s: the callback runs once with all results in order", async () => {
  await using db = await testDb();
  await prepare(db.sql);
  // The callback runs on the two consumers that are never killed: a kill in the middle of
  // the callback itself would rightly run it again (at-least-once), which the next test covers.
  const stable = [consumer(db.url, "work,cb"), consumer(db.url, "work,cb")];
  const pids = new Set(stable.map((p) => p.child.pid));
  let victim: ShoalProcess | null = null;
  let kills = 0;
  let heldAtKill = 0;
  try {
    await Promise.all(stable.map((p) => waitForOutput(p, STARTED)));
    const id = await startChord(db.sql, {
      children: range(1000).map((i) => ({ task: "test.child", payload: { i, ms: 250 } })),
      callback: { task: "test.collect", queue: "cb" },
    });
    const deadline = Date.now() + 60_000;
    while (Date.now() < deadline) {
      victim = consumer(db.url, "work");
      pids.add(victim.child.pid);
      // Killed 0.5 s into its work (counted from its start, so every life claims jobs).
      await waitForOutput(victim, STARTED);
      await sleep(500);
      const [held] = await db.sql<{ n: number }[]>`
        select count(*)::int as n from shoal.jobs
        where locked_by = ${`${Deno.hostname()}:${victim.child.pid}`}::text and run_at > now()`;
      victim.kill("SIGKILL");
      const exit = await victim.exited();
      victim = null;
      assertEquals(exit.signal, "SIGKILL");
      kills++;
      heldAtKill += held!.n;
      const { status } = await execution(db.sql, id);
      if (status !== "pending" && status !== "running") break;
    }
    assertEquals(await ended(db.sql, id, 60_000), "completed");

    const runs = await callbackRuns(db.sql);
    assertEquals(runs.length, 1, "the callback ran exactly once");
    assertEquals(runs[0]!.attempt, 1);
    assertEquals(runs[0]!.results.map((r) => r.i), range(1000));
    assert(runs[0]!.results.every((r) => pids.has(r.pid)), "every result came from our consumers");
    assertEquals(await count(db.sql, "test_inserts"), 1, "the callback was enqueued once");
    assertEquals(await execution(db.sql, id), {
      status: "completed",
      error: null,
      result: { count: 1000 },
    });
    assertEquals(await transitions(db.sql, id), ["pending>running", "running>completed"]);
    assertEquals(await leftovers(db.sql), [0, 0, 0]);
    assertEquals(await count(db.sql, "shoal.dead_jobs"), 0);
    // The chaos did hit: consumers died holding children, and children were redelivered.
    assert(kills >= 1 && heldAtKill > 0, `kills ${kills}, jobs held when killed ${heldAtKill}`);
    assert((await count(db.sql, "test_redelivered")) > 0, "some children were redelivered");
  } finally {
    if (victim) {
      victim.kill("SIGKILL");
      await victim.exited();
    }
    await stopAll(stable);
  }
});

Deno.test("a callback that throws on its first attempt is retried and the execution completes once", async () => {
  await using db = await testDb();
  await prepare(db.sql);
  const proc = consumer(db.url, "work");
  try {
    await waitForOutput(proc, STARTED);
    const id = await startExecution(db.sql, {
      task: "test.fanout",
      queue: "work",
      payload: { n: 20, crash: "throw_first" },
    });
    assertEquals(await ended(db.sql, id), "completed");
    const runs = await callbackRuns(db.sql);
    assertEquals(runs.map((r) => r.attempt), [1, 2]);
    for (const run of runs) assertEquals(run.results.map((r) => r.i), range(20));
    assertEquals(await count(db.sql, "test_inserts"), 1);
    assertEquals(await execution(db.sql, id), {
      status: "completed",
      error: null,
      result: { count: 20 },
    });
    assertEquals(await transitions(db.sql, id), ["pending>running", "running>completed"]);
    assertEquals(await leftovers(db.sql), [0, 0, 0]);
    assertEquals(await count(db.sql, "shoal.dead_jobs"), 0);
  } finally {
    await stopAll([proc]);
  }
});

Deno.test("a callback whose consumer is SIGKILLed mid-run is redelivered to another and completes once", async () => {
  await using db = await testDb();
  await prepare(db.sql);
  const worker = consumer(db.url, "work");
  let first: ShoalProcess | null = consumer(db.url, "cb");
  let second: ShoalProcess | null = null;
  try {
    await Promise.all([waitForOutput(worker, STARTED), waitForOutput(first, STARTED)]);
    const id = await startChord(db.sql, {
      children: range(10).map((i) => ({ task: "test.child", payload: { i } })),
      callback: { task: "test.collect", queue: "cb", payload: { crash: "hang_first" } },
    });
    await waitFor("the callback's first run", async () => (await callbackRuns(db.sql)).length);
    const firstPid = first.child.pid;
    first.kill("SIGKILL");
    await first.exited();
    first = null;
    second = consumer(db.url, "cb");
    assertEquals(await ended(db.sql, id), "completed");
    const runs = await callbackRuns(db.sql);
    assertEquals(runs.map((r) => [r.attempt, r.pid]), [[1, firstPid], [2, second.child.pid]]);
    for (const run of runs) assertEquals(run.results.map((r) => r.i), range(10));
    assertEquals(await count(db.sql, "test_inserts"), 1);
    assertEquals(await execution(db.sql, id), {
      status: "completed",
      error: null,
      result: { count: 10 },
    });
    assertEquals(await transitions(db.sql, id), ["pending>running", "running>completed"]);
    assertEquals(await leftovers(db.sql), [0, 0, 0]);
  } finally {
    if (first) {
      first.kill("SIGKILL");
      await first.exited();
    }
    await stopAll(second ? [worker, second] : [worker]);
  }
});

Deno.test("a nested fan-out across processes: the outer callback gets the inner callback's result in order", async () => {
  await using db = await testDb();
  await prepare(db.sql);
  const procs = [consumer(db.url, "work"), consumer(db.url, "work")];
  try {
    await Promise.all(procs.map((p) => waitForOutput(p, STARTED)));
    const id = await startChord(db.sql, {
      children: [
        { task: "test.child", payload: { i: 0 } },
        { task: "test.fanout", payload: { n: 5 } },
        { task: "test.child", payload: { i: 2 } },
      ],
      callback: { task: "test.collect" },
    });
    assertEquals(await ended(db.sql, id), "completed");
    const runs = await callbackRuns(db.sql);
    assertEquals(runs.length, 2);
    assertEquals(runs[0]!.results.map((r) => r.i), range(5));
    const outer: unknown[] = runs[1]!.results;
    assertEquals(
      outer.map((r) => (r as { i?: number }).i ?? r),
      [0, { count: 5 }, 2],
      "the nested callback's result sits in its parent's slot",
    );
    assertEquals(await count(db.sql, "test_inserts"), 2);
    assertEquals((await execution(db.sql, id)).result, { count: 3 });
    assertEquals(await leftovers(db.sql), [0, 0, 0]);
  } finally {
    await stopAll(procs);
  }
});

Deno.test("shoal cancel EXECUTION aborts its running handlers within a heartbeat and leaves nothing", async () => {
  await using db = await testDb();
  await prepare(db.sql);
  // Heartbeat every second (a third of the visibility timeout).
  const proc = consumer(db.url, "work", ["--visibility-timeout", "3s"]);
  try {
    await waitForOutput(proc, STARTED);
    const id = await startChord(db.sql, {
      children: range(5).map((i) => ({
        task: "test.child",
        payload: { i, ms: 60_000, record: true },
      })),
      callback: { task: "test.collect" },
    });
    await waitFor("5 children to run", async () => {
      const [row] = await db.sql<{ n: number }[]>`
        select count(*)::int as n from test_runs where note = 'started'`;
      return row!.n === 5;
    }, 20_000);

    const cancel = await runShoal(["cancel", id], { url: db.url, mainModule: TEST_MAIN });
    assertEquals([cancel.code, cancel.stdout], [0, `Cancelled execution ${id}\n`], cancel.stderr);
    const aborts = await waitFor("5 handlers to see their signal abort", async () => {
      const rows = await db.sql<{ note: string; after_ms: number }[]>`
        select r.note,
          extract(epoch from r.started_at - e.finished_at)::float8 * 1000 as after_ms
        from test_runs r, shoal.executions e
        where e.id = ${id}::bigint and r.note like 'aborted: %'`;
      return rows.length === 5 ? rows : null;
    }, 20_000);
    // One heartbeat is 1 s; allow for a loaded machine, far below the 60 s the handlers sleep.
    for (const a of aborts) {
      assert(a.after_ms < 4000, `aborted ${a.after_ms} ms after the cancel`);
      assert(a.note.startsWith("aborted: The job's claim was lost"), a.note);
    }
    assertEquals(await execution(db.sql, id), { status: "cancelled", error: null, result: null });
    assertEquals(await transitions(db.sql, id), ["pending>running", "running>cancelled"]);
    assertEquals(await callbackRuns(db.sql), []);
    assertEquals(await leftovers(db.sql), [0, 0, 0]);
    assertEquals(await count(db.sql, "shoal.dead_jobs"), 0);

    const again = await runShoal(["cancel", id], { url: db.url, mainModule: TEST_MAIN });
    assertEquals(
      [again.code, again.stdout, again.stderr],
      [1, "", `shoal: Execution ${id} is already cancelled\n`],
    );
    const missing = await runShoal(["cancel", "999999999"], { url: db.url, mainModule: TEST_MAIN });
    assertEquals(
      [missing.code, missing.stdout, missing.stderr],
      [1, "", "shoal: No execution 999999999\n"],
    );
    const bad = await runShoal(["cancel", "x1"], { url: db.url, mainModule: TEST_MAIN });
    assertEquals(
      [bad.code, bad.stderr],
      [2, "shoal: shoal cancel takes one execution id\n"],
    );
  } finally {
    await stopAll([proc]);
  }
});

Deno.test("shoal status --json lists executions with total and arrived for an open fan-out", async () => {
  await using db = await testDb();
  const open = await startExecution(db.sql, { task: "parent", queue: "work" });
  const { jobs: [parent] } = await claim(db.sql, {
    queues: ["work"],
    limit: 1,
    workerId: "w",
    visibilityMs: 60_000,
  });
  await fanOut(db.sql, parent!, {
    children: range(5).map((i) => ({ task: "child", payload: { i } })),
    callback: { task: "cb" },
  });
  const { jobs: children } = await claim(db.sql, {
    queues: ["work"],
    limit: 2,
    workerId: "w",
    visibilityMs: 60_000,
  });
  await completeJobs(db.sql, children.map((c) => ({ ...c, result: c.payload.i })));
  const failed = await startExecution(db.sql, { task: "other", queue: "elsewhere" });
  await failExecution(db.sql, failed, "Given up");
  const pending = await startExecution(db.sql, { task: "other", queue: "elsewhere" });

  const run = await runShoal(["status", "--json"], { url: db.url, mainModule: TEST_MAIN });
  assertEquals(run.code, 0, run.stderr);
  const executions = JSON.parse(run.stdout).executions as Record<string, unknown>[];
  for (const e of executions) {
    assertEquals(
      Object.keys(e).sort(),
      ["arrived", "created_at", "error", "id", "status", "total", "updated_at"],
    );
    assert(!Number.isNaN(Date.parse(e.created_at as string)));
    assert(!Number.isNaN(Date.parse(e.updated_at as string)));
  }
  assertEquals(
    executions.map(({ id, status, error, total, arrived }) => ({
      id,
      status,
      error,
      total,
      arrived,
    })),
    [
      { id: pending, status: "pending", error: null, total: null, arrived: null },
      { id: failed, status: "failed", error: "Given up", total: null, arrived: null },
      { id: open, status: "running", error: null, total: 5, arrived: 2 },
    ],
  );
  const text = await runShoal(["status"], { url: db.url, mainModule: TEST_MAIN });
  assertEquals(text.code, 0, text.stderr);
  const line = text.stdout.split("\n").find((l) => l.startsWith(`${open} `));
  assert(line?.includes(" running ") && line.includes(" 2/5 "), line);
});
