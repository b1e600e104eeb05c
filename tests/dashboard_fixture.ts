/**
 * A database with something on every dashboard page: live jobs in each state (ready,
 * scheduled, running, prefetched), dead jobs, a running execution with an open fan-out, a
 * schedule, a lease, a paused queue and a limit, and a running job of that execution with two
 * recorded steps, a durable sleep and a reported progress. The rows a consumer would leave (a claim, a
 * dead letter, a barrier) are written here directly, so the states hold still while a test
 * looks at them: no consumer runs.
 */
import type { Sql } from "../lib/db.ts";
import { enqueue, saveProgress } from "../lib/queue.ts";
import { startExecution } from "../lib/execution.ts";
import { upsertSchedule } from "../lib/schedule.ts";
import { acquire } from "../lib/lease.ts";
import { pauseQueue, setConcurrencyLimit } from "../lib/flow.ts";
import { recordStep } from "../lib/steps.ts";

export interface Seeded {
  ready: string;
  scheduled: string;
  running: string;
  prefetched: string;
  /** Dead jobs of queue "mail" (two) and "bill" (one). */
  dead: string[];
  /** A running execution with an open fan-out of 4 children, 1 arrived. */
  execution: string;
  /** A pending execution. */
  pendingExecution: string;
  schedule: string;
  pausedQueue: string;
  /** A running job of `execution` (queue "etl") with steps "extract", "load", sleep "cool-off". */
  withSteps: string;
}

/** The step result recorded for "extract": markup to escape and a credential to redact. */
export const STEP_RESULT = { rows: 1200, note: "<b>bold</b>", token: "step-secret-not-for-eyes" };

/** The progress reported for the job with steps. */
export const SEEDED_PROGRESS = { done: 30, total: 120, message: "copying <rows>" };

/** A payload carrying a credential the dashboard must not show, and markup it must escape. */
export const SECRET_PAYLOAD = {
  to: "<script>alert('x')</script>@example.com",
  headers: { Authorization: "Bearer sk-live-not-for-eyes" },
  api_key: 424242424242,
  url: "https://hooks.slack.com/services/T0/B0/not-for-eyes-either",
};

export async function seedDashboard(sql: Sql): Promise<Seeded> {
  const ready = await enqueue(sql, "mail.send", SECRET_PAYLOAD, { queue: "mail" });
  const scheduled = await enqueue(sql, "mail.send", { n: 2 }, {
    queue: "mail",
    runAt: new Date(Date.now() + 3_600_000),
    fairnessKey: "tenant-7",
  });
  const running = await enqueue(sql, "bill.charge", { n: 3 }, { queue: "bill", key: "inv-1" });
  const prefetched = await enqueue(sql, "bill.charge", { n: 4 }, { queue: "bill" });
  // Claimed by a consumer that is not there: deadline an hour away, so they stay claimed.
  await sql`
    update shoal.jobs
    set locked_by = 'host-a:1', locked_at = now(), run_at = now() + interval '1 hour',
        attempts = 1, token = token + 1,
        started_at = case when id = ${running}::bigint then now() end
    where id in (${running}::bigint, ${prefetched}::bigint)`;
  const dead: string[] = [];
  for (
    const [queue, task] of [["mail", "mail.send"], ["mail", "mail.send"], ["bill", "bill.charge"]]
  ) {
    const id = await enqueue(sql, task!, { dead: true }, { queue });
    await sql`
      with gone as (delete from shoal.jobs where id = ${id}::bigint returning *)
      insert into shoal.dead_jobs (id, queue, task, payload, priority, fairness_key, attempts,
        max_attempts, token, key, execution_id, errors, reason, created_at)
      select id, queue, task, payload, priority, fairness_key, 3, 3, token + 3, key,
        execution_id,
        jsonb_build_array(jsonb_build_object('attempt', 3, 'at', now(),
                                             'error', 'Error: SMTP said 550 <no>')),
        'attempts exhausted', created_at
      from gone`;
    dead.push(id);
  }
  const execution = await startExecution(sql, { task: "flow.start", queue: "flow" });
  await sql`
    update shoal.executions set status = 'running', started_at = now(), updated_at = now()
    where id = ${execution}::bigint`;
  await sql`
    insert into shoal.barriers (execution_id, total, remaining, callback, expires_at)
    values (${execution}::bigint, 4, 3, '{"task": "flow.done"}'::jsonb,
            now() + interval '1 hour')`;
  // A running job of the execution with steps, a sleep and a progress, written by the
  // functions a run uses (recordStep, saveProgress) under its claim's token.
  const withSteps = await enqueue(sql, "etl.run", { table: "orders" }, { queue: "etl" });
  const [claim] = await sql<{ token: string }[]>`
    update shoal.jobs
    set locked_by = 'host-a:1', locked_at = now(), run_at = now() + interval '1 hour',
        attempts = 1, token = token + 1, started_at = now(), execution_id = ${execution}::bigint
    where id = ${withSteps}::bigint
    returning token::text`;
  const job = { id: withSteps, token: claim!.token };
  await recordStep(sql, job, "extract", STEP_RESULT);
  await recordStep(sql, job, "load", 1200);
  await sql`
    insert into shoal.job_steps (job_id, name, kind, wake_at)
    values (${withSteps}::bigint, 'cool-off', 'sleep', '2030-01-02T03:04:05Z')`;
  await saveProgress(sql, [{ ...job, progress: SEEDED_PROGRESS }]);
  const pendingExecution = await startExecution(sql, { task: "flow.start", queue: "flow" });
  await upsertSchedule(sql, {
    name: "nightly-report",
    cron: "0 3 * * *",
    tz: "Europe/Paris",
    task: "report.build",
    queue: "reports",
  });
  await acquire(sql, { name: "reaper", holder: "host-a:1", ttlMs: 3_600_000 });
  await pauseQueue(sql, "reports");
  await setConcurrencyLimit(sql, { queue: "bill", maxRunning: 2 });
  return {
    ready,
    scheduled,
    running,
    prefetched,
    dead,
    execution,
    pendingExecution,
    schedule: "nightly-report",
    pausedQueue: "reports",
    withSteps,
  };
}
