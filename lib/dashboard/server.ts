/**
 * Where the dashboard is served: beside a role's probes ({@link dashboardFor}, used by
 * lib/roles.ts startHttp), or alone by `shoal dashboard` ({@link DashboardServer}).
 *
 * @module
 */
import type { Db } from "../db.ts";
import type { ListenAddress } from "../http_server.ts";
import { describeError, logger } from "../log.ts";
import { createDashboard, type Dashboard } from "./app.tsx";
import { accessFromEnv, bindRefusal } from "./guard.ts";

export interface DashboardServeOptions {
  /** Refuse every action (`--read-only`). */
  readOnly: boolean;
  /** Where credentials are read (Deno.env by default; tests pass their own). */
  env?: { get(name: string): string | undefined };
}

/**
 * The dashboard a role's `--http` server on `hostname` serves, or null when it must not: a
 * bind beyond loopback without credentials (then the probes and /metrics are served as
 * before, and one log line says why the dashboard is not). Bad credentials configuration
 * throws (one line): the process should not start half-protected.
 */
export function dashboardFor(
  db: Db,
  hostname: string,
  options: DashboardServeOptions,
): Dashboard | null {
  const access = accessFromEnv(options.env);
  const refusal = bindRefusal(hostname, access);
  if (refusal !== null) {
    logger("dashboard").info("Dashboard not served: {reason}", { reason: refusal });
    return null;
  }
  return createDashboard({ db, readOnly: options.readOnly, access });
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
    const dashboard = createDashboard({ db, readOnly: options.readOnly, access });
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
