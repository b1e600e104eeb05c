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
  extend,
  fail,
  jobTotals,
  listStuckJobs,
  type QueueCounts,
  release,
} from "../lib/queue.ts";
import { queueStatus } from "../lib/status.ts";

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
    { queue: "a", ready: 1, scheduled: 1, running: 1, prefetched: 0 },
  ]);
  assert(!("dead" in live[0]!), "no dead count unless asked");

  const all = await countJobs(db.sql, { dead: true });
  assertEquals(withoutAge(all, { a: [60, 90] }), [
    { queue: "a", ready: 1, scheduled: 1, running: 1, prefetched: 0, dead: 1 },
    { queue: "b", ready: 0, scheduled: 0, running: 0, prefetched: 0, dead: 2 },
  ]);
  // The same key order as `shoal status --json` has always printed.
  assertEquals(Object.keys(all[0]!), [
    "queue",
    "ready",
    "scheduled",
    "running",
    "prefetched",
    "dead",
    "oldest_ready_age_s",
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
