"""DecisionService: `Check` and `CheckBatch` through the decider, decision reads, `EvaluatePolicy`
with the pure engine, `ReportSpend` into the spend book."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import json_format

from arm.governance.v1 import decision_pb2, decision_pb2_grpc, policy_pb2
from arm_common import pagination
from arm_common import validation as val
from arm_common.auth import Principal, current_api_key, current_principal
from arm_common.db import Database
from arm_common.errors import FieldViolation, InvalidArgument, NotFound, PermissionDenied, Violations
from arm_common.server import Ctx
from arm_engine import engine
from arm_governance import convert
from arm_governance.decisions import denied_tools
from arm_governance.decisions.local import LocalDecisionRpcs
from arm_governance.decisions.reads import DecisionFilter, DecisionReader, export_line
from arm_governance.decisions.service import Decider, SpendBook, check_batch_limit, validate_check
from arm_governance.edge import check_common
from arm_governance.policy import limits
from arm_governance.policy.limits import validate_argument_triggers, validate_risk_overrides
from arm_governance.policy.store import (
    validate_envelope,
)

MAX_EVALUATION_ENVELOPES = 60
MAX_EVALUATION_CALLS = 500
_GRANTS = {"VALID", "PENDING", "NOT_FOUND", "NOT_APPROVED", "EXPIRED", "USED", "MISMATCH"}


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
    validate_argument_triggers(v, "argument_triggers", request.argument_triggers)
    v.raise_if_any("the evaluation request is not valid")
    return envelopes, calls



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

    async def ListDeniedTools(self, request: decision_pb2.ListDeniedToolsRequest, context: Ctx) -> Any:
        denied_tools.validate(request)
        return await denied_tools.list_denied_tools(self.decider.agents, self.decider.policies, current_principal(),
                                                    current_api_key(), request)

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
        classifier = convert.risk_classifier(request.risk_overrides, request.argument_triggers
                                             ) or self.decider.classifier
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
        check_common(request)
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
        return await self.spend.record(p.tenant_id, resolved.instance_id, resolved.legacy_agent_id, e,
                                       self.changes)
