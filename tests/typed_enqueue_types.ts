/**
 * Compile-time checks of typed enqueue, not a test file: `deno task check` type-checks it,
 * and tests/typed_enqueue_test.ts checks it again and checks that every line marked
 * `@ts-expect-error` is a type error once the marks are removed (so each one fails for the
 * reason it is there, and the file cannot pass by accident). Nothing here ever runs.
 *
 * @module
 */
import {
  type Db,
  defineTask,
  enqueue,
  enqueueMany,
  type FanOutSpec,
  type JobSpec,
  startExecution,
  type TaskContext,
  type TaskInput,
  type TaskJobSpec,
} from "../lib/mod.ts";

/** No parse: producers send the handler's payload. */
const sendWelcome = defineTask<{ userId: number }>({
  name: "types.send_welcome",
  queue: "emails",
  handler: ({ userId }) => userId + 1,
});

/** A parse whose type is inferred: producers send what it returns. */
const resize = defineTask({
  name: "types.resize",
  parse: (p) => ({ width: Number(p.width) }),
  handler: ({ width }) => width * 2,
});

/** A parse that converts: the input type (a string) differs from the handler's (a Date). */
const remind = defineTask<{ at: Date }, { at: string }>({
  name: "types.remind",
  parse: (p) => ({ at: new Date(String(p.at)) }),
  handler: ({ at }) => at.getTime(),
});

// @ts-expect-error without parse, nothing turns the input into the handler's payload
defineTask<{ at: Date }, { at: string }>({ name: "types.no_parse", handler: ({ at }) => at });

/** An interface as the payload (no index signature): accepted. */
interface Invoice {
  invoiceId: string;
  lines: number;
}
const bill = defineTask<Invoice>({ name: "types.bill", handler: ({ lines }) => lines });

/** No payload type at all: any object. */
const ping = defineTask({ name: "types.ping", handler: () => {} });

export async function enqueueChecks(db: Db, invoice: Invoice): Promise<void> {
  await enqueue(db, sendWelcome, { userId: 1 });
  await enqueue(db, sendWelcome, { userId: 1 }, { queue: "other", maxAttempts: 2 });
  // @ts-expect-error a wrong type
  await enqueue(db, sendWelcome, { userId: "1" });
  // @ts-expect-error a missing field
  await enqueue(db, sendWelcome, {});
  // @ts-expect-error a field the task does not take
  await enqueue(db, sendWelcome, { userId: 1, admin: true });
  // @ts-expect-error the payload is required with a definition
  await enqueue(db, sendWelcome);
  // @ts-expect-error an unknown option
  await enqueue(db, sendWelcome, { userId: 1 }, { queues: "x" });

  await enqueue(db, resize, { width: 10 });
  // @ts-expect-error parse's return type is the input
  await enqueue(db, resize, { height: 10 });

  await enqueue(db, remind, { at: "2030-01-01T00:00:00Z" });
  // @ts-expect-error the input is the string parse reads, not the Date the handler gets
  await enqueue(db, remind, { at: new Date() });

  await enqueue(db, bill, invoice);
  // @ts-expect-error an id of the wrong type
  await enqueue(db, bill, { invoiceId: 7, lines: 1 });
  await enqueue(db, ping, { anything: [1, "two"] });

  // By name: exactly as before, unchecked.
  await enqueue(db, "types.send_welcome", { userId: "not checked" });
  await enqueue(db, "types.send_welcome");
  await enqueue(db, "types.send_welcome", {}, { queue: "emails" });
  // @ts-expect-error a name is not a definition, nor is any object
  await enqueue(db, { queue: "emails" }, {});

  const input: TaskInput<typeof remind> = { at: "2030-01-01T00:00:00Z" };
  await enqueue(db, remind, input);
  // @ts-expect-error TaskInput is the input type, not the handler's
  const wrongInput: TaskInput<typeof remind> = { at: new Date() };
  void wrongInput;
}

export async function enqueueManyChecks(db: Db, userIds: number[]): Promise<void> {
  await enqueueMany(db, [
    { task: sendWelcome, payload: { userId: 1 }, priority: 5 },
    { task: "types.by_name", payload: { free: "form" } },
    { task: remind, payload: { at: "2030-01-01T00:00:00Z" } },
  ]);
  await enqueueMany(db, [
    { task: sendWelcome, payload: { userId: 1 } },
    // @ts-expect-error each job is checked against its own task
    { task: remind, payload: { userId: 1 } },
  ]);
  await enqueueMany(db, userIds.map((userId) => ({ task: sendWelcome, payload: { userId } })));
  await enqueueMany(
    db,
    // @ts-expect-error a list built by map is checked too
    userIds.map((userId) => ({ task: sendWelcome, payload: { userId: String(userId) } })),
  );
  // Lists declared with the exported types are accepted as before.
  const named: JobSpec[] = [{ task: "types.by_name" }];
  await enqueueMany(db, named);
  const loose: TaskJobSpec[] = [{ task: sendWelcome, payload: { userId: 1 } }];
  await enqueueMany(db, loose);
  // @ts-expect-error a task is a name or a definition
  await enqueueMany(db, [{ task: 42 }]);
}

export async function startExecutionChecks(db: Db): Promise<void> {
  await startExecution(db, { task: sendWelcome, payload: { userId: 1 }, priority: 1 });
  await startExecution(db, { task: "types.by_name", payload: { free: "form" } });
  // @ts-expect-error an execution's first job is checked like any other
  await startExecution(db, { task: sendWelcome, payload: { userId: "1" } });
}

export const contextChecks = defineTask({
  name: "types.context",
  handler: async (_payload, ctx: TaskContext) => {
    await ctx.enqueue(sendWelcome, { userId: 1 });
    await ctx.enqueue(sendWelcome, { userId: 1 }, { priority: 1 });
    // @ts-expect-error a wrong type, inside a handler too
    await ctx.enqueue(sendWelcome, { userId: "1" });
    await ctx.enqueue("types.by_name", { free: "form" });
    await ctx.enqueue("types.by_name");
    const spec: FanOutSpec = {
      children: [{ task: resize, payload: { width: 1 } }, { task: "types.by_name" }],
      callback: { task: ping, queue: "reports" },
    };
    ctx.fanOut(spec);
  },
});
