/**
 * OpenTelemetry traces (issue 16, lib/tracing.ts): the traceparent check, the OTEL_*
 * settings, the traceparent stored by every enqueue path and carried through dead letters,
 * and, end to end, a real `main.ts` consumer exporting its spans over OTLP/HTTP to a
 * receiver started here, which decodes them and checks their attributes and links.
 */
import {
  context,
  createContextKey,
  diag,
  type DiagLogger,
  DiagLogLevel,
  ProxyTracerProvider,
  ROOT_CONTEXT,
  type Span,
  trace,
} from "@opentelemetry/api";
import { AsyncLocalStorageContextManager } from "@opentelemetry/context-async-hooks";
import { TracerProvider } from "@opentelemetry/sdk-trace";
import postgres from "postgres";
import type { Sql } from "../lib/db.ts";
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { exitWithin, runShoal, spawnShoal, startConsumer, testDb, waitFor } from "./helpers.ts";
import { defineTask, TaskRegistry } from "../lib/tasks.ts";
import { OtlpReceiver, type ReceivedSpan } from "./otlp_receiver.ts";
import { enqueue, enqueueMany, fail } from "../lib/queue.ts";
import { retryDead } from "../lib/dead.ts";
import { claim } from "../lib/queue.ts";
import { startExecution } from "../lib/execution.ts";
import { claimOnce } from "../lib/consumer.ts";
import { Completer } from "../lib/completer.ts";
import { logger } from "../lib/log.ts";
import { JobRun } from "../lib/run_job.ts";
import {
  isTraceparent,
  startTracing,
  stopTracing,
  TRACEPARENT_EXPECTED,
  tracer,
  TracingConfigError,
  tracingFromEnv,
} from "../lib/tracing.ts";

const TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/** An environment of these variables only. */
const env = (vars: Record<string, string>) => ({ get: (name: string) => vars[name] });

Deno.test("isTraceparent() accepts the W3C version 00 form and nothing else", () => {
  assert(isTraceparent(TP));
  assert(isTraceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"));
  for (
    const bad of [
      "",
      "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", // a version shoal does not store
      "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01", // upper case
      "00-00000000000000000000000000000000-b7ad6b7169203331-01", // zero trace id
      "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01", // zero span id
      "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01", // short span id
      `${TP}-extra`,
      ` ${TP}`,
      null,
      42,
    ]
  ) assert(!isTraceparent(bad), `accepted ${JSON.stringify(bad)}`);
});

Deno.test("tracingFromEnv() is off unless an endpoint is set, and off when told to be", () => {
  assertEquals(tracingFromEnv(env({})), null);
  assertEquals(tracingFromEnv(env({ OTEL_SERVICE_NAME: "api" })), null);
  const endpoint = { OTEL_EXPORTER_OTLP_ENDPOINT: "http://collector:4318" };
  assertEquals(tracingFromEnv(env({ ...endpoint, OTEL_SDK_DISABLED: "true" })), null);
  assertEquals(tracingFromEnv(env({ ...endpoint, OTEL_SDK_DISABLED: "TRUE" })), null);
  assertEquals(tracingFromEnv(env({ ...endpoint, OTEL_TRACES_EXPORTER: "none" })), null);
  assertEquals(tracingFromEnv(env({ ...endpoint, OTEL_SDK_DISABLED: "false" })), {
    tracesUrl: "http://collector:4318/v1/traces",
    serviceName: "shoal",
  });
});

Deno.test("tracingFromEnv() reads the endpoints and service name as the specification says", () => {
  assertEquals(tracingFromEnv(env({ OTEL_EXPORTER_OTLP_ENDPOINT: "https://c.example/otlp/" })), {
    tracesUrl: "https://c.example/otlp/v1/traces",
    serviceName: "shoal",
  });
  // The traces endpoint is used as given, and wins over the general one.
  assertEquals(
    tracingFromEnv(env({
      OTEL_EXPORTER_OTLP_ENDPOINT: "http://general:4318",
      OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: "http://traces:4318/custom",
      OTEL_SERVICE_NAME: "billing-worker",
      OTEL_TRACES_EXPORTER: "otlp",
      OTEL_EXPORTER_OTLP_PROTOCOL: "http/json",
    })),
    { tracesUrl: "http://traces:4318/custom", serviceName: "billing-worker" },
  );
});

Deno.test("tracingFromEnv() refuses a value that cannot work in one line naming the variable", () => {
  const cases: [Record<string, string>, string][] = [
    [{ OTEL_EXPORTER_OTLP_ENDPOINT: "collector:4318" }, "Invalid OTEL_EXPORTER_OTLP_ENDPOINT"],
    [{ OTEL_EXPORTER_OTLP_ENDPOINT: "not a url" }, "Invalid OTEL_EXPORTER_OTLP_ENDPOINT"],
    [{ OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: "ftp://c/x" }, "not a ftp: URL"],
    [{ OTEL_SDK_DISABLED: "yes" }, "Invalid OTEL_SDK_DISABLED: expected true or false"],
    [{ OTEL_TRACES_EXPORTER: "zipkin" }, "Invalid OTEL_TRACES_EXPORTER"],
    [
      { OTEL_EXPORTER_OTLP_ENDPOINT: "http://c:4318", OTEL_EXPORTER_OTLP_PROTOCOL: "grpc" },
      "http/json only",
    ],
    [{ OTEL_EXPORTER_OTLP_ENDPOINT: "http://c:4318", OTEL_SERVICE_NAME: " " }, "OTEL_SERVICE_NAME"],
  ];
  for (const [vars, message] of cases) {
    let caught: unknown;
    try {
      tracingFromEnv(env(vars));
    } catch (error) {
      caught = error;
    }
    if (!(caught instanceof TracingConfigError)) {
      throw new Error(`${JSON.stringify(vars)} was not refused with a TracingConfigError`, {
        cause: caught,
      });
    }
    assert(caught.message.includes(message), caught.message);
    assert(!caught.message.includes("\n"), caught.message);
  }
});

Deno.test("tracingFromEnv() reads OTEL_BSP_* and refuses a value out of range", () => {
  const endpoint = { OTEL_EXPORTER_OTLP_ENDPOINT: "http://c:4318" };
  assertEquals(
    tracingFromEnv(env({
      ...endpoint,
      OTEL_BSP_SCHEDULE_DELAY: "60000",
      OTEL_BSP_MAX_QUEUE_SIZE: "4096",
      OTEL_BSP_MAX_EXPORT_BATCH_SIZE: " 128 ",
      OTEL_BSP_EXPORT_TIMEOUT: "2500",
    })),
    {
      tracesUrl: "http://c:4318/v1/traces",
      serviceName: "shoal",
      scheduleDelayMs: 60_000,
      maxQueueSize: 4096,
      maxExportBatchSize: 128,
      exportTimeoutMs: 2500,
    },
  );
  const cases: [Record<string, string>, string][] = [
    [{ OTEL_BSP_SCHEDULE_DELAY: "1s" }, "Invalid OTEL_BSP_SCHEDULE_DELAY: expected an integer"],
    [{ OTEL_BSP_SCHEDULE_DELAY: "-1" }, "Invalid OTEL_BSP_SCHEDULE_DELAY"],
    [{ OTEL_BSP_MAX_QUEUE_SIZE: "0" }, "Invalid OTEL_BSP_MAX_QUEUE_SIZE: expected an integer"],
    [{ OTEL_BSP_EXPORT_TIMEOUT: "99999999999" }, "Invalid OTEL_BSP_EXPORT_TIMEOUT"],
    [{ OTEL_BSP_MAX_EXPORT_BATCH_SIZE: "1.5" }, "Invalid OTEL_BSP_MAX_EXPORT_BATCH_SIZE"],
    [
      { OTEL_BSP_MAX_QUEUE_SIZE: "100", OTEL_BSP_MAX_EXPORT_BATCH_SIZE: "200" },
      "Invalid OTEL_BSP_MAX_EXPORT_BATCH_SIZE: expected at most OTEL_BSP_MAX_QUEUE_SIZE (100)",
    ],
  ];
  for (const [vars, message] of cases) {
    let caught: unknown;
    try {
      tracingFromEnv(env({ ...endpoint, ...vars }));
    } catch (error) {
      caught = error;
    }
    if (!(caught instanceof TracingConfigError)) {
      throw new Error(`${JSON.stringify(vars)} was not refused with a TracingConfigError`, {
        cause: caught,
      });
    }
    assert(caught.message.includes(message), caught.message);
  }
});

Deno.test({
  name:
    "startTracing() leaves an application's own provider, context manager and logger registered",
  // startTracing() loads the exporter, whose keep-alive socket outlives stopTracing().
  sanitizeResources: false,
  async fn() {
    await using receiver = new OtlpReceiver();
    const appProvider = new TracerProvider();
    const appContext = new AsyncLocalStorageContextManager().enable();
    const warnings: string[] = [];
    const appLogger: DiagLogger = {
      error: (m) => warnings.push(m),
      warn: (m) => warnings.push(m),
      info: () => {},
      debug: () => {},
      verbose: () => {},
    };
    assert(trace.setGlobalTracerProvider(appProvider));
    assert(context.setGlobalContextManager(appContext));
    assert(diag.setLogger(appLogger, DiagLogLevel.WARN));
    try {
      await startTracing({ tracesUrl: `${receiver.base}/v1/traces`, serviceName: "beside" });
      await stopTracing();
      const global = trace.getTracerProvider();
      assert(global instanceof ProxyTracerProvider && global.getDelegate() === appProvider);
      const key = createContextKey("app");
      const seen = context.with(
        ROOT_CONTEXT.setValue(key, 1),
        () => context.active().getValue(key),
      );
      assertEquals(seen, 1, "the application's context manager was torn down");
      diag.warn("still the application's");
      assert(warnings.includes("still the application's"), "the application's logger was replaced");
    } finally {
      trace.disable();
      context.disable();
      appContext.disable();
      diag.disable();
      await appProvider.shutdown();
    }
  },
});

Deno.test("--role consumer with a bad OTEL endpoint exits 2 with one line", async () => {
  await using db = await testDb();
  const { code, stderr } = await runShoal(["--role", "consumer"], {
    url: db.url,
    env: { OTEL_EXPORTER_OTLP_ENDPOINT: "collector:4318" },
  });
  assertEquals(code, 2);
  const lines = stderr.trim().split("\n");
  assertEquals(lines.length, 1, stderr);
  assert(lines[0]!.includes("Invalid OTEL_EXPORTER_OTLP_ENDPOINT"), stderr);
});

Deno.test("shoal dev with a bad OTEL value exits 2 with one line, before starting anything", async () => {
  const dir = await Deno.makeTempDir({ prefix: "shoal_dev_otel_" });
  try {
    const { code, stderr } = await runShoal(["dev", "--dir", dir], {
      env: { OTEL_EXPORTER_OTLP_ENDPOINT: "http://c:4318", OTEL_TRACES_EXPORTER: "jaeger" },
    });
    assertEquals(code, 2);
    assertEquals(stderr.trim().split("\n").length, 1, stderr);
    assert(
      stderr.includes("Invalid OTEL_TRACES_EXPORTER: expected otlp or none, not jaeger"),
      stderr,
    );
    // Nothing was started in the directory: no Postgres cluster.
    const entries: string[] = [];
    for await (const entry of Deno.readDir(dir)) entries.push(entry.name);
    assertEquals(entries, []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("enqueue() and enqueueMany() store a traceparent option, and refuse a malformed one", async () => {
  await using db = await testDb();
  const one = await enqueue(db.sql, "t", {}, { traceparent: TP });
  const plain = await enqueue(db.sql, "t", {});
  const many = await enqueueMany(db.sql, [
    { task: "t" },
    { task: "t", traceparent: TP.replace("-01", "-00") },
  ]);
  const rows = await db.sql<{ id: string; traceparent: string | null }[]>`
    select id, traceparent from shoal.jobs order by id`;
  assertEquals([...rows], [
    { id: one, traceparent: TP },
    { id: plain, traceparent: null },
    { id: many[0]!.id, traceparent: null },
    { id: many[1]!.id, traceparent: TP.replace("-01", "-00") },
  ]);
  await assertRejects(
    () => enqueue(db.sql, "t", {}, { traceparent: "00-abc" }),
    TypeError,
    "Invalid options.traceparent for enqueue(): expected a W3C traceparent",
  );
  await assertRejects(
    () => enqueueMany(db.sql, [{ task: "t" }, { task: "t", traceparent: TP.toUpperCase() }]),
    TypeError,
    "Invalid jobs[1].traceparent for enqueueMany()",
  );
});

Deno.test("shoal.enqueue and shoal.enqueue_many store a traceparent from SQL, checked", async () => {
  await using db = await testDb();
  const [row] = await db.sql<{ id: string }[]>`
    select shoal.enqueue(task => 't', traceparent => ${TP}) as id`;
  const many = await db.sql<{ id: string }[]>`
    select id from shoal.enqueue_many(${
    JSON.stringify([{ task: "t", traceparent: TP }, { task: "t", traceparent: null }])
  }::text::jsonb) order by ord`;
  const stored = await db.sql<{ traceparent: string | null }[]>`
    select traceparent from shoal.jobs where id = any(${[
    row!.id,
    ...many.map((m) => m.id),
  ]}::bigint[])
    order by id`;
  assertEquals(stored.map((s) => s.traceparent), [TP, TP, null]);
  await assertRejects(
    () => db.sql`select shoal.enqueue(task => 't', traceparent => 'garbage')`,
    Error,
    "Cannot enqueue job 1: traceparent must be a W3C traceparent",
  );
  await assertRejects(
    () =>
      db.sql`select * from shoal.enqueue_many('[{"task": "t"}, {"task": "t", "traceparent": 7}]')`,
    Error,
    "Cannot enqueue job 2: traceparent must be a string",
  );
});

Deno.test("a job's traceparent moves to the dead letters and back on retry", async () => {
  await using db = await testDb();
  const id = await enqueue(db.sql, "t", {}, { traceparent: TP, maxAttempts: 1 });
  const { jobs } = await claim(db.sql, {
    queues: ["default"],
    limit: 1,
    workerId: "w",
    visibilityMs: 30_000,
  });
  assertEquals(await fail(db.sql, jobs[0]!, { error: "boom", retryInMs: 0 }), "dead");
  const [dead] = await db.sql`select traceparent from shoal.dead_jobs where id = ${id}::bigint`;
  assertEquals(dead!.traceparent, TP);
  assertEquals(await retryDead(db.sql, id), "retried");
  const [live] = await db.sql`select traceparent from shoal.jobs where id = ${id}::bigint`;
  assertEquals(live!.traceparent, TP);
});

Deno.test("a job with a traceparent dead-lettered at claim (a crash loop) keeps it", async () => {
  await using db = await testDb();
  const id = await enqueue(db.sql, "t", {}, { traceparent: TP, maxAttempts: 1 });
  const options = { queues: ["default"], limit: 1, workerId: "w", visibilityMs: 30_000 };
  assertEquals((await claim(db.sql, options)).jobs.length, 1);
  // Its worker died: the claim's deadline passes without an ack.
  await db.sql`update shoal.jobs set run_at = now() - interval '1 second' where id = ${id}`;
  const again = await claim(db.sql, options);
  assertEquals(again.poisoned.map((p) => p.id), [id]);
  const [dead] = await db.sql`select traceparent from shoal.dead_jobs where id = ${id}::bigint`;
  assertEquals(dead!.traceparent, TP);
});

Deno.test("a retried job keeps its traceparent, and a dedupe key's holder keeps its own", async () => {
  await using db = await testDb();
  const other = "00-1af7651916cd43dd8448eb211c80319c-c7ad6b7169203331-01";
  const id = await enqueue(db.sql, "t", {}, { traceparent: TP, maxAttempts: 3, key: "k" });
  assertEquals(await enqueue(db.sql, "t", {}, { traceparent: other, key: "k" }), id);
  const [fromSql] = await db.sql<{ id: string }[]>`
    select id from shoal.enqueue_many(${
    JSON.stringify([{ task: "t", key: "k", traceparent: other }])
  }::text::jsonb)`;
  assertEquals(fromSql!.id, id);
  const { jobs } = await claim(db.sql, {
    queues: ["default"],
    limit: 1,
    workerId: "w",
    visibilityMs: 30_000,
  });
  assertEquals(await fail(db.sql, jobs[0]!, { error: "boom", retryInMs: 0 }), "retried");
  const [row] = await db.sql`select traceparent, attempts from shoal.jobs where id = ${id}::bigint`;
  assertEquals([row!.traceparent, row!.attempts], [TP, 1]);
});

Deno.test("SQL refuses a traceparent with an all-zero trace or span id, in the words TypeScript uses", async () => {
  await using db = await testDb();
  const zeroTrace = `00-${"0".repeat(32)}-b7ad6b7169203331-01`;
  const zeroSpan = `00-0af7651916cd43dd8448eb211c80319c-${"0".repeat(16)}-01`;
  for (const bad of [zeroTrace, zeroSpan]) {
    await assertRejects(
      () => db.sql`select shoal.enqueue(task => 't', traceparent => ${bad})`,
      Error,
      `Cannot enqueue job 1: traceparent must be ${TRACEPARENT_EXPECTED}`,
    );
    await assertRejects(
      () =>
        db.sql`select * from shoal.enqueue_many(${
          JSON.stringify([{ task: "t" }, { task: "t", traceparent: bad }])
        }::text::jsonb)`,
      Error,
      `Cannot enqueue job 2: traceparent must be ${TRACEPARENT_EXPECTED}`,
    );
  }
  assertEquals((await db.sql`select 1 from shoal.jobs`).length, 0);
  // The table itself only checks the length (a regular expression on every update of a job
  // would cost each claim and heartbeat): the format is checked where a traceparent enters.
  const [constraint] = await db.sql<{ def: string }[]>`
    select pg_get_constraintdef(oid) as def from pg_constraint
    where conrelid = 'shoal.jobs'::regclass and conname like 'jobs_traceparent%'`;
  assertEquals(constraint!.def, "CHECK ((octet_length(traceparent) = 55)) NOT VALID");
  await assertRejects(
    () => db.sql`insert into shoal.jobs (queue, task, traceparent) values ('q', 't', '00-short')`,
    Error,
    "jobs_traceparent_shape",
  );
});

Deno.test("shoal.fan_out refuses a bad traceparent before changing anything", async () => {
  await using db = await testDb();
  const id = await enqueue(db.sql, "t");
  const { jobs } = await claim(db.sql, {
    queues: ["default"],
    limit: 1,
    workerId: "w",
    visibilityMs: 30_000,
  });
  const spec = (traceparent: unknown) =>
    JSON.stringify({ children: [{ task: "c" }], callback: { task: "cb" }, traceparent });
  await assertRejects(
    () =>
      db.sql`select shoal.fan_out(${id}::bigint, ${jobs[0]!.token}::bigint, ${
        spec(TP.toUpperCase())
      }::text::jsonb)`,
    Error,
    `Cannot fan out: traceparent must be ${TRACEPARENT_EXPECTED}`,
  );
  await assertRejects(
    () =>
      db.sql`select shoal.fan_out(${id}::bigint, ${jobs[0]!.token}::bigint, ${
        spec(7)
      }::text::jsonb)`,
    Error,
    "Cannot fan out: traceparent must be a string",
  );
  const live = await db.sql`select id from shoal.jobs`;
  assertEquals(live.map((r) => r.id), [id]);
});

Deno.test("startExecution() and shoal.start_execution store the first job's traceparent", async () => {
  await using db = await testDb();
  const fromTs = await startExecution(db.sql, { task: "t", traceparent: TP });
  const [fromSql] = await db.sql<{ id: string }[]>`
    select shoal.start_execution(task => 't', traceparent => ${TP}) as id`;
  // The call forms from before the argument still resolve (no ambiguous overload).
  const [positional] = await db.sql<{ id: string }[]>`
    select shoal.start_execution('default', 't', '{}') as id`;
  const rows = await db.sql<{ execution_id: string; traceparent: string | null }[]>`
    select execution_id, traceparent from shoal.jobs order by id`;
  assertEquals([...rows], [
    { execution_id: fromTs, traceparent: TP },
    { execution_id: fromSql!.id, traceparent: TP },
    { execution_id: positional!.id, traceparent: null },
  ]);
  await assertRejects(
    () => db.sql`select shoal.start_execution(task => 't', traceparent => 'nope')`,
    Error,
    `Cannot enqueue job 1: traceparent must be ${TRACEPARENT_EXPECTED}`,
  );
  await assertRejects(
    () => startExecution(db.sql, { task: "t", traceparent: "nope" }),
    TypeError,
    `expected ${TRACEPARENT_EXPECTED}`,
  );
});

Deno.test({
  name:
    "enqueueMany() reads the active span once per call; untraced, its statements name no traceparent",
  // startTracing() loads the exporter, whose keep-alive socket outlives stopTracing().
  sanitizeResources: false,
  async fn() {
    await using db = await testDb();
    await using receiver = new OtlpReceiver();
    const sent: string[] = [];
    const sql = postgres(db.url, {
      max: 1,
      onnotice: () => {},
      debug: (_connection, query) => sent.push(query),
    }) as unknown as Sql;
    try {
      // Tracing off: the statements are the ones shoal always sent.
      await enqueue(sql, "t", {});
      await enqueueMany(sql, [{ task: "t" }, { task: "t", key: "k" }]);
      const inserts = sent.filter((q) => q.includes("shoal.insert_job"));
      assertEquals(inserts.length, 2, sent.join("\n"));
      assert(inserts[0]!.includes("shoal.insert_job("), inserts[0]);
      assert(inserts[1]!.includes("shoal.insert_jobs("), inserts[1]);
      for (const q of sent) assert(!q.includes("traceparent"), q);

      const traced = await startTracing({
        tracesUrl: `${receiver.base}/v1/traces`,
        serviceName: "producer",
      });
      try {
        let reads = 0;
        const read = traced.activeTraceparent.bind(traced);
        traced.activeTraceparent = () => {
          reads++;
          return read();
        };
        const jobs = Array.from({ length: 50 }, () => ({ task: "t" }));
        await trace.getTracer("tracing_test").startActiveSpan("batch", async (span) => {
          try {
            await enqueueMany(sql, jobs);
          } finally {
            span.end();
          }
        });
        assertEquals(reads, 1);
        const stored = await db.sql`select distinct traceparent from shoal.jobs where key is null`;
        assertEquals(stored.length, 2, "the untraced job and the batch's one traceparent");
      } finally {
        await stopTracing();
      }
    } finally {
      await sql.end({ timeout: 5 });
    }
  },
});

Deno.test({
  name: "a traced fan-out whose claim was lost ends its run span as lost, not completed",
  // startTracing() loads the exporter, whose keep-alive socket outlives stopTracing().
  sanitizeResources: false,
  async fn() {
    await using db = await testDb();
    await using receiver = new OtlpReceiver();
    const fan = defineTask({
      name: "trace.fan",
      handler: (_, ctx) => ctx.fanOut({ children: [{ task: "t" }], callback: { task: "t" } }),
    });
    await startTracing({ tracesUrl: `${receiver.base}/v1/traces`, serviceName: "lost" });
    try {
      await startExecution(db.sql, { task: "trace.fan" });
      const { jobs } = await claim(db.sql, {
        queues: ["default"],
        limit: 1,
        workerId: "w",
        visibilityMs: 60_000,
      });
      const run = new JobRun(jobs[0]!, {
        sql: db.sql,
        tasks: new TaskRegistry([fan]),
        log: logger("consumer"),
        taskTimeoutMs: 10_000,
      });
      await run.settled;
      assertEquals(run.state, "fan-out");
      // Redelivered elsewhere meanwhile: the claim's token moved on.
      await db.sql`update shoal.jobs set token = token + 1 where id = ${jobs[0]!.id}::bigint`;
      await new Completer(db.sql).record(run);
      const [row] = await db.sql`select count(*)::int as n from shoal.jobs`;
      assertEquals(row!.n, 1, "nothing was fanned out");
    } finally {
      await stopTracing();
    }
    const runs = receiver.spans.filter((s) => s.name === "run trace.fan");
    assertEquals(runs.map((s) => s.attributes["shoal.job.outcome"]), ["lost"]);
  },
});

Deno.test({
  name:
    "claimOnce() traced waits at most TRACE_READ_TIMEOUT_MS for traceparents, then runs unlinked",
  // startTracing() loads the exporter, whose keep-alive socket outlives stopTracing().
  sanitizeResources: false,
  async fn() {
    await using db = await testDb();
    await using receiver = new OtlpReceiver();
    const id = await enqueue(db.sql, "t", {}, { traceparent: TP });
    // The claim waits at a gate (a test-only trigger on a shared advisory lock); while it
    // holds its lock on shoal.jobs, a table lock queues behind it, so the read that follows
    // the claim waits on that lock for as long as the test holds it.
    await db.sql`create function public.gate_claim() returns trigger language plpgsql
      as $$ begin perform pg_advisory_xact_lock_shared(4343); return new; end $$`;
    await db.sql`create trigger gate_claim before update on shoal.jobs
      for each row execute function public.gate_claim()`;
    const gate = await db.sql.reserve();
    await gate`select pg_advisory_lock(4343)`;
    let unblock = () => {};
    const held = new Promise<void>((resolve) => unblock = resolve);
    let locked = () => {};
    const isLocked = new Promise<void>((resolve) => locked = resolve);
    let blocking: Promise<unknown> = Promise.resolve();
    await startTracing({ tracesUrl: `${receiver.base}/v1/traces`, serviceName: "slow-read" });
    try {
      const claiming = claimOnce(db.sql, {
        queues: ["default"],
        limit: 1,
        workerId: "w",
        visibilityMs: 60_000,
      });
      await waitFor(
        "the claim to wait at the gate",
        async () =>
          (await db.sql`select 1 from pg_locks where locktype = 'advisory' and not granted
            and database = (select oid from pg_database where datname = current_database())`)
            .length > 0,
      );
      blocking = db.sql.begin(async (tx) => {
        await tx`lock table shoal.jobs in access exclusive mode`;
        locked();
        await held;
      });
      await waitFor(
        "the table lock to queue behind the claim",
        async () =>
          (await db.sql`select 1 from pg_locks
          where relation = 'shoal.jobs'::regclass and mode = 'AccessExclusiveLock'
            and database = (select oid from pg_database where datname = current_database())`)
            .length > 0,
      );
      await gate`select pg_advisory_unlock(4343)`;
      await isLocked; // the claim committed; the read now waits on the table lock
      const since = performance.now();
      const { jobs } = await claiming;
      const waited = performance.now() - since;
      assertEquals(jobs.map((j) => j.id), [id]);
      assert(waited < 5_000, `the claim waited ${Math.round(waited)} ms for its traceparents`);
      tracer()!.startRun(jobs[0]!).end("completed");
    } finally {
      unblock();
      await blocking;
      gate.release();
      await stopTracing();
    }
    const spans = receiver.spans.filter((s) => s.service === "slow-read");
    assertEquals(spans.filter((s) => s.name === "claim default").length, 1);
    const runs = spans.filter((s) => s.name === "run t");
    assertEquals(runs.map((s) => s.links), [[]], "the run started unlinked");
  },
});

/** In every payload of the end-to-end test: it must never reach the exported spans. */
const MARKER = "PAYLOAD-MARKER-7d1c";

Deno.test({
  name: "a main.ts consumer exports run, claim and fan-out spans linked to the producer's span",
  // The exporter's HTTP client (node:http under Deno) keeps its keep-alive socket past
  // stopTracing(); the receiver and every process are closed by the test itself.
  sanitizeResources: false,
  async fn() {
    await using db = await testDb();
    await using receiver = new OtlpReceiver();

    // The producer: this process, traced, enqueueing under an active span.
    await startTracing({ tracesUrl: `${receiver.base}/v1/traces`, serviceName: "producer" });
    const producer = trace.getTracer("tracing_test");
    const ids: Record<string, string> = {};
    let producerSpan: Span | undefined;
    try {
      await producer.startActiveSpan("checkout", async (span) => {
        producerSpan = span;
        ids.a = await enqueue(db.sql, "shoal.noop", { note: MARKER });
        ids.b = await enqueue(db.sql, "shoal.noop", { note: MARKER });
        ids.fail = await enqueue(db.sql, "shoal.fail", { permanent: true, note: MARKER });
        ids.chord = await enqueue(db.sql, "shoal.chord", {
          children: [
            { task: "shoal.noop", payload: { note: MARKER } },
            { task: "shoal.noop", payload: { note: MARKER } },
          ],
          callback: { task: "shoal.sleep", payload: { ms: 1, note: MARKER } },
        });
        span.end();
      });
      // Outside the span, nothing is active: no traceparent is stored.
      assertEquals(trace.getSpan(context.active()), undefined);
      ids.untraced = await enqueue(db.sql, "shoal.noop", { note: MARKER });
    } finally {
      await stopTracing();
    }
    const p = producerSpan!.spanContext();
    const stored = await db.sql<{ id: string; traceparent: string | null }[]>`
      select id, traceparent from shoal.jobs order by id`;
    assertEquals(stored.map((r) => r.traceparent), [
      ...Array(4).fill(`00-${p.traceId}-${p.spanId}-01`),
      null,
    ]);

    const consumer = spawnShoal(
      ["--role", "consumer", "--poll-interval", "100ms", "--shutdown-grace", "1s"],
      {
        url: db.url,
        env: {
          OTEL_EXPORTER_OTLP_ENDPOINT: receiver.base,
          OTEL_SERVICE_NAME: "shoal-test",
          OTEL_EXPORTER_OTLP_PROTOCOL: "http/json",
          // No scheduled export within the test: the spans arrive only if the shutdown
          // flushes them.
          OTEL_BSP_SCHEDULE_DELAY: "60000",
        },
      },
    );
    await using _consumer = consumer;
    await waitFor("every job to finish", async () => {
      const [row] = await db.sql<{ live: number; dead: number }[]>`
        select (select count(*) from shoal.jobs)::int as live,
          (select count(*) from shoal.dead_jobs)::int as dead`;
      if (consumer.output().includes("shoal: ")) throw new Error(consumer.output());
      return row!.live === 0 && row!.dead === 1;
    }, 30_000);
    assertEquals(
      receiver.spans.filter((s) => s.service === "shoal-test"),
      [],
      "the consumer exported spans before its shutdown",
    );
    consumer.kill("SIGTERM");
    const { code, output } = await exitWithin(consumer, 20_000);
    assertEquals(code, 0, output);
    assert(output.includes("Tracing on"), output);
    // The spans were flushed at shutdown, before exit.
    assertEquals(receiver.refused, []);

    const spans = receiver.spans;
    const checkout = spans.filter((s) => s.name === "checkout");
    assertEquals(checkout.length, 1);
    assertEquals(checkout[0]!.spanId, p.spanId);
    assertEquals(checkout[0]!.service, "producer");

    const ours = spans.filter((s) => s.service === "shoal-test");
    const runs = ours.filter((s) => s.name.startsWith("run "));
    const claims = new Map(
      ours.filter((s) => s.name === "claim default").map((s) => [s.spanId, s]),
    );
    assert(claims.size >= 1, "no claim span");
    for (const c of claims.values()) {
      assertEquals(c.attributes["messaging.system"], "shoal");
      assertEquals(c.attributes["messaging.operation.type"], "receive");
      assertEquals(c.attributes["messaging.destination.name"], "default");
      assert(Number(c.attributes["messaging.batch.message_count"]) >= 1);
    }
    /** The one run span of a job. */
    const runOf = (id: string) => {
      const found = runs.filter((s) => s.attributes["shoal.job.id"] === id);
      assertEquals(found.length, 1, `run spans of job ${id}: ${found.length}`);
      return found[0]!;
    };
    const linkedTo = (span: ReceivedSpan, to: { traceId: string; spanId: string }) =>
      span.links.some((l) => l.traceId === to.traceId && l.spanId === to.spanId);

    for (const key of ["a", "b", "fail", "chord"]) {
      const run = runOf(ids[key]!);
      assert(linkedTo(run, p), `run of ${key} not linked to the producer span`);
      // A child of its claim's span, in the claim's trace: linked, not parented, to the producer.
      assert(claims.has(run.parentSpanId), `run of ${key} is not a child of a claim span`);
      assertEquals(run.traceId, claims.get(run.parentSpanId)!.traceId);
      assertEquals(run.attributes["messaging.system"], "shoal");
      assertEquals(run.attributes["messaging.destination.name"], "default");
      assertEquals(run.attributes["messaging.operation.type"], "process");
      assertEquals(run.attributes["shoal.job.attempt"], 1);
    }
    assertEquals(runOf(ids.a!).attributes["shoal.task"], "shoal.noop");
    assertEquals(runOf(ids.a!).attributes["shoal.job.outcome"], "completed");
    assertEquals(runOf(ids.a!).status.code ?? 0, 0);
    // The untraced job still has its run span, linked to nothing.
    assertEquals(runOf(ids.untraced!).links, []);

    const failed = runOf(ids.fail!);
    assertEquals(failed.status.code, 2, "a failed run's status is ERROR");
    assert(failed.status.message?.includes("shoal.fail was asked to fail"), failed.status.message);
    assertEquals(failed.attributes["shoal.job.outcome"], "dead");
    assert(failed.events.some((e) => e.name === "exception"), "no exception event");

    // The fan-out: a child of the chord's run; its children and its callback link to it.
    const chordRun = runOf(ids.chord!);
    const fanOuts = ours.filter((s) => s.name === "fan-out shoal.chord");
    assertEquals(fanOuts.length, 1);
    const fanOut = fanOuts[0]!;
    assertEquals(fanOut.parentSpanId, chordRun.spanId);
    assertEquals(fanOut.traceId, chordRun.traceId);
    assertEquals(fanOut.attributes["messaging.batch.message_count"], 2);
    const fromFanOut = runs.filter((s) => linkedTo(s, fanOut));
    assertEquals(fromFanOut.map((s) => s.name).sort(), [
      "run shoal.noop",
      "run shoal.noop",
      "run shoal.sleep",
    ]);
    const known = new Set(Object.values(ids));
    for (const s of fromFanOut) assert(!known.has(String(s.attributes["shoal.job.id"])));
    // Eight jobs ran (five enqueued, two children, a callback): one run span each.
    assertEquals(runs.length, 8);

    // No payload anywhere in what was exported.
    assert(receiver.bodies.length > 0);
    for (const body of receiver.bodies) assert(!body.includes(MARKER), "a payload was exported");
  },
});

Deno.test({
  name:
    "a traced handler runs with its span active: its own spans are children, ctx.enqueue links to it",
  // The exporter's HTTP client (node:http under Deno) keeps its keep-alive socket past
  // stopTracing().
  sanitizeResources: false,
  async fn() {
    await using db = await testDb();
    await using receiver = new OtlpReceiver();
    await startTracing({ tracesUrl: `${receiver.base}/v1/traces`, serviceName: "in-process" });
    let followUp = "";
    try {
      const parent = defineTask({
        name: "trace.parent",
        async handler(_payload, ctx) {
          trace.getTracer("handler").startSpan("inside the handler").end();
          followUp = await ctx.enqueue("trace.child", { note: MARKER });
        },
      });
      const child = defineTask({ name: "trace.child", handler: () => {} });
      const id = await enqueue(db.sql, parent, {});
      const consumer = startConsumer(db.sql, [parent, child]);
      try {
        await waitFor("both jobs to run", async () => {
          const [row] = await db.sql`select count(*)::int as n from shoal.jobs`;
          return followUp !== "" && row!.n === 0;
        });
      } finally {
        await consumer.stop();
      }
      await stopTracing(); // flushes every ended span to the receiver
      const all = receiver.spans;
      const run = all.find((s) => s.attributes["shoal.job.id"] === id && s.name.startsWith("run"));
      if (run === undefined) throw new Error("no run span for the parent job");
      const inside = all.find((s) => s.name === "inside the handler");
      assertEquals(inside?.parentSpanId, run.spanId);
      assertEquals(inside?.traceId, run.traceId);
      const childRun = all.find((s) =>
        s.attributes["shoal.job.id"] === followUp && s.name === "run trace.child"
      );
      assertEquals(childRun?.links, [{ traceId: run.traceId, spanId: run.spanId }]);
    } finally {
      await stopTracing();
    }
  },
});

Deno.test({
  name: "a consumer reads traceparents only with tracing on: off, no statement names them",
  // The second half traces: the exporter's keep-alive socket outlives stopTracing().
  sanitizeResources: false,
  async fn() {
    await using db = await testDb();
    await using receiver = new OtlpReceiver();
    const plain = defineTask({ name: "trace.plain", handler: () => {} });
    /** Run one job with a traceparent on a pool that records every statement it sends. */
    const runOne = async (): Promise<string[]> => {
      const sent: string[] = [];
      const sql = postgres(db.url, {
        max: 4,
        idle_timeout: 0,
        types: {},
        onnotice: () => {},
        debug: (_connection, query) => sent.push(query),
      }) as unknown as Sql;
      try {
        await enqueue(db.sql, plain, {}, { traceparent: TP });
        const consumer = startConsumer(sql, [plain]);
        try {
          await waitFor("the job to run", async () => {
            const [row] = await db.sql`select count(*)::int as n from shoal.jobs`;
            return row!.n === 0;
          });
        } finally {
          await consumer.stop();
        }
      } finally {
        await sql.end({ timeout: 5 });
      }
      assert(sent.some((q) => q.includes("shoal.claim_jobs")), "the recorder saw no claim");
      return sent.filter((q) => q.includes("traceparent"));
    };
    assertEquals(await runOne(), []);
    await startTracing({ tracesUrl: `${receiver.base}/v1/traces`, serviceName: "on" });
    try {
      const traced = await runOne();
      assertEquals(traced.length, 1, traced.join("\n"));
    } finally {
      await stopTracing();
    }
  },
});

const WORKFLOW_MAIN = new URL("fixtures/workflow_main.ts", import.meta.url).pathname;

/** A traced `shoal --role consumer` of tests/fixtures/workflow_main.ts, exporting every 100 ms. */
function tracedWorkflowConsumer(url: string, receiver: OtlpReceiver, service: string) {
  return spawnShoal([
    "--role",
    "consumer",
    "--poll-interval",
    "100ms",
    "--visibility-timeout",
    "2s",
    "--shutdown-grace",
    "1s",
  ], {
    url,
    mainModule: WORKFLOW_MAIN,
    env: {
      OTEL_EXPORTER_OTLP_ENDPOINT: receiver.base,
      OTEL_SERVICE_NAME: service,
      OTEL_BSP_SCHEDULE_DELAY: "100",
    },
  });
}

/** The attribute keys a step span carries: nothing else (no result, no payload). */
const STEP_KEYS = [
  "messaging.destination.name",
  "messaging.message.id",
  "messaging.system",
  "shoal.job.attempt",
  "shoal.job.id",
  "shoal.step.name",
  "shoal.step.outcome",
  "shoal.task",
];

Deno.test({
  name:
    "main.ts consumers export step spans under the run, a replayed step as replayed, a sleep as an event",
  // The exporter's HTTP client keeps its keep-alive socket; every process is closed here.
  sanitizeResources: false,
  async fn() {
    await using db = await testDb();
    await using receiver = new OtlpReceiver();
    await db.sql`
      create table test_effects (
        id bigint generated always as identity primary key,
        job_id bigint not null, attempt integer not null, pid integer not null,
        effect text not null, at timestamptz not null default clock_timestamp())`;
    await db.sql`
      create table test_marks (
        id bigint generated always as identity primary key,
        job_id bigint not null, attempt integer not null, pid integer not null,
        mark text not null, at timestamptz not null default clock_timestamp())`;
    const steps = await enqueue(db.sql, "test.steps", {}, { maxAttempts: 3 });
    const sleepy = await enqueue(db.sql, "test.sleepy", { sleep: "1s" });
    const first = tracedWorkflowConsumer(db.url, receiver, "first");
    await using _first = first;
    // test.steps hangs after step "one" on its first attempt; test.sleepy sleeps 1 s and ends.
    await waitFor("step one's span exported, and the sleepy job done", async () => {
      if (first.output().includes("shoal: ")) throw new Error(first.output());
      const [row] = await db.sql<{ n: number }[]>`
        select count(*)::int as n from shoal.jobs where id = ${sleepy}::bigint`;
      return row!.n === 0 &&
        receiver.spans.some((s) => s.name === "step one" && s.service === "first") &&
        receiver.spans.filter((s) => s.name === `run test.sleepy`).length === 2;
    }, 30_000);
    first.kill("SIGKILL");
    await exitWithin(first, 10_000);
    const second = tracedWorkflowConsumer(db.url, receiver, "second");
    await using _second = second;
    await waitFor("the redelivered steps job to finish", async () => {
      if (second.output().includes("shoal: ")) throw new Error(second.output());
      const [row] = await db.sql<{ n: number }[]>`select count(*)::int as n from shoal.jobs`;
      return row!.n === 0;
    }, 30_000);
    second.kill("SIGTERM");
    const { code, output } = await exitWithin(second, 20_000);
    assertEquals(code, 0, output);
    assertEquals(receiver.refused, []);

    const effects = await db.sql<{ job_id: string; effect: string }[]>`
      select job_id::text, effect from test_effects order by id`;
    assertEquals(
      effects.filter((e) => e.job_id === steps).map((e) => e.effect),
      ["one", `two after ${first.child.pid}`],
      "step one ran once: the second run replayed it",
    );
    assertEquals(
      effects.filter((e) => e.job_id === sleepy).map((e) => e.effect),
      ["charge", "ship"],
    );

    const spans = receiver.spans;
    const of = (id: string, name: string) =>
      spans.filter((s) => s.attributes["shoal.job.id"] === id && s.name === name);

    // test.steps: step one ran (attempt 1, first process, whose run span never ended: killed),
    // then the redelivered run (attempt 2) replayed it and ran step two, both its children.
    const ones = of(steps, "step one");
    assertEquals(
      ones.map((
        s,
      ) => [s.service, s.attributes["shoal.job.attempt"], s.attributes["shoal.step.outcome"]]),
      [["first", 1, "recorded"], ["second", 2, "replayed"]],
    );
    const [run2] = of(steps, "run test.steps");
    assertEquals(of(steps, "run test.steps").length, 1, "only the second run's span ended");
    assertEquals(run2!.attributes["shoal.job.outcome"], "completed");
    const twos = of(steps, "step two");
    assertEquals(twos.length, 1);
    for (const step of [ones[1]!, twos[0]!]) {
      assertEquals(step.parentSpanId, run2!.spanId);
      assertEquals(step.traceId, run2!.traceId);
    }
    const two = twos[0]!;
    assertEquals(Object.keys(two.attributes).sort(), STEP_KEYS);
    assertEquals(two.attributes["shoal.step.name"], "two");
    assertEquals(two.attributes["shoal.step.outcome"], "recorded");
    assertEquals(two.attributes["shoal.task"], "test.steps");
    assertEquals(two.attributes["messaging.destination.name"], "default");
    assertEquals(two.attributes["shoal.job.attempt"], 2);
    assertEquals(two.status.code ?? 0, 0);
    assertEquals(Object.keys(ones[0]!.attributes).sort(), STEP_KEYS);

    // test.sleepy: the first run recorded "charge" and slept (an event; outcome suspended);
    // the run after the wake replayed "charge", woke, and recorded "ship". Both attempt 1.
    const runs = of(sleepy, "run test.sleepy");
    assertEquals(runs.map((r) => r.attributes["shoal.job.outcome"]), ["suspended", "completed"]);
    assertEquals(runs.map((r) => r.attributes["shoal.job.attempt"]), [1, 1]);
    const [asleep, awake] = runs as [ReceivedSpan, ReceivedSpan];
    const sleeps = runs.map((r) => r.events.filter((e) => e.name === "shoal.sleep"));
    assertEquals(sleeps.map((e) => e.length), [1, 1]);
    const [slept, woke] = [sleeps[0]![0]!, sleeps[1]![0]!];
    assertEquals(slept.attributes["shoal.step.name"], "cool-off");
    assertEquals(slept.attributes["shoal.sleep.outcome"], "suspended");
    assertEquals(woke.attributes["shoal.sleep.outcome"], "woke");
    const wakeAt = Date.parse(String(slept.attributes["shoal.sleep.wake_at"]));
    assert(Number.isFinite(wakeAt), `wake_at ${slept.attributes["shoal.sleep.wake_at"]}`);
    assertEquals(woke.attributes["shoal.sleep.wake_at"], slept.attributes["shoal.sleep.wake_at"]);
    const charges = of(sleepy, "step charge");
    assertEquals(
      charges.map((s) => [s.parentSpanId, s.attributes["shoal.step.outcome"]]),
      [[asleep.spanId, "recorded"], [awake.spanId, "replayed"]],
    );
    assertEquals(
      of(sleepy, "step ship").map((s) => [s.parentSpanId, s.attributes["shoal.step.outcome"]]),
      [[awake.spanId, "recorded"]],
    );
  },
});

Deno.test({
  name:
    "ctx.transaction and ctx.step spans end as committed, recorded, lost to a newer token, or failed with ERROR",
  // startTracing() loads the exporter, whose keep-alive socket outlives stopTracing().
  sanitizeResources: false,
  async fn() {
    await using db = await testDb();
    await using receiver = new OtlpReceiver();
    /** Another run took the job meanwhile: its token moved on (on another connection). */
    const stale = (id: string) =>
      db.sql`update shoal.jobs set token = token + 1 where id = ${id}::bigint`;
    const tasks = new TaskRegistry([
      defineTask({
        name: "trace.tx",
        handler: (_p, ctx) =>
          ctx.transaction(async (tx) => {
            await tx`select 1`;
            trace.getTracer("handler").startSpan("inside the transaction").end();
            return { secret: MARKER };
          }),
      }),
      defineTask({
        name: "trace.tx_stale",
        handler: (_p, ctx) =>
          ctx.transaction(async () => {
            await stale(ctx.job.id);
          }),
      }),
      defineTask({
        name: "trace.tx_throws",
        handler: (_p, ctx) =>
          ctx.transaction(() => {
            throw new Error("the transfer was refused");
          }),
      }),
      defineTask({
        name: "trace.step_stale",
        handler: (_p, ctx) => ctx.step("charge", () => stale(ctx.job.id)),
      }),
      defineTask({
        name: "trace.step_throws",
        handler: (_p, ctx) =>
          ctx.step("charge", () => {
            throw new Error("the card was declined");
          }),
      }),
    ]);
    await startTracing({ tracesUrl: `${receiver.base}/v1/traces`, serviceName: "tx" });
    const ids: Record<string, string> = {};
    const states: Record<string, string> = {};
    try {
      for (const task of tasks.names()) {
        ids[task] = await enqueue(db.sql, task, {}, { maxAttempts: 1 });
      }
      const { jobs } = await claim(db.sql, {
        queues: ["default"],
        limit: 10,
        workerId: "w",
        visibilityMs: 60_000,
      });
      assertEquals(jobs.length, 5);
      const completer = new Completer(db.sql);
      for (const job of jobs) {
        const run = new JobRun(job, {
          sql: db.sql,
          tasks,
          log: logger("consumer"),
          taskTimeoutMs: 10_000,
        });
        await run.settled;
        states[job.task] = run.state;
        await completer.record(run);
      }
      await completer.drain();
    } finally {
      await stopTracing();
    }
    assertEquals(states, {
      "trace.tx": "committed",
      "trace.tx_stale": "lost",
      "trace.tx_throws": "failed",
      "trace.step_stale": "lost",
      "trace.step_throws": "failed",
    });
    const spans = receiver.spans;
    const one = (task: string, name: string) => {
      const found = spans.filter((s) =>
        s.attributes["shoal.job.id"] === ids[task] && s.name === name
      );
      assertEquals(found.length, 1, `${name} of ${task}: ${found.length} spans`);
      return found[0]!;
    };
    const outcome = (task: string, name: string, key: string) => {
      const span = one(task, name);
      assertEquals(span.parentSpanId, one(task, `run ${task}`).spanId, `${name} of ${task}`);
      return [span.attributes[key], span.status.code ?? 0, span.status.message ?? ""];
    };
    const TX = "shoal.transaction.outcome";
    assertEquals(outcome("trace.tx", "transaction trace.tx", TX), ["committed", 0, ""]);
    assertEquals(outcome("trace.tx_stale", "transaction trace.tx_stale", TX), ["lost", 0, ""]);
    const [thrown, code, message] = outcome("trace.tx_throws", "transaction trace.tx_throws", TX);
    assertEquals([thrown, code], ["failed", 2]);
    assert(String(message).includes("the transfer was refused"), String(message));
    assert(
      one("trace.tx_throws", "transaction trace.tx_throws").events.some((e) =>
        e.name === "exception"
      ),
    );
    const STEP = "shoal.step.outcome";
    assertEquals(outcome("trace.step_stale", "step charge", STEP), ["lost", 0, ""]);
    const stepFailed = outcome("trace.step_throws", "step charge", STEP);
    assertEquals(stepFailed.slice(0, 2), ["failed", 2]);
    assert(String(stepFailed[2]).includes("the card was declined"), String(stepFailed[2]));
    // The run spans say how each run ended.
    assertEquals(one("trace.tx", "run trace.tx").attributes["shoal.job.outcome"], "completed");
    assertEquals(
      one("trace.tx_stale", "run trace.tx_stale").attributes["shoal.job.outcome"],
      "lost",
    );
    // The handler's own spans inside the transaction are its children.
    const inside = spans.find((s) => s.name === "inside the transaction");
    assertEquals(inside?.parentSpanId, one("trace.tx", "transaction trace.tx").spanId);
    // The transaction's attributes: the job's, never its result.
    assertEquals(
      Object.keys(one("trace.tx", "transaction trace.tx").attributes).sort(),
      STEP_KEYS.filter((k) => !k.startsWith("shoal.step.")).concat(TX).sort(),
    );
    for (const body of receiver.bodies) assert(!body.includes(MARKER), "a result was exported");
  },
});
