/**
 * The assertions the suite uses, on top of node:assert/strict (the role @std/assert
 * would fill; JSR is not reachable from our build machines).
 */
import assert from "@std/assert";

export { assert };

export function assertEquals<T>(actual: T, expected: T, message?: string): void {
  assert.deepStrictEqual(actual, expected, message);
}

/** Await `fn` and check it rejects with `ErrorClass` whose message includes `includes`. */
export async function assertRejects(
  fn: () => Promise<unknown>,
  // deno-lint-ignore no-explicit-any
  ErrorClass?: new (...args: any[]) => Error,
  includes?: string,
): Promise<Error> {
  let caught: unknown;
  try {
    await fn();
  } catch (error) {
    caught = error;
  }
  assert.ok(caught !== undefined, "Expected the function to reject, but it resolved");
  if (ErrorClass) {
    assert.ok(
      caught instanceof ErrorClass,
      `Expected ${ErrorClass.name}, got ${caught instanceof Error ? caught.name : typeof caught}: ${
        caught instanceof Error ? caught.message : String(caught)
      }`,
    );
  }
  if (includes) {
    assert.ok(
      (caught as Error).message.includes(includes),
      `Expected message to include "${includes}": ${(caught as Error).message}`,
    );
  }
  return caught as Error;
}

/** Check `value` is neither null nor undefined (and narrow its type). */
export function assertExists<T>(value: T, message?: string): asserts value is NonNullable<T> {
  assert.ok(value !== null && value !== undefined, message ?? "Expected a value, got " + value);
}
