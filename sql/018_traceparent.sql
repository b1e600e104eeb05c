-- shoal 018: the W3C trace context a job was enqueued under (issue 16, traces).
--
-- A producer with an active OpenTelemetry span (or one that passes a traceparent, from any
-- language) stores it with the job; a consumer with tracing on links each run's span to it
-- (lib/tracing.ts). Null for every job enqueued without one: a null column costs a job
-- nothing but its bit in the null bitmap, which shoal.jobs rows already carry (key,
-- execution_id). It moves with the job to the dead-letter table and back on retry.
--
-- Only the version 00 form is stored: "00-<32 hex trace id>-<16 hex span id>-<2 hex flags>",
-- lower case (TypeScript and shoal.enqueue check it before this; the constraint is the
-- last line). NOT VALID: the column is new, every existing row is null, and validating would
-- scan the table for nothing.
alter table shoal.jobs add column traceparent text,
  add constraint jobs_traceparent_format
    check (traceparent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$') not valid;
alter table shoal.dead_jobs add column traceparent text;
