/**
 * Bad input, handlers (issue 6): a real consumer process (tests/fixtures/bad_input_main.ts)
 * whose handlers throw values that are not Errors, reject with 10 MB messages or messages
 * holding NUL, never settle, block the event loop for seconds, or belong to a task it does
 * not know. Each is a recorded
 * failure with a clear, bounded reason; nothing is lost or run twice; the process keeps
 * serving (a good job after them runs) and shuts down within its grace, exit 0.
 */
import { assert, assertEquals } from "../assert.ts";
import {
  exitWithin,
  type ShoalProcess,
  spawnShoal,
  testDb,
  waitFor,
  waitForOutput,
} from "../helpers.ts";
import type { Sql } from "../../lib/db.ts";
import { enqueue, enqueueMany, type JobSpec } from "../../lib/queue.ts";

const MAIN = new URL("../fixtures/bad_input_main.ts", import.meta.url).pathname;
const STARTED = "started on default";

async function createRuns(sql: Sql): Promise<void> {
  await sql`
    create table bad_runs (
      id bigint generated always as identity primary key,
      job_id bigint not null, attempt integer not null, pid integer not null, note text,
      at timestamptz not null default clock_timestamp())`;
}

function consumer(url: string, extra: string[] = []): ShoalProcess {
  return spawnShoal([
    "--role",
    "consumer",
    "--poll-interval",
    "100ms",
    "--shutdown-grace",
    "1s",
    ...extra,
  ], { url, mainModule: MAIN });
}

async function runsOf(sql: Sql, id: string): Promise<{ attempt: number; note: string }[]> {
  return await sql<{ attempt: number; note: string }[]>`
    select attempt, note from bad_runs where job_id = ${id}::bigint order by id`;
}

async function deadReasons(sql: Sql): Promise<Map<string, { reason: string; attempts: number }>> {
  const rows = await sql<{ id: string; reason: string; attempts: number }[]>`
    select id, reason, attempts from shoal.dead_jobs`;
  return new Map(rows.map((r) => [r.id, r]));
}

/** The longest line a process wrote. */
function longestLine(output: string): number {
  return Math.max(...output.split("\n").map((l) => l.length));
}

Deno.test("handlers that throw non-Errors, huge messages or NUL characters, hang, or name an unknown task are clear failures and the consumer keeps serving", async () => {
  await using db = await testDb();
  await createRuns(db.sql);
  await using proc = consumer(db.url, ["--concurrency", "2", "--visibility-timeout", "6s"]);
  await waitForOutput(proc, STARTED);
  let exited = false;
  proc.exited().then(() => (exited = true));

  const kinds = [
    "string",
    "undefined",
    "null",
    "object",
    "number",
    "symbol",
    "bigint",
    "circular",
    "huge_error",
    "huge_string",
    "nul",
  ];
  const specs: JobSpec[] = [
    ...kinds.map((kind) => ({ task: "bad.throw", payload: { kind }, maxAttempts: 1 })),
    ...kinds.map((kind) => ({
      task: "bad.throw",
      payload: { kind, async: true },
      maxAttempts: 1,
    })),
    { task: "bad.hang", maxAttempts: 2 },
    { task: "no.such_task", maxAttempts: 2 },
    // A NUL in the message, retried once: both failures are recorded, not redelivered.
    { task: "bad.throw", payload: { kind: "nul" }, maxAttempts: 2 },
  ];
  const ids = (await enqueueMany(db.sql, specs)).map((e) => e.id);
  const [hang, unknown, nulRetried] = ids.slice(-3) as [string, string, string];

  await waitFor("every bad job to be dead-lettered", async () => {
    return (await deadReasons(db.sql)).size === ids.length;
  }, 30_000);
  const dead = await deadReasons(db.sql);
  const expected: Record<string, string> = {
    string: 'non-Error thrown: "a plain string, not an Error"',
    undefined: "non-Error thrown: undefined",
    null: "non-Error thrown: null",
    object: 'non-Error thrown: {"code":7,"detail":"an object, not an Error"}',
    number: "non-Error thrown: 42",
    symbol: "non-Error thrown: Symbol(a symbol)",
    bigint: "non-Error thrown: [object BigInt]",
    circular: "non-Error thrown: [object Object]",
    huge_error: "Error: huge huge huge",
    huge_string: 'non-Error thrown: "hhhh',
    nul: "Error: nul\uFFFDinside",
  };
  ids.slice(0, 2 * kinds.length).forEach((id, i) => {
    const kind = kinds[i % kinds.length]!;
    const row = dead.get(id) ?? { reason: "(not dead-lettered)", attempts: 0 };
    assert(row.reason.startsWith(expected[kind]!), `${kind}: ${row.reason.slice(0, 200)}`);
    assert(row.reason.length <= 4000, `${kind}: stored reason of ${row.reason.length} chars`);
    assert(!row.reason.includes("\n"), `${kind}: a stored reason is one line`);
    assertEquals(row.attempts, 1, kind);
  });
  assert(dead.get(ids[8]!)!.reason.endsWith("…"), "a cut reason says it was cut");
  // The timeout frees the slot of a handler that ignores its signal; it is retried, then dead.
  assertEquals(dead.get(hang)?.reason, "Task timed out after 400ms");
  assertEquals(dead.get(hang)?.attempts, 2);
  // An unknown task is an ordinary failure (another consumer may know it): retried, then dead.
  assert(
    dead.get(unknown)?.reason.includes('Unknown task "no.such_task"'),
    dead.get(unknown)?.reason,
  );
  assertEquals(dead.get(unknown)?.attempts, 2);
  assertEquals(dead.get(nulRetried)?.reason, expected.nul);
  assertEquals(dead.get(nulRetried)?.attempts, 2);
  const [history] = await db.sql<{ errors: { error: string }[] }[]>`
    select errors from shoal.dead_jobs where id = ${nulRetried}::bigint`;
  assertEquals(history?.errors.map((e) => e.error), [expected.nul, expected.nul]);

  // Still serving: a good job after all of that runs, once.
  const good = await enqueue(db.sql, "bad.record");
  await waitFor("the good job to run", async () => (await runsOf(db.sql, good)).length === 1);
  assertEquals(exited, false, `the consumer died:\n${proc.output().slice(0, 5000)}`);
  proc.kill("SIGTERM");
  const { code, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 0, output.slice(0, 5000));
  assert(!output.includes("    at "), "no stack trace in the output");
  // 20 MB of messages were thrown; no log line carries them.
  assert(longestLine(output) < 10_000, `a log line of ${longestLine(output)} characters`);
  const [left] = await db.sql<{ n: number }[]>`select count(*)::int as n from shoal.jobs`;
  assertEquals(left!.n, 0, "no job left behind");
});

Deno.test("a handler blocking the event loop for 3 s keeps its claims (visibility 6 s): every job runs once", async () => {
  await using db = await testDb();
  await createRuns(db.sql);
  await using proc = consumer(db.url, ["--concurrency", "2", "--visibility-timeout", "6s"]);
  await waitForOutput(proc, STARTED);
  // Claimed together: the records wait (running or buffered) while the block holds the loop.
  const specs: JobSpec[] = [
    { task: "bad.block", payload: { ms: 3000 }, priority: 10 },
    ...Array.from({ length: 6 }, () => ({ task: "bad.record" })),
  ];
  const ids = (await enqueueMany(db.sql, specs)).map((e) => e.id);
  await waitFor("every job to run", async () => {
    const [row] = await db.sql<{ n: number }[]>`
      select count(distinct job_id)::int as n from bad_runs`;
    return row!.n === ids.length;
  }, 30_000);
  const after = await enqueue(db.sql, "bad.record");
  await waitFor("a job enqueued after the block to run", async () => {
    return (await runsOf(db.sql, after)).length === 1;
  });
  const runs = await db.sql<{ job_id: string; attempt: number }[]>`
    select job_id, attempt from bad_runs order by id`;
  assertEquals(runs.length, ids.length + 1, "each job ran exactly once");
  assert(runs.every((r) => r.attempt === 1), "no job was redelivered");
  const [blocked] = await runsOf(db.sql, ids[0]!);
  assertEquals(blocked?.note, "blocked");
  await waitFor("every job acked", async () => {
    const [row] = await db.sql<{ n: number }[]>`select count(*)::int as n from shoal.jobs`;
    return row!.n === 0;
  });
  proc.kill("SIGTERM");
  const { code, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 0, output);
  assert(!output.includes("Lost the claim"), output);
});

Deno.test("a handler that never settles and ignores its signal does not hold up shutdown past the grace", async () => {
  await using db = await testDb();
  await createRuns(db.sql);
  await using proc = consumer(db.url, ["--concurrency", "2"]);
  await waitForOutput(proc, STARTED);
  const id = await enqueue(db.sql, "bad.hang_long");
  await waitFor("the handler to start", async () => (await runsOf(db.sql, id)).length === 1);
  const stopped = Date.now();
  proc.kill("SIGTERM");
  const { code, output } = await exitWithin(proc, 20_000);
  const tookMs = Date.now() - stopped;
  assertEquals(code, 0, output);
  // 1 s of grace, then release and close: well under 10 s even on a loaded machine.
  assert(tookMs < 10_000, `shutdown took ${tookMs} ms`);
  assert(output.includes("Released 1 unfinished jobs"), output);
  // Handed back at once, its attempt not burned: the next consumer runs it again.
  const [job] = await db.sql<{ locked_by: string | null; attempts: number }[]>`
    select locked_by, attempts from shoal.jobs where id = ${id}::bigint`;
  assertEquals(job?.locked_by, null);
  assertEquals(job?.attempts, 0);
});
