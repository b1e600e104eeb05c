/**
 * Security (issue 6): no secret reaches a log line, an error message, `shoal status` or a
 * job's stored error, and what shoal serves over HTTP binds loopback unless told otherwise.
 *
 * The secret is a real database password: the test starts its own Postgres (the shared test
 * cluster trusts every local connection, so a wrong password would pass there), requires
 * scram-sha-256 for one role, and then runs shoal with the right password, a wrong one, an
 * unreachable host, a bad flag alongside, and a connection killed mid-run. Every byte of
 * every process's stdout and stderr, and every text column shoal wrote, is searched for
 * the password (raw and percent-encoded) and for the wrong one.
 *
 * The least-privilege setup (deploy/postgres/roles.sql) is proven by tests/deploy_test.ts.
 */
import postgres from "postgres";
import { assert, assertEquals } from "../assert.ts";
import {
  exitWithin,
  freePort,
  logLines,
  runShoal,
  spawnShoal,
  waitFor,
  waitForOutput,
} from "../helpers.ts";
import { startLocalPg } from "../../lib/local_pg.ts";
import { enqueue } from "../../lib/queue.ts";
import { connect } from "../../lib/db.ts";

const SECRET = `Sec${crypto.randomUUID().replaceAll("-", "").slice(0, 12)}`;
/** Needs percent-encoding in a URL: the encoded form is searched for too. */
const PASSWORD = `${SECRET}/p@ss:w0rd`;
const WRONG = `Wrong${crypto.randomUUID().replaceAll("-", "").slice(0, 12)}`;
const ROLE = "shoal_sec";

function urlFor(port: number, password: string, host = "127.0.0.1"): string {
  return `postgres://${ROLE}:${encodeURIComponent(password)}@${host}:${port}/sec`;
}

/** Fail if `text` holds the password (either form) or the wrong password. */
function assertNoSecret(text: string, what: string): void {
  for (const secret of [SECRET, encodeURIComponent(PASSWORD), WRONG]) {
    const at = text.indexOf(secret);
    assert(at < 0, `${what} leaked a password: ...${text.slice(Math.max(0, at - 200), at + 50)}`);
  }
}

function assertOneLine(stderr: string, says: string, what: string): void {
  const lines = stderr.split("\n");
  assertEquals(lines.length, 2, `${what}: expected one line on stderr, got:\n${stderr}`);
  assert(lines[0]!.startsWith("shoal: ") && lines[0]!.includes(says), `${what}: ${stderr}`);
  assert(!/\bat .+:\d+:\d+/.test(stderr), `${what}: stack trace:\n${stderr}`);
}

Deno.test("no database password reaches a log line, an error message, shoal status or a stored error", async () => {
  await using pg = await startLocalPg({ fast: true });
  const admin = postgres(pg.url, { max: 1, onnotice: () => {} });
  try {
    await admin.unsafe(`create role ${ROLE} login password '${PASSWORD.replaceAll("'", "''")}'`);
    await admin.unsafe(`create database sec owner ${ROLE}`);
    // This role must prove its password; the rest of the cluster keeps trust auth.
    const [{ hba_file: hba }] = await admin<{ hba_file: string }[]>`show hba_file` as unknown as [
      { hba_file: string },
    ];
    const rules = await Deno.readTextFile(hba);
    await Deno.writeTextFile(hba, `host all ${ROLE} 127.0.0.1/32 scram-sha-256\n${rules}`);
    await admin`select pg_reload_conf()`;
  } finally {
    await admin.end();
  }
  const good = urlFor(pg.port, PASSWORD);
  const wrong = urlFor(pg.port, WRONG);
  const outputs: [string, string][] = [];
  const run = async (args: string[], url: string, env: Record<string, string> = {}) => {
    const result = await runShoal(args, { url, env });
    outputs.push([`shoal ${args.join(" ")}`, result.stdout + result.stderr]);
    return result;
  };

  const migrated = await run(["migrate"], good);
  assertEquals(migrated.code, 0, migrated.stderr);

  // A wrong password: refused by Postgres, one line, exit 1, neither password shown.
  const commands = [
    ["migrate"],
    ["status"],
    ["status", "--json"],
    ["enqueue", "--task", "shoal.noop"],
    ["dead", "list"],
    ["schedule", "list"],
    ["--role", "consumer"],
    ["--role", "reaper"],
    ["--role", "scheduler"],
    ["--role", "all"],
    ["dev"],
  ];
  const refused = await Promise.all(commands.map((args) => run(args, wrong)));
  const says =
    `Cannot log in to the database at postgres://${ROLE}:***@127.0.0.1:${pg.port}/sec: ` +
    `PostgresError: password authentication failed for user "${ROLE}" (28P01)`;
  refused.forEach((r, i) => {
    const what = `shoal ${commands[i]!.join(" ")} with a wrong password`;
    assertEquals(r.code, 1, `${what}: ${r.stderr}`);
    assertOneLine(r.stderr, says, what);
  });
  // shoal dev offers its own database instead.
  assertOneLine(refused.at(-1)!.stderr, `${says}; to use a local database instead`, "shoal dev");
  // The URL as a flag, on an unreachable port, with the password as a query parameter too,
  // and a bad flag beside the good URL.
  const unreachable = `${urlFor(freePort(), PASSWORD)}?password=${encodeURIComponent(PASSWORD)}`;
  const others = await Promise.all([
    run(["status", "--database-url", wrong], ""),
    run(["status"], unreachable),
    // A role waits for the database first: its waiting lines are searched too, then it gives up.
    run(["--role", "scheduler", "--startup-wait", "3s"], unreachable),
    run(["--role", "consumer", "--concurrency", "x"], good),
    run(["enqueue", "--task", "t"], urlFor(pg.port, PASSWORD, "[::1")),
  ]);
  assertEquals(others.map((r) => r.code), [1, 1, 1, 2, 2]);
  assertOneLine(others[1]!.stderr, "Cannot reach the database at postgres://shoal_sec:***@", "");

  // A good run that fails jobs, loses its connections once and is asked for its status.
  const sql = connect(good, { applicationName: "shoal security test", max: 2 });
  try {
    await enqueue(sql, "shoal.fail", { message: "boom" }, { maxAttempts: 1 });
    await enqueue(sql, "no.such_task", {}, { maxAttempts: 1 });
    await using proc = spawnShoal([
      "--role",
      "all",
      "--log-level",
      "debug",
      "--poll-interval",
      "100ms",
      "--interval",
      "200ms",
      "--lease",
      "2s",
      "--shutdown-grace",
      "1s",
    ], { url: good });
    await waitForOutput(proc, "Scheduler");
    await waitFor("both jobs dead-lettered", async () => {
      const [row] = await sql<{ n: number }[]>`select count(*)::int as n from shoal.dead_jobs`;
      return row!.n === 2;
    }, 20_000);
    await sql`
      select pg_terminate_backend(pid) from pg_stat_activity
      where application_name like 'shoal %' and application_name <> 'shoal security test'
        and datname = current_database()`;
    await enqueue(sql, "shoal.noop");
    await waitFor("a job after the reconnect to run", async () => {
      const [row] = await sql<{ n: number }[]>`select count(*)::int as n from shoal.jobs`;
      return row!.n === 0;
    }, 20_000);
    for (const args of [["status"], ["status", "--json"], ["dead", "list", "--json"]]) {
      const r = await run(args, good);
      assertEquals(r.code, 0, r.stderr);
    }
    proc.kill("SIGTERM");
    const { code, output } = await exitWithin(proc, 20_000);
    assertEquals(code, 0, output);
    assert(logLines(output).length > 10, "the run logged (at debug level)");
    outputs.push(["shoal --role all", output]);
    // Every text shoal stored: jobs, dead letters, schedules, executions, leases.
    const stored = await sql<{ t: string }[]>`
      select coalesce((select jsonb_agg(to_jsonb(j))::text from shoal.jobs j), '')
        || coalesce((select jsonb_agg(to_jsonb(d))::text from shoal.dead_jobs d), '')
        || coalesce((select jsonb_agg(to_jsonb(s))::text from shoal.schedules s), '')
        || coalesce((select jsonb_agg(to_jsonb(e))::text from shoal.executions e), '')
        || coalesce((select jsonb_agg(to_jsonb(l))::text from shoal.leases l), '') as t`;
    assert(stored[0]!.t.includes("boom"), "the stored errors were read");
    assertNoSecret(stored[0]!.t, "a stored row");
  } finally {
    await sql.end({ timeout: 5 });
  }
  assert(outputs.length >= 17, `${outputs.length} runs`);
  for (const [what, text] of outputs) assertNoSecret(text, what);
});

Deno.test("--http with no address binds 127.0.0.1:9464, not every interface", async () => {
  // No database: the server starts (or fails to bind) before the database is touched.
  const url = `postgres://u:${SECRET}@127.0.0.1:${freePort()}/nowhere`;
  for (const [args, env] of [[["--http"], {}], [[], { SHOAL_HTTP: "true" }]] as const) {
    await using proc = spawnShoal(["--role", "reaper", ...args], {
      url,
      env: { ...env, SHOAL_LOG_LEVEL: "info" },
    });
    // Either it serves on the default, or another process holds that port: both name it.
    const address = await waitFor("the HTTP server to start or refuse", () => {
      const served = logLines(proc.output()).find((l) => String(l.message).startsWith("Serving"));
      if (served) return String(served.address);
      const refused = /Cannot serve HTTP on (\S+):/.exec(proc.output());
      return refused?.[1];
    }, 20_000);
    assertEquals(address, "127.0.0.1:9464");
    // Not reachable on any other address of this host.
    const others = Deno.networkInterfaces()
      .filter((i) => i.family === "IPv4" && !i.address.startsWith("127."))
      .map((i) => i.address);
    for (const hostname of others) {
      const reached = await Deno.connect({ hostname, port: 9464 }).then(
        (conn) => (conn.close(), true),
        () => false,
      );
      assertEquals(reached, false, `reachable on ${hostname}:9464`);
    }
    proc.kill("SIGTERM");
    const { output } = await exitWithin(proc, 20_000);
    assertNoSecret(output, "the --http process");
    assert(!output.includes(SECRET), output);
  }
});
