-- shoal 016: a concurrency slot row per claim and key, and a bound on each key's slots.
--
-- 015 wrote one slot row per claimed job of a limited key, deleted by its ack, and counted
-- a key's slots on every claim of it (a probe of each slot's job). With a limit that never
-- binds, that cost W2 a third of its throughput (24,277 jobs/s against 33,118 in the same
-- run): the claims are of 10 jobs, so each job paid an insert, a delete and a probe per
-- claim. Now a claim writes one row per key it took jobs of, naming them and their tokens,
-- and adds their number to the key's bound (shoal.flow_keys.slots_bound: no fewer entries
-- than its slot rows name). A claim counts the slots (the slot rule, which is unchanged)
-- only when the bound says the limit might bind, or after 10,000 claims of the key since
-- the last count; counting removes the rows whose jobs all ended. Acks write nothing for
-- flow control: they wake the queue when a key has jobs waiting for a slot.
-- The view of the slot rule reads the old table; sql/functions/flow.sql makes it anew.
drop view if exists shoal.held_slots;
alter table shoal.concurrency_slots rename to concurrency_slots_015;
alter index shoal.concurrency_slots_pkey rename to concurrency_slots_015_pkey;
alter index shoal.concurrency_slots_key_idx rename to concurrency_slots_015_key_idx;

-- The slots claims took: one row per claim and key, naming the claimed jobs and the tokens
-- they were claimed with (aligned arrays). An entry holds its slot only while its job still
-- carries that token, is claimed and is within its deadline (the slot rule in
-- sql/functions/flow.sql): nothing has to remove it for the count to be right. The claims
-- that count a key remove its rows whose jobs all ended; the reaper rewrites the rest.
-- No key of its own: the statements that remove or rewrite a row reach it by its ctid in
-- the statement that found it (an identity and its index would be two writes more per
-- claim, for nothing a reader needs).
create table shoal.concurrency_slots (
  queue text not null,
  key text not null,
  job_ids bigint[] not null,
  tokens bigint[] not null,
  constraint concurrency_slots_aligned check (cardinality(job_ids) = cardinality(tokens))
);
create index concurrency_slots_key_idx on shoal.concurrency_slots (queue, key);

insert into shoal.concurrency_slots (queue, key, job_ids, tokens)
select s.queue, s.key, array_agg(s.job_id order by s.job_id), array_agg(s.token order by s.job_id)
from shoal.concurrency_slots_015 s
group by s.queue, s.key;
drop table shoal.concurrency_slots_015;

-- A key's bound: at least as many entries as its slot rows name (null: unknown, the next
-- claim of the key counts). Raised by each claim of the key, set by each count, with the
-- bound as it was then in slots_counted (a count is due after 10,000 claims since).
alter table shoal.flow_keys add column slots_bound integer,
  add column slots_counted integer not null default 0;
