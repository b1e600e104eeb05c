/**
 * W7, consumer processes side by side: 1, 2, 4 or 8 consumer processes of a system (default
 * settings each) drain one queue. So that no process gets a head start while the others
 * boot, they all start on an empty queue; once every one has logged its start, the
 * producer enqueues every job in ONE call (NOTIFY on), which commits them all at once.
 * Throughput = jobs ÷ (the moment the bench sees the queue empty − the moment that call
 * returned). Issue 5's target: 4 processes at least as fast as 1 (no convoy on 2 cores).
 *
 * @module
 */
import { cpuSeconds, pollUntil, sleep, withFreshDb } from "./harness.ts";
import { profileRead, profileReset, type StatementProfile } from "./profile.ts";
import type { ConsumerProcess, System } from "./systems.ts";
import { type Benchmark, checkCount, type Metric, stallGuard } from "./workloads.ts";

const METRICS: Metric[] = [{ key: "rate", unit: "jobs/s", better: "higher" }];
/** The consumer counts W7 measures. */
export const PROCESS_COUNTS = [1, 2, 4, 8] as const;
/** After the last start line: let every consumer settle into its idle wait. */
const SETTLE_MS = 500;

/** One consumer that stands for all of them in a stall message. */
function anyOf(consumers: ConsumerProcess[]): ConsumerProcess {
  return {
    pid: consumers[0]!.pid,
    started: consumers[0]!.started,
    stop: () => Promise.all(consumers.map((c) => c.stop())).then(() => {}),
    output: () => consumers.map((c) => c.output().slice(-1000)).join("\n---\n"),
  };
}

/** W7: `processes` consumer processes of `system` draining one queue. */
export function processScaling(system: System, processes: number): Benchmark {
  return {
    id: `W7/${system.name}/p${processes}`,
    workload: "W7",
    system: system.name,
    title: `drain no-op jobs with ${processes} consumer process${processes === 1 ? "" : "es"}`,
    settings: `${processes} × (${system.defaultSettings}); all started on an empty queue, ` +
      "then every job enqueued in one call (NOTIFY on)",
    metrics: METRICS,
    run: (ctx) =>
      withFreshDb(ctx.server, `w7_p${processes}`, async (db) => {
        await system.install(db.sql, db.url);
        const total = ctx.sizes.scalingJobs;
        const producer = await system.openProducer(db.url, { max: 1 });
        const consumers: ConsumerProcess[] = [];
        let seconds: number;
        let cpu: number | null = 0;
        // --profile: the server's time per job as the processes grow (issue 18's scale-out
        // question: does a consumer on another host cost the primary more per job?).
        let profile: StatementProfile | undefined;
        try {
          await producer.warm(1);
          for (let i = 0; i < processes; i++) {
            consumers.push(system.spawnConsumer(db.url, { stamp: false }));
          }
          await Promise.all(consumers.map((c) => c.started));
          await sleep(SETTLE_MS);
          const cpuBefore = await Promise.all(consumers.map((c) => cpuSeconds(c.pid)));
          if (ctx.profile) await profileReset(db.sql);
          const jobs = Array.from({ length: total }, () => ({ kind: "noop" as const }));
          await producer.enqueueBatch(jobs, { notify: true });
          const t0 = performance.now();
          await pollUntil(
            `${processes} ${system.name} consumers to drain ${total} jobs`,
            stallGuard(
              `${system.name} consumers finished no job`,
              anyOf(consumers),
              () => system.isEmpty(db.sql),
              () => system.count(db.sql),
            ),
            { everyMs: 10, timeoutMs: 600_000 },
          );
          seconds = (performance.now() - t0) / 1000;
          if (ctx.profile) profile = await profileRead(db.sql, total);
          const cpuAfter = await Promise.all(consumers.map((c) => cpuSeconds(c.pid)));
          for (let i = 0; i < processes; i++) {
            const before = cpuBefore[i];
            const after = cpuAfter[i];
            cpu = cpu === null || before == null || after == null ? null : cpu + after - before;
          }
        } finally {
          await producer.close();
          await Promise.all(consumers.map((c) => c.stop()));
        }
        await checkCount(system, db.sql, 0);
        return {
          values: { rate: total / seconds },
          details: { seconds, jobs: total, processes, consumers_cpu_s: cpu, profile },
        };
      }),
  };
}
