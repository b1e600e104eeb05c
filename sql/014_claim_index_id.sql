-- shoal 014: only the primary key reaches a job by its id.
--
-- jobs_claim_idx ended in a plain `id` (the claim order's last tie-break), so any
-- statement that looks a job up by id (acks, heartbeats, releases, failures: lib/queue.ts)
-- could also be served by a walk of the whole claim index with `id` checked on each entry.
-- With statistics taken while the table was small, or by a VACUUM while another session
-- held a snapshot open (it counts only the few live jobs, beside indexes of millions of
-- entries), the planner priced that walk as cheap as the primary-key probe and kept it in
-- the prepared statement's plan: in W9 an ack of 2,668 jobs took 4.2 s, walking the claim
-- index once per job (auto_explain), the acks fell behind and claiming paused.
--
-- The tie-break is now the expression `id + 0`: the same order, but no condition on `id`
-- matches it, so a lookup by id has the primary key or a sequential scan to choose from,
-- and the primary key wins whatever the statistics say. Statements that walk this index
-- in claim order write the same expression in their `order by` (sql/functions/claim.sql,
-- counts.sql, queue.sql). Rebuilding the index locks shoal.jobs for as long as the build
-- takes (seconds per million jobs).
drop index shoal.jobs_claim_idx;
create index jobs_claim_idx on shoal.jobs (queue, priority desc, fair_seq, (id + 0));
