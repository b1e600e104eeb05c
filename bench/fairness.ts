/**
 * W5, the noisy neighbour: fairness key A holds a backlog of ready jobs on one queue and a
 * consumer with default settings is draining it; then a newcomer arrives in one enqueue
 * call, and the figure is how many of A's jobs start after that call has committed and no
 * later than the newcomer's last job starts (target, issues 5 and 14: fewer than 2 × the
 * consumer's concurrency).
 *
 * - `noisyNeighbour(system, backlog)`: key A holds `backlog` ready jobs (issue 14: 1,000,
 *   50,000 and 1,000,000; one benchmark each, `W5/<system>/a1k` ...); key B enqueues 100
 *   jobs once 200 of A's have started.
 * - `priorityBehindBuffer(system, backlog)` (`W5/<system>/priority`): one job of key P at
 *   priority 1 (A's are 0) enqueued once the consumer holds a full prefetch buffer of A's
 *   jobs (at least half the default prefetch claimed ahead, its claim-again level).
 *
 * A's backlog is loaded in one statement (bench/backlog.ts, then `vacuum analyze`), stamped
 * as one producer enqueueing it in order would have it; the newcomer goes through the
 * system's producer, NOTIFY on. Every job is a `stamp` job, so each start is recorded
 * (with its fairness key) in `bench.starts`; the order of starts in the window goes into
 * the run's details. Medians of 5 runs unless `--runs` says otherwise (issue 14).
 *
 * @module
 */
import { OPTIONS } from "../lib/config.ts";
import type { Sql } from "../lib/db.ts";
import { loadBacklog } from "./backlog.ts";
import { createStartsTable, epochMs, pollUntil, sizeLabel, sleep, withFreshDb } from "./harness.ts";
import type { BenchJob, ConsumerProcess, System } from "./systems.ts";
import type { BenchContext, Benchmark, Metric, RunResult } from "./workloads.ts";

/** The queue the consumer serves by default, where the stamp jobs go. */
const QUEUE = "default";
const KEY_A = "A";
const KEY_B = "B";
/** The higher-priority job's own key, so its start is told apart from A's. */
const KEY_P = "P";
/** B arrives once this many of A's jobs have started: the consumer is busy with A by then. */
const A_STARTS_BEFORE_B = 200;
const CONCURRENCY = Number(OPTIONS.concurrency.default);
const PREFETCH = Number(OPTIONS.prefetch.default);
/**
 * The priority job arrives once this many of A's jobs are claimed (buffered or running):
 * half the default prefetch, the level at which a consumer with default settings claims
 * again, so the buffer is at its working size.
 */
export const FULL_BUFFER = Math.floor(PREFETCH / 2);
/** Claimed jobs are counted among the first this many in claim order (they are at its head). */
const HEAD = 2 * (CONCURRENCY + PREFETCH);
/** Letters of the start order kept in the details (one per start, in start order). */
const ORDER_SHOWN = 600;
/** Runs per bench run by default (issue 14: medians of 5). */
const RUNS = 5;

const METRICS: Metric[] = [{ key: "a_starts", unit: "A jobs", better: "lower" }];

interface Start {
  fairness_key: string;
  started_at: number;
}

async function startsByKey(sql: Sql): Promise<Start[]> {
  return [
    ...await sql<Start[]>`
      select fairness_key, started_at from bench.starts order by started_at`,
  ];
}

async function countKey(sql: Sql, key: string): Promise<number> {
  const [row] = await sql<{ n: number }[]>`
    select count(*)::integer as n from bench.starts where fairness_key = ${key}::text`;
  return row!.n;
}

/** Jobs claimed (buffered, running or not acked yet) among the head of the queue's claim order. */
async function claimedAtHead(sql: Sql): Promise<number> {
  const [row] = await sql<{ n: number }[]>`
    select count(*)::integer as n from (
      select j.locked_by from shoal.jobs j where j.queue = ${QUEUE}::text
      order by j.priority desc, j.fair_seq, j.id + 0 limit ${HEAD}::integer) h
    where h.locked_by is not null`;
  return row!.n;
}

/** The newcomer: who it is and when it is enqueued. */
interface Newcomer {
  key: string;
  jobs: number;
  priority?: number;
  /**
   * Wait until the newcomer should arrive (the consumer busy with A); resolves to the jobs
   * claimed at the head of the queue then, for the details.
   */
  arriveWhen(sql: Sql): Promise<number>;
}

/** What the recorded starts say about the newcomer's wait behind A. */
export function analyse(
  starts: Start[],
  newcomerKey: string,
  callStartedAt: number,
  committedAt: number,
): { values: Record<string, number>; details: Record<string, unknown> } {
  const mine = starts.filter((s) => s.fairness_key === newcomerKey).map((s) => s.started_at);
  const first = Math.min(...mine);
  const last = Math.max(...mine);
  const aStarts = starts.filter((s) => s.fairness_key === KEY_A).map((s) => s.started_at);
  const window = starts.filter((s) => s.started_at > committedAt && s.started_at <= last);
  const k = newcomerKey.toLowerCase();
  return {
    values: { a_starts: aStarts.filter((t) => t > committedAt && t <= last).length },
    details: {
      a_starts_from_call_start: aStarts.filter((t) => t > callStartedAt && t <= last).length,
      [`${k}_jobs`]: mine.length,
      [`${k}_first_start_ms`]: first - committedAt,
      [`${k}_last_start_ms`]: last - committedAt,
      enqueue_call_ms: committedAt - callStartedAt,
      a_started_before_call: aStarts.filter((t) => t <= callStartedAt).length,
      start_order: window.map((s) => (s.fairness_key === KEY_A ? "A" : newcomerKey)).join("")
        .slice(0, ORDER_SHOWN),
    },
  };
}

function stampJobs(count: number, fairnessKey: string, priority?: number): BenchJob[] {
  const enqueuedAt = epochMs();
  return Array.from({ length: count }, (): BenchJob => ({
    kind: "stamp",
    enqueuedAt,
    fairnessKey,
    ...(priority === undefined ? {} : { priority }),
  }));
}

/** One run: A's backlog, a draining consumer, the newcomer; the starts analysed. */
async function measure(
  ctx: BenchContext,
  system: System,
  backlog: number,
  newcomer: Newcomer,
): Promise<RunResult> {
  return await withFreshDb(ctx.server, `w5 ${sizeLabel(backlog)}`, async (db) => {
    await system.install(db.sql, db.url);
    await createStartsTable(db.sql);
    const load = await loadBacklog(db.sql, {
      queue: QUEUE,
      task: "bench.stamp",
      count: backlog,
      payload: { t: epochMs() },
      fairnessKey: KEY_A,
    });
    const producer = await system.openProducer(db.url, { max: 1 });
    let consumer: ConsumerProcess | undefined;
    let callStartedAt: number;
    let committedAt: number;
    let claimed: number;
    try {
      // Connected before the clock starts: the newcomer's call is its first enqueue.
      await producer.warm(1);
      consumer = system.spawnConsumer(db.url, { stamp: true });
      await consumer.started;
      claimed = await newcomer.arriveWhen(db.sql);
      const jobs = stampJobs(newcomer.jobs, newcomer.key, newcomer.priority);
      callStartedAt = epochMs();
      await producer.enqueueBatch(jobs, { notify: true });
      committedAt = epochMs();
      await pollUntil(
        `${newcomer.jobs} starts of key ${newcomer.key}`,
        async () => (await countKey(db.sql, newcomer.key)) >= newcomer.jobs,
        { everyMs: 20, timeoutMs: 300_000 },
      );
      await sleep(50); // starts already running record themselves before the stop
    } finally {
      await producer.close();
      await consumer?.stop();
    }
    const starts = await startsByKey(db.sql);
    const aTotal = starts.filter((s) => s.fairness_key === KEY_A).length;
    const { values, details } = analyse(starts, newcomer.key, callStartedAt, committedAt);
    return {
      values,
      details: {
        ...details,
        a_backlog: backlog,
        a_left_unstarted: backlog - aTotal,
        // Every A job started before the newcomer's last: the figure is a lower bound.
        a_ran_out: aTotal >= backlog ? 1 : 0,
        claimed_at_enqueue: claimed,
        load_insert_s: load.insertMs / 1000,
        load_vacuum_s: load.vacuumMs / 1000,
      },
    };
  });
}

/** W5 at one backlog of key A, for a system with fairness keys (shoal). */
export function noisyNeighbour(system: System, backlog: number, newcomers: number): Benchmark {
  const size = backlog.toLocaleString("en-US");
  return {
    id: `W5/${system.name}/a${sizeLabel(backlog)}`,
    workload: "W5",
    system: system.name,
    title: `noisy neighbour, key A ${size} ready: A jobs started after B's enqueue, ` +
      "before B's last start",
    settings: `${system.defaultSettings}; one queue; key A's ${size} ready jobs loaded in one ` +
      `insert (then vacuum analyze), key B's ${newcomers} jobs in one call (NOTIFY on) once ` +
      `${A_STARTS_BEFORE_B} A jobs have started; every job records its start (bench.stamp); ` +
      `median of ${RUNS} runs unless --runs is given`,
    metrics: METRICS,
    runs: RUNS,
    run: (ctx) =>
      measure(ctx, system, backlog, {
        key: KEY_B,
        jobs: newcomers,
        async arriveWhen(sql) {
          await pollUntil(
            `${A_STARTS_BEFORE_B} starts of key A`,
            async () => (await countKey(sql, KEY_A)) >= A_STARTS_BEFORE_B,
            { everyMs: 5, timeoutMs: 60_000 },
          );
          return await claimedAtHead(sql);
        },
      }),
  };
}

/** W5's priority variant: one higher-priority job behind a full prefetch buffer of A's jobs. */
export function priorityBehindBuffer(system: System, backlog: number): Benchmark {
  const size = backlog.toLocaleString("en-US");
  return {
    id: `W5/${system.name}/priority`,
    workload: "W5",
    system: system.name,
    title: "priority behind a full buffer: A jobs started after the priority-1 job's " +
      "enqueue, before it started",
    settings: `${system.defaultSettings}; one queue; key A's ${size} ready jobs (priority 0) ` +
      "loaded in one insert (then vacuum analyze); one job of key P at priority 1 in one " +
      `call (NOTIFY on) once at least ${FULL_BUFFER} of the first ${HEAD} jobs in claim ` +
      "order are claimed (a full prefetch buffer); every job records its start " +
      `(bench.stamp); median of ${RUNS} runs unless --runs is given`,
    metrics: METRICS,
    runs: RUNS,
    run: (ctx) =>
      measure(ctx, system, backlog, {
        key: KEY_P,
        jobs: 1,
        priority: 1,
        async arriveWhen(sql) {
          let claimed = 0;
          await pollUntil(
            `a full prefetch buffer (${FULL_BUFFER} of key A's jobs claimed ahead)`,
            async () => (claimed = await claimedAtHead(sql)) >= FULL_BUFFER,
            { everyMs: 5, timeoutMs: 60_000 },
          );
          return claimed;
        },
      }),
  };
}
