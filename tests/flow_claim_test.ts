/**
 * Flow control in the claim (sql/functions/claim.sql "Flow control", sql/functions/flow.sql):
 * paused queues are not claimed; a key's claimed jobs never exceed its concurrency limit;
 * a held-back job is not failed and takes a slot the moment one frees. Real Postgres.
 */
import { assert, assertEquals } from "./assert.ts";
import { testDb } from "./helpers.ts";
import { EMBEDDED_FUNCTIONS } from "../lib/migrate.ts";
import type { Sql } from "../lib/db.ts";
import {
  ack,
  claim,
  type ClaimOptions,
  enqueueMany,
  fail,
  type Job,
  release,
} from "../lib/queue.ts";

const Q = "flow";

function options(limit: number, extra: Partial<ClaimOptions> = {}): ClaimOptions {
  return { queues: [Q], limit, workerId: "test:1", visibilityMs: 60_000, ...extra };
}

async function claimJobs(sql: Sql, limit: number, extra: Partial<ClaimOptions> = {}) {
  const { jobs, poisoned } = await claim(sql, options(limit, extra));
  assertEquals(poisoned, []);
  return jobs;
}

async function enqueueKeys(sql: Sql, counts: Record<string, number>, priority = 0) {
  const specs = Object.entries(counts).flatMap(([key, n]) =>
    Array.from({ length: n }, (_, i) => ({
      task: "t",
      queue: Q,
      fairnessKey: key,
      priority,
      payload: { i },
    }))
  );
  await enqueueMany(sql, specs);
}

function byKey(jobs: Job[]): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const job of jobs) counts[job.fairness_key] = (counts[job.fairness_key] ?? 0) + 1;
  return counts;
}

Deno.test("a paused queue is not claimed; resumed, it is", async () => {
  await using db = await testDb();
  await enqueueKeys(db.sql, { a: 3 });
  assertEquals((await db.sql`select shoal.pause_queue(${Q}) as p`)[0]!.p, true);
  assertEquals((await db.sql`select shoal.pause_queue(${Q}) as p`)[0]!.p, false);
  assertEquals(await claimJobs(db.sql, 10), []);
  assertEquals(await claimJobs(db.sql, 10, { fromHead: false }), []);
  assertEquals((await db.sql`select shoal.resume_queue(${Q}) as r`)[0]!.r, true);
  assertEquals((await claimJobs(db.sql, 10)).length, 3);
});

Deno.test("a queue's default limit caps each key's claimed jobs; a key's own overrides it", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 2)`;
  await db.sql`select shoal.set_concurrency_limit(${Q}, 3, 'b')`;
  await enqueueKeys(db.sql, { a: 10, b: 10, c: 10 });
  const first = await claimJobs(db.sql, 100);
  assertEquals(byKey(first), { a: 2, b: 3, c: 2 });
  // Full: nothing more, and nothing was failed or burned.
  assertEquals(await claimJobs(db.sql, 100), []);
  const [row] = await db.sql<{ attempts: number }[]>`
    select max(attempts)::integer as attempts from shoal.jobs where locked_by is null`;
  assertEquals(row!.attempts, 0);
  // One ack frees one slot of its key.
  await ack(db.sql, [first.find((j) => j.fairness_key === "a")!]);
  assertEquals(byKey(await claimJobs(db.sql, 100)), { a: 1 });
});

Deno.test("a retry, a hand-back and an expired deadline give the slot back", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 1)`;
  await enqueueKeys(db.sql, { a: 5 });
  const [one] = await claimJobs(db.sql, 10);
  assertEquals(await claimJobs(db.sql, 10), []);
  assertEquals(await fail(db.sql, one!, { error: "boom", retryInMs: 60_000 }), "retried");
  const [two] = await claimJobs(db.sql, 10);
  assert(two && two.id !== one!.id, "the retry waiting out its backoff holds no slot");
  await release(db.sql, [two!]);
  const [three] = await claimJobs(db.sql, 10, { visibilityMs: 0 });
  assert(three, "the hand-back freed the slot");
  // visibilityMs 0: its deadline has passed, so it holds no slot (and is claimable again).
  assertEquals((await claimJobs(db.sql, 10)).length, 1);
});

Deno.test("a full key does not hold back other keys, even a long backlog ahead of them", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 1, 'big')`;
  await enqueueKeys(db.sql, { big: 5000 }, 5);
  await enqueueKeys(db.sql, { small: 10 }, 0);
  assertEquals(byKey(await claimJobs(db.sql, 5)), { big: 1, small: 4 });
  assertEquals(byKey(await claimJobs(db.sql, 20)), { small: 6 });
  assertEquals(await claimJobs(db.sql, 20), []);
});

/**
 * `rounds` rounds of 8 claims of 4 at once over keys a and b, checking after each that
 * neither runs more than `limit`; then every `ackEvery`-th claimed job is acked.
 */
async function raceRounds(sql: Sql, rounds: number, limit: number, ackEvery: number) {
  for (let round = 0; round < rounds; round++) {
    const batches = await Promise.all(
      Array.from({ length: 8 }, (_, i) => claimJobs(sql, 4, { workerId: `w${i}` })),
    );
    const claimed = batches.flat();
    const [{ a, b }] = await sql<[{ a: number; b: number }]>`
      select count(*) filter (where fairness_key = 'a')::integer as a,
             count(*) filter (where fairness_key = 'b')::integer as b
      from shoal.jobs where locked_by is not null and run_at > now()`;
    assert(a <= limit && b <= limit, `round ${round}: ${a} and ${b} running`);
    await ack(sql, claimed.filter((_, i) => i % ackEvery === 0));
  }
}

Deno.test("concurrent claims never exceed a key's limit", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 3)`;
  await enqueueKeys(db.sql, { a: 200, b: 200 });
  await raceRounds(db.sql, 20, 3, 2);
});

Deno.test("concurrent claims near a high limit never exceed it, whether they count the slots or only raise the bound", async () => {
  await using db = await testDb();
  // Claims of 4 read no more than the bound while it is 22 or less (two batches below 30),
  // and count from there on: 8 claimers at once cross from one way to the other.
  await db.sql`select shoal.set_concurrency_limit(${Q}, 30)`;
  await enqueueKeys(db.sql, { a: 400, b: 400 });
  await raceRounds(db.sql, 12, 30, 3);
  // Claims one at a time fill every slot left (a key another claim held counted as full
  // for the claims above), and no more.
  while ((await claimJobs(db.sql, 4)).length > 0);
  const [row] = await db.sql<[{ n: number }]>`
    select count(*)::integer as n from shoal.jobs where locked_by is not null`;
  assertEquals(row.n, 60);
});

/** Key a's bound, the bound at its last count, and how many slot rows there are. */
async function boundOfA(sql: Sql) {
  const [row] = await sql<[{ bound: number | null; counted: number; rows: number }]>`
    select k.slots_bound as bound, k.slots_counted as counted,
           (select count(*)::integer from shoal.concurrency_slots) as rows
    from shoal.flow_keys k where k.queue = ${Q} and k.key = 'a'`;
  return row;
}

Deno.test("a limit that cannot bind costs one slot row per claim and key and a raised bound; a count removes emptied rows", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 100)`;
  await enqueueKeys(db.sql, { a: 60 });
  const bound = () => boundOfA(db.sql);
  // The first claim of the key counts (its bound was unknown); the next ones raise it.
  const first = await claimJobs(db.sql, 10);
  assertEquals(first.length, 10);
  assertEquals(await bound(), { bound: 10, counted: 0, rows: 1 });
  await ack(db.sql, first);
  for (let i = 0; i < 3; i++) await ack(db.sql, await claimJobs(db.sql, 10));
  // Acks write nothing: 40 entries bound, 4 rows, none holding a slot.
  assertEquals(await bound(), { bound: 40, counted: 0, rows: 4 });
  // At 90 (room for less than two batches of 10 under 100) the next claim counts: the rows
  // whose jobs all ended go, and the bound is what is left.
  await db.sql`update shoal.flow_keys set slots_bound = 90 where queue = ${Q} and key = 'a'`;
  const counted = await claimJobs(db.sql, 10);
  assertEquals(counted.length, 10);
  assertEquals(await bound(), { bound: 10, counted: 0, rows: 1 });
  // A limit set again makes the bound unknown (its backfill adds no entry twice).
  await db.sql`select shoal.set_concurrency_limit(${Q}, 100)`;
  assertEquals((await bound())!.bound, null);
  assertEquals(await bound().then((b) => b!.rows), 1);
  assertEquals((await claimJobs(db.sql, 10)).length, 10);
  assertEquals(await bound(), { bound: 20, counted: 10, rows: 2 });
});

Deno.test("a queue's rules row follows every change of its limits, and a claim honours the change at once", async () => {
  await using db = await testDb();
  const rules = async () =>
    (await db.sql<{ simple_max: number | null }[]>`
      select simple_max from shoal.flow_rules where queue = ${Q}`).map((r) => r.simple_max);
  assertEquals(await rules(), []);
  await db.sql`select shoal.set_concurrency_limit(${Q}, 100)`;
  assertEquals(await rules(), [100]);
  await enqueueKeys(db.sql, { a: 40 });
  // The first claim counts the key; the second takes the short check (simple rules).
  assertEquals((await claimJobs(db.sql, 10)).length, 10);
  assertEquals((await claimJobs(db.sql, 10)).length, 10);
  // A key's own limit below what runs: the rules are no longer simple, and the next claim
  // takes none of the key's jobs.
  await db.sql`select shoal.set_concurrency_limit(${Q}, 15, 'a')`;
  assertEquals(await rules(), [null]);
  assertEquals(await claimJobs(db.sql, 10), []);
  await db.sql`select shoal.clear_concurrency_limit(${Q}, 'a')`;
  assertEquals(await rules(), [100]);
  await db.sql`select shoal.set_rate_limit(${Q}, 5, 60000)`;
  assertEquals(await rules(), [null]);
  await db.sql`select shoal.clear_rate_limit(${Q})`;
  assertEquals(await rules(), [100]);
  await db.sql`select shoal.set_concurrency_limit(${Q}, 1, null, 'other')`;
  assertEquals(await rules(), [null]);
  await db.sql`select shoal.clear_concurrency_limit(${Q}, null, 'other')`;
  assertEquals(await rules(), [100]);
  await db.sql`select shoal.set_concurrency_limit(${Q}, 25)`;
  assertEquals(await rules(), [25]);
  assertEquals((await claimJobs(db.sql, 10)).length, 5);
  await db.sql`select shoal.clear_concurrency_limit(${Q})`;
  assertEquals(await rules(), []);
  // A rate limit alone is not simple either.
  await db.sql`select shoal.set_rate_limit(${Q}, 5, 60000)`;
  assertEquals(await rules(), [null]);
});

Deno.test("a key met for the first time is counted by the short check; one whose slot rows outlived its flow_keys row takes the long way", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 100)`;
  await enqueueKeys(db.sql, { a: 40 });
  assertEquals((await claimJobs(db.sql, 10)).length, 10);
  assertEquals(await boundOfA(db.sql), { bound: 10, counted: 0, rows: 1 });
  // Its row forgotten while its 10 jobs still run: the next claim must count their slots.
  await db.sql`delete from shoal.flow_keys where queue = ${Q} and key = 'a'`;
  assertEquals((await claimJobs(db.sql, 10)).length, 10);
  assertEquals(await boundOfA(db.sql), { bound: 20, counted: 10, rows: 2 });
  // A first claim that could reach the limit takes only what fits (the long way counts).
  await db.sql`select shoal.set_concurrency_limit(${Q}, 15)`;
  await enqueueKeys(db.sql, { b: 30 });
  const b = () => claimJobs(db.sql, 10).then((jobs) => byKey(jobs).b ?? 0);
  assertEquals(await b(), 10);
  assertEquals(await b(), 5);
  assertEquals(await b(), 0);
});

Deno.test("a limited queue with no rules row (written by no function yet) takes the full check and keeps its limit", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 25)`;
  await db.sql`delete from shoal.flow_rules where queue = ${Q}`;
  await enqueueKeys(db.sql, { a: 40 });
  let claimed = 0;
  for (let i = 0; i < 5; i++) claimed += (await claimJobs(db.sql, 10)).length;
  assertEquals(claimed, 25);
  // Applying the function files writes the row again.
  await db.sql.unsafe(EMBEDDED_FUNCTIONS["flow.sql"]!);
  assertEquals(
    (await db.sql`select simple_max from shoal.flow_rules where queue = ${Q}`)[0]?.simple_max,
    25,
  );
});

Deno.test("a rate limit caps each key's claims per period, and refills", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_rate_limit(${Q}, 5, 1000)`;
  await enqueueKeys(db.sql, { a: 50, b: 50 });
  // The buckets empty inside the first claim, somewhere after this clock. From then on they
  // refill 5 tokens a second: a whole one every 200 ms. Every bound below counts from here,
  // the earliest they can have emptied, so a slow claim on a loaded machine cannot make a
  // refill look like too many.
  const beforeEmptied = Date.now();
  const refillSince = () => Math.min(5, Math.floor((5 * (Date.now() - beforeEmptied)) / 1000));
  assertEquals(byKey(await claimJobs(db.sql, 100)), { a: 5, b: 5 });
  // Right after: only what refilled meanwhile (none, unless that claim took 200 ms).
  const soon = byKey(await claimJobs(db.sql, 100));
  const soonMost = refillSince();
  await new Promise((resolve) => setTimeout(resolve, 450));
  // 450 ms after the bucket last emptied: at least 2 whole tokens.
  const refilled = byKey(await claimJobs(db.sql, 100));
  const most = refillSince();
  for (const key of ["a", "b"]) {
    assert((soon[key] ?? 0) <= soonMost, `key ${key}: ${soon[key]} right after, most ${soonMost}`);
    assert(refilled[key]! >= 2, `key ${key}: ${refilled[key]} refilled`);
    assert(
      (soon[key] ?? 0) + refilled[key]! <= most,
      `key ${key}: ${soon[key]} + ${refilled[key]}`,
    );
  }
});

Deno.test("a failure told to hold its key holds every job of the key", async () => {
  await using db = await testDb();
  await enqueueKeys(db.sql, { a: 3, b: 1 });
  const [first] = await claimJobs(db.sql, 1);
  assertEquals(first!.fairness_key, "a");
  assertEquals(
    await fail(db.sql, first!, { error: "429", retryInMs: 0, holdKeyMs: 500 }),
    "retried",
  );
  assertEquals(byKey(await claimJobs(db.sql, 100)), { b: 1 });
  await new Promise((resolve) => setTimeout(resolve, 550));
  assertEquals(byKey(await claimJobs(db.sql, 100)), { a: 3 });
});

Deno.test("a held key is not claimed until its hold ends; other keys go on", async () => {
  await using db = await testDb();
  await enqueueKeys(db.sql, { a: 3, b: 3 });
  await db.sql`select shoal.hold_key(${Q}, 'a', 400)`;
  assertEquals(byKey(await claimJobs(db.sql, 100)), { b: 3 });
  await new Promise((resolve) => setTimeout(resolve, 450));
  assertEquals(byKey(await claimJobs(db.sql, 100)), { a: 3 });
});

Deno.test("keys weighted 1:2:4 start jobs 1:2:4 under contention", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_fairness_weight(${Q}, 'two', 2)`;
  await db.sql`select shoal.set_fairness_weight(${Q}, 'four', 4)`;
  // All in one call, so that no key starts with a quiet key's burst ahead of the others;
  // then some one at a time: a weighted key's next job shares its last stamp until it is
  // full.
  await enqueueKeys(db.sql, { one: 300, two: 600, four: 1150 });
  for (let i = 0; i < 50; i++) await enqueueKeys(db.sql, { four: 1, one: 1 });
  const counts: Record<string, number> = {};
  for (let i = 0; i < 7; i++) {
    for (const [key, n] of Object.entries(byKey(await claimJobs(db.sql, 100)))) {
      counts[key] = (counts[key] ?? 0) + n;
    }
  }
  // 700 claimed: 100, 200 and 400, give or take one stamp's jobs.
  assert(Math.abs(counts.one! - 100) <= 2, JSON.stringify(counts));
  assert(Math.abs(counts.two! - 200) <= 4, JSON.stringify(counts));
  assert(Math.abs(counts.four! - 400) <= 8, JSON.stringify(counts));
});

Deno.test("a concurrency key given at enqueue is the key limits count, across fairness keys", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 2, 'partner-api')`;
  await enqueueMany(db.sql, [
    ...Array.from({ length: 5 }, () => ({
      task: "t",
      queue: Q,
      fairnessKey: "tenant-1",
      concurrencyKey: "partner-api",
    })),
    ...Array.from({ length: 5 }, () => ({
      task: "t",
      queue: Q,
      fairnessKey: "tenant-2",
      concurrencyKey: "partner-api",
    })),
    { task: "t", queue: Q, fairnessKey: "tenant-1" },
  ]);
  await db.sql`select shoal.enqueue(${Q}, 't', '{}', concurrency_key => 'partner-api')`;
  const jobs = await claimJobs(db.sql, 100);
  // Two of the eleven partner-api jobs (from either tenant), and the unkeyed one.
  assertEquals(jobs.length, 3);
  const [row] = await db.sql<{ n: number }[]>`
    select count(*)::integer as n from shoal.jobs
    where concurrency_key = 'partner-api' and locked_by is not null`;
  assertEquals(row!.n, 2);
});

Deno.test("fan-out children and callbacks carry their parent's flow keys and respect its limit", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 2)`;
  await enqueueMany(db.sql, [{ task: "parent", queue: Q, fairnessKey: "a", concurrencyKey: "x" }]);
  const [parent] = await claimJobs(db.sql, 1);
  const spec = JSON.stringify({
    children: Array.from({ length: 6 }, () => ({ task: "child", queue: Q })),
    callback: { task: "done", queue: Q },
  });
  await db.sql`select shoal.fan_out(${parent!.id}::bigint, ${parent!.token}::bigint,
                                    ${spec}::text::jsonb)`;
  const children = await claimJobs(db.sql, 100);
  assertEquals(children.length, 2);
  assertEquals(children.map((j) => j.fairness_key), ["a", "a"]);
  const [row] = await db.sql<{ keys: string[] }[]>`
    select array_agg(distinct concurrency_key) as keys from shoal.jobs`;
  assertEquals(row!.keys, ["x"]);
});

Deno.test("a limit set while jobs run counts them at once", async () => {
  await using db = await testDb();
  await enqueueKeys(db.sql, { a: 6 });
  assertEquals((await claimJobs(db.sql, 3)).length, 3);
  await db.sql`select shoal.set_concurrency_limit(${Q}, 4)`;
  assertEquals((await claimJobs(db.sql, 10)).length, 1);
});

Deno.test("keys enqueued one after another, each a run in the claim order, all get their slots", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 2)`;
  // Each key's 100 jobs are stamped ahead of the previous key's (a quiet key's burst): the
  // claim order is one key's run after another's.
  for (let k = 0; k < 20; k++) await enqueueKeys(db.sql, { [`k${k}`]: 100 });
  const first = byKey(await claimJobs(db.sql, 100));
  assertEquals(Object.keys(first).length, 20, JSON.stringify(first));
  assert(Object.values(first).every((n) => n === 2), JSON.stringify(first));
  // Full now: one ack frees one slot, and the next claim finds it behind the other runs.
  const [row] = await db.sql<{ id: string; token: string }[]>`
    select id::text, token::text from shoal.jobs where fairness_key = 'k0' and locked_by is not null
    limit 1`;
  await ack(db.sql, [row!]);
  assertEquals(byKey(await claimJobs(db.sql, 100)), { k0: 1 });
});

Deno.test("a limited key's jobs go only into slots that start them, unless the key has room to spare", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 3)`;
  await db.sql`select shoal.set_concurrency_limit(${Q}, 1000, 'roomy')`;
  await enqueueKeys(db.sql, { a: 5, b: 5, roomy: 30 });
  // Two slots start at once: of the keys near their limit, two jobs; the roomy key's fill
  // the rest of the batch (they may wait in a prefetch buffer without starving the key).
  const jobs = await claimJobs(db.sql, 20, { starting: 2 });
  const counts = byKey(jobs);
  assertEquals((counts.a ?? 0) + (counts.b ?? 0), 2, JSON.stringify(counts));
  assertEquals(counts.roomy, 18, JSON.stringify(counts));
});

Deno.test("a claim in flight holds its keys: a second claim cannot take their slots meanwhile", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 2)`;
  await enqueueKeys(db.sql, { a: 2 });
  await db.sql.begin(async (tx) => {
    // The first claim takes both of key a's slots and has not committed yet.
    assertEquals(byKey(await claimJobs(tx as unknown as Sql, 10)), { a: 2 });
    // A job of key a that ranks first commits meanwhile: the second claim sees it, and
    // sees no slot taken (the first claim's are not committed). Only the key's lock, held
    // by the first claim to its commit, keeps it from running a third job of key a.
    await enqueueKeys(db.sql, { a: 1 }, 5);
    assertEquals(await claimJobs(db.sql, 10), []);
  });
  // Committed: the slots are full, and stay so.
  assertEquals(await claimJobs(db.sql, 10), []);
  const [row] = await db.sql<{ n: number }[]>`
    select count(*)::integer as n from shoal.jobs where locked_by is not null`;
  assertEquals(row!.n, 2);
});

Deno.test("shoal.free_slots(ids), the call of revision-5 binaries in a rolling deploy, wakes every queue with keys waiting", async () => {
  await using db = await testDb();
  const call = async () =>
    (await db.sql<[{ n: number }]>`select shoal.free_slots(array[1, 2]::bigint[]) as n`)[0].n;
  assertEquals(await call(), 0);
  await db.sql`insert into shoal.flow_keys (queue, key, waiting)
               values (${Q}, 'a', true), (${Q}, 'b', true), ('other', 'a', false)`;
  assertEquals(await call(), 1);
});

function sleepMs(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Enqueue `n` jobs of `task` for each key. */
async function enqueueTask(sql: Sql, task: string, keys: string[], n: number) {
  await enqueueMany(
    sql,
    keys.flatMap((key) =>
      Array.from({ length: n }, (_, i) => ({
        task,
        queue: Q,
        // "": no fairness key given.
        ...(key === "" ? {} : { fairnessKey: key }),
        payload: { i },
      }))
    ),
  );
}

/** Claimed jobs counted by "task/key". */
function byTaskKey(jobs: Job[]): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const job of jobs) {
    const tag = `${job.task}/${job.fairness_key}`;
    counts[tag] = (counts[tag] ?? 0) + 1;
  }
  return counts;
}

Deno.test("a task's own limit counts its jobs apart per key, and the queue's limit does not apply to them", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 1)`;
  await db.sql`select shoal.set_concurrency_limit(${Q}, 2, task => 'export')`;
  await enqueueTask(db.sql, "t", ["a", "b"], 5);
  await enqueueTask(db.sql, "export", ["a", "b"], 5);
  assertEquals(byTaskKey(await claimJobs(db.sql, 100)), {
    "t/a": 1,
    "t/b": 1,
    "export/a": 2,
    "export/b": 2,
  });
  assertEquals(await claimJobs(db.sql, 100), []);
  // A key's own limit within the task overrides the task's default, for that key alone.
  await db.sql`select shoal.set_concurrency_limit(${Q}, 3, 'a', 'export')`;
  assertEquals(byTaskKey(await claimJobs(db.sql, 100)), { "export/a": 1 });
  const [limit] = await db.sql<[{ a: number; b: number; t: number }]>`
    select shoal.concurrency_limit(${Q}, 'a', 'export') as a,
           shoal.concurrency_limit(${Q}, 'b', 'export') as b,
           shoal.concurrency_limit(${Q}, 'a', 't') as t`;
  assertEquals(limit, { a: 3, b: 2, t: 1 });
  // The task without limits of its own: its running jobs count in the queue's buckets again,
  // at once (a has 1 + 3 running against the queue's 1, b 1 + 2).
  assertEquals(
    (await db.sql`select shoal.clear_concurrency_limit(${Q}, 'a', 'export') as c`)[0]!.c,
    true,
  );
  assertEquals(
    (await db.sql`select shoal.clear_concurrency_limit(${Q}, task => 'export') as c`)[0]!.c,
    true,
  );
  assertEquals(
    (await db.sql`select shoal.clear_concurrency_limit(${Q}, task => 'export') as c`)[0]!.c,
    false,
  );
  const [held] = await db.sql<[{ a: number; b: number }]>`
    select shoal.slots_held(${Q}, 'a') as a, shoal.slots_held(${Q}, 'b') as b`;
  assertEquals(held, { a: 4, b: 3 });
  assertEquals(await claimJobs(db.sql, 100), []);
});

Deno.test("a task's limit of 0 pauses that task alone; its rate limit and holds are its own", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 0, task => 'export')`;
  await enqueueTask(db.sql, "t", ["a"], 3);
  await enqueueTask(db.sql, "export", ["a"], 6);
  assertEquals(byTaskKey(await claimJobs(db.sql, 100)), { "t/a": 3 });
  // A rate limit of the task's own: 2 starts a minute, for its jobs alone.
  await db.sql`select shoal.clear_concurrency_limit(${Q}, task => 'export')`;
  await db.sql`select shoal.set_rate_limit(${Q}, 2, 60000, task => 'export')`;
  await enqueueTask(db.sql, "t", ["a"], 3);
  assertEquals(byTaskKey(await claimJobs(db.sql, 100)), { "t/a": 3, "export/a": 2 });
  await db.sql`select shoal.clear_rate_limit(${Q}, task => 'export')`;
  // A hold of the task's bucket for key a leaves the key's other jobs claimable; a hold
  // naming a task without limits of its own holds the queue's bucket.
  await db.sql`select shoal.set_concurrency_limit(${Q}, 100, task => 'export')`;
  await enqueueTask(db.sql, "t", ["a"], 2);
  await db.sql`select shoal.hold_key(${Q}, 'a', 400, 'export')`;
  assertEquals(byTaskKey(await claimJobs(db.sql, 100)), { "t/a": 2 });
  await new Promise((resolve) => setTimeout(resolve, 450));
  assertEquals(byTaskKey(await claimJobs(db.sql, 100)), { "export/a": 4 });
  await enqueueTask(db.sql, "t", ["a"], 1);
  await db.sql`select shoal.hold_key(${Q}, 'a', 60000, 't')`;
  assertEquals(await claimJobs(db.sql, 100), []);
  const [row] = await db.sql<[{ tasks: string[] }]>`
    select array_agg(task order by task) as tasks from shoal.flow_keys
    where queue = ${Q} and held_until > now()`;
  assertEquals(row.tasks, [""]);
  // The task's last limit cleared: what its buckets remembered goes (a hold of them could no
  // longer be named).
  await db.sql`select shoal.hold_key(${Q}, 'a', 60000, 'export')`;
  await db.sql`select shoal.clear_concurrency_limit(${Q}, task => 'export')`;
  const [gone] = await db.sql<[{ n: number }]>`
    select count(*)::integer as n from shoal.flow_keys where task = 'export'`;
  assertEquals(gone.n, 0);
});

Deno.test("a failure told to hold its key holds its task's bucket when its task has limits of its own", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 100, task => 'export')`;
  await enqueueTask(db.sql, "export", ["a"], 3);
  const [first] = await claimJobs(db.sql, 1);
  await enqueueTask(db.sql, "t", ["a"], 2);
  assertEquals(
    await fail(db.sql, first!, { error: "429", retryInMs: 0, holdKeyMs: 500 }),
    "retried",
  );
  assertEquals(byTaskKey(await claimJobs(db.sql, 100)), { "t/a": 2 });
  await new Promise((resolve) => setTimeout(resolve, 550));
  assertEquals(byTaskKey(await claimJobs(db.sql, 100)), { "export/a": 3 });
});

Deno.test("a task name a flow control function is given must be a task name", async () => {
  await using db = await testDb();
  for (
    const call of [
      db.sql`select shoal.set_concurrency_limit(${Q}, 1, task => 'bad name')`,
      db.sql`select shoal.set_rate_limit(${Q}, 1, 1000, task => 'bad name')`,
      db.sql`select shoal.hold_key(${Q}, 'a', 1000, 'bad name')`,
    ]
  ) {
    const error = await call.then(() => null, (e: Error) => e);
    assert(error && /task must be 1 to 128 letters/.test(error.message), String(error));
  }
});

Deno.test("a full task bucket does not hold back its key's other jobs queued behind it", async () => {
  await using db = await testDb();
  // Jobs with no fairness key: one key (""), the export backlog first in the claim order.
  await db.sql`select shoal.set_concurrency_limit(${Q}, 3, task => 'export')`;
  await enqueueTask(db.sql, "export", [""], 200);
  await enqueueTask(db.sql, "t", [""], 5);
  assertEquals(byTaskKey(await claimJobs(db.sql, 100)), { "export/": 3, "t/": 5 });
  // A limit of 0 pauses the task; the key's jobs behind its backlog still run.
  await db.sql`select shoal.set_concurrency_limit(${Q}, 0, task => 'export')`;
  await enqueueTask(db.sql, "export", ["a"], 100);
  await enqueueTask(db.sql, "t", ["a"], 4);
  assertEquals(byTaskKey(await claimJobs(db.sql, 100)), { "t/a": 4 });
  assertEquals(byTaskKey(await claimJobs(db.sql, 100, { fromHead: false })), {});
});

Deno.test("a change of a queue's limits waits for the claims in flight, and claims meanwhile leave the queue out", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 5)`;
  await enqueueTask(db.sql, "export", ["a"], 10);
  const waiting = async () => {
    const [row] = await db.sql<[{ n: number }]>`
      select count(*)::integer as n from pg_locks
      where locktype = 'advisory' and classid = 1936224621 and not granted
        and database = (select oid from pg_database where datname = current_database())`;
    return row.n;
  };
  // A claim in flight: the change waits for its commit, then sees its jobs (their bucket
  // changes: they get entries in the task's own).
  let changed = false;
  await db.sql.begin(async (tx) => {
    assertEquals((await claimJobs(tx as unknown as Sql, 3)).length, 3);
    const change = db.sql`select shoal.set_concurrency_limit(${Q}, 4, task => 'export')`
      .then(() => changed = true);
    for (let i = 0; i < 100 && await waiting() === 0; i++) await sleepMs(20);
    assertEquals(await waiting(), 1, "the change waits for the claim's rules lock");
    assertEquals(changed, false);
    void change;
  });
  for (let i = 0; i < 100 && !changed; i++) await sleepMs(20);
  assertEquals(changed, true);
  assertEquals((await db.sql`select shoal.slots_held(${Q}, 'a', 'export') as n`)[0]!.n, 3);
  // A change in flight: claims leave the queue out until it commits.
  await db.sql.begin(async (tx) => {
    await tx`select shoal.set_concurrency_limit(${Q}, 6, task => 'export')`;
    assertEquals(await claimJobs(db.sql, 10), []);
  });
  assertEquals((await claimJobs(db.sql, 10)).length, 3);
});

Deno.test("the reaper's prune clears the waiting flag of a key with no job left unclaimed", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 1)`;
  await enqueueKeys(db.sql, { a: 3 });
  assertEquals((await claimJobs(db.sql, 10)).length, 1);
  const flag = async () => {
    const [row] = await db.sql<[{ waiting: boolean }]>`
      select waiting from shoal.flow_keys where queue = ${Q} and key = 'a'`;
    return row.waiting;
  };
  assertEquals(await flag(), true);
  await db.sql`select shoal.prune_slots()`;
  assertEquals(await flag(), true, "jobs of the key still wait");
  // The waiting jobs go (cancelled, say): the flag would keep the queue's claims windowed.
  await db.sql`delete from shoal.jobs where locked_by is null`;
  assertEquals((await db.sql`select shoal.has_flow_leftovers() as f`)[0]!.f, true);
  await db.sql`select shoal.prune_slots()`;
  assertEquals(await flag(), false);
});

Deno.test("a key due a count by its 10,000 entries keeps its picks, and is counted after the claim writes its slot row", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 100000)`;
  await enqueueKeys(db.sql, { a: 50 });
  for (let i = 0; i < 3; i++) await ack(db.sql, await claimJobs(db.sql, 10));
  const running = await claimJobs(db.sql, 10);
  const state = () => boundOfA(db.sql);
  assertEquals(await state(), { bound: 40, counted: 0, rows: 4 });
  // As if 10,000 entries were added since the last count: the next claim counts.
  await db.sql`update shoal.flow_keys set slots_bound = 10040, slots_counted = 40
               where queue = ${Q} and key = 'a'`;
  const picked = await claimJobs(db.sql, 10);
  assertEquals(picked.length, 10);
  // The three rows whose jobs ended went; the running claim's row and this one's are left.
  assertEquals(await state(), { bound: 20, counted: 20, rows: 2 });
  assertEquals((await db.sql`select shoal.slots_held(${Q}, 'a') as n`)[0]!.n, 20);
  await ack(db.sql, [...running, ...picked]);
});

Deno.test("a paused task's backlog longer than a claim reads does not hold back the queue's lower priorities", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 0, task => 'export')`;
  await enqueueMany(
    db.sql,
    Array.from({ length: 3000 }, (_, i) => ({
      task: "export",
      queue: Q,
      fairnessKey: `k${i % 50}`,
      payload: {},
    })),
  );
  await enqueueMany(
    db.sql,
    Array.from({ length: 5 }, () => ({ task: "t", queue: Q, priority: -1, payload: {} })),
  );
  assertEquals(byTaskKey(await claimJobs(db.sql, 10)), { "t/": 5 });
});

Deno.test("the reaper's prune clears the waiting flag of a queue's bucket whose jobs moved to a task's own", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 1)`;
  await enqueueTask(db.sql, "t", ["a"], 5);
  assertEquals((await claimJobs(db.sql, 10)).length, 1);
  await db.sql`select shoal.set_concurrency_limit(${Q}, 2, task => 't')`;
  assertEquals((await claimJobs(db.sql, 10)).length, 1);
  const flags = async () =>
    await db.sql<{ task: string; waiting: boolean }[]>`
      select task, waiting from shoal.flow_keys where queue = ${Q} and key = 'a' order by task`;
  assertEquals((await flags()).map((r) => [r.task, r.waiting]), [["", true], ["t", true]]);
  await db.sql`select shoal.prune_slots()`;
  // The task's bucket still has jobs waiting; the queue's has none left.
  assertEquals((await flags()).map((r) => [r.task, r.waiting]), [["", false], ["t", true]]);
});

Deno.test("a change of a queue's limits gives up after 5 s behind a claim held open, with one clear error, and claims go on", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit(${Q}, 5)`;
  await enqueueKeys(db.sql, { a: 10 });
  const reserved = await db.sql.reserve();
  try {
    await reserved`begin`;
    assertEquals((await claimJobs(reserved as unknown as Sql, 1)).length, 1);
    const started = Date.now();
    const error = await db.sql`select shoal.set_concurrency_limit(${Q}, 6)`.then(
      () => null,
      (e: Error) => e,
    );
    const waited = Date.now() - started;
    assert(error && /Cannot change the limits of queue "flow"/.test(error.message), String(error));
    assert(waited >= 4500 && waited < 15_000, `waited ${waited} ms`);
    await reserved`commit`;
  } finally {
    reserved.release();
  }
  assertEquals((await claimJobs(db.sql, 10)).length, 4);
});
