"""Decisions recorded through RecordLocalDecisions get their opEvents the way a Check's do: derived
by governance's op_event relay from the logged decision rows (decisions/op_events.py), once per
decision id, also when the same decisions are recorded again."""

from __future__ import annotations

from arm.governance.v1 import decision_pb2, policy_pb2
from arm.telemetry.v1 import events_pb2
from arm_governance.decisions.op_events import waiting_op_events
from tests.client.conftest import Agent
from tests.client.test_local_decisions import _decision


async def test_recorded_local_decisions_get_one_op_event_each(agent: Agent) -> None:
    client = agent.governance.client(agent.key)
    allowed = _decision(agent.instance_id, policy_epoch=3)
    denied = _decision(agent.instance_id, decision=policy_pb2.DECISION_DENY)
    # 64 characters, the decisions table's limit: the batch's marker id (a prefix plus the first
    # decision id) would not fit the outbox's 64 and is hashed.
    denied.decision_id = "dec_" + "x" * 60
    request = decision_pb2.RecordLocalDecisionsRequest(decisions=[denied, allowed])
    first = await client.decisions.RecordLocalDecisions(request)
    again = await client.decisions.RecordLocalDecisions(request)
    assert (first.recorded, again.duplicates) == (2, 2)
    await client.close()

    events = await agent.governance.db.read(lambda s: waiting_op_events(s, agent.tenant.tenant.id))
    mine = {allowed.decision_id: allowed, denied.decision_id: denied}
    got = [e for e in events if e.payload["decision_id"] in mine]
    assert sorted(e.event_id for e in got) == sorted(f"evt-{i}" for i in mine)
    for event in got:
        decision = mine[event.payload["decision_id"]]
        blocked = decision.response.decision == policy_pb2.DECISION_DENY
        assert event.type == (events_pb2.OP_EVENT_TYPE_TOOL_CALL_BLOCKED if blocked
                              else events_pb2.OP_EVENT_TYPE_DECISION_MADE)
        assert (event.instance_id, event.tool_call_id, event.tenant_id) == (
            agent.instance_id, "tc-1", agent.tenant.tenant.id)
        assert event.occur_time == decision.response.decide_time
        assert event.payload["policy_epoch"] == decision.response.policy_epoch
        assert event.payload["tool_name"] == "files.read"
