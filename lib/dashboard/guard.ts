/**
 * Who may use the dashboard, and which requests may change something.
 *
 * - Binding: loopback only unless credentials are configured. A non-loopback bind without
 *   them is refused ({@link bindRefusal}): `shoal dashboard` will not start, and a role's
 *   `--http` server serves its probes and /metrics as before but not the dashboard.
 * - Without credentials, every request must name a loopback `Host` (`localhost`,
 *   `127.0.0.0/8`, `[::1]`, any port), else 421 ({@link hostRefusal}): a page on a domain
 *   re-pointed to 127.0.0.1 (DNS rebinding) reads and acts as a foreign origin would.
 * - Credentials come from the environment only (never a flag, so they stay out of `ps`):
 *   `SHOAL_DASHBOARD_TOKEN` (sent as `Authorization: Bearer <token>`, or visit
 *   `/?token=<token>` once: the browser then keeps an HMAC of it, never the token, in an
 *   HttpOnly, SameSite=Strict cookie named after the port, `Secure` when the request came
 *   over https, directly or as a proxy's `X-Forwarded-Proto: https` says), or
 *   `SHOAL_DASHBOARD_USER` with `SHOAL_DASHBOARD_PASSWORD` (HTTP basic auth, which browsers
 *   prompt for). Once configured they are required on every address, loopback too. The
 *   HMAC key is random per process: a restart logs every browser out (visit `/?token=` again).
 *   A GET carrying `?token=` is always redirected to the same address without it.
 * - Cross-site requests: an action is a POST, refused when the browser says it came from
 *   another site (`Sec-Fetch-Site`) or from another origin (`Origin`, compared with the
 *   request's `Host`, scheme ignored so a TLS-terminating proxy works; `Origin: null`
 *   refused): a page elsewhere cannot make a logged-in browser retry or purge anything.
 *   Clients that are not browsers send neither header and are judged by their credentials
 *   alone.
 *
 * @module
 */
import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";

/** The credentials the dashboard asks for; none configured: open on loopback only. */
export interface DashboardAccess {
  token?: string;
  basic?: { user: string; password: string };
}

/**
 * The cookie a browser keeps the token's HMAC in after visiting `/?token=...`: one per port,
 * so two dashboards on one host (cookies ignore ports) do not overwrite each other's.
 */
export function tokenCookieName(request: Request): string {
  return `shoal_dashboard_${portOf(request)}`;
}

/** Key of the cookie's HMAC: random per process (a restart asks browsers for the token again). */
const COOKIE_KEY = randomBytes(32);

/** What the cookie holds for `token`: an HMAC, so a stolen cookie file does not hold the token. */
export function cookieValue(token: string): string {
  return createHmac("sha256", COOKIE_KEY).update(token).digest("base64url");
}
export const TOKEN_ENV = "SHOAL_DASHBOARD_TOKEN";
export const USER_ENV = "SHOAL_DASHBOARD_USER";
export const PASSWORD_ENV = "SHOAL_DASHBOARD_PASSWORD";
/** The shortest token accepted: a guessable one is no protection. */
export const MIN_TOKEN_LENGTH = 16;

/**
 * Read the credentials from the environment. A half-configured basic auth or a short token is
 * an error (one line), never silently an open dashboard.
 */
export function accessFromEnv(
  env: { get(name: string): string | undefined } = Deno.env,
): DashboardAccess {
  const token = env.get(TOKEN_ENV) || undefined;
  const user = env.get(USER_ENV) || undefined;
  const password = env.get(PASSWORD_ENV) || undefined;
  if (token !== undefined && token.length < MIN_TOKEN_LENGTH) {
    throw new Error(`Invalid ${TOKEN_ENV}: use at least ${MIN_TOKEN_LENGTH} characters`);
  }
  if ((user === undefined) !== (password === undefined)) {
    throw new Error(`Invalid dashboard credentials: set both ${USER_ENV} and ${PASSWORD_ENV}`);
  }
  if (user !== undefined && user.includes(":")) {
    throw new Error(`Invalid ${USER_ENV}: basic auth user names cannot hold a colon`);
  }
  return {
    ...(token !== undefined ? { token } : {}),
    ...(user !== undefined ? { basic: { user, password: password! } } : {}),
  };
}

/** Whether `access` holds any credential. */
export function hasCredentials(access: DashboardAccess): boolean {
  return access.token !== undefined || access.basic !== undefined;
}

/** Whether a server bound to `hostname` is reachable from this machine only. */
export function isLoopback(hostname: string): boolean {
  const host = hostname.toLowerCase().replace(/^\[|\]$/g, "");
  return host === "localhost" || host === "::1" || /^127(\.\d{1,3}){3}$/.test(host);
}

/** Why the dashboard must not be served on `hostname` with `access`; null when it may. */
export function bindRefusal(hostname: string, access: DashboardAccess): string | null {
  if (isLoopback(hostname) || hasCredentials(access)) return null;
  return `Refusing to serve the dashboard on ${hostname}, beyond loopback, without credentials: ` +
    `set ${TOKEN_ENV}, or ${USER_ENV} and ${PASSWORD_ENV}, or bind 127.0.0.1`;
}

/**
 * The `host[:port]` a request was sent to: its `Host` header (what the browser put in the
 * address bar), else the URL's (a request built in process).
 */
export function requestHost(request: Request): string {
  return (request.headers.get("host") ?? new URL(request.url).host).toLowerCase();
}

/** The hostname of a `host[:port]` (an IPv6 address keeps its brackets). */
function hostnameOf(host: string): string {
  return host.startsWith("[") ? host.slice(0, host.indexOf("]") + 1) : host.replace(/:\d*$/, "");
}

function portOf(request: Request): string {
  const host = requestHost(request);
  const port = /:(\d+)$/.exec(host.startsWith("[") ? host.slice(host.indexOf("]")) : host)?.[1];
  if (port !== undefined) return port;
  return new URL(request.url).protocol === "https:" ? "443" : "80";
}

/**
 * Why a request is refused for its `Host`; null when it may go on. Without credentials the
 * dashboard is open to whoever reaches it, which the bind keeps to this machine; a browser
 * page on another domain that resolves to 127.0.0.1 reaches it too, with its own domain as
 * the Host: only loopback names are accepted.
 */
export function hostRefusal(request: Request, access: DashboardAccess): string | null {
  if (hasCredentials(access)) return null;
  const host = requestHost(request);
  if (isLoopback(hostnameOf(host))) return null;
  return `refused: this dashboard has no credentials and answers loopback hosts only ` +
    `(Host ${JSON.stringify(host.slice(0, 80))})`;
}

/** Constant-time equality of two strings (a token compare must not leak its prefix). */
function same(given: string, expected: string): boolean {
  const a = new TextEncoder().encode(given);
  const b = new TextEncoder().encode(expected);
  // Compared against itself when lengths differ, so the time does not depend on the prefix.
  return a.length === b.length ? timingSafeEqual(a, b) : (timingSafeEqual(b, b) && false);
}

/** A cookie's raw value (not decoded: ours is base64url; anything else simply does not match). */
function cookie(request: Request, name: string): string | undefined {
  for (const part of (request.headers.get("cookie") ?? "").split(";")) {
    const [key, ...value] = part.trim().split("=");
    if (key === name) return value.join("=");
  }
  return undefined;
}

/** Whether the browser reached us over https (directly, or through a proxy that says so). */
function overHttps(request: Request): boolean {
  return new URL(request.url).protocol === "https:" ||
    request.headers.get("x-forwarded-proto")?.split(",")[0]?.trim().toLowerCase() === "https";
}

/** An address's path and query, never protocol-relative (`//evil.example/` is one slash). */
export function localPath(url: URL): string {
  return "/" + url.pathname.replace(/^\/+/, "") + url.search;
}

/** The outcome of {@link authenticate}: let through, or answer with this response. */
export type AuthOutcome = { ok: true } | { ok: false; response: Response };

/**
 * Check a request's credentials against `access` (nothing to check when none are configured:
 * the bind and the Host are loopback). A GET carrying `?token=` is answered with a redirect
 * to the same address without it (out of the address bar and history), which stores the
 * token's HMAC in the cookie when the token matches; whatever else authenticates it.
 */
export function authenticate(request: Request, access: DashboardAccess): AuthOutcome {
  const url = new URL(request.url);
  if (request.method === "GET" && url.searchParams.has("token")) {
    const given = url.searchParams.get("token")!;
    url.searchParams.delete("token");
    const headers: Record<string, string> = { location: localPath(url) };
    if (access.token !== undefined && same(given, access.token)) {
      headers["set-cookie"] = `${tokenCookieName(request)}=${cookieValue(access.token)}; ` +
        `Path=/; HttpOnly; SameSite=Strict${overHttps(request) ? "; Secure" : ""}`;
    }
    return { ok: false, response: new Response(null, { status: 303, headers }) };
  }
  if (!hasCredentials(access)) return { ok: true };
  const header = request.headers.get("authorization") ?? "";
  if (access.token !== undefined) {
    const bearer = /^Bearer (.+)$/.exec(header)?.[1];
    if (bearer !== undefined && same(bearer, access.token)) return { ok: true };
    const kept = cookie(request, tokenCookieName(request));
    if (kept !== undefined && same(kept, cookieValue(access.token))) return { ok: true };
  }
  if (access.basic !== undefined) {
    const encoded = /^Basic ([A-Za-z0-9+/=]+)$/.exec(header)?.[1];
    if (encoded !== undefined) {
      let decoded = "";
      try {
        decoded = new TextDecoder().decode(Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0)));
      } catch (error) {
        if (!(error instanceof DOMException)) throw error; // not base64: refused below
      }
      const expected = `${access.basic.user}:${access.basic.password}`;
      if (same(decoded, expected)) return { ok: true };
    }
  }
  const headers: Record<string, string> = { "content-type": "text/plain; charset=utf-8" };
  if (access.basic !== undefined) {
    headers["www-authenticate"] = 'Basic realm="shoal", charset="UTF-8"';
  }
  const how = access.token !== undefined
    ? `send the token (Authorization: Bearer, or open /?token=...)`
    : "log in with the dashboard's user and password";
  return {
    ok: false,
    response: new Response(`unauthorized: ${how}\n`, { status: 401, headers }),
  };
}

/**
 * The `host[:port]` of an Origin header, the default port left out as in a Host header;
 * null for `null` (a sandboxed or privacy-sensitive context) or anything unparsable.
 */
function originHost(origin: string): string | null {
  if (!URL.canParse(origin)) return null;
  const url = new URL(origin);
  return url.host === "" ? null : url.host.toLowerCase();
}

/**
 * Why a POST looks cross-site; null when it does not. Browsers send `Sec-Fetch-Site` (and
 * `Origin` on every POST); a request that carries neither is not from a browser page. The
 * Origin is compared with the Host the request was sent to (host and port; the scheme is
 * ignored, so a proxy terminating TLS in front of the dashboard works).
 */
export function crossSiteRefusal(request: Request): string | null {
  const site = request.headers.get("sec-fetch-site");
  if (site !== null && site !== "same-origin" && site !== "none") {
    return `cross-site request refused (Sec-Fetch-Site: ${site.slice(0, 20)})`;
  }
  const origin = request.headers.get("origin");
  if (origin !== null && originHost(origin) !== requestHost(request)) {
    return "cross-origin request refused (its Origin is not this dashboard's)";
  }
  return null;
}
