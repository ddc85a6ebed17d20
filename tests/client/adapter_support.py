"""What the framework adapter tests share: a policy with one tool of each outcome, the ledger of
what tools really did, and reading a run's events back from telemetry."""

from __future__ import annotations

from typing import Any

from arm.governance.v1 import policy_pb2
from arm.telemetry.v1 import events_pb2 as ev
from arm.telemetry.v1 import telemetry_pb2
from tests.client.conftest import Agent

ALLOWED, DENIED, GUARDED = "crm.lookup", "db.drop", "payments.send"


async def three_way_policy(agent: Agent) -> None:
    """crm.lookup ALLOW, db.drop DENY, payments.send NEEDS_APPROVAL (HIGH by classification:
    two approvers), on the agent's version."""
    await agent.admin.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(
            name="adapters", scope=policy_pb2.POLICY_SCOPE_VERSION, scope_id=agent.agents.version.id,
            mode=policy_pb2.POLICY_MODE_ENFORCE, active=True, tool_rules=[
                policy_pb2.ToolRule(tool=ALLOWED, effect=policy_pb2.DECISION_ALLOW),
                policy_pb2.ToolRule(tool=DENIED, effect=policy_pb2.DECISION_DENY,
                                    description="dropping tables is never allowed"),
                policy_pb2.ToolRule(tool=GUARDED, effect=policy_pb2.DECISION_NEEDS_APPROVAL)])))


class Ledger:
    """What the tools actually did, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def add(self, name: str, value: Any) -> None:
        self.calls.append((name, value))

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)


async def tool_events(agent: Agent, run_id: str) -> list[tuple[str, str]]:
    """(event type, tool name) of the run's TOOL_CALL_* events, in trace order."""
    out: list[tuple[str, str]] = []
    token = ""
    while True:
        resp = await agent.admin.telemetry.GetRunTrace(telemetry_pb2.GetRunTraceRequest(
            run_id=run_id, page_size=500, page_token=token))
        for e in resp.events:
            name = ev.OpEventType.Name(e.type).removeprefix("OP_EVENT_TYPE_")
            if name.startswith("TOOL_CALL_") and "tool_name" in e.payload:
                out.append((name, e.payload["tool_name"]))
        token = resp.next_page_token
        if not token:
            return out
