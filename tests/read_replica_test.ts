/**
 * `--read-database-url`: `shoal status`, a role's /metrics gauges and its dashboard's pages
 * read a real streaming replica (lib/local_pg.ts startLocalReplica), and say how far behind
 * it is; claims, acks and the dashboard's actions still go to the primary.
 *
 * The proof that a read came from the replica: its replay is paused
 * (pg_wal_replay_pause()), jobs are enqueued on the primary meanwhile, and the reads with
 * the flag still show the replica's older figures while those without it show the new
 * ones. Every page and gauge read on a standby also proves its statements write nothing (a
 * write there fails with 25006).
 */
import postgres from "postgres";
import { assert, assertEquals } from "./assert.ts";
import {
  enqueueLargeTable,
  httpGet,
  logLines,
  primaryAndReplica,
  runShoal,
  servedAt,
  spawnShoal,
  waitFor,
} from "./helpers.ts";
import { connect, type Sql } from "../lib/db.ts";
import type { Status } from "../lib/status.ts";
import { resolveOptions, UsageError } from "../lib/config.ts";

Deno.test("--read-database-url comes from SHOAL_READ_DATABASE_URL, checked as --database-url is", () => {
  const from = (value: string) =>
    resolveOptions("status", { positionals: [], flags: {} }, ["read-database-url"], {
      get: (name) => name === "SHOAL_READ_DATABASE_URL" ? value : undefined,
    })["read-database-url"];
  const replicas = "postgres://app:pw@r1:5432,r2:5432/shop";
  assertEquals(from(replicas), replicas); // a host list too
  let said = "";
  try {
    from("postgres://app:pw@r1:5432,:x/shop");
  } catch (error) {
    assert(error instanceof UsageError);
    said = (error as UsageError).message;
  }
  assert(/host ":x" of its host list .* \(--read-database-url\)$/.test(said), said);
  assert(!said.includes(":pw@"), said);
});

/** Jobs on queue `queue` as the server behind `sql` sees them. */
async function jobsOn(sql: Sql, queue: string): Promise<number> {
  const [row] = await sql<{ n: number }[]>`
    select count(*)::int as n from shoal.jobs where queue = ${queue}`;
  return row!.n;
}

/** `shoal status --json` against the primary, reading `readUrl` when given. */
async function statusJson(primaryUrl: string, readUrl?: string): Promise<Status> {
  const args = ["status", "--json", ...(readUrl ? ["--read-database-url", readUrl] : [])];
  const result = await runShoal(args, { url: primaryUrl });
  assertEquals(result.code, 0, result.stderr);
  return JSON.parse(result.stdout) as Status;
}

const readyOn = (s: Status, queue: string) => s.queues.find((q) => q.queue === queue)?.ready;

async function enqueue(url: string, queue: string, task: string, payload = "{}"): Promise<void> {
  const result = await runShoal(
    ["enqueue", "--queue", queue, "--task", task, "--payload", payload],
    { url },
  );
  assertEquals(result.code, 0, result.stderr);
}

Deno.test("--read-database-url: status, /metrics and dashboard pages read the replica; claims and actions the primary", async () => {
  await using pair = await primaryAndReplica();
  const { primary, replica } = pair;
  const onPrimary = connect(primary.url, { max: 2 });
  const onReplica = postgres(replica.url, { max: 1, onnotice: () => {} }) as unknown as Sql;
  try {
    // A bad read URL is a usage error naming the flag, its password never echoed.
    const bad = await runShoal(["status", "--read-database-url", "mysql://u:pw@h/db"], {
      url: primary.url,
    });
    assertEquals(bad.code, 2, bad.stderr);
    assert(bad.stderr.includes("(--read-database-url)"), bad.stderr);
    assert(!bad.stderr.includes(":pw@"), bad.stderr);

    for (let i = 0; i < 3; i++) await enqueue(primary.url, "reports", "never.served");
    await waitFor(
      "the replica to replay the jobs",
      async () => await jobsOn(onReplica, "reports") === 3,
    );

    // Caught up: the replica's figures, and its lag, in the JSON and the header.
    const caughtUp = await statusJson(primary.url, replica.url);
    assertEquals(readyOn(caughtUp, "reports"), 3);
    assertEquals(caughtUp.read_replica?.replica, true);
    assert(typeof caughtUp.read_replica?.lag_s === "number", JSON.stringify(caughtUp.read_replica));
    assertEquals((await statusJson(primary.url)).read_replica, undefined); // no flag: no key
    const text = await runShoal(["status", "--read-database-url", replica.url], {
      url: primary.url,
    });
    assertEquals(text.code, 0, text.stderr);
    assert(/^Read from a replica, \d+\.\ds behind the primary\n/.test(text.stdout), text.stdout);
    // A read URL naming the primary is allowed: nothing special said, its lag 0.
    const selfRead = await statusJson(primary.url, primary.url);
    assertEquals(selfRead.read_replica, { replica: false, lag_s: 0 });
    const selfText = await runShoal(["status", "--read-database-url", primary.url], {
      url: primary.url,
    });
    assert(!selfText.stdout.includes("Read from a replica"), selfText.stdout);

    // Replay paused: what the primary gets now, the replica does not show.
    await onReplica`select pg_wal_replay_pause()`;
    for (let i = 0; i < 2; i++) await enqueue(primary.url, "reports", "never.served");
    assertEquals(readyOn(await statusJson(primary.url), "reports"), 5);
    const behind = await statusJson(primary.url, replica.url);
    assertEquals(readyOn(behind, "reports"), 3);
    assert((behind.read_replica?.lag_s ?? 0) > 0, JSON.stringify(behind.read_replica));

    // `--watch` too: its status from the replica (its rates from the primary's statistics).
    {
      await using watch = spawnShoal([
        "status",
        "--watch",
        "--json",
        "--interval",
        "200ms",
        "--read-database-url",
        replica.url,
      ], { url: primary.url });
      const line = await waitFor("a --watch line", () => {
        const first = watch.output().split("\n").find((l) => l.startsWith('{"at"'));
        if (!first && watch.output().includes("shoal: ")) throw new Error(watch.output());
        return first;
      });
      const sample = JSON.parse(line) as Status;
      assertEquals(readyOn(sample, "reports"), 3, line);
      assertEquals(sample.read_replica?.replica, true, line);
      watch.kill("SIGTERM");
      assertEquals((await watch.exited()).code, 0);
    }

    // A role with --http: its gauges come from the replica, its claims from the primary.
    await using role = spawnShoal([
      "--role",
      "consumer",
      "--queues",
      "work",
      "--http",
      "127.0.0.1:0",
      "--read-database-url",
      replica.url,
      "--log-format",
      "json",
    ], { url: primary.url });
    const base = await servedAt(role);
    await waitFor("the role ready", async () => (await httpGet(base, "/readyz")).status === 200);
    const scraped = await httpGet(base, "/metrics");
    assertEquals(scraped.status, 200);
    assert(scraped.body.includes(`shoal_queue_depth{queue="reports"} 3\n`), scraped.body);
    const lag = /^shoal_read_replica_lag_seconds (\S+)$/m.exec(scraped.body);
    assert(lag !== null && Number(lag[1]) > 0, scraped.body);
    const [reader] = await onReplica<{ n: number }[]>`
      select count(*)::int as n from pg_stat_activity where application_name = 'shoal consumer read'`;
    assert(reader!.n >= 1 && reader!.n <= 2, `${reader!.n} read connections on the replica`);
    // Claimed and acked on the primary (a standby refuses every write).
    await enqueue(primary.url, "work", "shoal.sleep", '{"ms":1}');
    await waitFor(
      "the job claimed and acked on the primary",
      async () => await jobsOn(onPrimary, "work") === 0,
    );

    // The dashboard's pages read the standby (each one a proof its reads write nothing).
    for (
      const path of [
        "/",
        "/overview/live",
        "/jobs",
        "/dead",
        "/executions",
        "/schedules",
        "/queues",
      ]
    ) {
      const page = await httpGet(base, path);
      assertEquals(page.status, 200, `${path}: ${page.body}`);
    }
    const jobs = await httpGet(base, "/jobs?queue=reports");
    assertEquals(jobs.body.match(/never\.served/g)?.length ?? 0, 3, "the replica's 3 jobs");
    const [first] = await onReplica<{ id: string }[]>`select min(id)::text as id from shoal.jobs`;
    assertEquals((await httpGet(base, `/jobs/${first!.id}`)).status, 200);
    // Its actions write to the primary.
    const paused = await fetch(base + "/queues/reports/pause", {
      method: "POST",
      redirect: "manual",
    });
    await paused.body?.cancel();
    assertEquals(paused.status, 303);
    const [row] = await onPrimary<{ paused: boolean }[]>`
      select exists (select from shoal.queue_pauses where queue = 'reports') as paused`;
    assertEquals(row!.paused, true);

    // `shoal dashboard` alone: the same split.
    {
      await using dashboard = spawnShoal([
        "dashboard",
        "--http",
        "127.0.0.1:0",
        "--read-database-url",
        replica.url,
        "--log-format",
        "json",
      ], { url: primary.url });
      const at = await servedAt(dashboard);
      const page = await httpGet(at, "/jobs?queue=reports");
      assertEquals(page.body.match(/never\.served/g)?.length ?? 0, 3, "the replica's 3 jobs");
      const action = await fetch(at + "/queues/other/pause", {
        method: "POST",
        redirect: "manual",
      });
      await action.body?.cancel();
      assertEquals(action.status, 303);
      const [other] = await onPrimary<{ paused: boolean }[]>`
        select exists (select from shoal.queue_pauses where queue = 'other') as paused`;
      assertEquals(other!.paused, true);
      dashboard.kill("SIGTERM");
      const stopped = await dashboard.exited();
      assertEquals(stopped.code, 0, stopped.output);
    }

    // Replay resumed: the replica catches up with the jobs and both pauses.
    await onReplica`select pg_wal_replay_resume()`;
    await waitFor("the replica to catch up", async () => {
      const s = await statusJson(primary.url, replica.url);
      const paused = s.flow.paused.map((p) => p.queue).sort();
      return readyOn(s, "reports") === 5 && paused.join() === "other,reports";
    });
    role.kill("SIGTERM");
    const exit = await role.exited();
    assertEquals(exit.code, 0, exit.output);
    assert(!logLines(exit.output).some((l) => l.level === "error"), exit.output);
    // Every gauge was read on the standby: none failed (a failed read is only a warning).
    assert(!exit.output.includes("for /metrics"), exit.output);
  } finally {
    await onPrimary.end();
    await (onReplica as unknown as postgres.Sql).end();
  }
});

Deno.test("--read-database-url: a large table is estimated on the replica without its statistics", async () => {
  await using pair = await primaryAndReplica();
  const { primary, replica } = pair;
  const onPrimary = connect(primary.url, { max: 2 });
  const onReplica = postgres(replica.url, { max: 1, onnotice: () => {} }) as unknown as Sql;
  try {
    await enqueueLargeTable(onPrimary);
    await waitFor(
      "the replica to replay the jobs",
      async () => await jobsOn(onReplica, "bulk") === 12_000,
    );
    // A standby's pg_stat_user_tables does not count replayed rows: shoal.job_tallies finds
    // Postgres's count stale and scales its sample to the pages instead.
    const [stats] = await onReplica<{ live: number }[]>`
      select coalesce((select n_live_tup::int from pg_stat_user_tables
        where schemaname = 'shoal' and relname = 'jobs'), 0) as live`;
    assert(stats!.live < 12_000, `the replica counts ${stats!.live} live jobs`);
    const s = await statusJson(primary.url, replica.url);
    const bulk = s.queues.find((q) => q.queue === "bulk")!;
    const tiny = s.queues.find((q) => q.queue === "tiny")!;
    assertEquals([tiny.ready, tiny.exact], [1, true]);
    assertEquals(bulk.exact, false);
    assert(bulk.ready > 6_000 && bulk.ready < 24_000, `bulk estimated at ${bulk.ready}`);
    const exact = await runShoal(
      ["status", "--json", "--exact", "--read-database-url", replica.url],
      { url: primary.url },
    );
    assertEquals(exact.code, 0, exact.stderr);
    assertEquals(readyOn(JSON.parse(exact.stdout) as Status, "bulk"), 12_000);
  } finally {
    await onPrimary.end();
    await (onReplica as unknown as postgres.Sql).end();
  }
});
