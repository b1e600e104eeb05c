-- shoal 024: dependencies between the jobs of an execution (issue 17; sql/functions/workflow.sql,
-- "Dependencies").
--
-- A job that waits for others is not a row of shoal.jobs until its last dependency completes:
-- it is held in shoal.held_jobs, where no claim ever looks, so the claim path costs what it
-- did. Its id is drawn from shoal.jobs' sequence when it is held and kept when it is released.
-- The edges say who waits for whom and under which name the dependant receives the result.
-- shoal.job_results keeps the result (or the failure) of each finished job of an execution
-- that still runs, so a dependant declared after its dependency completed still receives it.
-- All three are emptied for an execution when it ends (shoal.end_dependencies).

create table shoal.held_jobs (
  id bigint primary key,
  execution_id bigint not null,
  -- The job as it will be inserted: queue and max_attempts resolved (the catalog rule) when
  -- it was held; payload as given (its dependencies' results are added at release).
  job jsonb not null,
  -- Dependencies not finished yet; released at zero.
  waiting integer not null check (waiting >= 0),
  -- 'fail': a dependency that fails for good fails the execution (and so removes this job);
  -- 'run': this job runs anyway, with the failure in its payload.
  on_dependency_failure text not null default 'fail'
    check (on_dependency_failure in ('fail', 'run')),
  created_at timestamptz not null default now()
);
create index held_jobs_execution_idx on shoal.held_jobs (execution_id);

create table shoal.job_dependencies (
  dependency_id bigint not null,
  dependant_id bigint not null,
  -- The key of the dependency's result in the dependant's payload.dependencies: the step's
  -- name in a workflow, the job id for enqueue(..., { after }).
  name text not null,
  primary key (dependency_id, dependant_id)
);
create index job_dependencies_dependant_idx on shoal.job_dependencies (dependant_id);

create table shoal.job_results (
  job_id bigint primary key,
  execution_id bigint not null,
  result jsonb,
  -- Null: the job completed with `result`. Else: it failed for good, and this is why.
  error text
);
create index job_results_execution_idx on shoal.job_results (execution_id);
