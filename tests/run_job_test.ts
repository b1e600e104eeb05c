/**
 * JobRun: one job's handler run to an outcome (completed, fan-out, failed, lost,
 * released), and failureOf(): how a failure is recorded. Runs write nothing; the database
 * is real for the context's `db` and `enqueue`, and its jobs come from real claims.
 */
import { assert, assertEquals } from "./assert.ts";
import { registerTasks, testDb } from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import { logger } from "../lib/log.ts";
import { claim, enqueue, type EnqueueOptions, type Job } from "../lib/queue.ts";
import { startExecution } from "../lib/execution.ts";
import {
  type AnyTask,
  defineTask,
  PermanentError,
  RetryLaterError,
  type TaskContext,
  TaskRegistry,
} from "../lib/tasks.ts";
import {
  ClaimLostError,
  failureOf,
  JobRun,
  type RunEnv,
  ShutdownError,
  TimeoutError,
} from "../lib/run_job.ts";

function env(sql: Sql, tasks: AnyTask[], taskTimeoutMs = 10_000): RunEnv {
  return {
    sql,
    tasks: new TaskRegistry(tasks),
    log: logger("consumer"),
    taskTimeoutMs,
  };
}

/** Enqueue (in an execution when asked) and claim one job of `task`. */
async function claimed(
  sql: Sql,
  task: string,
  options: { execution?: boolean; payload?: Record<string, unknown> } = {},
): Promise<Job> {
  if (options.execution) await startExecution(sql, { task, payload: options.payload ?? {} });
  else await enqueue(sql, task, options.payload ?? {});
  const { jobs } = await claim(sql, {
    queues: ["default"],
    limit: 1,
    workerId: "w",
    visibilityMs: 60_000,
  });
  return jobs[0]!;
}

/** A handler that waits for its signal and rethrows its reason (or returns on `release`). */
function untilAborted(_: unknown, ctx: TaskContext): Promise<void> {
  return new Promise((_resolve, reject) => {
    ctx.signal.addEventListener("abort", () => reject(ctx.signal.reason), { once: true });
  });
}

Deno.test("JobRun completes with the handler's JSON result for a job of an execution", async () => {
  await using db = await testDb();
  const task = defineTask({ name: "t.result", handler: () => ({ n: 1, at: new Date(0) }) });
  const run = new JobRun(
    await claimed(db.sql, "t.result", { execution: true }),
    env(db.sql, [task]),
  );
  assertEquals(run.state, "running");
  await run.settled;
  assertEquals(run.state, "completed");
  assertEquals(run.result, { n: 1, at: "1970-01-01T00:00:00.000Z" }, "as it survives JSON");
});

Deno.test("JobRun keeps no result for a plain job, and passes the parsed payload", async () => {
  await using db = await testDb();
  let seen: unknown;
  const task = defineTask<{ n: number }>({
    name: "t.plain",
    parse: (p) => ({ n: Number(p.n) * 2 }),
    handler: (payload) => {
      seen = payload;
      return { ignored: true };
    },
  });
  const run = new JobRun(
    await claimed(db.sql, "t.plain", { payload: { n: 2 } }),
    env(db.sql, [task]),
  );
  await run.settled;
  assertEquals(run.state, "completed");
  assertEquals(run.result, undefined);
  assertEquals(seen, { n: 4 });
});

Deno.test("JobRun fails on an unknown task, and for good on a rejected payload or an unstorable result", async () => {
  await using db = await testDb();
  const strict = defineTask<{ n: number }>({
    name: "t.strict",
    parse: () => {
      throw new TypeError("n must be a number");
    },
    handler: () => {},
  });
  const bigint = defineTask({ name: "t.bigint", handler: () => ({ n: 1n }) });
  const e = env(db.sql, [strict, bigint]);

  const unknown = new JobRun(await claimed(db.sql, "t.unknown"), e);
  await unknown.settled;
  assertEquals(unknown.state, "failed");
  assert(String((unknown.error as Error).message).startsWith('Unknown task "t.unknown"'));
  assertEquals(failureOf(unknown.error, 1).permanent, false, "another consumer may know it");

  const invalid = new JobRun(await claimed(db.sql, "t.strict"), e);
  await invalid.settled;
  assertEquals(invalid.state, "failed");
  assert(invalid.error instanceof PermanentError);
  assertEquals(
    failureOf(invalid.error, 1).error,
    "PermanentError: Invalid payload for task t.strict: n must be a number",
  );

  const result = new JobRun(await claimed(db.sql, "t.bigint", { execution: true }), e);
  await result.settled;
  assertEquals(result.state, "failed");
  assert(result.error instanceof PermanentError);
  assertEquals(failureOf(result.error, 1).permanent, true);
});

Deno.test("JobRun turns a thrown null into a failure described like any non-Error", async () => {
  await using db = await testDb();
  const task = defineTask({
    name: "t.null",
    handler: () => {
      throw null;
    },
  });
  const run = new JobRun(await claimed(db.sql, "t.null"), env(db.sql, [task]));
  await run.settled;
  assertEquals(run.state, "failed");
  assertEquals(failureOf(run.error, 1).error, "non-Error thrown: null");
});

Deno.test("failureOf() retries with backoff, when a RetryLaterError says, or never for a PermanentError", () => {
  const plain = failureOf(new Error("boom"), 3, 1000);
  assertEquals(plain.error, "Error: boom");
  assertEquals(plain.permanent, false);
  // Attempt 3 with a base of 1 s: about 4 s, with jitter.
  assert(plain.retryInMs >= 2000 && plain.retryInMs <= 8000, String(plain.retryInMs));
  assertEquals(failureOf(new RetryLaterError("busy", 1234), 3, 1000).retryInMs, 1234);
  assertEquals(failureOf(new PermanentError("no"), 1).permanent, true);
  assertEquals(
    failureOf(new TimeoutError("Task timed out after 5s"), 1).error,
    "Task timed out after 5s",
  );
});

Deno.test("JobRun.abortIfOverdue() aborts the handler past its task's timeout, not before", async () => {
  await using db = await testDb();
  const task = defineTask({ name: "t.slow", timeoutMs: 5_000, handler: untilAborted });
  const run = new JobRun(await claimed(db.sql, "t.slow"), env(db.sql, [task]));
  assertEquals(run.timeoutMs, 5_000, "the task's own timeout over the consumer's");
  run.abortIfOverdue(run.timeoutAt - 1);
  assertEquals(run.controller.signal.aborted, false);
  run.abortIfOverdue(run.timeoutAt);
  assertEquals(run.controller.signal.aborted, true, "aborted at its deadline");
  await run.settled;
  assertEquals(run.state, "failed");
  assert(run.error instanceof TimeoutError);
  assertEquals(failureOf(run.error, 1).error, "Task timed out after 5s");
});

Deno.test("JobRun.lose() and release() abort the handler and discard what it ends with", async () => {
  await using db = await testDb();
  const reasons: unknown[] = [];
  const task = defineTask({
    name: "t.wait",
    handler: (_, ctx) =>
      new Promise<string>((resolve) => {
        ctx.signal.addEventListener("abort", () => {
          reasons.push(ctx.signal.reason);
          resolve("finished anyway"); // a normal return after the abort changes nothing
        });
      }),
  });
  const e = env(db.sql, [task], 60_000);
  const lost = new JobRun(await claimed(db.sql, "t.wait"), e);
  lost.lose();
  await lost.settled;
  assertEquals(lost.state, "lost");
  const released = new JobRun(await claimed(db.sql, "t.wait"), e);
  released.release();
  await released.settled;
  assertEquals(released.state, "released");
  assert(reasons[0] instanceof ClaimLostError);
  assert(reasons[1] instanceof ShutdownError);
});

Deno.test("JobRun settles on abort even when the handler never does", async () => {
  await using db = await testDb();
  const task = defineTask({ name: "t.stuck", handler: () => new Promise(() => {}) });
  const run = new JobRun(await claimed(db.sql, "t.stuck"), env(db.sql, [task]));
  run.lose();
  await run.settled;
  assertEquals(run.state, "lost");
});

Deno.test("JobRun ends in fan-out when the handler asks for one, once and checked", async () => {
  await using db = await testDb();
  let second: unknown;
  const task = defineTask({
    name: "t.fan",
    handler: (_, ctx) => {
      ctx.fanOut({ children: [{ task: "t.child" }], callback: { task: "t.done" } });
      try {
        ctx.fanOut({ children: [{ task: "t.child" }], callback: { task: "t.done" } });
      } catch (error) {
        second = error;
      }
      return "ignored";
    },
  });
  const bad = defineTask({
    name: "t.badfan",
    handler: (_, ctx) =>
      ctx.fanOut({
        children: [{ task: "t.child" }, { task: "t.child" }],
        callback: { task: "t.done" },
      }),
  });
  const e: RunEnv = { ...env(db.sql, [task, bad]), maxFanOut: 1 };
  const run = new JobRun(await claimed(db.sql, "t.fan", { execution: true }), e);
  await run.settled;
  assertEquals(run.state, "fan-out");
  assertEquals(run.fanOut?.children, 1);
  assertEquals(run.result, undefined, "a fan-out's callback carries the results, not the parent");
  assert(String((second as Error).message).startsWith("A job can fan out once"));

  const refused = new JobRun(await claimed(db.sql, "t.badfan"), e);
  await refused.settled;
  assertEquals(refused.state, "failed");
  assert(refused.error instanceof PermanentError, "the same spec fails on every retry");
});

Deno.test("JobRun's context enqueues with the task's catalog queue and gives the pool as db", async () => {
  await using db = await testDb();
  // Registered by some consumer, unknown to this one's registry: the catalog decides.
  await registerTasks(db.sql, ["t.other"], {
    queues: ["elsewhere"],
    settings: { queue: "elsewhere" },
  });
  let enqueued = "";
  const task = defineTask({
    name: "t.parent",
    handler: async (_, ctx) => {
      assertEquals(ctx.db, db.sql);
      assertEquals(ctx.job.task, "t.parent");
      enqueued = await ctx.enqueue("t.other");
    },
  });
  const run = new JobRun(await claimed(db.sql, "t.parent"), env(db.sql, [task]));
  await run.settled;
  assertEquals(run.state, "completed");
  const [row] = await db.sql<
    { queue: string }[]
  >`select queue from shoal.jobs where id = ${enqueued}`;
  assertEquals(row?.queue, "elsewhere");
});

Deno.test("JobRun's ctx.enqueue() refuses options that are not an object, and names itself", async () => {
  await using db = await testDb();
  const refused: string[] = [];
  const task = defineTask({
    name: "t.parent",
    handler: async (_, ctx) => {
      // A string would spread into nothing: the job would go out with no options at all.
      const calls: (() => Promise<string>)[] = [
        () => ctx.enqueue("t.child", {}, "emails" as unknown as EnqueueOptions),
        () => ctx.enqueue("t.child", {}, { runAt: "soon" as unknown as Date }),
        () => ctx.enqueue("t.child", [] as unknown as Record<string, unknown>),
      ];
      for (const call of calls) {
        try {
          await call();
          refused.push("(not refused)");
        } catch (error) {
          refused.push(`${(error as Error).name}: ${(error as Error).message}`);
        }
      }
    },
  });
  const run = new JobRun(await claimed(db.sql, "t.parent"), env(db.sql, [task]));
  await run.settled;
  assertEquals(run.state, "completed");
  assertEquals(refused, [
    'TypeError: Invalid options for ctx.enqueue(): expected an object, not "emails"',
    'TypeError: Invalid options.runAt for ctx.enqueue(): expected a valid Date, not "soon"',
    "TypeError: Invalid payload for ctx.enqueue(): expected a JSON object, got array",
  ]);
  const [row] = await db.sql<{ n: number }[]>`
    select count(*)::int as n from shoal.jobs where task = 't.child'`;
  assertEquals(row?.n, 0, "nothing enqueued");
});

Deno.test("failureOf() stores NUL characters as U+FFFD: Postgres text cannot hold them", () => {
  assertEquals(failureOf(new Error("a\0b\0"), 1).error, "Error: a\uFFFDb\uFFFD");
  assertEquals(failureOf("\0", 1).error, 'non-Error thrown: "\\u0000"');
});

Deno.test("JobRun calls env.onSettled once per run, never from inside its constructor or an abort", async () => {
  await using db = await testDb();
  const calls: string[] = [];
  const throwsAtOnce = defineTask({
    name: "t.sync",
    handler: () => {
      throw new Error("at once");
    },
  });
  const e: RunEnv = {
    ...env(db.sql, [throwsAtOnce, defineTask({ name: "t.wait", handler: untilAborted })]),
    onSettled: (run) => calls.push(`${run.job.task}:${run.state}`),
  };
  const sync = new JobRun(await claimed(db.sql, "t.sync"), e);
  assertEquals(calls, [], "a handler that throws at once is reported after the constructor");
  await sync.settled;
  assertEquals(calls, ["t.sync:failed"]);
  const waiting = new JobRun(await claimed(db.sql, "t.wait"), e);
  waiting.lose();
  assertEquals(calls.length, 1, "not from inside lose(): the caller may be iterating");
  await waiting.settled;
  waiting.release(); // a second abort settles nothing more
  await Promise.resolve();
  await new Promise((resolve) => setTimeout(resolve, 10)); // the handler's rejection came in
  assertEquals(calls, ["t.sync:failed", "t.wait:lost"]);
});

Deno.test("JobRun's signal made after an abort starts aborted with the abort's reason", async () => {
  await using db = await testDb();
  const task = defineTask({ name: "t.late", handler: () => new Promise(() => {}) });
  const run = new JobRun(await claimed(db.sql, "t.late"), env(db.sql, [task]));
  run.lose();
  assertEquals(run.controller.signal.aborted, true);
  assert(run.controller.signal.reason instanceof ClaimLostError);
  await run.settled;
  assertEquals(run.state, "lost");
});

Deno.test("JobRun's context parts work when taken off the context (const { enqueue, signal } = ctx)", async () => {
  await using db = await testDb();
  let aborted: boolean | undefined;
  const task = defineTask({
    name: "t.destructure",
    handler: async (_, ctx) => {
      const { enqueue, fanOut, signal, log, job } = ctx;
      aborted = signal.aborted;
      log.debug("taken off the context");
      await enqueue("t.child", { from: job.id });
      fanOut({ children: [{ task: "t.child" }], callback: { task: "t.done" } });
    },
  });
  const run = new JobRun(await claimed(db.sql, "t.destructure"), env(db.sql, [task]));
  await run.settled;
  assertEquals(run.state, "fan-out");
  assertEquals(aborted, false);
  const [row] = await db.sql<{ n: number }[]>`
    select count(*)::int as n from shoal.jobs where task = 't.child'`;
  assertEquals(row?.n, 1);
});
