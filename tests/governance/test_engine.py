"""Vectors for the policy engine (arm_engine.engine): every evaluation step and rule kind of
SPEC §3 "The decision", the risk classifier, and the compiled policy's bookkeeping."""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import replace
from typing import Any

import pytest

from arm_engine.engine import (
    Agent,
    Budgets,
    Call,
    Classifier,
    Controls,
    Effect,
    Envelope,
    Grant,
    Mode,
    Result,
    Risk,
    RuleKind,
    Scope,
    Spend,
    Step,
    ToolRule,
    arg_pattern_error,
    compile_policy,
    decide,
    effective_rules,
    glob_matches,
)
from arm_engine.risk import arguments_are_sensitive, tool_words

ALLOW, DENY, NA = Effect.ALLOW, Effect.DENY, Effect.NEEDS_APPROVAL
LOW, MEDIUM, HIGH, CRITICAL = Risk.LOW, Risk.MEDIUM, Risk.HIGH, Risk.CRITICAL
T, P, V = "ten_1", "prj_1", "ver_1"
SCOPE_IDS = {Scope.TENANT: T, Scope.PROJECT: P, Scope.VERSION: V}

AGENT = Agent(tenant_id=T, tenant_active=True, project_id=P, environment_id="env_1",
              environment_name="prod-eu", environment_type="PROD", template_id="tpl_1",
              version_id=V, instance_id="ins_1", instance_state="ACTIVE", version_state="APPROVED")
# Tools whose classified risk is known (asserted in test_classified_risk).
LOW_TOOL, MEDIUM_TOOL, HIGH_TOOL = "fs.read_file", "fs.write_file", "k8s.deploy"


def env(eid: str, scope: Scope, *rules: ToolRule, scope_id: str | None = None,
        **kw: Any) -> Envelope:
    return Envelope(id=eid, name=f"name-{eid}", revision=kw.pop("revision", 1), scope=scope,
                    scope_id=SCOPE_IDS[scope] if scope_id is None else scope_id,
                    tool_rules=rules, **kw)


def rule(tool: str, effect: Effect, **kw: Any) -> ToolRule:
    return ToolRule(tool=tool, effect=effect, **kw)


def run(envelopes: list[Envelope], call: Call | str, *, agent: Agent | None = AGENT,
        **kw: Any) -> Result:
    policy = compile_policy(envelopes, tenant_id=T, project_id=P, version_id=V)
    call = Call(call) if isinstance(call, str) else call
    result = decide(policy, agent, call, **kw)
    check_well_formed(result, call)
    # The memoised second answer is the same answer.
    assert decide(policy, agent, call, **kw) == result
    return result


def check_well_formed(result: Result, call: Call) -> None:
    assert result.reasons, "every result has a reason"
    for reason in result.reasons:
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", reason.code), reason.code
        assert reason.message.strip()
    assert result.reasons[0].code != "ENGINE_ERROR", result.reasons[0].message
    assert f'"{call.tool}"' in result.reasons[0].message, "the deciding sentence names the tool"
    assert (result.scope is None) == (result.envelope_id == "")
    if result.envelope_id:
        # The deciding sentence names the envelope and its scope.
        assert result.envelope_id in result.reasons[0].message
        assert result.scope is not None and result.scope.name in result.reasons[0].message
    if call.declared_risk is not None:
        assert result.risk >= call.declared_risk


def expect(result: Result, effect: Effect, step: Step, code: str, envelope_id: str = "",
           kind: RuleKind | None = None, index: int | None = None) -> None:
    got = (result.effect, result.step, result.reasons[0].code, result.envelope_id,
           result.rule_kind, result.rule_index)
    assert got == (effect, step, code, envelope_id, kind, index), result.reasons


# --- 1. Agent -----------------------------------------------------------------------------------

ALLOW_ALL = [env("v-allow", Scope.VERSION, rule("**", ALLOW))]


@pytest.mark.parametrize(("agent", "code"), [
    (None, "UNKNOWN_AGENT"),
    (replace(AGENT, tenant_active=False), "TENANT_INACTIVE"),
    (replace(AGENT, version_state="RETIRED"), "VERSION_RETIRED"),
    (replace(AGENT, version_state="VERSION_STATE_RETIRED"), "VERSION_RETIRED"),
    (replace(AGENT, version_state="BOGUS"), "VERSION_STATE_UNKNOWN"),
    (replace(AGENT, version_id="ver_other"), "POLICY_AGENT_MISMATCH"),
    (replace(AGENT, project_id="prj_other"), "POLICY_AGENT_MISMATCH"),
    (replace(AGENT, tenant_id="ten_other"), "POLICY_AGENT_MISMATCH"),
])
def test_agent_step_fails_closed(agent: Agent | None, code: str) -> None:
    result = run(ALLOW_ALL, Call(LOW_TOOL, grant=Grant("VALID")), agent=agent)
    expect(result, DENY, Step.AGENT, code)
    assert result.shadow == ()


@pytest.mark.parametrize("state", ["DRAFT", "TESTING", "CANDIDATE", "APPROVED", "DEPRECATED",
                                   "approved"])
def test_live_version_states_pass(state: str) -> None:
    result = run(ALLOW_ALL, LOW_TOOL, agent=replace(AGENT, version_state=state))
    expect(result, ALLOW, Step.ENVELOPE, "TOOL_RULE_MATCHED", "v-allow", RuleKind.TOOL_RULE, 0)


# --- 2. Kill switches ---------------------------------------------------------------------------

# Kill-switch answers live in the shared table (test_decision_vectors.py KILL, through the engine
# and through gRPC Check); here only what gRPC cannot send: spellings and unknown values.
KILL_VECTORS = [
    # (controls, instance state, tool, declared risk, is_run_start, expected code or None = passes)
    (Controls(tenant_mode="OPERATOR_CONTROL_MODE_PAUSED"), "ACTIVE", LOW_TOOL, None, False,
     "TENANT_PAUSED"),
    (Controls(tenant_mode="HALF_OPEN"), "ACTIVE", LOW_TOOL, None, False, "TENANT_CONTROL_UNKNOWN"),
    (Controls(), "INSTANCE_STATE_RETIRED", LOW_TOOL, None, False, "INSTANCE_RETIRED"),
    (Controls(), "SLEEPING", LOW_TOOL, None, False, "INSTANCE_STATE_UNKNOWN"),
]

@pytest.mark.parametrize(("controls", "state", "tool", "declared", "run_start", "code"),
                         KILL_VECTORS)
def test_kill_switches(controls: Controls, state: str, tool: str, declared: Risk | None,
                       run_start: bool, code: str | None) -> None:
    call = Call(tool, declared_risk=declared, is_run_start=run_start)
    result = run(ALLOW_ALL, call, agent=replace(AGENT, instance_state=state), controls=controls)
    if code is None:
        expect(result, ALLOW, Step.ENVELOPE, "TOOL_RULE_MATCHED", "v-allow", RuleKind.TOOL_RULE, 0)
    else:
        expect(result, DENY, Step.KILL_SWITCH, code)


def test_kill_switch_beats_a_valid_grant_and_keeps_shadow_results() -> None:
    envelopes = [*ALLOW_ALL, env("v-shadow", Scope.VERSION, rule("**", DENY), shadow=True)]
    result = run(envelopes, Call(LOW_TOOL, grant=Grant("VALID")),
                 controls=Controls(project_mode="PAUSED"))
    expect(result, DENY, Step.KILL_SWITCH, "PROJECT_PAUSED")
    assert [(s.envelope_id, s.effect) for s in result.shadow] == [("v-shadow", DENY)]


# --- 3. Approval grants -------------------------------------------------------------------------

LOCKED_DENY_ALL = [env("t-lock", Scope.TENANT, rule("**", DENY, locked=True))]


@pytest.mark.parametrize(("status", "effect", "code"), [
    ("VALID", ALLOW, "APPROVAL_GRANTED"),
    ("PENDING", NA, "APPROVAL_PENDING"),
    ("NOT_FOUND", DENY, "APPROVAL_NOT_FOUND"),
    ("NOT_APPROVED", DENY, "APPROVAL_NOT_APPROVED"),
    ("EXPIRED", DENY, "APPROVAL_EXPIRED"),
    ("USED", DENY, "APPROVAL_USED"),
    ("MISMATCH", DENY, "APPROVAL_MISMATCH"),
    ("SOMETHING_ELSE", DENY, "APPROVAL_INVALID"),
])
@pytest.mark.parametrize("envelopes", [[], ALLOW_ALL, LOCKED_DENY_ALL], ids=["none", "allow", "locked"])
def test_grant_statuses(status: str, effect: Effect, code: str, envelopes: list[Envelope]) -> None:
    # SPEC step 3 comes before the locked rules of step 4: a valid grant allows even under a
    # locked DENY, and a bad one denies even where the policy would allow.
    result = run(envelopes, Call(HIGH_TOOL, declared_risk=CRITICAL, grant=Grant(status)))
    expect(result, effect, Step.APPROVAL_GRANT, code)


def test_a_valid_grant_is_still_held_to_budgets() -> None:
    envelopes = [env("t-budget", Scope.TENANT, budgets=Budgets(per_run_usd=1.0))]
    call = Call(HIGH_TOOL, grant=Grant("VALID"), estimated_cost_usd=0.5)
    expect(run(envelopes, call, spend=Spend(run_usd=0.5)), ALLOW, Step.APPROVAL_GRANT,
           "APPROVAL_GRANTED")
    result = run(envelopes, call, spend=Spend(run_usd=0.75))
    expect(result, DENY, Step.BUDGET, "BUDGET_EXCEEDED", "t-budget", RuleKind.BUDGET)
    assert [r.code for r in result.reasons] == ["BUDGET_EXCEEDED", "APPROVAL_GRANTED"]


# --- 4. Locked rules ----------------------------------------------------------------------------

# Locked rules are in the shared table (test_decision_vectors.py LAYERING, through the engine and
# through gRPC Check); here only what the gRPC world cannot build: another tenant's envelope.
LOCK_VECTORS = [
    pytest.param(
        [env("v", Scope.VERSION, rule("db.write", ALLOW)),
         env("t", Scope.TENANT, rule("db.*", DENY, locked=True), scope_id="ten_other")],
        "db.write", ALLOW, Step.ENVELOPE, "TOOL_RULE_MATCHED", "v", RuleKind.TOOL_RULE, 0,
        id="another tenant's locked rule is ignored"),
]

@pytest.mark.parametrize(("envelopes", "tool", "effect", "step", "code", "eid", "kind", "index"),
                         LOCK_VECTORS)
def test_locked_rules(envelopes: list[Envelope], tool: str, effect: Effect, step: Step, code: str,
                      eid: str, kind: RuleKind, index: int) -> None:
    expect(run(envelopes, tool), effect, step, code, eid, kind, index)


def test_locked_needs_approval_reports_the_lock_and_what_it_overrode() -> None:
    result = run([env("v", Scope.VERSION, rule("db.write", ALLOW)),
                  env("p", Scope.PROJECT, rule("db.*", NA, locked=True, description="DB changes"))],
                 "db.write")
    assert (result.scope, result.scope_id, result.rule_description) == (Scope.PROJECT, P, "DB changes")
    assert [r.code for r in result.reasons] == ["LOCKED_RULE_MATCHED", "TOOL_RULE_MATCHED"]


def test_locked_needs_approval_with_a_budget_exceeded_is_denied() -> None:
    envelopes = [env("v", Scope.VERSION, rule("db.write", ALLOW)),
                 env("p", Scope.PROJECT, rule("db.*", NA, locked=True),
                     budgets=Budgets(daily_usd=5.0))]
    expect(run(envelopes, Call("db.write", estimated_cost_usd=1.0), spend=Spend(day_usd=4.5)),
           DENY, Step.BUDGET, "BUDGET_EXCEEDED", "p", RuleKind.BUDGET)


# --- 5. Inheritance, priorities, groups ---------------------------------------------------------

# Scope layering and priorities are in the shared table (test_decision_vectors.py LAYERING); here
# only envelopes of other scope ids, which the gRPC world cannot attach to its agent.
INHERIT_VECTORS = [
    pytest.param([env("v2", Scope.VERSION, rule("db.*", DENY), scope_id="ver_2"),
                  env("p2", Scope.PROJECT, rule("db.*", DENY), scope_id="prj_2"),
                  env("t2", Scope.TENANT, rule("db.*", DENY), scope_id="ten_2"),
                  env("v", Scope.VERSION, rule("db.*", ALLOW), scope_id=V, priority=1)],
                 "db.read", ALLOW, "v", id="other scope ids are ignored"),
]

@pytest.mark.parametrize(("envelopes", "tool", "effect", "eid"), INHERIT_VECTORS)
def test_inheritance_and_priorities(envelopes: list[Envelope], tool: str, effect: Effect,
                                    eid: str) -> None:
    result = run(envelopes, tool)
    expect(result, effect, Step.ENVELOPE, "TOOL_RULE_MATCHED", eid, RuleKind.TOOL_RULE, 0)
    assert result.envelope_revision == 1


def test_the_deciding_envelope_is_reported_with_scope_and_revision() -> None:
    result = run([env("p", Scope.PROJECT, rule("db.*", NA, description="ask first"), revision=7)],
                 "db.read")
    assert (result.scope, result.scope_id, result.envelope_id, result.envelope_revision,
            result.rule_description) == (Scope.PROJECT, P, "p", 7, "ask first")


# --- 5a. Tool globs and `when` ------------------------------------------------------------------

# Globs, specificity and `when` are in the shared table (test_decision_vectors.py GLOBS and
# LAYERING); here only the environment-name condition (the gRPC world's names are generated) and
# a glob the API refuses to store.
GLOB_VECTORS = [
    pytest.param([rule("db.w?ite", DENY), rule("**", ALLOW)], "db.write", ALLOW, 1,
                 id="? is literal"),
    pytest.param([rule("db.write", DENY, environments=("PROD-EU",)), rule("db.*", ALLOW)],
                 "db.write", DENY, 0, id="environment name matches, any case"),
    pytest.param([rule("db.write", DENY, environments=("staging", "dev")), rule("db.*", ALLOW)],
                 "db.write", ALLOW, 1, id="environment not listed (name or type)"),
]

@pytest.mark.parametrize(("rules", "tool", "effect", "index"), GLOB_VECTORS)
def test_tool_globs_and_specificity(rules: list[ToolRule], tool: str, effect: Effect,
                                    index: int) -> None:
    expect(run([env("v", Scope.VERSION, *rules)], tool), effect, Step.ENVELOPE,
           "TOOL_RULE_MATCHED", "v", RuleKind.TOOL_RULE, index)


@pytest.mark.parametrize(("arguments", "effect"), [
    ({"cmd": "rm -rf /tmp/x"}, DENY),
    ({"cmd": ["ls", {"then": "rm  -rf /"}]}, DENY),
    ({"cmd": "ls -la"}, ALLOW),
    (None, ALLOW),
    ({"cmd": "RM -RF /"}, ALLOW),  # arg patterns are case-sensitive unless they say (?i)
])
def test_arg_patterns_search_the_canonical_json(arguments: dict[str, Any] | None,
                                                effect: Effect) -> None:
    envelopes = [env("v", Scope.VERSION, rule("shell.*", DENY, arg_patterns=(r"rm\s+-rf", "nope")),
                     rule("shell.**", ALLOW))]
    result = run(envelopes, Call("shell.exec", arguments=arguments))
    assert result.effect is effect


def test_arg_patterns_see_keys_numbers_and_structure() -> None:
    envelopes = [env("v", Scope.VERSION, rule("http.*", DENY, arg_patterns=(r'"port":22\b',)),
                     rule("http.*", NA, arg_patterns=(r'"force":true',)))]
    assert run(envelopes, Call("http.get", {"port": 22.0})).effect is DENY  # canonical: 22
    assert run(envelopes, Call("http.get", {"port": 8080})).step is Step.BASELINE
    assert run(envelopes, Call("http.get", {"force": True})).effect is NA


def test_an_invalid_arg_pattern_matches_literally() -> None:
    assert arg_pattern_error("rm -rf [") is not None
    assert arg_pattern_error(r"rm\s+-rf") is None
    envelopes = [env("v", Scope.VERSION, rule("x", DENY, arg_patterns=("a[b",)))]
    assert run(envelopes, Call("x", {"k": "xa[by"})).effect is DENY
    assert run(envelopes, Call("x", {"k": "ab"})).step is Step.BASELINE


def test_memoised_answers_do_not_leak_between_environments_or_arguments() -> None:
    policy = compile_policy(
        [env("v", Scope.VERSION, rule("db.write", DENY, environments=("prod",)),
             rule("db.write", NA, arg_patterns=("drop",)), rule("db.*", ALLOW))],
        tenant_id=T, project_id=P, version_id=V)
    dev = replace(AGENT, environment_name="dev-1", environment_type="DEV")
    for _ in range(2):
        assert decide(policy, AGENT, Call("db.write")).effect is DENY
        assert decide(policy, dev, Call("db.write")).effect is ALLOW
        assert decide(policy, dev, Call("db.write", {"sql": "drop table x"})).effect is NA
        assert decide(policy, dev, Call("db.write", {"sql": "select"})).effect is ALLOW


@pytest.mark.parametrize(("glob", "tool", "matches"), [
    ("db.*", "db.write", True), ("db.*", "db.", True), ("db.*", "db", False),
    ("db.*", "db.a.b", False), ("db.**", "db.a.b", True), ("**", "", True),
    ("*", "a.b", False), ("a.*.c", "a.b.c", True), ("a.*.c", "a.b.b.c", False),
    ("a.**.c", "a.b.b.c", True), ("a.**.c", "a.c", False), ("a+b", "a+b", True),
    ("a+b", "aab", False), ("(x)", "(x)", True),
    # More than three wildcard runs: matched by an automaton, not a backtracking regex.
    ("**a**a**a**a**b", "a.a.a.a.a.b", True), ("**a**a**a**a**b", "a" * 5000, False),
    ("*.*.*.*", "a.b.c.d", True), ("*.*.*.*", "a.b.c", False), ("*.*.*.*", "a.b.c.d.e", False),
    ("A*.**.*.c*", "ab.x.y.z.cd", True), ("A*.**.*.c*", "ab.z.cd", False),
])
def test_glob_matches(glob: str, tool: str, matches: bool) -> None:
    assert glob_matches(glob, tool) is matches


# --- 5b–f. Risk rules, tiers, budgets, default --------------------------------------------------

# Risk rules, tiers and the default effect: the shared table (test_decision_vectors.py LAYERING and
# TIERS). Here only the tiers gRPC does not carry.
@pytest.mark.parametrize("tier", [-1, 6, 99])
@pytest.mark.parametrize("risk", list(Risk))
def test_an_out_of_range_tier_needs_approval(tier: int, risk: Risk) -> None:
    result = run([env("v", Scope.VERSION, autonomy_tier=tier, default_effect=ALLOW)],
                 Call(LOW_TOOL, declared_risk=min(risk, HIGH)))
    expect(result, NA, Step.ENVELOPE, "INVALID_AUTONOMY_TIER", "v", RuleKind.AUTONOMY_TIER)


BUDGET_VECTORS = [
    # (budgets, spend, cost, exceeded)
    (Budgets(per_run_usd=1.0), Spend(run_usd=0.5), 0.5, False),
    (Budgets(per_run_usd=1.0), Spend(run_usd=0.5), 0.75, True),
    (Budgets(per_run_usd=1.0), Spend(run_usd=1.25), 0.0, True),
    (Budgets(daily_usd=10.0), Spend(run_usd=99.0, day_usd=9.0), 1.0, False),
    (Budgets(daily_usd=10.0), Spend(day_usd=9.5), 1.0, True),
    (Budgets(monthly_usd=100.0), Spend(day_usd=50.0, month_usd=99.0), 2.0, True),
    (Budgets(monthly_usd=100.0), Spend(month_usd=98.0), 2.0, False),
    (Budgets(per_run_usd=5.0, daily_usd=5.0, monthly_usd=5.0), Spend(month_usd=5.5), 0.0, True),
    (Budgets(daily_usd=0.0), Spend(), 0.0, False),
    (Budgets(daily_usd=0.0), Spend(), 0.01, True),
    (Budgets(daily_usd=10.0), Spend(day_usd=math.nan), 0.0, True),  # fail safe
    (Budgets(daily_usd=math.nan), Spend(), 0.0, True),  # fail safe
    (Budgets(), Spend(day_usd=1e9), 1e9, False),
]


@pytest.mark.parametrize(("budgets", "spend", "cost", "exceeded"), BUDGET_VECTORS)
def test_budgets_in_the_envelope(budgets: Budgets, spend: Spend, cost: float,
                                 exceeded: bool) -> None:
    # Reached in step 5 (no rule decided before), the envelope's own budget denies as ENVELOPE.
    result = run([env("p", Scope.PROJECT, budgets=budgets, default_effect=ALLOW)],
                 Call(LOW_TOOL, estimated_cost_usd=cost), spend=spend)
    if exceeded:
        expect(result, DENY, Step.ENVELOPE, "BUDGET_EXCEEDED", "p", RuleKind.BUDGET)
    else:
        expect(result, ALLOW, Step.ENVELOPE, "DEFAULT_EFFECT", "p", RuleKind.DEFAULT_EFFECT)


@pytest.mark.parametrize(("budgets", "spend", "cost", "exceeded"), BUDGET_VECTORS)
def test_budgets_on_top_of_an_allow_from_another_scope(budgets: Budgets, spend: Spend, cost: float,
                                                       exceeded: bool) -> None:
    envelopes = [env("v", Scope.VERSION, rule("**", ALLOW)), env("t", Scope.TENANT, budgets=budgets)]
    result = run(envelopes, Call(LOW_TOOL, estimated_cost_usd=cost), spend=spend)
    if exceeded:
        expect(result, DENY, Step.BUDGET, "BUDGET_EXCEEDED", "t", RuleKind.BUDGET)
        assert [r.code for r in result.reasons] == ["BUDGET_EXCEEDED", "TOOL_RULE_MATCHED"]
    else:
        expect(result, ALLOW, Step.ENVELOPE, "TOOL_RULE_MATCHED", "v", RuleKind.TOOL_RULE, 0)


@pytest.mark.parametrize(("envelopes", "effect", "step", "code"), [
    pytest.param([env("v", Scope.VERSION, rule("**", NA)),
                  env("t", Scope.TENANT, budgets=Budgets(daily_usd=1.0))],
                 DENY, Step.BUDGET, "BUDGET_EXCEEDED", id="on top of NEEDS_APPROVAL"),
    pytest.param([env("v", Scope.VERSION, rule("**", DENY)),
                  env("t", Scope.TENANT, budgets=Budgets(daily_usd=1.0))],
                 DENY, Step.ENVELOPE, "TOOL_RULE_MATCHED", id="a DENY stays the envelope's"),
    pytest.param([env("t", Scope.TENANT, budgets=Budgets(daily_usd=1.0), active=False)],
                 ALLOW, Step.BASELINE, "BASELINE_LOW", id="inactive envelope's budget"),
    pytest.param([env("t", Scope.TENANT, budgets=Budgets(daily_usd=1.0), shadow=True)],
                 ALLOW, Step.BASELINE, "BASELINE_LOW", id="shadow envelope's budget"),
    pytest.param([env("t", Scope.TENANT, budgets=Budgets(daily_usd=1.0), scope_id="ten_2")],
                 ALLOW, Step.BASELINE, "BASELINE_LOW", id="other tenant's budget"),
    pytest.param([env("p", Scope.PROJECT, budgets=Budgets(daily_usd=1.0), priority=5),
                  env("p2", Scope.PROJECT, rule("**", ALLOW), priority=10)],
                 DENY, Step.BUDGET, "BUDGET_EXCEEDED", id="budget of an envelope not reached"),
])
def test_budgets_on_top(envelopes: list[Envelope], effect: Effect, step: Step, code: str) -> None:
    result = run(envelopes, Call(LOW_TOOL, estimated_cost_usd=0.5), spend=Spend(day_usd=0.75))
    assert (result.effect, result.step, result.reasons[0].code) == (effect, step, code)


def test_the_budget_sentence_gives_the_figures() -> None:
    result = run([env("t", Scope.TENANT, budgets=Budgets(daily_usd=10.0))],
                 Call(LOW_TOOL, estimated_cost_usd=1.5), spend=Spend(day_usd=9.0))
    assert "daily" in result.reasons[0].message
    assert "$10.50" in result.reasons[0].message or "$10.5000" in result.reasons[0].message
    assert "$10.00" in result.reasons[0].message


# --- 6. Baseline: the shared table (test_decision_vectors.py BASELINES) -----------------------


# --- Shadow -------------------------------------------------------------------------------------


def test_shadow_results_are_reported_not_enforced() -> None:
    envelopes = [
        env("v", Scope.VERSION, rule("db.*", ALLOW)),
        env("s-deny", Scope.PROJECT, rule("db.write", DENY), shadow=True, revision=4),
        env("s-none", Scope.TENANT, rule("web.*", DENY), shadow=True),
        env("s-tier", Scope.VERSION, autonomy_tier=0, shadow=True, priority=1),
        env("s-budget", Scope.TENANT, budgets=Budgets(per_run_usd=0.1), shadow=True, priority=1),
        env("s-off", Scope.TENANT, rule("**", DENY), shadow=True, active=False),
    ]
    result = run(envelopes, Call("db.write", estimated_cost_usd=1.0))
    expect(result, ALLOW, Step.ENVELOPE, "TOOL_RULE_MATCHED", "v", RuleKind.TOOL_RULE, 0)
    got = [(s.envelope_id, s.envelope_revision, s.scope, s.effect, s.reasons[0].code, s.rule_kind,
            s.rule_index) for s in result.shadow]
    assert got == [
        ("s-tier", 1, Scope.VERSION, NA, "AUTONOMY_TIER_REQUIRES_APPROVAL", RuleKind.AUTONOMY_TIER,
         None),
        ("s-deny", 4, Scope.PROJECT, DENY, "TOOL_RULE_MATCHED", RuleKind.TOOL_RULE, 0),
        ("s-none", 1, Scope.TENANT, None, "NO_DECISION", None, None),
        ("s-budget", 1, Scope.TENANT, DENY, "BUDGET_EXCEEDED", RuleKind.BUDGET, None),
    ]


# --- Risk classification ------------------------------------------------------------------------

TOOL_RISKS = [
    (LOW_TOOL, LOW), ("read_file", LOW), ("github.search_code", LOW), ("listFiles", LOW),
    ("get_weather", LOW), ("web.browse", LOW),
    (MEDIUM_TOOL, MEDIUM), ("edit_file", MEDIUM), ("bash", MEDIUM), ("shell.exec", MEDIUM),
    ("http.fetch", MEDIUM), ("git.push", MEDIUM), ("get_and_write", MEDIUM),
    ("mystery.tool", MEDIUM), ("", MEDIUM),
    (HIGH_TOOL, HIGH), ("deploy", HIGH), ("npm.publish", HIGH), ("stripe.create_payment", HIGH),
    ("send_email", HIGH), ("gmail.send", HIGH), ("sendEmail", HIGH), ("git.push_force", HIGH),
    ("git.forcePush", HIGH), ("db.drop_database", HIGH), ("delete_database", HIGH),
    ("vault.read_secret", HIGH),
]


@pytest.mark.parametrize(("tool", "risk"), TOOL_RISKS)
def test_classified_risk(tool: str, risk: Risk) -> None:
    assert Classifier().classify(tool) is risk
    # And the engine reports it as the effective risk when nothing is declared.
    assert run([], Call(tool)).risk is risk


@pytest.mark.parametrize(("arguments", "sensitive"), [
    (None, False), ({}, False), ({"path": "src/app.py"}, False), ({"max_tokens": 1000}, False),
    ({"note": "environment variables"}, False), ({"n": 1, "ok": True, "x": None}, False),
    ({"api_key": "x"}, True), ({"headers": {"X-Api-Key": "abc"}}, True), ({"apikey": 1}, True),
    ({"password": "hunter2"}, True), ({"cmd": "cat ~/.ssh/id_rsa"}, True),
    ({"access_token": "x"}, True), ({"auth": "Bearer abc"}, True),
    ({"key": "-----BEGIN RSA PRIVATE KEY-----"}, True), ({"private_key": "x"}, True),
    ({"path": "/app/.env"}, True), ({"path": ".env.local"}, True),
    ({"file": "aws/credentials"}, True), ({"target": "production"}, True), ({"env": "prod"}, True),
    ({"cmd": "git push --force"}, True), ({"cmd": "git reset --hard"}, True),
    ({"step": "deploy the app"}, True), ({"nested": [[{"deep": ["client_secret"]}]]}, True),
    ({"k": "AKIAABCDEFGHIJKLMNOP"}, True), ({"k": "ghp_" + "a" * 36}, True),
    ({"x": "a" * 100_000 + " password"}, True),
])
def test_argument_scan(arguments: dict[str, Any] | None, sensitive: bool) -> None:
    assert arguments_are_sensitive(arguments) is sensitive
    expected = HIGH if sensitive else LOW
    assert Classifier().classify(LOW_TOOL, arguments) is expected
    assert run([], Call(LOW_TOOL, arguments=arguments)).risk is expected


def test_arguments_too_deep_or_too_large_count_as_sensitive() -> None:
    deep: Any = "x"
    for _ in range(100):
        deep = {"a": deep}
    assert arguments_are_sensitive(deep)
    assert arguments_are_sensitive({"items": ["x"] * 20_000})
    assert not arguments_are_sensitive({"items": ["x"] * 1000})


def test_arguments_never_lower_a_risk_and_declared_risk_raises_it() -> None:
    classifier = Classifier()
    assert classifier.classify(HIGH_TOOL, {"path": "a"}) is HIGH
    assert run([], Call(LOW_TOOL, declared_risk=MEDIUM)).risk is MEDIUM
    assert run([], Call(HIGH_TOOL, declared_risk=LOW)).risk is HIGH  # max(declared, classified)
    assert run([], Call(LOW_TOOL, {"key": "production"}, declared_risk=CRITICAL)).risk is CRITICAL


def test_a_custom_table() -> None:
    classifier = Classifier([("internal-*", LOW), ("nuke", CRITICAL)], unknown=HIGH)
    assert classifier.classify("internal_report.fetch") is LOW
    assert classifier.classify("launch.nuke") is CRITICAL
    assert classifier.classify("read_file") is HIGH  # not in this table
    policy = compile_policy([], tenant_id=T, project_id=P, version_id=V)
    assert decide(policy, AGENT, Call("launch.nuke"), classifier=classifier).effect is DENY


def test_tool_words() -> None:
    assert tool_words("gitHub.pr_merge-now/HTTPServer2") == (
        "git", "hub", "pr", "merge", "now", "http", "server", "2")


# --- Compiled policy ----------------------------------------------------------------------------


def test_effective_rules_in_evaluation_order() -> None:
    envelopes = [
        env("t", Scope.TENANT, rule("a", DENY, locked=True), rule("b", ALLOW, locked=True),
            budgets=Budgets(daily_usd=3.0)),
        env("v", Scope.VERSION, rule("c", NA), rule("d", DENY, locked=True),
            require_approval_at_risk=HIGH, deny_at_risk=CRITICAL, autonomy_tier=2,
            default_effect=ALLOW),
        env("p-1", Scope.PROJECT, rule("e", NA, locked=True), priority=1),
        env("p-9", Scope.PROJECT, rule("f", ALLOW), priority=9),
        env("s", Scope.TENANT, rule("g", DENY, locked=True), shadow=True),
        env("off", Scope.TENANT, rule("h", DENY), active=False),
    ]
    policy = compile_policy(envelopes, tenant_id=T, project_id=P, version_id=V)
    got = [(r.envelope_id, r.kind, r.rule_index, r.mode, r.locked_stage) for r in
           effective_rules(policy)]
    TR = RuleKind.TOOL_RULE
    assert got == [
        ("t", TR, 0, Mode.ENFORCE, True), ("p-1", TR, 0, Mode.ENFORCE, True),
        ("v", TR, 0, Mode.ENFORCE, False), ("v", TR, 1, Mode.ENFORCE, False),
        ("v", RuleKind.DENY_AT_RISK, None, Mode.ENFORCE, False),
        ("v", RuleKind.REQUIRE_APPROVAL_AT_RISK, None, Mode.ENFORCE, False),
        ("v", RuleKind.AUTONOMY_TIER, None, Mode.ENFORCE, False),
        ("v", RuleKind.DEFAULT_EFFECT, None, Mode.ENFORCE, False),
        ("p-9", TR, 0, Mode.ENFORCE, False),
        ("t", TR, 1, Mode.ENFORCE, False), ("t", RuleKind.BUDGET, None, Mode.ENFORCE, False),
        ("s", TR, 0, Mode.SHADOW, False),
    ]
    rules = effective_rules(policy)
    assert rules[0].tool_rule == envelopes[0].tool_rules[0]
    assert rules[4].risk_threshold is CRITICAL and rules[5].risk_threshold is HIGH
    assert rules[6].autonomy_tier == 2 and rules[7].default_effect is ALLOW
    assert rules[10].budgets == Budgets(daily_usd=3.0)
    assert (rules[2].scope, rules[2].scope_id, rules[2].envelope_name, rules[8].priority) == (
        Scope.VERSION, V, "name-v", 9)


def test_compile_keeps_only_this_agents_active_envelopes() -> None:
    envelopes = [env("t", Scope.TENANT), env("t2", Scope.TENANT, scope_id="x"),
                 env("p", Scope.PROJECT), env("p2", Scope.PROJECT, scope_id=T),
                 env("v", Scope.VERSION), env("v2", Scope.VERSION, scope_id=P),
                 env("off", Scope.VERSION, active=False), env("s", Scope.PROJECT, shadow=True)]
    policy = compile_policy(envelopes, tenant_id=T, project_id=P, version_id=V)
    assert [e.id for e in policy.envelopes] == ["v", "p", "t"]
    assert [e.id for e in policy.shadow_envelopes] == ["s"]


def test_decisions_do_not_depend_on_envelope_order() -> None:
    envelopes = [env("p-b", Scope.PROJECT, rule("db.*", DENY)),
                 env("p-a", Scope.PROJECT, rule("db.*", DENY)),
                 env("t", Scope.TENANT, rule("db.*", ALLOW))]
    assert run(envelopes, "db.x") == run(envelopes[::-1], "db.x")
    assert run(envelopes, "db.x").envelope_id == "p-a"  # equal results: first by name


def test_the_memo_tables_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    compiling = importlib.import_module("arm_engine.engine.compile")
    deciding = importlib.import_module("arm_engine.engine.decide")  # the module; `engine.decide` is the function
    monkeypatch.setattr(compiling, "_PLAN_LIMIT", 3)
    monkeypatch.setattr(deciding, "_RESULT_LIMIT", 5)
    envelopes = [env("v", Scope.VERSION, rule("db.*", DENY), rule("**", ALLOW, environments=("dev",)))]
    policy = compile_policy(envelopes, tenant_id=T, project_id=P, version_id=V)
    dev = replace(AGENT, environment_name="dev", environment_type="DEV")
    calls = [(a, Call(f"{prefix}.t{i}", declared_risk=r)) for i in range(6) for prefix in ("db", "x")
             for r in (None, HIGH) for a in (AGENT, dev)]
    for _ in range(2):
        for agent, call in calls:
            assert decide(policy, agent, call) == run(envelopes, call, agent=agent)
            assert len(policy._plans) <= 3 and policy._memo_size <= 5


def test_bad_input_fails_closed_instead_of_raising() -> None:
    policy = compile_policy([env("v", Scope.VERSION, rule("**", ALLOW))], tenant_id=T,
                            project_id=P, version_id=V)
    result = decide(policy, AGENT, Call("x", declared_risk=7))  # type: ignore[arg-type]
    assert (result.effect, result.reasons[0].code) == (DENY, "ENGINE_ERROR")
    odd = decide(policy, AGENT, Call("x", arguments={"a": {1, 2}, "b": b"x", "c": math.nan}))
    assert odd.effect is ALLOW
