/**
 * The Kubernetes probes through a database outage: the test's own cluster is stopped under a
 * real `--role all --http` process. Liveness (`/healthz`) never asks the database, so it
 * stays 200 while every role's loop keeps turning (backing off); readiness (`/readyz`)
 * turns 503 with the reason, and 200 again once the database is back. A database outage
 * therefore takes pods out of rotation without restarting any of them.
 */
import { assert, assertEquals } from "../assert.ts";
import { exitWithin, httpGet, servedAt, sleep, spawnShoal, waitFor } from "../helpers.ts";
import { parseDuration } from "../../lib/duration.ts";
import { ownCluster } from "./harness.ts";

/** How long the database stays down: several of the roles' backoff steps and db windows. */
const OUTAGE_MS = 8_000;

/** Each loop's age from a /healthz body: `ok: consumer 120ms ago, reaper 3s ago, ...`. */
function loopAges(body: string): Record<string, number> {
  const match = /^ok: (.*)\n$/.exec(body);
  if (!match) throw new Error(`Not a healthy /healthz body: ${body}`);
  return Object.fromEntries(
    match[1]!.split(", ").map((part) => {
      const [name, age] = part.split(" ") as [string, string];
      return [name, parseDuration(age)];
    }),
  );
}

Deno.test("a database outage turns /readyz 503 while /healthz stays 200 and every loop keeps turning", async () => {
  await using cluster = await ownCluster();
  await using proc = spawnShoal([
    "--role",
    "all",
    "--http",
    "127.0.0.1:0",
    "--poll-interval",
    "100ms",
    "--interval",
    "200ms",
    "--lease",
    "2s",
    "--shutdown-grace",
    "1s",
  ], { url: cluster.url });
  const base = await servedAt(proc);
  await waitFor("/readyz 200", async () => (await httpGet(base, "/readyz")).status === 200, 20_000);
  assertEquals(
    Object.keys(loopAges((await httpGet(base, "/healthz")).body)),
    ["consumer", "reaper", "scheduler"],
  );

  await cluster.stop();
  const downAt = performance.now();
  const liveness = new Set<string>();
  let readiness = "";
  while (performance.now() - downAt < OUTAGE_MS) {
    const health = await httpGet(base, "/healthz");
    liveness.add(`${health.status}`);
    const ready = await httpGet(base, "/readyz");
    if (ready.status === 503) readiness = ready.body;
    await sleep(200);
  }
  const last = await httpGet(base, "/healthz");
  const outageMs = performance.now() - downAt;
  assertEquals([...liveness, `${last.status}`], ["200", "200"], last.body);
  assert(readiness.startsWith("database silent for "), `/readyz said: ${readiness}`);
  for (const [loop, ageMs] of Object.entries(loopAges(last.body))) {
    assert(
      ageMs < outageMs,
      `the ${loop} loop has not turned since the outage began: ${last.body}`,
    );
  }
  assertEquals((await httpGet(base, "/readyz")).status, 503);
  assertEquals(proc.output().includes("shoal: "), false, "the process kept running");

  await cluster.start();
  await waitFor(
    "/readyz 200 again",
    async () => (await httpGet(base, "/readyz")).status === 200,
    40_000,
  );
  assertEquals((await httpGet(base, "/healthz")).status, 200);
  proc.kill("SIGTERM");
  const { code, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 0, output);
});
