-- shoal 011: a schedule's catch-up rule after downtime.
--
-- 0 (every existing row, and the default): coalesce, as before: the missed slots fire once,
-- as the due slot, and the schedule moves to its next future slot. N from 1 to 1,000:
-- backfill, fire each missed slot (oldest first, each with its own dedupe key) up to N of
-- them, then move to the next future slot. The scheduler reads it (lib/scheduler.ts).
alter table shoal.schedules
  add column backfill integer not null default 0
    constraint schedules_backfill_range check (backfill between 0 and 1000);
