/**
 * ctx.step (lib/steps.ts, lib/run_job.ts): a named step runs once per job, its result and its
 * writes committed together under the claim's token; later runs of the job get the result back.
 * Real claims, real retries (fail()) and real releases against a real Postgres.
 */
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { testDb, waitFor } from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import { logger } from "../lib/log.ts";
import { claim, enqueue, fail, type Job, release } from "../lib/queue.ts";
import { type AnyTask, defineTask, TaskRegistry } from "../lib/tasks.ts";
import { ClaimLostError, JobRun, type RunEnv, SuspendedError } from "../lib/run_job.ts";
import { listSteps, pruneSteps, STEP_TOTALS_CAP, stepTotals } from "../lib/steps.ts";
import { status } from "../lib/status.ts";
import { cancelExecution, startExecution } from "../lib/execution.ts";
import { retryDead } from "../lib/dead.ts";

function env(sql: Sql, tasks: AnyTask[]): RunEnv {
  return { sql, tasks: new TaskRegistry(tasks), log: logger("consumer"), taskTimeoutMs: 10_000 };
}

async function claimOne(sql: Sql): Promise<Job> {
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

Deno.test("ctx.step() runs once per job: a retry gets the recorded result back and goes on from the first unfinished step", async () => {
  await using db = await testDb();
  await prepare(db.sql);
  const calls: string[] = [];
  const seen: unknown[] = [];
  const task = defineTask({
    name: "t.steps",
    async handler(_p, ctx) {
      const charge = await ctx.step("charge", async (tx) => {
        calls.push("charge");
        await tx`insert into test_effects values (${ctx.job.id}::bigint, 'charge')`;
        return { receipt: "r-1", at: new Date(0) };
      });
      seen.push(charge);
      if (ctx.job.attempts === 1) throw new Error("crash between the steps");
      await ctx.step("ship", async (tx) => {
        calls.push("ship");
        await tx`insert into test_effects values (${ctx.job.id}::bigint, 'ship')`;
      });
    },
  });
  await enqueue(db.sql, "t.steps", {});
  const first = await claimOne(db.sql);
  const run1 = new JobRun(first, env(db.sql, [task]));
  await run1.settled;
  assertEquals(run1.state, "failed");
  assertEquals(await fail(db.sql, first, { error: "crash", retryInMs: 0 }), "retried");

  const second = await claimOne(db.sql);
  assertEquals(second.attempts, 2);
  const run2 = new JobRun(second, env(db.sql, [task]));
  await run2.settled;
  assertEquals(run2.state, "completed");
  assertEquals(calls, ["charge", "ship"], "charge ran once, on the first attempt");
  assertEquals(await effects(db.sql), ["charge", "ship"]);
  const asJson = { receipt: "r-1", at: "1970-01-01T00:00:00.000Z" };
  assertEquals(seen, [asJson, asJson], "the first run and the replay get the same JSON result");
  const steps = await listSteps(db.sql, first.id);
  assertEquals(steps.map((s) => [s.name, s.kind, s.result]), [
    ["charge", "step", asJson],
    ["ship", "step", null],
  ]);
});

Deno.test("a job's first run reads no records (none can exist under its first token); a later claim reads them", async () => {
  await using db = await testDb();
  const calls: number[] = [];
  const seen: unknown[] = [];
  const task = defineTask({
    name: "t.first",
    async handler(_p, ctx) {
      seen.push(
        await ctx.step("charge", () => {
          calls.push(ctx.job.attempts);
          return "ran";
        }, { transaction: false }),
      );
    },
  });
  const id = await enqueue(db.sql, "t.first", {});
  // A record no run could have written (the job was never claimed): the first run, holding
  // token 1, does not read it and runs the step; its own record then meets this one.
  await db.sql`
    insert into shoal.job_steps (job_id, name, kind, result)
    values (${id}::bigint, 'charge', 'step', '"planted"'::jsonb)`;
  const first = await claimOne(db.sql);
  assertEquals(first.token, "1");
  const run1 = new JobRun(first, env(db.sql, [task]));
  await run1.settled;
  assertEquals([run1.state, calls], ["failed", [1]]);
  assertEquals(await fail(db.sql, first, { error: "duplicate", retryInMs: 0 }), "retried");
  // The next claim (a later token) reads the records and replays the step.
  const second = await claimOne(db.sql);
  assert(BigInt(second.token) > 1n, `token ${second.token} after a retry`);
  const run2 = new JobRun(second, env(db.sql, [task]));
  await run2.settled;
  assertEquals([run2.state, calls, seen], ["completed", [1], ["planted"]]);
});

Deno.test("a step recorded before a job was dead-lettered is replayed when it is retried from the dead-letter table", async () => {
  await using db = await testDb();
  const calls: number[] = [];
  const seen: unknown[] = [];
  let runs = 0;
  const task = defineTask({
    name: "t.dead",
    async handler(_p, ctx) {
      runs++;
      const charged = await ctx.step("charge", () => {
        calls.push(ctx.job.attempts);
        return "charged";
      }, { transaction: false });
      if (runs === 1) throw new Error("out of attempts after the step");
      seen.push(charged);
    },
  });
  const id = await enqueue(db.sql, "t.dead", {}, { maxAttempts: 1 });
  const first = await claimOne(db.sql);
  const run1 = new JobRun(first, env(db.sql, [task]));
  await run1.settled;
  assertEquals(run1.state, "failed");
  assertEquals(await fail(db.sql, first, { error: "out of attempts", retryInMs: 0 }), "dead");
  assertEquals(await retryDead(db.sql, id), "retried");
  // Back with its token: the claim's is not the first, so the run reads the record.
  const second = await claimOne(db.sql);
  assertEquals(second.id, id);
  assert(BigInt(second.token) > 1n, `token ${second.token} after a dead-letter retry`);
  const run2 = new JobRun(second, env(db.sql, [task]));
  await run2.settled;
  assertEquals([run2.state, calls, seen], ["completed", [1], ["charged"]]);
});

Deno.test("ctx.step() of a claim that moved on rolls its writes back and records nothing: the run is lost", async () => {
  await using db = await testDb();
  await prepare(db.sql);
  let moved: () => void;
  const released = new Promise<void>((resolve) => (moved = resolve));
  let thrown: unknown = "not thrown";
  const task = defineTask({
    name: "t.stale_step",
    async handler(_p, ctx) {
      try {
        await ctx.step("charge", async (tx) => {
          await tx`insert into test_effects values (${ctx.job.id}::bigint, 'charge')`;
          await released;
        });
      } catch (error) {
        thrown = error;
        throw error;
      }
    },
  });
  await enqueue(db.sql, "t.stale_step", {});
  const job = await claimOne(db.sql);
  const run = new JobRun(job, env(db.sql, [task]));
  assertEquals(await release(db.sql, [job]), [job.id]);
  moved!();
  await run.settled;
  assertEquals(run.state, "lost");
  await assertRejects(() => Promise.reject(thrown), ClaimLostError, "lost its claim");
  assertEquals(await effects(db.sql), []);
  assertEquals(await listSteps(db.sql, job.id), []);
});

Deno.test("ctx.step() refuses a name outside the name rule and a step function that is not one", async () => {
  await using db = await testDb();
  const refusals: string[] = [];
  const task = defineTask({
    name: "t.bad_step",
    async handler(_p, ctx) {
      for (const name of ["", "two words", "x".repeat(129), 5]) {
        await ctx.step(name as string, () => 1).catch((e: Error) => refusals.push(e.message));
      }
      await ctx.step("ok", "nope" as never).catch((e: Error) => refusals.push(e.message));
    },
  });
  await enqueue(db.sql, "t.bad_step", {});
  const run = new JobRun(await claimOne(db.sql), env(db.sql, [task]));
  await run.settled;
  assertEquals(refusals.length, 5);
  assertEquals(
    refusals[1],
    'Invalid name for ctx.step(): expected a step name (1 to 128 letters, digits or _.:- starting with a letter or digit), not "two words"',
  );
  assertEquals(refusals[4], "Invalid fn for ctx.step(): expected a function, got string");
});

Deno.test("pruneSteps() removes the records of gone jobs only; status() counts records", async () => {
  await using db = await testDb();
  const task = defineTask({
    name: "t.record",
    async handler(_p, ctx) {
      await ctx.step("one", () => 1);
      if (ctx.job.payload.fail === true) throw new Error("keep me");
    },
  });
  await enqueue(db.sql, "t.record", {});
  await enqueue(db.sql, "t.record", { fail: true });
  const done = await claimOne(db.sql);
  const kept = await claimOne(db.sql);
  await new JobRun(done, env(db.sql, [task])).settled;
  await new JobRun(kept, env(db.sql, [task])).settled;
  // The first job is then acked (gone); the second stays, failed and waiting for its retry.
  await db.sql`delete from shoal.jobs where id = ${done.id}::bigint`;
  assertEquals((await status(db.sql)).steps, {
    records: 2,
    jobs: 1,
    sleeping: 0,
    waiting: 0,
    exact: true,
  });
  assertEquals(await pruneSteps(db.sql, { limit: 100 }), 0, "within the hour's retention");
  assertEquals(await pruneSteps(db.sql, { olderThanMs: 0, limit: 100 }), 1);
  assertEquals((await listSteps(db.sql, kept.id)).map((s) => s.name), ["one"]);
  assertEquals(await listSteps(db.sql, done.id), []);
});

Deno.test("an ack gains nothing from steps: no foreign key or trigger ties shoal.jobs to shoal.job_steps", async () => {
  await using db = await testDb();
  const [row] = await db.sql<{ keys: number; triggers: number }[]>`
    select
      (select count(*)::integer from pg_constraint
       where contype = 'f' and (conrelid = 'shoal.job_steps'::regclass
                                or confrelid = 'shoal.job_steps'::regclass)) as keys,
      (select count(*)::integer from pg_trigger t join pg_proc p on p.oid = t.tgfoid
       where t.tgrelid = 'shoal.jobs'::regclass and p.prosrc like '%job_steps%') as triggers`;
  assertEquals(row, { keys: 0, triggers: 0 });
});

Deno.test("ctx.sleep() hands the job back until its wake time without counting an attempt; the next run returns at once and finishes", async () => {
  await using db = await testDb();
  await prepare(db.sql);
  const calls: string[] = [];
  const thrown: unknown[] = [];
  const task = defineTask({
    name: "t.sleepy",
    async handler(_p, ctx) {
      await ctx.step("charge", async (tx) => {
        calls.push("charge");
        await tx`insert into test_effects values (${ctx.job.id}::bigint, 'charge')`;
      });
      try {
        await ctx.sleep("cool-off", "1s");
      } catch (error) {
        thrown.push(error);
        throw error;
      }
      await ctx.step("ship", async (tx) => {
        calls.push("ship");
        await tx`insert into test_effects values (${ctx.job.id}::bigint, 'ship')`;
      });
      return "shipped";
    },
  });
  await enqueue(db.sql, "t.sleepy", {});
  const first = await claimOne(db.sql);
  const run1 = new JobRun(first, env(db.sql, [task]));
  await run1.settled;
  assertEquals(run1.state, "suspended");
  // The run settles as the sleep commits; the handler sees the error a moment later.
  await waitFor("the handler to see the sleep's error", () => thrown.length === 1);
  assertEquals((thrown[0] as Error).constructor, SuspendedError);
  const [row] = await db.sql<
    { attempts: number; token: string; locked_by: string | null; wait_ms: number }[]
  >`
    select attempts, token::text, locked_by,
      extract(epoch from run_at - now()) * 1000 as wait_ms
    from shoal.jobs where id = ${first.id}::bigint`;
  assertEquals([row!.attempts, row!.locked_by], [0, null], "no attempt counted, not claimed");
  assertEquals(BigInt(row!.token), BigInt(first.token) + 1n, "the sleeping run's token is dead");
  const [sleep] = await listSteps(db.sql, first.id).then((s) =>
    s.filter((x) => x.kind === "sleep")
  );
  assertEquals(sleep!.name, "cool-off");
  assertEquals(
    (await claim(db.sql, { queues: ["default"], limit: 1, workerId: "w", visibilityMs: 60_000 }))
      .jobs,
    [],
    "not claimable before its wake time",
  );
  assertEquals((await status(db.sql)).steps, {
    records: 2,
    jobs: 1,
    sleeping: 1,
    waiting: 0,
    exact: true,
  });

  const second = await waitForClaim(db.sql);
  assertEquals(second.attempts, 1, "the woken run is the first counted attempt");
  const run2 = new JobRun(second, env(db.sql, [task]));
  await run2.settled;
  assertEquals(run2.state, "completed");
  assertEquals(calls, ["charge", "ship"]);
  assertEquals(await effects(db.sql), ["charge", "ship"]);
  assertEquals((await listSteps(db.sql, first.id)).map((s) => s.name), [
    "charge",
    "cool-off",
    "ship",
  ]);
});

Deno.test("ctx.sleep() of a claim that moved on records nothing and changes nothing: the run is lost", async () => {
  await using db = await testDb();
  let moved: () => void;
  const released = new Promise<void>((resolve) => (moved = resolve));
  const task = defineTask({
    name: "t.stale_sleep",
    async handler(_p, ctx) {
      await released;
      await ctx.sleep("nap", 60_000);
    },
  });
  await enqueue(db.sql, "t.stale_sleep", {});
  const job = await claimOne(db.sql);
  const run = new JobRun(job, env(db.sql, [task]));
  assertEquals(await release(db.sql, [job]), [job.id]);
  moved!();
  await run.settled;
  assertEquals(run.state, "lost");
  assertEquals(await listSteps(db.sql, job.id), []);
  const [row] = await db.sql<{ due: boolean }[]>`
    select run_at <= now() as due from shoal.jobs where id = ${job.id}::bigint`;
  assertEquals(row!.due, true, "still visible now, as the release left it");
});

Deno.test("ctx.sleep() refuses a bad name or time, and a name recorded as a step", async () => {
  await using db = await testDb();
  const refusals: string[] = [];
  const task = defineTask({
    name: "t.bad_sleep",
    async handler(_p, ctx) {
      const attempts: [string, unknown][] = [
        ["bad name", 1],
        ["a", "two days"],
        ["a", -1],
        ["a", new Date("nope")],
        ["a", null],
      ];
      for (const [name, until] of attempts) {
        await ctx.sleep(name, until as number).catch((e: Error) => refusals.push(e.message));
      }
      await ctx.step("same", () => 1);
      await ctx.sleep("same", 1).catch((e: Error) => refusals.push(e.message));
    },
  });
  await enqueue(db.sql, "t.bad_sleep", {});
  const run = new JobRun(await claimOne(db.sql), env(db.sql, [task]));
  await run.settled;
  assertEquals(run.state, "completed");
  assertEquals(refusals, [
    'Invalid name for ctx.sleep(): expected a step name (1 to 128 letters, digits or _.:- starting with a letter or digit), not "bad name"',
    'Invalid until for ctx.sleep(): Cannot parse duration "two days": expected a number and a unit (ms, s, m, h, d), like 500ms or 10s',
    'Invalid until for ctx.sleep(): expected a duration ("2d"), milliseconds from 0 to 315360000000 or a Date, got -1',
    "Invalid until for ctx.sleep(): an invalid Date",
    'Invalid until for ctx.sleep(): expected a duration ("2d"), milliseconds from 0 to 315360000000 or a Date, got object',
    `Cannot sleep "same" in job ${run.job.id}: a step of that name was recorded`,
  ]);
});

/** Claim the one job as soon as it is visible (a sleep's wake time). */
async function waitForClaim(sql: Sql): Promise<Job> {
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    const { jobs } = await claim(sql, {
      queues: ["default"],
      limit: 1,
      workerId: "w",
      visibilityMs: 60_000,
    });
    if (jobs[0]) return jobs[0];
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error("No job became claimable within 10 s");
}

Deno.test("stepTotals() reads at most STEP_TOTALS_CAP records and then says its figures are not exact", async () => {
  await using db = await testDb();
  await db.sql`
    insert into shoal.job_steps (job_id, name, kind, result)
    select i, 'one', 'step', 'null'::jsonb from generate_series(1, ${STEP_TOTALS_CAP}::integer) i`;
  assertEquals(await stepTotals(db.sql), {
    records: STEP_TOTALS_CAP,
    jobs: 0,
    sleeping: 0,
    waiting: 0,
    exact: true,
  });
  await db.sql`
    insert into shoal.job_steps (job_id, name, kind, result)
    values (${STEP_TOTALS_CAP + 1}, 'one', 'step', 'null'::jsonb)`;
  assertEquals(await stepTotals(db.sql), {
    records: STEP_TOTALS_CAP,
    jobs: 0,
    sleeping: 0,
    waiting: 0,
    exact: false,
  });
});

Deno.test("cancelling the execution of a sleeping job leaves nothing behind: the job goes at once, its wake time passes with nothing to claim, its records are pruned", async () => {
  await using db = await testDb();
  await prepare(db.sql);
  const runs: number[] = [];
  const task = defineTask({
    name: "t.nap",
    async handler(_p, ctx) {
      runs.push(ctx.job.attempts);
      await ctx.step("charge", async (tx) => {
        await tx`insert into test_effects values (${ctx.job.id}::bigint, 'charge')`;
      });
      await ctx.sleep("cool-off", 300);
      await ctx.step("ship", async (tx) => {
        await tx`insert into test_effects values (${ctx.job.id}::bigint, 'ship')`;
      });
    },
  });
  const execution = await startExecution(db.sql, { task: "t.nap" });
  const job = await claimOne(db.sql);
  const r = new JobRun(job, env(db.sql, [task]));
  await r.settled;
  assertEquals(r.state, "suspended");
  assertEquals((await stepTotals(db.sql)).sleeping, 1);
  assertEquals(await cancelExecution(db.sql, execution), true);
  const [left] = await db.sql<{ n: number }[]>`select count(*)::int as n from shoal.jobs`;
  assertEquals(left!.n, 0, "the sleeping job is gone at once, not at its wake time");
  assertEquals((await stepTotals(db.sql)).sleeping, 0);
  await new Promise((resolve) => setTimeout(resolve, 400)); // past its wake time
  assertEquals(
    (await claim(db.sql, { queues: ["default"], limit: 10, workerId: "w", visibilityMs: 60_000 }))
      .jobs,
    [],
    "nothing wakes to be run (or acked unrun)",
  );
  assertEquals(runs.length, 1, "one run, before the cancel");
  assertEquals(await effects(db.sql), ["charge"]);
  assertEquals(await pruneSteps(db.sql, { olderThanMs: 0, limit: 10 }), 2);
  assertEquals(await listSteps(db.sql, job.id), []);
});
