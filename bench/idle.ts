/**
 * W10, the cost of an idle fleet: 4 consumer processes, plus 2 reapers and 2 schedulers
 * for systems that run those roles apart (shoal), every one with its defaults, on an empty
 * queue. Once every process has logged its start (and a short settle), the database's
 * pg_stat_statements counters are reset; after the window, the top-level statements the
 * fleet sent are counted. Issue 5's target: at most 2 statements/s in all.
 *
 * pg_stat_statements must be preloaded, which changes the server: W10 runs on a second
 * throwaway cluster started for it (`BenchContext.statementsServer`), so the other
 * figures keep a server without it.
 *
 * @module
 */
import type { Sql } from "../lib/db.ts";
import { sleep, withFreshDb } from "./harness.ts";
import type { ConsumerProcess, System } from "./systems.ts";
import { type Benchmark, enqueueAll, type Metric } from "./workloads.ts";

export const FLEET = { consumers: 4, reapers: 2, schedulers: 2 };
/** After the last start line: startup work (first leader ticks, LISTEN) is not counted. */
const SETTLE_MS = 3_000;
/** Statements listed in the details. */
const TOP = 10;

const METRICS: Metric[] = [{ key: "statements_per_s", unit: "statements/s", better: "lower" }];

export interface FleetStatement {
  query: string;
  calls: number;
  per_s: number;
}

async function resetStatements(sql: Sql): Promise<void> {
  await sql`create extension if not exists pg_stat_statements`;
  await sql`select pg_stat_statements_reset()`;
}

/** Top-level statements this database ran since the reset, busiest first (ours left out). */
async function readStatements(sql: Sql, seconds: number): Promise<FleetStatement[]> {
  const rows = await sql<{ query: string; calls: number }[]>`
    select left(regexp_replace(query, '[[:space:]]+', ' ', 'g'), 200) as query,
      sum(calls)::float8 as calls
    from pg_stat_statements
    where dbid = (select oid from pg_database where datname = current_database())
      and toplevel and query not like '%pg_stat_statements%'
    group by 1
    order by 2 desc`;
  return rows.map((r) => ({ query: r.query, calls: r.calls, per_s: r.calls / seconds }));
}

function fleetOf(system: System): string {
  return system.spawnRole
    ? `${FLEET.consumers} consumers, ${FLEET.reapers} reapers, ${FLEET.schedulers} schedulers`
    : `${FLEET.consumers} worker processes (its maintenance and cron run inside the workers)`;
}

/** W10's limited variant (shoal, issue 15): jobs waiting that a limit of 0 holds back. */
export const LIMITED_WAITING = 1_000;

/**
 * W10: statements per second an idle fleet of `system` sends. With `limited` (shoal only,
 * issue 15), the queue is not empty but held: LIMITED_WAITING jobs wait behind a default
 * concurrency limit of 0, so every claim finds work it may not take (bench/flow.ts).
 */
export function idleFleet(system: System, options: { limited?: boolean } = {}): Benchmark {
  const limited = options.limited === true;
  return {
    id: `W10/${system.name}${limited ? "/limited" : ""}`,
    workload: "W10",
    system: system.name,
    title: `idle fleet: ${fleetOf(system)}` +
      (limited ? `, ${LIMITED_WAITING.toLocaleString("en-US")} jobs held by a limit of 0` : ""),
    settings: `${system.defaultSettings}; ${fleetOf(system)}, each with its defaults, ` +
      (limited
        ? `${LIMITED_WAITING} no-op jobs held back by shoal.set_concurrency_limit('default', 0)`
        : "empty queue") +
      `; counters reset ${SETTLE_MS / 1000} s after the last start line; top-level ` +
      "statements only; on a separate throwaway cluster with pg_stat_statements preloaded " +
      "(track = top)",
    metrics: METRICS,
    run: async (ctx) => {
      const server = await ctx.statementsServer();
      return await withFreshDb(server, "w10", async (db) => {
        await system.install(db.sql, db.url);
        await db.sql`create extension if not exists pg_stat_statements`;
        if (limited) {
          await db.sql`select shoal.set_concurrency_limit('default', 0)`;
          await enqueueAll(system, db.url, LIMITED_WAITING, LIMITED_WAITING);
        }
        const fleet: ConsumerProcess[] = [];
        let statements: FleetStatement[];
        const seconds = ctx.sizes.idleFleetMs / 1000;
        try {
          for (let i = 0; i < FLEET.consumers; i++) {
            fleet.push(system.spawnConsumer(db.url, { stamp: false }));
          }
          if (system.spawnRole) {
            for (let i = 0; i < FLEET.reapers; i++) fleet.push(system.spawnRole(db.url, "reaper"));
            for (let i = 0; i < FLEET.schedulers; i++) {
              fleet.push(system.spawnRole(db.url, "scheduler"));
            }
          }
          await Promise.all(fleet.map((p) => p.started));
          await sleep(SETTLE_MS);
          await resetStatements(db.sql);
          const t0 = performance.now();
          await sleep(ctx.sizes.idleFleetMs);
          statements = await readStatements(db.sql, (performance.now() - t0) / 1000);
        } finally {
          await Promise.all(fleet.map((p) => p.stop()));
        }
        const total = statements.reduce((sum, s) => sum + s.calls, 0);
        return {
          values: { statements_per_s: total / seconds },
          details: {
            window_s: seconds,
            statements: total,
            processes: fleet.length,
            top: statements.slice(0, TOP),
          },
        };
      });
    },
  };
}
