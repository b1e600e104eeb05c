/**
 * The built-in `shoal.sql` task and `shoal.call_sql_task` behind it, against a real
 * database: a call and its result, the allowlist, a missing function, a function that
 * raises, and injection attempts in the name, refused by the task and, sent straight to
 * the SQL function, found to be nothing: a canary table survives every one.
 */
import { assert, assertEquals } from "./assert.ts";
import {
  exitWithin,
  freePort,
  type RunningConsumer,
  runShoal,
  spawnShoal,
  startConsumer,
  testDb,
  waitFor,
  waitForOutput,
} from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import { getExecution, startExecution } from "../lib/execution.ts";
import { enqueue } from "../lib/queue.ts";
import { checkSqlSchemas, sqlTask } from "../lib/sql_task.ts";

function startSqlConsumer(sql: Sql, schemas: string[]): RunningConsumer {
  return startConsumer(sql, [sqlTask({ schemas })]);
}

/** Schemas `app` (allowed in the tests) and `other`, their functions, and a canary table. */
async function install(sql: Sql): Promise<void> {
  await sql.begin(async (tx) => {
    await tx`create schema app`;
    await tx`create schema other`;
    await tx`create table app.canary (id int primary key)`;
    await tx`insert into app.canary values (1)`;
    await tx`create table app.calls (args jsonb not null)`;
    await tx`
      create function app.add(args jsonb) returns jsonb language sql as $$
        select jsonb_build_object('sum', (args->>'a')::int + (args->>'b')::int)
      $$`;
    await tx`
      create function app.record(args jsonb) returns void language sql as $$
        insert into app.calls values (args)
      $$`;
    await tx`
      create function app.boom(args jsonb) returns jsonb language plpgsql as $$
      begin
        raise exception 'boom: %', args->>'why';
      end $$`;
    await tx`create function app.two(a jsonb, b jsonb) returns jsonb language sql as $$ select a $$`;
    await tx`create function app.texty(a text) returns text language sql as $$ select a $$`;
    await tx`create function other.f(args jsonb) returns jsonb language sql as $$ select args $$`;
  });
}

async function deadRow(sql: Sql, id: string): Promise<{ attempts: number; reason: string }> {
  return await waitFor(`job ${id} to be dead-lettered`, async () => {
    const [row] = await sql<{ attempts: number; reason: string }[]>`
      select attempts, reason from shoal.dead_jobs where id = ${id}::bigint`;
    return row;
  }, 15_000);
}

async function canaryAlive(sql: Sql): Promise<boolean> {
  const [row] = await sql<{ n: number }[]>`select count(*)::int as n from app.canary`;
  return row?.n === 1;
}

Deno.test("shoal.sql calls schema.name(args) and stores its jsonb return as the result", async () => {
  await using db = await testDb();
  await install(db.sql);
  const consumer = startSqlConsumer(db.sql, ["app"]);
  try {
    const added = await startExecution(db.sql, {
      task: "shoal.sql",
      payload: { function: "app.add", args: { a: 2, b: 40 } },
    });
    const recorded = await startExecution(db.sql, {
      task: "shoal.sql",
      payload: { function: "app.record", args: [1, "two"] },
    });
    for (const [id, result] of [[added, { sum: 42 }], [recorded, null]] as const) {
      const done = await waitFor("the execution to complete", async () => {
        const e = await getExecution(db.sql, id);
        return e?.status === "completed" ? e : null;
      }, 15_000);
      assertEquals(done.result, result);
    }
    const calls = await db.sql<{ args: unknown }[]>`select args from app.calls`;
    assertEquals(calls.map((c) => c.args), [[1, "two"]]);
  } finally {
    await consumer.stop();
  }
});

Deno.test("shoal.sql fails for good when the schema is not allowed or the function is missing", async () => {
  await using db = await testDb();
  await install(db.sql);
  const consumer = startSqlConsumer(db.sql, ["app"]);
  try {
    const cases: [string, string][] = [
      ["other.f", "shoal.sql may not call other.f: schema other is not in --sql-schemas"],
      ["shoal.enqueue", "shoal.sql may not call shoal.enqueue: schema shoal is not in"],
      ["app.missing", 'No function "app"."missing"(jsonb) returning one value'],
      ["app.two", 'No function "app"."two"(jsonb)'],
      ["app.texty", 'No function "app"."texty"(jsonb)'],
      ["App.add", "schema App is not in --sql-schemas"],
      ["pg_catalog.pg_sleep", "schema pg_catalog is not in --sql-schemas"],
    ];
    for (const [fn, says] of cases) {
      const id = await enqueue(db.sql, "shoal.sql", { function: fn });
      const dead = await deadRow(db.sql, id);
      assertEquals(dead.attempts, 1, fn);
      assert(dead.reason.startsWith("PermanentError: "), dead.reason);
      assert(dead.reason.includes(says), `${fn}: ${dead.reason}`);
    }
  } finally {
    await consumer.stop();
  }
  const stop = startSqlConsumer(db.sql, []);
  try {
    const id = await enqueue(db.sql, "shoal.sql", { function: "app.add" });
    const dead = await deadRow(db.sql, id);
    assert(dead.reason.includes("shoal.sql may not call anything yet"), dead.reason);
  } finally {
    await stop.stop();
  }
});

Deno.test("shoal.sql retries a function that raises, then dead-letters it with its message", async () => {
  await using db = await testDb();
  await install(db.sql);
  const consumer = startSqlConsumer(db.sql, ["app"]);
  try {
    const id = await enqueue(db.sql, "shoal.sql", {
      function: "app.boom",
      args: { why: "the ledger is closed" },
    }, { maxAttempts: 3 });
    const dead = await deadRow(db.sql, id);
    assertEquals(dead.attempts, 3);
    assertEquals(dead.reason, "Error: app.boom failed: boom: the ledger is closed");
  } finally {
    await consumer.stop();
  }
});

const INJECTIONS = [
  "app.add; drop table app.canary",
  "app.add($1); drop table app.canary; --",
  'app."add"',
  '"app".add',
  '"x".y',
  "app.add'",
  "app.add' or '1'='1",
  "app.add()",
  "app . add",
  "app.add.extra",
  "app",
  ".add",
  "app.ädd",
  "app.a\u200bdd",
  `app.${"a".repeat(64)}`,
  `${"s".repeat(64)}.add`,
  "",
];

Deno.test("shoal.sql refuses injection attempts in the name at the boundary, with no effect", async () => {
  await using db = await testDb();
  await install(db.sql);
  const consumer = startSqlConsumer(db.sql, ["app"]);
  try {
    for (const fn of INJECTIONS) {
      const id = await enqueue(db.sql, "shoal.sql", { function: fn });
      const dead = await deadRow(db.sql, id);
      assertEquals(dead.attempts, 1, fn);
      assert(dead.reason.includes("Invalid payload for task shoal.sql"), `${fn}: ${dead.reason}`);
    }
    const id = await enqueue(db.sql, "shoal.sql", { function: ["app.add"] });
    assert((await deadRow(db.sql, id)).reason.includes("function must be a string"));
  } finally {
    await consumer.stop();
  }
  assert(await canaryAlive(db.sql), "the canary table survives");
});

Deno.test("shoal.call_sql_task() finds nothing for injection strings sent straight to SQL", async () => {
  await using db = await testDb();
  await install(db.sql);
  const attempts: [string, string][] = [
    ["app", "add($1); drop table app.canary; --"],
    ["app", 'add"($1); drop table app.canary; --'],
    ["app", "add'); drop table app.canary; --"],
    ["app; drop table app.canary; --", "add"],
    ['app"; drop table app.canary; --', "add"],
    ["app", "ADD"],
    ["app", "add\u200b"],
    ["app", "a".repeat(200)],
  ];
  for (const [schema, name] of attempts) {
    let code = "";
    try {
      await db.sql`select shoal.call_sql_task(${schema}::text, ${name}::text, '{}'::jsonb,
        ${[schema, "app"]}::text[])`;
    } catch (error) {
      code = (error as { code?: string }).code ?? "";
    }
    assertEquals(code, "SH002", `${schema}.${name}`);
  }
  for (const schema of ["shoal", "pg_catalog", "information_schema", "pg_toast", "other"]) {
    let code = "";
    try {
      // Only "other" is missing from the allowlist; the reserved ones are refused anyway.
      await db.sql`select shoal.call_sql_task(${schema}::text, 'f'::text, '{}'::jsonb,
        ${schema === "other" ? ["app"] : [schema]}::text[])`;
    } catch (error) {
      code = (error as { code?: string }).code ?? "";
    }
    assertEquals(code, "SH001", schema);
  }
  const [row] = await db.sql<{ r: unknown }[]>`
    select shoal.call_sql_task('app', 'add', '{"a": 1, "b": 2}'::jsonb, '{app}') as r`;
  assertEquals(row!.r, { sum: 3 });
  assert(await canaryAlive(db.sql), "the canary table survives");
});

Deno.test("checkSqlSchemas() takes plain identifiers and never shoal or the system schemas", () => {
  assertEquals(checkSqlSchemas(["app", "_billing2"]), ["app", "_billing2"]);
  for (const bad of ["shoal", "pg_catalog", "PG_TOAST", "information_schema", "a-b", '"x"', ""]) {
    let threw = false;
    try {
      checkSqlSchemas([bad]);
    } catch (error) {
      threw = (error as Error).message.startsWith("Invalid sql schema");
    }
    assert(threw, bad);
  }
});

Deno.test("a shoal consumer process with --sql-schemas (or SHOAL_SQL_SCHEMAS) runs shoal.sql", async () => {
  await using db = await testDb();
  await install(db.sql);
  await using proc = spawnShoal([
    "--role",
    "consumer",
    "--log-format",
    "json",
    "--poll-interval",
    "100ms",
    "--shutdown-grace",
    "1s",
  ], { url: db.url, env: { SHOAL_SQL_SCHEMAS: "other,app" } });
  await waitForOutput(proc, "started on");
  const id = await startExecution(db.sql, {
    task: "shoal.sql",
    payload: { function: "app.add", args: { a: 20, b: 22 } },
  });
  const done = await waitFor("the execution to complete", async () => {
    const e = await getExecution(db.sql, id);
    return e?.status === "completed" ? e : null;
  }, 15_000);
  assertEquals(done.result, { sum: 42 });
  proc.kill("SIGTERM");
  assertEquals((await exitWithin(proc, 20_000)).code, 0);
});

Deno.test("a bad --sql-schemas or --http-allow entry exits 2 with one line", async () => {
  const url = `postgres://u:p@127.0.0.1:${freePort()}/nowhere`;
  const cases: [string[], Record<string, string>, string][] = [
    [["--sql-schemas", "app,shoal"], {}, 'Invalid sql schema "shoal"'],
    [[], { SHOAL_SQL_SCHEMAS: 'x"; drop' }, "Invalid sql schema"],
    [["--http-allow", "https://example.com"], {}, 'Invalid http allowlist entry "https://'],
    [[], { SHOAL_HTTP_ALLOW: "a.com,*.b.com" }, 'Invalid http allowlist entry "*.b.com"'],
  ];
  for (const [flags, env, says] of cases) {
    const { code, stdout, stderr } = await runShoal(["--role", "consumer", ...flags], {
      url,
      env,
    });
    assertEquals(code, 2, stderr);
    assertEquals(stdout, "");
    assertEquals(stderr.trim().split("\n").length, 1, stderr);
    assert(stderr.includes(says), stderr);
  }
});
