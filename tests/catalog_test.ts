/**
 * The task catalog (lib/catalog.ts, sql/009_task_catalog.sql) and the catalog rule
 * (sql/functions/queue.sql): consumers register their tasks; every enqueue path not given a
 * queue or max attempts takes the task's; explicit values win; a task never registered goes
 * to `default` with 25 attempts (a fan-out's child or callback: to its producer's queue).
 */
import { assert, assertEquals } from "./assert.ts";
import {
  emptyDb,
  exitWithin,
  logLines,
  registerTasks,
  runShoal,
  spawnShoal,
  startConsumer,
  testDb,
  waitFor,
  waitForOutput,
} from "./helpers.ts";
import type { Db, Sql } from "../lib/db.ts";
import {
  listCatalogTasks,
  listLiveConsumers,
  refreshConsumer,
  registerConsumer,
  unregisterConsumer,
} from "../lib/catalog.ts";
import { claim, enqueue, enqueueMany, type Job } from "../lib/queue.ts";
import { fanOut } from "../lib/barrier.ts";
import { startExecution } from "../lib/execution.ts";
import { loadFunctions, loadMigrations, migrate, NO_FUNCTIONS } from "../lib/migrate.ts";
import { defineTask } from "../lib/tasks.ts";

const EXAMPLE = new URL("../examples/my_tasks.ts", import.meta.url).pathname;

/** The catalog every enqueue test starts from: app.greet lives on app with 3 attempts. */
async function withGreet(sql: Sql): Promise<void> {
  await registerTasks(sql, ["app.greet"], {
    queues: ["app"],
    settings: { queue: "app", maxAttempts: 3 },
  });
  // Registered, but its definition sets neither: enqueues keep their fallbacks.
  await registerTasks(sql, ["app.plain"], { workerId: "test:1" });
}

/** Where a job went and its budget. */
async function placeOf(db: Db, id: string): Promise<[string, number]> {
  const [row] = await db<{ queue: string; max_attempts: number }[]>`
    select queue, max_attempts from shoal.jobs where id = ${id}::bigint`;
  assert(row !== undefined, `job ${id} exists`);
  return [row!.queue, row!.max_attempts];
}

async function sqlId(rows: Promise<{ id: string }[]>): Promise<string> {
  const [row] = await rows;
  return row!.id;
}

Deno.test("registerConsumer() records a consumer and its tasks; refresh moves last_seen_at; unregister removes the consumer, not its tasks", async () => {
  await using db = await testDb();
  const consumer = {
    workerId: "host-a:1",
    queues: ["app"],
    tasks: [
      { name: "app.greet", queue: "app", maxAttempts: 3, timeoutMs: 30_000 },
      { name: "app.plain", queue: null, maxAttempts: null, timeoutMs: null },
    ],
  };
  assertEquals([...await registerConsumer(db.sql, consumer)], []);
  const tasks = await listCatalogTasks(db.sql);
  assertEquals(
    tasks.map((t) => [t.name, t.queue, t.max_attempts, t.timeout_ms, t.registered_by]),
    [["app.greet", "app", 3, 30_000, "host-a:1"], ["app.plain", null, null, null, "host-a:1"]],
  );
  const [live] = await listLiveConsumers(db.sql);
  assertEquals(
    [live?.worker_id, live?.queues, live?.tasks],
    ["host-a:1", ["app"], ["app.greet", "app.plain"]],
  );

  // A minute later (moved back by hand), the refresh brings both up to now.
  await db.sql`update shoal.consumers set last_seen_at = now() - interval '1 minute'`;
  await db.sql`update shoal.tasks set last_seen_at = now() - interval '1 minute'`;
  await refreshConsumer(db.sql, consumer);
  const fresh = await db.sql<{ n: number }[]>`
    select (select count(*)::integer from shoal.tasks where last_seen_at > now() - interval '5 s')
         + (select count(*)::integer from shoal.consumers where last_seen_at > now() - interval '5 s')
      as n`;
  assertEquals(fresh[0]!.n, 3);

  // A consumer not seen for more than three refreshes is not live.
  await db.sql`update shoal.consumers set last_seen_at = now() - interval '4 minutes'`;
  assertEquals([...await listLiveConsumers(db.sql)], []);

  await unregisterConsumer(db.sql, "host-a:1");
  assertEquals((await db.sql`select * from shoal.consumers`).length, 0);
  assertEquals((await listCatalogTasks(db.sql)).length, 2, "the tasks stay in the catalog");
  assertEquals(
    (await listCatalogTasks(db.sql, { names: ["app.greet", "nope"] })).map((t) => t.name),
    ["app.greet"],
  );
});

Deno.test("registerConsumer() reports settings that differ while another live consumer runs the task; the last registration wins", async () => {
  await using db = await testDb();
  const greet = (queue: string, maxAttempts: number) => [
    { name: "app.greet", queue, maxAttempts, timeoutMs: null },
  ];
  await registerConsumer(db.sql, { workerId: "a:1", queues: ["app"], tasks: greet("app", 3) });
  // The same settings from a second consumer: nothing to report.
  assertEquals(
    [
      ...await registerConsumer(db.sql, {
        workerId: "b:2",
        queues: ["app"],
        tasks: greet("app", 3),
      }),
    ],
    [],
  );
  const conflicts = await registerConsumer(db.sql, {
    workerId: "c:3",
    queues: ["other"],
    tasks: greet("other", 5),
  });
  assertEquals(conflicts.map((c) => ({ ...c })), [{
    name: "app.greet",
    queue: "app",
    max_attempts: 3,
    timeout_ms: null,
    registered_by: "b:2",
    live_workers: ["a:1", "b:2"],
  }]);
  const [row] = await listCatalogTasks(db.sql);
  assertEquals([row?.queue, row?.max_attempts, row?.registered_by], ["other", 5, "c:3"]);

  // Once the others stopped, a change is a deploy, not a disagreement.
  await unregisterConsumer(db.sql, "a:1");
  await unregisterConsumer(db.sql, "b:2");
  await unregisterConsumer(db.sql, "c:3");
  assertEquals(
    [
      ...await registerConsumer(db.sql, {
        workerId: "d:4",
        queues: ["app"],
        tasks: greet("app", 2),
      }),
    ],
    [],
  );
});

Deno.test("runConsumer() registers its tasks at start, refreshes them, and removes its row on a graceful stop", async () => {
  await using db = await testDb();
  const tasks = [
    defineTask({ name: "app.greet", queue: "app", maxAttempts: 3, timeoutMs: 5000, handler() {} }),
    defineTask({ name: "app.plain", handler() {} }),
  ];
  const consumer = startConsumer(db.sql, tasks, {
    queues: ["app", "default"],
    workerId: "in-process:1",
    catalogRefreshMs: 100,
  });
  try {
    const [row] = await waitFor("the consumer's row", async () => {
      const rows = await listLiveConsumers(db.sql);
      return rows.length > 0 ? rows : null;
    });
    assertEquals([row!.worker_id, row!.queues, row!.tasks], [
      "in-process:1",
      ["app", "default"],
      ["app.greet", "app.plain"],
    ]);
    assertEquals(
      (await listCatalogTasks(db.sql)).map((t) => [t.name, t.queue, t.max_attempts, t.timeout_ms]),
      [["app.greet", "app", 3, 5000], ["app.plain", null, null, null]],
    );
    // The refresh: last_seen_at moved back comes forward again.
    await db.sql`update shoal.consumers set last_seen_at = now() - interval '1 hour'`;
    await waitFor("a refresh", async () => (await listLiveConsumers(db.sql)).length === 1);
  } finally {
    await consumer.stop();
  }
  assertEquals((await db.sql`select * from shoal.consumers`).length, 0);
  assertEquals((await listCatalogTasks(db.sql)).length, 2);
});

Deno.test("runConsumer() records the jobs it holds by queue with each heartbeat, and once that it holds none", async () => {
  await using db = await testDb();
  let open!: () => void;
  const gate = new Promise<void>((resolve) => (open = resolve));
  const tasks = [defineTask({ name: "slow", queue: "q", handler: () => gate })];
  await enqueueMany(
    db.sql,
    Array.from({ length: 5 }, (_, i) => ({ task: "slow", queue: "q", payload: { i } })),
  );
  const consumer = startConsumer(db.sql, tasks, {
    queues: ["q"],
    concurrency: 2,
    workerId: "in-process:1",
    visibilityTimeoutMs: 600, // a heartbeat every 200 ms
  });
  const report = () =>
    db.sql<{ in_flight: unknown; valid_ms: number }[]>`
      select in_flight,
        (extract(epoch from in_flight_until - now()) * 1000)::int as valid_ms
      from shoal.consumers where worker_id = 'in-process:1'`;
  try {
    // Slow jobs: the buffer stays empty (it fills while jobs are fast).
    const [held] = await waitFor("a report of 2 running jobs", async () => {
      const rows = await report();
      const inFlight = JSON.stringify(rows[0]?.in_flight);
      return inFlight === JSON.stringify({ q: { running: 2, prefetched: 0 } }) ? rows : null;
    });
    // Valid as long as the claims it counts: about the visibility timeout.
    assert(held!.valid_ms > 0 && held!.valid_ms <= 600, `valid for ${held!.valid_ms} ms`);
    open();
    await waitFor("an empty report once every job is done", async () => {
      const [row] = await report();
      return JSON.stringify(row?.in_flight) === "{}";
    });
  } finally {
    open();
    await consumer.stop();
  }
});

Deno.test("enqueue() and enqueueMany() by name take the catalog's queue and attempts; explicit values win; unknown tasks go to default with 25", async () => {
  await using db = await testDb();
  await withGreet(db.sql);
  const one = (task: string, options: Parameters<typeof enqueue>[3] = {}) =>
    enqueue(db.sql, task, {}, options).then((id) => placeOf(db.sql, id));
  assertEquals(await one("app.greet"), ["app", 3]);
  assertEquals(await one("app.greet", { queue: "elsewhere" }), ["elsewhere", 3]);
  assertEquals(await one("app.greet", { maxAttempts: 9 }), ["app", 9]);
  assertEquals(await one("app.greet", { queue: "x", maxAttempts: 1 }), ["x", 1]);
  assertEquals(await one("app.plain"), ["default", 25]);
  assertEquals(await one("never.seen"), ["default", 25]);
  // A dedupe key (insert_job's other path) takes the same place.
  assertEquals(await one("app.greet", { key: "k" }), ["app", 3]);

  // A batch of one task (one probe), and a batch of several (one probe per task).
  const single = await enqueueMany(db.sql, [
    { task: "app.greet" },
    { task: "app.greet", queue: "mine" },
    { task: "app.greet", maxAttempts: 7 },
  ]);
  const mixed = await enqueueMany(db.sql, [
    { task: "app.greet" },
    { task: "never.seen" },
    { task: "app.plain", maxAttempts: 2 },
    { task: "app.greet", queue: "mine", maxAttempts: 4 },
    { task: "app.greet", key: "k2" },
  ]);
  const places = async (rows: { id: string }[]) =>
    await Promise.all(rows.map((r) => placeOf(db.sql, r.id)));
  assertEquals(await places(single), [["app", 3], ["mine", 3], ["app", 7]]);
  assertEquals(await places(mixed), [
    ["app", 3],
    ["default", 25],
    ["default", 2],
    ["mine", 4],
    ["app", 3],
  ]);
});

Deno.test("enqueue() by name on a busy pool wakes the consumers of the task's catalog queue", async () => {
  await using db = await testDb();
  await withGreet(db.sql);
  const heard: string[] = [];
  const sub = await db.sql.listen("shoal_jobs", (payload) => void heard.push(payload));
  // An enqueue kept waiting on a dedupe key another transaction holds keeps the pool busy:
  // the enqueues below then share a NOTIFY sent after their commit (lib/queue.ts Wakeups),
  // which must find their queue in the catalog, having none of their own.
  let release = () => {};
  const held = new Promise<void>((resolve) => (release = resolve));
  const holding = db.sql.begin(async (tx) => {
    await tx`select shoal.enqueue('blockq', 'blocker', key => 'k', notify => false)`;
    await held;
    throw new Error("rolled back on purpose");
  }).catch(() => {});
  try {
    await waitFor("the key to be held", async () => {
      const [row] = await db.sql<{ n: number }[]>`
        select count(*)::integer as n from pg_locks l join pg_stat_activity a using (pid)
        where l.locktype = 'transactionid' and a.datname = current_database()
          and l.pid <> pg_backend_pid() and l.granted`;
      return row!.n > 0;
    });
    const blocked = enqueue(db.sql, "blocker", {}, { queue: "blockq", key: "k" });
    await waitFor("the blocked enqueue", async () => {
      const [row] = await db.sql<{ n: number }[]>`
        select count(*)::integer as n from pg_stat_activity
        where datname = current_database() and wait_event_type = 'Lock'`;
      return row!.n > 0;
    });
    await Promise.all(Array.from({ length: 3 }, () => enqueue(db.sql, "app.greet", {})));
    await waitFor("a wake for app", () => heard.includes("app"));
    assert(!heard.includes("default"), heard.join(" "));
    release();
    await holding;
    await blocked;
  } finally {
    release();
    await holding;
    await sub.unlisten();
  }
});

Deno.test("shoal.enqueue(), enqueue_many() and start_execution() in SQL follow the catalog rule", async () => {
  await using db = await testDb();
  await withGreet(db.sql);
  const id = (rows: Promise<{ id: string }[]>) => sqlId(rows).then((i) => placeOf(db.sql, i));
  assertEquals(await id(db.sql`select shoal.enqueue(null, 'app.greet') as id`), ["app", 3]);
  assertEquals(
    await id(db.sql`select shoal.enqueue(task => 'app.greet', payload => '{"n": 1}') as id`),
    ["app", 3],
  );
  assertEquals(
    await id(db.sql`select shoal.enqueue('q', 'app.greet', max_attempts => 8) as id`),
    ["q", 8],
  );
  assertEquals(await id(db.sql`select shoal.enqueue(task => 'never.seen') as id`), [
    "default",
    25,
  ]);

  const many = await db.sql<{ id: string }[]>`
    select id from shoal.enqueue_many(${
    JSON.stringify([
      { task: "app.greet" },
      { task: "app.greet", queue: null },
      { task: "app.greet", queue: "q2" },
      { task: "never.seen", max_attempts: 4 },
    ])
  }::text::jsonb) order by ord`;
  assertEquals(await Promise.all(many.map((r) => placeOf(db.sql, r.id))), [
    ["app", 3],
    ["app", 3],
    ["q2", 3],
    ["default", 4],
  ]);

  const [started] = await db.sql<{ id: string }[]>`
    select shoal.start_execution(task => 'app.greet') as id`;
  const [first] = await db.sql<{ queue: string; max_attempts: number }[]>`
    select queue, max_attempts from shoal.jobs where execution_id = ${started!.id}::bigint`;
  assertEquals([first?.queue, first?.max_attempts], ["app", 3]);
  const viaTs = await startExecution(db.sql, { task: "app.greet" });
  const [second] = await db.sql<{ queue: string }[]>`
    select queue from shoal.jobs where execution_id = ${viaTs}::bigint`;
  assertEquals(second?.queue, "app");
});

Deno.test("shoal enqueue takes the catalog's queue and attempts, and warns on one line about a task no consumer registered", async () => {
  await using db = await testDb();
  await withGreet(db.sql);
  const run = (args: string[]) => runShoal(["enqueue", ...args], { url: db.url });

  const known = await run(["--task", "app.greet"]);
  assertEquals([known.code, known.stderr], [0, ""]);
  assertEquals(await placeOf(db.sql, known.stdout.trim()), ["app", 3]);
  const explicit = await run(["--task", "app.greet", "--queue", "q", "--max-attempts", "2"]);
  assertEquals(await placeOf(db.sql, explicit.stdout.trim()), ["q", 2]);

  const unknown = await run(["--task", "never.seen"]);
  assertEquals(unknown.code, 0);
  assertEquals(
    unknown.stderr,
    'Warning: no consumer has registered task "never.seen": the job goes to queue default with 25 attempts\n',
  );
  assertEquals(await placeOf(db.sql, unknown.stdout.trim()), ["default", 25]);
  const unknownExplicit = await run([
    "--task",
    "never.seen",
    "--queue",
    "q9",
    "--max-attempts",
    "4",
  ]);
  assertEquals(
    unknownExplicit.stderr,
    'Warning: no consumer has registered task "never.seen": the job goes to queue q9 with 4 attempts\n',
  );
});

async function claimOne(sql: Sql, queue: string): Promise<Job> {
  const { jobs } = await claim(sql, {
    queues: [queue],
    limit: 1,
    workerId: "t",
    visibilityMs: 60_000,
  });
  assertEquals(jobs.length, 1, `one job on ${queue}`);
  return jobs[0]!;
}

Deno.test("fan-out children and callbacks take the catalog's queue and attempts, else their producer's queue; explicit wins", async () => {
  await using db = await testDb();
  await withGreet(db.sql);
  await registerTasks(db.sql, ["app.collect"], {
    workerId: "test:2",
    settings: { queue: "collect", maxAttempts: 4 },
  });
  await enqueue(db.sql, "producer", {}, { queue: "prod" });
  const parent = await claimOne(db.sql, "prod");
  const execution = await fanOut(db.sql, parent, {
    children: [
      { task: "app.greet" },
      { task: "never.seen" },
      { task: "app.greet", queue: "mine" },
      { task: "app.plain", maxAttempts: 6 },
    ],
    callback: { task: "app.collect" },
    onError: { task: "never.seen" },
  });
  assert(execution !== null);
  const children = await db.sql<{ queue: string; max_attempts: number }[]>`
    select queue, max_attempts from shoal.jobs where execution_id = ${execution}::bigint
    order by child_index`;
  assertEquals(children.map((c) => [c.queue, c.max_attempts]), [
    ["app", 3],
    ["prod", 25],
    ["mine", 3],
    ["prod", 6],
  ]);
  const [barrier] = await db.sql<
    { callback: Record<string, unknown>; error_callback: Record<string, unknown> }[]
  >`
    select callback, error_callback from shoal.barriers where execution_id = ${execution}::bigint`;
  assertEquals([barrier?.callback.queue, barrier?.callback.max_attempts], ["collect", 4]);
  assertEquals([barrier?.error_callback.queue, barrier?.error_callback.max_attempts], ["prod", 25]);

  // A fan-out with no children enqueues its callback at once: where the catalog says. (Its
  // producer on a queue of its own: some children above went to prod.)
  await enqueue(db.sql, "producer", {}, { queue: "prod2" });
  const empty = await fanOut(db.sql, await claimOne(db.sql, "prod2"), {
    children: [],
    callback: { task: "app.collect" },
  });
  const [callback] = await db.sql<{ queue: string; max_attempts: number }[]>`
    select queue, max_attempts from shoal.jobs where execution_id = ${empty}::bigint`;
  assertEquals([callback?.queue, callback?.max_attempts], ["collect", 4]);
  // An explicit callback queue wins.
  await enqueue(db.sql, "producer", {}, { queue: "prod3" });
  const pinned = await fanOut(db.sql, await claimOne(db.sql, "prod3"), {
    children: [],
    callback: { task: "app.collect", queue: "pinned", maxAttempts: 1 },
  });
  const [pinnedCallback] = await db.sql<{ queue: string; max_attempts: number }[]>`
    select queue, max_attempts from shoal.jobs where execution_id = ${pinned}::bigint`;
  assertEquals([pinnedCallback?.queue, pinnedCallback?.max_attempts], ["pinned", 1]);
});

Deno.test("migration 009 makes existing schedules on default follow their task's queue, and keeps other queues", async () => {
  await using db = await emptyDb();
  const migrations = await loadMigrations();
  // A database of the release before the catalog, with two schedules.
  await migrate(db.sql, migrations.filter((m) => m.version <= 8), NO_FUNCTIONS);
  await db.sql`
    insert into shoal.schedules (name, cron, task, queue)
    values ('greet', '0 9 * * *', 'app.greet', 'default'), ('report', '0 3 * * *', 'app.report', 'reports')`;
  await migrate(db.sql, migrations, await loadFunctions());
  const rows = await db.sql<{ name: string; queue: string | null }[]>`
    select name, queue from shoal.schedules order by name`;
  assertEquals(rows.map((r) => [r.name, r.queue]), [["greet", null], ["report", "reports"]]);
});

Deno.test("a real consumer (examples/my_tasks.ts) registers its tasks, warns about a live consumer's other settings, and leaves on SIGTERM", async () => {
  await using db = await testDb();
  // Another consumer, live, registered example.send_welcome elsewhere first.
  await registerTasks(db.sql, ["example.send_welcome"], {
    workerId: "old-host:7",
    queues: ["mail-old"],
    settings: { queue: "mail-old", maxAttempts: 2 },
  });
  await using proc = spawnShoal(
    ["--role", "consumer", "--queues", "emails", "--log-format", "json", "--shutdown-grace", "1s"],
    { url: db.url, mainModule: EXAMPLE },
  );
  await waitForOutput(proc, "started on");
  const worker = `${Deno.hostname()}:${proc.child.pid}`;
  const byName = Object.fromEntries((await listCatalogTasks(db.sql)).map((t) => [t.name, t]));
  assertEquals(
    ["example.send_welcome", "example.report_backlog", "shoal.noop"].map((n) => {
      const t = byName[n]!;
      return [n, t.queue, t.max_attempts, t.timeout_ms, t.registered_by];
    }),
    [
      ["example.send_welcome", "emails", 5, 10_000, worker],
      ["example.report_backlog", "reports", null, null, worker],
      ["shoal.noop", null, null, null, worker],
    ],
  );
  const live = await listLiveConsumers(db.sql);
  const mine = live.find((c) => c.worker_id === worker);
  assertEquals(mine?.queues, ["emails"]);
  assert(mine?.tasks.includes("example.send_welcome"));

  const warnings = logLines(proc.output()).filter((l) => l.logger === "shoal.catalog");
  assertEquals(warnings.length, 1, proc.output());
  assertEquals(warnings[0]!.level, "WARN");
  assertEquals([warnings[0]!.task, warnings[0]!.worker, warnings[0]!.other_worker], [
    "example.send_welcome",
    worker,
    "old-host:7",
  ]);
  assert(String(warnings[0]!.message).includes("the last registration wins"));

  proc.kill("SIGTERM");
  const { code, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 0, output);
  assertEquals((await listLiveConsumers(db.sql)).map((c) => c.worker_id), ["old-host:7"]);

  // The stock binary knows nothing of example.send_welcome, yet its job lands where the
  // catalog says, with no warning.
  const enqueued = await runShoal(["enqueue", "--task", "example.send_welcome"], { url: db.url });
  assertEquals([enqueued.code, enqueued.stderr], [0, ""]);
  assertEquals(await placeOf(db.sql, enqueued.stdout.trim()), ["emails", 5]);
});
