"""Governance tables (SQLAlchemy ORM): policy envelopes and their revisions, operator controls,
the decision log, approvals, deployments, the spend ledger, and per-tenant policy epochs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from arm_common.tables import NAMING_CONVENTION, BigIntPK, UtcDateTime, add_shared_tables


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UtcDateTime, dict[str, Any]: JSON, list[str]: JSON}


add_shared_tables(Base.metadata)
OUTBOX = Base.metadata.tables["outbox_messages"]
IDEMPOTENCY = Base.metadata.tables["idempotency_keys"]


class PolicyEnvelope(Base):
    """The current revision of an envelope; `body` is the serialized PolicyEnvelope message."""

    __tablename__ = "policy_envelopes"
    __table_args__ = (Index("ix_envelopes_tenant_scope", "tenant_id", "scope", "scope_id"),
                      UniqueConstraint("tenant_id", "name"))
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200))
    scope: Mapped[int] = mapped_column(Integer)
    scope_id: Mapped[str] = mapped_column(String(64))
    mode: Mapped[int] = mapped_column(Integer)
    active: Mapped[bool] = mapped_column(Boolean)
    revision: Mapped[int] = mapped_column(Integer)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class PolicyEnvelopeRevision(Base):
    """Every revision ever written, kept and readable."""

    __tablename__ = "policy_envelope_revisions"
    envelope_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    actor_type: Mapped[int] = mapped_column(Integer)
    actor_id: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime]


class OperatorControl(Base):
    """A kill switch of a tenant or project; absent means NORMAL."""

    __tablename__ = "operator_controls"
    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    scope: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    mode: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text, default="")
    actor_type: Mapped[int] = mapped_column(Integer)
    actor_id: Mapped[str] = mapped_column(String(64))
    revision: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime]


class RiskOverrides(Base):
    """A tenant's risk overrides (arm.governance.v1.RiskOverrides, serialized); absent = none."""

    __tablename__ = "risk_overrides"
    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    revision: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime]


class PolicyEpoch(Base):
    """Per tenant, incremented by every policy or control change: the `policy_epoch` a decision
    reports, and what replicas compare to know their cache is current."""

    __tablename__ = "policy_epochs"
    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger)


class DecisionRecord(Base):
    """The decision log: every Check's input and outcome, written before the answer is sent."""

    __tablename__ = "decisions"
    __table_args__ = (UniqueConstraint("tenant_id", "request_id"),
                      Index("ix_decisions_tenant_time", "tenant_id", "decided_at"))
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(128))
    instance_id: Mapped[str] = mapped_column(String(64), default="")
    legacy_agent_id: Mapped[str] = mapped_column(String(100), default="")
    version_id: Mapped[str] = mapped_column(String(64), default="")
    project_id: Mapped[str] = mapped_column(String(64), default="")
    run_id: Mapped[str] = mapped_column(String(128), default="")
    tool_call_id: Mapped[str] = mapped_column(String(128), default="")
    tool_name: Mapped[str] = mapped_column(String(200))
    decision: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    risk: Mapped[int] = mapped_column(Integer)
    policy_epoch: Mapped[int] = mapped_column(BigInteger)
    approval_id: Mapped[str] = mapped_column(String(64), default="")
    # Everything needed to re-evaluate the call (SimulatePolicy) and to answer a retry.
    request: Mapped[bytes] = mapped_column(LargeBinary)  # CheckRequest
    agent: Mapped[bytes] = mapped_column(LargeBinary)  # ResolvedAgent (empty when unknown)
    response: Mapped[bytes] = mapped_column(LargeBinary)  # CheckResponse (see response_part)
    decided_at: Mapped[datetime]
    # Set (local decisions): `response` holds only the per-decision fields (decision id, policy
    # epoch, decide time) and the rest, shared by every decision of that result, is the
    # `decision_responses` row of this id; the CheckResponse is the two concatenated
    # (decisions/responses.py). NULL: `response` is the whole CheckResponse.
    response_part: Mapped[str | None] = mapped_column(String(64))


class DecisionResponsePart(Base):
    """What the logged responses of one result share (a CheckResponse without decision id,
    policy epoch and decide time), stored once: content-addressed (the id is a digest of the
    tenant and the bytes), never changed, referenced by `decisions.response_part`."""

    __tablename__ = "decision_responses"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    response: Mapped[bytes] = mapped_column(LargeBinary)


class Approval(Base):
    """Approval requests. Tool-execution approvals come from Check (one per instance and tool
    call id) and are single-use grants bound to instance, tool and argument digest; the others
    come from RequestApproval. `body` is the Approval message as of `revision` (the etag)."""

    __tablename__ = "approvals"
    __table_args__ = (UniqueConstraint("tenant_id", "instance_id", "tool_call_id"),
                      Index("ix_approvals_tenant_status", "tenant_id", "status"),
                      Index("ix_approvals_status_expires", "status", "expires_at"),
                      Index("ix_approvals_status_escalate", "status", "escalate_at"))
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    project_id: Mapped[str] = mapped_column(String(64), default="")
    instance_id: Mapped[str] = mapped_column(String(64), default="")
    version_id: Mapped[str] = mapped_column(String(64), default="")
    action_type: Mapped[int] = mapped_column(Integer)
    tool_name: Mapped[str] = mapped_column(String(200), default="")
    # NULL when the request had no tool call id: the unique constraint then admits many.
    tool_call_id: Mapped[str | None] = mapped_column(String(128))
    run_id: Mapped[str] = mapped_column(String(128), default="")
    argument_digest: Mapped[str] = mapped_column(String(64), default="")
    risk: Mapped[int] = mapped_column(Integer)
    estimated_cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    required_decisions: Mapped[int] = mapped_column(Integer)
    escalation_level: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[int] = mapped_column(Integer)
    decision_id: Mapped[str] = mapped_column(String(64), default="")
    requested_by: Mapped[str] = mapped_column(String(64))
    body: Mapped[bytes] = mapped_column(LargeBinary)  # the Approval message as created
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    consumed_at: Mapped[datetime | None]
    revision: Mapped[int] = mapped_column(Integer, default=1)
    # Deployment or envelope id for non-tool actions.
    target_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # When the next escalation is due while PENDING/ESCALATED; NULL once final.
    escalate_at: Mapped[datetime | None]
    resolved_at: Mapped[datetime | None]


class Deployment(Base):
    """Deployments of a template's version to an environment. `active_key` is
    "<tenant>/<template>/<environment>" while ACTIVE and NULL otherwise: its unique constraint
    keeps at most one ACTIVE deployment per template and environment on every backend."""

    __tablename__ = "deployments"
    __table_args__ = (UniqueConstraint("active_key"),
                      Index("ix_deployments_tenant_template_env", "tenant_id", "template_id", "environment_id"))
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    template_id: Mapped[str] = mapped_column(String(64))
    environment_id: Mapped[str] = mapped_column(String(64))
    project_id: Mapped[str] = mapped_column(String(64), default="")
    target_version_id: Mapped[str] = mapped_column(String(64))
    previous_version_id: Mapped[str] = mapped_column(String(64), default="")
    status: Mapped[int] = mapped_column(Integer)
    rollback_of: Mapped[str] = mapped_column(String(64), default="")
    approval_id: Mapped[str] = mapped_column(String(64), default="")
    active_key: Mapped[str | None] = mapped_column(String(200))
    body: Mapped[bytes] = mapped_column(LargeBinary)  # the Deployment message as of `revision`
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    revision: Mapped[int] = mapped_column(Integer)


class SpendEntry(Base):
    """The spend ledger (ReportSpend now, telemetry COST_TICK events later)."""

    __tablename__ = "spend_ledger"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),
                      Index("ix_spend_instance_time", "tenant_id", "instance_id", "occurred_at"))
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    instance_id: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[str] = mapped_column(String(128), default="")
    tool_call_id: Mapped[str] = mapped_column(String(128), default="")
    amount_usd: Mapped[float] = mapped_column(Float)
    idempotency_key: Mapped[str] = mapped_column(String(128))
    occurred_at: Mapped[datetime]
    recorded_at: Mapped[datetime]


class ChangeRecord(Base):
    """The audit trail: append-only (a PostgreSQL trigger refuses UPDATE and DELETE), numbered
    and hash-chained per tenant. Structs are stored as canonical JSON text."""

    __tablename__ = "change_records"
    __table_args__ = (UniqueConstraint("tenant_id", "record_id"),
                      Index("ix_change_records_type", "tenant_id", "type", "sequence"),
                      Index("ix_change_records_target", "tenant_id", "target_id"),
                      Index("ix_change_records_actor", "tenant_id", "actor_id"),
                      Index("ix_change_records_occur", "tenant_id", "occur_time"))
    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    record_id: Mapped[str] = mapped_column(String(128))
    type: Mapped[int] = mapped_column(Integer)
    actor_type: Mapped[int] = mapped_column(Integer)
    actor_id: Mapped[str] = mapped_column(String(128))
    target_type: Mapped[str] = mapped_column(String(64))
    target_id: Mapped[str] = mapped_column(String(128))
    project_id: Mapped[str] = mapped_column(String(64))
    template_id: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[str] = mapped_column(String(64))
    instance_id: Mapped[str] = mapped_column(String(64))
    summary: Mapped[str] = mapped_column(Text)
    payload: Mapped[str | None] = mapped_column(Text)
    before: Mapped[str | None] = mapped_column(Text)
    after: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    occur_time: Mapped[datetime | None]
    record_time: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(64))
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class ChainHead(Base):
    """Each tenant's last sequence number and hash: appends lock this row, so one tenant's
    records are numbered and chained one after another across replicas, and a deleted last
    record is still noticed."""

    __tablename__ = "change_record_heads"
    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_sequence: Mapped[int] = mapped_column(BigInteger)
    last_hash: Mapped[str] = mapped_column(String(64))


class AuditCheckpoint(Base):
    """Signed chain heads (see arm_common.checkpoints); append-only like the records. Kept here
    for ListCheckpoints and VerifyChain; auditors keep copies outside the database, which is
    what makes them an anchor."""

    __tablename__ = "audit_checkpoints"
    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    key_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    head_hash: Mapped[str] = mapped_column(String(64))
    sign_time: Mapped[datetime]
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    tree_root: Mapped[str] = mapped_column(String(64))
    tree_state: Mapped[str] = mapped_column(Text)
    """The Merkle tree builder's state at `sequence` (JSON, arm_common.merkle.TreeBuilder.state):
    the next checkpoint's root is computed from it and the records since. Not signed; trusted
    only when its root equals the signed tree_root."""


class Webhook(Base):
    """A tenant's notification webhook (arm_governance.webhooks.service). The signing secret is kept
    encrypted (`secret`, a Fernet token under the webhook secret key), never in the clear."""

    __tablename__ = "webhooks"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list[str]]
    description: Mapped[str] = mapped_column(Text, default="")
    secret: Mapped[bytes] = mapped_column(LargeBinary)
    secret_hint: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    revision: Mapped[int] = mapped_column(Integer)


class WebhookDelivery(Base):
    """One notification to one webhook, retried until a 2xx answer. `id` is derived from the
    event and the webhook, so the relay that fans an outbox message out writes each once."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_pending", "delivered_at", "next_attempt_at"),
                      Index("ix_webhook_deliveries_webhook", "webhook_id", "position"))
    position: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    webhook_id: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[int] = mapped_column(Integer)
    approval_id: Mapped[str] = mapped_column(String(64))
    body: Mapped[bytes] = mapped_column(LargeBinary)  # the JSON body, the same on every attempt
    created_at: Mapped[datetime]
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]
    last_status: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
