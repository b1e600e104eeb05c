/**
 * Reading the Dockerfile and .dockerignore the way Docker does, for the tests that check
 * them without a Docker engine (tests/deploy_test.ts, tests/team_image_test.ts).
 */
import { assert } from "./assert.ts";

const ROOT = new URL("../", import.meta.url);

/**
 * The build arguments that build a team's own entry file: the example's, as the compose
 * file and the Kubernetes kustomization build it.
 */
export const EXAMPLE_BUILD: { readonly ENTRY: string; readonly CODE: string } = {
  ENTRY: "examples/my_tasks.ts",
  CODE: "examples",
};

/** One instruction: its upper-case name and the rest of its line. */
export interface Instruction {
  op: string;
  arg: string;
}

/** A Dockerfile's instructions by stage (comments dropped, continued lines joined). */
export function dockerStages(text: string): Instruction[][] {
  const joined = text.replace(/\\\n/g, " ");
  const stages: Instruction[][] = [];
  for (const raw of joined.split("\n")) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) continue;
    const [op, ...rest] = line.split(/\s+/);
    const instruction = { op: op!.toUpperCase(), arg: rest.join(" ") };
    if (instruction.op === "FROM") stages.push([]);
    assert(stages.length > 0, `Dockerfile: ${instruction.op} before FROM`);
    stages[stages.length - 1]!.push(instruction);
  }
  return stages;
}

/** The repository's Dockerfile, by stage. */
export async function readDockerfile(): Promise<Instruction[][]> {
  return dockerStages(await Deno.readTextFile(new URL("Dockerfile", ROOT)));
}

/** The arguments of a stage's instructions named `op`. */
export function only(stage: Instruction[], op: string): string[] {
  return stage.filter((i) => i.op === op).map((i) => i.arg);
}

/** A stage's build arguments (`ARG NAME=default`) with their defaults ("" when none). */
export function buildArgs(stage: Instruction[]): Map<string, string> {
  const args = new Map<string, string>();
  for (const arg of only(stage, "ARG")) {
    const at = arg.indexOf("=");
    args.set(at < 0 ? arg : arg.slice(0, at), at < 0 ? "" : arg.slice(at + 1));
  }
  return args;
}

/** `${NAME}` and `$NAME` replaced by build argument values, as Docker does in COPY. */
export function substitute(text: string, args: Map<string, string>): string {
  return text.replace(/\$\{(\w+)\}|\$(\w+)/g, (whole, braced, bare) => {
    const value = args.get(braced ?? bare);
    return value === undefined ? whole : value;
  });
}

/** The non-comment lines of .dockerignore. */
export async function dockerignorePatterns(): Promise<string[]> {
  return (await Deno.readTextFile(new URL(".dockerignore", ROOT))).split("\n")
    .map((l) => l.trim()).filter((l) => l !== "" && !l.startsWith("#"));
}

/**
 * Whether Docker leaves `path` out of the build context: the last pattern that matches the
 * path or one of its parent directories decides, `!` re-includes (Docker's own rules).
 */
export function dockerIgnored(patterns: string[], path: string): boolean {
  const parts = path.split("/");
  const candidates = parts.map((_, i) => parts.slice(0, i + 1).join("/"));
  let ignored = false;
  for (const raw of patterns) {
    const negated = raw.startsWith("!");
    const pattern = (negated ? raw.slice(1) : raw).replace(/^\/+|\/+$/g, "");
    const source = pattern.split("**").map((piece) =>
      piece.split("*").map((s) => s.replace(/[.+^${}()|[\]\\?]/g, "\\$&")).join("[^/]*")
    ).join(".*");
    const regex = new RegExp(`^${source}$`);
    if (candidates.some((c) => regex.test(c))) ignored = !negated;
  }
  return ignored;
}

/** The repository files an entry file's module graph holds (relative paths). */
export async function localModules(entry: string): Promise<string[]> {
  const info = await new Deno.Command(Deno.execPath(), {
    args: ["info", "--json", entry],
    cwd: ROOT.pathname,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert(info.success, new TextDecoder().decode(info.stderr));
  const graph = JSON.parse(new TextDecoder().decode(info.stdout));
  return graph.modules
    .map((m: { specifier: string }) => m.specifier)
    .filter((s: string) => s.startsWith(ROOT.href))
    .map((s: string) => s.slice(ROOT.href.length));
}
