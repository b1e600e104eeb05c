/**
 * Turning measured runs into the report: medians per metric, the comparison table
 * (each figure beside its floor), and the markdown and JSON files.
 *
 * @module
 */
import type { BenchServer } from "./harness.ts";
import { median, sizeLabel } from "./harness.ts";
import type { StatementProfile } from "./profile.ts";
import type { Benchmark, Metric, RunResult, Sizes } from "./workloads.ts";

/** One figure beside its floor in the summary table. */
export interface Comparison {
  /** The row's workload description. */
  label: string;
  /** Benchmark id of the measured system (shoal). */
  subject: string;
  /** Benchmark id of the floor, if any. */
  floor?: string;
  /** How the floor is named in the table (its title unless given). */
  floorLabel?: string;
  metric: string;
  /** The floor's metric when it differs from the subject's (W4's ms/child beside W2's ms/job). */
  floorMetric?: string;
  /** Append the metric's key to the label (default: for every metric but `rate`). */
  metricInLabel?: boolean;
  /** The settings that matter for this row, in a few words (the full ones are under "All figures"). */
  settings: string;
}

/** shoal beside the best of its peers for one workload and metric (issue 5's targets). */
export interface PeerComparison {
  /** The row's workload description. */
  label: string;
  metric: string;
  /** Benchmark id of shoal's figure. */
  subject: string;
  /** Benchmark ids of the peers' figures for the same workload. */
  peers: string[];
}

/** A peer and every setting it ran with, stated in the report. */
export interface PeerDescription {
  name: string;
  settings: string;
  /** How the bench enqueues through it. */
  enqueue: string;
}

/** A figure of this report: the median of a benchmark's metric, NaN when not measured. */
export type FigureOf = (id: string, key: string) => number;

/** What a target line shows: the figures it was judged on, and whether it is met. */
export interface TargetCheck {
  measured: string;
  /** null when a figure it needs was not measured. */
  met: boolean | null;
}

/** One of issue 5's targets, judged on this run's figures. */
export interface Target {
  workload: string;
  /** The target in the issue's words. */
  target: string;
  check(figure: FigureOf): TargetCheck;
}

/** What an issue target reads of a bench run. */
export interface ReportView {
  /** The median of a benchmark's metric in this run; NaN when not measured. */
  figure: FigureOf;
  /** The benchmarks selected in this run (measured or failed) whose id is `prefix` or starts with `prefix/`. */
  benchmarks(prefix: string): { id: string; system: string; metrics: Metric[] }[];
}

/** What an issue target's row shows. */
export interface IssueTargetCheck {
  /** The figures it is judged on, with their units. */
  measured: string;
  /** The ratio the target names (shoal ÷ best peer, 10M ÷ 10k ...), or the figure ÷ its bound. */
  ratio: string;
  /** null when a figure it needs was not measured. */
  met: boolean | null;
}

/** One of issue 14's targets (bench/issue14.ts), judged on this run's medians. */
export interface IssueTarget {
  workload: string;
  /** Benchmark ids (or id prefixes) it judges: "not run" when none of them was selected. */
  needs: string[];
  /** The target in the issue's words. */
  target: string;
  check(view: ReportView): IssueTargetCheck;
}

/** `--beside REF`: shoal's figures beside the same workloads run by another commit of shoal. */
export interface BesideInput {
  /** The other commit's system name, `shoal@<short sha>`. */
  system: string;
  /** The ref as given, and the commit it resolved to. */
  ref: string;
  sha: string;
  /** Benchmark ids measured for both: this tree's (`W2/shoal`) and the other commit's. */
  pairs: { subject: string; beside: string }[];
}

export interface BenchmarkResult {
  benchmark: Benchmark;
  runs: RunResult[];
  errors: string[];
}

export interface ReportInput {
  command: string;
  startedAt: Date;
  seconds: number;
  runs: number;
  quick: boolean;
  profile: boolean;
  sizes: Sizes;
  server: BenchServer;
  environment: Record<string, string>;
  results: BenchmarkResult[];
  comparisons: Comparison[];
  peerComparisons: PeerComparison[];
  peers: PeerDescription[];
  targets: Target[];
  /** Issue 14's targets, every one listed whether its workload ran or not. */
  issue14Targets: IssueTarget[];
  /** Issue 15's (flow control), likewise. */
  issue15Targets?: IssueTarget[];
  /** How W8..W10 ran (soak lengths, rates, the W10 server), one line each. */
  soakNotes: string[];
  /** Set with `--beside REF`. */
  beside: BesideInput | null;
}

function medianOf(result: BenchmarkResult | undefined, key: string): number {
  if (!result) return Number.NaN;
  return median(result.runs.map((r) => r.values[key]).filter((v): v is number => v !== undefined));
}

function metricOf(result: BenchmarkResult | undefined, key: string): Metric | undefined {
  return result?.benchmark.metrics.find((m) => m.key === key);
}

/** A figure with its unit; times (`ms`, `ms/job` ...) keep three significant digits below 1. */
export function formatValue(value: number, unit: string): string {
  if (Number.isNaN(value)) return "n/a";
  if (unit === "×") return `${value.toFixed(2)}×`;
  if (unit === "MB") return `${value.toFixed(1)} MB`;
  if (unit === "s") return `${value.toFixed(1)} s`;
  if (unit === "statements/s") return `${value.toFixed(2)} ${unit}`;
  if (unit === "ms" || unit.startsWith("ms/")) {
    return `${
      value < 1
        ? value.toPrecision(3)
        : value < 10
        ? value.toFixed(2)
        : value < 100
        ? value.toFixed(1)
        : value.toFixed(0)
    } ${unit}`;
  }
  return `${Math.round(value).toLocaleString("en-US")} ${unit}`;
}

function formatRatio(subject: number, floor: number): string {
  if (Number.isNaN(subject) || Number.isNaN(floor) || floor === 0) return "n/a";
  return `${(subject / floor).toFixed(2)}×`;
}

interface Row {
  label: string;
  subject: string;
  floor: string;
  ratio: string;
  settings: string;
}

function comparisonRows(input: ReportInput): Row[] {
  const byId = new Map(input.results.map((r) => [r.benchmark.id, r]));
  return input.comparisons.map((c) => {
    const subject = byId.get(c.subject);
    const floor = c.floor ? byId.get(c.floor) : undefined;
    const floorMetric = c.floorMetric ?? c.metric;
    const unit = metricOf(subject, c.metric)?.unit ?? "";
    const floorUnit = metricOf(floor, floorMetric)?.unit ?? unit;
    const s = medianOf(subject, c.metric);
    const f = medianOf(floor, floorMetric);
    const floorLabel = c.floorLabel ?? floor?.benchmark.title ?? "";
    return {
      label: (c.metricInLabel ?? c.metric !== "rate") ? `${c.label}: ${c.metric}` : c.label,
      subject: formatValue(s, unit),
      floor: floor ? `${formatValue(f, floorUnit)}: ${floorLabel}` : "",
      ratio: floor ? formatRatio(s, f) : "",
      settings: c.settings,
    };
  });
}

interface PeerRow {
  label: string;
  shoal: string;
  /** Each peer's figure, in the order of `peerNames`. */
  peers: string[];
  best: string;
  ratio: string;
  /** For the JSON. */
  values: { shoal: number; best: number | null; bestPeer: string | null; ratio: number | null };
}

/** The best peer figure (by the metric's direction) among those measured, if any. */
function bestPeer(
  input: ReportInput,
  c: PeerComparison,
): { id: string; value: number; system: string } | null {
  const byId = new Map(input.results.map((r) => [r.benchmark.id, r]));
  let best: { id: string; value: number; system: string } | null = null;
  for (const id of c.peers) {
    const result = byId.get(id);
    const value = medianOf(result, c.metric);
    if (!result || Number.isNaN(value)) continue;
    const higher = metricOf(result, c.metric)?.better !== "lower";
    if (best === null || (higher ? value > best.value : value < best.value)) {
      best = { id, value, system: result.benchmark.system };
    }
  }
  return best;
}

function peerRows(input: ReportInput): PeerRow[] {
  const byId = new Map(input.results.map((r) => [r.benchmark.id, r]));
  const names = input.peers.map((p) => p.name);
  return input.peerComparisons.map((c) => {
    const subject = byId.get(c.subject);
    const measured = [subject, ...c.peers.map((id) => byId.get(id))];
    const unit = measured.map((r) => metricOf(r, c.metric)?.unit).find((u) => u) ?? "";
    const s = medianOf(subject, c.metric);
    const best = bestPeer(input, c);
    const peers = names.map((name) => {
      const id = c.peers.find((p) => byId.get(p)?.benchmark.system === name);
      const result = id ? byId.get(id) : undefined;
      if (!result) return "not run";
      if (result.runs.length === 0) return "FAILED";
      return formatValue(medianOf(result, c.metric), unit);
    });
    return {
      label: c.metric === "rate" ? c.label : `${c.label}: ${c.metric}`,
      shoal: formatValue(s, unit),
      peers,
      best: best ? best.system : "n/a",
      ratio: best ? formatRatio(s, best.value) : "n/a",
      values: {
        shoal: s,
        best: best?.value ?? null,
        bestPeer: best?.system ?? null,
        ratio: best && !Number.isNaN(s) && best.value !== 0 ? s / best.value : null,
      },
    };
  });
}

/** shoal beside each peer and the ratio to the best of them, as markdown. */
export function peerTable(input: ReportInput): string {
  if (input.peerComparisons.length === 0) return "";
  const names = input.peers.map((p) => p.name);
  const lines = [
    `| workload | shoal | ${names.join(" | ")} | best peer | shoal ÷ best peer |`,
    `| --- | ---: | ${names.map(() => "---:").join(" | ")} | --- | ---: |`,
  ];
  for (const row of peerRows(input)) {
    lines.push(
      `| ${escapeCell(row.label)} | ${row.shoal} | ${
        row.peers.join(" | ")
      } | ${row.best} | ${row.ratio} |`,
    );
  }
  return lines.join("\n") + "\n";
}

function peerSection(input: ReportInput): string {
  if (input.peerComparisons.length === 0) return "";
  return [
    "## shoal beside its peers",
    "",
    peerTable(input),
    "Ratio: shoal's figure divided by the best peer's (same run, same server, each run in a " +
    "fresh database). For throughput higher is better, so above 1.00× shoal is faster; for " +
    "latency lower is better, so below 1.00× shoal starts jobs sooner.",
    "",
    "Peer settings:",
    "",
    ...input.peers.map((p) => `- ${p.name}: ${p.settings}. Enqueue: ${p.enqueue}.`),
    "",
  ].join("\n");
}

/** One system's runs of one metric: every run's value, their median, min and max. */
interface Spread {
  runs: number[];
  median: number;
  min: number;
  max: number;
}

function spreadOf(result: BenchmarkResult | undefined, key: string): Spread {
  const runs = (result?.runs ?? []).map((r) => r.values[key]).filter((v): v is number =>
    v !== undefined && !Number.isNaN(v)
  );
  return {
    runs,
    median: median(runs),
    min: runs.length ? Math.min(...runs) : Number.NaN,
    max: runs.length ? Math.max(...runs) : Number.NaN,
  };
}

/** One figure of shoal beside the same figure of the other commit. */
interface BesideRow {
  subject: string;
  beside: string;
  metric: Metric;
  shoal: Spread;
  other: Spread;
  /** shoal's median ÷ the other commit's median. */
  ratio: number;
  /**
   * How far each system's own runs strayed from its median (run ÷ own median), the lowest
   * and highest of both systems; null with fewer than 2 runs of either (no spread to see).
   */
  band: { low: number; high: number } | null;
  /** The ratio lies inside the band; null when there is no band. */
  withinNoise: boolean | null;
}

/** What the beside table reads from the report's input. */
export type BesideTableInput = Pick<ReportInput, "beside" | "results">;

function besideRows(input: BesideTableInput): BesideRow[] {
  if (input.beside === null) return [];
  const byId = new Map(input.results.map((r) => [r.benchmark.id, r]));
  const rows: BesideRow[] = [];
  for (const pair of input.beside.pairs) {
    const subject = byId.get(pair.subject);
    const other = byId.get(pair.beside);
    if (!subject || !other) continue;
    for (const metric of subject.benchmark.metrics) {
      const a = spreadOf(subject, metric.key);
      const b = spreadOf(other, metric.key);
      const ratio = b.median === 0 ? Number.NaN : a.median / b.median;
      const band = a.runs.length < 2 || b.runs.length < 2 ? null : {
        low: Math.min(a.min / a.median, b.min / b.median),
        high: Math.max(a.max / a.median, b.max / b.median),
      };
      rows.push({
        subject: pair.subject,
        beside: pair.beside,
        metric,
        shoal: a,
        other: b,
        ratio,
        band,
        withinNoise: band === null || Number.isNaN(ratio)
          ? null
          : ratio >= band.low && ratio <= band.high,
      });
    }
  }
  return rows;
}

function formatSpread(spread: Spread, unit: string): string {
  if (spread.runs.length === 0) return "not measured";
  const runs = spread.runs.map((v) => formatValue(v, unit)).join(", ");
  return `${formatValue(spread.median, unit)} (runs: ${runs})`;
}

/** shoal beside the other commit (`--beside`), one row per figure, as markdown. */
export function besideTable(input: BesideTableInput): string {
  const beside = input.beside;
  if (beside === null) return "";
  const lines = [
    `| figure | shoal: median (runs) | ${beside.system}: median (runs) | shoal ÷ ${beside.system} | runs ÷ own median, both systems | ratio within noise |`,
    "| --- | ---: | ---: | ---: | ---: | --- |",
  ];
  for (const row of besideRows(input)) {
    const unit = row.metric.unit;
    const band = row.band === null
      ? "n/a"
      : `${row.band.low.toFixed(2)}–${row.band.high.toFixed(2)}×`;
    const verdict = row.withinNoise === null
      ? "n/a (needs 2 runs of each)"
      : row.withinNoise
      ? "yes"
      : "**no**";
    // `W2/shoal/c100` → `W2/c100`: the row is about both systems.
    const figure = row.subject.replace("/shoal", "");
    lines.push(
      `| ${figure} ${row.metric.key} | ${formatSpread(row.shoal, unit)} | ${
        formatSpread(row.other, unit)
      } | ${Number.isNaN(row.ratio) ? "n/a" : `${row.ratio.toFixed(3)}×`} | ${band} | ${verdict} |`,
    );
  }
  return lines.join("\n") + "\n";
}

function besideSection(input: ReportInput): string {
  const beside = input.beside;
  if (beside === null) return "";
  return [
    `## shoal beside ${beside.system}`,
    "",
    `\`--beside ${beside.ref}\`: commit ${beside.sha}, checked out into a temporary git ` +
    `worktree and run as ${beside.system} exactly as shoal runs this tree (its own main.ts, ` +
    "migrations, lib/queue.ts for enqueueing and V8 flags), right beside shoal (after it on " +
    "odd runs, before it on even ones), each run in a fresh database.",
    "",
    besideTable(input),
    `Ratio: shoal's median ÷ ${beside.system}'s. For throughput above 1.00× this tree is ` +
    "faster; for latency and time per job below 1.00× it is faster. The noise band is how " +
    "far any single run of either system strayed from its own system's median (the lowest " +
    'and the highest run ÷ median of the two): "yes" when the ratio of the medians lies ' +
    "inside it, that is, the two commits differ by less than their own runs differ among " +
    "themselves. It needs at least 2 runs of each (3 or more to mean much).",
    "",
  ].join("\n");
}

function escapeCell(text: string): string {
  return text.replaceAll("|", "\\|").replaceAll("\n", " ");
}

/** The summary table as markdown (also what goes to stdout). */
export function summaryTable(input: ReportInput): string {
  const lines = [
    "| workload | shoal | floor | ratio (shoal ÷ floor) | settings |",
    "| --- | ---: | --- | ---: | --- |",
  ];
  for (const row of comparisonRows(input)) {
    lines.push(
      `| ${escapeCell(row.label)} | ${row.subject} | ${escapeCell(row.floor)} | ${row.ratio} | ${
        escapeCell(row.settings)
      } |`,
    );
  }
  return lines.join("\n") + "\n";
}

function formatDetail(value: number): string {
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  return Math.abs(value) >= 100 ? Math.round(value).toLocaleString("en-US") : value.toFixed(2);
}

/** Medians of the numeric details every run reported (CPU seconds, call times, ...). */
function detailMedians(result: BenchmarkResult): string {
  const keys = new Set<string>();
  for (const run of result.runs) {
    for (const [k, v] of Object.entries(run.details)) if (typeof v === "number") keys.add(k);
  }
  return [...keys].map((k) => {
    const values = result.runs.map((r) => r.details[k]).filter((v): v is number =>
      typeof v === "number"
    );
    return `${k} ${formatDetail(median(values))}`;
  }).join(", ");
}

function allFiguresTable(input: ReportInput): string {
  const lines = [
    "| id | what | metric | median | runs | details (medians) | settings |",
    "| --- | --- | --- | ---: | --- | --- | --- |",
  ];
  for (const result of input.results) {
    for (const metric of result.benchmark.metrics) {
      const runs = result.runs.map((r) =>
        formatValue(r.values[metric.key] ?? Number.NaN, metric.unit)
      );
      const errors = result.errors.length > 0 ? ` FAILED: ${result.errors.join("; ")}` : "";
      lines.push(
        `| ${result.benchmark.id} | ${escapeCell(result.benchmark.title)} | ${metric.key} | ${
          formatValue(medianOf(result, metric.key), metric.unit)
        } | ${runs.join(", ")}${escapeCell(errors)} | ${escapeCell(detailMedians(result))} | ${
          escapeCell(result.benchmark.settings)
        } |`,
      );
    }
  }
  return lines.join("\n") + "\n";
}

function figureLookup(input: Pick<ReportInput, "results">): FigureOf {
  const byId = new Map(input.results.map((r) => [r.benchmark.id, r]));
  return (id, key) => medianOf(byId.get(id), key);
}

interface TargetRow {
  workload: string;
  target: string;
  measured: string;
  met: boolean | null;
}

function targetRows(input: ReportInput): TargetRow[] {
  const figure = figureLookup(input);
  return input.targets.map((t) => ({ workload: t.workload, target: t.target, ...t.check(figure) }));
}

/** Each target with the figures it was judged on, as markdown (also printed to stdout). */
export function targetTable(input: ReportInput): string {
  const rows = targetRows(input);
  if (rows.length === 0) return "";
  return [
    "| workload | target | measured (medians) | met |",
    "| --- | --- | --- | --- |",
    ...rows.map((r) =>
      `| ${r.workload} | ${escapeCell(r.target)} | ${escapeCell(r.measured)} | ${
        r.met === null ? "not measured" : r.met ? "yes" : "**no**"
      } |`
    ),
  ].join("\n") + "\n";
}

function targetSection(input: ReportInput): string {
  const table = targetTable(input);
  if (!table) return "";
  return [
    "## Targets (issue 5)",
    "",
    table,
    "Judged on this run's medians (soaks: one run, the median over their samples). " +
    "\"not measured\": a figure the target needs (a peer's, a floor's) was not run.",
    "",
    "What limits each target that is not met, with its profile or plan and how far it is: " +
    "[docs/performance.md](../../docs/performance.md).",
    "",
  ].join("\n");
}

function reportView(input: Pick<ReportInput, "results">): ReportView {
  const benchmarks = input.results.map((r) => r.benchmark);
  return {
    figure: figureLookup(input),
    benchmarks: (prefix) =>
      benchmarks.filter((b) => b.id === prefix || b.id.startsWith(`${prefix}/`)).map((b) => ({
        id: b.id,
        system: b.system,
        metrics: b.metrics,
      })),
  };
}

interface IssueTargetRow {
  workload: string;
  target: string;
  measured: string;
  ratio: string;
  met: "yes" | "no" | "not measured" | "not run";
}

/** Each of issue 14's targets with its figures, ratio and verdict ("not run" when none of its benchmarks was selected). */
export function issue14Rows(
  input: Pick<ReportInput, "results" | "issue14Targets">,
): IssueTargetRow[] {
  return issueRows(input, input.issue14Targets);
}

/** Any issue's targets, judged on this run (issue14Rows, issue 15's). */
function issueRows(input: Pick<ReportInput, "results">, targets: IssueTarget[]): IssueTargetRow[] {
  const view = reportView(input);
  return targets.map((t) => {
    const base = { workload: t.workload, target: t.target };
    if (t.needs.every((id) => view.benchmarks(id).length === 0)) {
      return { ...base, measured: "not run", ratio: "", met: "not run" };
    }
    const { measured, ratio, met } = t.check(view);
    return { ...base, measured, ratio, met: met === null ? "not measured" : met ? "yes" : "no" };
  });
}

/** Issue 14's targets as markdown (also printed to stdout). */
export function issue14Table(input: Pick<ReportInput, "results" | "issue14Targets">): string {
  return targetsTable(issue14Rows(input));
}

/** Issue 15's targets as markdown (also printed to stdout). */
export function issue15Table(input: Pick<ReportInput, "results" | "issue15Targets">): string {
  return targetsTable(issueRows(input, input.issue15Targets ?? []));
}

function targetsTable(rows: IssueTargetRow[]): string {
  if (rows.length === 0) return "";
  return [
    "| workload | target | measured (medians, same run) | ratio | met |",
    "| --- | --- | --- | ---: | --- |",
    ...rows.map((r) =>
      `| ${r.workload} | ${escapeCell(r.target)} | ${escapeCell(r.measured)} | ${
        escapeCell(r.ratio)
      } | ${r.met === "no" ? "**no**" : r.met} |`
    ),
  ].join("\n") + "\n";
}

function issue15Section(input: ReportInput): string {
  const table = issue15Table(input);
  if (!table) return "";
  return [
    "## Issue 15 targets (flow control)",
    "",
    table,
    "W14 is the issue's W12 (that name was taken by the scheduler's ceiling): 20 keys under " +
    "a concurrency limit of 2, 10,000 jobs of 20 ms, 2 consumer processes of concurrency 40; " +
    "the overlap is read from each handler's own start and finish.",
    "",
  ].join("\n");
}

function issue14Section(input: ReportInput): string {
  const table = issue14Table(input);
  if (!table) return "";
  return [
    "## Issue 14 targets",
    "",
    table,
    "Judged on this run's medians (W5: of 5 runs unless --runs was given; W8, W9 and W11: " +
    'one run, each a median over its own samples or claims). "not run": none of the ' +
    'target\'s workloads was selected; "not measured": a figure it needs is missing (a run ' +
    "failed, or no peer ran). Best peer: the fastest of the peers that ran in this bench run.",
    "",
  ].join("\n");
}

/** W10's statements, last run of each system, and every W8/W9 sample. */
function timelineSection(input: ReportInput): string {
  const parts: string[] = [];
  for (const result of input.results) {
    const last = result.runs.at(-1);
    if (!last) continue;
    const top = last.details.top as
      | { query: string; calls: number; per_s: number }[]
      | undefined;
    if (result.benchmark.workload === "W10" && top) {
      parts.push(
        `### ${result.benchmark.id}: top statements (last run)\n\n` +
          "| statement | calls | per s |\n| --- | ---: | ---: |\n" +
          top.map((s) => `| \`${escapeCell(s.query)}\` | ${s.calls} | ${s.per_s.toFixed(2)} |`)
            .join("\n") +
          "\n",
      );
    }
    const samples = last.details.samples as
      | {
        t: number;
        rate: number;
        backlog: number;
        size_mb: number;
        live: number;
        dead: number;
        autovacuums: number;
      }[]
      | undefined;
    if (samples) {
      parts.push(
        `### ${result.benchmark.id}: samples (last run)\n\n` +
          "| t (s) | done/s | backlog | table+indexes MB | live tuples | dead tuples | autovacuums |\n" +
          "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n" +
          samples.map((s) =>
            `| ${s.t.toFixed(0)} | ${Math.round(s.rate)} | ${s.backlog} | ${
              s.size_mb.toFixed(1)
            } | ${s.live} | ${s.dead} | ${s.autovacuums} |`
          ).join("\n") + "\n",
      );
    }
    const order = last.details.start_order;
    if (typeof order === "string") {
      parts.push(
        `### ${result.benchmark.id}: start order after the newcomer's enqueue (last run)\n\n` +
          "One letter per job start, in start order, from the newcomer's enqueue committing " +
          "to its last start: A for the busy key's jobs, B for key B's, P for the " +
          "higher-priority job. Within one claim batch (up to the consumer's free slots) the " +
          "order is that of the handlers' dispatch, not of the claim's sort: read it batch by batch " +
          `(first ${order.length} shown):\n\n\`\`\`\n${
            order.match(/.{1,100}/g)?.join("\n") ?? ""
          }\n\`\`\`\n`,
      );
    }
  }
  return parts.length === 0 ? "" : `## Details of W5, W8, W9 and W10\n\n${parts.join("\n")}`;
}

function profileSection(input: ReportInput): string {
  const parts: string[] = [];
  for (const result of input.results) {
    const profile = result.runs.at(-1)?.details.profile as StatementProfile | undefined;
    if (!profile) continue;
    parts.push(
      `### ${result.benchmark.id}\n\n` +
        `${profile.statements_per_job.toFixed(2)} top-level statements per job, ` +
        `${profile.server_ms_per_job.toFixed(3)} ms server execution per job, ` +
        `${Math.round(profile.wal_bytes_per_job)} WAL bytes per job (last run).\n\n` +
        "| statement | top-level | calls | rows | total ms | mean ms | WAL bytes |\n" +
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |\n" +
        profile.top.map((s) =>
          `| \`${escapeCell(s.query)}\` | ${s.toplevel ? "yes" : "no"} | ${s.calls} | ${s.rows} | ${
            s.total_ms.toFixed(1)
          } | ${s.mean_ms.toFixed(3)} | ${s.wal_bytes} |`
        ).join("\n") + "\n",
    );
  }
  return parts.length === 0 ? "" : `## Profile (pg_stat_statements)\n\n${parts.join("\n")}`;
}

/**
 * How many runs the figures are medians of: the count most workloads ran, then the
 * workloads that ran another count (`3 runs (W5: 5; W8, W9, W11: 1)`).
 */
export function runsNote(input: Pick<ReportInput, "runs" | "results">): string {
  const plural = (n: number) => `${n} run${n === 1 ? "" : "s"}`;
  const attempts = input.results.map((r) => ({
    workload: r.benchmark.workload,
    n: r.runs.length + r.errors.length,
  }));
  // The workloads that ran each count; the usual count is the one most workloads ran
  // (on a tie, the larger).
  const byCount = new Map<number, Set<string>>();
  for (const a of attempts) byCount.set(a.n, (byCount.get(a.n) ?? new Set()).add(a.workload));
  const counts = [...byCount.entries()].sort((x, y) => y[1].size - x[1].size || y[0] - x[0]);
  const usual = counts[0]?.[0] ?? input.runs;
  if (counts.length <= 1) return plural(usual);
  const parts = counts.slice(1).sort((x, y) => y[0] - x[0]).map(([n, workloads]) =>
    `${[...workloads].join(", ")}: ${n}`
  );
  return `${plural(usual)} (${parts.join("; ")})`;
}

/** The whole markdown report. */
export function markdownReport(input: ReportInput): string {
  const s = input.sizes;
  const settings = input.server.settings.map((x) =>
    `| ${x.name} | ${escapeCell(x.setting)}${x.unit ? ` (${x.unit})` : ""} | ${x.source} |`
  );
  const env = Object.entries(input.environment).map(([k, v]) => `- ${k}: ${v}`);
  return [
    `# shoal benchmark${input.profile ? " (profile run: figures not comparable)" : ""}`,
    "",
    `Run ${input.startedAt.toISOString()}, ${
      input.seconds.toFixed(0)
    } s, with \`${input.command}\`.`,
    `Each figure is the median of ${runsNote(input)}${
      input.quick ? " (quick smoke mode: small sizes, not representative)" : ""
    }; every run starts from a fresh database with the schema installed from empty.`,
    "",
    besideSection(input),
    issue14Section(input),
    issue15Section(input),
    targetSection(input),
    peerSection(input),
    "## shoal beside its floors",
    "",
    summaryTable(input),
    "Ratio: shoal's figure divided by the floor's. For throughput, 1.00× means shoal reaches " +
    "the floor (higher is better); for latency, it is how many times the floor's latency " +
    "shoal takes (lower is better).",
    "",
    "## Workloads",
    "",
    `- W1a: enqueue ${s.jobs.toLocaleString("en-US")} no-op jobs, one per call.`,
    `- W1b: enqueue ${s.jobs.toLocaleString("en-US")} no-op jobs in calls of ${
      s.bulkBatch.toLocaleString("en-US")
    }.`,
    `- W2: drain ${
      s.jobs.toLocaleString("en-US")
    } pre-enqueued no-op jobs with one consumer process, ` +
    "from the moment it logs that its loop started to the moment the bench (polling every 10 ms) " +
    "sees the queue empty (every job acked). Process boot and schema checks are not counted.",
    `- W3: ${s.latencyJobs.toLocaleString("en-US")} jobs offered one per call at a steady ` +
    `${s.latencyRate}/s (open loop) to an idle consumer process; latency = the handler's clock when ` +
    "it starts minus the producer's clock just before it called enqueue (one machine, one clock). " +
    "The handler then writes both to an unlogged table, after taking its start.",
    `- W4: one fan-out of ${s.fanOutChildren.toLocaleString("en-US")} no-op children plus one ` +
    "no-op callback (shoal only), started as a user would with `startExecution` of the built-in " +
    "`shoal.chord` task before the consumer starts, then drained by one consumer process with " +
    "W2's default settings, from the moment it logs that its loop started until the bench " +
    "(polling shoal.executions every 10 ms) sees the execution completed. The time covers the " +
    "chord job opening the barrier and enqueueing the children, every child's ack and arrival, " +
    "and the callback; time per child = that time ÷ children, set beside W2's time per plain " +
    "job from the same run. The details split it as the polls saw it: open_s (until the " +
    "barrier existed), children_s (while it was open), callback_s (until completed). A run " +
    "fails unless the execution ends completed with no job, barrier, arrival or dead job left.",
    `- W5 (noisy neighbour, bench/fairness.ts): fairness key A holds ${
      s.neighbourSizes.map((n) => n.toLocaleString("en-US")).join(", ")
    } ready jobs (one benchmark each: ` +
    `${s.neighbourSizes.map((n) => `W5/shoal/a${sizeLabel(n)}`).join(", ")}) on one queue, ` +
    "loaded in one insert and vacuumed; one consumer process (defaults) drains them; once 200 " +
    `of them have started, key B enqueues ${s.newcomerJobs} jobs in one call. Every job ` +
    "records its start and fairness key (bench.stamp); the figure is how many A jobs started " +
    "after B's enqueue call returned (committed) and no later than B's last start. " +
    `W5/shoal/priority: key A holds ${s.priorityBacklog.toLocaleString("en-US")} ready jobs ` +
    "at priority 0; once the consumer has claimed at least half its default prefetch ahead " +
    "(a full buffer), one job at priority 1 is enqueued; the figure is how many A jobs " +
    "started after that call committed and no later than that job's start. Medians of 5 " +
    "runs unless --runs is given (issue 14). Peers are not " +
    "measured: graphile-worker has no fairness key (its named queues serialise jobs, they do " +
    "not share a queue fairly), pg-boss 12's groups cap concurrency per group " +
    "(groupConcurrency) rather than share slots fairly, and open-source BullMQ has neither " +
    "(its groups are BullMQ Pro's); measuring that needs its own setup.",
    `- W6 (consumer RSS): VmRSS of one consumer process from /proc/<pid>/status, sampled ` +
    `every 250 ms for ${
      s.idleRssMs / 1000
    } s on an empty queue (from its started line on), and every 20 ms ` +
    "while it drains W2's jobs (a fresh database and process for each phase). Peak = the " +
    "largest sample in the phase, steady = their median; VmHWM (boot included) is in the " +
    "details. Peers: their worker process, the same way.",
    `- W7 (consumer processes): 1, 2, 4 and 8 consumer processes (defaults each) started on an ` +
    `empty queue; once all have logged their start, ${
      s.scalingJobs.toLocaleString("en-US")
    } jobs are enqueued in one call (one commit, NOTIFY on); throughput from that call's ` +
    "return until the queue is empty. Peers: the same, with their worker process.",
    ...input.soakNotes.map((line) => `- ${line}`),
    `- W11 (claim time by size, bench/claim_size.ts, the benchmark W11/shoal): one database ` +
    `per size, its queue holding ${
      s.claimSizes.map((n) => n.toLocaleString("en-US")).join(", ")
    } ready jobs loaded in one \`insert … select … from generate_series\` (fair_seq ` +
    "increasing, run_at in the past), then `vacuum analyze`. On one connection per database, " +
    `lib/queue.ts's claim() of ${s.claimBatch} jobs (the most a default consumer claims at ` +
    "once: --concurrency plus --prefetch), then ack() of them and enqueueMany() of as many at " +
    "the tail (NOTIFY off); the sizes take turns, one claim each per round in rotating order, " +
    `so load from elsewhere falls on all alike: ${s.claimWarmup} rounds of warm-up, then ` +
    `${s.claimCount} timed. Each size's figure (claim_ms_<size>) is the median wall time of ` +
    "one claim (a loopback round trip: server time plus about 0.1 ms); the queue keeps its " +
    "size, and each claim walks what the acks before it left (dead entries at the index's " +
    "head until pruning or autovacuum). Load times, p90/p99, the table's size and dead " +
    "tuples at the end are in the details. Once per bench run unless --runs is given; shoal " +
    "only, not --beside (the loop runs this tree's lib/queue.ts in the bench process).",
    "- Floors: pgbench on the same server in the same run; the hand-written queue is a minimal " +
    "SKIP LOCKED queue on the same client (postgres.js in Deno, one process, bench/handwritten*.ts) " +
    "measured by exactly the same workload code as shoal.",
    "- Peers (W1a, W1b, W2, W3, W6, W7, W10): graphile-worker, pg-boss and BullMQ on its " +
    "PostgreSQL backend at the versions bench/peers/package.json pins, measured by the same " +
    "workload code as shoal on the same server: each run installs the peer's schema in a " +
    "fresh database, W1a/W1b/W3 enqueue through the peer's own API, W2/W3 run one worker " +
    "process of the peer on Node.js (bench/peers/*.cjs). W2 ends when no job of the peer is " +
    "left to do (graphile-worker deletes completed jobs, BullMQ too with removeOnComplete; " +
    "pg-boss keeps them as completed). The peers' W3 handlers take their clock first, like " +
    "shoal's (pg-boss's handler gets a batch: one clock for the batch). Not measured for " +
    "peers: W4 (the fan-out driver is shoal's; BullMQ's flows could express one), W5 (above), " +
    "W8/W9 (a soak each would triple the run) and W12 (shoal's scheduler ceiling).",
    "",
    "## Environment",
    "",
    ...env,
    `- Postgres: ${input.server.version}`,
    `- Data directory: ${input.server.storage}`,
    "",
    "Server settings that differ from Postgres's built-in defaults (everything else, " +
    "including fsync, synchronous_commit, full_page_writes and wal_level, is the default):",
    "",
    "| setting | value | source |",
    "| --- | --- | --- |",
    ...settings,
    "",
    "## All figures",
    "",
    allFiguresTable(input),
    timelineSection(input),
    profileSection(input),
  ].join("\n");
}

/** The JSON beside the markdown: every run's values and details. */
export function jsonReport(input: ReportInput): unknown {
  const byId = new Map(input.results.map((r) => [r.benchmark.id, r]));
  return {
    generated_at: input.startedAt.toISOString(),
    seconds: input.seconds,
    command: input.command,
    runs: input.runs,
    quick: input.quick,
    profile: input.profile,
    sizes: input.sizes,
    environment: input.environment,
    server: {
      version: input.server.version,
      storage: input.server.storage,
      owned: input.server.owned,
      settings: input.server.settings,
    },
    benchmarks: input.results.map((r) => ({
      id: r.benchmark.id,
      workload: r.benchmark.workload,
      system: r.benchmark.system,
      title: r.benchmark.title,
      settings: r.benchmark.settings,
      metrics: r.benchmark.metrics,
      median: Object.fromEntries(r.benchmark.metrics.map((m) => [m.key, medianOf(r, m.key)])),
      runs: r.runs,
      errors: r.errors,
    })),
    peers: input.peers,
    peer_comparisons: input.peerComparisons.map((c, i) => {
      const row = peerRows(input)[i]!;
      return {
        ...c,
        subject_value: row.values.shoal,
        best_peer: row.values.bestPeer,
        best_peer_value: row.values.best,
        ratio: row.values.ratio,
      };
    }),
    targets: targetRows(input),
    issue14_targets: issue14Rows(input),
    issue15_targets: issueRows(input, input.issue15Targets ?? []),
    beside: input.beside === null ? null : {
      system: input.beside.system,
      ref: input.beside.ref,
      sha: input.beside.sha,
      rows: besideRows(input).map((row) => ({
        subject: row.subject,
        beside: row.beside,
        metric: row.metric.key,
        unit: row.metric.unit,
        subject_median: row.shoal.median,
        subject_runs: row.shoal.runs,
        beside_median: row.other.median,
        beside_runs: row.other.runs,
        ratio: row.ratio,
        noise_band: row.band,
        within_noise: row.withinNoise,
      })),
    },
    comparisons: input.comparisons.map((c) => {
      const s = medianOf(byId.get(c.subject), c.metric);
      const f = c.floor ? medianOf(byId.get(c.floor), c.floorMetric ?? c.metric) : null;
      return { ...c, subject_value: s, floor_value: f, ratio: f ? s / f : null };
    }),
  };
}
