/**
 * W15/steps and W15/steps/checkpoint (bench/workflow_steps.ts) at a tiny size, on the test server, with a real consumer
 * process: it runs every execution's steps, checks they were all recorded, and reports the
 * figures the report reads. What it measures is not judged here (no speed in unit tests).
 */
import { assert, assertEquals } from "./assert.ts";
import { startServer } from "../bench/harness.ts";
import { W15_STEPS, workflowSteps } from "../bench/workflow_steps.ts";
import type { BenchContext, Sizes } from "../bench/workloads.ts";

/** A bench context on the test server that reads only the W15/steps size. */
function context(server: BenchContext["server"]): BenchContext {
  return {
    server,
    sizes: { stepExecutions: 20 } as Sizes, // the only size W15/steps reads
    profile: false,
    soak: {
      soakMs: 0,
      soakSampleMs: 0,
      holdBeforeMs: 0,
      holdMs: 0,
      holdAfterMs: 0,
      holdSampleMs: 0,
      rateShare: 0,
      fixedRate: null,
    },
    figure: () => Number.NaN,
    statementsServer: () => Promise.reject(new Error("not used here")),
  };
}

for (
  const [form, id] of [["transaction", "W15/steps"], [
    "checkpoint",
    "W15/steps/checkpoint",
  ]] as const
) {
  Deno.test(`W15 workflowSteps("${form}"): 20 executions of 5 steps drained, time per step and per job reported`, async () => {
    const server = await startServer({ profile: false });
    assert.ok(!server.owned, "the bench must use the test server given by DATABASE_URL");
    const benchmark = workflowSteps(form);
    assertEquals([benchmark.id, benchmark.workload, benchmark.system], [id, "W15", "shoal"]);
    // run() throws unless every execution completed and every step was recorded.
    const { values, details } = await benchmark.run(context(server));
    assertEquals([details.executions, details.steps], [20, 20 * W15_STEPS]);
    for (const key of ["ms_per_step", "rate", "ms_per_job"]) {
      assert.ok(Number.isFinite(values[key]) && values[key]! > 0, `${key}: ${values[key]}`);
    }
    const perJob = values.ms_per_step! * W15_STEPS;
    assert.ok(Math.abs(values.ms_per_job! - perJob) < 1e-9 * perJob, "a job is 5 steps");
  });
}
