/**
 * The overview's throughput chart: completed and dead-lettered jobs per second, across all
 * queues, over the last minutes. The figures are differences of the cumulative totals
 * Postgres keeps for the jobs tables (lib/queue.ts jobTotals(): one cheap statement, no scan).
 * Completed jobs leave no row behind, so there is no history to read back: this process keeps
 * the samples, taken when the overview is viewed (at most one a second), so the chart fills
 * while someone watches and costs nothing otherwise.
 *
 * @module
 */
import type { Db } from "../db.ts";
import { type JobTotals, jobTotals } from "../queue.ts";

/** How long samples are kept: the chart's width in time. */
export const HISTORY_MS = 10 * 60_000;
/** Samples closer than this to the last one are not taken. */
const MIN_GAP_MS = 1000;

interface Sample {
  at: number;
  totals: JobTotals;
}

/** One point of the chart: the rate between a sample and the one before it. */
export interface RatePoint {
  /** Seconds since the epoch (uPlot's x axis). */
  t: number;
  completedPerS: number;
  deadPerS: number;
}

export class ThroughputHistory {
  #samples: Sample[] = [];

  /** Take a sample now unless one was taken within the last second. */
  async sample(db: Db): Promise<void> {
    const last = this.#samples[this.#samples.length - 1];
    if (last && Date.now() - last.at < MIN_GAP_MS) return;
    const { at, totals } = await jobTotals(db);
    this.#samples.push({ at: at.getTime(), totals });
    const oldest = at.getTime() - HISTORY_MS;
    while (this.#samples.length > 0 && this.#samples[0]!.at < oldest) this.#samples.shift();
  }

  /**
   * The rate between each sample and the one before it; a pair across a statistics reset
   * (totals going down) is left out.
   */
  points(): RatePoint[] {
    const points: RatePoint[] = [];
    for (let i = 1; i < this.#samples.length; i++) {
      const a = this.#samples[i - 1]!;
      const b = this.#samples[i]!;
      const seconds = (b.at - a.at) / 1000;
      const deleted = b.totals.deleted - a.totals.deleted;
      const dead = b.totals.dead - a.totals.dead;
      if (seconds <= 0 || deleted < 0 || dead < 0) continue;
      points.push({
        t: Math.round(b.at / 1000),
        // A dead-lettered job is deleted from shoal.jobs too: not a completion.
        completedPerS: round(Math.max(0, deleted - dead) / seconds),
        deadPerS: round(dead / seconds),
      });
    }
    return points;
  }
}

function round(n: number): number {
  return Math.round(n * 100) / 100;
}
