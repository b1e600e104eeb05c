/**
 * The benchmark's own shoal binary: the stock `main` plus one task, `bench.stamp`,
 * which records when it started. Same code path as a team's own entry file.
 *
 * `bench.stamp` `{t}`: `t` is the enqueuer's clock (epoch ms) just before it called
 * enqueue. The handler takes its own clock first thing, then writes both to the
 * unlogged `bench.starts` table with the job's fairness key (W5 tells keys apart by it);
 * the write happens after the start is taken, so it does not inflate this job's latency.
 *
 * @module
 */
import { main } from "../lib/cli.ts";
import { type AnyTask, defineTask } from "../lib/tasks.ts";

export const stampTask: AnyTask = defineTask<{ t: number }>({
  name: "bench.stamp",
  parse(payload) {
    if (typeof payload.t !== "number" || !Number.isFinite(payload.t)) {
      throw new TypeError("t must be the enqueue time in epoch milliseconds");
    }
    return { t: payload.t };
  },
  async handler({ t }, ctx) {
    const startedAt = performance.timeOrigin + performance.now();
    await ctx.db`
      insert into bench.starts (job_id, fairness_key, enqueued_at, started_at)
      values (${ctx.job.id}::text, ${ctx.job.fairness_key}::text, ${t}::float8,
              ${startedAt}::float8)`;
  },
});

if (import.meta.main) {
  Deno.exit(await main(Deno.args, { tasks: [stampTask] }));
}
