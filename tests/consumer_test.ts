/**
 * runConsumer() in-process against a real database: the behaviours that are awkward to
 * see from outside a process (what a handler's signal says, how many handlers run at
 * once, a claim lost mid-run, retries into the dead-letter table).
 */
import { assert, assertEquals } from "./assert.ts";
import {
  FAST_CONSUMER,
  figure,
  gateJobDeletes,
  gateJobUpdates,
  sleep,
  startConsumer,
  testDb,
  waitFor,
} from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import { parseWake, runConsumer } from "../lib/consumer.ts";
import { enqueue, enqueueMany } from "../lib/queue.ts";
import { defineTask, TaskRegistry } from "../lib/tasks.ts";

/** Resolves with "finished" after `ms`, or with the signal's reason as soon as it aborts. */
function sleepOrAbort(ms: number, signal: AbortSignal): Promise<unknown> {
  return new Promise((resolve) => {
    const onAbort = () => {
      clearTimeout(timer);
      resolve(signal.reason);
    };
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve("finished");
    }, ms);
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

/** Resolves when the signal aborts, with its reason. */
function aborted(signal: AbortSignal): Promise<unknown> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve(signal.reason);
    signal.addEventListener("abort", () => resolve(signal.reason), { once: true });
  });
}

async function count(sql: Sql, table: "jobs" | "dead_jobs"): Promise<number> {
  const [row] = table === "jobs"
    ? await sql<{ n: number }[]>`select count(*)::int as n from shoal.jobs`
    : await sql<{ n: number }[]>`select count(*)::int as n from shoal.dead_jobs`;
  return row!.n;
}

Deno.test("runConsumer() never runs more handlers at once than its concurrency", async () => {
  await using db = await testDb();
  let now = 0;
  let peak = 0;
  let ran = 0;
  const task = defineTask({
    name: "t.count",
    async handler() {
      peak = Math.max(peak, ++now);
      await new Promise((resolve) => setTimeout(resolve, 20));
      now--;
      ran++;
    },
  });
  await enqueueMany(db.sql, Array.from({ length: 40 }, () => ({ task: "t.count" })));
  const consumer = startConsumer(db.sql, [task], { concurrency: 3 });
  try {
    await waitFor("the queue to drain", async () => (await count(db.sql, "jobs")) === 0);
  } finally {
    await consumer.stop();
  }
  assertEquals(ran, 40);
  assertEquals(peak, 3);
});

Deno.test("runConsumer() wakes on NOTIFY long before its poll interval", async () => {
  await using db = await testDb();
  let ran = false;
  const task = defineTask({ name: "t.wake", handler: () => void (ran = true) });
  const consumer = startConsumer(db.sql, [task], { listen: true, pollIntervalMs: 600_000 });
  try {
    // Let the first (empty) claim pass so only a NOTIFY can wake the loop.
    await new Promise((resolve) => setTimeout(resolve, 300));
    await enqueue(db.sql, "t.wake");
    await waitFor("the notified job to run", () => ran, 10_000);
  } finally {
    await consumer.stop();
  }
});

Deno.test("runConsumer() aborts a handler's signal on its task timeout and records the failure", async () => {
  await using db = await testDb();
  let reason: unknown;
  const task = defineTask({
    name: "t.timeout",
    timeoutMs: 100,
    async handler(_payload, ctx) {
      reason = await aborted(ctx.signal);
    },
  });
  const id = await enqueue(db.sql, "t.timeout", {}, { maxAttempts: 1 });
  const consumer = startConsumer(db.sql, [task], { taskTimeoutMs: 60_000 });
  try {
    await waitFor(
      "the job to be dead-lettered",
      async () => (await count(db.sql, "dead_jobs")) === 1,
    );
  } finally {
    await consumer.stop();
  }
  assert(
    reason instanceof Error && reason.message === "Task timed out after 100ms",
    String(reason),
  );
  const [dead] = await db.sql<{ id: string; reason: string }[]>`
    select id, reason from shoal.dead_jobs`;
  assertEquals(dead, { id, reason: "Task timed out after 100ms" });
});

Deno.test("runConsumer() retries a failing job with backoff, then dead-letters it with its history", async () => {
  await using db = await testDb();
  let calls = 0;
  const task = defineTask({
    name: "t.flaky",
    handler() {
      calls++;
      throw new Error(`failure ${calls}`);
    },
  });
  const id = await enqueue(db.sql, "t.flaky", {}, { maxAttempts: 3 });
  const consumer = startConsumer(db.sql, [task]);
  try {
    await waitFor(
      "the job to be dead-lettered",
      async () => (await count(db.sql, "dead_jobs")) === 1,
    );
  } finally {
    await consumer.stop();
  }
  assertEquals(calls, 3);
  const [dead] = await db.sql<
    { id: string; attempts: number; reason: string; errors: { attempt: number; error: string }[] }[]
  >`select id, attempts, reason, errors from shoal.dead_jobs`;
  assertEquals(dead?.id, id);
  assertEquals(dead?.attempts, 3);
  assertEquals(dead?.reason, "Error: failure 3");
  assertEquals(dead?.errors.map((e) => [e.attempt, e.error]), [
    [1, "Error: failure 1"],
    [2, "Error: failure 2"],
    [3, "Error: failure 3"],
  ]);
  assertEquals(await count(db.sql, "jobs"), 0);
});

Deno.test("runConsumer() aborts a handler whose claim was lost and discards its outcome", async () => {
  await using db = await testDb();
  let reason: unknown;
  let started = false;
  const task = defineTask({
    name: "t.lost",
    async handler(_payload, ctx) {
      started = true;
      reason = await aborted(ctx.signal);
      // Finishing "successfully" now must not ack the job: it is someone else's.
    },
  });
  const id = await enqueue(db.sql, "t.lost");
  const consumer = startConsumer(db.sql, [task], { visibilityTimeoutMs: 300 });
  try {
    await waitFor("the handler to start", () => started);
    // Another consumer redelivered it meanwhile: the token moved on.
    await db.sql`
      update shoal.jobs set token = token + 1, run_at = now() + interval '1 hour'
      where id = ${id}::bigint`;
    await waitFor("the handler to be aborted", () => reason !== undefined);
    await new Promise((resolve) => setTimeout(resolve, 200));
  } finally {
    await consumer.stop();
  }
  assert(reason instanceof Error && reason.name === "ClaimLostError", String(reason));
  const [row] = await db.sql<
    { attempts: number; token: string; last_error: string | null; far: boolean }[]
  >`
    select attempts, token, last_error, run_at > now() + interval '50 minutes' as far
    from shoal.jobs where id = ${id}::bigint`;
  // Not acked, failed, extended or released: the new owner's claim is untouched.
  assertEquals(row, { attempts: 1, token: "2", last_error: null, far: true });
  assertEquals(await count(db.sql, "dead_jobs"), 0);
});

Deno.test("runConsumer() shutdown finishes what fits in the grace and releases the rest", async () => {
  await using db = await testDb();
  const reasons = new Map<string, unknown>();
  const started = new Set<string>();
  const task = defineTask<{ ms: number }>({
    name: "t.sleep",
    parse: (payload) => ({ ms: payload.ms as number }),
    async handler({ ms }, ctx) {
      started.add(ctx.job.id);
      reasons.set(ctx.job.id, await sleepOrAbort(ms, ctx.signal));
    },
  });
  const [short, long] = (await enqueueMany(db.sql, [
    { task: "t.sleep", payload: { ms: 100 } },
    { task: "t.sleep", payload: { ms: 1500 } },
  ])).map((e) => e.id) as [string, string];
  const consumer = startConsumer(db.sql, [task], { shutdownGraceMs: 500 });
  await waitFor("both handlers to start", () => started.size === 2);
  await consumer.stop();

  assertEquals(reasons.get(short), "finished");
  const longReason = reasons.get(long);
  assert(longReason instanceof Error && longReason.name === "ShutdownError", String(longReason));
  const rows = await db.sql<{ id: string; attempts: number; locked_by: string | null }[]>`
    select id, attempts, locked_by from shoal.jobs`;
  assertEquals([...rows], [{ id: long, attempts: 0, locked_by: null }]);
});

Deno.test("defineTask() refuses a timeout longer than a timer can wait", () => {
  // setTimeout fires after 1 ms for anything above 2^31 - 1 ms: every run would time out.
  assert.throws(
    () => defineTask({ name: "t.forever", timeoutMs: 30 * 86_400_000, handler: () => {} }),
    /^RangeError: Invalid definition\.timeoutMs for defineTask\(\): expected a positive number of milliseconds up to 2073600000 \(24 days\), not 2592000000$/,
  );
  defineTask({ name: "t.long", timeoutMs: 24 * 86_400_000, handler: () => {} });
});

Deno.test("runConsumer() ctx.enqueue() applies the enqueued task's queue and retry budget", async () => {
  await using db = await testDb();
  const target = defineTask({
    name: "t.target",
    queue: "emails",
    maxAttempts: 3,
    handler: () => {},
  });
  let enqueued = "";
  const parent = defineTask({
    name: "t.parent",
    handler: async (_payload, ctx) => {
      enqueued = await ctx.enqueue("t.target", { to: "ada" });
    },
  });
  await enqueue(db.sql, "t.parent");
  const consumer = startConsumer(db.sql, [parent, target]); // consumes "default" only
  try {
    await waitFor("the parent to enqueue", () => enqueued !== "");
  } finally {
    await consumer.stop();
  }
  const [row] = await db.sql<{ queue: string; max_attempts: number }[]>`
    select queue, max_attempts from shoal.jobs where id = ${enqueued}::bigint`;
  assertEquals({ ...row }, { queue: "emails", max_attempts: 3 });
});

Deno.test("runConsumer() prefetches while jobs are fast and hands the buffer back at once on shutdown", async () => {
  await using db = await testDb();
  const started = new Set<string>();
  let gateStarted = false;
  const quick = defineTask({
    name: "t.quick",
    handler: (_payload, ctx) => void started.add(ctx.job.id),
  });
  const gate = defineTask({
    name: "t.gate",
    async handler(_payload, ctx) {
      gateStarted = true;
      await aborted(ctx.signal);
    },
  });
  // Fast jobs set the pace (the buffer holds a quarter second of it), then one job that
  // holds the only slot until shutdown, then more fast jobs to buffer behind it.
  await enqueueMany(db.sql, Array.from({ length: 400 }, () => ({ task: "t.quick" })));
  await enqueue(db.sql, "t.gate");
  await enqueueMany(db.sql, Array.from({ length: 100 }, () => ({ task: "t.quick" })));
  const stop = new AbortController();
  const done = runConsumer(
    { sql: db.sql, tasks: new TaskRegistry([quick, gate]) },
    { ...FAST_CONSUMER, concurrency: 1, prefetch: 50, shutdownGraceMs: 3000 },
    stop.signal,
  );
  await waitFor("the gate job to start", () => gateStarted);
  const locked = async () => {
    const [row] = await db.sql<{ n: number }[]>`
      select count(*)::int as n from shoal.jobs where locked_by is not null`;
    return row!.n;
  };
  assert(await locked() > 1, "jobs should be buffered behind the running one");

  stop.abort();
  // The buffer goes back while the running job still has its grace period.
  await waitFor("the buffer to be handed back", async () => await locked() === 1);
  const left = await db.sql<{ id: string; attempts: number }[]>`
    select id, attempts from shoal.jobs where task = 't.quick'`;
  assert(left.length > 0);
  for (const job of left) {
    assertEquals(job.attempts, 0, `buffered job ${job.id} must not burn an attempt`);
    assert(!started.has(job.id), `buffered job ${job.id} must not have started`);
  }
  await done;
  assertEquals(await locked(), 0);
});

Deno.test("runConsumer() with LISTEN and a long poll runs a retry when it is due, not at its next poll", async () => {
  await using db = await testDb();
  const runs: number[] = [];
  const flaky = defineTask({
    name: "t.flaky",
    handler() {
      runs.push(Date.now());
      if (runs.length === 1) throw new Error("first attempt fails");
    },
  });
  const consumer = startConsumer(db.sql, [flaky], {
    listen: true,
    pollIntervalMs: 60_000,
    retryBaseMs: 300,
  });
  try {
    await enqueue(db.sql, "t.flaky");
    await waitFor("the retry to run", () => runs.length === 2, 15_000);
    const gap = runs[1]! - runs[0]!;
    // Backoff is 300 ms ± 25%; a retry found only by the poll would come after 60 s.
    assert(gap >= 200 && gap < 10_000, `retried after ${gap} ms`);
  } finally {
    await consumer.stop();
  }
});

Deno.test("runConsumer() with LISTEN and a long poll picks up jobs another consumer released at shutdown", async () => {
  await using db = await testDb();
  const started: string[] = [];
  const slow = defineTask({
    name: "t.slow",
    async handler(_payload, ctx) {
      started.push(ctx.job.id);
      await sleepOrAbort(60_000, ctx.signal);
    },
  });
  const id = await enqueue(db.sql, "t.slow");
  const first = startConsumer(db.sql, [slow], { shutdownGraceMs: 0, listen: true });
  await waitFor("the first consumer to start the job", () => started.length === 1);
  const second = startConsumer(db.sql, [slow], { listen: true, pollIntervalMs: 60_000 });
  try {
    await sleep(300); // the second consumer is listening and has done its first claim
    await first.stop();
    await waitFor("the second consumer to start the released job", () => started.length === 2);
    assertEquals(started, [id, id]);
  } finally {
    await second.stop();
  }
});

Deno.test("runConsumer() with LISTEN and a long poll starts a delayed job when it is due", async () => {
  await using db = await testDb();
  const started: number[] = [];
  const task = defineTask({ name: "t.later", handler: () => void started.push(Date.now()) });
  const consumer = startConsumer(db.sql, [task], { listen: true, pollIntervalMs: 60_000 });
  try {
    await sleep(300); // listening, first claim done
    const due = Date.now() + 800;
    await enqueue(db.sql, "t.later", {}, { runAt: new Date(due) });
    await waitFor("the delayed job to start", () => started.length === 1, 15_000);
    const late = started[0]! - due;
    // The NOTIFY announced its start time; a job found only by the poll would wait 60 s.
    assert(late >= -50 && late < 5_000, `started ${late} ms after its run_at`);
  } finally {
    await consumer.stop();
  }
});

Deno.test("runConsumer() with LISTEN and a long poll starts delayed jobs enqueued concurrently (coalesced NOTIFY) when due", async () => {
  await using db = await testDb();
  const started = new Map<string, number>();
  const task = defineTask({
    name: "t.later",
    handler: (_payload, ctx) => void started.set(ctx.job.id, Date.now()),
  });
  const consumer = startConsumer(db.sql, [task], { listen: true, pollIntervalMs: 60_000 });
  try {
    await sleep(300); // listening, first claim done
    const base = Date.now() + 600;
    // Calls in flight together share one NOTIFY sent after their commits (lib/queue.ts
    // Wakeups): it must still announce the soonest start, not "ready now" or nothing.
    const dues = Array.from({ length: 10 }, (_, i) => base + i * 100);
    const ids = await Promise.all(
      dues.map((due) => enqueue(db.sql, "t.later", {}, { runAt: new Date(due) })),
    );
    await waitFor("every delayed job to start", () => started.size === ids.length, 15_000);
    ids.forEach((id, i) => {
      const late = started.get(id)! - dues[i]!;
      assert(late >= -50 && late < 5_000, `job ${id} started ${late} ms after its run_at`);
    });
  } finally {
    await consumer.stop();
  }
});

Deno.test("runConsumer() stops claiming while its acks are too far behind, and resumes once they catch up", async () => {
  await using db = await testDb();
  let ran = 0;
  const task = defineTask({ name: "t.fast", handler: () => void ran++ });
  await enqueueMany(db.sql, Array.from({ length: 40 }, () => ({ task: "t.fast" })));
  await using gate = await gateJobDeletes(db.sql); // the acks lag: none gets through
  const consumer = startConsumer(db.sql, [task], {
    concurrency: 2,
    ackBatchCap: 2,
    ackBacklogLimit: 5,
    // Only freed slots and the completer's room wake the loop: no poll hides a missed wake.
    pollIntervalMs: 60_000,
  });
  try {
    await waitFor("the backlog to fill", () => ran >= 5);
    await sleep(300);
    const paused = ran;
    // At the limit (5) it stops; what was claimed or running meanwhile (two claims of
    // two) may still finish. Without backpressure all 40 would run while no ack lands.
    assert(paused <= 9, `${paused} jobs ran while no ack landed`);
    await sleep(300);
    assertEquals(ran, paused, "no claim while the backlog is at its limit");
    await gate.open();
    await waitFor("the queue to drain", async () => (await count(db.sql, "jobs")) === 0);
  } finally {
    await gate.open();
    await consumer.stop();
  }
  assertEquals(ran, 40);
});

Deno.test("runConsumer() on a NOTIFY probes for jobs ranking ahead of its buffer, and claims only those", async () => {
  await using db = await testDb();
  let gates = 0;
  const quick = defineTask({ name: "t.quick", handler: () => {} });
  const gate = defineTask({
    name: "t.gate",
    async handler(_payload, ctx) {
      gates++;
      await aborted(ctx.signal);
    },
  });
  // Fast jobs set the pace, two jobs hold both slots until shutdown, and more fast jobs
  // wait in the buffer behind them (more than the slots' worth: a probe is worth it).
  await enqueueMany(db.sql, Array.from({ length: 400 }, () => ({ task: "t.quick" })));
  await enqueueMany(db.sql, [{ task: "t.gate" }, { task: "t.gate" }]);
  await enqueueMany(db.sql, Array.from({ length: 100 }, () => ({ task: "t.quick" })));
  const consumer = startConsumer(db.sql, [quick, gate], {
    concurrency: 2,
    prefetch: 50,
    listen: true,
    // Polls re-check the buffer: on a fast machine the gates can start within the pace's
    // first 100 ms window, when the buffer's target is still 0 and nothing else wakes the
    // loop. A poll never claims into a full buffer, so the urgent job can only come by probe.
    pollIntervalMs: 250,
  });
  const locked = async () => {
    const [row] = await db.sql<{ n: number }[]>`
      select count(*)::int as n from shoal.jobs where locked_by is not null`;
    return row!.n;
  };
  try {
    await waitFor("both slots to be held", () => gates === 2);
    await waitFor("the buffer to hold more than the slots", async () => (await locked()) > 4);
    await sleep(300); // the buffer settles: nothing frees a slot, so nothing claims
    const held = await locked();
    const urgent = await enqueue(db.sql, "t.quick", {}, { priority: 5 });
    await waitFor(
      "the urgent job to be claimed",
      async () =>
        (await db.sql`select 1 from shoal.jobs where id = ${urgent} and locked_by is not null`)
          .length > 0,
    );
    await sleep(200);
    // The probe is bounded by the last buffered job: none of the pending ones comes along.
    assertEquals(await locked(), held + 1);
  } finally {
    await consumer.stop();
  }
});

Deno.test("runConsumer() holds back buffered jobs behind an announced job ranking ahead until it is fetched", async () => {
  await using db = await testDb();
  const starts: { task: string; at: number }[] = [];
  const quick = defineTask({
    name: "t.quick",
    handler: () => void starts.push({ task: "t.quick", at: performance.now() }),
  });
  const urgentTask = defineTask({
    name: "t.urgent",
    handler: () => void starts.push({ task: "t.urgent", at: performance.now() }),
  });
  // Enough quick jobs to stay busy through five rounds: each round runs 2,000 and more
  // while the test polls (30,000 ran out in round 4 once claims got cheaper).
  await enqueueMany(db.sql, Array.from({ length: 100_000 }, () => ({ task: "t.quick" })));
  // When the announcement reaches a listener: the consumer hears it about then. Jobs that
  // started before it (a claim's batch returned just before the commit runs in a
  // millisecond) were out of reach; what starts after it, before the urgent job, was held
  // back or not.
  let heardAt = Infinity;
  const listener = await db.sql.listen("shoal_jobs", () => void (heardAt = performance.now()));
  const consumer = startConsumer(db.sql, [quick, urgentTask], {
    concurrency: 2,
    prefetch: 500,
    listen: true,
    pollIntervalMs: 250,
  });
  const afterHeard: number[] = [];
  const afterCommit: number[] = [];
  try {
    for (let round = 0; round < 5; round++) {
      // Busy, claiming hundreds at a time: the buffer holds a quarter second of its pace.
      const from = starts.length;
      await waitFor("the consumer to be busy", () => starts.length > from + 2_000);
      heardAt = Infinity;
      await enqueue(db.sql, "t.urgent", {}, { priority: 5 });
      const committedAt = performance.now();
      const urgentStart = () => starts.find((s, i) => i >= from && s.task === "t.urgent");
      await waitFor("the urgent job to start", () => urgentStart() !== undefined);
      const urgentAt = urgentStart()!.at;
      const quickBetween = (since: number) =>
        starts.filter((s) => s.task === "t.quick" && s.at > since && s.at < urgentAt).length;
      afterCommit.push(quickBetween(committedAt));
      afterHeard.push(quickBetween(heardAt + 1));
    }
  } finally {
    await consumer.stop();
    await listener.unlisten();
  }
  figure(
    `buffered jobs started before the urgent job, after its commit: ${afterCommit.join(", ")}; ` +
      `after its announcement: ${afterHeard.join(", ")}`,
  );
  // Once announced, it is fetched at once (by a probe, or by the loop's claim in flight)
  // and the buffered jobs behind it wait; a slot or two may take one meanwhile.
  assert(
    afterHeard.every((n) => n <= 4),
    `started after the announcement: ${afterHeard.join(", ")}`,
  );
});

Deno.test("parseWake() reads every payload of the wake protocol, and leaves out a part that does not parse", () => {
  assertEquals(parseWake("emails"), { queue: "emails" });
  assertEquals(parseWake("emails@1796614495480"), { queue: "emails", due: 1796614495480 });
  assertEquals(parseWake("emails#-5:-98"), {
    queue: "emails",
    rank: { priority: -5, fair_seq: "-98" },
  });
  assertEquals(parseWake("emails#5:12345678901234567"), {
    queue: "emails",
    rank: { priority: 5, fair_seq: "12345678901234567" },
  });
  assertEquals(parseWake("emails#x:1"), { queue: "emails" });
  assertEquals(parseWake("emails@soon"), { queue: "emails" });
});

Deno.test("runConsumer() shutdown with a claim in flight hands back what it brings, unstarted", async () => {
  await using db = await testDb();
  const started = new Set<string>();
  const quick = defineTask({
    name: "t.quick",
    handler: (_payload, ctx) => void started.add(ctx.job.id),
  });
  await enqueueMany(db.sql, Array.from({ length: 20 }, () => ({ task: "t.quick" })));
  await using gate = await gateJobUpdates(db.sql); // the first claim stays in flight
  const stop = new AbortController();
  let stopped = false;
  const done = runConsumer(
    { sql: db.sql, tasks: new TaskRegistry([quick]) },
    { ...FAST_CONSUMER, concurrency: 2, prefetch: 10 },
    stop.signal,
  ).then(() => void (stopped = true));
  const claimWaits = async () => {
    const [row] = await db.sql<{ n: number }[]>`
      select count(*)::int as n from pg_stat_activity
      where datname = current_database() and wait_event = 'advisory'`;
    return row!.n > 0;
  };
  await waitFor("the claim to wait at the gate", claimWaits);
  stop.abort();
  await sleep(300);
  assertEquals(stopped, false, "the shutdown waits for the claim in flight");
  await gate.open();
  await done;
  assertEquals([...started], [], "nothing starts once the stop signal came");
  const rows = await db.sql<{ locked: number; attempts: number; n: number }[]>`
    select count(*) filter (where locked_by is not null)::int as locked,
      max(attempts)::int as attempts, count(*)::int as n
    from shoal.jobs`;
  assertEquals(
    [...rows],
    [{ locked: 0, attempts: 0, n: 20 }],
    "all handed back, no attempt burned",
  );
});
