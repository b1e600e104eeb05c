/**
 * The `--http` server every role can run beside its work, for orchestrators and Prometheus:
 *
 * - `GET /healthz` (liveness): 200 while every role's loop turns (lib/liveness.ts), and
 *   while shutting down; 503 with a one-line reason when a loop is stuck, and before the
 *   roles start (waiting for the database, migrating: a startup probe covers that). The
 *   database plays no part: an outage must not get the process restarted. Answering at
 *   all shows the event loop is alive.
 * - `GET /readyz` (readiness): 200 once the schema was checked and the roles started, while
 *   the database answered a `select 1` within the database window (a background probe runs
 *   every third of it); 503 with a one-line reason before that, while the database is
 *   silent, and while shutting down.
 * - `GET /metrics`: Prometheus text (lib/metrics.ts); its gauges are read from the read
 *   pool when one is given (`--read-database-url`), else from the role's pool.
 * - Every other path, when a dashboard is given: the web dashboard (lib/dashboard/app.tsx),
 *   with its own credentials, read-only mode and cross-site checks. The three paths above
 *   stay as they are, without credentials: orchestrators and Prometheus use them.
 *
 * Responses never carry configuration: no URL, no secret.
 *
 * @module
 */
import type { Sql } from "./db.ts";
import { formatDuration } from "./duration.ts";
import { LoopWatch } from "./liveness.ts";
import { describeError, logger } from "./log.ts";
import { CONTENT_TYPE, type Metrics } from "./metrics.ts";
import type { Dashboard } from "./dashboard/app.tsx";
import { Sleeper } from "./sleep.ts";

/** Where the server listens (see parseListenAddress in config.ts). */
export interface ListenAddress {
  hostname: string;
  /** 0 picks a free port (tests); the bound one is in {@link HttpServer.port}. */
  port: number;
}

/** The liveness probe's path: the roles' loops turn (no database involved). */
export const LIVENESS_PATH = "/healthz";
/** The readiness probe's path: the roles run and the database answers. */
export const READINESS_PATH = "/readyz";

export interface HttpServerOptions {
  sql: Sql;
  /** Where /metrics reads its gauges (`--read-database-url`); `sql` when none. */
  readSql?: Sql;
  metrics: Metrics;
  /** 503 from /readyz once the database has not answered for this long. */
  dbWindowMs: number;
  /**
   * Serve this dashboard on every other path (503 "starting" until {@link HttpServer.ready}:
   * the schema has not been checked yet); none: those are 404. Closed with the server when
   * it can be.
   */
  dashboard?: (Dashboard & { close?(): Promise<void> }) | null;
}

type Phase = "starting" | "ready" | "stopping";

/** Milliseconds a database probe may take before it counts as no answer. */
const PROBE_TIMEOUT_FLOOR_MS = 1000;

/** Keeps asking the database `select 1` and remembers when it last answered. */
class DbProbe {
  #lastOkAt: number | null = null;
  #lastError = "not asked yet";
  readonly #stop = new AbortController();
  readonly #running: Promise<void>;

  constructor(private readonly sql: Sql, private readonly windowMs: number) {
    this.#running = this.#loop();
  }

  async #loop(): Promise<void> {
    const every = Math.max(50, Math.floor(this.windowMs / 3));
    const sleeper = new Sleeper();
    while (!this.#stop.signal.aborted) {
      await this.#probe(Math.max(PROBE_TIMEOUT_FLOOR_MS, this.windowMs));
      await sleeper.sleep(every, this.#stop.signal);
    }
  }

  async #probe(timeoutMs: number): Promise<void> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timedOut = new Promise<"timeout">((resolve) => {
      timer = setTimeout(() => resolve("timeout"), timeoutMs);
    });
    const query = this.sql`select 1`.then(() => "ok" as const);
    try {
      const result = await Promise.race([query, timedOut]);
      if (result === "ok") this.#lastOkAt = performance.now();
      else this.#lastError = `no answer within ${formatDuration(timeoutMs)}`;
    } catch (error) {
      this.#lastError = describeError(error);
    } finally {
      clearTimeout(timer);
    }
    // A probe that timed out still settles later; wait for it so no query outlives close().
    await query.catch(() => undefined); // its error was recorded above, or came after the timeout
  }

  /** Null when healthy, else why not (one line). */
  problem(): string | null {
    if (this.#lastOkAt === null) return `database not reached yet: ${this.#lastError}`;
    const silentMs = performance.now() - this.#lastOkAt;
    if (silentMs <= this.windowMs) return null;
    return `database silent for ${formatDuration(Math.round(silentMs))}: ${this.#lastError}`;
  }

  async close(): Promise<void> {
    this.#stop.abort();
    await this.#running;
  }
}

/** A running `--http` server; tell it when the roles are ready and when they stop. */
export class HttpServer {
  #phase: Phase = "starting";
  readonly #server: Deno.HttpServer<Deno.NetAddr>;
  readonly #probe: DbProbe;
  /** The roles' loops, judged by /healthz once they started. */
  readonly loops: LoopWatch = new LoopWatch();
  /** The bound port (the one asked for, or the one picked for 0). */
  readonly port: number;
  readonly hostname: string;

  constructor(address: ListenAddress, private readonly options: HttpServerOptions) {
    try {
      this.#server = Deno.serve({
        hostname: address.hostname,
        port: address.port,
        onListen: () => {}, // logged below, as JSON like every other line
        onError: (error) => {
          logger("http").error("HTTP handler failed: {error}", { error: describeError(error) });
          return text(500, "internal error");
        },
      }, (request) => this.#handle(request));
    } catch (cause) {
      throw new Error(
        `Cannot serve HTTP on ${address.hostname}:${address.port}: ${(cause as Error).message}`,
        { cause },
      );
    }
    // Started once listening: no request can arrive before this constructor returns.
    this.#probe = new DbProbe(options.sql, options.dbWindowMs);
    this.port = this.#server.addr.port;
    this.hostname = this.#server.addr.hostname;
    const also = options.dashboard ? ", and the dashboard at /," : "";
    logger("http").info(`Serving /healthz, /readyz and /metrics${also} on {address}`, {
      address: `${this.hostname}:${this.port}`,
    });
  }

  /** The roles started: /healthz judges their loops, /readyz the database. */
  ready(): void {
    if (this.#phase === "starting") this.#phase = "ready";
  }

  /** Shutting down: /readyz answers 503 from now on, /healthz 200 (the stop is on purpose). */
  stopping(): void {
    this.#phase = "stopping";
  }

  async #handle(request: Request): Promise<Response> {
    const path = new URL(request.url).pathname;
    const probe = path === LIVENESS_PATH || path === READINESS_PATH || path === "/metrics";
    if (!probe && this.options.dashboard) {
      // Before the schema check passed, a page could fail on a missing table or column.
      if (this.#phase === "starting") {
        return text(503, "starting: the dashboard opens once the schema is checked", {
          "retry-after": "1",
        });
      }
      return await this.options.dashboard.fetch(request);
    }
    if (request.method !== "GET" && request.method !== "HEAD") {
      return text(405, "only GET", { allow: "GET, HEAD" });
    }
    switch (path) {
      case LIVENESS_PATH:
        return this.#liveness();
      case READINESS_PATH:
        return this.#readiness();
      case "/metrics":
        return new Response(
          await this.options.metrics.render(this.options.readSql ?? this.options.sql),
          {
            headers: { "content-type": CONTENT_TYPE },
          },
        );
      default:
        return text(404, "not found: try /healthz, /readyz or /metrics");
    }
  }

  #liveness(): Response {
    switch (this.#phase) {
      case "starting":
        return text(503, "starting");
      case "stopping":
        return text(200, "shutting down");
      case "ready": {
        const loops = this.loops.check();
        return text(loops.stuck ? 503 : 200, loops.line);
      }
    }
  }

  #readiness(): Response {
    if (this.#phase !== "ready") {
      return text(503, this.#phase === "starting" ? "starting" : "shutting down");
    }
    const problem = this.#probe.problem();
    return problem === null ? text(200, "ready") : text(503, problem);
  }

  /** Stop listening (in-flight requests finish) and stop the database probe. */
  async close(): Promise<void> {
    this.#phase = "stopping";
    await this.#server.shutdown();
    await this.#probe.close();
    await this.options.dashboard?.close?.();
  }
}

function text(status: number, body: string, headers: Record<string, string> = {}): Response {
  return new Response(body + "\n", {
    status,
    headers: { "content-type": "text/plain; charset=utf-8", ...headers },
  });
}
