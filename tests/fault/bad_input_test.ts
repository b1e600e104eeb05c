/**
 * Bad input at every entrance (issue 6), in process against real Postgres: payloads that
 * are not objects, nested too deeply or too large, from TypeScript and from SQL; invalid
 * queue, task and schedule names; SQL-injection strings in every name and key; invalid cron
 * strings and time zones; malformed schedule files. Each is refused with one clear line (or,
 * for keys and payload text, stored literally), nothing is inserted by a refused call, and
 * the same pool keeps serving: a good enqueue right after succeeds. The command line is
 * covered by bad_cli_test.ts, handlers by bad_handlers_test.ts.
 */
import { assert, assertEquals } from "../assert.ts";
import { testDb } from "../helpers.ts";
import type { Db, Sql } from "../../lib/db.ts";
import { checkFanOut } from "../../lib/barrier.ts";
import { listDead, purgeDead, retryDead } from "../../lib/dead.ts";
import { cancelExecution } from "../../lib/execution.ts";
import { checkPayload, MAX_PAYLOAD_DEPTH } from "../../lib/names.ts";
import { claim, enqueue, enqueueMany } from "../../lib/queue.ts";
import {
  listSchedules,
  loadSchedulesFile,
  removeSchedule,
  setScheduleEnabled,
  upsertSchedule,
} from "../../lib/schedule.ts";
import { tickOnce } from "../../lib/scheduler.ts";
import { defineTask } from "../../lib/tasks.ts";
import { INJECTIONS } from "./injections.ts";

/** A canary table the injections above would drop. */
async function plantCanary(sql: Sql): Promise<void> {
  await sql`create table canary (x integer)`;
  await sql`insert into canary values (1)`;
}

async function assertCanaryAlive(sql: Sql): Promise<void> {
  const [row] = await sql<{ n: number }[]>`select count(*)::int as n from canary`;
  assertEquals(row?.n, 1, "the canary table survived with its row");
}

async function jobCount(db: Db): Promise<number> {
  const [row] = await db<{ n: number }[]>`select count(*)::int as n from shoal.jobs`;
  return row!.n;
}

/** The error's message: one line, and it says `says`. */
function assertOneLine(error: unknown, says: string | RegExp): void {
  const message = (error as Error).message;
  assert(!message.includes("\n"), `a one-line message: ${JSON.stringify(message)}`);
  assert(
    typeof says === "string" ? message.includes(says) : says.test(message),
    `expected ${says} in: ${message.slice(0, 300)}`,
  );
}

/** Run `fn`, which must throw; returns what it threw. */
async function refused(fn: () => unknown): Promise<unknown> {
  try {
    await fn();
  } catch (error) {
    return error;
  }
  throw new Error("expected a refusal, but the call succeeded");
}

/** `{"a":{"a":...{}}}` nested `depth` objects deep (the outer one included). */
function nested(depth: number): Record<string, unknown> {
  let value: Record<string, unknown> = {};
  for (let i = 1; i < depth; i++) value = { a: value };
  return value;
}

function nestedText(depth: number): string {
  return '{"a":'.repeat(depth - 1) + "{}" + "}".repeat(depth - 1);
}

/** Depth of a parsed JSON value, without recursion. */
function depthOf(value: unknown): number {
  let depth = 0;
  let level: unknown[] = [value];
  while (level.length > 0) {
    depth++;
    level = level.flatMap((v) => v !== null && typeof v === "object" ? Object.values(v) : [])
      .filter((v) => v !== null && typeof v === "object");
  }
  return depth;
}

Deno.test("a payload that is not a JSON object is refused from TypeScript and SQL, nothing inserted", async () => {
  await using db = await testDb();
  const notObjects: [unknown, string][] = [
    [[1, 2], "array"],
    ["text", "string"],
    [42, "number"],
    [null, "null"],
    [true, "boolean"],
    [new Date(0), "object"],
    [new Map(), "object"],
  ];
  for (const [payload, kind] of notObjects) {
    const error = await refused(() => enqueue(db.sql, "t", payload as Record<string, unknown>));
    assert(error instanceof TypeError, String(error));
    assertOneLine(error, `Invalid payload for enqueue(): expected a JSON object, got ${kind}`);
  }
  const circular: Record<string, unknown> = { a: 1 };
  circular.self = circular;
  for (
    const [payload, says] of [[circular, "circular structure"], [{ n: 1n }, "BigInt"]] as const
  ) {
    const error = await refused(() => enqueue(db.sql, "t", payload));
    assertOneLine(error, `Invalid payload for enqueue(): cannot be serialised as JSON: `);
    assertOneLine(error, says);
  }
  for (const text of ["[1,2]", '"text"', "42", "null", "true"]) {
    for (const call of ["enqueue", "enqueue_many"] as const) {
      const error = await refused(() =>
        call === "enqueue"
          ? db.sql`select shoal.enqueue('q', 't', ${text}::text::jsonb)`
          : db.sql`select * from shoal.enqueue_many(jsonb_build_array(
              jsonb_build_object('task', 't', 'payload', ${text}::text::jsonb)))`
      );
      assertOneLine(error, "payload must be a JSON object, not ");
    }
  }
  const error = await refused(() => db.sql`select shoal.enqueue('q', 't', null::text::jsonb)`);
  assertOneLine(error, "payload must be a JSON object, not null");
  assertEquals(await jobCount(db.sql), 0, "nothing inserted");
  await enqueue(db.sql, "t", { ok: true }); // the same pool still serves
  assertEquals(await jobCount(db.sql), 1);
});

Deno.test(`a payload nested deeper than ${MAX_PAYLOAD_DEPTH} levels is one clear error in TypeScript; Postgres refuses what it cannot parse`, async () => {
  await using db = await testDb();
  // At the limit: accepted, stored, and claimed back whole.
  const id = await enqueue(db.sql, "t", nested(MAX_PAYLOAD_DEPTH), { queue: "deep" });
  const { jobs } = await claim(db.sql, {
    queues: ["deep"],
    limit: 1,
    workerId: "test",
    visibilityMs: 10_000,
  });
  assertEquals(jobs[0]?.id, id);
  assertEquals(depthOf(jobs[0]!.payload), MAX_PAYLOAD_DEPTH);
  // Past it, and far past it (JSON.stringify itself overflows at about 100,000): no stack
  // overflow escapes, the message says what is wrong.
  for (const depth of [MAX_PAYLOAD_DEPTH + 1, 10_000, 200_000]) {
    const error = await refused(() => enqueue(db.sql, "t", nested(depth)));
    assertOneLine(error, `Invalid payload for enqueue(): `);
    assertOneLine(error, `nested deeper than ${MAX_PAYLOAD_DEPTH} levels`);
  }
  // Arrays count as levels too; brackets inside strings do not.
  assertOneLine(
    await refused(() => checkPayload({ a: JSON.parse("[".repeat(1000) + "]".repeat(1000)) })),
    "nested deeper than",
  );
  checkPayload({ s: "[{".repeat(5000) });
  // Fan-out children and schedules use the same check.
  assertOneLine(
    await refused(() =>
      checkFanOut({
        children: [{ task: "t", payload: nested(MAX_PAYLOAD_DEPTH + 1) }],
        callback: { task: "t" },
      })
    ),
    "nested deeper than",
  );
  assertOneLine(
    await refused(() =>
      upsertSchedule(db.sql, {
        name: "deep",
        cron: "* * * * *",
        task: "t",
        payload: nested(MAX_PAYLOAD_DEPTH + 1),
      })
    ),
    "nested deeper than",
  );
  // SQL from any language: Postgres parses 10,000 levels (a consumer claims such a job
  // whole), and refuses 100,000 with its own one-line error; the session keeps serving.
  const [deep] = await db.sql<{ id: string }[]>`
    select shoal.enqueue('sql-deep', 't', ${nestedText(10_000)}::text::jsonb) as id`;
  const claimed = await claim(db.sql, {
    queues: ["sql-deep"],
    limit: 1,
    workerId: "test",
    visibilityMs: 10_000,
  });
  assertEquals(claimed.jobs[0]?.id, deep!.id);
  assertEquals(depthOf(claimed.jobs[0]!.payload), 10_000);
  const error = await refused(() =>
    db.sql`select shoal.enqueue('q', 't', ${nestedText(100_000)}::text::jsonb)`
  );
  assertOneLine(error, "stack depth limit exceeded");
  assertEquals(await jobCount(db.sql), 2, "only the two accepted jobs");
  await db.sql`select 1`;
});

Deno.test("a payload over the size limit is refused alike from TypeScript and SQL, with the limit configurable", async () => {
  await using db = await testDb();
  // The default, 1 MiB: TypeScript and SQL.
  const big = { s: "x".repeat(1024 * 1024) };
  assertOneLine(
    await refused(() => enqueue(db.sql, "t", big)),
    /^Invalid payload for enqueue\(\): \d+ bytes, over the limit of 1048576 bytes$/,
  );
  assertOneLine(
    await refused(() =>
      db.sql`select shoal.enqueue('q', 't', ${JSON.stringify(big)}::text::jsonb)`
    ),
    /payload is \d+ bytes, over the limit of 1048576 bytes/,
  );
  // A configured limit (--max-payload in TypeScript, shoal.max_payload_bytes in SQL) is
  // measured the same way on both sides: Postgres's text form, one space after ":" and ",".
  const limit = 100;
  const fits = { s: "y".repeat(limit - 9) }; // {"s": "yyy..."} is limit - 9 + 9 bytes
  const over = { s: "y".repeat(limit - 8) };
  await enqueue(db.sql, "t", fits, { maxPayloadBytes: limit });
  assertOneLine(
    await refused(() => enqueue(db.sql, "t", over, { maxPayloadBytes: limit })),
    `Invalid payload for enqueue(): ${limit + 1} bytes, over the limit of ${limit} bytes`,
  );
  await db.sql.begin(async (tx) => {
    await tx`select set_config('shoal.max_payload_bytes', ${String(limit)}, true)`;
    await tx`select shoal.enqueue('q', 't', ${JSON.stringify(fits)}::text::jsonb)`;
    const overText = JSON.stringify(over);
    for (
      const statement of [
        () => tx.savepoint((sp) => sp`select shoal.enqueue('q', 't', ${overText}::text::jsonb)`),
        () =>
          tx.savepoint((sp) =>
            sp`select * from shoal.enqueue_many(jsonb_build_array(
              jsonb_build_object('task', 't', 'payload', ${overText}::text::jsonb)))`
          ),
      ]
    ) {
      assertOneLine(
        await refused(statement),
        `payload is ${limit + 1} bytes, over the limit of ${limit} bytes`,
      );
    }
  });
  assertEquals(await jobCount(db.sql), 2, "only the two payloads within the limit");
});

Deno.test("invalid queue, task and schedule names are refused everywhere, nothing inserted", async () => {
  await using db = await testDb();
  const badNames = [
    "",
    " ",
    "a b",
    "x".repeat(129),
    "é",
    "-dash",
    "semi;colon",
    "new\nline",
    ...INJECTIONS,
  ];
  for (const name of badNames) {
    assertOneLine(
      await refused(() => enqueue(db.sql, name)),
      "Invalid task for enqueue(): expected a task name",
    );
    assertOneLine(
      await refused(() => enqueue(db.sql, "t", {}, { queue: name })),
      "Invalid options.queue for enqueue(): expected a queue name",
    );
    assertOneLine(
      await refused(() => enqueueMany(db.sql, [{ task: "t" }, { task: name }])),
      "Invalid jobs[1].task for enqueueMany(): expected a task name",
    );
    assertOneLine(
      await refused(() => defineTask({ name, handler: () => {} })),
      "Invalid definition.name for defineTask(): expected a task name",
    );
    assertOneLine(
      await refused(() => upsertSchedule(db.sql, { name, cron: "* * * * *", task: "t" })),
      "Invalid schedule name",
    );
    for (const [queue, task] of [["q", name], [name, "t"]] as [string, string][]) {
      assertOneLine(
        await refused(() => db.sql`select shoal.enqueue(${queue}::text, ${task}::text)`),
        "queue and task must be names of 1 to 128 letters",
      );
    }
  }
  // 128 characters is the longest name.
  await enqueue(db.sql, "t".repeat(128), {}, { queue: "q".repeat(128) });
  assertEquals(await jobCount(db.sql), 1);
  assertEquals((await listSchedules(db.sql)).length, 0);
});

Deno.test("SQL-injection strings in every name and key are refused or stored literally, never executed", async () => {
  await using db = await testDb();
  await plantCanary(db.sql);
  for (const [i, text] of INJECTIONS.entries()) {
    // Keys and payloads take any text: stored exactly as given.
    const id = await enqueue(db.sql, "t", { [text]: text }, {
      queue: `q${i}`,
      key: text,
      fairnessKey: text,
    });
    const again = await enqueue(db.sql, "t", {}, { queue: `q${i}`, key: text });
    assertEquals(again, id, "the same key finds the same job");
    const [row] = await db.sql<{ key: string; fairness_key: string; payload: unknown }[]>`
      select key, fairness_key, payload from shoal.jobs where id = ${id}::bigint`;
    assertEquals(row, { key: text, fairness_key: text, payload: { [text]: text } });
    const [sqlRow] = await db.sql<{ id: string }[]>`
      select shoal.enqueue('sql', 't', '{}', key => ${text}::text,
        fairness_key => ${text}::text) as id`;
    const [stored] = await db.sql<{ key: string; fairness_key: string }[]>`
      select key, fairness_key from shoal.jobs where id = ${sqlRow!.id}::bigint`;
    assertEquals(stored, { key: text, fairness_key: text });
    // Names are refused (checked above); the admin calls that take a name find nothing,
    // those that take an id refuse the text before any SQL is sent.
    assertEquals(await setScheduleEnabled(db.sql, text, false), false);
    assertEquals(await removeSchedule(db.sql, text), false);
    assertEquals((await listDead(db.sql, { queue: text })).length, 0);
    assertEquals(await purgeDead(db.sql, { queue: text }), 0);
    assertOneLine(
      await refused(() => retryDead(db.sql, text)),
      "Invalid id for retryDead(): expected a positive integer id",
    );
    assertOneLine(
      await refused(() => cancelExecution(db.sql, text)),
      "Invalid id for cancelExecution(): expected a positive integer id",
    );
  }
  await assertCanaryAlive(db.sql);
  assertEquals(await jobCount(db.sql), 2 * INJECTIONS.length);
});

Deno.test("invalid cron strings and time zones are refused when added, and disable only their own row when stored by SQL", async () => {
  await using db = await testDb();
  const crons: [string, string][] = [
    ["", "expected 5 fields"],
    ["* * * *", "expected 5 fields"],
    ["* * * * * * *", "expected 5 fields"],
    ["@daily", "expected 5 fields"],
    ["61 * * * *", "Cannot parse cron expression"],
    ["*/0 * * * *", "Cannot parse cron expression"],
    ["* * 31 2 *", "Cannot parse cron expression"],
    ["x'); drop table canary; -- * * *", "Cannot parse cron expression"],
    ["0 0 * * *\nfoo", "Cannot parse cron expression"],
  ];
  for (const [cron, says] of crons) {
    const error = await refused(() => upsertSchedule(db.sql, { name: "s", cron, task: "t" }));
    assert(error instanceof RangeError, String(error));
    // The expression is echoed as given; the rest of the message is one sentence.
    assert((error as Error).message.includes(says), (error as Error).message);
  }
  for (const tz of ["", "Mars/Olympus", "UTC+5", "x".repeat(65), "Europe/Paris'; --"]) {
    const error = await refused(() =>
      upsertSchedule(db.sql, { name: "s", cron: "* * * * *", task: "t", tz })
    );
    assertOneLine(error, "Invalid time zone");
  }
  assertEquals((await listSchedules(db.sql)).length, 0);

  // Rows written by plain SQL skip those checks: the scheduler disables each bad row once,
  // records why, and still handles the good row in the same tick.
  await db.sql`
    insert into shoal.schedules (name, cron, tz, task, queue, payload)
    values ('bad-cron', '61 * * * *', 'UTC', 't', 'default', '{}'),
           ('bad-tz', '* * * * *', 'Mars/Olympus', 't', 'default', '{}'),
           ('good', '* * * * *', 'UTC', 't', 'default', '{}')`;
  const result = await tickOnce(db.sql);
  assertEquals(result.disabled, 2);
  assertEquals(result.baselined, 1);
  const rows = new Map((await listSchedules(db.sql)).map((r) => [r.name, r]));
  assertEquals(rows.get("bad-cron")?.enabled, false);
  assert(rows.get("bad-cron")?.last_error?.includes("Cannot parse cron"), "cron error recorded");
  assertEquals(rows.get("bad-tz")?.enabled, false);
  assert(rows.get("bad-tz")?.last_error?.includes("Invalid time zone"), "tz error recorded");
  assertEquals(rows.get("good")?.enabled, true);
  assert(rows.get("good")?.next_run_at !== null, "the good row got its baseline");
  // Disabled: the next tick does not touch them again.
  const second = await tickOnce(db.sql);
  assertEquals(second.disabled + second.failed, 0);
});

Deno.test("loadSchedulesFile() refuses a malformed schedules file with one line naming the file and entry", async () => {
  const dir = await Deno.makeTempDir({ prefix: "shoal_bad_schedules_" });
  try {
    const cases: [string, string][] = [
      ["", "Cannot parse schedules file"],
      ["{not json", "Cannot parse schedules file"],
      ['{"schedules": 3}', "expected a JSON array of schedules"],
      ["null", "expected a JSON array of schedules"],
      ['"text"', "expected a JSON array of schedules"],
      ["[1]", "entry 1: Invalid schedule"],
      ["[null]", "entry 1: Invalid schedule"],
      ['[{"name": "a", "cron": "* * * * *"}]', "entry 1: Invalid task name"],
      ['[{"name": "a", "cron": "61 * * * *", "task": "t"}]', "entry 1: Cannot parse cron"],
      ['[{"name": "a", "cron": "* * * * *", "task": "t", "tz": "Nowhere"}]', "Invalid time zone"],
      ['[{"name": "a b", "cron": "* * * * *", "task": "t"}]', "entry 1: Invalid schedule name"],
      [
        '[{"name": "a", "cron": "* * * * *", "task": "t", "timezone": "Europe/Paris"}]',
        'entry 1: Invalid schedule a: unknown field "timezone" (the fields are name, cron, task, queue, payload, tz, priority, backfill)',
      ],
      ["[[]]", "entry 1: Invalid schedule: expected an object"],
      [
        '[{"name": "a", "cron": "* * * * *", "task": "t", "payload": [1]}]',
        "entry 1: Invalid payload",
      ],
      [
        '[{"name": "a", "cron": "* * * * *", "task": "t", "priority": 1e9}]',
        "entry 1: Invalid priority",
      ],
      [
        '[{"name": "a", "cron": "* * * * *", "task": "t"}, {"name": "a", "cron": "* * * * *", "task": "u"}]',
        'entry 2: "a" is named twice',
      ],
    ];
    for (const [i, [text, says]] of cases.entries()) {
      const path = `${dir}/s${i}.json`;
      await Deno.writeTextFile(path, text);
      const error = await refused(() => loadSchedulesFile(path));
      assertOneLine(error, says);
      assert((error as Error).message.includes(path), (error as Error).message);
    }
    assertOneLine(
      await refused(() => loadSchedulesFile(`${dir}/missing.json`)),
      "Cannot read schedules file",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
