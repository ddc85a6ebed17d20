"""Decision provenance (issue 14 item 3): a DENY's opEvent payload, its POLICY_DENIED change
record and GetDecision / ListDecisions / ExportDecisions all name the same envelope, revision,
rule, scope, step and policy epoch; the log reads are tenant-scoped and need `audit:read`.
(The decision span's attributes: tests/test_decision_traces.py.)"""

from __future__ import annotations

import asyncio
import json

import grpc
from google.protobuf import json_format

from arm.common.v1 import common_pb2
from arm.governance.v1 import audit_pb2, decision_pb2, policy_pb2
from arm.registry.v1 import agents_pb2
from arm.telemetry.v1 import events_pb2
from arm_governance.decisions.op_events import waiting_op_events
from tests.conftest import GovernanceServer, RegistryServer, TenantContext, make_tenant
from tests.helpers import approved_version, expect_failure, operator_key


async def _deny_setup(tenant: TenantContext, governance: GovernanceServer) -> tuple[str, policy_pb2.PolicyEnvelope]:
    agents = await approved_version(tenant.admin)
    inst = (await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="w"))).agent_instance
    await tenant.admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
        id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))
    gov = governance.client(tenant.admin_key)
    envelope = (await gov.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(
            name="no shell", scope=policy_pb2.POLICY_SCOPE_VERSION, scope_id=agents.version.id,
            mode=policy_pb2.POLICY_MODE_ENFORCE,
            tool_rules=[policy_pb2.ToolRule(tool="fs.*", effect=policy_pb2.DECISION_ALLOW),
                        policy_pb2.ToolRule(tool="shell.*", effect=policy_pb2.DECISION_DENY)])))).envelope
    await gov.close()
    return inst.id, envelope


async def test_a_deny_names_its_envelope_revision_and_rule_everywhere(
        registry: RegistryServer, governance: GovernanceServer, tenant: TenantContext) -> None:
    instance_id, envelope = await _deny_setup(tenant, governance)
    gov = governance.client(tenant.admin_key)
    allowed = await gov.decisions.Check(decision_pb2.CheckRequest(
        instance_id=instance_id, tool_name="fs.read", run_id="run-1"))
    denied = await gov.decisions.Check(decision_pb2.CheckRequest(
        instance_id=instance_id, tool_name="shell.exec", run_id="run-1", tool_call_id="tc-9"))
    assert denied.decision == policy_pb2.DECISION_DENY, denied
    assert (denied.envelope_id, denied.envelope_revision, denied.rule_index) == (envelope.envelope_id, 1, 1)
    expected = {
        "envelope_id": envelope.envelope_id, "envelope_revision": 1.0, "scope": "POLICY_SCOPE_VERSION",
        "scope_id": envelope.scope_id, "rule_kind": "RULE_KIND_TOOL_RULE", "rule_index": 1.0,
        "step": "DECISION_STEP_ENVELOPE", "policy_epoch": float(denied.policy_epoch),
        "decision": "DECISION_DENY", "decision_id": denied.decision_id,
    }

    # The opEvent (waiting in governance's outbox, derived from the decision log: no telemetry here).
    events = await governance.db.read(lambda s: waiting_op_events(s, tenant.tenant.id))
    [event] = [e for e in events if e.event_id == f"evt-{denied.decision_id}"]
    assert event.type == events_pb2.OP_EVENT_TYPE_TOOL_CALL_BLOCKED
    payload = json_format.MessageToDict(event.payload)
    assert {k: payload.get(k) for k in expected} == expected, payload

    # The POLICY_DENIED change record, once the relay has put it in the audit trail.
    records: list[common_pb2.ChangeRecord] = []
    for _ in range(600):
        records = list((await gov.audit.ListChangeRecords(audit_pb2.ListChangeRecordsRequest(
            filter=audit_pb2.ChangeRecordFilter(types=[common_pb2.CHANGE_RECORD_TYPE_POLICY_DENIED],
                                                target_id="tc-9")))).records)
        if records:
            break
        await asyncio.sleep(0.05)
    assert len(records) == 1, records
    record = json_format.MessageToDict(records[0].payload)
    assert {k: record.get(k) for k in expected} == expected, record
    assert (record["agent_ref"], record["tool_name"], record["reasons"]) == (
        instance_id, "shell.exec", [r.code for r in denied.reasons]), record

    # The decision log's read API says the same.
    got = (await gov.decisions.GetDecision(decision_pb2.GetDecisionRequest(
        decision_id=denied.decision_id))).decision
    assert got.response == denied
    assert (got.instance_id, got.tool_name, got.run_id, got.tool_call_id) == (instance_id, "shell.exec", "run-1", "tc-9")
    assert got.request.tool_name == "shell.exec"

    listed = (await gov.decisions.ListDecisions(decision_pb2.ListDecisionsRequest(
        filter=decision_pb2.DecisionFilter(instance_id=instance_id)))).decisions
    assert [d.decision_id for d in listed] == [denied.decision_id, allowed.decision_id]  # newest first
    only_denied = (await gov.decisions.ListDecisions(decision_pb2.ListDecisionsRequest(
        filter=decision_pb2.DecisionFilter(instance_id=instance_id, decision=policy_pb2.DECISION_DENY)))).decisions
    assert [d.decision_id for d in only_denied] == [denied.decision_id]
    by_tool = (await gov.decisions.ListDecisions(decision_pb2.ListDecisionsRequest(
        filter=decision_pb2.DecisionFilter(tool_name="fs.read", run_id="run-1")))).decisions
    assert [d.decision_id for d in by_tool] == [allowed.decision_id]
    # Pages of one: the same two, in order, then the end.
    first = await gov.decisions.ListDecisions(decision_pb2.ListDecisionsRequest(
        filter=decision_pb2.DecisionFilter(run_id="run-1"), page_size=1))
    second = await gov.decisions.ListDecisions(decision_pb2.ListDecisionsRequest(
        filter=decision_pb2.DecisionFilter(run_id="run-1"), page_size=1, page_token=first.next_page_token))
    assert [d.decision_id for d in [*first.decisions, *second.decisions]] == [denied.decision_id, allowed.decision_id]
    assert first.next_page_token and not second.next_page_token
    # Time range: nothing before the first decision.
    before = decision_pb2.DecisionFilter(run_id="run-1", end_time=allowed.decide_time)
    assert not (await gov.decisions.ListDecisions(decision_pb2.ListDecisionsRequest(filter=before))).decisions

    lines: list[dict[str, object]] = []
    async for chunk in gov.decisions.ExportDecisions(decision_pb2.ExportDecisionsRequest(
            filter=decision_pb2.DecisionFilter(run_id="run-1"))):
        lines.extend(json.loads(line) for line in chunk.data.decode().splitlines())
    assert [line["decisionId"] for line in lines] == [allowed.decision_id, denied.decision_id]  # oldest first
    exported = lines[1]["response"]
    assert isinstance(exported, dict)
    assert (exported["envelopeId"], exported["envelopeRevision"], exported["ruleIndex"]) == \
        (envelope.envelope_id, "1", 1)
    await gov.close()


async def test_decision_reads_are_tenant_scoped_need_audit_read_and_validate(
        registry: RegistryServer, governance: GovernanceServer, tenant: TenantContext,
        system_admin) -> None:  # type: ignore[no-untyped-def]
    instance_id, _ = await _deny_setup(tenant, governance)
    gov = governance.client(tenant.admin_key)
    denied = await gov.decisions.Check(decision_pb2.CheckRequest(instance_id=instance_id, tool_name="shell.exec"))
    other = await make_tenant(registry, system_admin)
    stranger = governance.client(other.admin_key)
    await expect_failure(stranger.decisions.GetDecision(decision_pb2.GetDecisionRequest(
        decision_id=denied.decision_id)), grpc.StatusCode.NOT_FOUND, "DECISION_NOT_FOUND")
    assert not (await stranger.decisions.ListDecisions(decision_pb2.ListDecisionsRequest())).decisions
    # An agent key may check, not read the log.
    _, agent_key = await operator_key(tenant.admin, "agent")
    agent = governance.client(agent_key)
    await expect_failure(agent.decisions.GetDecision(decision_pb2.GetDecisionRequest(
        decision_id=denied.decision_id)), grpc.StatusCode.PERMISSION_DENIED)
    await expect_failure(agent.decisions.ListDecisions(decision_pb2.ListDecisionsRequest()),
                         grpc.StatusCode.PERMISSION_DENIED)
    # An auditor may.
    _, auditor_key = await operator_key(tenant.admin, "auditor")
    auditor = governance.client(auditor_key)
    assert (await auditor.decisions.GetDecision(decision_pb2.GetDecisionRequest(
        decision_id=denied.decision_id))).decision.response == denied
    # Bad input is INVALID_ARGUMENT.
    await expect_failure(gov.decisions.ListDecisions(decision_pb2.ListDecisionsRequest(page_size=-1)),
                         grpc.StatusCode.INVALID_ARGUMENT)
    await expect_failure(gov.decisions.ListDecisions(decision_pb2.ListDecisionsRequest(
        filter=decision_pb2.DecisionFilter(decision=99))), grpc.StatusCode.INVALID_ARGUMENT)
    await expect_failure(gov.decisions.ListDecisions(decision_pb2.ListDecisionsRequest(page_token="%%%")),
                         grpc.StatusCode.INVALID_ARGUMENT)
    await expect_failure(gov.decisions.GetDecision(decision_pb2.GetDecisionRequest()),
                         grpc.StatusCode.INVALID_ARGUMENT)
    for client in (gov, stranger, agent, auditor):
        await client.close()
    await other.admin.close()
