/**
 * The dashboard's HTML, server-rendered with Hono's JSX: the layout and the pieces the pages
 * share. JSX escapes every value it renders; nothing here writes raw HTML, so a payload, an
 * error message or a key is always text, never markup.
 *
 * @module
 */
import type { Child, FC, PropsWithChildren } from "hono/jsx";

/** What a component renders (Hono's JSX: escaped HTML, possibly async, or nothing). */
export type View = ReturnType<FC>;

/** The pages in the navigation bar, in order. */
export const NAV: readonly { path: string; label: string }[] = [
  { path: "/", label: "Overview" },
  { path: "/jobs", label: "Jobs" },
  { path: "/dead", label: "Dead letters" },
  { path: "/executions", label: "Executions" },
  { path: "/schedules", label: "Schedules" },
  { path: "/queues", label: "Queues & limits" },
  { path: "/leases", label: "Leases" },
];

export interface LayoutProps {
  title: string;
  /** The navigation entry to mark as current. */
  current: string;
  readOnly: boolean;
}

export function Layout(props: PropsWithChildren<LayoutProps>): View {
  return (
    <html lang="en">
      <head>
        <meta charset="utf-8" />
        <meta name="viewport" content="width=device-width, initial-scale=1" />
        {
          /* htmx would otherwise add an inline style element, which the CSP refuses. */
        }
        <meta name="htmx-config" content='{"includeIndicatorStyles":false}' />
        <title>{props.title} · shoal</title>
        {/* No icon to fetch: a browser's /favicon.ico request would be a 404 in its console. */}
        <link rel="icon" href="data:," />
        <link rel="stylesheet" href="/assets/uPlot.min.css" />
        <link rel="stylesheet" href="/assets/dashboard.css" />
        <script src="/assets/htmx.min.js"></script>
        <script src="/assets/uPlot.iife.min.js"></script>
        <script src="/assets/dashboard.js" defer></script>
      </head>
      <body>
        <header>
          <span class="brand">shoal</span>
          {NAV.map((n) => (
            <a href={n.path} class={n.path === props.current ? "current" : undefined}>{n.label}</a>
          ))}
          <span class="mode">{props.readOnly ? "read-only" : ""}</span>
        </header>
        <main>
          <h1>{props.title}</h1>
          {props.children}
        </main>
      </body>
    </html>
  );
}

/** A date as ISO text, "-" for none. */
export function when(d: Date | string | null | undefined): string {
  if (d === null || d === undefined) return "-";
  return (d instanceof Date ? d : new Date(d)).toISOString().replace(".000Z", "Z");
}

/** A whole number with thousands separators, `~` first when it is an estimate. */
export function count(n: number, exact = true): string {
  return (exact ? "" : "~") + n.toLocaleString("en-US");
}

/** Seconds as a short duration ("4.2s", "3m 10s"). */
export function age(seconds: number): string {
  if (seconds < 60) return `${seconds.toFixed(1)}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ${Math.floor(seconds % 60)}s`;
  return `${Math.floor(seconds / 3600)}h ${Math.floor((seconds % 3600) / 60)}m`;
}

/** A POST button: a one-button form (no script needed, and a plain POST for the CSRF check). */
export function Action(
  props: {
    action: string;
    label: string;
    danger?: boolean;
    fields?: Record<string, string | undefined>;
  },
): View {
  return (
    <form class="inline" method="post" action={props.action}>
      {Object.entries(props.fields ?? {}).map(([name, value]) =>
        value === undefined ? null : <input type="hidden" name={name} value={value} />
      )}
      <button type="submit" class={props.danger ? "danger" : undefined}>{props.label}</button>
    </form>
  );
}

/** A link to the next (older) page, keeping the filters; nothing when there is none. */
export function OlderLink(
  props: { path: string; params: Record<string, string | undefined> },
): View {
  if (props.params.before === undefined) return null;
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(props.params)) {
    if (value !== undefined) query.set(name, value);
  }
  return (
    <p>
      <a href={`${props.path}?${query}`} rel="next">Older →</a>
    </p>
  );
}

/** An optional notice at the top of a page (after an action). */
export function Notice(props: { text: string | null }): View {
  return props.text === null ? null : <div class="notice" role="status">{props.text}</div>;
}

/** A fan-out's progress as a bar and a figure. */
export function Progress(props: { barriers: { total: number; arrived: number }[] }): View {
  if (props.barriers.length === 0) return <span class="muted">-</span>;
  const total = props.barriers.reduce((n, b) => n + b.total, 0);
  const arrived = props.barriers.reduce((n, b) => n + b.arrived, 0);
  return (
    <span>
      <progress value={arrived} max={total}></progress> {arrived}/{total}
    </span>
  );
}

/** A job's reported progress (`ctx.progress`) as a bar, the figures and its message. */
export function JobProgressBar(
  props: { progress: { done: number; total: number; message: string | null } },
): View {
  const { done, total, message } = props.progress;
  return (
    <span class="job-progress">
      <progress value={Math.min(done, total)} max={total > 0 ? total : 1}></progress>{" "}
      {`${done}/${total}`}
      {message !== null && message !== "" ? ` ${shownString(message)}` : ""}
    </span>
  );
}

/** Keys whose values (of any type, nested ones too) are not shown: they may hold credentials. */
const SENSITIVE_KEY =
  /authori[sz]ation|^auth$|cookie|secret|token|passw(or)?d|^pwd$|api[-_ ]?key|access[-_ ]?key|private[-_ ]?key|credential|signature|session/i;
export const REDACTED = "[redacted]";

/**
 * A string that is a URL with more than an origin (credentials, a path, a query, a
 * fragment) shown as its origin only: a webhook URL is itself a secret (lib/http_task.ts).
 */
export function shownString(value: string): string {
  if (!/^[a-z][a-z0-9+.-]*:\/\//i.test(value.trim()) || !URL.canParse(value.trim())) return value;
  const url = new URL(value.trim());
  const bare = url.username === "" && url.password === "" &&
    url.pathname.replace(/^\/$/, "") === "" &&
    url.search === "" && url.hash === "";
  if (bare) return value;
  return url.origin === "null" ? `${url.protocol}//…` : `${url.origin}/…`;
}

/**
 * A payload (or result) for display: as JSON, every value under a key that looks like a
 * credential (an Authorization header, a token, a password: the whole value, objects and
 * arrays included) replaced, and URLs cut to their origin, so the dashboard never shows them.
 */
export function shownJson(value: unknown): string {
  return JSON.stringify(
    value,
    (key, v) => {
      if (key !== "" && SENSITIVE_KEY.test(key)) return REDACTED;
      return typeof v === "string" ? shownString(v) : v;
    },
    2,
  ) ?? "null";
}

/** A small table from a header row and cells. */
export function Table(
  props: { head: string[]; rows: Child[][]; empty: string; numeric?: number[] },
): View {
  if (props.rows.length === 0) return <p class="muted">{props.empty}</p>;
  const numeric = new Set(props.numeric ?? []);
  return (
    <table>
      <thead>
        <tr>{props.head.map((h) => <th>{h}</th>)}</tr>
      </thead>
      <tbody>
        {props.rows.map((row) => (
          <tr>{row.map((cell, i) => <td class={numeric.has(i) ? "n" : undefined}>{cell}</td>)}</tr>
        ))}
      </tbody>
    </table>
  );
}
