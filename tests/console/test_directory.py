"""Directory in a real browser: data made through the gRPC API shows up (templates, versions with
genome, hash and integrity, instances, identities), and a version is promoted with its button."""

from __future__ import annotations

import secrets
from typing import Any

from arm.registry.v1 import agents_pb2, tenancy_pb2
from arm_console.views.directory import PAGE_SIZE
from tests.conftest import TenantContext
from tests.console.conftest import Ui
from tests.helpers import approved_version, genome, walk_version


async def test_directory_shows_the_fleet_and_promotes_a_version(ui: Ui, tenant: TenantContext) -> None:
    admin = tenant.admin
    agents = await approved_version(admin)
    legacy = f"legacy-{secrets.token_hex(4)}"
    inst = (await admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="billing-bot",
        legacy_agent_id=legacy))).agent_instance
    await admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
        id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))
    await admin.agents.RecordHeartbeat(agents_pb2.RecordHeartbeatRequest(id=inst.id))
    candidate = (await admin.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(
        template_id=agents.template.id, genome=genome(), parent_version_id=agents.version.id,
        notes="faster prompts"))).agent_version
    candidate = await walk_version(admin, candidate.id, agents_pb2.VERSION_STATE_CANDIDATE)
    identity = agents_pb2.AgentIdentity(name=f"ident-{secrets.token_hex(3)}", soul_content="I pay invoices.",
                                        tools_notes="payments.send only", template_id=agents.template.id,
                                        description="The billing agent")
    await admin.agents.UpsertAgentIdentity(agents_pb2.UpsertAgentIdentityRequest(agent_identity=identity))

    await ui.sign_in(tenant.admin_key)
    await ui.goto("/directory/templates")
    table = ui.page.get_by_test_id("templates")
    await table.get_by_text(agents.template.slug).wait_for()
    await ui.screenshot("directory-templates")

    await table.get_by_role("link", name=agents.template.name).click()
    versions = ui.page.get_by_test_id("versions")
    await versions.get_by_text(f"v{candidate.number}").wait_for()
    assert "CANDIDATE" in await versions.inner_text()
    assert "VERIFIED" in await versions.inner_text()
    assert legacy in await ui.page.get_by_test_id("template-instances").inner_text()

    # The version's drawer: genome, hash, integrity and the allowed next steps as buttons.
    await versions.get_by_role("link", name=f"v{candidate.number}").click()
    drawer = ui.page.get_by_test_id("drawer")
    await drawer.wait_for()
    text = await drawer.inner_text()
    assert candidate.genome_hash in text and "VERIFIED" in text
    assert candidate.genome["promptBundleHash"] in await drawer.get_by_test_id("genome").inner_text()
    buttons = [b.strip() for b in await drawer.locator("button[name=to_state]").all_inner_texts()]
    assert buttons == ["Approve", "Back to draft"]
    await ui.screenshot("directory-version")

    await drawer.locator("#reason").fill("passed the eval suite")
    await drawer.get_by_role("button", name="Approve").click()
    await ui.page.get_by_text(f"Version {candidate.number} is now APPROVED").wait_for()
    after = (await admin.agents.GetAgentVersion(agents_pb2.GetAgentVersionRequest(id=candidate.id))).agent_version
    assert after.state == agents_pb2.VERSION_STATE_APPROVED
    assert [b.strip() for b in await ui.page.get_by_test_id("drawer").locator("button[name=to_state]")
            .all_inner_texts()] == ["Deprecate"]

    # A step the service refuses (here: the version moved on since the page was loaded) comes
    # back to the page with the reason.
    await admin.agents.TransitionAgentVersion(agents_pb2.TransitionAgentVersionRequest(
        id=candidate.id, to_state=agents_pb2.VERSION_STATE_DEPRECATED, reason="elsewhere"))
    asked: list[str] = []

    async def accept(dialog: Any) -> None:  # destructive steps ask first
        asked.append(dialog.message)
        await dialog.accept()

    ui.page.once("dialog", accept)
    await ui.page.get_by_test_id("drawer").get_by_role("button", name="Deprecate").click()
    flash = ui.page.locator(".flash.error")
    await flash.wait_for()
    assert "Aborted" in await flash.inner_text() and "/directory/templates/" in ui.page.url
    assert asked == [f"Deprecate version {candidate.number}?"]

    # Instances: state, environment, legacy id, last heartbeat, transitions.
    await ui.goto(f"/directory/instances?ref={legacy}")
    rows = ui.page.get_by_test_id("instances")
    await rows.get_by_text("billing-bot").click()
    drawer = ui.page.get_by_test_id("drawer")
    assert "ACTIVE" in await drawer.get_by_test_id("instance-state").inner_text()
    assert agents.environment.name in await drawer.inner_text()
    assert "never" not in await drawer.inner_text()  # it has a heartbeat
    await ui.screenshot("directory-instance")
    await drawer.locator("#ireason").fill("maintenance window")
    await drawer.get_by_role("button", name="Pause").click()
    await ui.page.get_by_text("is now PAUSED").wait_for()
    paused = (await admin.agents.GetAgentInstance(agents_pb2.GetAgentInstanceRequest(id=inst.id))).agent_instance
    assert paused.state == agents_pb2.INSTANCE_STATE_PAUSED

    await ui.goto("/directory/identities")
    await ui.page.get_by_test_id("identities").get_by_text(identity.name).click()
    assert "I pay invoices." in await ui.page.get_by_test_id("drawer").inner_text()
    await ui.screenshot("directory-identities")


async def test_directory_empty_states_filters_and_pages(ui: Ui, tenant: TenantContext) -> None:
    await ui.sign_in(tenant.admin_key)
    await ui.goto("/directory/templates")
    assert "No agent templates" in await ui.page.inner_text("main")
    await ui.goto("/directory/instances")
    assert "arm instances create" in await ui.page.inner_text("main")
    projects = [(await tenant.admin.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
        slug=f"p{i}-{secrets.token_hex(3)}", name=f"Project {i}"))).project for i in range(2)]
    for i in range(PAGE_SIZE + 1):
        await tenant.admin.agents.CreateAgentTemplate(agents_pb2.CreateAgentTemplateRequest(
            project_id=projects[0].id, slug=f"bulk-{i}-{secrets.token_hex(3)}", name=f"Bulk {i}"))
    await tenant.admin.agents.CreateAgentTemplate(agents_pb2.CreateAgentTemplateRequest(
        project_id=projects[1].id, slug=f"lone-{secrets.token_hex(3)}", name="Lone"))
    await ui.goto("/directory/templates")
    rows = ui.page.get_by_test_id("templates").locator("tbody tr")
    assert await rows.count() == PAGE_SIZE
    await ui.page.get_by_test_id("next-page").click()
    await ui.page.wait_for_url("**page=*")
    assert await rows.count() == PAGE_SIZE + 2 - PAGE_SIZE
    await ui.goto("/directory/templates")
    await ui.page.locator("select[name=project]").select_option(projects[1].id)
    await ui.page.get_by_role("button", name="Filter").click()
    await ui.page.wait_for_url(f"**project={projects[1].id}")
    assert [t.split("\n")[0] for t in await rows.all_inner_texts()] == ["Lone"]
