/**
 * When the consumer's claim walks the claim index from its head. Its claims normally start
 * near where claiming has got to (sql/functions/claim.sql, "Where a claim starts"), which
 * keeps them as fast while another session holds a snapshot open but misses a job ranking
 * before that point that became visible again: a retry or delayed job falling due, a job
 * whose claim expired, one stamped in a transaction that committed long after. A claim
 * from the head finds those: when the consumer starts, soon after an announced retry or
 * delayed job falls due, and at least every HEAD_SCAN_EVERY_MS otherwise. With jobs
 * buffered it runs beside the loop for those ranking ahead of them; with none it is the
 * loop's own claim. Either is cancelled after HEAD_SCAN_TIMEOUT_MS.
 *
 * Its cost is what the bounded claims avoid: while a snapshot is held it grows with every
 * job acked since (400 ms after a minute at 20,000 jobs/s, extrapolated from
 * bench/claim_scan.ts), so the pause after each one scales with how long it took, keeping
 * claims from the head to about HEAD_SCAN_SHARE of the time. No database and no timers:
 * the consumer's loop asks and reports.
 *
 * @module
 */
import type { Clock } from "./prefetch.ts";

/** Longest pause between claims from the head (ms), when they are cheap. */
export const HEAD_SCAN_EVERY_MS = 1000;
/** Shortest pause after one (ms), when a job falling due asks for the next sooner. */
export const HEAD_SCAN_MIN_GAP_MS = 100;
/** Share of the time claims from the head may take: the pause after one is its time ÷ this. */
export const HEAD_SCAN_SHARE = 0.05;
/**
 * A claim from the head is cancelled in the server after this long (ms): while a snapshot is
 * held its walk grows without bound (seconds after a minute at 12,000 jobs/s once the table
 * outgrows shared_buffers), and a cancelled one pauses the next for this ÷ HEAD_SCAN_SHARE.
 */
export const HEAD_SCAN_TIMEOUT_MS = 2_000;

/** Decides whether the consumer's next claim walks from the head. */
export class HeadScans {
  readonly #now: Clock;
  /** The next claim from the head is due at this time (0: at once, when the consumer starts). */
  #next = 0;
  /** The shortest pause after the last one (ms), when a job falling due asks. */
  #gap = HEAD_SCAN_MIN_GAP_MS;
  #last = -Infinity;

  constructor(now: Clock = () => performance.now()) {
    this.#now = now;
  }

  /** Whether the next claim walks from the head. */
  due(): boolean {
    return this.#now() >= this.#next;
  }

  /** An announced retry or delayed job fell due: walk from the head soon. */
  request(): void {
    this.#next = Math.min(this.#next, Math.max(this.#now(), this.#last + this.#gap));
  }

  /** Milliseconds until the next claim from the head (0: due). */
  wait(): number {
    return Math.max(0, this.#next - this.#now());
  }

  /** A claim from the head came back (or failed) after `durationMs`. */
  done(durationMs: number): void {
    this.#last = this.#now();
    this.#gap = Math.max(HEAD_SCAN_MIN_GAP_MS, durationMs / HEAD_SCAN_SHARE);
    this.#next = this.#last + Math.max(HEAD_SCAN_EVERY_MS, this.#gap);
  }
}
