/**
 * The fast enqueue (shoal.insert_job(s) in sql/functions/queue.sql, and lib/queue.ts): the same results as the
 * shipped jsonb path, checked against a database migrated only to 003 (the path before
 * 004), plus the column functions' own checks and the NOTIFY coalescing of a pool, whose
 * every NOTIFY must arrive after its job is committed.
 */
import { parseWake } from "../lib/consumer.ts";
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { emptyDb, sleep, testDb, waitFor } from "./helpers.ts";
import { connect, type Db, type Sql } from "../lib/db.ts";
import { loadMigrations, migrate, NO_FUNCTIONS } from "../lib/migrate.ts";
import {
  checkJobSpec,
  enqueue,
  type Enqueued,
  enqueueMany,
  JobArgs,
  type JobSpec,
} from "../lib/queue.ts";

/**
 * What enqueueMany() sent before 004: checkJobSpec rows as one jsonb document, with the
 * queue `default` filled in when not given, as checkJobSpec did before the task catalog
 * (009; these tasks are in no catalog, so the catalog rule gives `default` too).
 */
async function enqueueManyBefore004(db: Db, jobs: JobSpec[]): Promise<Enqueued[]> {
  const args = new JobArgs("enqueueMany");
  const rows = jobs.map((spec) => ({
    queue: "default",
    ...checkJobSpec(spec, 1_048_576, args),
  }));
  const result = await db<Enqueued[]>`
    select id, inserted from shoal.enqueue_many(${JSON.stringify(rows)}::text::jsonb)`;
  return result.map((r) => ({ id: r.id, inserted: r.inserted }));
}

interface StoredJob {
  id: string;
  queue: string;
  task: string;
  payload: unknown;
  priority: number;
  fairness_key: string;
  fair_seq: string;
  max_attempts: number;
  key: string | null;
  /** run_at as given, or null when it defaulted to now(). */
  given_run_at: Date | null;
}

async function storedJobs(sql: Sql): Promise<StoredJob[]> {
  return [
    ...await sql<StoredJob[]>`
    select id, queue, task, payload, priority, fairness_key, fair_seq, max_attempts, key,
      case when run_at > now() + interval '1 day' then run_at end as given_run_at
    from shoal.jobs order by id`,
  ];
}

/** The steps both databases go through: batches and single jobs, keys, groups, an ack. */
const FUTURE = new Date("2031-01-02T03:04:05.678Z");
const STEPS: JobSpec[][] = [
  [
    { task: "t", payload: { n: 1 } },
    { task: "t", fairnessKey: "a", payload: { list: [1, "é", { deep: null }] } },
    { task: "t", fairnessKey: "a", key: "k1" },
    { task: "t", fairnessKey: "a", key: "k1", payload: { dup: true } },
    { task: "u", queue: "other", priority: 5, maxAttempts: 3 },
    { task: "t", fairnessKey: "b", runAt: FUTURE },
    { task: "t", priority: -2, key: "k2" },
    { task: "t", fairnessKey: "a" },
  ],
  [{ task: "t", key: "k1", fairnessKey: "a" }],
  [{ task: "t", fairnessKey: "c" }],
  // One group, no keys: insert_jobs's direct path.
  [
    { task: "t", fairnessKey: "c" },
    { task: "u", fairnessKey: "c", payload: { z: 1 } },
    { task: "t", fairnessKey: "c", runAt: FUTURE, maxAttempts: 2 },
  ],
  [{ task: "t", queue: "other", priority: 5 }, { task: "t", queue: "other", priority: 5 }],
  [{ task: "t", fairnessKey: "a", priority: 5 }],
  [{ task: "t", key: "k3", queue: "other" }],
  [{ task: "t", key: "k3", queue: "other", payload: { again: 1 } }],
  [
    { task: "t", fairnessKey: "c" },
    { task: "t", fairnessKey: "c", key: "k2" },
    { task: "t", fairnessKey: "d", key: "k4" },
    { task: "t", fairnessKey: "d", key: "k4" },
  ],
];

/** Apply the steps: each list through `enqueueFn`, the first job acked after step 3. */
async function applySteps(
  sql: Sql,
  enqueueFn: (db: Db, jobs: JobSpec[]) => Promise<Enqueued[]>,
): Promise<Enqueued[][]> {
  const results: Enqueued[][] = [];
  for (const [i, step] of STEPS.entries()) {
    results.push(await enqueueFn(sql, step));
    // An ack moves the queue's head, which new fairness keys are stamped from.
    if (i === 2) await sql`delete from shoal.jobs where id = (select min(id) from shoal.jobs)`;
  }
  return results;
}

Deno.test("enqueueMany() stores exactly what the jsonb path before 004 stored", async () => {
  await using before = await emptyDb();
  // The database of a release at 003: its migrations only (not today's function files).
  await migrate(
    before.sql,
    (await loadMigrations()).filter((m) => m.version <= 3),
    NO_FUNCTIONS,
  );
  await using after = await testDb();
  // Without 008's burst for quiet fairness keys, the stamps are those of before.
  const session = await after.sql.reserve();
  try {
    await session`set shoal.fair_burst = '0'`;
    const expected = await applySteps(before.sql, enqueueManyBefore004);
    const got = await applySteps(session, (db, jobs) => enqueueMany(db, jobs));
    assertEquals(got, expected);
    assertEquals(await storedJobs(session), await storedJobs(before.sql));
    // enqueue() is enqueueMany() of one.
    const { task, payload, ...options } = STEPS[1]![0]!;
    assertEquals(await enqueue(session, task, payload, options), got[1]![0]!.id);
  } finally {
    session.release();
  }
});

Deno.test("enqueueMany() of one job reports a held key like the jsonb path", async () => {
  await using db = await testDb();
  const [first] = await enqueueMany(db.sql, [{ task: "t", key: "k" }]);
  const [second] = await enqueueMany(db.sql, [{ task: "t", key: "k", payload: { x: 1 } }]);
  const [third] = await enqueueManyBefore004(db.sql, [{ task: "t", key: "k" }]);
  assertEquals(first!.inserted, true);
  assertEquals(second, { id: first!.id, inserted: false });
  assertEquals(third, { id: first!.id, inserted: false });
  const [row] = await db.sql<{ n: number }[]>`select count(*)::integer as n from shoal.jobs`;
  assertEquals(row!.n, 1);
});

Deno.test("enqueueMany() applies the database's payload limit and names the job", async () => {
  await using db = await testDb();
  const session = await db.sql.reserve();
  try {
    await session`set shoal.max_payload_bytes = '100'`;
    const small = { s: "x".repeat(50) };
    const big = { s: "x".repeat(200) }; // 209 bytes as jsonb text
    const error = await assertRejects(
      () => enqueueMany(session, [{ task: "t", payload: small }, { task: "t", payload: big }]),
      Error,
      "Cannot enqueue job 2: payload is 209 bytes, over the limit of 100 bytes",
    );
    assertEquals((error as Error & { code?: string }).code, "54000");
    await assertRejects(
      () => enqueue(session, "t", big),
      Error,
      "Cannot enqueue job 1: payload is 209 bytes, over the limit of 100 bytes",
    );
    const [row] = await session<{ n: number }[]>`select count(*)::integer as n from shoal.jobs`;
    assertEquals(row!.n, 0);
  } finally {
    session.release();
  }
});

Deno.test("shoal.insert_jobs() refuses column arrays of different lengths", async () => {
  await using db = await testDb();
  await assertRejects(
    () =>
      db.sql`select * from shoal.insert_jobs(array['q', 'q'], array['t'],
                                             array['{}'::jsonb, '{}'::jsonb])`,
    Error,
    "Cannot enqueue: every column array must hold one element per job",
  );
  const rows = await db.sql`select * from shoal.insert_jobs('{}', '{}', '{}')`;
  assertEquals(rows.length, 0);
});

Deno.test("shoal.name still accepts exactly 1 to 128 of the allowed characters", async () => {
  await using db = await testDb();
  const good = ["a", "Z9", "a".repeat(128), "0_.:-x", "shoal.noop"];
  const bad = ["", "_a", ".a", "a".repeat(129), "a b", "a/b", "é", "a\n"];
  for (const name of good) await db.sql`select ${name}::text::shoal.name`;
  for (const name of bad) {
    const error = await assertRejects(() => db.sql`select ${name}::text::shoal.name`, Error);
    assert(error.message.includes('check constraint "name_format"'), JSON.stringify(name));
  }
});

/**
 * Make every commit that inserted a job slow (a deferred trigger sleeps at commit), so a
 * NOTIFY sent before the job's commit reaches the listener while the job is still
 * invisible.
 */
async function slowCommits(sql: Sql): Promise<void> {
  await sql.unsafe(`
    create function public.slow_commit() returns trigger language plpgsql as $$
    begin
      perform pg_sleep(0.05);
      return null;
    end $$;
    create constraint trigger slow_commit after insert on shoal.jobs
      deferrable initially deferred for each row execute function public.slow_commit();`);
}

/** Listen on shoal_jobs; for each NOTIFY, count at once the committed jobs of its queue. */
async function watchNotifications(
  sql: Sql,
  checker: Sql,
): Promise<{ seen: Map<string, number[]>; stop: () => Promise<void> }> {
  const seen = new Map<string, number[]>();
  const checks: Promise<void>[] = [];
  const { unlisten } = await sql.listen("shoal_jobs", (payload) => {
    const { queue } = parseWake(payload);
    checks.push((async () => {
      const [row] = await checker<{ n: number }[]>`
        select count(*)::integer as n from shoal.jobs where queue = ${queue}`;
      seen.set(queue, [...(seen.get(queue) ?? []), row!.n]);
    })());
  });
  return {
    seen,
    stop: async () => {
      await unlisten();
      await Promise.all(checks);
    },
  };
}

Deno.test("enqueue() on a pool wakes listeners only after each job commits, alone or in a crowd", async () => {
  await using db = await testDb();
  await slowCommits(db.sql);
  const checker = connect(db.url, { applicationName: "shoal test checker", max: 4 });
  const watch = await watchNotifications(db.sql, checker);
  const all: string[] = [];
  try {
    // Alone on the pool: the NOTIFY goes inline, with the insert.
    await enqueue(db.sql, "t", {}, { queue: "alone" });
    // 30 at once on a pool of 10: most commit without NOTIFY and share later ones.
    const queues = Array.from({ length: 30 }, (_, i) => `crowd${i}`);
    await Promise.all(queues.map((queue) => enqueue(db.sql, "t", {}, { queue })));
    // A batch among single jobs.
    await Promise.all([
      enqueueMany(db.sql, [{ task: "t", queue: "batch1" }, { task: "t", queue: "batch2" }]),
      enqueue(db.sql, "t", {}, { queue: "single" }),
    ]);
    all.push("alone", ...queues, "batch1", "batch2", "single");
    await waitFor("a NOTIFY for every queue", () => all.every((q) => watch.seen.has(q)), 20_000);
  } finally {
    await watch.stop();
    await checker.end({ timeout: 5 });
  }
  for (const queue of all) {
    assertEquals(watch.seen.get(queue)?.[0], 1, `the first NOTIFY for ${queue} came early`);
  }
});

Deno.test("enqueue() inside a transaction notifies at its commit, not before", async () => {
  await using db = await testDb();
  const watch = await watchNotifications(db.sql, db.sql);
  try {
    await db.sql.begin(async (tx) => {
      await Promise.all([
        enqueue(tx, "t", {}, { queue: "tx1" }),
        enqueue(tx, "t", {}, { queue: "tx2" }),
      ]);
      await new Promise((resolve) => setTimeout(resolve, 100));
      assertEquals(watch.seen.size, 0);
    });
    await waitFor("NOTIFYs for tx1 and tx2", () => watch.seen.size === 2, 20_000);
  } finally {
    await watch.stop();
  }
  assertEquals([...watch.seen.entries()].sort(), [["tx1", [1]], ["tx2", [1]]]);
});

/** shoal.enqueue() calls whose outcome (id or error) must not change with 004. */
const SQL_CALLS: ((sql: Sql) => Promise<unknown>)[] = [
  (sql) => sql`select shoal.enqueue('q', 't') as id`,
  (sql) =>
    sql`select shoal.enqueue('q', 't', '{"a": 1}', priority => null, max_attempts => null) as id`,
  (sql) =>
    sql`select shoal.enqueue('q', 't', key => 'k', fairness_key => '',
                             run_at => '2031-01-01T00:00:00.123456Z') as id`,
  (sql) => sql`select shoal.enqueue('q', 'u', '{"b": 2}', key => 'k') as id`,
  (sql) => sql`select shoal.enqueue('q', 't', fairness_key => 'f', priority => 3) as id`,
  (sql) => sql`select shoal.enqueue('r', 't', key => 'k', notify => false) as id`,
  (sql) => sql`select shoal.enqueue('q', 't', '[]') as id`,
  (sql) => sql`select shoal.enqueue('q', 't', null) as id`,
  (sql) => sql`select shoal.enqueue('q', 't', 'null') as id`,
  (sql) => sql`select shoal.enqueue('q', 't', key => '') as id`,
  (sql) => sql`select shoal.enqueue('q', 't', fairness_key => ${"f".repeat(257)}) as id`,
  (sql) => sql`select shoal.enqueue('q', 't', max_attempts => 0) as id`,
  (sql) => sql`select shoal.enqueue('q', 't', priority => -32768) as id`,
  // (A null queue is no longer refused since 009: it is the task's, by the catalog rule.)
  (sql) => sql`select shoal.enqueue('q', 'bad name') as id`,
  (sql) => sql`select shoal.enqueue(${"q".repeat(129)}, 't') as id`,
  (sql) => sql`select shoal.enqueue(${"q".repeat(128)}, 't') as id`,
  // Several faults at once: the first in 001's order is the one reported.
  (sql) => sql`select shoal.enqueue('bad name', 't', '[]', priority => 40000) as id`,
  (sql) => sql`select shoal.enqueue('bad name', 't', key => '', priority => 40000) as id`,
  (sql) => sql`select shoal.enqueue('bad name', 't', max_attempts => 0, priority => 40000) as id`,
];

async function outcomes(sql: Sql): Promise<unknown[]> {
  const found: unknown[] = [];
  for (const call of SQL_CALLS) {
    try {
      found.push(await call(sql));
    } catch (error) {
      const { code, message } = error as Error & { code?: string };
      found.push({ code, message });
    }
  }
  return found;
}

Deno.test("shoal.enqueue() returns, stores and refuses exactly as before 004", async () => {
  await using before = await emptyDb();
  // The database of a release at 003: its migrations only (not today's function files).
  await migrate(
    before.sql,
    (await loadMigrations()).filter((m) => m.version <= 3),
    NO_FUNCTIONS,
  );
  await using after = await testDb();
  const expected = await outcomes(before.sql);
  assertEquals(await outcomes(after.sql), expected);
  assertEquals(await storedJobs(after.sql), await storedJobs(before.sql));
  assertEquals(expected.filter((o) => Array.isArray(o)).length, 7);
});

Deno.test("shoal.notify_jobs() announces each distinct start of a batch, at most 100 per queue, soonest first", async () => {
  await using db = await testDb();
  const heard: string[] = [];
  const sub = await db.sql.listen("shoal_jobs", (payload) => void heard.push(payload));
  try {
    const base = Date.now() + 60_000;
    const starts = Array.from({ length: 120 }, (_, i) => new Date(base + i * 1000).toISOString());
    await db.sql`
      select shoal.notify_jobs(
        ${[...starts.map(() => "q"), "q", "r", "r"]}::text[],
        ${[...starts, null, starts[0]!, starts[0]!]}::timestamptz[])`;
    await waitFor("the notifications", () => heard.length >= 101);
    await sleep(300); // and nothing more
    const q = heard.filter((p) => p === "q" || p.startsWith("q@"));
    assertEquals(q.length, 100, heard.join(" ")); // "q" (a job ready now), then 99 starts
    assert(q.includes("q"));
    assert(q.includes(`q@${base}`) && q.includes(`q@${base + 98_000}`));
    assert(!q.includes(`q@${base + 99_000}`));
    assertEquals(heard.filter((p) => p.startsWith("r")), [`r@${base}`]); // deduplicated
  } finally {
    await sub.unlisten();
  }
});
