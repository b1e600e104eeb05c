import { startConsumer, testDb, waitFor } from "../helpers.ts";
import { defineTask } from "../../lib/tasks.ts";
import { enqueueMany } from "../../lib/queue.ts";

Deno.test("w14 probe", async () => {
  await using db = await testDb();
  await db.sql`select shoal.set_concurrency_limit('default', 2)`;
  for (let k = 0; k < 20; k++) {
    await enqueueMany(db.sql, Array.from({ length: 100 }, () => ({ task: "hold", queue: "default", fairnessKey: `k${k}` })), { notify: false });
  }
  let done = 0;
  const task = defineTask({ name: "hold", async handler() { await new Promise((r) => setTimeout(r, 20)); done++; } });
  await db.sql`create extension if not exists pg_stat_statements`.catch(() => {});
  const t0 = performance.now();
  const c = startConsumer(db.sql, [task], { concurrency: 40, listen: Deno.env.get("LISTEN") === "1", pollIntervalMs: 2000 });
  await waitFor("done", () => done >= 2000, 120_000, 10);
  const s = (performance.now() - t0) / 1000;
  await c.stop();
  console.log(`rate ${(2000 / s).toFixed(0)} jobs/s in ${s.toFixed(2)} s`);
});
