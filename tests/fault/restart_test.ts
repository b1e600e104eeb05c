/**
 * Fault 3: Postgres restarted (`pg_ctl restart -m fast`) in the middle of the mixed run.
 * The test runs its own throwaway cluster (lib/local_pg.ts), so restarting it disturbs no
 * other test. Every session dies at once; shoal reconnects and finishes the run.
 *
 * A statement sent on a connection the restart killed can stay unsettled (postgres.js;
 * its error, 57P01, surfaces on later statements up to 15 s after the restart): shoal's
 * 10 s statement deadline turns that into a lost connection, so every role shuts down.
 */
import { assert } from "../assert.ts";
import { connect } from "../../lib/db.ts";
import { MixedRun, ownCluster, report } from "./harness.ts";

Deno.test("the mixed run finishes across a Postgres restart", async () => {
  const started = Date.now();
  await using cluster = await ownCluster();
  const sql = connect(cluster.url, { applicationName: "shoal test", max: 4 });
  try {
    await using run = await MixedRun.prepare({ url: cluster.url, sql });
    await run.start();
    await run.waitForSlots(2);
    await run.enqueueWave(150);
    // Restart with work in flight: claimed jobs, open transactions, a fan-out under way.
    const inFlight = await run.waitForJobsInFlight();
    await cluster.restart();
    run.faults++;
    await run.enqueueWave(60);
    await run.finish();
    const figures = await run.check();
    const lost = run.members.filter((m) =>
      /terminating connection|CONNECTION_CLOSED|ECONNRESET/.test(m.proc.output())
    );
    assert(lost.length > 0, "no process noticed the restart");
    report(`Postgres restarted with ${inFlight} jobs claimed`, figures, started);
  } finally {
    await sql.end({ timeout: 5 });
  }
});
