/**
 * A team's own shoal binary: register your tasks beside the built-ins and hand the
 * command line to shoal's `main`. Every shoal command works on this entry file:
 *
 *   deno run -A examples/my_tasks.ts migrate
 *   deno run -A examples/my_tasks.ts enqueue --task example.send_welcome \
 *     --payload '{"email":"ada@example.com","name":"Ada"}'
 *   deno run -A examples/my_tasks.ts --role consumer --queues emails,reports
 *
 * and it compiles into one binary the same way shoal does (see examples/README.md).
 *
 * @module
 */
import { main } from "../lib/cli.ts";
import { defineTask, PermanentError } from "../lib/tasks.ts";

/** What `example.send_welcome` needs: checked by `parse` before the handler runs. */
export interface Welcome {
  email: string;
  name: string;
}

/** Stand-in for a mail API call; stops early when shoal aborts the handler. */
function deliver(message: string, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason);
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, 50 + message.length);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

/**
 * Sends a welcome mail. A payload that fails `parse` is dead-lettered at once with the
 * reason recorded (retrying would not fix it); a thrown Error is retried with backoff.
 */
export const sendWelcome = defineTask<Welcome>({
  name: "example.send_welcome",
  queue: "emails",
  maxAttempts: 5,
  timeoutMs: 10_000,
  parse(payload): Welcome {
    const { email, name } = payload;
    if (typeof email !== "string" || !/^[^@\s]+@[^@\s]+$/.test(email)) {
      throw new TypeError("email must be an address like ada@example.com");
    }
    if (typeof name !== "string" || name.trim() === "") {
      throw new TypeError("name must be a non-empty string");
    }
    return { email, name: name.trim() };
  },
  async handler({ email, name }, ctx): Promise<void> {
    if (email.endsWith("@example.invalid")) {
      // Known to be undeliverable: dead-letter now instead of retrying 5 times.
      throw new PermanentError(`Cannot deliver to ${email}: the domain does not exist`);
    }
    await deliver(`Welcome aboard, ${name}!`, ctx.signal);
    ctx.log.info("Sent the welcome mail to {email}", { email });
  },
});

/** Logs the email backlog, doing its own (parameterised) query on shoal's pool. */
export const reportBacklog = defineTask({
  name: "example.report_backlog",
  queue: "reports",
  async handler(_payload, ctx): Promise<void> {
    const queue = sendWelcome.queue ?? "default";
    const [row] = await ctx.db<{ waiting: number }[]>`
      select count(*)::integer as waiting from shoal.jobs where queue = ${queue}::text`;
    ctx.log.info("Email backlog: {waiting} jobs waiting", { waiting: row?.waiting ?? 0 });
  },
});

/**
 * A chord's child (see examples/node/ and examples/python/, which start one from SQL): counts
 * the words of its text. Its return value is its result, handed to the callback.
 */
export const countWords = defineTask<{ text: string }>({
  name: "example.count_words",
  queue: "reports",
  parse(payload): { text: string } {
    if (typeof payload.text !== "string") throw new TypeError("text must be a string");
    return { text: payload.text };
  },
  handler: ({ text }) => ({ words: text.split(/\s+/).filter((w) => w !== "").length }),
});

/**
 * A chord's callback: gets its children's results in child order and adds them up. As the
 * execution's last job, its return value becomes the execution's result.
 */
export const sumCounts = defineTask<{ results: { words: number }[] }>({
  name: "example.sum_counts",
  queue: "reports",
  parse(payload): { results: { words: number }[] } {
    const { results } = payload;
    if (!Array.isArray(results) || !results.every((r) => typeof r?.words === "number")) {
      throw new TypeError("results must be the children's {words} counts");
    }
    return { results };
  },
  handler: ({ results }) => ({
    parts: results.length,
    words: results.reduce((sum, r) => sum + r.words, 0),
  }),
});

if (import.meta.main) {
  const tasks = [sendWelcome, reportBacklog, countWords, sumCounts];
  Deno.exit(await main(Deno.args, { tasks }));
}
