import { testDb } from "../helpers.ts";
import { ack, claim, enqueueMany } from "../../lib/queue.ts";

Deno.test("claim cost", async () => {
  await using db = await testDb();
  const limited = Deno.env.get("LIMITED") === "1";
  if (limited) await db.sql`select shoal.set_concurrency_limit('default', 2)`;
  for (let k = 0; k < 20; k++) {
    await enqueueMany(db.sql, Array.from({ length: 500 }, () => ({ task: "hold", queue: "default", fairnessKey: `k${k}` })), { notify: false });
  }
  const opts = { queues: ["default"], limit: 50, workerId: "w", visibilityMs: 60000, fromHead: false };
  const first = await claim(db.sql, opts);
  console.log("first claim", first.jobs.length);
  const times: number[] = [];
  const empties: number[] = [];
  for (let i = 0; i < 200; i++) {
    // ack two jobs of one key, claim again
    const done = first.jobs.splice(0, 2);
    await ack(db.sql, done);
    let t = performance.now();
    const got = await claim(db.sql, opts);
    times.push(performance.now() - t);
    first.jobs.push(...got.jobs);
    t = performance.now();
    await claim(db.sql, opts);
    empties.push(performance.now() - t);
  }
  times.sort((a, b) => a - b); empties.sort((a, b) => a - b);
  console.log(`claim after freeing: p50 ${times[100]!.toFixed(2)} ms p90 ${times[180]!.toFixed(2)}; claim when full p50 ${empties[100]!.toFixed(2)} p90 ${empties[180]!.toFixed(2)}`);
});
