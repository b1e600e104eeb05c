-- shoal functions: the function behind the built-in task shoal.sql (lib/sql_task.ts).
--
-- shoal.call_sql_task(schema, name, payload, allowed) calls the function schema.name(jsonb)
-- with the payload and returns its result as jsonb (null for a void function). Names are
-- never spliced into SQL text by the caller: the schema must be in `allowed` (and is never
-- shoal, pg_catalog, information_schema or another pg_ schema), the function is found by
-- plain equality on pg_namespace.nspname and pg_proc.proname with exactly one jsonb
-- argument, and only the names found there are quoted into the call with format('%I').
-- A name that matches nothing, however it is spelled, is simply not found.
--
-- Refusals carry their own SQLSTATEs, so the consumer fails those jobs for good while an
-- error raised by the called function itself is retried:
--   SH001  the schema is not allowed
--   SH002  no function schema.name(jsonb) returning a single value
--
-- The function runs with the caller's privileges (not security definer): the consumer's
-- database role needs USAGE on the schema and EXECUTE on the function.
create or replace function shoal.call_sql_task(
  fn_schema text, fn_name text, payload jsonb, allowed text[]
) returns jsonb
language plpgsql as $$
declare
  found_schema name;
  found_name name;
  returns_void boolean;
  result jsonb;
begin
  if fn_schema is null or fn_name is null then
    raise exception 'shoal.sql needs a schema and a function name' using errcode = 'SH002';
  end if;
  if fn_schema in ('shoal', 'pg_catalog', 'information_schema') or fn_schema like 'pg\_%' then
    raise exception 'Schema "%" is reserved: shoal.sql never calls functions in it', fn_schema
      using errcode = 'SH001';
  end if;
  if not (fn_schema = any (coalesce(allowed, '{}'::text[]))) then
    raise exception 'Schema "%" is not in the shoal.sql allowlist', fn_schema
      using errcode = 'SH001';
  end if;
  select n.nspname, p.proname, p.prorettype = 'pg_catalog.void'::pg_catalog.regtype
    into found_schema, found_name, returns_void
  from pg_catalog.pg_proc p
  join pg_catalog.pg_namespace n on n.oid = p.pronamespace
  where n.nspname = fn_schema and p.proname = fn_name and p.prokind = 'f'
    and not p.proretset and p.pronargs = 1
    and p.proargtypes[0] = 'pg_catalog.jsonb'::pg_catalog.regtype;
  if found_name is null then
    raise exception 'No function "%"."%"(jsonb) returning one value', fn_schema, fn_name
      using errcode = 'SH002';
  end if;
  if returns_void then
    execute pg_catalog.format('select %I.%I($1)', found_schema, found_name) using payload;
    return null;
  end if;
  execute pg_catalog.format('select pg_catalog.to_jsonb(%I.%I($1))', found_schema, found_name)
    into result using payload;
  return result;
end
$$;
