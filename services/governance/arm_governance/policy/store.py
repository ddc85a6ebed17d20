"""Policy envelopes and operator controls: validation, revisions, change records, epochs and
change notices. Every write bumps the tenant's policy epoch and announces it, so every replica
drops its compiled policies for that tenant when the write commits."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import grpc
from google.protobuf import field_mask_pb2
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from arm.common.v1 import common_pb2
from arm.governance.v1 import policy_pb2
from arm.registry.v1 import agents_pb2, agents_pb2_grpc, tenancy_pb2, tenancy_pb2_grpc
from arm_common import validation as val
from arm_common.auth import Principal, actor_of
from arm_common.change_records import change_record
from arm_common.db import is_unique_violation
from arm_common.errors import (
    Aborted,
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
    Violations,
)
from arm_common.ids import new_id
from arm_common.messages import ts
from arm_common.notify import ChangeChannel
from arm_common.outbox import TOPIC_CHANGE_RECORD, enqueue
from arm_governance import models
from arm_governance.approvals.rules import RISK_LEVELS
from arm_governance.models import OUTBOX
from arm_governance.policy import limits

CR = common_pb2.ChangeRecordType
MUTABLE = ("name", "description", "scope", "scope_id", "priority", "active", "mode", "tool_rules",
           "require_approval_at_risk", "deny_at_risk", "autonomy_tier", "budgets", "default_effect")
_DECISIONS = {1, 2, 3}


def validate_envelope(env: policy_pb2.PolicyEnvelope, prefix: str = "envelope.") -> None:
    v = Violations()
    val.required(v, f"{prefix}name", env.name)
    val.optional(v, f"{prefix}description", env.description, val.MAX_TEXT)
    val.enum_set(v, f"{prefix}scope", env.scope, {1, 2, 3})
    if env.scope in (2, 3):
        val.resource_id(v, f"{prefix}scope_id", env.scope_id)
    if env.mode not in (0, 1, 2):  # 0: ENFORCE on create (see the contract)
        v.add(f"{prefix}mode", f"unknown enum value {env.mode}")
    if env.HasField("priority") and not 0 <= env.priority <= 1_000_000:
        v.add(f"{prefix}priority", "must be from 0 to 1000000")
    limits.rules(v, prefix, env)
    for i, rule in enumerate(env.tool_rules):
        path = f"{prefix}tool_rules[{i}]"
        if rule.effect not in _DECISIONS:
            v.add(f"{path}.effect", "must be ALLOW, DENY or NEEDS_APPROVAL")
        if rule.when.min_risk and rule.when.min_risk not in RISK_LEVELS:
            v.add(f"{path}.when.min_risk", f"unknown enum value {rule.when.min_risk}")
        val.optional(v, f"{path}.description", rule.description, 1000)
    for name in ("require_approval_at_risk", "deny_at_risk"):
        value = getattr(env, name)
        if value and value not in RISK_LEVELS:
            v.add(f"{prefix}{name}", f"unknown enum value {value}")
    if env.default_effect and env.default_effect not in _DECISIONS:
        v.add(f"{prefix}default_effect", f"unknown enum value {env.default_effect}")
    if env.HasField("budgets"):
        for name in ("per_run_usd", "daily_usd", "monthly_usd"):
            if env.budgets.HasField(name):
                amount = getattr(env.budgets, name)
                if not math.isfinite(amount) or amount < 0:
                    v.add(f"{prefix}budgets.{name}", "must be a finite amount >= 0")
    v.raise_if_any("the policy envelope is invalid")


async def check_scope_totals(s: AsyncSession, tenant_id: str, env: policy_pb2.PolicyEnvelope,
                             path: str = "envelope") -> None:
    """After `env` is saved (its epoch row locked, so writers of one tenant take turns): the
    totals of the active envelopes attached to its scope stay within `limits`."""
    if not env.active:
        return
    m = models.PolicyEnvelope
    rows = (await s.execute(select(m.body).where(
        m.tenant_id == tenant_id, m.scope == env.scope, m.scope_id == env.scope_id,
        m.active.is_(True)))).scalars().all()
    v = Violations()
    limits.scope_totals(v, path, (policy_pb2.PolicyEnvelope.FromString(b) for b in rows))
    v.raise_if_any("the policy envelope would take its scope over the policy limits")


class RegistryLookup:
    """Checks that a scope id names a project or version the caller can see (caller's key)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.tenancy = tenancy_pb2_grpc.TenancyServiceStub(channel)
        self.agents = agents_pb2_grpc.AgentServiceStub(channel)

    async def check_scope(self, api_key: str, scope: int, scope_id: str) -> None:
        md = (("authorization", f"Bearer {api_key}"),)
        try:
            if scope == policy_pb2.POLICY_SCOPE_PROJECT:
                await self.tenancy.GetProject(tenancy_pb2.GetProjectRequest(id=scope_id), metadata=md, timeout=5)
            elif scope == policy_pb2.POLICY_SCOPE_VERSION:
                await self.agents.GetAgentVersion(agents_pb2.GetAgentVersionRequest(id=scope_id), metadata=md, timeout=5)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                kind = "project" if scope == policy_pb2.POLICY_SCOPE_PROJECT else "agent_version"
                raise NotFound.of(kind, scope_id) from None
            raise Unavailable(f"the registry could not check the scope: {exc.code().name}",
                              reason="REGISTRY_UNAVAILABLE") from None


class PolicyStore:
    def __init__(self, changes: ChangeChannel) -> None:
        self.changes = changes

    async def bump_epoch(self, s: AsyncSession, tenant_id: str) -> int:
        # Insert-if-missing first, so two first writers of a tenant cannot both insert the row
        # (a unique violation answered INTERNAL); the locked row is then the tenant's write turn.
        insert = postgresql.insert if s.get_bind().dialect.name == "postgresql" else sqlite.insert
        await s.execute(insert(models.PolicyEpoch).values(tenant_id=tenant_id, epoch=0)
                        .on_conflict_do_nothing(index_elements=["tenant_id"]))
        row = (await s.execute(select(models.PolicyEpoch).where(
            models.PolicyEpoch.tenant_id == tenant_id).with_for_update())).scalar_one()
        row.epoch += 1
        await self.changes.send(s, {"tenant": tenant_id})
        return row.epoch

    @staticmethod
    async def record(s: AsyncSession, principal: Principal, type_: int, *, target_type: str,
                     target_id: str, summary: str, reason: str = "", project_id: str = "",
                     version_id: str = "", before: dict[str, Any] | None = None,
                     after: dict[str, Any] | None = None, payload: dict[str, Any] | None = None) -> None:
        rec = change_record(
            type_, tenant_id=principal.tenant_id, actor=actor_of(principal), target_type=target_type,
            target_id=target_id, project_id=project_id, version_id=version_id, summary=summary,
            reason=reason, before=before, after=after, payload=payload, source="governance")
        await enqueue(s, OUTBOX, topic=TOPIC_CHANGE_RECORD, tenant_id=rec.tenant_id,
                      message_id=rec.record_id, message=rec)

    async def get_row(self, s: AsyncSession, tenant_id: str, envelope_id: str, *,
                      for_update: bool = False) -> models.PolicyEnvelope:
        q = select(models.PolicyEnvelope).where(models.PolicyEnvelope.id == envelope_id,
                                                models.PolicyEnvelope.tenant_id == tenant_id)
        if for_update:
            q = q.with_for_update()
        row = (await s.execute(q)).scalar_one_or_none()
        if row is None:
            raise NotFound.of("policy_envelope", envelope_id)
        return row

    async def save(self, s: AsyncSession, principal: Principal, env: policy_pb2.PolicyEnvelope,
                   row: models.PolicyEnvelope | None, reason: str, now: datetime) -> policy_pb2.PolicyEnvelope:
        """Writes a new revision (the first, when row is None) and its history entry."""
        env.tenant_id = principal.tenant_id
        env.update_time.CopyFrom(ts(now))
        env.updated_by.CopyFrom(actor_of(principal))
        if not env.HasField("priority"):
            env.priority = 100
        if not env.HasField("active"):
            env.active = True
        if env.mode == policy_pb2.POLICY_MODE_UNSPECIFIED:
            env.mode = policy_pb2.POLICY_MODE_ENFORCE
        if row is None:
            env.envelope_id = new_id("pol")
            env.revision = 1
            env.create_time.CopyFrom(ts(now))
            env.created_by.CopyFrom(actor_of(principal))
            row = models.PolicyEnvelope(id=env.envelope_id, tenant_id=principal.tenant_id, created_at=now)
            s.add(row)
        else:
            env.revision = row.revision + 1
        env.etag = str(env.revision)
        row.name, row.scope, row.scope_id, row.mode = env.name, env.scope, env.scope_id, env.mode
        row.active, row.revision, row.updated_at = env.active, env.revision, now
        row.body = env.SerializeToString()
        try:
            await s.flush()
        except IntegrityError as exc:
            if not is_unique_violation(exc):
                raise
            raise AlreadyExists(f"a policy envelope named {env.name!r} already exists",
                                reason="POLICY_ENVELOPE_EXISTS", metadata={"name": env.name}) from None
        s.add(models.PolicyEnvelopeRevision(
            envelope_id=env.envelope_id, revision=env.revision, tenant_id=principal.tenant_id,
            body=row.body, actor_type=env.updated_by.type, actor_id=principal.actor_id, reason=reason,
            created_at=now))
        await self.bump_epoch(s, principal.tenant_id)
        return env

    @staticmethod
    def check_etag(row: models.PolicyEnvelope | models.OperatorControl | models.RiskOverrides, etag: str, *, required: bool) -> None:
        if not etag:
            if required:
                raise InvalidArgument("etag is required", reason="INVALID_FIELDS",
                                      violations=[FieldViolation("etag", "is required; read the envelope first")])
            return
        if etag != str(row.revision):
            raise Aborted(f"etag {etag!r} does not match the current {row.revision}; re-read and retry",
                          reason="ETAG_MISMATCH", metadata={"current_etag": str(row.revision)})

    @staticmethod
    def apply_mask(current: policy_pb2.PolicyEnvelope, incoming: policy_pb2.PolicyEnvelope,
                   mask: field_mask_pb2.FieldMask) -> policy_pb2.PolicyEnvelope:
        paths = list(mask.paths) or list(MUTABLE)
        bad = [p for p in paths if p not in MUTABLE]
        if bad:
            raise InvalidArgument("update_mask names fields that cannot be updated: " + ", ".join(bad),
                                  reason="INVALID_FIELDS",
                                  violations=[FieldViolation("update_mask", f"{p!r} is not updatable") for p in bad])
        merged = policy_pb2.PolicyEnvelope()
        merged.CopyFrom(current)
        for path in paths:
            merged.ClearField(path)
            field = incoming.DESCRIPTOR.fields_by_name[path]
            if field.is_repeated:
                getattr(merged, path).extend(getattr(incoming, path))
            elif field.message_type is not None or field.has_presence:
                if incoming.HasField(path):
                    if field.message_type is not None:
                        getattr(merged, path).CopyFrom(getattr(incoming, path))
                    else:
                        setattr(merged, path, getattr(incoming, path))
            else:
                setattr(merged, path, getattr(incoming, path))
        return merged

    @staticmethod
    def scope_fields(principal: Principal, env: policy_pb2.PolicyEnvelope) -> None:
        """A TENANT envelope is attached to the caller's tenant, whatever scope_id said."""
        if env.scope == policy_pb2.POLICY_SCOPE_TENANT:
            if env.scope_id and env.scope_id != principal.tenant_id:
                raise NotFound.of("tenant", env.scope_id)
            env.scope_id = principal.tenant_id

    @staticmethod
    def control_key(principal: Principal, scope: int, scope_id: str) -> str:
        if scope == policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT:
            if scope_id and scope_id != principal.tenant_id:
                raise NotFound.of("tenant", scope_id)
            return principal.tenant_id
        return scope_id
