"""ListDeniedTools (issue 15): an agent key asks which of its tools its policy denies whatever the
arguments, for its own instance only; the etag changes with the policy."""

from __future__ import annotations

import grpc
import pytest

from arm.common.v1 import common_pb2
from arm.governance.v1 import decision_pb2, policy_pb2
from tests.client.conftest import Agent, agent  # noqa: F401  (the fixture)
from tests.telemetry.conftest import telemetry  # noqa: F401  (the fixture)

Q = decision_pb2.ToolQuery


def request(instance_id: str, *tools: tuple[str, int]) -> decision_pb2.ListDeniedToolsRequest:
    return decision_pb2.ListDeniedToolsRequest(instance_id=instance_id, tools=[
        Q(tool_name=name, declared_risk=risk) for name, risk in tools])


async def test_an_agent_key_learns_its_outright_denied_tools_and_the_etag_follows_policy(
        agent: Agent) -> None:  # noqa: F811  (the fixture)
    client = agent.governance.client(agent.key)
    try:
        tools = [("up.echo", common_pb2.RISK_LEVEL_LOW), ("up.delete", common_pb2.RISK_LEVEL_CRITICAL),
                 ("up.pay", common_pb2.RISK_LEVEL_HIGH)]
        first = await client.decisions.ListDeniedTools(request(agent.instance_id, *tools))
        assert [d.tool_name for d in first.denied] == ["up.delete"]
        assert first.denied[0].reasons[0].code == "BASELINE_CRITICAL" and first.etag

        # A rule that only some arguments trigger does not deny outright; one without does.
        await agent.admin.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
            envelope=policy_pb2.PolicyEnvelope(
                name="gw", scope=policy_pb2.POLICY_SCOPE_VERSION, scope_id=agent.agents.version.id,
                mode=policy_pb2.POLICY_MODE_ENFORCE, active=True, tool_rules=[
                    policy_pb2.ToolRule(tool="up.echo", effect=policy_pb2.DECISION_DENY),
                    policy_pb2.ToolRule(tool="up.delete", effect=policy_pb2.DECISION_ALLOW),
                    policy_pb2.ToolRule(tool="up.pay", effect=policy_pb2.DECISION_DENY,
                                        when=policy_pb2.ToolRuleCondition(arg_patterns=["bob"]))])))
        second = await client.decisions.ListDeniedTools(request(agent.instance_id, *tools))
        assert [d.tool_name for d in second.denied] == ["up.echo"]
        assert second.denied[0].rule_description == "up.echo → DENY"
        assert second.etag != first.etag and second.policy_epoch > first.policy_epoch
        again = await client.decisions.ListDeniedTools(request(agent.instance_id, *tools))
        assert again.etag == second.etag
    finally:
        await client.close()


async def test_only_its_own_instance_and_valid_input(agent: Agent) -> None:  # noqa: F811  (the fixture)
    client = agent.governance.client(agent.key)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await client.decisions.ListDeniedTools(request("ai-someone-else", ("x", 0)))
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED and "own instance" in (exc.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await client.decisions.ListDeniedTools(request(agent.instance_id, ("a", 0), ("a", 0), ("", 9)))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = exc.value.details() or ""
        assert "tools[1].tool_name" in details or "tools[2]" in details, details
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await client.decisions.ListDeniedTools(decision_pb2.ListDeniedToolsRequest(instance_id=agent.instance_id))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await client.close()
    # An operator key of the tenant may ask about the instance too.
    resp = await agent.admin.decisions.ListDeniedTools(request(agent.instance_id, ("up.delete", 4)))
    assert [d.tool_name for d in resp.denied] == ["up.delete"]
