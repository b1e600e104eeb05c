/**
 * `deno task bench`: shoal's benchmark beside its floors and peers, on one Postgres, in one run.
 *
 *   deno task bench                  3 runs of everything, median per figure; W5 5 runs
 *                                    (issue 14); the soaks (W8, W9) and W11 once: about 30
 *                                    minutes before issue 14's W5 sizes and W11 were added
 *                                    (1,835 s measured), 10 of them W8's soak
 *   deno task bench --runs 5         this many runs of everything (given explicitly, the
 *                                    soaks, W5 and W11 run that often too)
 *   deno task bench --quick          1 run at small sizes, short soaks: a smoke test of every
 *                                    workload in about 4 minutes
 *   deno task bench --only W2,W3     only these workloads, benchmark ids (W2/shoal) or
 *                                    systems (shoal, graphile-worker, pg-boss, bullmq,
 *                                    hand-written)
 *   deno task bench --soak 2m        W8's length (default 10m; 30s with --quick)
 *   deno task bench --soak-rate 5000 W8/W9's producer rate in jobs/s (default: 70% of W2/shoal's
 *                                    median in the same run, or of one calibration drain)
 *   deno task bench --profile        pg_stat_statements per run (preloaded: figures are
 *                                    not comparable; writes results/profile.* instead)
 *   deno task bench --beside main~1  also measure another commit (any git ref) as the
 *                                    system shoal@<short sha>, beside shoal, in the same run
 *
 * Comparing two commits (`--beside REF`): the ref is resolved with git (an unknown ref
 * ends the bench with one line on stderr before anything starts) and checked out into a
 * temporary detached worktree (`git worktree add --detach`), removed at the end, also on
 * failure or Ctrl-C. The system `shoal@<short sha>` runs that checkout's main.ts (and its
 * bench/bench_main.ts where jobs record their start) with the same flags as `shoal` and
 * the V8 flags of its own deno.json compile task; each of its runs gets a fresh database
 * installed by its own `main.ts migrate`, and its producers enqueue through its own
 * lib/queue.ts (loaded into this process, so its deno.json must map imports like ours).
 * It runs right beside shoal (after it on odd runs, before it on even ones) in W1a, W1b,
 * W2, W3, W5, W6, W7, W10 and W12; not in W4 (the fan-out driver is this tree's
 * lib/execution.ts) nor in the soaks W8, W9 (once per bench run: no spread to judge).
 * `--only W2,W3` selects both systems, `--only W2/shoal@abc1234` one figure. The report's
 * first table sets each figure beside the other commit's: both medians with every run's
 * value, shoal ÷ shoal@REF, and whether that ratio lies within the two systems' own
 * run-to-run spread (needs --runs 2 or more). docs/performance.md: "Comparing two commits".
 *
 * Workloads (bench/workloads.ts and the files it names):
 *   W1a enqueue one per call, 10 in flight   W1b enqueue in calls of 1,000
 *   W2  drain 20,000 with one consumer       W3  start latency at 100/s
 *   W4  fan-out of 10,000 children           W6  consumer RSS idle and under W2
 *   W5  noisy neighbour: key A holding 1,000, 50,000 and 1,000,000 ready jobs (W5/shoal/a1k,
 *       a50k, a1M), and a priority-1 job behind a full prefetch buffer (W5/shoal/priority)
 *   W7  1, 2, 4 and 8 consumer processes on one queue
 *   W8  soak at 70% of W2's rate (--soak)    W9  the same with a snapshot held open for 60 s
 *   W10 statements/s of an idle fleet (4 consumers, 2 reapers, 2 schedulers), on a second
 *       throwaway cluster with pg_stat_statements preloaded
 *   W11 one claim of 510 jobs with 10,000, 1,000,000 and 10,000,000 ready jobs (W11/shoal,
 *       metrics claim_ms_10k, _1M, _10M; each backlog loaded in one insert), claim + ack +
 *       refill in a loop, the three sizes taking turns
 *   W12 1,000 per-second schedules for 20 s and 10,000 due at once, 1 scheduler process
 *   W13 status --json and one /metrics scrape with 10,000,000 jobs (1,000,000 with --quick),
 *       once per bench run unless --runs is given (loading the table takes minutes)
 *   W15/steps 1,000 executions (100 with --quick) of 5 no-op durable steps, 1 consumer
 *       process; time per step set beside W2/shoal's time per job (issue 17: ≤ 2×)
 *   W15/steps/checkpoint the same with checkpoint steps ({ transaction: false }), recorded in
 *       batches across the consumer's running handlers
 *   W15 emit_event to the resumed handler's start (W15/shoal/emit, p50 and p99): 200 jobs
 *       (20 with --quick) each waiting on its own key, 1 consumer process, events emitted one
 *       at a time at 40/s (issue 17 calls it W13; W13 and W14 were taken)
 *
 * Uses DATABASE_URL when set; otherwise starts a throwaway cluster with Postgres's
 * defaults (fsync on) and stops it at the end. Writes bench/results/latest.md and
 * latest.json and prints the issue 14 and issue 5 target tables and the summary tables to
 * stdout; progress goes to stderr. Issue 14's targets (bench/issue14.ts) are listed
 * whether their workloads ran or not ("not run").
 *
 * Peers (issue 5, issue 14): graphile-worker, pg-boss and BullMQ on its PostgreSQL backend
 * (peers.ts) run W1a, W1b, W2, W3, W6, W7 and W10 beside shoal; their packages (and the
 * Node.js they need) are installed under bench/peers/ with `npm ci` when missing. Adding a system: implement `System` (systems.ts) and add it to
 * `plan()`; every workload then measures it the same way.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { handWritten } from "./handwritten.ts";
import {
  type BenchServer,
  errorChain,
  hasStatementStats,
  machineLoad,
  median,
  print,
  say,
  startServer,
  stopAllChildren,
} from "./harness.ts";
import { type Checkout, checkOut } from "./checkout.ts";
import { ensurePeersInstalled, PEER_SYSTEMS, PEER_VERSIONS } from "./peers.ts";
import { pgbenchClaim, pgbenchInsert } from "./pgbench.ts";
import {
  type BenchmarkResult,
  type BesideInput,
  besideTable,
  type Comparison,
  formatValue,
  issue14Table,
  issue15Table,
  type IssueTarget,
  jsonReport,
  markdownReport,
  type PeerComparison,
  peerTable,
  summaryTable,
  type Target,
  targetTable,
} from "./report.ts";
import { shoal, shoalAt, type System } from "./systems.ts";
import { noisyNeighbour, priorityBehindBuffer } from "./fairness.ts";
import { claimBySize, DEFAULT_CLAIM_BATCH } from "./claim_size.ts";
import { issue14Targets } from "./issue14.ts";
import { issue15Targets } from "./issue15.ts";
import { flowLimits } from "./flow.ts";
import { consumerMemory } from "./memory.ts";
import { PROCESS_COUNTS, processScaling } from "./scaling.ts";
import { FLAT_GROWTH, heldSnapshot, soak } from "./soak.ts";
import { FLEET, idleFleet } from "./idle.ts";
import { SCHEDULE_SIZES, schedulesAtScale } from "./schedules.ts";
import { countsAtScale } from "./counts.ts";
import { STEP_FORM_IDS, STEPS_TARGET, W15_STEPS, workflowSteps } from "./workflow_steps.ts";
import { eventLatency } from "./events.ts";
import {
  type BenchContext,
  type Benchmark,
  drain,
  enqueueBulk,
  enqueueOneByOne,
  fanOutDrain,
  type Sizes,
  type SoakSizes,
  startLatency,
} from "./workloads.ts";

const FULL: Sizes = {
  jobs: 20_000,
  bulkBatch: 1_000,
  latencyJobs: 2_000,
  latencyRate: 100,
  fanOutChildren: 10_000,
  neighbourSizes: [1_000, 50_000, 1_000_000],
  newcomerJobs: 100,
  priorityBacklog: 50_000,
  idleRssMs: 10_000,
  scalingJobs: 20_000,
  idleFleetMs: 30_000,
  claimSizes: [10_000, 1_000_000, 10_000_000],
  claimCount: 2_000,
  claimWarmup: 200,
  claimBatch: DEFAULT_CLAIM_BATCH,
  countsJobs: 10_000_000,
  stepExecutions: 1_000,
};
const QUICK: Sizes = {
  jobs: 2_000,
  bulkBatch: 1_000,
  latencyJobs: 200,
  latencyRate: 100,
  fanOutChildren: 1_000,
  neighbourSizes: [1_000, 5_000, 20_000],
  newcomerJobs: 100,
  priorityBacklog: 20_000,
  idleRssMs: 3_000,
  scalingJobs: 2_000,
  idleFleetMs: 5_000,
  claimSizes: [1_000, 10_000, 100_000],
  claimCount: 200,
  claimWarmup: 20,
  claimBatch: DEFAULT_CLAIM_BATCH,
  countsJobs: 1_000_000,
  stepExecutions: 100,
};
/** The soaks: W8 for `--soak`, W9's three phases (issue 5: a minute with the snapshot held). */
const SOAK_FULL: SoakSizes = {
  soakMs: 10 * 60_000,
  soakSampleMs: 10_000,
  holdBeforeMs: 30_000,
  holdMs: 60_000,
  holdAfterMs: 60_000,
  holdSampleMs: 5_000,
  rateShare: 0.7,
  fixedRate: null,
};
const SOAK_QUICK: SoakSizes = {
  soakMs: 30_000,
  soakSampleMs: 5_000,
  holdBeforeMs: 10_000,
  holdMs: 15_000,
  holdAfterMs: 15_000,
  holdSampleMs: 2_000,
  rateShare: 0.7,
  fixedRate: null,
};
/** Issue 5's W6 targets, MB. */
const RSS_IDLE_TARGET = 60;
const RSS_W2_TARGET = 120;
/** Issue 5's W4 target: time per child at most this many times W2's time per job. */
const FAN_OUT_TARGET = 1.5;
/** The W2 variant with more slots than the default. */
const HIGH_CONCURRENCY = 100;

interface Plan {
  benchmarks: Benchmark[];
  /** With `--beside`: each of shoal's benchmarks beside the other commit's. */
  besidePairs: { subject: string; beside: string }[];
  comparisons: Comparison[];
  peerComparisons: PeerComparison[];
  targets: Target[];
  issue14Targets: IssueTarget[];
  issue15Targets: IssueTarget[];
}

/** How the bench enqueues through each peer, for the report. */
const PEER_ENQUEUE: Record<string, string> = {
  "graphile-worker":
    "its SQL API on the bench's postgres.js pool (the same client as shoal): select graphile_worker.add_job(identifier, payload) per job (W1a, W3), graphile_worker.add_jobs(job_spec[]) per batch (W1b, W2's pre-enqueue); graphile-worker always sends a NOTIFY per call",
  "pg-boss":
    "its own client (new PgBoss({ max: pool size }), its own pg pool) in the bench process: boss.send(queue, data) per job (W1a, W3), boss.insert(queue, jobs) per batch (W1b, W2's pre-enqueue); the queue's notify option sends a NOTIFY per job",
  bullmq:
    "its own client (new Queue(name, { connection: pg.Pool of the pool size, search_path bullmq }, createPostgresBackend)) in the bench process: queue.add(name, data) per job (W1a, W3), queue.addBulk(jobs) per batch (W1b, W2's pre-enqueue, one statement per call); BullMQ always sends a NOTIFY per call and writes its event rows ('added', 'waiting') beside each job",
};

/** What to measure and which figure sits beside which floor (and which beside `beside`'s). */
function plan(sizes: Sizes, soakSizes: SoakSizes, beside: System | null): Plan {
  const besidePairs: { subject: string; beside: string }[] = [];
  // shoal's benchmark, then right after it the same one for the other commit (--beside),
  // so the two run in like conditions (runOrder swaps them on even runs).
  const shoalAndBeside = (make: (system: System) => Benchmark): Benchmark[] => {
    const mine = make(shoal);
    if (beside === null) return [mine];
    const theirs = make(beside);
    besidePairs.push({ subject: mine.id, beside: theirs.id });
    return [mine, theirs];
  };
  const floor = handWritten({ ack: false });
  const floorAck = handWritten({ ack: true });
  // The at-least-once floor with shoal's default batch (its claim takes at most its free
  // slots, 10 by default): separates the cost of small batches from shoal's own.
  const floorAck10 = handWritten({ ack: true, batch: 10 });
  const benchmarks: Benchmark[] = [
    ...shoalAndBeside((s) => enqueueOneByOne(s, { inFlight: 10, notify: true })),
    ...shoalAndBeside((s) => enqueueOneByOne(s, { inFlight: 10, notify: false })),
    enqueueOneByOne(floor, { inFlight: 10, notify: true }),
    enqueueOneByOne(floor, { inFlight: 10, notify: false }),
    pgbenchInsert({ clients: 10 }),
    ...shoalAndBeside((s) => enqueueBulk(s, { batch: sizes.bulkBatch })),
    enqueueBulk(floor, { batch: sizes.bulkBatch }),
    ...shoalAndBeside((s) => drain(s)),
    // Right after W2/shoal, which its target sets it beside (issue 15: ≥ 0.9×).
    drain(shoal, { limit: 1_000_000 }),
    // Right after W2/shoal (and the other commit's W2), so the figure it is set beside ran
    // in similar conditions.
    fanOutDrain(shoal),
    // Also set beside W2/shoal of the same run (issue 17: time per step ≤ 2× W2's per job).
    workflowSteps(),
    workflowSteps("checkpoint"),
    ...shoalAndBeside((s) => drain(s, { concurrency: HIGH_CONCURRENCY })),
    // Right after W2/shoal/c100, which they are set beside.
    workflowSteps("transaction", HIGH_CONCURRENCY),
    workflowSteps("checkpoint", HIGH_CONCURRENCY),
    drain(floor),
    drain(floorAck),
    drain(floorAck10),
    pgbenchClaim({ batch: 1, clients: 10 }),
    pgbenchClaim({ batch: 100, clients: 1 }),
    ...shoalAndBeside((s) => startLatency(s)),
    startLatency(floor),
    ...sizes.neighbourSizes.flatMap((n) =>
      shoalAndBeside((s) => noisyNeighbour(s, n, sizes.newcomerJobs))
    ),
    ...shoalAndBeside((s) => priorityBehindBuffer(s, sizes.priorityBacklog)),
    ...shoalAndBeside((s) => consumerMemory(s)),
    ...PROCESS_COUNTS.flatMap((n) => shoalAndBeside((s) => processScaling(s, n))),
    ...shoalAndBeside((s) => idleFleet(s)),
    idleFleet(shoal, { limited: true }),
    ...shoalAndBeside((s) => flowLimits(s)),
    ...shoalAndBeside((s) => schedulesAtScale(s)),
    // shoal only: the claim loop runs this tree's lib/queue.ts in the bench process.
    claimBySize({
      sizes: sizes.claimSizes,
      claims: sizes.claimCount,
      warmup: sizes.claimWarmup,
      batch: sizes.claimBatch,
    }),
    // This tree only: it times this tree's status().
    countsAtScale(shoal, sizes.countsJobs),
    // This tree only (ctx.waitForEvent, emit_event): a tenth of W3's jobs, each waiting.
    eventLatency(shoal, sizes.latencyJobs / 10),
    // The soaks after every shorter shoal figure: W8 takes its rate from W2's.
    soak(shoal),
    heldSnapshot(shoal),
    // The peers last, workload by workload, so a failing peer cannot delay shoal's figures.
    ...PEER_SYSTEMS.map((peer) => enqueueOneByOne(peer, { inFlight: 10, notify: true })),
    ...PEER_SYSTEMS.map((peer) => enqueueBulk(peer, { batch: sizes.bulkBatch })),
    ...PEER_SYSTEMS.map((peer) => drain(peer)),
    ...PEER_SYSTEMS.map((peer) => startLatency(peer)),
    ...PEER_SYSTEMS.map((peer) => consumerMemory(peer)),
    ...PEER_SYSTEMS.flatMap((peer) => PROCESS_COUNTS.map((n) => processScaling(peer, n))),
    ...PEER_SYSTEMS.map((peer) => idleFleet(peer)),
  ];
  const n = sizes.jobs.toLocaleString("en-US");
  const bulk = sizes.bulkBatch.toLocaleString("en-US");
  const w1a = `W1a enqueue ${n}, 1 per call, 10 in flight`;
  const w2 = `W2 drain ${n} no-op jobs, 1 consumer process`;
  const w3 = `W3 start latency, ${
    sizes.latencyJobs.toLocaleString("en-US")
  } jobs at ${sizes.latencyRate}/s`;
  const w4 = `W4 fan-out of ${
    sizes.fanOutChildren.toLocaleString("en-US")
  } no-op children + 1 callback, 1 consumer process`;
  const defaults = "shoal consumer defaults (concurrency 10, LISTEN, poll 2s)";
  const w4Settings = `${defaults}, same as W2 · started with startExecution("shoal.chord") ` +
    `before the consumer · issue 5 target: ≤ ${FAN_OUT_TARGET.toFixed(2)}× W2's time per job`;
  const comparisons: Comparison[] = [
    {
      label: w1a,
      subject: "W1a/shoal",
      floor: "W1a/pgbench",
      floorLabel: "pgbench bare 1-row INSERT, 10 clients",
      metric: "rate",
      settings: "pool of 10, NOTIFY on (default) · pgbench -M prepared -c 10",
    },
    {
      label: w1a,
      subject: "W1a/shoal",
      floor: "W1a/hand-written",
      floorLabel: "hand-written INSERT + pg_notify, same client",
      metric: "rate",
      settings: "both: postgres.js pool of 10, NOTIFY on",
    },
    {
      label: `${w1a}, NOTIFY off`,
      subject: "W1a/shoal/no-notify",
      floor: "W1a/hand-written/no-notify",
      floorLabel: "hand-written INSERT, same client",
      metric: "rate",
      settings: "both: postgres.js pool of 10, NOTIFY off",
    },
    {
      label: `W1b enqueue ${n} in calls of ${bulk}`,
      subject: "W1b/shoal",
      floor: "W1b/hand-written",
      floorLabel: `hand-written INSERT … unnest(), ${bulk} rows/call`,
      metric: "rate",
      settings: "one call at a time, NOTIFY on",
    },
    {
      label: w2,
      subject: "W2/shoal",
      floor: "W2/hand-written",
      floorLabel: "hand-written delete…returning 100/statement",
      metric: "rate",
      settings: `${defaults} · floor: 1 process, at-most-once`,
    },
    {
      label: w2,
      subject: "W2/shoal",
      floor: "W2/hand-written claim+ack",
      floorLabel: "hand-written claim (update) + ack (delete), 100/batch",
      metric: "rate",
      settings: `${defaults} · floor: 1 process, 2 statements per batch`,
    },
    {
      label: w2,
      subject: "W2/shoal",
      floor: "W2/hand-written claim+ack b10",
      floorLabel: "hand-written claim + ack, 10/batch",
      metric: "rate",
      settings: `${defaults} · floor: same batch size as shoal's default`,
    },
    {
      label: w2,
      subject: "W2/shoal",
      floor: "W2/pgbench/b1",
      floorLabel: "pgbench SKIP LOCKED claim+delete, 1 row/txn, 10 clients",
      metric: "rate",
      settings: `${defaults} · pgbench -M prepared -c 10`,
    },
    {
      label: w2,
      subject: "W2/shoal",
      floor: "W2/pgbench/b100",
      floorLabel: "pgbench SKIP LOCKED claim+delete, 100 rows/txn, 1 client",
      metric: "rate",
      settings: `${defaults} · pgbench -M prepared -c 1`,
    },
    {
      label: `${w2}, --concurrency ${HIGH_CONCURRENCY}`,
      subject: `W2/shoal/c${HIGH_CONCURRENCY}`,
      floor: "W2/hand-written claim+ack",
      floorLabel: "hand-written claim + ack, 100/batch",
      metric: "rate",
      settings: `shoal defaults but --concurrency ${HIGH_CONCURRENCY} · floor as above`,
    },
    {
      label: `${w4}: time per child`,
      subject: "W4/shoal",
      metric: "ms_per_child",
      metricInLabel: false,
      floor: "W2/shoal",
      floorMetric: "ms_per_job",
      floorLabel: `W2 drain, same run: shoal's time per plain job`,
      settings: w4Settings,
    },
    {
      label: `${w4}: throughput`,
      subject: "W4/shoal",
      metric: "rate",
      floor: "W2/shoal",
      floorLabel: "W2 drain, same run: shoal's plain jobs/s",
      settings: `${defaults}, same as W2 · ratio ≥ ${(1 / FAN_OUT_TARGET).toFixed(2)}× meets ` +
        "the target",
    },
    ...[undefined, HIGH_CONCURRENCY].flatMap((concurrency) =>
      (["transaction", "checkpoint"] as const).map((form) => ({
        label: `W15 ${
          sizes.stepExecutions.toLocaleString("en-US")
        } executions of ${W15_STEPS} no-op ${
          form === "checkpoint" ? "checkpoint steps ({ transaction: false })" : "steps"
        }, 1 consumer process${
          concurrency === undefined ? "" : ` of concurrency ${concurrency}`
        }: time per step`,
        subject: concurrency === undefined
          ? STEP_FORM_IDS[form]
          : `${STEP_FORM_IDS[form]}/c${concurrency}`,
        metric: "ms_per_step",
        metricInLabel: false,
        floor: concurrency === undefined ? "W2/shoal" : `W2/shoal/c${concurrency}`,
        floorMetric: "ms_per_job",
        floorLabel: concurrency === undefined
          ? "W2 drain, same run: shoal's time per plain job"
          : `W2 drain at concurrency ${concurrency}, same run: shoal's time per plain job`,
        settings: `${defaults}, same as W2${
          concurrency === undefined ? "" : ` but --concurrency ${concurrency}`
        }, and the bench entry (bench.steps${
          form === "checkpoint" ? " {checkpoint: true}" : ""
        }) · issue 17 goal: ≤ ${STEPS_TARGET.toFixed(2)}× W2's time per job`,
      }))
    ),
    ...(["p50", "p95", "p99"] as const).map((metric) => ({
      label: w3,
      subject: "W3/shoal",
      floor: "W3/hand-written",
      floorLabel: "hand-written LISTEN + delete…returning consumer",
      metric,
      settings: `${defaults} · producer: 1 job per call, open loop, NOTIFY on`,
    })),
  ];
  const peerIds = (workload: string) => PEER_SYSTEMS.map((p) => `${workload}/${p.name}`);
  const peerComparisons: PeerComparison[] = [
    { label: w1a, metric: "rate", subject: "W1a/shoal", peers: peerIds("W1a") },
    {
      label: `W1b enqueue ${n} in calls of ${bulk}`,
      metric: "rate",
      subject: "W1b/shoal",
      peers: peerIds("W1b"),
    },
    { label: w2, metric: "rate", subject: "W2/shoal", peers: peerIds("W2") },
    ...(["p50", "p95", "p99"] as const).map((metric) => ({
      label: w3,
      metric,
      subject: "W3/shoal",
      peers: peerIds("W3"),
    })),
  ];
  const w6 = "W6 consumer RSS, 1 process";
  const w7 = `W7 drain ${sizes.scalingJobs.toLocaleString("en-US")} jobs`;
  peerComparisons.push(
    ...(["idle_peak_mb", "w2_peak_mb"] as const).map((metric) => ({
      label: w6,
      metric,
      subject: "W6/shoal",
      peers: peerIds("W6"),
    })),
    ...PROCESS_COUNTS.map((n) => ({
      label: `${w7}, ${n} consumer process${n === 1 ? "" : "es"}`,
      metric: "rate",
      subject: `W7/shoal/p${n}`,
      peers: PEER_SYSTEMS.map((p) => `W7/${p.name}/p${n}`),
    })),
    {
      label: "W10 idle fleet (peers: 4 workers)",
      metric: "statements_per_s",
      subject: "W10/shoal",
      peers: peerIds("W10"),
    },
  );
  return {
    benchmarks,
    besidePairs,
    comparisons,
    peerComparisons,
    targets: targets(soakSizes, shoal),
    issue14Targets: issue14Targets(sizes, soakSizes, PEER_SYSTEMS.map((p) => p.name)),
    issue15Targets: issue15Targets(),
  };
}

function fmt(value: number, digits = 0): string {
  return Number.isNaN(value) ? "n/a" : value.toFixed(digits);
}

/** The best peer's median of `key` for `workload` (by the direction given), NaN when none ran. */
function bestPeerFigure(
  figure: (id: string, key: string) => number,
  workload: string,
  key: string,
  better: "higher" | "lower",
): number {
  const values = PEER_SYSTEMS.map((p) => figure(`${workload}/${p.name}`, key)).filter((v) =>
    !Number.isNaN(v)
  );
  if (values.length === 0) return Number.NaN;
  return better === "higher" ? Math.max(...values) : Math.min(...values);
}

/** True/false when every figure was measured, else null (not measured). */
function judge(figures: number[], met: () => boolean): boolean | null {
  return figures.some((f) => Number.isNaN(f)) ? null : met();
}

/**
 * Issue 5's targets, each judged on this run's medians. W5's (fewer than 2 × concurrency A
 * jobs) is judged at every backlog in issue 14's (bench/issue14.ts).
 */
function targets(soakSizes: SoakSizes, system: System): Target[] {
  const s = system.name;
  const held = soakSizes.holdMs / 1000;
  return [
    {
      workload: "W1a",
      target: "≥ 1.5× the best peer",
      check(figure) {
        const me = figure(`W1a/${s}`, "rate");
        const peer = bestPeerFigure(figure, "W1a", "rate", "higher");
        return {
          measured: `${fmt(me)} vs best peer ${fmt(peer)} jobs/s: ${fmt(me / peer, 2)}×`,
          met: judge([me, peer], () => me >= 1.5 * peer),
        };
      },
    },
    {
      workload: "W1b",
      target: "≥ 1.2× the best peer and ≥ 0.8× the hand-written floor",
      check(figure) {
        const me = figure(`W1b/${s}`, "rate");
        const peer = bestPeerFigure(figure, "W1b", "rate", "higher");
        const floor = figure("W1b/hand-written", "rate");
        return {
          measured: `${fmt(me / peer, 2)}× best peer, ${fmt(me / floor, 2)}× floor`,
          met: judge([me, peer, floor], () => me >= 1.2 * peer && me >= 0.8 * floor),
        };
      },
    },
    {
      workload: "W2",
      target: "≥ 2.0× the best peer and ≥ 25% of the pgbench 100-row claim floor",
      check(figure) {
        const me = figure(`W2/${s}`, "rate");
        const peer = bestPeerFigure(figure, "W2", "rate", "higher");
        const floor = figure("W2/pgbench/b100", "rate");
        return {
          measured: `${fmt(me / peer, 2)}× best peer, ${fmt((100 * me) / floor)}% of the floor`,
          met: judge([me, peer, floor], () => me >= 2 * peer && me >= 0.25 * floor),
        };
      },
    },
    {
      workload: "W3",
      target: "p50 ≤ the hand-written floor's and ≤ 0.7× the best peer's; p99 ≤ 10 ms",
      check(figure) {
        const p50 = figure(`W3/${s}`, "p50");
        const p99 = figure(`W3/${s}`, "p99");
        const floor = figure("W3/hand-written", "p50");
        const peer = bestPeerFigure(figure, "W3", "p50", "lower");
        return {
          measured: `p50 ${fmt(p50, 2)} ms (floor ${fmt(floor, 2)}, best peer ${
            fmt(peer, 2)
          }), p99 ${fmt(p99, 2)} ms`,
          met: judge([p50, p99, floor, peer], () => p50 <= floor && p50 <= 0.7 * peer && p99 <= 10),
        };
      },
    },
    {
      workload: "W4",
      target: `time per child ≤ ${FAN_OUT_TARGET}× W2's time per job`,
      check(figure) {
        const child = figure(`W4/${s}`, "ms_per_child");
        const job = figure(`W2/${s}`, "ms_per_job");
        return {
          measured: `${fmt(child, 3)} vs ${fmt(job, 3)} ms: ${fmt(child / job, 2)}×`,
          met: judge([child, job], () => child <= FAN_OUT_TARGET * job),
        };
      },
    },
    {
      workload: "W6",
      target:
        `idle RSS ≤ ${RSS_IDLE_TARGET} MB, under W2 ≤ ${RSS_W2_TARGET} MB (judged on the peaks)`,
      check(figure) {
        const idle = figure(`W6/${s}`, "idle_peak_mb");
        const busy = figure(`W6/${s}`, "w2_peak_mb");
        return {
          measured: `idle peak ${fmt(idle, 1)} MB, under W2 peak ${fmt(busy, 1)} MB`,
          met: judge([idle, busy], () => idle <= RSS_IDLE_TARGET && busy <= RSS_W2_TARGET),
        };
      },
    },
    {
      workload: "W7",
      target: "4 processes ≥ 1 process (no convoy on 2 cores)",
      check(figure) {
        const one = figure(`W7/${s}/p1`, "rate");
        const two = figure(`W7/${s}/p2`, "rate");
        const four = figure(`W7/${s}/p4`, "rate");
        const eight = figure(`W7/${s}/p8`, "rate");
        return {
          measured: `1: ${fmt(one)}, 2: ${fmt(two)}, 4: ${fmt(four)}, 8: ${fmt(eight)} jobs/s ` +
            `(4 ÷ 1 = ${fmt(four / one, 2)}×, 8 ÷ 1 = ${fmt(eight / one, 2)}×)`,
          met: judge([one, four], () => four >= one),
        };
      },
    },
    {
      workload: "W8",
      target: `last-minute throughput within 10% of the first minute's; table size flat once ` +
        `steady (late ≤ ${FLAT_GROWTH}× early)`,
      check(figure) {
        const ratio = figure(`W8/${s}`, "last_vs_first");
        const growth = figure(`W8/${s}`, "size_growth");
        return {
          measured: `last ÷ first ${fmt(ratio, 2)}×, table late ÷ early ${fmt(growth, 2)}×`,
          met: judge(
            [ratio, growth],
            () => Math.abs(ratio - 1) <= 0.1 && growth <= FLAT_GROWTH,
          ),
        };
      },
    },
    {
      workload: "W9",
      target: `throughput while a snapshot is held ${held} s ≥ 80% of W8's; backlog back ` +
        "to the baseline's within 30 s of its end",
      check(figure) {
        const ratio = figure(`W9/${s}`, "held_vs_w8");
        const recovery = figure(`W9/${s}`, "recovery_s");
        return {
          measured: `${fmt(100 * ratio)}% of the reference rate, recovered in ${
            Number.isNaN(recovery) ? "never (within the after phase)" : `${fmt(recovery, 1)} s`
          }`,
          met: Number.isNaN(ratio)
            ? null
            : ratio >= 0.8 && !Number.isNaN(recovery) && recovery <= 30,
        };
      },
    },
    {
      workload: "W10",
      target: `≤ 2 statements/s in all from an idle fleet (${FLEET.consumers} consumers, ` +
        `${FLEET.reapers} reapers, ${FLEET.schedulers} schedulers)`,
      check(figure) {
        const rate = figure(`W10/${s}`, "statements_per_s");
        return {
          measured: `${fmt(rate, 2)} statements/s`,
          met: judge([rate], () => rate <= 2),
        };
      },
    },
    {
      workload: "W12",
      target: `${SCHEDULE_SIZES.schedules.toLocaleString("en-US")} per-second schedules: ` +
        "every slot fired, p99 lag ≤ 1 s; ceiling ≥ 10,000 fires/s",
      check(figure) {
        const missed = figure(`W12/${s}`, "missed");
        const lag = figure(`W12/${s}`, "p99_lag_ms");
        const ceiling = figure(`W12/${s}`, "ceiling");
        return {
          measured: `${fmt(missed)} missed, p99 lag ${fmt(lag)} ms, ${fmt(ceiling)} fires/s`,
          met: judge(
            [missed, lag, ceiling],
            () => missed === 0 && lag <= 1000 && ceiling >= 10_000,
          ),
        };
      },
    },
  ];
}

export interface Args {
  runs: number;
  /** --runs was given: the soaks run that many times too. */
  runsExplicit: boolean;
  quick: boolean;
  profile: boolean;
  only: string[];
  /** --soak, ms. */
  soakMs: number | null;
  /** --soak-rate, jobs/s. */
  soakRate: number | null;
  /** --beside: a git ref to measure beside this tree. */
  beside: string | null;
}

const DURATION = /^(\d+(?:\.\d+)?)(ms|s|m|h)$/;
const DURATION_UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

function parseSoak(text: string): number {
  const match = DURATION.exec(text.trim());
  const ms = match ? Number(match[1]) * DURATION_UNITS[match[2]!]! : Number.NaN;
  if (!(ms >= 10_000 && ms <= 24 * 3_600_000)) {
    throw new Error(
      `Invalid --soak "${text}": expected a duration from 10s to 24h, like 90s or 10m`,
    );
  }
  return Math.round(ms);
}

function parse(argv: string[]): Args {
  const { values } = parseArgs({
    args: argv,
    options: {
      runs: { type: "string" },
      quick: { type: "boolean", default: false },
      profile: { type: "boolean", default: false },
      only: { type: "string" },
      soak: { type: "string" },
      "soak-rate": { type: "string" },
      beside: { type: "string" },
      help: { type: "boolean", default: false },
    },
    strict: true,
  });
  if (values.help) {
    print(
      "Usage: deno task bench [--runs N] [--quick] [--only W1a,W2,W5/shoal/a1M,...] " +
        "[--soak 10m] [--soak-rate JOBS_PER_S] [--profile] [--beside GIT_REF]\n" +
        "Workloads: W1a W1b W2 W3 W4 W5 W6 W7 W8 W9 W10 W11 W12 W13 W14 W15 (see bench/run.ts); " +
        "W5 runs 5 times and W8, W9, W11 once unless --runs is given\n",
    );
    Deno.exit(0);
  }
  const runs = values.runs === undefined ? (values.quick ? 1 : 3) : Number(values.runs);
  if (!Number.isInteger(runs) || runs < 1 || runs > 50) {
    throw new Error(`Invalid --runs "${values.runs}": expected an integer from 1 to 50`);
  }
  const only = values.only ? values.only.split(",").map((s) => s.trim()).filter(Boolean) : [];
  const soakRate = values["soak-rate"] === undefined ? null : Number(values["soak-rate"]);
  if (soakRate !== null && !(Number.isFinite(soakRate) && soakRate >= 1 && soakRate <= 1e6)) {
    throw new Error(
      `Invalid --soak-rate "${values["soak-rate"]}": expected jobs per second from 1 to 1000000`,
    );
  }
  return {
    runs,
    runsExplicit: values.runs !== undefined,
    quick: values.quick,
    profile: values.profile,
    only,
    soakMs: values.soak === undefined ? null : parseSoak(values.soak),
    soakRate,
    beside: values.beside ?? null,
  };
}

function soakSizes(args: Args): SoakSizes {
  const base = args.quick ? SOAK_QUICK : SOAK_FULL;
  return { ...base, soakMs: args.soakMs ?? base.soakMs, fixedRate: args.soakRate };
}

/** How the soaks and W10 ran, for the report's list of workloads. */
function soakNotes(soakSizes: SoakSizes, statementsServer: string): string[] {
  const s = (ms: number) => `${ms / 1000} s`;
  const rate = soakSizes.fixedRate !== null
    ? `${soakSizes.fixedRate} jobs/s (--soak-rate)`
    : `${Math.round(soakSizes.rateShare * 100)}% of W2/shoal's median rate measured earlier ` +
      "in the same bench run (or of one W2 drain run for calibration when W2 is not selected)";
  return [
    `W8 (soak): one consumer process (defaults) under a steady producer at ${rate}, for ` +
    `${s(soakSizes.soakMs)}, sampled every ${s(soakSizes.soakSampleMs)}: jobs done ` +
    "(rows deleted from shoal.jobs since the soak began, from the server's statistics, " +
    "pg_stat_get_tuples_deleted: usually a second behind, up to 10 s for a backend gone " +
    "idle; not a count(*), which scans every dead row), backlog (committed by the producer " +
    "minus done), pg_total_relation_size " +
    "of shoal.jobs (indexes and TOAST included), live and dead tuples and autovacuum count " +
    "(pg_stat_user_tables). Rate = the median of the samples' done/s; last ÷ first compares " +
    "the first and last minute (quarters when the soak is shorter than 4 minutes); table " +
    "late ÷ early compares the largest size in the last quarter with the largest in the " +
    "second quarter. Runs once per bench run unless --runs is given explicitly. Peers are " +
    "not measured (a 10-minute soak each would triple the full run).",
    `W9 (snapshot held open): the same producer rate and consumer; a baseline of ` +
    `${s(soakSizes.holdBeforeMs)}, then another session holds \`begin isolation level ` +
    "repeatable read; select … from pg_catalog.pg_class\` open (idle in transaction, its " +
    `backend_xmin recorded) for ${s(soakSizes.holdMs)}, then ${
      s(soakSizes.holdAfterMs)
    } after its commit; sampled every ${s(soakSizes.holdSampleMs)}. Held rate = jobs done ` +
    "per second while it was open, set beside W8's median rate from the same bench run (or " +
    "W9's own baseline when W8 did not run). Recovery = seconds from its commit until the " +
    "backlog is back under twice the baseline's largest backlog (at least half a second of " +
    "jobs), at the sampling resolution; n/a when it never got there within the after phase. " +
    "Runs once per bench run unless --runs is given explicitly; peers not measured.",
    `W10 (idle fleet): ${statementsServer}. shoal: ${FLEET.consumers} consumers, ` +
    `${FLEET.reapers} reapers and ${FLEET.schedulers} schedulers (main.ts --role …, ` +
    "defaults); peers: 4 worker processes each (their maintenance and cron run inside). " +
    "Counters reset 3 s after the last process logged its start; top-level statements of " +
    "the run's database only, the bench's own statements excluded.",
  ];
}

function selected(benchmark: Benchmark, only: string[]): boolean {
  return only.length === 0 ||
    only.some((o) =>
      benchmark.workload === o || benchmark.system === o || benchmark.id === o ||
      benchmark.id.startsWith(`${o}/`)
    );
}

function describe(benchmark: Benchmark, result: BenchmarkResult): string {
  const last = result.runs.at(-1);
  if (!last) return "no result";
  return benchmark.metrics.map((m) => {
    const v = last.values[m.key] ?? Number.NaN;
    return `${m.key} ${formatValue(v, m.unit)}`;
  }).join(", ");
}

/** The commit measured, and whether lib/ or sql/ held uncommitted changes (read-only git). */
async function sourceState(): Promise<string> {
  const git = async (args: string[]): Promise<string | null> => {
    const out = await new Deno.Command("git", {
      args,
      cwd: new URL("../", import.meta.url),
      stdout: "piped",
      stderr: "null",
    }).output().catch((error: unknown) => {
      // No git on this machine: the report says so instead of failing the benchmark.
      if (error instanceof Deno.errors.NotFound) return null;
      throw error;
    });
    return out?.success ? new TextDecoder().decode(out.stdout).trim() : null;
  };
  const head = await git(["rev-parse", "--short", "HEAD"]);
  if (head === null) return "unknown (not a git checkout)";
  const dirty = await git(["status", "--porcelain", "--", "lib", "sql", "main.ts"]);
  const changed = dirty ? dirty.split("\n").length : 0;
  return changed === 0
    ? `commit ${head}, lib/ and sql/ clean`
    : `commit ${head} plus ${changed} uncommitted change(s) in lib/, sql/ or main.ts`;
}

async function environment(
  server: BenchServer,
  checkout: Checkout | null,
): Promise<Record<string, string>> {
  const beside: Record<string, string> = checkout === null ? {} : {
    beside: `shoal@${checkout.short}: --beside ${checkout.ref} = commit ${checkout.sha}, ` +
      `a detached git worktree in ${checkout.dir} (removed at the end)`,
  };
  return {
    source: await sourceState(),
    ...beside,
    machine:
      `${navigator.hardwareConcurrency} CPUs, ${Deno.build.os} ${Deno.build.arch}, shared with other work`,
    "load average at start": await machineLoad(),
    deno: Deno.version.deno,
    "postgres client": "postgres.js (npm:postgres, pinned in deno.json)",
    peers: Object.entries(PEER_VERSIONS).map(([name, version]) => `${name} ${version}`).join(
      ", ",
    ) + " (pinned in bench/peers/package.json and its lockfile; node is the npm package)",
    "server": server.owned
      ? "throwaway cluster from lib/local_pg.ts startLocalPg() (not fast mode): initdb --auth=trust -E UTF8 --locale=C, run as the postgres OS user, TCP on 127.0.0.1"
      : "DATABASE_URL",
  };
}

async function runAll(args: Args, checkout: Checkout | null): Promise<number> {
  const sizes = args.quick ? QUICK : FULL;
  const soaks = soakSizes(args);
  const besideSystem = checkout === null ? null : await shoalAt(checkout);
  const {
    benchmarks,
    besidePairs,
    comparisons,
    peerComparisons,
    targets,
    issue14Targets,
    issue15Targets,
  } = plan(
    sizes,
    soaks,
    besideSystem,
  );
  const chosen = benchmarks.filter((b) => selected(b, args.only));
  if (chosen.length === 0) {
    const beside = besideSystem === null ? "" : ` (the other commit is ${besideSystem.name})`;
    throw new Error(`--only ${args.only.join(",")} matches no benchmark${beside}`);
  }
  const peersChosen = PEER_SYSTEMS.filter((p) => chosen.some((b) => b.system === p.name));
  if (peersChosen.length > 0) await ensurePeersInstalled();
  const startedAt = new Date();
  const t0 = performance.now();
  say(Deno.env.get("DATABASE_URL") ? "Using DATABASE_URL..." : "Starting a throwaway Postgres...");
  const server = await startServer({ profile: args.profile });
  // W10's server with pg_stat_statements: started on first use, stopped with the rest.
  let statements: Promise<BenchServer> | null = null;
  let statementsNote = "not run";
  const statementsServer = (): Promise<BenchServer> => {
    statements ??= (async () => {
      if (args.profile || !server.owned) {
        if (!await hasStatementStats(server.url)) {
          throw new Error(
            "W10 needs pg_stat_statements in shared_preload_libraries of the DATABASE_URL server",
          );
        }
        statementsNote = "on the benchmark's own server (pg_stat_statements already preloaded)";
        return server;
      }
      say("Starting a second throwaway Postgres with pg_stat_statements for W10...");
      const started = await startServer({ profile: true, track: "top" });
      statementsNote = "on a second throwaway cluster like the first, plus " +
        "shared_preload_libraries = pg_stat_statements, pg_stat_statements.track = top";
      return started;
    })();
    return statements;
  };
  const stopEverything = async () => {
    await stopAllChildren();
    if (statements) {
      const second = await statements.catch(() => null); // its failure was reported by W10
      if (second && second !== server) await second.stop();
    }
    await server.stop();
  };
  let interrupted = false;
  // Once interrupted, the workload still running loses its connections as Postgres
  // stops; those rejections are expected and must not end the process before cleanup.
  const onRejection = (event: PromiseRejectionEvent) => {
    if (interrupted) event.preventDefault();
  };
  // Deno.exit skips `finally` blocks: the checkout (--beside) is removed here too.
  const removeBeside = () => checkout === null ? Promise.resolve() : removeCheckout(checkout);
  const onSignal = () => {
    if (interrupted) {
      removeBeside().finally(() => Deno.exit(130));
      return;
    }
    interrupted = true;
    say("Interrupted: stopping consumers and Postgres (again to exit at once)");
    stopEverything().finally(removeBeside).finally(() => Deno.exit(130));
  };
  globalThis.addEventListener("unhandledrejection", onRejection);
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  let failures = 0;
  try {
    const env = await environment(server, checkout);
    const results: BenchmarkResult[] = chosen.map((benchmark) => ({
      benchmark,
      runs: [],
      errors: [],
    }));
    const ctx: BenchContext = {
      server,
      sizes,
      profile: args.profile,
      soak: soaks,
      figure(id, key) {
        const result = results.find((r) => r.benchmark.id === id);
        const values = (result?.runs ?? []).map((r) => r.values[key]).filter((v): v is number =>
          v !== undefined
        );
        return median(values);
      },
      statementsServer,
    };
    // Runs are interleaved (run 1 of everything, then run 2 ...) so a burst of load from
    // elsewhere on this shared machine spreads over all figures instead of sinking one.
    // Rounds beyond a benchmark's own count (W5's 5 against the others' 3) skip it.
    const runs = Math.max(...chosen.map((b) => runsOf(b, args)));
    for (let run = 1; run <= runs; run++) {
      for (const result of runOrder(results, besidePairs, run)) {
        const b = result.benchmark;
        if (run > runsOf(b, args)) continue;
        try {
          const measured = await b.run(ctx);
          // The machine is shared: keep how busy it was, so a noisy run can be told apart.
          measured.details.load_1m = Number((await machineLoad()).split(" ")[0]);
          result.runs.push(measured);
          say(`[run ${run}/${runs}] ${b.id}: ${describe(b, result)}`);
        } catch (error) {
          failures++;
          const message = error instanceof Error ? error.message : String(error);
          result.errors.push(`run ${run}: ${message.split("\n")[0]}`);
          say(`[run ${run}/${runs}] ${b.id} FAILED: ${message}`);
        }
      }
    }
    env["load average at end"] = await machineLoad();
    if (statements) env["W10 server"] = statementsNote;
    const input = {
      command: ["deno task bench", ...Deno.args].join(" "),
      startedAt,
      seconds: (performance.now() - t0) / 1000,
      runs,
      quick: args.quick,
      profile: args.profile,
      sizes,
      server,
      environment: env,
      results,
      comparisons: comparisons.filter((c) =>
        results.some((r) => r.benchmark.id === c.subject) ||
        results.some((r) => r.benchmark.id === c.floor)
      ),
      // A row needs a peer's figure: shoal's own are in the other tables.
      peerComparisons: peerComparisons.filter((c) =>
        results.some((r) => c.peers.includes(r.benchmark.id))
      ),
      peers: peersChosen.map((p) => ({
        name: p.name,
        settings: p.defaultSettings,
        enqueue: PEER_ENQUEUE[p.name] ?? "not stated",
      })),
      targets: targets.filter((t) => results.some((r) => r.benchmark.workload === t.workload)),
      issue14Targets,
      issue15Targets,
      soakNotes: soakNotes(soaks, statementsNote),
      beside: besideInput(checkout, besidePairs, results),
    };
    const dir = new URL("results/", import.meta.url);
    await Deno.mkdir(dir, { recursive: true });
    const base = args.profile ? "profile" : "latest";
    await Deno.writeTextFile(new URL(`${base}.md`, dir), markdownReport(input));
    await Deno.writeTextFile(
      new URL(`${base}.json`, dir),
      JSON.stringify(jsonReport(input), null, 2) + "\n",
    );
    const peers = peerTable(input);
    const beside = besideTable(input);
    print(
      "\n" + (beside ? `${beside}\n` : "") + issue14Table(input) + "\n" + issue15Table(input) +
        "\n" + targetTable(input) +
        "\n" + (peers ? `${peers}\n` : "") + summaryTable(input),
    );
    say(`Wrote bench/results/${base}.md and ${base}.json (${input.seconds.toFixed(0)} s)`);
  } finally {
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
    globalThis.removeEventListener("unhandledrejection", onRejection);
    await stopEverything();
  }
  return failures === 0 ? 0 : 1;
}

/**
 * How many times `benchmark` runs in this bench run: `--runs` when given; otherwise once
 * for the soaks and W11 (`once`) and in `--quick`, else its own count (W5: 5) or 3.
 */
export function runsOf(
  benchmark: Pick<Benchmark, "once" | "runs">,
  args: Pick<Args, "runs" | "runsExplicit" | "quick">,
): number {
  if (args.runsExplicit) return args.runs;
  if (benchmark.once || args.quick) return 1;
  return benchmark.runs ?? args.runs;
}

/**
 * The order of run `run` (from 1): the plan's, except that on even runs each shoal
 * benchmark and the other commit's right after it (`--beside`) swap places, so neither
 * commit always runs first, right after whatever heavy workload precedes the pair.
 */
export function runOrder<T extends { benchmark: { id: string } }>(
  results: T[],
  pairs: { subject: string; beside: string }[],
  run: number,
): T[] {
  if (run % 2 === 1) return results;
  const besideOf = new Map(pairs.map((p) => [p.subject, p.beside]));
  const order: T[] = [];
  for (let i = 0; i < results.length; i++) {
    const current = results[i]!;
    const next = results[i + 1];
    if (next !== undefined && besideOf.get(current.benchmark.id) === next.benchmark.id) {
      order.push(next, current);
      i++;
    } else {
      order.push(current);
    }
  }
  return order;
}

/** The report's view of `--beside`: the pairs of which both were selected. */
function besideInput(
  checkout: Checkout | null,
  pairs: { subject: string; beside: string }[],
  results: BenchmarkResult[],
): BesideInput | null {
  if (checkout === null) return null;
  const ran = new Set(results.map((r) => r.benchmark.id));
  return {
    system: `shoal@${checkout.short}`,
    ref: checkout.ref,
    sha: checkout.sha,
    pairs: pairs.filter((p) => ran.has(p.subject) && ran.has(p.beside)),
  };
}

/** This repository: where `--beside` refs are resolved and checked out from. */
const REPO = new URL("../", import.meta.url).pathname;

/**
 * Check `ref` out for `--beside`. A Ctrl-C while git works is held until the checkout
 * exists, then removes it and exits, so nothing is left behind.
 */
async function checkOutBeside(ref: string): Promise<Checkout> {
  let interrupted = false;
  const hold = () => {
    interrupted = true;
  };
  Deno.addSignalListener("SIGINT", hold);
  Deno.addSignalListener("SIGTERM", hold);
  let checkout: Checkout;
  try {
    checkout = await checkOut(REPO, ref);
  } catch (error) {
    throw new Error(`Cannot measure --beside ${ref}`, { cause: error });
  } finally {
    Deno.removeSignalListener("SIGINT", hold);
    Deno.removeSignalListener("SIGTERM", hold);
  }
  if (interrupted) {
    await removeCheckout(checkout);
    Deno.exit(130);
  }
  say(`Checked ${ref} out as shoal@${checkout.short} in ${checkout.dir}`);
  return checkout;
}

/** Remove the `--beside` checkout; a failure is said (with how to clean up), not thrown. */
async function removeCheckout(checkout: Checkout): Promise<void> {
  try {
    await checkout.remove();
  } catch (error) {
    // Called while the bench ends (maybe on another error): say it rather than hide that one.
    say(`bench: ${errorChain(error)}`);
  }
}

async function main(): Promise<number> {
  const args = parse(Deno.args);
  // Resolved and checked out before Postgres starts: a bad ref costs nothing.
  const checkout = args.beside === null ? null : await checkOutBeside(args.beside);
  try {
    return await runAll(args, checkout);
  } finally {
    if (checkout !== null) await removeCheckout(checkout);
  }
}

if (import.meta.main) {
  let code: number;
  try {
    code = await main();
  } catch (error) {
    say(`bench: ${errorChain(error)}`);
    code = 1;
  }
  Deno.exit(code);
}
