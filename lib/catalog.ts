/**
 * The task catalog: `shoal.tasks` (every task a consumer ever registered, with its queue,
 * max attempts and timeout) and `shoal.consumers` (the consumers running now, with the
 * queues they claim from and the tasks they know). Every statement on both tables lives
 * here; the tables are created by `sql/009_task_catalog.sql`.
 *
 * A consumer registers its tasks when it starts (the last registration of a task wins),
 * refreshes its `last_seen_at` about once a minute and deletes its row on a graceful stop;
 * while it holds jobs, its heartbeat records how many, by queue (`reportInFlight`).
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
      insert into shoal.consumers as k (worker_id, queues, tasks)
      values (${consumer.workerId}::text,
              array(select jsonb_array_elements_text(${doc.queues}::text::jsonb)),
              array(select m.name from mine m order by m.name))
      on conflict (worker_id) do update
      set queues = excluded.queues, tasks = excluded.tasks, started_at = now(),
          last_seen_at = now()
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
 */
export async function refreshConsumer(db: Db, consumer: ConsumerRegistration): Promise<void> {
  const doc = documents(consumer);
  await db`
    with mine as (${taskRows(db, doc.tasks)}),
    me as (
      insert into shoal.consumers as k (worker_id, queues, tasks)
      values (${consumer.workerId}::text,
              array(select jsonb_array_elements_text(${doc.queues}::text::jsonb)),
              array(select m.name from mine m order by m.name))
      on conflict (worker_id) do update
      set queues = excluded.queues, tasks = excluded.tasks, last_seen_at = now()
    )
    insert into shoal.tasks as t (name, queue, max_attempts, timeout_ms, registered_by)
    select m.name, m.queue, m.max_attempts, m.timeout_ms, ${consumer.workerId}::text
    from mine m order by m.name
    on conflict (name) do update set last_seen_at = now()`;
}

/** The jobs a consumer holds on one queue: running (or being recorded) and buffered. */
export interface InFlight {
  running: number;
  prefetched: number;
}

/**
 * Record what a consumer holds, by queue (none: an empty map), valid for `validMs` (until its
 * claims would lapse unless its heartbeat extends them): the running and prefetched counts
 * of queues too large to count (the count rule, `sql/functions/counts.sql`). A consumer
 * whose row is missing (its registration failed) records nothing until it registers.
 */
export async function reportInFlight(
  db: Db,
  workerId: string,
  inFlight: ReadonlyMap<string, InFlight>,
  validMs: number,
): Promise<void> {
  // The map as one JSON document (see documents()): {"queue": {"running": n, ...}, ...}.
  const doc = JSON.stringify(Object.fromEntries(inFlight));
  await db`
    update shoal.consumers
    set in_flight = ${doc}::text::jsonb,
        in_flight_until = now() + ${validMs}::integer * interval '1 ms'
    where worker_id = ${workerId}::text`;
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
