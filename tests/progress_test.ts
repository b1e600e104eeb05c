/**
 * ctx.progress (lib/progress.ts): kept in memory by the run and written by the consumer's
 * heartbeat, one statement per beat for every job that reported, fenced by the token, and shown
 * by status(). A real consumer (runConsumer) against a real Postgres; the writes are counted by
 * a trigger, so "not once per call" is counted inside the database.
 */
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { startConsumer, testDb, waitFor } from "./helpers.ts";
import { claim, enqueue, saveProgress, suspendClaim } from "../lib/queue.ts";
import { defineTask } from "../lib/tasks.ts";
import { checkProgress } from "../lib/progress.ts";
import { status } from "../lib/status.ts";

Deno.test("ctx.progress() called 1,000 times is written once, by the next heartbeat, and status() shows the last report", async () => {
  await using db = await testDb();
  await db
    .sql`create table test_progress_writes (at timestamptz not null default clock_timestamp())`;
  await db.sql`
    create function test_count_progress() returns trigger language plpgsql as $$
    begin
      insert into test_progress_writes default values;
      return null;
    end $$`;
  await db.sql`
    create trigger test_count_progress after update of progress on shoal.jobs
    for each row when (old.progress is distinct from new.progress)
    execute function test_count_progress()`;
  let finish: () => void;
  const finished = new Promise<void>((resolve) => (finish = resolve));
  const task = defineTask({
    name: "t.progress",
    async handler(_p, ctx) {
      for (let i = 1; i <= 1000; i++) ctx.progress(i, 1000, `item ${i}`);
      await finished;
    },
  });
  const consumer = startConsumer(db.sql, [task]);
  try {
    await enqueue(db.sql, "t.progress", {});
    const [shown] = await waitFor("the progress in status()", async () => {
      const { progress } = await status(db.sql);
      return progress.length === 1 ? progress : null;
    });
    assertEquals([shown!.task, shown!.done, shown!.total, shown!.message], [
      "t.progress",
      1000,
      1000,
      "item 1000",
    ]);
    assert(shown!.at instanceof Date);
    const [writes] = await db.sql<{ n: number }[]>`
      select count(*)::int as n from test_progress_writes`;
    assertEquals(writes!.n, 1, "one write for 1,000 reports between two heartbeats");
  } finally {
    finish!();
    await consumer.stop();
  }
});

Deno.test("saveProgress() writes nothing for a claim that moved on; checkProgress() refuses bad numbers", async () => {
  await using db = await testDb();
  await enqueue(db.sql, "t.any", {});
  const { jobs } = await claim(db.sql, {
    queues: ["default"],
    limit: 1,
    workerId: "w",
    visibilityMs: 60_000,
  });
  const job = jobs[0]!;
  const progress = checkProgress(1, 2, "x".repeat(500));
  assertEquals(progress.message!.length, 200);
  const stale = { id: job.id, token: String(BigInt(job.token) + 1n), progress };
  assertEquals(await saveProgress(db.sql, [stale]), 0);
  assertEquals(await saveProgress(db.sql, [{ id: job.id, token: job.token, progress }]), 1);
  // Refused at the call (a throw, checked through a promise).
  await assertRejects(
    () => Promise.resolve().then(() => checkProgress(-1, 10, undefined)),
    TypeError,
    "Invalid done for ctx.progress(): expected a finite number of at least 0, got -1",
  );
  await assertRejects(
    () => Promise.resolve().then(() => checkProgress(1, Infinity, undefined)),
    TypeError,
    "Invalid total",
  );
  await assertRejects(
    () => Promise.resolve().then(() => checkProgress(1, 2, 5)),
    TypeError,
    "Invalid message",
  );
});

Deno.test("a durable sleep hands its job back with no progress report: parked jobs are not read by a scrape", async () => {
  await using db = await testDb();
  await enqueue(db.sql, "t.any", {});
  const { jobs } = await claim(db.sql, {
    queues: ["default"],
    limit: 1,
    workerId: "w",
    visibilityMs: 60_000,
  });
  const job = jobs[0]!;
  assertEquals(await saveProgress(db.sql, [{ ...job, progress: checkProgress(1, 2, "half") }]), 1);
  const [wake] = await db.sql<{ at: string }[]>`select (now() + interval '1 day')::text as at`;
  assert(await suspendClaim(db.sql, job, wake!.at) !== null);
  const [row] = await db.sql<{ progress: unknown }[]>`
    select progress from shoal.jobs where id = ${job.id}::bigint`;
  assertEquals(row!.progress, null);
});
