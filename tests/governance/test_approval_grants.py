"""Approval grants on the decision path, through gRPC `Check` (SPEC §3 "The decision" step 3,
"Approvals"), and the durable side of every decision: the decision log, the POLICY_DENIED change
record and the opEvent written through governance's outbox, and request_id retries.

The operator flow that decides approvals comes in a later issue; until then an approval is set to
APPROVED by a direct update of governance's `approvals` table (status 3 =
APPROVAL_STATUS_APPROVED in approvals.proto)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from sqlalchemy import func, select, update

from arm.common.v1 import common_pb2
from arm.governance.v1 import approvals_pb2, audit_pb2, decision_pb2, policy_pb2
from arm.registry.v1 import agents_pb2
from arm.telemetry.v1 import events_pb2
from arm_client import ArmClient
from arm_common.canonical import canonical_hash
from arm_common.db import rowcount
from arm_common.errors import Unavailable
from arm_common.tables import utcnow
from arm_governance import models
from arm_governance.decisions.log import PendingDecision
from arm_governance.decisions.op_events import waiting_op_events
from tests.conftest import TenantContext, make_tenant
from tests.governance.test_audit import all_records, wait_for_record
from tests.helpers import AgentSet, approved_version, expect_failure, governance_change_records, operator_key

ALLOW, DENY, NA = policy_pb2.DECISION_ALLOW, policy_pb2.DECISION_DENY, policy_pb2.DECISION_NEEDS_APPROVAL
GRANT = decision_pb2.DECISION_STEP_APPROVAL_GRANT
APPROVED = approvals_pb2.APPROVAL_STATUS_APPROVED
TOOL = "payments.send"  # HIGH by classification: the baseline asks for approval
ARGS = {"amount": 120, "to": "acct-7", "memo": "invoice 12"}


def struct(value: dict[str, Any] | None) -> struct_pb2.Struct | None:
    if value is None:
        return None
    out = struct_pb2.Struct()
    out.update(value)
    return out


@dataclass
class World:
    tenant_id: str
    gov: ArmClient
    db: Any
    agents: AgentSet
    instance: agents_pb2.AgentInstance
    legacy_id: str

    async def check(self, tool: str = TOOL, args: dict[str, Any] | None = ARGS, *, instance_id: str | None = None,
                    **kw: Any) -> decision_pb2.CheckResponse:
        return await self.gov.decisions.Check(decision_pb2.CheckRequest(
            instance_id=instance_id or self.instance.id, tool_name=tool, arguments=struct(args), **kw))

    async def ask(self, tool_call_id: str | None = None, args: dict[str, Any] | None = ARGS) -> str:
        """A NEEDS_APPROVAL Check; returns the approval it created."""
        resp = await self.check(args=args, tool_call_id=tool_call_id or f"tc-{secrets.token_hex(4)}")
        assert resp.decision == NA and resp.approval_id, resp
        return resp.approval_id

    async def set_approval(self, approval_id: str, **values: Any) -> None:
        """The stand-in for the operator flow: a direct update of governance's approvals table."""
        async def write(s: Any) -> None:
            result = await s.execute(update(models.Approval).where(models.Approval.id == approval_id).values(**values))
            assert rowcount(result) == 1
        await self.db.run(write)

    async def approval(self, approval_id: str) -> models.Approval:
        async def read(s: Any) -> models.Approval:
            row = (await s.execute(select(models.Approval).where(models.Approval.id == approval_id))).scalar_one()
            s.expunge(row)
            return row
        return await self.db.read(read)

    async def approved(self, tool_call_id: str | None = None) -> str:
        approval_id = await self.ask(tool_call_id)
        await self.set_approval(approval_id, status=APPROVED)
        return approval_id


async def active_instance(admin: ArmClient, agents: AgentSet, legacy_id: str = "") -> agents_pb2.AgentInstance:
    inst = (await admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="agent",
        legacy_agent_id=legacy_id))).agent_instance
    return (await admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
        id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))).agent_instance


@pytest.fixture
async def world(governance: Any, tenant: TenantContext) -> AsyncIterator[World]:
    gov = governance.client(tenant.admin_key)
    agents = await approved_version(tenant.admin)
    legacy = f"legacy-{secrets.token_hex(5)}"
    inst = await active_instance(tenant.admin, agents, legacy)
    yield World(tenant.tenant.id, gov, governance.db, agents, inst, legacy)
    await gov.close()


def assert_denied(resp: decision_pb2.CheckResponse, code: str) -> None:
    assert (resp.decision, resp.step, resp.reasons[0].code) == (DENY, GRANT, code), resp
    assert not resp.approval_id and not resp.envelope_id


# --- Creating approvals ---------------------------------------------------------------------------------


def test_approved_status_number_matches_the_contract() -> None:
    assert approvals_pb2.APPROVAL_STATUS_APPROVED == APPROVED == 3
    assert approvals_pb2.APPROVAL_STATUS_PENDING == 1


async def test_needs_approval_creates_one_approval_per_tool_call(world: World) -> None:
    first = await world.check(tool_call_id="tc-1", run_id="run-1")
    assert (first.decision, first.step, first.reasons[0].code) == (NA, decision_pb2.DECISION_STEP_BASELINE,
                                                                   "BASELINE_HIGH")
    assert first.approval_id
    again = await world.check(tool_call_id="tc-1", run_id="run-1")
    assert again.decision == NA and again.approval_id == first.approval_id
    assert again.decision_id != first.decision_id
    other = await world.check(tool_call_id="tc-2")
    assert other.approval_id and other.approval_id != first.approval_id

    row = await world.approval(first.approval_id)
    assert (row.tenant_id, row.instance_id, row.version_id, row.project_id) == (
        world.tenant_id, world.instance.id, world.agents.version.id, world.agents.project.id)
    assert (row.action_type, row.tool_name, row.tool_call_id, row.run_id) == (
        approvals_pb2.APPROVAL_ACTION_TYPE_TOOL_EXECUTION, TOOL, "tc-1", "run-1")
    assert (row.status, row.risk, row.required_decisions) == (
        approvals_pb2.APPROVAL_STATUS_PENDING, common_pb2.RISK_LEVEL_HIGH, 2)
    assert row.argument_digest == canonical_hash(ARGS)
    assert row.decision_id == first.decision_id and row.consumed_at is None
    assert timedelta(minutes=59) < row.expires_at - row.created_at <= timedelta(hours=1)
    body = approvals_pb2.Approval.FromString(row.body)
    assert (body.approval_id, body.status, body.tool_name) == (first.approval_id, approvals_pb2.APPROVAL_STATUS_PENDING, TOOL)

    async def count(s: Any) -> int:
        return (await s.execute(select(func.count()).select_from(models.Approval).where(
            models.Approval.instance_id == world.instance.id))).scalar_one()
    assert await world.db.read(count) == 2


async def test_concurrent_needs_approval_on_one_tool_call_share_one_approval(world: World) -> None:
    results = await asyncio.gather(*(world.check(tool_call_id="tc-same") for _ in range(8)))
    assert {r.decision for r in results} == {NA}
    assert len({r.approval_id for r in results}) == 1
    assert len({r.decision_id for r in results}) == 8


# --- Using approvals ---------------------------------------------------------------------------------


async def test_approved_grant_allows_exactly_once(world: World) -> None:
    approval_id = await world.approved("tc-grant")
    used = await world.check(approval_id=approval_id, tool_call_id="tc-grant")
    assert (used.decision, used.step, used.reasons[0].code) == (ALLOW, GRANT, "APPROVAL_GRANTED"), used
    assert (used.scope, used.envelope_id, used.rule_kind) == (policy_pb2.POLICY_SCOPE_UNSPECIFIED, "", 0)
    row = await world.approval(approval_id)
    assert row.consumed_at is not None and row.status == APPROVED
    assert_denied(await world.check(approval_id=approval_id, tool_call_id="tc-grant"), "APPROVAL_USED")
    assert_denied(await world.check(approval_id=approval_id), "APPROVAL_USED")


async def test_grant_answer_names_the_consumed_approval(world: World) -> None:
    approval_id = await world.approved()
    used = await world.check(approval_id=approval_id)
    assert (used.decision, used.step) == (ALLOW, GRANT)
    assert used.approval_id == approval_id


async def test_grant_is_bound_to_the_arguments(world: World) -> None:
    approval_id = await world.approved()
    assert_denied(await world.check(args={**ARGS, "amount": 121_000}, approval_id=approval_id), "APPROVAL_MISMATCH")
    assert_denied(await world.check(args=None, approval_id=approval_id), "APPROVAL_MISMATCH")
    assert_denied(await world.check(tool="payments.refund", approval_id=approval_id), "APPROVAL_MISMATCH")
    assert (await world.approval(approval_id)).consumed_at is None, "a mismatch does not use the grant up"
    # Key order does not change the argument digest.
    reordered = dict(reversed(list(ARGS.items())))
    resp = await world.check(args=reordered, approval_id=approval_id)
    assert (resp.decision, resp.step) == (ALLOW, GRANT), resp


async def test_grant_is_bound_to_the_instance(world: World, tenant: TenantContext) -> None:
    approval_id = await world.approved()
    sibling = await active_instance(tenant.admin, world.agents)
    assert_denied(await world.check(instance_id=sibling.id, approval_id=approval_id), "APPROVAL_MISMATCH")
    # The legacy id of the instance it was granted for is the same instance.
    resp = await world.gov.decisions.Check(decision_pb2.CheckRequest(
        legacy_agent_id=world.legacy_id, tool_name=TOOL, arguments=struct(ARGS), approval_id=approval_id))
    assert (resp.decision, resp.step) == (ALLOW, GRANT), resp


async def test_expired_grant_is_denied(world: World) -> None:
    approval_id = await world.approved()
    await world.set_approval(approval_id, expires_at=utcnow() - timedelta(minutes=1))
    assert_denied(await world.check(approval_id=approval_id), "APPROVAL_EXPIRED")
    timed_out = await world.ask()
    await world.set_approval(timed_out, status=approvals_pb2.APPROVAL_STATUS_EXPIRED)
    assert_denied(await world.check(approval_id=timed_out), "APPROVAL_EXPIRED")


@pytest.mark.parametrize("status", [approvals_pb2.APPROVAL_STATUS_DENIED, approvals_pb2.APPROVAL_STATUS_CANCELLED])
async def test_refused_grant_is_denied(world: World, status: int) -> None:
    approval_id = await world.ask()
    await world.set_approval(approval_id, status=status)
    assert_denied(await world.check(approval_id=approval_id), "APPROVAL_NOT_APPROVED")


async def approvals_of(world: World) -> list[str]:
    async def read(s: Any) -> list[str]:
        return list((await s.execute(select(models.Approval.id).where(
            models.Approval.tenant_id == world.tenant_id))).scalars())
    return await world.db.read(read)


@pytest.mark.parametrize("status", [approvals_pb2.APPROVAL_STATUS_PENDING, approvals_pb2.APPROVAL_STATUS_ESCALATED])
async def test_presenting_an_open_approval_keeps_waiting_for_it(world: World, status: int) -> None:
    # The trap an agent walks into: it re-checks with the approval id before the approval is
    # decided. It must hear NEEDS_APPROVAL with the same id, not a DENY (and no POLICY_DENIED, no
    # second approval), and the approval must still work once approved.
    approval_id = await world.ask("tc-wait")
    if status != approvals_pb2.APPROVAL_STATUS_PENDING:
        await world.set_approval(approval_id, status=status)
    before = await approvals_of(world)
    waiting = await world.check(approval_id=approval_id, tool_call_id="tc-wait")
    assert (waiting.decision, waiting.step, waiting.reasons[0].code) == (NA, GRANT, "APPROVAL_PENDING"), waiting
    assert waiting.approval_id == approval_id
    # Another tool call id presenting it, too: the approval is bound to instance, tool and arguments.
    again = await world.check(approval_id=approval_id, tool_call_id="tc-other")
    assert (again.decision, again.approval_id) == (NA, approval_id), again
    assert sorted(await approvals_of(world)) == sorted(before), "no new approval"
    assert await denied_records(world) == []
    row = await world.approval(approval_id)
    assert (row.status, row.consumed_at) == (status, None)
    logged = {r.id: r for r in await decision_rows(world)}[waiting.decision_id]
    assert (logged.decision, logged.approval_id) == (NA, approval_id)
    event = (await op_events(world))[f"evt-{waiting.decision_id}"]
    assert event.payload["approval_id"] == approval_id

    await world.set_approval(approval_id, status=APPROVED)
    used = await world.check(approval_id=approval_id, tool_call_id="tc-wait")
    assert (used.decision, used.step, used.approval_id) == (ALLOW, GRANT, approval_id), used


async def test_an_open_approval_of_another_call_is_still_denied(world: World, tenant: TenantContext,
                                                                registry: Any, system_admin: Any,
                                                                governance: Any) -> None:
    approval_id = await world.ask()
    assert_denied(await world.check(args={**ARGS, "amount": 9}, approval_id=approval_id), "APPROVAL_NOT_APPROVED")
    assert_denied(await world.check(tool="payments.refund", approval_id=approval_id), "APPROVAL_NOT_APPROVED")
    sibling = await active_instance(tenant.admin, world.agents)
    assert_denied(await world.check(instance_id=sibling.id, approval_id=approval_id), "APPROVAL_NOT_APPROVED")
    assert len(await denied_records(world)) == 3
    other = await make_tenant(registry, system_admin)
    other_gov = governance.client(other.admin_key)
    try:
        agents = await approved_version(other.admin)
        inst = await active_instance(other.admin, agents)
        theirs = await other_gov.decisions.Check(decision_pb2.CheckRequest(
            instance_id=inst.id, tool_name=TOOL, arguments=struct(ARGS), tool_call_id="tc-x"))
        assert theirs.decision == NA
        assert_denied(await world.check(approval_id=theirs.approval_id), "APPROVAL_NOT_FOUND")
    finally:
        await other_gov.close()
        await other.admin.close()


async def test_an_open_approval_is_still_held_to_budgets(world: World) -> None:
    approval_id = await world.ask()
    await world.gov.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(
            name="caps", scope=policy_pb2.POLICY_SCOPE_TENANT, mode=policy_pb2.POLICY_MODE_ENFORCE,
            budgets=policy_pb2.Budgets(per_run_usd=10))))
    over = await world.check(approval_id=approval_id, estimated_cost_usd=50)
    assert (over.decision, over.step, over.reasons[0].code) == (
        DENY, decision_pb2.DECISION_STEP_BUDGET, "BUDGET_EXCEEDED"), over


async def test_unknown_or_foreign_approval_is_not_found(world: World, registry: Any, system_admin: Any,
                                                        governance: Any) -> None:
    assert_denied(await world.check(approval_id="apr_does_not_exist"), "APPROVAL_NOT_FOUND")
    other = await make_tenant(registry, system_admin)
    other_gov = governance.client(other.admin_key)
    try:
        agents = await approved_version(other.admin)
        inst = await active_instance(other.admin, agents)
        theirs = await other_gov.decisions.Check(decision_pb2.CheckRequest(
            instance_id=inst.id, tool_name=TOOL, arguments=struct(ARGS), tool_call_id="tc-x"))
        await world.set_approval(theirs.approval_id, status=APPROVED)
        assert_denied(await world.check(approval_id=theirs.approval_id), "APPROVAL_NOT_FOUND")
        assert (await world.approval(theirs.approval_id)).consumed_at is None
    finally:
        await other_gov.close()
        await other.admin.close()


async def test_concurrent_uses_of_one_grant_allow_exactly_one(world: World) -> None:
    approval_id = await world.approved()
    results = await asyncio.gather(*(world.check(approval_id=approval_id, tool_call_id=f"tc-{i}") for i in range(10)))
    allowed = [r for r in results if r.decision == ALLOW]
    assert len(allowed) == 1 and allowed[0].step == GRANT, results
    for r in results:
        if r.decision != ALLOW:
            assert_denied(r, "APPROVAL_USED")


async def test_a_grant_is_used_up_only_with_its_decision_logged(world: World, governance: Any) -> None:
    """The grant is marked used in the transaction that logs the decision: when that write
    fails (here a decision id already logged), the approval stays unused and still allows once."""
    approval_id = await world.approved()
    row = (await decision_rows(world))[-1]
    record = {c.name: getattr(row, c.name) for c in models.DecisionRecord.__table__.columns}
    pending = PendingDecision(record=record, response=decision_pb2.CheckResponse.FromString(row.response),
                              consume=approval_id)
    with pytest.raises(Unavailable):
        await governance.component.log.append(pending)
    assert (await world.approval(approval_id)).consumed_at is None
    used = await world.check(approval_id=approval_id)
    assert (used.decision, used.step, used.approval_id) == (ALLOW, GRANT, approval_id), used
    assert (await world.approval(approval_id)).consumed_at is not None


async def test_kill_switch_comes_before_the_grant(world: World) -> None:
    approval_id = await world.approved()
    T = policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT
    await world.gov.policies.SetOperatorControl(policy_pb2.SetOperatorControlRequest(
        scope=T, mode=policy_pb2.OPERATOR_CONTROL_MODE_PAUSED))
    paused = await world.check(approval_id=approval_id)
    assert (paused.decision, paused.step, paused.reasons[0].code) == (
        DENY, decision_pb2.DECISION_STEP_KILL_SWITCH, "TENANT_PAUSED")
    assert (await world.approval(approval_id)).consumed_at is None
    await world.gov.policies.SetOperatorControl(policy_pb2.SetOperatorControlRequest(
        scope=T, mode=policy_pb2.OPERATOR_CONTROL_MODE_NORMAL))
    resp = await world.check(approval_id=approval_id)
    assert (resp.decision, resp.step) == (ALLOW, GRANT), resp


async def test_grant_beats_a_locked_rule_but_not_a_budget(world: World) -> None:
    approval_id = await world.approved()
    await world.gov.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(
            name="hard caps", scope=policy_pb2.POLICY_SCOPE_TENANT, mode=policy_pb2.POLICY_MODE_ENFORCE,
            tool_rules=[policy_pb2.ToolRule(tool="payments.**", effect=NA, locked=True)],
            budgets=policy_pb2.Budgets(per_run_usd=10))))
    over = await world.check(approval_id=approval_id, estimated_cost_usd=50)
    assert (over.decision, over.step, over.reasons[0].code) == (
        DENY, decision_pb2.DECISION_STEP_BUDGET, "BUDGET_EXCEEDED"), over
    assert (await world.approval(approval_id)).consumed_at is None, "a budget denial does not use the grant up"
    within = await world.check(approval_id=approval_id, estimated_cost_usd=5)
    assert (within.decision, within.step) == (ALLOW, GRANT), within


# --- The durable side of every decision -------------------------------------------------------------------


async def decision_rows(world: World) -> list[models.DecisionRecord]:
    async def read(s: Any) -> list[models.DecisionRecord]:
        rows = list((await s.execute(select(models.DecisionRecord).where(
            models.DecisionRecord.tenant_id == world.tenant_id))).scalars())
        s.expunge_all()
        return rows
    return await world.db.read(read)


async def denied_records(world: World) -> list[common_pb2.ChangeRecord]:
    records = await governance_change_records(world.db, world.tenant_id)
    return [r for r in records if r.type == common_pb2.CHANGE_RECORD_TYPE_POLICY_DENIED]


async def op_events(world: World) -> dict[str, events_pb2.OpEvent]:
    """The opEvents waiting in the outbox, as the relay derives them from the decision log."""
    out = {}
    for event in await world.db.read(lambda s: waiting_op_events(s, world.tenant_id)):
        assert event.event_id not in out
        out[event.event_id] = event
    return out


async def test_every_decision_is_logged_with_its_response(world: World) -> None:
    await world.gov.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(envelope=policy_pb2.PolicyEnvelope(
        name="no shell", scope=policy_pb2.POLICY_SCOPE_VERSION, scope_id=world.agents.version.id,
        mode=policy_pb2.POLICY_MODE_ENFORCE, tool_rules=[policy_pb2.ToolRule(tool="shell.*", effect=DENY)])))
    before = len(await decision_rows(world))
    responses = [
        await world.check("fs.read", None, run_id="run-9", tool_call_id="tc-a"),
        await world.check("shell.exec", {"cmd": "ls"}, tool_call_id="tc-b"),
        await world.check(tool_call_id="tc-c", declared_risk=common_pb2.RISK_LEVEL_MEDIUM),
        await world.gov.decisions.Check(decision_pb2.CheckRequest(instance_id="ins_nobody", tool_name="fs.read")),
    ]
    assert [r.decision for r in responses] == [ALLOW, DENY, NA, DENY]
    rows = {r.id: r for r in await decision_rows(world)}
    assert len(rows) == before + len(responses)
    for resp in responses:
        row = rows[resp.decision_id]
        assert decision_pb2.CheckResponse.FromString(row.response) == resp
        assert (row.decision, row.step, row.risk, row.policy_epoch, row.approval_id) == (
            resp.decision, resp.step, resp.effective_risk, resp.policy_epoch, resp.approval_id)
        request = decision_pb2.CheckRequest.FromString(row.request)
        assert request.tool_name == row.tool_name
    known = [rows[r.decision_id] for r in responses[:3]]
    for row in known:
        assert (row.instance_id, row.version_id, row.project_id, row.legacy_agent_id) == (
            world.instance.id, world.agents.version.id, world.agents.project.id, world.legacy_id)
    assert (known[0].tool_name, known[0].run_id, known[0].tool_call_id) == ("fs.read", "run-9", "tc-a")
    unknown = rows[responses[3].decision_id]
    assert (unknown.instance_id, unknown.version_id, unknown.agent) == ("", "", b"")


async def test_deny_writes_one_policy_denied_and_every_decision_one_op_event(world: World) -> None:
    allow = await world.check("fs.read", None, tool_call_id="tc-allow", run_id="run-1")
    needs = await world.check(tool_call_id="tc-needs")
    deny = await world.check("fs.read", None, declared_risk=common_pb2.RISK_LEVEL_CRITICAL, tool_call_id="tc-deny")
    unknown = await world.gov.decisions.Check(decision_pb2.CheckRequest(legacy_agent_id="legacy-ghost", tool_name="fs.read"))
    assert [r.decision for r in (allow, needs, deny, unknown)] == [ALLOW, NA, DENY, DENY]

    denied = await denied_records(world)
    assert len(denied) == 2
    by_decision = {r.payload["decision_id"]: r for r in denied}
    assert set(by_decision) == {deny.decision_id, unknown.decision_id}
    rec = by_decision[deny.decision_id]
    assert (rec.tenant_id, rec.instance_id, rec.version_id, rec.project_id, rec.template_id) == (
        world.tenant_id, world.instance.id, world.agents.version.id, world.agents.project.id, world.agents.template.id)
    assert (rec.target_type, rec.target_id, rec.source) == ("tool_call", "tc-deny", "governance")
    assert rec.actor.type == common_pb2.ACTOR_TYPE_OPERATOR and rec.record_id
    assert list(rec.payload["reasons"]) == ["BASELINE_CRITICAL"]
    assert by_decision[unknown.decision_id].instance_id == ""

    events = await op_events(world)
    assert len(events) == 4
    for resp, kind in ((allow, events_pb2.OP_EVENT_TYPE_DECISION_MADE), (needs, events_pb2.OP_EVENT_TYPE_DECISION_MADE),
                       (deny, events_pb2.OP_EVENT_TYPE_TOOL_CALL_BLOCKED),
                       (unknown, events_pb2.OP_EVENT_TYPE_TOOL_CALL_BLOCKED)):
        event = events[f"evt-{resp.decision_id}"]
        assert (event.type, event.tenant_id, event.payload["decision_id"]) == (kind, world.tenant_id, resp.decision_id)
        assert event.payload["decision"] == policy_pb2.Decision.Name(resp.decision)
        assert event.occur_time.seconds > 0
        if resp is not unknown:
            assert (event.instance_id, event.version_id, event.project_id, event.template_id) == (
                world.instance.id, world.agents.version.id, world.agents.project.id, world.agents.template.id)
            assert event.legacy_agent_id == world.legacy_id
    assert events[f"evt-{allow.decision_id}"].run_id == "run-1"
    assert events[f"evt-{deny.decision_id}"].tool_call_id == "tc-deny"
    unknown_event = events[f"evt-{unknown.decision_id}"]
    assert (unknown_event.instance_id, unknown_event.legacy_agent_id) == ("", "legacy-ghost")


async def test_retry_with_the_same_request_id_returns_the_logged_decision(world: World) -> None:
    before = len(await decision_rows(world))
    request_id = f"req-{secrets.token_hex(4)}"
    first = await world.check("fs.read", None, declared_risk=common_pb2.RISK_LEVEL_CRITICAL, request_id=request_id)
    again = await world.check("fs.read", None, declared_risk=common_pb2.RISK_LEVEL_CRITICAL, request_id=request_id)
    assert first.decision == DENY and first.request_id == request_id
    assert again == first
    rows = await decision_rows(world)
    assert len(rows) == before + 1
    assert [r.id for r in rows if r.request_id == request_id] == [first.decision_id]
    assert len(await denied_records(world)) == 1
    assert list(await op_events(world)) == [f"evt-{first.decision_id}"]

    # Concurrent twins: one decision, one row.
    twin_id = f"req-{secrets.token_hex(4)}"
    twins = await asyncio.gather(*(world.check("fs.read", None, request_id=twin_id) for _ in range(6)))
    assert len({t.decision_id for t in twins}) == 1
    assert len(await decision_rows(world)) == before + 2


async def test_retry_of_a_grant_use_does_not_turn_into_a_denial(world: World) -> None:
    approval_id = await world.approved()
    request_id = f"req-{secrets.token_hex(4)}"
    first = await world.check(approval_id=approval_id, request_id=request_id)
    again = await world.check(approval_id=approval_id, request_id=request_id)
    assert (first.decision, first.step) == (ALLOW, GRANT)
    assert again == first
    assert_denied(await world.check(approval_id=approval_id), "APPROVAL_USED")


async def test_same_request_id_in_another_tenant_is_another_decision(world: World, registry: Any,
                                                                      system_admin: Any, governance: Any) -> None:
    request_id = f"req-{secrets.token_hex(4)}"
    mine = await world.check("fs.read", None, request_id=request_id)
    other = await make_tenant(registry, system_admin)
    other_gov = governance.client(other.admin_key)
    try:
        agents = await approved_version(other.admin)
        inst = await active_instance(other.admin, agents)
        theirs = await other_gov.decisions.Check(decision_pb2.CheckRequest(
            instance_id=inst.id, tool_name="fs.read", request_id=request_id))
    finally:
        await other_gov.close()
        await other.admin.close()
    assert theirs.decision_id != mine.decision_id
    assert theirs.decision == ALLOW and mine.decision == ALLOW


async def test_check_rejects_bad_input(world: World) -> None:
    for request, path in (
            (decision_pb2.CheckRequest(tool_name="fs.read"), "agent"),
            (decision_pb2.CheckRequest(instance_id=world.instance.id), "tool_name"),
            (decision_pb2.CheckRequest(instance_id=world.instance.id, tool_name="fs.read", estimated_cost_usd=-1),
             "estimated_cost_usd"),
            (decision_pb2.CheckRequest(instance_id=world.instance.id, tool_name="fs.read", declared_risk=9),
             "declared_risk")):
        failed = await expect_failure(world.gov.decisions.Check(request), grpc.StatusCode.INVALID_ARGUMENT,
                                      "INVALID_FIELDS")
        assert path in failed.violations


async def test_the_trail_alone_says_who_approved_a_call(world: World, tenant: TenantContext, governance: Any) -> None:
    # Two operators approve (HIGH risk); the ALLOW that uses the grant writes APPROVAL_CONSUMED
    # linking its decision to the approval, whose APPROVAL_DECIDED records name the approvers.
    approval_id = await world.ask("tc-audited")
    operators = [await operator_key(tenant.admin, "approver") for _ in range(2)]
    for _, key in operators:
        async with ArmClient(governance.address, key) as approver:
            await approver.approvals.DecideApproval(approvals_pb2.DecideApprovalRequest(
                approval_id=approval_id, verdict=approvals_pb2.APPROVAL_VERDICT_APPROVE, reason="checked"))
    request_id = f"req-{secrets.token_hex(4)}"
    used = await world.check(approval_id=approval_id, tool_call_id="tc-audited", run_id="run-a", request_id=request_id)
    assert (used.decision, used.step, used.approval_id) == (ALLOW, GRANT, approval_id), used
    assert await world.check(approval_id=approval_id, tool_call_id="tc-audited", request_id=request_id) == used

    consumed = await wait_for_record(world.gov, common_pb2.CHANGE_RECORD_TYPE_APPROVAL_CONSUMED, approval_id)
    assert (consumed.target_type, consumed.source, consumed.instance_id) == ("approval", "governance", world.instance.id)
    assert (consumed.payload["decision_id"], consumed.payload["tool_name"], consumed.payload["tool_call_id"],
            consumed.payload["run_id"]) == (used.decision_id, TOOL, "tc-audited", "run-a")
    assert consumed.actor.type == common_pb2.ACTOR_TYPE_OPERATOR and consumed.actor.id == tenant.admin_operator_id
    # From the decision id alone: find its consumption record, then the approval's deciders.
    consumptions = [r for r in await all_records(world.gov, audit_pb2.ChangeRecordFilter(
        types=[common_pb2.CHANGE_RECORD_TYPE_APPROVAL_CONSUMED])) if r.payload["decision_id"] == used.decision_id]
    assert [r.record_id for r in consumptions] == [consumed.record_id], "one record, also for the retried request"
    decided = await all_records(world.gov, audit_pb2.ChangeRecordFilter(
        types=[common_pb2.CHANGE_RECORD_TYPE_APPROVAL_DECIDED], target_id=consumptions[0].target_id))
    assert sorted(r.actor.id for r in decided) == sorted(op_id for op_id, _ in operators)
    assert decided[-1].after["status"] == "APPROVED"
    assert decided[-1].sequence < consumed.sequence
    # A denied use writes no consumption record.
    assert_denied(await world.check(approval_id=approval_id), "APPROVAL_USED")
    assert len(await all_records(world.gov, audit_pb2.ChangeRecordFilter(
        types=[common_pb2.CHANGE_RECORD_TYPE_APPROVAL_CONSUMED], target_id=approval_id))) == 1
    report = await world.gov.audit.VerifyChain(audit_pb2.VerifyChainRequest())
    assert report.ok, report.message


async def test_a_retry_does_not_use_up_a_grant_approved_since_its_first_answer(world: World) -> None:
    # A runtime re-running its step replays its requests: the retry of "present the approval
    # while pending" after the approval was granted must get the logged NEEDS_APPROVAL back and
    # leave the grant for the next, new request (a retry that used it up while answering
    # NEEDS_APPROVAL would lose it: the next request would hear APPROVAL_USED).
    approval_id = await world.ask("tc-replay")
    request_id = f"req-{secrets.token_hex(4)}"
    first = await world.check(approval_id=approval_id, tool_call_id="tc-replay", request_id=request_id)
    assert (first.decision, first.approval_id) == (NA, approval_id), first
    await world.set_approval(approval_id, status=APPROVED)
    assert await world.check(approval_id=approval_id, tool_call_id="tc-replay", request_id=request_id) == first
    assert (await world.approval(approval_id)).consumed_at is None
    used = await world.check(approval_id=approval_id, tool_call_id="tc-replay", request_id=f"{request_id}-2")
    assert (used.decision, used.step, used.approval_id) == (ALLOW, GRANT, approval_id), used
