import { assert, assertEquals, assertExists, assertRejects } from "./assert.ts";
import {
  acquire,
  holdLease,
  LeaseLostError,
  listLeases,
  releaseLease,
  renew,
} from "../lib/lease.ts";
import { checkLeaderTiming, runLeaderLoop } from "../lib/leader.ts";
import { logger } from "../lib/log.ts";
import { testDb, waitFor } from "./helpers.ts";

const T0 = new Date("2030-01-01T00:00:00Z");
const at = (ms: number) => new Date(T0.getTime() + ms);

Deno.test("acquire() takes a free lease, refuses a held one, and starts a new term after expiry", async () => {
  await using db = await testDb();
  const a = await acquire(db.sql, { name: "x", holder: "a", ttlMs: 1000, now: T0 });
  assertExists(a);
  assertEquals(a.token, "1");
  assertEquals(a.expiresAt.getTime(), at(1000).getTime());
  assertEquals(await acquire(db.sql, { name: "x", holder: "b", ttlMs: 1000, now: at(999) }), null);
  // Already ours and unexpired: same term.
  const again = await acquire(db.sql, { name: "x", holder: "a", ttlMs: 1000, now: at(500) });
  assertEquals(again?.token, "1");
  const b = await acquire(db.sql, { name: "x", holder: "b", ttlMs: 1000, now: at(1500) });
  assertEquals(b?.token, "2");
  assertEquals(b?.holder, "b");
});

Deno.test("renew() extends only while ours, in our term and unexpired", async () => {
  await using db = await testDb();
  const a = (await acquire(db.sql, { name: "x", holder: "a", ttlMs: 1000, now: T0 }))!;
  const renewed = await renew(db.sql, a, { ttlMs: 1000, now: at(900) });
  assertEquals(renewed?.expiresAt.getTime(), at(1900).getTime());
  assertEquals(await renew(db.sql, a, { ttlMs: 1000, now: at(1900) }), null, "expired");
  const b = (await acquire(db.sql, { name: "x", holder: "b", ttlMs: 1000, now: at(2000) }))!;
  assertEquals(await renew(db.sql, a, { ttlMs: 1000, now: at(2100) }), null, "foreign term");
  assert.ok(await renew(db.sql, b, { ttlMs: 1000, now: at(2100) }));
});

Deno.test("releaseLease() lets a standby take over at once", async () => {
  await using db = await testDb();
  const a = (await acquire(db.sql, { name: "x", holder: "a", ttlMs: 60_000 }))!;
  assertEquals(await acquire(db.sql, { name: "x", holder: "b", ttlMs: 60_000 }), null);
  assertEquals(await releaseLease(db.sql, a), true);
  const b = await acquire(db.sql, { name: "x", holder: "b", ttlMs: 60_000 });
  assertEquals(b?.token, "2");
  assertEquals(await releaseLease(db.sql, a), false, "a stale term releases nothing");
  const [row] = await listLeases(db.sql);
  assertEquals(row?.holder, "b");
});

Deno.test("holdLease() fences leader work: a stale term's transaction fails and changes nothing", async () => {
  await using db = await testDb();
  const a = (await acquire(db.sql, { name: "x", holder: "a", ttlMs: 1000, now: T0 }))!;
  await db.sql`create table leader_effects (who text)`;
  await db.sql.begin(async (tx) => {
    await holdLease(tx, a, { now: at(10) });
    await tx`insert into leader_effects values ('a')`;
  });
  await acquire(db.sql, { name: "x", holder: "b", ttlMs: 1000, now: at(5000) });
  await assertRejects(
    () =>
      db.sql.begin(async (tx) => {
        await holdLease(tx, a, { now: at(5001) });
        await tx`insert into leader_effects values ('a late')`;
      }),
    LeaseLostError,
  );
  assertEquals((await db.sql`select who from leader_effects`).map((r) => r.who), ["a"]);
});

Deno.test("holdLease() blocks a successor's acquire until the leader's transaction ends", async () => {
  await using db = await testDb();
  const a = (await acquire(db.sql, { name: "x", holder: "a", ttlMs: 300 }))!;
  let acquired: unknown = "pending";
  let successor: Promise<unknown> | null = null;
  await db.sql.begin(async (tx) => {
    await holdLease(tx, a);
    // The leader is busy in a statement (not idle) while its lease expires.
    const busy = tx`select pg_sleep(0.8)`.execute();
    await new Promise((r) => setTimeout(r, 400));
    successor = acquire(db.sql, { name: "x", holder: "b", ttlMs: 1000 }).then((t) => acquired = t);
    await new Promise((r) => setTimeout(r, 200));
    assertEquals(acquired, "pending", "the successor waits for the leader's transaction");
    await busy;
  });
  await successor;
  assertEquals((acquired as { holder: string }).holder, "b");
});

Deno.test("holdLease() ends a leader's session left idle in its transaction past the lease", async () => {
  await using db = await testDb();
  const a = (await acquire(db.sql, { name: "x", holder: "a", ttlMs: 300 }))!;
  let frozen: Promise<unknown> = Promise.resolve();
  const leader = db.sql.begin(async (tx) => {
    await holdLease(tx, a);
    // Frozen (SIGSTOP, a stalled VM): idle in the transaction well past the lease.
    frozen = new Promise((r) => setTimeout(r, 1500));
    await frozen;
    await tx`select 1`;
  });
  const settled = leader.then(() => "committed", (error: Error) => error.message);
  await new Promise((r) => setTimeout(r, 500));
  const started = Date.now();
  const b = await acquire(db.sql, { name: "x", holder: "b", ttlMs: 1000 });
  assertEquals(b?.holder, "b");
  assert.ok(Date.now() - started < 1000, "the standby did not wait for the frozen leader");
  assert.match(await settled, /idle-in-transaction|terminat|Connection|CONNECTION/i);
  await frozen;
});

Deno.test("checkLeaderTiming() refuses an interval not shorter than the lease", () => {
  checkLeaderTiming("reaper", 5000, 30_000);
  for (const [interval, lease] of [[30_000, 30_000], [40_000, 30_000], [0, 30_000]]) {
    let caught: unknown;
    try {
      checkLeaderTiming("reaper", interval!, lease!);
    } catch (error) {
      caught = error;
    }
    assert.ok(caught instanceof RangeError);
    assert.match((caught as Error).message, /must be shorter than --lease/);
  }
});

Deno.test("runLeaderLoop() elects one leader, hands over on stop, and stops work when the lease is lost", async () => {
  await using db = await testDb();
  const log = logger("test");
  const work: string[] = [];
  const stopA = new AbortController();
  const stopB = new AbortController();
  const opts = (holder: string) => ({ lease: "x", holder, leaseMs: 2000, intervalMs: 50, log });
  const a = runLeaderLoop(
    db.sql,
    opts("a"),
    () => Promise.resolve(void work.push("a")),
    stopA.signal,
  );
  await waitFor("a leads", () => work.includes("a"));
  const b = runLeaderLoop(
    db.sql,
    opts("b"),
    () => Promise.resolve(void work.push("b")),
    stopB.signal,
  );
  await new Promise((r) => setTimeout(r, 300));
  assert.ok(!work.includes("b"), "the standby does no leader work while a leads");
  stopA.abort();
  await a;
  const handedOverAt = work.length;
  await waitFor("b leads", () => work.slice(handedOverAt).includes("b"), 1500);
  // Steal b's lease behind its back: b must stop working in its next cycle.
  await db.sql`update shoal.leases set holder = 'thief', token = token + 1 where name = 'x'`;
  await new Promise((r) => setTimeout(r, 200));
  const afterTheft = work.length;
  await new Promise((r) => setTimeout(r, 300));
  assertEquals(work.length, afterTheft, "no leader work after the lease was lost");
  stopB.abort();
  await b;
});
