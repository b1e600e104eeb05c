/**
 * The OpenTelemetry side of lib/tracing.ts: the SDK, its OTLP/HTTP exporter and shoal's
 * spans. Loaded only by `startTracing()` (a dynamic `import()`): a process with tracing
 * off never evaluates this module or the `@opentelemetry/*` packages it imports.
 *
 * @module
 */
import {
  type Context,
  context,
  diag,
  type DiagLogger,
  DiagLogLevel,
  type Link,
  ROOT_CONTEXT,
  type Span,
  type SpanContext,
  SpanKind,
  SpanStatusCode,
  trace,
} from "@opentelemetry/api";
import { AsyncLocalStorageContextManager } from "@opentelemetry/context-async-hooks";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { BatchSpanProcessor, TracerProvider } from "@opentelemetry/sdk-trace";
import { describeError, logger } from "./log.ts";
import type { Job } from "./queue.ts";
import {
  type ChildSpan,
  DEFAULT_EXPORT_TIMEOUT_MS,
  DEFAULT_MAX_EXPORT_BATCH_SIZE,
  DEFAULT_MAX_QUEUE_SIZE,
  DEFAULT_SCHEDULE_DELAY_MS,
  type FanOutSpan,
  isTraceparent,
  type RunSpan,
  shownEndpoint,
  type Tracer,
  type TracingConfig,
} from "./tracing.ts";

/** The instrumentation scope of shoal's spans. */
const SCOPE = "shoal";

/** The span context a traceparent stands for (a remote parent, as links take it). */
function spanContextOf(traceparent: string): SpanContext | null {
  if (!isTraceparent(traceparent)) return null;
  return {
    traceId: traceparent.slice(3, 35),
    spanId: traceparent.slice(36, 52),
    traceFlags: parseInt(traceparent.slice(53, 55), 16),
    isRemote: true,
  };
}

/** A span context as a traceparent (version 00). */
function traceparentOf(ctx: SpanContext): string {
  return `00-${ctx.traceId}-${ctx.spanId}-${(ctx.traceFlags & 0xff).toString(16).padStart(2, "0")}`;
}

/** The SDK's own diagnostics (a failed export, say) as shoal log lines, warnings and up. */
class DiagToLog implements DiagLogger {
  readonly #log = logger("tracing");
  error(message: string, ...args: unknown[]): void {
    this.#log.error("OpenTelemetry: {message}", { message: describe(message, args) });
  }
  warn(message: string, ...args: unknown[]): void {
    this.#log.warn("OpenTelemetry: {message}", { message: describe(message, args) });
  }
  info(): void {}
  debug(): void {}
  verbose(): void {}
}

/** A diagnostic with its arguments, one line (an error as its message, not its stack). */
function describe(message: string, args: unknown[]): string {
  const parts = args.map((a) => a instanceof Error ? a.message : String(a));
  return [message, ...parts].join(" ");
}

/** What the consumer learnt of a claimed job: its claim's span, its producer's context. */
interface JobTrace {
  claim?: SpanContext;
  producer?: SpanContext;
}

/** Messaging attributes shared by a job's spans. */
function jobAttributes(job: Job): Record<string, string | number> {
  return {
    "messaging.system": "shoal",
    "messaging.destination.name": job.queue,
    "messaging.message.id": job.id,
    "shoal.job.id": job.id,
    "shoal.job.attempt": job.attempts,
    "shoal.task": job.task,
  };
}

class OtelRunSpan implements RunSpan {
  readonly traceparent: string;
  readonly #ctx: Context;

  constructor(
    private readonly tracer: ReturnType<typeof trace.getTracer>,
    private readonly job: Job,
    private readonly span: Span,
  ) {
    this.traceparent = traceparentOf(span.spanContext());
    this.#ctx = trace.setSpan(ROOT_CONTEXT, span);
  }

  within<T>(fn: () => T): T {
    return context.with(this.#ctx, fn);
  }

  fanOut(children: number): FanOutSpan {
    const span = this.tracer.startSpan(`fan-out ${this.job.task}`, {
      kind: SpanKind.PRODUCER,
      attributes: {
        ...jobAttributes(this.job),
        "messaging.operation.type": "send",
        "messaging.operation.name": "fan-out",
        "messaging.batch.message_count": children,
      },
    }, this.#ctx);
    return {
      traceparent: traceparentOf(span.spanContext()),
      end(error?: string) {
        if (error !== undefined) span.setStatus({ code: SpanStatusCode.ERROR, message: error });
        span.end();
      },
    };
  }

  step(name: string): ChildSpan {
    return this.#child(`step ${name}`, "shoal.step.outcome", {
      ...jobAttributes(this.job),
      "shoal.step.name": name,
    });
  }

  replayed(name: string): void {
    this.tracer.startSpan(`step ${name}`, {
      kind: SpanKind.INTERNAL,
      attributes: {
        ...jobAttributes(this.job),
        "shoal.step.name": name,
        "shoal.step.outcome": "replayed",
      },
    }, this.#ctx).end();
  }

  transaction(): ChildSpan {
    return this.#child(
      `transaction ${this.job.task}`,
      "shoal.transaction.outcome",
      jobAttributes(this.job),
    );
  }

  slept(name: string, wakeAt: Date, outcome: "suspended" | "woke"): void {
    this.span.addEvent("shoal.sleep", {
      "shoal.step.name": name,
      "shoal.sleep.wake_at": wakeAt.toISOString(),
      "shoal.sleep.outcome": outcome,
    });
  }

  /** A child span of this run, ended with its outcome as `outcomeKey`. */
  #child(
    name: string,
    outcomeKey: string,
    attributes: Record<string, string | number>,
  ): ChildSpan {
    const span = this.tracer.startSpan(name, { kind: SpanKind.INTERNAL, attributes }, this.#ctx);
    const ctx = trace.setSpan(this.#ctx, span);
    return {
      within: (fn) => context.with(ctx, fn),
      end(outcome: string, error?: string) {
        span.setAttribute(outcomeKey, outcome);
        if (error !== undefined) {
          span.recordException({ name: "Error", message: error });
          span.setStatus({ code: SpanStatusCode.ERROR, message: error });
        }
        span.end();
      },
    };
  }

  end(outcome: string, error?: string): void {
    this.span.setAttribute("shoal.job.outcome", outcome);
    if (error !== undefined) {
      this.span.recordException({ name: "JobFailed", message: error });
      this.span.setStatus({ code: SpanStatusCode.ERROR, message: error });
    }
    this.span.end();
  }
}

/** lib/tracing.ts's Tracer over the OpenTelemetry SDK. */
export class OtelTracer implements Tracer {
  readonly #provider: TracerProvider;
  readonly #contextManager: AsyncLocalStorageContextManager;
  readonly #tracer: ReturnType<typeof trace.getTracer>;
  /** Per claimed job, until its run starts (a WeakMap: a job dropped unrun leaves nothing). */
  readonly #jobs = new WeakMap<Job, JobTrace>();
  /**
   * What shoal registered as the process's globals, and so may unregister at shutdown: an
   * application that set up its own SDK first keeps its tracer provider, context manager
   * and diagnostics logger, before and after shoal's tracing.
   */
  readonly #registered: { provider: boolean; context: boolean; diag: boolean };

  constructor(config: TracingConfig) {
    const exportTimeoutMillis = config.exportTimeoutMs ?? DEFAULT_EXPORT_TIMEOUT_MS;
    const exporter = new OTLPTraceExporter({
      url: config.tracesUrl,
      timeoutMillis: exportTimeoutMillis,
    });
    this.#provider = new TracerProvider({
      resource: resourceFromAttributes({ "service.name": config.serviceName }),
      spanProcessors: [
        new BatchSpanProcessor({
          exporter,
          maxQueueSize: config.maxQueueSize ?? DEFAULT_MAX_QUEUE_SIZE,
          maxExportBatchSize: config.maxExportBatchSize ?? DEFAULT_MAX_EXPORT_BATCH_SIZE,
          scheduledDelayMillis: config.scheduleDelayMs ?? DEFAULT_SCHEDULE_DELAY_MS,
          exportTimeoutMillis,
        }),
      ],
    });
    this.#contextManager = new AsyncLocalStorageContextManager();
    // Each registration succeeds only when nothing registered one before (an application's
    // own SDK wins; shoal's spans still go through shoal's provider). The diagnostics
    // logger has no such guard (setting it replaces the application's), so shoal sets it
    // only when the tracer provider is its own: an application with its own SDK keeps its
    // logger.
    const provider = trace.setGlobalTracerProvider(this.#provider);
    const active = context.setGlobalContextManager(this.#contextManager);
    if (active) this.#contextManager.enable();
    const diagnostics = provider && diag.setLogger(new DiagToLog(), DiagLogLevel.WARN);
    this.#registered = { provider, context: active, diag: diagnostics };
    if (!provider) {
      logger("tracing").info(
        "An OpenTelemetry tracer provider was registered before shoal's: it stays the global one, shoal exports its own spans",
      );
    }
    this.#tracer = this.#provider.getTracer(SCOPE);
    logger("tracing").info("Tracing on: exporting spans of {service} to {endpoint}", {
      service: config.serviceName,
      endpoint: shownEndpoint(config.tracesUrl),
    });
  }

  activeTraceparent(): string | null {
    const ctx = trace.getSpanContext(context.active());
    return ctx !== undefined && trace.isSpanContextValid(ctx) ? traceparentOf(ctx) : null;
  }

  remember(job: Job, traceparent: string): void {
    const producer = spanContextOf(traceparent);
    if (producer === null) return;
    const known = this.#jobs.get(job);
    if (known) known.producer = producer;
    else this.#jobs.set(job, { producer });
  }

  claimed(queues: readonly string[], startedAt: number, jobs: readonly Job[]): void {
    if (jobs.length === 0) return;
    const span = this.#tracer.startSpan(`claim ${queues.join(",")}`, {
      kind: SpanKind.CONSUMER,
      startTime: startedAt,
      root: true,
      attributes: {
        "messaging.system": "shoal",
        "messaging.operation.type": "receive",
        "messaging.operation.name": "claim",
        "messaging.batch.message_count": jobs.length,
        "shoal.queues": [...queues],
        ...(queues.length === 1 ? { "messaging.destination.name": queues[0]! } : {}),
      },
    }, ROOT_CONTEXT);
    span.end();
    const claim = span.spanContext();
    for (const job of jobs) {
      const known = this.#jobs.get(job);
      if (known) known.claim = claim;
      else this.#jobs.set(job, { claim });
    }
  }

  startRun(job: Job): RunSpan {
    const known = this.#jobs.get(job);
    this.#jobs.delete(job);
    const links: Link[] = known?.producer ? [{ context: known.producer }] : [];
    const parent = known?.claim ? trace.setSpanContext(ROOT_CONTEXT, known.claim) : ROOT_CONTEXT;
    const span = this.#tracer.startSpan(`run ${job.task}`, {
      kind: SpanKind.CONSUMER,
      links,
      root: known?.claim === undefined,
      attributes: {
        ...jobAttributes(job),
        "messaging.operation.type": "process",
        "messaging.operation.name": "run",
      },
    }, parent);
    return new OtelRunSpan(this.#tracer, job, span);
  }

  async shutdown(): Promise<void> {
    try {
      await this.#provider.shutdown();
    } catch (error) {
      logger("tracing").error("Cannot export the last spans: {error}", {
        error: describeError(error),
      });
    } finally {
      // Only what shoal registered: never an application's own SDK or logger.
      if (this.#registered.context) {
        this.#contextManager.disable();
        context.disable();
      }
      if (this.#registered.provider) trace.disable();
      if (this.#registered.diag) diag.disable();
    }
  }
}
