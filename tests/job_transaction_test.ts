/**
 * ctx.transaction (lib/job_transaction.ts, lib/run_job.ts): a handler's writes, its enqueues
 * through the transaction and the job's ack commit together, only while the claim's token is
 * current. Real claims against a real Postgres; the claim is moved on by the real release()
 * (what a shutdown or a redelivery does to the token), not by faking a row.
 */
import { assertEquals, assertRejects } from "./assert.ts";
import { testDb } from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import { logger } from "../lib/log.ts";
import { claim, enqueue, type Job, release } from "../lib/queue.ts";
import { getExecution, startExecution } from "../lib/execution.ts";
import { type AnyTask, defineTask, TaskRegistry } from "../lib/tasks.ts";
import { ClaimLostError, JobRun, type RunEnv } from "../lib/run_job.ts";

function env(sql: Sql, tasks: AnyTask[]): RunEnv {
  return { sql, tasks: new TaskRegistry(tasks), log: logger("consumer"), taskTimeoutMs: 10_000 };
}

async function claimed(sql: Sql, task: string, execution = false): Promise<Job> {
  if (execution) await startExecution(sql, { task, payload: {} });
  else await enqueue(sql, task, {});
  const { jobs } = await claim(sql, {
    queues: ["default"],
    limit: 1,
    workerId: "w",
    visibilityMs: 60_000,
  });
  return jobs[0]!;
}

async function prepare(sql: Sql): Promise<void> {
  await sql`create table test_effects (job_id bigint not null, effect text not null)`;
}

async function effects(sql: Sql): Promise<string[]> {
  const rows = await sql<{ effect: string }[]>`select effect from test_effects order by effect`;
  return rows.map((r) => r.effect);
}

async function jobsLeft(sql: Sql): Promise<string[]> {
  const rows = await sql<{ task: string }[]>`select task from shoal.jobs order by id`;
  return rows.map((r) => r.task);
}

Deno.test("ctx.transaction() commits the handler's writes, its enqueue and the ack together", async () => {
  await using db = await testDb();
  await prepare(db.sql);
  const task = defineTask({
    name: "t.tx",
    async handler(_p, ctx) {
      return await ctx.transaction(async (tx) => {
        await tx`insert into test_effects values (${ctx.job.id}::bigint, 'charged')`;
        await enqueue(tx, "t.next", { after: ctx.job.id });
        return { charged: true };
      });
    },
  });
  const job = await claimed(db.sql, "t.tx");
  const run = new JobRun(job, env(db.sql, [task]));
  await run.settled;
  assertEquals(run.state, "committed");
  assertEquals(await effects(db.sql), ["charged"]);
  assertEquals(await jobsLeft(db.sql), ["t.next"], "acked, and the enqueue committed with it");
});

Deno.test("ctx.transaction() completes a job of an execution with its function's value", async () => {
  await using db = await testDb();
  await prepare(db.sql);
  const task = defineTask({
    name: "t.tx_exec",
    async handler(_p, ctx) {
      await ctx.transaction(async (tx) => {
        await tx`insert into test_effects values (${ctx.job.id}::bigint, 'done')`;
        return { n: 42 };
      });
      return { ignored: true };
    },
  });
  const job = await claimed(db.sql, "t.tx_exec", true);
  const run = new JobRun(job, env(db.sql, [task]));
  await run.settled;
  assertEquals(run.state, "committed");
  const execution = await getExecution(db.sql, job.execution_id!);
  assertEquals([execution?.status, execution?.result], ["completed", { n: 42 }]);
  assertEquals(await jobsLeft(db.sql), []);
});

Deno.test("ctx.transaction() of a claim that moved on rolls its writes and enqueues back: the run is lost", async () => {
  await using db = await testDb();
  await prepare(db.sql);
  let release_: (() => void) | undefined;
  const released = new Promise<void>((resolve) => (release_ = resolve));
  let outcome: unknown = "not thrown";
  const task = defineTask({
    name: "t.tx_stale",
    async handler(_p, ctx) {
      try {
        await ctx.transaction(async (tx) => {
          await tx`insert into test_effects values (${ctx.job.id}::bigint, 'stale')`;
          await enqueue(tx, "t.next", {});
          // The claim moves on while the transaction is open (as a redelivery would).
          await released;
        });
      } catch (error) {
        outcome = error;
        throw error;
      }
    },
  });
  const job = await claimed(db.sql, "t.tx_stale");
  const run = new JobRun(job, env(db.sql, [task]));
  assertEquals(await release(db.sql, [job]), [job.id], "the token moved on");
  release_!();
  await run.settled;
  assertEquals(run.state, "lost");
  await assertRejects(() => Promise.reject(outcome), ClaimLostError, "lost its claim");
  assertEquals(await effects(db.sql), [], "the stale worker's effect never committed");
  assertEquals(await jobsLeft(db.sql), ["t.tx_stale"], "no enqueue, no ack");
});

Deno.test("ctx.transaction() whose function throws rolls back and fails the run; a second call is refused", async () => {
  await using db = await testDb();
  await prepare(db.sql);
  const failing = defineTask({
    name: "t.tx_throw",
    async handler(_p, ctx) {
      await ctx.transaction(async (tx) => {
        await tx`insert into test_effects values (${ctx.job.id}::bigint, 'half')`;
        throw new Error("card declined");
      });
    },
  });
  const run = new JobRun(await claimed(db.sql, "t.tx_throw"), env(db.sql, [failing]));
  await run.settled;
  assertEquals([run.state, (run.error as Error).message], ["failed", "card declined"]);
  assertEquals(await effects(db.sql), []);

  let refused: (error: unknown) => void;
  const refusal = new Promise<unknown>((resolve) => (refused = resolve));
  const twice = defineTask({
    name: "t.tx_twice",
    async handler(_p, ctx) {
      await ctx.transaction(() => 1);
      refused(await ctx.transaction(() => 2).then(() => "not refused", (error) => error));
    },
  });
  await db.sql`delete from shoal.jobs`;
  const second = new JobRun(await claimed(db.sql, "t.tx_twice"), env(db.sql, [twice]));
  await second.settled;
  // The first committed the job: the run is over, and the refused second call changes nothing.
  assertEquals(second.state, "committed");
  assertEquals(
    ((await refusal) as Error).message,
    "A job completes in one transaction: ctx.transaction was already called",
  );
  assertEquals(await jobsLeft(db.sql), []);
});

Deno.test("ctx.transaction() opens a fan-out asked for before it, with the handler's writes, in one commit", async () => {
  await using db = await testDb();
  await prepare(db.sql);
  const task = defineTask({
    name: "t.tx_fan",
    async handler(_p, ctx) {
      ctx.fanOut({
        children: [{ task: "t.child", payload: { i: 0 } }, { task: "t.child", payload: { i: 1 } }],
        callback: { task: "t.callback" },
      });
      await ctx.transaction(async (tx) => {
        await tx`insert into test_effects values (${ctx.job.id}::bigint, 'fanned')`;
      });
    },
  });
  const job = await claimed(db.sql, "t.tx_fan");
  const run = new JobRun(job, env(db.sql, [task]));
  await run.settled;
  assertEquals(run.state, "committed");
  assertEquals(await effects(db.sql), ["fanned"]);
  assertEquals(await jobsLeft(db.sql), ["t.child", "t.child"], "the parent acked, children in");
  const [barriers] = await db.sql<{ n: number }[]>`select count(*)::int as n from shoal.barriers`;
  assertEquals(barriers!.n, 1);
});
