/**
 * `shoal status`: one snapshot of the queues, recent executions, leases and schedules.
 * The JSON form is a stable contract for scripts: keys are only ever added.
 *
 * `shoal status --watch` redraws it in place every interval, with throughput rates from
 * successive samples and progress bars for open fan-outs; with `--json`, one line each.
 *
 * It holds no SQL: each section is read by the module that owns its table (queue.ts for
 * the job counts and totals, execution.ts, lease.ts, schedule.ts, catalog.ts for the live
 * consumers that tell which ready jobs no consumer runs, flow.ts for flow control: paused
 * queues, concurrency and rate limits, holds and fairness weights).
 *
 * With `--read-database-url` it reads a replica instead of the primary, and says how far
 * behind it is (lib/db.ts replicaLag()); `--watch`'s rates still come from the primary's
 * statistics (a standby's pg_stat_user_tables does not count the rows its replay deletes).
 *
 * @module
 */
import { checkBoolean, checkDb, checkOptions } from "./args.ts";
import { type Db, type ReplicaLag, replicaLag } from "./db.ts";
import { delay } from "./sleep.ts";
import { describeError } from "./log.ts";
import { formatDuration } from "./duration.ts";
import { type HeldTotals, heldTotals, listExecutions } from "./execution.ts";
import { listLeases } from "./lease.ts";
import { listSchedules, type ScheduleRow } from "./schedule.ts";
import { countJobs, type JobTotals, jobTotals, listProgress, type QueueCounts } from "./queue.ts";
import { type ConsumerRow, listLiveConsumers } from "./catalog.ts";
import {
  type ConcurrencyLimit,
  type FairnessWeight,
  type FlowStatus,
  flowStatus,
  type HeldKey,
  type PausedQueue,
  type RateLimit,
} from "./flow.ts";
import { type StepTotals, stepTotals } from "./steps.ts";
import type { JobProgress } from "./progress.ts";

/**
 * A queue's row in `shoal status`: its counts with the dead letters, the age in ms, and
 * `exact`: false when its figures are estimates (a large table, see countJobs()).
 */
export interface QueueStatus extends QueueCounts {
  dead: number;
}

export interface LeaseStatus {
  name: string;
  holder: string;
  expires_at: Date;
}

export interface ScheduleStatus {
  name: string;
  cron: string;
  /** The task it enqueues. */
  task: string;
  /** The queue it enqueues onto; null would mean its task's own queue, read when it fires. */
  queue: string | null;
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

/**
 * Ready jobs of one task on one queue that no live consumer runs: none claims from the
 * queue, or those that do do not know the task. They wait until such a consumer starts.
 */
export interface UnservedJobs {
  queue: string;
  task: string;
  ready: number;
  /** False when `ready` is an estimate (its queue's counts are). */
  exact: boolean;
}

export interface Status {
  queues: QueueStatus[];
  executions: ExecutionStatusRow[];
  leases: LeaseStatus[];
  schedules: ScheduleStatus[];
  /** Ready jobs no live consumer runs, by queue and task (empty when every one is served). */
  unserved: UnservedJobs[];
  /**
   * Paused queues, concurrency limits with the slots each counts now, rate limits, holds not
   * yet ended and fairness weights (lib/flow.ts).
   */
  flow: FlowStatus;
  /** Durable-workflow records (lib/steps.ts): steps, sleeps and waits kept, jobs with any, sleeping and waiting jobs. */
  steps: StepTotals;
  /**
   * Jobs waiting on dependencies (held in shoal.held_jobs, not yet jobs of their queue), by
   * queue; bounded like the step totals (lib/execution.ts heldTotals()).
   */
  held: HeldTotals;
  /** Claimed jobs that reported progress (ctx.progress), by id, at most 20 (lib/progress.ts). */
  progress: JobProgress[];
  /**
   * Only when read from `--read-database-url`: whether that server is a replica and how far
   * behind the primary it is (lib/db.ts ReplicaLag); the figures above are that old.
   */
  read_replica?: ReplicaLag;
}

/** How `shoal status` counts. */
export interface StatusOptions {
  /**
   * Count every job and dead letter (a scan of both tables) instead of estimating the
   * counts of a large table (`shoal status --exact`).
   */
  exact?: boolean;
  /** Read from `--read-database-url`: report its lag as `read_replica`. */
  readReplica?: boolean;
}

/**
 * The queues section of `shoal status`: countJobs() with the dead letters counted and the
 * oldest ready age rounded to the millisecond.
 */
export async function queueStatus(db: Db, options: StatusOptions = {}): Promise<QueueStatus[]> {
  return (await countJobs(db, { dead: true, exact: options.exact })).map(toQueueStatus);
}

function toQueueStatus(r: QueueCounts): QueueStatus {
  return {
    queue: r.queue,
    ready: r.ready,
    scheduled: r.scheduled,
    running: r.running,
    prefetched: r.prefetched,
    dead: r.dead ?? 0,
    oldest_ready_age_s: roundToMs(r.oldest_ready_age_s),
    exact: r.exact,
  };
}

/**
 * The ready jobs (counted by queue and task) that none of `consumers` runs: no consumer
 * claims from their queue and knows their task. By queue, then task.
 */
export function unservedJobs(counts: QueueCounts[], consumers: ConsumerRow[]): UnservedJobs[] {
  const served = new Set<string>();
  for (const c of consumers) {
    for (const queue of c.queues) for (const task of c.tasks) served.add(`${queue} ${task}`);
  }
  const found: UnservedJobs[] = [];
  for (const q of counts) {
    for (const [task, ready] of Object.entries(q.ready_by_task ?? {}).sort()) {
      if (ready > 0 && !served.has(`${q.queue} ${task}`)) {
        found.push({ queue: q.queue, task, ready, exact: q.exact });
      }
    }
  }
  return found;
}

/**
 * Seconds to three decimals, halves up (an age is never negative). Through whole
 * microseconds first, the age's own resolution, so a float's error never moves a half.
 */
function roundToMs(seconds: number): number {
  return Math.round(Math.round(seconds * 1e6) / 1e3) / 1e3;
}

export async function status(db: Db, options: StatusOptions = {}): Promise<Status> {
  checkDb("status", db);
  checkOptions("status", options, "options", ["exact", "readReplica"]);
  checkBoolean("status", "options.exact", options.exact, { optional: true });
  checkBoolean("status", "options.readReplica", options.readReplica, { optional: true });
  // Read first: every figure below is at least this old.
  const lag = options.readReplica ? await replicaLag(db) : undefined;
  const leases = (await listLeases(db)).map((l) => ({
    name: l.name,
    holder: l.holder,
    expires_at: l.expires_at,
  }));
  const schedules = (await listSchedules(db)).map((s) => ({
    name: s.name,
    cron: s.cron,
    task: s.task,
    queue: s.queue,
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
  const counts = await countJobs(db, { dead: true, readyByTask: true, exact: options.exact });
  const unserved = unservedJobs(counts, await listLiveConsumers(db));
  const flow = await flowStatus(db);
  const steps = await stepTotals(db);
  const held = await heldTotals(db);
  const progress = await listProgress(db);
  return {
    queues: counts.map(toQueueStatus),
    executions,
    leases,
    schedules,
    unserved,
    flow,
    steps,
    held,
    progress,
    ...(lag === undefined ? {} : { read_replica: lag }),
  };
}

/** A plain table: first column left-aligned, the rest right-aligned. */
function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  ");
  return [line(header), ...rows.map(line)].join("\n") + "\n";
}

const iso = (d: Date | null) => (d ? d.toISOString() : "-");

/** What a schedule's queue column shows when it has none of its own. */
export const TASK_QUEUE = "(task's queue)";

/** The human-readable form of `shoal schedule list` (and the schedules of `shoal status`). */
export function formatSchedules(rows: (ScheduleStatus | ScheduleRow)[]): string {
  if (rows.length === 0) return "No schedules\n";
  return table(
    ["schedule", "cron", "task", "queue", "enabled", "next run", "last run", "last error"],
    rows.map((s) => [
      s.name,
      s.cron,
      s.task,
      s.queue ?? TASK_QUEUE,
      s.enabled ? "yes" : "no",
      iso(s.next_run_at),
      iso(s.last_run_at),
      s.last_error ?? "-",
    ]),
  );
}

function formatExecutions(rows: ExecutionStatusRow[], bars: boolean): string {
  if (rows.length === 0) return "No executions\n";
  return table(
    ["execution", "status", "fan-out", "updated", "error"],
    rows.map((e) => [
      e.id,
      e.status,
      e.total === null
        ? "-"
        : bars
        ? progressBar(e.arrived ?? 0, e.total)
        : `${e.arrived}/${e.total}`,
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

/** The human-readable form of `shoal status` (fan-outs as bars with `bars`). */
export function formatStatus(s: Status, options: { bars?: boolean } = {}): string {
  return formatReadReplica(s.read_replica) + [
    formatQueues(s) + formatHeld(s.held) + formatUnserved(s.unserved) +
    flowSections(s.flow).map((section) => `\n${section}`).join(""),
    formatExecutions(s.executions, options.bars ?? false),
    formatLeases(s.leases),
    formatSchedules(s.schedules),
  ].join("\n");
}

/**
 * The line above the queues when read from a replica: how old its figures may be. Nothing
 * when the read URL names a primary (allowed: its figures are current).
 */
export function formatReadReplica(lag: ReplicaLag | undefined): string {
  if (!lag?.replica) return "";
  const behind = lag.lag_s === null
    ? "its lag unknown (it has replayed no transaction since it started)"
    : `${lag.lag_s.toFixed(1)}s behind the primary`;
  return `Read from a replica, ${behind}\n\n`;
}

/** What marks an estimated figure in the text form. */
const ABOUT = "~";

/** The heading of the held jobs' counts in the text form. */
export const HELD_HEADING = "Waiting on dependencies";

/**
 * Jobs waiting on dependencies, per queue, under the queues (nothing when there are none):
 * they are not in any queue's counts until their last dependency completes.
 */
function formatHeld(held: HeldTotals): string {
  if (held.queues.length === 0) return "";
  const mark = held.exact ? "" : ">="; // past the cap: a lower bound
  const counts = held.queues.map((q) => `${q.queue} ${mark}${q.jobs}`).join(", ");
  return `\n${HELD_HEADING}: ${counts}\n`;
}

/** What the text form says under the queues when some of their figures are estimates. */
export const ESTIMATES_NOTE = `${ABOUT} marks estimates: too many jobs to count on every call, ` +
  "so ready and scheduled come from a sample of the table, running and prefetched from " +
  "what live consumers reported at their last heartbeat, the oldest ready age from the " +
  "head of each queue. `shoal status --exact` counts every job.\n";

/** What follows a paused queue's name in the text form. */
export const PAUSED_MARK = " (paused)";

function formatQueues(s: Status): string {
  const header = ["queue", "ready", "scheduled", "running", "prefetched", "dead", "oldest ready"];
  const paused = new Set(s.flow.paused.map((p) => p.queue));
  const rows = s.queues.map((q) => {
    const n = (value: number) => `${q.exact ? "" : ABOUT}${value}`;
    return [
      q.queue + (paused.has(q.queue) ? PAUSED_MARK : ""),
      n(q.ready),
      n(q.scheduled),
      n(q.running),
      n(q.prefetched),
      n(q.dead),
      q.ready > 0 ? `${q.exact ? "" : ABOUT}${q.oldest_ready_age_s.toFixed(1)}s` : "-",
    ];
  });
  // A paused queue with no job has no row: named under the table, so no pause goes unseen.
  const listed = new Set(s.queues.map((q) => q.queue));
  const unlisted = [...paused].filter((q) => !listed.has(q));
  const alsoPaused = unlisted.length === 0 ? "" : `Paused, with no jobs: ${unlisted.join(", ")}\n`;
  if (rows.length === 0) return "No queues yet: nothing has been enqueued.\n" + alsoPaused;
  return table(header, rows) + alsoPaused +
    (s.queues.every((q) => q.exact) ? "" : `\n${ESTIMATES_NOTE}`);
}

/** What the text form shows in the key column of a queue's default limit. */
export const EVERY_KEY = "(every key)";

/**
 * A limit's key as the text form shows it: as it is, or quoted as JSON when it is empty (the
 * key of jobs enqueued without one) or holds a space, a quote or a control character.
 */
function shownKey(key: string | null): string {
  if (key === null) return EVERY_KEY;
  return /^[^\s"\\\p{Cc}]+$/u.test(key) ? key : JSON.stringify(key);
}

/**
 * What the text form shows in the task column of a limit or hold that names no task (the
 * queue's jobs that no limit counts apart): no task name can be it.
 */
export const NO_TASK = "-";

/** A limit's or hold's task as the text form shows it. */
function shownTask(task: string | null): string {
  return task ?? NO_TASK;
}

/** The concurrency limits as a table (`shoal limit list` shows it among the others). */
export function formatLimits(rows: ConcurrencyLimit[]): string {
  if (rows.length === 0) return "No concurrency limits\n";
  return table(
    ["queue", "task", "key", "max running", "slots held"],
    rows.map((l) => [
      l.queue,
      shownTask(l.task),
      shownKey(l.key),
      String(l.max_running),
      String(l.slots_held),
    ]),
  );
}

/** The rate limits as a table: starts per period, the period as a duration flag takes it. */
export function formatRateLimits(rows: RateLimit[]): string {
  if (rows.length === 0) return "No rate limits\n";
  return table(
    ["queue", "task", "key", "max starts", "per"],
    rows.map((r) => [
      r.queue,
      shownTask(r.task),
      shownKey(r.key),
      String(r.max_starts),
      formatDuration(r.period_ms),
    ]),
  );
}

/** The holds as a table. */
export function formatHolds(rows: HeldKey[]): string {
  if (rows.length === 0) return "No held keys\n";
  return table(
    ["queue", "task", "key", "held until"],
    rows.map((h) => [h.queue, shownTask(h.task), shownKey(h.key), iso(h.held_until)]),
  );
}

/** The fairness weights as a table. */
export function formatWeights(rows: FairnessWeight[]): string {
  if (rows.length === 0) return "No fairness weights\n";
  return table(
    ["queue", "key", "weight"],
    rows.map((w) => [w.queue, shownKey(w.key), String(w.weight)]),
  );
}

/** What `shoal limit list` shows when there is no limit, hold or weight. */
export const NO_FLOW_LIMITS = "No concurrency limits, rate limits, held keys or fairness weights\n";

/** Each kind of limit, hold and weight that has rows: a heading line and its table. */
function flowSections(flow: Omit<FlowStatus, "paused">): string[] {
  const sections: string[] = [];
  const add = <T>(heading: string, rows: T[], format: (rows: T[]) => string) => {
    if (rows.length > 0) sections.push(`${heading}:\n${format(rows)}`);
  };
  add(
    "Concurrency limits (slots held: claimed jobs, prefetched ones included)",
    flow.limits,
    formatLimits,
  );
  add(
    "Rate limits (starts per period per key; a burst of up to max starts after a quiet spell)",
    flow.rate_limits,
    formatRateLimits,
  );
  add("Held keys (none of their jobs claimed until then)", flow.holds, formatHolds);
  add(
    "Fairness weights (jobs started per job of a weight-1 key under contention)",
    flow.weights,
    formatWeights,
  );
  return sections;
}

/**
 * The human-readable form of `shoal limit list`: the concurrency limits, rate limits, holds
 * and fairness weights, each kind that has rows under its heading.
 */
export function formatFlowLimits(flow: Omit<FlowStatus, "paused">): string {
  const sections = flowSections(flow);
  return sections.length === 0 ? NO_FLOW_LIMITS : sections.join("\n");
}

/** The human-readable form of `shoal queue list`. */
export function formatPausedQueues(rows: PausedQueue[]): string {
  if (rows.length === 0) return "No paused queues\n";
  return table(["queue", "paused at"], rows.map((p) => [p.queue, iso(p.paused_at)]));
}

/** The jobs no live consumer runs, under the queues; nothing when there are none. */
function formatUnserved(rows: UnservedJobs[]): string {
  if (rows.length === 0) return "";
  return "\nReady jobs no live consumer runs (they wait until one that knows the task claims from the queue):\n" +
    table(
      ["queue", "task", "ready"],
      rows.map((r) => [r.queue, r.task, `${r.exact ? "" : ABOUT}${r.ready}`]),
    );
}

/** One `--watch` sample: the status plus the totals rates are computed from. */
export interface WatchSample {
  /** The database clock when the sample was taken. */
  at: Date;
  status: Status;
  totals: JobTotals;
}

/** Jobs per second between two samples; null on the first sample or after a stats reset. */
export interface Rates {
  completed_per_s: number | null;
  dead_per_s: number | null;
}

/**
 * Take one `--watch` sample: the status from `readDb` when given (a replica), the totals
 * the rates come from always from `db` (the primary: a standby's statistics do not count
 * what its replay deletes).
 */
export async function watchSample(
  db: Db,
  options: StatusOptions & { readDb?: Db } = {},
): Promise<WatchSample> {
  const { readDb, ...statusOptions } = options;
  const { at, totals } = await jobTotals(db);
  return { at, status: await status(readDb ?? db, statusOptions), totals };
}

/**
 * Completed and dead-lettered jobs per second from two samples. A job dead-lettered is
 * deleted from the live table too, so it is taken out of the completed count.
 */
export function rates(previous: WatchSample | null, current: WatchSample): Rates {
  const seconds = previous ? (current.at.getTime() - previous.at.getTime()) / 1000 : 0;
  if (!previous || seconds <= 0) return { completed_per_s: null, dead_per_s: null };
  const deleted = current.totals.deleted - previous.totals.deleted;
  const dead = current.totals.dead - previous.totals.dead;
  if (deleted < 0 || dead < 0) return { completed_per_s: null, dead_per_s: null }; // reset
  return {
    completed_per_s: round(Math.max(0, deleted - dead) / seconds),
    dead_per_s: round(dead / seconds),
  };
}

function round(n: number): number {
  return Math.round(n * 10) / 10;
}

/** `[#####-----]  50% 5/10`: `width` cells, clamped to 0..100 %. */
export function progressBar(done: number, total: number, width = 20): string {
  const fraction = total > 0 ? Math.min(1, Math.max(0, done / total)) : 1;
  const filled = Math.round(fraction * width);
  const percent = `${Math.floor(fraction * 100)}%`.padStart(4);
  return `[${"#".repeat(filled)}${"-".repeat(width - filled)}] ${percent} ${done}/${total}`;
}

/** Clear the screen and move the cursor home: each frame redraws in place. */
export const CLEAR_SCREEN = "\x1b[H\x1b[2J";

/** One `--watch` frame as text (without the clear-screen prefix). */
export function formatWatchFrame(
  sample: WatchSample,
  r: Rates,
  options: { intervalMs: number },
): string {
  const rate = (n: number | null) => (n === null ? "-" : `${n.toFixed(1)}/s`);
  return [
    `shoal status at ${sample.at.toISOString()}, every ${
      formatDuration(options.intervalMs)
    } (Ctrl-C quits)`,
    `completed ${rate(r.completed_per_s)}  dead-lettered ${rate(r.dead_per_s)}  (all queues)`,
    "",
    formatStatus(sample.status, { bars: true }),
  ].join("\n");
}

/** One `--watch --json` line: the status (same keys as `shoal status --json`) plus `at` and `rates`. */
export function formatWatchJson(sample: WatchSample, r: Rates): string {
  return JSON.stringify({ at: sample.at, rates: r, ...sample.status }) + "\n";
}

export interface WatchOptions {
  intervalMs: number;
  json: boolean;
  /** Count every job on every redraw (`--exact`). */
  exact?: boolean;
  /** Read the status from this pool (`--read-database-url`), the rates' totals from `db`. */
  readDb?: Db;
  write(text: string): void;
}

/**
 * Redraw the status every interval until `stop` aborts. A failed sample is shown (and
 * the next one tried) instead of ending the watch: the database may be restarting.
 */
export async function watchStatus(db: Db, options: WatchOptions, stop: AbortSignal): Promise<void> {
  let previous: WatchSample | null = null;
  while (!stop.aborted) {
    try {
      const sample = await watchSample(db, {
        exact: options.exact,
        ...(options.readDb ? { readDb: options.readDb, readReplica: true } : {}),
      });
      const r = rates(previous, sample);
      previous = sample;
      options.write(
        options.json
          ? formatWatchJson(sample, r)
          : CLEAR_SCREEN + formatWatchFrame(sample, r, options),
      );
    } catch (error) {
      const message = `Cannot read status: ${describeError(error)}`;
      options.write(
        options.json
          ? JSON.stringify({ at: new Date(), error: message }) + "\n"
          : `${CLEAR_SCREEN}${message}\n`,
      );
    }
    await delay(options.intervalMs, stop);
  }
}
