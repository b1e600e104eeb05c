/**
 * `deno task bench`: shoal's benchmark beside its floors, on one Postgres, in one run.
 *
 *   deno task bench                  3 runs of everything, median per figure (several minutes)
 *   deno task bench --runs 5         more runs
 *   deno task bench --quick          1 run at small sizes: a smoke test, under a minute
 *   deno task bench --only W2,W3     only these workloads, benchmark ids (W2/shoal) or
 *                                    systems (shoal, graphile-worker, pg-boss, hand-written)
 *   deno task bench --profile        pg_stat_statements per run (preloaded: figures are
 *                                    not comparable; writes results/profile.* instead)
 *
 * Uses DATABASE_URL when set; otherwise starts a throwaway cluster with Postgres's
 * defaults (fsync on) and stops it at the end. Writes bench/results/latest.md and
 * latest.json and prints the summary table to stdout; progress goes to stderr.
 *
 * Peers (issue 5): graphile-worker and pg-boss (peers.ts) run W1a, W1b, W2 and W3 beside
 * shoal; their packages (and the Node.js they need) are installed under bench/peers/ with
 * `npm ci` when missing. Adding a system: implement `System` (systems.ts) and add it to
 * `plan()`; every workload then measures it the same way.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { handWritten } from "./handwritten.ts";
import {
  type BenchServer,
  machineLoad,
  print,
  say,
  startServer,
  stopAllChildren,
} from "./harness.ts";
import { ensurePeersInstalled, PEER_SYSTEMS, PEER_VERSIONS } from "./peers.ts";
import { pgbenchClaim, pgbenchInsert } from "./pgbench.ts";
import {
  type BenchmarkResult,
  type Comparison,
  formatValue,
  jsonReport,
  markdownReport,
  type PeerComparison,
  peerTable,
  summaryTable,
} from "./report.ts";
import { shoal } from "./systems.ts";
import {
  type BenchContext,
  type Benchmark,
  drain,
  enqueueBulk,
  enqueueOneByOne,
  fanOutDrain,
  type Sizes,
  startLatency,
} from "./workloads.ts";

const FULL: Sizes = {
  jobs: 20_000,
  bulkBatch: 1_000,
  latencyJobs: 2_000,
  latencyRate: 100,
  fanOutChildren: 10_000,
};
const QUICK: Sizes = {
  jobs: 2_000,
  bulkBatch: 1_000,
  latencyJobs: 200,
  latencyRate: 100,
  fanOutChildren: 1_000,
};
/** Issue 5's W4 target: time per child at most this many times W2's time per job. */
const FAN_OUT_TARGET = 1.5;
/** The W2 variant with more slots than the default. */
const HIGH_CONCURRENCY = 100;

interface Plan {
  benchmarks: Benchmark[];
  comparisons: Comparison[];
  peerComparisons: PeerComparison[];
}

/** How the bench enqueues through each peer, for the report. */
const PEER_ENQUEUE: Record<string, string> = {
  "graphile-worker":
    "its SQL API on the bench's postgres.js pool (the same client as shoal): select graphile_worker.add_job(identifier, payload) per job (W1a, W3), graphile_worker.add_jobs(job_spec[]) per batch (W1b, W2's pre-enqueue); graphile-worker always sends a NOTIFY per call",
  "pg-boss":
    "its own client (new PgBoss({ max: pool size }), its own pg pool) in the bench process: boss.send(queue, data) per job (W1a, W3), boss.insert(queue, jobs) per batch (W1b, W2's pre-enqueue); the queue's notify option sends a NOTIFY per job",
};

/** What to measure and which figure sits beside which floor. */
function plan(sizes: Sizes): Plan {
  const floor = handWritten({ ack: false });
  const floorAck = handWritten({ ack: true });
  // The at-least-once floor with shoal's default batch (its claim takes at most its free
  // slots, 10 by default): separates the cost of small batches from shoal's own.
  const floorAck10 = handWritten({ ack: true, batch: 10 });
  const benchmarks: Benchmark[] = [
    enqueueOneByOne(shoal, { inFlight: 10, notify: true }),
    enqueueOneByOne(shoal, { inFlight: 10, notify: false }),
    enqueueOneByOne(floor, { inFlight: 10, notify: true }),
    enqueueOneByOne(floor, { inFlight: 10, notify: false }),
    pgbenchInsert({ clients: 10 }),
    enqueueBulk(shoal, { batch: sizes.bulkBatch }),
    enqueueBulk(floor, { batch: sizes.bulkBatch }),
    drain(shoal),
    // Right after W2/shoal, so the figure it is set beside ran in similar conditions.
    fanOutDrain(shoal),
    drain(shoal, { concurrency: HIGH_CONCURRENCY }),
    drain(floor),
    drain(floorAck),
    drain(floorAck10),
    pgbenchClaim({ batch: 1, clients: 10 }),
    pgbenchClaim({ batch: 100, clients: 1 }),
    startLatency(shoal),
    startLatency(floor),
    // The peers last, workload by workload, so a failing peer cannot delay shoal's figures.
    ...PEER_SYSTEMS.map((peer) => enqueueOneByOne(peer, { inFlight: 10, notify: true })),
    ...PEER_SYSTEMS.map((peer) => enqueueBulk(peer, { batch: sizes.bulkBatch })),
    ...PEER_SYSTEMS.map((peer) => drain(peer)),
    ...PEER_SYSTEMS.map((peer) => startLatency(peer)),
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
  return { benchmarks, comparisons, peerComparisons };
}

interface Args {
  runs: number;
  quick: boolean;
  profile: boolean;
  only: string[];
}

function parse(argv: string[]): Args {
  const { values } = parseArgs({
    args: argv,
    options: {
      runs: { type: "string" },
      quick: { type: "boolean", default: false },
      profile: { type: "boolean", default: false },
      only: { type: "string" },
      help: { type: "boolean", default: false },
    },
    strict: true,
  });
  if (values.help) {
    print("Usage: deno task bench [--runs N] [--quick] [--only W1a,W2,...] [--profile]\n");
    Deno.exit(0);
  }
  const runs = values.runs === undefined ? (values.quick ? 1 : 3) : Number(values.runs);
  if (!Number.isInteger(runs) || runs < 1 || runs > 50) {
    throw new Error(`Invalid --runs "${values.runs}": expected an integer from 1 to 50`);
  }
  const only = values.only ? values.only.split(",").map((s) => s.trim()).filter(Boolean) : [];
  return { runs, quick: values.quick, profile: values.profile, only };
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

async function environment(server: BenchServer): Promise<Record<string, string>> {
  return {
    source: await sourceState(),
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

async function runAll(args: Args): Promise<number> {
  const sizes = args.quick ? QUICK : FULL;
  const { benchmarks, comparisons, peerComparisons } = plan(sizes);
  const chosen = benchmarks.filter((b) => selected(b, args.only));
  if (chosen.length === 0) throw new Error(`--only ${args.only.join(",")} matches no benchmark`);
  const peersChosen = PEER_SYSTEMS.filter((p) => chosen.some((b) => b.system === p.name));
  if (peersChosen.length > 0) await ensurePeersInstalled();
  const startedAt = new Date();
  const t0 = performance.now();
  say(Deno.env.get("DATABASE_URL") ? "Using DATABASE_URL..." : "Starting a throwaway Postgres...");
  const server = await startServer({ profile: args.profile });
  const stopEverything = async () => {
    await stopAllChildren();
    await server.stop();
  };
  let interrupted = false;
  // Once interrupted, the workload still running loses its connections as Postgres
  // stops; those rejections are expected and must not end the process before cleanup.
  const onRejection = (event: PromiseRejectionEvent) => {
    if (interrupted) event.preventDefault();
  };
  const onSignal = () => {
    if (interrupted) Deno.exit(130);
    interrupted = true;
    say("Interrupted: stopping consumers and Postgres (again to exit at once)");
    stopEverything().finally(() => Deno.exit(130));
  };
  globalThis.addEventListener("unhandledrejection", onRejection);
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  let failures = 0;
  try {
    const env = await environment(server);
    const ctx: BenchContext = { server, sizes, profile: args.profile };
    const results: BenchmarkResult[] = chosen.map((benchmark) => ({
      benchmark,
      runs: [],
      errors: [],
    }));
    // Runs are interleaved (run 1 of everything, then run 2 ...) so a burst of load from
    // elsewhere on this shared machine spreads over all figures instead of sinking one.
    for (let run = 1; run <= args.runs; run++) {
      for (const result of results) {
        const b = result.benchmark;
        try {
          const measured = await b.run(ctx);
          // The machine is shared: keep how busy it was, so a noisy run can be told apart.
          measured.details.load_1m = Number((await machineLoad()).split(" ")[0]);
          result.runs.push(measured);
          say(`[run ${run}/${args.runs}] ${b.id}: ${describe(b, result)}`);
        } catch (error) {
          failures++;
          const message = error instanceof Error ? error.message : String(error);
          result.errors.push(`run ${run}: ${message.split("\n")[0]}`);
          say(`[run ${run}/${args.runs}] ${b.id} FAILED: ${message}`);
        }
      }
    }
    env["load average at end"] = await machineLoad();
    const input = {
      command: ["deno task bench", ...Deno.args].join(" "),
      startedAt,
      seconds: (performance.now() - t0) / 1000,
      runs: args.runs,
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
      peerComparisons: peerComparisons.filter((c) =>
        results.some((r) => r.benchmark.id === c.subject || c.peers.includes(r.benchmark.id))
      ),
      peers: peersChosen.map((p) => ({
        name: p.name,
        settings: p.defaultSettings,
        enqueue: PEER_ENQUEUE[p.name] ?? "not stated",
      })),
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
    print("\n" + (peers ? `${peers}\n` : "") + summaryTable(input));
    say(`Wrote bench/results/${base}.md and ${base}.json (${input.seconds.toFixed(0)} s)`);
  } finally {
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
    globalThis.removeEventListener("unhandledrejection", onRejection);
    await stopEverything();
  }
  return failures === 0 ? 0 : 1;
}

if (import.meta.main) {
  let code: number;
  try {
    code = await runAll(parse(Deno.args));
  } catch (error) {
    say(`bench: ${error instanceof Error ? error.message : String(error)}`);
    code = 1;
  }
  Deno.exit(code);
}
