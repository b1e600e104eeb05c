/**
 * The guards lib/db.ts puts around postgres.js 3.4.9's connection-loss bugs: the one
 * uncaught error a role rides out (and only that one), and the backoff the roles wait with
 * while the database is away.
 */
import { assert, assertEquals } from "../assert.ts";
import { backoffWithJitter, isDriverWriteAfterClose } from "../../lib/db.ts";

const DB_MODULE = new URL("../../lib/db.ts", import.meta.url).href;
const LOG_MODULE = new URL("../../lib/log.ts", import.meta.url).href;
const CONFIG = new URL("../../deno.json", import.meta.url).pathname;

/** The error as postgres.js throws it from its deferred write (stack as Deno prints it). */
function driverError(file: string, fn = "Immediate.nextWrite"): TypeError {
  const error = new TypeError("Cannot read properties of null (reading 'write')");
  error.stack = `TypeError: ${error.message}\n    at ${fn} (${file}:255:22)\n` +
    "    at Immediate.callback (ext:deno_node/internal/timers.mjs:4:3069)";
  return error;
}

Deno.test("isDriverWriteAfterClose() recognises postgres.js's write after close, and nothing else", () => {
  const cache = "file:///root/.cache/deno/npm/registry.npmjs.org/postgres/3.4.9/src/connection.js";
  assert(isDriverWriteAfterClose(driverError(cache)));
  assert(isDriverWriteAfterClose(driverError("/app/node_modules/postgres/src/connection.js")));
  assert(!isDriverWriteAfterClose(driverError("file:///app/lib/connection.js")));
  assert(!isDriverWriteAfterClose(driverError(cache, "Immediate.somethingElse")));
  const other = new TypeError("Cannot read properties of null (reading 'end')");
  other.stack = driverError(cache).stack!.replace("'write'", "'end'");
  assert(!isDriverWriteAfterClose(other));
  assert(!isDriverWriteAfterClose(new Error("Cannot read properties of null (reading 'write')")));
  assert(!isDriverWriteAfterClose("Cannot read properties of null (reading 'write')"));
});

/**
 * Run a process that installs the guard and then throws `throwing` from a timer inside a
 * file at `file` (relative to a temporary directory); returns its exit code and output.
 */
async function crashFrom(file: string, throwing: string): Promise<{ code: number; out: string }> {
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/${file}`;
    await Deno.mkdir(path.slice(0, path.lastIndexOf("/")), { recursive: true });
    await Deno.writeTextFile(
      path,
      `import { setImmediate } from "node:timers";
export function later() {
  setImmediate(function nextWrite() { ${throwing} });
}`,
    );
    const main = `${dir}/main.ts`;
    await Deno.writeTextFile(
      main,
      `import { tolerateDriverWriteAfterClose } from "${DB_MODULE}";
import { setupLogging } from "${LOG_MODULE}";
import { later } from "./${file}";
await setupLogging({ level: "info", format: "json" });
tolerateDriverWriteAfterClose();
later();
setTimeout(() => Deno.stdout.writeSync(new TextEncoder().encode("still serving\\n")), 200);`,
    );
    const result = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--config", CONFIG, main],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const decoder = new TextDecoder();
    return {
      code: result.code,
      out: decoder.decode(result.stdout) + decoder.decode(result.stderr),
    };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("tolerateDriverWriteAfterClose() keeps serving through that error, logging one warning", async () => {
  const { code, out } = await crashFrom(
    "node_modules/postgres/src/connection.js",
    "const socket = null; socket.write('x');",
  );
  assertEquals(code, 0, out);
  assert(out.includes("still serving"), out);
  const warnings = out.split("\n").filter((l) => l.includes("porsager/postgres#1154"));
  assertEquals(warnings.length, 1, out);
});

Deno.test("tolerateDriverWriteAfterClose() leaves every other uncaught error fatal", async () => {
  for (
    const [file, throwing] of [
      // The same TypeError from shoal's own code.
      ["lib/connection.js", "const socket = null; socket.write('x');"],
      // Another error from postgres.js.
      ["node_modules/postgres/src/connection.js", "throw new RangeError('boom');"],
    ]
  ) {
    const { code, out } = await crashFrom(file!, throwing!);
    assertEquals(code, 1, out);
    assert(/Uncaught (TypeError: Cannot read properties of null|RangeError: boom)/.test(out), out);
    assert(!out.includes("still serving"), out);
  }
});

Deno.test("backoffWithJitter() doubles from its base, stays within its cap, and jitters down to half", () => {
  const low = () => 0;
  const high = () => 0.999999;
  assertEquals([1, 2, 3, 4, 5, 6].map((n) => backoffWithJitter(n, 1000, 15_000, high)), [
    1000,
    2000,
    4000,
    8000,
    15_000,
    15_000,
  ]);
  assertEquals([1, 2, 3, 4, 5].map((n) => backoffWithJitter(n, 1000, 15_000, low)), [
    500,
    1000,
    2000,
    4000,
    7500,
  ]);
  for (let n = 1; n < 100; n++) {
    const ms = backoffWithJitter(n, 300, 2000);
    assert(ms >= 100 && ms <= 2000, `attempt ${n}: ${ms}`);
  }
  assertEquals(backoffWithJitter(1, 50, 2000, low), 100); // never a busy loop
});
