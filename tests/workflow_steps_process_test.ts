/**
 * Durable workflows with real `shoal --role consumer` processes (tests/fixtures/workflow_main.ts)
 * and real signals: a worker SIGSTOPped inside ctx.transaction past its deadline, a worker
 * SIGKILLed between steps, a consumer restarted while its job sleeps, `shoal cancel` of
 * executions whose jobs sleep, wait for an event or wait on a dependency. Effects are rows the
 * tasks write inside their transactions, counted by the database.
 */
import { assert, assertEquals } from "./assert.ts";
import {
  exitWithin,
  runShoal,
  type ShoalProcess,
  sleep,
  testDb,
  waitFor,
  waitForOutput,
} from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import { enqueue } from "../lib/queue.ts";
import {
  createWorkflowTables,
  jobCount,
  STARTED,
  WORKFLOW_MAIN,
  workflowConsumer,
} from "./workflow_processes.ts";
import { startExecution, startWorkflow } from "../lib/execution.ts";
import { emitEvent } from "../lib/events.ts";
import { pruneSteps } from "../lib/steps.ts";

interface Row {
  attempt: number;
  pid: number;
  what: string;
}

async function effects(sql: Sql): Promise<Row[]> {
  return [
    ...await sql<Row[]>`
    select attempt, pid, effect as what from test_effects order by id`,
  ];
}

async function marks(sql: Sql): Promise<Row[]> {
  return [...await sql<Row[]>`select attempt, pid, mark as what from test_marks order by id`];
}

async function stop(proc: ShoalProcess): Promise<void> {
  proc.kill("SIGTERM");
  const exit = await exitWithin(proc, 20_000);
  assertEquals(exit.code, 0, exit.output.slice(-2000));
}

Deno.test("ctx.transaction: a worker SIGSTOPped inside it past its deadline, redelivered and completed elsewhere, rolls back on SIGCONT: the effect commits once", async () => {
  await using db = await testDb();
  await createWorkflowTables(db.sql);
  const first = workflowConsumer(db.url);
  let second: ShoalProcess | null = null;
  try {
    await waitForOutput(first, STARTED);
    // The first attempt waits 4 s inside its open transaction, deaf to its signal: only the
    // token check at commit can keep its effect out.
    await enqueue(db.sql, "test.tx_effect", { ms: 4000 });
    await waitFor(
      "the first worker inside its transaction",
      async () => (await marks(db.sql)).length === 1,
    );
    first.kill("SIGSTOP");
    // Past its 2 s visibility deadline: no heartbeat extends it any more.
    await waitFor(
      "the job's deadline to pass",
      async () => {
        const [row] = await db.sql<{ due: boolean }[]>`
        select run_at < now() as due from shoal.jobs`;
        return row?.due;
      },
      10_000,
      100,
    );
    second = workflowConsumer(db.url);
    await waitFor(
      "the job completed by the second worker",
      async () => await jobCount(db.sql) === 0,
      20_000,
      100,
    );
    assertEquals((await effects(db.sql)).map((e) => [e.attempt, e.pid]), [
      [2, second.child.pid],
    ]);
    first.kill("SIGCONT");
    // The first worker's pause ends, its transaction reaches the ack, finds the token moved
    // on and rolls back; it says so in its log.
    await waitForOutput(first, "its transaction rolled back");
    await sleep(500);
    assertEquals(
      (await marks(db.sql)).map((m) => [m.attempt, m.pid]),
      [[1, first.child.pid], [2, second.child.pid]],
      "the first worker did get inside its transaction",
    );
    const all = await effects(db.sql);
    assertEquals(all.length, 1, "the effect table holds the effect exactly once");
    assertEquals(all[0]!.pid, second.child.pid);
    const [open] = await db.sql<{ n: number }[]>`
      select count(*)::int as n from pg_stat_activity
      where datname = current_database() and state like 'idle in transaction%'`;
    assertEquals(open!.n, 0, "the stale transaction ended");
    await stop(first);
    await stop(second);
  } finally {
    first.kill("SIGCONT");
    first.kill("SIGKILL");
    second?.kill("SIGKILL");
    await first.exited();
    await second?.exited();
  }
});

Deno.test("ctx.step: a consumer SIGKILLed after step one committed; on redelivery step one does not rerun and step two runs once", async () => {
  await using db = await testDb();
  await createWorkflowTables(db.sql);
  const first = workflowConsumer(db.url);
  let second: ShoalProcess | null = null;
  try {
    await waitForOutput(first, STARTED);
    const id = await enqueue(db.sql, "test.steps", {});
    await waitFor(
      "step one committed",
      async () => (await marks(db.sql)).some((m) => m.what === "after-one"),
    );
    first.kill("SIGKILL");
    assertEquals((await first.exited()).signal, "SIGKILL");
    second = workflowConsumer(db.url);
    await waitFor(
      "the job finished on the second consumer",
      async () => await jobCount(db.sql) === 0,
      20_000,
      100,
    );
    assertEquals((await effects(db.sql)).map((e) => [e.what, e.attempt, e.pid]), [
      ["one", 1, first.child.pid],
      [`two after ${first.child.pid}`, 2, second.child.pid],
    ], "step one ran once, and its recorded result reached step two");
    const recorded = await db.sql<{ name: string }[]>`
      select name from shoal.job_steps where job_id = ${id}::bigint order by name`;
    assertEquals(recorded.map((r) => r.name), ["one", "two"]);
    await stop(second);
  } finally {
    first.kill("SIGKILL");
    second?.kill("SIGKILL");
    await first.exited();
    await second?.exited();
  }
});

Deno.test("ctx.sleep: the consumer restarted (SIGTERM, a new process) while its job sleeps; the job resumes after the time with its steps intact and finishes once", async () => {
  await using db = await testDb();
  await createWorkflowTables(db.sql);
  const first = workflowConsumer(db.url);
  let second: ShoalProcess | null = null;
  try {
    await waitForOutput(first, STARTED);
    const id = await enqueue(db.sql, "test.sleepy", { sleep: "4s" });
    const [sleep] = await waitFor("the job asleep", () =>
      db.sql<{ wake_at: Date }[]>`
        select s.wake_at from shoal.job_steps s join shoal.jobs j on j.id = s.job_id
        where s.job_id = ${id}::bigint and s.kind = 'sleep' and j.locked_by is null`
        .then((rows) => rows.length === 1 ? rows : null));
    // Asleep, the job holds no slot of the consumer: it stops at once.
    await stop(first);
    second = workflowConsumer(db.url);
    await waitForOutput(second, STARTED);
    assertEquals(await jobCount(db.sql), 1, "still asleep after the restart");
    await waitFor(
      "the job finished after its sleep",
      async () => await jobCount(db.sql) === 0,
      20_000,
      100,
    );
    const done = await effects(db.sql);
    assertEquals(
      done.map((e) => [e.what, e.attempt]),
      [["charge", 1], ["ship", 1]],
      "each step once; the sleep counted no attempt",
    );
    assertEquals(done[1]!.pid, second.child.pid);
    const [ship] = await db.sql<{ at: Date }[]>`
      select at from test_effects where effect = 'ship'`;
    assert(ship!.at.getTime() >= sleep!.wake_at.getTime(), "ship ran after the wake time");
    assertEquals((await marks(db.sql)).map((m) => [m.pid, m.attempt]), [
      [first.child.pid, 1],
      [second.child.pid, 1],
    ], "one run before the sleep, one after");
    await stop(second);
  } finally {
    first.kill("SIGKILL");
    second?.kill("SIGKILL");
    await first.exited();
    await second?.exited();
  }
});

Deno.test("ctx.transaction: a frozen worker's open transaction is ended by Postgres after its task's timeout, so a redelivered run writing the same unique row is not blocked for good", async () => {
  await using db = await testDb();
  await createWorkflowTables(db.sql);
  await db.sql`
    create table test_unique_effects (
      job_id bigint primary key, attempt integer not null, pid integer not null)`;
  const first = workflowConsumer(db.url);
  let second: ShoalProcess | null = null;
  try {
    await waitForOutput(first, STARTED);
    await enqueue(db.sql, "test.tx_unique", {});
    await waitFor(
      "the first worker inside its transaction",
      async () => (await marks(db.sql)).length === 1,
    );
    first.kill("SIGSTOP");
    second = workflowConsumer(db.url);
    // Redelivered after the 2 s deadline, its insert waits on the frozen transaction's row until
    // Postgres ends that transaction (idle for the task's 3 s timeout).
    await waitFor(
      "the job completed by the second worker",
      async () => await jobCount(db.sql) === 0,
      20_000,
      100,
    );
    const rows = await db.sql<{ attempt: number; pid: number }[]>`
      select attempt, pid from test_unique_effects`;
    assertEquals(rows.map((r) => [r.attempt, r.pid]), [[2, second.child.pid]]);
    first.kill("SIGCONT");
    await stop(second);
    await stop(first);
  } finally {
    first.kill("SIGCONT");
    first.kill("SIGKILL");
    second?.kill("SIGKILL");
    await first.exited();
    await second?.exited();
  }
});

Deno.test("shoal cancel of executions whose jobs sleep, wait for an event or wait on a dependency: each job is gone at once, none wakes to run, an emit reaches nothing, the records are pruned", async () => {
  await using db = await testDb();
  await createWorkflowTables(db.sql);
  const proc = workflowConsumer(db.url);
  try {
    await waitForOutput(proc, STARTED);
    const sleeping = await startExecution(db.sql, {
      task: "test.sleepy",
      payload: { sleep: "2s" },
    });
    const waiting = await startExecution(db.sql, {
      task: "test.approval",
      payload: { key: "cancel-me" },
    });
    // Its first step sleeps; its second is held until the first completes.
    const workflow = await startWorkflow(db.sql, {
      steps: [
        { id: "a", task: "test.sleepy", payload: { sleep: "2s" } },
        { id: "b", task: "test.dag", payload: { step: "b" }, after: ["a"] },
      ],
    });
    const executions = [sleeping, waiting, workflow];
    // Every job handed back by its sleep or wait (no consumer holds it), the held one held.
    await waitFor(
      "two jobs asleep, one waiting, one held",
      async () => {
        const [row] = await db.sql<{ asleep: number; waits: number; held: number }[]>`
        select
          (select count(*)::int from shoal.jobs j join shoal.job_steps s on s.job_id = j.id
           where s.kind = 'sleep' and j.locked_by is null) as asleep,
          (select count(*)::int from shoal.jobs j join shoal.job_steps s on s.job_id = j.id
           where s.wait_state = 'waiting' and j.locked_by is null) as waits,
          (select count(*)::int from shoal.held_jobs) as held`;
        return row!.asleep === 2 && row!.waits === 1 && row!.held === 1;
      },
      20_000,
      100,
    );
    for (const id of executions) {
      const cancel = await runShoal(["cancel", id], { url: db.url, mainModule: WORKFLOW_MAIN });
      assertEquals([cancel.code, cancel.stdout], [0, `Cancelled execution ${id}\n`], cancel.stderr);
    }
    // Gone at once: nothing of theirs is left to wake, be claimed, or be released.
    const [left] = await db.sql<{ jobs: number; held: number; edges: number; statuses: string }[]>`
      select (select count(*)::int from shoal.jobs) as jobs,
        (select count(*)::int from shoal.held_jobs) as held,
        (select count(*)::int from shoal.job_dependencies) as edges,
        (select string_agg(status, ',' order by id) from shoal.executions
         where id = any(${executions}::bigint[])) as statuses`;
    assertEquals(left, { jobs: 0, held: 0, edges: 0, statuses: "cancelled,cancelled,cancelled" });
    assertEquals(await emitEvent(db.sql, "approved", "cancel-me", { by: "late" }), 0);
    // Past the sleeps' wake time, with the consumer polling: no run started after the cancel,
    // no step after a sleep or the wait committed, nothing reappeared.
    await sleep(3000);
    assertEquals(
      (await marks(db.sql)).map((m) => m.what),
      ["run", "run", "run"],
      "one run of each job before the cancel, none after",
    );
    assertEquals(
      (await effects(db.sql)).map((e) => e.what).sort(),
      ["charge", "charge", "charge"],
      "only the steps before the sleeps and the wait",
    );
    assertEquals(await jobCount(db.sql), 0);
    // Their sleep and wait records (and steps) go with the reaper's step retention.
    assertEquals(await pruneSteps(db.sql, { olderThanMs: 0, limit: 100 }), 6);
    const [records] = await db.sql<{ n: number }[]>`select count(*)::int as n from shoal.job_steps`;
    assertEquals(records!.n, 0);
    await stop(proc);
  } finally {
    proc.kill("SIGKILL");
    await proc.exited();
  }
});
