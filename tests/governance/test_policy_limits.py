"""Issue 10, item 1: no tenant can slow another's `Check`. Tool globs are matched by RE2 sets
(linear in the name, no backtracking); everything a tenant writes that costs decision time is
bounded at the edge (INVALID_ARGUMENT with field violations, arm_governance/limits.py); and a
tenant holding the worst policy the limits allow does not change another tenant's decisions."""

from __future__ import annotations

import random
import re
import secrets
from typing import Any

import grpc
import pytest
import re2
from google.protobuf import field_mask_pb2, struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arm.governance.v1 import policy_pb2
from arm_client import ArmClient
from arm_engine import engine
from arm_engine.engine import Effect, Envelope, Scope, ToolRule, compile_policy
from arm_engine.engine import globs as engine_globs
from arm_governance.policy import limits
from tests.conftest import TenantContext, make_tenant
from tests.governance.test_policy_admin import (
    ALLOW,
    DENY,
    NA,
    PROJECT,
    TENANT,
    VERSION,
    active_agent,
    check,
    create,
    envelope,
    rule,
)
from tests.helpers import expect_failure

INVALID = grpc.StatusCode.INVALID_ARGUMENT


# --- The matcher: RE2 sets, and the same answers as a reference matcher -----------------------


def ref_glob(glob: str, tool: str) -> bool:
    """Dynamic programming over (glob position, name position): no regex engine at all."""
    g, t = glob.lower(), tool.lower()
    tokens: list[str] = []
    for part in re.split(r"(\*+)", g):
        if part.startswith("*"):
            tokens.append("**" if len(part) >= 2 else "*")
        else:
            tokens.extend(part)
    n = len(t)
    # reach[j]: the glob prefix read so far can consume exactly t[:j]
    reach = [j == 0 for j in range(n + 1)]
    for tok in tokens:
        nxt = [False] * (n + 1)
        if tok in ("*", "**"):
            for j in range(n + 1):
                if reach[j] or (j > 0 and nxt[j - 1] and (tok == "**" or t[j - 1] != ".")):
                    nxt[j] = True
        else:
            for j in range(1, n + 1):
                nxt[j] = reach[j - 1] and t[j - 1] == tok
        reach = nxt
    return reach[n]


glob_alphabet = st.sampled_from(["a", "b", ".", "*", "**", "A", "_"])
name_alphabet = "abAB._"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(glob_alphabet, min_size=1, max_size=24).map("".join),
                min_size=1, max_size=30),
       st.lists(st.text(alphabet=name_alphabet, max_size=80), min_size=1, max_size=4))
def test_glob_sets_agree_with_a_reference_matcher(globs: list[str], names: list[str]) -> None:
    """Many globs in one policy (several RE2 sets when there are more than fit one), long names
    of few letters (where a backtracking matcher does the most work): one set match per name
    answers exactly what the reference says for every glob."""
    matcher = engine_globs._GlobSet(globs)
    assert not matcher._alone, "every glob went into an RE2 set"
    assert all(isinstance(s, re2.Set) for s, _ in matcher._sets)
    for name in names:
        hits = matcher.match(name)
        want = {matcher.ids[g] for g in globs if ref_glob(g, name)}
        assert hits == want, name


def test_many_globs_span_several_sets_and_keep_their_answers() -> None:
    rng = random.Random(7)
    globs = sorted({"".join(rng.choice(["a", "b", ".", "*", "**"]) for _ in range(rng.randint(1, 12)))
                    for _ in range(600)})
    matcher = engine_globs._GlobSet(globs)
    assert len(matcher._sets) == -(-len(globs) // engine_globs._GLOBS_PER_SET) > 1
    for _ in range(50):
        name = "".join(rng.choice("ab.") for _ in range(rng.randint(0, 60)))
        assert matcher.match(name) == {matcher.ids[g] for g in globs if ref_glob(g, name)}


def test_the_old_pathological_glob_is_matched_by_re2_and_decides() -> None:
    """`a*a*a*c` rules against a long name of `a`s took a backtracking regex seconds; now the
    policy holds no Python regex for globs at all, and the decision is the reference's."""
    rules = tuple(ToolRule(tool="a*a*a*" + "a" * i + "c", effect=Effect.DENY) for i in range(100))
    policy = compile_policy([Envelope("e", "e", 1, Scope.TENANT, "t", tool_rules=rules)],
                            tenant_id="t", project_id="p", version_id="v")
    assert all(isinstance(s, re2.Set) for s, _ in policy._globs._sets) and not policy._globs._alone
    agent = engine.Agent("t", True, "p", "e", "dev", "DEV", "tpl", "v", "i", "ACTIVE", "APPROVED")
    assert engine.decide(policy, agent, engine.Call("a" * 200)).step is engine.Step.BASELINE
    hit = engine.decide(policy, agent, engine.Call("a" * 199 + "c"))
    assert hit.effect is Effect.DENY and hit.reasons[0].code == "TOOL_RULE_MATCHED"


def test_a_set_out_of_automaton_memory_falls_back_to_single_globs() -> None:
    """RE2 reports an exhausted set automaton as "no match"; the always-matching sentinel tells
    the two apart, and the globs are then matched one by one (still RE2) — never fail open."""
    matcher = engine_globs._GlobSet(["db.*", "**.write", "x"])
    _rx_set, local = matcher._sets[0]

    class Exhausted:
        def Match(self, data: bytes) -> None:  # noqa: N802 — RE2's name
            return None

    matcher._sets[0] = (Exhausted(), local)
    assert matcher.match("db.write") == {matcher.ids["db.*"], matcher.ids["**.write"]}
    assert matcher.match("y") == frozenset()


pattern_atoms = st.sampled_from(["a", "b", "x", ".", "\\d", "[ab]", "(?i)A", "^", "$", "\\{", "(", ")",
                                 "*", "+", "?", "{2}", "|", "\"cmd\""])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(pattern_atoms, max_size=6).map("".join), min_size=1, max_size=12),
       st.text(alphabet='ab x1"{}:A.', max_size=200))
def test_argument_pattern_set_agrees_with_one_search_per_pattern(patterns: list[str], text: str) -> None:
    """All of a policy's argument patterns are searched in one pass (an RE2 set); the answer is
    the one-search-per-pattern answer, invalid patterns (matched literally) included."""
    data = text.encode()
    want = 0
    for i, p in enumerate(patterns):
        if engine_globs._compile_arg_pattern(p).search(data) is not None:
            want |= 1 << i
    assert engine_globs._PatternSet(patterns).match(data) == want


# --- Bounds at the edge -------------------------------------------------------------------------


async def test_over_limit_writes_are_invalid_argument_with_the_field(gov: ArmClient,
                                                                      tenant: TenantContext) -> None:
    five = "a*b*c*d*e*f"
    periodic = "x*" + "a" * limits.MAX_GLOB_COST  # every `a` can be alive at once
    long_tool = "a" * (limits.MAX_TOOL_NAME + 1)
    many = [rule(f"t{i}", ALLOW) for i in range(limits.MAX_RULES_PER_ENVELOPE + 1)]
    big_pattern = "a{150}b{150}"
    cases = [
        (envelope(tool_rules=[rule(five, DENY)]), "envelope.tool_rules[0].tool"),
        (envelope(tool_rules=[rule("ok", DENY), rule(periodic, DENY)]), "envelope.tool_rules[1].tool"),
        (envelope(tool_rules=[rule(long_tool, DENY)]), "envelope.tool_rules[0].tool"),
        (envelope(tool_rules=many), "envelope.tool_rules"),
        (envelope(tool_rules=[rule("x", DENY, when=policy_pb2.ToolRuleCondition(
            arg_patterns=["ok", big_pattern]))]), "envelope.tool_rules[0].when.arg_patterns[1]"),
        (envelope(tool_rules=[rule("x", DENY, when=policy_pb2.ToolRuleCondition(
            arg_patterns=[f"p{i}" for i in range(limits.MAX_ARG_PATTERNS_PER_RULE + 1)]))]),
         "envelope.tool_rules[0].when.arg_patterns"),
    ]
    assert re2.compile(big_pattern).programsize > limits.MAX_ARG_PATTERN_PROGRAM
    for env, path in cases:
        failed = await expect_failure(gov.policies.CreatePolicyEnvelope(
            policy_pb2.CreatePolicyEnvelopeRequest(envelope=env)), INVALID, "INVALID_FIELDS")
        assert path in failed.violations, (path, failed.violations)
        # SimulatePolicy takes a candidate through the same checks.
        failed = await expect_failure(gov.policies.SimulatePolicy(
            policy_pb2.SimulatePolicyRequest(candidate=env)), INVALID)
        assert path.replace("envelope.", "candidate.") in failed.violations
    # Exactly at the limits is fine.
    assert limits.glob_cost(periodic) > limits.MAX_GLOB_COST
    # A long glob of literals that do not repeat themselves is cheap, however long.
    at_limit = "x" * (limits.MAX_TOOL_NAME - 7 - 40) + "*" + "**".join(
        ["create_pul", "request_re", "view_comme", "nts_in_bul"])
    assert len(at_limit) == limits.MAX_TOOL_NAME
    assert limits.glob_cost(at_limit) <= limits.MAX_GLOB_COST
    await create(gov, envelope(tool_rules=[rule(at_limit, DENY)]))
    agent = await active_agent(tenant.admin)
    failed = await expect_failure(check(gov, agent.instance.id, long_tool), INVALID, "INVALID_FIELDS")
    assert "tool_name" in failed.violations
    assert (await check(gov, agent.instance.id, long_tool[:-1])).decision == ALLOW


async def test_scope_totals_are_bounded_over_active_envelopes(gov: ArmClient,
                                                              tenant: TenantContext) -> None:
    agent = await active_agent(tenant.admin)
    version = agent.agents.version.id
    half = limits.MAX_ACTIVE_RULES_PER_SCOPE // 2
    await create(gov, envelope(VERSION, version, tool_rules=[rule(f"a{i}", ALLOW) for i in range(half)]))
    await create(gov, envelope(VERSION, version, mode=policy_pb2.POLICY_MODE_SHADOW,
                               tool_rules=[rule(f"b{i}", ALLOW) for i in range(half)]))
    failed = await expect_failure(gov.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
        envelope=envelope(VERSION, version, tool_rules=[rule("c", DENY)]))), INVALID, "INVALID_FIELDS")
    assert "envelope.tool_rules" in failed.violations
    # Nothing was stored: the decision is unchanged.
    assert (await check(gov, agent.instance.id, "c")).decision == ALLOW
    # Inactive envelopes do not count, until they are activated.
    idle = await create(gov, envelope(VERSION, version, active=False, tool_rules=[rule("c", DENY)]))
    failed = await expect_failure(gov.policies.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(envelope_id=idle.envelope_id, active=True),
        update_mask=field_mask_pb2.FieldMask(paths=["active"]), etag=idle.etag)), INVALID, "INVALID_FIELDS")
    assert "envelope.tool_rules" in failed.violations
    # Other scopes have their own totals.
    await create(gov, envelope(PROJECT, agent.agents.project.id, tool_rules=[rule("c", DENY)]))
    assert (await check(gov, agent.instance.id, "c")).decision == DENY
    # Envelopes per scope.
    for _ in range(limits.MAX_ACTIVE_ENVELOPES_PER_SCOPE):
        await create(gov, envelope(TENANT))
    failed = await expect_failure(gov.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
        envelope=envelope(TENANT))), INVALID, "INVALID_FIELDS")
    assert "envelope" in failed.violations
    # Glob cost per scope: cheap globs may be many, costly ones few.
    costly = "*" + "**".join(["aaaaa"] * 3) + "*aaaa"
    assert limits.glob_cost(costly) == limits.MAX_GLOB_COST
    fits = limits.MAX_GLOB_COST_PER_SCOPE // limits.MAX_GLOB_COST
    failed = await expect_failure(gov.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
        envelope=envelope(PROJECT, agent.agents.project.id, tool_rules=[
            rule(f"p{i}{costly}", DENY) for i in range(fits + 1)]))), INVALID,
        "INVALID_FIELDS")
    assert "envelope.tool_rules" in failed.violations
    # SimulatePolicy holds a candidate to what one scope may hold.
    failed = await expect_failure(gov.policies.SimulatePolicy(policy_pb2.SimulatePolicyRequest(
        candidate=envelope(PROJECT, agent.agents.project.id, tool_rules=[
            rule(f"p{i}{costly}", DENY) for i in range(fits + 1)]))), INVALID)
    assert "candidate.tool_rules" in failed.violations
    # Argument patterns per scope (distinct).
    pats = [f"p{i}" for i in range(limits.MAX_ACTIVE_ARG_PATTERNS_PER_SCOPE + 1)]
    per = limits.MAX_ARG_PATTERNS_PER_RULE
    failed = await expect_failure(gov.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
        envelope=envelope(PROJECT, agent.agents.project.id, tool_rules=[
            rule("x", DENY, when=policy_pb2.ToolRuleCondition(arg_patterns=pats[i:i + per]))
            for i in range(0, len(pats), per)]))), INVALID, "INVALID_FIELDS")
    assert "envelope.tool_rules" in failed.violations


# --- The noisy neighbour --------------------------------------------------------------------------


@pytest.fixture
async def gov(governance: Any, tenant: TenantContext) -> Any:
    client = governance.client(tenant.admin_key)
    yield client
    await client.close()


async def write_worst_policy(gov: ArmClient, agent: Any) -> None:
    """The worst policy the limits allow, over the three scopes of one agent."""
    for salt, (scope, scope_id) in enumerate(((TENANT, ""), (PROJECT, agent.agents.project.id),
                                              (VERSION, agent.agents.version.id))):
        await create(gov, envelope(scope, scope_id, tool_rules=limits.worst_legal_rules(salt)))


async def test_the_worst_legal_policy_does_not_change_another_tenants_decisions(
        registry: Any, system_admin: Any, governance: Any, gov: ArmClient, tenant: TenantContext) -> None:
    a_agent = await active_agent(tenant.admin)
    await write_worst_policy(gov, a_agent)
    other = await make_tenant(registry, system_admin)
    b_gov = governance.client(other.admin_key)
    try:
        b_agent = await active_agent(other.admin)
        await create(b_gov, envelope(VERSION, b_agent.agents.version.id, tool_rules=[
            rule("db.write", DENY), rule("fs.*", ALLOW), rule("ops.**", NA)]))
        rng = random.Random(11)
        hostile = ["a" * limits.MAX_TOOL_NAME, "a" * (limits.MAX_TOOL_NAME - 1) + "b"] + [
            "".join(rng.choice("aaaab.") for _ in range(limits.MAX_TOOL_NAME)) for _ in range(10)]
        want_b = [("db.write", DENY), ("fs.read", ALLOW), ("ops.x.y", NA), ("git.push", ALLOW)]
        for name in hostile:
            a = await check(gov, a_agent.instance.id, name, request_id=secrets.token_hex(6))
            # A's own decisions follow A's policy: the all-`a` name matches a periodic glob.
            if set(name) == {"a"}:
                assert a.decision == ALLOW and a.reasons[0].code == "TOOL_RULE_MATCHED", a
            for tool, effect in want_b:
                b = await check(b_gov, b_agent.instance.id, tool)
                assert b.decision == effect, (tool, b)
        # A's argument patterns apply to A's calls with arguments that match them.
        args = struct_pb2.Struct()
        args.update({"cmd": "abc" + "x0_3" + "y"})
        denied = await check(gov, a_agent.instance.id, "anything", arguments=args)
        assert denied.decision == DENY and denied.reasons[0].code == "TOOL_RULE_MATCHED", denied
    finally:
        await b_gov.close()
        await other.admin.close()
