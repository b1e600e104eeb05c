/**
 * Events (lib/events.ts, sql/functions/events.sql, ctx.waitForEvent in lib/run_job.ts): a job
 * waits like a durable sleep until shoal.emit_event delivers its event, or its timeout comes;
 * one delivery per wait, whatever races it. Real claims, real runs, real emits against a real
 * Postgres.
 */
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { testDb, waitFor } from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import { logger } from "../lib/log.ts";
import { claim, enqueue, fail, type Job, release } from "../lib/queue.ts";
import { type AnyTask, defineTask, TaskRegistry } from "../lib/tasks.ts";
import { JobRun, type RunEnv, SuspendedError } from "../lib/run_job.ts";
import { listSteps, pruneSteps, stepTotals } from "../lib/steps.ts";
import { emitEvent, type EventResult, hasStaleEvents, pruneEvents } from "../lib/events.ts";
import { cancelExecution, startExecution } from "../lib/execution.ts";
import { defaultSweeps, eventRetentionSweep, type ReaperOptions } from "../lib/reaper.ts";

const REAPER: ReaperOptions = {
  holder: "h",
  leaseMs: 30_000,
  intervalMs: 5000,
  deadRetentionMs: 86_400_000,
};

function env(sql: Sql, tasks: AnyTask[]): RunEnv {
  return { sql, tasks: new TaskRegistry(tasks), log: logger("consumer"), taskTimeoutMs: 10_000 };
}

/** Claim up to `limit` visible jobs of the default queue (none: []). */
async function claimNow(sql: Sql, limit = 1): Promise<Job[]> {
  const { jobs } = await claim(sql, {
    queues: ["default"],
    limit,
    workerId: "w",
    visibilityMs: 60_000,
  });
  return jobs;
}

async function claimOne(sql: Sql): Promise<Job> {
  const [job] = await claimNow(sql);
  if (job === undefined) throw new Error("No job is claimable");
  return job;
}

/** Claim the one job as soon as it is visible (a timeout's instant). */
async function waitForClaim(sql: Sql): Promise<Job> {
  let job: Job | undefined;
  await waitFor("the job to become claimable", async () => {
    [job] = await claimNow(sql);
    return job !== undefined;
  });
  return job!;
}

/** Run one claimed job to its end with `task`. */
async function run(sql: Sql, job: Job, task: AnyTask): Promise<JobRun> {
  const r = new JobRun(job, env(sql, [task]));
  await r.settled;
  return r;
}

/** A task that waits for ("approved", payload.key) and records what each run got. */
function approvalTask(
  seen: EventResult[],
  options: { timeout?: string | number; after?: (ctx: { job: Job }) => void } = {},
): AnyTask {
  return defineTask<{ key: string }>({
    name: "t.approval",
    async handler({ key }, ctx) {
      const result = await ctx.waitForEvent("approved", { key, timeout: options.timeout });
      seen.push(result);
      options.after?.(ctx);
      return result;
    },
  });
}

async function jobRow(sql: Sql, id: string) {
  const [row] = await sql<
    { attempts: number; token: string; locked_by: string | null; due: boolean }[]
  >`
    select attempts, token::text, locked_by, run_at <= now() as due
    from shoal.jobs where id = ${id}::bigint`;
  return row;
}

Deno.test("ctx.waitForEvent() hands the job back like a sleep; emitEvent() makes it runnable and the next run gets the payload", async () => {
  await using db = await testDb();
  const seen: EventResult[] = [];
  const task = approvalTask(seen);
  await enqueue(db.sql, "t.approval", { key: "order-42" });
  const first = await claimOne(db.sql);
  const run1 = new JobRun(first, env(db.sql, [task]));
  const thrown = await run1.settled.then(() => run1.state);
  assertEquals(thrown, "suspended");
  assertEquals(seen, [], "the handler stopped at the wait");
  const row = await jobRow(db.sql, first.id);
  assertEquals([row!.attempts, row!.locked_by, row!.due], [0, null, false]);
  assertEquals(BigInt(row!.token), BigInt(first.token) + 1n, "the waiting run's token is dead");
  assertEquals(await claimNow(db.sql), [], "not claimable while it waits");
  assertEquals((await stepTotals(db.sql)).waiting, 1);
  const [wait] = await listSteps(db.sql, first.id);
  assertEquals(
    [wait!.name, wait!.kind, wait!.wait_state, wait!.event_name, wait!.event_key, wait!.wake_at],
    ["approved", "wait", "waiting", "approved", "order-42", null],
  );

  assertEquals(await emitEvent(db.sql, "approved", "order-41", { by: "someone else" }), 0);
  assertEquals(await claimNow(db.sql), [], "another key wakes nothing");
  assertEquals(await emitEvent(db.sql, "approved", "order-42", { by: "ana" }), 1);
  assertEquals((await stepTotals(db.sql)).waiting, 0);
  const second = await claimOne(db.sql);
  assertEquals(second.attempts, 1, "the woken run is the first counted attempt");
  const run2 = await run(db.sql, second, task);
  assertEquals(run2.state, "completed");
  assertEquals(seen, [{ timedOut: false, payload: { by: "ana" } }]);
  const [received] = await listSteps(db.sql, first.id);
  assertEquals([received!.wait_state, received!.result], ["received", { by: "ana" }]);
});

Deno.test("ctx.waitForEvent() takes an event emitted before the wait started, without handing the job back", async () => {
  await using db = await testDb();
  const seen: EventResult[] = [];
  const task = approvalTask(seen);
  assertEquals(await emitEvent(db.sql, "approved", "order-7", { by: "early" }), 0);
  await enqueue(db.sql, "t.approval", { key: "order-7" });
  const r = await run(db.sql, await claimOne(db.sql), task);
  assertEquals(r.state, "completed");
  assertEquals(seen, [{ timedOut: false, payload: { by: "early" } }]);
});

Deno.test("ctx.waitForEvent() with a timeout resumes with { timedOut: true }; a later emit delivers nothing to it", async () => {
  await using db = await testDb();
  const seen: EventResult[] = [];
  const task = approvalTask(seen, { timeout: 300 });
  await enqueue(db.sql, "t.approval", { key: "k" });
  const first = await claimOne(db.sql);
  assertEquals((await run(db.sql, first, task)).state, "suspended");
  const [wait] = await listSteps(db.sql, first.id);
  assert(wait!.wake_at !== null, "the timeout is recorded");
  const second = await waitForClaim(db.sql);
  // The timeout has come but its run has not recorded it yet: an emit now is too late.
  assertEquals(await emitEvent(db.sql, "approved", "k", { late: true }), 0);
  assertEquals((await run(db.sql, second, task)).state, "completed");
  assertEquals(seen, [{ timedOut: true, payload: null }]);
  assertEquals((await listSteps(db.sql, first.id))[0]!.wait_state, "timed_out");
  assertEquals(await emitEvent(db.sql, "approved", "k", { later: true }), 0);
  assertEquals((await listSteps(db.sql, first.id))[0]!.wait_state, "timed_out");
});

Deno.test("emitEvent() racing from ten connections delivers one event to the wait; one emit wakes every job waiting on its key", async () => {
  await using db = await testDb();
  const seen: EventResult[] = [];
  const task = approvalTask(seen);
  for (let i = 0; i < 3; i++) await enqueue(db.sql, "t.approval", { key: "same" });
  for (const job of await claimNow(db.sql, 3)) {
    assertEquals((await run(db.sql, job, task)).state, "suspended");
  }
  assertEquals((await stepTotals(db.sql)).waiting, 3);
  const delivered = await Promise.all(
    Array.from({ length: 10 }, (_, i) => emitEvent(db.sql, "approved", "same", { n: i })),
  );
  assertEquals(delivered.filter((n) => n > 0), [3], "one emit reached all three waits");
  const jobs = await claimNow(db.sql, 10);
  assertEquals(jobs.length, 3, "each job runnable once");
  for (const job of jobs) assertEquals((await run(db.sql, job, task)).state, "completed");
  const winner = delivered.indexOf(3);
  assertEquals(seen, Array(3).fill({ timedOut: false, payload: { n: winner } }));
  assertEquals(await claimNow(db.sql), []);
});

Deno.test("emitEvent() racing the wait's start: every job gets its event exactly once, none is left waiting", async () => {
  await using db = await testDb();
  const resumed = new Map<string, number>();
  const task = defineTask<{ key: string }>({
    name: "t.race",
    async handler({ key }, ctx) {
      const result = await ctx.waitForEvent("go", { key });
      assertEquals(result, { timedOut: false, payload: { key } });
      resumed.set(key, (resumed.get(key) ?? 0) + 1);
    },
  });
  const n = 30;
  for (let i = 0; i < n; i++) await enqueue(db.sql, "t.race", { key: `k${i}` });
  const jobs = await claimNow(db.sql, n);
  assertEquals(jobs.length, n);
  // Each job's wait and its emit start together, on separate connections.
  const runs = await Promise.all(jobs.map(async (job) => {
    const key = (job.payload as { key: string }).key;
    const [r] = await Promise.all([
      run(db.sql, job, task),
      emitEvent(db.sql, "go", key, { key }),
    ]);
    return r.state;
  }));
  const suspended = runs.filter((s) => s === "suspended").length;
  assertEquals(runs.filter((s) => s !== "suspended" && s !== "completed"), []);
  const [{ waiting }] = await db.sql<[{ waiting: number }]>`
    select count(*)::integer as waiting from shoal.job_steps where wait_state = 'waiting'`;
  assertEquals(waiting, 0, "no wait missed its event");
  const woken = await claimNow(db.sql, n);
  assertEquals(woken.length, suspended, "every job handed back is runnable again");
  for (const job of woken) assertEquals((await run(db.sql, job, task)).state, "completed");
  assertEquals(resumed.size, n);
  assertEquals([...resumed.values()].every((count) => count === 1), true, "each resumed once");
});

Deno.test("a wait that starts while an emit of its event is uncommitted waits for it and takes it (no lost wake-up)", async () => {
  await using db = await testDb();
  const seen: EventResult[] = [];
  const task = approvalTask(seen);
  await enqueue(db.sql, "t.approval", { key: "held" });
  const job = await claimOne(db.sql);
  let commit: () => void;
  const gate = new Promise<void>((resolve) => (commit = resolve));
  let emitted: () => void;
  const inserted = new Promise<void>((resolve) => (emitted = resolve));
  // The emit stores its event and looks for waits (none yet), then holds its transaction open.
  const emitting = db.sql.begin(async (tx) => {
    assertEquals(await emitEvent(tx, "approved", "held", { by: "held" }), 0);
    emitted();
    await gate;
  });
  await inserted;
  const r = new JobRun(job, env(db.sql, [task]));
  // The wait's transaction queues behind the emit's event lock (or, without the lock, would
  // record its wait and hand the job back, never to be woken: the emit already looked).
  await waitFor("the wait to block on the event lock or end", async () => {
    if (r.state !== "running") return true;
    const [row] = await db.sql<{ n: number }[]>`
      select count(*)::integer as n from pg_stat_activity
      where datname = current_database() and wait_event_type = 'Lock'`;
    return row!.n > 0;
  });
  commit!();
  await emitting;
  await r.settled;
  assertEquals(r.state, "completed", "the wait took the event once it committed");
  assertEquals(seen, [{ timedOut: false, payload: { by: "held" } }]);
});

Deno.test("a redelivered or retried run gets the recorded payload back, not a later event", async () => {
  await using db = await testDb();
  const seen: EventResult[] = [];
  const task = approvalTask(seen, {
    after: (ctx) => {
      if (ctx.job.attempts === 1) throw new Error("crash after the wait");
    },
  });
  await enqueue(db.sql, "t.approval", { key: "r" });
  assertEquals((await run(db.sql, await claimOne(db.sql), task)).state, "suspended");
  assertEquals(await emitEvent(db.sql, "approved", "r", { n: 1 }), 1);
  const second = await claimOne(db.sql);
  assertEquals((await run(db.sql, second, task)).state, "failed");
  assertEquals(await fail(db.sql, second, { error: "crash", retryInMs: 0 }), "retried");
  assertEquals(await emitEvent(db.sql, "approved", "r", { n: 2 }), 0, "its wait is done");
  // A redelivery too: the retry's claim handed back unstarted, then claimed again.
  const third = await claimOne(db.sql);
  assertEquals(await release(db.sql, [third]), [third.id]);
  const fourth = await claimOne(db.sql);
  assertEquals((await run(db.sql, fourth, task)).state, "completed");
  assertEquals(seen, [{ timedOut: false, payload: { n: 1 } }, {
    timedOut: false,
    payload: { n: 1 },
  }]);
});

Deno.test("a second wait of the same event in one job takes the next event it has not received", async () => {
  await using db = await testDb();
  const got: unknown[] = [];
  const task = defineTask({
    name: "t.rounds",
    async handler(_p, ctx) {
      got.push((await ctx.waitForEvent("review", { key: "doc", step: "round-1" })).payload);
      got.push((await ctx.waitForEvent("review", { key: "doc", step: "round-2" })).payload);
    },
  });
  await emitEvent(db.sql, "review", "doc", { round: 1 });
  await enqueue(db.sql, "t.rounds", {});
  const job = await claimOne(db.sql);
  assertEquals((await run(db.sql, job, task)).state, "suspended", "round 1 took the kept event");
  assertEquals(await emitEvent(db.sql, "review", "doc", { round: 2 }), 1);
  assertEquals((await run(db.sql, await claimOne(db.sql), task)).state, "completed");
  assertEquals(got, [{ round: 1 }, { round: 1 }, { round: 2 }]);
});

Deno.test("ctx.waitForEvent() of a claim that moved on records nothing and takes no event: the run is lost", async () => {
  await using db = await testDb();
  let moved: () => void;
  const released = new Promise<void>((resolve) => (moved = resolve));
  const seen: EventResult[] = [];
  const stale = defineTask<{ key: string }>({
    name: "t.approval",
    async handler({ key }, ctx) {
      await released;
      seen.push(await ctx.waitForEvent("approved", { key }));
    },
  });
  await emitEvent(db.sql, "approved", "s", { kept: true });
  await enqueue(db.sql, "t.approval", { key: "s" });
  const job = await claimOne(db.sql);
  const r = new JobRun(job, env(db.sql, [stale]));
  assertEquals(await release(db.sql, [job]), [job.id]);
  moved!();
  await r.settled;
  assertEquals(r.state, "lost");
  assertEquals(seen, []);
  assertEquals(await listSteps(db.sql, job.id), []);
  const row = await jobRow(db.sql, job.id);
  assertEquals([row!.locked_by, row!.due], [null, true], "as the release left it");
  // The kept event is still there for the job's next run.
  const fresh: EventResult[] = [];
  assertEquals((await run(db.sql, await claimOne(db.sql), approvalTask(fresh))).state, "completed");
  assertEquals(fresh, [{ timedOut: false, payload: { kept: true } }]);
});

Deno.test("cancelling the execution of a waiting job leaves nothing behind: the job goes, an emit reaches nothing, the record is pruned", async () => {
  await using db = await testDb();
  const task = approvalTask([]);
  const execution = await startExecution(db.sql, { task: "t.approval", payload: { key: "c" } });
  const job = await claimOne(db.sql);
  assertEquals((await run(db.sql, job, task)).state, "suspended");
  assertEquals(await cancelExecution(db.sql, execution), true);
  assertEquals(await jobRow(db.sql, job.id), undefined, "the waiting job is gone");
  assertEquals((await stepTotals(db.sql)).waiting, 0);
  assertEquals(await emitEvent(db.sql, "approved", "c", {}), 0);
  assertEquals(await claimNow(db.sql), []);
  assertEquals(await pruneSteps(db.sql, { olderThanMs: 0, limit: 10 }), 1);
  assertEquals(await listSteps(db.sql, job.id), []);
});

Deno.test("ctx.waitForEvent(), emitEvent() and shoal.emit_event refuse bad names, keys, timeouts and payloads", async () => {
  await using db = await testDb();
  const refusals: string[] = [];
  const task = defineTask({
    name: "t.bad_wait",
    async handler(_p, ctx) {
      const attempts: [string, unknown][] = [
        ["bad name", {}],
        ["e", { key: 42 }],
        ["e", { key: "x".repeat(513) }],
        ["e", { timeout: "two days" }],
        ["e", { timeout: -1 }],
        ["e", { step: "bad step" }],
        ["e", { keys: "k" }],
        ["e", "k"],
      ];
      for (const [name, options] of attempts) {
        await ctx.waitForEvent(name, options as { key: string }).catch((e: Error) =>
          refusals.push(e.message)
        );
      }
      await ctx.step("same", () => 1);
      await ctx.waitForEvent("e", { step: "same" }).catch((e: Error) => refusals.push(e.message));
    },
  });
  await enqueue(db.sql, "t.bad_wait", {});
  const r = await run(db.sql, await claimOne(db.sql), task);
  assertEquals(r.state, "completed");
  assertEquals(refusals, [
    'Invalid name for ctx.waitForEvent(): expected an event name (1 to 128 letters, digits or _.:- starting with a letter or digit), not "bad name"',
    'Invalid key for ctx.waitForEvent(): expected a string of at most 512 characters ("" for none), not 42',
    "Invalid key for ctx.waitForEvent(): expected at most 512 characters, not 513",
    'Invalid timeout for ctx.waitForEvent(): Cannot parse duration "two days": expected a number and a unit (ms, s, m, h, d), like 500ms or 10s',
    'Invalid timeout for ctx.waitForEvent(): expected a duration ("2d"), milliseconds from 0 to 315360000000 or a Date, got -1',
    'Invalid name for ctx.waitForEvent(): expected a step name (1 to 128 letters, digits or _.:- starting with a letter or digit), not "bad step"',
    'Invalid options for ctx.waitForEvent(): unknown option "keys" (known: key, timeout, step)',
    refusals[7]!,
    `Cannot wait for event "e" in job ${r.job.id} (as "same"): a step of that name was recorded`,
  ]);
  assert(refusals[7]!.startsWith("Invalid options for ctx.waitForEvent()"), refusals[7]);

  await assertRejects(() => emitEvent(db.sql, "no spaces", "k", {}), TypeError, "event name");
  await assertRejects(() => emitEvent(db.sql, "e", "x".repeat(513), {}), RangeError, "512");
  await assertRejects(
    () => emitEvent(db.sql, "e", "k", [] as unknown as Record<string, unknown>),
    TypeError,
    "expected a JSON object, got array",
  );
  await assertRejects(
    () => emitEvent(db.sql, "e", "k", { big: "x".repeat(100) }, { maxPayloadBytes: 50 }),
    RangeError,
    "over the limit of 50 bytes",
  );
  await assertRejects(
    () => db.sql`select shoal.emit_event('no spaces', 'k', '{}')`,
    Error,
    "Cannot emit event 'no spaces': its name must be",
  );
  await assertRejects(
    () => db.sql`select shoal.emit_event('e', null, '{}')`,
    Error,
    "its key must be text of at most 512 characters, not null",
  );
  await assertRejects(
    () => db.sql`select shoal.emit_event('e', 'k', '[1]')`,
    Error,
    "its payload must be a JSON object, not array",
  );
  const [{ n }] = await db.sql<[{ n: number }]>`select count(*)::integer as n from shoal.events`;
  assertEquals(n, 0, "nothing refused was stored");
});

Deno.test("pruneEvents() removes events past their retention, oldest first; a received payload stays on its wait", async () => {
  await using db = await testDb();
  const task = approvalTask([]);
  await enqueue(db.sql, "t.approval", { key: "p" });
  const job = await claimOne(db.sql);
  assertEquals((await run(db.sql, job, task)).state, "suspended");
  await emitEvent(db.sql, "approved", "p", { n: 1 });
  await emitEvent(db.sql, "approved", "q", { n: 2 });
  await emitEvent(db.sql, "approved", "r", { n: 3 });
  assertEquals(await hasStaleEvents(db.sql), false);
  await db.sql`
    update shoal.events set emitted_at = now() - interval '2 days' where key in ('p', 'q')`;
  assertEquals(await hasStaleEvents(db.sql), true);
  assertEquals(await pruneEvents(db.sql, { limit: 1 }), 1);
  // The reaper's sweep is the same call (its leader runs it every housekeeping tick).
  assert(defaultSweeps().includes(eventRetentionSweep));
  assertEquals(await eventRetentionSweep.pending!(db.sql, REAPER), true);
  assertEquals(await eventRetentionSweep.run(db.sql, REAPER, 10), 1);
  assertEquals(await eventRetentionSweep.pending!(db.sql, REAPER), false);
  assertEquals(await pruneEvents(db.sql, { limit: 10 }), 0);
  const keys = await db.sql<{ key: string }[]>`select key from shoal.events`;
  assertEquals(keys.map((k) => k.key), ["r"]);
  assertEquals((await listSteps(db.sql, job.id))[0]!.result, { n: 1 });
  await assertRejects(() => pruneEvents(db.sql, { limit: 0 }), RangeError);
});

Deno.test("SuspendedError is what a waiting handler sees", async () => {
  await using db = await testDb();
  const thrown: unknown[] = [];
  const task = defineTask({
    name: "t.sees",
    async handler(_p, ctx) {
      try {
        await ctx.waitForEvent("x", { key: "y", timeout: "1h" });
      } catch (error) {
        thrown.push(error);
        throw error;
      }
    },
  });
  await enqueue(db.sql, "t.sees", {});
  assertEquals((await run(db.sql, await claimOne(db.sql), task)).state, "suspended");
  await waitFor("the handler to see the wait's error", () => thrown.length === 1);
  assertEquals((thrown[0] as Error).constructor, SuspendedError);
});
