"""A tenant's argument triggers (issue 12, item 3, engine part): on top of the default triggers a
tenant replaces one by label (its pattern, or only the risk it raises to), disables one, or adds
its own, each raising to MEDIUM, HIGH or CRITICAL; the limits refuse what cannot run safely."""

from __future__ import annotations

from arm_engine import engine, limits
from arm_engine.risk import (
    CRITICAL,
    DEFAULT_ARGUMENT_TRIGGERS,
    HIGH,
    LOW,
    MEDIUM,
    ArgumentTrigger,
    Classifier,
    RiskOverride,
    tenant_triggers,
)

DEFAULT = Classifier()


def classifier(*changes: ArgumentTrigger, overrides: tuple[RiskOverride, ...] = ()) -> Classifier:
    return Classifier(triggers=tenant_triggers(changes), overrides=overrides)


def test_no_changes_is_the_default_table() -> None:
    assert tenant_triggers(()) == tuple((label, p, HIGH) for label, p in DEFAULT_ARGUMENT_TRIGGERS)
    same = classifier()
    for args in ({"path": "/etc/password"}, {"env": "prod"}, {"q": "hello"}, {"cmd": "rm -rf /tmp/x"}):
        assert same.classify("files.read", args) == DEFAULT.classify("files.read", args)


def test_disable_replace_and_add() -> None:
    args = {"target": "production database"}
    assert DEFAULT.classify("db.read", args) == HIGH
    # Disabled: "production" no longer raises anything.
    off = classifier(ArgumentTrigger("production", disabled=True))
    assert off.classify("db.read", args) == LOW
    assert off.classify("db.read", {"x": "api_key"}) == HIGH  # the other defaults stay
    # Replaced risk only (empty pattern keeps the default's): production is MEDIUM for this tenant.
    medium = classifier(ArgumentTrigger("production", risk=MEDIUM))
    assert medium.classify("db.read", args) == MEDIUM
    assert medium.classify("db.write", args) == MEDIUM  # never lowers: db.write is MEDIUM anyway
    assert medium.classify("payments.refund", args) == HIGH  # the tool table's HIGH stays
    # Replaced pattern: "prod" alone no longer counts, "production" still does (case-insensitive).
    narrow = classifier(ArgumentTrigger("production", pattern="PRODUCTION"))
    assert narrow.classify("db.read", {"env": "prod"}) == LOW
    assert narrow.classify("db.read", args) == HIGH
    # Added, raising to CRITICAL (the baseline then denies): a tenant's own sensitive words.
    crown = classifier(ArgumentTrigger("crown jewels", pattern=r"customers?[_ ]table", risk=CRITICAL))
    assert crown.classify("db.read", {"query": "SELECT * FROM Customers_Table"}) == CRITICAL
    assert crown.classify("db.read", {"query": "select 1"}) == LOW
    # Several levels: the highest matching level wins.
    both = classifier(ArgumentTrigger("staging", pattern="staging", risk=MEDIUM),
                      ArgumentTrigger("crown jewels", pattern="customers", risk=CRITICAL))
    assert both.classify("db.read", {"a": "staging", "b": "customers"}) == CRITICAL
    assert both.classify("db.read", {"a": "staging"}) == MEDIUM
    assert both.classify("db.read", {"a": "staging", "b": "api_key"}) == HIGH


def test_a_small_refund_is_medium_unless_an_argument_triggers() -> None:
    refunds = classifier(ArgumentTrigger("staging", pattern="staging", risk=MEDIUM),
                         overrides=(RiskOverride("payments.refund", MEDIUM, (("refund.amount", 50),)),))
    assert refunds.classify("payments.refund", {"refund": {"amount": 20}}) == MEDIUM  # a dotted path
    assert refunds.classify("payments.refund", {"refund": {"amount": 80}}) == HIGH
    assert refunds.classify("payments.refund", {"refund": {"amount": 20}, "note": "prod"}) == HIGH


def test_too_large_arguments_fail_safe_to_at_least_high() -> None:
    huge = {"k": ["x"] * 20_000}
    only_medium = Classifier(triggers=(("staging", "staging", MEDIUM),))
    assert only_medium.classify("db.read", huge) == HIGH
    assert classifier(ArgumentTrigger("c", pattern="c", risk=CRITICAL)).classify("db.read", huge) == CRITICAL
    assert Classifier(triggers=()).classify("db.read", huge) == LOW  # no triggers: nothing to raise


def test_decisions_follow_the_tenant_triggers() -> None:
    policy = engine.compile_policy([], tenant_id="t", project_id="p", version_id="v")
    agent = engine.Agent(tenant_id="t", tenant_active=True, project_id="p", environment_id="e",
                         environment_name="prod", environment_type="PROD", template_id="tpl", version_id="v",
                         instance_id="i", instance_state="ACTIVE", version_state="APPROVED")
    call = engine.Call("db.read", {"target": "production"})
    assert engine.decide(policy, agent, call).effect == engine.Effect.NEEDS_APPROVAL
    relaxed = classifier(ArgumentTrigger("production", risk=MEDIUM))
    assert engine.decide(policy, agent, call, classifier=relaxed).effect == engine.Effect.ALLOW
    denied = classifier(ArgumentTrigger("production", risk=CRITICAL))
    assert engine.decide(policy, agent, call, classifier=denied).effect == engine.Effect.DENY


def test_limits_name_the_field_of_each_mistake() -> None:
    ok = [ArgumentTrigger("production", risk=MEDIUM), ArgumentTrigger("deploy", disabled=True),
          ArgumentTrigger("mine", pattern=r"\bacme-internal\b", risk=CRITICAL)]
    assert limits.trigger_violations(ok) == []
    bad = limits.trigger_violations([
        ArgumentTrigger("", pattern="x"),                       # 0: no label
        ArgumentTrigger("new", pattern=""),                     # 1: a new trigger needs a pattern
        ArgumentTrigger("nope", disabled=True),                 # 2: disables no default
        ArgumentTrigger("token", pattern="x", disabled=True),   # 3: disabled with a pattern
        ArgumentTrigger("lows", pattern="x", risk=LOW),         # 4: LOW raises nothing
        ArgumentTrigger("perl", pattern=r"(?<=a)b"),            # 5: not RE2
        ArgumentTrigger("big", pattern="a{1000}"),              # 6: program too large
        ArgumentTrigger("long", pattern="a" * 400),             # 7: text too long
        ArgumentTrigger("new2", pattern="x"), ArgumentTrigger("new2", pattern="y"),  # 9: twice
    ])
    fields = [f for f, _ in bad]
    assert fields == ["[0].label", "[1].pattern", "[2].label", "[3].disabled", "[4].risk", "[5].pattern",
                      "[6].pattern", "[7].pattern", "[9].label"], bad
    assert limits.trigger_violations([ArgumentTrigger(f"t{i}", pattern="x") for i in range(40)]) == [
        ("", f"must have at most {limits.MAX_ARGUMENT_TRIGGERS} items")]
