"""Smoke test of the decision path over real gRPC: registry and governance as separate servers."""

from __future__ import annotations

from arm.governance.v1 import decision_pb2, policy_pb2
from arm.registry.v1 import agents_pb2
from tests.helpers import approved_version


async def test_check_baseline_then_policy(registry, governance, tenant) -> None:  # type: ignore[no-untyped-def]
    agents = await approved_version(tenant.admin)
    inst = (await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="w",
        legacy_agent_id=f"legacy-{agents.version.id}"))).agent_instance
    await tenant.admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
        id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))
    gov = governance.client(tenant.admin_key)
    first = await gov.decisions.Check(decision_pb2.CheckRequest(instance_id=inst.id, tool_name="fs.read"))
    assert first.decision == policy_pb2.DECISION_ALLOW, first
    assert first.step == decision_pb2.DECISION_STEP_BASELINE
    assert first.decision_id
    env = (await gov.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(envelope=policy_pb2.PolicyEnvelope(
        name="no fs", scope=policy_pb2.POLICY_SCOPE_VERSION, scope_id=agents.version.id,
        mode=policy_pb2.POLICY_MODE_ENFORCE,
        tool_rules=[policy_pb2.ToolRule(tool="fs.*", effect=policy_pb2.DECISION_DENY)])))).envelope
    assert env.revision == 1
    denied = await gov.decisions.Check(decision_pb2.CheckRequest(
        legacy_agent_id=f"legacy-{agents.version.id}", tool_name="fs.read"))
    assert denied.decision == policy_pb2.DECISION_DENY, denied
    assert denied.envelope_id == env.envelope_id and denied.scope == policy_pb2.POLICY_SCOPE_VERSION
    approval = await gov.decisions.Check(decision_pb2.CheckRequest(
        instance_id=inst.id, tool_name="payments.send", tool_call_id="tc-1"))
    assert approval.decision == policy_pb2.DECISION_NEEDS_APPROVAL, approval
    assert approval.approval_id
    again = await gov.decisions.Check(decision_pb2.CheckRequest(
        instance_id=inst.id, tool_name="payments.send", tool_call_id="tc-1"))
    assert again.approval_id == approval.approval_id
    unknown = await gov.decisions.Check(decision_pb2.CheckRequest(instance_id="ins_nope", tool_name="fs.read"))
    assert unknown.decision == policy_pb2.DECISION_DENY and unknown.reasons[0].code == "UNKNOWN_AGENT"
    await gov.close()
