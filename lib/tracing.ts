/**
 * OpenTelemetry traces (issue 16), opt-in through the standard `OTEL_*` environment.
 *
 * This module is what every process loads: the W3C `traceparent` check, the `OTEL_*`
 * settings read at the boundary ({@link tracingFromEnv}), and the one switch the rest of
 * shoal reads, {@link tracer}: null until {@link startTracing} loaded the OpenTelemetry
 * SDK (lib/tracing_otel.ts, by dynamic `import()`). With tracing off, nothing of the SDK is
 * loaded (idle RSS is unchanged) and each job costs one null check: no statement, no span,
 * no column read.
 *
 * What is traced, by a process with tracing on:
 * - `claim <queues>` (CONSUMER): one span per claim that found jobs (an empty poll records
 *   none), with the batch size;
 * - `run <task>` (CONSUMER): one span per job run, a child of its claim's span, LINKED to the
 *   span that enqueued the job (its stored traceparent); the handler runs with it active,
 *   so spans a handler makes are its children and jobs it enqueues link to it;
 * - `fan-out <task>` (PRODUCER): a child of the run that fanned out; its children's and its
 *   callbacks' runs link to it;
 * - `step <name>` (INTERNAL): a child of the run, per `ctx.step` call: `shoal.step.outcome`
 *   `recorded` (its function ran and its result was recorded), `replayed` (an earlier run
 *   recorded it: a short span, the function not run), `lost` (the claim's token moved on:
 *   rolled back) or `failed` (its function threw: status ERROR). The step's function runs
 *   with the step's span active. A replay is a span rather than an event on the run so a
 *   trace shows every step of the run in order, whichever run executed it;
 * - `transaction <task>` (INTERNAL): a child of the run, for `ctx.transaction`:
 *   `shoal.transaction.outcome` `committed`, `lost` (lost to a newer token: rolled back) or
 *   `failed` (status ERROR);
 * - `ctx.sleep`: an event `shoal.sleep` on the run span, with the sleep's name and
 *   `shoal.sleep.wake_at` (ISO 8601), `shoal.sleep.outcome` `suspended` (the run then ends with
 *   outcome `suspended`) or `woke` (a recorded sleep whose time has come, on a later run);
 * - enqueue: no span of its own; the active span's traceparent is stored with the job.
 * Attributes: `messaging.system` = shoal, `messaging.destination.name` (queue),
 * `messaging.operation.type`, `messaging.message.id`, `shoal.job.id`, `shoal.job.attempt`,
 * `shoal.task` (and `shoal.step.name` on a step); never a payload, a result (a step's
 * included) or a connection string. A failed run ends with
 * status ERROR and its error (as recorded on the job) as an exception event.
 *
 * Link, not parent: a job may run long after (and many times after) the request that
 * enqueued it, and a fan-out's thousand children would otherwise make one trace of a
 * whole workflow; the OpenTelemetry messaging conventions link a message's processing to
 * its creation for the same reason.
 *
 * @module
 */
import { checkInteger, checkObject, checkString, shown } from "./args.ts";
import type { Job } from "./queue.ts";

/**
 * The version 00 form of a W3C traceparent, lower case: version, trace id, parent span id,
 * flags. The only form shoal stores (shoal.traceparent_error in sql/functions/queue.sql checks
 * the same).
 */
const TRACEPARENT = /^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/;
const ZERO_TRACE = "0".repeat(32);
const ZERO_SPAN = "0".repeat(16);

/** Whether `value` is a W3C traceparent shoal stores: version 00, ids not all zeros. */
export function isTraceparent(value: unknown): value is string {
  if (typeof value !== "string") return false;
  const match = TRACEPARENT.exec(value);
  return match !== null && match[1] !== ZERO_TRACE && match[2] !== ZERO_SPAN;
}

/**
 * What a refusal of a traceparent says it expected: the one wording of the format, which
 * SQL's refusals (shoal.traceparent_error, sql/functions/queue.sql) repeat word for word.
 */
export const TRACEPARENT_EXPECTED =
  'a W3C traceparent "00-<32 hex trace id>-<16 hex span id>-<2 hex flags>" in lower case, ' +
  "with a trace id and span id not all zeros";

/** How often buffered spans are sent, by default (OTEL_BSP_SCHEDULE_DELAY). */
export const DEFAULT_SCHEDULE_DELAY_MS = 1_000;
/**
 * Spans buffered for export at most, by default (OTEL_BSP_MAX_QUEUE_SIZE; the SDK's is
 * 2,048: about 45 ms of a fast consumer's runs); past it, new spans are dropped, never the
 * consumer slowed.
 */
export const DEFAULT_MAX_QUEUE_SIZE = 20_000;
/** Spans per export request at most, by default (OTEL_BSP_MAX_EXPORT_BATCH_SIZE). */
export const DEFAULT_MAX_EXPORT_BATCH_SIZE = 512;
/**
 * How long one export (and so the flush at shutdown) may take before it is given up, by
 * default (OTEL_BSP_EXPORT_TIMEOUT).
 */
export const DEFAULT_EXPORT_TIMEOUT_MS = 10_000;

/** The settings of tracing, read from `OTEL_*` ({@link tracingFromEnv}). */
export interface TracingConfig {
  /** Where spans are POSTed (OTLP/HTTP JSON), the full URL with its path (`/v1/traces`). */
  tracesUrl: string;
  /** `service.name` of the resource (OTEL_SERVICE_NAME, default `shoal`). */
  serviceName: string;
  /** Milliseconds between exports (OTEL_BSP_SCHEDULE_DELAY, default 1,000). */
  scheduleDelayMs?: number;
  /** Spans buffered at most (OTEL_BSP_MAX_QUEUE_SIZE, default 20,000). */
  maxQueueSize?: number;
  /** Spans per export at most (OTEL_BSP_MAX_EXPORT_BATCH_SIZE, default 512). */
  maxExportBatchSize?: number;
  /** Milliseconds one export may take (OTEL_BSP_EXPORT_TIMEOUT, default 10,000). */
  exportTimeoutMs?: number;
}

/** A bad `OTEL_*` value: `main` reports it in one line (lib/cli.ts turns it into a UsageError). */
export class TracingConfigError extends Error {
  override name = "TracingConfigError";
}

/** The environment as tracingFromEnv() reads it. */
export interface EnvReader {
  get(name: string): string | undefined;
}

/** An http(s) URL, or a TracingConfigError naming the variable. */
function endpointUrl(variable: string, text: string): URL {
  let url: URL;
  try {
    url = new URL(text);
  } catch (cause) {
    throw new TracingConfigError(
      `Invalid ${variable}: expected an http:// or https:// URL, not ${JSON.stringify(text)}`,
      { cause },
    );
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new TracingConfigError(
      `Invalid ${variable}: expected an http:// or https:// URL, not a ${url.protocol} URL`,
    );
  }
  return url;
}

/** An OTEL boolean: true, false or unset (empty counts as unset); anything else is refused. */
function envBoolean(env: EnvReader, variable: string): boolean {
  const text = env.get(variable)?.trim().toLowerCase() ?? "";
  if (text === "" || text === "false") return false;
  if (text === "true") return true;
  throw new TracingConfigError(`Invalid ${variable}: expected true or false, not ${text}`);
}

/** The largest count or duration an OTEL_BSP_* variable takes (a Postgres integer's). */
const MAX_BSP = 2_147_483_647;

/** An OTEL_BSP_* integer of at least `min`, or undefined when unset (empty counts as unset). */
function envInteger(env: EnvReader, variable: string, min: number): number | undefined {
  const text = env.get(variable)?.trim() ?? "";
  if (text === "") return undefined;
  const value = /^[0-9]{1,10}$/.test(text) ? Number(text) : NaN;
  if (!(value >= min && value <= MAX_BSP)) {
    throw new TracingConfigError(
      `Invalid ${variable}: expected an integer from ${min} to ${MAX_BSP}, not ${text}`,
    );
  }
  return value;
}

/** The batch span processor's settings from OTEL_BSP_*, only those set. */
function batchFromEnv(env: EnvReader): Partial<TracingConfig> {
  const batch: Partial<TracingConfig> = {};
  const scheduleDelayMs = envInteger(env, "OTEL_BSP_SCHEDULE_DELAY", 0);
  const maxQueueSize = envInteger(env, "OTEL_BSP_MAX_QUEUE_SIZE", 1);
  const maxExportBatchSize = envInteger(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 1);
  const exportTimeoutMs = envInteger(env, "OTEL_BSP_EXPORT_TIMEOUT", 1);
  if (scheduleDelayMs !== undefined) batch.scheduleDelayMs = scheduleDelayMs;
  if (maxQueueSize !== undefined) batch.maxQueueSize = maxQueueSize;
  if (maxExportBatchSize !== undefined) batch.maxExportBatchSize = maxExportBatchSize;
  if (exportTimeoutMs !== undefined) batch.exportTimeoutMs = exportTimeoutMs;
  const queue = maxQueueSize ?? DEFAULT_MAX_QUEUE_SIZE;
  if ((maxExportBatchSize ?? DEFAULT_MAX_EXPORT_BATCH_SIZE) > queue) {
    throw new TracingConfigError(
      `Invalid OTEL_BSP_MAX_EXPORT_BATCH_SIZE: expected at most OTEL_BSP_MAX_QUEUE_SIZE (${queue}), not ${
        maxExportBatchSize ?? DEFAULT_MAX_EXPORT_BATCH_SIZE
      }`,
    );
  }
  return batch;
}

/**
 * Tracing's settings from the standard OpenTelemetry environment, or null when tracing is
 * off: OTEL_SDK_DISABLED=true, OTEL_TRACES_EXPORTER=none, or no endpoint set (opt-in: with
 * neither OTEL_EXPORTER_OTLP_TRACES_ENDPOINT nor OTEL_EXPORTER_OTLP_ENDPOINT, nothing is
 * exported, not even to the specification's localhost default). The traces endpoint is
 * used as given; the general one gets `v1/traces` appended, as the specification says.
 * Throws a TracingConfigError (one line) for a value that cannot work: an endpoint that is
 * not an http(s) URL, an exporter other than otlp or none, a protocol other than
 * http/json (the one this exporter speaks), a blank service name, an OTEL_BSP_* value that
 * is not an integer in range (or a batch larger than the queue). The OTEL_BSP_* variables
 * set the batch span processor: OTEL_BSP_SCHEDULE_DELAY (ms between exports, default
 * 1,000), OTEL_BSP_MAX_QUEUE_SIZE (spans buffered, default 20,000),
 * OTEL_BSP_MAX_EXPORT_BATCH_SIZE (spans per export, default 512) and
 * OTEL_BSP_EXPORT_TIMEOUT (ms per export, default 10,000).
 */
export function tracingFromEnv(env: EnvReader = Deno.env): TracingConfig | null {
  if (typeof (env as Partial<EnvReader> | null | undefined)?.get !== "function") {
    throw new TypeError(
      `Invalid env for tracingFromEnv(): expected an object with get(name), such as Deno.env, not ${
        shown(env)
      }`,
    );
  }
  if (envBoolean(env, "OTEL_SDK_DISABLED")) return null;
  const exporters = (env.get("OTEL_TRACES_EXPORTER") ?? "").split(",").map((e) => e.trim())
    .filter((e) => e !== "");
  for (const exporter of exporters) {
    if (exporter !== "otlp" && exporter !== "none") {
      throw new TracingConfigError(
        `Invalid OTEL_TRACES_EXPORTER: expected otlp or none, not ${exporter}`,
      );
    }
  }
  if (exporters.includes("none")) return null;
  for (const variable of ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"]) {
    const protocol = env.get(variable)?.trim();
    if (protocol && protocol !== "http/json") {
      throw new TracingConfigError(
        `Invalid ${variable}: shoal exports traces as http/json only, not ${protocol}`,
      );
    }
  }
  const traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")?.trim();
  const general = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")?.trim();
  let tracesUrl: string;
  if (traces) {
    tracesUrl = endpointUrl("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", traces).href;
  } else if (general) {
    const base = endpointUrl("OTEL_EXPORTER_OTLP_ENDPOINT", general);
    if (!base.pathname.endsWith("/")) base.pathname += "/";
    tracesUrl = new URL("v1/traces", base).href;
  } else return null;
  const service = env.get("OTEL_SERVICE_NAME");
  if (service !== undefined && service.trim() === "") {
    throw new TracingConfigError("Invalid OTEL_SERVICE_NAME: expected a name, not an empty value");
  }
  return { tracesUrl, serviceName: service?.trim() ?? "shoal", ...batchFromEnv(env) };
}

/** The endpoint as a log line may show it: no credentials, no query string. */
export function shownEndpoint(url: string): string {
  const u = new URL(url);
  return `${u.protocol}//${u.host}${u.pathname}`;
}

/** One job run's span (see the module comment). */
export interface RunSpan {
  /** This span's context as a traceparent: what jobs enqueued by the handler carry. */
  readonly traceparent: string;
  /** Run `fn` with this span active (spans the handler makes become its children). */
  within<T>(fn: () => T): T;
  /** A fan-out from this run: its span, ended by the caller. */
  fanOut(children: number): FanOutSpan;
  /** A `ctx.step` of this run that is about to run its function: its span, ended by the caller. */
  step(name: string): ChildSpan;
  /** A `ctx.step` whose result an earlier run recorded: a short span, ended at once. */
  replayed(name: string): void;
  /** This run's `ctx.transaction`: its span, ended by the caller. */
  transaction(): ChildSpan;
  /** A `ctx.sleep`: an event on this span (`suspended` until `wakeAt`, or `woke`). */
  slept(name: string, wakeAt: Date, outcome: "suspended" | "woke"): void;
  /**
   * End the span: `outcome` as recorded (`completed`, `retried`, `dead`, `stale`, `lost`,
   * `released`, or `unrecorded` when it could not be written and the job will be
   * redelivered), `error` (the message recorded on the job) for a failure.
   */
  end(outcome: string, error?: string): void;
}

/** A step's or a transaction's span, a child of its run's. */
export interface ChildSpan {
  /** Run `fn` with this span active (spans made inside become its children). */
  within<T>(fn: () => T): T;
  /**
   * End the span with its outcome (`recorded`, `committed`, `lost` or `failed`); `error`, a
   * failure's message, sets status ERROR.
   */
  end(outcome: string, error?: string): void;
}

/** A fan-out's span. */
export interface FanOutSpan {
  /** What its children and callbacks carry. */
  readonly traceparent: string;
  end(error?: string): void;
}

/** What shoal's code asks of the loaded SDK (lib/tracing_otel.ts implements it). */
export interface Tracer {
  /** The traceparent of the span active in the caller's context, or null. */
  activeTraceparent(): string | null;
  /** A claim that found jobs: its span, from `startedAt` (epoch ms) to now. */
  claimed(queues: readonly string[], startedAt: number, jobs: readonly Job[]): void;
  /** The traceparents of claimed jobs, read by the consumer after the claim. */
  remember(job: Job, traceparent: string): void;
  /** Start a job's run span (a child of its claim's, linked to its producer). */
  startRun(job: Job): RunSpan;
  /** Export every ended span, then stop. */
  shutdown(): Promise<void>;
}

let current: Tracer | null = null;

/** The loaded tracer, or null with tracing off: the one check the hot paths make. */
export function tracer(): Tracer | null {
  return current;
}

/**
 * Load the OpenTelemetry SDK and start exporting spans as `config` says; registers the
 * global tracer provider and an AsyncLocalStorage context manager, so the active span of
 * the caller's context is stored with the jobs it enqueues. Resolves to the tracer
 * (started once per process: a second call returns the first tracer).
 */
export async function startTracing(config: TracingConfig): Promise<Tracer> {
  const fn = "startTracing";
  checkObject(fn, "config", config, { what: "tracing settings ({ tracesUrl, serviceName })" });
  checkString(fn, "config.serviceName", config.serviceName);
  checkString(fn, "config.tracesUrl", config.tracesUrl);
  if (!/^https?:\/\//.test(config.tracesUrl) || !URL.canParse(config.tracesUrl)) {
    throw new TypeError(
      `Invalid config.tracesUrl for ${fn}(): expected an http:// or https:// URL, not ${
        shown(config.tracesUrl)
      }`,
    );
  }
  checkInteger(fn, "config.scheduleDelayMs", config.scheduleDelayMs, {
    min: 0,
    max: MAX_BSP,
    optional: true,
  });
  for (const field of ["maxQueueSize", "maxExportBatchSize", "exportTimeoutMs"] as const) {
    checkInteger(fn, `config.${field}`, config[field], { min: 1, max: MAX_BSP, optional: true });
  }
  if (current !== null) return current;
  // A specifier built from two literals: `deno run` does not follow it when it builds the
  // module graph at start (a literal one would have it read and parse the whole SDK, about
  // 0.7 MB of an idle consumer's RSS, tracing on or off), while `deno bundle` folds it and
  // inlines the module; `deno compile` is told to embed it (compile:entry's --include).
  const { OtelTracer } = await import(
    "./tracing_otel" + ".ts"
  ) as typeof import("./tracing_otel.ts");
  current ??= new OtelTracer(config);
  return current;
}

/**
 * Flush every ended span to the exporter and stop tracing (graceful shutdown); nothing
 * when tracing never started. Never throws: a collector that is down loses those spans,
 * and the failure is logged by the tracer.
 */
export async function stopTracing(): Promise<void> {
  const stopping = current;
  current = null;
  await stopping?.shutdown();
}
