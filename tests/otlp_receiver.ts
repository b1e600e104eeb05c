/**
 * Test support for traces: an OTLP/HTTP receiver on a loopback port that accepts
 * `POST /v1/traces` with a JSON body (what @opentelemetry/exporter-trace-otlp-http sends),
 * decodes every span, and keeps the raw bodies (to check what was never exported).
 */

/** One span as OTLP/HTTP JSON carries it, with its resource's service name. */
export interface ReceivedSpan {
  service: string;
  traceId: string;
  spanId: string;
  parentSpanId: string;
  name: string;
  attributes: Record<string, unknown>;
  links: { traceId: string; spanId: string }[];
  status: { code?: number; message?: string };
  events: { name: string; attributes: Record<string, unknown> }[];
}

/** OTLP's attribute list as an object ({key, value: {stringValue | intValue | ...}}). */
function attributesOf(list: unknown): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const { key, value } of (list ?? []) as { key: string; value: Record<string, unknown> }[]) {
    const v = value.stringValue ?? value.intValue ?? value.boolValue ?? value.doubleValue ??
      (value.arrayValue as { values?: { stringValue?: string }[] } | undefined)?.values?.map((
        x,
      ) => x.stringValue);
    out[key] = typeof v === "string" && key.endsWith(".attempt") ? Number(v) : v;
  }
  return out;
}

/**
 * An OTLP/HTTP receiver on a loopback port: accepts POST /v1/traces with a JSON body (what
 * @opentelemetry/exporter-trace-otlp-http sends), keeps each raw body and every span.
 */
export class OtlpReceiver {
  readonly spans: ReceivedSpan[] = [];
  readonly bodies: string[] = [];
  readonly refused: string[] = [];
  readonly #server: Deno.HttpServer<Deno.NetAddr>;

  constructor() {
    this.#server = Deno.serve(
      { hostname: "127.0.0.1", port: 0, onListen: () => {} },
      (request) => this.#handle(request),
    );
  }

  get base(): string {
    return `http://127.0.0.1:${this.#server.addr.port}`;
  }

  async #handle(request: Request): Promise<Response> {
    const url = new URL(request.url);
    const type = request.headers.get("content-type") ?? "";
    if (request.method !== "POST" || url.pathname !== "/v1/traces") {
      this.refused.push(`${request.method} ${url.pathname}`);
      await request.body?.cancel();
      return new Response("not found", { status: 404 });
    }
    if (!type.startsWith("application/json")) {
      this.refused.push(`content-type ${type}`);
      await request.body?.cancel();
      return new Response("JSON only", { status: 415 });
    }
    const body = await request.text();
    this.bodies.push(body);
    const decoded = JSON.parse(body) as { resourceSpans?: unknown[] };
    for (const rs of (decoded.resourceSpans ?? []) as Record<string, unknown>[]) {
      const resource = attributesOf((rs.resource as { attributes?: unknown })?.attributes);
      for (const ss of (rs.scopeSpans ?? []) as { spans?: Record<string, unknown>[] }[]) {
        for (const s of ss.spans ?? []) {
          this.spans.push({
            service: String(resource["service.name"]),
            traceId: s.traceId as string,
            spanId: s.spanId as string,
            parentSpanId: (s.parentSpanId as string | undefined) ?? "",
            name: s.name as string,
            attributes: attributesOf(s.attributes),
            links: ((s.links ?? []) as { traceId: string; spanId: string }[]).map((l) => ({
              traceId: l.traceId,
              spanId: l.spanId,
            })),
            status: (s.status ?? {}) as ReceivedSpan["status"],
            events: ((s.events ?? []) as { name: string; attributes?: unknown }[]).map((e) => ({
              name: e.name,
              attributes: attributesOf(e.attributes),
            })),
          });
        }
      }
    }
    return Response.json({});
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.#server.shutdown();
  }
}
