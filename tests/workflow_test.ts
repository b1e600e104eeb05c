/**
 * Executions and fan-out / fan-in against a real database, in-process: the SQL and lib
 * functions called directly (claim, fanOut, completeJobs, fail, cancelExecution,
 * expireBarriers, startExecution), plus runConsumer for the built-in `shoal.chord`.
 * Every assertion is exact: counts, orders and the full set of rows left behind.
 */
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { auditTransitions, testDb, transitions, waitFor } from "./helpers.ts";
import { connect, type Db, type Sql } from "../lib/db.ts";
import {
  completeJobs,
  type Completion,
  expireBarriers,
  fanOut,
  type FanOutJob,
} from "../lib/barrier.ts";
import { cancelExecution, getExecution, startExecution } from "../lib/execution.ts";
import { claim, enqueue, fail, type Job } from "../lib/queue.ts";
import { reapOnce } from "../lib/reaper.ts";
import { type ConsumerOptions, runConsumer } from "../lib/consumer.ts";
import { builtinTasks } from "../lib/builtin_tasks.ts";
import { defineTask, TaskRegistry } from "../lib/tasks.ts";

const Q = "wf";
const OTHER = "wf.other";
const REAPER = { holder: "test", leaseMs: 30_000, intervalMs: 1000, deadRetentionMs: 60_000 };

interface ClaimOpts {
  queues?: string[];
  /** 0 makes the claim visible again at once, as if its worker died. */
  visibilityMs?: number;
  workerId?: string;
  limit?: number;
}

/** Claim every visible job of the queues (in claim order). */
async function claimAll(sql: Db, options: ClaimOpts = {}): Promise<Job[]> {
  const { jobs, poisoned } = await claim(sql, {
    queues: options.queues ?? [Q, OTHER],
    limit: options.limit ?? 200_000,
    workerId: options.workerId ?? "w1",
    visibilityMs: options.visibilityMs ?? 60_000,
  });
  assertEquals(poisoned, []);
  return jobs;
}

/** Claim exactly one job of `task`; fails if there is not exactly one. */
async function claimOne(sql: Db, task: string, options: ClaimOpts = {}): Promise<Job> {
  const jobs = (await claimAll(sql, options)).filter((j) => j.task === task);
  assertEquals(jobs.length, 1, `expected one ${task} job to claim`);
  return jobs[0]!;
}

interface Leftovers {
  jobs: number;
  barriers: number;
  arrivals: number;
}

async function leftovers(sql: Db): Promise<Leftovers> {
  const [row] = await sql<Leftovers[]>`
    select (select count(*)::int from shoal.jobs) as jobs,
      (select count(*)::int from shoal.barriers) as barriers,
      (select count(*)::int from shoal.arrivals) as arrivals`;
  return row!;
}

const NOTHING: Leftovers = { jobs: 0, barriers: 0, arrivals: 0 };

interface JobRow {
  id: string;
  queue: string;
  task: string;
  payload: Record<string, unknown>;
  priority: number;
  fairness_key: string;
  max_attempts: number;
  execution_id: string | null;
  barrier_id: string | null;
  child_index: number | null;
}

/** Every job row of `task`, oldest first. */
async function jobsOf(sql: Db, task: string): Promise<JobRow[]> {
  return [
    ...await sql<JobRow[]>`
    select id, queue, task, payload, priority, fairness_key, max_attempts, execution_id,
      barrier_id, child_index
    from shoal.jobs where task = ${task}::text order by id`,
  ];
}

interface BarrierRow {
  id: string;
  execution_id: string;
  total: number;
  remaining: number;
  callback: Record<string, unknown>;
  error_callback: Record<string, unknown> | null;
  parent_barrier_id: string | null;
  parent_child_index: number | null;
}

async function barriersOf(sql: Db, execution: string): Promise<BarrierRow[]> {
  return [
    ...await sql<BarrierRow[]>`
    select id, execution_id, total, remaining, callback, error_callback, parent_barrier_id,
      parent_child_index
    from shoal.barriers where execution_id = ${execution}::bigint order by id`,
  ];
}

async function arrivalsOf(sql: Db, barrier: string): Promise<{ index: number; result: unknown }[]> {
  return [
    ...await sql<{ index: number; result: unknown }[]>`
    select child_index as index, result from shoal.arrivals
    where barrier_id = ${barrier}::bigint order by child_index`,
  ];
}

/** An execution's status, error and result (throws if it does not exist). */
async function state(
  sql: Sql,
  id: string,
): Promise<{ status: string; error: string | null; result: unknown }> {
  const e = await getExecution(sql, id);
  if (!e) throw new Error(`Execution ${id} does not exist`);
  return { status: e.status, error: e.error, result: e.result };
}

/** Start an execution with a `parent` job on Q and claim it. */
async function startParent(
  sql: Sql,
  options: { priority?: number; fairnessKey?: string } = {},
): Promise<{ execution: string; parent: Job }> {
  const execution = await startExecution(sql, { task: "parent", queue: Q, ...options });
  const parent = await claimOne(sql, "parent");
  assertEquals(parent.execution_id, execution);
  return { execution, parent };
}

function kids(n: number, task = "child"): { task: string; payload: { i: number } }[] {
  return Array.from({ length: n }, (_, i) => ({ task, payload: { i } }));
}

function shuffle<T>(items: T[]): T[] {
  const a = [...items];
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [a[i], a[j]] = [a[j]!, a[i]!];
  }
  return a;
}

/** Split into consecutive batches of 1 to `max` items. */
function batches<T>(items: T[], max: number): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < items.length;) {
    const size = 1 + Math.floor(Math.random() * max);
    out.push(items.slice(i, i + size));
    i += size;
  }
  return out;
}

/** A child's completion with the result `{i, sq}` its callback should see. */
function childDone(job: Job, token = job.token): Completion {
  const i = job.payload.i as number;
  return { id: job.id, token, result: { i, sq: i * i } };
}

function expectedResults(n: number): { i: number; sq: number }[] {
  return Array.from({ length: n }, (_, i) => ({ i, sq: i * i }));
}

/**
 * Insert a job row by hand (as a duplicate delivery would), with workflow membership:
 * through shoal's internal enqueue_jobs, since the public enqueue_many drops membership.
 */
async function insertJob(sql: Db, job: Record<string, unknown>): Promise<string> {
  const [row] = await sql<{ id: string }[]>`
    select id from shoal.enqueue_jobs(${JSON.stringify([job])}::text::jsonb)`;
  return row!.id;
}

/** Count every insert of a job of `task` (a callback enqueued twice would show here). */
async function auditInserts(sql: Sql): Promise<void> {
  await sql`create table test_inserts (task text not null, execution_id bigint)`;
  await sql`
    create function test_audit_insert() returns trigger language plpgsql as $$
    begin
      insert into test_inserts (task, execution_id) values (new.task, new.execution_id);
      return null;
    end $$`;
  await sql`
    create trigger test_audit_insert after insert on shoal.jobs
    for each row execute function test_audit_insert()`;
}

async function inserts(sql: Sql, task: string): Promise<number> {
  const [row] = await sql<{ n: number }[]>`
    select count(*)::int as n from test_inserts where task = ${task}::text`;
  return row!.n;
}

// ---------------------------------------------------------------------------------------
// Executions

Deno.test("shoal.executions refuses illegal status transitions and allows the legal ones", async () => {
  await using db = await testDb();
  const statuses = ["pending", "running", "completed", "failed", "cancelled"];
  const legal = new Set([
    "pending>running",
    "pending>completed",
    "pending>failed",
    "pending>cancelled",
    "running>completed",
    "running>failed",
    "running>cancelled",
  ]);
  const outcomes: string[] = [];
  const expected: string[] = [];
  for (const from of statuses) {
    for (const to of statuses) {
      if (from === to) continue;
      const [row] = await db.sql<{ id: string }[]>`
        insert into shoal.executions (status) values (${from}::text) returning id`;
      const id = row!.id;
      expected.push(`${from}>${to}:${legal.has(`${from}>${to}`) ? "ok" : "refused"}`);
      try {
        await db.sql`update shoal.executions set status = ${to}::text where id = ${id}::bigint`;
        outcomes.push(`${from}>${to}:ok`);
      } catch (error) {
        const e = error as { code?: string; message: string };
        assertEquals(e.code, "22023");
        assertEquals(e.message, `Cannot move execution ${id} from ${from} to ${to}`);
        outcomes.push(`${from}>${to}:refused`);
      }
      const [after] = await db.sql<{ status: string }[]>`
        select status from shoal.executions where id = ${id}::bigint`;
      assertEquals(after!.status, legal.has(`${from}>${to}`) ? to : from);
    }
  }
  assertEquals(outcomes, expected);
  // A terminal row keeps accepting writes that leave its status alone.
  await db.sql`update shoal.executions set label = 'x', status = status where status = 'completed'`;
});

Deno.test("startExecution() creates a pending execution with its first job; the first claim makes it running", async () => {
  await using db = await testDb();
  const execution = await startExecution(db.sql, {
    task: "parent",
    queue: Q,
    payload: { a: 1 },
    priority: 3,
    fairnessKey: "t1",
    maxAttempts: 4,
  });
  const e = await getExecution(db.sql, execution);
  assertEquals(
    [e!.status, e!.label, e!.started_at, e!.finished_at, e!.error, e!.result],
    ["pending", "parent", null, null, null, null],
  );
  assertEquals(
    (await jobsOf(db.sql, "parent")).map((j) => ({ ...j, id: "" })),
    [{
      id: "",
      queue: Q,
      task: "parent",
      payload: { a: 1 },
      priority: 3,
      fairness_key: "t1",
      max_attempts: 4,
      execution_id: execution,
      barrier_id: null,
      child_index: null,
    }],
  );
  const parent = await claimOne(db.sql, "parent");
  const running = await getExecution(db.sql, execution);
  assertEquals(running!.status, "running");
  assert(running!.started_at instanceof Date);
  // Its children's claims leave started_at alone.
  await fanOut(db.sql, parent, { children: kids(2), callback: { task: "cb" } });
  assertEquals((await claimAll(db.sql)).length, 2);
  const later = await getExecution(db.sql, execution);
  assertEquals([later!.status, later!.started_at], ["running", running!.started_at]);
});

Deno.test("startExecution() validates its job like enqueue and writes nothing when it is invalid", async () => {
  await using db = await testDb();
  await assertRejects(() => startExecution(db.sql, { task: "bad name" }), TypeError, "task name");
  await assertRejects(
    () => startExecution(db.sql, { task: "t", priority: 1.5 }),
    RangeError,
    "priority",
  );
  await assertRejects(
    () => startExecution(db.sql, { task: "t", key: "once" }),
    TypeError,
    "Invalid job.key for startExecution(): an execution's first job cannot take a dedupe key",
  );
  const [row] = await db.sql<{ n: number }[]>`
    select (select count(*)::int from shoal.executions) + (select count(*)::int from shoal.jobs)
      as n`;
  assertEquals(row!.n, 0);
});

Deno.test("startExecution() with runAt holds its first job until then", async () => {
  await using db = await testDb();
  const runAt = new Date(Date.now() + 3_600_000);
  const execution = await startExecution(db.sql, { task: "later", queue: Q, runAt });
  const [job] = await db.sql<{ run_at: Date; execution_id: string }[]>`
    select run_at, execution_id from shoal.jobs`;
  assertEquals([job!.run_at.getTime(), job!.execution_id], [runAt.getTime(), execution]);
  assertEquals(await claimAll(db.sql), []);
  assertEquals((await state(db.sql, execution)).status, "pending");
});

Deno.test("claim() acks jobs of completed, failed and cancelled executions unrun and runs the rest", async () => {
  await using db = await testDb();
  const ended: string[] = [];
  for (const status of ["completed", "failed", "cancelled"]) {
    const [e] = await db.sql<{ id: string }[]>`
      insert into shoal.executions default values returning id`;
    await db.sql`update shoal.executions set status = ${status}::text where id = ${e!.id}::bigint`;
    ended.push(await insertJob(db.sql, { queue: Q, task: "t", execution_id: e!.id }));
  }
  const live = await startExecution(db.sql, { task: "t", queue: Q });
  const plain = await enqueue(db.sql, "t", {}, { queue: Q });
  const jobs = await claimAll(db.sql);
  assertEquals(jobs.map((j) => j.execution_id), [live, null]);
  assertEquals(
    (await db.sql<{ id: string }[]>`select id from shoal.jobs order by id`).map((r) => r.id),
    [jobs[0]!.id, plain],
  );
  assertEquals((await db.sql`select id from shoal.dead_jobs`).length, 0);
  assertEquals(
    (await db.sql<{ status: string }[]>`
      select status from shoal.executions order by id`).map((r) => r.status),
    ["completed", "failed", "cancelled", "running"],
  );
});

Deno.test("completeJobs() completes an execution whose last job finishes, with that job's result", async () => {
  await using db = await testDb();
  await auditTransitions(db.sql);
  const execution = await startExecution(db.sql, { task: "step", queue: Q });
  const job = await claimOne(db.sql, "step");
  assertEquals(await completeJobs(db.sql, [{ ...job, result: { answer: 42 } }]), [job.id]);
  const e = await getExecution(db.sql, execution);
  assertEquals([e!.status, e!.result, e!.error], ["completed", { answer: 42 }, null]);
  assert(e!.finished_at instanceof Date);
  assertEquals(await transitions(db.sql, execution), ["pending>running", "running>completed"]);
  assertEquals(await leftovers(db.sql), NOTHING);
  // A second completion of the same claim changes nothing.
  assertEquals(await completeJobs(db.sql, [{ ...job, result: { answer: 0 } }]), []);
  assertEquals((await state(db.sql, execution)).result, { answer: 42 });
});

// ---------------------------------------------------------------------------------------
// Fan-out / fan-in

Deno.test("fanOut() children completed in random order and batches enqueue the callback once, results in child order", async () => {
  await using db = await testDb();
  await auditInserts(db.sql);
  await auditTransitions(db.sql);
  const n = 50;
  const { execution, parent } = await startParent(db.sql, { priority: 7, fairnessKey: "tenant-a" });
  const children: FanOutJob[] = kids(n).map((c) => (
    c.payload.i % 5 === 0 ? { ...c, queue: OTHER } : c
  ));
  assertEquals(
    await fanOut(db.sql, parent, {
      children,
      callback: { task: "cb", payload: { tag: "x", keep: null } },
      onError: { task: "on_err" },
    }),
    execution,
  );
  assertEquals(await jobsOf(db.sql, "parent"), [], "the parent was acked with its fan-out");

  const [barrier, ...more] = await barriersOf(db.sql, execution);
  assertEquals(more, []);
  assertEquals({ ...barrier!, id: "" }, {
    id: "",
    execution_id: execution,
    total: n,
    remaining: n,
    // Queue and attempts resolved as the fan-out opens (the catalog rule): these tasks are
    // in no catalog, so the producer's queue and 25 attempts.
    callback: {
      task: "cb",
      queue: Q,
      max_attempts: 25,
      payload: { tag: "x", keep: null },
      priority: 7,
      fairness_key: "tenant-a",
    },
    error_callback: {
      task: "on_err",
      queue: Q,
      max_attempts: 25,
      payload: {},
      priority: 7,
      fairness_key: "tenant-a",
    },
    parent_barrier_id: null,
    parent_child_index: null,
  });
  const rows = await jobsOf(db.sql, "child");
  assertEquals(
    rows.map((r) => [r.queue, r.payload, r.priority, r.fairness_key, r.barrier_id, r.child_index]),
    children.map((c, i) => [c.queue ?? Q, c.payload!, 7, "tenant-a", barrier!.id, i]),
  );
  assert(rows.every((r) => r.execution_id === execution));

  const claimed = await claimAll(db.sql);
  assertEquals(claimed.length, n);
  let done = 0;
  for (const batch of batches(shuffle(claimed), 7)) {
    const ids = await completeJobs(db.sql, batch.map((j) => childDone(j)));
    assertEquals(ids.sort(), batch.map((j) => j.id).sort());
    done += batch.length;
    if (done < n) {
      assertEquals((await barriersOf(db.sql, execution))[0]!.remaining, n - done);
      assertEquals((await arrivalsOf(db.sql, barrier!.id)).length, done);
      assertEquals(await jobsOf(db.sql, "cb"), []);
    }
  }
  assertEquals(await barriersOf(db.sql, execution), []);
  assertEquals(await arrivalsOf(db.sql, barrier!.id), []);
  const [cb, ...extra] = await jobsOf(db.sql, "cb");
  assertEquals(extra, []);
  assertEquals({ ...cb!, id: "" }, {
    id: "",
    queue: Q,
    task: "cb",
    payload: { tag: "x", keep: null, results: expectedResults(n) },
    priority: 7,
    fairness_key: "tenant-a",
    max_attempts: 25,
    execution_id: execution,
    barrier_id: null,
    child_index: null,
  });
  assertEquals(await state(db.sql, execution), { status: "running", error: null, result: null });

  const callback = await claimOne(db.sql, "cb");
  assertEquals(await completeJobs(db.sql, [{ ...callback, result: { sum: 1 } }]), [callback.id]);
  assertEquals(await state(db.sql, execution), {
    status: "completed",
    error: null,
    result: { sum: 1 },
  });
  assertEquals(await transitions(db.sql, execution), ["pending>running", "running>completed"]);
  assertEquals([await inserts(db.sql, "cb"), await inserts(db.sql, "on_err")], [1, 0]);
  assertEquals(await leftovers(db.sql), NOTHING);
});

Deno.test("fanOut() from a job outside any execution opens a new running execution", async () => {
  await using db = await testDb();
  await enqueue(db.sql, "parent", {}, { queue: Q });
  const parent = await claimOne(db.sql, "parent");
  const execution = await fanOut(db.sql, parent, { children: kids(1), callback: { task: "cb" } });
  if (execution === null) throw new Error("The parent's claim was stale");
  const e = await getExecution(db.sql, execution);
  assertEquals([e!.status, e!.label], ["running", "parent"]);
  assert(e!.started_at instanceof Date);
  const child = await claimOne(db.sql, "child");
  assertEquals(child.execution_id, execution);
  await completeJobs(db.sql, [childDone(child)]);
  const cb = await claimOne(db.sql, "cb");
  assertEquals(cb.payload, { results: [{ i: 0, sq: 0 }] });
  await completeJobs(db.sql, [{ ...cb, result: "done" }]);
  assertEquals(await state(db.sql, execution), {
    status: "completed",
    error: null,
    result: "done",
  });
  assertEquals(await leftovers(db.sql), NOTHING);
});

Deno.test("completeJobs() records a child's arrival once: a stale token, a redelivery and a duplicate row decrement once", async () => {
  await using db = await testDb();
  await auditInserts(db.sql);
  const { execution, parent } = await startParent(db.sql);
  await fanOut(db.sql, parent, { children: kids(3), callback: { task: "cb" } });
  const [barrier] = await barriersOf(db.sql, execution);

  // Worker A's claim of child 0 lapses (visibility 0) and worker B claims it again.
  const first = (await claimAll(db.sql, { workerId: "A", visibilityMs: 0 }))
    .find((j) => j.payload.i === 0)!;
  const byB = await claimAll(db.sql, { workerId: "B" });
  const [again, c1, c2] = [0, 1, 2].map((i) => byB.find((j) => j.payload.i === i)!);
  assertEquals([again!.id, Number(again!.token)], [first.id, Number(first.token) + 1]);

  assertEquals(await completeJobs(db.sql, [{ ...first, result: "stale" }]), []);
  assertEquals((await barriersOf(db.sql, execution))[0]!.remaining, 3);
  assertEquals(await completeJobs(db.sql, [{ ...again!, result: "B" }]), [again!.id]);
  assertEquals((await barriersOf(db.sql, execution))[0]!.remaining, 2);
  assertEquals(await completeJobs(db.sql, [{ ...again!, result: "B again" }]), []);
  assertEquals(await completeJobs(db.sql, [{ ...first, result: "stale again" }]), []);

  // A second job row for child 0 (a duplicate delivery): acked, but it does not arrive again.
  const dup = await insertJob(db.sql, {
    queue: Q,
    task: "child",
    execution_id: execution,
    barrier_id: barrier!.id,
    child_index: 0,
  });
  const dupJob = await claimOne(db.sql, "child", { queues: [Q] });
  assertEquals(dupJob.id, dup);
  assertEquals(await completeJobs(db.sql, [{ ...dupJob, result: "duplicate" }]), [dup]);
  assertEquals((await barriersOf(db.sql, execution))[0]!.remaining, 2);
  assertEquals(await arrivalsOf(db.sql, barrier!.id), [{ index: 0, result: "B" }]);

  // The same child twice in one batch (its duplicate alongside it) also arrives once.
  const dup2 = await insertJob(db.sql, {
    queue: Q,
    task: "child",
    execution_id: execution,
    barrier_id: barrier!.id,
    child_index: 1,
  });
  const [dup2Job] = await claimAll(db.sql);
  assertEquals(dup2Job!.id, dup2);
  const both = [c1!, dup2Job!];
  const ids = await completeJobs(db.sql, both.map((j) => ({ ...j, result: `r${j.id}` })));
  assertEquals(ids.sort(), [c1!.id, dup2].sort());
  assertEquals((await barriersOf(db.sql, execution))[0]!.remaining, 1);

  await completeJobs(db.sql, [{ ...c2!, result: "two" }]);
  const [cb, ...extra] = await jobsOf(db.sql, "cb");
  assertEquals(extra, []);
  const results = cb!.payload.results as unknown[];
  assertEquals([results.length, results[0], results[2]], [3, "B", "two"]);
  assert(results[1] === `r${c1!.id}` || results[1] === `r${dup2}`);
  assertEquals(await inserts(db.sql, "cb"), 1);
});

Deno.test("a stale worker finishing late changes nothing: no arrival, no failure, no fan-out", async () => {
  await using db = await testDb();
  const { execution, parent } = await startParent(db.sql);
  await fanOut(db.sql, parent, { children: kids(2), callback: { task: "cb" } });
  const stale = await claimAll(db.sql, { workerId: "A", visibilityMs: 0 });
  const fresh = await claimAll(db.sql, { workerId: "B" });
  assertEquals(fresh.map((j) => j.id), stale.map((j) => j.id));
  const [s0, s1] = stale;
  const [f0] = fresh;
  await completeJobs(db.sql, [childDone(f0!)]);
  const before = {
    barriers: await barriersOf(db.sql, execution),
    jobs: await jobsOf(db.sql, "child"),
    execution: await getExecution(db.sql, execution),
  };
  assertEquals(before.barriers[0]!.remaining, 1);

  assertEquals(await completeJobs(db.sql, [{ ...s0!, result: "late" }]), []);
  assertEquals(await completeJobs(db.sql, [{ ...s1!, result: "late" }]), []);
  assertEquals(
    await fail(db.sql, s1!, { error: "late failure", retryInMs: 0, permanent: true }),
    "stale",
  );
  assertEquals(
    await fanOut(db.sql, s1!, { children: kids(2, "grandchild"), callback: { task: "cb2" } }),
    null,
  );
  assertEquals({
    barriers: await barriersOf(db.sql, execution),
    jobs: await jobsOf(db.sql, "child"),
    execution: await getExecution(db.sql, execution),
  }, before);
  assertEquals(await arrivalsOf(db.sql, before.barriers[0]!.id), [{
    index: 0,
    result: { i: 0, sq: 0 },
  }]);
  assertEquals((await db.sql`select id from shoal.dead_jobs`).length, 0);
});

/** The state a failed fan-out must leave: the error callback's job and nothing else. */
async function assertAborted(
  sql: Sql,
  execution: string,
  reason: string,
): Promise<void> {
  assertEquals(await state(sql, execution), { status: "failed", error: reason, result: null });
  assertEquals(await barriersOf(sql, execution), []);
  assertEquals((await sql`select 1 from shoal.arrivals`).length, 0);
  assertEquals(await jobsOf(sql, "cb"), []);
  const rows = await sql<JobRow[]>`
    select id, queue, task, payload, priority, fairness_key, max_attempts, execution_id,
      barrier_id, child_index
    from shoal.jobs order by id`;
  assertEquals(rows.map((r) => ({ ...r, id: "" })), [{
    id: "",
    queue: Q,
    task: "on_err",
    payload: { tag: "e", execution_id: Number(execution), error: reason },
    priority: 2,
    fairness_key: "k",
    max_attempts: 25,
    execution_id: null,
    barrier_id: null,
    child_index: null,
  }]);
}

/** A fan-out of 5 children with an error callback; children 0 and 1 arrive, 2 and 3 run. */
async function halfDone(sql: Sql): Promise<{ execution: string; children: Job[] }> {
  const { execution, parent } = await startParent(sql, { priority: 2, fairnessKey: "k" });
  await fanOut(sql, parent, {
    children: kids(5).map((c) => ({ ...c, maxAttempts: 2 })),
    callback: { task: "cb" },
    onError: { task: "on_err", payload: { tag: "e" } },
  });
  const children = await claimAll(sql, { limit: 4 });
  assertEquals(children.map((c) => c.payload.i), [0, 1, 2, 3]);
  await completeJobs(sql, children.slice(0, 2).map((j) => childDone(j)));
  return { execution, children };
}

Deno.test("a child failing permanently aborts the barrier: siblings removed, execution failed, error callback once", async () => {
  await using db = await testDb();
  await auditInserts(db.sql);
  await auditTransitions(db.sql);
  const { execution, children } = await halfDone(db.sql);
  const failing = children[2]!;
  assertEquals(
    await fail(db.sql, failing, { error: "boom", retryInMs: 0, permanent: true }),
    "dead",
  );
  const reason = `Job ${failing.id} (child) failed: boom`;
  await assertAborted(db.sql, execution, reason);
  // The sibling still running finishes late: nothing arrives, nothing is enqueued.
  assertEquals(await completeJobs(db.sql, [childDone(children[3]!)]), []);
  assertEquals(await fail(db.sql, children[3]!, { error: "late", retryInMs: 0 }), "stale");
  await assertAborted(db.sql, execution, reason);
  assertEquals(await transitions(db.sql, execution), ["pending>running", "running>failed"]);
  assertEquals([await inserts(db.sql, "cb"), await inserts(db.sql, "on_err")], [0, 1]);
  assertEquals(
    (await db.sql<{ id: string }[]>`select id from shoal.dead_jobs`).map((r) => r.id),
    [failing.id],
  );
  // The error callback is a plain job: once it runs, nothing is left.
  const onErr = await claimOne(db.sql, "on_err");
  assertEquals(onErr.execution_id, null);
  await completeJobs(db.sql, [{ ...onErr, result: null }]);
  assertEquals(await leftovers(db.sql), NOTHING);
});

Deno.test("a failing child does not wait for a sibling another transaction holds; the next claim acks that one unrun", async () => {
  await using db = await testDb();
  const { execution, children } = await halfDone(db.sql);
  const [pendingSibling] = await jobsOf(db.sql, "child").then((rows) =>
    rows.filter((r) => r.child_index === 4)
  );
  // Another transaction (a claim or heartbeat in flight, say) holds the pending sibling.
  let release!: () => void;
  const held = new Promise<void>((resolve) => (release = resolve));
  let locked!: () => void;
  const isLocked = new Promise<void>((resolve) => (locked = resolve));
  const holder = db.sql.begin(async (tx) => {
    await tx`select 1 from shoal.jobs where id = ${pendingSibling!.id}::bigint for update`;
    locked();
    await held;
  });
  try {
    await isLocked;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const outcome = await Promise.race([
      fail(db.sql, children[2]!, { error: "boom", retryInMs: 0, permanent: true }),
      new Promise<string>((resolve) => (timer = setTimeout(() => resolve("blocked"), 10_000))),
    ]);
    clearTimeout(timer);
    assertEquals(outcome, "dead");
  } finally {
    release();
    await holder;
  }
  assertEquals((await state(db.sql, execution)).status, "failed");
  assertEquals((await jobsOf(db.sql, "child")).map((j) => j.id), [pendingSibling!.id]);
  assertEquals((await claimAll(db.sql)).map((j) => j.task), ["on_err"]);
  assertEquals(await jobsOf(db.sql, "child"), []);
});

Deno.test("a child failing out of attempts, or poisoned at claim, aborts the barrier the same way", async () => {
  for (const how of ["attempts", "poison"] as const) {
    await using db = await testDb();
    await auditInserts(db.sql);
    const { execution, children } = await halfDone(db.sql);
    const failing = children[2]!;
    let reason: string;
    if (how === "attempts") {
      assertEquals(await fail(db.sql, failing, { error: "flaky", retryInMs: 0 }), "retried");
      const again = await claimOne(db.sql, "child", { queues: [Q], limit: 1 });
      assertEquals([again.id, again.attempts], [failing.id, 2]);
      assertEquals(await fail(db.sql, again, { error: "flaky again", retryInMs: 0 }), "dead");
      reason = `Job ${failing.id} (child) failed: flaky again`;
    } else {
      // Claimed twice (its max_attempts) by workers that died: the third claim buries it.
      await db.sql`update shoal.jobs set run_at = now() where id = ${failing.id}::bigint`;
      const again = await claimAll(db.sql, { limit: 1, visibilityMs: 0 });
      assertEquals([again[0]!.id, again[0]!.attempts], [failing.id, 2]);
      const { jobs, poisoned } = await claim(db.sql, {
        queues: [Q],
        limit: 1,
        workerId: "w",
        visibilityMs: 60_000,
      });
      assertEquals([jobs, poisoned.map((p) => p.id)], [[], [failing.id]]);
      reason =
        `Job ${failing.id} (child) failed: Claimed 2 times without finishing: its worker crashed or was killed every time`;
    }
    await assertAborted(db.sql, execution, reason);
    assertEquals([await inserts(db.sql, "cb"), await inserts(db.sql, "on_err")], [0, 1]);
  }
});

Deno.test("an expired barrier: reapOnce() fails its execution, fires the error callback once and leaves nothing", async () => {
  await using db = await testDb();
  await auditInserts(db.sql);
  const { execution } = await halfDone(db.sql);
  // A second, unexpired fan-out elsewhere must be left alone.
  const other = await startParent(db.sql);
  await fanOut(db.sql, other.parent, { children: kids(1, "other"), callback: { task: "cb2" } });

  assertEquals(await expireBarriers(db.sql, 100), 0, "nothing has expired yet");
  await db.sql`
    update shoal.barriers set expires_at = now() - interval '1 second'
    where execution_id = ${execution}::bigint`;
  assertEquals((await reapOnce(db.sql, REAPER))["expired-barriers"], 1);
  const reason = "Fan-out expired with 2 of 5 children arrived";
  assertEquals(await state(db.sql, execution), { status: "failed", error: reason, result: null });
  const onErr = await jobsOf(db.sql, "on_err");
  assertEquals(onErr.map((j) => [j.payload, j.execution_id]), [[
    { tag: "e", execution_id: Number(execution), error: reason },
    null,
  ]]);
  assertEquals((await jobsOf(db.sql, "child")).length, 0);
  assertEquals((await reapOnce(db.sql, REAPER))["expired-barriers"], 0);
  assertEquals(await inserts(db.sql, "on_err"), 1);
  assertEquals(await state(db.sql, other.execution), {
    status: "running",
    error: null,
    result: null,
  });
  assertEquals((await barriersOf(db.sql, other.execution)).length, 1);
  await completeJobs(db.sql, [{ ...(await claimOne(db.sql, "on_err")), result: null }]);
  await db.sql`delete from shoal.jobs where execution_id = ${other.execution}::bigint`;
  await db.sql`delete from shoal.barriers where execution_id = ${other.execution}::bigint`;
  assertEquals(await leftovers(db.sql), NOTHING);
});

Deno.test("expireBarriers() without an error callback fails the execution and leaves no row at all", async () => {
  await using db = await testDb();
  const { execution, parent } = await startParent(db.sql);
  await fanOut(db.sql, parent, {
    children: kids(3),
    callback: { task: "cb" },
    expiresInMs: 1,
  });
  const [child] = await claimAll(db.sql, { limit: 1 });
  await completeJobs(db.sql, [childDone(child!)]);
  await db.sql`select pg_sleep(0.01)`;
  assertEquals(await expireBarriers(db.sql, 100), 1);
  assertEquals(await state(db.sql, execution), {
    status: "failed",
    error: "Fan-out expired with 1 of 3 children arrived",
    result: null,
  });
  assertEquals(await leftovers(db.sql), NOTHING);
  assertEquals(await expireBarriers(db.sql, 100), 0);
});

Deno.test("cancelExecution() cancels, removes its jobs, barriers and arrivals, and runs no callback", async () => {
  await using db = await testDb();
  await auditInserts(db.sql);
  await auditTransitions(db.sql);
  const { execution, children } = await halfDone(db.sql);
  assertEquals(await cancelExecution(db.sql, execution), true);
  const e = await getExecution(db.sql, execution);
  assertEquals([e!.status, e!.error, e!.result], ["cancelled", null, null]);
  assert(e!.finished_at instanceof Date);
  assertEquals(await leftovers(db.sql), NOTHING);
  // The running children finish late: nothing arrives, nothing is enqueued.
  assertEquals(await completeJobs(db.sql, [childDone(children[3]!)]), []);
  assertEquals(await fail(db.sql, children[2]!, { error: "x", retryInMs: 0 }), "stale");
  assertEquals(await cancelExecution(db.sql, execution), false);
  assertEquals(await transitions(db.sql, execution), ["pending>running", "running>cancelled"]);
  assertEquals([await inserts(db.sql, "cb"), await inserts(db.sql, "on_err")], [0, 0]);
  assertEquals(await leftovers(db.sql), NOTHING);
  assertEquals((await db.sql`select id from shoal.dead_jobs`).length, 0);
});

Deno.test("cancelExecution() of a pending execution removes its first job; of a finished or unknown one is false", async () => {
  await using db = await testDb();
  const pending = await startExecution(db.sql, { task: "t", queue: Q });
  assertEquals(await cancelExecution(db.sql, pending), true);
  assertEquals((await state(db.sql, pending)).status, "cancelled");
  assertEquals(await leftovers(db.sql), NOTHING);

  const done = await startExecution(db.sql, { task: "t", queue: Q });
  const job = await claimOne(db.sql, "t");
  await completeJobs(db.sql, [{ ...job, result: 1 }]);
  assertEquals(await cancelExecution(db.sql, done), false);
  assertEquals(await state(db.sql, done), { status: "completed", error: null, result: 1 });
  assertEquals(await cancelExecution(db.sql, "987654"), false);
});

Deno.test("fanOut() of zero children enqueues the callback at once with results []", async () => {
  await using db = await testDb();
  const { execution, parent } = await startParent(db.sql, { priority: -4, fairnessKey: "z" });
  await fanOut(db.sql, parent, { children: [], callback: { task: "cb", payload: { p: 1 } } });
  assertEquals(await barriersOf(db.sql, execution), []);
  const [cb, ...extra] = await jobsOf(db.sql, "cb");
  assertEquals(extra, []);
  assertEquals(
    [cb!.payload, cb!.priority, cb!.fairness_key, cb!.execution_id, cb!.barrier_id],
    [{ p: 1, results: [] }, -4, "z", execution, null],
  );
  const job = await claimOne(db.sql, "cb");
  await completeJobs(db.sql, [{ ...job, result: "empty" }]);
  assertEquals(await state(db.sql, execution), {
    status: "completed",
    error: null,
    result: "empty",
  });
  assertEquals(await leftovers(db.sql), NOTHING);
});

/** Everything a failed fan-out attempt could have touched. */
async function snapshot(sql: Sql): Promise<unknown> {
  return {
    jobs: [...await sql`select id, token, attempts, execution_id from shoal.jobs order by id`],
    executions: [...await sql`select id, status from shoal.executions order by id`],
    barriers: [...await sql`select id from shoal.barriers`],
  };
}

Deno.test("fanOut() over the limit is an error before anything is enqueued, in TypeScript and in SQL", async () => {
  await using db = await testDb();
  const { parent } = await startParent(db.sql);
  const before = await snapshot(db.sql);
  await assertRejects(
    () =>
      fanOut(db.sql, parent, { children: kids(6), callback: { task: "cb" } }, { maxChildren: 5 }),
    RangeError,
    "6 children, over the limit of 5",
  );
  await assertRejects(
    () => fanOut(db.sql, parent, { children: kids(100_001), callback: { task: "cb" } }),
    RangeError,
    "100001 children, over the limit of 100000",
  );
  const spec = { children: kids(6), callback: { task: "cb" } };
  const sqlError = await assertRejects(() =>
    db.sql`select shoal.fan_out(${parent.id}::bigint, ${parent.token}::bigint,
      ${JSON.stringify(spec)}::text::jsonb, 5)`
  );
  assertEquals((sqlError as { code?: string }).code, "54000");
  assertEquals(sqlError.message, "Cannot fan out 6 children: the limit is 5");
  const defaultLimit = await assertRejects(() =>
    db.sql`select shoal.fan_out(${parent.id}::bigint, ${parent.token}::bigint,
      jsonb_build_object(
        'children', (select jsonb_agg(jsonb_build_object('task', 'child'))
                     from generate_series(1, 100001)),
        'callback', jsonb_build_object('task', 'cb')))`
  );
  assertEquals(defaultLimit.message, "Cannot fan out 100001 children: the limit is 100000");
  await assertRejects(
    () =>
      fanOut(db.sql, parent, { children: kids(1), callback: { task: "cb" }, expiresInMs: 1e17 }),
    RangeError,
    "expiresInMs",
  );
  assertEquals(await snapshot(db.sql), before);
  // The parent still holds its claim and can fan out within the limit.
  assert(await fanOut(db.sql, parent, spec, { maxChildren: 6 }));
  assertEquals((await jobsOf(db.sql, "child")).length, 6);
});

Deno.test("shoal.fan_out() refuses a callback or child that could never be enqueued, changing nothing", async () => {
  await using db = await testDb();
  const { parent } = await startParent(db.sql);
  const before = await snapshot(db.sql);
  const bad = [
    { children: kids(1), callback: { task: "bad name!" } },
    { children: kids(1), callback: { task: "cb", queue: "bad queue!" } },
    { children: kids(1), callback: { task: "cb", max_attempts: 0 } },
    { children: kids(1), callback: { task: "cb", payload: [1] } },
    { children: kids(1), callback: { task: "cb" }, on_error: { task: "bad name!" } },
    { children: kids(1), callback: { task: "cb" }, expires_in_ms: -5 },
    { children: kids(1), callback: { task: "cb" }, expires_in_ms: 1e17 },
    { children: kids(1), callback: { task: "cb" }, expires_in_ms: "soon" },
    { children: kids(1), callback: { task: "cb" }, on_error: "on_err" },
    { children: [{ task: "bad name!" }], callback: { task: "cb" } },
    { children: [{ task: "child", payload: "x" }], callback: { task: "cb" } },
  ];
  for (const spec of bad) {
    const error = await assertRejects(() =>
      db.sql`select shoal.fan_out(${parent.id}::bigint, ${parent.token}::bigint,
        ${JSON.stringify(spec)}::text::jsonb)`
    );
    assert(error.message.startsWith("Cannot "), `${JSON.stringify(spec)}: ${error.message}`);
    assertEquals(await snapshot(db.sql), before, JSON.stringify(spec));
  }
});

Deno.test("a nested fan-out's callback arrives in its parent barrier and the outer callback gets it in order", async () => {
  await using db = await testDb();
  await auditInserts(db.sql);
  await auditTransitions(db.sql);
  const { execution, parent } = await startParent(db.sql, { priority: 5, fairnessKey: "n" });
  await fanOut(db.sql, parent, { children: kids(3), callback: { task: "outer_cb" } });
  const [outer] = await barriersOf(db.sql, execution);
  const [c0, c1, c2] = await claimAll(db.sql);
  assertEquals([c0, c1, c2].map((c) => c!.payload.i), [0, 1, 2]);

  // Child 1 fans out itself: its ack is the fan-out, its slot passes to the inner callback.
  await fanOut(db.sql, c1!, {
    children: kids(2, "grandchild"),
    callback: { task: "inner_cb", payload: { level: 2 } },
  });
  const [, inner] = await barriersOf(db.sql, execution);
  assertEquals(
    [inner!.total, inner!.parent_barrier_id, inner!.parent_child_index],
    [2, outer!.id, 1],
  );
  await completeJobs(db.sql, [childDone(c2!)]);
  const grand = await claimAll(db.sql);
  assertEquals(grand.map((g) => [g.task, g.payload.i, g.execution_id]), [
    ["grandchild", 0, execution],
    ["grandchild", 1, execution],
  ]);
  await completeJobs(db.sql, [childDone(grand[1]!)]);
  await completeJobs(db.sql, [childDone(c0!), childDone(grand[0]!)]);
  assertEquals((await barriersOf(db.sql, execution)).map((b) => [b.id, b.remaining]), [[
    outer!.id,
    1,
  ]]);
  const [innerCb] = await jobsOf(db.sql, "inner_cb");
  assertEquals(
    [innerCb!.payload, innerCb!.barrier_id, innerCb!.child_index, innerCb!.priority],
    [{ level: 2, results: expectedResults(2) }, outer!.id, 1, 5],
  );
  assertEquals(await jobsOf(db.sql, "outer_cb"), []);

  const innerJob = await claimOne(db.sql, "inner_cb");
  await completeJobs(db.sql, [{ ...innerJob, result: { inner: "sum" } }]);
  const [outerCb, ...extra] = await jobsOf(db.sql, "outer_cb");
  assertEquals(extra, []);
  assertEquals(outerCb!.payload, {
    results: [{ i: 0, sq: 0 }, { inner: "sum" }, { i: 2, sq: 4 }],
  });
  assertEquals([outerCb!.priority, outerCb!.fairness_key], [5, "n"]);
  assertEquals((await state(db.sql, execution)).status, "running");
  const outerJob = await claimOne(db.sql, "outer_cb");
  await completeJobs(db.sql, [{ ...outerJob, result: { final: true } }]);
  assertEquals(await state(db.sql, execution), {
    status: "completed",
    error: null,
    result: { final: true },
  });
  assertEquals(await transitions(db.sql, execution), ["pending>running", "running>completed"]);
  assertEquals(
    [
      await inserts(db.sql, "inner_cb"),
      await inserts(db.sql, "outer_cb"),
      await inserts(db.sql, "grandchild"),
    ],
    [1, 1, 2],
  );
  assertEquals(await leftovers(db.sql), NOTHING);
});

Deno.test("a nested fan-out of zero children hands its slot straight to its callback", async () => {
  await using db = await testDb();
  const { execution, parent } = await startParent(db.sql);
  await fanOut(db.sql, parent, { children: kids(2), callback: { task: "outer_cb" } });
  const [outer] = await barriersOf(db.sql, execution);
  const [c0, c1] = await claimAll(db.sql);
  await fanOut(db.sql, c0!, { children: [], callback: { task: "inner_cb" } });
  const innerJob = await claimOne(db.sql, "inner_cb");
  assertEquals(innerJob.payload, { results: [] });
  await completeJobs(db.sql, [{ ...innerJob, result: "none" }, childDone(c1!)]);
  const outerJob = await claimOne(db.sql, "outer_cb");
  assertEquals(outerJob.payload, { results: ["none", { i: 1, sq: 1 }] });
  await completeJobs(db.sql, [{ ...outerJob, result: 2 }]);
  assertEquals(await state(db.sql, execution), { status: "completed", error: null, result: 2 });
  assertEquals(await barriersOf(db.sql, execution), []);
  assertEquals(await arrivalsOf(db.sql, outer!.id), []);
  assertEquals(await leftovers(db.sql), NOTHING);
});

Deno.test("a callback that fans out again chains a second fan-out in the same execution", async () => {
  await using db = await testDb();
  await auditTransitions(db.sql);
  const { execution, parent } = await startParent(db.sql);
  await fanOut(db.sql, parent, { children: kids(2), callback: { task: "cb" } });
  await completeJobs(db.sql, (await claimAll(db.sql)).map((j) => childDone(j)));
  const cb = await claimOne(db.sql, "cb");
  await fanOut(db.sql, cb, { children: kids(3, "step2"), callback: { task: "cb2" } });
  const [second] = await barriersOf(db.sql, execution);
  assertEquals([second!.total, second!.parent_barrier_id], [3, null]);
  await completeJobs(db.sql, (await claimAll(db.sql)).map((j) => childDone(j)));
  assertEquals((await state(db.sql, execution)).status, "running");
  const cb2 = await claimOne(db.sql, "cb2");
  assertEquals(cb2.payload, { results: expectedResults(3) });
  await completeJobs(db.sql, [{ ...cb2, result: "chained" }]);
  assertEquals(await state(db.sql, execution), {
    status: "completed",
    error: null,
    result: "chained",
  });
  assertEquals(await transitions(db.sql, execution), ["pending>running", "running>completed"]);
  assertEquals(await leftovers(db.sql), NOTHING);
});

Deno.test("a callback redelivered after its execution completed does not run again", async () => {
  await using db = await testDb();
  const { execution, parent } = await startParent(db.sql);
  await fanOut(db.sql, parent, { children: kids(1), callback: { task: "cb" } });
  await completeJobs(db.sql, [childDone((await claimAll(db.sql))[0]!)]);

  // Worker A's claim of the callback lapses; worker B runs it and completes the execution.
  const a = await claimOne(db.sql, "cb", { workerId: "A", visibilityMs: 0 });
  const b = await claimOne(db.sql, "cb", { workerId: "B" });
  assertEquals(await completeJobs(db.sql, [{ ...b, result: "B" }]), [b.id]);
  assertEquals(await completeJobs(db.sql, [{ ...a, result: "A" }]), []);
  assertEquals(await state(db.sql, execution), { status: "completed", error: null, result: "B" });

  // The same callback delivered once more (a duplicate row): acked unrun at claim.
  await insertJob(db.sql, { queue: Q, task: "cb", execution_id: execution, payload: b.payload });
  assertEquals(await claimAll(db.sql), []);
  assertEquals(await state(db.sql, execution), { status: "completed", error: null, result: "B" });
  assertEquals(await leftovers(db.sql), NOTHING);
});

// ---------------------------------------------------------------------------------------
// shoal.chord, run by an in-process consumer

const CONSUMER: ConsumerOptions = {
  queues: [Q],
  concurrency: 8,
  visibilityTimeoutMs: 2000,
  pollIntervalMs: 50,
  listen: false,
  shutdownGraceMs: 1000,
  taskTimeoutMs: 10_000,
  retryBaseMs: 10,
};

/** Run a consumer with the built-ins and test tasks until `done` resolves. */
async function withConsumer(
  sql: Sql,
  done: (seen: unknown[]) => Promise<unknown>,
): Promise<unknown[]> {
  const seen: unknown[] = [];
  const tasks = new TaskRegistry([
    ...builtinTasks(),
    defineTask<{ i: number }>({ name: "square", handler: ({ i }) => ({ i, sq: i * i }) }),
    defineTask<{ results: unknown[] }>({
      name: "collect",
      handler: ({ results }) => {
        seen.push(results);
        return { count: results.length };
      },
    }),
    defineTask({
      name: "record_error",
      handler: (payload) => {
        seen.push(payload);
      },
    }),
    defineTask<{ n: number }>({
      name: "nest",
      handler: ({ n }, ctx) =>
        ctx.fanOut({
          children: Array.from({ length: n }, (_, i) => ({ task: "square", payload: { i } })),
          callback: { task: "collect" },
        }),
    }),
  ]);
  const stop = new AbortController();
  const running = runConsumer({ sql, tasks }, CONSUMER, stop.signal);
  try {
    await done(seen);
  } finally {
    stop.abort();
    await running;
  }
  return seen;
}

function chordPayload(n: number, callbackPayload: Record<string, unknown> = {}): string {
  return JSON.stringify({
    children: Array.from({ length: n }, (_, i) => ({ task: "square", payload: { i } })),
    callback: { task: "collect", payload: callbackPayload },
  });
}

async function waitTerminal(sql: Sql, execution: string): Promise<string> {
  return await waitFor(`execution ${execution} to end`, async () => {
    const { status } = await state(sql, execution);
    return status === "pending" || status === "running" ? null : status;
  }, 20_000);
}

Deno.test("shoal.chord started with plain SQL shoal.start_execution() runs its callback once, in order", async () => {
  await using db = await testDb();
  await auditTransitions(db.sql);
  const [row] = await db.sql<{ id: string }[]>`
    select shoal.start_execution(${Q}::text, 'shoal.chord',
      ${chordPayload(30, { tag: "sql" })}::text::jsonb) as id`;
  const execution = row!.id;
  const seen = await withConsumer(db.sql, async () => {
    assertEquals(await waitTerminal(db.sql, execution), "completed");
  });
  assertEquals(seen, [expectedResults(30)]);
  assertEquals(await state(db.sql, execution), {
    status: "completed",
    error: null,
    result: { count: 30 },
  });
  assertEquals(await transitions(db.sql, execution), ["pending>running", "running>completed"]);
  assertEquals(await leftovers(db.sql), NOTHING);
});

Deno.test("shoal.chord enqueued with plain SQL shoal.enqueue() opens its own execution", async () => {
  await using db = await testDb();
  await db.sql`select shoal.enqueue(${Q}::text, 'shoal.chord', ${chordPayload(4)}::text::jsonb)`;
  // Until the chord job runs, no execution exists.
  assertEquals((await db.sql`select id from shoal.executions`).length, 0);
  const seen = await withConsumer(db.sql, async () => {
    const id = await waitFor("the chord's execution", async () => {
      const [e] = await db.sql<{ id: string }[]>`select id from shoal.executions`;
      return e?.id;
    });
    assertEquals(await waitTerminal(db.sql, id), "completed");
  });
  assertEquals(seen, [expectedResults(4)]);
  const [e] = await db.sql<{ label: string; status: string; result: unknown }[]>`
    select label, status, result from shoal.executions`;
  assertEquals({ ...e }, { label: "shoal.chord", status: "completed", result: { count: 4 } });
  assertEquals(await leftovers(db.sql), NOTHING);
});

Deno.test("shoal.chord with on_error: a child failing for good runs the error callback once, never the callback", async () => {
  await using db = await testDb();
  const payload = JSON.stringify({
    children: [
      { task: "square", payload: { i: 0 } },
      { task: "shoal.fail", payload: { message: "boom", permanent: true } },
    ],
    callback: { task: "collect" },
    on_error: { task: "record_error", payload: { note: "from sql" } },
  });
  const [row] = await db.sql<{ id: string }[]>`
    select shoal.start_execution(${Q}::text, 'shoal.chord', ${payload}::text::jsonb) as id`;
  const execution = row!.id;
  const seen = await withConsumer(db.sql, async (seen) => {
    assertEquals(await waitTerminal(db.sql, execution), "failed");
    await waitFor("the error callback", () => seen.length === 1);
  });
  const [dead] = await db.sql<{ id: string }[]>`select id from shoal.dead_jobs`;
  const reason = `Job ${dead!.id} (shoal.fail) failed: PermanentError: boom`;
  assertEquals(seen, [{ note: "from sql", execution_id: Number(execution), error: reason }]);
  assertEquals(await state(db.sql, execution), { status: "failed", error: reason, result: null });
  assertEquals(await leftovers(db.sql), NOTHING);
});

Deno.test("runConsumer() runs a chord whose child fans out again; the outer callback gets the nested result", async () => {
  await using db = await testDb();
  const payload = JSON.stringify({
    children: [
      { task: "square", payload: { i: 0 } },
      { task: "nest", payload: { n: 3 } },
      { task: "square", payload: { i: 2 } },
    ],
    callback: { task: "collect" },
  });
  const [row] = await db.sql<{ id: string }[]>`
    select shoal.start_execution(${Q}::text, 'shoal.chord', ${payload}::text::jsonb) as id`;
  const seen = await withConsumer(db.sql, async () => {
    assertEquals(await waitTerminal(db.sql, row!.id), "completed");
  });
  assertEquals(seen, [expectedResults(3), [{ i: 0, sq: 0 }, { count: 3 }, { i: 2, sq: 4 }]]);
  assertEquals((await state(db.sql, row!.id)).result, { count: 3 });
  assertEquals(await leftovers(db.sql), NOTHING);
});

Deno.test("runConsumer() fails a chord over --max-fan-out permanently, enqueueing nothing", async () => {
  await using db = await testDb();
  const [row] = await db.sql<{ id: string }[]>`
    select shoal.start_execution(${Q}::text, 'shoal.chord', ${chordPayload(3)}::text::jsonb) as id`;
  const stop = new AbortController();
  const running = runConsumer(
    { sql: db.sql, tasks: new TaskRegistry(builtinTasks()) },
    { ...CONSUMER, maxFanOut: 2 },
    stop.signal,
  );
  try {
    assertEquals(await waitTerminal(db.sql, row!.id), "failed");
  } finally {
    stop.abort();
    await running;
  }
  const { error } = await state(db.sql, row!.id);
  assert(
    error?.includes("Cannot fan out: Invalid fan-out: 3 children, over the limit of 2"),
    String(error),
  );
  assertEquals(await leftovers(db.sql), NOTHING);
  assertEquals((await db.sql`select id from shoal.dead_jobs`).length, 1);
});

// ---------------------------------------------------------------------------------------
// Concurrency

/**
 * Run `work(tx, i)` for i in 0..n-1, each in its own transaction on its own connection,
 * all released at the same instant (they wait on an advisory lock the caller holds).
 */
async function together<T>(
  url: string,
  n: number,
  work: (tx: Db, i: number) => Promise<T>,
): Promise<PromiseSettledResult<T>[]> {
  const pool = connect(url, { applicationName: "shoal test together", max: n + 1 });
  try {
    const gate = await pool.reserve();
    try {
      await gate`select pg_advisory_lock(4242)`;
      const runs = Array.from({ length: n }, (_, i) =>
        pool.begin(async (tx) => {
          await tx`select pg_advisory_xact_lock_shared(4242)`;
          return await work(tx, i);
        }) as Promise<T>);
      await waitFor("every worker to queue on the gate", async () => {
        const [row] = await gate<{ n: number }[]>`
          select count(*)::int as n from pg_locks
          where locktype = 'advisory' and objid = 4242 and not granted
            and database = (select oid from pg_database where datname = current_database())`;
        return row!.n === n;
      });
      await gate`select pg_advisory_unlock(4242)`;
      return await Promise.allSettled(runs);
    } finally {
      gate.release();
    }
  } finally {
    await pool.end({ timeout: 5 });
  }
}

function rejected<T>(results: PromiseSettledResult<T>[]): string[] {
  return results.flatMap((r) => r.status === "rejected" ? [String(r.reason)] : []);
}

Deno.test("completeJobs() from 20 concurrent batches over one barrier enqueues exactly one callback, in order", async () => {
  for (let trial = 0; trial < 4; trial++) {
    await using db = await testDb();
    await auditInserts(db.sql);
    const n = 200;
    const { execution, parent } = await startParent(db.sql);
    await fanOut(db.sql, parent, { children: kids(n), callback: { task: "cb" } });
    const children = shuffle(await claimAll(db.sql));
    const results = await together(
      db.url,
      20,
      (tx, i) => completeJobs(tx, children.slice(i * 10, i * 10 + 10).map((j) => childDone(j))),
    );
    assertEquals(rejected(results), []);
    assertEquals(
      results.flatMap((r) => r.status === "fulfilled" ? r.value : []).length,
      n,
    );
    const [cb, ...extra] = await jobsOf(db.sql, "cb");
    assertEquals(extra, []);
    assertEquals(cb!.payload, { results: expectedResults(n) });
    assertEquals(await inserts(db.sql, "cb"), 1);
    assertEquals(await barriersOf(db.sql, execution), []);
    assertEquals(await leftovers(db.sql), { jobs: 1, barriers: 0, arrivals: 0 });
  }
});

Deno.test("completeJobs() of an execution's last jobs from 20 connections at once completes it exactly once", async () => {
  for (let trial = 0; trial < 4; trial++) {
    await using db = await testDb();
    await auditTransitions(db.sql);
    const execution = await startExecution(db.sql, { task: "step", queue: Q });
    for (let i = 1; i < 20; i++) {
      await insertJob(db.sql, { queue: Q, task: "step", execution_id: execution });
    }
    const jobs = await claimAll(db.sql);
    assertEquals(jobs.length, 20);
    const results = await together(
      db.url,
      20,
      (tx, i) => completeJobs(tx, [{ ...jobs[i]!, result: i }]),
    );
    assertEquals(rejected(results), []);
    const { status, result } = await state(db.sql, execution);
    assertEquals(status, "completed");
    assert(typeof result === "number" && result >= 0 && result < 20);
    assertEquals(await transitions(db.sql, execution), ["pending>running", "running>completed"]);
    assertEquals(await leftovers(db.sql), NOTHING);
  }
});

Deno.test("cancelExecution() racing 20 completing batches leaves a cancelled execution and, after a claim, nothing", async () => {
  for (let trial = 0; trial < 4; trial++) {
    await using db = await testDb();
    await auditInserts(db.sql);
    const n = 200;
    const { execution, parent } = await startParent(db.sql);
    await fanOut(db.sql, parent, { children: kids(n), callback: { task: "cb" } });
    const children = shuffle(await claimAll(db.sql));
    const batch = (i: number) => children.slice(i * 10, i * 10 + 10);
    const results = await together<unknown>(
      db.url,
      21,
      (tx, i) =>
        i === 20
          ? cancelExecution(tx, execution)
          : completeJobs(tx, batch(i).map((j) => childDone(j))),
    );
    assertEquals(rejected(results), []);
    assertEquals((await state(db.sql, execution)).status, "cancelled");
    // A callback enqueued just before the cancel committed is acked unrun by the next claim.
    assertEquals(await claimAll(db.sql), []);
    assertEquals(await leftovers(db.sql), NOTHING);
    assert((await inserts(db.sql, "cb")) <= 1);
  }
});

Deno.test("completeJobs() of 40 executions in one call completes each once with its own last job's result; one with a job left goes on", async () => {
  await using db = await testDb();
  await auditTransitions(db.sql);
  const executions: string[] = [];
  for (let i = 0; i < 40; i++) {
    executions.push(await startExecution(db.sql, { task: "step", queue: Q, payload: { i } }));
  }
  // Execution 5 ends with two jobs of one batch (the later one's result is its result);
  // execution 9 has a second job the batch leaves running.
  await insertJob(db.sql, {
    queue: Q,
    task: "step",
    execution_id: executions[5],
    payload: { i: 5 },
  });
  await insertJob(db.sql, { queue: Q, task: "other", execution_id: executions[9] });
  const jobs = await claimAll(db.sql);
  assertEquals(jobs.length, 42);
  const done = shuffle(jobs.filter((j) => j.task === "step"));
  const results = done.map((j, position) => ({ ...j, result: { i: j.payload.i, position } }));
  assertEquals((await completeJobs(db.sql, results)).sort(), done.map((j) => j.id).sort());
  for (let i = 0; i < 40; i++) {
    const { status, result } = await state(db.sql, executions[i]!);
    if (i === 9) {
      assertEquals(status, "running");
      assertEquals(await transitions(db.sql, executions[i]!), ["pending>running"]);
      continue;
    }
    const last = Math.max(
      ...results.filter((r) => r.payload.i === i).map((r) => r.result.position),
    );
    assertEquals([status, result], ["completed", { i, position: last }]);
    assertEquals(await transitions(db.sql, executions[i]!), [
      "pending>running",
      "running>completed",
    ]);
  }
  const [other] = jobs.filter((j) => j.task === "other");
  await completeJobs(db.sql, [{ ...other!, result: "other" }]);
  assertEquals(await state(db.sql, executions[9]!), {
    status: "completed",
    error: null,
    result: "other",
  });
  assertEquals(await leftovers(db.sql), NOTHING);
});

Deno.test("completeJobs() batches spanning many executions racing cancels of some: each execution ends once, completed or cancelled", async () => {
  for (let trial = 0; trial < 4; trial++) {
    await using db = await testDb();
    await auditTransitions(db.sql);
    const executions: string[] = [];
    for (let i = 0; i < 60; i++) {
      executions.push(await startExecution(db.sql, { task: "step", queue: Q, payload: { i } }));
    }
    const jobs = shuffle(await claimAll(db.sql));
    assertEquals(jobs.length, 60);
    const cancelled = shuffle([...executions]).slice(0, 6);
    // 6 batches of 10 executions each (shuffled: each spans the id range), 6 cancels.
    const results = await together<unknown>(
      db.url,
      12,
      (tx, i) =>
        i < 6
          ? completeJobs(
            tx,
            jobs.slice(i * 10, i * 10 + 10).map((j) => ({ ...j, result: j.payload.i })),
          )
          : cancelExecution(tx, cancelled[i - 6]!),
    );
    assertEquals(rejected(results), []);
    const cancels = results.slice(6).map((r) => (r as PromiseFulfilledResult<unknown>).value);
    for (let i = 0; i < 60; i++) {
      const id = executions[i]!;
      const { status, result } = await state(db.sql, id);
      const k = cancelled.indexOf(id);
      if (status === "cancelled") {
        // Only a cancel that said so cancelled it, and it won: no completion before it.
        assert(k >= 0 && cancels[k] === true, `execution ${i} cancelled by no cancel`);
        assertEquals(await transitions(db.sql, id), ["pending>running", "running>cancelled"]);
      } else {
        assertEquals([status, result], ["completed", i]);
        if (k >= 0) assertEquals(cancels[k], false);
        assertEquals(await transitions(db.sql, id), ["pending>running", "running>completed"]);
      }
    }
    assertEquals(await claimAll(db.sql), []);
    assertEquals(await leftovers(db.sql), NOTHING);
  }
});

/** Sessions of this database waiting for a lock right now. */
async function lockWaiters(sql: Sql): Promise<number> {
  const [row] = await sql<{ n: number }[]>`
    select count(distinct l.pid)::int as n from pg_locks l
    join pg_stat_activity a on a.pid = l.pid
    where not l.granted and a.datname = current_database()`;
  return row!.n;
}

Deno.test("completeJobs() takes its jobs in id order, so a cancel taking them in id order cannot deadlock with it", async () => {
  await using db = await testDb();
  const { execution, parent } = await startParent(db.sql);
  await fanOut(db.sql, parent, { children: kids(5), callback: { task: "cb" } });
  const [low, , mid, high] = await claimAll(db.sql);
  // Move the lowest child's row to the end of the table, so a scan meets it last whatever
  // plan the batch's delete takes (input order or table order).
  await db.sql`update shoal.jobs set payload = payload where id = ${low!.id}::bigint`;
  // Hold the middle child, so the cancel stops there having taken the lower ones.
  let release!: () => void;
  const held = new Promise<void>((resolve) => (release = resolve));
  let locked!: () => void;
  const isLocked = new Promise<void>((resolve) => (locked = resolve));
  const holder = db.sql.begin(async (tx) => {
    await tx`select 1 from shoal.jobs where id = ${mid!.id}::bigint for update`;
    locked();
    await held;
  });
  let cancel: Promise<boolean> | null = null;
  let complete: Promise<string[]> | null = null;
  try {
    await isLocked;
    cancel = cancelExecution(db.sql, execution);
    await waitFor(
      "the cancel to wait for the middle child",
      async () => (await lockWaiters(db.sql)) === 1,
    );
    // A batch naming a higher child first and a lower one (that the cancel holds) second.
    complete = completeJobs(db.sql, [childDone(high!), childDone(low!)]);
    await waitFor("the batch to wait too", async () => (await lockWaiters(db.sql)) === 2);
  } finally {
    release();
    await holder;
  }
  const settled = await Promise.allSettled<unknown>([cancel!, complete!]);
  assertEquals(rejected(settled), []);
  assertEquals(settled.map((r) => (r as PromiseFulfilledResult<unknown>).value), [true, []]);
  assertEquals((await state(db.sql, execution)).status, "cancelled");
  assertEquals(await leftovers(db.sql), NOTHING);
});

Deno.test("a child failing permanently while 20 batches complete its siblings fails the execution once", async () => {
  for (let trial = 0; trial < 4; trial++) {
    await using db = await testDb();
    await auditInserts(db.sql);
    await auditTransitions(db.sql);
    const n = 201;
    const { execution, parent } = await startParent(db.sql, { priority: 2, fairnessKey: "k" });
    await fanOut(db.sql, parent, {
      children: kids(n),
      callback: { task: "cb" },
      onError: { task: "on_err", payload: { tag: "e" } },
    });
    const all = await claimAll(db.sql);
    const failing = all.find((j) => j.payload.i === 100)!;
    const children = shuffle(all.filter((j) => j !== failing));
    const results = await together<unknown>(
      db.url,
      21,
      (tx, i) =>
        i === 20
          ? fail(tx, failing, { error: "boom", retryInMs: 0, permanent: true })
          : completeJobs(tx, children.slice(i * 10, i * 10 + 10).map((j) => childDone(j))),
    );
    assertEquals(rejected(results), []);
    await assertAborted(db.sql, execution, `Job ${failing.id} (child) failed: boom`);
    assertEquals([await inserts(db.sql, "cb"), await inserts(db.sql, "on_err")], [0, 1]);
    assertEquals(await transitions(db.sql, execution), ["pending>running", "running>failed"]);
  }
});

Deno.test("expireBarriers() racing the last child's completion: either the callback or the failure, never half of each", async () => {
  const outcomes = new Set<string>();
  for (let trial = 0; trial < 12; trial++) {
    await using db = await testDb();
    await auditInserts(db.sql);
    const { execution, parent } = await startParent(db.sql, { priority: 2, fairnessKey: "k" });
    await fanOut(db.sql, parent, {
      children: kids(40),
      callback: { task: "cb" },
      onError: { task: "on_err", payload: { tag: "e" } },
    });
    const children = shuffle(await claimAll(db.sql));
    await completeJobs(db.sql, children.slice(10).map((j) => childDone(j)));
    await db.sql`update shoal.barriers set expires_at = now() - interval '1 second'`;
    const results = await together<unknown>(
      db.url,
      11,
      (tx, i) => i === 10 ? expireBarriers(tx, 100) : completeJobs(tx, [childDone(children[i]!)]),
    );
    assertEquals(rejected(results), []);
    const { status } = await state(db.sql, execution);
    const expired = (results[10] as PromiseFulfilledResult<number>).value;
    if (status === "failed") {
      outcomes.add("failed");
      assertEquals(expired, 1);
      const arrived = 30 +
        results.slice(0, 10).filter((r) => (r as PromiseFulfilledResult<string[]>).value.length)
          .length;
      await assertAborted(
        db.sql,
        execution,
        `Fan-out expired with ${arrived} of 40 children arrived`,
      );
      assertEquals([await inserts(db.sql, "cb"), await inserts(db.sql, "on_err")], [0, 1]);
    } else {
      outcomes.add("completed");
      assertEquals([status, expired], ["running", 0]);
      assertEquals((await jobsOf(db.sql, "cb")).length, 1);
      assertEquals((await jobsOf(db.sql, "cb"))[0]!.payload, { results: expectedResults(40) });
      assertEquals([await inserts(db.sql, "cb"), await inserts(db.sql, "on_err")], [1, 0]);
      assertEquals(await leftovers(db.sql), { jobs: 1, barriers: 0, arrivals: 0 });
    }
  }
  // Not asserted: which side wins is the scheduler's choice; each trial is checked above.
  assert(outcomes.size >= 1);
});

Deno.test("ten children failing for good at the same moment fail the execution once, without deadlock", async () => {
  for (let trial = 0; trial < 3; trial++) {
    await using db = await testDb();
    await auditInserts(db.sql);
    await auditTransitions(db.sql);
    const { execution, parent } = await startParent(db.sql, { priority: 2, fairnessKey: "k" });
    await fanOut(db.sql, parent, {
      children: kids(30),
      callback: { task: "cb" },
      onError: { task: "on_err", payload: { tag: "e" } },
    });
    const failing = (await claimAll(db.sql)).slice(0, 10);
    const results = await together(
      db.url,
      10,
      (tx, i) => fail(tx, failing[i]!, { error: "boom", retryInMs: 0, permanent: true }),
    );
    assertEquals(rejected(results), []);
    const outcomes = results.map((r) => (r as PromiseFulfilledResult<string>).value);
    assert(outcomes.every((o) => o === "dead" || o === "stale"), outcomes.join());
    const dead =
      (await db.sql<{ id: string }[]>`select id from shoal.dead_jobs order by died_at, id`)
        .map((r) => r.id);
    assertEquals(dead.length, outcomes.filter((o) => o === "dead").length);
    const { error } = await state(db.sql, execution);
    const first = dead.find((id) => error === `Job ${id} (child) failed: boom`);
    assert(first !== undefined, `${error} names one of the dead children ${dead.join()}`);
    await assertAborted(db.sql, execution, error!);
    assertEquals([await inserts(db.sql, "cb"), await inserts(db.sql, "on_err")], [0, 1]);
    assertEquals(await transitions(db.sql, execution), ["pending>running", "running>failed"]);
  }
});

Deno.test("cancel, expiry, a permanent failure and completions racing end the execution once and leave nothing", async () => {
  for (let trial = 0; trial < 6; trial++) {
    await using db = await testDb();
    await auditInserts(db.sql);
    await auditTransitions(db.sql);
    const { execution, parent } = await startParent(db.sql, { priority: 2, fairnessKey: "k" });
    await fanOut(db.sql, parent, {
      children: kids(30),
      callback: { task: "cb" },
      onError: { task: "on_err", payload: { tag: "e" } },
    });
    const children = await claimAll(db.sql, { limit: 21 });
    await db.sql`update shoal.barriers set expires_at = now() - interval '1 second'`;
    const results = await together<unknown>(db.url, 13, (tx, i) => {
      if (i === 10) return cancelExecution(tx, execution);
      if (i === 11) return expireBarriers(tx, 100);
      if (i === 12) {
        return fail(tx, children[20]!, { error: "boom", retryInMs: 0, permanent: true });
      }
      return completeJobs(tx, children.slice(i * 2, i * 2 + 2).map((j) => childDone(j)));
    });
    assertEquals(rejected(results), []);
    const { status } = await state(db.sql, execution);
    assert(status === "failed" || status === "cancelled", status);
    assertEquals(await transitions(db.sql, execution), ["pending>running", `running>${status}`]);
    assertEquals(
      [await inserts(db.sql, "cb"), await inserts(db.sql, "on_err")],
      [0, status === "failed" ? 1 : 0],
    );
    // Whatever survived the race belongs to an ended execution: the next claim acks it unrun.
    assertEquals(
      (await claimAll(db.sql)).map((j) => j.task),
      status === "failed" ? ["on_err"] : [],
    );
    await db.sql`delete from shoal.jobs where task = 'on_err'`;
    assertEquals(await leftovers(db.sql), NOTHING);
  }
});

Deno.test("shoal.enqueue_many() drops workflow membership: a caller cannot forge a child's arrival", async () => {
  await using db = await testDb();
  const execution = await startExecution(db.sql, { task: "parent", queue: Q });
  const parent = await claimOne(db.sql, "parent");
  await fanOut(db.sql, parent, {
    children: [{ task: "c" }, { task: "c" }],
    callback: { task: "cb" },
  });
  const [barrier] = await db.sql<{ id: string }[]>`select id from shoal.barriers`;
  const forged = [0, 1].map((i) => ({
    queue: "forged",
    task: "c",
    execution_id: execution,
    barrier_id: barrier!.id,
    child_index: i,
  }));
  await db.sql`select * from shoal.enqueue_many(${JSON.stringify(forged)}::text::jsonb)`;
  const rows = await db.sql<{ execution_id: string | null; barrier_id: string | null }[]>`
    select execution_id, barrier_id from shoal.jobs where queue = 'forged'`;
  assertEquals([...rows], [
    { execution_id: null, barrier_id: null },
    { execution_id: null, barrier_id: null },
  ]);
});
