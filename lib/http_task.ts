/**
 * `shoal.http`: POST a job's JSON body to a URL, for users who write no TypeScript.
 *
 * Payload: `{"url": "https://host/path", "body"?: any JSON (default {}), "headers"?:
 * {"name": "value"}, "timeout_ms"?: n, "secret"?: "NAME"}`. A task made with a fixed
 * `url` refuses a payload that names one.
 *
 * Safety: a request only goes to a host on the allowlist (`--http-allow` /
 * `SHOAL_HTTP_ALLOW`, exact `host` or `host:port`; empty by default, so nothing is
 * sent until an operator says where). Only http and https, no user:password in the URL,
 * redirects are not followed (a 3xx fails the job: the final URL belongs in the payload).
 * Messages name the URL's origin only: a path or query can carry a token.
 *
 * Signing: with a secret (`SHOAL_HTTP_SECRET_<NAME>` for `"secret": "name"`, else
 * `SHOAL_HTTP_SECRET` when set) the request carries `x-shoal-signature: sha256=<hex>`,
 * an HMAC-SHA256 over `<x-shoal-timestamp>.<x-shoal-job-id>.<raw body>`. A producer can
 * only pick a name under that prefix, never an arbitrary variable, and the secret is
 * never part of a message.
 *
 * Outcome: 2xx acks (result `{status, body}` with the first 1,000 characters of the
 * response); 429 and 5xx retry, after `Retry-After` when the server sends one; any other
 * status fails the job for good; a network error or timeout retries with the backoff.
 *
 * @module
 */
import {
  checkFunction,
  checkInteger,
  checkNumber,
  checkObject,
  checkOptions,
  checkString,
  checkStringList,
} from "./args.ts";
import { formatDuration } from "./duration.ts";
import { describeError } from "./log.ts";
import { type AnyTask, defineTask, PermanentError, RetryLaterError } from "./tasks.ts";

export interface HttpTaskSettings {
  /** Hosts requests may go to: `host` (default ports) or `host:port`. Empty: none. */
  allow?: string[];
  /** Task name; `shoal.http` unless given. */
  name?: string;
  /** Queue its jobs go to by default. */
  queue?: string;
  /** A fixed URL for every job of this task; payloads may then not name one. */
  url?: string;
  /** Request timeout when the payload sets none (default 30 s). */
  timeoutMs?: number;
  /** Read a secret from the environment (Deno.env by default; tests pass their own). */
  env?: (name: string) => string | undefined;
}

/** Where an unnamed secret comes from; named ones are `SHOAL_HTTP_SECRET_<NAME>`. */
export const HTTP_SECRET_ENV = "SHOAL_HTTP_SECRET";
export const DEFAULT_HTTP_TIMEOUT_MS = 30_000;
/** The longest `timeout_ms` a payload may ask for. */
export const MAX_HTTP_TIMEOUT_MS = 600_000;
/** Characters of the response kept in a result or an error. */
const EXCERPT_CHARS = 1000;
const MAX_URL_LENGTH = 4096;
const MAX_HEADERS = 32;
const SECRET_NAME = /^[A-Za-z0-9_]{1,64}$/;
/** An HTTP header name (RFC 9110 token). */
const HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$/;
/** Headers shoal sets itself or the HTTP stack owns: a payload may not set these. */
const RESERVED_HEADERS = new Set([
  "host",
  "content-length",
  "content-type",
  "transfer-encoding",
  "connection",
  "upgrade",
  "te",
  "trailer",
  "keep-alive",
  "expect",
]);
const ALLOW_ENTRY = /^(\[[0-9a-f:.]+\]|[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?)(?::(\d{1,5}))?$/;

/** One allowlist entry, normalised: lower-case host, port (null: the scheme's default). */
interface AllowedHost {
  hostname: string;
  port: number | null;
}

/**
 * Check `--http-allow` entries (exact `host` or `host:port`, IPv6 in brackets); throws
 * one line naming the first bad entry. Returns them lower-cased.
 */
export function checkHttpAllow(entries: readonly string[]): string[] {
  checkStringList("checkHttpAllow", "entries", entries);
  return entries.map((entry) => {
    const e = entry.trim().toLowerCase();
    const match = ALLOW_ENTRY.exec(e);
    const port = match?.[2] === undefined ? null : Number(match[2]);
    if (!match || (port !== null && (port < 1 || port > 65535))) {
      throw new Error(
        `Invalid http allowlist entry "${entry.slice(0, 100)}": expected host or host:port`,
      );
    }
    return e;
  });
}

function parseAllow(entries: readonly string[]): AllowedHost[] {
  return checkHttpAllow(entries).map((e) => {
    const match = ALLOW_ENTRY.exec(e)!;
    return { hostname: match[1]!, port: match[2] === undefined ? null : Number(match[2]) };
  });
}

function defaultPort(url: URL): number {
  return url.protocol === "https:" ? 443 : 80;
}

function isAllowed(url: URL, allow: readonly AllowedHost[]): boolean {
  const port = url.port === "" ? defaultPort(url) : Number(url.port);
  return allow.some((a) => a.hostname === url.hostname && (a.port ?? defaultPort(url)) === port);
}

/** The URL's origin, the only part of it a message shows. */
function originOf(url: URL): string {
  return `${url.protocol}//${url.host}`;
}

/** A checked request, before the allowlist (which the handler applies). */
export interface HttpRequest {
  url: URL;
  body: string;
  headers: [string, string][];
  timeoutMs: number;
  /** The secret's variable name, or null for the unnamed one (which may be unset). */
  secretVariable: string | null;
}

function checkUrl(raw: unknown): URL {
  if (typeof raw !== "string" || raw.length === 0 || raw.length > MAX_URL_LENGTH) {
    throw new TypeError(`url must be a string of 1 to ${MAX_URL_LENGTH} characters`);
  }
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new TypeError("url is not an absolute URL");
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new TypeError(`url scheme "${url.protocol.slice(0, -1)}" is not http or https`);
  }
  if (url.username !== "" || url.password !== "") {
    throw new TypeError("url must not carry user:password (use headers)");
  }
  url.hash = "";
  return url;
}

function checkHeaders(raw: unknown): [string, string][] {
  if (raw === undefined) return [];
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    throw new TypeError("headers must be an object of name: value strings");
  }
  const entries = Object.entries(raw as Record<string, unknown>);
  if (entries.length > MAX_HEADERS) throw new TypeError(`headers: at most ${MAX_HEADERS}`);
  return entries.map(([name, value]) => {
    const lower = name.toLowerCase();
    if (!HEADER_NAME.test(name)) throw new TypeError(`headers: "${name}" is not a header name`);
    if (RESERVED_HEADERS.has(lower) || lower.startsWith("x-shoal-")) {
      throw new TypeError(`headers: ${lower} is set by shoal`);
    }
    if (typeof value !== "string" || value.length > 8192 || !/^[\t\x20-\x7e]*$/.test(value)) {
      throw new TypeError(`headers: the value of ${lower} must be one line of printable ASCII`);
    }
    return [lower, value];
  });
}

/** Check a `shoal.http` payload (see the module doc); throws one line on the first problem. */
export function parseHttpPayload(
  payload: Record<string, unknown>,
  settings: HttpTaskSettings = {},
): HttpRequest {
  if (settings.url !== undefined && payload.url !== undefined) {
    throw new TypeError("url is fixed by this task: leave it out of the payload");
  }
  const url = checkUrl(settings.url ?? payload.url);
  const body = JSON.stringify(payload.body === undefined ? {} : payload.body);
  const timeout = payload.timeout_ms ?? settings.timeoutMs ?? DEFAULT_HTTP_TIMEOUT_MS;
  if (
    typeof timeout !== "number" || !Number.isInteger(timeout) || timeout < 1 ||
    timeout > MAX_HTTP_TIMEOUT_MS
  ) {
    throw new TypeError(`timeout_ms must be an integer from 1 to ${MAX_HTTP_TIMEOUT_MS}`);
  }
  let secretVariable: string | null = null;
  if (payload.secret !== undefined) {
    if (typeof payload.secret !== "string" || !SECRET_NAME.test(payload.secret)) {
      throw new TypeError("secret must be a name of 1 to 64 letters, digits or _");
    }
    secretVariable = `${HTTP_SECRET_ENV}_${payload.secret.toUpperCase()}`;
  }
  return { url, body, headers: checkHeaders(payload.headers), timeoutMs: timeout, secretVariable };
}

const encoder = new TextEncoder();

/**
 * The `x-shoal-signature` value: `sha256=` and the hex HMAC-SHA256 of
 * `<timestamp>.<jobId>.<body>` under `secret`.
 */
export async function signWebhook(
  secret: string,
  parts: { timestamp: string; jobId: string; body: string },
): Promise<string> {
  // Never shown: only a wrong kind or an empty string is refused, and those say nothing.
  checkString("signWebhook", "secret", secret);
  checkObject("signWebhook", "parts", parts, { what: "an object ({ timestamp, jobId, body })" });
  // `${undefined}` would be signed as the text "undefined": a signature nobody can check.
  checkString("signWebhook", "parts.timestamp", parts.timestamp);
  checkString("signWebhook", "parts.jobId", parts.jobId);
  checkString("signWebhook", "parts.body", parts.body, { empty: true });
  const key = await crypto.subtle.importKey(
    "raw",
    encoder.encode(secret),
    { name: "HMAC", hash: "SHA-256" },
    false,
    ["sign"],
  );
  const mac = await crypto.subtle.sign(
    "HMAC",
    key,
    encoder.encode(`${parts.timestamp}.${parts.jobId}.${parts.body}`),
  );
  return "sha256=" +
    Array.from(new Uint8Array(mac), (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * The delay a `Retry-After` value asks for (delta seconds or an HTTP date), or null when
 * absent or unreadable. A date in the past means now.
 */
export function parseRetryAfter(value: string | null, nowMs: number = Date.now()): number | null {
  checkString("parseRetryAfter", "value", value, { empty: true, nullable: true });
  checkNumber("parseRetryAfter", "nowMs", nowMs, { min: 0, max: 8.64e15 });
  if (value === null) return null;
  const text = value.trim();
  if (/^\d{1,10}$/.test(text)) return Number(text) * 1000;
  const at = Date.parse(text);
  if (Number.isNaN(at)) return null;
  return Math.max(0, at - nowMs);
}

/** The first EXCERPT_CHARS characters of the body, on one line; the rest is not read. */
async function readExcerpt(response: Response): Promise<string> {
  if (response.body === null) return "";
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let text = "";
  try {
    while (text.length < EXCERPT_CHARS) {
      const { done, value } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
    }
  } finally {
    // Free the connection without downloading the rest of a large response.
    await reader.cancel().catch(() => {}); // cancelling a finished or failed stream: nothing to do
  }
  return text.slice(0, EXCERPT_CHARS).replace(/\s*\n\s*/g, " ");
}

class RequestTimeout extends Error {
  override name = "RequestTimeout";
}

/** Build the request headers, signing when a secret applies. */
async function requestHeaders(
  request: HttpRequest,
  jobId: string,
  attempt: number,
  env: (name: string) => string | undefined,
): Promise<Headers> {
  const headers = new Headers(request.headers);
  const timestamp = String(Math.floor(Date.now() / 1000));
  headers.set("content-type", "application/json");
  if (!headers.has("user-agent")) headers.set("user-agent", "shoal.http");
  headers.set("x-shoal-job-id", jobId);
  headers.set("x-shoal-attempt", String(attempt));
  headers.set("x-shoal-timestamp", timestamp);
  const variable = request.secretVariable ?? HTTP_SECRET_ENV;
  const secret = env(variable);
  if (secret === undefined || secret === "") {
    if (request.secretVariable !== null) {
      throw new PermanentError(
        `Cannot sign the request: ${variable} is not set in the consumer's environment`,
      );
    }
    return headers; // no secret configured: unsigned, as documented
  }
  headers.set(
    "x-shoal-signature",
    await signWebhook(secret, { timestamp, jobId, body: request.body }),
  );
  return headers;
}

/** POST the request; the outcome rules are in the module doc. */
async function post(
  request: HttpRequest,
  headers: Headers,
  signal: AbortSignal,
): Promise<{ status: number; body: string; retryAfter: string | null }> {
  const origin = originOf(request.url);
  const controller = new AbortController();
  const onAbort = () => controller.abort(signal.reason);
  signal.addEventListener("abort", onAbort, { once: true });
  const timer = setTimeout(
    () => controller.abort(new RequestTimeout("timed out")),
    request.timeoutMs,
  );
  let response: Response;
  let body: string;
  try {
    response = await fetch(request.url, {
      method: "POST",
      headers,
      body: request.body,
      redirect: "manual",
      signal: controller.signal,
    });
    body = await readExcerpt(response);
  } catch (error) {
    if (signal.aborted) throw signal.reason; // shutdown, cancel or task timeout: not ours
    if (controller.signal.reason instanceof RequestTimeout) {
      throw new Error(`POST ${origin} timed out after ${formatDuration(request.timeoutMs)}`);
    }
    // Deno's message quotes the whole URL, whose path or query may hold a token.
    const why = describeError(error).replaceAll(request.url.href, `${origin}/…`);
    throw new Error(`POST ${origin} failed: ${why}`, { cause: error });
  } finally {
    clearTimeout(timer);
    signal.removeEventListener("abort", onAbort);
  }
  return { status: response.status, body, retryAfter: response.headers.get("retry-after") };
}

/** Turn a response into the job's outcome: a result, or the error that retries or buries it. */
function outcome(
  origin: string,
  status: number,
  body: string,
  retryAfter: string | null,
): { status: number; body: string } {
  if (status >= 200 && status < 300) return { status, body };
  const said = body === "" ? "" : `: ${body.slice(0, 200)}`;
  if (status === 429 || status >= 500) {
    const message = `POST ${origin} answered ${status}${said}`;
    const delay = parseRetryAfter(retryAfter);
    throw delay === null ? new Error(message) : new RetryLaterError(message, delay);
  }
  if (status >= 300 && status < 400) {
    throw new PermanentError(
      `POST ${origin} answered ${status} (a redirect): shoal.http does not follow redirects, put the final URL in the payload`,
    );
  }
  throw new PermanentError(`POST ${origin} answered ${status}${said}`);
}

/** A `shoal.http`-style task; `builtinTasks()` registers the default one. */
export function httpTask(settings: HttpTaskSettings = {}): AnyTask {
  checkOptions("httpTask", settings, "settings");
  checkStringList("httpTask", "settings.allow", settings.allow, { optional: true });
  checkString("httpTask", "settings.url", settings.url, { optional: true });
  checkInteger("httpTask", "settings.timeoutMs", settings.timeoutMs, {
    min: 1,
    max: MAX_HTTP_TIMEOUT_MS,
    optional: true,
  });
  checkFunction("httpTask", "settings.env", settings.env, { optional: true });
  const name = settings.name ?? "shoal.http";
  const allow = parseAllow(settings.allow ?? []);
  if (settings.url !== undefined) checkUrl(settings.url);
  const env = settings.env ?? ((variable: string) => Deno.env.get(variable));
  return defineTask<HttpRequest>({
    name,
    queue: settings.queue,
    parse: (payload) => parseHttpPayload(payload, settings),
    async handler(request, ctx) {
      const origin = originOf(request.url);
      if (allow.length === 0) {
        throw new PermanentError(
          `${name} may not send anywhere yet: allow hosts with --http-allow or SHOAL_HTTP_ALLOW`,
        );
      }
      if (!isAllowed(request.url, allow)) {
        throw new PermanentError(
          `${name} may not send to ${origin}: its host is not in --http-allow (SHOAL_HTTP_ALLOW)`,
        );
      }
      const headers = await requestHeaders(request, ctx.job.id, ctx.job.attempts, env);
      const { status, body, retryAfter } = await post(request, headers, ctx.signal);
      return outcome(origin, status, body, retryAfter);
    },
  });
}
