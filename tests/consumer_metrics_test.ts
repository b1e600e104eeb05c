/**
 * The consumer's metrics through a real process: claims, completions, retries, dead
 * letters and durations under their queue and task, scraped from --http /metrics.
 */
import { assert, assertEquals } from "./assert.ts";
import { exitWithin, logLines, spawnShoal, testDb, waitFor } from "./helpers.ts";
import { enqueue } from "../lib/queue.ts";

function sample(text: string, series: string): number | undefined {
  for (const line of text.split("\n")) {
    if (line.startsWith(series + " ")) return Number(line.slice(series.length + 1));
  }
  return undefined;
}

Deno.test("a consumer counts claimed, completed, retried and dead-lettered jobs in /metrics", async () => {
  await using db = await testDb();
  for (let i = 0; i < 3; i++) await enqueue(db.sql, "shoal.noop", {}, { queue: "m" });
  await enqueue(db.sql, "no.such", {}, { queue: "m", maxAttempts: 1 });
  await enqueue(db.sql, "no.such.twice", {}, { queue: "m", maxAttempts: 2 });
  await using proc = spawnShoal(
    ["--role", "consumer", "--queues", "m", "--http", "127.0.0.1:0", "--poll-interval", "100ms"],
    { url: db.url },
  );
  const address = await waitFor(
    "the HTTP server",
    () =>
      logLines(proc.output()).find((l) => String(l.message).startsWith("Serving"))?.address as
        | string
        | undefined,
    20_000,
  );
  const text = await waitFor("every outcome in /metrics", async () => {
    const body = await (await fetch(`http://${address}/metrics`)).text();
    return sample(body, `shoal_jobs_dead_lettered_total{queue="m",task="no.such.twice"}`) === 1
      ? body
      : null;
  }, 20_000);
  const noop = `{queue="m",task="shoal.noop"}`;
  assertEquals(sample(text, `shoal_jobs_claimed_total${noop}`), 3);
  assertEquals(sample(text, `shoal_jobs_completed_total${noop}`), 3);
  assertEquals(sample(text, `shoal_job_duration_seconds_count${noop}`), 3);
  assertEquals(sample(text, `shoal_jobs_failed_total${noop}`), undefined);
  assertEquals(sample(text, `shoal_jobs_dead_lettered_total{queue="m",task="no.such"}`), 1);
  assertEquals(sample(text, `shoal_jobs_failed_total{queue="m",task="no.such"}`), 1);
  const twice = `{queue="m",task="no.such.twice"}`;
  assertEquals(sample(text, `shoal_jobs_claimed_total${twice}`), 2);
  assertEquals(sample(text, `shoal_jobs_retried_total${twice}`), 1);
  assertEquals(sample(text, `shoal_jobs_failed_total${twice}`), 2);
  proc.kill("SIGTERM");
  const { code, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 0, output);
  assert(output.includes("Consumer stopped"), output);
});
