/**
 * Another commit of this repository, checked out beside the working tree for
 * `deno task bench --beside REF`: the ref is resolved to a commit, checked out into a
 * temporary detached git worktree, and removed again at the end.
 *
 * git is always run with an args array (Deno.Command), never through a shell, so a ref
 * is never interpreted as anything but a revision name.
 *
 * @module
 */

/** A commit checked out into a temporary directory. */
export interface Checkout {
  /** The ref as given (`main~3`, a sha, a tag ...). */
  ref: string;
  /** The full commit sha it resolved to. */
  sha: string;
  /** Its abbreviated sha, as git abbreviates it in this repository. */
  short: string;
  /** The checkout's root directory (holds its main.ts and deno.json). */
  dir: string;
  /**
   * Remove the worktree and its temporary directory. Safe to call more than once (and
   * from a signal handler while a `finally` also calls it): every call gets the same
   * promise.
   */
  remove(): Promise<void>;
}

/** The ref names no commit of the repository. */
export class UnknownRefError extends Error {
  override name = "UnknownRefError";
}

interface GitResult {
  success: boolean;
  code: number;
  stdout: string;
  stderr: string;
}

/** Run git in `repo` with `args` (no shell); the result whatever the exit code. */
async function git(repo: string, args: string[]): Promise<GitResult> {
  let output: Deno.CommandOutput;
  try {
    output = await new Deno.Command("git", {
      args: ["-C", repo, ...args],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
  } catch (error) {
    throw new Error(`Cannot run git ${args[0]}`, { cause: error });
  }
  const decoder = new TextDecoder();
  return {
    success: output.success,
    code: output.code,
    stdout: decoder.decode(output.stdout).trim(),
    stderr: decoder.decode(output.stderr).trim(),
  };
}

/** Run git and return its stdout; throw with its stderr when it fails. */
async function gitOrThrow(repo: string, args: string[]): Promise<string> {
  const result = await git(repo, args);
  if (!result.success) {
    throw new Error(
      `git ${args.join(" ")} exited with code ${result.code}: ${
        result.stderr.split("\n")[0] || "no message"
      }`,
    );
  }
  return result.stdout;
}

/**
 * The commit `ref` names in `repo`, full and abbreviated. Throws UnknownRefError when it
 * names none (or looks like an option: a ref never starts with "-").
 */
export async function resolveRef(
  repo: string,
  ref: string,
): Promise<{ sha: string; short: string }> {
  if (ref.trim() === "" || ref.startsWith("-")) {
    throw new UnknownRefError(`Unknown git ref "${ref}": expected a commit, branch or tag name`);
  }
  // `^{commit}` peels tags and refuses trees and blobs; --end-of-options keeps a ref from
  // being read as an option even if it got past the check above.
  const result = await git(repo, [
    "rev-parse",
    "--verify",
    "--quiet",
    "--end-of-options",
    `${ref}^{commit}`,
  ]);
  if (!result.success || !/^[0-9a-f]{40,64}$/.test(result.stdout)) {
    throw new UnknownRefError(`Unknown git ref "${ref}": no commit of ${repo} has that name`);
  }
  const sha = result.stdout;
  const short = await gitOrThrow(repo, ["rev-parse", "--short", sha]);
  return { sha, short };
}

/**
 * Check `ref` out into a new temporary directory as a detached worktree of `repo`.
 * The caller must call `remove()` on the result (also on failure and interruption).
 */
export async function checkOut(repo: string, ref: string): Promise<Checkout> {
  const { sha, short } = await resolveRef(repo, ref);
  const parent = await Deno.makeTempDir({ prefix: "shoal-beside-" });
  const dir = `${parent}/${short}`;
  const added = await git(repo, ["worktree", "add", "--detach", dir, sha]);
  if (!added.success) {
    await Deno.remove(parent, { recursive: true });
    throw new Error(
      `Cannot check ${ref} (${short}) out into ${dir}: git worktree add exited with code ${added.code}: ${
        added.stderr.split("\n").at(-1) || "no message"
      }`,
    );
  }
  let removal: Promise<void> | null = null;
  return {
    ref,
    sha,
    short,
    dir,
    remove() {
      removal ??= removeWorktree(repo, dir, parent);
      return removal;
    },
  };
}

/** `git worktree remove --force`, then the temporary directory around it. */
async function removeWorktree(repo: string, dir: string, parent: string): Promise<void> {
  const removed = await git(repo, ["worktree", "remove", "--force", dir]);
  if (!removed.success) {
    throw new Error(
      `Cannot remove the worktree ${dir}: git worktree remove exited with code ${removed.code}: ${
        removed.stderr.split("\n").at(-1) || "no message"
      } (remove it by hand: git worktree remove --force ${dir})`,
    );
  }
  await Deno.remove(parent, { recursive: true });
}

/** True when `dir` is listed among `repo`'s worktrees. */
export async function isWorktree(repo: string, dir: string): Promise<boolean> {
  const list = await gitOrThrow(repo, ["worktree", "list", "--porcelain"]);
  return list.split("\n").some((line) => line === `worktree ${dir}`);
}
