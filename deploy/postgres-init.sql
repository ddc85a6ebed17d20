-- Runs once, when the postgres volume is first initialised (docker-entrypoint-initdb.d).
-- One database per service: services never share tables (SPEC §1).
CREATE DATABASE arm_registry OWNER arm;
CREATE DATABASE arm_governance OWNER arm;
CREATE DATABASE arm_telemetry OWNER arm;
