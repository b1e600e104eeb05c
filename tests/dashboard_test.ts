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
import { SECRET_PAYLOAD, seedDashboard } from "./dashboard_fixture.ts";
import { createDashboard, type Dashboard } from "../lib/dashboard/app.tsx";
import {
  accessFromEnv,
  authenticate,
  bindRefusal,
  crossSiteRefusal,
  isLoopback,
  TOKEN_COOKIE,
} from "../lib/dashboard/guard.ts";
import { ASSETS_MODULE, renderAssetsModule } from "../scripts/dashboard_assets.ts";
import { HttpServer } from "../lib/http_server.ts";
import { loadPromClient, Metrics } from "../lib/metrics.ts";
import { dashboardFor } from "../lib/dashboard/server.ts";
import { enqueue, listJobs } from "../lib/queue.ts";
import { flowStatus } from "../lib/flow.ts";
import { deadByQueueWithin, listDeadPage } from "../lib/dead.ts";
import type { Db } from "../lib/db.ts";

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
  assert(
    authenticate(new Request(url, { headers: { cookie: `${TOKEN_COOKIE}=${TOKEN}` } }), {
      token: TOKEN,
    }).ok,
  );
  const visit = authenticate(new Request(`${url}&token=${TOKEN}`), { token: TOKEN });
  if (visit.ok) throw new Error("a ?token= visit is answered with a redirect");
  assertEquals(visit.response.status, 303);
  assertEquals(visit.response.headers.get("location"), "/jobs?queue=q"); // token dropped
  assert(visit.response.headers.get("set-cookie")!.includes("HttpOnly; SameSite=Strict"));
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

Deno.test("crossSiteRefusal() refuses cross-site and cross-origin POSTs only", () => {
  const at = (headers: Record<string, string>) =>
    crossSiteRefusal(new Request(`${BASE}/dead/purge`, { method: "POST", headers }));
  assertEquals(at({ "sec-fetch-site": "same-origin", origin: BASE }), null);
  assertEquals(at({}), null); // not a browser: judged by credentials alone
  assert(at({ "sec-fetch-site": "cross-site" })?.startsWith("cross-site request refused"));
  assert(at({ "sec-fetch-site": "same-site" })?.startsWith("cross-site request refused"));
  assert(at({ origin: "https://evil.example" })?.startsWith("cross-origin request refused"));
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
  const forged = await call(
    dashboard,
    "/queues/q/pause",
    post({}, { origin: "https://evil.example", "sec-fetch-site": "" }),
  );
  assertEquals(forged.status, 403, forged.body);
  assertEquals((await flowStatus(db.sql)).paused, []);
  const ok = await call(dashboard, "/queues/q/pause", post());
  assertEquals(ok.status, 303, ok.body);
  assertEquals(ok.headers.get("location"), "/?notice=paused");
  assertEquals((await flowStatus(db.sql)).paused.map((p) => p.queue), ["q"]);
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
    ]
  ) {
    const refused = await call(dashboard, path, post());
    assertEquals([refused.status, refused.body], [403, "refused: the dashboard is read-only\n"]);
  }
  assertEquals((await listDeadPage(db.sql)).rows.length, 3, "nothing retried");
  assertEquals((await flowStatus(db.sql)).paused.map((p) => p.queue), ["reports"]);
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
  assert(job.body.includes("[redacted]"));
  assert.match(job.headers.get("content-security-policy") ?? "", /script-src 'self'/);
  assertEquals(SECRET_PAYLOAD.headers.Authorization.length > 0, true);
  const password = new URL(db.url).password;
  for (const path of ["/", "/jobs", "/dead", "/executions", "/schedules", "/queues", "/leases"]) {
    const page = await call(dashboard, path);
    assertEquals(page.status, 200, `${path}: ${page.body.slice(0, 300)}`);
    assert(!page.body.includes(db.url) && !page.body.includes(new URL(db.url).host), path);
    if (password) assert(!page.body.includes(password), path);
    assert.match(page.headers.get("server-timing") ?? "", /^app;dur=\d+(\.\d)?$/);
  }
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

Deno.test("a role's --http server serves the dashboard at / and its probes unchanged", async () => {
  await using db = await testDb();
  const server = new HttpServer({ hostname: "127.0.0.1", port: 0 }, {
    sql: db.sql,
    metrics: new Metrics(),
    dbWindowMs: 3_000,
    dashboard: dashboardFor(db.sql, "127.0.0.1", {
      readOnly: false,
      env: { get: () => undefined },
    }),
  });
  try {
    const base = `http://127.0.0.1:${server.port}`;
    const page = await get(base, "/");
    assertEquals(page.status, 200);
    assert(page.body.includes("<title>Overview · shoal</title>"), page.body);
    assertEquals((await get(base, "/readyz")).body, "starting\n");
    assertEquals((await get(base, "/metrics")).status, 200);
    const posted = await fetch(base + "/metrics", { method: "POST" });
    await posted.body?.cancel();
    assertEquals([posted.status, posted.headers.get("allow")], [405, "GET, HEAD"]);
  } finally {
    await server.close();
  }
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
