// shoal from Node.js with plain SQL (postgres.js): enqueue a job, start a chord (a fan-out
// and a callback) as an execution, and wait for the execution's result.
//
//   cd examples/node && npm ci
//   DATABASE_URL=postgres://... node chord.mjs
//
// A consumer that knows the tasks runs them, for example the example entry file:
//   deno run -A examples/my_tasks.ts --role consumer --queues emails,reports
//
// Ids are Postgres bigints. postgres.js returns them as strings (a JavaScript number loses
// digits past 2^53): keep them as strings, and cast them back with ::bigint.
import postgres from "postgres";

const url = process.env.DATABASE_URL;
if (!url) {
  console.error("Set DATABASE_URL to shoal's database");
  process.exit(2);
}
/** How long to wait for the execution to end. */
const waitMs = Number(process.env.SHOAL_WAIT_MS ?? 30_000);

const sql = postgres(url, { max: 1, onnotice: () => {} });
try {
  // One job on the task's queue. Inside your own sql.begin() it commits with your data.
  const [{ id: jobId }] = await sql`
    select shoal.enqueue(
      ${"emails"}::text, ${"example.send_welcome"}::text,
      ${{ email: "ada@example.com", name: "Ada" }}::jsonb) as id`;

  // A chord: the built-in shoal.chord task fans out the children; the callback gets their
  // results in child order, and its own return value becomes the execution's result.
  const texts = ["the quick brown fox", "jumps over", "the lazy dog"];
  const chord = {
    children: texts.map((text) => ({ task: "example.count_words", payload: { text } })),
    callback: { task: "example.sum_counts" },
  };
  const [{ id: executionId }] = await sql`
    select shoal.start_execution(${"reports"}::text, ${"shoal.chord"}::text, ${chord}::jsonb)
      as id`;

  // Poll the execution until it ends (completed, failed or cancelled).
  const deadline = Date.now() + waitMs;
  let execution;
  for (;;) {
    [execution] = await sql`
      select status, result, error from shoal.executions where id = ${executionId}::bigint`;
    if (!["pending", "running"].includes(execution.status)) break;
    if (Date.now() > deadline) {
      console.error(`Execution ${executionId} still ${execution.status} after ${waitMs} ms`);
      process.exit(1);
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  console.log(JSON.stringify({
    job_id: jobId,
    execution_id: executionId,
    status: execution.status,
    result: execution.result,
    error: execution.error,
  }));
  process.exitCode = execution.status === "completed" ? 0 : 1;
} finally {
  await sql.end({ timeout: 5 });
}
