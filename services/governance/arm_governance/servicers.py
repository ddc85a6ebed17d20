"""gRPC servicers of governance: validate at the edge, check permissions, delegate to the policy
store, the decider and the pure engine, convert to protobuf."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from google.protobuf import json_format
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from arm.governance.v1 import decision_pb2, decision_pb2_grpc, policy_pb2, policy_pb2_grpc
from arm_common import pagination
from arm_common import validation as val
from arm_common.auth import Principal, current_api_key, current_principal
from arm_common.db import Database
from arm_common.errors import Aborted, FieldViolation, InvalidArgument, NotFound, PermissionDenied, Violations
from arm_common.idempotency import run_idempotent
from arm_common.ids import new_id
from arm_common.messages import ts
from arm_common.server import Ctx
from arm_common.tables import utcnow
from arm_engine import engine
from arm_governance import convert, limits, models
from arm_governance.agents import AgentDirectory
from arm_governance.decision_reads import DecisionFilter, DecisionReader, export_line
from arm_governance.decisions import Decider, SpendBook, check_batch_limit, validate_check
from arm_governance.local_decisions import LocalDecisionRpcs
from arm_governance.models import IDEMPOTENCY
from arm_governance.policies import PolicyCache
from arm_governance.policy_store import (
    CR,
    PolicyStore,
    RegistryLookup,
    actor,
    check_scope_totals,
    validate_envelope,
)

MAX_LOOKBACK = timedelta(days=30)
MAX_EVALUATION_ENVELOPES = 60
MAX_EVALUATION_CALLS = 500
_GRANTS = {"VALID", "PENDING", "NOT_FOUND", "NOT_APPROVED", "EXPIRED", "USED", "MISMATCH"}


MAX_RISK_OVERRIDES = 100
MAX_ARGUMENT_BOUNDS = 10


def validate_risk_overrides(v: Violations, path: str, overrides: Any) -> None:
    """RiskOverride entries: a tool glob within the policy limits, a risk, bounded numeric bounds."""
    if len(overrides) > MAX_RISK_OVERRIDES:
        v.add(path, f"must have at most {MAX_RISK_OVERRIDES} items")
        return
    for i, o in enumerate(overrides):
        limits.tool_glob(v, f"{path}[{i}].tool", o.tool)
        if o.risk not in (1, 2, 3, 4):
            v.add(f"{path}[{i}].risk", "must be LOW, MEDIUM, HIGH or CRITICAL")
        if len(o.arguments_below) > MAX_ARGUMENT_BOUNDS:
            v.add(f"{path}[{i}].arguments_below", f"must have at most {MAX_ARGUMENT_BOUNDS} entries")
        for name, bound in o.arguments_below.items():
            if not name or len(name) > 100 or not math.isfinite(bound):
                v.add(f"{path}[{i}].arguments_below[{name!r}]", "needs a name of 1-100 characters and a finite bound")


def _risk_overrides(tenant_id: str, row: Any) -> policy_pb2.RiskOverrides:
    out = policy_pb2.RiskOverrides(tenant_id=tenant_id)
    if row is not None:
        out.MergeFromString(row.body)
        out.tenant_id, out.revision, out.etag = tenant_id, row.revision, str(row.revision)
    return out


def evaluation_inputs(request: decision_pb2.EvaluatePolicyRequest
                      ) -> tuple[list[engine.Envelope], list[tuple[decision_pb2.EvaluationContext, engine.Call]]]:
    """EvaluatePolicy's envelopes and calls, validated like writes and checks (INVALID_ARGUMENT
    with field violations); the scope_id of PROJECT/VERSION envelopes is a label, not an id."""
    v = Violations()
    if len(request.envelopes) > MAX_EVALUATION_ENVELOPES:
        v.add("envelopes", f"must have at most {MAX_EVALUATION_ENVELOPES} items")
    if not 1 <= len(request.calls) <= MAX_EVALUATION_CALLS:
        v.add("calls", f"must have 1 to {MAX_EVALUATION_CALLS} items")
    v.raise_if_any()
    envelopes = []
    for i, env in enumerate(request.envelopes):
        prefix = f"envelopes[{i}]."
        if env.scope in (policy_pb2.POLICY_SCOPE_PROJECT, policy_pb2.POLICY_SCOPE_VERSION):
            val.required(v, f"{prefix}scope_id", env.scope_id, 200)
        labelled = policy_pb2.PolicyEnvelope()
        labelled.CopyFrom(env)
        if env.scope in (policy_pb2.POLICY_SCOPE_PROJECT, policy_pb2.POLICY_SCOPE_VERSION):
            labelled.scope = policy_pb2.POLICY_SCOPE_TENANT  # the label is checked above
            labelled.scope_id = ""
        try:
            validate_envelope(labelled, prefix)
        except InvalidArgument as exc:
            for fv in exc.violations:
                v.add(fv.field, fv.description)
        if v:  # converted only when valid (an unknown scope or effect has no engine value)
            continue
        if not labelled.envelope_id:
            labelled.envelope_id = f"eval-{i}"
        labelled.scope, labelled.scope_id = env.scope, env.scope_id
        envelopes.append(convert.envelope_to_engine(labelled))
    limits.scope_totals(v, "envelopes", [e for e in request.envelopes if e.scope == policy_pb2.POLICY_SCOPE_TENANT])
    calls = []
    for i, c in enumerate(request.calls):
        prefix = f"calls[{i}]."
        limits.tool_name(v, f"{prefix}tool_name", c.tool_name)
        if c.declared_risk not in (0, 1, 2, 3, 4):
            v.add(f"{prefix}declared_risk", f"unknown enum value {c.declared_risk}")
        if not math.isfinite(c.estimated_cost_usd) or c.estimated_cost_usd < 0:
            v.add(f"{prefix}estimated_cost_usd", "must be a finite number >= 0")
        if c.grant_status and c.grant_status not in _GRANTS:
            v.add(f"{prefix}grant_status", "must be one of " + ", ".join(sorted(_GRANTS)))
        for name in ("project", "version", "environment_name", "environment_type", "instance_state",
                     "version_state"):
            val.optional(v, f"{prefix}context.{name}", getattr(c.context, name), 200)
        calls.append((c.context, engine.Call(
            tool=c.tool_name,
            arguments=json_format.MessageToDict(c.arguments) if c.HasField("arguments") else None,
            declared_risk=engine.Risk(c.declared_risk) if c.declared_risk in (1, 2, 3, 4) else None,
            estimated_cost_usd=c.estimated_cost_usd, is_run_start=c.is_run_start,
            grant=engine.Grant(c.grant_status) if c.grant_status else None)))
    validate_risk_overrides(v, "risk_overrides", request.risk_overrides)
    v.raise_if_any("the evaluation request is not valid")
    return envelopes, calls


def _check_common(request: Any) -> None:
    v = Violations()
    val.standard_fields(v, request)
    v.raise_if_any()


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, db: Database, store: PolicyStore, cache: PolicyCache, agents: AgentDirectory,
                 lookup: RegistryLookup) -> None:
        self.db = db
        self.store = store
        self.cache = cache
        self.agents = agents
        self.lookup = lookup

    async def _write(self, method: str, request: Any, response_type: Any, fn: Any) -> Any:
        p = current_principal()
        result = await run_idempotent(self.db, IDEMPOTENCY, tenant_id=p.tenant_id, method=method,
                                      request=request, response_type=response_type, write=fn)
        self.cache.invalidate(p.tenant_id)  # this process at once; others on the notice
        return result

    async def CreatePolicyEnvelope(self, request: policy_pb2.CreatePolicyEnvelopeRequest, context: Ctx) -> Any:
        _check_common(request)
        validate_envelope(request.envelope)
        p = current_principal()
        p.require("policies:write")
        env = policy_pb2.PolicyEnvelope()
        env.CopyFrom(request.envelope)
        self.store.scope_fields(p, env)
        await self.lookup.check_scope(current_api_key(), env.scope, env.scope_id)

        async def write(s: AsyncSession) -> Any:
            now = utcnow()
            saved = await self.store.save(s, p, env, None, request.reason, now)
            await check_scope_totals(s, p.tenant_id, saved)
            await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_POLICY_CREATED, target_type="policy_envelope",
                                    target_id=saved.envelope_id, reason=request.reason,
                                    summary=f"policy {saved.name} created at {policy_pb2.PolicyScope.Name(saved.scope)}",
                                    after={"revision": saved.revision, "scope": saved.scope, "scope_id": saved.scope_id,
                                           "mode": saved.mode})
            return policy_pb2.CreatePolicyEnvelopeResponse(envelope=saved)

        return await self._write("CreatePolicyEnvelope", request, policy_pb2.CreatePolicyEnvelopeResponse, write)

    async def GetPolicyEnvelope(self, request: policy_pb2.GetPolicyEnvelopeRequest, context: Ctx) -> Any:
        v = Violations()
        val.resource_id(v, "envelope_id", request.envelope_id)
        v.raise_if_any()
        p = current_principal()
        p.require("policies:read")

        async def read(s: AsyncSession) -> Any:
            row = await self.store.get_row(s, p.tenant_id, request.envelope_id)
            return policy_pb2.GetPolicyEnvelopeResponse(envelope=policy_pb2.PolicyEnvelope.FromString(row.body))

        return await self.db.read(read)

    async def ListPolicyEnvelopes(self, request: policy_pb2.ListPolicyEnvelopesRequest, context: Ctx) -> Any:
        _check_common(request)
        p = current_principal()
        p.require("policies:read")
        if request.scope_id and request.scope_id != p.tenant_id:
            await self._check_scope_filter(request.scope, request.scope_id)
        size = pagination.page_size(request.page_size)
        filters = {"scope": request.scope, "scope_id": request.scope_id, "mode": request.mode,
                   "active": int(request.active) + 1 if request.HasField("active") else 0}
        after = pagination.decode_token(request.page_token, filters)

        async def read(s: AsyncSession) -> Any:
            m = models.PolicyEnvelope
            q = select(m).where(m.tenant_id == p.tenant_id)
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

        return await self.db.read(read)

    async def _check_scope_filter(self, scope: int, scope_id: str) -> None:
        """NOT_FOUND unless `scope_id` names the caller's tenant or a project or version of it."""
        key = current_api_key()
        if scope == policy_pb2.POLICY_SCOPE_TENANT:
            raise NotFound.of("tenant", scope_id)
        if scope:
            await self.lookup.check_scope(key, scope, scope_id)
            return
        try:
            await self.lookup.check_scope(key, policy_pb2.POLICY_SCOPE_PROJECT, scope_id)
        except NotFound:
            await self.lookup.check_scope(key, policy_pb2.POLICY_SCOPE_VERSION, scope_id)

    async def UpdatePolicyEnvelope(self, request: policy_pb2.UpdatePolicyEnvelopeRequest, context: Ctx) -> Any:
        _check_common(request)
        v = Violations()
        val.resource_id(v, "envelope.envelope_id", request.envelope.envelope_id)
        v.raise_if_any()
        p = current_principal()
        p.require("policies:write")
        api_key = current_api_key()

        async def write(s: AsyncSession) -> Any:
            row = await self.store.get_row(s, p.tenant_id, request.envelope.envelope_id, for_update=True)
            self.store.check_etag(row, request.etag, required=True)
            current = policy_pb2.PolicyEnvelope.FromString(row.body)
            merged = self.store.apply_mask(current, request.envelope, request.update_mask)
            validate_envelope(merged)
            self.store.scope_fields(p, merged)
            moved = (merged.scope, merged.scope_id) != (current.scope, current.scope_id)
            if moved:
                await self.lookup.check_scope(api_key, merged.scope, merged.scope_id)
            saved = await self.store.save(s, p, merged, row, request.reason, utcnow())
            await check_scope_totals(s, p.tenant_id, saved)
            kind = CR.CHANGE_RECORD_TYPE_POLICY_ATTACHED if moved else CR.CHANGE_RECORD_TYPE_POLICY_UPDATED
            await self.store.record(s, p, kind, target_type="policy_envelope", target_id=saved.envelope_id,
                                    reason=request.reason, summary=f"policy {saved.name} revision {saved.revision}",
                                    before={"revision": current.revision, "scope": current.scope,
                                            "scope_id": current.scope_id, "active": current.active},
                                    after={"revision": saved.revision, "scope": saved.scope,
                                           "scope_id": saved.scope_id, "active": saved.active})
            return policy_pb2.UpdatePolicyEnvelopeResponse(envelope=saved)

        return await self._write("UpdatePolicyEnvelope", request, policy_pb2.UpdatePolicyEnvelopeResponse, write)

    async def DeactivatePolicyEnvelope(self, request: policy_pb2.DeactivatePolicyEnvelopeRequest, context: Ctx) -> Any:
        _check_common(request)
        v = Violations()
        val.resource_id(v, "envelope_id", request.envelope_id)
        v.raise_if_any()
        p = current_principal()
        p.require("policies:write")

        async def write(s: AsyncSession) -> Any:
            row = await self.store.get_row(s, p.tenant_id, request.envelope_id, for_update=True)
            self.store.check_etag(row, request.etag, required=False)
            env = policy_pb2.PolicyEnvelope.FromString(row.body)
            was_active = env.active
            env.active = False
            saved = await self.store.save(s, p, env, row, request.reason, utcnow())
            await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_POLICY_UPDATED, target_type="policy_envelope",
                                    target_id=saved.envelope_id, reason=request.reason,
                                    summary=f"policy {saved.name} deactivated",
                                    before={"active": was_active}, after={"active": False, "revision": saved.revision})
            return policy_pb2.DeactivatePolicyEnvelopeResponse(envelope=saved)

        return await self._write("DeactivatePolicyEnvelope", request,
                                 policy_pb2.DeactivatePolicyEnvelopeResponse, write)

    def _revision(self, row: models.PolicyEnvelopeRevision) -> policy_pb2.PolicyEnvelopeRevision:
        return policy_pb2.PolicyEnvelopeRevision(
            envelope_id=row.envelope_id, revision=row.revision,
            envelope=policy_pb2.PolicyEnvelope.FromString(row.body), create_time=ts(row.created_at),
            created_by=policy_pb2.PolicyEnvelope.FromString(row.body).updated_by, reason=row.reason)

    async def GetPolicyEnvelopeRevision(self, request: policy_pb2.GetPolicyEnvelopeRevisionRequest, context: Ctx) -> Any:
        v = Violations()
        val.resource_id(v, "envelope_id", request.envelope_id)
        if not 0 < request.revision <= val.INTEGER_MAX:
            v.add("revision", f"must be from 1 to {val.INTEGER_MAX}")
        v.raise_if_any()
        p = current_principal()
        p.require("policies:read")

        async def read(s: AsyncSession) -> Any:
            r = models.PolicyEnvelopeRevision
            row = (await s.execute(select(r).where(r.envelope_id == request.envelope_id,
                                                   r.revision == request.revision,
                                                   r.tenant_id == p.tenant_id))).scalar_one_or_none()
            if row is None:
                raise NotFound(f"policy envelope {request.envelope_id!r} has no revision {request.revision}",
                               reason="POLICY_REVISION_NOT_FOUND",
                               metadata={"envelope_id": request.envelope_id, "revision": str(request.revision)})
            return policy_pb2.GetPolicyEnvelopeRevisionResponse(envelope_revision=self._revision(row))

        return await self.db.read(read)

    async def ListPolicyEnvelopeRevisions(self, request: policy_pb2.ListPolicyEnvelopeRevisionsRequest, context: Ctx) -> Any:
        _check_common(request)
        v = Violations()
        val.resource_id(v, "envelope_id", request.envelope_id)
        v.raise_if_any()
        p = current_principal()
        p.require("policies:read")
        size = pagination.page_size(request.page_size)
        filters = {"envelope": request.envelope_id}
        after = pagination.decode_token(request.page_token, filters)

        async def read(s: AsyncSession) -> Any:
            await self.store.get_row(s, p.tenant_id, request.envelope_id)
            r = models.PolicyEnvelopeRevision
            q = select(r).where(r.envelope_id == request.envelope_id, r.tenant_id == p.tenant_id)
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

        return await self.db.read(read)

    async def GetEffectivePolicy(self, request: policy_pb2.GetEffectivePolicyRequest, context: Ctx) -> Any:
        kind = request.WhichOneof("agent")
        if kind is None:
            raise InvalidArgument("set instance_id or legacy_agent_id", reason="INVALID_FIELDS",
                                  violations=[FieldViolation("agent", "set instance_id or legacy_agent_id")])
        v = Violations()
        val.resource_id(v, kind, getattr(request, kind))
        v.raise_if_any()
        p = current_principal()
        p.require("policies:read")
        resolved = await self.agents.resolve(current_api_key(), p.tenant_id, kind, getattr(request, kind))
        if resolved is None:
            raise NotFound(f"no agent {getattr(request, kind)!r}", reason="AGENT_NOT_FOUND",
                           metadata={kind: getattr(request, kind)})
        tenant = await self.cache.tenant(p.tenant_id)
        policy, _ = tenant.compiled(resolved.project_id, resolved.version_id)
        return policy_pb2.GetEffectivePolicyResponse(
            instance_id=resolved.instance_id, legacy_agent_id=resolved.legacy_agent_id,
            version_id=resolved.version_id, project_id=resolved.project_id,
            environment_id=resolved.environment_id, policy_epoch=tenant.epoch,
            rules=convert.effective_rules(engine.effective_rules(policy)))

    async def SimulatePolicy(self, request: policy_pb2.SimulatePolicyRequest, context: Ctx) -> Any:
        validate_envelope(request.candidate, "candidate.")
        alone = policy_pb2.PolicyEnvelope(active=True, tool_rules=request.candidate.tool_rules)
        v = Violations()
        limits.scope_totals(v, "candidate", [alone])  # what one scope may hold, the candidate alone
        v.raise_if_any("the candidate is over the policy limits")
        if request.limit < 0:
            raise InvalidArgument("limit must not be negative", reason="INVALID_FIELDS",
                                  violations=[FieldViolation("limit", "must not be negative")])
        lookback = request.lookback.ToTimedelta() if request.HasField("lookback") else timedelta(days=1)
        if lookback <= timedelta(0) or lookback > MAX_LOOKBACK:
            raise InvalidArgument("lookback must be positive and at most 30 days", reason="INVALID_FIELDS",
                                  violations=[FieldViolation("lookback", "must be in (0, 30 days]")])
        limit = min(request.limit or 1000, 10_000)
        p = current_principal()
        p.require("policies:read")
        candidate = policy_pb2.PolicyEnvelope()
        candidate.CopyFrom(request.candidate)
        self.store.scope_fields(p, candidate)
        if not candidate.envelope_id:
            candidate.envelope_id = new_id("sim")
        candidate.active = True
        await self.lookup.check_scope(current_api_key(), candidate.scope, candidate.scope_id)
        tenant = await self.cache.tenant(p.tenant_id)
        if request.candidate.envelope_id:  # replaces an envelope of the caller's tenant
            await self.db.read(lambda s: self.store.get_row(s, p.tenant_id, candidate.envelope_id))
        envelopes = [e for e in tenant.envelopes if e.id != candidate.envelope_id]
        envelopes.append(convert.envelope_to_engine(candidate))

        async def read(s: AsyncSession) -> Any:
            d = models.DecisionRecord
            q = select(d.id, d.decided_at, d.instance_id, d.tool_name, d.decision, d.request, d.agent).where(
                d.tenant_id == p.tenant_id, d.decided_at >= utcnow() - lookback, d.agent != b"")
            # Only decisions of agents the candidate's scope covers.
            if candidate.scope == policy_pb2.POLICY_SCOPE_PROJECT:
                q = q.where(d.project_id == candidate.scope_id)
            elif candidate.scope == policy_pb2.POLICY_SCOPE_VERSION:
                q = q.where(d.version_id == candidate.scope_id)
            return (await s.execute(q.order_by(d.decided_at.desc()).limit(limit + 1))).all()

        rows = await self.db.read(read)
        return convert.simulate(rows[:limit], envelopes, tenant, truncated=len(rows) > limit)

    # operator controls

    async def SetOperatorControl(self, request: policy_pb2.SetOperatorControlRequest, context: Ctx) -> Any:
        _check_common(request)
        v = Violations()
        val.enum_set(v, "scope", request.scope, {1, 2})
        val.enum_set(v, "mode", request.mode, {1, 2, 3, 4})
        if request.scope == policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT:
            val.resource_id(v, "scope_id", request.scope_id)
        v.raise_if_any()
        p = current_principal()
        p.require("policies:write")
        scope_id = self.store.control_key(p, request.scope, request.scope_id)
        if request.scope == policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT:
            await self.lookup.check_scope(current_api_key(), policy_pb2.POLICY_SCOPE_PROJECT, scope_id)

        async def write(s: AsyncSession) -> Any:
            c = models.OperatorControl
            row = (await s.execute(select(c).where(c.tenant_id == p.tenant_id, c.scope == request.scope,
                                                   c.scope_id == scope_id).with_for_update())).scalar_one_or_none()
            before = convert.control_mode_name(row.mode if row else None)
            if row is None:
                row = c(tenant_id=p.tenant_id, scope=request.scope, scope_id=scope_id, revision=0)
                s.add(row)
            else:
                self.store.check_etag(row, request.etag, required=False)
            row.mode, row.reason, row.updated_at = request.mode, request.reason, utcnow()
            row.actor_type, row.actor_id, row.revision = actor(p).type, p.actor_id, row.revision + 1
            await self.store.bump_epoch(s, p.tenant_id)
            after = convert.control_mode_name(request.mode)
            await self.store.record(
                s, p, CR.CHANGE_RECORD_TYPE_EMERGENCY_PAUSE, target_type=(
                    "tenant" if request.scope == policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT else "project"),
                target_id=scope_id, reason=request.reason,
                project_id=scope_id if request.scope == policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT else "",
                summary=f"kill switch {before} → {after}", before={"mode": before}, after={"mode": after})
            return policy_pb2.SetOperatorControlResponse(control=convert.control(row))

        return await self._write("SetOperatorControl", request, policy_pb2.SetOperatorControlResponse, write)

    async def GetRiskOverrides(self, request: policy_pb2.GetRiskOverridesRequest, context: Ctx) -> Any:
        p = current_principal()
        p.require("policies:read")

        async def read(s: AsyncSession) -> Any:
            row = (await s.execute(select(models.RiskOverrides).where(
                models.RiskOverrides.tenant_id == p.tenant_id))).scalar_one_or_none()
            return policy_pb2.GetRiskOverridesResponse(risk_overrides=_risk_overrides(p.tenant_id, row))

        return await self.db.read(read)

    async def SetRiskOverrides(self, request: policy_pb2.SetRiskOverridesRequest, context: Ctx) -> Any:
        _check_common(request)
        v = Violations()
        validate_risk_overrides(v, "overrides", request.overrides)
        val.optional(v, "reason", request.reason, val.MAX_TEXT)
        v.raise_if_any()
        p = current_principal()
        p.require("policies:write")

        async def write(s: AsyncSession) -> Any:
            m = models.RiskOverrides
            row = (await s.execute(select(m).where(m.tenant_id == p.tenant_id).with_for_update())).scalar_one_or_none()
            if row is None:
                if request.etag and request.etag != "0":
                    raise Aborted(f"etag {request.etag!r} does not match the current 0; re-read and retry",
                                  reason="ETAG_MISMATCH", metadata={"current_etag": "0"})
                row = m(tenant_id=p.tenant_id, revision=0)
                s.add(row)
                before: list[dict[str, Any]] = []
            else:
                self.store.check_etag(row, request.etag, required=False)
                before = [json_format.MessageToDict(o) for o in policy_pb2.RiskOverrides.FromString(row.body).overrides]
            row.body = policy_pb2.RiskOverrides(overrides=request.overrides).SerializeToString()
            row.revision, row.updated_at = row.revision + 1, utcnow()
            await s.flush()
            await self.store.bump_epoch(s, p.tenant_id)
            await self.store.record(
                s, p, CR.CHANGE_RECORD_TYPE_POLICY_UPDATED, target_type="risk_overrides", target_id=p.tenant_id,
                reason=request.reason, summary=f"risk overrides: {len(request.overrides)} entries",
                before={"overrides": before},
                after={"overrides": [json_format.MessageToDict(o) for o in request.overrides]})
            return policy_pb2.SetRiskOverridesResponse(risk_overrides=_risk_overrides(p.tenant_id, row))

        return await self._write("SetRiskOverrides", request, policy_pb2.SetRiskOverridesResponse, write)

    async def GetOperatorControl(self, request: policy_pb2.GetOperatorControlRequest, context: Ctx) -> Any:
        v = Violations()
        val.enum_set(v, "scope", request.scope, {1, 2})
        if request.scope == policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT:
            val.resource_id(v, "scope_id", request.scope_id)
        v.raise_if_any()
        p = current_principal()
        p.require("policies:read")
        scope_id = self.store.control_key(p, request.scope, request.scope_id)

        async def read(s: AsyncSession) -> Any:
            c = models.OperatorControl
            row = (await s.execute(select(c).where(c.tenant_id == p.tenant_id, c.scope == request.scope,
                                                   c.scope_id == scope_id))).scalar_one_or_none()
            return None if row is None else policy_pb2.GetOperatorControlResponse(control=convert.control(row))

        found = await self.db.read(read)
        if found is not None:
            return found
        if request.scope == policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT:
            # No control set: the default answers only for a project of the caller's tenant.
            await self.lookup.check_scope(current_api_key(), policy_pb2.POLICY_SCOPE_PROJECT, scope_id)
        return policy_pb2.GetOperatorControlResponse(control=policy_pb2.OperatorControl(
            tenant_id=p.tenant_id, scope=request.scope, scope_id=scope_id,
            mode=policy_pb2.OPERATOR_CONTROL_MODE_NORMAL, etag="0"))

    async def ListOperatorControls(self, request: policy_pb2.ListOperatorControlsRequest, context: Ctx) -> Any:
        _check_common(request)
        p = current_principal()
        p.require("policies:read")
        size = pagination.page_size(request.page_size)
        filters = {"mode": request.mode}
        after = pagination.decode_token(request.page_token, filters)

        async def read(s: AsyncSession) -> Any:
            c = models.OperatorControl
            q = select(c).where(c.tenant_id == p.tenant_id)
            if request.mode:
                q = q.where(c.mode == request.mode)
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

        return await self.db.read(read)


class DecisionServicer(LocalDecisionRpcs, decision_pb2_grpc.DecisionServiceServicer):
    def __init__(self, db: Database, decider: Decider, spend: SpendBook, changes: Any) -> None:
        self.db = db
        self.decider = decider
        self.spend = spend
        self.changes = changes
        self.reader = DecisionReader(db)

    async def Check(self, request: decision_pb2.CheckRequest, context: Ctx) -> Any:
        validate_check(request)
        return await self.decider.check(current_principal(), current_api_key(), request)

    async def CheckBatch(self, request: decision_pb2.CheckBatchRequest, context: Ctx) -> Any:
        check_batch_limit(len(request.checks))
        for i, item in enumerate(request.checks):
            validate_check(item, f"checks[{i}].")
        p, key = current_principal(), current_api_key()
        results = await asyncio.gather(*(self.decider.check(p, key, item) for item in request.checks))
        return decision_pb2.CheckBatchResponse(results=results, request_id=request.request_id)

    async def GetDecision(self, request: decision_pb2.GetDecisionRequest, context: Ctx) -> Any:
        v = Violations()
        val.resource_id(v, "decision_id", request.decision_id)
        v.raise_if_any()
        p = current_principal()
        p.require("audit:read")
        return decision_pb2.GetDecisionResponse(decision=await self.reader.get(p.tenant_id, request.decision_id))

    async def ListDecisions(self, request: decision_pb2.ListDecisionsRequest, context: Ctx) -> Any:
        v = Violations()
        flt = DecisionFilter.of(v, request.filter, "filter")
        v.raise_if_any()
        p = current_principal()
        p.require("audit:read")
        await self._own_instance(p, flt.instance_id)
        return await self.reader.page(p.tenant_id, flt, pagination.page_size(request.page_size),
                                      request.page_token)

    async def _own_instance(self, p: Principal, instance_id: str) -> None:
        """A filter naming another tenant's (or no) instance is NOT_FOUND, never an empty page."""
        if instance_id and await self.decider.agents.resolve(
                current_api_key(), p.tenant_id, "instance_id", instance_id) is None:
            raise NotFound.of("agent_instance", instance_id)

    async def ExportDecisions(self, request: decision_pb2.ExportDecisionsRequest,
                              context: Ctx) -> AsyncIterator[decision_pb2.ExportDecisionsResponse]:
        v = Violations()
        flt = DecisionFilter.of(v, request.filter, "filter")
        v.raise_if_any()
        p = current_principal()
        p.require("audit:read")
        await self._own_instance(p, flt.instance_id)
        async for batch in self.reader.scan(p.tenant_id, flt):
            yield decision_pb2.ExportDecisionsResponse(
                data="".join(export_line(d) for d in batch).encode(), decision_count=len(batch))
    async def EvaluatePolicy(self, request: decision_pb2.EvaluatePolicyRequest, context: Ctx) -> Any:
        """Hypothetical calls under given envelopes, with the engine and classifier of `Check`:
        nothing logged, no approval, nothing stored read (`arm policy test --server`)."""
        envelopes, calls = evaluation_inputs(request)
        p = current_principal()
        p.require("policies:read")
        overrides = convert.risk_overrides_to_engine(request.risk_overrides)
        classifier = engine.Classifier(overrides=overrides) if overrides else self.decider.classifier
        envelopes = [dataclasses.replace(e, scope_id=p.tenant_id) if e.scope == engine.Scope.TENANT else e
                     for e in envelopes]
        results = []
        for ctx, call in calls:
            policy = engine.compile_policy(envelopes, tenant_id=p.tenant_id, project_id=ctx.project,
                                           version_id=ctx.version)
            agent = None if ctx.unknown_agent else engine.Agent(
                tenant_id=p.tenant_id, tenant_active=not ctx.tenant_inactive, project_id=ctx.project,
                environment_id=ctx.environment_name, environment_name=ctx.environment_name,
                environment_type=(ctx.environment_type or "DEV").upper(), template_id="",
                version_id=ctx.version, instance_id="evaluation",
                instance_state=(ctx.instance_state or "ACTIVE").upper(),
                version_state=(ctx.version_state or "APPROVED").upper())
            result = engine.decide(
                policy, agent, call,
                controls=engine.Controls(convert.control_mode_name(ctx.tenant_control),
                                         convert.control_mode_name(ctx.project_control)),
                spend=engine.Spend(ctx.run_spent_usd, ctx.day_spent_usd, ctx.month_spent_usd),
                classifier=classifier)
            results.append(convert.result_fields(result))
        return decision_pb2.EvaluatePolicyResponse(results=results)

    async def ReportSpend(self, request: decision_pb2.ReportSpendRequest, context: Ctx) -> Any:
        _check_common(request)
        e = request.entry
        v = Violations()
        if not (e.instance_id or e.legacy_agent_id):
            v.add("entry.instance_id", "set instance_id or legacy_agent_id")
        val.resource_id(v, "entry.instance_id", e.instance_id, required_=False)
        val.resource_id(v, "entry.legacy_agent_id", e.legacy_agent_id, required_=False)
        val.required(v, "entry.idempotency_key", e.idempotency_key, 128)
        val.optional(v, "entry.run_id", e.run_id, 128)
        val.optional(v, "entry.tool_call_id", e.tool_call_id, 128)
        if not math.isfinite(e.amount_usd) or e.amount_usd < 0:
            v.add("entry.amount_usd", "must be a finite amount >= 0")
        v.raise_if_any()
        p = current_principal()
        if not p.has("decisions:check") and not p.has("telemetry:write"):
            p.require("decisions:check")
        kind = "instance_id" if e.instance_id else "legacy_agent_id"
        resolved = await self.decider.agents.resolve(current_api_key(), p.tenant_id, kind, getattr(e, kind))
        if resolved is None:
            raise NotFound(f"no agent {getattr(e, kind)!r}", reason="AGENT_NOT_FOUND", metadata={kind: getattr(e, kind)})
        if p.is_agent and resolved.instance_id != p.actor_id:
            raise PermissionDenied("an agent key may only report its own spend", reason="NOT_YOUR_AGENT")
        if e.instance_id and e.legacy_agent_id and resolved.legacy_agent_id != e.legacy_agent_id:
            # Both named: the legacy id must be this instance's (and so the caller's tenant's).
            other = await self.decider.agents.resolve(current_api_key(), p.tenant_id, "legacy_agent_id",
                                                      e.legacy_agent_id)
            if other is None:
                raise NotFound(f"no agent {e.legacy_agent_id!r}", reason="AGENT_NOT_FOUND",
                               metadata={"legacy_agent_id": e.legacy_agent_id})
            raise InvalidArgument("entry.legacy_agent_id names another agent than entry.instance_id",
                                  reason="AGENT_MISMATCH",
                                  violations=[FieldViolation("entry.legacy_agent_id", "must be the instance's legacy id")])
        now = utcnow()
        occurred = e.occur_time.ToDatetime(tzinfo=now.tzinfo) if e.HasField("occur_time") else now

        async def write(s: AsyncSession) -> Any:
            m = models.SpendEntry
            row = (await s.execute(select(m).where(m.tenant_id == p.tenant_id,
                                                   m.idempotency_key == e.idempotency_key))).scalar_one_or_none()
            duplicate = row is not None
            if row is None:
                row = m(id=new_id("spd"), tenant_id=p.tenant_id, instance_id=resolved.instance_id,
                        run_id=e.run_id, tool_call_id=e.tool_call_id, amount_usd=e.amount_usd,
                        idempotency_key=e.idempotency_key, occurred_at=occurred, recorded_at=now)
                s.add(row)
                await self.changes.send(s, {"spend": resolved.instance_id})
            return decision_pb2.ReportSpendResponse(entry=convert.spend_entry(row, resolved.legacy_agent_id),
                                                    duplicate=duplicate)

        try:
            result = await self.db.run(write)
        except IntegrityError:  # a concurrent report with the same key won: this one is its duplicate
            result = await self.db.run(write)
        self.spend.invalidate(resolved.instance_id)
        return result
