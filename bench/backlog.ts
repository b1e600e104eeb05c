/**
 * A large backlog of ready jobs, loaded fast: one `insert … select … from generate_series`
 * straight into `shoal.jobs`, then `vacuum analyze`, so W5 and W11 can measure a queue
 * holding millions of jobs without enqueueing them one call of 1,000 at a time.
 *
 * The rows are what `shoal.insert_jobs` would have written for the same jobs enqueued in
 * order by one producer: the columns it sets, `fair_seq` counting up from the queue's last
 * stamp at that priority (the stamping rule gives one fairness key's jobs consecutive
 * stamps), `run_at` in the past so every job is ready. The insert bypasses the enqueue
 * functions: whatever they keep beside the row (nothing but the NOTIFY today, which no
 * consumer is waiting for while a backlog loads) must be kept here too if that changes.
 *
 * @module
 */
import type { Sql } from "../lib/db.ts";

export interface BacklogSpec {
  queue: string;
  task: string;
  /** Ready jobs to add. */
  count: number;
  /** Every job's payload (the same object for all). */
  payload?: Record<string, unknown>;
  /** '' (no key) unless given. */
  fairnessKey?: string;
  /** 0 unless given. */
  priority?: number;
}

export interface BacklogTimes {
  /** The insert, ms. */
  insertMs: number;
  /** `vacuum analyze shoal.jobs`, ms. */
  vacuumMs: number;
}

/** Add `spec.count` ready jobs to `spec.queue` in one statement, then vacuum and analyze. */
export async function loadBacklog(sql: Sql, spec: BacklogSpec): Promise<BacklogTimes> {
  if (!Number.isInteger(spec.count) || spec.count < 1) {
    throw new RangeError(`A backlog holds at least one job, not ${spec.count}`);
  }
  const priority = spec.priority ?? 0;
  const t0 = performance.now();
  await sql`
    insert into shoal.jobs (queue, task, payload, priority, fairness_key, fair_seq, run_at)
    select ${spec.queue}::text, ${spec.task}::text, ${
    JSON.stringify(spec.payload ?? {})
  }::text::jsonb,
      ${priority}::integer, ${spec.fairnessKey ?? ""}::text, last.seq + g,
      now() - interval '1 minute'
    from (select coalesce(max(j.fair_seq), 0) as seq from shoal.jobs j
          where j.queue = ${spec.queue}::text and j.priority = ${priority}::integer) last
    cross join generate_series(1, ${spec.count}::bigint) g`;
  const t1 = performance.now();
  // As a backlog that has sat in the table for a while: visibility map set, statistics
  // current (the claim pins its plan, the enqueue's stamping lookups do not).
  await sql`vacuum analyze shoal.jobs`;
  return { insertMs: t1 - t0, vacuumMs: performance.now() - t1 };
}
