/**
 * Schedules by the thousand (issue 14, item 3), standalone:
 *
 *   deno run -A bench/schedules.ts [--tree DIR] [--schedules 1000] [--seconds 20]
 *     [--ceiling 10000]
 *
 * On a throwaway cluster (or DATABASE_URL), with the schema and the scheduler of the shoal
 * checkout in DIR (default: this one), so two checkouts can be measured by one script:
 *
 * - steady: N schedules firing every second (`* * * * * *`) onto a queue nobody consumes,
 *   one real `main.ts --role scheduler` process. After a warm-up, every slot of a window of
 *   S seconds is counted: slots expected (N × S), fired (a job whose dedupe key names that
 *   slot), missed, and the lag of each fire (the job's created_at minus its slot), p50/p99/max.
 * - ceiling: M schedules due at the same instant (their next_run_at set to one slot a few
 *   seconds ahead); fires/s = M over the time from that slot until the last job is in
 *   (polled every 20 ms).
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

const QUEUE = "schedules_bench";
/** Slots before the window: the first tick records baselines, then fires settle. */
const WARMUP_S = 3;
/** After the window: the window's last slots have time to fire. */
const SETTLE_MS = 3_000;

const { values } = parseArgs({
  args: Deno.args,
  options: {
    tree: { type: "string", default: new URL("..", import.meta.url).pathname },
    schedules: { type: "string", default: "1000" },
    seconds: { type: "string", default: "20" },
    ceiling: { type: "string", default: "10000" },
  },
});
const tree = values.tree!.endsWith("/") ? values.tree! : `${values.tree}/`;
const schedules = Number(values.schedules);
const seconds = Number(values.seconds);
const ceiling = Number(values.ceiling);

function runMain(url: string, args: string[]): Child {
  return new Child(
    `shoal ${args[0]}`,
    ["run", "-A", `${tree}main.ts`, ...args],
    {
      DATABASE_URL: url,
    },
    Deno.execPath(),
    tree,
  );
}

async function migrate(url: string): Promise<void> {
  const child = runMain(url, ["migrate"]);
  const status = await child.exited();
  if (status.code !== 0) throw new Error(`migrate failed:\n${child.output().slice(-2000)}`);
}

async function startScheduler(url: string): Promise<Child> {
  const child = runMain(url, ["--role", "scheduler", "--log-format", "json"]);
  await child.waitForLine(
    "the scheduler's lead",
    (l) => /Leading/.test(l) && /scheduler/.test(l),
    60_000,
  );
  return child;
}

/** Add `n` schedules named `<prefix>NNNNN` on `cron` in one statement. */
async function addSchedules(sql: Sql, prefix: string, n: number, cron: string): Promise<void> {
  await sql`
    insert into shoal.schedules (name, cron, task, queue)
    select ${prefix} || lpad(i::text, 5, '0'), ${cron}::text, 'shoal.noop', ${QUEUE}::text
    from generate_series(1, ${n}::integer) i`;
}

async function steady(sql: Sql, url: string): Promise<void> {
  await addSchedules(sql, "s", schedules, "* * * * * *");
  const scheduler = await startScheduler(url);
  try {
    const [window] = await sql<{ start: Date }[]>`
      select date_trunc('second', now()) + ${WARMUP_S} * interval '1 second' as start`;
    const from = window!.start.getTime();
    const to = from + seconds * 1000;
    await sleep(to - Date.now() + SETTLE_MS);
    const rows = await sql<{ slot: Date; created_at: Date }[]>`
      select substring(key from '^schedule:[^:]+:(.*)$')::timestamptz as slot, created_at from shoal.jobs
      where key like 'schedule:s%'`;
    const inWindow = rows.filter((r) => r.slot.getTime() >= from && r.slot.getTime() < to);
    const lags = inWindow.map((r) => r.created_at.getTime() - r.slot.getTime());
    const expected = schedules * seconds;
    say(
      `steady: ${schedules} schedules every second, ${seconds} s window: expected ${expected}, ` +
        `fired ${inWindow.length}, missed ${expected - inWindow.length}; lag p50 ${
          percentile(lags, 50)
        } ms, p99 ${percentile(lags, 99)} ms, max ${Math.max(0, ...lags)} ms`,
    );
  } finally {
    await scheduler.stop();
  }
}

async function ceilingRun(sql: Sql, url: string): Promise<void> {
  // Yearly schedules: none is due by itself during the run.
  await addSchedules(sql, "c", ceiling, "0 0 1 1 *");
  const scheduler = await startScheduler(url);
  try {
    await pollUntil(
      "baselines",
      async () => {
        const [r] = await sql<{ n: number }[]>`
          select count(*)::int as n from shoal.schedules where next_run_at is not null`;
        return r!.n === ceiling;
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
        return r!.n === ceiling;
      },
      { everyMs: 20, timeoutMs: 300_000 },
    );
    const ms = doneAt - due!.at.getTime();
    say(
      `ceiling: ${ceiling} schedules due at once fired in ${Math.round(ms)} ms: ${
        Math.round(ceiling / (ms / 1000))
      } fires/s`,
    );
  } finally {
    await scheduler.stop();
  }
}

const server = await startServer({ profile: false });
try {
  say(`shoal tree: ${tree}`);
  await withFreshDb(server, "schedules steady", async (db) => {
    await migrate(db.url);
    await steady(db.sql, db.url);
  });
  if (ceiling > 0) {
    await withFreshDb(server, "schedules ceiling", async (db) => {
      await migrate(db.url);
      await ceilingRun(db.sql, db.url);
    });
  }
} finally {
  await stopAllChildren();
  await server.stop();
}
