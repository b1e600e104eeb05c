/**
 * Systems under test. A workload only talks to a `System`, so a peer queue (issue 5)
 * plugs in by implementing this interface: install its schema, enqueue one job or a
 * batch, spawn one real consumer process, and say whether its queue is empty.
 *
 * @module
 */
import { pathToFileURL } from "node:url";
import type { Sql } from "../lib/db.ts";
import { startExecution } from "../lib/execution.ts";
import { loadMigrations, migrate } from "../lib/migrate.ts";
import { enqueue, enqueueMany, type JobSpec } from "../lib/queue.ts";
import { connect } from "../lib/db.ts";
import type { Checkout } from "./checkout.ts";
import { Child, epochMs } from "./harness.ts";

/** What a benchmark job does when it runs. */
export type BenchJob =
  /** Nothing (throughput). */
  | { kind: "noop" }
  /**
   * Record its start time beside `enqueuedAt` in `bench.starts` (start latency, W5's start
   * order); `fairnessKey` and `priority` where the system has them (W5; the system's
   * default when not given).
   */
  | { kind: "stamp"; enqueuedAt: number; fairnessKey?: string; priority?: number };

export interface ConsumerSpec {
  /** Jobs run at once; undefined means the system's default. */
  concurrency?: number;
  /** The consumer must know the `stamp` task (W3). */
  stamp: boolean;
}

/** One real consumer process of a system. */
export interface ConsumerProcess {
  /** Its process id (for CPU accounting). */
  pid: number;
  /** Epoch ms at which the consumer says it began working (after boot and schema checks). */
  started: Promise<number>;
  /** Stop it gracefully and wait for it to exit. */
  stop(): Promise<void>;
  /** Its output, for error messages. */
  output(): string;
}

/** Where a fan-out stands, read in one cheap statement (polled every 10 ms). */
export interface FanOutState {
  /** The workflow's status in the system's own words (`pending`, `running`, `completed` ...). */
  status: string;
  /** True once it has completed (the callback finished): the measured end. */
  completed: boolean;
  /** Why it ended without completing (failed, cancelled), or null while it can still complete. */
  failure: string | null;
  /** True while the fan-out waits for children (shoal: its barrier row exists). */
  open: boolean;
  /** Children arrived so far at the open fan-out (0 when none is open). */
  arrived: number;
}

/** A system that can fan out children and fan in to one callback (W4). */
export interface FanOutDriver {
  /** How a user starts the fan-out, stated in the report. */
  how: string;
  /**
   * Start a fan-out of `children` no-op children plus one no-op callback on `queue` the
   * way a user would (nothing runs it yet if no consumer is up). Returns its handle.
   */
  start(sql: Sql, options: { children: number; queue: string }): Promise<string>;
  state(sql: Sql, handle: string): Promise<FanOutState>;
  /**
   * What the finished fan-out left behind that it should not have (rows of jobs, barriers,
   * arrivals, dead jobs, or an execution not completed), one line each; empty when clean.
   */
  leftovers(sql: Sql, handle: string): Promise<string[]>;
}

/**
 * A producer: the client an application enqueues through, opened per measured run. Systems
 * on postgres.js get one from `sqlProducer`; a peer brings its own client library.
 */
export interface Producer {
  /** Enqueue one job in one call (the way an application enqueues per request). */
  enqueueOne(job: BenchJob, options: { notify: boolean }): Promise<void>;
  /** Enqueue many jobs in one call. */
  enqueueBatch(jobs: BenchJob[], options: { notify: boolean }): Promise<void>;
  /** Open `count` connections now, so connecting is not timed. */
  warm(count: number): Promise<void>;
  close(): Promise<void>;
}

export interface ProducerOptions {
  /** Connections in the producer's pool (W1a: one per call in flight). */
  max: number;
}

export interface System {
  /** Short name used in the table and the JSON (`shoal`, `graphile-worker`, `bullmq` ...). */
  name: string;
  /** The consumer settings a user gets by default, stated in the report. */
  defaultSettings: string;
  /** Install the system's schema in an empty database (`sql` and `url` both point at it). */
  install(sql: Sql, url: string): Promise<void>;
  /** Open a producer against `url`. */
  openProducer(url: string, options: ProducerOptions): Promise<Producer>;
  /** Start one consumer process against `url`. */
  spawnConsumer(url: string, spec: ConsumerSpec): ConsumerProcess;
  /**
   * True when no job is left (pending or running) in the benchmark's queue. Polled every
   * 10 ms during a drain, so it must stay cheap whatever the statistics say: order by the
   * primary key with a limit, so the planner walks the index (a plain `exists` turns into
   * a seq scan over the dead rows the drain leaves once the table has been analyzed).
   */
  isEmpty(sql: Sql): Promise<boolean>;
  /** Jobs in the benchmark's queue (a correctness check after enqueueing). */
  count(sql: Sql): Promise<number>;
  /**
   * Jobs removed from its jobs table since the database was created, from the server's
   * statistics (pg_stat_user_tables.n_tup_del: a busy backend reports at most every second,
   * one gone idle up to 10 s later; aborted deletes count too), for systems that delete
   * finished jobs. A backlog derived from it runs about a second of jobs high. The soaks read it instead of count(): a count walks the
   * whole heap, and while a snapshot is held that is millions of dead rows, every sample
   * (0.4 to 1 s of both cores every 5 s in W9, auto_explain), taken from the system
   * measured.
   */
  removed?(sql: Sql): Promise<number>;
  /** Fan-out / fan-in, for systems that have it (W4 measures only these). */
  fanOut?: FanOutDriver;
  /** The table holding its jobs, as a relation name (W8 and W9 sample its size). */
  jobsTable: string;
  /**
   * Start one process of a maintenance role (W10's idle fleet), for systems that run them
   * apart from their workers.
   */
  spawnRole?(url: string, role: MaintenanceRole, extra?: string[]): ConsumerProcess;
}

/** shoal's leader-elected roles beside its consumers. */
export type MaintenanceRole = "reaper" | "scheduler";

const ROOT = new URL("../", import.meta.url);

/** How a system on postgres.js enqueues, given the producer's pool. */
export interface SqlEnqueue {
  enqueueOne(sql: Sql, job: BenchJob, options: { notify: boolean }): Promise<void>;
  enqueueBatch(sql: Sql, jobs: BenchJob[], options: { notify: boolean }): Promise<void>;
}

/** Opens a postgres.js pool (lib/db.ts's `connect`, of this tree or of a checkout). */
export type Connect = (url: string, options: { applicationName: string; max?: number }) => Sql;

/** A producer over one postgres.js pool of `max` connections, opened by `open`. */
export function sqlProducer(
  url: string,
  options: ProducerOptions,
  how: SqlEnqueue,
  open: Connect = connect,
): Producer {
  const sql = open(url, { applicationName: "bench producer", max: options.max });
  return {
    enqueueOne: (job, o) => how.enqueueOne(sql, job, o),
    enqueueBatch: (jobs, o) => how.enqueueBatch(sql, jobs, o),
    async warm(count) {
      await Promise.all(Array.from({ length: count }, () => sql`select pg_sleep(0.05)`));
    },
    async close() {
      await sql.end({ timeout: 5 });
    },
  };
}

function shoalSpec(job: BenchJob): JobSpec {
  if (job.kind === "noop") return { task: "shoal.noop", payload: {} };
  const spec: JobSpec = { task: "bench.stamp", payload: { t: job.enqueuedAt } };
  if (job.fairnessKey !== undefined) spec.fairnessKey = job.fairnessKey;
  if (job.priority !== undefined) spec.priority = job.priority;
  return spec;
}

/** Parse the `@timestamp` of a JSON log line; NaN when it is not one. */
function logTime(line: string): number {
  try {
    const record = JSON.parse(line) as Record<string, unknown>;
    return Date.parse(String(record["@timestamp"]));
  } catch {
    // Not a JSON log line (a warning printed by Deno itself, say): it carries no time.
    return Number.NaN;
  }
}

/**
 * A role's "started" line (the consumer logs it right before its claim loop begins, the
 * reaper and scheduler before their leader loop).
 */
function isStartedLine(role: string, line: string): boolean {
  if (!line.startsWith("{")) return false;
  try {
    const record = JSON.parse(line) as Record<string, unknown>;
    return String(record.logger ?? "").endsWith(role) &&
      /started/i.test(String(record.message ?? ""));
  } catch {
    // A line that looks like JSON but is not a log record: not the one we wait for.
    return false;
  }
}

/**
 * A source tree of shoal whose `main.ts` the bench runs: this one, or a checkout of
 * another commit (`--beside`).
 */
interface ShoalTree {
  /** The system's name: `shoal`, or `shoal@<short sha>`. */
  name: string;
  /** Its root directory, ending in "/" (holds main.ts, deno.json, bench/bench_main.ts). */
  root: URL;
  /** The `--v8-flags=...` argument of its compile task; null when it has none. */
  v8Flags: string | null;
}

/**
 * The V8 flags shoal runs with, taken from `deno task compile` of the tree at `root` (the
 * compiled binary embeds them; `deno task shoal` passes the same), so the bench measures
 * what users run.
 */
function v8FlagsOf(root: URL): string | null {
  const path = new URL("deno.json", root);
  let config: { tasks?: Record<string, string> };
  try {
    config = JSON.parse(Deno.readTextFileSync(path));
  } catch (error) {
    throw new Error(`Cannot read the V8 flags from ${path.pathname}`, { cause: error });
  }
  // The flags live in compile:entry (`compile` runs it with main.ts); older trees (--beside)
  // kept them in compile itself.
  const compile = config.tasks?.["compile:entry"] ?? config.tasks?.compile ?? "";
  return compile.split(" ").find((a) => a.startsWith("--v8-flags=")) ?? null;
}

/** This tree's V8 flags: its compile task must have them (the bench measures what users run). */
function currentV8Flags(): string {
  const flags = v8FlagsOf(ROOT);
  if (flags === null) throw new Error("deno.json: the compile task has no --v8-flags");
  return flags;
}

/** This tree: the `shoal` system. */
const CURRENT_TREE: ShoalTree = { name: "shoal", root: ROOT, v8Flags: currentV8Flags() };

/**
 * One `main.ts` process of shoal from `tree` in `role`, with its defaults plus `extra`
 * flags. It runs in the tree's root, so Deno finds that tree's deno.json and lockfile.
 */
function spawnShoal(
  tree: ShoalTree,
  url: string,
  role: "consumer" | MaintenanceRole,
  entry: string,
  extra: string[],
): ConsumerProcess {
  const path = new URL(entry, tree.root).pathname;
  const v8 = tree.v8Flags === null ? [] : [tree.v8Flags];
  const args = ["run", "-A", ...v8, path, "--role", role, ...extra];
  const child = new Child(
    `${tree.name} ${role} (${entry})`,
    args,
    { DATABASE_URL: url },
    Deno.execPath(),
    tree.root.pathname,
  );
  const started = child.waitForLine(
    `its '${role} started' log line`,
    (line) => isStartedLine(role, line),
    60_000,
  ).then((line) => {
    const at = logTime(line);
    return Number.isNaN(at) ? epochMs() : at;
  });
  started.catch(() => {}); // the workload awaits it; a failure is reported there
  return {
    pid: child.process.pid,
    started,
    async stop() {
      const status = await child.stop();
      if (status.code !== 0) {
        throw new Error(
          `${tree.name} ${role} exited with code ${status.code}; its output:\n${
            child.output().slice(-3000)
          }`,
        );
      }
    },
    output: () => child.output(),
  };
}

/** shoal's fan-out: the built-in `shoal.chord` task started as a new execution. */
const shoalFanOut: FanOutDriver = {
  how:
    'startExecution(sql, { task: "shoal.chord", payload: { children: N × {task: "shoal.noop"}, ' +
    'callback: {task: "shoal.noop"} } }) (lib/execution.ts, the same as select shoal.start_execution(...))',
  async start(sql, options) {
    const children = Array.from({ length: options.children }, () => ({ task: "shoal.noop" }));
    return await startExecution(sql, {
      task: "shoal.chord",
      queue: options.queue,
      payload: { children, callback: { task: "shoal.noop" } },
    });
  },
  async state(sql, handle) {
    const [row] = await sql<
      { status: string; error: string | null; open: boolean; arrived: number }[]
    >`
      select e.status, e.error,
        b.id is not null as open, coalesce(b.total - b.remaining, 0)::integer as arrived
      from shoal.executions e
      left join lateral (
        select x.id, x.total, x.remaining from shoal.barriers x
        where x.execution_id = e.id order by x.id limit 1
      ) b on true
      where e.id = ${handle}::bigint`;
    if (!row) throw new Error(`Execution ${handle} is gone from shoal.executions`);
    const ended = row.status === "failed" || row.status === "cancelled";
    return {
      status: row.status,
      completed: row.status === "completed",
      failure: ended
        ? `execution ${handle} is ${row.status}: ${row.error ?? "no error recorded"}`
        : null,
      open: row.open,
      arrived: row.arrived,
    };
  },
  async leftovers(sql, handle) {
    const [row] = await sql<
      {
        status: string | null;
        jobs: number;
        barriers: number;
        arrivals: number;
        dead_jobs: number;
        executions: number;
      }[]
    >`
      select (select status from shoal.executions where id = ${handle}::bigint) as status,
        (select count(*) from shoal.jobs)::integer as jobs,
        (select count(*) from shoal.barriers)::integer as barriers,
        (select count(*) from shoal.arrivals)::integer as arrivals,
        (select count(*) from shoal.dead_jobs)::integer as dead_jobs,
        (select count(*) from shoal.executions)::integer as executions`;
    const found: string[] = [];
    if (row!.status !== "completed") {
      found.push(`execution ${handle} is ${row!.status ?? "missing"}, not completed`);
    }
    if (row!.executions !== 1) found.push(`${row!.executions} executions instead of 1`);
    for (const table of ["jobs", "barriers", "arrivals", "dead_jobs"] as const) {
      if (row![table] !== 0) found.push(`${row![table]} row(s) left in shoal.${table}`);
    }
    return found;
  },
};

/**
 * The library calls a producer makes (lib/db.ts's `connect`, lib/queue.ts's `enqueue` and
 * `enqueueMany`), from this tree or a checkout.
 */
interface ShoalLibrary {
  connect: Connect;
  enqueue(
    db: Sql,
    task: string,
    payload: Record<string, unknown> | undefined,
    options: { notify?: boolean },
  ): Promise<string>;
  enqueueMany(db: Sql, jobs: JobSpec[], options: { notify?: boolean }): Promise<unknown[]>;
}

const DEFAULT_SETTINGS =
  "consumer defaults: --concurrency 10, --poll-interval 2s, LISTEN on, --visibility-timeout 30s, prepared statements, JSON logs at info";

/**
 * A shoal system: producers through `library`, consumers and roles as `main.ts` processes
 * of `tree`, the schema put in place by `install`. Everything else is the same for every
 * tree, so two commits are measured the same way.
 */
function shoalSystem(
  tree: ShoalTree,
  library: ShoalLibrary,
  parts: Pick<System, "defaultSettings" | "install" | "fanOut">,
): System {
  return {
    name: tree.name,
    ...parts,
    openProducer: (url, options) =>
      Promise.resolve(sqlProducer(url, options, {
        async enqueueOne(sql, job, { notify }) {
          const spec = shoalSpec(job);
          await library.enqueue(sql, spec.task, spec.payload, { notify });
        },
        async enqueueBatch(sql, jobs, { notify }) {
          await library.enqueueMany(sql, jobs.map(shoalSpec), { notify });
        },
      }, library.connect)),
    spawnConsumer(url, spec) {
      // The stock binary for noop throughput; the bench entry (same `main`, one more task)
      // when jobs must record their start.
      const entry = spec.stamp ? "bench/bench_main.ts" : "main.ts";
      const extra = spec.concurrency === undefined
        ? []
        : ["--concurrency", String(spec.concurrency)];
      return spawnShoal(tree, url, "consumer", entry, extra);
    },
    spawnRole: (url, role, extra = []) => spawnShoal(tree, url, role, "main.ts", extra),
    jobsTable: "shoal.jobs",
    async isEmpty(sql) {
      const [row] = await sql<{ empty: boolean }[]>`
        select not exists (select 1 from shoal.jobs order by id limit 1) as empty`;
      return row!.empty;
    },
    async count(sql) {
      const [row] = await sql<{ n: number }[]>`
        select count(*)::integer as n from shoal.jobs where queue = 'default'`;
      return row!.n;
    },
    async removed(sql) {
      const [row] = await sql<{ n: number }[]>`
        select coalesce(pg_stat_get_tuples_deleted('shoal.jobs'::regclass), 0)::float8 as n`;
      return row!.n;
    },
  };
}

/** shoal itself: lib/queue.ts for enqueue, `main.ts --role consumer` for the consumer. */
export const shoal: System = shoalSystem(CURRENT_TREE, { connect, enqueue, enqueueMany }, {
  defaultSettings: DEFAULT_SETTINGS,
  async install(sql) {
    await migrate(sql, await loadMigrations());
  },
  fanOut: shoalFanOut,
});

/**
 * shoal at another commit (`--beside REF`), checked out in `checkout`: its `main.ts`
 * (and `bench/bench_main.ts` for jobs that record their start) run exactly as the
 * `shoal` system runs this tree's, with that checkout's V8 flags; `shoal migrate` of the
 * checkout installs its own schema in each run's fresh database, so the two schemas never
 * share a database; producers enqueue through the checkout's own lib/queue.ts.
 *
 * No W4: the fan-out driver starts executions through this tree's lib/execution.ts.
 */
export async function shoalAt(checkout: Checkout): Promise<System> {
  const root = pathToFileURL(`${checkout.dir}/`);
  const tree: ShoalTree = { name: `shoal@${checkout.short}`, root, v8Flags: v8FlagsOf(root) };
  const library = await loadLibrary(tree);
  const v8 = tree.v8Flags === null ? "no --v8-flags (none in its compile task)" : tree.v8Flags;
  return shoalSystem(tree, library, {
    defaultSettings:
      `${DEFAULT_SETTINGS}; the checkout of ${checkout.ref} (${checkout.sha}), ${v8}`,
    install: (_sql, url) => migrateWith(tree, url),
  });
}

/** `main.ts migrate` of `tree` against `url`: the migrations that tree ships. */
async function migrateWith(tree: ShoalTree, url: string): Promise<void> {
  const args = ["run", "-A", new URL("main.ts", tree.root).pathname, "migrate"];
  const child = new Child(
    `${tree.name} migrate`,
    args,
    { DATABASE_URL: url },
    Deno.execPath(),
    tree.root.pathname,
  );
  const status = await child.exited();
  if (status.code !== 0) {
    throw new Error(
      `${tree.name} migrate exited with code ${status.code}; its output:\n${
        child.output().slice(-3000)
      }`,
    );
  }
}

/**
 * Load the producer's calls from the checkout's lib/db.ts and lib/queue.ts into this
 * process. Their bare imports ("postgres" ...) resolve through this tree's deno.json, so
 * the two must map them alike; otherwise the checkout's producer would run on other
 * package versions than its consumer, and the figures would not be its own.
 */
async function loadLibrary(tree: ShoalTree): Promise<ShoalLibrary> {
  const theirs = importsOf(new URL("deno.json", tree.root));
  const ours = importsOf(new URL("deno.json", ROOT));
  if (theirs !== ours) {
    throw new Error(
      `${tree.name}'s deno.json maps its imports differently from this tree's: its producer ` +
        "(lib/queue.ts, loaded into the bench process) would not run on its own packages",
    );
  }
  const url = (path: string) => new URL(path, tree.root).href;
  let db: Record<string, unknown>;
  let queue: Record<string, unknown>;
  try {
    db = await import(url("lib/db.ts"));
    queue = await import(url("lib/queue.ts"));
  } catch (error) {
    throw new Error(`Cannot load ${tree.name}'s lib/db.ts and lib/queue.ts`, { cause: error });
  }
  for (
    const [file, module, name] of [
      ["lib/db.ts", db, "connect"],
      ["lib/queue.ts", queue, "enqueue"],
      ["lib/queue.ts", queue, "enqueueMany"],
    ] as const
  ) {
    if (typeof module[name] !== "function") {
      throw new Error(
        `${tree.name}'s ${file} exports no function ${name}: its producer cannot run`,
      );
    }
  }
  return {
    connect: db.connect as ShoalLibrary["connect"],
    enqueue: queue.enqueue as ShoalLibrary["enqueue"],
    enqueueMany: queue.enqueueMany as ShoalLibrary["enqueueMany"],
  };
}

/** The `imports` map of a deno.json, as canonical text (sorted keys). */
function importsOf(path: URL): string {
  let config: { imports?: Record<string, string> };
  try {
    config = JSON.parse(Deno.readTextFileSync(path));
  } catch (error) {
    throw new Error(`Cannot read ${path.pathname}`, { cause: error });
  }
  const imports = config.imports ?? {};
  return JSON.stringify(Object.keys(imports).sort().map((k) => [k, imports[k]]));
}

/** Every system the benchmark knows, by name. */
export const SYSTEMS: Record<string, System> = { shoal };
