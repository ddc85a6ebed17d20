"""Properties of the policy engine over random policies, agents and calls (hypothesis): it never
raises, never loosens when a DENY rule is added, never lets lower scopes loosen a locked rule, and
answers the same whatever the order of envelopes and calls (so its memo tables are sound)."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arm_common.canonical import canonical_json
from arm_engine.engine import (
    DEFAULT_CLASSIFIER,
    Agent,
    Budgets,
    Call,
    Controls,
    Effect,
    Envelope,
    Grant,
    Result,
    Risk,
    Scope,
    Spend,
    Step,
    ToolRule,
    compile_policy,
    decide,
    glob_matches,
)

# Bounded so the whole file runs in a few seconds; no example database (see tests/unit).
PROPERTY = settings(database=None, deadline=None, max_examples=150,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

T, P, V = "ten_1", "prj_1", "ver_1"
STRICTNESS = {Effect.ALLOW: 0, Effect.NEEDS_APPROVAL: 1, Effect.DENY: 2}

WORDS = ["db", "write", "read", "deploy", "prod", "app", "fs", "read_file", "shell", "exec",
         "send_email", "x"]
segments = st.sampled_from(WORDS + ["Db", "k8s"])
wild = st.sampled_from(["*", "**"])
# Globs and tools share a small vocabulary, so rules match calls often enough to matter.
globs = st.one_of(
    st.lists(st.one_of(segments, wild, segments.map(lambda s: s + "*")), min_size=1, max_size=4)
    .map(".".join),
    st.text(alphabet="ab.*?[]()+\\", max_size=8),
)
TOOLS = ["db.write", "db.read", "deploy.prod.app", "fs.read_file", "shell.exec", "send_email", "x",
         "DB.Write", "db.write.now", "k8s.deploy"]
tools = st.one_of(st.sampled_from(TOOLS), st.lists(segments, min_size=1, max_size=4).map(".".join),
                  st.text(max_size=12))
risks = st.sampled_from(list(Risk))
effects = st.sampled_from(list(Effect))
opt = st.none().__or__
money = st.floats(min_value=0, max_value=20, allow_nan=False)

ARG_WORDS = ["rm -rf /", "production", "--force", "ok", "api_key", ".env", "a[b"]


def json_values(finite: bool) -> st.SearchStrategy[Any]:
    scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**6)
               | st.floats(allow_nan=not finite, allow_infinity=not finite)
               | st.sampled_from(ARG_WORDS) | st.text(max_size=10))
    return st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                        | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)


def arguments(finite: bool = False) -> st.SearchStrategy[Any]:
    return opt(st.dictionaries(st.sampled_from(["cmd", "path", "token", "n", "env", "x"]),
                               st.sampled_from(ARG_WORDS) | json_values(finite), max_size=4))


SMALL_GLOBS = ["**", "*", "db.*", "db.**", "*.write", "db.write", "DB.Write", "*.read", "deploy.**",
               "deploy.*.app", "x", "fs.*", "fs.**", "**.exec", "shell.*", "shell.**", "*.*"]


def tool_rules(glob_strategy: st.SearchStrategy[str]) -> st.SearchStrategy[ToolRule]:
    return st.builds(
        ToolRule, tool=glob_strategy, effect=effects, locked=st.booleans(),
        # Conditions are the exception, so that enough rules apply.
        min_risk=st.sampled_from([None] * 6 + list(Risk)),
        environments=st.sampled_from([()] * 6 + [("prod",), ("DEV", "staging"), ("prod-eu",), ("x",)]),
        arg_patterns=st.sampled_from([()] * 4 + [("rm",), ("rm",), ("(?i)PRODUCTION",), ("a[b",),
                                                 (r'"n":\d', "force")]),
        description=st.sampled_from(["", "note"]),
    )


rules = tool_rules(globs)
MINE = [(Scope.TENANT, T), (Scope.PROJECT, P), (Scope.VERSION, V)]
scope_and_id = st.sampled_from(MINE * 3 + [(Scope.TENANT, "ten_2"), (Scope.PROJECT, "prj_2"),
                                           (Scope.VERSION, "ver_2"), (Scope.PROJECT, T)])
budgets = st.builds(Budgets, per_run_usd=opt(money), daily_usd=opt(money), monthly_usd=opt(money))


@st.composite
def envelope_lists(draw: st.DrawFn, max_size: int = 6,
                   rule_strategy: st.SearchStrategy[ToolRule] = rules) -> list[Envelope]:
    count = draw(st.integers(0, max_size))
    out = []
    for i in range(count):
        scope, scope_id = draw(scope_and_id)
        out.append(Envelope(
            id=f"env_{i}", name=draw(st.sampled_from(["a", "b", "c"])), revision=draw(st.integers(1, 9)),
            scope=scope, scope_id=scope_id, priority=draw(st.sampled_from([50, 100, 100, 200])),
            active=draw(st.sampled_from([True, True, True, False])),
            shadow=draw(st.sampled_from([False, False, False, True])),
            tool_rules=tuple(draw(st.lists(rule_strategy, max_size=5))),
            require_approval_at_risk=draw(opt(risks)), deny_at_risk=draw(opt(risks)),
            autonomy_tier=draw(opt(st.integers(-2, 7))), budgets=draw(opt(budgets)),
            default_effect=draw(opt(effects))))
    # Each field is set only half the time, so envelopes without an opinion are common.
    return out


agents = st.builds(
    Agent, tenant_id=st.just(T), tenant_active=st.sampled_from([True] * 30 + [False]), project_id=st.just(P),
    environment_id=st.just("env_1"), environment_name=st.sampled_from(["prod-eu", "dev", "qa", "x"]),
    environment_type=st.sampled_from(["PROD", "DEV", "STAGING"]), template_id=st.just("tpl"),
    version_id=st.just(V), instance_id=st.just("ins"),
    # Mostly healthy agents and no kill switch, so that most examples reach the policy.
    instance_state=st.sampled_from(["ACTIVE"] * 40 + ["PROVISIONING", "PAUSED", "READONLY",
                                                     "DRAINING", "QUARANTINED", "RETIRED", "??"]),
    version_state=st.sampled_from(["APPROVED"] * 40 + ["DRAFT", "DEPRECATED", "RETIRED", "??"]),
)
grants = st.sampled_from([None] * 40 + [Grant(s) for s in (
    "VALID", "PENDING", "NOT_FOUND", "NOT_APPROVED", "EXPIRED", "USED", "MISMATCH", "WHAT")])
calls = st.builds(Call, tool=tools, arguments=arguments(), declared_risk=opt(risks),
                  estimated_cost_usd=money, is_run_start=st.booleans(), grant=grants)
modes = st.sampled_from(["NORMAL"] * 40 + ["PAUSED", "DRAINING", "QUARANTINED", "??"])
controls = st.builds(Controls, tenant_mode=modes, project_mode=modes)
spends = st.builds(Spend, run_usd=money, day_usd=money, month_usd=money)


def check(policy_envelopes: list[Envelope], agent: Agent | None, call: Call, **kw: Any) -> Result:
    policy = compile_policy(policy_envelopes, tenant_id=T, project_id=P, version_id=V)
    return decide(policy, agent, call, **kw)


@PROPERTY
@given(envelope_lists(), opt(agents), calls, controls, spends)
def test_decide_never_raises_and_answers_completely(envelopes: list[Envelope], agent: Agent | None,
                                                   call: Call, ctl: Controls, spend: Spend) -> None:
    result = check(envelopes, agent, call, controls=ctl, spend=spend)
    assert isinstance(result.effect, Effect) and isinstance(result.step, Step)
    assert result.reasons and result.reasons[0].code != "ENGINE_ERROR", result.reasons
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", r.code) and r.message for r in result.reasons)
    assert isinstance(result.risk, Risk)
    if call.declared_risk is not None:
        assert result.risk >= call.declared_risk
    assert (result.scope is None) == (result.envelope_id == "")
    if result.effect is Effect.ALLOW:
        # Nothing but a clean agent and no kill switch ever allows.
        assert agent is not None and agent.tenant_active and agent.version_state != "RETIRED"
        assert ctl.tenant_mode in ("NORMAL", "DRAINING") and ctl.project_mode in ("NORMAL", "DRAINING")
        assert agent.instance_state in ("ACTIVE", "READONLY", "DRAINING")
    if agent is not None and result.step is not Step.AGENT:
        shadows = [e for e in envelopes if e.shadow and e.active
                   and (e.scope, e.scope_id) in {(Scope.TENANT, T), (Scope.PROJECT, P), (Scope.VERSION, V)}]
        assert sorted(s.envelope_id for s in result.shadow) == sorted(e.id for e in shadows)


@st.composite
def added_deny_rule(draw: st.DrawFn, envelopes: list[Envelope]) -> list[Envelope]:
    """The envelopes with one DENY tool rule added: to an existing envelope (any position) or to
    a new envelope of any scope."""
    new_rule = ToolRule(tool=draw(globs | tools), effect=Effect.DENY, locked=draw(st.booleans()),
                        min_risk=draw(opt(risks)))
    to_existing: bool = draw(st.booleans()) if envelopes else False
    if to_existing:
        i = draw(st.integers(0, len(envelopes) - 1))
        target = envelopes[i]
        at = draw(st.integers(0, len(target.tool_rules)))
        rules = target.tool_rules[:at] + (new_rule,) + target.tool_rules[at:]
        return envelopes[:i] + [replace(target, tool_rules=rules)] + envelopes[i + 1:]
    scope, scope_id = draw(scope_and_id)
    return [*envelopes, Envelope(id="env_new", name="new", revision=1, scope=scope,
                                 scope_id=scope_id, priority=draw(st.sampled_from([50, 100, 200])),
                                 tool_rules=(new_rule,))]


@PROPERTY
@given(st.data(), envelope_lists(), agents, calls, controls, spends)
def test_adding_a_deny_rule_never_loosens(data: st.DataObject, envelopes: list[Envelope],
                                          agent: Agent, call: Call, ctl: Controls,
                                          spend: Spend) -> None:
    before = check(envelopes, agent, call, controls=ctl, spend=spend)
    after = check(data.draw(added_deny_rule(envelopes)), agent, call, controls=ctl, spend=spend)
    # Stronger than "a DENY never turns into an ALLOW": the answer never gets looser at all.
    assert STRICTNESS[after.effect] >= STRICTNESS[before.effect], (before, after)


@PROPERTY
@given(st.data(), envelope_lists(), agents, calls, controls, spends,
       st.sampled_from([Effect.DENY, Effect.NEEDS_APPROVAL]),
       st.sampled_from([(Scope.TENANT, T), (Scope.PROJECT, P)]))
def test_a_locked_rule_is_never_loosened(data: st.DataObject, envelopes: list[Envelope],
                                         agent: Agent, call: Call, ctl: Controls, spend: Spend,
                                         effect: Effect, where: tuple[Scope, str]) -> None:
    # Grants are left out: SPEC step 3 comes before step 4, so a VALID grant does allow.
    call = replace(call, grant=None)
    glob = data.draw(st.sampled_from(["**", call.tool]) | globs)
    if not glob_matches(glob, call.tool):
        glob = "**"
    locked = ToolRule(tool=glob, effect=effect, locked=True,
                      min_risk=data.draw(opt(st.just(Risk.LOW))))
    holder = Envelope(id="env_locked", name="locked", revision=1, scope=where[0], scope_id=where[1],
                      priority=data.draw(st.sampled_from([0, 100, 1000])), tool_rules=(locked,))
    result = check([*envelopes, holder], agent, call, controls=ctl, spend=spend)
    assert result.effect is not Effect.ALLOW, result
    if effect is Effect.DENY:
        assert result.effect is Effect.DENY


@PROPERTY
@given(envelope_lists(), st.randoms(use_true_random=False), agents,
       st.lists(st.tuples(calls, spends), min_size=1, max_size=6), controls)
def test_decide_is_deterministic_and_order_independent(envelopes: list[Envelope], rnd: Any,
                                                       agent: Agent, batch: list[tuple[Call, Spend]],
                                                       ctl: Controls) -> None:
    first = compile_policy(envelopes, tenant_id=T, project_id=P, version_id=V)
    shuffled = list(envelopes)
    rnd.shuffle(shuffled)
    second = compile_policy(shuffled, tenant_id=T, project_id=P, version_id=V)
    # The second policy sees the calls in reverse order, so its memo tables are warmed
    # differently; a third, fresh policy per call has no memo at all.
    forward = [decide(first, agent, c, controls=ctl, spend=s) for c, s in batch]
    backward = [decide(second, agent, c, controls=ctl, spend=s) for c, s in reversed(batch)][::-1]
    fresh = [check(envelopes, agent, c, controls=ctl, spend=s) for c, s in batch]
    again = [decide(first, agent, c, controls=ctl, spend=s) for c, s in batch]
    assert forward == backward == fresh == again


@PROPERTY
@given(envelope_lists(), agents, calls)
def test_spending_more_never_loosens(envelopes: list[Envelope], agent: Agent, call: Call) -> None:
    low = check(envelopes, agent, call, spend=Spend())
    high = check(envelopes, agent, call, spend=Spend(run_usd=1e6, day_usd=1e6, month_usd=1e6))
    assert STRICTNESS[high.effect] >= STRICTNESS[low.effect]
    nan = check(envelopes, agent, call, spend=Spend(day_usd=math.nan))
    assert STRICTNESS[nan.effect] >= STRICTNESS[low.effect]


# --- A reference implementation, written straight from SPEC §3 with no memo, no precomputation
# and no fast path; the engine must agree with it on every input. --------------------------------

BASELINE = {Risk.LOW: Effect.ALLOW, Risk.MEDIUM: Effect.ALLOW, Risk.HIGH: Effect.NEEDS_APPROVAL,
            Risk.CRITICAL: Effect.DENY}


def ref_glob(glob: str, tool: str) -> bool:
    pattern = ""
    for part in re.split(r"(\*+)", glob):
        if part.startswith("**"):
            pattern += ".*"
        elif part == "*":
            pattern += "[^.]*"
        else:
            pattern += re.escape(part)
    return re.fullmatch(pattern, tool, re.IGNORECASE | re.DOTALL) is not None


def ref_when(r: ToolRule, risk: Risk, agent: Agent, args_text: str) -> bool:
    if r.min_risk is not None and risk < r.min_risk:
        return False
    names = {agent.environment_name.lower(), agent.environment_type.lower()}
    if r.environments and not names & {e.lower() for e in r.environments}:
        return False
    if r.arg_patterns:
        def search(p: str) -> bool:
            try:
                return re.search(p, args_text) is not None
            except re.error:
                return p in args_text
        return any(search(p) for p in r.arg_patterns)
    return True


def ref_over(e: Envelope, spend: Spend, cost: float) -> bool:
    b = e.budgets
    if b is None:
        return False
    return any(limit is not None and not used + cost <= limit for used, limit in (
        (spend.run_usd, b.per_run_usd), (spend.day_usd, b.daily_usd), (spend.month_usd, b.monthly_usd)))


def ref_envelope(e: Envelope, tool: str, risk: Risk, agent: Agent, args_text: str, spend: Spend,
                 cost: float) -> tuple[Effect, str, int | None] | None:
    matching = [(i, r) for i, r in enumerate(e.tool_rules)
                if ref_glob(r.tool, tool) and ref_when(r, risk, agent, args_text)]
    if matching:
        def specificity(item: tuple[int, ToolRule]) -> tuple[int, int, int, int, int]:
            i, r = item
            return ("*" not in r.tool, len(r.tool.replace("*", "")),
                    -len(re.findall(r"\*\*+", r.tool)), STRICTNESS[r.effect], -i)
        i, r = max(matching, key=specificity)
        return r.effect, "TOOL_RULE_MATCHED", i
    if e.deny_at_risk is not None and risk >= e.deny_at_risk:
        return Effect.DENY, "RISK_AT_OR_ABOVE_DENY_THRESHOLD", None
    if e.require_approval_at_risk is not None and risk >= e.require_approval_at_risk:
        return Effect.NEEDS_APPROVAL, "RISK_AT_OR_ABOVE_APPROVAL_THRESHOLD", None
    tier = e.autonomy_tier
    if tier is not None:
        if tier not in range(6):
            return Effect.NEEDS_APPROVAL, "INVALID_AUTONOMY_TIER", None
        if tier == 0 or (tier == 1 and risk >= Risk.HIGH) or (tier == 2 and risk >= Risk.CRITICAL):
            return Effect.NEEDS_APPROVAL, "AUTONOMY_TIER_REQUIRES_APPROVAL", None
    if ref_over(e, spend, cost):
        return Effect.DENY, "BUDGET_EXCEEDED", None
    if e.default_effect is not None:
        return e.default_effect, "DEFAULT_EFFECT", None
    return None


Outcome = tuple[Effect, Step, str, str, "int | None"]


def reference(envelopes: list[Envelope], agent: Agent, call: Call, ctl: Controls,
              spend: Spend) -> Outcome:
    risk = DEFAULT_CLASSIFIER.classify(call.tool, call.arguments)
    if call.declared_risk is not None:
        risk = max(risk, call.declared_risk)
    tool, cost = call.tool, call.estimated_cost_usd
    if not agent.tenant_active:
        return Effect.DENY, Step.AGENT, "TENANT_INACTIVE", "", None
    if agent.version_state not in ("DRAFT", "TESTING", "CANDIDATE", "APPROVED", "DEPRECATED"):
        return Effect.DENY, Step.AGENT, ("VERSION_RETIRED" if agent.version_state == "RETIRED"
                                         else "VERSION_STATE_UNKNOWN"), "", None
    for name, mode in (("TENANT", ctl.tenant_mode), ("PROJECT", ctl.project_mode)):
        if mode in ("PAUSED", "QUARANTINED") or (mode == "DRAINING" and call.is_run_start):
            return Effect.DENY, Step.KILL_SWITCH, f"{name}_{mode}", "", None
        if mode not in ("NORMAL", "DRAINING"):
            return Effect.DENY, Step.KILL_SWITCH, f"{name}_CONTROL_UNKNOWN", "", None
    state = agent.instance_state
    if (state in ("PAUSED", "QUARANTINED", "PROVISIONING", "RETIRED")
            or (state == "READONLY" and risk >= Risk.MEDIUM)
            or (state == "DRAINING" and call.is_run_start)):
        return Effect.DENY, Step.KILL_SWITCH, f"INSTANCE_{state}", "", None
    if state not in ("ACTIVE", "READONLY", "DRAINING"):
        return Effect.DENY, Step.KILL_SWITCH, "INSTANCE_STATE_UNKNOWN", "", None

    applicable = [e for e in envelopes if e.active and (e.scope, e.scope_id) in MINE]
    enforce = [e for e in applicable if not e.shadow]
    order = sorted(enforce, key=lambda e: (-e.scope, -e.priority, e.name, e.id))
    first_over = next((e for e in order if ref_over(e, spend, cost)), None)
    if call.grant is not None:
        if call.grant.status not in ("VALID", "PENDING"):
            code = call.grant.status if call.grant.status in (
                "NOT_FOUND", "NOT_APPROVED", "EXPIRED", "USED", "MISMATCH") else "INVALID"
            return Effect.DENY, Step.APPROVAL_GRANT, f"APPROVAL_{code}", "", None
        if first_over is not None:
            return Effect.DENY, Step.BUDGET, "BUDGET_EXCEEDED", first_over.id, None
        if call.grant.status == "PENDING":
            return Effect.NEEDS_APPROVAL, Step.APPROVAL_GRANT, "APPROVAL_PENDING", "", None
        return Effect.ALLOW, Step.APPROVAL_GRANT, "APPROVAL_GRANTED", "", None

    args_text = canonical_json(dict(call.arguments or {}))
    locked_na = None
    for e in sorted(order, key=lambda e: e.scope):  # tenant, then project
        if e.scope is Scope.VERSION:
            continue
        for i, r in enumerate(e.tool_rules):
            if r.locked and ref_glob(r.tool, tool) and ref_when(r, risk, agent, args_text):
                if r.effect is Effect.DENY:
                    return Effect.DENY, Step.LOCKED_RULE, "LOCKED_RULE_MATCHED", e.id, i
                if r.effect is Effect.NEEDS_APPROVAL and locked_na is None:
                    locked_na = (e.id, i)
    outcome: Outcome | None = None
    for scope in (Scope.VERSION, Scope.PROJECT, Scope.TENANT):
        for priority in sorted({e.priority for e in order if e.scope is scope}, reverse=True):
            group = [e for e in order if e.scope is scope and e.priority == priority]
            found = [(e, ref_envelope(e, tool, risk, agent, args_text, spend, cost)) for e in group]
            hits = [(e, h) for e, h in found if h is not None]
            if hits:
                top = max(STRICTNESS[h[0]] for _, h in hits)
                e, h = next((e, h) for e, h in hits if STRICTNESS[h[0]] == top)
                outcome = (h[0], Step.ENVELOPE, h[1], e.id, h[2])
                break
        if outcome is not None:
            break
    if outcome is None:
        outcome = (BASELINE[risk], Step.BASELINE, f"BASELINE_{risk.name}", "", None)
    if outcome[0] is not Effect.DENY and first_over is not None:
        outcome = (Effect.DENY, Step.BUDGET, "BUDGET_EXCEEDED", first_over.id, None)
    if outcome[0] is not Effect.DENY and locked_na is not None:
        outcome = (Effect.NEEDS_APPROVAL, Step.LOCKED_RULE, "LOCKED_RULE_MATCHED", *locked_na)
    return outcome


@settings(PROPERTY, max_examples=400)
@given(envelope_lists(rule_strategy=tool_rules(st.sampled_from(SMALL_GLOBS))), agents,
       st.lists(st.tuples(
           st.builds(Call, tool=st.sampled_from(TOOLS[:4]), arguments=arguments(finite=True),
                     declared_risk=st.sampled_from([None] * 4 + list(Risk)),
                     estimated_cost_usd=money, is_run_start=st.booleans(), grant=grants),
           spends, st.booleans()), min_size=1, max_size=8),
       controls)
def test_engine_agrees_with_the_reference(envelopes: list[Envelope], agent: Agent,
                                          batch: list[tuple[Call, Spend, bool]],
                                          ctl: Controls) -> None:
    policy = compile_policy(envelopes, tenant_id=T, project_id=P, version_id=V)
    elsewhere = replace(agent, environment_name="dev-2", environment_type="DEV")
    # Several calls of a few tools, from agents in two environments, on one policy: the memo
    # tables are exercised, and must never answer one call with another's result.
    for call, spend, moved in batch:
        who = elsewhere if moved else agent
        r = decide(policy, who, call, controls=ctl, spend=spend)
        got = (r.effect, r.step, r.reasons[0].code, r.envelope_id, r.rule_index)
        assert got == reference(envelopes, who, call, ctl, spend), r.reasons


@settings(PROPERTY, max_examples=300)
@given(envelope_lists(rule_strategy=tool_rules(st.sampled_from(SMALL_GLOBS))), agents,
       st.sampled_from(TOOLS[:4]),
       st.lists(st.tuples(arguments(finite=True), st.sampled_from([None, None, Risk.HIGH]),
                          st.booleans()), min_size=2, max_size=10))
def test_memoised_answers_equal_fresh_ones(envelopes: list[Envelope], agent: Agent, tool: str,
                                           variants: list[tuple[Any, Risk | None, bool]]) -> None:
    # One tool, many calls that differ in arguments, declared risk and environment: exactly what
    # the per-tool memo keys must tell apart.
    warm = compile_policy(envelopes, tenant_id=T, project_id=P, version_id=V)
    elsewhere = replace(agent, environment_name="dev-2", environment_type="DEV")
    for args, declared, moved in variants:
        who = elsewhere if moved else agent
        call = Call(tool, arguments=args, declared_risk=declared)
        assert decide(warm, who, call) == check(envelopes, who, call)


@PROPERTY
@given(st.one_of(globs, st.text(alphabet="ab.*", max_size=12)),
       st.one_of(tools, st.text(alphabet="abAB.", max_size=12)))
def test_glob_matching_agrees_with_the_reference(glob: str, tool: str) -> None:
    assert glob_matches(glob, tool) is ref_glob(glob, tool)
