/**
 * The one place a process opens Postgres: a postgres.js pool per process, named by role
 * in `application_name`, plus the connection-error test and the retry-once rule for
 * idempotent statements.
 *
 * @module
 */
import postgres from "postgres";
import { describeError, logger } from "./log.ts";

/** A pool. */
export type Sql = postgres.Sql<Record<string, never>>;
/** A pool or an open transaction: query functions take either, the caller owns the transaction. */
export type Db =
  | postgres.Sql<Record<string, never>>
  | postgres.TransactionSql<Record<string, never>>;

export interface ConnectOptions {
  /** Shows in pg_stat_activity, e.g. `shoal consumer`. */
  applicationName: string;
  /** Pool size. */
  max?: number;
  /** Named prepared statements; switch off behind PgBouncer in transaction mode. */
  prepare?: boolean;
  /** Seconds to wait for a connection before failing. */
  connectTimeout?: number;
}

/** Open a pool. Nothing connects until the first query. */
export function connect(url: string, options: ConnectOptions): Sql {
  return postgres(url, {
    max: options.max ?? 10,
    prepare: options.prepare ?? true,
    connect_timeout: options.connectTimeout ?? 10,
    idle_timeout: 0,
    max_lifetime: null,
    connection: { application_name: options.applicationName },
    onnotice: (notice) => {
      logger("db").debug("Postgres notice: {message}", { message: notice.message });
    },
    // Bigints (job ids, tokens) stay strings; JSON columns arrive parsed.
    types: {},
  }) as unknown as Sql;
}

/** Validate a database URL at the boundary, without echoing its password. */
export function checkDatabaseUrl(url: string): void {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new Error(
      "Cannot parse the database URL: expected postgres://user:password@host:port/db",
    );
  }
  if (parsed.protocol !== "postgres:" && parsed.protocol !== "postgresql:") {
    throw new Error(
      `Cannot use the database URL: scheme "${
        parsed.protocol.slice(0, -1)
      }" is not postgres or postgresql`,
    );
  }
}

/** The URL with its password replaced, for messages. */
export function redactUrl(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = "***";
    // libpq-style URLs may carry the password as a query parameter too.
    for (const key of [...parsed.searchParams.keys()]) {
      if (/pass/i.test(key)) parsed.searchParams.set(key, "***");
    }
    return parsed.toString();
  } catch {
    return "(unparseable URL)";
  }
}

const CONNECTION_ERROR_CODES = new Set([
  "CONNECTION_CLOSED",
  "CONNECTION_ENDED",
  "CONNECTION_DESTROYED",
  "CONNECT_TIMEOUT",
  "ECONNRESET",
  "ECONNREFUSED",
  "EPIPE",
  "ETIMEDOUT",
  // The host cannot be resolved or reached: still "cannot reach the database", not a bug.
  "ENOTFOUND",
  "EAI_AGAIN",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "57P01", // admin_shutdown (pg_terminate_backend, fast shutdown)
  "57P02", // crash_shutdown
  "57P03", // cannot_connect_now (starting up, shutting down)
  "STATEMENT_STALLED", // see settleWithin
]);

/** True when the error means the connection went away, not that the statement was wrong. */
export function isConnectionError(error: unknown): boolean {
  if (!(error instanceof Error)) return false;
  const code = (error as { code?: unknown }).code;
  if (typeof code !== "string") return false;
  return CONNECTION_ERROR_CODES.has(code) || code.startsWith("08");
}

/** Postgres gave up on the transaction to break a deadlock or a serialization conflict. */
export function isTransientConflict(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  return code === "40P01" || code === "40001";
}

/**
 * Refused for what it says (SQLSTATE class 22 data exception, 23 constraint violation,
 * 54 program limit), not for a transient reason: sending it again is refused again.
 */
export function isDataError(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === "string" && /^(22|23|54)/.test(code);
}

/** How long shoal's own statements may take before their connection is presumed dead. */
export const STATEMENT_DEADLINE_MS = 10_000;

/**
 * Settle with `work`, or reject with a connection error (code STATEMENT_STALLED) once
 * `ms` pass. postgres.js can leave a statement sent on a connection Postgres just killed
 * (a restart, an outage, pg_terminate_backend) unsettled for good: without a deadline the
 * caller, and a shutdown waiting on it, waits forever. The statement itself is abandoned;
 * closing the pool ends its connection.
 */
export function settleWithin<T>(what: string, work: Promise<T>, ms: number): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const stalled = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      const error = new Error(`The ${what} statement did not settle within ${ms} ms`);
      reject(Object.assign(error, { code: "STATEMENT_STALLED" }));
    }, ms);
  });
  // A rejection after the deadline won the race has been accounted for.
  work.catch(() => {});
  return Promise.race([work, stalled]).finally(() => clearTimeout(timer));
}

/**
 * Run an idempotent (token-fenced) statement, and once more if the first try lost its
 * connection (PgBouncer or a firewall reaped an idle one, or it stalled past the deadline)
 * or was chosen as a deadlock victim. Any other error is not retried.
 */
export async function retryOnce<T>(
  what: string,
  run: () => Promise<T>,
  deadlineMs: number = STATEMENT_DEADLINE_MS,
): Promise<T> {
  try {
    return await settleWithin(what, run(), deadlineMs);
  } catch (error) {
    if (!isConnectionError(error) && !isTransientConflict(error)) throw error;
    logger("db").warn("Connection lost during {what}, retrying once: {error}", {
      what,
      error: describeError(error),
    });
    return await settleWithin(what, run(), deadlineMs);
  }
}
