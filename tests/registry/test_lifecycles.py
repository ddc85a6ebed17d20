"""Version and instance lifecycles over gRPC: every (from, to) pair of both state machines against
the table of SPEC §2 (written out here, not imported from the service), the evaluation and
approval gates, and which versions may get instances in which environments."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from sqlalchemy import text

from arm.common.v1 import common_pb2
from arm.registry.v1 import agents_pb2, tenancy_pb2
from arm_client import ArmClient
from tests.conftest import RegistryServer, TenantContext, make_tenant
from tests.helpers import expect_failure, genome, operator_with_roles, walk_version

VERSION_STATES = ["DRAFT", "TESTING", "CANDIDATE", "APPROVED", "DEPRECATED", "RETIRED"]
INSTANCE_STATES = ["PROVISIONING", "ACTIVE", "PAUSED", "READONLY", "DRAINING", "QUARANTINED",
                   "RETIRED"]

# SPEC §2 "Lifecycles", transcribed by hand.
VERSION_ALLOWED: dict[str, set[str]] = {
    "DRAFT": {"TESTING"},
    "TESTING": {"CANDIDATE", "DRAFT"},
    "CANDIDATE": {"APPROVED", "DRAFT"},
    "APPROVED": {"DEPRECATED"},
    "DEPRECATED": {"RETIRED"},
    "RETIRED": set(),
}
INSTANCE_ALLOWED: dict[str, set[str]] = {
    "PROVISIONING": {"ACTIVE", "RETIRED"},
    "ACTIVE": {"PAUSED", "READONLY", "DRAINING", "QUARANTINED", "RETIRED"},
    "PAUSED": {"ACTIVE", "RETIRED"},
    "READONLY": {"ACTIVE", "RETIRED"},
    "QUARANTINED": {"ACTIVE", "READONLY", "RETIRED"},
    "DRAINING": {"RETIRED", "ACTIVE"},
    "RETIRED": set(),
}
# An allowed path from PROVISIONING to each instance state.
INSTANCE_PATH: dict[str, list[str]] = {
    "PROVISIONING": [],
    "ACTIVE": ["ACTIVE"],
    "PAUSED": ["ACTIVE", "PAUSED"],
    "READONLY": ["ACTIVE", "READONLY"],
    "DRAINING": ["ACTIVE", "DRAINING"],
    "QUARANTINED": ["ACTIVE", "QUARANTINED"],
    "RETIRED": ["RETIRED"],
}

VERSION_PAIRS = [(a, b) for a in VERSION_STATES for b in VERSION_STATES]
INSTANCE_PAIRS = [(a, b) for a in INSTANCE_STATES for b in INSTANCE_STATES]

CR = common_pb2.ChangeRecordType


def vstate(name: str) -> int:
    return agents_pb2.VersionState.Value(f"VERSION_STATE_{name}")


def istate(name: str) -> int:
    return agents_pb2.InstanceState.Value(f"INSTANCE_STATE_{name}")


async def change_records(registry: RegistryServer, tenant_id: str) -> list[common_pb2.ChangeRecord]:
    """The tenant's change records as the registry wrote them to its outbox, in order."""
    async with registry.db.transaction() as s:
        rows = (await s.execute(text(
            "select payload from outbox_messages where tenant_id = :t and topic = 'change_record' "
            "order by position"), {"t": tenant_id})).all()
    return [common_pb2.ChangeRecord.FromString(bytes(r.payload)) for r in rows]


async def records_for(registry: RegistryServer, tenant_id: str, target_id: str) -> list[common_pb2.ChangeRecord]:
    return [r for r in await change_records(registry, tenant_id) if r.target_id == target_id]


@dataclass
class World:
    """One tenant per backend for this module, with a project, a template, an APPROVED version
    and an environment of each kind."""

    ctx: TenantContext
    project: tenancy_pb2.Project
    template: agents_pb2.AgentTemplate
    approved: agents_pb2.AgentVersion
    envs: dict[str, tenancy_pb2.Environment]
    deployment_env: tenancy_pb2.Environment

    @property
    def admin(self) -> ArmClient:
        return self.ctx.admin

    @property
    def tenant_id(self) -> str:
        return self.ctx.tenant.id


@pytest.fixture(scope="module")
async def world(registry: RegistryServer, system_admin: ArmClient) -> AsyncIterator[World]:
    ctx = await make_tenant(registry, system_admin)
    admin = ctx.admin
    suffix = secrets.token_hex(4)
    project = (await admin.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
        slug=f"p-{suffix}", name="Lifecycle project"))).project
    envs = {}
    for kind in ("DEV", "STAGING", "PROD"):
        envs[kind] = (await admin.tenancy.CreateEnvironment(tenancy_pb2.CreateEnvironmentRequest(
            name=f"{kind.lower()}-{suffix}",
            type=tenancy_pb2.EnvironmentType.Value(f"ENVIRONMENT_TYPE_{kind}")))).environment
    deployment_env = (await admin.tenancy.CreateEnvironment(tenancy_pb2.CreateEnvironmentRequest(
        name=f"prod-gated-{suffix}", type=tenancy_pb2.ENVIRONMENT_TYPE_PROD,
        require_active_deployment=True))).environment
    template = (await admin.agents.CreateAgentTemplate(agents_pb2.CreateAgentTemplateRequest(
        project_id=project.id, slug=f"tpl-{suffix}", name="Lifecycle agent"))).agent_template
    w = World(ctx, project, template, agents_pb2.AgentVersion(), envs, deployment_env)
    w.approved = await version_in(w, "APPROVED")
    yield w
    await admin.close()


async def version_in(w: World, state: str) -> agents_pb2.AgentVersion:
    """A fresh version of the module's template, moved to `state` along allowed transitions."""
    version = (await w.admin.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(
        template_id=w.template.id, genome=genome()))).agent_version
    assert version.state == agents_pb2.VERSION_STATE_DRAFT
    return await walk_version(w.admin, version.id, vstate(state))


async def instance_in(w: World, state: str) -> agents_pb2.AgentInstance:
    """A fresh instance of the APPROVED version in DEV, moved to `state` along allowed transitions."""
    inst = (await w.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=w.approved.id, environment_id=w.envs["DEV"].id,
        name=f"inst-{secrets.token_hex(3)}"))).agent_instance
    assert inst.state == agents_pb2.INSTANCE_STATE_PROVISIONING
    for step in INSTANCE_PATH[state]:
        inst = (await w.admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
            id=inst.id, to_state=istate(step), reason=f"setup to {step}"))).agent_instance
        assert inst.state == istate(step)
    return inst


def assert_transition_record(rec: common_pb2.ChangeRecord, w: World, type_: int, target_id: str,
                             src: str, dst: str, reason: str) -> None:
    assert rec.type == type_
    assert rec.tenant_id == w.tenant_id
    assert rec.target_id == target_id
    assert rec.before["state"] == src
    assert rec.after["state"] == dst
    assert rec.actor.type == common_pb2.ACTOR_TYPE_OPERATOR
    assert rec.actor.id == w.ctx.admin_operator_id
    assert rec.reason == reason


def assert_names_allowed(message: str, allowed: set[str]) -> None:
    for target in allowed:
        assert target in message, f"the refusal does not name allowed target {target}: {message}"


# --- versions ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("src", "dst"), VERSION_PAIRS, ids=[f"{a}->{b}" for a, b in VERSION_PAIRS])
async def test_version_transition(world: World, registry: RegistryServer, src: str, dst: str) -> None:
    w = world
    version = await version_in(w, src)
    if (src, dst) == ("TESTING", "CANDIDATE"):  # the evaluation gate has its own tests below
        await w.admin.agents.RecordEvaluation(agents_pb2.RecordEvaluationRequest(
            id=version.id, eval_status=agents_pb2.EVAL_STATUS_PASS, summary="passed"))
    before = await records_for(registry, w.tenant_id, version.id)
    reason = f"lifecycle {src}->{dst} {secrets.token_hex(3)}"
    request = agents_pb2.TransitionAgentVersionRequest(id=version.id, to_state=vstate(dst), reason=reason)

    if dst in VERSION_ALLOWED[src]:
        moved = (await w.admin.agents.TransitionAgentVersion(request)).agent_version
        assert moved.state == vstate(dst)
        stored = (await w.admin.agents.GetAgentVersion(
            agents_pb2.GetAgentVersionRequest(id=version.id))).agent_version
        assert stored.state == vstate(dst)
        after = await records_for(registry, w.tenant_id, version.id)
        new = after[len(before):]
        assert after[:len(before)] == before
        assert len(new) == 1, [CR.Name(r.type) for r in new]
        assert_transition_record(new[0], w, CR.CHANGE_RECORD_TYPE_VERSION_TRANSITIONED, version.id,
                                 src, dst, reason)
    else:
        got = await expect_failure(w.admin.agents.TransitionAgentVersion(request),
                                   grpc.StatusCode.FAILED_PRECONDITION, "INVALID_TRANSITION")
        assert_names_allowed(got.message, VERSION_ALLOWED[src])
        stored = (await w.admin.agents.GetAgentVersion(
            agents_pb2.GetAgentVersionRequest(id=version.id))).agent_version
        assert stored.state == vstate(src)
        assert await records_for(registry, w.tenant_id, version.id) == before


@pytest.mark.parametrize("status", ["NOT_RUN", "RUNNING", "FAIL"])
async def test_testing_to_candidate_needs_a_passed_evaluation(world: World, registry: RegistryServer,
                                                              status: str) -> None:
    w = world
    version = await version_in(w, "TESTING")
    if status != "NOT_RUN":
        recorded = (await w.admin.agents.RecordEvaluation(agents_pb2.RecordEvaluationRequest(
            id=version.id, eval_status=agents_pb2.EvalStatus.Value(f"EVAL_STATUS_{status}"),
            summary=status.lower()))).agent_version
        assert recorded.eval_status == agents_pb2.EvalStatus.Value(f"EVAL_STATUS_{status}")
    before = await records_for(registry, w.tenant_id, version.id)
    await expect_failure(w.admin.agents.TransitionAgentVersion(agents_pb2.TransitionAgentVersionRequest(
        id=version.id, to_state=agents_pb2.VERSION_STATE_CANDIDATE, reason="try")),
        grpc.StatusCode.FAILED_PRECONDITION, "EVALUATION_NOT_PASSED")
    stored = (await w.admin.agents.GetAgentVersion(agents_pb2.GetAgentVersionRequest(id=version.id))).agent_version
    assert stored.state == agents_pb2.VERSION_STATE_TESTING
    assert await records_for(registry, w.tenant_id, version.id) == before


async def test_testing_to_candidate_after_fail_then_pass(world: World) -> None:
    w = world
    version = await version_in(w, "TESTING")
    transition = agents_pb2.TransitionAgentVersionRequest(
        id=version.id, to_state=agents_pb2.VERSION_STATE_CANDIDATE, reason="promote")
    await w.admin.agents.RecordEvaluation(agents_pb2.RecordEvaluationRequest(
        id=version.id, eval_status=agents_pb2.EVAL_STATUS_FAIL, summary="regressions"))
    await expect_failure(w.admin.agents.TransitionAgentVersion(transition),
                         grpc.StatusCode.FAILED_PRECONDITION, "EVALUATION_NOT_PASSED")
    await w.admin.agents.RecordEvaluation(agents_pb2.RecordEvaluationRequest(
        id=version.id, eval_status=agents_pb2.EVAL_STATUS_PASS, summary="fixed"))
    moved = (await w.admin.agents.TransitionAgentVersion(transition)).agent_version
    assert moved.state == agents_pb2.VERSION_STATE_CANDIDATE
    assert moved.eval_status == agents_pb2.EVAL_STATUS_PASS


async def test_candidate_to_approved_records_the_approver(world: World) -> None:
    w = world
    version = await version_in(w, "CANDIDATE")
    assert version.approved_by == ""
    approved = (await w.admin.agents.TransitionAgentVersion(agents_pb2.TransitionAgentVersionRequest(
        id=version.id, to_state=agents_pb2.VERSION_STATE_APPROVED, reason="ship it"))).agent_version
    assert approved.approved_by == w.ctx.admin_operator_id
    stored = (await w.admin.agents.GetAgentVersion(agents_pb2.GetAgentVersionRequest(id=version.id))).agent_version
    assert stored.approved_by == w.ctx.admin_operator_id
    assert stored.state == agents_pb2.VERSION_STATE_APPROVED


async def test_approving_needs_versions_approve(world: World, registry: RegistryServer) -> None:
    """The built-in `operator` role may write the registry but not approve versions."""
    w = world
    version = await version_in(w, "CANDIDATE")
    _, client = await operator_with_roles(w.admin, registry.address, "operator")
    try:
        await expect_failure(client.agents.TransitionAgentVersion(agents_pb2.TransitionAgentVersionRequest(
            id=version.id, to_state=agents_pb2.VERSION_STATE_APPROVED, reason="self-approve")),
            grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION")
    finally:
        await client.close()
    stored = (await w.admin.agents.GetAgentVersion(agents_pb2.GetAgentVersionRequest(id=version.id))).agent_version
    assert stored.state == agents_pb2.VERSION_STATE_CANDIDATE
    assert stored.approved_by == ""


async def test_approver_role_can_approve_a_candidate(world: World, registry: RegistryServer) -> None:
    """SPEC §2: CANDIDATE → APPROVED requires an operator with versions:approve, recorded as
    approved_by. The built-in approver role holds exactly that permission for this purpose."""
    w = world
    version = await version_in(w, "CANDIDATE")
    approver_id, client = await operator_with_roles(w.admin, registry.address, "approver")
    try:
        approved = (await client.agents.TransitionAgentVersion(agents_pb2.TransitionAgentVersionRequest(
            id=version.id, to_state=agents_pb2.VERSION_STATE_APPROVED, reason="approved"))).agent_version
    finally:
        await client.close()
    assert approved.state == agents_pb2.VERSION_STATE_APPROVED
    assert approved.approved_by == approver_id


# --- instances ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("src", "dst"), INSTANCE_PAIRS, ids=[f"{a}->{b}" for a, b in INSTANCE_PAIRS])
async def test_instance_transition(world: World, registry: RegistryServer, src: str, dst: str) -> None:
    w = world
    inst = await instance_in(w, src)
    before = await records_for(registry, w.tenant_id, inst.id)
    reason = f"lifecycle {src}->{dst} {secrets.token_hex(3)}"
    request = agents_pb2.TransitionAgentInstanceRequest(id=inst.id, to_state=istate(dst), reason=reason)

    async def state_now() -> int:
        return (await w.admin.agents.GetAgentInstance(
            agents_pb2.GetAgentInstanceRequest(id=inst.id))).agent_instance.state

    if (src, dst) == ("QUARANTINED", "ACTIVE"):
        # Allowed by the SPEC only with an approved INSTANCE_REACTIVATION approval; without an
        # approval_id it is refused (the flow with one is in tests/governance/test_registry_gates.py).
        await expect_failure(w.admin.agents.TransitionAgentInstance(request),
                             grpc.StatusCode.FAILED_PRECONDITION, "APPROVAL_REQUIRED")
        assert await state_now() == istate(src)
        assert await records_for(registry, w.tenant_id, inst.id) == before
    elif dst in INSTANCE_ALLOWED[src]:
        moved = (await w.admin.agents.TransitionAgentInstance(request)).agent_instance
        assert moved.state == istate(dst)
        assert await state_now() == istate(dst)
        if dst == "ACTIVE":
            assert moved.HasField("activate_time")
        if dst == "RETIRED":
            assert moved.HasField("retire_time")
        else:
            assert not moved.HasField("retire_time")
        after = await records_for(registry, w.tenant_id, inst.id)
        assert after[:len(before)] == before
        new = after[len(before):]
        assert len(new) == 1, [CR.Name(r.type) for r in new]
        assert_transition_record(new[0], w, CR.CHANGE_RECORD_TYPE_INSTANCE_TRANSITIONED, inst.id,
                                 src, dst, reason)
        assert new[0].instance_id == inst.id
    else:
        got = await expect_failure(w.admin.agents.TransitionAgentInstance(request),
                                   grpc.StatusCode.FAILED_PRECONDITION, "INVALID_TRANSITION")
        assert_names_allowed(got.message, INSTANCE_ALLOWED[src])
        assert await state_now() == istate(src)
        assert await records_for(registry, w.tenant_id, inst.id) == before


async def test_quarantine_release_fails_closed_without_governance(world: World,
                                                                  registry: RegistryServer) -> None:
    """This registry runs without ARM_GOVERNANCE_ADDRESS: an approval id cannot be checked, so the
    transition is refused, never waved through."""
    w = world
    inst = await instance_in(w, "QUARANTINED")
    before = await records_for(registry, w.tenant_id, inst.id)
    await expect_failure(w.admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
        id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE, reason="incident closed",
        approval_id=f"apr_{secrets.token_hex(8)}")),
        grpc.StatusCode.FAILED_PRECONDITION, "APPROVAL_CHECK_UNAVAILABLE")
    stored = (await w.admin.agents.GetAgentInstance(agents_pb2.GetAgentInstanceRequest(id=inst.id))).agent_instance
    assert stored.state == agents_pb2.INSTANCE_STATE_QUARANTINED
    assert await records_for(registry, w.tenant_id, inst.id) == before


# --- instance creation -------------------------------------------------------------------------

CREATION_CASES = [(state, env) for state in VERSION_STATES for env in ("DEV", "STAGING", "PROD")]


@pytest.mark.parametrize(("state", "env"), CREATION_CASES,
                         ids=[f"{s}-in-{e}" for s, e in CREATION_CASES])
async def test_instance_creation_needs_a_deployable_version(world: World, registry: RegistryServer,
                                                           state: str, env: str) -> None:
    w = world
    version = w.approved if state == "APPROVED" else await version_in(w, state)
    environment = w.envs[env]
    request = agents_pb2.CreateAgentInstanceRequest(
        version_id=version.id, environment_id=environment.id, name=f"inst-{secrets.token_hex(3)}")
    deployable = state == "APPROVED" or (state == "CANDIDATE" and env == "DEV")
    created_before = [r for r in await change_records(registry, w.tenant_id)
                      if r.type == CR.CHANGE_RECORD_TYPE_INSTANCE_CREATED]
    if deployable:
        inst = (await w.admin.agents.CreateAgentInstance(request)).agent_instance
        assert inst.state == agents_pb2.INSTANCE_STATE_PROVISIONING
        assert (inst.version_id, inst.environment_id) == (version.id, environment.id)
        assert (inst.template_id, inst.project_id) == (w.template.id, w.project.id)
        records = await records_for(registry, w.tenant_id, inst.id)
        assert [r.type for r in records] == [CR.CHANGE_RECORD_TYPE_INSTANCE_CREATED]
        assert records[0].after["state"] == "PROVISIONING"
    else:
        await expect_failure(w.admin.agents.CreateAgentInstance(request),
                             grpc.StatusCode.FAILED_PRECONDITION, "VERSION_NOT_DEPLOYABLE")
        listed = (await w.admin.agents.ListAgentInstances(agents_pb2.ListAgentInstancesRequest(
            version_id=version.id))).agent_instances
        assert list(listed) == []
        created_after = [r for r in await change_records(registry, w.tenant_id)
                         if r.type == CR.CHANGE_RECORD_TYPE_INSTANCE_CREATED]
        assert created_after == created_before


@pytest.mark.parametrize("state", ["APPROVED", "CANDIDATE"])
async def test_environment_requiring_an_active_deployment_refuses_instances(
        world: World, registry: RegistryServer, state: str) -> None:
    """Deployment checks need governance, which this registry (no ARM_GOVERNANCE_ADDRESS) cannot
    ask: fail closed. With governance: tests/governance/test_registry_gates.py."""
    w = world
    version = w.approved if state == "APPROVED" else await version_in(w, state)
    if state == "CANDIDATE":
        # A DEV environment requiring a deployment: the CANDIDATE would be deployable otherwise.
        env = (await w.admin.tenancy.CreateEnvironment(tenancy_pb2.CreateEnvironmentRequest(
            name=f"dev-gated-{secrets.token_hex(4)}", type=tenancy_pb2.ENVIRONMENT_TYPE_DEV,
            require_active_deployment=True))).environment
    else:
        env = w.deployment_env
    before = await change_records(registry, w.tenant_id)
    await expect_failure(w.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=version.id, environment_id=env.id, name="gated")),
        grpc.StatusCode.FAILED_PRECONDITION, "DEPLOYMENT_CHECK_UNAVAILABLE")
    listed = (await w.admin.agents.ListAgentInstances(agents_pb2.ListAgentInstancesRequest(
        environment_id=env.id))).agent_instances
    assert list(listed) == []
    assert await change_records(registry, w.tenant_id) == before
