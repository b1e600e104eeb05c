/**
 * The dashboard's query and path parameters, validated at the boundary: a name must be a
 * queue, task or schedule name (lib/names.ts), an id a positive integer, a state one of
 * the listed ones, a key of a bounded length. Anything else is a {@link BadRequest}, which
 * the app answers with a 400 naming the parameter.
 *
 * @module
 */
import { isBigintFrom } from "../args.ts";
import { parseDuration } from "../duration.ts";
import { MAX_FAIRNESS_KEY_LENGTH, MAX_KEY_LENGTH, NAME_PATTERN, NAME_RULE } from "../names.ts";

/** A parameter the dashboard cannot use: answered with 400 and this message. */
export class BadRequest extends Error {
  override name = "BadRequest";
}

/** How a value is shown in a message: quoted, cut short. */
function shown(value: string): string {
  return JSON.stringify(value.length > 60 ? value.slice(0, 60) + "..." : value);
}

/** An optional parameter: absent or empty means not given. */
function given(value: string | undefined | null): string | undefined {
  return value === undefined || value === null || value === "" ? undefined : value;
}

/** A queue, task or schedule name, or undefined when not given. */
export function nameParam(param: string, value: string | undefined | null): string | undefined {
  const v = given(value);
  if (v !== undefined && !NAME_PATTERN.test(v)) {
    throw new BadRequest(`Invalid ${param} ${shown(v)}: use ${NAME_RULE}`);
  }
  return v;
}

/** A name that must be there (a path segment). */
export function requiredName(param: string, value: string | undefined | null): string {
  const v = nameParam(param, value);
  if (v === undefined) throw new BadRequest(`Missing ${param}`);
  return v;
}

/** A row id: a positive integer that fits a bigint, or undefined when not given. */
export function idParam(param: string, value: string | undefined | null): string | undefined {
  const v = given(value);
  if (v !== undefined && !isBigintFrom(v, 1)) {
    throw new BadRequest(`Invalid ${param} ${shown(v)}: expected a positive integer id`);
  }
  return v;
}

export function requiredId(param: string, value: string | undefined | null): string {
  const v = idParam(param, value);
  if (v === undefined) throw new BadRequest(`Missing ${param}`);
  return v;
}

/** One of `choices`, or undefined when not given. */
export function choiceParam<T extends string>(
  param: string,
  value: string | undefined | null,
  choices: readonly T[],
): T | undefined {
  const v = given(value);
  if (v !== undefined && !(choices as readonly string[]).includes(v)) {
    throw new BadRequest(`Invalid ${param} ${shown(v)}: expected one of ${choices.join(", ")}`);
  }
  return v as T | undefined;
}

/** A dedupe key (at most 512 characters), or undefined when not given. */
export function keyParam(param: string, value: string | undefined | null): string | undefined {
  const v = given(value);
  if (v !== undefined && (v.length > MAX_KEY_LENGTH || v.includes("\0"))) {
    throw new BadRequest(`Invalid ${param}: expected at most ${MAX_KEY_LENGTH} characters`);
  }
  return v;
}

/**
 * A fairness key (at most 256 characters), or undefined when not given. An empty one cannot
 * be asked for here: it is the key of jobs enqueued without one, and an empty field means
 * "any".
 */
export function fairnessKeyParam(
  param: string,
  value: string | undefined | null,
): string | undefined {
  const v = given(value);
  if (v !== undefined && (v.length > MAX_FAIRNESS_KEY_LENGTH || v.includes("\0"))) {
    throw new BadRequest(
      `Invalid ${param}: expected at most ${MAX_FAIRNESS_KEY_LENGTH} characters`,
    );
  }
  return v;
}

/** A whole number from `min` to `max` that must be there (a form's limit, say). */
export function intParam(
  param: string,
  value: string | undefined | null,
  range: { min: number; max: number },
): number {
  const v = given(value);
  if (v === undefined) throw new BadRequest(`Missing ${param}`);
  const n = /^\d{1,16}$/.test(v) ? Number(v) : NaN;
  if (!Number.isSafeInteger(n) || n < range.min || n > range.max) {
    throw new BadRequest(
      `Invalid ${param} ${shown(v)}: expected a whole number from ${
        range.min.toLocaleString("en-US")
      } to ${range.max.toLocaleString("en-US")}`,
    );
  }
  return n;
}

/**
 * A duration as the command line writes it (`500ms`, `10s`, `5m`, `2h`, `1d`; lib/duration.ts)
 * from `min` to `max` milliseconds, that must be there; returned in milliseconds.
 */
export function durationParam(
  param: string,
  value: string | undefined | null,
  range: { min: number; max: number },
): number {
  const v = given(value);
  if (v === undefined) throw new BadRequest(`Missing ${param}`);
  let ms: number;
  try {
    ms = parseDuration(v);
  } catch (cause) {
    throw new BadRequest(
      `Invalid ${param} ${
        shown(v)
      }: expected a number and a unit (ms, s, m, h, d), like 500ms or 10s`,
      { cause },
    );
  }
  if (ms < range.min || ms > range.max) {
    throw new BadRequest(
      `Invalid ${param} ${shown(v)}: expected from ${range.min} ms to ${
        range.max.toLocaleString("en-US")
      } ms`,
    );
  }
  return ms;
}

/**
 * A flow key as a limit or hold form sends it: `key` (at most 256 characters; the empty key is
 * that of jobs enqueued with neither a concurrency nor a fairness key). Empty means the
 * queue's default (null) unless `exact` says the field is meant as it is, empty too (a row's
 * Clear button for the empty key, or a hold, which always names a key).
 */
export function flowKeyParam(
  param: string,
  value: string | undefined | null,
  exact: boolean,
): string | null {
  const v = value ?? "";
  if (v.length > MAX_FAIRNESS_KEY_LENGTH || v.includes("\0")) {
    throw new BadRequest(
      `Invalid ${param}: expected at most ${MAX_FAIRNESS_KEY_LENGTH} characters`,
    );
  }
  return v === "" && !exact ? null : v;
}

/** Refuse parameters the page does not take: a misspelt filter must not be silently ignored. */
export function onlyParams(url: URL, known: readonly string[]): void {
  for (const name of url.searchParams.keys()) {
    if (!known.includes(name)) {
      throw new BadRequest(
        `Unknown parameter ${shown(name)}${
          known.length ? ` (this page takes ${known.join(", ")})` : ""
        }`,
      );
    }
  }
}
