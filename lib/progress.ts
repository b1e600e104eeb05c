/**
 * A running job's progress (`ctx.progress(done, total, message?)`, issue 17): kept on the run
 * in memory and written by the consumer's heartbeat, in one statement for every job whose
 * progress changed since the last beat (none when nothing changed), fenced by the claim's token.
 * A handler may report a thousand times a second; the database sees at most one write per job
 * per heartbeat (a third of the visibility timeout). Read by `shoal status --json`.
 *
 * @module
 */
import { checkDb, checkId, checkInteger, MAX_INT4, refusal } from "./args.ts";
import type { Db } from "./db.ts";
import type { JobRef } from "./queue.ts";

/** The longest progress message kept, in characters (longer ones are cut, ending "…"). */
export const MAX_PROGRESS_MESSAGE = 200;

/** One progress report. */
export interface Progress {
  done: number;
  total: number;
  message: string | null;
}

/** A job's progress to write, with its claim. */
export interface ProgressReport extends JobRef {
  progress: Progress;
}

/** A running job's last written progress, as `shoal status --json` lists it. */
export interface JobProgress {
  job_id: string;
  queue: string;
  task: string;
  done: number;
  total: number;
  message: string | null;
  /** When the handler reported it (by the database's clock when the heartbeat wrote it). */
  at: Date;
}

/** Check a report at the boundary: finite non-negative numbers, a string message or none. */
export function checkProgress(done: unknown, total: unknown, message: unknown): Progress {
  for (const [arg, value] of [["done", done], ["total", total]] as const) {
    if (typeof value !== "number" || !Number.isFinite(value) || value < 0) {
      throw new TypeError(
        `Invalid ${arg} for ctx.progress(): expected a finite number of at least 0, got ${
          typeof value === "number" ? value : typeof value
        }`,
      );
    }
  }
  if (message !== undefined && message !== null && typeof message !== "string") {
    throw new TypeError(
      `Invalid message for ctx.progress(): expected a string, got ${typeof message}`,
    );
  }
  const text = typeof message === "string"
    ? message.length > MAX_PROGRESS_MESSAGE
      ? message.slice(0, MAX_PROGRESS_MESSAGE - 1) + "…"
      // Postgres text cannot hold NUL.
      : message
    : null;
  return {
    done: done as number,
    total: total as number,
    message: text === null ? null : text.replaceAll("\0", "\uFFFD"),
  };
}

/**
 * Write the reports of jobs still ours (id and token match), locked in id order as every batch
 * that locks jobs does (lib/queue.ts lockOurs: no deadlock with a cancel taking them in that
 * order). Returns how many were written.
 */
export async function saveProgress(db: Db, reports: readonly ProgressReport[]): Promise<number> {
  if (reports.length === 0) return 0;
  const ids = reports.map((r) => r.id);
  const tokens = reports.map((r) => r.token);
  const values = JSON.stringify(reports.map((r) => r.progress));
  const [row] = await db<{ n: number }[]>`
    with input as (
      select u.id, u.token, v.value as progress
      from unnest(${ids}::bigint[], ${tokens}::bigint[]) with ordinality as u(id, token, ord)
      join jsonb_array_elements(${values}::text::jsonb) with ordinality as v(value, ord)
        on v.ord = u.ord
      order by u.id
    ),
    locked as (
      select x.id, i.progress from input i
      cross join lateral (
        select j.id from shoal.jobs j where j.id = i.id and j.token = i.token for update of j
      ) x
    ),
    written as (
      update shoal.jobs j set progress = l.progress || jsonb_build_object('at', now())
      from locked l where j.id = l.id
      returning 1
    )
    select count(*)::integer as n from written`;
  return row!.n;
}

/** The claimed jobs with a reported progress, by id, at most `limit`. */
export async function listProgress(db: Db, limit = 20): Promise<JobProgress[]> {
  checkDb("listProgress", db);
  checkInteger("listProgress", "limit", limit, { min: 1, max: MAX_INT4 });
  const rows = await db<JobProgress[]>`
    select j.id::text as job_id, j.queue, j.task,
      (j.progress->>'done')::float8 as done, (j.progress->>'total')::float8 as total,
      j.progress->>'message' as message, (j.progress->>'at')::timestamptz as at
    from shoal.jobs j
    where j.progress is not null and j.locked_by is not null
    order by j.id
    limit ${limit}::integer`;
  return [...rows];
}

/** The most jobs {@link progressOf} takes in one call. */
export const MAX_PROGRESS_JOBS = 1000;

/** A job's last written progress, as {@link progressOf} reads it. */
export interface WrittenProgress extends Progress {
  /** When the heartbeat wrote it (the database's clock). */
  at: Date;
}

/**
 * The last written progress of up to {@link MAX_PROGRESS_JOBS} jobs, by job id (jobs without
 * one, or gone, are absent): one statement along the primary key. The dashboard's job and
 * execution pages read it; a job keeps its progress while it waits for a retry.
 */
export async function progressOf(
  db: Db,
  jobIds: readonly string[],
): Promise<Map<string, WrittenProgress>> {
  checkDb("progressOf", db);
  if (jobIds.length > MAX_PROGRESS_JOBS) {
    throw refusal("jobIds for progressOf()", `at most ${MAX_PROGRESS_JOBS} ids`, jobIds.length);
  }
  jobIds.forEach((id, i) => checkId("progressOf", `jobIds[${i}]`, id));
  if (jobIds.length === 0) return new Map();
  const rows = await db<({ job_id: string } & WrittenProgress)[]>`
    select j.id::text as job_id,
      (j.progress->>'done')::float8 as done, (j.progress->>'total')::float8 as total,
      j.progress->>'message' as message, (j.progress->>'at')::timestamptz as at
    from shoal.jobs j
    where j.id = any(${jobIds as string[]}::bigint[]) and j.progress is not null`;
  return new Map(rows.map(({ job_id, ...p }) => [job_id, p]));
}
