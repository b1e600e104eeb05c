/**
 * Fault 9: a Postgres failover mid-run. A primary and a synchronous streaming replica
 * (`pg_basebackup -R`, `synchronous_standby_names`, so a commit returns only once the
 * replica has it), the mixed run's real `main.ts` processes on a URL listing both hosts
 * with `target_session_attrs=read-write`, a producer enqueueing a steady stream; then the
 * primary crashes (`pg_ctl stop -m immediate`) and the replica is promoted. Every role
 * finds the new primary on its own, nothing acknowledged to the producer is lost, the usual
 * checks hold, and the time from the promotion to the first job run on the new primary is
 * printed.
 */
import postgres from "postgres";
import { assertEquals } from "../assert.ts";
import { logLines, sleep, waitFor } from "../helpers.ts";
import { connect, formatDatabaseUrl, isConnectionError, parseDatabaseUrl } from "../../lib/db.ts";
import { crashLocalPg, startLocalPg, startLocalReplica } from "../../lib/local_pg.ts";
import { loadMigrations, migrate } from "../../lib/migrate.ts";
import { enqueue } from "../../lib/queue.ts";
import { MixedRun, QUEUE, report } from "./harness.ts";

/** A process's warn and error log lines, for a failure's message. */
function complaints(output: string): string {
  return logLines(output).filter((l) => l.level === "WARN" || l.level === "ERROR")
    .map((l) => JSON.stringify(l)).join("\n");
}

/** `url` (a cluster's `postgres` database) pointed at database `name`. */
function database(url: string, name: string): string {
  const parts = parseDatabaseUrl(url);
  parts.url.pathname = `/${name}`;
  return formatDatabaseUrl(parts);
}

interface Producer {
  /** Every job id an enqueue returned, with when (Date.now()). */
  acked: { id: string; at: number }[];
  /** How many enqueues failed on a lost connection (not acknowledged). */
  refused(): number;
  stop(): Promise<void>;
}

/** A producer enqueueing one job every few ms until stopped; keeps every id acknowledged. */
function producer(url: string): Producer {
  const sql = connect(url, { applicationName: "shoal producer", max: 1 });
  const acked: { id: string; at: number }[] = [];
  let running = true;
  let refused = 0;
  const loop = (async () => {
    for (let i = 0; running; i++) {
      try {
        const id = await enqueue(sql, "test.record_once", {}, { queue: QUEUE, key: `p-${i}` });
        acked.push({ id, at: Date.now() });
      } catch (error) {
        // Not acknowledged: the producer would retry it, the check does not count on it.
        if (!isConnectionError(error)) throw error;
        refused++;
        await sleep(100);
      }
      await sleep(15);
    }
  })();
  return {
    acked,
    refused: () => refused,
    async stop(): Promise<void> {
      running = false;
      try {
        await loop;
      } finally {
        await sql.end({ timeout: 1 });
      }
    },
  };
}

Deno.test("a failover to a synchronous replica mid-run loses nothing acknowledged", async () => {
  const started = Date.now();
  // Durable enough for a crash of the server alone (fsync off: the OS keeps its writes);
  // synchronous_commit stays on, or commits would not wait for the replica.
  await using primary = await startLocalPg({ settings: { fsync: "off" } });
  const admin = postgres(primary.url, { max: 1, onnotice: () => {} });
  try {
    await admin`create database shoal`;
  } finally {
    await admin.end();
  }
  const setup = connect(database(primary.url, "shoal"), { applicationName: "shoal test", max: 1 });
  try {
    await migrate(setup, await loadMigrations());
  } finally {
    await setup.end();
  }
  await using replica = await startLocalReplica(primary, { settings: { fsync: "off" } });
  const primarySql = connect(database(primary.url, "shoal"), { max: 1 });
  try {
    // After the base backup, so the promoted replica does not wait for a standby of its own.
    await primarySql`alter system set synchronous_standby_names = '*'`;
    await primarySql`select pg_reload_conf()`;
    await waitFor(
      "the replica to stream synchronously",
      async () => {
        const [row] = await primarySql<{ n: number }[]>`
        select count(*)::int as n from pg_stat_replication
        where state = 'streaming' and sync_state = 'sync'`;
        return row!.n === 1;
      },
      20_000,
      100,
    );
  } finally {
    await primarySql.end();
  }

  const both = `postgres://postgres@127.0.0.1:${primary.port},127.0.0.1:${replica.port}/shoal` +
    `?target_session_attrs=read-write`;
  const sql = connect(both, { applicationName: "shoal test", max: 4 });
  let stream: Producer | undefined;
  let streamStopped = false;
  try {
    await using run = await MixedRun.prepare({ url: both, sql });
    const feed = producer(both); // after prepare(): its audit records each job inserted
    stream = feed;
    await run.start();
    await run.waitForSlots(2);
    await waitFor("acknowledged jobs", () => feed.acked.length >= 50, 20_000, 50);
    await run.waitForJobsInFlight();

    // The crash: the primary gone at once, mid-run; the replica promoted a moment later.
    const ackedBefore = feed.acked.length;
    // Sessions the standby opened while it was one: the roles' reconnect attempts meanwhile.
    const onReplica = connect(database(replica.url, "shoal"), { max: 1 });
    const standbySessions = async () => {
      const [row] = await onReplica<{ n: number }[]>`
        select sessions::int as n from pg_stat_database where datname = 'shoal'`;
      return row!.n;
    };
    let attempts: number;
    try {
      const before = await standbySessions();
      await crashLocalPg(primary);
      run.faults++;
      await sleep(1000);
      attempts = await standbySessions() - before;
    } finally {
      await onReplica.end();
    }
    // The servers share this machine's clock: the database's timestamps compare with it.
    const promotedAt = new Date();
    await replica.promote();
    const direct = connect(database(replica.url, "shoal"), { max: 1 });
    let firstRunMs: number;
    try {
      const first = await waitFor(
        "a job run on the new primary",
        async () => {
          const [row] = await direct<{ at: Date | null }[]>`
          select min(started_at) as at from test_runs where started_at >= ${promotedAt}`;
          return row!.at;
        },
        60_000,
        50,
      );
      // From the promotion (pg_ctl promote called) to the first run.
      firstRunMs = first.getTime() - promotedAt.getTime();
    } finally {
      await direct.end();
    }

    // LISTEN is re-established on the new primary: each consumer listens there again.
    await waitFor(
      "the consumers to LISTEN on the new primary",
      async () => {
        const rows = await sql<{ name: string }[]>`
        select application_name as name from pg_stat_activity
        where application_name like 'shoal consumer-%' and query ilike 'listen%'`;
        return new Set(rows.map((r) => r.name)).size === 2;
      },
      20_000,
      200,
    );
    // Leaders re-elected through the lease table on the new primary.
    await run.leader("reaper");
    await run.leader("scheduler");

    await sleep(2000); // the producer goes on against the new primary
    await feed.stop();
    streamStopped = true;
    await run.finish();
    const figures = await run.check();

    // Nothing acknowledged to the producer is missing from the new primary (run.check()
    // then proved each ran or is dead with a reason).
    const ids = feed.acked.map((a) => a.id);
    const missing = await sql<{ id: string }[]>`
      select a.id::text from unnest(${ids}::bigint[]) as a(id)
      where not exists (select 1 from fault_jobs j where j.id = a.id)`;
    assertEquals([...missing], [], "jobs acknowledged to the producer are missing");
    // Exactly once: each acknowledged job's run (recorded in its own completing transaction,
    // fenced by its claim token) committed once, whether it ran before, across or after the
    // failover. Plain test.record jobs are at-least-once: counted as redelivered, not checked.
    const runs = await sql<{ job_id: string; n: number }[]>`
      select a.id::text as job_id, count(r.id)::int as n
      from unnest(${ids}::bigint[]) as a(id) left join test_runs r on r.job_id = a.id
      group by a.id having count(r.id) <> 1
        and not exists (select 1 from shoal.dead_jobs d where d.id = a.id and d.reason <> '')`;
    if (runs.length > 0) {
      const said = run.members.filter((m) => m.role === "consumer")
        .map((m) => `${m.name} (pid ${m.proc.child.pid}):\n${complaints(m.proc.output())}`);
      throw new Error(
        `Acknowledged jobs did not run exactly once (promotion at ${promotedAt.toISOString()}): ` +
          `${JSON.stringify(runs)}\n${said.join("\n")}`,
      );
    }
    const seconds = (firstRunMs / 1000).toFixed(1);
    report(
      `failover (${ackedBefore} acknowledged before the crash, ${feed.acked.length} in all, ` +
        `${feed.refused()} refused during it; ${attempts} sessions opened on the standby ` +
        `before its promotion; first run ${seconds} s after the promotion)`,
      figures,
      started,
    );
  } finally {
    // The test's own failure is the one to see: the producer's would only hide it.
    if (stream && !streamStopped) await stream.stop().catch(() => undefined);
    await sql.end({ timeout: 1 });
  }
});
