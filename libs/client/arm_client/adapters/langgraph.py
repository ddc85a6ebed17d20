"""ARM governance for LangGraph: a governed tool node.

    from langgraph.graph import StateGraph, MessagesState, START
    from langgraph.prebuilt import tools_condition
    from arm_client.adapters.langgraph import governed_tool_node, run_governed

    graph = StateGraph(MessagesState)
    graph.add_node("agent", call_model)
    graph.add_node("tools", governed_tool_node(arm, [lookup, drop_table, pay],
                                               names={"pay": "payments.send"}))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    app = graph.compile(checkpointer=MemorySaver())
    result = await run_governed(arm, app, {"messages": [...]}, {"configurable": {"thread_id": "t1"}})

The node answers the last AI message's tool calls. Each is checked with governance first (tool
name, arguments, declared risk, estimated cost, the current ARM run, and a tool call id derived
from the thread, the message and the model's call id):

- DENY: the tool does not run; its ToolMessage (status "error") is a refusal the model reads.
- NEEDS_APPROVAL: the node calls LangGraph's `interrupt()` with
  `{"arm_approval_id": ..., "tool": ..., "arguments": ..., "tool_call_id": ...}`. Resumed with
  `Command(resume=...)` (any value; a string or a dict's "arm_approval_id" names the approval
  to present, default the one interrupted with), it checks again presenting the approval:
  granted → the tool runs once; still open → it interrupts again with the same approval; denied,
  cancelled or expired → a refusal the model reads.
- ALLOW: the tool runs between TOOL_CALL_STARTED and TOOL_CALL_COMPLETED / TOOL_CALL_FAILED.

LangGraph re-runs a node from its start when it resumes, so the node decides every call first
and runs tools only once no call waits any more: a tool never runs twice. Its checks carry
request ids derived from the tool call id and the resume count, so when the node re-runs
governance answers them from its decision log: nothing is logged twice, and a grant already
used by this very call is not refused as used.

`resume_when_decided` waits for the ARM approvals of a paused thread and resumes it;
`run_governed` invokes a graph and does that until it finishes. A runtime that pauses instead
reads the interrupts (`__interrupt__` of the result) and resumes whenever it likes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool
from langchain_core.tools import tool as as_tool
from langgraph.types import Command, interrupt

from arm_client.adapters._common import GovernedSpec, check, refusal_text, run_allowed, spec_for, tool_call_id
from arm_client.errors import ApprovalExpired, ApprovalRejected, GovernanceUnavailable
from arm_client.sdk import Arm, Decision

__all__ = ["APPROVAL_KEY", "governed_tool_node", "pending_approvals", "resume_when_decided", "run_governed"]

APPROVAL_KEY = "arm_approval_id"
"""The key of the ARM approval id in the value a governed node interrupts with."""


def _tool_and_spec(arm: Arm, item: Any, names: Mapping[str, str], options: Mapping[str, Mapping[str, Any]]
                   ) -> tuple[BaseTool, GovernedSpec]:
    fn = getattr(item, "__wrapped__", item) if hasattr(item, "arm_tool") else item
    tool = item if isinstance(item, BaseTool) else as_tool(fn)
    opts = dict(options.get(tool.name, {}))
    if tool.name in names:
        opts["name"] = names[tool.name]
    spec, _ = spec_for(item if hasattr(item, "arm_tool") else tool, **opts)
    return tool, spec


def governed_tool_node(arm: Arm, tools: Sequence[BaseTool | Callable[..., Any]], *,
                       names: Mapping[str, str] | None = None,
                       options: Mapping[str, Mapping[str, Any]] | None = None,
                       messages_key: str = "messages") -> Callable[..., Any]:
    """A LangGraph node (async) that runs the tool calls of the last AI message under ARM
    governance. `tools`: LangChain tools, plain functions, or functions wrapped by
    `arm.governed(...)` (which bring their ARM name and options and are run unwrapped, checked
    once, here). `names` maps a model-facing tool name to the name governance sees (e.g. "pay" →
    "payments.send"); `options` maps it to `risk`, `cost_usd`, `context`, `fail_open`."""
    table: dict[str, tuple[BaseTool, GovernedSpec]] = {}
    for item in tools:
        tool, spec = _tool_and_spec(arm, item, names or {}, options or {})
        table[tool.name] = (tool, spec)

    async def governed_tools(state: Any, config: RunnableConfig) -> dict[str, Any]:
        messages = state[messages_key] if isinstance(state, Mapping) else getattr(state, messages_key)
        last = next((m for m in reversed(messages) if isinstance(m, AIMessage)), None)
        calls = list(last.tool_calls) if last is not None else []
        thread = str((config.get("configurable") or {}).get("thread_id", ""))
        message_id = str(getattr(last, "id", "") or "")
        # 1. Decide every call (interrupting while approvals are open); nothing runs yet.
        decided: list[tuple[dict[str, Any], str, Decision | str]] = []
        for call in calls:
            name, args, model_call_id = call["name"], dict(call.get("args") or {}), str(call.get("id") or "")
            tcid = tool_call_id("langgraph", thread, message_id, model_call_id)
            if name not in table:
                decided.append((dict(call), tcid, f"Unknown tool {name!r}; it was NOT run. Tools: {sorted(table)}."))
                continue
            spec = table[name][1]
            try:
                decision = await check(arm, spec, args, tcid, request_id=f"{tcid}-0")
                resumes = 0
                while decision.needs_approval:
                    answer = interrupt({APPROVAL_KEY: decision.approval_id, "tool": spec.name, "arguments": args,
                                        "tool_call_id": model_call_id, "decision_id": decision.decision_id})
                    resumes += 1
                    approval_id = _approval_from(answer) or decision.approval_id
                    decision = await check(arm, spec, args, tcid, approval_id=approval_id,
                                           request_id=f"{tcid}-{resumes}")
            except GovernanceUnavailable as exc:
                decided.append((dict(call), tcid, f"ARM governance could not be reached, so tool {spec.name!r} "
                                                  f"was NOT run ({exc.reason or 'UNAVAILABLE'}). Try again later."))
                continue
            decided.append((dict(call), tcid, decision))
        # 2. Run the allowed ones (no interrupt can follow, so none runs twice).
        out: list[ToolMessage] = []
        for asked, tcid, verdict in decided:
            name, model_call_id = asked["name"], str(asked.get("id") or "")
            if isinstance(verdict, str):
                out.append(ToolMessage(verdict, tool_call_id=model_call_id, name=name, status="error"))
                continue
            tool, spec = table[name]
            if verdict.denied:
                out.append(ToolMessage(refusal_text(spec.name, verdict), tool_call_id=model_call_id, name=name,
                                       status="error"))
                continue
            args = dict(asked.get("args") or {})
            result = await run_allowed(arm, spec, verdict, tcid, lambda t=tool, a=args: t.ainvoke(a))  # type: ignore[misc]
            out.append(ToolMessage(result if isinstance(result, str) else str(result), tool_call_id=model_call_id,
                                   name=name))
        return {messages_key: out}

    return governed_tools


def _approval_from(answer: Any) -> str:
    if isinstance(answer, str):
        return answer
    if isinstance(answer, Mapping):
        return str(answer.get(APPROVAL_KEY) or "")
    return ""


async def pending_approvals(graph: Any, config: RunnableConfig) -> dict[str, str]:
    """The paused thread's interrupts from governed nodes: interrupt id → ARM approval id."""
    snapshot = await graph.aget_state(config)
    return {i.id: i.value[APPROVAL_KEY] for i in snapshot.interrupts
            if isinstance(i.value, Mapping) and i.value.get(APPROVAL_KEY)}


async def resume_when_decided(arm: Arm, graph: Any, config: RunnableConfig, *,
                              timeout_s: float | None = None) -> Any:
    """Waits until every ARM approval the paused thread waits for is decided (approved, denied,
    cancelled or expired: the node's check with it then allows or refuses the call), then
    resumes the graph (`Command(resume={interrupt id: approval id})`) and returns its result.
    Raises ApprovalTimeout when `timeout_s` passes first (the thread stays paused)."""
    pending = await pending_approvals(graph, config)
    for approval_id in pending.values():
        try:
            await arm.wait_for_approval(approval_id, timeout_s)
        except (ApprovalRejected, ApprovalExpired):
            pass  # decided; the refusal reaches the model through the node's check
    return await graph.ainvoke(Command(resume=pending), config)


async def run_governed(arm: Arm, graph: Any, input: Any, config: RunnableConfig, *,
                       approval_timeout_s: float | None = None, max_resumes: int = 100) -> Any:
    """`graph.ainvoke(input, config)`, resumed with `resume_when_decided` while governed nodes
    wait for approvals (a thread paused by any other interrupt is returned as is)."""
    result = await graph.ainvoke(input, config)
    for _ in range(max_resumes):
        if not await pending_approvals(graph, config):
            return result
        result = await resume_when_decided(arm, graph, config, timeout_s=approval_timeout_s)
    return result
