"""Telemetry tables: the stored opEvents (one row per tenant and event_id: the unique key is the
deduplication), the reference backfills, and the shared outbox (spend reports to governance)
and idempotency tables."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from arm_common.tables import NAMING_CONVENTION, BigIntPK, UtcDateTime, add_shared_tables

metadata = MetaData(naming_convention=NAMING_CONVENTION)
add_shared_tables(metadata)
OUTBOX = metadata.tables["outbox_messages"]
IDEMPOTENCY = metadata.tables["idempotency_keys"]

# Reference columns an event may carry, in OpEvent field order (all strings, "" when unknown).
REF_COLUMNS = ("project_id", "environment_id", "template_id", "version_id", "instance_id",
               "legacy_agent_id", "run_id", "tool_call_id", "task_id", "workflow_run_id",
               "change_record_id", "trace_id")

EVENTS = Table(
    "events",
    metadata,
    # Store order: assigned at insert, and (writers being serialized, see ingest.py) in commit
    # order, so it is the resume cursor of TailEvents.
    Column("seq", BigIntPK, primary_key=True, autoincrement=True),
    Column("tenant_id", String(64), nullable=False),
    Column("event_id", String(128), nullable=False),
    Column("type", Integer, nullable=False),
    Column("occur_time", UtcDateTime, nullable=False),
    Column("receive_time", UtcDateTime, nullable=False),
    *(Column(name, String(128), nullable=False) for name in REF_COLUMNS),
    Column("payload", LargeBinary, nullable=True),  # serialized google.protobuf.Struct
    UniqueConstraint("tenant_id", "event_id"),
    Index("ix_events_tenant_time", "tenant_id", "occur_time", "event_id"),
    Index("ix_events_tenant_run", "tenant_id", "run_id", "occur_time"),
    Index("ix_events_tenant_legacy", "tenant_id", "legacy_agent_id", "seq"),
    Index("ix_events_occur_time", "occur_time"),
)

BACKFILLS = Table(
    "backfills",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant_id", String(64), nullable=False),
    Column("state", Integer, nullable=False),  # BackfillState number
    Column("cursor", BigInteger, nullable=False),  # events.seq processed up to (inclusive)
    Column("processed_count", BigInteger, nullable=False),
    Column("updated_count", BigInteger, nullable=False),
    Column("unresolved_count", BigInteger, nullable=False),
    Column("error_message", Text, nullable=False),
    Column("start_time", UtcDateTime, nullable=False),
    Column("update_time", UtcDateTime, nullable=False),
    Column("complete_time", UtcDateTime, nullable=True),
    Index("ix_backfills_tenant_start", "tenant_id", "start_time"),
)
