/**
 * `shoal status` (lib/status.ts) against real Postgres: per-queue ready, scheduled, running
 * and dead counts and the age of the oldest ready job, and flow control (paused queues,
 * concurrency and rate limits, holds, fairness weights).
 */
import { assert, assertEquals } from "./assert.ts";
import { enqueueLargeTable, registerTasks, runShoal, testDb, waitFor } from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import { claim, type ClaimOptions, enqueue, fail, type Job } from "../lib/queue.ts";
import {
  ESTIMATES_NOTE,
  formatStatus,
  PAUSED_MARK,
  type QueueStatus,
  queueStatus,
  status,
} from "../lib/status.ts";
import {
  flowStatus,
  holdKey,
  pauseQueue,
  setConcurrencyLimit,
  setFairnessWeight,
  setRateLimit,
} from "../lib/flow.ts";

function claimOptions(queue: string, limit: number, visibilityMs = 60_000): ClaimOptions {
  return { queues: [queue], limit, workerId: "test:1", visibilityMs };
}

async function claimAll(sql: Sql, queue: string, n: number, visibilityMs = 60_000) {
  const { jobs } = await claim(sql, claimOptions(queue, n, visibilityMs));
  assertEquals(jobs.length, n);
  return jobs;
}

function byId(jobs: Job[], id: string): Job {
  const job = jobs.find((j) => j.id === id);
  if (!job) throw new Error(`Job ${id} was not claimed`);
  return job;
}

/** The status rows with the age checked against bounds and then left out. */
function withoutAge(
  rows: QueueStatus[],
  ages: Record<string, [number, number]>,
): Omit<QueueStatus, "oldest_ready_age_s">[] {
  return rows.map(({ oldest_ready_age_s: age, ...rest }) => {
    const [min, max] = ages[rest.queue] ?? [0, 0];
    assert(
      age >= min && age <= max,
      `${rest.queue}: oldest_ready_age_s ${age} not in ${min}..${max}`,
    );
    return rest;
  });
}

Deno.test("queueStatus() of an empty database is []", async () => {
  await using db = await testDb();
  assertEquals(await queueStatus(db.sql), []);
});

Deno.test("queueStatus() counts ready, scheduled, running and dead jobs per queue", async () => {
  await using db = await testDb();
  // Queue a: one running, one waiting out a retry, one dead...
  const running = await enqueue(db.sql, "t", {}, { queue: "a" });
  const retrying = await enqueue(db.sql, "t", {}, { queue: "a" });
  const dying = await enqueue(db.sql, "t", {}, { queue: "a" });
  const claimed = await claimAll(db.sql, "a", 3);
  assertEquals(claimed.map((j) => j.id).sort(), [running, retrying, dying].sort());
  const retry = byId(claimed, retrying);
  const die = byId(claimed, dying);
  assertEquals(await fail(db.sql, retry, { error: "later", retryInMs: 600_000 }), "retried");
  assertEquals(
    await fail(db.sql, die, { error: "no", retryInMs: 0, permanent: true }),
    "dead",
  );
  // ...two ready (one of them due a minute ago) and one scheduled for later.
  const [{ past }] = await db.sql<[{ past: Date }]>`select now() - interval '60 s' as past`;
  await enqueue(db.sql, "t", {}, { queue: "a", runAt: past });
  await enqueue(db.sql, "t", {}, { queue: "a" });
  await enqueue(db.sql, "t", {}, { queue: "a", runAt: new Date(Date.now() + 3_600_000) });
  // Queue b has only dead jobs.
  for (let i = 0; i < 2; i++) {
    await enqueue(db.sql, "t", {}, { queue: "b" });
    const [job] = await claimAll(db.sql, "b", 1);
    assertEquals(
      await fail(db.sql, job!, { error: "x", retryInMs: 0, permanent: true }),
      "dead",
    );
  }
  // Queue c has only a scheduled job.
  await enqueue(db.sql, "t", {}, { queue: "c", runAt: new Date(Date.now() + 60_000) });

  const rows = await queueStatus(db.sql);
  assertEquals(withoutAge(rows, { a: [60, 90] }), [
    { queue: "a", ready: 2, scheduled: 2, running: 1, prefetched: 0, dead: 1, exact: true },
    { queue: "b", ready: 0, scheduled: 0, running: 0, prefetched: 0, dead: 2, exact: true },
    { queue: "c", ready: 0, scheduled: 1, running: 0, prefetched: 0, dead: 0, exact: true },
  ]);
});

Deno.test("queueStatus() counts a claim whose deadline passed as ready", async () => {
  await using db = await testDb();
  await enqueue(db.sql, "t", {}, { queue: "q" });
  await enqueue(db.sql, "t", {}, { queue: "q" });
  // Long enough that the first status cannot race the deadline on a busy box.
  const [short] = await claimAll(db.sql, "q", 1, 1_500);
  await claimAll(db.sql, "q", 1, 600_000);
  const before = await queueStatus(db.sql);
  assertEquals(withoutAge(before, {}), [
    { queue: "q", ready: 0, scheduled: 0, running: 2, prefetched: 0, dead: 0, exact: true },
  ]);
  await waitFor(
    "the short claim to expire",
    async () => {
      const [row] = await db.sql<{ due: boolean }[]>`
      select run_at <= now() as due from shoal.jobs where id = ${short!.id}::bigint`;
      return row!.due;
    },
    20_000,
    20,
  );
  const after = await queueStatus(db.sql);
  assertEquals(withoutAge(after, { q: [0, 20] }), [
    { queue: "q", ready: 1, scheduled: 0, running: 1, prefetched: 0, dead: 0, exact: true },
  ]);
});

Deno.test("status() lists ready jobs that no live consumer runs, by queue and task", async () => {
  await using db = await testDb();
  await enqueue(db.sql, "app.greet", {}, { queue: "app" });
  await enqueue(db.sql, "app.greet", {}, { queue: "app" });
  await enqueue(db.sql, "app.other", {}, { queue: "app" });
  await enqueue(db.sql, "mail.send", {}, { queue: "mail" });
  // Delayed and running jobs are not waiting on anyone yet.
  await enqueue(db.sql, "mail.later", {}, { queue: "mail", runAt: new Date(Date.now() + 3.6e6) });
  await enqueue(db.sql, "busy", {}, { queue: "busy" });
  await claimAll(db.sql, "busy", 1);

  // No consumer at all: every ready job waits.
  assertEquals((await status(db.sql)).unserved, [
    { queue: "app", task: "app.greet", ready: 2, exact: true },
    { queue: "app", task: "app.other", ready: 1, exact: true },
    { queue: "mail", task: "mail.send", ready: 1, exact: true },
  ]);
  // A consumer on app that knows app.greet only; one that knows mail.send but claims from
  // another queue; and one that would run app.other, but died (not seen for 5 minutes).
  await registerTasks(db.sql, ["app.greet"], { workerId: "a:1", queues: ["app"] });
  await registerTasks(db.sql, ["mail.send"], { workerId: "b:2", queues: ["other"] });
  await registerTasks(db.sql, ["app.other"], { workerId: "c:3", queues: ["app"] });
  await db.sql`update shoal.consumers set last_seen_at = now() - interval '5 minutes'
               where worker_id = 'c:3'`;
  const s = await status(db.sql);
  assertEquals(s.unserved, [
    { queue: "app", task: "app.other", ready: 1, exact: true },
    { queue: "mail", task: "mail.send", ready: 1, exact: true },
  ]);
  const text = formatStatus(s);
  assert(text.includes("Ready jobs no live consumer runs"), text);
  assert(/app\s+app\.other\s+1\n/.test(text), text);
  // The queue counts are those queueStatus() reports (the ages moved on meanwhile).
  const ageless = (rows: QueueStatus[]) => rows.map(({ oldest_ready_age_s: _, ...r }) => r);
  assertEquals(ageless(s.queues), ageless(await queueStatus(db.sql)));

  const json = await runShoal(["status", "--json"], { url: db.url });
  assertEquals(json.code, 0, json.stderr);
  assertEquals(JSON.parse(json.stdout).unserved, s.unserved);

  // Every ready job served: nothing listed, no section.
  await registerTasks(db.sql, ["app.other", "mail.send"], {
    workerId: "d:4",
    queues: ["app", "mail"],
  });
  const served = await status(db.sql);
  assertEquals(served.unserved, []);
  assert(!formatStatus(served).includes("no live consumer"));
});

Deno.test("shoal status estimates a table of over 10,000 jobs, says so, and counts every job with --exact", async () => {
  await using db = await testDb();
  await enqueueLargeTable(db.sql);

  const estimated = await runShoal(["status", "--json"], { url: db.url });
  assertEquals(estimated.code, 0, estimated.stderr);
  const { queues, unserved } = JSON.parse(estimated.stdout);
  const [bulk, tiny] = queues;
  // Every sampled bulk job is ready: the estimate is the rows Postgres counts, less tiny's.
  assertEquals([bulk.queue, bulk.ready, bulk.running, bulk.exact], ["bulk", 12_000, 0, false]);
  assertEquals([tiny.queue, tiny.ready, tiny.exact], ["tiny", 1, true]);
  assertEquals(unserved, [
    { queue: "bulk", task: "bulk.t", ready: 12_000, exact: false },
    { queue: "tiny", task: "tiny.t", ready: 1, exact: true },
  ]);

  const text = await runShoal(["status"], { url: db.url });
  assertEquals(text.code, 0, text.stderr);
  assert(/^bulk\s+~12000\s+~0\s+~0\s+~0\s+~0\s+~[\d.]+s$/m.test(text.stdout), text.stdout);
  assert(/^tiny\s+1\s+0\s+0\s+0\s+0\s+[\d.]+s$/m.test(text.stdout), text.stdout);
  assert(text.stdout.includes(ESTIMATES_NOTE), text.stdout);

  const exact = await runShoal(["status", "--json", "--exact"], { url: db.url });
  assertEquals(exact.code, 0, exact.stderr);
  const counted = JSON.parse(exact.stdout).queues;
  assertEquals(counted.map((q: QueueStatus) => [q.queue, q.ready, q.exact]), [
    ["bulk", 12_000, true],
    ["tiny", 1, true],
  ]);
  const exactText = await runShoal(["status", "--exact"], { url: db.url });
  assert(/^bulk\s+12000\s+0\s/m.test(exactText.stdout), exactText.stdout);
  assert(!exactText.stdout.includes(ESTIMATES_NOTE), exactText.stdout);
});

Deno.test("status() reports flow control: paused queues marked in the text; limits, holds and weights listed", async () => {
  await using db = await testDb();
  await enqueue(db.sql, "t", {}, { queue: "mail" });
  await enqueue(db.sql, "t", {}, { queue: "mail" });
  await enqueue(db.sql, "t", {}, { queue: "reports", fairnessKey: "acme" });
  await enqueue(db.sql, "t", {}, { queue: "reports", fairnessKey: "acme" });
  // Nothing paused or limited: no marker, no section.
  const plain = formatStatus(await status(db.sql));
  for (
    const heading of [PAUSED_MARK, "Concurrency limits", "Rate limits", "Held keys", "weights"]
  ) {
    assert(!plain.includes(heading), plain);
  }
  assertEquals((await status(db.sql)).flow, {
    paused: [],
    limits: [],
    rate_limits: [],
    holds: [],
    weights: [],
  });

  await pauseQueue(db.sql, "mail");
  await pauseQueue(db.sql, "audit"); // no jobs: no row in the queue table
  await setConcurrencyLimit(db.sql, { queue: "reports", maxRunning: 1 });
  await setConcurrencyLimit(db.sql, { queue: "reports", maxRunning: 4, key: "vip" });
  await claimAll(db.sql, "reports", 1); // one of acme's: the default's slot
  await setRateLimit(db.sql, { queue: "reports", maxStarts: 30, periodMs: 60_000 });
  await setRateLimit(db.sql, { queue: "api", maxStarts: 2, periodMs: 250, key: "partner" });
  const until = await holdKey(db.sql, { queue: "api", key: "partner", forMs: 60_000 });
  await setFairnessWeight(db.sql, { queue: "reports", key: "vip", weight: 5 });
  // A task's own limit: listed after the queue's, its task named.
  await setConcurrencyLimit(db.sql, { queue: "reports", maxRunning: 2, task: "export" });

  const s = await status(db.sql);
  assertEquals(s.flow, await flowStatus(db.sql));
  assertEquals(s.flow.paused.map((p) => p.queue), ["audit", "mail"]);
  assertEquals(s.flow.limits, [
    { queue: "reports", task: null, key: null, max_running: 1, slots_held: 1 },
    { queue: "reports", task: null, key: "vip", max_running: 4, slots_held: 0 },
    { queue: "reports", task: "export", key: null, max_running: 2, slots_held: 0 },
  ]);
  assertEquals(s.flow.rate_limits, [
    { queue: "api", task: null, key: "partner", max_starts: 2, period_ms: 250 },
    { queue: "reports", task: null, key: null, max_starts: 30, period_ms: 60_000 },
  ]);
  assertEquals(s.flow.holds, [{ queue: "api", task: null, key: "partner", held_until: until }]);
  assertEquals(s.flow.weights, [{ queue: "reports", key: "vip", weight: 5 }]);

  const json = await runShoal(["status", "--json"], { url: db.url });
  assertEquals(json.code, 0, json.stderr);
  const flow = JSON.parse(json.stdout).flow;
  assertEquals(Object.keys(flow), ["paused", "limits", "rate_limits", "holds", "weights"]);
  assertEquals(flow.limits, s.flow.limits);
  assertEquals(flow.rate_limits, s.flow.rate_limits);
  assertEquals(flow.holds, [
    { queue: "api", task: null, key: "partner", held_until: until.toISOString() },
  ]);
  assertEquals(flow.weights, s.flow.weights);
  assertEquals(
    flow.paused,
    s.flow.paused.map((p) => ({ queue: p.queue, paused_at: p.paused_at.toISOString() })),
  );

  const text = await runShoal(["status"], { url: db.url });
  assertEquals(text.code, 0, text.stderr);
  assert(/^mail \(paused\)\s+2\s+0\s+0\s+0\s+0\s/m.test(text.stdout), text.stdout);
  assert(/^reports\s+1\s+0\s+1\s+0\s+0\s/m.test(text.stdout), text.stdout);
  assert(text.stdout.includes("Paused, with no jobs: audit\n"), text.stdout);
  const section = text.stdout.split(
    "\nConcurrency limits (slots held: claimed jobs, prefetched ones included):\n",
  )[1];
  assert(section !== undefined, text.stdout);
  // Each kind of limit under its heading, after the queues and before the executions.
  assertEquals(
    section!.split("\n\n").slice(0, 4).map((part) =>
      part.split("\n").map((l) => l.trim().split(/\s{2,}/))
    ),
    [
      [
        ["queue", "task", "key", "max running", "slots held"],
        ["reports", "-", "(every key)", "1", "1"],
        ["reports", "-", "vip", "4", "0"],
        ["reports", "export", "(every key)", "2", "0"],
      ],
      [
        ["Rate limits (starts per period per key; a burst of up to max starts after a quiet spell):"],
        ["queue", "task", "key", "max starts", "per"],
        ["api", "-", "partner", "2", "250ms"],
        ["reports", "-", "(every key)", "30", "1m"],
      ],
      [
        ["Held keys (none of their jobs claimed until then):"],
        ["queue", "task", "key", "held until"],
        ["api", "-", "partner", until.toISOString()],
      ],
      [
        ["Fairness weights (jobs started per job of a weight-1 key under contention):"],
        ["queue", "key", "weight"],
        ["reports", "vip", "5"],
      ],
    ],
  );
  assertEquals(section!.split("\n\n")[4], "No executions", section);
});
