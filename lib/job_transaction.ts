/**
 * A handler's database work in its job's own completing transaction (`ctx.transaction`,
 * issue 17): the handler's effects, anything it enqueues through the transaction, its fan-out
 * and the job's ack commit together, and only while the claim's token is current. A stale
 * worker (paused past its deadline, its job redelivered and finished elsewhere) rolls its
 * whole transaction back: its effects never commit.
 *
 * The token is checked twice. First, without a lock, before the handler's function runs: a run
 * whose claim is already gone does no work (openJobTransaction, which also bounds how long the
 * transaction may sit idle). Then, as the transaction's last statement, by the
 * ack itself, which locks the job row `for update` where its id and token match and rolls
 * everything back when it finds none. The row is locked only at the end, never while the
 * handler works: the consumer's heartbeat locks the same row to extend it, and a lock held
 * through the handler would stall every heartbeat (and so every other job's deadline) behind it.
 *
 * @module
 */
import type postgres from "postgres";
import type { Db } from "./db.ts";
import { ackClaimed, type Job } from "./queue.ts";
import { type CheckedFanOut, completeJobs, fanOut } from "./barrier.ts";

/** A postgres.js transaction on the consumer's pool, as `ctx.transaction` hands it out. */
export type Tx = postgres.TransactionSql<Record<string, never>>;

/** How the job ends inside the transaction. */
export interface FinishOptions {
  /** The job's result (jobs of an execution: handed to its callback or execution). */
  result: unknown;
  /** A fan-out the handler asked for: opened instead of a plain ack. */
  fanOut?: CheckedFanOut;
  maxChildren?: number;
  maxPayloadBytes?: number;
}

/**
 * Open a handler's transaction: bound how long it may sit idle, and say whether the claim is
 * still ours (no lock: the final check is the fenced write at its end).
 *
 * A worker frozen inside its transaction (SIGSTOP, a VM paused) holds the row locks of what it
 * wrote so far; a redelivered run writing the same rows (a unique key) would wait for it for as
 * long as it stays frozen. With `idle_in_transaction_session_timeout` set for this transaction
 * only (`set_config(..., true)`: nothing outlives it, PgBouncer's transaction mode included),
 * Postgres ends a transaction left idle longer than `idleMs` (the task's timeout, after which
 * the handler is aborted anyway), and its locks go with it.
 */
export async function openJobTransaction(
  tx: Db,
  job: Pick<Job, "id" | "token">,
  idleMs: number,
): Promise<boolean> {
  const [row] = await tx<{ ours: boolean }[]>`
    select set_config('idle_in_transaction_session_timeout', ${String(Math.ceil(idleMs))}::text,
                      true) as idle,
      exists (select 1 from shoal.jobs j
              where j.id = ${job.id}::bigint and j.token = ${job.token}::bigint) as ours`;
  return row!.ours;
}

/**
 * Ack the job inside `tx` (complete it with its result for a job of an execution, or open its
 * fan-out) by the same statements the completer sends: each locks the row where id and token
 * match. Returns false when the claim moved on (the caller rolls the transaction back).
 */
export async function finishJob(
  tx: Db,
  job: Pick<Job, "id" | "token" | "execution_id">,
  options: FinishOptions,
): Promise<boolean> {
  if (options.fanOut !== undefined) {
    const execution = await fanOut(tx, job, options.fanOut, {
      maxChildren: options.maxChildren,
      maxPayloadBytes: options.maxPayloadBytes,
    });
    return execution !== null;
  }
  if (job.execution_id !== null) {
    const done = await completeJobs(tx, [{ id: job.id, token: job.token, result: options.result }]);
    return done.length === 1;
  }
  return (await ackClaimed(tx, [job.id], [job.token])) === 1;
}
