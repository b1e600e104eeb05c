/**
 * Durations as users write them on the command line and in the environment:
 * `500ms`, `10s`, `5m`, `2h`, `1d`. A bare number is refused: the unit is the point.
 *
 * @module
 */

const UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
const PATTERN = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)$/;

/**
 * The longest duration a timer can wait: setTimeout fires at once (after 1 ms) for
 * anything above 2^31 - 1 ms, so longer timeouts, grace periods and intervals are refused.
 */
export const MAX_TIMER_MS = 24 * UNITS.d!;

/** Parse a duration into milliseconds, or throw a one-line error naming the input. */
export function parseDuration(text: string): number {
  const match = PATTERN.exec(text.trim());
  if (!match) {
    throw new Error(
      `Cannot parse duration "${text}": expected a number and a unit (ms, s, m, h, d), like 500ms or 10s`,
    );
  }
  const ms = Number(match[1]) * UNITS[match[2]!]!;
  if (!Number.isFinite(ms) || ms > 365 * UNITS.d!) {
    throw new Error(`Cannot parse duration "${text}": longer than a year`);
  }
  return Math.round(ms);
}

/** Format milliseconds the way parseDuration reads them back, for messages. */
export function formatDuration(ms: number): string {
  if (ms % 86_400_000 === 0 && ms > 0) return `${ms / 86_400_000}d`;
  if (ms % 3_600_000 === 0 && ms > 0) return `${ms / 3_600_000}h`;
  if (ms % 60_000 === 0 && ms > 0) return `${ms / 60_000}m`;
  if (ms % 1000 === 0 && ms > 0) return `${ms / 1000}s`;
  return `${ms}ms`;
}
