/**
 * lib/flow.ts against real Postgres: pausing and resuming queues, setting and clearing
 * concurrency and rate limits, holding keys, weighting fairness keys, pruning slot rows,
 * flowStatus() with all of them, and the refusals of bad arguments (before any SQL is sent).
 */
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { testDb } from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import {
  clearConcurrencyLimit,
  clearFairnessWeight,
  clearRateLimit,
  type ConcurrencyLimit,
  flowScope,
  type FlowStatus,
  flowStatus,
  hasStaleSlots,
  holdKey,
  pauseQueue,
  pruneSlots,
  resumeQueue,
  setConcurrencyLimit,
  setFairnessWeight,
  setRateLimit,
} from "../lib/flow.ts";
import { ack, claim, type ClaimOptions, enqueueMany, type Job, release } from "../lib/queue.ts";

/** flowStatus() with nothing paused, limited, held or weighted. */
const NO_FLOW: FlowStatus = { paused: [], limits: [], rate_limits: [], holds: [], weights: [] };

function claimOptions(queue: string, limit: number, extra: Partial<ClaimOptions> = {}) {
  return { queues: [queue], limit, workerId: "test:1", visibilityMs: 60_000, ...extra };
}

async function claimJobs(
  sql: Sql,
  queue: string,
  limit: number,
  extra: Partial<ClaimOptions> = {},
) {
  return (await claim(sql, claimOptions(queue, limit, extra))).jobs;
}

/** `counts[key]` jobs of each fairness key on `queue` ("" enqueues without a key). */
async function enqueueKeys(sql: Sql, queue: string, counts: Record<string, number>) {
  await enqueueMany(
    sql,
    Object.entries(counts).flatMap(([key, n]) =>
      Array.from({ length: n }, () => ({
        task: "t",
        queue,
        ...(key === "" ? {} : { fairnessKey: key }),
      }))
    ),
  );
}

/** The limits as [queue, key, max_running, slots_held] rows. */
async function limits(sql: Sql): Promise<[string, string | null, number, number][]> {
  return (await flowStatus(sql)).limits.map((l: ConcurrencyLimit) => [
    l.queue,
    l.key,
    l.max_running,
    l.slots_held,
  ]);
}

function ofKey(jobs: Job[], key: string): Job[] {
  return jobs.filter((j) => j.fairness_key === key);
}

/** How many of `jobs` each fairness key has. */
function byKey(jobs: Job[]): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const job of jobs) counts[job.fairness_key] = (counts[job.fairness_key] ?? 0) + 1;
  return counts;
}

/** The database's clock. */
async function dbNow(sql: Sql): Promise<Date> {
  const [row] = await sql<[{ now: Date }]>`select now() as now`;
  return row.now;
}

const DAY_MS = 86_400_000;

Deno.test("pauseQueue() and resumeQueue() return whether they changed anything, and flowStatus() lists paused queues", async () => {
  await using db = await testDb();
  await enqueueKeys(db.sql, "mail", { "": 2 });
  assertEquals(await flowStatus(db.sql), NO_FLOW);
  const [{ before }] = await db.sql<[{ before: Date }]>`select now() as before`;

  assertEquals(await pauseQueue(db.sql, "mail"), true);
  assertEquals(await pauseQueue(db.sql, "mail"), false);
  // A queue with no jobs yet can be paused too: its first jobs wait.
  assertEquals(await pauseQueue(db.sql, "audit"), true);
  const { paused } = await flowStatus(db.sql);
  assertEquals(paused.map((p) => p.queue), ["audit", "mail"]);
  for (const p of paused) {
    assert(p.paused_at instanceof Date && p.paused_at >= before, String(p.paused_at));
  }
  assertEquals(await claimJobs(db.sql, "mail", 10), []);

  assertEquals(await resumeQueue(db.sql, "mail"), true);
  assertEquals(await resumeQueue(db.sql, "mail"), false);
  assertEquals(await resumeQueue(db.sql, "never-paused"), false);
  assertEquals((await flowStatus(db.sql)).paused.map((p) => p.queue), ["audit"]);
  assertEquals((await claimJobs(db.sql, "mail", 10)).length, 2);
});

Deno.test("the flow functions take the caller's transaction: rolled back, nothing changed", async () => {
  await using db = await testDb();
  await assertRejects(
    () =>
      db.sql.begin(async (tx) => {
        assertEquals(await pauseQueue(tx, "mail"), true);
        await setConcurrencyLimit(tx, { queue: "mail", maxRunning: 1 });
        await setRateLimit(tx, { queue: "mail", maxStarts: 1, periodMs: 1000 });
        await holdKey(tx, { queue: "mail", key: "a", forMs: 60_000 });
        await setFairnessWeight(tx, { queue: "mail", key: "a", weight: 2 });
        const seen = await flowStatus(tx);
        assertEquals(Object.values(seen).map((rows) => rows.length), [1, 1, 1, 1, 1]);
        throw new Error("roll back");
      }),
    Error,
    "roll back",
  );
  assertEquals(await flowStatus(db.sql), NO_FLOW);
});

Deno.test("setConcurrencyLimit() sets and replaces a queue's default and a key's own limit", async () => {
  await using db = await testDb();
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 2 });
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 3, key: "b" });
  await setConcurrencyLimit(db.sql, { queue: "p", maxRunning: 0, key: "" });
  assertEquals(await limits(db.sql), [
    ["p", "", 0, 0],
    ["q", null, 2, 0],
    ["q", "b", 3, 0],
  ]);
  // Setting again replaces; key null is the default, as omitting it is.
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 5, key: null });
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 1, key: "b" });
  assertEquals(await limits(db.sql), [
    ["p", "", 0, 0],
    ["q", null, 5, 0],
    ["q", "b", 1, 0],
  ]);
  // The claim reads them: b's own limit of 1, the default of 5 for a.
  await enqueueKeys(db.sql, "q", { a: 8, b: 8 });
  const claimed = await claimJobs(db.sql, "q", 100);
  assertEquals([ofKey(claimed, "a").length, ofKey(claimed, "b").length], [5, 1]);
});

Deno.test("flowStatus() counts a key row's slots, and for a default the slots of keys without a row of their own", async () => {
  await using db = await testDb();
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 2 });
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 3, key: "b" });
  await setConcurrencyLimit(db.sql, { queue: "other", maxRunning: 4 });
  await enqueueKeys(db.sql, "q", { a: 5, b: 5, c: 5, "": 5 });
  await enqueueKeys(db.sql, "other", { a: 1 });
  // Claimed (a caller that says nothing of how many start: the claim caps nothing more).
  const claimed = await claimJobs(db.sql, "q", 100);
  assertEquals(claimed.length, 2 + 3 + 2 + 2);
  await claimJobs(db.sql, "other", 10);
  assertEquals(await limits(db.sql), [
    ["other", null, 4, 1],
    ["q", null, 2, 6], // a, c and the unkeyed jobs: 2 each
    ["q", "b", 3, 3],
  ]);

  // An ack frees a slot; a hand-back too; an expired deadline holds none.
  await ack(db.sql, ofKey(claimed, "a").slice(0, 1));
  await release(db.sql, ofKey(claimed, "b").slice(0, 1));
  await db.sql`update shoal.jobs set run_at = now() - interval '1 s'
               where id = ${ofKey(claimed, "c")[0]!.id}::bigint`;
  assertEquals(await limits(db.sql), [
    ["other", null, 4, 1],
    ["q", null, 2, 4],
    ["q", "b", 3, 2],
  ]);

  // A key given its own row leaves the default's count; cleared, it is counted there again.
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 9, key: "" });
  assertEquals(await limits(db.sql), [
    ["other", null, 4, 1],
    ["q", null, 2, 2],
    ["q", "", 9, 2],
    ["q", "b", 3, 2],
  ]);
  assertEquals(await clearConcurrencyLimit(db.sql, { queue: "q", key: "" }), true);
  assertEquals((await limits(db.sql))[1], ["q", null, 2, 4]);
});

Deno.test("clearConcurrencyLimit() removes the row it names and says whether there was one", async () => {
  await using db = await testDb();
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 1 });
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 1, key: "b" });
  assertEquals(await clearConcurrencyLimit(db.sql, { queue: "q", key: "c" }), false);
  assertEquals(await clearConcurrencyLimit(db.sql, { queue: "nope" }), false);
  assertEquals(await clearConcurrencyLimit(db.sql, { queue: "q", key: "b" }), true);
  assertEquals(await limits(db.sql), [["q", null, 1, 0]]);
  assertEquals(await clearConcurrencyLimit(db.sql, { queue: "q", key: null }), true);
  assertEquals(await clearConcurrencyLimit(db.sql, { queue: "q" }), false);
  assertEquals(await flowStatus(db.sql), NO_FLOW);
  // No limit left: every job of the queue is claimed.
  await enqueueKeys(db.sql, "q", { b: 4 });
  assertEquals((await claimJobs(db.sql, "q", 10)).length, 4);
});

Deno.test("setRateLimit() sets and replaces a queue's default and a key's own; the claim spends each key's bucket", async () => {
  await using db = await testDb();
  await setRateLimit(db.sql, { queue: "q", maxStarts: 2, periodMs: DAY_MS });
  await setRateLimit(db.sql, { queue: "q", maxStarts: 1, periodMs: DAY_MS, key: "b" });
  await setRateLimit(db.sql, { queue: "p", maxStarts: 1_000_000, periodMs: 1, key: "" });
  assertEquals((await flowStatus(db.sql)).rate_limits, [
    { queue: "p", task: null, key: "", max_starts: 1_000_000, period_ms: 1 },
    { queue: "q", task: null, key: null, max_starts: 2, period_ms: DAY_MS },
    { queue: "q", task: null, key: "b", max_starts: 1, period_ms: DAY_MS },
  ]);
  // Each key has its own bucket, full at first: b's own 1, the default's 2 for a and c.
  await enqueueKeys(db.sql, "q", { a: 5, b: 5, c: 5 });
  assertEquals(byKey(await claimJobs(db.sql, "q", 100)), { a: 2, b: 1, c: 2 });
  assertEquals(await claimJobs(db.sql, "q", 100), []);

  // Setting again replaces; key null is the default, as omitting it is.
  await setRateLimit(db.sql, { queue: "q", maxStarts: 3, periodMs: 60_000, key: null });
  await setRateLimit(db.sql, { queue: "q", maxStarts: 7, periodMs: 1000, key: "b" });
  assertEquals((await flowStatus(db.sql)).rate_limits.slice(1), [
    { queue: "q", task: null, key: null, max_starts: 3, period_ms: 60_000 },
    { queue: "q", task: null, key: "b", max_starts: 7, period_ms: 1000 },
  ]);
});

Deno.test("clearRateLimit() removes the row it names and says whether there was one", async () => {
  await using db = await testDb();
  await setRateLimit(db.sql, { queue: "q", maxStarts: 1, periodMs: DAY_MS });
  await setRateLimit(db.sql, { queue: "q", maxStarts: 1, periodMs: DAY_MS, key: "b" });
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 5 }); // not a rate limit: stays
  await enqueueKeys(db.sql, "q", { a: 3, b: 3 });
  assertEquals(byKey(await claimJobs(db.sql, "q", 100)), { a: 1, b: 1 });

  assertEquals(await clearRateLimit(db.sql, { queue: "q", key: "c" }), false);
  assertEquals(await clearRateLimit(db.sql, { queue: "nope" }), false);
  assertEquals(await clearRateLimit(db.sql, { queue: "q", key: "b" }), true);
  assertEquals(await clearRateLimit(db.sql, { queue: "q", key: "b" }), false);
  assertEquals((await flowStatus(db.sql)).rate_limits.map((r) => r.key), [null]);
  assertEquals(await clearRateLimit(db.sql, { queue: "q", key: null }), true);
  assertEquals(await clearRateLimit(db.sql, { queue: "q" }), false);
  const left = await flowStatus(db.sql);
  assertEquals([left.rate_limits, left.limits.length], [[], 1]);
  // No rate limit left: every job is claimed (the concurrency limit of 5 allows them).
  assertEquals(byKey(await claimJobs(db.sql, "q", 100)), { a: 2, b: 2 });
});

Deno.test("holdKey() holds a key until the end it returns, keeps a longer hold, and 0 lifts it", async () => {
  await using db = await testDb();
  await enqueueKeys(db.sql, "q", { a: 2, b: 2 });
  const before = await dbNow(db.sql);
  const until = await holdKey(db.sql, { queue: "q", key: "a", forMs: 60_000 });
  const after = await dbNow(db.sql);
  assert(until instanceof Date, String(until));
  const end = until.getTime();
  assert(end >= before.getTime() + 60_000 && end <= after.getTime() + 60_000, String(until));
  assertEquals((await flowStatus(db.sql)).holds, [
    { queue: "q", task: null, key: "a", held_until: until },
  ]);
  // A shorter hold leaves the longer one, and says when that ends.
  assertEquals(await holdKey(db.sql, { queue: "q", key: "a", forMs: 1000 }), until);
  assertEquals(byKey(await claimJobs(db.sql, "q", 100)), { b: 2 });

  // Lifted: it returns now, the hold is gone and the key's jobs are claimed.
  const lifted = await holdKey(db.sql, { queue: "q", key: "a", forMs: 0 });
  assert(lifted >= after && lifted.getTime() < end, String(lifted));
  assertEquals((await flowStatus(db.sql)).holds, []);
  assertEquals(byKey(await claimJobs(db.sql, "q", 100)), { a: 2 });
});

Deno.test("flowStatus() lists holds until they end, by queue and key, for any key", async () => {
  await using db = await testDb();
  const day = await holdKey(db.sql, { queue: "q", key: "z", forMs: DAY_MS });
  const empty = await holdKey(db.sql, { queue: "q", key: "", forMs: 60_000 });
  const other = await holdKey(db.sql, { queue: "a", key: "k", forMs: 60_000 });
  await holdKey(db.sql, { queue: "q", key: "brief", forMs: 1 });
  // Lifting a key never held holds nothing.
  await holdKey(db.sql, { queue: "q", key: "never", forMs: 0 });
  await new Promise((resolve) => setTimeout(resolve, 20));
  assertEquals((await flowStatus(db.sql)).holds, [
    { queue: "a", task: null, key: "k", held_until: other },
    { queue: "q", task: null, key: "", held_until: empty },
    { queue: "q", task: null, key: "z", held_until: day },
  ]);
});

Deno.test("a rate limit and a hold count a job under its concurrency key, whatever its fairness key", async () => {
  await using db = await testDb();
  await setRateLimit(db.sql, { queue: "q", maxStarts: 2, periodMs: DAY_MS, key: "api" });
  await holdKey(db.sql, { queue: "q", key: "tenant-2", forMs: 60_000 });
  await enqueueMany(db.sql, [
    ...["tenant-1", "tenant-2"].flatMap((fairnessKey) =>
      Array.from(
        { length: 3 },
        () => ({ task: "t", queue: "q", fairnessKey, concurrencyKey: "api" }),
      )
    ),
    { task: "t", queue: "q", fairnessKey: "tenant-2" }, // its flow key is tenant-2: held
    { task: "t", queue: "q", fairnessKey: "tenant-1" },
  ]);
  const jobs = await claimJobs(db.sql, "q", 100);
  // Two of the six api jobs (the hold of tenant-2 is not theirs), and tenant-1's own.
  assertEquals(jobs.length, 3);
  const [row] = await db.sql<{ n: number }[]>`
    select count(*)::integer as n from shoal.jobs
    where concurrency_key = 'api' and locked_by is not null`;
  assertEquals(row!.n, 2);
  assertEquals(byKey(await claimJobs(db.sql, "q", 100)), {});
});

/** `n` jobs of `task` with fairness key `key` on `queue` ("" enqueues without a key). */
function jobsOf(queue: string, task: string, key: string, n: number) {
  return Array.from(
    { length: n },
    () => ({ task, queue, ...(key === "" ? {} : { fairnessKey: key }) }),
  );
}

/** How many of `jobs` each task and fairness key has, as `{ "export/a": 3 }`. */
function byTaskKey(jobs: Job[]): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const job of jobs) {
    const at = `${job.task}/${job.fairness_key}`;
    counts[at] = (counts[at] ?? 0) + 1;
  }
  return counts;
}

Deno.test("setConcurrencyLimit() with a task sets the task's own limits: its jobs count apart per key, under its rows alone", async () => {
  await using db = await testDb();
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 2 });
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 9, key: "acme", task: null });
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 7, task: "export" });
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 1, key: "acme", task: "export" });
  // Setting again replaces the task's row, and only it.
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 3, task: "export" });
  assertEquals((await flowStatus(db.sql)).limits, [
    { queue: "q", task: null, key: null, max_running: 2, slots_held: 0 },
    { queue: "q", task: null, key: "acme", max_running: 9, slots_held: 0 },
    { queue: "q", task: "export", key: null, max_running: 3, slots_held: 0 },
    { queue: "q", task: "export", key: "acme", max_running: 1, slots_held: 0 },
  ]);
  assertEquals(await flowScope(db.sql, "q", "export"), "export");
  assertEquals(await flowScope(db.sql, "q", "t"), "");
  assertEquals(await flowScope(db.sql, "other", "export"), "");

  await enqueueMany(db.sql, [
    ...jobsOf("q", "export", "a", 5),
    ...jobsOf("q", "t", "a", 5),
    ...jobsOf("q", "export", "acme", 5),
    ...jobsOf("q", "t", "acme", 5),
  ]);
  // Per key: export's own 3 (acme's own 1) beside the queue's 2 (acme's own 9) for t.
  const claimed = await claimJobs(db.sql, "q", 100);
  assertEquals(byTaskKey(claimed), { "export/a": 3, "t/a": 2, "export/acme": 1, "t/acme": 5 });
  assertEquals((await flowStatus(db.sql)).limits.map((l) => l.slots_held), [2, 5, 3, 1]);
  assertEquals(await claimJobs(db.sql, "q", 100), []);
});

Deno.test("clearConcurrencyLimit() with a task removes the task's row alone; its last gone, its jobs count under the queue's limits again", async () => {
  await using db = await testDb();
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 2 });
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 3, task: "export" });
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 1, key: "acme", task: "export" });
  assertEquals(
    await clearConcurrencyLimit(db.sql, { queue: "q", key: "b", task: "export" }),
    false,
  );
  assertEquals(await clearConcurrencyLimit(db.sql, { queue: "q", task: "other" }), false);
  assertEquals(await clearConcurrencyLimit(db.sql, { queue: "q", key: "acme" }), false);
  assertEquals(
    await clearConcurrencyLimit(db.sql, { queue: "q", key: "acme", task: "export" }),
    true,
  );
  assertEquals(
    await clearConcurrencyLimit(db.sql, { queue: "q", key: "acme", task: "export" }),
    false,
  );
  assertEquals(await limits(db.sql), [["q", null, 2, 0], ["q", null, 3, 0]]);
  assertEquals(await clearConcurrencyLimit(db.sql, { queue: "q", task: "export" }), true);
  assertEquals(await clearConcurrencyLimit(db.sql, { queue: "q", task: "export" }), false);
  assertEquals(await limits(db.sql), [["q", null, 2, 0]]);
  assertEquals(await flowScope(db.sql, "q", "export"), "");

  // export has no limit of its own now: its jobs and t's share the queue's 2 per key.
  await enqueueMany(db.sql, [...jobsOf("q", "export", "a", 3), ...jobsOf("q", "t", "a", 3)]);
  assertEquals((await claimJobs(db.sql, "q", 100)).length, 2);
  assertEquals(await limits(db.sql), [["q", null, 2, 2]]);
});

Deno.test("a limit of 0 naming a task pauses that task alone; a key with its own limit for the task keeps it", async () => {
  await using db = await testDb();
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 0, task: "export" });
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 1, key: "vip", task: "export" });
  await enqueueMany(db.sql, [
    ...jobsOf("q", "export", "a", 3),
    ...jobsOf("q", "export", "vip", 3),
    ...jobsOf("q", "t", "a", 3),
  ]);
  assertEquals(byTaskKey(await claimJobs(db.sql, "q", 100)), { "t/a": 3, "export/vip": 1 });
  assertEquals(await claimJobs(db.sql, "q", 100), []);

  // Cleared: the task has no limit of its own, and the queue none: the rest run.
  await clearConcurrencyLimit(db.sql, { queue: "q", task: "export" });
  await clearConcurrencyLimit(db.sql, { queue: "q", key: "vip", task: "export" });
  assertEquals(byTaskKey(await claimJobs(db.sql, "q", 100)), { "export/a": 3, "export/vip": 2 });
});

Deno.test("setRateLimit() and clearRateLimit() with a task: the task's jobs spend their own bucket per key, the others the queue's", async () => {
  await using db = await testDb();
  await setRateLimit(db.sql, { queue: "q", maxStarts: 2, periodMs: DAY_MS });
  await setRateLimit(db.sql, { queue: "q", maxStarts: 1, periodMs: DAY_MS, task: "export" });
  await setRateLimit(db.sql, {
    queue: "q",
    maxStarts: 3,
    periodMs: DAY_MS,
    key: "acme",
    task: "export",
  });
  assertEquals((await flowStatus(db.sql)).rate_limits, [
    { queue: "q", task: null, key: null, max_starts: 2, period_ms: DAY_MS },
    { queue: "q", task: "export", key: null, max_starts: 1, period_ms: DAY_MS },
    { queue: "q", task: "export", key: "acme", max_starts: 3, period_ms: DAY_MS },
  ]);
  assertEquals(await flowScope(db.sql, "q", "export"), "export");
  await enqueueMany(db.sql, [
    ...jobsOf("q", "export", "a", 5),
    ...jobsOf("q", "t", "a", 5),
    ...jobsOf("q", "export", "acme", 5),
    ...jobsOf("q", "t", "acme", 5),
  ]);
  assertEquals(byTaskKey(await claimJobs(db.sql, "q", 100)), {
    "export/a": 1,
    "t/a": 2,
    "export/acme": 3,
    "t/acme": 2,
  });
  assertEquals(await claimJobs(db.sql, "q", 100), []);

  assertEquals(await clearRateLimit(db.sql, { queue: "q", key: "acme", task: "export" }), true);
  assertEquals(await clearRateLimit(db.sql, { queue: "q", key: "acme", task: "export" }), false);
  assertEquals(await clearRateLimit(db.sql, { queue: "q", task: "other" }), false);
  assertEquals(await clearRateLimit(db.sql, { queue: "q", task: "export" }), true);
  assertEquals((await flowStatus(db.sql)).rate_limits, [
    { queue: "q", task: null, key: null, max_starts: 2, period_ms: DAY_MS },
  ]);
  assertEquals(await flowScope(db.sql, "q", "export"), "");
});

Deno.test("a task with only a rate limit of its own has no concurrency limit on the queue: the queue's does not apply to it", async () => {
  await using db = await testDb();
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 1 });
  await setRateLimit(db.sql, { queue: "q", maxStarts: 100, periodMs: DAY_MS, task: "export" });
  await enqueueMany(db.sql, [...jobsOf("q", "export", "a", 4), ...jobsOf("q", "t", "a", 4)]);
  assertEquals(byTaskKey(await claimJobs(db.sql, "q", 100)), { "export/a": 4, "t/a": 1 });
});

Deno.test("holdKey() with a task holds the task's jobs of the key when it has limits of its own, else the key's", async () => {
  await using db = await testDb();
  await enqueueMany(db.sql, [
    ...jobsOf("q", "export", "a", 2),
    ...jobsOf("q", "t", "a", 2),
    ...jobsOf("q", "export", "b", 2),
    ...jobsOf("q", "t", "b", 2),
  ]);
  // export has no limit of its own on q: a hold naming it is the key's, as without a task.
  const onA = await holdKey(db.sql, { queue: "q", key: "a", forMs: 60_000, task: "export" });
  assertEquals((await flowStatus(db.sql)).holds, [
    { queue: "q", task: null, key: "a", held_until: onA },
  ]);

  // Now it has one (that binds nothing here): a hold naming it holds its jobs of b alone,
  // and the key's hold on a no longer holds export's jobs of a.
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 100, task: "export" });
  const onB = await holdKey(db.sql, { queue: "q", key: "b", forMs: 60_000, task: "export" });
  assertEquals((await flowStatus(db.sql)).holds, [
    { queue: "q", task: null, key: "a", held_until: onA },
    { queue: "q", task: "export", key: "b", held_until: onB },
  ]);
  assertEquals(byTaskKey(await claimJobs(db.sql, "q", 100)), { "export/a": 2, "t/b": 2 });

  // Lifted with its task: export's hold of b goes, the key's hold of a stays.
  await holdKey(db.sql, { queue: "q", key: "b", forMs: 0, task: "export" });
  assertEquals((await flowStatus(db.sql)).holds.map((h) => [h.task, h.key]), [[null, "a"]]);
  assertEquals(byTaskKey(await claimJobs(db.sql, "q", 100)), { "export/b": 2 });
  await holdKey(db.sql, { queue: "q", key: "a", forMs: 0 });
  assertEquals(byTaskKey(await claimJobs(db.sql, "q", 100)), { "t/a": 2 });
});

Deno.test("setFairnessWeight() weighs a key's jobs enqueued after it; clearFairnessWeight() puts it back to 1", async () => {
  await using db = await testDb();
  // Jobs enqueued before a weight keep their place: 1:1.
  await enqueueKeys(db.sql, "before", { heavy: 20, light: 20 });
  await setFairnessWeight(db.sql, { queue: "before", key: "heavy", weight: 3 });
  assertEquals(byKey(await claimJobs(db.sql, "before", 12)), { heavy: 6, light: 6 });

  await setFairnessWeight(db.sql, { queue: "q", key: "heavy", weight: 3 });
  await setFairnessWeight(db.sql, { queue: "q", key: "", weight: 1000 });
  await setFairnessWeight(db.sql, { queue: "q", key: "heavy", weight: 2 }); // replaces
  assertEquals((await flowStatus(db.sql)).weights, [
    { queue: "before", key: "heavy", weight: 3 },
    { queue: "q", key: "", weight: 1000 },
    { queue: "q", key: "heavy", weight: 2 },
  ]);
  await enqueueKeys(db.sql, "q", { heavy: 20, light: 20 });
  assertEquals(byKey(await claimJobs(db.sql, "q", 12)), { heavy: 8, light: 4 });

  assertEquals(await clearFairnessWeight(db.sql, { queue: "q", key: "heavy" }), true);
  assertEquals(await clearFairnessWeight(db.sql, { queue: "q", key: "heavy" }), false);
  assertEquals(await clearFairnessWeight(db.sql, { queue: "q", key: "light" }), false);
  assertEquals(await clearFairnessWeight(db.sql, { queue: "before", key: "heavy" }), true);
  assertEquals((await flowStatus(db.sql)).weights, [{ queue: "q", key: "", weight: 1000 }]);
  // Back to 1: the next jobs of both keys are enqueued 1:1.
  await enqueueKeys(db.sql, "fresh", { heavy: 20, light: 20 });
  await setFairnessWeight(db.sql, { queue: "fresh", key: "light", weight: 1 });
  assertEquals(byKey(await claimJobs(db.sql, "fresh", 12)), { heavy: 6, light: 6 });
});

Deno.test("pruneSlots() removes slot entries that hold nothing, up to its limit of rows; hasStaleSlots() says whether any is left", async () => {
  await using db = await testDb();
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 10 });
  await enqueueKeys(db.sql, "q", { a: 4 });
  // Two claims: a slot row each, naming two jobs.
  const claimed = [...await claimJobs(db.sql, "q", 2), ...await claimJobs(db.sql, "q", 2)];
  assertEquals(claimed.length, 4);
  const slots = async () =>
    (await db.sql<{ job_id: string }[]>`
      select unnest(job_ids) as job_id from shoal.concurrency_slots order by 1`)
      .map((r) => r.job_id);
  const rows = async () =>
    (await db.sql<{ n: number }[]>`select count(*)::integer as n from shoal.concurrency_slots`)[0]!
      .n;
  assertEquals(await rows(), 2);
  assertEquals(await hasStaleSlots(db.sql), false);
  assertEquals(await pruneSlots(db.sql, 100), 0);
  assertEquals((await slots()).length, 4);

  // Entries left behind by paths that do not free their slot: a job deleted outright (in
  // the first row), one unclaimed by hand under the same token (in the second); and one past
  // its deadline but still claimed, kept (its worker may extend it).
  const [gone, late, back, live] = claimed.map((j) => j.id);
  await db.sql`delete from shoal.jobs where id = ${gone!}::bigint`;
  await db.sql`update shoal.jobs set locked_by = null where id = ${back!}::bigint`;
  await db.sql`update shoal.jobs set run_at = now() - interval '1 s' where id = ${late!}::bigint`;
  assertEquals(await hasStaleSlots(db.sql), true);
  assertEquals(await pruneSlots(db.sql, 1), 1);
  assertEquals(await hasStaleSlots(db.sql), true);
  assertEquals(await pruneSlots(db.sql, 100), 1);
  assertEquals(await hasStaleSlots(db.sql), false);
  assertEquals(await slots(), [late!, live!].sort((a, b) => Number(a) - Number(b)));
  assertEquals(await rows(), 2);
  assertEquals(await limits(db.sql), [["q", null, 10, 1]]); // the late job holds no slot

  // A row none of whose jobs is still claimed goes.
  await db.sql`delete from shoal.jobs where id in (${late!}::bigint, ${live!}::bigint)`;
  assertEquals(await pruneSlots(db.sql, 100), 2);
  assertEquals(await rows(), 0);
});

/** A call that must be refused with exactly this error, before any SQL changes a row. */
interface Refusal {
  call: (sql: Sql) => Promise<unknown>;
  error: typeof TypeError | typeof RangeError;
  message: string;
}

const x = (value: unknown): never => value as never;
const NAME = "1 to 128 letters, digits or _.:- starting with a letter or digit";
const LONG_KEY = "k".repeat(257);

const REFUSALS: Refusal[] = [
  {
    call: () => pauseQueue(x({}), "q"),
    error: TypeError,
    message:
      "Invalid db for pauseQueue(): expected a database handle from connect() (a pool or a transaction), not an object",
  },
  {
    call: (sql) => pauseQueue(sql, "bad name"),
    error: TypeError,
    message: `Invalid queue for pauseQueue(): expected a queue name (${NAME}), not "bad name"`,
  },
  {
    call: (sql) => resumeQueue(sql, x(undefined)),
    error: TypeError,
    message: `Invalid queue for resumeQueue(): expected a queue name (${NAME}), not undefined`,
  },
  {
    call: (sql) => setConcurrencyLimit(sql, x(undefined)),
    error: TypeError,
    message: "Invalid options for setConcurrencyLimit(): expected an object, not undefined",
  },
  {
    call: (sql) => setConcurrencyLimit(sql, { queue: "", maxRunning: 1 }),
    error: TypeError,
    message:
      `Invalid options.queue for setConcurrencyLimit(): expected a queue name (${NAME}), not ""`,
  },
  {
    call: (sql) => setConcurrencyLimit(sql, { queue: "q", maxRunning: -1 }),
    error: RangeError,
    message:
      "Invalid options.maxRunning for setConcurrencyLimit(): expected an integer from 0 to 1000000, not -1",
  },
  {
    call: (sql) => setConcurrencyLimit(sql, { queue: "q", maxRunning: 1_000_001 }),
    error: RangeError,
    message:
      "Invalid options.maxRunning for setConcurrencyLimit(): expected an integer from 0 to 1000000, not 1000001",
  },
  {
    call: (sql) => setConcurrencyLimit(sql, { queue: "q", maxRunning: 2.5 }),
    error: RangeError,
    message:
      "Invalid options.maxRunning for setConcurrencyLimit(): expected an integer from 0 to 1000000, not 2.5",
  },
  {
    call: (sql) => setConcurrencyLimit(sql, { queue: "q", maxRunning: x("5") }),
    error: TypeError,
    message:
      'Invalid options.maxRunning for setConcurrencyLimit(): expected an integer from 0 to 1000000, not "5"',
  },
  {
    call: (sql) => setConcurrencyLimit(sql, { queue: "q", maxRunning: 1, key: LONG_KEY }),
    error: RangeError,
    message:
      'Invalid options.key for setConcurrencyLimit(): expected a string of at most 256 characters, not "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk…"',
  },
  {
    call: (sql) => setConcurrencyLimit(sql, { queue: "q", maxRunning: 1, key: x(7) }),
    error: TypeError,
    message: "Invalid options.key for setConcurrencyLimit(): expected a string or null, not 7",
  },
  {
    call: (sql) => setConcurrencyLimit(sql, { queue: "q", maxRunning: 1, key: "a\0b" }),
    error: TypeError,
    message: "Invalid options.key for setConcurrencyLimit(): contains a NUL character",
  },
  {
    // A misspelt key option must not set the queue's default instead.
    call: (sql) => setConcurrencyLimit(sql, x({ queue: "q", maxRunning: 1, fairnessKey: "a" })),
    error: TypeError,
    message:
      'Invalid options for setConcurrencyLimit(): unknown option "fairnessKey" (known: queue, maxRunning, key, task)',
  },
  {
    call: (sql) => clearConcurrencyLimit(sql, x("q")),
    error: TypeError,
    message: 'Invalid options for clearConcurrencyLimit(): expected an object, not "q"',
  },
  {
    call: (sql) => clearConcurrencyLimit(sql, x({ queue: "q", fairness_key: "a" })),
    error: TypeError,
    message:
      'Invalid options for clearConcurrencyLimit(): unknown option "fairness_key" (known: queue, key, task)',
  },
  {
    call: (sql) => clearConcurrencyLimit(sql, { queue: "q", key: LONG_KEY }),
    error: RangeError,
    message:
      'Invalid options.key for clearConcurrencyLimit(): expected a string of at most 256 characters, not "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk…"',
  },
  {
    call: (sql) => clearConcurrencyLimit(sql, { queue: x(["q"]) }),
    error: TypeError,
    message:
      `Invalid options.queue for clearConcurrencyLimit(): expected a queue name (${NAME}), not an array`,
  },
  {
    call: (sql) => setRateLimit(sql, x(undefined)),
    error: TypeError,
    message: "Invalid options for setRateLimit(): expected an object, not undefined",
  },
  {
    call: (sql) => setRateLimit(sql, x({ maxStarts: 1, periodMs: 1000 })),
    error: TypeError,
    message:
      `Invalid options.queue for setRateLimit(): expected a queue name (${NAME}), not undefined`,
  },
  {
    call: (sql) => setRateLimit(sql, { queue: "q", maxStarts: 0, periodMs: 1000 }),
    error: RangeError,
    message:
      "Invalid options.maxStarts for setRateLimit(): expected an integer from 1 to 1000000, not 0",
  },
  {
    call: (sql) => setRateLimit(sql, { queue: "q", maxStarts: 1_000_001, periodMs: 1000 }),
    error: RangeError,
    message:
      "Invalid options.maxStarts for setRateLimit(): expected an integer from 1 to 1000000, not 1000001",
  },
  {
    call: (sql) => setRateLimit(sql, { queue: "q", maxStarts: 1, periodMs: 0 }),
    error: RangeError,
    message:
      "Invalid options.periodMs for setRateLimit(): expected an integer from 1 to 86400000, not 0",
  },
  {
    call: (sql) => setRateLimit(sql, { queue: "q", maxStarts: 1, periodMs: DAY_MS + 1 }),
    error: RangeError,
    message:
      "Invalid options.periodMs for setRateLimit(): expected an integer from 1 to 86400000, not 86400001",
  },
  {
    call: (sql) => setRateLimit(sql, { queue: "q", maxStarts: 1, periodMs: 0.5 }),
    error: RangeError,
    message:
      "Invalid options.periodMs for setRateLimit(): expected an integer from 1 to 86400000, not 0.5",
  },
  {
    call: (sql) => setRateLimit(sql, { queue: "q", maxStarts: 1, periodMs: x("1s") }),
    error: TypeError,
    message:
      'Invalid options.periodMs for setRateLimit(): expected an integer from 1 to 86400000, not "1s"',
  },
  {
    call: (sql) => setRateLimit(sql, { queue: "q", maxStarts: 1, periodMs: 1, key: LONG_KEY }),
    error: RangeError,
    message:
      'Invalid options.key for setRateLimit(): expected a string of at most 256 characters, not "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk…"',
  },
  {
    // A misspelt option must not set the queue's default per second instead.
    call: (sql) => setRateLimit(sql, x({ queue: "q", maxStarts: 1, periodMs: 1, per: "1m" })),
    error: TypeError,
    message:
      'Invalid options for setRateLimit(): unknown option "per" (known: queue, maxStarts, periodMs, key, task)',
  },
  {
    call: (sql) => clearRateLimit(sql, x({ queue: "q", fairnessKey: "a" })),
    error: TypeError,
    message:
      'Invalid options for clearRateLimit(): unknown option "fairnessKey" (known: queue, key, task)',
  },
  {
    call: (sql) => clearRateLimit(sql, { queue: "q", key: x(7) }),
    error: TypeError,
    message: "Invalid options.key for clearRateLimit(): expected a string or null, not 7",
  },
  {
    call: (sql) => clearRateLimit(sql, { queue: "bad name" }),
    error: TypeError,
    message:
      `Invalid options.queue for clearRateLimit(): expected a queue name (${NAME}), not "bad name"`,
  },
  {
    call: (sql) => holdKey(sql, x({ queue: "q", forMs: 1000 })),
    error: TypeError,
    message: "Invalid options.key for holdKey(): expected a string, not undefined",
  },
  {
    // No key is not "every key": a hold is always one key's.
    call: (sql) => holdKey(sql, { queue: "q", key: x(null), forMs: 1000 }),
    error: TypeError,
    message: "Invalid options.key for holdKey(): expected a string, not null",
  },
  {
    call: (sql) => holdKey(sql, { queue: "q", key: LONG_KEY, forMs: 1000 }),
    error: RangeError,
    message:
      'Invalid options.key for holdKey(): expected a string of at most 256 characters, not "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk…"',
  },
  {
    call: (sql) => holdKey(sql, { queue: "q", key: "a\0b", forMs: 1000 }),
    error: TypeError,
    message: "Invalid options.key for holdKey(): contains a NUL character",
  },
  {
    call: (sql) => holdKey(sql, { queue: "q", key: "a", forMs: -1 }),
    error: RangeError,
    message: "Invalid options.forMs for holdKey(): expected an integer from 0 to 86400000, not -1",
  },
  {
    call: (sql) => holdKey(sql, { queue: "q", key: "a", forMs: DAY_MS + 1 }),
    error: RangeError,
    message:
      "Invalid options.forMs for holdKey(): expected an integer from 0 to 86400000, not 86400001",
  },
  {
    call: (sql) => holdKey(sql, { queue: "q", key: "a", forMs: x("30s") }),
    error: TypeError,
    message:
      'Invalid options.forMs for holdKey(): expected an integer from 0 to 86400000, not "30s"',
  },
  {
    call: (sql) => holdKey(sql, x({ queue: "q", key: "a", ms: 1000 })),
    error: TypeError,
    message: 'Invalid options for holdKey(): unknown option "ms" (known: queue, key, forMs, task)',
  },
  {
    call: (sql) => setFairnessWeight(sql, x({ queue: "q", weight: 2 })),
    error: TypeError,
    message: "Invalid options.key for setFairnessWeight(): expected a string, not undefined",
  },
  {
    call: (sql) => setFairnessWeight(sql, { queue: "q", key: "a", weight: 0 }),
    error: RangeError,
    message:
      "Invalid options.weight for setFairnessWeight(): expected an integer from 1 to 1000, not 0",
  },
  {
    call: (sql) => setFairnessWeight(sql, { queue: "q", key: "a", weight: 1001 }),
    error: RangeError,
    message:
      "Invalid options.weight for setFairnessWeight(): expected an integer from 1 to 1000, not 1001",
  },
  {
    call: (sql) => setFairnessWeight(sql, { queue: "q", key: "a", weight: 1.5 }),
    error: RangeError,
    message:
      "Invalid options.weight for setFairnessWeight(): expected an integer from 1 to 1000, not 1.5",
  },
  {
    call: (sql) => setFairnessWeight(sql, { queue: "q", key: LONG_KEY, weight: 2 }),
    error: RangeError,
    message:
      'Invalid options.key for setFairnessWeight(): expected a string of at most 256 characters, not "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk…"',
  },
  {
    call: (sql) => setFairnessWeight(sql, x({ queue: "q", fairnessKey: "a", weight: 2 })),
    error: TypeError,
    message:
      'Invalid options for setFairnessWeight(): unknown option "fairnessKey" (known: queue, key, weight)',
  },
  {
    call: (sql) => clearFairnessWeight(sql, { queue: "q", key: x(null) }),
    error: TypeError,
    message: "Invalid options.key for clearFairnessWeight(): expected a string, not null",
  },
  {
    call: (sql) => clearFairnessWeight(sql, { queue: "", key: "a" }),
    error: TypeError,
    message:
      `Invalid options.queue for clearFairnessWeight(): expected a queue name (${NAME}), not ""`,
  },
  {
    call: (sql) => clearFairnessWeight(sql, x({ queue: "q", key: "a", weight: 1 })),
    error: TypeError,
    message:
      'Invalid options for clearFairnessWeight(): unknown option "weight" (known: queue, key)',
  },
  {
    call: (sql) => setConcurrencyLimit(sql, { queue: "q", maxRunning: 1, task: "bad name" }),
    error: TypeError,
    message:
      `Invalid options.task for setConcurrencyLimit(): expected a task name (${NAME}), not "bad name"`,
  },
  {
    call: (sql) => setConcurrencyLimit(sql, { queue: "q", maxRunning: 1, task: "" }),
    error: TypeError,
    message:
      `Invalid options.task for setConcurrencyLimit(): expected a task name (${NAME}), not ""`,
  },
  {
    call: (sql) => setConcurrencyLimit(sql, { queue: "q", maxRunning: 1, task: x(7) }),
    error: TypeError,
    message:
      `Invalid options.task for setConcurrencyLimit(): expected a task name (${NAME}), not 7`,
  },
  {
    call: (sql) => setConcurrencyLimit(sql, { queue: "q", maxRunning: 1, task: "t".repeat(129) }),
    error: TypeError,
    message:
      `Invalid options.task for setConcurrencyLimit(): expected a task name (${NAME}), not "tttttttttttttttttttttttttttttttttttttttt…"`,
  },
  {
    // A misspelt task option must not set the queue's own limit instead.
    call: (sql) => setConcurrencyLimit(sql, x({ queue: "q", maxRunning: 1, tasks: "export" })),
    error: TypeError,
    message:
      'Invalid options for setConcurrencyLimit(): unknown option "tasks" (known: queue, maxRunning, key, task)',
  },
  {
    call: (sql) => clearConcurrencyLimit(sql, { queue: "q", task: "-export" }),
    error: TypeError,
    message:
      `Invalid options.task for clearConcurrencyLimit(): expected a task name (${NAME}), not "-export"`,
  },
  {
    // A misspelt task option must not clear the queue's default instead.
    call: (sql) => clearConcurrencyLimit(sql, x({ queue: "q", taskName: "export" })),
    error: TypeError,
    message:
      'Invalid options for clearConcurrencyLimit(): unknown option "taskName" (known: queue, key, task)',
  },
  {
    call: (sql) => setRateLimit(sql, { queue: "q", maxStarts: 1, periodMs: 1, task: x(["a"]) }),
    error: TypeError,
    message:
      `Invalid options.task for setRateLimit(): expected a task name (${NAME}), not an array`,
  },
  {
    call: (sql) => clearRateLimit(sql, { queue: "q", task: "a b" }),
    error: TypeError,
    message: `Invalid options.task for clearRateLimit(): expected a task name (${NAME}), not "a b"`,
  },
  {
    call: (sql) => clearRateLimit(sql, x({ queue: "q", Task: "export" })),
    error: TypeError,
    message:
      'Invalid options for clearRateLimit(): unknown option "Task" (known: queue, key, task)',
  },
  {
    call: (sql) => holdKey(sql, { queue: "q", key: "a", forMs: 1000, task: "" }),
    error: TypeError,
    message: `Invalid options.task for holdKey(): expected a task name (${NAME}), not ""`,
  },
  {
    call: (sql) => flowScope(sql, "q", x(null)),
    error: TypeError,
    message: `Invalid task for flowScope(): expected a task name (${NAME}), not null`,
  },
  {
    call: (sql) => pruneSlots(sql, 0),
    error: RangeError,
    message: "Invalid limit for pruneSlots(): expected an integer from 1 to 2147483647, not 0",
  },
  {
    call: (sql) => pruneSlots(sql, x("100")),
    error: TypeError,
    message: 'Invalid limit for pruneSlots(): expected an integer from 1 to 2147483647, not "100"',
  },
  {
    call: () => pruneSlots(x({}), 100),
    error: TypeError,
    message:
      "Invalid db for pruneSlots(): expected a database handle from connect() (a pool or a transaction), not an object",
  },
  {
    call: () => flowStatus(x(null)),
    error: TypeError,
    message:
      "Invalid db for flowStatus(): expected a database handle from connect() (a pool or a transaction), not null",
  },
];

Deno.test("the flow functions refuse bad arguments in one line naming the function, and change nothing", async () => {
  await using db = await testDb();
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 7 });
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 7, key: "a" });
  await setRateLimit(db.sql, { queue: "q", maxStarts: 7, periodMs: 1000 });
  await setRateLimit(db.sql, { queue: "q", maxStarts: 7, periodMs: 1000, key: "a" });
  await holdKey(db.sql, { queue: "q", key: "a", forMs: 60_000 });
  await setFairnessWeight(db.sql, { queue: "q", key: "a", weight: 7 });
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 7, task: "export" });
  await setRateLimit(db.sql, { queue: "q", maxStarts: 7, periodMs: 1000, task: "export" });
  await holdKey(db.sql, { queue: "q", key: "a", forMs: 60_000, task: "export" });
  const before = await flowStatus(db.sql);
  const wrong: string[] = [];
  for (const [i, { call, error, message }] of REFUSALS.entries()) {
    let caught: unknown;
    try {
      await call(db.sql);
    } catch (e) {
      caught = e;
    }
    const got = caught instanceof Error ? `${caught.name}: ${caught.message}` : String(caught);
    if (!(caught instanceof error) || caught.message !== message) {
      wrong.push(`case ${i}: expected ${error.name}: ${message}\n  got ${got}`);
    }
  }
  assertEquals(wrong, []);
  assertEquals(await flowStatus(db.sql), before);
});

Deno.test("setConcurrencyLimit() takes 0 and 1000000 and a key of 256 characters", async () => {
  await using db = await testDb();
  const key = "k".repeat(256);
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 0 });
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 1_000_000, key });
  assertEquals(await limits(db.sql), [["q", null, 0, 0], ["q", key, 1_000_000, 0]]);
  // 0 holds every job of a key back, none failed.
  await enqueueKeys(db.sql, "q", { a: 2 });
  assertEquals(await claimJobs(db.sql, "q", 10), []);
});
