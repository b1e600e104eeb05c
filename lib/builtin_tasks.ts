/**
 * The built-in tasks every stock shoal binary knows, useful without writing code:
 * `shoal.noop`, `shoal.sleep`, `shoal.fail`, `shoal.chord`, and the two that reach outside
 * shoal, `shoal.http` (lib/http_task.ts) and `shoal.sql` (lib/sql_task.ts). The command
 * line (lib/cli.ts) registers them; lib/tasks.ts, which defines what a task is, does not
 * know them.
 *
 * @module
 */
import { checkOptions } from "./args.ts";
import type { FanOutSpec } from "./barrier.ts";
import { httpTask, type HttpTaskSettings } from "./http_task.ts";
import { sqlTask, type SqlTaskSettings } from "./sql_task.ts";
import { type AnyTask, defineTask, PermanentError } from "./tasks.ts";

function abortableDelay(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason);
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

/** `shoal.noop`: does nothing; for benchmarks and smoke tests. */
export const noopTask: AnyTask = defineTask({ name: "shoal.noop", handler: () => {} });

/** `shoal.sleep` `{ms}`: waits, honouring the abort signal; for demos and tests. */
export const sleepTask: AnyTask = defineTask<{ ms: number }>({
  name: "shoal.sleep",
  parse(payload) {
    const ms = payload.ms;
    if (typeof ms !== "number" || !Number.isFinite(ms) || ms < 0 || ms > 86_400_000) {
      throw new TypeError("ms must be a number of milliseconds from 0 to 86400000");
    }
    return { ms };
  },
  handler: ({ ms }, ctx) => abortableDelay(ms, ctx.signal),
});

/** `shoal.fail` `{message, permanent?}`: throws; for demos and tests of retries and dead letters. */
export const failTask: AnyTask = defineTask<{ message: string; permanent: boolean }>({
  name: "shoal.fail",
  parse(payload) {
    const message = payload.message ?? "shoal.fail was asked to fail";
    if (typeof message !== "string") throw new TypeError("message must be a string");
    return { message, permanent: payload.permanent === true };
  },
  handler({ message, permanent }) {
    throw permanent ? new PermanentError(message) : new Error(message);
  },
});

/**
 * `shoal.chord`: a fan-out any language can start with plain SQL. Payload:
 * `{"children": [{"task", "payload"?, "queue"?}, ...], "callback": {"task", "payload"?,
 * "queue"?}, "on_error"?: {...}, "expires_in_ms"?: n}`.
 */
export const chordTask: AnyTask = defineTask<FanOutSpec>({
  name: "shoal.chord",
  parse(payload) {
    const job = (j: unknown, what: string) => {
      if (j === null || typeof j !== "object" || Array.isArray(j)) {
        throw new TypeError(`${what} must be an object with a task`);
      }
      const o = j as Record<string, unknown>;
      // A name only: JSON cannot carry a definition, and an object here must not pass for one.
      if (typeof o.task !== "string") throw new TypeError(`${what}.task must be a task name`);
      return {
        task: o.task,
        payload: o.payload as Record<string, unknown> | undefined,
        queue: o.queue as string | undefined,
        maxAttempts: o.max_attempts as number | undefined,
      };
    };
    if (!Array.isArray(payload.children)) throw new TypeError("children must be an array");
    return {
      children: payload.children.map((c, i) => job(c, `children[${i}]`)),
      callback: job(payload.callback, "callback"),
      onError: payload.on_error === undefined ? undefined : job(payload.on_error, "on_error"),
      expiresInMs: payload.expires_in_ms as number | undefined,
    };
  },
  handler(spec, ctx) {
    ctx.fanOut(spec);
  },
});

/** Settings of the built-in tasks that reach outside shoal; each allows nothing by default. */
export interface BuiltinSettings {
  /** `shoal.http`: the hosts it may POST to (see lib/http_task.ts). */
  http?: HttpTaskSettings;
  /** `shoal.sql`: the schemas whose functions it may call (see lib/sql_task.ts). */
  sql?: SqlTaskSettings;
}

/** The tasks every stock shoal binary knows. */
export function builtinTasks(settings: BuiltinSettings = {}): AnyTask[] {
  checkOptions("builtinTasks", settings, "settings");
  checkOptions("builtinTasks", settings.http, "settings.http");
  checkOptions("builtinTasks", settings.sql, "settings.sql");
  return [
    noopTask,
    sleepTask,
    failTask,
    chordTask,
    httpTask(settings.http ?? {}),
    sqlTask(settings.sql ?? {}),
  ];
}
