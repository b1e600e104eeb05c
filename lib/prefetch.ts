/**
 * The consumer's prefetch buffer: jobs claimed (heartbeated, fenced) but not started yet,
 * in the order they start. It decides how much to claim (its pace), when a probe may look
 * for jobs ranking ahead of it, and where claimed jobs go (admission order). No database
 * and no timers: the consumer's loop does the claiming, this class the deciding.
 *
 * The buffer holds what this process finishes in about a quarter of a second at its
 * recent pace (at most `prefetch`): fast jobs are claimed hundreds at a time, slow jobs
 * are not hoarded away from idle consumers. The loop claims again once the buffer is half
 * empty.
 *
 * @module
 */
import type { ClaimOptions, Job } from "./queue.ts";

/** Seconds of recent throughput the buffer holds. */
export const BUFFER_SECONDS = 0.25;

/**
 * After a probe that found nothing, the next waits this long (ms): at most 40 empty probes
 * a second, while a job that ranks ahead of the buffer waits at most this much longer.
 */
export const PROBE_QUIET_MS = 25;

/**
 * Longest time (ms) buffered jobs wait behind an announced job ranking ahead of them while
 * a probe fetches it: a probe that takes longer (a slow database) lets them start.
 */
export const HOLD_MAX_MS = 50;

/** After a probe that failed, the next waits this long (ms); the loop's claim reports faults. */
export const PROBE_FAILED_QUIET_MS = 1000;

/** A clock in milliseconds (performance.now() by default; tests pass a fake one). */
export type Clock = () => number;

/**
 * Jobs finished per second, smoothed: each window of at least 100 ms folds into a moving
 * average, so the estimate follows a change of pace within a second or so.
 */
export class Pace {
  readonly #now: Clock;
  #windowStart: number;
  #inWindow = 0;
  #rate = 0;

  constructor(now: Clock = () => performance.now()) {
    this.#now = now;
    this.#windowStart = now();
  }

  count(): void {
    this.#inWindow++;
  }

  perSecond(): number {
    const now = this.#now();
    const elapsed = now - this.#windowStart;
    if (elapsed >= 100) {
      const windowRate = (this.#inWindow * 1000) / elapsed;
      // Idle for a long stretch: start from the new window, not from a stale average.
      this.#rate = elapsed > 2000 ? windowRate : 0.5 * this.#rate + 0.5 * windowRate;
      this.#windowStart = now;
      this.#inWindow = 0;
    }
    return this.#rate;
  }
}

/** Where a job ranks in claim order: priority first, then fair_seq (a bigint, as a string). */
export type Rank = Pick<Job, "priority" | "fair_seq">;

/**
 * Whether `a` ranks no later than `b` in claim order (priority first, then fair_seq), the
 * bound a probe claims within: a job level with `b` counts, whatever its id.
 */
export function ranksBy(a: Rank, b: Rank): boolean {
  if (a.priority !== b.priority) return a.priority > b.priority;
  return decimalAtMost(a.fair_seq, b.fair_seq);
}

/**
 * `a <= b` for two bigints in decimal as Postgres sends them (an optional minus, no
 * leading zeros), compared as text: admitting a batch ranks each of its jobs, and a BigInt
 * per comparison was an allocation per job.
 */
export function decimalAtMost(a: string, b: string): boolean {
  const negative = a.charCodeAt(0) === MINUS;
  if (negative !== (b.charCodeAt(0) === MINUS)) return negative;
  // Same sign: a longer number is the larger in magnitude; equal lengths compare as text.
  const magnitudeAtMost = a.length !== b.length ? a.length < b.length : a <= b;
  const magnitudeAtLeast = a.length !== b.length ? a.length > b.length : a >= b;
  return negative ? magnitudeAtLeast : magnitudeAtMost;
}

const MINUS = 45; // "-"

export interface PrefetchOptions {
  /** Slots: jobs run at once. */
  concurrency: number;
  /** Most jobs held beyond the free slots (0: claim only for free slots). */
  prefetch: number;
  /** The clock for pace and probe pauses (ms). */
  now?: Clock;
}

/** Claimed jobs waiting for a slot, with the decisions that depend on them. */
export class PrefetchBuffer {
  readonly #concurrency: number;
  readonly #prefetch: number;
  readonly #now: Clock;
  readonly #pace: Pace;
  /**
   * Claimed, not started yet, in start order: the live ones are `#jobs[#head..]`. Taking
   * the next job moves `#head` instead of shift(), which copied the whole array on every
   * start once it held a few hundred jobs (the largest allocation per job, measured with
   * bench/consumer_cpu.ts). The started front is dropped when a claim is admitted.
   */
  #jobs: (Job | undefined)[] = [];
  #head = 0;
  /** No probe before this time (after one that found nothing or failed). */
  #quietUntil = 0;
  /** Buffered jobs ranking after this wait: a job ranking ahead of them is being fetched. */
  #heldBehind: Rank | null = null;

  constructor(options: PrefetchOptions) {
    this.#concurrency = options.concurrency;
    this.#prefetch = options.prefetch;
    this.#now = options.now ?? (() => performance.now());
    this.#pace = new Pace(this.#now);
  }

  get size(): number {
    return this.#jobs.length - this.#head;
  }

  /** The buffer's size now: a quarter second of recent throughput, at most `prefetch`. */
  target(): number {
    return Math.min(this.#prefetch, Math.floor(this.#pace.perSecond() * BUFFER_SECONDS));
  }

  /** Claim again once the buffer is down to this. */
  lowWater(): number {
    return Math.floor(this.target() / 2);
  }

  /** Room for a claim with `running` jobs in slots: free slots plus the buffer's free space. */
  room(running: number): number {
    return this.#concurrency + this.target() - running - this.size;
  }

  /** Whether the loop should claim now: there is room and the buffer is down to low water. */
  wantsClaim(running: number): boolean {
    return this.room(running) > 0 && this.size <= this.lowWater();
  }

  /** A job left its slot: it counts towards the pace. */
  jobFinished(): void {
    this.#pace.count();
  }

  /**
   * Take claimed jobs in: those that rank no later than the last buffered job arrived
   * after the buffer was claimed (a higher priority, or a quiet fairness key's burst) and
   * go first, in their claim order; the rest join the end.
   */
  admit(jobs: Job[]): void {
    const waiting = this.#live();
    const last = waiting[waiting.length - 1];
    this.#head = 0;
    if (last === undefined || !jobs.some((job) => ranksBy(job, last))) {
      this.#jobs = waiting.length === 0 ? jobs.slice() : waiting.concat(jobs);
      return;
    }
    const ahead = jobs.filter((job) => ranksBy(job, last));
    const behind = jobs.filter((job) => !ranksBy(job, last));
    this.#jobs = [...ahead, ...waiting, ...behind];
  }

  /**
   * The next job to start, taken out of the buffer; none while the front job ranks after a
   * job being fetched (hold()).
   */
  next(): Job | undefined {
    if (this.#head >= this.#jobs.length) return undefined;
    const job = this.#jobs[this.#head]!;
    if (this.#heldBehind !== null && !ranksBy(job, this.#heldBehind)) return undefined;
    this.#jobs[this.#head++] = undefined; // started: the buffer no longer holds it
    return job;
  }

  /** Where the last buffered job ranks (none buffered: undefined). */
  lastRank(): Rank | undefined {
    const last = this.#jobs[this.#jobs.length - 1];
    return last === undefined ? undefined : { priority: last.priority, fair_seq: last.fair_seq };
  }

  /**
   * Whether a job announced at `rank` would be fetched by a probe and start ahead of
   * buffered jobs: the buffer holds more than the slots, and its last job ranks after it.
   */
  wouldJump(rank: Rank): boolean {
    return this.probeBound() !== null && ranksBy(rank, this.#jobs[this.#jobs.length - 1]!);
  }

  /** Hold back buffered jobs ranking after `rank` until unhold(): a job there is coming. */
  hold(rank: Rank): void {
    if (this.#heldBehind === null || ranksBy(rank, this.#heldBehind)) this.#heldBehind = rank;
  }

  /** Whether buffered jobs are held back. */
  get holding(): boolean {
    return this.#heldBehind !== null;
  }

  /** Let held-back jobs start again. */
  unhold(): void {
    this.#heldBehind = null;
  }

  /** The buffered jobs now (a copy: the heartbeat's view while its statement runs). */
  snapshot(): Job[] {
    return this.#live();
  }

  /** Take these jobs out (those still buffered); returns the ones that were. */
  remove(jobs: readonly Job[]): Job[] {
    const waiting = this.#live();
    const removed = waiting.filter((job) => jobs.includes(job));
    if (removed.length > 0) {
      this.#jobs = waiting.filter((job) => !removed.includes(job));
      this.#head = 0;
    }
    return removed;
  }

  /** Empty the buffer (shutdown): returns what it held. */
  takeAll(): Job[] {
    const all = this.#live();
    this.#jobs = [];
    this.#head = 0;
    return all;
  }

  /** The jobs not started yet, in start order (a new array). */
  #live(): Job[] {
    return this.#jobs.slice(this.#head) as Job[];
  }

  /**
   * The bound for a probe, or null when none is worth it: with no more than the slots'
   * worth buffered, the buffer empties soon enough and the loop's claim finds the rest.
   */
  probeBound(): ClaimOptions["before"] | null {
    if (this.size <= this.#concurrency) return null;
    const last = this.#jobs[this.#jobs.length - 1]!;
    return { priority: last.priority, fair_seq: last.fair_seq };
  }

  /** How many jobs a probe claims at most. */
  probeLimit(): number {
    return Math.max(this.#concurrency, this.target());
  }

  /** Milliseconds until a probe may run (0: now). */
  probeWait(): number {
    return Math.max(0, this.#quietUntil - this.#now());
  }

  /** A probe claimed `got` jobs: after an empty one, the next waits PROBE_QUIET_MS. */
  probed(got: number): void {
    if (got === 0) this.#quietUntil = this.#now() + PROBE_QUIET_MS;
  }

  /** A probe failed: the next waits PROBE_FAILED_QUIET_MS. */
  probeFailed(): void {
    this.#quietUntil = this.#now() + PROBE_FAILED_QUIET_MS;
  }
}
