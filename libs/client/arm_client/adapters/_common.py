"""What the framework adapters share (no framework imports here)."""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from arm.governance.v1 import decision_pb2
from arm.telemetry.v1 import events_pb2
from arm_client.connection import new_request_id
from arm_client.errors import GovernanceUnavailable, Reason, Unavailable, from_rpc_error
from arm_client.sdk import Arm, Decision, ToolOptions, current_run, risk_level, to_struct

T = TypeVar("T")


@dataclass(frozen=True)
class GovernedSpec:
    """How one framework tool is governed.

    Attributes:
        name: the tool name governance sees (e.g. "payments.send"; the framework may show the
            model another one, since model-facing names allow no dots).
        risk: declared risk ("LOW" … "CRITICAL" or the enum number), None = governance's own.
        cost_usd: estimated cost of one call, checked against budgets.
        context: free-form context logged with each decision.
        fail_open: run the tool when governance cannot be reached (default: refuse it).
    """

    name: str
    risk: str | int | None = None
    cost_usd: float = 0.0
    context: Mapping[str, Any] | None = None
    fail_open: bool = False


def spec_for(fn: Any, *, name: str | None = None, risk: str | int | None = None, cost_usd: float | None = None,
             context: Mapping[str, Any] | None = None, fail_open: bool | None = None) -> tuple[GovernedSpec, Any]:
    """The spec of a tool and the callable to run once allowed. A function already wrapped by
    `arm.governed(...)` brings its options (`.arm_tool`) and is run unwrapped (`__wrapped__`), so
    it is checked once, by the adapter; keywords given here win."""
    opts: ToolOptions | None = getattr(fn, "arm_tool", None)
    target = getattr(fn, "__wrapped__", fn) if opts is not None else fn
    default_name = opts.name if opts is not None else str(getattr(fn, "name", None) or getattr(fn, "__name__", "tool"))
    spec = GovernedSpec(
        name=name or default_name,
        risk=risk if risk is not None else (opts.risk if opts is not None else None),
        cost_usd=cost_usd if cost_usd is not None else (opts.cost_usd if opts is not None else 0.0),
        context=context if context is not None else (opts.context if opts is not None else None),
        fail_open=fail_open if fail_open is not None else bool(opts is not None and opts.fail_open))
    return spec, target


def tool_call_id(*parts: str) -> str:
    """A tool call id for ARM derived from the framework's identifiers (run or thread, message,
    the model's call id): the same call gets the same id when a run resumes, possibly in another
    process, so its approval is found again; different runs never share one (models and scripts
    reuse call ids such as "call_1")."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
    return f"tc-{digest}"


def refusal_text(tool: str, decision: Decision) -> str:
    """What the model reads instead of the tool's output when governance refuses the call."""
    codes = ", ".join(r.code for r in decision.reasons) or "DENY"
    sentences = decision.sentences or "Governance denied this call."
    return (f"ARM governance refused tool {tool!r}; it was NOT run. {sentences} "
            f"(reasons: {codes}; decision {decision.decision_id or 'n/a'}). Do not retry the same call: "
            "change it, use another tool, or tell the user it is not allowed.")


def pending_text(tool: str, approval_id: str) -> str:
    return (f"ARM approval {approval_id} for tool {tool!r} is not granted yet; the tool was NOT run. "
            "Ask again later or tell the user it awaits approval.")


async def check(arm: Arm, spec: GovernedSpec, arguments: Mapping[str, Any] | None, tcid: str, *,
                approval_id: str = "", request_id: str | None = None) -> Decision:
    """One `Check` for `spec`. With `request_id`, a repeat of the same request (a framework that
    re-executes a node on resume) is answered from governance's decision log: the first answer,
    nothing logged twice (no second POLICY_DENIED, no grant denied as USED). A governance outage
    is GovernanceUnavailable, or an ALLOW for a fail-open tool."""
    if request_id is None:
        try:
            return await arm.check(spec.name, arguments, risk=spec.risk, cost_usd=spec.cost_usd, tool_call_id=tcid,
                                   approval_id=approval_id or None, context=spec.context)
        except GovernanceUnavailable as exc:
            if not spec.fail_open:
                raise
            return Decision("ALLOW", "", (Reason("GOVERNANCE_UNAVAILABLE_FAIL_OPEN", str(exc)),), "", tcid)
    # arm.check makes a fresh request id per call; a replayable one needs the request by hand.
    run = current_run()
    ref = {"instance_id": arm.settings.instance_id} if arm.settings.instance_id else \
        {"legacy_agent_id": arm.settings.legacy_agent_id}
    req = decision_pb2.CheckRequest(
        tool_name=spec.name, arguments=to_struct(arguments), declared_risk=risk_level(spec.risk),  # type: ignore[arg-type]
        estimated_cost_usd=spec.cost_usd, run_id=run.run_id if run else "", tool_call_id=tcid,
        approval_id=approval_id, context=to_struct(spec.context), request_id=request_id, **ref)
    wire_id = new_request_id()
    try:
        resp = await arm.stubs.decisions.Check(req, timeout=arm.settings.timeout_s, metadata=(("x-request-id", wire_id),))
    except grpc.RpcError as exc:
        err = from_rpc_error(exc, wire_id)
        if isinstance(err, Unavailable):
            if spec.fail_open:
                return Decision("ALLOW", "", (Reason("GOVERNANCE_UNAVAILABLE_FAIL_OPEN", str(err)),), "", tcid)
            raise from_rpc_error(exc, wire_id, as_type=GovernanceUnavailable) from None
        raise err from None
    return Decision.from_response(resp, tcid)


def tool_started(arm: Arm, spec: GovernedSpec, decision: Decision, tcid: str) -> float:
    """Emits TOOL_CALL_STARTED (naming the decision and any approval used); returns the start."""
    payload: dict[str, Any] = {"tool_name": spec.name}
    if decision.decision_id:
        payload["decision_id"] = decision.decision_id
    else:
        payload["governance"] = "unavailable"
    if decision.approval_id:
        payload["approval_id"] = decision.approval_id
    arm.emit(events_pb2.OP_EVENT_TYPE_TOOL_CALL_STARTED, tool_call_id=tcid, payload=payload)
    return time.perf_counter()


def tool_finished(arm: Arm, spec: GovernedSpec, tcid: str, started: float, exc: BaseException | None) -> None:
    """Emits TOOL_CALL_COMPLETED, or TOOL_CALL_FAILED with the error, with the duration."""
    payload: dict[str, Any] = {"tool_name": spec.name, "duration_ms": (time.perf_counter() - started) * 1000}
    kind = events_pb2.OP_EVENT_TYPE_TOOL_CALL_COMPLETED
    if exc is not None:
        kind = events_pb2.OP_EVENT_TYPE_TOOL_CALL_FAILED
        payload.update(error_type=type(exc).__name__, error=str(exc)[:1000])
    arm.emit(kind, tool_call_id=tcid, payload=payload)


async def run_allowed(arm: Arm, spec: GovernedSpec, decision: Decision, tcid: str,
                      call: Callable[[], Awaitable[T] | T]) -> T:
    """Runs an allowed tool between TOOL_CALL_STARTED and TOOL_CALL_COMPLETED / TOOL_CALL_FAILED
    (with its duration), as `arm.governed` does; the tool's own exception is re-raised."""
    started = tool_started(arm, spec, decision, tcid)
    try:
        result = call()
        if inspect.isawaitable(result):
            result = await result
    except BaseException as exc:
        tool_finished(arm, spec, tcid, started, exc)
        raise
    tool_finished(arm, spec, tcid, started, None)
    return result  # type: ignore[return-value]
