/**
 * Executions, `shoal.executions`: the workflow runs users care about. Status moves
 * pending -> running -> completed | failed | cancelled (the table refuses anything else:
 * the trigger function shoal.check_execution_transition in sql/functions/workflow.sql).
 * The statements that start, read, cancel, fail and list executions are here (job
 * statements elsewhere only check an execution's status); the SQL functions behind them,
 * shoal.start_execution, shoal.cancel_execution and shoal.fail_execution, are in
 * sql/functions/workflow.sql.
 *
 * An execution may carry a key (idempotent start, migration 023): startExecution() with a key
 * already held returns the holder, running or ended; releaseExecutionKeys() (the reaper's
 * execution-keys sweep) frees the keys of executions ended longer than the retention ago.
 *
 * An execution also fails without any call from here: when one of its jobs is
 * dead-lettered (attempts spent, a permanent failure, or a poison job at claim), the
 * trigger function shoal.on_job_dead in sql/functions/workflow.sql (trigger
 * dead_jobs_fail_execution, after each insert into `shoal.dead_jobs`) calls
 * shoal.fail_execution with the job's reason, in the same transaction as the dead-letter
 * move.
 *
 * Workflows (startWorkflow(), `shoal.start_workflow`) and jobs enqueued `after` others
 * (lib/queue.ts, `shoal.enqueue_after`) are executions whose jobs wait for others of them:
 * the tables `shoal.held_jobs`, `shoal.job_dependencies` and `shoal.job_results`
 * (sql/024_dependencies.sql) are written only by the SQL functions of
 * sql/functions/workflow.sql ("Dependencies"), on enqueue, completion, dead-lettering and
 * the execution's end; no TypeScript statement touches them.
 *
 * @module
 */
import {
  checkDb,
  checkId,
  checkInteger,
  checkObject,
  checkOneOf,
  checkOptions,
  isName,
  MAX_INT4,
  refusal,
} from "./args.ts";
import { type Db, keysetPage } from "./db.ts";
import {
  type CheckedJob,
  checkJobSpec,
  JobArgs,
  type JobSpec,
  MAX_DEPENDENCIES,
  type TaskJobSpec,
} from "./queue.ts";
import { checkExecutionKey, DEFAULT_MAX_PAYLOAD_BYTES } from "./names.ts";

/** How startExecution()'s messages name its job's fields (`job.payload`). */
const START = new JobArgs("startExecution");

export type ExecutionStatus = "pending" | "running" | "completed" | "failed" | "cancelled";

export interface Execution {
  id: string;
  status: ExecutionStatus;
  label: string | null;
  /** Its key (idempotent start), or null: none given, or released past its retention. */
  key: string | null;
  error: string | null;
  result: unknown;
  created_at: Date;
  updated_at: Date;
  started_at: Date | null;
  finished_at: Date | null;
}

/** An execution as `shoal status` shows it, with its open fan-outs' progress. */
export interface ExecutionSummary {
  id: string;
  status: ExecutionStatus;
  label: string | null;
  created_at: Date;
  updated_at: Date;
  error: string | null;
  /** Open barriers (fan-outs still waiting for children): total children and arrivals. */
  barriers: { total: number; arrived: number }[];
}

/** startExecution()'s options. */
export interface StartExecutionOptions {
  /** Payload size limit in bytes (default 1 MiB). */
  maxPayloadBytes?: number;
  /**
   * The execution's key (idempotent start, `order-42`): while an execution with this key is
   * pending or running, and after it ended until the reaper releases the key (the
   * execution-key retention, 24 h by default), a start with it returns that execution
   * instead of starting another. 1 to 512 printable characters.
   */
  key?: string;
}

/** What a start with a key returns: the execution, and whether this call started it. */
export interface StartedExecution {
  id: string;
  /** False when the key was held: `id` is the execution that holds it. */
  created: boolean;
}

/**
 * Start an execution with its first job. The job names its task or carries its definition,
 * as enqueueMany's do, and takes every enqueue option but a dedupe key (a key already held
 * would leave the execution without its job): that is a TypeError. A queue or max attempts
 * not given is the definition's, else the task's in the catalog, as for enqueue().
 *
 * Without `options.key` it returns the new execution's id. With one it returns
 * `{ id, created }`: the execution holding the key (`created: false`) or the one started
 * now. Concurrent starts of one key from any number of connections start one execution;
 * the others wait for its transaction and get its id.
 */
export async function startExecution<T extends JobSpec | TaskJobSpec>(
  db: Db,
  job: CheckedJob<T>,
  options: StartExecutionOptions & { key: string },
): Promise<StartedExecution>;
export async function startExecution<T extends JobSpec | TaskJobSpec>(
  db: Db,
  job: CheckedJob<T>,
  options?: StartExecutionOptions & { key?: undefined },
): Promise<string>;
export async function startExecution<T extends JobSpec | TaskJobSpec>(
  db: Db,
  job: CheckedJob<T>,
  options: StartExecutionOptions = {},
): Promise<string | StartedExecution> {
  checkDb("startExecution", db);
  checkObject("startExecution", "job", job, { what: "a job ({ task, payload?, ... })" });
  checkOptions("startExecution", options, "options", ["maxPayloadBytes", "key"]);
  checkInteger("startExecution", "options.maxPayloadBytes", options.maxPayloadBytes, {
    min: 1,
    max: MAX_INT4,
    optional: true,
  });
  const key = options.key === undefined
    ? null
    : checkExecutionKey("options.key for startExecution()", options.key);
  if (job.key !== undefined) {
    throw new TypeError(
      "Invalid job.key for startExecution(): an execution's first job cannot take a dedupe key" +
        " (to start an execution once per key, pass options.key)",
    );
  }
  const row = checkJobSpec(job, options.maxPayloadBytes ?? DEFAULT_MAX_PAYLOAD_BYTES, START);
  const [result] = await db<{ id: string; created: boolean }[]>`
    select r.id, r.created from shoal.start_execution_result(
      ${(row.queue as string | undefined) ?? null}::text, ${row.task as string}::text,
      ${JSON.stringify(row.payload)}::text::jsonb,
      priority => ${(row.priority as number | undefined) ?? 0}::integer,
      fairness_key => ${(row.fairness_key as string | undefined) ?? null}::text,
      max_attempts => ${(row.max_attempts as number | undefined) ?? null}::integer,
      run_at => ${(row.run_at as string | undefined) ?? null}::timestamptz,
      traceparent => ${(row.traceparent as string | undefined) ?? null}::text,
      key => ${key}::text) r`;
  if (key === null) return result!.id;
  return { id: result!.id, created: result!.created };
}

/** One step of a workflow: a job (as startExecution() takes it) with a name and dependencies. */
export type WorkflowStep = (JobSpec | TaskJobSpec) & {
  /** The step's name in the workflow: 1 to 128 letters, digits or `_.:-`. */
  id: string;
  /** Names of the steps that must complete before this one runs; none: it runs at once. */
  after?: readonly string[];
  /**
   * When a step it depends on fails for good: `"fail"` (the default) fails the execution;
   * `"run"` runs this step anyway, the failure in `payload.dependency_errors`.
   */
  onDependencyFailure?: "fail" | "run";
};

export interface WorkflowSpec {
  /** 1 to 1,000 steps; each receives the results of its `after` steps in `payload.dependencies`. */
  steps: readonly WorkflowStep[];
  /** Shown for the execution in `shoal status` (default: the first step's task). */
  label?: string;
}

/** The most steps one workflow may declare (`shoal.start_workflow` checks the same). */
export const MAX_WORKFLOW_STEPS = 1000;

/** How startWorkflow()'s messages name a step's fields (`steps[2].payload`). */
const WORKFLOW = new JobArgs("startWorkflow");

/**
 * Start a workflow: an execution of steps that each run once the steps named in their
 * `after` have completed, receiving those steps' results in `payload.dependencies` (keyed by
 * step name). Steps without `after` are enqueued at once; the others are not claimable until
 * their last dependency completes. Returns the execution id. The whole workflow is refused
 * with one line when a step is invalid, two steps share an id, a step names an unknown step,
 * or the steps form a cycle (`shoal.start_workflow`, sql/functions/workflow.sql). A step takes
 * every enqueue option but a dedupe key and `runAt`.
 *
 * ```ts
 * await startWorkflow(db, { steps: [
 *   { id: "fetch", task: "report.fetch", payload: { day } },
 *   { id: "sum", task: "report.sum", after: ["fetch"] }, // payload.dependencies.fetch
 * ] });
 * ```
 */
export async function startWorkflow(
  db: Db,
  spec: WorkflowSpec,
  options: { maxPayloadBytes?: number } = {},
): Promise<string> {
  const fn = "startWorkflow";
  checkDb(fn, db);
  checkObject(fn, "spec", spec, { what: "a workflow ({ steps: [...] })" });
  checkOptions(fn, options);
  checkInteger(fn, "options.maxPayloadBytes", options.maxPayloadBytes, {
    min: 1,
    max: MAX_INT4,
    optional: true,
  });
  const { steps, label } = spec;
  if (!Array.isArray(steps) || steps.length === 0 || steps.length > MAX_WORKFLOW_STEPS) {
    throw refusal(`spec.steps for ${fn}()`, `an array of 1 to ${MAX_WORKFLOW_STEPS} steps`, steps);
  }
  if (label !== undefined && (typeof label !== "string" || label.length > 200)) {
    throw refusal(`spec.label for ${fn}()`, "a string of at most 200 characters", label);
  }
  const maxBytes = options.maxPayloadBytes ?? DEFAULT_MAX_PAYLOAD_BYTES;
  const rows = steps.map((step, i) => checkStep(step, i, maxBytes));
  const [row] = await db<{ id: string }[]>`
    select shoal.start_workflow(${JSON.stringify(rows)}::text::jsonb,
                                ${label ?? null}::text) as id`;
  return row!.id;
}

/** One step of startWorkflow() checked, as `shoal.start_workflow` takes it. */
function checkStep(step: WorkflowStep, i: number, maxBytes: number): Record<string, unknown> {
  const at = `spec.steps[${i}]`;
  checkObject("startWorkflow", at, step, { what: "a step ({ id, task, payload?, after?, ... })" });
  const { id, after, onDependencyFailure, ...job } = step;
  if (typeof id !== "string" || !isName(id)) {
    throw refusal(`${at}.id for startWorkflow()`, "a name of 1 to 128 letters, digits or _.:-", id);
  }
  if (
    after !== undefined &&
    (!Array.isArray(after) || after.length > MAX_DEPENDENCIES ||
      !after.every((ref) => typeof ref === "string"))
  ) {
    throw refusal(`${at}.after for startWorkflow()`, "an array of step ids", after);
  }
  if (
    onDependencyFailure !== undefined && onDependencyFailure !== "fail" &&
    onDependencyFailure !== "run"
  ) {
    throw refusal(
      `${at}.onDependencyFailure for startWorkflow()`,
      '"fail" or "run"',
      onDependencyFailure,
    );
  }
  for (const field of ["key", "runAt"] as const) {
    if (job[field] !== undefined) {
      throw new TypeError(
        `Invalid ${at}.${field} for startWorkflow(): a workflow step takes no ${field}`,
      );
    }
  }
  WORKFLOW.index = i;
  const row = checkJobSpec(job as JobSpec, maxBytes, WORKFLOW);
  row.id = id;
  if (after !== undefined && after.length > 0) row.after = after;
  if (onDependencyFailure !== undefined) row.on_dependency_failure = onDependencyFailure;
  return row;
}

export async function getExecution(db: Db, id: string): Promise<Execution | null> {
  checkDb("getExecution", db);
  checkId("getExecution", "id", id);
  const [row] = await db<Execution[]>`
    select id, status, label, key, error, result, created_at, updated_at, started_at,
      finished_at
    from shoal.executions where id = ${id}::bigint`;
  return row ?? null;
}

/**
 * Cancel an execution: it becomes cancelled, its pending jobs go, and its running
 * handlers are aborted at their next heartbeat. False when it was not pending or running.
 */
export async function cancelExecution(db: Db, id: string): Promise<boolean> {
  checkDb("cancelExecution", db);
  checkId("cancelExecution", "id", id);
  const [row] = await db<{ cancelled: boolean }[]>`
    select shoal.cancel_execution(${id}::bigint) as cancelled`;
  return row!.cancelled;
}

/** Mark an execution failed and tear down what it holds (its jobs, barriers, arrivals). */
export async function failExecution(db: Db, id: string, reason: string): Promise<boolean> {
  const [row] = await db<{ failed: boolean }[]>`
    select shoal.fail_execution(${id}::bigint, ${reason}::text) as failed`;
  return row!.failed;
}

/** The most recent executions, newest first, with their open barriers' progress. */
export async function listExecutions(
  db: Db,
  options: { limit?: number } = {},
): Promise<ExecutionSummary[]> {
  checkDb("listExecutions", db);
  checkOptions("listExecutions", options);
  checkInteger("listExecutions", "options.limit", options.limit, {
    min: 1,
    max: MAX_INT4,
    optional: true,
  });
  return await db<ExecutionSummary[]>`
    select e.id, e.status, e.label, e.created_at, e.updated_at, e.error,
      coalesce((select jsonb_agg(jsonb_build_object(
                  'total', b.total, 'arrived', b.total - b.remaining) order by b.id)
                from shoal.barriers b where b.execution_id = e.id), '[]'::jsonb) as barriers
    from shoal.executions e
    order by e.created_at desc, e.id desc
    limit ${options.limit ?? 20}::integer`;
}

/**
 * A page of executions, newest first by id, keyset-paginated (`beforeId`), optionally of one
 * status, with their open barriers' progress. Bounded: at most `scan` executions read along
 * the primary key, then filtered by status, as lib/queue.ts listJobs() does.
 */
export async function listExecutionsPage(
  db: Db,
  options: { status?: ExecutionStatus; beforeId?: string; limit?: number; scan?: number } = {},
): Promise<{ rows: ExecutionSummary[]; next: string | null }> {
  const fn = "listExecutionsPage";
  checkDb(fn, db);
  checkOptions(fn, options, "options", ["status", "beforeId", "limit", "scan"]);
  checkOneOf(fn, "options.status", options.status, EXECUTION_STATUSES, { optional: true });
  if (options.beforeId !== undefined) checkId(fn, "options.beforeId", options.beforeId);
  checkInteger(fn, "options.limit", options.limit, { min: 1, max: 1000, optional: true });
  checkInteger(fn, "options.scan", options.scan, { min: 1, max: 1_000_000, optional: true });
  const limit = options.limit ?? 50;
  const scan = options.scan ?? 10_000;
  const rows = await db<(ExecutionSummary & { scanned_to: string | null; scanned: number })[]>`
    with window_ as (
      select e.id, e.status, e.label, e.created_at, e.updated_at, e.error
      from shoal.executions e
      ${options.beforeId === undefined ? db`` : db`where e.id < ${options.beforeId}::bigint`}
      order by e.id desc
      limit ${scan}::integer
    ),
    bounds as (select min(id) as scanned_to, count(*)::integer as scanned from window_)
    select w.*, b.scanned_to, b.scanned,
      coalesce((select jsonb_agg(jsonb_build_object(
                  'total', x.total, 'arrived', x.total - x.remaining) order by x.id)
                from shoal.barriers x where x.execution_id = w.id), '[]'::jsonb) as barriers
    from bounds b left join lateral (
      select * from window_ w
      ${options.status === undefined ? db`` : db`where w.status = ${options.status}::text`}
      order by w.id desc
      limit ${limit}::integer
    ) w on true`;
  return keysetPage(rows, limit, scan);
}

/** Every status an execution can have. */
export const EXECUTION_STATUSES: readonly ExecutionStatus[] = [
  "pending",
  "running",
  "completed",
  "failed",
  "cancelled",
];

/** A job held until its dependencies complete (`shoal.held_jobs`), as views show it. */
export interface HeldJob {
  id: string;
  task: string;
  queue: string;
  /** The ids of its dependencies that have not finished yet, in id order. */
  waiting_on: string[];
}

/**
 * The jobs of execution `id` held on their dependencies, oldest first, at most `limit`
 * (along held_jobs_execution_idx and the edges' dependant index).
 */
export async function listHeldJobs(db: Db, id: string, limit: number): Promise<HeldJob[]> {
  checkDb("listHeldJobs", db);
  checkId("listHeldJobs", "id", id);
  checkInteger("listHeldJobs", "limit", limit, { min: 1, max: 1000 });
  return [
    ...await db<HeldJob[]>`
      select h.id::text as id, h.job->>'task' as task, h.job->>'queue' as queue,
        coalesce((select array_agg(d.dependency_id::text order by d.dependency_id)
                  from shoal.job_dependencies d
                  where d.dependant_id = h.id
                    and not exists (select 1 from shoal.job_results r
                                    where r.job_id = d.dependency_id)), '{}') as waiting_on
      from shoal.held_jobs h
      where h.execution_id = ${id}::bigint
      order by h.id
      limit ${limit}::integer`,
  ];
}

/** Jobs waiting on dependencies, by queue, for `shoal status`. */
export interface HeldTotals {
  queues: { queue: string; jobs: number }[];
  /** False when there were more than {@link HELD_TOTALS_CAP} held jobs: the counts are of those read. */
  exact: boolean;
}

/**
 * Most held jobs heldTotals() reads (the count rule of sql/functions/counts.sql: status never
 * scans a table that can grow without bound); past it, the counts are lower bounds.
 */
export const HELD_TOTALS_CAP = 10_000;

/** Jobs held on their dependencies, by queue, counting at most {@link HELD_TOTALS_CAP}. */
export async function heldTotals(db: Db): Promise<HeldTotals> {
  checkDb("heldTotals", db);
  const rows = await db<{ queue: string; jobs: number }[]>`
    select h.job->>'queue' as queue, count(*)::integer as jobs
    from (select job from shoal.held_jobs limit ${HELD_TOTALS_CAP + 1}::integer) h
    group by 1 order by 1`;
  const read = rows.reduce((n, r) => n + r.jobs, 0);
  return { queues: [...rows], exact: read <= HELD_TOTALS_CAP };
}

/** The most open barriers executionBarriers() reads of one execution. */
export const MAX_LISTED_BARRIERS = 100;

/**
 * An execution's open barriers (fan-outs still waiting): children and arrivals, in order, the
 * first {@link MAX_LISTED_BARRIERS} (an execution whose jobs each fan out may hold thousands).
 */
export async function executionBarriers(
  db: Db,
  id: string,
): Promise<{ total: number; arrived: number }[]> {
  checkDb("executionBarriers", db);
  checkId("executionBarriers", "id", id);
  return await db<{ total: number; arrived: number }[]>`
    select b.total, b.total - b.remaining as arrived
    from shoal.barriers b where b.execution_id = ${id}::bigint order by b.id
    limit ${MAX_LISTED_BARRIERS}`;
}

/** How long an ended execution keeps its key by default (the tombstone's window). */
export const DEFAULT_EXECUTION_KEY_RETENTION_MS = 24 * 3_600_000;

/** Whether any ended execution holds its key past `olderThanMs` (the reaper's cheap check). */
export async function hasExpiredExecutionKeys(db: Db, olderThanMs: number): Promise<boolean> {
  const [row] = await db<{ found: boolean }[]>`
    select exists (
      select 1 from shoal.executions
      where key is not null and finished_at is not null
        and finished_at < now() - ${olderThanMs}::bigint * interval '1 millisecond'
    ) as found`;
  return row!.found;
}

/**
 * Release the keys of executions that ended more than `olderThanMs` ago, oldest end first, at
 * most `limit`: a start with such a key then starts a new execution. The execution stays, without
 * its key. Reads along the partial index executions_key_ended (023). Returns how many.
 */
export async function releaseExecutionKeys(
  db: Db,
  options: { olderThanMs: number; limit: number },
): Promise<number> {
  const rows = await db`
    update shoal.executions x set key = null
    where x.id in (
      select e.id from shoal.executions e
      where e.key is not null and e.finished_at is not null
        and e.finished_at < now() - ${options.olderThanMs}::bigint * interval '1 millisecond'
      order by e.finished_at
      limit ${options.limit}::integer
      for update skip locked)
    returning x.id`;
  return rows.length;
}
