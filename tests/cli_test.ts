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
import { defaultLogFormat } from "../lib/log.ts";
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
    {
      args: ["enqueue", "--task", "shoal.noop", "--payload", "[1]"],
      says: "Invalid --payload: expected a JSON object, got array",
    },
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

Deno.test("an unreachable database is one clear line naming it, without the password, for every command and role", async () => {
  const port = freePort();
  const url = `postgres://alice:s3cret@127.0.0.1:${port}/nowhere`;
  // A role would first wait for the database (--startup-wait, tests/fault/outage_test.ts).
  const now = ["--startup-wait", "0s"];
  const commands = [
    ["migrate"],
    ["status"],
    ["status", "--json"],
    ["status", "--watch"],
    ["enqueue", "--task", "shoal.noop"],
    ["execution", "start", "--task", "shoal.noop", "--key", "k"],
    ["execution", "show", "1"],
    ["cancel", "1"],
    ["dead", "list"],
    ["dead", "retry", "1"],
    ["dead", "purge", "--all"],
    ["schedule", "add", "s", "--cron", "* * * * *", "--task", "shoal.noop"],
    ["schedule", "list"],
    ["schedule", "rm", "s"],
    ["queue", "pause", "q"],
    ["queue", "list"],
    ["limit", "set", "q", "1"],
    ["limit", "rate", "q", "1", "--per", "1s"],
    ["limit", "hold", "q", "--key", "k", "--for", "1s"],
    ["limit", "weight", "q", "2", "--key", "k"],
    ["limit", "list"],
    ["--role", "consumer", ...now],
    ["--role", "reaper", ...now],
    ["--role", "scheduler", ...now],
    ["--role", "all", ...now],
  ];
  const results = await Promise.all(commands.map((args) => runShoal(args, { url })));
  const says =
    `shoal: Cannot reach the database at postgres://alice:***@127.0.0.1:${port}/nowhere: ` +
    `Error: connect ECONNREFUSED 127.0.0.1:${port}\n`;
  results.forEach(({ code, stdout, stderr }, i) => {
    const what = `shoal ${commands[i]!.join(" ")}`;
    assertEquals([code, stdout, stderr], [1, "", says], what);
  });

  // shoal dev given that database: the same line, and how to use a local one instead.
  const dev = await runShoal(["dev"], { url });
  assertEquals(dev.code, 1, dev.stderr);
  assertOneLine(
    dev.stderr,
    says.trimEnd() +
      "; to use a local database instead, leave DATABASE_URL empty and --database-url out (`DATABASE_URL= deno task dev`)",
  );
  assert(!(dev.stdout + dev.stderr).includes("s3cret"), dev.stdout);
});

Deno.test("a refused login or a refused statement is one line naming the database, without the password", async () => {
  await using db = await testDb();
  const role = `shoal_nopriv_${crypto.randomUUID().slice(0, 8)}`;
  await db.sql.unsafe(`create role ${role} login`); // no privilege on the shoal schema
  try {
    const as = (user: string, database = db.name) => {
      const u = new URL(db.url);
      [u.username, u.password, u.pathname] = [user, "s3cret", `/${database}`];
      return u.toString();
    };
    const where = (user: string, database = db.name) => as(user, database).replace("s3cret", "***");
    const cases = [
      {
        url: as("shoal_no_such_role"),
        says: `Cannot log in to the database at ${where("shoal_no_such_role")}: ` +
          `PostgresError: role "shoal_no_such_role" does not exist (28000)`,
      },
      {
        url: as(role, "shoal_no_such_db"),
        says: `Cannot log in to the database at ${where(role, "shoal_no_such_db")}: ` +
          `PostgresError: database "shoal_no_such_db" does not exist (3D000)`,
      },
      {
        url: as(role),
        says: `Database error at ${where(role)}: ` +
          "PostgresError: permission denied for schema shoal (42501)",
      },
    ];
    for (const args of [["status"], ["--role", "consumer"]]) {
      for (const c of cases) {
        const { code, stderr } = await runShoal(args, { url: c.url });
        assertEquals([code, stderr], [1, `shoal: ${c.says}\n`], `shoal ${args.join(" ")}`);
      }
    }
  } finally {
    await db.sql.unsafe(`drop role ${role}`);
  }
});

Deno.test("with no database or shoal dev's stopped one, a command says where the local one is", async () => {
  const dir = await Deno.makeTempDir({ prefix: "shoal-cli-test-" });
  try {
    // No dev run here yet: how to get a local database.
    const none = await runShoal(["status"], { env: { DATABASE_URL: "", SHOAL_DIR: dir } });
    assertEquals(none.code, 2, none.stderr);
    assertOneLine(
      none.stderr,
      "No database: set DATABASE_URL or pass --database-url; or run `deno task dev` (`shoal dev`), which starts a local one and prints its DATABASE_URL",
    );
    // After a dev run (which keeps its port in <dir>/pg/port, tests/dev_test.ts): its URL.
    const port = freePort();
    await Deno.mkdir(`${dir}/pg`);
    await Deno.writeTextFile(`${dir}/pg/port`, `${port}\n`);
    const devUrl = `postgres://postgres@127.0.0.1:${port}/postgres`;
    const stored = await runShoal(["status"], { env: { DATABASE_URL: "", SHOAL_DIR: dir } });
    assertEquals(stored.code, 2, stored.stderr);
    assertOneLine(
      stored.stderr,
      `; the local one of \`deno task dev\` (\`shoal dev\`) is DATABASE_URL=${devUrl} while it runs`,
    );
    // That URL while dev is stopped: start it.
    const stopped = await runShoal(["status"], { url: devUrl, env: { SHOAL_DIR: dir } });
    assertEquals(stopped.code, 1, stopped.stderr);
    assertOneLine(
      stopped.stderr,
      `ECONNREFUSED 127.0.0.1:${port}; it is the local database of \`deno task dev\` (\`shoal dev\`): start that first`,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
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
    ["execution", "start", "--task", "t"],
    ["execution", "show", "1"],
    ["cancel", "1"],
    ["dead", "list"],
    ["dead", "retry", "1"],
    ["dead", "purge", "--all"],
    ["schedule", "add", "s", "--cron", "* * * * *", "--task", "t"],
    ["schedule", "list"],
    ["schedule", "pause", "s"],
    ["schedule", "resume", "s"],
    ["schedule", "rm", "s"],
    ["queue", "pause", "q"],
    ["queue", "resume", "q"],
    ["queue", "list"],
    ["limit", "set", "q", "1"],
    ["limit", "clear", "q"],
    ["limit", "rate", "q", "1", "--per", "1s"],
    ["limit", "unrate", "q"],
    ["limit", "hold", "q", "--key", "k", "--for", "1s"],
    ["limit", "weight", "q", "2", "--key", "k"],
    ["limit", "unweight", "q", "--key", "k"],
    ["limit", "list"],
    ["event", "emit", "e", "--key", "k"],
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
  // Claimed into a consumer's buffer, not started.
  await enqueue(db.sql, "shoal.noop", {}, { queue: "beta" });
  await claim(db.sql, {
    queues: ["beta"],
    limit: 1,
    workerId: "test",
    visibilityMs: 60_000,
    starting: 0,
  });

  const { code, stdout, stderr } = await runShoal(["status", "--json"], { url: db.url });
  assertEquals(code, 0, stderr);
  const status = JSON.parse(stdout);
  assertEquals(Object.keys(status), [
    "queues",
    "executions",
    "leases",
    "schedules",
    "unserved",
    "flow",
    "steps",
    "held",
    "progress",
  ]);
  assertEquals(status.flow, { paused: [], limits: [], rate_limits: [], holds: [], weights: [] });
  assertEquals(status.steps, { records: 0, jobs: 0, sleeping: 0, waiting: 0, exact: true });
  assertEquals(status.progress, []);
  const keys = [
    "queue",
    "ready",
    "scheduled",
    "running",
    "prefetched",
    "dead",
    "oldest_ready_age_s",
    "exact",
  ];
  for (const q of status.queues) assertEquals(Object.keys(q).sort(), [...keys].sort());
  const [alpha, beta] = status.queues;
  assertEquals({ ...alpha, oldest_ready_age_s: 0 }, {
    queue: "alpha",
    ready: 1,
    scheduled: 1,
    running: 0,
    prefetched: 0,
    dead: 0,
    oldest_ready_age_s: 0,
    exact: true,
  });
  assertEquals(typeof alpha.oldest_ready_age_s, "number");
  assert(alpha.oldest_ready_age_s >= 0);
  assertEquals(beta, {
    queue: "beta",
    ready: 0,
    scheduled: 0,
    running: 1,
    prefetched: 1,
    dead: 0,
    oldest_ready_age_s: 0,
    exact: true,
  });

  const human = await runShoal(["status"], { url: db.url });
  assertEquals(human.code, 0, human.stderr);
  assert(human.stdout.startsWith("queue"), human.stdout);
  assert(human.stdout.includes("alpha") && human.stdout.includes("beta"), human.stdout);
  assert(/^queue\s+ready\s+scheduled\s+running\s+prefetched\s+dead\s/.test(human.stdout));
  assert(/^beta\s+0\s+0\s+1\s+1\s+0\s/m.test(human.stdout), human.stdout);
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

Deno.test("defaultLogFormat() is pretty on a terminal and json otherwise", () => {
  assertEquals([defaultLogFormat(true), defaultLogFormat(false)], ["pretty", "json"]);
});

/**
 * Run shoal with its stdin, stdout and stderr on a pseudo-terminal (`script` of util-linux,
 * which every Debian has: missing, the test fails), and return what it wrote, lines ending
 * in "\n" again.
 */
async function runShoalOnTerminal(
  args: string[],
  env: Record<string, string> = {},
): Promise<{ code: number; output: string }> {
  const quote = (arg: string) => `'${arg.replaceAll("'", `'\\''`)}'`;
  const command = [Deno.execPath(), "run", "-A", new URL("../main.ts", import.meta.url).pathname]
    .concat(args).map(quote).join(" ");
  const result = await new Deno.Command("script", {
    args: ["--quiet", "--return", "--command", command, "/dev/null"],
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  const output = decoder.decode(result.stdout).replaceAll("\r\n", "\n");
  assertEquals(decoder.decode(result.stderr), "", "script itself complained");
  return { code: result.code, output };
}

Deno.test("logs are pretty on a terminal and JSON elsewhere unless --log-format or SHOAL_LOG_FORMAT says", async () => {
  // A role that waits for a database nobody serves logs a warning per attempt, then gives up.
  const args = [
    "--role",
    "reaper",
    "--startup-wait",
    "1s",
    "--database-url",
    `postgres://u:s3cret@127.0.0.1:${freePort()}/x`,
  ];
  const waiting = (output: string) =>
    output.split("\n").filter((line) => line.includes("Waiting for the database"));
  const pretty = /^\d{4}-\d\d-\d\d \S+ \S+ \[WRN\] shoal.db: Waiting for the database at /;
  const json = (line: string) => JSON.parse(line).logger === "shoal.db";

  const terminal = await runShoalOnTerminal(args);
  assertEquals(terminal.code, 1, terminal.output);
  assert(waiting(terminal.output).length > 0, terminal.output);
  for (const line of waiting(terminal.output)) assert(pretty.test(line), line);
  for (
    const asked of [
      await runShoalOnTerminal([...args, "--log-format", "json"]),
      await runShoalOnTerminal(args, { SHOAL_LOG_FORMAT: "json" }),
    ]
  ) {
    assert(waiting(asked.output).length > 0, asked.output);
    for (const line of waiting(asked.output)) assert(json(line), line);
  }

  // Not a terminal (a pipe here): JSON lines, or pretty when asked.
  const piped = await runShoal(args);
  assertEquals(piped.code, 1, piped.stderr);
  assert(waiting(piped.stderr).length > 0, piped.stderr);
  for (const line of waiting(piped.stderr)) assert(json(line), line);
  const askedPretty = await runShoal([...args, "--log-format", "pretty"]);
  assert(waiting(askedPretty.stderr).length > 0, askedPretty.stderr);
  for (const line of waiting(askedPretty.stderr)) assert(pretty.test(line), line);
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

Deno.test("shoal event emit stores the event and says how many waits received it; a bad name, key or payload exits 2 with one line", async () => {
  await using db = await testDb();
  const ok = await runShoal(
    ["event", "emit", "order.approved", "--key", "order-42", "--payload", '{"by":"ana"}'],
    { url: db.url },
  );
  assertEquals([ok.code, ok.stderr], [0, ""]);
  assertEquals(ok.stdout, "Event order.approved emitted: 0 waiting jobs received it\n");
  const rows = await db.sql<{ name: string; key: string; payload: unknown }[]>`
    select name, key, payload from shoal.events`;
  assertEquals([...rows], [{ name: "order.approved", key: "order-42", payload: { by: "ana" } }]);
  const noKey = await runShoal(["event", "emit", "deploy.done"], { url: db.url });
  assertEquals([noKey.code, noKey.stdout], [
    0,
    "Event deploy.done emitted: 0 waiting jobs received it\n",
  ]);

  const cases: { args: string[]; says: string }[] = [
    { args: ["event"], says: "shoal event takes emit NAME" },
    { args: ["event", "emit"], says: "shoal event emit takes one event name" },
    { args: ["event", "emit", "a", "b"], says: "shoal event emit takes one event name" },
    { args: ["event", "emit", "bad name"], says: "expected an event name" },
    {
      args: ["event", "emit", "e", "--key", "k".repeat(513)],
      says: "Invalid key for shoal event emit(): expected at most 512 characters, not 513",
    },
    { args: ["event", "emit", "e", "--payload", "{nope"], says: "Invalid --payload: not JSON" },
    { args: ["event", "emit", "e", "--payload", "[1]"], says: "expected a JSON object, got array" },
    {
      args: [
        "event",
        "emit",
        "e",
        "--payload",
        `{"x":"${"y".repeat(2000)}"}`,
        "--max-payload",
        "1024",
      ],
      says: "over the limit of 1024 bytes",
    },
    {
      args: ["event", "emit", "e", "--task", "t"],
      says: "Invalid flag --task: shoal event emit does not take it",
    },
  ];
  for (const { args, says } of cases) {
    const { code, stdout, stderr } = await runShoal(args, { url: db.url });
    assertEquals([code, stdout], [2, ""], `${args.join(" ")}: ${stderr}`);
    assertOneLine(stderr, says);
  }
  const [count] = await db.sql<{ n: number }[]>`select count(*)::integer as n from shoal.events`;
  assertEquals(count!.n, 2, "nothing refused was stored");
});
