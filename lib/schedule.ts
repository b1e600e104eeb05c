/**
 * The schedules table, `shoal.schedules`: every statement on it. Adding, listing, pausing,
 * resuming, removing, and syncing a declarative schedules file; and the scheduler's
 * statements (lib/scheduler.ts runs them in its tick): claiming a batch of due rows, recording
 * baselines, advancing after the fires, disabling or recording an error, and the time until
 * the next row is due. A change to a row wakes a listening scheduler: the trigger function
 * shoal.notify_schedules_changed in sql/functions/.
 *
 * @module
 */
import { checkArray, checkBoolean, checkDb, checkOneOf, checkPool, checkString } from "./args.ts";
import type { Db, Sql } from "./db.ts";
import { checkCron, checkTimeZone } from "./cron.ts";
import { checkName, checkPayload } from "./names.ts";
import { enqueueMany } from "./queue.ts";

/** A schedule as a user declares it. */
export interface ScheduleSpec {
  name: string;
  cron: string;
  task: string;
  /**
   * The queue its jobs go to. Not given (or null): its task's queue in the catalog at each
   * fire (`default` while no consumer registered the task).
   */
  queue?: string | null;
  payload?: Record<string, unknown>;
  /** IANA time zone the cron is read in (default UTC). */
  tz?: string;
  priority?: number;
  /**
   * After downtime: 0 (default) coalesces the missed slots into one fire; N (1 to 1,000)
   * fires each missed slot, oldest first, up to N of them. Either way the schedule then
   * moves to its next future slot.
   */
  backfill?: number;
}

export interface ScheduleRow {
  name: string;
  cron: string;
  tz: string;
  task: string;
  /** Null: its task's queue in the catalog, looked up at each fire. */
  queue: string | null;
  payload: Record<string, unknown>;
  priority: number;
  /** 0: coalesce missed slots; N: fire up to N of them. */
  backfill: number;
  enabled: boolean;
  source: "manual" | "file";
  next_run_at: Date | null;
  last_run_at: Date | null;
  last_error: string | null;
  created_at: Date;
  updated_at: Date;
}

/** Most missed slots a schedule may backfill (the column's check says the same). */
export const MAX_BACKFILL = 1000;

/** The fields a schedule takes; any other is refused, so a misspelt one is not silently lost. */
const SCHEDULE_FIELDS: readonly string[] = [
  "name",
  "cron",
  "task",
  "queue",
  "payload",
  "tz",
  "priority",
  "backfill",
] satisfies (keyof ScheduleSpec)[];

/** Validate a spec at the boundary; returns it normalised (defaults filled in). */
export async function checkSchedule(spec: ScheduleSpec): Promise<Required<ScheduleSpec>> {
  if (spec === null || typeof spec !== "object" || Array.isArray(spec)) {
    throw new TypeError("Invalid schedule: expected an object with name, cron and task");
  }
  const name = checkName("schedule", spec.name);
  // A misspelt "timezone" would otherwise quietly mean UTC.
  const unknown = Object.keys(spec).find((key) => !SCHEDULE_FIELDS.includes(key));
  if (unknown !== undefined) {
    throw new TypeError(
      `Invalid schedule ${name}: unknown field "${unknown}" (the fields are ${
        SCHEDULE_FIELDS.join(", ")
      })`,
    );
  }
  const tz = checkTimeZone(spec.tz ?? "UTC");
  const cron = await checkCron(spec.cron, tz);
  const priority = spec.priority ?? 0;
  if (!Number.isInteger(priority) || Math.abs(priority) > 32767) {
    throw new RangeError(
      `Invalid priority for schedule ${name}: expected an integer from -32767 to 32767`,
    );
  }
  const backfill = spec.backfill ?? 0;
  if (!Number.isInteger(backfill) || backfill < 0 || backfill > MAX_BACKFILL) {
    throw new RangeError(
      `Invalid backfill for schedule ${name}: expected an integer from 0 (coalesce missed ` +
        `slots) to ${MAX_BACKFILL}`,
    );
  }
  const payload = spec.payload ?? {};
  checkPayload(payload);
  return {
    name,
    cron,
    tz,
    task: checkName("task", spec.task),
    queue: spec.queue === undefined || spec.queue === null ? null : checkName("queue", spec.queue),
    payload,
    priority,
    backfill,
  };
}

/**
 * Create or update a schedule. A changed cron or time zone resets next_run_at (the
 * scheduler records a fresh baseline, never a burst). Any change re-enables a row that an
 * error disabled and clears the error; a paused row stays paused.
 */
export async function upsertSchedule(
  db: Db,
  spec: ScheduleSpec,
  source: "manual" | "file" = "manual",
): Promise<"created" | "updated" | "unchanged"> {
  checkDb("upsertSchedule", db);
  checkOneOf("upsertSchedule", "source", source, ["manual", "file"]);
  const s = await checkSchedule(spec);
  const [row] = await db<{ created: boolean; changed: boolean }[]>`
    with before as (select * from shoal.schedules where name = ${s.name}::text for update),
    upserted as (
      insert into shoal.schedules as t (name, cron, tz, task, queue, payload, priority, backfill,
                                        source)
      values (${s.name}::text, ${s.cron}::text, ${s.tz}::text, ${s.task}::text, ${s.queue}::text,
        ${JSON.stringify(s.payload)}::text::jsonb, ${s.priority}::integer, ${s.backfill}::integer,
        ${source}::text)
      on conflict (name) do update
      set cron = excluded.cron, tz = excluded.tz, task = excluded.task, queue = excluded.queue,
          payload = excluded.payload, priority = excluded.priority, backfill = excluded.backfill,
          source = excluded.source,
          next_run_at = case when (t.cron, t.tz) is distinct from (excluded.cron, excluded.tz)
                             then null else t.next_run_at end,
          -- Any change to a row an error disabled is the fix: it runs again. A row the
          -- user paused (no error) stays paused.
          enabled = case when t.last_error is not null then true else t.enabled end,
          last_error = null,
          updated_at = now()
      where (t.cron, t.tz, t.task, t.queue, t.payload, t.priority, t.backfill, t.source)
        is distinct from (excluded.cron, excluded.tz, excluded.task, excluded.queue,
                          excluded.payload, excluded.priority, excluded.backfill,
                          excluded.source)
      returning 1
    )
    select not exists (select 1 from before) as created, exists (select 1 from upserted) as changed`;
  return row!.created ? "created" : row!.changed ? "updated" : "unchanged";
}

export async function listSchedules(db: Db): Promise<ScheduleRow[]> {
  checkDb("listSchedules", db);
  return await db<ScheduleRow[]>`
    select name, cron, tz, task, queue, payload, priority, backfill, enabled, source, next_run_at,
      last_run_at, last_error, created_at, updated_at
    from shoal.schedules order by name`;
}

/**
 * Pause or resume. Resuming clears next_run_at so the scheduler records a baseline and
 * does not fire the slots missed while paused. Returns false when no such schedule.
 */
export async function setScheduleEnabled(db: Db, name: string, enabled: boolean): Promise<boolean> {
  checkDb("setScheduleEnabled", db);
  // Any text: a name no schedule can have finds nothing.
  checkString("setScheduleEnabled", "name", name);
  checkBoolean("setScheduleEnabled", "enabled", enabled);
  const rows = await db`
    update shoal.schedules
    set enabled = ${enabled}::boolean, updated_at = now(),
        next_run_at = case when ${enabled}::boolean and not enabled then null else next_run_at end,
        last_error = case when ${enabled}::boolean then null else last_error end
    where name = ${name}::text
    returning name`;
  return rows.length === 1;
}

/** Remove a schedule; false when there was none. */
export async function removeSchedule(db: Db, name: string): Promise<boolean> {
  checkDb("removeSchedule", db);
  checkString("removeSchedule", "name", name);
  const rows = await db`delete from shoal.schedules where name = ${name}::text returning name`;
  return rows.length === 1;
}

export interface SyncResult {
  created: string[];
  updated: string[];
  removed: string[];
}

/**
 * Make the file-managed schedules exactly `specs`, in one transaction: create and update
 * those named, remove file-managed rows no longer named. Rows added with
 * `shoal schedule add` are left alone (unless the file names them: then the file owns them).
 */
export async function syncSchedules(sql: Sql, specs: ScheduleSpec[]): Promise<SyncResult> {
  checkPool("syncSchedules", sql);
  checkArray("syncSchedules", "specs", specs, "an array of schedules");
  const checked = await Promise.all(specs.map(checkSchedule));
  const names = checked.map((s) => s.name);
  const duplicate = names.find((n, i) => names.indexOf(n) !== i);
  if (duplicate) throw new RangeError(`Invalid schedules: "${duplicate}" is named twice`);
  return await sql.begin(async (tx) => {
    const result: SyncResult = { created: [], updated: [], removed: [] };
    for (const spec of checked) {
      const outcome = await upsertSchedule(tx, spec, "file");
      if (outcome === "created") result.created.push(spec.name);
      if (outcome === "updated") result.updated.push(spec.name);
    }
    const removed = await tx<{ name: string }[]>`
      delete from shoal.schedules
      where source = 'file' and not (name = any(${names}::text[]))
      returning name`;
    result.removed = removed.map((r) => r.name).sort();
    return result;
  });
}

/** Read a schedules file: a JSON array of schedules, or `{"schedules": [...]}`. */
export async function loadSchedulesFile(path: string): Promise<ScheduleSpec[]> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (cause) {
    throw new Error(`Cannot read schedules file ${path}: ${(cause as Error).message}`, { cause });
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (cause) {
    throw new Error(`Cannot parse schedules file ${path}: ${(cause as Error).message}`, { cause });
  }
  const list = Array.isArray(parsed)
    ? parsed
    : (parsed as { schedules?: unknown } | null)?.schedules;
  if (!Array.isArray(list)) {
    throw new Error(`Cannot use schedules file ${path}: expected a JSON array of schedules`);
  }
  const specs: Required<ScheduleSpec>[] = [];
  for (const [i, item] of list.entries()) {
    try {
      specs.push(await checkSchedule(item as ScheduleSpec));
    } catch (cause) {
      throw new Error(
        `Cannot use schedules file ${path}: entry ${i + 1}: ${(cause as Error).message}`,
        { cause },
      );
    }
  }
  // syncSchedules checks this too; checking here refuses the file before any role starts.
  const names = specs.map((s) => s.name);
  const twice = names.findIndex((n, i) => names.indexOf(n) !== i);
  if (twice !== -1) {
    throw new Error(
      `Cannot use schedules file ${path}: entry ${twice + 1}: "${names[twice]}" is named twice`,
    );
  }
  return specs;
}

/** A due schedule locked for firing, with the clock it was found due by. */
export interface DueSchedule extends ScheduleRow {
  /** The database clock (or the test clock) at the claim. */
  db_now: Date;
}

export interface DueScheduleOptions {
  /** Override the database clock (tests). */
  now?: Date | null;
  /** Names to pass over (rows that already failed this tick). */
  skip?: string[];
}

/**
 * The scheduler's claim, inside its transaction: lock up to `limit` due enabled schedules
 * not in `skip` (a row with no next_run_at counts as due: it needs its baseline), most
 * overdue first, SKIP LOCKED so a second scheduler takes other rows or none. A row another
 * scheduler advanced and committed meanwhile is re-checked under its lock and left out.
 */
export async function claimDueSchedules(
  tx: Db,
  options: DueScheduleOptions & { limit: number },
): Promise<DueSchedule[]> {
  const now = options.now ?? null;
  const skip = options.skip ?? [];
  return await tx<DueSchedule[]>`
    select s.*, coalesce(${now}::timestamptz, now()) as db_now from shoal.schedules s
    where s.enabled
      and (s.next_run_at is null or s.next_run_at <= coalesce(${now}::timestamptz, now()))
      and not (s.name = any(${skip}::text[]))
    order by s.next_run_at nulls first, s.name
    limit ${options.limit}::integer
    for update skip locked`;
}

/** Disable a schedule whose cron or time zone cannot be read, recording why. */
export async function disableSchedule(tx: Db, name: string, error: string): Promise<void> {
  await tx`
    update shoal.schedules
    set enabled = false, next_run_at = null, last_error = ${error}::text,
        updated_at = now()
    where name = ${name}::text`;
}

/** A schedule's next slot, as the tick worked it out. */
export interface ScheduleSlot {
  name: string;
  next: Date;
}

/** Record the first slot of schedules that had none, without firing them: one statement. */
export async function setScheduleBaselines(tx: Db, slots: ScheduleSlot[]): Promise<void> {
  if (slots.length === 0) return;
  await tx`
    update shoal.schedules s set next_run_at = u.next
    from unnest(${slots.map((x) => x.name)}::text[],
                ${slots.map((x) => x.next.toISOString())}::timestamptz[]) as u(name, next)
    where s.name = u.name`;
}

/**
 * After a fire: move each schedule to its next slot, record when it ran, clear any error.
 * One statement for the whole batch.
 */
export async function advanceSchedules(
  tx: Db,
  slots: ScheduleSlot[],
  ranAt: Date,
): Promise<void> {
  if (slots.length === 0) return;
  await tx`
    update shoal.schedules s
    set next_run_at = u.next, last_run_at = ${ranAt}::timestamptz, last_error = null
    from unnest(${slots.map((x) => x.name)}::text[],
                ${slots.map((x) => x.next.toISOString())}::timestamptz[]) as u(name, next)
    where s.name = u.name`;
}

/**
 * Record a failure to fire, once per distinct message (an unchanged error is not written
 * again); `disable` also turns the row off. True when the row changed (a new error).
 */
export async function recordScheduleError(
  tx: Db,
  name: string,
  options: { message: string; disable: boolean },
): Promise<boolean> {
  const changed = await tx`
    update shoal.schedules
    set last_error = ${options.message}::text, enabled = not ${options.disable}::boolean,
        updated_at = now()
    where name = ${name}::text and last_error is distinct from ${options.message}::text
    returning name`;
  return changed.length > 0;
}

/**
 * Milliseconds until the soonest enabled schedule not in `skip` is due (at most 0 when one
 * is due now, or needs its first slot worked out), or null when there is none.
 */
export async function nextScheduleDueInMs(
  db: Db,
  options: DueScheduleOptions = {},
): Promise<number | null> {
  const now = options.now ?? null;
  const skip = options.skip ?? [];
  const [due] = await db<{ ms: number | null }[]>`
    select (extract(epoch from min(coalesce(next_run_at, coalesce(${now}::timestamptz, now())))
             - coalesce(${now}::timestamptz, now())) * 1000)::float8 as ms
    from shoal.schedules where enabled and not (name = any(${skip}::text[]))`;
  return due?.ms ?? null;
}

/**
 * Fire a schedule once now, outside its cron (the dashboard's "run now"): its task, queue,
 * payload and priority enqueued as one job without a dedupe key, so it never collides with
 * a slot's fire; next_run_at and last_run_at are left alone. Null when no such schedule.
 */
export async function runScheduleNow(db: Db, name: string): Promise<string | null> {
  checkDb("runScheduleNow", db);
  checkString("runScheduleNow", "name", name);
  const [row] = await db<Pick<ScheduleRow, "task" | "queue" | "payload" | "priority">[]>`
    select task, queue, payload, priority from shoal.schedules where name = ${name}::text`;
  if (!row) return null;
  const [job] = await enqueueMany(db, [{
    task: row.task,
    queue: row.queue ?? undefined,
    payload: row.payload,
    priority: row.priority,
  }]);
  return job!.id;
}
