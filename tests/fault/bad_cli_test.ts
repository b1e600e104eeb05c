/**
 * Bad input on the command line (issue 6): flags and `SHOAL_*` variables of the wrong type
 * or range, malformed `DATABASE_URL`s, bad payloads, names, cron strings and time zones,
 * values holding newlines, and SQL-injection strings, through real `main.ts` processes.
 * Each is one line on stderr, exit 2 (1 when the database itself refuses), no stack trace,
 * and never the database password. tests/cli_test.ts holds the first such cases; these
 * extend them rather than repeat them.
 */
import { assert, assertEquals } from "../assert.ts";
import { freePort, runShoal, testDb } from "../helpers.ts";
import { INJECTIONS } from "./injections.ts";

const PASSWORD = "pw-Cli-7f3a9c";

/** Exactly one line on stderr, prefixed "shoal: ", saying `says`, with no stack frame or password. */
function assertOneLine(stderr: string, says: string, what: string): void {
  const lines = stderr.split("\n");
  assertEquals(lines.length, 2, `${what}: expected one line on stderr, got:\n${stderr}`);
  assert(lines[0]!.startsWith("shoal: "), `${what}: ${stderr}`);
  assert(lines[0]!.includes(says), `${what}: expected "${says}" in: ${stderr}`);
  assert(!/\bat .+:\d+:\d+/.test(stderr), `${what}: stack trace on stderr:\n${stderr}`);
  assert(!stderr.includes(PASSWORD), `${what}: leaked the password`);
}

interface Case {
  args: string[];
  env?: Record<string, string>;
  says: string;
}

/** Run the cases a few at a time (the machine is shared), each against `url`. */
async function runAll(cases: Case[], url: string, code: number): Promise<void> {
  for (let i = 0; i < cases.length; i += 8) {
    const batch = cases.slice(i, i + 8);
    const results = await Promise.all(
      batch.map((c) => runShoal(c.args, { env: { DATABASE_URL: url, ...c.env } })),
    );
    batch.forEach((c, j) => {
      const { code: exit, stdout, stderr } = results[j]!;
      const what = `shoal ${JSON.stringify(c.args)} ${JSON.stringify(c.env ?? {})}`;
      assertEquals(exit, code, `${what}: exit code, stderr:\n${stderr}`);
      assertEquals(stdout, "", what);
      assertOneLine(stderr, c.says, what);
    });
  }
}

const CONSUMER = ["--role", "consumer"];

Deno.test("flags and SHOAL_* variables of the wrong type or range exit 2 with one line, before touching the database", async () => {
  const url = `postgres://alice:${PASSWORD}@127.0.0.1:${freePort()}/nowhere`;
  const cases: Case[] = [
    {
      args: [...CONSUMER, "--visibility-timeout", "-5s"],
      says: "use '--visibility-timeout=-XYZ'",
    },
    { args: [...CONSUMER, "--visibility-timeout=-5s"], says: 'Cannot parse duration "-5s"' },
    { args: [...CONSUMER, "--shutdown-grace", "99999999999d"], says: "longer than a year" },
    { args: [...CONSUMER, "--concurrency", "99999999999999999999999"], says: "is above 10000" },
    { args: [...CONSUMER, "--concurrency", "1.5"], says: '"1.5" is not an integer' },
    { args: [...CONSUMER, "--max-payload", "1"], says: "Invalid --max-payload: 1 is below 2" },
    { args: [...CONSUMER, "--no-such-flag"], says: "Unknown option '--no-such-flag'" },
    { args: ["--role", "nonsense"], says: 'Invalid --role: "nonsense" is not one of' },
    { args: [], env: { SHOAL_ROLE: "nonsense" }, says: 'Invalid SHOAL_ROLE: "nonsense"' },
    { args: CONSUMER, env: { SHOAL_LISTEN: "maybe" }, says: '"maybe" is not true or false' },
    { args: CONSUMER, env: { SHOAL_QUEUES: ",,," }, says: "SHOAL_QUEUES: the list is empty" },
    { args: CONSUMER, env: { SHOAL_QUEUES: INJECTIONS[0]! }, says: "is not a name" },
    { args: CONSUMER, env: { SHOAL_HTTP: "garbage" }, says: "Invalid SHOAL_HTTP" },
    { args: CONSUMER, env: { SHOAL_POLL_INTERVAL: "Infinity" }, says: "SHOAL_POLL_INTERVAL" },
    { args: CONSUMER, env: { SHOAL_MAX_PAYLOAD: "-1" }, says: "SHOAL_MAX_PAYLOAD: -1 is below" },
    { args: CONSUMER, env: { SHOAL_PREFETCH: "NaN" }, says: '"NaN" is not an integer' },
    { args: CONSUMER, env: { SHOAL_LOG_LEVEL: "loud" }, says: 'SHOAL_LOG_LEVEL: "loud"' },
    {
      args: ["--role", "reaper", "--lease", "1s", "--interval", "2s"],
      says: "--interval 2s must be shorter than --lease 1s",
    },
    // Values holding a newline are still reported on one line.
    { args: ["--role", "con\nsumer"], says: 'Invalid --role: "con sumer"' },
    { args: ["enqueue", "--task", "a\nb"], says: "Invalid --task" },
    { args: [...CONSUMER, "--queues", "a\r\nb"], says: "Invalid --queues" },
  ];
  await runAll(cases, url, 2);
});

Deno.test("a malformed DATABASE_URL exits 2 with one line and no password", async () => {
  const cases: Case[] = [
    { args: ["status"], env: { DATABASE_URL: `garbage ${PASSWORD}` }, says: "Cannot parse" },
    {
      args: ["migrate"],
      env: { DATABASE_URL: `mysql://u:${PASSWORD}@127.0.0.1/db` },
      says: 'scheme "mysql" is not postgres',
    },
    {
      args: CONSUMER,
      env: { DATABASE_URL: `postgres://u:${PASSWORD}@127.0.0.1:99999/db` },
      says: "Cannot parse the database URL",
    },
    {
      args: CONSUMER,
      env: { DATABASE_URL: `postgres://u:${PASSWORD}@127.0.0.1:port/db` },
      says: "Cannot parse the database URL",
    },
    {
      args: ["status"],
      env: { DATABASE_URL: `postgres://u:${PASSWORD}@[::1/db` },
      says: "Cannot parse the database URL",
    },
    {
      args: ["status", "--database-url", `http://u:${PASSWORD}@127.0.0.1/db`],
      says: 'scheme "http" is not postgres',
    },
    // A bad flag beside a good URL: the flag is named, the URL is not echoed.
    {
      args: [...CONSUMER, "--concurrency", "zero"],
      env: { DATABASE_URL: `postgres://u:${PASSWORD}@127.0.0.1:${freePort()}/db` },
      says: 'Invalid --concurrency: "zero"',
    },
  ];
  await runAll(cases, "", 2);
});

Deno.test("bad payloads, names, keys, cron strings and time zones on the command line exit 2 with one line", async () => {
  const url = `postgres://alice:${PASSWORD}@127.0.0.1:${freePort()}/nowhere`;
  const deep = '{"a":'.repeat(1000) + "{}" + "}".repeat(1000);
  const enqueue = (...args: string[]) => ["enqueue", "--task", "t", ...args];
  const add = (...args: string[]) => ["schedule", "add", "s", "--task", "t", ...args];
  const cases: Case[] = [
    { args: enqueue("--payload", "null"), says: "expected a JSON object, got null" },
    { args: enqueue("--payload", '"s"'), says: "expected a JSON object, got string" },
    { args: enqueue("--payload", "42"), says: "expected a JSON object, got number" },
    { args: enqueue("--payload", deep), says: "nested deeper than 1000 levels" },
    {
      args: enqueue("--payload", JSON.stringify({ s: "x".repeat(200) }), "--max-payload", "100"),
      says: "over the limit of 100 bytes",
    },
    {
      args: enqueue("--payload", JSON.stringify({ s: "x".repeat(200) })),
      env: { SHOAL_MAX_PAYLOAD: "100" },
      says: "over the limit of 100 bytes",
    },
    {
      args: enqueue("--key", "k".repeat(513)),
      says: "Invalid --key: expected a string of 1 to 512",
    },
    { args: enqueue("--run-at", "yesterday"), says: 'Invalid --run-at: "yesterday"' },
    { args: enqueue("--priority=-40000"), says: "Invalid --priority: -40000 is below" },
    { args: ["enqueue", "--task", INJECTIONS[0]!], says: "Invalid --task" },
    { args: enqueue("--queue", INJECTIONS[1]!), says: "Invalid --queue" },
    { args: add("--cron", "61 * * * *"), says: 'Cannot parse cron expression "61 * * * *"' },
    { args: add("--cron", "* * * *"), says: "expected 5 fields" },
    { args: add("--cron", "0 0 * * *\nfoo"), says: 'Cannot parse cron expression "0 0 * * * foo"' },
    { args: add("--cron", "* * * * *", "--tz", "Mars/Olympus"), says: "Invalid time zone" },
    { args: add("--cron", "* * * * *", "--tz", "Europe/Paris\nx"), says: "Invalid time zone" },
    {
      args: ["schedule", "add", INJECTIONS[0]!, "--cron", "* * * * *", "--task", "t"],
      says: "Invalid schedule name",
    },
    { args: ["dead", "retry", "1; drop table canary"], says: "takes one job id" },
    { args: ["dead", "list", "--queue", INJECTIONS[2]!], says: "Invalid --queue" },
    { args: ["cancel", "1 or 1=1"], says: "shoal cancel takes one execution id" },
  ];
  await runAll(cases, url, 2);
});

Deno.test("against a real database: injection strings find nothing or are stored literally, and Postgres's own payload limit is one line", async () => {
  await using db = await testDb();
  await db.sql`create table canary (x integer)`;
  await db.sql`insert into canary values (1)`;
  const text = INJECTIONS[0]!;
  for (const sub of ["pause", "resume", "rm"]) {
    const { code, stderr } = await runShoal(["schedule", sub, text], { url: db.url });
    assertEquals(code, 1, stderr);
    assertOneLine(stderr, `No schedule named ${text}`, `schedule ${sub}`);
  }
  const stored = await runShoal(
    ["enqueue", "--task", "t", "--key", text, "--fairness-key", text, "--payload", '{"k":"\'"}'],
    { url: db.url },
  );
  assertEquals(stored.code, 0, stored.stderr);
  const [row] = await db.sql<{ key: string; fairness_key: string }[]>`
    select key, fairness_key from shoal.jobs where id = ${stored.stdout.trim()}::bigint`;
  assertEquals(row, { key: text, fairness_key: text });
  // The database's limit is its own (shoal.max_payload_bytes), even when --max-payload is larger.
  await db.sql.unsafe(`alter database ${db.name} set shoal.max_payload_bytes = '100'`);
  const refused = await runShoal(
    ["enqueue", "--task", "t", "--max-payload", "5000", "--payload", `{"s":"${"x".repeat(200)}"}`],
    { url: db.url },
  );
  assertEquals(refused.code, 1, refused.stderr);
  assertOneLine(refused.stderr, "over the limit of 100 bytes", "enqueue over the SQL limit");
  const [canary] = await db.sql<{ n: number }[]>`select count(*)::int as n from canary`;
  assertEquals(canary?.n, 1);
  const [jobs] = await db.sql<{ n: number }[]>`select count(*)::int as n from shoal.jobs`;
  assertEquals(jobs?.n, 1);
});
