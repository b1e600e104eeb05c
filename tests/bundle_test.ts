/**
 * `deno task bundle`: shoal as one JavaScript file (the artefact we can build without a
 * Docker engine). The bundle is built once, into a temporary directory, with the task's own
 * command, then run as real processes: `migrate` and every role, stopped by SIGTERM.
 */
import { assert, assertEquals } from "./assert.ts";
import { OtlpReceiver } from "./otlp_receiver.ts";
import { enqueue } from "../lib/queue.ts";
import {
  emptyDb,
  exitWithin,
  holderOf,
  httpGet,
  logLines,
  runShoal,
  servedAt,
  type ShoalProcess,
  spawnShoal,
  testDb,
  waitFor,
} from "./helpers.ts";
import {
  appliedFunctionFiles,
  appliedMigrations,
  EMBEDDED_FUNCTIONS,
  EMBEDDED_FUNCTIONS_LOCK,
  EMBEDDED_MIGRATIONS,
  loadFunctions,
  loadMigrations,
} from "../lib/migrate.ts";

const ROOT = new URL("../", import.meta.url);
const SQL_DIR = new URL("sql/", ROOT);
const BUNDLE_OUTPUT = "dist/shoal.js";

/** The roles one `--role` value runs. */
const ROLES: Record<string, string[]> = {
  consumer: ["consumer"],
  reaper: ["reaper"],
  scheduler: ["scheduler"],
  all: ["consumer", "reaper", "scheduler"],
};

/** Short timings so a test process starts and stops quickly. */
const ROLE_FLAGS: Record<string, string[]> = {
  consumer: ["--poll-interval", "100ms", "--shutdown-grace", "1s"],
  reaper: ["--lease", "2s", "--interval", "200ms"],
  scheduler: ["--lease", "2s", "--interval", "200ms"],
  all: [
    "--poll-interval",
    "100ms",
    "--shutdown-grace",
    "1s",
    "--lease",
    "2s",
    "--interval",
    "200ms",
  ],
};

/**
 * What `deno task bundle` runs, split into arguments after `deno`: the `bundle:entry` task
 * given main.ts (the entry comes last, after the flags).
 */
async function bundleTaskArgs(): Promise<string[]> {
  const config = JSON.parse(await Deno.readTextFile(new URL("deno.json", ROOT)));
  assertEquals(config.tasks?.bundle, "deno task bundle:entry main.ts");
  const task: unknown = config.tasks?.["bundle:entry"];
  if (typeof task !== "string") throw new Error("deno.json has no bundle:entry task");
  const words = task.split(/\s+/);
  assertEquals(words.slice(0, 2), ["deno", "bundle"]);
  return [...words.slice(1), "main.ts"];
}

let built: Promise<string> | null = null;

/**
 * Run the bundle task with its output moved into a fresh temporary directory (removed when
 * the test module unloads); resolves to the bundle's path. Built once per test module.
 */
function buildBundle(): Promise<string> {
  built ??= (async () => {
    const dir = await Deno.makeTempDir({ prefix: "shoal_bundle_" });
    globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));
    const path = `${dir}/shoal.js`;
    const args = await bundleTaskArgs();
    const at = args.indexOf(BUNDLE_OUTPUT);
    assert(at > 0 && args[at - 1] === "--output", `the bundle task writes ${BUNDLE_OUTPUT}`);
    args[at] = path;
    const result = await new Deno.Command(Deno.execPath(), {
      args,
      cwd: ROOT.pathname,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stderr = new TextDecoder().decode(result.stderr);
    assert(result.success, `deno bundle failed:\n${stderr}`);
    return path;
  })();
  return built;
}

/**
 * Wait for the start line `role` logs once its loop runs (after the schema check and the
 * signal traps), naming this process as its worker or lease holder.
 */
async function waitForStart(proc: ShoalProcess, role: string): Promise<void> {
  const me = holderOf(proc);
  await waitFor(`the ${role} start line`, () => {
    const started = logLines(proc.output()).some((l) =>
      l.logger === `shoal.${role}` && / started\b/.test(`${l.message}`) &&
      (l.holder ?? l.worker) === me
    );
    if (!started && proc.output().includes("shoal: ")) {
      throw new Error(`The ${role} failed:\n${proc.output()}`);
    }
    return started;
  }, 20_000);
}

function role(bundle: string, name: string, url: string): ShoalProcess {
  return spawnShoal(["--role", name, "--log-format", "json", ...ROLE_FLAGS[name]!], {
    url,
    mainModule: bundle,
  });
}

/** The names of the `.sql` files in `dir`. */
async function sqlFiles(dir: URL): Promise<string[]> {
  const files: string[] = [];
  for await (const entry of Deno.readDir(dir)) {
    if (entry.isFile && entry.name.endsWith(".sql")) files.push(entry.name);
  }
  return files.sort();
}

Deno.test("loadMigrations() embeds exactly the files in sql/", async () => {
  const fromDir = await loadMigrations(SQL_DIR);
  assertEquals(await loadMigrations(), fromDir);
  assertEquals(Object.keys(EMBEDDED_MIGRATIONS).sort(), await sqlFiles(SQL_DIR));
  // Nothing else lies in sql/: a misnamed migration (say 009_x.sq) would be shipped by no one.
  const entries: string[] = [];
  for await (const entry of Deno.readDir(SQL_DIR)) entries.push(entry.name);
  assertEquals(
    entries.filter((name) => !name.endsWith(".sql")).sort(),
    ["functions", "functions.lock"],
  );
});

Deno.test("loadFunctions() embeds exactly the files in sql/functions/ and the lock", async () => {
  const fromDir = await loadFunctions(SQL_DIR);
  assertEquals(await loadFunctions(), fromDir);
  const dir = new URL("functions/", SQL_DIR);
  assertEquals(Object.keys(EMBEDDED_FUNCTIONS).sort(), await sqlFiles(dir));
  // Nothing else hides in sql/functions/ (the migrator reads .sql files only).
  const all: string[] = [];
  for await (const entry of Deno.readDir(dir)) all.push(entry.name);
  assertEquals(all.sort(), await sqlFiles(dir));
  assertEquals(
    EMBEDDED_FUNCTIONS_LOCK,
    await Deno.readTextFile(new URL("functions.lock", SQL_DIR)),
  );
});

Deno.test("deno task bundle writes one file that imports nothing but node built-ins", async () => {
  const bundle = await buildBundle();
  const dir = bundle.slice(0, bundle.lastIndexOf("/"));
  const entries: string[] = [];
  for await (const entry of Deno.readDir(dir)) entries.push(entry.name);
  assertEquals(entries, ["shoal.js"]);
  const text = await Deno.readTextFile(bundle);
  // Import statements start a line in esbuild's output; __require() is its CommonJS shim.
  const patterns = [
    /^import\b[^;]*?["']([^"']+)["'];?$/gm,
    /\bimport\(\s*["']([^"']+)["']\s*\)/g,
    /\b__require\(\s*["']([^"']+)["']\s*\)/g,
  ];
  const specifiers = patterns.flatMap((p) => [...text.matchAll(p)].map((m) => m[1]!));
  assert(specifiers.includes("node:net"), "the import patterns no longer match the bundle");
  assertEquals(specifiers.filter((s) => !s.startsWith("node:")), []);
});

Deno.test("the bundle migrates an empty database with the embedded migrations and functions", async () => {
  const bundle = await buildBundle();
  await using db = await emptyDb();
  const first = await runShoal(["migrate"], { url: db.url, mainModule: bundle });
  assertEquals(first.code, 0, first.stderr);
  const migrations = await loadMigrations(SQL_DIR);
  const files = (await loadFunctions(SQL_DIR)).files.map((f) => f.name);
  assertEquals(
    first.stdout,
    `Applied migrations: ${migrations.map((m) => m.version).join(", ")}\n` +
      `Applied function files: ${files.join(", ")}\n`,
  );
  const applied = await appliedMigrations(db.sql);
  assertEquals(applied.map((m) => m.checksum), migrations.map((m) => m.checksum));
  // The function files too, from the bundle's own copy.
  const functions = await loadFunctions(SQL_DIR);
  assertEquals(
    (await appliedFunctionFiles(db.sql)).map((f) => [f.name, f.checksum, f.revision]),
    functions.files.map((f) => [f.name, f.checksum, functions.revision])
      .sort((a, b) => `${a[0]}`.localeCompare(`${b[0]}`)),
  );
  const again = await runShoal(["migrate"], { url: db.url, mainModule: bundle });
  assertEquals([again.code, again.stdout], [0, "Schema is up to date\n"]);
});

for (const name of Object.keys(ROLES)) {
  Deno.test(`the bundle runs --role ${name} and exits 0 on SIGTERM`, async () => {
    const bundle = await buildBundle();
    await using db = await testDb();
    await using proc = role(bundle, name, db.url);
    for (const r of ROLES[name]!) await waitForStart(proc, r);
    proc.kill("SIGTERM");
    const { code, output } = await exitWithin(proc, 20_000);
    assertEquals(code, 0, output);
    const lines = logLines(output);
    for (const r of ROLES[name]!) {
      const stopped = lines.some((l) =>
        l.logger === `shoal.${r}` && l.message === `${cap(r)} stopped`
      );
      assert(stopped, `the ${r} did not log that it stopped:\n${output}`);
    }
  });
}

Deno.test("the bundle exports a consumer's spans over OTLP/HTTP when OTEL_* asks, flushed on SIGTERM", async () => {
  const bundle = await buildBundle();
  await using db = await testDb();
  await using receiver = new OtlpReceiver();
  const traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
  const id = await enqueue(db.sql, "shoal.noop", {}, { traceparent });
  await using proc = spawnShoal([
    "--role",
    "consumer",
    "--log-format",
    "json",
    ...ROLE_FLAGS.consumer!,
  ], {
    url: db.url,
    mainModule: bundle,
    env: {
      OTEL_EXPORTER_OTLP_ENDPOINT: receiver.base,
      OTEL_SERVICE_NAME: "bundled",
      // No scheduled export within the test: the spans arrive only if the shutdown flushes them.
      OTEL_BSP_SCHEDULE_DELAY: "60000",
    },
  });
  await waitFor("the job to run", async () => {
    const [row] = await db.sql`select count(*)::int as n from shoal.jobs`;
    return row!.n === 0;
  }, 20_000);
  assertEquals(receiver.spans, [], "spans were exported before the shutdown");
  proc.kill("SIGTERM");
  const { code, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 0, output);
  const run = receiver.spans.find((s) => s.name === "run shoal.noop");
  if (run === undefined) throw new Error(`No run span exported:\n${output}`);
  assertEquals(run.service, "bundled");
  assertEquals(run.attributes["shoal.job.id"], id);
  assertEquals(run.links, [{
    traceId: traceparent.slice(3, 35),
    spanId: traceparent.slice(36, 52),
  }]);
});

function cap(word: string): string {
  return word.charAt(0).toUpperCase() + word.slice(1);
}

Deno.test("the bundle serves the dashboard with its htmx and uPlot (shoal dashboard)", async () => {
  const bundle = await buildBundle();
  await using db = await testDb();
  await using proc = spawnShoal(["dashboard", "--http", "127.0.0.1:0", "--log-format", "json"], {
    url: db.url,
    mainModule: bundle,
  });
  const base = await servedAt(proc);
  const page = await httpGet(base, "/");
  assertEquals(page.status, 200, page.body);
  assert(page.body.includes("<title>Overview · shoal</title>"), page.body);
  for (const asset of ["htmx.min.js", "uPlot.iife.min.js", "uPlot.min.css", "dashboard.js"]) {
    const served = await httpGet(base, `/assets/${asset}`);
    assertEquals(served.status, 200, asset);
    assert(served.body.length > 100, asset);
  }
  proc.kill("SIGTERM");
  const { code, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 0, output);
});
