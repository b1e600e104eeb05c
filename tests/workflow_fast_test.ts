/**
 * The fast fan-out paths (first in sql/005_fan_out_fast.sql, now in
 * sql/functions/workflow.sql): fan_out inserting its children in one statement (through
 * shoal.insert_jobs), complete_jobs doing a barrier child's ack, arrival and count in one
 * statement, the shoal.name domain's faster check, and arrivals removed with their barrier
 * by a trigger instead of a foreign key. Exact values throughout, against a real database.
 */
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { testDb, waitFor } from "./helpers.ts";
import { connect, type Db, type Sql } from "../lib/db.ts";
import {
  CheckedFanOut,
  checkFanOut,
  completeJobs,
  fanOut,
  type FanOutSpec,
} from "../lib/barrier.ts";
import { getExecution, startExecution } from "../lib/execution.ts";
import { claim, enqueue, type Job } from "../lib/queue.ts";

const Q = "fast";
const OTHER = "fast.other";

async function claimAll(sql: Db, queues: string[] = [Q, OTHER]): Promise<Job[]> {
  const { jobs, poisoned } = await claim(sql, {
    queues,
    limit: 10_000,
    workerId: "w",
    visibilityMs: 60_000,
  });
  assertEquals(poisoned, []);
  return jobs;
}

/** Start an execution whose first job, `parent` on Q, is claimed. */
async function startParent(
  sql: Sql,
  options: { fairnessKey?: string; priority?: number } = {},
): Promise<{ execution: string; parent: Job }> {
  const execution = await startExecution(sql, { task: "parent", queue: Q, ...options });
  const [parent, ...more] = await claimAll(sql, [Q]);
  assertEquals(more, []);
  return { execution, parent: parent! };
}

function kids(n: number): { task: string; payload: { i: number } }[] {
  return Array.from({ length: n }, (_, i) => ({ task: "child", payload: { i } }));
}

interface ChildRow {
  id: string;
  queue: string;
  fair_seq: string;
  child_index: number;
}

async function childRows(sql: Db): Promise<ChildRow[]> {
  return [
    ...await sql<ChildRow[]>`
      select id, queue, fair_seq, child_index from shoal.jobs where task = 'child'
      order by child_index`,
  ];
}

async function counts(sql: Db): Promise<{ jobs: number; barriers: number; arrivals: number }> {
  const [row] = await sql<{ jobs: number; barriers: number; arrivals: number }[]>`
    select (select count(*)::int from shoal.jobs) as jobs,
      (select count(*)::int from shoal.barriers) as barriers,
      (select count(*)::int from shoal.arrivals) as arrivals`;
  return row!;
}

async function remaining(sql: Db, execution: string): Promise<number[]> {
  const rows = await sql<{ remaining: number }[]>`
    select remaining from shoal.barriers where execution_id = ${execution}::bigint order by id`;
  return rows.map((r) => r.remaining);
}

async function callbacks(sql: Db, task = "cb"): Promise<Record<string, unknown>[]> {
  const rows = await sql<{ payload: Record<string, unknown> }[]>`
    select payload from shoal.jobs where task = ${task}::text order by id`;
  return rows.map((r) => r.payload);
}

Deno.test("fanOut() numbers children in child order: ids, and stamps per queue after the key's backlog", async () => {
  await using db = await testDb();
  // The fairness key already has a backlog on Q (not due yet, so never claimed here): its
  // children are stamped behind it.
  const later = new Date(Date.now() + 3_600_000);
  for (let i = 0; i < 3; i++) {
    await enqueue(db.sql, "backlog", {}, { queue: Q, fairnessKey: "k", priority: 2, runAt: later });
  }
  const [last] = await db.sql<{ fair_seq: string }[]>`
    select max(fair_seq)::text as fair_seq from shoal.jobs where task = 'backlog'`;
  const execution = await startExecution(db.sql, {
    task: "parent",
    queue: Q,
    fairnessKey: "k",
    priority: 2,
  });
  const [parent, ...more] = await claimAll(db.sql, [Q]);
  assertEquals(more, []);
  assertEquals(parent!.task, "parent");
  const children = kids(7).map((c) => c.payload.i % 3 === 1 ? { ...c, queue: OTHER } : c);
  assertEquals(await fanOut(db.sql, parent!, { children, callback: { task: "cb" } }), execution);

  const rows = await childRows(db.sql);
  assertEquals(rows.map((r) => r.child_index), [0, 1, 2, 3, 4, 5, 6]);
  const ids = rows.map((r) => BigInt(r.id));
  assert(ids.every((id, i) => i === 0 || id === ids[i - 1]! + 1n), `ids in order: ${ids}`);
  const onQ = rows.filter((r) => r.queue === Q).map((r) => BigInt(r.fair_seq));
  const onOther = rows.filter((r) => r.queue === OTHER).map((r) => BigInt(r.fair_seq));
  const base = BigInt(last!.fair_seq);
  assertEquals(onQ, [base + 1n, base + 2n, base + 3n, base + 4n, base + 5n]);
  assertEquals(onOther, [1n, 2n]);

  // Claimed in child order on each queue.
  assertEquals((await claimAll(db.sql, [Q])).map((j) => j.payload.i), [0, 2, 3, 5, 6]);
  assertEquals((await claimAll(db.sql, [OTHER])).map((j) => j.payload.i), [1, 4]);
});

Deno.test("shoal.fan_out() refuses a bad child with enqueue's message naming it, changing nothing", async () => {
  await using db = await testDb();
  await db.sql`alter database ${db.sql(db.name)} set shoal.max_payload_bytes = '100'`;
  const sql = connect(db.url, { applicationName: "shoal test", max: 2 }); // reads the new limit
  try {
    const { parent } = await startParent(sql);
    const ok = { task: "child" };
    const cases: [unknown, string][] = [
      [{ task: "child", payload: [1] }, "payload must be a JSON object, not array"],
      [{ task: "child", payload: null }, "payload must be a JSON object, not null"],
      [
        { task: "child", payload: { big: "x".repeat(200) } },
        "payload is 211 bytes, over the limit of 100 bytes",
      ],
      [{ task: "child", max_attempts: 0 }, "max_attempts must be from 1 to 1000"],
      [{ task: "child", max_attempts: 1001 }, "max_attempts must be from 1 to 1000"],
      [{ task: "child", max_attempts: 1.5 }, "max_attempts must be from 1 to 1000"],
    ];
    const names = "queue and task must be names of 1 to 128 letters, digits or _.:- " +
      "(starting with a letter or digit)";
    for (const child of [{}, { task: "bad name!" }, { task: "_x" }, { task: "a".repeat(129) }]) {
      cases.push([child, names]);
    }
    cases.push([{ task: "child", queue: "bad queue" }, names], ["child", names], [[1], names]);
    const [before] = await sql<{ n: number }[]>`select count(*)::int as n from shoal.jobs`;
    for (const [child, message] of cases) {
      const spec = { children: [ok, ok, child, ok], callback: { task: "cb" } };
      const error = await assertRejects(() =>
        sql`select shoal.fan_out(${parent.id}::bigint, ${parent.token}::bigint,
          ${JSON.stringify(spec)}::text::jsonb)`
      );
      assertEquals(error.message, `Cannot enqueue job 3: ${message}`, JSON.stringify(child));
      assertEquals(await counts(sql), { jobs: before!.n, barriers: 0, arrivals: 0 });
    }
    // The bounds themselves are fine: a 128-character name, 1 and 1000 attempts.
    const good = {
      children: [
        { task: "a".repeat(128), queue: "b".repeat(128) },
        { task: "child", max_attempts: 1 },
        { task: "child", max_attempts: 1000, payload: { fits: "x".repeat(80) } },
      ],
      callback: { task: "cb" },
    };
    const [row] = await sql<{ execution: string | null }[]>`
      select shoal.fan_out(${parent.id}::bigint, ${parent.token}::bigint,
        ${JSON.stringify(good)}::text::jsonb) as execution`;
    assert(row!.execution !== null);
    const rows = await sql<{ task: string; queue: string; max_attempts: number }[]>`
      select task, queue, max_attempts from shoal.jobs where barrier_id is not null
      order by child_index`;
    assertEquals(rows.map((r) => [r.task.length, r.queue.length, r.max_attempts]), [
      [128, 128, 25],
      [5, Q.length, 1],
      [5, Q.length, 1000],
    ]);
  } finally {
    await sql.end();
  }
});

Deno.test("shoal.name accepts 1 to 128 letters, digits or _.:- starting with a letter or digit, nothing else", async () => {
  await using db = await testDb();
  const good = ["a", "7", "a".repeat(128), "Z_.:-9", "shoal.noop"];
  for (const name of good) {
    const [row] = await db.sql<{ name: string }[]>`select ${name}::text::shoal.name as name`;
    assertEquals(row!.name, name);
  }
  const bad = ["", "a".repeat(129), "_a", ".a", "-a", "a b", "a\n", "\na", "é", "a/b", "a$"];
  for (const name of bad) {
    const error = await assertRejects(() => db.sql`select ${name}::text::shoal.name`);
    assert(
      error.message.includes('violates check constraint "name_format"'),
      `${JSON.stringify(name)}: ${error.message}`,
    );
  }
});

Deno.test("completeJobs() sees the arrivals a sibling batch committed while it waited, and fires once", async () => {
  await using db = await testDb();
  const { execution, parent } = await startParent(db.sql);
  await fanOut(db.sql, parent, { children: kids(3), callback: { task: "cb" } });
  const children = await claimAll(db.sql);
  const [c0, c1, c2] = [0, 1, 2].map((i) => children.find((j) => j.payload.i === i)!);
  await completeJobs(db.sql, [{ ...c1!, result: "one" }]);

  const a = connect(db.url, { applicationName: "shoal test A", max: 1 });
  const b = connect(db.url, { applicationName: "shoal test B", max: 1 });
  try {
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    let aDone!: () => void;
    const aCompleted = new Promise<void>((resolve) => (aDone = resolve));
    // A records child 0 and holds its transaction open (and the barrier's lock with it).
    const first = a.begin(async (tx) => {
      await completeJobs(tx, [{ ...c0!, result: "zero" }]);
      aDone();
      await held;
    });
    await aCompleted;
    // B, the last child, starts its statement now: it must wait for A, then count A's arrival
    // and read A's result although A committed after B's statement began.
    const last = completeJobs(b, [{ ...c2!, result: "two" }]);
    await waitFor("B to wait for the barrier A holds", async () => {
      const [row] = await db.sql<{ n: number }[]>`
        select count(*)::int as n from pg_stat_activity
        where application_name = 'shoal test B' and wait_event_type = 'Lock'`;
      return row!.n === 1;
    });
    release();
    await first;
    assertEquals(await last, [c2!.id]);
  } finally {
    await a.end();
    await b.end();
  }
  assertEquals(await callbacks(db.sql), [{ results: ["zero", "one", "two"] }]);
  assertEquals(await remaining(db.sql, execution), []);
  assertEquals(await counts(db.sql), { jobs: 1, barriers: 0, arrivals: 0 });
});

Deno.test("completeJobs() acks a child whose barrier is gone and records nothing for it", async () => {
  await using db = await testDb();
  const { execution, parent } = await startParent(db.sql);
  await fanOut(db.sql, parent, { children: kids(2), callback: { task: "cb" } });
  const [c0, c1] = await claimAll(db.sql);
  await completeJobs(db.sql, [{ ...c0!, result: 0 }]);
  assertEquals((await counts(db.sql)).arrivals, 1);
  // Gone, as a teardown in another transaction would leave it (its job outlived it).
  await db.sql`delete from shoal.barriers where execution_id = ${execution}::bigint`;
  assertEquals(await completeJobs(db.sql, [{ ...c1!, result: 1 }]), [c1!.id]);
  assertEquals(await counts(db.sql), { jobs: 0, barriers: 0, arrivals: 0 });
  assertEquals(await callbacks(db.sql), []);
  assertEquals((await getExecution(db.sql, execution))!.status, "running");
});

Deno.test("a barrier's arrivals go with it: deleted directly, several at once, or with its execution", async () => {
  await using db = await testDb();
  const opened: { execution: string; children: Job[] }[] = [];
  for (let i = 0; i < 3; i++) {
    const { execution, parent } = await startParent(db.sql);
    await fanOut(db.sql, parent, { children: kids(3), callback: { task: "cb" } });
    const children = (await claimAll(db.sql)).filter((j) => j.execution_id === execution);
    opened.push({ execution, children });
  }
  // Two arrivals in each of the three barriers, in one batch across them.
  const batch = opened.flatMap((o) => o.children.slice(0, 2));
  assertEquals((await completeJobs(db.sql, batch.map((j) => ({ ...j, result: j.id })))).length, 6);
  const arrivalsOf = async (execution: string) => {
    const [row] = await db.sql<{ n: number }[]>`
      select count(*)::int as n from shoal.arrivals a join shoal.barriers b on b.id = a.barrier_id
      where b.execution_id = ${execution}::bigint`;
    return row!.n;
  };
  assertEquals(await Promise.all(opened.map((o) => arrivalsOf(o.execution))), [2, 2, 2]);
  assertEquals(await Promise.all(opened.map((o) => remaining(db.sql, o.execution))), [
    [1],
    [1],
    [1],
  ]);
  const [x, y] = opened;
  await db.sql`delete from shoal.barriers where execution_id = ${x!.execution}::bigint`;
  assertEquals((await counts(db.sql)).arrivals, 4);
  await db.sql`delete from shoal.executions where id = ${y!.execution}::bigint`;
  assertEquals((await counts(db.sql)).arrivals, 2);
  await db.sql`delete from shoal.barriers`;
  assertEquals((await counts(db.sql)).arrivals, 0);
});

Deno.test("completeJobs() of one batch spanning two barriers, a callback and a plain step does each once", async () => {
  await using db = await testDb();
  const [x1, x2] = [
    await startExecution(db.sql, { task: "parent", queue: Q }),
    await startExecution(db.sql, { task: "parent", queue: Q }),
  ];
  const parents = await claimAll(db.sql);
  const one = { execution: x1, parent: parents.find((j) => j.execution_id === x1)! };
  const two = { execution: x2, parent: parents.find((j) => j.execution_id === x2)! };
  await fanOut(db.sql, one.parent, { children: kids(2), callback: { task: "cb" } });
  await fanOut(db.sql, two.parent, { children: kids(3), callback: { task: "cb2" } });
  const step = await startExecution(db.sql, { task: "step", queue: Q });
  const claimed = await claimAll(db.sql);
  const of = (execution: string) => claimed.filter((j) => j.execution_id === execution);
  const stepJob = of(step)[0]!;
  // Barrier one fills, barrier two gets one arrival, the step ends its execution.
  const batch = [...of(one.execution), of(two.execution)[1]!, stepJob].reverse();
  const ids = await completeJobs(
    db.sql,
    batch.map((j) => ({ ...j, result: j.task === "child" ? j.payload.i : "stepped" })),
  );
  assertEquals(ids.sort(), batch.map((j) => j.id).sort());
  assertEquals(await callbacks(db.sql, "cb"), [{ results: [0, 1] }]);
  assertEquals(await callbacks(db.sql, "cb2"), []);
  assertEquals(await remaining(db.sql, one.execution), []);
  assertEquals(await remaining(db.sql, two.execution), [2]);
  const e = await getExecution(db.sql, step);
  assertEquals([e!.status, e!.result], ["completed", "stepped"]);
  assertEquals((await getExecution(db.sql, one.execution))!.status, "running");

  // The callback finishing ends its execution; the same batch again changes nothing.
  const [cb] = (await claimAll(db.sql)).filter((j) => j.task === "cb");
  assertEquals(await completeJobs(db.sql, [{ ...cb!, result: "all" }]), [cb!.id]);
  assertEquals(await completeJobs(db.sql, batch.map((j) => ({ ...j, result: "again" }))), []);
  const ended = await getExecution(db.sql, one.execution);
  assertEquals([ended!.status, ended!.result], ["completed", "all"]);
  assertEquals(await remaining(db.sql, two.execution), [2]);
  assertEquals(await counts(db.sql), { jobs: 2, barriers: 1, arrivals: 1 });
});

Deno.test("checkFanOut() returns the JSON shoal.fan_out takes; fanOut() sends a checked spec as it is", async () => {
  const checked = checkFanOut({
    children: [
      { task: "child", payload: { a: 1, gone: undefined, s: 'q"\n' } },
      { task: "child", queue: OTHER, maxAttempts: 3 },
    ],
    callback: { task: "cb", payload: { x: "y" } },
    onError: { task: "err" },
    expiresInMs: 5000,
  });
  assert(checked instanceof CheckedFanOut);
  assertEquals(checked.children, 2);
  assertEquals(JSON.parse(checked.json), {
    children: [
      { task: "child", payload: { a: 1, s: 'q"\n' } },
      { task: "child", queue: OTHER, max_attempts: 3 },
    ],
    callback: { task: "cb", payload: { x: "y" } },
    on_error: { task: "err" },
    expires_in_ms: 5000,
  });
  const bad: [FanOutSpec, string][] = [
    [
      { children: [{ task: "c" }, { task: "c", maxAttempts: 0 }], callback: { task: "cb" } },
      "Invalid child 1 maxAttempts: expected 1 to 1000",
    ],
    [
      { children: [{ task: "bad name" }], callback: { task: "cb" } },
      'Invalid task name "bad name"',
    ],
    [
      { children: [{ task: "c", payload: { s: "\u0000" } }], callback: { task: "cb" } },
      "Invalid payload: contains a NUL",
    ],
    [{ children: [], callback: { task: "cb", queue: "" } }, 'Invalid queue name ""'],
    [{ children: [], callback: { task: "cb" }, expiresInMs: 0 }, "Invalid fan-out expiresInMs"],
  ];
  for (const [spec, message] of bad) {
    let error: unknown = null;
    try {
      checkFanOut(spec);
    } catch (e) {
      error = e;
    }
    assert(error instanceof Error && error.message.startsWith(message), String(error));
  }

  await using db = await testDb();
  const { execution, parent } = await startParent(db.sql);
  assertEquals(await fanOut(db.sql, parent, checked), execution);
  const rows = await db.sql<{ queue: string; payload: unknown; max_attempts: number }[]>`
    select queue, payload, max_attempts from shoal.jobs where task = 'child' order by child_index`;
  assertEquals(rows.map((r) => [r.queue, r.payload, r.max_attempts]), [
    [Q, { a: 1, s: 'q"\n' }, 25],
    [OTHER, {}, 3],
  ]);
});
