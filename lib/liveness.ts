/**
 * Whether a process's role loops still turn: the liveness half of `--http` (`/healthz`).
 *
 * Each role's loop reports every turn it takes. A turn is bounded even while the database is
 * unreachable: every statement has a deadline and every wait a cap, so a loop keeps turning
 * (backing off) through an outage. A loop silent for more than twice its longest turn is
 * therefore stuck, not waiting, and restarting the process is the cure. The database plays
 * no part here: an outage must not restart every pod (readiness reports it instead).
 *
 * @module
 */
import { formatDuration } from "./duration.ts";

/** A loop silent for this many of its longest turns is stuck. */
export const STUCK_AFTER_TURNS = 2;

interface Watched {
  lastTurnAt: number;
  limitMs: number;
}

/** The loops of one process, each with the time of its last turn. */
export class LoopWatch {
  readonly #loops = new Map<string, Watched>();

  constructor(private readonly now: () => number = () => performance.now()) {}

  /**
   * Watch the loop `name`, whose longest turn is `longestTurnMs`; counts as a turn now.
   * Returns what the loop calls on every turn. Watching a name again starts afresh.
   */
  watch(name: string, longestTurnMs: number): () => void {
    if (!(longestTurnMs > 0)) {
      throw new RangeError(`A loop's longest turn must be positive, got ${longestTurnMs}`);
    }
    const loop: Watched = {
      lastTurnAt: this.now(),
      limitMs: STUCK_AFTER_TURNS * longestTurnMs,
    };
    this.#loops.set(name, loop);
    return () => {
      loop.lastTurnAt = this.now();
    };
  }

  /**
   * Whether a watched loop is stuck, and one line saying how long ago each turned
   * (`consumer 120ms ago, reaper 3s ago`) or which are stuck and for how long.
   */
  check(): { stuck: boolean; line: string } {
    const now = this.now();
    const turned: string[] = [];
    const stuck: string[] = [];
    for (const [name, loop] of this.#loops) {
      const silentMs = Math.round(now - loop.lastTurnAt);
      if (silentMs <= loop.limitMs) turned.push(`${name} ${formatDuration(silentMs)} ago`);
      else {
        stuck.push(
          `${name} silent for ${formatDuration(silentMs)} (limit ${formatDuration(loop.limitMs)})`,
        );
      }
    }
    if (stuck.length > 0) return { stuck: true, line: `stuck: ${stuck.join(", ")}` };
    return { stuck: false, line: turned.length > 0 ? `ok: ${turned.join(", ")}` : "ok" };
  }
}
