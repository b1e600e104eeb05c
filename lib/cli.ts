/**
 * shoal's command line: parse flags into typed options (lib/config.ts), then start one
 * role (through lib/roles.ts, which `shoal dev` shares) or run one admin command; each
 * command declares what it needs of the database. `main` is exported so a team's own
 * entry file can register its tasks and compile its own binary (see examples/).
 *
 * @module
 */
import { checkArray, checkOptions, checkStringList, refusal } from "./args.ts";
import {
  COMMON,
  CONSUMER,
  DEFAULT_HTTP,
  LEADER,
  type OptionName,
  OPTIONS,
  type Options,
  parseCommandLine,
  type ParsedArgs,
  parseListenAddress,
  resolveOptions,
  UsageError,
} from "./config.ts";
import { type ConsumerOptions, defaultWorkerId } from "./consumer.ts";
import { checkLeaderTiming } from "./leader.ts";
import { cancelExecution, getExecution, startExecution } from "./execution.ts";
import { formatExecutionView, viewExecution } from "./execution_view.ts";
import type { ReaperOptions } from "./reaper.ts";
import {
  checkSchedule,
  listSchedules,
  loadSchedulesFile,
  removeSchedule,
  type ScheduleSpec,
  setScheduleEnabled,
  upsertSchedule,
} from "./schedule.ts";
import type { SchedulerOptions } from "./scheduler.ts";
import {
  closePool,
  connect,
  connectReadPool,
  isConnectionError,
  namingDatabase,
  type Sql,
  waitForDatabase,
} from "./db.ts";
import { listDead, purgeDead, retryDead } from "./dead.ts";
import { localDatabaseHint, runDev, unreachableDevHint } from "./dev.ts";
import { describeError, logger, setupLogging } from "./log.ts";
import { formatDuration } from "./duration.ts";
import { checkSchema, describeMigration, loadMigrations, migrate } from "./migrate.ts";
import {
  checkJobSpec,
  CLI_ENQUEUE,
  DEFAULT_MAX_ATTEMPTS,
  DEFAULT_QUEUE,
  enqueueMany,
  type JobSpec,
  type TaskJobSpec,
} from "./queue.ts";
import { listCatalogTasks } from "./catalog.ts";
import {
  clearConcurrencyLimit,
  clearFairnessWeight,
  clearRateLimit,
  flowScope,
  flowStatus,
  holdKey,
  MAX_FAIRNESS_WEIGHT,
  MAX_RATE_STARTS,
  MAX_RUNNING_LIMIT,
  pauseQueue,
  resumeQueue,
  setConcurrencyLimit,
  setFairnessWeight,
  setRateLimit,
} from "./flow.ts";
import { checkExecutionKey, checkName, checkPayload, MAX_FAIRNESS_KEY_LENGTH } from "./names.ts";
import { checkEventKey, checkEventName, emitEvent } from "./events.ts";
import {
  DASHBOARD_POOL_MAX,
  type Role,
  type Roles,
  runRoles,
  startHttp,
  trapSignals,
  untilStopped,
} from "./roles.ts";
import {
  startTracing,
  stopTracing,
  type TracingConfig,
  TracingConfigError,
  tracingFromEnv,
} from "./tracing.ts";
import {
  formatFlowLimits,
  formatPausedQueues,
  formatSchedules,
  formatStatus,
  status,
  watchStatus,
} from "./status.ts";
import { builtinTasks } from "./builtin_tasks.ts";
import { accessFromEnv, bindRefusal } from "./dashboard/guard.ts";
import type { ListenAddress } from "./http_server.ts";
import { type AnyTask, checkTask, TaskRegistry } from "./tasks.ts";
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
  shoal status [--json] [--exact] [--watch [--interval 2s]] [--read-database-url URL]
  shoal execution start --task T [--key K] [--queue Q] [--payload JSON] [--run-at ISO] [--json]
  shoal execution show ID [--json]
  shoal cancel EXECUTION
  shoal event emit NAME [--key K] [--payload JSON]   deliver an event to the jobs waiting for it
  shoal dead list [--queue Q] [--limit N] [--json] | retry ID | purge [--queue Q] [--older-than D] | purge --all
  shoal schedule add NAME --cron EXPR --task T [--queue Q] [--payload JSON] [--tz ZONE] [--priority N]
        [--backfill N]
  shoal schedule list [--json] | pause NAME | resume NAME | rm NAME
  shoal queue pause QUEUE | resume QUEUE | list [--json]
  shoal limit set QUEUE N [--key K] [--task T] | clear QUEUE [--key K] [--task T] | list [--json]
  shoal limit rate QUEUE N --per D [--key K] [--task T] | unrate QUEUE [--key K] [--task T]
  shoal limit hold QUEUE --key K --for D [--task T] | weight QUEUE W --key K | unweight QUEUE --key K
  shoal dev [--dir .shoal] [--http [HOST:PORT]] [--read-only]
  shoal dashboard [--http HOST:PORT] [--read-only] [--read-database-url URL]   (credentials: SHOAL_DASHBOARD_TOKEN, or
        SHOAL_DASHBOARD_USER and SHOAL_DASHBOARD_PASSWORD; required beyond 127.0.0.1)

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
  // A mistake in the entry file, not on the command line: thrown, not an exit code.
  checkStringList("main", "args", args);
  checkOptions("main", options);
  checkArray("main", "options.tasks", options.tasks, "an array of tasks", { optional: true });
  options.tasks?.forEach((task, i) => checkTask("main", `options.tasks[${i}]`, task));
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
  if (error instanceof Error && !("code" in error && error.code)) return error.message;
  return describeError(error);
}

async function dispatch(parsed: ParsedArgs, tasks: TaskRegistry): Promise<number> {
  const [command, ...rest] = parsed.positionals;
  if (command === undefined) {
    // The role alone first: the flags it takes depend on it.
    const roleOnly: ParsedArgs = { positionals: [], flags: { role: parsed.flags.role } };
    const { role } = resolveOptions("--role", roleOnly, ["role"]);
    if (role === undefined) {
      throw new UsageError("Nothing to do: give --role or a command (shoal --help lists them)");
    }
    return await ROLES[role](parsed, tasks);
  }
  switch (command) {
    case "migrate":
      noExtra(command, rest);
      return await withDb(
        parsed,
        { name: "migrate", flags: [], needs: "connection" },
        async (sql) => {
          out(`${describeMigration(await migrate(sql, await loadMigrations()))}\n`);
          return 0;
        },
      );
    case "enqueue":
      noExtra(command, rest);
      return await enqueueCommand(parsed, tasks);
    case "status":
      noExtra(command, rest);
      return await withDb(parsed, {
        name: "status",
        flags: ["json", "exact", "watch", "interval", "read-database-url"],
        needs: "current schema",
      }, async (sql, opts) =>
        await withReadPool(opts, "shoal status", async (readSql) => {
          if (opts.watch) return await watchCommand(sql, parsed, opts, readSql);
          if (parsed.flags.interval !== undefined) {
            throw new UsageError("Invalid --interval: shoal status takes it only with --watch");
          }
          const s = await status(readSql ?? sql, {
            exact: opts.exact,
            readReplica: readSql !== undefined,
          });
          out(opts.json ? JSON.stringify(s, null, 2) + "\n" : formatStatus(s));
          return 0;
        }));
    case "dead":
      return await deadCommand(parsed, rest);
    case "schedule":
      return await scheduleCommand(parsed, rest);
    case "queue":
      return await queueCommand(parsed, rest);
    case "limit":
      return await limitCommand(parsed, rest);
    case "execution":
      return await executionCommand(parsed, rest, tasks);
    case "event":
      return await eventCommand(parsed, rest);
    case "cancel": {
      if (rest.length !== 1 || !/^\d+$/.test(rest[0]!)) {
        throw new UsageError("shoal cancel takes one execution id");
      }
      return await withDb(
        parsed,
        { name: "cancel", flags: [], needs: "current schema" },
        async (sql) => {
          if (!(await cancelExecution(sql, rest[0]!))) {
            const execution = await getExecution(sql, rest[0]!);
            err(
              execution === null
                ? `shoal: No execution ${rest[0]}\n`
                : `shoal: Execution ${rest[0]} is already ${execution.status}\n`,
            );
            return 1;
          }
          out(`Cancelled execution ${rest[0]}\n`);
          return 0;
        },
      );
    }
    case "dev":
      noExtra(command, rest);
      return await devCommand(parsed, tasks);
    case "dashboard":
      noExtra(command, rest);
      return await dashboardCommand(parsed);
    default:
      throw new UsageError(`Unknown command "${command}" (shoal --help lists them)`);
  }
}

function noExtra(command: string, rest: string[]): void {
  if (rest.length > 0) throw new UsageError(`shoal ${command} takes no argument "${rest[0]}"`);
}

type CommonFlag = (typeof COMMON)[number];
type ConsumerFlag = (typeof CONSUMER)[number];

/**
 * `--payload` as JSON. Typed as the object a job or a schedule carries; its shape is
 * checked where the job or schedule is (checkJobSpec, checkSchedule), so no other value
 * gets through.
 */
function parsePayloadFlag(text: string): Record<string, unknown> {
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new UsageError(`Invalid --payload: not JSON: ${messageOf(error)}`);
  }
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** Resolve a command's options (the common ones first) and set up logging from them. */
async function setup<N extends OptionName>(
  command: string,
  parsed: ParsedArgs,
  flags: readonly N[],
): Promise<Options<CommonFlag | N>> {
  const opts = resolveOptions(command, parsed, [...COMMON, ...flags]);
  await setupLogging({ level: opts["log-level"], format: opts["log-format"] });
  return opts;
}

/** A command that talks to the database, with what it needs declared. */
interface DbCommand<N extends OptionName> {
  /** As typed after `shoal`, for messages: "dead list", "--role consumer". */
  name: string;
  /** The flags it takes besides the common ones, in the order their values are checked. */
  flags: readonly N[];
  /**
   * What it needs of the database. "current schema": one whose schema is that of this
   * binary, checked before the command runs (else: run shoal migrate). "connection": a
   * connection only, the command sees to the schema itself (migrate applies it; a role
   * waits for its database and may apply it first).
   */
  needs: "current schema" | "connection";
  /** application_name of its connections (default "shoal <name>"). */
  applicationName?: string;
  /** Its pool size (default 4). */
  poolSize?: (opts: Options<CommonFlag | N>) => number;
  /** Checks flag values before the database is touched. */
  check?: (opts: Options<CommonFlag | N>) => void | Promise<void>;
}

/** The resolved options of a command that has a database. */
type WithUrl<N extends OptionName> = Options<CommonFlag | N> & { "database-url": string };

/** Open the database for one command, turning connection failures into one clear line. */
async function withDb<N extends OptionName>(
  parsed: ParsedArgs,
  command: DbCommand<N>,
  run: (sql: Sql, opts: WithUrl<N>) => Promise<number>,
): Promise<number> {
  const resolved = await setup(command.name, parsed, command.flags);
  await command.check?.(resolved); // flag values are checked before the database is touched
  const url = resolved["database-url"];
  if (url === undefined) {
    throw new UsageError(
      `No database: set DATABASE_URL or pass --database-url; ${await localDatabaseHint(devDir())}`,
    );
  }
  const opts: WithUrl<N> = { ...resolved, "database-url": url };
  const sql = connect(url, {
    applicationName: command.applicationName ?? `shoal ${command.name}`,
    prepare: opts.prepare,
    max: command.poolSize?.(opts) ?? 4,
  });
  try {
    if (command.needs === "current schema") await checkSchema(sql, await loadMigrations());
    return await run(sql, opts);
  } catch (error) {
    const hint = isConnectionError(error) ? await unreachableDevHint(url, devDir()) : undefined;
    throw namingDatabase(error, url, hint);
  } finally {
    await closePool(sql);
  }
}

/**
 * Run `body` with the read pool of `--read-database-url` (lib/db.ts connectReadPool), or
 * with none when the flag is not given: then everything reads the primary, as before. A
 * failure of the read pool names its URL (redacted), not the primary's.
 */
async function withReadPool<T>(
  opts: Options<"read-database-url" | "prepare">,
  applicationName: string,
  body: (readSql: Sql | undefined) => Promise<T>,
): Promise<T> {
  const url = opts["read-database-url"];
  if (url === undefined) return await body(undefined);
  const readSql = connectReadPool(url, { applicationName, prepare: opts.prepare });
  try {
    // Reached before the command starts: a wrong read URL is one line about it.
    await readSql`select 1`.catch((error) => {
      throw namingDatabase(error, url);
    });
    return await body(readSql);
  } finally {
    await closePool(readSql);
  }
}

/** Where `shoal dev` keeps its database (SHOAL_DIR, else the default), for hints. */
function devDir(): string {
  return resolveOptions("dev", { positionals: [], flags: {} }, ["dir"]).dir;
}

/** How often `shoal status --watch` redraws unless --interval says otherwise. */
const WATCH_INTERVAL_MS = 2000;

/** `shoal status --watch`: redraw until SIGINT or SIGTERM, then exit 0. */
async function watchCommand(
  sql: Sql,
  parsed: ParsedArgs,
  opts: Options<"interval" | "json" | "exact">,
  readSql?: Sql,
): Promise<number> {
  // Only the flag counts: SHOAL_INTERVAL is the reaper's tick, not a redraw rate.
  const intervalMs = parsed.flags.interval === undefined ? WATCH_INTERVAL_MS : opts.interval;
  const stop = new AbortController();
  const untrap = trapSignals(stop);
  try {
    await watchStatus(
      sql,
      { intervalMs, json: opts.json, exact: opts.exact, readDb: readSql, write: out },
      stop.signal,
    );
  } finally {
    untrap();
  }
  return 0;
}

/** Whether any consumer ever registered `task` in the catalog. */
async function isRegistered(sql: Sql, task: string): Promise<boolean> {
  return (await listCatalogTasks(sql, { names: [task] })).length > 0;
}

/**
 * `shoal enqueue`: a queue or max attempts not given is the definition's when this binary
 * defines the task (as for a typed enqueue: a team's own binary knows its tasks before any
 * consumer has registered them), else the task's in the catalog (the catalog rule, applied
 * by the insert). A task neither knows still goes in (to `default`, 25 attempts, unless
 * given), with a warning on stderr.
 */
async function enqueueCommand(parsed: ParsedArgs, tasks: TaskRegistry): Promise<number> {
  let spec: JobSpec | TaskJobSpec | null = null;
  let name = "";
  return await withDb(parsed, {
    name: "enqueue",
    flags: [
      "task",
      "queue",
      "payload",
      "run-at",
      "priority",
      "key",
      "fairness-key",
      "concurrency-key",
      "max-attempts",
      "max-payload",
    ],
    needs: "current schema",
    check: (opts) => {
      spec = jobFromFlags("enqueue", opts, tasks, {
        key: opts.key,
        concurrencyKey: opts["concurrency-key"],
      });
      name = opts.task!;
    },
  }, async (sql, opts) => {
    const known = tasks.get(name) !== undefined || await isRegistered(sql, name);
    const [result] = await enqueueMany(sql, [spec!], { maxPayloadBytes: opts["max-payload"] });
    if (!known) {
      err(
        `Warning: no consumer has registered task "${name}": the job goes to queue ${
          spec!.queue ?? DEFAULT_QUEUE
        } with ${spec!.maxAttempts ?? DEFAULT_MAX_ATTEMPTS} attempts\n`,
      );
    }
    out(`${result!.id}\n`);
    return 0;
  });
}

/** The flags `shoal enqueue` and `shoal execution start` both describe a job with. */
type JobFlag =
  | "task"
  | "queue"
  | "payload"
  | "run-at"
  | "priority"
  | "fairness-key"
  | "max-attempts"
  | "max-payload";

/**
 * The job a command's flags describe (`extra`: the options only that command has), checked
 * as enqueue() checks it; a refusal is a usage error.
 */
function jobFromFlags(
  command: string,
  opts: Options<CommonFlag | JobFlag>,
  tasks: TaskRegistry,
  extra: { key?: string; concurrencyKey?: string },
): JobSpec | TaskJobSpec {
  if (opts.task === undefined) throw new UsageError(`shoal ${command} needs --task`);
  const payload = parsePayloadFlag(opts.payload);
  let runAt: Date | undefined;
  if (opts["run-at"] !== undefined) {
    runAt = new Date(opts["run-at"]);
    if (Number.isNaN(runAt.getTime())) {
      throw new UsageError(`Invalid --run-at: "${opts["run-at"]}" is not an ISO 8601 instant`);
    }
  }
  const definition = tasks.get(opts.task);
  const options = {
    queue: opts.queue,
    runAt,
    priority: opts.priority,
    fairnessKey: opts["fairness-key"],
    maxAttempts: opts["max-attempts"],
    ...extra,
  };
  const job: JobSpec | TaskJobSpec = definition === undefined
    ? { task: opts.task, payload, ...options }
    : { task: definition, payload, ...options };
  try {
    checkJobSpec(job, opts["max-payload"], CLI_ENQUEUE);
  } catch (error) {
    throw new UsageError(messageOf(error));
  }
  return job;
}

/** `shoal execution start` and `shoal execution show`. */
async function executionCommand(
  parsed: ParsedArgs,
  rest: string[],
  tasks: TaskRegistry,
): Promise<number> {
  const [sub, ...args] = rest;
  switch (sub) {
    case "start":
      noExtra("execution start", args);
      return await executionStartCommand(parsed, tasks);
    case "show": {
      if (args.length !== 1 || !/^\d+$/.test(args[0]!)) {
        throw new UsageError("shoal execution show takes one execution id");
      }
      const id = args[0]!;
      return await withDb(
        parsed,
        { name: "execution show", flags: ["json"], needs: "current schema" },
        async (sql, opts) => {
          const view = await viewExecution(sql, id);
          if (view === null) {
            err(`shoal: No execution ${id}\n`);
            return 1;
          }
          out(opts.json ? JSON.stringify(view, null, 2) + "\n" : formatExecutionView(view));
          return 0;
        },
      );
    }
    default:
      throw new UsageError(
        sub === undefined
          ? "shoal execution needs a subcommand: start or show"
          : `Unknown command "execution ${sub}" (shoal --help lists them)`,
      );
  }
}

/**
 * `shoal execution start`: start an execution with its first job, as startExecution() does.
 * With --key, a start with a key already held prints the holder's id (exit 0) and says on
 * stderr that nothing was started: a script may retry it safely. The job's queue and max
 * attempts follow the rule of `shoal enqueue`.
 */
async function executionStartCommand(parsed: ParsedArgs, tasks: TaskRegistry): Promise<number> {
  let spec: JobSpec | TaskJobSpec | null = null;
  let key: string | undefined;
  return await withDb(parsed, {
    name: "execution start",
    flags: [
      "task",
      "queue",
      "payload",
      "run-at",
      "priority",
      "key",
      "fairness-key",
      "max-attempts",
      "max-payload",
      "json",
    ],
    needs: "current schema",
    check: (opts) => {
      spec = jobFromFlags("execution start", opts, tasks, {});
      try {
        key = opts.key === undefined ? undefined : checkExecutionKey("--key", opts.key);
      } catch (error) {
        throw new UsageError(messageOf(error));
      }
    },
  }, async (sql, opts) => {
    const maxPayloadBytes = opts["max-payload"];
    const started = key === undefined
      ? { id: await startExecution(sql, spec!, { maxPayloadBytes }), created: true }
      : await startExecution(sql, spec!, { maxPayloadBytes, key });
    if (opts.json) {
      out(JSON.stringify(started) + "\n");
    } else {
      if (!started.created) {
        const status = (await getExecution(sql, started.id))?.status ?? "gone";
        err(
          `Execution ${started.id} holds key ${
            JSON.stringify(key)
          } (${status}): not started again\n`,
        );
      }
      out(`${started.id}\n`);
    }
    return 0;
  });
}

async function deadCommand(parsed: ParsedArgs, rest: string[]): Promise<number> {
  const [sub, ...args] = rest;
  switch (sub) {
    case "list":
      noExtra("dead list", args);
      return await withDb(parsed, {
        name: "dead list",
        flags: ["queue", "limit", "json"],
        needs: "current schema",
      }, async (sql, opts) => {
        const rows = await listDead(sql, { queue: opts.queue, limit: opts.limit });
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
      return await withDb(
        parsed,
        { name: "dead retry", flags: [], needs: "current schema" },
        async (sql) => {
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
        },
      );
    }
    case "purge":
      noExtra("dead purge", args);
      return await withDb(parsed, {
        name: "dead purge",
        flags: ["queue", "older-than", "all"],
        needs: "current schema",
        // Deleting every dead job is asked for by name, never the default of a bare command.
        check: (opts) => {
          const filtered = opts.queue !== undefined || opts["older-than"] !== undefined;
          if (filtered === opts.all) {
            throw new UsageError(
              "shoal dead purge takes --queue and/or --older-than, or --all for every dead job",
            );
          }
        },
      }, async (sql, opts) => {
        const n = await purgeDead(sql, { queue: opts.queue, olderThanMs: opts["older-than"] });
        out(`Purged ${n} dead jobs\n`);
        return 0;
      });
    default:
      throw new UsageError("shoal dead takes list, retry ID or purge");
  }
}

/**
 * The consumer's idle poll. With LISTEN, enqueues wake it (and a delayed job's NOTIFY
 * carries its start time), so the poll is only a safety net for what no NOTIFY announces:
 * a crashed consumer's jobs coming back after their deadline. Without LISTEN the poll is
 * how it finds work.
 */
function pollIntervalMs(opts: Options<"poll-interval" | "listen">): number {
  return opts["poll-interval"] ?? (opts.listen === false ? 2_000 : 30_000);
}

/** Consumer options from resolved flags. */
function consumerOptions(opts: Options<ConsumerFlag>): ConsumerOptions {
  return {
    queues: opts.queues,
    concurrency: opts.concurrency,
    prefetch: opts.prefetch,
    visibilityTimeoutMs: opts["visibility-timeout"],
    pollIntervalMs: pollIntervalMs(opts),
    listen: opts.listen,
    shutdownGraceMs: opts["shutdown-grace"],
    taskTimeoutMs: opts["task-timeout"],
    maxPayloadBytes: opts["max-payload"],
    maxFanOut: opts["max-fan-out"],
  };
}

/**
 * The registry with shoal.http and shoal.sql configured from --http-allow and
 * --sql-schemas (the registry is built before flags are read). A bad entry is a UsageError.
 */
function configureBuiltins(
  tasks: TaskRegistry,
  opts: Options<"http-allow" | "sql-schemas">,
): void {
  try {
    // Each checks its list and throws one line on a bad entry.
    tasks.replace(httpTask({ allow: opts["http-allow"] ?? [] }));
    tasks.replace(sqlTask({ schemas: opts["sql-schemas"] ?? [] }));
  } catch (error) {
    throw new UsageError(messageOf(error));
  }
}

/** The consumer role: its options, and the built-in tasks configured from its flags. */
function consumerRole(
  opts: Options<ConsumerFlag>,
  tasks: TaskRegistry,
): NonNullable<Roles["consumer"]> {
  const options = consumerOptions(opts);
  configureBuiltins(tasks, opts);
  return { tasks, options };
}

/** Refuses a leader role whose interval is not shorter than its lease. */
function checkTiming(role: "reaper" | "scheduler", opts: Options<"lease" | "interval">): void {
  try {
    checkLeaderTiming(role, opts.interval, opts.lease);
  } catch (error) {
    throw new UsageError(messageOf(error));
  }
}

function reaperRole(
  opts: Options<"lease" | "interval" | "dead-retention" | "execution-key-retention">,
  holder: string,
): ReaperOptions {
  checkTiming("reaper", opts);
  return {
    holder,
    leaseMs: opts.lease,
    intervalMs: opts.interval,
    deadRetentionMs: opts["dead-retention"],
    executionKeyRetentionMs: opts["execution-key-retention"],
  };
}

function schedulerRole(
  opts: Options<"lease" | "interval" | "listen" | "schedules">,
  holder: string,
): SchedulerOptions {
  checkTiming("scheduler", opts);
  return {
    holder,
    leaseMs: opts.lease,
    intervalMs: opts.interval,
    listen: opts.listen,
    schedulesFile: opts.schedules,
  };
}

/** The flags of every role, before its own. */
const ROLE_FLAGS = ["role", "migrate", "startup-wait"] as const;
type RoleFlag = (typeof ROLE_FLAGS)[number];

type RoleCommand = (parsed: ParsedArgs, tasks: TaskRegistry) => Promise<number>;

/** The flags of `shoal dev`'s `--http` server (its one database is the one it reads). */
const SERVE_FLAGS = ["http", "metrics-exact", "read-only"] as const;
/**
 * The flags of a role's `--http` server: `shoal dev`'s, and the read replica its reads may
 * use (ignored without --http: SHOAL_READ_DATABASE_URL may be set for every process).
 */
const HTTP_FLAGS = [...SERVE_FLAGS, "read-database-url"] as const;
type HttpFlag = typeof HTTP_FLAGS[number];

/**
 * `shoal --role <role>`: the role takes `flags` (then --http), builds its roles from their
 * values, waits for its database, migrates when asked, checks the schema and runs until a
 * signal or a failure stops it.
 */
function roleCommand<N extends OptionName>(
  role: string,
  flags: readonly N[],
  build: (opts: Options<CommonFlag | RoleFlag | N | HttpFlag>, tasks: TaskRegistry) => Roles,
  poolSize?: (opts: Options<CommonFlag | RoleFlag | N | HttpFlag>) => number,
): RoleCommand {
  return async (parsed, tasks) => {
    /** Tracing's settings (OTEL_*), checked with the flags, before the database is touched. */
    let tracing: TracingConfig | null = null;
    return await withDb(parsed, {
      name: `--role ${role}`,
      flags: [...ROLE_FLAGS, ...flags, ...HTTP_FLAGS],
      needs: "connection",
      applicationName: `shoal ${role}`,
      poolSize,
      check: () => {
        tracing = otelSettings();
      },
    }, async (sql, opts) => {
      const roles = build(opts, tasks);
      const schedules = roles.scheduler?.schedulesFile;
      if (schedules !== undefined) {
        // Read the schedules file before anything starts: a bad file is a usage error.
        await loadSchedulesFile(schedules).catch((error) => {
          throw new UsageError(messageOf(error));
        });
      }
      // Loaded only when OTEL_* asks for it (lib/tracing.ts); its spans are flushed after
      // the roles stopped, before the process exits.
      if (tracing !== null) await startTracing(tracing);
      try {
        await untilStopped(async (stop) => {
          // Only with --http: nothing else of a role reads what a replica could serve.
          const readUrl = opts.http === undefined ? undefined : opts["read-database-url"];
          const readPool = readUrl === undefined ? undefined : connectReadPool(readUrl, {
            applicationName: `shoal ${role}`,
            prepare: opts.prepare,
          });
          try {
            // Up before migrations, so /readyz says "starting" while they run.
            const http = await startHttp(sql, opts.http, roles, {
              exactCounts: opts["metrics-exact"],
              readOnly: opts["read-only"],
              readPool,
              dashboardPool: () =>
                connect(opts["database-url"], {
                  applicationName: `shoal ${role} dashboard`,
                  prepare: opts.prepare,
                  max: DASHBOARD_POOL_MAX,
                }),
            });
            try {
              await runRoles(sql, roles, {
                stop,
                http,
                prepare: async () => {
                  // Started before its database: wait for it (--startup-wait); a SIGTERM
                  // meanwhile exits 0.
                  const ready = await waitForDatabase(sql, {
                    url: opts["database-url"],
                    maxWaitMs: opts["startup-wait"],
                    stop: stop.signal,
                  });
                  if (!ready) return false;
                  const migrations = await loadMigrations();
                  if (opts.migrate) await migrate(sql, migrations);
                  await checkSchema(sql, migrations, { migrateFlag: true });
                  return true;
                },
              });
            } finally {
              await http?.close();
            }
          } finally {
            if (readPool) await closePool(readPool);
          }
        });
      } finally {
        await stopTracing();
      }
      return 0;
    });
  };
}

/** Tracing's settings from OTEL_*, a bad value a usage error (one line, exit 2). */
function otelSettings(): TracingConfig | null {
  try {
    return tracingFromEnv();
  } catch (error) {
    if (error instanceof TracingConfigError) throw new UsageError(error.message, { cause: error });
    throw error;
  }
}

/** A consumer's pool: its concurrency and two more (heartbeats, acks), at most 20. */
const consumerPool = (opts: Options<"concurrency">) => Math.min(20, opts.concurrency + 2);

/** What `--role` starts, and the flags each role takes. */
const ROLES: Record<Role, RoleCommand> = {
  consumer: roleCommand(
    "consumer",
    CONSUMER,
    (opts, tasks) => ({ consumer: consumerRole(opts, tasks) }),
    consumerPool,
  ),
  reaper: roleCommand(
    "reaper",
    ["lease", "interval", "dead-retention", "execution-key-retention"],
    (opts) => ({ reaper: reaperRole(opts, defaultWorkerId()) }),
  ),
  scheduler: roleCommand(
    "scheduler",
    ["lease", "interval", "schedules", "listen"],
    (opts) => ({ scheduler: schedulerRole(opts, defaultWorkerId()) }),
  ),
  all: roleCommand("all", [...CONSUMER, ...LEADER], (opts, tasks) => {
    const holder = defaultWorkerId();
    const reaper = reaperRole(opts, holder);
    const scheduler = schedulerRole(opts, holder);
    return { consumer: consumerRole(opts, tasks), reaper, scheduler };
  }, consumerPool),
};

async function scheduleCommand(parsed: ParsedArgs, rest: string[]): Promise<number> {
  const [sub, ...args] = rest;
  const oneName = (what: string) => {
    if (args.length !== 1) throw new UsageError(`shoal schedule ${what} takes one schedule name`);
    return args[0]!;
  };
  switch (sub) {
    case "add": {
      const name = oneName("add");
      let spec: ScheduleSpec | null = null;
      return await withDb(parsed, {
        name: "schedule add",
        flags: ["cron", "task", "queue", "payload", "tz", "priority", "backfill"],
        needs: "current schema",
        check: async (opts) => {
          const { cron, task } = opts;
          if (cron === undefined) throw new UsageError("shoal schedule add needs --cron");
          if (task === undefined) throw new UsageError("shoal schedule add needs --task");
          const payload = parsePayloadFlag(opts.payload);
          spec = {
            name,
            cron,
            task,
            queue: opts.queue,
            payload,
            tz: opts.tz,
            priority: opts.priority,
            backfill: opts.backfill,
          };
          try {
            await checkSchedule(spec);
          } catch (error) {
            throw new UsageError(messageOf(error));
          }
        },
      }, async (sql) => {
        const outcome = await upsertSchedule(sql, spec!);
        // Its fires take the task's catalog queue and attempts when they happen; say now
        // when there is none yet.
        if (!await isRegistered(sql, spec!.task)) {
          err(
            `Warning: no consumer has registered task "${spec!.task}": its jobs go to queue ${
              spec!.queue ?? DEFAULT_QUEUE
            } with ${DEFAULT_MAX_ATTEMPTS} attempts until one does\n`,
          );
        }
        out(`Schedule ${name} ${outcome}\n`);
        return 0;
      });
    }
    case "list":
      noExtra("schedule list", args);
      return await withDb(
        parsed,
        { name: "schedule list", flags: ["json"], needs: "current schema" },
        async (sql, opts) => {
          const rows = await listSchedules(sql);
          if (opts.json) out(JSON.stringify(rows, null, 2) + "\n");
          else out(formatSchedules(rows));
          return 0;
        },
      );
    case "pause":
    case "resume":
    case "rm": {
      const name = oneName(sub);
      return await withDb(
        parsed,
        { name: `schedule ${sub}`, flags: [], needs: "current schema" },
        async (sql) => {
          const found = sub === "rm"
            ? await removeSchedule(sql, name)
            : await setScheduleEnabled(sql, name, sub === "resume");
          if (!found) {
            err(`shoal: No schedule named ${name}\n`);
            return 1;
          }
          out(
            `Schedule ${name} ${
              sub === "rm" ? "removed" : sub === "pause" ? "paused" : "resumed"
            }\n`,
          );
          return 0;
        },
      );
    }
    default:
      throw new UsageError(
        "shoal schedule takes add NAME, list, pause NAME, resume NAME or rm NAME",
      );
  }
}

/** A queue named on the command line (`shoal queue pause QUEUE`), checked as `--queue` is. */
function queueArg(name: string): string {
  try {
    return checkName("queue", name);
  } catch (error) {
    throw new UsageError(messageOf(error));
  }
}

/** `shoal queue pause|resume QUEUE`, `shoal queue list`: paused queues (lib/flow.ts). */
async function queueCommand(parsed: ParsedArgs, rest: string[]): Promise<number> {
  const [sub, ...args] = rest;
  switch (sub) {
    case "pause":
    case "resume": {
      if (args.length !== 1) throw new UsageError(`shoal queue ${sub} takes one queue name`);
      const queue = queueArg(args[0]!);
      return await withDb(
        parsed,
        { name: `queue ${sub}`, flags: [], needs: "current schema" },
        async (sql) => {
          // False: nothing changed. Said on stderr with exit 1, as `schedule pause` says a
          // name it does not know, so a script sees it.
          if (sub === "pause" && !(await pauseQueue(sql, queue))) {
            err(`shoal: Queue ${queue} is already paused\n`);
            return 1;
          }
          if (sub === "resume" && !(await resumeQueue(sql, queue))) {
            err(`shoal: Queue ${queue} was not paused\n`);
            return 1;
          }
          out(`Queue ${queue} ${sub === "pause" ? "paused" : "resumed"}\n`);
          return 0;
        },
      );
    }
    case "list":
      noExtra("queue list", args);
      return await withDb(
        parsed,
        { name: "queue list", flags: ["json"], needs: "current schema" },
        async (sql, opts) => {
          const { paused } = await flowStatus(sql);
          out(opts.json ? JSON.stringify(paused, null, 2) + "\n" : formatPausedQueues(paused));
          return 0;
        },
      );
    default:
      throw new UsageError("shoal queue takes pause QUEUE, resume QUEUE or list");
  }
}

/**
 * `shoal event emit NAME [--key K] [--payload JSON]`: store the event and deliver it to every
 * job waiting on (NAME, K) (lib/events.ts); says how many waits received it.
 */
async function eventCommand(parsed: ParsedArgs, rest: string[]): Promise<number> {
  const [sub, ...args] = rest;
  if (sub !== "emit") throw new UsageError("shoal event takes emit NAME");
  if (args.length !== 1) throw new UsageError("shoal event emit takes one event name");
  const name = args[0]!;
  let key = "";
  let payload: Record<string, unknown> = {};
  return await withDb(parsed, {
    name: "event emit",
    flags: ["key", "payload", "max-payload"],
    needs: "current schema",
    check: (opts) => {
      payload = parsePayloadFlag(opts.payload);
      key = opts.key ?? "";
      try {
        checkEventName("shoal event emit", name);
        checkEventKey("shoal event emit", key);
        checkPayload(payload, opts["max-payload"], () => "--payload");
      } catch (error) {
        throw new UsageError(messageOf(error));
      }
    },
  }, async (sql, opts) => {
    const received = await emitEvent(sql, name, key, payload, {
      maxPayloadBytes: opts["max-payload"],
    });
    out(`Event ${name} emitted: ${received} waiting job${received === 1 ? "" : "s"} received it\n`);
    return 0;
  });
}

/** `--key` of `shoal limit`: a flow or fairness key, at most 256 characters. */
function checkLimitKey(key: string | undefined): void {
  if (key !== undefined && key.length > MAX_FAIRNESS_KEY_LENGTH) {
    throw new UsageError(
      refusal("--key", `a key of at most ${MAX_FAIRNESS_KEY_LENGTH} characters`, key).message,
    );
  }
}

/** `--key` of a `shoal limit` command that needs one (hold, weight, unweight). */
function requireLimitKey(sub: string, key: string | undefined): string {
  if (key === undefined) throw new UsageError(`shoal limit ${sub} needs --key`);
  checkLimitKey(key);
  return key;
}

/** A whole number on the command line (`shoal limit set q 5`), from `min` to `max`. */
function countArg(what: string, text: string, min: number, max: number): number {
  const n = /^\d{1,7}$/.test(text) ? Number(text) : NaN;
  if (!(n >= min && n <= max)) {
    throw new UsageError(refusal(what, `an integer from ${min} to ${max}`, text).message);
  }
  return n;
}

/**
 * How a `shoal limit` line names what it changed: `Queue q`, `Queue q, key "k"`, `Queue q,
 * task t` or `Queue q, task t, key "k"`.
 */
function limitSubject(queue: string, task: string | undefined, key?: string): string {
  return `Queue ${queue}` + (task === undefined ? "" : `, task ${task}`) +
    (key === undefined ? "" : `, key ${JSON.stringify(key)}`);
}

const LIMIT_USAGE = "shoal limit takes set QUEUE N, clear QUEUE, rate QUEUE N, unrate QUEUE, " +
  "hold QUEUE, weight QUEUE W, unweight QUEUE or list";

/**
 * `shoal limit ...`: flow control per (queue, key) (lib/flow.ts): concurrency limits (`set`,
 * `clear`), rate limits (`rate`, `unrate`), holds (`hold`), fairness weights (`weight`,
 * `unweight`), and `list` for all of them. `--task` names the task whose jobs a limit counts
 * apart, or a hold holds (a task name, checked with the other flags). A clear of nothing says
 * so on stderr with exit 1.
 */
async function limitCommand(parsed: ParsedArgs, rest: string[]): Promise<number> {
  const [sub, ...args] = rest;
  switch (sub) {
    case "set": {
      if (args.length !== 2) {
        throw new UsageError("shoal limit set takes a queue name and a number of running jobs");
      }
      const queue = queueArg(args[0]!);
      const maxRunning = countArg("number of running jobs", args[1]!, 0, MAX_RUNNING_LIMIT);
      return await withDb(parsed, {
        name: "limit set",
        flags: ["key", "task"],
        needs: "current schema",
        check: (opts) => checkLimitKey(opts.key),
      }, async (sql, opts) => {
        const { key, task } = opts;
        await setConcurrencyLimit(sql, { queue, maxRunning, key, task });
        const each = key === undefined ? " per key" : "";
        out(`${limitSubject(queue, task, key)}: at most ${maxRunning} running jobs${each}\n`);
        return 0;
      });
    }
    case "rate": {
      if (args.length !== 2) {
        throw new UsageError("shoal limit rate takes a queue name and a number of starts");
      }
      const queue = queueArg(args[0]!);
      const maxStarts = countArg("number of starts", args[1]!, 1, MAX_RATE_STARTS);
      return await withDb(parsed, {
        name: "limit rate",
        flags: ["per", "key", "task"],
        needs: "current schema",
        check: (opts) => {
          if (opts.per === undefined) throw new UsageError("shoal limit rate needs --per");
          checkLimitKey(opts.key);
        },
      }, async (sql, opts) => {
        const { key, task } = opts;
        await setRateLimit(sql, { queue, maxStarts, periodMs: opts.per!, key, task });
        const each = key === undefined ? " per key" : "";
        out(
          `${limitSubject(queue, task, key)}: at most ${maxStarts} starts per ${
            formatDuration(opts.per!)
          }${each}\n`,
        );
        return 0;
      });
    }
    case "clear":
    case "unrate": {
      if (args.length !== 1) throw new UsageError(`shoal limit ${sub} takes one queue name`);
      const queue = queueArg(args[0]!);
      const what = sub === "clear" ? "limit" : "rate limit";
      return await withDb(parsed, {
        name: `limit ${sub}`,
        flags: ["key", "task"],
        needs: "current schema",
        check: (opts) => checkLimitKey(opts.key),
      }, async (sql, opts) => {
        const { key, task } = opts;
        const cleared = sub === "clear"
          ? await clearConcurrencyLimit(sql, { queue, key, task })
          : await clearRateLimit(sql, { queue, key, task });
        if (!cleared) {
          err(
            key === undefined
              ? `shoal: ${limitSubject(queue, task)} has no default ${what}\n`
              : `shoal: ${limitSubject(queue, task)} has no ${what} for key ${
                JSON.stringify(key)
              }\n`,
          );
          return 1;
        }
        out(
          key === undefined
            ? `${limitSubject(queue, task)}: default ${what} cleared\n`
            : `${limitSubject(queue, task, key)}: ${what} cleared\n`,
        );
        return 0;
      });
    }
    case "hold": {
      if (args.length !== 1) throw new UsageError("shoal limit hold takes one queue name");
      const queue = queueArg(args[0]!);
      return await withDb(parsed, {
        name: "limit hold",
        flags: ["key", "for", "task"],
        needs: "current schema",
        check: (opts) => {
          requireLimitKey("hold", opts.key);
          if (opts.for === undefined) throw new UsageError("shoal limit hold needs --for");
        },
      }, async (sql, opts) => {
        const key = opts.key!;
        const until = await holdKey(sql, { queue, key, forMs: opts.for!, task: opts.task });
        // A task without limits of its own on the queue: the hold is the key's (THE TASK
        // RULE), and the line says so rather than name a task it does not single out.
        const own = opts.task !== undefined && await flowScope(sql, queue, opts.task) !== "";
        const task = own ? opts.task : undefined;
        const note = opts.task !== undefined && !own
          ? ` (task ${opts.task} has no limits of its own on ${queue}: its jobs count under the queue's)`
          : "";
        out(
          opts.for === 0
            ? `${limitSubject(queue, task, key)}: hold lifted${note}\n`
            : `${limitSubject(queue, task, key)}: held until ${until.toISOString()}${note}\n`,
        );
        return 0;
      });
    }
    case "weight": {
      if (args.length !== 2) {
        throw new UsageError("shoal limit weight takes a queue name and a weight");
      }
      const queue = queueArg(args[0]!);
      const weight = countArg("weight", args[1]!, 1, MAX_FAIRNESS_WEIGHT);
      return await withDb(parsed, {
        name: "limit weight",
        flags: ["key"],
        needs: "current schema",
        check: (opts) => {
          requireLimitKey("weight", opts.key);
        },
      }, async (sql, opts) => {
        await setFairnessWeight(sql, { queue, key: opts.key!, weight });
        const subject = limitSubject(queue, undefined, opts.key);
        out(`${subject}: weight ${weight} for jobs enqueued from now on\n`);
        return 0;
      });
    }
    case "unweight": {
      if (args.length !== 1) throw new UsageError("shoal limit unweight takes one queue name");
      const queue = queueArg(args[0]!);
      return await withDb(parsed, {
        name: "limit unweight",
        flags: ["key"],
        needs: "current schema",
        check: (opts) => {
          requireLimitKey("unweight", opts.key);
        },
      }, async (sql, opts) => {
        const key = opts.key!;
        if (!(await clearFairnessWeight(sql, { queue, key }))) {
          err(`shoal: Queue ${queue} has no weight for key ${JSON.stringify(key)}\n`);
          return 1;
        }
        out(`${limitSubject(queue, undefined, key)}: weight 1 for jobs enqueued from now on\n`);
        return 0;
      });
    }
    case "list":
      noExtra("limit list", args);
      return await withDb(
        parsed,
        { name: "limit list", flags: ["json"], needs: "current schema" },
        async (sql, opts) => {
          const { paused: _, ...limits } = await flowStatus(sql);
          out(opts.json ? JSON.stringify(limits, null, 2) + "\n" : formatFlowLimits(limits));
          return 0;
        },
      );
    default:
      throw new UsageError(LIMIT_USAGE);
  }
}

/** `shoal dev`: a local Postgres (unless one is given), every role and a demo, until a signal. */
async function devCommand(parsed: ParsedArgs, tasks: TaskRegistry): Promise<number> {
  const opts = await setup("dev", parsed, ["dir", ...CONSUMER, ...SERVE_FLAGS]);
  configureBuiltins(tasks, opts);
  // Traced as the roles are (OTEL_*): the demo's jobs show up in a local collector too.
  const tracing = otelSettings();
  if (tracing !== null) await startTracing(tracing);
  try {
    return await untilStopped(async (stop) => {
      await runDev({
        tasks,
        databaseUrl: opts["database-url"],
        dir: opts.dir,
        prepare: opts.prepare,
        consumer: consumerOptions(opts),
        http: opts.http,
        metricsExact: opts["metrics-exact"],
        readOnly: opts["read-only"],
        print: out,
      }, stop.signal);
      return 0;
    });
  } finally {
    await stopTracing();
  }
}

/**
 * `shoal dashboard`: the web dashboard alone against the database, on --http (127.0.0.1:9464
 * unless given), until a signal. Beyond loopback it needs credentials from the environment
 * (lib/dashboard/guard.ts), else it refuses to start (exit 2, one line).
 */
async function dashboardCommand(parsed: ParsedArgs): Promise<number> {
  let address: ListenAddress | null = null;
  return await withDb(
    parsed,
    {
      name: "dashboard",
      flags: ["http", "read-only", "read-database-url"],
      needs: "current schema",
      check: (opts) => {
        address = parseListenAddress(opts.http ?? DEFAULT_HTTP);
        // Refused before the database is touched: the credentials come from the environment.
        let refusal: string | null;
        try {
          refusal = bindRefusal(address.hostname, accessFromEnv());
        } catch (error) {
          throw new UsageError(messageOf(error));
        }
        if (refusal !== null) throw new UsageError(refusal);
      },
    },
    async (sql, opts) =>
      await withReadPool(
        opts,
        "shoal dashboard",
        async (readSql) =>
          await untilStopped(async (stop) => {
            // On demand, as in roles.ts startHttp: other commands never load Hono and the assets.
            const { DashboardServer } = await import(
              "./dashboard/server" + ".ts"
            ) as typeof import("./dashboard/server.ts");
            // Pages read `readSql` when given (a replica); the actions write through `sql`.
            const server = new DashboardServer(sql, address!, {
              readOnly: opts["read-only"],
              readDb: readSql,
            });
            try {
              await new Promise<void>((resolve) => {
                if (stop.signal.aborted) {
                  resolve();
                } else stop.signal.addEventListener("abort", () => resolve(), { once: true });
              });
            } finally {
              await server.close();
            }
            return 0;
          }),
      ),
  );
}
