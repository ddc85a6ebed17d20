"""The OpenAI Agents SDK adapter end to end (issue 11 item 4): the real `openai-agents` package
driven by a scripted `Model` (no network, no API key), real registry, governance and telemetry on
port 0, a policy with one tool allowed, one denied and one needing approval, decided by two
operators from the test."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from agents import Agent as SdkAgent
from agents import ModelResponse, RunConfig, Runner, Usage
from agents.models.interface import Model
from openai.types.responses import ResponseFunctionToolCall, ResponseOutputMessage, ResponseOutputText

from arm.governance.v1 import approvals_pb2 as apb
from arm_client import Arm
from arm_client.adapters.openai_agents import (
    governed_function_tool,
    pending_approvals,
    resolve_approvals,
    run_governed,
)
from tests.client.adapter_support import ALLOWED, DENIED, GUARDED, Ledger, three_way_policy, tool_events
from tests.client.conftest import Agent
from tests.processes import free_port

NO_TRACING = RunConfig(tracing_disabled=True)


def tool_call(name: str, args: dict[str, Any], call_id: str) -> ResponseFunctionToolCall:
    return ResponseFunctionToolCall(type="function_call", name=name, arguments=json.dumps(args), call_id=call_id,
                                    id=f"fc_{call_id}")


def message(text: str) -> ResponseOutputMessage:
    return ResponseOutputMessage(id="msg_1", type="message", role="assistant", status="completed",
                                 content=[ResponseOutputText(type="output_text", text=text, annotations=[])])


class ScriptedModel(Model):
    """Answers each turn from a script: the list of turns' outputs; the last turn's text is made
    from the tool outputs the model has seen, so the test can tell what reached the model."""

    def __init__(self, turns: list[list[Any]]) -> None:
        self.turns = list(turns)
        self.tool_outputs: dict[str, str] = {}  # call id → the output the model was given

    async def get_response(self, system_instructions: str | None, input: Any, model_settings: Any, tools: Any,
                           output_schema: Any, handoffs: Any, tracing: Any, *, previous_response_id: str | None = None,
                           conversation_id: str | None = None, prompt: Any = None) -> ModelResponse:
        for item in input if isinstance(input, list) else []:
            if isinstance(item, dict) and item.get("type") == "function_call_output":
                self.tool_outputs[item["call_id"]] = str(item["output"])
        output = self.turns.pop(0) if self.turns else [message("done: " + " | ".join(self.tool_outputs.values()))]
        return ModelResponse(output=output, usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the tests run without streaming")


def make_tools(arm: Any, ledger: Ledger) -> list[Any]:
    async def lookup(customer: str) -> str:
        """Looks a customer up."""
        ledger.add("lookup", customer)
        return f"{customer}: gold tier"

    def drop_table(table: str) -> str:
        """Drops a table."""
        ledger.add("drop", table)
        return "dropped"

    @arm.governed(name=GUARDED)
    async def pay(to: str, amount: int) -> str:
        """Sends a payment."""
        ledger.add("pay", (to, amount))
        return f"paid {amount} to {to}"

    return [governed_function_tool(arm, lookup, name=ALLOWED),
            governed_function_tool(arm, drop_table, name=DENIED),
            governed_function_tool(arm, pay)]  # name and options from arm.governed


def three_calls() -> list[list[Any]]:
    return [[tool_call("lookup", {"customer": "acme"}, "call_1")],
            [tool_call("drop_table", {"table": "invoices"}, "call_2")],
            [tool_call("pay", {"to": "acme", "amount": 120}, "call_3")]]


async def approval_of(agent: Agent, approval_id: str) -> apb.Approval:
    return (await agent.admin.approvals.GetApproval(apb.GetApprovalRequest(approval_id=approval_id))).approval


async def test_allow_deny_and_approval_through_the_sdks_own_interruption(agent: Agent) -> None:
    await three_way_policy(agent)
    arm = agent.arm()
    ledger = Ledger()
    model = ScriptedModel(three_calls())
    sdk_agent = SdkAgent(name="clerk", model=model, tools=make_tools(arm, ledger))

    async with arm.run("openai-agents") as run:
        result = await Runner.run(sdk_agent, "settle acme", run_config=NO_TRACING)
        # Allowed ran, denied did not, the payment stopped at the SDK's approval interruption.
        assert ledger.calls == [("lookup", "acme")]
        assert model.tool_outputs["call_1"] == "acme: gold tier"
        refusal = model.tool_outputs["call_2"]
        assert "refused tool 'db.drop'" in refusal and "NOT run" in refusal, refusal
        assert "TOOL_RULE_MATCHED" in refusal and "matched rule #1 `db.drop`" in refusal, refusal
        assert [i.tool_name for i in result.interruptions] == ["pay"]
        [(item, approval_id)] = await pending_approvals(result)
        approval = await approval_of(agent, approval_id)
        assert (approval.status, approval.tool_name, approval.run_id) == (apb.APPROVAL_STATUS_PENDING, GUARDED, run.run_id)
        assert approval.arguments["amount"] == 120

        # The approval is decided while the adapter waits; then the run resumes and pays once.
        resolving = asyncio.create_task(resolve_approvals(arm, result, timeout_s=60))
        await agent.decide(approval_id)  # HIGH: both approvers
        state = await asyncio.wait_for(resolving, 60)
        resumed = await Runner.run(sdk_agent, state, run_config=NO_TRACING)

    assert ledger.calls == [("lookup", "acme"), ("pay", ("acme", 120))]
    assert model.tool_outputs["call_3"] == "paid 120 to acme"
    assert resumed.final_output.startswith("done: ") and "paid 120 to acme" in resumed.final_output
    assert (await approval_of(agent, approval_id)).HasField("consume_time")
    assert await arm.flush(30)
    assert await tool_events(agent, run.run_id) == [
        ("TOOL_CALL_STARTED", ALLOWED), ("TOOL_CALL_COMPLETED", ALLOWED),
        ("TOOL_CALL_STARTED", GUARDED), ("TOOL_CALL_COMPLETED", GUARDED)]


async def test_a_denied_approval_reaches_the_model_as_a_refusal(agent: Agent) -> None:
    await three_way_policy(agent)
    arm = agent.arm()
    ledger = Ledger()
    model = ScriptedModel([three_calls()[2]])
    sdk_agent = SdkAgent(name="clerk", model=model, tools=make_tools(arm, ledger))

    async def deny_when_asked() -> None:
        while True:
            listed = await agent.admin.approvals.ListApprovals(apb.ListApprovalsRequest(instance_id=agent.instance_id))
            if listed.approvals:
                await agent.decide(listed.approvals[0].approval_id, apb.APPROVAL_VERDICT_DENY, approvers=1)
                return
            await asyncio.sleep(0.02)

    async with arm.run("openai-agents-denied"):
        denier = asyncio.create_task(deny_when_asked())
        result = await run_governed(arm, sdk_agent, "pay acme", approval_timeout_s=60, run_config=NO_TRACING)
        await denier
    assert ledger.calls == []
    assert "was not granted" in model.tool_outputs["call_3"] and "NOT run" in model.tool_outputs["call_3"]
    assert result.final_output.startswith("done: ")


async def test_approving_in_the_sdk_alone_does_not_run_the_tool(agent: Agent) -> None:
    # An application that approves the interruption itself, without ARM's approval: at the call
    # the adapter presents the still pending approval, governance answers NEEDS_APPROVAL with it
    # (not a DENY), and the model is told the tool was not run.
    await three_way_policy(agent)
    arm = agent.arm()
    ledger = Ledger()
    model = ScriptedModel([three_calls()[2]])
    sdk_agent = SdkAgent(name="clerk", model=model, tools=make_tools(arm, ledger))
    async with arm.run("openai-agents-self-approved"):
        result = await Runner.run(sdk_agent, "pay acme", run_config=NO_TRACING)
        [(item, approval_id)] = await pending_approvals(result)
        state = result.to_state()
        state.approve(item)
        resumed = await Runner.run(sdk_agent, state, run_config=NO_TRACING)
    assert ledger.calls == []
    assert f"approval {approval_id}" in model.tool_outputs["call_3"] and "not granted yet" in model.tool_outputs["call_3"]
    assert resumed.final_output.startswith("done: ")
    assert (await approval_of(agent, approval_id)).status == apb.APPROVAL_STATUS_PENDING




async def test_governance_unreachable_fails_closed_and_the_model_is_told(agent: Agent) -> None:
    arm = Arm(env={**agent.env(), "ARM_GOVERNANCE_ADDRESS": f"127.0.0.1:{free_port()}"}, timeout_s=2)
    try:
        ledger = Ledger()
        model = ScriptedModel([three_calls()[0]])
        sdk_agent = SdkAgent(name="clerk", model=model, tools=make_tools(arm, ledger))
        result = await Runner.run(sdk_agent, "look acme up", run_config=NO_TRACING)
        assert ledger.calls == [] and not result.interruptions
        assert "could not be reached" in model.tool_outputs["call_1"] and "NOT run" in model.tool_outputs["call_1"]
    finally:
        await arm.close()
