/**
 * Multi-host database URLs (parsed, checked, redacted) and a standby used by mistake: a
 * role or a command pointed at a read-only standby says so in one line. The standby is a
 * real streaming replica (lib/local_pg.ts startLocalReplica).
 */
import postgres from "postgres";
import { assert, assertEquals } from "./assert.ts";
import {
  exitWithin,
  primaryAndReplica,
  runShoal,
  spawnShoal,
  waitForOutput,
  withApplicationName,
} from "./helpers.ts";
import { demoteLocalPg, startLocalPg } from "../lib/local_pg.ts";
import { loadMigrations, migrate } from "../lib/migrate.ts";
import {
  checkDatabaseUrl,
  connect,
  formatDatabaseUrl,
  namingDatabase,
  parseDatabaseUrl,
  redactUrl,
  waitForDatabase,
} from "../lib/db.ts";

function assertMatch(actual: string, pattern: RegExp): void {
  assert(pattern.test(actual), `${JSON.stringify(actual)} does not match ${pattern}`);
}

/** What `fn` throws (failing when it returns). */
function thrown(fn: () => unknown): Error {
  try {
    fn();
  } catch (error) {
    return error as Error;
  }
  throw new Error("Expected a throw");
}

const MULTI = "postgres://app:s3cret@db1.internal:5432,db2.internal:5433/jobs" +
  "?target_session_attrs=read-write&sslmode=require";

Deno.test("parseDatabaseUrl() keeps a host list and parses the rest with its first host", () => {
  const parts = parseDatabaseUrl(MULTI);
  assertEquals(parts.hosts, ["db1.internal:5432", "db2.internal:5433"]);
  assertEquals(parts.url.hostname, "db1.internal");
  assertEquals(parts.url.pathname, "/jobs");
  assertEquals(parts.url.searchParams.get("target_session_attrs"), "read-write");
  assertEquals(formatDatabaseUrl(parts), MULTI);
  assertEquals(parseDatabaseUrl("postgres://u@h/db").hosts, ["h"]);
  assertEquals(formatDatabaseUrl(parseDatabaseUrl("postgres://h1,h2")), "postgres://h1,h2");
  const ipv6 = "postgres://u@[::1]:5432,127.0.0.1:5433/db";
  assertEquals(formatDatabaseUrl(parseDatabaseUrl(ipv6)), ipv6);
});

Deno.test("checkDatabaseUrl() accepts a host list and refuses a malformed one in one line", () => {
  checkDatabaseUrl(MULTI);
  checkDatabaseUrl("postgresql://u@h1,h2/db");
  checkDatabaseUrl("postgres://u:p@db:5432/app"); // one host, as before
  for (
    const [url, message] of [
      ["postgres://u:pw@h1:5432,/db", /^Cannot use the database URL: host "" of its host list/],
      ["postgres://u:pw@h1,h2:port/db", /host "h2:port" of its host list is not host or host:port/],
      ["mysql://u:pw@h1,h2/db", /scheme "mysql" is not postgres or postgresql/],
      ["not a url", /^Cannot parse the database URL/],
      [
        "postgres://u:pw@h1,h2/db?target_session_attrs=master",
        /target_session_attrs "master" is not one of read-write, read-only, primary/,
      ],
    ] as const
  ) {
    const { message: said } = thrown(() => checkDatabaseUrl(url));
    assertMatch(said, message);
    assert(!said.includes(":pw@"), "the password was echoed");
  }
});

Deno.test("redactUrl() hides the password of a multi-host URL and keeps every host", () => {
  assertEquals(
    redactUrl(MULTI),
    "postgres://app:***@db1.internal:5432,db2.internal:5433/jobs" +
      "?target_session_attrs=read-write&sslmode=require",
  );
  assertEquals(
    redactUrl("postgres://app@h1,h2/jobs?password=s3cret"),
    "postgres://app@h1,h2/jobs?password=***",
  );
  assertEquals(redactUrl("postgres://:s3cret@h1,h2/db"), "postgres://:***@h1,h2/db");
  assertEquals(redactUrl("postgres://u:p@h1:5432,:x/db"), "(unparseable URL)");
});

Deno.test("withApplicationName() keeps the host list", () => {
  assertEquals(
    withApplicationName("postgres://u@h1:1,h2:2/db", "shoal x"),
    "postgres://u@h1:1,h2:2/db?application_name=shoal+x",
  );
});

const STANDBY =
  /^Cannot use the database at postgres:\/\/postgres@127\.0\.0\.1:\d+\/postgres: it is a read-only standby \(in recovery\); point the URL at the primary, or list every host with target_session_attrs=read-write$/;

Deno.test("a standby by mistake is one line: at a role's start, for a write, for a command", async () => {
  await using pair = await primaryAndReplica();
  const { primary, replica } = pair;
  const sql = connect(replica.url, { max: 1 });
  try {
    // A role's startup wait refuses it at once (no waiting: it is the URL to fix).
    const stop = new AbortController();
    const error = await waitForDatabase(sql, {
      url: replica.url,
      maxWaitMs: 60_000,
      stop: stop.signal,
    })
      .then(() => null, (e: unknown) => e);
    assertMatch((error as Error).message, STANDBY);
    // A statement refused as read-only (SQLSTATE 25006) is named the same way.
    const refused = await sql`insert into shoal.leases (name, holder, token, expires_at)
      values ('x', 'y', 1, now())`.then(() => null, (e: unknown) => e);
    assertEquals((refused as { code?: string }).code, "25006");
    assertMatch((namingDatabase(refused, replica.url) as Error).message, STANDBY);
  } finally {
    await sql.end();
  }

  // A real role process: one line on stderr, a non-zero exit, and no waiting.
  const role = await runShoal(["--role", "reaper", "--log-format", "json"], { url: replica.url });
  assertEquals(role.code, 1, role.stderr);
  assert(
    role.stderr.trim().split("\n").some((line) => STANDBY.test(line.replace(/^shoal: /, ""))),
    `no standby line:\n${role.stderr}`,
  );
  // A command that writes: the same line.
  const command = await runShoal(["enqueue", "--task", "t", "--queue", "q"], { url: replica.url });
  assertEquals(command.code, 1, command.stderr);
  assertMatch(command.stderr.trim().replace(/^shoal: /, ""), STANDBY); // one line, alone

  // Both hosts listed, the standby first: target_session_attrs=read-write keeps the primary
  // (postgres.js alone would keep the standby: lib/db.ts sessionAttrs()).
  const both = `postgres://postgres@127.0.0.1:${replica.port},127.0.0.1:${primary.port}/postgres` +
    `?target_session_attrs=read-write`;
  const multi = connect(both, { max: 2 });
  try {
    const rows = await multi<{ port: number; standby: boolean }[]>`
      select inet_server_port() as port, pg_is_in_recovery() as standby`;
    assertEquals([...rows], [{ port: primary.port, standby: false }]);
  } finally {
    await multi.end();
  }
  const enqueued = await runShoal(["enqueue", "--task", "t", "--queue", "q"], { url: both });
  assertEquals(enqueued.code, 0, enqueued.stderr);
  const direct = postgres(primary.url, { max: 1, onnotice: () => {} });
  try {
    const [row] = await direct<{ n: number }[]>`select count(*)::int as n from shoal.jobs`;
    assertEquals(row!.n, 1);
  } finally {
    await direct.end();
  }
});

/**
 * Start `role` on a primary named by a one-host URL, restart that server as a standby, and
 * check that the role stops with the one line: each role's loop meets the refusal on its
 * own first write (the consumer's claim, a leader's lease), so each is tested alone.
 */
async function standbyMidRun(role: "consumer" | "reaper", started: string): Promise<void> {
  await using pg = await startLocalPg({ fast: true });
  const setup = connect(pg.url, { max: 1 });
  try {
    await migrate(setup, await loadMigrations());
  } finally {
    await setup.end();
  }
  const flags = role === "consumer" ? ["--poll-interval", "500ms"] : ["--interval", "1s"];
  await using proc = spawnShoal(["--role", role, ...flags, "--log-format", "json"], {
    url: pg.url,
  });
  await waitForOutput(proc, started);
  // The URL's one host restarts as a standby: the pool reconnects to it, and every write is
  // refused (SQLSTATE 25006).
  await demoteLocalPg(pg, { fast: true });
  const { code, output } = await exitWithin(proc, 60_000);
  assertEquals(code, 1, output);
  const lines = output.trim().split("\n");
  const last = lines[lines.length - 1]!.replace(/^shoal: /, "");
  assertMatch(last, STANDBY);
  // Said once, at the end. Before it only the stopping role's own last writes (its lease
  // released, the consumer's catalog entry removed) fail, once each: nothing was retried.
  const refusals = lines.slice(0, -1).filter((line) => line.includes("read-only"));
  for (const line of refusals) {
    assert(!/retrying|next attempt|trying again/.test(line), `retried on a standby: ${line}`);
  }
  const messages = refusals.map((line) => String(JSON.parse(line).message));
  assertEquals(new Set(messages).size, messages.length, output);
  assert(messages.length <= 2, output);
}

Deno.test("a consumer whose database becomes a standby mid-run stops with the one line, not claim by claim", async () => {
  await standbyMidRun("consumer", "Consumer");
});

Deno.test("a reaper whose database becomes a standby mid-run stops with the one line, not lease by lease", async () => {
  await standbyMidRun("reaper", "Leading reaper");
});
