/**
 * Structured logging for every role: JSON lines (or a readable form for humans) on
 * stderr, through LogTape. Every record carries the fixed keys `@timestamp`, `level`,
 * `logger`, `message` and `properties`; properties use fixed names (`role`, `queue`,
 * `job_id`, `task`, `attempt`, `error`). Never pass query parameters or secrets.
 *
 * @module
 */
import {
  configure,
  getJsonLinesFormatter,
  getLogger,
  getTextFormatter,
  type Logger,
  type LogLevel,
  reset,
  type Sink,
} from "@logtape/logtape";

export type { Logger };
export type LogFormat = "json" | "pretty";
export const LOG_LEVELS = ["trace", "debug", "info", "warning", "error", "fatal"] as const;

/** A sink that writes each formatted record to stderr synchronously. */
function stderrSink(format: LogFormat): Sink {
  const encoder = new TextEncoder();
  const formatter = format === "json"
    ? getJsonLinesFormatter({ properties: "flatten", message: "rendered" })
    : getTextFormatter({ timestamp: "date-time-tz", value: "bare" });
  return (record) => {
    let line = formatter(record);
    if (!line.endsWith("\n")) line += "\n";
    Deno.stderr.writeSync(encoder.encode(line));
  };
}

/** Configure logging once per process (idempotent: a later call replaces the first). */
export async function setupLogging(
  options: { level: LogLevel; format: LogFormat },
): Promise<void> {
  await reset();
  await configure({
    sinks: { stderr: stderrSink(options.format) },
    loggers: [
      { category: ["shoal"], lowestLevel: options.level, sinks: ["stderr"] },
      { category: ["logtape", "meta"], lowestLevel: "warning", sinks: ["stderr"] },
    ],
  });
}

/** The logger for one part of shoal, e.g. `logger("consumer")`. */
export function logger(...category: string[]): Logger {
  return getLogger(["shoal", ...category]);
}

/** A short, single-line description of any thrown value, safe to log. */
export function describeError(error: unknown): string {
  if (error instanceof Error) {
    const code = (error as { code?: unknown }).code;
    // One line, whatever the message holds.
    const message = error.message.replace(/\s*\n\s*/g, " ");
    return typeof code === "string" && !message.includes(code)
      ? `${error.name}: ${message} (${code})`
      : `${error.name}: ${message}`;
  }
  try {
    return `non-Error thrown: ${JSON.stringify(error) ?? String(error)}`;
  } catch {
    // Circular or otherwise unserialisable: String() never throws for primitives,
    // and objects fall back to their tag.
    return `non-Error thrown: ${Object.prototype.toString.call(error)}`;
  }
}
