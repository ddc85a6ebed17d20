"""Conversions between protobuf messages, ORM rows and the engine's dataclasses, in one place."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from google.protobuf import json_format

from arm.governance.v1 import decision_pb2, policy_pb2
from arm.registry.v1 import agents_pb2, compat_pb2, tenancy_pb2
from arm_common.messages import ts
from arm_engine import engine
from arm_engine.risk import ArgumentTrigger, RiskOverride, tenant_triggers

_CONTROL_NAMES = {policy_pb2.OPERATOR_CONTROL_MODE_NORMAL: "NORMAL",
                  policy_pb2.OPERATOR_CONTROL_MODE_PAUSED: "PAUSED",
                  policy_pb2.OPERATOR_CONTROL_MODE_DRAINING: "DRAINING",
                  policy_pb2.OPERATOR_CONTROL_MODE_QUARANTINED: "QUARANTINED"}




def control_mode_name(mode: int | None) -> str:
    return _CONTROL_NAMES.get(mode or policy_pb2.OPERATOR_CONTROL_MODE_NORMAL, "NORMAL")


def _risk(value: int) -> engine.Risk | None:
    return engine.Risk(value) if value else None


def envelope_to_engine(env: policy_pb2.PolicyEnvelope) -> engine.Envelope:
    budgets = None
    if env.HasField("budgets"):
        b = env.budgets
        budgets = engine.Budgets(
            per_run_usd=b.per_run_usd if b.HasField("per_run_usd") else None,
            daily_usd=b.daily_usd if b.HasField("daily_usd") else None,
            monthly_usd=b.monthly_usd if b.HasField("monthly_usd") else None)
    return engine.Envelope(
        id=env.envelope_id, name=env.name, revision=env.revision, scope=engine.Scope(env.scope),
        scope_id=env.scope_id, priority=env.priority if env.HasField("priority") else 100,
        active=env.active if env.HasField("active") else True,
        shadow=env.mode == policy_pb2.POLICY_MODE_SHADOW,
        tool_rules=tuple(engine.ToolRule(
            tool=r.tool, effect=engine.Effect(r.effect), locked=r.locked,
            min_risk=_risk(r.when.min_risk), environments=tuple(r.when.environments),
            arg_patterns=tuple(r.when.arg_patterns), description=r.description) for r in env.tool_rules),
        require_approval_at_risk=_risk(env.require_approval_at_risk),
        deny_at_risk=_risk(env.deny_at_risk),
        autonomy_tier=env.autonomy_tier if env.HasField("autonomy_tier") else None,
        budgets=budgets,
        default_effect=engine.Effect(env.default_effect) if env.default_effect else None)


def risk_overrides_to_engine(overrides: Any) -> tuple[RiskOverride, ...]:
    """The engine's entries of `RiskOverride` messages (validated on write)."""
    return tuple(RiskOverride(o.tool, engine.Risk(o.risk), tuple(sorted(o.arguments_below.items())))
                 for o in overrides)


def argument_triggers_to_engine(triggers: Any) -> tuple[ArgumentTrigger, ...]:
    """The engine's entries of `ArgumentTrigger` messages (validated on write)."""
    return tuple(ArgumentTrigger(t.label, t.pattern, engine.Risk(t.risk or engine.Risk.HIGH), t.disabled)
                 for t in triggers)


def risk_classifier(overrides: Any, triggers: Any) -> engine.Classifier | None:
    """The classifier of a tenant's `RiskOverride` and `ArgumentTrigger` messages; None when both
    are empty (the default classifier)."""
    if not overrides and not triggers:
        return None
    return engine.Classifier(overrides=risk_overrides_to_engine(overrides),
                             triggers=tenant_triggers(argument_triggers_to_engine(triggers)))


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


def result_fields(result: engine.Result) -> decision_pb2.CheckResponse:
    """The part of a CheckResponse that depends on the result alone."""
    resp = decision_pb2.CheckResponse(
        decision=int(result.effect), effective_risk=int(result.risk), step=int(result.step),
        scope=int(result.scope) if result.scope else 0, scope_id=result.scope_id,
        envelope_id=result.envelope_id, envelope_revision=result.envelope_revision,
        rule_kind=int(result.rule_kind) if result.rule_kind else 0,
        rule_description=result.rule_description,
        reasons=[policy_pb2.Reason(code=r.code, message=r.message) for r in result.reasons],
        shadow_results=[decision_pb2.ShadowResult(
            envelope_id=sr.envelope_id, envelope_revision=sr.envelope_revision, scope=int(sr.scope),
            scope_id=sr.scope_id, decision=int(sr.effect) if sr.effect else 0,
            reasons=[policy_pb2.Reason(code=r.code, message=r.message) for r in sr.reasons],
            rule_kind=int(sr.rule_kind) if sr.rule_kind else 0, rule_description=sr.rule_description,
            **({"rule_index": sr.rule_index} if sr.rule_index is not None else {}))
            for sr in result.shadow])
    if result.rule_index is not None:
        resp.rule_index = result.rule_index
    return resp


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
