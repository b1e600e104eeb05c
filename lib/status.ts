/**
 * `shoal status`: one snapshot of the queues, recent executions, leases and schedules.
 * The JSON form is a stable contract for scripts: keys are only ever added.
 *
 * @module
 */
import type { Db } from "./db.ts";
import { listExecutions } from "./execution.ts";
import { listLeases } from "./lease.ts";
import { listSchedules, type ScheduleRow } from "./schedule.ts";

export interface QueueStatus {
  queue: string;
  /** Visible now: pending and due, or claimed by a worker whose deadline passed. */
  ready: number;
  /** Pending with a future run_at (delayed, or waiting out a retry backoff). */
  scheduled: number;
  /** Claimed and within their visibility deadline. */
  running: number;
  dead: number;
  /** Seconds the oldest ready job has been visible; 0 when none. */
  oldest_ready_age_s: number;
}

export interface LeaseStatus {
  name: string;
  holder: string;
  expires_at: Date;
}

export interface ScheduleStatus {
  name: string;
  cron: string;
  enabled: boolean;
  next_run_at: Date | null;
  last_run_at: Date | null;
  last_error: string | null;
}

export interface ExecutionStatusRow {
  id: string;
  status: string;
  created_at: Date;
  updated_at: Date;
  error: string | null;
  /** Children of its open fan-outs, and how many have arrived; null with none open. */
  total: number | null;
  arrived: number | null;
}

export interface Status {
  queues: QueueStatus[];
  executions: ExecutionStatusRow[];
  leases: LeaseStatus[];
  schedules: ScheduleStatus[];
}

export async function queueStatus(db: Db): Promise<QueueStatus[]> {
  const rows = await db<
    {
      queue: string;
      ready: string;
      scheduled: string;
      running: string;
      dead: string;
      oldest_ready_age_s: number;
    }[]
  >`
    with live as (
      select queue,
        count(*) filter (where run_at <= now()) as ready,
        count(*) filter (where run_at > now() and locked_by is null) as scheduled,
        count(*) filter (where run_at > now() and locked_by is not null) as running,
        coalesce(extract(epoch from now() - min(run_at) filter (where run_at <= now())), 0)
          as oldest_ready_age_s
      from shoal.jobs group by queue
    ),
    dead as (select queue, count(*) as dead from shoal.dead_jobs group by queue)
    select coalesce(l.queue, d.queue) as queue, coalesce(l.ready, 0) as ready,
      coalesce(l.scheduled, 0) as scheduled, coalesce(l.running, 0) as running,
      coalesce(d.dead, 0) as dead,
      round(coalesce(l.oldest_ready_age_s, 0)::numeric, 3)::float8 as oldest_ready_age_s
    from live l full join dead d on d.queue = l.queue
    order by 1`;
  return rows.map((r) => ({
    queue: r.queue,
    ready: Number(r.ready),
    scheduled: Number(r.scheduled),
    running: Number(r.running),
    dead: Number(r.dead),
    oldest_ready_age_s: r.oldest_ready_age_s,
  }));
}

/** A queue's live jobs, as the /metrics gauges show them. */
export type QueueDepth = Omit<QueueStatus, "dead">;

/**
 * Ready, scheduled and running jobs and the oldest ready age per queue: one scan of the
 * live table only (the dead-letter table can be large and is not read), for /metrics.
 */
export async function queueDepths(db: Db): Promise<QueueDepth[]> {
  const rows = await db<
    { queue: string; ready: string; scheduled: string; running: string; oldest: number }[]
  >`
    select queue,
      count(*) filter (where run_at <= now()) as ready,
      count(*) filter (where run_at > now() and locked_by is null) as scheduled,
      count(*) filter (where run_at > now() and locked_by is not null) as running,
      coalesce(extract(epoch from now() - min(run_at) filter (where run_at <= now())), 0)::float8
        as oldest
    from shoal.jobs group by queue order by queue`;
  return rows.map((r) => ({
    queue: r.queue,
    ready: Number(r.ready),
    scheduled: Number(r.scheduled),
    running: Number(r.running),
    oldest_ready_age_s: r.oldest,
  }));
}

export async function status(db: Db): Promise<Status> {
  const leases = (await listLeases(db)).map((l) => ({
    name: l.name,
    holder: l.holder,
    expires_at: l.expires_at,
  }));
  const schedules = (await listSchedules(db)).map((s) => ({
    name: s.name,
    cron: s.cron,
    enabled: s.enabled,
    next_run_at: s.next_run_at,
    last_run_at: s.last_run_at,
    last_error: s.last_error,
  }));
  const executions = (await listExecutions(db, { limit: 20 })).map((e) => {
    const open = e.barriers.length > 0;
    return {
      id: e.id,
      status: e.status,
      created_at: e.created_at,
      updated_at: e.updated_at,
      error: e.error,
      total: open ? e.barriers.reduce((n, b) => n + b.total, 0) : null,
      arrived: open ? e.barriers.reduce((n, b) => n + b.arrived, 0) : null,
    };
  });
  return { queues: await queueStatus(db), executions, leases, schedules };
}

/** A plain table: first column left-aligned, the rest right-aligned. */
function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  ");
  return [line(header), ...rows.map(line)].join("\n") + "\n";
}

const iso = (d: Date | null) => (d ? d.toISOString() : "-");

/** The human-readable form of `shoal schedule list`. */
export function formatSchedules(rows: (ScheduleStatus | ScheduleRow)[]): string {
  if (rows.length === 0) return "No schedules\n";
  return table(
    ["schedule", "cron", "enabled", "next run", "last run", "last error"],
    rows.map((s) => [
      s.name,
      s.cron,
      s.enabled ? "yes" : "no",
      iso(s.next_run_at),
      iso(s.last_run_at),
      s.last_error ?? "-",
    ]),
  );
}

function formatExecutions(rows: ExecutionStatusRow[]): string {
  if (rows.length === 0) return "No executions\n";
  return table(
    ["execution", "status", "fan-out", "updated", "error"],
    rows.map((e) => [
      e.id,
      e.status,
      e.total === null ? "-" : `${e.arrived}/${e.total}`,
      iso(e.updated_at),
      e.error ?? "-",
    ]),
  );
}

function formatLeases(rows: LeaseStatus[]): string {
  if (rows.length === 0) return "No leases\n";
  return table(
    ["lease", "holder", "expires"],
    rows.map((l) => [l.name, l.holder, iso(l.expires_at)]),
  );
}

/** The human-readable form of `shoal status`. */
export function formatStatus(s: Status): string {
  return [
    formatQueues(s),
    formatExecutions(s.executions),
    formatLeases(s.leases),
    formatSchedules(s.schedules),
  ].join("\n");
}

function formatQueues(s: Status): string {
  const header = ["queue", "ready", "scheduled", "running", "dead", "oldest ready"];
  const rows = s.queues.map((q) => [
    q.queue,
    String(q.ready),
    String(q.scheduled),
    String(q.running),
    String(q.dead),
    q.ready > 0 ? `${q.oldest_ready_age_s.toFixed(1)}s` : "-",
  ]);
  if (rows.length === 0) return "No queues yet: nothing has been enqueued.\n";
  return table(header, rows);
}
