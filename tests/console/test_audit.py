"""Audit in a real browser: the tenant's change records (made by gRPC calls) listed newest first
with the chain's verification on top; filtered by type, actor, target and date range; a record's
drawer; the export downloads the filtered trail as JSON lines. Another tenant's record is not found."""

from __future__ import annotations

import asyncio
import json
import secrets
from datetime import timedelta

from arm.common.v1 import common_pb2
from arm.governance.v1 import audit_pb2, policy_pb2
from arm.registry.v1 import tenancy_pb2
from arm_client import ArmClient
from arm_console.views import audit as audit_view
from tests.conftest import TenantContext, make_tenant
from tests.console.conftest import ConsoleStack, Ui
from tests.console.view_helpers import api, assert_not_found

CR = common_pb2.ChangeRecordType


async def wait_for_record(client: ArmClient, type_: int, target_id: str) -> common_pb2.ChangeRecord:
    """The record once the outbox relay has appended it to the chain (bounded wait)."""
    for _ in range(200):
        resp = await client.audit.ListChangeRecords(audit_pb2.ListChangeRecordsRequest(
            filter=audit_pb2.ChangeRecordFilter(types=[type_], target_id=target_id), page_size=10))
        if resp.records:
            return resp.records[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {CR.Name(type_)} record of {target_id} within 10 s")


async def test_audit_filters_verifies_and_exports(ui: Ui, tenant: TenantContext, console: ConsoleStack,
                                                  system_admin, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(audit_view, "VERIFY_TTL_S", 3600.0)  # the kept verification outlives a slow test
    client = api(console, tenant.admin_key)
    project = (await client.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
        slug=f"p-{secrets.token_hex(4)}", name="Payments"))).project
    env = (await client.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(name=f"guard-{secrets.token_hex(3)}", scope=policy_pb2.POLICY_SCOPE_TENANT,
                                           default_effect=policy_pb2.DECISION_ALLOW),
        reason="baseline for the audit test"))).envelope
    policy_record = await wait_for_record(client, CR.CHANGE_RECORD_TYPE_POLICY_CREATED, env.envelope_id)
    project_record = await wait_for_record(client, CR.CHANGE_RECORD_TYPE_PROJECT_CREATED, project.id)

    await ui.sign_in(tenant.admin_key)
    await ui.goto("/audit")
    chain = ui.page.get_by_test_id("chain")
    assert "Chain verified: intact." in await chain.inner_text()
    records = ui.page.get_by_test_id("records")
    await records.get_by_text(policy_record.summary).wait_for()
    assert project_record.summary in await records.inner_text()
    await ui.screenshot("audit")

    # Filter by type: only the policy record remains.
    await ui.page.select_option("select[name=type]", "POLICY_CREATED")
    await ui.page.get_by_role("button", name="Filter").click()
    await ui.page.wait_for_url("**type=POLICY_CREATED**")
    text = await ui.page.get_by_test_id("records").inner_text()
    assert policy_record.summary in text and project_record.summary not in text
    # …and by actor and target, then the record's drawer.
    await ui.page.fill("input[name=actor]", tenant.admin_operator_id)
    await ui.page.fill("input[name=target]", env.envelope_id)
    await ui.page.get_by_role("button", name="Filter").click()
    rows = ui.page.get_by_test_id("records").locator("tbody tr")
    assert await rows.count() == 1
    await rows.get_by_role("link").click()
    drawer = ui.page.get_by_test_id("drawer")
    text = await drawer.inner_text()
    assert policy_record.hash in text and "baseline for the audit test" in text
    await ui.screenshot("audit-record")

    # The date range: the record's own day keeps it, the day before leaves nothing.
    day = policy_record.occur_time.ToDatetime().date()
    await ui.goto(f"/audit?target={env.envelope_id}&from={day.isoformat()}&to={day.isoformat()}")
    assert await ui.page.get_by_test_id("records").locator("tbody tr").count() == 1
    before = (day - timedelta(days=1)).isoformat()
    await ui.goto(f"/audit?target={env.envelope_id}&from={before}&to={before}")
    assert "No change records match these filters" in await ui.page.inner_text("main")

    # The verification is kept for the session (VerifyChain reads the whole trail); "Verify now"
    # runs it again and the newer records count.
    await ui.goto("/audit")
    checked = (await client.audit.VerifyChain(audit_pb2.VerifyChainRequest())).records_checked
    later = (await client.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
        slug=f"p-{secrets.token_hex(4)}", name="Later"))).project
    await wait_for_record(client, CR.CHANGE_RECORD_TYPE_PROJECT_CREATED, later.id)
    now_checked = (await client.audit.VerifyChain(audit_pb2.VerifyChainRequest())).records_checked
    assert now_checked > checked
    await ui.goto("/audit")
    assert f"{now_checked} records checked" not in await ui.page.get_by_test_id("chain").inner_text()
    await ui.page.get_by_test_id("verify-now").click()
    await ui.page.wait_for_url("**/audit")
    assert f"{now_checked} records checked" in await ui.page.get_by_test_id("chain").inner_text()

    # Export of the filtered trail: JSON lines, the same records as the API's export.
    await ui.goto(f"/audit?type=PROJECT_CREATED&target={project.id}")
    async with ui.page.expect_download() as info:
        await ui.page.get_by_test_id("export").click()
    download = await info.value
    assert download.suggested_filename.endswith(".jsonl")
    lines = (await download.path()).read_text().splitlines()
    assert [json.loads(line)["recordId"] for line in lines] == [project_record.record_id]
    # Unfiltered, it is the whole trail as the API exports it (what `arm audit export` writes).
    whole = b"".join([chunk.data async for chunk in client.audit.ExportChangeRecords(
        audit_pb2.ExportChangeRecordsRequest())])
    response = await ui.context.request.get(ui.base + "/audit/export")
    assert response.ok and response.headers["content-type"].startswith("application/x-ndjson")
    api_lines, console_lines = whole.splitlines(), (await response.body()).splitlines()
    assert len(api_lines) >= 2 and console_lines[:len(api_lines)] == api_lines  # (the trail only grows)

    # Another tenant's record is not found.
    other = await make_tenant(console.registry, system_admin)
    other_client = api(console, other.admin_key)
    try:
        theirs = await wait_for_record(other_client, CR.CHANGE_RECORD_TYPE_TENANT_CREATED, other.tenant.id)
        await assert_not_found(ui, f"/audit?record={theirs.record_id}")
    finally:
        await other_client.close()
        await other.admin.close()
        await client.close()
