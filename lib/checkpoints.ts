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
 * Completions ride along: jobs of executions that finished while a round was due (the
 * completer's, through {@link CompletionSource}) complete in the round's statement, so the
 * round's commit is theirs too. A durable commit waits for a WAL flush, and with the consumer's
 * 10 handlers each round of checkpoints is one: a completion statement of its own beside it
 * would be a second flush for the rounds to queue behind.
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
import type { Completion } from "./barrier.ts";

/**
 * Completions a round may carry (lib/completer.ts Completer): `take` hands over those waiting
 * (the round's statement then owns them), `sent` says the statement committed, `failed` hands
 * them back (the completer sends them itself), `idle` says no round is due any more.
 */
export interface CompletionSource {
  take(): Completion[];
  sent(batch: readonly Completion[]): void;
  failed(batch: readonly Completion[]): void;
  idle(): void;
}

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
  #completions: CompletionSource | undefined;

  constructor(sql: Db, options: { batchCap?: number; completions?: CompletionSource } = {}) {
    this.#sql = sql;
    this.#completions = options.completions;
    this.#cap = options.batchCap ?? CHECKPOINT_BATCH_CAP;
    if (!Number.isInteger(this.#cap) || this.#cap < 1) {
      throw new RangeError(`Invalid checkpoint batch cap ${this.#cap}: expected an integer ≥ 1`);
    }
  }

  /** Records waiting for a statement (not counting the one in flight). */
  get waiting(): number {
    return this.#waiting.length;
  }

  /** Whether a round is due: records wait, or a statement is in flight (more may follow). */
  get busy(): boolean {
    return this.#flushing !== null;
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
      for (;;) {
        // One macrotask for the handlers resumed by the last commit to hand in their next step
        // (setImmediate runs once every microtask has; setTimeout(0) waits 1 to 4 ms, which
        // made a step of 10 concurrent handlers half again as slow). Also after the last
        // round: until it has passed, a round is still due (busy), so a handler finishing on
        // the last commit hands its completion to the next round rather than to a statement
        // of its own.
        if (this.#waiting.length < this.#cap) await new Promise((r) => setImmediate(r));
        if (this.#waiting.length === 0) break;
        const [batch] = takeBatches(this.#waiting, this.#cap, 1);
        await this.#send(batch!, this.#completions?.take() ?? []);
      }
    } finally {
      this.#flushing = null;
      // Completions handed in during the last round go on their own now.
      this.#completions?.idle();
    }
  }

  /**
   * One statement for the batch and the completions riding along; never rejects (each step
   * gets its outcome or its error; failed completions go back to the completer).
   */
  async #send(batch: Pending[], completions: readonly Completion[] = []): Promise<void> {
    let outcomes: CheckpointOutcome[];
    try {
      outcomes = await recordCheckpoints(
        this.#sql,
        batch.map((p) => p.record),
        completions,
      );
    } catch (error) {
      // The completer sends them itself (and retries once), as it would have without a round.
      if (completions.length > 0) this.#completions!.failed(completions);
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
    if (completions.length > 0) this.#completions!.sent(completions);
    batch.forEach((p, i) => p.resolve(outcomes[i]!));
  }
}
