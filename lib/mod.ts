/**
 * shoal's TypeScript API: define tasks, enqueue them (inside your own transaction if you
 * like), and run shoal's command line from your own entry file so your tasks compile into
 * your own binary.
 *
 * The consumer's entry file defines its tasks and hands the command line to `main`
 * (`deno run -A my_tasks.ts --role consumer --queues emails`):
 *
 * ```ts
 * import { defineTask, main } from "./lib/mod.ts";
 *
 * export const sendWelcome = defineTask<{ userId: number }>({
 *   name: "send_welcome",
 *   queue: "emails",
 *   maxAttempts: 5,
 *   parse: (p) => ({ userId: Number(p.userId) }),
 *   handler: async ({ userId }, ctx) => { ctx.log.info("Welcoming {userId}", { userId }); },
 * });
 *
 * if (import.meta.main) Deno.exit(await main(Deno.args, { tasks: [sendWelcome] }));
 * ```
 *
 * A producer that imports the definition enqueues through it: the payload is type-checked
 * (`{ userId: "1" }` does not compile) and the job goes to `emails` with 5 attempts. One that
 * cannot import it enqueues by name, spelling out what it needs:
 *
 * ```ts
 * import { connect, enqueue } from "./lib/mod.ts";
 * import { sendWelcome } from "./my_tasks.ts";
 *
 * const sql = connect(Deno.env.get("DATABASE_URL")!);
 * await enqueue(sql, sendWelcome, { userId: 1 });
 * await enqueue(sql, "send_welcome", { userId: 1 }, { queue: "emails", maxAttempts: 5 });
 * ```
 *
 * @module
 */
export { main, type MainOptions } from "./cli.ts";
export { connect, type ConnectOptions, type Db, type Sql } from "./db.ts";
export { type ConsumerOptions, runConsumer } from "./consumer.ts";
export { type DeadJob, listDead, purgeDead, retryDead } from "./dead.ts";
export { checkSchema, loadMigrations, migrate } from "./migrate.ts";
export {
  clearConcurrencyLimit,
  type ClearConcurrencyLimitOptions,
  clearFairnessWeight,
  type ClearFairnessWeightOptions,
  clearRateLimit,
  type ClearRateLimitOptions,
  type ConcurrencyLimit,
  type FairnessWeight,
  type FlowStatus,
  flowStatus,
  type HeldKey,
  holdKey,
  type HoldKeyOptions,
  type PausedQueue,
  pauseQueue,
  pruneSlots,
  type RateLimit,
  resumeQueue,
  setConcurrencyLimit,
  type SetConcurrencyLimitOptions,
  setFairnessWeight,
  type SetFairnessWeightOptions,
  setRateLimit,
  type SetRateLimitOptions,
} from "./flow.ts";
export {
  completeJobs,
  type Completion,
  DEFAULT_MAX_CHILDREN,
  fanOut,
  type FanOutJob,
  type FanOutSpec,
} from "./barrier.ts";
export {
  cancelExecution,
  type Execution,
  type ExecutionStatus,
  getExecution,
  listExecutions,
  type StartedExecution,
  startExecution,
  type StartExecutionOptions,
  startWorkflow,
  type WorkflowSpec,
  type WorkflowStep,
} from "./execution.ts";
export { acquire, holdLease, type LeaseTerm, releaseLease, renew } from "./lease.ts";
export { reapOnce, runReaper } from "./reaper.ts";
export {
  listSchedules,
  removeSchedule,
  type ScheduleSpec,
  setScheduleEnabled,
  syncSchedules,
  upsertSchedule,
} from "./schedule.ts";
export { runScheduler, tickOnce } from "./scheduler.ts";
export {
  ack,
  type CheckedJobs,
  claim,
  type DependencyOptions,
  enqueue,
  type Enqueued,
  enqueueMany,
  type EnqueueOptions,
  extend,
  fail,
  type Job,
  type JobSpec,
  release,
  type TaskJobSpec,
} from "./queue.ts";
export {
  checkHttpAllow,
  httpTask,
  type HttpTaskSettings,
  parseRetryAfter,
  signWebhook,
} from "./http_task.ts";
export { checkSqlSchemas, sqlTask, type SqlTaskSettings } from "./sql_task.ts";
export { type QueueStatus, type Status, status, type StatusOptions } from "./status.ts";
export {
  isTraceparent,
  startTracing,
  stopTracing,
  type TracingConfig,
  TracingConfigError,
  tracingFromEnv,
} from "./tracing.ts";
export { type BuiltinSettings, builtinTasks } from "./builtin_tasks.ts";
export type { Tx } from "./job_transaction.ts";
export { listSteps, type StepRow, type StepTotals } from "./steps.ts";
export { emitEvent, EVENT_RETENTION_MS, type EventResult } from "./events.ts";
export { ClaimLostError, SuspendedError } from "./run_job.ts";
export {
  type AnyTask,
  defineTask,
  MAX_RETRY_LATER_MS,
  PermanentError,
  RetryLaterError,
  type StepOptions,
  type TaskContext,
  type TaskDefinition,
  type TaskInput,
  TaskRegistry,
  type WaitOptions,
} from "./tasks.ts";
