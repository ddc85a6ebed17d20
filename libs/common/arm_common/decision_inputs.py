"""Conversions between the decision path's protobuf messages and the engine's dataclasses, shared
by governance (`Check`, `WatchDecisionInputs`, `RecordLocalDecisions`) and the SDK's local
decisions, so that both sides feed the engine exactly the same inputs and read its results the
same way."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from arm.governance.v1 import decision_pb2, policy_pb2
from arm_engine import engine
from arm_engine.risk import ArgumentTrigger, RiskOverride, tenant_triggers

_CONTROL_NAMES = {policy_pb2.OPERATOR_CONTROL_MODE_NORMAL: "NORMAL",
                  policy_pb2.OPERATOR_CONTROL_MODE_PAUSED: "PAUSED",
                  policy_pb2.OPERATOR_CONTROL_MODE_DRAINING: "DRAINING",
                  policy_pb2.OPERATOR_CONTROL_MODE_QUARANTINED: "QUARANTINED"}


def decision_event_id(decision_id: str) -> str:
    """The id of the opEvent governance derives from a logged decision (DECISION_MADE, or
    TOOL_CALL_BLOCKED for a DENY). Telemetry stores one event per tenant and id, so a runtime
    that reports the same outcome itself (the MCP gateway's TOOL_CALL_BLOCKED of a DENY) gives
    its event this id, and the call is recorded as blocked once."""
    return f"evt-{decision_id}"


def control_mode_name(mode: int | None) -> str:
    return _CONTROL_NAMES.get(mode or policy_pb2.OPERATOR_CONTROL_MODE_NORMAL, "NORMAL")  # type: ignore[call-overload]


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


def envelope_from_engine(e: engine.Envelope) -> policy_pb2.PolicyEnvelope:
    """The message of an engine envelope: what `envelope_to_engine` turns back into `e`."""
    env = policy_pb2.PolicyEnvelope(
        envelope_id=e.id, name=e.name, revision=e.revision, scope=int(e.scope), scope_id=e.scope_id,  # type: ignore[arg-type]
        priority=e.priority, active=e.active,
        mode=policy_pb2.POLICY_MODE_SHADOW if e.shadow else policy_pb2.POLICY_MODE_ENFORCE,
        require_approval_at_risk=int(e.require_approval_at_risk or 0),  # type: ignore[arg-type]
        deny_at_risk=int(e.deny_at_risk or 0),  # type: ignore[arg-type]
        default_effect=int(e.default_effect or 0))  # type: ignore[arg-type]
    for r in e.tool_rules:
        rule = env.tool_rules.add(tool=r.tool, effect=int(r.effect), locked=r.locked,  # type: ignore[arg-type]
                                  description=r.description)
        rule.when.min_risk = int(r.min_risk or 0)  # type: ignore[assignment]
        rule.when.environments.extend(r.environments)
        rule.when.arg_patterns.extend(r.arg_patterns)
    if e.autonomy_tier is not None:
        env.autonomy_tier = e.autonomy_tier
    if e.budgets is not None:
        env.budgets.SetInParent()
        for name in ("per_run_usd", "daily_usd", "monthly_usd"):
            value = getattr(e.budgets, name)
            if value is not None:
                setattr(env.budgets, name, value)
    return env


def risk_overrides_to_engine(overrides: Iterable[Any]) -> tuple[RiskOverride, ...]:
    """The engine's entries of `RiskOverride` messages (validated on write)."""
    return tuple(RiskOverride(o.tool, engine.Risk(o.risk), tuple(sorted(o.arguments_below.items())))
                 for o in overrides)


def argument_triggers_to_engine(triggers: Iterable[Any]) -> tuple[ArgumentTrigger, ...]:
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


def risk_overrides_from_engine(overrides: Iterable[RiskOverride]) -> list[policy_pb2.RiskOverride]:
    return [policy_pb2.RiskOverride(tool=o.tool, risk=int(o.risk), arguments_below=dict(o.below))  # type: ignore[arg-type]
            for o in overrides]


def agent_from_message(agent: decision_pb2.DecisionAgent) -> engine.Agent:
    return engine.Agent(
        tenant_id=agent.tenant_id, tenant_active=agent.tenant_active, project_id=agent.project_id,
        environment_id=agent.environment_id, environment_name=agent.environment_name,
        environment_type=agent.environment_type, template_id=agent.template_id, version_id=agent.version_id,
        instance_id=agent.instance_id, instance_state=agent.instance_state, version_state=agent.version_state)


def result_fields(result: engine.Result) -> decision_pb2.CheckResponse:
    """The part of a CheckResponse that depends on the result alone."""
    resp = decision_pb2.CheckResponse(
        decision=int(result.effect), effective_risk=int(result.risk), step=int(result.step),  # type: ignore[arg-type]
        scope=int(result.scope) if result.scope else 0, scope_id=result.scope_id,  # type: ignore[arg-type]
        envelope_id=result.envelope_id, envelope_revision=result.envelope_revision,
        rule_kind=int(result.rule_kind) if result.rule_kind else 0,  # type: ignore[arg-type]
        rule_description=result.rule_description,
        reasons=[policy_pb2.Reason(code=r.code, message=r.message) for r in result.reasons],
        shadow_results=[decision_pb2.ShadowResult(
            envelope_id=sr.envelope_id, envelope_revision=sr.envelope_revision, scope=int(sr.scope),  # type: ignore[arg-type]
            scope_id=sr.scope_id, decision=int(sr.effect) if sr.effect else 0,  # type: ignore[arg-type]
            reasons=[policy_pb2.Reason(code=r.code, message=r.message) for r in sr.reasons],
            rule_kind=int(sr.rule_kind) if sr.rule_kind else 0, rule_description=sr.rule_description,  # type: ignore[arg-type]
            **({"rule_index": sr.rule_index} if sr.rule_index is not None else {}))
            for sr in result.shadow])
    if result.rule_index is not None:
        resp.rule_index = result.rule_index
    return resp


def _reasons(items: Iterable[policy_pb2.Reason]) -> tuple[engine.Reason, ...]:
    return tuple(engine.Reason(r.code, r.message) for r in items)


def result_from_response(resp: decision_pb2.CheckResponse) -> engine.Result:
    """The engine result a CheckResponse states (the inverse of `result_fields`)."""
    return engine.Result(
        effect=engine.Effect(resp.decision), reasons=_reasons(resp.reasons), risk=engine.Risk(resp.effective_risk),
        step=engine.Step(resp.step), scope=engine.Scope(resp.scope) if resp.scope else None,
        scope_id=resp.scope_id, envelope_id=resp.envelope_id, envelope_revision=resp.envelope_revision,
        rule_kind=engine.RuleKind(resp.rule_kind) if resp.rule_kind else None,
        rule_index=resp.rule_index if resp.HasField("rule_index") else None,
        rule_description=resp.rule_description,
        shadow=tuple(engine.ShadowResult(
            envelope_id=s.envelope_id, envelope_revision=s.envelope_revision, scope=engine.Scope(s.scope),
            scope_id=s.scope_id, effect=engine.Effect(s.decision) if s.decision else None,
            reasons=_reasons(s.reasons), rule_kind=engine.RuleKind(s.rule_kind) if s.rule_kind else None,
            rule_index=s.rule_index if s.HasField("rule_index") else None, rule_description=s.rule_description)
            for s in resp.shadow_results))
