/**
 * Validation of the names and payloads that enter shoal, shared by TypeScript enqueue,
 * the CLI and task definitions. The SQL functions check the same rules again.
 *
 * @module
 */

/** Queue and task names: 1 to 128 of letters, digits and `_.:-`, starting with a letter or digit. */
export const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$/;
/** NAME_PATTERN in words, for messages. */
export const NAME_RULE = "1 to 128 letters, digits or _.:- starting with a letter or digit";
/** The default payload size limit; Postgres reads its own from `shoal.max_payload_bytes`. */
export const DEFAULT_MAX_PAYLOAD_BYTES = 1_048_576;
/** The longest dedupe key, in characters. */
export const MAX_KEY_LENGTH = 512;
/** The longest execution key (idempotent start), in characters. */
export const MAX_EXECUTION_KEY_LENGTH = 512;
/** The execution key's rule in words, for messages (shoal.start_execution_result checks it too). */
export const EXECUTION_KEY_RULE =
  `1 to ${MAX_EXECUTION_KEY_LENGTH} printable characters (no control characters)`;
/** C0 controls (NUL included), DEL and C1 controls: what would break a key's one-line display. */
// Unicode category Cc: exactly U+0000-U+001F and U+007F-U+009F.
const CONTROL_CHARACTER = /\p{Cc}/u;

/**
 * Throw unless `key` is a valid execution key: one line naming it as `what` says
 * (`options.key for startExecution()`, `--key`): a TypeError, a RangeError when it is only
 * too long.
 */
export function checkExecutionKey(what: string, key: unknown): string {
  if (typeof key === "string" && key.length > 0 && key.length <= MAX_EXECUTION_KEY_LENGTH) {
    if (!CONTROL_CHARACTER.test(key)) return key;
    throw new TypeError(
      `Invalid ${what}: contains a control character; use ${EXECUTION_KEY_RULE}`,
    );
  }
  const shown = typeof key === "string" ? `a string of ${key.length} characters` : typeof key;
  const Kind = typeof key === "string" && key.length > MAX_EXECUTION_KEY_LENGTH
    ? RangeError
    : TypeError;
  throw new Kind(`Invalid ${what}: expected ${EXECUTION_KEY_RULE}, not ${shown}`);
}
/** The longest fairness key, in characters. */
export const MAX_FAIRNESS_KEY_LENGTH = 256;
/**
 * Deepest nesting of objects and arrays a payload may have. Postgres parses jsonb
 * recursively and refuses somewhere past 12,000 levels (it depends on max_stack_depth),
 * with "stack depth limit exceeded"; real payloads nest a few levels. Refusing far below
 * that here gives one clear error, never a stack overflow on either side.
 */
export const MAX_PAYLOAD_DEPTH = 1000;
/** A `\u0000` escape in JSON text (not an escaped backslash followed by "u0000"). */
const JSON_NUL = /(?:^|[^\\])(?:\\\\)*\\u0000/;

/** Throw unless `name` is a valid queue or task name. */
export function checkName(kind: "queue" | "task" | "schedule", name: unknown): string {
  if (typeof name !== "string" || !NAME_PATTERN.test(name)) {
    const shown = typeof name === "string" ? JSON.stringify(name.slice(0, 140)) : typeof name;
    throw new TypeError(
      `Invalid ${kind} name ${shown}: use ${NAME_RULE}`,
    );
  }
  return name;
}

/** Number of ":" and "," separators in the JSON form of `value`. */
function separators(value: unknown): number {
  if (value === null || typeof value !== "object") return 0;
  if (Array.isArray(value)) {
    return Math.max(0, value.length - 1) +
      value.reduce((n: number, v) => n + separators(v === undefined ? null : v), 0);
  }
  let count = 0;
  let keys = 0;
  for (const [, v] of Object.entries(value)) {
    if (v === undefined || typeof v === "function" || typeof v === "symbol") continue;
    keys++;
    count += 1 + separators(v);
  }
  return count + Math.max(0, keys - 1);
}

/**
 * True when the JSON text nests objects and arrays deeper than `max`. Scans the text (no
 * recursion, so no stack to overflow), skipping brackets inside strings.
 */
function nestedDeeperThan(json: string, max: number): boolean {
  let depth = 0;
  let inString = false;
  for (let i = 0; i < json.length; i++) {
    const c = json.charCodeAt(i);
    if (inString) {
      if (c === 92) i++; // a backslash escapes the next character
      else if (c === 34) inString = false;
    } else if (c === 34) inString = true;
    else if (c === 123 || c === 91) {
      if (++depth > max) return true;
    } else if (c === 125 || c === 93) depth--;
  }
  return false;
}

/** How messages name a payload unless told: `Invalid payload: ...`. */
const PAYLOAD = (): string => "payload";

/**
 * Throw unless `payload` is a plain JSON object within the size limit; returns its JSON.
 * `subject` names it in the message (`payload for enqueue()`), called only on a refusal.
 */
export function checkPayload(
  payload: unknown,
  maxBytes: number = DEFAULT_MAX_PAYLOAD_BYTES,
  subject: () => string = PAYLOAD,
): string {
  if (
    payload === null || typeof payload !== "object" || Array.isArray(payload) ||
    (Object.getPrototypeOf(payload) !== Object.prototype &&
      Object.getPrototypeOf(payload) !== null)
  ) {
    const kind = payload === null ? "null" : Array.isArray(payload) ? "array" : typeof payload;
    throw new TypeError(`Invalid ${subject()}: expected a JSON object, got ${kind}`);
  }
  let json: string;
  try {
    json = JSON.stringify(payload);
  } catch (cause) {
    // JSON.stringify recurses: a payload nested tens of thousands deep overflows the stack.
    const why = cause instanceof RangeError
      ? `nested deeper than ${MAX_PAYLOAD_DEPTH} levels`
      : String((cause as Error).message).split("\n")[0]; // V8 explains a cycle over lines
    throw new TypeError(`Invalid ${subject()}: cannot be serialised as JSON: ${why}`, { cause });
  }
  // Nesting deeper than the limit takes at least two characters per level: short payloads
  // (the common case) need no scan.
  if (json.length > 2 * MAX_PAYLOAD_DEPTH && nestedDeeperThan(json, MAX_PAYLOAD_DEPTH)) {
    throw new RangeError(`Invalid ${subject()}: nested deeper than ${MAX_PAYLOAD_DEPTH} levels`);
  }
  // jsonb cannot store NUL (Postgres rejects the whole statement): refuse it here, clearly.
  if (json.includes("\\u0000") && JSON_NUL.test(json)) {
    throw new TypeError(
      `Invalid ${subject()}: contains a NUL character (\\u0000), which Postgres cannot store`,
    );
  }
  // Postgres measures its own text form of jsonb, which puts a space after every ":" and
  // ",": count those too, so both sides agree on what "over the limit" means. Each UTF-16
  // unit is at most 3 UTF-8 bytes and each separator one unit, so a payload under a
  // quarter of the limit needs no exact count (the common case: no encoding, no walk).
  if (json.length * 4 <= maxBytes) return json;
  const bytes = new TextEncoder().encode(json).length + separators(payload);
  if (bytes > maxBytes) {
    throw new RangeError(
      `Invalid ${subject()}: ${bytes} bytes, over the limit of ${maxBytes} bytes`,
    );
  }
  return json;
}
