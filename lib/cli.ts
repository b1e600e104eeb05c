/**
 * shoal's command line: parse flags into a validated config, then start one role or run
 * one admin command. `main` is exported so a team's own entry file can register its
 * tasks and compile its own binary (see examples/).
 *
 * @module
 */
import {
  COMMON,
  CONSUMER,
  LEADER,
  type OptionName,
  OPTIONS,
  type OptionValue,
  parseCommandLine,
  type ParsedArgs,
  parseListenAddress,
  resolveOptions,
  UsageError,
} from "./config.ts";
import { defaultWorkerId, runConsumer } from "./consumer.ts";
import { checkLeaderTiming } from "./leader.ts";
import { cancelExecution } from "./execution.ts";
import { runReaper } from "./reaper.ts";
import {
  checkSchedule,
  listSchedules,
  loadSchedulesFile,
  removeSchedule,
  type ScheduleSpec,
  setScheduleEnabled,
  upsertSchedule,
} from "./schedule.ts";
import { runScheduler } from "./scheduler.ts";
import { HttpServer } from "./http_server.ts";
import { enableMetrics } from "./metrics.ts";
import {
  connect,
  isConnectionError,
  redactUrl,
  type Sql,
  tolerateDriverWriteAfterClose,
  waitForDatabase,
} from "./db.ts";
import { listDead, purgeDead, retryDead } from "./dead.ts";
import { runDev } from "./dev.ts";
import { describeError, type LogFormat, logger, setupLogging } from "./log.ts";
import { checkSchema, loadMigrations, migrate } from "./migrate.ts";
import { checkJobSpec, enqueueMany, type JobSpec } from "./queue.ts";
import { formatSchedules, formatStatus, status, watchStatus } from "./status.ts";
import { builtinTasks } from "./builtin_tasks.ts";
import { type AnyTask, TaskRegistry } from "./tasks.ts";
import { httpTask } from "./http_task.ts";
import { sqlTask } from "./sql_task.ts";

export interface MainOptions {
  /** Tasks to register beside the built-ins. */
  tasks?: AnyTask[];
}

const USAGE = `shoal: a Postgres-native task queue

Usage:
  shoal --role consumer|reaper|scheduler|all [--queues a,b] [--concurrency N] [--migrate]
        [--http [HOST:PORT]] ...
  shoal migrate
  shoal enqueue --task T [--queue Q] [--payload JSON] [--run-at ISO] [--priority N] [--key K]
  shoal status [--json] [--watch [--interval 2s]]
  shoal cancel EXECUTION
  shoal dead list [--queue Q] [--limit N] [--json] | retry ID | purge [--queue Q] [--older-than D]
  shoal schedule add NAME --cron EXPR --task T [--queue Q] [--payload JSON] [--tz ZONE] [--priority N]
  shoal schedule list [--json] | pause NAME | resume NAME | rm NAME
  shoal dev [--dir .shoal] [--http [HOST:PORT]]

Options (flags win over SHOAL_<NAME> environment variables, which win over defaults):
`;

function usage(): string {
  const lines = Object.entries(OPTIONS).map(([name, spec]) => {
    const def = "default" in spec ? ` (default ${spec.default})` : "";
    return `  --${name.padEnd(20)} ${spec.help}${def}`;
  });
  return USAGE + lines.join("\n") + "\n";
}

const out = (text: string) => Deno.stdout.writeSync(new TextEncoder().encode(text));
const err = (text: string) => Deno.stderr.writeSync(new TextEncoder().encode(text));

/** Run shoal with these arguments; resolves to the process exit code. */
export async function main(args: string[], options: MainOptions = {}): Promise<number> {
  // A stray rejection (postgres.js can raise one when Postgres ends a session under a
  // transaction) must not kill a worker with its jobs in flight: log it and keep serving.
  globalThis.addEventListener("unhandledrejection", (event) => {
    event.preventDefault();
    logger("process").error("Unhandled rejection: {error}", { error: describeError(event.reason) });
  });
  let parsed: ParsedArgs;
  try {
    parsed = parseCommandLine(args);
    if (parsed.flags.help) {
      out(usage());
      return 0;
    }
    return await dispatch(parsed, new TaskRegistry([...builtinTasks(), ...(options.tasks ?? [])]));
  } catch (error) {
    if (error instanceof UsageError) {
      err(`shoal: ${oneLine(error.message)}\n`);
      return 2;
    }
    err(`shoal: ${oneLine(describeFailure(error))}\n`);
    return 1;
  }
}

/** One line, whatever it echoes: a flag value or a cron string may hold a newline. */
function oneLine(text: string): string {
  return text.replace(/\s*[\r\n]+\s*/g, " ");
}

function describeFailure(error: unknown): string {
  if (error instanceof Error && !(error as { code?: string }).code) return error.message;
  return describeError(error);
}

async function dispatch(parsed: ParsedArgs, tasks: TaskRegistry): Promise<number> {
  const [command, ...rest] = parsed.positionals;
  if (command === undefined) {
    if (parsed.flags.role === undefined && !Deno.env.get("SHOAL_ROLE")) {
      throw new UsageError("Nothing to do: give --role or a command (shoal --help lists them)");
    }
    return await roleCommand(parsed, tasks);
  }
  switch (command) {
    case "migrate":
      noExtra(command, rest);
      return await withDb(command, parsed, [], async (sql) => {
        const applied = await migrate(sql, await loadMigrations());
        out(
          applied.length ? `Applied migrations: ${applied.join(", ")}\n` : "Schema is up to date\n",
        );
        return 0;
      });
    case "enqueue":
      noExtra(command, rest);
      return await enqueueCommand(parsed, tasks);
    case "status":
      noExtra(command, rest);
      return await withDb(command, parsed, ["json", "watch", "interval"], async (sql, opts) => {
        await checkSchema(sql, await loadMigrations());
        if (opts.watch) return await watchCommand(sql, parsed, opts);
        if (parsed.flags.interval !== undefined) {
          throw new UsageError("Invalid --interval: shoal status takes it only with --watch");
        }
        const s = await status(sql);
        out(opts.json ? JSON.stringify(s, null, 2) + "\n" : formatStatus(s));
        return 0;
      });
    case "dead":
      return await deadCommand(parsed, rest);
    case "schedule":
      return await scheduleCommand(parsed, rest);
    case "cancel": {
      if (rest.length !== 1 || !/^\d+$/.test(rest[0]!)) {
        throw new UsageError("shoal cancel takes one execution id");
      }
      return await withDb("cancel", parsed, [], async (sql) => {
        if (!(await cancelExecution(sql, rest[0]!))) {
          err(`shoal: Execution ${rest[0]} is not pending or running\n`);
          return 1;
        }
        out(`Cancelled execution ${rest[0]}\n`);
        return 0;
      });
    }
    case "dev":
      noExtra(command, rest);
      return await devCommand(parsed, tasks);
    default:
      throw new UsageError(`Unknown command "${command}" (shoal --help lists them)`);
  }
}

function noExtra(command: string, rest: string[]): void {
  if (rest.length > 0) throw new UsageError(`shoal ${command} takes no argument "${rest[0]}"`);
}

type Resolved = Record<string, OptionValue>;

/** `--payload` as JSON (its shape is checked where the job or schedule is). */
function parsePayloadFlag(opts: Resolved): unknown {
  try {
    return JSON.parse(opts.payload as string);
  } catch (error) {
    throw new UsageError(`Invalid --payload: not JSON: ${(error as Error).message}`);
  }
}

async function setup(command: string, parsed: ParsedArgs, extra: readonly OptionName[]) {
  const opts: Resolved = resolveOptions(command, parsed, [...COMMON, ...extra]);
  await setupLogging({
    level: opts["log-level"] as "info",
    format: opts["log-format"] as LogFormat,
  });
  return opts;
}

/** Open the database for one command, turning connection failures into one clear line. */
async function withDb(
  command: string,
  parsed: ParsedArgs,
  extra: readonly OptionName[],
  run: (sql: Sql, opts: Resolved) => Promise<number>,
  applicationName = `shoal ${command}`,
  check?: (opts: Resolved) => void | Promise<void>,
): Promise<number> {
  const opts = await setup(command, parsed, extra);
  await check?.(opts); // flag values are checked before the database is touched
  const url = opts["database-url"];
  if (typeof url !== "string") {
    throw new UsageError("No database: set DATABASE_URL or pass --database-url");
  }
  const sql = connect(url, {
    applicationName,
    prepare: opts.prepare as boolean,
    max: typeof opts.concurrency === "number" ? Math.min(20, opts.concurrency + 2) : 4,
  });
  try {
    // Admin commands need the schema; roles check it themselves (after --migrate).
    if (command !== "migrate" && !command.startsWith("--role") && command !== "status") {
      await checkSchema(sql, await loadMigrations());
    }
    return await run(sql, opts);
  } catch (error) {
    if (isConnectionError(error)) {
      throw new Error(`Cannot reach the database at ${redactUrl(url)}: ${describeError(error)}`, {
        cause: error,
      });
    }
    throw error;
  } finally {
    await sql.end({ timeout: 5 });
  }
}

/** How often `shoal status --watch` redraws unless --interval says otherwise. */
const WATCH_INTERVAL_MS = 2000;

/** `shoal status --watch`: redraw until SIGINT or SIGTERM, then exit 0. */
async function watchCommand(sql: Sql, parsed: ParsedArgs, opts: Resolved): Promise<number> {
  // Only the flag counts: SHOAL_INTERVAL is the reaper's tick, not a redraw rate.
  const intervalMs = parsed.flags.interval === undefined
    ? WATCH_INTERVAL_MS
    : opts.interval as number;
  const stop = new AbortController();
  const untrap = trapSignals(stop);
  try {
    await watchStatus(sql, { intervalMs, json: opts.json as boolean, write: out }, stop.signal);
  } finally {
    untrap();
  }
  return 0;
}

async function enqueueCommand(parsed: ParsedArgs, tasks: TaskRegistry): Promise<number> {
  const extra = [
    "task",
    "queue",
    "payload",
    "run-at",
    "priority",
    "key",
    "fairness-key",
    "max-attempts",
    "max-payload",
  ] as const;
  let spec: JobSpec | null = null;
  const check = (opts: Resolved) => {
    const name = opts.task as string | undefined;
    if (name === undefined) throw new UsageError("shoal enqueue needs --task");
    const payload = parsePayloadFlag(opts);
    let runAt: Date | undefined;
    if (opts["run-at"] !== undefined) {
      runAt = new Date(opts["run-at"] as string);
      if (Number.isNaN(runAt.getTime())) {
        throw new UsageError(`Invalid --run-at: "${opts["run-at"]}" is not an ISO 8601 instant`);
      }
    }
    const task = tasks.get(name);
    spec = {
      task: name,
      payload: payload as Record<string, unknown>,
      queue: (opts.queue as string | undefined) ?? task?.queue,
      runAt,
      priority: opts.priority as number,
      key: opts.key as string | undefined,
      fairnessKey: opts["fairness-key"] as string | undefined,
      maxAttempts: (opts["max-attempts"] as number | undefined) ?? task?.maxAttempts,
    };
    try {
      checkJobSpec(spec, opts["max-payload"] as number);
    } catch (error) {
      throw new UsageError((error as Error).message);
    }
  };
  return await withDb(
    "enqueue",
    parsed,
    extra,
    async (sql, opts) => {
      const [result] = await enqueueMany(sql, [spec!], {
        maxPayloadBytes: opts["max-payload"] as number,
      });
      out(`${result!.id}\n`);
      return 0;
    },
    "shoal enqueue",
    check,
  );
}

async function deadCommand(parsed: ParsedArgs, rest: string[]): Promise<number> {
  const [sub, ...args] = rest;
  switch (sub) {
    case "list":
      noExtra("dead list", args);
      return await withDb("dead list", parsed, ["queue", "limit", "json"], async (sql, opts) => {
        const rows = await listDead(sql, {
          queue: opts.queue as string | undefined,
          limit: opts.limit as number,
        });
        if (opts.json) out(JSON.stringify(rows, null, 2) + "\n");
        else if (rows.length === 0) out("No dead jobs\n");
        else {
          for (const r of rows) {
            out(
              `${r.id}  ${r.queue}  ${r.task}  attempts ${r.attempts}  died ${r.died_at.toISOString()}  ${r.reason}\n`,
            );
          }
        }
        return 0;
      });
    case "retry": {
      if (args.length !== 1 || !/^\d+$/.test(args[0]!)) {
        throw new UsageError("shoal dead retry takes one job id");
      }
      return await withDb("dead retry", parsed, [], async (sql) => {
        const outcome = await retryDead(sql, args[0]!);
        if (outcome === "not_found") {
          err(`shoal: No dead job ${args[0]}\n`);
          return 1;
        }
        if (outcome === "duplicate") {
          err(`shoal: Dead job ${args[0]} not retried: a live job holds its dedupe key\n`);
          return 1;
        }
        if (outcome === "execution_ended") {
          err(`shoal: Dead job ${args[0]} not retried: its execution has ended\n`);
          return 1;
        }
        out(`Retried job ${args[0]}\n`);
        return 0;
      });
    }
    case "purge":
      noExtra("dead purge", args);
      return await withDb("dead purge", parsed, ["queue", "older-than"], async (sql, opts) => {
        const n = await purgeDead(sql, {
          queue: opts.queue as string | undefined,
          olderThanMs: opts["older-than"] as number | undefined,
        });
        out(`Purged ${n} dead jobs\n`);
        return 0;
      });
    default:
      throw new UsageError("shoal dead takes list, retry ID or purge");
  }
}

/**
 * A repeat this soon after the first signal is one keypress delivered twice, not a second
 * request: `deno task` forwards the terminal's SIGINT to its child, which also gets it
 * from the terminal directly.
 */
const SIGNAL_ECHO_MS = 1000;

/** Install SIGTERM/SIGINT handlers: the first aborts `stop`, the second exits at once. */
function trapSignals(stop: AbortController): () => void {
  const log = logger("signals");
  let firstAt = 0;
  const handlers: [Deno.Signal, () => void][] = (["SIGTERM", "SIGINT"] as const).map((sig) => [
    sig,
    () => {
      if (!stop.signal.aborted) {
        firstAt = Date.now();
        log.info("Received {signal}: shutting down (send it again to exit at once)", {
          signal: sig,
        });
        stop.abort();
      } else if (sig === "SIGINT" && Date.now() - firstAt < SIGNAL_ECHO_MS) {
        log.debug("Ignored {signal} repeated within a second of the first", { signal: sig });
      } else {
        log.warn("Received {signal} again: exiting now", { signal: sig });
        Deno.exit(sig === "SIGINT" ? 130 : 143);
      }
    },
  ]);
  for (const [sig, fn] of handlers) Deno.addSignalListener(sig, fn);
  return () => {
    for (const [sig, fn] of handlers) Deno.removeSignalListener(sig, fn);
  };
}

/**
 * The consumer's idle poll. With LISTEN, enqueues wake it (and a delayed job's NOTIFY
 * carries its start time), so the poll is only a safety net for what no NOTIFY announces:
 * a crashed consumer's jobs coming back after their deadline. Without LISTEN the poll is
 * how it finds work.
 */
function pollIntervalMs(opts: Resolved): number {
  const given = opts["poll-interval"] as number | undefined;
  return given ?? (opts.listen === false ? 2_000 : 30_000);
}

/** Consumer options from resolved flags. */
function consumerOptions(opts: Resolved) {
  return {
    queues: opts.queues as string[],
    concurrency: opts.concurrency as number,
    prefetch: opts.prefetch as number,
    visibilityTimeoutMs: opts["visibility-timeout"] as number,
    pollIntervalMs: pollIntervalMs(opts),
    listen: opts.listen as boolean,
    shutdownGraceMs: opts["shutdown-grace"] as number,
    taskTimeoutMs: opts["task-timeout"] as number,
    maxPayloadBytes: opts["max-payload"] as number,
    maxFanOut: opts["max-fan-out"] as number,
  };
}

/**
 * The registry with shoal.http and shoal.sql configured from --http-allow and
 * --sql-schemas (the registry is built before flags are read). A bad entry is a UsageError.
 */
function configureBuiltins(tasks: TaskRegistry, opts: Resolved): void {
  try {
    // Each checks its list and throws one line on a bad entry.
    tasks.replace(httpTask({ allow: (opts["http-allow"] as string[] | undefined) ?? [] }));
    tasks.replace(sqlTask({ schemas: (opts["sql-schemas"] as string[] | undefined) ?? [] }));
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
}

/** The flags each role takes (besides the common ones, --role and --migrate). */
const ROLE_FLAGS: Record<string, readonly OptionName[]> = {
  consumer: [...CONSUMER, "http"],
  reaper: ["lease", "interval", "dead-retention", "http"],
  scheduler: ["lease", "interval", "schedules", "listen", "http"],
  all: [...CONSUMER, ...LEADER, "http"],
};

/**
 * /healthz turns 503 once the database has not answered for three of the roles' longest
 * wait (the consumer's poll interval, the leaders' tick), and never sooner than a second.
 */
function healthWindowMs(opts: Resolved, roles: string[]): number {
  const waits = roles.map((r) => r === "consumer" ? pollIntervalMs(opts) : opts.interval as number);
  return Math.max(1000, 3 * Math.max(...waits));
}

/** Start the `--http` server when asked for (and metrics with it); null when not. */
async function startHttp(sql: Sql, opts: Resolved, roles: string[]): Promise<HttpServer | null> {
  if (typeof opts.http !== "string") return null;
  const address = parseListenAddress(opts.http);
  return new HttpServer(address, {
    sql,
    metrics: await enableMetrics(),
    healthWindowMs: healthWindowMs(opts, roles),
  });
}

/** Leader-role options from resolved flags; refuses an interval not shorter than the lease. */
function leaderOptions(opts: Resolved, roles: string[]) {
  const leaseMs = opts.lease as number;
  const intervalMs = opts.interval as number;
  for (const role of roles) {
    try {
      checkLeaderTiming(role, intervalMs, leaseMs);
    } catch (error) {
      throw new UsageError((error as Error).message);
    }
  }
  return {
    holder: defaultWorkerId(),
    leaseMs,
    intervalMs,
    deadRetentionMs: opts["dead-retention"] as number,
    listen: opts.listen as boolean,
    schedulesFile: opts.schedules as string | undefined,
  };
}

async function roleCommand(parsed: ParsedArgs, tasks: TaskRegistry): Promise<number> {
  const role = resolveOptions("--role", { positionals: [], flags: { role: parsed.flags.role } }, [
    "role",
  ]).role as string;
  const roles = role === "all" ? ["consumer", "reaper", "scheduler"] : [role];
  // A long-running role rides out postgres.js's write-after-close crash (see lib/db.ts).
  tolerateDriverWriteAfterClose();
  return await withDb(
    `--role ${role}`,
    parsed,
    ["role", "migrate", "startup-wait", ...ROLE_FLAGS[role]!],
    async (sql, opts) => {
      const leader = roles.includes("consumer") && roles.length === 1
        ? null
        : leaderOptions(opts, roles.filter((r) => r !== "consumer"));
      configureBuiltins(tasks, opts);
      if (opts.schedules !== undefined) {
        // Read the schedules file before anything starts: a bad file is a usage error.
        await loadSchedulesFile(opts.schedules as string).catch((error) => {
          throw new UsageError((error as Error).message);
        });
      }
      // Up before migrations, so /readyz says "starting" while they run.
      const http = await startHttp(sql, opts, roles);
      try {
        return await runRoles(sql, opts, roles, leader, tasks, http);
      } finally {
        await http?.close();
      }
    },
    `shoal ${role}`,
  );
}

/** Check (or apply) migrations, then run the roles until a signal or a failure stops them. */
async function runRoles(
  sql: Sql,
  opts: Resolved,
  roles: string[],
  leader: ReturnType<typeof leaderOptions> | null,
  tasks: TaskRegistry,
  http: HttpServer | null,
): Promise<number> {
  const stop = new AbortController();
  stop.signal.addEventListener("abort", () => http?.stopping(), { once: true });
  const untrap = trapSignals(stop);
  // Started before its database: wait for it (--startup-wait); a SIGTERM meanwhile exits 0.
  try {
    const url = opts["database-url"] as string;
    const maxWaitMs = opts["startup-wait"] as number;
    if (!await waitForDatabase(sql, { url, maxWaitMs, stop: stop.signal })) {
      untrap();
      return 0;
    }
    const migrations = await loadMigrations();
    if (opts.migrate) await migrate(sql, migrations);
    await checkSchema(sql, migrations);
  } catch (error) {
    untrap();
    throw error;
  }
  const run = (r: string): Promise<void> => {
    if (r === "consumer") {
      return runConsumer({ sql, tasks }, consumerOptions(opts), stop.signal);
    }
    if (r === "reaper") return runReaper(sql, leader!, stop.signal);
    return runScheduler(sql, leader!, stop.signal);
  };
  try {
    // A role that fails stops the others gracefully (leases released, running jobs
    // handed back) before the pool closes, instead of the pool closing under them.
    const running = roles.map((r) =>
      run(r).catch((error) => {
        stop.abort();
        throw error;
      })
    );
    http?.ready();
    const results = await Promise.allSettled(running);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
    if (failed) throw failed.reason;
  } finally {
    untrap();
  }
  return 0;
}

async function scheduleCommand(parsed: ParsedArgs, rest: string[]): Promise<number> {
  const [sub, ...args] = rest;
  const oneName = (what: string) => {
    if (args.length !== 1) throw new UsageError(`shoal schedule ${what} takes one schedule name`);
    return args[0]!;
  };
  switch (sub) {
    case "add": {
      const name = oneName("add");
      const extra = ["cron", "task", "queue", "payload", "tz", "priority"] as const;
      let spec: ScheduleSpec | null = null;
      const check = async (opts: Resolved) => {
        if (opts.cron === undefined) throw new UsageError("shoal schedule add needs --cron");
        if (opts.task === undefined) throw new UsageError("shoal schedule add needs --task");
        const payload = parsePayloadFlag(opts);
        spec = {
          name,
          cron: opts.cron as string,
          task: opts.task as string,
          queue: opts.queue as string | undefined,
          payload: payload as Record<string, unknown>,
          tz: opts.tz as string,
          priority: opts.priority as number,
        };
        try {
          await checkSchedule(spec);
        } catch (error) {
          throw new UsageError((error as Error).message);
        }
      };
      return await withDb(
        "schedule add",
        parsed,
        extra,
        async (sql) => {
          const outcome = await upsertSchedule(sql, spec!);
          out(`Schedule ${name} ${outcome}\n`);
          return 0;
        },
        "shoal schedule add",
        check,
      );
    }
    case "list":
      noExtra("schedule list", args);
      return await withDb("schedule list", parsed, ["json"], async (sql, opts) => {
        const rows = await listSchedules(sql);
        if (opts.json) out(JSON.stringify(rows, null, 2) + "\n");
        else out(formatSchedules(rows));
        return 0;
      });
    case "pause":
    case "resume":
    case "rm": {
      const name = oneName(sub);
      return await withDb(`schedule ${sub}`, parsed, [], async (sql) => {
        const found = sub === "rm"
          ? await removeSchedule(sql, name)
          : await setScheduleEnabled(sql, name, sub === "resume");
        if (!found) {
          err(`shoal: No schedule named ${name}\n`);
          return 1;
        }
        out(
          `Schedule ${name} ${sub === "rm" ? "removed" : sub === "pause" ? "paused" : "resumed"}\n`,
        );
        return 0;
      });
    }
    default:
      throw new UsageError(
        "shoal schedule takes add NAME, list, pause NAME, resume NAME or rm NAME",
      );
  }
}

async function devCommand(parsed: ParsedArgs, tasks: TaskRegistry): Promise<number> {
  const opts = await setup("dev", parsed, ["dir", ...CONSUMER, "http"]);
  configureBuiltins(tasks, opts);
  // Its roles ride out postgres.js's write-after-close crash like any role (see lib/db.ts).
  tolerateDriverWriteAfterClose();
  const stop = new AbortController();
  const untrap = trapSignals(stop);
  try {
    await runDev({
      tasks,
      databaseUrl: opts["database-url"] as string | undefined,
      dir: opts.dir as string,
      prepare: opts.prepare as boolean,
      consumer: consumerOptions(opts),
      print: out,
      serveHttp: (sql) => startHttp(sql, opts, ["consumer"]),
    }, stop.signal);
  } finally {
    untrap();
  }
  return 0;
}
