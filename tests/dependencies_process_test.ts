/**
 * Dependencies with real `shoal --role consumer` processes (tests/fixtures/workflow_main.ts,
 * task `test.dag`) and a real SIGKILL: a diamond workflow whose middle step's process dies
 * mid-run, finished by a second consumer; every step's effect commits once, and each result
 * reaches the steps after it.
 */
import { assertEquals } from "./assert.ts";
import { exitWithin, type ShoalProcess, testDb, waitFor, waitForOutput } from "./helpers.ts";
import { getExecution, startWorkflow } from "../lib/execution.ts";
import { createWorkflowTables, workflowConsumer } from "./workflow_processes.ts";

Deno.test("a workflow a -> (b, c) -> d -> e runs to completion across a SIGKILL mid-DAG, each step committing once", async () => {
  await using db = await testDb();
  const sql = db.sql;
  await createWorkflowTables(sql);
  const first = workflowConsumer(db.url);
  let second: ShoalProcess | null = null;
  try {
    await waitForOutput(first, "started on");
    const execution = await startWorkflow(sql, {
      steps: [
        { id: "a", task: "test.dag", payload: { step: "a" } },
        { id: "b", task: "test.dag", payload: { step: "b", hang: true }, after: ["a"] },
        { id: "c", task: "test.dag", payload: { step: "c" }, after: ["a"] },
        // d enqueues e after itself, in the transaction that completes it.
        { id: "d", task: "test.dag", payload: { step: "d", then: "e" }, after: ["b", "c"] },
      ],
    });
    await waitFor("step b hanging in the first consumer", async () => {
      const rows = await sql`select 1 from test_marks where mark = 'hanging'`;
      return rows.length === 1;
    });
    first.kill("SIGKILL");
    assertEquals((await first.exited()).signal, "SIGKILL");
    second = workflowConsumer(db.url);
    const done = await waitFor(
      "the execution to complete",
      async () => {
        const e = await getExecution(sql, execution);
        return e?.status === "completed" ? e : null;
      },
      30_000,
      100,
    );
    assertEquals(done.result, "e(d(b(a()),c(a())))");

    const effects = await sql<{ effect: string; attempt: number; pid: number }[]>`
      select effect, attempt, pid from test_effects order by effect`;
    assertEquals(effects.map((e) => e.effect), [
      "a()",
      "b(a())",
      "c(a())",
      "d(b(a()),c(a()))",
      "e(d(b(a()),c(a())))",
    ], "each step's effect committed exactly once");
    const b = effects.find((e) => e.effect === "b(a())")!;
    assertEquals([b.attempt, b.pid], [2, second.child.pid], "b finished on the second consumer");
    const [left] = await sql<{ n: number }[]>`
      select (select count(*) from shoal.jobs) + (select count(*) from shoal.held_jobs)
        + (select count(*) from shoal.job_dependencies) + (select count(*) from shoal.job_results)
        as n`;
    assertEquals(Number(left!.n), 0);
    second.kill("SIGTERM");
    const exit = await exitWithin(second, 20_000);
    assertEquals(exit.code, 0, exit.output.slice(-2000));
  } finally {
    first.kill("SIGKILL");
    second?.kill("SIGKILL");
    await first.exited();
    await second?.exited();
  }
});
