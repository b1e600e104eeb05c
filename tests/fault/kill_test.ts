/**
 * Fault 2: processes killed or frozen during the mixed run. A consumer SIGKILLed with jobs
 * in flight (they come back after their visibility timeout and run elsewhere); the reaper
 * and scheduler leaders SIGKILLed (a standby takes over after the lease); the scheduler
 * leader SIGSTOPped past its lease and resumed (it must not act as leader once a
 * successor holds the lease: every fire is checked against the lease term current at
 * its transaction time, see MixedRun.checkFencing).
 */
import { assert, assertEquals } from "../assert.ts";
import { holderOf, sleep, testDb, waitFor } from "../helpers.ts";
import { MixedRun, QUEUE, report } from "./harness.ts";
import type { Sql } from "../../lib/db.ts";

/** Jobs claimed by the process whose worker id is `holder`. */
async function claimedBy(sql: Sql, holder: string): Promise<number> {
  const [row] = await sql<{ n: number }[]>`
    select count(*)::int as n from shoal.jobs
    where queue = ${QUEUE}::text and locked_by = ${holder}::text`;
  return row!.n;
}

/** Lease acquisitions of `name` by `holder` so far. */
async function acquisitions(sql: Sql, name: string, holder: string): Promise<number> {
  const [row] = await sql<{ n: number }[]>`
    select count(*)::int as n from test_leases
    where name = ${name}::text and holder = ${holder}::text and kind = 'acquire'`;
  return row!.n;
}

async function fires(sql: Sql): Promise<number> {
  const [row] = await sql<{ n: number }[]>`
    select count(*)::int as n from test_fires where kind = 'fire'`;
  return row!.n;
}

Deno.test("a consumer SIGKILLed with jobs in flight loses none of them", async () => {
  const started = Date.now();
  await using db = await testDb();
  await using run = await MixedRun.prepare({ url: db.url, sql: db.sql });
  await run.start();
  const victim = run.members.find((m) => m.role === "consumer")!;
  await run.enqueueWave(80);
  const held = await waitFor(
    "the victim to hold jobs",
    () => claimedBy(db.sql, holderOf(victim.proc)),
    20_000,
    20,
  );
  run.kill(victim);
  await victim.proc.exited();
  await run.enqueueWave(40);
  await run.finish();
  const figures = await run.check();
  assert(held > 0);
  const [row] = await db.sql<{ n: number }[]>`
    select count(*)::int as n from test_runs where pid = ${victim.proc.child.pid}::integer
      and finished_at is null`;
  const [redone] = await db.sql<{ n: number }[]>`
    select count(*)::int as n from test_runs r
    where r.pid = ${victim.proc.child.pid}::integer and r.finished_at is null
      and exists (select 1 from test_runs s where s.job_id = r.job_id and s.finished_at is not null)`;
  assertEquals(redone!.n, row!.n, "a job the victim had started never ran to the end");
  report(`consumer SIGKILLed holding ${held} jobs`, figures, started);
});

Deno.test("the reaper and scheduler leaders SIGKILLed: standbys take over, no slot fires twice", async () => {
  const started = Date.now();
  await using db = await testDb();
  await using run = await MixedRun.prepare({
    url: db.url,
    sql: db.sql,
    reapers: 2,
    schedulers: 2,
  });
  await run.start();
  await run.waitForSlots(2);
  const reaper = await run.leader("reaper");
  const scheduler = await run.leader("scheduler");
  run.kill(reaper);
  run.kill(scheduler);
  const before = await fires(db.sql);
  const standby = run.members.find((m) => m.role === "scheduler" && !m.killed)!;
  const reaperStandby = run.members.find((m) => m.role === "reaper" && !m.killed)!;
  await waitFor(
    "the standby scheduler to take over",
    async () => await acquisitions(db.sql, "scheduler", holderOf(standby.proc)) > 0,
    20_000,
    100,
  );
  await waitFor(
    "the standby reaper to take over",
    async () => await acquisitions(db.sql, "reaper", holderOf(reaperStandby.proc)) > 0,
    20_000,
    100,
  );
  await run.enqueueWave(40);
  await waitFor("fires after the hand-over", async () => await fires(db.sql) >= before + 2, 20_000);
  await run.finish();
  report("reaper and scheduler leaders SIGKILLed", await run.check(), started);
});

Deno.test("a scheduler leader SIGSTOPped past its lease never acts once resumed", async () => {
  const started = Date.now();
  await using db = await testDb();
  await using run = await MixedRun.prepare({ url: db.url, sql: db.sql, schedulers: 2 });
  await run.start();
  await run.waitForSlots(2);
  const frozen = await run.leader("scheduler");
  const standby = run.members.find((m) => m.role === "scheduler" && m !== frozen)!;
  frozen.proc.kill("SIGSTOP");
  run.faults++;
  try {
    await waitFor(
      "the standby to take the lease",
      async () => await acquisitions(db.sql, "scheduler", holderOf(standby.proc)) > 0,
      20_000,
      100,
    );
    const before = await fires(db.sql);
    await waitFor("the standby to fire", async () => await fires(db.sql) > before, 20_000);
  } finally {
    frozen.proc.kill("SIGCONT");
  }
  // Awake again with a stale term: it must notice and stand by, while the standby leads.
  await sleep(3000);
  await run.enqueueWave(40);
  await run.finish();
  const figures = await run.check();
  const output = frozen.proc.output();
  assert(
    /Lost the scheduler lease|Cannot renew the scheduler lease/.test(output),
    `the resumed leader did not report losing its lease:\n${output.slice(-3000)}`,
  );
  report("scheduler leader SIGSTOPped past its lease", figures, started);
});
