/**
 * Runtime checks of the arguments of every function lib/mod.ts exports. `deno run` does not
 * type-check a team's entry file, and JavaScript callers have no types at all: a wrong
 * argument is refused at the call, in one line naming the function and the argument
 * (`Invalid options.limit for listDead(): expected an integer from 1 to 2147483647, not 0`),
 * instead of reaching postgres.js (a syntax error, a null parameter), a timer (NaN) or
 * passing silently.
 *
 * Each checker takes the function as its caller writes it (`"claim"`, `"TaskRegistry.add"`,
 * `"new RetryLaterError"`), the argument's path (`"options.limit"`) and the value. It throws
 * a TypeError for a value of the wrong kind and a RangeError for one of the right kind out of
 * range. Names, keys and payloads keep their own checks (lib/names.ts); the checks of
 * shoal's own shapes (a job ref, a lease term, a migration) are built from these, beside
 * their types.
 *
 * @module
 */
import { MAX_TIMER_MS } from "./duration.ts";
import { NAME_PATTERN, NAME_RULE } from "./names.ts";

/** The largest Postgres `integer`: the cap of a limit or a count sent as one. */
export const MAX_INT4 = 2_147_483_647;
/**
 * The longest delay, age or retention in milliseconds: 100 years. Far longer is a mistake
 * (a value in microseconds, say), and past a few thousand centuries Postgres's timestamps
 * overflow mid-statement.
 */
export const MAX_SPAN_MS = 3_155_760_000_000;
/** The longest timer, re-exported for callers that check durations here. */
export { MAX_TIMER_MS };

/** The largest `bigint`, as text (ids and tokens are bigints, strings in JavaScript). */
const MAX_INT8_TEXT = "9223372036854775807";
const DIGITS = /^[0-9]+$/;

interface Optional {
  /** Accept `undefined` (an omitted option). */
  optional?: boolean;
}

interface Range extends Optional {
  min: number;
  max: number;
}

/** The value as a message shows it: a short string quoted, a number as it is, else its kind. */
export function shown(value: unknown): string {
  if (value === null || value === undefined) return String(value);
  switch (typeof value) {
    case "string":
      return JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}…` : value);
    case "number":
    case "boolean":
      return String(value);
    case "bigint":
      return `${value}n`;
    case "function":
      return "a function";
    case "symbol":
      return "a symbol";
  }
  if (Array.isArray(value)) return "an array";
  if (value instanceof URL) return JSON.stringify(value.href);
  if (value instanceof Date) return Number.isNaN(value.getTime()) ? "an invalid Date" : "a Date";
  return "an object";
}

/**
 * The one-line error every checker throws, for a value named by `subject` (`options.limit
 * for listDead()`; the CLI's `--key`): `Invalid <subject>: expected <expected>, not <value>`.
 */
export function refusal(
  subject: string,
  expected: string,
  value: unknown,
  Kind: typeof TypeError | typeof RangeError = TypeError,
): Error {
  return new Kind(`Invalid ${subject}: expected ${expected}, not ${shown(value)}`);
}

/** refusal() for the argument `arg` of the function `fn`. */
function invalid(
  fn: string,
  arg: string,
  expected: string,
  value: unknown,
  Kind: typeof TypeError | typeof RangeError = TypeError,
): Error {
  return refusal(`${arg} for ${fn}()`, expected, value, Kind);
}

/** Whether `value` is a postgres.js handle: a pool, a transaction or a reserved connection. */
function isHandle(value: unknown): boolean {
  // Every postgres.js handle is a tagged-template function carrying the same helpers; a pool
  // from connect() has begin() too. `unsafe` and `array` are on all three, and on nothing
  // a caller would pass by mistake (the postgres factory itself has neither).
  const handle = value as { unsafe?: unknown; array?: unknown };
  return typeof value === "function" && typeof handle.unsafe === "function" &&
    typeof handle.array === "function";
}

/** A database handle: a pool from connect(), a transaction, or a reserved connection. */
export function checkDb(fn: string, value: unknown, arg = "db"): void {
  if (!isHandle(value)) {
    throw invalid(fn, arg, "a database handle from connect() (a pool or a transaction)", value);
  }
}

/** A pool from connect() (the function opens its own transactions). */
export function checkPool(fn: string, value: unknown, arg = "sql"): void {
  if (!isHandle(value)) throw invalid(fn, arg, "a pool from connect()", value);
  if (typeof (value as { begin?: unknown }).begin !== "function") {
    throw new TypeError(
      `Invalid ${arg} for ${fn}(): expected a pool from connect(), not a transaction or a reserved connection`,
    );
  }
}

/** An object (options, a spec): not null, an array or a function; `what` names it. */
export function checkObject(
  fn: string,
  arg: string,
  value: unknown,
  opts: Optional & { what?: string } = {},
): void {
  if (value === undefined && opts.optional) return;
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw invalid(fn, arg, opts.what ?? "an object", value);
  }
}

/** An array; `what` says of what, for the message ("an array of job refs"). */
export function checkArray(
  fn: string,
  arg: string,
  value: unknown,
  what = "an array",
  opts: Optional = {},
): void {
  if (value === undefined && opts.optional) return;
  if (!Array.isArray(value)) throw invalid(fn, arg, what, value);
}

/**
 * An options object, or undefined (every option omitted). With `known`, any other key is
 * refused: for a function that does more when an option is missing (purgeDead() deletes
 * every dead job), a misspelt option must not count as missing.
 */
export function checkOptions(
  fn: string,
  value: unknown,
  arg = "options",
  known?: readonly string[],
): void {
  checkObject(fn, arg, value, { optional: true });
  if (known === undefined || value === undefined) return;
  const unknown = Object.keys(value as object).find((key) => !known.includes(key));
  if (unknown !== undefined) {
    throw new TypeError(
      `Invalid ${arg} for ${fn}(): unknown option ${JSON.stringify(unknown.slice(0, 40))} (known: ${
        known.join(", ")
      })`,
    );
  }
}

/** An integer from `min` to `max`. */
export function checkInteger(fn: string, arg: string, value: unknown, range: Range): void {
  if (value === undefined && range.optional) return;
  if (!isIntegerIn(value, range.min, range.max)) {
    throw integerRefusal(`${arg} for ${fn}()`, value, range.min, range.max);
  }
}

/** Whether `value` is an integer from `min` to `max`. */
export function isIntegerIn(value: unknown, min: number, max: number): value is number {
  return typeof value === "number" && Number.isInteger(value) && value >= min && value <= max;
}

/**
 * The refusal of a value that is not an integer from `min` to `max`: a TypeError for
 * another kind, a RangeError for a number out of range. With isIntegerIn(), for checks on a
 * per-job path that build no message unless they refuse.
 */
export function integerRefusal(subject: string, value: unknown, min: number, max: number): Error {
  const Kind = typeof value === "number" ? RangeError : TypeError;
  return refusal(subject, `an integer from ${min} to ${max}`, value, Kind);
}

/** A finite number from `min` to `max` (fractions allowed). */
export function checkNumber(fn: string, arg: string, value: unknown, range: Range): void {
  if (value === undefined && range.optional) return;
  const expected = `a number from ${range.min} to ${range.max}`;
  if (typeof value !== "number") throw invalid(fn, arg, expected, value);
  if (!Number.isFinite(value) || value < range.min || value > range.max) {
    throw invalid(fn, arg, expected, value, RangeError);
  }
}

/**
 * A string; non-empty unless `empty`, or null when `nullable`. Postgres text cannot hold
 * NUL: refused too.
 */
export function checkString(
  fn: string,
  arg: string,
  value: unknown,
  opts: Optional & { empty?: boolean; nullable?: boolean } = {},
): void {
  if ((value === undefined && opts.optional) || (value === null && opts.nullable)) return;
  if (typeof value !== "string" || (value === "" && !opts.empty)) {
    const expected = (opts.empty ? "a string" : "a non-empty string") +
      (opts.nullable ? " or null" : "");
    throw invalid(fn, arg, expected, value);
  }
  if (value.includes("\0")) {
    throw new TypeError(`Invalid ${arg} for ${fn}(): contains a NUL character`);
  }
}

/** true or false (a string "false" is truthy in JavaScript and false in Postgres). */
export function checkBoolean(fn: string, arg: string, value: unknown, opts: Optional = {}): void {
  if (value === undefined && opts.optional) return;
  if (typeof value !== "boolean") throw invalid(fn, arg, "true or false", value);
}

/** A valid Date (an ISO string is not one: the caller converts). */
export function checkDate(fn: string, arg: string, value: unknown, opts: Optional = {}): void {
  if (value === undefined && opts.optional) return;
  if (!(value instanceof Date) || Number.isNaN(value.getTime())) {
    throw invalid(fn, arg, "a valid Date", value);
  }
}

/** An AbortSignal: what stops a role. */
export function checkSignal(fn: string, arg: string, value: unknown): void {
  if (!(value instanceof AbortSignal)) {
    throw invalid(fn, arg, "an AbortSignal (an AbortController's signal)", value);
  }
}

export function checkFunction(fn: string, arg: string, value: unknown, opts: Optional = {}): void {
  if (value === undefined && opts.optional) return;
  if (typeof value !== "function") throw invalid(fn, arg, "a function", value);
}

/** One of a few strings. */
export function checkOneOf(
  fn: string,
  arg: string,
  value: unknown,
  choices: readonly string[],
  opts: Optional = {},
): void {
  if (value === undefined && opts.optional) return;
  if (typeof value !== "string" || !choices.includes(value)) {
    throw invalid(fn, arg, choices.map((c) => JSON.stringify(c)).join(" or "), value);
  }
}

/** A queue, task or schedule name (NAME_PATTERN). */
export function checkNameArg(
  fn: string,
  arg: string,
  kind: "queue" | "task" | "schedule",
  value: unknown,
  opts: Optional = {},
): void {
  if (value === undefined && opts.optional) return;
  if (!isName(value)) throw nameRefusal(`${arg} for ${fn}()`, kind, value);
}

/** Whether `value` is a queue, task or schedule name. */
export function isName(value: unknown): value is string {
  return typeof value === "string" && NAME_PATTERN.test(value);
}

/** The refusal of a value that is not a queue, task or schedule name. */
export function nameRefusal(
  subject: string,
  kind: "queue" | "task" | "schedule",
  value: unknown,
): Error {
  return refusal(subject, `a ${kind} name (${NAME_RULE})`, value);
}

/** An array of queue or task names; at least one unless `empty`. */
export function checkNameList(
  fn: string,
  arg: string,
  kind: "queue" | "task",
  value: unknown,
  opts: { empty?: boolean } = {},
): void {
  if (!Array.isArray(value) || (value.length === 0 && !opts.empty)) {
    const expected = opts.empty
      ? `an array of ${kind} names`
      : `a non-empty array of ${kind} names`;
    throw invalid(fn, arg, expected, value);
  }
  value.forEach((name, i) => checkNameArg(fn, `${arg}[${i}]`, kind, name));
}

/** An array of strings (any, empty ones included: their own check says what is wrong). */
export function checkStringList(
  fn: string,
  arg: string,
  value: unknown,
  opts: Optional = {},
): void {
  if (value === undefined && opts.optional) return;
  if (!Array.isArray(value)) throw invalid(fn, arg, "an array of strings", value);
  value.forEach((item, i) => {
    if (typeof item !== "string") throw invalid(fn, `${arg}[${i}]`, "a string", item);
  });
}

/** Whether a string of digits is a bigint from `min` (0 or 1) up. */
function bigintInRange(digits: string, min: 0 | 1): boolean {
  const text = digits.replace(/^0+(?=.)/, "");
  if (text.length > 19 || (text.length === 19 && text > MAX_INT8_TEXT)) return false;
  return !(min === 1 && text === "0");
}

/**
 * Whether `value` is a bigint from `min` (0 or 1) up: a string of digits, as postgres.js
 * returns it, or a safe integer.
 */
export function isBigintFrom(value: unknown, min: 0 | 1): boolean {
  if (typeof value === "string") return DIGITS.test(value) && bigintInRange(value, min);
  return typeof value === "number" && Number.isSafeInteger(value) && value >= min;
}

/** A bigint from `min` (0 or 1) up; the message is built only when refused (per-job paths). */
function checkBigint(fn: string, arg: string, value: unknown, min: 0 | 1, what: string): void {
  if (isBigintFrom(value, min)) return;
  const expected = `a ${
    min === 1 ? "positive" : "non-negative"
  } integer ${what} as a string or number`;
  const wrongKind = typeof value === "string" ? !DIGITS.test(value) : typeof value !== "number";
  throw invalid(fn, arg, expected, value, wrongKind ? TypeError : RangeError);
}

/** A row id (a job, an execution, a dead job): a positive bigint. */
export function checkId(fn: string, arg: string, value: unknown): void {
  checkBigint(fn, arg, value, 1, "id");
}

/** A fencing token (of a claim or a lease term): a bigint from 0. */
export function checkToken(fn: string, arg: string, value: unknown): void {
  checkBigint(fn, arg, value, 0, "token");
}

/** A signed bigint as a string (a job's fair_seq, say). */
export function checkBigintText(fn: string, arg: string, value: unknown): void {
  const unsigned = typeof value === "string" && value.startsWith("-") ? value.slice(1) : value;
  if (typeof unsigned !== "string" || !DIGITS.test(unsigned)) {
    throw invalid(fn, arg, "an integer as a string", value);
  }
  if (!bigintInRange(unsigned, 0)) throw invalid(fn, arg, "a bigint", value, RangeError);
}

/** A `file:` (or other) URL of a directory: ends in "/", or files resolve beside it. */
export function checkDirectoryUrl(
  fn: string,
  arg: string,
  value: unknown,
  opts: Optional = {},
): void {
  if (value === undefined && opts.optional) return;
  if (!(value instanceof URL) || !value.pathname.endsWith("/")) {
    throw invalid(fn, arg, 'a URL of a directory, ending in "/"', value);
  }
}
