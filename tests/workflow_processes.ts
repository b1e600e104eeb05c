/**
 * What the workflow process tests share: a real `shoal --role consumer` running the tasks of
 * tests/fixtures/workflow_main.ts, the tables those tasks write (effects inside their
 * transactions, marks outside them), and the count of jobs left.
 */
import { type ShoalProcess, spawnShoal } from "./helpers.ts";
import type { Sql } from "../lib/db.ts";

/** The entry file whose tasks the consumers run. */
export const WORKFLOW_MAIN = new URL("fixtures/workflow_main.ts", import.meta.url).pathname;

/** A consumer's line once it is up. */
export const STARTED = "started on";

/** A consumer of the fixture's tasks: short deadlines, so redeliveries come quickly. */
export function workflowConsumer(url: string): ShoalProcess {
  return spawnShoal([
    "--role",
    "consumer",
    "--queues",
    "default",
    "--concurrency",
    "4",
    "--poll-interval",
    "100ms",
    "--visibility-timeout",
    "2s",
    "--shutdown-grace",
    "1s",
    "--log-format",
    "json",
  ], { url, mainModule: WORKFLOW_MAIN });
}

/** The tables the fixture's tasks write: `test_effects` (in their transactions), `test_marks`. */
export async function createWorkflowTables(sql: Sql): Promise<void> {
  await sql`
    create table test_effects (
      id bigint generated always as identity primary key,
      job_id bigint not null, attempt integer not null, pid integer not null, effect text not null,
      at timestamptz not null default clock_timestamp())`;
  await sql`
    create table test_marks (
      id bigint generated always as identity primary key,
      job_id bigint not null, attempt integer not null, pid integer not null, mark text not null,
      at timestamptz not null default clock_timestamp())`;
}

/** Jobs left in shoal.jobs. */
export async function jobCount(sql: Sql): Promise<number> {
  const [row] = await sql<{ n: number }[]>`select count(*)::int as n from shoal.jobs`;
  return row!.n;
}
