"""Approvals (SPEC §3 "Approvals") through gRPC ApprovalService on real servers and databases:
the state machine, two-decision approvals, separation of duties, expiry and escalation (the
background sweep, triggered directly), concurrency, watching, and the end-to-end grant of a tool
call that Check sent for approval. Time is moved by updating expires_at / escalate_at in the
database, never by waiting."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from sqlalchemy import update

from arm.common.v1 import common_pb2
from arm.governance.v1 import approvals_pb2 as apb
from arm.governance.v1 import decision_pb2, policy_pb2
from arm.registry.v1 import access_pb2, agents_pb2
from arm_client import ArmClient
from arm_common.db import rowcount
from arm_common.errors import FailedPrecondition, PermissionDenied
from arm_common.messages import ts
from arm_common.tables import utcnow
from arm_governance import models
from arm_governance.approvals import service as approvals
from tests.conftest import TenantContext, make_tenant, new_database_spec, start_governance, stop_governance
from tests.helpers import AgentSet, approved_version, expect_failure, governance_change_records, operator_key

S = apb.ApprovalStatus
A = apb.ApprovalActionType
PENDING, ESCALATED, APPROVED, DENIED, EXPIRED, CANCELLED = (
    S.APPROVAL_STATUS_PENDING, S.APPROVAL_STATUS_ESCALATED, S.APPROVAL_STATUS_APPROVED,
    S.APPROVAL_STATUS_DENIED, S.APPROVAL_STATUS_EXPIRED, S.APPROVAL_STATUS_CANCELLED)
APPROVE, DENY = apb.APPROVAL_VERDICT_APPROVE, apb.APPROVAL_VERDICT_DENY
LOW, HIGH = common_pb2.RISK_LEVEL_LOW, common_pb2.RISK_LEVEL_HIGH
ALL = [PENDING, ESCALATED, APPROVED, DENIED, EXPIRED, CANCELLED]
ALLOWED = {(PENDING, t) for t in (ESCALATED, APPROVED, DENIED, EXPIRED, CANCELLED)} | {
    (ESCALATED, t) for t in (ESCALATED, APPROVED, DENIED, EXPIRED, CANCELLED)}


# --- the state machine, exhaustively (pure) ---------------------------------------------------------

@pytest.mark.parametrize("current", ALL, ids=lambda s: S.Name(s))
@pytest.mark.parametrize("target", ALL, ids=lambda s: S.Name(s))
def test_every_status_transition_is_allowed_or_refused(current: int, target: int) -> None:
    if (current, target) in ALLOWED:
        approvals.check_transition(current, target)
    else:
        with pytest.raises(FailedPrecondition) as exc:
            approvals.check_transition(current, target)
        assert exc.value.reason in ("APPROVAL_NOT_OPEN", "INVALID_APPROVAL_TRANSITION")
        assert (exc.value.reason == "APPROVAL_NOT_OPEN") == (current in approvals.FINAL)


def _pending(risk: int = LOW, requester: str = "op_req") -> apb.Approval:
    now = utcnow()
    return apb.Approval(approval_id="apr_1", status=PENDING, risk=risk,
                        required_decisions=approvals.required_decisions(risk),
                        requester=common_pb2.Actor(type=common_pb2.ACTOR_TYPE_OPERATOR, id=requester),
                        expire_time=ts(now + timedelta(hours=1)))


@pytest.mark.parametrize("risk,required", [(common_pb2.RISK_LEVEL_LOW, 1), (common_pb2.RISK_LEVEL_MEDIUM, 1),
                                           (common_pb2.RISK_LEVEL_HIGH, 2), (common_pb2.RISK_LEVEL_CRITICAL, 2)])
def test_required_decisions_by_risk(risk: int, required: int) -> None:
    assert approvals.required_decisions(risk) == required


def test_decide_rules_pure() -> None:
    now = utcnow()
    a = _pending(HIGH)
    with pytest.raises(PermissionDenied) as exc:
        approvals.decide(a, "op_req", APPROVE, "", now)
    assert exc.value.reason == "SELF_APPROVAL"
    one = approvals.decide(a, "op_a", APPROVE, "ok", now)
    assert one.status == PENDING and len(one.decisions) == 1
    with pytest.raises(FailedPrecondition) as exc2:
        approvals.decide(one, "op_a", APPROVE, "", now)
    assert exc2.value.reason == "ALREADY_DECIDED"
    two = approvals.decide(one, "op_b", APPROVE, "", now)
    assert two.status == APPROVED and two.HasField("resolve_time")
    assert approvals.decide(one, "op_b", DENY, "", now).status == DENIED
    late = _pending()
    late.expire_time.CopyFrom(ts(now - timedelta(seconds=1)))
    with pytest.raises(FailedPrecondition) as exc3:
        approvals.decide(late, "op_a", APPROVE, "", now)
    assert exc3.value.reason == "APPROVAL_EXPIRED"


@pytest.mark.parametrize("action,hours", [
    (A.APPROVAL_ACTION_TYPE_TOOL_EXECUTION, 1), (A.APPROVAL_ACTION_TYPE_INSTANCE_REACTIVATION, 12),
    (A.APPROVAL_ACTION_TYPE_INSTANCE_QUARANTINE, 2), (A.APPROVAL_ACTION_TYPE_VERSION_PROMOTION, 48),
    (A.APPROVAL_ACTION_TYPE_POLICY_AUTONOMY_INCREASE, 72), (A.APPROVAL_ACTION_TYPE_DEPLOYMENT_ACTIVATION, 24)])
def test_default_expiry_by_type(action: int, hours: int) -> None:
    assert approvals.default_ttl(action) == timedelta(hours=hours)


# --- over gRPC ----------------------------------------------------------------------------------------

@dataclass
class World:
    tenant: TenantContext
    governance: Any
    gov: ArmClient  # the tenant admin on governance
    agents: AgentSet
    instance: agents_pb2.AgentInstance
    clients: list[ArmClient]

    async def operator(self, *roles: str) -> tuple[str, ArmClient]:
        """An operator with these built-in roles, and a governance client with their key."""
        op_id, key = await operator_key(self.tenant.admin, *roles)
        client = ArmClient(self.governance.address, key)
        self.clients.append(client)
        return op_id, client

    async def request(self, client: ArmClient | None = None, **kw: Any) -> apb.Approval:
        kw.setdefault("action_type", A.APPROVAL_ACTION_TYPE_INSTANCE_REACTIVATION)
        kw.setdefault("instance_id", self.instance.id)
        kw.setdefault("risk", LOW)
        kw.setdefault("justification", "tests")
        return (await (client or self.gov).approvals.RequestApproval(apb.RequestApprovalRequest(**kw))).approval

    async def set_row(self, approval_id: str, **values: Any) -> None:
        async def write(s: Any) -> None:
            result = await s.execute(update(models.Approval).where(models.Approval.id == approval_id).values(**values))
            assert rowcount(result) == 1
        await self.governance.db.run(write)

    async def get(self, approval_id: str) -> apb.Approval:
        return (await self.gov.approvals.GetApproval(apb.GetApprovalRequest(approval_id=approval_id))).approval


async def decide(client: ArmClient, approval_id: str, verdict: int = APPROVE, **kw: Any) -> apb.Approval:
    return (await client.approvals.DecideApproval(apb.DecideApprovalRequest(
        approval_id=approval_id, verdict=verdict, reason="tests", **kw))).approval


async def active_instance(admin: ArmClient, agents: AgentSet) -> agents_pb2.AgentInstance:
    inst = (await admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="agent"))).agent_instance
    return (await admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
        id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))).agent_instance


@pytest.fixture
async def world(governance: Any, tenant: TenantContext) -> AsyncIterator[World]:
    gov = governance.client(tenant.admin_key)
    agents = await approved_version(tenant.admin)
    inst = await active_instance(tenant.admin, agents)
    w = World(tenant, governance, gov, agents, inst, [])
    yield w
    for c in [gov, *w.clients]:
        await c.close()


async def change_records(governance: Any, approval_id: str) -> list[common_pb2.ChangeRecord]:
    records = await governance_change_records(governance.db)
    return [r for r in records if r.target_id == approval_id]


async def test_request_get_and_default_expiry(world: World) -> None:
    a = await world.request()
    assert (a.status, a.escalation_level, a.required_decisions, a.etag) == (PENDING, 0, 1, "1")
    assert a.project_id == world.agents.project.id and a.version_id == world.agents.version.id
    assert a.requester.id == world.tenant.admin_operator_id
    ttl = a.expire_time.ToDatetime() - a.create_time.ToDatetime()
    assert ttl == timedelta(hours=12)
    assert await world.get(a.approval_id) == a
    short = await world.request(ttl=duration_pb2.Duration(seconds=90))
    assert short.expire_time.ToDatetime() - short.create_time.ToDatetime() == timedelta(seconds=90)
    types = [r.type for r in await change_records(world.governance, a.approval_id)]
    assert types == [common_pb2.CHANGE_RECORD_TYPE_APPROVAL_REQUESTED]


async def test_two_decisions_by_two_different_operators(world: World) -> None:
    a = await world.request(risk=HIGH)
    assert a.required_decisions == 2
    _, first = await world.operator("approver")
    _, second = await world.operator("approver")
    one = await decide(first, a.approval_id)
    assert one.status == PENDING and len(one.decisions) == 1
    await expect_failure(decide(first, a.approval_id), grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_DECIDED")
    two = await decide(second, a.approval_id)
    assert two.status == APPROVED and [d.verdict for d in two.decisions] == [APPROVE, APPROVE]
    assert two.HasField("resolve_time")
    types = [r.type for r in await change_records(world.governance, a.approval_id)]
    assert types == [common_pb2.CHANGE_RECORD_TYPE_APPROVAL_REQUESTED] + [common_pb2.CHANGE_RECORD_TYPE_APPROVAL_DECIDED] * 2


async def test_requester_never_approves_own_request(world: World) -> None:
    a = await world.request()  # requested by the admin, who holds approvals:decide
    failed = await expect_failure(decide(world.gov, a.approval_id), grpc.StatusCode.PERMISSION_DENIED, "SELF_APPROVAL")
    assert failed.metadata["approval_id"] == a.approval_id
    assert (await world.get(a.approval_id)).status == PENDING


async def test_one_denial_is_final_and_final_statuses_refuse_decisions(world: World) -> None:
    a = await world.request(risk=HIGH)
    _, approver = await world.operator("approver")
    _, other = await world.operator("approver")
    denied = await decide(approver, a.approval_id, DENY)
    assert denied.status == DENIED
    await expect_failure(decide(other, a.approval_id), grpc.StatusCode.FAILED_PRECONDITION, "APPROVAL_NOT_OPEN")
    await expect_failure(world.gov.approvals.CancelApproval(apb.CancelApprovalRequest(approval_id=a.approval_id)),
                         grpc.StatusCode.FAILED_PRECONDITION, "APPROVAL_NOT_OPEN")


async def test_cancel_by_requester_or_admin_only(world: World) -> None:
    _, requester = await world.operator("operator")
    _, stranger = await world.operator("operator")
    mine = await world.request(requester)
    await expect_failure(stranger.approvals.CancelApproval(apb.CancelApprovalRequest(approval_id=mine.approval_id)),
                         grpc.StatusCode.PERMISSION_DENIED, "NOT_REQUESTER")
    await expect_failure(requester.approvals.CancelApproval(apb.CancelApprovalRequest(
        approval_id=mine.approval_id, etag="99")), grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    cancelled = (await requester.approvals.CancelApproval(apb.CancelApprovalRequest(
        approval_id=mine.approval_id, reason="not needed", etag=mine.etag))).approval
    assert (cancelled.status, cancelled.cancellation_reason) == (CANCELLED, "not needed")
    theirs = await world.request(requester)
    by_admin = (await world.gov.approvals.CancelApproval(apb.CancelApprovalRequest(
        approval_id=theirs.approval_id))).approval
    assert by_admin.status == CANCELLED
    _, approver = await world.operator("approver")
    await expect_failure(decide(approver, theirs.approval_id), grpc.StatusCode.FAILED_PRECONDITION, "APPROVAL_NOT_OPEN")
    types = [r.type for r in await change_records(world.governance, mine.approval_id)]
    assert types[-1] == common_pb2.CHANGE_RECORD_TYPE_APPROVAL_CANCELLED


async def test_deciding_after_expiry_records_expired_not_a_denial(world: World) -> None:
    a = await world.request()
    await world.set_row(a.approval_id, expires_at=utcnow() - timedelta(seconds=1))
    _, approver = await world.operator("approver")
    failed = await expect_failure(decide(approver, a.approval_id, DENY), grpc.StatusCode.FAILED_PRECONDITION,
                                  "APPROVAL_EXPIRED")
    assert failed.metadata["approval_id"] == a.approval_id
    got = await world.get(a.approval_id)
    assert got.status == EXPIRED and not got.decisions and got.HasField("resolve_time")
    records = await change_records(world.governance, a.approval_id)
    assert records[-1].actor.type == common_pb2.ACTOR_TYPE_SYSTEM
    assert records[-1].after.fields["status"].string_value == "EXPIRED"


async def test_sweep_expires_and_escalates(world: World) -> None:
    sweep = world.governance.component.approvals.sweep
    due = await world.request()
    fresh = await world.request()
    await world.set_row(due.approval_id, expires_at=utcnow() - timedelta(seconds=1))
    await world.set_row(fresh.approval_id, escalate_at=utcnow() - timedelta(seconds=1))
    await sweep()
    assert (await world.get(due.approval_id)).status == EXPIRED
    escalated = await world.get(fresh.approval_id)
    assert (escalated.status, escalated.escalation_level) == (ESCALATED, 1)
    await sweep()  # nothing due: idempotent
    assert (await world.get(fresh.approval_id)).escalation_level == 1
    await world.set_row(fresh.approval_id, escalate_at=utcnow() - timedelta(seconds=1))
    await asyncio.gather(sweep(), sweep())  # two replicas at once: one escalation
    again = await world.get(fresh.approval_id)
    assert (again.status, again.escalation_level) == (ESCALATED, 2)
    _, approver = await world.operator("approver")
    assert (await decide(approver, fresh.approval_id)).status == APPROVED


async def test_twenty_concurrent_decisions_produce_one_outcome(world: World) -> None:
    a = await world.request()
    approvers = [await world.operator("approver") for _ in range(20)]
    calls = [decide(client, a.approval_id, APPROVE if i % 2 else DENY) for i, (_, client) in enumerate(approvers)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    wins = [r for r in results if isinstance(r, apb.Approval)]
    losses = [r for r in results if not isinstance(r, apb.Approval)]
    assert len(wins) == 1, results
    assert all(isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.FAILED_PRECONDITION
               for e in losses), losses
    final = await world.get(a.approval_id)
    assert final.status == wins[0].status and final.status in (APPROVED, DENIED)
    assert len(final.decisions) == 1
    decided = [r for r in await change_records(world.governance, a.approval_id)
               if r.type == common_pb2.CHANGE_RECORD_TYPE_APPROVAL_DECIDED]
    assert len(decided) == 1


async def test_list_filters_pagination_and_agents_see_their_own(world: World) -> None:
    other = await active_instance(world.tenant.admin, world.agents)
    mine = [await world.request() for _ in range(3)]
    promo = await world.request(action_type=A.APPROVAL_ACTION_TYPE_VERSION_PROMOTION, instance_id="",
                                version_id=world.agents.version.id, risk=HIGH)
    theirs = await world.request(instance_id=other.id)

    async def listed(client: ArmClient = world.gov, **kw: Any) -> list[str]:
        out, token = [], ""
        while True:
            resp = await client.approvals.ListApprovals(apb.ListApprovalsRequest(page_size=2, page_token=token, **kw))
            out += [a.approval_id for a in resp.approvals]
            token = resp.next_page_token
            if not token:
                return out

    everything = await listed()
    assert everything[:5] == [theirs.approval_id, promo.approval_id] + [a.approval_id for a in reversed(mine)]
    assert await listed(instance_id=world.instance.id) == [a.approval_id for a in reversed(mine)]
    assert await listed(action_type=A.APPROVAL_ACTION_TYPE_VERSION_PROMOTION) == [promo.approval_id]
    assert await listed(min_risk=HIGH) == [promo.approval_id]
    await world.gov.approvals.CancelApproval(apb.CancelApprovalRequest(approval_id=mine[0].approval_id))
    assert await listed(statuses=[CANCELLED]) == [mine[0].approval_id]
    first = await world.gov.approvals.ListApprovals(apb.ListApprovalsRequest(page_size=1))
    await expect_failure(world.gov.approvals.ListApprovals(apb.ListApprovalsRequest(
        page_size=1, page_token=first.next_page_token, min_risk=HIGH)), grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN")
    # An agent key reads only its own instance's approvals.
    key = (await world.tenant.admin.access.CreateApiKey(access_pb2.CreateApiKeyRequest(
        instance_id=world.instance.id))).secret
    async with ArmClient(world.governance.address, key) as agent:
        assert set(await listed(agent)) == {a.approval_id for a in mine}
        await expect_failure(agent.approvals.GetApproval(apb.GetApprovalRequest(approval_id=theirs.approval_id)),
                             grpc.StatusCode.NOT_FOUND, "APPROVAL_NOT_FOUND")
        await expect_failure(decide(agent, mine[1].approval_id), grpc.StatusCode.PERMISSION_DENIED,
                             "MISSING_PERMISSION")
        own = await world.request(agent, risk=LOW)
        assert own.requester.type == common_pb2.ACTOR_TYPE_AGENT
        await expect_failure(world.request(agent, instance_id=other.id), grpc.StatusCode.PERMISSION_DENIED,
                             "NOT_YOUR_AGENT")


async def test_rbac_per_rpc(world: World) -> None:
    a = await world.request()
    _, auditor = await world.operator("auditor")
    _, operator = await world.operator("operator")
    _, nobody = await world.operator()
    await expect_failure(world.request(auditor), grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION")
    await expect_failure(decide(operator, a.approval_id), grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION")
    for call in (nobody.approvals.GetApproval(apb.GetApprovalRequest(approval_id=a.approval_id)),
                 nobody.approvals.ListApprovals(apb.ListApprovalsRequest())):
        await expect_failure(call, grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION")
    stream = nobody.approvals.WatchApproval(apb.WatchApprovalRequest(approval_id=a.approval_id))
    await expect_failure(_first(stream), grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION")
    assert (await auditor.approvals.GetApproval(apb.GetApprovalRequest(approval_id=a.approval_id))).approval == a


async def _first(stream: Any) -> Any:
    async for msg in stream:
        return msg


async def test_other_tenant_sees_not_found(world: World, registry: Any, system_admin: Any) -> None:
    a = await world.request()
    other = await make_tenant(registry, system_admin)
    try:
        async with ArmClient(world.governance.address, other.admin_key) as stranger:
            for call in (stranger.approvals.GetApproval(apb.GetApprovalRequest(approval_id=a.approval_id)),
                         decide(stranger, a.approval_id),
                         stranger.approvals.CancelApproval(apb.CancelApprovalRequest(approval_id=a.approval_id)),
                         _first(stranger.approvals.WatchApproval(apb.WatchApprovalRequest(approval_id=a.approval_id)))):
                await expect_failure(call, grpc.StatusCode.NOT_FOUND, "APPROVAL_NOT_FOUND")
            assert not (await stranger.approvals.ListApprovals(apb.ListApprovalsRequest())).approvals
            # Nor can it ask for approvals about this tenant's agents.
            await expect_failure(world.request(stranger), grpc.StatusCode.NOT_FOUND)
    finally:
        await other.admin.close()
    assert (await world.get(a.approval_id)).status == PENDING


async def test_bad_input_lists_field_violations(world: World) -> None:
    failed = await expect_failure(world.gov.approvals.RequestApproval(apb.RequestApprovalRequest(
        ttl=duration_pb2.Duration(seconds=-5), estimated_cost_usd=-1.0)),
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELDS")
    assert {"action_type", "risk", "ttl", "estimated_cost_usd"} <= set(failed.violations)
    # NaN is refused by the edge check before the RPC's own validation (arm_common.edge).
    failed = await expect_failure(world.gov.approvals.RequestApproval(apb.RequestApprovalRequest(
        estimated_cost_usd=float("nan"))), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELDS")
    assert set(failed.violations) == {"estimated_cost_usd"}
    failed = await expect_failure(world.request(action_type=A.APPROVAL_ACTION_TYPE_VERSION_PROMOTION, instance_id=""),
                                  grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELDS")
    assert "version_id" in failed.violations
    failed = await expect_failure(world.gov.approvals.DecideApproval(apb.DecideApprovalRequest()),
                                  grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELDS")
    assert {"approval_id", "verdict"} <= set(failed.violations)
    failed = await expect_failure(world.gov.approvals.ListApprovals(apb.ListApprovalsRequest(page_size=-1)),
                                  grpc.StatusCode.INVALID_ARGUMENT)
    assert "page_size" in failed.violations


async def test_request_id_replay_returns_the_first_response(world: World) -> None:
    rid = f"req-{secrets.token_hex(4)}"
    first = await world.request(request_id=rid)
    again = await world.request(request_id=rid)
    assert again == first
    await expect_failure(world.request(request_id=rid, justification="other"), grpc.StatusCode.INVALID_ARGUMENT,
                         "REQUEST_ID_REUSED")
    _, approver = await world.operator("approver")
    decided = await decide(approver, first.approval_id, request_id=rid)
    assert await decide(approver, first.approval_id, request_id=rid) == decided


# --- end to end: Check → approval → grant ------------------------------------------------------------

def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


async def test_check_needs_approval_then_operators_approve_and_the_grant_is_single_use(world: World) -> None:
    args = {"amount": 120, "to": "acct-7"}

    async def check(**kw: Any) -> decision_pb2.CheckResponse:
        kw.setdefault("arguments", _struct(args))
        return await world.gov.decisions.Check(decision_pb2.CheckRequest(
            instance_id=world.instance.id, tool_name="payments.send", **kw))

    asked = await check(tool_call_id="tc-1")
    assert asked.decision == policy_pb2.DECISION_NEEDS_APPROVAL and asked.approval_id
    seen: list[apb.Approval] = []

    async def watch() -> None:
        async for msg in world.gov.approvals.WatchApproval(apb.WatchApprovalRequest(approval_id=asked.approval_id)):
            seen.append(msg.approval)

    watcher = asyncio.create_task(watch())
    while not seen:
        await asyncio.sleep(0.01)
    assert seen[0].status == PENDING and seen[0].action_type == A.APPROVAL_ACTION_TYPE_TOOL_EXECUTION
    _, first = await world.operator("approver")
    _, second = await world.operator("approver")
    assert (await decide(first, asked.approval_id)).status == PENDING  # HIGH: two decisions
    # Not usable while only one of two operators approved: the caller keeps waiting for it.
    waiting = await check(approval_id=asked.approval_id)
    assert (waiting.decision, waiting.reasons[0].code, waiting.approval_id) == (
        policy_pb2.DECISION_NEEDS_APPROVAL, "APPROVAL_PENDING", asked.approval_id)
    assert (await decide(second, asked.approval_id)).status == APPROVED
    await asyncio.wait_for(watcher, 30)
    assert [a.status for a in seen] == [PENDING, PENDING, APPROVED]
    assert [len(a.decisions) for a in seen] == [0, 1, 2]
    # Changed arguments are not covered.
    other = await check(approval_id=asked.approval_id, arguments=_struct({**args, "amount": 9999}))
    assert (other.decision, other.reasons[0].code) == (policy_pb2.DECISION_DENY, "APPROVAL_MISMATCH")
    allowed = await check(approval_id=asked.approval_id)
    assert allowed.decision == policy_pb2.DECISION_ALLOW and allowed.approval_id == asked.approval_id
    used = await check(approval_id=asked.approval_id)
    assert (used.decision, used.reasons[0].code) == (policy_pb2.DECISION_DENY, "APPROVAL_USED")
    assert (await world.get(asked.approval_id)).HasField("consume_time")
    types = [r.type for r in await change_records(world.governance, asked.approval_id)]
    assert types == [common_pb2.CHANGE_RECORD_TYPE_APPROVAL_REQUESTED] + [common_pb2.CHANGE_RECORD_TYPE_APPROVAL_DECIDED] * 2 + [
        common_pb2.CHANGE_RECORD_TYPE_APPROVAL_CONSUMED]


# --- watching across replicas and restarts ---------------------------------------------------------

async def test_watch_follows_another_replica_and_resumes_after_a_restart(
        registry: Any, tenant: TenantContext, tmp_path: Any) -> None:
    spec = new_database_spec(registry.backend, tmp_path, "governance")
    one = await start_governance(spec, registry)
    two = await start_governance(spec, registry)  # a second replica on the same database
    clients: list[ArmClient] = []
    try:
        agents = await approved_version(tenant.admin)
        inst = await active_instance(tenant.admin, agents)
        on_one, on_two = one.client(tenant.admin_key), two.client(tenant.admin_key)
        clients += [on_one, on_two]
        a = (await on_one.approvals.RequestApproval(apb.RequestApprovalRequest(
            action_type=A.APPROVAL_ACTION_TYPE_INSTANCE_REACTIVATION, instance_id=inst.id, risk=HIGH))).approval
        _, key_a = await operator_key(tenant.admin, "approver")
        _, key_b = await operator_key(tenant.admin, "approver")
        first_on_two = ArmClient(two.address, key_a)
        clients.append(first_on_two)
        seen: list[apb.Approval] = []
        stream = on_one.approvals.WatchApproval(apb.WatchApprovalRequest(approval_id=a.approval_id))
        it = stream.__aiter__()
        seen.append((await it.__anext__()).approval)
        assert seen[0].status == PENDING
        await decide(first_on_two, a.approval_id)  # decided on the other replica
        seen.append((await asyncio.wait_for(it.__anext__(), 30)).approval)
        assert (seen[1].status, len(seen[1].decisions)) == (PENDING, 1)
        # Replica one restarts; its watcher reconnects and gets the current state first, then
        # the changes (made on replica two).
        await stop_governance(one, drop=False)
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(it.__anext__(), 30)
        one = await start_governance(spec, registry)
        resumed = one.client(tenant.admin_key)
        clients.append(resumed)
        again = resumed.approvals.WatchApproval(apb.WatchApprovalRequest(approval_id=a.approval_id))
        it2 = again.__aiter__()
        current = (await it2.__anext__()).approval
        assert current == seen[1]
        second = ArmClient(two.address, key_b)
        clients.append(second)
        await decide(second, a.approval_id)
        final = (await asyncio.wait_for(it2.__anext__(), 30)).approval
        assert final.status == APPROVED
        with pytest.raises(StopAsyncIteration):  # the stream ends after a final status
            await asyncio.wait_for(it2.__anext__(), 30)
    finally:
        for c in clients:
            await c.close()
        await stop_governance(one, drop=False)
        await stop_governance(two)


async def test_background_sweep_expires_an_unanswered_approval(registry: Any, tenant: TenantContext,
                                                               tmp_path: Any) -> None:
    """The sweeper runs by itself (ARM_APPROVAL_SWEEP_S); a watcher sees the timeout as EXPIRED."""
    gov_server = await start_governance(new_database_spec(registry.backend, tmp_path, "governance"), registry,
                                        {"ARM_APPROVAL_SWEEP_S": "0.05"})
    try:
        agents = await approved_version(tenant.admin)
        inst = await active_instance(tenant.admin, agents)
        async with gov_server.client(tenant.admin_key) as gov:
            a = (await gov.approvals.RequestApproval(apb.RequestApprovalRequest(
                action_type=A.APPROVAL_ACTION_TYPE_INSTANCE_QUARANTINE, instance_id=inst.id, risk=LOW,
                ttl=duration_pb2.Duration(nanos=200_000_000)))).approval
            statuses = []
            async for msg in gov.approvals.WatchApproval(apb.WatchApprovalRequest(approval_id=a.approval_id)):
                statuses.append(msg.approval.status)
            assert statuses[0] == PENDING and statuses[-1] == EXPIRED
            final = (await gov.approvals.GetApproval(apb.GetApprovalRequest(approval_id=a.approval_id))).approval
            assert not final.decisions and final.HasField("resolve_time")
    finally:
        await stop_governance(gov_server)
