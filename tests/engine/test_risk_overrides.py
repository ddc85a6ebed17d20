"""Risk overrides of the classifier (issue 12, item 3, engine part): an entry sets the tool-name
risk of the calls it matches, ahead of the default table — a payments team's `payments.refund`
under $50 is MEDIUM — and a classifier with overrides changes decisions for its holder only."""

from __future__ import annotations

from arm_engine import engine
from arm_engine.risk import HIGH, LOW, MEDIUM, Classifier, RiskOverride

PAYMENTS = Classifier(overrides=[RiskOverride("payments.refund", MEDIUM, (("amount", 50),)),
                                 RiskOverride("reports.*", LOW),
                                 RiskOverride("payments.**", HIGH)])
DEFAULT = Classifier()


def test_a_small_refund_is_medium_for_the_payments_team_only() -> None:
    assert DEFAULT.classify("payments.refund", {"amount": 20}) == HIGH  # today's table
    assert PAYMENTS.classify("payments.refund", {"amount": 20}) == MEDIUM
    assert PAYMENTS.classify("payments.refund", {"amount": 49.99}) == MEDIUM
    # The bound is strict, the argument must be a number, and it must be there.
    assert PAYMENTS.classify("payments.refund", {"amount": 50}) == HIGH
    assert PAYMENTS.classify("payments.refund", {"amount": "20"}) == HIGH
    assert PAYMENTS.classify("payments.refund", {"amount": True}) == HIGH
    assert PAYMENTS.classify("payments.refund", {}) == HIGH
    assert PAYMENTS.classify("payments.refund") == HIGH
    # Argument triggers still raise the result.
    assert PAYMENTS.classify("payments.refund", {"amount": 20, "note": "production refund"}) == HIGH


def test_override_globs_follow_the_tool_rule_syntax() -> None:
    assert PAYMENTS.classify("reports.monthly") == LOW
    assert PAYMENTS.classify("REPORTS.Monthly") == LOW  # case-insensitive
    assert PAYMENTS.classify("reports.monthly.pdf") == DEFAULT.classify("reports.monthly.pdf")  # `*` stays in a segment
    github = Classifier(overrides=[RiskOverride("github.**", LOW)])
    assert DEFAULT.classify("github.repo.delete") == MEDIUM
    assert github.classify("github.repo.delete") == LOW  # `**` crosses dots
    assert github.classify("gitlab.repo.delete") == MEDIUM
    assert PAYMENTS.classify("paymentsXrefund") == DEFAULT.classify("paymentsXrefund")  # `.` is literal
    # The first matching override wins: refund under 50 → MEDIUM before `payments.**` → HIGH.
    assert PAYMENTS.classify("payments.refund", {"amount": 1}) == MEDIUM


def test_decisions_change_for_the_tenant_holding_the_override_only() -> None:
    policy = engine.compile_policy(
        [engine.Envelope(id="e1", name="guard", revision=1, scope=engine.Scope.TENANT, scope_id="t",
                         require_approval_at_risk=HIGH)], tenant_id="t", project_id="p", version_id="v")
    agent = engine.Agent(tenant_id="t", tenant_active=True, project_id="p", environment_id="e",
                         environment_name="prod", environment_type="PROD", template_id="tpl", version_id="v",
                         instance_id="i", instance_state="ACTIVE", version_state="APPROVED")
    call = engine.Call("payments.refund", {"amount": 20})
    with_override = engine.decide(policy, agent, call, classifier=PAYMENTS)
    without = engine.decide(policy, agent, call, classifier=DEFAULT)
    assert (with_override.effect, with_override.risk, with_override.step) == (
        engine.Effect.ALLOW, MEDIUM, engine.Step.BASELINE)
    assert (without.effect, without.risk) == (engine.Effect.NEEDS_APPROVAL, HIGH)
    big = engine.decide(policy, agent, engine.Call("payments.refund", {"amount": 500}), classifier=PAYMENTS)
    assert big.effect == engine.Effect.NEEDS_APPROVAL
