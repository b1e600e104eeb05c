/**
 * W5, the noisy neighbour: fairness key A holds a backlog of ready jobs on one queue and a
 * consumer with default settings is draining it; then key B enqueues a few jobs in one
 * call. The figure is how many of A's jobs start after B's enqueue has committed and
 * before B's last job starts (issue 5's target: fewer than 2 × the consumer's concurrency).
 *
 * Every job is a `stamp` job, so each start is recorded (with its fairness key) in
 * `bench.starts`; the order of starts in that window goes into the run's details.
 *
 * @module
 */
import type { Sql } from "../lib/db.ts";
import { createStartsTable, epochMs, pollUntil, sleep, withFreshDb } from "./harness.ts";
import type { BenchJob, ConsumerProcess, System } from "./systems.ts";
import type { Benchmark, Metric } from "./workloads.ts";

const KEY_A = "A";
const KEY_B = "B";
/** B arrives once this many of A's jobs have started: the consumer is busy with A by then. */
const A_STARTS_BEFORE_B = 200;
/** Jobs per call when pre-enqueueing A's backlog. */
const BACKLOG_BATCH = 1_000;
/** Letters of the start order kept in the details (A or B per start, in start order). */
const ORDER_SHOWN = 600;

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

function stampJobs(count: number, fairnessKey: string): BenchJob[] {
  const enqueuedAt = epochMs();
  return Array.from({ length: count }, () => ({ kind: "stamp", enqueuedAt, fairnessKey }));
}

/** What the recorded starts say about B's wait behind A. */
function analyse(
  starts: Start[],
  callStartedAt: number,
  committedAt: number,
): { values: Record<string, number>; details: Record<string, unknown> } {
  const bStarts = starts.filter((s) => s.fairness_key === KEY_B).map((s) => s.started_at);
  const bFirst = Math.min(...bStarts);
  const bLast = Math.max(...bStarts);
  const aStarts = starts.filter((s) => s.fairness_key === KEY_A).map((s) => s.started_at);
  const window = starts.filter((s) => s.started_at > committedAt && s.started_at <= bLast);
  return {
    values: { a_starts: aStarts.filter((t) => t > committedAt && t <= bLast).length },
    details: {
      a_starts_from_call_start: aStarts.filter((t) => t > callStartedAt && t <= bLast).length,
      b_jobs: bStarts.length,
      b_first_start_ms: bFirst - committedAt,
      b_last_start_ms: bLast - committedAt,
      enqueue_call_ms: committedAt - callStartedAt,
      a_started_before_b: aStarts.filter((t) => t <= callStartedAt).length,
      start_order: window.map((s) => (s.fairness_key === KEY_B ? "B" : "A")).join("")
        .slice(0, ORDER_SHOWN),
    },
  };
}

/** W5 for a system with fairness keys (shoal). */
export function noisyNeighbour(system: System): Benchmark {
  return {
    id: `W5/${system.name}`,
    workload: "W5",
    system: system.name,
    title: "noisy neighbour: A jobs started after B's enqueue, before B's last start",
    settings: `${system.defaultSettings}; one queue; key A's backlog pre-enqueued in calls of ` +
      `${BACKLOG_BATCH} (NOTIFY off), key B's jobs in one call (NOTIFY on) once ` +
      `${A_STARTS_BEFORE_B} A jobs have started; every job records its start (bench.stamp)`,
    metrics: METRICS,
    run: (ctx) =>
      withFreshDb(ctx.server, "w5", async (db) => {
        await system.install(db.sql, db.url);
        await createStartsTable(db.sql);
        const backlog = ctx.sizes.neighbourJobs;
        const newcomers = ctx.sizes.newcomerJobs;
        const producer = await system.openProducer(db.url, { max: 1 });
        let consumer: ConsumerProcess | undefined;
        let callStartedAt: number;
        let committedAt: number;
        try {
          for (let done = 0; done < backlog; done += BACKLOG_BATCH) {
            const n = Math.min(BACKLOG_BATCH, backlog - done);
            await producer.enqueueBatch(stampJobs(n, KEY_A), { notify: false });
          }
          consumer = system.spawnConsumer(db.url, { stamp: true });
          await consumer.started;
          await pollUntil(
            `${A_STARTS_BEFORE_B} starts of key A`,
            async () => (await countKey(db.sql, KEY_A)) >= A_STARTS_BEFORE_B,
            { everyMs: 5, timeoutMs: 60_000 },
          );
          callStartedAt = epochMs();
          await producer.enqueueBatch(stampJobs(newcomers, KEY_B), { notify: true });
          committedAt = epochMs();
          await pollUntil(
            `${newcomers} starts of key B`,
            async () => (await countKey(db.sql, KEY_B)) >= newcomers,
            { everyMs: 20, timeoutMs: 300_000 },
          );
          await sleep(50); // starts already running record themselves before the stop
        } finally {
          await producer.close();
          await consumer?.stop();
        }
        const starts = await startsByKey(db.sql);
        const aTotal = starts.filter((s) => s.fairness_key === KEY_A).length;
        if (aTotal >= backlog) {
          throw new Error(
            `Key A's backlog of ${backlog} ran out before B's last job started: enlarge it`,
          );
        }
        const { values, details } = analyse(starts, callStartedAt, committedAt);
        return {
          values,
          details: { ...details, a_backlog: backlog, a_left_unstarted: backlog - aTotal },
        };
      }),
  };
}
