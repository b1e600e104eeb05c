/**
 * `shoal queue pause|resume|list` and `shoal limit set|clear|rate|unrate|hold|weight|unweight|
 * list` (lib/cli.ts over lib/flow.ts), run as real `main.ts` processes against real Postgres.
 */
import { assert, assertEquals } from "./assert.ts";
import { freePort, runShoal, testDb } from "./helpers.ts";
import {
  type FlowStatus,
  flowStatus,
  holdKey,
  pauseQueue,
  setConcurrencyLimit,
  setFairnessWeight,
  setRateLimit,
} from "../lib/flow.ts";
import { claim, enqueueMany } from "../lib/queue.ts";
import type { Sql } from "../lib/db.ts";
import { formatFlowLimits, formatPausedQueues, NO_FLOW_LIMITS } from "../lib/status.ts";

/** flowStatus() with nothing paused, limited, held or weighted. */
const NO_FLOW: FlowStatus = { paused: [], limits: [], rate_limits: [], holds: [], weights: [] };

type Result = { code: number; stdout: string; stderr: string };

/** Check a command failed with `code`, nothing on stdout, and exactly `line` on stderr. */
function assertOneLine(result: Result, code: number, line: string, what: string): void {
  assertEquals(result, { code, stdout: "", stderr: `${line}\n` }, what);
}

Deno.test("shoal queue pause and resume change the queue, and say on stderr with exit 1 when nothing changed", async () => {
  await using db = await testDb();
  const shoal = (...args: string[]) => runShoal(["queue", ...args], { url: db.url });

  assertEquals(await shoal("pause", "mail"), {
    code: 0,
    stdout: "Queue mail paused\n",
    stderr: "",
  });
  assertEquals((await flowStatus(db.sql)).paused.map((p) => p.queue), ["mail"]);
  assertOneLine(await shoal("pause", "mail"), 1, "shoal: Queue mail is already paused", "again");

  assertEquals(await shoal("resume", "mail"), {
    code: 0,
    stdout: "Queue mail resumed\n",
    stderr: "",
  });
  assertEquals((await flowStatus(db.sql)).paused, []);
  assertOneLine(await shoal("resume", "mail"), 1, "shoal: Queue mail was not paused", "again");
  assertOneLine(await shoal("resume", "other"), 1, "shoal: Queue other was not paused", "never");
});

Deno.test("shoal queue list prints the paused queues, and --json their rows", async () => {
  await using db = await testDb();
  const shoal = (...args: string[]) => runShoal(["queue", "list", ...args], { url: db.url });
  assertEquals(await shoal(), { code: 0, stdout: "No paused queues\n", stderr: "" });
  assertEquals(await shoal("--json"), { code: 0, stdout: "[]\n", stderr: "" });

  await pauseQueue(db.sql, "zeta");
  await pauseQueue(db.sql, "alpha");
  const { paused } = await flowStatus(db.sql);
  const text = await shoal();
  assertEquals(text, { code: 0, stdout: formatPausedQueues(paused), stderr: "" });
  const lines = text.stdout.trimEnd().split("\n").map((l) => l.split(/\s{2,}/));
  assertEquals(lines, [
    ["queue", "paused at"],
    ["alpha", paused[0]!.paused_at.toISOString()],
    ["zeta", paused[1]!.paused_at.toISOString()],
  ]);
  const json = await shoal("--json");
  assertEquals(json.code, 0, json.stderr);
  assertEquals(JSON.parse(json.stdout), [
    { queue: "alpha", paused_at: paused[0]!.paused_at.toISOString() },
    { queue: "zeta", paused_at: paused[1]!.paused_at.toISOString() },
  ]);
});

Deno.test("shoal limit set and clear change a queue's default and a key's own limit", async () => {
  await using db = await testDb();
  const shoal = (...args: string[]) => runShoal(["limit", ...args], { url: db.url });
  const rows = async () =>
    (await flowStatus(db.sql)).limits.map((l) => [l.queue, l.key, l.max_running]);

  assertEquals(await shoal("set", "q", "5"), {
    code: 0,
    stdout: "Queue q: at most 5 running jobs per key\n",
    stderr: "",
  });
  assertEquals(await shoal("set", "q", "2", "--key", "tenant 7"), {
    code: 0,
    stdout: 'Queue q, key "tenant 7": at most 2 running jobs\n',
    stderr: "",
  });
  // An empty key: the jobs enqueued without a fairness key.
  assertEquals(await shoal("set", "q", "0", "--key="), {
    code: 0,
    stdout: 'Queue q, key "": at most 0 running jobs\n',
    stderr: "",
  });
  assertEquals(await shoal("set", "q", "1000000"), {
    code: 0,
    stdout: "Queue q: at most 1000000 running jobs per key\n",
    stderr: "",
  });
  assertEquals(await rows(), [["q", null, 1_000_000], ["q", "", 0], ["q", "tenant 7", 2]]);

  assertEquals(await shoal("clear", "q", "--key", "tenant 7"), {
    code: 0,
    stdout: 'Queue q, key "tenant 7": limit cleared\n',
    stderr: "",
  });
  assertOneLine(
    await shoal("clear", "q", "--key", "tenant 7"),
    1,
    'shoal: Queue q has no limit for key "tenant 7"',
    "key again",
  );
  assertEquals(await shoal("clear", "q"), {
    code: 0,
    stdout: "Queue q: default limit cleared\n",
    stderr: "",
  });
  assertOneLine(await shoal("clear", "q"), 1, "shoal: Queue q has no default limit", "again");
  assertEquals(await rows(), [["q", "", 0]]);
});

Deno.test("shoal limit rate and unrate change a queue's default and a key's own rate limit", async () => {
  await using db = await testDb();
  const shoal = (...args: string[]) => runShoal(["limit", ...args], { url: db.url });
  const rows = async () =>
    (await flowStatus(db.sql)).rate_limits.map((r) => [r.queue, r.key, r.max_starts, r.period_ms]);

  assertEquals(await shoal("rate", "q", "10", "--per", "1s"), {
    code: 0,
    stdout: "Queue q: at most 10 starts per 1s per key\n",
    stderr: "",
  });
  assertEquals(await shoal("rate", "q", "5", "--per", "1.5s", "--key", "tenant 7"), {
    code: 0,
    stdout: 'Queue q, key "tenant 7": at most 5 starts per 1500ms\n',
    stderr: "",
  });
  assertEquals(await shoal("rate", "q", "1000000", "--key=", "--per", "1d"), {
    code: 0,
    stdout: 'Queue q, key "": at most 1000000 starts per 1d\n',
    stderr: "",
  });
  assertEquals(await shoal("rate", "q", "1", "--per", "1ms"), {
    code: 0,
    stdout: "Queue q: at most 1 starts per 1ms per key\n",
    stderr: "",
  });
  assertEquals(await rows(), [
    ["q", null, 1, 1],
    ["q", "", 1_000_000, 86_400_000],
    ["q", "tenant 7", 5, 1500],
  ]);

  assertEquals(await shoal("unrate", "q", "--key", "tenant 7"), {
    code: 0,
    stdout: 'Queue q, key "tenant 7": rate limit cleared\n',
    stderr: "",
  });
  assertOneLine(
    await shoal("unrate", "q", "--key", "tenant 7"),
    1,
    'shoal: Queue q has no rate limit for key "tenant 7"',
    "key again",
  );
  assertEquals(await shoal("unrate", "q"), {
    code: 0,
    stdout: "Queue q: default rate limit cleared\n",
    stderr: "",
  });
  assertOneLine(await shoal("unrate", "q"), 1, "shoal: Queue q has no default rate limit", "again");
  assertEquals(await rows(), [["q", "", 1_000_000, 86_400_000]]);
});

Deno.test("shoal limit hold holds a key until the end it prints, and --for 0s lifts it", async () => {
  await using db = await testDb();
  const shoal = (...args: string[]) => runShoal(["limit", ...args], { url: db.url });
  const held = await shoal("hold", "q", "--key", "acme", "--for", "30s");
  assertEquals([held.code, held.stderr], [0, ""]);
  const { holds } = await flowStatus(db.sql);
  assertEquals(holds.map((h) => [h.queue, h.key]), [["q", "acme"]]);
  assertEquals(
    held.stdout,
    `Queue q, key "acme": held until ${holds[0]!.held_until.toISOString()}\n`,
  );
  const left = holds[0]!.held_until.getTime() - Date.now();
  assert(left > 25_000 && left <= 30_000, `${left} ms left`);

  // The empty key: jobs enqueued with neither a concurrency nor a fairness key.
  assertEquals((await shoal("hold", "q", "--key=", "--for", "1d")).code, 0);
  assertEquals((await flowStatus(db.sql)).holds.map((h) => h.key), ["", "acme"]);

  assertEquals(await shoal("hold", "q", "--key", "acme", "--for", "0s"), {
    code: 0,
    stdout: 'Queue q, key "acme": hold lifted\n',
    stderr: "",
  });
  assertEquals((await flowStatus(db.sql)).holds.map((h) => h.key), [""]);
});

Deno.test("shoal limit set and clear with --task change a task's own limits, apart from the queue's", async () => {
  await using db = await testDb();
  const shoal = (...args: string[]) => runShoal(["limit", ...args], { url: db.url });
  const rows = async () =>
    (await flowStatus(db.sql)).limits.map((l) => [l.queue, l.task, l.key, l.max_running]);

  assertEquals(await shoal("set", "q", "5"), {
    code: 0,
    stdout: "Queue q: at most 5 running jobs per key\n",
    stderr: "",
  });
  assertEquals(await shoal("set", "q", "3", "--task", "export"), {
    code: 0,
    stdout: "Queue q, task export: at most 3 running jobs per key\n",
    stderr: "",
  });
  assertEquals(await shoal("set", "q", "1", "--task", "export", "--key", "acme co"), {
    code: 0,
    stdout: 'Queue q, task export, key "acme co": at most 1 running jobs\n',
    stderr: "",
  });
  // Pausing one task: a limit of 0.
  assertEquals(await shoal("set", "q", "0", "--task=report.daily"), {
    code: 0,
    stdout: "Queue q, task report.daily: at most 0 running jobs per key\n",
    stderr: "",
  });
  assertEquals(await rows(), [
    ["q", null, null, 5],
    ["q", "export", null, 3],
    ["q", "export", "acme co", 1],
    ["q", "report.daily", null, 0],
  ]);

  assertEquals(await shoal("clear", "q", "--task", "export", "--key", "acme co"), {
    code: 0,
    stdout: 'Queue q, task export, key "acme co": limit cleared\n',
    stderr: "",
  });
  assertOneLine(
    await shoal("clear", "q", "--task", "export", "--key", "acme co"),
    1,
    'shoal: Queue q, task export has no limit for key "acme co"',
    "key again",
  );
  assertEquals(await shoal("clear", "q", "--task", "export"), {
    code: 0,
    stdout: "Queue q, task export: default limit cleared\n",
    stderr: "",
  });
  assertOneLine(
    await shoal("clear", "q", "--task", "export"),
    1,
    "shoal: Queue q, task export has no default limit",
    "again",
  );
  // The queue's own default is another row: still there.
  assertEquals(await rows(), [["q", null, null, 5], ["q", "report.daily", null, 0]]);
});

Deno.test("shoal limit rate and unrate with --task change a task's own rate limit", async () => {
  await using db = await testDb();
  const shoal = (...args: string[]) => runShoal(["limit", ...args], { url: db.url });
  const rows = async () =>
    (await flowStatus(db.sql)).rate_limits.map((r) => [r.task, r.key, r.max_starts, r.period_ms]);

  assertEquals(await shoal("rate", "q", "10", "--per", "1s", "--task", "export"), {
    code: 0,
    stdout: "Queue q, task export: at most 10 starts per 1s per key\n",
    stderr: "",
  });
  assertEquals(await shoal("rate", "q", "2", "--per", "1m", "--task", "export", "--key="), {
    code: 0,
    stdout: 'Queue q, task export, key "": at most 2 starts per 1m\n',
    stderr: "",
  });
  assertEquals(await rows(), [["export", null, 10, 1000], ["export", "", 2, 60_000]]);
  assertEquals(await shoal("unrate", "q", "--task", "export", "--key="), {
    code: 0,
    stdout: 'Queue q, task export, key "": rate limit cleared\n',
    stderr: "",
  });
  assertOneLine(
    await shoal("unrate", "q", "--key=", "--task", "export"),
    1,
    'shoal: Queue q, task export has no rate limit for key ""',
    "key again",
  );
  // Without --task: the queue's default, which there is none of.
  assertOneLine(await shoal("unrate", "q"), 1, "shoal: Queue q has no default rate limit", "queue");
  assertEquals(await shoal("unrate", "q", "--task", "export"), {
    code: 0,
    stdout: "Queue q, task export: default rate limit cleared\n",
    stderr: "",
  });
  assertEquals(await rows(), []);
});

Deno.test("shoal limit hold with --task holds a task's jobs of the key when it has limits of its own, else says the hold is the key's", async () => {
  await using db = await testDb();
  const shoal = (...args: string[]) => runShoal(["limit", ...args], { url: db.url });
  const held = async () =>
    (await flowStatus(db.sql)).holds.map((h) => [h.queue, h.task, h.key, h.held_until]);

  // export has no limit of its own on q yet: the hold is the key's, and the line says so.
  const keys = await shoal("hold", "q", "--key", "acme", "--for", "30s", "--task", "export");
  assertEquals([keys.code, keys.stderr], [0, ""]);
  const [[, , , keyUntil]] = await held() as [[string, null, string, Date]];
  assertEquals(await held(), [["q", null, "acme", keyUntil]]);
  assertEquals(
    keys.stdout,
    `Queue q, key "acme": held until ${keyUntil.toISOString()} ` +
      "(task export has no limits of its own on q: its jobs count under the queue's)\n",
  );

  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 4, task: "export" });
  const own = await shoal("hold", "q", "--task", "export", "--key", "acme", "--for", "1m");
  assertEquals([own.code, own.stderr], [0, ""]);
  const taskUntil = (await held())[1]![3] as Date;
  assertEquals(await held(), [["q", null, "acme", keyUntil], ["q", "export", "acme", taskUntil]]);
  assertEquals(
    own.stdout,
    `Queue q, task export, key "acme": held until ${taskUntil.toISOString()}\n`,
  );
  const left = taskUntil.getTime() - Date.now();
  assert(left > 55_000 && left <= 60_000, `${left} ms left`);

  assertEquals(await shoal("hold", "q", "--task", "export", "--key", "acme", "--for", "0s"), {
    code: 0,
    stdout: 'Queue q, task export, key "acme": hold lifted\n',
    stderr: "",
  });
  assertEquals(await held(), [["q", null, "acme", keyUntil]]);
});

Deno.test("shoal limit weight and unweight change a fairness key's weight", async () => {
  await using db = await testDb();
  const shoal = (...args: string[]) => runShoal(["limit", ...args], { url: db.url });
  const rows = async () =>
    (await flowStatus(db.sql)).weights.map((w) => [w.queue, w.key, w.weight]);
  assertEquals(await shoal("weight", "q", "3", "--key", "acme"), {
    code: 0,
    stdout: 'Queue q, key "acme": weight 3 for jobs enqueued from now on\n',
    stderr: "",
  });
  assertEquals(await shoal("weight", "q", "--key", "big co", "1000"), {
    code: 0,
    stdout: 'Queue q, key "big co": weight 1000 for jobs enqueued from now on\n',
    stderr: "",
  });
  assertEquals(await rows(), [["q", "acme", 3], ["q", "big co", 1000]]);
  assertEquals(await shoal("unweight", "q", "--key", "acme"), {
    code: 0,
    stdout: 'Queue q, key "acme": weight 1 for jobs enqueued from now on\n',
    stderr: "",
  });
  assertOneLine(
    await shoal("unweight", "q", "--key", "acme"),
    1,
    'shoal: Queue q has no weight for key "acme"',
    "again",
  );
  assertEquals(await rows(), [["q", "big co", 1000]]);
});

Deno.test("shoal limit list prints every limit, hold and weight, and --json their rows", async () => {
  await using db = await testDb();
  const shoal = (...args: string[]) => runShoal(["limit", "list", ...args], { url: db.url });
  assertEquals(await shoal(), { code: 0, stdout: NO_FLOW_LIMITS, stderr: "" });
  const none = await shoal("--json");
  assertEquals([none.code, JSON.parse(none.stdout)], [0, {
    limits: [],
    rate_limits: [],
    holds: [],
    weights: [],
  }]);

  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 2 });
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 1, key: "big" });
  await enqueueMany(db.sql, [
    ...Array.from({ length: 3 }, () => ({ task: "t", queue: "q", fairnessKey: "big" })),
    ...Array.from({ length: 3 }, () => ({ task: "t", queue: "q" })),
  ]);
  const { jobs } = await claim(db.sql, {
    queues: ["q"],
    limit: 10,
    workerId: "test:1",
    visibilityMs: 60_000,
  });
  assertEquals(jobs.length, 3);
  await setRateLimit(db.sql, { queue: "q", maxStarts: 100, periodMs: 60_000 });
  await setRateLimit(db.sql, { queue: "api", maxStarts: 5, periodMs: 1500, key: "acme co" });
  const until = await holdKey(db.sql, { queue: "api", key: "acme co", forMs: 60_000 });
  await setFairnessWeight(db.sql, { queue: "q", key: "big", weight: 4 });
  await pauseQueue(db.sql, "q"); // not listed here: `shoal queue list` lists pauses
  // Task export's own limits and a hold of its jobs of acme: after the queue's, named.
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 3, task: "export" });
  await setRateLimit(db.sql, { queue: "q", maxStarts: 7, periodMs: 1000, task: "export" });
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 1, key: "acme", task: "export" });
  const exportUntil = await holdKey(db.sql, {
    queue: "q",
    key: "acme",
    forMs: 60_000,
    task: "export",
  });

  const text = await shoal();
  assertEquals(text.code, 0, text.stderr);
  const { paused: _, ...flow } = await flowStatus(db.sql);
  assertEquals(text.stdout, formatFlowLimits(flow));
  const sections = text.stdout.split("\n\n").map((section) =>
    section.trimEnd().split("\n").map((l) => l.trim().split(/\s{2,}/))
  );
  assertEquals(sections, [
    [
      ["Concurrency limits (slots held: claimed jobs, prefetched ones included):"],
      ["queue", "task", "key", "max running", "slots held"],
      ["q", "-", "(every key)", "2", "2"],
      ["q", "-", "big", "1", "1"],
      ["q", "export", "(every key)", "3", "0"],
      ["q", "export", "acme", "1", "0"],
    ],
    [
      ["Rate limits (starts per period per key; a burst of up to max starts after a quiet spell):"],
      ["queue", "task", "key", "max starts", "per"],
      ["api", "-", '"acme co"', "5", "1500ms"],
      ["q", "-", "(every key)", "100", "1m"],
      ["q", "export", "(every key)", "7", "1s"],
    ],
    [
      ["Held keys (none of their jobs claimed until then):"],
      ["queue", "task", "key", "held until"],
      ["api", "-", '"acme co"', until.toISOString()],
      ["q", "export", "acme", exportUntil.toISOString()],
    ],
    [
      ["Fairness weights (jobs started per job of a weight-1 key under contention):"],
      ["queue", "key", "weight"],
      ["q", "big", "4"],
    ],
  ]);
  const json = await shoal("--json");
  assertEquals(json.code, 0, json.stderr);
  assertEquals(JSON.parse(json.stdout), {
    limits: [
      { queue: "q", task: null, key: null, max_running: 2, slots_held: 2 },
      { queue: "q", task: null, key: "big", max_running: 1, slots_held: 1 },
      { queue: "q", task: "export", key: null, max_running: 3, slots_held: 0 },
      { queue: "q", task: "export", key: "acme", max_running: 1, slots_held: 0 },
    ],
    rate_limits: [
      { queue: "api", task: null, key: "acme co", max_starts: 5, period_ms: 1500 },
      { queue: "q", task: null, key: null, max_starts: 100, period_ms: 60_000 },
      { queue: "q", task: "export", key: null, max_starts: 7, period_ms: 1000 },
    ],
    holds: [
      { queue: "api", task: null, key: "acme co", held_until: until.toISOString() },
      { queue: "q", task: "export", key: "acme", held_until: exportUntil.toISOString() },
    ],
    weights: [{ queue: "q", key: "big", weight: 4 }],
  });
});

Deno.test("shoal queue and limit refuse bad arguments with exit 2 and one line, before connecting", async () => {
  // A URL nobody listens on: none of these may get as far as connecting.
  const url = `postgres://alice:s3cret@127.0.0.1:${freePort()}/nowhere`;
  const NAME = "use 1 to 128 letters, digits or _.:- starting with a letter or digit";
  const LONG_KEY =
    'Invalid --key: expected a key of at most 256 characters, not "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk…"';
  const LIMIT_USAGE = "shoal limit takes set QUEUE N, clear QUEUE, rate QUEUE N, unrate QUEUE, " +
    "hold QUEUE, weight QUEUE W, unweight QUEUE or list";
  const RULE = " (1 to 128 of letters, digits, _.:-)";
  const BAD_TASK = 'Invalid --task: "bad name" is not a name' + RULE;
  const DASH_TASK = 'Invalid --task: "-x" is not a name' + RULE;
  const cases: { args: string[]; says: string }[] = [
    { args: ["queue"], says: "shoal queue takes pause QUEUE, resume QUEUE or list" },
    { args: ["queue", "stop", "q"], says: "shoal queue takes pause QUEUE, resume QUEUE or list" },
    { args: ["queue", "pause"], says: "shoal queue pause takes one queue name" },
    { args: ["queue", "resume", "a", "b"], says: "shoal queue resume takes one queue name" },
    { args: ["queue", "pause", "bad name"], says: `Invalid queue name "bad name": ${NAME}` },
    { args: ["queue", "list", "extra"], says: 'shoal queue list takes no argument "extra"' },
    {
      args: ["queue", "pause", "q", "--json"],
      says: "Invalid flag --json: shoal queue pause does not take it",
    },
    { args: ["limit"], says: LIMIT_USAGE },
    { args: ["limit", "unset", "q"], says: LIMIT_USAGE },
    {
      args: ["limit", "set", "q"],
      says: "shoal limit set takes a queue name and a number of running jobs",
    },
    {
      args: ["limit", "set", "q", "abc"],
      says: 'Invalid number of running jobs: expected an integer from 0 to 1000000, not "abc"',
    },
    {
      args: ["limit", "set", "q", "1000001"],
      says: 'Invalid number of running jobs: expected an integer from 0 to 1000000, not "1000001"',
    },
    {
      args: ["limit", "set", "q", "2.5"],
      says: 'Invalid number of running jobs: expected an integer from 0 to 1000000, not "2.5"',
    },
    { args: ["limit", "set", "-", "5"], says: `Invalid queue name "-": ${NAME}` },
    {
      args: ["limit", "set", "q", "5", "--key", "k".repeat(257)],
      says: LONG_KEY,
    },
    { args: ["limit", "clear"], says: "shoal limit clear takes one queue name" },
    { args: ["limit", "clear", "q", "--key", "k".repeat(257)], says: LONG_KEY },
    {
      args: ["limit", "list", "--key", "k"],
      says: "Invalid flag --key: shoal limit list does not take it",
    },
    {
      args: ["limit", "rate", "q", "--per", "1s"],
      says: "shoal limit rate takes a queue name and a number of starts",
    },
    {
      args: ["limit", "rate", "q", "0", "--per", "1s"],
      says: 'Invalid number of starts: expected an integer from 1 to 1000000, not "0"',
    },
    {
      args: ["limit", "rate", "q", "1000001", "--per", "1s"],
      says: 'Invalid number of starts: expected an integer from 1 to 1000000, not "1000001"',
    },
    { args: ["limit", "rate", "q", "5"], says: "shoal limit rate needs --per" },
    { args: ["limit", "rate", "q", "5", "--per", "0s"], says: "Invalid --per: 0s is too short" },
    {
      args: ["limit", "rate", "q", "5", "--per", "0.1ms"],
      says: "Invalid --per: 0.1ms is too short",
    },
    {
      args: ["limit", "rate", "q", "5", "--per", "25h"],
      says: "Invalid --per: 25h is too long (at most 1d)",
    },
    {
      args: ["limit", "rate", "q", "5", "--per", "5"],
      says:
        'Invalid --per: Cannot parse duration "5": expected a number and a unit (ms, s, m, h, d), like 500ms or 10s',
    },
    { args: ["limit", "rate", "q", "5", "--per", "1s", "--key", "k".repeat(257)], says: LONG_KEY },
    {
      args: ["limit", "rate", "bad name", "5", "--per", "1s"],
      says: `Invalid queue name "bad name": ${NAME}`,
    },
    { args: ["limit", "unrate"], says: "shoal limit unrate takes one queue name" },
    {
      args: ["limit", "unrate", "q", "--per", "1s"],
      says: "Invalid flag --per: shoal limit unrate does not take it",
    },
    { args: ["limit", "hold", "q", "--for", "1s"], says: "shoal limit hold needs --key" },
    { args: ["limit", "hold", "q", "--key", "k"], says: "shoal limit hold needs --for" },
    {
      args: ["limit", "hold", "q", "--key", "k", "--for", "25h"],
      says: "Invalid --for: 25h is too long (at most 1d)",
    },
    { args: ["limit", "hold", "q", "--key", "k".repeat(257), "--for", "1s"], says: LONG_KEY },
    {
      args: ["limit", "hold", "a", "b", "--key", "k", "--for", "1s"],
      says: "shoal limit hold takes one queue name",
    },
    {
      args: ["limit", "hold", "q", "--key", "k", "--for", "1s", "--per", "1s"],
      says: "Invalid flag --per: shoal limit hold does not take it",
    },
    { args: ["limit", "weight", "q", "3"], says: "shoal limit weight needs --key" },
    {
      args: ["limit", "weight", "q", "--key", "k"],
      says: "shoal limit weight takes a queue name and a weight",
    },
    {
      args: ["limit", "weight", "q", "0", "--key", "k"],
      says: 'Invalid weight: expected an integer from 1 to 1000, not "0"',
    },
    {
      args: ["limit", "weight", "q", "1001", "--key", "k"],
      says: 'Invalid weight: expected an integer from 1 to 1000, not "1001"',
    },
    { args: ["limit", "weight", "q", "2", "--key", "k".repeat(257)], says: LONG_KEY },
    { args: ["limit", "unweight", "q"], says: "shoal limit unweight needs --key" },
    { args: ["limit", "set", "q", "5", "--task", "bad name"], says: BAD_TASK },
    {
      args: ["limit", "set", "q", "5", "--task="],
      says: 'Invalid --task: "" is not a name' + RULE,
    },
    { args: ["limit", "set", "q", "5", "--key", "k", "--task=-x"], says: DASH_TASK },
    {
      args: ["limit", "set", "q", "5", "--task"],
      says: "Option '--task <value>' argument missing",
    },
    { args: ["limit", "clear", "q", "--task", "bad name"], says: BAD_TASK },
    { args: ["limit", "rate", "q", "5", "--per", "1s", "--task", "bad name"], says: BAD_TASK },
    { args: ["limit", "unrate", "q", "--key", "k", "--task", "bad name"], says: BAD_TASK },
    {
      args: ["limit", "hold", "q", "--key", "k", "--for", "1s", "--task", "bad name"],
      says: BAD_TASK,
    },
    {
      args: ["limit", "set", "q", "5", "--tasks", "export"],
      says: "Unknown option '--tasks': did you mean --task?",
    },
    {
      args: ["limit", "weight", "q", "2", "--key", "k", "--task", "export"],
      says: "Invalid flag --task: shoal limit weight does not take it",
    },
    {
      args: ["limit", "unweight", "q", "--key", "k", "--task", "export"],
      says: "Invalid flag --task: shoal limit unweight does not take it",
    },
    {
      args: ["limit", "list", "--task", "export"],
      says: "Invalid flag --task: shoal limit list does not take it",
    },
    {
      args: ["limit", "unweight", "q", "2", "--key", "k"],
      says: "shoal limit unweight takes one queue name",
    },
  ];
  const results = await Promise.all(cases.map((c) => runShoal(c.args, { url })));
  cases.forEach((c, i) => {
    assertOneLine(results[i]!, 2, `shoal: ${c.says}`, `shoal ${c.args.join(" ")}`);
  });
});

Deno.test("shoal --help names the queue and limit commands", async () => {
  const { code, stdout } = await runShoal(["--help"]);
  assertEquals(code, 0);
  assert(stdout.includes("shoal queue pause QUEUE | resume QUEUE | list [--json]"), stdout);
  for (
    const line of [
      "shoal limit set QUEUE N [--key K] [--task T] | clear QUEUE [--key K] [--task T] | list [--json]",
      "shoal limit rate QUEUE N --per D [--key K] [--task T] | unrate QUEUE [--key K] [--task T]",
      "shoal limit hold QUEUE --key K --for D [--task T] | weight QUEUE W --key K | unweight QUEUE --key K",
    ]
  ) assert(stdout.includes(`\n  ${line}\n`), line);
  assert(
    /--key\s+enqueue: dedupe key; .*limit: the key a limit, hold or weight is for/.test(stdout),
    stdout,
  );
  assert(
    /--per\s+limit rate: the period its N starts are spread over \(at most 1d\)/.test(stdout),
    stdout,
  );
  assert(
    /--task\s+enqueue, schedule add: task name; limit: the task whose jobs a limit counts apart\n/
      .test(stdout),
    stdout,
  );
  assert(
    /--for\s+limit hold: how long the key is held \(0s lifts the hold; at most 1d\)/.test(stdout),
    stdout,
  );
});

/** The keys of the one job the README's examples enqueue onto api, which is then deleted. */
async function takeReadmeJob(sql: Sql): Promise<Record<string, string> | undefined> {
  const rows = await sql<{ fairness_key: string; concurrency_key: string }[]>`
    delete from shoal.jobs where queue = 'api' and task = 'partner.sync'
    returning fairness_key, concurrency_key`;
  assertEquals(rows.length, 1);
  return { ...rows[0]! };
}

/** The fenced code blocks of the README's Flow control section, by language. */
async function flowControlBlocks(): Promise<Record<string, string>> {
  const readme = await Deno.readTextFile(new URL("../README.md", import.meta.url));
  const start = readme.indexOf("\n## Flow control\n");
  assert(start >= 0, "README.md has no Flow control section");
  const section = readme.slice(start + 1, readme.indexOf("\n## ", start + 1));
  const blocks: Record<string, string> = {};
  for (const m of section.matchAll(/```(\w+)\n([\s\S]*?)```/g)) blocks[m[1]!] = m[2]!;
  assertEquals(Object.keys(blocks), ["sh", "sql", "ts"]);
  return blocks;
}

Deno.test("the README's Flow control commands, SQL and TypeScript run as documented", async () => {
  await using db = await testDb();
  const blocks = await flowControlBlocks();

  // Each command in order, each exit 0; they undo what they do.
  const commands = blocks.sh!.trim().split("\n").map((line) =>
    line.replace(/#.*$/, "").trim().split(/\s+/)
  );
  for (const [shoal, ...args] of commands) {
    assertEquals(shoal, "shoal");
    const result = await runShoal(args, { url: db.url });
    assertEquals(result.code, 0, `shoal ${args.join(" ")}: ${result.stderr}`);
  }
  assertEquals(await flowStatus(db.sql), NO_FLOW);
  // The enqueue's job carries both keys.
  assertEquals(await takeReadmeJob(db.sql), {
    fairness_key: "acme",
    concurrency_key: "partner-api",
  });

  // Each statement in order, with what its comment says it returns.
  const statements = blocks.sql!.trim().split("\n").map((line) => line.replace(/;\s*--.*$/, ";"));
  const results = [];
  for (const statement of statements) {
    const [row] = await db.sql.unsafe(statement);
    const value = Object.values(row!)[0];
    // A hold's end and a job id: their kind.
    results.push(
      value instanceof Date
        ? "a time"
        : typeof value === "string" && /^\d+$/.test(value)
        ? "an id"
        : value,
    );
  }
  assertEquals(results, [
    ...[true, true, "", "", 0, true, true], // pause and concurrency limits
    ...["", "", "a time", "a time", true, true], // rate limits and a hold
    ...["", true], // a weight
    ...["", "export", 0, "a time", "a time", true], // a task's own limit and a hold of its jobs
    "an id", // an enqueue
  ]);
  assertEquals(await flowStatus(db.sql), NO_FLOW);
  assertEquals(await takeReadmeJob(db.sql), {
    fairness_key: "acme",
    concurrency_key: "partner-api",
  });

  // The TypeScript, type-checked against lib/ and run, with what it leaves printed.
  const dir = await Deno.makeTempDir({ prefix: "shoal-flow-readme-" });
  try {
    const mod = new URL("../lib/mod.ts", import.meta.url).href;
    const file = `${dir}/flow.ts`;
    await Deno.writeTextFile(
      file,
      blocks.ts!.replace('"./lib/mod.ts"', JSON.stringify(mod)) +
        "console.log(JSON.stringify({ paused, limits, rate_limits, holds, weights }));\n" +
        "await sql.end();\n",
    );
    const config = new URL("../deno.json", import.meta.url).pathname;
    const run = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--check", "-A", "--config", config, file],
      env: { DATABASE_URL: db.url },
      stdin: "null",
    }).output();
    const stderr = new TextDecoder().decode(run.stderr);
    assertEquals(run.code, 0, stderr);
    const printed = JSON.parse(new TextDecoder().decode(run.stdout));
    const { holds } = await flowStatus(db.sql);
    assertEquals(holds.map((h) => [h.queue, h.key]), [["api", "acme"]]);
    assertEquals(printed, {
      paused: [],
      limits: [
        { queue: "exports", task: "export", key: null, max_running: 3, slots_held: 0 },
        { queue: "reports", task: null, key: null, max_running: 2, slots_held: 0 },
      ],
      rate_limits: [{ queue: "api", task: null, key: "acme", max_starts: 5, period_ms: 1000 }],
      holds: [{
        queue: "api",
        task: null,
        key: "acme",
        held_until: holds[0]!.held_until.toISOString(),
      }],
      weights: [{ queue: "reports", key: "acme", weight: 3 }],
    });
    assertEquals(await takeReadmeJob(db.sql), {
      fairness_key: "acme",
      concurrency_key: "partner-api",
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
