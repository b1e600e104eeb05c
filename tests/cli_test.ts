/**
 * The command line end to end: real `main.ts` processes for usage errors, an unreachable
 * database, configuration precedence and the admin commands (migrate, enqueue, status,
 * dead list|retry|purge).
 */
import { assert, assertEquals } from "./assert.ts";
import {
  emptyDb,
  exitWithin,
  freePort,
  logLines,
  runShoal,
  spawnShoal,
  testDb,
  waitForOutput,
} from "./helpers.ts";
import { isConnectionError } from "../lib/db.ts";
import { claim, enqueue, fail } from "../lib/queue.ts";
import type { Sql } from "../lib/db.ts";

/** Exactly one line on stderr, prefixed "shoal: ", and no stack frame. */
function assertOneLine(stderr: string, includes: string): void {
  const lines = stderr.split("\n");
  assertEquals(lines.length, 2, `expected one line on stderr, got:\n${stderr}`);
  assertEquals(lines[1], "");
  assert(lines[0]!.startsWith("shoal: "), stderr);
  assert(lines[0]!.includes(includes), `expected "${includes}" in: ${stderr}`);
  assert(!/\bat .+:\d+:\d+/.test(stderr), `stack trace on stderr:\n${stderr}`);
}

Deno.test("bad flags and values exit 2 with one line on stderr", async () => {
  // A URL nobody listens on: none of these may get as far as connecting.
  const url = `postgres://alice:s3cret@127.0.0.1:${freePort()}/nowhere`;
  const cases: { args: string[]; env?: Record<string, string>; says: string }[] = [
    { args: ["--role", "consumer", "--bogus"], says: "Unknown option '--bogus'" },
    {
      args: ["--role", "consumer", "--visibility-timeout", "10"],
      says: 'Invalid --visibility-timeout: Cannot parse duration "10"',
    },
    {
      args: ["--role", "consumer", "--task-timeout", "30d"],
      says: "Invalid --task-timeout: 30d is too long (at most 24d)",
    },
    {
      args: ["--role", "consumer", "--concurrency", "two"],
      says: 'Invalid --concurrency: "two" is not an integer',
    },
    { args: ["--role", "consumer", "--concurrency", "0"], says: "Invalid --concurrency: 0" },
    {
      args: ["--role", "consumer", "--poll-interval"],
      says: "'--poll-interval <value>' argument missing",
    },
    {
      args: ["migrate", "--concurrency", "3"],
      says: "Invalid flag --concurrency: shoal migrate does not take it",
    },
    { args: ["--role", "nope"], says: 'Invalid --role: "nope" is not one of' },
    { args: ["frobnicate"], says: 'Unknown command "frobnicate"' },
    { args: [], says: "Nothing to do" },
    {
      args: ["--role", "consumer"],
      env: { SHOAL_CONCURRENCY: "abc" },
      says: 'Invalid SHOAL_CONCURRENCY: "abc" is not an integer',
    },
    {
      args: ["--role", "consumer"],
      env: { SHOAL_VISIBILITY_TIMEOUT: "30" },
      says: "Invalid SHOAL_VISIBILITY_TIMEOUT",
    },
    {
      args: ["migrate"],
      env: { DATABASE_URL: "not a url" },
      says: "Cannot parse the database URL",
    },
    {
      args: ["migrate"],
      env: { DATABASE_URL: "mysql://alice:s3cret@127.0.0.1/db" },
      says: 'scheme "mysql" is not postgres',
    },
    { args: ["enqueue"], says: "shoal enqueue needs --task" },
    { args: ["enqueue", "--task", "shoal.noop", "--payload", "[1]"], says: "Invalid payload" },
    { args: ["enqueue", "--task", "shoal.noop", "--payload", "{"], says: "Invalid --payload" },
    { args: ["enqueue", "--task", "bad name"], says: 'Invalid --task: "bad name"' },
    { args: ["dead", "retry", "abc"], says: "shoal dead retry takes one job id" },
    { args: ["status", "extra"], says: 'takes no argument "extra"' },
  ];
  const results = await Promise.all(
    cases.map((c) => runShoal(c.args, { env: { DATABASE_URL: url, ...c.env } })),
  );
  cases.forEach((c, i) => {
    const { code, stdout, stderr } = results[i]!;
    const what = `shoal ${c.args.join(" ")} ${JSON.stringify(c.env ?? {})}`;
    assertEquals(code, 2, `${what}: exit code, stderr:\n${stderr}`);
    assertEquals(stdout, "", what);
    assertOneLine(stderr, c.says);
    assert(!stderr.includes("s3cret"), `${what} leaked the password`);
  });
});

Deno.test("an unreachable database is one clear line naming the host, without the password", async () => {
  const port = freePort();
  const url = `postgres://alice:s3cret@127.0.0.1:${port}/nowhere`;
  // A role would first wait for the database (--startup-wait, tests/fault/outage_test.ts).
  const role = ["--role", "consumer", "--startup-wait", "0s"];
  for (const args of [["migrate"], ["status", "--json"], role]) {
    const { code, stdout, stderr } = await runShoal(args, { url });
    assertEquals(code, 1, stderr);
    assertEquals(stdout, "");
    assertOneLine(stderr, `Cannot reach the database at postgres://alice:***@127.0.0.1:${port}`);
    assert(!stderr.includes("s3cret"), stderr);
  }
});

Deno.test("isConnectionError() counts an unresolvable or unreachable host as a connection failure", () => {
  for (const code of ["ENOTFOUND", "EAI_AGAIN", "EHOSTUNREACH", "ECONNREFUSED", "08006"]) {
    assert(isConnectionError(Object.assign(new Error("x"), { code })), code);
  }
  assertEquals(isConnectionError(Object.assign(new Error("x"), { code: "23505" })), false);
});

Deno.test("flags win over SHOAL_* variables, which win over defaults; unused variables are ignored", async () => {
  await using db = await testDb();
  // An invalid variable for an option the command does not take is not read at all.
  const migrated = await runShoal(["migrate"], {
    url: db.url,
    env: { SHOAL_CONCURRENCY: "abc" },
  });
  assertEquals(migrated.code, 0, migrated.stderr);

  const common = ["--role", "consumer", "--log-format", "json", "--poll-interval", "100ms"];
  await using fromFlag = spawnShoal([...common, "--concurrency", "2"], {
    url: db.url,
    env: { SHOAL_CONCURRENCY: "abc" },
  });
  await using fromEnv = spawnShoal(common, { url: db.url, env: { SHOAL_CONCURRENCY: "3" } });
  await Promise.all([
    waitForOutput(fromFlag, "with concurrency 2"),
    waitForOutput(fromEnv, "with concurrency 3"),
  ]);
  fromFlag.kill("SIGTERM");
  fromEnv.kill("SIGTERM");
  assertEquals((await exitWithin(fromFlag, 20_000)).code, 0);
  assertEquals((await exitWithin(fromEnv, 20_000)).code, 0);
});

Deno.test("shoal migrate applies the schema once and is idempotent", async () => {
  await using db = await emptyDb();
  const first = await runShoal(["migrate"], { url: db.url });
  assertEquals(first.code, 0, first.stderr);
  assert(
    /^Applied migrations: 1(, \d+)*\nApplied function files: \w+\.sql(, \w+\.sql)*\n$/.test(
      first.stdout,
    ),
    first.stdout,
  );
  const second = await runShoal(["migrate"], { url: db.url });
  assertEquals(second.code, 0, second.stderr);
  assertEquals(second.stdout, "Schema is up to date\n");
  const [row] = await db.sql<{ n: number }[]>`select count(*)::int as n from shoal.migrations`;
  assertEquals(
    first.stdout.split("\n")[0],
    `Applied migrations: ${Array.from({ length: row!.n }, (_, i) => i + 1).join(", ")}`,
  );
});

Deno.test("shoal status refuses an unmigrated database with run shoal migrate", async () => {
  await using db = await emptyDb();
  const { code, stderr } = await runShoal(["status"], { url: db.url });
  assertEquals(code, 1);
  assertOneLine(stderr, "run shoal migrate");
});

Deno.test("every admin command that needs the schema refuses an unmigrated database; migrate does not", async () => {
  await using db = await emptyDb();
  // Each command declares what it needs of the database (lib/cli.ts DbCommand.needs).
  const needSchema = [
    ["enqueue", "--task", "t"],
    ["cancel", "1"],
    ["dead", "list"],
    ["dead", "retry", "1"],
    ["dead", "purge", "--all"],
    ["schedule", "add", "s", "--cron", "* * * * *", "--task", "t"],
    ["schedule", "list"],
    ["schedule", "pause", "s"],
    ["schedule", "resume", "s"],
    ["schedule", "rm", "s"],
  ];
  for (const args of needSchema) {
    const { code, stdout, stderr } = await runShoal(args, { url: db.url });
    assertEquals([code, stdout], [1, ""], `shoal ${args.join(" ")}: ${stderr}`);
    // Only what the command accepts: `--migrate` is a role's flag, not an admin command's.
    assertOneLine(stderr, "run shoal migrate");
    assert(!stderr.includes("--migrate"), `shoal ${args.join(" ")}: ${stderr}`);
  }
  const [schemas] = await db.sql<{ n: number }[]>`
    select count(*)::int as n from pg_namespace where nspname = 'shoal'`;
  assertEquals(schemas?.n, 0, "no command created the schema");
  const migrated = await runShoal(["migrate"], { url: db.url });
  assertEquals(migrated.code, 0, migrated.stderr);
  assert(migrated.stdout.startsWith("Applied migrations: 1, "), migrated.stdout);
});

Deno.test("shoal enqueue prints the job id, and the same id again for a held dedupe key", async () => {
  await using db = await testDb();
  const plain = await runShoal(
    ["enqueue", "--task", "shoal.noop", "--queue", "mail", "--payload", '{"to":"a@b.c"}'],
    { url: db.url },
  );
  assertEquals(plain.code, 0, plain.stderr);
  assert(/^\d+\n$/.test(plain.stdout), plain.stdout);
  const [job] = await db.sql<{ queue: string; task: string; payload: unknown }[]>`
    select queue, task, payload from shoal.jobs where id = ${plain.stdout.trim()}::bigint`;
  assertEquals(job, { queue: "mail", task: "shoal.noop", payload: { to: "a@b.c" } });

  const keyed = ["enqueue", "--task", "shoal.noop", "--key", "nightly-2024-01-01"];
  const a = await runShoal(keyed, { url: db.url });
  const b = await runShoal(keyed, { url: db.url });
  assertEquals([a.code, b.code], [0, 0], a.stderr + b.stderr);
  assert(/^\d+\n$/.test(a.stdout), a.stdout);
  assertEquals(b.stdout, a.stdout);
  assert(a.stdout !== plain.stdout);
  const [row] = await db.sql<{ n: number }[]>`
    select count(*)::int as n from shoal.jobs where key = 'nightly-2024-01-01'`;
  assertEquals(row!.n, 1);
});

Deno.test("shoal status --json keeps its contract keys", async () => {
  await using db = await testDb();
  await enqueue(db.sql, "shoal.noop", {}, { queue: "alpha" });
  await enqueue(db.sql, "shoal.noop", {}, { queue: "alpha", runAt: new Date(Date.now() + 3.6e6) });
  await enqueue(db.sql, "shoal.noop", {}, { queue: "beta" });
  await claim(db.sql, { queues: ["beta"], limit: 1, workerId: "test", visibilityMs: 60_000 });

  const { code, stdout, stderr } = await runShoal(["status", "--json"], { url: db.url });
  assertEquals(code, 0, stderr);
  const status = JSON.parse(stdout);
  assertEquals(Object.keys(status), ["queues", "executions", "leases", "schedules", "unserved"]);
  const keys = ["queue", "ready", "scheduled", "running", "dead", "oldest_ready_age_s"];
  for (const q of status.queues) assertEquals(Object.keys(q).sort(), [...keys].sort());
  const [alpha, beta] = status.queues;
  assertEquals({ ...alpha, oldest_ready_age_s: 0 }, {
    queue: "alpha",
    ready: 1,
    scheduled: 1,
    running: 0,
    dead: 0,
    oldest_ready_age_s: 0,
  });
  assertEquals(typeof alpha.oldest_ready_age_s, "number");
  assert(alpha.oldest_ready_age_s >= 0);
  assertEquals(beta, {
    queue: "beta",
    ready: 0,
    scheduled: 0,
    running: 1,
    dead: 0,
    oldest_ready_age_s: 0,
  });

  const human = await runShoal(["status"], { url: db.url });
  assertEquals(human.code, 0, human.stderr);
  assert(human.stdout.startsWith("queue"), human.stdout);
  assert(human.stdout.includes("alpha") && human.stdout.includes("beta"), human.stdout);
});

/** Enqueue a job and fail it permanently, as a consumer would; returns its id. */
async function deadJob(sql: Sql, queue: string): Promise<string> {
  const id = await enqueue(sql, "shoal.noop", { n: 1 }, { queue });
  const { jobs: [job] } = await claim(sql, {
    queues: [queue],
    limit: 1,
    workerId: "test",
    visibilityMs: 60_000,
  });
  assertEquals(job?.id, id);
  assertEquals(
    await fail(sql, job!, { error: "Error: gave up", retryInMs: 0, permanent: true }),
    "dead",
  );
  return id;
}

Deno.test("shoal dead list, retry and purge work on the dead-letter table", async () => {
  await using db = await testDb();
  const none = await runShoal(["dead", "list"], { url: db.url });
  assertEquals([none.code, none.stdout], [0, "No dead jobs\n"], none.stderr);

  const id = await deadJob(db.sql, "reports");
  const listed = await runShoal(["dead", "list", "--json"], { url: db.url });
  assertEquals(listed.code, 0, listed.stderr);
  const rows = JSON.parse(listed.stdout);
  assertEquals(rows.length, 1);
  assertEquals(
    [rows[0].id, rows[0].queue, rows[0].task, rows[0].reason, rows[0].attempts],
    [id, "reports", "shoal.noop", "Error: gave up", 1],
  );
  const other = await runShoal(["dead", "list", "--json", "--queue", "elsewhere"], {
    url: db.url,
  });
  assertEquals(JSON.parse(other.stdout), []);

  const retried = await runShoal(["dead", "retry", id], { url: db.url });
  assertEquals([retried.code, retried.stdout], [0, `Retried job ${id}\n`], retried.stderr);
  const [back] = await db.sql<{ attempts: number; visible: boolean }[]>`
    select attempts, run_at <= now() as visible from shoal.jobs where id = ${id}::bigint`;
  assertEquals(back, { attempts: 0, visible: true });
  const again = await runShoal(["dead", "retry", id], { url: db.url });
  assertEquals(again.code, 1);
  assertOneLine(again.stderr, `No dead job ${id}`);

  // Other queues than the retried job's, so the claims inside deadJob() cannot pick it.
  await deadJob(db.sql, "later");
  await deadJob(db.sql, "other");
  const kept = await runShoal(["dead", "purge", "--older-than", "1h"], { url: db.url });
  assertEquals([kept.code, kept.stdout], [0, "Purged 0 dead jobs\n"], kept.stderr);
  const one = await runShoal(["dead", "purge", "--queue", "other"], { url: db.url });
  assertEquals([one.code, one.stdout], [0, "Purged 1 dead jobs\n"], one.stderr);
  // Every dead job goes only when asked for by name.
  for (const args of [["dead", "purge"], ["dead", "purge", "--all", "--queue", "later"]]) {
    const refused = await runShoal(args, { url: db.url });
    assertEquals([refused.code, refused.stdout], [2, ""], args.join(" "));
    assertOneLine(refused.stderr, "--all for every dead job");
  }
  const rest = await runShoal(["dead", "purge", "--all"], { url: db.url });
  assertEquals([rest.code, rest.stdout], [0, "Purged 1 dead jobs\n"], rest.stderr);
  const [left] = await db.sql<{ n: number }[]>`select count(*)::int as n from shoal.dead_jobs`;
  assertEquals(left!.n, 0);
});

Deno.test("shoal --help prints usage on stdout and exits 0", async () => {
  const { code, stdout, stderr } = await runShoal(["--help"]);
  assertEquals([code, stderr], [0, ""]);
  assert(stdout.startsWith("shoal: a Postgres-native task queue"), stdout);
  assert(stdout.includes("--visibility-timeout"), stdout);
});

/** Start a consumer with these extra flags, wait for `text`, stop it with SIGTERM. */
async function consumerLog(
  url: string,
  flags: string[],
  text: string,
  env: Record<string, string> = {},
): Promise<string> {
  await using proc = spawnShoal(["--role", "consumer", "--poll-interval", "100ms", ...flags], {
    url,
    env,
  });
  await waitForOutput(proc, text);
  proc.kill("SIGTERM");
  const { code, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 0, output);
  return output;
}

Deno.test("--log-format json writes only JSON lines with the fixed keys", async () => {
  await using db = await testDb();
  const output = await consumerLog(db.url, ["--log-format", "json"], "started on");
  const lines = output.split("\n").filter((l) => l !== "");
  assert(lines.length >= 3, output);
  const records = lines.map((line) => JSON.parse(line) as Record<string, unknown>);
  for (const record of records) {
    for (const key of ["@timestamp", "level", "logger", "message"]) {
      assert(key in record, `${key} missing from ${JSON.stringify(record)}`);
    }
  }
  const started = records.find((r) => String(r.message).startsWith("Consumer "))!;
  assertEquals([started.level, started.logger, started.concurrency], [
    "INFO",
    "shoal.consumer",
    10,
  ]);
});

Deno.test("--log-format pretty (or SHOAL_LOG_FORMAT) writes readable lines, not JSON", async () => {
  await using db = await testDb();
  for (
    const [flags, env] of [[["--log-format", "pretty"], {}], [[], {
      SHOAL_LOG_FORMAT: "pretty",
    }]] as const
  ) {
    const output = await consumerLog(db.url, [...flags], "started on", env);
    const lines = output.split("\n").filter((l) => l !== "");
    assert(lines.length >= 3, output);
    for (const line of lines) assert(!line.startsWith("{"), `JSON in pretty output: ${line}`);
    const started = lines.find((l) => l.includes("Consumer "))!;
    assert(
      /^\d{4}-\d\d-\d\d .*INF.*shoal.consumer: Consumer \S+ started on default/.test(started),
      started,
    );
  }
});

Deno.test("--log-level (or SHOAL_LOG_LEVEL) drops records below it", async () => {
  await using db = await testDb();
  // An unregistered task fails each attempt: a warning, while start and stop are info.
  await enqueue(db.sql, "no.such.task", {}, { maxAttempts: 5 });
  for (
    const [flags, env] of [[["--log-level", "warning"], {}], [[], {
      SHOAL_LOG_LEVEL: "warning",
    }]] as const
  ) {
    const output = await consumerLog(
      db.url,
      ["--log-format", "json", ...flags],
      "failed on attempt",
      env,
    );
    const levels = new Set(logLines(output).map((r) => r.level));
    assert(levels.has("WARN"), output);
    assert(!levels.has("INFO"), output);
    await db.sql`update shoal.jobs set run_at = now()`; // due again for the second run
  }
  const debug = await consumerLog(
    db.url,
    ["--log-format", "json", "--log-level", "debug"],
    "started on",
  );
  assert(logLines(debug).some((r) => r.level === "INFO"), debug);
});

Deno.test("a bad --log-level or --log-format exits 2 naming the choices", async () => {
  const url = `postgres://u@127.0.0.1:${freePort()}/x`;
  const format = await runShoal(["--role", "consumer", "--log-format", "xml"], { url });
  assertEquals([format.code, format.stderr], [
    2,
    'shoal: Invalid --log-format: "xml" is not one of json, pretty\n',
  ]);
  const level = await runShoal(["status"], { url, env: { SHOAL_LOG_LEVEL: "loud" } });
  assertEquals([level.code, level.stderr], [
    2,
    'shoal: Invalid SHOAL_LOG_LEVEL: "loud" is not one of trace, debug, info, warning, error, fatal\n',
  ]);
});
