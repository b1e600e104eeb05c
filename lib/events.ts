/**
 * Events that jobs wait for (`shoal.events`, sql/025_events.sql; issue 17, docs/workflows.md
 * "Events").
 *
 * - `emitEvent(db, name, key, payload)` (and `shoal.emit_event` in SQL, `shoal event emit` on
 *   the CLI) stores the event and delivers it to every job waiting on (name, key) at that
 *   moment (broadcast), making each runnable in the same transaction
 *   (sql/functions/events.sql).
 * - `ctx.waitForEvent(name, { key, timeout })` (lib/run_job.ts) runs waitForEvent() here: under
 *   the event's lock it takes the oldest kept event of (name, key) its job has not received
 *   yet, or records the wait and hands the job back (lib/queue.ts suspendClaim()) until an
 *   emit makes it runnable or its timeout comes.
 * - Events are kept {@link EVENT_RETENTION_MS} (a day), then removed by the reaper
 *   (pruneEvents()).
 *
 * @module
 */
import {
  checkDb,
  checkInteger,
  checkOptions,
  isName,
  MAX_INT4,
  MAX_SPAN_MS,
  refusal,
} from "./args.ts";
import type { Db, Sql } from "./db.ts";
import { checkPayload, DEFAULT_MAX_PAYLOAD_BYTES, MAX_KEY_LENGTH, NAME_RULE } from "./names.ts";
import { type JobRef, suspendClaim } from "./queue.ts";
import {
  closeWait,
  readWait,
  recordWait,
  type StepKind,
  SUSPEND_IDLE_MS,
  type Wake,
} from "./steps.ts";

/** Emitted events are kept this long (a wait that starts later still finds them), then pruned. */
export const EVENT_RETENTION_MS = 86_400_000;

/** The longest event key, in characters (as a job's dedupe key). */
export const MAX_EVENT_KEY_LENGTH = MAX_KEY_LENGTH;

/**
 * What `ctx.waitForEvent` returns: the event's payload, or that the timeout came first.
 * `timedOut` tells them apart (a payload may itself be anything).
 */
export type EventResult<T = Record<string, unknown>> =
  | { timedOut: false; payload: T }
  | { timedOut: true; payload: null };

/** Throw unless `name` is an event name (the task name rule). */
export function checkEventName(fn: string, name: unknown): string {
  if (!isName(name)) throw refusal(`name for ${fn}()`, `an event name (${NAME_RULE})`, name);
  return name;
}

/** Throw unless `key` is an event key: text of at most {@link MAX_EVENT_KEY_LENGTH} characters. */
export function checkEventKey(fn: string, key: unknown): string {
  if (typeof key !== "string") {
    throw refusal(
      `key for ${fn}()`,
      `a string of at most ${MAX_EVENT_KEY_LENGTH} characters ("" for none)`,
      key,
    );
  }
  if (key.length > MAX_EVENT_KEY_LENGTH) {
    throw new RangeError(
      `Invalid key for ${fn}(): expected at most ${MAX_EVENT_KEY_LENGTH} characters, not ${key.length}`,
    );
  }
  return key;
}

/**
 * Emit an event: store it (kept a day) and deliver it to every job waiting on (name, key),
 * each made runnable in this same transaction (pass a transaction to emit with your own
 * writes). Returns how many waits received it. `key` is "" for an event without one; the
 * payload a JSON object within the payload limit (`maxPayloadBytes`, default 1 MiB; Postgres
 * checks its own `shoal.max_payload_bytes` again).
 */
export async function emitEvent(
  db: Db,
  name: string,
  key: string,
  payload: Record<string, unknown> = {},
  options: { maxPayloadBytes?: number } = {},
): Promise<number> {
  checkDb("emitEvent", db);
  checkEventName("emitEvent", name);
  checkEventKey("emitEvent", key);
  checkOptions("emitEvent", options, "options", ["maxPayloadBytes"]);
  const max = options.maxPayloadBytes ?? DEFAULT_MAX_PAYLOAD_BYTES;
  checkInteger("emitEvent", "options.maxPayloadBytes", max, { min: 1, max: MAX_INT4 });
  const json = checkPayload(payload, max, () => "payload for emitEvent()");
  const [row] = await db<{ received: number }[]>`
    select shoal.emit_event(${name}::text, ${key}::text, ${json}::text::jsonb) as received`;
  return row!.received;
}

/** A wait of a job, as ctx.waitForEvent asked for it. */
export interface WaitSpec {
  /** The record's name (default the event's): one name is one wait of the job. */
  name: string;
  event: string;
  key: string;
  /** When the wait times out; null: never. */
  timeout: Wake | null;
}

/** How a wait went: received or timed out (the run goes on), waiting (handed back), or lost. */
export type WaitOutcome =
  | { state: "received"; payload: unknown }
  | { state: "timed_out" }
  | { state: "waiting"; until: Date }
  | { state: "lost" }
  | { state: "other"; kind: StepKind; event?: { name: string; key: string } };

/**
 * Start (or go on with) a wait of the claimed `job`, in one transaction holding the event's
 * lock and the job's row (fenced by its token):
 * 1. a record already received or timed out returns that (an earlier run's, or an emit's while
 *    this run was claimed);
 * 2. a waiting record whose timeout has come is closed as timed out;
 * 3. else the oldest kept event of (event, key) the job has not received is taken: recorded as
 *    received and returned, the run goes on;
 * 4. else the wait is recorded (or stays) waiting and the job handed back until its timeout.
 * "other" says the name is another kind of record, or a wait for another event (nothing
 * changed); "lost" that the claim moved on (nothing changed).
 */
export async function waitForEvent(sql: Sql, job: JobRef, wait: WaitSpec): Promise<WaitOutcome> {
  return await sql.begin(async (tx) => {
    await lockEvent(tx, wait.event, wait.key);
    const { ours, kind, record } = await readWait(tx, job, wait.name);
    if (!ours) return { state: "lost" };
    if (kind !== null && kind !== "wait") return { state: "other", kind };
    if (record !== undefined) {
      if (record.event_name !== wait.event || record.event_key !== wait.key) {
        return {
          state: "other",
          kind: "wait",
          event: { name: record.event_name, key: record.event_key },
        };
      }
      if (record.state === "received") return { state: "received", payload: record.payload };
      if (record.state === "timed_out") return { state: "timed_out" };
      if (record.due) {
        await closeWait(tx, job.id, wait.name, null);
        return { state: "timed_out" };
      }
    }
    const kept = await keptEvent(tx, job.id, wait.event, wait.key);
    if (kept !== null) {
      if (record === undefined) await recordWait(tx, job.id, wait, kept);
      else await closeWait(tx, job.id, wait.name, kept);
      return { state: "received", payload: kept.payload };
    }
    const runAt = record === undefined ? await recordWait(tx, job.id, wait, null) : record.until;
    const until = await suspendClaim(tx, job, runAt);
    return until === null ? { state: "lost" } : { state: "waiting", until };
  }) as WaitOutcome;
}

/**
 * Take the event lock of (name, key) for the rest of the transaction (sql/functions/events.sql),
 * and bound how long the transaction may sit idle holding it (lib/steps.ts SUSPEND_IDLE_MS).
 */
async function lockEvent(tx: Db, name: string, key: string): Promise<void> {
  await tx`
    select set_config('idle_in_transaction_session_timeout', ${String(SUSPEND_IDLE_MS)}::text,
                      true),
      shoal.lock_event(${name}::text, ${key}::text)`;
}

/** The oldest event of (name, key) still kept that job `jobId` has not received; else null. */
async function keptEvent(
  tx: Db,
  jobId: string,
  name: string,
  key: string,
): Promise<{ id: string; payload: unknown } | null> {
  const [row] = await tx<{ id: string; payload: unknown }[]>`
    select e.id::text as id, e.payload from shoal.events e
    where e.name = ${name}::text and e.key = ${key}::text
      and e.emitted_at > now() - ${EVENT_RETENTION_MS}::bigint * interval '1 ms'
      and not exists (
        select 1 from shoal.job_steps s where s.job_id = ${jobId}::bigint and s.event_id = e.id)
    order by e.id
    limit 1`;
  return row ?? null;
}

/** Whether any event is past its retention (the reaper's cheap check). */
export async function hasStaleEvents(
  db: Db,
  olderThanMs: number = EVENT_RETENTION_MS,
): Promise<boolean> {
  const [row] = await db<{ found: boolean }[]>`
    select exists (
      select 1 from shoal.events e
      where e.emitted_at < now() - ${olderThanMs}::bigint * interval '1 ms') as found`;
  return row!.found;
}

/**
 * Remove events emitted more than `olderThanMs` ago (default a day), the oldest `limit` of
 * them. A wait that received one keeps its payload in its own record. Returns how many went.
 */
export async function pruneEvents(
  db: Db,
  options: { olderThanMs?: number; limit: number },
): Promise<number> {
  checkDb("pruneEvents", db);
  const olderThanMs = options.olderThanMs ?? EVENT_RETENTION_MS;
  checkInteger("pruneEvents", "options.olderThanMs", olderThanMs, { min: 0, max: MAX_SPAN_MS });
  checkInteger("pruneEvents", "options.limit", options.limit, { min: 1, max: MAX_INT4 });
  const [row] = await db<{ n: number }[]>`
    with old as (
      select e.id from shoal.events e
      where e.emitted_at < now() - ${olderThanMs}::bigint * interval '1 ms'
      order by e.emitted_at
      limit ${options.limit}::integer
    ),
    removed as (delete from shoal.events e where e.id in (select o.id from old o) returning 1)
    select count(*)::integer as n from removed`;
  return row!.n;
}
