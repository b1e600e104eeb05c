/**
 * Structured logging for every role: JSON lines (or, on a terminal, a readable form for
 * humans) on stderr, through LogTape. Every record carries the fixed keys `@timestamp`, `level`,
 * `logger`, `message` and `properties`; properties use fixed names (`role`, `queue`,
 * `job_id`, `task`, `attempt`, `error`). Never pass query parameters or secrets.
 *
 * @module
 */
import {
  configure,
  getLogger,
  getTextFormatter,
  type Logger,
  type LogLevel,
  type LogRecord,
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
    ? jsonLine
    : getTextFormatter({ timestamp: "date-time-tz", value: "bare" });
  return (record) => {
    let line = formatter(record);
    if (!line.endsWith("\n")) line += "\n";
    Deno.stderr.writeSync(encoder.encode(line));
  };
}

/**
 * A record as one JSON line: `@timestamp`, `level`, `message`, `logger`, then the
 * properties flattened. The message renders string values bare (`Leading reaper as ...`,
 * not `Leading "reaper" as ...`); the properties keep their types.
 */
function jsonLine(record: LogRecord): string {
  let message = "";
  for (let i = 0; i < record.message.length; i++) {
    const part = record.message[i];
    message += i % 2 === 0 ? String(part) : renderValue(part);
  }
  return JSON.stringify({
    "@timestamp": new Date(record.timestamp).toISOString(),
    level: record.level === "warning" ? "WARN" : record.level.toUpperCase(),
    message,
    logger: record.category.join("."),
    ...record.properties,
  }) + "\n";
}

function renderValue(value: unknown): string {
  if (typeof value === "string") return value;
  if (value instanceof Error) return describeError(value);
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    // Circular: the tag is all a log line can carry.
    return Object.prototype.toString.call(value);
  }
}

/**
 * The log format when none is asked for: readable lines on a terminal, JSON lines for
 * anything else (a file, a pipe, a container's log collector). Logs go to stderr, so
 * stderr decides.
 */
export function defaultLogFormat(stderrIsTerminal: boolean): LogFormat {
  return stderrIsTerminal ? "pretty" : "json";
}

/**
 * Configure logging once per process (idempotent: a later call replaces the first); with
 * no format, the default for where stderr goes (defaultLogFormat).
 */
export async function setupLogging(
  options: { level: LogLevel; format?: LogFormat },
): Promise<void> {
  const format = options.format ?? defaultLogFormat(Deno.stderr.isTerminal());
  await reset();
  await configure({
    sinks: { stderr: stderrSink(format) },
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

/**
 * Longest description describeError returns: a handler may reject with a message of
 * megabytes, which must not become a log line (or a stored error) of megabytes.
 */
export const MAX_DESCRIBED_LENGTH = 4000;

/** `text` cut to MAX_DESCRIBED_LENGTH characters, an ellipsis marking the cut. */
function bounded(text: string): string {
  return text.length > MAX_DESCRIBED_LENGTH ? text.slice(0, MAX_DESCRIBED_LENGTH - 1) + "…" : text;
}

/** A short, single-line description of any thrown value, safe to log. */
export function describeError(error: unknown): string {
  if (error instanceof Error) {
    const code = (error as { code?: unknown }).code;
    // One line, whatever the message holds (cut first: no need to scan megabytes).
    const message = String(error.message).slice(0, 2 * MAX_DESCRIBED_LENGTH)
      .replace(/\s*\n\s*/g, " ");
    return bounded(
      typeof code === "string" && !message.includes(code)
        ? `${error.name}: ${message} (${code})`
        : `${error.name}: ${message}`,
    );
  }
  try {
    return bounded(
      `non-Error thrown: ${JSON.stringify(error) ?? String(error)}`.replace(/\s*\n\s*/g, " "),
    );
  } catch {
    // Circular or otherwise unserialisable: String() never throws for primitives,
    // and objects fall back to their tag.
    return `non-Error thrown: ${Object.prototype.toString.call(error)}`;
  }
}
