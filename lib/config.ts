/**
 * Command-line and environment configuration. Every option has one spec: its type,
 * default and range. A value comes from the flag, else from `SHOAL_<NAME>` in the
 * environment, else the default; the database from `--database-url` or `DATABASE_URL`.
 * Anything malformed is a UsageError: one line on stderr and exit code 2.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { checkDatabaseUrl } from "./db.ts";
import { formatDuration, MAX_TIMER_MS, parseDuration } from "./duration.ts";
import { LOG_LEVELS } from "./log.ts";
import { NAME_PATTERN } from "./names.ts";

/** A bad flag, value or environment variable: reported in one line, exit code 2. */
export class UsageError extends Error {
  override name = "UsageError";
}

type Kind = "string" | "int" | "duration" | "list" | "boolean" | "name" | "names" | "address";

interface OptionSpec {
  kind: Kind;
  /** The default as a user would write it. */
  default?: string;
  min?: number;
  max?: number;
  choices?: readonly string[];
  /** Read from this variable instead of SHOAL_<NAME>; null: flag only. */
  env?: string | null;
  help: string;
}

/** Where `--http` listens when given without an address: loopback only, never all interfaces. */
export const DEFAULT_HTTP = "127.0.0.1:9464";

export const OPTIONS = {
  "database-url": { kind: "string", env: "DATABASE_URL", help: "postgres:// URL of the database" },
  "read-database-url": {
    kind: "string",
    help:
      "postgres:// URL of a replica the monitoring reads (status, /metrics gauges, dashboard pages)",
  },
  role: {
    kind: "string",
    choices: ["consumer", "reaper", "scheduler", "all"],
    help: "what this process does",
  },
  queues: { kind: "names", default: "default", help: "comma-separated queues to consume" },
  concurrency: { kind: "int", default: "10", min: 1, max: 10_000, help: "jobs run at once" },
  prefetch: {
    kind: "int",
    default: "500",
    min: 0,
    max: 10_000,
    help: "most jobs claimed ahead of free slots (about 0.25 s of work; 0: none)",
  },
  "visibility-timeout": {
    kind: "duration",
    default: "30s",
    min: 100,
    max: MAX_TIMER_MS,
    help: "a claimed job is redelivered after this unless heartbeated",
  },
  "poll-interval": {
    kind: "duration",
    min: 10,
    max: MAX_TIMER_MS,
    help: "look for jobs at least this often (default 30s with LISTEN, 2s without)",
  },
  listen: {
    kind: "boolean",
    default: "true",
    help: "LISTEN for new jobs (--no-listen for PgBouncer)",
  },
  prepare: {
    kind: "boolean",
    default: "true",
    help: "named prepared statements (--no-prepare for PgBouncer transaction mode)",
  },
  "shutdown-grace": {
    kind: "duration",
    default: "25s",
    min: 0,
    max: MAX_TIMER_MS,
    help: "on SIGTERM, wait this long for running jobs before releasing them",
  },
  "task-timeout": {
    kind: "duration",
    default: "15m",
    min: 1,
    max: MAX_TIMER_MS,
    help: "abort a handler after this long unless its task sets a timeout",
  },
  "max-fan-out": {
    kind: "int",
    default: "100000",
    min: 0,
    max: 10_000_000,
    help: "most children one fan-out may open",
  },
  "max-payload": {
    kind: "int",
    default: "1048576",
    min: 2,
    max: 256 * 1024 * 1024,
    help: "largest payload in bytes accepted at enqueue",
  },
  migrate: { kind: "boolean", default: "false", help: "apply pending migrations at start" },
  "http-allow": {
    kind: "list",
    help:
      "hosts the shoal.http task may POST to: host or host:port, comma-separated (default none)",
  },
  "sql-schemas": {
    kind: "list",
    help: "schemas whose f(jsonb) functions the shoal.sql task may call, comma-separated " +
      "(default none)",
  },
  "startup-wait": {
    kind: "duration",
    default: "2m",
    min: 0,
    max: MAX_TIMER_MS,
    help: "a role started before its database waits this long for it (0s: fail at once)",
  },
  lease: {
    kind: "duration",
    default: "30s",
    min: 100,
    max: MAX_TIMER_MS,
    help: "leader lease of the reaper and scheduler (a standby takes over after it)",
  },
  interval: {
    kind: "duration",
    default: "5s",
    min: 10,
    max: MAX_TIMER_MS,
    help: "reaper tick and the scheduler's longest sleep, shorter than --lease; " +
      "for status --watch, how often to redraw (2s unless given)",
  },
  "dead-retention": {
    kind: "duration",
    default: "14d",
    min: 1000,
    help: "the reaper purges dead jobs older than this",
  },
  "execution-key-retention": {
    kind: "duration",
    default: "24h",
    min: 1000,
    help: "an ended execution keeps its key (idempotent start) this long, then the reaper " +
      "releases it",
  },
  schedules: {
    kind: "string",
    help: "JSON file of schedules the scheduler syncs at start (adds, updates, removes)",
  },
  cron: { kind: "string", env: null, help: "cron expression: 5 fields, or 6 with seconds first" },
  tz: { kind: "string", env: null, default: "UTC", help: "IANA time zone of a schedule" },
  "log-level": {
    kind: "string",
    default: "info",
    choices: LOG_LEVELS,
    help: "least severe level logged",
  },
  "log-format": {
    kind: "string",
    choices: ["json", "pretty"],
    help: "log line format (default pretty when stderr is a terminal, else json)",
  },
  http: {
    kind: "address",
    help:
      `serve /healthz, /readyz, /metrics and the dashboard on host:port (bare --http: ${DEFAULT_HTTP})`,
  },
  "read-only": {
    kind: "boolean",
    default: "false",
    env: "SHOAL_DASHBOARD_READ_ONLY",
    help: "the dashboard shows, but refuses every action (retry, cancel, pause, purge, ...)",
  },
  watch: { kind: "boolean", default: "false", env: null, help: "redraw status every --interval" },
  json: { kind: "boolean", default: "false", env: null, help: "print JSON for scripts" },
  exact: {
    kind: "boolean",
    default: "false",
    env: null,
    help: "status: count every job (a scan) instead of estimating a table of over 10,000",
  },
  "metrics-exact": {
    kind: "boolean",
    default: "false",
    help: "/metrics counts every job (a scan per read) instead of estimating a large table",
  },
  task: {
    kind: "name",
    env: null,
    help: "enqueue, schedule add: task name; limit: the task whose jobs a limit counts apart",
  },
  queue: {
    kind: "name",
    env: null,
    help: "queue name (enqueue, schedule add: the task's registered queue unless given)",
  },
  payload: { kind: "string", default: "{}", env: null, help: "JSON object passed to the handler" },
  "run-at": {
    kind: "string",
    env: null,
    help: "ISO 8601 instant before which the job does not run",
  },
  priority: {
    kind: "int",
    default: "0",
    min: -32767,
    max: 32767,
    env: null,
    help: "higher runs first",
  },
  backfill: {
    kind: "int",
    default: "0",
    min: 0,
    max: 1000,
    env: null,
    help: "schedule add: after downtime, fire up to N missed slots (0: one fire for them all)",
  },
  key: {
    kind: "string",
    env: null,
    help: "enqueue: dedupe key; execution start: the execution's key (a start with a key " +
      "held returns its execution); limit: the key a limit, hold or weight is for; " +
      "event emit: the event's key",
  },
  per: {
    kind: "duration",
    min: 1,
    max: 86_400_000,
    env: null,
    help: "limit rate: the period its N starts are spread over (at most 1d)",
  },
  for: {
    kind: "duration",
    min: 0,
    max: 86_400_000,
    env: null,
    help: "limit hold: how long the key is held (0s lifts the hold; at most 1d)",
  },
  "fairness-key": { kind: "string", env: null, help: "share the queue fairly across these" },
  "concurrency-key": {
    kind: "string",
    env: null,
    help: "the key flow control counts the job under (its fairness key unless given)",
  },
  "max-attempts": {
    kind: "int",
    min: 1,
    max: 1000,
    env: null,
    help: "runs before dead-lettering (the task's registered value unless given)",
  },
  limit: { kind: "int", default: "100", min: 1, max: 100_000, env: null, help: "rows to show" },
  "older-than": { kind: "duration", env: null, help: "only rows older than this" },
  all: { kind: "boolean", default: "false", env: null, help: "dead purge: every dead job" },
  dir: { kind: "string", default: ".shoal", help: "where shoal dev keeps its database" },
  help: { kind: "boolean", default: "false", env: null, help: "show help" },
} as const satisfies Record<string, OptionSpec>;

export type OptionName = keyof typeof OPTIONS;
export type OptionValue = string | number | boolean | string[] | undefined;

/** What each kind of option converts to (see `convert`). */
interface KindValues {
  string: string;
  int: number;
  duration: number;
  list: string[];
  boolean: boolean;
  name: string;
  names: string[];
  address: string;
}

type SpecOf<N extends OptionName> = (typeof OPTIONS)[N];

/**
 * The resolved value of option `N`, read from its spec: one of its choices if it has
 * them, else its kind's type; `undefined` too unless it has a default (an `address` set
 * to false is undefined as well, and `--http` has no default).
 */
export type OptionType<N extends OptionName> =
  | (SpecOf<N> extends { choices: readonly (infer C)[] } ? C : KindValues[SpecOf<N>["kind"]])
  | (SpecOf<N> extends { default: string } ? never : undefined);

/** Resolved options, typed by their specs: `Options<"concurrency" | "queues">`. */
export type Options<N extends OptionName> = { [K in N]: OptionType<K> };

function envName(name: OptionName): string | null {
  const spec: OptionSpec = OPTIONS[name];
  if (spec.env === null) return null;
  return spec.env ?? `SHOAL_${name.toUpperCase().replaceAll("-", "_")}`;
}

function convert(name: OptionName, raw: string, source: string): OptionValue {
  const spec: OptionSpec = OPTIONS[name];
  const bad = (why: string) => new UsageError(`Invalid ${source}: ${why}`);
  switch (spec.kind) {
    case "string":
      if (spec.choices && !spec.choices.includes(raw)) {
        throw bad(`"${raw}" is not one of ${spec.choices.join(", ")}`);
      }
      return raw;
    case "boolean": {
      const v = raw.toLowerCase();
      if (["1", "true", "yes", "on"].includes(v)) return true;
      if (["0", "false", "no", "off"].includes(v)) return false;
      throw bad(`"${raw}" is not true or false`);
    }
    case "int": {
      if (!/^-?\d+$/.test(raw.trim())) throw bad(`"${raw}" is not an integer`);
      const n = Number(raw);
      if (spec.min !== undefined && n < spec.min) throw bad(`${n} is below ${spec.min}`);
      if (spec.max !== undefined && n > spec.max) throw bad(`${n} is above ${spec.max}`);
      return n;
    }
    case "duration": {
      let ms: number;
      try {
        ms = parseDuration(raw);
      } catch (error) {
        throw bad((error as Error).message);
      }
      if (spec.min !== undefined && ms < spec.min) throw bad(`${raw} is too short`);
      if (spec.max !== undefined && ms > spec.max) {
        throw bad(`${raw} is too long (at most ${formatDuration(spec.max)})`);
      }
      return ms;
    }
    case "address": {
      const v = raw.trim().toLowerCase();
      if (["1", "true", "yes", "on"].includes(v)) return DEFAULT_HTTP; // SHOAL_HTTP=true
      if (["0", "false", "no", "off"].includes(v)) return undefined;
      try {
        const { hostname, port } = parseListenAddress(raw.trim());
        return hostname.includes(":") ? `[${hostname}]:${port}` : `${hostname}:${port}`;
      } catch (error) {
        throw bad((error as Error).message);
      }
    }
    case "name":
      if (!NAME_PATTERN.test(raw)) {
        throw bad(`"${raw.slice(0, 140)}" is not a name (1 to 128 of letters, digits, _.:-)`);
      }
      return raw;
    case "names":
    case "list": {
      const items = raw.split(",").map((s) => s.trim()).filter((s) => s.length > 0);
      if (items.length === 0) throw bad("the list is empty");
      if (spec.kind === "names") {
        for (const item of items) {
          if (!NAME_PATTERN.test(item)) throw bad(`"${item.slice(0, 140)}" is not a name`);
        }
      }
      return items;
    }
  }
}

/** Flags whose value may be left out: the value they then take. */
const OPTIONAL_VALUES: Partial<Record<OptionName, string>> = { http: DEFAULT_HTTP };

/**
 * Give a bare optional-value flag its default: `--http` at the end or before another flag
 * becomes `--http=127.0.0.1:9464`; any other next word is its value (and is validated).
 */
function withOptionalValues(args: string[]): string[] {
  const result: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    if (arg === "--") return [...result, ...args.slice(i)];
    const name = arg.startsWith("--") ? arg.slice(2) as OptionName : null;
    const fallback = name === null ? undefined : OPTIONAL_VALUES[name];
    const next = args[i + 1];
    if (fallback !== undefined && (next === undefined || next.startsWith("-"))) {
      result.push(`${arg}=${fallback}`);
    } else result.push(arg);
  }
  return result;
}

/**
 * Parse `host:port` (IPv6 as `[::1]:9464`) for a server to listen on. The host is
 * required, so exposing the server beyond loopback is always spelled out.
 */
export function parseListenAddress(text: string): { hostname: string; port: number } {
  const match = /^(?:\[([0-9a-fA-F:.]+)\]|([^\s:\[\]/]+)):(\d{1,5})$/.exec(text);
  if (!match) {
    throw new Error(`"${text.slice(0, 100)}" is not host:port (e.g. ${DEFAULT_HTTP})`);
  }
  const port = Number(match[3]);
  if (port > 65535) throw new Error(`port ${port} is above 65535`);
  const hostname = match[1] ?? match[2]!;
  if (!/^[A-Za-z0-9.-]+$/.test(hostname) && match[1] === undefined) {
    throw new Error(`"${hostname.slice(0, 100)}" is not a host name or address`);
  }
  return { hostname, port };
}

export interface ParsedArgs {
  positionals: string[];
  /** Values given on the command line, unconverted. */
  flags: Partial<Record<OptionName, string | boolean>>;
}

/**
 * The flag a mistyped `given` most likely meant: the known name fewest edits away, when
 * that is at most 2 edits and at most a third of its length (so `--bogus` suggests nothing).
 */
export function nearestOption(given: string, known: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const name of known) {
    const d = editDistance(given, name);
    if (d < bestDistance) [best, bestDistance] = [name, d];
  }
  if (best === undefined || bestDistance > 2 || bestDistance * 3 > best.length) return undefined;
  return best;
}

/** Levenshtein distance: insertions, deletions and substitutions of one character. */
function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      const substitution = previous[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1);
      current[j] = Math.min(previous[j]! + 1, current[j - 1]! + 1, substitution);
    }
    previous = current;
  }
  return previous[b.length]!;
}

/** Split argv strictly: an unknown flag or a flag missing its value is a UsageError. */
export function parseCommandLine(args: string[]): ParsedArgs {
  const options: Record<string, { type: "string" | "boolean" }> = {};
  for (const [name, spec] of Object.entries(OPTIONS) as [OptionName, OptionSpec][]) {
    options[name] = { type: spec.kind === "boolean" ? "boolean" : "string" };
    if (spec.kind === "boolean" && spec.default === "true") {
      options[`no-${name}`] = { type: "boolean" };
    }
  }
  let parsed;
  try {
    parsed = parseArgs({
      args: withOptionalValues(args),
      options,
      strict: true,
      allowPositionals: true,
    });
  } catch (error) {
    const lines = (error as Error).message.split("\n");
    // "--priority -5" is ambiguous to parseArgs: keep its last line, which says how to
    // pass a value starting with a dash (--priority=-5).
    if (lines[0]!.endsWith("argument is ambiguous.")) {
      throw new UsageError(`${lines[0]} ${lines[lines.length - 1]}`);
    }
    const message = lines[0]!.replace(/\. To specify.*$/, "");
    const unknown = /^Unknown option '--([^']+)'$/.exec(message)?.[1];
    const near = unknown === undefined ? undefined : nearestOption(unknown, Object.keys(options));
    throw new UsageError(near ? `${message}: did you mean --${near}?` : message);
  }
  const flags: ParsedArgs["flags"] = {};
  for (const [key, value] of Object.entries(parsed.values)) {
    if (key.startsWith("no-") && !(key in OPTIONS)) {
      flags[key.slice(3) as OptionName] = !value;
    } else flags[key as OptionName] = value as string | boolean;
  }
  return { positionals: parsed.positionals, flags };
}

/**
 * Resolve the options a command accepts: flag, else environment, else default. A flag
 * the command does not take is a UsageError; irrelevant environment variables are ignored.
 */
export function resolveOptions<N extends OptionName>(
  command: string,
  parsed: ParsedArgs,
  accepted: readonly N[],
  env: { get(name: string): string | undefined } = Deno.env,
): Options<N> {
  for (const name of Object.keys(parsed.flags) as OptionName[]) {
    if (name !== "help" && !(accepted as readonly string[]).includes(name)) {
      throw new UsageError(`Invalid flag --${name}: shoal ${command} does not take it`);
    }
  }
  const result: Partial<Record<OptionName, OptionValue>> = {};
  for (const name of accepted) {
    const spec: OptionSpec = OPTIONS[name];
    const flag = parsed.flags[name];
    const variable = envName(name);
    const fromEnv = variable ? env.get(variable) : undefined;
    if (flag !== undefined) {
      result[name] = typeof flag === "boolean"
        ? (spec.kind === "boolean" ? flag : undefined)
        : convert(name, flag, `--${name}`);
      if (typeof flag === "boolean" && spec.kind !== "boolean") {
        throw new UsageError(`Invalid --${name}: a value is required`);
      }
    } else if (fromEnv !== undefined && fromEnv !== "") {
      result[name] = convert(name, fromEnv, variable!);
    } else if (spec.default !== undefined) {
      result[name] = convert(name, spec.default, `default of --${name}`);
    } else result[name] = undefined;
  }
  for (const name of ["database-url", "read-database-url"] as const) {
    const url = result[name];
    if (typeof url !== "string") continue;
    try {
      checkDatabaseUrl(url);
    } catch (error) {
      // Which of the two URLs: the message never echoes it (it may hold a password).
      const which = name === "read-database-url" ? " (--read-database-url)" : "";
      throw new UsageError(`${(error as Error).message}${which}`);
    }
  }
  // The one place values meet their types: convert() returns each kind's type, and the
  // default of an option with choices is one of them.
  return result as Options<N>;
}

/** The flags every command that talks to the database takes. */
export const COMMON = ["database-url", "log-level", "log-format", "prepare"] as const;
/** The consumer's flags. */
export const CONSUMER = [
  "queues",
  "concurrency",
  "prefetch",
  "visibility-timeout",
  "poll-interval",
  "listen",
  "shutdown-grace",
  "task-timeout",
  "max-payload",
  "max-fan-out",
  "http-allow",
  "sql-schemas",
] as const;
/** The flags of the leader-elected roles (reaper and scheduler). */
export const LEADER = [
  "lease",
  "interval",
  "dead-retention",
  "execution-key-retention",
  "schedules",
] as const;
