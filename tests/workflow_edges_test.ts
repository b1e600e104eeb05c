import { assertEquals } from "./assert.ts";
import { testDb, waitFor } from "./helpers.ts";
import { connect } from "../lib/db.ts";
import { fanOut } from "../lib/barrier.ts";
import { startExecution } from "../lib/execution.ts";
import { claim, extend, fail } from "../lib/queue.ts";
import { retryDead } from "../lib/dead.ts";
import { runConsumer } from "../lib/consumer.ts";
import { defineTask, TaskRegistry } from "../lib/tasks.ts";

// The consumer, the queue and the dead letters, where they meet executions.
Deno.test("runConsumer() fails a job for good, once, when the database refuses its fan-out", async () => {
  await using db = await testDb();
  await db.sql`alter database ${db.sql(db.name)} set shoal.max_payload_bytes = '100'`;
  const sql = connect(db.url, { applicationName: "shoal test", max: 4 }); // reads the new limit
  try {
    let runs = 0;
    const parent = defineTask({
      name: "parent",
      handler: (_payload, ctx) => {
        runs++;
        ctx.fanOut({
          children: [{ task: "child", payload: { big: "x".repeat(500) } }],
          callback: { task: "cb" },
        });
      },
    });
    const execution = await startExecution(sql, { task: "parent" });
    const stop = new AbortController();
    const done = runConsumer({ sql, tasks: new TaskRegistry([parent]) }, {
      queues: ["default"],
      concurrency: 4,
      visibilityTimeoutMs: 500,
      pollIntervalMs: 50,
      listen: false,
      shutdownGraceMs: 1000,
      taskTimeoutMs: 10_000,
      retryBaseMs: 10,
    }, stop.signal);
    try {
      await waitFor("the execution to fail", async () => {
        const [e] = await sql<{ status: string }[]>`
          select status from shoal.executions where id = ${execution}::bigint`;
        return e!.status === "failed";
      });
    } finally {
      stop.abort();
      await done;
    }
    assertEquals(runs, 1, "the parent ran once, not once per redelivery");
    const [dead] = await sql<
      { id: string; reason: string }[]
    >`select id, reason from shoal.dead_jobs`;
    assertEquals(
      dead!.reason,
      "PermanentError: Cannot fan out: Cannot enqueue job 1: payload is 511 bytes, over the limit of 100 bytes",
    );
    assertEquals((await sql`select 1 from shoal.jobs`).length, 0);
  } finally {
    await sql.end();
  }
});

Deno.test("extend() does not extend a job whose execution has ended", async () => {
  await using db = await testDb();
  const execution = await startExecution(db.sql, { task: "step" });
  await db.sql`select shoal.enqueue('default', 'plain')`;
  const { jobs } = await claim(db.sql, {
    queues: ["default"],
    limit: 10,
    workerId: "w",
    visibilityMs: 60_000,
  });
  const ids = jobs.map((j) => j.id);
  assertEquals((await extend(db.sql, jobs, 1000)).sort(), [...ids].sort());
  // Its row outlived the failure (it was locked at that moment): the heartbeat must let go.
  await db.sql`update shoal.executions set status = 'failed' where id = ${execution}::bigint`;
  assertEquals(
    await extend(db.sql, jobs, 1000),
    jobs.filter((j) => j.execution_id === null).map((j) => j.id),
  );
});

Deno.test("retryDead() keeps a dead job of an ended execution dead", async () => {
  await using db = await testDb();
  await startExecution(db.sql, { task: "parent" });
  const claimAll = () =>
    claim(db.sql, { queues: ["default"], limit: 10, workerId: "w", visibilityMs: 60_000 });
  const { jobs: [parent] } = await claimAll();
  await fanOut(db.sql, parent!, {
    children: [{ task: "c" }, { task: "c" }],
    callback: { task: "cb" },
  });
  const { jobs: [child] } = await claimAll();
  await fail(db.sql, child!, { error: "boom", retryInMs: 0, permanent: true });
  assertEquals(await retryDead(db.sql, child!.id), "execution_ended");
  assertEquals((await db.sql<{ id: string }[]>`select id from shoal.dead_jobs`).map((d) => d.id), [
    child!.id,
  ]);
  assertEquals((await db.sql`select 1 from shoal.jobs`).length, 0);
});

Deno.test("claim() does not hand out the siblings of a job it dead-letters as poison", async () => {
  await using db = await testDb();
  await startExecution(db.sql, { task: "parent" });
  const claimAll = () =>
    claim(db.sql, { queues: ["default"], limit: 10, workerId: "w", visibilityMs: 60_000 });
  const { jobs: [parent] } = await claimAll();
  await fanOut(db.sql, parent!, {
    children: [{ task: "c", maxAttempts: 1 }, { task: "c" }, { task: "c" }],
    callback: { task: "cb" },
  });
  // The first child already used its only attempt (its worker crashed): poison.
  await db.sql`update shoal.jobs set attempts = 1 where child_index = 0`;
  const { jobs, poisoned } = await claimAll();
  assertEquals([jobs.length, poisoned.length], [0, 1]);
  const [e] = await db.sql<{ status: string }[]>`select status from shoal.executions`;
  assertEquals(e!.status, "failed");
  assertEquals((await db.sql`select 1 from shoal.jobs`).length, 0, "siblings removed, unrun");
});
