"""Every id a request names must belong to the caller's tenant (issue 10, item 7).

Tenant B's admin names one of tenant A's ids in each governance and telemetry RPC that takes ids
(one row per id field, or per kind of target an id field can name), every other field being
valid and B's own: each is NOT_FOUND and names A's id, never an answer, a default or a write
into B. (The registry's RPCs are covered the same way by registry/test_tenant_isolation.py.)
Runs on SQLite and PostgreSQL (the `backend` fixture behind `registry`)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from arm.common.v1 import common_pb2
from arm.governance.v1 import approvals_pb2 as apb
from arm.governance.v1 import audit_pb2, decision_pb2, policy_pb2
from arm.governance.v1 import deployments_pb2 as dpb
from arm.governance.v1 import webhooks_pb2 as wpb
from arm.registry.v1 import agents_pb2
from arm.telemetry.v1 import telemetry_pb2
from arm_client import ArmClient
from tests.conftest import GovernanceServer, RegistryServer, make_tenant
from tests.helpers import AgentSet, approved_version, failure
from tests.telemetry.conftest import TelemetryServer, event
from tests.telemetry.conftest import telemetry as telemetry  # noqa: F401 - the fixture, for this module

A_ = apb.ApprovalActionType
PROJECT, VERSION, TENANT = policy_pb2.POLICY_SCOPE_PROJECT, policy_pb2.POLICY_SCOPE_VERSION, policy_pb2.POLICY_SCOPE_TENANT
CONTROL_PROJECT, CONTROL_TENANT = policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT, policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT


@dataclass
class Side:
    """One tenant with one of everything governance and telemetry keep or refer to."""

    tenant_id: str
    reg: ArmClient
    gov: ArmClient
    tel: ArmClient
    agents: AgentSet
    instance: agents_pb2.AgentInstance
    envelope: policy_pb2.PolicyEnvelope
    approval: apb.Approval
    deployment: dpb.Deployment
    backfill_id: str
    record_id: str
    decision_id: str
    webhook_id: str


async def build_side(registry: RegistryServer, governance: GovernanceServer, telemetry: TelemetryServer,
                     system_admin: ArmClient) -> Side:
    ctx = await make_tenant(registry, system_admin)
    gov, tel = governance.client(ctx.admin_key), telemetry.client(ctx.admin_key)
    agents = await approved_version(ctx.admin)
    inst = (await ctx.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="x",
        legacy_agent_id=f"mc-{secrets.token_hex(4)}"))).agent_instance
    env = (await gov.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(envelope=policy_pb2.PolicyEnvelope(
        name=f"p-{secrets.token_hex(3)}", scope=PROJECT, scope_id=agents.project.id,
        mode=policy_pb2.POLICY_MODE_ENFORCE)))).envelope
    approval = (await gov.approvals.RequestApproval(apb.RequestApprovalRequest(
        action_type=A_.APPROVAL_ACTION_TYPE_TOOL_EXECUTION, instance_id=inst.id, tool_name="fs.write",
        risk=common_pb2.RISK_LEVEL_HIGH, justification="tests"))).approval
    dep = (await gov.deployments.CreateDeployment(dpb.CreateDeploymentRequest(deployment=dpb.Deployment(
        template_id=agents.template.id, environment_id=agents.environment.id,
        target_version_id=agents.version.id), reason="tests"))).deployment
    backfill = (await tel.telemetry.StartBackfill(telemetry_pb2.StartBackfillRequest())).backfill
    resp = await tel.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=[event(instance_id=inst.id)]))
    assert resp.accepted_count == 1, resp
    record = await first_change_record(gov)
    await ctx.admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
        id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))
    decided = await gov.decisions.Check(decision_pb2.CheckRequest(instance_id=inst.id, tool_name="fs.read"))
    assert decided.decision_id, decided
    webhook = (await gov.webhooks.CreateWebhook(wpb.CreateWebhookRequest(webhook=wpb.Webhook(
        url="https://example.invalid/hook", event_types=[wpb.WEBHOOK_EVENT_TYPE_APPROVAL_DECIDED])))).webhook
    return Side(ctx.tenant.id, ctx.admin, gov, tel, agents, inst, env, approval, dep, backfill.backfill_id, record,
                decided.decision_id, webhook.webhook_id)


async def first_change_record(gov: ArmClient) -> str:
    """The id of one of the tenant's change records (they reach the audit trail through the
    outbox, so wait for the first, boundedly)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while loop.time() < deadline:
        listed = await gov.audit.ListChangeRecords(audit_pb2.ListChangeRecordsRequest(page_size=1))
        if listed.records:
            return listed.records[0].record_id
        await asyncio.sleep(0.05)
    raise AssertionError("no change record reached the audit trail")


@pytest.fixture(scope="module")
async def sides(registry: RegistryServer, governance: GovernanceServer, telemetry: TelemetryServer,  # noqa: F811
                system_admin: ArmClient) -> AsyncIterator[tuple[Side, Side]]:
    a = await build_side(registry, governance, telemetry, system_admin)
    b = await build_side(registry, governance, telemetry, system_admin)
    yield a, b
    for side in (a, b):
        for client in (side.reg, side.gov, side.tel):
            await client.close()


Call = Callable[[Side, Side], Awaitable[Any]]


async def first(stream: Any) -> Any:
    async for msg in stream:
        return msg
    return None


def spend(instance_id: str, legacy_agent_id: str = "") -> decision_pb2.ReportSpendRequest:
    return decision_pb2.ReportSpendRequest(entry=decision_pb2.SpendEntry(
        instance_id=instance_id, legacy_agent_id=legacy_agent_id, amount_usd=0.5,
        idempotency_key=f"k-{secrets.token_hex(4)}"))


def approval(**kw: Any) -> apb.RequestApprovalRequest:
    kw.setdefault("risk", common_pb2.RISK_LEVEL_HIGH)
    return apb.RequestApprovalRequest(justification="tests", **kw)


def deployment(b: Side, **kw: str) -> dpb.CreateDeploymentRequest:
    fields = {"template_id": b.agents.template.id, "environment_id": b.agents.environment.id,
              "target_version_id": b.agents.version.id, **kw}
    return dpb.CreateDeploymentRequest(deployment=dpb.Deployment(**fields), reason="tests")


def moved_envelope(b: Side, a: Side) -> policy_pb2.UpdatePolicyEnvelopeRequest:
    env = policy_pb2.PolicyEnvelope(envelope_id=b.envelope.envelope_id, scope=PROJECT, scope_id=a.agents.project.id)
    return policy_pb2.UpdatePolicyEnvelopeRequest(envelope=env, etag=b.envelope.etag,
                                                  update_mask=field_mask_pb2.FieldMask(paths=["scope", "scope_id"]))


# (row name, the call B makes naming A's id, A's id it names)
ROWS: list[tuple[str, Call, Callable[[Side], str]]] = [
    # PolicyService
    ("CreatePolicyEnvelope(scope_id=project)", lambda b, a: b.gov.policies.CreatePolicyEnvelope(
        policy_pb2.CreatePolicyEnvelopeRequest(envelope=policy_pb2.PolicyEnvelope(
            name=f"x-{secrets.token_hex(3)}", scope=PROJECT, scope_id=a.agents.project.id,
            mode=policy_pb2.POLICY_MODE_ENFORCE))), lambda a: a.agents.project.id),
    ("CreatePolicyEnvelope(scope_id=version)", lambda b, a: b.gov.policies.CreatePolicyEnvelope(
        policy_pb2.CreatePolicyEnvelopeRequest(envelope=policy_pb2.PolicyEnvelope(
            name=f"x-{secrets.token_hex(3)}", scope=VERSION, scope_id=a.agents.version.id,
            mode=policy_pb2.POLICY_MODE_ENFORCE))), lambda a: a.agents.version.id),
    ("CreatePolicyEnvelope(scope_id=tenant)", lambda b, a: b.gov.policies.CreatePolicyEnvelope(
        policy_pb2.CreatePolicyEnvelopeRequest(envelope=policy_pb2.PolicyEnvelope(
            name=f"x-{secrets.token_hex(3)}", scope=TENANT, scope_id=a.tenant_id,
            mode=policy_pb2.POLICY_MODE_ENFORCE))), lambda a: a.tenant_id),
    ("GetPolicyEnvelope", lambda b, a: b.gov.policies.GetPolicyEnvelope(policy_pb2.GetPolicyEnvelopeRequest(
        envelope_id=a.envelope.envelope_id)), lambda a: a.envelope.envelope_id),
    ("ListPolicyEnvelopes(scope_id)", lambda b, a: b.gov.policies.ListPolicyEnvelopes(
        policy_pb2.ListPolicyEnvelopesRequest(scope_id=a.agents.project.id)), lambda a: a.agents.project.id),
    ("UpdatePolicyEnvelope(envelope_id)", lambda b, a: b.gov.policies.UpdatePolicyEnvelope(
        policy_pb2.UpdatePolicyEnvelopeRequest(envelope=policy_pb2.PolicyEnvelope(
            envelope_id=a.envelope.envelope_id, description="x"),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]))), lambda a: a.envelope.envelope_id),
    ("UpdatePolicyEnvelope(scope_id)", lambda b, a: b.gov.policies.UpdatePolicyEnvelope(moved_envelope(b, a)),
     lambda a: a.agents.project.id),
    ("DeactivatePolicyEnvelope", lambda b, a: b.gov.policies.DeactivatePolicyEnvelope(
        policy_pb2.DeactivatePolicyEnvelopeRequest(envelope_id=a.envelope.envelope_id)), lambda a: a.envelope.envelope_id),
    ("GetPolicyEnvelopeRevision", lambda b, a: b.gov.policies.GetPolicyEnvelopeRevision(
        policy_pb2.GetPolicyEnvelopeRevisionRequest(envelope_id=a.envelope.envelope_id, revision=1)),
     lambda a: a.envelope.envelope_id),
    ("ListPolicyEnvelopeRevisions", lambda b, a: b.gov.policies.ListPolicyEnvelopeRevisions(
        policy_pb2.ListPolicyEnvelopeRevisionsRequest(envelope_id=a.envelope.envelope_id)), lambda a: a.envelope.envelope_id),
    ("GetEffectivePolicy(instance_id)", lambda b, a: b.gov.policies.GetEffectivePolicy(
        policy_pb2.GetEffectivePolicyRequest(instance_id=a.instance.id)), lambda a: a.instance.id),
    ("SimulatePolicy(candidate.scope_id)", lambda b, a: b.gov.policies.SimulatePolicy(policy_pb2.SimulatePolicyRequest(
        candidate=policy_pb2.PolicyEnvelope(name="sim", scope=PROJECT, scope_id=a.agents.project.id,
                                            mode=policy_pb2.POLICY_MODE_ENFORCE))), lambda a: a.agents.project.id),
    ("SimulatePolicy(candidate.envelope_id)", lambda b, a: b.gov.policies.SimulatePolicy(policy_pb2.SimulatePolicyRequest(
        candidate=policy_pb2.PolicyEnvelope(envelope_id=a.envelope.envelope_id, name="sim", scope=TENANT,
                                            mode=policy_pb2.POLICY_MODE_ENFORCE))), lambda a: a.envelope.envelope_id),
    ("SetOperatorControl(project)", lambda b, a: b.gov.policies.SetOperatorControl(policy_pb2.SetOperatorControlRequest(
        scope=CONTROL_PROJECT, scope_id=a.agents.project.id, mode=policy_pb2.OPERATOR_CONTROL_MODE_PAUSED,
        reason="x")), lambda a: a.agents.project.id),
    ("GetOperatorControl(project)", lambda b, a: b.gov.policies.GetOperatorControl(policy_pb2.GetOperatorControlRequest(
        scope=CONTROL_PROJECT, scope_id=a.agents.project.id)), lambda a: a.agents.project.id),
    ("GetOperatorControl(tenant)", lambda b, a: b.gov.policies.GetOperatorControl(policy_pb2.GetOperatorControlRequest(
        scope=CONTROL_TENANT, scope_id=a.tenant_id)), lambda a: a.tenant_id),
    # DecisionService (Check answers a decision, see test_check_names_another_tenants_ids)
    ("ReportSpend(instance_id)", lambda b, a: b.gov.decisions.ReportSpend(spend(a.instance.id)), lambda a: a.instance.id),
    ("ReportSpend(legacy_agent_id beside own instance)", lambda b, a: b.gov.decisions.ReportSpend(
        spend(b.instance.id, a.instance.legacy_agent_id)), lambda a: a.instance.legacy_agent_id),
    ("GetEffectivePolicy(legacy_agent_id)", lambda b, a: b.gov.policies.GetEffectivePolicy(
        policy_pb2.GetEffectivePolicyRequest(legacy_agent_id=a.instance.legacy_agent_id)),
     lambda a: a.instance.legacy_agent_id),
    # ApprovalService
    ("RequestApproval(instance_id)", lambda b, a: b.gov.approvals.RequestApproval(approval(
        action_type=A_.APPROVAL_ACTION_TYPE_TOOL_EXECUTION, instance_id=a.instance.id, tool_name="fs.write")),
     lambda a: a.instance.id),
    ("RequestApproval(version_id)", lambda b, a: b.gov.approvals.RequestApproval(approval(
        action_type=A_.APPROVAL_ACTION_TYPE_VERSION_PROMOTION, version_id=a.agents.version.id)),
     lambda a: a.agents.version.id),
    ("RequestApproval(version_id beside own instance)", lambda b, a: b.gov.approvals.RequestApproval(approval(
        action_type=A_.APPROVAL_ACTION_TYPE_INSTANCE_QUARANTINE, instance_id=b.instance.id,
        version_id=a.agents.version.id)), lambda a: a.agents.version.id),
    ("RequestApproval(project_id)", lambda b, a: b.gov.approvals.RequestApproval(approval(
        action_type=A_.APPROVAL_ACTION_TYPE_TOOL_EXECUTION, instance_id=b.instance.id, tool_name="fs.write",
        project_id=a.agents.project.id)), lambda a: a.agents.project.id),
    ("RequestApproval(target_id=deployment)", lambda b, a: b.gov.approvals.RequestApproval(approval(
        action_type=A_.APPROVAL_ACTION_TYPE_DEPLOYMENT_ACTIVATION, target_id=a.deployment.deployment_id)),
     lambda a: a.deployment.deployment_id),
    ("RequestApproval(target_id=envelope)", lambda b, a: b.gov.approvals.RequestApproval(approval(
        action_type=A_.APPROVAL_ACTION_TYPE_POLICY_AUTONOMY_INCREASE, target_id=a.envelope.envelope_id)),
     lambda a: a.envelope.envelope_id),
    ("RequestApproval(target_id=instance)", lambda b, a: b.gov.approvals.RequestApproval(approval(
        action_type=A_.APPROVAL_ACTION_TYPE_INSTANCE_QUARANTINE, instance_id=b.instance.id,
        target_id=a.instance.id)), lambda a: a.instance.id),
    ("RequestApproval(target_id=version)", lambda b, a: b.gov.approvals.RequestApproval(approval(
        action_type=A_.APPROVAL_ACTION_TYPE_VERSION_PROMOTION, version_id=b.agents.version.id,
        target_id=a.agents.version.id)), lambda a: a.agents.version.id),
    ("GetDecision", lambda b, a: b.gov.decisions.GetDecision(decision_pb2.GetDecisionRequest(
        decision_id=a.decision_id)), lambda a: a.decision_id),
    ("ListDecisions(instance_id)", lambda b, a: b.gov.decisions.ListDecisions(decision_pb2.ListDecisionsRequest(
        filter=decision_pb2.DecisionFilter(instance_id=a.instance.id))), lambda a: a.instance.id),
    ("ExportDecisions(instance_id)", lambda b, a: first(b.gov.decisions.ExportDecisions(
        decision_pb2.ExportDecisionsRequest(filter=decision_pb2.DecisionFilter(instance_id=a.instance.id)))),
     lambda a: a.instance.id),
    ("ListDeniedTools(instance_id)", lambda b, a: b.gov.decisions.ListDeniedTools(
        decision_pb2.ListDeniedToolsRequest(instance_id=a.instance.id, tools=[
            decision_pb2.ToolQuery(tool_name="fs.read")])), lambda a: a.instance.id),
    ("GetApproval", lambda b, a: b.gov.approvals.GetApproval(apb.GetApprovalRequest(
        approval_id=a.approval.approval_id)), lambda a: a.approval.approval_id),
    ("ListApprovals(instance_id)", lambda b, a: b.gov.approvals.ListApprovals(apb.ListApprovalsRequest(
        instance_id=a.instance.id)), lambda a: a.instance.id),
    ("DecideApproval", lambda b, a: b.gov.approvals.DecideApproval(apb.DecideApprovalRequest(
        approval_id=a.approval.approval_id, verdict=apb.APPROVAL_VERDICT_APPROVE, reason="x")),
     lambda a: a.approval.approval_id),
    ("CancelApproval", lambda b, a: b.gov.approvals.CancelApproval(apb.CancelApprovalRequest(
        approval_id=a.approval.approval_id)), lambda a: a.approval.approval_id),
    ("WatchApproval", lambda b, a: first(b.gov.approvals.WatchApproval(apb.WatchApprovalRequest(
        approval_id=a.approval.approval_id))), lambda a: a.approval.approval_id),
    # DeploymentService
    ("CreateDeployment(template_id)", lambda b, a: b.gov.deployments.CreateDeployment(
        deployment(b, template_id=a.agents.template.id)), lambda a: a.agents.template.id),
    ("CreateDeployment(environment_id)", lambda b, a: b.gov.deployments.CreateDeployment(
        deployment(b, environment_id=a.agents.environment.id)), lambda a: a.agents.environment.id),
    ("CreateDeployment(target_version_id)", lambda b, a: b.gov.deployments.CreateDeployment(
        deployment(b, target_version_id=a.agents.version.id)), lambda a: a.agents.version.id),
    ("GetDeployment", lambda b, a: b.gov.deployments.GetDeployment(dpb.GetDeploymentRequest(
        deployment_id=a.deployment.deployment_id)), lambda a: a.deployment.deployment_id),
    ("ListDeployments(template_id)", lambda b, a: b.gov.deployments.ListDeployments(dpb.ListDeploymentsRequest(
        template_id=a.agents.template.id)), lambda a: a.agents.template.id),
    ("ListDeployments(environment_id)", lambda b, a: b.gov.deployments.ListDeployments(dpb.ListDeploymentsRequest(
        environment_id=a.agents.environment.id)), lambda a: a.agents.environment.id),
    ("ActivateDeployment(deployment_id)", lambda b, a: b.gov.deployments.ActivateDeployment(
        dpb.ActivateDeploymentRequest(deployment_id=a.deployment.deployment_id)), lambda a: a.deployment.deployment_id),
    ("ActivateDeployment(approval_id)", lambda b, a: b.gov.deployments.ActivateDeployment(
        dpb.ActivateDeploymentRequest(deployment_id=b.deployment.deployment_id, approval_id=a.approval.approval_id)),
     lambda a: a.approval.approval_id),
    ("RollbackDeployment", lambda b, a: b.gov.deployments.RollbackDeployment(dpb.RollbackDeploymentRequest(
        deployment_id=a.deployment.deployment_id)), lambda a: a.deployment.deployment_id),
    ("GetActiveDeployment", lambda b, a: b.gov.deployments.GetActiveDeployment(dpb.GetActiveDeploymentRequest(
        template_id=a.agents.template.id, environment_id=a.agents.environment.id)), lambda a: a.agents.template.id),
    # AuditService
    ("GetChangeRecord", lambda b, a: b.gov.audit.GetChangeRecord(audit_pb2.GetChangeRecordRequest(
        record_id=a.record_id)), lambda a: a.record_id),
    # WebhookService
    ("GetWebhook", lambda b, a: b.gov.webhooks.GetWebhook(wpb.GetWebhookRequest(webhook_id=a.webhook_id)),
     lambda a: a.webhook_id),
    ("RotateWebhookSecret", lambda b, a: b.gov.webhooks.RotateWebhookSecret(wpb.RotateWebhookSecretRequest(
        webhook_id=a.webhook_id)), lambda a: a.webhook_id),
    ("DeleteWebhook", lambda b, a: b.gov.webhooks.DeleteWebhook(wpb.DeleteWebhookRequest(webhook_id=a.webhook_id)),
     lambda a: a.webhook_id),
    ("ListWebhookDeliveries", lambda b, a: b.gov.webhooks.ListWebhookDeliveries(wpb.ListWebhookDeliveriesRequest(
        webhook_id=a.webhook_id)), lambda a: a.webhook_id),
    # TelemetryService
    ("QueryEvents(filter.instance_id)", lambda b, a: b.tel.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(
        filter=telemetry_pb2.EventFilter(instance_id=a.instance.id))), lambda a: a.instance.id),
    ("QueryEvents(filter.project_id)", lambda b, a: b.tel.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(
        filter=telemetry_pb2.EventFilter(project_id=a.agents.project.id))), lambda a: a.agents.project.id),
    ("QueryEvents(filter.version_id)", lambda b, a: b.tel.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(
        filter=telemetry_pb2.EventFilter(version_id=a.agents.version.id))), lambda a: a.agents.version.id),
    ("TailEvents(filter.instance_id)", lambda b, a: first(b.tel.telemetry.TailEvents(telemetry_pb2.TailEventsRequest(
        filter=telemetry_pb2.EventFilter(instance_id=a.instance.id)))), lambda a: a.instance.id),
    ("GetBackfillStatus", lambda b, a: b.tel.telemetry.GetBackfillStatus(telemetry_pb2.GetBackfillStatusRequest(
        backfill_id=a.backfill_id)), lambda a: a.backfill_id),
]


@pytest.mark.parametrize(("name", "call", "a_id"), ROWS, ids=[r[0] for r in ROWS])
async def test_naming_another_tenants_id_is_not_found(sides: tuple[Side, Side], name: str, call: Call,
                                                      a_id: Callable[[Side], str]) -> None:
    a, b = sides
    ident = a_id(a)
    assert ident, f"{name}: tenant A has no such id to name"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(b, a)
    got = failure(refused.value)
    assert got.code == grpc.StatusCode.NOT_FOUND, f"{name}: {got}"
    assert ident in got.message or ident in got.metadata.values(), f"{name} did not name A's id: {got}"


# Each event column naming a registry resource, with the rejection reason.
EVENT_REFS = [("instance_id", "AGENT_INSTANCE_NOT_FOUND", lambda a: a.instance.id),
              ("version_id", "AGENT_VERSION_NOT_FOUND", lambda a: a.agents.version.id),
              ("template_id", "AGENT_TEMPLATE_NOT_FOUND", lambda a: a.agents.template.id),
              ("project_id", "PROJECT_NOT_FOUND", lambda a: a.agents.project.id),
              ("environment_id", "ENVIRONMENT_NOT_FOUND", lambda a: a.agents.environment.id)]


@pytest.mark.parametrize(("column", "reason", "a_id"), EVENT_REFS, ids=[r[0] for r in EVENT_REFS])
async def test_an_event_naming_another_tenants_id_is_rejected_and_not_stored(
        sides: tuple[Side, Side], column: str, reason: str, a_id: Callable[[Side], str]) -> None:
    a, b = sides
    run = f"x-{secrets.token_hex(4)}"
    mine, theirs = event(run_id=run), event(run_id=run)
    setattr(theirs, column, a_id(a))
    for send in ("unary", "stream"):
        mine.event_id, theirs.event_id = f"m-{secrets.token_hex(4)}", f"t-{secrets.token_hex(4)}"
        if send == "unary":
            resp = await b.tel.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=[mine, theirs]))
            rejected, accepted = list(resp.rejected), resp.accepted_count
        else:
            async def one() -> AsyncIterator[telemetry_pb2.StreamIngestEventsRequest]:
                yield telemetry_pb2.StreamIngestEventsRequest(batch_id="b1", events=[mine, theirs])
            reply = await first(b.tel.telemetry.StreamIngestEvents(one()))
            rejected, accepted = list(reply.rejected), reply.accepted_count
        assert accepted == 1
        assert [(r.index, r.event_id, r.reason) for r in rejected] == [(1, theirs.event_id, reason)]
    stored = await b.tel.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(
        filter=telemetry_pb2.EventFilter(run_id=run)))
    assert len(stored.events) == 2 and all(e.event_id.startswith("m-") for e in stored.events), stored


async def test_check_names_another_tenants_ids(sides: tuple[Side, Side]) -> None:
    """Check always answers a decision (SPEC §4: fail closed): another tenant's instance is an
    unknown agent (DENY), another tenant's approval grants nothing."""
    a, b = sides
    resp = await b.gov.decisions.Check(decision_pb2.CheckRequest(instance_id=a.instance.id, tool_name="fs.read"))
    assert resp.decision == policy_pb2.DECISION_DENY and resp.reasons[0].code == "UNKNOWN_AGENT", resp
    batch = await b.gov.decisions.CheckBatch(decision_pb2.CheckBatchRequest(checks=[
        decision_pb2.CheckRequest(instance_id=a.instance.id, tool_name="fs.read")]))
    assert batch.results[0].decision == policy_pb2.DECISION_DENY, batch


def test_the_table_covers_every_id_field_of_governance_and_telemetry() -> None:
    """A new RPC or id field shows up here until it has a row (or is listed as not a reference)."""
    from google.protobuf import descriptor_pool

    not_references = {  # ids the caller coins, outputs ignored on input, or free-form search keys
        "request_id", "run_id", "tool_call_id", "batch_id", "event_id", "entry_id", "trace_id", "task_id",
        "workflow_run_id", "change_record_id", "legacy_agent_id", "created_by.id", "updated_by.id", "approved_by.id",
        "tenant_id", "previous_version_id", "deployment_id", "record_id", "actor.id", "target_id", "actor_id"}
    rpcs = {r[0].split("(")[0] for r in ROWS} | {"Check", "CheckBatch", "IngestEvents", "StreamIngestEvents"}
    pool = descriptor_pool.Default()
    missing = []
    for service in ("arm.governance.v1.PolicyService", "arm.governance.v1.DecisionService",
                    "arm.governance.v1.ApprovalService", "arm.governance.v1.DeploymentService",
                    "arm.governance.v1.AuditService", "arm.governance.v1.WebhookService",
                    "arm.telemetry.v1.TelemetryService"):
        for m in pool.FindServiceByName(service).methods:
            ids = [f.name for f in m.input_type.fields if f.type == f.TYPE_STRING
                   and (f.name == "id" or f.name.endswith("_id")) and f.name not in not_references]
            nested = [f for f in m.input_type.fields if f.message_type is not None
                      and not f.message_type.full_name.startswith("google.")]
            if (ids or nested) and m.name not in rpcs and m.name not in {
                    "AppendChangeRecords", "ListChangeRecords", "ExportChangeRecords", "ListOperatorControls",
                    "StartBackfill", "GetRunTrace", "VerifyChain", "GetEventStats",
                    # No stored row is looked up: envelope scope ids are labels, risk overrides
                    # are the caller's tenant's own (issue 12).
                    "EvaluatePolicy", "SetRiskOverrides",
                    # Names no id: a URL, event types and a secret (nested message, output ids).
                    "CreateWebhook",
                    # Only the instance's own agent key may call them: any other caller is
                    # PERMISSION_DENIED before an id is looked up, so an id's existence in another
                    # tenant never shows (tests/client/test_local_decisions.py).
                    "WatchDecisionInputs", "RecordLocalDecisions"}:
                missing.append(m.name)
    assert not missing, f"RPCs taking ids without a cross-tenant row: {missing}"

