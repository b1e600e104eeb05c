/**
 * Option resolution (lib/config.ts) in process: flag, else `SHOAL_*`, else default; each
 * value typed by its option's kind (the type assertions below fail `deno check`, and so
 * this file, if a resolved value loses its type); bad values refused with one line.
 * tests/cli_test.ts and tests/fault/bad_cli_test.ts check the same through real processes.
 */
import { assert, assertEquals } from "./assert.ts";
import {
  DEFAULT_HTTP,
  type OptionName,
  type Options,
  parseCommandLine,
  resolveOptions,
  UsageError,
} from "../lib/config.ts";

/** Resolve `accepted` from `args` and a fake environment (never the test process's own). */
function resolve<N extends OptionName>(
  args: string[],
  env: Record<string, string>,
  accepted: readonly N[],
  command = "--role consumer",
): Options<N> {
  return resolveOptions(command, parseCommandLine(args), accepted, { get: (name) => env[name] });
}

/** The UsageError resolving throws: its message, which must be one line. */
function refusal(args: string[], env: Record<string, string>, accepted: OptionName[]): string {
  try {
    resolve(args, env, accepted);
  } catch (error) {
    if (!(error instanceof UsageError)) throw new Error(`expected a UsageError, got ${error}`);
    assert(!error.message.includes("\n"), error.message);
    return error.message;
  }
  throw new Error(`resolving ${JSON.stringify(args)} ${JSON.stringify(env)} did not throw`);
}

/** true only when A and B are the same type (not merely assignable either way). */
type Equal<A, B> = (<T>() => T extends A ? 1 : 2) extends (<T>() => T extends B ? 1 : 2) ? true
  : false;

Deno.test("resolveOptions() types each value by its option's kind, choices and default", () => {
  const opts = resolve([], {}, [
    "concurrency",
    "queues",
    "listen",
    "visibility-timeout",
    "poll-interval",
    "role",
    "log-level",
    "http",
    "database-url",
    "task",
  ]);
  // Checked by `deno check`: a value typed string | number | ... would fail to compile here.
  const types: [
    Equal<typeof opts.concurrency, number>,
    Equal<typeof opts.queues, string[]>,
    Equal<typeof opts.listen, boolean>,
    Equal<typeof opts["visibility-timeout"], number>,
    Equal<typeof opts["poll-interval"], number | undefined>,
    Equal<typeof opts.role, "consumer" | "reaper" | "scheduler" | "all" | undefined>,
    Equal<typeof opts["log-level"], "trace" | "debug" | "info" | "warning" | "error" | "fatal">,
    Equal<typeof opts.http, string | undefined>,
    Equal<typeof opts["database-url"], string | undefined>,
    Equal<typeof opts.task, string | undefined>,
    Equal<
      keyof typeof opts,
      | "concurrency"
      | "queues"
      | "listen"
      | "visibility-timeout"
      | "poll-interval"
      | "role"
      | "log-level"
      | "http"
      | "database-url"
      | "task"
    >,
  ] = [true, true, true, true, true, true, true, true, true, true, true];
  assertEquals(types.length, 11);
  // And the values are of those types at run time: the defaults, converted.
  assertEquals(opts, {
    concurrency: 10,
    queues: ["default"],
    listen: true,
    "visibility-timeout": 30_000,
    "poll-interval": undefined,
    role: undefined,
    "log-level": "info",
    http: undefined,
    "database-url": undefined,
    task: undefined,
  });
});

Deno.test("resolveOptions() takes the flag over SHOAL_*, SHOAL_* over the default", () => {
  const accepted = ["concurrency", "queues", "shutdown-grace", "listen", "prefetch"] as const;
  const env = {
    SHOAL_CONCURRENCY: "5",
    SHOAL_QUEUES: "from-env",
    SHOAL_SHUTDOWN_GRACE: "2m",
    SHOAL_LISTEN: "off",
  };
  assertEquals(resolve(["--concurrency", "7", "--queues", "a, b,,c"], env, accepted), {
    concurrency: 7, // the flag
    queues: ["a", "b", "c"], // the flag, split and trimmed
    "shutdown-grace": 120_000, // the environment
    listen: false, // the environment
    prefetch: 500, // the default
  });
  assertEquals(resolve(["--listen", "--shutdown-grace=1s"], env, accepted).listen, true);
  assertEquals(resolve(["--no-listen"], {}, accepted).listen, false);
  // An empty variable is unset; a variable of an option the command does not take is ignored.
  assertEquals(resolve([], { SHOAL_CONCURRENCY: "", SHOAL_LIMIT: "x" }, accepted).concurrency, 10);
  // DATABASE_URL, not SHOAL_DATABASE_URL; options marked flag-only never read the environment.
  const url = "postgres://u@db.example:5432/app";
  assertEquals(
    resolve([], { DATABASE_URL: url, SHOAL_PRIORITY: "9" }, ["database-url", "priority"]),
    { "database-url": url, priority: 0 },
  );
  // SHOAL_HTTP as a boolean: on is the loopback default, off is no server.
  assertEquals(resolve([], { SHOAL_HTTP: "true" }, ["http"]).http, DEFAULT_HTTP);
  assertEquals(resolve(["--http"], {}, ["http"]).http, DEFAULT_HTTP);
  assertEquals(resolve([], { SHOAL_HTTP: "off" }, ["http"]).http, undefined);
  assertEquals(resolve(["--role", "all"], { SHOAL_ROLE: "reaper" }, ["role"]).role, "all");
  assertEquals(resolve([], { SHOAL_ROLE: "reaper" }, ["role"]).role, "reaper");
});

Deno.test("resolveOptions() refuses bad values with one line naming the flag or variable", () => {
  const cases: [string[], Record<string, string>, OptionName[], string][] = [
    [
      ["--concurrency", "1.5"],
      {},
      ["concurrency"],
      'Invalid --concurrency: "1.5" is not an integer',
    ],
    [[], { SHOAL_CONCURRENCY: "0" }, ["concurrency"], "Invalid SHOAL_CONCURRENCY: 0 is below 1"],
    [
      ["--concurrency", "10001"],
      {},
      ["concurrency"],
      "Invalid --concurrency: 10001 is above 10000",
    ],
    [
      ["--role", "boss"],
      {},
      ["role"],
      'Invalid --role: "boss" is not one of consumer, reaper, scheduler, all',
    ],
    [
      [],
      { SHOAL_LISTEN: "maybe" },
      ["listen"],
      'Invalid SHOAL_LISTEN: "maybe" is not true or false',
    ],
    [
      ["--visibility-timeout", "50ms"],
      {},
      ["visibility-timeout"],
      "Invalid --visibility-timeout: 50ms is too short",
    ],
    [[], { SHOAL_QUEUES: " , " }, ["queues"], "Invalid SHOAL_QUEUES: the list is empty"],
    [["--queues", "a,b c"], {}, ["queues"], 'Invalid --queues: "b c" is not a name'],
    [
      ["--http", "nowhere"],
      {},
      ["http"],
      'Invalid --http: "nowhere" is not host:port (e.g. 127.0.0.1:9464)',
    ],
    [
      ["--queues", "a"],
      {},
      ["concurrency"],
      "Invalid flag --queues: shoal --role consumer does not take it",
    ],
    [
      [],
      { DATABASE_URL: "mysql://x" },
      ["database-url"],
      'Cannot use the database URL: scheme "mysql" is not postgres or postgresql',
    ],
  ];
  for (const [args, env, accepted, says] of cases) {
    assertEquals(refusal(args, env, accepted), says, JSON.stringify([args, env]));
  }
  // The flag wins outright: a bad variable under a good flag is never read.
  assertEquals(resolve(["--concurrency", "3"], { SHOAL_CONCURRENCY: "x" }, ["concurrency"]), {
    concurrency: 3,
  });
});

Deno.test("parseCommandLine() suggests the nearest flag for a mistyped one, and none for a stranger", () => {
  const said = (args: string[]): string => {
    try {
      parseCommandLine(args);
    } catch (error) {
      if (!(error instanceof UsageError)) throw error;
      return error.message;
    }
    throw new Error(`${args.join(" ")} was accepted`);
  };
  assertEquals(
    said(["--role", "consumer", "--concurency", "3"]),
    "Unknown option '--concurency': did you mean --concurrency?",
  );
  assertEquals(
    said(["--visibilty-timeout", "5s"]),
    "Unknown option '--visibilty-timeout': did you mean --visibility-timeout?",
  );
  assertEquals(said(["--bogus"]), "Unknown option '--bogus'");
  assertEquals(said(["--qu"]), "Unknown option '--qu'");
});
