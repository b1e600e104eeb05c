/**
 * `shoal status`: one snapshot of the queues (later issues add executions, leases and
 * schedules). The JSON form is a stable contract for scripts.
 *
 * @module
 */
import type { Db } from "./db.ts";

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

export interface Status {
  queues: QueueStatus[];
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

export async function status(db: Db): Promise<Status> {
  return { queues: await queueStatus(db) };
}

/** The human-readable form of `shoal status`. */
export function formatStatus(s: Status): string {
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
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  ");
  return [line(header), ...rows.map(line)].join("\n") + "\n";
}
