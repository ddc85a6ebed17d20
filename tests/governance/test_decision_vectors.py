"""Decision vectors through the real gRPC `Check` (SPEC §3 "Policy envelopes", "Risk", "The
decision"): per case a fresh tenant, a world built through the registry and governance APIs
(project, environment, template, version, instance walked to its state; envelopes at TENANT /
PROJECT / VERSION scope; operator controls; spend on the ledger), then one Check whose decision,
step, reason code and deciding scope / envelope / revision / rule are asserted.

Policy and operator-control changes are invalidated synchronously in this process, so they
apply on the very next Check; instance-state changes travel over the registry's change feed and
are polled for (bounded) where a Check saw the old state first."""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2, text_format, timestamp_pb2

from arm.common.v1 import common_pb2
from arm.governance.v1 import decision_pb2, policy_pb2
from arm.registry.v1 import agents_pb2, tenancy_pb2
from arm_client import ArmClient
from arm_common.auth import ACT_FOR_TENANT_HEADER
from arm_engine import engine
from arm_governance import convert
from tests.helpers import AgentSet, approved_version, refused_within

# --- Enum shorthands ----------------------------------------------------------------------------

ALLOW, DENY, NA = policy_pb2.DECISION_ALLOW, policy_pb2.DECISION_DENY, policy_pb2.DECISION_NEEDS_APPROVAL
NO_DECISION = policy_pb2.DECISION_UNSPECIFIED
LOW, MEDIUM, HIGH, CRITICAL = (common_pb2.RISK_LEVEL_LOW, common_pb2.RISK_LEVEL_MEDIUM,
                               common_pb2.RISK_LEVEL_HIGH, common_pb2.RISK_LEVEL_CRITICAL)
S_AGENT = decision_pb2.DECISION_STEP_AGENT
S_KILL = decision_pb2.DECISION_STEP_KILL_SWITCH
S_LOCKED = decision_pb2.DECISION_STEP_LOCKED_RULE
S_ENVELOPE = decision_pb2.DECISION_STEP_ENVELOPE
S_BASELINE = decision_pb2.DECISION_STEP_BASELINE
S_BUDGET = decision_pb2.DECISION_STEP_BUDGET
K_TOOL = policy_pb2.RULE_KIND_TOOL_RULE
K_DENY_RISK = policy_pb2.RULE_KIND_DENY_AT_RISK
K_APPROVAL_RISK = policy_pb2.RULE_KIND_REQUIRE_APPROVAL_AT_RISK
K_TIER = policy_pb2.RULE_KIND_AUTONOMY_TIER
K_BUDGET = policy_pb2.RULE_KIND_BUDGET
K_DEFAULT = policy_pb2.RULE_KIND_DEFAULT_EFFECT
ENFORCE, SHADOW = policy_pb2.POLICY_MODE_ENFORCE, policy_pb2.POLICY_MODE_SHADOW
SCOPES = {"tenant": policy_pb2.POLICY_SCOPE_TENANT, "project": policy_pb2.POLICY_SCOPE_PROJECT,
          "version": policy_pb2.POLICY_SCOPE_VERSION}
CONTROL_SCOPES = {"tenant": policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT,
                  "project": policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT}
C_NORMAL = policy_pb2.OPERATOR_CONTROL_MODE_NORMAL
C_PAUSED = policy_pb2.OPERATOR_CONTROL_MODE_PAUSED
C_DRAINING = policy_pb2.OPERATOR_CONTROL_MODE_DRAINING
C_QUARANTINED = policy_pb2.OPERATOR_CONTROL_MODE_QUARANTINED
I_PROVISIONING = agents_pb2.INSTANCE_STATE_PROVISIONING
I_ACTIVE = agents_pb2.INSTANCE_STATE_ACTIVE
I_PAUSED = agents_pb2.INSTANCE_STATE_PAUSED
I_READONLY = agents_pb2.INSTANCE_STATE_READONLY
I_DRAINING = agents_pb2.INSTANCE_STATE_DRAINING
I_QUARANTINED = agents_pb2.INSTANCE_STATE_QUARANTINED
I_RETIRED = agents_pb2.INSTANCE_STATE_RETIRED


# --- World building through the APIs ------------------------------------------------------------


def struct(value: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    if value is None:
        return None
    out = struct_pb2.Struct()
    out.update(dict(value))
    return out


def rule(tool: str, effect: int, *, locked: bool = False, min_risk: int = 0,
         environments: tuple[str, ...] = (), arg_patterns: tuple[str, ...] = (),
         description: str = "") -> policy_pb2.ToolRule:
    return policy_pb2.ToolRule(tool=tool, effect=effect, locked=locked, description=description,
                               when=policy_pb2.ToolRuleCondition(min_risk=min_risk,
                                                                 environments=list(environments),
                                                                 arg_patterns=list(arg_patterns)))


@dataclass(frozen=True)
class Env:
    """An envelope to create; `scope` is tenant / project / version (the world supplies the id;
    a tenant envelope is created with an empty scope_id, which means the caller's tenant)."""

    scope: str
    rules: tuple[policy_pb2.ToolRule, ...] = ()
    mode: int = ENFORCE
    priority: int | None = None
    active: bool | None = None
    require_approval_at_risk: int = 0
    deny_at_risk: int = 0
    autonomy_tier: int | None = None
    budgets: policy_pb2.Budgets | None = None
    default_effect: int = 0


@dataclass(frozen=True)
class Spend:
    """A ledger entry to report before the Check; `months_ago` moves it to an earlier month."""

    amount: float
    run_id: str = ""
    months_ago: int = 0


def envelope_message(spec: Env, name: str, scope_id: str) -> policy_pb2.PolicyEnvelope:
    """The envelope a spec describes, as CreatePolicyEnvelope takes it."""
    env = policy_pb2.PolicyEnvelope(
        name=name, scope=SCOPES[spec.scope], scope_id=scope_id, mode=spec.mode,
        tool_rules=list(spec.rules), require_approval_at_risk=spec.require_approval_at_risk,
        deny_at_risk=spec.deny_at_risk, default_effect=spec.default_effect)
    if spec.priority is not None:
        env.priority = spec.priority
    if spec.active is not None:
        env.active = spec.active
    if spec.autonomy_tier is not None:
        env.autonomy_tier = spec.autonomy_tier
    if spec.budgets is not None:
        env.budgets.CopyFrom(spec.budgets)
    return env


async def instance_in_state(admin: ArmClient, agents: AgentSet, state: int,
                            legacy_agent_id: str = "") -> agents_pb2.AgentInstance:
    """Creates an instance (PROVISIONING) and walks it to `state` through the registry API."""
    inst = (await admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id,
        name=f"inst-{secrets.token_hex(3)}", legacy_agent_id=legacy_agent_id))).agent_instance
    assert inst.state == I_PROVISIONING
    path = {I_PROVISIONING: [], I_ACTIVE: [I_ACTIVE], I_RETIRED: [I_ACTIVE, I_RETIRED]}.get(state, [I_ACTIVE, state])
    for target in path:
        inst = (await admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
            id=inst.id, to_state=target, reason="test"))).agent_instance
    assert inst.state == state
    return inst


@dataclass
class World:
    """One tenant's agent, its governance client, and the envelopes created for it."""

    tenant_id: str
    admin: ArmClient
    gov: ArmClient
    agents: AgentSet
    instance: agents_pb2.AgentInstance
    legacy_id: str
    created: list[policy_pb2.PolicyEnvelope] = field(default_factory=list)

    @classmethod
    async def build(cls, tenant: Any, gov: ArmClient, *, state: int = I_ACTIVE,
                    env_type: int = tenancy_pb2.ENVIRONMENT_TYPE_DEV) -> World:
        agents = await approved_version(tenant.admin, env_type)
        legacy = f"legacy-{secrets.token_hex(5)}"
        inst = await instance_in_state(tenant.admin, agents, state, legacy)
        return cls(tenant.tenant.id, tenant.admin, gov, agents, inst, legacy)

    def scope_id(self, scope: str) -> str:
        return {"tenant": self.tenant_id, "project": self.agents.project.id,
                "version": self.agents.version.id}[scope]

    async def envelope(self, spec: Env) -> policy_pb2.PolicyEnvelope:
        env = envelope_message(spec, f"env-{len(self.created)}-{secrets.token_hex(3)}",
                               "" if spec.scope == "tenant" else self.scope_id(spec.scope))
        created = (await self.gov.policies.CreatePolicyEnvelope(
            policy_pb2.CreatePolicyEnvelopeRequest(envelope=env))).envelope
        assert created.revision == 1 and created.scope_id == self.scope_id(spec.scope)
        self.created.append(created)
        return created

    async def control(self, scope: str, mode: int) -> policy_pb2.OperatorControl:
        return (await self.gov.policies.SetOperatorControl(policy_pb2.SetOperatorControlRequest(
            scope=CONTROL_SCOPES[scope], scope_id="" if scope == "tenant" else self.agents.project.id,
            mode=mode, reason="test"))).control

    async def spend(self, entry: Spend) -> None:
        when = datetime.now(UTC)
        if entry.months_ago:
            when = when.replace(day=1, hour=12) - timedelta(days=1 + 31 * (entry.months_ago - 1))
        occur = timestamp_pb2.Timestamp()
        occur.FromDatetime(when)
        resp = await self.gov.decisions.ReportSpend(decision_pb2.ReportSpendRequest(entry=decision_pb2.SpendEntry(
            instance_id=self.instance.id, run_id=entry.run_id, amount_usd=entry.amount,
            idempotency_key=f"spend-{secrets.token_hex(6)}", occur_time=occur)))
        assert not resp.duplicate

    async def check(self, tool: str, *, args: Mapping[str, Any] | None = None, declared: int = 0,
                    cost: float = 0.0, run_id: str = "", run_start: bool = False,
                    legacy: bool = False, instance_id: str | None = None) -> decision_pb2.CheckResponse:
        request = decision_pb2.CheckRequest(
            tool_name=tool, arguments=struct(args), declared_risk=declared, estimated_cost_usd=cost,
            run_id=run_id, is_run_start=run_start, tool_call_id=f"tc-{secrets.token_hex(4)}")
        if legacy:
            request.legacy_agent_id = self.legacy_id
        else:
            request.instance_id = instance_id or self.instance.id
        return await self.gov.decisions.Check(request)


@pytest.fixture
async def gov(governance: Any, tenant: Any) -> AsyncIterator[ArmClient]:
    client = governance.client(tenant.admin_key)
    yield client
    await client.close()


# --- Expectations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """What Check must answer. `env` is the index (in the case's envelopes) of the deciding
    envelope, None when no envelope decided."""

    decision: int
    step: int
    code: str
    env: int | None = None
    kind: int = 0
    index: int | None = None
    risk: int = 0


def assert_decision(resp: decision_pb2.CheckResponse, want: Expect, world: World) -> None:
    got = (policy_pb2.Decision.Name(resp.decision), decision_pb2.DecisionStep.Name(resp.step),
           resp.reasons[0].code if resp.reasons else "")
    assert got == (policy_pb2.Decision.Name(want.decision), decision_pb2.DecisionStep.Name(want.step),
                   want.code), resp
    assert resp.decision_id and resp.decide_time.seconds > 0
    if want.risk:
        assert resp.effective_risk == want.risk, resp
    if want.env is None:
        assert (resp.scope, resp.scope_id, resp.envelope_id, resp.envelope_revision) == (
            policy_pb2.POLICY_SCOPE_UNSPECIFIED, "", "", 0), resp
    else:
        env = world.created[want.env]
        assert (resp.scope, resp.scope_id, resp.envelope_id, resp.envelope_revision) == (
            env.scope, env.scope_id, env.envelope_id, env.revision), resp
    assert resp.rule_kind == want.kind, resp
    if want.index is None:
        assert not resp.HasField("rule_index"), resp
    else:
        assert resp.HasField("rule_index") and resp.rule_index == want.index, resp
    if want.decision == NA:
        assert resp.approval_id, "a NEEDS_APPROVAL answer names the approval it created"
    else:
        assert not resp.approval_id, resp


# --- The vectors --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    expect: Expect
    tool: str = "fs.read"
    envelopes: tuple[Env, ...] = ()
    args: Mapping[str, Any] | None = None
    declared: int = 0
    cost: float = 0.0
    run_id: str = ""
    run_start: bool = False
    state: int = I_ACTIVE
    controls: tuple[tuple[str, int], ...] = ()
    spend: tuple[Spend, ...] = ()
    shadow: tuple[tuple[int, int, int], ...] = ()
    """Expected shadow results: (envelope index, decision, rule kind), in response order."""
    bug: str = ""
    """A known service bug this vector exposes: the case runs as a strict xfail."""


def E(decision: int, step: int, code: str, env: int | None = None, kind: int = 0,
      index: int | None = None, risk: int = 0) -> Expect:
    return Expect(decision, step, code, env, kind, index, risk)


def tool_hit(decision: int, env: int, index: int = 0, risk: int = 0) -> Expect:
    return E(decision, S_ENVELOPE, "TOOL_RULE_MATCHED", env, K_TOOL, index, risk)


def baseline(risk: int) -> Expect:
    decision = {LOW: ALLOW, MEDIUM: ALLOW, HIGH: NA, CRITICAL: DENY}[risk]
    return E(decision, S_BASELINE, f"BASELINE_{common_pb2.RiskLevel.Name(risk).removeprefix('RISK_LEVEL_')}",
             risk=risk)


LAYERING = [
    Case("version-beats-project-beats-tenant", tool_hit(ALLOW, 2), envelopes=(
        Env("tenant", (rule("fs.read", DENY),)), Env("project", (rule("fs.read", NA),)),
        Env("version", (rule("fs.read", ALLOW),)))),
    Case("project-beats-tenant", tool_hit(NA, 1), envelopes=(
        Env("tenant", (rule("fs.read", ALLOW),)), Env("project", (rule("fs.read", NA),)))),
    Case("tenant-alone-decides", tool_hit(DENY, 0), envelopes=(Env("tenant", (rule("fs.read", DENY),)),)),
    Case("silent-version-falls-through-to-project", tool_hit(DENY, 0), envelopes=(
        Env("project", (rule("fs.*", DENY),)), Env("version", (rule("other.tool", ALLOW),)))),
    Case("unlocked-tenant-deny-loses-to-version-allow", tool_hit(ALLOW, 1), envelopes=(
        Env("tenant", (rule("fs.read", DENY),)), Env("version", (rule("fs.read", ALLOW),)))),
    Case("locked-tenant-deny-beats-version-allow",
         E(DENY, S_LOCKED, "LOCKED_RULE_MATCHED", 0, K_TOOL, 0), envelopes=(
             Env("tenant", (rule("fs.read", DENY, locked=True),)),
             Env("version", (rule("fs.read", ALLOW),)))),
    Case("locked-project-needs-approval-over-version-allow",
         E(NA, S_LOCKED, "LOCKED_RULE_MATCHED", 0, K_TOOL, 0), envelopes=(
             Env("project", (rule("fs.*", NA, locked=True),)),
             Env("version", (rule("fs.read", ALLOW),)))),
    Case("locked-rule-counts-even-when-not-most-specific",
         E(DENY, S_LOCKED, "LOCKED_RULE_MATCHED", 0, K_TOOL, 1), envelopes=(
             Env("tenant", (rule("fs.read", ALLOW), rule("fs.**", DENY, locked=True))),
             Env("version", (rule("fs.read", ALLOW),)))),
    Case("locked-needs-approval-does-not-loosen-a-version-deny", tool_hit(DENY, 1), envelopes=(
        Env("tenant", (rule("fs.read", NA, locked=True),)), Env("version", (rule("fs.read", DENY),)))),
    Case("locked-allow-has-no-special-force", tool_hit(DENY, 1), envelopes=(
        Env("tenant", (rule("fs.read", ALLOW, locked=True),)), Env("version", (rule("fs.read", DENY),)))),
    Case("locked-shadow-rule-has-no-force", baseline(LOW), envelopes=(
        Env("tenant", (rule("fs.read", DENY, locked=True),), mode=SHADOW),),
         shadow=((0, DENY, K_TOOL),)),
    Case("locked-deny-beats-locked-needs-approval", E(DENY, S_LOCKED, "LOCKED_RULE_MATCHED", 1, K_TOOL, 0),
         tool="db.write", envelopes=(Env("tenant", (rule("db.*", NA, locked=True),)),
                                     Env("project", (rule("db.*", DENY, locked=True),)))),
    Case("locked-rule-applies-over-a-more-specific-rule-of-its-envelope",
         E(DENY, S_LOCKED, "LOCKED_RULE_MATCHED", 0, K_TOOL, 0), tool="deploy.staging",
         envelopes=(Env("tenant", (rule("deploy.**", DENY, locked=True), rule("deploy.staging", ALLOW))),)),
    Case("locked-at-version-scope-has-no-special-force", tool_hit(ALLOW, 0), tool="db.write", envelopes=(
        Env("version", (rule("db.write", ALLOW),), priority=200),
        Env("version", (rule("db.*", DENY, locked=True),)))),
    Case("locked-rule-of-an-inactive-envelope-is-ignored", tool_hit(ALLOW, 0), tool="db.write", envelopes=(
        Env("version", (rule("db.write", ALLOW),)), Env("tenant", (rule("db.*", DENY, locked=True),), active=False))),
    Case("locked-rule-whose-condition-fails-does-not-apply", tool_hit(ALLOW, 0), tool="db.write", envelopes=(
        Env("version", (rule("db.write", ALLOW),)),
        Env("tenant", (rule("db.*", DENY, locked=True, min_risk=HIGH),)))),
    Case("higher-priority-envelope-first", tool_hit(ALLOW, 0), envelopes=(
        Env("version", (rule("fs.read", ALLOW),), priority=200),
        Env("version", (rule("fs.read", DENY),), priority=100))),
    Case("equal-priority-strictest-wins", tool_hit(NA, 1), envelopes=(
        Env("version", (rule("fs.read", ALLOW),)), Env("version", (rule("fs.read", NA),)))),
    Case("equal-priority-deny-beats-all", tool_hit(DENY, 0), tool="db.read", envelopes=(
        Env("project", (rule("db.*", DENY),)), Env("project", (rule("db.*", NA),)),
        Env("project", (rule("db.*", ALLOW),)))),
    Case("priority-group-without-opinion-falls-through", tool_hit(ALLOW, 1), tool="db.read", envelopes=(
        Env("project", (rule("web.*", DENY),), priority=200), Env("project", (rule("db.*", ALLOW),)))),
    Case("inactive-envelope-is-ignored", baseline(LOW), envelopes=(
        Env("version", (rule("fs.read", DENY),), active=False),)),
    Case("default-effect-when-nothing-matched", E(DENY, S_ENVELOPE, "DEFAULT_EFFECT", 0, K_DEFAULT),
         envelopes=(Env("version", (rule("other.tool", ALLOW),), default_effect=DENY),)),
    Case("require-approval-at-risk", E(NA, S_ENVELOPE, "RISK_AT_OR_ABOVE_APPROVAL_THRESHOLD", 0,
                                       K_APPROVAL_RISK, risk=MEDIUM),
         tool="fs.write", envelopes=(Env("project", require_approval_at_risk=MEDIUM),)),
    Case("deny-at-risk-before-approval-at-risk", E(DENY, S_ENVELOPE, "RISK_AT_OR_ABOVE_DENY_THRESHOLD", 0,
                                                   K_DENY_RISK, risk=HIGH),
         tool="k8s.deploy", envelopes=(Env("project", require_approval_at_risk=MEDIUM, deny_at_risk=HIGH),)),
    Case("deny-at-risk-by-declared-risk", E(DENY, S_ENVELOPE, "RISK_AT_OR_ABOVE_DENY_THRESHOLD", 0,
                                            K_DENY_RISK, risk=CRITICAL),
         declared=CRITICAL, envelopes=(Env("project", deny_at_risk=HIGH),)),
    Case("deny-at-risk-not-reached", baseline(MEDIUM), tool="fs.write", envelopes=(Env("project", deny_at_risk=HIGH),)),
    Case("deny-at-risk-equal-approval-threshold-denies", E(DENY, S_ENVELOPE, "RISK_AT_OR_ABOVE_DENY_THRESHOLD", 0,
                                                           K_DENY_RISK, risk=HIGH),
         tool="k8s.deploy", envelopes=(Env("project", require_approval_at_risk=HIGH, deny_at_risk=HIGH),)),
    Case("risk-rules-before-the-tier", E(NA, S_ENVELOPE, "RISK_AT_OR_ABOVE_APPROVAL_THRESHOLD", 0,
                                         K_APPROVAL_RISK, risk=LOW),
         envelopes=(Env("project", require_approval_at_risk=LOW, autonomy_tier=0),)),
    Case("tier-before-default-effect", E(NA, S_ENVELOPE, "AUTONOMY_TIER_REQUIRES_APPROVAL", 0, K_TIER, risk=HIGH),
         tool="k8s.deploy", envelopes=(Env("project", autonomy_tier=1, default_effect=ALLOW),)),
    Case("tier-passes-default-effect-decides", E(ALLOW, S_ENVELOPE, "DEFAULT_EFFECT", 0, K_DEFAULT, risk=MEDIUM),
         tool="fs.write", envelopes=(Env("project", autonomy_tier=1, default_effect=ALLOW),)),
    Case("below-risk-thresholds-falls-to-baseline", baseline(LOW),
         envelopes=(Env("project", require_approval_at_risk=MEDIUM, deny_at_risk=HIGH),)),
    Case("tool-rule-before-risk-rules", tool_hit(ALLOW, 0, risk=HIGH), tool="k8s.deploy",
         envelopes=(Env("version", (rule("k8s.deploy", ALLOW),), deny_at_risk=HIGH),)),
    Case("min-risk-condition-not-met", baseline(LOW),
         envelopes=(Env("version", (rule("fs.*", DENY, min_risk=HIGH),)),)),
    Case("min-risk-condition-met-by-sensitive-args", tool_hit(DENY, 0, risk=HIGH),
         args={"path": "/home/app/passwords.txt"},
         envelopes=(Env("version", (rule("fs.*", DENY, min_risk=HIGH),)),)),
    Case("environment-condition-other-env", baseline(LOW),
         envelopes=(Env("version", (rule("fs.read", DENY, environments=("PROD",)),)),)),
    Case("environment-condition-by-type", tool_hit(DENY, 0),
         envelopes=(Env("version", (rule("fs.read", DENY, environments=("DEV",)),)),)),
    Case("arg-pattern-matches", tool_hit(DENY, 0), tool="sql.query", args={"q": "DROP TABLE users"},
         envelopes=(Env("version", (rule("sql.query", DENY, arg_patterns=(r"(?i)drop\s+table",)),)),)),
    Case("arg-pattern-does-not-match", baseline(MEDIUM), tool="sql.query", args={"q": "select 1"},
         envelopes=(Env("version", (rule("sql.query", DENY, arg_patterns=(r"(?i)drop\s+table",)),)),)),
]

GLOB_RULES = (rule("**", ALLOW), rule("db.*", NA), rule("db.write", DENY))
GLOBS = [
    Case("glob-exact-beats-star", tool_hit(DENY, 0, 2), tool="db.write", envelopes=(Env("version", GLOB_RULES),)),
    Case("glob-star-beats-double-star", tool_hit(NA, 0, 1), tool="db.read", envelopes=(Env("version", GLOB_RULES),)),
    Case("glob-star-does-not-cross-dots", tool_hit(ALLOW, 0, 0), tool="db.read.replica",
         envelopes=(Env("version", GLOB_RULES),)),
    Case("glob-double-star-matches-anything", tool_hit(ALLOW, 0, 0, risk=HIGH), tool="payments.send",
         envelopes=(Env("version", GLOB_RULES),)),
    Case("glob-star-over-double-star-same-prefix", tool_hit(ALLOW, 0, 1), tool="db.read",
         envelopes=(Env("version", (rule("db.**", DENY), rule("db.*", ALLOW))),)),
    Case("glob-double-star-crosses-dots", tool_hit(DENY, 0, 0), tool="db.read.replica",
         envelopes=(Env("version", (rule("db.**", DENY), rule("db.*", ALLOW))),)),
    Case("glob-no-match-falls-to-baseline", baseline(LOW), tool="fs.read",
         envelopes=(Env("version", (rule("db.*", DENY), rule("fs.read.*", DENY))),)),
    Case("glob-matches-case-insensitively", tool_hit(DENY, 0, 2), tool="DB.Write",
         envelopes=(Env("version", GLOB_RULES),)),
    Case("glob-rule-names-match-case-insensitively", tool_hit(DENY, 0, 0), tool="db.write",
         envelopes=(Env("version", (rule("DB.Write", DENY), rule("**", ALLOW))),)),
    Case("glob-star-alone-matches-one-segment-only", tool_hit(ALLOW, 0, 1), tool="db.read",
         envelopes=(Env("version", (rule("*", DENY), rule("**", ALLOW))),)),
    Case("glob-star-alone-matches-a-one-segment-name", tool_hit(DENY, 0, 0), tool="shell",
         envelopes=(Env("version", (rule("*", DENY), rule("**", ALLOW))),)),
    Case("glob-more-literal-characters-win", tool_hit(NA, 0, 0), tool="db.write",
         envelopes=(Env("version", (rule("*.write", NA), rule("db.*", ALLOW))),)),
    Case("glob-specificity-tie-goes-to-the-strictest", tool_hit(DENY, 0, 1), tool="ab.cd",
         envelopes=(Env("version", (rule("ab.*", ALLOW), rule("*.cd", DENY))),)),
    Case("glob-full-tie-goes-to-the-first-rule", tool_hit(NA, 0, 0), tool="ab.cd",
         envelopes=(Env("version", (rule("ab.*", NA), rule("*.cd", NA))),)),
    Case("glob-star-in-the-middle", tool_hit(DENY, 0, 0), tool="github.pr.merge",
         envelopes=(Env("version", (rule("github.*.merge", DENY), rule("github.**", ALLOW))),)),
    Case("glob-min-risk-not-reached-next-rule-decides", tool_hit(ALLOW, 0, 1), tool="db.write",
         envelopes=(Env("version", (rule("db.write", DENY, min_risk=HIGH), rule("db.*", ALLOW))),)),
    Case("glob-min-risk-reached-unknown-tool-is-medium", tool_hit(DENY, 0, 0), tool="db.write",
         envelopes=(Env("version", (rule("db.write", DENY, min_risk=MEDIUM), rule("db.*", ALLOW))),)),
]

RISK = [
    Case("classified-read-low", baseline(LOW), tool="fs.read"),
    Case("classified-search-low", baseline(LOW), tool="web.search"),
    Case("classified-write-medium", baseline(MEDIUM), tool="fs.write"),
    Case("classified-shell-medium", baseline(MEDIUM), tool="shell.exec"),
    Case("classified-git-push-medium", baseline(MEDIUM), tool="git.push"),
    Case("unknown-tool-medium", baseline(MEDIUM), tool="frobnicate.widget"),
    Case("classified-deploy-high", baseline(HIGH), tool="k8s.deploy"),
    Case("classified-payment-high", baseline(HIGH), tool="payments.send"),
    Case("classified-send-email-high", baseline(HIGH), tool="email.send"),
    Case("classified-force-push-high", baseline(HIGH), tool="git.force_push"),
    Case("classified-delete-database-high", baseline(HIGH), tool="admin.delete_database"),
    Case("plain-args-keep-low", baseline(LOW), args={"path": "README.md"}),
    Case("args-password-raise-to-high", baseline(HIGH), args={"note": "the admin password is hunter2"}),
    Case("args-dotenv-raise-to-high", baseline(HIGH), args={"path": "/srv/app/.env"}),
    Case("args-production-raise-to-high", baseline(HIGH), args={"target": "production"}),
    Case("args-force-raise-to-high", baseline(HIGH), tool="git.push", args={"flags": "--force"}),
    Case("args-access-token-raise-to-high", baseline(HIGH), args={"access_token": "abc123"}),
    Case("args-max-tokens-is-not-a-secret", baseline(LOW), args={"max_tokens": 4096, "model": "gpt"}),
    Case("args-api-key-raise-to-high", baseline(HIGH), args={"header": "api_key=abc"}),
    Case("args-nested-secret-raise-to-high", baseline(HIGH), args={"opts": {"env": [{"v": "private key"}]}}),
    Case("declared-critical-denied", baseline(CRITICAL), declared=CRITICAL),
    Case("declared-high-on-read", baseline(HIGH), declared=HIGH),
    Case("declared-low-never-lowers-classified", baseline(HIGH), tool="k8s.deploy", declared=LOW),
]

# Baseline for calls no envelope decides, with an envelope present that has no opinion.
QUIET = (Env("version", (rule("other.tool", DENY),)), Env("tenant", (rule("another.*", DENY),)))
BASELINES = [
    Case(f"baseline-{what}-{common_pb2.RiskLevel.Name(r).removeprefix('RISK_LEVEL_').lower()}",
         baseline(r), envelopes=envelopes, declared=r)
    for r in (LOW, MEDIUM, HIGH, CRITICAL) for what, envelopes in (("unmatched", QUIET), ("no-envelopes", ()))
]


def tier_case(tier: int, risk: int) -> Case:
    """Tier 0 always needs approval; 1 at HIGH+; 2 at CRITICAL; 3–5 never (baseline decides);
    outside 0–5 → NEEDS_APPROVAL (fail safe)."""
    name = common_pb2.RiskLevel.Name(risk).removeprefix("RISK_LEVEL_").lower()
    if not 0 <= tier <= 5:
        want = E(NA, S_ENVELOPE, "INVALID_AUTONOMY_TIER", 0, K_TIER, risk=risk)
    elif tier == 0 or (tier == 1 and risk >= HIGH) or (tier == 2 and risk >= CRITICAL):
        want = E(NA, S_ENVELOPE, "AUTONOMY_TIER_REQUIRES_APPROVAL", 0, K_TIER, risk=risk)
    else:
        want = baseline(risk)
    return Case(f"tier-{tier}-at-{name}", want, envelopes=(Env("version", autonomy_tier=tier),),
                declared=risk if risk > LOW else 0)


TIERS = [tier_case(t, r) for t in (0, 1, 2, 3, 4, 5, 9) for r in (LOW, MEDIUM, HIGH, CRITICAL)]


def over(env: int, step: int = S_ENVELOPE) -> Expect:
    return E(DENY, step, "BUDGET_EXCEEDED", env, K_BUDGET)


BUDGETS = [
    Case("budget-per-run-overrun", over(0), envelopes=(Env("version", budgets=policy_pb2.Budgets(per_run_usd=5)),),
         spend=(Spend(4.0, "run-1"),), run_id="run-1", cost=2.0),
    Case("budget-per-run-counts-only-this-run", baseline(LOW),
         envelopes=(Env("version", budgets=policy_pb2.Budgets(per_run_usd=5)),),
         spend=(Spend(4.0, "run-0"),), run_id="run-1", cost=2.0),
    Case("budget-daily-overrun", over(0), envelopes=(Env("project", budgets=policy_pb2.Budgets(daily_usd=5)),),
         spend=(Spend(4.0, "run-0"),), run_id="run-1", cost=2.0),
    Case("budget-monthly-overrun", over(0), envelopes=(Env("tenant", budgets=policy_pb2.Budgets(monthly_usd=5)),),
         spend=(Spend(3.0, "run-0"), Spend(1.5, "")), run_id="run-1", cost=1.0),
    Case("budget-last-month-not-counted", baseline(LOW),
         envelopes=(Env("tenant", budgets=policy_pb2.Budgets(daily_usd=5, monthly_usd=5)),),
         spend=(Spend(100.0, "run-0", months_ago=1),), run_id="run-1", cost=2.0),
    Case("budget-estimated-cost-alone-over-per-run", over(0),
         envelopes=(Env("version", budgets=policy_pb2.Budgets(per_run_usd=1)),), cost=1.5),
    Case("budget-equal-to-limit-is-within", baseline(LOW),
         envelopes=(Env("version", budgets=policy_pb2.Budgets(per_run_usd=1.5)),), cost=1.5),
    Case("budget-within-limits", baseline(LOW),
         envelopes=(Env("version", budgets=policy_pb2.Budgets(per_run_usd=5, daily_usd=5, monthly_usd=5)),),
         spend=(Spend(1.0, "run-1"),), run_id="run-1", cost=1.0),
    Case("budget-of-lower-scope-turns-version-allow-into-deny", over(1, S_BUDGET),
         envelopes=(Env("version", (rule("fs.read", ALLOW),)),
                    Env("tenant", budgets=policy_pb2.Budgets(daily_usd=1))), cost=2.0),
    Case("budget-alone-in-envelope-denies-before-baseline", over(0), tool="payments.send",
         envelopes=(Env("tenant", budgets=policy_pb2.Budgets(per_run_usd=1)),), cost=2.0),
    Case("budget-turns-needs-approval-into-deny", over(1, S_BUDGET), tool="payments.send",
         envelopes=(Env("version", (rule("payments.*", NA),)),
                    Env("tenant", budgets=policy_pb2.Budgets(per_run_usd=1))), cost=2.0),
    Case("shadow-budget-sees-ledger-spend", baseline(LOW),
         envelopes=(Env("version", budgets=policy_pb2.Budgets(daily_usd=5), mode=SHADOW),),
         spend=(Spend(10.0, "run-0"),), shadow=((0, DENY, K_BUDGET),)),
    Case("shadow-budget-not-enforced", baseline(LOW),
         envelopes=(Env("version", budgets=policy_pb2.Budgets(per_run_usd=1), mode=SHADOW),), cost=2.0,
         shadow=((0, DENY, K_BUDGET),)),
]

KILL = [
    Case("instance-paused", E(DENY, S_KILL, "INSTANCE_PAUSED"), state=I_PAUSED),
    Case("instance-quarantined", E(DENY, S_KILL, "INSTANCE_QUARANTINED"), state=I_QUARANTINED),
    Case("instance-provisioning", E(DENY, S_KILL, "INSTANCE_PROVISIONING"), state=I_PROVISIONING),
    Case("instance-retired", E(DENY, S_KILL, "INSTANCE_RETIRED"), state=I_RETIRED),
    Case("instance-readonly-low-risk-allowed", baseline(LOW), state=I_READONLY),
    Case("instance-readonly-medium-risk-denied", E(DENY, S_KILL, "INSTANCE_READONLY", risk=MEDIUM),
         tool="fs.write", state=I_READONLY),
    Case("instance-readonly-declared-medium-denied", E(DENY, S_KILL, "INSTANCE_READONLY", risk=MEDIUM),
         declared=MEDIUM, state=I_READONLY),
    Case("instance-readonly-declared-high-denied", E(DENY, S_KILL, "INSTANCE_READONLY", risk=HIGH),
         declared=HIGH, state=I_READONLY),
    Case("instance-draining-run-start-denied", E(DENY, S_KILL, "INSTANCE_DRAINING"), state=I_DRAINING,
         run_start=True),
    Case("instance-draining-running-work-allowed", baseline(LOW), state=I_DRAINING),
    Case("instance-paused-beats-version-allow", E(DENY, S_KILL, "INSTANCE_PAUSED"), state=I_PAUSED,
         envelopes=(Env("version", (rule("fs.read", ALLOW),)),)),
    Case("tenant-paused", E(DENY, S_KILL, "TENANT_PAUSED"), controls=(("tenant", C_PAUSED),)),
    Case("tenant-quarantined", E(DENY, S_KILL, "TENANT_QUARANTINED"), controls=(("tenant", C_QUARANTINED),)),
    Case("tenant-draining-run-start-denied", E(DENY, S_KILL, "TENANT_DRAINING"),
         controls=(("tenant", C_DRAINING),), run_start=True),
    Case("tenant-draining-running-work-allowed", baseline(LOW), controls=(("tenant", C_DRAINING),)),
    Case("project-paused", E(DENY, S_KILL, "PROJECT_PAUSED"), controls=(("project", C_PAUSED),)),
    Case("project-quarantined", E(DENY, S_KILL, "PROJECT_QUARANTINED"), controls=(("project", C_QUARANTINED),)),
    Case("project-draining-run-start-denied", E(DENY, S_KILL, "PROJECT_DRAINING"),
         controls=(("project", C_DRAINING),), run_start=True),
    Case("project-draining-running-work-allowed", baseline(LOW), controls=(("project", C_DRAINING),)),
    Case("tenant-control-normal-allows", baseline(LOW), controls=(("tenant", C_NORMAL),)),
    Case("active-run-start-allowed", baseline(LOW), run_start=True),
    Case("tenant-control-before-project-control", E(DENY, S_KILL, "TENANT_PAUSED"),
         controls=(("tenant", C_PAUSED), ("project", C_QUARANTINED))),
    Case("kill-switch-beats-version-allow", E(DENY, S_KILL, "PROJECT_PAUSED"), controls=(("project", C_PAUSED),),
         envelopes=(Env("version", (rule("**", ALLOW),)),)),
]

SHADOWS = [
    Case("shadow-deny-reported-not-enforced", baseline(LOW), envelopes=(
        Env("version", (rule("fs.*", DENY),), mode=SHADOW),), shadow=((0, DENY, K_TOOL),)),
    Case("shadow-beside-enforced-decision", tool_hit(ALLOW, 1), envelopes=(
        Env("version", (rule("fs.*", NA),), mode=SHADOW), Env("project", (rule("fs.read", ALLOW),))),
         shadow=((0, NA, K_TOOL),)),
    Case("shadow-reported-beside-a-kill-switch", E(DENY, S_KILL, "INSTANCE_PAUSED"), state=I_PAUSED, envelopes=(
        Env("version", (rule("fs.*", NA),), mode=SHADOW),), shadow=((0, NA, K_TOOL),)),
    Case("shadow-without-opinion", baseline(LOW), envelopes=(
        Env("tenant", (rule("db.*", DENY),), mode=SHADOW),), shadow=((0, NO_DECISION, 0),)),
]

CASES = LAYERING + GLOBS + RISK + BASELINES + TIERS + BUDGETS + KILL + SHADOWS


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


# --- The evaluators: the pure engine and gRPC Check, each result compared whole ------------------

# In the pure engine's world every id and name is a placeholder; the gRPC world's real ids and
# names are replaced by the same placeholders, so that two results compare as whole messages.
PLACEHOLDER_SCOPES = {"tenant": "<tenant>", "project": "<project>", "version": "<version>"}


def engine_result(case: Case) -> decision_pb2.CheckResponse:
    """The case decided by the pure engine (no server, no database), as Check would answer it
    (`convert.result_fields`, the very conversion of the Check path)."""
    envelopes = []
    for i, spec in enumerate(case.envelopes):
        msg = envelope_message(spec, f"<name{i}>", PLACEHOLDER_SCOPES[spec.scope])
        msg.envelope_id, msg.revision = f"<env{i}>", 1
        envelopes.append(convert.envelope_to_engine(msg))
    policy = engine.compile_policy(envelopes, tenant_id="<tenant>", project_id="<project>", version_id="<version>")
    agent = engine.Agent(
        tenant_id="<tenant>", tenant_active=True, project_id="<project>", environment_id="<environment>",
        environment_name="<environment>", environment_type="DEV", template_id="<template>",
        version_id="<version>", instance_id="<instance>",
        instance_state=agents_pb2.InstanceState.Name(case.state).removeprefix("INSTANCE_STATE_"),
        version_state="APPROVED")
    modes = dict.fromkeys(CONTROL_SCOPES, "NORMAL")
    for scope, mode in case.controls:
        modes[scope] = convert.control_mode_name(mode)
    run = sum(e.amount for e in case.spend if case.run_id and e.run_id == case.run_id)
    month = sum(e.amount for e in case.spend if not e.months_ago)
    call = engine.Call(tool=case.tool, arguments=dict(case.args) if case.args is not None else None,
                       declared_risk=engine.Risk(case.declared) if case.declared else None,
                       estimated_cost_usd=case.cost, is_run_start=case.run_start)
    result = engine.decide(policy, agent, call, controls=engine.Controls(modes["tenant"], modes["project"]),
                           spend=engine.Spend(run_usd=run, day_usd=month, month_usd=month))
    return convert.result_fields(result)


def whole(resp: decision_pb2.CheckResponse, world: World | None = None) -> decision_pb2.CheckResponse:
    """The decision of a CheckResponse, compared whole: the fields an evaluator decides (ids of the
    call, times, the policy epoch and the approval created for it cleared), the world's ids and names
    as placeholders."""
    out = decision_pb2.CheckResponse()
    out.CopyFrom(resp)
    for name in ("decision_id", "decide_time", "approval_id", "request_id", "policy_epoch"):
        out.ClearField(name)  # type: ignore[arg-type]
    if world is None:
        return out
    text = text_format.MessageToString(out, as_utf8=True)
    for i, env in enumerate(world.created):
        text = text.replace(env.envelope_id, f"<env{i}>").replace(env.name, f"<name{i}>")
    for scope, placeholder in PLACEHOLDER_SCOPES.items():
        text = text.replace(world.scope_id(scope), placeholder)
    text = text.replace(world.instance.id, "<instance>")
    return text_format.Parse(text, decision_pb2.CheckResponse())


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_vector_engine(case: Case) -> None:
    """Every case through the pure engine, in milliseconds: the expected answer."""
    resp = engine_result(case)
    got = (resp.decision, resp.step, resp.reasons[0].code if resp.reasons else "", resp.rule_kind,
           resp.rule_index if resp.HasField("rule_index") else None,
           int(resp.envelope_id.strip("<env>")) if resp.envelope_id else None)
    want = case.expect
    assert got == (want.decision, want.step, want.code, want.kind, want.index, want.env), resp
    if want.risk:
        assert resp.effective_risk == want.risk, resp
    assert [(int(sr.envelope_id.strip("<env>")), sr.decision, sr.rule_kind) for sr in resp.shadow_results] == list(
        case.shadow), resp


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.bug)] if c.bug else [])
    for c in CASES])
async def test_vector(case: Case, tenant: Any, gov: ArmClient) -> None:
    """Every case through gRPC Check on a real server: the expected answer, and the very result
    the pure engine gives, compared whole (reasons, risk, rule description, shadows included)."""
    world = await World.build(tenant, gov, state=case.state)
    for spec in case.envelopes:
        await world.envelope(spec)
    for scope, mode in case.controls:
        assert (await world.control(scope, mode)).mode == mode
    for entry in case.spend:
        await world.spend(entry)
    resp = await world.check(case.tool, args=case.args, declared=case.declared, cost=case.cost,
                             run_id=case.run_id, run_start=case.run_start)
    assert_decision(resp, case.expect, world)
    got = [(s.envelope_id, s.envelope_revision, s.scope, s.scope_id, s.decision, s.rule_kind)
           for s in resp.shadow_results]
    want = [(world.created[i].envelope_id, 1, world.created[i].scope, world.created[i].scope_id, d, k)
            for i, d, k in case.shadow]
    assert got == want, resp
    for s in resp.shadow_results:
        assert s.reasons, resp
        if s.decision == NO_DECISION:
            assert s.reasons[0].code == "NO_DECISION", resp
    assert whole(resp, world) == whole(engine_result(case)), (whole(resp, world), whole(engine_result(case)))


# --- Flows: the agent step, identity, and changes between Checks --------------------------------


async def test_unknown_agent_is_denied(tenant: Any, gov: ArmClient) -> None:
    for request in (decision_pb2.CheckRequest(instance_id="ins_does_not_exist", tool_name="fs.read"),
                    decision_pb2.CheckRequest(legacy_agent_id="legacy-nobody", tool_name="fs.read")):
        resp = await gov.decisions.Check(request)
        assert_decision(resp, E(DENY, S_AGENT, "UNKNOWN_AGENT", risk=LOW), None)  # type: ignore[arg-type]


async def test_agent_of_another_tenant_is_unknown(registry: Any, system_admin: Any, tenant: Any,
                                                  governance: Any) -> None:
    from tests.conftest import make_tenant
    other = await make_tenant(registry, system_admin)
    other_gov = governance.client(other.admin_key)
    try:
        theirs = await World.build(other, other_gov)
        await theirs.envelope(Env("version", (rule("fs.read", ALLOW),)))
        mine = governance.client(tenant.admin_key)
        try:
            resp = await mine.decisions.Check(decision_pb2.CheckRequest(instance_id=theirs.instance.id,
                                                                        tool_name="fs.read"))
            assert (resp.decision, resp.reasons[0].code) == (DENY, "UNKNOWN_AGENT"), resp
            resp = await mine.decisions.Check(decision_pb2.CheckRequest(legacy_agent_id=theirs.legacy_id,
                                                                        tool_name="fs.read"))
            assert (resp.decision, resp.reasons[0].code) == (DENY, "UNKNOWN_AGENT"), resp
        finally:
            await mine.close()
    finally:
        await other_gov.close()
        await other.admin.close()


@pytest.mark.parametrize("tool,args,declared", [
    ("fs.read", None, 0), ("payments.send", {"amount": 3}, 0), ("db.write", None, 0),
    ("fs.read", None, CRITICAL), ("fs.read", {"path": ".env"}, 0)])
async def test_legacy_agent_id_decides_exactly_like_its_instance(tenant: Any, gov: ArmClient, tool: str,
                                                                 args: dict[str, Any] | None,
                                                                 declared: int) -> None:
    world = await World.build(tenant, gov)
    await world.envelope(Env("version", (rule("db.*", DENY), rule("fs.read", ALLOW))))
    await world.envelope(Env("project", (rule("payments.**", NA),), autonomy_tier=3))
    by_id = await world.check(tool, args=args, declared=declared)
    by_legacy = await world.check(tool, args=args, declared=declared, legacy=True)

    def essence(r: decision_pb2.CheckResponse) -> tuple[Any, ...]:
        return (r.decision, r.step, r.effective_risk, r.scope, r.scope_id, r.envelope_id, r.envelope_revision,
                r.rule_kind, r.rule_index if r.HasField("rule_index") else None, r.rule_description,
                [x.code for x in r.reasons], r.policy_epoch, bool(r.approval_id))

    assert essence(by_legacy) == essence(by_id)
    assert by_legacy.decision_id != by_id.decision_id


async def test_inactive_tenant_is_denied(tenant: Any, gov: ArmClient, system_admin: Any,
                                        governance: Any) -> None:
    """The tenant's own keys are refused outright (TENANT_INACTIVE, see test_auth_propagation);
    a decision asked for the tenant by a system service key is still a DENY."""
    world = await World.build(tenant, gov)
    await world.envelope(Env("version", (rule("**", ALLOW),)))
    await system_admin.tenancy.UpdateTenant(tenancy_pb2.UpdateTenantRequest(id=tenant.tenant.id, active=False))
    service = ArmClient(governance.address, tenant.server.admin_key)
    try:
        for legacy in (False, True):
            request = decision_pb2.CheckRequest(tool_name="fs.read", tool_call_id=f"tc-{secrets.token_hex(4)}")
            if legacy:
                request.legacy_agent_id = world.legacy_id
            else:
                request.instance_id = world.instance.id
            resp = await service.decisions.Check(request, metadata=((ACT_FOR_TENANT_HEADER, world.tenant_id),))
            assert_decision(resp, E(DENY, S_AGENT, "TENANT_INACTIVE", risk=LOW), world)
        await refused_within(lambda: world.check("fs.read"), grpc.StatusCode.UNAUTHENTICATED,
                             "TENANT_INACTIVE")
    finally:
        await service.close()
        await system_admin.tenancy.UpdateTenant(tenancy_pb2.UpdateTenantRequest(id=tenant.tenant.id, active=True))


async def transition_version(world: World, *states: int) -> None:
    for state in states:
        version = (await world.admin.agents.TransitionAgentVersion(agents_pb2.TransitionAgentVersionRequest(
            id=world.agents.version.id, to_state=state, reason="test"))).agent_version
        assert version.state == state


async def test_deprecated_version_still_decides_and_retired_version_is_denied(tenant: Any, gov: ArmClient) -> None:
    world = await World.build(tenant, gov)
    await world.envelope(Env("version", (rule("fs.read", ALLOW),)))
    await transition_version(world, agents_pb2.VERSION_STATE_DEPRECATED)
    # The instance was never resolved by governance yet: the first answer reflects the registry now.
    assert_decision(await world.check("fs.read"), tool_hit(ALLOW, 0), world)

    retired_world = await World.build(tenant, gov)
    await retired_world.envelope(Env("version", (rule("fs.read", ALLOW),)))
    await transition_version(retired_world, agents_pb2.VERSION_STATE_DEPRECATED, agents_pb2.VERSION_STATE_RETIRED)
    assert_decision(await retired_world.check("fs.read"), E(DENY, S_AGENT, "VERSION_RETIRED", risk=LOW),
                    retired_world)
    assert_decision(await retired_world.check("fs.read", legacy=True),
                    E(DENY, S_AGENT, "VERSION_RETIRED", risk=LOW), retired_world)


@pytest.mark.parametrize("scope,mode,code", [
    ("tenant", C_PAUSED, "TENANT_PAUSED"), ("tenant", C_QUARANTINED, "TENANT_QUARANTINED"),
    ("tenant", C_DRAINING, "TENANT_DRAINING"), ("project", C_PAUSED, "PROJECT_PAUSED"),
    ("project", C_QUARANTINED, "PROJECT_QUARANTINED"), ("project", C_DRAINING, "PROJECT_DRAINING")])
async def test_kill_switch_applies_on_next_check_and_normal_restores(tenant: Any, gov: ArmClient, scope: str,
                                                                    mode: int, code: str) -> None:
    world = await World.build(tenant, gov)
    assert_decision(await world.check("fs.read", run_start=True), baseline(LOW), world)
    await world.control(scope, mode)
    assert_decision(await world.check("fs.read", run_start=True), E(DENY, S_KILL, code, risk=LOW), world)
    if mode == C_DRAINING:
        assert_decision(await world.check("fs.read"), baseline(LOW), world)
    await world.control(scope, C_NORMAL)
    assert_decision(await world.check("fs.read", run_start=True), baseline(LOW), world)


async def test_project_kill_switch_spares_other_projects(tenant: Any, gov: ArmClient) -> None:
    world = await World.build(tenant, gov)
    other = await World.build(tenant, gov)
    await world.control("project", C_PAUSED)
    assert_decision(await world.check("fs.read"), E(DENY, S_KILL, "PROJECT_PAUSED"), world)
    assert_decision(await other.check("fs.read"), baseline(LOW), other)


async def test_policy_changes_apply_on_next_check(tenant: Any, gov: ArmClient) -> None:
    world = await World.build(tenant, gov)
    first = await world.check("fs.read")
    assert_decision(first, baseline(LOW), world)
    env = await world.envelope(Env("version", (rule("fs.read", DENY),)))
    denied = await world.check("fs.read")
    assert_decision(denied, tool_hit(DENY, 0), world)
    assert denied.policy_epoch > first.policy_epoch
    deactivated = (await gov.policies.DeactivatePolicyEnvelope(policy_pb2.DeactivatePolicyEnvelopeRequest(
        envelope_id=env.envelope_id, etag=env.etag))).envelope
    assert (deactivated.active, deactivated.revision) == (False, 2)
    again = await world.check("fs.read")
    assert_decision(again, baseline(LOW), world)
    assert again.policy_epoch > denied.policy_epoch


UPDATE_BUG = ("BUG: policy/store.py PolicyStore.apply_mask reads FieldDescriptor.label, which "
              "protobuf 7.36.2 (requirements.lock) no longer has: every UpdatePolicyEnvelope fails "
              "with INTERNAL (AttributeError) instead of storing a new revision")


async def test_updated_envelope_applies_on_next_check_at_its_new_revision(tenant: Any, gov: ArmClient) -> None:
    world = await World.build(tenant, gov)
    env = await world.envelope(Env("version", (rule("fs.read", DENY),)))
    assert_decision(await world.check("fs.read"), tool_hit(DENY, 0), world)
    updated = (await gov.policies.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(envelope_id=env.envelope_id, tool_rules=[rule("fs.read", NA)]),
        update_mask=field_mask_pb2.FieldMask(paths=["tool_rules"]), etag=env.etag))).envelope
    assert updated.revision == 2
    resp = await world.check("fs.read")
    assert (resp.decision, resp.step, resp.envelope_id, resp.envelope_revision) == (
        NA, S_ENVELOPE, env.envelope_id, 2), resp


def _decided(code: str | None, response: decision_pb2.CheckResponse) -> bool:
    """With a code: the deciding reason has it; without: the call was allowed."""
    return response.reasons[0].code == code if code else response.decision == ALLOW


async def eventually(call: Callable[[], Awaitable[decision_pb2.CheckResponse]],
                     done: Callable[[decision_pb2.CheckResponse], bool],
                     timeout_s: float = 10.0) -> decision_pb2.CheckResponse:
    """Bounded polling for changes that reach governance over the registry's change feed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        resp = await call()
        if done(resp) or loop.time() > deadline:
            return resp
        await asyncio.sleep(0.05)


async def test_instance_state_change_reaches_a_warm_cache(tenant: Any, gov: ArmClient) -> None:
    """Governance caches the resolution after the first Check; the registry's change feed must
    drop it so that a later pause (and the reactivation) is seen."""
    world = await World.build(tenant, gov)
    assert_decision(await world.check("fs.read"), baseline(LOW), world)
    assert_decision(await world.check("fs.read", legacy=True), baseline(LOW), world)
    for target, code in ((I_PAUSED, "INSTANCE_PAUSED"), (I_ACTIVE, None)):
        await world.admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
            id=world.instance.id, to_state=target, reason="test"))
        for legacy in (False, True):
            resp = await eventually(functools.partial(world.check, "fs.read", legacy=legacy),
                                    functools.partial(_decided, code))
            if code:
                assert_decision(resp, E(DENY, S_KILL, code), world)
            else:
                assert_decision(resp, baseline(LOW), world)
