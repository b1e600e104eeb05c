/**
 * Process tests of the two leader-elected roles: real `main.ts` processes (scheduler,
 * reaper, all) receiving real signals (SIGKILL, SIGSTOP/SIGCONT, SIGTERM).
 *
 * What happened is read from the database itself: triggers installed by `installAudit`
 * record every schedule fire and baseline, every job insert attempt (a slot fired twice is
 * seen even though the dedupe index would keep one job) and every lease acquire and
 * release, each tagged with the application_name of the process that made it. Timing
 * bounds are generous and only separate "within an interval" from "after the lease".
 */
import { assert, assertEquals, assertExists } from "./assert.ts";
import {
  createRunsTable,
  enqueueEvents,
  exitWithin,
  type FireEvent,
  fireEvents,
  holderOf,
  installAudit,
  type LeaseEvent,
  leaseEvents,
  logLines,
  runShoal,
  type ShoalProcess,
  sleep,
  spawnShoal,
  TEST_MAIN,
  testDb,
  waitFor,
  withApplicationName,
} from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import { upsertSchedule } from "../lib/schedule.ts";

const SCHEDULE = "every-second";
/** A queue nobody consumes: every fired job stays as a row. */
const IDLE_QUEUE = "nobody";
const LEADING = "Leading scheduler ";
const RELEASED = "Released the scheduler lease";
const LOST = "Lost the scheduler lease";

/** How many log lines of `output` have a message starting with `text`. */
function logged(output: string, text: string): number {
  return logLines(output).filter((l) => String(l.message).startsWith(text)).length;
}

/** A `--role scheduler` process whose sessions are named `tag` (see withApplicationName). */
function scheduler(url: string, tag: string, lease: string, interval: string): ShoalProcess {
  return spawnShoal(
    ["--role", "scheduler", "--lease", lease, "--interval", interval, "--log-format", "json"],
    { url: withApplicationName(url, tag) },
  );
}

/** Add the per-second schedule whose jobs go to a queue nobody consumes. */
async function addPerSecondSchedule(
  sql: Sql,
  queue = IDLE_QUEUE,
  task = "shoal.noop",
): Promise<void> {
  await upsertSchedule(sql, { name: SCHEDULE, cron: "* * * * * *", task, queue });
}

/** The process holding lease `name` right now (unexpired), if it is one of `procs`. */
async function leaderOf(
  sql: Sql,
  name: string,
  procs: ShoalProcess[],
): Promise<ShoalProcess | undefined> {
  const [row] = await sql<{ holder: string }[]>`
    select holder from shoal.leases where name = ${name}::text and expires_at > now()`;
  return procs.find((p) => row !== undefined && holderOf(p) === row.holder);
}

async function waitForLeader(
  sql: Sql,
  name: string,
  procs: ShoalProcess[],
): Promise<ShoalProcess> {
  return await waitFor(`a ${name} leader`, () => leaderOf(sql, name, procs), 20_000);
}

/** Wait until the schedule fired `count` times in all (or only by `proc`, a tag). */
async function waitForFires(sql: Sql, count: number, proc?: string): Promise<void> {
  const what = `${count} fires${proc ? ` by ${proc}` : ""}`;
  await waitFor(what, async () => {
    const fires = (await fireEvents(sql, SCHEDULE)).filter((e) => e.kind === "fire");
    return fires.filter((e) => proc === undefined || e.proc === proc).length >= count;
  }, 30_000 + count * 1500);
}

/** Stop `proc` with SIGTERM and check it exits 0 in time. */
async function stopGracefully(proc: ShoalProcess): Promise<string> {
  proc.kill("SIGTERM");
  const exit = await exitWithin(proc, 15_000);
  assertEquals(exit.code, 0, `expected exit 0 after SIGTERM:\n${exit.output}`);
  return exit.output;
}

function ms(d: Date | null): number {
  if (d === null) throw new Error("Expected a timestamp, got null");
  return d.getTime();
}
const keyOf = (slot: Date | null): string =>
  `schedule:${SCHEDULE}:${new Date(ms(slot)).toISOString()}`;

/**
 * Check the audit of the per-second schedule is one exact chain and return the fires
 * that coalesced missed slots:
 * - one baseline first, which fires nothing; the first fire is the baseline's slot;
 * - each fire's slot is the previous fire's next slot (no slot fired twice, none
 *   skipped except by coalescing), fired no earlier than the slot, and its next slot is
 *   the first whole second after the database clock of that tick (a late tick skips the
 *   slots it missed, and fires once for them);
 * - the job insert attempts are exactly one per fire, with the fire's dedupe key, made by
 *   the same process; with `idleQueue`, the jobs table holds exactly those jobs.
 */
async function checkChain(
  sql: Sql,
  idleQueue: boolean,
): Promise<{ fires: FireEvent[]; gaps: FireEvent[] }> {
  const events = await fireEvents(sql, SCHEDULE);
  const [baseline, ...fires] = events;
  assertExists(baseline, "nothing recorded");
  assertEquals(baseline.kind, "baseline", "no baseline recorded first");
  assertEquals(baseline.slot, null);
  assert(fires.length > 0, "nothing fired");
  assertEquals(fires.filter((f) => f.kind !== "fire"), [], "a second baseline");
  let expected = ms(baseline.next);
  for (const fire of fires) {
    assertEquals(ms(fire.slot), expected, `chain broken at ${JSON.stringify(fire)}`);
    assert(ms(fire.at) >= ms(fire.slot), `fired early: ${JSON.stringify(fire)}`);
    assertEquals(
      ms(fire.next),
      Math.floor(ms(fire.at) / 1000) * 1000 + 1000,
      `next slot is not the first second after the tick: ${JSON.stringify(fire)}`,
    );
    expected = ms(fire.next);
  }
  const attempts = (await enqueueEvents(sql)).map((e) => `${e.key} by ${e.proc}`).sort();
  assertEquals(attempts, fires.map((f) => `${keyOf(f.slot)} by ${f.proc}`).sort());
  if (idleQueue) {
    const jobs = await sql<{ key: string }[]>`
      select key from shoal.jobs where queue = ${IDLE_QUEUE}::text order by key`;
    assertEquals(jobs.map((j) => j.key), fires.map((f) => keyOf(f.slot)).sort());
  }
  return { fires, gaps: fires.filter((f) => ms(f.next) - ms(f.slot) > 1000) };
}

/** The event list with times left out, for exact comparison. */
function leaseShape(events: LeaseEvent[]): string[] {
  return events.map((e) => `${e.kind} ${e.holder} term ${e.token}`);
}

/** Check fires before `gap` were all made by `before`, and it and all after by `after`. */
function checkHandOver(fires: FireEvent[], gap: FireEvent, before: string, after: string): void {
  const i = fires.indexOf(gap);
  assert(i > 0, "the coalescing fire is not after a fire of the first leader");
  assertEquals(fires.slice(0, i).filter((f) => f.proc !== before), []);
  assertEquals(fires.slice(i).filter((f) => f.proc !== after), []);
}

/** Two schedulers, 30 s of per-second slots: each slot fires once, none is skipped. */
async function neverTwice(): Promise<void> {
  await using db = await testDb();
  await installAudit(db.sql);
  await addPerSecondSchedule(db.sql);
  await using a = scheduler(db.url, "shoal scheduler A", "3s", "1s");
  await using b = scheduler(db.url, "shoal scheduler B", "3s", "1s");
  await waitForFires(db.sql, 31);
  const leader = await waitForLeader(db.sql, "scheduler", [a, b]);
  const standby = leader === a ? b : a;
  const standbyOutput = await stopGracefully(standby);
  const leaderOutput = await stopGracefully(leader);

  const { fires, gaps } = await checkChain(db.sql, true);
  assertEquals(gaps, [], "a slot was skipped while a leader was running");
  assert(fires.length >= 31, `only ${fires.length} fires`);
  const leaderTag = leader === a ? "shoal scheduler A" : "shoal scheduler B";
  assertEquals(fires.filter((f) => f.proc !== leaderTag), [], "the standby fired");
  assertEquals(leaseShape(await leaseEvents(db.sql, "scheduler")), [
    `acquire ${holderOf(leader)} term 1`,
    `release ${holderOf(leader)} term 1`,
  ]);
  assertEquals(logged(standbyOutput, LEADING), 0, standbyOutput);
  assertEquals(logged(leaderOutput, LEADING), 1, leaderOutput);
  assertEquals(logged(leaderOutput, RELEASED), 1, leaderOutput);
}

/** The two processes of a pair, with their tags, once one of them leads and has fired. */
interface Pair {
  leader: ShoalProcess;
  standby: ShoalProcess;
  leaderTag: string;
  standbyTag: string;
}

async function findPair(sql: Sql, a: ShoalProcess, b: ShoalProcess): Promise<Pair> {
  const leader = await waitForLeader(sql, "scheduler", [a, b]);
  const [leaderTag, standbyTag] = leader === a
    ? ["shoal scheduler A", "shoal scheduler B"]
    : ["shoal scheduler B", "shoal scheduler A"];
  return { leader, standby: leader === a ? b : a, leaderTag, standbyTag };
}

/** The last expiry the process holding `holder` ever wrote (renewals included). */
async function lastExpiry(sql: Sql, holder: string): Promise<number> {
  const [row] = await sql<{ expires_at: Date }[]>`
    select max(expires_at) as expires_at from test_leases
    where name = 'scheduler' and holder = ${holder}::text`;
  return ms(row?.expires_at ?? null);
}

/**
 * SIGKILL the leader: the standby takes over once the lease expires (not before), the
 * missed slots fire once as one coalesced job, then every second again; no slot twice.
 */
async function leaderKilled(): Promise<void> {
  await using db = await testDb();
  await installAudit(db.sql);
  await addPerSecondSchedule(db.sql);
  await using a = scheduler(db.url, "shoal scheduler A", "3s", "1s");
  await using b = scheduler(db.url, "shoal scheduler B", "3s", "1s");
  await waitForFires(db.sql, 4);
  const { leader, standby, leaderTag, standbyTag } = await findPair(db.sql, a, b);
  leader.kill("SIGKILL");
  assertEquals((await exitWithin(leader, 10_000)).signal, "SIGKILL");
  const [{ killed_at: killedAt }] = await db.sql<[{ killed_at: Date }]>`select now() as killed_at`;
  await waitFor("the standby to lead", () => leaderOf(db.sql, "scheduler", [standby]), 20_000);
  await waitForFires(db.sql, 4, standbyTag);
  const standbyOutput = await stopGracefully(standby);

  const { fires, gaps } = await checkChain(db.sql, true);
  assertEquals(gaps.length, 1, `expected one coalescing fire: ${JSON.stringify(gaps)}`);
  const gap = gaps[0]!;
  checkHandOver(fires, gap, leaderTag, standbyTag);
  assert(ms(gap.next) - ms(gap.slot) >= 2000, "no missed slot was coalesced");
  const events = await leaseEvents(db.sql, "scheduler");
  assertEquals(leaseShape(events), [
    `acquire ${holderOf(leader)} term 1`,
    `acquire ${holderOf(standby)} term 2`,
    `release ${holderOf(standby)} term 2`,
  ]);
  const takenAt = events[1]!.acquired_at.getTime();
  const expiry = await lastExpiry(db.sql, holderOf(leader));
  assert(takenAt >= expiry, "the standby took over before the lease expired");
  assert(takenAt - expiry < 3000, `took over ${takenAt - expiry} ms after the lease expired`);
  assert(takenAt - killedAt.getTime() < 3000 + 3000, "took over later than the lease allows");
  assert(ms(gap.at) >= takenAt, "the coalescing fire came before the take-over");
  assertEquals(logged(standbyOutput, LEADING), 1, standbyOutput);
}

/**
 * SIGSTOP `proc` at a moment none of its sessions is inside a transaction, so the pause
 * lands where a leader spends nearly all its time (between cycles); a pause inside a
 * transaction is its own scenario (leaderPausedInTransaction).
 */
async function stopOutsideTransaction(sql: Sql, proc: ShoalProcess, tag: string): Promise<void> {
  const busy = async (): Promise<boolean> => {
    const [row] = await sql<{ n: number }[]>`
      select count(*)::int as n from pg_stat_activity
      where datname = current_database() and application_name = ${tag}::text
        and xact_start is not null`;
    return row!.n > 0;
  };
  for (let i = 0; i < 50; i++) {
    proc.kill("SIGSTOP");
    // Check twice: a statement sent just before the stop may still be on its way.
    if (!(await busy())) {
      await sleep(200);
      if (!(await busy())) return;
    }
    proc.kill("SIGCONT");
    await sleep(37 + i * 11);
  }
  throw new Error(`Cannot stop ${tag} outside a transaction`);
}

/**
 * SIGSTOP the leader past its lease: the standby takes over; after SIGCONT the ex-leader
 * finds its lease lost, fires nothing and never leads again while the other holds it.
 */
async function leaderPaused(): Promise<void> {
  await using db = await testDb();
  await installAudit(db.sql);
  await addPerSecondSchedule(db.sql);
  await using a = scheduler(db.url, "shoal scheduler A", "3s", "1s");
  await using b = scheduler(db.url, "shoal scheduler B", "3s", "1s");
  await waitForFires(db.sql, 3);
  const { leader, standby, leaderTag, standbyTag } = await findPair(db.sql, a, b);
  await stopOutsideTransaction(db.sql, leader, leaderTag);
  try {
    await waitFor("the standby to lead", () => leaderOf(db.sql, "scheduler", [standby]), 20_000);
    await waitForFires(db.sql, 3, standbyTag);
  } finally {
    leader.kill("SIGCONT");
  }
  const [{ resumed_at: resumedAt }] = await db.sql<[{ resumed_at: Date }]>`
    select now() as resumed_at`;
  await waitFor("the ex-leader to log its lost lease", () => logged(leader.output(), LOST) > 0);
  const firedBefore = (await fireEvents(db.sql, SCHEDULE)).filter((e) => e.proc === standbyTag);
  await waitForFires(db.sql, firedBefore.length + 4, standbyTag);
  const leaderOutput = await stopGracefully(leader);
  await stopGracefully(standby);

  const { fires, gaps } = await checkChain(db.sql, true);
  assertEquals(gaps.length, 1, `expected one coalescing fire: ${JSON.stringify(gaps)}`);
  checkHandOver(fires, gaps[0]!, leaderTag, standbyTag);
  const expiry = await lastExpiry(db.sql, holderOf(leader));
  for (const f of fires.filter((f) => f.proc === leaderTag)) {
    assert(ms(f.at) < expiry, `the ex-leader fired after its lease: ${JSON.stringify(f)}`);
  }
  assert(
    fires.some((f) => f.proc === standbyTag && ms(f.at) > resumedAt.getTime() + 1000),
    "the new leader stopped firing after the ex-leader resumed",
  );
  assertEquals(leaseShape(await leaseEvents(db.sql, "scheduler")), [
    `acquire ${holderOf(leader)} term 1`,
    `acquire ${holderOf(standby)} term 2`,
    `release ${holderOf(standby)} term 2`,
  ]);
  assertEquals(logged(leaderOutput, LEADING), 1, leaderOutput);
  assertEquals(logged(leaderOutput, RELEASED), 0, leaderOutput);
}

/**
 * SIGSTOP the leader while it is inside a fire transaction (held there by a test lock on
 * the jobs table, so the stop lands between two of its statements): it holds its lease row
 * FOR SHARE and the slot's uncommitted job. The standby must still take over once the
 * lease expires (Postgres ends the frozen session and rolls its fire back), fire that slot
 * once, and after SIGCONT the ex-leader fires nothing.
 */
async function leaderPausedInTransaction(): Promise<void> {
  await using db = await testDb();
  await installAudit(db.sql);
  await addPerSecondSchedule(db.sql);
  await using a = scheduler(db.url, "shoal scheduler A", "3s", "1s");
  await using b = scheduler(db.url, "shoal scheduler B", "3s", "1s");
  await waitForFires(db.sql, 3);
  const { leader, standby, leaderTag, standbyTag } = await findPair(db.sql, a, b);
  const blocker = await db.sql.reserve();
  try {
    await blocker`begin`;
    await blocker`lock table shoal.jobs in share mode`;
    await waitFor("the leader to wait inside its fire transaction", async () => {
      const rows = await db.sql`
        select 1 from pg_stat_activity
        where datname = current_database() and application_name = ${leaderTag}::text
          and wait_event_type = 'Lock'
          and xact_start is not null`;
      return rows.length > 0;
    });
    leader.kill("SIGSTOP");
  } finally {
    await blocker`rollback`;
    blocker.release();
  }
  try {
    await waitFor("the standby to lead", () => leaderOf(db.sql, "scheduler", [standby]), 20_000);
    await waitForFires(db.sql, 3, standbyTag);
  } finally {
    leader.kill("SIGCONT");
  }
  await waitFor("the ex-leader to log its lost lease", () => logged(leader.output(), LOST) > 0);
  const firedBefore = (await fireEvents(db.sql, SCHEDULE)).filter((e) => e.proc === standbyTag);
  await waitForFires(db.sql, firedBefore.length + 2, standbyTag);
  const leaderOutput = await stopGracefully(leader);
  await stopGracefully(standby);

  const { fires, gaps } = await checkChain(db.sql, true);
  assertEquals(gaps.length, 1, `expected one coalescing fire: ${JSON.stringify(gaps)}`);
  checkHandOver(fires, gaps[0]!, leaderTag, standbyTag);
  assertEquals(leaseShape(await leaseEvents(db.sql, "scheduler")), [
    `acquire ${holderOf(leader)} term 1`,
    `acquire ${holderOf(standby)} term 2`,
    `release ${holderOf(standby)} term 2`,
  ]);
  assertEquals(logged(leaderOutput, LEADING), 1, leaderOutput);
}

/**
 * SIGTERM the leader: it releases the lease and exits 0, and the standby leads within
 * one of its intervals (1 s), long before the 20 s lease would have expired.
 */
async function leaderTerminated(): Promise<void> {
  await using db = await testDb();
  await installAudit(db.sql);
  await addPerSecondSchedule(db.sql);
  await using a = scheduler(db.url, "shoal scheduler A", "20s", "1s");
  await using b = scheduler(db.url, "shoal scheduler B", "20s", "1s");
  await waitForFires(db.sql, 3);
  const { leader, standby, leaderTag, standbyTag } = await findPair(db.sql, a, b);
  const leaderOutput = await stopGracefully(leader);
  assertEquals(logged(leaderOutput, RELEASED), 1, leaderOutput);
  await waitForFires(db.sql, 3, standbyTag);
  await stopGracefully(standby);

  const events = await leaseEvents(db.sql, "scheduler");
  assertEquals(leaseShape(events), [
    `acquire ${holderOf(leader)} term 1`,
    `release ${holderOf(leader)} term 1`,
    `acquire ${holderOf(standby)} term 2`,
    `release ${holderOf(standby)} term 2`,
  ]);
  const [, release, taken] = events as [LeaseEvent, LeaseEvent, LeaseEvent];
  // A "release" is the leader's own write setting expires_at to its now(): the lease is free.
  assertEquals(release.expires_at.getTime(), release.at.getTime());
  const handOverMs = taken.acquired_at.getTime() - release.at.getTime();
  assert(handOverMs >= 0 && handOverMs < 5000, `the standby led ${handOverMs} ms after release`);
  const { fires, gaps } = await checkChain(db.sql, true);
  assert(gaps.length <= 1, `more than one coalescing fire: ${JSON.stringify(gaps)}`);
  const firstOfStandby = fires.find((f) => f.proc === standbyTag)!;
  checkHandOver(fires, gaps[0] ?? firstOfStandby, leaderTag, standbyTag);
}

/** Run scenarios at once; report every failure by name (each cleans up after itself). */
async function concurrently(scenarios: Record<string, () => Promise<void>>): Promise<void> {
  const names = Object.keys(scenarios);
  const results = await Promise.allSettled(Object.values(scenarios).map((run) => run()));
  const failures = results.flatMap((r, i) =>
    r.status === "rejected"
      ? [`${names[i]}: ${r.reason instanceof Error ? r.reason.stack : String(r.reason)}`]
      : []
  );
  if (failures.length > 0) throw new Error(`Failed scenarios:\n\n${failures.join("\n\n")}`);
}

Deno.test("two schedulers fire each per-second slot exactly once, through SIGKILL, SIGSTOP and SIGTERM of the leader", async () => {
  await concurrently({
    "never twice in 30 s": neverTwice,
    "SIGKILL of the leader": leaderKilled,
    "SIGSTOP of the leader past its lease": leaderPaused,
    "SIGSTOP of the leader inside a transaction": leaderPausedInTransaction,
    "SIGTERM of the leader": leaderTerminated,
  });
});

Deno.test("a leader-elected role refuses to start when --interval is not shorter than --lease", async () => {
  await using db = await testDb();
  const cases: [string[], Record<string, string>, string][] = [
    [
      ["--role", "scheduler", "--interval", "3s", "--lease", "3s"],
      {},
      "shoal: Invalid timing for the scheduler: --interval 3s must be shorter than --lease 3s\n",
    ],
    [
      ["--role", "reaper", "--interval", "5s", "--lease", "2s"],
      {},
      "shoal: Invalid timing for the reaper: --interval 5s must be shorter than --lease 2s\n",
    ],
    [
      ["--role", "all", "--interval", "1m"],
      {},
      "shoal: Invalid timing for the reaper: --interval 1m must be shorter than --lease 30s\n",
    ],
    [
      ["--role", "scheduler"],
      { SHOAL_LEASE: "5s" },
      "shoal: Invalid timing for the scheduler: --interval 5s must be shorter than --lease 5s\n",
    ],
  ];
  const results = await Promise.all(
    cases.map(([args, env]) => runShoal(args, { url: db.url, env })),
  );
  results.forEach((r, i) => {
    const [args, , stderr] = cases[i]!;
    assertEquals({ code: r.code, stdout: r.stdout, stderr: r.stderr }, {
      code: 2,
      stdout: "",
      stderr,
    }, args.join(" "));
  });
  assertEquals((await db.sql`select name from shoal.leases`).length, 0);
});

/** Insert a dead job that died `ageMs` ago (database clock); returns its id. */
async function insertDead(sql: Sql, id: number, ageMs: number): Promise<void> {
  await sql`
    insert into shoal.dead_jobs (id, queue, task, payload, priority, fairness_key, attempts,
      max_attempts, errors, reason, created_at, died_at)
    values (${id}::bigint, 'default', 'shoal.fail', '{}', 0, '', 1, 1, '[]', 'test',
      now() - ${ageMs}::bigint * interval '1 ms', now() - ${ageMs}::bigint * interval '1 ms')`;
}

/** Record every dead job purge with the purging process and the database clock. */
async function auditPurges(sql: Sql): Promise<void> {
  await sql`
    create table test_purges (
      id bigint not null, died_at timestamptz not null, proc text not null,
      at timestamptz not null default clock_timestamp())`;
  await sql`
    create function test_audit_purge() returns trigger language plpgsql as $$
    begin
      insert into test_purges (id, died_at, proc)
      values (old.id, old.died_at, current_setting('application_name'));
      return null;
    end $$`;
  await sql`
    create trigger test_audit_purge after delete on shoal.dead_jobs
    for each row execute function test_audit_purge()`;
}

interface Purge {
  id: string;
  proc: string;
  /** Milliseconds between the job's death and its purge. */
  age_ms: number;
}

async function purges(sql: Sql): Promise<Purge[]> {
  return await sql<Purge[]>`
    select id, proc, (extract(epoch from at - died_at) * 1000)::float8 as age_ms
    from test_purges order by id`;
}

async function purged(sql: Sql, id: number): Promise<boolean> {
  return (await sql`select 1 from test_purges where id = ${id}::bigint`).length === 1;
}

function reaper(url: string, tag: string): ShoalProcess {
  return spawnShoal([
    "--role",
    "reaper",
    "--lease",
    "20s",
    "--interval",
    "500ms",
    "--dead-retention",
    "1s",
    "--log-format",
    "json",
  ], { url: withApplicationName(url, tag) });
}

Deno.test("two reapers: only the leader purges dead jobs past --dead-retention, and SIGTERM hands over", async () => {
  await using db = await testDb();
  await installAudit(db.sql);
  await auditPurges(db.sql);
  await insertDead(db.sql, 1, 3_600_000);
  await using a = reaper(db.url, "shoal reaper A");
  await using b = reaper(db.url, "shoal reaper B");
  await waitFor("the old dead job to be purged", () => purged(db.sql, 1), 20_000);
  const leader = await waitForLeader(db.sql, "reaper", [a, b]);
  const standby = leader === a ? b : a;
  const [leaderTag, standbyTag] = leader === a
    ? ["shoal reaper A", "shoal reaper B"]
    : ["shoal reaper B", "shoal reaper A"];
  await insertDead(db.sql, 2, 0);
  await waitFor("the fresh dead job to be purged", () => purged(db.sql, 2), 20_000);

  const leaderOutput = await stopGracefully(leader);
  assertEquals(logged(leaderOutput, "Released the reaper lease"), 1, leaderOutput);
  await waitFor("the standby to lead", () => leaderOf(db.sql, "reaper", [standby]), 5_000);
  await insertDead(db.sql, 3, 60_000);
  await waitFor("the standby to purge", () => purged(db.sql, 3), 20_000);
  const standbyOutput = await stopGracefully(standby);

  const rows = await purges(db.sql);
  assertEquals(rows.map((p) => `${p.id} by ${p.proc}`), [
    `1 by ${leaderTag}`,
    `2 by ${leaderTag}`,
    `3 by ${standbyTag}`,
  ]);
  assert(rows[1]!.age_ms >= 1000, `purged ${rows[1]!.age_ms} ms after it died: before retention`);
  const events = await leaseEvents(db.sql, "reaper");
  assertEquals(leaseShape(events), [
    `acquire ${holderOf(leader)} term 1`,
    `release ${holderOf(leader)} term 1`,
    `acquire ${holderOf(standby)} term 2`,
    `release ${holderOf(standby)} term 2`,
  ]);
  const handOverMs = events[2]!.acquired_at.getTime() - events[1]!.at.getTime();
  assert(handOverMs >= 0 && handOverMs < 5000, `the standby led ${handOverMs} ms after release`);
  assertEquals(logged(leaderOutput, "Leading reaper "), 1, leaderOutput);
  assertEquals(logged(standbyOutput, "Leading reaper "), 1, standbyOutput);
  // A standby says so once for its whole wait (some 20 ticks here), not once per tick.
  assertEquals(logged(leaderOutput, "Standing by"), 0, leaderOutput);
  assertEquals(logged(standbyOutput, "Standing by"), 1, standbyOutput);
  assertEquals(logged(standbyOutput, "Released the reaper lease"), 1, standbyOutput);
});

Deno.test("--role all consumes its own schedule's jobs, reaps, holds both leases and exits 0 on SIGTERM", async () => {
  await using db = await testDb();
  await installAudit(db.sql);
  await auditPurges(db.sql);
  await createRunsTable(db.sql);
  await addPerSecondSchedule(db.sql, "default", "test.record");
  await insertDead(db.sql, 1, 3_600_000);
  await using proc = spawnShoal([
    "--role",
    "all",
    "--lease",
    "3s",
    "--interval",
    "1s",
    "--dead-retention",
    "1s",
    "--poll-interval",
    "100ms",
    "--visibility-timeout",
    "5s",
    "--shutdown-grace",
    "1s",
    "--log-format",
    "json",
  ], { url: withApplicationName(db.url, "shoal all"), mainModule: TEST_MAIN });
  await waitFor("3 scheduled jobs to run", async () => {
    const [row] = await db.sql<{ n: number }[]>`
      select count(*)::int as n from test_runs where finished_at is not null`;
    return row!.n >= 3;
  }, 30_000);
  await waitFor("the old dead job to be purged", () => purged(db.sql, 1), 20_000);
  const leases = await db.sql<{ name: string; holder: string }[]>`
    select name, holder from shoal.leases where expires_at > now() order by name`;
  assertEquals([...leases], [
    { name: "reaper", holder: holderOf(proc) },
    { name: "scheduler", holder: holderOf(proc) },
  ]);
  const output = await stopGracefully(proc);
  assertEquals(logged(output, "Released the reaper lease"), 1, output);
  assertEquals(logged(output, "Released the scheduler lease"), 1, output);

  await checkChain(db.sql, false);
  const runs = await db.sql<{ job_id: string; n: number }[]>`
    select job_id, count(*)::int as n from test_runs group by job_id order by job_id`;
  assertEquals(runs.filter((r) => r.n !== 1), [], "a scheduled job ran twice");
  const left = await db.sql<{ id: string }[]>`select id from shoal.jobs order by id`;
  const fired = (await enqueueEvents(db.sql)).map((e) => e.job_id).sort();
  assertEquals(
    [...runs.map((r) => r.job_id), ...left.map((j) => j.id)].sort(),
    fired,
    "every fired job either ran once or is still queued",
  );
  assertEquals((await purges(db.sql)).map((p) => `${p.id} by ${p.proc}`), ["1 by shoal all"]);
});

Deno.test("--role all: a role failing at start stops the others gracefully, releasing the reaper lease, and exits 1", async () => {
  await using db = await testDb();
  await installAudit(db.sql);
  const file = await Deno.makeTempFile({ suffix: ".json" });
  const locker = await db.sql.reserve();
  try {
    await Deno.writeTextFile(file, JSON.stringify([{ name: "a", cron: "0 * * * *", task: "t" }]));
    // The schedules sync waits for this lock and fails after 2 s; the reaper leads by then.
    await locker`begin`;
    await locker`lock table shoal.schedules in exclusive mode`;
    const url = new URL(withApplicationName(db.url, "shoal all"));
    url.searchParams.set("options", "-c lock_timeout=2000");
    await using proc = spawnShoal([
      "--role",
      "all",
      "--schedules",
      file,
      "--lease",
      "30s",
      "--interval",
      "500ms",
      "--poll-interval",
      "100ms",
      "--shutdown-grace",
      "1s",
      "--log-format",
      "json",
    ], { url: url.toString() });
    const exit = await exitWithin(proc, 15_000);
    assertEquals(exit.code, 1, exit.output);
    const last = exit.output.trimEnd().split("\n").at(-1) ?? "";
    assert(/^shoal: .*lock timeout/.test(last), exit.output);
    assertEquals(leaseShape(await leaseEvents(db.sql, "reaper")), [
      `acquire ${holderOf(proc)} term 1`,
      `release ${holderOf(proc)} term 1`,
    ]);
    assertEquals(logged(exit.output, "Released the reaper lease"), 1, exit.output);
    assertEquals(logged(exit.output, "Consumer stopped"), 1, exit.output);
  } finally {
    await locker`rollback`;
    locker.release();
    await Deno.remove(file);
  }
});

Deno.test("a leader whose connections were cut just before SIGTERM releases its lease and exits at once: the standby leads at once", async () => {
  await using db = await testDb();
  await using a = reaper(db.url, "shoal reaper A");
  await using b = reaper(db.url, "shoal reaper B");
  const leader = await waitForLeader(db.sql, "reaper", [a, b]);
  const standby = leader === a ? b : a;
  const leaderTag = leader === a ? "shoal reaper A" : "shoal reaper B";
  // A pooler, a firewall or an operator ends the leader's idle connections; then the
  // orchestrator stops it. The release's first try meets a dead connection.
  const pids = await db.sql<{ pid: number }[]>`
    select pid from pg_stat_activity
    where application_name = ${leaderTag} and datname = current_database()`;
  assert(pids.length > 0, "the leader had no connection to cut");
  for (const { pid } of pids) await db.sql`select pg_terminate_backend(${pid}::integer)`;
  leader.kill("SIGTERM");
  const { code, elapsedMs, output: leaderOutput } = await exitWithin(leader, 15_000);
  assertEquals(code, 0, leaderOutput);
  assertEquals(logged(leaderOutput, "Released the reaper lease"), 1, leaderOutput);
  // Closing the pool does not wait on the cut connections (postgres.js can leave their end
  // unsettled): it took the pool's end timeout, 5 s, before it became 1 s.
  assert(elapsedMs < 4000, `the stop took ${elapsedMs} ms`);
  // The lease is 20 s: leading within 5 s means the release landed, not that it expired.
  await waitFor("the standby to lead", () => leaderOf(db.sql, "reaper", [standby]), 5_000);
  await stopGracefully(standby);
});
