import { assert, assertEquals, assertRejects } from "./assert.ts";
import {
  appliedFunctionFiles,
  appliedMigrations,
  checkSchema,
  FunctionsBehindError,
  FunctionsConflictError,
  type FunctionSet,
  loadFunctions,
  loadMigrations,
  migrate,
  MigrationChangedError,
  NO_FUNCTIONS,
  SchemaBehindError,
} from "../lib/migrate.ts";
import type { Db } from "../lib/db.ts";
import { emptyDb, runShoal, testDb } from "./helpers.ts";

Deno.test("migrate() applies every migration once and records checksums", async () => {
  await using db = await emptyDb();
  const migrations = await loadMigrations();
  await assertRejects(() => checkSchema(db.sql, migrations), SchemaBehindError);
  assertEquals((await migrate(db.sql, migrations)).migrations, migrations.map((m) => m.version));
  assertEquals((await migrate(db.sql, migrations)).migrations, []);
  const applied = await appliedMigrations(db.sql);
  assertEquals(applied.map((m) => m.checksum), migrations.map((m) => m.checksum));
  await checkSchema(db.sql, migrations);
});

Deno.test("migrate() refuses when an applied migration's file changed", async () => {
  await using db = await emptyDb();
  const migrations = await loadMigrations();
  await migrate(db.sql, migrations);
  const edited = migrations.map((m, i) => i === 0 ? { ...m, checksum: "0".repeat(64) } : m);
  await assertRejects(() => migrate(db.sql, edited), MigrationChangedError, "001_queue");
  await assertRejects(() => checkSchema(db.sql, edited), MigrationChangedError);
});

Deno.test("migrate() run by two migrators at once applies each migration exactly once", async () => {
  await using db = await emptyDb();
  const migrations = await loadMigrations();
  const [a, b] = await Promise.all([migrate(db.sql, migrations), migrate(db.sql, migrations)]);
  assertEquals(
    [...a.migrations, ...b.migrations].sort((x, y) => x - y),
    migrations.map((m) => m.version),
  );
});

// ---- Function files (sql/functions/, sql/functions.lock) --------------------------------

const SQL_DIR = new URL("../sql/", import.meta.url);
const FUNCTIONS_DIR = new URL("functions/", SQL_DIR);
/** The last numbered migration that may define functions (applied in the wild, frozen). */
const LAST_MIGRATION_WITH_FUNCTIONS = 8;
/** What the CI hook greps for in every non-migration sql file. */
const DEFINES = /create\s+(?:or\s+replace\s+)?function\s+shoal\.(\w+)/gi;

const ROOT = new URL("../", import.meta.url);

/** The .sql files of the tree, relative to `root`, but the migrations and function files. */
async function otherSqlFiles(root: URL, prefix = ""): Promise<string[]> {
  const found: string[] = [];
  for await (const entry of Deno.readDir(new URL(prefix || ".", root))) {
    const path = `${prefix}${entry.name}`;
    if (entry.isDirectory) {
      if ([".git", "dist", ".shoal", "node_modules", "sql/functions"].includes(path)) continue;
      found.push(...await otherSqlFiles(root, `${path}/`));
    } else if (entry.isFile && path.endsWith(".sql") && !/^sql\/\d{3}_/.test(path)) {
      found.push(path);
    }
  }
  return found;
}

async function sha256(text: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** A function set whose `name` file has `sql` instead, at `revision`. */
async function withFile(
  functions: FunctionSet,
  name: string,
  sql: string,
  revision: number,
): Promise<FunctionSet> {
  const checksum = await sha256(sql);
  return {
    ...functions,
    revision,
    files: functions.files.map((f) => f.name === name ? { name, sql, checksum } : f),
  };
}

/**
 * Everything a migration or a function file defines in the shoal schema, as Postgres
 * prints it back: functions, relations (with their options), columns, indexes,
 * constraints (of tables and domains), triggers, views and types.
 */
async function catalog(db: Db): Promise<Record<string, unknown[]>> {
  const functions = await db`
    select p.oid::regprocedure::text as name, pg_get_functiondef(p.oid) as definition
    from pg_proc p where p.pronamespace = 'shoal'::regnamespace order by 1`;
  const relations = await db`
    select c.relname, c.relkind, c.reloptions from pg_class c
    where c.relnamespace = 'shoal'::regnamespace order by 1`;
  const columns = await db`
    select c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod) as type,
      a.attnotnull, a.attidentity, pg_get_expr(d.adbin, d.adrelid) as default_value
    from pg_attribute a
    join pg_class c on c.oid = a.attrelid
    left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
    where c.relnamespace = 'shoal'::regnamespace and a.attnum > 0 and not a.attisdropped
    order by 1, 2`;
  const indexes = await db`
    select indexname, indexdef from pg_indexes where schemaname = 'shoal' order by 1`;
  const constraints = await db`
    select coalesce(conrelid::regclass::text, contypid::regtype::text) as owner, conname,
      pg_get_constraintdef(oid) as definition
    from pg_constraint where connamespace = 'shoal'::regnamespace order by 1, 2`;
  const triggers = await db`
    select tgrelid::regclass::text as owner, tgname, pg_get_triggerdef(oid) as definition
    from pg_trigger
    where not tgisinternal
      and tgrelid in (select oid from pg_class where relnamespace = 'shoal'::regnamespace)
    order by 1, 2`;
  const views = await db`
    select viewname, definition from pg_views where schemaname = 'shoal' order by 1`;
  const types = await db`
    select typname, typtype from pg_type where typnamespace = 'shoal'::regnamespace order by 1`;
  return {
    functions: [...functions],
    relations: [...relations],
    columns: [...columns],
    indexes: [...indexes],
    constraints: [...constraints],
    triggers: [...triggers],
    views: [...views],
    types: [...types],
  };
}

Deno.test("a fresh install and every step-by-step upgrade end with the same functions and tables", async () => {
  const migrations = await loadMigrations();
  await using fresh = await emptyDb();
  await migrate(fresh.sql, migrations);
  const expected = await catalog(fresh.sql);
  assert(expected.functions!.length > 20, `only ${expected.functions!.length} functions`);
  for (let reached = 1; reached <= migrations.length; reached++) {
    // A user who upgraded release by release up to `reached`, with the migrator of the time
    // (numbered migrations only, no function files), then runs today's migrator.
    await using upgraded = await emptyDb();
    for (let step = 1; step <= reached; step++) {
      await migrate(upgraded.sql, migrations.slice(0, step), NO_FUNCTIONS);
    }
    await upgraded.sql`drop table shoal.function_files`;
    await migrate(upgraded.sql, migrations);
    const got = await catalog(upgraded.sql);
    for (const kind of Object.keys(expected)) {
      assertEquals(got[kind], expected[kind], `${kind} after upgrading from ${reached}`);
    }
    await checkSchema(upgraded.sql, migrations);
  }
});

Deno.test("applying every function file again changes nothing (create or replace)", async () => {
  await using db = await testDb();
  const before = await catalog(db.sql);
  for (const file of (await loadFunctions()).files) await db.sql.unsafe(file.sql);
  assertEquals(await catalog(db.sql), before);
});

Deno.test("each shoal function is defined in exactly one function file, and nowhere else new", async () => {
  const { files } = await loadFunctions(SQL_DIR);
  const homes = new Map<string, string[]>();
  for (const file of files) {
    assert(
      !/create\s+function/i.test(file.sql),
      `${file.name}: "create function" is not idempotent`,
    );
    for (const [, name] of file.sql.matchAll(DEFINES)) {
      homes.set(name!, [...homes.get(name!) ?? [], file.name]);
    }
  }
  const twice = [...homes].filter(([, where]) => where.length > 1);
  assertEquals(twice, [], "functions defined more than once in sql/functions/");
  // As the CI hook sees it: no other .sql file of the tree (benchmarks, deploy) defines one.
  const elsewhere: string[] = [];
  for (const path of await otherSqlFiles(ROOT)) {
    const text = await Deno.readTextFile(new URL(path, ROOT));
    for (const [, name] of text.matchAll(DEFINES)) elsewhere.push(`${path}: shoal.${name}`);
  }
  assertEquals(elsewhere, [], "shoal functions defined outside sql/functions/");

  await using db = await testDb();
  const live = await db.sql<{ proname: string }[]>`
    select distinct proname from pg_proc where pronamespace = 'shoal'::regnamespace`;
  const homeless = live.map((r) => r.proname).filter((name) => !homes.has(name)).sort();
  assertEquals(homeless, [], "shoal functions in the database without a home in sql/functions/");
  const missing = [...homes.keys()].filter((name) => !live.some((r) => r.proname === name));
  assertEquals(missing, [], "functions of sql/functions/ missing from a migrated database");

  // From 009 on, numbered migrations hold schema changes only.
  for (const m of await loadMigrations(SQL_DIR)) {
    if (m.version <= LAST_MIGRATION_WITH_FUNCTIONS) continue;
    assert(
      !/create\s+(or\s+replace\s+)?function/i.test(m.sql),
      `migration ${m.version} defines a function: put it in sql/functions/ instead`,
    );
  }
});

Deno.test("sql/functions.lock lists every function file with its checksum", async () => {
  const functions = await loadFunctions(SQL_DIR);
  const actual = Object.fromEntries(functions.files.map((f) => [f.name, f.checksum]));
  const listed = [];
  for await (const entry of Deno.readDir(FUNCTIONS_DIR)) listed.push(entry.name);
  assertEquals(Object.keys(actual).sort(), listed.sort());
  assertEquals(
    functions.locked,
    actual,
    `sql/functions.lock is out of date: bump its revision to ${
      functions.revision + 1
    } (the database orders versions by it) and write these lines:\n` +
      functions.files.map((f) => `${f.name} ${f.checksum}`).join("\n"),
  );
});

Deno.test("migrate() re-applies a changed function file, and only that one", async () => {
  await using db = await testDb();
  const migrations = await loadMigrations();
  const functions = await loadFunctions();
  const before = await appliedFunctionFiles(db.sql);
  assertEquals(
    before.map((r) => [r.name, r.checksum, r.revision]),
    functions.files.map((f) => [f.name, f.checksum, functions.revision]).sort(),
  );
  assertEquals((await migrate(db.sql, migrations)).migrations, []);
  assertEquals(await appliedFunctionFiles(db.sql), before, "nothing changed, nothing applied");

  const wake = functions.files.find((f) => f.name === "wake.sql")!;
  const marked = wake.sql.replace(
    "select case when run_at is null",
    "select /* revision 2 */ case when run_at is null",
  );
  assert(marked !== wake.sql);
  const newer = await withFile(functions, "wake.sql", marked, functions.revision + 1);
  assertEquals((await migrate(db.sql, migrations, newer)).migrations, []);
  const [def] = await db.sql<{ text: string }[]>`
    select pg_get_functiondef('shoal.wake_payload(text, timestamptz)'::regprocedure) as text`;
  assert(def!.text.includes("/* revision 2 */"), def!.text);
  const after = await appliedFunctionFiles(db.sql);
  for (const row of after) {
    const old = before.find((b) => b.name === row.name)!;
    assertEquals(row.revision, functions.revision + 1);
    if (row.name === "wake.sql") {
      assertEquals(row.checksum, newer.files.find((f) => f.name === "wake.sql")!.checksum);
      assert(row.applied_at > old.applied_at, "wake.sql was applied again");
    } else {
      assertEquals([row.checksum, row.applied_at], [old.checksum, old.applied_at], row.name);
    }
  }
  await checkSchema(db.sql, migrations, { functions: newer });
});

Deno.test("an older binary neither downgrades a newer binary's functions nor refuses to start", async () => {
  await using db = await testDb();
  const migrations = await loadMigrations();
  const older = await loadFunctions();
  const wake = older.files.find((f) => f.name === "wake.sql")!;
  const newer = await withFile(
    older,
    "wake.sql",
    wake.sql.replace("select case when", "select /* newer */ case when"),
    older.revision + 1,
  );
  await migrate(db.sql, migrations, newer);
  const recorded = await appliedFunctionFiles(db.sql);

  // The older binary's migrate (say a role started with --migrate mid-deploy) leaves them.
  assertEquals((await migrate(db.sql, migrations, older)).migrations, []);
  assertEquals(await appliedFunctionFiles(db.sql), recorded);
  const [def] = await db.sql<{ text: string }[]>`
    select pg_get_functiondef('shoal.wake_payload(text, timestamptz)'::regprocedure) as text`;
  assert(def!.text.includes("/* newer */"), "the newer text stays");
  // ...and its roles start (a warning is logged).
  await checkSchema(db.sql, migrations, { functions: older });

  // A binary newer than the database is told to migrate.
  await assertRejects(
    () =>
      checkSchema(db.sql, migrations, {
        functions: { ...newer, revision: newer.revision + 1 },
      }),
    FunctionsBehindError,
    `Database functions are at revision ${newer.revision}, this shoal needs ${
      newer.revision + 1
    }: run shoal migrate`,
  );
  // One at the same revision whose text differs (an edit released without a revision bump)
  // may be older or newer: it neither starts nor overwrites the database's functions.
  const unbumped = { ...older, revision: newer.revision };
  await assertRejects(
    () => checkSchema(db.sql, migrations, { functions: unbumped }),
    FunctionsConflictError,
    `Cannot start: database functions at revision ${newer.revision} differ from this shoal's revision ${newer.revision} (wake.sql): a function file changed without a revision bump`,
  );
  await assertRejects(
    () => migrate(db.sql, migrations, unbumped),
    FunctionsConflictError,
    `Cannot migrate: database functions at revision ${newer.revision} differ`,
  );
  assertEquals(await appliedFunctionFiles(db.sql), recorded, "nothing was overwritten");
  const [kept] = await db.sql<{ text: string }[]>`
    select pg_get_functiondef('shoal.wake_payload(text, timestamptz)'::regprocedure) as text`;
  assert(kept!.text.includes("/* newer */"), "the newer text stays");
});

Deno.test("migrate() names a function file that fails, and changes nothing", async () => {
  await using db = await testDb();
  const migrations = await loadMigrations();
  const functions = await loadFunctions();
  const before = await catalog(db.sql);
  const broken = await withFile(
    functions,
    "workflow.sql",
    functions.files.find((f) => f.name === "workflow.sql")!.sql + "\ncreate or replace nonsense;\n",
    functions.revision + 1,
  );
  const error = await assertRejects(
    () => migrate(db.sql, migrations, broken),
    Error,
    "Cannot apply sql/functions/workflow.sql: PostgresError: syntax error",
  );
  assert(!error.message.includes("\n"), error.message);
  assert(error.cause instanceof Error, "the server's error is its cause");
  assertEquals(await catalog(db.sql), before);
  assertEquals(
    (await appliedFunctionFiles(db.sql)).map((r) => r.revision),
    functions.files.map(() => functions.revision),
  );
});

Deno.test("checkSchema() asks for shoal migrate when the functions were never installed", async () => {
  await using db = await emptyDb();
  const migrations = await loadMigrations();
  await migrate(db.sql, migrations, NO_FUNCTIONS);
  const error = await assertRejects(
    () => checkSchema(db.sql, migrations),
    FunctionsBehindError,
    "Database functions are at revision 0, this shoal needs",
  );
  assert(error instanceof SchemaBehindError, "callers that handle SchemaBehindError handle it");
  await migrate(db.sql, migrations);
  await checkSchema(db.sql, migrations);
});

Deno.test("two migrators at once apply the function files exactly once", async () => {
  await using db = await emptyDb();
  const migrations = await loadMigrations();
  const functions = await loadFunctions();
  await Promise.all([migrate(db.sql, migrations), migrate(db.sql, migrations)]);
  const rows = await appliedFunctionFiles(db.sql);
  assertEquals(rows.map((r) => r.name), functions.files.map((f) => f.name).sort());
  assertEquals(new Set(rows.map((r) => r.applied_at.getTime())).size, 1, "one transaction");
  await checkSchema(db.sql, migrations);
});

Deno.test("--role consumer against a database with older functions exits 1 with run shoal migrate", async () => {
  await using db = await testDb();
  await db.sql`update shoal.function_files set revision = revision - 1`;
  const { code, stdout, stderr } = await runShoal(["--role", "consumer", "--log-format", "json"], {
    url: db.url,
  });
  assertEquals(code, 1, stderr);
  assertEquals(stdout, "");
  const lines = stderr.split("\n");
  assertEquals(lines.length, 2, `expected one line on stderr, got:\n${stderr}`);
  assert(lines[0]!.startsWith("shoal: Database functions are at revision"), stderr);
  assert(lines[0]!.includes("run shoal migrate"), stderr);
  assert(!/\bat .+:\d+:\d+/.test(stderr), `stack trace on stderr:\n${stderr}`);
});

Deno.test("migrations may skip a number another branch holds: the gap is applied later and counts as behind until then", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const write = (file: string, text: string) => Deno.writeTextFile(`${dir}/${file}`, text);
    await write(
      "001_base.sql",
      "create schema if not exists shoal; create table shoal.t1 (x int);",
    );
    await write("003_later.sql", "create table shoal.t3 (x int);");
    const url = new URL(`file://${dir}/`);
    const gapped = await loadMigrations(url);
    assertEquals(gapped.map((m) => m.version), [1, 3]);
    await using db = await emptyDb();
    assertEquals((await migrate(db.sql, gapped, NO_FUNCTIONS)).migrations, [1, 3]);
    await write("002_middle.sql", "create table shoal.t2 (x int);");
    const filled = await loadMigrations(url);
    await assertRejects(
      () => checkSchema(db.sql, filled, { functions: NO_FUNCTIONS }),
      SchemaBehindError,
    );
    assertEquals((await migrate(db.sql, filled, NO_FUNCTIONS)).migrations, [2]);
    await checkSchema(db.sql, filled, { functions: NO_FUNCTIONS });
    await write("000_before.sql", "select 1;");
    await assertRejects(() => loadMigrations(url), Error, "expected version 1 or later, found 0");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
