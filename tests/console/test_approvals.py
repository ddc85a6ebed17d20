"""Approvals in a real browser: a Check that needs approval shows up in the inbox with its risk,
tool, arguments digest, justification and countdown; two operators approve it in their own
browsers; the first one's page follows the second decision live (server-sent events); the
waiting Check then turns ALLOW; the request moves to History."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from google.protobuf import struct_pb2

from arm.governance.v1 import approvals_pb2, decision_pb2, policy_pb2
from arm.registry.v1 import agents_pb2
from tests.conftest import TenantContext
from tests.console.conftest import ConsoleStack, Ui, new_ui
from tests.helpers import approved_version, operator_key

ARGS = {"amount": 120, "to": "acct-7", "memo": "invoice 12"}


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


async def test_two_operators_approve_and_the_waiting_check_turns_allow(
        ui: Ui, browser: Any, console: ConsoleStack, tenant: TenantContext) -> None:
    admin = tenant.admin
    agents = await approved_version(admin)
    inst = (await admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="payer"))).agent_instance
    await admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
        id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))
    gov = console.governance.client(tenant.admin_key)
    try:
        async def check(**kw: Any) -> decision_pb2.CheckResponse:
            return await gov.decisions.Check(decision_pb2.CheckRequest(
                instance_id=inst.id, tool_name="payments.send", arguments=struct(ARGS), **kw))

        asked = await check(tool_call_id=f"tc-{secrets.token_hex(4)}", estimated_cost_usd=120)
        assert asked.decision == policy_pb2.DECISION_NEEDS_APPROVAL and asked.approval_id
        approval = (await gov.approvals.GetApproval(approvals_pb2.GetApprovalRequest(
            approval_id=asked.approval_id))).approval
        assert approval.required_decisions == 2
        first_id, first_key = await operator_key(admin, "approver")
        _, second_key = await operator_key(admin, "approver")

        # The first approver's inbox.
        await ui.sign_in(first_key)
        await ui.goto("/approvals")
        row = ui.page.locator(f"tr[data-approval='{asked.approval_id}']")
        text = await row.inner_text()
        assert "HIGH" in text and "payments.send" in text and approval.argument_digest[:14] in text
        assert "0/2" in text
        assert await row.locator("[data-expires]").get_attribute("data-expires")
        await ui.screenshot("approvals-inbox")

        await row.get_by_role("link").click()
        drawer = ui.page.get_by_test_id("drawer")
        assert "$120.00" in await drawer.inner_text()
        assert '"acct-7"' in await drawer.get_by_test_id("arguments").inner_text()
        await drawer.locator("#decision-reason").fill("invoice checked")
        await drawer.get_by_role("button", name="Approve").click()
        await ui.page.get_by_text("1 more approval(s) needed").wait_for()
        assert "1 of 2" in await ui.page.get_by_test_id("approval-progress").inner_text()
        waiting = await check(approval_id=asked.approval_id)
        assert (waiting.decision, waiting.reasons[0].code) == (policy_pb2.DECISION_NEEDS_APPROVAL, "APPROVAL_PENDING")

        # The second approver, in another browser context; the first one's page stays open and
        # must follow the decision live, without a reload.
        # A locator wait: a wait_for_function expression that has to poll is evaluated with eval(),
        # which the console's Content-Security-Policy (script-src 'self') rightly refuses.
        await ui.page.locator(".live-dot.on").wait_for(state="attached")
        second = await new_ui(browser, console)
        try:
            await second.sign_in(second_key)
            await second.goto(f"/approvals/{asked.approval_id}")
            await second.page.locator("#decision-reason").fill("second pair of eyes: fine")
            await second.page.get_by_test_id("drawer").get_by_role("button", name="Approve").click()
            await second.page.get_by_text("the request is APPROVED").wait_for()
            await second.screenshot("approvals-decided")
            assert not second.unexpected_errors(), second.errors
        finally:
            await second.context.close()
        status = ui.page.get_by_test_id("approval-status")
        await status.get_by_text("APPROVED").wait_for(timeout=15_000)
        decisions = await ui.page.get_by_test_id("decisions").inner_text()
        assert "invoice checked" in decisions and "second pair of eyes: fine" in decisions
        assert "(you)" in decisions
        assert "Nothing more to do" in await ui.page.get_by_test_id("drawer").inner_text()
        await ui.page.locator(f"tr[data-approval='{asked.approval_id}']").wait_for(state="detached")  # left the inbox
        await ui.screenshot("approvals-live")

        allowed = await check(approval_id=asked.approval_id)
        assert allowed.decision == policy_pb2.DECISION_ALLOW and allowed.approval_id == asked.approval_id

        await ui.goto("/approvals/history?status=APPROVED")
        assert await ui.page.locator(f"tr[data-approval='{asked.approval_id}']").count() == 1
        await ui.goto("/approvals")
        assert await ui.page.locator(f"tr[data-approval='{asked.approval_id}']").count() == 0
        assert first_id
    finally:
        await gov.close()


async def test_an_operator_request_is_denied_with_a_reason_and_kept_in_history(
        ui: Ui, console: ConsoleStack, tenant: TenantContext) -> None:
    await ui.sign_in(tenant.admin_key)
    await ui.goto("/approvals")
    assert "Nothing waits for a decision" in await ui.page.get_by_test_id("empty").inner_text()
    await ui.screenshot("approvals-empty")

    admin = tenant.admin
    agents = await approved_version(admin)
    inst = (await admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="suspect"))).agent_instance
    _, requester_key = await operator_key(admin, "operator")
    requester = console.governance.client(requester_key)
    try:
        asked = (await requester.approvals.RequestApproval(approvals_pb2.RequestApprovalRequest(
            action_type=approvals_pb2.APPROVAL_ACTION_TYPE_INSTANCE_QUARANTINE, instance_id=inst.id,
            risk=2, justification="odd outbound traffic", rollback_plan="reactivate after review"))).approval
    finally:
        await requester.close()
    await ui.goto("/approvals?risk=MEDIUM")
    row = ui.page.locator(f"tr[data-approval='{asked.approval_id}']")
    assert "odd outbound traffic" in await row.inner_text()
    await ui.goto("/approvals?risk=HIGH")  # the filter leaves it out
    assert await ui.page.locator(f"tr[data-approval='{asked.approval_id}']").count() == 0
    created = asked.create_time.ToDatetime()
    day, next_day = created.strftime("%Y-%m-%d"), (created + timedelta(days=1)).strftime("%Y-%m-%d")
    await ui.goto(f"/approvals?from={day}&to={day}")
    assert await ui.page.locator(f"tr[data-approval='{asked.approval_id}']").count() == 1
    await ui.goto(f"/approvals?from={next_day}")
    assert await ui.page.locator(f"tr[data-approval='{asked.approval_id}']").count() == 0
    await ui.goto(f"/approvals/{asked.approval_id}")
    drawer = ui.page.get_by_test_id("drawer")
    assert "reactivate after review" in await drawer.inner_text()
    await drawer.locator("#decision-reason").fill("traffic explained: a backup job")
    await drawer.get_by_role("button", name="Deny").click()
    await ui.page.get_by_text("the request is DENIED").wait_for()
    await ui.goto("/approvals/history?status=DENIED")
    assert "traffic explained" not in await ui.page.inner_text("main")  # reasons are in the drawer
    await ui.page.locator(f"tr[data-approval='{asked.approval_id}']").get_by_role("link").click()
    assert "traffic explained: a backup job" in await ui.page.get_by_test_id("decisions").inner_text()
    await ui.screenshot("approvals-history")
