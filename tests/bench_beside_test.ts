/**
 * `deno task bench --beside`'s report and run order: the report's table (bench/report.ts)
 * sets each figure beside the other commit's with every run, the ratio of the medians,
 * and whether that ratio lies within the two systems' own run-to-run spread; the runs
 * alternate which commit goes first (bench/run.ts). Synthetic runs; nothing is measured.
 */
import { assert, assertEquals } from "./assert.ts";
import { type BenchmarkResult, besideTable } from "../bench/report.ts";
import { runOrder } from "../bench/run.ts";
import type { Benchmark } from "../bench/workloads.ts";

function result(id: string, system: string, rates: number[]): BenchmarkResult {
  const benchmark: Benchmark = {
    id,
    workload: "W2",
    system,
    title: "drain",
    settings: "defaults",
    metrics: [{ key: "rate", unit: "jobs/s", better: "higher" }],
    run: () => Promise.reject(new Error("not run in this test")),
  };
  return { benchmark, runs: rates.map((rate) => ({ values: { rate }, details: {} })), errors: [] };
}

/** The table's one data row for shoal's `rates` beside the other commit's `theirs`. */
function row(ours: number[], theirs: number[]): string {
  const table = besideTable({
    beside: {
      system: "shoal@abc1234",
      ref: "HEAD~1",
      sha: "abc1234".padEnd(40, "0"),
      pairs: [{ subject: "W2/shoal", beside: "W2/shoal@abc1234" }],
    },
    results: [
      result("W2/shoal", "shoal", ours),
      result("W2/shoal@abc1234", "shoal@abc1234", theirs),
    ],
  });
  const lines = table.trim().split("\n");
  assertEquals(lines.length, 3, table);
  return lines[2]!;
}

Deno.test("beside table: a ratio inside both systems' run spread is within noise", () => {
  // Medians 100 and 98: ratio 1.020; runs stray 0.95–1.05 of their medians.
  const line = row([95, 100, 105], [93.1, 98, 102.9]);
  assert.ok(
    line.startsWith("| W2 rate | 100 jobs/s (runs: 95 jobs/s, 100 jobs/s, 105 jobs/s) |"),
    line,
  );
  assert.ok(line.includes("| 1.020× | 0.95–1.05× | yes |"), line);
});

Deno.test("beside table: a ratio beyond both systems' run spread is not within noise", () => {
  const line = row([99, 100, 101], [79, 80, 81]);
  assert.ok(line.includes("| 1.250× | 0.99–1.01× | **no** |"), line);
});

Deno.test("beside table: one run has no spread to judge by", () => {
  const line = row([100], [98]);
  assert.ok(line.includes("| 1.020× | n/a | n/a (needs 2 runs of each) |"), line);
});

Deno.test("beside table: nothing without --beside", () => {
  assertEquals(besideTable({ beside: null, results: [] }), "");
});

Deno.test("run order: each pair swaps on even runs, everything else keeps its place", () => {
  const ids = ["W2/shoal", "W2/shoal@abc1234", "W2/hand-written", "W3/shoal", "W3/shoal@abc1234"];
  const results = ids.map((id) => ({ benchmark: { id } }));
  const pairs = [
    { subject: "W2/shoal", beside: "W2/shoal@abc1234" },
    { subject: "W3/shoal", beside: "W3/shoal@abc1234" },
  ];
  const order = (run: number) => runOrder(results, pairs, run).map((r) => r.benchmark.id);
  assertEquals(order(1), ids);
  assertEquals(order(3), ids);
  assertEquals(order(2), [
    "W2/shoal@abc1234",
    "W2/shoal",
    "W2/hand-written",
    "W3/shoal@abc1234",
    "W3/shoal",
  ]);
  // Only one of a pair selected (--only W3/shoal): nothing to swap it with.
  assertEquals(runOrder(results.slice(2, 4), pairs, 2).map((r) => r.benchmark.id), [
    "W2/hand-written",
    "W3/shoal",
  ]);
});
