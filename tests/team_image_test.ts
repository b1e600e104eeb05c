/**
 * A team's own image, built from its own entry file (examples/my_tasks.ts), without a
 * Docker engine: the Dockerfile's builder stage is carried out step by step in a temporary
 * build context, with the build arguments the compose file and the Kubernetes manifests use.
 * COPY copies what .dockerignore lets in, ARG and `${NAME}` work as in Docker, and every RUN
 * runs in `sh` with the arguments in its environment, word for word, except that it bundles
 * where it would compile (`deno compile` cannot download its runtime here): `compile:entry`
 * and `bundle:entry` take the same entry. The result runs with the compile task's own
 * permissions against a real Postgres: it migrates, enqueues and runs the team's tasks.
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
import {
  buildArgs,
  dockerIgnored,
  dockerignorePatterns,
  EXAMPLE_BUILD,
  type Instruction,
  readDockerfile,
  substitute,
} from "./dockerfile.ts";

const ROOT = new URL("../", import.meta.url);

/** Docker's COPY from the build context (what .dockerignore lets in) into `dir`. */
async function copy(dir: string, arg: string, patterns: string[]): Promise<void> {
  const words = arg.split(/\s+/);
  assert(!words[0]!.startsWith("--"), `COPY ${arg}: only plain copies are carried out here`);
  const dest = words.pop()!.replace(/\/$/, "");
  for (const raw of words) {
    const source = raw.replace(/^\.\/|\/$/g, "");
    const isDir = (await Deno.stat(new URL(source, ROOT))).isDirectory;
    for (const file of await filesUnder(source)) {
      if (dockerIgnored(patterns, file)) continue;
      // A directory's contents go into dest; a file goes to dest (or into it, for several).
      const target = isDir
        ? `${dest}/${file.slice(source.length + 1)}`
        : words.length > 1 || arg.endsWith("/")
        ? `${dest}/${file.split("/").pop()}`
        : dest;
      const path = `${dir}/${target}`;
      await Deno.mkdir(path.slice(0, path.lastIndexOf("/")), { recursive: true });
      await Deno.copyFile(new URL(file, ROOT), path);
    }
  }
}

/** A RUN line with its BuildKit flags (`--mount=...`) removed. */
function command(arg: string): string {
  return arg.replace(/^(--\S+\s+)+/, "");
}

/**
 * Carry out the builder stage in a fresh directory with `overrides` for its build
 * arguments, bundling where it compiles. Returns the directory and the commands it ran.
 */
async function buildStage(
  builder: Instruction[],
  overrides: Record<string, string>,
): Promise<{ dir: string; ran: string[] }> {
  const dir = await Deno.makeTempDir({ prefix: "shoal_team_image_" });
  const patterns = await dockerignorePatterns();
  const args = new Map<string, string>();
  const ran: string[] = [];
  for (const { op, arg } of builder) {
    if (op === "ARG") {
      const [name, value] = [...buildArgs([{ op, arg }])][0]!;
      args.set(name, overrides[name] ?? value);
    } else if (op === "COPY") await copy(dir, substitute(arg, args), patterns);
    else if (op === "RUN") {
      const script = command(arg).replaceAll("deno task compile:entry", "deno task bundle:entry");
      ran.push(script);
      const result = await new Deno.Command("sh", {
        args: ["-c", script],
        cwd: dir,
        env: Object.fromEntries(args),
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).output();
      const stderr = new TextDecoder().decode(result.stderr);
      assert(result.success, `RUN ${script} failed:\n${stderr}`);
    } else assert(["FROM", "WORKDIR"].includes(op), `Dockerfile: ${op} not carried out here`);
  }
  return { dir, ran };
}

/** The flags the compiled binary runs with: compile:entry's, less its build-only ones. */
async function compiledPermissions(): Promise<string[]> {
  const { tasks } = JSON.parse(await Deno.readTextFile(new URL("deno.json", ROOT)));
  const words: string[] = tasks["compile:entry"].split(/\s+/).slice(2);
  const flags: string[] = [];
  for (let i = 0; i < words.length; i++) {
    if (words[i] === "--include" || words[i] === "--output") i++;
    else flags.push(words[i]!);
  }
  assert(flags.every((f) => /^--(allow-[a-z]+|v8-flags=\S+)$/.test(f)), flags.join(" "));
  return flags;
}

Deno.test("the Dockerfile's build steps with ENTRY=examples/my_tasks.ts give a program that runs the team's tasks", async () => {
  const [, builder] = await readDockerfile();
  const { dir, ran } = await buildStage(builder!, { ...EXAMPLE_BUILD });
  try {
    assertEquals(ran.at(-1)?.endsWith(`deno task bundle:entry "\${ENTRY}"`), true, ran.join("\n"));
    const program = `${dir}/dist/shoal.js`;
    const options = { mainModule: program, denoFlags: await compiledPermissions() };
    await using db = await emptyDb();
    const migrated = await runShoal(["migrate"], { ...options, url: db.url });
    assertEquals(migrated.code, 0, migrated.stderr);
    const enqueue = async (task: string, payload: unknown) => {
      const out = await runShoal(
        ["enqueue", "--task", task, "--payload", JSON.stringify(payload)],
        {
          ...options,
          url: db.url,
        },
      );
      assertEquals(out.code, 0, out.stderr);
      return out.stdout.trim().split("\n").pop()!;
    };
    const welcome = await enqueue("example.send_welcome", {
      email: "ada@example.com",
      name: "Ada",
    });
    const report = await enqueue("example.report_backlog", {});
    const queues = await db.sql<{ queue: string }[]>`select queue from shoal.jobs order by id`;
    assertEquals(queues.map((q) => q.queue), ["emails", "reports"], "the tasks' own queues");

    await using consumer = spawnShoal([
      "--role",
      "consumer",
      "--queues",
      "default,emails,reports",
      "--poll-interval",
      "100ms",
      "--shutdown-grace",
      "1s",
    ], { ...options, url: db.url });
    await waitFor("the team's jobs to run", async () => {
      const [row] = await db.sql<{ n: number }[]>`select count(*)::integer as n from shoal.jobs`;
      return row?.n === 0;
    }, 20_000);
    consumer.kill("SIGTERM");
    const { code, output } = await exitWithin(consumer, 20_000);
    assertEquals(code, 0, output);
    const lines = logLines(output);
    const sent = lines.find((l) => String(l.message).startsWith("Sent the welcome mail"));
    assertEquals(sent?.job_id, welcome, output);
    const backlog = lines.find((l) => String(l.message).startsWith("Email backlog"));
    assertEquals(backlog?.job_id, report, output);
    assertEquals(await db.sql`select id from shoal.dead_jobs`.then((r) => r.length), 0);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the Dockerfile's build steps with its default arguments bundle the stock main.ts and copy no example code", async () => {
  const [, builder] = await readDockerfile();
  const { dir, ran } = await buildStage(builder!, {});
  try {
    // The default ENTRY is main.ts: the stock program, with no example code copied.
    const entries: string[] = [];
    for await (const entry of Deno.readDir(dir)) entries.push(entry.name);
    assertEquals(entries.sort(), ["deno.json", "deno.lock", "dist", "lib", "main.ts", "sql"]);
    assert(ran.length >= 2, ran.join("\n"));
    const program = `${dir}/dist/shoal.js`;
    const help = await runShoal(["--help"], { mainModule: program });
    assertEquals(help.code, 0, help.stderr);
    assert(help.stdout.includes("--role"), help.stdout);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
