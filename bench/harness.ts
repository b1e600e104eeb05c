/**
 * Benchmark plumbing shared by every system, workload and floor: the Postgres server
 * (a throwaway cluster or DATABASE_URL), one fresh database per measured run, child
 * processes whose output is watched line by line, clocks and statistics.
 *
 * @module
 */
import postgres from "postgres";
import { connect, type Sql } from "../lib/db.ts";
import { startLocalPg } from "../lib/local_pg.ts";

/** Where a benchmark runs: the server every system and floor shares. */
export interface BenchServer {
  /** Admin URL (the `postgres` database of a throwaway cluster, or DATABASE_URL). */
  url: string;
  /** True when we started the cluster ourselves (and will stop it). */
  owned: boolean;
  /** `select version()`. */
  version: string;
  /** Every setting whose value is not Postgres's built-in default, with where it came from. */
  settings: ServerSetting[];
  /** Data directory and its file system, when we started the cluster (fsync cost depends on it). */
  storage: string;
  /** The server's binaries (pgbench is looked for here first), when we started it. */
  binDir: string | null;
  stop(): Promise<void>;
}

export interface ServerSetting {
  name: string;
  setting: string;
  unit: string | null;
  source: string;
}

/** One fresh database for one measured run. */
export interface BenchDb {
  name: string;
  url: string;
  /** A pool of 10 for the benchmark's own statements. */
  sql: Sql;
  /** Close the pool and drop the database. */
  drop(): Promise<void>;
}

/** Progress lines go to stderr so stdout carries only the table. */
export function say(text: string): void {
  Deno.stderr.writeSync(new TextEncoder().encode(text + "\n"));
}

/** Print to stdout (the results table). */
export function print(text: string): void {
  Deno.stdout.writeSync(new TextEncoder().encode(text));
}

/** Wall-clock milliseconds since the epoch with sub-millisecond resolution, comparable across processes. */
export function epochMs(): number {
  return performance.timeOrigin + performance.now();
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export function median(values: number[]): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/** A count as a short label for ids and tables: 10,000 → `10k`, 1,000,000 → `1M`, 1,500 → `1500`. */
export function sizeLabel(n: number): string {
  if (n >= 1_000_000 && n % 1_000_000 === 0) return `${n / 1_000_000}M`;
  if (n >= 1_000 && n % 1_000 === 0) return `${n / 1_000}k`;
  return String(n);
}

/** Nearest-rank percentile (p in 0..100) of unsorted values. */
export function percentile(values: number[], p: number): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.max(1, Math.ceil((p / 100) * sorted.length));
  return sorted[rank - 1]!;
}

function withDatabase(url: string, db: string): string {
  const u = new URL(url);
  u.pathname = `/${db}`;
  return u.toString();
}

/** A short-lived admin connection (one statement or a few), always closed. */
export async function withAdmin<T>(
  url: string,
  run: (sql: postgres.Sql) => Promise<T>,
): Promise<T> {
  const sql = postgres(url, {
    max: 1,
    onnotice: () => {},
    connection: { application_name: "shoal bench" },
  });
  try {
    return await run(sql);
  } finally {
    await sql.end({ timeout: 5 });
  }
}

async function readSettings(url: string): Promise<{ version: string; settings: ServerSetting[] }> {
  return await withAdmin(url, async (sql) => {
    const [v] = await sql<{ version: string }[]>`select version()`;
    // Settings a session sets for itself (client encoding, application_name) are not the
    // server's; everything else that differs from the built-in default is reported.
    const settings = await sql<ServerSetting[]>`
      select name, setting, unit, source from pg_settings
      where source not in ('default', 'override', 'client', 'session')
      order by name`;
    return { version: v!.version, settings: [...settings] };
  });
}

async function fileSystemOf(path: string): Promise<string> {
  const out = await new Deno.Command("df", { args: ["-T", path], stdout: "piped", stderr: "null" })
    .output();
  const line = new TextDecoder().decode(out.stdout).trim().split("\n")[1] ?? "";
  const [device, type] = line.split(/\s+/);
  return type ? `${type} on ${device}` : "unknown file system";
}

export interface ServerOptions {
  /** Preload pg_stat_statements to count statements per job (changes the server: figures are not comparable). */
  profile: boolean;
  /**
   * pg_stat_statements' `track` when preloaded: `all` (the profile: statements inside
   * functions too) unless given.
   */
  track?: "top" | "all";
}

/**
 * DATABASE_URL when given, otherwise a throwaway cluster with Postgres's defaults
 * (fsync on; NOT the tests' fast mode).
 */
export async function startServer(options: ServerOptions): Promise<BenchServer> {
  const given = Deno.env.get("DATABASE_URL");
  if (given) {
    const { version, settings } = await readSettings(given);
    return {
      url: given,
      owned: false,
      version,
      settings,
      storage: "given by DATABASE_URL",
      binDir: null,
      stop: () => Promise.resolve(),
    };
  }
  const pg = await startLocalPg({
    settings: {
      // W7 with 8 processes: BullMQ's pool of 25 and its LISTEN connection per process
      // (208) did not fit startLocalPg's 200 ("sorry, too many clients already").
      max_connections: "300",
      ...(options.profile
        ? {
          shared_preload_libraries: "pg_stat_statements",
          "pg_stat_statements.track": options.track ?? "all",
        }
        : {}),
    },
  });
  try {
    const { version, settings } = await readSettings(pg.url);
    return {
      url: pg.url,
      owned: true,
      version,
      settings,
      storage: `${pg.dir}/data (${await fileSystemOf(pg.dir)})`,
      binDir: pg.binDir,
      stop: () => pg.stop(),
    };
  } catch (error) {
    await pg.stop();
    throw error;
  }
}

let dbCounter = 0;

/** Create an empty database (dropped by `drop()`); the caller installs whatever it measures. */
export async function freshDb(server: BenchServer, label: string): Promise<BenchDb> {
  const tag = label.toLowerCase().replace(/[^a-z0-9]+/g, "_").slice(0, 30);
  const name = `bench_${tag}_${Deno.pid}_${++dbCounter}`;
  await withAdmin(server.url, (sql) => sql`create database ${sql(name)}`);
  const url = withDatabase(server.url, name);
  const sql = connect(url, { applicationName: "shoal bench", max: 10 });
  let dropped = false;
  return {
    name,
    url,
    sql,
    async drop() {
      if (dropped) return;
      dropped = true;
      await sql.end({ timeout: 5 });
      await withAdmin(
        server.url,
        (admin) => admin`drop database if exists ${admin(name)} with (force)`,
      );
    },
  };
}

/** True when the server behind `url` has pg_stat_statements preloaded (W10 counts with it). */
export async function hasStatementStats(url: string): Promise<boolean> {
  return await withAdmin(url, async (sql) => {
    const [row] = await sql<{ setting: string }[]>`
      select setting from pg_settings where name = 'shared_preload_libraries'`;
    return (row?.setting ?? "").split(",").map((s) => s.trim()).includes("pg_stat_statements");
  });
}

/** Run `body` with a fresh database, always dropping it afterwards. */
export async function withFreshDb<T>(
  server: BenchServer,
  label: string,
  body: (db: BenchDb) => Promise<T>,
): Promise<T> {
  const db = await freshDb(server, label);
  try {
    return await body(db);
  } finally {
    await db.drop();
  }
}

/**
 * The table where start-latency tasks record when they began: one row per job start.
 * Unlogged, no index, no constraint: recording must cost next to nothing.
 */
export async function createStartsTable(sql: Sql): Promise<void> {
  await sql`create schema if not exists bench`;
  await sql`
    create unlogged table if not exists bench.starts (
      job_id text not null,
      -- The job's fairness key where the system has one (W5 tells the two keys apart).
      fairness_key text not null default '',
      enqueued_at double precision not null,
      started_at double precision not null,
      recorded_at timestamptz not null default clock_timestamp()
    )`;
}

export interface StartRow {
  job_id: string;
  enqueued_at: number;
  started_at: number;
}

export async function readStarts(sql: Sql): Promise<StartRow[]> {
  return [...await sql<StartRow[]>`select job_id, enqueued_at, started_at from bench.starts`];
}

export async function countStarts(sql: Sql): Promise<number> {
  const [row] = await sql<{ n: number }[]>`select count(*)::integer as n from bench.starts`;
  return row!.n;
}

/** Environment for a child process: ours without SHOAL_* (so the child sees shoal's defaults), plus `env`. */
export function childEnv(env: Record<string, string>): Record<string, string> {
  const base: Record<string, string> = {};
  for (const [key, value] of Object.entries(Deno.env.toObject())) {
    if (!key.startsWith("SHOAL_") && key !== "DATABASE_URL") base[key] = value;
  }
  return { ...base, ...env };
}

/** A child process whose stdout and stderr lines are collected and can be awaited. */
export class Child {
  readonly process: Deno.ChildProcess;
  readonly lines: { stream: "stdout" | "stderr"; at: number; text: string }[] = [];
  #waiters: { test: (line: string) => boolean; resolve: (line: string) => void }[] = [];
  readonly #pumped: Promise<void>;
  #status: Promise<Deno.CommandStatus>;

  /** Runs `command` (Deno itself unless given) with `args`, in `cwd` (ours unless given). */
  constructor(
    readonly label: string,
    args: string[],
    env: Record<string, string>,
    command: string = Deno.execPath(),
    cwd?: string,
  ) {
    this.process = new Deno.Command(command, {
      args,
      cwd,
      env: childEnv(env),
      clearEnv: true,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#status = this.process.status;
    this.#pumped = Promise.all([
      this.#pump("stdout", this.process.stdout),
      this.#pump("stderr", this.process.stderr),
    ]).then(() => {});
    running.add(this);
  }

  async #pump(stream: "stdout" | "stderr", body: ReadableStream<Uint8Array>): Promise<void> {
    const decoder = new TextDecoder();
    let buffer = "";
    for await (const chunk of body) {
      buffer += decoder.decode(chunk, { stream: true });
      let newline: number;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const text = buffer.slice(0, newline);
        buffer = buffer.slice(newline + 1);
        this.lines.push({ stream, at: epochMs(), text });
        for (const waiter of [...this.#waiters]) {
          if (waiter.test(text)) {
            this.#waiters.splice(this.#waiters.indexOf(waiter), 1);
            waiter.resolve(text);
          }
        }
      }
    }
    if (buffer) this.lines.push({ stream, at: epochMs(), text: buffer });
  }

  /** The output so far, for error messages. */
  output(): string {
    return this.lines.map((l) => l.text).join("\n");
  }

  /** Resolve with the first line (already seen or to come) that passes `test`. */
  waitForLine(what: string, test: (line: string) => boolean, timeoutMs: number): Promise<string> {
    const seen = this.lines.find((l) => test(l.text));
    if (seen) return Promise.resolve(seen.text);
    return new Promise<string>((resolve, reject) => {
      const waiter = {
        test,
        resolve: (line: string) => {
          clearTimeout(timer);
          resolve(line);
        },
      };
      const timer = setTimeout(() => {
        this.#waiters.splice(this.#waiters.indexOf(waiter), 1);
        reject(
          new Error(
            `Timed out after ${timeoutMs} ms waiting for ${this.label} to print ${what}; its output:\n${
              this.output().slice(-3000)
            }`,
          ),
        );
      }, timeoutMs);
      this.#waiters.push(waiter);
      this.#status.then((status) => {
        if (this.#waiters.includes(waiter)) {
          this.#waiters.splice(this.#waiters.indexOf(waiter), 1);
          clearTimeout(timer);
          reject(
            new Error(
              `${this.label} exited with code ${status.code} before printing ${what}; its output:\n${
                this.output().slice(-3000)
              }`,
            ),
          );
        }
      });
    });
  }

  /** Wait for the child to exit on its own. */
  async exited(): Promise<Deno.CommandStatus> {
    const status = await this.#status;
    await this.#pumped;
    running.delete(this);
    return status;
  }

  /** SIGTERM, then SIGKILL if it has not exited within `graceMs`. */
  async stop(graceMs = 30_000): Promise<Deno.CommandStatus> {
    this.#signal("SIGTERM");
    const timer = setTimeout(() => this.#signal("SIGKILL"), graceMs);
    try {
      return await this.exited();
    } finally {
      clearTimeout(timer);
    }
  }

  #signal(signal: Deno.Signal): void {
    try {
      this.process.kill(signal);
    } catch (error) {
      // Already exited: there is nothing left to signal.
      if (!(error instanceof TypeError)) throw error;
    }
  }
}

/** Children still running, stopped by `stopAllChildren` when the benchmark ends or is interrupted. */
const running = new Set<Child>();

export async function stopAllChildren(): Promise<void> {
  await Promise.allSettled([...running].map((child) => child.stop(5_000)));
}

/** Poll `check` every `everyMs` until it returns true; resolves with the epoch time it first did. */
export async function pollUntil(
  what: string,
  check: () => Promise<boolean>,
  options: { everyMs: number; timeoutMs: number },
): Promise<number> {
  const deadline = performance.now() + options.timeoutMs;
  while (performance.now() < deadline) {
    if (await check()) return epochMs();
    await sleep(options.everyMs);
  }
  throw new Error(`Timed out after ${options.timeoutMs} ms waiting for ${what}`);
}

/** CPU seconds (user + system) a local process has used so far; null when /proc cannot tell. */
export async function cpuSeconds(pid: number): Promise<number | null> {
  try {
    const stat = await Deno.readTextFile(`/proc/${pid}/stat`);
    // Fields after the command name (which may hold spaces) start at state: utime is the
    // 12th of them, stime the 13th; both in clock ticks (100 per second on Linux).
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(fields[11]) + Number(fields[12])) / 100;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound || error instanceof Deno.errors.PermissionDenied) {
      return null;
    }
    throw error;
  }
}

/**
 * CPU seconds used so far by the server backends serving `sql`'s database, except the
 * benchmark's own; null when the server is not on this machine.
 */
export async function backendCpuSeconds(sql: Sql): Promise<number | null> {
  const rows = await sql<{ pid: number }[]>`
    select pid from pg_stat_activity
    where datname = current_database() and application_name <> 'shoal bench'
      and pid <> pg_backend_pid()`;
  let total = 0;
  for (const { pid } of rows) {
    const seconds = await cpuSeconds(pid);
    if (seconds === null) return null;
    total += seconds;
  }
  return total;
}

/** A process's resident memory from /proc/<pid>/status, in MB; null once it is gone. */
export interface Memory {
  /** VmRSS: resident now. */
  rssMb: number;
  /** VmHWM: the most it has been resident since it started. */
  hwmMb: number;
}

export async function memoryOf(pid: number): Promise<Memory | null> {
  let text: string;
  try {
    text = await Deno.readTextFile(`/proc/${pid}/status`);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return null;
    throw error;
  }
  const kb = (field: string): number => {
    const match = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(text);
    if (!match) throw new Error(`/proc/${pid}/status has no ${field} line`);
    return Number(match[1]);
  };
  return { rssMb: kb("VmRSS") / 1024, hwmMb: kb("VmHWM") / 1024 };
}

/** An error's message followed by its `cause` chain, on one line. */
export function errorChain(error: unknown): string {
  const parts: string[] = [];
  let current: unknown = error;
  // Bounded: a cause chain is a few links long; a cycle must not loop forever.
  for (let depth = 0; current !== undefined && current !== null && depth < 8; depth++) {
    parts.push(current instanceof Error ? current.message : String(current));
    current = current instanceof Error ? current.cause : undefined;
  }
  return parts.join(": ");
}

/** Load average and CPU count: the machine is shared, so the report says how busy it was. */
export async function machineLoad(): Promise<string> {
  try {
    const text = await Deno.readTextFile("/proc/loadavg");
    return text.split(" ").slice(0, 3).join(" ");
  } catch (error) {
    return `unknown (${(error as Error).message})`;
  }
}
