/**
 * Test support: a fresh database per test (cloned from the migrated template that
 * `deno task test` prepares), real `main.ts` processes, and polling waits.
 * A missing DATABASE_URL fails the test: nothing here ever skips.
 */
import postgres from "postgres";
import { connect, formatDatabaseUrl, parseDatabaseUrl, type Sql } from "../lib/db.ts";
import { loadMigrations, migrate } from "../lib/migrate.ts";
import { type LocalPg, startLocalPg, startLocalReplica } from "../lib/local_pg.ts";
import { type ConsumerOptions, runConsumer } from "../lib/consumer.ts";
import { type AnyTask, TaskRegistry } from "../lib/tasks.ts";
import { registerConsumer, type TaskRegistration } from "../lib/catalog.ts";
import { enqueue, enqueueMany, type JobSpec } from "../lib/queue.ts";

export const TEMPLATE_DB = "shoal_test_template";
const ROOT = new URL("../", import.meta.url);

function baseUrl(): string {
  const url = Deno.env.get("DATABASE_URL");
  if (!url) {
    throw new Error("DATABASE_URL is not set: run the suite with `deno task test`");
  }
  return url;
}

function withDatabase(url: string, db: string): string {
  const u = new URL(url);
  u.pathname = `/${db}`;
  return u.toString();
}

export interface TestDb {
  sql: Sql;
  url: string;
  name: string;
  [Symbol.asyncDispose](): Promise<void>;
}

/** A new, migrated database of its own; dropped on dispose (`await using db = await testDb()`). */
export async function testDb(): Promise<TestDb> {
  const name = `shoal_t_${crypto.randomUUID().replaceAll("-", "").slice(0, 16)}`;
  const admin = postgres(baseUrl(), { max: 1, onnotice: () => {} });
  const template = Deno.env.get("SHOAL_TEST_TEMPLATE");
  try {
    if (template) await admin`create database ${admin(name)} template ${admin(template)}`;
    else await admin`create database ${admin(name)}`;
  } finally {
    await admin.end();
  }
  const url = withDatabase(baseUrl(), name);
  const sql = connect(url, { applicationName: "shoal test", max: 10 });
  if (!template) await migrate(sql, await loadMigrations());
  return {
    sql,
    url,
    name,
    async [Symbol.asyncDispose]() {
      await sql.end({ timeout: 5 });
      const admin = postgres(baseUrl(), { max: 1, onnotice: () => {} });
      try {
        await admin`drop database if exists ${admin(name)} with (force)`;
      } finally {
        await admin.end();
      }
    },
  };
}

/** A database with no shoal schema at all. */
export async function emptyDb(): Promise<TestDb> {
  const name = `shoal_e_${crypto.randomUUID().replaceAll("-", "").slice(0, 16)}`;
  const admin = postgres(baseUrl(), { max: 1, onnotice: () => {} });
  try {
    await admin`create database ${admin(name)}`;
  } finally {
    await admin.end();
  }
  const url = withDatabase(baseUrl(), name);
  const sql = connect(url, { applicationName: "shoal test", max: 10 });
  return {
    sql,
    url,
    name,
    async [Symbol.asyncDispose]() {
      await sql.end({ timeout: 5 });
      const admin = postgres(baseUrl(), { max: 1, onnotice: () => {} });
      try {
        await admin`drop database if exists ${admin(name)} with (force)`;
      } finally {
        await admin.end();
      }
    },
  };
}

/** Poll until `check` returns a truthy value, or fail after `timeoutMs`. */
export async function waitFor<T>(
  what: string,
  check: () => T | Promise<T>,
  timeoutMs = 10_000,
  everyMs = 50,
): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const value = await check();
      if (value) return value as NonNullable<T>;
    } catch (error) {
      last = error;
    }
    await new Promise((r) => setTimeout(r, everyMs));
  }
  throw new Error(`Timed out after ${timeoutMs} ms waiting for ${what}`, { cause: last });
}

/** Every file under `path` (a file or a directory, relative to the repository), as such paths. */
export async function filesUnder(path: string): Promise<string[]> {
  const stat = await Deno.stat(new URL(path, ROOT));
  if (!stat.isDirectory) return [path];
  const found: string[] = [];
  for await (const entry of Deno.readDir(new URL(`${path}/`, ROOT))) {
    found.push(...await filesUnder(`${path}/${entry.name}`));
  }
  return found.sort();
}

/** GET a path of an HTTP server; the body is always read (no leaked resource). */
export async function httpGet(
  base: string,
  path: string,
  init: RequestInit = {},
): Promise<{ status: number; body: string; type: string | null }> {
  const response = await fetch(base + path, init);
  return {
    status: response.status,
    body: await response.text(),
    type: response.headers.get("content-type"),
  };
}

/** The base URL of the `--http` server a role process logged it serves on. */
export async function servedAt(proc: ShoalProcess): Promise<string> {
  const address = await waitFor("the HTTP server to start", () => {
    const line = logLines(proc.output()).find((l) => String(l.message).startsWith("Serving"));
    if (!line && proc.output().includes("shoal: ")) throw new Error(proc.output());
    return line?.address as string | undefined;
  }, 20_000);
  return `http://${address}`;
}

export interface ShoalProcess {
  child: Deno.ChildProcess;
  /** Everything written to stdout and stderr so far. */
  output(): string;
  /** Send a signal (no-op if it already exited). */
  kill(signal?: Deno.Signal): void;
  /** Wait for exit; resolves with the status and the full output. */
  exited(): Promise<{ code: number; signal: Deno.Signal | null; output: string }>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** How a shoal process is started: its database, environment, entry file and permissions. */
export interface SpawnOptions {
  url?: string;
  env?: Record<string, string>;
  /** The entry file (default main.ts). */
  mainModule?: string;
  /** The flags `deno run` gets before the entry file (default `-A`). */
  denoFlags?: string[];
  /** The working directory, where Deno looks for deno.json (default: this one). */
  cwd?: string;
}

/** `deno run` arguments for a shoal command line. */
function runArgs(args: string[], options: SpawnOptions): string[] {
  const main = options.mainModule ?? new URL("main.ts", ROOT).pathname;
  return ["run", ...(options.denoFlags ?? ["-A"]), main, ...args];
}

/**
 * Start `deno run -A main.ts ...args` as a real process (Deno.execPath(), not a wrapper
 * that would swallow signals), with DATABASE_URL pointing at `url`.
 */
export function spawnShoal(
  args: string[],
  options: SpawnOptions = {},
): ShoalProcess {
  const env: Record<string, string> = { ...options.env };
  if (options.url) env.DATABASE_URL = options.url;
  const child = new Deno.Command(Deno.execPath(), {
    args: runArgs(args, options),
    cwd: options.cwd,
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let text = "";
  const decoder = new TextDecoder();
  const pump = async (stream: ReadableStream<Uint8Array>) => {
    for await (const chunk of stream) text += decoder.decode(chunk, { stream: true });
  };
  const pumped = Promise.all([pump(child.stdout), pump(child.stderr)]);
  let exited: Promise<{ code: number; signal: Deno.Signal | null; output: string }> | null = null;
  const proc: ShoalProcess = {
    child,
    output: () => text,
    kill(signal: Deno.Signal = "SIGTERM") {
      try {
        child.kill(signal);
      } catch (error) {
        if (!(error instanceof TypeError)) throw error; // already exited
      }
    },
    exited() {
      exited ??= (async () => {
        const status = await child.status;
        await pumped;
        return { code: status.code, signal: status.signal, output: text };
      })();
      return exited;
    },
    async [Symbol.asyncDispose]() {
      proc.kill("SIGKILL");
      await proc.exited();
    },
  };
  return proc;
}

/** Parsed JSON log lines from a process's output (non-JSON lines skipped). */
export function logLines(output: string): Record<string, unknown>[] {
  const lines: Record<string, unknown>[] = [];
  for (const line of output.split("\n")) {
    if (!line.startsWith("{")) continue;
    try {
      lines.push(JSON.parse(line));
    } catch {
      // A line that merely starts with "{" but is not a log record: not ours to parse.
    }
  }
  return lines;
}

/** The user-style entry file whose test tasks record their runs (tests/fixtures/test_main.ts). */
export const TEST_MAIN: string = new URL("fixtures/test_main.ts", import.meta.url).pathname;

/** Create `test_runs`, where the tasks of tests/fixtures/test_main.ts record what they saw. */
export async function createRunsTable(sql: Sql): Promise<void> {
  await sql`
    create table test_runs (
      id bigint generated always as identity primary key,
      job_id bigint not null,
      token bigint not null,
      attempt integer not null,
      pid integer not null,
      note text,
      started_at timestamptz not null default clock_timestamp(),
      finished_at timestamptz
    )`;
}

/** Wait until the process has written `text` (stdout or stderr); fails early if it exits. */
export async function waitForOutput(
  proc: ShoalProcess,
  text: string,
  timeoutMs = 20_000,
): Promise<void> {
  let exited = false;
  proc.exited().then(() => (exited = true));
  await waitFor(`output "${text}"`, () => {
    if (proc.output().includes(text)) return true;
    if (exited) throw new Error(`The process exited before writing "${text}":\n${proc.output()}`);
    return false;
  }, timeoutMs);
}

/**
 * Wait for the process to exit within `timeoutMs`; if it does not, SIGKILL it and throw
 * (with its output), so a hung shutdown fails the test instead of hanging the suite.
 */
export async function exitWithin(
  proc: ShoalProcess,
  timeoutMs: number,
): Promise<{ code: number; signal: Deno.Signal | null; output: string; elapsedMs: number }> {
  const started = Date.now();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timedOut = new Promise<null>((
    resolve,
  ) => (timer = setTimeout(() => resolve(null), timeoutMs)));
  try {
    const result = await Promise.race([proc.exited(), timedOut]);
    if (result === null) {
      proc.kill("SIGKILL");
      const { output } = await proc.exited();
      throw new Error(`The process did not exit within ${timeoutMs} ms:\n${output}`);
    }
    return { ...result, elapsedMs: Date.now() - started };
  } finally {
    clearTimeout(timer);
  }
}

/** Run a short shoal command to completion, keeping stdout and stderr apart. */
export async function runShoal(
  args: string[],
  options: SpawnOptions = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  const env: Record<string, string> = { ...options.env };
  if (options.url) env.DATABASE_URL = options.url;
  const result = await new Deno.Command(Deno.execPath(), {
    args: runArgs(args, options),
    cwd: options.cwd,
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  return {
    code: result.code,
    stdout: decoder.decode(result.stdout),
    stderr: decoder.decode(result.stderr),
  };
}

/** A loopback port nobody listens on (bound, then closed at once). */
export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr as Deno.NetAddr;
  listener.close();
  return port;
}

/**
 * `url` with its sessions named `name` in `application_name` (postgres.js passes URL query
 * parameters on as startup parameters, over the role's own name), so a test can tell which
 * process ran a statement: triggers read `current_setting('application_name')`.
 */
export function withApplicationName(url: string, name: string): string {
  const parts = parseDatabaseUrl(url); // a host list too (`h1:p1,h2:p2`)
  parts.url.searchParams.set("application_name", name);
  return formatDatabaseUrl(parts);
}

/** The lease holder id a shoal process uses (`hostname:pid`, see defaultWorkerId). */
export function holderOf(proc: ShoalProcess): string {
  return `${Deno.hostname()}:${proc.child.pid}`;
}

/** Wait `ms` (for letting processes run; never for correctness). */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * One change the schedule audit recorded: a fire, a baseline (next_run_at set without
 * firing), or a reset (next_run_at cleared, by resume or a changed cron).
 */
export interface FireEvent {
  kind: "baseline" | "fire" | "reset";
  schedule: string;
  /** The row's next_run_at before the change: the slot fired; null for a first baseline. */
  slot: Date | null;
  /** The row's next_run_at after the change. */
  next: Date | null;
  /** last_run_at after a fire: the database clock of the tick that fired it. */
  at: Date | null;
  /** application_name of the session that made the change. */
  proc: string;
}

/** One job insert attempt the audit recorded (a deduplicated insert is recorded too). */
export interface EnqueueEvent {
  job_id: string;
  queue: string;
  key: string | null;
  proc: string;
}

/** One write to shoal.leases the audit recorded. */
export interface LeaseEvent {
  kind: "acquire" | "renew" | "release";
  name: string;
  holder: string;
  token: string;
  acquired_at: Date;
  expires_at: Date;
  /** Transaction time of the write. */
  at: Date;
}

/**
 * Record, from inside the database, every baseline and fire of a schedule row, every job
 * insert attempt (BEFORE INSERT fires even for a row ON CONFLICT then skips, so a slot
 * fired twice is seen even though the dedupe index keeps one job), and every lease write.
 * The audit rows commit or roll back with the statement they record, and carry the
 * session's application_name (see withApplicationName).
 */
export async function installAudit(sql: Sql): Promise<void> {
  await sql.begin(async (tx) => {
    await tx`
      create table test_fires (
        id bigint generated always as identity primary key,
        kind text not null, schedule text not null, slot timestamptz, next timestamptz,
        at timestamptz, proc text not null)`;
    await tx`
      create function test_audit_schedule() returns trigger language plpgsql as $$
      begin
        if new.next_run_at is distinct from old.next_run_at
           or new.last_run_at is distinct from old.last_run_at then
          insert into test_fires (kind, schedule, slot, next, at, proc)
          values (case when new.last_run_at is distinct from old.last_run_at then 'fire'
                       when new.next_run_at is null then 'reset'
                       else 'baseline' end,
                  new.name, old.next_run_at, new.next_run_at, new.last_run_at,
                  current_setting('application_name'));
        end if;
        return null;
      end $$`;
    await tx`
      create trigger test_audit_schedule after update on shoal.schedules
      for each row execute function test_audit_schedule()`;
    await tx`
      create table test_enqueues (
        id bigint generated always as identity primary key,
        job_id bigint not null, queue text not null, key text, proc text not null)`;
    await tx`
      create function test_audit_enqueue() returns trigger language plpgsql as $$
      begin
        insert into test_enqueues (job_id, queue, key, proc)
        values (new.id, new.queue, new.key, current_setting('application_name'));
        return new;
      end $$`;
    await tx`
      create trigger test_audit_enqueue before insert on shoal.jobs
      for each row execute function test_audit_enqueue()`;
    await tx`
      create table test_leases (
        id bigint generated always as identity primary key,
        kind text not null, name text not null, holder text not null, token bigint not null,
        acquired_at timestamptz not null, expires_at timestamptz not null,
        at timestamptz not null default now())`;
    await tx`
      create function test_audit_lease() returns trigger language plpgsql as $$
      begin
        insert into test_leases (kind, name, holder, token, acquired_at, expires_at)
        values (case when tg_op = 'INSERT' or new.token <> old.token then 'acquire'
                     when new.expires_at <= now() then 'release'
                     else 'renew' end,
                new.name, new.holder, new.token, new.acquired_at, new.expires_at);
        return null;
      end $$`;
    await tx`
      create trigger test_audit_lease after insert or update on shoal.leases
      for each row execute function test_audit_lease()`;
  });
}

/** The schedule audit of `schedule`, in the order the changes were made. */
export async function fireEvents(sql: Sql, schedule: string): Promise<FireEvent[]> {
  return await sql<FireEvent[]>`
    select kind, schedule, slot, next, at, proc from test_fires
    where schedule = ${schedule}::text order by id`;
}

/** Every job insert attempt, in the order they were made. */
export async function enqueueEvents(sql: Sql): Promise<EnqueueEvent[]> {
  return await sql<EnqueueEvent[]>`
    select job_id, queue, key, proc from test_enqueues order by id`;
}

/** Every acquire and release of lease `name` (renewals left out), in order. */
export async function leaseEvents(sql: Sql, name: string): Promise<LeaseEvent[]> {
  return await sql<LeaseEvent[]>`
    select kind, name, holder, token, acquired_at, expires_at, at from test_leases
    where name = ${name}::text and kind <> 'renew' order by id`;
}

/** Record every status change of every execution, in commit order per execution. */
export async function auditTransitions(sql: Sql): Promise<void> {
  await sql`
    create table test_transitions (
      id bigint generated always as identity primary key,
      execution_id bigint not null, old text not null, new text not null)`;
  await sql`
    create function test_audit_transition() returns trigger language plpgsql as $$
    begin
      insert into test_transitions (execution_id, old, new)
      values (new.id, old.status, new.status);
      return null;
    end $$`;
  await sql`
    create trigger test_audit_transition after update of status on shoal.executions
    for each row when (old.status is distinct from new.status)
    execute function test_audit_transition()`;
}

export async function transitions(sql: Sql, execution: string): Promise<string[]> {
  const rows = await sql<{ old: string; new: string }[]>`
    select old, new from test_transitions where execution_id = ${execution}::bigint order by id`;
  return rows.map((r) => `${r.old}>${r.new}`);
}

/**
 * Register `names` in the task catalog as a consumer `test:0` on `queues` would, with no
 * settings of their own (or those given): as if a consumer that runs them had started.
 */
export async function registerTasks(
  sql: Sql,
  names: string[],
  options: {
    queues?: string[];
    settings?: Partial<Omit<TaskRegistration, "name">>;
    workerId?: string;
  } = {},
): Promise<void> {
  await registerConsumer(sql, {
    workerId: options.workerId ?? "test:0",
    queues: options.queues ?? ["default"],
    tasks: names.map((name) => ({
      name,
      queue: null,
      maxAttempts: null,
      timeoutMs: null,
      ...options.settings,
    })),
  });
}

/** Consumer settings for in-process tests: short waits, polling (no LISTEN), fast retries. */
export const FAST_CONSUMER: ConsumerOptions = {
  queues: ["default"],
  concurrency: 4,
  visibilityTimeoutMs: 2000,
  pollIntervalMs: 50,
  listen: false,
  shutdownGraceMs: 1000,
  taskTimeoutMs: 10_000,
  retryBaseMs: 10,
};

export interface RunningConsumer {
  /** Abort the consumer (as SIGTERM would) and wait for its shutdown to finish. */
  stop(): Promise<void>;
}

/** runConsumer() in this process with `tasks`, FAST_CONSUMER's settings plus `options`. */
export function startConsumer(
  sql: Sql,
  tasks: AnyTask[],
  options: Partial<ConsumerOptions> = {},
): RunningConsumer {
  const stop = new AbortController();
  const done = runConsumer(
    { sql, tasks: new TaskRegistry(tasks) },
    { ...FAST_CONSUMER, ...options },
    stop.signal,
  );
  return {
    async stop() {
      stop.abort();
      await done;
    },
  };
}

/** A gate on job deletes (acks, completions, dead-lettering): closed until opened. */
export interface DeleteGate {
  /** Let the waiting deletes through, and every later one (idempotent). */
  open(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

/**
 * Hold advisory lock `lock` on a reserved connection until the gate opens (idempotent): the
 * gate a test-only trigger waits on (gateJobUpdates, gateJobDeletes).
 */
async function advisoryGate(sql: Sql, lock: number): Promise<DeleteGate> {
  const holder = await sql.reserve();
  await holder`select pg_advisory_lock(${lock})`;
  let opened: Promise<void> | null = null;
  const open = () =>
    opened ??= (async () => {
      try {
        await holder`select pg_advisory_unlock(${lock})`;
      } finally {
        holder.release();
      }
    })();
  return { open, [Symbol.asyncDispose]: open };
}

/**
 * Make every update of a job wait until the gate opens, as gateJobDeletes() does for
 * deletes: a claim (which updates the rows it took) stays in flight, holding its rows,
 * until then; so do heartbeats and releases.
 */
export async function gateJobUpdates(sql: Sql): Promise<DeleteGate> {
  const lock = 4243; // the trigger's body names the same key (DDL takes no parameters)
  await sql`create or replace function public.gate_update() returns trigger language plpgsql
    as $$ begin perform pg_advisory_xact_lock_shared(4243); return new; end $$`;
  await sql`create trigger gate_update before update on shoal.jobs
    for each row execute function public.gate_update()`;
  return await advisoryGate(sql, lock);
}

/**
 * Make every delete of a job wait until the gate opens: a test-only trigger takes a
 * shared advisory lock that a reserved connection holds. Claims (updates) pass freely,
 * so a consumer runs jobs while their acks are stuck, as behind a lagging database.
 */
export async function gateJobDeletes(sql: Sql): Promise<DeleteGate> {
  const lock = 4242; // the trigger's body names the same key (DDL takes no parameters)
  await sql`create or replace function public.gate_delete() returns trigger language plpgsql
    as $$ begin perform pg_advisory_xact_lock_shared(4242); return old; end $$`;
  await sql`create trigger gate_delete before delete on shoal.jobs
    for each row execute function public.gate_delete()`;
  return await advisoryGate(sql, lock);
}

/** Print a figure a test measured where `deno test` shows it (docs quote some of them). */
export function figure(line: string): void {
  Deno.stdout.writeSync(new TextEncoder().encode(line + "\n"));
}

/**
 * 12,000 ready jobs of task bulk.t on queue bulk, more than `shoal status` and /metrics count
 * by default (10,000) over more pages than they sample (256), and one of tiny.t on tiny;
 * resolves once Postgres counts them (pg_stat_user_tables), as their estimates scale to.
 */
export async function enqueueLargeTable(sql: Sql): Promise<void> {
  for (let batch = 0; batch < 3; batch++) {
    const jobs: JobSpec[] = [];
    for (let i = 0; i < 4000; i++) jobs.push({ task: "bulk.t", queue: "bulk", payload: { i } });
    await enqueueMany(sql, jobs);
  }
  await enqueue(sql, "tiny.t", {}, { queue: "tiny" });
  await waitFor(
    "Postgres to count the 12,001 jobs",
    async () => {
      const [row] = await sql<{ live: number }[]>`
      select n_live_tup::int as live from pg_stat_user_tables
      where schemaname = 'shoal' and relname = 'jobs'`;
      return row!.live === 12_001;
    },
    20_000,
    100,
  );
}

/** A migrated primary and a streaming replica of it, for one test. */
export async function primaryAndReplica(): Promise<
  { primary: LocalPg; replica: LocalPg; [Symbol.asyncDispose](): Promise<void> }
> {
  const primary = await startLocalPg({ fast: true });
  try {
    const setup = connect(primary.url, { max: 1 });
    try {
      await migrate(setup, await loadMigrations());
    } finally {
      await setup.end();
    }
    const replica = await startLocalReplica(primary, { settings: { fsync: "off" } });
    return {
      primary,
      replica,
      async [Symbol.asyncDispose]() {
        try {
          await replica.stop();
        } finally {
          await primary.stop();
        }
      },
    };
  } catch (error) {
    await primary.stop();
    throw error;
  }
}
