-- shoal 021: a running job's last reported progress (issue 17; lib/progress.ts).
--
-- `{"done": n, "total": n, "message": text | null, "at": timestamptz}` as the handler last
-- reported it through `ctx.progress`, written by its consumer's heartbeat (one statement for
-- every job whose progress changed since the last beat, none when nothing changed), never once
-- per call. Null for a job that never reported. A null column without a default adds nothing to
-- existing rows and nothing to a job's insert or ack.
alter table shoal.jobs add column progress jsonb;

-- `shoal status` lists the jobs with a progress without scanning the table. Partial: a job that
-- never reports has no entry, so inserts, claims and acks of such jobs do not touch it.
create index jobs_progress on shoal.jobs (id) where progress is not null;
