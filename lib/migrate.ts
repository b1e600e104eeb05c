/**
 * Migrations, of two kinds, applied by `migrate()` in ONE transaction:
 *
 * - Numbered migrations, `sql/NNN_name.sql`: schema changes only (DDL, backfills), applied
 *   once each, in order, recorded with a SHA-256 checksum in `shoal.migrations`; an
 *   applied one is never edited. `sql/001..008` also define functions (applied in the
 *   wild, so kept byte-identical); from 009 on a numbered migration holds no function.
 * - Function files, `sql/functions/*.sql`: every shoal function, trigger function and view,
 *   each with its one live definition, written as idempotent `create or replace`. After the
 *   pending numbered migrations, a file whose checksum differs from the one recorded in
 *   `shoal.function_files` is applied again, in the order of `sql/functions.lock`.
 *
 * Versions of the function files are ordered by the revision in `sql/functions.lock` (a
 * test checks that the lock's checksums are the files'; whoever edits a function bumps the
 * revision). The database records the revision that last applied its functions, so during a
 * rolling deploy an older binary neither downgrades the functions a newer one installed
 * (`migrate()` leaves them and logs it) nor refuses to start (`checkSchema()` logs it);
 * a binary newer than the database's functions is told to run `shoal migrate`. The same
 * revision with other text (an edit released without a bump) is refused by both: either
 * side could be the older one.
 *
 * Everything pending commits in ONE transaction: the function files never run against a
 * schema their migrations have not reached, and a failure leaves the database as it was.
 * A migration therefore cannot depend on an earlier one having committed (an enum value
 * added by `alter type ... add value` is unusable until commit: add and use it in two
 * releases), and `create index concurrently` has no place in a migration.
 *
 * Concurrent migrators serialise on a transaction-scoped advisory lock (safe behind
 * PgBouncer in transaction mode): the second one waits, then finds the work done.
 *
 * @module
 */
import {
  checkArray,
  checkBoolean,
  checkDb,
  checkDirectoryUrl,
  checkInteger,
  checkObject,
  checkOptions,
  checkPool,
  checkString,
} from "./args.ts";
import type { Db, Sql } from "./db.ts";
import { describeError, logger } from "./log.ts";
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
import sql009 from "../sql/009_task_catalog.sql" with { type: "text" };
import sql010 from "../sql/010_started_at.sql" with { type: "text" };
import sql011 from "../sql/011_schedule_backfill.sql" with { type: "text" };
import sql012 from "../sql/012_queue_heads.sql" with { type: "text" };
import sql013 from "../sql/013_counts.sql" with { type: "text" };
import sql014 from "../sql/014_claim_index_id.sql" with { type: "text" };
import sql015 from "../sql/015_flow.sql" with { type: "text" };
import sql016 from "../sql/016_flow_slots.sql" with { type: "text" };
import sql017 from "../sql/017_flow_tasks.sql" with { type: "text" };
import sql018 from "../sql/018_traceparent.sql" with { type: "text" };
import sql019 from "../sql/019_consumer_totals.sql" with { type: "text" };
import sql020 from "../sql/020_steps.sql" with { type: "text" };
import sql021 from "../sql/021_progress.sql" with { type: "text" };
import sql022 from "../sql/022_flow_rules.sql" with { type: "text" };
import sql023 from "../sql/023_execution_keys.sql" with { type: "text" };
import sql024 from "../sql/024_dependencies.sql" with { type: "text" };
import sql025 from "../sql/025_events.sql" with { type: "text" };
// The function files and their lock, embedded for the same reason.
import functionsLock from "../sql/functions.lock" with { type: "text" };
import fnClaim from "../sql/functions/claim.sql" with { type: "text" };
import fnCounts from "../sql/functions/counts.sql" with { type: "text" };
import fnEvents from "../sql/functions/events.sql" with { type: "text" };
import fnFlow from "../sql/functions/flow.sql" with { type: "text" };
import fnQueue from "../sql/functions/queue.sql" with { type: "text" };
import fnSqlTask from "../sql/functions/sql_task.sql" with { type: "text" };
import fnSteps from "../sql/functions/steps.sql" with { type: "text" };
import fnWake from "../sql/functions/wake.sql" with { type: "text" };
import fnWorkflow from "../sql/functions/workflow.sql" with { type: "text" };

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
  "009_task_catalog.sql": sql009,
  "010_started_at.sql": sql010,
  "011_schedule_backfill.sql": sql011,
  "012_queue_heads.sql": sql012,
  "013_counts.sql": sql013,
  "014_claim_index_id.sql": sql014,
  "015_flow.sql": sql015,
  "016_flow_slots.sql": sql016,
  "017_flow_tasks.sql": sql017,
  "018_traceparent.sql": sql018,
  "019_consumer_totals.sql": sql019,
  "020_steps.sql": sql020,
  "021_progress.sql": sql021,
  "022_flow_rules.sql": sql022,
  "023_execution_keys.sql": sql023,
  "024_dependencies.sql": sql024,
  "025_events.sql": sql025,
};

/** The text of every function file, by file name (in `sql/functions/`), as shipped. */
export const EMBEDDED_FUNCTIONS: Readonly<Record<string, string>> = {
  "claim.sql": fnClaim,
  "counts.sql": fnCounts,
  "events.sql": fnEvents,
  "flow.sql": fnFlow,
  "queue.sql": fnQueue,
  "sql_task.sql": fnSqlTask,
  "steps.sql": fnSteps,
  "wake.sql": fnWake,
  "workflow.sql": fnWorkflow,
};

/** The text of `sql/functions.lock`, as shipped. */
export const EMBEDDED_FUNCTIONS_LOCK: string = functionsLock;

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

/** One file of `sql/functions/`. */
export interface FunctionFile {
  name: string;
  sql: string;
  /** SHA-256 of the text, as computed here (not as the lock says). */
  checksum: string;
}

/** The function files of one binary, in the order they are applied, with its revision. */
export interface FunctionSet {
  /** The revision of `sql/functions.lock`: orders versions of the function files. */
  revision: number;
  files: FunctionFile[];
  /** The checksum the lock records for each file (tests compare it with `files`). */
  locked: Readonly<Record<string, string>>;
}

/**
 * No function files: `migrate(sql, migrations, NO_FUNCTIONS)` applies numbered migrations
 * only, as shoal's migrator did before function files existed (tests rebuild the databases
 * of earlier releases with it).
 */
export const NO_FUNCTIONS: FunctionSet = Object.freeze({ revision: 0, files: [], locked: {} });

/** A function file as recorded in the database. */
export interface AppliedFunctionFile {
  name: string;
  checksum: string;
  revision: number;
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

/** The database's functions are older than this binary's (a kind of schema behind). */
export class FunctionsBehindError extends SchemaBehindError {
  override name = "FunctionsBehindError";
}

/**
 * The database's functions and this binary's have the same revision and different text: a
 * function file changed without a revision bump. Neither side can tell which is newer, so
 * migrate refuses to overwrite (it could be a downgrade) and roles refuse to start.
 */
export class FunctionsConflictError extends Error {
  override name = "FunctionsConflictError";
}

/** The files whose recorded checksum is not this binary's (missing ones included). */
function differingFiles(recorded: AppliedFunctionFile[], functions: FunctionSet): string[] {
  const byName = new Map(recorded.map((row) => [row.name, row.checksum]));
  return functions.files.filter((f) => byName.get(f.name) !== f.checksum).map((f) => f.name);
}

function conflict(what: string, revision: number, files: string[]): FunctionsConflictError {
  return new FunctionsConflictError(
    `${what}: database functions at revision ${revision} differ from this shoal's revision ${revision} (${
      files.join(", ")
    }): a function file changed without a revision bump in sql/functions.lock`,
  );
}

async function sha256(text: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Throw unless `migrations` is what loadMigrations() returns. */
function checkMigrations(fn: string, migrations: unknown): void {
  const what = "the migrations loadMigrations() returns";
  checkArray(fn, "migrations", migrations, what);
  (migrations as unknown[]).forEach((m, i) => {
    checkObject(fn, `migrations[${i}]`, m, { what: "a migration from loadMigrations()" });
    const { version, sql, checksum } = m as Migration;
    checkInteger(fn, `migrations[${i}].version`, version, { min: 1, max: 999 });
    checkString(fn, `migrations[${i}].sql`, sql);
    checkString(fn, `migrations[${i}].checksum`, checksum);
  });
}

/** Throw unless `functions` is a function set (or undefined: the embedded one). */
function checkFunctionSet(fn: string, arg: string, functions: unknown): void {
  checkObject(fn, arg, functions, { optional: true, what: "a function set, or undefined" });
  if (functions === undefined) return;
  const { revision, files } = functions as FunctionSet;
  checkInteger(fn, `${arg}.revision`, revision, { min: 0, max: Number.MAX_SAFE_INTEGER });
  checkArray(fn, `${arg}.files`, files, "an array of function files");
}

/**
 * The migrations, in order: the embedded ones, or the `.sql` files of `dir` when given.
 */
export async function loadMigrations(dir?: URL): Promise<Migration[]> {
  checkDirectoryUrl("loadMigrations", "dir", dir, { optional: true });
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

const LOCK_REVISION = /^revision (\d+)$/;
const LOCK_FILE = /^([a-z0-9_]+\.sql) ([0-9a-f]{64})$/;

/**
 * Read `sql/functions.lock`: `revision N`, then one `file.sql <sha256>` line per function
 * file in the order they are applied; `#` starts a comment line.
 */
function parseLock(
  text: string,
): { revision: number; order: string[]; locked: Record<string, string> } {
  let revision: number | null = null;
  const order: string[] = [];
  const locked: Record<string, string> = {};
  for (const [i, raw] of text.split("\n").entries()) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) continue;
    const rev = LOCK_REVISION.exec(line);
    const file = LOCK_FILE.exec(line);
    if (rev && revision === null) revision = Number(rev[1]);
    else if (file && !(file[1]! in locked)) {
      order.push(file[1]!);
      locked[file[1]!] = file[2]!;
    } else {
      throw new Error(
        `Cannot read sql/functions.lock line ${
          i + 1
        }: expected "revision N" once, then "name.sql <sha256>" once per file`,
      );
    }
  }
  if (revision === null || revision < 1) {
    throw new Error('Cannot read sql/functions.lock: no "revision N" line (N from 1)');
  }
  return { revision, order, locked };
}

/**
 * The function files, in the lock's order, with the lock's revision: the embedded ones, or
 * those of `dir` (`dir/functions/*.sql` and `dir/functions.lock`) when given. Refuses a file
 * the lock does not list, or a listed file that is missing.
 */
export async function loadFunctions(dir?: URL): Promise<FunctionSet> {
  const texts = dir
    ? Object.fromEntries(await readMigrationFiles(new URL("functions/", dir)))
    : EMBEDDED_FUNCTIONS;
  const lockText = dir
    ? await Deno.readTextFile(new URL("functions.lock", dir))
    : EMBEDDED_FUNCTIONS_LOCK;
  const { revision, order, locked } = parseLock(lockText);
  const unlisted = Object.keys(texts).filter((name) => !(name in locked));
  const missing = order.filter((name) => !(name in texts));
  if (unlisted.length || missing.length) {
    throw new Error(
      `Cannot load sql/functions: ${
        [
          ...unlisted.map((n) => `${n} is not in sql/functions.lock`),
          ...missing.map((n) => `${n} is missing`),
        ]
          .join(", ")
      }`,
    );
  }
  const files: FunctionFile[] = [];
  for (const name of order) {
    const sql = texts[name]!;
    files.push({ name, sql, checksum: await sha256(sql) });
  }
  return { revision, files, locked };
}

/** The function files recorded in the database; empty when none was ever applied. */
export async function appliedFunctionFiles(db: Db): Promise<AppliedFunctionFile[]> {
  const [exists] = await db<{ present: boolean }[]>`
    select to_regclass('shoal.function_files') is not null as present`;
  if (!exists?.present) return [];
  return await db<AppliedFunctionFile[]>`
    select name, checksum, revision, applied_at from shoal.function_files order by name`;
}

/** The revision that last applied the database's functions: 0 when none was recorded. */
function recordedRevision(rows: AppliedFunctionFile[]): number {
  return rows.reduce((max, row) => Math.max(max, row.revision), 0);
}

interface FunctionsOutcome {
  /** The files applied by this call. */
  applied: string[];
  /** The database's revision when it is newer than this binary's (nothing was applied). */
  newer: number | null;
}

/**
 * Inside the migration transaction: apply the function files whose checksum differs from
 * the one recorded, unless a newer binary recorded a higher revision (never downgrade), and
 * record what the database now holds.
 */
async function applyFunctions(tx: Db, functions: FunctionSet): Promise<FunctionsOutcome> {
  const recorded = await appliedFunctionFiles(tx);
  const current = recordedRevision(recorded);
  if (current > functions.revision) return { applied: [], newer: current };
  if (current === functions.revision) {
    const differ = differingFiles(recorded, functions);
    if (differ.length > 0) throw conflict("Cannot migrate", current, differ);
  }
  const byName = new Map(recorded.map((row) => [row.name, row]));
  const applied: string[] = [];
  for (const file of functions.files) {
    if (byName.get(file.name)?.checksum === file.checksum) continue;
    try {
      await tx.unsafe(file.sql);
    } catch (error) {
      // Name the file: the server's message alone does not say which one failed. The whole
      // migration rolls back, so the database keeps the functions it had.
      throw new Error(`Cannot apply sql/functions/${file.name}: ${describeError(error)}`, {
        cause: error,
      });
    }
    applied.push(file.name);
  }
  const names = functions.files.map((f) => f.name);
  const upToDate = applied.length === 0 && recorded.length === names.length &&
    recorded.every((row) => row.revision === functions.revision);
  if (!upToDate) {
    // An unchanged file keeps its applied_at: it records when its text was last applied.
    await tx`
      insert into shoal.function_files as f (name, checksum, revision)
      select * from unnest(${names}::text[], ${functions.files.map((f) => f.checksum)}::text[],
                           array_fill(${functions.revision}::integer, array[${names.length}::integer]))
      on conflict (name) do update
      set checksum = excluded.checksum, revision = excluded.revision,
          applied_at = case when f.checksum = excluded.checksum then f.applied_at else now() end`;
    await tx`delete from shoal.function_files where name <> all(${names}::text[])`;
  }
  return { applied, newer: null };
}

/** What one `migrate()` call changed: nothing when another migrator got there first. */
export interface MigrateResult {
  /** Versions of the numbered migrations applied, in order. */
  migrations: number[];
  /** Function files (re-)applied because their text differed from the recorded one. */
  functionFiles: string[];
}

/**
 * Apply every pending migration, then every function file whose checksum differs from the
 * recorded one, in one transaction. Returns what this call applied. Refuses if an applied
 * migration's file changed. `functions` defaults to the embedded ones.
 */
export async function migrate(
  sql: Sql,
  migrations: Migration[],
  functions?: FunctionSet,
): Promise<MigrateResult> {
  checkPool("migrate", sql);
  checkMigrations("migrate", migrations);
  checkFunctionSet("migrate", "functions", functions);
  const log = logger("migrate");
  const fns = functions ?? await loadFunctions();
  const { applied, outcome } = await sql.begin(async (tx) => {
    await tx`select pg_advisory_xact_lock(${MIGRATION_LOCK_KEY}::bigint)`;
    await tx.unsafe(`
      create schema if not exists shoal;
      create table if not exists shoal.migrations (
        version integer primary key,
        name text not null,
        checksum text not null,
        applied_at timestamptz not null default now()
      );
      create table if not exists shoal.function_files (
        name text primary key,
        checksum text not null,
        revision integer not null,
        applied_at timestamptz not null default now()
      );`);
    const done = await appliedMigrations(tx);
    for (const row of done) checkUnchanged(row, migrations[row.version - 1]);
    const versions = new Set(done.map((row) => row.version));
    const applied: Migration[] = [];
    for (const migration of migrations) {
      if (versions.has(migration.version)) continue;
      await tx.unsafe(migration.sql);
      await tx`
        insert into shoal.migrations (version, name, checksum)
        values (${migration.version}, ${migration.name}, ${migration.checksum})`;
      applied.push(migration);
    }
    return { applied, outcome: await applyFunctions(tx, fns) };
  });
  for (const migration of applied) {
    log.info("Applied migration {version} {name}", {
      version: migration.version,
      name: migration.name,
    });
  }
  for (const file of outcome.applied) {
    log.info("Applied function file {file} (revision {revision})", {
      file,
      revision: fns.revision,
    });
  }
  if (outcome.newer !== null) {
    log.warn(
      "Database functions are at revision {current}, newer than this binary's {latest}: left as they are",
      { current: outcome.newer, latest: fns.revision },
    );
  }
  return { migrations: applied.map((m) => m.version), functionFiles: outcome.applied };
}

/** For people, a line per kind: what `migrate()` did (`shoal migrate`, `shoal dev`). */
export function describeMigration(result: MigrateResult): string {
  const parts: string[] = [];
  if (result.migrations.length > 0) {
    parts.push(`Applied migrations: ${result.migrations.join(", ")}`);
  }
  if (result.functionFiles.length > 0) {
    parts.push(`Applied function files: ${result.functionFiles.join(", ")}`);
  }
  return parts.length > 0 ? parts.join("\n") : "Schema is up to date";
}

/** What `checkSchema()` checks against, and how its error tells the user to catch up. */
export interface CheckSchemaOptions {
  /** The function files to expect (default: the embedded ones). */
  functions?: FunctionSet;
  /**
   * The caller accepts `--migrate` (the roles do): the error suggests it beside
   * `shoal migrate`. Admin commands do not, and their error names only the command.
   */
  migrateFlag?: boolean;
}

/**
 * Check that the database schema is current before a role or a command uses it. Throws
 * SchemaBehindError ("run shoal migrate") when migrations are pending,
 * FunctionsBehindError (one) when the database's functions are older than this binary's
 * (a lower revision), FunctionsConflictError when they have this binary's revision and
 * other text (migrate refuses that too), MigrationChangedError when a file was edited
 * after it was applied. A schema or functions newer than this binary are logged and
 * allowed: migrations only add, and a newer binary's functions keep the contract older
 * binaries call.
 */
export async function checkSchema(
  db: Db,
  migrations: Migration[],
  options: CheckSchemaOptions = {},
): Promise<void> {
  checkDb("checkSchema", db);
  checkMigrations("checkSchema", migrations);
  checkOptions("checkSchema", options);
  checkFunctionSet("checkSchema", "options.functions", options.functions);
  checkBoolean("checkSchema", "options.migrateFlag", options.migrateFlag, { optional: true });
  const hint = options.migrateFlag
    ? "run shoal migrate (or start with --migrate)"
    : "run shoal migrate";
  const done = await appliedMigrations(db);
  for (const row of done) checkUnchanged(row, migrations[row.version - 1]);
  const current = done.length === 0 ? 0 : done[done.length - 1]!.version;
  const latest = migrations.length;
  if (current < latest) {
    throw new SchemaBehindError(
      `Database schema is at version ${current}, this shoal needs ${latest}: ${hint}`,
    );
  }
  if (current > latest) {
    logger("migrate").warn(
      "Database schema is at version {current}, newer than this binary's {latest}",
      { current, latest },
    );
  }
  await checkFunctions(db, options.functions ?? await loadFunctions(), hint);
}

async function checkFunctions(db: Db, functions: FunctionSet, hint: string): Promise<void> {
  const recorded = await appliedFunctionFiles(db);
  const current = recordedRevision(recorded);
  const latest = functions.revision;
  if (current > latest) {
    logger("migrate").warn(
      "Database functions are at revision {current}, newer than this binary's {latest}",
      { current, latest },
    );
    return;
  }
  if (current < latest) {
    throw new FunctionsBehindError(
      `Database functions are at revision ${current}, this shoal needs ${latest}: ${hint}`,
    );
  }
  const differ = differingFiles(recorded, functions);
  if (differ.length > 0) throw conflict("Cannot start", latest, differ);
}
