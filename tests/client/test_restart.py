"""An agent waiting for an approval keeps waiting across a governance restart (issue 11 item 2):
governance on a fixed port is stopped and started again on the same database while the governed
call waits; the operators decide on the new process; the tool runs exactly once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from arm.governance.v1 import approvals_pb2 as apb
from tests.client.conftest import make_agent
from tests.client.test_governed import Ledger, pending_approval
from tests.conftest import RegistryServer, TenantContext, new_database_spec, start_governance, stop_governance
from tests.processes import free_port
from tests.telemetry.conftest import TelemetryServer


async def test_a_governance_restart_while_waiting_does_not_lose_the_wait(
        registry: RegistryServer, tenant: TenantContext, telemetry: TelemetryServer, tmp_path: Path) -> None:
    spec = new_database_spec(registry.backend, tmp_path, "governance")
    env = {"ARM_GOVERNANCE_LISTEN": f"127.0.0.1:{free_port()}"}
    governance = await start_governance(spec, registry, env)
    agent = await make_agent(tenant, governance, telemetry)
    arm = agent.arm(approval_timeout_s=120)
    ledger = Ledger()

    @arm.governed(name="payments.send", risk="HIGH")
    async def pay(amount: float) -> str:
        ledger.add("pay", amount)
        return "paid"

    try:
        task = asyncio.create_task(pay(42.0))
        approval = await pending_approval(agent, "payments.send")
        changes = governance.component.changes
        while not changes._subscribers:  # type: ignore[attr-defined]  # the agent is watching
            await asyncio.sleep(0.01)
        await stop_governance(governance, drop=False)
        governance = await start_governance(spec, registry, env)
        agent.governance = governance
        # One operator decides while the agent re-connects, the second after it is back to watching.
        # (wait_for_ready: the operator's channel is still backing off from the stop.)
        await agent.approvers[0].approvals.DecideApproval(apb.DecideApprovalRequest(
            approval_id=approval.approval_id, verdict=apb.APPROVAL_VERDICT_APPROVE), wait_for_ready=True, timeout=30)
        assert not task.done()
        changes = governance.component.changes
        while not changes._subscribers:  # type: ignore[attr-defined]
            await asyncio.sleep(0.01)
        await agent.approvers[1].approvals.DecideApproval(apb.DecideApprovalRequest(
            approval_id=approval.approval_id, verdict=apb.APPROVAL_VERDICT_APPROVE), wait_for_ready=True, timeout=30)
        assert await asyncio.wait_for(task, 60) == "paid"
        assert ledger.calls == [("pay", 42.0)]
    finally:
        await arm.close()
        for client in [agent.admin, *agent.approvers]:
            await client.close()
        await stop_governance(governance)
