/**
 * shoal's web dashboard: a Hono app served by any role's `--http` server (lib/http_server.ts)
 * at `/`, by `shoal dev`, and alone by `shoal dashboard`.
 *
 * Pages: overview (queues, throughput, live every 2 s through htmx), jobs (filters, keyset
 * pages), job detail, dead letters (retry one or a filtered set, purge after a confirmation
 * page), executions (fan-out progress, cancel; an open one updates itself), schedules
 * (pause, resume, run now), queues and limits (pause, resume), leases.
 *
 * It holds no SQL: each read and action is a function of the module that owns the table
 * (status.ts, queue.ts, dead.ts, execution.ts, schedule.ts, flow.ts, lease.ts). Every read
 * is bounded: the counts are status.ts's (estimated on a large table, never a count(*) over
 * the jobs), the listings read a bounded window along an index.
 *
 * Safety (lib/dashboard/guard.ts): credentials when configured, POSTs only for actions,
 * refused when cross-site, refused in read-only mode; every parameter validated
 * (lib/dashboard/params.ts); a Content-Security-Policy that allows the server's own scripts
 * only. Nothing rendered comes from the configuration (no database URL, no secret).
 *
 * @module
 */
import { type Context, Hono } from "hono";
import type { PropsWithChildren } from "hono/jsx";
import type { Db } from "../db.ts";
import { describeError, logger } from "../log.ts";
import { queueStatus } from "../status.ts";
import {
  clearConcurrencyLimit,
  clearRateLimit,
  flowStatus,
  holdKey,
  MAX_RATE_PERIOD_MS,
  MAX_RATE_STARTS,
  MAX_RUNNING_LIMIT,
  pauseQueue,
  resumeQueue,
  setConcurrencyLimit,
  setRateLimit,
} from "../flow.ts";
import { MAX_HOLD_MS } from "../queue.ts";
import { listSteps, stepCounts, type StepRow } from "../steps.ts";

import { getJob, listJobs, LIVE_JOB_STATES, type LiveJobState, progressOf } from "../queue.ts";
import {
  countDeadMatching,
  deadByQueueWithin,
  getDead,
  listDeadPage,
  MAX_RETRY_TOTAL,
  purgeDead,
  retryDead,
  retryDeadMatching,
} from "../dead.ts";
import {
  cancelExecution,
  EXECUTION_STATUSES,
  executionBarriers,
  getExecution,
  listExecutionsPage,
  listHeldJobs,
} from "../execution.ts";
import { listSchedules, runScheduleNow, setScheduleEnabled } from "../schedule.ts";
import { listLeases } from "../lease.ts";
import { HTMX_JS, UPLOT_CSS, UPLOT_JS } from "./assets.ts";
import { DASHBOARD_CSS, DASHBOARD_JS } from "./client.ts";
import { authenticate, crossSiteRefusal, type DashboardAccess, hostRefusal } from "./guard.ts";
import {
  BadRequest,
  choiceParam,
  durationParam,
  fairnessKeyParam,
  flowKeyParam,
  idParam,
  intParam,
  keyParam,
  nameParam,
  onlyParams,
  requiredId,
  requiredName,
} from "./params.ts";
import { BIN_MS, ThroughputHistory } from "./throughput.ts";
import type { QueueRateSeries, QueueTotals } from "../catalog.ts";
import {
  Action,
  age,
  count,
  JobProgressBar,
  Layout,
  Notice,
  OlderLink,
  Progress,
  shownJson,
  Table,
  type View,
  when,
} from "./views.tsx";

export interface DashboardOptions {
  /** The actions' pool: every POST writes through it (the primary). */
  db: Db;
  /**
   * Where the pages read (`--read-database-url`: a replica, whose figures may lag); `db`
   * when none. A page shown after an action may not show it yet, by that lag.
   */
  readDb?: Db;
  /** Hide the actions and refuse every POST. */
  readOnly: boolean;
  /** The credentials asked for (none: the bind is loopback, see guard.ts). */
  access: DashboardAccess;
}

/** What a server needs of the dashboard: a fetch handler. */
export interface Dashboard {
  fetch(request: Request): Promise<Response>;
}

/** The overview's "dead, last 5 min" column: recent failures per queue. */
const RECENT_DEAD_MS = 5 * 60_000;

/** What a flow-control action does, for its error line. */
const FLOW_DOING: Record<string, string> = {
  "limit.set": "set the concurrency limit",
  "limit.clear": "clear the concurrency limit",
  "rate_limit.set": "set the rate limit",
  "rate_limit.clear": "clear the rate limit",
  "key.hold": "hold the key",
  "key.release": "release the key",
};

/** The most step records a job's page shows. */
const MAX_SHOWN_STEPS = 200;

/** How often the live parts reload themselves (the issue asks for at most 2 s). */
export const LIVE_EVERY = "every 2s";

const CSP = [
  "default-src 'self'",
  "script-src 'self'",
  // uPlot positions its parts with style attributes; no style comes from user data.
  "style-src 'self' 'unsafe-inline'",
  "img-src 'self' data:",
  "frame-ancestors 'none'",
  "form-action 'self'",
  "base-uri 'none'",
].join("; ");

const ASSETS: Record<string, { body: string; type: string }> = {
  "htmx.min.js": { body: HTMX_JS, type: "text/javascript; charset=utf-8" },
  "uPlot.iife.min.js": { body: UPLOT_JS, type: "text/javascript; charset=utf-8" },
  "uPlot.min.css": { body: UPLOT_CSS, type: "text/css; charset=utf-8" },
  "dashboard.js": { body: DASHBOARD_JS, type: "text/javascript; charset=utf-8" },
  "dashboard.css": { body: DASHBOARD_CSS, type: "text/css; charset=utf-8" },
};

/** The job states the jobs page filters on: the live ones and the dead letters. */
const JOB_STATES: readonly (LiveJobState | "dead")[] = [...LIVE_JOB_STATES, "dead"];

/** Notices an action redirects with: fixed texts, so no message comes from the address. */
const NOTICES: Record<string, string> = {
  retried: "Dead job put back on its queue",
  duplicate: "Not retried: a live job holds its dedupe key",
  execution_ended: "Not retried: its execution has ended",
  not_found: "Nothing done: it no longer exists",
  cancelled: "Execution cancelled",
  not_cancelled: "Not cancelled: the execution had already ended",
  paused: "Paused",
  resumed: "Resumed",
  unchanged: "Nothing changed: it already was",
  ran: "Enqueued a run now",
  purged: "Purged",
  retried_set: "Retried the matching dead jobs",
  limit_set: "Concurrency limit set",
  limit_cleared: "Concurrency limit cleared",
  rate_set: "Rate limit set",
  rate_cleared: "Rate limit cleared",
  no_limit: "Nothing cleared: there was no such limit",
  held: "Key held",
  released: "Hold lifted",
  retried_some: `Retried the first ${
    MAX_RETRY_TOTAL.toLocaleString("en-US")
  } matching dead jobs: retry again for the rest`,
};

export function createDashboard(options: DashboardOptions): Dashboard {
  const { db: primary, readOnly, access } = options;
  /** Every page reads here; only the actions (app.post) write through `primary`. */
  const db = options.readDb ?? primary;
  const log = logger("dashboard");
  const history = new ThroughputHistory();
  const app = new Hono();

  app.onError((error, c) => {
    if (error instanceof BadRequest) {
      return c.html(
        <Layout title="Bad request" current="" readOnly={readOnly}>
          <p>{error.message}</p>
        </Layout>,
        400,
      );
    }
    log.error("Dashboard page failed: {error}", {
      path: new URL(c.req.url).pathname,
      error: describeError(error),
    });
    return c.text("internal error: see the server's log\n", 500);
  });

  // Every request: its Host (no credentials: loopback names only), credentials, then (for a
  // POST) read-only and cross-site refusals; the server time is reported in a Server-Timing
  // header (the page-time figures come from it).
  app.use(async (c, next) => {
    const started = performance.now();
    const misdirected = hostRefusal(c.req.raw, access);
    if (misdirected !== null) return c.text(`${misdirected}\n`, 421);
    const auth = authenticate(c.req.raw, access);
    if (!auth.ok) return auth.response;
    if (c.req.method === "POST") {
      if (readOnly) return c.text("refused: the dashboard is read-only\n", 403);
      const refusal = crossSiteRefusal(c.req.raw);
      if (refusal !== null) return c.text(`refused: ${refusal}\n`, 403);
    } else if (c.req.method !== "GET" && c.req.method !== "HEAD") {
      return c.text("only GET and POST\n", 405, { allow: "GET, HEAD, POST" });
    }
    await next();
    c.header("server-timing", `app;dur=${(performance.now() - started).toFixed(1)}`);
    c.header("x-content-type-options", "nosniff");
    c.header("referrer-policy", "same-origin");
    if (!c.req.path.startsWith("/assets/")) {
      c.header("content-security-policy", CSP);
      c.header("cache-control", "no-store");
    }
  });

  app.get("/assets/:file", (c) => {
    const asset = ASSETS[c.req.param("file")];
    if (!asset) return c.text("not found\n", 404);
    return c.body(asset.body, 200, {
      "content-type": asset.type,
      "cache-control": "public, max-age=3600",
    });
  });

  /** The page's notice from `?notice=` (a fixed text picked by code, or none). */
  const notice = (c: Context): string | null => {
    const code = c.req.query("notice");
    return code === undefined ? null : NOTICES[code] ?? null;
  };

  /** Redirect after an action (303: the browser follows with a GET). */
  const done = (c: Context, path: string, code: string): Response => {
    const url = new URL(path, "http://x");
    url.searchParams.set("notice", code);
    return c.redirect(url.pathname + url.search, 303);
  };

  /** Log an action with fixed keys: what, and on which row; never a parameter's text. */
  const acted = (action: string, target: string, outcome: string) =>
    log.info("Dashboard action {action} on {target}: {outcome}", { action, target, outcome });

  // ---- Overview ----------------------------------------------------------------------

  const overview = async () => {
    await history.sample(db);
    const [queues, flow] = [await queueStatus(db), await flowStatus(db)];
    const recentDead = await deadByQueueWithin(db, RECENT_DEAD_MS);
    const paused = new Set(flow.paused.map((p) => p.queue));
    const listed = new Set(queues.map((q) => q.queue));
    // Queues that finished jobs lately but hold none now (completed jobs leave no row).
    const finishedOnly = history.queues().filter((q) => !listed.has(q));
    const idle = [...new Set([...paused, ...finishedOnly])].filter((q) => !listed.has(q)).sort();
    const all = history.series();
    const allRecent = recentRates(all);
    const chart = [all.t, all.completedPerS, all.failedPerS, all.deadPerS];
    const rates = (queue: string) => <QueueRates series={history.series(queue)} />;
    return (
      <div>
        <Table
          head={[
            "queue",
            "ready",
            "scheduled",
            "running",
            "prefetched",
            "dead",
            "dead, last 5 min",
            "oldest ready",
            "completed/s (1 min), failed (10 min)",
            "state",
            "",
          ]}
          numeric={[1, 2, 3, 4, 5, 6, 7]}
          empty="No queues yet: nothing has been enqueued."
          rows={[
            ...queues.map((q) => [
              <a href={`/jobs?queue=${encodeURIComponent(q.queue)}`}>{q.queue}</a>,
              count(q.ready, q.exact),
              count(q.scheduled, q.exact),
              count(q.running, q.exact),
              count(q.prefetched, q.exact),
              <a href={`/dead?queue=${encodeURIComponent(q.queue)}`}>{count(q.dead, q.exact)}</a>,
              count(recentDead.get(q.queue) ?? 0),
              q.ready > 0 ? age(q.oldest_ready_age_s) : "-",
              rates(q.queue),
              paused.has(q.queue) ? <span class="paused">paused</span> : "active",
              readOnly ? "" : <PauseButton queue={q.queue} paused={paused.has(q.queue)} back="/" />,
            ]),
            ...idle.map((q) => [
              q,
              "0",
              "0",
              "0",
              "0",
              "0",
              count(recentDead.get(q) ?? 0),
              "-",
              rates(q),
              paused.has(q) ? <span class="paused">paused</span> : "active",
              readOnly ? "" : <PauseButton queue={q} paused={paused.has(q)} back="/" />,
            ]),
          ]}
        />
        {queues.some((q) => !q.exact) && (
          <p class="muted">
            ~ marks estimates: too many jobs to count on every refresh (as `shoal status`).
          </p>
        )}
        <h2>Throughput, all queues</h2>
        <p>
          {`Last minute: ${
            allRecent === null
              ? "-"
              : `${allRecent.completedPerS}/s completed, ${allRecent.failedPerS}/s retried, ${allRecent.deadPerS}/s dead-lettered`
          }; failure rate over the last minutes: `}
          <strong id="failure-rate">{failureRate(all.total)}</strong>
        </p>
        <div class="chart" data-chart={JSON.stringify(chart)}></div>
        <p class="muted">
          {`From the totals each consumer writes with its heartbeat (every third of its visibility timeout: 10 s by default), in ${
            BIN_MS / 1000
          } s bins; the last one fills in as consumers report. Sampled while this page is open.`}
        </p>
      </div>
    );
  };

  app.get("/", async (c) => {
    onlyParams(new URL(c.req.url), ["notice"]);
    const live = await overview();
    return c.html(
      <Layout title="Overview" current="/" readOnly={readOnly}>
        <Notice text={notice(c)} />
        <div id="overview" hx-get="/overview/live" hx-trigger={LIVE_EVERY} hx-swap="innerHTML">
          {live}
        </div>
      </Layout>,
    );
  });

  app.get("/overview/live", async (c) => {
    onlyParams(new URL(c.req.url), []);
    return c.html(await overview());
  });

  // ---- Jobs --------------------------------------------------------------------------

  app.get("/jobs", async (c) => {
    const url = new URL(c.req.url);
    onlyParams(url, ["queue", "task", "state", "key", "fairness_key", "execution", "before"]);
    const q = (name: string) => url.searchParams.get(name);
    const filter = {
      queue: nameParam("queue", q("queue")),
      task: nameParam("task", q("task")),
      key: keyParam("key", q("key")),
      fairnessKey: fairnessKeyParam("fairness_key", q("fairness_key")),
      executionId: idParam("execution", q("execution")),
    };
    const state = choiceParam("state", q("state"), JOB_STATES);
    const beforeId = idParam("before", q("before"));
    const page = state === "dead"
      ? await listDeadPage(db, { ...filter, beforeId })
      : await listJobs(db, { ...filter, state, beforeId });
    const rows = page.rows.map((r) => [
      <a href={`/jobs/${r.id}`}>{r.id}</a>,
      r.queue,
      r.task,
      "state" in r ? r.state : <span class="state-dead">dead</span>,
      `${r.attempts}/${r.max_attempts}`,
      r.priority,
      r.fairness_key || "-",
      r.key ?? "-",
      r.execution_id ? <a href={`/executions/${r.execution_id}`}>{r.execution_id}</a> : "-",
      when(r.created_at),
      "run_at" in r ? when(r.run_at) : when(r.died_at),
    ]);
    return c.html(
      <Layout title="Jobs" current="/jobs" readOnly={readOnly}>
        <form class="filters" method="get" action="/jobs">
          <FilterField name="queue" value={filter.queue} />
          <FilterField name="task" value={filter.task} />
          <label>
            state
            <select name="state">
              <option value="">any live</option>
              {JOB_STATES.map((s) => <option value={s} selected={s === state}>{s}</option>)}
            </select>
          </label>
          <FilterField name="key" value={filter.key} />
          <FilterField name="fairness_key" value={filter.fairnessKey} />
          <FilterField name="execution" value={filter.executionId} />
          <button type="submit">Filter</button>
        </form>
        <Table
          head={[
            "id",
            "queue",
            "task",
            "state",
            "attempts",
            "priority",
            "fairness key",
            "key",
            "execution",
            "created",
            state === "dead" ? "died" : "run at",
          ]}
          rows={rows}
          empty={page.next === null
            ? "No matching jobs."
            : "No matching jobs among the newest searched: look further with Older."}
        />
        <OlderLink
          path="/jobs"
          params={{
            queue: filter.queue,
            task: filter.task,
            state,
            key: filter.key,
            fairness_key: filter.fairnessKey,
            execution: filter.executionId,
            before: page.next ?? undefined,
          }}
        />
        <p class="muted">
          Newest first. Completed jobs are not kept; dead ones are under state "dead".
        </p>
      </Layout>,
    );
  });

  app.get("/jobs/:id", async (c) => {
    onlyParams(new URL(c.req.url), ["notice"]);
    const id = requiredId("job id", c.req.param("id"));
    const job = await getJob(db, id);
    const dead = job ? null : await getDead(db, id);
    if (!job && !dead) {
      return c.html(
        <Layout title={`Job ${id}`} current="/jobs" readOnly={readOnly}>
          <p>No job {id}: it completed (completed jobs are not kept) or never existed.</p>
        </Layout>,
        404,
      );
    }
    const row = (job ?? dead)!;
    // Its steps (a dead job keeps them: a retry does not repeat them), and its progress.
    const steps = await listSteps(db, id, { limit: MAX_SHOWN_STEPS + 1 });
    const progress = job ? (await progressOf(db, [id])).get(id) ?? null : null;
    return c.html(
      <Layout title={`Job ${id}`} current="/jobs" readOnly={readOnly}>
        <Notice text={notice(c)} />
        <dl>
          <dt>state</dt>
          <dd id="job-state">{job ? job.state : <span class="state-dead">dead</span>}</dd>
          <dt>queue</dt>
          <dd>{row.queue}</dd>
          <dt>task</dt>
          <dd>{row.task}</dd>
          <dt>attempts</dt>
          <dd>{row.attempts} of {row.max_attempts}</dd>
          <dt>priority</dt>
          <dd>{row.priority}</dd>
          <dt>fairness key</dt>
          <dd>{row.fairness_key || "-"}</dd>
          <dt>dedupe key</dt>
          <dd>{row.key ?? "-"}</dd>
          <dt>execution</dt>
          <dd>
            {row.execution_id
              ? <a href={`/executions/${row.execution_id}`}>{row.execution_id}</a>
              : "-"}
          </dd>
          <dt>created</dt>
          <dd>{when(row.created_at)}</dd>
          {job && (
            <>
              <dt>run at / deadline</dt>
              <dd>{when(job.run_at)}</dd>
              <dt>claimed by</dt>
              <dd>{job.locked_by ?? "-"}</dd>
              <dt>claimed at</dt>
              <dd>{when(job.locked_at)}</dd>
              <dt>started at</dt>
              <dd>{when(job.started_at)}</dd>
            </>
          )}
          {dead && (
            <>
              <dt>died</dt>
              <dd>{when(dead.died_at)}</dd>
              <dt>reason</dt>
              <dd>{dead.reason}</dd>
            </>
          )}
        </dl>
        {dead && !readOnly && <Action action={`/dead/${id}/retry`} label="Retry" />}
        {progress && (
          <>
            <h2>Progress</h2>
            <p id="job-progress">
              <JobProgressBar progress={progress} />{" "}
              <span class="muted">
                (reported {when(progress.at)})
              </span>
            </p>
          </>
        )}
        <h2>Payload</h2>
        <pre id="payload">{shownJson(row.payload)}</pre>
        <h2>Steps</h2>
        <div id="job-steps">
          <Table
            head={["step", "kind", "recorded at", "result, wake time or event"]}
            empty="No recorded step, sleep or wait."
            rows={steps.slice(0, MAX_SHOWN_STEPS).map((s) => [
              s.name,
              s.kind,
              when(s.recorded_at),
              s.kind === "sleep"
                ? `wakes at ${when(s.wake_at)}`
                : s.kind === "wait"
                ? <WaitCell step={s} />
                : <pre>{shownJson(s.result)}</pre>,
            ])}
          />
          {steps.length > MAX_SHOWN_STEPS && (
            <p class="muted">
              {`The first ${MAX_SHOWN_STEPS} records, in the order recorded; it has more.`}
            </p>
          )}
        </div>
        <h2>Errors</h2>
        <Table
          head={["attempt", "at", "error"]}
          empty="No failed attempt."
          rows={row.errors.map((e) => [e.attempt, when(e.at), <pre>{e.error}</pre>])}
        />
      </Layout>,
    );
  });

  // ---- Dead letters --------------------------------------------------------------------

  app.get("/dead", async (c) => {
    const url = new URL(c.req.url);
    onlyParams(url, ["queue", "task", "before", "notice"]);
    const queue = nameParam("queue", url.searchParams.get("queue"));
    const task = nameParam("task", url.searchParams.get("task"));
    const beforeId = idParam("before", url.searchParams.get("before"));
    const page = await listDeadPage(db, { queue, task, beforeId });
    // The set actions cover what the page shows and older: never a job that died after.
    const newest = page.rows[0]?.id;
    const purgeQuery = new URLSearchParams({
      ...(queue ? { queue } : {}),
      ...(task ? { task } : {}),
      through: newest ?? "",
    });
    return c.html(
      <Layout title="Dead letters" current="/dead" readOnly={readOnly}>
        <Notice text={notice(c)} />
        <form class="filters" method="get" action="/dead">
          <FilterField name="queue" value={queue} />
          <FilterField name="task" value={task} />
          <button type="submit">Filter</button>
        </form>
        {!readOnly && newest !== undefined && (
          <p>
            <Action
              action="/dead/retry"
              label={`Retry all matching, id ≤ ${newest} (up to ${count(MAX_RETRY_TOTAL)})`}
              fields={{ queue, task, through: newest }}
            />{" "}
            <a href={`/dead/purge?${purgeQuery}`}>Purge all matching, id ≤ {newest}…</a>
          </p>
        )}
        <Table
          head={["id", "queue", "task", "attempts", "reason", "died", ""]}
          empty={page.next === null ? "No dead jobs." : "None among the newest searched."}
          rows={page.rows.map((r) => [
            <a href={`/jobs/${r.id}`}>{r.id}</a>,
            r.queue,
            r.task,
            `${r.attempts}/${r.max_attempts}`,
            r.reason,
            when(r.died_at),
            readOnly ? "" : <Action action={`/dead/${r.id}/retry`} label="Retry" />,
          ])}
        />
        <OlderLink path="/dead" params={{ queue, task, before: page.next ?? undefined }} />
      </Layout>,
    );
  });

  app.post("/dead/:id/retry", async (c) => {
    const id = requiredId("dead job id", c.req.param("id"));
    const outcome = await retryDead(primary, id);
    acted("dead.retry", id, outcome);
    return done(c, outcome === "retried" ? `/jobs/${id}` : "/dead", outcome);
  });

  app.post("/dead/retry", async (c) => {
    const form = await c.req.parseBody();
    const queue = nameParam("queue", formText(form, "queue"));
    const task = nameParam("task", formText(form, "task"));
    const throughId = requiredId("through", formText(form, "through"));
    const counts = await retryDeadMatching(primary, { queue, task, throughId });
    acted("dead.retry_matching", queue ?? "*", `${counts.retried} retried`);
    const back = new URLSearchParams({ ...(queue ? { queue } : {}), ...(task ? { task } : {}) });
    return done(c, `/dead?${back}`, counts.more ? "retried_some" : "retried_set");
  });

  /** The most dead jobs the confirmation page counts (more: "at least"). */
  const PURGE_COUNT_CAP = 100_000;

  app.get("/dead/purge", async (c) => {
    const url = new URL(c.req.url);
    onlyParams(url, ["queue", "task", "through"]);
    const queue = nameParam("queue", url.searchParams.get("queue"));
    const task = nameParam("task", url.searchParams.get("task"));
    const throughId = requiredId("through", url.searchParams.get("through"));
    const total = await countDeadMatching(db, { queue, task, throughId }, PURGE_COUNT_CAP);
    const what = [
      queue ? `of queue ${queue}` : "of every queue",
      task ? `, task ${task}` : ", every task",
      `, id ≤ ${throughId}`,
    ].join("");
    const back = new URLSearchParams({ ...(queue ? { queue } : {}), ...(task ? { task } : {}) });
    return c.html(
      <Layout title="Purge dead letters" current="/dead" readOnly={readOnly}>
        <p id="purge-what">
          Delete {total >= PURGE_COUNT_CAP ? "at least " : ""}
          {count(total)} dead {total === 1 ? "job" : "jobs"} {what}{" "}
          for good? They cannot be retried after.
        </p>
        {readOnly
          ? <p class="muted">Read-only: purging is off.</p>
          : (
            <form method="post" action="/dead/purge">
              {queue && <input type="hidden" name="queue" value={queue} />}
              {task && <input type="hidden" name="task" value={task} />}
              <input type="hidden" name="through" value={throughId} />
              <input type="hidden" name="confirm" value="yes" />
              <button type="submit" class="danger">Yes, purge</button>{" "}
              <a href={`/dead?${back}`}>Cancel</a>
            </form>
          )}
      </Layout>,
    );
  });

  app.post("/dead/purge", async (c) => {
    const form = await c.req.parseBody();
    // The confirmation page sends it: a bare POST cannot purge by accident.
    if (formText(form, "confirm") !== "yes") {
      throw new BadRequest("Missing confirm=yes: purge from the confirmation page");
    }
    const queue = nameParam("queue", formText(form, "queue"));
    const task = nameParam("task", formText(form, "task"));
    const throughId = requiredId("through", formText(form, "through"));
    const purged = await purgeDead(primary, {
      ...(queue ? { queue } : {}),
      ...(task ? { task } : {}),
      throughId,
    });
    acted("dead.purge", queue ?? "*", `${purged} purged`);
    const back = new URLSearchParams({ ...(queue ? { queue } : {}), ...(task ? { task } : {}) });
    return done(c, `/dead?${back}`, "purged");
  });

  // ---- Executions ----------------------------------------------------------------------

  app.get("/executions", async (c) => {
    const url = new URL(c.req.url);
    onlyParams(url, ["status", "before", "notice"]);
    const status = choiceParam("status", url.searchParams.get("status"), EXECUTION_STATUSES);
    const beforeId = idParam("before", url.searchParams.get("before"));
    const page = await listExecutionsPage(db, { status, beforeId });
    return c.html(
      <Layout title="Executions" current="/executions" readOnly={readOnly}>
        <Notice text={notice(c)} />
        <form class="filters" method="get" action="/executions">
          <label>
            status
            <select name="status">
              <option value="">any</option>
              {EXECUTION_STATUSES.map((s) => (
                <option value={s} selected={s === status}>{s}</option>
              ))}
            </select>
          </label>
          <button type="submit">Filter</button>
        </form>
        <Table
          head={["id", "status", "label", "fan-out", "created", "updated", "error", ""]}
          empty="No executions."
          rows={page.rows.map((e) => [
            <a href={`/executions/${e.id}`}>{e.id}</a>,
            <span class={`status-${e.status}`}>{e.status}</span>,
            e.label ?? "-",
            <Progress barriers={e.barriers} />,
            when(e.created_at),
            when(e.updated_at),
            e.error ?? "-",
            !readOnly && (e.status === "pending" || e.status === "running")
              ? <Action action={`/executions/${e.id}/cancel`} label="Cancel" danger />
              : "",
          ])}
        />
        <OlderLink path="/executions" params={{ status, before: page.next ?? undefined }} />
      </Layout>,
    );
  });

  const executionDetail = async (id: string) => {
    const execution = await getExecution(db, id);
    if (!execution) return null;
    const open = execution.status === "pending" || execution.status === "running";
    const barriers = await executionBarriers(db, id);
    const jobs = await listJobs(db, { executionId: id, limit: 50 });
    const ids = jobs.rows.map((j) => j.id);
    const [progress, steps] = [await progressOf(db, ids), await stepCounts(db, ids)];
    // Jobs waiting on dependencies are not live jobs yet: listed apart, with what they wait on.
    const held = await listHeldJobs(db, id, 50);
    return {
      open,
      body: (
        <div>
          <dl>
            <dt>status</dt>
            <dd id="execution-status" class={`status-${execution.status}`}>{execution.status}</dd>
            <dt>label</dt>
            <dd>{execution.label ?? "-"}</dd>
            <dt>key</dt>
            <dd>{execution.key ?? "-"}</dd>
            <dt>fan-out</dt>
            <dd>
              <Progress barriers={barriers} />
            </dd>
            <dt>created</dt>
            <dd>{when(execution.created_at)}</dd>
            <dt>started</dt>
            <dd>{when(execution.started_at)}</dd>
            <dt>finished</dt>
            <dd>{when(execution.finished_at)}</dd>
            <dt>error</dt>
            <dd>{execution.error ?? "-"}</dd>
          </dl>
          {!readOnly && open && (
            <Action action={`/executions/${id}/cancel`} label="Cancel execution" danger />
          )}
          <h2>Result</h2>
          <pre>{execution.result === null ? "-" : shownJson(execution.result)}</pre>
          <h2>Live jobs</h2>
          <Table
            head={["id", "task", "state", "attempts", "progress", "steps", "run at"]}
            empty="No live jobs."
            rows={jobs.rows.map((j) => {
              const p = progress.get(j.id);
              const s = steps.get(j.id);
              return [
                <a href={`/jobs/${j.id}`}>{j.id}</a>,
                j.task,
                j.state,
                `${j.attempts}/${j.max_attempts}`,
                p ? <JobProgressBar progress={p} /> : "-",
                s
                  ? `${plural(s.steps, "step")}, ${plural(s.sleeps, "sleep")}${
                    s.waits > 0 ? `, ${plural(s.waits, "wait")}` : ""
                  }`
                  : "-",
                when(j.run_at),
              ];
            })}
          />
          <h2>Waiting on dependencies</h2>
          <Table
            head={["id", "task", "queue", "waiting on"]}
            empty="No job waits on a dependency."
            rows={held.map((h) => [
              h.id,
              h.task,
              h.queue,
              // Plain ids: a dependency may itself be held, with no job page yet.
              h.waiting_on.length === 0 ? "-" : h.waiting_on.join(", "),
            ])}
          />
          <p>
            <a href={`/jobs?execution=${id}&state=dead`}>Its dead jobs</a>
          </p>
        </div>
      ),
    };
  };

  app.get("/executions/:id", async (c) => {
    onlyParams(new URL(c.req.url), ["notice"]);
    const id = requiredId("execution id", c.req.param("id"));
    const detail = await executionDetail(id);
    if (!detail) {
      return c.html(
        <Layout title={`Execution ${id}`} current="/executions" readOnly={readOnly}>
          <p>No execution {id}.</p>
        </Layout>,
        404,
      );
    }
    return c.html(
      <Layout title={`Execution ${id}`} current="/executions" readOnly={readOnly}>
        <Notice text={notice(c)} />
        {
          /* An open execution reloads its part every 2 s; the live answer stops the poll
             (hx-swap outerHTML without the trigger) once it has ended. */
        }
        <LiveExecution id={id} open={detail.open}>{detail.body}</LiveExecution>
      </Layout>,
    );
  });

  app.get("/executions/:id/live", async (c) => {
    onlyParams(new URL(c.req.url), []);
    const id = requiredId("execution id", c.req.param("id"));
    const detail = await executionDetail(id);
    if (!detail) return c.html(<p>No execution {id}.</p>, 404);
    return c.html(<LiveExecution id={id} open={detail.open}>{detail.body}</LiveExecution>);
  });

  app.post("/executions/:id/cancel", async (c) => {
    const id = requiredId("execution id", c.req.param("id"));
    const cancelled = await cancelExecution(primary, id);
    acted("execution.cancel", id, cancelled ? "cancelled" : "not cancelled");
    return done(c, `/executions/${id}`, cancelled ? "cancelled" : "not_cancelled");
  });

  // ---- Schedules -----------------------------------------------------------------------

  app.get("/schedules", async (c) => {
    onlyParams(new URL(c.req.url), ["notice"]);
    const schedules = await listSchedules(db);
    return c.html(
      <Layout title="Schedules" current="/schedules" readOnly={readOnly}>
        <Notice text={notice(c)} />
        <Table
          head={[
            "schedule",
            "cron",
            "time zone",
            "task",
            "queue",
            "state",
            "next fire",
            "last fire",
            "last error",
            "",
          ]}
          empty="No schedules."
          rows={schedules.map((s) => [
            s.name,
            <code>{s.cron}</code>,
            s.tz,
            s.task,
            s.queue ?? "(task's queue)",
            s.enabled ? "active" : <span class="paused">paused</span>,
            when(s.next_run_at),
            when(s.last_run_at),
            s.last_error ?? "-",
            readOnly ? "" : (
              <span>
                {s.enabled
                  ? <Action action={`/schedules/${s.name}/pause`} label="Pause" />
                  : <Action action={`/schedules/${s.name}/resume`} label="Resume" />}{" "}
                <Action action={`/schedules/${s.name}/run`} label="Run now" />
              </span>
            ),
          ])}
        />
      </Layout>,
    );
  });

  app.post("/schedules/:name/:action{pause|resume|run}", async (c) => {
    const name = requiredName("schedule", c.req.param("name"));
    const action = c.req.param("action");
    let outcome: string;
    if (action === "run") {
      outcome = (await runScheduleNow(primary, name)) === null ? "not_found" : "ran";
    } else {
      const found = await setScheduleEnabled(primary, name, action === "resume");
      outcome = found ? (action === "resume" ? "resumed" : "paused") : "not_found";
    }
    acted(`schedule.${action}`, name, outcome);
    return done(c, "/schedules", outcome);
  });

  // ---- Queues and limits ---------------------------------------------------------------

  app.get("/queues", async (c) => {
    onlyParams(new URL(c.req.url), ["notice"]);
    const [queues, flow] = [await queueStatus(db), await flowStatus(db)];
    const paused = new Map(flow.paused.map((p) => [p.queue, p.paused_at]));
    const names = [...new Set([...queues.map((q) => q.queue), ...paused.keys()])].sort();
    const keyOf = (key: string | null) => key === null ? "(every key)" : JSON.stringify(key);
    return c.html(
      <Layout title="Queues & limits" current="/queues" readOnly={readOnly}>
        <Notice text={notice(c)} />
        <Table
          head={["queue", "state", "paused at", ""]}
          empty="No queues yet."
          rows={names.map((q) => [
            q,
            paused.has(q) ? <span class="paused">paused</span> : "active",
            when(paused.get(q)),
            readOnly ? "" : <PauseButton queue={q} paused={paused.has(q)} back="/queues" />,
          ])}
        />
        <h2>Concurrency limits</h2>
        <Table
          head={["queue", "task", "key", "max running", "slots held", ...(readOnly ? [] : [""])]}
          numeric={[3, 4]}
          empty="No concurrency limits."
          rows={flow.limits.map((l) => [
            l.queue,
            l.task ?? "-",
            keyOf(l.key),
            l.max_running,
            l.slots_held,
            ...(readOnly ? [] : [
              <Action
                action="/queues/limits/concurrency/clear"
                label="Clear"
                fields={limitFields(l)}
              />,
            ]),
          ])}
        />
        {!readOnly && (
          <LimitForm action="/queues/limits/concurrency/set" label="Set concurrency limit">
            <label>
              max running<input
                type="number"
                name="max_running"
                min="0"
                max={MAX_RUNNING_LIMIT}
                required
              />
            </label>
          </LimitForm>
        )}
        <h2>Rate limits</h2>
        <Table
          head={["queue", "task", "key", "max starts", "per (ms)", ...(readOnly ? [] : [""])]}
          numeric={[3, 4]}
          empty="No rate limits."
          rows={flow.rate_limits.map((r) => [
            r.queue,
            r.task ?? "-",
            keyOf(r.key),
            r.max_starts,
            r.period_ms,
            ...(readOnly ? [] : [
              <Action action="/queues/limits/rate/clear" label="Clear" fields={limitFields(r)} />,
            ]),
          ])}
        />
        {!readOnly && (
          <LimitForm action="/queues/limits/rate/set" label="Set rate limit">
            <label>
              max starts<input
                type="number"
                name="max_starts"
                min="1"
                max={MAX_RATE_STARTS}
                required
              />
            </label>
            <label>
              per<input type="text" name="per" placeholder="1s" required />
            </label>
          </LimitForm>
        )}
        <h2>Held keys</h2>
        <Table
          head={["queue", "task", "key", "held until", ...(readOnly ? [] : [""])]}
          empty="No held keys."
          rows={flow.holds.map((h) => [
            h.queue,
            h.task ?? "-",
            keyOf(h.key),
            when(h.held_until),
            ...(readOnly ? [] : [
              <Action action="/queues/holds/release" label="Release" fields={limitFields(h)} />,
            ]),
          ])}
        />
        {!readOnly && (
          <LimitForm action="/queues/holds/hold" label="Hold key" keyRequired>
            <label>
              for<input type="text" name="for" placeholder="10m" required />
            </label>
          </LimitForm>
        )}
        <h2>Fairness weights</h2>
        <Table
          head={["queue", "key", "weight"]}
          numeric={[2]}
          empty="No fairness weights."
          rows={flow.weights.map((w) => [w.queue, keyOf(w.key), w.weight])}
        />
        <p class="muted">
          {readOnly
            ? "Read-only: limits are changed with `shoal limit` (see `shoal --help`)."
            : "An empty key sets or clears the queue's (or the task's) default for every key. " +
              "Durations as on the command line: 500ms, 10s, 5m, 2h, 1d (a day at most)."}
        </p>
      </Layout>,
    );
  });

  app.post("/queues/:queue/:action{pause|resume}", async (c) => {
    const queue = requiredName("queue", c.req.param("queue"));
    const action = c.req.param("action");
    const form = await c.req.parseBody();
    const back = formText(form, "back") === "/queues" ? "/queues" : "/";
    const changed = action === "pause"
      ? await pauseQueue(primary, queue)
      : await resumeQueue(primary, queue);
    const outcome = changed ? (action === "pause" ? "paused" : "resumed") : "unchanged";
    acted(`queue.${action}`, queue, outcome);
    return done(c, back, outcome);
  });

  /**
   * Run a flow-control change; an error from it (the rules lock timing out, say) is answered
   * with one line naming what failed and why, and logged.
   */
  const flowChange = async (
    c: Context,
    action: string,
    target: string,
    change: () => Promise<string>,
  ): Promise<Response> => {
    let outcome: string;
    try {
      outcome = await change();
    } catch (error) {
      const line = describeError(error);
      log.warn("Dashboard action {action} on {target} failed: {error}", {
        action,
        target,
        error: line,
      });
      const status = error instanceof TypeError || error instanceof RangeError ? 400 : 503;
      return c.html(
        <Layout title="Not changed" current="/queues" readOnly={readOnly}>
          <p id="flow-error">
            {`Could not ${FLOW_DOING[action] ?? action} of queue ${target}: ${line}`}
          </p>
          <p>
            <a href="/queues">Back to Queues &amp; limits</a>
          </p>
        </Layout>,
        status,
      );
    }
    acted(action, target, outcome);
    return done(c, "/queues", outcome);
  };

  /** The queue, task and key a limit or hold form names, validated. */
  const limitTarget = (form: Record<string, unknown>, keyRequired: boolean) => {
    const queue = requiredName("queue", formText(form, "queue"));
    const task = nameParam("task", formText(form, "task")) ?? null;
    const exact = keyRequired || formText(form, "key_exact") === "1";
    const key = flowKeyParam("key", formText(form, "key"), exact);
    return { queue, task, key };
  };

  app.post("/queues/limits/:kind{concurrency|rate}/:action{set|clear}", async (c) => {
    const form = await c.req.parseBody();
    const { queue, task, key } = limitTarget(form, false);
    const kind = c.req.param("kind");
    const action = c.req.param("action");
    if (kind === "concurrency") {
      if (action === "set") {
        const maxRunning = intParam("max_running", formText(form, "max_running"), {
          min: 0,
          max: MAX_RUNNING_LIMIT,
        });
        return await flowChange(c, "limit.set", queue, async () => {
          await setConcurrencyLimit(primary, { queue, task, key, maxRunning });
          return "limit_set";
        });
      }
      return await flowChange(
        c,
        "limit.clear",
        queue,
        async () =>
          (await clearConcurrencyLimit(primary, { queue, task, key }))
            ? "limit_cleared"
            : "no_limit",
      );
    }
    if (action === "set") {
      const maxStarts = intParam("max_starts", formText(form, "max_starts"), {
        min: 1,
        max: MAX_RATE_STARTS,
      });
      const periodMs = durationParam("per", formText(form, "per"), {
        min: 1,
        max: MAX_RATE_PERIOD_MS,
      });
      return await flowChange(c, "rate_limit.set", queue, async () => {
        await setRateLimit(primary, { queue, task, key, maxStarts, periodMs });
        return "rate_set";
      });
    }
    return await flowChange(
      c,
      "rate_limit.clear",
      queue,
      async () =>
        (await clearRateLimit(primary, { queue, task, key })) ? "rate_cleared" : "no_limit",
    );
  });

  app.post("/queues/holds/:action{hold|release}", async (c) => {
    const form = await c.req.parseBody();
    const { queue, task, key } = limitTarget(form, true);
    const release = c.req.param("action") === "release";
    const forMs = release
      ? 0
      : durationParam("for", formText(form, "for"), { min: 1, max: MAX_HOLD_MS });
    return await flowChange(c, release ? "key.release" : "key.hold", queue, async () => {
      await holdKey(primary, { queue, task, key: key!, forMs });
      return release ? "released" : "held";
    });
  });

  // ---- Leases --------------------------------------------------------------------------

  app.get("/leases", async (c) => {
    onlyParams(new URL(c.req.url), []);
    const leases = await listLeases(db);
    const now = Date.now();
    return c.html(
      <Layout title="Leases" current="/leases" readOnly={readOnly}>
        <Table
          head={["lease", "holder", "term", "acquired", "expires", "state"]}
          empty="No leases: no reaper or scheduler has run."
          rows={leases.map((l) => [
            l.name,
            l.holder,
            l.token,
            when(l.acquired_at),
            when(l.expires_at),
            l.expires_at.getTime() > now ? "held" : <span class="muted">expired</span>,
          ])}
        />
      </Layout>,
    );
  });

  app.notFound((c) =>
    c.html(
      <Layout title="Not found" current="" readOnly={readOnly}>
        <p>No such page.</p>
      </Layout>,
      404,
    )
  );

  return { fetch: async (request: Request) => await app.fetch(request) };
}

/**
 * A wait's record on the job page: the event it waits for, then what came of it (the
 * payload it received, shown as a step's result is, or its timeout).
 */
function WaitCell({ step }: { step: StepRow }) {
  const what = `event ${step.event_name}${step.event_key ? ` (key ${step.event_key})` : ""}`;
  if (step.wait_state === "received") {
    return (
      <>
        {`received ${what}`}
        <pre>{shownJson(step.result)}</pre>
      </>
    );
  }
  if (step.wait_state === "timed_out") return <>{`timed out waiting for ${what}`}</>;
  return (
    <>
      {`waits for ${what}${step.wake_at ? `, times out at ${when(step.wake_at)}` : ""}`}
    </>
  );
}

/** "1 step", "2 steps". */
function plural(n: number, noun: string): string {
  return `${n} ${noun}${n === 1 ? "" : "s"}`;
}

/** A text field of a posted form (a file or a repeated field is not one). */
function formText(form: Record<string, unknown>, name: string): string | undefined {
  const value = form[name];
  return typeof value === "string" ? value : undefined;
}

function FilterField(props: { name: string; value: string | undefined }): View {
  return (
    <label>
      {props.name.replace("_", " ")}
      <input type="text" name={props.name} value={props.value ?? ""} />
    </label>
  );
}

function PauseButton(props: { queue: string; paused: boolean; back: string }): View {
  return (
    <Action
      action={`/queues/${props.queue}/${props.paused ? "resume" : "pause"}`}
      label={props.paused ? "Resume" : "Pause"}
      fields={{ back: props.back }}
    />
  );
}

/** The hidden fields a row's Clear or Release button sends: its queue, task and exact key. */
function limitFields(
  row: { queue: string; task: string | null; key: string | null },
): Record<string, string | undefined> {
  return {
    queue: row.queue,
    task: row.task ?? undefined,
    ...(row.key === null ? {} : { key: row.key, key_exact: "1" }),
  };
}

/** A form that sets a limit (or holds a key) on a queue, for a task and a key when given. */
function LimitForm(
  props: PropsWithChildren<{ action: string; label: string; keyRequired?: boolean }>,
): View {
  return (
    <form class="filters limit-form" method="post" action={props.action}>
      <label>
        queue<input type="text" name="queue" required />
      </label>
      <label>
        task<input type="text" name="task" placeholder="(any)" />
      </label>
      <label>
        key<input
          type="text"
          name="key"
          placeholder={props.keyRequired ? "(empty: no key)" : "(empty: every key)"}
        />
      </label>
      {props.children}
      <button type="submit">{props.label}</button>
    </form>
  );
}

/** An execution's live part: polls while the execution is open. */
function LiveExecution(props: PropsWithChildren<{ id: string; open: boolean }>): View {
  return (
    <div
      id="execution"
      hx-get={props.open ? `/executions/${props.id}/live` : undefined}
      hx-trigger={props.open ? LIVE_EVERY : undefined}
      hx-swap={props.open ? "outerHTML" : undefined}
    >
      {props.children}
    </div>
  );
}

/** Bins averaged for the "last minute" figures (the newest, still filling in, left out). */
const RECENT_BINS = Math.round(60_000 / BIN_MS);

/**
 * The mean rates of the last minute's complete bins (the newest alone while it is the only
 * one), or null before any sample.
 */
function recentRates(
  series: QueueRateSeries,
): { completedPerS: number; failedPerS: number; deadPerS: number } | null {
  if (series.t.length === 0) return null;
  const n = series.t.length === 1 ? 1 : series.t.length - 1;
  const from = Math.max(0, n - RECENT_BINS);
  const mean = (values: number[]) =>
    Math.round((100 * values.slice(from, n).reduce((a, b) => a + b, 0)) / (n - from)) / 100;
  return {
    completedPerS: mean(series.completedPerS),
    failedPerS: mean(series.failedPerS),
    deadPerS: mean(series.deadPerS),
  };
}

/** Failed attempts (retried or dead-lettered) over finished ones, or "-" with none. */
function failureRate(t: QueueTotals): string {
  const finished = t.completed + t.failed + t.dead;
  return finished > 0 ? `${((100 * (t.failed + t.dead)) / finished).toFixed(1)}%` : "-";
}

/** A queue's rates: the last minute's figures and a small chart of the window. */
function QueueRates(props: { series: QueueRateSeries }): View {
  const { series } = props;
  const recent = recentRates(series);
  if (recent === null || series.total.completed + series.total.failed + series.total.dead === 0) {
    return <span class="muted">-</span>;
  }
  const data = [series.t, series.completedPerS, series.failurePct];
  return (
    <div class="queue-rates" data-queue={series.queue}>
      <span>{`${recent.completedPerS}/s, ${failureRate(series.total)} failed`}</span>
      <div class="spark" data-chart={JSON.stringify(data)} data-chart-kind="queue"></div>
    </div>
  );
}
