/**
 * Fault 3: Postgres restarted (`pg_ctl restart -m fast`) in the middle of the mixed run.
 * The test runs its own throwaway cluster (lib/local_pg.ts), so restarting it disturbs no
 * other test. Every session dies at once; shoal reconnects and finishes the run.
 *
 * Kept out of the suite (not named *_test.ts) until postgres.js is fixed: in about half
 * the runs (with or without the nextWrite patch) a consumer never finishes shutting down,
 * because a statement sent on a connection the restart killed never settles (its error,
 * 57P01, surfaces on later statements up to 15 s after the restart). Every invariant of
 * the run itself holds. Run it by name: `deno task test tests/fault/restart_test.ts`.
 */
import { assert } from "../assert.ts";
import { waitFor } from "../helpers.ts";
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
    const inFlight = await waitFor(
      "jobs in flight",
      async () => {
        const [row] = await sql<{ n: number }[]>`
        select count(*)::int as n from shoal.jobs where locked_by is not null`;
        return row!.n;
      },
      20_000,
      20,
    );
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
