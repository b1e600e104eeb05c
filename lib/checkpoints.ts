/**
 * Checkpoint steps' records, batched across a consumer's running handlers (issue 17).
 *
 * A checkpoint step (`ctx.step(name, fn, { transaction: false })`) runs `fn` with no
 * transaction: its result only needs recording, fenced by the claim's token, before the handler
 * goes on. Like the completer's acks (lib/completer.ts), records that come in while one
 * statement is in flight wait and go together in the next, at most CHECKPOINT_BATCH_CAP per
 * statement (lib/steps.ts recordCheckpoints(), one insert for many jobs, each fenced by its own
 * token). A batch starts a macrotask after its first record (setImmediate), so handlers resumed
 * by the same commit (their previous step's) join it rather than go one by one.
 *
 * Errors: a record whose token moved on resolves "lost" (the run ends as lost); a statement
 * that fails rejects every step of its batch (the handlers fail and are retried, like any step
 * error), except that a data error of a batch of several (one record the database refuses) is
 * tried again record by record, so only the step whose record is refused fails.
 *
 * @module
 */
import { setImmediate } from "node:timers";
import type { Db } from "./db.ts";
import { isDataError } from "./db.ts";
import { describeError, logger } from "./log.ts";
import { takeBatches } from "./completer.ts";
import { type CheckpointRecord, recordCheckpoints } from "./steps.ts";

/**
 * Most records per statement. A batch is what comes in during one round trip (at most one
 * per running handler, so the consumer's concurrency); the cap only bounds what one statement
 * locks and sends when handlers run far more steps than that at once.
 */
export const CHECKPOINT_BATCH_CAP = 1_000;

/** What a checkpoint's record came to (recordStep()'s outcomes). */
export type CheckpointOutcome = "recorded" | "lost" | "duplicate";

interface Pending {
  record: CheckpointRecord;
  resolve: (outcome: CheckpointOutcome) => void;
  reject: (error: unknown) => void;
}

/** Batches checkpoint records; see the module comment. One per consumer. */
export class CheckpointBatcher {
  readonly #sql: Db;
  readonly #cap: number;
  readonly #log = logger("consumer");
  #waiting: Pending[] = [];
  #flushing: Promise<void> | null = null;

  constructor(sql: Db, options: { batchCap?: number } = {}) {
    this.#sql = sql;
    this.#cap = options.batchCap ?? CHECKPOINT_BATCH_CAP;
    if (!Number.isInteger(this.#cap) || this.#cap < 1) {
      throw new RangeError(`Invalid checkpoint batch cap ${this.#cap}: expected an integer ≥ 1`);
    }
  }

  /** Records waiting for a statement (not counting the one in flight). */
  get waiting(): number {
    return this.#waiting.length;
  }

  /** Record a checkpoint; resolves once its batch committed (or rejects with its error). */
  record(record: CheckpointRecord): Promise<CheckpointOutcome> {
    return new Promise((resolve, reject) => {
      this.#waiting.push({ record, resolve, reject });
      this.#flushing ??= this.#flush();
    });
  }

  /** Resolves once every record handed in so far has been sent (shutdown, before the pool closes). */
  async drain(): Promise<void> {
    while (this.#flushing) await this.#flushing;
  }

  async #flush(): Promise<void> {
    try {
      while (this.#waiting.length > 0) {
        // One macrotask for the handlers resumed by the last commit to hand in their next step
        // (setImmediate runs once every microtask has; setTimeout(0) waits 1 to 4 ms, which
        // made a step of 10 concurrent handlers half again as slow).
        if (this.#waiting.length < this.#cap) await new Promise((r) => setImmediate(r));
        const [batch] = takeBatches(this.#waiting, this.#cap, 1);
        await this.#send(batch!);
      }
    } finally {
      this.#flushing = null;
    }
  }

  /** One statement for the batch; never rejects (each step gets its outcome or its error). */
  async #send(batch: Pending[]): Promise<void> {
    let outcomes: CheckpointOutcome[];
    try {
      outcomes = await recordCheckpoints(this.#sql, batch.map((p) => p.record));
    } catch (error) {
      if (batch.length > 1 && isDataError(error)) {
        // One record the database refuses must not fail the other handlers' steps.
        for (const one of batch) await this.#send([one]);
        return;
      }
      this.#log.error("Cannot record {count} checkpoint steps, their handlers fail: {error}", {
        count: batch.length,
        error: describeError(error),
      });
      for (const p of batch) p.reject(error);
      return;
    }
    batch.forEach((p, i) => p.resolve(outcomes[i]!));
  }
}
