/**
 * Who may use the dashboard, and which requests may change something.
 *
 * - Binding: loopback only unless credentials are configured. A non-loopback bind without
 *   them is refused ({@link bindRefusal}): `shoal dashboard` will not start, and a role's
 *   `--http` server serves its probes and /metrics as before but not the dashboard.
 * - Credentials come from the environment only (never a flag, so they stay out of `ps`):
 *   `SHOAL_DASHBOARD_TOKEN` (sent as `Authorization: Bearer <token>`, or visit
 *   `/?token=<token>` once: the browser then keeps it in an HttpOnly, SameSite=Strict
 *   cookie), or `SHOAL_DASHBOARD_USER` with `SHOAL_DASHBOARD_PASSWORD` (HTTP basic auth, which
 *   browsers prompt for). Once configured they are required on every address, loopback too.
 * - Cross-site requests: an action is a POST, refused when the browser says it came from
 *   another site (`Sec-Fetch-Site`) or from another origin (`Origin`): a page elsewhere cannot
 *   make a logged-in browser retry or purge anything. Clients that are not browsers send
 *   neither header and are judged by their credentials alone.
 *
 * @module
 */
import { timingSafeEqual } from "node:crypto";

/** The credentials the dashboard asks for; none configured: open on loopback only. */
export interface DashboardAccess {
  token?: string;
  basic?: { user: string; password: string };
}

/** The cookie a browser keeps the token in after visiting `/?token=...`. */
export const TOKEN_COOKIE = "shoal_dashboard_token";
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

/** Constant-time equality of two strings (a token compare must not leak its prefix). */
function same(given: string, expected: string): boolean {
  const a = new TextEncoder().encode(given);
  const b = new TextEncoder().encode(expected);
  // Compared against itself when lengths differ, so the time does not depend on the prefix.
  return a.length === b.length ? timingSafeEqual(a, b) : (timingSafeEqual(b, b) && false);
}

function cookie(request: Request, name: string): string | undefined {
  for (const part of (request.headers.get("cookie") ?? "").split(";")) {
    const [key, ...value] = part.trim().split("=");
    if (key === name) return decodeURIComponent(value.join("="));
  }
  return undefined;
}

/** The outcome of {@link authenticate}: let through, or answer with this response. */
export type AuthOutcome = { ok: true } | { ok: false; response: Response };

/**
 * Check a request's credentials against `access` (nothing to check when none are configured:
 * the bind was loopback). A `?token=` that matches answers with a redirect that stores it in
 * the cookie and drops it from the address bar and history.
 */
export function authenticate(request: Request, access: DashboardAccess): AuthOutcome {
  if (!hasCredentials(access)) return { ok: true };
  const header = request.headers.get("authorization") ?? "";
  if (access.token !== undefined) {
    const bearer = /^Bearer (.+)$/.exec(header)?.[1];
    if (bearer !== undefined && same(bearer, access.token)) return { ok: true };
    const kept = cookie(request, TOKEN_COOKIE);
    if (kept !== undefined && same(kept, access.token)) return { ok: true };
    const url = new URL(request.url);
    const given = url.searchParams.get("token");
    if (given !== null && request.method === "GET" && same(given, access.token)) {
      url.searchParams.delete("token");
      return {
        ok: false,
        response: new Response(null, {
          status: 303,
          headers: {
            location: url.pathname + url.search,
            "set-cookie": `${TOKEN_COOKIE}=${
              encodeURIComponent(access.token)
            }; Path=/; HttpOnly; SameSite=Strict`,
          },
        }),
      };
    }
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
 * Why a POST looks cross-site; null when it does not. Browsers send `Sec-Fetch-Site` (and
 * `Origin` on every POST); a request that carries neither is not from a browser page.
 */
export function crossSiteRefusal(request: Request): string | null {
  const site = request.headers.get("sec-fetch-site");
  if (site !== null && site !== "same-origin" && site !== "none") {
    return `cross-site request refused (Sec-Fetch-Site: ${site.slice(0, 20)})`;
  }
  const origin = request.headers.get("origin");
  if (origin !== null && origin !== new URL(request.url).origin) {
    return "cross-origin request refused (its Origin is not this dashboard's)";
  }
  return null;
}
