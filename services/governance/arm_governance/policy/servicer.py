"""PolicyService: validate at the edge, check permissions, delegate to the policy store and the
policy cache, convert to protobuf."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from arm.governance.v1 import policy_pb2, policy_pb2_grpc
from arm_common import pagination
from arm_common import validation as val
from arm_common.auth import current_api_key, current_principal
from arm_common.db import Database
from arm_common.errors import FieldViolation, InvalidArgument, NotFound, Violations
from arm_common.ids import new_id
from arm_common.server import Ctx
from arm_engine import engine
from arm_governance import convert
from arm_governance.agent_cache import AgentDirectory
from arm_governance.edge import Writes, check_common
from arm_governance.policy import limits
from arm_governance.policy.cache import PolicyCache
from arm_governance.policy.limits import validate_argument_triggers, validate_risk_overrides
from arm_governance.policy.store import PolicyStore, RegistryLookup, validate_envelope

MAX_LOOKBACK = timedelta(days=30)


class PolicyServicer(Writes, policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, db: Database, store: PolicyStore, cache: PolicyCache, agents: AgentDirectory,
                 lookup: RegistryLookup) -> None:
        self.db = db
        self.store = store
        self.cache = cache
        self.agents = agents
        self.lookup = lookup

    def _written(self, tenant_id: str) -> None:
        self.cache.invalidate(tenant_id)  # this process at once; others on the notice

    async def CreatePolicyEnvelope(self, request: policy_pb2.CreatePolicyEnvelopeRequest, context: Ctx) -> Any:
        check_common(request)
        validate_envelope(request.envelope)
        p = current_principal()
        p.require("policies:write")
        env = policy_pb2.PolicyEnvelope()
        env.CopyFrom(request.envelope)
        self.store.scope_fields(p, env)
        await self.lookup.check_scope(current_api_key(), env.scope, env.scope_id)

        return await self._write("CreatePolicyEnvelope", request, policy_pb2.CreatePolicyEnvelopeResponse,
                                 lambda s: self.store.create(s, p, env, request.reason))

    async def GetPolicyEnvelope(self, request: policy_pb2.GetPolicyEnvelopeRequest, context: Ctx) -> Any:
        v = Violations()
        val.resource_id(v, "envelope_id", request.envelope_id)
        v.raise_if_any()
        p = current_principal()
        p.require("policies:read")

        envelope = await self.store.get_envelope(p.tenant_id, request.envelope_id)
        return policy_pb2.GetPolicyEnvelopeResponse(envelope=envelope)

    async def ListPolicyEnvelopes(self, request: policy_pb2.ListPolicyEnvelopesRequest, context: Ctx) -> Any:
        check_common(request)
        p = current_principal()
        p.require("policies:read")
        if request.scope_id and request.scope_id != p.tenant_id:
            await self._check_scope_filter(request.scope, request.scope_id)
        size = pagination.page_size(request.page_size)
        filters = {"scope": request.scope, "scope_id": request.scope_id, "mode": request.mode,
                   "active": int(request.active) + 1 if request.HasField("active") else 0}
        after = pagination.decode_token(request.page_token, filters)

        return await self.store.list_envelopes(p.tenant_id, request, size, after, filters)

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
        check_common(request)
        v = Violations()
        val.resource_id(v, "envelope.envelope_id", request.envelope.envelope_id)
        v.raise_if_any()
        p = current_principal()
        p.require("policies:write")
        api_key = current_api_key()

        async def check_scope(scope: int, scope_id: str) -> None:
            await self.lookup.check_scope(api_key, scope, scope_id)

        return await self._write("UpdatePolicyEnvelope", request, policy_pb2.UpdatePolicyEnvelopeResponse,
                                 lambda s: self.store.update(s, p, request, check_scope))

    async def DeactivatePolicyEnvelope(self, request: policy_pb2.DeactivatePolicyEnvelopeRequest, context: Ctx) -> Any:
        check_common(request)
        v = Violations()
        val.resource_id(v, "envelope_id", request.envelope_id)
        v.raise_if_any()
        p = current_principal()
        p.require("policies:write")

        return await self._write("DeactivatePolicyEnvelope", request, policy_pb2.DeactivatePolicyEnvelopeResponse,
                                 lambda s: self.store.deactivate(s, p, request))

    async def GetPolicyEnvelopeRevision(self, request: policy_pb2.GetPolicyEnvelopeRevisionRequest, context: Ctx) -> Any:
        v = Violations()
        val.resource_id(v, "envelope_id", request.envelope_id)
        if not 0 < request.revision <= val.INTEGER_MAX:
            v.add("revision", f"must be from 1 to {val.INTEGER_MAX}")
        v.raise_if_any()
        p = current_principal()
        p.require("policies:read")

        revision = await self.store.get_revision(p.tenant_id, request.envelope_id, request.revision)
        return policy_pb2.GetPolicyEnvelopeRevisionResponse(envelope_revision=revision)

    async def ListPolicyEnvelopeRevisions(self, request: policy_pb2.ListPolicyEnvelopeRevisionsRequest, context: Ctx) -> Any:
        check_common(request)
        v = Violations()
        val.resource_id(v, "envelope_id", request.envelope_id)
        v.raise_if_any()
        p = current_principal()
        p.require("policies:read")
        size = pagination.page_size(request.page_size)
        filters = {"envelope": request.envelope_id}
        after = pagination.decode_token(request.page_token, filters)

        return await self.store.list_revisions(p.tenant_id, request.envelope_id, size, after, filters)

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
            await self.store.get_envelope(p.tenant_id, candidate.envelope_id)
        envelopes = [e for e in tenant.envelopes if e.id != candidate.envelope_id]
        envelopes.append(convert.envelope_to_engine(candidate))

        rows = await self.store.recent_decisions(p.tenant_id, candidate, lookback, limit + 1)
        return convert.simulate(rows[:limit], envelopes, tenant, truncated=len(rows) > limit)

    # operator controls

    async def SetOperatorControl(self, request: policy_pb2.SetOperatorControlRequest, context: Ctx) -> Any:
        check_common(request)
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

        return await self._write("SetOperatorControl", request, policy_pb2.SetOperatorControlResponse,
                                 lambda s: self.store.set_operator_control(s, p, request, scope_id))

    async def GetRiskOverrides(self, request: policy_pb2.GetRiskOverridesRequest, context: Ctx) -> Any:
        p = current_principal()
        p.require("policies:read")

        overrides = await self.store.get_risk_overrides(p.tenant_id)
        return policy_pb2.GetRiskOverridesResponse(risk_overrides=overrides)

    async def SetRiskOverrides(self, request: policy_pb2.SetRiskOverridesRequest, context: Ctx) -> Any:
        check_common(request)
        v = Violations()
        validate_risk_overrides(v, "overrides", request.overrides)
        validate_argument_triggers(v, "argument_triggers", request.argument_triggers)
        val.optional(v, "reason", request.reason, val.MAX_TEXT)
        v.raise_if_any()
        p = current_principal()
        p.require("policies:write")

        return await self._write("SetRiskOverrides", request, policy_pb2.SetRiskOverridesResponse,
                                 lambda s: self.store.set_risk_overrides(s, p, request))

    async def GetOperatorControl(self, request: policy_pb2.GetOperatorControlRequest, context: Ctx) -> Any:
        v = Violations()
        val.enum_set(v, "scope", request.scope, {1, 2})
        if request.scope == policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT:
            val.resource_id(v, "scope_id", request.scope_id)
        v.raise_if_any()
        p = current_principal()
        p.require("policies:read")
        scope_id = self.store.control_key(p, request.scope, request.scope_id)

        found = await self.store.get_operator_control(p.tenant_id, request.scope, scope_id)
        if found is not None:
            return policy_pb2.GetOperatorControlResponse(control=found)
        if request.scope == policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT:
            # No control set: the default answers only for a project of the caller's tenant.
            await self.lookup.check_scope(current_api_key(), policy_pb2.POLICY_SCOPE_PROJECT, scope_id)
        return policy_pb2.GetOperatorControlResponse(control=policy_pb2.OperatorControl(
            tenant_id=p.tenant_id, scope=request.scope, scope_id=scope_id,
            mode=policy_pb2.OPERATOR_CONTROL_MODE_NORMAL, etag="0"))

    async def ListOperatorControls(self, request: policy_pb2.ListOperatorControlsRequest, context: Ctx) -> Any:
        check_common(request)
        p = current_principal()
        p.require("policies:read")
        size = pagination.page_size(request.page_size)
        filters = {"mode": request.mode}
        after = pagination.decode_token(request.page_token, filters)

        return await self.store.list_operator_controls(p.tenant_id, request.mode, size, after, filters)
