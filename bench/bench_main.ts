/**
 * The benchmark's own shoal binary: the stock `main` plus three tasks, `bench.stamp`, which
 * records when it started, `bench.hold`, which runs for a while and records when it
 * started and finished (W14), `bench.steps`, no-op durable steps (W15/steps), and `bench.await`,
 * which waits for an event and records when its resumed run started (W15/emit). Same code path
 * as a team's own entry file.
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

/**
 * `bench.hold` `{ms}`: sleeps `ms`, then records its start and finish (epoch ms, its own
 * clock) with its flow key in the unlogged `bench.spans` (W14 reads the overlap per key).
 */
export const holdTask: AnyTask = defineTask<{ ms: number }>({
  name: "bench.hold",
  parse(payload) {
    if (typeof payload.ms !== "number" || !(payload.ms >= 0 && payload.ms <= 60_000)) {
      throw new TypeError("ms must be a number of milliseconds from 0 to 60000");
    }
    return { ms: payload.ms };
  },
  async handler({ ms }, ctx) {
    const startedAt = performance.timeOrigin + performance.now();
    await new Promise((resolve) => setTimeout(resolve, ms));
    const finishedAt = performance.timeOrigin + performance.now();
    await ctx.db`
      insert into bench.spans (job_id, flow_key, started_at, finished_at)
      values (${ctx.job.id}::text, ${ctx.job.fairness_key}::text, ${startedAt}::float8,
              ${finishedAt}::float8)`;
  },
});

/**
 * `bench.steps` `{steps, checkpoint?}`: runs `steps` durable steps with no-op bodies, `s0`, `s1`,
 * ... (each a transaction recording its null result, fenced by the token; with `checkpoint:
 * true`, checkpoint steps, `{ transaction: false }`, whose records go in batches across the
 * consumer's runs): W15/steps and W15/steps/checkpoint time them.
 */
export const stepsTask: AnyTask = defineTask<{ steps: number; checkpoint: boolean }>({
  name: "bench.steps",
  parse(payload) {
    if (!Number.isInteger(payload.steps) || !((payload.steps as number) >= 1)) {
      throw new TypeError("steps must be an integer of at least 1");
    }
    const checkpoint = payload.checkpoint ?? false;
    if (typeof checkpoint !== "boolean") throw new TypeError("checkpoint must be true or false");
    return { steps: payload.steps as number, checkpoint };
  },
  async handler({ steps, checkpoint }, ctx) {
    for (let i = 0; i < steps; i++) {
      if (checkpoint) await ctx.step(`s${i}`, () => null, { transaction: false });
      else await ctx.step(`s${i}`, () => null);
    }
  },
});

/**
 * `bench.await` `{key}`: waits for the event `bench.go` with `key` (bench/events.ts, W15). The
 * run that finds it received takes its own clock first thing and records it in `bench.starts`
 * with the event payload's `t` (the emitter's clock just before emit_event); the first run
 * only hands the job back.
 */
export const awaitTask: AnyTask = defineTask<{ key: string }>({
  name: "bench.await",
  parse(payload) {
    if (typeof payload.key !== "string") throw new TypeError("key must be a string");
    return { key: payload.key };
  },
  async handler({ key }, ctx) {
    const startedAt = performance.timeOrigin + performance.now();
    const event = await ctx.waitForEvent<{ t: number }>("bench.go", { key });
    if (event.timedOut) throw new Error("bench.await has no timeout");
    await ctx.db`
      insert into bench.starts (job_id, fairness_key, enqueued_at, started_at)
      values (${ctx.job.id}::text, ${key}::text, ${event.payload.t}::float8,
              ${startedAt}::float8)`;
  },
});

if (import.meta.main) {
  Deno.exit(await main(Deno.args, { tasks: [stampTask, holdTask, stepsTask, awaitTask] }));
}
