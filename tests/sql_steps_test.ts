/**
 * Steps from SQL (sql/functions/steps.sql): `shoal.step_result` and `shoal.record_step`, as a
 * worker in any language calls them inside its own transaction, fenced by the claim's token
 * like ctx.step. Real claims (`shoal.claim_jobs`), real hand-backs and real concurrent
 * sessions against a real Postgres; `shoal execution show` as a real process.
 */
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { runShoal, testDb, waitFor } from "./helpers.ts";
import type { Db, Sql } from "../lib/db.ts";
import { logger } from "../lib/log.ts";
import { ack, claim, enqueue, type JobRef, release } from "../lib/queue.ts";
import {
  checkStepName,
  listSteps,
  LOST_CLAIM_SQLSTATE,
  recordStep,
  suspendJob,
} from "../lib/steps.ts";
import { status } from "../lib/status.ts";
import { defineTask, TaskRegistry } from "../lib/tasks.ts";
import { JobRun } from "../lib/run_job.ts";

/** Claim one job of `queue` as a worker in another language would: plain SQL. */
async function claimSql(sql: Sql, queue = "default"): Promise<JobRef> {
  const [row] = await sql<{ id: string; token: string }[]>`
    select c.id::text as id, c.token::text as token
    from shoal.claim_jobs(array[${queue}::text], 1, 'w-sql', 60000) c`;
  if (row === undefined) throw new Error(`No job of ${queue} to claim`);
  return { id: row.id, token: row.token };
}

async function prepare(sql: Sql): Promise<void> {
  await sql`create table test_effects (job_id bigint not null, effect text not null)`;
}

async function effects(sql: Sql): Promise<string[]> {
  const rows = await sql<{ effect: string }[]>`select effect from test_effects order by effect`;
  return rows.map((r) => r.effect);
}

/** The SQLSTATE of what `fn` rejects with, and its message. */
async function refusedWith(fn: () => Promise<unknown>): Promise<[string, string]> {
  const error = await assertRejects(fn);
  return [String((error as { code?: unknown }).code), error.message];
}

/** Read step `name` the way a worker does: no row (null here) when it has not committed. */
async function stepResult(
  sql: Db,
  job: JobRef,
  name: string,
): Promise<{ result: unknown } | null> {
  const rows = await sql<{ result: unknown }[]>`
    select r.result from shoal.step_result(${job.id}::bigint, ${job.token}::bigint, ${name}) r`;
  assert(rows.length <= 1, `at most one row, got ${rows.length}`);
  return rows[0] ?? null;
}

/** The message of checkStepName()'s refusal of `name` for `fn` (the one wording). */
function tsRefusal(fn: string, name: unknown): string {
  try {
    checkStepName(fn, name);
  } catch (error) {
    return (error as Error).message;
  }
  throw new Error(`checkStepName() took ${JSON.stringify(name)}`);
}

/** How many sessions of this test's database wait for a lock. */
async function lockWaiters(sql: Sql): Promise<number> {
  const [row] = await sql<{ n: number }[]>`
    select count(*)::integer as n from pg_stat_activity
    where datname = current_database() and wait_event_type = 'Lock'`;
  return row!.n;
}

/** A promise and its resolve function (a gate a transaction waits at). */
function gate(): { opened: Promise<void>; open: () => void } {
  let open!: () => void;
  const opened = new Promise<void>((resolve) => open = resolve);
  return { opened, open };
}

Deno.test("shoal.record_step() commits a step with its effects; a stale token raises SH003 and nothing is left", async () => {
  await using db = await testDb();
  await prepare(db.sql);
  await enqueue(db.sql, "t.sql", {});
  const job = await claimSql(db.sql);

  // Recorded with its effect, in one transaction.
  const recorded = await db.sql.begin(async (tx) => {
    await tx`insert into test_effects values (${job.id}::bigint, 'charge')`;
    const [row] = await tx<{ r: unknown }[]>`
      select shoal.record_step(${job.id}::bigint, ${job.token}::bigint, 'charge',
                               '{"receipt": "r-1"}') as r`;
    return row!.r;
  });
  assertEquals(recorded, { receipt: "r-1" });
  assertEquals(await effects(db.sql), ["charge"]);

  // The job is handed back (its token moves on): the old claim's next step is refused, and
  // the effect written before the refusal rolls back with it.
  assertEquals(await release(db.sql, [job]), [job.id]);
  const [code, message] = await refusedWith(() =>
    db.sql.begin(async (tx) => {
      await tx`insert into test_effects values (${job.id}::bigint, 'ship')`;
      await tx`select shoal.record_step(${job.id}::bigint, ${job.token}::bigint, 'ship')`;
    })
  );
  assertEquals(code, LOST_CLAIM_SQLSTATE);
  assertEquals(
    message,
    `Cannot record step "ship" of job ${job.id}: its claim (token ${job.token}) is no longer current`,
  );
  // The read is fenced the same way.
  assertEquals(
    (await refusedWith(() => stepResult(db.sql, job, "charge")))[0],
    LOST_CLAIM_SQLSTATE,
  );
  assertEquals(await effects(db.sql), ["charge"], "the stale claim's effect rolled back");
  assertEquals((await listSteps(db.sql, job.id)).map((s) => s.name), ["charge"]);

  // A job that is gone (acked) refuses its last claim too.
  const again = await claimSql(db.sql);
  assertEquals(await ack(db.sql, [again]), [again.id]);
  assertEquals(
    (await refusedWith(() =>
      db.sql`select shoal.record_step(${again.id}::bigint, ${again.token}::bigint, 'late')`
    ))[0],
    LOST_CLAIM_SQLSTATE,
  );
  assertEquals((await listSteps(db.sql, job.id)).map((s) => s.name), ["charge"]);
});

Deno.test("shoal.record_step(): an effect written in the step's transaction commits only with its record", async () => {
  await using db = await testDb();
  await prepare(db.sql);
  await enqueue(db.sql, "t.sql", {});
  const job = await claimSql(db.sql);

  // The caller rolls back after recording: neither the effect nor the record is kept.
  await assertRejects(
    () =>
      db.sql.begin(async (tx) => {
        await tx`insert into test_effects values (${job.id}::bigint, 'charge')`;
        await tx`select shoal.record_step(${job.id}::bigint, ${job.token}::bigint, 'charge')`;
        throw new Error("the worker fails before its commit");
      }),
    Error,
    "the worker fails before its commit",
  );
  assertEquals(await effects(db.sql), []);
  assertEquals(await stepResult(db.sql, job, "charge"), null, "not recorded");

  // The claim moves on while the step's transaction is open, after its effect was written:
  // the record is refused, and the effect goes with the transaction.
  const written = gate();
  const moved = gate();
  const step = db.sql.begin(async (tx) => {
    await tx`insert into test_effects values (${job.id}::bigint, 'charge')`;
    written.open();
    await moved.opened;
    await tx`select shoal.record_step(${job.id}::bigint, ${job.token}::bigint, 'charge')`;
  });
  await written.opened;
  try {
    assertEquals(await release(db.sql, [job]), [job.id]);
  } finally {
    moved.open();
  }
  const error = await assertRejects(() => step);
  assertEquals((error as { code?: unknown }).code, LOST_CLAIM_SQLSTATE);
  assertEquals(await effects(db.sql), []);
  assertEquals(await listSteps(db.sql, job.id), []);

  // The next claim records it, with its effect.
  const next = await claimSql(db.sql);
  await db.sql.begin(async (tx) => {
    await tx`insert into test_effects values (${next.id}::bigint, 'charge')`;
    await tx`select shoal.record_step(${next.id}::bigint, ${next.token}::bigint, 'charge')`;
  });
  assertEquals(await effects(db.sql), ["charge"]);
  assertEquals(await stepResult(db.sql, next, "charge"), { result: null }, "recorded as JSON null");
});

Deno.test("shoal.record_step(): two sessions recording one step at once: one result wins and both see it", async () => {
  await using db = await testDb();
  await enqueue(db.sql, "t.sql", {});
  const job = await claimSql(db.sql);

  const first = gate();
  const finish = gate();
  const a = db.sql.begin(async (tx) => {
    const [row] = await tx<{ recorded_result: unknown; created: boolean }[]>`
      select * from shoal.record_step_result(${job.id}::bigint, ${job.token}::bigint, 'charge',
                                             '{"by": "a"}')`;
    first.open();
    await finish.opened;
    return row!;
  });
  await first.opened;
  const b = db.sql.begin(async (tx) => {
    const [row] = await tx<{ recorded_result: unknown; created: boolean }[]>`
      select * from shoal.record_step_result(${job.id}::bigint, ${job.token}::bigint, 'charge',
                                             '{"by": "b"}')`;
    return row!;
  });
  try {
    await waitFor(
      "the second session to wait for the job's row",
      async () => await lockWaiters(db.sql) === 1,
    );
  } finally {
    finish.open(); // also when the wait failed: no transaction is left hanging
  }
  const [ra, rb] = await Promise.all([a, b]);
  assertEquals(ra, { recorded_result: { by: "a" }, created: true });
  assertEquals(rb, { recorded_result: { by: "a" }, created: false }, "b sees a's result");
  assertEquals(
    (await listSteps(db.sql, job.id)).map((s) => [s.name, s.result]),
    [["charge", { by: "a" }]],
  );

  // A retry after a lost commit reply gets the recorded result and changes nothing.
  const [retry] = await db.sql<{ r: unknown }[]>`
    select shoal.record_step(${job.id}::bigint, ${job.token}::bigint, 'charge',
                             '{"by": "retry"}') as r`;
  assertEquals(retry!.r, { by: "a" });
  assertEquals((await listSteps(db.sql, job.id)).map((s) => s.result), [{ by: "a" }]);
});

/**
 * One try of step "charge" of `job`, as a worker writes it: read; if not recorded, the effect
 * `who` and the record. `hold` delays the record; `read` is called once the read returned.
 */
function attempt(
  sql: Sql,
  job: JobRef,
  who: string,
  options: { hold?: Promise<void>; read?: () => void; isolation?: string } = {},
): Promise<unknown> {
  return sql.begin(options.isolation ?? "", async (tx) => {
    const done = await stepResult(tx, job, "charge");
    options.read?.();
    if (done !== null) return done.result;
    await tx`insert into test_effects values (${job.id}::bigint, ${who})`;
    await options.hold;
    const [row] = await tx<{ r: unknown }[]>`
      select shoal.record_step(${job.id}::bigint, ${job.token}::bigint, 'charge',
                               ${JSON.stringify({ by: who })}::text::jsonb) as r`;
    return row!.r;
  });
}

/** Start try "a" and hold it after its read; start try "b"; release "a" once "b" waits. */
async function race(
  sql: Sql,
  job: JobRef,
  isolationOfB?: string,
): Promise<[PromiseSettledResult<unknown>, PromiseSettledResult<unknown>]> {
  const finish = gate();
  const read = gate();
  const a = attempt(sql, job, "a", { hold: finish.opened, read: read.open });
  await read.opened;
  const b = attempt(sql, job, "b", { isolation: isolationOfB });
  try {
    await waitFor(
      "the second session to wait for the job's row",
      async () => await lockWaiters(sql) === 1,
    );
  } finally {
    finish.open(); // also when the wait failed: no transaction is left hanging
  }
  return await Promise.allSettled([a, b]) as [
    PromiseSettledResult<unknown>,
    PromiseSettledResult<unknown>,
  ];
}

Deno.test("shoal.step_result() locks the job: a second session of the claim waits, then reads the record and skips the effect", async () => {
  await using db = await testDb();
  await prepare(db.sql);
  await enqueue(db.sql, "t.sql", {});
  const job = await claimSql(db.sql);
  const [a, b] = await race(db.sql, job);
  assertEquals([a, b], [
    { status: "fulfilled", value: { by: "a" } },
    { status: "fulfilled", value: { by: "a" } },
  ]);
  assertEquals(await effects(db.sql), ["a"], "the effect ran once");
});

Deno.test("shoal.step_result() under repeatable read: the session that waited gets 40001 at its record and its effect rolls back", async () => {
  await using db = await testDb();
  await prepare(db.sql);
  await enqueue(db.sql, "t.sql", {});
  const job = await claimSql(db.sql);
  const [a, b] = await race(db.sql, job, "isolation level repeatable read");
  assertEquals(a, { status: "fulfilled", value: { by: "a" } });
  assertEquals(b.status, "rejected");
  const code = ((b as PromiseRejectedResult).reason as { code?: unknown }).code;
  assertEquals(code, "40001", String((b as PromiseRejectedResult).reason));
  assertEquals(await effects(db.sql), ["a"], "the effect ran once");
  // Retried, it reads the record.
  assertEquals(
    await attempt(db.sql, job, "b", { isolation: "isolation level repeatable read" }),
    { by: "a" },
  );
  assertEquals(await effects(db.sql), ["a"]);
});

Deno.test("shoal.step_result() on a redelivered run returns the recorded result; ctx.step replays a step recorded from SQL and SQL reads ctx.step's", async () => {
  await using db = await testDb();
  await prepare(db.sql);
  await enqueue(db.sql, "t.sql", {});
  const first = await claimSql(db.sql);
  assertEquals(await stepResult(db.sql, first, "charge"), null, "no row before it is recorded");
  await db.sql.begin(async (tx) => {
    await tx`insert into test_effects values (${first.id}::bigint, 'charge')`;
    await tx`select shoal.record_step(${first.id}::bigint, ${first.token}::bigint, 'charge',
                                      '{"receipt": "r-42"}')`;
  });

  // Redelivered (handed back, claimed again with a new token).
  assertEquals(await release(db.sql, [first]), [first.id]);
  const second = await claimSql(db.sql);
  assertEquals(second.id, first.id);
  assert(second.token !== first.token, "a new claim, a new token");
  assertEquals(await stepResult(db.sql, second, "charge"), { result: { receipt: "r-42" } });
  assertEquals(await stepResult(db.sql, second, "ship"), null);

  // A TypeScript handler of the same job replays the step and records the next one, which
  // SQL then reads.
  assertEquals(await release(db.sql, [second]), [second.id]);
  const calls: string[] = [];
  const seen: unknown[] = [];
  const task = defineTask({
    name: "t.sql",
    async handler(_p, ctx) {
      seen.push(
        await ctx.step("charge", () => {
          calls.push("charge");
          return { receipt: "again" };
        }),
      );
      await ctx.step("ship", () => {
        calls.push("ship");
        return { parcel: 7 };
      });
      throw new Error("stop before the ack, so the job stays");
    },
  });
  const { jobs } = await claim(db.sql, {
    queues: ["default"],
    limit: 1,
    workerId: "w",
    visibilityMs: 60_000,
  });
  const run = new JobRun(jobs[0]!, {
    sql: db.sql,
    tasks: new TaskRegistry([task]),
    log: logger("consumer"),
    taskTimeoutMs: 10_000,
  });
  await run.settled;
  assertEquals(run.state, "failed");
  assertEquals(calls, ["ship"], "charge was replayed from the SQL record, not run");
  assertEquals(seen, [{ receipt: "r-42" }]);
  assertEquals(await stepResult(db.sql, jobs[0]!, "ship"), { result: { parcel: 7 } });
  assertEquals(await effects(db.sql), ["charge"]);
});

Deno.test("shoal.record_step() and step_result() check their arguments: the name rule, nulls, a sleep's name", async () => {
  await using db = await testDb();
  await enqueue(db.sql, "t.sql", {});
  const job = await claimSql(db.sql);
  for (const bad of ["", "a b", "-x", "x".repeat(129)]) {
    const [code, message] = await refusedWith(() =>
      db.sql`select shoal.record_step(${job.id}::bigint, ${job.token}::bigint, ${bad}::text)`
    );
    assertEquals(code, "22023");
    assertEquals(message, tsRefusal("shoal.record_step", bad), "worded as checkStepName()'s");
    assertEquals((await refusedWith(() => stepResult(db.sql, job, bad)))[0], "22023");
  }
  assertEquals(
    await refusedWith(() =>
      db.sql`select shoal.record_step(${job.id}::bigint, ${job.token}::bigint, null::text)`
    ),
    ["22023", tsRefusal("shoal.record_step", null)],
  );
  assertEquals(
    (await refusedWith(() =>
      db.sql`select shoal.record_step(null::bigint, ${job.token}::bigint, 'charge')`
    ))[0],
    "22023",
  );
  // A name recorded as a sleep is not a step, as ctx.step says.
  assert(await suspendJob(db.sql, job, "cool-off", { ms: 60_000 }) !== null);
  await db.sql`update shoal.jobs set run_at = now() where id = ${job.id}::bigint`;
  const woken = await claimSql(db.sql);
  assertEquals(
    await refusedWith(() =>
      db.sql`select shoal.record_step(${woken.id}::bigint, ${woken.token}::bigint, 'cool-off')`
    ),
    ["22023", `Cannot record step "cool-off" of job ${job.id}: a sleep of that name was recorded`],
  );
  assertEquals(
    await refusedWith(() => stepResult(db.sql, woken, "cool-off")),
    ["22023", `Cannot read step "cool-off" of job ${job.id}: a sleep of that name was recorded`],
  );
  // recordStep() (ctx.step's) goes through the same function: its outcomes are unchanged.
  assertEquals(await recordStep(db.sql, woken, "pack", { box: 1 }), "recorded");
  assertEquals(await recordStep(db.sql, woken, "pack", { box: 2 }), "duplicate");
  assertEquals(await recordStep(db.sql, job, "late", null), "lost");
  assertEquals(
    (await listSteps(db.sql, job.id)).map((s) => [s.name, s.kind, s.result]),
    [["cool-off", "sleep", null], ["pack", "step", { box: 1 }]],
  );
});

Deno.test("a step recorded from SQL shows in shoal execution show and status like a ctx.step one", async () => {
  await using db = await testDb();
  const [started] = await db.sql<{ id: string }[]>`
    select shoal.start_execution(queue => 'orders', task => 'app.ship',
                                 payload => '{"order": 42}')::text as id`;
  const execution = started!.id;
  const job = await claimSql(db.sql, "orders");
  await db.sql`select shoal.record_step(${job.id}::bigint, ${job.token}::bigint, 'charge',
                                        '{"receipt": "r-42"}')`;
  const shown = await runShoal(["execution", "show", execution], { url: db.url });
  assertEquals([shown.code, shown.stderr], [0, ""]);
  assert(shown.stdout.split("\n").includes('    step charge: {"receipt":"r-42"}'), shown.stdout);
  assertEquals((await status(db.sql)).steps, {
    records: 1,
    jobs: 1,
    sleeping: 0,
    waiting: 0,
    exact: true,
  });
});
