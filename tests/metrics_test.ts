/**
 * lib/metrics.ts: the counters the roles report to, the queue gauges read from real
 * Postgres at scrape time (and their one-second cache), and the leader and scheduler
 * wiring through the process-wide registry.
 */
import { assert, assertEquals } from "./assert.ts";
import { enqueueLargeTable, testDb } from "./helpers.ts";
import { claim, enqueue, enqueueMany, saveProgress } from "../lib/queue.ts";
import { enableMetrics, loadPromClient, Metrics, metrics, QUEUE_CACHE_MS } from "../lib/metrics.ts";
import { runLeaderLoop } from "../lib/leader.ts";
import { logger } from "../lib/log.ts";
import { upsertSchedule } from "../lib/schedule.ts";
import {
  clearConcurrencyLimit,
  clearFairnessWeight,
  clearRateLimit,
  holdKey,
  pauseQueue,
  resumeQueue,
  setConcurrencyLimit,
  setFairnessWeight,
  setRateLimit,
} from "../lib/flow.ts";
import { tickOnce } from "../lib/scheduler.ts";
import { checkProgress } from "../lib/progress.ts";

// prom-client loads on demand (only a process serving /metrics needs it).
await loadPromClient();
await enableMetrics();

/** The value of one sample line (`name{labels}`) in exposition text; undefined if absent. */
export function sample(text: string, series: string): number | undefined {
  for (const line of text.split("\n")) {
    if (line.startsWith(series + " ")) return Number(line.slice(series.length + 1));
  }
  return undefined;
}

Deno.test("Metrics.jobFinished() counts each outcome under its queue and task", async () => {
  const m = new Metrics();
  const job = { queue: "mail", task: "send" };
  m.jobsClaimed([job, job, job, job, { queue: "mail", task: "other" }]);
  m.jobFinished(job, "completed", 120);
  m.jobFinished(job, "retried", 30);
  m.jobFinished(job, "dead", 2_000);
  m.jobFinished(job, "stale", 5);
  const text = await m.render();
  const l = `{queue="mail",task="send"}`;
  assertEquals(sample(text, `shoal_jobs_claimed_total${l}`), 4);
  assertEquals(sample(text, `shoal_jobs_claimed_total{queue="mail",task="other"}`), 1);
  assertEquals(sample(text, `shoal_jobs_completed_total${l}`), 1);
  assertEquals(sample(text, `shoal_jobs_failed_total${l}`), 3);
  assertEquals(sample(text, `shoal_jobs_retried_total${l}`), 1);
  assertEquals(sample(text, `shoal_jobs_dead_lettered_total${l}`), 1);
  assertEquals(sample(text, `shoal_job_duration_seconds_count${l}`), 4);
  assertEquals(sample(text, `shoal_job_duration_seconds_sum${l}`), 2.155);
  assertEquals(
    sample(text, `shoal_job_duration_seconds_bucket{le="0.005",queue="mail",task="send"}`),
    1,
  );
  assertEquals(
    sample(text, `shoal_job_duration_seconds_bucket{le="0.25",queue="mail",task="send"}`),
    3,
  );
  assertEquals(
    sample(text, `shoal_job_duration_seconds_bucket{le="+Inf",queue="mail",task="send"}`),
    4,
  );
  assert(text.includes("# TYPE shoal_job_duration_seconds histogram"), text);
  assert(text.includes("# TYPE shoal_jobs_completed_total counter"), text);
});

Deno.test("Metrics.jobsPoisoned() counts dead-lettered jobs that never ran", async () => {
  const m = new Metrics();
  m.jobsPoisoned([{ queue: "q", task: "t" }, { queue: "q", task: "t" }]);
  const text = await m.render();
  assertEquals(sample(text, `shoal_jobs_dead_lettered_total{queue="q",task="t"}`), 2);
  assertEquals(sample(text, `shoal_jobs_failed_total{queue="q",task="t"}`), undefined);
});

Deno.test("Metrics.leaderStatus() and scheduleFired() set the leader gauge and fire lag", async () => {
  const m = new Metrics();
  m.leaderStatus("reaper", true);
  m.leaderStatus("scheduler", true);
  m.leaderStatus("scheduler", false);
  m.scheduleFired("nightly", 1_500);
  m.scheduleFired("nightly", -20); // clock noise never shows as negative lag
  const text = await m.render();
  assertEquals(sample(text, `shoal_leader{lease="reaper"}`), 1);
  assertEquals(sample(text, `shoal_leader{lease="scheduler"}`), 0);
  assertEquals(sample(text, `shoal_schedule_fires_total{schedule="nightly"}`), 2);
  assertEquals(sample(text, `shoal_schedule_fire_lag_seconds_sum{schedule="nightly"}`), 1.5);
  assertEquals(
    sample(text, `shoal_schedule_fire_lag_seconds_bucket{le="0.01",schedule="nightly"}`),
    1,
  );
});

Deno.test("Metrics.refreshQueues() reads depth, running, prefetched and oldest ready age per queue", async () => {
  await using db = await testDb();
  const m = new Metrics();
  const [{ past }] = await db.sql<[{ past: Date }]>`select now() - interval '90 s' as past`;
  await enqueue(db.sql, "t", {}, { queue: "a", runAt: past });
  await enqueue(db.sql, "t", {}, { queue: "a" });
  await enqueue(db.sql, "t", {}, { queue: "b", runAt: new Date(Date.now() + 3_600_000) });
  // Queue c: one claimed job started, one waiting in a prefetch buffer.
  await enqueueMany(db.sql, [{ task: "t", queue: "c" }, { task: "t", queue: "c" }]);
  const c = { queues: ["c"], limit: 2, workerId: "test:1", visibilityMs: 60_000, starting: 1 };
  assertEquals((await claim(db.sql, c)).jobs.length, 2);
  await m.refreshQueues(db.sql, 0);
  const text = await m.render();
  assertEquals(sample(text, `shoal_queue_depth{queue="a"}`), 2);
  assertEquals(sample(text, `shoal_queue_depth{queue="b"}`), 0);
  assertEquals(sample(text, `shoal_queue_scheduled{queue="b"}`), 1);
  assertEquals(sample(text, `shoal_queue_running{queue="a"}`), 0);
  assertEquals(sample(text, `shoal_queue_running{queue="c"}`), 1);
  assertEquals(sample(text, `shoal_queue_prefetched{queue="c"}`), 1);
  const age = sample(text, `shoal_queue_oldest_ready_age_seconds{queue="a"}`)!;
  assert(age >= 90 && age < 120, `oldest ready age ${age}`);
  assertEquals(sample(text, `shoal_queue_oldest_ready_age_seconds{queue="b"}`), 0);
  assertEquals(sample(text, `shoal_queue_counts_exact{queue="a"}`), 1);
});

Deno.test("Metrics.refreshQueues() marks estimated gauges with shoal_queue_counts_exact 0, and counts with exactCounts", async () => {
  await using db = await testDb();
  await enqueueLargeTable(db.sql);
  const estimated = new Metrics();
  await estimated.refreshQueues(db.sql, 0);
  const text = await estimated.render();
  assertEquals(sample(text, `shoal_queue_counts_exact{queue="bulk"}`), 0);
  assertEquals(sample(text, `shoal_queue_counts_exact{queue="tiny"}`), 1);
  // Every sampled bulk job is ready: the rows Postgres counts, less tiny's.
  assertEquals(sample(text, `shoal_queue_depth{queue="bulk"}`), 12_000);
  assertEquals(sample(text, `shoal_queue_depth{queue="tiny"}`), 1);

  const counted = new Metrics({ exactCounts: true });
  await counted.refreshQueues(db.sql, 0);
  const exact = await counted.render();
  assertEquals(sample(exact, `shoal_queue_counts_exact{queue="bulk"}`), 1);
  assertEquals(sample(exact, `shoal_queue_depth{queue="bulk"}`), 12_000);
});

Deno.test("Metrics.refreshQueues() reuses a read for a second and drops emptied queues", async () => {
  await using db = await testDb();
  const m = new Metrics();
  await enqueue(db.sql, "t", {}, { queue: "a" });
  await m.refreshQueues(db.sql, 10_000);
  await enqueue(db.sql, "t", {}, { queue: "a" });
  await m.refreshQueues(db.sql, 10_000 + QUEUE_CACHE_MS - 1); // cached: not read again
  assertEquals(sample(await m.render(), `shoal_queue_depth{queue="a"}`), 1);
  await m.refreshQueues(db.sql, 10_000 + QUEUE_CACHE_MS);
  assertEquals(sample(await m.render(), `shoal_queue_depth{queue="a"}`), 2);
  await db.sql`delete from shoal.jobs`;
  await m.refreshQueues(db.sql, 20_000);
  assertEquals(sample(await m.render(), `shoal_queue_depth{queue="a"}`), undefined);
});

Deno.test("Metrics.refreshQueues() reads paused queues, concurrency limits and their slots held", async () => {
  await using db = await testDb();
  const m = new Metrics();
  await pauseQueue(db.sql, "mail");
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 2 });
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 5, key: "vip" });
  // Task export's own limit: its jobs are counted apart, under the task label.
  await setConcurrencyLimit(db.sql, { queue: "q", maxRunning: 3, task: "export" });
  await enqueueMany(db.sql, [
    ...Array.from({ length: 4 }, () => ({ task: "t", queue: "q", fairnessKey: "acme" })),
    ...Array.from({ length: 4 }, () => ({ task: "t", queue: "q", fairnessKey: "vip" })),
    ...Array.from({ length: 4 }, () => ({ task: "export", queue: "q", fairnessKey: "vip" })),
  ]);
  const c = { queues: ["q"], limit: 20, workerId: "test:1", visibilityMs: 60_000 };
  assertEquals((await claim(db.sql, c)).jobs.length, 2 + 4 + 3);
  await m.refreshQueues(db.sql, 0);
  const text = await m.render();
  assertEquals(sample(text, `shoal_queue_paused{queue="mail"}`), 1);
  assertEquals(sample(text, `shoal_queue_paused{queue="q"}`), undefined);
  assertEquals(sample(text, `shoal_concurrency_limit{queue="q",key="*",task=""}`), 2);
  assertEquals(sample(text, `shoal_concurrency_limit{queue="q",key="vip",task=""}`), 5);
  assertEquals(sample(text, `shoal_concurrency_limit{queue="q",key="*",task="export"}`), 3);
  assertEquals(sample(text, `shoal_concurrency_slots_held{queue="q",key="*",task=""}`), 2);
  assertEquals(sample(text, `shoal_concurrency_slots_held{queue="q",key="vip",task=""}`), 4);
  assertEquals(sample(text, `shoal_concurrency_slots_held{queue="q",key="*",task="export"}`), 3);
  assert(text.includes("# TYPE shoal_concurrency_slots_held gauge"), text);

  // Resumed and cleared: the series disappear at the next read, not before (the cache).
  await resumeQueue(db.sql, "mail");
  await clearConcurrencyLimit(db.sql, { queue: "q", key: "vip" });
  await m.refreshQueues(db.sql, QUEUE_CACHE_MS - 1);
  assertEquals(sample(await m.render(), `shoal_queue_paused{queue="mail"}`), 1);
  await m.refreshQueues(db.sql, QUEUE_CACHE_MS);
  const after = await m.render();
  assertEquals(sample(after, `shoal_queue_paused{queue="mail"}`), undefined);
  assertEquals(sample(after, `shoal_concurrency_limit{queue="q",key="vip",task=""}`), undefined);
  // vip has no row of its own now: its slots count under the default (export's stay apart).
  assertEquals(sample(after, `shoal_concurrency_slots_held{queue="q",key="*",task=""}`), 6);
  assertEquals(sample(after, `shoal_concurrency_slots_held{queue="q",key="*",task="export"}`), 3);
});

Deno.test("Metrics.refreshQueues() reads rate limits as starts per second, held keys and fairness weights", async () => {
  await using db = await testDb();
  const m = new Metrics();
  await setRateLimit(db.sql, { queue: "api", maxStarts: 100, periodMs: 60_000 });
  await setRateLimit(db.sql, { queue: "api", maxStarts: 3, periodMs: 2000, key: "acme" });
  await holdKey(db.sql, { queue: "api", key: "acme", forMs: 60_000 });
  await holdKey(db.sql, { queue: "api", key: "brief", forMs: 1 }); // ended before the read
  // Task sync's own rate limit, and a hold of its jobs of acme alone.
  await setRateLimit(db.sql, { queue: "api", maxStarts: 1, periodMs: 4000, task: "sync" });
  await holdKey(db.sql, { queue: "api", key: "acme", forMs: 60_000, task: "sync" });
  await setFairnessWeight(db.sql, { queue: "reports", key: "vip", weight: 7 });
  await new Promise((resolve) => setTimeout(resolve, 20));
  await m.refreshQueues(db.sql, 0);
  const text = await m.render();
  assertEquals(sample(text, `shoal_rate_limit{queue="api",key="*",task=""}`), 100 / 60);
  assertEquals(sample(text, `shoal_rate_limit{queue="api",key="acme",task=""}`), 1.5);
  assertEquals(sample(text, `shoal_rate_limit{queue="api",key="*",task="sync"}`), 0.25);
  assertEquals(sample(text, `shoal_key_held{queue="api",key="acme",task=""}`), 1);
  assertEquals(sample(text, `shoal_key_held{queue="api",key="acme",task="sync"}`), 1);
  assertEquals(sample(text, `shoal_key_held{queue="api",key="brief",task=""}`), undefined);
  assertEquals(sample(text, `shoal_fairness_weight{queue="reports",key="vip"}`), 7);
  for (const name of ["shoal_rate_limit", "shoal_key_held", "shoal_fairness_weight"]) {
    assert(text.includes(`# TYPE ${name} gauge`), text);
  }

  // Cleared and lifted: the series disappear at the next read.
  await clearRateLimit(db.sql, { queue: "api", key: "acme" });
  await holdKey(db.sql, { queue: "api", key: "acme", forMs: 0 });
  await clearFairnessWeight(db.sql, { queue: "reports", key: "vip" });
  await m.refreshQueues(db.sql, QUEUE_CACHE_MS);
  const after = await m.render();
  assertEquals(sample(after, `shoal_rate_limit{queue="api",key="acme",task=""}`), undefined);
  assertEquals(sample(after, `shoal_key_held{queue="api",key="acme",task=""}`), undefined);
  assertEquals(sample(after, `shoal_key_held{queue="api",key="acme",task="sync"}`), 1);
  assertEquals(sample(after, `shoal_fairness_weight{queue="reports",key="vip"}`), undefined);
  assertEquals(sample(after, `shoal_rate_limit{queue="api",key="*",task=""}`), 100 / 60);
});

Deno.test("Metrics.refreshQueues() keeps the last flow gauges when only the flow read fails, and reads again next scrape", async () => {
  await using db = await testDb();
  const m = new Metrics();
  await enqueue(db.sql, "t", {}, { queue: "a" });
  await pauseQueue(db.sql, "a");
  await m.refreshQueues(db.sql, 0);
  await enqueue(db.sql, "t", {}, { queue: "a" });
  await resumeQueue(db.sql, "a");
  await db.sql`alter table shoal.queue_pauses rename to queue_pauses_away`;
  try {
    await m.refreshQueues(db.sql, 5_000); // the flow read fails: logged, last values kept
    const text = await m.render();
    assertEquals(sample(text, `shoal_queue_depth{queue="a"}`), 2); // the queue read did not
    assertEquals(sample(text, `shoal_queue_paused{queue="a"}`), 1);
  } finally {
    await db.sql`alter table shoal.queue_pauses_away rename to queue_pauses`;
  }
  // A failed read is not cached: the next scrape, however soon, reads again.
  await m.refreshQueues(db.sql, 5_001);
  assertEquals(sample(await m.render(), `shoal_queue_paused{queue="a"}`), undefined);
});

Deno.test("Metrics.refreshQueues() sums progress reports up per queue: jobs reporting, mean ratio, stalest report; no series per job", async () => {
  await using db = await testDb();
  const m = new Metrics();
  // Queue a: three claimed jobs reporting 1/4, 3/4 and 5/4 (capped at 1), and one reporting a
  // total of 0 (counted, left out of the ratio). Queue b: one claimed job reporting 0 of 0.
  // Queue c: a job that reported, then went back to wait for a retry (not claimed: left out).
  await enqueueMany(db.sql, [
    ...Array.from({ length: 4 }, () => ({ task: "t", queue: "a" })),
    { task: "t", queue: "b" },
    { task: "t", queue: "c" },
  ]);
  const claimed = async (queue: string, limit: number) =>
    (await claim(db.sql, { queues: [queue], limit, workerId: "test:1", visibilityMs: 60_000 }))
      .jobs;
  const a = await claimed("a", 4);
  const [b] = await claimed("b", 1);
  const [c] = await claimed("c", 1);
  const reports = [[1, 4], [3, 4], [5, 4], [7, 0]].map(([done, total], i) => ({
    id: a[i]!.id,
    token: a[i]!.token,
    progress: checkProgress(done, total, `job ${i}`),
  }));
  reports.push({ id: b!.id, token: b!.token, progress: checkProgress(0, 0, null) });
  reports.push({ id: c!.id, token: c!.token, progress: checkProgress(1, 2, null) });
  assertEquals(await saveProgress(db.sql, reports), 6);
  await db.sql`update shoal.jobs set locked_by = null where id = ${c!.id}::bigint`;
  // a's first job last reported 90 s ago: its handler stopped reporting.
  await db.sql`
    update shoal.jobs
    set progress = progress || jsonb_build_object('at', now() - interval '90 s')
    where id = ${a[0]!.id}::bigint`;
  await m.refreshQueues(db.sql, 0);
  const text = await m.render();
  assertEquals(sample(text, `shoal_progress_jobs{queue="a"}`), 4);
  assertEquals(sample(text, `shoal_progress_ratio{queue="a"}`), (0.25 + 0.75 + 1) / 3);
  const age = sample(text, `shoal_progress_stalest_age_seconds{queue="a"}`)!;
  assert(age >= 90 && age < 120, `stalest report age ${age}`);
  assertEquals(sample(text, `shoal_progress_jobs{queue="b"}`), 1);
  assertEquals(sample(text, `shoal_progress_ratio{queue="b"}`), undefined, "no total above 0");
  assertEquals(sample(text, `shoal_progress_jobs{queue="c"}`), undefined, "c's job is not claimed");
  // Bounded: one series per queue, never one per job (no job id, task or message label).
  const series = text.split("\n").filter((l) => l.startsWith("shoal_progress_"));
  assertEquals(series.length, 5, series.join("\n"));
  for (const line of series) assert(/^shoal_progress_[a-z_]+\{queue="[a-z]"\} /.test(line), line);
  // Jobs that ended take their queue's series with them.
  await db.sql`delete from shoal.jobs`;
  await m.refreshQueues(db.sql, 10_000);
  const after = await m.render();
  assertEquals(after.split("\n").filter((l) => l.startsWith("shoal_progress_")), []);
});

Deno.test("Metrics.render() still answers when the queue read fails", async () => {
  await using db = await testDb();
  const m = new Metrics();
  m.leaderStatus("reaper", true);
  await enqueue(db.sql, "t", {}, { queue: "a" });
  await m.refreshQueues(db.sql, 0);
  await db.sql`alter table shoal.jobs rename to jobs_away`;
  try {
    await m.refreshQueues(db.sql, 5_000); // logged, last values kept
    const text = await m.render();
    assertEquals(sample(text, `shoal_leader{lease="reaper"}`), 1);
    assertEquals(sample(text, `shoal_queue_depth{queue="a"}`), 1);
  } finally {
    await db.sql`alter table shoal.jobs_away rename to jobs`;
  }
});

Deno.test("Metrics.render() answers with the last queue values when the read is slow", async () => {
  await using db = await testDb();
  const m = new Metrics();
  await enqueue(db.sql, "t", {}, { queue: "a" });
  // Read as if long ago (the clock is this worker's: it may be under a second old), so
  // the render below must read again rather than answer from the cache.
  await m.refreshQueues(db.sql, performance.now() - 10 * QUEUE_CACHE_MS);
  await enqueue(db.sql, "t", {}, { queue: "a" });
  let text = "";
  await db.sql.begin(async (tx) => {
    await tx`lock table shoal.jobs in access exclusive mode`; // the read waits on this
    text = await m.render(db.sql, 300);
  });
  assertEquals(sample(text, `shoal_queue_depth{queue="a"}`), 1); // the last value, not a hang
  await m.refreshQueues(db.sql); // joins the read still in flight, now unblocked
  assertEquals(sample(await m.render(), `shoal_queue_depth{queue="a"}`), 2);
});

Deno.test("runLeaderLoop() reports the lease it holds as 1, and 0 once stopped", async () => {
  await using db = await testDb();
  const stop = new AbortController();
  let cycles = 0;
  let seen: number | undefined;
  await runLeaderLoop(
    db.sql,
    { lease: "metrics-test", holder: "me", leaseMs: 5_000, intervalMs: 10, log: logger("test") },
    async () => {
      seen = sample(await metrics.render(), `shoal_leader{lease="metrics-test"}`);
      if (++cycles === 2) stop.abort();
    },
    stop.signal,
  );
  assertEquals(seen, 1);
  assertEquals(sample(await metrics.render(), `shoal_leader{lease="metrics-test"}`), 0);
});

Deno.test("tickOnce() counts a fire and its lag after the fire commits", async () => {
  await using db = await testDb();
  const name = `metrics-${crypto.randomUUID().slice(0, 8)}`;
  await upsertSchedule(db.sql, { name, cron: "* * * * *", task: "t" });
  const [{ t0 }] = await db.sql<[{ t0: Date }]>`select now() as t0`;
  // Baseline, then a tick 30 s past the slot the baseline chose.
  assertEquals((await tickOnce(db.sql, { now: t0 })).baselined, 1);
  const [row] = await db.sql<{ next_run_at: Date }[]>`
    select next_run_at from shoal.schedules where name = ${name}::text`;
  const later = new Date(row!.next_run_at.getTime() + 30_000);
  assertEquals((await tickOnce(db.sql, { now: later })).fired, 1);
  const text = await metrics.render();
  assertEquals(sample(text, `shoal_schedule_fires_total{schedule="${name}"}`), 1);
  assertEquals(sample(text, `shoal_schedule_fire_lag_seconds_sum{schedule="${name}"}`), 30);
});
