-- shoal 012: where claiming has got to on each queue, per priority.
--
-- A row per (queue, priority) a claim has taken jobs from: fair_seq is the greatest stamp
-- claimed there (the queue's virtual time at that priority). The consumer's claims start
-- their walk of jobs_claim_idx a little before it instead of at the index's head, so they
-- never read the entries of jobs finished since: while another session holds a snapshot
-- open those entries cannot be marked dead, and a walk from the head fetched the heap row
-- of every job acked since the snapshot began, on every claim. New jobs are stamped from
-- it too (the stamping rule in sql/functions/queue.sql), for the same reason.
--
-- Claims rewrite a row at most every 100 ms (claim.sql), so a held snapshot leaves at most
-- ten versions a second behind per row; fillfactor leaves room to keep them on one page.
-- previous is fair_seq before the last rewrite: a job stamped from the head read just
-- before a rewrite ranks below the new value, not below the one before it (claim.sql).
create table shoal.queue_heads (
  queue text not null,
  priority integer not null,
  fair_seq bigint not null,
  previous bigint not null,
  updated_at timestamptz not null default now(),
  primary key (queue, priority)
) with (fillfactor = 30);
