/**
 * W11, claim time flat with size (issue 14, item 1): how long one claim of a batch takes
 * when the queue holds 10,000, 1,000,000 or 10,000,000 ready jobs. Target: the median at
 * the largest size at most 1.5× the median at the smallest.
 *
 * Each size gets a fresh database whose backlog is loaded in one statement
 * (bench/backlog.ts: `insert … select … from generate_series`, then `vacuum analyze`).
 * Then, on one connection per database, a loop does what a consumer with a steady
 * producer does: claim a batch with lib/queue.ts's `claim()` (the call the consumer
 * makes; `batch` jobs, `starting` its default free slots), ack them (`ack()`: a fenced
 * delete), and enqueue as many again at the tail (`enqueueMany()`, NOTIFY off), so the
 * queue keeps its size and every claim walks whatever the acks before it left behind
 * (dead index entries and heap rows at the head, until pruning or autovacuum removes
 * them). The sizes take turns, one claim each per round (their order rotating), so a
 * burst of load on this shared machine falls on all of them alike: measured one after
 * the other, the same code gave 19 ms at 10k (load average 6) and 9 ms at 10M (load 3).
 * The first `warmup` rounds are not timed; each size's figure is the median wall time of
 * its next `claims` claims, each one round trip on loopback (postgres.js, prepared
 * statement): the server's time plus about 0.1 ms.
 *
 * A workload of `deno task bench` (`--only W11`: the benchmark `W11/shoal`, one metric per
 * size, `claim_ms_10k` ...; once per bench run unless `--runs` is given), and standalone:
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
  type BenchDb,
  type BenchServer,
  freshDb,
  median,
  percentile,
  print,
  say,
  sizeLabel,
  startServer,
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

/** How W11 runs. */
export interface ClaimSpec {
  /** Ready jobs in the queue while it is measured (kept there by refilling), one database each. */
  sizes: number[];
  /** Claims timed per size, after `warmup` untimed ones. */
  claims: number;
  warmup: number;
  /** Jobs per claim. */
  batch: number;
}

/** The metric holding the median claim at `size` ready jobs: `claim_ms_10k`. */
export function claimKey(size: number): string {
  return `claim_ms_${sizeLabel(size)}`;
}

/** Throw unless `spec` can run: whole counts, distinct sizes, each holding a batch at least. */
export function checkClaimSpec(spec: ClaimSpec): void {
  for (const key of ["claims", "batch"] as const) {
    if (!Number.isInteger(spec[key]) || spec[key] < 1) {
      throw new RangeError(`W11's ${key} must be a positive integer, not ${spec[key]}`);
    }
  }
  if (!Number.isInteger(spec.warmup) || spec.warmup < 0) {
    throw new RangeError(`W11's warmup must be an integer ≥ 0, not ${spec.warmup}`);
  }
  if (spec.sizes.length === 0 || new Set(spec.sizes.map(sizeLabel)).size < spec.sizes.length) {
    throw new RangeError(`W11 needs distinct sizes, not [${spec.sizes.join(", ")}]`);
  }
  for (const size of spec.sizes) {
    if (!Number.isInteger(size) || size < spec.batch) {
      throw new RangeError(
        `W11 needs at least one batch (${spec.batch}) of ready jobs, not ${size}`,
      );
    }
  }
}

/** One size's database, its claiming connection and what its claims took. */
interface Queue {
  size: number;
  db: BenchDb;
  conn: Sql;
  loadInsertMs: number;
  loadVacuumMs: number;
  claimMs: number[];
  ackMs: number[];
  refillMs: number[];
}

/** One round's turn for `q`: claim a batch, ack it, refill; timed unless warming up. */
async function turn(q: Queue, spec: ClaimSpec, refill: JobSpec[], timed: boolean): Promise<void> {
  const t0 = performance.now();
  const { jobs } = await claim(q.conn, {
    queues: [QUEUE],
    limit: spec.batch,
    workerId: "bench w11",
    visibilityMs: VISIBILITY_MS,
    starting: CONSUMER_CONCURRENCY,
  });
  const t1 = performance.now();
  if (jobs.length !== spec.batch) {
    throw new Error(
      `A claim took ${jobs.length} of ${spec.batch} jobs from a queue of ${q.size} ready`,
    );
  }
  await ack(q.conn, jobs.map((j) => ({ id: j.id, token: j.token })));
  const t2 = performance.now();
  await enqueueMany(q.conn, refill, { notify: false });
  const t3 = performance.now();
  if (!timed) return;
  q.claimMs.push(t1 - t0);
  q.ackMs.push(t2 - t1);
  q.refillMs.push(t3 - t2);
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

/** Load every size's backlog, then claim at each in turn; one metric per size. */
export async function measureClaims(server: BenchServer, spec: ClaimSpec): Promise<RunResult> {
  checkClaimSpec(spec);
  const sizes = [...spec.sizes].sort((a, b) => a - b);
  const queues: Queue[] = [];
  try {
    for (const size of sizes) {
      const db = await freshDb(server, `w11 ${sizeLabel(size)}`);
      const conn = connect(db.url, { applicationName: "bench w11 claimer", max: 1 });
      const q: Queue = {
        size,
        db,
        conn,
        loadInsertMs: 0,
        loadVacuumMs: 0,
        claimMs: [],
        ackMs: [],
        refillMs: [],
      };
      queues.push(q);
      await migrate(db.sql, await loadMigrations());
      const load = await loadBacklog(db.sql, { queue: QUEUE, task: TASK, count: size });
      q.loadInsertMs = load.insertMs;
      q.loadVacuumMs = load.vacuumMs;
    }
    const refill: JobSpec[] = Array.from(
      { length: spec.batch },
      () => ({ task: TASK, queue: QUEUE, payload: {} }),
    );
    const start = performance.now();
    for (let round = 0; round < spec.warmup + spec.claims; round++) {
      for (let k = 0; k < queues.length; k++) {
        await turn(queues[(round + k) % queues.length]!, spec, refill, round >= spec.warmup);
      }
    }
    const loopS = (performance.now() - start) / 1000;
    const values: Record<string, number> = {};
    const details: Record<string, unknown> = {
      sizes: sizes.join(", "),
      batch: spec.batch,
      claims: spec.claims,
      warmup: spec.warmup,
      loop_s: loopS,
    };
    for (const q of queues) {
      const label = sizeLabel(q.size);
      values[claimKey(q.size)] = median(q.claimMs);
      const state = await tableState(q.db.sql);
      Object.assign(details, {
        [`${label}_claim_p90_ms`]: percentile(q.claimMs, 90),
        [`${label}_claim_p99_ms`]: percentile(q.claimMs, 99),
        [`${label}_claim_max_ms`]: Math.max(...q.claimMs),
        [`${label}_ack_ms`]: median(q.ackMs),
        [`${label}_refill_ms`]: median(q.refillMs),
        [`${label}_load_insert_s`]: q.loadInsertMs / 1000,
        [`${label}_load_vacuum_s`]: q.loadVacuumMs / 1000,
        ...Object.fromEntries(Object.entries(state).map(([k, v]) => [`${label}_${k}`, v])),
      });
    }
    details.largest_vs_smallest = values[claimKey(sizes[sizes.length - 1]!)]! /
      values[claimKey(sizes[0]!)]!;
    return { values, details };
  } finally {
    for (const q of queues) {
      await q.conn.end({ timeout: 5 });
      await q.db.drop();
    }
  }
}

/** W11 (shoal only: this tree's lib/queue.ts). */
export function claimBySize(spec: ClaimSpec): Benchmark {
  const sizes = [...spec.sizes].sort((a, b) => a - b);
  const metrics: Metric[] = sizes.map((n) => ({ key: claimKey(n), unit: "ms", better: "lower" }));
  return {
    id: "W11/shoal",
    workload: "W11",
    system: "shoal",
    title: `claim time with ${sizes.map((n) => n.toLocaleString("en-US")).join(", ")} ready jobs`,
    settings: "one database per size, its queue loaded in one insert … generate_series (then " +
      `vacuum analyze); per size one connection: claim() of ${spec.batch} (starting ` +
      `${CONSUMER_CONCURRENCY}), ack(), enqueueMany() of ${spec.batch} (NOTIFY off); the sizes ` +
      `take turns, one claim each per round; median wall time of ${spec.claims} claims per ` +
      `size after ${spec.warmup} rounds`,
    metrics,
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
  const spec: ClaimSpec = {
    sizes: integers(values.ready!, "ready").sort((a, b) => a - b),
    claims: integers(values.claims!, "claims")[0]!,
    warmup: integers(values.warmup!, "warmup")[0]!,
    batch: integers(values.batch!, "batch")[0]!,
  };
  checkClaimSpec(spec);
  const server = await startServer({ profile: false });
  try {
    say(`W11: ${spec.sizes.map((n) => n.toLocaleString("en-US")).join(", ")} ready jobs...`);
    const { values: v, details: d } = await measureClaims(server, spec);
    const first = v[claimKey(spec.sizes[0]!)]!;
    print("| ready | claim ms (median) | ÷ smallest | p90 | p99 | load s (insert + vacuum) |\n");
    print("| ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for (const size of spec.sizes) {
      const ms = v[claimKey(size)]!;
      const at = (key: string) => d[`${sizeLabel(size)}_${key}`] as number;
      print(
        `| ${size.toLocaleString("en-US")} | ${ms.toFixed(3)} | ${(ms / first).toFixed(2)}× | ${
          at("claim_p90_ms").toFixed(3)
        } | ${at("claim_p99_ms").toFixed(3)} | ${
          (at("load_insert_s") + at("load_vacuum_s")).toFixed(1)
        } |\n`,
      );
    }
  } finally {
    await server.stop();
  }
}

if (import.meta.main) {
  await standalone();
}
