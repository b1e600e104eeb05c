import { assert, assertEquals, assertExists, assertRejects } from "./assert.ts";
import { connect } from "../lib/db.ts";
import { acquire, LeaseLostError } from "../lib/lease.ts";
import { checkCron, nextSlot } from "../lib/cron.ts";
import {
  advanceSchedules,
  checkSchedule,
  claimDueSchedules,
  disableSchedule,
  listSchedules,
  loadSchedulesFile,
  nextScheduleDueInMs,
  recordScheduleError,
  removeSchedule,
  setScheduleBaselines,
  setScheduleEnabled,
  syncSchedules,
  upsertSchedule,
} from "../lib/schedule.ts";
import { SCHEDULER_LEASE, tickOnce } from "../lib/scheduler.ts";
import { registerTasks, type TestDb, testDb } from "./helpers.ts";
import postgres from "postgres";
import type { Sql } from "../lib/db.ts";

const T0 = new Date("2030-01-01T00:00:00Z");
const at = (ms: number) => new Date(T0.getTime() + ms);

/** The fired jobs' slots (from their dedupe keys), oldest first. */
async function firedSlots(db: TestDb, name: string): Promise<string[]> {
  const rows = await db.sql<{ key: string }[]>`
    select key from shoal.jobs where key like ${`schedule:${name}:%`} order by key`;
  return rows.map((r) => r.key.slice(`schedule:${name}:`.length));
}

Deno.test("checkCron() accepts 5 and 6 fields and rejects what cron-parser would wrongly accept", async () => {
  await checkCron("*/5 * * * *");
  await checkCron("0 */10 * * * *");
  for (const bad of ["", "   ", "* * * *", "* * * * * * *", "61 * * * *", "not cron at all"]) {
    let caught: unknown;
    try {
      await checkCron(bad);
    } catch (error) {
      caught = error;
    }
    assert.ok(caught instanceof RangeError, `"${bad}" should be rejected`);
    assert.match((caught as Error).message, /^Cannot parse cron expression/);
  }
});

Deno.test("checkSchedule() rejects bad names, time zones and payloads with one clear line", async () => {
  const ok = { name: "nightly", cron: "0 3 * * *", task: "t" };
  assertEquals((await checkSchedule(ok)).tz, "UTC");
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ ...ok, name: "bad name" }, /Invalid schedule name/],
    [{ ...ok, name: "'; drop table shoal.jobs; --" }, /Invalid schedule name/],
    [{ ...ok, tz: "Mars/Olympus" }, /Invalid time zone "Mars\/Olympus"/],
    [{ ...ok, payload: [1] }, /Invalid payload/],
    [{ ...ok, cron: "* * * *" }, /Cannot parse cron expression/],
    [{ ...ok, task: "" }, /Invalid task name/],
  ];
  for (const [spec, pattern] of cases) {
    let caught: unknown;
    try {
      await checkSchedule(spec as never);
    } catch (error) {
      caught = error;
    }
    assertExists(caught, JSON.stringify(spec));
    assert.match((caught as Error).message, pattern);
    assert.ok(!(caught as Error).message.includes("\n"));
  }
});

Deno.test("nextSlot() fires at the right instants across DST changes in a named time zone", async () => {
  // New York springs forward on 2030-03-10 (02:00 -> 03:00) and falls back on 2030-11-03.
  const tz = "America/New_York";
  // 01:30 local daily: unaffected by the jump, always 01:30 local.
  assertEquals(
    (await nextSlot("30 1 * * *", tz, new Date("2030-03-09T12:00:00Z"))).toISOString(),
    "2030-03-10T06:30:00.000Z",
  );
  assertEquals(
    (await nextSlot("30 1 * * *", tz, new Date("2030-03-10T12:00:00Z"))).toISOString(),
    "2030-03-11T05:30:00.000Z",
  );
  // 09:00 local: EST (UTC-5) before, EDT (UTC-4) after.
  assertEquals(
    (await nextSlot("0 9 * * *", tz, new Date("2030-03-09T15:00:00Z"))).toISOString(),
    "2030-03-10T13:00:00.000Z",
  );
  assertEquals(
    (await nextSlot("0 9 * * *", tz, new Date("2030-11-02T14:00:00Z"))).toISOString(),
    "2030-11-03T14:00:00.000Z",
  );
  // Hourly across the fall-back: every real hour fires once, none skipped.
  let t = new Date("2030-11-03T04:30:00Z"); // 00:30 EDT
  const fires: string[] = [];
  for (let i = 0; i < 4; i++) {
    t = await nextSlot("0 * * * *", tz, t);
    fires.push(t.toISOString());
  }
  assertEquals(fires, [
    "2030-11-03T05:00:00.000Z",
    "2030-11-03T06:00:00.000Z",
    "2030-11-03T07:00:00.000Z",
    "2030-11-03T08:00:00.000Z",
  ]);
});

Deno.test("tickOnce() records a baseline for a new schedule without firing, then fires each due slot once", async () => {
  await using db = await testDb();
  await upsertSchedule(db.sql, {
    name: "min",
    cron: "* * * * *",
    task: "shoal.noop",
    queue: "cron",
  });
  const first = await tickOnce(db.sql, { now: at(10_000) });
  assertEquals([first.fired, first.baselined], [0, 1]);
  assertEquals(await firedSlots(db, "min"), []);
  const [row] = await listSchedules(db.sql);
  assertEquals(row?.next_run_at?.toISOString(), "2030-01-01T00:01:00.000Z");
  assertEquals(first.nextDueInMs, 50_000);
  // Not yet due.
  assertEquals((await tickOnce(db.sql, { now: at(59_999) })).fired, 0);
  // Due: fires once, advances in the same transaction.
  const fired = await tickOnce(db.sql, { now: at(60_000) });
  assertEquals(fired.fired, 1);
  assertEquals((await tickOnce(db.sql, { now: at(60_500) })).fired, 0, "never twice");
  assertEquals(await firedSlots(db, "min"), ["2030-01-01T00:01:00.000Z"]);
  const [job] = await db.sql`select queue, task from shoal.jobs`;
  assertEquals([job?.queue, job?.task], ["cron", "shoal.noop"]);
});

Deno.test("tickOnce() fires a schedule without a queue into its task's catalog queue as of the fire", async () => {
  await using db = await testDb();
  // Added before any consumer registered app.greet; a second one pinned to a queue.
  await upsertSchedule(db.sql, { name: "greet", cron: "* * * * *", task: "app.greet" });
  await upsertSchedule(db.sql, {
    name: "pinned",
    cron: "* * * * *",
    task: "app.greet",
    queue: "p",
  });
  await tickOnce(db.sql, { now: at(0) }); // baselines
  await tickOnce(db.sql, { now: at(60_000) });
  // A consumer that runs app.greet on queue app registers it.
  await registerTasks(db.sql, ["app.greet"], {
    queues: ["app"],
    settings: { queue: "app", maxAttempts: 3 },
  });
  await tickOnce(db.sql, { now: at(120_000) });
  const jobs = await db.sql<{ key: string; queue: string; max_attempts: number }[]>`
    select key, queue, max_attempts from shoal.jobs order by key`;
  assertEquals(jobs.map((j) => [j.key.slice("schedule:".length), j.queue, j.max_attempts]), [
    ["greet:2030-01-01T00:01:00.000Z", "default", 25],
    ["greet:2030-01-01T00:02:00.000Z", "app", 3],
    ["pinned:2030-01-01T00:01:00.000Z", "p", 25],
    ["pinned:2030-01-01T00:02:00.000Z", "p", 3],
  ]);
});

Deno.test("tickOnce() fires missed slots once, coalesced, then moves to the next future slot", async () => {
  await using db = await testDb();
  await upsertSchedule(db.sql, { name: "min", cron: "* * * * *", task: "shoal.noop" });
  await tickOnce(db.sql, { now: at(0) }); // baseline: next 00:01
  // The scheduler was down for an hour.
  const result = await tickOnce(db.sql, { now: at(3_600_000 + 30_000) });
  assertEquals(result.fired, 1);
  assertEquals(await firedSlots(db, "min"), ["2030-01-01T00:01:00.000Z"]);
  const [row] = await listSchedules(db.sql);
  assertEquals(row?.next_run_at?.toISOString(), "2030-01-01T01:01:00.000Z");
});

Deno.test("tickOnce() with backfill fires each missed slot up to the bound, oldest first; coalesce stays the default", async () => {
  await using db = await testDb();
  await upsertSchedule(db.sql, { name: "coalesce", cron: "* * * * *", task: "shoal.noop" });
  await upsertSchedule(db.sql, {
    name: "five",
    cron: "* * * * *",
    task: "shoal.noop",
    backfill: 5,
  });
  await upsertSchedule(db.sql, {
    name: "all",
    cron: "* * * * *",
    task: "shoal.noop",
    backfill: 1000,
  });
  await tickOnce(db.sql, { now: at(0) }); // baselines: next 00:01
  // Down for ten minutes: slots 00:01 to 00:10 missed.
  const tick = await tickOnce(db.sql, { now: at(10 * 60_000 + 30_000) });
  assertEquals(tick.fired, 1 + 5 + 10);
  const minute = (m: number) => at(m * 60_000).toISOString();
  assertEquals(await firedSlots(db, "coalesce"), [minute(1)]);
  assertEquals(await firedSlots(db, "five"), [1, 2, 3, 4, 5].map(minute));
  assertEquals(await firedSlots(db, "all"), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10].map(minute));
  for (const row of await listSchedules(db.sql)) {
    assertEquals(row.next_run_at?.toISOString(), minute(11), row.name);
  }
  assertEquals((await tickOnce(db.sql, { now: at(10 * 60_000 + 40_000) })).fired, 0);
  // On time, a backfilling schedule fires its one due slot like any other.
  assertEquals((await tickOnce(db.sql, { now: at(11 * 60_000) })).fired, 3);
  // The bound is checked where a schedule comes in, and by the column.
  for (const backfill of [-1, 1001, 1.5]) {
    await assertRejects(
      () => upsertSchedule(db.sql, { name: "x", cron: "* * * * *", task: "t", backfill }),
      RangeError,
      "Invalid backfill for schedule x",
    );
  }
  await assertRejects(() => db.sql`update shoal.schedules set backfill = 1001 where name = 'five'`);
});

Deno.test("tickOnce() disables a row with an invalid cron or time zone once and keeps firing the others", async () => {
  await using db = await testDb();
  await upsertSchedule(db.sql, { name: "good", cron: "* * * * *", task: "shoal.noop" });
  // Rows written by hand (or an older binary) can hold what the CLI would refuse.
  await db
    .sql`insert into shoal.schedules (name, cron, task) values ('bad-cron', '* * * *', 'shoal.noop')`;
  await db
    .sql`insert into shoal.schedules (name, cron, tz, task) values ('bad-tz', '* * * * *', 'Nowhere/Land', 'shoal.noop')`;
  const first = await tickOnce(db.sql, { now: at(0) });
  assertEquals([first.baselined, first.disabled], [1, 2]);
  const rows = Object.fromEntries((await listSchedules(db.sql)).map((r) => [r.name, r]));
  assertEquals(rows["bad-cron"]?.enabled, false);
  assert.match(rows["bad-cron"]?.last_error ?? "", /Cannot parse cron expression "\* \* \* \*"/);
  assert.match(rows["bad-tz"]?.last_error ?? "", /Invalid time zone "Nowhere\/Land"/);
  const second = await tickOnce(db.sql, { now: at(60_000) });
  assertEquals([second.fired, second.disabled], [1, 0], "disabled rows are not looked at again");
});

Deno.test("tickOnce() isolates a row that fails to fire: recorded once, disabled when permanent, others still fire", async () => {
  await using db = await testDb();
  await upsertSchedule(db.sql, { name: "a", cron: "* * * * *", task: "shoal.noop" });
  await upsertSchedule(db.sql, {
    name: "big",
    cron: "* * * * *",
    task: "shoal.noop",
    payload: { s: "x".repeat(200) },
  });
  await upsertSchedule(db.sql, { name: "z", cron: "* * * * *", task: "shoal.noop" });
  await tickOnce(db.sql, { now: at(0) });
  // The payload limit drops below "big"'s payload: enqueue will fail for that row only.
  await db.sql`alter database ${db.sql(db.name)} set shoal.max_payload_bytes = '100'`;
  const limited = connect(db.url, { applicationName: "shoal test", max: 2 });
  try {
    const tick = await tickOnce(limited, { now: at(60_000) });
    assertEquals([tick.fired, tick.failed], [2, 1]);
  } finally {
    await limited.end();
  }
  assertEquals(await firedSlots(db, "a"), ["2030-01-01T00:01:00.000Z"]);
  assertEquals(await firedSlots(db, "z"), ["2030-01-01T00:01:00.000Z"]);
  assertEquals(await firedSlots(db, "big"), []);
  const big = (await listSchedules(db.sql)).find((r) => r.name === "big");
  assertEquals(big?.enabled, false, "a payload over the limit fails every time: disabled");
  assert.match(big?.last_error ?? "", /over the limit/);
});

/** A pool that counts the statements it sends (begin, savepoints and commits included). */
function countingPool(url: string): { sql: Sql; statements: () => number } {
  let count = 0;
  const sql = postgres(url, {
    max: 4,
    onnotice: () => {},
    debug: () => count++,
  }) as unknown as Sql;
  return { sql, statements: () => count };
}

Deno.test("tickOnce() fires 300 due schedules exactly once in one batch of a few statements, disabling only a bad row", async () => {
  await using db = await testDb();
  // 300 rows due at 00:01 (their baselines recorded), one of them on shoal.noop's catalog
  // queue, and a row written by plain SQL whose cron cannot be read.
  await db.sql`
    insert into shoal.schedules (name, cron, task, queue, next_run_at)
    select 's' || lpad(i::text, 3, '0'), '* * * * *', 'shoal.noop',
           case when i = 1 then null else 'cron' end, ${at(60_000)}::timestamptz
    from generate_series(1, 300) i`;
  await db.sql`
    insert into shoal.schedules (name, cron, task, next_run_at)
    values ('bad', '* * * 99 *', 'shoal.noop', ${at(60_000)}::timestamptz)`;
  const counted = countingPool(db.url);
  try {
    const tick = await tickOnce(counted.sql, { now: at(60_000) });
    assertEquals([tick.fired, tick.disabled, tick.failed], [300, 1, 0]);
    // One transaction: next-due read, begin, claim, disable, savepoint, insert, advance,
    // release, commit, next-due read. Batches of one row took 1,810.
    assert.ok(counted.statements() <= 15, `${counted.statements()} statements`);
    assertEquals((await tickOnce(counted.sql, { now: at(60_500) })).fired, 0, "never twice");
  } finally {
    await counted.sql.end();
  }
  const [jobs] = await db.sql<{ jobs: number; slots: number; queues: string[] }[]>`
    select count(*)::int as jobs, count(distinct key)::int as slots,
           array_agg(distinct queue order by queue) as queues
    from shoal.jobs where key like 'schedule:%:2030-01-01T00:01:00.000Z'`;
  assertEquals([jobs?.jobs, jobs?.slots, jobs?.queues], [300, 300, ["cron", "default"]]);
  const rows = await listSchedules(db.sql);
  const bad = rows.find((r) => r.name === "bad");
  assertEquals(bad?.enabled, false);
  assert.match(bad?.last_error ?? "", /Cannot parse cron expression "\* \* \* 99 \*"/);
  const advanced = rows.filter((r) => r.name !== "bad");
  assert.ok(
    advanced.every((r) =>
      r.next_run_at?.toISOString() === "2030-01-01T00:02:00.000Z" &&
      r.last_run_at?.toISOString() === at(60_000).toISOString()
    ),
  );
  // Small batches, two schedulers at once: still every slot exactly once.
  const [a, b] = await Promise.all([
    tickOnce(db.sql, { now: at(120_000), batchSize: 64 }),
    tickOnce(db.sql, { now: at(120_000), batchSize: 64 }),
  ]);
  assertEquals(a.fired + b.fired, 300);
  const [after] = await db.sql<{ jobs: number; slots: number }[]>`
    select count(*)::int as jobs, count(distinct key)::int as slots from shoal.jobs`;
  assertEquals([after?.jobs, after?.slots], [600, 600]);
});

Deno.test("tickOnce() with a stale lease term fires nothing", async () => {
  await using db = await testDb();
  await upsertSchedule(db.sql, { name: "min", cron: "* * * * *", task: "shoal.noop" });
  const term =
    (await acquire(db.sql, { name: SCHEDULER_LEASE, holder: "a", ttlMs: 1000, now: at(0) }))!;
  await tickOnce(db.sql, { term, now: at(0) });
  await acquire(db.sql, { name: SCHEDULER_LEASE, holder: "b", ttlMs: 120_000, now: at(2000) });
  await assertRejects(() => tickOnce(db.sql, { term, now: at(60_000) }), LeaseLostError);
  assertEquals(await firedSlots(db, "min"), []);
});

Deno.test("tickOnce() run by two schedulers at once fires every slot exactly once", async () => {
  await using db = await testDb();
  for (let i = 0; i < 50; i++) {
    await upsertSchedule(db.sql, { name: `s${i}`, cron: "* * * * *", task: "shoal.noop" });
  }
  await tickOnce(db.sql, { now: at(0) });
  for (const minute of [1, 2, 3]) {
    const [a, b] = await Promise.all([
      tickOnce(db.sql, { now: at(minute * 60_000) }),
      tickOnce(db.sql, { now: at(minute * 60_000) }),
    ]);
    assertEquals(a.fired + b.fired, 50);
  }
  const [{ jobs, slots }] = await db.sql`
    select count(*)::int as jobs, count(distinct key)::int as slots from shoal.jobs` as unknown as [
    { jobs: number; slots: number },
  ];
  assertEquals([jobs, slots], [150, 150]);
});

Deno.test("schedule management: upsert updates, pause/resume re-baselines, remove", async () => {
  await using db = await testDb();
  assertEquals(
    await upsertSchedule(db.sql, { name: "n", cron: "* * * * *", task: "t" }),
    "created",
  );
  assertEquals(
    await upsertSchedule(db.sql, { name: "n", cron: "* * * * *", task: "t" }),
    "unchanged",
  );
  await tickOnce(db.sql, { now: at(0) });
  assertEquals(
    await upsertSchedule(db.sql, { name: "n", cron: "*/5 * * * *", task: "t" }),
    "updated",
  );
  let [row] = await listSchedules(db.sql);
  assertEquals(row?.next_run_at, null, "a new cron records a fresh baseline");
  await tickOnce(db.sql, { now: at(0) });
  assertEquals(await setScheduleEnabled(db.sql, "n", false), true);
  assertEquals((await tickOnce(db.sql, { now: at(3_600_000) })).fired, 0, "paused");
  assertEquals(await setScheduleEnabled(db.sql, "n", true), true);
  [row] = await listSchedules(db.sql);
  assertEquals(row?.next_run_at, null, "resuming does not fire the slots missed while paused");
  const resumed = await tickOnce(db.sql, { now: at(3_600_000) });
  assertEquals([resumed.fired, resumed.baselined], [0, 1]);
  assertEquals(await setScheduleEnabled(db.sql, "missing", true), false);
  assertEquals(await removeSchedule(db.sql, "n"), true);
  assertEquals(await removeSchedule(db.sql, "n"), false);
});

Deno.test("syncSchedules() creates, updates and removes file-managed rows, leaving manual rows alone", async () => {
  await using db = await testDb();
  await upsertSchedule(db.sql, { name: "manual", cron: "* * * * *", task: "t" });
  let result = await syncSchedules(db.sql, [
    { name: "a", cron: "* * * * *", task: "t" },
    { name: "b", cron: "0 * * * *", task: "t" },
  ]);
  assertEquals(result, { created: ["a", "b"], updated: [], removed: [] });
  result = await syncSchedules(db.sql, [{ name: "a", cron: "*/2 * * * *", task: "t" }]);
  assertEquals(result, { created: [], updated: ["a"], removed: ["b"] });
  assertEquals((await listSchedules(db.sql)).map((r) => `${r.name}:${r.source}`), [
    "a:file",
    "manual:manual",
  ]);
  await assertRejects(
    () =>
      syncSchedules(db.sql, [{ name: "a", cron: "* * * * *", task: "t" }, {
        name: "a",
        cron: "* * * * *",
        task: "t",
      }]),
    RangeError,
    "named twice",
  );
});

Deno.test("loadSchedulesFile() reports a malformed file in one clear line", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const cases: [string, RegExp][] = [
      ["{not json", /Cannot parse schedules file/],
      ['{"nope": 1}', /expected a JSON array/],
      ['[{"name": "x", "cron": "* * * *", "task": "t"}]', /entry 1: Cannot parse cron expression/],
      [
        '[{"name": "x", "cron": "* * * * *", "task": "t", "tz": "No/Where"}]',
        /entry 1: Invalid time zone/,
      ],
    ];
    for (const [text, pattern] of cases) {
      await Deno.writeTextFile(`${dir}/s.json`, text);
      const error = await assertRejects(() => loadSchedulesFile(`${dir}/s.json`));
      assert.match(error.message, pattern);
    }
    await assertRejects(
      () => loadSchedulesFile(`${dir}/missing.json`),
      Error,
      "Cannot read schedules file",
    );
    await Deno.writeTextFile(
      `${dir}/s.json`,
      '{"schedules": [{"name": "x", "cron": "0 0 * * *", "task": "t"}]}',
    );
    assertEquals((await loadSchedulesFile(`${dir}/s.json`)).map((s) => s.name), ["x"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("upsertSchedule() re-enables a schedule an error disabled on any change, not a paused one", async () => {
  await using db = await testDb();
  await upsertSchedule(db.sql, { name: "broken", cron: "* * * * *", task: "t" });
  await upsertSchedule(db.sql, { name: "paused", cron: "* * * * *", task: "t" });
  await db.sql`
    update shoal.schedules set enabled = false, last_error = 'payload over the limit'
    where name = 'broken'`;
  await setScheduleEnabled(db.sql, "paused", false);
  // A payload-only fix (same cron) is enough to bring the disabled row back.
  assertEquals(
    await upsertSchedule(db.sql, {
      name: "broken",
      cron: "* * * * *",
      task: "t",
      payload: { a: 1 },
    }),
    "updated",
  );
  await upsertSchedule(db.sql, { name: "paused", cron: "* * * * *", task: "t", payload: { a: 1 } });
  const rows = Object.fromEntries((await listSchedules(db.sql)).map((r) => [r.name, r]));
  assertEquals([rows.broken?.enabled, rows.broken?.last_error], [true, null]);
  assertEquals(rows.paused?.enabled, false, "a paused schedule stays paused");
});

/** The first row claimDueSchedules() locks, as the old one-row claim did. */
async function claimOne(
  tx: Parameters<typeof claimDueSchedules>[0],
  options: { now: Date; skip?: string[] },
) {
  return (await claimDueSchedules(tx, { ...options, limit: 1 }))[0] ?? null;
}

Deno.test("claimDueSchedules() locks the most overdue enabled rows not skipped, and passes over locked ones", async () => {
  await using db = await testDb();
  for (const name of ["a", "b", "c", "off"]) {
    await upsertSchedule(db.sql, { name, cron: "* * * * *", task: "t" });
  }
  await db.sql`update shoal.schedules set next_run_at = ${
    at(60_000)
  }::timestamptz where name = 'a'`;
  await db.sql`update shoal.schedules set next_run_at = ${at(0)}::timestamptz where name = 'b'`;
  await db.sql`update shoal.schedules set next_run_at = ${
    at(600_000)
  }::timestamptz where name = 'c'`;
  await setScheduleEnabled(db.sql, "off", false);
  const now = at(120_000);
  await db.sql.begin(async (tx) => {
    const first = await claimOne(tx, { now });
    assertEquals([first?.name, first?.db_now.toISOString()], ["b", now.toISOString()]);
    // Another scheduler skips the locked row and finds the next due one.
    await db.sql.begin(async (other) => {
      assertEquals((await claimOne(other, { now }))?.name, "a");
    });
    assertEquals((await claimOne(tx, { now, skip: ["b", "a"] }))?.name, undefined);
  });
  // A row without next_run_at is due at once (it needs its baseline) and comes first.
  await db.sql`update shoal.schedules set next_run_at = null where name = 'c'`;
  assertEquals((await claimOne(db.sql, { now }))?.name, "c");
  // A batch: every due row, most overdue first (c has no baseline, so it comes first).
  await db.sql.begin(async (tx) => {
    const rows = await claimDueSchedules(tx, { now, limit: 10 });
    assertEquals(rows.map((r) => r.name), ["c", "b", "a"]);
    await db.sql.begin(async (other) => {
      assertEquals((await claimDueSchedules(other, { now, limit: 10 })).length, 0);
    });
  });
  assertEquals((await claimDueSchedules(db.sql, { now, limit: 2 })).map((r) => r.name), [
    "c",
    "b",
  ]);
});

Deno.test("nextScheduleDueInMs() is the wait for the soonest enabled row not skipped, 0 or less when due, null with none", async () => {
  await using db = await testDb();
  assertEquals(await nextScheduleDueInMs(db.sql, { now: at(0) }), null);
  await upsertSchedule(db.sql, { name: "a", cron: "* * * * *", task: "t" });
  await upsertSchedule(db.sql, { name: "b", cron: "* * * * *", task: "t" });
  assertEquals(await nextScheduleDueInMs(db.sql, { now: at(0) }), 0, "no baseline yet: due");
  await setScheduleBaselines(db.sql, [{ name: "a", next: at(30_000) }, {
    name: "b",
    next: at(90_000),
  }]);
  assertEquals(await nextScheduleDueInMs(db.sql, { now: at(0) }), 30_000);
  assertEquals(await nextScheduleDueInMs(db.sql, { now: at(40_000) }), -10_000);
  assertEquals(await nextScheduleDueInMs(db.sql, { now: at(0), skip: ["a"] }), 90_000);
  await setScheduleEnabled(db.sql, "b", false);
  assertEquals(await nextScheduleDueInMs(db.sql, { now: at(0), skip: ["a"] }), null);
});

Deno.test("advanceSchedules(), disableSchedule() and recordScheduleError() write what the tick records", async () => {
  await using db = await testDb();
  await upsertSchedule(db.sql, { name: "s", cron: "* * * * *", task: "t" });
  const row = async () => (await listSchedules(db.sql))[0]!;
  await db.sql`update shoal.schedules set last_error = 'old' where name = 's'`;
  await advanceSchedules(db.sql, [{ name: "s", next: at(120_000) }], at(60_000));
  let r = await row();
  assertEquals(
    [r.next_run_at?.toISOString(), r.last_run_at?.toISOString(), r.last_error],
    [at(120_000).toISOString(), at(60_000).toISOString(), null],
  );
  // An error is written once per distinct message; a permanent one disables the row.
  assertEquals(await recordScheduleError(db.sql, "s", { message: "boom", disable: false }), true);
  assertEquals(await recordScheduleError(db.sql, "s", { message: "boom", disable: false }), false);
  r = await row();
  assertEquals([r.enabled, r.last_error], [true, "boom"]);
  assertEquals(await recordScheduleError(db.sql, "s", { message: "bad", disable: true }), true);
  r = await row();
  assertEquals([r.enabled, r.last_error], [false, "bad"]);
  await setScheduleEnabled(db.sql, "s", true);
  await disableSchedule(db.sql, "s", "Invalid cron");
  r = await row();
  assertEquals([r.enabled, r.next_run_at, r.last_error], [false, null, "Invalid cron"]);
});
