/**
 * Starting, signalling and stopping shoal's long-running roles: one home for what
 * `shoal --role consumer|reaper|scheduler|all` (lib/cli.ts) and `shoal dev` (lib/dev.ts)
 * both do.
 *
 * - {@link untilStopped}: SIGTERM or SIGINT asks for a graceful stop, a second one exits
 *   at once (130 for SIGINT, 143 for SIGTERM); the process rides out postgres.js's
 *   write-after-close fault (lib/db.ts) meanwhile.
 * - {@link startHttp}: the `--http` server (/healthz, /readyz, /metrics, the dashboard) when
 *   asked for.
 * - {@link runRoles}: the roles on one pool until the stop is asked for; a role that fails
 *   stops the others gracefully (leases released, running jobs handed back) before the
 *   caller closes the pool. The caller's exit code is 0 after a graceful stop; a failure
 *   rejects (exit 1 through `main`).
 *
 * @module
 */
import { type ConsumerOptions, longestConsumerTurnMs, runConsumer } from "./consumer.ts";
import { type Sql, tolerateDriverWriteAfterClose } from "./db.ts";
import { HttpServer } from "./http_server.ts";
import { longestLeaderTurnMs } from "./leader.ts";
import type { LoopWatch } from "./liveness.ts";
import { logger } from "./log.ts";
import { enableMetrics, type MetricsOptions } from "./metrics.ts";
import { type OptionType, parseListenAddress } from "./config.ts";
import { type ReaperOptions, runReaper } from "./reaper.ts";
import { runScheduler, type SchedulerOptions } from "./scheduler.ts";
import type { TaskRegistry } from "./tasks.ts";

/** What `--role` names: one role, or `all` of them in one process. */
export type Role = NonNullable<OptionType<"role">>;

/** The roles one process runs, each with its options; absent roles do not run. */
export interface Roles {
  consumer?: { tasks: TaskRegistry; options: ConsumerOptions };
  reaper?: ReaperOptions;
  scheduler?: SchedulerOptions;
}

/** What the roles need of the `--http` server (lib/http_server.ts HttpServer). */
export interface RoleHttp {
  /** The roles started: /healthz judges their loops, /readyz the database. */
  ready(): void;
  /** Shutting down: /readyz answers 503. */
  stopping(): void;
  close(): Promise<void>;
  /** Each role's loop reports its turns here (/healthz). */
  readonly loops: LoopWatch;
}

/**
 * A repeat this soon after the first signal is one keypress delivered twice, not a second
 * request: `deno task` forwards the terminal's SIGINT to its child, which also gets it
 * from the terminal directly.
 */
const SIGNAL_ECHO_MS = 1000;

/** Install SIGTERM/SIGINT handlers: the first aborts `stop`, the second exits at once. */
export function trapSignals(stop: AbortController): () => void {
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
 * Run `body` as a long-running process: the first SIGTERM/SIGINT aborts the controller it
 * gets, a second exits at once, and postgres.js's write-after-close fault is ridden out
 * (see lib/db.ts). The handlers are removed when `body` settles.
 */
export async function untilStopped<T>(body: (stop: AbortController) => Promise<T>): Promise<T> {
  tolerateDriverWriteAfterClose();
  const stop = new AbortController();
  const untrap = trapSignals(stop);
  try {
    return await body(stop);
  } finally {
    untrap();
  }
}

/**
 * /readyz turns 503 once the database has not answered for three of the roles' longest
 * wait (the consumer's poll interval, the leaders' tick), and never sooner than a second.
 */
export function dbWindowMs(roles: Roles): number {
  const waits = [
    roles.consumer?.options.pollIntervalMs,
    roles.reaper?.intervalMs,
    roles.scheduler?.intervalMs,
  ].filter((ms): ms is number => ms !== undefined);
  return Math.max(1000, 3 * Math.max(...waits));
}

/** Most connections a role's dashboard opens: its own pool, beside the role's. */
export const DASHBOARD_POOL_MAX = 2;

/** How the `--http` server counts for /metrics and serves the dashboard. */
export interface HttpOptions extends MetricsOptions {
  /** The dashboard refuses every action (`--read-only`). */
  readOnly?: boolean;
  /**
   * Makes the dashboard's own small pool, on its first request (lib/dashboard/server.ts
   * dashboardFor); without it the dashboard shares `sql`.
   */
  dashboardPool?: () => Sql;
  /**
   * The read pool of `--read-database-url` (lib/db.ts connectReadPool): /metrics' gauges and
   * the dashboard's pages read from it; the dashboard's actions still use its own pool (or
   * `sql`). Its owner closes it after the server.
   */
  readPool?: Sql;
}

/**
 * Start the `--http` server on `address` (and metrics with it, counting as `options` say),
 * its database window following `roles`, with the dashboard unless the address is beyond
 * loopback and no dashboard credentials are set (lib/dashboard/guard.ts); null when no
 * address was asked for.
 */
export async function startHttp(
  sql: Sql,
  address: string | undefined,
  roles: Roles,
  options: HttpOptions = {},
): Promise<HttpServer | null> {
  if (address === undefined) return null;
  const listen = parseListenAddress(address);
  // Loaded on demand, as prom-client is: a process without --http never loads Hono and the
  // browser assets (idle memory). A specifier of two literals, as in tracing.ts tracer():
  // `deno run` would otherwise read and parse Hono and the assets into its module graph at
  // start (about 1 MB of an idle consumer's RSS, W6), while `deno bundle` still inlines it.
  const { dashboardFor } = await import(
    "./dashboard/server" + ".ts"
  ) as typeof import("./dashboard/server.ts");
  const dashboard = dashboardFor(options.dashboardPool ?? sql, listen.hostname, {
    readOnly: options.readOnly ?? false,
    readDb: options.readPool,
  });
  return new HttpServer(listen, {
    sql,
    readSql: options.readPool,
    metrics: await enableMetrics({
      exactCounts: options.exactCounts,
      readReplica: options.readPool !== undefined,
    }),
    dbWindowMs: dbWindowMs(roles),
    dashboard,
  });
}

export interface RunRolesOptions {
  /**
   * Aborted to stop the roles (by a signal); a role that fails aborts it too, so the
   * others stop gracefully instead of the pool closing under them.
   */
  stop: AbortController;
  /** /readyz: "starting" until the roles run, "shutting down" once `stop` aborts. */
  http?: RoleHttp | null;
  /**
   * Before the roles start, once `stop` is watched (wait for the database, migrate):
   * resolves false when the stop came first, and nothing starts.
   */
  prepare?: () => Promise<boolean>;
  /**
   * Runs beside the roles once they started (`shoal dev`'s demo). When it settles,
   * `stop` is aborted and the roles stop; an error it throws wins over a role's.
   */
  beside?: (stopping: AbortSignal) => Promise<void>;
}

/**
 * Run `roles` on `sql` (in the order consumer, reaper, scheduler) until `options.stop`
 * aborts. Resolves once every role has stopped (each releases what it holds: running jobs,
 * its lease); rejects with the failure of the first role (in that order) that failed.
 * The pool and the http server stay open: their owner closes them after.
 */
export async function runRoles(sql: Sql, roles: Roles, options: RunRolesOptions): Promise<void> {
  const { stop, http } = options;
  if (stop.signal.aborted) http?.stopping();
  else stop.signal.addEventListener("abort", () => http?.stopping(), { once: true });
  if (options.prepare && !await options.prepare()) return;
  const started: Promise<void>[] = [];
  const start = (run: () => Promise<void>) => {
    started.push(
      run().catch((error) => {
        stop.abort();
        throw error;
      }),
    );
  };
  const { consumer, reaper, scheduler } = roles;
  /** What a role's loop calls on each turn, when a server watches the loops. */
  const watch = (name: string, longestTurnMs: number) => http?.loops.watch(name, longestTurnMs);
  if (consumer) {
    const options = {
      ...consumer.options,
      onTurn: watch("consumer", longestConsumerTurnMs(consumer.options)),
    };
    start(() => runConsumer({ sql, tasks: consumer.tasks }, options, stop.signal));
  }
  if (reaper) {
    const options = { ...reaper, onTurn: watch("reaper", longestLeaderTurnMs(reaper)) };
    start(() => runReaper(sql, options, stop.signal));
  }
  if (scheduler) {
    const options = { ...scheduler, onTurn: watch("scheduler", longestLeaderTurnMs(scheduler)) };
    start(() => runScheduler(sql, options, stop.signal));
  }
  // Watched from now on: a role failing while `beside` runs is never an unhandled rejection.
  const settled = Promise.allSettled(started);
  http?.ready();
  try {
    await options.beside?.(stop.signal);
  } finally {
    if (options.beside) stop.abort();
    await settled;
  }
  const failed = (await settled).find((r): r is PromiseRejectedResult => r.status === "rejected");
  if (failed) throw failed.reason;
}
