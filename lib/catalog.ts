/**
 * The task catalog: `shoal.tasks` (every task a consumer ever registered, with its queue,
 * max attempts and timeout) and `shoal.consumers` (the consumers running now, with the
 * queues they claim from and the tasks they know). Every statement on both tables lives
 * here; the tables are created by `sql/009_task_catalog.sql`.
 *
 * A consumer registers its tasks when it starts (the last registration of a task wins),
 * refreshes its `last_seen_at` about once a minute and deletes its row on a graceful stop;
 * while it holds jobs, its heartbeat records how many, by queue (`reportInFlight`), and
 * what it finished since it started, by queue (`ConsumerTotals`; the dashboard reads them
 * with `readConsumerTotals` and differences them with `TotalsHistory`).
 * Enqueues read the catalog in SQL, not here: a job not given a queue or max attempts
 * takes its task's (the catalog rule, at the top of `sql/functions/queue.sql`). `shoal
 * status` reads the live consumers to tell ready jobs that no consumer runs.
 *
 * @module
 */
import type { Db } from "./db.ts";
import type { AnyTask } from "./tasks.ts";

/** How often a running consumer refreshes its `last_seen_at` (and its tasks'). */
export const CATALOG_REFRESH_MS = 60_000;
/** A consumer not seen for this long is not live: three refreshes missed. */
export const LIVE_WINDOW_MS = 3 * CATALOG_REFRESH_MS;
/** A consumer row not seen for this long is removed (the reaper's housekeeping). */
export const STALE_CONSUMER_MS = 86_400_000;

/**
 * One task as a consumer registers it: its definition's own settings, each null when the
 * definition sets none.
 */
export interface TaskRegistration {
  name: string;
  /** Null: enqueues fall back to `default` (a fan-out's child or callback: its producer's). */
  queue: string | null;
  /** Null: enqueues fall back to 25. */
  maxAttempts: number | null;
  /** Null: each consumer applies its --task-timeout. */
  timeoutMs: number | null;
}

/** A row of `shoal.tasks` (null settings: the definition sets none). */
export interface CatalogTask {
  name: string;
  queue: string | null;
  max_attempts: number | null;
  timeout_ms: number | null;
  /** The worker id (host:pid) of the consumer that wrote these settings last. */
  registered_by: string;
  registered_at: Date;
  last_seen_at: Date;
}

/** A row of `shoal.consumers`. */
export interface ConsumerRow {
  worker_id: string;
  queues: string[];
  tasks: string[];
  started_at: Date;
  last_seen_at: Date;
}

/** A consumer and the tasks it registers. */
export interface ConsumerRegistration {
  workerId: string;
  queues: string[];
  tasks: TaskRegistration[];
}

/**
 * A task whose registration replaced different settings while other live consumers run it:
 * the settings it had, who registered them, and the live consumers (this one aside) that
 * run the task.
 */
export interface RegistrationConflict {
  name: string;
  queue: string | null;
  max_attempts: number | null;
  timeout_ms: number | null;
  registered_by: string;
  live_workers: string[];
}

/** The catalog entries of a consumer's tasks, by name (the order rows are locked in). */
export function registrationsOf(tasks: readonly AnyTask[]): TaskRegistration[] {
  return tasks
    .map((task) => ({
      name: task.name,
      queue: task.queue ?? null,
      maxAttempts: task.maxAttempts ?? null,
      timeoutMs: task.timeoutMs ?? null,
    }))
    .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

/**
 * A registration's tasks as the JSON array the statements read with jsonb_to_recordset, and
 * its queues as a JSON array. JSON rather than array parameters: postgres.js sends an array
 * parameter as text when it is the first statement on a new pool and the pool has not yet
 * learnt the array types (seen in tests: "malformed array literal").
 */
function documents(consumer: ConsumerRegistration): { tasks: string; queues: string } {
  return {
    tasks: JSON.stringify(consumer.tasks.map((t) => ({
      name: t.name,
      queue: t.queue,
      max_attempts: t.maxAttempts,
      timeout_ms: t.timeoutMs,
    }))),
    queues: JSON.stringify(consumer.queues),
  };
}

/**
 * A consumer's tasks as rows (name, queue, max_attempts, timeout_ms), from the JSON
 * `documents()` makes: a fragment for a `with` clause. JSON, not array parameters: see
 * documents().
 */
function taskRows(db: Db, tasksJson: string) {
  return db`
    select r.name, r.queue, r.max_attempts, r.timeout_ms
    from jsonb_to_recordset(${tasksJson}::text::jsonb)
      as r(name text, queue text, max_attempts integer, timeout_ms integer)`;
}

/**
 * Register a consumer and its tasks in one statement: its row in `shoal.consumers` (started
 * and seen now), and each task's settings in `shoal.tasks` (the last registration wins).
 * Returns the tasks whose settings differed from those registered before while other live
 * consumers run them: the caller warns about them. Rows are written in name order, so two
 * consumers registering at once never deadlock.
 */
export async function registerConsumer(
  db: Db,
  consumer: ConsumerRegistration,
): Promise<RegistrationConflict[]> {
  const doc = documents(consumer);
  // One snapshot for the whole statement: `before` reads the rows as they were before the
  // upsert in the same statement rewrote them.
  return await db<RegistrationConflict[]>`
    with mine as (${taskRows(db, doc.tasks)}),
    me as (
      insert into shoal.consumers as k (worker_id, queues, tasks, totals, totals_at)
      values (${consumer.workerId}::text,
              array(select jsonb_array_elements_text(${doc.queues}::text::jsonb)),
              array(select m.name from mine m order by m.name), '{}', now())
      on conflict (worker_id) do update
      set queues = excluded.queues, tasks = excluded.tasks, started_at = now(),
          last_seen_at = now(), totals = '{}', totals_at = now(), heartbeat_ms = null
    ),
    before as (
      select t.name, t.queue, t.max_attempts, t.timeout_ms, t.registered_by
      from shoal.tasks t where t.name in (select m.name from mine m)
    ),
    written as (
      insert into shoal.tasks as t (name, queue, max_attempts, timeout_ms, registered_by)
      select m.name, m.queue, m.max_attempts, m.timeout_ms, ${consumer.workerId}::text
      from mine m order by m.name
      on conflict (name) do update
      set queue = excluded.queue, max_attempts = excluded.max_attempts,
          timeout_ms = excluded.timeout_ms, registered_by = excluded.registered_by,
          registered_at = now(), last_seen_at = now()
    )
    -- live_workers as JSON, for the reason listLiveConsumers() gives.
    select b.name, b.queue, b.max_attempts, b.timeout_ms, b.registered_by, w.live_workers
    from before b
    join mine m on m.name = b.name
    cross join lateral (
      select jsonb_agg(k.worker_id order by k.worker_id) as live_workers
      from shoal.consumers k
      where k.worker_id <> ${consumer.workerId}::text and b.name = any(k.tasks)
        and k.last_seen_at > now() - ${LIVE_WINDOW_MS}::integer * interval '1 ms'
    ) w
    where (b.queue, b.max_attempts, b.timeout_ms)
        is distinct from (m.queue, m.max_attempts, m.timeout_ms)
      and w.live_workers is not null
    order by b.name`;
}

/**
 * The periodic refresh: the consumer and its tasks were seen now. Rows that went missing
 * (removed by hand, or the registration at start failed) come back; settings another
 * consumer registered since are left as they are (the last registration still wins).
 * Returns whether the consumer's row came back: it starts again then (its start time and
 * totals are new), so the caller starts its totals again too.
 */
export async function refreshConsumer(db: Db, consumer: ConsumerRegistration): Promise<boolean> {
  const doc = documents(consumer);
  const [row] = await db<{ inserted: boolean }[]>`
    with mine as (${taskRows(db, doc.tasks)}),
    me as (
      insert into shoal.consumers as k (worker_id, queues, tasks, totals, totals_at)
      values (${consumer.workerId}::text,
              array(select jsonb_array_elements_text(${doc.queues}::text::jsonb)),
              array(select m.name from mine m order by m.name), '{}', now())
      on conflict (worker_id) do update
      set queues = excluded.queues, tasks = excluded.tasks, last_seen_at = now()
      -- xmax is 0 for a row this statement inserted, not for one it updated.
      returning (k.xmax = 0) as inserted
    ),
    written as (
      insert into shoal.tasks as t (name, queue, max_attempts, timeout_ms, registered_by)
      select m.name, m.queue, m.max_attempts, m.timeout_ms, ${consumer.workerId}::text
      from mine m order by m.name
      on conflict (name) do update set last_seen_at = now()
    )
    select inserted from me`;
  return row?.inserted ?? false;
}

/** The jobs a consumer holds on one queue: running (or being recorded) and buffered. */
export interface InFlight {
  running: number;
  prefetched: number;
}

/** What a consumer finished on one queue since it started (see sql/019_consumer_totals.sql). */
export interface QueueTotals {
  /** Acked, or its fan-out opened. */
  completed: number;
  /** Attempts that failed and were retried with a backoff. */
  failed: number;
  /** Dead-lettered: failed for good, or poisoned (claimed too often without finishing). */
  dead: number;
}

/**
 * Most queues a consumer reports totals for: the document stays about 1.5 kB with short
 * names, under the size Postgres moves out of line (sql/019_consumer_totals.sql). A
 * consumer only finishes jobs of the queues it claims from, so this binds only one told
 * to claim from more: the first MAX_REPORTED_QUEUES to finish a job are reported.
 */
export const MAX_REPORTED_QUEUES = 32;

/**
 * A consumer's cumulative totals by queue, kept in memory and written with its heartbeat.
 * Counting is a map lookup and an increment per finished job; nothing is sent per job.
 */
export class ConsumerTotals {
  readonly #byQueue = new Map<string, QueueTotals>();
  #version = 0;
  #dropped = false;

  /**
   * Start again from nothing: the consumer's row was (re)created with empty totals. The
   * version stays: nothing new to report.
   */
  reset(): void {
    this.#byQueue.clear();
  }

  /** A job of `queue` ended this way; false when the queue is past the cap (not counted). */
  add(queue: string, outcome: keyof QueueTotals): boolean {
    let totals = this.#byQueue.get(queue);
    if (totals === undefined) {
      if (this.#byQueue.size >= MAX_REPORTED_QUEUES) {
        this.#dropped = true;
        return false;
      }
      this.#byQueue.set(queue, totals = { completed: 0, failed: 0, dead: 0 });
    }
    totals[outcome]++;
    this.#version++;
    return true;
  }

  /** Changes with every count: a report is due when it differs from the last one sent. */
  get version(): number {
    return this.#version;
  }

  /** Whether a queue past MAX_REPORTED_QUEUES finished jobs (they are not reported). */
  get dropped(): boolean {
    return this.#dropped;
  }

  /** The totals as the document written to `shoal.consumers.totals`. */
  toJSON(): Record<string, QueueTotals> {
    return Object.fromEntries(this.#byQueue);
  }
}

/** What a consumer's heartbeat records: what it holds, and what it finished. */
export interface ConsumerReport {
  /** Totals by queue since the consumer started (none: left as they are). */
  totals?: Record<string, QueueTotals>;
  /** How often the consumer reports (the totals' resolution). */
  heartbeatMs?: number;
}

/**
 * Record what a consumer holds, by queue (none: an empty map), valid for `validMs` (until its
 * claims would lapse unless its heartbeat extends them): the running and prefetched counts
 * of queues too large to count (the count rule, `sql/functions/counts.sql`). With
 * `report.totals`, the same update records what it finished by queue, and when
 * (sql/019_consumer_totals.sql). A consumer whose row is missing (its registration failed)
 * records nothing until it registers.
 */
export async function reportInFlight(
  db: Db,
  workerId: string,
  inFlight: ReadonlyMap<string, InFlight>,
  validMs: number,
  report: ConsumerReport = {},
): Promise<void> {
  // The map as one JSON document (see documents()): {"queue": {"running": n, ...}, ...}.
  const doc = JSON.stringify(Object.fromEntries(inFlight));
  const totals = report.totals === undefined ? null : JSON.stringify(report.totals);
  await db`
    update shoal.consumers
    set in_flight = ${doc}::text::jsonb,
        in_flight_until = now() + ${validMs}::integer * interval '1 ms',
        totals = coalesce(${totals}::text::jsonb, totals),
        totals_at = case when ${totals}::text is null then totals_at else now() end,
        heartbeat_ms = coalesce(${report.heartbeatMs ?? null}::integer, heartbeat_ms)
    where worker_id = ${workerId}::text`;
}

/** One live consumer's totals as it last reported them. */
export interface ConsumerTotalsRow {
  worker_id: string;
  /** When it registered: a restart under the same worker id is a new consumer. */
  started_at: Date;
  /** When it wrote these totals. */
  totals_at: Date;
  /** How often it reports (null until its first report). */
  heartbeat_ms: number | null;
  totals: Record<string, QueueTotals>;
}

/** The totals of every live consumer, read at `at` (the database's clock). */
export interface TotalsSample {
  at: Date;
  consumers: ConsumerTotalsRow[];
}

/**
 * The totals of the live consumers (seen within LIVE_WINDOW_MS) that reported some, with
 * the database's time of the read: one statement over a row per consumer.
 */
export async function readConsumerTotals(db: Db): Promise<TotalsSample> {
  const rows = await db<(ConsumerTotalsRow & { at: Date })[]>`
    select now() as at, k.worker_id, k.started_at, k.totals_at, k.heartbeat_ms, k.totals
    from (select now()) n
    left join shoal.consumers k
      on k.totals is not null and k.totals_at is not null
      and k.last_seen_at > now() - ${LIVE_WINDOW_MS}::integer * interval '1 ms'
    order by k.worker_id`;
  const at = rows[0]!.at;
  const consumers = rows.filter((r) => r.worker_id !== null).map((r) => ({
    worker_id: r.worker_id,
    started_at: r.started_at,
    totals_at: r.totals_at,
    heartbeat_ms: r.heartbeat_ms,
    totals: r.totals,
  }));
  return { at, consumers };
}

/** The totals of live consumers summed by queue (each since its own start), by queue name. */
export function sumByQueue(sample: TotalsSample): Map<string, QueueTotals> {
  const sums = new Map<string, QueueTotals>();
  for (const c of sample.consumers) {
    for (const [queue, t] of Object.entries(c.totals)) {
      const sum = sums.get(queue) ?? { completed: 0, failed: 0, dead: 0 };
      sum.completed += t.completed;
      sum.failed += t.failed;
      sum.dead += t.dead;
      sums.set(queue, sum);
    }
  }
  return new Map([...sums].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}

/** What some consumer finished on a queue between two of its reports. */
interface TotalsStep {
  queue: string;
  /** Epoch ms: the jobs finished within (from, to]. */
  from: number;
  to: number;
  counts: QueueTotals;
}

/** A consumer as last seen: its identity, report and when it was read. */
interface Seen {
  row: ConsumerTotalsRow;
  readAt: number;
}

/** Per-queue rates over time bins: the chart of one queue, or of all (queue ""). */
export interface QueueRateSeries {
  queue: string;
  /** Each bin's end, seconds since the epoch. */
  t: number[];
  completedPerS: number[];
  failedPerS: number[];
  deadPerS: number[];
  /** (failed + dead) / (completed + failed + dead) in percent; null with nothing finished. */
  failurePct: (number | null)[];
  /** The window's sums. */
  total: QueueTotals;
}

/**
 * Rates from successive samples of readConsumerTotals(), per queue, robust to consumers
 * coming and going. Differences are taken per consumer (worker id and start time):
 * - a step is what a consumer finished between two of its reports, placed at their times
 *   (the database's clock), from no earlier than one heartbeat before the read that saw
 *   the older report (a consumer that reports nothing new writes nothing; one that did
 *   would have been seen then);
 * - a step with any count going down (a reset the start time did not show) is dropped, and
 *   the newer report becomes the baseline;
 * - a consumer first seen after the history began, started since, counts from nothing; any
 *   other first sight is only a baseline (what it did before is not in the window);
 * - a consumer that stops reporting or disappears contributes nothing after (remembered for
 *   the window: one that comes back is differenced against its last report).
 * Steps older than `windowMs` are forgotten.
 */
export class TotalsHistory {
  readonly #windowMs: number;
  #seen = new Map<string, Seen>();
  #steps: TotalsStep[] = [];
  #firstReadAt: number | null = null;
  #lastReadAt: number | null = null;

  constructor(windowMs: number) {
    this.#windowMs = windowMs;
  }

  /** When the last sample was read (epoch ms, the database's clock), or null. */
  get lastReadAt(): number | null {
    return this.#lastReadAt;
  }

  /** Take in a sample; samples must come in the order they were read. */
  add(sample: TotalsSample): void {
    const readAt = sample.at.getTime();
    this.#firstReadAt ??= readAt;
    for (const row of sample.consumers) {
      const id = `${row.worker_id}\u0000${row.started_at.getTime()}`;
      const before = this.#seen.get(id);
      this.#seen.set(id, { row, readAt });
      if (before !== undefined) {
        this.#step(before, row);
      } else if (row.started_at.getTime() >= this.#firstReadAt) {
        // Started while we watched: everything it counted happened since its start.
        const from = row.started_at.getTime();
        const empty: ConsumerTotalsRow = { ...row, totals: {}, totals_at: row.started_at };
        this.#step({ row: empty, readAt: from }, row);
      }
    }
    this.#lastReadAt = readAt;
    const oldest = readAt - this.#windowMs;
    this.#steps = this.#steps.filter((s) => s.to > oldest);
    // A consumer missing from a sample (not live for a while, or gone) is remembered for the
    // window: should it come back, it is differenced against its last report, not counted
    // from nothing again.
    for (const [id, s] of this.#seen) if (s.readAt < oldest) this.#seen.delete(id);
  }

  #step(before: Seen, row: ConsumerTotalsRow): void {
    const prior = before.row.totals_at.getTime();
    // Two reports within a millisecond (a Date keeps no finer time): still in order. The
    // same report read twice has no differences, so no step.
    const to = Math.max(row.totals_at.getTime(), prior + 1);
    const steps: TotalsStep[] = [];
    // Without a heartbeat known (the baseline registration wrote), from the older report.
    const heartbeatMs = row.heartbeat_ms ?? Infinity;
    const from = Math.max(prior, before.readAt - heartbeatMs);
    for (const [queue, now] of Object.entries(row.totals)) {
      const was = before.row.totals[queue] ?? { completed: 0, failed: 0, dead: 0 };
      const counts = {
        completed: now.completed - was.completed,
        failed: now.failed - was.failed,
        dead: now.dead - was.dead,
      };
      if (counts.completed < 0 || counts.failed < 0 || counts.dead < 0) return;
      if (counts.completed + counts.failed + counts.dead === 0) continue;
      steps.push({ queue, from: Math.min(from, to - 1), to, counts });
    }
    // A queue missing from the newer report went down to nothing: a reset.
    for (const queue of Object.keys(before.row.totals)) if (!(queue in row.totals)) return;
    this.#steps.push(...steps);
  }

  /** The queues with steps in the window, by name. */
  queues(): string[] {
    return [...new Set(this.#steps.map((s) => s.queue))].sort();
  }

  /**
   * The rates of `queue` (undefined: all queues together, named "") in bins of `binMs` over
   * the window ending at the last read. A step is spread evenly over its time, so a bin gets
   * the share of each step that falls in it; the last heartbeat interval fills in as the
   * consumers report it.
   */
  series(binMs: number, queue?: string): QueueRateSeries {
    const out: QueueRateSeries = {
      queue: queue ?? "",
      t: [],
      completedPerS: [],
      failedPerS: [],
      deadPerS: [],
      failurePct: [],
      total: { completed: 0, failed: 0, dead: 0 },
    };
    if (this.#lastReadAt === null) return out;
    const end = Math.ceil(this.#lastReadAt / binMs) * binMs;
    const start = Math.max(end - this.#windowMs, Math.floor(this.#firstReadAt! / binMs) * binMs);
    const bins = Math.max(0, Math.round((end - start) / binMs));
    const sums = Array.from({ length: bins }, () => ({ completed: 0, failed: 0, dead: 0 }));
    for (const s of this.#steps) {
      if (queue !== undefined && s.queue !== queue) continue;
      const span = s.to - s.from;
      const first = Math.max(0, Math.floor((s.from - start) / binMs));
      const last = Math.min(bins - 1, Math.floor((s.to - 1 - start) / binMs));
      for (let i = first; i <= last; i++) {
        const lo = Math.max(s.from, start + i * binMs);
        const hi = Math.min(s.to, start + (i + 1) * binMs);
        if (hi <= lo) continue;
        const share = (hi - lo) / span;
        sums[i]!.completed += s.counts.completed * share;
        sums[i]!.failed += s.counts.failed * share;
        sums[i]!.dead += s.counts.dead * share;
      }
    }
    const perS = (n: number) => Math.round((n * 1000 * 100) / binMs) / 100;
    sums.forEach((b, i) => {
      out.t.push((start + (i + 1) * binMs) / 1000);
      out.completedPerS.push(perS(b.completed));
      out.failedPerS.push(perS(b.failed));
      out.deadPerS.push(perS(b.dead));
      const finished = b.completed + b.failed + b.dead;
      out.failurePct.push(
        finished > 0 ? Math.round((1000 * (b.failed + b.dead)) / finished) / 10 : null,
      );
      out.total.completed += b.completed;
      out.total.failed += b.failed;
      out.total.dead += b.dead;
    });
    out.total = {
      completed: Math.round(out.total.completed),
      failed: Math.round(out.total.failed),
      dead: Math.round(out.total.dead),
    };
    return out;
  }
}

/** A graceful stop: the consumer is gone (its tasks stay in the catalog). */
export async function unregisterConsumer(db: Db, workerId: string): Promise<void> {
  await db`delete from shoal.consumers where worker_id = ${workerId}::text`;
}

/** Catalog rows, by name: all of them, or those of `names` (unknown names are absent). */
export async function listCatalogTasks(
  db: Db,
  options: { names?: string[] } = {},
): Promise<CatalogTask[]> {
  // The names as JSON, for the reason documents() gives.
  const where = options.names === undefined
    ? db`true`
    : db`name in (select jsonb_array_elements_text(${JSON.stringify(options.names)}::text::jsonb))`;
  return await db<CatalogTask[]>`
    select name, queue, max_attempts, timeout_ms, registered_by, registered_at, last_seen_at
    from shoal.tasks where ${where} order by name`;
}

/** Consumers seen within LIVE_WINDOW_MS, by worker id. */
export async function listLiveConsumers(db: Db): Promise<ConsumerRow[]> {
  // Lists as JSON: a text[] column can come back as its text form when the statement is the
  // first on a new pool, before postgres.js has learnt the array types (seen in CI).
  return await db<ConsumerRow[]>`
    select worker_id, to_jsonb(queues) as queues, to_jsonb(tasks) as tasks, started_at,
      last_seen_at
    from shoal.consumers
    where last_seen_at > now() - ${LIVE_WINDOW_MS}::integer * interval '1 ms'
    order by worker_id`;
}

/** Whether any consumer row is older than `olderThanMs` (the reaper's cheap check). */
export async function hasStaleConsumers(db: Db, olderThanMs: number): Promise<boolean> {
  const [row] = await db<{ found: boolean }[]>`
    select exists (
      select 1 from shoal.consumers
      where last_seen_at < now() - ${olderThanMs}::bigint * interval '1 ms') as found`;
  return row!.found;
}

/** Remove consumer rows not seen for `olderThanMs` (consumers that died); returns how many. */
export async function pruneConsumers(
  db: Db,
  options: { olderThanMs: number; limit: number },
): Promise<number> {
  const rows = await db`
    delete from shoal.consumers where worker_id in (
      select worker_id from shoal.consumers
      where last_seen_at < now() - ${options.olderThanMs}::bigint * interval '1 ms'
      order by last_seen_at limit ${options.limit}::integer)
    returning worker_id`;
  return rows.length;
}
