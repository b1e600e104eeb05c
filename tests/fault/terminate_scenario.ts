/**
 * Fault 1: every shoal session is terminated (`pg_terminate_backend`) every 200 ms while
 * the mixed run works. shoal reconnects, retries its idempotent statements once, and
 * finishes the run with nothing lost and nothing promised once done twice.
 *
 * Kept out of the suite (not named *_test.ts) until postgres.js stops failing under this
 * fault: about half the runs end with a role crashed by an uncaught TypeError in
 * postgres.js (`nextWrite` on a closed socket, porsager/postgres#1154, #1208) or a role
 * that never finishes shutting down (a statement on a killed connection that never
 * settles). Run it by name: `deno task test tests/fault/terminate_scenario.ts`.
 */
import { assert } from "../assert.ts";
import { sleep, testDb } from "../helpers.ts";
import { MixedRun, report, terminateLoop } from "./harness.ts";

Deno.test("the mixed run finishes while every shoal session is terminated every 200 ms", async () => {
  const started = Date.now();
  await using db = await testDb();
  await using run = await MixedRun.prepare({ url: db.url, sql: db.sql });
  await run.start();
  const injector = terminateLoop(db.url, 200);
  let killed = 0;
  try {
    await run.waitForSlots(2);
    await run.enqueueWave(60);
    await sleep(4000);
    await run.enqueueWave(60);
    await sleep(4000);
  } finally {
    killed = await injector.stop();
  }
  run.faults += killed;
  assert(killed >= 40, `only ${killed} sessions were terminated`);
  await run.finish();
  const retried = run.members.filter((m) => m.proc.output().includes("retrying once"));
  assert(retried.length > 0, "no process logged a retried statement");
  report("terminate every 200 ms", await run.check(), started);
});
