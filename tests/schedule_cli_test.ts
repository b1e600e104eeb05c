/**
 * `shoal schedule add|list|pause|resume|rm`, `shoal status --json` leases and schedules,
 * and the `--schedules FILE` sync at scheduler start, run as real `main.ts` processes.
 */
import { assert, assertEquals, assertExists } from "./assert.ts";
import {
  exitWithin,
  fireEvents,
  installAudit,
  logLines,
  registerTasks,
  runShoal,
  type ShoalProcess,
  sleep,
  spawnShoal,
  testDb,
  waitFor,
  waitForOutput,
  withApplicationName,
} from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import { acquire } from "../lib/lease.ts";
import { listSchedules, type ScheduleRow, upsertSchedule } from "../lib/schedule.ts";
import { formatSchedules } from "../lib/status.ts";

type Row = Omit<ScheduleRow, "created_at" | "updated_at">;

/** The schedule rows without their bookkeeping timestamps. */
async function rows(sql: Sql): Promise<Row[]> {
  return (await listSchedules(sql)).map(({ created_at: _c, updated_at: _u, ...row }) => row);
}

/** A fresh manual row as `schedule add` would leave it, with these fields changed. */
function row(name: string, fields: Partial<Row>): Row {
  return {
    name,
    cron: "0 3 * * *",
    tz: "UTC",
    task: "shoal.noop",
    // No --queue: the task's catalog queue at each fire.
    queue: null,
    payload: {},
    priority: 0,
    backfill: 0,
    enabled: true,
    source: "manual",
    next_run_at: null,
    last_run_at: null,
    last_error: null,
    ...fields,
  };
}

/** Check a command failed with `code`, nothing on stdout, and exactly `line` on stderr. */
function assertOneLine(
  result: { code: number; stdout: string; stderr: string },
  code: number,
  line: string | RegExp,
  what: string,
): void {
  assertEquals({ code: result.code, stdout: result.stdout }, { code, stdout: "" }, what);
  assert(
    result.stderr.endsWith("\n") && result.stderr.indexOf("\n") === result.stderr.length - 1,
    `${what}: expected one line on stderr, got ${JSON.stringify(result.stderr)}`,
  );
  if (typeof line === "string") assertEquals(result.stderr, `${line}\n`, what);
  else assert(line.test(result.stderr), `${what}: ${JSON.stringify(result.stderr)} !~ ${line}`);
}

Deno.test("shoal schedule add creates a schedule, and adding an existing name updates it", async () => {
  await using db = await testDb();
  // Tasks a consumer registered: no warning on stderr (see the test after this one).
  await registerTasks(db.sql, ["shoal.noop", "report.build"]);
  const shoal = (args: string[]) => runShoal(["schedule", "add", ...args], { url: db.url });

  const created = await shoal(["nightly", "--cron", "0 3 * * *", "--task", "shoal.noop"]);
  assertEquals(created, { code: 0, stdout: "Schedule nightly created\n", stderr: "" });
  assertEquals(await rows(db.sql), [row("nightly", {})]);

  // A recorded slot survives an update that keeps the cron and time zone...
  const slot = new Date("2031-01-01T03:00:00Z");
  await db.sql`update shoal.schedules set next_run_at = ${slot} where name = 'nightly'`;
  const payloadOnly = await shoal([
    "nightly",
    "--cron",
    "0 3 * * *",
    "--task",
    "shoal.noop",
    "--payload",
    '{"kind":"daily"}',
  ]);
  assertEquals(payloadOnly, { code: 0, stdout: "Schedule nightly updated\n", stderr: "" });
  assertEquals(await rows(db.sql), [
    row("nightly", { payload: { kind: "daily" }, next_run_at: slot }),
  ]);

  // ...and a changed cron or time zone clears it, so the scheduler records a new baseline.
  const args = [
    "nightly",
    "--cron",
    "30 4 * * 1-5",
    "--tz",
    "Europe/Paris",
    "--task",
    "report.build",
    "--queue",
    "reports",
    "--payload",
    '{"kind":"weekday"}',
    "--priority",
    "5",
    "--backfill",
    "3",
  ];
  assertEquals(await shoal(args), { code: 0, stdout: "Schedule nightly updated\n", stderr: "" });
  const updated = row("nightly", {
    cron: "30 4 * * 1-5",
    tz: "Europe/Paris",
    task: "report.build",
    queue: "reports",
    payload: { kind: "weekday" },
    priority: 5,
    backfill: 3,
  });
  assertEquals(await rows(db.sql), [updated]);
  assertEquals(await shoal(args), { code: 0, stdout: "Schedule nightly unchanged\n", stderr: "" });
  assertEquals(await rows(db.sql), [updated]);
});

Deno.test("shoal schedule add warns on one line about a task no consumer registered, and adds it", async () => {
  await using db = await testDb();
  const added = await runShoal(
    ["schedule", "add", "greet", "--cron", "0 9 * * *", "--task", "app.greet"],
    { url: db.url },
  );
  assertEquals(added, {
    code: 0,
    stdout: "Schedule greet created\n",
    stderr:
      'Warning: no consumer has registered task "app.greet": its jobs go to queue default with 25 attempts until one does\n',
  });
  assertEquals(await rows(db.sql), [row("greet", { cron: "0 9 * * *", task: "app.greet" })]);
  const pinned = await runShoal(
    ["schedule", "add", "pinned", "--cron", "0 9 * * *", "--task", "app.greet", "--queue", "p"],
    { url: db.url },
  );
  assertEquals(
    pinned.stderr,
    'Warning: no consumer has registered task "app.greet": its jobs go to queue p with 25 attempts until one does\n',
  );
  await registerTasks(db.sql, ["app.greet"], { queues: ["app"], settings: { queue: "app" } });
  const known = await runShoal(
    ["schedule", "add", "greet", "--cron", "0 10 * * *", "--task", "app.greet"],
    { url: db.url },
  );
  assertEquals(known, { code: 0, stdout: "Schedule greet updated\n", stderr: "" });
});

Deno.test("shoal schedule list prints a table, and --json the rows", async () => {
  await using db = await testDb();
  const empty = await runShoal(["schedule", "list"], { url: db.url });
  assertEquals(empty, { code: 0, stdout: "No schedules\n", stderr: "" });
  const emptyJson = await runShoal(["schedule", "list", "--json"], { url: db.url });
  assertEquals(emptyJson, { code: 0, stdout: "[]\n", stderr: "" });

  await upsertSchedule(db.sql, { name: "b-hourly", cron: "0 * * * *", task: "shoal.noop" });
  await upsertSchedule(db.sql, {
    name: "a-paris",
    cron: "*/10 * * * * *",
    tz: "Europe/Paris",
    task: "shoal.sleep",
    queue: "q1",
    payload: { ms: 5 },
    priority: -2,
  });
  await db.sql`
    update shoal.schedules
    set enabled = false, last_error = 'boom', last_run_at = '2030-05-01T10:00:00Z',
        next_run_at = '2030-05-01T10:00:10Z'
    where name = 'a-paris'`;

  const table = await runShoal(["schedule", "list"], { url: db.url });
  assertEquals(table.code, 0, table.stderr);
  assertEquals(table.stdout, formatSchedules(await listSchedules(db.sql)));
  const lines = table.stdout.trimEnd().split("\n");
  assertEquals(lines.length, 3, table.stdout);
  assertEquals(lines[0]!.split(/\s{2,}/), [
    "schedule",
    "cron",
    "task",
    "queue",
    "enabled",
    "next run",
    "last run",
    "last error",
  ]);
  assertEquals(lines[1]!.split(/\s{2,}/), [
    "a-paris",
    "*/10 * * * * *",
    "shoal.sleep",
    "q1",
    "no",
    "2030-05-01T10:00:10.000Z",
    "2030-05-01T10:00:00.000Z",
    "boom",
  ]);
  assertEquals(lines[2]!.split(/\s{2,}/), [
    "b-hourly",
    "0 * * * *",
    "shoal.noop",
    "(task's queue)",
    "yes",
    "-",
    "-",
    "-",
  ]);

  const json = await runShoal(["schedule", "list", "--json"], { url: db.url });
  assertEquals(json.code, 0, json.stderr);
  const listed = JSON.parse(json.stdout) as Record<string, unknown>[];
  assertEquals(listed.map(({ created_at: _c, updated_at: _u, ...r }) => r), [
    {
      ...row("a-paris", {
        cron: "*/10 * * * * *",
        tz: "Europe/Paris",
        task: "shoal.sleep",
        queue: "q1",
        payload: { ms: 5 },
        priority: -2,
        enabled: false,
      }),
      next_run_at: "2030-05-01T10:00:10.000Z",
      last_run_at: "2030-05-01T10:00:00.000Z",
      last_error: "boom",
    },
    row("b-hourly", { cron: "0 * * * *" }),
  ]);
  for (const r of listed) assert(!Number.isNaN(Date.parse(r.created_at as string)), "created_at");
});

Deno.test("formatSchedules() shows a schedule without a queue of its own as (task's queue)", () => {
  const slot = new Date("2030-05-01T10:00:00Z");
  const text = formatSchedules([
    { ...row("own", { queue: "default" }), next_run_at: slot, created_at: slot, updated_at: slot },
    {
      name: "inherits",
      cron: "0 3 * * *",
      task: "app.greet",
      queue: null,
      enabled: true,
      next_run_at: null,
      last_run_at: null,
      last_error: null,
    },
  ]);
  const lines = text.trimEnd().split("\n").map((l) => l.split(/\s{2,}/).slice(0, 5));
  assertEquals(lines, [
    ["schedule", "cron", "task", "queue", "enabled"],
    ["own", "0 3 * * *", "shoal.noop", "default", "yes"],
    ["inherits", "0 3 * * *", "app.greet", "(task's queue)", "yes"],
  ]);
});

Deno.test("shoal schedule pause, resume and rm change one schedule; an unknown name is exit 1 with one line", async () => {
  await using db = await testDb();
  const shoal = (...args: string[]) => runShoal(["schedule", ...args], { url: db.url });
  await upsertSchedule(db.sql, { name: "nightly", cron: "0 3 * * *", task: "shoal.noop" });
  await upsertSchedule(db.sql, { name: "other", cron: "0 4 * * *", task: "shoal.noop" });
  const slot = new Date("2031-01-01T03:00:00Z");
  await db.sql`update shoal.schedules set next_run_at = ${slot}`;

  assertEquals(await shoal("pause", "nightly"), {
    code: 0,
    stdout: "Schedule nightly paused\n",
    stderr: "",
  });
  assertEquals(await rows(db.sql), [
    row("nightly", { enabled: false, next_run_at: slot }),
    row("other", { cron: "0 4 * * *", next_run_at: slot }),
  ]);
  // Resuming forgets the slots missed while paused: the scheduler records a new baseline.
  await db.sql`update shoal.schedules set last_error = 'old failure' where name = 'nightly'`;
  assertEquals(await shoal("resume", "nightly"), {
    code: 0,
    stdout: "Schedule nightly resumed\n",
    stderr: "",
  });
  assertEquals(await rows(db.sql), [
    row("nightly", {}),
    row("other", { cron: "0 4 * * *", next_run_at: slot }),
  ]);
  assertEquals(await shoal("rm", "nightly"), {
    code: 0,
    stdout: "Schedule nightly removed\n",
    stderr: "",
  });
  assertEquals(await rows(db.sql), [row("other", { cron: "0 4 * * *", next_run_at: slot })]);

  const unknown = await Promise.all(["pause", "resume", "rm"].map((sub) => shoal(sub, "nightly")));
  unknown.forEach((r, i) => assertOneLine(r, 1, "shoal: No schedule named nightly", `#${i}`));
  const usage = await Promise.all([
    shoal("pause"),
    shoal("rm", "a", "b"),
    shoal("rename", "other"),
    shoal(),
  ]);
  assertOneLine(usage[0]!, 2, "shoal: shoal schedule pause takes one schedule name", "pause");
  assertOneLine(usage[1]!, 2, "shoal: shoal schedule rm takes one schedule name", "rm a b");
  const subs = "shoal: shoal schedule takes add NAME, list, pause NAME, resume NAME or rm NAME";
  assertOneLine(usage[2]!, 2, subs, "rename");
  assertOneLine(usage[3]!, 2, subs, "no subcommand");
  assertEquals(await rows(db.sql), [row("other", { cron: "0 4 * * *", next_run_at: slot })]);
});

Deno.test("shoal schedule add rejects a bad cron, time zone, name or value with exit 2 and one line", async () => {
  await using db = await testDb();
  const base = ["--task", "shoal.noop"];
  const cases: [string[], string | RegExp][] = [
    [
      ["nightly", "--cron", "* * * *", ...base],
      'shoal: Cannot parse cron expression "* * * *": expected 5 fields (minute hour day month weekday) or 6 (seconds first), got 4',
    ],
    [["nightly", "--cron", "", ...base], /^shoal: Cannot parse cron expression "": .*got 0\n$/],
    [["nightly", "--cron", "* * * * * * *", ...base], /^shoal: Cannot parse cron .*got 7\n$/],
    [
      ["nightly", "--cron", "61 * * * *", ...base],
      /^shoal: Cannot parse cron expression "61 \* \* \* \*": /,
    ],
    [["nightly", "--cron", "not a cron at all", ...base], /^shoal: Cannot parse cron expression /],
    [
      ["nightly", "--cron", "0 3 * * *", "--tz", "Mars/Olympus", ...base],
      'shoal: Invalid time zone "Mars/Olympus": expected an IANA name like Europe/Paris',
    ],
    [
      ["bad name", "--cron", "0 3 * * *", ...base],
      'shoal: Invalid schedule name "bad name": use 1 to 128 letters, digits or _.:- starting with a letter or digit',
    ],
    [["nightly", "--task", "shoal.noop"], "shoal: shoal schedule add needs --cron"],
    [["nightly", "--cron", "0 3 * * *"], "shoal: shoal schedule add needs --task"],
    [
      ["nightly", "--cron", "0 3 * * *", "--task", "bad task"],
      /^shoal: Invalid --task: "bad task"/,
    ],
    [
      ["nightly", "--cron", "0 3 * * *", "--payload", "[1]", ...base],
      "shoal: Invalid payload: expected a JSON object, got array",
    ],
    [
      ["nightly", "--cron", "0 3 * * *", "--payload", "{", ...base],
      /^shoal: Invalid --payload: not JSON/,
    ],
    [
      ["nightly", "--cron", "0 3 * * *", "--priority", "40000", ...base],
      "shoal: Invalid --priority: 40000 is above 32767",
    ],
    [
      ["nightly", "--cron", "0 3 * * *", "--backfill", "1001", ...base],
      "shoal: Invalid --backfill: 1001 is above 1000",
    ],
    [
      ["nightly", "--cron", "0 3 * * *", "--backfill=-1", ...base],
      "shoal: Invalid --backfill: -1 is below 0",
    ],
    [["--cron", "0 3 * * *", ...base], "shoal: shoal schedule add takes one schedule name"],
  ];
  const results = await Promise.all(
    cases.map(([args]) => runShoal(["schedule", "add", ...args], { url: db.url })),
  );
  results.forEach((r, i) => assertOneLine(r, 2, cases[i]![1], cases[i]![0].join(" ")));
  assertEquals(await rows(db.sql), []);
});

Deno.test("shoal status --json lists leases (name, holder, expires_at) and schedules", async () => {
  await using db = await testDb();
  const term = await acquire(db.sql, { name: "scheduler", holder: "host-a:42", ttlMs: 60_000 });
  assertExists(term, "lease not acquired");
  await upsertSchedule(db.sql, { name: "hourly", cron: "0 * * * *", task: "shoal.noop" });
  await upsertSchedule(db.sql, { name: "broken", cron: "0 3 * * *", task: "shoal.noop" });
  await db.sql`
    update shoal.schedules
    set enabled = false, last_error = 'Cannot parse cron expression', next_run_at = null,
        last_run_at = '2030-05-01T10:00:00Z'
    where name = 'broken'`;
  await db.sql`
    update shoal.schedules set next_run_at = '2030-05-01T11:00:00Z' where name = 'hourly'`;

  const { code, stdout, stderr } = await runShoal(["status", "--json"], { url: db.url });
  assertEquals(code, 0, stderr);
  const status = JSON.parse(stdout);
  assert("queues" in status, stdout);
  assertEquals(status.leases, [
    { name: "scheduler", holder: "host-a:42", expires_at: term.expiresAt.toISOString() },
  ]);
  assertEquals(status.schedules, [
    {
      name: "broken",
      cron: "0 3 * * *",
      task: "shoal.noop",
      queue: null,
      enabled: false,
      next_run_at: null,
      last_run_at: "2030-05-01T10:00:00.000Z",
      last_error: "Cannot parse cron expression",
    },
    {
      name: "hourly",
      cron: "0 * * * *",
      task: "shoal.noop",
      queue: null,
      enabled: true,
      next_run_at: "2030-05-01T11:00:00.000Z",
      last_run_at: null,
      last_error: null,
    },
  ]);

  const human = await runShoal(["status"], { url: db.url });
  assertEquals(human.code, 0, human.stderr);
  const texts = ["host-a:42", term.expiresAt.toISOString(), "hourly", "broken", "shoal.noop"];
  for (const text of texts) {
    assert(human.stdout.includes(text), `"${text}" missing from:\n${human.stdout}`);
  }
});

/** A scheduler that syncs `file`, leads, and is stopped again; returns its sync log line. */
async function syncWith(url: string, file: string): Promise<string> {
  await using proc = spawnShoal([
    "--role",
    "scheduler",
    "--schedules",
    file,
    "--lease",
    "3s",
    "--interval",
    "1s",
    "--log-format",
    "json",
  ], { url });
  await waitForOutput(proc, "Synced");
  return await stopAndGetSync(proc);
}

async function stopAndGetSync(proc: ShoalProcess): Promise<string> {
  proc.kill("SIGTERM");
  const exit = await exitWithin(proc, 15_000);
  assertEquals(exit.code, 0, exit.output);
  const synced = logLines(exit.output).map((l) => String(l.message))
    .filter((m) => m.startsWith("Synced"));
  assertEquals(synced.length, 1, exit.output);
  return synced[0]!;
}

Deno.test("--schedules FILE: the scheduler creates, updates and removes file rows at start, never manual ones", async () => {
  await using db = await testDb();
  const file = await Deno.makeTempFile({ suffix: ".json" });
  try {
    await upsertSchedule(db.sql, { name: "manual-keep", cron: "0 5 * * *", task: "shoal.noop" });
    await Deno.writeTextFile(
      file,
      JSON.stringify([
        { name: "file-a", cron: "0 * * * *", task: "shoal.noop" },
        {
          name: "file-b",
          cron: "*/5 * * * *",
          task: "shoal.sleep",
          queue: "q2",
          payload: { ms: 1 },
          tz: "Europe/Paris",
          priority: 3,
        },
      ]),
    );
    assertEquals(
      await syncWith(db.url, file),
      `Synced ${file}: 2 created, 0 updated, 0 removed`,
    );
    const first = await listSchedules(db.sql);
    assertEquals(first.map((r) => [r.name, r.source, r.cron, r.tz, r.queue, r.priority]), [
      ["file-a", "file", "0 * * * *", "UTC", null, 0],
      ["file-b", "file", "*/5 * * * *", "Europe/Paris", "q2", 3],
      ["manual-keep", "manual", "0 5 * * *", "UTC", null, 0],
    ]);
    assertEquals(first[1]!.payload, { ms: 1 });

    // The object form; file-a changes, file-b is no longer named, file-c is new.
    await Deno.writeTextFile(
      file,
      JSON.stringify({
        schedules: [
          { name: "file-a", cron: "30 * * * *", task: "shoal.noop" },
          { name: "file-c", cron: "0 0 1 * *", task: "shoal.noop", queue: "monthly" },
        ],
      }),
    );
    assertEquals(
      await syncWith(db.url, file),
      `Synced ${file}: 1 created, 1 updated, 1 removed`,
    );
    const second = await listSchedules(db.sql);
    assertEquals(second.map((r) => [r.name, r.source, r.cron, r.queue]), [
      ["file-a", "file", "30 * * * *", null],
      ["file-c", "file", "0 0 1 * *", "monthly"],
      ["manual-keep", "manual", "0 5 * * *", null],
    ]);

    // The same file again changes nothing.
    assertEquals(
      await syncWith(db.url, file),
      `Synced ${file}: 0 created, 0 updated, 0 removed`,
    );
    const third = await listSchedules(db.sql);
    assertEquals(
      third.map((r) => [r.name, r.cron, r.updated_at.getTime()]),
      second.map((r) => [r.name, r.cron, r.updated_at.getTime()]),
    );
  } finally {
    await Deno.remove(file);
  }
});

Deno.test("examples/schedules.json, the README's example, syncs into a real database as documented", async () => {
  const file = new URL("../examples/schedules.json", import.meta.url).pathname;
  const readme = await Deno.readTextFile(new URL("../README.md", import.meta.url));
  const section = readme.slice(readme.indexOf("\n## Schedules\n"));
  const shown = section.match(/```json\n([\s\S]*?)```/)?.[1];
  assertExists(shown, "no JSON block in the README's Schedules section");
  assertEquals(
    JSON.parse(shown),
    JSON.parse(await Deno.readTextFile(file)),
    "README and file differ",
  );

  await using db = await testDb();
  assertEquals(await syncWith(db.url, file), `Synced ${file}: 2 created, 0 updated, 0 removed`);
  // (the scheduler led for a moment: it may have recorded each schedule's first slot)
  const synced = (await rows(db.sql)).map((r) => ({ ...r, next_run_at: null }));
  assertEquals(synced, [
    row("backlog-report", {
      cron: "0 8 * * 1-5",
      tz: "Europe/Paris",
      task: "example.report_backlog",
      queue: "reports",
      payload: { reason: "morning check" },
      priority: 5,
      source: "file",
    }),
    row("heartbeat", { cron: "*/30 * * * * *", source: "file" }),
  ]);
  const list = await runShoal(["schedule", "list"], { url: db.url });
  assertEquals(list.code, 0, list.stderr);
  const columns = list.stdout.trimEnd().split("\n").map((l) => l.split(/\s{2,}/).slice(0, 4));
  assertEquals(columns, [
    ["schedule", "cron", "task", "queue"],
    ["backlog-report", "0 8 * * 1-5", "example.report_backlog", "reports"],
    ["heartbeat", "*/30 * * * * *", "shoal.noop", "(task's queue)"],
  ]);
});

Deno.test("a malformed --schedules file stops the scheduler at start with exit 2 and one line", async () => {
  await using db = await testDb();
  const dir = await Deno.makeTempDir();
  try {
    const entry = { name: "a", cron: "0 * * * *", task: "shoal.noop" };
    const files: [string, string, string | RegExp][] = [
      ["bad-json", "[{", /^shoal: Cannot parse schedules file \S+bad-json\.json: /],
      ["not-a-list", '{"name":"a"}', /: expected a JSON array of schedules\n$/],
      [
        "bad-cron",
        JSON.stringify([entry, { ...entry, name: "b", cron: "every minute" }]),
        /^shoal: Cannot use schedules file \S+bad-cron\.json: entry 2: Cannot parse cron expression "every minute": /,
      ],
      [
        "four-fields",
        JSON.stringify([{ ...entry, cron: "* * * *" }]),
        /: entry 1: Cannot parse cron expression "\* \* \* \*": expected 5 fields .*, got 4\n$/,
      ],
      [
        "bad-tz",
        JSON.stringify([{ ...entry, tz: "Mars/Olympus" }]),
        /: entry 1: Invalid time zone "Mars\/Olympus": expected an IANA name like Europe\/Paris\n$/,
      ],
      [
        "duplicate",
        JSON.stringify([entry, { ...entry, cron: "5 * * * *" }]),
        /^shoal: .*schedules.*"a" is named twice\n$/,
      ],
      [
        "bad-name",
        JSON.stringify([{ ...entry, name: "a b" }]),
        /: entry 1: Invalid schedule name "a b"/,
      ],
    ];
    for (const [name, text] of files) await Deno.writeTextFile(`${dir}/${name}.json`, text);
    const run = (file: string, role = "scheduler") =>
      runShoal(["--role", role, "--schedules", file, "--lease", "3s", "--interval", "1s"], {
        url: db.url,
      });
    const results = await Promise.all(files.map(([name]) => run(`${dir}/${name}.json`)));
    results.forEach((r, i) => assertOneLine(r, 2, files[i]![2], files[i]![0]));
    const missing = await run(`${dir}/missing.json`);
    assertOneLine(missing, 2, /^shoal: Cannot read schedules file \S+missing\.json: /, "missing");
    const all = await run(`${dir}/duplicate.json`, "all");
    assertOneLine(all, 2, /"a" is named twice\n$/, "--role all");

    assertEquals(await rows(db.sql), []);
    assertEquals((await db.sql`select name from shoal.leases`).length, 0, "a role started");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("shoal schedule add, pause and resume reach a running scheduler at once, without a burst", async () => {
  await using db = await testDb();
  await installAudit(db.sql);
  await using proc = spawnShoal(
    ["--role", "scheduler", "--lease", "60s", "--interval", "20s", "--log-format", "json"],
    { url: withApplicationName(db.url, "shoal scheduler") },
  );
  await waitForOutput(proc, "Leading");
  const shoal = (...args: string[]) => runShoal(["schedule", ...args], { url: db.url });
  const fires = async () =>
    (await fireEvents(db.sql, "tick")).filter((e) => e.kind === "fire").length;

  const added = await shoal("add", "tick", "--cron", "* * * * * *", "--task", "shoal.noop");
  assertEquals(added.code, 0, added.stderr);
  // Woken by NOTIFY: far sooner than the 20 s interval the leader was sleeping.
  await waitFor("the new schedule to fire twice", async () => (await fires()) >= 2, 8_000);

  assertEquals((await shoal("pause", "tick")).code, 0);
  const [{ paused_at: pausedAt }] = await db.sql<[{ paused_at: Date }]>`select now() as paused_at`;
  await sleep(2500);
  const whilePaused = await fires();
  assertEquals((await shoal("resume", "tick")).code, 0);
  await waitFor(
    "the resumed schedule to fire",
    async () => (await fires()) >= whilePaused + 2,
    8_000,
  );
  proc.kill("SIGTERM");
  assertEquals((await exitWithin(proc, 15_000)).code, 0);

  const events = await fireEvents(db.sql, "tick");
  const kinds = events.map((e) => e.kind);
  const resumedAt = kinds.indexOf("reset");
  assert(resumedAt > 0, `no reset on resume: ${kinds.join(",")}`);
  // Before the pause: a baseline, then fires; after resume: a new baseline, then fires
  // from its slot on, each one second after the other (the paused slots never fire).
  assertEquals(kinds.slice(0, 1), ["baseline"]);
  assertEquals(kinds.slice(resumedAt + 1, resumedAt + 2), ["baseline"]);
  const before = events.slice(1, resumedAt);
  const after = events.slice(resumedAt + 2);
  assertEquals([...before, ...after].filter((e) => e.kind !== "fire"), []);
  for (const e of before) assert(e.at!.getTime() < pausedAt.getTime(), "fired while paused");
  let expected = events[resumedAt + 1]!.next!.getTime();
  for (const e of after) {
    assertEquals(e.slot!.getTime(), expected, JSON.stringify(e));
    expected = e.next!.getTime();
  }
  assert(after.length >= 2, `${after.length} fires after resume`);
});
