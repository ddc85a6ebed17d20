"""Tables every service database has (the transactional outbox and idempotency records), and the
UTC timestamp column type all services use."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.types import TypeDecorator

# Constraint names every service's metadata uses, so migrations name them the same way everywhere.
NAMING_CONVENTION = {"ix": "ix_%(column_0_label)s", "uq": "uq_%(table_name)s_%(column_0_name)s",
                     "ck": "ck_%(table_name)s_%(constraint_name)s",
                     "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
                     "pk": "pk_%(table_name)s"}

# Integer on SQLite so the column is a rowid alias there; BIGINT on PostgreSQL.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """Stores UTC without a zone (SQLite keeps none) and always returns aware UTC datetimes."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use utcnow()")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def add_shared_tables(metadata: MetaData) -> None:
    """Adds the outbox and idempotency tables to a service's metadata (and so its migrations)."""
    Table(
        "outbox_messages",
        metadata,
        Column("position", BigIntPK, primary_key=True, autoincrement=True),  # delivery order
        Column("message_id", String(64), nullable=False, unique=True),  # receiver's dedupe key
        Column("topic", String(32), nullable=False),
        Column("tenant_id", String(64), nullable=False),
        Column("payload", LargeBinary, nullable=False),  # serialized protobuf
        Column("created_at", UtcDateTime, nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("next_attempt_at", UtcDateTime, nullable=False),
        Column("delivered_at", UtcDateTime, nullable=True),
        Column("last_error", Text, nullable=True),
        Index("ix_outbox_pending", "topic", "delivered_at", "position"),
    )
    Table(
        "idempotency_keys",
        metadata,
        Column("tenant_id", String(64), primary_key=True),
        Column("method", String(128), primary_key=True),
        Column("request_id", String(128), primary_key=True),
        Column("request_hash", String(64), nullable=False),
        Column("response", LargeBinary, nullable=False),
        Column("created_at", UtcDateTime, nullable=False),
    )
