/**
 * Systems under test. A workload only talks to a `System`, so a peer queue (issue 5)
 * plugs in by implementing this interface: install its schema, enqueue one job or a
 * batch, spawn one real consumer process, and say whether its queue is empty.
 *
 * @module
 */
import type { Sql } from "../lib/db.ts";
import { loadMigrations, migrate } from "../lib/migrate.ts";
import { enqueue, enqueueMany, type JobSpec } from "../lib/queue.ts";
import { Child, epochMs } from "./harness.ts";

/** What a benchmark job does when it runs. */
export type BenchJob =
  /** Nothing (throughput). */
  | { kind: "noop" }
  /** Record its start time beside `enqueuedAt` in `bench.starts` (start latency). */
  | { kind: "stamp"; enqueuedAt: number };

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

export interface System {
  /** Short name used in the table and the JSON (`shoal`, later `pg-boss`, ...). */
  name: string;
  /** The consumer settings a user gets by default, stated in the report. */
  defaultSettings: string;
  /** Install the system's schema in an empty database. */
  install(sql: Sql): Promise<void>;
  /** Enqueue one job in one call (the way an application enqueues per request). */
  enqueueOne(sql: Sql, job: BenchJob, options: { notify: boolean }): Promise<void>;
  /** Enqueue many jobs in one call. */
  enqueueBatch(sql: Sql, jobs: BenchJob[], options: { notify: boolean }): Promise<void>;
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
}

const ROOT = new URL("../", import.meta.url);

function shoalSpec(job: BenchJob): JobSpec {
  return job.kind === "noop"
    ? { task: "shoal.noop", payload: {} }
    : { task: "bench.stamp", payload: { t: job.enqueuedAt } };
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

/** The consumer's "started" line: logged right before its claim loop begins. */
function isConsumerStarted(line: string): boolean {
  if (!line.startsWith("{")) return false;
  try {
    const record = JSON.parse(line) as Record<string, unknown>;
    return String(record.logger ?? "").endsWith("consumer") &&
      /started/i.test(String(record.message ?? ""));
  } catch {
    // A line that looks like JSON but is not a log record: not the one we wait for.
    return false;
  }
}

/** shoal itself: lib/queue.ts for enqueue, `main.ts --role consumer` for the consumer. */
export const shoal: System = {
  name: "shoal",
  defaultSettings:
    "consumer defaults: --concurrency 10, --poll-interval 2s, LISTEN on, --visibility-timeout 30s, prepared statements, JSON logs at info",
  async install(sql) {
    await migrate(sql, await loadMigrations());
  },
  async enqueueOne(sql, job, options) {
    const spec = shoalSpec(job);
    await enqueue(sql, spec.task, spec.payload, { notify: options.notify });
  },
  async enqueueBatch(sql, jobs, options) {
    await enqueueMany(sql, jobs.map(shoalSpec), { notify: options.notify });
  },
  spawnConsumer(url, spec) {
    // The stock binary for noop throughput; the bench entry (same `main`, one more task)
    // when jobs must record their start.
    const entry = spec.stamp ? "bench/bench_main.ts" : "main.ts";
    const args = ["run", "-A", new URL(entry, ROOT).pathname, "--role", "consumer"];
    if (spec.concurrency !== undefined) args.push("--concurrency", String(spec.concurrency));
    const child = new Child(`shoal consumer (${entry})`, args, { DATABASE_URL: url });
    const started = child.waitForLine("its 'Consumer started' log line", isConsumerStarted, 60_000)
      .then((line) => {
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
            `shoal consumer exited with code ${status.code}; its output:\n${
              child.output().slice(-3000)
            }`,
          );
        }
      },
      output: () => child.output(),
    };
  },
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
};

/** Every system the benchmark knows, by name. */
export const SYSTEMS: Record<string, System> = { shoal };
