/**
 * Issue 15's targets (flow control), judged on one bench run's medians like issue 14's
 * (bench/issue14.ts): the report's "Issue 15 targets" section.
 *
 * @module
 */
import { W14, W14_IDEAL } from "./flow.ts";
import type { IssueTarget } from "./report.ts";

const SHOAL = "shoal";
/** W2 under a limit that never binds, beside W2 without (the issue's bar). */
const LIMITED_DRAIN_MIN = 0.9;
/**
 * W14's throughput beside its ideal. The issue asks for the figure, not a bar: this is
 * ours, below the ideal by what one claim round trip per freed slot costs at 20 ms jobs.
 */
const W14_MIN_OF_IDEAL = 0.8;
/** An idle fleet held by a binding limit, beside the same fleet idle on an empty queue. */
const HELD_IDLE_MAX = 2;

function fmt(value: number, digits = 0): string {
  return Number.isNaN(value) ? "n/a" : value.toLocaleString("en-US", {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  });
}

function times(value: number): string {
  return Number.isFinite(value) ? `${value.toFixed(2)}×` : "n/a";
}

function judge(figures: number[], met: () => boolean): boolean | null {
  return figures.some((f) => Number.isNaN(f)) ? null : met();
}

export function issue15Targets(): IssueTarget[] {
  return [
    {
      workload: "W2",
      needs: [`W2/${SHOAL}/limited`],
      target: `W2 with a concurrency limit configured but not binding ≥ ${LIMITED_DRAIN_MIN}× ` +
        "W2 without (same run)",
      check(view) {
        const limited = view.figure(`W2/${SHOAL}/limited`, "rate");
        const plain = view.figure(`W2/${SHOAL}`, "rate");
        const ratio = limited / plain;
        return {
          measured: `${fmt(limited)} jobs/s limited, ${fmt(plain)} jobs/s without`,
          ratio: times(ratio),
          met: judge([limited, plain], () => ratio >= LIMITED_DRAIN_MIN),
        };
      },
    },
    {
      workload: "W14",
      needs: [`W14/${SHOAL}`],
      target: `W14: the most jobs of one key running at once ≤ the limit (${W14.limit})`,
      check(view) {
        const most = view.figure(`W14/${SHOAL}`, "max_overlap");
        return {
          measured: `${fmt(most)} at most`,
          ratio: `${times(most / W14.limit)} of the limit`,
          met: judge([most], () => most <= W14.limit),
        };
      },
    },
    {
      workload: "W14",
      needs: [`W14/${SHOAL}`],
      target: `W14: throughput ≥ ${W14_MIN_OF_IDEAL}× the ideal (${
        fmt(W14_IDEAL)
      } jobs/s: keys × limit ÷ job time; our bar, the issue asks for the figure)`,
      check(view) {
        const rate = view.figure(`W14/${SHOAL}`, "rate");
        const ratio = rate / W14_IDEAL;
        return {
          measured: `${fmt(rate)} jobs/s`,
          ratio: `${times(ratio)} of ideal`,
          met: judge([rate], () => ratio >= W14_MIN_OF_IDEAL),
        };
      },
    },
    {
      workload: "W10",
      needs: [`W10/${SHOAL}/limited`],
      target: `W10 with every job held by a binding limit: statements/s ≤ ${HELD_IDLE_MAX}× ` +
        "the idle fleet's on an empty queue (no busy loop)",
      check(view) {
        const held = view.figure(`W10/${SHOAL}/limited`, "statements_per_s");
        const idle = view.figure(`W10/${SHOAL}`, "statements_per_s");
        const ratio = held / idle;
        return {
          measured: `${fmt(held, 2)} statements/s held, ${fmt(idle, 2)} idle`,
          ratio: times(ratio),
          met: judge([held, idle], () => ratio <= HELD_IDLE_MAX),
        };
      },
    },
  ];
}
