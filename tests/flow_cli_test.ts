/**
 * `shoal queue pause|resume|list` and `shoal limit set|clear|list` (lib/cli.ts over
 * lib/flow.ts), run as real `main.ts` processes against real Postgres.
 */
import { assert, assertEquals } from "./assert.ts";
import { freePort, runShoal, testDb } from "./helpers.ts";
import { flowStatus, pauseQueue, setConcurrencyLimit } from "../lib/flow.ts";
import { claim, enqueueMany } from "../lib/queue.ts";
import { formatLimits, formatPausedQueues } from "../lib/status.ts";

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

Deno.test("shoal limit list prints the limits with the slots each holds, and --json their rows", async () => {
  await using db = await testDb();
  const shoal = (...args: string[]) => runShoal(["limit", "list", ...args], { url: db.url });
  assertEquals(await shoal(), { code: 0, stdout: "No concurrency limits\n", stderr: "" });
  assertEquals(await shoal("--json"), { code: 0, stdout: "[]\n", stderr: "" });

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

  const text = await shoal();
  assertEquals(text.code, 0, text.stderr);
  assertEquals(text.stdout, formatLimits((await flowStatus(db.sql)).limits));
  assertEquals(text.stdout.trimEnd().split("\n").map((l) => l.trim().split(/\s{2,}/)), [
    ["queue", "key", "max running", "slots held"],
    ["q", "(every key)", "2", "2"],
    ["q", "big", "1", "1"],
  ]);
  const json = await shoal("--json");
  assertEquals(json.code, 0, json.stderr);
  assertEquals(JSON.parse(json.stdout), [
    { queue: "q", key: null, max_running: 2, slots_held: 2 },
    { queue: "q", key: "big", max_running: 1, slots_held: 1 },
  ]);
});

Deno.test("shoal queue and limit refuse bad arguments with exit 2 and one line, before connecting", async () => {
  // A URL nobody listens on: none of these may get as far as connecting.
  const url = `postgres://alice:s3cret@127.0.0.1:${freePort()}/nowhere`;
  const NAME = "use 1 to 128 letters, digits or _.:- starting with a letter or digit";
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
    { args: ["limit"], says: "shoal limit takes set QUEUE N, clear QUEUE or list" },
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
      says:
        'Invalid --key: expected a fairness key of at most 256 characters, not "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk…"',
    },
    { args: ["limit", "clear"], says: "shoal limit clear takes one queue name" },
    {
      args: ["limit", "clear", "q", "--key", "k".repeat(257)],
      says:
        'Invalid --key: expected a fairness key of at most 256 characters, not "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk…"',
    },
    {
      args: ["limit", "list", "--key", "k"],
      says: "Invalid flag --key: shoal limit list does not take it",
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
  assert(
    stdout.includes("shoal limit set QUEUE N [--key K] | clear QUEUE [--key K] | list [--json]"),
    stdout,
  );
  assert(/--key\s+enqueue: dedupe key; limit set\|clear: the fairness key/.test(stdout), stdout);
});

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
  assertEquals(await flowStatus(db.sql), { paused: [], limits: [] });

  // Each statement in order, with what its comment says it returns.
  const statements = blocks.sql!.trim().split("\n").map((line) => line.replace(/;\s*--.*$/, ";"));
  const results = [];
  for (const statement of statements) {
    const [row] = await db.sql.unsafe(statement);
    results.push(Object.values(row!)[0]);
  }
  assertEquals(results, [true, true, "", "", 0, true, true]);
  assertEquals(await flowStatus(db.sql), { paused: [], limits: [] });

  // The TypeScript, type-checked against lib/ and run, with what it leaves printed.
  const dir = await Deno.makeTempDir({ prefix: "shoal-flow-readme-" });
  try {
    const mod = new URL("../lib/mod.ts", import.meta.url).href;
    const file = `${dir}/flow.ts`;
    await Deno.writeTextFile(
      file,
      blocks.ts!.replace('"./lib/mod.ts"', JSON.stringify(mod)) +
        "console.log(JSON.stringify({ paused, limits }));\nawait sql.end();\n",
    );
    const config = new URL("../deno.json", import.meta.url).pathname;
    const run = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--check", "-A", "--config", config, file],
      env: { DATABASE_URL: db.url },
      stdin: "null",
    }).output();
    const stderr = new TextDecoder().decode(run.stderr);
    assertEquals(run.code, 0, stderr);
    assertEquals(JSON.parse(new TextDecoder().decode(run.stdout)), {
      paused: [],
      limits: [{ queue: "reports", key: null, max_running: 2, slots_held: 0 }],
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
