/**
 * `shoal.sql`: call a named SQL function with a JSON argument, for users who write no
 * TypeScript. Payload: `{"function": "schema.name", "args"?: any JSON (default {})}`;
 * shoal runs `schema.name(args::jsonb)` and the function's return value (as jsonb, null
 * for void) is the job's result.
 *
 * Safety: only schemas on the allowlist (`--sql-schemas` / `SHOAL_SQL_SCHEMAS`; empty by
 * default, never `shoal`, `pg_catalog`, `information_schema` or another `pg_` schema).
 * Names are checked here (plain identifiers: a letter or _, then letters, digits or _, at
 * most 63) and again in Postgres, where `shoal.call_sql_task` (sql/functions/sql_task.sql)
 * finds the function by equality in the catalog and quotes only what it found: no string
 * from a payload is ever part of SQL text.
 *
 * Outcome: a refused schema or a missing function fails the job for good; an error the
 * function raises retries with the backoff (its message recorded), then dead-letters.
 * The call commits on its own, before the job's ack: like any handler, the function
 * must be safe to run twice (at-least-once delivery).
 *
 * @module
 */
import { checkOptions, checkStringList } from "./args.ts";
import { type AnyTask, defineTask, PermanentError } from "./tasks.ts";

export interface SqlTaskSettings {
  /** Schemas whose `f(jsonb)` functions may be called. Empty: none. */
  schemas?: string[];
}

/** A plain, unquoted-style identifier (what `--sql-schemas` and payload names accept). */
const IDENTIFIER = /^[A-Za-z_][A-Za-z0-9_]{0,62}$/;
/** Schemas shoal.sql never calls into, whatever the allowlist says. */
const RESERVED = new Set(["shoal", "pg_catalog", "information_schema"]);
/** The SQLSTATEs of shoal.call_sql_task's refusals: not allowed, no such function. */
const REFUSED = new Set(["SH001", "SH002"]);

function reserved(schema: string): boolean {
  return RESERVED.has(schema.toLowerCase()) || schema.toLowerCase().startsWith("pg_");
}

/** Check `--sql-schemas` entries; throws one line naming the first bad one. */
export function checkSqlSchemas(schemas: readonly string[]): string[] {
  checkStringList("checkSqlSchemas", "schemas", schemas);
  return schemas.map((schema) => {
    if (!IDENTIFIER.test(schema)) {
      throw new Error(
        `Invalid sql schema "${
          schema.slice(0, 100)
        }": expected a letter or _, then letters, digits or _ (at most 63)`,
      );
    }
    if (reserved(schema)) {
      throw new Error(`Invalid sql schema "${schema}": shoal.sql never calls functions in it`);
    }
    return schema;
  });
}

/** A checked `shoal.sql` call. */
export interface SqlCall {
  schema: string;
  name: string;
  /** The argument, as JSON text. */
  args: string;
}

/** Check a `shoal.sql` payload; throws one line on the first problem. */
export function parseSqlPayload(payload: Record<string, unknown>): SqlCall {
  const fn = payload.function;
  if (typeof fn !== "string") throw new TypeError('function must be a string "schema.name"');
  const parts = fn.split(".");
  const shown = JSON.stringify(fn.slice(0, 140));
  if (parts.length !== 2 || !parts.every((p) => IDENTIFIER.test(p))) {
    throw new TypeError(
      `function ${shown} is not schema.name (each a letter or _, then letters, digits or _, at most 63)`,
    );
  }
  return {
    schema: parts[0]!,
    name: parts[1]!,
    args: JSON.stringify(payload.args === undefined ? {} : payload.args),
  };
}

/** The `shoal.sql` task; `builtinTasks()` registers it. */
export function sqlTask(settings: SqlTaskSettings = {}): AnyTask {
  checkOptions("sqlTask", settings, "settings");
  checkStringList("sqlTask", "settings.schemas", settings.schemas, { optional: true });
  const schemas = checkSqlSchemas(settings.schemas ?? []);
  return defineTask<SqlCall>({
    name: "shoal.sql",
    parse: parseSqlPayload,
    async handler(call, ctx) {
      const fn = `${call.schema}.${call.name}`;
      if (schemas.length === 0) {
        throw new PermanentError(
          "shoal.sql may not call anything yet: allow schemas with --sql-schemas or SHOAL_SQL_SCHEMAS",
        );
      }
      if (!schemas.includes(call.schema) || reserved(call.schema)) {
        throw new PermanentError(
          `shoal.sql may not call ${fn}: schema ${call.schema} is not in --sql-schemas (SHOAL_SQL_SCHEMAS)`,
        );
      }
      const query = ctx.db<{ result: unknown }[]>`
        select shoal.call_sql_task(${call.schema}::text, ${call.name}::text,
          ${call.args}::text::jsonb, ${schemas}::text[]) as result`;
      // A shutdown, cancel or timeout stops the statement, not only the wait for it.
      const cancel = () => query.cancel();
      ctx.signal.addEventListener("abort", cancel, { once: true });
      try {
        const [row] = await query;
        return row?.result ?? null;
      } catch (error) {
        const code = (error as { code?: unknown }).code;
        const message = error instanceof Error ? error.message : String(error);
        if (typeof code === "string" && REFUSED.has(code)) {
          throw new PermanentError(`shoal.sql cannot call ${fn}: ${message}`, { cause: error });
        }
        throw new Error(`${fn} failed: ${message}`, { cause: error });
      } finally {
        ctx.signal.removeEventListener("abort", cancel);
      }
    },
  });
}
