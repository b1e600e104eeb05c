/**
 * `--profile`: where the time of a run goes, from pg_stat_statements (preloaded with
 * `track = all`, so statements inside shoal's SQL functions show up too, flagged
 * `toplevel = false`). Top-level calls per job count the round trips a job costs.
 * Profiling changes the server, so figures from a profile run are not the benchmark's.
 *
 * @module
 */
import type { Sql } from "../lib/db.ts";

export interface StatementStat {
  query: string;
  toplevel: boolean;
  calls: number;
  rows: number;
  total_ms: number;
  mean_ms: number;
  wal_bytes: number;
}

export interface StatementProfile {
  /** Top-level statements (client round trips) per job. */
  statements_per_job: number;
  /** Server execution time of top-level statements per job, ms. */
  server_ms_per_job: number;
  /** WAL written per job, bytes. */
  wal_bytes_per_job: number;
  /** The statements that took the most time, busiest first. */
  top: StatementStat[];
}

/** Start counting from zero (the extension is created in the run's own database). */
export async function profileReset(sql: Sql): Promise<void> {
  await sql`create extension if not exists pg_stat_statements`;
  await sql`select pg_stat_statements_reset()`;
}

/** What this database ran since the reset, normalised per job. */
export async function profileRead(sql: Sql, jobs: number): Promise<StatementProfile> {
  const rows = await sql<StatementStat[]>`
    select left(regexp_replace(query, '[[:space:]]+', ' ', 'g'), 160) as query, toplevel,
      calls::float8 as calls, rows::float8 as rows, total_exec_time as total_ms,
      mean_exec_time as mean_ms, wal_bytes::float8 as wal_bytes
    from pg_stat_statements
    where dbid = (select oid from pg_database where datname = current_database())
      and query not like '%pg_stat_statements%'
    order by total_exec_time desc`;
  const top = rows.filter((r) => r.toplevel);
  const sum = (pick: (r: StatementStat) => number) =>
    top.reduce((total, r) => total + pick(r), 0) / jobs;
  return {
    statements_per_job: sum((r) => r.calls),
    server_ms_per_job: sum((r) => r.total_ms),
    wal_bytes_per_job: sum((r) => r.wal_bytes),
    top: rows.slice(0, 12),
  };
}
