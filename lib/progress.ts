/**
 * A running job's progress (`ctx.progress(done, total, message?)`, issue 17): kept on the run
 * in memory and written by the consumer's heartbeat, in one statement for every job whose
 * progress changed since the last beat (none when nothing changed), fenced by the claim's token.
 * A handler may report a thousand times a second; the database sees at most one write per job
 * per heartbeat (a third of the visibility timeout). Read by `shoal status --json`.
 *
 * This module holds the report's shape and check; the statements that write and read the
 * `progress` column live with the rest of `shoal.jobs`'s in lib/queue.ts (saveProgress,
 * listProgress, progressOf).
 *
 * @module
 */
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

/** The most jobs progressOf() (lib/queue.ts) takes in one call. */
export const MAX_PROGRESS_JOBS = 1000;

/** A job's last written progress, as progressOf() (lib/queue.ts) reads it. */
export interface WrittenProgress extends Progress {
  /** When the heartbeat wrote it (the database's clock). */
  at: Date;
}
