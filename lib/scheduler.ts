/**
 * The scheduler role: under its lease, fire due schedules onto their queues, never twice.
 *
 * Each due row is handled in its own transaction: lock our lease row (fencing), claim
 * the schedule row with SKIP LOCKED, enqueue its job with the dedupe key
 * `schedule:<name>:<slot>`, and advance next_run_at, then commit. A crash anywhere
 * rolls all of it back; a second scheduler skips the locked row and then finds it no
 * longer due. A row with no next_run_at records a baseline without firing; missed slots
 * fire once (the due slot) and the row moves to the next future slot. An invalid cron or
 * time zone disables its row and records the error once. Times come from `now()`.
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
import { formatDuration } from "./duration.ts";
import { checkTerm, holdLease, type LeaseTerm } from "./lease.ts";
import { runLeaderLoop } from "./leader.ts";
import { Sleeper } from "./sleep.ts";
import { describeError, logger } from "./log.ts";
import { enqueue } from "./queue.ts";
import { metrics } from "./metrics.ts";
import {
  advanceSchedule,
  claimDueSchedule,
  disableSchedule,
  loadSchedulesFile,
  nextScheduleDueInMs,
  recordScheduleError,
  setScheduleBaseline,
  syncSchedules,
} from "./schedule.ts";

export const SCHEDULER_LEASE = "scheduler";
/** Most rows one tick handles; the rest wait for the next tick (which comes at once). */
const TICK_LIMIT = 500;

export interface TickOptions {
  /** The leader's term; every row's transaction checks it (omit only in tests). */
  term?: LeaseTerm;
  /** Override the database clock (tests). */
  now?: Date;
  limit?: number;
}

export interface TickResult {
  fired: number;
  baselined: number;
  disabled: number;
  failed: number;
  /** Milliseconds until the earliest enabled schedule is due (0: now), null when none. */
  nextDueInMs: number | null;
}

type RowOutcome = "fired" | "baselined" | "disabled" | "failed" | "none";

/** Errors that will recur on every try: bad data, constraint or limit violations. */
function isPermanent(error: unknown): boolean {
  return error instanceof RangeError || error instanceof TypeError || isDataError(error);
}

/**
 * Handle one due schedule row (the first not in `skip`) in one transaction. A failure to
 * fire rolls back to a savepoint, so the error is recorded on the row itself (once per
 * distinct message) while the row lock is still held.
 */
async function fireOne(
  sql: Sql,
  options: TickOptions,
  skip: string[],
): Promise<{ outcome: RowOutcome; name?: string; lagMs?: number }> {
  const log = logger("scheduler");
  return await sql.begin(async (tx) => {
    if (options.term) await holdLease(tx, options.term, { now: options.now });
    const row = await claimDueSchedule(tx, { now: options.now, skip });
    if (!row) return { outcome: "none" };
    let next: Date;
    try {
      next = await nextSlot(row.cron, row.tz, row.db_now);
    } catch (error) {
      await disableSchedule(tx, row.name, (error as Error).message);
      log.error("Schedule {schedule} disabled: {error}", {
        schedule: row.name,
        error: (error as Error).message,
      });
      return { outcome: "disabled", name: row.name };
    }
    if (row.next_run_at === null) {
      await setScheduleBaseline(tx, row.name, next);
      return { outcome: "baselined", name: row.name };
    }
    const slot = row.next_run_at;
    try {
      await tx.savepoint(async (sp) => {
        // Without a queue of its own, the job takes its task's catalog queue as of now.
        await enqueue(sp, row.task, row.payload, {
          queue: row.queue ?? undefined,
          priority: row.priority,
          key: `schedule:${row.name}:${slot.toISOString()}`,
        });
        await advanceSchedule(sp, row.name, { next, ranAt: row.db_now });
      });
      return {
        outcome: "fired",
        name: row.name,
        lagMs: row.db_now.getTime() - slot.getTime(),
      };
    } catch (error) {
      const permanent = isPermanent(error);
      const message = describeError(error).slice(0, 2000);
      if (await recordScheduleError(tx, row.name, { message, disable: permanent })) {
        log.error("Schedule {schedule} failed to fire{disabled}: {error}", {
          schedule: row.name,
          disabled: permanent ? " and was disabled" : "",
          error: message,
        });
      }
      return { outcome: "failed", name: row.name };
    }
  });
}

/**
 * Fire every due schedule once (up to the tick limit). Each row is isolated: a row that
 * fails is recorded and skipped for the rest of the tick, and never stops the others.
 * A lost lease or a lost connection ends the tick (thrown to the leader loop).
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
  const result: TickResult = { fired: 0, baselined: 0, disabled: 0, failed: 0, nextDueInMs: null };
  const skip: string[] = [];
  // Nothing due: one cheap read and no fenced transaction, so an idle scheduler costs
  // Postgres next to nothing (it sleeps until the next slot or its interval).
  let dueMs = await nextScheduleDueInMs(sql, { now: options.now, skip });
  if (dueMs === null || dueMs > 0) {
    result.nextDueInMs = dueMs;
    return result;
  }
  for (let i = 0; i < (options.limit ?? TICK_LIMIT); i++) {
    const done = await fireOne(sql, options, skip);
    if (done.outcome === "none") break;
    result[done.outcome]++;
    if (done.outcome === "fired") metrics.scheduleFired(done.name!, done.lagMs!); // committed
    if (done.outcome === "failed") skip.push(done.name!);
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
