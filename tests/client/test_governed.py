"""Governed tools through the SDK against real servers (issue 11 item 2): each outcome of a
governed call with `Arm` (async) and `ArmSync` (threads), approvals decided by operators while
the agent waits (HIGH: two of them), denied and expired approvals, the non-blocking mode and its
resume, a tool's own exception, governance unreachable (fail closed / open), typed errors.

The baseline decides here (no envelopes): declared LOW → ALLOW, HIGH → NEEDS_APPROVAL with two
decisions required, CRITICAL → DENY."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from typing import Any

import grpc
import pytest

from arm.governance.v1 import approvals_pb2 as apb
from arm_client import (
    ApprovalExpired,
    ApprovalPending,
    ApprovalRejected,
    ApprovalTimeout,
    Arm,
    GovernanceUnavailable,
    InvalidArgument,
    ToolDenied,
)
from arm_common.tables import utcnow
from tests.client.conftest import Agent
from tests.processes import free_port


class Ledger:
    """What the tools actually did."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def add(self, name: str, value: Any) -> None:
        with self.lock:
            self.calls.append((name, value))


async def pending_approval(agent: Agent, tool: str) -> apb.Approval:
    """Waits until the agent's approval for `tool` exists and returns it."""
    while True:
        resp = await agent.admin.approvals.ListApprovals(apb.ListApprovalsRequest(instance_id=agent.instance_id))
        found = [a for a in resp.approvals if a.tool_name == tool]
        if found:
            assert len(found) == 1, found
            return found[0]
        await asyncio.sleep(0.02)


async def watching(agent: Agent, approval_id: str, count: int = 1) -> None:
    """Waits until `count` WatchApproval streams follow the approval (the agent is waiting on it)."""
    changes = agent.governance.component.changes
    while len(changes._subscribers) < count:  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)


# --- async ---------------------------------------------------------------------------------------

async def test_allow_runs_the_tool_and_returns_its_result(agent: Agent) -> None:
    arm = agent.arm()
    ledger = Ledger()

    @arm.governed(risk="LOW")
    async def search(query: str, limit: int = 3) -> list[str]:
        ledger.add("search", (query, limit))
        return [query] * limit

    assert await search("invoices") == ["invoices"] * 3
    assert ledger.calls == [("search", ("invoices", 3))]
    assert search.arm_tool.name == "search"  # type: ignore[attr-defined]
    decision = await arm.check("search", {"query": "x"}, risk="LOW")
    assert decision.allowed and decision.decision_id and decision.effective_risk == "LOW"


async def test_deny_raises_tool_denied_and_never_runs_the_tool(agent: Agent) -> None:
    arm = agent.arm()
    ledger = Ledger()

    @arm.governed(name="db.drop", risk="CRITICAL")
    async def drop(table: str) -> None:
        ledger.add("drop", table)

    with pytest.raises(ToolDenied) as exc:
        await drop("users")
    assert ledger.calls == []
    assert exc.value.decision_id.startswith("dec")
    assert [r.code for r in exc.value.reasons][0] == "BASELINE_CRITICAL"
    assert exc.value.reason == "BASELINE_CRITICAL" and exc.value.sentences
    assert exc.value.tool == "db.drop"


async def test_a_plain_function_is_governed_and_awaited(agent: Agent) -> None:
    arm = agent.arm()

    def add(a: int, b: int) -> int:
        return a + b

    governed_add = arm.governed(add, name="math.add", risk="LOW")
    assert await governed_add(2, 3) == 5  # type: ignore[misc]  # with Arm a plain tool is awaited


async def test_tools_own_exception_is_reraised_unchanged(agent: Agent) -> None:
    arm = agent.arm()
    boom = KeyError("no such row")

    @arm.governed(risk="LOW")
    async def lookup(key: str) -> str:
        raise boom

    with pytest.raises(KeyError) as exc:
        await lookup("k")
    assert exc.value is boom


async def test_approval_while_waiting_needs_both_approvers_and_runs_once(agent: Agent) -> None:
    arm = agent.arm()
    ledger = Ledger()

    @arm.governed(name="payments.send", risk="HIGH", approval_timeout_s=60)
    async def pay(to: str, amount: float) -> str:
        ledger.add("pay", (to, amount))
        return f"paid {amount} to {to}"

    task = asyncio.create_task(pay("acct-7", 120.0))
    approval = await pending_approval(agent, "payments.send")
    assert approval.required_decisions == 2
    await watching(agent, approval.approval_id)
    first = await agent.decide(approval.approval_id, approvers=1)
    assert first.status in (apb.APPROVAL_STATUS_PENDING, apb.APPROVAL_STATUS_ESCALATED)
    assert not task.done() and ledger.calls == []
    await agent.approvers[1].approvals.DecideApproval(apb.DecideApprovalRequest(
        approval_id=approval.approval_id, verdict=apb.APPROVAL_VERDICT_APPROVE))
    assert await task == "paid 120.0 to acct-7"
    assert ledger.calls == [("pay", ("acct-7", 120.0))]
    used = (await agent.admin.approvals.GetApproval(apb.GetApprovalRequest(approval_id=approval.approval_id))).approval
    assert used.HasField("consume_time")


async def test_denied_approval_raises_rejected(agent: Agent) -> None:
    arm = agent.arm()
    ledger = Ledger()

    @arm.governed(name="deploy.prod", risk="HIGH", approval_timeout_s=60)
    async def deploy() -> None:
        ledger.add("deploy", None)

    task = asyncio.create_task(deploy())
    approval = await pending_approval(agent, "deploy.prod")
    await agent.decide(approval.approval_id, apb.APPROVAL_VERDICT_DENY, approvers=1)
    with pytest.raises(ApprovalRejected) as exc:
        await task
    assert exc.value.approval_id == approval.approval_id and exc.value.status == "DENIED"
    assert ledger.calls == []


async def test_expired_approval_raises_expired(agent: Agent) -> None:
    arm = agent.arm()

    @arm.governed(name="email.send_all", risk="HIGH", approval_timeout_s=60)
    async def blast() -> None:
        raise AssertionError("must not run")

    task = asyncio.create_task(blast())
    approval = await pending_approval(agent, "email.send_all")
    await agent.set_approval(approval.approval_id, expires_at=utcnow() - timedelta(seconds=1))
    await agent.governance.component.approvals.sweep()
    with pytest.raises(ApprovalExpired) as exc:
        await task
    assert exc.value.approval_id == approval.approval_id


async def test_wait_bounded_by_the_timeout(agent: Agent) -> None:
    arm = agent.arm()

    @arm.governed(name="payments.refund", risk="HIGH", approval_timeout_s=0.2)
    async def refund() -> None:
        raise AssertionError("must not run")

    with pytest.raises(ApprovalTimeout) as exc:
        await refund()
    assert isinstance(exc.value, ApprovalPending) and exc.value.approval_id
    approval = (await agent.admin.approvals.GetApproval(apb.GetApprovalRequest(approval_id=exc.value.approval_id))
                ).approval
    assert approval.status == apb.APPROVAL_STATUS_PENDING  # still open on the server


async def test_non_blocking_raises_pending_then_resumes_with_the_approval(agent: Agent) -> None:
    arm = agent.arm()
    ledger = Ledger()

    @arm.governed(name="payments.send", risk="HIGH", wait=False)
    async def pay(to: str, amount: float) -> str:
        ledger.add("pay", (to, amount))
        return "ok"

    with pytest.raises(ApprovalPending) as exc:
        await pay("acct-9", 5.0)
    approval_id = exc.value.approval_id
    assert approval_id and ledger.calls == []
    # Resumed before anyone decided: still pending, and no Check was made (so no DENY logged).
    with arm.approval(approval_id), pytest.raises(ApprovalPending) as again:
        await pay("acct-9", 5.0)
    assert again.value.approval_id == approval_id
    await agent.decide(approval_id)
    with arm.approval(approval_id):
        assert await pay("acct-9", 5.0) == "ok"
    assert ledger.calls == [("pay", ("acct-9", 5.0))]


async def test_governance_unreachable_fails_closed_by_default_open_when_asked(agent: Agent) -> None:
    arm = Arm(env={**agent.env(), "ARM_GOVERNANCE_ADDRESS": f"127.0.0.1:{free_port()}"}, timeout_s=2)
    try:
        ledger = Ledger()

        @arm.governed(risk="LOW")
        async def closed() -> None:
            ledger.add("closed", None)

        @arm.governed(risk="LOW", fail_open=True)
        async def opened() -> str:
            ledger.add("open", None)
            return "ran"

        with pytest.raises(GovernanceUnavailable) as exc:
            await closed()
        assert exc.value.code == grpc.StatusCode.UNAVAILABLE
        assert await opened() == "ran"
        assert ledger.calls == [("open", None)]
    finally:
        await arm.close()


async def test_errors_are_typed_with_reason_violations_and_request_id(agent: Agent) -> None:
    arm = agent.arm()
    with pytest.raises(InvalidArgument) as exc:
        await arm.check("")
    err = exc.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "tool_name" in {v.field for v in err.field_violations}
    assert err.request_id.startswith("req-") and err.reason
    assert err.error_info is not None and err.error_info.domain == "arm.dev"


# --- sync (ArmSync, plain threads) ---------------------------------------------------------------

async def test_sync_outcomes(agent: Agent) -> None:
    arm = agent.arm_sync()
    ledger = Ledger()

    @arm.governed(risk="LOW")
    def search(query: str) -> str:
        ledger.add("search", query)
        return query.upper()

    @arm.governed(name="db.drop", risk="CRITICAL")
    def drop(table: str) -> None:
        ledger.add("drop", table)

    @arm.governed(name="payments.send", risk="HIGH", wait=False)
    def pay_later(amount: float) -> str:
        ledger.add("pay_later", amount)
        return "paid"

    boom = ValueError("bad input")

    @arm.governed(risk="LOW")
    def fails() -> None:
        raise boom

    def in_thread() -> dict[str, Any]:
        out: dict[str, Any] = {"search": search("abc")}
        try:
            drop("users")
        except ToolDenied as exc:
            out["denied"] = exc.reasons[0].code
        try:
            pay_later(3.0)
        except ApprovalPending as exc:
            out["pending"] = exc.approval_id
        try:
            fails()
        except ValueError as exc:
            out["failed"] = exc
        return out

    out = await asyncio.to_thread(in_thread)
    assert out["search"] == "ABC" and out["denied"] == "BASELINE_CRITICAL" and out["failed"] is boom
    await agent.decide(out["pending"])

    def resume() -> str:
        with arm.approval(out["pending"]):
            return str(pay_later(3.0))

    assert await asyncio.to_thread(resume) == "paid"
    assert ledger.calls == [("search", "abc"), ("pay_later", 3.0)]


async def test_sync_waits_for_the_approval(agent: Agent) -> None:
    arm = agent.arm_sync()
    ledger = Ledger()

    @arm.governed(name="payments.send", risk="HIGH", approval_timeout_s=60)
    def pay(amount: float) -> str:
        ledger.add("pay", amount)
        return "paid"

    task = asyncio.create_task(asyncio.to_thread(pay, 7.0))
    approval = await pending_approval(agent, "payments.send")
    await agent.decide(approval.approval_id)
    assert await task == "paid"
    assert ledger.calls == [("pay", 7.0)]


async def test_sync_governs_an_async_tool(agent: Agent) -> None:
    arm = agent.arm_sync()

    @arm.governed(risk="LOW")
    async def fetch(url: str) -> str:
        return url[::-1]

    assert await fetch("abc") == "cba"
