/**
 * Completer against a real database: batched acks and completions capped per statement,
 * backpressure while statements lag, unsent jobs listed for the heartbeat, and failures,
 * fan-outs and discarded outcomes recorded (or not) through the same door.
 *
 * Two test-only triggers observe and steer the real statements: one logs every deleted
 * job with its transaction id (one ack or complete statement is one transaction), one
 * makes deletes wait on an advisory lock the test holds (a database that lags).
 */
import { assert, assertEquals } from "./assert.ts";
import { gateJobDeletes, testDb, waitFor } from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import { logger } from "../lib/log.ts";
import { claim, enqueueMany, type Job } from "../lib/queue.ts";
import { startExecution } from "../lib/execution.ts";
import { type AnyTask, defineTask, TaskRegistry } from "../lib/tasks.ts";
import { JobRun, type RunEnv } from "../lib/run_job.ts";
import { Completer } from "../lib/completer.ts";

/** Log every deleted job with the transaction (statement) that deleted it. */
async function logDeletes(sql: Sql): Promise<void> {
  await sql`create table public.deleted (xid bigint, id bigint)`;
  await sql`create function public.log_delete() returns trigger language plpgsql as $$
    begin insert into public.deleted values (txid_current(), old.id); return old; end $$`;
  await sql`create trigger log_delete after delete on shoal.jobs
    for each row execute function public.log_delete()`;
}

/** Jobs per delete statement, in the order the statements committed. */
async function statementSizes(sql: Sql): Promise<number[]> {
  const rows = await sql<{ n: number }[]>`
    select count(*)::int as n from public.deleted group by xid order by xid`;
  return rows.map((r) => r.n);
}

const noop = defineTask({ name: "t.noop", handler: () => {} });

function env(sql: Sql, tasks: AnyTask[] = [noop]): RunEnv {
  return { sql, tasks: new TaskRegistry(tasks), log: logger("consumer"), taskTimeoutMs: 10_000 };
}

async function claimAll(sql: Sql, limit: number): Promise<Job[]> {
  const { jobs } = await claim(sql, {
    queues: ["default"],
    limit,
    workerId: "w",
    visibilityMs: 60_000,
  });
  return jobs;
}

/** Run each job's handler to its outcome. */
async function settledRuns(jobs: Job[], e: RunEnv): Promise<JobRun[]> {
  const runs = jobs.map((job) => new JobRun(job, e));
  await Promise.all(runs.map((run) => run.settled));
  return runs;
}

async function jobsLeft(sql: Sql): Promise<number> {
  const [row] = await sql<{ n: number }[]>`select count(*)::int as n from shoal.jobs`;
  return row!.n;
}

Deno.test("Completer sends a backlog larger than its cap in several statements, each at most the cap, all acked", async () => {
  await using db = await testDb();
  await logDeletes(db.sql);
  await enqueueMany(db.sql, Array.from({ length: 23 }, () => ({ task: "t.noop" })));
  const runs = await settledRuns(await claimAll(db.sql, 23), env(db.sql));
  const completer = new Completer(db.sql, { batchCap: 5 });
  for (const run of runs) assertEquals(completer.record(run), undefined, "an ack is only queued");
  await completer.drain();
  const sizes = await statementSizes(db.sql);
  assertEquals(sizes.reduce((a, b) => a + b, 0), 23, "every job acked once");
  assert(sizes.every((n) => n <= 5), `statement sizes ${sizes}`);
  assert(sizes.length >= 5, `23 jobs need at least 5 statements of 5: ${sizes}`);
  assertEquals(await jobsLeft(db.sql), 0);
  assertEquals(completer.backlog, 0);
});

Deno.test("Completer caps completions of executions per statement too, and completes them", async () => {
  await using db = await testDb();
  await logDeletes(db.sql);
  const executions: string[] = [];
  for (let i = 0; i < 7; i++) executions.push(await startExecution(db.sql, { task: "t.noop" }));
  const runs = await settledRuns(await claimAll(db.sql, 7), env(db.sql));
  const completer = new Completer(db.sql, { batchCap: 3 });
  for (const run of runs) completer.record(run);
  await completer.drain();
  const sizes = await statementSizes(db.sql);
  assertEquals(sizes.reduce((a, b) => a + b, 0), 7);
  assert(sizes.every((n) => n <= 3), `statement sizes ${sizes}`);
  const done = await db.sql<{ n: number }[]>`
    select count(*)::int as n from shoal.executions where status = 'completed'`;
  assertEquals(done[0]!.n, 7);
});

Deno.test("Completer is full at its backlog limit, lists unsent jobs for the heartbeat, and calls onRoom once it falls", async () => {
  await using db = await testDb();
  await using gate = await gateJobDeletes(db.sql);
  await enqueueMany(db.sql, Array.from({ length: 6 }, () => ({ task: "t.noop" })));
  const runs = await settledRuns(await claimAll(db.sql, 6), env(db.sql));
  let rooms = 0;
  const completer = new Completer(db.sql, {
    batchCap: 2,
    backlogLimit: 4,
    onRoom: () => rooms++,
  });
  for (const run of runs.slice(0, 3)) completer.record(run);
  assertEquals(completer.full, false, "3 of 4");
  for (const run of runs.slice(3)) completer.record(run);
  assertEquals(completer.backlog, 6);
  assertEquals(completer.full, true);
  // The first statement is stuck behind the gate: everything is still unsent.
  await new Promise((resolve) => setTimeout(resolve, 200));
  assertEquals(completer.full, true);
  assertEquals(
    completer.unsent().map((ref) => ref.id).sort(),
    runs.map((run) => run.job.id).sort(),
    "queued and in-flight jobs are heartbeated until acked",
  );
  assertEquals(rooms, 0);
  await gate.open();
  await waitFor("room in the backlog", () => rooms === 1);
  await completer.drain();
  assertEquals(completer.full, false);
  assertEquals(completer.backlog, 0);
  assertEquals(completer.unsent(), []);
  assertEquals(rooms, 1, "once per time it was full");
  assertEquals(await jobsLeft(db.sql), 0);
});

Deno.test("Completer records a failure as a retry or a dead letter, counting it in the backlog meanwhile", async () => {
  await using db = await testDb();
  const boom = defineTask({
    name: "t.boom",
    handler: () => {
      throw new Error("boom");
    },
  });
  await enqueueMany(db.sql, [{ task: "t.boom" }, { task: "t.boom", maxAttempts: 1 }]);
  const [retried, buried] = await settledRuns(await claimAll(db.sql, 2), env(db.sql, [boom]));
  const completer = new Completer(db.sql, { retryBaseMs: 60_000 });
  const recording = completer.record(retried!);
  assert(recording, "a failure is awaited");
  assertEquals(completer.backlog, 1);
  await recording;
  await completer.record(buried!);
  assertEquals(completer.backlog, 0);
  const [row] = await db.sql<{ last_error: string; token: string; locked_by: string | null }[]>`
    select last_error, token::text, locked_by from shoal.jobs where id = ${retried!.job.id}`;
  assertEquals(row?.last_error, "Error: boom");
  assertEquals(row?.locked_by, null);
  assertEquals(BigInt(row!.token), BigInt(retried!.job.token) + 1n, "the token moved on");
  const dead = await db.sql`select reason from shoal.dead_jobs where id = ${buried!.job.id}`;
  assertEquals(dead[0]?.reason, "Error: boom");
});

Deno.test("Completer opens a fan-out with its ack, and fails the job for good when the database refuses it", async () => {
  await using db = await testDb();
  const fan = defineTask({
    name: "t.fan",
    handler: (_, ctx) =>
      ctx.fanOut({
        children: [{ task: "t.noop" }, { task: "t.noop" }],
        callback: { task: "t.noop" },
      }),
  });
  await startExecution(db.sql, { task: "t.fan" });
  await startExecution(db.sql, { task: "t.fan" });
  const [opened, refused] = await settledRuns(await claimAll(db.sql, 2), env(db.sql, [fan]));
  assertEquals(opened!.state, "fan-out");
  await new Completer(db.sql).record(opened!);
  const children = await db.sql`
    select id from shoal.jobs where execution_id = ${opened!.job.execution_id}`;
  assertEquals(children.length, 2, "the parent acked, its two children enqueued");
  // The database checks the limit again: one lower than the handler's check passes.
  await new Completer(db.sql, { maxFanOut: 1 }).record(refused!);
  const dead = await db.sql<{ reason: string }[]>`
    select reason from shoal.dead_jobs where id = ${refused!.job.id}`;
  assert(dead[0]?.reason.startsWith("PermanentError: Cannot fan out"), dead[0]?.reason);
});

Deno.test("Completer discards the outcome of a lost or released run", async () => {
  await using db = await testDb();
  const wait = defineTask({
    name: "t.wait",
    handler: (_, ctx) => new Promise((resolve) => ctx.signal.addEventListener("abort", resolve)),
  });
  await enqueueMany(db.sql, [{ task: "t.wait" }, { task: "t.wait" }]);
  const [lost, released] = (await claimAll(db.sql, 2)).map((job) =>
    new JobRun(job, env(db.sql, [wait]))
  );
  lost!.lose();
  released!.release();
  await Promise.all([lost!.settled, released!.settled]);
  const completer = new Completer(db.sql);
  assertEquals(completer.record(lost!), undefined);
  assertEquals(completer.record(released!), undefined);
  await completer.drain();
  assertEquals(completer.backlog, 0);
  assertEquals(await jobsLeft(db.sql), 2, "neither acked nor failed");
});

Deno.test("Completer.drain() sends a backlog in several capped statements at once, not one after another", async () => {
  await using db = await testDb();
  await enqueueMany(db.sql, Array.from({ length: 7 }, () => ({ task: "t.noop" })));
  const runs = await settledRuns(await claimAll(db.sql, 7), env(db.sql));
  // Deletes of every job but the first wait on a lock the test holds: the first ack goes
  // through, and the statements that follow it stay in flight where the test can count them.
  const first = runs[0]!.job.id;
  assert(/^\d+$/.test(first)); // DDL takes no parameters: the id is written into the body
  await db.sql.unsafe(`create function public.gate_rest() returns trigger language plpgsql as $$
    begin
      if old.id <> ${first} then perform pg_advisory_xact_lock_shared(4243); end if;
      return old;
    end $$`);
  await db.sql`create trigger gate_rest before delete on shoal.jobs
    for each row execute function public.gate_rest()`;
  const holder = await db.sql.reserve();
  try {
    await holder`select pg_advisory_lock(4243)`;
    const completer = new Completer(db.sql, { batchCap: 2 });
    completer.record(runs[0]!); // sent at once, alone, and not held
    for (const run of runs.slice(1)) completer.record(run); // 6 more: 3 statements of 2
    const drained = completer.drain();
    const waiting = async () => {
      const [row] = await db.sql<{ n: number }[]>`
        select count(*)::int as n from pg_stat_activity
        where datname = current_database() and wait_event_type = 'Lock'
          and wait_event = 'advisory'`;
      return row!.n;
    };
    await waitFor("the drained batches to wait on the lock", async () => (await waiting()) === 3);
    assertEquals(completer.unsent().length, 6, "the held jobs are still heartbeated");
    await holder`select pg_advisory_unlock(4243)`;
    await drained;
    assertEquals(await jobsLeft(db.sql), 0);
    assertEquals(completer.backlog, 0);
  } finally {
    holder.release();
  }
});
