/**
 * The dashboard at the server level (lib/dashboard/): credentials and the bind rule, the
 * cross-site and read-only refusals, 400 on bad parameters, escaping and redaction, the
 * served assets matching the pinned npm packages, keyset pages, and `shoal dashboard` and a
 * role's `--http` serving it. Against real Postgres; the browser test is
 * dashboard_browser_test.ts.
 */
import { assert, assertEquals } from "./assert.ts";
import {
  exitWithin,
  freePort,
  httpGet as get,
  runShoal,
  servedAt,
  spawnShoal,
  testDb,
  waitFor,
} from "./helpers.ts";
import { seedDashboard, SEEDED_PROGRESS, STEP_RESULT } from "./dashboard_fixture.ts";
import { createDashboard, type Dashboard } from "../lib/dashboard/app.tsx";
import {
  accessFromEnv,
  authenticate,
  bindRefusal,
  cookieValue,
  crossSiteRefusal,
  isLoopback,
  tokenCookieName,
} from "../lib/dashboard/guard.ts";
import { ASSETS_MODULE, renderAssetsModule } from "../scripts/dashboard_assets.ts";
import { HttpServer } from "../lib/http_server.ts";
import { loadPromClient, Metrics } from "../lib/metrics.ts";
import { dashboardFor } from "../lib/dashboard/server.ts";
import { enqueue, listJobs, listJobsStatement } from "../lib/queue.ts";
import { startExecution, startWorkflow } from "../lib/execution.ts";
import { flowStatus } from "../lib/flow.ts";
import { deadByQueueWithin, listDeadPage, purgeDead, retryDeadMatching } from "../lib/dead.ts";
import { connect, type Db } from "../lib/db.ts";
import { DASHBOARD_POOL_MAX } from "../lib/roles.ts";
import { REDACTED, shownJson } from "../lib/dashboard/views.tsx";

await loadPromClient();

const BASE = "http://127.0.0.1:9464";
const TOKEN = "a-long-dashboard-token-0123456789";

/** A request to the dashboard in process, as a same-origin browser would send it. */
async function call(
  dashboard: Dashboard,
  path: string,
  init: RequestInit = {},
): Promise<{ status: number; body: string; headers: Headers }> {
  const response = await dashboard.fetch(new Request(BASE + path, init));
  return { status: response.status, body: await response.text(), headers: response.headers };
}

/** A same-origin form POST. */
function post(fields: Record<string, string> = {}, headers: Record<string, string> = {}) {
  return {
    method: "POST",
    headers: {
      "content-type": "application/x-www-form-urlencoded",
      origin: BASE,
      "sec-fetch-site": "same-origin",
      ...headers,
    },
    body: new URLSearchParams(fields).toString(),
  };
}

/**
 * One HTTP/1.1 request over TCP with the headers given as is (fetch() sets the Host itself,
 * and a DNS-rebinding page's browser sends its own domain there).
 */
async function rawRequest(
  port: number,
  method: string,
  path: string,
  headers: Record<string, string>,
): Promise<{ status: number; body: string }> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  const head = Object.entries({ ...headers, "content-length": "0", connection: "close" })
    .map(([name, value]) => `${name}: ${value}\r\n`).join("");
  await conn.write(new TextEncoder().encode(`${method} ${path} HTTP/1.1\r\n${head}\r\n`));
  // Read to its end (the server closes: connection: close), which closes the connection.
  const answer = await new Response(conn.readable).text();
  const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(answer)?.[1]);
  return { status, body: answer.slice(answer.indexOf("\r\n\r\n") + 4) };
}

function open(db: Db, readOnly = false): Dashboard {
  return createDashboard({ db, readOnly, access: {} });
}

Deno.test("isLoopback() and bindRefusal(): beyond loopback only with credentials", () => {
  for (const host of ["127.0.0.1", "127.5.0.1", "::1", "[::1]", "localhost"]) {
    assert(isLoopback(host), host);
    assertEquals(bindRefusal(host, {}), null);
  }
  for (const host of ["0.0.0.0", "::", "10.0.0.5", "example.com"]) {
    assert(!isLoopback(host), host);
    const refusal = bindRefusal(host, {});
    assert(refusal?.startsWith(`Refusing to serve the dashboard on ${host}`), refusal ?? "");
    assert(refusal!.includes("SHOAL_DASHBOARD_TOKEN"), refusal!);
    assertEquals(bindRefusal(host, { token: TOKEN }), null);
    assertEquals(bindRefusal(host, { basic: { user: "u", password: "p" } }), null);
  }
});

Deno.test("accessFromEnv() reads a token or basic auth, and refuses half or weak settings", () => {
  const env = (vars: Record<string, string>) => ({ get: (n: string) => vars[n] });
  assertEquals(accessFromEnv(env({})), {});
  assertEquals(accessFromEnv(env({ SHOAL_DASHBOARD_TOKEN: TOKEN })), { token: TOKEN });
  assertEquals(
    accessFromEnv(env({ SHOAL_DASHBOARD_USER: "ops", SHOAL_DASHBOARD_PASSWORD: "pw" })),
    { basic: { user: "ops", password: "pw" } },
  );
  assert.throws(() => accessFromEnv(env({ SHOAL_DASHBOARD_TOKEN: "short" })), /at least 16/);
  assert.throws(
    () => accessFromEnv(env({ SHOAL_DASHBOARD_USER: "ops" })),
    /set both SHOAL_DASHBOARD_USER and SHOAL_DASHBOARD_PASSWORD/,
  );
});

Deno.test("authenticate() takes a bearer token, the token cookie, ?token= once, or basic auth", () => {
  const url = `${BASE}/jobs?queue=q`;
  const cookieName = tokenCookieName(new Request(url));
  assertEquals(cookieName, "shoal_dashboard_9464");
  const refused = authenticate(new Request(url), { token: TOKEN });
  assert(!refused.ok && refused.response.status === 401);
  assert(
    !authenticate(new Request(url, { headers: { authorization: "Bearer wrong" } }), {
      token: TOKEN,
    }).ok,
  );
  assert(
    authenticate(new Request(url, { headers: { authorization: `Bearer ${TOKEN}` } }), {
      token: TOKEN,
    }).ok,
  );
  const kept = cookieValue(TOKEN);
  assert(!kept.includes(TOKEN) && kept.length >= 40, "the cookie holds an HMAC, not the token");
  assert(
    authenticate(new Request(url, { headers: { cookie: `${cookieName}=${kept}` } }), {
      token: TOKEN,
    }).ok,
  );
  // The raw token as a cookie is not a credential; nor is the cookie of another port.
  for (const cookie of [`${cookieName}=${TOKEN}`, `shoal_dashboard_9465=${kept}`]) {
    assert(!authenticate(new Request(url, { headers: { cookie } }), { token: TOKEN }).ok, cookie);
  }
  const visit = authenticate(new Request(`${url}&token=${TOKEN}`), { token: TOKEN });
  if (visit.ok) throw new Error("a ?token= visit is answered with a redirect");
  assertEquals(visit.response.status, 303);
  assertEquals(visit.response.headers.get("location"), "/jobs?queue=q"); // token dropped
  assertEquals(
    visit.response.headers.get("set-cookie"),
    `${cookieName}=${kept}; Path=/; HttpOnly; SameSite=Strict`,
  );
  const basic = { basic: { user: "ops", password: "pw" } };
  const challenge = authenticate(new Request(url), basic);
  if (challenge.ok) throw new Error("no credentials: challenged");
  assertEquals(
    challenge.response.headers.get("www-authenticate"),
    'Basic realm="shoal", charset="UTF-8"',
  );
  assert(
    authenticate(new Request(url, { headers: { authorization: `Basic ${btoa("ops:pw")}` } }), basic)
      .ok,
  );
  assert(
    !authenticate(
      new Request(url, { headers: { authorization: `Basic ${btoa("ops:no")}` } }),
      basic,
    ).ok,
  );
  assert(authenticate(new Request(url), {}).ok, "no credentials configured: open (loopback)");
});

Deno.test("authenticate() drops ?token= with a redirect even when already authenticated, sets Secure over https, never redirects off-site", () => {
  const bearer = { authorization: `Bearer ${TOKEN}` };
  const cookie = { cookie: `shoal_dashboard_9464=${cookieValue(TOKEN)}` };
  for (const headers of [bearer, cookie]) {
    const seen = authenticate(new Request(`${BASE}/dead?token=${TOKEN}&queue=q`, { headers }), {
      token: TOKEN,
    });
    if (seen.ok) throw new Error("the token must leave the address bar even when logged in");
    assertEquals(seen.response.status, 303);
    assertEquals(seen.response.headers.get("location"), "/dead?queue=q");
  }
  // A wrong token: redirected all the same, no cookie (the next page then asks).
  const wrong = authenticate(new Request(`${BASE}/?token=nope`), { token: TOKEN });
  if (wrong.ok) throw new Error("redirected");
  assertEquals([wrong.response.headers.get("location"), wrong.response.headers.get("set-cookie")], [
    "/",
    null,
  ]);
  // `//evil.example/` as a path would make the Location protocol-relative: one slash kept.
  const offSite = authenticate(new Request(`${BASE}//evil.example/x?token=${TOKEN}`), {
    token: TOKEN,
  });
  if (offSite.ok) throw new Error("redirected");
  assertEquals(offSite.response.headers.get("location"), "/evil.example/x");
  const proxied = authenticate(
    new Request(`${BASE}/?token=${TOKEN}`, { headers: { "x-forwarded-proto": "https" } }),
    { token: TOKEN },
  );
  if (proxied.ok) throw new Error("redirected");
  assert(proxied.response.headers.get("set-cookie")!.endsWith("; Secure"));
  const tls = authenticate(new Request(`https://dash.example/?token=${TOKEN}`), { token: TOKEN });
  if (tls.ok) throw new Error("redirected");
  assert(tls.response.headers.get("set-cookie")!.startsWith("shoal_dashboard_443="));
  assert(tls.response.headers.get("set-cookie")!.endsWith("; Secure"));
});

Deno.test("dashboard answers a malformed cookie as no cookie: 401, no error logged", async () => {
  await using db = await testDb();
  const dashboard = createDashboard({ db: db.sql, readOnly: false, access: { token: TOKEN } });
  for (const cookie of ["shoal_dashboard_9464=%E0%A4%A", "shoal_dashboard_9464", "=;;=x"]) {
    const page = await call(dashboard, "/", { headers: { cookie } });
    assertEquals(page.status, 401, `${cookie}: ${page.body}`);
  }
  const page = await call(dashboard, "/", {
    headers: { cookie: `junk=%E0%A4%A; shoal_dashboard_9464=${cookieValue(TOKEN)}` },
  });
  assertEquals(page.status, 200, page.body);
});

Deno.test("crossSiteRefusal() refuses cross-site and cross-origin POSTs only", () => {
  const at = (headers: Record<string, string>, url = `${BASE}/dead/purge`) =>
    crossSiteRefusal(new Request(url, { method: "POST", headers }));
  assertEquals(at({ "sec-fetch-site": "same-origin", origin: BASE }), null);
  assertEquals(at({}), null); // not a browser: judged by credentials alone
  assert(at({ "sec-fetch-site": "cross-site" })?.startsWith("cross-site request refused"));
  assert(at({ "sec-fetch-site": "same-site" })?.startsWith("cross-site request refused"));
  // The Origin alone (no Sec-Fetch-Site, as an older browser sends): foreign, or null.
  for (const origin of ["https://evil.example", "null", "http://127.0.0.1:9465", "x"]) {
    assert(at({ origin })?.startsWith("cross-origin request refused"), origin);
  }
  // Compared with the Host, not the scheme: a proxy terminating TLS in front.
  assertEquals(
    at({ origin: "https://dash.example", host: "dash.example" }, "http://127.0.0.1:9464/x"),
    null,
  );
  assert(
    at({ origin: "https://dash.example", host: "127.0.0.1:9464" })?.startsWith("cross-origin"),
  );
});

Deno.test("dashboard refuses a cross-site POST and changes nothing; a same-origin one pauses the queue", async () => {
  await using db = await testDb();
  await enqueue(db.sql, "t", {}, { queue: "q" });
  const dashboard = open(db.sql);
  const evil = await call(
    dashboard,
    "/queues/q/pause",
    post({}, {
      origin: "https://evil.example",
      "sec-fetch-site": "cross-site",
    }),
  );
  assertEquals(evil.status, 403, evil.body);
  assert(evil.body.startsWith("refused: cross-site request refused"), evil.body);
  assertEquals((await flowStatus(db.sql)).paused, []);
  // Refused on the Origin alone: no Sec-Fetch-Site at all, and a foreign or null Origin.
  for (const origin of ["https://evil.example", "null"]) {
    const init = post({}, { origin });
    delete (init.headers as Record<string, string>)["sec-fetch-site"];
    const forged = await call(dashboard, "/queues/q/pause", init);
    assertEquals(forged.status, 403, forged.body);
    assert(forged.body.startsWith("refused: cross-origin request refused"), forged.body);
  }
  assertEquals((await flowStatus(db.sql)).paused, []);
  const ok = await call(dashboard, "/queues/q/pause", post());
  assertEquals(ok.status, 303, ok.body);
  assertEquals(ok.headers.get("location"), "/?notice=paused");
  assertEquals((await flowStatus(db.sql)).paused.map((p) => p.queue), ["q"]);
});

Deno.test("dashboard without credentials answers 421 to a foreign Host (DNS rebinding), GET and POST, over HTTP", async () => {
  await using db = await testDb();
  await enqueue(db.sql, "t", { secret: "payload" }, { queue: "q" });
  const server = new HttpServer({ hostname: "127.0.0.1", port: 0 }, {
    sql: db.sql,
    metrics: new Metrics(),
    dbWindowMs: 3_000,
    dashboard: open(db.sql),
  });
  server.ready();
  try {
    const rebound = `evil.example:${server.port}`;
    const page = await rawRequest(server.port, "GET", "/jobs", { host: rebound });
    assertEquals(page.status, 421, page.body);
    assert(page.body.includes("loopback hosts only"), page.body);
    const posted = await rawRequest(server.port, "POST", "/queues/q/pause", {
      host: rebound,
      origin: `http://${rebound}`,
      "sec-fetch-site": "same-origin",
      "content-type": "application/x-www-form-urlencoded",
    });
    assertEquals(posted.status, 421, posted.body);
    assertEquals((await flowStatus(db.sql)).paused, []);
    for (const host of [`localhost:${server.port}`, `127.0.0.2:1`, `[::1]:${server.port}`]) {
      const fine = await rawRequest(server.port, "GET", "/jobs", { host });
      assertEquals(fine.status, 200, host);
    }
    // Probes are not the dashboard's: served whatever the Host.
    assertEquals((await rawRequest(server.port, "GET", "/healthz", { host: rebound })).status, 200);
  } finally {
    await server.close();
  }
  // With credentials the Host is free (a proxy's name): the credentials decide.
  const guarded = createDashboard({ db: db.sql, readOnly: false, access: { token: TOKEN } });
  const named = await call(guarded, "/", {
    headers: { host: "dash.example", authorization: `Bearer ${TOKEN}` },
  });
  assertEquals(named.status, 200, named.body);
});

Deno.test("dashboard in read-only mode shows no action and refuses every POST", async () => {
  await using db = await testDb();
  const seeded = await seedDashboard(db.sql);
  const dashboard = open(db.sql, true);
  for (
    const path of ["/", "/dead", "/executions", "/schedules", "/queues", `/jobs/${seeded.dead[0]}`]
  ) {
    const page = await call(dashboard, path);
    assertEquals(page.status, 200, `${path}: ${page.body}`);
    assert(!page.body.includes('method="post"'), `${path} shows an action`);
    assert(page.body.includes("read-only"), path);
  }
  for (
    const path of [
      "/queues/mail/pause",
      `/dead/${seeded.dead[0]}/retry`,
      `/executions/${seeded.execution}/cancel`,
      "/queues/limits/concurrency/set",
      "/queues/limits/concurrency/clear",
      "/queues/limits/rate/set",
      "/queues/limits/rate/clear",
      "/queues/holds/hold",
      "/queues/holds/release",
    ]
  ) {
    const refused = await call(dashboard, path, post());
    assertEquals([refused.status, refused.body], [403, "refused: the dashboard is read-only\n"]);
  }
  assertEquals((await listDeadPage(db.sql)).rows.length, 3, "nothing retried");
  assertEquals((await flowStatus(db.sql)).paused.map((p) => p.queue), ["reports"]);
  // The limit forms too, with valid fields: refused before anything is read.
  const valid = { queue: "bill", max_running: "5", key: "k" };
  const refused = await call(dashboard, "/queues/limits/concurrency/set", post(valid));
  assertEquals(refused.status, 403);
  const queues = await call(dashboard, "/queues");
  assert(!queues.body.includes("Set concurrency limit"), "the limit form is hidden");
  assert(!queues.body.includes(">Clear<"), "no Clear button");
  const flow = await flowStatus(db.sql);
  assertEquals(flow.limits.map((l) => [l.queue, l.key, l.max_running]), [["bill", null, 2]]);
});

Deno.test("dashboard limit forms answer 400 naming the field for every bad one, and change nothing", async () => {
  await using db = await testDb();
  await seedDashboard(db.sql);
  const dashboard = open(db.sql);
  const before = await flowStatus(db.sql);
  const bad: [string, Record<string, string>, string][] = [
    ["/queues/limits/concurrency/set", { max_running: "1" }, "Missing queue"],
    ["/queues/limits/concurrency/set", { queue: "bad name", max_running: "1" }, "Invalid queue"],
    [
      "/queues/limits/concurrency/set",
      { queue: "q", task: "<x>", max_running: "1" },
      "Invalid task",
    ],
    [
      "/queues/limits/concurrency/set",
      { queue: "q", key: "k".repeat(257), max_running: "1" },
      "Invalid key: expected at most 256 characters",
    ],
    ["/queues/limits/concurrency/set", { queue: "q" }, "Missing max_running"],
    [
      "/queues/limits/concurrency/set",
      { queue: "q", max_running: "-1" },
      'Invalid max_running "-1": expected a whole number from 0 to 1,000,000',
    ],
    ["/queues/limits/concurrency/set", { queue: "q", max_running: "1.5" }, "Invalid max_running"],
    [
      "/queues/limits/concurrency/set",
      { queue: "q", max_running: "1000001" },
      "Invalid max_running",
    ],
    ["/queues/limits/concurrency/clear", { queue: "q", task: "a b" }, "Invalid task"],
    ["/queues/limits/rate/set", { queue: "q", max_starts: "0", per: "1s" }, "Invalid max_starts"],
    [
      "/queues/limits/rate/set",
      { queue: "q", max_starts: "5", per: "10" },
      'Invalid per "10": expected a number and a unit',
    ],
    [
      "/queues/limits/rate/set",
      { queue: "q", max_starts: "5", per: "2d" },
      'Invalid per "2d": expected from 1 ms to 86,400,000 ms',
    ],
    ["/queues/limits/rate/set", { queue: "q", max_starts: "5" }, "Missing per"],
    ["/queues/holds/hold", { queue: "q", key: "k" }, "Missing for"],
    ["/queues/holds/hold", { queue: "q", key: "k", for: "0ms" }, 'Invalid for "0ms"'],
    ["/queues/holds/release", { key: "k" }, "Missing queue"],
  ];
  for (const [path, fields, message] of bad) {
    const answer = await call(dashboard, path, post(fields));
    const what = `${path} ${JSON.stringify(fields).slice(0, 80)}`;
    assertEquals(answer.status, 400, `${what}: ${answer.body.slice(0, 300)}`);
    assert(answer.body.includes(message.replaceAll('"', "&quot;")), `${what}: ${answer.body}`);
  }
  assertEquals(await flowStatus(db.sql), before);
});

Deno.test("dashboard limit forms set and clear concurrency and rate limits (default, key, task) and hold and release a key", async () => {
  await using db = await testDb();
  await seedDashboard(db.sql);
  const dashboard = open(db.sql);
  const act = async (path: string, fields: Record<string, string>, notice: string) => {
    const answer = await call(dashboard, path, post(fields));
    assertEquals(answer.status, 303, `${path}: ${answer.body}`);
    assertEquals(answer.headers.get("location"), `/queues?notice=${notice}`, path);
  };
  const limits = async () =>
    (await flowStatus(db.sql)).limits.map((l) => [l.queue, l.task, l.key, l.max_running]);
  await act("/queues/limits/concurrency/set", { queue: "mail", max_running: "4" }, "limit_set");
  await act(
    "/queues/limits/concurrency/set",
    { queue: "mail", key: "tenant-7", max_running: "1" },
    "limit_set",
  );
  await act(
    "/queues/limits/concurrency/set",
    { queue: "mail", task: "mail.send", key: "", max_running: "0" },
    "limit_set",
  );
  assertEquals(await limits(), [
    ["bill", null, null, 2],
    ["mail", null, null, 4],
    ["mail", null, "tenant-7", 1],
    ["mail", "mail.send", null, 0],
  ]);
  // The page lists them with a Clear button carrying the exact row.
  const page = await call(dashboard, "/queues");
  assert(page.body.includes('name="key_exact" value="1"'), "the keyed row's Clear sends its key");
  await act(
    "/queues/limits/concurrency/clear",
    { queue: "mail", key: "tenant-7", key_exact: "1" },
    "limit_cleared",
  );
  await act(
    "/queues/limits/concurrency/clear",
    { queue: "mail", task: "mail.send" },
    "limit_cleared",
  );
  await act("/queues/limits/concurrency/clear", { queue: "mail", key: "nobody" }, "no_limit");
  assertEquals(await limits(), [["bill", null, null, 2], ["mail", null, null, 4]]);

  await act("/queues/limits/rate/set", { queue: "mail", max_starts: "10", per: "1m" }, "rate_set");
  assertEquals(
    (await flowStatus(db.sql)).rate_limits.map((r) => [r.queue, r.key, r.max_starts, r.period_ms]),
    [["mail", null, 10, 60_000]],
  );
  await act("/queues/limits/rate/clear", { queue: "mail" }, "rate_cleared");
  assertEquals((await flowStatus(db.sql)).rate_limits, []);

  // A hold names a key, the empty one too (jobs without a key).
  await act("/queues/holds/hold", { queue: "mail", key: "", for: "10m" }, "held");
  const [hold] = (await flowStatus(db.sql)).holds;
  assertEquals([hold?.queue, hold?.key], ["mail", ""]);
  const left = hold!.held_until.getTime() - Date.now();
  assert(left > 500_000 && left <= 600_000 + 5_000, `held for ${left} ms`);
  await act("/queues/holds/release", { queue: "mail", key: "", key_exact: "1" }, "released");
  assertEquals((await flowStatus(db.sql)).holds, []);
});

Deno.test("dashboard limit form answers a flow function's error (the rules lock timing out) in one line, 503", async () => {
  await using db = await testDb();
  const dashboard = open(db.sql);
  let release!: () => void;
  const released = new Promise<void>((resolve) => (release = resolve));
  let locked!: () => void;
  const isLocked = new Promise<void>((resolve) => (locked = resolve));
  // A claim of queue "mail" holds its rules lock shared (sql/functions/flow.sql); a limit
  // change waits for it 5 s at most.
  const holder = db.sql.begin(async (tx) => {
    await tx`select pg_advisory_xact_lock_shared(1936224621, hashtext('mail'))`;
    locked();
    await released;
  });
  try {
    await isLocked;
    const answer = await call(
      dashboard,
      "/queues/limits/concurrency/set",
      post({ queue: "mail", max_running: "3" }),
    );
    assertEquals(answer.status, 503, answer.body);
    const line = /<p id="flow-error">([^<]*)<\/p>/.exec(answer.body)?.[1] ?? answer.body;
    assert(line.startsWith("Could not set the concurrency limit of queue mail: "), line);
    assert(line.includes("a claim of it stayed in flight for 5 s"), line);
    assert(line.endsWith("(55P03)"), line);
    assert(!line.includes("\n"), "one line");
  } finally {
    release();
    await holder;
  }
  assertEquals((await flowStatus(db.sql)).limits, []);
});

Deno.test("dashboard job page shows its steps (escaped, redacted), sleep and progress; the execution page its jobs' progress and step counts", async () => {
  await using db = await testDb();
  const seeded = await seedDashboard(db.sql);
  const dashboard = open(db.sql);
  const job = await call(dashboard, `/jobs/${seeded.withSteps}`);
  assertEquals(job.status, 200, job.body);
  const steps = job.body.slice(job.body.indexOf('id="job-steps"'));
  for (const name of ["extract", "load", "cool-off"]) assert(steps.includes(name), name);
  assert(steps.includes("wakes at 2030-01-02T03:04:05Z"), "the sleep's wake time");
  assert(steps.includes("&lt;b&gt;bold&lt;/b&gt;"), "the result escaped");
  assert(!job.body.includes("<b>bold</b>"), "never raw");
  assert(!job.body.includes(STEP_RESULT.token), "the result's token redacted");
  assert(steps.includes("[redacted]"));
  assert(job.body.includes('<progress value="30" max="120">'), "the progress bar");
  assert(job.body.includes("30/120 copying &lt;rows&gt;"), "the progress figures and message");
  // A job without steps or progress says so, and shows no bar.
  const plain = await call(dashboard, `/jobs/${seeded.ready}`);
  assert(plain.body.includes("No recorded step, sleep or wait."));
  assert(!plain.body.includes('id="job-progress"'));

  // Waits for events: one received (its payload escaped), one still waiting with a timeout.
  await db.sql`
    insert into shoal.job_steps
      (job_id, name, kind, result, wake_at, event_name, event_key, wait_state, event_id)
    values
      (${seeded.withSteps}::bigint, 'approval', 'wait', '{"by": "<i>ana</i>"}', null,
       'approved', 'order-42', 'received', 1),
      (${seeded.withSteps}::bigint, 'review', 'wait', null, '2030-02-03T04:05:06Z',
       'reviewed', '', 'waiting', null)`;
  const waits = (await call(dashboard, `/jobs/${seeded.withSteps}`)).body;
  assert(waits.includes("received event approved (key order-42)"), waits);
  assert(waits.includes("&lt;i&gt;ana&lt;/i&gt;") && !waits.includes("<i>ana</i>"), "escaped");
  assert(waits.includes("waits for event reviewed, times out at 2030-02-03T04:05:06Z"), waits);

  // A job with more records than a page shows: the first 200, and a note.
  await db.sql`
    insert into shoal.job_steps (job_id, name, kind, result, recorded_at)
    select ${seeded.ready}::bigint, 's' || i, 'step', to_jsonb(i), now() + i * interval '1 ms'
    from generate_series(1, 205) i`;
  const many = await call(dashboard, `/jobs/${seeded.ready}`);
  const shown = many.body.slice(many.body.indexOf('id="job-steps"'));
  assertEquals(shown.match(/<tr>/g)?.length, 1 + 200, "the header and 200 rows");
  assert(shown.includes(">s200<") && !shown.includes(">s201<"), "the first 200, in order");
  assert(shown.includes("The first 200 records, in the order recorded; it has more."));

  const execution = await call(dashboard, `/executions/${seeded.execution}`);
  assertEquals(execution.status, 200);
  assert(execution.body.includes(`href="/jobs/${seeded.withSteps}"`));
  assert(execution.body.includes('<progress value="30" max="120">'));
  assert(execution.body.includes("2 steps, 1 sleep, 2 waits"), execution.body);
  assertEquals(SEEDED_PROGRESS.done, 30);
});

Deno.test("dashboard: an execution's page shows its key (idempotent start), escaped", async () => {
  await using db = await testDb();
  const dashboard = open(db.sql);
  const { id } = await startExecution(db.sql, { task: "order.ship" }, { key: "order-<42>" });
  const page = await call(dashboard, `/executions/${id}`);
  assertEquals(page.status, 200);
  assert(page.body.includes("order-&lt;42&gt;"), page.body);
  assert(!page.body.includes("order-<42>"), "the key is escaped");
});

Deno.test("dashboard: an execution's page lists its jobs waiting on dependencies with the ids they wait on", async () => {
  await using db = await testDb();
  const dashboard = open(db.sql);
  const id = await startWorkflow(db.sql, {
    steps: [
      { id: "a", task: "wf.a" },
      { id: "b", task: "wf.b", after: ["a"] },
      { id: "c", task: "wf.c", after: ["a", "b"] },
    ],
  });
  const rows = await db.sql<{ task: string; id: string }[]>`
    select task, id::text from shoal.jobs where execution_id = ${id}::bigint
    union all
    select job->>'task', id::text from shoal.held_jobs where execution_id = ${id}::bigint`;
  const ids = Object.fromEntries(rows.map((r) => [r.task, r.id]));
  const page = await call(dashboard, `/executions/${id}`);
  assertEquals(page.status, 200);
  const held = page.body.slice(page.body.indexOf("<h2>Waiting on dependencies</h2>"));
  assert(
    held.includes(
      `<td >${ids["wf.b"]}</td><td >wf.b</td><td >default</td><td >${ids["wf.a"]}</td>`,
    ),
    held,
  );
  assert(
    held.includes(
      `<td >${ids["wf.c"]}</td><td >wf.c</td><td >default</td><td >${ids["wf.a"]}, ${
        ids["wf.b"]
      }</td>`,
    ),
    held,
  );
  // An execution without any says so.
  const { id: plain } = await startExecution(db.sql, { task: "order.ship" }, { key: "k" });
  assert(
    (await call(dashboard, `/executions/${plain}`)).body.includes("No job waits on a dependency."),
  );
});

Deno.test("dashboard answers 400 naming the parameter for every bad one", async () => {
  await using db = await testDb();
  const dashboard = open(db.sql);
  const bad: [string, string][] = [
    ["/jobs?queue=no%20spaces", 'Invalid queue "no spaces"'],
    ["/jobs?task=%3Cx%3E", "Invalid task"],
    ["/jobs?execution=abc", 'Invalid execution "abc": expected a positive integer id'],
    ["/jobs?execution=0", "Invalid execution"],
    ["/jobs?before=99999999999999999999", "Invalid before"],
    ["/jobs?state=finished", 'Invalid state "finished": expected one of ready, scheduled'],
    ["/jobs?bogus=1", 'Unknown parameter "bogus"'],
    [`/jobs?key=${"k".repeat(513)}`, "Invalid key: expected at most 512 characters"],
    ["/jobs/12abc", 'Invalid job id "12abc"'],
    ["/dead?queue=-x", 'Invalid queue "-x"'],
    ["/executions?status=done", 'Invalid status "done"'],
    ["/executions/x1", 'Invalid execution id "x1"'],
    ["/overview/live?queue=q", 'Unknown parameter "queue"'],
    ["/executions/1/live?x=1", 'Unknown parameter "x"'],
    ["/dead/purge?queue=q", "Missing through"],
    ["/dead/purge?through=1&bogus=1", 'Unknown parameter "bogus"'],
  ];
  for (const [path, message] of bad) {
    const answer = await call(dashboard, path);
    assertEquals(answer.status, 400, `${path}: ${answer.body.slice(0, 200)}`);
    assert(answer.body.includes(message.replaceAll('"', "&quot;")), `${path}: ${answer.body}`);
  }
  const badPost = await call(dashboard, "/queues/bad%20name/pause", post());
  assertEquals(badPost.status, 400);
  const unconfirmed = await call(dashboard, "/dead/purge", post({ queue: "mail" }));
  assertEquals(unconfirmed.status, 400, "a purge without confirm=yes");
  assert(unconfirmed.body.includes("Missing confirm=yes"));
  const notFound = await call(dashboard, "/jobs/123456");
  assertEquals(notFound.status, 404);
});

Deno.test("dashboard pages escape payloads, redact credentials and never show the database URL", async () => {
  await using db = await testDb();
  const seeded = await seedDashboard(db.sql);
  const dashboard = open(db.sql);
  const job = await call(dashboard, `/jobs/${seeded.ready}`);
  assertEquals(job.status, 200);
  assert(!job.body.includes("<script>alert"), "markup in a payload must be escaped");
  assert(job.body.includes("&lt;script&gt;alert"), job.body);
  assert(!job.body.includes("sk-live-not-for-eyes"), "an Authorization header is shown");
  assert(!job.body.includes("424242424242"), "a numeric api key is shown");
  assert(!job.body.includes("not-for-eyes-either"), "a webhook URL's path is shown");
  assert(job.body.includes("https://hooks.slack.com/…"), job.body);
  assert(job.body.includes("[redacted]"));
  assert.match(job.headers.get("content-security-policy") ?? "", /script-src 'self'/);
  const password = new URL(db.url).password;
  for (const path of ["/", "/jobs", "/dead", "/executions", "/schedules", "/queues", "/leases"]) {
    const page = await call(dashboard, path);
    assertEquals(page.status, 200, `${path}: ${page.body.slice(0, 300)}`);
    assert(!page.body.includes(db.url) && !page.body.includes(new URL(db.url).host), path);
    if (password) assert(!page.body.includes(password), path);
    assert.match(page.headers.get("server-timing") ?? "", /^app;dur=\d+(\.\d)?$/);
  }
});

Deno.test("shownJson() redacts every value under a sensitive key and cuts URLs to their origin", () => {
  const shown = JSON.parse(shownJson({
    headers: { Authorization: ["Bearer a", "b"], "X-Api-Key": 12345, cookie: { sid: "s" } },
    token: 987654321,
    password: null,
    nested: [{ client_secret: { value: "deep" } }],
    url: "https://hooks.slack.com/services/T000/B000/XXXX",
    basic: "https://user:pw@example.com",
    query: "http://example.com?sig=abc",
    plain: "https://example.com/",
    db: "postgres://u:p@db.internal/app",
    text: "not a url: https://x.example/y stays (inside text)",
    count: 3,
  }));
  assertEquals(shown, {
    headers: { Authorization: REDACTED, "X-Api-Key": REDACTED, cookie: REDACTED },
    token: REDACTED,
    password: REDACTED,
    nested: [{ client_secret: REDACTED }],
    url: "https://hooks.slack.com/…",
    basic: "https://example.com/…",
    query: "http://example.com/…",
    plain: "https://example.com/",
    db: "postgres://…",
    text: "not a url: https://x.example/y stays (inside text)",
    count: 3,
  });
});

Deno.test("the served htmx and uPlot are the pinned npm packages' files", async () => {
  assertEquals(
    await Deno.readTextFile(ASSETS_MODULE),
    await renderAssetsModule(),
    "lib/dashboard/assets.ts is stale: run deno task dashboard:assets",
  );
  await using db = await testDb();
  const dashboard = open(db.sql);
  const htmx = await call(dashboard, "/assets/htmx.min.js");
  assertEquals(htmx.status, 200);
  assertEquals(htmx.headers.get("content-type"), "text/javascript; charset=utf-8");
  assert(htmx.body.includes("htmx"), "htmx");
  const css = await call(dashboard, "/assets/uPlot.min.css");
  assertEquals(css.headers.get("content-type"), "text/css; charset=utf-8");
  assert(css.body.includes(".uplot"));
  assertEquals((await call(dashboard, "/assets/nope.js")).status, 404);
});

Deno.test("listJobs() and listDeadPage() page newest first by keyset, reading a bounded window", async () => {
  await using db = await testDb();
  const ids: string[] = [];
  for (let i = 0; i < 12; i++) {
    ids.push(await enqueue(db.sql, i % 3 === 0 ? "rare" : "common", { i }, { queue: "q" }));
  }
  const first = await listJobs(db.sql, { limit: 5 });
  assertEquals(first.rows.map((r) => r.id), ids.slice(-5).reverse());
  const second = await listJobs(db.sql, { limit: 5, beforeId: first.next! });
  assertEquals(second.rows.map((r) => r.id), ids.slice(-10, -5).reverse());
  // A window of 4 rows holds one or two "rare" jobs: fewer than asked, and a cursor to go on.
  const rare = await listJobs(db.sql, { task: "rare", limit: 10, scan: 4 });
  assertEquals(rare.rows.map((r) => r.id), [ids[9]!]);
  assertEquals(rare.next, ids[8]); // the oldest job read
  const rest = await listJobs(db.sql, { task: "rare", limit: 10, beforeId: rare.next! });
  assertEquals(rest.rows.map((r) => r.id), [ids[6]!, ids[3]!, ids[0]!]);
  assertEquals(rest.next, null);
  assertEquals((await listJobs(db.sql, { state: "ready" })).rows.length, 12);
  assertEquals((await listJobs(db.sql, { state: "running" })).rows.length, 0);
  assertEquals(await listDeadPage(db.sql), { rows: [], next: null });
});

Deno.test("a role's --http server serves the dashboard at / once ready, on its own pool of 2 opened on the first page, and its probes unchanged", async () => {
  await using db = await testDb();
  let pools = 0;
  const server = new HttpServer({ hostname: "127.0.0.1", port: 0 }, {
    sql: db.sql,
    metrics: new Metrics(),
    dbWindowMs: 3_000,
    dashboard: dashboardFor(
      () => {
        pools++;
        return connect(db.url, {
          applicationName: "shoal test dashboard",
          max: DASHBOARD_POOL_MAX,
        });
      },
      "127.0.0.1",
      { readOnly: false, env: { get: () => undefined } },
    ),
  });
  const dashboardConnections = async () =>
    (await db.sql<{ n: number }[]>`
      select count(*)::integer as n from pg_stat_activity
      where application_name = 'shoal test dashboard'`)[0]!.n;
  try {
    const base = `http://127.0.0.1:${server.port}`;
    // Before the schema check (migrations may be running): no page, no pool.
    const early = await get(base, "/");
    assertEquals([early.status, early.body], [
      503,
      "starting: the dashboard opens once the schema is checked\n",
    ]);
    assertEquals(pools, 0);
    assertEquals((await get(base, "/readyz")).body, "starting\n");
    server.ready();
    const page = await get(base, "/");
    assertEquals(page.status, 200);
    assert(page.body.includes("<title>Overview · shoal</title>"), page.body);
    await Promise.all(["/jobs", "/dead", "/executions", "/queues"].map((p) => get(base, p)));
    assertEquals(pools, 1, "one pool, made on the first page");
    const open = await dashboardConnections();
    assert(open >= 1 && open <= DASHBOARD_POOL_MAX, `${open} connections`);
    assertEquals((await get(base, "/metrics")).status, 200);
    const posted = await fetch(base + "/metrics", { method: "POST" });
    await posted.body?.cancel();
    assertEquals([posted.status, posted.headers.get("allow")], [405, "GET, HEAD"]);
  } finally {
    await server.close();
  }
  await waitFor("the dashboard's pool closed", async () => await dashboardConnections() === 0);
  // Beyond loopback without credentials: no dashboard (the probes are served as before).
  assertEquals(
    dashboardFor(db.sql, "0.0.0.0", { readOnly: false, env: { get: () => undefined } }),
    null,
  );
});

Deno.test("shoal dashboard refuses a non-loopback bind without credentials in one line, exit 2", async () => {
  const { code, stderr } = await runShoal(["dashboard", "--http", "0.0.0.0:0"], {
    url: `postgres://u:s3cret@127.0.0.1:${freePort()}/x`,
    env: { SHOAL_DASHBOARD_TOKEN: "", SHOAL_DASHBOARD_USER: "", SHOAL_DASHBOARD_PASSWORD: "" },
  });
  assertEquals(code, 2, stderr);
  assertEquals(
    stderr,
    "shoal: Refusing to serve the dashboard on 0.0.0.0, beyond loopback, without credentials: " +
      "set SHOAL_DASHBOARD_TOKEN, or SHOAL_DASHBOARD_USER and SHOAL_DASHBOARD_PASSWORD, or bind 127.0.0.1\n",
  );
});

Deno.test("shoal dashboard on 0.0.0.0 with a token asks for it, serves with it, and exits 0 on SIGTERM", async () => {
  await using db = await testDb();
  await using proc = spawnShoal(["dashboard", "--http", "0.0.0.0:0"], {
    url: db.url,
    env: { SHOAL_DASHBOARD_TOKEN: TOKEN },
  });
  const served = await servedAt(proc);
  const base = served.replace("0.0.0.0", "127.0.0.1");
  const refused = await get(base, "/");
  assertEquals(refused.status, 401, refused.body);
  const page = await get(base, "/", { headers: { authorization: `Bearer ${TOKEN}` } });
  assertEquals(page.status, 200);
  assert(page.body.includes("Overview"));
  // Actions too need the token.
  await enqueue(db.sql, "t", {}, { queue: "q" });
  const anonymous = await fetch(base + "/queues/q/pause", { method: "POST" });
  await anonymous.body?.cancel();
  assertEquals(anonymous.status, 401);
  assertEquals((await flowStatus(db.sql)).paused, []);
  await waitFor("the log line", () => proc.output().includes("Serving the dashboard"));
  assert(!proc.output().includes(TOKEN), "the token must never be logged");
  proc.kill("SIGTERM");
  const { code, output } = await exitWithin(proc, 20_000);
  assertEquals(code, 0, output);
});

Deno.test("deadByQueueWithin() counts each queue's recent dead jobs on the database clock", async () => {
  await using db = await testDb();
  await seedDashboard(db.sql);
  const recent = await deadByQueueWithin(db.sql, 300_000);
  assertEquals([...recent.entries()].sort(), [["bill", 1], ["mail", 2]]);
  await db.sql`update shoal.dead_jobs set died_at = now() - interval '10 minutes'
               where queue = 'mail'`;
  assertEquals([...(await deadByQueueWithin(db.sql, 300_000)).entries()], [["bill", 1]]);
  const page = await call(open(db.sql), "/overview/live");
  assertEquals(page.status, 200);
  assert(page.body.includes("dead, last 5 min"), page.body);
});

/** Move live jobs to the dead letters, as a consumer does when their attempts run out. */
async function kill(sql: Db, ids: string[]): Promise<void> {
  await sql`
    with gone as (delete from shoal.jobs where id = any(${ids}::bigint[]) returning *)
    insert into shoal.dead_jobs (id, queue, task, payload, priority, fairness_key, attempts,
      max_attempts, token, key, execution_id, errors, reason, created_at)
    select id, queue, task, payload, priority, fairness_key, 1, 1, token + 1, key,
      execution_id, '[]'::jsonb, 'attempts exhausted', created_at
    from gone`;
}

Deno.test("listJobs() by execution reads jobs_execution_idx, also in the generic plan Postgres switches to after five runs", async () => {
  await using db = await testDb();
  await db.sql`insert into shoal.executions (status) select 'running' from generate_series(1, 200)`;
  await db.sql`
    insert into shoal.jobs (queue, task, execution_id)
    select 'q', 't', case when i % 10 = 0 then (select min(id) from shoal.executions) + (i / 10) % 200 end
    from generate_series(1, 40000) i`;
  await db.sql`analyze shoal.jobs`;
  const [first] = await db.sql<{ id: string }[]>`
    select min(id)::text as id from shoal.executions`;
  const execution = first!.id;
  for (let run = 0; run < 8; run++) {
    const page = await listJobs(db.sql, { executionId: execution });
    assertEquals(page.rows.length, 20, `run ${run}`);
    assert(page.rows.every((r) => r.execution_id === execution));
  }
  // The very statement listJobs() sends, prepared and planned generically.
  const { string } = await listJobsStatement(db.sql, { executionId: execution }).describe();
  const plan = await db.sql.begin(async (tx) => {
    await tx`set local plan_cache_mode = force_generic_plan`;
    await tx.unsafe(`prepare listing as ${string}`);
    const [row] = await tx.unsafe(
      `explain (format json) execute listing('${execution}', 10000, 50)`,
    );
    await tx.unsafe("deallocate listing");
    return JSON.stringify(row);
  });
  assert(plan.includes('"Index Name":"jobs_execution_idx"'), plan);
});

Deno.test("retryDeadMatching() retries the matching dead jobs up to the id shown, in bounded set-based statements", async () => {
  await using db = await testDb();
  const ids: string[] = [];
  for (let i = 0; i < 9; i++) {
    ids.push(
      await enqueue(db.sql, i % 3 === 0 ? "a.t" : "b.t", { i }, {
        queue: i % 2 === 0 ? "even" : "odd",
        ...(i === 4 ? { key: "k4" } : {}),
      }),
    );
  }
  await kill(db.sql, ids);
  // A live job holds dead job 4's dedupe key: it stays dead.
  await enqueue(db.sql, "b.t", {}, { queue: "even", key: "k4" });
  // Queue "even" (jobs 0, 2, 4, 6, 8), up to job 6: 0, 2, 6 retried, 4 a duplicate, 8 after.
  const counts = await retryDeadMatching(db.sql, { queue: "even", throughId: ids[6]! });
  assertEquals(counts, { retried: 3, duplicate: 1, execution_ended: 0, more: false });
  const dead = (await listDeadPage(db.sql)).rows.map((r) => r.id).sort((a, b) => +a - +b);
  assertEquals(dead, [1, 3, 4, 5, 7, 8].map((i) => ids[i]!));
  // Task and queue together: task a.t of queue odd is job 3 only.
  assertEquals(
    await retryDeadMatching(db.sql, { queue: "odd", task: "a.t", throughId: ids[8]! }),
    { retried: 1, duplicate: 0, execution_ended: 0, more: false },
  );
  // Over HTTP: the form posts `through`; without it, nothing is retried.
  const dashboard = open(db.sql);
  const missing = await call(dashboard, "/dead/retry", post({ queue: "odd" }));
  assertEquals(missing.status, 400, missing.body);
  const page = await call(dashboard, "/dead?queue=odd");
  assert(page.body.includes(`name="through" value="${ids[7]}"`), page.body);
  const retried = await call(dashboard, "/dead/retry", post({ queue: "odd", through: ids[5]! }));
  assertEquals(retried.status, 303, retried.body);
  assertEquals(retried.headers.get("location"), "/dead?queue=odd&notice=retried_set");
  const left = (await listDeadPage(db.sql)).rows.map((r) => r.id).sort((a, b) => +a - +b);
  assertEquals(left, [4, 7, 8].map((i) => ids[i]!), "job 7 died after the id shown");
});

Deno.test("the purge keeps the page's task filter, says exactly what goes, and deletes up to the id shown", async () => {
  await using db = await testDb();
  const ids: string[] = [];
  for (let i = 0; i < 6; i++) {
    ids.push(await enqueue(db.sql, i % 2 === 0 ? "x.t" : "y.t", {}, { queue: "q" }));
  }
  await kill(db.sql, ids);
  const dashboard = open(db.sql);
  const list = await call(dashboard, "/dead?task=x.t");
  const link = `/dead/purge?task=x.t&amp;through=${ids[4]}`;
  assert(list.body.includes(`href="${link}"`), list.body);
  const confirm = await call(dashboard, link.replaceAll("&amp;", "&"));
  assertEquals(confirm.status, 200, confirm.body);
  assert(
    confirm.body.includes(
      `Delete 3 dead jobs of every queue, task x.t, id ≤ ${ids[4]} for good?`,
    ),
    confirm.body,
  );
  assert(confirm.body.includes(`name="task" value="x.t"`), confirm.body);
  // A job that dies after the page was shown is not purged.
  const later = await enqueue(db.sql, "x.t", {}, { queue: "q" });
  await kill(db.sql, [later]);
  const purged = await call(
    dashboard,
    "/dead/purge",
    post({ task: "x.t", through: ids[4]!, confirm: "yes" }),
  );
  assertEquals(purged.status, 303, purged.body);
  assertEquals(purged.headers.get("location"), "/dead?task=x.t&notice=purged");
  const left = (await listDeadPage(db.sql)).rows.map((r) => r.id).sort((a, b) => +a - +b);
  assertEquals(left, [ids[1]!, ids[3]!, ids[5]!, later], "task y.t kept, and the later one");
  assertEquals(await purgeDead(db.sql, { task: "y.t", throughId: ids[3]! }), 2);
  assertEquals(await purgeDead(db.sql, {}), 2);
});

/**
 * The URL of every script a Deno program runs `code` loads, as its inspector reports them
 * (V8's Debugger.scriptParsed, npm packages included), run from a temporary file with the
 * project's deno.json.
 */
async function scriptsLoaded(code: string): Promise<string[]> {
  const file = await Deno.makeTempFile({ suffix: ".ts" });
  const port = freePort();
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      `--config=${new URL("../deno.json", import.meta.url).pathname}`,
      `--inspect-wait=127.0.0.1:${port}`,
      file,
    ],
    stdin: "null",
    stdout: "piped",
    stderr: "inherit",
  });
  // The inspector keeps the process until it disconnects: the script says when it is done.
  await Deno.writeTextFile(file, `${code}\nconsole.log("loaded");\n`);
  const proc = child.spawn();
  try {
    const target = await waitFor("the inspector", async () => {
      try {
        const response = await fetch(`http://127.0.0.1:${port}/json/list`);
        return ((await response.json()) as { webSocketDebuggerUrl: string }[])[0];
      } catch (error) {
        if (error instanceof TypeError) return undefined; // not listening yet
        throw error;
      }
    });
    const urls: string[] = [];
    const socket = new WebSocket(target.webSocketDebuggerUrl);
    const closed = new Promise<void>((resolve) => socket.onclose = () => resolve());
    socket.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (message.method === "Debugger.scriptParsed") urls.push(message.params.url);
      if (message.method === "Debugger.paused") {
        socket.send(JSON.stringify({ id: 100, method: "Debugger.resume" }));
      }
    };
    await new Promise((resolve) => socket.onopen = resolve);
    ["Runtime.enable", "Debugger.enable", "Runtime.runIfWaitingForDebugger"].forEach(
      (method, id) => socket.send(JSON.stringify({ id, method })),
    );
    const reader = proc.stdout.pipeThrough(new TextDecoderStream()).getReader();
    let stdout = "";
    while (!stdout.includes("loaded\n")) {
      const { value, done } = await reader.read();
      if (done) break;
      stdout += value;
    }
    socket.close();
    await closed;
    for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) {
      stdout += chunk.value;
    }
    const { code: exit } = await proc.status;
    assertEquals([exit, stdout], [0, "loaded\n"]);
    return urls;
  } finally {
    await Deno.remove(file);
  }
}

Deno.test("a role without --http never loads Hono (nor the dashboard's assets)", async () => {
  const lib = (path: string) => new URL(`../lib/${path}`, import.meta.url).href;
  const roleOnly = await scriptsLoaded(`
    import "${lib("cli.ts")}";
    import { startHttp } from "${lib("roles.ts")}";
    if (await startHttp(null as never, undefined, {}) !== null) throw new Error("a server");
  `);
  assert(roleOnly.some((u) => u.endsWith("/lib/roles.ts")), roleOnly.join("\n"));
  // guard.ts is the CLI's (the bind rule); the app, its views and assets are not.
  const hono = (urls: string[]) =>
    urls.filter((u) => /\/hono\/|\/lib\/dashboard\/(app|views|assets|server)\./.test(u));
  assertEquals(hono(roleOnly), []);
  // The check sees Hono when it is loaded.
  const withDashboard = await scriptsLoaded(`await import("${lib("dashboard/server.ts")}");`);
  assert(withDashboard.some((u) => /\/hono\//.test(u)), withDashboard.join("\n"));
});

Deno.test("retryDeadMatching() stops at its cap of 10,000 a call, in statements of 1,000, and says more are left", async () => {
  await using db = await testDb();
  await db.sql`
    insert into shoal.dead_jobs (id, queue, task, payload, priority, fairness_key, attempts,
      max_attempts, errors, reason, created_at, died_at)
    select i, 'q', 't', '{}', 0, '', 3, 3, '[]', 'attempts exhausted', now(), now()
    from generate_series(1, 10050) i`;
  const first = await retryDeadMatching(db.sql, { throughId: "10050" });
  assertEquals(first, { retried: 10_000, duplicate: 0, execution_ended: 0, more: true });
  const [left] = await db.sql<{ n: number }[]>`
    select count(*)::integer as n from shoal.dead_jobs where id <= 50`;
  assertEquals(left!.n, 50, "the newest went first");
  const second = await retryDeadMatching(db.sql, { throughId: "10050" });
  assertEquals(second, { retried: 50, duplicate: 0, execution_ended: 0, more: false });
});
