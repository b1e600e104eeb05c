import postgres from "postgres";
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { startLocalPg } from "../lib/local_pg.ts";

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

/** A directory the `postgres` OS user can reach when the tests run as root. */
async function clusterParent(): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "shoal-lpg-test-" });
  await Deno.chmod(dir, 0o755);
  return dir;
}

async function query<T>(url: string, run: (sql: postgres.Sql) => Promise<T>): Promise<T> {
  const sql = postgres(url, { max: 1, onnotice: () => {} });
  try {
    return await run(sql);
  } finally {
    await sql.end();
  }
}

async function canConnect(port: number): Promise<boolean> {
  try {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    conn.close();
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.ConnectionRefused) return false;
    throw error;
  }
}

Deno.test("startLocalPg() starts a cluster on loopback and stop() removes its temp dir", async () => {
  const pg = await startLocalPg({ fast: true });
  try {
    assert.match(pg.url, /^postgres:\/\/postgres@127\.0\.0\.1:\d+\/postgres$/);
    const [row] = await query(pg.url, (sql) => sql`select 1 + 1 as two`);
    assertEquals(row?.two, 2);
  } finally {
    await pg.stop();
  }
  assertEquals(await exists(pg.dir), false);
  assertEquals(await canConnect(pg.port), false);
});

Deno.test("startLocalPg() on an existing dir reuses its cluster and keeps its data", async () => {
  const parent = await clusterParent();
  try {
    const dir = `${parent}/pg`;
    const first = await startLocalPg({ dir, fast: true });
    try {
      await query(first.url, (sql) => sql`create table kept (note text)`);
      await query(first.url, (sql) => sql`insert into kept values ('still here')`);
    } finally {
      await first.stop();
    }
    assertEquals(await exists(`${dir}/data/PG_VERSION`), true);
    assertEquals(await exists(`${dir}/data/postmaster.pid`), false);

    await using second = await startLocalPg({ dir, fast: true });
    const rows = await query(second.url, (sql) => sql`select note from kept`);
    assertEquals(rows.map((r) => r.note), ["still here"]);
  } finally {
    await Deno.remove(parent, { recursive: true });
  }
});

Deno.test("startLocalPg() adopts a server left running in its dir by a killed process", async () => {
  const parent = await clusterParent();
  try {
    const dir = `${parent}/pg`;
    // The first handle is dropped without stop(), as when `shoal dev` is SIGKILLed.
    const abandoned = await startLocalPg({ dir, fast: true });
    const adopted = await startLocalPg({ dir, fast: true });
    assertEquals(adopted.port, abandoned.port);
    const [row] = await query(adopted.url, (sql) => sql`select 1 as one`);
    assertEquals(row?.one, 1);
    await adopted.stop();
    assertEquals(await canConnect(abandoned.port), false);
    assertEquals(await exists(`${dir}/data/postmaster.pid`), false);
  } finally {
    await Deno.remove(parent, { recursive: true });
  }
});

Deno.test("startLocalPg({ embedded: true }) runs the Postgres shipped on npm, installed in its dir", async () => {
  const parent = await clusterParent();
  try {
    const dir = `${parent}/pg`;
    const pg = await startLocalPg({ dir, fast: true, embedded: true });
    try {
      assertEquals(pg.binDir, `${dir}/postgres/bin`);
      const [row] = await query(pg.url, (sql) => sql`show server_version_num`);
      assert.ok(Number(row?.server_version_num) >= 180000, `got ${row?.server_version_num}`);
    } finally {
      await pg.stop();
    }
    // A second start reuses the copy the data was made with, without asking for it.
    await using again = await startLocalPg({ dir, fast: true });
    assertEquals(again.binDir, `${dir}/postgres/bin`);
  } finally {
    await Deno.remove(parent, { recursive: true });
  }
});

Deno.test("startLocalPg() refuses a cluster made by another Postgres major version", async () => {
  const parent = await clusterParent();
  const dir = `${parent}/pg`;
  try {
    await Deno.mkdir(`${dir}/data`, { recursive: true });
    await Deno.writeTextFile(`${dir}/data/PG_VERSION`, "9\n");
    await assertRejects(
      () => startLocalPg({ dir, fast: true }),
      Error,
      "its data is PostgreSQL 9",
    );
  } finally {
    await Deno.remove(parent, { recursive: true });
  }
});

Deno.test("startLocalPg() says in one line why the server did not start and cleans up", async () => {
  const error = await assertRejects(
    () => startLocalPg({ fast: true, settings: { shoal_no_such_setting: "1" } }),
    Error,
    "unrecognized configuration parameter",
  );
  assertEquals(error.message.includes("\n"), false, error.message);
  const dir = /^Cannot start Postgres in (\S+):/.exec(error.message)?.[1] ?? "";
  assert.ok(dir !== "", error.message);
  assertEquals(await exists(dir), false);
});
