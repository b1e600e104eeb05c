/**
 * The SQL floors, measured with pgbench on the same server in the same run: the bare
 * SKIP LOCKED claim + delete of 1 or 100 rows per transaction on a plain table
 * pre-filled with the workload's job count (bench/pgbench_claim.sql), and a bare
 * single-row insert (bench/pgbench_insert.sql). pgbench runs over TCP to 127.0.0.1
 * (or the DATABASE_URL host) with prepared statements, like postgres.js.
 *
 * @module
 */
import { type BenchServer, withFreshDb } from "./harness.ts";
import { installFloorTable } from "./handwritten.ts";
import type { BenchContext, Benchmark, RunResult } from "./workloads.ts";

const CLAIM_SCRIPT = new URL("pgbench_claim.sql", import.meta.url).pathname;
const INSERT_SCRIPT = new URL("pgbench_insert.sql", import.meta.url).pathname;

interface PgbenchOutcome {
  /** Transactions per second, without connection time (pgbench's own figure). */
  tps: number;
  processed: number;
  failed: number;
}

async function isFile(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isFile;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

/** pgbench beside the server's binaries, else on PATH, else Debian's newest. */
async function pgbenchPath(server: BenchServer): Promise<string> {
  const dirs = [
    server.binDir,
    Deno.env.get("SHOAL_PG_BIN"),
    ...(Deno.env.get("PATH") ?? "").split(":"),
  ];
  try {
    const versions: number[] = [];
    for await (const entry of Deno.readDir("/usr/lib/postgresql")) {
      if (/^\d+$/.test(entry.name)) versions.push(Number(entry.name));
    }
    versions.sort((a, b) => b - a).forEach((v) => dirs.push(`/usr/lib/postgresql/${v}/bin`));
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  for (const dir of dirs) {
    if (dir && await isFile(`${dir}/pgbench`)) return `${dir}/pgbench`;
  }
  throw new Error("Cannot find pgbench: install PostgreSQL's client tools or set SHOAL_PG_BIN");
}

/** Run pgbench against `url` and read its summary. */
async function pgbench(server: BenchServer, url: string, args: string[]): Promise<PgbenchOutcome> {
  const bin = await pgbenchPath(server);
  const out = await new Deno.Command(bin, {
    args: ["--no-vacuum", "--protocol=prepared", ...args, url],
    stdout: "piped",
    stderr: "piped",
    stdin: "null",
  }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  if (!out.success) throw new Error(`pgbench failed with exit ${out.code}:\n${text.slice(-2000)}`);
  const tps = /tps = ([\d.]+) \(without initial connection time\)/.exec(text);
  const processed = /number of transactions actually processed: (\d+)/.exec(text);
  const failed = /number of failed transactions: (\d+)/.exec(text);
  if (!tps || !processed) throw new Error(`Cannot read pgbench's summary:\n${text.slice(-2000)}`);
  return { tps: Number(tps[1]), processed: Number(processed[1]), failed: Number(failed?.[1] ?? 0) };
}

function threadsFor(clients: number): number {
  return Math.min(clients, navigator.hardwareConcurrency || 1);
}

/** W1a's floor: a bare single-row insert per transaction, `clients` clients. */
export function pgbenchInsert(options: { clients: number }): Benchmark {
  return {
    id: "W1a/pgbench",
    workload: "W1a",
    system: "pgbench",
    title: `pgbench: bare 1-row INSERT per transaction, ${options.clients} clients`,
    settings: `pgbench -M prepared -c ${options.clients} -j ${
      threadsFor(options.clients)
    }, plain table (bigint identity pk, text, jsonb, timestamptz)`,
    metrics: [{ key: "rate", unit: "rows/s", better: "higher" }],
    run: (ctx: BenchContext) =>
      withFreshDb(ctx.server, "pgb_insert", async (db): Promise<RunResult> => {
        await installFloorTable(db.sql);
        const perClient = Math.ceil(ctx.sizes.jobs / options.clients);
        const result = await pgbench(ctx.server, db.url, [
          `--client=${options.clients}`,
          `--jobs=${threadsFor(options.clients)}`,
          `--transactions=${perClient}`,
          `--file=${INSERT_SCRIPT}`,
        ]);
        return {
          values: { rate: result.tps },
          details: { transactions: result.processed, failed: result.failed },
        };
      }),
  };
}

/** W2's floor: the bare SKIP LOCKED claim + delete of `batch` rows per transaction. */
export function pgbenchClaim(options: { batch: number; clients: number }): Benchmark {
  return {
    id: `W2/pgbench/b${options.batch}`,
    workload: "W2",
    system: "pgbench",
    title: `pgbench: bare SKIP LOCKED claim+delete, ${options.batch} row${
      options.batch === 1 ? "" : "s"
    }/transaction, ${options.clients} client${options.clients === 1 ? "" : "s"}`,
    settings: `pgbench -M prepared -c ${options.clients} -j ${
      threadsFor(options.clients)
    }, delete … where id = any(array(select id … order by id limit ${options.batch} for update skip locked)) returning`,
    metrics: [{ key: "rate", unit: "jobs/s", better: "higher" }],
    run: (ctx: BenchContext) =>
      withFreshDb(ctx.server, `pgb_claim${options.batch}`, async (db): Promise<RunResult> => {
        await installFloorTable(db.sql);
        const total = ctx.sizes.jobs;
        await db.sql`
          insert into bench_floor.jobs (task, payload)
          select 'noop', '{}'::jsonb from generate_series(1, ${total}::integer)`;
        const perClient = Math.ceil(total / options.batch / options.clients);
        const result = await pgbench(ctx.server, db.url, [
          `--client=${options.clients}`,
          `--jobs=${threadsFor(options.clients)}`,
          `--transactions=${perClient}`,
          `--define=batch=${options.batch}`,
          `--file=${CLAIM_SCRIPT}`,
        ]);
        const [left] = await db.sql<{ n: number }[]>`
          select count(*)::integer as n from bench_floor.jobs`;
        const deleted = total - left!.n;
        // Rows per second over pgbench's own measured time (transactions / tps).
        const seconds = result.processed / result.tps;
        return {
          values: { rate: deleted / seconds },
          details: {
            seconds,
            transactions: result.processed,
            failed: result.failed,
            left: left!.n,
          },
        };
      }),
  };
}
