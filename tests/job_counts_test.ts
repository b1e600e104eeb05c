/**
 * The reads of the jobs tables (lib/queue.ts) against real Postgres: countJobs() as
 * `shoal status` and /metrics use it, jobTotals() behind `status --watch` rates, and
 * listStuckJobs() behind the reaper's report.
 */
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { testDb, waitFor } from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import {
  claim,
  countJobs,
  enqueue,
  enqueueMany,
  extend,
  fail,
  type JobSpec,
  jobTotals,
  listStuckJobs,
  type QueueCounts,
  release,
} from "../lib/queue.ts";
import { queueStatus } from "../lib/status.ts";
import { reportInFlight } from "../lib/catalog.ts";
import { registerTasks } from "./helpers.ts";

/** Claim `n` jobs of `queue` (all there are) for a minute. */
async function claimAll(sql: Sql, queue: string, n: number) {
  const { jobs } = await claim(sql, {
    queues: [queue],
    limit: n,
    workerId: "test:1",
    visibilityMs: 60_000,
  });
  assertEquals(jobs.length, n);
  return jobs;
}

/** The rows with the age checked against bounds and then left out. */
function withoutAge(rows: QueueCounts[], ages: Record<string, [number, number]>) {
  return rows.map(({ oldest_ready_age_s: age, ...rest }) => {
    const [min, max] = ages[rest.queue] ?? [0, 0];
    assert(
      age >= min && age <= max,
      `${rest.queue}: oldest_ready_age_s ${age} not in ${min}..${max}`,
    );
    return rest;
  });
}

/**
 * Queue a: one running, one waiting out a retry, one dead, one ready since a minute ago;
 * queue b: two dead jobs only.
 */
async function mixedQueues(sql: Sql): Promise<void> {
  await enqueue(sql, "t", {}, { queue: "a" });
  await enqueue(sql, "t", {}, { queue: "a" });
  await enqueue(sql, "t", {}, { queue: "a" });
  const [, retry, die] = await claimAll(sql, "a", 3);
  assertEquals(await fail(sql, retry!, { error: "later", retryInMs: 600_000 }), "retried");
  assertEquals(await fail(sql, die!, { error: "no", retryInMs: 0, permanent: true }), "dead");
  const [{ past }] = await sql<[{ past: Date }]>`select now() - interval '60 s' as past`;
  await enqueue(sql, "t", {}, { queue: "a", runAt: past });
  for (let i = 0; i < 2; i++) {
    await enqueue(sql, "t", {}, { queue: "b" });
    const [job] = await claimAll(sql, "b", 1);
    assertEquals(await fail(sql, job!, { error: "x", retryInMs: 0, permanent: true }), "dead");
  }
}

Deno.test("countJobs() of an empty database is [], with or without dead letters", async () => {
  await using db = await testDb();
  assertEquals(await countJobs(db.sql), []);
  assertEquals(await countJobs(db.sql, { dead: true }), []);
});

Deno.test("countJobs() counts live jobs per queue, and dead letters only when asked", async () => {
  await using db = await testDb();
  await mixedQueues(db.sql);

  const live = await countJobs(db.sql);
  assertEquals(withoutAge(live, { a: [60, 90] }), [
    { queue: "a", ready: 1, scheduled: 1, running: 1, prefetched: 0, exact: true },
  ]);
  assert(!("dead" in live[0]!), "no dead count unless asked");

  const all = await countJobs(db.sql, { dead: true });
  assertEquals(withoutAge(all, { a: [60, 90] }), [
    { queue: "a", ready: 1, scheduled: 1, running: 1, prefetched: 0, dead: 1, exact: true },
    { queue: "b", ready: 0, scheduled: 0, running: 0, prefetched: 0, dead: 2, exact: true },
  ]);
  // The key order `shoal status --json` has always printed, keys only ever added.
  assertEquals(Object.keys(all[0]!), [
    "queue",
    "ready",
    "scheduled",
    "running",
    "prefetched",
    "dead",
    "oldest_ready_age_s",
    "exact",
  ]);
});

Deno.test("countJobs() tells running jobs from prefetched ones: claim() records the starting ones, extend() later starts, release() and a retry clear it", async () => {
  await using db = await testDb();
  const ids = [];
  for (let i = 0; i < 5; i++) ids.push(await enqueue(db.sql, "t", { i }, { queue: "q" }));
  const counts = async () => {
    const [row] = await countJobs(db.sql);
    return { running: row!.running, prefetched: row!.prefetched };
  };
  const started = async () =>
    (await db.sql<{ id: string }[]>`
      select id from shoal.jobs where started_at is not null order by id`).map((r) => r.id);

  // Two of four start at once (the first two in claim order); two wait in a buffer.
  const { jobs } = await claim(db.sql, {
    queues: ["q"],
    limit: 4,
    workerId: "test:1",
    visibilityMs: 60_000,
    starting: 2,
  });
  assertEquals(jobs.map((j) => j.id), ids.slice(0, 4));
  assertEquals(await counts(), { running: 2, prefetched: 2 });
  assertEquals(await started(), ids.slice(0, 2));

  // A heartbeat extends all four and records the third's start (the first's is kept).
  const [a, b, c] = jobs;
  assertEquals((await extend(db.sql, jobs, 60_000, [a!.id, c!.id])).sort(), ids.slice(0, 4));
  assertEquals(await counts(), { running: 3, prefetched: 1 });
  assertEquals(await started(), ids.slice(0, 3));

  // A release (shutdown) and a retry clear it: neither job runs any more.
  assertEquals(await release(db.sql, [c!]), [c!.id]);
  assertEquals(await fail(db.sql, b!, { error: "later", retryInMs: 600_000 }), "retried");
  assertEquals(await counts(), { running: 1, prefetched: 1 });
  assertEquals(await started(), [a!.id]);

  // A claim given no count starts every job it claims; one given 0 none.
  const all = await claim(db.sql, { queues: ["q"], limit: 1, workerId: "t", visibilityMs: 60_000 });
  const none = await claim(db.sql, {
    queues: ["q"],
    limit: 5,
    workerId: "t",
    visibilityMs: 60_000,
    starting: 0,
  });
  assertEquals([all.jobs.length, none.jobs.length], [1, 1]);
  assertEquals(await started(), [a!.id, all.jobs[0]!.id].sort((x, y) => Number(x) - Number(y)));
});

Deno.test("countJobs() keeps the oldest ready age to the microsecond; shoal status rounds it to the ms", async () => {
  await using db = await testDb();
  await enqueue(db.sql, "t", {}, { queue: "a" });
  await enqueue(db.sql, "t", {}, { queue: "b" });
  await db.sql.begin(async (tx) => {
    // now() is the transaction's start: every read in it sees the same clock.
    await tx`update shoal.jobs set run_at = now() - interval '12.345678 s' where queue = 'a'`;
    await tx`update shoal.jobs set run_at = now() - interval '1.2345 s' where queue = 'b'`;
    assertEquals((await countJobs(tx)).map((r) => r.oldest_ready_age_s), [12.345678, 1.2345]);
    // As the statement rounded it before: round(numeric, 3), a half away from zero.
    assertEquals((await queueStatus(tx)).map((r) => r.oldest_ready_age_s), [12.346, 1.235]);
  });
});

Deno.test("countJobs() without dead letters neither reads nor waits for shoal.dead_jobs", async () => {
  await using db = await testDb();
  await mixedQueues(db.sql);
  const probe = await db.sql.reserve();
  try {
    await probe`set lock_timeout = '2s'`;
    await db.sql.begin(async (tx) => {
      // What a migration or a VACUUM FULL of the dead letters holds.
      await tx`lock table shoal.dead_jobs in access exclusive mode`;
      assertEquals((await countJobs(probe)).map((r) => r.queue), ["a"]);
      // The control: the count with dead letters does wait for that lock.
      await assertRejects(() => countJobs(probe, { dead: true }), Error, "lock timeout");
    });
  } finally {
    probe.release();
  }
});

/** Wait until Postgres counts `n` live rows in `table` (each backend reports within a second). */
async function untilCounted(sql: Sql, table: "jobs" | "dead_jobs", n: number): Promise<void> {
  await waitFor(
    `${n} live rows of shoal.${table} in pg_stat_user_tables`,
    async () => {
      const [row] = await sql<{ live: number }[]>`
      select n_live_tup::int as live from pg_stat_user_tables
      where schemaname = 'shoal' and relname = ${table}::text`;
      return row!.live === n;
    },
    20_000,
    100,
  );
}

/** Pages the main fork of `table` holds: the estimating path needs more than samplePages. */
async function pagesOf(sql: Sql, table: "jobs" | "dead_jobs"): Promise<number> {
  const [row] = await sql<{ pages: number }[]>`
    select (pg_relation_size(${"shoal." + table}::regclass)
            / current_setting('block_size')::bigint)::int as pages`;
  return row!.pages;
}

/**
 * Queue big: 3,000 ready jobs (the first 20 in claim order ready for two minutes, the rest
 * for ten seconds), the first 5 claimed (2 started, 3 buffered); queue mid: 100 ready jobs;
 * queue small: one ready, one scheduled.
 */
async function bigAndSmall(sql: Sql): Promise<void> {
  const [{ early, late }] = await sql<[{ early: Date; late: Date }]>`
    select now() - interval '120 s' as early, now() - interval '10 s' as late`;
  const jobs: JobSpec[] = [];
  for (let i = 0; i < 3000; i++) {
    jobs.push({ task: "t", queue: "big", payload: { i }, runAt: i < 20 ? early : late });
  }
  await enqueueMany(sql, jobs);
  await enqueueMany(sql, Array.from({ length: 100 }, () => ({ task: "m", queue: "mid" })));
  await enqueue(sql, "s", {}, { queue: "small" });
  await enqueue(sql, "s", {}, { queue: "small", runAt: new Date(Date.now() + 3_600_000) });
  const claimed = await claim(sql, {
    queues: ["big"],
    limit: 5,
    workerId: "test:1",
    visibilityMs: 600_000,
    starting: 2,
  });
  assertEquals(claimed.jobs.length, 5);
  await untilCounted(sql, "jobs", 3102);
}

/**
 * Limits that put bigAndSmall() on the estimating path (more jobs and pages than allowed):
 * probes of 20 jobs read small whole; mid (100 jobs, no more than 10 probes' worth) is read
 * along the index once the sample sized it, which a sample of nearly every page does.
 */
async function smallLimits(sql: Sql) {
  return { exactLimit: 100, samplePages: await pagesOf(sql, "jobs") - 2, probe: 20 };
}

Deno.test("countJobs() past its limits reads small queues whole, samples large ones and takes their running and prefetched jobs from live consumers' reports", async () => {
  await using db = await testDb();
  await bigAndSmall(db.sql);
  const limits = await smallLimits(db.sql);
  assert(limits.samplePages > 20, `${limits.samplePages} pages sampled`);
  const read = async () => {
    const rows = await countJobs(db.sql, { ...limits, readyByTask: true });
    assertEquals(rows.map((r) => r.queue), ["big", "mid", "small"]);
    return { big: rows[0]!, mid: rows[1]!, small: rows[2]! };
  };

  const { big, mid, small } = await read();
  // The small queue: counted whole by its probe, however large the table.
  assertEquals(withoutAge([small], { small: [0, 60] }), [{
    queue: "small",
    ready: 1,
    scheduled: 1,
    running: 0,
    prefetched: 0,
    ready_by_task: { s: 1 },
    exact: true,
  }]);
  // The mid one: read along the claim index once the sample found it small.
  assertEquals(withoutAge([mid], { mid: [0, 60] }), [{
    queue: "mid",
    ready: 100,
    scheduled: 0,
    running: 0,
    prefetched: 0,
    ready_by_task: { m: 100 },
    exact: true,
  }]);
  // The big one: ready from the sample, scaled to the rows Postgres counts (all sampled jobs
  // but the 5 claimed are ready); the claimed jobs as its probe saw them at the head, no
  // consumer having reported; the oldest ready age from the head of the claim order.
  assertEquals(big.exact, false);
  assert(big.ready >= 2900 && big.ready <= 3000, `big.ready ${big.ready}`);
  assertEquals([big.scheduled, big.running, big.prefetched], [0, 2, 3]);
  assertEquals(big.ready_by_task, { t: big.ready });
  assert(
    big.oldest_ready_age_s >= 120 && big.oldest_ready_age_s < 180,
    `big.oldest_ready_age_s ${big.oldest_ready_age_s}`,
  );

  // A live consumer's report counts (more than the probe saw)...
  await registerTasks(db.sql, ["t"], { workerId: "w:1", queues: ["big"] });
  await reportInFlight(db.sql, "w:1", new Map([["big", { running: 7, prefetched: 40 }]]), 60_000);
  const reported = (await read()).big;
  assertEquals([reported.running, reported.prefetched, reported.exact], [7, 40, false]);
  // ...until its claims would have lapsed.
  await db.sql`update shoal.consumers set in_flight_until = now() - interval '1 s'`;
  const lapsed = (await read()).big;
  assertEquals([lapsed.running, lapsed.prefetched], [2, 3]);

  // Asked for, every row is counted.
  const exact = await countJobs(db.sql, { ...limits, exact: true });
  assertEquals(withoutAge(exact, { big: [120, 180], mid: [0, 60], small: [0, 60] }), [
    { queue: "big", ready: 2995, scheduled: 0, running: 2, prefetched: 3, exact: true },
    { queue: "mid", ready: 100, scheduled: 0, running: 0, prefetched: 0, exact: true },
    { queue: "small", ready: 1, scheduled: 1, running: 0, prefetched: 0, exact: true },
  ]);
});

Deno.test("countJobs() counts along the claim index while Postgres counts at most exactLimit jobs, and estimates when its count proves stale", async () => {
  await using db = await testDb();
  const jobs: JobSpec[] = [];
  for (let i = 0; i < 300; i++) jobs.push({ task: "t", queue: "q", payload: { i } });
  await enqueueMany(db.sql, jobs);
  await untilCounted(db.sql, "jobs", 300);
  const limits = { samplePages: 2, probe: 20 };
  assert(await pagesOf(db.sql, "jobs") > limits.samplePages, "more pages than the sample reads");

  const counted = await countJobs(db.sql, { ...limits, exactLimit: 300 });
  assertEquals(withoutAge(counted, { q: [0, 60] }), [
    { queue: "q", ready: 300, scheduled: 0, running: 0, prefetched: 0, exact: true },
  ]);
  assertEquals((await countJobs(db.sql, { ...limits, exactLimit: 299 }))[0]!.exact, false);

  // Statistics reset: Postgres counts no rows, the walk along the index finds more than the
  // limit and stops there; the estimate then scales by the share of pages sampled.
  await db.sql`select pg_stat_reset_single_table_counters('shoal.jobs'::regclass)`;
  const [stale] = await countJobs(db.sql, { ...limits, exactLimit: 100 });
  assertEquals(stale!.exact, false);
  assert(stale!.ready > 20, `ready ${stale!.ready}: at least what the probe read`);
});

Deno.test("countJobs() with dead letters counts each queue along its index up to exactLimit and estimates a larger one", async () => {
  await using db = await testDb();
  await db.sql`
    insert into shoal.dead_jobs (id, queue, task, payload, priority, fairness_key, attempts,
                                 max_attempts, errors, reason, created_at)
    select i, case when i <= 3 then 'y' else 'x' end, 't', '{}', 0, '', 1, 1, '[]', 'failed',
           now()
    from generate_series(1, 2003) i`;
  await untilCounted(db.sql, "dead_jobs", 2003);
  const pages = await pagesOf(db.sql, "dead_jobs");
  // Half the pages: more than the sample reads, and none sampled would be a 1 in 2^10 chance.
  const limits = { exactLimit: 50, samplePages: Math.floor(pages / 2) };
  assert(limits.samplePages >= 10, `${pages} pages of dead letters`);

  const rows = await countJobs(db.sql, { ...limits, dead: true });
  // Queue x: sampled, scaled to the rows Postgres counts less queue y's (all sampled rows
  // are x's); queue y: counted.
  assertEquals(rows.map((r) => [r.queue, r.dead, r.exact]), [["x", 2000, false], ["y", 3, true]]);
  const exact = await countJobs(db.sql, { ...limits, dead: true, exact: true });
  assertEquals(exact.map((r) => [r.queue, r.dead, r.exact]), [["x", 2000, true], ["y", 3, true]]);
});

Deno.test("jobTotals() counts rows deleted from the live table once Postgres reports them", async () => {
  await using db = await testDb();
  const before = await jobTotals(db.sql);
  for (let i = 0; i < 3; i++) await enqueue(db.sql, "t", {}, { queue: "q" });
  await db.sql`delete from shoal.jobs`;
  // Each backend flushes its table statistics about once a second when idle.
  const after = await waitFor(
    "the deletes in pg_stat_user_tables",
    async () => {
      const t = await jobTotals(db.sql);
      return t.totals.deleted >= before.totals.deleted + 3 ? t : null;
    },
    20_000,
    200,
  );
  assertEquals(after.totals.deleted, before.totals.deleted + 3);
  assertEquals(after.totals.dead, before.totals.dead);
  assert(after.at.getTime() > before.at.getTime());
});

Deno.test("listStuckJobs() lists claims past their deadline after enough attempts, longest overdue first", async () => {
  await using db = await testDb();
  const ids: string[] = [];
  for (let i = 0; i < 4; i++) ids.push(await enqueue(db.sql, "t", {}, { queue: "s" }));
  const [old, recent, young, pending] = ids;
  const stick = (id: string, attempts: number, ago: string) =>
    db.sql`update shoal.jobs set attempts = ${attempts}::integer, locked_by = 'dead-worker',
      run_at = now() - ${ago}::interval where id = ${id}::bigint`;
  await stick(old!, 5, "10 minutes");
  await stick(recent!, 3, "1 minute");
  await stick(young!, 2, "1 hour"); // too few attempts
  // `pending`: overdue but not claimed (locked_by null): not stuck.
  await db.sql`update shoal.jobs set attempts = 9, run_at = now() - interval '1 hour'
    where id = ${pending!}::bigint`;
  assertEquals([...await listStuckJobs(db.sql, { minAttempts: 3, limit: 10 })], [
    { id: old!, queue: "s", task: "t", attempts: 5 },
    { id: recent!, queue: "s", task: "t", attempts: 3 },
  ]);
  assertEquals((await listStuckJobs(db.sql, { minAttempts: 3, limit: 1 })).map((r) => r.id), [
    old!,
  ]);
  assertEquals((await listStuckJobs(db.sql, { minAttempts: 2, limit: 10 }))[0]!.id, young!);
});
