/**
 * The consumer's two statements on its own jobs, called directly against a real database:
 * claimOnce() (the loop's claim and a probe's) and heartbeatOnce() (one statement that
 * extends running, buffered and unsent jobs, and says which claims are gone).
 */
import { assert, assertEquals } from "./assert.ts";
import { testDb } from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import { claimOnce, heartbeatOnce } from "../lib/consumer.ts";
import { claim, enqueue, type Job } from "../lib/queue.ts";
import { cancelExecution, startExecution } from "../lib/execution.ts";

const SETTINGS = { queues: ["default"], workerId: "w", visibilityMs: 60_000 };

async function deadline(sql: Sql, id: string): Promise<Date> {
  const [row] = await sql<{ run_at: Date }[]>`select run_at from shoal.jobs where id = ${id}`;
  return row!.run_at;
}

Deno.test("claimOnce() claims at most its limit, and with a bound only jobs ranking no later", async () => {
  await using db = await testDb();
  const low1 = await enqueue(db.sql, "t");
  await enqueue(db.sql, "t");
  const high = await enqueue(db.sql, "t", {}, { priority: 5 });
  const bounded = await claimOnce(db.sql, {
    ...SETTINGS,
    limit: 10,
    before: { priority: 1, fair_seq: "0" },
  });
  assertEquals(bounded.jobs.map((j) => j.id), [high], "only the job ranking ahead of the bound");
  const next = await claimOnce(db.sql, { ...SETTINGS, limit: 1 });
  assertEquals(next.jobs.map((j) => j.id), [low1]);
  assertEquals(next.jobs[0]!.attempts, 1);
  assertEquals(next.poisoned, []);
});

Deno.test("claimOnce() dead-letters a job claimed past its attempts instead of returning it", async () => {
  await using db = await testDb();
  const id = await enqueue(db.sql, "t.crashes", {}, { maxAttempts: 1 });
  await claimOnce(db.sql, { ...SETTINGS, limit: 1 });
  // Its consumer died: the deadline passes without an ack.
  await db.sql`update shoal.jobs set run_at = now() - interval '1 second' where id = ${id}`;
  const again = await claimOnce(db.sql, { ...SETTINGS, limit: 1 });
  assertEquals(again.jobs, []);
  assertEquals(again.poisoned.map((p) => [p.id, p.task]), [[id, "t.crashes"]]);
  const dead = await db.sql`select id from shoal.dead_jobs where id = ${id}`;
  assertEquals(dead.length, 1);
});

Deno.test("heartbeatOnce() extends running, buffered and unsent jobs in one go, and returns the lost", async () => {
  await using db = await testDb();
  for (let i = 0; i < 5; i++) await enqueue(db.sql, "t");
  const { jobs } = await claim(db.sql, { ...SETTINGS, limit: 5, visibilityMs: 1000 });
  const [running, movedOn, buffered, bufferedMovedOn, unsent] = jobs as [
    Job,
    Job,
    Job,
    Job,
    Job,
  ];
  // Redelivered elsewhere: the token moved on.
  await db.sql`update shoal.jobs set token = token + 1
    where id in ${db.sql([movedOn.id, bufferedMovedOn.id])}`;
  const before = await deadline(db.sql, running.id);
  const runs = [{ job: running }, { job: movedOn }];
  const lost = await heartbeatOnce(db.sql, {
    running: runs,
    buffered: [buffered, bufferedMovedOn],
    unsent: [{ id: unsent.id, token: unsent.token }],
  }, 600_000);
  assertEquals(lost.running, [runs[1]], "the run itself, for the consumer to abort");
  assertEquals(lost.buffered, [bufferedMovedOn]);
  for (const job of [running, buffered, unsent]) {
    const extended = await deadline(db.sql, job.id);
    assert(extended.getTime() - before.getTime() > 500_000, `job ${job.id} extended`);
  }
  const untouched = await deadline(db.sql, movedOn.id);
  assert(untouched.getTime() - before.getTime() < 10_000, "a lost claim is not extended");
});

Deno.test("heartbeatOnce() reports a running job of a cancelled execution lost", async () => {
  await using db = await testDb();
  const execution = await startExecution(db.sql, { task: "t" });
  const { jobs } = await claim(db.sql, { ...SETTINGS, limit: 1 });
  await cancelExecution(db.sql, execution);
  const runs = [{ job: jobs[0]! }];
  const lost = await heartbeatOnce(db.sql, { running: runs, buffered: [], unsent: [] }, 60_000);
  assertEquals(lost.running, runs);
});
