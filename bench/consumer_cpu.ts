/**
 * CPU time per job of a draining consumer: the figure W2's gap is made of, measured in a
 * way a shared, noisy machine blurs less than throughput (a drain's wall time moves with
 * every other process; the CPU a process spends per job moves far less).
 *
 *   deno run -A bench/consumer_cpu.ts                      200,000 jobs, 3 runs, this tree
 *   deno run -A bench/consumer_cpu.ts --jobs 100000 --runs 5
 *   deno run -A bench/consumer_cpu.ts --tree /tmp/base --tree .
 *                                       two checkouts' main.ts, run after run in turn
 *   deno run -A bench/consumer_cpu.ts --v8-flags none --v8-flags=--max-semi-space-size=8
 *                                       V8 flags to compare (default: each tree's compile
 *                                       task's, as the bench; `none`: no flags)
 *   deno run -A bench/consumer_cpu.ts --profile /tmp/prof  also --cpu-prof: self time per
 *                                       module and the busiest functions
 *   deno run -A bench/consumer_cpu.ts --output /tmp/c      each consumer's output in
 *                                       /tmp/c-<run>-<variant>.log (with --trace-gc, say)
 *   deno run -A bench/consumer_cpu.ts --deno-args=--inspect=127.0.0.1:9229
 *                                       more `deno run` flags for the consumer
 *   deno run -A bench/consumer_cpu.ts --statements  the statements the drain sent (calls, rows
 *                                       per call, mean ms): pg_stat_statements preloaded
 *                                       (track top), which changes the server: its CPU
 *                                       figures are not comparable with a run without
 *   deno run -A bench/consumer_cpu.ts --jobs 20000 --idle-ms 10000
 *                                       W6's memory figures too: before the drain, a fresh
 *                                       consumer on the empty queue for that long, its RSS
 *                                       sampled every 250 ms (idle peak); VmHWM of the
 *                                       drain's consumer is W6's "under W2" peak
 *   deno run -A bench/consumer_cpu.ts -- --concurrency 24  extra consumer flags
 *
 * The variants (every tree with every V8 flag set) run in turn, the order rotating from
 * run to run, so a change of the machine's load touches them all alike. Each run: a fresh
 * database on a throwaway cluster (`startLocalPg()`, Postgres defaults, fsync on; or the
 * server of DATABASE_URL), migrated by the tree's own `main.ts migrate`; `--jobs` ready
 * `shoal.noop` jobs inserted 5,000 per statement (NOTIFY off), then
 * `vacuum (analyze) shoal.jobs`, so autovacuum does not start in the middle of the drain;
 * then one real `main.ts --role consumer` (its defaults: concurrency 10, prefetch 500).
 * From its "started" line until the table is empty: the consumer process's user+system
 * CPU (/proc/<pid>/stat: every thread, the GC's helpers included) and its Postgres
 * backends' (pg_stat_activity's pids on that database, this script's connections left
 * out), each divided by the jobs. Also the wall time and jobs/s (indicative only on a
 * shared machine), the consumer's VmHWM (its peak RSS, boot included), and how busy the
 * consumer and the busiest backend (the claims') were: CPU over the drain's wall time.
 * Prints one markdown row per run and the medians per variant. The consumer's pid goes to
 * stderr as the drain starts, for strace or perf from another shell.
 *
 * Read with care: a CPU profile's self time counts time the thread was preempted as well
 * (a loopback `sendto` wakes the Postgres backend, which may take the core at once), so
 * its native frames (`writeBuffer`) overstate what they cost; /proc's figures do not.
 *
 * @module
 */
import { parseArgs } from "node:util";
import {
  type BenchServer,
  Child,
  cpuSeconds,
  freshDb,
  median,
  memoryOf,
  print,
  sleep,
  startServer,
} from "./harness.ts";
import type { Sql } from "../lib/db.ts";
import { profileRead, profileReset } from "./profile.ts";

const QUEUE = "default";
const CHUNK = 5_000;

interface RunFigures {
  /** With --statements: the top-level statements of the drain, one line each. */
  statements?: string;
  /** With --idle-ms: the largest RSS of a fresh consumer on the empty queue, MB. */
  idlePeakMb?: number;
  consumerUsPerJob: number;
  backendUsPerJob: number;
  seconds: number;
  jobsPerSecond: number;
  hwmMb: number;
  /** The busiest backend's CPU as a share of the drain's wall time (the claims' backend). */
  busiestBackend: number;
  /** The consumer's CPU as a share of the drain's wall time. */
  consumerBusy: number;
}

/** One thing measured: a tree's main.ts under some V8 flags. */
interface Variant {
  label: string;
  tree: URL;
  v8Flags: string[];
}

const { values: flags, positionals: extra } = parseArgs({
  args: Deno.args,
  options: {
    jobs: { type: "string", default: "200000" },
    runs: { type: "string", default: "3" },
    tree: { type: "string", multiple: true },
    "v8-flags": { type: "string", multiple: true },
    profile: { type: "string" },
    output: { type: "string" },
    "deno-args": { type: "string" },
    statements: { type: "boolean", default: false },
    "idle-ms": { type: "string" },
  },
  allowPositionals: true,
});
const jobs = Number(flags.jobs);
const runs = Number(flags.runs);
if (!Number.isInteger(jobs) || jobs < 1 || !Number.isInteger(runs) || runs < 1) {
  throw new Error("Invalid --jobs or --runs: expected positive integers");
}
const denoArgs = flags["deno-args"]?.split(" ").filter((a) => a !== "") ?? [];
const trees = (flags.tree ?? [new URL("../", import.meta.url).pathname]).map((path) =>
  new URL(`file://${Deno.realPathSync(path)}/`)
);
const flagSets: (string | undefined)[] = flags["v8-flags"] ?? [undefined];
const variants: Variant[] = trees.flatMap((tree) =>
  flagSets.map((given) => {
    const v8Flags = v8FlagsFor(tree, given);
    const label = [
      trees.length > 1 ? tree.pathname : "",
      flagSets.length > 1 ? v8Flags.join(" ") || "no V8 flags" : "",
    ].filter((part) => part !== "").join(", ") || "this tree";
    return { label, tree, v8Flags };
  })
);

/** `--v8-flags=...` of the tree's compile task (what users run), an override, or none. */
function v8FlagsFor(root: URL, given: string | undefined): string[] {
  if (given === "none") return [];
  if (given !== undefined) return [`--v8-flags=${given.replace(/^--v8-flags=/, "")}`];
  const config = JSON.parse(Deno.readTextFileSync(new URL("deno.json", root)));
  const compile: string = config.tasks?.["compile:entry"] ?? config.tasks?.compile ?? "";
  const flag = compile.split(" ").find((a) => a.startsWith("--v8-flags="));
  return flag ? [flag] : [];
}

/** A `main.ts` process of `tree`, run in the tree's root (its deno.json and lockfile). */
function mainTs(tree: URL, url: string, denoFlags: string[], args: string[]): Child {
  return new Child(
    `main.ts ${args.join(" ")}`,
    ["run", "-A", ...denoFlags, new URL("main.ts", tree).pathname, ...args],
    { DATABASE_URL: url },
    Deno.execPath(),
    tree.pathname,
  );
}

async function migrate(tree: URL, url: string): Promise<void> {
  const child = mainTs(tree, url, [], ["migrate"]);
  const status = await child.exited();
  if (status.code !== 0) throw new Error(`main.ts migrate failed:\n${child.output()}`);
}

async function enqueue(sql: Sql, n: number): Promise<void> {
  for (let done = 0; done < n; done += CHUNK) {
    const size = Math.min(CHUNK, n - done);
    await sql`
      select count(*) from shoal.insert_jobs(
        array_fill(${QUEUE}::text, array[${size}::integer]),
        array_fill('shoal.noop'::text, array[${size}::integer]),
        array_fill('{}'::jsonb, array[${size}::integer]), notify => false)`;
  }
  await sql`vacuum (analyze) shoal.jobs`;
}

/** CPU seconds so far of each backend serving the database (this script's left out). */
async function backendCpu(sql: Sql): Promise<Map<number, number>> {
  const rows = await sql<{ pid: number }[]>`
    select pid from pg_stat_activity
    where datname = current_database() and application_name <> 'shoal bench'
      and pid <> pg_backend_pid()`;
  const cpu = new Map<number, number>();
  for (const { pid } of rows) {
    const seconds = await cpuSeconds(pid);
    if (seconds !== null) cpu.set(pid, seconds);
  }
  return cpu;
}

/** CPU used between two readings per backend; one that connected meanwhile counts from zero. */
function backendDeltas(before: Map<number, number>, after: Map<number, number>): number[] {
  return [...after].map(([pid, seconds]) => seconds - (before.get(pid) ?? 0));
}

function isStartedLine(line: string): boolean {
  if (!line.startsWith("{")) return false;
  try {
    const record = JSON.parse(line) as Record<string, unknown>;
    return String(record.logger ?? "").endsWith("consumer") &&
      /started/i.test(String(record.message ?? ""));
  } catch {
    return false; // not a log record
  }
}

/** From the consumer's started line until the table is empty: what it and its backends spent. */
async function drain(sql: Sql, consumer: Child): Promise<RunFigures> {
  await consumer.waitForLine("its started line", isStartedLine, 60_000);
  const pid = consumer.process.pid;
  // deno-lint-ignore no-console -- a bench script's side channel, not a log
  console.error(`consumer pid ${pid}`);
  const t0 = performance.now();
  const cpu0 = await cpuSeconds(pid);
  const backends0 = await backendCpu(sql);
  for (;;) {
    const [row] = await sql<{ left: boolean }[]>`select exists (select 1 from shoal.jobs) as left`;
    if (!row!.left) break;
    if (performance.now() - t0 > 600_000) throw new Error("The drain took over 10 minutes");
    await sleep(20);
  }
  const seconds = (performance.now() - t0) / 1000;
  const cpu1 = await cpuSeconds(pid);
  const backends1 = await backendCpu(sql);
  const memory = await memoryOf(pid);
  if (cpu0 === null || cpu1 === null || memory === null) {
    throw new Error("Cannot read the consumer's /proc entry");
  }
  const backends = backendDeltas(backends0, backends1);
  return {
    consumerUsPerJob: ((cpu1 - cpu0) * 1e6) / jobs,
    backendUsPerJob: (backends.reduce((a, b) => a + b, 0) * 1e6) / jobs,
    seconds,
    jobsPerSecond: jobs / seconds,
    hwmMb: memory.hwmMb,
    busiestBackend: Math.max(0, ...backends) / seconds,
    consumerBusy: (cpu1 - cpu0) / seconds,
  };
}

async function oneRun(server: BenchServer, variant: Variant, tag: string): Promise<RunFigures> {
  const db = await freshDb(server, `cpu_${tag}`);
  try {
    await migrate(variant.tree, db.url);
    const idlePeakMb = flags["idle-ms"] === undefined
      ? undefined
      : await idlePeak(variant, db.url, Number(flags["idle-ms"]));
    await enqueue(db.sql, jobs);
    if (flags.statements) await profileReset(db.sql);
    const profileArgs = flags.profile
      ? [
        "--cpu-prof",
        `--cpu-prof-dir=${flags.profile}`,
        `--cpu-prof-name=consumer-${tag}.cpuprofile`,
      ]
      : [];
    const consumer = mainTs(variant.tree, db.url, [
      ...variant.v8Flags,
      ...profileArgs,
      ...denoArgs,
    ], ["--role", "consumer", ...extra]);
    let figures: RunFigures;
    try {
      figures = await drain(db.sql, consumer);
      if (flags.statements) figures.statements = await statementLines(db.sql);
    } catch (error) {
      await consumer.stop();
      throw error;
    }
    const status = await consumer.stop();
    if (flags.output) await Deno.writeTextFile(`${flags.output}-${tag}.log`, consumer.output());
    if (status.code !== 0) {
      throw new Error(
        `The consumer exited with code ${status.code}:\n${consumer.output().slice(-3000)}`,
      );
    }
    return { ...figures, idlePeakMb };
  } finally {
    await db.drop();
  }
}

/** The largest RSS of a fresh consumer on an empty queue over `ms`, sampled as W6 does. */
async function idlePeak(variant: Variant, url: string, ms: number): Promise<number> {
  const consumer = mainTs(variant.tree, url, variant.v8Flags, ["--role", "consumer", ...extra]);
  let peak = 0;
  try {
    await consumer.waitForLine("its started line", isStartedLine, 60_000);
    for (const end = performance.now() + ms; performance.now() < end;) {
      const memory = await memoryOf(consumer.process.pid);
      if (memory === null) throw new Error("The idle consumer exited");
      peak = Math.max(peak, memory.rssMb);
      await sleep(250);
    }
  } finally {
    await consumer.stop();
  }
  return peak;
}

/** The drain's top-level statements (this script's polls left out), per 1,000 jobs. */
async function statementLines(sql: Sql): Promise<string> {
  const profile = await profileRead(sql, jobs);
  return profile.top
    .filter((r) => r.toplevel && !r.query.includes("from shoal.jobs) as left"))
    .map((r) =>
      `  ${(r.calls * 1000 / jobs).toFixed(2)} calls per 1,000 jobs, ${
        (r.rows / r.calls).toFixed(0)
      } rows per call, ${r.mean_ms.toFixed(3)} ms mean: ${r.query.slice(0, 90)}`
    ).join("\n");
}

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
}

/** Where a profile's self time went: per module group, and the busiest functions. */
function summarizeProfile(path: string): string {
  const profile = JSON.parse(Deno.readTextFileSync(path)) as {
    nodes: ProfileNode[];
    samples: number[];
    timeDeltas: number[];
  };
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const selfUs = new Map<number, number>();
  for (let i = 0; i < profile.samples.length; i++) {
    const id = profile.samples[i]!;
    selfUs.set(id, (selfUs.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0));
  }
  const groups = new Map<string, number>();
  const functions = new Map<string, number>();
  let busy = 0;
  for (const [id, us] of selfUs) {
    const { functionName, url, lineNumber } = byId.get(id)!.callFrame;
    if (functionName === "(idle)" || functionName === "(program)") continue;
    busy += us;
    const group = functionName === "(garbage collector)"
      ? "V8 garbage collector"
      : /\/postgres@?[^/]*\/|\/postgres\/src\//.test(url)
      ? "postgres.js"
      : /\/lib\/[a-z_]+\.ts$/.test(url)
      ? `shoal ${url.slice(url.lastIndexOf("/lib/") + 1)}`
      : url.startsWith("ext:") || url.startsWith("node:")
      ? "Deno/Node runtime JS"
      : url === ""
      ? "native (no script; preempted time included)"
      : "other";
    groups.set(group, (groups.get(group) ?? 0) + us);
    const where = `${url.slice(url.lastIndexOf("/") + 1)}:${lineNumber + 1}`;
    const name = `${functionName || "(anonymous)"} ${where}`;
    functions.set(name, (functions.get(name) ?? 0) + us);
  }
  const rows = (m: Map<string, number>, top: number) =>
    [...m].sort((a, b) => b[1] - a[1]).slice(0, top).map(([k, us]) =>
      `| ${k} | ${(us / 1e6).toFixed(3)} s | ${((100 * us) / busy).toFixed(1)}% |`
    ).join("\n");
  const header = "| --- | ---: | ---: |";
  return `\n${path}: ${(busy / 1e6).toFixed(2)} s sampled, idle excluded\n\n` +
    `| where | self | share |\n${header}\n${rows(groups, 20)}\n\n` +
    `| function | self | share |\n${header}\n${rows(functions, 25)}\n`;
}

function row(label: string, r: RunFigures): string {
  const idle = r.idlePeakMb === undefined ? "" : ` idle peak ${r.idlePeakMb.toFixed(1)} MB |`;
  return `| ${label} | ${r.consumerUsPerJob.toFixed(2)} | ${r.backendUsPerJob.toFixed(2)} | ${
    r.seconds.toFixed(2)
  } | ${Math.round(r.jobsPerSecond)} | ${r.hwmMb.toFixed(0)} MB | ${
    (100 * r.consumerBusy).toFixed(0)
  }% | ${(100 * r.busiestBackend).toFixed(0)}% |${idle}\n`;
}

const server = await startServer({ profile: flags.statements, track: "top" });
const results = new Map<Variant, RunFigures[]>(variants.map((v) => [v, []]));
try {
  print(
    `consumer CPU per job: ${jobs} shoal.noop jobs, ${runs} runs of ${variants.length} ` +
      `variant(s), consumer flags ${extra.join(" ") || "defaults"}, load ${
        Deno.loadavg().map((l) => l.toFixed(1)).join(" ")
      }\n\n`,
  );
  print(
    "| run | consumer µs/job | backends µs/job | seconds | jobs/s | consumer VmHWM " +
      "| consumer busy | busiest backend busy |\n",
  );
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  const profiles: string[] = [];
  for (let run = 1; run <= runs; run++) {
    for (let k = 0; k < variants.length; k++) {
      const index = (k + run - 1) % variants.length;
      const variant = variants[index]!;
      const tag = `${run}-${index + 1}`;
      const figures = await oneRun(server, variant, tag);
      results.get(variant)!.push(figures);
      print(row(`${run}: ${variant.label}`, figures));
      if (figures.statements) print(`${figures.statements}\n`);
      if (flags.profile) profiles.push(`${flags.profile}/consumer-${tag}.cpuprofile`);
    }
  }
  for (const variant of variants) {
    const all = results.get(variant)!;
    const med = (pick: (r: RunFigures) => number) => median(all.map(pick));
    print(row(`median: ${variant.label}`, {
      consumerUsPerJob: med((r) => r.consumerUsPerJob),
      backendUsPerJob: med((r) => r.backendUsPerJob),
      seconds: med((r) => r.seconds),
      jobsPerSecond: med((r) => r.jobsPerSecond),
      hwmMb: med((r) => r.hwmMb),
      busiestBackend: med((r) => r.busiestBackend),
      consumerBusy: med((r) => r.consumerBusy),
      idlePeakMb: all[0]!.idlePeakMb === undefined ? undefined : med((r) => r.idlePeakMb!),
    }));
  }
  for (const path of profiles) print(summarizeProfile(path));
} finally {
  await server.stop();
}
