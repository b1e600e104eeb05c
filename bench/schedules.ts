/**
 * W12, schedules by the thousand (issue 14, item 3): one real `--role scheduler` process.
 *
 * - steady: 1,000 schedules firing every second (`* * * * * *`) onto a queue nobody
 *   consumes. After a warm-up, every slot of a 20 s window is counted: slots expected
 *   (1,000 × 20), fired (a job whose dedupe key names that slot), missed, and the lag of each
 *   fire (the job's created_at minus its slot), p50/p99/max.
 * - ceiling: 10,000 schedules due at the same instant (their next_run_at set to one slot a
 *   few seconds ahead); fires/s = 10,000 over the time from that slot until the last job is
 *   in (polled every 20 ms).
 *
 * A workload of `deno task bench` (`--only W12`), and standalone for any checkout:
 *
 *   deno run -A bench/schedules.ts [--tree DIR] [--schedules 1000] [--seconds 20]
 *     [--ceiling 10000]
 *
 * which runs DIR's `main.ts migrate` and `main.ts --role scheduler` (default: this checkout).
 *
 * @module
 */
import { parseArgs } from "node:util";
import type { Sql } from "../lib/db.ts";
import {
  Child,
  percentile,
  pollUntil,
  say,
  sleep,
  startServer,
  stopAllChildren,
  withFreshDb,
} from "./harness.ts";
import type { System } from "./systems.ts";
import type { Benchmark, Metric } from "./workloads.ts";

const QUEUE = "schedules_bench";
/** Slots before the window: the first tick records baselines, then fires settle. */
const WARMUP_S = 3;
/** After the window: the window's last slots have time to fire. */
const SETTLE_MS = 3_000;

export interface ScheduleSizes {
  /** Schedules firing every second. */
  schedules: number;
  /** The counted window, seconds. */
  seconds: number;
  /** Schedules due at one instant for the ceiling (0: not measured). */
  ceiling: number;
}

export const SCHEDULE_SIZES: ScheduleSizes = { schedules: 1_000, seconds: 20, ceiling: 10_000 };

/** Start a scheduler process of the checkout measured on the database at `url`. */
type StartScheduler = (url: string) => Promise<{ stop(): Promise<unknown> }>;

/** The database measured: shoal's schema installed, no schedules. */
interface Db {
  sql: Sql;
  url: string;
}

export interface SteadyResult {
  expected: number;
  fired: number;
  missed: number;
  lagP50Ms: number;
  lagP99Ms: number;
  lagMaxMs: number;
}

/** Add `n` schedules named `<prefix>NNNNN` on `cron` in one statement. */
async function addSchedules(sql: Sql, prefix: string, n: number, cron: string): Promise<void> {
  await sql`
    insert into shoal.schedules (name, cron, task, queue)
    select ${prefix} || lpad(i::text, 5, '0'), ${cron}::text, 'shoal.noop', ${QUEUE}::text
    from generate_series(1, ${n}::integer) i`;
}

/** The steady part, on a database with shoal's schema and no schedules. */
export async function measureSteady(
  db: Db,
  start: StartScheduler,
  sizes: ScheduleSizes,
): Promise<SteadyResult> {
  const sql = db.sql;
  await addSchedules(sql, "s", sizes.schedules, "* * * * * *");
  const scheduler = await start(db.url);
  try {
    const [window] = await sql<{ start: Date }[]>`
      select date_trunc('second', now()) + ${WARMUP_S} * interval '1 second' as start`;
    const from = window!.start.getTime();
    const to = from + sizes.seconds * 1000;
    await sleep(to - Date.now() + SETTLE_MS);
    const rows = await sql<{ slot: Date; created_at: Date }[]>`
      select substring(key from '^schedule:[^:]+:(.*)$')::timestamptz as slot, created_at
      from shoal.jobs where key like 'schedule:s%'`;
    const inWindow = rows.filter((r) => r.slot.getTime() >= from && r.slot.getTime() < to);
    const lags = inWindow.map((r) => r.created_at.getTime() - r.slot.getTime());
    const expected = sizes.schedules * sizes.seconds;
    return {
      expected,
      fired: inWindow.length,
      missed: expected - inWindow.length,
      lagP50Ms: percentile(lags, 50),
      lagP99Ms: percentile(lags, 99),
      lagMaxMs: Math.max(0, ...lags),
    };
  } finally {
    await scheduler.stop();
  }
}

/** The ceiling part (fires/s), on a database with shoal's schema and no schedules. */
export async function measureCeiling(
  db: Db,
  start: StartScheduler,
  sizes: ScheduleSizes,
): Promise<number> {
  // Yearly schedules: none is due by itself during the run.
  const sql = db.sql;
  await addSchedules(sql, "c", sizes.ceiling, "0 0 1 1 *");
  const scheduler = await start(db.url);
  try {
    await pollUntil(
      "baselines",
      async () => {
        const [r] = await sql<{ n: number }[]>`
          select count(*)::int as n from shoal.schedules where next_run_at is not null`;
        return r!.n === sizes.ceiling;
      },
      { everyMs: 100, timeoutMs: 60_000 },
    );
    // All due at one instant past the scheduler's longest sleep (5 s): it wakes before, sees
    // the rows due then and sleeps until that instant, as for any slot. A change of
    // next_run_at alone does not wake it.
    const [due] = await sql<{ at: Date }[]>`
      update shoal.schedules set next_run_at = date_trunc('second', now()) + interval '7 s'
      where name like 'c%' returning next_run_at as at`;
    const doneAt = await pollUntil(
      "every fire",
      async () => {
        const [r] = await sql<{ n: number }[]>`
          select count(*)::int as n from shoal.jobs where key like 'schedule:c%'`;
        return r!.n === sizes.ceiling;
      },
      { everyMs: 20, timeoutMs: 300_000 },
    );
    return sizes.ceiling / ((doneAt - due!.at.getTime()) / 1000);
  } finally {
    await scheduler.stop();
  }
}

const METRICS: Metric[] = [
  { key: "missed", unit: "slots", better: "lower" },
  { key: "p99_lag_ms", unit: "ms", better: "lower" },
  { key: "ceiling", unit: "fires/s", better: "higher" },
];

/** W12 for a system with a scheduler role (shoal). */
export function schedulesAtScale(system: System, sizes = SCHEDULE_SIZES): Benchmark {
  const spawn = system.spawnRole;
  return {
    id: `W12/${system.name}`,
    workload: "W12",
    system: system.name,
    title: `${sizes.schedules.toLocaleString("en-US")} per-second schedules, 1 scheduler process`,
    settings: `${system.defaultSettings}; ${sizes.schedules} schedules on "* * * * * *", slots ` +
      `counted over ${sizes.seconds} s after ${WARMUP_S} s; lag = job created_at - slot; ` +
      `ceiling: ${sizes.ceiling} schedules due at one instant, fires/s until the last job is in`,
    metrics: METRICS,
    run: async (ctx) => {
      if (!spawn) throw new Error(`${system.name} has no scheduler role`);
      const start = async (url: string) => {
        const process = spawn(url, "scheduler");
        await process.started;
        return process;
      };
      const steady = await withFreshDb(ctx.server, "w12 steady", async (db) => {
        await system.install(db.sql, db.url);
        return await measureSteady(db, start, sizes);
      });
      const ceiling = await withFreshDb(ctx.server, "w12 ceiling", async (db) => {
        await system.install(db.sql, db.url);
        return await measureCeiling(db, start, sizes);
      });
      return {
        values: { missed: steady.missed, p99_lag_ms: steady.lagP99Ms, ceiling },
        details: { ...steady },
      };
    },
  };
}

/** The standalone run: DIR's `main.ts` as a child process. */
async function standalone(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      tree: { type: "string", default: new URL("..", import.meta.url).pathname },
      schedules: { type: "string", default: String(SCHEDULE_SIZES.schedules) },
      seconds: { type: "string", default: String(SCHEDULE_SIZES.seconds) },
      ceiling: { type: "string", default: String(SCHEDULE_SIZES.ceiling) },
    },
  });
  const tree = values.tree!.endsWith("/") ? values.tree! : `${values.tree}/`;
  const sizes: ScheduleSizes = {
    schedules: Number(values.schedules),
    seconds: Number(values.seconds),
    ceiling: Number(values.ceiling),
  };
  const main = (url: string, args: string[]) =>
    new Child(
      `shoal ${args[0]}`,
      ["run", "-A", `${tree}main.ts`, ...args],
      {
        DATABASE_URL: url,
      },
      Deno.execPath(),
      tree,
    );
  const migrate = async (url: string) => {
    const child = main(url, ["migrate"]);
    if ((await child.exited()).code !== 0) {
      throw new Error(`migrate failed:\n${child.output().slice(-2000)}`);
    }
  };
  const start: StartScheduler = async (url) => {
    const child = main(url, ["--role", "scheduler", "--log-format", "json"]);
    await child.waitForLine("the scheduler's lead", (l) => /Leading/.test(l), 60_000);
    return child;
  };
  const server = await startServer({ profile: false });
  try {
    say(`shoal tree: ${tree}`);
    await withFreshDb(server, "schedules steady", async (db) => {
      await migrate(db.url);
      const r = await measureSteady(db, start, sizes);
      say(
        `steady: ${sizes.schedules} schedules every second, ${sizes.seconds} s window: ` +
          `expected ${r.expected}, fired ${r.fired}, missed ${r.missed}; lag p50 ${r.lagP50Ms} ` +
          `ms, p99 ${r.lagP99Ms} ms, max ${r.lagMaxMs} ms`,
      );
    });
    if (sizes.ceiling > 0) {
      await withFreshDb(server, "schedules ceiling", async (db) => {
        await migrate(db.url);
        const rate = await measureCeiling(db, start, sizes);
        say(`ceiling: ${sizes.ceiling} schedules due at one instant: ${Math.round(rate)} fires/s`);
      });
    }
  } finally {
    await stopAllChildren();
    await server.stop();
  }
}

if (import.meta.main) await standalone();
