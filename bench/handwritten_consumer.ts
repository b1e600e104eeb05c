/**
 * The hand-written floor consumer process (see handwritten.ts): one postgres.js
 * connection for claims, one for LISTEN, a loop that claims up to `--batch` rows per
 * statement until the table is empty, then waits for a NOTIFY or a 2 s poll. `bench.stamp`
 * rows record their start in `bench.starts` (one insert per claimed batch). Stops on
 * SIGTERM. Prints `{"event":"started","at":EPOCH_MS}` when its loop begins.
 *
 *   DATABASE_URL=... deno run -A bench/handwritten_consumer.ts --mode delete|ack --batch 100
 *
 * @module
 */
import { parseArgs } from "node:util";
import postgres from "postgres";

const POLL_MS = 2000;

interface Row {
  id: string;
  task: string;
  payload: { t?: number };
}

function epochMs(): number {
  return performance.timeOrigin + performance.now();
}

function out(line: string): void {
  Deno.stdout.writeSync(new TextEncoder().encode(line + "\n"));
}

async function run(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      mode: { type: "string", default: "delete" },
      batch: { type: "string", default: "100" },
    },
    strict: true,
  });
  const mode = values.mode;
  const batch = Number(values.batch);
  if ((mode !== "delete" && mode !== "ack") || !Number.isInteger(batch) || batch < 1) {
    throw new Error("Usage: handwritten_consumer.ts --mode delete|ack --batch N");
  }
  const url = Deno.env.get("DATABASE_URL");
  if (!url) throw new Error("DATABASE_URL is not set");

  const sql = postgres(url, {
    max: 1,
    onnotice: () => {},
    connection: {
      application_name: "bench hand-written consumer",
      // With no statistics the planner reads the whole partial index and sorts it; a
      // hand-written queue would pin the claim to index order like this.
      ...(mode === "ack" ? { enable_bitmapscan: "off" } : {}),
    },
  });
  const stop = new AbortController();
  let wake: (() => void) | null = null;
  let pending = false;
  const poke = () => {
    if (wake) wake();
    else pending = true;
  };
  const onSignal = () => {
    stop.abort();
    poke();
  };
  Deno.addSignalListener("SIGTERM", onSignal);
  Deno.addSignalListener("SIGINT", onSignal);

  const claim = async (): Promise<Row[]> => {
    // `id = any(array(...))` keeps the outer statement on the primary key whatever the
    // statistics say (a join against a CTE turns into a hash join over a seq scan when
    // the table was never analyzed).
    if (mode === "delete") {
      return [
        ...await sql<Row[]>`
          delete from bench_floor.jobs
          where id = any(array(
            select id from bench_floor.jobs order by id limit ${batch}::integer
            for update skip locked
          ))
          returning id, task, payload`,
      ];
    }
    return [
      ...await sql<Row[]>`
        update bench_floor.jobs set locked_at = now()
        where id = any(array(
          select id from bench_floor.jobs where locked_at is null order by id
          limit ${batch}::integer for update skip locked
        ))
        returning id, task, payload`,
    ];
  };
  const ack = async (rows: Row[]): Promise<void> => {
    if (mode !== "ack" || rows.length === 0) return;
    await sql`delete from bench_floor.jobs where id = any(${rows.map((r) => r.id)}::bigint[])`;
  };
  const stamp = async (rows: Row[], startedAt: number): Promise<void> => {
    const stamped = rows.filter((r) => r.task === "bench.stamp");
    if (stamped.length === 0) return;
    await sql`
      insert into bench.starts (job_id, enqueued_at, started_at)
      select id, t, ${startedAt}::float8
      from unnest(${stamped.map((r) => r.id)}::text[],
                  ${stamped.map((r) => Number(r.payload.t))}::float8[]) as s(id, t)`;
  };

  const listener = postgres(url, {
    max: 1,
    onnotice: () => {},
    connection: { application_name: "bench hand-written listener" },
  });
  await listener.listen("bench_floor", poke);
  await sql`select 1`;
  out(JSON.stringify({ event: "started", at: epochMs() }));
  try {
    while (!stop.signal.aborted) {
      const rows = await claim();
      const startedAt = epochMs();
      await stamp(rows, startedAt);
      await ack(rows);
      if (rows.length === batch) continue;
      if (pending) {
        pending = false;
        continue;
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(done, POLL_MS);
        function done() {
          clearTimeout(timer);
          wake = null;
          pending = false;
          resolve();
        }
        wake = done;
      });
    }
  } finally {
    Deno.removeSignalListener("SIGTERM", onSignal);
    Deno.removeSignalListener("SIGINT", onSignal);
    await listener.end({ timeout: 5 });
    await sql.end({ timeout: 5 });
  }
}

if (import.meta.main) {
  try {
    await run();
  } catch (error) {
    Deno.stderr.writeSync(
      new TextEncoder().encode(`hand-written consumer: ${(error as Error).message}\n`),
    );
    Deno.exit(1);
  }
}
