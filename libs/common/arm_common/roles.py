"""Least privilege on PostgreSQL: migrations run as an owner role (`ARM_<SERVICE>_MIGRATE_DATABASE_URL`),
the service runs as an application role (the user of `ARM_<SERVICE>_DATABASE_URL`) that holds
only the DML it needs. After migrating, `migrate` grants the application role SELECT, INSERT,
UPDATE and DELETE on the service's tables and the use of their sequences, except where the
service names narrower privileges (the audit trail: SELECT and INSERT only). A role that owns
no table cannot ALTER, DISABLE or DROP a trigger, TRUNCATE, or switch triggers off with
session_replication_role (superusers only), so the append-only triggers hold against it."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from sqlalchemy import text
from sqlalchemy.engine import make_url

from arm_common.db import Database

log = logging.getLogger(__name__)

FULL_DML = "SELECT, INSERT, UPDATE, DELETE"
# Every service: the runtime only reads the schema revision (it checks it is at head).
COMMON_PRIVILEGES = {"alembic_version": "SELECT"}
_ALLOWED = {"SELECT", "INSERT", "UPDATE", "DELETE"}


def url_user(url: str) -> str | None:
    """The user a PostgreSQL URL logs in as (None for SQLite or when the URL names none)."""
    parsed = make_url(url)
    return parsed.username if parsed.drivername.startswith("postgres") else None


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def grant_runtime_privileges(db: Database, role: str, narrower: Mapping[str, str]) -> list[str]:
    """Grants `role` (the application role) what the service needs on the schema `db` migrates,
    run as the owner after migrating. `narrower` maps tables to the only privileges the role gets
    on them. Idempotent (re-run by every `migrate`, so tables added later are covered). Returns
    the statements run."""
    narrower = {**COMMON_PRIVILEGES, **narrower}
    for table, privileges in narrower.items():
        if not {p.strip() for p in privileges.split(",")} <= _ALLOWED:
            raise ValueError(f"unexpected privileges for {table}: {privileges}")
    async with db.engine.begin() as conn:
        schema = db.schema or (await conn.execute(text("select current_schema()"))).scalar_one()
        tables = (await conn.execute(text("select tablename from pg_tables where schemaname = :s"),
                                     {"s": schema})).scalars().all()
        r, s = quote_ident(role), quote_ident(schema)
        statements = [f"GRANT USAGE ON SCHEMA {s} TO {r}",
                      f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA {s} TO {r}"]
        for table in sorted(tables):
            t = f"{s}.{quote_ident(table)}"
            statements += [f"REVOKE ALL ON TABLE {t} FROM {r}",
                           f"GRANT {narrower.get(table, FULL_DML)} ON TABLE {t} TO {r}"]
        for sql in statements:
            await conn.execute(text(sql))
    log.info("granted role %s the service's privileges on schema %s", role, schema)
    return statements


async def warn_if_privileged(db: Database, protected_table: str) -> bool:
    """Logs a warning when the service's own connection could switch off `protected_table`'s
    append-only trigger (it is a superuser or owns the table); returns whether it could."""
    if not db.is_postgres:
        return False
    async with db.engine.connect() as conn:
        row = (await conn.execute(text(
            "select r.rolsuper, coalesce(pg_has_role(current_user, t.tableowner, 'USAGE'), false) "
            "from pg_roles r left join pg_tables t on t.tablename = :t and t.schemaname = current_schema() "
            "where r.rolname = current_user"), {"t": protected_table})).one()
    if row[0] or row[1]:
        log.warning("the database role of this service is a %s: it could switch off the append-only "
                    "trigger of %s; run the service as an application role (see README, least privilege)",
                    "superuser" if row[0] else f"owner of {protected_table}", protected_table)
        return True
    return False
