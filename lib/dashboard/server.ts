/**
 * Where the dashboard is served: beside a role's probes ({@link dashboardFor}, used by
 * lib/roles.ts startHttp), or alone by `shoal dashboard` ({@link DashboardServer}).
 *
 * @module
 */
import { closePool, type Db, type Sql } from "../db.ts";
import type { ListenAddress } from "../http_server.ts";
import { describeError, logger } from "../log.ts";
import { createDashboard, type Dashboard } from "./app.tsx";
import { accessFromEnv, bindRefusal } from "./guard.ts";

export interface DashboardServeOptions {
  /** Refuse every action (`--read-only`). */
  readOnly: boolean;
  /**
   * Where the pages read (`--read-database-url`: a replica); the actions still write through
   * the dashboard's own pool. Its owner closes it.
   */
  readDb?: Db;
  /** Where credentials are read (Deno.env by default; tests pass their own). */
  env?: { get(name: string): string | undefined };
}

/** A dashboard a server can close: it may own a pool. */
export interface ClosableDashboard extends Dashboard {
  /** Close what the dashboard opened (its pool, when it made one). */
  close(): Promise<void>;
}

/**
 * The dashboard a role's `--http` server on `hostname` serves, or null when it must not: a
 * bind beyond loopback without credentials (then the probes and /metrics are served as
 * before, and one log line says why the dashboard is not). Bad credentials configuration
 * throws (one line): the process should not start half-protected.
 *
 * `pool` makes the dashboard's own pool (lib/roles.ts: at most DASHBOARD_POOL_MAX
 * connections), called on the first dashboard request, so a page never takes a connection
 * the role needs and a process nobody browses opens none; closed by {@link
 * ClosableDashboard.close}. A `Db` instead is used as is (its owner closes it).
 */
export function dashboardFor(
  pool: Db | (() => Sql),
  hostname: string,
  options: DashboardServeOptions,
): ClosableDashboard | null {
  const access = accessFromEnv(options.env);
  const refusal = bindRefusal(hostname, access);
  if (refusal !== null) {
    logger("dashboard").info("Dashboard not served: {reason}", { reason: refusal });
    return null;
  }
  if (!isPoolFactory(pool)) {
    const dashboard = createDashboard({
      db: pool,
      readDb: options.readDb,
      readOnly: options.readOnly,
      access,
    });
    return { fetch: (request) => dashboard.fetch(request), close: async () => {} };
  }
  let opened: { sql: Sql; dashboard: Dashboard } | null = null;
  let closed = false;
  return {
    fetch: async (request) => {
      if (closed) return new Response("shutting down\n", { status: 503 });
      if (opened === null) {
        const sql = pool();
        opened = {
          sql,
          dashboard: createDashboard({
            db: sql,
            readDb: options.readDb,
            readOnly: options.readOnly,
            access,
          }),
        };
      }
      return await opened.dashboard.fetch(request);
    },
    close: async () => {
      closed = true;
      if (opened !== null) await closePool(opened.sql);
    },
  };
}

/** A pool factory takes no argument; a postgres.js pool is a function too (a tagged template). */
function isPoolFactory(pool: Db | (() => Sql)): pool is () => Sql {
  return !("unsafe" in pool);
}

/** `shoal dashboard`: the dashboard alone on one address. */
export class DashboardServer {
  readonly #server: Deno.HttpServer<Deno.NetAddr>;
  readonly port: number;
  readonly hostname: string;

  /**
   * Throws a one-line Error when the bind is refused (beyond loopback without credentials)
   * or the port cannot be bound.
   */
  constructor(db: Db, address: ListenAddress, options: DashboardServeOptions) {
    const access = accessFromEnv(options.env);
    const refusal = bindRefusal(address.hostname, access);
    if (refusal !== null) throw new Error(refusal);
    const dashboard = createDashboard({
      db,
      readDb: options.readDb,
      readOnly: options.readOnly,
      access,
    });
    try {
      this.#server = Deno.serve({
        hostname: address.hostname,
        port: address.port,
        onListen: () => {}, // logged below, as JSON like every other line
        onError: (error) => {
          logger("dashboard").error("Dashboard request failed: {error}", {
            error: describeError(error),
          });
          return new Response("internal error\n", { status: 500 });
        },
      }, (request) => dashboard.fetch(request));
    } catch (cause) {
      throw new Error(
        `Cannot serve HTTP on ${address.hostname}:${address.port}: ${(cause as Error).message}`,
        { cause },
      );
    }
    this.port = this.#server.addr.port;
    this.hostname = this.#server.addr.hostname;
    logger("dashboard").info("Serving the dashboard on {address}", {
      address: `${this.hostname}:${this.port}`,
      read_only: options.readOnly,
    });
  }

  /** Stop listening; in-flight requests finish. */
  async close(): Promise<void> {
    await this.#server.shutdown();
  }
}
