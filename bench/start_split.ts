/**
 * W3's start latency split into its steps, for shoal and the hand-written floor: the
 * evidence behind W3 in docs/performance.md.
 *
 *   deno run -A bench/start_split.ts                  a throwaway cluster (Postgres defaults)
 *   DATABASE_URL=... deno run -A bench/start_split.ts   a given server (fresh databases on it)
 *   deno run -A bench/start_split.ts --jobs 1000
 *
 * One job at a time (after as many warm-up jobs): the producer's enqueue call, as the bench
 * makes it (shoal.insert_job with NOTIFY; the floor's insert + pg_notify), timed until the
 * listening connection receives the NOTIFY; then the consumer's claim round trip
 * (shoal.claim_jobs through lib/queue.ts claim(); the floor's delete … returning). Prints
 * the medians in ms. No handler runs: the rest of W3's latency is the consumer's dispatch.
 *
 * @module
 */
import { parseArgs } from "node:util";
import postgres from "postgres";
import { type BenchServer, freshDb, median, print, startServer } from "./harness.ts";
import type { Sql } from "../lib/db.ts";
import { loadMigrations, migrate } from "../lib/migrate.ts";
import { ack, claim } from "../lib/queue.ts";

interface Split {
  /** From just before the enqueue call until the NOTIFY reached the listener. */
  notified: number;
  /** The claim's round trip. */
  claimed: number;
}

type Kind = "shoal" | "floor";

/** The floor's table, as bench/handwritten.ts creates it. */
async function installFloor(sql: Sql): Promise<void> {
  await sql`create schema bench_floor`;
  await sql`
    create table bench_floor.jobs (
      id bigint generated always as identity primary key,
      task text not null,
      payload jsonb not null default '{}',
      created_at timestamptz not null default now())`;
}

async function enqueue(producer: Sql, kind: Kind): Promise<void> {
  const payload = JSON.stringify({ t: Date.now() });
  if (kind === "shoal") {
    await producer`
      select id, inserted from shoal.insert_job(${"default"}::text, ${"bench.stamp"}::text,
        ${payload}::text::jsonb, ${null}::timestamptz, ${null}::integer, ${null}::text,
        ${null}::integer, ${null}::text, ${true}::boolean)`;
  } else {
    await producer`
      with ins as (
        insert into bench_floor.jobs (task, payload)
        values (${"bench.stamp"}::text, ${payload}::text::jsonb) returning id)
      select pg_notify(${"bench_floor"}::text, ${""}::text) from ins`;
  }
}

/** Claim the job (and, for shoal, ack it so the next round starts from an empty queue). */
async function claimOne(consumer: Sql, kind: Kind): Promise<number> {
  const t0 = performance.now();
  if (kind === "floor") {
    await consumer`
      delete from bench_floor.jobs where id = any(array(
        select id from bench_floor.jobs order by id limit ${100}::integer
        for update skip locked))
      returning id, task, payload`;
    return performance.now() - t0;
  }
  const { jobs } = await claim(consumer, {
    queues: ["default"],
    limit: 10,
    workerId: "start-split",
    visibilityMs: 30_000,
    // As the consumer's loop claims (the claim from the head runs at most once a second).
    fromHead: false,
  });
  const ms = performance.now() - t0;
  await ack(consumer, jobs.map((j) => ({ id: j.id, token: j.token })));
  return ms;
}

async function measure(server: BenchServer, kind: Kind, jobs: number): Promise<Split> {
  const db = await freshDb(server, `start split ${kind}`);
  const producer = postgres(db.url, { max: 1, onnotice: () => {} });
  const consumer = postgres(db.url, { max: 1, onnotice: () => {} });
  try {
    if (kind === "shoal") await migrate(db.sql, await loadMigrations());
    else await installFloor(db.sql);
    let wake: (() => void) | null = null;
    await consumer.listen(kind === "shoal" ? "shoal_jobs" : "bench_floor", () => wake?.());
    const splits: Split[] = [];
    for (let i = 0; i < 2 * jobs; i++) {
      const arrived = new Promise<number>((resolve) => {
        wake = () => resolve(performance.now());
      });
      const t0 = performance.now();
      await enqueue(producer, kind);
      const notified = (await arrived) - t0;
      const claimed = await claimOne(consumer, kind);
      if (i >= jobs) splits.push({ notified, claimed });
    }
    return {
      notified: median(splits.map((s) => s.notified)),
      claimed: median(splits.map((s) => s.claimed)),
    };
  } finally {
    await producer.end({ timeout: 5 });
    await consumer.end({ timeout: 5 });
    await db.drop();
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: { jobs: { type: "string", default: "1000" } },
  });
  const jobs = Number(values.jobs);
  if (!Number.isInteger(jobs) || jobs < 1) throw new Error("--jobs takes a positive integer");
  const server = await startServer({ profile: false });
  try {
    print(`| step (median of ${jobs} jobs, ms) | shoal | floor |\n| --- | ---: | ---: |\n`);
    const shoal = await measure(server, "shoal", jobs);
    const floor = await measure(server, "floor", jobs);
    print(
      `| NOTIFY arrives, after the enqueue call began | ${shoal.notified.toFixed(3)} | ${
        floor.notified.toFixed(3)
      } |\n`,
    );
    print(
      `| claim round trip | ${shoal.claimed.toFixed(3)} | ${floor.claimed.toFixed(3)} |\n`,
    );
  } finally {
    await server.stop();
  }
}

if (import.meta.main) {
  await main();
}
