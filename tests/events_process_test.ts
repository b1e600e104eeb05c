/**
 * Events with real `shoal --role consumer` processes (tests/fixtures/workflow_main.ts) and a
 * real `shoal event emit` (`deno run -A main.ts event emit ...`): a job waits for its event
 * while its consumer is SIGKILLed and another starts; the event emitted from the command line
 * resumes it once, and it finishes once.
 */
import { assertEquals } from "./assert.ts";
import {
  exitWithin,
  runShoal,
  type ShoalProcess,
  testDb,
  waitFor,
  waitForOutput,
} from "./helpers.ts";
import { enqueue } from "../lib/queue.ts";
import { createWorkflowTables, jobCount, STARTED, workflowConsumer } from "./workflow_processes.ts";

Deno.test("ctx.waitForEvent: the consumer SIGKILLed while its job waits, another started; shoal event emit resumes the job once and it finishes once", async () => {
  await using db = await testDb();
  await createWorkflowTables(db.sql);
  const first = workflowConsumer(db.url);
  let second: ShoalProcess | null = null;
  try {
    await waitForOutput(first, STARTED);
    const id = await enqueue(db.sql, "test.approval", { key: "order-42" });
    await waitFor("the job waiting for its event", () =>
      db.sql`
        select 1 from shoal.job_steps s join shoal.jobs j on j.id = s.job_id
        where s.job_id = ${id}::bigint and s.kind = 'wait' and s.wait_state = 'waiting'
          and j.locked_by is null`
        .then((rows) => rows.length === 1));
    first.kill("SIGKILL");
    await first.exited();
    second = workflowConsumer(db.url);
    await waitForOutput(second, STARTED);
    assertEquals(await jobCount(db.sql), 1, "still waiting after the restart");

    const emitted = await runShoal(
      ["event", "emit", "approved", "--key", "order-42", "--payload", '{"by":"ana"}'],
      { url: db.url },
    );
    assertEquals([emitted.code, emitted.stderr], [0, ""]);
    assertEquals(emitted.stdout, "Event approved emitted: 1 waiting job received it\n");
    await waitFor("the job finished", async () => await jobCount(db.sql) === 0, 20_000, 100);

    const again = await runShoal(
      ["event", "emit", "approved", "--key", "order-42", "--payload", '{"by":"bob"}'],
      { url: db.url },
    );
    assertEquals(again.stdout, "Event approved emitted: 0 waiting jobs received it\n");
    const done = await db.sql<{ effect: string; attempt: number; pid: number }[]>`
      select effect, attempt, pid from test_effects order by id`;
    assertEquals(
      done.map((e) => [e.effect, e.attempt]),
      [["charge", 1], ["ship by ana", 1]],
      "each step once; the wait counted no attempt",
    );
    assertEquals(done[1]!.pid, second.child.pid);
    const runs = await db.sql<{ pid: number }[]>`select pid from test_marks order by id`;
    assertEquals(
      runs.map((r) => r.pid),
      [first.child.pid, second.child.pid],
      "one run before the wait, one after the event: resumed once",
    );
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
