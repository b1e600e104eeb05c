/**
 * Dependencies between the jobs of an execution (docs/workflows.md, "Dependencies"):
 * startWorkflow() and enqueue(..., { after }) against a real database, the SQL called
 * through the lib functions (claim, completeJobs, fail, cancelExecution). A dependant is
 * held out of shoal.jobs until its last dependency completes; every test checks what is
 * claimable at each point and what is left behind at the end.
 */
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { testDb, waitFor } from "./helpers.ts";
import type { Db, Sql } from "../lib/db.ts";
import { completeJobs, fanOut } from "../lib/barrier.ts";
import {
  cancelExecution,
  getExecution,
  startExecution,
  startWorkflow,
  type WorkflowStep,
} from "../lib/execution.ts";
import { claim, enqueue, enqueueMany, fail, type Job } from "../lib/queue.ts";
import { retryDead } from "../lib/dead.ts";

const Q = "deps";

/** Claim every visible job of the queue, in claim order. */
async function claimAll(sql: Db): Promise<Job[]> {
  const { jobs } = await claim(sql, {
    queues: [Q],
    limit: 1000,
    workerId: "w1",
    visibilityMs: 60_000,
  });
  return jobs;
}

function byTask(jobs: Job[]): Record<string, Job> {
  return Object.fromEntries(jobs.map((j) => [j.task, j]));
}

async function complete(sql: Db, job: Job, result: unknown): Promise<void> {
  assertEquals(await completeJobs(sql, [{ id: job.id, token: job.token, result }]), [job.id]);
}

interface Leftovers {
  jobs: number;
  held: number;
  edges: number;
  results: number;
}

async function leftovers(sql: Db): Promise<Leftovers> {
  const [row] = await sql<Leftovers[]>`
    select (select count(*)::int from shoal.jobs) as jobs,
      (select count(*)::int from shoal.held_jobs) as held,
      (select count(*)::int from shoal.job_dependencies) as edges,
      (select count(*)::int from shoal.job_results) as results`;
  return row!;
}

const NOTHING: Leftovers = { jobs: 0, held: 0, edges: 0, results: 0 };

/**
 * Enqueue a job "t.h" after `dependency` in a transaction left open (holding the execution's
 * lock, its dependant not committed) until commit() is called; resolves once it is in.
 */
async function enqueueAfterHeldOpen(
  sql: Sql,
  dependency: string,
): Promise<{ commit(): Promise<void> }> {
  let release!: () => void;
  const gate = new Promise<void>((resolve) => release = resolve);
  let enqueued!: () => void;
  const added = new Promise<void>((resolve) => enqueued = resolve);
  const done = sql.begin(async (tx) => {
    await enqueue(tx, "t.h", {}, { after: [dependency], queue: Q });
    enqueued();
    await gate;
  });
  await Promise.race([added, done]);
  return {
    async commit() {
      release();
      await done;
    },
  };
}

/** a -> (b, c) -> d */
function diamond(extra: Partial<Record<string, Partial<WorkflowStep>>> = {}): WorkflowStep[] {
  return [
    { id: "a", task: "t.a", queue: Q, payload: { n: 1 }, ...extra.a },
    { id: "b", task: "t.b", queue: Q, after: ["a"], ...extra.b },
    { id: "c", task: "t.c", queue: Q, after: ["a"], ...extra.c },
    { id: "d", task: "t.d", queue: Q, payload: { keep: true }, after: ["b", "c"], ...extra.d },
  ] as WorkflowStep[];
}

Deno.test("startWorkflow() runs a diamond in dependency order, each step receiving its dependencies' results", async () => {
  await using db = await testDb();
  const sql = db.sql;
  const execution = await startWorkflow(sql, { steps: diamond(), label: "diamond" });
  assertEquals((await getExecution(sql, execution))!.label, "diamond");

  const first = await claimAll(sql);
  assertEquals(first.map((j) => j.task), ["t.a"]);
  assertEquals(first[0]!.payload, { n: 1 });
  assertEquals(first[0]!.execution_id, execution);
  assertEquals(await leftovers(sql), { jobs: 1, held: 3, edges: 4, results: 0 });
  await complete(sql, first[0]!, { fetched: 10 });

  const second = byTask(await claimAll(sql));
  assertEquals(Object.keys(second).sort(), ["t.b", "t.c"]);
  assertEquals(second["t.b"]!.payload, { dependencies: { a: { fetched: 10 } } });
  assertEquals(second["t.c"]!.payload, { dependencies: { a: { fetched: 10 } } });
  await complete(sql, second["t.b"]!, "B");
  // One of d's two dependencies is done: d is still not claimable.
  assertEquals(await claimAll(sql), []);
  assertEquals((await leftovers(sql)).held, 1);
  await complete(sql, second["t.c"]!, ["C"]);

  const third = await claimAll(sql);
  assertEquals(third.map((j) => j.task), ["t.d"]);
  assertEquals(third[0]!.payload, { keep: true, dependencies: { b: "B", c: ["C"] } });
  assertEquals(third[0]!.execution_id, execution);
  await complete(sql, third[0]!, { total: 20 });

  const done = (await getExecution(sql, execution))!;
  assertEquals(done.status, "completed");
  assertEquals(done.result, { total: 20 });
  assertEquals(await leftovers(sql), NOTHING);
});

Deno.test("enqueue() with after holds the job until its dependencies complete; one already completed counts as done", async () => {
  await using db = await testDb();
  const sql = db.sql;
  const execution = await startExecution(sql, { task: "t.x", queue: Q });
  const [x] = await claimAll(sql);
  const y = await enqueue(sql, "t.y", { v: 1 }, { queue: Q, after: [x!.id] });
  assertEquals(await claimAll(sql), []);
  const [held] = await sql<{ execution_id: string; waiting: number }[]>`
    select execution_id, waiting from shoal.held_jobs where id = ${y}::bigint`;
  assertEquals(held, { execution_id: execution, waiting: 1 });

  await complete(sql, x!, { x: "done" });
  const [yJob] = await claimAll(sql);
  assertEquals(yJob!.id, y);
  assertEquals(yJob!.payload, { v: 1, dependencies: { [x!.id]: { x: "done" } } });

  // x completed already: a job after it is claimable at once, with its result.
  const z = await enqueue(sql, "t.z", {}, { queue: Q, after: [x!.id, x!.id] });
  const [zJob] = await claimAll(sql);
  assertEquals(zJob!.id, z);
  assertEquals(zJob!.payload, { dependencies: { [x!.id]: { x: "done" } } });
  // ... and after a job that is itself still waiting.
  const w = await enqueue(sql, "t.w", {}, { queue: Q, after: [z, y] });
  await complete(sql, yJob!, 1);
  assertEquals(await claimAll(sql), []);
  await complete(sql, zJob!, 2);
  const [wJob] = await claimAll(sql);
  assertEquals(wJob!.id, w);
  assertEquals(wJob!.payload, { dependencies: { [y]: 1, [z]: 2 } });
  await complete(sql, wJob!, "end");
  assertEquals((await getExecution(sql, execution))!.status, "completed");
  assertEquals((await getExecution(sql, execution))!.result, "end");
  assertEquals(await leftovers(sql), NOTHING);
});

Deno.test("enqueue() with after refuses jobs outside a running execution, and other calls refuse after", async () => {
  await using db = await testDb();
  const sql = db.sql;
  const plain = await enqueue(sql, "t.plain", {}, { queue: "elsewhere" });
  await assertRejects(
    () => enqueue(sql, "t.y", {}, { after: [plain] }),
    Error,
    `Cannot enqueue: job ${plain} is not a job of a running execution`,
  );
  await assertRejects(
    () => enqueue(sql, "t.y", {}, { after: ["999999"] }),
    Error,
    "Cannot enqueue: job 999999 is not a job of a running execution",
  );
  const execution = await startExecution(sql, { task: "t.x", queue: Q });
  const [x] = await claimAll(sql);
  await assertRejects(
    () => enqueue(sql, "t.y", {}, { after: [x!.id, plain] }),
    Error,
    `Cannot enqueue: job ${plain} is not a job of execution ${execution}`,
  );
  await assertRejects(
    () => enqueue(sql, "t.y", {}, { after: [] }),
    TypeError,
    "Invalid options.after for enqueue(): expected an array of 1 to 1000 job ids, not an array",
  );
  await assertRejects(
    () => enqueue(sql, "t.y", {}, { after: [x!.id], key: "k" }),
    TypeError,
    "Invalid options.key for enqueue(): a job with dependencies takes no key",
  );
  await assertRejects(
    () => enqueueMany(sql, [{ task: "t.y", after: [x!.id] } as never]),
    TypeError,
    "Invalid jobs[0].after for enqueueMany(): only enqueue() and ctx.enqueue() take dependencies",
  );
  assertEquals(await leftovers(sql), { jobs: 2, held: 0, edges: 0, results: 0 });
});

Deno.test("completeJobs() of one batch spanning workflows and single jobs: those that go on release their dependants, those that end leave nothing", async () => {
  await using db = await testDb();
  const sql = db.sql;
  const first = await startWorkflow(sql, { steps: diamond() });
  const second = await startWorkflow(sql, { steps: diamond() });
  const singles: string[] = [];
  for (let i = 0; i < 3; i++) {
    singles.push(await startExecution(sql, { task: "t.one", queue: Q, payload: { i } }));
  }
  const roots = await claimAll(sql);
  assertEquals(roots.length, 5);
  // One call: two roots whose executions go on (b and c released), three that end.
  const done = await completeJobs(sql, roots.map((j) => ({ ...j, result: j.payload })));
  assertEquals(done.sort(), roots.map((j) => j.id).sort());
  for (const [i, id] of singles.entries()) {
    const e = (await getExecution(sql, id))!;
    assertEquals([e.status, e.result], ["completed", { i }]);
  }
  const next = await claimAll(sql);
  assertEquals(next.map((j) => j.task).sort(), ["t.b", "t.b", "t.c", "t.c"]);
  for (const j of next) assertEquals(j.payload, { dependencies: { a: { n: 1 } } });
  assertEquals(await leftovers(sql), { jobs: 4, held: 2, edges: 4, results: 2 });
  await completeJobs(sql, next.map((j) => ({ ...j, result: j.task })));
  const last = await claimAll(sql);
  assertEquals(last.map((j) => j.task), ["t.d", "t.d"]);
  assertEquals(last[0]!.payload, { keep: true, dependencies: { b: "t.b", c: "t.c" } });
  await completeJobs(sql, last.map((j) => ({ ...j, result: j.execution_id })));
  for (const id of [first, second]) {
    const e = (await getExecution(sql, id))!;
    assertEquals([e.status, e.result], ["completed", id]);
  }
  assertEquals(await leftovers(sql), NOTHING);
});

Deno.test("startWorkflow() refuses cycles, unknown and duplicate steps with one line, writing nothing", async () => {
  await using db = await testDb();
  const sql = db.sql;
  const cases: [WorkflowStep[], string][] = [
    [
      [
        { id: "a", task: "t.a", after: ["c"] },
        { id: "b", task: "t.b", after: ["a"] },
        { id: "c", task: "t.c", after: ["b"] },
        { id: "r", task: "t.r" },
      ],
      'Cannot start workflow: step "a" depends on itself through "c" -> "b" -> "a"',
    ],
    [
      [{ id: "a", task: "t.a" }, { id: "b", task: "t.b", after: ["a", "b"] }],
      'Cannot start workflow: step "b" depends on itself through "b"',
    ],
    [
      // d only lies after the cycle b <-> c: the cycle is what is named.
      [
        { id: "a", task: "t.a" },
        { id: "d", task: "t.d", after: ["c"] },
        { id: "b", task: "t.b", after: ["a", "c"] },
        { id: "c", task: "t.c", after: ["b"] },
      ],
      'Cannot start workflow: step "c" depends on itself through "b" -> "c"',
    ],
    [
      [{ id: "a", task: "t.a" }, { id: "b", task: "t.b", after: ["z"] }],
      'Cannot start workflow: step "b" depends on unknown step "z"',
    ],
    [
      [{ id: "a", task: "t.a" }, { id: "a", task: "t.b" }],
      'Cannot start workflow: two steps have the id "a"',
    ],
  ];
  for (const [steps, message] of cases) {
    const error = await assertRejects(() => startWorkflow(sql, { steps }));
    assertEquals((error as Error).message, message);
  }
  await assertRejects(
    () => startWorkflow(sql, { steps: [{ id: "a b", task: "t.a" }] }),
    TypeError,
    'Invalid spec.steps[0].id for startWorkflow(): expected a name of 1 to 128 letters, digits or _.:-, not "a b"',
  );
  await assertRejects(
    () => startWorkflow(sql, { steps: [{ id: "a", task: "t.a", payload: null as never }] }),
    TypeError,
    "spec.steps[0].payload for startWorkflow()",
  );
  // The SQL entry point refuses what TypeScript would, for other languages.
  await assertRejects(
    () => sql`select shoal.start_workflow('[{"id": "a", "task": "t.a", "after": "b"}]')`,
    Error,
    'Cannot start workflow: step "a" must have a task name, after as an array of step ids',
  );
  const [row] = await sql<{ n: number }[]>`select count(*)::int as n from shoal.executions`;
  assertEquals(row!.n, 0);
  assertEquals(await leftovers(sql), NOTHING);
});

Deno.test("a dependency that fails for good fails the execution and removes its dependants", async () => {
  await using db = await testDb();
  const sql = db.sql;
  const execution = await startWorkflow(sql, { steps: diamond({ a: { maxAttempts: 1 } }) });
  const [a] = await claimAll(sql);
  assertEquals(await fail(sql, a!, { error: "boom", retryInMs: 0 }), "dead");
  const failed = (await getExecution(sql, execution))!;
  assertEquals(failed.status, "failed");
  assertEquals(failed.error, `Job ${a!.id} (t.a) failed: boom`);
  assertEquals(await claimAll(sql), []);
  assertEquals(await leftovers(sql), NOTHING);
});

Deno.test("onDependencyFailure run: the dependant runs with the failure recorded and the execution completes", async () => {
  await using db = await testDb();
  const sql = db.sql;
  const execution = await startWorkflow(sql, {
    steps: [
      { id: "a", task: "t.a", queue: Q, maxAttempts: 1 },
      { id: "ok", task: "t.ok", queue: Q },
      { id: "b", task: "t.b", queue: Q, after: ["a", "ok"], onDependencyFailure: "run" },
    ],
  });
  const jobs = byTask(await claimAll(sql));
  assertEquals(await fail(sql, jobs["t.a"]!, { error: "boom", retryInMs: 0 }), "dead");
  assertEquals((await getExecution(sql, execution))!.status, "running");
  assertEquals(await claimAll(sql), []); // b still waits for "ok"
  await complete(sql, jobs["t.ok"]!, { fine: true });
  const [b] = await claimAll(sql);
  assertEquals(b!.task, "t.b");
  assertEquals(b!.payload, {
    dependencies: { a: null, ok: { fine: true } },
    dependency_errors: { a: `Job ${jobs["t.a"]!.id} (t.a) failed: boom` },
  });
  await complete(sql, b!, "b ran");
  const done = (await getExecution(sql, execution))!;
  assertEquals([done.status, done.result], ["completed", "b ran"]);
  assertEquals(await leftovers(sql), NOTHING);
  // The dead job stays in the dead-letter table, as any.
  const [dead] = await sql<{ n: number }[]>`select count(*)::int as n from shoal.dead_jobs`;
  assertEquals(dead!.n, 1);
});

Deno.test("a dependency that failed for good and was retried from the dead letters counts as failed for a job enqueued after it, never as waiting", async () => {
  await using db = await testDb();
  const sql = db.sql;
  const execution = await startWorkflow(sql, {
    steps: [
      { id: "a", task: "t.a", queue: Q, maxAttempts: 1 },
      { id: "b", task: "t.b", queue: Q, after: ["a"], onDependencyFailure: "run" },
    ],
  });
  const [a] = await claimAll(sql);
  assertEquals(await fail(sql, a!, { error: "boom", retryInMs: 0 }), "dead");
  const [b] = await claimAll(sql);
  assertEquals(b!.task, "t.b");
  assertEquals(await retryDead(sql, a!.id), "retried");
  // The default policy refuses a failed dependency; "run" runs at once: a is not waited for.
  await assertRejects(
    () => enqueue(sql, "t.h", {}, { after: [a!.id], queue: Q }),
    Error,
    `Cannot enqueue: job ${a!.id} failed`,
  );
  await enqueue(sql, "t.h", {}, { after: [a!.id], queue: Q, onDependencyFailure: "run" });
  const claimed = byTask(await claimAll(sql));
  assert(claimed["t.h"] !== undefined, "the job after the failed dependency runs at once");
  assertEquals((await getExecution(sql, execution))!.status, "running");
});

Deno.test("one dependant with the default policy fails the execution even when another would run", async () => {
  await using db = await testDb();
  const sql = db.sql;
  const execution = await startWorkflow(sql, {
    steps: [
      { id: "a", task: "t.a", queue: Q, maxAttempts: 1 },
      { id: "b", task: "t.b", queue: Q, after: ["a"], onDependencyFailure: "run" },
      { id: "c", task: "t.c", queue: Q, after: ["a"] },
    ],
  });
  const [a] = await claimAll(sql);
  assertEquals(await fail(sql, a!, { error: "boom", retryInMs: 0 }), "dead");
  assertEquals((await getExecution(sql, execution))!.status, "failed");
  assertEquals(await leftovers(sql), NOTHING);
});

Deno.test("cancelExecution() of a workflow leaves nothing behind", async () => {
  await using db = await testDb();
  const sql = db.sql;
  const execution = await startWorkflow(sql, { steps: diamond() });
  const [a] = await claimAll(sql);
  await complete(sql, a!, 1);
  assertEquals(await leftovers(sql), { jobs: 2, held: 1, edges: 2, results: 1 });
  assert(await cancelExecution(sql, execution));
  assertEquals((await getExecution(sql, execution))!.status, "cancelled");
  assertEquals(await leftovers(sql), NOTHING);
});

Deno.test("a job others depend on cannot fan out; a fan-out child cannot be a dependency", async () => {
  await using db = await testDb();
  const sql = db.sql;
  await startWorkflow(sql, { steps: diamond() });
  const [a] = await claimAll(sql);
  await assertRejects(
    () => fanOut(sql, a!, { children: [], callback: { task: "t.cb" } }),
    Error,
    `Cannot fan out from job ${a!.id}: other jobs depend on it`,
  );
  await sql`delete from shoal.jobs`;
  await sql`delete from shoal.held_jobs`;
  await sql`delete from shoal.job_dependencies`;

  await startExecution(sql, { task: "t.p", queue: Q });
  const [p] = await claimAll(sql);
  await fanOut(sql, p!, { children: [{ task: "t.kid", queue: Q }], callback: { task: "t.cb" } });
  const [kid] = await claimAll(sql);
  await assertRejects(
    () => enqueue(sql, "t.y", {}, { after: [kid!.id] }),
    Error,
    `Cannot enqueue: job ${kid!.id} is a fan-out child, which cannot be a dependency`,
  );
});

Deno.test("a fan-out racing an uncommitted enqueue after its job waits for it and is refused; the dependant is not stranded", async () => {
  await using db = await testDb();
  const sql = db.sql;
  await startExecution(sql, { task: "t.a", queue: Q });
  const [a] = await claimAll(sql);
  // T2 adds a dependant of a and holds its transaction open.
  const t2 = await enqueueAfterHeldOpen(sql, a!.id);
  // T1's fan-out from a cannot see that dependant yet: it must wait for T2, then refuse.
  const t1 = fanOut(sql, a!, {
    children: [{ task: "t.kid", queue: Q }],
    callback: { task: "t.cb" },
  });
  await new Promise((resolve) => setTimeout(resolve, 300));
  await t2.commit();
  await assertRejects(() => t1, Error, `Cannot fan out from job ${a!.id}: other jobs depend on it`);
  // a is still there (the fan-out rolled back): completing it releases the dependant.
  await complete(sql, a!, "a");
  const [h] = await claimAll(sql);
  assertEquals(h!.task, "t.h");
});

Deno.test("a cancel racing an uncommitted enqueue after a job of its execution leaves nothing behind", async () => {
  await using db = await testDb();
  const sql = db.sql;
  const execution = await startExecution(sql, { task: "t.a", queue: Q });
  const [a] = await claimAll(sql);
  // T2 adds a dependant of a, holding the execution's lock, and does not commit yet.
  const t2 = await enqueueAfterHeldOpen(sql, a!.id);
  // T1's cancel waits for T2 on the execution, then removes the dependant T2 committed.
  const t1 = cancelExecution(sql, execution);
  await new Promise((resolve) => setTimeout(resolve, 300));
  await t2.commit();
  assert(await t1);
  assertEquals((await getExecution(sql, execution))!.status, "cancelled");
  assertEquals(await leftovers(sql), NOTHING);
});

Deno.test("two dependencies completing at the same moment release their dependant exactly once", async () => {
  await using db = await testDb();
  const sql = db.sql;
  for (let round = 0; round < 20; round++) {
    const execution = await startWorkflow(sql, { steps: diamond() });
    const [a] = await claimAll(sql);
    await complete(sql, a!, round);
    const { "t.b": b, "t.c": c } = byTask(await claimAll(sql));
    // Two connections of the pool, at once.
    const done = await Promise.all([
      completeJobs(sql, [{ id: b!.id, token: b!.token, result: "b" }]),
      completeJobs(sql, [{ id: c!.id, token: c!.token, result: "c" }]),
    ]);
    assertEquals(done, [[b!.id], [c!.id]]);
    const ds = await claimAll(sql);
    assertEquals(ds.map((j) => j.task), ["t.d"], `round ${round}`);
    assertEquals(ds[0]!.payload.dependencies, { b: "b", c: "c" });
    await complete(sql, ds[0]!, round);
    assertEquals((await getExecution(sql, execution))!.status, "completed");
  }
  // And the interleaving made certain: the second completion waits on the first's lock.
  await startWorkflow(sql, { steps: diamond() });
  const [a] = await claimAll(sql);
  await complete(sql, a!, 0);
  const { "t.b": b, "t.c": c } = byTask(await claimAll(sql));
  let second: Promise<string[]> | undefined;
  await sql.begin(async (tx) => {
    await completeJobs(tx, [{ id: b!.id, token: b!.token, result: "b" }]);
    second = completeJobs(sql, [{ id: c!.id, token: c!.token, result: "c" }]);
    // The second is blocked on the execution's row until this commits.
    await waitFor("the second completion to wait for a lock", async () => {
      const [row] = await sql<{ n: number }[]>`
        select count(*)::int as n from pg_stat_activity
        where wait_event_type = 'Lock' and datname = current_database()`;
      return row!.n === 1;
    });
  });
  assertEquals(await second, [c!.id]);
  const ds = await claimAll(sql);
  assertEquals(ds.map((j) => j.task), ["t.d"]);
  await complete(sql, ds[0]!, 0);
  assertEquals(await leftovers(sql), NOTHING);
});
