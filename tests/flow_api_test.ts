/**
 * lib/flow.ts against real Postgres: pausing and resuming queues, setting and clearing
 * concurrency limits, flowStatus() with the slots each limit counts, and the refusals of bad
 * arguments (before any SQL is sent).
 */
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { testDb } from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import {
  clearConcurrencyLimit,
  type ConcurrencyLimit,
  flowStatus,
  pauseQueue,
  resumeQueue,
  setConcurrencyLimit,
} from "../lib/flow.ts";
import { ack, claim, type ClaimOptions, enqueueMany, type Job, release } from "../lib/queue.ts";

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

Deno.test("pauseQueue() and resumeQueue() return whether they changed anything, and flowStatus() lists paused queues", async () => {
  await using db = await testDb();
  await enqueueKeys(db.sql, "mail", { "": 2 });
  assertEquals(await flowStatus(db.sql), { paused: [], limits: [] });
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

Deno.test("pauseQueue() and setConcurrencyLimit() take the caller's transaction: rolled back, nothing changed", async () => {
  await using db = await testDb();
  await assertRejects(
    () =>
      db.sql.begin(async (tx) => {
        assertEquals(await pauseQueue(tx, "mail"), true);
        await setConcurrencyLimit(tx, { queue: "mail", maxRunning: 1 });
        const seen = await flowStatus(tx);
        assertEquals([seen.paused.length, seen.limits.length], [1, 1]);
        throw new Error("roll back");
      }),
    Error,
    "roll back",
  );
  assertEquals(await flowStatus(db.sql), { paused: [], limits: [] });
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
  // Half started, half waiting in a prefetch buffer: both are claimed, both hold a slot.
  const claimed = await claimJobs(db.sql, "q", 100, { starting: 4 });
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
  assertEquals(await flowStatus(db.sql), { paused: [], limits: [] });
  // No limit left: every job of the queue is claimed.
  await enqueueKeys(db.sql, "q", { b: 4 });
  assertEquals((await claimJobs(db.sql, "q", 10)).length, 4);
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
      'Invalid options for setConcurrencyLimit(): unknown option "fairnessKey" (known: queue, maxRunning, key)',
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
      'Invalid options for clearConcurrencyLimit(): unknown option "fairness_key" (known: queue, key)',
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
