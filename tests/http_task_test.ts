/**
 * The built-in `shoal.http` task against a real HTTP server on 127.0.0.1 (Deno.serve,
 * port 0): delivery and its signature as a receiver checks it, the retry rules (5xx,
 * 429 with Retry-After, timeouts), permanent failures (4xx, redirects, hosts not
 * allowed), and a real consumer process that must never print the secret.
 */
import { assert, assertEquals } from "./assert.ts";
import {
  exitWithin,
  type RunningConsumer,
  spawnShoal,
  startConsumer,
  testDb,
  waitFor,
  waitForOutput,
} from "./helpers.ts";
import type { Sql } from "../lib/db.ts";
import type { ConsumerOptions } from "../lib/consumer.ts";
import { getExecution, startExecution } from "../lib/execution.ts";
import { enqueue } from "../lib/queue.ts";
import { MAX_RETRY_LATER_MS, RetryLaterError } from "../lib/tasks.ts";
import {
  checkHttpAllow,
  httpTask,
  type HttpTaskSettings,
  parseHttpPayload,
  parseRetryAfter,
} from "../lib/http_task.ts";

const SECRET = "whsec-7f3a9c1e-never-print-me";

interface Received {
  headers: Headers;
  body: string;
}

/** A local HTTP server that records every request and answers with `respond`. */
class Receiver {
  readonly requests: Received[] = [];
  respond: (n: number) => Response | Promise<Response> = () => new Response("ok");
  readonly server: Deno.HttpServer<Deno.NetAddr>;
  readonly host: string;

  constructor() {
    this.server = Deno.serve(
      { hostname: "127.0.0.1", port: 0, onListen: () => {} },
      async (req) => {
        this.requests.push({ headers: req.headers, body: await req.text() });
        return await this.respond(this.requests.length);
      },
    );
    this.host = `127.0.0.1:${this.server.addr.port}`;
  }

  get url(): string {
    return `http://${this.host}/hook?token=path-secret`;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.server.shutdown();
  }
}

function startHttpConsumer(
  sql: Sql,
  settings: HttpTaskSettings,
  options: Partial<ConsumerOptions> = {},
): RunningConsumer {
  return startConsumer(sql, [httpTask(settings)], options);
}

const secretEnv = (name: string) => name === "SHOAL_HTTP_SECRET_BILLING" ? SECRET : undefined;

/** The receiver's side: check x-shoal-signature with its own WebCrypto code. */
async function verify(secret: string, request: Received): Promise<boolean> {
  const signature = request.headers.get("x-shoal-signature") ?? "";
  if (!/^sha256=[0-9a-f]{64}$/.test(signature)) return false;
  const mac = new Uint8Array(signature.slice(7).match(/../g)!.map((h) => parseInt(h, 16)));
  const encoder = new TextEncoder();
  const key = await crypto.subtle.importKey(
    "raw",
    encoder.encode(secret),
    { name: "HMAC", hash: "SHA-256" },
    false,
    ["verify"],
  );
  const timestamp = request.headers.get("x-shoal-timestamp");
  const jobId = request.headers.get("x-shoal-job-id");
  const signed = encoder.encode(`${timestamp}.${jobId}.${request.body}`);
  return await crypto.subtle.verify("HMAC", key, mac, signed);
}

interface JobRow {
  attempts: number;
  last_error: string | null;
  delay_ms: number;
}

async function jobRow(sql: Sql, id: string): Promise<JobRow | undefined> {
  const [row] = await sql<JobRow[]>`
    select attempts, last_error,
      (extract(epoch from (run_at - now())) * 1000)::float8 as delay_ms
    from shoal.jobs where id = ${id}::bigint`;
  return row;
}

async function deadRow(sql: Sql, id: string): Promise<{ attempts: number; reason: string }> {
  return await waitFor(`job ${id} to be dead-lettered`, async () => {
    const [row] = await sql<{ attempts: number; reason: string }[]>`
      select attempts, reason from shoal.dead_jobs where id = ${id}::bigint`;
    return row;
  }, 15_000);
}

Deno.test("shoal.http POSTs the body signed for the receiver and acks on 2xx with the response as result", async () => {
  await using db = await testDb();
  await using rx = new Receiver();
  rx.respond = () => new Response("thanks", { status: 201 });
  const consumer = startHttpConsumer(db.sql, { allow: [rx.host], env: secretEnv });
  try {
    const body = { order: 42, note: "é ü \u2603", nested: { a: [1, 2] } };
    const execution = await startExecution(db.sql, {
      task: "shoal.http",
      payload: { url: rx.url, body, secret: "billing", headers: { "X-Tenant": "acme" } },
    });
    const done = await waitFor("the execution to complete", async () => {
      const e = await getExecution(db.sql, execution);
      return e?.status === "completed" ? e : null;
    }, 15_000);
    assertEquals(done.result, { status: 201, body: "thanks" });
    assertEquals(rx.requests.length, 1);
    const request = rx.requests[0]!;
    // jsonb keeps its own key order: the bytes sent are what was stored, signed as sent.
    assertEquals(JSON.parse(request.body), body);
    assertEquals(request.headers.get("content-type"), "application/json");
    assertEquals(request.headers.get("x-tenant"), "acme");
    assertEquals(request.headers.get("x-shoal-attempt"), "1");
    const [job] = await db.sql<{ id: string }[]>`
      select id from shoal.dead_jobs union all select id from shoal.jobs`;
    assertEquals(job, undefined, "the job is acked, not left anywhere");
    const timestamp = Number(request.headers.get("x-shoal-timestamp"));
    assert(Math.abs(timestamp - Date.now() / 1000) < 60, `timestamp ${timestamp}`);
    assert(/^\d+$/.test(request.headers.get("x-shoal-job-id") ?? ""));
    assert(await verify(SECRET, request), "the receiver verifies the signature");
    // The check can fail: a changed body or a wrong secret does not verify.
    assertEquals(await verify(SECRET, { ...request, body: request.body + " " }), false);
    assertEquals(await verify("other", request), false);
  } finally {
    await consumer.stop();
  }
});

Deno.test("shoal.http retries a 500 with the backoff, then acks the 200", async () => {
  await using db = await testDb();
  await using rx = new Receiver();
  rx.respond = (n) => n === 1 ? new Response("database down", { status: 500 }) : new Response("ok");
  const consumer = startHttpConsumer(db.sql, { allow: [rx.host] });
  try {
    const id = await enqueue(db.sql, "shoal.http", { url: rx.url, body: { n: 1 } });
    await waitFor(
      "two requests and the ack",
      async () => rx.requests.length === 2 && (await jobRow(db.sql, id)) === undefined,
      15_000,
    );
    assertEquals(rx.requests.map((r) => r.headers.get("x-shoal-attempt")), ["1", "2"]);
    assertEquals(rx.requests[0]!.headers.get("x-shoal-signature"), null, "no secret: unsigned");
    const [dead] = await db.sql`select id from shoal.dead_jobs`;
    assertEquals(dead, undefined);
  } finally {
    await consumer.stop();
  }
});

Deno.test("shoal.http honours Retry-After on a 429 as the next attempt's delay", async () => {
  await using db = await testDb();
  await using rx = new Receiver();
  rx.respond = () => new Response("slow down", { status: 429, headers: { "retry-after": "30" } });
  const consumer = startHttpConsumer(db.sql, { allow: [rx.host] });
  try {
    const id = await enqueue(db.sql, "shoal.http", { url: rx.url });
    const row = await waitFor("the retry to be recorded", async () => {
      const r = await jobRow(db.sql, id);
      return r?.attempts === 1 && r.last_error !== null ? r : null;
    }, 15_000);
    // The retry base is 10 ms: only the header explains a 30 s wait.
    assert(row.delay_ms > 25_000 && row.delay_ms <= 30_000, `run_at in ${row.delay_ms} ms`);
    assert(
      row.last_error!.includes(`POST http://${rx.host} answered 429: slow down`),
      row.last_error!,
    );
    assert(!row.last_error!.includes("path-secret"), "the URL's path and query stay out");
    assertEquals(rx.requests.length, 1);
  } finally {
    await consumer.stop();
  }
});

Deno.test("shoal.http dead-letters a 404 at once, and a redirect without following it", async () => {
  await using db = await testDb();
  await using rx = new Receiver();
  rx.respond = (n) =>
    n === 1
      ? new Response("no such hook", { status: 404 })
      : new Response(null, { status: 302, headers: { location: "http://127.0.0.1:1/" } });
  const consumer = startHttpConsumer(db.sql, { allow: [rx.host] }, { concurrency: 1 });
  try {
    const missing = await enqueue(db.sql, "shoal.http", { url: rx.url });
    const missingDead = await deadRow(db.sql, missing);
    const moved = await enqueue(db.sql, "shoal.http", { url: rx.url });
    const movedDead = await deadRow(db.sql, moved);
    assertEquals(missingDead.attempts, 1);
    assertEquals(
      missingDead.reason,
      `PermanentError: POST http://${rx.host} answered 404: no such hook`,
    );
    assertEquals(movedDead.attempts, 1);
    assert(movedDead.reason.includes("does not follow redirects"), movedDead.reason);
    assertEquals(rx.requests.length, 2);
  } finally {
    await consumer.stop();
  }
});

Deno.test("shoal.http counts a timeout as an ordinary failure and retries", async () => {
  await using db = await testDb();
  await using rx = new Receiver();
  const { promise: released, resolve: release } = Promise.withResolvers<void>();
  rx.respond = async () => {
    await released;
    return new Response("too late");
  };
  const consumer = startHttpConsumer(db.sql, { allow: [rx.host] }, { retryBaseMs: 60_000 });
  try {
    const id = await enqueue(db.sql, "shoal.http", { url: rx.url, timeout_ms: 200 });
    const row = await waitFor("the timeout to be recorded", async () => {
      const r = await jobRow(db.sql, id);
      return r?.last_error ? r : null;
    }, 15_000);
    assertEquals(row.attempts, 1);
    assertEquals(row.last_error, `Error: POST http://${rx.host} timed out after 200ms`);
    assert(row.delay_ms > 30_000, "retried with the backoff, not dead-lettered");
  } finally {
    release();
    await consumer.stop();
  }
});

Deno.test("shoal.http fails for good, sending nothing, to a host not on the allowlist", async () => {
  await using db = await testDb();
  await using rx = new Receiver();
  for (
    const [allow, says] of [
      [[], "shoal.http may not send anywhere yet: allow hosts with --http-allow"],
      [
        ["127.0.0.1"],
        `shoal.http may not send to http://${rx.host}: its host is not in --http-allow`,
      ],
      [["localhost:" + rx.host.split(":")[1]], "its host is not in --http-allow"],
    ] as const
  ) {
    const consumer = startHttpConsumer(db.sql, { allow: [...allow] });
    try {
      const id = await enqueue(db.sql, "shoal.http", { url: rx.url });
      const dead = await deadRow(db.sql, id);
      assertEquals(dead.attempts, 1);
      assert(dead.reason.includes(says), dead.reason);
    } finally {
      await consumer.stop();
    }
  }
  assertEquals(rx.requests.length, 0);
});

Deno.test("shoal.http refuses bad payloads for good: scheme, user:password, shoal's headers, unknown secret", async () => {
  await using db = await testDb();
  await using rx = new Receiver();
  const consumer = startHttpConsumer(db.sql, { allow: [rx.host], env: secretEnv });
  try {
    const cases: [Record<string, unknown>, string][] = [
      [{ url: `ftp://${rx.host}/x` }, 'url scheme "ftp" is not http or https'],
      [{ url: `http://user:pw@${rx.host}/` }, "url must not carry user:password"],
      [{ url: "not a url" }, "url is not an absolute URL"],
      [{ url: rx.url, headers: { "X-Shoal-Signature": "forged" } }, "x-shoal-signature is set"],
      [{ url: rx.url, headers: { Host: "evil" } }, "host is set by shoal"],
      [{ url: rx.url, headers: { "X-A": "a\r\nX-B: b" } }, "must be one line"],
      [{ url: rx.url, timeout_ms: 0 }, "timeout_ms must be an integer"],
      [{ url: rx.url, secret: "../PATH" }, "secret must be a name"],
      [{ url: rx.url, secret: "shipping" }, "SHOAL_HTTP_SECRET_SHIPPING is not set"],
    ];
    for (const [payload, says] of cases) {
      const id = await enqueue(db.sql, "shoal.http", payload);
      const dead = await deadRow(db.sql, id);
      assertEquals(dead.attempts, 1, says);
      assert(dead.reason.includes(says), `${says}: ${dead.reason}`);
    }
    assertEquals(rx.requests.length, 0);
  } finally {
    await consumer.stop();
  }
});

Deno.test("parseRetryAfter() reads delta seconds and HTTP dates; RetryLaterError clamps its delay", () => {
  const now = Date.parse("2026-01-01T00:00:00Z");
  assertEquals(parseRetryAfter("120", now), 120_000);
  assertEquals(parseRetryAfter(" 0 ", now), 0);
  assertEquals(parseRetryAfter("Thu, 01 Jan 2026 00:00:45 GMT", now), 45_000);
  assertEquals(parseRetryAfter("Wed, 31 Dec 2025 23:00:00 GMT", now), 0);
  assertEquals(parseRetryAfter("soon", now), null);
  assertEquals(parseRetryAfter(null, now), null);
  assertEquals(new RetryLaterError("x", 1500.4).delayMs, 1500);
  assertEquals(new RetryLaterError("x", -5).delayMs, 0);
  assertEquals(new RetryLaterError("x", NaN).delayMs, 0);
  assertEquals(new RetryLaterError("x", 10 * MAX_RETRY_LATER_MS).delayMs, MAX_RETRY_LATER_MS);
});

Deno.test("checkHttpAllow() takes host or host:port and refuses anything else; a fixed url refuses payload urls", () => {
  assertEquals(checkHttpAllow(["Example.COM", "127.0.0.1:8080", "[::1]:9000"]), [
    "example.com",
    "127.0.0.1:8080",
    "[::1]:9000",
  ]);
  for (const bad of ["http://x", "x/y", "x:0", "x:70000", "user@x", "*.x.com", ""]) {
    let threw = false;
    try {
      checkHttpAllow([bad]);
    } catch (error) {
      threw = (error as Error).message.startsWith("Invalid http allowlist entry");
    }
    assert(threw, bad);
  }
  const fixed = { url: "https://hooks.example.com/x" };
  assertEquals(parseHttpPayload({ body: 1 }, fixed).url.href, fixed.url);
  let refused = "";
  try {
    parseHttpPayload({ url: "https://evil.example/" }, fixed);
  } catch (error) {
    refused = (error as Error).message;
  }
  assertEquals(refused, "url is fixed by this task: leave it out of the payload");
});

Deno.test("a shoal consumer process delivers signed webhooks and never prints the secret", async () => {
  await using db = await testDb();
  await using rx = new Receiver();
  rx.respond = (n) =>
    n <= 2 ? new Response("ok") : new Response("broken", { status: 500, headers: {} });
  await using proc = spawnShoal([
    "--role",
    "consumer",
    "--log-format",
    "json",
    "--log-level",
    "debug",
    "--poll-interval",
    "100ms",
    "--shutdown-grace",
    "1s",
    "--http-allow",
    rx.host,
  ], { url: db.url, env: { SHOAL_HTTP_SECRET_HOOK: SECRET, SHOAL_HTTP_SECRET: SECRET + "2" } });
  await waitForOutput(proc, "started on");
  const named = await enqueue(db.sql, "shoal.http", { url: rx.url, secret: "hook", body: [1] });
  const unnamed = await enqueue(db.sql, "shoal.http", { url: rx.url, body: [2] });
  await waitFor("both delivered", () => rx.requests.length === 2, 15_000);
  const failing = await enqueue(db.sql, "shoal.http", { url: rx.url, secret: "hook" }, {
    maxAttempts: 2,
  });
  const missing = await enqueue(db.sql, "shoal.http", { url: rx.url, secret: "nope" });
  const [failed, unset] = [await deadRow(db.sql, failing), await deadRow(db.sql, missing)];
  assertEquals(failed.attempts, 2);
  assert(failed.reason.includes("answered 500: broken"), failed.reason);
  assert(unset.reason.includes("SHOAL_HTTP_SECRET_NOPE is not set"), unset.reason);
  const byJob = new Map(rx.requests.map((r) => [r.headers.get("x-shoal-job-id"), r]));
  assert(await verify(SECRET, byJob.get(named)!), "signed with SHOAL_HTTP_SECRET_HOOK");
  assert(await verify(SECRET + "2", byJob.get(unnamed)!), "signed with SHOAL_HTTP_SECRET");
  proc.kill("SIGTERM");
  const { code, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 0, output);
  assert(output.includes("answered 500"), "the failures were logged");
  assert(!output.includes(SECRET), "the secret never appears in the output");
  assert(!output.includes("path-secret"), "nor the URL's path and query");
  const [stored] = await db.sql<{ n: number }[]>`
    select count(*)::int as n from shoal.dead_jobs
    where reason like ${"%" + SECRET + "%"} or errors::text like ${"%" + SECRET + "%"}`;
  assertEquals(stored!.n, 0, "nor in a recorded error");
});
