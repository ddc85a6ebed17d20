"""The LangGraph adapter end to end (issue 11 item 4): a real `langgraph` graph with a
MemorySaver checkpointer, driven by a scripted LangChain chat model (no network, no API key),
real registry, governance and telemetry on port 0, a policy with one tool allowed, one denied
and one needing approval, decided by two operators from the test."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import MemorySaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import tools_condition
from langgraph.types import Command
from pydantic import Field
from sqlalchemy import func, select

from arm.governance.v1 import approvals_pb2 as apb
from arm_client.adapters.langgraph import APPROVAL_KEY, governed_tool_node, resume_when_decided, run_governed
from arm_governance import models
from tests.client.adapter_support import ALLOWED, DENIED, GUARDED, Ledger, three_way_policy, tool_events
from tests.client.conftest import Agent


class ScriptedChatModel(BaseChatModel):
    """Answers each turn from a script; once it runs out, with the tool outputs it has seen."""

    turns: list[AIMessage] = Field(default_factory=list)
    seen: dict[str, str] = Field(default_factory=dict)  # tool call id → what the model was given

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        for m in messages:
            if isinstance(m, ToolMessage):
                self.seen[m.tool_call_id] = str(m.content)
        reply = self.turns.pop(0) if self.turns else AIMessage("done: " + " | ".join(self.seen.values()))
        return ChatResult(generations=[ChatGeneration(message=reply)])


def calls(*items: tuple[str, dict[str, Any], str]) -> AIMessage:
    return AIMessage("", tool_calls=[{"name": n, "args": a, "id": i, "type": "tool_call"} for n, a, i in items])


LOOKUP = ("lookup", {"customer": "acme"}, "call_1")
DROP = ("drop_table", {"table": "invoices"}, "call_2")
PAY = ("pay", {"to": "acme", "amount": 120}, "call_3")


def build(arm: Any, model: ScriptedChatModel, ledger: Ledger) -> Any:
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

    async def agent_node(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.bind_tools([]).ainvoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("agent", agent_node)
    graph.add_node("tools", governed_tool_node(arm, [lookup, drop_table, pay],
                                               names={"lookup": ALLOWED, "drop_table": DENIED}))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    return graph.compile(checkpointer=MemorySaver())


def thread() -> RunnableConfig:
    return {"configurable": {"thread_id": f"thread-{secrets.token_hex(4)}"}}


async def approval_of(agent: Agent, approval_id: str) -> apb.Approval:
    return (await agent.admin.approvals.GetApproval(apb.GetApprovalRequest(approval_id=approval_id))).approval


async def decisions_for(agent: Agent, tool: str) -> int:
    async def read(s: Any) -> int:
        return int((await s.execute(select(func.count()).select_from(models.DecisionRecord).where(
            models.DecisionRecord.instance_id == agent.instance_id,
            models.DecisionRecord.tool_name == tool))).scalar_one())
    return await agent.governance.db.read(read)


async def test_allow_deny_and_interrupt_resumed_with_the_approval(agent: Agent) -> None:
    await three_way_policy(agent)
    arm = agent.arm()
    ledger = Ledger()
    model = ScriptedChatModel(turns=[calls(LOOKUP), calls(DROP), calls(PAY)])
    app = build(arm, model, ledger)
    config = thread()
    async with arm.run("langgraph") as run:
        paused = await app.ainvoke({"messages": [("user", "settle acme")]}, config)
        assert ledger.calls == [("lookup", "acme")]
        assert model.seen["call_1"] == "acme: gold tier"
        refusal = model.seen["call_2"]
        assert "refused tool 'db.drop'" in refusal and "NOT run" in refusal and "TOOL_RULE_MATCHED" in refusal, refusal
        [waiting] = paused["__interrupt__"]
        approval_id = waiting.value[APPROVAL_KEY]
        assert (waiting.value["tool"], waiting.value["arguments"]) == (GUARDED, {"to": "acme", "amount": 120})
        approval = await approval_of(agent, approval_id)
        assert (approval.status, approval.tool_name, approval.run_id) == (apb.APPROVAL_STATUS_PENDING, GUARDED,
                                                                          run.run_id)

        resuming = asyncio.create_task(resume_when_decided(arm, app, config, timeout_s=60))
        await agent.decide(approval_id)  # HIGH: both approvers
        final = await asyncio.wait_for(resuming, 60)

    assert ledger.calls == [("lookup", "acme"), ("pay", ("acme", 120))]
    assert model.seen["call_3"] == "paid 120 to acme"
    last = final["messages"][-1]
    assert isinstance(last, AIMessage) and "paid 120 to acme" in str(last.content)
    assert "__interrupt__" not in final
    assert (await approval_of(agent, approval_id)).HasField("consume_time")
    assert await arm.flush(30)
    assert await tool_events(agent, run.run_id) == [
        ("TOOL_CALL_STARTED", ALLOWED), ("TOOL_CALL_COMPLETED", ALLOWED),
        ("TOOL_CALL_STARTED", GUARDED), ("TOOL_CALL_COMPLETED", GUARDED)]


async def test_parallel_calls_run_once_each_across_early_and_late_resumes(agent: Agent) -> None:
    # One AI message asks for all three tools: nothing runs while the payment waits; a resume
    # before the approval is decided interrupts again with the same approval (governance answers
    # NEEDS_APPROVAL to the pending id, not DENY); after it, each allowed tool runs exactly once,
    # though LangGraph re-ran the node on every resume, and nothing was logged twice.
    await three_way_policy(agent)
    arm = agent.arm()
    ledger = Ledger()
    model = ScriptedChatModel(turns=[calls(LOOKUP, DROP, PAY)])
    app = build(arm, model, ledger)
    config = thread()
    async with arm.run("langgraph-parallel"):
        paused = await app.ainvoke({"messages": [("user", "settle acme")]}, config)
        [first] = paused["__interrupt__"]
        approval_id = first.value[APPROVAL_KEY]
        assert ledger.calls == []

        early = await app.ainvoke(Command(resume={first.id: approval_id}), config)
        [second] = early["__interrupt__"]
        assert second.value[APPROVAL_KEY] == approval_id and second.id != first.id
        assert ledger.calls == []
        assert (await approval_of(agent, approval_id)).status == apb.APPROVAL_STATUS_PENDING

        await agent.decide(approval_id)
        final = await resume_when_decided(arm, app, config, timeout_s=60)

    assert sorted(ledger.calls, key=str) == sorted([("lookup", "acme"), ("pay", ("acme", 120))], key=str)
    assert "TOOL_RULE_MATCHED" in model.seen["call_2"]
    assert model.seen["call_1"] == "acme: gold tier" and model.seen["call_3"] == "paid 120 to acme"
    assert "__interrupt__" not in final
    # Checks of one call are answered from the decision log when the node re-runs.
    assert await decisions_for(agent, ALLOWED) == 1
    assert await decisions_for(agent, DENIED) == 1
    assert await decisions_for(agent, GUARDED) == 3  # asked, presented while pending, presented when granted


async def test_a_denied_approval_reaches_the_model_as_a_refusal(agent: Agent) -> None:
    await three_way_policy(agent)
    arm = agent.arm()
    ledger = Ledger()
    model = ScriptedChatModel(turns=[calls(PAY)])
    app = build(arm, model, ledger)

    async def deny_when_asked() -> None:
        while True:
            listed = await agent.admin.approvals.ListApprovals(apb.ListApprovalsRequest(instance_id=agent.instance_id))
            if listed.approvals:
                await agent.decide(listed.approvals[0].approval_id, apb.APPROVAL_VERDICT_DENY, approvers=1)
                return
            await asyncio.sleep(0.02)

    async with arm.run("langgraph-denied"):
        denier = asyncio.create_task(deny_when_asked())
        final = await run_governed(arm, app, {"messages": [("user", "pay acme")]}, thread(), approval_timeout_s=60)
        await asyncio.wait_for(denier, 60)
    assert ledger.calls == []
    refusal = model.seen["call_3"]
    assert "refused tool 'payments.send'" in refusal and "APPROVAL_NOT_APPROVED" in refusal, refusal
    assert "__interrupt__" not in final and "done: " in str(final["messages"][-1].content)
