/**
 * What one claim reads as acked jobs pile up at the head of jobs_claim_idx: the evidence
 * behind W8 and W9 in docs/performance.md.
 *
 *   deno run -A bench/claim_scan.ts                 a throwaway cluster (Postgres defaults)
 *   DATABASE_URL=... deno run -A bench/claim_scan.ts  a given server (a fresh database on it)
 *   deno run -A bench/claim_scan.ts --jobs 70000 --chunk 5000 --held-chunks 4
 *
 * It enqueues `--jobs` ready jobs, then claims 10 and acks them in a loop (shoal's own
 * claim() and ack(), one statement each): first with no snapshot held, then while another
 * session holds a repeatable-read snapshot open (as W9 does), then after that session
 * commits, then after a VACUUM. After each step it runs EXPLAIN (ANALYZE, BUFFERS) of the
 * claim's inner SELECT … FOR UPDATE SKIP LOCKED with the settings shoal.claim_jobs() runs
 * it under, and prints one markdown row: buffers one claim of 10 reads, its execution
 * time, the claim+ack loop's rate, and pg_stat_user_tables' dead tuples.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { freshDb, print, startServer } from "./harness.ts";
import type { Sql } from "../lib/db.ts";
import { loadMigrations, migrate } from "../lib/migrate.ts";
import { ack, claim } from "../lib/queue.ts";

const QUEUE = "scan";

interface ScanRow {
  step: string;
  rate: string;
  buffers: string;
  ms: string;
  dead: string;
}

/** `n` ready no-op jobs, 1,000 per call, NOTIFY off. */
async function enqueue(sql: Sql, n: number): Promise<void> {
  for (let done = 0; done < n; done += 1000) {
    const size = Math.min(1000, n - done);
    await sql`
      select count(*) from shoal.insert_jobs(
        array_fill(${QUEUE}::text, array[${size}::integer]),
        array_fill('shoal.noop'::text, array[${size}::integer]),
        array_fill('{}'::jsonb, array[${size}::integer]), notify => false)`;
  }
}

/** Claim 10 and ack them until `n` jobs are done; returns jobs per second. */
async function claimAck(sql: Sql, n: number): Promise<number> {
  const t0 = performance.now();
  let done = 0;
  while (done < n) {
    const { jobs } = await claim(sql, {
      queues: [QUEUE],
      limit: 10,
      workerId: "claim-scan",
      visibilityMs: 30_000,
    });
    if (jobs.length === 0) break;
    await ack(sql, jobs.map((j) => ({ id: j.id, token: j.token })));
    done += jobs.length;
  }
  return done / ((performance.now() - t0) / 1000);
}

/** EXPLAIN of the claim's inner statement, under shoal.claim_jobs()'s own settings. */
async function explainClaim(sql: Sql): Promise<{ buffers: string; ms: string }> {
  return await sql.begin(async (tx) => {
    await tx`set local enable_sort = off`;
    await tx`set local enable_bitmapscan = off`;
    await tx`set local jit = off`;
    const rows = await tx<{ "QUERY PLAN": string }[]>`
      explain (analyze, buffers, costs off, timing off)
      select c.id from unnest(${[QUEUE]}::text[]) as q(name)
      cross join lateral (
        select j.id, j.priority, j.fair_seq from shoal.jobs j
        where j.queue = q.name and j.run_at <= now()
        order by j.priority desc, j.fair_seq, j.id + 0
        limit ${10}::integer
        for update skip locked
      ) c`;
    const lines = rows.map((r) => r["QUERY PLAN"]);
    const buffers = lines.find((l) => l.includes("Buffers:"))?.trim().replace("Buffers: ", "");
    const ms = lines.find((l) => l.startsWith("Execution Time"))?.replace(/[^0-9.]/g, "");
    // Rolled back: the rows EXPLAIN ANALYZE locked are released, nothing is claimed.
    throw new Rollback({ buffers: buffers ?? "?", ms: ms ?? "?" });
  }).catch((e: unknown) => {
    if (e instanceof Rollback) return e.result;
    throw e;
  });
}

/** Carries the EXPLAIN's figures out of a transaction that must not commit. */
class Rollback extends Error {
  constructor(readonly result: { buffers: string; ms: string }) {
    super("rollback");
  }
}

async function deadTuples(sql: Sql): Promise<string> {
  const [row] = await sql<{ dead: string }[]>`
    select n_dead_tup::text as dead from pg_stat_user_tables
    where relid = 'shoal.jobs'::regclass`;
  return row?.dead ?? "?";
}

async function row(sql: Sql, step: string, rate: number | null): Promise<ScanRow> {
  const { buffers, ms } = await explainClaim(sql);
  const r = {
    step,
    rate: rate === null ? "" : Math.round(rate).toLocaleString("en-US"),
    buffers,
    ms,
    dead: await deadTuples(sql),
  };
  print(`| ${r.step} | ${r.rate} | ${r.buffers} | ${r.ms} | ${r.dead} |\n`);
  return r;
}

/** Hold a repeatable-read snapshot open until `release` resolves (W9's other session). */
function holdSnapshot(sql: Sql, release: Promise<void>): Promise<void> {
  return sql.begin(async (tx) => {
    await tx`set transaction isolation level repeatable read`;
    await tx`select count(*) from pg_catalog.pg_class`;
    await release;
  }).then(() => {});
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      jobs: { type: "string", default: "70000" },
      chunk: { type: "string", default: "5000" },
      "held-chunks": { type: "string", default: "4" },
    },
  });
  const jobs = Number(values.jobs);
  const chunk = Number(values.chunk);
  const heldChunks = Number(values["held-chunks"]);
  if ([jobs, chunk, heldChunks].some((n) => !Number.isInteger(n) || n < 1)) {
    throw new Error("--jobs, --chunk and --held-chunks take positive integers");
  }
  const server = await startServer({ profile: false });
  const db = await freshDb(server, "claim scan");
  try {
    await migrate(db.sql, await loadMigrations());
    await enqueue(db.sql, jobs);
    await db.sql`vacuum analyze shoal.jobs`;
    print(
      "| step | claim(10)+ack jobs/s | buffers per claim of 10 | exec ms | dead tuples |",
    );
    print("| --- | ---: | --- | ---: | ---: |\n");
    await row(db.sql, `${jobs.toLocaleString("en-US")} ready, just vacuumed`, null);
    await row(db.sql, `no snapshot: ${chunk} done`, await claimAck(db.sql, chunk));
    await row(db.sql, `no snapshot: ${2 * chunk} done`, await claimAck(db.sql, chunk));
    let open!: () => void;
    const release = new Promise<void>((resolve) => (open = resolve));
    const holder = holdSnapshot(db.sql, release);
    try {
      for (let k = 1; k <= heldChunks; k++) {
        const rate = await claimAck(db.sql, chunk);
        await row(db.sql, `snapshot held: ${k * chunk} done since`, rate);
      }
    } finally {
      open();
      await holder;
    }
    await row(db.sql, "snapshot ended: 1st claim", null);
    await row(db.sql, "snapshot ended: 2nd claim", null);
    await row(db.sql, `snapshot ended: ${chunk} more done`, await claimAck(db.sql, chunk));
    await db.sql`vacuum shoal.jobs`;
    await row(db.sql, "after VACUUM", null);
    await row(db.sql, `after VACUUM: ${chunk} more done`, await claimAck(db.sql, chunk));
  } finally {
    await db.drop();
    await server.stop();
  }
}

if (import.meta.main) {
  await main();
}
