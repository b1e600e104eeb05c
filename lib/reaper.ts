/**
 * The reaper role: under its lease, a thin loop over sweep functions. Recovery sweeps
 * run before housekeeping. Each sweep runs in its own transaction that first checks the
 * lease (fencing), is capped per tick, is isolated (a failing sweep rolls back its own
 * transaction and never stops the others), and logs only when it did something.
 *
 * An idle reaper must cost Postgres next to nothing: a sweep with a cheap `pending`
 * check opens its transaction only when there is work, and housekeeping runs on every
 * `everyTicks`-th tick only. At the defaults an idle leader sends two statements per
 * tick (its lease renewal and one check).
 *
 * The sweeps hold no SQL of their own: each calls the module that owns its table
 * (barrier.ts, dead.ts, queue.ts, catalog.ts, flow.ts, steps.ts, execution.ts).
 *
 * @module
 */
import {
  checkArray,
  checkInteger,
  checkObject,
  checkOptions,
  checkPool,
  checkSignal,
  checkString,
  MAX_INT4,
  MAX_SPAN_MS,
  MAX_TIMER_MS,
} from "./args.ts";
import { expireBarriers, hasExpiredBarriers } from "./barrier.ts";
import type { Db, Sql } from "./db.ts";
import { hasDeadOlderThan, purgeDead } from "./dead.ts";
import { formatDuration } from "./duration.ts";
import { checkTerm, holdLease, LeaseLostError, type LeaseTerm } from "./lease.ts";
import { runLeaderLoop } from "./leader.ts";
import { describeError, logger } from "./log.ts";
import { listStuckJobs } from "./queue.ts";
import {
  DEFAULT_EXECUTION_KEY_RETENTION_MS,
  hasExpiredExecutionKeys,
  releaseExecutionKeys,
} from "./execution.ts";
import { hasStaleConsumers, pruneConsumers, STALE_CONSUMER_MS } from "./catalog.ts";
import { hasStaleSlots, pruneSlots } from "./flow.ts";
import { hasStaleSteps, pruneSteps } from "./steps.ts";
import { hasStaleEvents, pruneEvents } from "./events.ts";

export const REAPER_LEASE = "reaper";
/** Most rows one sweep touches per tick. */
export const SWEEP_LIMIT = 10_000;
/** Expired fan-outs failed per tick. */
const EXPIRED_BARRIERS_PER_TICK = 100;

export interface ReaperOptions {
  holder: string;
  leaseMs: number;
  intervalMs: number;
  /** Dead jobs older than this are purged. */
  deadRetentionMs: number;
  /**
   * An ended execution keeps its key (idempotent start) this long, then the key is released
   * (default DEFAULT_EXECUTION_KEY_RETENTION_MS, 24 h).
   */
  executionKeyRetentionMs?: number;
  /** A claimed job this many attempts in with an expired deadline is reported as stuck. */
  stuckAttempts?: number;
  /** Called on every turn of the loop (the liveness check, lib/liveness.ts). */
  onTurn?: () => void;
}

/** One sweep: does its work in `tx` and returns how many rows it handled. */
export interface Sweep {
  name: string;
  kind: "recovery" | "housekeeping";
  /** Run on every this-many-th tick of the reaper loop (default 1: every tick). */
  everyTicks?: number;
  /** A cheap check outside any transaction: false skips the sweep this tick. */
  pending?(db: Db, options: ReaperOptions): Promise<boolean>;
  run(tx: Db, options: ReaperOptions, limit: number): Promise<number>;
}

/** Housekeeping cadence: every 12 ticks (a minute at the default 5 s interval). */
const HOUSEKEEPING_TICKS = 12;

/**
 * Remove step and sleep records (lib/steps.ts) of jobs that are gone, an hour after they were
 * recorded: kept off the ack path, which deletes jobs without looking for records.
 */
export const stepRetentionSweep: Sweep = {
  name: "step-retention",
  kind: "housekeeping",
  everyTicks: HOUSEKEEPING_TICKS,
  pending: (db) => hasStaleSteps(db),
  run: (tx, _options, limit) => pruneSteps(tx, { limit }),
};

/**
 * Remove emitted events (lib/events.ts) a day after they were emitted: a wait that starts later
 * no longer finds them. A wait that received one keeps its payload in its own record.
 */
export const eventRetentionSweep: Sweep = {
  name: "event-retention",
  kind: "housekeeping",
  everyTicks: HOUSEKEEPING_TICKS,
  pending: (db) => hasStaleEvents(db),
  run: (tx, _options, limit) => pruneEvents(tx, { limit }),
};

/** Purge dead-letter rows past their retention, oldest first. */
export const deadRetentionSweep: Sweep = {
  name: "dead-retention",
  kind: "housekeeping",
  everyTicks: HOUSEKEEPING_TICKS,
  pending: (db, options) => hasDeadOlderThan(db, options.deadRetentionMs),
  run: (tx, options, limit) => purgeDead(tx, { olderThanMs: options.deadRetentionMs, limit }),
};

/**
 * Release the keys of executions that ended longer than the execution-key retention ago
 * (the tombstones of idempotent start): a start with such a key starts a new execution.
 */
export const executionKeySweep: Sweep = {
  name: "execution-keys",
  kind: "housekeeping",
  everyTicks: HOUSEKEEPING_TICKS,
  pending: (db, options) => hasExpiredExecutionKeys(db, executionKeyRetention(options)),
  run: (tx, options, limit) =>
    releaseExecutionKeys(tx, { olderThanMs: executionKeyRetention(options), limit }),
};

function executionKeyRetention(options: ReaperOptions): number {
  return options.executionKeyRetentionMs ?? DEFAULT_EXECUTION_KEY_RETENTION_MS;
}

/**
 * Remove the catalog rows of consumers not seen for a day: they died without a graceful
 * stop (which removes its own row). Their tasks stay in the catalog.
 */
export const staleConsumerSweep: Sweep = {
  name: "stale-consumers",
  kind: "housekeeping",
  everyTicks: HOUSEKEEPING_TICKS,
  pending: (db) => hasStaleConsumers(db, STALE_CONSUMER_MS),
  run: (tx, _options, limit) => pruneConsumers(tx, { olderThanMs: STALE_CONSUMER_MS, limit }),
};

/**
 * Remove concurrency slot rows that hold nothing: their job is gone or no longer carries the
 * claim they were written for. They already count for nothing (the slot rule in
 * sql/functions/flow.sql); acks, retries and hand-backs remove their own at once, so this
 * finds only what other paths left.
 */
export const slotPruneSweep: Sweep = {
  name: "slot-prune",
  kind: "housekeeping",
  everyTicks: HOUSEKEEPING_TICKS,
  pending: (db) => hasStaleSlots(db),
  run: (tx, _options, limit) => pruneSlots(tx, limit),
};

/** Ids already reported as stuck, so each is reported once, not on every tick. */
const reportedStuck = new Set<string>();

/**
 * Report jobs that keep outliving their deadline: claimed several times, and claimed now
 * by a worker whose deadline passed (it crashed, or its handler blocks its event loop).
 * Report only: the next claim redelivers them, and poison handling dead-letters them.
 */
export const stuckReportSweep: Sweep = {
  name: "stuck-report",
  kind: "housekeeping",
  // A report, not a repair, and it reads the whole jobs table: not on every tick.
  everyTicks: HOUSEKEEPING_TICKS,
  async run(tx, options, limit) {
    const rows = await listStuckJobs(tx, { minAttempts: options.stuckAttempts ?? 3, limit });
    const fresh = rows.filter((r) => !reportedStuck.has(r.id));
    const live = new Set(rows.map((r) => r.id));
    for (const id of reportedStuck) if (!live.has(id)) reportedStuck.delete(id);
    for (const r of fresh) {
      reportedStuck.add(r.id);
      logger("reaper").warn(
        "Job {job_id} ({task} on {queue}) is past its deadline after {attempt} attempts: its workers keep dying or stalling",
        { job_id: r.id, task: r.task, queue: r.queue, attempt: r.attempts },
      );
    }
    return fresh.length;
  },
};

/**
 * Fail executions whose fan-out expired: the barrier, its arrivals and the execution's
 * remaining jobs go, and the error callback (if any) is enqueued once.
 */
export const expiredBarrierSweep: Sweep = {
  name: "expired-barriers",
  kind: "recovery",
  pending: (db) => hasExpiredBarriers(db),
  // Each expired fan-out locks all of its execution's jobs (up to 100,000 children):
  // keep one tick's transaction small; the next tick takes the rest.
  run: (tx, _options, limit) => expireBarriers(tx, Math.min(limit, EXPIRED_BARRIERS_PER_TICK)),
};

/** Every sweep, recovery first. */
export function defaultSweeps(): Sweep[] {
  const sweeps = [
    expiredBarrierSweep,
    stuckReportSweep,
    deadRetentionSweep,
    stepRetentionSweep,
    executionKeySweep,
    eventRetentionSweep,
    staleConsumerSweep,
    slotPruneSweep,
  ];
  return [
    ...sweeps.filter((s) => s.kind === "recovery"),
    ...sweeps.filter((s) => s.kind !== "recovery"),
  ];
}

/**
 * Throw unless `options` are reaper options: what the sweeps read, and with `loop` what the
 * leader loop reads too.
 */
function checkReaperOptions(fn: string, options: ReaperOptions, loop: boolean): void {
  checkObject(fn, "options", options);
  if (loop) {
    checkString(fn, "options.holder", options.holder);
    checkInteger(fn, "options.leaseMs", options.leaseMs, { min: 1, max: MAX_TIMER_MS });
    checkInteger(fn, "options.intervalMs", options.intervalMs, { min: 1, max: MAX_TIMER_MS });
  }
  checkInteger(fn, "options.deadRetentionMs", options.deadRetentionMs, {
    min: 0,
    max: MAX_SPAN_MS,
  });
  checkInteger(fn, "options.executionKeyRetentionMs", options.executionKeyRetentionMs, {
    min: 0,
    max: MAX_SPAN_MS,
    optional: true,
  });
  checkInteger(fn, "options.stuckAttempts", options.stuckAttempts, {
    min: 1,
    max: MAX_INT4,
    optional: true,
  });
}

export interface SweepReport {
  [sweep: string]: number | { error: string };
}

/** Run each sweep once, each in its own fenced transaction. */
export async function reapOnce(
  sql: Sql,
  options: ReaperOptions,
  context: {
    term?: LeaseTerm;
    sweeps?: Sweep[];
    limit?: number;
    /** The loop's tick number: sweeps not due on it are skipped (none when absent). */
    tick?: number;
  } = {},
): Promise<SweepReport> {
  checkPool("reapOnce", sql);
  checkReaperOptions("reapOnce", options, false);
  checkOptions("reapOnce", context, "context");
  if (context.term !== undefined) checkTerm("reapOnce", context.term, "context.term");
  checkArray("reapOnce", "context.sweeps", context.sweeps, "an array of sweeps", {
    optional: true,
  });
  checkInteger("reapOnce", "context.limit", context.limit, {
    min: 1,
    max: MAX_INT4,
    optional: true,
  });
  checkInteger("reapOnce", "context.tick", context.tick, {
    min: 0,
    max: Number.MAX_SAFE_INTEGER,
    optional: true,
  });
  const log = logger("reaper");
  const report: SweepReport = {};
  for (const sweep of context.sweeps ?? defaultSweeps()) {
    if (context.tick !== undefined && context.tick % (sweep.everyTicks ?? 1) !== 0) continue;
    try {
      if (sweep.pending && !(await sweep.pending(sql, options))) {
        report[sweep.name] = 0;
        continue;
      }
      const count = await sql.begin(async (tx) => {
        if (context.term) await holdLease(tx, context.term);
        return await sweep.run(tx, options, context.limit ?? SWEEP_LIMIT);
      });
      report[sweep.name] = count;
      if (count > 0 && sweep.name !== stuckReportSweep.name) {
        log.info("Sweep {sweep} handled {count} rows", { sweep: sweep.name, count });
      }
    } catch (error) {
      if (error instanceof LeaseLostError) throw error;
      report[sweep.name] = { error: describeError(error) };
      log.error("Sweep {sweep} failed: {error}", {
        sweep: sweep.name,
        error: describeError(error),
      });
    }
  }
  return report;
}

/** Run the reaper role until `stop` aborts; releases its lease on the way out. */
export async function runReaper(
  sql: Sql,
  options: ReaperOptions,
  stop: AbortSignal,
): Promise<void> {
  checkPool("runReaper", sql);
  checkReaperOptions("runReaper", options, true);
  checkSignal("runReaper", "stop", stop);
  const log = logger("reaper");
  let tick = 0;
  log.info("Reaper {holder} started (interval {interval}, dead retention {retention})", {
    holder: options.holder,
    interval: formatDuration(options.intervalMs),
    retention: formatDuration(options.deadRetentionMs),
  });
  await runLeaderLoop(
    sql,
    {
      lease: REAPER_LEASE,
      holder: options.holder,
      leaseMs: options.leaseMs,
      intervalMs: options.intervalMs,
      log,
      onTurn: options.onTurn,
    },
    async (term) => {
      await reapOnce(sql, options, { term, tick: tick++ });
    },
    stop,
  );
  log.info("Reaper stopped");
}
