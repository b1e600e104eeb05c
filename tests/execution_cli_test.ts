/**
 * `shoal execution start` and `shoal execution show` end to end (and the held jobs `shoal status`
 * counts): real `main.ts` processes
 * against a real database, with the state they show written by the functions a run uses
 * (claim, recordStep, suspendJob, saveProgress).
 */
import { assert, assertEquals } from "./assert.ts";
import { runShoal, testDb } from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import { claim, saveProgress } from "../lib/queue.ts";
import { recordStep, suspendJob } from "../lib/steps.ts";
import { MAX_SHOWN_JOBS, MAX_SHOWN_STEPS } from "../lib/execution_view.ts";
import { HELD_TOTALS_CAP, heldTotals, startWorkflow } from "../lib/execution.ts";
import { completeJobs } from "../lib/barrier.ts";

const Q = "orders";

/** Claim the execution's one job (as a consumer would). */
async function claimJobOf(sql: Sql, execution: string): Promise<{ id: string; token: string }> {
  const { jobs } = await claim(sql, {
    queues: [Q],
    limit: 100,
    workerId: "w",
    visibilityMs: 60_000,
  });
  const job = jobs.find((j) => j.execution_id === execution);
  if (job === undefined) throw new Error(`No job of execution ${execution} claimed`);
  return { id: job.id, token: job.token };
}

Deno.test("shoal execution start --key starts once: a retry prints the same id and says so", async () => {
  await using db = await testDb();
  const start = [
    "execution",
    "start",
    "--task",
    "app.ship",
    "--queue",
    Q,
    "--payload",
    '{"order":42}',
    "--key",
    "order-42",
  ];
  const a = await runShoal(start, { url: db.url });
  assertEquals(a.code, 0, a.stderr);
  assert(/^\d+\n$/.test(a.stdout), a.stdout);
  const b = await runShoal(start, { url: db.url });
  assertEquals([b.code, b.stdout], [0, a.stdout]);
  assert(
    b.stderr.includes(
      `Execution ${a.stdout.trim()} holds key "order-42" (pending): not started again`,
    ),
    b.stderr,
  );
  const json = await runShoal([...start, "--json"], { url: db.url });
  assertEquals(json.code, 0, json.stderr);
  assertEquals(JSON.parse(json.stdout), { id: a.stdout.trim(), created: false });
  const [row] = await db.sql<{ executions: number; jobs: number }[]>`
    select (select count(*)::integer from shoal.executions) as executions,
      (select count(*)::integer from shoal.jobs) as jobs`;
  assertEquals(row, { executions: 1, jobs: 1 });
  // Another key, or none, starts another.
  const other = await runShoal(
    ["execution", "start", "--task", "app.ship", "--queue", Q, "--key", "order-43", "--json"],
    { url: db.url },
  );
  assertEquals(JSON.parse(other.stdout).created, true);
  const plain = await runShoal(["execution", "start", "--task", "app.ship"], { url: db.url });
  assertEquals(plain.code, 0, plain.stderr);
  assertEquals(new Set([a.stdout, other.stdout, plain.stdout].map((s) => s.trim())).size, 3);
});

Deno.test("shoal execution start refuses a bad key or a missing task with one line, exit 2", async () => {
  await using db = await testDb();
  const cases: [string[], string][] = [
    [["--task", "t", "--key", "a\nb"], "Invalid --key: contains a control character"],
    [["--task", "t", "--key", "x".repeat(513)], "Invalid --key: expected 1 to 512 printable"],
    [[], "shoal execution start needs --task"],
    [["--task", "t", "extra"], 'shoal execution start takes no argument "extra"'],
  ];
  for (const [args, says] of cases) {
    const r = await runShoal(["execution", "start", ...args], { url: db.url });
    assertEquals([r.code, r.stdout], [2, ""], r.stderr);
    assert(r.stderr.startsWith("shoal: ") && r.stderr.includes(says), r.stderr);
  }
  assertEquals((await db.sql`select 1 from shoal.executions`).length, 0);
});

Deno.test("shoal execution show prints status, key, jobs with their steps, sleeps and progress; --json too", async () => {
  await using db = await testDb();
  const started = await runShoal(
    ["execution", "start", "--task", "app.ship", "--queue", Q, "--key", "order-42", "--json"],
    { url: db.url },
  );
  const id: string = JSON.parse(started.stdout).id;
  const job = await claimJobOf(db.sql, id);
  assertEquals(await recordStep(db.sql, job, "charge", { charge: "ch_1" }), "recorded");
  assertEquals(
    await saveProgress(db.sql, [{ ...job, progress: { done: 3, total: 10, message: "packing" } }]),
    1,
  );
  const wake = await suspendJob(db.sql, job, "cool-off", { at: new Date("2030-01-02T03:04:05Z") });
  assertEquals(wake?.toISOString(), "2030-01-02T03:04:05.000Z");
  // A suspension hands the job back with no report (its run ended): a report as a later run's
  // heartbeat would write it.
  await db.sql`
    update shoal.jobs set progress = '{"done": 3, "total": 10, "message": "packing"}'::jsonb
      || jsonb_build_object('at', now())
    where id = ${job.id}::bigint`;

  // Waits for events, as ctx.waitForEvent records them: one received, one still waiting.
  await db.sql`
    insert into shoal.job_steps
      (job_id, name, kind, result, wake_at, event_name, event_key, wait_state, event_id)
    values
      (${job.id}::bigint, 'approval', 'wait', '{"by": "ana"}', null, 'approved', 'order-42',
       'received', 1),
      (${job.id}::bigint, 'review', 'wait', null, '2030-02-03T04:05:06Z', 'reviewed', '',
       'waiting', null)`;
  const text = await runShoal(["execution", "show", id], { url: db.url });
  assertEquals([text.code, text.stderr], [0, ""]);
  const lines = text.stdout.split("\n");
  assertEquals(lines[0], `Execution ${id}: running`);
  assert(lines.includes("  key:      order-42"), text.stdout);
  assert(lines.includes("  label:    app.ship"), text.stdout);
  assert(lines.includes("Live jobs (1):"), text.stdout);
  assert(
    lines.includes(`  job ${job.id}  app.ship  scheduled  attempt 0/25  on ${Q}`),
    text.stdout,
  );
  assert(lines.includes("    progress 3/10 packing"), text.stdout);
  assert(lines.includes('    step charge: {"charge":"ch_1"}'), text.stdout);
  assert(lines.includes("    sleep cool-off: until 2030-01-02T03:04:05.000Z"), text.stdout);
  assert(
    lines.includes('    wait approval: received event approved (key order-42): {"by":"ana"}'),
    text.stdout,
  );
  assert(
    lines.includes(
      "    wait review: waiting for event reviewed, times out at 2030-02-03T04:05:06.000Z",
    ),
    text.stdout,
  );

  const json = await runShoal(["execution", "show", id, "--json"], { url: db.url });
  assertEquals(json.code, 0, json.stderr);
  const view = JSON.parse(json.stdout);
  assertEquals(
    [view.execution.id, view.execution.status, view.execution.key, view.jobs_capped],
    [id, "running", "order-42", false],
  );
  assertEquals(view.jobs.length, 1);
  const shown = view.jobs[0];
  assertEquals(
    [shown.id, shown.task, shown.state, shown.attempts, shown.steps_capped],
    [job.id, "app.ship", "scheduled", 0, false],
  );
  assertEquals(
    shown.steps.map((
      s: { name: string; kind: string; result: unknown; wake_at: string | null },
    ) => [
      s.name,
      s.kind,
      s.result,
      s.wake_at,
    ]),
    [
      ["charge", "step", { charge: "ch_1" }, null],
      ["cool-off", "sleep", null, "2030-01-02T03:04:05.000Z"],
      ["approval", "wait", { by: "ana" }, null],
      ["review", "wait", null, "2030-02-03T04:05:06.000Z"],
    ],
  );
  assertEquals([shown.progress.done, shown.progress.total, shown.progress.message], [
    3,
    10,
    "packing",
  ]);
});

Deno.test("shoal execution show caps the jobs and records it lists, and says so", async () => {
  await using db = await testDb();
  const started = await runShoal(
    ["execution", "start", "--task", "app.fan", "--queue", Q, "--json"],
    { url: db.url },
  );
  const id: string = JSON.parse(started.stdout).id;
  const job = await claimJobOf(db.sql, id);
  for (let i = 0; i < MAX_SHOWN_STEPS + 1; i++) {
    assertEquals(await recordStep(db.sql, job, `s${String(i).padStart(2, "0")}`, i), "recorded");
  }
  // More jobs of the execution than a view lists, through shoal's own insert path.
  await db.sql`
    select shoal.enqueue_jobs((
      select jsonb_agg(jsonb_build_object('queue', ${Q}::text, 'task', 'app.child',
                                          'execution_id', ${id}::bigint, 'payload', '{}'::jsonb))
      from generate_series(1, ${MAX_SHOWN_JOBS}::integer)))`;

  const text = await runShoal(["execution", "show", id], { url: db.url });
  assertEquals(text.code, 0, text.stderr);
  assert(
    text.stdout.includes(`Live jobs (the newest ${MAX_SHOWN_JOBS}; it has more):`),
    text.stdout,
  );
  assertEquals(
    text.stdout.split("\n").filter((l) => l.startsWith("  job ")).length,
    MAX_SHOWN_JOBS,
  );
  // The newest jobs are the children: the first job (with the records) is past the cap.
  assert(!text.stdout.includes(`  job ${job.id} `), text.stdout);

  // Fewer children: the first job is listed, with its first records and a note.
  await db.sql`delete from shoal.jobs where task = 'app.child'
               and id in (select id from shoal.jobs where task = 'app.child' order by id limit 10)`;
  const json = await runShoal(["execution", "show", id, "--json"], { url: db.url });
  const view = JSON.parse(json.stdout);
  assertEquals([view.jobs.length, view.jobs_capped], [MAX_SHOWN_JOBS - 9, false]);
  const first = view.jobs.find((j: { id: string }) => j.id === job.id);
  assertEquals([first.steps.length, first.steps_capped], [MAX_SHOWN_STEPS, true]);
  const again = await runShoal(["execution", "show", id], { url: db.url });
  assert(
    again.stdout.includes(`    (the first ${MAX_SHOWN_STEPS} records; it has more)`),
    again.stdout,
  );
});

Deno.test("shoal execution show: no such execution exits 1, a bad id or subcommand exits 2", async () => {
  await using db = await testDb();
  const missing = await runShoal(["execution", "show", "987654"], { url: db.url });
  assertEquals([missing.code, missing.stdout, missing.stderr], [
    1,
    "",
    "shoal: No execution 987654\n",
  ]);
  for (
    const [args, says] of [
      [["execution", "show", "abc"], "shoal execution show takes one execution id"],
      [["execution", "show"], "shoal execution show takes one execution id"],
      [["execution"], "shoal execution needs a subcommand: start or show"],
      [["execution", "list"], 'Unknown command "execution list"'],
    ] as [string[], string][]
  ) {
    const r = await runShoal(args, { url: db.url });
    assertEquals([r.code, r.stdout], [2, ""], r.stderr);
    assert(r.stderr.includes(says), r.stderr);
  }
});

Deno.test("shoal execution show lists the jobs waiting on dependencies with the ids they wait on; shoal status counts them per queue", async () => {
  await using db = await testDb();
  // a, then b and c after a, then d after b and c: a is live, b, c and d are held.
  const id = await startWorkflow(db.sql, {
    steps: [
      { id: "a", task: "app.a", queue: Q },
      { id: "b", task: "app.b", queue: Q, after: ["a"] },
      { id: "c", task: "app.c", queue: "other", after: ["a"] },
      { id: "d", task: "app.d", queue: Q, after: ["b", "c"] },
    ],
  });
  const rows = await db.sql<{ task: string; id: string }[]>`
    select task, id::text from shoal.jobs where execution_id = ${id}::bigint
    union all
    select job->>'task', id::text from shoal.held_jobs where execution_id = ${id}::bigint`;
  const ids = Object.fromEntries(rows.map((r) => [r.task, r.id]));

  const text = await runShoal(["execution", "show", id], { url: db.url });
  assertEquals([text.code, text.stderr], [0, ""]);
  const lines = text.stdout.split("\n");
  assert(lines.includes("Live jobs (1):"), text.stdout);
  assert(lines.includes("Waiting on dependencies (3):"), text.stdout);
  assert(lines.includes(`  job ${ids["app.b"]}  app.b  on ${Q}  waiting on job ${ids["app.a"]}`));
  assert(
    lines.includes(`  job ${ids["app.c"]}  app.c  on other  waiting on job ${ids["app.a"]}`),
    text.stdout,
  );
  assert(
    lines.includes(
      `  job ${ids["app.d"]}  app.d  on ${Q}  waiting on job ${ids["app.b"]}, job ${ids["app.c"]}`,
    ),
    text.stdout,
  );
  const json = await runShoal(["execution", "show", id, "--json"], { url: db.url });
  const view = JSON.parse(json.stdout);
  assertEquals([view.held, view.held_capped], [
    [
      { id: ids["app.b"], task: "app.b", queue: Q, waiting_on: [ids["app.a"]] },
      { id: ids["app.c"], task: "app.c", queue: "other", waiting_on: [ids["app.a"]] },
      { id: ids["app.d"], task: "app.d", queue: Q, waiting_on: [ids["app.b"], ids["app.c"]] },
    ],
    false,
  ]);

  const status = await runShoal(["status"], { url: db.url });
  assertEquals(status.code, 0, status.stderr);
  assert(
    status.stdout.includes(`Waiting on dependencies: ${Q} 2, other 1\n`),
    status.stdout,
  );
  const statusJson = await runShoal(["status", "--json"], { url: db.url });
  assertEquals(JSON.parse(statusJson.stdout).held, {
    queues: [{ queue: Q, jobs: 2 }, { queue: "other", jobs: 1 }],
    exact: true,
  });

  // Once a completes, b and c are live, d waits on them alone.
  const a = await claimJobOf(db.sql, id);
  await completeJobs(db.sql, [{ ...a, result: "A" }]);
  const after = JSON.parse(
    (await runShoal(["execution", "show", id, "--json"], { url: db.url }))
      .stdout,
  );
  assertEquals(after.held.map((h: { id: string; waiting_on: string[] }) => [h.id, h.waiting_on]), [
    [ids["app.d"], [ids["app.b"], ids["app.c"]]],
  ]);
});

Deno.test("heldTotals() reads at most HELD_TOTALS_CAP held jobs and then says its counts are not exact", async () => {
  await using db = await testDb();
  // Rows as shoal.start_workflow holds them (no edges needed for counting).
  const hold = (from: number, to: number) =>
    db.sql`
      insert into shoal.held_jobs (id, execution_id, job, waiting)
      select i, 1, jsonb_build_object('queue', ${Q}::text, 'task', 'app.x'), 1
      from generate_series(${from}::integer, ${to}::integer) i`;
  await hold(1, HELD_TOTALS_CAP);
  assertEquals(await heldTotals(db.sql), {
    queues: [{ queue: Q, jobs: HELD_TOTALS_CAP }],
    exact: true,
  });
  await hold(HELD_TOTALS_CAP + 1, HELD_TOTALS_CAP + 2);
  const capped = await heldTotals(db.sql);
  assertEquals(capped.exact, false);
  assert(capped.queues[0]!.jobs <= HELD_TOTALS_CAP + 1, "read past the cap");
});
