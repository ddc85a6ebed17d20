"""The registry's checks that go through governance over gRPC (SPEC §2 Lifecycles): instance
creation under `require_active_deployment`, QUARANTINED → ACTIVE through an INSTANCE_REACTIVATION
approval, CANDIDATE → APPROVED through a VERSION_PROMOTION approval, and failing closed when
governance cannot answer. A registry and a governance of their own, each knowing the other's
address (the registry learns governance's once it is bound, as in the all-in-one server)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from arm.common.v1 import common_pb2
from arm.governance.v1 import approvals_pb2 as apb
from arm.governance.v1 import deployments_pb2 as dpb
from arm.registry.v1 import access_pb2, agents_pb2, tenancy_pb2
from arm_client import ArmClient
from tests.conftest import (
    GovernanceServer,
    RegistryServer,
    make_tenant,
    new_database_spec,
    start_governance,
    start_registry,
    stop_governance,
    stop_registry,
)
from tests.helpers import approved_version, expect_failure, genome, walk_version

APPROVE = apb.APPROVAL_VERDICT_APPROVE
I = agents_pb2  # noqa: E741


@pytest.fixture(scope="module")
async def pair(backend: str, tmp_path_factory: pytest.TempPathFactory
               ) -> AsyncIterator[tuple[RegistryServer, GovernanceServer]]:
    folder = tmp_path_factory.mktemp(f"gates-{backend}")
    registry = await start_registry(new_database_spec(backend, folder, "registry"))
    governance = await start_governance(new_database_spec(backend, folder, "governance"), registry)
    registry.component.governance.connect(governance.address)
    yield registry, governance
    await stop_governance(governance)
    await stop_registry(registry)


class Ctx:
    def __init__(self, registry: RegistryServer, governance: GovernanceServer, admin: ArmClient,
                 gov: ArmClient, admin_key: str) -> None:
        self.registry, self.governance, self.admin, self.gov, self.admin_key = registry, governance, admin, gov, admin_key
        self.clients: list[ArmClient] = [admin, gov]

    async def operator(self, *role_names: str) -> tuple[str, ArmClient, ArmClient]:
        """An operator with these roles: id, registry client, governance client."""
        suffix = secrets.token_hex(4)
        op = (await self.admin.access.CreateOperator(access_pb2.CreateOperatorRequest(
            email=f"op-{suffix}@example.com", name=f"Operator {suffix}"))).operator
        roles = {r.name: r.id for r in (await self.admin.access.ListRoles(access_pb2.ListRolesRequest())).roles}
        for name in role_names:
            await self.admin.access.CreateRoleAssignment(access_pb2.CreateRoleAssignmentRequest(
                operator_id=op.id, role_id=roles[name]))
        key = (await self.admin.access.CreateApiKey(access_pb2.CreateApiKeyRequest(operator_id=op.id))).secret
        reg, gov = self.registry.client(key), self.governance.client(key)
        self.clients += [reg, gov]
        return op.id, reg, gov

    async def approve(self, approval_id: str) -> str:
        op_id, _, gov = await self.operator("approver")
        await gov.approvals.DecideApproval(apb.DecideApprovalRequest(approval_id=approval_id, verdict=APPROVE))
        return op_id


@pytest.fixture
async def ctx(pair: tuple[RegistryServer, GovernanceServer]) -> AsyncIterator[Ctx]:
    registry, governance = pair
    system = registry.client(registry.admin_key)
    tenant = await make_tenant(registry, system)
    await system.close()
    c = Ctx(registry, governance, tenant.admin, governance.client(tenant.admin_key), tenant.admin_key)
    yield c
    for client in c.clients:
        await client.close()


async def new_instance(admin: ArmClient, version_id: str, env_id: str) -> agents_pb2.AgentInstance:
    return (await admin.agents.CreateAgentInstance(I.CreateAgentInstanceRequest(
        version_id=version_id, environment_id=env_id, name=f"i-{secrets.token_hex(3)}"))).agent_instance


async def transition(client: ArmClient, instance_id: str, state: int, **kw: Any) -> agents_pb2.AgentInstance:
    return (await client.agents.TransitionAgentInstance(I.TransitionAgentInstanceRequest(
        id=instance_id, to_state=state, **kw))).agent_instance


async def test_require_active_deployment_admits_only_the_active_version(ctx: Ctx) -> None:
    agents = await approved_version(ctx.admin, tenancy_pb2.ENVIRONMENT_TYPE_STAGING, require_active_deployment=True)
    env = agents.environment.id
    failed = await expect_failure(new_instance(ctx.admin, agents.version.id, env), grpc.StatusCode.FAILED_PRECONDITION,
                                  "NOT_ACTIVE_DEPLOYMENT_VERSION")
    assert failed.metadata["active_version_id"] == ""
    dep = (await ctx.gov.deployments.CreateDeployment(dpb.CreateDeploymentRequest(deployment=dpb.Deployment(
        template_id=agents.template.id, environment_id=env, target_version_id=agents.version.id)))).deployment
    await expect_failure(new_instance(ctx.admin, agents.version.id, env), grpc.StatusCode.FAILED_PRECONDITION,
                         "NOT_ACTIVE_DEPLOYMENT_VERSION")  # PENDING is not ACTIVE
    await ctx.gov.deployments.ActivateDeployment(dpb.ActivateDeploymentRequest(deployment_id=dep.deployment_id))
    inst = await new_instance(ctx.admin, agents.version.id, env)
    assert inst.version_id == agents.version.id
    v2 = (await ctx.admin.agents.CreateAgentVersion(I.CreateAgentVersionRequest(
        template_id=agents.template.id, genome=genome()))).agent_version
    v2 = await walk_version(ctx.admin, v2.id, I.VERSION_STATE_APPROVED)
    failed = await expect_failure(new_instance(ctx.admin, v2.id, env), grpc.StatusCode.FAILED_PRECONDITION,
                                  "NOT_ACTIVE_DEPLOYMENT_VERSION")
    assert failed.metadata["active_version_id"] == agents.version.id


async def test_unreachable_governance_fails_closed(ctx: Ctx) -> None:
    agents = await approved_version(ctx.admin, tenancy_pb2.ENVIRONMENT_TYPE_STAGING, require_active_deployment=True)
    plain = await approved_version(ctx.admin)
    inst = await new_instance(ctx.admin, plain.version.id, plain.environment.id)
    await transition(ctx.admin, inst.id, I.INSTANCE_STATE_ACTIVE)
    await transition(ctx.admin, inst.id, I.INSTANCE_STATE_QUARANTINED)
    gate = ctx.registry.component.governance
    gate.connect("127.0.0.1:1")  # nothing listens there
    try:
        await expect_failure(new_instance(ctx.admin, agents.version.id, agents.environment.id),
                             grpc.StatusCode.UNAVAILABLE, "DEPLOYMENT_CHECK_UNAVAILABLE")
        await expect_failure(transition(ctx.admin, inst.id, I.INSTANCE_STATE_ACTIVE, approval_id="apr_x"),
                             grpc.StatusCode.UNAVAILABLE, "APPROVAL_CHECK_UNAVAILABLE")
    finally:
        gate.connect(ctx.governance.address)
    got = (await ctx.admin.agents.GetAgentInstance(I.GetAgentInstanceRequest(id=inst.id))).agent_instance
    assert got.state == I.INSTANCE_STATE_QUARANTINED


async def test_reactivation_needs_an_approved_reactivation_approval_once(ctx: Ctx) -> None:
    agents = await approved_version(ctx.admin)
    inst = await new_instance(ctx.admin, agents.version.id, agents.environment.id)
    other = await new_instance(ctx.admin, agents.version.id, agents.environment.id)
    await transition(ctx.admin, inst.id, I.INSTANCE_STATE_ACTIVE)
    await transition(ctx.admin, inst.id, I.INSTANCE_STATE_QUARANTINED)
    _, operator, operator_gov = await ctx.operator("operator")
    await expect_failure(transition(operator, inst.id, I.INSTANCE_STATE_ACTIVE), grpc.StatusCode.FAILED_PRECONDITION,
                         "APPROVAL_REQUIRED")

    async def request(instance_id: str) -> apb.Approval:
        return (await operator_gov.approvals.RequestApproval(apb.RequestApprovalRequest(
            action_type=apb.APPROVAL_ACTION_TYPE_INSTANCE_REACTIVATION, instance_id=instance_id,
            risk=common_pb2.RISK_LEVEL_MEDIUM, justification="incident closed"))).approval

    wrong = await request(other.id)
    await ctx.approve(wrong.approval_id)
    await expect_failure(transition(operator, inst.id, I.INSTANCE_STATE_ACTIVE, approval_id=wrong.approval_id),
                         grpc.StatusCode.FAILED_PRECONDITION, "APPROVAL_MISMATCH")
    approval = await request(inst.id)
    await expect_failure(transition(operator, inst.id, I.INSTANCE_STATE_ACTIVE, approval_id=approval.approval_id),
                         grpc.StatusCode.FAILED_PRECONDITION, "APPROVAL_NOT_APPROVED")
    await ctx.approve(approval.approval_id)
    back = await transition(operator, inst.id, I.INSTANCE_STATE_ACTIVE, approval_id=approval.approval_id)
    assert back.state == I.INSTANCE_STATE_ACTIVE
    # The same approval does not cover the next quarantine.
    await transition(ctx.admin, inst.id, I.INSTANCE_STATE_QUARANTINED)
    await expect_failure(transition(operator, inst.id, I.INSTANCE_STATE_ACTIVE, approval_id=approval.approval_id),
                         grpc.StatusCode.FAILED_PRECONDITION, "APPROVAL_STALE")
    # An approval governance does not know (or another tenant's) is NOT_FOUND.
    await expect_failure(transition(operator, inst.id, I.INSTANCE_STATE_ACTIVE, approval_id="apr_missing"),
                         grpc.StatusCode.NOT_FOUND, "APPROVAL_NOT_FOUND")


async def test_version_promotion_through_an_approval(ctx: Ctx) -> None:
    agents = await approved_version(ctx.admin)
    v = (await ctx.admin.agents.CreateAgentVersion(I.CreateAgentVersionRequest(
        template_id=agents.template.id, genome=genome()))).agent_version
    v = await walk_version(ctx.admin, v.id, I.VERSION_STATE_CANDIDATE)
    _, operator, operator_gov = await ctx.operator("operator")  # registry:write, no versions:approve
    request = I.TransitionAgentVersionRequest(id=v.id, to_state=I.VERSION_STATE_APPROVED, reason="ship")
    await expect_failure(operator.agents.TransitionAgentVersion(request), grpc.StatusCode.PERMISSION_DENIED,
                         "MISSING_PERMISSION")
    approval = (await operator_gov.approvals.RequestApproval(apb.RequestApprovalRequest(
        action_type=apb.APPROVAL_ACTION_TYPE_VERSION_PROMOTION, version_id=v.id,
        risk=common_pb2.RISK_LEVEL_MEDIUM, justification="evals passed"))).approval
    assert approval.project_id == agents.project.id
    request.approval_id = approval.approval_id
    await expect_failure(operator.agents.TransitionAgentVersion(request), grpc.StatusCode.FAILED_PRECONDITION,
                         "APPROVAL_NOT_APPROVED")
    approver_id = await ctx.approve(approval.approval_id)
    promoted = (await operator.agents.TransitionAgentVersion(request)).agent_version
    assert (promoted.state, promoted.approved_by) == (I.VERSION_STATE_APPROVED, approver_id)
    failed = await expect_failure(operator.agents.TransitionAgentVersion(I.TransitionAgentVersionRequest(
        id=v.id, to_state=I.VERSION_STATE_DEPRECATED, approval_id=approval.approval_id)),
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELDS")
    assert "approval_id" in failed.violations
