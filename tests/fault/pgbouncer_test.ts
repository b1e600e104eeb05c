/**
 * Fault 5: PgBouncer (Debian's package) in transaction pooling mode between shoal and
 * Postgres. Every statement may land on a different server connection: no session state,
 * no LISTEN (`--no-listen`), no named prepared statements (`--no-prepare`). The mixed run
 * passes through it. A machine without pgbouncer fails this test, never skips it.
 */
import { assert } from "../assert.ts";
import { freePort, sleep, testDb, waitFor } from "../helpers.ts";
import { MixedRun, report, type Role } from "./harness.ts";

/** Where Debian puts pgbouncer (/usr/sbin), or anywhere on PATH. */
async function findPgBouncer(): Promise<string> {
  const dirs = [...(Deno.env.get("PATH") ?? "").split(":"), "/usr/sbin", "/usr/bin"];
  for (const dir of dirs.filter((d) => d !== "")) {
    try {
      await Deno.stat(`${dir}/pgbouncer`);
      return `${dir}/pgbouncer`;
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    }
  }
  throw new Error(
    "pgbouncer is not installed: the fault suite needs it (Debian: apt-get install -y pgbouncer)",
  );
}

interface Bouncer {
  /** `url` rewritten to go through PgBouncer. */
  url: string;
  /** The pooler's log so far. */
  log(): Promise<string>;
  [Symbol.asyncDispose](): Promise<void>;
}

/**
 * Start PgBouncer as the postgres OS user (it refuses to run as root) on a free loopback
 * port, in transaction pooling mode, in front of the server `url` names.
 */
async function startPgBouncer(url: string): Promise<Bouncer> {
  const bin = await findPgBouncer();
  const target = new URL(url);
  const dir = await Deno.makeTempDir({ prefix: "shoal-pgbouncer-" });
  const uid = Number(
    new TextDecoder().decode(
      (await new Deno.Command("id", { args: ["-u", "postgres"] }).output())
        .stdout,
    ).trim(),
  );
  await Deno.chown(dir, uid, null);
  await Deno.chmod(dir, 0o755);
  const port = freePort();
  const logFile = `${dir}/pgbouncer.log`;
  await Deno.writeTextFile(`${dir}/userlist.txt`, '"postgres" ""\n');
  await Deno.writeTextFile(
    `${dir}/pgbouncer.ini`,
    [
      "[databases]",
      `* = host=127.0.0.1 port=${target.port}`,
      "[pgbouncer]",
      "listen_addr = 127.0.0.1",
      `listen_port = ${port}`,
      "unix_socket_dir =",
      "auth_type = trust",
      `auth_file = ${dir}/userlist.txt`,
      "pool_mode = transaction",
      "max_client_conn = 500",
      "default_pool_size = 20",
      "ignore_startup_parameters = extra_float_digits,options",
      `logfile = ${logFile}`,
      `pidfile = ${dir}/pgbouncer.pid`,
      "",
    ].join("\n"),
  );
  const child = new Deno.Command("runuser", {
    args: ["-u", "postgres", "--", bin, `${dir}/pgbouncer.ini`],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  const readLog = async () => {
    try {
      return await Deno.readTextFile(logFile);
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) return "";
      throw error;
    }
  };
  let exited = false;
  const status = child.status.then((s) => {
    exited = true;
    return s;
  });
  try {
    await waitFor(
      "pgbouncer to listen",
      async () => {
        if (exited) throw new Error(`pgbouncer exited at start:\n${await readLog()}`);
        const conn = await Deno.connect({ hostname: "127.0.0.1", port });
        conn.close();
        return true;
      },
      20_000,
      100,
    );
  } catch (error) {
    child.kill("SIGKILL");
    await status;
    throw error;
  }
  const via = new URL(url);
  via.port = String(port);
  return {
    url: via.toString(),
    log: readLog,
    async [Symbol.asyncDispose]() {
      if (!exited) child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
      await status;
      clearTimeout(timer);
      await Deno.remove(dir, { recursive: true });
    },
  };
}

/** Behind a transaction pooler: no LISTEN, no named prepared statements. */
function pooledFlags(role: Role): string[] {
  return role === "reaper" ? ["--no-prepare"] : ["--no-listen", "--no-prepare"];
}

Deno.test("the mixed run passes through PgBouncer in transaction pooling mode", async () => {
  const started = Date.now();
  await using db = await testDb();
  await using bouncer = await startPgBouncer(db.url);
  await using run = await MixedRun.prepare({ url: bouncer.url, sql: db.sql, flags: pooledFlags });
  await run.start();
  await run.waitForSlots(2);
  await run.enqueueWave(60);
  await sleep(2000);
  await run.enqueueWave(60);
  await run.finish();
  const figures = await run.check();
  const logins = (await bouncer.log()).split("\n").filter((l) => l.includes(`db=${db.name}`));
  assert(logins.length >= run.members.length, `only ${logins.length} logins through pgbouncer`);
  report("through PgBouncer (transaction pooling)", figures, started);
});
