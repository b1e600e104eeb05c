/**
 * The dead-letter table (lib/dead.ts) against real Postgres: list, retry, purge, and the
 * fencing of a retried job against workers from its previous life.
 */
import { parseWake } from "../lib/consumer.ts";
import { assert, assertEquals } from "./assert.ts";
import { testDb, waitFor } from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import { listDead, purgeDead, retryDead } from "../lib/dead.ts";
import {
  ack,
  claim,
  type ClaimOptions,
  enqueue,
  type EnqueueOptions,
  fail,
  type Job,
  type JobRef,
} from "../lib/queue.ts";

function claimOptions(queue: string, visibilityMs = 60_000): ClaimOptions {
  return { queues: [queue], limit: 1, workerId: "test:1", visibilityMs };
}

function ref(job: Job): JobRef {
  return { id: job.id, token: job.token };
}

/** Claim the one ready job of `queue`, failing the test when there is none. */
async function claimOne(sql: Sql, queue: string, visibilityMs = 60_000): Promise<Job> {
  const { jobs, poisoned } = await claim(sql, claimOptions(queue, visibilityMs));
  assertEquals(poisoned, []);
  assertEquals(jobs.length, 1, `expected one job on ${queue}`);
  return jobs[0]!;
}

/** Enqueue a job on an otherwise idle queue, claim it and fail it permanently. */
async function bury(
  sql: Sql,
  task: string,
  payload: Record<string, unknown> = {},
  options: EnqueueOptions & { queue: string; error?: string },
): Promise<string> {
  const id = await enqueue(sql, task, payload, options);
  const job = await claimOne(sql, options.queue);
  assertEquals(job.id, id);
  const error = options.error ?? `${task} failed`;
  assertEquals(await fail(sql, ref(job), { error, retryInMs: 0, permanent: true }), "dead");
  return id;
}

async function deadIds(sql: Sql): Promise<string[]> {
  const rows = await sql<{ id: string }[]>`select id from shoal.dead_jobs order by id`;
  return rows.map((r) => r.id);
}

async function liveIds(sql: Sql): Promise<string[]> {
  const rows = await sql<{ id: string }[]>`select id from shoal.jobs order by id`;
  return rows.map((r) => r.id);
}

Deno.test("listDead() returns dead jobs newest first with their history", async () => {
  await using db = await testDb();
  const a1 = await bury(db.sql, "t1", { n: 1 }, {
    queue: "a",
    key: "k1",
    priority: 4,
    fairnessKey: "f",
    maxAttempts: 7,
    error: "broke",
  });
  const b1 = await bury(db.sql, "t2", {}, { queue: "b" });
  const a2 = await bury(db.sql, "t3", {}, { queue: "a" });
  const dead = await listDead(db.sql);
  assertEquals(dead.map((d) => d.id), [a2, b1, a1]);
  const oldest = dead[2]!;
  assertEquals(
    {
      ...oldest,
      created_at: undefined,
      died_at: undefined,
      errors: oldest.errors.map((e) => [e.attempt, e.error]),
    },
    {
      id: a1,
      queue: "a",
      task: "t1",
      payload: { n: 1 },
      priority: 4,
      fairness_key: "f",
      attempts: 1,
      max_attempts: 7,
      key: "k1",
      execution_id: null,
      errors: [[1, "broke"]],
      reason: "broke",
      created_at: undefined,
      died_at: undefined,
    },
  );
  assert(oldest.created_at instanceof Date && oldest.died_at instanceof Date);
  assert(oldest.died_at >= oldest.created_at);
  assert(dead[0]!.died_at > dead[1]!.died_at && dead[1]!.died_at > dead[2]!.died_at);
});

Deno.test("listDead() filters by queue and applies the limit", async () => {
  await using db = await testDb();
  const a1 = await bury(db.sql, "t", {}, { queue: "a" });
  const b1 = await bury(db.sql, "t", {}, { queue: "b" });
  const a2 = await bury(db.sql, "t", {}, { queue: "a" });
  const a3 = await bury(db.sql, "t", {}, { queue: "a" });
  assertEquals((await listDead(db.sql, { queue: "a" })).map((d) => d.id), [a3, a2, a1]);
  assertEquals((await listDead(db.sql, { queue: "b" })).map((d) => d.id), [b1]);
  assertEquals((await listDead(db.sql, { queue: "a", limit: 2 })).map((d) => d.id), [a3, a2]);
  assertEquals((await listDead(db.sql, { limit: 1 })).map((d) => d.id), [a3]);
  assertEquals((await listDead(db.sql, { queue: "none" })).map((d) => d.id), []);
});

Deno.test("retryDead() puts the job back on its queue with its id and a fresh budget", async () => {
  await using db = await testDb();
  const id = await enqueue(db.sql, "t", { p: 1 }, { queue: "q", maxAttempts: 2, key: "k" });
  for (const expected of ["retried", "dead"]) {
    const job = await claimOne(db.sql, "q");
    assertEquals(await fail(db.sql, ref(job), { error: expected, retryInMs: 0 }), expected);
  }
  const woken: string[] = [];
  const { unlisten } = await db.sql.listen(
    "shoal_jobs",
    (payload) => woken.push(parseWake(payload).queue),
  );
  try {
    assertEquals(await retryDead(db.sql, id), "retried");
    await waitFor("a NOTIFY for queue q", () => woken.includes("q"));
  } finally {
    await unlisten();
  }
  assertEquals(woken, ["q"]);
  assertEquals(await deadIds(db.sql), []);
  const [row] = await db.sql<
    {
      id: string;
      payload: unknown;
      attempts: number;
      max_attempts: number;
      key: string;
      locked_by: string | null;
      runnable: boolean;
      errors: { attempt: number; error: string }[];
    }[]
  >`select id, payload, attempts, max_attempts, key, locked_by, run_at <= now() as runnable,
      errors from shoal.jobs`;
  assertEquals(
    { ...row!, errors: row!.errors.map((e) => [e.attempt, e.error]) },
    {
      id,
      payload: { p: 1 },
      attempts: 0,
      max_attempts: 2,
      key: "k",
      locked_by: null,
      runnable: true,
      errors: [[1, "retried"], [2, "dead"]],
    },
  );
  // The fresh budget is the whole max_attempts again.
  const first = await claimOne(db.sql, "q");
  assertEquals([first.id, first.attempts], [id, 1]);
  assertEquals(await fail(db.sql, ref(first), { error: "again", retryInMs: 0 }), "retried");
  const second = await claimOne(db.sql, "q");
  assertEquals(second.attempts, 2);
  assertEquals(await fail(db.sql, ref(second), { error: "again", retryInMs: 0 }), "dead");
  assertEquals(await deadIds(db.sql), [id]);
});

Deno.test("retryDead() of an unknown or already retried id is not_found", async () => {
  await using db = await testDb();
  assertEquals(await retryDead(db.sql, "987654321"), "not_found");
  const id = await bury(db.sql, "t", {}, { queue: "q" });
  assertEquals(await retryDead(db.sql, id), "retried");
  assertEquals(await retryDead(db.sql, id), "not_found");
  assertEquals(await liveIds(db.sql), [id]);
});

Deno.test("retryDead() is a duplicate while a live job holds the dead job's key", async () => {
  await using db = await testDb();
  const deadId = await bury(db.sql, "t", { v: "old" }, { queue: "q", key: "k" });
  const liveId = await enqueue(db.sql, "t", { v: "new" }, { queue: "q", key: "k" });
  assertEquals(await retryDead(db.sql, deadId), "duplicate");
  assertEquals(await deadIds(db.sql), [deadId]);
  assertEquals(await liveIds(db.sql), [liveId]);
  // Once the live job is done the key is free and the retry goes through.
  const live = await claimOne(db.sql, "q");
  assertEquals(await ack(db.sql, [ref(live)]), [liveId]);
  assertEquals(await retryDead(db.sql, deadId), "retried");
  assertEquals(await liveIds(db.sql), [deadId]);
});

Deno.test("retryDead() of a poisoned job fences off the worker that crashed with it", async () => {
  await using db = await testDb();
  const id = await enqueue(db.sql, "t", {}, { queue: "q", maxAttempts: 1 });
  const crashed = await claimOne(db.sql, "q", 100);
  const poisoned = await waitFor(
    "the poisoned job to be dead-lettered",
    async () => {
      const result = await claim(db.sql, claimOptions("q"));
      assertEquals(result.jobs, []);
      return result.poisoned.length > 0 ? result.poisoned : null;
    },
    20_000,
    20,
  );
  assertEquals(poisoned.map((p) => p.id), [id]);
  assertEquals(await retryDead(db.sql, id), "retried");
  const owner = await claimOne(db.sql, "q");
  assertEquals([owner.id, owner.attempts], [id, 1]);
  assert(owner.token !== crashed.token, `token ${owner.token} reused`);
  // The crashed worker comes back to life and reports its old claim: nothing changes.
  assertEquals(await ack(db.sql, [ref(crashed)]), []);
  assertEquals(await fail(db.sql, ref(crashed), { error: "late", retryInMs: 0 }), "stale");
  assertEquals(await liveIds(db.sql), [id]);
  assertEquals(await ack(db.sql, [ref(owner)]), [id]);
});

Deno.test("retryDead() of a failed job fences off a worker whose claim had expired", async () => {
  await using db = await testDb();
  const id = await enqueue(db.sql, "t", {}, { queue: "q" });
  const slow = await claimOne(db.sql, "q", 100);
  const redelivered = await waitFor(
    "the job to be redelivered",
    async () => {
      const { jobs } = await claim(db.sql, claimOptions("q"));
      return jobs[0];
    },
    20_000,
    20,
  );
  assertEquals(redelivered.attempts, 2);
  assertEquals(
    await fail(db.sql, ref(redelivered), { error: "bad", retryInMs: 0, permanent: true }),
    "dead",
  );
  assertEquals(await retryDead(db.sql, id), "retried");
  const owner = await claimOne(db.sql, "q");
  assert(owner.token !== slow.token && owner.token !== redelivered.token, owner.token);
  assertEquals(await ack(db.sql, [ref(slow)]), []);
  assertEquals(await ack(db.sql, [ref(redelivered)]), []);
  assertEquals(await liveIds(db.sql), [id]);
});

Deno.test("purgeDead() with olderThanMs deletes only jobs that died before then", async () => {
  await using db = await testDb();
  const oldA = await bury(db.sql, "t", {}, { queue: "a" });
  const newA = await bury(db.sql, "t", {}, { queue: "a" });
  const oldB = await bury(db.sql, "t", {}, { queue: "b" });
  const newB = await bury(db.sql, "t", {}, { queue: "b" });
  await db.sql`
    update shoal.dead_jobs set died_at = now() - interval '2 hours'
    where id in (${oldA}::bigint, ${oldB}::bigint)`;
  assertEquals(await purgeDead(db.sql, { olderThanMs: 3 * 3_600_000 }), 0);
  assertEquals(await purgeDead(db.sql, { olderThanMs: 3_600_000 }), 2);
  assertEquals(await deadIds(db.sql), [newA, newB]);
  assertEquals(await purgeDead(db.sql, { olderThanMs: 3_600_000 }), 0);
  assertEquals(await purgeDead(db.sql), 2);
  assertEquals(await deadIds(db.sql), []);
});

Deno.test("purgeDead() with a queue deletes only that queue's dead jobs", async () => {
  await using db = await testDb();
  const oldA = await bury(db.sql, "t", {}, { queue: "a" });
  const newA = await bury(db.sql, "t", {}, { queue: "a" });
  const oldB = await bury(db.sql, "t", {}, { queue: "b" });
  await db.sql`
    update shoal.dead_jobs set died_at = now() - interval '2 hours'
    where id in (${oldA}::bigint, ${oldB}::bigint)`;
  assertEquals(await purgeDead(db.sql, { queue: "a", olderThanMs: 3_600_000 }), 1);
  assertEquals(await deadIds(db.sql), [newA, oldB]);
  assertEquals(await purgeDead(db.sql, { queue: "a" }), 1);
  assertEquals(await deadIds(db.sql), [oldB]);
  assertEquals(await purgeDead(db.sql, { queue: "c" }), 0);
  assertEquals(await deadIds(db.sql), [oldB]);
});
