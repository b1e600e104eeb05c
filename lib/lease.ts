/**
 * Leader leases: one row per lease name in `shoal.leases`, with the holder, a fencing
 * token and an expiry, all on the database clock.
 *
 * State machine, per process and lease name:
 * - follower: `acquire` succeeds when the row is missing, expired, or already ours;
 *   taking over an expired or foreign row starts a new term (token + 1).
 * - leader: `renew` extends the expiry only while the row is ours, in our term and
 *   unexpired. A failed or throwing renew ends leader work in that same cycle.
 * - shutdown: `release` expires the row at once, so a standby takes over within one of
 *   its intervals instead of waiting out the lease.
 * Leader-only work runs in a transaction that first calls `holdLease`, which locks the
 * row FOR SHARE in our term: a paused ex-leader that wakes after a successor took over
 * finds no row and does nothing; a successor cannot take over mid-transaction.
 *
 * Every function takes an optional `now` so tests can move the clock.
 *
 * @module
 */
import {
  checkDate,
  checkDb,
  checkInteger,
  checkObject,
  checkOptions,
  checkString,
  checkToken,
  MAX_TIMER_MS,
} from "./args.ts";
import type { Db } from "./db.ts";

/** One leadership term. */
export interface LeaseTerm {
  name: string;
  holder: string;
  /** Fencing token of this term. */
  token: string;
  expiresAt: Date;
}

export interface LeaseRow {
  name: string;
  holder: string;
  token: string;
  acquired_at: Date;
  expires_at: Date;
}

/** The leader's lease is gone: leader work must stop. */
export class LeaseLostError extends Error {
  override name = "LeaseLostError";
}

export interface AcquireOptions {
  name: string;
  holder: string;
  ttlMs: number;
  /** Override the database clock (tests). */
  now?: Date;
}

/** Throw unless `term` is a lease term (what acquire() and renew() return). */
export function checkTerm(fn: string, term: unknown, arg = "term"): void {
  checkObject(fn, arg, term, { what: "a lease term from acquire()" });
  const { name, holder, token } = term as LeaseTerm;
  checkString(fn, `${arg}.name`, name);
  checkString(fn, `${arg}.holder`, holder);
  checkToken(fn, `${arg}.token`, token);
}

/** Throw unless `options.ttlMs` (when `ttl`) and `options.now` are usable. */
function checkClock(fn: string, options: { ttlMs?: number; now?: Date }, ttl: boolean): void {
  if (ttl) checkInteger(fn, "options.ttlMs", options.ttlMs, { min: 1, max: MAX_TIMER_MS });
  checkDate(fn, "options.now", options.now, { optional: true });
}

/** Take the lease if it is free, expired or ours; null when another holder has it. */
export async function acquire(db: Db, options: AcquireOptions): Promise<LeaseTerm | null> {
  checkDb("acquire", db);
  checkObject("acquire", "options", options);
  checkString("acquire", "options.name", options.name);
  checkString("acquire", "options.holder", options.holder);
  checkClock("acquire", options, true);
  const now = options.now ?? null;
  const [row] = await db<{ token: string; expires_at: Date }[]>`
    with clock as (select coalesce(${now}::timestamptz, now()) as now)
    insert into shoal.leases as l (name, holder, token, acquired_at, expires_at)
    select ${options.name}::text, ${options.holder}::text, 1, clock.now,
      clock.now + ${options.ttlMs}::bigint * interval '1 ms'
    from clock
    on conflict (name) do update
    set holder = excluded.holder,
        token = case when l.holder = excluded.holder and l.expires_at > excluded.acquired_at
                     then l.token else l.token + 1 end,
        acquired_at = case when l.holder = excluded.holder and l.expires_at > excluded.acquired_at
                           then l.acquired_at else excluded.acquired_at end,
        expires_at = excluded.expires_at
    where l.expires_at <= excluded.acquired_at or l.holder = excluded.holder
    returning l.token, l.expires_at`;
  if (!row) return null;
  return {
    name: options.name,
    holder: options.holder,
    token: row.token,
    expiresAt: row.expires_at,
  };
}

/** Extend our term; null when the lease expired or is no longer ours (leadership lost). */
export async function renew(
  db: Db,
  term: LeaseTerm,
  options: { ttlMs: number; now?: Date },
): Promise<LeaseTerm | null> {
  checkDb("renew", db);
  checkTerm("renew", term);
  checkObject("renew", "options", options);
  checkClock("renew", options, true);
  const now = options.now ?? null;
  const [row] = await db<{ expires_at: Date }[]>`
    update shoal.leases
    set expires_at = coalesce(${now}::timestamptz, now()) + ${options.ttlMs}::bigint * interval '1 ms'
    where name = ${term.name}::text and holder = ${term.holder}::text
      and token = ${term.token}::bigint
      and expires_at > coalesce(${now}::timestamptz, now())
    returning expires_at`;
  return row ? { ...term, expiresAt: row.expires_at } : null;
}

/** Give the lease up now (graceful shutdown); false when it was no longer ours. */
export async function releaseLease(
  db: Db,
  term: LeaseTerm,
  options: { now?: Date } = {},
): Promise<boolean> {
  checkDb("releaseLease", db);
  checkTerm("releaseLease", term);
  checkOptions("releaseLease", options);
  checkClock("releaseLease", options, false);
  const now = options.now ?? null;
  const rows = await db`
    update shoal.leases set expires_at = coalesce(${now}::timestamptz, now())
    where name = ${term.name}::text and holder = ${term.holder}::text
      and token = ${term.token}::bigint
    returning name`;
  return rows.length === 1;
}

/**
 * Inside a leader's transaction: lock our lease row FOR SHARE, or throw LeaseLostError
 * when this term no longer holds an unexpired lease. Call it first in every leader-only
 * transaction.
 */
export async function holdLease(
  db: Db,
  term: LeaseTerm,
  options: { now?: Date } = {},
): Promise<void> {
  checkDb("holdLease", db);
  checkTerm("holdLease", term);
  checkOptions("holdLease", options);
  checkClock("holdLease", options, false);
  const now = options.now ?? null;
  // A leader frozen inside this transaction (SIGSTOP, a stalled VM, a lost network) would
  // keep the row locked, and every standby out, until its connection dies. Once the lease
  // has expired, Postgres ends such a session (rolling its work back) and frees the row.
  const rows = await db`
    select set_config('idle_in_transaction_session_timeout',
      greatest(1, ceil(extract(epoch from expires_at - coalesce(${now}::timestamptz, now()))
        * 1000))::bigint::text, true)
    from shoal.leases
    where name = ${term.name}::text and holder = ${term.holder}::text
      and token = ${term.token}::bigint
      and expires_at > coalesce(${now}::timestamptz, now())
    for share`;
  if (rows.length === 0) {
    throw new LeaseLostError(
      `Lease ${term.name} is no longer held by ${term.holder} (term ${term.token})`,
    );
  }
}

/** Every lease, for `shoal status`. */
export async function listLeases(db: Db): Promise<LeaseRow[]> {
  return await db<LeaseRow[]>`
    select name, holder, token, acquired_at, expires_at from shoal.leases order by name`;
}
