/**
 * Schema migrations: `sql/NNN_name.sql`, applied in order, each in its own transaction,
 * recorded with a SHA-256 checksum in `shoal.migrations`. Concurrent migrators serialise
 * on a transaction-scoped advisory lock (safe behind PgBouncer in transaction mode): the
 * second one waits, then finds the work done.
 *
 * @module
 */
import type { Db, Sql } from "./db.ts";
import { logger } from "./log.ts";
// The migrations are part of the module graph, so `deno bundle` (one JS file, no sql/ beside
// it) and `deno compile` carry them. A new sql/ file is added here too: tests/bundle_test.ts
// fails while this list and the directory differ.
import sql001 from "../sql/001_queue.sql" with { type: "text" };
import sql002 from "../sql/002_leases_schedules.sql" with { type: "text" };
import sql003 from "../sql/003_executions.sql" with { type: "text" };
import sql004 from "../sql/004_claim.sql" with { type: "text" };
import sql005 from "../sql/005_fan_out_fast.sql" with { type: "text" };
import sql006 from "../sql/006_enqueue_fast.sql" with { type: "text" };
import sql007 from "../sql/007_sql_task.sql" with { type: "text" };
import sql008 from "../sql/008_fair_burst.sql" with { type: "text" };

/** The text of every migration file, by file name, as shipped in this module graph. */
export const EMBEDDED_MIGRATIONS: Readonly<Record<string, string>> = {
  "001_queue.sql": sql001,
  "002_leases_schedules.sql": sql002,
  "003_executions.sql": sql003,
  "004_claim.sql": sql004,
  "005_fan_out_fast.sql": sql005,
  "006_enqueue_fast.sql": sql006,
  "007_sql_task.sql": sql007,
  "008_fair_burst.sql": sql008,
};

export interface Migration {
  version: number;
  name: string;
  sql: string;
  checksum: string;
}

export interface AppliedMigration {
  version: number;
  name: string;
  checksum: string;
  applied_at: Date;
}

/** Advisory lock key for migrations: "shoal" + 1, fixed for all time. */
const MIGRATION_LOCK_KEY = 0x73686f616c01;
const FILE_PATTERN = /^(\d{3})_([a-z0-9_]+)\.sql$/;

/** A migration file that was applied and then changed. */
export class MigrationChangedError extends Error {
  override name = "MigrationChangedError";
}

/** The database schema is older than this binary. */
export class SchemaBehindError extends Error {
  override name = "SchemaBehindError";
}

async function sha256(text: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * The migrations, in order: the embedded ones, or the `.sql` files of `dir` when given.
 */
export async function loadMigrations(dir?: URL): Promise<Migration[]> {
  const files = dir ? await readMigrationFiles(dir) : Object.entries(EMBEDDED_MIGRATIONS);
  const migrations: Migration[] = [];
  for (const [file, sql] of files) {
    const match = FILE_PATTERN.exec(file);
    if (!match) {
      throw new Error(`Cannot load migration "${file}": expected a name like 001_queue.sql`);
    }
    migrations.push({
      version: Number(match[1]),
      name: match[2]!,
      sql,
      checksum: await sha256(sql),
    });
  }
  migrations.sort((a, b) => a.version - b.version);
  migrations.forEach((m, i) => {
    if (m.version !== i + 1) {
      throw new Error(`Cannot load migrations: expected version ${i + 1}, found ${m.version}`);
    }
  });
  return migrations;
}

async function readMigrationFiles(dir: URL): Promise<[string, string][]> {
  const files: [string, string][] = [];
  for await (const entry of Deno.readDir(dir)) {
    if (!entry.isFile || !entry.name.endsWith(".sql")) continue;
    files.push([entry.name, await Deno.readTextFile(new URL(entry.name, dir))]);
  }
  return files;
}

/** The migrations recorded in the database; empty when shoal was never installed. */
export async function appliedMigrations(db: Db): Promise<AppliedMigration[]> {
  const [exists] = await db<{ present: boolean }[]>`
    select to_regclass('shoal.migrations') is not null as present`;
  if (!exists?.present) return [];
  return await db<AppliedMigration[]>`
    select version, name, checksum, applied_at from shoal.migrations order by version`;
}

function checkUnchanged(applied: AppliedMigration, file: Migration | undefined): void {
  if (file && file.checksum !== applied.checksum) {
    throw new MigrationChangedError(
      `Cannot migrate: migration ${
        String(applied.version).padStart(3, "0")
      }_${applied.name} was applied with a different checksum; applied migrations must never be edited, add a new one`,
    );
  }
}

/**
 * Apply every pending migration. Returns the versions this call applied (none when
 * another migrator got there first). Refuses if an applied migration's file changed.
 */
export async function migrate(sql: Sql, migrations: Migration[]): Promise<number[]> {
  const log = logger("migrate");
  const applied: number[] = [];
  for (const migration of migrations) {
    const didApply = await sql.begin(async (tx) => {
      await tx`select pg_advisory_xact_lock(${MIGRATION_LOCK_KEY}::bigint)`;
      await tx.unsafe(`
        create schema if not exists shoal;
        create table if not exists shoal.migrations (
          version integer primary key,
          name text not null,
          checksum text not null,
          applied_at timestamptz not null default now()
        );`);
      const done = await appliedMigrations(tx);
      for (const row of done) checkUnchanged(row, migrations[row.version - 1]);
      if (done.some((row) => row.version === migration.version)) return false;
      await tx.unsafe(migration.sql);
      await tx`
        insert into shoal.migrations (version, name, checksum)
        values (${migration.version}, ${migration.name}, ${migration.checksum})`;
      return true;
    });
    if (didApply) {
      applied.push(migration.version);
      log.info("Applied migration {version} {name}", {
        version: migration.version,
        name: migration.name,
      });
    }
  }
  return applied;
}

/**
 * Check at role start that the database schema is current. Throws SchemaBehindError
 * ("run shoal migrate") when migrations are pending, MigrationChangedError when a file
 * was edited after it was applied. A schema ahead of this binary is logged and allowed:
 * migrations only add.
 */
export async function checkSchema(db: Db, migrations: Migration[]): Promise<void> {
  const done = await appliedMigrations(db);
  for (const row of done) checkUnchanged(row, migrations[row.version - 1]);
  const current = done.length === 0 ? 0 : done[done.length - 1]!.version;
  const latest = migrations.length;
  if (current < latest) {
    throw new SchemaBehindError(
      `Database schema is at version ${current}, this shoal needs ${latest}: run shoal migrate (or start with --migrate)`,
    );
  }
  if (current > latest) {
    logger("migrate").warn(
      "Database schema is at version {current}, newer than this binary's {latest}",
      { current, latest },
    );
  }
}
