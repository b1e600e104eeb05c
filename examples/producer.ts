/**
 * A producer: the part of an application that asks for work, here a signup enqueueing
 * `example.send_welcome` in its own transaction. It imports the task's definition from
 * the consumer's entry file, so `deno check` refuses a payload of the wrong shape, and the
 * job goes to the task's queue (`emails`) with its attempts (5) without repeating them:
 *
 *   DATABASE_URL=postgres://... deno run -A examples/producer.ts ada@example.com Ada
 *
 * It prints the job id. A producer that cannot import the definition (another service,
 * another language) enqueues by name instead: `enqueue(tx, "example.send_welcome", {...},
 * { queue: "emails" })`, or `select shoal.enqueue(...)` in SQL.
 *
 * @module
 */
import { connect, enqueue } from "../lib/mod.ts";
import { sendWelcome } from "./my_tasks.ts";

/** Enqueue the welcome mail for a new user; returns the job id. */
export async function signUp(databaseUrl: string, email: string, name: string): Promise<string> {
  const sql = connect(databaseUrl, { applicationName: "example producer" });
  try {
    return await sql.begin(async (tx) => {
      // The application's own writes would go here, in the same transaction.
      return await enqueue(tx, sendWelcome, { email, name }, {
        key: `welcome:${email}`, // a retried signup does not send twice
      });
    });
  } finally {
    await sql.end();
  }
}

if (import.meta.main) {
  const url = Deno.env.get("DATABASE_URL");
  const [email, name] = Deno.args;
  if (!url || email === undefined || name === undefined) {
    await Deno.stderr.write(
      new TextEncoder().encode("usage: DATABASE_URL=... producer.ts EMAIL NAME\n"),
    );
    Deno.exit(2);
  }
  const id = await signUp(url, email, name);
  await Deno.stdout.write(new TextEncoder().encode(`${id}\n`));
}
