/**
 * What the flow-control process tests measure (tests/flow_process_test.ts,
 * tests/fault/pgbouncer_test.ts): every claim, recorded by the database itself, and every
 * handler run as an interval of the database clock, from the rows the fixture's
 * `test.record` task writes (its start before it sleeps, its finish after), so an overlap
 * is one of handlers actually running, not of claims.
 */
import type { Sql } from "../lib/db.ts";

/**
 * Create `test_claims`: one row per claim of a job (an update that gives it a new token
 * and a worker), with the claim's transaction start (`began`, at or before the snapshot its
 * claim statement read) and the row's update time (`at`), both of the database clock.
 * With `byTask`, a run's key is "task/fairness key".
 */
export async function installClaimAudit(sql: Sql, byTask = false): Promise<void> {
  const key = byTask ? sql`new.task || '/' || new.fairness_key` : sql`new.fairness_key`;
  await sql`
    create table test_claims (
      id bigint generated always as identity primary key,
      job_id bigint not null, token bigint not null, queue text not null, key text not null,
      began timestamptz not null, at timestamptz not null)`;
  await sql`
    create function test_audit_claim() returns trigger language plpgsql as $$
    begin
      insert into test_claims (job_id, token, queue, key, began, at)
      values (new.id, new.token, new.queue, ${key}, now(), clock_timestamp());
      return null;
    end $$`;
  await sql`
    create trigger test_audit_claim after update on shoal.jobs
    for each row when (new.locked_by is not null and new.token is distinct from old.token)
    execute function test_audit_claim()`;
}

/** One handler run: its job's queue and fairness key, and when it started and finished (µs). */
export interface Run {
  jobId: string;
  queue: string;
  key: string;
  pid: number;
  attempt: number;
  /** Microseconds since the epoch, database clock. */
  start: number;
  /** Microseconds since the epoch, database clock; null while it runs. */
  end: number | null;
}

/** Every handler run of `queue`, in start order (needs test_runs and test_claims). */
export async function loadRuns(sql: Sql, queue: string): Promise<Run[]> {
  // Microseconds as text: a Date would round both ends to the millisecond, and a start and
  // a finish 0.4 ms apart could then swap.
  const rows = await sql<
    {
      job_id: string;
      queue: string;
      key: string;
      pid: number;
      attempt: number;
      start_us: string;
      end_us: string | null;
    }[]
  >`
    select r.job_id::text, c.queue, c.key, r.pid, r.attempt,
      (extract(epoch from r.started_at) * 1000000)::bigint::text as start_us,
      (extract(epoch from r.finished_at) * 1000000)::bigint::text as end_us
    from test_runs r
    join test_claims c on c.job_id = r.job_id and c.token = r.token
    where c.queue = ${queue}::text
    order by r.started_at, r.id`;
  return rows.map((r) => ({
    jobId: r.job_id,
    queue: r.queue,
    key: r.key,
    pid: r.pid,
    attempt: r.attempt,
    start: Number(r.start_us),
    end: r.end_us === null ? null : Number(r.end_us),
  }));
}

/** How many of a set of runs ran at once. */
export interface Overlap {
  /** The most running at any instant. */
  max: number;
  /**
   * The time-weighted mean of how many ran, from the first start to the last start: while
   * the last job had not started, some job was waiting, so a limit of L fully used keeps
   * this at L less the hand-over gaps (a finish, its ack, the next claim and start).
   */
  mean: number;
  /** That window's length in ms. */
  windowMs: number;
}

/** Overlap of finished runs (a run still going fails: the caller waits for every finish). */
export function overlapOf(runs: readonly Run[]): Overlap {
  if (runs.length === 0) throw new Error("No runs to measure");
  const events: { at: number; delta: number }[] = [];
  for (const run of runs) {
    if (run.end === null) throw new Error(`Job ${run.jobId} has not finished`);
    events.push({ at: run.start, delta: 1 }, { at: run.end, delta: -1 });
  }
  // At the same microsecond a finish counts first: a job handed its slot at that instant
  // is not an overlap.
  events.sort((a, b) => a.at - b.at || a.delta - b.delta);
  const from = Math.min(...runs.map((r) => r.start));
  const to = Math.max(...runs.map((r) => r.start));
  let running = 0;
  let max = 0;
  let area = 0;
  let last = from;
  for (const event of events) {
    if (event.at > from) {
      const until = Math.min(event.at, to);
      if (until > last) {
        area += running * (until - last);
        last = until;
      }
    }
    running += event.delta;
    max = Math.max(max, running);
  }
  const window = to - from;
  return { max, mean: window > 0 ? area / window : running, windowMs: window / 1000 };
}

/** Runs grouped by fairness key. */
export function byKey(runs: readonly Run[]): Map<string, Run[]> {
  const groups = new Map<string, Run[]>();
  for (const run of runs) {
    const group = groups.get(run.key) ?? [];
    group.push(run);
    groups.set(run.key, group);
  }
  return groups;
}
