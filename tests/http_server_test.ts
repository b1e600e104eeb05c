/**
 * `--http` (lib/http_server.ts, lib/config.ts, lib/cli.ts): the address flag and its validation,
 * /healthz, /readyz and /metrics in process against real Postgres, and real role processes
 * serving them from start to a clean SIGTERM.
 */
import { assert, assertEquals } from "./assert.ts";
import {
  exitWithin,
  freePort,
  httpGet as get,
  runShoal,
  servedAt,
  sleep,
  spawnShoal,
  testDb,
  waitFor,
} from "./helpers.ts";
import postgres from "postgres";
import { connect } from "../lib/db.ts";
import {
  DEFAULT_HTTP,
  parseCommandLine,
  parseListenAddress,
  resolveOptions,
  UsageError,
} from "../lib/config.ts";
import { HttpServer } from "../lib/http_server.ts";
import { loadPromClient, Metrics } from "../lib/metrics.ts";
import { enqueue } from "../lib/queue.ts";
import {
  holdKey,
  pauseQueue,
  setConcurrencyLimit,
  setFairnessWeight,
  setRateLimit,
} from "../lib/flow.ts";

// prom-client loads on demand (only a process serving /metrics needs it).
await loadPromClient();

Deno.test("parseCommandLine() gives a bare --http the loopback default", () => {
  assertEquals(parseCommandLine(["--role", "consumer", "--http"]).flags.http, DEFAULT_HTTP);
  assertEquals(parseCommandLine(["--http", "--role", "consumer"]).flags.http, DEFAULT_HTTP);
  assertEquals(parseCommandLine(["--http", "0.0.0.0:9100"]).flags.http, "0.0.0.0:9100");
  assertEquals(parseCommandLine(["--http=[::1]:9100"]).flags.http, "[::1]:9100");
  assertEquals(DEFAULT_HTTP, "127.0.0.1:9464");
});

Deno.test("resolveOptions() validates --http and SHOAL_HTTP as host:port", () => {
  const resolve = (args: string[], env: Record<string, string> = {}) =>
    resolveOptions("--role", parseCommandLine(args), ["http"], { get: (n) => env[n] }).http;
  assertEquals(resolve([]), undefined); // off unless asked for
  assertEquals(resolve(["--http"]), "127.0.0.1:9464");
  assertEquals(resolve(["--http", "localhost:8080"]), "localhost:8080");
  assertEquals(resolve(["--http", "[::1]:8080"]), "[::1]:8080");
  assertEquals(resolve([], { SHOAL_HTTP: "true" }), "127.0.0.1:9464");
  assertEquals(resolve([], { SHOAL_HTTP: "off" }), undefined);
  assertEquals(resolve([], { SHOAL_HTTP: "10.0.0.5:9464" }), "10.0.0.5:9464");
  const bad: [string[], Record<string, string>, string][] = [
    [["--http", "9464"], {}, 'Invalid --http: "9464" is not host:port (e.g. 127.0.0.1:9464)'],
    [["--http", ":9464"], {}, 'Invalid --http: ":9464" is not host:port'],
    [["--http", "host:70000"], {}, "Invalid --http: port 70000 is above 65535"],
    [["--http", "a b:1"], {}, 'Invalid --http: "a b:1" is not host:port'],
    [["--http", "::1:80"], {}, 'Invalid --http: "::1:80" is not host:port'],
    [[], { SHOAL_HTTP: "example.com" }, 'Invalid SHOAL_HTTP: "example.com" is not host:port'],
  ];
  for (const [args, env, message] of bad) {
    let caught: unknown;
    try {
      resolve(args, env);
    } catch (error) {
      caught = error;
    }
    assert(caught instanceof UsageError, `${args.join(" ")}: no UsageError`);
    assert((caught as Error).message.startsWith(message), (caught as Error).message);
  }
});

Deno.test("parseListenAddress() splits host and port, IPv6 in brackets", () => {
  assertEquals(parseListenAddress("127.0.0.1:9464"), { hostname: "127.0.0.1", port: 9464 });
  assertEquals(parseListenAddress("[::1]:0"), { hostname: "::1", port: 0 });
  assertEquals(parseListenAddress("metrics.local:80"), { hostname: "metrics.local", port: 80 });
});

Deno.test("HttpServer answers /healthz, /readyz and /metrics through start, ready and stop", async () => {
  await using db = await testDb();
  await enqueue(db.sql, "t", {}, { queue: "web" });
  const metrics = new Metrics();
  metrics.jobsClaimed([{ queue: "web", task: "t" }]);
  const server = new HttpServer({ hostname: "127.0.0.1", port: 0 }, {
    sql: db.sql,
    metrics,
    dbWindowMs: 3_000,
  });
  try {
    assertEquals(server.hostname, "127.0.0.1");
    const base = `http://127.0.0.1:${server.port}`;
    assertEquals(await get(base, "/readyz"), {
      status: 503,
      body: "starting\n",
      type: "text/plain; charset=utf-8",
    });
    // Not live before the roles run (waiting for the database, migrating): the startup
    // probe's window covers that.
    assertEquals(await get(base, "/healthz").then((r) => [r.status, r.body]), [503, "starting\n"]);
    server.loops.watch("consumer", 60_000);
    server.ready();
    const live = await get(base, "/healthz");
    assertEquals(live.status, 200);
    assert.match(live.body, /^ok: consumer \d+ms ago\n$/);
    await waitFor("/readyz 200", async () => (await get(base, "/readyz")).status === 200);
    assertEquals((await get(base, "/readyz")).body, "ready\n");
    const scraped = await get(base, "/metrics");
    assertEquals(scraped.status, 200);
    assertEquals(scraped.type, "text/plain; version=0.0.4; charset=utf-8");
    assert(scraped.body.includes(`shoal_queue_depth{queue="web"} 1\n`), scraped.body);
    assert(scraped.body.includes(`shoal_jobs_claimed_total{queue="web",task="t"} 1\n`));
    assertEquals((await get(base, "/nope")).status, 404);
    const posted = await fetch(base + "/metrics", { method: "POST" });
    await posted.body?.cancel();
    assertEquals([posted.status, posted.headers.get("allow")], [405, "GET, HEAD"]);
    server.stopping();
    assertEquals(await get(base, "/readyz").then((r) => [r.status, r.body]), [
      503,
      "shutting down\n",
    ]);
    // Stopping on purpose: a restart would only cut the shutdown grace short.
    assertEquals(await get(base, "/healthz").then((r) => [r.status, r.body]), [
      200,
      "shutting down\n",
    ]);
  } finally {
    await server.close();
  }
});

Deno.test("HttpServer /readyz is 503 with a one-line reason, and no secret, while /healthz stays 200, when the database is unreachable", async () => {
  const url = `postgres://alice:s3cret-pw@127.0.0.1:${freePort()}/nowhere`;
  const sql = connect(url, { applicationName: "shoal test", max: 1, connectTimeout: 1 });
  const server = new HttpServer({ hostname: "127.0.0.1", port: 0 }, {
    sql,
    metrics: new Metrics(),
    dbWindowMs: 1_000,
  });
  try {
    const base = `http://127.0.0.1:${server.port}`;
    server.loops.watch("consumer", 60_000);
    server.ready();
    const readiness = await waitFor("a probe to fail", async () => {
      const r = await get(base, "/readyz");
      return r.body.includes("ECONNREFUSED") ? r : null;
    });
    assertEquals(readiness.status, 503);
    assert(readiness.body.startsWith("database not reached yet: "), readiness.body);
    assertEquals(readiness.body.split("\n").length, 2, readiness.body); // one line
    assert(!readiness.body.includes("s3cret"), readiness.body);
    assertEquals((await get(base, "/healthz")).status, 200, "liveness never asks the database");
    // /metrics still answers (queue gauges are simply missing).
    const scraped = await get(base, "/metrics");
    assertEquals(scraped.status, 200);
    assert(!scraped.body.includes("s3cret"));
  } finally {
    await server.close();
    await sql.end({ timeout: 1 });
  }
});

Deno.test("HttpServer /healthz is 503 naming a loop that stopped turning, and 200 again once it turns", async () => {
  await using db = await testDb();
  const server = new HttpServer({ hostname: "127.0.0.1", port: 0 }, {
    sql: db.sql,
    metrics: new Metrics(),
    dbWindowMs: 3_000,
  });
  try {
    const base = `http://127.0.0.1:${server.port}`;
    // A loop whose longest turn is 100 ms, turning every 20 ms, then not at all.
    const turned = server.loops.watch("consumer", 100);
    const turning = setInterval(turned, 20);
    server.ready();
    try {
      await sleep(300);
      assertEquals((await get(base, "/healthz")).status, 200);
    } finally {
      clearInterval(turning);
    }
    const stuck = await waitFor("/healthz 503", async () => {
      const r = await get(base, "/healthz");
      return r.status === 503 ? r.body : null;
    });
    assert.match(stuck, /^stuck: consumer silent for \d+ms \(limit 200ms\)\n$/);
    await waitFor("/readyz 200", async () => (await get(base, "/readyz")).status === 200);
    turned();
    assertEquals((await get(base, "/healthz")).status, 200);
  } finally {
    await server.close();
  }
});

Deno.test("HttpServer refuses a port already in use with one clear error", async () => {
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const sql = connect("postgres://u@127.0.0.1:1/x", { applicationName: "shoal test", max: 1 });
  try {
    let message = "";
    try {
      new HttpServer({ hostname: "127.0.0.1", port }, {
        sql,
        metrics: new Metrics(),
        dbWindowMs: 1_000,
      });
    } catch (error) {
      message = (error as Error).message;
    }
    assert(message.startsWith(`Cannot serve HTTP on 127.0.0.1:${port}: `), message);
  } finally {
    await sql.end({ timeout: 1 });
  }
});

Deno.test("--role all --http serves health, readiness and metrics, and exits 0 on SIGTERM", async () => {
  await using db = await testDb();
  await enqueue(db.sql, "t", {}, { queue: "elsewhere" }); // not consumed: a steady depth
  await pauseQueue(db.sql, "elsewhere");
  await setConcurrencyLimit(db.sql, { queue: "elsewhere", maxRunning: 3, key: "k" });
  await setRateLimit(db.sql, { queue: "elsewhere", maxStarts: 5, periodMs: 2000 });
  await holdKey(db.sql, { queue: "elsewhere", key: "k", forMs: 300_000 });
  await setFairnessWeight(db.sql, { queue: "elsewhere", key: "k", weight: 4 });
  const args = [
    "--role",
    "all",
    "--http",
    "127.0.0.1:0",
    "--poll-interval",
    "100ms",
    "--interval",
    "200ms",
    "--lease",
    "3s",
    "--shutdown-grace",
    "1s",
  ];
  await using proc = spawnShoal(args, { url: db.url });
  const base = await servedAt(proc);
  assert(base.startsWith("http://127.0.0.1:"), base);
  await waitFor("/readyz 200", async () => (await get(base, "/readyz")).status === 200, 20_000);
  await waitFor("/healthz 200", async () => (await get(base, "/healthz")).status === 200, 20_000);
  const text = await waitFor("both leases in /metrics", async () => {
    const body = (await get(base, "/metrics")).body;
    return body.includes(`shoal_leader{lease="reaper"} 1`) &&
        body.includes(`shoal_leader{lease="scheduler"} 1`)
      ? body
      : null;
  }, 20_000);
  assert(text.includes(`shoal_queue_depth{queue="elsewhere"} 1\n`), text);
  assert(text.includes(`shoal_queue_paused{queue="elsewhere"} 1\n`), text);
  assert(text.includes(`shoal_concurrency_limit{queue="elsewhere",key="k",task=""} 3\n`), text);
  assert(
    text.includes(`shoal_concurrency_slots_held{queue="elsewhere",key="k",task=""} 0\n`),
    text,
  );
  assert(text.includes(`shoal_rate_limit{queue="elsewhere",key="*",task=""} 2.5\n`), text);
  assert(text.includes(`shoal_key_held{queue="elsewhere",key="k",task=""} 1\n`), text);
  assert(text.includes(`shoal_fairness_weight{queue="elsewhere",key="k"} 4\n`), text);
  proc.kill("SIGTERM");
  const { code, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 0, output);
  assert(output.includes("Consumer stopped"), output);
});

Deno.test("--http: /readyz turns 503 and /healthz stays 200 when the role's database goes away", async () => {
  await using db = await testDb();
  await using proc = spawnShoal(
    ["--role", "consumer", "--http", "127.0.0.1:0", "--poll-interval", "100ms"],
    { url: db.url },
  );
  const base = await servedAt(proc);
  await waitFor("/healthz 200", async () => (await get(base, "/healthz")).status === 200, 20_000);
  const admin = postgres(Deno.env.get("DATABASE_URL")!, { max: 1, onnotice: () => {} });
  try {
    await admin`drop database ${admin(db.name)} with (force)`;
  } finally {
    await admin.end();
  }
  const readiness = await waitFor("/readyz 503", async () => {
    const r = await get(base, "/readyz");
    return r.status === 503 ? r : null;
  }, 20_000);
  assert(readiness.body.startsWith("database silent for "), readiness.body);
  const health = await get(base, "/healthz");
  assertEquals(health.status, 200, health.body);
  assert.match(health.body, /^ok: consumer \d+ms ago\n$/);
  proc.kill("SIGTERM");
  await exitWithin(proc, 20_000);
});

Deno.test("a role exits 1 with one line when its --http port is taken, before touching the database", async () => {
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const url = `postgres://alice:s3cret@127.0.0.1:${freePort()}/nowhere`;
  const { code, stderr } = await runShoal(["--role", "reaper", "--http", `127.0.0.1:${port}`], {
    url,
  });
  assertEquals(code, 1, stderr);
  assert(stderr.includes(`shoal: Cannot serve HTTP on 127.0.0.1:${port}: `), stderr);
  assert(!stderr.includes("s3cret"), stderr);
});

Deno.test("shoal --role consumer --http nonsense exits 2 naming the flag", async () => {
  const { code, stderr } = await runShoal(["--role", "consumer", "--http", "nonsense"], {
    url: `postgres://u@127.0.0.1:${freePort()}/x`,
  });
  assertEquals(code, 2, stderr);
  assertEquals(
    stderr,
    'shoal: Invalid --http: "nonsense" is not host:port (e.g. 127.0.0.1:9464)\n',
  );
});
