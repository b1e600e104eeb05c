/**
 * shoal from other languages with plain SQL: examples/node/chord.mjs (postgres.js) and
 * examples/python/chord.py (psycopg 3, Debian's python3-psycopg for /usr/bin/python3) each
 * enqueue a job, start a chord through `shoal.start_execution` and `shoal.chord`, and wait
 * for the execution's result, while a real consumer process of examples/my_tasks.ts runs the
 * tasks. Ids are bigints: strings in JavaScript, ints in Python.
 */
import { assert, assertEquals } from "./assert.ts";
import { exitWithin, logLines, type ShoalProcess, spawnShoal, testDb } from "./helpers.ts";

const ROOT = new URL("../", import.meta.url);
const EXAMPLE = new URL("examples/my_tasks.ts", ROOT).pathname;
const NODE_DIR = new URL("examples/node/", ROOT).pathname;
const PYTHON_DIR = new URL("examples/python/", ROOT).pathname;
/** Debian's Python, where python3-psycopg installs (.ci/run installs it). */
const PYTHON = "/usr/bin/python3";

/** What both examples print: one JSON line. */
interface ExampleOutput {
  job_id: unknown;
  execution_id: unknown;
  status: string;
  result: unknown;
  error: string | null;
}

/** Run a command to its end; its stdout, or a failure with everything it printed. */
async function run(command: string, args: string[], cwd: string, env: Record<string, string> = {}) {
  const result = await new Deno.Command(command, {
    args,
    cwd,
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  const stdout = decoder.decode(result.stdout);
  const stderr = decoder.decode(result.stderr);
  assert(result.success, `${command} ${args.join(" ")} exited ${result.code}:\n${stdout}${stderr}`);
  return stdout;
}

/** The consumer that runs the examples' tasks: examples/my_tasks.ts on emails and reports. */
function consumer(url: string): ShoalProcess {
  return spawnShoal(
    ["--role", "consumer", "--queues", "emails,reports", "--poll-interval", "100ms"].concat(
      ["--shutdown-grace", "1s"],
    ),
    { url, mainModule: EXAMPLE },
  );
}

/** Check an example's output and the consumer's log: the job ran, the chord's result is in. */
async function checkRun(proc: ShoalProcess, printed: string, idType: "string" | "number") {
  const lines = printed.trim().split("\n");
  assertEquals(lines.length, 1, printed);
  const out: ExampleOutput = JSON.parse(lines[0]!);
  assertEquals(typeof out.job_id, idType, printed);
  assertEquals(typeof out.execution_id, idType, printed);
  assertEquals(
    { status: out.status, result: out.result, error: out.error },
    { status: "completed", result: { parts: 3, words: 9 }, error: null },
  );
  proc.kill("SIGTERM");
  const { code, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 0, output);
  const sent = logLines(output).find((l) => String(l.message).startsWith("Sent the welcome"));
  assertEquals(sent?.job_id, String(out.job_id), output);
}

Deno.test("examples/node/chord.mjs enqueues, starts a chord and reads its result (ids as strings)", async () => {
  // Pinned by package-lock.json; .ci/run installs it, a first local run here.
  try {
    await Deno.stat(`${NODE_DIR}node_modules/postgres/package.json`);
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
    await run("npm", ["ci", "--no-audit", "--no-fund"], NODE_DIR);
  }
  await using db = await testDb();
  await using proc = consumer(db.url);
  const printed = await run("node", ["chord.mjs"], NODE_DIR, { DATABASE_URL: db.url });
  await checkRun(proc, printed, "string");
});

Deno.test("examples/python/chord.py enqueues, starts a chord and reads its result (ids as ints)", async () => {
  await using db = await testDb();
  await using proc = consumer(db.url);
  const printed = await run(PYTHON, ["chord.py"], PYTHON_DIR, { DATABASE_URL: db.url });
  await checkRun(proc, printed, "number");
});
