/**
 * shoal as a package another repository imports (deno.json's name, version, exports and
 * publish list): the README's two files for a team's repository, its `deno.json` import
 * map and its entry file, run in a workspace beside a copy of exactly the files the publish
 * list holds. In a workspace `jsr:@shoal/shoal@^0.1.0` resolves to the member of that name
 * and version, through its `exports`, as JSR would (JSR itself is not reachable here). The
 * team's program migrates (the SQL comes through the module graph), enqueues and runs its
 * own task; the `./cli` export migrates too. `.ci/run` adds `deno publish --dry-run`.
 */
import { assert, assertEquals } from "./assert.ts";
import {
  emptyDb,
  exitWithin,
  filesUnder,
  logLines,
  runShoal,
  spawnShoal,
  waitFor,
} from "./helpers.ts";
import { EMBEDDED_FUNCTIONS, EMBEDDED_MIGRATIONS } from "../lib/migrate.ts";

const ROOT = new URL("../", import.meta.url);

interface PackageConfig {
  name: string;
  version: string;
  license: string;
  exports: Record<string, string>;
  publish: { include: string[]; exclude?: string[] };
}

async function packageConfig(): Promise<PackageConfig> {
  return JSON.parse(await Deno.readTextFile(new URL("deno.json", ROOT)));
}

/** The fenced code blocks (language, text) of a README section, in order. */
async function readmeBlocks(heading: string): Promise<{ lang: string; text: string }[]> {
  const readme = await Deno.readTextFile(new URL("README.md", ROOT));
  const start = readme.indexOf(`\n${heading}\n`);
  assert(start >= 0, `README.md has no section "${heading}"`);
  const rest = readme.slice(start + heading.length + 2);
  const section = rest.slice(0, rest.search(/\n#{1,3} /));
  return [...section.matchAll(/```(\w+)\n([\s\S]*?)```/g)].map((m) => ({
    lang: m[1]!,
    text: m[2]!,
  }));
}

/** Copy `path` (a file or a directory, relative to the repository) into `dir`. */
async function copyInto(dir: string, path: string): Promise<void> {
  for (const file of await filesUnder(path.replace(/\/$/, ""))) {
    const to = `${dir}/${file}`;
    await Deno.mkdir(to.slice(0, to.lastIndexOf("/")), { recursive: true });
    await Deno.copyFile(new URL(file, ROOT), to);
  }
}

Deno.test("deno.json is a JSR package: name, version, MIT licence, exports of the API and the CLI, sql/ published", async () => {
  const config = await packageConfig();
  assertEquals(config.name, "@shoal/shoal");
  assert(/^\d+\.\d+\.\d+$/.test(config.version), config.version);
  assertEquals(config.license, "MIT");
  assert((await Deno.readTextFile(new URL("LICENSE", ROOT))).startsWith("MIT License\n"));
  assertEquals(config.exports, { ".": "./lib/mod.ts", "./cli": "./main.ts" });
  for (const path of ["LICENSE", "README.md", "deno.json", "main.ts", "lib/", "sql/"]) {
    assert(config.publish.include.includes(path), `the publish list holds ${path}`);
  }
  // What the migrator embeds is what sql/ holds: a published copy migrates the same.
  assert(
    Object.keys(EMBEDDED_MIGRATIONS).length >= 8 && Object.keys(EMBEDDED_FUNCTIONS).length > 0,
  );
});

Deno.test("a team's repository imports @shoal/shoal as the README shows, and its own task runs", async () => {
  const config = await packageConfig();
  const blocks = await readmeBlocks("### Import shoal from another repository");
  const importMap = blocks.find((b) => b.lang === "json");
  const entry = blocks.find((b) => b.lang === "ts");
  if (!importMap || !entry) throw new Error("The README shows no deno.json or entry file");
  assert(entry.text.includes(`from "${config.name}"`), entry.text);
  const version = JSON.parse(importMap.text).imports[config.name];
  assertEquals(version, `jsr:${config.name}@^${config.version}`);

  const dir = await Deno.makeTempDir({ prefix: "shoal_package_" });
  try {
    // The published files only, as the member; the team's two files beside it.
    for (const path of config.publish.include) await copyInto(`${dir}/shoal`, path);
    await Deno.mkdir(`${dir}/app`);
    await Deno.writeTextFile(`${dir}/app/deno.json`, importMap.text);
    await Deno.writeTextFile(`${dir}/app/main.ts`, entry.text);
    await Deno.writeTextFile(
      `${dir}/deno.json`,
      JSON.stringify({ workspace: ["./shoal", "./app"] }),
    );
    // shoal's own lock, its dependencies now those of the member: nothing to resolve anew.
    const lock = JSON.parse(await Deno.readTextFile(new URL("deno.lock", ROOT)));
    lock.workspace = { members: { shoal: lock.workspace } };
    await Deno.writeTextFile(`${dir}/deno.lock`, JSON.stringify(lock, null, 2));

    await using db = await emptyDb();
    // Nothing fetched: every dependency is in Deno's cache, @shoal/shoal is the member.
    const options = { url: db.url, cwd: dir, denoFlags: ["-A", "--cached-only"] };
    const cli = await runShoal(["migrate"], { ...options, mainModule: `jsr:${config.name}/cli` });
    assertEquals(cli.code, 0, cli.stderr);
    assert(cli.stdout.startsWith("Applied migrations: 1, 2, 3"), cli.stdout);
    const app = { ...options, mainModule: `${dir}/app/main.ts` };
    const again = await runShoal(["migrate"], app);
    assertEquals([again.code, again.stdout], [0, "Schema is up to date\n"], again.stderr);
    const enqueued = await runShoal(
      ["enqueue", "--task", "team.hello", "--payload", '{"name":"Ada"}'],
      app,
    );
    assertEquals(enqueued.code, 0, enqueued.stderr);
    const id = enqueued.stdout.trim().split("\n").pop();
    const [job] = await db.sql<{ queue: string }[]>`select queue from shoal.jobs`;
    assertEquals(job?.queue, "team", "the task's own queue");

    await using consumer = spawnShoal(
      [
        "--role",
        "consumer",
        "--queues",
        "team",
        "--poll-interval",
        "100ms",
        "--shutdown-grace",
        "1s",
      ],
      app,
    );
    await waitFor("the team's job to run", async () => {
      const [row] = await db.sql<{ n: number }[]>`select count(*)::integer as n from shoal.jobs`;
      return row?.n === 0;
    }, 20_000);
    consumer.kill("SIGTERM");
    const { code, output } = await exitWithin(consumer, 20_000);
    assertEquals(code, 0, output);
    const hello = logLines(output).find((l) => l.message === 'Hello, "Ada"' || l.name === "Ada");
    assertEquals(hello?.job_id, id, output);
    assertEquals((await db.sql`select id from shoal.dead_jobs`).length, 0);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
