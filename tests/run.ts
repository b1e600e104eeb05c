/**
 * `deno task test`: run the suite against DATABASE_URL when set, otherwise against a
 * throwaway Postgres started here and stopped at the end. Migrates a template database
 * once; each test file clones it (see helpers.ts). Files run in parallel (DENO_JOBS, 2 unless
 * set). Extra arguments go to `deno test`.
 */
import postgres from "postgres";
import { startLocalPg } from "../lib/local_pg.ts";
import { loadMigrations, migrate } from "../lib/migrate.ts";
import { TEMPLATE_DB } from "./helpers.ts";

const given = Deno.env.get("DATABASE_URL");
const pg = given ? null : await startLocalPg({ fast: true });
const url = given ?? pg!.url;
let code = 1;
try {
  const admin = postgres(url, { max: 1, onnotice: () => {} });
  try {
    await admin`drop database if exists ${admin(TEMPLATE_DB)}`;
    await admin`create database ${admin(TEMPLATE_DB)}`;
  } finally {
    await admin.end();
  }
  const templateUrl = new URL(url);
  templateUrl.pathname = `/${TEMPLATE_DB}`;
  const template = postgres(templateUrl.toString(), { max: 1, onnotice: () => {} });
  try {
    // deno-lint-ignore no-explicit-any
    await migrate(template as any, await loadMigrations());
  } finally {
    await template.end();
  }
  // Test files run two at a time (DENO_JOBS, default 2): each works in databases of its own
  // (cloned from the template under random names) and servers on free ports, and most of the
  // suite's time is waiting (processes starting, deadlines passing, signals), not CPU: one at
  // a time took 17 min at 776 tests, over the CI's 15-minute bound.
  const child = new Deno.Command(Deno.execPath(), {
    args: ["test", "-A", "--parallel", ...Deno.args],
    env: {
      DATABASE_URL: url,
      SHOAL_TEST_TEMPLATE: TEMPLATE_DB,
      DENO_JOBS: Deno.env.get("DENO_JOBS") ?? "2",
    },
    stdin: "null",
  }).spawn();
  // Interrupted (Ctrl-C, a CI timeout): end the test run, then still stop our Postgres below,
  // which pg_ctl detached from this process group.
  const interrupt = (signal: Deno.Signal) => () => {
    try {
      child.kill(signal);
    } catch (error) {
      if (!(error instanceof TypeError)) throw error; // it already exited
    }
  };
  const handlers = (["SIGINT", "SIGTERM"] as const).map((s) => [s, interrupt(s)] as const);
  for (const [signal, handler] of handlers) Deno.addSignalListener(signal, handler);
  try {
    code = (await child.status).code;
  } finally {
    for (const [signal, handler] of handlers) Deno.removeSignalListener(signal, handler);
  }
} finally {
  await pg?.stop();
}
Deno.exit(code);
