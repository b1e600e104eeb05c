-- shoal functions: waking the processes that LISTEN.
--
-- Every function in sql/functions/ has its one live definition in one of these files, written
-- as an idempotent `create or replace`; `shoal migrate` re-applies a file whose checksum
-- differs from the one it recorded (see lib/migrate.ts and sql/functions.lock). Numbered
-- migrations (sql/NNN_*.sql) hold schema changes only.
--
-- This file owns the wake protocol; nothing else writes pg_notify for jobs.
--
--   channel shoal_jobs       payload "<queue>"            jobs on that queue can run now
--                            payload "<queue>#<priority>:<fair_seq>"
--                                                         the same, and the first of them in
--                                                         claim order ranks there ('#' cannot
--                                                         occur in a queue name)
--                            payload "<queue>@<epoch ms>" the soonest start of jobs just
--                                                         made visible later ('@' cannot
--                                                         occur in a queue name)
--   channel shoal_schedules  payload ""                   the schedules table changed
--
-- NOTIFY is delivered at commit, and only an optimisation: consumers and the scheduler also
-- poll, so a lost or coalesced notification delays work, never loses it. Every path that
-- makes jobs visible (enqueue, fan-out children and callbacks, a retry after a failure, a
-- hand-back at shutdown, a dead-letter retry) calls shoal.notify_jobs; lib/consumer.ts
-- listens and parses the payload.

-- The shoal_jobs payload for jobs on a queue starting at run_at (null: now).
create or replace function shoal.wake_payload(queue text, run_at timestamptz) returns text
language sql stable as $$
  select case when run_at is null or run_at <= now() then queue
              else queue || '@' || floor(extract(epoch from run_at) * 1000)::bigint::text end
$$;

-- The one wake: jobs on these queues starting at these instants (element i of each array is
-- one job; a null run_at, or a null run_ats array, is now), ranking at (priorities[i],
-- seqs[i]) in claim order when the caller knows (both arrays null: it does not). Jobs that
-- can run now make one NOTIFY per queue, naming the first of them in claim order when every
-- one's rank is known: a consumer whose prefetch buffer holds jobs ranking after it fetches
-- it at once and starts it first (lib/consumer.ts), one whose buffer ranks before it need
-- not look. Jobs that start later make one NOTIFY per distinct start, so a consumer sets a
-- timer for every start time it hears of, not only the soonest of a batch. At most 100
-- payloads per queue and call, soonest first; later ones are left to the consumers' poll.
--
-- The signature before the ranks existed is dropped: beside this one, a call with two
-- arguments would match both. Callers that pass two still reach this one.
drop function if exists shoal.notify_jobs(text[], timestamptz[]);
create or replace function shoal.notify_jobs(queues text[], run_ats timestamptz[],
                                             priorities integer[] default null,
                                             seqs bigint[] default null) returns void
language plpgsql volatile as $$
begin
  -- PERFORM runs the whole query (a SQL function returning void would stop at one row).
  perform pg_notify('shoal_jobs', w.payload)
  from (
    select p.payload,
           row_number() over (partition by p.queue order by p.at) as n
    from (
      select u.queue, u.queue || case
               when bool_and(u.seq is not null and u.priority is not null) then
                 '#' || (array_agg(u.priority order by u.priority desc, u.seq))[1] || ':'
                     || (array_agg(u.seq order by u.priority desc, u.seq))[1]
               else '' end as payload,
             now() as at
      from unnest(queues, run_ats, priorities, seqs) as u(queue, run_at, priority, seq)
      where u.run_at is null or u.run_at <= now()
      group by u.queue
      union all
      select u.queue, shoal.wake_payload(u.queue, u.run_at), min(u.run_at)
      from unnest(queues, run_ats) as u(queue, run_at)
      where u.run_at > now()
      group by 1, 2
    ) p
  ) w
  where w.n <= 100;
end
$$;

-- Wake the scheduler when schedules change, whoever changes them (the trigger
-- schedules_changed on shoal.schedules, created in 002).
create or replace function shoal.notify_schedules_changed() returns trigger
language plpgsql as $$
begin
  perform pg_notify('shoal_schedules', '');
  return null;
end
$$;
