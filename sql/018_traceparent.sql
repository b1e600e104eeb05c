-- shoal 018: the W3C trace context a job was enqueued under (issue 16, traces).
--
-- A producer with an active OpenTelemetry span (or one that passes a traceparent, from any
-- language) stores it with the job; a consumer with tracing on links each run's span to it
-- (lib/tracing.ts). Null for every job enqueued without one: a null column costs a job
-- nothing but its bit in the null bitmap, which shoal.jobs rows already carry (key,
-- execution_id). It moves with the job to the dead-letter table and back on retry.
--
-- Only the version 00 form is stored: "00-<32 hex trace id>-<16 hex span id>-<2 hex flags>",
-- lower case. The full format check is made where a traceparent enters (TypeScript's
-- isTraceparent, and shoal.traceparent_error in sql/functions/queue.sql, called by
-- shoal.enqueue, shoal.enqueue_many and shoal.fan_out). The constraint is the last line and
-- only checks the shape: Postgres evaluates a CHECK on every UPDATE of a row (each claim,
-- heartbeat and retry of a job), and a length costs nothing there where a regular
-- expression would cost every one of them. NOT VALID: the column is new, every existing row
-- is null, and validating would scan the table for nothing.
alter table shoal.jobs add column traceparent text,
  add constraint jobs_traceparent_shape check (octet_length(traceparent) = 55) not valid;
alter table shoal.dead_jobs add column traceparent text;
