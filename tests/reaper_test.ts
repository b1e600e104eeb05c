import { assert, assertEquals, assertRejects } from "./assert.ts";
import { acquire, LeaseLostError } from "../lib/lease.ts";
import { claim, enqueue, enqueueMany, fail } from "../lib/queue.ts";
import {
  deadRetentionSweep,
  defaultSweeps,
  REAPER_LEASE,
  reapOnce,
  slotPruneSweep,
  type Sweep,
} from "../lib/reaper.ts";
import { setConcurrencyLimit } from "../lib/flow.ts";
import { registerTasks, testDb } from "./helpers.ts";
import { listCatalogTasks } from "../lib/catalog.ts";

const OPTIONS = { holder: "test", leaseMs: 30_000, intervalMs: 1000, deadRetentionMs: 60_000 };

/** Enqueue and dead-letter one job; returns its id. */
async function deadJob(
  sql: Parameters<typeof enqueue>[0],
  diedSecondsAgo: number,
): Promise<string> {
  const id = await enqueue(sql, "t", {}, {
    maxAttempts: 1,
    queue: `q${crypto.randomUUID().slice(0, 8)}`,
  });
  const queue = (await sql`select queue from shoal.jobs where id = ${id}`)[0]!.queue as string;
  const { jobs } = await claim(sql, {
    queues: [queue],
    limit: 1,
    workerId: "w",
    visibilityMs: 1000,
  });
  await fail(sql, jobs[0]!, { error: "boom", retryInMs: 0 });
  await sql`update shoal.dead_jobs set died_at = now() - ${diedSecondsAgo} * interval '1 second' where id = ${id}`;
  return id;
}

Deno.test("reapOnce() purges dead jobs past their retention, capped per tick, oldest first", async () => {
  await using db = await testDb();
  const old1 = await deadJob(db.sql, 600);
  const old2 = await deadJob(db.sql, 300);
  const fresh = await deadJob(db.sql, 10);
  const first = await reapOnce(db.sql, OPTIONS, { limit: 1 });
  assertEquals(first["dead-retention"], 1);
  let left = (await db.sql`select id from shoal.dead_jobs order by id`).map((r) => r.id);
  assertEquals(left, [old2, fresh], "the oldest goes first");
  assertEquals((await reapOnce(db.sql, OPTIONS))["dead-retention"], 1);
  left = (await db.sql`select id from shoal.dead_jobs order by id`).map((r) => r.id);
  assertEquals(left, [fresh]);
  assertEquals((await reapOnce(db.sql, OPTIONS))["dead-retention"], 0);
  assertEquals(left.includes(old1), false);
});

Deno.test("reapOnce() isolates a failing sweep: its transaction rolls back and the others still run", async () => {
  await using db = await testDb();
  await deadJob(db.sql, 600);
  const broken: Sweep = {
    name: "broken",
    kind: "recovery",
    async run(tx) {
      await tx`delete from shoal.dead_jobs`; // rolled back with the failure below
      await tx`select * from no_such_table`;
      return 0;
    },
  };
  const report = await reapOnce(db.sql, OPTIONS, { sweeps: [broken, deadRetentionSweep] });
  assertEquals(typeof report.broken, "object");
  assertEquals(report["dead-retention"], 1, "the next sweep ran on a healthy connection");
  // The same pool is fine afterwards (no connection left in an aborted transaction).
  assertEquals((await db.sql`select 1 as one`)[0]?.one, 1);
});

Deno.test("reapOnce() with a lost lease does nothing", async () => {
  await using db = await testDb();
  await deadJob(db.sql, 600);
  const now = new Date();
  const term = (await acquire(db.sql, {
    name: REAPER_LEASE,
    holder: "a",
    ttlMs: 1,
    now: new Date(now.getTime() - 10_000),
  }))!;
  await acquire(db.sql, { name: REAPER_LEASE, holder: "b", ttlMs: 60_000 });
  await assertRejects(() => reapOnce(db.sql, OPTIONS, { term }), LeaseLostError);
  assertEquals((await db.sql`select count(*)::int as n from shoal.dead_jobs`)[0]?.n, 1);
});

Deno.test("reapOnce() reports a job stuck past its deadline after many attempts once, not every tick", async () => {
  await using db = await testDb();
  const id = await enqueue(db.sql, "t", {}, { queue: "stuck" });
  await db
    .sql`update shoal.jobs set attempts = 5, locked_by = 'dead-worker', run_at = now() - interval '1 minute' where id = ${id}`;
  assertEquals((await reapOnce(db.sql, OPTIONS))["stuck-report"], 1);
  assertEquals((await reapOnce(db.sql, OPTIONS))["stuck-report"], 0);
});

Deno.test("reapOnce() runs a sweep on its every-N-th tick only, and not at all when its check finds nothing", async () => {
  await using db = await testDb();
  const runs: string[] = [];
  const sweep = (name: string, everyTicks: number, work: boolean): Sweep => ({
    name,
    kind: "housekeeping",
    everyTicks,
    pending: () => Promise.resolve(work),
    run: () => {
      runs.push(name);
      return Promise.resolve(0);
    },
  });
  const sweeps = [sweep("every-3", 3, true), sweep("idle", 1, false)];
  for (let tick = 0; tick < 7; tick++) {
    await reapOnce(db.sql, OPTIONS, { sweeps, tick });
  }
  assertEquals(runs, ["every-3", "every-3", "every-3"]); // ticks 0, 3 and 6
});

Deno.test("reapOnce() removes consumers not seen for a day, never a live one or the catalog's tasks", async () => {
  await using db = await testDb();
  await registerTasks(db.sql, ["app.greet"], { workerId: "gone:1" });
  await registerTasks(db.sql, ["app.greet"], { workerId: "quiet:2" });
  await registerTasks(db.sql, ["app.greet"], { workerId: "live:3" });
  await db.sql`update shoal.consumers set last_seen_at = now() - interval '25 hours'
               where worker_id = 'gone:1'`;
  await db.sql`update shoal.consumers set last_seen_at = now() - interval '1 hour'
               where worker_id = 'quiet:2'`;
  assertEquals((await reapOnce(db.sql, OPTIONS))["stale-consumers"], 1);
  const left = await db.sql<{ worker_id: string }[]>`
    select worker_id from shoal.consumers order by worker_id`;
  assertEquals(left.map((r) => r.worker_id), ["live:3", "quiet:2"]);
  assertEquals((await listCatalogTasks(db.sql)).map((t) => t.name), ["app.greet"]);
  assertEquals((await reapOnce(db.sql, OPTIONS))["stale-consumers"], 0);
});

Deno.test("reapOnce() prunes slot entries that hold nothing, capped per tick, and skips the sweep when there are none", async () => {
  await using db = await testDb();
  assert(defaultSweeps().includes(slotPruneSweep));
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 10 });
  await enqueueMany(db.sql, Array.from({ length: 4 }, () => ({ task: "t", queue: "q" })));
  // Two claims of two: a slot row each.
  const jobs = [];
  for (let i = 0; i < 2; i++) {
    const claimed = await claim(db.sql, {
      queues: ["q"],
      limit: 2,
      workerId: "w",
      visibilityMs: 60_000,
    });
    jobs.push(...claimed.jobs);
  }
  assertEquals(jobs.length, 4);
  const slots = async () =>
    (await db.sql<{ job_id: string }[]>`
      select unnest(job_ids) as job_id from shoal.concurrency_slots order by 1`)
      .map((r) => r.job_id);
  // Every entry holds its slot: the cheap check says so, and the sweep handles nothing.
  assertEquals(await slotPruneSweep.pending!(db.sql, OPTIONS), false);
  assertEquals((await reapOnce(db.sql, OPTIONS, { sweeps: [slotPruneSweep] }))["slot-prune"], 0);

  // An entry left behind in each row: a job deleted outright, one claimed again under a
  // new token.
  const [gone, kept, reclaimed, live] = jobs.map((j) => j.id);
  await db.sql`delete from shoal.jobs where id = ${gone!}::bigint`;
  await db.sql`update shoal.jobs set token = token + 1 where id = ${reclaimed!}::bigint`;
  assertEquals(await slotPruneSweep.pending!(db.sql, OPTIONS), true);
  const first = await reapOnce(db.sql, OPTIONS, { limit: 1 });
  assertEquals(first["slot-prune"], 1);
  assertEquals((await slots()).length, 3);
  assertEquals((await reapOnce(db.sql, OPTIONS))["slot-prune"], 1);
  assertEquals(await slots(), [kept!, live!].sort((a, b) => Number(a) - Number(b)));
  assertEquals(await slotPruneSweep.pending!(db.sql, OPTIONS), false);
  assertEquals((await reapOnce(db.sql, OPTIONS))["slot-prune"], 0);
});
