"""Alembic migrations per service: run as an explicit step (`python -m arm_<service> migrate`),
checked at start-up (a service refuses to serve on a database that is not at head)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, text

from arm_common.db import Database


class SchemaNotReady(Exception):
    """The database is not migrated to the code's head revision."""


def alembic_config(script_location: Path) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    return cfg


async def upgrade(db: Database, script_location: Path) -> None:
    """Migrates the database to head (creating the PostgreSQL schema when one is configured)."""
    cfg = alembic_config(script_location)
    if db.is_postgres and db.schema:
        async with db.engine.begin() as conn:
            # Only when missing: CREATE SCHEMA needs CREATE on the database even with IF NOT
            # EXISTS, which an owner role given its schema by the administrator lacks.
            exists = (await conn.execute(text("select 1 from pg_namespace where nspname = :s"),
                                         {"s": db.schema})).first()
            if exists is None:
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{db.schema}"'))
    async with db.engine.begin() as conn:
        def run(sync_conn: Any) -> None:
            cfg.attributes["connection"] = sync_conn
            command.upgrade(cfg, "head")
        await conn.run_sync(run)


async def check_at_head(db: Database, script_location: Path, service: str) -> None:
    """Raises SchemaNotReady with the command to run when the database is behind."""
    head = ScriptDirectory.from_config(alembic_config(script_location)).get_current_head()
    async with db.engine.connect() as conn:
        current = await conn.run_sync(
            lambda c: MigrationContext.configure(c).get_current_revision())
    if current != head:
        raise SchemaNotReady(
            f"the {service} database is at revision {current or 'none (empty)'}, the code needs "
            f"{head}; run `python -m arm_{service} migrate` first")


def run_env(target_metadata: MetaData) -> None:
    """Body of each service's alembic env.py: online migrations on the connection handed over
    by upgrade(), in batch mode so SQLite can ALTER tables."""
    from alembic import context

    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations through `python -m arm_<service> migrate`")
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()
