/**
 * PrefetchBuffer and Pace without a database: a fake clock drives the pace, and jobs are
 * plain objects with the fields claim order reads (priority, fair_seq).
 */
import { assertEquals } from "./assert.ts";
import {
  decimalAtMost,
  Pace,
  PrefetchBuffer,
  PROBE_FAILED_QUIET_MS,
  PROBE_QUIET_MS,
  ranksBy,
} from "../lib/prefetch.ts";
import type { Job } from "../lib/queue.ts";

/** A clock the test moves by hand. */
function fakeClock(): { now: () => number; advance: (ms: number) => void } {
  let t = 1_000;
  return { now: () => t, advance: (ms) => void (t += ms) };
}

function job(id: number, priority = 0, fairSeq = id): Job {
  return {
    id: String(id),
    queue: "default",
    task: "t",
    payload: {},
    priority,
    fairness_key: "",
    fair_seq: String(fairSeq),
    attempts: 1,
    max_attempts: 25,
    token: "1",
    key: null,
    execution_id: null,
    created_at: new Date(0),
    deadline: new Date(0),
  };
}

const ids = (jobs: readonly Job[]) => jobs.map((j) => j.id);

/** Drain the buffer in start order. */
function order(buffer: PrefetchBuffer): string[] {
  const out: string[] = [];
  for (let next = buffer.next(); next; next = buffer.next()) out.push(next.id);
  return out;
}

/** A buffer whose pace is `perSecond` jobs finished a second (measured over 200 ms). */
function pacedBuffer(
  perSecond: number,
  options: { concurrency: number; prefetch: number },
): { buffer: PrefetchBuffer; clock: ReturnType<typeof fakeClock> } {
  const clock = fakeClock();
  const buffer = new PrefetchBuffer({ ...options, now: clock.now });
  for (let i = 0; i < perSecond / 5; i++) buffer.jobFinished();
  clock.advance(200);
  return { buffer, clock };
}

Deno.test("Pace.perSecond() folds windows of 100 ms into a moving average", () => {
  const clock = fakeClock();
  const pace = new Pace(clock.now);
  assertEquals(pace.perSecond(), 0);
  for (let i = 0; i < 100; i++) pace.count();
  clock.advance(50);
  assertEquals(pace.perSecond(), 0, "a window shorter than 100 ms is not folded in yet");
  clock.advance(50);
  assertEquals(pace.perSecond(), 500, "half of the 1,000/s window, from a rate of 0");
  for (let i = 0; i < 100; i++) pace.count();
  clock.advance(100);
  assertEquals(pace.perSecond(), 750);
});

Deno.test("Pace.perSecond() starts afresh after a long idle stretch", () => {
  const clock = fakeClock();
  const pace = new Pace(clock.now);
  for (let i = 0; i < 100; i++) pace.count();
  clock.advance(100);
  assertEquals(pace.perSecond(), 500);
  for (let i = 0; i < 30; i++) pace.count();
  clock.advance(3_000);
  assertEquals(pace.perSecond(), 10, "30 jobs in 3 s, not averaged with the stale 500/s");
});

Deno.test("PrefetchBuffer.target() holds a quarter second of the pace, at most prefetch", () => {
  assertEquals(pacedBuffer(0, { concurrency: 4, prefetch: 100 }).buffer.target(), 0);
  // 200 jobs/s (as measured: half of 400/s from a rate of 0) × 0.25 s = 50 jobs.
  assertEquals(pacedBuffer(400, { concurrency: 4, prefetch: 100 }).buffer.target(), 50);
  assertEquals(pacedBuffer(4_000, { concurrency: 4, prefetch: 100 }).buffer.target(), 100);
  assertEquals(pacedBuffer(4_000, { concurrency: 4, prefetch: 0 }).buffer.target(), 0);
});

Deno.test("PrefetchBuffer.room() and wantsClaim(): free slots plus free buffer, at low water", () => {
  const { buffer } = pacedBuffer(4_000, { concurrency: 4, prefetch: 100 }); // target 100
  assertEquals(buffer.lowWater(), 50);
  assertEquals(buffer.room(0), 104);
  assertEquals(buffer.room(4), 100);
  assertEquals(buffer.wantsClaim(4), true);
  buffer.admit(Array.from({ length: 51 }, (_, i) => job(i + 1)));
  assertEquals(buffer.room(4), 49);
  assertEquals(buffer.wantsClaim(4), false, "above low water: no claim yet");
  buffer.next();
  assertEquals(buffer.wantsClaim(4), true, "down to low water");
  const idle = new PrefetchBuffer({ concurrency: 2, prefetch: 0 });
  assertEquals(idle.wantsClaim(1), true);
  assertEquals(idle.wantsClaim(2), false, "no prefetch and every slot taken");
});

Deno.test("PrefetchBuffer.admit() puts jobs ranking ahead of the last buffered first, in claim order", () => {
  const buffer = new PrefetchBuffer({ concurrency: 1, prefetch: 10 });
  buffer.admit([job(1, 0, 10), job(2, 0, 20)]);
  // Claimed later: 3 (higher priority), 4 (an earlier fair_seq: a quiet key's burst),
  // 5 (level with the last: it counts), 6 (behind).
  buffer.admit([job(3, 5, 90), job(4, 0, 15), job(5, 0, 20), job(6, 0, 30)]);
  assertEquals(order(buffer), ["3", "4", "5", "1", "2", "6"]);
});

Deno.test("PrefetchBuffer.admit() appends when nothing ranks ahead, or the buffer is empty", () => {
  const buffer = new PrefetchBuffer({ concurrency: 1, prefetch: 10 });
  buffer.admit([job(2, 0, 20), job(1, 0, 10)]);
  buffer.admit([job(3, 0, 30), job(4, -1, 1)]);
  assertEquals(order(buffer), ["2", "1", "3", "4"]);
  assertEquals(ranksBy(job(1, 1, 99), job(2, 0, 1)), true, "priority before fair_seq");
  assertEquals(ranksBy(job(1, 0, 2), job(2, 0, 10)), true, "compared as numbers, not text");
});

Deno.test("decimalAtMost() orders bigints in decimal text as BigInt does, signs and lengths included", () => {
  const values = [
    "0",
    "1",
    "-1",
    "9",
    "10",
    "-10",
    "99",
    "100",
    "-100",
    "123456789012345678",
    "-123456789012345678",
    "9223372036854775807",
    "-9223372036854775808",
    "20",
    "-20",
  ];
  for (const a of values) {
    for (const b of values) {
      assertEquals(decimalAtMost(a, b), BigInt(a) <= BigInt(b), `${a} <= ${b}`);
    }
  }
});

Deno.test("PrefetchBuffer keeps start order across starts and admissions, holding only unstarted jobs", () => {
  const buffer = new PrefetchBuffer({ concurrency: 1, prefetch: 1000 });
  buffer.admit(Array.from({ length: 300 }, (_, i) => job(i + 1)));
  const started: string[] = [];
  for (let i = 0; i < 200; i++) started.push(buffer.next()!.id);
  assertEquals(buffer.size, 100);
  assertEquals(ids(buffer.snapshot()), Array.from({ length: 100 }, (_, i) => String(i + 201)));
  buffer.admit(Array.from({ length: 50 }, (_, i) => job(i + 301)));
  assertEquals(buffer.size, 150);
  assertEquals(buffer.probeBound(), { priority: 0, fair_seq: "350" });
  for (let next = buffer.next(); next; next = buffer.next()) started.push(next.id);
  assertEquals(started, Array.from({ length: 350 }, (_, i) => String(i + 1)));
  assertEquals(buffer.size, 0);
  assertEquals(buffer.takeAll(), []);
});

Deno.test("PrefetchBuffer.probeBound() is the last buffered job, once more than the slots are buffered", () => {
  const buffer = new PrefetchBuffer({ concurrency: 2, prefetch: 10 });
  assertEquals(buffer.probeBound(), null);
  buffer.admit([job(1, 0, 10), job(2, 3, 20)]);
  assertEquals(buffer.probeBound(), null, "no more than the slots' worth: it empties soon");
  buffer.admit([job(3, 1, 30)]);
  assertEquals(buffer.probeBound(), { priority: 1, fair_seq: "30" });
});

Deno.test("PrefetchBuffer.probeWait() pauses after an empty or failed probe, not after a fruitful one", () => {
  const clock = fakeClock();
  const buffer = new PrefetchBuffer({ concurrency: 3, prefetch: 0, now: clock.now });
  assertEquals(buffer.probeLimit(), 3, "at least the slots' worth");
  assertEquals(buffer.probeWait(), 0);
  buffer.probed(2);
  assertEquals(buffer.probeWait(), 0);
  buffer.probed(0);
  assertEquals(buffer.probeWait(), PROBE_QUIET_MS);
  clock.advance(10);
  assertEquals(buffer.probeWait(), PROBE_QUIET_MS - 10);
  clock.advance(PROBE_QUIET_MS);
  assertEquals(buffer.probeWait(), 0);
  buffer.probeFailed();
  assertEquals(buffer.probeWait(), PROBE_FAILED_QUIET_MS);
});

Deno.test("PrefetchBuffer.remove() takes out only jobs still buffered; takeAll() empties it", () => {
  const buffer = new PrefetchBuffer({ concurrency: 1, prefetch: 10 });
  const jobs = [job(1), job(2), job(3), job(4)];
  buffer.admit(jobs);
  const seen = buffer.snapshot();
  buffer.next(); // job 1 started after the snapshot
  assertEquals(ids(buffer.remove([seen[0]!, seen[2]!])), ["3"]);
  assertEquals(ids(buffer.snapshot()), ["2", "4"]);
  assertEquals(ids(buffer.takeAll()), ["2", "4"]);
  assertEquals(buffer.size, 0);
  assertEquals(buffer.next(), undefined);
});

Deno.test("PrefetchBuffer.hold() keeps back buffered jobs ranking after an announced job until unhold()", () => {
  const buffer = new PrefetchBuffer({ concurrency: 1, prefetch: 100 });
  buffer.admit([job(1, 0, 10), job(2, 0, 20), job(3, 0, 30)]);
  // Ranking ahead of the last buffered job, with more buffered than the slots: worth it.
  assertEquals(buffer.wouldJump({ priority: 0, fair_seq: "15" }), true);
  assertEquals(buffer.wouldJump({ priority: 0, fair_seq: "31" }), false);
  assertEquals(buffer.wouldJump({ priority: 1, fair_seq: "99" }), true);
  buffer.hold({ priority: 0, fair_seq: "15" });
  assertEquals(buffer.holding, true);
  // Job 1 ranks ahead of the announced one: it may start; job 2 waits.
  assertEquals(buffer.next()?.id, "1");
  assertEquals(buffer.next(), undefined);
  // A second announcement ranking earlier moves the hold forward, not back.
  buffer.hold({ priority: 0, fair_seq: "25" });
  assertEquals(buffer.next(), undefined);
  // The announced job arrives and goes first; then everything may start.
  buffer.admit([job(9, 0, 15)]);
  assertEquals(buffer.next()?.id, "9");
  assertEquals(buffer.next(), undefined);
  buffer.unhold();
  assertEquals(buffer.holding, false);
  assertEquals([buffer.next()?.id, buffer.next()?.id], ["2", "3"]);
  // With no more than the slots' worth buffered, no probe: nothing to hold for.
  const small = new PrefetchBuffer({ concurrency: 2, prefetch: 100 });
  small.admit([job(4), job(5)]);
  assertEquals(small.wouldJump({ priority: 5, fair_seq: "0" }), false);
});
