"""Policy envelopes and operator controls: validation, revisions, change records, epochs and
change notices. Every write bumps the tenant's policy epoch and announces it, so every replica
drops its compiled policies for that tenant when the write commits."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import grpc
from google.protobuf import field_mask_pb2, json_format
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from arm.common.v1 import common_pb2
from arm.governance.v1 import policy_pb2
from arm.registry.v1 import agents_pb2, agents_pb2_grpc, tenancy_pb2, tenancy_pb2_grpc
from arm_common import pagination
from arm_common import validation as val
from arm_common.auth import Principal, actor_of
from arm_common.change_records import change_record
from arm_common.db import Database, is_unique_violation
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
from arm_common.tables import utcnow
from arm_governance import convert, models
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
    """Envelopes, revisions, operator controls and risk overrides of a tenant. The reads own their
    session; the writes take the session of the caller's idempotent write (`edge.Writes`), and
    private `_x(s, ...)` methods are what both combine."""

    def __init__(self, db: Database, changes: ChangeChannel) -> None:
        self.db = db
        self.changes = changes

    # reads: each owns its session

    async def get_envelope(self, tenant_id: str, envelope_id: str) -> policy_pb2.PolicyEnvelope:
        return await self.db.read(lambda s: self._get_envelope(s, tenant_id, envelope_id))

    async def list_envelopes(self, tenant_id: str, request: policy_pb2.ListPolicyEnvelopesRequest, size: int,
                             after: Any, filters: dict[str, Any]) -> policy_pb2.ListPolicyEnvelopesResponse:
        return await self.db.read(lambda s: self._list_envelopes(s, tenant_id, request, size, after, filters))

    async def get_revision(self, tenant_id: str, envelope_id: str, revision: int) -> policy_pb2.PolicyEnvelopeRevision:
        return await self.db.read(lambda s: self._get_revision(s, tenant_id, envelope_id, revision))

    async def list_revisions(self, tenant_id: str, envelope_id: str, size: int, after: Any,
                             filters: dict[str, Any]) -> policy_pb2.ListPolicyEnvelopeRevisionsResponse:
        return await self.db.read(lambda s: self._list_revisions(s, tenant_id, envelope_id, size, after, filters))

    async def recent_decisions(self, tenant_id: str, candidate: policy_pb2.PolicyEnvelope, lookback: timedelta,
                               limit: int) -> list[Any]:
        return await self.db.read(lambda s: self._recent_decisions(s, tenant_id, candidate, lookback, limit))

    async def get_risk_overrides(self, tenant_id: str) -> policy_pb2.RiskOverrides:
        return await self.db.read(lambda s: self._get_risk_overrides(s, tenant_id))

    async def get_operator_control(self, tenant_id: str, scope: int, scope_id: str) -> policy_pb2.OperatorControl | None:
        return await self.db.read(lambda s: self._get_operator_control(s, tenant_id, scope, scope_id))

    async def list_operator_controls(self, tenant_id: str, mode: int, size: int, after: Any,
                                     filters: dict[str, Any]) -> policy_pb2.ListOperatorControlsResponse:
        return await self.db.read(lambda s: self._list_operator_controls(s, tenant_id, mode, size, after, filters))

    # writes and what they combine: each takes the caller's session

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

    async def _get_row(self, s: AsyncSession, tenant_id: str, envelope_id: str, *,
                      for_update: bool = False) -> models.PolicyEnvelope:
        q = select(models.PolicyEnvelope).where(models.PolicyEnvelope.id == envelope_id,
                                                models.PolicyEnvelope.tenant_id == tenant_id)
        if for_update:
            q = q.with_for_update()
        row = (await s.execute(q)).scalar_one_or_none()
        if row is None:
            raise NotFound.of("policy_envelope", envelope_id)
        return row

    @staticmethod
    async def check_exists(s: AsyncSession, tenant_id: str, envelope_id: str) -> None:
        """NOT_FOUND unless the envelope is one of the tenant's (its body is not read)."""
        e = models.PolicyEnvelope
        if (await s.execute(select(e.id).where(e.id == envelope_id, e.tenant_id == tenant_id))).first() is None:
            raise NotFound.of("policy_envelope", envelope_id)

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

    # envelopes

    async def create(self, s: AsyncSession, principal: Principal, envelope: policy_pb2.PolicyEnvelope,
                     reason: str) -> policy_pb2.CreatePolicyEnvelopeResponse:
        saved = await self.save(s, principal, envelope, None, reason, utcnow())
        await check_scope_totals(s, principal.tenant_id, saved)
        await self.record(s, principal, CR.CHANGE_RECORD_TYPE_POLICY_CREATED, target_type="policy_envelope",
                          target_id=saved.envelope_id, reason=reason,
                          summary=f"policy {saved.name} created at {policy_pb2.PolicyScope.Name(saved.scope)}",
                          after={"revision": saved.revision, "scope": saved.scope, "scope_id": saved.scope_id,
                                 "mode": saved.mode})
        return policy_pb2.CreatePolicyEnvelopeResponse(envelope=saved)

    async def _get_envelope(self, s: AsyncSession, tenant_id: str, envelope_id: str) -> policy_pb2.PolicyEnvelope:
        return policy_pb2.PolicyEnvelope.FromString((await self._get_row(s, tenant_id, envelope_id)).body)

    @staticmethod
    async def _list_envelopes(s: AsyncSession, tenant_id: str, request: policy_pb2.ListPolicyEnvelopesRequest,
                             size: int, after: Any, filters: dict[str, Any]) -> policy_pb2.ListPolicyEnvelopesResponse:
        m = models.PolicyEnvelope
        q = select(m).where(m.tenant_id == tenant_id)
        if request.scope:
            q = q.where(m.scope == request.scope)
        if request.scope_id:
            q = q.where(m.scope_id == request.scope_id)
        if request.mode:
            q = q.where(m.mode == request.mode)
        if request.HasField("active"):
            q = q.where(m.active.is_(request.active))
        if after is not None:
            q = q.where(m.id > str(after))
        rows = (await s.execute(q.order_by(m.id).limit(size + 1))).scalars().all()
        page, more = pagination.split_page(rows, size)
        return policy_pb2.ListPolicyEnvelopesResponse(
            envelopes=[policy_pb2.PolicyEnvelope.FromString(r.body) for r in page],
            next_page_token=pagination.encode_token(page[-1].id, filters) if more and page else "")

    async def update(self, s: AsyncSession, principal: Principal, request: policy_pb2.UpdatePolicyEnvelopeRequest,
                     check_scope: Callable[[int, str], Awaitable[None]]) -> policy_pb2.UpdatePolicyEnvelopeResponse:
        """The envelope with `request`'s mask applied; `check_scope` checks a new scope id."""
        row = await self._get_row(s, principal.tenant_id, request.envelope.envelope_id, for_update=True)
        self.check_etag(row, request.etag, required=True)
        current = policy_pb2.PolicyEnvelope.FromString(row.body)
        merged = self.apply_mask(current, request.envelope, request.update_mask)
        validate_envelope(merged)
        self.scope_fields(principal, merged)
        moved = (merged.scope, merged.scope_id) != (current.scope, current.scope_id)
        if moved:
            await check_scope(merged.scope, merged.scope_id)
        saved = await self.save(s, principal, merged, row, request.reason, utcnow())
        await check_scope_totals(s, principal.tenant_id, saved)
        kind = CR.CHANGE_RECORD_TYPE_POLICY_ATTACHED if moved else CR.CHANGE_RECORD_TYPE_POLICY_UPDATED
        await self.record(s, principal, kind, target_type="policy_envelope", target_id=saved.envelope_id,
                          reason=request.reason, summary=f"policy {saved.name} revision {saved.revision}",
                          before={"revision": current.revision, "scope": current.scope,
                                  "scope_id": current.scope_id, "active": current.active},
                          after={"revision": saved.revision, "scope": saved.scope,
                                 "scope_id": saved.scope_id, "active": saved.active})
        return policy_pb2.UpdatePolicyEnvelopeResponse(envelope=saved)

    async def deactivate(self, s: AsyncSession, principal: Principal,
                         request: policy_pb2.DeactivatePolicyEnvelopeRequest) -> policy_pb2.DeactivatePolicyEnvelopeResponse:
        row = await self._get_row(s, principal.tenant_id, request.envelope_id, for_update=True)
        self.check_etag(row, request.etag, required=False)
        env = policy_pb2.PolicyEnvelope.FromString(row.body)
        was_active = env.active
        env.active = False
        saved = await self.save(s, principal, env, row, request.reason, utcnow())
        await self.record(s, principal, CR.CHANGE_RECORD_TYPE_POLICY_UPDATED, target_type="policy_envelope",
                          target_id=saved.envelope_id, reason=request.reason,
                          summary=f"policy {saved.name} deactivated",
                          before={"active": was_active}, after={"active": False, "revision": saved.revision})
        return policy_pb2.DeactivatePolicyEnvelopeResponse(envelope=saved)

    # revisions

    @staticmethod
    def _revision(row: models.PolicyEnvelopeRevision) -> policy_pb2.PolicyEnvelopeRevision:
        return policy_pb2.PolicyEnvelopeRevision(
            envelope_id=row.envelope_id, revision=row.revision,
            envelope=policy_pb2.PolicyEnvelope.FromString(row.body), create_time=ts(row.created_at),
            created_by=policy_pb2.PolicyEnvelope.FromString(row.body).updated_by, reason=row.reason)

    async def _get_revision(self, s: AsyncSession, tenant_id: str, envelope_id: str,
                           revision: int) -> policy_pb2.PolicyEnvelopeRevision:
        r = models.PolicyEnvelopeRevision
        row = (await s.execute(select(r).where(r.envelope_id == envelope_id, r.revision == revision,
                                               r.tenant_id == tenant_id))).scalar_one_or_none()
        if row is None:
            raise NotFound(f"policy envelope {envelope_id!r} has no revision {revision}",
                           reason="POLICY_REVISION_NOT_FOUND",
                           metadata={"envelope_id": envelope_id, "revision": str(revision)})
        return self._revision(row)

    async def _list_revisions(self, s: AsyncSession, tenant_id: str, envelope_id: str, size: int, after: Any,
                             filters: dict[str, Any]) -> policy_pb2.ListPolicyEnvelopeRevisionsResponse:
        await self._get_row(s, tenant_id, envelope_id)
        r = models.PolicyEnvelopeRevision
        q = select(r).where(r.envelope_id == envelope_id, r.tenant_id == tenant_id)
        if after is not None:
            if not isinstance(after, int):
                raise InvalidArgument("page_token is malformed", reason="INVALID_PAGE_TOKEN",
                                      violations=[FieldViolation("page_token", "is malformed")])
            q = q.where(r.revision < after)
        rows = (await s.execute(q.order_by(r.revision.desc()).limit(size + 1))).scalars().all()
        page, more = pagination.split_page(rows, size)
        return policy_pb2.ListPolicyEnvelopeRevisionsResponse(
            envelope_revisions=[self._revision(row) for row in page],
            next_page_token=pagination.encode_token(page[-1].revision, filters) if more and page else "")

    @staticmethod
    async def _recent_decisions(s: AsyncSession, tenant_id: str, candidate: policy_pb2.PolicyEnvelope,
                               lookback: timedelta, limit: int) -> list[Any]:
        """Up to `limit` decisions of the last `lookback`, newest first, of agents the candidate's
        scope covers (the rows a simulation replays)."""
        d = models.DecisionRecord
        q = select(d.id, d.decided_at, d.instance_id, d.tool_name, d.decision, d.request, d.agent).where(
            d.tenant_id == tenant_id, d.decided_at >= utcnow() - lookback, d.agent != b"")
        if candidate.scope == policy_pb2.POLICY_SCOPE_PROJECT:
            q = q.where(d.project_id == candidate.scope_id)
        elif candidate.scope == policy_pb2.POLICY_SCOPE_VERSION:
            q = q.where(d.version_id == candidate.scope_id)
        return list((await s.execute(q.order_by(d.decided_at.desc()).limit(limit))).all())

    # operator controls

    async def set_operator_control(self, s: AsyncSession, principal: Principal,
                                   request: policy_pb2.SetOperatorControlRequest,
                                   scope_id: str) -> policy_pb2.SetOperatorControlResponse:
        c = models.OperatorControl
        row = (await s.execute(select(c).where(c.tenant_id == principal.tenant_id, c.scope == request.scope,
                                               c.scope_id == scope_id).with_for_update())).scalar_one_or_none()
        before = convert.control_mode_name(row.mode if row else None)
        if row is None:
            row = c(tenant_id=principal.tenant_id, scope=request.scope, scope_id=scope_id, revision=0)
            s.add(row)
        else:
            self.check_etag(row, request.etag, required=False)
        row.mode, row.reason, row.updated_at = request.mode, request.reason, utcnow()
        row.actor_type, row.actor_id, row.revision = actor_of(principal).type, principal.actor_id, row.revision + 1
        await self.bump_epoch(s, principal.tenant_id)
        after = convert.control_mode_name(request.mode)
        await self.record(
            s, principal, CR.CHANGE_RECORD_TYPE_EMERGENCY_PAUSE, target_type=(
                "tenant" if request.scope == policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT else "project"),
            target_id=scope_id, reason=request.reason,
            project_id=scope_id if request.scope == policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT else "",
            summary=f"kill switch {before} → {after}", before={"mode": before}, after={"mode": after})
        return policy_pb2.SetOperatorControlResponse(control=convert.control(row))

    @staticmethod
    async def _get_operator_control(s: AsyncSession, tenant_id: str, scope: int,
                                   scope_id: str) -> policy_pb2.OperatorControl | None:
        """The control set at (scope, scope_id), None when none is."""
        c = models.OperatorControl
        row = (await s.execute(select(c).where(c.tenant_id == tenant_id, c.scope == scope,
                                               c.scope_id == scope_id))).scalar_one_or_none()
        return None if row is None else convert.control(row)

    @staticmethod
    async def _list_operator_controls(s: AsyncSession, tenant_id: str, mode: int, size: int, after: Any,
                                     filters: dict[str, Any]) -> policy_pb2.ListOperatorControlsResponse:
        c = models.OperatorControl
        q = select(c).where(c.tenant_id == tenant_id)
        if mode:
            q = q.where(c.mode == mode)
        if after is not None:
            if not (isinstance(after, list) and len(after) == 2):
                raise InvalidArgument("page_token is malformed", reason="INVALID_PAGE_TOKEN",
                                      violations=[FieldViolation("page_token", "is malformed")])
            q = q.where((c.scope > after[0]) | ((c.scope == after[0]) & (c.scope_id > str(after[1]))))
        rows = (await s.execute(q.order_by(c.scope, c.scope_id).limit(size + 1))).scalars().all()
        page, more = pagination.split_page(rows, size)
        token = pagination.encode_token([page[-1].scope, page[-1].scope_id], filters) if more and page else ""
        return policy_pb2.ListOperatorControlsResponse(controls=[convert.control(r) for r in page],
                                                       next_page_token=token)

    # risk overrides

    @staticmethod
    async def _get_risk_overrides(s: AsyncSession, tenant_id: str) -> policy_pb2.RiskOverrides:
        row = (await s.execute(select(models.RiskOverrides).where(
            models.RiskOverrides.tenant_id == tenant_id))).scalar_one_or_none()
        return _risk_overrides(tenant_id, row)

    async def set_risk_overrides(self, s: AsyncSession, principal: Principal,
                                 request: policy_pb2.SetRiskOverridesRequest) -> policy_pb2.SetRiskOverridesResponse:
        m = models.RiskOverrides
        row = (await s.execute(select(m).where(m.tenant_id == principal.tenant_id).with_for_update())).scalar_one_or_none()
        if row is None:
            if request.etag and request.etag != "0":
                raise Aborted(f"etag {request.etag!r} does not match the current 0; re-read and retry",
                              reason="ETAG_MISMATCH", metadata={"current_etag": "0"})
            row = m(tenant_id=principal.tenant_id, revision=0)
            s.add(row)
            before: list[dict[str, Any]] = []
        else:
            self.check_etag(row, request.etag, required=False)
            before = [json_format.MessageToDict(o) for o in policy_pb2.RiskOverrides.FromString(row.body).overrides]
        before_triggers = _stored_triggers(row)
        row.body = policy_pb2.RiskOverrides(overrides=request.overrides,
                                            argument_triggers=request.argument_triggers).SerializeToString()
        row.revision, row.updated_at = row.revision + 1, utcnow()
        await s.flush()
        await self.bump_epoch(s, principal.tenant_id)
        await self.record(
            s, principal, CR.CHANGE_RECORD_TYPE_POLICY_UPDATED, target_type="risk_overrides",
            target_id=principal.tenant_id, reason=request.reason, summary=_risk_summary(request),
            before={"overrides": before, **before_triggers},
            after={"overrides": [json_format.MessageToDict(o) for o in request.overrides],
                   **_triggers_record(request.argument_triggers)})
        return policy_pb2.SetRiskOverridesResponse(risk_overrides=_risk_overrides(principal.tenant_id, row))


def _triggers_record(triggers: Any) -> dict[str, Any]:
    """The argument triggers part of a risk-overrides change record (absent when none)."""
    return {"argument_triggers": [json_format.MessageToDict(t) for t in triggers]} if triggers else {}


def _stored_triggers(row: Any) -> dict[str, Any]:
    return _triggers_record(policy_pb2.RiskOverrides.FromString(row.body).argument_triggers) if row.body else {}


def _risk_summary(request: policy_pb2.SetRiskOverridesRequest) -> str:
    summary = f"risk overrides: {len(request.overrides)} entries"
    return summary + (f", {len(request.argument_triggers)} argument triggers" if request.argument_triggers else "")


def _risk_overrides(tenant_id: str, row: Any) -> policy_pb2.RiskOverrides:
    out = policy_pb2.RiskOverrides(tenant_id=tenant_id)
    if row is not None:
        out.MergeFromString(row.body)
        out.tenant_id, out.revision, out.etag = tenant_id, row.revision, str(row.revision)
    return out
