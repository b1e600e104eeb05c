/**
 * The bench's BullMQ peer (bench/peers.ts, bench/peers/bullmq.cjs) against a real Postgres:
 * its schema install, its producer in this process and one real worker process on the
 * pinned Node.js, through the same `System` calls the workloads make. Needs
 * bench/peers/node_modules: `ensurePeersInstalled()` runs `npm ci` there when it is missing
 * (.ci/run installs it beforehand), and the test fails, never skips, when it cannot.
 */
import { assert, assertEquals } from "./assert.ts";
import { emptyDb, waitFor } from "./helpers.ts";
import { bullmq, ensurePeersInstalled, PEER_VERSIONS } from "../bench/peers.ts";
import { createStartsTable, readStarts } from "../bench/harness.ts";

Deno.test("bullmq system: enqueued jobs are drained by its worker, stamp jobs record their start", async () => {
  await ensurePeersInstalled();
  await using db = await emptyDb();
  await bullmq.install(db.sql, db.url);
  await createStartsTable(db.sql);
  const producer = await bullmq.openProducer(db.url, { max: 2 });
  const stamps = [1_000.5, 2_000.25, 3_000];
  try {
    await producer.warm(2);
    await producer.enqueueOne({ kind: "noop" }, { notify: true });
    await producer.enqueueBatch([
      { kind: "noop" },
      { kind: "noop" },
      { kind: "stamp", enqueuedAt: stamps[0]! },
      { kind: "stamp", enqueuedAt: stamps[1]! },
    ], { notify: true });
    await producer.enqueueOne({ kind: "stamp", enqueuedAt: stamps[2]! }, { notify: true });
  } finally {
    await producer.close();
  }
  assertEquals(await bullmq.count(db.sql), 6);
  assertEquals(await bullmq.isEmpty(db.sql), false);

  const consumer = bullmq.spawnConsumer(db.url, { stamp: true });
  try {
    const startedAt = await consumer.started;
    assert.ok(startedAt > 0, `started at ${startedAt}`);
    await waitFor("the bullmq worker to drain its queue", () => bullmq.isEmpty(db.sql), 30_000);
  } finally {
    await consumer.stop();
  }
  assertEquals(await bullmq.count(db.sql), 0);
  // removeOnComplete: nothing is left behind in BullMQ's job table.
  const [left] = await db.sql<{ n: number }[]>`select count(*)::integer as n from bullmq.job`;
  assertEquals(left!.n, 0);
  const starts = await readStarts(db.sql);
  assertEquals(starts.map((s) => s.enqueued_at).sort((a, b) => a - b), stamps);
  assertEquals(new Set(starts.map((s) => s.job_id)).size, stamps.length);
  for (const start of starts) assert.ok(start.started_at > start.enqueued_at, String(start));
});

Deno.test("bullmq system: the report names the versions bench/peers/package.json pins", async () => {
  const manifest = JSON.parse(
    await Deno.readTextFile(new URL("../bench/peers/package.json", import.meta.url)),
  ) as { dependencies: Record<string, string> };
  for (const name of ["bullmq", "pg", "node"]) {
    assertEquals(manifest.dependencies[name], PEER_VERSIONS[name], name);
  }
  assert.ok(bullmq.defaultSettings.includes(`BullMQ ${PEER_VERSIONS.bullmq} on its PostgreSQL`));
  assert.ok(bullmq.defaultSettings.includes("concurrency 24"), bullmq.defaultSettings);
});
