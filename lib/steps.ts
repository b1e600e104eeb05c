/**
 * A job's recorded steps and durable sleeps (`shoal.job_steps`, sql/020_steps.sql; issue 17).
 *
 * - A step (`ctx.step(name, fn)`) runs `fn` in a transaction that ends by recording the step's
 *   JSON result, fenced by the claim's token (the job row locked `for update` where id and token
 *   match): the step's writes and its record commit together or not at all. A later run of the
 *   same job (a retry, a redelivery, a wake from sleep) finds the record and returns its result
 *   without running `fn`. The record's statement is `shoal.record_step_result`
 *   (sql/functions/steps.sql), which workers in other languages call too, with
 *   `shoal.step_result` to read a step (docs/workflows.md "From SQL (any language)").
 * - A sleep (`ctx.sleep(name, duration | Date)`) records its wake time and hands the job back
 *   with `run_at` at that time in one statement, fenced the same way, without counting an
 *   attempt. The run ends there; the job is claimed again once the time has come, and the same
 *   sleep then returns at once (the database's clock decides).
 *
 * - A wait for an event (`ctx.waitForEvent(name, { key, timeout })`, lib/events.ts) is a record
 *   of kind `wait`: `waiting` while the job is handed back, then once `received` (with the
 *   event's payload) or `timed_out`. Its statements are here; lib/events.ts runs them in order.
 *
 * Records are keyed by job id, which a job keeps through retries, redeliveries, sleeps and a
 * dead-letter retry. Nothing here runs on the ack path of a job without steps: records of jobs
 * that are gone are removed by the reaper (pruneSteps()).
 *
 * @module
 */
import { checkDb, checkId, checkInteger, isName, MAX_INT4, MAX_SPAN_MS, refusal } from "./args.ts";
import type { Db, Sql } from "./db.ts";
import { parseDuration } from "./duration.ts";
import { type JobRef, lockOurs, suspendClaim } from "./queue.ts";
import { completeJobsFragment, type Completion } from "./barrier.ts";
import { NAME_RULE } from "./names.ts";

/** Step records of a job that is gone are kept this long after their last record (then pruned). */
export const STEP_RETENTION_MS = 3_600_000;

/** Longest sleep: ten years, well inside what a timestamptz holds. */
export const MAX_SLEEP_MS = 10 * 365 * 86_400_000;

/** The kinds of record: a step, a durable sleep, a wait for an event. */
export type StepKind = "step" | "sleep" | "wait";

/** Where a wait for an event is: handed back, or done once (received or timed out). */
export type WaitState = "waiting" | "received" | "timed_out";

/** One recorded step, sleep or wait of a job, as a run reads them. */
export interface RecordedStep {
  kind: StepKind;
  /** A step's result (JSON); a received wait's event payload; else null. */
  result: unknown;
  /** A sleep's wake time, a wait's timeout (null: none); null for a step. */
  wake_at: Date | null;
  /** A sleep or wait whose wake time has come, by the database's clock; false for a step. */
  due: boolean;
  /** A wait's state, event name and key; null for a step or sleep. */
  wait_state: WaitState | null;
  event_name: string | null;
  event_key: string | null;
}

/** One row of listSteps(). */
export interface StepRow {
  name: string;
  kind: StepKind;
  result: unknown;
  wake_at: Date | null;
  recorded_at: Date;
  /** A wait's state, event name and key; null for a step or sleep. */
  wait_state: WaitState | null;
  event_name: string | null;
  event_key: string | null;
}

/** Counts for `shoal status`. */
export interface StepTotals {
  /** Step and sleep records kept (of live jobs, and of gone ones until pruned). */
  records: number;
  /** Live jobs with at least one record. */
  jobs: number;
  /** Jobs handed back by a sleep whose wake time has not come. */
  sleeping: number;
  /** Jobs handed back by a wait for an event that has neither come nor timed out. */
  waiting: number;
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
    select s.name, s.kind, s.result, s.wake_at, coalesce(s.wake_at <= now(), false) as due,
      s.wait_state, s.event_name, s.event_key
    from shoal.job_steps s where s.job_id = ${jobId}::bigint`;
  return new Map(rows.map(({ name, ...step }) => [name, step]));
}

/**
 * The SQLSTATE of a step read or record whose claim is no longer current
 * (sql/functions/steps.sql): the job's token moved on, or the job is gone.
 */
export const LOST_CLAIM_SQLSTATE = "SH003";

/**
 * Record a step's result inside the step's transaction, where the job is still ours, through
 * `shoal.record_step_result` (sql/functions/steps.sql: the one home of the statement, shared
 * with workers in other languages). Returns "recorded", "lost" (the token moved on: roll back;
 * the transaction is aborted by then) or "duplicate" (the name was recorded already: two calls
 * of one step at once).
 */
export async function recordStep(
  tx: Db,
  job: JobRef,
  name: string,
  result: unknown,
): Promise<"recorded" | "lost" | "duplicate"> {
  try {
    const [row] = await tx<{ created: boolean }[]>`
      select r.created from shoal.record_step_result(${job.id}::bigint, ${job.token}::bigint,
        ${name}::text, ${JSON.stringify(result ?? null)}::text::jsonb) r`;
    return row!.created ? "recorded" : "duplicate";
  } catch (error) {
    if ((error as { code?: unknown }).code === LOST_CLAIM_SQLSTATE) return "lost";
    throw error;
  }
}

/** One checkpoint step's record (ctx.step with `{ transaction: false }`), as the batcher sends it. */
export interface CheckpointRecord {
  job: JobRef;
  name: string;
  /** The step's result, as JSON already (the run checked it). */
  result: unknown;
}

/**
 * Record many jobs' checkpoint steps in one statement (lib/checkpoints.ts batches them): each
 * record is written only where its job's id and token still match (the job rows locked
 * `for update` in id order by lib/queue.ts lockOurs(), as the completer's acks are). Returns one
 * outcome per record, in order, with recordStep()'s meaning: "recorded", "lost" (the token moved
 * on: nothing written) or "duplicate" (a record of that name existed already).
 *
 * `completions` (jobs of executions that finished, from the completer) complete in the same
 * statement, so in the same commit (lib/barrier.ts completeJobsFragment(): the jobs of both
 * kinds are locked together in id order first).
 */
export async function recordCheckpoints(
  sql: Db,
  records: readonly CheckpointRecord[],
  completions: readonly Completion[] = [],
): Promise<("recorded" | "lost" | "duplicate")[]> {
  if (records.length === 0) return [];
  // Each claim once (two steps of one run may share a batch), a pair per token: a lost run's
  // record and its job's new run's may share one too, and only the current token is ours.
  const claims = new Map<string, JobRef>();
  for (const r of records) claims.set(`${r.job.id}:${r.job.token}`, r.job);
  for (const c of completions) claims.set(`${c.id}:${c.token}`, c);
  const refs = [...claims.values()];
  const ours = lockOurs(sql, refs.map((j) => j.id), refs.map((j) => j.token));
  const completing = completions.length === 0 ? sql`select null::bigint as id where false` : (
    completeJobsFragment(sql, completions, sql`select count(*) from ours`)
  );
  const rows = await sql<{ ours: boolean; recorded: boolean }[]>`
    with input as (
      select r.job_id, r.token, r.name, r.result, r.i
      from unnest(${records.map((r) => r.job.id)}::bigint[],
                  ${records.map((r) => r.job.token)}::bigint[],
                  ${records.map((r) => r.name)}::text[],
                  ${records.map((r) => JSON.stringify(r.result ?? null))}::text[])
        with ordinality as r(job_id, token, name, result, i)
    ),
    ours as (${ours}),
    recorded as (
      insert into shoal.job_steps (job_id, name, kind, result)
      select x.job_id, x.name, 'step', x.result::jsonb
      from input x join ours o on o.id = x.job_id and o.token = x.token
      order by x.i
      on conflict (job_id, name) do nothing
      returning job_id, name
    ),
    completed as materialized (${completing})
    select exists (select 1 from ours o where o.id = x.job_id and o.token = x.token) as ours,
      exists (select 1 from recorded d where d.job_id = x.job_id and d.name = x.name) as recorded,
      (select count(*) from completed) as completions -- referenced, so the completions run
    from input x
    order by x.i`;
  return rows.map((row) => (!row.ours ? "lost" : row.recorded ? "recorded" : "duplicate"));
}

/** When a sleep ends: at an instant, or a duration after the database's now. */
export type Wake = { at: Date } | { ms: number };

/**
 * Record a sleep (or keep the wake time it already has) and hand the job back until then
 * (lib/queue.ts suspendClaim()), in one transaction fenced by the token: the record's insert
 * locks the job row where id and token match (lib/queue.ts lockOurs()), so a claim that moved
 * on records nothing. Returns the wake time, or null when the claim was no longer ours
 * (nothing changed).
 */
export async function suspendJob(
  sql: Sql,
  job: JobRef,
  name: string,
  wake: Wake,
): Promise<Date | null> {
  const at = "at" in wake ? wake.at : null;
  const ms = "ms" in wake ? Math.round(wake.ms) : null;
  return await sql.begin(async (tx) => {
    // The wake time as Postgres's text: a JS Date would drop its microseconds, and the job's
    // run_at must equal the record's wake_at (stepTotals() counts sleeping jobs by it).
    const [row] = await tx<{ wake_at: string }[]>`
      with idle as (
        -- Referenced below, so that it runs (SUSPEND_IDLE_MS): one row, always.
        select set_config('idle_in_transaction_session_timeout', ${String(SUSPEND_IDLE_MS)}::text,
                          true) as bound
      ),
      ours as (${lockOurs(tx, [job.id], [job.token])})
      insert into shoal.job_steps as s (job_id, name, kind, wake_at)
      select o.id, ${name}::text, 'sleep',
        coalesce(${at}::timestamptz, now() + ${ms}::bigint * interval '1 ms')
      from ours o cross join idle
      on conflict (job_id, name) do update set wake_at = s.wake_at
      returning s.wake_at::text as wake_at`;
    if (row === undefined) return null;
    return await suspendClaim(tx, job, row.wake_at);
  }) as Date | null;
}

/**
 * How long the short transaction of a sleep or a wait (suspendJob(), lib/events.ts
 * waitForEvent()) may sit idle before Postgres ends it. It holds its job's row (and a wait its
 * event's lock) from its first statement to its commit: a worker frozen in between (SIGSTOP, a
 * paused VM) would keep the job from being redelivered, and every emit of the event waiting,
 * for as long as it stays frozen. Its statements follow each other at once, so only a frozen
 * or dead worker is idle this long; set for the transaction only (`set_config(..., true)`), as
 * lib/job_transaction.ts bounds a handler's own transaction.
 */
export const SUSPEND_IDLE_MS = 5000;

/** The longest a job waiting without a timeout stays handed back before it looks again. */
const WAIT_PARK = "10 years";

/** A wait record as the run that holds the job's claim reads it (readWait()). */
export interface WaitRecord {
  state: WaitState;
  payload: unknown;
  event_name: string;
  event_key: string;
  /** Its timeout has come (by the database's clock); never for a wait without one. */
  due: boolean;
  /** Until when a waiting job is handed back (its timeout, or ten years out), as Postgres's text. */
  until: string;
}

/**
 * Lock the job's row where id and token match (lib/queue.ts lockOurs(), as every fenced write
 * locks its jobs), then read its record `name`: `ours` false when the claim moved on; `record`
 * undefined when there is none; `kind` the record's kind. Call it with the event lock held
 * (lib/events.ts): the snapshot is then taken after every emit of the wait's event that could
 * change the record committed.
 */
export async function readWait(
  tx: Db,
  job: JobRef,
  name: string,
): Promise<{ ours: boolean; kind: StepKind | null; record: WaitRecord | undefined }> {
  const [row] = await tx<
    ({ ours: number; kind: StepKind | null; state: WaitState | null } & Omit<WaitRecord, "state">)[]
  >`
    with ours as (${lockOurs(tx, [job.id], [job.token])})
    select (select count(*) from ours)::integer as ours, s.kind, s.wait_state as state,
      s.result as payload, s.event_name, s.event_key, coalesce(s.wake_at <= now(), false) as due,
      coalesce(s.wake_at, now() + ${WAIT_PARK}::interval)::text as until
    from (select 1) x
    left join shoal.job_steps s on s.job_id = ${job.id}::bigint and s.name = ${name}::text`;
  const { ours, kind, state, ...rest } = row!;
  return {
    ours: ours === 1,
    kind,
    record: kind === "wait" ? { state: state!, ...rest } : undefined,
  };
}

/**
 * Close a waiting record of the job whose claim the caller holds (locked by readWait()): it
 * received the event `received` (id and payload), or (null) it timed out. Once only: a record
 * that is no longer waiting is left as it is. Returns whether it changed.
 */
export async function closeWait(
  tx: Db,
  jobId: string,
  name: string,
  received: { id: string; payload: unknown } | null,
): Promise<boolean> {
  const rows = await tx`
    update shoal.job_steps s
    set wait_state = ${received === null ? "timed_out" : "received"}::text,
      result = ${received === null ? null : JSON.stringify(received.payload)}::text::jsonb,
      event_id = ${received?.id ?? null}::bigint
    where s.job_id = ${jobId}::bigint and s.name = ${name}::text and s.wait_state = 'waiting'
    returning 1`;
  return rows.length === 1;
}

/**
 * Record a new wait of the job whose claim the caller holds: received at once (`received`, a
 * kept event), or waiting until `timeout` (null: none). Returns, for a waiting record, when the
 * job is handed back until (Postgres's text of its timeout, or ten years out without one).
 */
export async function recordWait(
  tx: Db,
  jobId: string,
  wait: { name: string; event: string; key: string; timeout: Wake | null },
  received: { id: string; payload: unknown } | null,
): Promise<string> {
  const at = wait.timeout !== null && "at" in wait.timeout ? wait.timeout.at : null;
  const ms = wait.timeout !== null && "ms" in wait.timeout ? Math.round(wait.timeout.ms) : null;
  const [row] = await tx<{ run_at: string }[]>`
    insert into shoal.job_steps as s
      (job_id, name, kind, wake_at, event_name, event_key, wait_state, result, event_id)
    values (${jobId}::bigint, ${wait.name}::text, 'wait',
      coalesce(${at}::timestamptz, now() + ${ms}::bigint * interval '1 ms'),
      ${wait.event}::text, ${wait.key}::text,
      ${received === null ? "waiting" : "received"}::text,
      ${received === null ? null : JSON.stringify(received.payload)}::text::jsonb,
      ${received?.id ?? null}::bigint)
    returning coalesce(s.wake_at, now() + ${WAIT_PARK}::interval)::text as run_at`;
  return row!.run_at;
}

/**
 * When a sleep given as a duration ("2d"), milliseconds or an instant ends; else a TypeError
 * naming `subject` (ctx.waitForEvent's timeout takes the same forms).
 */
export function wakeOf(until: unknown, subject = "until for ctx.sleep()"): Wake {
  if (until instanceof Date) {
    if (Number.isNaN(until.getTime())) {
      throw new TypeError(`Invalid ${subject}: an invalid Date`);
    }
    return { at: until };
  }
  if (typeof until === "string") {
    try {
      return { ms: parseDuration(until) };
    } catch (cause) {
      throw new TypeError(`Invalid ${subject}: ${(cause as Error).message}`, { cause });
    }
  }
  if (typeof until === "number" && until >= 0 && until <= MAX_SLEEP_MS) return { ms: until };
  throw new TypeError(
    `Invalid ${subject}: expected a duration ("2d"), milliseconds from 0 to ${MAX_SLEEP_MS} or a Date, got ${
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
      select s.name, s.kind, s.result, s.wake_at, s.recorded_at, s.wait_state, s.event_name,
        s.event_key
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
  waits: number;
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
      count(*) filter (where s.kind = 'sleep')::integer as sleeps,
      count(*) filter (where s.kind = 'wait')::integer as waits
    from shoal.job_steps s where s.job_id = any(${jobIds as string[]}::bigint[])
    group by s.job_id`;
  return new Map(rows.map((r) => [r.job_id, { steps: r.steps, sleeps: r.sleeps, waits: r.waits }]));
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
                      and j.run_at = s.wake_at))::integer as sleeping,
      count(*) filter (
        where s.wait_state = 'waiting' and coalesce(s.wake_at > now(), true)
          and exists (select 1 from shoal.jobs j where j.id = s.job_id and j.locked_by is null))::integer
        as waiting
    from (select * from shoal.job_steps limit ${STEP_TOTALS_CAP + 1}::integer) s`;
  return {
    records: row!.records,
    jobs: row!.jobs,
    sleeping: row!.sleeping,
    waiting: row!.waiting,
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
