"""`denied_outright`: a tool is reported only when no arguments and no effective risk at or above
the declared one could let a call through (what ListDeniedTools and the gateway's hidden tools
rest on)."""

from __future__ import annotations

from arm_engine import engine
from arm_engine.engine import Effect, Risk, Scope, ToolRule

AGENT = engine.Agent("t", True, "p", "e", "dev", "DEV", "tpl", "v", "i", "ACTIVE", "APPROVED")


def policy(*rules: ToolRule, **kw: object) -> engine.CompiledPolicy:
    env = engine.Envelope(id="env-1", name="base", revision=3, scope=Scope.TENANT, scope_id="t",
                          tool_rules=rules, **kw)  # type: ignore[arg-type]
    return engine.compile_policy([env], tenant_id="t", project_id="p", version_id="v")


def test_a_deny_rule_without_conditions_denies_outright() -> None:
    p = policy(ToolRule("files.rm", Effect.DENY))
    denied = engine.denied_outright(p, AGENT, "files.rm")
    assert denied is not None and denied.effect is Effect.DENY
    assert denied.reasons[0].code == "TOOL_RULE_MATCHED" and denied.envelope_revision == 3
    assert engine.denied_outright(p, AGENT, "files.ls") is None  # baseline LOW → ALLOW


def test_the_baseline_denies_critical_only_when_declared_critical() -> None:
    p = policy()
    assert engine.denied_outright(p, AGENT, "x.delete", Risk.CRITICAL) is not None
    # Declared HIGH: the effective risk may be HIGH (NEEDS_APPROVAL), so not outright.
    assert engine.denied_outright(p, AGENT, "x.delete", Risk.HIGH) is None


def test_conditions_that_arguments_or_risk_can_dodge_are_not_outright() -> None:
    by_args = policy(ToolRule("pay", Effect.DENY, arg_patterns=("bob",)))
    assert engine.denied_outright(by_args, AGENT, "pay") is None
    by_risk = policy(ToolRule("pay", Effect.DENY, min_risk=Risk.HIGH))
    assert engine.denied_outright(by_risk, AGENT, "pay", Risk.MEDIUM) is None
    assert engine.denied_outright(by_risk, AGENT, "pay", Risk.HIGH) is not None
    # An ALLOW that only some arguments reach, over a default DENY: not outright either.
    allow_some = policy(ToolRule("pay", Effect.ALLOW, arg_patterns=("small",)), default_effect=Effect.DENY)
    assert engine.denied_outright(allow_some, AGENT, "pay") is None
    assert engine.denied_outright(allow_some, AGENT, "other") is not None


def test_an_envelope_allow_unhides_a_baseline_deny_and_the_environment_counts() -> None:
    assert engine.denied_outright(policy(ToolRule("x.delete", Effect.ALLOW)), AGENT, "x.delete",
                                  Risk.CRITICAL) is None
    prod_only = policy(ToolRule("deploy", Effect.DENY, environments=("PROD",)))
    assert engine.denied_outright(prod_only, AGENT, "deploy") is None  # AGENT is in DEV
