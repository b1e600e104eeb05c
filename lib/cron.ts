/**
 * Cron expressions and time zones, checked at the boundary. cron-parser accepts some
 * strings a user never means (an empty string, four fields), so the field count is
 * checked here first: 5 fields (minute precision) or 6 (seconds first).
 *
 * @module
 */
import type { CronExpressionParser } from "cron-parser";

/**
 * cron-parser (and luxon under it) is loaded on first use: it is a tenth of an idle
 * consumer's memory (about 11 MB resident), and only the scheduler and the schedule
 * commands need it.
 */
let parser: Promise<typeof CronExpressionParser> | undefined;
function cronParser(): Promise<typeof CronExpressionParser> {
  parser ??= import("cron-parser").then((m) => m.CronExpressionParser);
  return parser;
}

/** Throw a one-line error unless `tz` is an IANA time zone this runtime knows. */
export function checkTimeZone(tz: string): string {
  if (typeof tz !== "string" || tz.length === 0 || tz.length > 64) {
    throw new RangeError(
      `Invalid time zone "${String(tz).slice(0, 64)}": expected an IANA name like Europe/Paris`,
    );
  }
  try {
    new Intl.DateTimeFormat("en-US", { timeZone: tz });
  } catch (cause) {
    throw new RangeError(`Invalid time zone "${tz}": expected an IANA name like Europe/Paris`, {
      cause,
    });
  }
  return tz;
}

/** Throw a one-line error unless `expr` is a 5- or 6-field cron expression. */
export async function checkCron(expr: string, tz = "UTC"): Promise<string> {
  await nextSlot(expr, tz, new Date());
  return expr.trim();
}

function checkFieldCount(expr: unknown): void {
  const fields = typeof expr === "string" ? expr.trim().split(/\s+/).filter(Boolean) : [];
  if (fields.length !== 5 && fields.length !== 6) {
    throw new RangeError(
      `Cannot parse cron expression "${
        String(expr).slice(0, 256)
      }": expected 5 fields (minute hour day month weekday) or 6 (seconds first), got ${fields.length}`,
    );
  }
}

/** The first slot of `expr` in `tz` strictly after `after`. */
export async function nextSlot(expr: string, tz: string, after: Date): Promise<Date> {
  checkFieldCount(expr);
  checkTimeZone(tz);
  const CronExpressionParser = await cronParser();
  try {
    return CronExpressionParser.parse(expr.trim(), { currentDate: after, tz }).next().toDate();
  } catch (cause) {
    throw new RangeError(
      `Cannot parse cron expression "${expr.slice(0, 256)}": ${(cause as Error).message}`,
      { cause },
    );
  }
}
