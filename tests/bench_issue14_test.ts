/**
 * The bench's issue 14 report (bench/issue14.ts, bench/report.ts): every target listed,
 * "not run" when none of its benchmarks was selected, each judged on the run's medians with
 * its ratio; the best peer is the fastest of whichever peers ran (a system named `bullmq`
 * included); W13's times are found whatever its metrics are called. And how many runs each
 * benchmark gets (bench/run.ts `runsOf`) and how the report says so. Synthetic runs;
 * nothing is measured.
 */
import { assert, assertEquals } from "./assert.ts";
import { type BenchmarkResult, issue14Rows, issue14Table, runsNote } from "../bench/report.ts";
import { issue14Targets } from "../bench/issue14.ts";
import { runsOf } from "../bench/run.ts";
import type { Benchmark, Metric, Sizes, SoakSizes } from "../bench/workloads.ts";

const SIZES: Sizes = {
  jobs: 2_000,
  bulkBatch: 1_000,
  latencyJobs: 200,
  latencyRate: 100,
  fanOutChildren: 1_000,
  neighbourSizes: [1_000, 50_000, 1_000_000],
  newcomerJobs: 100,
  priorityBacklog: 50_000,
  idleRssMs: 3_000,
  scalingJobs: 2_000,
  idleFleetMs: 5_000,
  claimSizes: [10_000, 1_000_000, 10_000_000],
  claimCount: 200,
  claimWarmup: 20,
  claimBatch: 510,
  countsJobs: 1_000_000,
  stepExecutions: 100,
};
const SOAK: SoakSizes = {
  soakMs: 30_000,
  soakSampleMs: 5_000,
  holdBeforeMs: 10_000,
  holdMs: 60_000,
  holdAfterMs: 15_000,
  holdSampleMs: 2_000,
  rateShare: 0.7,
  fixedRate: null,
};
const PEERS = ["graphile-worker", "pg-boss", "bullmq"];

/** A result of `id` whose runs measured `values` (one object per run). */
function result(
  id: string,
  values: Record<string, number>[],
  metrics?: Metric[],
): BenchmarkResult {
  const [workload, system] = id.split("/") as [Benchmark["workload"], string];
  const keys = Object.keys(values[0] ?? {});
  const benchmark: Benchmark = {
    id,
    workload,
    system,
    title: id,
    settings: "test",
    metrics: metrics ?? keys.map((key) => ({ key, unit: "x", better: "higher" })),
    run: () => Promise.reject(new Error("not run in this test")),
  };
  return { benchmark, runs: values.map((v) => ({ values: v, details: {} })), errors: [] };
}

function rows(results: BenchmarkResult[]) {
  return issue14Rows({ results, issue14Targets: issue14Targets(SIZES, SOAK, PEERS) });
}

function row(results: BenchmarkResult[], startsWith: string) {
  const found = rows(results).find((r) => r.target.startsWith(startsWith));
  if (found === undefined) throw new Error(`No row for ${startsWith}`);
  return found;
}

Deno.test("issue 14 targets: every target is listed, not run when none of its workloads ran", () => {
  const all = rows([]);
  assertEquals(all.map((r) => r.workload), [
    "W8",
    "W8",
    "W9",
    "W9",
    "W11",
    "W5",
    "W5",
    "W5",
    "W5",
    "W12",
    "W12",
    "W2",
    "W1b",
    "W13",
  ]);
  assert.ok(all.every((r) => r.met === "not run" && r.measured === "not run"));
  const table = issue14Table({ results: [], issue14Targets: issue14Targets(SIZES, SOAK, PEERS) });
  assertEquals(table.trim().split("\n").length, 2 + all.length);
});

Deno.test("issue 14 targets: W11 compares the largest size's median claim with the smallest's", () => {
  const w11 = (runs: Record<string, number>[]) => [result("W11/shoal", runs)];
  const met = row(w11([{ claim_ms_10k: 2, claim_ms_1M: 2.4, claim_ms_10M: 2.9 }]), "W11");
  assertEquals(met.met, "yes");
  assert.ok(met.ratio.startsWith("1.45× (10M ÷ 10k)"), met.ratio);
  assert.ok(met.measured.includes("10M 2.900 ms"), met.measured);
  // The ratio of the medians (runs of 2 and 3.2 ms, 2.2 and 3 ms, 2.1 and 3.4 ms).
  const runs = [
    { claim_ms_10k: 2, claim_ms_10M: 3.2 },
    { claim_ms_10k: 2.2, claim_ms_10M: 3 },
    { claim_ms_10k: 2.1, claim_ms_10M: 3.4 },
  ];
  assert.ok(row(w11(runs), "W11").ratio.startsWith("1.52×"), row(w11(runs), "W11").ratio);
  assertEquals(row(w11(runs), "W11").met, "no");
  // The largest size missing (a run failed): not measured, not "met".
  assertEquals(row(w11([{ claim_ms_10k: 2 }]), "W11").met, "not measured");
});

Deno.test("issue 14 targets: W5 at each size and the priority variant, under 2 × concurrency", () => {
  const results = [
    result("W5/shoal/a1k", [{ a_starts: 3 }, { a_starts: 30 }, { a_starts: 5 }]),
    result("W5/shoal/a1M", [{ a_starts: 20 }]),
    result("W5/shoal/priority", [{ a_starts: 19 }]),
  ];
  assertEquals(row(results, "W5 with key A holding 1,000 ").met, "yes");
  assertEquals(row(results, "W5 with key A holding 1,000 ").measured, "5 A jobs");
  assertEquals(row(results, "W5 with key A holding 50,000 ").met, "not run");
  assertEquals(row(results, "W5 with key A holding 1,000,000 ").met, "no");
  assertEquals(row(results, "W5 priority").met, "yes");
});

Deno.test("issue 14 targets: the best peer is the fastest of the peers that ran, bullmq included", () => {
  const w2 = [
    result("W2/shoal", [{ rate: 90_000 }]),
    result("W2/graphile-worker", [{ rate: 40_000 }]),
    result("W2/bullmq", [{ rate: 50_000 }]),
  ];
  const line = row(w2, "W2");
  assertEquals(line.met, "no"); // 1.80× < 2.0×
  assertEquals(line.ratio, "1.80×");
  assert.ok(line.measured.includes("best peer bullmq 50,000 jobs/s"), line.measured);
  assertEquals(row(w2.filter((r) => r.benchmark.system !== "bullmq"), "W2").met, "yes");
  // shoal ran, no peer did: not measured.
  assertEquals(row([result("W1b/shoal", [{ rate: 1 }])], "W1b").met, "not measured");
});

Deno.test("issue 14 targets: W8, W9 and W12 each judged on their own figure", () => {
  const results = [
    result("W8/shoal", [{ last_vs_first: 0.95, size_growth: 1.3, end_size_mb: 40 }]),
    result("W9/shoal", [{ held_rate: 9_000, held_vs_w8: 0.9, recovery_s: Number.NaN }]),
    result("W12/shoal", [{ missed: 0, p99_lag_ms: 60, ceiling: 9_000 }]),
  ];
  assertEquals(row(results, "W8: the soak's last minute").met, "yes");
  assertEquals(row(results, "W8: the storage's size").met, "no");
  assertEquals(row(results, "W9: throughput").met, "yes");
  const recovery = row(results, "W9: back to");
  assertEquals(recovery.met, "no"); // it ran and never recovered
  assertEquals(recovery.measured, "never (within the after phase)");
  assertEquals(row(results, "W12: the scheduler's ceiling").met, "no");
  assertEquals(row(results, "W12: 1,000 per-second").met, "yes");
});

Deno.test("issue 14 targets: W13's times in ms are judged whatever they are called", () => {
  const ms: Metric[] = [
    { key: "status_ms", unit: "ms", better: "lower" },
    { key: "metrics_ms", unit: "ms", better: "lower" },
    { key: "rows", unit: "jobs", better: "higher" },
  ];
  const fast = row(
    [result("W13/shoal", [{ status_ms: 12, metrics_ms: 31, rows: 1e7 }], ms)],
    "W13",
  );
  assertEquals(fast.met, "yes");
  assert.ok(fast.measured.includes("status_ms 12.0 ms, metrics_ms 31.0 ms"), fast.measured);
  assert.ok(!fast.measured.includes("rows"), fast.measured);
  const slow = row([result("W13/shoal/10M", [{ status_ms: 12, metrics_ms: 80 }], ms)], "W13");
  assertEquals(slow.met, "no");
  assert.ok(slow.ratio.startsWith("1.60×"), slow.ratio);
});

Deno.test("runsOf: W5 runs 5, the soaks and W11 once, unless --runs or --quick says otherwise", () => {
  const usual = { runs: 3, runsExplicit: false, quick: false };
  assertEquals(runsOf({}, usual), 3);
  assertEquals(runsOf({ runs: 5 }, usual), 5);
  assertEquals(runsOf({ once: true }, usual), 1);
  assertEquals(runsOf({ runs: 5 }, { runs: 1, runsExplicit: false, quick: true }), 1);
  const explicit = { runs: 2, runsExplicit: true, quick: false };
  assertEquals(runsOf({ runs: 5 }, explicit), 2);
  assertEquals(runsOf({ once: true }, explicit), 2);
});

Deno.test("runsNote: the usual count, then the workloads that ran another", () => {
  const results = [
    result("W2/shoal", [{ rate: 1 }, { rate: 1 }, { rate: 1 }]),
    result("W3/shoal", [{ p50: 1 }, { p50: 1 }, { p50: 1 }]),
    result("W5/shoal/a1k", Array.from({ length: 5 }, () => ({ a_starts: 1 }))),
    result("W5/shoal/priority", Array.from({ length: 5 }, () => ({ a_starts: 1 }))),
    result("W8/shoal", [{ rate: 1 }]),
    result("W11/shoal", [{ claim_ms_10k: 1 }]),
  ];
  assertEquals(runsNote({ runs: 5, results }), "3 runs (W5: 5; W8, W11: 1)");
  assertEquals(runsNote({ runs: 1, results: results.slice(4) }), "1 run");
});
