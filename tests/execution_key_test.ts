/**
 * Idempotent start (issue 17): an execution started with a key is started once. A start with a
 * key already held returns the holder while it is pending or running, and after it ended until
 * the reaper releases the key past the execution-key retention. Real Postgres, many real
 * connections; assertions on the rows left behind.
 */
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { testDb, waitFor } from "./helpers.ts";
import { connect, type Sql } from "../lib/db.ts";
import { completeJobs } from "../lib/barrier.ts";
import {
  cancelExecution,
  getExecution,
  type StartedExecution,
  startExecution,
} from "../lib/execution.ts";
import { claim } from "../lib/queue.ts";
import { executionKeySweep, reapOnce } from "../lib/reaper.ts";

const Q = "keyed";
const REAPER = { holder: "test", leaseMs: 30_000, intervalMs: 1000, deadRetentionMs: 60_000 };

/** Executions and first jobs that hold `key`: one of each once a key was started. */
async function holders(sql: Sql, key: string): Promise<{ executions: number; jobs: number }> {
  const [row] = await sql<{ executions: number; jobs: number }[]>`
    select (select count(*)::integer from shoal.executions where key = ${key}) as executions,
      (select count(*)::integer from shoal.jobs j join shoal.executions e
         on e.id = j.execution_id where e.key = ${key}) as jobs`;
  return row!;
}

/** Claim the execution's one job and complete it: the execution completes. */
async function finish(sql: Sql, id: string): Promise<void> {
  const { jobs } = await claim(sql, {
    queues: [Q],
    limit: 10,
    workerId: "w",
    visibilityMs: 60_000,
  });
  const job = jobs.find((j) => j.execution_id === id);
  if (job === undefined) throw new Error(`No job of execution ${id} to claim`);
  assertEquals(await completeJobs(sql, [{ id: job.id, token: job.token, result: { ok: 1 } }]), [
    job.id,
  ]);
  assertEquals((await getExecution(sql, id))!.status, "completed");
}

Deno.test("startExecution() with a key: 20 connections starting it at once start one execution", async () => {
  await using db = await testDb();
  const clients = Array.from({ length: 20 }, () => connect(db.url, { max: 1 }));
  try {
    // The first start holds its transaction open, so the other 19 find its uncommitted key and
    // wait on it: the race the unique index settles, not one the scheduler happens to avoid.
    let release!: () => void;
    const held = new Promise<void>((resolve) => release = resolve);
    let inserted!: () => void;
    const hasInserted = new Promise<void>((resolve) => inserted = resolve);
    const first = clients[0]!.begin(async (tx) => {
      const started = await startExecution(tx, { task: "ship", queue: Q }, { key: "order-42" });
      inserted();
      await held;
      return started;
    });
    await hasInserted;
    const others = clients.slice(1).map((c) =>
      startExecution(c, { task: "ship", queue: Q, payload: { n: 2 } }, { key: "order-42" })
    );
    await waitFor("19 starts waiting on the first one's key", async () => {
      const [row] = await db.sql<{ n: number }[]>`
        select count(*)::integer as n from pg_stat_activity
        where datname = ${db.name} and wait_event_type = 'Lock'`;
      return row!.n === 19;
    });
    release();
    const results: StartedExecution[] = [await first, ...await Promise.all(others)];
    assertEquals(results.filter((r) => r.created).length, 1);
    assert(results[0]!.created, "the first start created it");
    assertEquals(new Set(results.map((r) => r.id)).size, 1, "every start got the same id");
    assertEquals(await holders(db.sql, "order-42"), { executions: 1, jobs: 1 });
    const [job] = await db.sql<{ payload: unknown }[]>`
      select payload from shoal.jobs where execution_id = ${results[0]!.id}::bigint`;
    assertEquals(job!.payload, {}, "the first start's job, not a retry's");
  } finally {
    await Promise.all(clients.map((c) => c.end({ timeout: 5 })));
  }
});

Deno.test("startExecution() with a key: concurrent starts with no one ahead still start one", async () => {
  await using db = await testDb();
  const clients = Array.from({ length: 20 }, () => connect(db.url, { max: 1 }));
  try {
    for (let round = 0; round < 5; round++) {
      const key = `race-${round}`;
      const results = await Promise.all(
        clients.map((c) => startExecution(c, { task: "ship", queue: Q }, { key })),
      );
      assertEquals(results.filter((r) => r.created).length, 1, `round ${round}`);
      assertEquals(new Set(results.map((r) => r.id)).size, 1, `round ${round}`);
      assertEquals(await holders(db.sql, key), { executions: 1, jobs: 1 });
    }
  } finally {
    await Promise.all(clients.map((c) => c.end({ timeout: 5 })));
  }
});

Deno.test("startExecution() with a key returns the ended execution within the retention, and a new one after the reaper releases the key", async () => {
  await using db = await testDb();
  const first = await startExecution(db.sql, { task: "ship", queue: Q }, { key: "order-7" });
  assertEquals(first.created, true);
  assertEquals((await getExecution(db.sql, first.id))!.key, "order-7");
  // Running: the same one.
  assertEquals(
    await startExecution(db.sql, { task: "ship", queue: Q }, { key: "order-7" }),
    { id: first.id, created: false },
  );
  await finish(db.sql, first.id);
  // Ended, within the window: still the same one (the tombstone), and no job was added.
  assertEquals(
    await startExecution(db.sql, { task: "ship", queue: Q }, { key: "order-7" }),
    { id: first.id, created: false },
  );
  assertEquals((await db.sql`select 1 from shoal.jobs`).length, 0);
  // A sweep inside the window releases nothing.
  assertEquals(
    (await reapOnce(db.sql, REAPER, { sweeps: [executionKeySweep] }))["execution-keys"],
    0,
  );
  // 25 hours later (its end moved back), the default 24 h window has passed.
  await db.sql`update shoal.executions set finished_at = now() - interval '25 hours'
               where id = ${first.id}::bigint`;
  assertEquals(
    (await reapOnce(db.sql, REAPER, { sweeps: [executionKeySweep] }))["execution-keys"],
    1,
  );
  const old = await getExecution(db.sql, first.id);
  assertEquals([old!.status, old!.key], ["completed", null], "the execution stays, its key goes");
  const second = await startExecution(db.sql, { task: "ship", queue: Q }, { key: "order-7" });
  assertEquals(second.created, true);
  assert(second.id !== first.id);
  assertEquals(await holders(db.sql, "order-7"), { executions: 1, jobs: 1 });
});

Deno.test("reaper: the execution-key retention is configurable, and a cancelled execution keeps its key within it", async () => {
  await using db = await testDb();
  const started = await startExecution(db.sql, { task: "ship", queue: Q }, { key: "k-cancel" });
  assert(await cancelExecution(db.sql, started.id));
  assertEquals(
    await startExecution(db.sql, { task: "ship", queue: Q }, { key: "k-cancel" }),
    { id: started.id, created: false },
  );
  await db.sql`update shoal.executions set finished_at = now() - interval '2 hours'
               where id = ${started.id}::bigint`;
  // 3 h retention: kept; 1 h: released.
  const report = (ms: number) =>
    reapOnce(db.sql, { ...REAPER, executionKeyRetentionMs: ms }, { sweeps: [executionKeySweep] });
  assertEquals((await report(3 * 3_600_000))["execution-keys"], 0);
  assertEquals((await report(3_600_000))["execution-keys"], 1);
  assertEquals(
    (await startExecution(db.sql, { task: "ship", queue: Q }, { key: "k-cancel" })).created,
    true,
  );
});

Deno.test("startExecution(): a different key, or no key, starts a new execution", async () => {
  await using db = await testDb();
  const a = await startExecution(db.sql, { task: "ship", queue: Q }, { key: "a" });
  const b = await startExecution(db.sql, { task: "ship", queue: Q }, { key: "b" });
  assertEquals([a.created, b.created], [true, true]);
  assert(a.id !== b.id);
  // Without a key: the id alone, as before keys existed, and a new execution every time.
  const plain1: string = await startExecution(db.sql, { task: "ship", queue: Q });
  const plain2: string = await startExecution(db.sql, { task: "ship", queue: Q });
  assertEquals(typeof plain1, "string");
  assertEquals(new Set([a.id, b.id, plain1, plain2]).size, 4);
  assertEquals((await getExecution(db.sql, plain1))!.key, null);
});

Deno.test("startExecution() refuses bad keys at the boundary, and shoal.start_execution refuses them in SQL", async () => {
  await using db = await testDb();
  const cases: [unknown, string][] = [
    [
      "",
      "Invalid options.key for startExecution(): expected 1 to 512 printable characters (no control characters), not a string of 0 characters",
    ],
    [
      "x".repeat(513),
      "Invalid options.key for startExecution(): expected 1 to 512 printable characters (no control characters), not a string of 513 characters",
    ],
    [
      42,
      "Invalid options.key for startExecution(): expected 1 to 512 printable characters (no control characters), not number",
    ],
    [
      "order\n42",
      "Invalid options.key for startExecution(): contains a control character; use 1 to 512 printable characters (no control characters)",
    ],
    [
      "order\u008542",
      "Invalid options.key for startExecution(): contains a control character; use 1 to 512 printable characters (no control characters)",
    ],
    [
      "a\0b",
      "Invalid options.key for startExecution(): contains a control character; use 1 to 512 printable characters (no control characters)",
    ],
  ];
  for (const [key, message] of cases) {
    await assertRejects(
      // deno-lint-ignore no-explicit-any
      () => startExecution(db.sql, { task: "ship", queue: Q }, { key: key as any }),
      Error,
      message,
    );
  }
  // The longest key is fine, and so is any printable text.
  assert((await startExecution(db.sql, { task: "ship" }, { key: "x".repeat(512) })).created);
  assert((await startExecution(db.sql, { task: "ship" }, { key: "commande n° 42 ✓" })).created);
  // A job key is still refused: the execution's key is the way.
  await assertRejects(
    () => startExecution(db.sql, { task: "ship", key: "k" }),
    TypeError,
    "pass options.key",
  );
  for (const key of ["", "a\nb", "a\u0085b", "x".repeat(513)]) {
    await assertRejects(
      () => db.sql`select shoal.start_execution(task => 'ship', key => ${key}::text)`,
      Error,
      "Cannot start execution: key must be 1 to 512 printable characters",
    );
  }
  assertEquals((await db.sql`select 1 from shoal.executions`).length, 2, "nothing refused went in");
});

Deno.test("shoal.start_execution(key => ...) in SQL returns the holder's id; start_execution_result says whether it started", async () => {
  await using db = await testDb();
  const [a] = await db.sql<{ id: string }[]>`
    select shoal.start_execution(task => 'ship', queue => ${Q}, key => 'sql-1') as id`;
  const [b] = await db.sql<{ id: string }[]>`
    select shoal.start_execution(task => 'ship', queue => ${Q}, key => 'sql-1') as id`;
  assertEquals(a!.id, b!.id);
  const [c] = await db.sql<{ id: string; created: boolean }[]>`
    select * from shoal.start_execution_result(task => 'ship', queue => ${Q}, key => 'sql-1')`;
  assertEquals(c, { id: a!.id, created: false });
  const [d] = await db.sql<{ id: string; created: boolean }[]>`
    select * from shoal.start_execution_result(task => 'ship', queue => ${Q}, key => 'sql-2')`;
  assertEquals(d!.created, true);
  assertEquals(await holders(db.sql, "sql-1"), { executions: 1, jobs: 1 });
  // A start that fails (its job is refused) holds no key: the retry starts it.
  await assertRejects(
    () => db.sql`select shoal.start_execution(task => 'bad name!', key => 'sql-3')`,
    Error,
  );
  assertEquals(await holders(db.sql, "sql-3"), { executions: 0, jobs: 0 });
  // A bad job is refused whether or not its key is held: a retried start is checked as the
  // first one was, not answered with the holder.
  await assertRejects(
    () => db.sql`select shoal.start_execution(task => 'bad name!', key => 'sql-1')`,
    Error,
    "queue and task must be names",
  );
  await assertRejects(
    () => db.sql`select shoal.start_execution(task => 'ship', payload => '[1]', key => 'sql-1')`,
    Error,
    "payload must be a JSON object",
  );
});

Deno.test("startExecution() with a key in a repeatable read transaction that cannot see the holder fails with 40001, never a second execution", async () => {
  await using db = await testDb();
  const other = connect(db.url, { max: 1 });
  try {
    const error = await other.begin("isolation level repeatable read", async (tx) => {
      await tx`select 1`; // the snapshot is taken here, before the holder commits
      await startExecution(db.sql, { task: "ship", queue: Q }, { key: "rr-1" });
      try {
        await startExecution(tx, { task: "ship", queue: Q }, { key: "rr-1" });
        return null;
      } catch (e) {
        return e as { code?: string };
      }
    }).catch((e) => e as { code?: string });
    assertEquals(error?.code, "40001");
    assertEquals(await holders(db.sql, "rr-1"), { executions: 1, jobs: 1 });
  } finally {
    await other.end({ timeout: 5 });
  }
});
