"""Governance's logging of local decisions (`RecordLocalDecisions`, decisions/local_log.py), on
SQLite and PostgreSQL (there by COPY): the rows built per batch are what `Decider.pending` builds
for the same decision; a batch shipped again, overlapping, or twice at once logs each decision,
its opEvent and a DENY's POLICY_DENIED record exactly once; an id another tenant logged is
refused."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
from google.protobuf import json_format
from sqlalchemy import select

from arm.common.v1 import common_pb2
from arm.governance.v1 import decision_pb2, policy_pb2
from arm.registry.v1 import compat_pb2
from arm.telemetry.v1 import events_pb2
from arm_common.auth import Principal
from arm_common.decision_inputs import result_from_response
from arm_common.outbox import TOPIC_CHANGE_RECORD, TOPIC_OP_EVENT
from arm_governance import models
from arm_governance.decisions import local_log, reads, responses
from arm_governance.decisions.local import result_key
from arm_governance.decisions.log import DecisionLog, marker_id
from arm_governance.decisions.op_events import waiting_op_events
from arm_governance.decisions.service import Decider
from arm_governance.models import OUTBOX
from tests.client.conftest import Agent, make_agent
from tests.client.test_local_decisions import logged_counts
from tests.conftest import GovernanceServer, RegistryServer, make_tenant
from tests.helpers import expect_failure, governance_change_records
from tests.telemetry.conftest import TelemetryServer

ALLOW = decision_pb2.CheckResponse(
    decision=policy_pb2.DECISION_ALLOW, effective_risk=1, step=decision_pb2.DECISION_STEP_ENVELOPE,
    scope=policy_pb2.POLICY_SCOPE_VERSION, scope_id="ver_x", envelope_id="env_x", envelope_revision=2,
    rule_kind=policy_pb2.RULE_KIND_TOOL_RULE, rule_index=0, rule_description="fs.read",
    reasons=[policy_pb2.Reason(code="TOOL_RULE", message="fs.read is allowed")])
DENY = decision_pb2.CheckResponse(
    decision=policy_pb2.DECISION_DENY, effective_risk=2, step=decision_pb2.DECISION_STEP_LOCKED_RULE,
    scope=policy_pb2.POLICY_SCOPE_TENANT, scope_id="ten_x", envelope_id="env_y", envelope_revision=1,
    rule_kind=policy_pb2.RULE_KIND_TOOL_RULE, rule_index=1, rule_description="locked",
    reasons=[policy_pb2.Reason(code="TOOL_DENIED", message="db.drop* is denied")])


def _local(instance_id: str, response: decision_pb2.CheckResponse, i: int) -> decision_pb2.LocalDecision:
    item = decision_pb2.LocalDecision(decision_id=f"dec_{secrets.token_hex(12)}")
    item.request.CopyFrom(decision_pb2.CheckRequest(
        instance_id=instance_id, tool_name="db.drop_table" if response.decision == DENY.decision else "fs.read",
        declared_risk=1, run_id="run-1", tool_call_id=f"tc-{i}"))
    item.request.arguments.update({"path": f"/srv/{i}", "n": i})
    item.response.CopyFrom(response)
    item.response.decision_id = item.decision_id
    item.response.policy_epoch = 7
    item.response.decide_time.FromNanoseconds(1_765_000_000_123_456_789 + i)
    return item


def _without_record_id(payload: bytes) -> common_pb2.ChangeRecord:
    record = common_pb2.ChangeRecord.FromString(payload)
    record.ClearField("record_id")
    return record


def test_local_rows_are_what_check_logs() -> None:
    """The lean per-batch builder writes, field for field, what the decision path's
    `Decider.pending` writes for the same decision (the change record's id is random in both;
    the builder's record is a cached part's bytes then the decision's own, parsed as one)."""
    p = Principal(tenant_id="ten_aaaaaaaaaaaaaaaa", actor_type="AGENT", actor_id="ins_aaaaaaaaaaaaaaaa",
                  api_key_id="key_aaaaaaaaaaaaaaaa")
    resolved = compat_pb2.ResolvedAgent(
        tenant_id=p.tenant_id, instance_id=p.actor_id, project_id="prj_x", version_id="ver_x", template_id="tpl_x",
        environment_id="env_e", legacy_agent_id="legacy-1")
    agent = resolved.SerializeToString()
    items = [_local(p.actor_id, response, i) for i, response in enumerate([ALLOW, DENY, ALLOW, DENY, DENY])]
    # Another tool, without a tool call id (the record's target is then the decision id): its
    # POLICY_DENIED record is not the one built for the first tool.
    items[4].request.tool_name, items[4].request.tool_call_id = "db.truncate", ""
    items.append(items[0])  # the same id twice in a batch: built once
    keys = [result_key(item.response) for item in items]
    results = {key: result_from_response(decision_pb2.CheckResponse.FromString(key)) for key in keys}
    now = datetime(2026, 12, 7, 12, 0, 0)  # noqa: DTZ001 - naive UTC, as COPY takes it
    builder = local_log.LocalRows()
    rows, messages, parts = builder.build(p, resolved, agent, items, keys, [results[k] for k in keys], now)
    assert len(rows) == len(messages) == 5
    assert len(parts) == 2  # one shared response part per result, named by the rows
    builder.stored.update(parts)
    assert builder.build(p, resolved, agent, items, keys, [results[k] for k in keys], now)[2] == {}
    assert [len(m) for m in messages] == [0, 1, 0, 1, 1]  # a DENY's POLICY_DENIED record
    for item, key, row, out in zip(items, keys, rows, messages, strict=False):
        resp = item.response
        decided = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=resp.decide_time.seconds,
                                                               microseconds=resp.decide_time.nanos // 1000)
        pending = Decider.pending(Decider.__new__(Decider), p, item.request, resolved, agent, results[key],
                                  resp.policy_epoch, "", None, decided, item.decision_id)
        decisions, outbox = DecisionLog._rows([pending])
        expected = dict(decisions[0])
        got = dict(zip(local_log.DECISION_COLUMNS, row, strict=True))
        assert got.pop("decided_at") == expected.pop("decided_at").replace(tzinfo=None)
        # The stored response in two parts: the shared part's bytes, then the row's own fields.
        part = got.pop("response_part")
        assert part == responses.part_id(p.tenant_id, parts[part])
        own = decision_pb2.CheckResponse.FromString(got["response"])
        assert set(f.name for f, _ in own.ListFields()) <= {"decision_id", "policy_epoch", "decide_time"}
        whole = responses.response_bytes(SimpleNamespace(response=got.pop("response"), response_part=part), parts)
        assert (decision_pb2.CheckResponse.FromString(whole)
                == decision_pb2.CheckResponse.FromString(expected.pop("response")))
        assert got == expected
        # The opEvent: both write the marker row the relay derives it from, for the same id.
        marker, = (m for m in outbox if m["topic"] == TOPIC_OP_EVENT)
        assert local_log.op_events_marker(p.tenant_id, [item.decision_id], now)[:4] == (
            marker["message_id"], marker["topic"], marker["tenant_id"], marker["payload"])
        records = [m for m in outbox if m["topic"] != TOPIC_OP_EVENT]
        assert [m[1] for m in out] == [m["topic"] for m in records]
        if out:
            assert out[0][1] == TOPIC_CHANGE_RECORD
            assert _without_record_id(out[0][3]) == _without_record_id(records[0]["payload"])
        assert all(m[4] == now and m[5] == 0 and m[6] == now for m in out)


def test_cached_denial_records_are_bounded() -> None:
    """The POLICY_DENIED records cached per (result, actor, agent, tool) are bounded over all
    results by the builder's limit; a DENY of a tool no longer cached still gets its own record."""
    p = Principal(tenant_id="ten_aaaaaaaaaaaaaaaa", actor_type="AGENT", actor_id="ins_aaaaaaaaaaaaaaaa",
                  api_key_id="key_aaaaaaaaaaaaaaaa")
    resolved = compat_pb2.ResolvedAgent(tenant_id=p.tenant_id, instance_id=p.actor_id, project_id="prj_x",
                                        version_id="ver_x", template_id="tpl_x")
    items = [_local(p.actor_id, DENY, i) for i in range(5)]
    for i, item in enumerate(items):
        item.request.tool_name = f"db.tool_{i % 3}"
    keys = [result_key(item.response) for item in items]
    results = [result_from_response(decision_pb2.CheckResponse.FromString(key)) for key in keys]
    builder = local_log.LocalRows(limit=2)
    _, messages, _ = builder.build(p, resolved, resolved.SerializeToString(), items, keys, results,
                                   datetime(2026, 12, 7, 12, 0, 0))  # noqa: DTZ001 - naive UTC
    assert sum(len(part.denials) for part in builder._parts.values()) <= 2
    records = [common_pb2.ChangeRecord.FromString(out[0][3]) for out in messages]
    assert [r.summary.split(" ")[0] for r in records] == [f"db.tool_{i % 3}" for i in range(5)]
    assert [r.payload.fields["tool_name"].string_value for r in records] == [f"db.tool_{i % 3}" for i in range(5)]
    assert [r.target_id for r in records] == [f"tc-{i}" for i in range(5)]


async def _record(client: Any, items: list[decision_pb2.LocalDecision]) -> tuple[int, int]:
    got = await client.decisions.RecordLocalDecisions(decision_pb2.RecordLocalDecisionsRequest(decisions=items))
    return got.recorded, got.duplicates


async def test_a_batch_shipped_again_is_logged_once(agent: Agent) -> None:
    """A batch resent after a lost acknowledgment, a later batch overlapping it, and the same batch
    sent twice at once: every decision, its opEvent and a DENY's POLICY_DENIED record once
    (on PostgreSQL the resends go through the COPY path's fallback, the temporary table)."""
    client = agent.governance.client(agent.key)
    first = [_local(agent.instance_id, DENY if i % 3 == 2 else ALLOW, i) for i in range(6)]
    assert await _record(client, first) == (6, 0)
    assert await _record(client, first) == (0, 6)
    more = [_local(agent.instance_id, DENY if i % 3 == 2 else ALLOW, i) for i in range(6, 12)]
    assert await _record(client, first[3:] + more) == (6, 3)
    twins = [_local(agent.instance_id, DENY if i % 3 == 2 else ALLOW, i) for i in range(12, 20)]
    a, b = await asyncio.gather(_record(client, twins), _record(client, twins))
    assert a[0] + b[0] == len(twins) and a[0] + a[1] == b[0] + b[1] == len(twins)
    items = first + more + twins
    ids = [item.decision_id for item in items]
    assert await logged_counts(agent, ids) == dict.fromkeys(ids, 1)

    events = await agent.governance.db.read(lambda s: waiting_op_events(s, agent.tenant.tenant.id))
    mine = [e for e in events if e.payload.fields["decision_id"].string_value in ids]
    assert sorted(e.event_id for e in mine) == sorted(f"evt-{i}" for i in ids)
    assert {e.type for e in mine if e.tool_call_id.endswith(("-2", "-5"))} == {
        events_pb2.OP_EVENT_TYPE_TOOL_CALL_BLOCKED}
    # Each DENY's record once, in the audit trail or still waiting in the outbox.
    denied = await governance_change_records(agent.governance.db, agent.tenant.tenant.id)
    denied_ids = sorted(r.payload.fields["decision_id"].string_value for r in denied
                        if r.type == common_pb2.CHANGE_RECORD_TYPE_POLICY_DENIED
                        and r.payload.fields["decision_id"].string_value in ids)
    assert denied_ids == sorted(item.decision_id for item in items if item.response.decision == DENY.decision)
    await client.close()


async def test_a_decision_id_of_another_tenant_is_refused(agent: Agent, registry: RegistryServer,
                                                          system_admin: Any, governance: GovernanceServer,
                                                          telemetry: TelemetryServer) -> None:
    client = agent.governance.client(agent.key)
    item = _local(agent.instance_id, ALLOW, 0)
    assert await _record(client, [item]) == (1, 0)
    other = await make_agent(await make_tenant(registry, system_admin), governance, telemetry)
    theirs = _local(other.instance_id, ALLOW, 0)
    taken = _local(other.instance_id, ALLOW, 1)
    taken.decision_id = taken.response.decision_id = item.decision_id
    other_client = governance.client(other.key)
    await expect_failure(other_client.decisions.RecordLocalDecisions(
        decision_pb2.RecordLocalDecisionsRequest(decisions=[theirs, taken])),
        grpc.StatusCode.INVALID_ARGUMENT, "DECISION_ID_TAKEN")
    # Nothing of the refused batch was logged; their own id still goes in.
    assert await logged_counts(agent, [theirs.decision_id, item.decision_id]) == {item.decision_id: 1}
    assert await _record(other_client, [theirs]) == (1, 0)
    for c in (client, other_client, other.admin, *other.approvers):
        await c.close()


async def test_a_batch_whose_outbox_rows_fail_logs_none_of_its_decisions(agent: Agent) -> None:
    """The decisions and their outbox rows commit together (on PostgreSQL: the COPYs share one
    transaction): when the outbox write fails, here on the opEvents' marker id taken beforehand, no
    decision of the batch is logged, and the batch goes in whole once the obstacle is gone."""
    from arm_common.tables import utcnow

    client = agent.governance.client(agent.key)
    items = [_local(agent.instance_id, ALLOW, i) for i in range(3)]
    blocker = marker_id(items[0].decision_id)  # the row the batch's opEvents are derived from

    async def block(s: Any) -> None:
        now = utcnow()
        await s.execute(OUTBOX.insert().values(message_id=blocker, topic="test.blocker", tenant_id="ten_none",
                                               payload=b"", created_at=now, attempts=0, next_attempt_at=now))
    await agent.governance.db.run(block)
    try:
        await client.decisions.RecordLocalDecisions(decision_pb2.RecordLocalDecisionsRequest(decisions=items))
    except grpc.aio.AioRpcError as exc:
        assert exc.code() != grpc.StatusCode.OK
    else:
        raise AssertionError("the batch was accepted although its outbox rows could not be written")
    ids = [item.decision_id for item in items]
    assert await logged_counts(agent, ids) == {}

    async def unblock(s: Any) -> None:
        await s.execute(OUTBOX.delete().where(OUTBOX.c.message_id == blocker))
    await agent.governance.db.run(unblock)
    assert await _record(client, items) == (3, 0)
    assert await logged_counts(agent, ids) == dict.fromkeys(ids, 1)
    await client.close()


async def test_split_responses_read_back_whole(agent: Agent) -> None:
    """A local decision's row holds only its own response fields and names the shared part; the
    part is written once per result; GetDecision, ListDecisions, ExportDecisions and the opEvents
    read back the whole response, as the runtime stated it (decide time to the microsecond)."""
    client = agent.governance.client(agent.key)
    items = [_local(agent.instance_id, DENY if i % 3 == 2 else ALLOW, i) for i in range(6)]
    assert await _record(client, items) == (6, 0)
    items.append(_local(agent.instance_id, ALLOW, 6))
    assert await _record(client, items[:2] + items[-1:]) == (1, 2)
    items.append(_local(agent.instance_id, ALLOW, 7))
    assert await _record(client, items[-1:]) == (1, 0)
    ids = [item.decision_id for item in items]
    expected = {}
    for item in items:
        response = decision_pb2.CheckResponse()
        response.CopyFrom(item.response)
        response.decide_time.nanos = response.decide_time.nanos // 1000 * 1000
        expected[item.decision_id] = response

    d, t = models.DecisionRecord, models.DecisionResponsePart

    async def stored(s: Any) -> tuple[list[Any], list[Any]]:
        rows = (await s.execute(select(d.id, d.response, d.response_part).where(d.id.in_(ids)))).all()
        parts = (await s.execute(select(t.id, t.tenant_id).where(t.id.in_({r.response_part for r in rows})))).all()
        return rows, parts
    rows, parts = await agent.governance.db.read(stored)
    assert len(rows) == len(ids) and all(r.response_part and len(r.response) < 100 for r in rows)
    assert len(parts) == 2 and {p.tenant_id for p in parts} == {agent.tenant.tenant.id}

    admin = agent.admin
    for decision_id, response in expected.items():
        got = (await admin.decisions.GetDecision(decision_pb2.GetDecisionRequest(decision_id=decision_id))).decision
        assert got.response == response and got.decision_id == decision_id
    listed = (await admin.decisions.ListDecisions(decision_pb2.ListDecisionsRequest(
        filter=decision_pb2.DecisionFilter(run_id="run-1"), page_size=500))).decisions
    assert {x.decision_id: x.response for x in listed} == expected
    lines = []
    async for chunk in admin.decisions.ExportDecisions(decision_pb2.ExportDecisionsRequest(
            filter=decision_pb2.DecisionFilter(run_id="run-1"))):
        lines += chunk.data.decode().splitlines()
    exported = {x.decision_id: x for x in (json_format.Parse(line, decision_pb2.LoggedDecision()) for line in lines)}
    assert {k: v.response for k, v in exported.items()} == expected
    assert [reads.export_line(exported[x.decision_id]) for x in listed] == [reads.export_line(x) for x in listed]

    events = await agent.governance.db.read(lambda s: waiting_op_events(s, agent.tenant.tenant.id))
    mine = {e.payload.fields["decision_id"].string_value: e for e in events}
    for decision_id, response in expected.items():
        event = mine[decision_id]
        assert [v.string_value for v in event.payload.fields["reasons"].list_value.values] == [
            r.code for r in response.reasons]
        assert event.payload.fields["envelope_id"].string_value == response.envelope_id
    await client.close()


def test_the_migration_down_makes_split_responses_whole(tmp_path: Path) -> None:
    """Downgrading past 0007 writes each split response back whole into its row."""
    from alembic import command
    from sqlalchemy import create_engine, text

    from arm_common.migrations import alembic_config
    from arm_governance.app import MIGRATIONS

    cfg = alembic_config(MIGRATIONS)
    engine = create_engine(f"sqlite:///{tmp_path / 'governance.db'}")
    whole = decision_pb2.CheckResponse()
    whole.CopyFrom(DENY)
    whole.decision_id, whole.policy_epoch = "dec_aaaaaaaaaaaaaaaaaaaa", 3
    whole.decide_time.FromNanoseconds(1_765_000_000_123_456_000)
    own = decision_pb2.CheckResponse(decision_id=whole.decision_id, policy_epoch=3, decide_time=whole.decide_time)
    shared = DENY.SerializeToString()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        conn.execute(text("INSERT INTO decision_responses (id, tenant_id, response) VALUES ('p1', 'ten_x', :r)"),
                     {"r": shared})
        conn.execute(text(
            "INSERT INTO decisions (id, tenant_id, instance_id, legacy_agent_id, version_id, project_id, run_id, "
            "tool_call_id, tool_name, decision, step, risk, policy_epoch, approval_id, request, agent, response, "
            "decided_at, response_part) VALUES (:id, 'ten_x', '', '', '', '', '', '', 'db.drop', 2, 1, 1, 3, '', "
            ":e, :e, :own, '2025-12-06 05:46:40.123456', 'p1')"),
            {"id": whole.decision_id, "e": b"", "own": own.SerializeToString()})
        command.downgrade(cfg, "0006")
        stored = conn.execute(text("SELECT response FROM decisions")).scalar_one()
        assert decision_pb2.CheckResponse.FromString(stored) == whole
        command.upgrade(cfg, "head")
