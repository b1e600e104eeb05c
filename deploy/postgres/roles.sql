-- Least-privilege Postgres roles for shoal. Run once per database, before the first
-- `shoal migrate`, as a role with CREATEROLE that owns the database (or a superuser):
--   psql "$ADMIN_URL" -v ON_ERROR_STOP=1 -f deploy/postgres/roles.sql
--   psql "$ADMIN_URL" -c '\password shoal_owner' -c '\password shoal_app'
--
-- shoal_owner runs `shoal migrate` only: it owns the shoal schema and everything the
-- migrations create in it. shoal_app runs every role and admin command: it reads and writes
-- rows and calls shoal's functions, and can change no table. Default privileges grant
-- shoal_app the tables and sequences of later migrations too. CONNECT and TEMP on the
-- database, and EXECUTE on functions, are PUBLIC by default; if your database revokes them,
-- grant them to both roles. tests/deploy_test.ts runs shoal with exactly these grants.

create role shoal_owner login;
create role shoal_app login;

create schema if not exists shoal authorization shoal_owner;
-- `shoal migrate` says `create schema if not exists shoal`, which Postgres checks against
-- CREATE on the database even when the schema exists.
do $$
begin
  execute format('grant create on database %I to shoal_owner', current_database());
end
$$;
grant usage on schema shoal to shoal_app;

alter default privileges for role shoal_owner in schema shoal
  grant select, insert, update, delete on tables to shoal_app;
alter default privileges for role shoal_owner in schema shoal
  grant usage, select on sequences to shoal_app;
