/**
 * The bench's issue 14 workloads at tiny sizes, on the test server: the fast backlog load
 * (bench/backlog.ts), W11's claim loop (bench/claim_size.ts) and W5's two variants
 * (bench/fairness.ts) with a real consumer process. What they measure is not judged here
 * (no speed in unit tests): that they run, keep their queue as they say, and report the
 * figures the report reads.
 */
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { testDb } from "./helpers.ts";
import { loadBacklog } from "../bench/backlog.ts";
import { checkClaimSpec, claimBySize, measureClaims } from "../bench/claim_size.ts";
import { analyse, FULL_BUFFER, noisyNeighbour, priorityBehindBuffer } from "../bench/fairness.ts";
import { startServer, withAdmin } from "../bench/harness.ts";
import { shoal } from "../bench/systems.ts";
import type { BenchContext, Sizes } from "../bench/workloads.ts";
import { claim, enqueueMany } from "../lib/queue.ts";

/** The bench's databases on the test server now (each run's fresh one is dropped after it). */
async function benchDatabases(ctx: BenchContext): Promise<string[]> {
  return await withAdmin(ctx.server.url, async (sql) =>
    (await sql<{ datname: string }[]>`
      select datname from pg_database where datname like 'bench\\_w11%' order by 1`)
      .map((r) => r.datname));
}

/** The bench's view of the test server (DATABASE_URL): each run gets a fresh database on it. */
async function benchContext(): Promise<BenchContext> {
  const server = await startServer({ profile: false });
  assert.ok(!server.owned, "the bench must use the test server given by DATABASE_URL");
  return {
    server,
    sizes: {} as Sizes, // the workloads below take their sizes as arguments
    profile: false,
    soak: {
      soakMs: 0,
      soakSampleMs: 0,
      holdBeforeMs: 0,
      holdMs: 0,
      holdAfterMs: 0,
      holdSampleMs: 0,
      rateShare: 0,
      fixedRate: null,
    },
    figure: () => Number.NaN,
    statementsServer: () => Promise.reject(new Error("not used here")),
  };
}

Deno.test("loadBacklog() adds ready jobs stamped after the queue's last, claimed in that order", async () => {
  await using db = await testDb();
  await enqueueMany(db.sql, [
    { task: "t", queue: "q", payload: {} },
    { task: "t", queue: "q", payload: {} },
  ], { notify: false });
  const times = await loadBacklog(db.sql, {
    queue: "q",
    task: "bench.stamp",
    count: 5,
    payload: { t: 1 },
    fairnessKey: "A",
  });
  assert.ok(times.insertMs >= 0 && times.vacuumMs >= 0);
  const rows = await db.sql<
    { fair_seq: string; fairness_key: string; payload: unknown; ready: boolean; task: string }[]
  >`
    select fair_seq::text, fairness_key, payload, run_at <= now() as ready, task
    from shoal.jobs where queue = 'q' order by id`;
  assertEquals(rows.map((r) => Number(r.fair_seq)), [1, 2, 3, 4, 5, 6, 7]);
  assertEquals(rows.slice(2).map((r) => [r.task, r.fairness_key, r.payload, r.ready]), [
    ...Array.from({ length: 5 }, () => ["bench.stamp", "A", { t: 1 }, true]),
  ]);
  const { jobs } = await claim(db.sql, {
    queues: ["q"],
    limit: 7,
    workerId: "w",
    visibilityMs: 30_000,
  });
  assertEquals(jobs.map((j) => Number(j.fair_seq)), [1, 2, 3, 4, 5, 6, 7]);
  await assertRejects(
    () => loadBacklog(db.sql, { queue: "q", task: "t", count: 0 }),
    RangeError,
    "at least one job",
  );
});

Deno.test("W11 claimBySize(): full claims at each size, every queue keeping its size, nothing left", async () => {
  const ctx = await benchContext();
  const benchmark = claimBySize({ sizes: [2_000, 40], claims: 12, warmup: 3, batch: 10 });
  assertEquals([benchmark.id, benchmark.once], ["W11/shoal", true]);
  assertEquals(benchmark.metrics.map((m) => m.key), ["claim_ms_40", "claim_ms_2k"]);
  const before = await benchDatabases(ctx);
  const { values, details } = await benchmark.run(ctx);
  assertEquals(Object.keys(values).sort(), ["claim_ms_2k", "claim_ms_40"]);
  for (const ms of Object.values(values)) assert.ok(Number.isFinite(ms) && ms > 0, String(ms));
  assertEquals([details["40_ready_at_end"], details["2k_ready_at_end"]], [40, 2_000]);
  assertEquals([details.claims, details.warmup, details.batch], [12, 3, 10]);
  assert.ok((details["40_claim_p99_ms"] as number) >= values.claim_ms_40!);
  assertEquals(details.largest_vs_smallest, values.claim_ms_2k! / values.claim_ms_40!);
  assertEquals(await benchDatabases(ctx), before); // both databases dropped
});

Deno.test("W11 measureClaims(): refuses sizes it cannot measure", async () => {
  const spec = { sizes: [5], claims: 1, warmup: 0, batch: 10 };
  assert.throws(() => checkClaimSpec(spec), /at least one batch \(10\) of ready jobs, not 5/);
  assert.throws(() => checkClaimSpec({ ...spec, sizes: [] }), /distinct sizes/);
  assert.throws(() => checkClaimSpec({ ...spec, sizes: [10, 10] }), /distinct sizes/);
  await assertRejects(
    async () => measureClaims((await benchContext()).server, { ...spec, sizes: [10], claims: 0 }),
    RangeError,
    "claims must be a positive integer",
  );
});

Deno.test("W5 analyse(): counts A's starts after the commit up to the newcomer's last", () => {
  const starts = [
    { fairness_key: "A", started_at: 1 },
    { fairness_key: "A", started_at: 11 }, // after the call began, before its commit
    { fairness_key: "A", started_at: 21 },
    { fairness_key: "P", started_at: 22 },
    { fairness_key: "A", started_at: 23 },
    { fairness_key: "P", started_at: 24 },
    { fairness_key: "A", started_at: 25 }, // after the newcomer's last
  ];
  const { values, details } = analyse(starts, "P", 10, 20);
  assertEquals(values, { a_starts: 2 });
  assertEquals(details.a_starts_from_call_start, 3);
  assertEquals([details.p_jobs, details.p_first_start_ms, details.p_last_start_ms], [2, 2, 4]);
  assertEquals(details.start_order, "APAP");
});

Deno.test("shoal's producer enqueues a stamp job with its fairness key and priority", async () => {
  await using db = await testDb();
  const producer = await shoal.openProducer(db.url, { max: 1 });
  try {
    await producer.enqueueBatch([
      { kind: "stamp", enqueuedAt: 5, fairnessKey: "P", priority: 1 },
      { kind: "stamp", enqueuedAt: 6 },
    ], { notify: false });
  } finally {
    await producer.close();
  }
  const rows = await db.sql<{ task: string; fairness_key: string; priority: number }[]>`
    select task, fairness_key, priority from shoal.jobs order by id`;
  assertEquals(rows.map((r) => [r.task, r.fairness_key, r.priority]), [
    ["bench.stamp", "P", 1],
    ["bench.stamp", "", 0],
  ]);
});

Deno.test("W5 noisyNeighbour(): key B's 100 jobs all start, the figure and details reported", async () => {
  const ctx = await benchContext();
  const benchmark = noisyNeighbour(shoal, 1_000, 100);
  assertEquals([benchmark.id, benchmark.runs], ["W5/shoal/a1k", 5]);
  const { values, details } = await benchmark.run(ctx);
  assert.ok(Number.isInteger(values.a_starts) && values.a_starts! >= 0, String(values.a_starts));
  assertEquals(details.b_jobs, 100);
  assertEquals(details.a_backlog, 1_000);
  assert.ok(
    (details.a_started_before_call as number) >= 200,
    String(details.a_started_before_call),
  );
  assert.ok(/^[AB]*B$/.test(details.start_order as string), details.start_order as string);
});

Deno.test("W5 priorityBehindBuffer(): the priority-1 job arrives behind a full buffer and starts", async () => {
  const ctx = await benchContext();
  const benchmark = priorityBehindBuffer(shoal, 20_000);
  assertEquals([benchmark.id, benchmark.runs], ["W5/shoal/priority", 5]);
  const { values, details } = await benchmark.run(ctx);
  assert.ok(Number.isInteger(values.a_starts) && values.a_starts! >= 0, String(values.a_starts));
  assertEquals(details.p_jobs, 1);
  assert.ok(
    (details.claimed_at_enqueue as number) >= FULL_BUFFER,
    String(details.claimed_at_enqueue),
  );
  assertEquals(details.a_ran_out, 0);
  // Woken by the commit's NOTIFY, P may start before the producer's call has returned and
  // read the clock: then no start lies after the commit, and the order is empty.
  const order = details.start_order as string;
  assert.ok(
    /^A*P$/.test(order) || (order === "" && (details.p_first_start_ms as number) <= 0),
    `${order} (P's first start ${details.p_first_start_ms} ms after the commit)`,
  );
});
