/**
 * Where a claim starts (sql/functions/claim.sql, "Where a claim starts"; lib/head_scan.ts):
 * the consumer's claims walk the claim index from a little before where claiming has got to
 * (shoal.queue_heads), not from its head, so the entries of jobs acked while another
 * session holds a snapshot open are not walked; a claim from the head finds the jobs
 * ranking before that point that became visible again. Real Postgres throughout.
 */
import { assert, assertEquals } from "./assert.ts";
import { figure, testDb } from "./helpers.ts";

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
import type { Db, Sql } from "../lib/db.ts";
import {
  ack,
  claim,
  type ClaimOptions,
  enqueueMany,
  fail,
  type Job,
  release,
} from "../lib/queue.ts";
import {
  HEAD_SCAN_EVERY_MS,
  HEAD_SCAN_MIN_GAP_MS,
  HEAD_SCAN_SHARE,
  HeadScans,
} from "../lib/head_scan.ts";

const Q = "bound";

function options(limit: number, fromHead: boolean, extra: Partial<ClaimOptions> = {}) {
  return { queues: [Q], limit, workerId: "test:1", visibilityMs: 60_000, fromHead, ...extra };
}

async function claimIds(db: Db, limit: number, fromHead: boolean, extra = {}): Promise<Job[]> {
  const { jobs, poisoned } = await claim(db, options(limit, fromHead, extra));
  assertEquals(poisoned, []);
  return jobs;
}

/** The recorded head of `queue` at `priority`: [fair_seq, previous], or null. */
async function head(sql: Sql, priority = 0): Promise<[bigint, bigint] | null> {
  const [row] = await sql<{ seq: string; previous: string }[]>`
    select fair_seq::text as seq, previous::text as previous from shoal.queue_heads
    where queue = ${Q} and priority = ${priority}::integer`;
  return row ? [BigInt(row.seq), BigInt(row.previous)] : null;
}

/**
 * Claim and ack `batches` batches of `size`, at least 110 ms apart, so that every claim
 * after the first rewrites the recorded head (it is rewritten at most every 100 ms).
 */
async function drainInSteps(db: Db, batches: number, size: number): Promise<Job[]> {
  const claimed: Job[] = [];
  for (let i = 0; i < batches; i++) {
    if (i > 0) await sleep(110);
    const jobs = await claimIds(db, size, false);
    await ack(db, jobs);
    claimed.push(...jobs);
  }
  return claimed;
}

Deno.test("a claim records where claiming has got to per priority, rewriting it at most every 100 ms", async () => {
  await using db = await testDb();
  await enqueueMany(db.sql, Array.from({ length: 300 }, () => ({ task: "t", queue: Q })));
  assertEquals(await head(db.sql), null);
  const first = await claimIds(db.sql, 10, false);
  // A new row: fair_seq the greatest stamp claimed, previous the least.
  assertEquals(await head(db.sql), [BigInt(first[9]!.fair_seq), BigInt(first[0]!.fair_seq)]);
  const soon = await claimIds(db.sql, 10, false);
  assertEquals(soon.length, 10);
  assertEquals((await head(db.sql))![0], BigInt(first[9]!.fair_seq), "rewritten within 100 ms");
  await sleep(110);
  const later = await claimIds(db.sql, 10, false);
  assertEquals(await head(db.sql), [BigInt(later[9]!.fair_seq), BigInt(first[9]!.fair_seq)]);
});

Deno.test("a claim does not wait for the recorded head another claim is rewriting: it leaves it to that claim", async () => {
  await using db = await testDb();
  await enqueueMany(db.sql, Array.from({ length: 100 }, () => ({ task: "t", queue: Q })));
  await claimIds(db.sql, 10, false);
  const before = (await head(db.sql))!;
  await sleep(110);
  // Another claim's transaction holds the row (as while it commits its rewrite).
  const holder = await db.sql.reserve();
  try {
    await holder`begin`;
    await holder`select 1 from shoal.queue_heads where queue = ${Q} for update`;
    // Held until after the claim returns: a claim that waited for the row would never return.
    let guard: ReturnType<typeof setTimeout> | undefined;
    const claimed = await Promise.race([
      claimIds(db.sql, 10, false),
      new Promise<null>((resolve) => (guard = setTimeout(() => resolve(null), 10_000))),
    ]).finally(() => clearTimeout(guard));
    assert(claimed !== null, "the claim waited for the locked head row");
    assertEquals(claimed!.length, 10);
  } finally {
    await holder`rollback`;
    holder.release();
  }
  assertEquals(await head(db.sql), before, "the locked row was left as it was");
  // Unlocked, the next claim rewrites it as usual.
  const next = await claimIds(db.sql, 10, false);
  assertEquals((await head(db.sql))![0], BigInt(next[9]!.fair_seq));
});

Deno.test("a claim from near the head skips a retry ranking before it; a claim from the head takes it", async () => {
  await using db = await testDb();
  await enqueueMany(db.sql, Array.from({ length: 5_000 }, () => ({ task: "t", queue: Q })));
  const [early] = await claimIds(db.sql, 1, true);
  // Rewrites of the head, 2,500 jobs on from the early job.
  await drainInSteps(db.sql, 5, 500);
  const [seq, previous] = (await head(db.sql))!;
  assert(previous - 1_100n > BigInt(early!.fair_seq), `the bound ${previous} - 1100 is past it`);
  // The early job fails and is retried at once: visible again, stamp unchanged.
  await fail(db.sql, early!, { error: "again", retryInMs: 1 });
  await sleep(20);
  const near = await claimIds(db.sql, 5, false);
  assertEquals(near.length, 5);
  assert(near.every((job) => job.id !== early!.id), "a claim from near the head took the retry");
  assert(near.every((job) => BigInt(job.fair_seq) > seq), "it took the next jobs in order");
  const fromHead = await claimIds(db.sql, 1, true);
  assertEquals(fromHead.map((job) => job.id), [early!.id]);
});

Deno.test("a claim from near the head takes new jobs ranking ahead: a priority never claimed, a quiet key's burst", async () => {
  await using db = await testDb();
  await enqueueMany(
    db.sql,
    Array.from({ length: 5_000 }, () => ({ task: "t", queue: Q, fairnessKey: "A" })),
  );
  await drainInSteps(db.sql, 3, 500);
  const urgent = await enqueueMany(db.sql, [{ task: "t", queue: Q, priority: 5 }]);
  const quiet = await enqueueMany(
    db.sql,
    Array.from({ length: 3 }, () => ({ task: "t", queue: Q, fairnessKey: "B" })),
  );
  const low = await enqueueMany(db.sql, [{ task: "t", queue: Q, priority: -5 }]);
  const jobs = await claimIds(db.sql, 5, false);
  assertEquals(jobs.map((job) => job.id).slice(0, 4), [...urgent, ...quiet].map((r) => r.id));
  assertEquals(jobs[4]!.fairness_key, "A");
  // A probe from near the head: only what ranks no later than its bound.
  const more = await enqueueMany(db.sql, [{ task: "t", queue: Q, fairnessKey: "C" }]);
  const probed = await claimIds(db.sql, 50, false, {
    before: { priority: 0, fair_seq: jobs[4]!.fair_seq },
  });
  assertEquals(probed.map((job) => job.id), more.map((r) => r.id));
  // Once priority 0 is empty, the claim goes on to the priorities below it.
  const rest = await claimIds(db.sql, 10_000, false);
  assertEquals(rest.length, 5_000 - 1_500 - 1 + 1);
  assertEquals(rest[rest.length - 1]!.id, low[0]!.id);
});

/**
 * Buffers (shared hit + read) a call of shoal.claim_jobs reads, by EXPLAIN: the least of
 * three calls. The count includes planning's catalog reads, and another database's large
 * DDL transaction on the same server (a test file migrating, run in parallel) resets every
 * backend's catalog caches: the next call then read 2,509 buffers where it reads 434 (a
 * transaction creating 2,000 tables, measured). The least of three is the claim's own walk.
 */
async function claimBuffers(sql: Db, fromHead: boolean): Promise<number> {
  const counts = [];
  for (let i = 0; i < 3; i++) counts.push(await oneClaimBuffers(sql, fromHead));
  return Math.min(...counts);
}

async function oneClaimBuffers(sql: Db, fromHead: boolean): Promise<number> {
  const rows = await sql<{ "QUERY PLAN": unknown }[]>`
    explain (analyze, buffers, format json)
    select * from shoal.claim_jobs(${[Q]}::text[], 10, 'test:1', 60000, null, null, null,
                                   ${fromHead}::boolean)`;
  const plan = (rows[0]!["QUERY PLAN"] as { Plan: Record<string, number> }[])[0]!.Plan;
  return plan["Shared Hit Blocks"]! + plan["Shared Read Blocks"]!;
}

Deno.test("while another session holds a snapshot, a claim from near the head reads no more as more jobs are acked", async () => {
  await using db = await testDb();
  await enqueueMany(db.sql, Array.from({ length: 45_000 }, () => ({ task: "t", queue: Q })));
  await db.sql`vacuum analyze shoal.jobs`;
  await drainInSteps(db.sql, 2, 100);
  // One connection measures, its plans warmed first (planning reads the catalog).
  const probe = await db.sql.reserve();
  for (let i = 0; i < 3; i++) {
    await claimBuffers(probe, false);
    await claimBuffers(probe, true);
  }
  const holder = await db.sql.reserve();
  try {
    await holder`begin isolation level repeatable read`;
    await holder`select 1 from pg_catalog.pg_class limit 1`;
    const before = {
      near: await claimBuffers(probe, false),
      head: await claimBuffers(probe, true),
    };
    // 20,000 acks while the snapshot is held, twice: their entries cannot be marked dead.
    const measureAfterAcks = async () => {
      for (let i = 0; i < 20; i++) {
        const jobs = await claimIds(db.sql, 1_000, false);
        await ack(db.sql, jobs);
        if (i % 4 === 3) await sleep(110);
      }
      // Two rewrites bring the recorded head and the one before it up to date.
      for (let i = 0; i < 2; i++) {
        await sleep(110);
        await claimIds(db.sql, 1, false);
      }
      return { near: await claimBuffers(probe, false), head: await claimBuffers(probe, true) };
    };
    const mid = await measureAfterAcks();
    const after = await measureAfterAcks();
    figure(
      `buffers per claim of 10 (before, after 20,000 and 40,000 acks): near ${before.near}, ` +
        `${mid.near}, ${after.near}; from the head ${before.head}, ${mid.head}, ${after.head}`,
    );
    // From the head, every acked job's entry is walked (about a buffer for every three).
    assert(after.head > mid.head + 5_000, `from the head: ${mid.head} → ${after.head}`);
    // From near the head, the head_lead's worth (1,100 stamps) and what the recorded head
    // lags behind, however many were acked.
    assert(after.near < mid.near * 1.5, `from near the head: ${mid.near} → ${after.near}`);
    assert(after.near * 10 < after.head, `near ${after.near}, head ${after.head}`);
  } finally {
    await holder`rollback`;
    holder.release();
    probe.release();
  }
});

Deno.test("HeadScans: the first claim walks from the head, then every second, or sooner when a job falls due", () => {
  let now = 10_000;
  const scans = new HeadScans(() => now);
  assert(scans.due(), "the first claim walks from the head");
  scans.done(2);
  assert(!scans.due());
  now += HEAD_SCAN_EVERY_MS - 1;
  assert(!scans.due());
  now += 1;
  assert(scans.due(), "a second later");
  scans.done(2);
  // A retry falls due: the next claim walks from the head, but not sooner than the gap.
  scans.request();
  assert(!scans.due());
  now += HEAD_SCAN_MIN_GAP_MS;
  assert(scans.due(), "soon after a job falls due");
  // A slow claim from the head (a held snapshot) spaces them out to HEAD_SCAN_SHARE.
  scans.done(400);
  const pause = 400 / HEAD_SCAN_SHARE;
  scans.request();
  now += pause - 1;
  assert(!scans.due());
  now += 1;
  assert(scans.due(), `after ${pause} ms`);
});

Deno.test("a job handed back unstarted ranks level with the head: a claim from near the head takes it next", async () => {
  await using db = await testDb();
  await enqueueMany(db.sql, Array.from({ length: 5_000 }, () => ({ task: "t", queue: Q })));
  const [early] = await claimIds(db.sql, 1, true);
  await drainInSteps(db.sql, 5, 500);
  const [seq] = (await head(db.sql))!;
  // Handed back (a consumer's shutdown): its old stamp lies far behind the bound.
  assertEquals(await release(db.sql, [early!]), [early!.id]);
  const [row] = await db.sql<{ fair_seq: string }[]>`
    select fair_seq::text from shoal.jobs where id = ${early!.id}::bigint`;
  assertEquals(BigInt(row!.fair_seq), seq);
  const next = await claimIds(db.sql, 1, false);
  assertEquals(next.map((job) => job.id), [early!.id]);
});

Deno.test("only the primary key reaches a job by id: no other index can serve a lookup by id", async () => {
  // Acks, heartbeats and releases look jobs up by id. An index with `id` among its key
  // columns can serve that lookup as a walk of the whole index; with statistics from a small
  // table the planner priced it as cheap as the primary key (sql/014_claim_index_id.sql).
  // With the primary key out of play (dropped in a transaction rolled back), a lookup by id
  // must find no index to use, whatever the planner is told.
  await using db = await testDb();
  await enqueueMany(db.sql, Array.from({ length: 1_000 }, () => ({ task: "t", queue: Q })));
  await db.sql`analyze shoal.jobs`;
  const nodes = await db.sql.begin(async (tx) => {
    await tx`alter table shoal.jobs drop constraint jobs_pkey`;
    await tx`set local enable_seqscan = off`;
    const rows = await tx`explain (format json) select id from shoal.jobs where id = 1`;
    await tx`rollback and chain`;
    const plan = (rows[0]!["QUERY PLAN"] as { Plan: Record<string, unknown> }[])[0]!.Plan;
    return [plan["Node Type"], plan["Index Name"] ?? null];
  });
  assertEquals(nodes, ["Seq Scan", null]);
});
