/**
 * The scheduler role: under its lease, fire due schedules onto their queues, never twice.
 *
 * Due rows are fired in batches, one transaction per batch (up to BATCH_SIZE rows): check
 * our lease term once (fencing), claim the due rows with SKIP LOCKED, work out each row's
 * next slot here (lib/cron.ts), then in one savepoint insert every fired job with one
 * statement (enqueueMany, with the dedupe key `schedule:<name>:<slot>`) and advance every
 * row's next_run_at with one statement, then commit. A crash anywhere rolls all of it back;
 * a second scheduler skips the locked rows and then finds them no longer due.
 *
 * Each row stays isolated: a row whose cron or time zone cannot be read is disabled with its
 * error before anything is written; when the batch's insert or advance fails (one row's
 * payload over a limit set later, say), the savepoint rolls back and the batch fires row by
 * row, each in its own savepoint, so only the failing row records its error. A row with no
 * next_run_at records a baseline without firing; missed slots fire once (the due slot), or
 * with `backfill` N each of them up to N (oldest first), and the row moves to the next future
 * slot. Times come from `now()`.
 * The statements on `shoal.schedules` live in lib/schedule.ts; this module is the tick
 * (tickOnce) and the leader loop over it.
 *
 * @module
 */
import {
  checkBoolean,
  checkDate,
  checkInteger,
  checkObject,
  checkOptions,
  checkPool,
  checkSignal,
  checkString,
  MAX_INT4,
  MAX_TIMER_MS,
} from "./args.ts";
import { nextSlot } from "./cron.ts";
import { isDataError, type Sql } from "./db.ts";
import type postgres from "postgres";
import { formatDuration } from "./duration.ts";
import { checkTerm, holdLease, type LeaseTerm } from "./lease.ts";
import { runLeaderLoop } from "./leader.ts";
import { Sleeper } from "./sleep.ts";
import { describeError, logger } from "./log.ts";
import { enqueueMany, type JobSpec } from "./queue.ts";
import { metrics } from "./metrics.ts";
import {
  advanceSchedules,
  claimDueSchedules,
  disableSchedule,
  type DueSchedule,
  loadSchedulesFile,
  nextScheduleDueInMs,
  recordScheduleError,
  type ScheduleSlot,
  setScheduleBaselines,
  syncSchedules,
} from "./schedule.ts";

export const SCHEDULER_LEASE = "scheduler";
/**
 * Most rows one transaction fires: the rows stay locked, and the job insert holds them all,
 * until it commits. 500 keeps a batch well under a second here while making the per-batch
 * round trips (lease, claim, insert, advance, commit) negligible per fire.
 */
const BATCH_SIZE = 500;
/**
 * Most rows one tick handles; the rest wait for the next tick (which comes at once). The
 * leader loop checks its lease between ticks.
 */
const TICK_LIMIT = 5_000;

export interface TickOptions {
  /** The leader's term; every batch's transaction checks it (omit only in tests). */
  term?: LeaseTerm;
  /** Override the database clock (tests). */
  now?: Date;
  /** Most rows this tick handles (default 5,000). */
  limit?: number;
  /** Most rows one transaction handles (default 500). */
  batchSize?: number;
}

export interface TickResult {
  /** Slots fired (a backfilling schedule may fire several). */
  fired: number;
  baselined: number;
  disabled: number;
  failed: number;
  /** Milliseconds until the earliest enabled schedule is due (0: now), null when none. */
  nextDueInMs: number | null;
}

/** What one batch did; fires are counted in metrics only once their batch committed. */
interface BatchResult {
  claimed: number;
  fired: { name: string; lagMs: number }[];
  baselined: number;
  disabled: number;
  /** Rows that failed to fire: passed over for the rest of the tick. */
  failed: string[];
}

/** The batch's transaction. */
type Tx = postgres.TransactionSql<Record<string, never>>;

/** A claimed row to fire: the slots it fires (oldest first) and the slot it moves to. */
interface DueFire {
  row: DueSchedule;
  slots: Date[];
  next: Date;
}

/** Errors that will recur on every try: bad data, constraint or limit violations. */
function isPermanent(error: unknown): boolean {
  return error instanceof RangeError || error instanceof TypeError || isDataError(error);
}

/**
 * Each row's next slot after the claim's clock, or the error that makes its cron or time
 * zone unreadable. Rows of one batch share the clock, so each (cron, time zone) is worked
 * out once: a thousand rows on `* * * * * *` parse one expression.
 */
async function nextSlots(rows: DueSchedule[]): Promise<Map<string, Date | Error>> {
  const byExpr = new Map<string, Date | Error>();
  const byName = new Map<string, Date | Error>();
  for (const row of rows) {
    const expr = `${row.tz}\n${row.cron}\n${row.db_now.getTime()}`;
    let next = byExpr.get(expr);
    if (next === undefined) {
      try {
        next = await nextSlot(row.cron, row.tz, row.db_now);
      } catch (error) {
        next = error instanceof Error ? error : new Error(String(error));
      }
      byExpr.set(expr, next);
    }
    byName.set(row.name, next);
  }
  return byName;
}

/**
 * The slots a due row fires: its due slot alone (coalesce, backfill 0), or with backfill N
 * the due slot and the missed ones after it, oldest first, up to N in all.
 */
async function slotsToFire(row: DueSchedule): Promise<Date[]> {
  const slots = [row.next_run_at!];
  while (slots.length < row.backfill) {
    let slot: Date;
    try {
      slot = await nextSlot(row.cron, row.tz, slots[slots.length - 1]!);
    } catch (error) {
      // The cron was read for the row's next slot just now; should a past instant still
      // trip the parser, the slots found so far fire and the rest coalesce.
      logger("scheduler").warn("Schedule {schedule} cannot backfill past {slot}: {error}", {
        schedule: row.name,
        slot: slots[slots.length - 1]!.toISOString(),
        error: describeError(error),
      });
      break;
    }
    if (slot.getTime() > row.db_now.getTime()) break;
    slots.push(slot);
  }
  return slots;
}

/** The job one slot of a schedule enqueues. */
function jobOf(row: DueSchedule, slot: Date): JobSpec {
  return {
    task: row.task,
    payload: row.payload,
    // Without a queue of its own, the job takes its task's catalog queue as of now.
    queue: row.queue ?? undefined,
    priority: row.priority,
    key: `schedule:${row.name}:${slot.toISOString()}`,
  };
}

/**
 * Handle up to `size` due rows (not in `skip`) in one transaction: disable unreadable rows,
 * record baselines, then fire the rest with one insert and one advance, falling back to
 * row by row when that fails.
 */
async function fireBatch(
  sql: Sql,
  options: TickOptions,
  skip: string[],
  size: number,
): Promise<BatchResult> {
  const log = logger("scheduler");
  return await sql.begin(async (tx) => {
    const result: BatchResult = { claimed: 0, fired: [], baselined: 0, disabled: 0, failed: [] };
    if (options.term) await holdLease(tx, options.term, { now: options.now });
    const rows = await claimDueSchedules(tx, { now: options.now, skip, limit: size });
    result.claimed = rows.length;
    if (rows.length === 0) return result;
    const slots = await nextSlots(rows);
    const baselines: ScheduleSlot[] = [];
    const due: DueFire[] = [];
    for (const row of rows) {
      const next = slots.get(row.name)!;
      if (next instanceof Error) {
        await disableSchedule(tx, row.name, next.message);
        log.error("Schedule {schedule} disabled: {error}", {
          schedule: row.name,
          error: next.message,
        });
        result.disabled++;
      } else if (row.next_run_at === null) {
        baselines.push({ name: row.name, next });
      } else {
        due.push({ row, slots: await slotsToFire(row), next });
      }
    }
    await setScheduleBaselines(tx, baselines);
    result.baselined = baselines.length;
    if (due.length === 0) return result;
    try {
      await fireAll(tx, due);
      for (const fire of due) result.fired.push(...firedOf(fire));
    } catch (error) {
      if (due.length > 1) {
        log.warn("A batch of {count} fires failed, firing them one by one: {error}", {
          count: due.length,
          error: describeError(error),
        });
      }
      for (const fire of due) {
        if (await fireAlone(tx, fire, due.length > 1 ? undefined : error)) {
          result.fired.push(...firedOf(fire));
        } else {
          result.failed.push(fire.row.name);
        }
      }
    }
    return result;
  });
}

/** Fire every row of `due` in one savepoint: one job insert, one advance. */
async function fireAll(tx: Tx, due: DueFire[]): Promise<void> {
  await tx.savepoint(async (sp) => {
    await enqueueMany(sp, due.flatMap((fire) => fire.slots.map((slot) => jobOf(fire.row, slot))));
    await advanceSchedules(
      sp,
      due.map((fire) => ({ name: fire.row.name, next: fire.next })),
      due[0]!.row.db_now,
    );
  });
}

/**
 * Fire one row in its own savepoint; on failure record the error on the row (once per
 * distinct message, disabling it when permanent) while its lock is still held. `known` is
 * the error this row alone already met (a batch of one is not tried twice).
 */
async function fireAlone(
  tx: Tx,
  fire: DueFire,
  known?: unknown,
): Promise<boolean> {
  let error = known;
  if (error === undefined) {
    try {
      await fireAll(tx, [fire]);
      return true;
    } catch (caught) {
      error = caught;
    }
  }
  const permanent = isPermanent(error);
  const message = describeError(error).slice(0, 2000);
  if (await recordScheduleError(tx, fire.row.name, { message, disable: permanent })) {
    logger("scheduler").error("Schedule {schedule} failed to fire{disabled}: {error}", {
      schedule: fire.row.name,
      disabled: permanent ? " and was disabled" : "",
      error: message,
    });
  }
  return false;
}

/** Each slot a row fired, with its lag (the claim's clock minus the slot). */
function firedOf(fire: DueFire): { name: string; lagMs: number }[] {
  return fire.slots.map((slot) => ({
    name: fire.row.name,
    lagMs: fire.row.db_now.getTime() - slot.getTime(),
  }));
}

/**
 * Fire every due schedule once (up to the tick limit), a batch per transaction. Each row is
 * isolated: a row that fails is recorded and skipped for the rest of the tick, and never
 * stops the others. A lost lease or a lost connection ends the tick (thrown to the leader
 * loop).
 */
export async function tickOnce(sql: Sql, options: TickOptions = {}): Promise<TickResult> {
  checkPool("tickOnce", sql);
  checkOptions("tickOnce", options);
  if (options.term !== undefined) checkTerm("tickOnce", options.term, "options.term");
  checkDate("tickOnce", "options.now", options.now, { optional: true });
  checkInteger("tickOnce", "options.limit", options.limit, {
    min: 1,
    max: MAX_INT4,
    optional: true,
  });
  checkInteger("tickOnce", "options.batchSize", options.batchSize, {
    min: 1,
    max: 100_000,
    optional: true,
  });
  const result: TickResult = { fired: 0, baselined: 0, disabled: 0, failed: 0, nextDueInMs: null };
  const skip: string[] = [];
  // Nothing due: one cheap read and no fenced transaction, so an idle scheduler costs
  // Postgres next to nothing (it sleeps until the next slot or its interval).
  let dueMs = await nextScheduleDueInMs(sql, { now: options.now, skip });
  if (dueMs === null || dueMs > 0) {
    result.nextDueInMs = dueMs;
    return result;
  }
  const limit = options.limit ?? TICK_LIMIT;
  const batchSize = options.batchSize ?? BATCH_SIZE;
  for (let handled = 0; handled < limit;) {
    const size = Math.min(batchSize, limit - handled);
    const batch = await fireBatch(sql, options, skip, size);
    handled += batch.claimed;
    result.fired += batch.fired.length;
    result.baselined += batch.baselined;
    result.disabled += batch.disabled;
    result.failed += batch.failed.length;
    for (const fire of batch.fired) metrics.scheduleFired(fire.name, fire.lagMs); // committed
    skip.push(...batch.failed);
    // Fewer than asked: nothing else was due (or another scheduler holds it).
    if (batch.claimed < size) break;
  }
  dueMs = await nextScheduleDueInMs(sql, { now: options.now, skip });
  result.nextDueInMs = dueMs === null ? null : Math.max(0, dueMs);
  return result;
}

export interface SchedulerOptions {
  holder: string;
  leaseMs: number;
  /** Longest sleep between ticks; must be shorter than the lease. */
  intervalMs: number;
  /** LISTEN for schedule changes (off behind PgBouncer in transaction mode). */
  listen: boolean;
  /** A declarative schedules file synced at start. */
  schedulesFile?: string;
  /** Called on every turn of the loop (the liveness check, lib/liveness.ts). */
  onTurn?: () => void;
}

/** Run the scheduler role until `stop` aborts; releases its lease on the way out. */
export async function runScheduler(
  sql: Sql,
  options: SchedulerOptions,
  stop: AbortSignal,
): Promise<void> {
  checkPool("runScheduler", sql);
  checkObject("runScheduler", "options", options);
  checkString("runScheduler", "options.holder", options.holder);
  checkInteger("runScheduler", "options.leaseMs", options.leaseMs, { min: 1, max: MAX_TIMER_MS });
  checkInteger("runScheduler", "options.intervalMs", options.intervalMs, {
    min: 1,
    max: MAX_TIMER_MS,
  });
  checkBoolean("runScheduler", "options.listen", options.listen);
  checkString("runScheduler", "options.schedulesFile", options.schedulesFile, {
    optional: true,
    empty: true, // "": no file, as when omitted
  });
  checkSignal("runScheduler", "stop", stop);
  const log = logger("scheduler");
  if (options.schedulesFile) {
    const specs = await loadSchedulesFile(options.schedulesFile);
    const synced = await syncSchedules(sql, specs).catch((cause) => {
      throw new Error(
        `Cannot sync schedules file ${options.schedulesFile}: ${describeError(cause)}`,
        { cause },
      );
    });
    log.info("Synced {file}: {created} created, {updated} updated, {removed} removed", {
      file: options.schedulesFile,
      created: synced.created.length,
      updated: synced.updated.length,
      removed: synced.removed.length,
    });
  }
  const sleeper = new Sleeper();
  let unlisten: (() => Promise<void>) | null = null;
  if (options.listen) {
    try {
      unlisten = (await sql.listen("shoal_schedules", () => sleeper.wake(), () => sleeper.wake()))
        .unlisten;
    } catch (error) {
      log.warn("Cannot LISTEN for schedule changes, checking every {interval}: {error}", {
        interval: formatDuration(options.intervalMs),
        error: describeError(error),
      });
    }
  }
  log.info("Scheduler {holder} started", { holder: options.holder });
  try {
    await runLeaderLoop(
      sql,
      {
        lease: SCHEDULER_LEASE,
        holder: options.holder,
        leaseMs: options.leaseMs,
        intervalMs: options.intervalMs,
        log,
        onTurn: options.onTurn,
      },
      async (term) => (await tickOnce(sql, { term })).nextDueInMs ?? undefined,
      stop,
      sleeper,
    );
  } finally {
    await unlisten?.().catch((error) =>
      log.warn("Cannot UNLISTEN: {error}", { error: describeError(error) })
    );
  }
  log.info("Scheduler stopped");
}
