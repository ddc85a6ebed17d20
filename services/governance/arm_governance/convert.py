"""Conversions between protobuf messages, ORM rows and the engine's dataclasses, in one place."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from google.protobuf import json_format

from arm.governance.v1 import decision_pb2, policy_pb2
from arm.registry.v1 import agents_pb2, compat_pb2, tenancy_pb2
from arm_common.decision_inputs import (  # shared with the SDK's local decisions
    argument_triggers_to_engine,
    control_mode_name,
    envelope_to_engine,
    result_fields,
    risk_classifier,
    risk_overrides_to_engine,
)
from arm_common.messages import ts
from arm_engine import engine

__all__ = ["argument_triggers_to_engine", "control_mode_name", "envelope_to_engine", "result_fields", "risk_classifier",
           "risk_overrides_to_engine"]


def agent_to_engine(agent: compat_pb2.ResolvedAgent) -> engine.Agent:
    return engine.Agent(
        tenant_id=agent.tenant_id, tenant_active=agent.tenant_active, project_id=agent.project_id,
        environment_id=agent.environment_id, environment_name=agent.environment_name,
        environment_type=tenancy_pb2.EnvironmentType.Name(agent.environment_type).removeprefix("ENVIRONMENT_TYPE_"),
        template_id=agent.template_id, version_id=agent.version_id, instance_id=agent.instance_id,
        instance_state=agents_pb2.InstanceState.Name(agent.instance_state).removeprefix("INSTANCE_STATE_"),
        version_state=agents_pb2.VersionState.Name(agent.version_state).removeprefix("VERSION_STATE_"))


def arguments(request: decision_pb2.CheckRequest) -> dict[str, Any] | None:
    return json_format.MessageToDict(request.arguments) if request.HasField("arguments") else None


class ResultCache:
    """Per-result values derived once: the engine memoises its results, so the decision path
    sees the same few Result objects over and over. Keyed by identity; an entry holds its result,
    so the id cannot be reused while the entry lives. Bounded (cleared when full)."""

    def __init__(self, build: Callable[[engine.Result], Any], limit: int = 4096) -> None:
        self.build = build
        self.limit = limit
        self._entries: dict[int, tuple[engine.Result, Any]] = {}

    def get(self, result: engine.Result) -> Any:
        entry = self._entries.get(id(result))
        if entry is None or entry[0] is not result:
            if len(self._entries) >= self.limit:
                self._entries.clear()
            entry = self._entries[id(result)] = (result, self.build(result))
        return entry[1]


_RESPONSE_FIELDS = ResultCache(lambda result: result_fields(result).SerializeToString())


def result_to_response(result: engine.Result, *, decision_id: str, approval_id: str, epoch: int,
                       request_id: str, decided: datetime) -> decision_pb2.CheckResponse:
    # Parsing the cached bytes of the result's part is much cheaper than building its messages.
    resp = decision_pb2.CheckResponse.FromString(_RESPONSE_FIELDS.get(result))
    resp.approval_id = approval_id
    resp.decision_id = decision_id
    resp.policy_epoch = epoch
    resp.request_id = request_id
    resp.decide_time.CopyFrom(ts(decided))
    return resp


def control(row: Any) -> policy_pb2.OperatorControl:
    from arm.common.v1 import common_pb2
    return policy_pb2.OperatorControl(
        tenant_id=row.tenant_id, scope=row.scope, scope_id=row.scope_id, mode=row.mode, reason=row.reason,
        update_time=ts(row.updated_at), updated_by=common_pb2.Actor(type=row.actor_type, id=row.actor_id),
        etag=str(row.revision))


def spend_entry(row: Any, legacy_agent_id: str) -> decision_pb2.SpendEntry:
    return decision_pb2.SpendEntry(
        entry_id=row.id, tenant_id=row.tenant_id, instance_id=row.instance_id,
        legacy_agent_id=legacy_agent_id, run_id=row.run_id, tool_call_id=row.tool_call_id,
        amount_usd=row.amount_usd, idempotency_key=row.idempotency_key, occur_time=ts(row.occurred_at),
        record_time=ts(row.recorded_at))


def simulate(rows: list[Any], envelopes: list[engine.Envelope], tenant: Any, *,
             truncated: bool) -> policy_pb2.SimulatePolicyResponse:
    """Re-decides logged calls with the candidate envelope in place. Spend is taken as zero and
    approval grants as absent (both are one-off facts of the original call), kill switches as they
    are now; calls of unknown agents are skipped (they are denied before any policy)."""
    out = policy_pb2.SimulatePolicyResponse(truncated=truncated)
    compiled: dict[tuple[str, str], engine.CompiledPolicy] = {}
    for row in rows:
        if not row.agent:
            continue
        resolved = compat_pb2.ResolvedAgent.FromString(row.agent)
        request = decision_pb2.CheckRequest.FromString(row.request)
        key = (resolved.project_id, resolved.version_id)
        if key not in compiled:
            compiled[key] = engine.compile_policy(envelopes, tenant_id=resolved.tenant_id,
                                                  project_id=resolved.project_id, version_id=resolved.version_id)
        call = engine.Call(tool=request.tool_name, arguments=arguments(request),
                           declared_risk=engine.Risk(request.declared_risk) if request.declared_risk else None,
                           estimated_cost_usd=request.estimated_cost_usd, is_run_start=request.is_run_start)
        result = engine.decide(compiled[key], agent_to_engine(resolved), call,
                               controls=tenant.controls_for(resolved.project_id))
        out.evaluated_count += 1
        if int(result.effect) != row.decision:
            out.flipped_count += 1
            out.flips.append(policy_pb2.PolicyFlip(
                decision_id=row.id, decide_time=ts(row.decided_at), instance_id=row.instance_id,
                tool_name=row.tool_name, effective_risk=int(result.risk), original_decision=row.decision,
                simulated_decision=int(result.effect),
                simulated_reasons=[policy_pb2.Reason(code=r.code, message=r.message) for r in result.reasons]))
    return out


def _tool_rule(rule: engine.ToolRule) -> policy_pb2.ToolRule:
    return policy_pb2.ToolRule(
        tool=rule.tool, effect=int(rule.effect), locked=rule.locked, description=rule.description,
        when=policy_pb2.ToolRuleCondition(min_risk=int(rule.min_risk) if rule.min_risk else 0,
                                          environments=list(rule.environments),
                                          arg_patterns=list(rule.arg_patterns)))


def effective_rules(rules: list[engine.EffectiveRule]) -> list[policy_pb2.EffectiveRule]:
    out = []
    for r in rules:
        item = policy_pb2.EffectiveRule(
            scope=int(r.scope), scope_id=r.scope_id, envelope_id=r.envelope_id,
            envelope_name=r.envelope_name, envelope_revision=r.envelope_revision, priority=r.priority,
            mode=int(r.mode), kind=int(r.kind))
        if r.rule_index is not None:
            item.rule_index = r.rule_index
        if r.tool_rule is not None:
            item.tool_rule.CopyFrom(_tool_rule(r.tool_rule))
        elif r.risk_threshold is not None:
            item.risk_threshold = int(r.risk_threshold)
        elif r.autonomy_tier is not None:
            item.autonomy_tier = r.autonomy_tier
        elif r.budgets is not None:
            b = r.budgets
            item.budgets.CopyFrom(policy_pb2.Budgets(
                **{k: v for k, v in (("per_run_usd", b.per_run_usd), ("daily_usd", b.daily_usd),
                                     ("monthly_usd", b.monthly_usd)) if v is not None}))
        elif r.default_effect is not None:
            item.default_effect = int(r.default_effect)
        out.append(item)
    return out
