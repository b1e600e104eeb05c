/**
 * lib/db.ts's `connect()` as a team's own entry file calls it: with no options, and with
 * values the type checker would have caught (`deno run` does not type-check).
 */
import { assertEquals, assertRejects } from "./assert.ts";
import { testDb } from "./helpers.ts";
import { connect } from "../lib/db.ts";

Deno.test("connect(url) without options opens a pool named shoal", async () => {
  await using db = await testDb();
  const sql = connect(db.url);
  try {
    const [row] = await sql<{ name: string }[]>`
      select current_setting('application_name') as name`;
    assertEquals(row!.name, "shoal");
  } finally {
    await sql.end();
  }
});

Deno.test("connect() refuses a URL that is not a non-empty string, in one line", async () => {
  for (const url of ["", undefined, 5432]) {
    await assertRejects(
      () => Promise.resolve().then(() => connect(url as unknown as string)),
      TypeError,
      "Cannot connect: the database URL must be a non-empty string",
    );
  }
});
