/**
 * The one place a process opens Postgres: a postgres.js pool per process, named by role
 * in `application_name`, plus the connection-error test and the retry-once rule for
 * idempotent statements.
 *
 * @module
 */
import postgres from "postgres";
import {
  checkBoolean,
  checkInteger,
  checkNumber,
  checkOptions,
  checkString,
  MAX_TIMER_MS,
} from "./args.ts";
import { formatDuration } from "./duration.ts";
import { describeError, logger } from "./log.ts";
import { delay } from "./sleep.ts";

/** A pool. */
export type Sql = postgres.Sql<Record<string, never>>;
/** A pool or an open transaction: query functions take either, the caller owns the transaction. */
export type Db =
  | postgres.Sql<Record<string, never>>
  | postgres.TransactionSql<Record<string, never>>;

/** A piece of a statement (postgres.js `db\`...\``), composed into another. */
export type Fragment = postgres.Fragment;

/**
 * `conditions` (each `and ...`) as one fragment, nothing when none: an empty array would be
 * sent as a parameter. Lets a statement name only the filters given, so each combination is
 * its own statement text, planned with its own index.
 */
export function conditions(db: Db, conditions: Fragment[]): Fragment | Fragment[] {
  return conditions.length === 0 ? db`` : conditions;
}

/**
 * The page of a windowed keyset listing (lib/queue.ts listJobsStatement() is the model: a
 * `window_` of at most `scan` rows read newest first along an index, the page filtered from
 * it, each row carrying the window's `scanned_to` and `scanned`). Where the next page starts:
 * below the page's last row when the page is full; below the window when the window was full
 * but the page was not (a rare filter searches on); nowhere when both fell short.
 */
export function keysetPage<T extends { id: string }>(
  rows: readonly (T & { scanned_to: string | null; scanned: number })[],
  limit: number,
  scan: number,
): { rows: T[]; next: string | null } {
  const first = rows[0];
  const found = rows.filter((r) => r.id !== null)
    .map(({ scanned_to: _, scanned: __, ...r }) => r as unknown as T);
  let next: string | null = null;
  if (found.length === limit) next = found[found.length - 1]!.id;
  else if (first && first.scanned === scan) next = first.scanned_to;
  return { rows: found, next };
}

export interface ConnectOptions {
  /** Shows in pg_stat_activity, e.g. `shoal consumer` (default `shoal`). */
  applicationName?: string;
  /** Pool size. */
  max?: number;
  /** Named prepared statements; switch off behind PgBouncer in transaction mode. */
  prepare?: boolean;
  /** Seconds to wait for a connection before failing. */
  connectTimeout?: number;
}

/** Open a pool (`connect(url)` for the defaults). Nothing connects until the first query. */
export function connect(url: string, options: ConnectOptions = {}): Sql {
  // `deno run` does not type-check a user's entry file: say what is wrong here, not deep in
  // the driver at the first query.
  if (typeof url !== "string" || url === "") {
    throw new TypeError("Cannot connect: the database URL must be a non-empty string");
  }
  checkOptions("connect", options);
  checkString("connect", "options.applicationName", options.applicationName, { optional: true });
  checkInteger("connect", "options.max", options.max, { min: 1, max: 10_000, optional: true });
  checkBoolean("connect", "options.prepare", options.prepare, { optional: true });
  checkNumber("connect", "options.connectTimeout", options.connectTimeout, {
    min: 0,
    max: MAX_TIMER_MS / 1000,
    optional: true,
  });
  return postgres(url, {
    ...sessionAttrs(url),
    max: options.max ?? 10,
    prepare: options.prepare ?? true,
    connect_timeout: options.connectTimeout ?? 10,
    idle_timeout: 0,
    max_lifetime: null,
    connection: { application_name: options.applicationName ?? "shoal" },
    onnotice: (notice) => {
      logger("db").debug("Postgres notice: {message}", { message: notice.message });
    },
    // Bigints (job ids, tokens) stay strings; JSON columns arrive parsed.
    types: {},
  }) as unknown as Sql;
}

/**
 * A database URL taken apart: `hosts` is its comma-separated host list (`h1:5432,h2:5433`,
 * each `host[:port]`, as libpq and postgres.js take it), `url` the same URL with the first
 * host alone, which `URL` can parse (it refuses a host list).
 */
export interface DatabaseUrl {
  hosts: string[];
  url: URL;
}

/** The `target_session_attrs` values postgres.js knows (it throws on any other). */
const TARGET_SESSION_ATTRS = ["read-write", "read-only", "primary", "standby", "prefer-standby"];

/**
 * Take a database URL apart (see {@link DatabaseUrl}); throws one line, without echoing the
 * password, when it is not a postgres URL or a host of its list is empty or malformed.
 */
export function parseDatabaseUrl(url: string): DatabaseUrl {
  const scheme = /^([a-z][a-z0-9+.-]*):\/\//i.exec(url);
  if (!scheme) {
    throw new Error(
      "Cannot parse the database URL: expected postgres://user:password@host:port/db",
    );
  }
  const rest = url.slice(scheme[0].length);
  const authorityEnd = rest.search(/[/?#]/);
  const authority = authorityEnd === -1 ? rest : rest.slice(0, authorityEnd);
  const at = authority.lastIndexOf("@");
  const hostList = authority.slice(at + 1);
  const hosts = hostList.split(",");
  let parsed: URL;
  try {
    parsed = new URL(
      scheme[0] + authority.slice(0, at + 1) + hosts[0] +
        (authorityEnd === -1 ? "" : rest.slice(authorityEnd)),
    );
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
  if (hosts.length > 1) {
    for (const host of hosts) {
      // Each host alone must be what a one-host URL may hold: a name or address, a port.
      let one: URL | null = null;
      try {
        one = new URL(`postgres://${host}`);
      } catch { /* reported below */ }
      if (
        host === "" || one === null || one.hostname === "" ||
        (one.host !== host && one.host !== host.toLowerCase())
      ) {
        throw new Error(
          `Cannot use the database URL: host "${host}" of its host list is not host or host:port`,
        );
      }
    }
  }
  return { hosts, url: parsed };
}

/** Put a {@link DatabaseUrl} back together, its host list in place of the first host. */
export function formatDatabaseUrl(parts: DatabaseUrl): string {
  const text = parts.url.toString();
  if (parts.hosts.length < 2) return text;
  const { protocol, username, password, host } = parts.url;
  const userinfo = `${username}${password ? `:${password}` : ""}`;
  const prefix = `${protocol}//${userinfo}${userinfo ? "@" : ""}`;
  // `URL` may normalise the first host (case): find it where it printed it.
  return prefix + parts.hosts.join(",") + text.slice(prefix.length + host.length);
}

/**
 * The driver's `target_session_attrs` for `url`. postgres.js 3.4.9 judges `read-write` by
 * the `default_transaction_read_only` the server reports at login, which a hot standby of
 * Postgres 14 or later reports as `off` (its sessions are read-only by recovery, not by
 * that setting): it keeps a standby as if it were the primary (pg_auto_failover#970,
 * tested in tests/standby_test.ts). `primary` is judged by `in_hot_standby`, so shoal
 * asks for it instead: a session that must write wants the server out of recovery.
 */
function sessionAttrs(url: string): { target_session_attrs?: "primary" } {
  try {
    const attrs = parseDatabaseUrl(url).url.searchParams.get("target_session_attrs");
    return attrs === "read-write" ? { target_session_attrs: "primary" } : {};
  } catch {
    return {}; // not checked by the caller: the driver reports it as it would
  }
}

/**
 * Validate a database URL at the boundary, without echoing its password. A list of hosts
 * (`postgres://u@h1:5432,h2:5432/db?target_session_attrs=read-write`) is accepted: the
 * driver tries them in turn, and with `target_session_attrs=read-write` keeps the primary.
 */
export function checkDatabaseUrl(url: string): void {
  const { url: parsed } = parseDatabaseUrl(url);
  const attrs = parsed.searchParams.get("target_session_attrs");
  if (attrs !== null && !TARGET_SESSION_ATTRS.includes(attrs)) {
    throw new Error(
      `Cannot use the database URL: target_session_attrs "${attrs}" is not one of ${
        TARGET_SESSION_ATTRS.join(", ")
      }`,
    );
  }
}

/** The URL with its password replaced, for messages; a host list is kept whole. */
export function redactUrl(url: string): string {
  try {
    const parts = parseDatabaseUrl(url);
    const parsed = parts.url;
    if (parsed.password) parsed.password = "***";
    // libpq-style URLs may carry the password as a query parameter too.
    for (const key of [...parsed.searchParams.keys()]) {
      if (/pass/i.test(key)) parsed.searchParams.set(key, "***");
    }
    return formatDatabaseUrl(parts);
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

/**
 * The server answered but would not open a session with the URL's user, password or
 * database: SQLSTATE class 28 (authentication), 3D000 (no such database), 53300 (too many
 * connections), or the driver's SCRAM checks.
 */
function isLoginRefused(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === "string" &&
    (code.startsWith("28") || code === "3D000" || code === "53300" ||
      code === "SASL_SIGNATURE_MISMATCH" || code === "AUTH_TYPE_NOT_IMPLEMENTED");
}

/**
 * A failure of the database at `url` as one line that names it (password redacted), with
 * `hint` after a semicolon and the original as `cause`: `Cannot reach the database at ...`
 * (no connection), `Cannot log in to the database at ...` (refused user, password or
 * database) or `Database error at ...` (a statement refused). Anything else (shoal's own
 * messages, bugs) is returned as it is.
 */
export function namingDatabase(error: unknown, url: string, hint?: string): unknown {
  if (isReadOnlyStandby(error)) return standbyError(url, error);
  let what: string;
  if (isConnectionError(error)) what = "Cannot reach the database at";
  else if (isLoginRefused(error)) what = "Cannot log in to the database at";
  else if (error instanceof postgres.PostgresError) what = "Database error at";
  else return error;
  const message = `${what} ${redactUrl(url)}: ${describeError(error)}`;
  return new Error(hint ? `${message}; ${hint}` : message, { cause: error });
}

/**
 * A write refused because the session is read-only (SQLSTATE 25006
 * read_only_sql_transaction): what a standby says to every statement that writes.
 */
export function isReadOnlyStandby(error: unknown): boolean {
  return (error as { code?: unknown } | null)?.code === "25006";
}

/** What to do about a standby: the one line a role or a command ends with. */
const STANDBY_ADVICE =
  "point the URL at the primary, or list every host with target_session_attrs=read-write";

/** The one line for a database at `url` that is a read-only standby (`cause`: what said so). */
export function standbyError(url: string, cause?: unknown): Error {
  return new Error(
    `Cannot use the database at ${
      redactUrl(url)
    }: it is a read-only standby (in recovery); ${STANDBY_ADVICE}`,
    { cause },
  );
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

/** The database's clock: every time shoal compares is read from it, never the worker's. */
export async function databaseNow(db: Db): Promise<Date> {
  const [row] = await db<{ now: Date }[]>`select now() as now`;
  return row!.now;
}

/**
 * Most connections of a read pool (`--read-database-url`): monitoring reads one statement
 * after another, so two are plenty, and a replica serving several processes stays light.
 */
export const READ_POOL_MAX = 2;

/**
 * The pool monitoring reads from when `--read-database-url` names one (a replica, usually):
 * `shoal status`, the gauges of /metrics and the dashboard's pages. Nothing writes through
 * it: claims, acks and every action stay on the process's pool of the primary.
 */
export function connectReadPool(
  url: string,
  options: { applicationName: string; prepare?: boolean },
): Sql {
  return connect(url, {
    applicationName: `${options.applicationName} read`,
    prepare: options.prepare,
    max: READ_POOL_MAX,
  });
}

/**
 * How far a read pool's server is behind its primary. `replica`: it is a standby (in
 * recovery); false when the read URL names a primary, which is allowed (its lag is 0).
 * `lag_s`: 0 when it has replayed all the WAL it received (an idle primary sends none, so
 * the age of the last replayed transaction would grow while nothing is missing); else the
 * age of the last transaction it replayed; null when it has replayed none since it started
 * and has not caught up.
 */
export interface ReplicaLag {
  replica: boolean;
  lag_s: number | null;
}

/** Read {@link ReplicaLag} from the server behind `db`. */
export async function replicaLag(db: Db): Promise<ReplicaLag> {
  const [row] = await db<{ replica: boolean; lag_s: number | null }[]>`
    select pg_is_in_recovery() as replica,
      case
        when not pg_is_in_recovery() then 0
        when pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() then 0
        else greatest(0, extract(epoch from now() - pg_last_xact_replay_timestamp()))
      end::float8 as lag_s`;
  return { replica: row!.replica, lag_s: row!.lag_s === null ? null : Number(row!.lag_s) };
}

/** How long shoal's own statements may take before their connection is presumed dead. */
export const STATEMENT_DEADLINE_MS = 10_000;

/**
 * Close a process's pool at the end of a command or role, once its work is done or given
 * up. The wait is short: nothing shoal still awaits is in flight by then, and postgres.js
 * can leave the end of a connection the server already closed (a pooler, a firewall,
 * pg_terminate_backend) unsettled, so the wait is what such a stop costs: it was 5 s,
 * measured as 5.0 s of a reaper's 5.03 s stop after its connections were cut.
 */
export async function closePool(sql: Sql): Promise<void> {
  await sql.end({ timeout: 1 });
}

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

/**
 * True for exactly one known postgres.js 3.4.9 failure (porsager/postgres#1154, #1208):
 * after a connection closes, a statement still sent on it (the ROLLBACK of a transaction
 * the close interrupted) defers its write with `setImmediate`, and the deferred
 * `nextWrite` then calls `socket.write` on the `null` socket. The TypeError is thrown from
 * a timer, where no caller can catch it, and would end the process.
 */
export function isDriverWriteAfterClose(error: unknown): boolean {
  if (!(error instanceof TypeError)) return false;
  if (!/^Cannot read properties of null \(reading 'write'\)$/.test(error.message)) return false;
  const frames = (error.stack ?? "").split("\n").slice(1, 3).join("\n");
  return /\bnextWrite\b/.test(frames) &&
    /[\\/]postgres[\\/](?:[^\\/]+[\\/])?src[\\/]connection\.js/.test(frames);
}

let driverFaultsTolerated = false;

/**
 * Keep the process alive through the postgres.js write-after-close failure
 * ({@link isDriverWriteAfterClose}); any other uncaught error stays fatal. Safe because
 * nothing is lost by it: the failed write belongs to a connection already closed, so its
 * bytes never reach Postgres (on the connection's next session they precede the startup
 * packet, which the server refuses); the statement is the ROLLBACK (or COMMIT) of a
 * transaction whose caller has already been rejected with a connection error and which
 * Postgres rolled back when the session ended; the statement itself is rejected as a lost
 * connection when that connection next closes. Idempotent; long-running roles install it
 * at start.
 */
export function tolerateDriverWriteAfterClose(): void {
  if (driverFaultsTolerated) return;
  driverFaultsTolerated = true;
  globalThis.addEventListener("error", (event: ErrorEvent) => {
    if (!isDriverWriteAfterClose(event.error)) return;
    event.preventDefault();
    logger("db").warn(
      "postgres.js wrote to a connection after it closed (porsager/postgres#1154): " +
        "the write is dropped, its transaction had already failed as a lost connection",
    );
  });
}

/**
 * Capped exponential backoff with jitter: attempt 1 waits about `baseMs`, each later one
 * twice as long, never more than `capMs`; each wait is drawn from its upper half so that
 * processes that lost the database together do not come back in lockstep. Rounded to
 * 100 ms so log lines read well, and never shorter than that (no busy loop).
 */
export function backoffWithJitter(
  attempt: number,
  baseMs: number,
  capMs: number,
  random: () => number = Math.random,
): number {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(Math.max(attempt - 1, 0), 30));
  const ms = ceiling * (0.5 + random() / 2);
  return Math.max(100, Math.round(ms / 100) * 100);
}

/** A backoff wait for a log line: `900ms`, `1.7s`, `15s`. */
export function formatWait(ms: number): string {
  return ms < 1000 ? `${ms}ms` : `${Number((ms / 1000).toFixed(1))}s`;
}

export interface StartupWaitOptions {
  /** The database URL, shown redacted in messages. */
  url: string;
  /** Give up once this long has passed without reaching the database; 0: one attempt. */
  maxWaitMs: number;
  /** Shutdown: stop waiting at once (the caller exits 0). */
  stop: AbortSignal;
  /** First wait between attempts (doubles up to `capMs`). */
  baseMs?: number;
  capMs?: number;
}

/**
 * Wait until the database answers, for a long-running role started before its database
 * (a deploy that brings both up at once, a database restarting). One warn line per failed
 * attempt says where, why and when the next attempt is; after `maxWaitMs` the role gives up
 * with one error naming the database and the last failure. A database that answers as a
 * read-only standby (in recovery) is refused at once with one line saying so. Resolves true once the database
 * answered, false when `stop` aborted first. Errors that are not about reaching the
 * database (a bad password, a missing database) are not waited on: they are thrown at once.
 */
export async function waitForDatabase(sql: Sql, options: StartupWaitOptions): Promise<boolean> {
  const started = Date.now();
  const where = redactUrl(options.url);
  for (let attempt = 1; !options.stop.aborted; attempt++) {
    try {
      const [row] = await settleWithin(
        "startup check",
        sql<{ standby: boolean }[]>`select pg_is_in_recovery() as standby`,
        STATEMENT_DEADLINE_MS,
      );
      // A role on a standby would fail statement by statement: say so once, and stop (like
      // a refused password, it is the URL to fix, not a database to wait for).
      if (row!.standby) throw standbyError(options.url);
      if (attempt > 1) {
        logger("db").info("Reached the database at {url} after {attempts} attempts", {
          url: where,
          attempts: attempt,
        });
      }
      return true;
    } catch (error) {
      if (!isConnectionError(error)) throw error;
      const waited = Date.now() - started;
      if (options.stop.aborted) return false;
      if (waited >= options.maxWaitMs) {
        const after = options.maxWaitMs > 0
          ? ` after waiting ${formatDuration(options.maxWaitMs)}`
          : "";
        throw new Error(`Cannot reach the database at ${where}${after}: ${describeError(error)}`, {
          cause: error,
        });
      }
      const wait = Math.min(
        backoffWithJitter(attempt, options.baseMs ?? 1000, options.capMs ?? 15_000),
        options.maxWaitMs - waited,
      );
      logger("db").warn(
        "Waiting for the database at {url}: {error}; next attempt in {wait} " +
          "(giving up {limit} after start)",
        {
          url: where,
          error: describeError(error),
          wait: formatWait(wait),
          limit: formatDuration(options.maxWaitMs),
          attempt,
        },
      );
      await delay(wait, options.stop);
    }
  }
  return false;
}
