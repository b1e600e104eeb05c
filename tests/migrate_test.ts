import { assertEquals, assertRejects } from "./assert.ts";
import {
  appliedMigrations,
  checkSchema,
  loadMigrations,
  migrate,
  MigrationChangedError,
  SchemaBehindError,
} from "../lib/migrate.ts";
import { emptyDb } from "./helpers.ts";

Deno.test("migrate() applies every migration once and records checksums", async () => {
  await using db = await emptyDb();
  const migrations = await loadMigrations();
  await assertRejects(() => checkSchema(db.sql, migrations), SchemaBehindError);
  assertEquals(await migrate(db.sql, migrations), migrations.map((m) => m.version));
  assertEquals(await migrate(db.sql, migrations), []);
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
  assertEquals([...a, ...b].sort(), migrations.map((m) => m.version));
});
