/**
 * Checkpoint steps (`ctx.step(name, fn, { transaction: false })`, lib/checkpoints.ts,
 * lib/steps.ts recordCheckpoints()): `fn` runs with no transaction, its result is recorded,
 * fenced by the claim's token, in one statement with other runs' steps. Real claims, retries and
 * releases against a real Postgres; statements counted by a statement-level trigger.
 */
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { testDb, waitFor } from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import { logger } from "../lib/log.ts";
import { claim, enqueue, fail, type Job, release } from "../lib/queue.ts";
import { type AnyTask, defineTask, TaskRegistry } from "../lib/tasks.ts";
import { ClaimLostError, JobRun, type RunEnv } from "../lib/run_job.ts";
import { listSteps } from "../lib/steps.ts";
import { CheckpointBatcher } from "../lib/checkpoints.ts";
import { Completer } from "../lib/completer.ts";
import { getExecution, startExecution } from "../lib/execution.ts";

function env(sql: Sql, tasks: AnyTask[]): RunEnv {
  return {
    sql,
    tasks: new TaskRegistry(tasks),
    log: logger("consumer"),
    taskTimeoutMs: 10_000,
    checkpoints: new CheckpointBatcher(sql),
  };
}

async function claimJobs(sql: Sql, limit = 1): Promise<Job[]> {
  const { jobs } = await claim(sql, {
    queues: ["default"],
    limit,
    workerId: "w",
    visibilityMs: 60_000,
  });
  return jobs;
}

/** Count the statements that insert into shoal.job_steps (fired once per statement). */
async function countStatements(sql: Sql): Promise<void> {
  await sql`create table test_statements (n integer not null)`;
  await sql`
    create function test_count_statement() returns trigger language plpgsql as $$
    begin
      insert into test_statements values (1);
      return null;
    end $$`;
  await sql`
    create trigger test_count after insert on shoal.job_steps
    for each statement execute function test_count_statement()`;
}

async function statements(sql: Sql): Promise<number> {
  const [row] = await sql<{ n: number }[]>`select count(*)::integer as n from test_statements`;
  return row!.n;
}

Deno.test("a checkpoint step runs once per job: a retry gets its recorded result back without calling fn", async () => {
  await using db = await testDb();
  const calls: string[] = [];
  const seen: unknown[] = [];
  const task = defineTask({
    name: "t.checkpoints",
    async handler(_p, ctx) {
      const sent = await ctx.step("send", () => {
        calls.push("send");
        return { id: `mail-${ctx.job.id}`, at: new Date(0) };
      }, { transaction: false });
      seen.push(sent);
      if (ctx.job.attempts === 1) throw new Error("crash between the steps");
      await ctx.step("notify", async () => {
        await Promise.resolve();
        calls.push("notify");
        return 2;
      }, { transaction: false });
    },
  });
  await enqueue(db.sql, "t.checkpoints", {});
  const [first] = await claimJobs(db.sql);
  const run1 = new JobRun(first!, env(db.sql, [task]));
  await run1.settled;
  assertEquals(run1.state, "failed");
  assertEquals(await fail(db.sql, first!, { error: "crash", retryInMs: 0 }), "retried");

  const [second] = await claimJobs(db.sql);
  assertEquals(second!.attempts, 2);
  const run2 = new JobRun(second!, env(db.sql, [task]));
  await run2.settled;
  assertEquals(run2.state, "completed");
  assertEquals(calls, ["send", "notify"], "send ran once, on the first attempt");
  const asJson = { id: `mail-${first!.id}`, at: "1970-01-01T00:00:00.000Z" };
  assertEquals(seen, [asJson, asJson], "the first run and the replay get the same JSON result");
  assertEquals((await listSteps(db.sql, first!.id)).map((s) => [s.name, s.kind, s.result]), [
    ["send", "step", asJson],
    ["notify", "step", 2],
  ]);
});

Deno.test("a checkpoint step of a claim that moved on records nothing: the step rejects as a lost claim and the run is lost", async () => {
  await using db = await testDb();
  let moved: () => void;
  const released = new Promise<void>((resolve) => (moved = resolve));
  let caught: (error: unknown) => void;
  const thrown = new Promise<unknown>((resolve) => (caught = resolve));
  const task = defineTask({
    name: "t.stale_checkpoint",
    async handler(_p, ctx) {
      try {
        await ctx.step("send", async () => {
          await released;
          return "sent";
        }, { transaction: false });
      } catch (error) {
        caught!(error);
        throw error;
      }
    },
  });
  await enqueue(db.sql, "t.stale_checkpoint", {});
  const [job] = await claimJobs(db.sql);
  const run = new JobRun(job!, env(db.sql, [task]));
  assertEquals(await release(db.sql, [job!]), [job!.id]);
  moved!();
  await run.settled;
  assertEquals(run.state, "lost");
  const error = await thrown;
  await assertRejects(() => Promise.reject(error), ClaimLostError, "lost its claim");
  assertEquals(await listSteps(db.sql, job!.id), []);
});

Deno.test("in one batch, a stale claim's checkpoint is refused while the others' are recorded", async () => {
  await using db = await testDb();
  const batcher = new CheckpointBatcher(db.sql);
  for (let i = 0; i < 3; i++) await enqueue(db.sql, "t.any", { i });
  const jobs = await claimJobs(db.sql, 3);
  assertEquals(jobs.length, 3);
  await release(db.sql, [jobs[1]!]);
  const outcomes = await Promise.all(
    jobs.map((job) => batcher.record({ job, name: "s", result: { n: job.id } })),
  );
  assertEquals(outcomes, ["recorded", "lost", "recorded"]);
  assertEquals((await listSteps(db.sql, jobs[1]!.id)).length, 0);
  assertEquals((await listSteps(db.sql, jobs[2]!.id))[0]!.result, { n: jobs[2]!.id });
});

Deno.test("many concurrent runs' checkpoint steps are recorded in a few statements, not one each", async () => {
  await using db = await testDb();
  await countStatements(db.sql);
  const JOBS = 40;
  const STEPS = 3;
  const task = defineTask({
    name: "t.many_checkpoints",
    async handler(_p, ctx) {
      for (let i = 0; i < STEPS; i++) await ctx.step(`s${i}`, () => i, { transaction: false });
    },
  });
  for (let i = 0; i < JOBS; i++) await enqueue(db.sql, "t.many_checkpoints", { i });
  const jobs = await claimJobs(db.sql, JOBS);
  assertEquals(jobs.length, JOBS);
  const shared = env(db.sql, [task]);
  const runs = jobs.map((job) => new JobRun(job, shared));
  await Promise.all(runs.map((run) => run.settled));
  assertEquals(runs.map((run) => run.state), jobs.map(() => "completed"));
  const [recorded] = await db.sql<{ n: number }[]>`
    select count(*)::integer as n from shoal.job_steps where kind = 'step'`;
  assertEquals(recorded!.n, JOBS * STEPS);
  const sent = await statements(db.sql);
  // One each would be 120. The runs' first steps come in staggered (each run reads its records
  // first, 40 reads on 10 connections), so the bound is loose here; the next test is tight.
  assert(
    sent <= (JOBS * STEPS) / 2,
    `${JOBS * STEPS} checkpoints took ${sent} statements: expected at least 2 records each`,
  );
});

Deno.test("handlers resumed by one commit hand in their next checkpoints together: one statement per round", async () => {
  await using db = await testDb();
  await countStatements(db.sql);
  const JOBS = 40;
  const ROUNDS = 5;
  for (let i = 0; i < JOBS; i++) await enqueue(db.sql, "t.any", { i });
  const jobs = await claimJobs(db.sql, JOBS);
  const batcher = new CheckpointBatcher(db.sql);
  // Each loop awaits its record before the next, as a handler awaits each step.
  await Promise.all(jobs.map(async (job) => {
    for (let i = 0; i < ROUNDS; i++) {
      assertEquals(await batcher.record({ job, name: `s${i}`, result: i }), "recorded");
    }
  }));
  const sent = await statements(db.sql);
  assert(
    sent <= 2 * ROUNDS,
    `${JOBS} handlers' ${ROUNDS} rounds took ${sent} statements: expected at most ${2 * ROUNDS}`,
  );
});

Deno.test("transactional and checkpoint steps mix in one handler; a retry replays both kinds", async () => {
  await using db = await testDb();
  await db.sql`create table test_effects (job_id bigint not null, effect text not null)`;
  const calls: string[] = [];
  const task = defineTask({
    name: "t.mixed",
    async handler(_p, ctx) {
      const a = await ctx.step("reserve", async (tx) => {
        calls.push("reserve");
        await tx`insert into test_effects values (${ctx.job.id}::bigint, 'reserve')`;
        return 1;
      });
      const b = await ctx.step("call", () => {
        calls.push("call");
        return a + 1;
      }, { transaction: false });
      const c = await ctx.step("commit", async (tx) => {
        calls.push("commit");
        await tx`insert into test_effects values (${ctx.job.id}::bigint, 'commit')`;
        return b + 1;
      }, { transaction: true });
      if (ctx.job.attempts === 1) throw new Error("crash after the steps");
      return c;
    },
  });
  await enqueue(db.sql, "t.mixed", {});
  const [first] = await claimJobs(db.sql);
  const run1 = new JobRun(first!, env(db.sql, [task]));
  await run1.settled;
  assertEquals(run1.state, "failed");
  await fail(db.sql, first!, { error: "crash", retryInMs: 0 });
  const [second] = await claimJobs(db.sql);
  const run2 = new JobRun(second!, env(db.sql, [task]));
  await run2.settled;
  assertEquals(run2.state, "completed");
  assertEquals(calls, ["reserve", "call", "commit"]);
  const effects = await db.sql<
    { effect: string }[]
  >`select effect from test_effects order by effect`;
  assertEquals(effects.map((r) => r.effect), ["commit", "reserve"]);
  assertEquals((await listSteps(db.sql, first!.id)).map((s) => [s.name, s.result]), [
    ["reserve", 1],
    ["call", 2],
    ["commit", 3],
  ]);
});

Deno.test("a checkpoint the database refuses fails its own step only, not the others of its batch", async () => {
  await using db = await testDb();
  const batcher = new CheckpointBatcher(db.sql);
  for (let i = 0; i < 3; i++) await enqueue(db.sql, "t.any", { i });
  const jobs = await claimJobs(db.sql, 3);
  // A NUL character: JSON can say it, jsonb refuses it (a data error).
  const results = ["ok", "bad\0", "ok"];
  const outcomes = await Promise.allSettled(
    jobs.map((job, i) => batcher.record({ job, name: "s", result: results[i] })),
  );
  assertEquals(outcomes.map((o) => o.status), ["fulfilled", "rejected", "fulfilled"]);
  assertEquals(outcomes.map((o) => o.status === "fulfilled" ? o.value : "refused"), [
    "recorded",
    "refused",
    "recorded",
  ]);
  assertEquals((await listSteps(db.sql, jobs[1]!.id)).length, 0);
});

Deno.test("ctx.step() refuses options that are not { transaction: boolean }", async () => {
  await using db = await testDb();
  const refusals: string[] = [];
  const task = defineTask({
    name: "t.bad_options",
    async handler(_p, ctx) {
      for (const options of ["no", { transaction: "no" }, { batch: true }]) {
        await ctx.step("s", () => 1, options as never).catch((e: Error) =>
          refusals.push(e.message)
        );
      }
    },
  });
  await enqueue(db.sql, "t.bad_options", {});
  const [job] = await claimJobs(db.sql);
  const run = new JobRun(job!, env(db.sql, [task]));
  await run.settled;
  assertEquals(run.state, "completed");
  assertEquals(refusals.length, 3);
  assertEquals(
    refusals[1],
    "Invalid options.transaction for ctx.step(): expected true or false, got string",
  );
  assert(refusals[2]!.includes('unknown option "batch"'), refusals[2]);
  assertEquals(await listSteps(db.sql, job!.id), [], "a refused step records nothing");
});

Deno.test("in one batch, a lost run's checkpoint and its job's new run's are told apart by token", async () => {
  await using db = await testDb();
  const batcher = new CheckpointBatcher(db.sql);
  await enqueue(db.sql, "t.any", {});
  const [old] = await claimJobs(db.sql);
  await release(db.sql, [old!]);
  const [current] = await claimJobs(db.sql);
  assertEquals(current!.id, old!.id);
  const outcomes = await Promise.all([
    batcher.record({ job: old!, name: "a", result: "old" }),
    batcher.record({ job: current!, name: "b", result: "new" }),
    batcher.record({ job: current!, name: "c", result: "new" }),
  ]);
  assertEquals(outcomes, ["lost", "recorded", "recorded"]);
  assertEquals((await listSteps(db.sql, old!.id)).map((s) => s.name).sort(), ["b", "c"]);
});

/** A consumer's completer and checkpoint batcher, wired as runConsumer() wires them. */
function riding(sql: Sql): { completer: Completer; batcher: CheckpointBatcher } {
  const completer = new Completer(sql);
  const batcher = new CheckpointBatcher(sql, { completions: completer });
  completer.ridesWith(() => batcher.busy);
  return { completer, batcher };
}

/** The transaction of each statement recording a checkpoint, and of each execution completed. */
async function auditCommits(sql: Sql): Promise<void> {
  await sql`create table test_commits (what text not null, tx bigint not null)`;
  await sql`
    create function test_commit() returns trigger language plpgsql as $$
    begin
      insert into test_commits values (tg_argv[0], txid_current());
      return null;
    end $$`;
  await sql`
    create trigger test_record after insert on shoal.job_steps
    for each statement execute function test_commit('record')`;
  await sql`
    create trigger test_complete after update of status on shoal.executions
    for each row when (new.status = 'completed') execute function test_commit('complete')`;
}

/** Runs of jobs of executions whose handler returns `done`, their outcomes to `completer`. */
async function finishExecutions(sql: Sql, completer: Completer, jobs: Job[]): Promise<void> {
  const task = defineTask({ name: "t.exec", handler: () => "done" });
  const runs = jobs.map((job) =>
    new JobRun(job, { ...env(sql, [task]), onSettled: (run) => completer.record(run) })
  );
  await Promise.all(runs.map((run) => run.settled));
}

Deno.test("completions of executions handed in while a checkpoint round is due commit in the round's statement", async () => {
  await using db = await testDb();
  await auditCommits(db.sql);
  const { completer, batcher } = riding(db.sql);
  const executions: string[] = [];
  for (let i = 0; i < 3; i++) {
    executions.push(await startExecution(db.sql, { task: "t.exec", payload: { i } }));
  }
  await enqueue(db.sql, "t.any", {});
  const jobs = await claimJobs(db.sql, 4);
  const plain = jobs.find((j) => j.execution_id === null)!;
  const recording = batcher.record({ job: plain, name: "s", result: 1 });
  assert(batcher.busy);
  await finishExecutions(db.sql, completer, jobs.filter((j) => j.execution_id !== null));
  // Waiting for the round, not sent on their own.
  assertEquals(completer.backlog, 3);
  assertEquals(await recording, "recorded");
  assertEquals(completer.backlog, 0);
  for (const id of executions) {
    assertEquals((await getExecution(db.sql, id))!.status, "completed");
  }
  const commits = await db.sql<{ what: string; tx: string }[]>`
    select what, tx::text from test_commits order by what`;
  assertEquals(commits.map((c) => c.what), ["complete", "complete", "complete", "record"]);
  assertEquals(new Set(commits.map((c) => c.tx)).size, 1, "one transaction for all four");
  await completer.drain();
});

Deno.test("completions riding a round whose statement fails are sent on their own; a round that does not come leaves none behind", async () => {
  await using db = await testDb();
  const { completer, batcher } = riding(db.sql);
  const first = await startExecution(db.sql, { task: "t.exec" });
  await enqueue(db.sql, "t.any", {});
  const jobs = await claimJobs(db.sql, 2);
  const plain = jobs.find((j) => j.execution_id === null)!;
  // A NUL character: jsonb refuses it, so the round's statement fails.
  const refused = batcher.record({ job: plain, name: "bad", result: "bad\0" });
  await finishExecutions(db.sql, completer, jobs.filter((j) => j.execution_id !== null));
  await assertRejects(() => refused);
  await waitFor(
    "the completion sent on its own",
    async () => (await getExecution(db.sql, first))!.status === "completed",
  );
  assertEquals(completer.backlog, 0);

  // A round in flight when the completion comes, and no round after it: idle() sends it.
  const second = await startExecution(db.sql, { task: "t.exec" });
  const [job] = await claimJobs(db.sql, 1);
  assertEquals(job!.execution_id, second);
  const recorded = batcher.record({ job: plain, name: "ok", result: 1 });
  await finishExecutions(db.sql, completer, [job!]);
  assertEquals(await recorded, "recorded");
  await waitFor(
    "the completion sent once no round was due",
    async () => (await getExecution(db.sql, second))!.status === "completed",
  );
  await completer.drain();
  assertEquals(completer.backlog, 0);
});

Deno.test("a round whose connection is terminated rejects its records and hands its completions back: the completer sends them", async () => {
  await using db = await testDb();
  const { completer, batcher } = riding(db.sql);
  const execution = await startExecution(db.sql, { task: "t.exec" });
  await enqueue(db.sql, "t.any", {});
  const jobs = await claimJobs(db.sql, 2);
  const plain = jobs.find((j) => j.execution_id === null)!;
  const holder = await db.sql.reserve();
  try {
    // The round's lock of the plain job waits behind this one: the statement is in flight.
    await holder`begin`;
    await holder`select 1 from shoal.jobs where id = ${plain.id}::bigint for update`;
    const round = batcher.record({ job: plain, name: "s", result: 1 });
    await finishExecutions(db.sql, completer, jobs.filter((j) => j.execution_id !== null));
    const [{ pid }] = await waitFor("the round to wait for the lock", async () => {
      const rows = await db.sql<{ pid: number }[]>`
        select pid from pg_stat_activity
        where datname = current_database() and wait_event_type = 'Lock'
          and query like '%shoal.complete_jobs%'`;
      return rows.length === 1 ? rows as unknown as [{ pid: number }] : undefined;
    });
    await db.sql`select pg_terminate_backend(${pid}::integer)`;
    await assertRejects(() => round);
  } finally {
    await holder`rollback`;
    holder.release();
  }
  await completer.drain();
  assertEquals((await getExecution(db.sql, execution))!.status, "completed");
  assertEquals(completer.backlog, 0);
  assertEquals((await listSteps(db.sql, plain.id)).length, 0);
});
