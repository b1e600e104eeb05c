/**
 * W11, claim time flat with size (issue 14, item 1): how long one claim of a batch takes
 * when the queue holds 10,000, 1,000,000 or 10,000,000 ready jobs. Target: the median at
 * the largest size at most 1.5× the median at the smallest.
 *
 * Per size, in a fresh database: the backlog is loaded in one statement
 * (bench/backlog.ts: `insert … select … from generate_series`, then `vacuum analyze`).
 * Then, on one connection, a loop does what a consumer with a steady producer does:
 * claim a batch with lib/queue.ts's `claim()` (the call the consumer makes; `batch` jobs,
 * `starting` its default free slots), ack them (`ack()`: a fenced delete), and enqueue as
 * many again at the tail (`enqueueMany()`, NOTIFY off), so the queue keeps its size and
 * every claim walks whatever the acks before it left behind (dead index entries and heap
 * rows at the head, until pruning or autovacuum removes them). The first `warmup` claims
 * are not timed; the figure is the median wall time of the next `claims`, each one round
 * trip on loopback (postgres.js, prepared statement), which is the server's time plus
 * about 0.1 ms.
 *
 * A workload of `deno task bench` (`--only W11`, one benchmark per size: `W11/shoal/10k`,
 * `W11/shoal/1M`, `W11/shoal/10M`; once per bench run unless `--runs` is given), and
 * standalone:
 *
 *   deno run -A bench/claim_size.ts [--ready 10000,1000000,10000000] [--claims 2000]
 *     [--warmup 200] [--batch 510]
 *
 * This tree's lib/queue.ts only: not measured for `--beside` (the claim loop runs in the
 * bench process).
 *
 * @module
 */
import { parseArgs } from "node:util";
import { OPTIONS } from "../lib/config.ts";
import { connect, type Sql } from "../lib/db.ts";
import { parseDuration } from "../lib/duration.ts";
import { loadMigrations, migrate } from "../lib/migrate.ts";
import { ack, claim, enqueueMany, type JobSpec } from "../lib/queue.ts";
import { loadBacklog } from "./backlog.ts";
import {
  type BenchServer,
  median,
  percentile,
  print,
  say,
  sizeLabel,
  startServer,
  withFreshDb,
} from "./harness.ts";
import type { Benchmark, Metric, RunResult } from "./workloads.ts";

const QUEUE = "w11";
const TASK = "shoal.noop";
const CONSUMER_CONCURRENCY = Number(OPTIONS.concurrency.default);
/**
 * The most a consumer with default settings claims at once: its free slots plus a full
 * prefetch buffer (`--concurrency` 10 + `--prefetch` 500), what it takes when its buffer
 * is empty at full pace. Its claims in a steady drain are between half that and that.
 */
export const DEFAULT_CLAIM_BATCH = CONSUMER_CONCURRENCY + Number(OPTIONS.prefetch.default);
/** The consumer's default visibility timeout, ms (a claim sets each job's deadline from it). */
const VISIBILITY_MS = parseDuration(OPTIONS["visibility-timeout"].default);

/** How W11 runs at each size. */
export interface ClaimSpec {
  /** Ready jobs in the queue while it is measured (kept there by refilling). */
  ready: number;
  /** Claims timed, after `warmup` untimed ones. */
  claims: number;
  warmup: number;
  /** Jobs per claim. */
  batch: number;
}

const METRICS: Metric[] = [{ key: "claim_ms", unit: "ms", better: "lower" }];

/** Throw unless `spec` can run: whole counts, and a queue that holds a batch at least. */
export function checkClaimSpec(spec: ClaimSpec): void {
  for (const key of ["ready", "claims", "batch"] as const) {
    if (!Number.isInteger(spec[key]) || spec[key] < 1) {
      throw new RangeError(`W11's ${key} must be a positive integer, not ${spec[key]}`);
    }
  }
  if (!Number.isInteger(spec.warmup) || spec.warmup < 0) {
    throw new RangeError(`W11's warmup must be an integer ≥ 0, not ${spec.warmup}`);
  }
  if (spec.ready < spec.batch) {
    throw new RangeError(
      `W11 needs at least one batch (${spec.batch}) of ready jobs, not ${spec.ready}`,
    );
  }
}

/** What the loop measured: each timed claim's wall time, and the ack and refill medians. */
interface LoopTimes {
  claimMs: number[];
  ackMs: number[];
  refillMs: number[];
  seconds: number;
}

/** Claim, ack and refill `warmup + claims` times on `conn`; every claim must be full. */
async function claimLoop(conn: Sql, spec: ClaimSpec): Promise<LoopTimes> {
  const refill: JobSpec[] = Array.from(
    { length: spec.batch },
    () => ({ task: TASK, queue: QUEUE, payload: {} }),
  );
  const times: LoopTimes = { claimMs: [], ackMs: [], refillMs: [], seconds: 0 };
  const start = performance.now();
  for (let i = 0; i < spec.warmup + spec.claims; i++) {
    const t0 = performance.now();
    const { jobs } = await claim(conn, {
      queues: [QUEUE],
      limit: spec.batch,
      workerId: "bench w11",
      visibilityMs: VISIBILITY_MS,
      starting: CONSUMER_CONCURRENCY,
    });
    const t1 = performance.now();
    if (jobs.length !== spec.batch) {
      throw new Error(
        `Claim ${
          i + 1
        } took ${jobs.length} of ${spec.batch} jobs from a queue of ${spec.ready} ready`,
      );
    }
    await ack(conn, jobs.map((j) => ({ id: j.id, token: j.token })));
    const t2 = performance.now();
    await enqueueMany(conn, refill, { notify: false });
    const t3 = performance.now();
    if (i >= spec.warmup) {
      times.claimMs.push(t1 - t0);
      times.ackMs.push(t2 - t1);
      times.refillMs.push(t3 - t2);
    }
  }
  times.seconds = (performance.now() - start) / 1000;
  return times;
}

/** The table's state after the loop, for the details. */
async function tableState(sql: Sql): Promise<Record<string, number>> {
  const [row] = await sql<{ size_mb: number; dead: number; autovacuums: number; ready: number }[]>`
    select pg_total_relation_size('shoal.jobs') / 1048576.0 as size_mb,
      s.n_dead_tup::integer as dead, s.autovacuum_count::integer as autovacuums,
      (select count(*) from shoal.jobs j where j.queue = ${QUEUE}::text)::integer as ready
    from pg_stat_user_tables s where s.relid = 'shoal.jobs'::regclass`;
  return {
    table_mb: Number(row!.size_mb),
    dead_tuples: row!.dead,
    autovacuums: row!.autovacuums,
    ready_at_end: row!.ready,
  };
}

/** One size, in a fresh database on `server`. */
export async function measureClaims(server: BenchServer, spec: ClaimSpec): Promise<RunResult> {
  checkClaimSpec(spec);
  return await withFreshDb(server, `w11 ${sizeLabel(spec.ready)}`, async (db) => {
    await migrate(db.sql, await loadMigrations());
    const load = await loadBacklog(db.sql, { queue: QUEUE, task: TASK, count: spec.ready });
    const conn = connect(db.url, { applicationName: "bench w11 claimer", max: 1 });
    let times: LoopTimes;
    try {
      times = await claimLoop(conn, spec);
    } finally {
      await conn.end({ timeout: 5 });
    }
    return {
      values: { claim_ms: median(times.claimMs) },
      details: {
        ready: spec.ready,
        batch: spec.batch,
        claims: spec.claims,
        warmup: spec.warmup,
        claim_p10_ms: percentile(times.claimMs, 10),
        claim_p90_ms: percentile(times.claimMs, 90),
        claim_p99_ms: percentile(times.claimMs, 99),
        claim_max_ms: Math.max(...times.claimMs),
        ack_ms: median(times.ackMs),
        refill_ms: median(times.refillMs),
        loop_s: times.seconds,
        load_insert_s: load.insertMs / 1000,
        load_vacuum_s: load.vacuumMs / 1000,
        ...await tableState(db.sql),
      },
    };
  });
}

/** W11 at one size (shoal only: this tree's lib/queue.ts). */
export function claimAtSize(spec: ClaimSpec): Benchmark {
  const label = sizeLabel(spec.ready);
  return {
    id: `W11/shoal/${label}`,
    workload: "W11",
    system: "shoal",
    title: `claim time with ${spec.ready.toLocaleString("en-US")} ready jobs`,
    settings: `one queue of ${spec.ready.toLocaleString("en-US")} ready jobs (loaded in one ` +
      "insert … generate_series, then vacuum analyze); one connection: claim() of " +
      `${spec.batch} (starting ${CONSUMER_CONCURRENCY}), ack(), enqueueMany() of ${spec.batch} ` +
      `(NOTIFY off) in a loop; median wall time of ${spec.claims} claims after ${spec.warmup}`,
    metrics: METRICS,
    once: true,
    run: (ctx) => measureClaims(ctx.server, spec),
  };
}

function integers(text: string, flag: string): number[] {
  const values = text.split(",").map((s) => Number(s.trim()));
  if (values.some((n) => !Number.isInteger(n) || n < 0)) {
    throw new Error(`Invalid --${flag} "${text}": expected whole numbers separated by commas`);
  }
  return values;
}

/** The standalone run: one markdown row per size. */
async function standalone(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      ready: { type: "string", default: "10000,1000000,10000000" },
      claims: { type: "string", default: "2000" },
      warmup: { type: "string", default: "200" },
      batch: { type: "string", default: String(DEFAULT_CLAIM_BATCH) },
    },
    strict: true,
  });
  const [claims] = integers(values.claims!, "claims");
  const [warmup] = integers(values.warmup!, "warmup");
  const [batch] = integers(values.batch!, "batch");
  const specs = integers(values.ready!, "ready").map((ready) => ({
    ready,
    claims: claims!,
    warmup: warmup!,
    batch: batch!,
  }));
  specs.forEach(checkClaimSpec);
  const server = await startServer({ profile: false });
  try {
    print("| ready | claim ms (median) | p90 | p99 | load s (insert + vacuum) |\n");
    print("| ---: | ---: | ---: | ---: | ---: |\n");
    let first: number | null = null;
    for (const spec of specs) {
      say(`W11: ${spec.ready.toLocaleString("en-US")} ready jobs...`);
      const { values: v, details: d } = await measureClaims(server, spec);
      const ms = v.claim_ms!;
      first ??= ms;
      const load = (d.load_insert_s as number) + (d.load_vacuum_s as number);
      print(
        `| ${spec.ready.toLocaleString("en-US")} | ${ms.toFixed(3)} (${
          (ms / first).toFixed(2)
        }×) | ${(d.claim_p90_ms as number).toFixed(3)} | ${
          (d.claim_p99_ms as number).toFixed(3)
        } | ${load.toFixed(1)} |\n`,
      );
    }
  } finally {
    await server.stop();
  }
}

if (import.meta.main) {
  await standalone();
}
