/**
 * The SQL entry points for any language, `shoal.enqueue(...)` and `shoal.enqueue_many(jsonb)`,
 * against real Postgres: named arguments, validation, the payload limit setting, dedupe keys
 * and the NOTIFY that wakes idle consumers.
 *
 * JSON goes in as `${text}::text::jsonb`: postgres.js would JSON-encode a string parameter
 * whose type Postgres reports as jsonb, turning the object into a JSON string.
 */
import { parseWake } from "../lib/consumer.ts";
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { testDb, waitFor } from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import { enqueue } from "../lib/queue.ts";

async function countJobs(sql: Sql): Promise<number> {
  const [row] = await sql<{ n: number }[]>`select count(*)::integer as n from shoal.jobs`;
  return row!.n;
}

/** Run `fn` and check it fails with this SQLSTATE and a message containing `includes`. */
async function assertSqlError(
  fn: () => Promise<unknown>,
  code: string,
  includes: string,
): Promise<void> {
  const error = await assertRejects(fn, Error, includes);
  assertEquals((error as Error & { code?: string }).code, code, error.message);
}

interface Row {
  queue: string;
  task: string;
  payload: unknown;
  run_at: Date;
  priority: number;
  key: string | null;
  fairness_key: string;
  max_attempts: number;
  attempts: number;
}

async function jobRow(sql: Sql, id: string): Promise<Row> {
  const [row] = await sql<Row[]>`
    select queue, task, payload, run_at, priority, key, fairness_key, max_attempts, attempts
    from shoal.jobs where id = ${id}::bigint`;
  if (row === undefined) throw new Error(`Job ${id} is not in shoal.jobs`);
  return row;
}

/** Collects NOTIFYs on shoal_jobs for the duration of `fn`. */
async function withNotifications(
  sql: Sql,
  fn: (received: string[]) => Promise<void>,
): Promise<void> {
  const received: string[] = [];
  // The queue of each; a ranked one ("queue#priority:fair_seq") as "queue#".
  const { unlisten } = await sql.listen("shoal_jobs", (payload) => {
    const wake = parseWake(payload);
    received.push(wake.rank === undefined ? wake.queue : `${wake.queue}#`);
  });
  try {
    await fn(received);
  } finally {
    await unlisten();
  }
}

Deno.test("shoal.enqueue() with named arguments stores every option and returns the id", async () => {
  await using db = await testDb();
  const [{ id }] = await db.sql<[{ id: string }]>`
    select shoal.enqueue('emails', 'send_welcome', '{"user": 42}',
      run_at => '2030-01-02T03:04:05Z', priority => 5, key => 'welcome-42',
      fairness_key => 'tenant-1', max_attempts => 3) as id`;
  assert.match(id, /^[0-9]+$/);
  assertEquals(await jobRow(db.sql, id), {
    queue: "emails",
    task: "send_welcome",
    payload: { user: 42 },
    run_at: new Date("2030-01-02T03:04:05Z"),
    priority: 5,
    key: "welcome-42",
    fairness_key: "tenant-1",
    max_attempts: 3,
    attempts: 0,
  });
  // Named arguments in any order, the rest left out.
  const [{ id: other }] = await db.sql<[{ id: string }]>`
    select shoal.enqueue(task => 't', max_attempts => 7, queue => 'q') as id`;
  const row = await jobRow(db.sql, other);
  assertEquals([row.queue, row.task, row.max_attempts, row.priority], ["q", "t", 7, 0]);
});

Deno.test("shoal.enqueue() with only queue and task uses the defaults", async () => {
  await using db = await testDb();
  const [{ id, now }] = await db.sql<[{ id: string; now: Date }]>`
    select shoal.enqueue('q', 't') as id, now()`;
  assertEquals(await jobRow(db.sql, id), {
    queue: "q",
    task: "t",
    payload: {},
    run_at: now,
    priority: 0,
    key: null,
    fairness_key: "",
    max_attempts: 25,
    attempts: 0,
  });
});

Deno.test("shoal.enqueue() rejects a payload that is not a JSON object", async () => {
  await using db = await testDb();
  const cases: [string, string][] = [
    ["[1]", "array"],
    ["null", "null"],
    ['"s"', "string"],
    ["1", "number"],
  ];
  for (const [payload, kind] of cases) {
    await assertSqlError(
      () => db.sql`select shoal.enqueue('q', 't', ${payload}::text::jsonb)`,
      "22023",
      `Cannot enqueue job 1: payload must be a JSON object, not ${kind}`,
    );
  }
  await assertSqlError(
    () => db.sql`select shoal.enqueue('q', 't', null)`,
    "22023",
    "payload must be a JSON object, not null",
  );
  assertEquals(await countJobs(db.sql), 0);
});

Deno.test("shoal.enqueue() rejects bad queue and task names", async () => {
  await using db = await testDb();
  const message = "queue and task must be names of 1 to 128 letters";
  for (const name of ["", "a b", "-x", "x".repeat(129), "q'; drop table shoal.jobs; --"]) {
    await assertSqlError(() => db.sql`select shoal.enqueue(${name}, 't')`, "22023", message);
    await assertSqlError(() => db.sql`select shoal.enqueue('q', ${name})`, "22023", message);
  }
  await assertSqlError(() => db.sql`select shoal.enqueue('q', null)`, "22023", message);
  await assertSqlError(() => db.sql`select shoal.enqueue(queue => 'q')`, "22023", message);
  assertEquals(await countJobs(db.sql), 0);
  // A null queue is not a bad name: it is the task's (tests/catalog_test.ts).
  await db.sql`select shoal.enqueue(null, 't')`;
  const [row] = await db.sql<{ queue: string }[]>`select queue from shoal.jobs`;
  assertEquals(row?.queue, "default");
});

Deno.test("shoal.enqueue() rejects out-of-range priority, max_attempts and keys", async () => {
  await using db = await testDb();
  await assertSqlError(
    () => db.sql`select shoal.enqueue('q', 't', max_attempts => 0)`,
    "22023",
    "max_attempts must be from 1 to 1000",
  );
  await assertSqlError(
    () => db.sql`select shoal.enqueue('q', 't', max_attempts => 1001)`,
    "22023",
    "max_attempts must be from 1 to 1000",
  );
  await assertSqlError(
    () => db.sql`select shoal.enqueue('q', 't', priority => 40000)`,
    "22023",
    "priority must be from -32767 to 32767",
  );
  await assertSqlError(
    () => db.sql`select shoal.enqueue('q', 't', key => '')`,
    "22023",
    "key must be 1 to 512 characters",
  );
  assertEquals(await countJobs(db.sql), 0);
});

Deno.test("shoal.enqueue() refuses a payload over shoal.max_payload_bytes", async () => {
  await using db = await testDb();
  const big = JSON.stringify({ s: "x".repeat(200) }); // 209 bytes as jsonb text
  const small = JSON.stringify({ s: "x".repeat(50) });
  const session = await db.sql.reserve();
  try {
    await session`set shoal.max_payload_bytes = '100'`;
    await assertSqlError(
      () => session`select shoal.enqueue('q', 't', ${big}::text::jsonb)`,
      "54000",
      "Cannot enqueue job 1: payload is 209 bytes, over the limit of 100 bytes",
    );
    // TypeScript's own default limit is larger; Postgres still applies the session's.
    await assertSqlError(() => enqueue(session, "t", { s: "x".repeat(200) }), "54000", "100 bytes");
    await session`select shoal.enqueue('q', 't', ${small}::text::jsonb)`;
    assertEquals(await countJobs(db.sql), 1);
    await session`reset shoal.max_payload_bytes`;
    await session`select shoal.enqueue('q', 't', ${big}::text::jsonb)`;
    assertEquals(await countJobs(db.sql), 2);
  } finally {
    session.release();
  }
  // Per transaction with set local: the limit ends with the transaction.
  await assertSqlError(
    () =>
      db.sql.begin(async (tx) => {
        await tx`set local shoal.max_payload_bytes = '100'`;
        await tx`select shoal.enqueue('q', 't', ${big}::text::jsonb)`;
      }),
    "54000",
    "over the limit of 100 bytes",
  );
  await db.sql`select shoal.enqueue('q', 't', ${big}::text::jsonb)`;
  assertEquals(await countJobs(db.sql), 3);
});

Deno.test("shoal.enqueue() with a pending key returns the existing job's id", async () => {
  await using db = await testDb();
  const [{ a }] = await db.sql<[{ a: string }]>`select shoal.enqueue('q', 't', key => 'k') as a`;
  const [{ b }] = await db.sql<[{ b: string }]>`select shoal.enqueue('q', 'u', key => 'k') as b`;
  const [{ c }] = await db.sql<[{ c: string }]>`select shoal.enqueue('r', 't', key => 'k') as c`;
  assertEquals(b, a);
  assert(c !== a);
  assertEquals(await countJobs(db.sql), 2);
});

Deno.test("shoal.enqueue_many() returns one row per element in input order", async () => {
  await using db = await testDb();
  const jobs = [
    { queue: "a", task: "t", payload: { n: 0 }, priority: 2, key: "k" },
    { queue: "b", task: "t" },
    { queue: "a", task: "t", key: "k" },
    { queue: "a", task: "t", run_at: "2030-01-01T00:00:00Z", max_attempts: 4, fairness_key: "f" },
  ];
  const rows = await db.sql<{ ord: string; id: string; inserted: boolean }[]>`
    select ord, id, inserted from shoal.enqueue_many(${JSON.stringify(jobs)}::text::jsonb)`;
  assertEquals(rows.map((r) => [r.ord, r.inserted]), [
    ["1", true],
    ["2", true],
    ["3", false],
    ["4", true],
  ]);
  assertEquals(rows[2]!.id, rows[0]!.id);
  const ids = rows.map((r) => r.id);
  assertEquals((await jobRow(db.sql, ids[0]!)).payload, { n: 0 });
  assertEquals((await jobRow(db.sql, ids[0]!)).priority, 2);
  const last = await jobRow(db.sql, ids[3]!);
  assertEquals(
    [last.run_at.toISOString(), last.max_attempts, last.fairness_key],
    ["2030-01-01T00:00:00.000Z", 4, "f"],
  );
  assertEquals(await countJobs(db.sql), 3);
  const empty = await db.sql`select * from shoal.enqueue_many('[]')`;
  assertEquals(empty.length, 0);
});

Deno.test("shoal.enqueue_many() rejects the whole batch when one element is bad", async () => {
  await using db = await testDb();
  const cases: [unknown, string][] = [
    [{ queue: "q", task: "t" }, "Cannot enqueue: jobs must be a JSON array"],
    [[{ queue: "q", task: "t" }, 5], "Cannot enqueue job 2: each job must be a JSON object"],
    [[{ queue: "q", task: "t" }, { queue: "q" }], "Cannot enqueue job 2: queue and task"],
    [
      [{ queue: "q", task: "t" }, { queue: "q", task: "t" }, {
        queue: "q",
        task: "t",
        payload: [],
      }],
      "Cannot enqueue job 3: payload must be a JSON object, not array",
    ],
  ];
  for (const [jobs, message] of cases) {
    await assertSqlError(
      () => db.sql`select * from shoal.enqueue_many(${JSON.stringify(jobs)}::text::jsonb)`,
      "22023",
      message,
    );
  }
  assertEquals(await countJobs(db.sql), 0);
});

Deno.test("shoal.enqueue() sends NOTIFY shoal_jobs with the queue name and the first job's rank", async () => {
  await using db = await testDb();
  await withNotifications(db.sql, async (received) => {
    await db.sql`select shoal.enqueue('mail', 't')`;
    await waitFor("a NOTIFY for mail", () => received.length === 1);
    // One notification per queue of a batch.
    const batch = [{ queue: "a", task: "t" }, { queue: "b", task: "t" }, { queue: "a", task: "t" }];
    await db.sql`select * from shoal.enqueue_many(${JSON.stringify(batch)}::text::jsonb)`;
    await waitFor("NOTIFYs for a and b", () => received.length === 3);
    assertEquals([received[0], ...received.slice(1).sort()], ["mail#", "a#", "b#"]);
  });
});

Deno.test("shoal.notify_jobs() names the first job in claim order of each queue's ready jobs, when every rank is known", async () => {
  await using db = await testDb();
  const heard: string[] = [];
  const { unlisten } = await db.sql.listen("shoal_jobs", (payload) => void heard.push(payload));
  try {
    await db.sql`select shoal.notify_jobs(array['q', 'q', 'q', 'r'], null,
                                          array[0, 5, 5, 0], array[7, 9, 3, 1])`;
    await db.sql`select shoal.notify_jobs(array['u', 'u'], null, array[0, null], array[1, 2])`;
    await db.sql`select shoal.notify_jobs(array['v'], null)`;
    await waitFor("four NOTIFYs", () => heard.length === 4);
    // Priority first, then the stamp; a job of unknown rank leaves its queue's unranked.
    assertEquals(heard.sort(), ["q#5:3", "r#0:1", "u", "v"]);
    assertEquals(heard.map((p) => parseWake(p)).find((w) => w.queue === "q")?.rank, {
      priority: 5,
      fair_seq: "3",
    });
  } finally {
    await unlisten();
  }
});

Deno.test("shoal.enqueue() with notify => false sends no NOTIFY", async () => {
  await using db = await testDb();
  await withNotifications(db.sql, async (received) => {
    await db.sql`select shoal.enqueue('quiet', 't', notify => false)`;
    await db.sql`select * from shoal.enqueue_many('[{"queue": "quiet2", "task": "t"}]', false)`;
    await enqueue(db.sql, "t", {}, { queue: "quiet3", notify: false });
    // Nothing is sent for a transaction that rolls back either.
    await assertRejects(
      () =>
        db.sql.begin(async (tx) => {
          await tx`select shoal.enqueue('rolled_back', 't')`;
          throw new Error("roll back");
        }),
      Error,
      "roll back",
    );
    // Notifications arrive in commit order: once "loud" is here, any earlier one would be too.
    await enqueue(db.sql, "t", {}, { queue: "loud" });
    await waitFor("a NOTIFY for loud", () => received.includes("loud#"));
    assertEquals(received, ["loud#"]);
  });
  assertEquals(await countJobs(db.sql), 4);
});
