import { checkPayload } from "../lib/names.ts";
/**
 * The queue core (lib/queue.ts) against real Postgres: enqueue, dedupe keys, claim order,
 * fairness, SKIP LOCKED, fencing, fail / retry / dead-letter / poison, release, extend.
 * Every test gets a fresh database and calls the lib functions directly.
 */
import postgres from "postgres";
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { testDb, waitFor } from "./helpers.ts";
import type { Db, Sql } from "../lib/db.ts";
import {
  ack,
  ackClaimed,
  backoffMs,
  claim,
  type ClaimOptions,
  enqueue,
  enqueueMany,
  extend,
  fail,
  type Job,
  type JobRef,
  release,
} from "../lib/queue.ts";

/** Claim options for a test: a long visibility unless the test is about expiry. */
function claimOptions(queues: string[], limit: number, visibilityMs = 60_000): ClaimOptions {
  return { queues, limit, workerId: "test:1", visibilityMs };
}

/** Claim exactly one job from `queue` and fail the test if there is none. */
async function claimOne(db: Db, queue = "default", visibilityMs = 60_000): Promise<Job> {
  const { jobs, poisoned } = await claim(db, claimOptions([queue], 1, visibilityMs));
  assertEquals(poisoned, []);
  assertEquals(jobs.length, 1, `expected one job on ${queue}`);
  return jobs[0]!;
}

function ref(job: Job): JobRef {
  return { id: job.id, token: job.token };
}

async function countJobs(sql: Sql): Promise<number> {
  const [row] = await sql<{ n: number }[]>`select count(*)::integer as n from shoal.jobs`;
  return row!.n;
}

async function countDead(sql: Sql): Promise<number> {
  const [row] = await sql<{ n: number }[]>`select count(*)::integer as n from shoal.dead_jobs`;
  return row!.n;
}

async function dbNow(sql: Sql): Promise<Date> {
  const [row] = await sql<{ now: Date }[]>`select clock_timestamp() as now`;
  return row!.now;
}

interface JobRow {
  id: string;
  queue: string;
  task: string;
  payload: Record<string, unknown>;
  priority: number;
  fairness_key: string;
  run_at: Date;
  attempts: number;
  max_attempts: number;
  token: string;
  key: string | null;
  locked_by: string | null;
  locked_at: Date | null;
  last_error: string | null;
  errors: { attempt: number; at: string; error: string }[];
}

async function jobRow(sql: Sql, id: string): Promise<JobRow | undefined> {
  const [row] = await sql<JobRow[]>`
    select id, queue, task, payload, priority, fairness_key, run_at, attempts, max_attempts,
      token, key, locked_by, locked_at, last_error, errors
    from shoal.jobs where id = ${id}::bigint`;
  return row;
}

/** The job's row, failing the test when it is gone. */
async function liveJob(sql: Sql, id: string): Promise<JobRow> {
  const row = await jobRow(sql, id);
  if (row === undefined) throw new Error(`Job ${id} is not in shoal.jobs`);
  return row;
}

/** Wait until a claim on `queue` returns something (a visibility deadline passed). */
async function claimWhenVisible(
  db: Db,
  queue: string,
  visibilityMs: number,
): Promise<Awaited<ReturnType<typeof claim>>> {
  return await waitFor(
    `a visible job on ${queue}`,
    async () => {
      const result = await claim(db, claimOptions([queue], 10, visibilityMs));
      return result.jobs.length + result.poisoned.length > 0 ? result : null;
    },
    20_000,
    20,
  );
}

/** Separate single-connection pools, connected before use so they start together. */
async function openConnections(url: string, n: number): Promise<Sql[]> {
  const pools: Sql[] = [];
  for (let i = 0; i < n; i++) {
    const pool = postgres(url, {
      max: 1,
      onnotice: () => {},
      connection: { application_name: `shoal test ${i}`, statement_timeout: 20_000 },
    }) as unknown as Sql;
    pools.push(pool);
  }
  await Promise.all(pools.map((p) => p`select 1`));
  return pools;
}

async function closeConnections(pools: Sql[]): Promise<void> {
  await Promise.all(pools.map((p) => p.end({ timeout: 5 })));
}

// ---------------------------------------------------------------------------------------
// enqueue() / enqueueMany()

Deno.test("enqueue() stores a job with the default options", async () => {
  await using db = await testDb();
  const before = await dbNow(db.sql);
  const id = await enqueue(db.sql, "send_mail");
  const after = await dbNow(db.sql);
  assert.match(id, /^[0-9]+$/);
  const row = await liveJob(db.sql, id);
  assertEquals(
    { ...row, run_at: undefined },
    {
      id,
      queue: "default",
      task: "send_mail",
      payload: {},
      priority: 0,
      fairness_key: "",
      run_at: undefined,
      attempts: 0,
      max_attempts: 25,
      token: "0",
      key: null,
      locked_by: null,
      locked_at: null,
      last_error: null,
      errors: [],
    },
  );
  assert(row.run_at >= before && row.run_at <= after, `run_at ${row.run_at.toISOString()}`);
});

Deno.test("enqueue() applies queue, runAt, priority, fairnessKey, maxAttempts and key", async () => {
  await using db = await testDb();
  const runAt = new Date("2031-05-06T07:08:09.123Z");
  const id = await enqueue(db.sql, "resize", { image: 7, tags: ["a", "b"] }, {
    queue: "images",
    runAt,
    priority: 12,
    fairnessKey: "tenant-9",
    maxAttempts: 3,
    key: "image-7",
  });
  const row = await liveJob(db.sql, id);
  assertEquals(row.queue, "images");
  assertEquals(row.task, "resize");
  assertEquals(row.payload, { image: 7, tags: ["a", "b"] });
  assertEquals(row.run_at.toISOString(), "2031-05-06T07:08:09.123Z");
  assertEquals(row.priority, 12);
  assertEquals(row.fairness_key, "tenant-9");
  assertEquals(row.max_attempts, 3);
  assertEquals(row.key, "image-7");
  assertEquals(row.attempts, 0);
});

Deno.test("enqueueMany() of 10,000 jobs returns 10,000 ids in input order", async () => {
  await using db = await testDb();
  const specs = Array.from({ length: 10_000 }, (_, i) => ({ task: "count", payload: { i } }));
  const results = await enqueueMany(db.sql, specs);
  assertEquals(results.length, 10_000);
  assertEquals(results.filter((r) => r.inserted).length, 10_000);
  const rows = await db.sql<{ id: string; i: number }[]>`
    select id, (payload->>'i')::integer as i from shoal.jobs`;
  assertEquals(rows.length, 10_000);
  const indexById = new Map(rows.map((r) => [r.id, r.i]));
  results.forEach((r, i) => assertEquals(indexById.get(r.id), i, `result ${i} is job ${r.id}`));
  for (let i = 1; i < results.length; i++) {
    assert(BigInt(results[i]!.id) > BigInt(results[i - 1]!.id), `ids ascend at ${i}`);
  }
});

Deno.test("enqueueMany() hands out ids in input order across queues and fairness keys", async () => {
  await using db = await testDb();
  const results = await enqueueMany(db.sql, [
    { task: "t", queue: "b" },
    { task: "t", queue: "a" },
    { task: "t", queue: "b", fairnessKey: "z" },
    { task: "t", queue: "a", fairnessKey: "y" },
    { task: "t", queue: "a" },
  ]);
  const ids = results.map((r) => BigInt(r.id));
  const sorted = [...ids].sort((x, y) => (x < y ? -1 : x > y ? 1 : 0));
  assertEquals(ids, sorted);
  const rows = await db.sql<{ id: string; queue: string; fairness_key: string }[]>`
    select id, queue, fairness_key from shoal.jobs order by id`;
  assertEquals(rows.map((r) => [r.queue, r.fairness_key]), [
    ["b", ""],
    ["a", ""],
    ["b", "z"],
    ["a", "y"],
    ["a", ""],
  ]);
});

Deno.test("enqueueMany() of an empty list returns [] and inserts nothing", async () => {
  await using db = await testDb();
  assertEquals(await enqueueMany(db.sql, []), []);
  assertEquals(await countJobs(db.sql), 0);
});

Deno.test("enqueue() inside a caller's transaction is rolled back with it", async () => {
  await using db = await testDb();
  await assertRejects(
    () =>
      db.sql.begin(async (tx) => {
        await enqueue(tx, "one", { n: 1 });
        await enqueueMany(tx, [{ task: "two" }, { task: "three", key: "k3" }]);
        const [row] = await tx<{ n: number }[]>`select count(*)::integer as n from shoal.jobs`;
        assertEquals(row!.n, 3, "the transaction sees its own jobs");
        throw new Error("caller rolls back");
      }),
    Error,
    "caller rolls back",
  );
  assertEquals(await countJobs(db.sql), 0);
  // The rolled-back dedupe key is free, and a committed transaction keeps its job.
  const id = await db.sql.begin((tx) => enqueue(tx, "three", {}, { key: "k3" }));
  assertEquals((await jobRow(db.sql, id))?.key, "k3");
  assertEquals(await countJobs(db.sql), 1);
});

Deno.test("enqueue() rejects invalid queue and task names before anything is written", async () => {
  await using db = await testDb();
  const badNames = ["", "-starts-with-dash", "has space", "semi;colon", "é", "x".repeat(129)];
  for (const name of badNames) {
    await assertRejects(
      () => enqueue(db.sql, "task", {}, { queue: name }),
      TypeError,
      "Invalid options.queue for enqueue(): expected a queue name",
    );
    await assertRejects(
      () => enqueue(db.sql, name),
      TypeError,
      "Invalid task for enqueue(): expected a task name",
    );
  }
  // One bad job rejects the whole batch.
  await assertRejects(
    () => enqueueMany(db.sql, [{ task: "ok" }, { task: "bad name" }, { task: "ok" }]),
    TypeError,
    'Invalid jobs[1].task for enqueueMany(): expected a task name (1 to 128 letters, digits or _.:- starting with a letter or digit), not "bad name"',
  );
  // The longest legal name is accepted.
  await enqueue(db.sql, "t".repeat(128), {}, { queue: "Q0_.:-".padEnd(128, "q") });
  assertEquals(await countJobs(db.sql), 1);
});

Deno.test("enqueue() rejects payloads that are not JSON objects", async () => {
  await using db = await testDb();
  const cases: [unknown, string][] = [
    [[1, 2], "got array"],
    [null, "got null"],
    ["text", "got string"],
    [42, "got number"],
    [new Date(), "got object"],
  ];
  for (const [payload, message] of cases) {
    await assertRejects(
      () => enqueue(db.sql, "task", payload as Record<string, unknown>),
      TypeError,
      `expected a JSON object, ${message}`,
    );
  }
  await assertRejects(
    () => enqueue(db.sql, "task", { n: 1n } as Record<string, unknown>),
    TypeError,
    "cannot be serialised as JSON",
  );
  assertEquals(await countJobs(db.sql), 0);
});

Deno.test("enqueue() rejects NUL characters, which Postgres cannot store", async () => {
  await using db = await testDb();
  for (const payload of [{ s: "a\0b" }, { ["k\0"]: 1 }, { deep: [{ s: "\\\0" }] }]) {
    await assertRejects(
      () => enqueue(db.sql, "task", payload),
      TypeError,
      "Invalid payload for enqueue(): contains a NUL character",
    );
  }
  await assertRejects(
    () => enqueue(db.sql, "task", {}, { key: "a\0" }),
    TypeError,
    "Invalid options.key for enqueue(): contains a NUL character",
  );
  await assertRejects(
    () => enqueue(db.sql, "task", {}, { fairnessKey: "\0" }),
    TypeError,
    "Invalid options.fairnessKey for enqueue(): contains a NUL character",
  );
  assertEquals(await countJobs(db.sql), 0);
  // A backslash followed by "u0000" is ordinary text.
  const id = await enqueue(db.sql, "task", { s: "\\u0000", t: "\\\\u0000" });
  assertEquals((await liveJob(db.sql, id)).payload, { s: "\\u0000", t: "\\\\u0000" });
});

Deno.test("enqueue() rejects a payload over the size limit", async () => {
  await using db = await testDb();
  await assertRejects(
    () => enqueue(db.sql, "task", { s: "x".repeat(1_048_576) }),
    RangeError,
    "1048585 bytes, over the limit of 1048576 bytes",
  );
  await assertRejects(
    () => enqueue(db.sql, "task", { s: "x".repeat(100) }, { maxPayloadBytes: 100 }),
    RangeError,
    "109 bytes, over the limit of 100 bytes",
  );
  await assertRejects(
    () =>
      enqueueMany(db.sql, [{ task: "a" }, { task: "b", payload: { s: "é".repeat(50) } }], {
        maxPayloadBytes: 100,
      }),
    RangeError,
    "109 bytes",
  );
  assertEquals(await countJobs(db.sql), 0);
  await enqueue(db.sql, "task", { s: "x".repeat(91) }, { maxPayloadBytes: 100 });
  assertEquals(await countJobs(db.sql), 1);
});

Deno.test("enqueue() rejects bad priority, maxAttempts, runAt and keys", async () => {
  await using db = await testDb();
  for (const priority of [1.5, 32768, -32768, Number.NaN, Infinity]) {
    await assertRejects(
      () => enqueue(db.sql, "task", {}, { priority }),
      RangeError,
      "Invalid options.priority for enqueue(): expected an integer from -32767 to 32767",
    );
  }
  await assertRejects(
    () => enqueue(db.sql, "task", {}, { priority: "1" as unknown as number }),
    TypeError,
    "Invalid options.priority for enqueue()",
  );
  for (const maxAttempts of [0, -1, 1001, 2.5, Number.NaN]) {
    await assertRejects(
      () => enqueue(db.sql, "task", {}, { maxAttempts }),
      RangeError,
      "Invalid options.maxAttempts for enqueue(): expected an integer from 1 to 1000",
    );
  }
  await assertRejects(
    () => enqueue(db.sql, "task", {}, { runAt: new Date(Number.NaN) }),
    TypeError,
    "Invalid options.runAt for enqueue(): expected a valid Date, not an invalid Date",
  );
  await assertRejects(
    () => enqueue(db.sql, "task", {}, { key: "" }),
    TypeError,
    'Invalid options.key for enqueue(): expected a string of 1 to 512 characters, not ""',
  );
  await assertRejects(
    () => enqueue(db.sql, "task", {}, { key: "k".repeat(513) }),
    RangeError,
    "Invalid options.key for enqueue(): expected a string of 1 to 512 characters",
  );
  await assertRejects(
    () => enqueue(db.sql, "task", {}, { fairnessKey: "f".repeat(257) }),
    RangeError,
    "Invalid options.fairnessKey for enqueue(): expected a string of 1 to 256 characters",
  );
  assertEquals(await countJobs(db.sql), 0);
  // The bounds themselves are accepted.
  await enqueue(db.sql, "task", {}, { priority: 32767, maxAttempts: 1000 });
  await enqueue(db.sql, "task", {}, { priority: -32767, maxAttempts: 1 });
  assertEquals(await countJobs(db.sql), 2);
});

// ---------------------------------------------------------------------------------------
// Dedupe keys

Deno.test("enqueue() with a pending key returns the existing id and inserts nothing", async () => {
  await using db = await testDb();
  const [first] = await enqueueMany(db.sql, [{ task: "sync", payload: { v: 1 }, key: "user-1" }]);
  const [second] = await enqueueMany(db.sql, [{ task: "sync", payload: { v: 2 }, key: "user-1" }]);
  assertEquals(first!.inserted, true);
  assertEquals(second, { id: first!.id, inserted: false });
  assertEquals(await enqueue(db.sql, "other_task", {}, { key: "user-1" }), first!.id);
  assertEquals(await countJobs(db.sql), 1);
  assertEquals((await jobRow(db.sql, first!.id))?.payload, { v: 1 });
  // While the job runs its key is still held.
  const job = await claimOne(db.sql);
  assertEquals(job.id, first!.id);
  assertEquals(await enqueue(db.sql, "sync", {}, { key: "user-1" }), first!.id);
  assertEquals(await countJobs(db.sql), 1);
});

Deno.test("enqueue() with the same key on another queue is a different job", async () => {
  await using db = await testDb();
  const a = await enqueue(db.sql, "sync", {}, { key: "k", queue: "a" });
  const b = await enqueue(db.sql, "sync", {}, { key: "k", queue: "b" });
  assert(a !== b);
  assertEquals(await enqueue(db.sql, "sync", {}, { key: "k", queue: "a" }), a);
  assertEquals(await enqueue(db.sql, "sync", {}, { key: "k", queue: "b" }), b);
  assertEquals(await countJobs(db.sql), 2);
});

Deno.test("enqueue() key is free again after the job is acked", async () => {
  await using db = await testDb();
  const first = await enqueue(db.sql, "sync", {}, { key: "k" });
  const job = await claimOne(db.sql);
  assertEquals(await ack(db.sql, [ref(job)]), [first]);
  const [again] = await enqueueMany(db.sql, [{ task: "sync", key: "k" }]);
  assertEquals(again!.inserted, true);
  assert(again!.id !== first);
  assertEquals(await countJobs(db.sql), 1);
});

Deno.test("enqueue() key is free again after the job is dead-lettered", async () => {
  await using db = await testDb();
  const first = await enqueue(db.sql, "sync", {}, { key: "k" });
  const job = await claimOne(db.sql);
  assertEquals(
    await fail(db.sql, ref(job), { error: "boom", retryInMs: 0, permanent: true }),
    "dead",
  );
  const [again] = await enqueueMany(db.sql, [{ task: "sync", key: "k" }]);
  assertEquals(again!.inserted, true);
  assert(again!.id !== first);
  assertEquals(await countJobs(db.sql), 1);
  assertEquals(await countDead(db.sql), 1);
});

Deno.test("enqueueMany() with duplicate keys in one batch inserts each key once", async () => {
  await using db = await testDb();
  const results = await enqueueMany(db.sql, [
    { task: "t", key: "a", payload: { n: 0 } },
    { task: "t", key: "a", payload: { n: 1 } },
    { task: "t", key: "b", payload: { n: 2 } },
    { task: "t", payload: { n: 3 } },
    { task: "t", key: "a", payload: { n: 4 } },
    { task: "t", key: "a", queue: "other", payload: { n: 5 } },
  ]);
  assertEquals(results.map((r) => r.inserted), [true, false, true, true, false, true]);
  assertEquals(results[1]!.id, results[0]!.id);
  assertEquals(results[4]!.id, results[0]!.id);
  assertEquals(new Set(results.map((r) => r.id)).size, 4);
  const rows = await db.sql<{ id: string; n: number }[]>`
    select id, (payload->>'n')::integer as n from shoal.jobs order by id`;
  assertEquals([...rows], [
    { id: results[0]!.id, n: 0 },
    { id: results[2]!.id, n: 2 },
    { id: results[3]!.id, n: 3 },
    { id: results[5]!.id, n: 5 },
  ]);
});

Deno.test("enqueue() of one key from many connections at once yields one job", async () => {
  await using db = await testDb();
  const pools = await openConnections(db.url, 10);
  try {
    for (let round = 0; round < 5; round++) {
      const key = `race-${round}`;
      const results = await Promise.all(
        pools.map((p, i) => enqueueMany(p, [{ task: "t", key, payload: { i } }])),
      );
      const ids = new Set(results.map(([r]) => r!.id));
      assertEquals(ids.size, 1, `round ${round}: ${[...ids]}`);
      assertEquals(results.filter(([r]) => r!.inserted).length, 1);
    }
    // Same race with each enqueue inside a transaction that stays open a while: the others
    // wait on the first insert, then find its job once it commits.
    const results = await Promise.all(pools.map((p) =>
      p.begin(async (tx) => {
        const id = await enqueue(tx, "t", {}, { key: "held" });
        await new Promise((resolve) => setTimeout(resolve, 50));
        return id;
      })
    ));
    assertEquals(new Set(results).size, 1);
    assertEquals(await countJobs(db.sql), 6);
  } finally {
    await closeConnections(pools);
  }
});

Deno.test("enqueue() waiting on a key whose holder rolls back inserts its own job", async () => {
  await using db = await testDb();
  const [holder, waiter] = await openConnections(db.url, 2);
  try {
    let heldId = "";
    let waiting: Promise<string> | null = null;
    await assertRejects(
      () =>
        holder!.begin(async (tx) => {
          heldId = await enqueue(tx, "t", { who: "holder" }, { key: "k" });
          waiting = enqueue(waiter!, "t", { who: "waiter" }, { key: "k" });
          await waitFor("the second enqueue to wait for the first", async () => {
            const [row] = await db.sql<{ n: number }[]>`
              select count(*)::integer as n from pg_stat_activity
              where datname = current_database() and wait_event_type = 'Lock'`;
            return row!.n === 1;
          });
          throw new Error("holder rolls back");
        }),
      Error,
      "holder rolls back",
    );
    const waiterId = await waiting!;
    assert(waiterId !== heldId);
    const row = await jobRow(db.sql, waiterId);
    assertEquals(row?.payload, { who: "waiter" });
    assertEquals(await countJobs(db.sql), 1);
  } finally {
    await closeConnections([holder!, waiter!]);
  }
});

// ---------------------------------------------------------------------------------------
// claim()

Deno.test("claim() does not take jobs whose run_at is in the future", async () => {
  await using db = await testDb();
  await enqueue(db.sql, "later", {}, { runAt: new Date(Date.now() + 3_600_000) });
  const now = await enqueue(db.sql, "now");
  const past = await enqueue(db.sql, "past", {}, { runAt: new Date(Date.now() - 3_600_000) });
  const { jobs } = await claim(db.sql, claimOptions(["default"], 10));
  assertEquals(jobs.map((j) => j.id).sort(), [now, past].sort());
  assertEquals((await claim(db.sql, claimOptions(["default"], 10))).jobs, []);
});

Deno.test("claim() takes higher priority first", async () => {
  await using db = await testDb();
  const ids: Record<number, string> = {};
  for (const priority of [0, 5, -3, 10, 5]) {
    ids[priority] ??= await enqueue(db.sql, `p${priority}`, {}, { priority });
  }
  const five2 = await enqueue(db.sql, "p5b", {}, { priority: 5 });
  const order: string[] = [];
  for (let i = 0; i < 5; i++) order.push((await claimOne(db.sql)).id);
  assertEquals(order, [ids[10], ids[5], five2, ids[0], ids[-3]]);
});

Deno.test("claim() of a batch takes the top jobs by priority", async () => {
  await using db = await testDb();
  const low = await enqueueMany(db.sql, Array.from({ length: 5 }, () => ({ task: "low" })));
  const high = await enqueueMany(
    db.sql,
    Array.from({ length: 3 }, () => ({ task: "high", priority: 1 })),
  );
  const { jobs } = await claim(db.sql, claimOptions(["default"], 4));
  assertEquals(
    jobs.map((j) => j.id).sort(),
    [...high.map((r) => r.id), low[0]!.id].sort(),
  );
});

Deno.test("claim() within a priority takes the oldest first", async () => {
  await using db = await testDb();
  const ids: string[] = [];
  for (let i = 0; i < 5; i++) ids.push(await enqueue(db.sql, "t", { i }));
  const batch = await enqueueMany(db.sql, [{ task: "t" }, { task: "t" }]);
  ids.push(...batch.map((r) => r.id));
  const order: string[] = [];
  for (let i = 0; i < ids.length; i++) order.push((await claimOne(db.sql)).id);
  assertEquals(order, ids);
});

Deno.test("claim() serves a new fairness key within the next jobs despite a backlog", async () => {
  await using db = await testDb();
  const q = "fair";
  const a = await enqueueMany(
    db.sql,
    Array.from(
      { length: 1_000 },
      (_, i) => ({ task: "a", queue: q, fairnessKey: "A", payload: { i } }),
    ),
  );
  const b = await enqueueMany(
    db.sql,
    Array.from(
      { length: 10 },
      (_, i) => ({ task: "b", queue: q, fairnessKey: "B", payload: { i } }),
    ),
  );
  const first = await claim(db.sql, claimOptions([q], 20));
  assertEquals(
    first.jobs.map((j) => j.id).sort(),
    [...a.slice(0, 10), ...b].map((r) => r.id).sort(),
  );

  // Later, with A's backlog part-way through, key C enqueues one job at a time.
  const drained = await claim(db.sql, claimOptions([q], 190));
  assertEquals(drained.jobs.length, 190);
  assert(drained.jobs.every((j) => j.fairness_key === "A"));
  const c: string[] = [];
  for (let i = 0; i < 10; i++) {
    c.push(await enqueue(db.sql, "c", { i }, { queue: q, fairnessKey: "C" }));
  }
  const next = await claim(db.sql, claimOptions([q], 20));
  assertEquals(
    next.jobs.map((j) => j.id).sort(),
    [...a.slice(200, 210).map((r) => r.id), ...c].sort(),
  );
});

Deno.test("claim() keeps a new fairness key fair when the backlog's key also has urgent jobs", async () => {
  await using db = await testDb();
  const q = "fair";
  const a = await enqueueMany(
    db.sql,
    Array.from({ length: 1_000 }, () => ({ task: "a", queue: q, fairnessKey: "A" })),
  );
  // One urgent job of the same key is stamped after A's backlog; it must not drag the
  // newcomer's stamps behind that backlog too.
  const urgent = await enqueue(db.sql, "urgent", {}, { queue: q, fairnessKey: "A", priority: 5 });
  const b = await enqueueMany(
    db.sql,
    Array.from({ length: 10 }, () => ({ task: "b", queue: q, fairnessKey: "B" })),
  );
  const first = await claim(db.sql, claimOptions([q], 1));
  assertEquals(first.jobs.map((j) => j.id), [urgent]);
  const next = await claim(db.sql, claimOptions([q], 20));
  assertEquals(
    next.jobs.map((j) => j.id).sort(),
    [...a.slice(0, 10), ...b].map((r) => r.id).sort(),
  );
});

Deno.test("claim() takes from several queues in one call and respects the limit", async () => {
  await using db = await testDb();
  const q1 = await enqueueMany(db.sql, [{ task: "t", queue: "q1" }, { task: "t", queue: "q1" }]);
  const q2 = await enqueueMany(db.sql, [
    { task: "t", queue: "q2" },
    { task: "t", queue: "q2", priority: 3 },
  ]);
  const q3 = await enqueue(db.sql, "t", {}, { queue: "q3" });
  // Priority applies across the queues of one claim.
  const top = await claim(db.sql, claimOptions(["q1", "q2"], 1));
  assertEquals(top.jobs.map((j) => j.id), [q2[1]!.id]);
  const rest = await claim(db.sql, claimOptions(["q1", "q2"], 2));
  assertEquals(rest.jobs.length, 2);
  const last = await claim(db.sql, claimOptions(["q1", "q2"], 10));
  assertEquals(
    [...rest.jobs, ...last.jobs].map((j) => j.id).sort(),
    [...q1.map((r) => r.id), q2[0]!.id].sort(),
  );
  assertEquals((await jobRow(db.sql, q3))?.attempts, 0, "q3 was not asked for");
  assertEquals((await claim(db.sql, claimOptions(["q1", "q2", "q1"], 10))).jobs, []);
});

Deno.test("claim() with a queue listed twice returns each job once", async () => {
  await using db = await testDb();
  const ids = await enqueueMany(db.sql, [{ task: "t" }, { task: "t" }, { task: "t" }]);
  const { jobs } = await claim(db.sql, claimOptions(["default", "default"], 3));
  assertEquals(jobs.map((j) => j.id).sort(), ids.map((r) => r.id).sort());
});

Deno.test("claim() by concurrent claimers hands each job out exactly once", async () => {
  await using db = await testDb();
  const enqueued = await enqueueMany(
    db.sql,
    Array.from({ length: 500 }, (_, i) => ({ task: "t", payload: { i } })),
  );
  const pools = await openConnections(db.url, 10);
  try {
    const perClaimer = await Promise.all(pools.map(async (pool, i) => {
      const got: string[] = [];
      while (true) {
        const { jobs } = await claim(pool, { ...claimOptions(["default"], 7), workerId: `w${i}` });
        if (jobs.length === 0) return got;
        got.push(...jobs.map((j) => j.id));
      }
    }));
    const all = perClaimer.flat();
    assertEquals(all.length, 500);
    assertEquals(new Set(all).size, 500);
    assertEquals(all.sort(), enqueued.map((r) => r.id).sort());
    const [row] = await db.sql<{ n: number; once: number }[]>`
      select count(*)::integer as n, count(*) filter (where attempts = 1)::integer as once
      from shoal.jobs`;
    assertEquals(row, { n: 500, once: 500 });
  } finally {
    await closeConnections(pools);
  }
});

Deno.test("claim() skips a job locked by another transaction instead of waiting", async () => {
  await using db = await testDb();
  const [first, second] = await enqueueMany(db.sql, [{ task: "t" }, { task: "t" }]);
  const [locker, claimer] = await openConnections(db.url, 2);
  try {
    await locker!.begin(async (tx) => {
      await tx`select id from shoal.jobs where id = ${first!.id}::bigint for update`;
      // statement_timeout on the claimer turns a blocked claim into a failure.
      const { jobs } = await claim(claimer!, claimOptions(["default"], 10));
      assertEquals(jobs.map((j) => j.id), [second!.id]);
    });
    assertEquals((await claim(db.sql, claimOptions(["default"], 10))).jobs.map((j) => j.id), [
      first!.id,
    ]);
  } finally {
    await closeConnections([locker!, claimer!]);
  }
});

Deno.test("claim() counts the attempt, hands out a new token and sets the deadline", async () => {
  await using db = await testDb();
  const id = await enqueue(db.sql, "t", { a: 1 }, { queue: "q", key: "k", fairnessKey: "f" });
  const { jobs } = await claim(db.sql, { ...claimOptions(["q"], 5, 30_000), workerId: "host:42" });
  assertEquals(jobs.length, 1);
  const job = jobs[0]!;
  assertEquals(
    { ...job, created_at: undefined, deadline: undefined },
    {
      id,
      queue: "q",
      task: "t",
      payload: { a: 1 },
      priority: 0,
      fairness_key: "f",
      fair_seq: "1",
      attempts: 1,
      max_attempts: 25,
      token: "1",
      key: "k",
      execution_id: null,
      created_at: undefined,
      deadline: undefined,
    },
  );
  const [row] = await db.sql<
    { locked_by: string; deadline_ms: number; run_at: Date; locked_at: Date; now: Date }[]
  >`
    select locked_by, run_at, locked_at, now(),
      (extract(epoch from run_at - locked_at) * 1000)::integer as deadline_ms
    from shoal.jobs where id = ${id}::bigint`;
  assertEquals(row!.locked_by, "host:42");
  assertEquals(row!.deadline_ms, 30_000);
  assertEquals(job.deadline.getTime(), row!.run_at.getTime());
  assert(row!.locked_at <= row!.now);
});

Deno.test("claim() redelivers a job whose deadline passed, with a new token", async () => {
  await using db = await testDb();
  const id = await enqueue(db.sql, "t", {}, { queue: "q" });
  // Long enough that the "still hidden" check below cannot race the deadline on a busy box.
  const first = await claimOne(db.sql, "q", 1_500);
  assertEquals([first.attempts, first.token], [1, "1"]);
  assertEquals((await claim(db.sql, claimOptions(["q"], 10))).jobs, [], "hidden until deadline");
  const again = await claimWhenVisible(db.sql, "q", 60_000);
  assertEquals(again.jobs.map((j) => [j.id, j.attempts, j.token]), [[id, 2, "2"]]);
});

// ---------------------------------------------------------------------------------------
// Fencing

Deno.test("ack(), fail(), extend() and release() with a stale token change nothing", async () => {
  await using db = await testDb();
  const id = await enqueue(db.sql, "t", {}, { queue: "q" });
  const stale = await claimOne(db.sql, "q", 100);
  const { jobs: [owner] } = await claimWhenVisible(db.sql, "q", 60_000);
  assertEquals(owner!.id, id);
  const before = await jobRow(db.sql, id);

  assertEquals(await ack(db.sql, [ref(stale)]), []);
  assertEquals(await fail(db.sql, ref(stale), { error: "late", retryInMs: 0 }), "stale");
  assertEquals(
    await fail(db.sql, ref(stale), { error: "late", retryInMs: 0, permanent: true }),
    "stale",
  );
  assertEquals(await extend(db.sql, [ref(stale)], 1_000), []);
  assertEquals(await release(db.sql, [ref(stale)]), []);
  assertEquals(await jobRow(db.sql, id), before);
  assertEquals(await countDead(db.sql), 0);

  assertEquals(await ack(db.sql, [ref(owner!)]), [id]);
  assertEquals(await countJobs(db.sql), 0);
});

Deno.test("ack() of several jobs deletes only those still owned", async () => {
  await using db = await testDb();
  await enqueueMany(db.sql, [{ task: "t" }, { task: "t" }, { task: "t" }]);
  const { jobs } = await claim(db.sql, claimOptions(["default"], 3));
  const [a, b, c] = jobs;
  assertEquals(await release(db.sql, [ref(b!)]), [b!.id]);
  const acked = await ack(db.sql, [ref(a!), ref(b!), ref(c!)]);
  assertEquals(acked.sort(), [a!.id, c!.id].sort());
  assertEquals(await ack(db.sql, []), []);
  const rest = await db.sql<{ id: string }[]>`select id from shoal.jobs`;
  assertEquals(rest.map((r) => r.id), [b!.id]);
});

Deno.test("ackClaimed() deletes only the jobs still owned, by ids and tokens side by side, and counts them", async () => {
  await using db = await testDb();
  await enqueueMany(db.sql, [{ task: "t" }, { task: "t" }, { task: "t" }]);
  const { jobs } = await claim(db.sql, claimOptions(["default"], 3));
  const [a, b, c] = jobs;
  assertEquals(await release(db.sql, [ref(b!)]), [b!.id]);
  const ids = [a!.id, b!.id, c!.id];
  assertEquals(await ackClaimed(db.sql, ids, [a!.token, b!.token, c!.token]), 2);
  assertEquals(await ackClaimed(db.sql, [], []), 0);
  const rest = await db.sql<{ id: string }[]>`select id from shoal.jobs`;
  assertEquals(rest.map((r) => r.id), [b!.id], "the released job's old token changed nothing");
});

// ---------------------------------------------------------------------------------------
// fail()

Deno.test("fail() retries after retryInMs and records the error", async () => {
  await using db = await testDb();
  const id = await enqueue(db.sql, "t");
  const job = await claimOne(db.sql);
  assertEquals(await fail(db.sql, ref(job), { error: "first", retryInMs: 60_000 }), "retried");
  const row = await liveJob(db.sql, id);
  assertEquals(row.attempts, 1);
  assertEquals(row.token, "2");
  assertEquals(row.locked_by, null);
  assertEquals(row.locked_at, null);
  assertEquals(row.last_error, "first");
  assertEquals(row.errors.map((e) => [e.attempt, e.error]), [[1, "first"]]);
  // run_at is exactly retryInMs after the moment the error was recorded.
  assertEquals(row.run_at.getTime() - new Date(row.errors[0]!.at).getTime(), 60_000);
  assertEquals((await claim(db.sql, claimOptions(["default"], 10))).jobs, []);

  // A retry with no delay is claimable at once; its own token fences the old one.
  await db.sql`update shoal.jobs set run_at = now() where id = ${id}::bigint`;
  const second = await claimOne(db.sql);
  assertEquals([second.attempts, second.token], [2, "3"]);
  assertEquals(await fail(db.sql, ref(second), { error: "second", retryInMs: 0 }), "retried");
  const third = await claimOne(db.sql);
  assertEquals(third.attempts, 3);
  const after = await jobRow(db.sql, id);
  assertEquals(after?.last_error, "second");
  assertEquals(after?.errors.map((e) => [e.attempt, e.error]), [[1, "first"], [2, "second"]]);
});

Deno.test("fail() keeps the last 25 errors and caps each message", async () => {
  await using db = await testDb();
  const id = await enqueue(db.sql, "t", {}, { maxAttempts: 100 });
  for (let attempt = 1; attempt <= 30; attempt++) {
    const job = await claimOne(db.sql);
    assertEquals(job.attempts, attempt);
    const error = attempt === 30 ? "é".repeat(5_000) : `error ${attempt}`;
    assertEquals(await fail(db.sql, ref(job), { error, retryInMs: 0 }), "retried");
  }
  const row = await liveJob(db.sql, id);
  assertEquals(row.errors.length, 25);
  assertEquals(row.errors.map((e) => e.attempt), Array.from({ length: 25 }, (_, i) => i + 6));
  assertEquals(row.errors[0]!.error, "error 6");
  assertEquals(row.errors[23]!.error, "error 29");
  const capped = "é".repeat(3_999) + "…";
  assertEquals(row.errors[24]!.error, capped);
  assertEquals(row.last_error, capped);
});

Deno.test("fail() moves a job to the dead letters once max_attempts are spent", async () => {
  await using db = await testDb();
  const id = await enqueue(db.sql, "t", { p: 1 }, {
    queue: "q",
    maxAttempts: 3,
    priority: 2,
    fairnessKey: "f",
    key: "k",
  });
  const outcomes: string[] = [];
  for (let i = 1; i <= 3; i++) {
    const job = await claimOne(db.sql, "q");
    outcomes.push(await fail(db.sql, ref(job), { error: `e${i}`, retryInMs: 0 }));
  }
  assertEquals(outcomes, ["retried", "retried", "dead"]);
  assertEquals(await countJobs(db.sql), 0);
  const [dead] = await db.sql<
    {
      id: string;
      queue: string;
      task: string;
      payload: unknown;
      priority: number;
      fairness_key: string;
      attempts: number;
      max_attempts: number;
      key: string;
      errors: { attempt: number; error: string }[];
      reason: string;
    }[]
  >`select id, queue, task, payload, priority, fairness_key, attempts, max_attempts, key,
      errors, reason from shoal.dead_jobs`;
  assertEquals({ ...dead!, errors: dead!.errors.map((e) => [e.attempt, e.error]) }, {
    id,
    queue: "q",
    task: "t",
    payload: { p: 1 },
    priority: 2,
    fairness_key: "f",
    attempts: 3,
    max_attempts: 3,
    key: "k",
    errors: [[1, "e1"], [2, "e2"], [3, "e3"]],
    reason: "e3",
  });
});

Deno.test("fail() with permanent dead-letters at once", async () => {
  await using db = await testDb();
  const id = await enqueue(db.sql, "t");
  const job = await claimOne(db.sql);
  assertEquals(
    await fail(db.sql, ref(job), { error: "bad payload", retryInMs: 60_000, permanent: true }),
    "dead",
  );
  assertEquals(await countJobs(db.sql), 0);
  const rows = await db.sql<{ id: string; attempts: number; reason: string; n: number }[]>`
    select id, attempts, reason, jsonb_array_length(errors) as n from shoal.dead_jobs`;
  assertEquals([...rows], [{ id, attempts: 1, reason: "bad payload", n: 1 }]);
  assertEquals(await fail(db.sql, ref(job), { error: "again", retryInMs: 0 }), "stale");
});

Deno.test("claim() dead-letters a job whose claims used up its attempts, without running it", async () => {
  await using db = await testDb();
  const poison = await enqueue(db.sql, "crash", {}, { queue: "q", maxAttempts: 2, priority: 1 });
  for (let attempt = 1; attempt <= 2; attempt++) {
    const { jobs, poisoned } = attempt === 1
      ? await claim(db.sql, claimOptions(["q"], 1, 100))
      : await claimWhenVisible(db.sql, "q", 100);
    assertEquals(poisoned, []);
    assertEquals(jobs.map((j) => [j.id, j.attempts]), [[poison, attempt]]);
  }
  // The worker "crashed" again; a healthy job arrives meanwhile.
  const healthy = await enqueue(db.sql, "ok", {}, { queue: "q" });
  await waitFor(
    "the second claim's deadline to pass",
    async () => {
      const [row] = await db.sql<{ due: boolean }[]>`
      select run_at <= now() as due from shoal.jobs where id = ${poison}::bigint`;
      return row!.due;
    },
    20_000,
    20,
  );
  const result = await claim(db.sql, claimOptions(["q"], 10));
  assertEquals(result.poisoned, [{ id: poison, task: "crash", queue: "q", attempts: 2 }]);
  assertEquals(result.jobs.map((j) => j.id), [healthy]);
  // A claimed job is the Job type's fields, nothing more (the poison mark stays in claim()).
  assertEquals(Object.keys(result.jobs[0]!).sort(), [
    "attempts",
    "created_at",
    "deadline",
    "execution_id",
    "fair_seq",
    "fairness_key",
    "id",
    "key",
    "max_attempts",
    "payload",
    "priority",
    "queue",
    "task",
    "token",
  ]);
  assertEquals(typeof result.jobs[0]!.token, "string");
  const dead = await db.sql<{ id: string; attempts: number; reason: string }[]>`
    select id, attempts, reason from shoal.dead_jobs`;
  assertEquals([...dead], [{
    id: poison,
    attempts: 2,
    reason: "Claimed 2 times without finishing: its worker crashed or was killed every time",
  }]);
  assertEquals((await db.sql`select id from shoal.jobs`).map((r) => r.id), [healthy]);
});

// ---------------------------------------------------------------------------------------
// release() and extend()

Deno.test("release() makes the job visible now without burning the attempt", async () => {
  await using db = await testDb();
  const id = await enqueue(db.sql, "t");
  const job = await claimOne(db.sql);
  const before = await dbNow(db.sql);
  assertEquals(await release(db.sql, [ref(job)]), [id]);
  const after = await dbNow(db.sql);
  const row = await liveJob(db.sql, id);
  assertEquals([row.attempts, row.token, row.locked_by, row.locked_at], [0, "2", null, null]);
  assert(row.run_at >= before && row.run_at <= after, `run_at ${row.run_at.toISOString()}`);
  assertEquals(await release(db.sql, [ref(job)]), [], "a second release is stale");
  assertEquals(await ack(db.sql, [ref(job)]), [], "the released claim cannot ack");
  const again = await claimOne(db.sql);
  assertEquals([again.id, again.attempts, again.token], [id, 1, "3"]);
  assertEquals(await release(db.sql, []), []);
});

Deno.test("extend() pushes the deadline and returns only jobs still owned", async () => {
  await using db = await testDb();
  await enqueueMany(db.sql, [{ task: "t" }, { task: "t" }]);
  const { jobs } = await claim(db.sql, claimOptions(["default"], 2, 5_000));
  const [mine, lost] = jobs;
  assertEquals(await release(db.sql, [ref(lost!)]), [lost!.id]);
  const lostBefore = await jobRow(db.sql, lost!.id);
  const before = await dbNow(db.sql);
  assertEquals(await extend(db.sql, [ref(mine!), ref(lost!)], 120_000), [mine!.id]);
  const after = await dbNow(db.sql);
  const row = await jobRow(db.sql, mine!.id);
  const deadline = row!.run_at.getTime();
  assert(
    deadline >= before.getTime() + 120_000 && deadline <= after.getTime() + 120_000,
    `deadline ${row!.run_at.toISOString()}`,
  );
  assertEquals([row!.attempts, row!.token], [1, mine!.token], "extend is not a new claim");
  assertEquals(await jobRow(db.sql, lost!.id), lostBefore);
  assertEquals(await extend(db.sql, [], 1_000), []);
});

// ---------------------------------------------------------------------------------------
// backoffMs()

Deno.test("backoffMs() grows exponentially within its jitter bounds", () => {
  for (let attempts = 1; attempts <= 10; attempts++) {
    const expected = 1_000 * 2 ** (attempts - 1);
    const samples = Array.from({ length: 200 }, () => backoffMs(attempts));
    for (const ms of samples) {
      assert(
        ms >= Math.floor(expected * 0.75) && ms <= Math.ceil(expected * 1.25),
        `attempt ${attempts}: ${ms} outside ±25% of ${expected}`,
      );
      assert(Number.isInteger(ms));
    }
    assert(new Set(samples).size > 1, `attempt ${attempts}: no jitter`);
  }
  for (const ms of Array.from({ length: 200 }, () => backoffMs(3, 100, 10_000))) {
    assert(ms >= 300 && ms <= 500, `${ms}`);
  }
  assert(backoffMs(0) >= 750 && backoffMs(0) <= 1_250);
});

Deno.test("backoffMs() never exceeds its cap", () => {
  for (const attempts of [13, 20, 100, 5_000]) {
    for (let i = 0; i < 200; i++) {
      const ms = backoffMs(attempts);
      assert(ms >= 2_700_000 && ms <= 3_600_000, `attempt ${attempts}: ${ms}`);
    }
  }
  for (let i = 0; i < 200; i++) {
    const ms = backoffMs(8, 1_000, 5_000);
    assert(ms >= 3_750 && ms <= 5_000, `${ms}`);
  }
});

Deno.test("checkPayload() measures a payload exactly as Postgres measures its jsonb text", async () => {
  await using db = await testDb();
  const payloads = [
    {},
    { a: 1 },
    { s: "é", list: [1, 2, { deep: [true, null, "x"] }], empty: [], obj: {} },
    { nested: { a: { b: { c: [[], [1], [1, 2]] } } }, 'quote"key': "line\nbreak" },
  ];
  for (const payload of payloads) {
    const [row] = await db.sql<{ n: number }[]>`
      select octet_length(${JSON.stringify(payload)}::text::jsonb::text)::int as n`;
    let limitError = "";
    try {
      checkPayload(payload, row!.n - 1);
    } catch (error) {
      limitError = (error as Error).message;
    }
    assert.match(limitError, new RegExp(`^Invalid payload: ${row!.n} bytes`));
    checkPayload(payload, row!.n); // exactly at the limit passes
  }
});

Deno.test("a quiet fairness key's first shoal.fair_burst() jobs are stamped ahead of the queue's head", async () => {
  await using db = await testDb();
  const q = "burst";
  const many = (n: number, key: string) =>
    Array.from({ length: n }, () => ({ task: "t", queue: q, fairnessKey: key }));
  const a = await enqueueMany(db.sql, many(1_000, "A"));
  const b = await enqueueMany(db.sql, many(150, "B"));
  // The default burst is 100: B's first 100 run before A's next job, the rest share 1:1.
  const first = await claim(db.sql, claimOptions([q], 100));
  assertEquals(first.jobs.map((j) => j.id), b.slice(0, 100).map((r) => r.id));
  const next = await claim(db.sql, claimOptions([q], 20));
  assertEquals(
    next.jobs.map((j) => j.id).sort(),
    [...a.slice(0, 10), ...b.slice(100, 110)].map((r) => r.id).sort(),
  );
  // A key with a backlog gets no burst: A's new job goes after its own backlog.
  const [late] = await enqueueMany(db.sql, many(1, "A"));
  const [row] = await db.sql<{ seq: string; max: string }[]>`
    select (select fair_seq from shoal.jobs where id = ${late!.id}::bigint)::text as seq,
      (select max(fair_seq) from shoal.jobs where fairness_key = 'A' and id <> ${
    late!.id
  }::bigint)::text as max`;
  assertEquals(BigInt(row!.seq), BigInt(row!.max) + 1n);

  // With shoal.fair_burst = 0 a quiet key starts level with the head (where claiming has
  // got to, recorded at most 100 ms ago), as before 008: no later than the queue's next job.
  const session = await db.sql.reserve();
  try {
    await session`set shoal.fair_burst = '0'`;
    const [head] = await session<{ seq: string; next: string }[]>`
      select (shoal.level_head(${q}, 0) + 1)::text as seq,
        (select min(fair_seq) from shoal.jobs where queue = ${q} and attempts = 0)::text as next`;
    const c = await enqueueMany(session, many(3, "C"));
    const stamps = await session<{ seq: string }[]>`
      select fair_seq::text as seq from shoal.jobs
      where id = any(${c.map((r) => r.id)}::bigint[]) order by id`;
    const h = BigInt(head!.seq);
    assertEquals(stamps.map((r) => BigInt(r.seq)), [h, h + 1n, h + 2n]);
    assert(h <= BigInt(head!.next), `${h} ranks after the queue's next job ${head!.next}`);
  } finally {
    session.release();
  }
});

Deno.test("claim() with a bound takes only jobs ranking no later than it, and nothing else", async () => {
  await using db = await testDb();
  const q = "probe";
  const a = await enqueueMany(
    db.sql,
    Array.from({ length: 50 }, () => ({ task: "t", queue: q, fairnessKey: "A" })),
  );
  const buffered = await claim(db.sql, claimOptions([q], 20));
  const last = buffered.jobs[buffered.jobs.length - 1]!;
  assertEquals(last.id, a[19]!.id);
  const bound = { before: { priority: last.priority, fair_seq: last.fair_seq } };
  // Nothing new ranks ahead: the probe finds nothing and leaves A's backlog alone.
  assertEquals((await claim(db.sql, { ...claimOptions([q], 100), ...bound })).jobs, []);
  const urgent = await enqueue(db.sql, "t", {}, { queue: q, priority: 3 });
  const quiet = await enqueueMany(
    db.sql,
    Array.from({ length: 5 }, () => ({ task: "t", queue: q, fairnessKey: "B" })),
  );
  const probed = await claim(db.sql, { ...claimOptions([q], 100), ...bound });
  assertEquals(probed.jobs.map((j) => j.id), [urgent, ...quiet.map((r) => r.id)]);
  const [left] = await db.sql<{ n: number }[]>`
    select count(*)::int as n from shoal.jobs where queue = ${q} and attempts = 0`;
  assertEquals(left!.n, 30);
});
