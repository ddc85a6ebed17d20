-- Runs once, when the postgres volume is first initialised (docker-entrypoint-initdb.d, by psql).
-- One database per service: services never share tables (SPEC §1).
--
-- Least privilege: `arm` (POSTGRES_USER) is the cluster's superuser, used by nobody but an
-- administrator. `arm_owner` owns the databases and runs the migrations (the *-migrate
-- containers); `arm_app` is what the services connect as. `migrate` grants arm_app only the DML
-- its service needs: on the audit trail SELECT and INSERT, so arm_app can neither rewrite records
-- nor disable or drop the append-only triggers (only a table's owner or a superuser can).
-- Passwords come from the postgres container's environment (psql 15 \getenv).
\getenv owner_password ARM_DB_OWNER_PASSWORD
\getenv app_password ARM_DB_APP_PASSWORD
CREATE ROLE arm_owner LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'owner_password';
CREATE ROLE arm_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'app_password';
CREATE DATABASE arm_registry OWNER arm_owner;
CREATE DATABASE arm_governance OWNER arm_owner;
CREATE DATABASE arm_telemetry OWNER arm_owner;
