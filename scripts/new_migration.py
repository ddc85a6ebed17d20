"""Autogenerate an Alembic migration for one service from its models.

Usage: python scripts/new_migration.py registry "add something"
Compares the models against a scratch SQLite database at the current head, so run it after the
previous migrations are committed. Review the generated file before committing it."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from alembic import command
from sqlalchemy import create_engine

from arm_common.migrations import alembic_config

ROOT = Path(__file__).resolve().parent.parent


def main(service: str, message: str) -> None:
    location = ROOT / "services" / service / f"arm_{service}" / "migrations"
    cfg = alembic_config(location)
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_engine(f"sqlite:///{tmp}/scratch.db")
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            command.revision(cfg, message=message, autogenerate=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
