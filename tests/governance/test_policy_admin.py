"""Policy administration over gRPC (SPEC §3 "Policy envelopes", §5 "Writes", "Auth"; proto
arm/governance/v1/policy.proto): envelope CRUD with field masks and etags, revisions, change
records in governance's outbox, scope checks against the registry, validation with field paths,
permissions of auditors and agent keys, tenant isolation, GetEffectivePolicy, SimulatePolicy,
operator controls and the policy epoch."""

from __future__ import annotations

import math
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from arm.common.v1 import common_pb2
from arm.governance.v1 import decision_pb2, policy_pb2
from arm.registry.v1 import access_pb2, agents_pb2
from arm_client import ArmClient
from tests.conftest import TenantContext, make_tenant
from tests.helpers import (
    AgentSet,
    approved_version,
    expect_failure,
    governance_change_records,
    operator_with_roles,
)

ALLOW, DENY, NA = policy_pb2.DECISION_ALLOW, policy_pb2.DECISION_DENY, policy_pb2.DECISION_NEEDS_APPROVAL
TENANT, PROJECT, VERSION = (policy_pb2.POLICY_SCOPE_TENANT, policy_pb2.POLICY_SCOPE_PROJECT,
                            policy_pb2.POLICY_SCOPE_VERSION)
ENFORCE, SHADOW = policy_pb2.POLICY_MODE_ENFORCE, policy_pb2.POLICY_MODE_SHADOW
CR = common_pb2.ChangeRecordType
INVALID = grpc.StatusCode.INVALID_ARGUMENT
SIMULATE_BUG = ("BUG: policy/servicer.py SimulatePolicy returns DecisionRecord ORM rows out of db.read(), "
                "whose session is rolled back (arm_common/db.py Database.read), so convert.py:128 `row.agent` "
                "raises DetachedInstanceError: SimulatePolicy fails with INTERNAL whenever the tenant has any "
                "logged decision in the lookback window")
UPDATE_BUG = ("BUG: policy/store.py PolicyStore.apply_mask reads FieldDescriptor.label, which "
              "protobuf 7.36.2 (requirements.lock) no longer has: every UpdatePolicyEnvelope that "
              "passes the etag check fails with INTERNAL (AttributeError)")


# --- World ----------------------------------------------------------------------------------------


@dataclass
class Agent:
    agents: AgentSet
    instance: agents_pb2.AgentInstance
    legacy_id: str


async def active_agent(admin: ArmClient, agents: AgentSet | None = None) -> Agent:
    agents = agents or await approved_version(admin)
    legacy = f"legacy-{secrets.token_hex(5)}"
    inst = (await admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="agent",
        legacy_agent_id=legacy))).agent_instance
    inst = (await admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
        id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))).agent_instance
    return Agent(agents, inst, legacy)


def rule(tool: str, effect: int, **kw: Any) -> policy_pb2.ToolRule:
    return policy_pb2.ToolRule(tool=tool, effect=effect, **kw)


def envelope(scope: int = TENANT, scope_id: str = "", **kw: Any) -> policy_pb2.PolicyEnvelope:
    kw.setdefault("name", f"policy-{secrets.token_hex(4)}")
    kw.setdefault("mode", ENFORCE)
    return policy_pb2.PolicyEnvelope(scope=scope, scope_id=scope_id, **kw)


async def create(gov: ArmClient, env: policy_pb2.PolicyEnvelope, **kw: Any) -> policy_pb2.PolicyEnvelope:
    return (await gov.policies.CreatePolicyEnvelope(
        policy_pb2.CreatePolicyEnvelopeRequest(envelope=env, **kw))).envelope


async def check(gov: ArmClient, instance_id: str, tool: str = "fs.read", **kw: Any) -> decision_pb2.CheckResponse:
    return await gov.decisions.Check(decision_pb2.CheckRequest(instance_id=instance_id, tool_name=tool, **kw))


async def change_records(governance: Any, tenant_id: str) -> list[common_pb2.ChangeRecord]:
    """The tenant's change records governance wrote (delivered or waiting), in insertion order."""
    return await governance_change_records(governance.db, tenant_id)


def policy_records(records: list[common_pb2.ChangeRecord], envelope_id: str) -> list[int]:
    return [r.type for r in records if r.target_type == "policy_envelope" and r.target_id == envelope_id]


@pytest.fixture
async def gov(governance: Any, tenant: TenantContext) -> AsyncIterator[ArmClient]:
    client = governance.client(tenant.admin_key)
    yield client
    await client.close()


@pytest.fixture
async def other(registry: Any, system_admin: Any, governance: Any) -> AsyncIterator[tuple[TenantContext, ArmClient]]:
    """A second tenant and its governance client."""
    ctx = await make_tenant(registry, system_admin)
    client = governance.client(ctx.admin_key)
    yield ctx, client
    await client.close()
    await ctx.admin.close()


# --- Create / Get / List ------------------------------------------------------------------------------


async def test_create_and_get(gov: ArmClient, tenant: TenantContext) -> None:
    agents = await approved_version(tenant.admin)
    want = envelope(VERSION, agents.version.id, description="no db writes", tool_rules=[
        rule("db.write", DENY, locked=False, description="writes are off",
             when=policy_pb2.ToolRuleCondition(min_risk=common_pb2.RISK_LEVEL_MEDIUM,
                                               environments=["PROD"], arg_patterns=["(?i)drop"]))],
        require_approval_at_risk=common_pb2.RISK_LEVEL_HIGH, deny_at_risk=common_pb2.RISK_LEVEL_CRITICAL,
        autonomy_tier=2, budgets=policy_pb2.Budgets(per_run_usd=1.5, monthly_usd=100),
        default_effect=ALLOW)
    created = await create(gov, want, reason="first cut")
    assert created.envelope_id and created.tenant_id == tenant.tenant.id
    assert (created.revision, created.etag, created.priority, created.active) == (1, "1", 100, True)
    assert created.created_by == common_pb2.Actor(type=common_pb2.ACTOR_TYPE_OPERATOR, id=tenant.admin_operator_id)
    assert created.updated_by == created.created_by
    assert created.create_time.seconds > 0 and created.update_time == created.create_time
    for name in ("name", "description", "scope", "scope_id", "mode", "tool_rules", "require_approval_at_risk",
                 "deny_at_risk", "autonomy_tier", "budgets", "default_effect"):
        assert getattr(created, name) == getattr(want, name), name
    assert not created.budgets.HasField("daily_usd")
    got = (await gov.policies.GetPolicyEnvelope(policy_pb2.GetPolicyEnvelopeRequest(
        envelope_id=created.envelope_id))).envelope
    assert got == created
    await expect_failure(gov.policies.GetPolicyEnvelope(policy_pb2.GetPolicyEnvelopeRequest(
        envelope_id="pol_missing")), grpc.StatusCode.NOT_FOUND, "POLICY_ENVELOPE_NOT_FOUND")


async def test_explicit_priority_and_inactive_on_create(gov: ArmClient) -> None:
    created = await create(gov, envelope(priority=0, active=False, mode=SHADOW))
    assert (created.priority, created.active, created.mode) == (0, False, SHADOW)


async def test_create_without_mode_means_enforce(gov: ArmClient) -> None:
    created = await create(gov, policy_pb2.PolicyEnvelope(name="no mode", scope=TENANT))
    assert created.mode == ENFORCE


async def test_tenant_scope_id_defaults_to_callers_tenant(gov: ArmClient, tenant: TenantContext,
                                                          other: tuple[TenantContext, ArmClient]) -> None:
    implicit = await create(gov, envelope(TENANT, ""))
    explicit = await create(gov, envelope(TENANT, tenant.tenant.id))
    assert implicit.scope_id == explicit.scope_id == tenant.tenant.id
    await expect_failure(gov.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
        envelope=envelope(TENANT, other[0].tenant.id))), grpc.StatusCode.NOT_FOUND, "TENANT_NOT_FOUND")


async def test_envelope_name_is_unique_in_tenant(gov: ArmClient) -> None:
    await create(gov, envelope(name="only-once"))
    await expect_failure(gov.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
        envelope=envelope(name="only-once"))), grpc.StatusCode.ALREADY_EXISTS)


async def test_list_filters_and_pagination(gov: ArmClient, tenant: TenantContext) -> None:
    agents = await approved_version(tenant.admin)
    made = {
        "t1": await create(gov, envelope(TENANT)),
        "t2": await create(gov, envelope(TENANT, mode=SHADOW)),
        "p1": await create(gov, envelope(PROJECT, agents.project.id)),
        "v1": await create(gov, envelope(VERSION, agents.version.id, active=False)),
        "v2": await create(gov, envelope(VERSION, agents.version.id, mode=SHADOW)),
    }
    ids = {k: v.envelope_id for k, v in made.items()}

    async def listed(**kw: Any) -> set[str]:
        out: list[str] = []
        token = ""
        while True:
            resp = await gov.policies.ListPolicyEnvelopes(policy_pb2.ListPolicyEnvelopesRequest(
                page_size=2, page_token=token, **kw))
            assert len(resp.envelopes) <= 2
            out += [e.envelope_id for e in resp.envelopes]
            token = resp.next_page_token
            if not token:
                break
        assert len(out) == len(set(out)), "pagination repeated an envelope"
        return set(out)

    assert await listed() == set(ids.values())
    assert await listed(scope=TENANT) == {ids["t1"], ids["t2"]}
    assert await listed(scope=VERSION, scope_id=agents.version.id) == {ids["v1"], ids["v2"]}
    assert await listed(scope_id=agents.project.id) == {ids["p1"]}
    assert await listed(active=False) == {ids["v1"]}
    assert await listed(active=True) == set(ids.values()) - {ids["v1"]}
    assert await listed(mode=SHADOW) == {ids["t2"], ids["v2"]}
    full = await gov.policies.ListPolicyEnvelopes(policy_pb2.ListPolicyEnvelopesRequest())
    assert {e.envelope_id for e in full.envelopes} == set(ids.values()) and not full.next_page_token
    await expect_failure(gov.policies.ListPolicyEnvelopes(policy_pb2.ListPolicyEnvelopesRequest(page_size=-1)),
                         INVALID, "INVALID_FIELDS")


async def test_list_order_is_creation_order(gov: ArmClient, tenant: TenantContext) -> None:
    agents = await approved_version(tenant.admin)
    # Names, scopes and priorities in no particular order: the list keeps creation order.
    v = await create(gov, envelope(VERSION, agents.version.id, name="z-version", priority=1))
    t_low = await create(gov, envelope(TENANT, name="a-tenant-low", priority=10))
    p = await create(gov, envelope(PROJECT, agents.project.id, name="m-project"))
    t_b = await create(gov, envelope(TENANT, name="b-tenant-high", priority=500))
    t_a = await create(gov, envelope(TENANT, name="a-tenant-high", priority=500))
    resp = await gov.policies.ListPolicyEnvelopes(policy_pb2.ListPolicyEnvelopesRequest())
    assert [e.envelope_id for e in resp.envelopes] == [
        v.envelope_id, t_low.envelope_id, p.envelope_id, t_b.envelope_id, t_a.envelope_id]


# --- Update / Deactivate / revisions -------------------------------------------------------------


async def test_update_needs_a_current_etag(gov: ArmClient) -> None:
    env = await create(gov, envelope(tool_rules=[rule("fs.*", DENY)]))
    bad = envelope(envelope_id=env.envelope_id, description="x")
    failed = await expect_failure(gov.policies.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
        envelope=bad, update_mask=field_mask_pb2.FieldMask(paths=["description"]))), INVALID, "INVALID_FIELDS")
    assert "etag" in failed.violations
    failed = await expect_failure(gov.policies.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
        envelope=bad, update_mask=field_mask_pb2.FieldMask(paths=["description"]), etag="7")),
        grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    assert failed.metadata.get("current_etag") == env.etag
    # Deactivate takes an optional etag; a stale one is refused the same way.
    await expect_failure(gov.policies.DeactivatePolicyEnvelope(policy_pb2.DeactivatePolicyEnvelopeRequest(
        envelope_id=env.envelope_id, etag="9")), grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    got = (await gov.policies.GetPolicyEnvelope(policy_pb2.GetPolicyEnvelopeRequest(
        envelope_id=env.envelope_id))).envelope
    assert got == env, "refused writes changed nothing"
    await expect_failure(gov.policies.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
        envelope=envelope(envelope_id="pol_missing"), etag="1")), grpc.StatusCode.NOT_FOUND,
        "POLICY_ENVELOPE_NOT_FOUND")


async def test_update_with_field_mask_and_stale_etag(gov: ArmClient) -> None:
    env = await create(gov, envelope(description="before", tool_rules=[rule("fs.*", DENY)], priority=7))
    updated = (await gov.policies.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(envelope_id=env.envelope_id, description="after", priority=9),
        update_mask=field_mask_pb2.FieldMask(paths=["description"]), etag=env.etag, reason="wording"))).envelope
    assert (updated.revision, updated.etag, updated.description) == (2, "2", "after")
    assert (updated.priority, list(updated.tool_rules), updated.name) == (7, list(env.tool_rules), env.name)
    assert updated.create_time == env.create_time
    # The old etag is now stale.
    await expect_failure(gov.policies.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(envelope_id=env.envelope_id, description="lost"),
        update_mask=field_mask_pb2.FieldMask(paths=["description"]), etag=env.etag)),
        grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    # No mask: every mutable field is replaced.
    replaced = (await gov.policies.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
        envelope=envelope(envelope_id=env.envelope_id, name="renamed"), etag=updated.etag))).envelope
    assert (replaced.revision, replaced.name, list(replaced.tool_rules), replaced.priority) == (3, "renamed", [], 100)
    failed = await expect_failure(gov.policies.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(envelope_id=env.envelope_id),
        update_mask=field_mask_pb2.FieldMask(paths=["revision"]), etag=replaced.etag)), INVALID)
    assert "update_mask" in failed.violations


async def test_every_change_is_a_revision_and_old_revisions_stay_readable(gov: ArmClient) -> None:
    env = await create(gov, envelope(description="r1", tool_rules=[rule("fs.*", DENY)]), reason="create")
    r2 = (await gov.policies.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(envelope_id=env.envelope_id, description="r2"),
        update_mask=field_mask_pb2.FieldMask(paths=["description"]), etag=env.etag, reason="second"))).envelope
    r3 = (await gov.policies.DeactivatePolicyEnvelope(policy_pb2.DeactivatePolicyEnvelopeRequest(
        envelope_id=env.envelope_id, etag=r2.etag, reason="third"))).envelope
    assert [env.revision, r2.revision, r3.revision] == [1, 2, 3]
    for n, description, active, reason in ((1, "r1", True, "create"), (2, "r2", True, "second"),
                                           (3, "r2", False, "third")):
        rev = (await gov.policies.GetPolicyEnvelopeRevision(policy_pb2.GetPolicyEnvelopeRevisionRequest(
            envelope_id=env.envelope_id, revision=n))).envelope_revision
        assert (rev.revision, rev.envelope.revision, rev.envelope.description, rev.envelope.active, rev.reason) == (
            n, n, description, active, reason)
    revs = await gov.policies.ListPolicyEnvelopeRevisions(policy_pb2.ListPolicyEnvelopeRevisionsRequest(
        envelope_id=env.envelope_id))
    assert [r.revision for r in revs.envelope_revisions] == [3, 2, 1]


async def test_deactivate_is_a_new_revision_and_history_is_kept(gov: ArmClient, tenant: TenantContext) -> None:
    env = await create(gov, envelope(description="v1", tool_rules=[rule("fs.*", DENY)]), reason="create")
    off = (await gov.policies.DeactivatePolicyEnvelope(policy_pb2.DeactivatePolicyEnvelopeRequest(
        envelope_id=env.envelope_id, etag=env.etag, reason="retire it"))).envelope
    assert (off.revision, off.etag, off.active, off.description) == (2, "2", False, "v1")
    assert list(off.tool_rules) == list(env.tool_rules) and off.create_time == env.create_time
    got = (await gov.policies.GetPolicyEnvelope(policy_pb2.GetPolicyEnvelopeRequest(
        envelope_id=env.envelope_id))).envelope
    assert got == off
    first = (await gov.policies.GetPolicyEnvelopeRevision(policy_pb2.GetPolicyEnvelopeRevisionRequest(
        envelope_id=env.envelope_id, revision=1))).envelope_revision
    assert (first.envelope_id, first.revision, first.reason) == (env.envelope_id, 1, "create")
    assert first.envelope == env
    assert first.created_by == common_pb2.Actor(type=common_pb2.ACTOR_TYPE_OPERATOR, id=tenant.admin_operator_id)
    second = (await gov.policies.GetPolicyEnvelopeRevision(policy_pb2.GetPolicyEnvelopeRevisionRequest(
        envelope_id=env.envelope_id, revision=2))).envelope_revision
    assert (second.envelope.active, second.reason) == (False, "retire it")
    revs = await gov.policies.ListPolicyEnvelopeRevisions(policy_pb2.ListPolicyEnvelopeRevisionsRequest(
        envelope_id=env.envelope_id))
    assert [r.revision for r in revs.envelope_revisions] == [2, 1] and not revs.next_page_token
    page1 = await gov.policies.ListPolicyEnvelopeRevisions(policy_pb2.ListPolicyEnvelopeRevisionsRequest(
        envelope_id=env.envelope_id, page_size=1))
    page2 = await gov.policies.ListPolicyEnvelopeRevisions(policy_pb2.ListPolicyEnvelopeRevisionsRequest(
        envelope_id=env.envelope_id, page_size=1, page_token=page1.next_page_token))
    assert [r.revision for r in page1.envelope_revisions] == [2] and page1.next_page_token
    assert [r.revision for r in page2.envelope_revisions] == [1] and not page2.next_page_token
    await expect_failure(gov.policies.GetPolicyEnvelopeRevision(policy_pb2.GetPolicyEnvelopeRevisionRequest(
        envelope_id=env.envelope_id, revision=3)), grpc.StatusCode.NOT_FOUND, "POLICY_REVISION_NOT_FOUND")
    failed = await expect_failure(gov.policies.GetPolicyEnvelopeRevision(policy_pb2.GetPolicyEnvelopeRevisionRequest(
        envelope_id=env.envelope_id, revision=0)), INVALID, "INVALID_FIELDS")
    assert "revision" in failed.violations
    await expect_failure(gov.policies.ListPolicyEnvelopeRevisions(policy_pb2.ListPolicyEnvelopeRevisionsRequest(
        envelope_id="pol_missing")), grpc.StatusCode.NOT_FOUND, "POLICY_ENVELOPE_NOT_FOUND")
    listed = await gov.policies.ListPolicyEnvelopes(policy_pb2.ListPolicyEnvelopesRequest(active=False))
    assert [e.envelope_id for e in listed.envelopes] == [env.envelope_id]


async def test_deactivated_envelope_stops_deciding(gov: ArmClient, tenant: TenantContext) -> None:
    agent = await active_agent(tenant.admin)
    env = await create(gov, envelope(VERSION, agent.agents.version.id, tool_rules=[rule("fs.read", DENY)]))
    assert (await check(gov, agent.instance.id)).decision == DENY
    await gov.policies.DeactivatePolicyEnvelope(policy_pb2.DeactivatePolicyEnvelopeRequest(envelope_id=env.envelope_id))
    resp = await check(gov, agent.instance.id)
    assert (resp.decision, resp.step, resp.envelope_id) == (ALLOW, decision_pb2.DECISION_STEP_BASELINE, "")


# --- Change records -----------------------------------------------------------------------------------


async def test_create_and_deactivate_write_change_records(governance: Any, gov: ArmClient,
                                                          tenant: TenantContext) -> None:
    env = await create(gov, envelope(), reason="because")
    await gov.policies.DeactivatePolicyEnvelope(policy_pb2.DeactivatePolicyEnvelopeRequest(
        envelope_id=env.envelope_id, reason="done"))
    records = [r for r in await change_records(governance, tenant.tenant.id) if r.target_id == env.envelope_id]
    assert [r.type for r in records] == [CR.CHANGE_RECORD_TYPE_POLICY_CREATED, CR.CHANGE_RECORD_TYPE_POLICY_UPDATED]
    created, deactivated = records
    for r in records:
        assert r.tenant_id == tenant.tenant.id and r.record_id and r.target_type == "policy_envelope"
        assert r.actor == common_pb2.Actor(type=common_pb2.ACTOR_TYPE_OPERATOR, id=tenant.admin_operator_id)
        assert r.source == "governance" and r.occur_time.seconds > 0
    assert created.reason == "because" and created.after["revision"] == 1
    assert created.after["scope"] == TENANT and created.after["scope_id"] == tenant.tenant.id
    assert deactivated.reason == "done"
    assert deactivated.after["active"] is False and deactivated.after["revision"] == 2


async def test_deactivate_records_the_real_before_state(governance: Any, gov: ArmClient,
                                                        tenant: TenantContext) -> None:
    env = await create(gov, envelope(active=False))
    await gov.policies.DeactivatePolicyEnvelope(policy_pb2.DeactivatePolicyEnvelopeRequest(envelope_id=env.envelope_id))
    records = [r for r in await change_records(governance, tenant.tenant.id)
               if r.target_id == env.envelope_id and r.type == CR.CHANGE_RECORD_TYPE_POLICY_UPDATED]
    assert all(r.before["active"] is False for r in records), [dict(r.before) for r in records]


async def test_update_writes_policy_updated_and_scope_change_policy_attached(
        governance: Any, gov: ArmClient, tenant: TenantContext) -> None:
    agents = await approved_version(tenant.admin)
    env = await create(gov, envelope(TENANT))
    r2 = (await gov.policies.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(envelope_id=env.envelope_id, description="d"),
        update_mask=field_mask_pb2.FieldMask(paths=["description"]), etag=env.etag, reason="edit"))).envelope
    r3 = (await gov.policies.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(envelope_id=env.envelope_id, scope=PROJECT, scope_id=agents.project.id),
        update_mask=field_mask_pb2.FieldMask(paths=["scope", "scope_id"]), etag=r2.etag, reason="move"))).envelope
    assert (r3.scope, r3.scope_id, r3.revision) == (PROJECT, agents.project.id, 3)
    records = [r for r in await change_records(governance, tenant.tenant.id) if r.target_id == env.envelope_id]
    assert [r.type for r in records] == [CR.CHANGE_RECORD_TYPE_POLICY_CREATED, CR.CHANGE_RECORD_TYPE_POLICY_UPDATED,
                                         CR.CHANGE_RECORD_TYPE_POLICY_ATTACHED]
    attached = records[2]
    assert attached.reason == "move"
    assert (attached.before["scope"], attached.before["scope_id"]) == (TENANT, tenant.tenant.id)
    assert (attached.after["scope"], attached.after["scope_id"]) == (PROJECT, agents.project.id)


# --- Scope ids ---------------------------------------------------------------------------------------


async def test_scope_ids_of_other_tenants_or_missing_are_not_found(
        gov: ArmClient, tenant: TenantContext, other: tuple[TenantContext, ArmClient]) -> None:
    theirs = await approved_version(other[0].admin)
    for scope, scope_id, reason in (
            (PROJECT, theirs.project.id, "PROJECT_NOT_FOUND"), (VERSION, theirs.version.id, "AGENT_VERSION_NOT_FOUND"),
            (PROJECT, "prj_missing", "PROJECT_NOT_FOUND"), (VERSION, "ver_missing", "AGENT_VERSION_NOT_FOUND")):
        await expect_failure(gov.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
            envelope=envelope(scope, scope_id))), grpc.StatusCode.NOT_FOUND, reason)
    await expect_failure(gov.policies.SetOperatorControl(policy_pb2.SetOperatorControlRequest(
        scope=policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT, scope_id=theirs.project.id,
        mode=policy_pb2.OPERATOR_CONTROL_MODE_PAUSED)), grpc.StatusCode.NOT_FOUND, "PROJECT_NOT_FOUND")
    resp = await gov.policies.ListPolicyEnvelopes(policy_pb2.ListPolicyEnvelopesRequest())
    assert not resp.envelopes, "nothing was created"
    # Moving an envelope to another tenant's project is refused too (before or after the update bug).
    env = await create(gov, envelope(TENANT))
    try:
        await gov.policies.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
            envelope=policy_pb2.PolicyEnvelope(envelope_id=env.envelope_id, scope=PROJECT, scope_id=theirs.project.id),
            update_mask=field_mask_pb2.FieldMask(paths=["scope", "scope_id"]), etag=env.etag))
    except grpc.aio.AioRpcError as exc:
        assert exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL), exc
    else:
        raise AssertionError("an envelope was attached to another tenant's project")
    got = (await gov.policies.GetPolicyEnvelope(policy_pb2.GetPolicyEnvelopeRequest(
        envelope_id=env.envelope_id))).envelope
    assert (got.scope, got.scope_id, got.revision) == (TENANT, tenant.tenant.id, 1)


# --- Validation ------------------------------------------------------------------------------------


def _set(path: str, value: Any) -> Any:
    def apply(env: policy_pb2.PolicyEnvelope) -> None:
        target: Any = env
        *parents, last = path.split(".")
        for part in parents:
            if part.endswith("]"):
                name, index = part[:-1].split("[")
                target = getattr(target, name)[int(index)]
            else:
                target = getattr(target, part)
        if isinstance(value, list):
            getattr(target, last)[:] = value
        else:
            setattr(target, last, value)
    return apply


def _project_without_id(env: policy_pb2.PolicyEnvelope) -> None:
    env.scope, env.scope_id = PROJECT, ""


INVALID_ENVELOPES = [
    ("name", _set("name", ""), "envelope.name"),
    ("blank-name", _set("name", "   "), "envelope.name"),
    ("mode-unknown", _set("mode", 9), "envelope.mode"),
    ("scope-unspecified", _set("scope", 0), "envelope.scope"),
    ("scope-unknown", _set("scope", 7), "envelope.scope"),
    ("project-without-id", _project_without_id, "envelope.scope_id"),
    ("effect-unspecified", _set("tool_rules[0].effect", 0), "envelope.tool_rules[0].effect"),
    ("effect-unknown", _set("tool_rules[1].effect", 42), "envelope.tool_rules[1].effect"),
    ("tool-empty", _set("tool_rules[1].tool", ""), "envelope.tool_rules[1].tool"),
    ("tool-bad-chars", _set("tool_rules[0].tool", "fs read;"), "envelope.tool_rules[0].tool"),
    ("arg-pattern-invalid-regex", _set("tool_rules[0].when.arg_patterns", ["ok", "(unclosed"]),
     "envelope.tool_rules[0].when.arg_patterns[1]"),
    ("min-risk-unknown", _set("tool_rules[0].when.min_risk", 8), "envelope.tool_rules[0].when.min_risk"),
    ("negative-per-run", lambda e: e.budgets.MergeFrom(policy_pb2.Budgets(per_run_usd=-1)), "envelope.budgets.per_run_usd"),
    ("nan-daily", lambda e: e.budgets.MergeFrom(policy_pb2.Budgets(daily_usd=math.nan)), "envelope.budgets.daily_usd"),
    ("infinite-monthly", lambda e: e.budgets.MergeFrom(policy_pb2.Budgets(monthly_usd=math.inf)),
     "envelope.budgets.monthly_usd"),
    ("deny-at-risk-unknown", _set("deny_at_risk", 9), "envelope.deny_at_risk"),
    ("approval-at-risk-unknown", _set("require_approval_at_risk", 5), "envelope.require_approval_at_risk"),
    ("default-effect-unknown", _set("default_effect", 4), "envelope.default_effect"),
    ("negative-priority", _set("priority", -1), "envelope.priority"),
]


@pytest.mark.parametrize("mutate,path", [(m, p) for _, m, p in INVALID_ENVELOPES],
                         ids=[i for i, _, _ in INVALID_ENVELOPES])
async def test_invalid_envelope_is_rejected_with_field_path(gov: ArmClient, mutate: Any, path: str) -> None:
    env = envelope(tool_rules=[rule("fs.*", DENY), rule("db.write", NA)])
    mutate(env)
    failed = await expect_failure(gov.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
        envelope=env)), INVALID, "INVALID_FIELDS")
    assert path in failed.violations, failed.violations
    resp = await gov.policies.ListPolicyEnvelopes(policy_pb2.ListPolicyEnvelopesRequest())
    assert not resp.envelopes, "nothing was created"
    # SimulatePolicy validates its candidate the same way, under `candidate.`.
    failed = await expect_failure(gov.policies.SimulatePolicy(policy_pb2.SimulatePolicyRequest(candidate=env)),
                                  INVALID, "INVALID_FIELDS")
    assert "candidate." + path.removeprefix("envelope.") in failed.violations, failed.violations


async def test_invalid_update_is_rejected_with_field_path(gov: ArmClient) -> None:
    env = await create(gov, envelope(tool_rules=[rule("fs.*", DENY)]))
    bad = policy_pb2.PolicyEnvelope(envelope_id=env.envelope_id, tool_rules=[rule("fs.*", 0)])
    try:
        failed = await expect_failure(gov.policies.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
            envelope=bad, update_mask=field_mask_pb2.FieldMask(paths=["tool_rules"]), etag=env.etag)),
            INVALID, "INVALID_FIELDS")
        assert "envelope.tool_rules[0].effect" in failed.violations
    finally:
        got = (await gov.policies.GetPolicyEnvelope(policy_pb2.GetPolicyEnvelopeRequest(
            envelope_id=env.envelope_id))).envelope
        assert got == env, "a refused update changed nothing"


# --- Permissions and isolation ----------------------------------------------------------------------


async def test_auditor_reads_but_cannot_write(governance: Any, gov: ArmClient, tenant: TenantContext) -> None:
    agent = await active_agent(tenant.admin)
    env = await create(gov, envelope(VERSION, agent.agents.version.id, tool_rules=[rule("fs.*", DENY)]))
    _, auditor = await operator_with_roles(tenant.admin, governance.address, "auditor")
    try:
        p = auditor.policies
        assert (await p.GetPolicyEnvelope(policy_pb2.GetPolicyEnvelopeRequest(envelope_id=env.envelope_id))).envelope == env
        assert [e.envelope_id for e in (await p.ListPolicyEnvelopes(policy_pb2.ListPolicyEnvelopesRequest())).envelopes] == [
            env.envelope_id]
        await p.GetPolicyEnvelopeRevision(policy_pb2.GetPolicyEnvelopeRevisionRequest(envelope_id=env.envelope_id, revision=1))
        await p.ListPolicyEnvelopeRevisions(policy_pb2.ListPolicyEnvelopeRevisionsRequest(envelope_id=env.envelope_id))
        effective = await p.GetEffectivePolicy(policy_pb2.GetEffectivePolicyRequest(instance_id=agent.instance.id))
        assert [r.envelope_id for r in effective.rules] == [env.envelope_id]
        await p.GetOperatorControl(policy_pb2.GetOperatorControlRequest(scope=policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT))
        await p.ListOperatorControls(policy_pb2.ListOperatorControlsRequest())
        await p.SimulatePolicy(policy_pb2.SimulatePolicyRequest(candidate=envelope()))
        denied = grpc.StatusCode.PERMISSION_DENIED
        for call in (
                p.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(envelope=envelope())),
                p.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
                    envelope=policy_pb2.PolicyEnvelope(envelope_id=env.envelope_id, description="x"),
                    update_mask=field_mask_pb2.FieldMask(paths=["description"]), etag=env.etag)),
                p.DeactivatePolicyEnvelope(policy_pb2.DeactivatePolicyEnvelopeRequest(envelope_id=env.envelope_id)),
                p.SetOperatorControl(policy_pb2.SetOperatorControlRequest(
                    scope=policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT, mode=policy_pb2.OPERATOR_CONTROL_MODE_PAUSED)),
                auditor.decisions.Check(decision_pb2.CheckRequest(instance_id=agent.instance.id, tool_name="fs.read")),
        ):
            failed = await expect_failure(call, denied, "MISSING_PERMISSION")
            assert failed.metadata.get("permission") in ("policies:write", "decisions:check")
    finally:
        await auditor.close()
    got = (await gov.policies.GetPolicyEnvelope(policy_pb2.GetPolicyEnvelopeRequest(envelope_id=env.envelope_id))).envelope
    assert got == env
    control = await gov.policies.GetOperatorControl(policy_pb2.GetOperatorControlRequest(
        scope=policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT))
    assert control.control.mode == policy_pb2.OPERATOR_CONTROL_MODE_NORMAL


async def agent_key(admin: ArmClient, instance_id: str) -> str:
    return (await admin.access.CreateApiKey(access_pb2.CreateApiKeyRequest(instance_id=instance_id))).secret


async def test_agent_key_checks_only_its_own_instance_and_cannot_write(
        governance: Any, gov: ArmClient, tenant: TenantContext) -> None:
    mine = await active_agent(tenant.admin)
    theirs = await active_agent(tenant.admin, mine.agents)
    # The other instance is known to governance already (an operator asked about it).
    assert (await check(gov, theirs.instance.id)).decision == ALLOW
    client = governance.client(await agent_key(tenant.admin, mine.instance.id))
    try:
        own = await check(client, mine.instance.id)
        assert (own.decision, own.step) == (ALLOW, decision_pb2.DECISION_STEP_BASELINE)
        by_legacy = await client.decisions.Check(decision_pb2.CheckRequest(
            legacy_agent_id=mine.legacy_id, tool_name="fs.read"))
        assert by_legacy.decision == ALLOW
        await expect_failure(check(client, theirs.instance.id), grpc.StatusCode.PERMISSION_DENIED, "NOT_YOUR_AGENT")
        await expect_failure(client.decisions.ReportSpend(decision_pb2.ReportSpendRequest(entry=decision_pb2.SpendEntry(
            instance_id=theirs.instance.id, amount_usd=1, idempotency_key="k1"))),
            grpc.StatusCode.PERMISSION_DENIED, "NOT_YOUR_AGENT")
        for call in (
                client.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(envelope=envelope())),
                client.policies.SetOperatorControl(policy_pb2.SetOperatorControlRequest(
                    scope=policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT, mode=policy_pb2.OPERATOR_CONTROL_MODE_PAUSED)),
                client.policies.ListPolicyEnvelopes(policy_pb2.ListPolicyEnvelopesRequest()),
        ):
            await expect_failure(call, grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION")
    finally:
        await client.close()
    assert not (await gov.policies.ListPolicyEnvelopes(policy_pb2.ListPolicyEnvelopesRequest())).envelopes


async def test_agent_key_on_a_never_resolved_instance_is_not_your_agent(governance: Any, tenant: TenantContext) -> None:
    mine = await active_agent(tenant.admin)
    theirs = await active_agent(tenant.admin, mine.agents)
    client = governance.client(await agent_key(tenant.admin, mine.instance.id))
    try:
        await expect_failure(check(client, theirs.instance.id), grpc.StatusCode.PERMISSION_DENIED, "NOT_YOUR_AGENT")
        await expect_failure(client.decisions.Check(decision_pb2.CheckRequest(
            legacy_agent_id=theirs.legacy_id, tool_name="fs.read")), grpc.StatusCode.PERMISSION_DENIED, "NOT_YOUR_AGENT")
    finally:
        await client.close()


async def test_tenant_isolation(gov: ArmClient, tenant: TenantContext, other: tuple[TenantContext, ArmClient]) -> None:
    agent = await active_agent(tenant.admin)
    env = await create(gov, envelope(VERSION, agent.agents.version.id, tool_rules=[rule("fs.*", DENY)]))
    _, theirs = other
    nf = grpc.StatusCode.NOT_FOUND
    await expect_failure(theirs.policies.GetPolicyEnvelope(policy_pb2.GetPolicyEnvelopeRequest(
        envelope_id=env.envelope_id)), nf, "POLICY_ENVELOPE_NOT_FOUND")
    await expect_failure(theirs.policies.GetPolicyEnvelopeRevision(policy_pb2.GetPolicyEnvelopeRevisionRequest(
        envelope_id=env.envelope_id, revision=1)), nf)
    await expect_failure(theirs.policies.ListPolicyEnvelopeRevisions(policy_pb2.ListPolicyEnvelopeRevisionsRequest(
        envelope_id=env.envelope_id)), nf, "POLICY_ENVELOPE_NOT_FOUND")
    await expect_failure(theirs.policies.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(envelope_id=env.envelope_id, description="x"),
        update_mask=field_mask_pb2.FieldMask(paths=["description"]), etag=env.etag)), nf, "POLICY_ENVELOPE_NOT_FOUND")
    await expect_failure(theirs.policies.DeactivatePolicyEnvelope(policy_pb2.DeactivatePolicyEnvelopeRequest(
        envelope_id=env.envelope_id)), nf, "POLICY_ENVELOPE_NOT_FOUND")
    await expect_failure(theirs.policies.GetEffectivePolicy(policy_pb2.GetEffectivePolicyRequest(
        instance_id=agent.instance.id)), nf, "AGENT_NOT_FOUND")
    assert not (await theirs.policies.ListPolicyEnvelopes(policy_pb2.ListPolicyEnvelopesRequest())).envelopes
    resp = await check(theirs, agent.instance.id)
    assert (resp.decision, resp.reasons[0].code) == (DENY, "UNKNOWN_AGENT")
    got = (await gov.policies.GetPolicyEnvelope(policy_pb2.GetPolicyEnvelopeRequest(envelope_id=env.envelope_id))).envelope
    assert got == env and (await check(gov, agent.instance.id)).decision == DENY


# --- GetEffectivePolicy ---------------------------------------------------------------------------------


async def test_effective_policy_is_merged_in_evaluation_order(gov: ArmClient, tenant: TenantContext) -> None:
    agent = await active_agent(tenant.admin)
    elsewhere = await approved_version(tenant.admin)
    v, p = agent.agents.version.id, agent.agents.project.id
    t_env = await create(gov, envelope(TENANT, tool_rules=[rule("fs.read", ALLOW), rule("deploy.**", NA, locked=True)],
                                       default_effect=ALLOW))
    p_env = await create(gov, envelope(PROJECT, p, tool_rules=[rule("db.*", DENY, locked=True)],
                                       require_approval_at_risk=common_pb2.RISK_LEVEL_HIGH))
    v_low = await create(gov, envelope(VERSION, v, priority=50, deny_at_risk=common_pb2.RISK_LEVEL_CRITICAL,
                                       autonomy_tier=3))
    v_high = await create(gov, envelope(VERSION, v, priority=200, tool_rules=[rule("fs.*", DENY), rule("git.*", ALLOW)],
                                        budgets=policy_pb2.Budgets(daily_usd=10)))
    shadow = await create(gov, envelope(TENANT, mode=SHADOW, tool_rules=[rule("**", DENY)]))
    await create(gov, envelope(VERSION, v, active=False, tool_rules=[rule("x.*", DENY)]))
    await create(gov, envelope(VERSION, elsewhere.version.id, tool_rules=[rule("y.*", DENY)]))
    await create(gov, envelope(PROJECT, elsewhere.project.id, tool_rules=[rule("z.*", DENY)]))

    resp = await gov.policies.GetEffectivePolicy(policy_pb2.GetEffectivePolicyRequest(instance_id=agent.instance.id))
    assert (resp.instance_id, resp.legacy_agent_id, resp.version_id, resp.project_id, resp.environment_id) == (
        agent.instance.id, agent.legacy_id, v, p, agent.agents.environment.id)
    K = policy_pb2
    got = [(r.envelope_id, r.scope, r.scope_id, r.envelope_revision, r.priority, r.mode, r.kind,
            r.rule_index if r.HasField("rule_index") else None, r.WhichOneof("rule")) for r in resp.rules]
    tid = tenant.tenant.id
    assert got == [
        # Locked TENANT/PROJECT rules first (tenant, then project).
        (t_env.envelope_id, TENANT, tid, 1, 100, ENFORCE, K.RULE_KIND_TOOL_RULE, 1, "tool_rule"),
        (p_env.envelope_id, PROJECT, p, 1, 100, ENFORCE, K.RULE_KIND_TOOL_RULE, 0, "tool_rule"),
        # VERSION, by priority.
        (v_high.envelope_id, VERSION, v, 1, 200, ENFORCE, K.RULE_KIND_TOOL_RULE, 0, "tool_rule"),
        (v_high.envelope_id, VERSION, v, 1, 200, ENFORCE, K.RULE_KIND_TOOL_RULE, 1, "tool_rule"),
        (v_high.envelope_id, VERSION, v, 1, 200, ENFORCE, K.RULE_KIND_BUDGET, None, "budgets"),
        (v_low.envelope_id, VERSION, v, 1, 50, ENFORCE, K.RULE_KIND_DENY_AT_RISK, None, "risk_threshold"),
        (v_low.envelope_id, VERSION, v, 1, 50, ENFORCE, K.RULE_KIND_AUTONOMY_TIER, None, "autonomy_tier"),
        # PROJECT (its locked rule is listed once, above).
        (p_env.envelope_id, PROJECT, p, 1, 100, ENFORCE, K.RULE_KIND_REQUIRE_APPROVAL_AT_RISK, None, "risk_threshold"),
        # TENANT.
        (t_env.envelope_id, TENANT, tid, 1, 100, ENFORCE, K.RULE_KIND_TOOL_RULE, 0, "tool_rule"),
        (t_env.envelope_id, TENANT, tid, 1, 100, ENFORCE, K.RULE_KIND_DEFAULT_EFFECT, None, "default_effect"),
        # SHADOW envelopes are listed, after the enforced ones.
        (shadow.envelope_id, TENANT, tid, 1, 100, SHADOW, K.RULE_KIND_TOOL_RULE, 0, "tool_rule"),
    ]
    rules = resp.rules
    assert rules[0].tool_rule.tool == "deploy.**" and rules[0].tool_rule.locked
    assert rules[2].tool_rule == rule("fs.*", DENY, when=policy_pb2.ToolRuleCondition())
    assert rules[4].budgets == policy_pb2.Budgets(daily_usd=10)
    assert rules[5].risk_threshold == common_pb2.RISK_LEVEL_CRITICAL and rules[6].autonomy_tier == 3
    assert rules[9].default_effect == ALLOW
    assert rules[0].envelope_name == t_env.name
    by_legacy = await gov.policies.GetEffectivePolicy(policy_pb2.GetEffectivePolicyRequest(legacy_agent_id=agent.legacy_id))
    assert list(by_legacy.rules) == list(resp.rules) and by_legacy.instance_id == agent.instance.id
    epoch = (await check(gov, agent.instance.id)).policy_epoch
    assert resp.policy_epoch == epoch
    await expect_failure(gov.policies.GetEffectivePolicy(policy_pb2.GetEffectivePolicyRequest(instance_id="ins_missing")),
                         grpc.StatusCode.NOT_FOUND, "AGENT_NOT_FOUND")
    await expect_failure(gov.policies.GetEffectivePolicy(policy_pb2.GetEffectivePolicyRequest()), INVALID)


# --- SimulatePolicy ----------------------------------------------------------------------------------


async def test_simulate_lists_the_decisions_that_would_flip(gov: ArmClient, tenant: TenantContext) -> None:
    agent = await active_agent(tenant.admin)
    v = agent.agents.version.id
    logged = [await check(gov, agent.instance.id, tool) for tool in ("fs.read", "fs.write", "k8s.deploy", "fs.read")]
    assert [r.decision for r in logged] == [ALLOW, ALLOW, NA, ALLOW]

    sim = await gov.policies.SimulatePolicy(policy_pb2.SimulatePolicyRequest(
        candidate=envelope(VERSION, v, tool_rules=[rule("fs.*", DENY)])))
    assert (sim.evaluated_count, sim.flipped_count, sim.truncated) == (4, 3, False)
    assert [(f.decision_id, f.tool_name, f.original_decision, f.simulated_decision) for f in sim.flips] == [
        (logged[i].decision_id, ("fs.read", "fs.write", "k8s.deploy", "fs.read")[i], ALLOW, DENY) for i in (3, 1, 0)]
    for f in sim.flips:
        assert f.instance_id == agent.instance.id and f.decide_time.seconds > 0
        assert f.simulated_reasons[0].code == "TOOL_RULE_MATCHED"
    assert sim.flips[1].effective_risk == common_pb2.RISK_LEVEL_MEDIUM

    nothing = await gov.policies.SimulatePolicy(policy_pb2.SimulatePolicyRequest(
        candidate=envelope(VERSION, v, tool_rules=[rule("fs.read", ALLOW), rule("k8s.*", NA)])))
    assert (nothing.evaluated_count, nothing.flipped_count, list(nothing.flips)) == (4, 0, [])

    limited = await gov.policies.SimulatePolicy(policy_pb2.SimulatePolicyRequest(
        candidate=envelope(VERSION, v, tool_rules=[rule("fs.*", DENY)]), limit=2))
    assert (limited.evaluated_count, limited.truncated) == (2, True)
    assert [f.decision_id for f in limited.flips] == [logged[3].decision_id]

    # Simulation changes nothing.
    assert not (await gov.policies.ListPolicyEnvelopes(policy_pb2.ListPolicyEnvelopesRequest())).envelopes
    assert (await check(gov, agent.instance.id)).decision == ALLOW
    await expect_failure(gov.policies.SimulatePolicy(policy_pb2.SimulatePolicyRequest(
        candidate=envelope(), lookback=duration_pb2.Duration(seconds=-5))), INVALID)
    await expect_failure(gov.policies.SimulatePolicy(policy_pb2.SimulatePolicyRequest(candidate=envelope(), limit=-1)),
                         INVALID)


async def test_simulate_candidate_replacing_an_existing_envelope(gov: ArmClient, tenant: TenantContext) -> None:
    agent = await active_agent(tenant.admin)
    v = agent.agents.version.id
    env = await create(gov, envelope(VERSION, v, tool_rules=[rule("fs.read", DENY)]))
    denied = await check(gov, agent.instance.id)
    allowed = await check(gov, agent.instance.id, "fs.write")
    assert (denied.decision, allowed.decision) == (DENY, ALLOW)
    candidate = envelope(VERSION, v, envelope_id=env.envelope_id, tool_rules=[rule("fs.read", ALLOW)])
    sim = await gov.policies.SimulatePolicy(policy_pb2.SimulatePolicyRequest(candidate=candidate))
    assert (sim.evaluated_count, sim.flipped_count) == (2, 1)
    assert [(f.decision_id, f.original_decision, f.simulated_decision) for f in sim.flips] == [
        (denied.decision_id, DENY, ALLOW)]
    got = (await gov.policies.GetPolicyEnvelope(policy_pb2.GetPolicyEnvelopeRequest(envelope_id=env.envelope_id))).envelope
    assert got == env


async def test_simulate_replays_only_decisions_the_candidate_covers(gov: ArmClient, tenant: TenantContext) -> None:
    a = await active_agent(tenant.admin)
    b = await active_agent(tenant.admin)
    for agent in (a, a, b, b, b):
        await check(gov, agent.instance.id)
    sim = await gov.policies.SimulatePolicy(policy_pb2.SimulatePolicyRequest(
        candidate=envelope(VERSION, a.agents.version.id, tool_rules=[rule("fs.*", DENY)])))
    assert (sim.evaluated_count, sim.flipped_count) == (2, 2)


# --- Operator controls, epochs, idempotency --------------------------------------------------------------


async def test_set_operator_control_writes_emergency_pause(governance: Any, gov: ArmClient,
                                                           tenant: TenantContext) -> None:
    agents = await approved_version(tenant.admin)
    tid = tenant.tenant.id
    T, P = policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT, policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT
    never = (await gov.policies.GetOperatorControl(policy_pb2.GetOperatorControlRequest(scope=T))).control
    assert (never.mode, never.scope_id) == (policy_pb2.OPERATOR_CONTROL_MODE_NORMAL, tid)
    paused = (await gov.policies.SetOperatorControl(policy_pb2.SetOperatorControlRequest(
        scope=T, mode=policy_pb2.OPERATOR_CONTROL_MODE_PAUSED, reason="incident 42"))).control
    assert (paused.tenant_id, paused.scope, paused.scope_id, paused.mode, paused.reason) == (
        tid, T, tid, policy_pb2.OPERATOR_CONTROL_MODE_PAUSED, "incident 42")
    assert paused.updated_by.id == tenant.admin_operator_id and paused.etag
    await expect_failure(gov.policies.SetOperatorControl(policy_pb2.SetOperatorControlRequest(
        scope=T, mode=policy_pb2.OPERATOR_CONTROL_MODE_NORMAL, etag="stale")), grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    normal = (await gov.policies.SetOperatorControl(policy_pb2.SetOperatorControlRequest(
        scope=T, scope_id=tid, mode=policy_pb2.OPERATOR_CONTROL_MODE_NORMAL, reason="resolved",
        etag=paused.etag))).control
    assert normal.mode == policy_pb2.OPERATOR_CONTROL_MODE_NORMAL and normal.etag != paused.etag
    drain = (await gov.policies.SetOperatorControl(policy_pb2.SetOperatorControlRequest(
        scope=P, scope_id=agents.project.id, mode=policy_pb2.OPERATOR_CONTROL_MODE_DRAINING, reason="deploy"))).control
    assert (drain.scope, drain.scope_id) == (P, agents.project.id)
    got = (await gov.policies.GetOperatorControl(policy_pb2.GetOperatorControlRequest(
        scope=P, scope_id=agents.project.id))).control
    assert got == drain
    listed = await gov.policies.ListOperatorControls(policy_pb2.ListOperatorControlsRequest())
    assert [(c.scope, c.scope_id, c.mode) for c in listed.controls] == [
        (T, tid, policy_pb2.OPERATOR_CONTROL_MODE_NORMAL), (P, agents.project.id, policy_pb2.OPERATOR_CONTROL_MODE_DRAINING)]

    pauses = [r for r in await change_records(governance, tid) if r.type == CR.CHANGE_RECORD_TYPE_EMERGENCY_PAUSE]
    assert [(r.target_type, r.target_id, r.before["mode"], r.after["mode"], r.reason) for r in pauses] == [
        ("tenant", tid, "NORMAL", "PAUSED", "incident 42"),
        ("tenant", tid, "PAUSED", "NORMAL", "resolved"),
        ("project", agents.project.id, "NORMAL", "DRAINING", "deploy")]
    assert pauses[2].project_id == agents.project.id
    assert all(r.actor.id == tenant.admin_operator_id for r in pauses)
    for bad in (policy_pb2.SetOperatorControlRequest(scope=0, mode=policy_pb2.OPERATOR_CONTROL_MODE_PAUSED),
                policy_pb2.SetOperatorControlRequest(scope=T, mode=0),
                policy_pb2.SetOperatorControlRequest(scope=P, mode=policy_pb2.OPERATOR_CONTROL_MODE_PAUSED)):
        await expect_failure(gov.policies.SetOperatorControl(bad), INVALID, "INVALID_FIELDS")


async def test_policy_epoch_increases_with_every_policy_change(gov: ArmClient, tenant: TenantContext) -> None:
    agent = await active_agent(tenant.admin)
    e0 = (await check(gov, agent.instance.id)).policy_epoch
    assert (await check(gov, agent.instance.id)).policy_epoch == e0, "no change, same epoch"
    env = await create(gov, envelope(VERSION, agent.agents.version.id, tool_rules=[rule("git.*", DENY)]))
    e1 = (await check(gov, agent.instance.id)).policy_epoch
    await gov.policies.SetOperatorControl(policy_pb2.SetOperatorControlRequest(
        scope=policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT, mode=policy_pb2.OPERATOR_CONTROL_MODE_NORMAL))
    e2 = (await check(gov, agent.instance.id)).policy_epoch
    await gov.policies.DeactivatePolicyEnvelope(policy_pb2.DeactivatePolicyEnvelopeRequest(envelope_id=env.envelope_id))
    e3 = (await check(gov, agent.instance.id)).policy_epoch
    assert e0 < e1 < e2 < e3
    effective = await gov.policies.GetEffectivePolicy(policy_pb2.GetEffectivePolicyRequest(instance_id=agent.instance.id))
    assert effective.policy_epoch == e3


async def test_create_request_id_is_idempotent(governance: Any, gov: ArmClient, tenant: TenantContext) -> None:
    request = policy_pb2.CreatePolicyEnvelopeRequest(request_id=f"req-{secrets.token_hex(4)}",
                                                     envelope=envelope(tool_rules=[rule("fs.*", DENY)]))
    first = (await gov.policies.CreatePolicyEnvelope(request)).envelope
    again = (await gov.policies.CreatePolicyEnvelope(request)).envelope
    assert again == first
    listed = await gov.policies.ListPolicyEnvelopes(policy_pb2.ListPolicyEnvelopesRequest())
    assert [e.envelope_id for e in listed.envelopes] == [first.envelope_id]
    assert policy_records(await change_records(governance, tenant.tenant.id), first.envelope_id) == [
        CR.CHANGE_RECORD_TYPE_POLICY_CREATED]
    reused = policy_pb2.CreatePolicyEnvelopeRequest(request_id=request.request_id, envelope=envelope())
    await expect_failure(gov.policies.CreatePolicyEnvelope(reused), INVALID, "REQUEST_ID_REUSED")
    # Deactivate with a request id: a retry is answered from the first response (no third revision).
    deactivate = policy_pb2.DeactivatePolicyEnvelopeRequest(request_id=f"req-{secrets.token_hex(4)}",
                                                            envelope_id=first.envelope_id)
    one = (await gov.policies.DeactivatePolicyEnvelope(deactivate)).envelope
    two = (await gov.policies.DeactivatePolicyEnvelope(deactivate)).envelope
    assert one == two and one.revision == 2
    assert policy_records(await change_records(governance, tenant.tenant.id), first.envelope_id) == [
        CR.CHANGE_RECORD_TYPE_POLICY_CREATED, CR.CHANGE_RECORD_TYPE_POLICY_UPDATED]
