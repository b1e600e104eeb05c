/**
 * A job's recorded steps and durable sleeps (`shoal.job_steps`, sql/020_steps.sql; issue 17).
 *
 * - A step (`ctx.step(name, fn)`) runs `fn` in a transaction that ends by recording the step's
 *   JSON result, fenced by the claim's token (the job row locked `for update` where id and token
 *   match): the step's writes and its record commit together or not at all. A later run of the
 *   same job (a retry, a redelivery, a wake from sleep) finds the record and returns its result
 *   without running `fn`.
 * - A sleep (`ctx.sleep(name, duration | Date)`) records its wake time and hands the job back
 *   with `run_at` at that time in one statement, fenced the same way, without counting an
 *   attempt. The run ends there; the job is claimed again once the time has come, and the same
 *   sleep then returns at once (the database's clock decides).
 *
 * Records are keyed by job id, which a job keeps through retries, redeliveries, sleeps and a
 * dead-letter retry. Nothing here runs on the ack path of a job without steps: records of jobs
 * that are gone are removed by the reaper (pruneSteps()).
 *
 * @module
 */
import { checkDb, checkId, checkInteger, isName, MAX_INT4, MAX_SPAN_MS, refusal } from "./args.ts";
import type { Db } from "./db.ts";
import { parseDuration } from "./duration.ts";
import type { JobRef } from "./queue.ts";
import { NAME_RULE } from "./names.ts";

/** Step records of a job that is gone are kept this long after their last record (then pruned). */
export const STEP_RETENTION_MS = 3_600_000;

/** Longest sleep: ten years, well inside what a timestamptz holds. */
export const MAX_SLEEP_MS = 10 * 365 * 86_400_000;

/** One recorded step or sleep of a job, as a run reads them. */
export interface RecordedStep {
  kind: "step" | "sleep";
  /** A step's result (JSON); null for a sleep. */
  result: unknown;
  /** A sleep's wake time; null for a step. */
  wake_at: Date | null;
  /** A sleep whose wake time has come, by the database's clock; false for a step. */
  due: boolean;
}

/** One row of listSteps(). */
export interface StepRow {
  name: string;
  kind: "step" | "sleep";
  result: unknown;
  wake_at: Date | null;
  recorded_at: Date;
}

/** Counts for `shoal status`. */
export interface StepTotals {
  /** Step and sleep records kept (of live jobs, and of gone ones until pruned). */
  records: number;
  /** Live jobs with at least one record. */
  jobs: number;
  /** Jobs handed back by a sleep whose wake time has not come. */
  sleeping: number;
  /** False when there were more than {@link STEP_TOTALS_CAP} records: the figures count those read. */
  exact: boolean;
}

/**
 * Most step records stepTotals() reads (the count rule in sql/functions/counts.sql: status
 * never scans a table that can grow without bound); past it, the figures are lower bounds.
 */
export const STEP_TOTALS_CAP = 10_000;

/** Throw unless `name` is a step or sleep name (the rule of queue and task names). */
export function checkStepName(fn: string, name: unknown): string {
  if (!isName(name)) throw refusal(`name for ${fn}()`, `a step name (${NAME_RULE})`, name);
  return name;
}

/** The job's records by name; a run reads them once, on its first step or sleep. */
export async function loadSteps(db: Db, jobId: string): Promise<Map<string, RecordedStep>> {
  const rows = await db<({ name: string } & RecordedStep)[]>`
    select s.name, s.kind, s.result, s.wake_at, coalesce(s.wake_at <= now(), false) as due
    from shoal.job_steps s where s.job_id = ${jobId}::bigint`;
  return new Map(rows.map(({ name, ...step }) => [name, step]));
}

/**
 * Record a step's result inside the step's transaction, where the job is still ours. Returns
 * "recorded", "lost" (the token moved on: roll back) or "duplicate" (this run recorded the
 * name already: two calls of one step at once).
 */
export async function recordStep(
  tx: Db,
  job: JobRef,
  name: string,
  result: unknown,
): Promise<"recorded" | "lost" | "duplicate"> {
  const [row] = await tx<{ ours: number; recorded: number }[]>`
    with ours as (
      select j.id from shoal.jobs j
      where j.id = ${job.id}::bigint and j.token = ${job.token}::bigint
      for update
    ),
    recorded as (
      insert into shoal.job_steps (job_id, name, kind, result)
      select o.id, ${name}::text, 'step', ${JSON.stringify(result ?? null)}::text::jsonb
      from ours o
      on conflict (job_id, name) do nothing
      returning 1
    )
    select (select count(*) from ours)::integer as ours,
           (select count(*) from recorded)::integer as recorded`;
  if (row!.ours === 0) return "lost";
  return row!.recorded === 1 ? "recorded" : "duplicate";
}

/** When a sleep ends: at an instant, or a duration after the database's now. */
export type Wake = { at: Date } | { ms: number };

/**
 * Record a sleep (or keep the wake time it already has) and hand the job back until then, in
 * one statement fenced by the token: unlocked, the token moved on (so the run that slept cannot
 * write again), the claim's attempt given back (a sleep is not a failed run), visible at the
 * wake time, with the wake announced (sql/functions/wake.sql) and its concurrency slot freed.
 * Returns the wake time, or null when the claim was no longer ours (nothing changed).
 */
export async function suspendJob(
  db: Db,
  job: JobRef,
  name: string,
  wake: Wake,
): Promise<Date | null> {
  const at = "at" in wake ? wake.at : null;
  const ms = "ms" in wake ? Math.round(wake.ms) : null;
  const [row] = await db<{ wake_at: Date | null }[]>`
    with ours as (
      select j.id from shoal.jobs j
      where j.id = ${job.id}::bigint and j.token = ${job.token}::bigint
      for update
    ),
    slept as (
      insert into shoal.job_steps as s (job_id, name, kind, wake_at)
      select o.id, ${name}::text, 'sleep',
        coalesce(${at}::timestamptz, now() + ${ms}::bigint * interval '1 ms')
      from ours o
      on conflict (job_id, name) do update set wake_at = s.wake_at
      returning s.job_id, s.wake_at
    ),
    suspended as (
      update shoal.jobs j
      set locked_by = null, locked_at = null, started_at = null, token = j.token + 1,
          attempts = greatest(j.attempts - 1, 0), run_at = s.wake_at
      from slept s where j.id = s.job_id
      returning j.queue, j.run_at, coalesce(j.concurrency_key, j.fairness_key) as flow_key
    ),
    woken as (
      select shoal.notify_jobs(array_agg(x.queue), array_agg(x.run_at)) from suspended x
    ),
    freed as (
      select shoal.slots_freed(array_agg(x.queue), array_agg(x.flow_key)) from suspended x
    )
    -- (the joins make the notify and the slot release run: a WITH select runs when referenced)
    select (select x.run_at from suspended x) as wake_at,
      (select count(*) from woken) as woken, (select count(*) from freed) as freed`;
  return row!.wake_at;
}

/** When a sleep given as a duration ("2d"), milliseconds or an instant ends; else a TypeError. */
export function wakeOf(until: unknown): Wake {
  if (until instanceof Date) {
    if (Number.isNaN(until.getTime())) {
      throw new TypeError("Invalid until for ctx.sleep(): an invalid Date");
    }
    return { at: until };
  }
  if (typeof until === "string") {
    try {
      return { ms: parseDuration(until) };
    } catch (cause) {
      throw new TypeError(`Invalid until for ctx.sleep(): ${(cause as Error).message}`, { cause });
    }
  }
  if (typeof until === "number" && until >= 0 && until <= MAX_SLEEP_MS) return { ms: until };
  throw new TypeError(
    `Invalid until for ctx.sleep(): expected a duration ("2d"), milliseconds from 0 to ${MAX_SLEEP_MS} or a Date, got ${
      typeof until === "number" ? until : typeof until
    }`,
  );
}

/**
 * A job's recorded steps and sleeps, in the order they were recorded (the dashboard's view),
 * the first `options.limit` of them when given (the dashboard reads a bounded page).
 */
export async function listSteps(
  db: Db,
  jobId: string,
  options: { limit?: number } = {},
): Promise<StepRow[]> {
  checkDb("listSteps", db);
  checkId("listSteps", "jobId", jobId);
  const limit = options.limit ?? null;
  if (limit !== null) checkInteger("listSteps", "options.limit", limit, { min: 1, max: MAX_INT4 });
  return [
    ...await db<StepRow[]>`
      select s.name, s.kind, s.result, s.wake_at, s.recorded_at
      from shoal.job_steps s where s.job_id = ${jobId}::bigint
      order by s.recorded_at, s.name
      limit ${limit}::integer`,
  ];
}

/** The most jobs {@link stepCounts} takes in one call. */
export const MAX_STEP_COUNT_JOBS = 1000;

/** How many steps and sleeps each job has recorded, for a page of jobs (the dashboard's). */
export interface JobStepCount {
  steps: number;
  sleeps: number;
}

/**
 * The step and sleep counts of up to {@link MAX_STEP_COUNT_JOBS} jobs, by job id (jobs without
 * a record are absent): one statement along the primary key (job_id, name).
 */
export async function stepCounts(
  db: Db,
  jobIds: readonly string[],
): Promise<Map<string, JobStepCount>> {
  checkDb("stepCounts", db);
  if (jobIds.length > MAX_STEP_COUNT_JOBS) {
    throw refusal("jobIds for stepCounts()", `at most ${MAX_STEP_COUNT_JOBS} ids`, jobIds.length);
  }
  jobIds.forEach((id, i) => checkId("stepCounts", `jobIds[${i}]`, id));
  if (jobIds.length === 0) return new Map();
  const rows = await db<({ job_id: string } & JobStepCount)[]>`
    select s.job_id::text as job_id,
      count(*) filter (where s.kind = 'step')::integer as steps,
      count(*) filter (where s.kind = 'sleep')::integer as sleeps
    from shoal.job_steps s where s.job_id = any(${jobIds as string[]}::bigint[])
    group by s.job_id`;
  return new Map(rows.map((r) => [r.job_id, { steps: r.steps, sleeps: r.sleeps }]));
}

/** Counts of step records for `shoal status`. */
export async function stepTotals(db: Db): Promise<StepTotals> {
  const [row] = await db<(Omit<StepTotals, "exact"> & { read: number })[]>`
    select count(*)::integer as read, least(count(*), ${STEP_TOTALS_CAP}::integer)::integer as records,
      count(distinct s.job_id) filter (
        where exists (select 1 from shoal.jobs j where j.id = s.job_id))::integer as jobs,
      count(*) filter (
        where s.kind = 'sleep' and s.wake_at > now()
          and exists (select 1 from shoal.jobs j where j.id = s.job_id and j.locked_by is null
                      and j.run_at = s.wake_at))::integer as sleeping
    from (select * from shoal.job_steps limit ${STEP_TOTALS_CAP + 1}::integer) s`;
  return {
    records: row!.records,
    jobs: row!.jobs,
    sleeping: row!.sleeping,
    exact: row!.read <= STEP_TOTALS_CAP,
  };
}

/** Whether any records of gone jobs are past their retention (the reaper's cheap check). */
export async function hasStaleSteps(
  db: Db,
  olderThanMs: number = STEP_RETENTION_MS,
): Promise<boolean> {
  const [row] = await db<{ found: boolean }[]>`
    select exists (${staleSteps(db, olderThanMs, 1)}) as found`;
  return row!.found;
}

/**
 * Remove the records of jobs that are gone (neither live nor dead-lettered) recorded more than
 * `olderThanMs` ago, the jobs of at most `limit` such records. Returns how many rows went.
 */
export async function pruneSteps(
  db: Db,
  options: { olderThanMs?: number; limit: number },
): Promise<number> {
  checkDb("pruneSteps", db);
  const olderThanMs = options.olderThanMs ?? STEP_RETENTION_MS;
  checkInteger("pruneSteps", "options.olderThanMs", olderThanMs, { min: 0, max: MAX_SPAN_MS });
  checkInteger("pruneSteps", "options.limit", options.limit, { min: 1, max: MAX_INT4 });
  const [row] = await db<{ n: number }[]>`
    with gone as (${staleSteps(db, olderThanMs, options.limit)}),
    removed as (
      delete from shoal.job_steps s where s.job_id in (select g.job_id from gone g)
      returning 1
    )
    select count(*)::integer as n from removed`;
  return row!.n;
}

/**
 * Ids of gone jobs (neither live nor dead-lettered) with records older than `olderThanMs`,
 * oldest first, at most `limit` records' worth: a fragment for a subquery. A gone job records
 * nothing new (a record needs its live claim), so its newer records go with it.
 */
function staleSteps(db: Db, olderThanMs: number, limit: number) {
  return db`
    select distinct x.job_id from (
      select s.job_id from shoal.job_steps s
      where s.recorded_at < now() - ${olderThanMs}::bigint * interval '1 ms'
        and not exists (select 1 from shoal.jobs j where j.id = s.job_id)
        and not exists (select 1 from shoal.dead_jobs d where d.id = s.job_id)
      order by s.recorded_at
      limit ${limit}::integer) x`;
}
