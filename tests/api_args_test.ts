/**
 * Every function and class lib/mod.ts exports refuses a wrong argument at the call, in one
 * line naming the function and the argument: `deno run` does not type-check a team's entry
 * file, and JavaScript callers have no types. Each call below passes a value the type checker
 * would have refused (cast through `unknown`), against a real database, and must throw exactly
 * the message given, before any SQL is sent (without the check the same call fails inside
 * postgres.js or Postgres, with another message, or not at all).
 *
 * The first test keeps the rule: a function or class exported from lib/mod.ts without an
 * entry in CASES fails it.
 */
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { FAST_CONSUMER, testDb } from "./helpers.ts";
import * as shoal from "../lib/mod.ts";
import type { LeaseTerm, Sql } from "../lib/mod.ts";

/** What a case's call gets: a pool on a fresh migrated database, and valid values to reuse. */
interface Env {
  sql: Sql;
  migrations: Awaited<ReturnType<typeof shoal.loadMigrations>>;
  /** Already aborted: a role that started by mistake returns at once instead of hanging. */
  stopped: AbortSignal;
}

/** A call that must throw `error` with exactly `message`. */
interface Refusal {
  call: (env: Env) => unknown;
  error: typeof TypeError | typeof RangeError;
  message: string;
}

/** Pass anything where a typed argument goes: what untyped JavaScript can do. */
const x = (value: unknown): never => value as never;

const ref = { id: "1", token: "1" };
const term: LeaseTerm = { name: "reaper", holder: "h", token: "1", expiresAt: new Date() };
const reaper = { holder: "h", leaseMs: 30_000, intervalMs: 5000, deadRetentionMs: 1000 };
const scheduler = { holder: "h", leaseMs: 30_000, intervalMs: 5000, listen: false };
const spec = { children: [{ task: "c" }], callback: { task: "cb" } };
const task = shoal.defineTask({ name: "t", handler: () => {} });
const tasks = new shoal.TaskRegistry([task]);
const parts = { timestamp: "1700000000", jobId: "1", body: "{}" };
const DB = "a database handle from connect() (a pool or a transaction)";
const NAME = "1 to 128 letters, digits or _.:- starting with a letter or digit";
const NOT_A_POOL = "expected a pool from connect(), not a transaction or a reserved connection";
const SIGNAL = "expected an AbortSignal (an AbortController's signal), not undefined";

/** Run `call` inside a transaction: for the functions that need a pool. */
const inTx = (env: Env, call: (tx: Sql) => unknown) =>
  env.sql.begin((tx) => call(tx as unknown as Sql));

const CASES: Record<string, Refusal[] | { exempt: string }> = {
  connect: [{
    call: () => shoal.connect(x(5432)),
    error: TypeError,
    message: "Cannot connect: the database URL must be a non-empty string",
  }, {
    call: () => shoal.connect("postgres://localhost/x", x({ max: "10" })),
    error: TypeError,
    message: 'Invalid options.max for connect(): expected an integer from 1 to 10000, not "10"',
  }],
  claim: [{
    call: () =>
      shoal.claim(x(undefined), { queues: ["q"], limit: 1, workerId: "w", visibilityMs: 1000 }),
    error: TypeError,
    message: `Invalid db for claim(): expected ${DB}, not undefined`,
  }, {
    call: ({ sql }) => shoal.claim(sql, x(undefined)),
    error: TypeError,
    message: "Invalid options for claim(): expected an object, not undefined",
  }, {
    call: ({ sql }) =>
      shoal.claim(sql, { queues: x("q"), limit: 1, workerId: "w", visibilityMs: 1000 }),
    error: TypeError,
    message:
      'Invalid options.queues for claim(): expected a non-empty array of queue names, not "q"',
  }, {
    call: ({ sql }) =>
      shoal.claim(sql, { queues: ["q"], limit: 0, workerId: "w", visibilityMs: 1000 }),
    error: RangeError,
    message: "Invalid options.limit for claim(): expected an integer from 1 to 2147483647, not 0",
  }, {
    call: ({ sql }) =>
      shoal.claim(sql, { queues: ["q"], limit: 1, workerId: "w", visibilityMs: x("30s") }),
    error: TypeError,
    message:
      'Invalid options.visibilityMs for claim(): expected an integer from 0 to 2073600000, not "30s"',
  }, {
    call: ({ sql }) =>
      shoal.claim(sql, {
        queues: ["q"],
        limit: 1,
        workerId: "w",
        visibilityMs: 1000,
        before: { priority: 0, fair_seq: x(1.5) },
      }),
    error: TypeError,
    message:
      "Invalid options.before.fair_seq for claim(): expected an integer as a string, not 1.5",
  }],
  ack: [{
    call: ({ sql }) => shoal.ack(sql, x(ref)),
    error: TypeError,
    message: "Invalid refs for ack(): expected an array of job refs ({ id, token }), not an object",
  }, {
    call: ({ sql }) => shoal.ack(sql, x([{ id: "1" }])),
    error: TypeError,
    message:
      "Invalid refs[0].token for ack(): expected a non-negative integer token as a string or number, not undefined",
  }, {
    // Valid refs pass without a message built for them; the one refused is named.
    call: ({ sql }) =>
      shoal.ack(sql, [{ id: "1", token: "0" }, { id: "2", token: "7" }, { id: "0", token: "1" }]),
    error: RangeError,
    message:
      'Invalid refs[2].id for ack(): expected a positive integer id as a string or number, not "0"',
  }],
  extend: [{
    call: ({ sql }) => shoal.extend(sql, [], x(undefined)),
    error: TypeError,
    message:
      "Invalid visibilityMs for extend(): expected an integer from 0 to 2073600000, not undefined",
  }],
  release: [{
    call: ({ sql }) => shoal.release(sql, [{ id: "abc", token: "1" }]),
    error: TypeError,
    message:
      'Invalid refs[0].id for release(): expected a positive integer id as a string or number, not "abc"',
  }],
  fail: [{
    call: ({ sql }) => shoal.fail(sql, ref, { error: x(new Error("boom")), retryInMs: 0 }),
    error: TypeError,
    message: "Invalid options.error for fail(): expected a string, not an object",
  }, {
    call: ({ sql }) => shoal.fail(sql, ref, { error: "boom", retryInMs: NaN }),
    error: RangeError,
    message:
      "Invalid options.retryInMs for fail(): expected a number from 0 to 3155760000000, not NaN",
  }, {
    call: ({ sql }) => shoal.fail(sql, ref, { error: "boom", retryInMs: 0, permanent: x("yes") }),
    error: TypeError,
    message: 'Invalid options.permanent for fail(): expected true or false, not "yes"',
  }],
  fanOut: [{
    call: ({ sql }) => shoal.fanOut(sql, x(undefined), spec),
    error: TypeError,
    message: "Invalid parent for fanOut(): expected a job ref ({ id, token }), not undefined",
  }, {
    call: ({ sql }) => shoal.fanOut(sql, ref, spec, { maxChildren: -1 }),
    error: RangeError,
    message:
      "Invalid options.maxChildren for fanOut(): expected an integer from 0 to 2147483647, not -1",
  }, {
    call: ({ sql }) => shoal.fanOut(sql, ref, x(null)),
    error: TypeError,
    message: "Invalid fan-out: children must be an array",
  }],
  completeJobs: [{
    call: ({ sql }) => shoal.completeJobs(sql, [{ id: x(5), token: x(-1), result: 1 }]),
    error: RangeError,
    message:
      "Invalid done[0].token for completeJobs(): expected a non-negative integer token as a string or number, not -1",
  }],
  startExecution: [{
    call: () => shoal.startExecution(x(null), { task: "t" }),
    error: TypeError,
    message: `Invalid db for startExecution(): expected ${DB}, not null`,
  }, {
    call: ({ sql }) => shoal.startExecution(sql, x("send")),
    error: TypeError,
    message:
      'Invalid job for startExecution(): expected a job ({ task, payload?, ... }), not "send"',
  }, {
    call: ({ sql }) => shoal.startExecution(sql, { task: "t" }, { maxPayloadBytes: x("1mb") }),
    error: TypeError,
    message:
      'Invalid options.maxPayloadBytes for startExecution(): expected an integer from 1 to 2147483647, not "1mb"',
  }, {
    call: ({ sql }) => shoal.startExecution(sql, { task: "t", payload: x([1]) }),
    error: TypeError,
    message: "Invalid job.payload for startExecution(): expected a JSON object, got array",
  }, {
    call: ({ sql }) => shoal.startExecution(sql, { task: "t", runAt: x(1700000000000) }),
    error: TypeError,
    message: `Invalid job.runAt for startExecution(): expected a valid Date, not 1700000000000`,
  }, {
    call: ({ sql }) => shoal.startExecution(sql, { task: "t" }, { key: x(42) }),
    error: TypeError,
    message:
      "Invalid options.key for startExecution(): expected 1 to 512 printable characters (no control characters), not number",
  }, {
    call: ({ sql }) => shoal.startExecution(sql, { task: "t" }, { key: "a\tb" }),
    error: TypeError,
    message:
      "Invalid options.key for startExecution(): contains a control character; use 1 to 512 printable characters (no control characters)",
  }, {
    call: ({ sql }) => shoal.startExecution(sql, { task: "t" }, x({ keys: "k" })),
    error: TypeError,
    message:
      'Invalid options for startExecution(): unknown option "keys" (known: maxPayloadBytes, key)',
  }],
  startWorkflow: [{
    call: () => shoal.startWorkflow(x(null), { steps: [{ id: "a", task: "t" }] }),
    error: TypeError,
    message: `Invalid db for startWorkflow(): expected ${DB}, not null`,
  }, {
    call: ({ sql }) => shoal.startWorkflow(sql, x([{ id: "a", task: "t" }])),
    error: TypeError,
    message:
      "Invalid spec for startWorkflow(): expected a workflow ({ steps: [...] }), not an array",
  }, {
    call: ({ sql }) => shoal.startWorkflow(sql, { steps: [] }),
    error: TypeError,
    message:
      "Invalid spec.steps for startWorkflow(): expected an array of 1 to 1000 steps, not an array",
  }, {
    call: ({ sql }) => shoal.startWorkflow(sql, { steps: [{ id: "a", task: "t", after: x("b") }] }),
    error: TypeError,
    message:
      'Invalid spec.steps[0].after for startWorkflow(): expected an array of step ids, not "b"',
  }, {
    call: ({ sql }) =>
      shoal.startWorkflow(sql, {
        steps: [{ id: "a", task: "t" }, { id: "b", task: "t", payload: x([1]) }],
      }),
    error: TypeError,
    message: "Invalid spec.steps[1].payload for startWorkflow(): expected a JSON object, got array",
  }, {
    call: ({ sql }) =>
      shoal.startWorkflow(sql, { steps: [{ id: "a", task: "t", onDependencyFailure: x("skip") }] }),
    error: TypeError,
    message:
      'Invalid spec.steps[0].onDependencyFailure for startWorkflow(): expected "fail" or "run", not "skip"',
  }],
  listSteps: [{
    call: ({ sql }) => shoal.listSteps(sql, "abc"),
    error: TypeError,
    message:
      'Invalid jobId for listSteps(): expected a positive integer id as a string or number, not "abc"',
  }],
  emitEvent: [{
    call: () => shoal.emitEvent(x(undefined), "e", "k", {}),
    error: TypeError,
    message: `Invalid db for emitEvent(): expected ${DB}, not undefined`,
  }, {
    call: ({ sql }) => shoal.emitEvent(sql, "no spaces", "k", {}),
    error: TypeError,
    message: `Invalid name for emitEvent(): expected an event name (${NAME}), not "no spaces"`,
  }, {
    call: ({ sql }) => shoal.emitEvent(sql, "e", x(42), {}),
    error: TypeError,
    message:
      'Invalid key for emitEvent(): expected a string of at most 512 characters ("" for none), not 42',
  }, {
    call: ({ sql }) => shoal.emitEvent(sql, "e", "k".repeat(513), {}),
    error: RangeError,
    message: "Invalid key for emitEvent(): expected at most 512 characters, not 513",
  }, {
    call: ({ sql }) => shoal.emitEvent(sql, "e", "k", x([1])),
    error: TypeError,
    message: "Invalid payload for emitEvent(): expected a JSON object, got array",
  }, {
    call: ({ sql }) => shoal.emitEvent(sql, "e", "k", {}, { maxPayloadBytes: NaN }),
    error: RangeError,
    message:
      "Invalid options.maxPayloadBytes for emitEvent(): expected an integer from 1 to 2147483647, not NaN",
  }, {
    call: ({ sql }) => shoal.emitEvent(sql, "e", "k", {}, x({ maxPayload: 5 })),
    error: TypeError,
    message:
      'Invalid options for emitEvent(): unknown option "maxPayload" (known: maxPayloadBytes)',
  }],
  getExecution: [{
    call: ({ sql }) => shoal.getExecution(sql, "abc"),
    error: TypeError,
    message:
      'Invalid id for getExecution(): expected a positive integer id as a string or number, not "abc"',
  }, {
    call: ({ sql }) => shoal.getExecution(sql, x(0)),
    error: RangeError,
    message:
      "Invalid id for getExecution(): expected a positive integer id as a string or number, not 0",
  }, {
    call: ({ sql }) => shoal.getExecution(sql, "99999999999999999999"),
    error: RangeError,
    message:
      'Invalid id for getExecution(): expected a positive integer id as a string or number, not "99999999999999999999"',
  }],
  cancelExecution: [{
    call: ({ sql }) => shoal.cancelExecution(sql, x(undefined)),
    error: TypeError,
    message:
      "Invalid id for cancelExecution(): expected a positive integer id as a string or number, not undefined",
  }],
  listExecutions: [{
    call: ({ sql }) => shoal.listExecutions(sql, x(20)),
    error: TypeError,
    message: "Invalid options for listExecutions(): expected an object, not 20",
  }, {
    call: ({ sql }) => shoal.listExecutions(sql, { limit: x("20") }),
    error: TypeError,
    message:
      'Invalid options.limit for listExecutions(): expected an integer from 1 to 2147483647, not "20"',
  }],
  acquire: [{
    call: ({ sql }) => shoal.acquire(sql, x({ name: "reaper", holder: "h" })),
    error: TypeError,
    message:
      "Invalid options.ttlMs for acquire(): expected an integer from 1 to 2073600000, not undefined",
  }, {
    call: ({ sql }) => shoal.acquire(sql, { name: "", holder: "h", ttlMs: 1000 }),
    error: TypeError,
    message: 'Invalid options.name for acquire(): expected a non-empty string, not ""',
  }, {
    call: ({ sql }) =>
      shoal.acquire(sql, { name: "reaper", holder: "h", ttlMs: 1000, now: x("2026-01-01") }),
    error: TypeError,
    message: 'Invalid options.now for acquire(): expected a valid Date, not "2026-01-01"',
  }],
  holdLease: [{
    call: ({ sql }) => shoal.holdLease(sql, x({ name: "reaper", holder: "h" })),
    error: TypeError,
    message:
      "Invalid term.token for holdLease(): expected a non-negative integer token as a string or number, not undefined",
  }],
  releaseLease: [{
    call: ({ sql }) => shoal.releaseLease(sql, term, { now: new Date(NaN) }),
    error: TypeError,
    message: "Invalid options.now for releaseLease(): expected a valid Date, not an invalid Date",
  }],
  renew: [{
    call: ({ sql }) => shoal.renew(sql, term, x(undefined)),
    error: TypeError,
    message: "Invalid options for renew(): expected an object, not undefined",
  }, {
    call: ({ sql }) => shoal.renew(sql, x(null), { ttlMs: 1000 }),
    error: TypeError,
    message: "Invalid term for renew(): expected a lease term from acquire(), not null",
  }],
  reapOnce: [{
    call: (env) => inTx(env, (tx) => shoal.reapOnce(tx, reaper)),
    error: TypeError,
    message: `Invalid sql for reapOnce(): ${NOT_A_POOL}`,
  }, {
    call: ({ sql }) => shoal.reapOnce(sql, { ...reaper, deadRetentionMs: x("14d") }),
    error: TypeError,
    message:
      'Invalid options.deadRetentionMs for reapOnce(): expected an integer from 0 to 3155760000000, not "14d"',
  }, {
    call: ({ sql }) => shoal.reapOnce(sql, reaper, { term: x({}) }),
    error: TypeError,
    message: "Invalid context.term.name for reapOnce(): expected a non-empty string, not undefined",
  }],
  runReaper: [{
    call: ({ sql }) => shoal.runReaper(sql, reaper, x(undefined)),
    error: TypeError,
    message: `Invalid stop for runReaper(): ${SIGNAL}`,
  }, {
    call: ({ sql, stopped }) => shoal.runReaper(sql, { ...reaper, leaseMs: x(undefined) }, stopped),
    error: TypeError,
    message:
      "Invalid options.leaseMs for runReaper(): expected an integer from 1 to 2073600000, not undefined",
  }],
  listSchedules: [{
    call: () => shoal.listSchedules(x({})),
    error: TypeError,
    message: `Invalid db for listSchedules(): expected ${DB}, not an object`,
  }],
  removeSchedule: [{
    call: ({ sql }) => shoal.removeSchedule(sql, x(undefined)),
    error: TypeError,
    message: "Invalid name for removeSchedule(): expected a non-empty string, not undefined",
  }],
  setScheduleEnabled: [{
    call: ({ sql }) => shoal.setScheduleEnabled(sql, "nightly", x("false")),
    error: TypeError,
    message: 'Invalid enabled for setScheduleEnabled(): expected true or false, not "false"',
  }],
  syncSchedules: [{
    call: ({ sql }) => shoal.syncSchedules(sql, x({ schedules: [] })),
    error: TypeError,
    message: "Invalid specs for syncSchedules(): expected an array of schedules, not an object",
  }, {
    call: (env) => inTx(env, (tx) => shoal.syncSchedules(tx, [])),
    error: TypeError,
    message: `Invalid sql for syncSchedules(): ${NOT_A_POOL}`,
  }],
  upsertSchedule: [{
    call: ({ sql }) =>
      shoal.upsertSchedule(sql, { name: "n", cron: "* * * * *", task: "t" }, x("cli")),
    error: TypeError,
    message: 'Invalid source for upsertSchedule(): expected "manual" or "file", not "cli"',
  }, {
    call: ({ sql }) => shoal.upsertSchedule(sql, x(null)),
    error: TypeError,
    message: "Invalid schedule: expected an object with name, cron and task",
  }],
  runScheduler: [{
    call: ({ sql, stopped }) => shoal.runScheduler(sql, { ...scheduler, listen: x("no") }, stopped),
    error: TypeError,
    message: 'Invalid options.listen for runScheduler(): expected true or false, not "no"',
  }, {
    call: ({ sql }) => shoal.runScheduler(sql, scheduler, x(undefined)),
    error: TypeError,
    message: `Invalid stop for runScheduler(): ${SIGNAL}`,
  }],
  tickOnce: [{
    call: ({ sql }) => shoal.tickOnce(sql, { now: x(0) }),
    error: TypeError,
    message: "Invalid options.now for tickOnce(): expected a valid Date, not 0",
  }, {
    call: ({ sql }) => shoal.tickOnce(sql, { batchSize: 0 }),
    error: RangeError,
    message:
      "Invalid options.batchSize for tickOnce(): expected an integer from 1 to 100000, not 0",
  }, {
    call: (env) => inTx(env, (tx) => shoal.tickOnce(tx)),
    error: TypeError,
    message: `Invalid sql for tickOnce(): ${NOT_A_POOL}`,
  }],
  listDead: [{
    call: ({ sql }) => shoal.listDead(sql, { limit: 0 }),
    error: RangeError,
    message:
      "Invalid options.limit for listDead(): expected an integer from 1 to 2147483647, not 0",
  }, {
    call: ({ sql }) => shoal.listDead(sql, { queue: x(5) }),
    error: TypeError,
    message: "Invalid options.queue for listDead(): expected a non-empty string, not 5",
  }],
  purgeDead: [{
    call: ({ sql }) => shoal.purgeDead(sql, x({ olderThan: 1000 })),
    error: TypeError,
    message:
      'Invalid options for purgeDead(): unknown option "olderThan" (known: queue, task, throughId, olderThanMs, limit)',
  }, {
    call: ({ sql }) => shoal.purgeDead(sql, { olderThanMs: -1 }),
    error: RangeError,
    message:
      "Invalid options.olderThanMs for purgeDead(): expected an integer from 0 to 3155760000000, not -1",
  }],
  retryDead: [{
    call: ({ sql }) => shoal.retryDead(sql, x(12.5)),
    error: RangeError,
    message:
      "Invalid id for retryDead(): expected a positive integer id as a string or number, not 12.5",
  }],
  pauseQueue: [{
    call: ({ sql }) => shoal.pauseQueue(sql, "bad name"),
    error: TypeError,
    message: `Invalid queue for pauseQueue(): expected a queue name (${NAME}), not "bad name"`,
  }],
  resumeQueue: [{
    call: () => shoal.resumeQueue(x(undefined), "q"),
    error: TypeError,
    message: `Invalid db for resumeQueue(): expected ${DB}, not undefined`,
  }],
  setConcurrencyLimit: [{
    call: ({ sql }) => shoal.setConcurrencyLimit(sql, { queue: "q", maxRunning: x(null) }),
    error: TypeError,
    message:
      "Invalid options.maxRunning for setConcurrencyLimit(): expected an integer from 0 to 1000000, not null",
  }, {
    call: ({ sql }) =>
      shoal.setConcurrencyLimit(sql, { queue: "q", maxRunning: 1, key: "k".repeat(257) }),
    error: RangeError,
    message:
      'Invalid options.key for setConcurrencyLimit(): expected a string of at most 256 characters, not "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk…"',
  }],
  clearConcurrencyLimit: [{
    call: ({ sql }) => shoal.clearConcurrencyLimit(sql, x({ queue: "q", keys: ["a"] })),
    error: TypeError,
    message:
      'Invalid options for clearConcurrencyLimit(): unknown option "keys" (known: queue, key, task)',
  }],
  setRateLimit: [{
    call: ({ sql }) => shoal.setRateLimit(sql, { queue: "q", maxStarts: 1, periodMs: x(null) }),
    error: TypeError,
    message:
      "Invalid options.periodMs for setRateLimit(): expected an integer from 1 to 86400000, not null",
  }, {
    call: ({ sql }) => shoal.setRateLimit(sql, x({ queue: "q", max: 1, periodMs: 1000 })),
    error: TypeError,
    message:
      'Invalid options for setRateLimit(): unknown option "max" (known: queue, maxStarts, periodMs, key, task)',
  }],
  clearRateLimit: [{
    call: ({ sql }) => shoal.clearRateLimit(sql, x({ queue: "q", keys: ["a"] })),
    error: TypeError,
    message:
      'Invalid options for clearRateLimit(): unknown option "keys" (known: queue, key, task)',
  }],
  holdKey: [{
    call: ({ sql }) => shoal.holdKey(sql, { queue: "q", key: "a", forMs: 86_400_001 }),
    error: RangeError,
    message:
      "Invalid options.forMs for holdKey(): expected an integer from 0 to 86400000, not 86400001",
  }],
  setFairnessWeight: [{
    call: ({ sql }) => shoal.setFairnessWeight(sql, { queue: "q", key: "a", weight: 0 }),
    error: RangeError,
    message:
      "Invalid options.weight for setFairnessWeight(): expected an integer from 1 to 1000, not 0",
  }],
  clearFairnessWeight: [{
    call: ({ sql }) => shoal.clearFairnessWeight(sql, x({ queue: "q" })),
    error: TypeError,
    message: "Invalid options.key for clearFairnessWeight(): expected a string, not undefined",
  }],
  pruneSlots: [{
    call: ({ sql }) => shoal.pruneSlots(sql, x(undefined)),
    error: TypeError,
    message:
      "Invalid limit for pruneSlots(): expected an integer from 1 to 2147483647, not undefined",
  }],
  flowStatus: [{
    call: () => shoal.flowStatus(x("postgres://localhost/db")),
    error: TypeError,
    message: `Invalid db for flowStatus(): expected ${DB}, not "postgres://localhost/db"`,
  }],
  migrate: [{
    call: ({ sql }) => shoal.migrate(sql, x(undefined)),
    error: TypeError,
    message:
      "Invalid migrations for migrate(): expected the migrations loadMigrations() returns, not undefined",
  }, {
    call: (env) => inTx(env, (tx) => shoal.migrate(tx, env.migrations)),
    error: TypeError,
    message: `Invalid sql for migrate(): ${NOT_A_POOL}`,
  }, {
    call: ({ sql, migrations }) => shoal.migrate(sql, migrations, x([])),
    error: TypeError,
    message: "Invalid functions for migrate(): expected a function set, or undefined, not an array",
  }],
  checkSchema: [{
    call: ({ sql }) => shoal.checkSchema(sql, x([{ version: 1 }])),
    error: TypeError,
    message:
      "Invalid migrations[0].sql for checkSchema(): expected a non-empty string, not undefined",
  }, {
    call: ({ sql, migrations }) => shoal.checkSchema(sql, migrations, { migrateFlag: x("yes") }),
    error: TypeError,
    message: 'Invalid options.migrateFlag for checkSchema(): expected true or false, not "yes"',
  }],
  loadMigrations: [{
    call: () => shoal.loadMigrations(x("sql/")),
    error: TypeError,
    message:
      'Invalid dir for loadMigrations(): expected a URL of a directory, ending in "/", not "sql/"',
  }, {
    // Without the slash, files would be read from beside the directory, not from it.
    call: () => shoal.loadMigrations(new URL("file:///srv/shoal/sql")),
    error: TypeError,
    message:
      'Invalid dir for loadMigrations(): expected a URL of a directory, ending in "/", not "file:///srv/shoal/sql"',
  }],
  runConsumer: [{
    call: ({ sql, stopped }) =>
      shoal.runConsumer({ sql, tasks: x([task]) }, FAST_CONSUMER, stopped),
    error: TypeError,
    message:
      "Invalid deps.tasks for runConsumer(): expected a TaskRegistry (new TaskRegistry(tasks)), not an array",
  }, {
    call: ({ sql, stopped }) =>
      shoal.runConsumer({ sql, tasks }, { ...FAST_CONSUMER, queues: x("default") }, stopped),
    error: TypeError,
    message:
      'Invalid options.queues for runConsumer(): expected a non-empty array of queue names, not "default"',
  }, {
    call: ({ sql, stopped }) =>
      shoal.runConsumer({ sql, tasks }, { ...FAST_CONSUMER, concurrency: 0 }, stopped),
    error: RangeError,
    message:
      "Invalid options.concurrency for runConsumer(): expected an integer from 1 to 2147483647, not 0",
  }, {
    call: ({ sql, stopped }) =>
      shoal.runConsumer(
        { sql, tasks },
        { ...FAST_CONSUMER, pollIntervalMs: x(undefined) },
        stopped,
      ),
    error: TypeError,
    message:
      "Invalid options.pollIntervalMs for runConsumer(): expected an integer from 1 to 2073600000, not undefined",
  }, {
    call: ({ sql, stopped }) =>
      shoal.runConsumer({ sql, tasks }, { ...FAST_CONSUMER, visibilityTimeoutMs: 50 }, stopped),
    error: RangeError,
    message:
      "Invalid options.visibilityTimeoutMs for runConsumer(): expected an integer from 100 to 2073600000, not 50",
  }, {
    call: ({ sql }) => shoal.runConsumer({ sql, tasks }, FAST_CONSUMER, x(undefined)),
    error: TypeError,
    message: `Invalid stop for runConsumer(): ${SIGNAL}`,
  }],
  httpTask: [{
    call: () => shoal.httpTask(x({ allow: "example.com" })),
    error: TypeError,
    message:
      'Invalid settings.allow for httpTask(): expected an array of strings, not "example.com"',
  }, {
    call: () => shoal.httpTask({ timeoutMs: 0 }),
    error: RangeError,
    message:
      "Invalid settings.timeoutMs for httpTask(): expected an integer from 1 to 600000, not 0",
  }, {
    call: () => shoal.httpTask(x({ env: {} })),
    error: TypeError,
    message: "Invalid settings.env for httpTask(): expected a function, not an object",
  }],
  checkHttpAllow: [{
    call: () => shoal.checkHttpAllow(x("a.example,b.example")),
    error: TypeError,
    message:
      'Invalid entries for checkHttpAllow(): expected an array of strings, not "a.example,b.example"',
  }, {
    call: () => shoal.checkHttpAllow(x(["a.example", 8080])),
    error: TypeError,
    message: "Invalid entries[1] for checkHttpAllow(): expected a string, not 8080",
  }],
  signWebhook: [{
    call: () => shoal.signWebhook(x(undefined), parts),
    error: TypeError,
    message: "Invalid secret for signWebhook(): expected a non-empty string, not undefined",
  }, {
    // `${1700000000}` would sign the same text, `${undefined}` the word "undefined".
    call: () => shoal.signWebhook("s", { ...parts, jobId: x(undefined) }),
    error: TypeError,
    message: "Invalid parts.jobId for signWebhook(): expected a non-empty string, not undefined",
  }],
  parseRetryAfter: [{
    call: () => shoal.parseRetryAfter(x(undefined)),
    error: TypeError,
    message: "Invalid value for parseRetryAfter(): expected a string or null, not undefined",
  }, {
    call: () => shoal.parseRetryAfter("5", x("now")),
    error: TypeError,
    message:
      'Invalid nowMs for parseRetryAfter(): expected a number from 0 to 8640000000000000, not "now"',
  }],
  checkSqlSchemas: [{
    call: () => shoal.checkSqlSchemas(x("app")),
    error: TypeError,
    message: 'Invalid schemas for checkSqlSchemas(): expected an array of strings, not "app"',
  }],
  sqlTask: [{
    call: () => shoal.sqlTask(x({ schemas: "app" })),
    error: TypeError,
    message: 'Invalid settings.schemas for sqlTask(): expected an array of strings, not "app"',
  }],
  status: [{
    call: () => shoal.status(x(undefined)),
    error: TypeError,
    message: `Invalid db for status(): expected ${DB}, not undefined`,
  }, {
    call: ({ sql }) => shoal.status(sql, x({ exact: "yes" })),
    error: TypeError,
    message: 'Invalid options.exact for status(): expected true or false, not "yes"',
  }, {
    call: ({ sql }) => shoal.status(sql, x({ exactly: true })),
    error: TypeError,
    message: 'Invalid options for status(): unknown option "exactly" (known: exact, readReplica)',
  }],
  builtinTasks: [{
    call: () => shoal.builtinTasks(x({ http: "example.com" })),
    error: TypeError,
    message: 'Invalid settings.http for builtinTasks(): expected an object, not "example.com"',
  }],
  TaskRegistry: [{
    call: () => new shoal.TaskRegistry(x(task)),
    error: TypeError,
    message: "Invalid tasks for new TaskRegistry(): expected an array of tasks, not an object",
  }, {
    call: () => new shoal.TaskRegistry([x({ name: "t" })]),
    error: TypeError,
    message: "Invalid tasks[0].handler for new TaskRegistry(): expected a function, not undefined",
  }, {
    call: () => new shoal.TaskRegistry().add(x(undefined)),
    error: TypeError,
    message:
      "Invalid task for TaskRegistry.add(): expected a task from defineTask(), not undefined",
  }],
  main: [{
    call: () => shoal.main(x("migrate")),
    error: TypeError,
    message: 'Invalid args for main(): expected an array of strings, not "migrate"',
  }, {
    call: () => shoal.main(["status"], x({ tasks: task })),
    error: TypeError,
    message: "Invalid options.tasks for main(): expected an array of tasks, not an object",
  }, {
    call: () => shoal.main(["status"], x({ tasks: [undefined] })),
    error: TypeError,
    message:
      "Invalid options.tasks[0] for main(): expected a task from defineTask(), not undefined",
  }],
  RetryLaterError: [{
    call: () => new shoal.RetryLaterError("busy", x("120")),
    error: TypeError,
    message:
      'Invalid delayMs for new RetryLaterError(): expected a number of milliseconds, not "120"',
  }],
  PermanentError: { exempt: "an Error subclass: it takes what Error takes" },
  ClaimLostError: { exempt: "an Error subclass: it takes what Error takes" },
  SuspendedError: { exempt: "an Error subclass: it takes what Error takes" },
  TracingConfigError: { exempt: "an Error subclass: it takes what Error takes" },
  isTraceparent: { exempt: "a predicate: any value has an answer" },
  stopTracing: { exempt: "takes no argument" },
  tracingFromEnv: [{
    call: () => shoal.tracingFromEnv(x({})),
    error: TypeError,
    message:
      "Invalid env for tracingFromEnv(): expected an object with get(name), such as Deno.env, not an object",
  }],
  startTracing: [{
    call: () => shoal.startTracing(x(undefined)),
    error: TypeError,
    message:
      "Invalid config for startTracing(): expected tracing settings ({ tracesUrl, serviceName }), not undefined",
  }, {
    call: () => shoal.startTracing(x({ tracesUrl: "http://c:4318/v1/traces" })),
    error: TypeError,
    message:
      "Invalid config.serviceName for startTracing(): expected a non-empty string, not undefined",
  }, {
    call: () => shoal.startTracing({ tracesUrl: "collector:4318", serviceName: "s" }),
    error: TypeError,
    message:
      'Invalid config.tracesUrl for startTracing(): expected an http:// or https:// URL, not "collector:4318"',
  }],
  enqueue: [{
    call: () => shoal.enqueue(x(undefined), "t"),
    error: TypeError,
    message: `Invalid db for enqueue(): expected ${DB}, not undefined`,
  }, {
    call: ({ sql }) => shoal.enqueue(sql, "t", {}, { after: x(["1", 2]) }),
    error: TypeError,
    message: "Invalid options.after for enqueue(): expected job ids (strings of digits), not 2",
  }, {
    call: ({ sql }) =>
      shoal.enqueue(sql, "t", {}, { after: ["1"], onDependencyFailure: x("skip") }),
    error: TypeError,
    message:
      'Invalid options.onDependencyFailure for enqueue(): expected "fail" or "run", not "skip"',
  }, {
    call: ({ sql }) => shoal.enqueue(sql, x(5)),
    error: TypeError,
    message:
      "Invalid task for enqueue(): expected a task name or a definition from defineTask, got number",
  }, {
    call: ({ sql }) => shoal.enqueue(sql, "bad name"),
    error: TypeError,
    message: `Invalid task for enqueue(): expected a task name (${NAME}), not "bad name"`,
  }, {
    call: ({ sql }) => shoal.enqueue(sql, "t", x([1])),
    error: TypeError,
    message: "Invalid payload for enqueue(): expected a JSON object, got array",
  }, {
    call: ({ sql }) => shoal.enqueue(sql, "t", {}, x("emails")),
    error: TypeError,
    message: 'Invalid options for enqueue(): expected an object, not "emails"',
  }, {
    call: ({ sql }) => shoal.enqueue(sql, "t", {}, { traceparent: "00-1-2-01" }),
    error: TypeError,
    message:
      'Invalid options.traceparent for enqueue(): expected a W3C traceparent "00-<32 hex trace id>-<16 hex span id>-<2 hex flags>" in lower case, with a trace id and span id not all zeros, not "00-1-2-01"',
  }, {
    call: ({ sql }) => shoal.enqueue(sql, "t", {}, { runAt: x("2026-01-01") }),
    error: TypeError,
    message: 'Invalid options.runAt for enqueue(): expected a valid Date, not "2026-01-01"',
  }, {
    call: ({ sql }) => shoal.enqueue(sql, "t", {}, { queue: "bad name" }),
    error: TypeError,
    message: `Invalid options.queue for enqueue(): expected a queue name (${NAME}), not "bad name"`,
  }, {
    // "false" is truthy here and false in SQL: the two sides would disagree.
    call: ({ sql }) => shoal.enqueue(sql, "t", {}, { notify: x("false") }),
    error: TypeError,
    message: 'Invalid options.notify for enqueue(): expected true or false, not "false"',
  }, {
    // NaN would turn the size limit off.
    call: ({ sql }) => shoal.enqueue(sql, "t", { s: "x".repeat(100) }, { maxPayloadBytes: NaN }),
    error: RangeError,
    message:
      "Invalid options.maxPayloadBytes for enqueue(): expected an integer from 1 to 2147483647, not NaN",
  }, {
    call: ({ sql }) => shoal.enqueue(sql, "t", {}, { key: "k".repeat(513) }),
    error: RangeError,
    message:
      'Invalid options.key for enqueue(): expected a string of 1 to 512 characters, not "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk…"',
  }, {
    call: ({ sql }) => shoal.enqueue(sql, x({ name: "t", maxAttempts: 0 }), {}),
    error: RangeError,
    message: "Invalid task.maxAttempts for enqueue(): expected an integer from 1 to 1000, not 0",
  }],
  enqueueMany: [{
    call: () => shoal.enqueueMany(x(undefined), [{ task: "t" }]),
    error: TypeError,
    message: `Invalid db for enqueueMany(): expected ${DB}, not undefined`,
  }, {
    call: ({ sql }) => shoal.enqueueMany(sql, x({ task: "t" })),
    error: TypeError,
    message:
      "Invalid jobs for enqueueMany(): expected an array of jobs ({ task, payload?, ... }), not an object",
  }, {
    call: ({ sql }) => shoal.enqueueMany(sql, x([{ task: "t" }, "t"])),
    error: TypeError,
    message: 'Invalid jobs[1] for enqueueMany(): expected a job ({ task, payload?, ... }), not "t"',
  }, {
    call: ({ sql }) => shoal.enqueueMany(sql, [{ task: "t" }], x(true)),
    error: TypeError,
    message: "Invalid options for enqueueMany(): expected an object, not true",
  }, {
    call: ({ sql }) => shoal.enqueueMany(sql, [{ task: "t" }], { notify: x(0) }),
    error: TypeError,
    message: "Invalid options.notify for enqueueMany(): expected true or false, not 0",
  }, {
    call: ({ sql }) => shoal.enqueueMany(sql, [{ task: "t" }], { maxPayloadBytes: x("1mb") }),
    error: TypeError,
    message:
      'Invalid options.maxPayloadBytes for enqueueMany(): expected an integer from 1 to 2147483647, not "1mb"',
  }, {
    call: ({ sql }) => shoal.enqueueMany(sql, [{ task: "t" }, { task: "t", priority: 1.5 }]),
    error: RangeError,
    message:
      "Invalid jobs[1].priority for enqueueMany(): expected an integer from -32767 to 32767, not 1.5",
  }, {
    call: ({ sql }) => shoal.enqueueMany(sql, [{ task: "t", payload: x(null) }]),
    error: TypeError,
    message: "Invalid jobs[0].payload for enqueueMany(): expected a JSON object, got null",
  }, {
    call: ({ sql }) =>
      shoal.enqueueMany(sql, [{ task: x({ name: "t", queue: "bad name" }), payload: {} }]),
    error: TypeError,
    message:
      `Invalid jobs[0].task.queue for enqueueMany(): expected a queue name (${NAME}), not "bad name"`,
  }],
  defineTask: [{
    call: () => shoal.defineTask(x(undefined)),
    error: TypeError,
    message:
      "Invalid definition for defineTask(): expected a task definition ({ name, handler, ... }), not undefined",
  }, {
    call: () => shoal.defineTask({ name: "bad name", handler: () => {} }),
    error: TypeError,
    message:
      `Invalid definition.name for defineTask(): expected a task name (${NAME}), not "bad name"`,
  }, {
    call: () => shoal.defineTask(x({ name: "t" })),
    error: TypeError,
    message: "Invalid definition.handler for defineTask(): expected a function, not undefined",
  }, {
    call: () => shoal.defineTask(x({ name: "t", handler: () => {}, parse: { n: "number" } })),
    error: TypeError,
    message: "Invalid definition.parse for defineTask(): expected a function, not an object",
  }, {
    call: () => shoal.defineTask({ name: "t", handler: () => {}, maxAttempts: 0 }),
    error: RangeError,
    message:
      "Invalid definition.maxAttempts for defineTask(): expected an integer from 1 to 1000, not 0",
  }, {
    call: () => shoal.defineTask({ name: "t", handler: () => {}, timeoutMs: x("30s") }),
    error: TypeError,
    message:
      'Invalid definition.timeoutMs for defineTask(): expected a positive number of milliseconds up to 2073600000 (24 days), not "30s"',
  }],
};

Deno.test("every function and class lib/mod.ts exports has its argument checks tested here", () => {
  const exported = Object.entries(shoal)
    .filter(([, value]) => typeof value === "function")
    .map(([name]) => name)
    .sort();
  assertEquals(
    exported.filter((name) => !(name in CASES)),
    [],
    "exported without a case in CASES: give each a check at its top (lib/args.ts) and a case",
  );
  assertEquals(Object.keys(CASES).filter((name) => !exported.includes(name)), []);
});

for (const [name, cases] of Object.entries(CASES)) {
  if (!Array.isArray(cases)) continue;
  Deno.test(`${name}() refuses wrong arguments in one line naming it`, async () => {
    await using db = await testDb();
    const stop = new AbortController();
    stop.abort();
    const env: Env = {
      sql: db.sql,
      migrations: await shoal.loadMigrations(),
      stopped: stop.signal,
    };
    // Every case runs, and every one that does not refuse as expected is reported.
    const wrong: string[] = [];
    for (const [i, { call, error, message }] of cases.entries()) {
      let caught: unknown;
      try {
        await call(env);
      } catch (e) {
        caught = e;
      }
      const got = caught instanceof Error ? `${caught.name}: ${caught.message}` : String(caught);
      if (!(caught instanceof error) || caught.message !== message) {
        wrong.push(`case ${i}: expected ${error.name}: ${message}\n  got ${got}`);
      }
      assert(!message.includes("\n"), `case ${i}: one line`);
    }
    assertEquals(wrong, []);
  });
}

Deno.test("the db checks take a transaction and a reserved connection, and ids may be numbers", async () => {
  await using db = await testDb();
  const id = await shoal.startExecution(db.sql, { task: "t" });
  const inTx = await db.sql.begin((tx) => shoal.getExecution(tx as unknown as Sql, x(Number(id))));
  assertEquals(inTx?.id, id);
  const reserved = await db.sql.reserve();
  try {
    assertEquals((await shoal.getExecution(reserved, id))?.status, "pending");
  } finally {
    reserved.release();
  }
});

Deno.test("purgeDead() with a misspelt option purges nothing", async () => {
  await using db = await testDb();
  await shoal.enqueue(db.sql, "t", {}, { maxAttempts: 1 });
  const { jobs } = await shoal.claim(db.sql, {
    queues: ["default"],
    limit: 1,
    workerId: "w",
    visibilityMs: 1000,
  });
  await shoal.fail(db.sql, jobs[0]!, { error: "boom", retryInMs: 0 });
  await db.sql`update shoal.dead_jobs set died_at = now() - interval '2 days'`;
  const olderThanADay = x({ older_than_ms: 86_400_000 });
  await assertRejects(() => shoal.purgeDead(db.sql, olderThanADay), TypeError, "older_than_ms");
  assertEquals((await shoal.listDead(db.sql)).length, 1);
});
