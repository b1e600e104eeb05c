/**
 * Test support: a fresh database per test (cloned from the migrated template that
 * `deno task test` prepares), real `main.ts` processes, and polling waits.
 * A missing DATABASE_URL fails the test: nothing here ever skips.
 */
import postgres from "postgres";
import { connect, type Sql } from "../lib/db.ts";
import { loadMigrations, migrate } from "../lib/migrate.ts";

export const TEMPLATE_DB = "shoal_test_template";
const ROOT = new URL("../", import.meta.url);

function baseUrl(): string {
  const url = Deno.env.get("DATABASE_URL");
  if (!url) {
    throw new Error("DATABASE_URL is not set: run the suite with `deno task test`");
  }
  return url;
}

function withDatabase(url: string, db: string): string {
  const u = new URL(url);
  u.pathname = `/${db}`;
  return u.toString();
}

export interface TestDb {
  sql: Sql;
  url: string;
  name: string;
  [Symbol.asyncDispose](): Promise<void>;
}

/** A new, migrated database of its own; dropped on dispose (`await using db = await testDb()`). */
export async function testDb(): Promise<TestDb> {
  const name = `shoal_t_${crypto.randomUUID().replaceAll("-", "").slice(0, 16)}`;
  const admin = postgres(baseUrl(), { max: 1, onnotice: () => {} });
  const template = Deno.env.get("SHOAL_TEST_TEMPLATE");
  try {
    if (template) await admin`create database ${admin(name)} template ${admin(template)}`;
    else await admin`create database ${admin(name)}`;
  } finally {
    await admin.end();
  }
  const url = withDatabase(baseUrl(), name);
  const sql = connect(url, { applicationName: "shoal test", max: 10 });
  if (!template) await migrate(sql, await loadMigrations());
  return {
    sql,
    url,
    name,
    async [Symbol.asyncDispose]() {
      await sql.end({ timeout: 5 });
      const admin = postgres(baseUrl(), { max: 1, onnotice: () => {} });
      try {
        await admin`drop database if exists ${admin(name)} with (force)`;
      } finally {
        await admin.end();
      }
    },
  };
}

/** A database with no shoal schema at all. */
export async function emptyDb(): Promise<TestDb> {
  const name = `shoal_e_${crypto.randomUUID().replaceAll("-", "").slice(0, 16)}`;
  const admin = postgres(baseUrl(), { max: 1, onnotice: () => {} });
  try {
    await admin`create database ${admin(name)}`;
  } finally {
    await admin.end();
  }
  const url = withDatabase(baseUrl(), name);
  const sql = connect(url, { applicationName: "shoal test", max: 10 });
  return {
    sql,
    url,
    name,
    async [Symbol.asyncDispose]() {
      await sql.end({ timeout: 5 });
      const admin = postgres(baseUrl(), { max: 1, onnotice: () => {} });
      try {
        await admin`drop database if exists ${admin(name)} with (force)`;
      } finally {
        await admin.end();
      }
    },
  };
}

/** Poll until `check` returns a truthy value, or fail after `timeoutMs`. */
export async function waitFor<T>(
  what: string,
  check: () => T | Promise<T>,
  timeoutMs = 10_000,
  everyMs = 50,
): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const value = await check();
      if (value) return value as NonNullable<T>;
    } catch (error) {
      last = error;
    }
    await new Promise((r) => setTimeout(r, everyMs));
  }
  throw new Error(`Timed out after ${timeoutMs} ms waiting for ${what}`, { cause: last });
}

export interface ShoalProcess {
  child: Deno.ChildProcess;
  /** Everything written to stdout and stderr so far. */
  output(): string;
  /** Send a signal (no-op if it already exited). */
  kill(signal?: Deno.Signal): void;
  /** Wait for exit; resolves with the status and the full output. */
  exited(): Promise<{ code: number; signal: Deno.Signal | null; output: string }>;
  [Symbol.asyncDispose](): Promise<void>;
}

/**
 * Start `deno run -A main.ts ...args` as a real process (Deno.execPath(), not a wrapper
 * that would swallow signals), with DATABASE_URL pointing at `url`.
 */
export function spawnShoal(
  args: string[],
  options: { url?: string; env?: Record<string, string>; mainModule?: string } = {},
): ShoalProcess {
  const env: Record<string, string> = { ...options.env };
  if (options.url) env.DATABASE_URL = options.url;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", options.mainModule ?? new URL("main.ts", ROOT).pathname, ...args],
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let text = "";
  const decoder = new TextDecoder();
  const pump = async (stream: ReadableStream<Uint8Array>) => {
    for await (const chunk of stream) text += decoder.decode(chunk, { stream: true });
  };
  const pumped = Promise.all([pump(child.stdout), pump(child.stderr)]);
  let exited: Promise<{ code: number; signal: Deno.Signal | null; output: string }> | null = null;
  const proc: ShoalProcess = {
    child,
    output: () => text,
    kill(signal: Deno.Signal = "SIGTERM") {
      try {
        child.kill(signal);
      } catch (error) {
        if (!(error instanceof TypeError)) throw error; // already exited
      }
    },
    exited() {
      exited ??= (async () => {
        const status = await child.status;
        await pumped;
        return { code: status.code, signal: status.signal, output: text };
      })();
      return exited;
    },
    async [Symbol.asyncDispose]() {
      proc.kill("SIGKILL");
      await proc.exited();
    },
  };
  return proc;
}

/** Parsed JSON log lines from a process's output (non-JSON lines skipped). */
export function logLines(output: string): Record<string, unknown>[] {
  const lines: Record<string, unknown>[] = [];
  for (const line of output.split("\n")) {
    if (!line.startsWith("{")) continue;
    try {
      lines.push(JSON.parse(line));
    } catch {
      // A line that merely starts with "{" but is not a log record: not ours to parse.
    }
  }
  return lines;
}
