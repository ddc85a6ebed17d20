"""Telemetry and its neighbours: governance's Check decisions arrive in telemetry exactly once
(with instance and version), also when governance's outbox delivers them again; COST_TICK events
feed governance's spend ledger once per event."""

from __future__ import annotations

import asyncio
import secrets

from sqlalchemy import text

from arm.governance.v1 import decision_pb2, policy_pb2
from arm.registry.v1 import agents_pb2
from arm.telemetry.v1 import events_pb2, telemetry_pb2
from arm_common.db import rowcount
from tests.conftest import new_database_spec, start_governance, stop_governance
from tests.helpers import approved_version
from tests.telemetry.conftest import event

T = events_pb2


async def active_instance(client) -> agents_pb2.AgentInstance:  # type: ignore[no-untyped-def]
    agents = await approved_version(client)
    inst = (await client.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="a"))).agent_instance
    return (await client.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
        id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))).agent_instance


async def decision_events(c, instance_id: str, want: int) -> list[events_pb2.OpEvent]:  # type: ignore[no-untyped-def]
    filt = telemetry_pb2.EventFilter(instance_id=instance_id, types=[
        T.OP_EVENT_TYPE_DECISION_MADE, T.OP_EVENT_TYPE_TOOL_CALL_BLOCKED])
    for _ in range(400):
        got = list((await c.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(filter=filt))).events)
        if len(got) >= want:
            return got
        await asyncio.sleep(0.05)
    return got


async def test_check_produces_exactly_one_decision_event(registry, telemetry, tenant, tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = new_database_spec(registry.backend, tmp_path, "governance")
    gov = await start_governance(spec, registry, {"ARM_TELEMETRY_ADDRESS": telemetry.address,
                                                  "ARM_OUTBOX_POLL_S": "0.05"})
    try:
        inst = await active_instance(tenant.admin)
        async with gov.client(tenant.admin_key) as g, telemetry.client(tenant.admin_key) as c:
            await g.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(envelope=policy_pb2.PolicyEnvelope(
                name="deny db", scope=policy_pb2.POLICY_SCOPE_TENANT, mode=policy_pb2.POLICY_MODE_ENFORCE,
                tool_rules=[policy_pb2.ToolRule(tool="db.**", effect=policy_pb2.DECISION_DENY)])))
            run = f"run-{secrets.token_hex(4)}"
            allowed = await g.decisions.Check(decision_pb2.CheckRequest(
                instance_id=inst.id, tool_name="fs.read", run_id=run, tool_call_id="tc-1"))
            denied = await g.decisions.Check(decision_pb2.CheckRequest(
                instance_id=inst.id, tool_name="db.drop", run_id=run, tool_call_id="tc-2"))
            assert allowed.decision == policy_pb2.DECISION_ALLOW and denied.decision == policy_pb2.DECISION_DENY
            got = await decision_events(c, inst.id, 2)
            by_type = {e.type: e for e in got}
            assert len(got) == 2 and set(by_type) == {T.OP_EVENT_TYPE_DECISION_MADE, T.OP_EVENT_TYPE_TOOL_CALL_BLOCKED}
            for e in got:
                assert (e.instance_id, e.version_id, e.run_id) == (inst.id, inst.version_id, run)
                assert e.tenant_id == tenant.tenant.id
            assert by_type[T.OP_EVENT_TYPE_DECISION_MADE].payload["decision_id"] == allowed.decision_id
            assert by_type[T.OP_EVENT_TYPE_TOOL_CALL_BLOCKED].payload["decision_id"] == denied.decision_id
            trace = await c.telemetry.GetRunTrace(telemetry_pb2.GetRunTraceRequest(run_id=run))
            assert {(d.decision_id, d.outcome) for d in trace.decisions} == {
                (allowed.decision_id, telemetry_pb2.DECISION_OUTCOME_ALLOW),
                (denied.decision_id, telemetry_pb2.DECISION_OUTCOME_DENY)}

            # The outbox delivers again (as after a crash between delivery and marking): still one each.
            async with gov.db.transaction() as s:
                n = rowcount(await s.execute(text("update outbox_messages set delivered_at = null "
                                                  "where topic = 'op_event'")))
            assert n >= 2
            gov.component.relays[1].notify()
            for _ in range(400):
                async with gov.db.transaction() as s:
                    left = (await s.execute(text("select count(*) from outbox_messages where topic = 'op_event' "
                                                 "and delivered_at is null"))).scalar_one()
                if left == 0:
                    break
                await asyncio.sleep(0.05)
            assert left == 0
            again = await decision_events(c, inst.id, 2)
            assert sorted(e.event_id for e in again) == sorted(e.event_id for e in got)
    finally:
        await stop_governance(gov)



async def test_run_trace_names_the_approval_a_decision_asked_for(registry, telemetry, tenant, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """NEEDS_APPROVAL decisions carry their approval id into telemetry, also when a repeated
    tool call id is answered with the approval created the first time."""
    spec = new_database_spec(registry.backend, tmp_path, "governance")
    gov = await start_governance(spec, registry, {"ARM_TELEMETRY_ADDRESS": telemetry.address,
                                                  "ARM_OUTBOX_POLL_S": "0.05"})
    try:
        inst = await active_instance(tenant.admin)
        async with gov.client(tenant.admin_key) as g, telemetry.client(tenant.admin_key) as c:
            await g.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(envelope=policy_pb2.PolicyEnvelope(
                name="ask for mail", scope=policy_pb2.POLICY_SCOPE_TENANT, mode=policy_pb2.POLICY_MODE_ENFORCE,
                tool_rules=[policy_pb2.ToolRule(tool="email.send", effect=policy_pb2.DECISION_NEEDS_APPROVAL)])))
            run = f"run-{secrets.token_hex(4)}"
            asks = [await g.decisions.Check(decision_pb2.CheckRequest(
                instance_id=inst.id, tool_name="email.send", run_id=run, tool_call_id="tc-mail"))
                for _ in range(2)]
            plain = await g.decisions.Check(decision_pb2.CheckRequest(
                instance_id=inst.id, tool_name="fs.read", run_id=run, tool_call_id="tc-read"))
            assert {a.decision for a in asks} == {policy_pb2.DECISION_NEEDS_APPROVAL}
            assert asks[0].approval_id and asks[1].approval_id == asks[0].approval_id
            await decision_events(c, inst.id, 3)
            trace = await c.telemetry.GetRunTrace(telemetry_pb2.GetRunTraceRequest(run_id=run))
            assert {(d.decision_id, d.approval_id) for d in trace.decisions} == {
                (asks[0].decision_id, asks[0].approval_id), (asks[1].decision_id, asks[0].approval_id),
                (plain.decision_id, "")}
    finally:
        await stop_governance(gov)

async def test_cost_ticks_feed_the_spend_ledger_once(telemetry, governance, tenant) -> None:  # type: ignore[no-untyped-def]
    inst = await active_instance(tenant.admin)
    ticks = [event(T.OP_EVENT_TYPE_COST_TICK, instance_id=inst.id, run_id="r1", payload={"amount_usd": 0.25})
             for _ in range(4)]
    async with telemetry.client(tenant.admin_key) as c:
        first = await c.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=ticks))
        again = await c.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=ticks))
    assert (first.accepted_count, again.duplicate_count) == (4, 4)
    rows: list = []  # type: ignore[type-arg]
    for _ in range(400):
        async with governance.db.transaction() as s:
            rows = (await s.execute(text("select idempotency_key, amount_usd, instance_id, tenant_id "
                                         "from spend_ledger where instance_id = :i"), {"i": inst.id})).all()
        if len(rows) >= 4:
            break
        await asyncio.sleep(0.05)
    assert sorted(r[0] for r in rows) == sorted(t.event_id for t in ticks)
    assert {(r[1], r[3]) for r in rows} == {(0.25, tenant.tenant.id)}
    # Delivering the spend reports again adds nothing (the ledger is idempotent on the event id).
    async with telemetry.db.transaction() as s:
        await s.execute(text("update outbox_messages set delivered_at = null where topic = 'spend'"))
    telemetry.component.relay.notify()
    for _ in range(400):
        async with telemetry.db.transaction() as s:
            left = (await s.execute(text("select count(*) from outbox_messages where topic = 'spend' "
                                         "and delivered_at is null"))).scalar_one()
        if left == 0:
            break
        await asyncio.sleep(0.05)
    async with governance.db.transaction() as s:
        n = (await s.execute(text("select count(*) from spend_ledger where instance_id = :i"), {"i": inst.id})).scalar_one()
    assert left == 0 and n == 4
