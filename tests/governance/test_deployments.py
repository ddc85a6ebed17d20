"""Deployments (SPEC §3 "Deployments") through gRPC DeploymentService on real servers: create
(APPROVED target, previous = the ACTIVE one), activate (PROD approval gate, retires only the same
template's ACTIVE deployment), rollback (instances rebound through the registry's gRPC API), and
the usual RBAC, tenant isolation, validation and request_id rules."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import pytest
from sqlalchemy import text, update

from arm.common.v1 import common_pb2
from arm.governance.v1 import approvals_pb2 as apb
from arm.governance.v1 import deployments_pb2 as dpb
from arm.registry.v1 import agents_pb2, tenancy_pb2
from arm_client import ArmClient
from arm_common.auth import Grant, Principal
from arm_common.tables import utcnow
from arm_governance import models
from arm_governance.deployments.service import DeploymentStore
from tests.conftest import TenantContext, make_tenant
from tests.helpers import (
    AgentSet,
    approved_version,
    expect_failure,
    genome,
    governance_change_records,
    operator_key,
    walk_version,
)

D = dpb.DeploymentStatus
PENDING, ACTIVE, RETIRED = D.DEPLOYMENT_STATUS_PENDING, D.DEPLOYMENT_STATUS_ACTIVE, D.DEPLOYMENT_STATUS_RETIRED
CR = common_pb2.ChangeRecordType


@dataclass
class World:
    tenant: TenantContext
    governance: Any
    gov: ArmClient
    agents: AgentSet
    clients: list[ArmClient]

    async def client(self, *roles: str) -> tuple[str, ArmClient]:
        op_id, key = await operator_key(self.tenant.admin, *roles)
        client = ArmClient(self.governance.address, key)
        self.clients.append(client)
        return op_id, client

    async def version(self, state: int = agents_pb2.VERSION_STATE_APPROVED,
                      template_id: str = "") -> agents_pb2.AgentVersion:
        v = (await self.tenant.admin.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(
            template_id=template_id or self.agents.template.id, genome=genome()))).agent_version
        return v if state == agents_pb2.VERSION_STATE_DRAFT else await walk_version(self.tenant.admin, v.id, state)

    async def create(self, version_id: str = "", *, env_id: str = "", template_id: str = "",
                     client: ArmClient | None = None, **kw: Any) -> dpb.Deployment:
        return (await (client or self.gov).deployments.CreateDeployment(dpb.CreateDeploymentRequest(
            deployment=dpb.Deployment(template_id=template_id or self.agents.template.id,
                                      environment_id=env_id or self.agents.environment.id,
                                      target_version_id=version_id or self.agents.version.id),
            reason="tests", **kw))).deployment

    async def activate(self, deployment_id: str, client: ArmClient | None = None, **kw: Any
                       ) -> dpb.ActivateDeploymentResponse:
        return await (client or self.gov).deployments.ActivateDeployment(dpb.ActivateDeploymentRequest(
            deployment_id=deployment_id, reason="tests", **kw))

    async def rollback(self, deployment_id: str, **kw: Any) -> dpb.RollbackDeploymentResponse:
        return await self.gov.deployments.RollbackDeployment(dpb.RollbackDeploymentRequest(
            deployment_id=deployment_id, reason="tests", **kw))

    async def get(self, deployment_id: str) -> dpb.Deployment:
        return (await self.gov.deployments.GetDeployment(dpb.GetDeploymentRequest(
            deployment_id=deployment_id))).deployment


@pytest.fixture
async def world(governance: Any, tenant: TenantContext) -> AsyncIterator[World]:
    gov = governance.client(tenant.admin_key)
    w = World(tenant, governance, gov, await approved_version(tenant.admin), [])
    yield w
    for c in [gov, *w.clients]:
        await c.close()


async def registry_records(registry: Any, tenant_id: str) -> list[common_pb2.ChangeRecord]:
    async def read(s: Any) -> list[bytes]:
        return list((await s.execute(text(
            "select payload from outbox_messages where tenant_id = :t and topic = 'change_record' "
            "order by position"), {"t": tenant_id})).scalars())
    return [common_pb2.ChangeRecord.FromString(bytes(p)) for p in await registry.db.read(read)]


async def records(governance: Any, tenant_id: str, target_id: str) -> list[common_pb2.ChangeRecord]:
    out = await governance_change_records(governance.db, tenant_id)
    return [r for r in out if r.target_id == target_id]


async def test_create_activate_and_supersede(world: World) -> None:
    first = await world.create()
    assert (first.status, first.previous_version_id, first.rollout_policy) == (
        PENDING, "", dpb.ROLLOUT_POLICY_ALL_AT_ONCE)
    assert first.created_by.id == world.tenant.admin_operator_id
    await expect_failure(world.gov.deployments.GetActiveDeployment(dpb.GetActiveDeploymentRequest(
        template_id=first.template_id, environment_id=first.environment_id)),
        grpc.StatusCode.NOT_FOUND, "NO_ACTIVE_DEPLOYMENT")
    activated = await world.activate(first.deployment_id)
    assert activated.deployment.status == ACTIVE and not activated.HasField("retired_deployment")
    assert activated.deployment.HasField("activate_time")
    active = (await world.gov.deployments.GetActiveDeployment(dpb.GetActiveDeploymentRequest(
        template_id=first.template_id, environment_id=first.environment_id))).deployment
    assert active == activated.deployment
    v2 = await world.version()
    second = await world.create(v2.id)
    assert second.previous_version_id == world.agents.version.id
    swapped = await world.activate(second.deployment_id, etag=second.etag)
    assert swapped.deployment.status == ACTIVE
    assert swapped.retired_deployment.deployment_id == first.deployment_id
    assert swapped.retired_deployment.status == RETIRED and swapped.retired_deployment.HasField("retire_time")
    assert (await world.get(first.deployment_id)).status == RETIRED
    await expect_failure(world.activate(first.deployment_id), grpc.StatusCode.FAILED_PRECONDITION,
                         "DEPLOYMENT_NOT_PENDING")
    assert [r.type for r in await records(world.governance, world.tenant.tenant.id, first.deployment_id)] == [
        CR.CHANGE_RECORD_TYPE_DEPLOYMENT_CREATED, CR.CHANGE_RECORD_TYPE_DEPLOYMENT_ACTIVATED]
    listed = (await world.gov.deployments.ListDeployments(dpb.ListDeploymentsRequest(
        template_id=first.template_id, statuses=[RETIRED]))).deployments
    assert [d.deployment_id for d in listed] == [first.deployment_id]
    page = await world.gov.deployments.ListDeployments(dpb.ListDeploymentsRequest(
        template_id=first.template_id, page_size=1))
    assert [d.deployment_id for d in page.deployments] == [second.deployment_id] and page.next_page_token
    rest = await world.gov.deployments.ListDeployments(dpb.ListDeploymentsRequest(
        template_id=first.template_id, page_size=1, page_token=page.next_page_token))
    assert [d.deployment_id for d in rest.deployments] == [first.deployment_id] and not rest.next_page_token


async def test_activation_retires_only_the_same_templates_deployment(world: World) -> None:
    other_template = (await world.tenant.admin.agents.CreateAgentTemplate(agents_pb2.CreateAgentTemplateRequest(
        project_id=world.agents.project.id, slug=f"tpl-{secrets.token_hex(4)}", name="Other"))).agent_template
    other_version = await world.version(template_id=other_template.id)
    other = await world.create(other_version.id, template_id=other_template.id)
    await world.activate(other.deployment_id)
    other_env = (await world.tenant.admin.tenancy.CreateEnvironment(tenancy_pb2.CreateEnvironmentRequest(
        name=f"env-{secrets.token_hex(4)}", type=tenancy_pb2.ENVIRONMENT_TYPE_DEV))).environment
    elsewhere = await world.create(env_id=other_env.id)
    await world.activate(elsewhere.deployment_id)
    mine = await world.create()
    resp = await world.activate(mine.deployment_id)
    assert not resp.HasField("retired_deployment")
    assert (await world.get(other.deployment_id)).status == ACTIVE
    assert (await world.get(elsewhere.deployment_id)).status == ACTIVE


async def test_create_refusals(world: World) -> None:
    draft = await world.version(agents_pb2.VERSION_STATE_CANDIDATE)
    failed = await expect_failure(world.create(draft.id), grpc.StatusCode.FAILED_PRECONDITION, "VERSION_NOT_APPROVED")
    assert failed.metadata["version_state"] == "CANDIDATE"
    other_template = (await world.tenant.admin.agents.CreateAgentTemplate(agents_pb2.CreateAgentTemplateRequest(
        project_id=world.agents.project.id, slug=f"tpl-{secrets.token_hex(4)}", name="Other"))).agent_template
    failed = await expect_failure(world.create(template_id=other_template.id), grpc.StatusCode.INVALID_ARGUMENT,
                                  "INVALID_FIELDS")
    assert "deployment.target_version_id" in failed.violations
    await expect_failure(world.create(env_id="env_missing"), grpc.StatusCode.NOT_FOUND, "ENVIRONMENT_NOT_FOUND")
    failed = await expect_failure(world.gov.deployments.CreateDeployment(dpb.CreateDeploymentRequest(
        deployment=dpb.Deployment(rollout_policy=dpb.ROLLOUT_POLICY_CANARY))), grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELDS")
    assert {"deployment.template_id", "deployment.environment_id", "deployment.target_version_id",
            "deployment.canary_percent"} <= set(failed.violations)
    failed = await expect_failure(world.gov.deployments.ListDeployments(dpb.ListDeploymentsRequest(page_size=-1)),
                                  grpc.StatusCode.INVALID_ARGUMENT)
    assert "page_size" in failed.violations


async def test_prod_activation_needs_an_approved_activation_approval(governance: Any, tenant: TenantContext) -> None:
    prod = await approved_version(tenant.admin, tenancy_pb2.ENVIRONMENT_TYPE_PROD)
    w = World(tenant, governance, governance.client(tenant.admin_key), prod, [])
    try:
        dep = await w.create()
        await expect_failure(w.activate(dep.deployment_id), grpc.StatusCode.FAILED_PRECONDITION, "APPROVAL_REQUIRED")
        approval = (await w.gov.approvals.RequestApproval(apb.RequestApprovalRequest(
            action_type=apb.APPROVAL_ACTION_TYPE_DEPLOYMENT_ACTIVATION, target_id=dep.deployment_id,
            risk=common_pb2.RISK_LEVEL_MEDIUM, justification="release"))).approval
        assert approval.project_id == prod.project.id
        assert approval.expire_time.ToDatetime() - approval.create_time.ToDatetime() == \
            timedelta(hours=24)
        await expect_failure(w.activate(dep.deployment_id, approval_id=approval.approval_id),
                             grpc.StatusCode.FAILED_PRECONDITION, "APPROVAL_NOT_APPROVED")
        approver_id, approver = await w.client("approver")
        await approver.approvals.DecideApproval(apb.DecideApprovalRequest(
            approval_id=approval.approval_id, verdict=apb.APPROVAL_VERDICT_APPROVE, reason="ok"))
        other = await w.create()
        await expect_failure(w.activate(other.deployment_id, approval_id=approval.approval_id),
                             grpc.StatusCode.FAILED_PRECONDITION, "APPROVAL_MISMATCH")
        # An approval approved in time but used after its expiry is refused.
        late = (await w.gov.approvals.RequestApproval(apb.RequestApprovalRequest(
            action_type=apb.APPROVAL_ACTION_TYPE_DEPLOYMENT_ACTIVATION, target_id=other.deployment_id,
            risk=common_pb2.RISK_LEVEL_LOW))).approval
        await approver.approvals.DecideApproval(apb.DecideApprovalRequest(
            approval_id=late.approval_id, verdict=apb.APPROVAL_VERDICT_APPROVE))

        async def age(s: Any) -> None:
            await s.execute(update(models.Approval).where(models.Approval.id == late.approval_id)
                            .values(expires_at=utcnow() - timedelta(seconds=1)))
        await governance.db.run(age)
        await expect_failure(w.activate(other.deployment_id, approval_id=late.approval_id),
                             grpc.StatusCode.FAILED_PRECONDITION, "APPROVAL_EXPIRED")
        done = (await w.activate(dep.deployment_id, approval_id=approval.approval_id)).deployment
        assert (done.status, done.approval_id, done.approved_by.id) == (ACTIVE, approval.approval_id, approver_id)
    finally:
        for c in [w.gov, *w.clients]:
            await c.close()


async def test_rollback_rebinds_instances_to_the_previous_version(world: World, registry: Any) -> None:
    admin = world.tenant.admin
    first = await world.create()
    await world.activate(first.deployment_id)
    await expect_failure(world.rollback(first.deployment_id), grpc.StatusCode.FAILED_PRECONDITION,
                         "NO_PREVIOUS_VERSION")
    v2 = await world.version()
    second = await world.create(v2.id)
    await expect_failure(world.rollback(second.deployment_id), grpc.StatusCode.FAILED_PRECONDITION,
                         "DEPLOYMENT_NOT_ACTIVE")
    await world.activate(second.deployment_id)
    on_v2 = [(await admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=v2.id, environment_id=world.agents.environment.id, name=f"i{i}"))).agent_instance
        for i in range(2)]
    other_env = (await admin.tenancy.CreateEnvironment(tenancy_pb2.CreateEnvironmentRequest(
        name=f"env-{secrets.token_hex(4)}", type=tenancy_pb2.ENVIRONMENT_TYPE_DEV))).environment
    elsewhere = (await admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=v2.id, environment_id=other_env.id, name="elsewhere"))).agent_instance
    rid = f"rb-{secrets.token_hex(4)}"
    resp = await world.rollback(second.deployment_id, request_id=rid)
    assert resp.rebound_instance_count == 2
    assert (resp.deployment.status, resp.deployment.target_version_id, resp.deployment.rollback_of) == (
        ACTIVE, world.agents.version.id, second.deployment_id)
    assert resp.deployment.previous_version_id == v2.id
    assert resp.rolled_back_deployment.status == RETIRED
    assert await world.rollback(second.deployment_id, request_id=rid) == resp  # replay
    for inst in on_v2:
        got = (await admin.agents.GetAgentInstance(agents_pb2.GetAgentInstanceRequest(id=inst.id))).agent_instance
        assert got.version_id == world.agents.version.id
    untouched = (await admin.agents.GetAgentInstance(agents_pb2.GetAgentInstanceRequest(id=elsewhere.id))).agent_instance
    assert untouched.version_id == v2.id
    active = (await world.gov.deployments.GetActiveDeployment(dpb.GetActiveDeploymentRequest(
        template_id=second.template_id, environment_id=second.environment_id))).deployment
    assert active.deployment_id == resp.deployment.deployment_id
    types = [r.type for r in await records(world.governance, world.tenant.tenant.id, second.deployment_id)]
    assert types[-1] == CR.CHANGE_RECORD_TYPE_DEPLOYMENT_ROLLED_BACK
    # The registry wrote its own record of each rebinding.
    rebinds = [r for r in await registry_records(registry, world.tenant.tenant.id)
               if r.type == CR.CHANGE_RECORD_TYPE_REGISTRY_UPDATED and r.target_type == "agent_instance"]
    assert {r.instance_id for r in rebinds} == {i.id for i in on_v2}


async def test_rbac_per_rpc(world: World) -> None:
    dep = await world.create()
    _, auditor = await world.client("auditor")
    _, operator = await world.client("operator")  # deployments:write, not :activate
    _, nobody = await world.client()
    await expect_failure(world.create(client=auditor), grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION")
    await expect_failure(world.activate(dep.deployment_id, client=operator), grpc.StatusCode.PERMISSION_DENIED,
                         "MISSING_PERMISSION")
    await expect_failure(auditor.deployments.RollbackDeployment(dpb.RollbackDeploymentRequest(
        deployment_id=dep.deployment_id)), grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION")
    for call in (nobody.deployments.GetDeployment(dpb.GetDeploymentRequest(deployment_id=dep.deployment_id)),
                 nobody.deployments.ListDeployments(dpb.ListDeploymentsRequest()),
                 nobody.deployments.GetActiveDeployment(dpb.GetActiveDeploymentRequest(
                     template_id=dep.template_id, environment_id=dep.environment_id))):
        await expect_failure(call, grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION")
    assert (await world.create(client=operator)).status == PENDING
    assert (await auditor.deployments.GetDeployment(dpb.GetDeploymentRequest(
        deployment_id=dep.deployment_id))).deployment == dep


async def test_other_tenant_sees_not_found_and_replays(world: World, registry: Any, system_admin: Any) -> None:
    rid = f"dep-{secrets.token_hex(4)}"
    dep = await world.create(request_id=rid)
    assert await world.create(request_id=rid) == dep
    other = await make_tenant(registry, system_admin)
    try:
        async with ArmClient(world.governance.address, other.admin_key) as stranger:
            for call in (stranger.deployments.GetDeployment(dpb.GetDeploymentRequest(deployment_id=dep.deployment_id)),
                         world.activate(dep.deployment_id, client=stranger),
                         stranger.deployments.RollbackDeployment(dpb.RollbackDeploymentRequest(
                             deployment_id=dep.deployment_id))):
                await expect_failure(call, grpc.StatusCode.NOT_FOUND, "DEPLOYMENT_NOT_FOUND")
            await expect_failure(world.create(client=stranger), grpc.StatusCode.NOT_FOUND)
            assert not (await stranger.deployments.ListDeployments(dpb.ListDeploymentsRequest())).deployments
    finally:
        await other.admin.close()
    assert (await world.get(dep.deployment_id)).status == PENDING


async def test_rollback_to_a_retired_version_is_refused_before_anything_changes(world: World) -> None:
    first = await world.create()
    await world.activate(first.deployment_id)
    v2 = await world.version()
    second = await world.create(v2.id)
    await world.activate(second.deployment_id)
    for state in (agents_pb2.VERSION_STATE_DEPRECATED, agents_pb2.VERSION_STATE_RETIRED):
        await world.tenant.admin.agents.TransitionAgentVersion(agents_pb2.TransitionAgentVersionRequest(
            id=world.agents.version.id, to_state=state))
    failed = await expect_failure(world.rollback(second.deployment_id), grpc.StatusCode.FAILED_PRECONDITION,
                                  "PREVIOUS_VERSION_NOT_DEPLOYABLE")
    assert failed.metadata["version_state"] == "RETIRED"
    assert (await world.get(second.deployment_id)).status == ACTIVE


async def test_an_interrupted_rollback_resumes(world: World) -> None:
    """Step 1 (ROLLING_BACK + successor) committed, then the process died before the registry
    call: calling RollbackDeployment again finishes the same rollback."""
    admin = world.tenant.admin
    first = await world.create()
    await world.activate(first.deployment_id)
    v2 = await world.version()
    second = await world.create(v2.id)
    await world.activate(second.deployment_id)
    inst = (await admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=v2.id, environment_id=world.agents.environment.id, name="i"))).agent_instance
    caller = Principal(tenant_id=world.tenant.tenant.id, actor_type="OPERATOR",
                       actor_id=world.tenant.admin_operator_id, api_key_id="k",
                       grants=(Grant("deployments:write"),))
    store = DeploymentStore(world.governance.db, world.governance.component.approvals)
    begun = await world.governance.db.run(lambda s: store.begin_rollback(
        s, caller, dpb.RollbackDeploymentRequest(deployment_id=second.deployment_id)))
    assert (await world.get(second.deployment_id)).status == D.DEPLOYMENT_STATUS_ROLLING_BACK
    resumed = await world.rollback(second.deployment_id)
    assert resumed.deployment.deployment_id == begun.deployment.deployment_id
    assert (resumed.rolled_back_deployment.status, resumed.rebound_instance_count) == (RETIRED, 1)
    got = (await admin.agents.GetAgentInstance(agents_pb2.GetAgentInstanceRequest(id=inst.id))).agent_instance
    assert got.version_id == world.agents.version.id
    listed = (await world.gov.deployments.ListDeployments(dpb.ListDeploymentsRequest(
        template_id=second.template_id, statuses=[ACTIVE]))).deployments
    assert [d.deployment_id for d in listed] == [begun.deployment.deployment_id]
