/**
 * Per-queue throughput and failure rates (issue 16's overview): the totals each consumer
 * writes with its heartbeat (lib/catalog.ts, sql/019_consumer_totals.sql), their
 * differences over time (TotalsHistory), and the overview's chart per queue. Real Postgres
 * and real `main.ts` consumer processes; TotalsHistory's placement in time is also checked
 * on samples built by hand, where the expected bins can be worked out; the charts are drawn
 * in Debian's Chromium (as dashboard_browser_test.ts; a missing Chromium fails).
 */
import { assert, assertEquals } from "./assert.ts";
import { exitWithin, spawnShoal, testDb, waitFor } from "./helpers.ts";
import { enqueue } from "../lib/queue.ts";
import {
  ConsumerTotals,
  type ConsumerTotalsRow,
  MAX_REPORTED_QUEUES,
  type QueueRateSeries,
  type QueueTotals,
  readConsumerTotals,
  refreshConsumer,
  registerConsumer,
  reportInFlight,
  sumByQueue,
  TotalsHistory,
} from "../lib/catalog.ts";
import { createDashboard } from "../lib/dashboard/app.tsx";
import { DashboardServer } from "../lib/dashboard/server.ts";
import { chromium } from "playwright-core";
import type { Db } from "../lib/db.ts";

const WINDOW_MS = 10 * 60_000;
/** A short visibility timeout: the consumers report every 200 ms. */
const CONSUMER_FLAGS = [
  "--role",
  "consumer",
  "--queues",
  "a,b",
  "--visibility-timeout",
  "600ms",
  "--poll-interval",
  "100ms",
];

function totals(completed: number, failed: number, dead: number): QueueTotals {
  return { completed, failed, dead };
}

/** Every rate of a series, checked to be finite and not negative. */
function assertNoNegative(series: QueueRateSeries): void {
  for (const list of [series.completedPerS, series.failedPerS, series.deadPerS]) {
    for (const v of list) assert(Number.isFinite(v) && v >= 0, `rate ${v} in ${list}`);
  }
  for (const p of series.failurePct) assert(p === null || (p >= 0 && p <= 100), `${p}%`);
}

/** Samples readConsumerTotals() every 100 ms into a history until stopped. */
function sampler(db: Db) {
  const history = new TotalsHistory(WINDOW_MS);
  let stopped = false;
  const loop = (async () => {
    while (!stopped) {
      history.add(await readConsumerTotals(db));
      await new Promise((r) => setTimeout(r, 100));
    }
  })();
  return {
    history,
    async [Symbol.asyncDispose]() {
      stopped = true;
      await loop;
    },
  };
}

/** The live consumers' totals rows, by worker id. */
async function rows(db: Db): Promise<ConsumerTotalsRow[]> {
  return (await readConsumerTotals(db)).consumers;
}

Deno.test("consumers report totals per queue with their heartbeat, and a killed consumer's restart neither goes negative nor doubles", async () => {
  await using db = await testDb();
  await using sampling = sampler(db.sql);
  const { history } = sampling;
  await waitFor("a first sample", () => history.lastReadAt !== null);

  for (let i = 0; i < 20; i++) await enqueue(db.sql, "shoal.noop", {}, { queue: "a" });
  for (let i = 0; i < 10; i++) await enqueue(db.sql, "shoal.noop", {}, { queue: "b" });
  await enqueue(db.sql, "no.such", {}, { queue: "b", maxAttempts: 1 });
  await enqueue(db.sql, "no.such", {}, { queue: "b", maxAttempts: 1 });
  await enqueue(db.sql, "no.such.twice", {}, { queue: "b", maxAttempts: 2 });

  await using first = spawnShoal(CONSUMER_FLAGS, { url: db.url });
  const [row] = await waitFor("the first consumer's totals", async () => {
    const found = await rows(db.sql);
    const b = found[0]?.totals.b;
    return b && b.dead === 3 && found[0]!.totals.a?.completed === 20 ? found : null;
  }, 30_000);
  assertEquals(row!.totals, { a: totals(20, 0, 0), b: totals(10, 1, 3) });
  assertEquals(row!.heartbeat_ms, 200);
  assertEquals(sumByQueue(await readConsumerTotals(db.sql)).get("b"), totals(10, 1, 3));
  await waitFor("the history to see them", () => history.series(10_000, "b").total.dead === 3);
  assertEquals(history.series(10_000, "a").total, totals(20, 0, 0));
  assertEquals(history.series(10_000, "b").total, totals(10, 1, 3));
  assertEquals(history.series(10_000).total, totals(30, 1, 3));
  assertEquals(history.queues(), ["a", "b"]);

  // Killed: its row stays, live for a few minutes, its totals frozen.
  first.kill("SIGKILL");
  await first.exited();
  for (let i = 0; i < 5; i++) await enqueue(db.sql, "shoal.noop", {}, { queue: "a" });
  await enqueue(db.sql, "no.such", {}, { queue: "a", maxAttempts: 1 });
  await using second = spawnShoal(CONSUMER_FLAGS, { url: db.url });
  const both = await waitFor("the second consumer's totals", async () => {
    const found = await rows(db.sql);
    return found.length === 2 && found.some((r) => r.totals.a?.dead === 1) ? found : null;
  }, 30_000);
  const restarted = both.find((r) => r.worker_id !== row!.worker_id)!;
  assertEquals(restarted.totals, { a: totals(5, 0, 1) });
  // Both rows count in the sums (each since its own start)...
  assertEquals(sumByQueue(await readConsumerTotals(db.sql)).get("a"), totals(25, 0, 1));
  // ...and in the rates each job once: the dead consumer adds nothing, the new one from zero.
  await waitFor("the history to see the second", () => history.series(10_000, "a").total.dead);
  // A few more heartbeats with nothing new.
  await new Promise((r) => setTimeout(r, 600));
  for (const queue of ["a", "b", undefined]) assertNoNegative(history.series(10_000, queue));
  assertEquals(history.series(10_000, "a").total, totals(25, 0, 1));
  assertEquals(history.series(10_000, "b").total, totals(10, 1, 3));
  const a = history.series(1000, "a");
  assert(a.completedPerS.some((v) => v > 0), JSON.stringify(a));
  assert(a.failurePct.some((p) => p !== null && p > 0), JSON.stringify(a.failurePct));

  second.kill("SIGTERM");
  const { code, output } = await exitWithin(second, 20_000);
  assertEquals(code, 0, output);
  // A graceful stop removes its row: it contributes nothing after.
  assertEquals((await rows(db.sql)).map((r) => r.worker_id), [row!.worker_id]);
});

Deno.test("TotalsHistory: a restart under the same worker id counts from zero, a count going down is dropped", async () => {
  await using db = await testDb();
  const history = new TotalsHistory(WINDOW_MS);
  const sample = async () => history.add(await readConsumerTotals(db.sql));
  const consumer = { workerId: "host:1", queues: ["a"], tasks: [] };
  const report = (completed: number) =>
    reportInFlight(db.sql, "host:1", new Map(), 60_000, {
      totals: { a: totals(completed, 0, 0) },
      heartbeatMs: 1000,
    });
  await sample(); // before it started: what it reports is all new
  await registerConsumer(db.sql, consumer);
  await report(100);
  await sample();
  await report(150);
  await sample();
  // Restarted under the same worker id (a container's pid 1): registering resets the totals.
  await registerConsumer(db.sql, consumer);
  const [reset] = await db.sql<{ totals: unknown }[]>`select totals from shoal.consumers`;
  assertEquals(reset!.totals, {});
  await sample();
  await report(7);
  await sample();
  assertEquals(history.series(1000, "a").total, totals(157, 0, 0));
  // Going down without a new start (no consumer does; a reset all the same): dropped, and
  // the lower count is the new baseline.
  await report(3);
  await sample();
  await report(5);
  await sample();
  const a = history.series(1000, "a");
  assertEquals(a.total, totals(159, 0, 0));
  assertNoNegative(a);
});

Deno.test("ConsumerTotals reports its first MAX_REPORTED_QUEUES queues, and a consumer row that comes back starts from empty totals", async () => {
  const counted = new ConsumerTotals();
  for (let i = 0; i <= MAX_REPORTED_QUEUES; i++) {
    assertEquals(counted.add(`q${i}`, "completed"), i < MAX_REPORTED_QUEUES);
  }
  assertEquals(counted.add("q0", "failed"), true);
  assertEquals(Object.keys(counted.toJSON()).length, MAX_REPORTED_QUEUES);
  assertEquals(counted.toJSON().q0, totals(1, 1, 0));
  assert(counted.dropped);
  // The document stays small enough to be kept in line (sql/019_consumer_totals.sql).
  assert(JSON.stringify(counted.toJSON()).length < 2000);

  await using db = await testDb();
  const consumer = { workerId: "host:9", queues: ["a"], tasks: [] };
  await registerConsumer(db.sql, consumer);
  assertEquals(await refreshConsumer(db.sql, consumer), false);
  await reportInFlight(db.sql, "host:9", new Map(), 60_000, {
    totals: { a: totals(4, 0, 0) },
    heartbeatMs: 1000,
  });
  await db.sql`delete from shoal.consumers`;
  assertEquals(await refreshConsumer(db.sql, consumer), true);
  const [row] = await rows(db.sql);
  assertEquals(row!.totals, {});
});

Deno.test("TotalsHistory places each step between its reports, from at most a heartbeat before the read that saw the last", () => {
  const history = new TotalsHistory(WINDOW_MS);
  const t0 = Date.UTC(2026, 0, 1, 12, 0, 0); // on a 10 s boundary
  const started = new Date(t0 - 3_600_000); // long before: its first sight is a baseline
  const row = (at: number, completed: number, failed = 0): ConsumerTotalsRow => ({
    worker_id: "host:1",
    started_at: started,
    totals_at: new Date(at),
    heartbeat_ms: 10_000,
    totals: { q: totals(completed, failed, 0) },
  });
  const add = (readAt: number, ...consumers: ConsumerTotalsRow[]) =>
    history.add({ at: new Date(readAt), consumers });
  add(t0, row(t0 - 5000, 1000)); // baseline: its 1,000 jobs before are not in the window
  add(t0 + 10_000, row(t0 + 5000, 1100, 20)); // 100 + 20 over (t0 - 5 s, t0 + 5 s]
  // Idle for a minute (nothing new, nothing written), then 60 jobs: they finished after the
  // last heartbeat before the read that saw the old report, not over the whole minute.
  add(t0 + 60_000, row(t0 + 5000, 1100, 20));
  add(t0 + 75_000, row(t0 + 70_000, 1160, 20));
  const s = history.series(10_000, "q");
  assertEquals(s.t[0], t0 / 1000 + 10); // from the first read's bin
  assertEquals(s.t.at(-1), (t0 + 80_000) / 1000);
  assertEquals(s.completedPerS.slice(0, 2), [5, 0]); // 50 in (t0, t0 + 5 s]; the rest before t0
  assertEquals(s.failedPerS.slice(0, 1), [1]);
  assertEquals(s.failurePct[0], 16.7); // 10 of 60 in that bin
  // (t0 + 50 s, t0 + 70 s]: 30 in each of the two bins ending at t0 + 60 s and t0 + 70 s.
  assertEquals(s.completedPerS.slice(4, 7), [0, 3, 3]);
  assertEquals(s.failurePct[2], null);
  assertEquals(s.total, totals(110, 10, 0));
  // A consumer that disappears contributes nothing after.
  add(t0 + 85_000);
  assertEquals(history.series(10_000, "q").total, totals(110, 10, 0));
  // A new one started since the history began counts from its start.
  const fresh: ConsumerTotalsRow = {
    ...row(t0 + 90_000, 40),
    worker_id: "host:2",
    started_at: new Date(t0 + 85_000),
  };
  add(t0 + 95_000, fresh);
  assertEquals(history.series(10_000, "q").total, totals(150, 10, 0));
});

Deno.test("the overview shows a chart per queue from the consumers' totals", async () => {
  await using db = await testDb();
  const dashboard = createDashboard({ db: db.sql, readOnly: false, access: {} });
  const overview = async () => {
    const response = await dashboard.fetch(new Request("http://127.0.0.1:9464/overview/live"));
    assertEquals(response.status, 200);
    return await response.text();
  };
  assert(!(await overview()).includes('data-chart-kind="queue"'));
  for (let i = 0; i < 8; i++) await enqueue(db.sql, "shoal.noop", {}, { queue: "a" });
  for (let i = 0; i < 4; i++) await enqueue(db.sql, "shoal.noop", {}, { queue: "b" });
  await enqueue(db.sql, "no.such", {}, { queue: "b", maxAttempts: 1 });
  await using consumer = spawnShoal(CONSUMER_FLAGS, { url: db.url });
  // Polled as the page does (every 2 s there; faster here), until both queues have a chart.
  const body = await waitFor(
    "a chart per queue, every job counted",
    async () => {
      const html = await overview();
      const done = html.includes('<strong id="failure-rate">7.7%</strong>'); // 1 dead of 13
      return done && html.includes('data-queue="a"') && html.includes('data-queue="b"')
        ? html
        : null;
    },
    30_000,
    300,
  );
  const charts = [
    ...body.matchAll(
      /data-queue="([^"]+)"[^>]*>\s*<span>([^<]*)<\/span>\s*<div class="spark" data-chart="([^"]+)" data-chart-kind="queue"/g,
    ),
  ];
  charts.sort((x, y) => (x[1]! < y[1]! ? -1 : 1));
  assertEquals(charts.map((m) => m[1]), ["a", "b"], body);
  for (const m of charts) {
    const data = JSON.parse(m[3]!.replaceAll("&quot;", '"')) as (number | null)[][];
    assertEquals(data.length, 3); // time, completed/s, failure %
    assert(data[0]!.length >= 1 && data.every((s) => s.length === data[0]!.length), m[3]);
  }
  // Queue b: 4 completed and 1 dead-lettered: a 20% failure rate over the window.
  assert(charts[1]![2]!.includes("20.0% failed"), charts[1]![2]);
  assert(charts[0]![2]!.includes("0.0% failed"), charts[0]![2]);
  assert(body.includes("Throughput, all queues"));
  consumer.kill("SIGTERM");
  const { code, output } = await exitWithin(consumer, 20_000);
  assertEquals(code, 0, output);
});

Deno.test({
  name: "the per-queue charts draw in Chromium and survive the overview's live swaps",
  // Playwright keeps a browser process and its pipes open until close(): closed below.
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await using db = await testDb();
    const server = new DashboardServer(db.sql, { hostname: "127.0.0.1", port: 0 }, {
      readOnly: true,
      env: { get: () => undefined },
    });
    await using consumer = spawnShoal(CONSUMER_FLAGS, { url: db.url });
    const browser = await chromium.launch({
      executablePath: "/usr/bin/chromium",
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"],
    });
    try {
      const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
      const problems: string[] = [];
      page.on("console", (m) => void (m.type() === "error" && problems.push(m.text())));
      page.on("pageerror", (e) => void problems.push(e.message));
      await page.goto(`http://127.0.0.1:${server.port}/`);
      // Jobs finished while the page is open: those before its first sample are not shown.
      await page.locator("#overview").waitFor();
      for (let i = 0; i < 6; i++) await enqueue(db.sql, "shoal.noop", {}, { queue: "a" });
      await enqueue(db.sql, "no.such", {}, { queue: "b", maxAttempts: 1 });
      await enqueue(db.sql, "shoal.noop", {}, { queue: "b" });
      // The page samples as it refreshes (every 2 s): both queues get their chart.
      for (const queue of ["a", "b"]) {
        await page.locator(`.queue-rates[data-queue="${queue}"] .uplot`).waitFor({
          timeout: 20_000,
        }).catch((cause) => {
          throw new Error(`No chart for queue ${queue}: ${problems.join("; ")}`, { cause });
        });
      }
      const charts = page.locator(".queue-rates .uplot canvas");
      assertEquals(await charts.count(), 2);
      await page.waitForTimeout(2500); // a live swap redraws them
      assertEquals(await page.locator(".queue-rates .uplot").count(), 2);
      assertEquals(await page.locator("#overview > div > .chart .uplot").count(), 1);
      assertEquals(problems, []);
    } finally {
      await browser.close();
      await server.close();
    }
    consumer.kill("SIGTERM");
    assertEquals((await exitWithin(consumer, 20_000)).code, 0);
  },
});
