/**
 * Typed enqueue: `enqueue(db, definition, payload)`, `enqueueMany` jobs, `startExecution`,
 * `ctx.enqueue` and fan-out jobs given a task definition take its name, queue and attempts
 * (options win), the by-name form is unchanged, and anything that is neither a name nor a
 * definition is one TypeError line. Against a real database; the compile-time half is
 * tests/typed_enqueue_types.ts, checked here with `deno check`.
 */
import { assert, assertEquals } from "./assert.ts";
import { testDb } from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import { logger } from "../lib/log.ts";
import { checkFanOut, fanOut } from "../lib/barrier.ts";
import { chordTask } from "../lib/builtin_tasks.ts";
import { startExecution } from "../lib/execution.ts";
import { claim, enqueue, enqueueMany, type Job } from "../lib/queue.ts";
import { JobRun } from "../lib/run_job.ts";
import { type AnyTask, defineTask, TaskRegistry } from "../lib/tasks.ts";

const welcome = defineTask<{ userId: number }>({
  name: "typed.welcome",
  queue: "emails",
  maxAttempts: 5,
  handler: () => {},
});
/** A definition with neither queue nor attempts: the by-name defaults apply. */
const plain = defineTask({ name: "typed.plain", handler: () => {} });

interface Row {
  task: string;
  queue: string;
  max_attempts: number;
  payload: Record<string, unknown>;
  priority: number;
}

async function rowOf(sql: Sql, id: string): Promise<Row> {
  const [row] = await sql<Row[]>`
    select task, queue, max_attempts, payload, priority from shoal.jobs where id = ${id}::bigint`;
  if (row === undefined) throw new Error(`job ${id} not found`);
  return { ...row };
}

async function countJobs(sql: Sql): Promise<number> {
  const [row] = await sql<{ n: number }[]>`select count(*)::integer as n from shoal.jobs`;
  return row!.n;
}

Deno.test("enqueue() with a definition uses its name, queue and maxAttempts; options override them", async () => {
  await using db = await testDb();
  const own = await enqueue(db.sql, welcome, { userId: 1 });
  assertEquals(await rowOf(db.sql, own), {
    task: "typed.welcome",
    queue: "emails",
    max_attempts: 5,
    payload: { userId: 1 },
    priority: 0,
  });
  const overridden = await enqueue(db.sql, welcome, { userId: 2 }, {
    queue: "urgent",
    maxAttempts: 2,
    priority: 3,
  });
  assertEquals(await rowOf(db.sql, overridden), {
    task: "typed.welcome",
    queue: "urgent",
    max_attempts: 2,
    payload: { userId: 2 },
    priority: 3,
  });
  // An option given as undefined is no option: the definition's setting stays.
  const unset = await enqueue(db.sql, welcome, { userId: 3 }, { queue: undefined });
  assertEquals((await rowOf(db.sql, unset)).queue, "emails");
  // A definition without settings gets the defaults, as a name does.
  const bare = await enqueue(db.sql, plain, {});
  assertEquals(await rowOf(db.sql, bare), {
    task: "typed.plain",
    queue: "default",
    max_attempts: 25,
    payload: {},
    priority: 0,
  });
  // Inside the caller's transaction, like by name.
  const rolledBack = db.sql.begin(async (tx) => {
    await enqueue(tx, welcome, { userId: 4 });
    throw new Error("roll back");
  });
  await rolledBack.catch(() => {});
  assertEquals(await countJobs(db.sql), 4);
});

Deno.test("enqueue() by name is unchanged: default queue and 25 attempts, whatever this process defines", async () => {
  await using db = await testDb();
  const id = await enqueue(db.sql, "typed.welcome", { userId: "unchecked" });
  assertEquals(await rowOf(db.sql, id), {
    task: "typed.welcome",
    queue: "default",
    max_attempts: 25,
    payload: { userId: "unchecked" },
    priority: 0,
  });
  const withOptions = await enqueue(db.sql, "typed.welcome", undefined, {
    queue: "emails",
    maxAttempts: 7,
  });
  assertEquals(await rowOf(db.sql, withOptions), {
    task: "typed.welcome",
    queue: "emails",
    max_attempts: 7,
    payload: {},
    priority: 0,
  });
});

Deno.test("enqueueMany() and startExecution() take definitions beside names, each job with its own settings", async () => {
  await using db = await testDb();
  const results = await enqueueMany(db.sql, [
    { task: welcome, payload: { userId: 1 } },
    { task: "typed.welcome", payload: { userId: 2 } },
    { task: welcome, payload: { userId: 3 }, queue: "urgent" },
    { task: plain, payload: {}, maxAttempts: 9 },
  ]);
  const rows = await Promise.all(results.map((r) => rowOf(db.sql, r.id)));
  assertEquals(rows.map((r) => [r.task, r.queue, r.max_attempts, r.payload]), [
    ["typed.welcome", "emails", 5, { userId: 1 }],
    ["typed.welcome", "default", 25, { userId: 2 }],
    ["typed.welcome", "urgent", 5, { userId: 3 }],
    ["typed.plain", "default", 9, {}],
  ]);

  const execution = await startExecution(db.sql, { task: welcome, payload: { userId: 5 } });
  const [first] = await db.sql<{ queue: string; max_attempts: number }[]>`
    select queue, max_attempts from shoal.jobs where execution_id = ${execution}::bigint`;
  assertEquals({ ...first }, { queue: "emails", max_attempts: 5 });
});

/** Every way a task argument can be wrong at runtime, with the line it gets. */
const NOT_TASKS: [unknown, string][] = [
  [42, "got number"],
  [null, "got null"],
  [undefined, "got undefined"],
  [{}, "got an object without a string name"],
  [{ name: 7, queue: "emails" }, "got an object without a string name"],
  [["typed.welcome"], "got an array"],
  [() => "typed.welcome", "got function"],
];
/** The message after "Invalid <the task argument>: ". */
const NOT_A_TASK = "expected a task name or a definition from defineTask, ";
/** How each call names its task argument. */
const TASK_ARG: Record<string, string> = {
  enqueue: "task for enqueue()",
  enqueueMany: "jobs[1].task for enqueueMany()",
  startExecution: "job.task for startExecution()",
  "fan-out child": "task",
  "fan-out callback": "task",
};

Deno.test("enqueue(), enqueueMany(), startExecution() and fan-outs refuse what is neither a name nor a definition in one TypeError line", async () => {
  await using db = await testDb();
  // Typed callers cannot write these; JavaScript callers and casts can.
  // deno-lint-ignore no-explicit-any
  const loose = (task: unknown) => task as any;
  for (const [task, got] of NOT_TASKS) {
    const attempts: [string, () => unknown][] = [
      ["enqueue", () => enqueue(db.sql, loose(task), {})],
      [
        "enqueueMany",
        () => enqueueMany(db.sql, [{ task: "ok" }, { task: loose(task), payload: {} }]),
      ],
      ["startExecution", () => startExecution(db.sql, { task: loose(task), payload: {} })],
      [
        "fan-out child",
        () => checkFanOut({ children: [{ task: loose(task) }], callback: { task: "cb" } }),
      ],
      ["fan-out callback", () => checkFanOut({ children: [], callback: { task: loose(task) } })],
    ];
    for (const [what, attempt] of attempts) {
      let error: unknown = null;
      try {
        await attempt();
      } catch (caught) {
        error = caught;
      }
      assert(error instanceof TypeError, `${what} ${String(task)}: ${error}`);
      assertEquals(
        (error as TypeError).message,
        `Invalid ${TASK_ARG[what]}: ${NOT_A_TASK}${got}`,
        what,
      );
    }
  }
  assertEquals(await countJobs(db.sql), 0, "nothing was written");
  // A definition that is an object with a string name is enough (from another copy of shoal, say).
  const copied = { name: "typed.copied", queue: "emails", handler: () => {} };
  assertEquals((await rowOf(db.sql, await enqueue(db.sql, copied, {}))).queue, "emails");
});

Deno.test("shoal.chord takes task names only: an object in its JSON does not pass for a definition", () => {
  const parse = chordTask.parse!;
  const spec = (task: unknown) => ({ children: [{ task }], callback: { task: "cb" } });
  assertEquals(parse(spec("child")).children[0]!.task, "child");
  let error: unknown = null;
  try {
    parse(spec({ name: "child", queue: "elsewhere" }));
  } catch (caught) {
    error = caught;
  }
  assert(error instanceof TypeError, String(error));
  assertEquals((error as TypeError).message, "children[0].task must be a task name");
});

/** Enqueue a `typed.parent` job and claim it. */
async function claimedParent(sql: Sql): Promise<Job> {
  await enqueue(sql, "typed.parent", {}, { queue: "parents" });
  const { jobs } = await claim(sql, {
    queues: ["parents"],
    limit: 1,
    workerId: "w",
    visibilityMs: 60_000,
  });
  return jobs[0]!;
}

Deno.test("ctx.enqueue() with a definition uses its settings, options win; by name, the registered task's", async () => {
  await using db = await testDb();
  const ids: string[] = [];
  const parent = defineTask({
    name: "typed.parent",
    handler: async (_, ctx) => {
      ids.push(await ctx.enqueue(welcome, { userId: 1 }));
      ids.push(await ctx.enqueue(welcome, { userId: 2 }, { queue: "urgent", maxAttempts: 1 }));
      ids.push(await ctx.enqueue("typed.welcome", { userId: 3 }));
      ids.push(await ctx.enqueue("typed.unknown"));
    },
  });
  const tasks: AnyTask[] = [parent, welcome];
  const run = new JobRun(await claimedParent(db.sql), {
    sql: db.sql,
    tasks: new TaskRegistry(tasks),
    log: logger("consumer"),
    taskTimeoutMs: 10_000,
  });
  await run.settled;
  assertEquals(run.state, "completed", String(run.error));
  const rows = await Promise.all(ids.map((id) => rowOf(db.sql, id)));
  assertEquals(rows.map((r) => [r.task, r.queue, r.max_attempts]), [
    ["typed.welcome", "emails", 5],
    ["typed.welcome", "urgent", 1],
    ["typed.welcome", "emails", 5],
    ["typed.unknown", "default", 25],
  ]);
});

Deno.test("a fan-out's children and callbacks may be definitions: their queue and attempts apply unless set", async () => {
  await using db = await testDb();
  const report = defineTask({
    name: "typed.report",
    queue: "reports",
    maxAttempts: 3,
    handler: () => {},
  });
  const spec = {
    children: [
      { task: welcome, payload: { userId: 1 } },
      { task: welcome, payload: { userId: 2 }, queue: "urgent", maxAttempts: 2 },
      { task: "typed.by_name" },
    ],
    callback: { task: report, payload: { kind: "daily" } },
    onError: { task: report, queue: "errors" },
  };
  assertEquals(JSON.parse(checkFanOut(spec).json), {
    children: [
      { task: "typed.welcome", queue: "emails", payload: { userId: 1 }, max_attempts: 5 },
      { task: "typed.welcome", queue: "urgent", payload: { userId: 2 }, max_attempts: 2 },
      { task: "typed.by_name" },
    ],
    callback: {
      task: "typed.report",
      queue: "reports",
      payload: { kind: "daily" },
      max_attempts: 3,
    },
    on_error: { task: "typed.report", queue: "errors", max_attempts: 3 },
  });

  // Sent to the database: the children land with those settings (a child without any takes
  // the producer's queue), and the barrier holds the callbacks'.
  const parent = await claimedParent(db.sql);
  const execution = await fanOut(db.sql, parent, spec);
  assert(execution !== null, "the parent's claim was current");
  const children = await db.sql<{ task: string; queue: string; max_attempts: number }[]>`
    select task, queue, max_attempts from shoal.jobs order by child_index`;
  assertEquals(children.map((c) => [c.task, c.queue, c.max_attempts]), [
    ["typed.welcome", "emails", 5],
    ["typed.welcome", "urgent", 2],
    ["typed.by_name", "parents", 25],
  ]);
  const [barrier] = await db.sql<{ callback: Row; error_callback: Row }[]>`
    select callback, error_callback from shoal.barriers`;
  assertEquals(
    [barrier!.callback.queue, barrier!.callback.max_attempts, barrier!.callback.task],
    ["reports", 3, "typed.report"],
  );
  assertEquals(
    [barrier!.error_callback.queue, barrier!.error_callback.max_attempts],
    ["errors", 3],
  );
});

const TYPES_FILE = new URL("typed_enqueue_types.ts", import.meta.url);
const CONFIG = new URL("../deno.json", import.meta.url).pathname;
const MARK = /^(\s*)\/\/ @ts-expect-error\b.*$/;

/** `deno check` one file with the repository's config: its exit code and plain output. */
async function denoCheck(path: string): Promise<{ code: number; output: string }> {
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["check", "--config", CONFIG, path],
    env: { NO_COLOR: "1" },
    stdin: "null",
  }).output();
  const decode = (b: Uint8Array) => new TextDecoder().decode(b);
  return { code, output: decode(stdout) + decode(stderr) };
}

Deno.test("tests/typed_enqueue_types.ts type-checks, and each @ts-expect-error line is an error without its mark", async () => {
  const checked = await denoCheck(TYPES_FILE.pathname);
  assertEquals(checked.code, 0, checked.output);

  // The same file with every mark turned into a plain comment: each line after a mark, and
  // nothing else, must now be an error (a mark that expects nothing would pass above only
  // while it has an error to absorb; this checks they all still do, one for one).
  const lines = (await Deno.readTextFile(TYPES_FILE)).split("\n");
  const expected: number[] = [];
  const stripped = lines.map((line, i) => {
    if (!MARK.test(line)) return line;
    expected.push(i + 2); // 1-based number of the line the mark covers
    return line.replace(MARK, "$1// (mark removed)");
  });
  assert(expected.length >= 15, `only ${expected.length} marks`);
  const dir = await Deno.makeTempDir();
  try {
    const copy = `${dir}/types_unmarked.ts`;
    const libUrl = new URL("../lib/", import.meta.url).href;
    await Deno.writeTextFile(copy, stripped.join("\n").replaceAll('"../lib/', `"${libUrl}`));
    const { code, output } = await denoCheck(copy);
    assertEquals(code, 1, output);
    // Each error's own location is the first line after it that is indented four spaces.
    const escaped = copy.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    const at = new RegExp(`^ {4}at file://${escaped}:(\\d+):\\d+$`, "gm");
    const errors = [...new Set([...output.matchAll(at)].map((m) => Number(m[1])))];
    assertEquals(errors.sort((a, b) => a - b), expected, output);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
