/**
 * `deno task bench --beside REF`'s git side (bench/checkout.ts): refs resolve to commits,
 * the checkout is a detached worktree that `remove()` takes away again, and a bad ref is
 * refused, by checkOut and by the bench itself, before anything starts. Real git on a
 * throwaway repository; no benchmark runs here.
 */
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { checkOut, isWorktree, resolveRef, UnknownRefError } from "../bench/checkout.ts";

const decoder = new TextDecoder();

/** Run git in `dir` (no shell) and return its stdout; fail the test when git fails. */
async function git(dir: string, args: string[]): Promise<string> {
  const out = await new Deno.Command("git", {
    args: [
      "-C",
      dir,
      "-c",
      "user.name=bench test",
      "-c",
      "user.email=test@example.invalid",
      ...args,
    ],
    env: { GIT_CONFIG_NOSYSTEM: "1", GIT_CONFIG_GLOBAL: "/dev/null" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) {
    throw new Error(`git ${args.join(" ")} failed: ${decoder.decode(out.stderr).trim()}`);
  }
  return decoder.decode(out.stdout).trim();
}

/** A throwaway repository with two commits of `main.ts` ("one", then "two"). */
async function twoCommitRepo(): Promise<{ dir: string; first: string; second: string }> {
  const dir = await Deno.realPath(await Deno.makeTempDir({ prefix: "shoal-beside-test-" }));
  await git(dir, ["init", "--quiet", "--initial-branch=main"]);
  await Deno.writeTextFile(`${dir}/main.ts`, "one\n");
  await git(dir, ["add", "main.ts"]);
  await git(dir, ["commit", "--quiet", "--no-gpg-sign", "-m", "one"]);
  const first = await git(dir, ["rev-parse", "HEAD"]);
  await Deno.writeTextFile(`${dir}/main.ts`, "two\n");
  await git(dir, ["commit", "--quiet", "--no-gpg-sign", "-am", "two"]);
  const second = await git(dir, ["rev-parse", "HEAD"]);
  await git(dir, ["tag", "v2"]);
  return { dir, first, second };
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

Deno.test("resolveRef() turns refs into commits and refuses what names none", async () => {
  const repo = await twoCommitRepo();
  try {
    const previous = await resolveRef(repo.dir, "main~1");
    assertEquals(previous.sha, repo.first);
    assert.ok(repo.first.startsWith(previous.short) && previous.short.length >= 4);
    assertEquals((await resolveRef(repo.dir, "v2")).sha, repo.second);
    assertEquals((await resolveRef(repo.dir, repo.first.slice(0, 10))).sha, repo.first);
    for (const bad of ["no-such-ref", "", "-h", "--output=x", "main~5", "HEAD:main.ts"]) {
      await assertRejects(() => resolveRef(repo.dir, bad), UnknownRefError, "Unknown git ref");
    }
  } finally {
    await Deno.remove(repo.dir, { recursive: true });
  }
});

Deno.test("checkOut() makes a detached worktree of the commit, and remove() takes it away", async () => {
  const repo = await twoCommitRepo();
  try {
    const checkout = await checkOut(repo.dir, "main~1");
    assertEquals(checkout.sha, repo.first);
    assert.ok(await isWorktree(repo.dir, checkout.dir), "listed by git worktree list");
    assertEquals(await Deno.readTextFile(`${checkout.dir}/main.ts`), "one\n");
    assertEquals(await git(checkout.dir, ["rev-parse", "HEAD"]), repo.first);
    // Detached: HEAD names no branch, so the checkout cannot move one.
    await assertRejects(() => git(checkout.dir, ["symbolic-ref", "HEAD"]));
    // The repository's own checkout is untouched.
    assertEquals(await Deno.readTextFile(`${repo.dir}/main.ts`), "two\n");

    const parent = checkout.dir.slice(0, checkout.dir.lastIndexOf("/"));
    await Promise.all([checkout.remove(), checkout.remove()]); // a signal and a finally
    await checkout.remove();
    assert.ok(!await isWorktree(repo.dir, checkout.dir), "no longer a worktree");
    assert.ok(!await exists(checkout.dir), "its directory is gone");
    assert.ok(!await exists(parent), "its temporary parent is gone");
    assertEquals(
      await git(repo.dir, ["worktree", "list", "--porcelain"]).then((l) =>
        l.split("\n").filter((line) => line.startsWith("worktree ")).length
      ),
      1,
    );
  } finally {
    await Deno.remove(repo.dir, { recursive: true });
  }
});

Deno.test("checkOut() of a bad ref leaves no worktree or temporary directory", async () => {
  const repo = await twoCommitRepo();
  const tempBefore = await besideTempDirs();
  try {
    await assertRejects(() => checkOut(repo.dir, "no-such-ref"), UnknownRefError);
    const list = await git(repo.dir, ["worktree", "list", "--porcelain"]);
    assertEquals(list.split("\n").filter((line) => line.startsWith("worktree ")).length, 1);
    assertEquals(await besideTempDirs(), tempBefore);
  } finally {
    await Deno.remove(repo.dir, { recursive: true });
  }
});

/** The bench's temporary checkout directories now in the temp directory. */
async function besideTempDirs(): Promise<string[]> {
  const tmp = Deno.env.get("TMPDIR") ?? "/tmp";
  const names: string[] = [];
  for await (const entry of Deno.readDir(tmp)) {
    if (entry.name.startsWith("shoal-beside-") && !entry.name.startsWith("shoal-beside-test-")) {
      names.push(entry.name);
    }
  }
  return names.sort();
}

Deno.test("deno task bench --beside with an unknown ref exits 1 with one line, before Postgres", async () => {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "bench/run.ts", "--beside", "no-such-ref-for-shoal", "--only", "W2"],
    cwd: new URL("../", import.meta.url).pathname,
    // The bench's own server would start from DATABASE_URL; it must not get that far.
    env: { DATABASE_URL: "postgres://nobody@127.0.0.1:1/none" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  assertEquals(out.code, 1);
  assertEquals(decoder.decode(out.stdout), "");
  const lines = decoder.decode(out.stderr).trim().split("\n").filter((l) => l.startsWith("bench"));
  assertEquals(lines, [
    'bench: Cannot measure --beside no-such-ref-for-shoal: Unknown git ref "no-such-ref-for-shoal": ' +
    `no commit of ${new URL("../", import.meta.url).pathname} has that name`,
  ]);
});
