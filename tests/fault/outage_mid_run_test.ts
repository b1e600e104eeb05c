/**
 * Fault 4b: the database gone for 10 s mid-run (the test's own cluster stopped, then
 * started again): every role stays up, backs off with clear log lines (counted: no tight
 * loop), and resumes; the run finishes with nothing lost.
 */
import { assert, assertEquals } from "../assert.ts";
import { logLines, sleep } from "../helpers.ts";
import { connect } from "../../lib/db.ts";
import { type Member, MixedRun, ownCluster, report, tail } from "./harness.ts";

/** Log records written at warn or error level (JSON logs). */
function complaints(output: string): Record<string, unknown>[] {
  return logLines(output).filter((l) => l.level === "WARN" || l.level === "ERROR");
}

Deno.test("every role rides out 10 s without the database and the run finishes", async () => {
  const started = Date.now();
  await using cluster = await ownCluster();
  const sql = connect(cluster.url, { applicationName: "shoal test", max: 4 });
  try {
    await using run = await MixedRun.prepare({ url: cluster.url, sql });
    await run.start();
    await run.waitForSlots(2);
    await run.enqueueWave(150);
    await run.waitForJobsInFlight();
    const before = new Map(run.members.map((m) => [m, complaints(m.proc.output()).length]));
    const exited = new Set<Member>();
    for (const m of run.members) m.proc.exited().then(() => exited.add(m));
    await cluster.stop();
    run.faults++;
    await sleep(10_000);
    const during = run.members.map((m) => ({
      m,
      lines: complaints(m.proc.output()).slice(before.get(m)),
    }));
    await cluster.start();
    assertEquals([...exited].map((m) => m.name), [], "a role exited while the database was down");
    for (const { m, lines } of during) {
      assert(lines.length > 0, `${m.name} said nothing while the database was down`);
      // Bounded, not a tight loop: the consumer's claim loop backs off 1 s, 2 s, 4 s, 8 s; its
      // heartbeat (every 2 s / 3) logs at most a retry and a failure per beat; the leaders
      // back off from their interval (2 s / 7) to their lease (2 s), with jitter: at most
      // about 10 attempts in 10 s, one line each (two for the renewal that failed first).
      const limit = m.role === "consumer" ? 50 : 20;
      assert(
        lines.length <= limit,
        `${m.name} logged ${lines.length} complaints in 10 s:\n${tail(m.proc.output())}`,
      );
    }
    await run.enqueueWave(30);
    await run.finish();
    const figures = await run.check();
    const counts = during.map(({ m, lines }) => `${m.name} ${lines.length}`).join(", ");
    report(`database gone for 10 s (complaints: ${counts})`, figures, started);
  } finally {
    await sql.end({ timeout: 5 });
  }
});
