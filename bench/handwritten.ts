/**
 * The hand-written floor: the least a Postgres queue can do on the same client library
 * (postgres.js in Deno), written as a `System` so every workload measures it exactly as
 * it measures shoal. One plain table, no fencing, no retries, no fairness, no priority:
 * a claim is `delete ... returning` of up to 100 rows under FOR UPDATE SKIP LOCKED
 * (at-most-once), or, in the `ack` variant, an update that marks the rows followed by a
 * delete of them (the least an at-least-once queue needs: two statements per batch).
 *
 * The same table is what the pgbench floors claim from (see pgbench.ts).
 *
 * @module
 */
import type { Sql } from "../lib/db.ts";
import { Child } from "./harness.ts";
import { type BenchJob, type SqlEnqueue, sqlProducer, type System } from "./systems.ts";

/** Create the plain floor table. */
export async function installFloorTable(sql: Sql): Promise<void> {
  await sql`create schema if not exists bench_floor`;
  await sql`
    create table if not exists bench_floor.jobs (
      id bigint generated always as identity primary key,
      task text not null,
      payload jsonb not null default '{}',
      locked_at timestamptz,
      created_at timestamptz not null default now()
    )`;
}

function taskOf(job: BenchJob): { task: string; payload: Record<string, unknown> } {
  return job.kind === "noop"
    ? { task: "noop", payload: {} }
    : { task: "bench.stamp", payload: { t: job.enqueuedAt } };
}

/** The NOTIFY channel the hand-written consumer listens on. */
export const FLOOR_CHANNEL = "bench_floor";
/** Rows the hand-written consumer claims per statement unless told otherwise. */
export const FLOOR_BATCH = 100;

/** How the floor enqueues: one INSERT (with pg_notify when asked), or one INSERT … unnest(). */
const floorEnqueue: SqlEnqueue = {
  async enqueueOne(sql, job, { notify }) {
    const { task, payload } = taskOf(job);
    // Sent as text and cast: postgres.js would JSON-encode a string parameter typed jsonb again.
    const json = JSON.stringify(payload);
    if (notify) {
      await sql`
        with ins as (
          insert into bench_floor.jobs (task, payload)
          values (${task}::text, ${json}::text::jsonb)
          returning id
        )
        select pg_notify(${FLOOR_CHANNEL}::text, '') from ins`;
    } else {
      await sql`
        insert into bench_floor.jobs (task, payload) values (${task}::text, ${json}::text::jsonb)`;
    }
  },
  async enqueueBatch(sql, jobs, { notify }) {
    const specs = jobs.map(taskOf);
    await sql`
      insert into bench_floor.jobs (task, payload)
      select * from unnest(${specs.map((s) => s.task)}::text[],
                           ${specs.map((s) => JSON.stringify(s.payload))}::text[]::jsonb[])`;
    if (notify) await sql`select pg_notify(${FLOOR_CHANNEL}::text, '')`;
  },
};

/**
 * A hand-written queue; `ack` picks claim-then-delete over delete-on-claim, `batch` the
 * rows per claim (100 unless given).
 */
export function handWritten(options: { ack: boolean; batch?: number }): System {
  const mode = options.ack ? "ack" : "delete";
  const batch = options.batch ?? FLOOR_BATCH;
  const suffix = batch === FLOOR_BATCH ? "" : ` b${batch}`;
  return {
    name: (options.ack ? "hand-written claim+ack" : "hand-written") + suffix,
    defaultSettings: options.ack
      ? `1 process, postgres.js, update…returning up to ${batch} rows (SKIP LOCKED, partial index on unclaimed rows, enable_bitmapscan off in its session) then one delete of them, LISTEN + 2s poll`
      : `1 process, postgres.js, delete…returning up to ${batch} rows per statement (SKIP LOCKED), LISTEN + 2s poll`,
    async install(sql) {
      await installFloorTable(sql);
      if (options.ack) {
        // Claimable rows in claim order; the consumer pins its plan to it (see there).
        await sql`
          create index jobs_claimable_idx on bench_floor.jobs (id) where locked_at is null`;
      }
    },
    jobsTable: "bench_floor.jobs",
    openProducer: (url, producerOptions) =>
      Promise.resolve(sqlProducer(url, producerOptions, floorEnqueue)),
    spawnConsumer(url) {
      const args = [
        "run",
        "-A",
        new URL("handwritten_consumer.ts", import.meta.url).pathname,
        "--mode",
        mode,
        "--batch",
        String(batch),
      ];
      const child = new Child(`hand-written consumer (${mode})`, args, { DATABASE_URL: url });
      const started = child.waitForLine(
        "its started line",
        (line) => line.startsWith('{"event":"started"'),
        60_000,
      ).then((line) => (JSON.parse(line) as { at: number }).at);
      started.catch(() => {}); // the workload awaits it; a failure is reported there
      return {
        pid: child.process.pid,
        started,
        async stop() {
          const status = await child.stop();
          if (status.code !== 0) {
            throw new Error(
              `hand-written consumer exited with code ${status.code}; its output:\n${
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
        select not exists (select 1 from bench_floor.jobs order by id limit 1) as empty`;
      return row!.empty;
    },
    async count(sql) {
      const [row] = await sql<{ n: number }[]>`
        select count(*)::integer as n from bench_floor.jobs`;
      return row!.n;
    },
  };
}
