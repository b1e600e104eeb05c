/**
 * The loop both leader-elected roles (reaper, scheduler) run: each cycle renews or
 * acquires the lease, runs the role's work only while leader, then sleeps. Losing the
 * lease (renew fails or throws) stops leader work in that same cycle; stopping releases
 * the lease so a standby takes over at once.
 *
 * @module
 */
import type { Sql } from "./db.ts";
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
  while (!stop.aborted) {
    term = await holdOrTake(sql, options, term);
    metrics.leaderStatus(options.lease, term !== null);
    let sleepMs = options.intervalMs;
    if (term && !stop.aborted) {
      try {
        const wanted = await work(term);
        if (typeof wanted === "number") sleepMs = Math.min(sleepMs, Math.max(0, wanted));
      } catch (error) {
        log.error("Leader work of {lease} failed: {error}", {
          lease: options.lease,
          error: describeError(error),
        });
      }
    }
    await sleeper.sleep(sleepMs, stop);
  }
  metrics.leaderStatus(options.lease, false); // stopping: leader work has ended either way
  if (term) {
    try {
      if (await releaseLease(sql, term)) {
        log.info("Released the {lease} lease", { lease: options.lease });
      }
    } catch (error) {
      log.warn("Cannot release the {lease} lease; a standby takes over when it expires: {error}", {
        lease: options.lease,
        error: describeError(error),
      });
    }
  }
}

/** One election step: renew our term, or try to start one. */
async function holdOrTake(
  sql: Sql,
  options: LeaderLoopOptions,
  term: LeaseTerm | null,
): Promise<LeaseTerm | null> {
  const { log } = options;
  if (term) {
    try {
      const renewed = await renew(sql, term, { ttlMs: options.leaseMs });
      if (renewed) return renewed;
      log.warn("Lost the {lease} lease (term {token}): leader work stops", {
        lease: options.lease,
        token: term.token,
      });
    } catch (error) {
      log.warn("Cannot renew the {lease} lease, stepping down: {error}", {
        lease: options.lease,
        error: describeError(error),
      });
    }
    return null;
  }
  try {
    const taken = await acquire(sql, {
      name: options.lease,
      holder: options.holder,
      ttlMs: options.leaseMs,
    });
    if (taken) {
      log.info("Leading {lease} as {holder} (term {token})", {
        lease: options.lease,
        holder: options.holder,
        token: taken.token,
      });
    }
    return taken;
  } catch (error) {
    log.warn("Cannot acquire the {lease} lease: {error}", {
      lease: options.lease,
      error: describeError(error),
    });
    return null;
  }
}
