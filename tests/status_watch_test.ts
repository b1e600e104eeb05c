/**
 * `shoal status --watch` (lib/status.ts, lib/cli.ts): the pure rendering (progress bars,
 * rates from successive samples, frames and JSON lines) and real processes redrawing until
 * SIGINT. The totals the rates come from are read by lib/queue.ts (tests/job_counts_test.ts).
 */
import { assert, assertEquals } from "./assert.ts";
import { exitWithin, runShoal, spawnShoal, testDb, waitFor } from "./helpers.ts";
import { enqueue } from "../lib/queue.ts";
import { pauseQueue, setConcurrencyLimit } from "../lib/flow.ts";
import {
  CLEAR_SCREEN,
  formatWatchFrame,
  formatWatchJson,
  progressBar,
  rates,
  type Status,
  type WatchSample,
} from "../lib/status.ts";

const EMPTY: Status = {
  queues: [],
  executions: [],
  leases: [],
  schedules: [],
  unserved: [],
  flow: { paused: [], limits: [], rate_limits: [], holds: [], weights: [] },
  steps: { records: 0, jobs: 0, sleeping: 0, waiting: 0, exact: true },
  held: { queues: [], exact: true },
  progress: [],
};

function sampleAt(ms: number, deleted: number, dead: number, status = EMPTY): WatchSample {
  return { at: new Date(ms), status, totals: { deleted, dead } };
}

Deno.test("progressBar() fills its width in proportion, clamped, with percent and counts", () => {
  assertEquals(progressBar(0, 10, 10), "[----------]   0% 0/10");
  assertEquals(progressBar(5, 10, 10), "[#####-----]  50% 5/10");
  assertEquals(progressBar(10, 10, 10), "[##########] 100% 10/10");
  assertEquals(progressBar(1, 3, 10), "[###-------]  33% 1/3");
  assertEquals(progressBar(12, 10, 4), "[####] 100% 12/10");
  assertEquals(progressBar(0, 0, 4), "[####] 100% 0/0");
  assertEquals(progressBar(3, 7).length, progressBar(3, 70000).length - 4);
});

Deno.test("rates() are per second between samples, with dead-lettered jobs not counted as completed", () => {
  const first = sampleAt(10_000, 100, 4);
  assertEquals(rates(null, first), { completed_per_s: null, dead_per_s: null });
  // 2 s later: 50 rows left the live table, 6 of them into the dead-letter table.
  assertEquals(rates(first, sampleAt(12_000, 150, 10)), { completed_per_s: 22, dead_per_s: 3 });
  assertEquals(rates(first, sampleAt(13_000, 101, 4)), { completed_per_s: 0.3, dead_per_s: 0 });
  // The statistics were reset, or the clock did not move: no rate rather than a wrong one.
  assertEquals(rates(first, sampleAt(12_000, 3, 0)), { completed_per_s: null, dead_per_s: null });
  assertEquals(rates(first, sampleAt(10_000, 200, 4)), { completed_per_s: null, dead_per_s: null });
});

const BUSY: Status = {
  queues: [{
    queue: "mail",
    ready: 3,
    scheduled: 1,
    running: 2,
    prefetched: 7,
    dead: 0,
    oldest_ready_age_s: 4.5,
    exact: true,
  }],
  executions: [{
    id: "7",
    status: "running",
    created_at: new Date("2026-01-01T00:00:00Z"),
    updated_at: new Date("2026-01-01T00:00:05Z"),
    error: null,
    total: 8,
    arrived: 2,
  }, {
    id: "6",
    status: "completed",
    created_at: new Date("2026-01-01T00:00:00Z"),
    updated_at: new Date("2026-01-01T00:00:01Z"),
    error: null,
    total: null,
    arrived: null,
  }],
  leases: [],
  schedules: [],
  unserved: [],
  flow: { paused: [], limits: [], rate_limits: [], holds: [], weights: [] },
  steps: { records: 0, jobs: 0, sleeping: 0, waiting: 0, exact: true },
  held: { queues: [], exact: true },
  progress: [],
};

Deno.test("formatWatchFrame() shows the time, interval, rates, queues and fan-out bars", () => {
  const frame = formatWatchFrame(
    sampleAt(Date.parse("2026-01-01T00:00:06Z"), 0, 0, BUSY),
    { completed_per_s: 12.5, dead_per_s: 0 },
    { intervalMs: 2000 },
  );
  const lines = frame.split("\n");
  assertEquals(lines[0], "shoal status at 2026-01-01T00:00:06.000Z, every 2s (Ctrl-C quits)");
  assertEquals(lines[1], "completed 12.5/s  dead-lettered 0.0/s  (all queues)");
  assert(lines.some((l) => /^mail\s+3\s+1\s+2\s+7\s+0\s+4\.5s$/.test(l)), frame);
  const running = lines.find((l) => l.startsWith("7 "))!;
  assert(running.includes("[#####---------------]  25% 2/8"), running);
  const done = lines.find((l) => l.startsWith("6 "))!;
  assert(/^6\s+completed\s+- /.test(done), done);
  assert(!frame.includes(CLEAR_SCREEN), "the caller adds the clear-screen prefix");
  const first = formatWatchFrame(sampleAt(0, 0, 0), rates(null, sampleAt(0, 0, 0)), {
    intervalMs: 200,
  });
  assert(first.includes("completed -  dead-lettered -"), first);
});

Deno.test("formatWatchJson() is one line holding the status keys plus at and rates", () => {
  const line = formatWatchJson(sampleAt(Date.parse("2026-01-01T00:00:06Z"), 0, 0, BUSY), {
    completed_per_s: 1,
    dead_per_s: null,
  });
  assert(line.endsWith("\n") && !line.slice(0, -1).includes("\n"), line);
  const parsed = JSON.parse(line);
  assertEquals(Object.keys(parsed), [
    "at",
    "rates",
    "queues",
    "executions",
    "leases",
    "schedules",
    "unserved",
    "flow",
    "steps",
    "held",
    "progress",
  ]);
  assertEquals(parsed.at, "2026-01-01T00:00:06.000Z");
  assertEquals(parsed.rates, { completed_per_s: 1, dead_per_s: null });
  assertEquals(parsed.executions[0].arrived, 2);
});

Deno.test("shoal status --watch redraws in place until SIGINT, then exits 0", async () => {
  await using db = await testDb();
  await enqueue(db.sql, "t", {}, { queue: "watched" });
  await enqueue(db.sql, "t", {}, { queue: "held" });
  await pauseQueue(db.sql, "held");
  await using proc = spawnShoal(["status", "--watch", "--interval", "200ms"], { url: db.url });
  await waitFor("two frames", () => proc.output().split(CLEAR_SCREEN).length >= 3, 20_000);
  proc.kill("SIGINT");
  const { code, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 0, output);
  const frames = output.split(CLEAR_SCREEN).slice(1);
  assert(frames.length >= 2, output);
  for (const frame of frames.slice(0, 2)) {
    assert(frame.startsWith("shoal status at "), frame);
    assert(frame.includes("every 200ms"), frame);
    assert(/\nwatched\s+1\s/.test(frame), frame);
    assert(/\nheld \(paused\)\s+1\s/.test(frame), frame);
  }
  assert(frames[1]!.includes("completed 0.0/s"), frames[1]);
});

Deno.test("shoal status --watch --json prints one JSON line per interval until SIGINT", async () => {
  await using db = await testDb();
  await enqueue(db.sql, "t", {}, { queue: "watched" });
  await setConcurrencyLimit(db.sql, { queue: "watched", maxRunning: 3 });
  await using proc = spawnShoal(["status", "--watch", "--json", "--interval", "200ms"], {
    url: db.url,
  });
  await waitFor(
    "two lines",
    () => proc.output().split("\n").filter((l) => l.startsWith('{"at"')).length >= 2,
    20_000,
  );
  proc.kill("SIGINT");
  const { code, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 0, output);
  const lines = output.split("\n").filter((l) => l.startsWith(`{"at"`)).map((l) => JSON.parse(l));
  assertEquals(lines[0].rates, { completed_per_s: null, dead_per_s: null });
  assertEquals(lines[1].rates.dead_per_s, 0);
  assertEquals(lines[1].queues[0].queue, "watched");
  assertEquals(lines[1].flow, {
    paused: [],
    limits: [{ queue: "watched", task: null, key: null, max_running: 3, slots_held: 0 }],
    rate_limits: [],
    holds: [],
    weights: [],
  });
  assert(!output.includes(CLEAR_SCREEN), "no terminal codes in JSON mode");
});

Deno.test("shoal status --interval without --watch exits 2", async () => {
  await using db = await testDb();
  const { code, stderr } = await runShoal(["status", "--interval", "1s"], { url: db.url });
  assertEquals(code, 2, stderr);
  assertEquals(stderr, "shoal: Invalid --interval: shoal status takes it only with --watch\n");
});
