import { assert, assertEquals } from "./assert.ts";
import {
  enqueueEvents,
  installAudit,
  logLines,
  runShoal,
  spawnShoal,
  testDb,
  waitFor,
  waitForOutput,
} from "./helpers.ts";

const EXAMPLE = new URL("../examples/my_tasks.ts", import.meta.url).pathname;

/** Enqueue through the example entry file's own CLI; returns the job id it printed. */
async function enqueueVia(url: string, task: string, payload: unknown): Promise<string> {
  await using proc = spawnShoal(["enqueue", "--task", task, "--payload", JSON.stringify(payload)], {
    url,
    mainModule: EXAMPLE,
  });
  const { code, output } = await proc.exited();
  assertEquals(code, 0, output);
  // The consumer registered the task: no warning about an unknown one.
  assert(!output.includes("Warning"), output);
  const id = output.trim().split("\n").pop()!;
  assert.match(id, /^\d+$/, output);
  return id;
}

Deno.test("examples/my_tasks.ts enqueues and runs its own tasks, and exits 0 on SIGTERM", async () => {
  await using db = await testDb();
  await installAudit(db.sql);
  // The consumer registers its tasks as it starts: the enqueues below go to their queues.
  await using consumer = spawnShoal(
    ["--role", "consumer", "--queues", "emails,reports", "--poll-interval", "100ms"].concat(
      ["--shutdown-grace", "1s"],
    ),
    { url: db.url, mainModule: EXAMPLE },
  );
  await waitForOutput(consumer, "started on");
  const welcome = await enqueueVia(db.url, "example.send_welcome", {
    email: "ada@example.com",
    name: "Ada",
  });
  const report = await enqueueVia(db.url, "example.report_backlog", {});
  const invalid = await enqueueVia(db.url, "example.send_welcome", { email: "not an address" });
  assertEquals((await enqueueEvents(db.sql)).map((e) => ({ id: e.job_id, queue: e.queue })), [
    { id: welcome, queue: "emails" },
    { id: report, queue: "reports" },
    { id: invalid, queue: "emails" },
  ]);

  await waitFor("the queue to empty", async () => {
    const [row] = await db.sql<{ n: number }[]>`select count(*)::integer as n from shoal.jobs`;
    return row?.n === 0;
  }, 20_000);

  const dead = await db.sql<{ id: string; reason: string }[]>`
    select id::text, reason from shoal.dead_jobs order by id`;
  assertEquals(dead.map((d) => d.id), [invalid]);
  assert.match(dead[0]!.reason, /Invalid payload for task example\.send_welcome: email must be/);

  consumer.kill("SIGTERM");
  const { code, output } = await consumer.exited();
  assertEquals(code, 0, output);
  const lines = logLines(output);
  const sent = lines.find((l) => String(l.message).startsWith("Sent the welcome mail"));
  assertEquals(sent?.email, "ada@example.com", output);
  assertEquals(sent?.job_id, welcome);
  const backlog = lines.find((l) => String(l.message).startsWith("Email backlog"));
  assertEquals(backlog?.job_id, report, output);
  assertEquals(typeof backlog?.waiting, "number");
});

Deno.test("examples/producer.ts enqueues through the imported definition: its queue and attempts, once per email", async () => {
  await using db = await testDb();
  const producer = new URL("../examples/producer.ts", import.meta.url).pathname;
  const signUp = async () => {
    const result = await runShoal(["ada@example.com", "Ada"], {
      url: db.url,
      mainModule: producer,
    });
    assertEquals({ code: result.code, stderr: result.stderr }, { code: 0, stderr: "" });
    assert.match(result.stdout, /^\d+\n$/);
    return result.stdout.trim();
  };
  const id = await signUp();
  assertEquals(await signUp(), id, "the dedupe key holds a retried signup");
  const rows = await db.sql<Record<string, unknown>[]>`
    select id::text, task, queue, max_attempts, payload, key from shoal.jobs`;
  assertEquals(rows.map((r) => ({ ...r })), [{
    id,
    task: "example.send_welcome",
    queue: "emails",
    max_attempts: 5,
    payload: { email: "ada@example.com", name: "Ada" },
    key: "welcome:ada@example.com",
  }]);
  const usage = await runShoal([], { url: db.url, mainModule: producer });
  assertEquals(usage, {
    code: 2,
    stdout: "",
    stderr: "usage: DATABASE_URL=... producer.ts EMAIL NAME\n",
  });
});
