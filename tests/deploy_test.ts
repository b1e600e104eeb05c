/**
 * The deployment files checked against shoal itself: the Dockerfile builds with exactly
 * `deno task compile` from files its build context holds; docker-compose.yml and
 * deploy/k8s/ pass only flags and SHOAL_* variables that the command they run takes (shoal's
 * own parser is asked, against a closed port), outlast the shutdown grace, and probe the
 * address `--http` listens on. No Docker engine or cluster runs here: this is what we can
 * check without one.
 */
import postgres from "postgres";
import { parseAllDocuments } from "yaml";
import { assert, assertEquals, assertRejects } from "./assert.ts";
import {
  emptyDb,
  exitWithin,
  freePort,
  httpGet,
  logLines,
  runShoal,
  spawnShoal,
  waitFor,
} from "./helpers.ts";
import { connect } from "../lib/db.ts";
import { OPTIONS } from "../lib/config.ts";
import { parseDuration } from "../lib/duration.ts";
import { LIVENESS_PATH, READINESS_PATH } from "../lib/http_server.ts";
import type { AnyTask } from "../lib/tasks.ts";
import {
  buildArgs,
  dockerIgnored,
  dockerignorePatterns,
  EXAMPLE_BUILD,
  type Instruction,
  localModules,
  only,
  readDockerfile,
  substitute,
} from "./dockerfile.ts";

const ROOT = new URL("../", import.meta.url);
const K8S_DIR = new URL("deploy/k8s/", ROOT);
const ROLES = ["consumer", "reaper", "scheduler"] as const;
/** Time after the shutdown grace for handing jobs back, releasing leases, closing the pool. */
const STOP_MARGIN_MS = 5_000;
/** Until the HTTP server lands (issue 7), `--http` / SHOAL_HTTP are checked here, not by shoal. */
const HTTP_PENDING = !("http" in OPTIONS);

/** `value`, or a failure saying what was missing. */
function must<T>(value: T | null | undefined | false | "", what: string): T {
  if (value === null || value === undefined || value === false || value === "") {
    throw new Error(`Expected ${what}`);
  }
  return value;
}

// ---------------------------------------------------------------------------------------
// Reading the files

async function readText(path: string): Promise<string> {
  return await Deno.readTextFile(new URL(path, ROOT));
}

/** Every document of a YAML file as plain values; a syntax error or warning fails. */
async function readYaml(url: URL): Promise<unknown[]> {
  const parsed = parseAllDocuments(await Deno.readTextFile(url), { merge: true, uniqueKeys: true });
  const docs = Array.isArray(parsed) ? parsed : [];
  for (const doc of docs) {
    const problems = [...doc.errors, ...doc.warnings].map((e) => e.message);
    assertEquals(problems, [], `${url.pathname} does not parse cleanly`);
  }
  return docs.map((doc) => doc.toJS());
}

/** An instruction in exec form (a JSON array of strings). */
function execForm(arg: string, what: string): string[] {
  const value: unknown = JSON.parse(arg);
  assert(
    Array.isArray(value) && value.every((v) => typeof v === "string"),
    `${what} must be a JSON array`,
  );
  return value as string[];
}

// ---------------------------------------------------------------------------------------
// Checking a shoal command line against shoal

/** One way the deployment files start shoal: its arguments and environment. */
interface Invocation {
  where: string;
  args: string[];
  env: Record<string, string>;
}

type Spec = { kind: string; default?: string; choices?: readonly string[]; env?: string | null };

function spec(name: string): Spec | undefined {
  return (OPTIONS as Record<string, Spec>)[name];
}

function envNameOf(name: string): string | null {
  const s = spec(name);
  if (!s || s.env === null) return null;
  return s.env ?? `SHOAL_${name.toUpperCase().replaceAll("-", "_")}`;
}

/**
 * The flags of a command line by name (a boolean's value is "true"/"false"); fails on a
 * flag or SHOAL_* variable shoal does not have, or a role it does not know.
 */
function flagsOf(inv: Invocation): Map<string, string> {
  const flags = new Map<string, string>();
  for (let i = 0; i < inv.args.length; i++) {
    const arg = inv.args[i]!;
    if (!arg.startsWith("--")) continue;
    const [name, inline] = arg.slice(2).split("=", 2) as [string, string | undefined];
    const positive = name.startsWith("no-") ? name.slice(3) : null;
    if (spec(name)?.kind === "boolean") flags.set(name, inline ?? "true");
    else if (positive && spec(positive)?.kind === "boolean") flags.set(positive, "false");
    else if (spec(name) || (name === "http" && HTTP_PENDING)) {
      const value = must(inline ?? inv.args[++i], `${inv.where}: a value for --${name}`);
      assert(!value.startsWith("--"), `${inv.where}: --${name} needs a value`);
      flags.set(name, value);
    } else throw new Error(`${inv.where}: shoal has no flag --${name}`);
  }
  const known = new Set(Object.keys(OPTIONS).map(envNameOf));
  if (HTTP_PENDING) known.add("SHOAL_HTTP");
  for (const variable of Object.keys(inv.env)) {
    if (!variable.startsWith("SHOAL_")) continue;
    assert(known.has(variable), `${inv.where}: shoal reads no variable ${variable}`);
  }
  const role = flags.get("role");
  if (role !== undefined) {
    assert(spec("role")!.choices!.includes(role), `${inv.where}: no role "${role}"`);
  }
  return flags;
}

/** A value from its flag, else its SHOAL_* variable, else shoal's default. */
function valueOf(inv: Invocation, name: string): string | undefined {
  const variable = envNameOf(name) ?? (name === "http" ? "SHOAL_HTTP" : null);
  return flagsOf(inv).get(name) ?? (variable ? inv.env[variable] : undefined) ??
    spec(name)?.default;
}

function shutdownGraceMs(inv: Invocation): number {
  return parseDuration(valueOf(inv, "shutdown-grace")!);
}

/** The `--http` address, as host and port. */
function httpAddress(inv: Invocation): { host: string; port: number } | null {
  const value = valueOf(inv, "http");
  if (value === undefined) return null;
  const match = must(/^(.+):(\d{1,5})$/.exec(value), `${inv.where}: --http as HOST:PORT`);
  return { host: match[1]!, port: Number(match[2]) };
}

/**
 * Ask shoal itself: run the command line against a port nobody listens on. Exit 1 with
 * "Cannot reach the database" means every flag, variable and value was accepted by that
 * command (a usage error exits 2 before any connection is tried).
 */
async function assertShoalAccepts(inv: Invocation): Promise<void> {
  flagsOf(inv);
  const args: string[] = [];
  for (let i = 0; i < inv.args.length; i++) {
    const arg = inv.args[i]!;
    if (arg === "--http") {
      i++;
      // Listen on loopback only, on a free port; or leave it out until shoal has the flag.
      if (!HTTP_PENDING) args.push(arg, `127.0.0.1:${freePort()}`);
    } else if (arg === "--startup-wait") {
      // A duration shoal reads, but no wait for it: only the refusal matters here.
      parseDuration(must(inv.args[++i], `${inv.where}: a value for --startup-wait`));
      args.push(arg, "0s");
    } else args.push(arg);
  }
  const env = { ...inv.env };
  if (HTTP_PENDING) delete env.SHOAL_HTTP;
  else if (env.SHOAL_HTTP) env.SHOAL_HTTP = `127.0.0.1:${freePort()}`;
  env.DATABASE_URL = `postgres://shoal@127.0.0.1:${freePort()}/shoal`;
  // A role would wait for the database first (--startup-wait); only the refusal matters here.
  env.SHOAL_STARTUP_WAIT ??= "0s";
  const result = await runShoal(args, { env });
  assertEquals(
    [result.code, result.stderr.includes("Cannot reach the database")],
    [1, true],
    `${inv.where}: shoal ${args.join(" ")} was refused:\n${result.stderr}`,
  );
}

// ---------------------------------------------------------------------------------------
// Dockerfile

interface Image {
  entrypoint: string[];
  cmd: string[];
}

async function checkedImage(): Promise<Image> {
  const stages = await readDockerfile();
  assertEquals(stages.length, 3, "Dockerfile: the denort context, a builder and a runtime stage");
  const [denort, builder, runtime] = stages as [Instruction[], Instruction[], Instruction[]];
  // Empty unless `--build-context denort=DIR` replaces it (BuildKit's named contexts).
  assertEquals(denort, [{ op: "FROM", arg: "scratch AS denort" }]);
  const ci = /^DENO_VERSION="([^"]+)"$/m.exec(await readText(".ci/run"));
  assertEquals(only(builder, "FROM"), [`denoland/deno:${ci?.[1]} AS builder`]);
  assertEquals(only(runtime, "FROM"), ["gcr.io/distroless/cc-debian12:nonroot"]);

  const output = await compileOutput();
  const args = buildArgs(builder);
  assertEquals(args.get("ENTRY"), "main.ts", "by default the image is `deno task compile`'s");
  assertEquals(args.get("CODE"), "main.ts");
  assert(only(builder, "COPY").includes("${CODE} ${CODE}"), "the builder copies CODE");
  const runs = stages.flat().filter((i) => i.op === "RUN").map((i) => i.arg);
  const compiles = runs.filter((r) => /\bcompile\b/.test(r));
  assertEquals(compiles.length, 1, "one RUN compiles");
  const run = compiles[0]!;
  assert(
    run.endsWith(`; deno task compile:entry "\${ENTRY}"`),
    `the build arg is the entry: ${run}`,
  );
  const argsAt = builder.findIndex((i) => i.op === "ARG" && i.arg.startsWith("ENTRY="));
  assert(argsAt >= 0 && argsAt < builder.findIndex((i) => i.arg === run), "ARG ENTRY before use");
  // denort: the named context mounted, and DENORT_BIN set only when it holds the file (an
  // empty DENORT_BIN would stop deno compile from downloading it).
  const target = must(
    /--mount=type=bind,from=denort,target=(\S+)/.exec(run),
    "the denort mount",
  )[1]!;
  assert(
    run.includes(`if [ -f ${target}/denort ]; then export DENORT_BIN=${target}/denort; fi;`),
    run,
  );

  const [workdir] = only(builder, "WORKDIR");
  const copied = only(runtime, "COPY").map((arg) => arg.split(/\s+/));
  const binary = copied.find((words) => words[0] === "--from=builder");
  assertEquals(binary?.slice(1, 2), [`${workdir}/${output}`], "the runtime copies the binary");
  const [user] = only(runtime, "USER");
  assert(user && /^[1-9]\d*(:\d+)?$/.test(user), "USER is a numeric, non-root user");

  const [entrypoint] = only(runtime, "ENTRYPOINT");
  const [cmd] = only(runtime, "CMD");
  const image = {
    entrypoint: execForm(entrypoint ?? "null", "ENTRYPOINT"),
    cmd: execForm(cmd ?? "null", "CMD"),
  };
  assertEquals(image.entrypoint, [binary![2]!], "ENTRYPOINT is the binary itself, no shell");
  return image;
}

/**
 * deno.json's compile tasks: `compile` is `compile:entry` given main.ts, so the flags have
 * one home; compile:entry embeds sql/ and ends with its output (the entry comes after).
 * Returns the output path.
 */
async function compileOutput(): Promise<string> {
  const { tasks } = JSON.parse(await readText("deno.json"));
  assertEquals(tasks.compile, "deno task compile:entry main.ts");
  assertEquals(tasks.bundle, "deno task bundle:entry main.ts");
  const compile: string = tasks["compile:entry"];
  assert(compile.startsWith("deno compile "), "compile:entry runs deno compile");
  assert(/ --include sql\/ /.test(compile), "compile:entry embeds sql/");
  return must(/ --output (\S+)$/.exec(compile), "compile:entry ending with --output PATH")[1]!;
}

Deno.test("Dockerfile builds with exactly `deno task compile` by default, ENTRY and CODE for a team's own, and runs the binary with a role", async () => {
  const image = await checkedImage();
  assertEquals(image.cmd.slice(0, 2), ["--role", "consumer"]);
  await assertShoalAccepts({ where: "Dockerfile CMD", args: image.cmd, env: {} });
});

Deno.test(".dockerignore and the COPY lines hold every file the stock and the example entry are built from", async () => {
  const patterns = await dockerignorePatterns();
  const [, builder] = await readDockerfile();
  const builds = [{ ENTRY: "main.ts", CODE: "main.ts" }, EXAMPLE_BUILD];
  for (const build of builds) {
    const local = await localModules(build.ENTRY);
    assert(local.includes(build.ENTRY) && local.includes("sql/001_queue.sql"));
    const args = new Map(Object.entries(build));
    const sources = only(builder!, "COPY").flatMap((arg) => arg.split(/\s+/).slice(0, -1))
      .map((s) => substitute(s, args).replace(/^\.\/|\/$/g, ""));
    for (const path of [...local, "deno.json", "deno.lock"]) {
      assert(!dockerIgnored(patterns, path), `.dockerignore leaves out ${path}`);
      const copied = sources.some((s) => s === "." || path === s || path.startsWith(`${s}/`));
      assert(copied, `the builder stage copies no ${path} (ENTRY=${build.ENTRY})`);
    }
  }
  for (
    const path of [
      ".git",
      ".shoal/db",
      "dist/shoal",
      "tests/helpers.ts",
      ".env",
      "examples/node/node_modules/postgres/package.json",
    ]
  ) {
    assert(dockerIgnored(patterns, path), `.dockerignore lets ${path} into the build context`);
  }
});

/** The queues of the tasks an entry file exports (what its consumers must claim from). */
async function taskQueues(entry: string): Promise<string[]> {
  const module: Record<string, unknown> = await import(new URL(entry, ROOT).href);
  const tasks = Object.values(module).filter((v): v is AnyTask =>
    typeof v === "object" && v !== null && "handler" in v && "name" in v
  );
  assert(tasks.length > 0, `${entry} exports no task`);
  return [...new Set(tasks.map((t) => t.queue ?? "default"))].sort();
}

/** Whether some consumer command line claims from every one of `queues`. */
function claimsAll(invs: Invocation[], queues: string[]): boolean {
  const claimed = new Set(
    invs.filter((inv) => ["consumer", "all"].includes(valueOf(inv, "role") ?? ""))
      .flatMap((inv) => (valueOf(inv, "queues") ?? "").split(",")),
  );
  return queues.every((q) => claimed.has(q));
}

// ---------------------------------------------------------------------------------------
// docker-compose.yml

interface ComposeService {
  image?: string;
  build?: { context?: string; args?: Record<string, string> };
  entrypoint?: unknown;
  command?: string[];
  environment?: Record<string, string>;
  depends_on?: Record<string, { condition?: string }>;
  deploy?: { replicas?: number };
  stop_grace_period?: string;
  restart?: string;
  healthcheck?: { test?: string[] };
}

/** `${NAME:-default}` as Compose fills it in when NAME is unset. */
function composeDefault(value: string): string {
  return value.replace(/\$\{[A-Z_]+:-([^}]*)\}/g, "$1");
}

function composeInvocation(name: string, service: ComposeService): Invocation {
  const args = must(service.command, `compose ${name}: a command`);
  assert(Array.isArray(args), `compose ${name}: command is a list`);
  const env: Record<string, string> = {};
  for (const [key, value] of Object.entries(service.environment ?? {})) {
    env[key] = composeDefault(String(value));
  }
  return { where: `docker-compose.yml ${name}`, args, env };
}

Deno.test("docker-compose.yml migrates once, then runs two of each role, all flags shoal's", async () => {
  const [doc] = await readYaml(new URL("docker-compose.yml", ROOT));
  const services = (doc as { services: Record<string, ComposeService> }).services;
  const postgres = must(services.postgres, "a compose postgres service");
  const migrate = must(services.migrate, "a compose migrate service");
  assert(/^postgres:\d+\.\d+/.test(postgres.image ?? ""), "the Postgres image is pinned");
  assert(postgres.healthcheck?.test?.includes("pg_isready"), "Postgres has a pg_isready check");

  assertEquals(migrate.command, ["migrate"]);
  assertEquals(migrate.restart, "no");
  assertEquals(migrate.depends_on?.postgres?.condition, "service_healthy");

  // The image is the team entry's: the Dockerfile's build arguments, by default the example.
  const buildArgs = Object.fromEntries(
    Object.entries(migrate.build?.args ?? {}).map(([k, v]) => [k, composeDefault(String(v))]),
  );
  assertEquals(buildArgs, EXAMPLE_BUILD, "compose builds examples/my_tasks.ts by default");
  assertEquals(migrate.build?.context, ".");

  const replicas: Record<string, number> = {};
  const invocations: Invocation[] = [];
  for (const [name, service] of Object.entries(services)) {
    if (name === "postgres") continue;
    assertEquals(service.image, migrate.image, `compose ${name} runs the shoal image`);
    assertEquals(service.build, migrate.build, `compose ${name} builds the same image`);
    assertEquals(service.entrypoint, undefined, `compose ${name} keeps the image's entrypoint`);
    assert(
      service.environment?.DATABASE_URL?.startsWith("${DATABASE_URL"),
      `compose ${name}: DATABASE_URL comes from the environment`,
    );
    const inv = composeInvocation(name, service);
    await assertShoalAccepts(inv);
    invocations.push(inv);
    if (name === "migrate") continue;
    const role = must(flagsOf(inv).get("role"), `compose ${name}: --role`);
    replicas[role] = (replicas[role] ?? 0) + (service.deploy?.replicas ?? 1);
    assertEquals(service.depends_on?.migrate?.condition, "service_completed_successfully");
    const stop = parseDuration(service.stop_grace_period ?? "10s");
    assert(
      stop >= shutdownGraceMs(inv) + STOP_MARGIN_MS,
      `compose ${name}: stop_grace_period ${service.stop_grace_period} does not outlast the shutdown grace`,
    );
  }
  assertEquals(replicas, { consumer: 2, reaper: 2, scheduler: 2 });
  const queues = await taskQueues(EXAMPLE_BUILD.ENTRY);
  assert(claimsAll(invocations, queues), `the consumers claim from ${queues} (the entry's tasks)`);
});

// ---------------------------------------------------------------------------------------
// deploy/k8s

interface Probe {
  httpGet?: { path?: string; port?: string | number };
  periodSeconds?: number;
  timeoutSeconds?: number;
  failureThreshold?: number;
}

interface Container {
  name: string;
  image?: string;
  command?: unknown;
  args?: string[];
  env?: { name: string; value?: string; valueFrom?: { secretKeyRef?: { name: string } } }[];
  ports?: { name?: string; containerPort: number }[];
  startupProbe?: Probe;
  livenessProbe?: Probe;
  readinessProbe?: Probe;
  resources?: { requests?: Record<string, string>; limits?: Record<string, string> };
  securityContext?: {
    allowPrivilegeEscalation?: boolean;
    readOnlyRootFilesystem?: boolean;
    capabilities?: { drop?: string[] };
  };
}

interface PodSpec {
  containers: Container[];
  restartPolicy?: string;
  terminationGracePeriodSeconds?: number;
  securityContext?: { runAsNonRoot?: boolean; runAsUser?: number };
}

interface Manifest {
  kind: string;
  metadata: { name: string; labels?: Record<string, string> };
  spec: {
    replicas?: number;
    selector?: { matchLabels?: Record<string, string> };
    template?: { metadata?: { labels?: Record<string, string> }; spec: PodSpec };
  };
}

async function k8sManifests(): Promise<{ file: string; manifest: Manifest }[]> {
  const found: { file: string; manifest: Manifest }[] = [];
  for await (const entry of Deno.readDir(K8S_DIR)) {
    if (!/\.ya?ml$/.test(entry.name)) continue;
    for (const doc of await readYaml(new URL(entry.name, K8S_DIR))) {
      found.push({ file: entry.name, manifest: doc as Manifest });
    }
  }
  return found.sort((a, b) => a.file.localeCompare(b.file));
}

/** The shoal container of a pod: hardened, sized, its database URL from a Secret. */
function checkedContainer(where: string, pod: PodSpec): Invocation {
  assertEquals(pod.securityContext?.runAsNonRoot, true, `${where}: runAsNonRoot`);
  assert((pod.securityContext?.runAsUser ?? 0) > 0, `${where}: runAsUser is not root`);
  assertEquals(pod.containers.length, 1, `${where}: one container`);
  const container = pod.containers[0]!;
  assertEquals(container.command, undefined, `${where}: args only, the entrypoint is shoal`);
  const args = must(container.args, `${where}: args`);
  assert(Array.isArray(args), `${where}: args is a list`);
  const security = container.securityContext;
  assertEquals(security?.readOnlyRootFilesystem, true, `${where}: readOnlyRootFilesystem`);
  assertEquals(security?.allowPrivilegeEscalation, false, `${where}: allowPrivilegeEscalation`);
  assertEquals(security?.capabilities?.drop, ["ALL"], `${where}: capabilities dropped`);
  assert(container.resources?.requests?.cpu, `${where}: a CPU request`);
  assert(container.resources?.requests?.memory, `${where}: a memory request`);
  assert(container.resources?.limits?.memory, `${where}: a memory limit`);
  const env: Record<string, string> = {};
  for (const variable of container.env ?? []) {
    if (variable.value !== undefined) env[variable.name] = variable.value;
  }
  const url = must(container.env?.find((v) => v.name === "DATABASE_URL"), `${where}: DATABASE_URL`);
  assert(url.valueFrom?.secretKeyRef?.name, `${where}: DATABASE_URL from a Secret`);
  assertEquals(url.value, undefined, `${where}: no database URL committed`);
  return { where, args, env };
}

function probePort(container: Container, probe: Probe | undefined, what: string): number {
  const port = probe?.httpGet?.port;
  const named = container.ports?.find((p) => p.name === port)?.containerPort;
  return must(typeof port === "number" ? port : named, `${what}: probe port ${port} declared`);
}

Deno.test("deploy/k8s runs each role as a hardened Deployment probed on its --http address", async () => {
  const manifests = await k8sManifests();
  const deployments = manifests.filter((m) => m.manifest.kind === "Deployment");
  const seen: string[] = [];
  for (const { file, manifest } of deployments) {
    const where = `${file} ${manifest.metadata.name}`;
    const pod = manifest.spec.template!.spec;
    const inv = checkedContainer(where, pod);
    await assertShoalAccepts(inv);
    const role = must(flagsOf(inv).get("role"), `${where}: --role`);
    assert(role !== "all", `${where}: runs one role`);
    seen.push(role);
    assert((manifest.spec.replicas ?? 1) >= 2, `${where}: a standby or a second consumer`);
    const grace = (pod.terminationGracePeriodSeconds ?? 30) * 1000;
    assert(
      grace >= shutdownGraceMs(inv) + STOP_MARGIN_MS,
      `${where}: terminationGracePeriodSeconds does not outlast the shutdown grace`,
    );

    const http = must(httpAddress(inv), `${where}: --http`);
    // The kubelet and Prometheus connect to the pod IP: loopback would be unreachable.
    assertEquals(http.host, "0.0.0.0", `${where}: --http listens on the pod's addresses`);
    const container = pod.containers[0]!;
    const probes = {
      startup: container.startupProbe,
      liveness: container.livenessProbe,
      readiness: container.readinessProbe,
    };
    for (const [name, probe] of Object.entries(probes)) {
      assertEquals(probePort(container, probe, where), http.port, `${where}: ${name} port`);
    }

    const labels = manifest.spec.template!.metadata!.labels!;
    const selector = manifest.spec.selector!.matchLabels!;
    for (const [k, v] of Object.entries(selector)) assertEquals(labels[k], v, `${where} selector`);
    const budgets = manifests.filter(({ manifest: m }) =>
      m.kind === "PodDisruptionBudget" &&
      Object.entries(m.spec.selector?.matchLabels ?? {}).every(([k, v]) => labels[k] === v)
    );
    assertEquals(budgets.length, 1, `${where}: one PodDisruptionBudget covers its pods`);
  }
  assertEquals(seen.sort(), [...ROLES]);
});

/** Kubernetes' defaults for a probe's timings. */
const PROBE_DEFAULTS = { periodSeconds: 10, timeoutSeconds: 1, failureThreshold: 3 };

/** How long a probe may fail before the kubelet acts: failureThreshold × periodSeconds. */
function probeWindowMs(probe: Probe): number {
  const { periodSeconds, failureThreshold } = { ...PROBE_DEFAULTS, ...probe };
  return failureThreshold * periodSeconds * 1000;
}

/** After the database answers at start: the schema check and the roles' start. */
const START_MARGIN_MS = 10_000;
/** A liveness probe restarts no pod over less than this (a GC pause, CPU throttling). */
const MIN_LIVENESS_WINDOW_MS = 30_000;

Deno.test("deploy/k8s probes: liveness is the loop check, readiness the database's, the startup window covers --startup-wait", async () => {
  const deployments = (await k8sManifests()).filter((m) => m.manifest.kind === "Deployment");
  assertEquals(deployments.length, ROLES.length);
  for (const { file, manifest } of deployments) {
    const where = `${file} ${manifest.metadata.name}`;
    const inv = checkedContainer(where, manifest.spec.template!.spec);
    const { startupProbe, livenessProbe, readinessProbe } = manifest.spec.template!.spec
      .containers[0]!;
    const startup = must(startupProbe, `${where}: a startupProbe`);
    const liveness = must(livenessProbe, `${where}: a livenessProbe`);
    const readiness = must(readinessProbe, `${where}: a readinessProbe`);
    // The paths by what shoal serves on them (lib/http_server.ts): the loops, the database.
    assertEquals(liveness.httpGet?.path, LIVENESS_PATH, `${where}: liveness checks the loops`);
    assertEquals(startup.httpGet?.path, LIVENESS_PATH, `${where}: startup holds off liveness`);
    assertEquals(readiness.httpGet?.path, READINESS_PATH, `${where}: readiness checks the db`);

    // /healthz is 503 while the role waits for its database: the startup probe must wait
    // longer, or the kubelet restarts a pod that was only waiting (checked for real below).
    const startupWait = parseDuration(must(valueOf(inv, "startup-wait"), "--startup-wait"));
    assert(
      inv.args.includes("--startup-wait"),
      `${where}: --startup-wait is given beside the probe that must cover it`,
    );
    assert(
      probeWindowMs(startup) >= startupWait + START_MARGIN_MS,
      `${where}: the startupProbe allows ${
        probeWindowMs(startup)
      } ms, --startup-wait is ${startupWait} ms`,
    );

    // Liveness tolerant of an outage and of a slow moment: never stricter than readiness
    // (a pod leaves rotation before it is ever restarted), and a few failures in a row over
    // half a minute at least.
    const live = { ...PROBE_DEFAULTS, ...liveness };
    assert(live.failureThreshold >= 3, `${where}: liveness failureThreshold >= 3`);
    assert(probeWindowMs(liveness) >= MIN_LIVENESS_WINDOW_MS, `${where}: liveness window`);
    assert(
      probeWindowMs(liveness) >= probeWindowMs(readiness),
      `${where}: liveness gives up no sooner than readiness`,
    );
    assert(live.timeoutSeconds >= { ...PROBE_DEFAULTS, ...readiness }.timeoutSeconds);
  }
});

Deno.test("deploy/k8s: a role run with its manifest's command line answers 503 on both probes while it waits for its database", async () => {
  const deployments = (await k8sManifests()).filter((m) => m.manifest.kind === "Deployment");
  for (const { file, manifest } of deployments) {
    const where = `${file} ${manifest.metadata.name}`;
    const inv = checkedContainer(where, manifest.spec.template!.spec);
    const port = freePort();
    const args = inv.args.map((arg, i) => inv.args[i - 1] === "--http" ? `127.0.0.1:${port}` : arg);
    // The database on a port nobody listens on: the role waits (--startup-wait 2m).
    const env = { ...inv.env, DATABASE_URL: `postgres://shoal@127.0.0.1:${freePort()}/shoal` };
    await using proc = spawnShoal(args, { env });
    const base = `http://127.0.0.1:${port}`;
    await waitFor(`${where}: waiting for its database`, () => {
      if (/^shoal: /m.test(proc.output())) throw new Error(`${where} gave up:\n${proc.output()}`);
      return proc.output().includes("Waiting for the database");
    }, 20_000);
    for (const path of [LIVENESS_PATH, READINESS_PATH]) {
      const answer = await httpGet(base, path);
      assertEquals([answer.status, answer.body], [503, "starting\n"], `${where}: ${path}`);
    }
    proc.kill("SIGTERM");
    const { code, output } = await exitWithin(proc, 20_000);
    assertEquals(code, 0, output);
  }
});

Deno.test("deploy/k8s migrates with a Job running `shoal migrate`", async () => {
  const jobs = (await k8sManifests()).filter((m) => m.manifest.kind === "Job");
  assertEquals(jobs.length, 1);
  const { file, manifest } = jobs[0]!;
  const pod = manifest.spec.template!.spec;
  const inv = checkedContainer(`${file} ${manifest.metadata.name}`, pod);
  assertEquals(inv.args, ["migrate"]);
  assert(["Never", "OnFailure"].includes(pod.restartPolicy ?? ""), "a Job's restartPolicy");
  await assertShoalAccepts(inv);
});

Deno.test("deploy/k8s commits no Secret and lists every manifest in its kustomization", async () => {
  const manifests = await k8sManifests();
  assertEquals(manifests.filter((m) => m.manifest.kind === "Secret"), []);
  const images = new Set(
    manifests.flatMap((m) => m.manifest.spec?.template?.spec.containers.map((c) => c.image) ?? []),
  );
  assertEquals([...images], ["shoal"], "every workload names the one shoal image");
  const [kustomization] = await readYaml(new URL("kustomization.yaml", K8S_DIR));
  const k = kustomization as { resources: string[]; images: { name: string }[] };
  const files = new Set(manifests.map((m) => m.file));
  files.delete("kustomization.yaml");
  assertEquals([...k.resources].sort(), [...files].sort());
  assertEquals(k.images.map((i) => i.name), ["shoal"]);
});

Deno.test("deploy/k8s runs an image built from examples/my_tasks.ts, its consumers on that entry's queues", async () => {
  // The build command kustomization.yaml documents: the compose file's build arguments.
  const text = await Deno.readTextFile(new URL("kustomization.yaml", K8S_DIR));
  const command = must(
    /#\s+docker build ((?:.*\\\n#\s+)*.*)$/m.exec(text),
    "a docker build line",
  )[1]!
    .replace(/\\\n#\s+/g, " ");
  const args = Object.fromEntries(
    [...command.matchAll(/--build-arg (\w+)=(\S+)/g)].map((m) => [m[1]!, m[2]!]),
  );
  assertEquals(args, EXAMPLE_BUILD);
  const deployments = (await k8sManifests()).filter((m) => m.manifest.kind === "Deployment");
  const invs = deployments.map(({ file, manifest }) =>
    checkedContainer(`${file} ${manifest.metadata.name}`, manifest.spec.template!.spec)
  );
  const queues = await taskQueues(EXAMPLE_BUILD.ENTRY);
  assert(claimsAll(invs, queues), `the consumers claim from ${queues} (the entry's tasks)`);
});

// ---------------------------------------------------------------------------------------
// deploy/postgres/roles.sql

/** `url` logging in as `user` (the test cluster trusts loopback logins). */
function asUser(url: string, user: string): string {
  const u = new URL(url);
  u.username = user;
  u.password = "";
  return u.toString();
}

/** Drop the cluster-wide roles a test made (their database must be gone already). */
async function dropRoles(names: string[]): Promise<void> {
  const admin = postgres(must(Deno.env.get("DATABASE_URL"), "DATABASE_URL"), {
    max: 1,
    onnotice: () => {},
  });
  try {
    for (const name of names) await admin`drop role if exists ${admin(name)}`;
  } finally {
    await admin.end();
  }
}

Deno.test("deploy/postgres/roles.sql: the owner migrates, the app role runs shoal and no DDL", async () => {
  // Roles are cluster-wide: unique names, so parallel runs on one cluster never collide.
  const suffix = crypto.randomUUID().replaceAll("-", "").slice(0, 12);
  const owner = `shoal_owner_${suffix}`;
  const app = `shoal_app_${suffix}`;
  const script = (await readText("deploy/postgres/roles.sql"))
    .replaceAll("shoal_owner", owner).replaceAll("shoal_app", app);
  try {
    await using db = await emptyDb();
    await db.sql.unsafe(script);
    const migrated = await runShoal(["migrate"], { url: asUser(db.url, owner) });
    assertEquals(migrated.code, 0, migrated.stderr);

    const appUrl = asUser(db.url, app);
    const appSql = connect(appUrl, { applicationName: "shoal test app", max: 1 });
    try {
      await assertRejects(() => appSql`create table shoal.not_allowed (id integer)`);
    } finally {
      await appSql.end({ timeout: 5 });
    }
    const commands = [
      ["schedule", "add", "every-second", "--cron", "* * * * * *", "--task", "shoal.noop"],
      ["enqueue", "--task", "shoal.fail", "--max-attempts", "1"],
      [
        "enqueue",
        "--task",
        "shoal.chord",
        "--payload",
        JSON.stringify({
          children: [{ task: "shoal.noop" }, { task: "shoal.noop" }],
          callback: { task: "shoal.noop" },
        }),
      ],
    ];
    for (const args of commands) {
      const result = await runShoal(args, { url: appUrl });
      assertEquals(result.code, 0, `shoal ${args[0]} as ${app}: ${result.stderr}`);
    }
    await using proc = spawnShoal([
      "--role",
      "all",
      "--poll-interval",
      "100ms",
      "--shutdown-grace",
      "1s",
      "--lease",
      "2s",
      "--interval",
      "200ms",
    ], { url: appUrl });
    await waitFor("the app role to run jobs, the fan-out and the schedule", async () => {
      const [row] = await db.sql<{ done: boolean }[]>`
        select (select count(*) from shoal.dead_jobs) = 1
          and (select count(*) from shoal.executions where status = 'completed') = 1
          and (select count(*) from shoal.schedules where last_run_at is not null) = 1
          as done`;
      return row?.done;
    }, 20_000);
    for (const args of [["status", "--json"], ["dead", "list"]]) {
      const result = await runShoal(args, { url: appUrl });
      assertEquals(result.code, 0, `shoal ${args[0]} as ${app}: ${result.stderr}`);
    }
    proc.kill("SIGTERM");
    const { code, output } = await exitWithin(proc, 20_000);
    assertEquals(code, 0, output);
    // The one expected error is shoal.fail's; anything refused by Postgres shows as 42501.
    const refused = logLines(output).filter((l) =>
      /permission denied|42501/.test(JSON.stringify(l))
    );
    assertEquals(refused, [], "nothing was refused to the app role");
  } finally {
    await dropRoles([owner, app]);
  }
});
