/**
 * The dashboard in a real browser: Playwright (npm:playwright-core) driving Debian's Chromium
 * loads every page against a real database with jobs in every state, clicks retry, cancel,
 * pause, resume, run now and purge, and checks the database changed; the live parts (the
 * overview, an open execution) must update without a reload. A page that answers an HTTP
 * error or logs a console error fails the test; so does a missing Chromium (never a skip).
 *
 * With SHOAL_DASHBOARD_SCREENSHOTS=1 it also writes the screenshots in docs/dashboard/.
 */
import { type Browser, chromium, type Page } from "playwright-core";
import { assert, assertEquals } from "./assert.ts";
import { figure, testDb, waitFor } from "./helpers.ts";
import { seedDashboard, type Seeded } from "./dashboard_fixture.ts";
import { DashboardServer } from "../lib/dashboard/server.ts";
import { getJob, listJobs } from "../lib/queue.ts";
import { getDead, listDeadPage } from "../lib/dead.ts";
import { getExecution } from "../lib/execution.ts";
import { flowStatus } from "../lib/flow.ts";
import { listSchedules } from "../lib/schedule.ts";
import { enqueue, enqueueMany } from "../lib/queue.ts";
import { defineTask } from "../lib/tasks.ts";
import { startConsumer } from "./helpers.ts";
import type { Sql } from "../lib/db.ts";

const CHROMIUM = "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--no-first-run",
];
const SCREENSHOTS = Deno.env.get("SHOAL_DASHBOARD_SCREENSHOTS") === "1"
  ? new URL("../docs/dashboard/", import.meta.url)
  : null;

async function requireChromium(): Promise<void> {
  try {
    await Deno.stat(CHROMIUM);
  } catch (cause) {
    throw new Error(
      `No Chromium at ${CHROMIUM}: install it (apt-get install -y chromium; .ci/run does)`,
      { cause },
    );
  }
}

/** Everything that went wrong in the browser: HTTP errors, console errors, page errors. */
function watchProblems(page: Page): string[] {
  const problems: string[] = [];
  page.on("console", (message) => {
    if (message.type() === "error") problems.push(`console: ${message.text()}`);
  });
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  page.on("response", (response) => {
    if (response.status() >= 400) problems.push(`HTTP ${response.status()} ${response.url()}`);
  });
  page.on("requestfailed", (request) => {
    problems.push(`request failed: ${request.url()} ${request.failure()?.errorText}`);
  });
  return problems;
}

Deno.test({
  name:
    "dashboard in Chromium: every page loads, the live parts update, and the actions change the database",
  // Sanitized (deno.json): a timer, server or connection of ours left open fails it. Only the
  // step that drives Chromium is not: Playwright's pipe reads run until browser.close(), in it.
  async fn(t) {
    await requireChromium();
    await using db = await testDb();
    const seeded = await seedDashboard(db.sql);
    const server = new DashboardServer(db.sql, { hostname: "127.0.0.1", port: 0 }, {
      readOnly: false,
      env: { get: () => undefined },
    });
    const base = `http://127.0.0.1:${server.port}`;
    const timings: string[] = [];
    try {
      await t.step({
        name: "pages and actions in Chromium",
        sanitizeOps: false,
        sanitizeResources: false,
        fn: async () => {
          const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
          try {
            await pagesAndActions(browser, base, db.sql, seeded, timings);
          } finally {
            await browser.close();
          }
        },
      });
    } finally {
      await server.close();
    }
    figure(
      `dashboard page server times (ms): ${
        timings.map((t) => t.replace("app;dur=", "")).join(", ")
      }`,
    );
  },
});

/** Every page, the live parts and the actions, in one page of `browser`. */
async function pagesAndActions(
  browser: Browser,
  base: string,
  sql: Sql,
  seeded: Seeded,
  timings: string[],
): Promise<void> {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const problems = watchProblems(page);
  page.on("response", (response) => {
    const timing = response.headers()["server-timing"];
    const path = new URL(response.url()).pathname;
    if (timing && !path.startsWith("/assets/")) timings.push(`${path} ${timing}`);
  });
  const visit = async (path: string, shows: string, shot?: string) => {
    const response = await page.goto(base + path);
    assertEquals(response?.status(), 200, path);
    // In the page's content (a <select> option holding the text is hidden).
    await page.locator("main :is(td, dd, p, pre, h2, code)", { hasText: shows }).first()
      .waitFor();
    if (shot && SCREENSHOTS) {
      await page.screenshot({
        path: new URL(`${shot}.png`, SCREENSHOTS).pathname,
        fullPage: true,
      });
    }
    assertEquals(problems, [], `after ${path}`);
  };

  // Overview: every queue, its states, the chart drawn by uPlot; live without reload.
  await visit("/", "mail");
  for (const queue of ["mail", "bill", "flow", "reports"]) {
    await page.locator("#overview td", { hasText: queue }).first().waitFor();
  }
  await page.locator("#overview .uplot").waitFor(); // uPlot drew the chart
  await enqueue(sql, "late.t", {}, { queue: "arrived-later" });
  await page.locator("#overview td", { hasText: "arrived-later" }).waitFor({ timeout: 5000 });
  if (SCREENSHOTS) {
    await page.waitForTimeout(4500); // a few samples on the chart
    await page.screenshot({
      path: new URL("overview.png", SCREENSHOTS).pathname,
      fullPage: true,
    });
  }

  // Jobs, each state, and the detail pages.
  await visit("/jobs", "mail.send", "jobs");
  for (const state of ["ready", "scheduled", "running", "prefetched", "dead"]) {
    await visit(`/jobs?state=${state}`, state === "dead" ? "dead" : state);
    const rows = await page.locator("tbody tr").count();
    assert(rows >= 1, `no ${state} job listed`);
  }
  await visit(`/jobs?queue=bill&state=running`, "bill.charge");
  assertEquals(await page.locator("tbody tr").count(), 1);
  await visit(`/jobs/${seeded.ready}`, "[redacted]", "job");
  assertEquals(await page.locator("#job-state").textContent(), "ready");
  assert(
    (await page.locator("#payload").textContent())!.includes("<script>alert('x')</script>"),
  );
  await visit(`/jobs/${seeded.dead[2]}`, "SMTP said 550");
  // A job with recorded steps, a sleep and a progress.
  await visit(`/jobs/${seeded.withSteps}`, "cool-off");
  assertEquals(await page.locator("#job-steps tbody tr").count(), 3);
  await page.locator("#job-steps td", { hasText: "wakes at 2030-01-02T03:04:05Z" }).waitFor();
  assert((await page.locator("#job-steps").textContent())!.includes("<b>bold</b>"), "as text");
  assertEquals(await page.locator("#job-steps b").count(), 0, "never markup");
  assertEquals(await page.locator("#job-progress progress").getAttribute("value"), "30");
  assert((await page.locator("#job-progress").textContent())!.includes("30/120 copying <rows>"));
  await visit("/leases", "host-a:1", "leases");
  await visit("/queues", "Concurrency limits", "queues");
  await visit("/schedules", "nightly-report", "schedules");
  await visit("/executions", "running", "executions");

  // An open execution updates itself: two more children arrive.
  await visit(`/executions/${seeded.execution}`, "1/4", "execution");
  await sql`update shoal.barriers set remaining = 1
               where execution_id = ${seeded.execution}::bigint`;
  await page.locator("#execution", { hasText: "3/4" }).waitFor({ timeout: 5000 });

  // Cancel the pending execution.
  await visit(`/executions/${seeded.pendingExecution}`, "pending");
  await page.getByRole("button", { name: "Cancel execution" }).click();
  await page.getByText("Execution cancelled").waitFor();
  assertEquals((await getExecution(sql, seeded.pendingExecution))?.status, "cancelled");

  // Retry one dead job: it is live again.
  await visit("/dead", "attempts exhausted", "dead");
  await page.locator(`form[action="/dead/${seeded.dead[0]}/retry"] button`).click();
  await page.getByText("Dead job put back on its queue").waitFor();
  assertEquals(await getDead(sql, seeded.dead[0]!), null);
  assertEquals((await getJob(sql, seeded.dead[0]!))?.state, "ready");

  // Retry the filtered set: queue bill's dead job.
  await visit("/dead?queue=bill", "bill.charge");
  await page.getByRole("button", { name: /Retry all matching/ }).click();
  await page.getByText("Retried the matching dead jobs").waitFor();
  assertEquals(await getDead(sql, seeded.dead[2]!), null);
  assert(await getJob(sql, seeded.dead[2]!) !== null);

  // Purge, after the confirmation page: the last dead job goes.
  await visit("/dead", "attempts exhausted");
  await page.getByRole("link", { name: /Purge all/ }).click();
  await page.getByText("for good?").waitFor();
  assertEquals((await listDeadPage(sql)).rows.length, 1, "nothing purged before confirming");
  await page.getByRole("button", { name: "Yes, purge" }).click();
  await page.getByText("Purged").first().waitFor();
  assertEquals((await listDeadPage(sql)).rows.length, 0);

  // Pause and resume a queue from the overview.
  await visit("/", "mail");
  await page.locator('form[action="/queues/mail/pause"] button').click();
  await page.locator('form[action="/queues/mail/resume"] button').waitFor();
  assert((await flowStatus(sql)).paused.some((p) => p.queue === "mail"));
  await page.locator('form[action="/queues/mail/resume"] button').click();
  await page.locator('form[action="/queues/mail/pause"] button').waitFor();
  assert(!(await flowStatus(sql)).paused.some((p) => p.queue === "mail"));
  // And the paused one from the queues page.
  await visit("/queues", "reports");
  await page.locator('form[action="/queues/reports/resume"] button').click();
  await page.getByText("Resumed").waitFor();
  assertEquals((await flowStatus(sql)).paused, []);

  // Limits: set a key's concurrency limit and a task's own, clear them; hold and release.
  const limitRows = async () =>
    (await flowStatus(sql)).limits.map((l) => [l.queue, l.task, l.key, l.max_running]);
  await visit("/queues", "Concurrency limits");
  const concurrency = page.locator('form[action="/queues/limits/concurrency/set"]');
  await concurrency.locator('input[name="queue"]').fill("mail");
  await concurrency.locator('input[name="key"]').fill("tenant-7");
  await concurrency.locator('input[name="max_running"]').fill("3");
  await concurrency.getByRole("button", { name: "Set concurrency limit" }).click();
  await page.getByText("Concurrency limit set").waitFor();
  assertEquals(await limitRows(), [["bill", null, null, 2], ["mail", null, "tenant-7", 3]]);
  // Afresh, without the notice, so the next notice is the next action's.
  await visit("/queues", "Concurrency limits");
  await concurrency.locator('input[name="queue"]').fill("mail");
  await concurrency.locator('input[name="task"]').fill("mail.send");
  await concurrency.locator('input[name="max_running"]').fill("0");
  await concurrency.getByRole("button", { name: "Set concurrency limit" }).click();
  await page.getByText("Concurrency limit set").waitFor();
  assertEquals(await limitRows(), [
    ["bill", null, null, 2],
    ["mail", null, "tenant-7", 3],
    ["mail", "mail.send", null, 0],
  ]);
  await page.locator("tr", { hasText: '"tenant-7"' })
    .locator('form[action="/queues/limits/concurrency/clear"] button').click();
  await page.getByText("Concurrency limit cleared").waitFor();
  await visit("/queues", "Concurrency limits");
  await page.locator("tr", { hasText: "mail.send" })
    .locator('form[action="/queues/limits/concurrency/clear"] button').click();
  await page.getByText("Concurrency limit cleared").waitFor();
  assertEquals(await limitRows(), [["bill", null, null, 2]]);
  const hold = page.locator('form[action="/queues/holds/hold"]');
  await hold.locator('input[name="queue"]').fill("mail");
  await hold.locator('input[name="key"]').fill("tenant-7");
  await hold.locator('input[name="for"]').fill("10m");
  await hold.getByRole("button", { name: "Hold key" }).click();
  await page.getByText("Key held").waitFor();
  assertEquals((await flowStatus(sql)).holds.map((h) => [h.queue, h.key]), [["mail", "tenant-7"]]);
  await page.locator("tr", { hasText: '"tenant-7"' }).getByRole("button", { name: "Release" })
    .click();
  await page.getByText("Hold lifted").waitFor();
  assertEquals((await flowStatus(sql)).holds, []);

  // Schedules: pause, resume, run now.
  const enabled = async () => (await listSchedules(sql))[0]!.enabled;
  await visit("/schedules", "nightly-report");
  await page.getByRole("button", { name: "Pause" }).click();
  await page.getByText("Paused").first().waitFor();
  assertEquals(await enabled(), false);
  await page.getByRole("button", { name: "Resume" }).click();
  await page.getByText("Resumed").waitFor();
  assertEquals(await enabled(), true);
  await page.getByRole("button", { name: "Run now" }).click();
  await page.getByText("Enqueued a run now").waitFor();
  const ran = await waitFor(
    "the run-now job",
    async () => (await listJobs(sql, { task: "report.build" })).rows[0],
  );
  assertEquals(ran.queue, "reports");

  assertEquals(problems, [], "browser problems");
  if (SCREENSHOTS) await overviewWithTraffic(page, sql, SCREENSHOTS);
}

/**
 * The overview screenshot, with work going on: a consumer runs jobs of queue "traffic" (one
 * in ten fails for good) while more arrive, so the chart has something to draw.
 */
async function overviewWithTraffic(page: Page, sql: Sql, dir: URL): Promise<void> {
  const work = defineTask<{ i: number }>({
    name: "traffic.work",
    queue: "traffic",
    maxAttempts: 1,
    handler: (payload) => {
      if (payload.i % 10 === 0) throw new Error("one in ten fails");
    },
  });
  const consumer = startConsumer(sql, [work], { queues: ["traffic"], concurrency: 8 });
  try {
    await page.goto(`${page.url().split("/").slice(0, 3).join("/")}/`);
    for (let round = 0; round < 16; round++) {
      await enqueueMany(
        sql,
        Array.from({ length: 40 + 10 * (round % 4) }, (_, i) => ({
          task: "traffic.work",
          queue: "traffic",
          payload: { i },
        })),
      );
      await page.waitForTimeout(500);
    }
    await page.screenshot({ path: new URL("overview.png", dir).pathname, fullPage: true });
  } finally {
    await consumer.stop();
  }
}
