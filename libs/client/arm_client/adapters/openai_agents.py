"""ARM governance for the OpenAI Agents SDK (`openai-agents`).

    from agents import Agent
    from arm_client.adapters.openai_agents import governed_function_tool, run_governed

    pay = governed_function_tool(arm, send_payment, name="payments.send", risk="HIGH")
    agent = Agent(name="clerk", model=..., tools=[pay, ...])
    async with arm.run("invoice-42"):
        result = await run_governed(arm, agent, "pay invoice 42")

Each call of a governed function tool is checked with governance from the tool's own
`needs_approval` hook (tool name, arguments, declared risk, estimated cost, the current ARM run
and a tool call id derived from the run and the model's call id):

- ALLOW: the tool runs (between TOOL_CALL_STARTED and TOOL_CALL_COMPLETED / TOOL_CALL_FAILED).
- DENY: the tool does not run; the model gets a refusal as the tool's output (the reasons and
  sentences, and a hint not to retry the same call) and can act on it.
- NEEDS_APPROVAL: the run stops with the SDK's own approval interruption (`result.interruptions`).
  `resolve_approvals` waits for each ARM approval and approves the interruption in the SDK's
  `RunState` (or rejects it with a refusal the model reads, when the approval is denied, cancelled
  or expired); `Runner.run(agent, state)` then resumes, and the tool checks again presenting the
  approval, which lets it run exactly once. `run_governed` does that loop. A runtime that pauses
  instead keeps `result.to_state()` and `pending_approvals(result)` and resumes later.

Approving an interruption in the SDK alone does not run the tool: at the call, governance is
asked again with the approval, and an approval not yet granted comes back to the model as "not
granted yet". Governance unreachable: the model is told the tool was not run (fail closed), unless
the tool is declared `fail_open=True`.

The ARM tool call id is derived from the current ARM run id (`arm.run(...)`) and the model's call
id: run agents inside `arm.run(...)` (re-entered with the same `run_id` to resume in another
process), so that two runs reusing a call id such as "call_1" never share an approval."""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any

from agents import Agent, FunctionTool, Runner, function_tool
from agents.items import ToolApprovalItem
from agents.result import RunResult
from agents.run_context import RunContextWrapper
from agents.run_state import RunState
from agents.tool_context import ToolContext

from arm_client.adapters._common import (
    GovernedSpec,
    check,
    pending_text,
    refusal_text,
    spec_for,
    tool_call_id,
    tool_finished,
    tool_started,
)
from arm_client.errors import ApprovalExpired, ApprovalRejected, GovernanceUnavailable
from arm_client.sdk import Arm, Decision, current_run

__all__ = ["ArmToolGovernance", "governed_function_tool", "pending_approvals", "resolve_approvals",
           "run_governed"]

# The exception the wrapped function raised in the current invocation, if any: the SDK's failure
# handler turns it into a message for the model, so the invoker alone cannot tell a failure.
_failures: contextvars.ContextVar[list[BaseException] | None] = contextvars.ContextVar("arm_oa_failures",
                                                                                         default=None)


class ArmToolGovernance:
    """The governance of one function tool (its `arm_governance` attribute): the decisions made
    by its `needs_approval` hook, kept until the call runs or its approval is resolved."""

    def __init__(self, arm: Arm, spec: GovernedSpec) -> None:
        self.arm = arm
        self.spec = spec
        self.decisions: dict[str, Decision | GovernanceUnavailable] = {}

    @staticmethod
    def tool_call_id(call_id: str) -> str:
        run = current_run()
        return tool_call_id("openai-agents", run.run_id if run else "", call_id)

    async def needs_approval(self, _ctx: RunContextWrapper[Any], params: dict[str, Any], call_id: str) -> bool:
        """The SDK's `needs_approval` hook: the ARM Check of this call."""
        tcid = self.tool_call_id(call_id)
        try:
            decision = await check(self.arm, self.spec, params, tcid)
        except GovernanceUnavailable as exc:
            self.decisions[tcid] = exc  # refused at the call (fail closed), not an approval
            return False
        self.decisions[tcid] = decision
        return decision.needs_approval

    async def approval_id(self, call_id: str, arguments: str | None) -> str:
        """The ARM approval an interruption of this call waits for."""
        tcid = self.tool_call_id(call_id)
        known = self.decisions.get(tcid)
        if isinstance(known, Decision) and known.approval_id:
            return known.approval_id
        # Resumed elsewhere: asking again under the same tool call id names the same approval.
        decision = await check(self.arm, self.spec, _arguments(arguments), tcid)
        self.decisions[tcid] = decision
        return decision.approval_id

    def forget(self, call_id: str) -> None:
        self.decisions.pop(self.tool_call_id(call_id), None)

    async def invoke(self, ctx: ToolContext[Any], raw: str, inner: Callable[[ToolContext[Any], str], Any]) -> Any:
        tcid = self.tool_call_id(ctx.tool_call_id)
        arguments = _arguments(raw)
        known = self.decisions.pop(tcid, None)
        if isinstance(known, GovernanceUnavailable):
            return (f"ARM governance could not be reached, so tool {self.spec.name!r} was NOT run "
                    f"({known.reason or 'UNAVAILABLE'}). Try again later.")
        decision = known
        try:
            if decision is None or decision.needs_approval:
                # Resumed after the SDK's approval (or from a state restored elsewhere): present
                # the ARM approval, which allows the call only once it is granted.
                approval = decision.approval_id if decision is not None else ""
                if not approval:
                    decision = await check(self.arm, self.spec, arguments, tcid)
                    approval = decision.approval_id if decision.needs_approval else ""
                if approval:
                    decision = await check(self.arm, self.spec, arguments, tcid, approval_id=approval)
        except GovernanceUnavailable as exc:
            return (f"ARM governance could not be reached, so tool {self.spec.name!r} was NOT run "
                    f"({exc.reason or 'UNAVAILABLE'}). Try again later.")
        assert decision is not None
        if decision.denied:
            return refusal_text(self.spec.name, decision)
        if decision.needs_approval:
            return pending_text(self.spec.name, decision.approval_id)
        failures: list[BaseException] = []
        token = _failures.set(failures)
        started = tool_started(self.arm, self.spec, decision, tcid)
        try:
            result = await inner(ctx, raw)
        except BaseException as exc:
            failures.append(exc)
            raise
        finally:
            _failures.reset(token)
            tool_finished(self.arm, self.spec, tcid, started, failures[0] if failures else None)
        return result


def _arguments(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    value = json.loads(raw)
    return value if isinstance(value, dict) else {"input": value}


def _recording(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, noting its exception for the invoker (same signature, name and docs for the SDK)."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def recording_async(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except BaseException as exc:
                _note(exc)
                raise
        return recording_async

    @functools.wraps(fn)
    def recording(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            _note(exc)
            raise
    return recording


def _note(exc: BaseException) -> None:
    slot = _failures.get()
    if slot is not None and not slot:
        slot.append(exc)


def governed_function_tool(arm: Arm, fn: Callable[..., Any], *, name: str | None = None,
                           risk: str | int | None = None, cost_usd: float | None = None,
                           context: Mapping[str, Any] | None = None, fail_open: bool | None = None,
                           **function_tool_kwargs: Any) -> FunctionTool:
    """A `FunctionTool` of `fn` (sync or async, as `agents.function_tool` takes it) whose every
    call is governed by ARM. `name` is the tool name governance sees (default: a function
    wrapped by `arm.governed` brings its own, else the function's name); the model sees the
    function's name or `name_override`. Other keywords go to `agents.function_tool`."""
    spec, target = spec_for(fn, name=name, risk=risk, cost_usd=cost_usd, context=context, fail_open=fail_open)
    governance = ArmToolGovernance(arm, spec)
    tool = function_tool(_recording(target), needs_approval=governance.needs_approval, **function_tool_kwargs)
    inner = tool.on_invoke_tool

    async def on_invoke_tool(ctx: ToolContext[Any], raw: str) -> Any:
        return await governance.invoke(ctx, raw, inner)

    tool.on_invoke_tool = on_invoke_tool
    tool.arm_governance = governance  # type: ignore[attr-defined]
    return tool


def _governance_of(item: ToolApprovalItem) -> ArmToolGovernance | None:
    agent = item.agent
    for tool in getattr(agent, "tools", ()) or ():
        governance = getattr(tool, "arm_governance", None)
        if isinstance(governance, ArmToolGovernance) and getattr(tool, "name", None) == item.tool_name:
            return governance
    return None


def _call_id(item: ToolApprovalItem) -> str:
    raw = item.raw_item
    call_id = raw.get("call_id") if isinstance(raw, dict) else getattr(raw, "call_id", None)
    return str(call_id or "")


async def pending_approvals(result: RunResult) -> list[tuple[ToolApprovalItem, str]]:
    """The interruptions of governed tools with the ARM approval id each waits for (for a
    runtime that stores the state and resumes once the approvals are decided)."""
    out = []
    for item in result.interruptions:
        governance = _governance_of(item)
        if governance is not None:
            out.append((item, await governance.approval_id(_call_id(item), item.arguments)))
    return out


async def resolve_approvals(arm: Arm, result: RunResult, *, timeout_s: float | None = None,
                            state: RunState[Any] | None = None) -> RunState[Any]:
    """Waits for the ARM approval of every governed interruption of `result` and records the
    outcome in the run state: approved → `state.approve(item)`; denied, cancelled or expired →
    `state.reject(item, rejection_message=...)` with a refusal the model reads. Interruptions of
    other tools are left for the caller. Returns the state to resume with
    (`Runner.run(agent, state)`). Raises ApprovalTimeout when `timeout_s` passes first (the state
    stays resumable)."""
    state = state if state is not None else result.to_state()
    for item, approval_id in await pending_approvals(result):
        governance = _governance_of(item)
        assert governance is not None
        try:
            await arm.wait_for_approval(approval_id, timeout_s)
        except (ApprovalRejected, ApprovalExpired) as exc:
            governance.forget(_call_id(item))
            state.reject(item, rejection_message=(
                f"ARM approval {approval_id} for tool {governance.spec.name!r} was not granted ({exc}); "
                "the tool was NOT run. Do not retry the same call: change it or tell the user."))
            continue
        state.approve(item)
    return state


async def run_governed(arm: Arm, agent: Agent[Any], input: Any, *, approval_timeout_s: float | None = None,
                       max_resumes: int = 100, **runner_kwargs: Any) -> RunResult:
    """`Runner.run` that resolves governed approval interruptions and resumes until the run ends
    (or stops at an interruption of a tool that ARM does not govern, returned as is)."""
    result = await Runner.run(agent, input, **runner_kwargs)
    for _ in range(max_resumes):
        if not result.interruptions or not await pending_approvals(result):
            return result
        state = await resolve_approvals(arm, result, timeout_s=approval_timeout_s)
        result = await Runner.run(agent, state, **runner_kwargs)
    return result
