/**
 * The overview's throughput and failure-rate charts, per queue and for all queues: jobs
 * completed, retried and dead-lettered per second over the last minutes. The figures come
 * from the totals each consumer writes with its heartbeat (lib/catalog.ts
 * readConsumerTotals(): one statement over a row per consumer), differenced per consumer by
 * TotalsHistory (restarts and departures neither go negative nor double). Their resolution
 * is the consumers' heartbeat (a third of the visibility timeout: 10 s by default); the last
 * interval fills in as they report. This process keeps the samples, taken when the overview
 * is viewed (at most one a second): the chart fills while someone watches and costs
 * nothing otherwise.
 *
 * @module
 */
import type { Db } from "../db.ts";
import { type QueueRateSeries, readConsumerTotals, TotalsHistory } from "../catalog.ts";

/** How long steps are kept: the charts' width in time. */
export const HISTORY_MS = 10 * 60_000;
/** The charts' bins: the default heartbeat (a third of the 30 s visibility timeout). */
export const BIN_MS = 10_000;
/** Samples closer than this to the last one are not taken. */
const MIN_GAP_MS = 1000;

export class ThroughputHistory {
  readonly #history = new TotalsHistory(HISTORY_MS);
  #sampledAt = -Infinity;

  /** Take a sample now unless one was taken within the last second. */
  async sample(db: Db): Promise<void> {
    if (performance.now() - this.#sampledAt < MIN_GAP_MS) return;
    this.#sampledAt = performance.now();
    this.#history.add(await readConsumerTotals(db));
  }

  /** The queues that finished jobs within the window, by name. */
  queues(): string[] {
    return this.#history.queues();
  }

  /** The rates of one queue, or of all queues together (no queue). */
  series(queue?: string): QueueRateSeries {
    return this.#history.series(BIN_MS, queue);
  }
}
