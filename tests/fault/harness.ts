/**
 * The fault suite's shared run: a "mixed run" of real `main.ts` processes (consumers, a
 * reaper, a scheduler; short polls, leases and visibility timeouts) working through plain
 * jobs, one fan-out with a callback and a per-second schedule, while a scenario injects its
 * faults. One final check, the same for every scenario, then proves nothing was lost and
 * nothing promised once happened twice, from audit tables the database itself writes
 * (triggers commit or roll back with the statement they record).
 *
 * Processes connect as `shoal <name>` (application_name), which is how the fault injector
 * finds their sessions and how the schedule audit says which process fired a slot.
 */
import postgres from "postgres";
import { assert, assertEquals } from "../assert.ts";
import {
  auditTransitions,
  createRunsTable,
  exitWithin,
  holderOf,
  installAudit,
  type ShoalProcess,
  spawnShoal,
  TEST_MAIN,
  waitFor,
  waitForOutput,
  withApplicationName,
} from "../helpers.ts";
import { connect, isConnectionError, type Sql } from "../../lib/db.ts";
import { startExecution } from "../../lib/execution.ts";
import { enqueueMany } from "../../lib/queue.ts";
import { setScheduleEnabled, upsertSchedule } from "../../lib/schedule.ts";
import { findPgBinDir, type LocalPg, startLocalPg } from "../../lib/local_pg.ts";
import { loadMigrations, migrate } from "../../lib/migrate.ts";

export const QUEUE = "fault";
export const SCHEDULE = "fault-tick";
/** Children of the run's one fan-out. */
export const CHILDREN = 12;
/** The log line every role writes once its loop runs. */
const STARTED = /(Consumer .* started on|Reaper .* started|Scheduler .* started)/;

export type Role = "consumer" | "reaper" | "scheduler";

/** One process of the run, by its name (e.g. `consumer-1`). */
export interface Member {
  name: string;
  role: Role;
  proc: ShoalProcess;
  /** Killed (SIGKILL) by the scenario: not expected to exit 0. */
  killed: boolean;
}

export interface MixedRunOptions {
  /** Where the processes connect (the database itself, or a pooler in front of it). */
  url: string;
  /** The test's own connection to the same database (direct, never through a pooler). */
  sql: Sql;
  consumers?: number;
  reapers?: number;
  schedulers?: number;
  /** Extra flags for each role's processes (e.g. --no-listen --no-prepare). */
  flags?: (role: Role) => string[];
  /** Lease of the leader roles (their interval is a seventh of it). */
  lease?: string;
}

/** What a run did, for the report in docs/guarantees.md. */
export interface Figures {
  jobs: number;
  runs: number;
  redelivered: number;
  dead: number;
  slots: number;
  faults: number;
  lost: number;
}

/** The tables the fixture tasks write and the audit the database keeps of every effect. */
async function prepare(sql: Sql): Promise<void> {
  await installAudit(sql); // test_fires, test_enqueues, test_leases
  await auditTransitions(sql); // test_transitions
  await createRunsTable(sql); // test_runs (test.record, test.child)
  await sql`
    create table test_callbacks (
      id bigint generated always as identity primary key,
      job_id bigint not null, attempt integer not null, pid integer not null,
      results jsonb not null, at timestamptz not null default clock_timestamp())`;
  // Every job that was really inserted (AFTER INSERT skips a deduplicated one).
  await sql`
    create table fault_jobs (
      id bigint primary key, task text not null, key text, execution_id bigint,
      barrier_id bigint, child_index integer)`;
  await sql`
    create function fault_audit_job() returns trigger language plpgsql as $$
    begin
      insert into fault_jobs (id, task, key, execution_id, barrier_id, child_index)
      values (new.id, new.task, new.key, new.execution_id, new.barrier_id, new.child_index);
      return null;
    end $$`;
  await sql`
    create trigger fault_audit_job after insert on shoal.jobs
    for each row execute function fault_audit_job()`;
  // Every arrival ever committed (the reaper and the last arrival delete the live rows).
  await sql`
    create table fault_arrivals (
      id bigint generated always as identity primary key,
      barrier_id bigint not null, child_index integer not null)`;
  await sql`
    create function fault_audit_arrival() returns trigger language plpgsql as $$
    begin
      insert into fault_arrivals (barrier_id, child_index) values (new.barrier_id, new.child_index);
      return null;
    end $$`;
  await sql`
    create trigger fault_audit_arrival after insert on shoal.arrivals
    for each row execute function fault_audit_arrival()`;
}

/** Flags of each role: short polls, leases and visibility timeouts, JSON logs. */
function roleFlags(role: Role, lease: string): string[] {
  const leaseMs = Number(lease.replace(/ms$/, "").replace(/s$/, "")) *
    (lease.endsWith("ms") ? 1 : 1000);
  const interval = `${Math.max(50, Math.floor(leaseMs / 7))}ms`;
  const common = ["--role", role, "--log-format", "json"];
  if (role === "consumer") {
    return [
      ...common,
      "--queues",
      QUEUE,
      "--concurrency",
      "8",
      "--poll-interval",
      "100ms",
      "--visibility-timeout",
      "2s",
      "--shutdown-grace",
      "1s",
    ];
  }
  return [...common, "--lease", lease, "--interval", interval];
}

/**
 * Retry `run` on connection errors until it succeeds or `timeoutMs` passes: the test's own
 * statements must get through while a scenario has the database down or is killing sessions.
 */
export async function persist<T>(
  what: string,
  run: () => Promise<T>,
  timeoutMs = 30_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  while (true) {
    try {
      return await run();
    } catch (error) {
      if (!isConnectionError(error) || Date.now() > deadline) {
        throw new Error(`Cannot ${what}`, { cause: error });
      }
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }
}

export class MixedRun {
  readonly members: Member[] = [];
  readonly url: string;
  readonly sql: Sql;
  #options: MixedRunOptions;
  #waves = 0;
  #execution: string | null = null;
  /** Faults the scenario injected, for the figures. */
  faults = 0;

  private constructor(options: MixedRunOptions) {
    this.#options = options;
    this.url = options.url;
    this.sql = options.sql;
  }

  /** Create the audit, the schedule, the fan-out and a first wave of jobs; start nothing yet. */
  static async prepare(options: MixedRunOptions): Promise<MixedRun> {
    const run = new MixedRun(options);
    await prepare(options.sql);
    await upsertSchedule(options.sql, {
      name: SCHEDULE,
      cron: "* * * * * *",
      task: "test.record",
      queue: QUEUE,
      payload: { ms: 0 },
    });
    run.#execution = await startExecution(options.sql, {
      task: "test.fanout",
      queue: QUEUE,
      payload: { n: CHILDREN, ms: 100 },
    });
    await run.enqueueWave(60);
    return run;
  }

  /** Spawn one process of `role`, named `<role>-<n>`. */
  spawn(role: Role, extraFlags: string[] = []): Member {
    const n = this.members.filter((m) => m.role === role).length + 1;
    const name = `${role}-${n}`;
    const proc = spawnShoal(
      [
        ...roleFlags(role, this.#options.lease ?? "2s"),
        ...(this.#options.flags?.(role) ?? []),
        ...extraFlags,
      ],
      { url: withApplicationName(this.url, `shoal ${name}`), mainModule: TEST_MAIN },
    );
    const member: Member = { name, role, proc, killed: false };
    this.members.push(member);
    return member;
  }

  /** Spawn every process of the run and wait until each one's loop runs. */
  async start(): Promise<void> {
    const spawned: Member[] = [];
    for (let i = 0; i < (this.#options.consumers ?? 2); i++) spawned.push(this.spawn("consumer"));
    for (let i = 0; i < (this.#options.reapers ?? 1); i++) spawned.push(this.spawn("reaper"));
    for (let i = 0; i < (this.#options.schedulers ?? 1); i++) spawned.push(this.spawn("scheduler"));
    await Promise.all(spawned.map((m) => this.started(m)));
  }

  /** Wait until `member` has written its "started" line. */
  async started(member: Member): Promise<void> {
    await waitFor(
      `${member.name} to start`,
      () => {
        if (STARTED.test(member.proc.output())) return true;
        return false;
      },
      30_000,
      100,
    );
  }

  /** The jobs left and what the live consumers said last: why a queue did not drain. */
  async #whatIsLeft(): Promise<string> {
    const jobs = await this.sql<Record<string, unknown>[]>`
      select id, task, attempts, max_attempts, locked_by, started_at,
        round(extract(epoch from run_at - now())::numeric, 1) as due_in_s
      from shoal.jobs order by id limit 20`;
    const said = this.members.filter((m) => m.role === "consumer" && !m.killed)
      .map((m) => `${m.name}:\n${tail(m.proc.output(), 15)}`).join("\n");
    return `jobs left (first 20): ${JSON.stringify(jobs)}; the consumers said:\n${said}`;
  }

  /** SIGKILL a member (it is then not expected to exit 0). */
  kill(member: Member): void {
    member.killed = true;
    member.proc.kill("SIGKILL");
    this.faults++;
  }

  /**
   * Enqueue `n` more plain jobs. Each wave carries dedupe keys, so an enqueue retried after
   * a connection error cannot add a job twice while the first is still pending.
   */
  async enqueueWave(n: number): Promise<void> {
    const wave = ++this.#waves;
    const jobs = Array.from({ length: n }, (_, i) => ({
      task: "test.record",
      queue: QUEUE,
      payload: { ms: 20 + (i % 5) * 10 },
      key: `wave-${wave}-${i}`,
    }));
    await persist("enqueue a wave of jobs", () => enqueueMany(this.sql, jobs));
  }

  /** The leader's member of lease `name`, once one holds it. */
  async leader(name: "reaper" | "scheduler"): Promise<Member> {
    return await waitFor(
      `a ${name} leader`,
      async () => {
        const [row] = await this.sql<{ holder: string }[]>`
        select holder from shoal.leases where name = ${name}::text and expires_at > now()`;
        return this.members.find((m) => !m.killed && row && holderOf(m.proc) === row.holder);
      },
      20_000,
      100,
    );
  }

  /** Wait until some jobs are claimed (work in flight for a fault to hit); returns how many. */
  async waitForJobsInFlight(): Promise<number> {
    return await waitFor(
      "jobs in flight",
      async () => {
        const [row] = await this.sql<{ n: number }[]>`
          select count(*)::int as n from shoal.jobs where locked_by is not null`;
        return row!.n;
      },
      20_000,
      20,
    );
  }

  /** Wait until the schedule has fired at least `n` slots. */
  async waitForSlots(n: number, timeoutMs = 30_000): Promise<void> {
    const fired = async () => {
      const [row] = await this.sql<{ n: number }[]>`
        select count(*)::int as n from test_fires where kind = 'fire'`;
      return row!.n >= n;
    };
    try {
      await waitFor(`${n} schedule slots`, fired, timeoutMs, 200);
    } catch (error) {
      const schedulers = this.members.filter((m) => m.role === "scheduler");
      const said = schedulers.map((m) => `${m.name}:\n${tail(m.proc.output(), 15)}`).join("\n");
      throw new Error(`${(error as Error).message}; the schedulers said:\n${said}`, {
        cause: error,
      });
    }
  }

  /**
   * Wind the run down: wait for the fan-out and every plain job, stop the schedule, wait
   * for the queue to drain, SIGTERM every member that was not killed; each must exit 0.
   */
  async finish(timeoutMs = 45_000): Promise<void> {
    await this.waitForSlots(3, timeoutMs);
    await waitFor(
      "the fan-out's execution to complete",
      async () => {
        const [row] = await this.sql<{ status: string }[]>`
        select status from shoal.executions where id = ${this.#execution!}::bigint`;
        return row?.status === "completed" || row?.status === "failed";
      },
      timeoutMs,
      200,
    );
    await persist("pause the schedule", () => setScheduleEnabled(this.sql, SCHEDULE, false));
    try {
      await waitFor(
        "the queue to drain",
        async () => {
          const [row] = await this.sql<{ n: number }[]>`select count(*)::int as n from shoal.jobs`;
          return row!.n === 0;
        },
        timeoutMs,
        200,
      );
    } catch (error) {
      throw new Error(`${(error as Error).message}; ${await this.#whatIsLeft()}`, { cause: error });
    }
    const live = this.members.filter((m) => !m.killed);
    for (const m of live) m.proc.kill("SIGTERM");
    // Bounded by the statement deadline (lib/db.ts): a consumer may first wait out a claim
    // stalled on a killed connection (10 s), then hand a job back (10 s, retried once: 20 s),
    // then close its pool (5 s).
    const exits = await Promise.all(live.map((m) => exitWithin(m.proc, 40_000)));
    live.forEach((m, i) => {
      assertEquals(
        exits[i]!.code,
        0,
        `${m.name} exited ${exits[i]!.code}:\n${tail(exits[i]!.output)}`,
      );
    });
  }

  /** Kill whatever is still running (a failed test must not leave processes behind). */
  async [Symbol.asyncDispose](): Promise<void> {
    await Promise.all(this.members.map((m) => m.proc[Symbol.asyncDispose]()));
  }

  /**
   * The invariants every scenario ends with; returns the run's figures. Call after finish().
   */
  async check(): Promise<Figures> {
    const sql = this.sql;
    // Nothing left behind.
    const [left] = await sql<{ jobs: number; barriers: number; arrivals: number }[]>`
      select (select count(*)::int from shoal.jobs) as jobs,
        (select count(*)::int from shoal.barriers) as barriers,
        (select count(*)::int from shoal.arrivals) as arrivals`;
    assertEquals(left, { jobs: 0, barriers: 0, arrivals: 0 }, "rows left behind");

    // Every job ran (its effect is recorded) or was dead-lettered with a reason.
    const lost = await sql<{ id: string; task: string }[]>`
      select j.id, j.task from fault_jobs j
      where not exists (
          select 1 from shoal.dead_jobs d where d.id = j.id and coalesce(d.reason, '') <> '')
        and not case j.task
          when 'test.record' then exists (
            select 1 from test_runs r where r.job_id = j.id and r.finished_at is not null)
          when 'test.record_once' then exists (select 1 from test_runs r where r.job_id = j.id)
          when 'test.child' then exists (
            select 1 from fault_arrivals a
            where a.barrier_id = j.barrier_id and a.child_index = j.child_index)
          when 'test.collect' then exists (select 1 from test_callbacks c where c.job_id = j.id)
          when 'test.fanout' then (
            select count(*) from fault_jobs c
            where c.execution_id = j.execution_id and c.task = 'test.child') = ${CHILDREN}::int
          else false end`;
    assertEquals([...lost], [], "jobs neither run nor dead-lettered");

    // Exactly once: each child arrives once, each barrier's callback is enqueued once,
    // each schedule slot fires once (insert attempts count, even deduplicated ones).
    const twiceArrived = await sql`
      select barrier_id, child_index, count(*)::int as n from fault_arrivals
      group by 1, 2 having count(*) > 1`;
    assertEquals([...twiceArrived], [], "a child arrived twice");
    const [fan] = await sql<{ status: string; callbacks: number; arrivals: number }[]>`
      select e.status,
        (select count(*)::int from fault_jobs j
         where j.execution_id = e.id and j.task = 'test.collect') as callbacks,
        (select count(*)::int from fault_arrivals a
         where a.barrier_id in (select barrier_id from fault_jobs j where j.execution_id = e.id))
          as arrivals
      from shoal.executions e where e.id = ${this.#execution!}::bigint`;
    assertEquals(fan, { status: "completed", callbacks: 1, arrivals: CHILDREN }, "the fan-out");
    const transitions = await sql<{ t: string }[]>`
      select old || '>' || new as t from test_transitions
      where execution_id = ${this.#execution!}::bigint order by id`;
    assertEquals(transitions.map((r) => r.t), ["pending>running", "running>completed"]);
    const twiceFired = await sql`
      select key, count(*)::int as n from test_enqueues where key like 'schedule:%'
      group by key having count(*) > 1`;
    assertEquals([...twiceFired], [], "a schedule slot fired twice");
    const twiceSlot = await sql`
      select slot, count(*)::int as n from test_fires where kind = 'fire'
      group by slot having count(*) > 1`;
    assertEquals([...twiceSlot], [], "a schedule slot was recorded as fired twice");
    await this.checkFencing();
    return await this.figures();
  }

  /**
   * Leader fencing: every schedule fire was made by the process holding the scheduler
   * lease's current term at the fire's transaction time (the term acquired last before it),
   * and no term ever had two holders.
   */
  async checkFencing(): Promise<void> {
    const terms = await this.sql<{ token: string; holders: number }[]>`
      select token::text, count(distinct holder)::int as holders from test_leases
      where name = 'scheduler' group by token having count(distinct holder) > 1`;
    assertEquals([...terms], [], "a scheduler lease term had two holders");
    const fires = await this.sql<{ proc: string; holder: string | null; at: Date }[]>`
      select f.proc, f.at, (
        select l.holder from test_leases l
        where l.name = 'scheduler' and l.kind = 'acquire' and l.at <= f.at
        order by l.at desc, l.id desc limit 1) as holder
      from test_fires f where f.kind = 'fire' order by f.id`;
    assert(fires.length > 0, "nothing fired");
    for (const f of fires) {
      const member = this.members.find((m) => `shoal ${m.name}` === f.proc);
      if (!member) throw new Error(`A fire by an unknown session ${f.proc}`);
      assertEquals(
        holderOf(member.proc),
        f.holder,
        `${f.proc} fired at ${f.at.toISOString()} outside its lease term`,
      );
    }
  }

  async figures(): Promise<Figures> {
    const [row] = await this.sql<Omit<Figures, "faults" | "lost">[]>`
      select (select count(*)::int from fault_jobs) as jobs,
        (select count(*)::int from test_runs) + (select count(*)::int from test_callbacks)
          as runs,
        (select count(*)::int from (
          select job_id from test_runs group by job_id having count(*) > 1) t) as redelivered,
        (select count(*)::int from shoal.dead_jobs) as dead,
        (select count(*)::int from test_fires where kind = 'fire') as slots`;
    return { ...row!, faults: this.faults, lost: 0 };
  }
}

/** The last lines of a process's output, for assertion messages. */
export function tail(output: string, lines = 40): string {
  return output.trim().split("\n").slice(-lines).join("\n");
}

/** Print a scenario's figures where `deno test` shows them (docs/guarantees.md quotes them). */
export function report(scenario: string, figures: Figures, started: number): void {
  const seconds = ((Date.now() - started) / 1000).toFixed(1);
  const line = `[fault] ${scenario}: ${figures.jobs} jobs, ${figures.runs} runs, ` +
    `${figures.redelivered} redelivered, ${figures.dead} dead-lettered, ${figures.slots} slots, ` +
    `${figures.faults} faults injected, ${figures.lost} lost, ${seconds} s`;
  Deno.stdout.writeSync(new TextEncoder().encode(line + "\n"));
}

/**
 * Kill every shoal session (application_name `shoal <name>`) every `everyMs` until stopped;
 * counts the sessions it ended.
 */
export function terminateLoop(url: string, everyMs: number): { stop(): Promise<number> } {
  const admin = postgres(url, {
    max: 1,
    onnotice: () => {},
    connection: { application_name: "fault injector" },
  });
  let killed = 0;
  let running = true;
  const loop = (async () => {
    while (running) {
      try {
        const [row] = await admin<{ n: number }[]>`
          select count(*)::int as n from (
            select pg_terminate_backend(pid) from pg_stat_activity
            where application_name like 'shoal %' and application_name <> 'shoal test'
              and datname = current_database() -- test files run in parallel on one server
              and pid <> pg_backend_pid()) t`;
        killed += row!.n;
      } catch (error) {
        // The injector's own session can be caught in a restart: try again next round.
        if (!isConnectionError(error)) throw error;
      }
      await new Promise((resolve) => setTimeout(resolve, everyMs));
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      await admin.end({ timeout: 5 });
      return killed;
    },
  };
}

/** A throwaway Postgres of a test's own, which it may stop, start and restart. */
export interface OwnCluster {
  pg: LocalPg;
  /** The migrated database the run uses. */
  url: string;
  restart(): Promise<void>;
  stop(): Promise<void>;
  start(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

/**
 * Run pg_ctl as the postgres OS user. Its output goes nowhere: the server it starts would
 * inherit a pipe and hold it open for its whole life (the server logs to `-l` instead).
 */
async function pgCtl(bin: string, log: string, args: string[]): Promise<void> {
  const out = await new Deno.Command("runuser", {
    args: ["-u", "postgres", "--", `${bin}/pg_ctl`, ...args],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).output();
  if (!out.success) {
    const last = (await Deno.readTextFile(log)).trim().split("\n").slice(-3).join("\n");
    throw new Error(`pg_ctl ${args.at(-1)} failed (exit ${out.code}): ${last}`);
  }
}

/**
 * Start an own cluster (lib/local_pg.ts, as the postgres OS user) with a migrated
 * database `shoal`; its server can be stopped and started on the same port.
 */
export async function ownCluster(): Promise<OwnCluster> {
  const pg = await startLocalPg({ fast: true });
  const bin = (await findPgBinDir()).path;
  const data = `${pg.dir}/data`;
  const admin = postgres(pg.url, { max: 1, onnotice: () => {} });
  try {
    await admin`create database shoal`;
  } finally {
    await admin.end();
  }
  const url = new URL(pg.url);
  url.pathname = "/shoal";
  const sql = connect(url.toString(), { applicationName: "shoal test", max: 1 });
  try {
    await migrate(sql, await loadMigrations());
  } finally {
    await sql.end();
  }
  const settings = [
    `-c listen_addresses=127.0.0.1`,
    `-c port=${pg.port}`,
    `-c unix_socket_directories=''`,
    `-c max_connections=200`,
    `-c fsync=off`,
    `-c synchronous_commit=off`,
  ].join(" ");
  let down = false;
  const log = `${pg.dir}/postgres.log`;
  const start = async () => {
    await pgCtl(bin, log, ["-D", data, "-l", log, "-o", settings, "-w", "-t", "60", "start"]);
    down = false;
  };
  return {
    pg,
    url: url.toString(),
    restart: () =>
      pgCtl(bin, log, ["-D", data, "-l", log, "-m", "fast", "-w", "-t", "60", "restart"]),
    async stop() {
      await pgCtl(bin, log, ["-D", data, "-m", "fast", "-w", "-t", "60", "stop"]);
      down = true;
    },
    start,
    async [Symbol.asyncDispose]() {
      if (down) await start(); // pg.stop() expects a running server
      await pg.stop();
    },
  };
}

export { waitForOutput };
