/**
 * One execution as `shoal execution show ID` prints it: its status and key, its live jobs
 * (task, state, attempts), and for each job its recorded steps and sleeps and its last
 * progress report, then its jobs waiting on dependencies (held, not yet live) with the ids
 * they wait for. Every read is bounded: at most {@link MAX_SHOWN_JOBS} jobs (of each kind) and
 * {@link MAX_SHOWN_STEPS} records per job, each read one more than it shows to say when there
 * are more. The statements are the owning modules' (execution.ts, queue.ts, steps.ts).
 *
 * @module
 */
import { checkDb, checkId } from "./args.ts";
import type { Db } from "./db.ts";
import {
  type Execution,
  executionBarriers,
  getExecution,
  type HeldJob,
  listHeldJobs,
} from "./execution.ts";
import type { WrittenProgress } from "./progress.ts";
import { type JobListRow, listJobs, progressOf } from "./queue.ts";
import { listSteps, type StepRow } from "./steps.ts";

/** The most live jobs one view lists. */
export const MAX_SHOWN_JOBS = 50;
/** The most step and sleep records one view lists per job. */
export const MAX_SHOWN_STEPS = 20;

/** One live job of the execution, with its records and progress. */
export interface ExecutionJobView {
  id: string;
  task: string;
  queue: string;
  state: JobListRow["state"];
  attempts: number;
  max_attempts: number;
  run_at: Date;
  last_error: string | null;
  /** Its first {@link MAX_SHOWN_STEPS} step and sleep records, in the order recorded. */
  steps: StepRow[];
  /** True when it has more records than `steps` lists. */
  steps_capped: boolean;
  /** Its last progress report, or null when it never reported. */
  progress: WrittenProgress | null;
}

/** What `shoal execution show` prints (as JSON with --json). */
export interface ExecutionView {
  execution: Execution;
  /** Open fan-outs: children and arrivals. */
  barriers: { total: number; arrived: number }[];
  /** Its live jobs, newest first, at most {@link MAX_SHOWN_JOBS}. */
  jobs: ExecutionJobView[];
  /** True when it has more live jobs than `jobs` lists. */
  jobs_capped: boolean;
  /**
   * Its jobs waiting on dependencies (not live yet: released when the last one completes),
   * oldest first, at most {@link MAX_SHOWN_JOBS}, each with the ids it still waits for.
   */
  held: HeldJob[];
  /** True when it has more held jobs than `held` lists. */
  held_capped: boolean;
}

/** The execution `id` with its live jobs, their records and progress; null when there is none. */
export async function viewExecution(db: Db, id: string): Promise<ExecutionView | null> {
  checkDb("viewExecution", db);
  checkId("viewExecution", "id", id);
  const execution = await getExecution(db, id);
  if (execution === null) return null;
  const barriers = await executionBarriers(db, id);
  // Along jobs_execution_idx; one more than shown says whether there are more.
  const page = await listJobs(db, { executionId: id, limit: MAX_SHOWN_JOBS + 1 });
  const rows = page.rows.slice(0, MAX_SHOWN_JOBS);
  const progress = await progressOf(db, rows.map((j) => j.id));
  const jobs: ExecutionJobView[] = [];
  for (const j of rows) {
    const steps = await listSteps(db, j.id, { limit: MAX_SHOWN_STEPS + 1 });
    jobs.push({
      id: j.id,
      task: j.task,
      queue: j.queue,
      state: j.state,
      attempts: j.attempts,
      max_attempts: j.max_attempts,
      run_at: j.run_at,
      last_error: j.last_error,
      steps: steps.slice(0, MAX_SHOWN_STEPS),
      steps_capped: steps.length > MAX_SHOWN_STEPS,
      progress: progress.get(j.id) ?? null,
    });
  }
  const held = await listHeldJobs(db, id, MAX_SHOWN_JOBS + 1);
  return {
    execution,
    barriers,
    jobs,
    jobs_capped: page.rows.length > MAX_SHOWN_JOBS,
    held: held.slice(0, MAX_SHOWN_JOBS),
    held_capped: held.length > MAX_SHOWN_JOBS,
  };
}

/** A value on one line, cut to `max` characters. */
function oneLine(value: unknown, max = 80): string {
  const text = JSON.stringify(value) ?? "null";
  return text.length > max ? `${text.slice(0, max - 3)}...` : text;
}

/** A step, sleep or wait record on one line. */
function recordLine(s: StepRow): string {
  if (s.kind === "step") return `step ${s.name}: ${oneLine(s.result)}`;
  if (s.kind === "sleep") return `sleep ${s.name}: until ${s.wake_at?.toISOString() ?? "-"}`;
  const event = `event ${s.event_name}${s.event_key === "" ? "" : ` (key ${s.event_key})`}`;
  if (s.wait_state === "received") return `wait ${s.name}: received ${event}: ${oneLine(s.result)}`;
  if (s.wait_state === "timed_out") return `wait ${s.name}: timed out waiting for ${event}`;
  const until = s.wake_at === null ? "no timeout" : `times out at ${s.wake_at.toISOString()}`;
  return `wait ${s.name}: waiting for ${event}, ${until}`;
}

/** The view as text, one fact per line. */
export function formatExecutionView(view: ExecutionView): string {
  const e = view.execution;
  const lines = [
    `Execution ${e.id}: ${e.status}`,
    `  label:    ${e.label ?? "-"}`,
    `  key:      ${e.key ?? "-"}`,
    `  created:  ${e.created_at.toISOString()}`,
    `  started:  ${e.started_at?.toISOString() ?? "-"}`,
    `  finished: ${e.finished_at?.toISOString() ?? "-"}`,
  ];
  if (e.error !== null) lines.push(`  error:    ${e.error}`);
  if (e.result !== null) lines.push(`  result:   ${oneLine(e.result)}`);
  for (const b of view.barriers) lines.push(`  fan-out:  ${b.arrived}/${b.total} arrived`);
  if (view.jobs.length === 0) {
    lines.push("No live jobs.");
  } else {
    lines.push(
      view.jobs_capped
        ? `Live jobs (the newest ${MAX_SHOWN_JOBS}; it has more):`
        : `Live jobs (${view.jobs.length}):`,
    );
  }
  for (const j of view.jobs) {
    lines.push(
      `  job ${j.id}  ${j.task}  ${j.state}  attempt ${j.attempts}/${j.max_attempts}  on ${j.queue}`,
    );
    if (j.progress !== null) {
      const message = j.progress.message === null ? "" : ` ${j.progress.message}`;
      lines.push(`    progress ${j.progress.done}/${j.progress.total}${message}`);
    }
    if (j.last_error !== null) lines.push(`    last error: ${j.last_error}`);
    for (const s of j.steps) lines.push(`    ${recordLine(s)}`);
    if (j.steps_capped) lines.push(`    (the first ${MAX_SHOWN_STEPS} records; it has more)`);
  }
  if (view.held.length > 0) {
    lines.push(
      view.held_capped
        ? `Waiting on dependencies (the oldest ${MAX_SHOWN_JOBS}; it has more):`
        : `Waiting on dependencies (${view.held.length}):`,
    );
  }
  for (const h of view.held) {
    const on = h.waiting_on.length === 0 ? "-" : h.waiting_on.map((d) => `job ${d}`).join(", ");
    lines.push(`  job ${h.id}  ${h.task}  on ${h.queue}  waiting on ${on}`);
  }
  return lines.join("\n") + "\n";
}
