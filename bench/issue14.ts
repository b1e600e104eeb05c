/**
 * Issue 14's targets, each judged on one bench run's medians: the report's "Issue 14
 * targets" section. One row per target (a target with two parts is two rows), each with
 * the figures it is judged on, the ratio it names and whether it is met; a row none of
 * whose benchmarks was selected says "not run".
 *
 * @module
 */
import { COUNTS_TARGET_MS } from "./counts.ts";
import { OPTIONS } from "../lib/config.ts";
import { claimKey } from "./claim_size.ts";
import { sizeLabel } from "./harness.ts";
import type { IssueTarget, IssueTargetCheck, ReportView } from "./report.ts";
import { FLAT_GROWTH } from "./soak.ts";
import type { Sizes, SoakSizes } from "./workloads.ts";

/** The system whose figures are judged. */
const SHOAL = "shoal";
/** W5's bound is 2 × the consumer's concurrency; W5 runs it with the default. */
const CONCURRENCY = Number(OPTIONS.concurrency.default);
const W5_BOUND = 2 * CONCURRENCY;
const W11_MAX_RATIO = 1.5;
const W12_CEILING = 10_000;
const W12_MAX_LAG_MS = 1_000;

function fmt(value: number, digits = 0): string {
  return Number.isNaN(value) ? "n/a" : value.toLocaleString("en-US", {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  });
}

function times(value: number): string {
  return Number.isNaN(value) || !Number.isFinite(value) ? "n/a" : `${value.toFixed(2)}×`;
}

/** Judged only when every figure it needs was measured; null (not measured) otherwise. */
function judge(figures: number[], met: () => boolean): boolean | null {
  return figures.some((f) => Number.isNaN(f)) ? null : met();
}

/**
 * The best of the peers that ran for `workload` (by `key`, higher is better): the fastest
 * of whichever of `peers` have a figure in this run; null when none ran.
 */
export function bestPeer(
  view: ReportView,
  workload: string,
  key: string,
  peers: readonly string[],
): { system: string; value: number } | null {
  let best: { system: string; value: number } | null = null;
  for (const system of peers) {
    const value = view.figure(`${workload}/${system}`, key);
    if (Number.isNaN(value)) continue;
    if (best === null || value > best.value) best = { system, value };
  }
  return best;
}

/** shoal's rate ÷ the best peer's in `workload`, against `factor`. */
function versusBestPeer(
  workload: "W1b" | "W2",
  factor: number,
  what: string,
  peers: readonly string[],
): IssueTarget {
  return {
    workload,
    needs: [`${workload}/${SHOAL}`],
    target: `${workload} (${what}) ≥ ${factor.toFixed(1)}× the best peer in the same run ` +
      `(the fastest of ${peers.join(", ")} that ran)`,
    check(view) {
      const me = view.figure(`${workload}/${SHOAL}`, "rate");
      const best = bestPeer(view, workload, "rate", peers);
      if (best === null) {
        return { measured: `shoal ${fmt(me)} jobs/s; no peer ran`, ratio: "n/a", met: null };
      }
      const ratio = me / best.value;
      return {
        measured: `shoal ${fmt(me)} jobs/s, best peer ${best.system} ${fmt(best.value)} jobs/s`,
        ratio: times(ratio),
        met: judge([me], () => ratio >= factor),
      };
    },
  };
}

/** W5 at one backlog (or the priority variant): A jobs started, against 2 × concurrency. */
function fairness(id: string, label: string): IssueTarget {
  return {
    workload: "W5",
    needs: [id],
    target: `W5 ${label}: the newcomer's last job starts before ${W5_BOUND} (2 × concurrency ` +
      `${CONCURRENCY}) A jobs have started after its enqueue (median of runs)`,
    check(view) {
      const a = view.figure(id, "a_starts");
      return {
        measured: `${fmt(a)} A jobs`,
        ratio: `${times(a / W5_BOUND)} of the bound`,
        met: judge([a], () => a < W5_BOUND),
      };
    },
  };
}

/** Issue 14's targets for a run at `sizes`, peers named as the bench names them. */
export function issue14Targets(
  sizes: Sizes,
  soak: SoakSizes,
  peers: readonly string[],
): IssueTarget[] {
  const held = soak.holdMs / 1000;
  const small = sizes.claimSizes[0]!;
  const large = sizes.claimSizes[sizes.claimSizes.length - 1]!;
  return [
    {
      workload: "W8",
      needs: [`W8/${SHOAL}`],
      target: "W8: the soak's last minute within 10% of its first (throughput)",
      check(view) {
        const ratio = view.figure(`W8/${SHOAL}`, "last_vs_first");
        return {
          measured: `last ÷ first minute ${times(ratio)}`,
          ratio: times(ratio),
          met: judge([ratio], () => Math.abs(ratio - 1) <= 0.1),
        };
      },
    },
    {
      workload: "W8",
      needs: [`W8/${SHOAL}`],
      target:
        `W8: the storage's size flat once the rate is steady (late ÷ early ≤ ${FLAT_GROWTH}×)`,
      check(view) {
        const growth = view.figure(`W8/${SHOAL}`, "size_growth");
        const mb = view.figure(`W8/${SHOAL}`, "end_size_mb");
        return {
          measured: `late ÷ early ${times(growth)}, ${fmt(mb, 1)} MB at the end`,
          ratio: times(growth),
          met: judge([growth], () => growth <= FLAT_GROWTH),
        };
      },
    },
    {
      workload: "W9",
      needs: [`W9/${SHOAL}`],
      target: `W9: throughput while a snapshot is held ${held} s ≥ 80% of the steady rate`,
      check(view) {
        const ratio = view.figure(`W9/${SHOAL}`, "held_vs_w8");
        const rate = view.figure(`W9/${SHOAL}`, "held_rate");
        return {
          measured: `${fmt(rate)} jobs/s held, ${fmt(100 * ratio)}% of the steady rate`,
          ratio: times(ratio),
          met: judge([ratio], () => ratio >= 0.8),
        };
      },
    },
    {
      workload: "W9",
      needs: [`W9/${SHOAL}`],
      target: "W9: back to the steady backlog within 30 s after the snapshot ends",
      check(view) {
        const ratio = view.figure(`W9/${SHOAL}`, "held_vs_w8");
        const recovery = view.figure(`W9/${SHOAL}`, "recovery_s");
        // W9 ran but never recovered within its after phase: its recovery is n/a, not met.
        const never = !Number.isNaN(ratio) && Number.isNaN(recovery);
        return {
          measured: never ? "never (within the after phase)" : `${fmt(recovery, 1)} s`,
          ratio: never ? "n/a" : times(recovery / 30),
          met: never ? false : judge([recovery], () => recovery <= 30),
        };
      },
    },
    {
      workload: "W11",
      needs: [`W11/${SHOAL}`],
      target: `W11: median claim of one batch (${sizes.claimBatch} jobs) with ` +
        `${sizeLabel(large)} ready jobs ≤ ${W11_MAX_RATIO}× the one with ${sizeLabel(small)}`,
      check(view) {
        const figure = (n: number) => view.figure(`W11/${SHOAL}`, claimKey(n));
        const figures = sizes.claimSizes.map(figure);
        const ratio = figure(large) / figure(small);
        return {
          measured: sizes.claimSizes.map((n, i) => `${sizeLabel(n)} ${fmt(figures[i]!, 3)} ms`)
            .join(", "),
          ratio: `${times(ratio)} (${sizeLabel(large)} ÷ ${sizeLabel(small)})`,
          met: judge([ratio], () => ratio <= W11_MAX_RATIO),
        };
      },
    },
    ...sizes.neighbourSizes.map((n) =>
      fairness(`W5/${SHOAL}/a${sizeLabel(n)}`, `with key A holding ${fmt(n)} ready jobs`)
    ),
    fairness(
      `W5/${SHOAL}/priority`,
      `priority: a higher-priority job behind a full prefetch buffer (A: ${
        fmt(sizes.priorityBacklog)
      } ready)`,
    ),
    {
      workload: "W12",
      needs: [`W12/${SHOAL}`],
      target: `W12: the scheduler's ceiling ≥ ${fmt(W12_CEILING)} fires/s`,
      check(view) {
        const ceiling = view.figure(`W12/${SHOAL}`, "ceiling");
        return {
          measured: `${fmt(ceiling)} fires/s`,
          ratio: times(ceiling / W12_CEILING),
          met: judge([ceiling], () => ceiling >= W12_CEILING),
        };
      },
    },
    {
      workload: "W12",
      needs: [`W12/${SHOAL}`],
      target: "W12: 1,000 per-second schedules fire every slot with lag p99 ≤ 1 s",
      check(view) {
        const lag = view.figure(`W12/${SHOAL}`, "p99_lag_ms");
        const missed = view.figure(`W12/${SHOAL}`, "missed");
        return {
          measured: `lag p99 ${fmt(lag)} ms, ${fmt(missed)} slots missed`,
          ratio: times(lag / W12_MAX_LAG_MS),
          met: judge([lag, missed], () => lag <= W12_MAX_LAG_MS && missed === 0),
        };
      },
    },
    versusBestPeer("W2", 2.0, "drain", peers),
    versusBestPeer("W1b", 1.2, "bulk enqueue", peers),
    {
      workload: "W13",
      needs: [`W13/${SHOAL}`],
      target: `W13: status --json and one /metrics scrape each ≤ ${COUNTS_TARGET_MS} ms with ` +
        "10,000,000 jobs",
      check(view) {
        // Every time W13 reports (in ms) is one of the two: judged all together.
        const timed = view.benchmarks(`W13/${SHOAL}`).flatMap((b) =>
          b.metrics.filter((m) => m.unit === "ms").map((m) => ({
            label: `${b.id.replace(`W13/${SHOAL}`, "").replace(/^\//, "")} ${m.key}`.trim(),
            value: view.figure(b.id, m.key),
          }))
        );
        if (timed.length === 0) {
          return { measured: "no time in ms reported", ratio: "n/a", met: null };
        }
        const slowest = Math.max(...timed.map((t) => t.value));
        const check: IssueTargetCheck = {
          measured: timed.map((t) => `${t.label} ${fmt(t.value, 1)} ms`).join(", "),
          ratio: `${times(slowest / COUNTS_TARGET_MS)} (slowest ÷ ${COUNTS_TARGET_MS} ms)`,
          met: judge(timed.map((t) => t.value), () => slowest <= COUNTS_TARGET_MS),
        };
        return check;
      },
    },
  ];
}
