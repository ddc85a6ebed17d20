"""Deployments in a real browser: the active version per template and environment and the history,
made through the gRPC API; a pending deployment activated and an active one rolled back, each
behind its confirmation page; in PROD, activation takes the id of an approved activation approval
(refused, and said so, until it is approved); another tenant's deployment is not found."""

from __future__ import annotations

from arm.common.v1 import common_pb2
from arm.governance.v1 import approvals_pb2 as apb
from arm.governance.v1 import deployments_pb2 as dpb
from arm.registry.v1 import agents_pb2, tenancy_pb2
from tests.conftest import TenantContext, make_tenant
from tests.console.conftest import ConsoleStack, Ui
from tests.console.view_helpers import active_agent, api, assert_not_found
from tests.helpers import approved_version, genome, operator_key, walk_version


async def test_deployments_activate_and_roll_back(ui: Ui, tenant: TenantContext, console: ConsoleStack,
                                                  system_admin) -> None:  # type: ignore[no-untyped-def]
    client = api(console, tenant.admin_key)
    agent = await active_agent(client)
    agents = agent.agents
    v2 = (await client.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(
        template_id=agents.template.id, genome=genome(), parent_version_id=agents.version.id))).agent_version
    v2 = await walk_version(client, v2.id, agents_pb2.VERSION_STATE_APPROVED)

    async def deploy(version_id: str, activate: bool = True) -> dpb.Deployment:
        d = (await client.deployments.CreateDeployment(dpb.CreateDeploymentRequest(deployment=dpb.Deployment(
            template_id=agents.template.id, environment_id=agents.environment.id, target_version_id=version_id),
            reason="release"))).deployment
        if activate:
            d = (await client.deployments.ActivateDeployment(dpb.ActivateDeploymentRequest(
                deployment_id=d.deployment_id, reason="release"))).deployment
        return d

    first = await deploy(agents.version.id)
    pending = await deploy(v2.id, activate=False)

    await ui.sign_in(tenant.admin_key)
    await ui.goto("/deployments")
    active = ui.page.get_by_test_id("active-deployments")
    row = await active.locator("tbody tr").filter(has_text=agents.environment.name).inner_text()
    assert f"v{agents.version.number}" in row, row
    assert "PENDING" in await ui.page.get_by_test_id("deployments").inner_text()
    await ui.screenshot("deployments")

    # Activate the pending v2, behind a confirmation.
    await ui.goto(f"/deployments?deployment={pending.deployment_id}")
    drawer = ui.page.get_by_test_id("drawer")
    await drawer.locator("#reason").fill("v2 passed staging")
    await drawer.get_by_role("button", name="Activate…").click()
    confirm = ui.page.get_by_test_id("confirm")
    assert f"Activate v{v2.number}" in await confirm.inner_text()
    await confirm.get_by_role("button", name="Yes, activate").click()
    await ui.page.get_by_text("Deployment activated.").wait_for()
    now = (await client.deployments.GetActiveDeployment(dpb.GetActiveDeploymentRequest(
        template_id=agents.template.id, environment_id=agents.environment.id))).deployment
    assert now.deployment_id == pending.deployment_id and now.previous_version_id == agents.version.id

    # Roll it back: cancel first (nothing changes), then confirm.
    drawer = ui.page.get_by_test_id("drawer")
    assert "ACTIVE" in await drawer.get_by_test_id("deployment-status").inner_text()
    await drawer.locator("#reason").fill("error rate up")
    await drawer.get_by_role("button", name=f"Roll back to v{agents.version.number}…").click()
    confirm = ui.page.get_by_test_id("confirm")
    assert "error rate up" in await confirm.inner_text()
    await ui.screenshot("deployments-confirm-rollback")
    await confirm.get_by_role("link", name="Cancel").click()
    still = (await client.deployments.GetActiveDeployment(dpb.GetActiveDeploymentRequest(
        template_id=agents.template.id, environment_id=agents.environment.id))).deployment
    assert still.deployment_id == pending.deployment_id
    drawer = ui.page.get_by_test_id("drawer")
    await drawer.get_by_role("button", name=f"Roll back to v{agents.version.number}…").click()
    await ui.page.get_by_test_id("confirm").get_by_role("button", name="Yes, roll back").click()
    await ui.page.get_by_text("Rolled back: the previous version is active again").wait_for()
    after = (await client.deployments.GetActiveDeployment(dpb.GetActiveDeploymentRequest(
        template_id=agents.template.id, environment_id=agents.environment.id))).deployment
    assert after.target_version_id == agents.version.id and after.rollback_of == pending.deployment_id
    instance = (await client.agents.GetAgentInstance(agents_pb2.GetAgentInstanceRequest(id=agent.instance.id))
                ).agent_instance
    assert instance.version_id == agents.version.id
    rolled = (await client.deployments.GetDeployment(dpb.GetDeploymentRequest(
        deployment_id=pending.deployment_id))).deployment
    assert rolled.status == dpb.DEPLOYMENT_STATUS_RETIRED
    assert "(rollback)" in await ui.page.get_by_test_id("active-deployments").inner_text()
    await ui.screenshot("deployments-rolled-back")
    assert first.deployment_id != after.deployment_id

    # Another tenant's deployment is not found.
    other = await make_tenant(console.registry, system_admin)
    other_client = api(console, other.admin_key)
    try:
        theirs = await approved_version(other_client)
        d = (await other_client.deployments.CreateDeployment(dpb.CreateDeploymentRequest(deployment=dpb.Deployment(
            template_id=theirs.template.id, environment_id=theirs.environment.id,
            target_version_id=theirs.version.id)))).deployment
        await assert_not_found(ui, f"/deployments?deployment={d.deployment_id}")
        # Posted with this session's CSRF token, their id is not found either; without a token, refused.
        token = await ui.page.locator("input[name=csrf_token]").first.input_value()
        form = {"action": "activate", "reason": "x", "confirmed": "yes"}
        for step in ("confirm", "apply"):
            response = await ui.context.request.post(f"{ui.base}/deployments/{d.deployment_id}/{step}",
                                                     form={**form, "csrf_token": token}, max_redirects=0)
            if step == "apply":  # refused by the service: back to the deployment, which is not found
                assert response.status == 303 and response.headers["location"].endswith(d.deployment_id)
            else:
                assert response.status == 404
        response = await ui.context.request.post(f"{ui.base}/deployments/{after.deployment_id}/apply",
                                                 form={**form, "action": "rollback"}, max_redirects=0)
        assert response.status == 403
        assert (await other_client.deployments.GetDeployment(dpb.GetDeploymentRequest(
            deployment_id=d.deployment_id))).deployment.status == dpb.DEPLOYMENT_STATUS_PENDING
        still_active = (await client.deployments.GetActiveDeployment(dpb.GetActiveDeploymentRequest(
            template_id=agents.template.id, environment_id=agents.environment.id))).deployment
        assert still_active.deployment_id == after.deployment_id
    finally:
        await other_client.close()
        await other.admin.close()
        await client.close()


async def test_deployments_empty_state_says_what_to_do(ui: Ui, tenant: TenantContext) -> None:
    await ui.sign_in(tenant.admin_key)
    await ui.goto("/deployments")
    assert "arm deployments create" in await ui.page.inner_text("main")


async def test_prod_activation_takes_the_approved_activation_approval(ui: Ui, tenant: TenantContext,
                                                                      console: ConsoleStack) -> None:
    client = api(console, tenant.admin_key)
    _, approver_key = await operator_key(tenant.admin, "approver")
    approver = api(console, approver_key)
    try:
        prod = await approved_version(client, tenancy_pb2.ENVIRONMENT_TYPE_PROD)
        d = (await client.deployments.CreateDeployment(dpb.CreateDeploymentRequest(deployment=dpb.Deployment(
            template_id=prod.template.id, environment_id=prod.environment.id,
            target_version_id=prod.version.id)))).deployment
        approval = (await client.approvals.RequestApproval(apb.RequestApprovalRequest(
            action_type=apb.APPROVAL_ACTION_TYPE_DEPLOYMENT_ACTIVATION, target_id=d.deployment_id,
            risk=common_pb2.RISK_LEVEL_MEDIUM, justification="first PROD release"))).approval

        async def activate_with(approval_id: str) -> None:
            await ui.goto(f"/deployments?deployment={d.deployment_id}")
            drawer = ui.page.get_by_test_id("drawer")
            await drawer.locator("#approval_id").fill(approval_id)
            await drawer.get_by_role("button", name="Activate…").click()
            confirm = ui.page.get_by_test_id("confirm")
            assert "PROD environment" in await confirm.inner_text()
            await confirm.get_by_role("button", name="Yes, activate").click()

        await ui.sign_in(tenant.admin_key)
        # Not approved yet: refused, said so, and still pending.
        await activate_with(approval.approval_id)
        await ui.page.locator(".flash.error").wait_for()
        assert "Failed precondition" in await ui.page.locator(".flash.error").inner_text()
        assert "PENDING" in await ui.page.get_by_test_id("deployment-status").inner_text()
        await ui.screenshot("deployments-prod-refused")
        await approver.approvals.DecideApproval(apb.DecideApprovalRequest(
            approval_id=approval.approval_id, verdict=apb.APPROVAL_VERDICT_APPROVE, reason="go"))
        await activate_with(approval.approval_id)
        await ui.page.get_by_text("Deployment activated.").wait_for()
        assert approval.approval_id in await ui.page.get_by_test_id("drawer").inner_text()
        done = (await client.deployments.GetDeployment(dpb.GetDeploymentRequest(deployment_id=d.deployment_id))
                ).deployment
        assert done.status == dpb.DEPLOYMENT_STATUS_ACTIVE and done.approval_id == approval.approval_id
    finally:
        await approver.close()
        await client.close()
