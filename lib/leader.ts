/**
 * The loop both leader-elected roles (reaper, scheduler) run: each cycle renews or
 * acquires the lease, runs the role's work only while leader, then sleeps. Losing the
 * lease (renew fails or throws) stops leader work in that same cycle; stopping releases
 * the lease so a standby takes over at once.
 *
 * @module
 */
import {
  backoffWithJitter,
  formatWait,
  isReadOnlyStandby,
  retryOnce,
  settleWithin,
  type Sql,
  STATEMENT_DEADLINE_MS,
} from "./db.ts";
import { formatDuration } from "./duration.ts";
import { acquire, type LeaseTerm, releaseLease, renew } from "./lease.ts";
import { describeError, type Logger } from "./log.ts";
import { metrics } from "./metrics.ts";
import { Sleeper } from "./sleep.ts";

export interface LeaderLoopOptions {
  /** Lease name, e.g. "reaper". */
  lease: string;
  holder: string;
  leaseMs: number;
  /** Longest sleep between cycles; must be shorter than the lease. */
  intervalMs: number;
  log: Logger;
  /** Called on every turn of the loop (the liveness check, lib/liveness.ts). */
  onTurn?: () => void;
}

/** The longest wait between election steps while the database fails them. */
const OUTAGE_BACKOFF_CAP_MS = 30_000;

/**
 * The longest one turn of the leader loop takes, database reachable or not: an election
 * step (a statement retried once, each within its deadline), leader work (bounded as below),
 * then a sleep of at most the interval or the outage backoff's cap.
 */
export function longestLeaderTurnMs(
  options: Pick<LeaderLoopOptions, "leaseMs" | "intervalMs">,
): number {
  const election = 2 * deadlineMs(options);
  const sleep = outageCapMs(options);
  return election + workDeadlineMs(options) + sleep;
}

/** Leader work stalled on a dead connection is abandoned after this long. */
function workDeadlineMs(options: Pick<LeaderLoopOptions, "leaseMs">): number {
  return Math.max(options.leaseMs, STATEMENT_DEADLINE_MS);
}

/** The outage backoff's cap: the lease or 30 s, whichever is shorter, never below the interval. */
function outageCapMs(options: Pick<LeaderLoopOptions, "leaseMs" | "intervalMs">): number {
  return Math.max(options.intervalMs, Math.min(options.leaseMs, OUTAGE_BACKOFF_CAP_MS));
}

/**
 * Leader work for one cycle. Returns how long it would like to sleep (the loop caps it
 * at the interval), or nothing for the full interval.
 */
export type LeaderWork = (term: LeaseTerm) => Promise<number | void>;

/** Refuse a loop whose interval would let its lease lapse between renewals. */
export function checkLeaderTiming(role: string, intervalMs: number, leaseMs: number): void {
  if (!(intervalMs > 0) || intervalMs >= leaseMs) {
    throw new RangeError(
      `Invalid timing for the ${role}: --interval ${
        formatDuration(intervalMs)
      } must be shorter than --lease ${formatDuration(leaseMs)}`,
    );
  }
}

/** Run until `stop` aborts; resolves after the lease (if held) is released. */
export async function runLeaderLoop(
  sql: Sql,
  options: LeaderLoopOptions,
  work: LeaderWork,
  stop: AbortSignal,
  sleeper: Sleeper = new Sleeper(),
): Promise<void> {
  checkLeaderTiming(options.lease, options.intervalMs, options.leaseMs);
  const { log } = options;
  let term: LeaseTerm | null = null;
  /** Whether "standing by" was logged since this process last led (once per stretch). */
  let standingBy = false;
  const outage = new Outage(options);
  /** A statement refused as on a read-only standby: the loop stops, and the role fails. */
  let standby: unknown = null;
  while (!stop.aborted) {
    options.onTurn?.();
    const step = await holdOrTake(sql, options, term);
    term = step.term;
    if (step.failed && isReadOnlyStandby(step.error)) {
      standby = step.error;
      break;
    }
    if (term) standingBy = false;
    else if (!step.failed && !standingBy) {
      standingBy = true;
      log.info("Standing by: another process leads {lease}; {holder} takes over if it stops", {
        lease: options.lease,
        holder: options.holder,
      });
    }
    metrics.leaderStatus(options.lease, term !== null);
    let sleepMs = outage.next(step);
    if (term && !stop.aborted) {
      try {
        // Work stalled on a dead connection must not hold the loop (and shutdown) for good;
        // its transaction is fenced by the lease, so abandoning it is safe.
        const wanted = await settleWithin(
          `${options.lease} leader work`,
          work(term),
          workDeadlineMs(options),
        );
        if (typeof wanted === "number") sleepMs = Math.min(sleepMs, Math.max(0, wanted));
      } catch (error) {
        if (isReadOnlyStandby(error)) {
          standby = error;
          break;
        }
        log.error("Leader work of {lease} failed: {error}", {
          lease: options.lease,
          error: describeError(error),
        });
      }
    }
    await sleeper.sleep(sleepMs, stop);
  }
  metrics.leaderStatus(options.lease, false); // stopping: leader work has ended either way
  const held = term;
  if (held && standby === null) {
    try {
      // Retried once like every idempotent statement: a pooler, a firewall or an operator
      // may have cut the pool's connections just before the stop, and a release that fails
      // leaves standbys waiting out the whole lease.
      const released = await retryOnce(
        `${options.lease} lease release`,
        () => releaseLease(sql, held),
        deadlineMs(options),
      );
      if (released) {
        log.info("Released the {lease} lease", { lease: options.lease });
      }
    } catch (error) {
      log.warn("Cannot release the {lease} lease; a standby takes over when it expires: {error}", {
        lease: options.lease,
        error: describeError(error),
      });
    }
  }
  // The database the pool reconnected to is a standby (the URL's one host was demoted or
  // now resolves to a replica): every statement would fail the same way. The role fails
  // with it, and the process ends with the one line of lib/db.ts standbyError (as when it
  // starts on a standby), for its supervisor to restart it once the URL leads to a primary.
  if (standby !== null) throw standby;
}

/** What one election step found: the term held now, and the error if the database failed it. */
interface Step {
  term: LeaseTerm | null;
  failed: boolean;
  error?: unknown;
}

/**
 * The loop's pace while the database is unreachable: the first failed election step waits
 * the interval, each later one about twice as long (with jitter), capped at the lease, or
 * 30 s, whichever is shorter (never below the interval), so a standby still tries about
 * once per lease window. One warn line per failed step says when the next one is; the
 * first step that succeeds again says how many failed.
 */
class Outage {
  #failures = 0;
  #options: LeaderLoopOptions;

  constructor(options: LeaderLoopOptions) {
    this.#options = options;
  }

  /** How long to sleep after this election step. */
  next(step: Step): number {
    const { log, lease, intervalMs, leaseMs } = this.#options;
    if (!step.failed) {
      if (this.#failures > 0) {
        log.info("The {lease} lease statements succeed again after {failures} failed attempts", {
          lease,
          failures: this.#failures,
        });
      }
      this.#failures = 0;
      return intervalMs;
    }
    this.#failures++;
    const wait = backoffWithJitter(
      this.#failures,
      intervalMs,
      outageCapMs({ intervalMs, leaseMs }),
    );
    log.warn(
      "The {lease} lease statement failed (attempt {attempt}): {error}; " +
        "next attempt in {wait}",
      {
        lease,
        attempt: this.#failures,
        error: describeError(step.error),
        wait: formatWait(wait),
      },
    );
    return wait;
  }
}

/** A lease statement's deadline: a renewal that outlives the lease is moot anyway. */
function deadlineMs(options: Pick<LeaderLoopOptions, "leaseMs">): number {
  return Math.min(STATEMENT_DEADLINE_MS, options.leaseMs);
}

/**
 * One election step: renew our term, or try to start one. A lease the database refused is
 * logged here; a failed statement is returned for the loop to log and back off on.
 */
async function holdOrTake(
  sql: Sql,
  options: LeaderLoopOptions,
  term: LeaseTerm | null,
): Promise<Step> {
  const { log } = options;
  if (term) {
    try {
      const renewed = await retryOnce(
        `${options.lease} lease renewal`,
        () => renew(sql, term, { ttlMs: options.leaseMs }),
        deadlineMs(options),
      );
      if (renewed) return { term: renewed, failed: false };
      log.warn("Lost the {lease} lease (term {token}): leader work stops", {
        lease: options.lease,
        token: term.token,
      });
      return { term: null, failed: false };
    } catch (error) {
      log.warn("Cannot renew the {lease} lease (term {token}), stepping down", {
        lease: options.lease,
        token: term.token,
      });
      return { term: null, failed: true, error };
    }
  }
  try {
    // Idempotent: taking a lease we already hold keeps its term.
    const taken = await retryOnce(
      `${options.lease} lease acquisition`,
      () => acquire(sql, { name: options.lease, holder: options.holder, ttlMs: options.leaseMs }),
      deadlineMs(options),
    );
    if (taken) {
      log.info("Leading {lease} as {holder} (term {token})", {
        lease: options.lease,
        holder: options.holder,
        token: taken.token,
      });
    }
    return { term: taken, failed: false };
  } catch (error) {
    return { term: null, failed: true, error };
  }
}
