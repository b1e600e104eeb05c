-- shoal 023: idempotent start (issue 17). An execution may carry a key (`order-42`) given at
-- its start: a start with a key already held returns that execution instead of starting a
-- second one, while it is pending or running and after it ended, until the reaper releases
-- the key a retention window after the end (the tombstone: the ended row keeps its key).
-- The start is shoal.start_execution (sql/functions/workflow.sql); the release is
-- lib/execution.ts releaseExecutionKeys.
--
-- A null column without a default adds nothing to existing rows, and executions started
-- without a key have no entry in either partial index.
alter table shoal.executions add column key text;

-- One execution per key, enforced by Postgres: concurrent starts of one key race on this
-- index (insert ... on conflict do nothing), never on a lock of shoal's own.
create unique index executions_key on shoal.executions (key) where key is not null;

-- The reaper finds keys past their window along this index, oldest end first, without
-- reading executions that hold no key or have not ended.
create index executions_key_ended on shoal.executions (finished_at)
where key is not null and finished_at is not null;
