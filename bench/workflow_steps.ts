/**
 * The cost of durable steps (issue 17, "Cost"), shoal only:
 *
 * - W15/steps (`workflowSteps`): 1,000 executions (100 with `--quick`), each one job of
 *   `bench.steps` running 5 steps with no-op bodies (`ctx.step(name, () => null)`: a
 *   transaction per step that records its result, fenced by the claim's token), started with
 *   startExecution() before one consumer process (the bench entry, shoal's defaults) drains
 *   them. Figures: time per step (the drain's time ÷ steps), steps/s and time per job.
 *   Issue 17's goal: time per step ≤ 2× W2's time per job (a plain no-op job drained by the
 *   same consumer defaults), set beside W2/shoal of the same run.
 * - W15/steps/checkpoint (`workflowSteps("checkpoint")`): the same with checkpoint steps
 *   (`ctx.step(name, () => null, { transaction: false })`: no transaction; records of the
 *   consumer's running handlers go together in one statement, lib/checkpoints.ts). Set beside
 *   the same W2/shoal; compare the two forms within one run.
 *
 * The issue names this workload W13; the bench's W13 and W14 were taken (counts at scale,
 * flow limits), so it is W15 (W15/emit, the event wake-up, is its sibling).
 *
 * @module
 */
import type { Sql } from "../lib/db.ts";
import { startExecution } from "../lib/execution.ts";
import { cpuSeconds, pollUntil, withFreshDb } from "./harness.ts";
import { profileRead, profileReset, type StatementProfile } from "./profile.ts";
import { shoal } from "./systems.ts";
import { type Benchmark, type Metric, stallGuard } from "./workloads.ts";

/** Steps in each job of W15/steps. */
export const W15_STEPS = 5;
/** Issue 17's goal: time per step at most this many times W2's time per job. */
export const STEPS_TARGET = 2;
const QUEUE = "default";

const METRICS: Metric[] = [
  { key: "ms_per_step", unit: "ms/step", better: "lower" },
  { key: "rate", unit: "steps/s", better: "higher" },
  { key: "ms_per_job", unit: "ms/job", better: "lower" },
];

/** Executions not yet completed, and any that ended otherwise (a failed run is a broken bench). */
async function tally(sql: Sql): Promise<{ open: number; failed: number }> {
  const [row] = await sql<{ open: number; failed: number }[]>`
    select count(*) filter (where status in ('pending', 'running'))::integer as open,
      count(*) filter (where status in ('failed', 'cancelled'))::integer as failed
    from shoal.executions`;
  return row!;
}

/** How W15's steps run: a transaction each (ctx.step's default), or checkpoints in batches. */
export type StepForm = "transaction" | "checkpoint";

/** The benchmark id of each form. */
export const STEP_FORM_IDS: Record<StepForm, string> = {
  transaction: "W15/steps",
  checkpoint: "W15/steps/checkpoint",
};

/**
 * W15/steps: executions of 5 no-op steps each, drained by one consumer process: with its
 * default concurrency (10), or with `concurrency` (`/c100`, set beside W2/shoal/c100). The
 * checkpoint form's floor is a WAL flush per round of records, and a round carries one record
 * per running handler: more handlers, fewer flushes per step.
 */
export function workflowSteps(
  form: StepForm = "transaction",
  concurrency?: number,
): Benchmark {
  const id = concurrency === undefined
    ? STEP_FORM_IDS[form]
    : `${STEP_FORM_IDS[form]}/c${concurrency}`;
  const call = form === "checkpoint"
    ? "ctx.step(name, fn, { transaction: false }) (a checkpoint step, recorded in batches)"
    : "ctx.step() (a transaction per step)";
  return {
    id,
    workload: "W15",
    system: shoal.name,
    title: `executions of ${W15_STEPS} no-op ${
      form === "checkpoint" ? "checkpoint " : ""
    }steps each, 1 consumer process, ${
      concurrency === undefined ? "default settings" : `concurrency ${concurrency}`
    }`,
    settings:
      `${shoal.defaultSettings}${
        concurrency === undefined ? "" : `; but --concurrency ${concurrency}`
      }; bench/bench_main.ts (the stock main plus bench.steps); ` +
      `each execution one job running ${call} ${W15_STEPS} times with a no-op body, started ` +
      `with startExecution() before the consumer starts · issue 17 goal: time per step ≤ ` +
      `${STEPS_TARGET}× W2's time per job`,
    metrics: METRICS,
    run: (ctx) =>
      withFreshDb(ctx.server, "w15steps", async (db) => {
        await shoal.install(db.sql, db.url);
        const executions = ctx.sizes.stepExecutions;
        const steps = executions * W15_STEPS;
        await db.sql.begin(async (tx) => {
          for (let i = 0; i < executions; i++) {
            await startExecution(tx, {
              task: "bench.steps",
              queue: QUEUE,
              payload: { steps: W15_STEPS, checkpoint: form === "checkpoint" },
            });
          }
        });
        if (ctx.profile) await profileReset(db.sql);
        // The bench entry (stamp: true) is the one that knows bench.steps.
        const consumer = shoal.spawnConsumer(db.url, { stamp: true, concurrency });
        let startedAt: number;
        let endedAt: number;
        let consumerCpu: number | null = null;
        let profile: StatementProfile | undefined;
        try {
          startedAt = await consumer.started;
          const cpuAtStart = await cpuSeconds(consumer.pid);
          endedAt = await pollUntil(
            `shoal to run ${executions} executions of ${W15_STEPS} steps`,
            stallGuard(
              "shoal's steps made no progress",
              consumer,
              () => shoal.isEmpty(db.sql),
              async () => (await tally(db.sql)).open,
            ),
            { everyMs: 10, timeoutMs: 600_000 },
          );
          const cpuAtEnd = await cpuSeconds(consumer.pid);
          if (cpuAtStart !== null && cpuAtEnd !== null) consumerCpu = cpuAtEnd - cpuAtStart;
          // Per step (the profile's "per job" is per unit of work): its statements and time.
          if (ctx.profile) profile = await profileRead(db.sql, steps);
        } finally {
          await consumer.stop();
        }
        // Checked after the consumer exited: every execution completed, every step recorded.
        const { open, failed } = await tally(db.sql);
        const [recorded] = await db.sql<{ n: number }[]>`
          select count(*)::integer as n from shoal.job_steps where kind = 'step'`;
        if (open !== 0 || failed !== 0 || recorded!.n !== steps) {
          throw new Error(
            `${id} ended with ${open} executions open, ${failed} failed and ` +
              `${recorded!.n} of ${steps} steps recorded`,
          );
        }
        const seconds = (endedAt - startedAt) / 1000;
        return {
          values: {
            ms_per_step: (seconds * 1000) / steps,
            rate: steps / seconds,
            ms_per_job: (seconds * 1000) / executions,
          },
          details: { seconds, executions, steps, consumer_cpu_s: consumerCpu, profile },
        };
      }),
  };
}
