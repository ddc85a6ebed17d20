"""The runtime SDK: `Arm` (asyncio) governs an agent's tool calls and reports its runs.

    arm = Arm()                                   # ARM_ADDRESS, ARM_API_KEY, ARM_INSTANCE_ID

    @arm.governed(risk="HIGH")
    async def send_payment(to: str, amount: float) -> str: ...

    async with arm.run("invoice-42"):
        await send_payment("acct-7", 120)         # Check → (approval) → run → events

Each governed call asks governance (`Check`) with the tool name, its arguments, the declared
risk, the estimated cost, the current run id and a fresh tool call id:

- ALLOW runs the tool, between TOOL_CALL_STARTED and TOOL_CALL_COMPLETED / TOOL_CALL_FAILED
  (with its duration; the tool's own exception is re-raised unchanged);
- DENY raises `ToolDenied` (decision id, reason codes, sentences);
- NEEDS_APPROVAL waits on `WatchApproval` (re-opened after a disconnect or a governance restart,
  bounded by the tool's approval timeout), then checks again with the approval id and runs; a
  denied or cancelled approval raises `ApprovalRejected`, an expired one `ApprovalExpired`, a wait
  that times out `ApprovalTimeout` (an `ApprovalPending`). With `wait=False` it raises
  `ApprovalPending(approval_id)` at once, for runtimes that pause and resume: call the tool again
  inside `with arm.approval(approval_id):` once it is decided;
- governance unreachable raises `GovernanceUnavailable` (fail closed), or, for a tool declared
  `fail_open=True`, runs it and marks its events `governance: unavailable`.

Events leave in the background (`arm_client.events`); `arm.events_dropped` counts what could not
be kept. `ArmSync` (arm_client.sync) offers the same to plain threads."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import functools
import inspect
import itertools
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import grpc
from google.protobuf import struct_pb2

from arm.common.v1 import common_pb2
from arm.governance.v1 import approvals_pb2, decision_pb2, decision_pb2_grpc, policy_pb2
from arm.telemetry.v1 import events_pb2, telemetry_pb2
from arm_client.connection import Settings, new_request_id, open_channel, target
from arm_client.errors import (
    ApprovalExpired,
    ApprovalPending,
    ApprovalRejected,
    ApprovalTimeout,
    ArmError,
    GovernanceUnavailable,
    Reason,
    ToolDenied,
    Unavailable,
    from_rpc_error,
)
from arm_client.events import EventSender
from arm_client.local import LocalDecider, SpoolError
from arm_client.stubs import ArmClient

log = logging.getLogger("arm_client")

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

RISK_LEVELS = {"LOW": common_pb2.RISK_LEVEL_LOW, "MEDIUM": common_pb2.RISK_LEVEL_MEDIUM,
               "HIGH": common_pb2.RISK_LEVEL_HIGH, "CRITICAL": common_pb2.RISK_LEVEL_CRITICAL}
DECISIONS = {policy_pb2.DECISION_ALLOW: "ALLOW", policy_pb2.DECISION_DENY: "DENY",
             policy_pb2.DECISION_NEEDS_APPROVAL: "NEEDS_APPROVAL"}
OPEN_STATUSES = {approvals_pb2.APPROVAL_STATUS_PENDING, approvals_pb2.APPROVAL_STATUS_ESCALATED}
# Stream failures after which re-opening the watch can succeed (a governance restart, a lost
# connection, a replica going away).
WATCH_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                   grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
DEFAULT_APPROVAL_TIMEOUT_S = 3600.0  # a tool execution approval expires after 1 h (SPEC §3)

_current_run: ContextVar[Run | None] = ContextVar("arm_current_run", default=None)
_resume_approval: ContextVar[str | None] = ContextVar("arm_resume_approval", default=None)


def risk_level(risk: str | int | None) -> int:
    """"HIGH" / common_pb2.RISK_LEVEL_HIGH / None → the enum value (0 = not declared)."""
    if risk is None:
        return common_pb2.RISK_LEVEL_UNSPECIFIED
    if isinstance(risk, int):
        return risk
    try:
        return RISK_LEVELS[risk.upper()]
    except KeyError:
        raise ValueError(f"risk must be one of {', '.join(RISK_LEVELS)}, got {risk!r}") from None


def jsonable(value: Any) -> Any:
    """A value a protobuf Struct can hold: JSON scalars, lists and string-keyed dicts; dataclasses
    and pydantic models as their fields; anything else as its str()."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return float(value) if isinstance(value, int) else value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return jsonable(dump())
    return str(value)


def to_struct(value: Mapping[str, Any] | None, *, plain: bool = False) -> struct_pb2.Struct | None:
    """The Struct of `value`; `plain`: it is already what `jsonable` returns."""
    if value is None:
        return None
    out = struct_pb2.Struct()
    out.update(value if plain else jsonable(value))
    return out


@dataclass(frozen=True)
class Decision:
    """Governance's answer to one `Check`.

    Attributes:
        decision: "ALLOW", "DENY" or "NEEDS_APPROVAL".
        decision_id: the logged decision's id ("" for a fail-open ALLOW made without governance).
        reasons: codes and sentences, the deciding one first.
        approval_id: for NEEDS_APPROVAL the approval to wait for; for an ALLOW from a grant, the
            approval consumed.
        tool_call_id: the tool call id the check was made under.
        effective_risk: "LOW" … "CRITICAL" ("" when governance was not asked).
        response: the full `CheckResponse` (None when governance was not asked).
    """

    decision: str
    decision_id: str
    reasons: tuple[Reason, ...]
    approval_id: str
    tool_call_id: str
    effective_risk: str = ""
    response: decision_pb2.CheckResponse | None = None

    @property
    def allowed(self) -> bool:
        return self.decision == "ALLOW"

    @property
    def denied(self) -> bool:
        return self.decision == "DENY"

    @property
    def needs_approval(self) -> bool:
        return self.decision == "NEEDS_APPROVAL"

    @property
    def sentences(self) -> str:
        return " ".join(r.message for r in self.reasons)

    @classmethod
    def from_response(cls, resp: decision_pb2.CheckResponse, tool_call_id: str) -> Decision:
        risk = common_pb2.RiskLevel.Name(resp.effective_risk).removeprefix("RISK_LEVEL_") \
            if resp.effective_risk else ""
        return cls(DECISIONS.get(resp.decision, "DENY"), resp.decision_id,
                   tuple(Reason(r.code, r.message) for r in resp.reasons), resp.approval_id, tool_call_id,
                   risk, resp)


@dataclass(frozen=True)
class ToolOptions:
    """How one governed tool is checked (the keywords of `Arm.governed`)."""

    name: str
    """Tool name governance sees, e.g. "payments.send"; default: the function's name."""
    risk: str | int | None = None
    """Declared risk ("LOW" … "CRITICAL"); governance takes the max of it and its own."""
    cost_usd: float = 0.0
    """Estimated cost of one call in US dollars, checked against budgets."""
    wait: bool = True
    """On NEEDS_APPROVAL wait for the approval (True) or raise ApprovalPending at once (False)."""
    approval_timeout_s: float | None = None
    """How long to wait for an approval; None = the Arm's default (1 h, the approval's expiry)."""
    fail_open: bool | None = None
    """Run the tool when governance cannot be reached; None = the Arm's default (fail closed)."""
    context: Mapping[str, Any] | None = None
    """Free-form context logged with each decision."""
    on_pending: Callable[[str], None] | None = None
    """Called with the approval id when a call starts waiting for an approval (e.g. to tell a
    human where to approve). Runs on the SDK's event loop: keep it quick; its errors are logged."""


@dataclass(frozen=True)
class Authorization:
    """What let a governed call run: the decision, or None when it ran fail-open."""

    tool_call_id: str
    decision: Decision


class Run:
    """One agent run: a context manager (`with` or `async with`) that makes itself the current
    run of the context (contextvars, so concurrent tasks and nested runs stay apart), sends
    RUN_STARTED on entry and RUN_COMPLETED or RUN_FAILED (with the duration and, for a failure,
    the error type and message) on exit. Governed calls and `report_cost` inside it carry its id."""

    def __init__(self, arm: Arm, name: str, run_id: str | None, metadata: Mapping[str, Any] | None) -> None:
        self.arm = arm
        self.name = name
        self.run_id = run_id or f"run-{secrets.token_hex(8)}"
        self.metadata = dict(metadata or {})
        self.parent: Run | None = None
        self._token: Any = None
        self._started = 0.0

    def __enter__(self) -> Run:
        self.parent = _current_run.get()
        self._token = _current_run.set(self)
        self._started = time.perf_counter()
        payload: dict[str, Any] = {"name": self.name, **({"metadata": self.metadata} if self.metadata else {})}
        if self.parent is not None:
            payload["parent_run_id"] = self.parent.run_id
        self.arm._emit(events_pb2.OP_EVENT_TYPE_RUN_STARTED, run_id=self.run_id, payload=payload)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        duration_ms = (time.perf_counter() - self._started) * 1000
        payload: dict[str, Any] = {"name": self.name, "duration_ms": duration_ms}
        if exc is None:
            self.arm._emit(events_pb2.OP_EVENT_TYPE_RUN_COMPLETED, run_id=self.run_id, payload=payload)
        else:
            payload.update(error_type=type(exc).__name__, error=str(exc)[:1000])
            self.arm._emit(events_pb2.OP_EVENT_TYPE_RUN_FAILED, run_id=self.run_id, payload=payload)
        try:
            _current_run.reset(self._token)
        except ValueError:  # exited in another context than entered: leave that context alone
            pass

    async def __aenter__(self) -> Run:
        await self.arm._ensure_started()
        return self.__enter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.__exit__(exc_type, exc, tb)

    def report_cost(self, usd: float, **kw: Any) -> None:
        """`Arm.report_cost` for this run."""
        self.arm.report_cost(usd, run_id=self.run_id, **kw)


def current_run() -> Run | None:
    """The run of the current context, if any."""
    return _current_run.get()


@contextlib.contextmanager
def resume_with_approval(approval_id: str) -> Iterator[None]:
    """Governed calls in this block present `approval_id` (see `Arm.approval`)."""
    token = _resume_approval.set(approval_id)
    try:
        yield
    finally:
        _resume_approval.reset(token)


def bind_arguments(sig: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by parameter name (defaults filled in; `self`/`cls` left out)."""
    if sig is None:
        return {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k not in ("self", "cls")}


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


class Arm:
    """The runtime SDK's entry point (asyncio). Every argument left out is read from the
    environment (`Settings.from_env`): `ARM_ADDRESS` (default 127.0.0.1:50051), per service
    `ARM_REGISTRY_ADDRESS` / `ARM_GOVERNANCE_ADDRESS` / `ARM_TELEMETRY_ADDRESS`, `ARM_API_KEY`,
    `ARM_INSTANCE_ID` or `ARM_LEGACY_AGENT_ID` (the agent whose calls are checked), `ARM_TIMEOUT_S`.

    Use it as `async with Arm() as arm:` or call `await arm.close()` at the end (events still
    queued are flushed; at interpreter exit they are flushed too).

    Args:
        fail_open: default for tools that do not say: run them when governance is unreachable
            (False: raise GovernanceUnavailable).
        approval_timeout_s: default wait for an approval (1 h, the approval's own expiry).
        event_queue_size: events kept while telemetry is slow or down; beyond it they are counted
            in `events_dropped` and logged.
        event_batch_size, flush_interval_s: how events are batched.
        close_timeout_s: how long `close` (and interpreter exit) waits for queued events.
        local_decisions: decide calls in this process with governance's engine, from the inputs
            governance streams (`WatchDecisionInputs`), each decision written to the spool
            before it is returned and shipped in the background (see `arm_client.local`); what is not
            decided locally (approvals, grants, budgets, a stale stream, a full spool) goes to
            `Check`. Needs the agent's instance id and its own agent key.
        local_spool_dir: the spool's directory (default `ARM_SPOOL_DIR`, else `.arm/spool`).
        local_stale_after_s: how long without a message on the inputs stream (heartbeats come
            every `local_heartbeat_ms`) before calls go to `Check` instead.
        local_max_spool: decisions governance has not acknowledged yet beyond which calls go to
            `Check` (shipping down or behind).
        local_inputs_address: where the inputs stream connects (its own channel); default the
            governance address.
        local_fsync_interval_ms: how often the spool is fdatasync'ed in the background. A
            decision's record is written to the spool file before `check` returns, so a crash
            of this process loses none; a power loss loses at most this window's decisions.
    """

    def __init__(self, address: str | None = None, api_key: str | None = None, *,
                 instance_id: str | None = None, legacy_agent_id: str | None = None,
                 registry_address: str | None = None, governance_address: str | None = None,
                 telemetry_address: str | None = None, timeout_s: float | None = None,
                 fail_open: bool = False, approval_timeout_s: float = DEFAULT_APPROVAL_TIMEOUT_S,
                 event_queue_size: int = 10_000, event_batch_size: int = 500, flush_interval_s: float = 0.25,
                 close_timeout_s: float = 5.0, env: Mapping[str, str] | None = None,
                 settings: Settings | None = None, local_decisions: bool = False,
                 local_spool_dir: str | None = None, local_stale_after_s: float = 3.0,
                 local_max_spool: int = 100_000, local_heartbeat_ms: int = 500,
                 local_inputs_address: str | None = None, local_fsync_interval_ms: float = 5.0) -> None:
        self.settings = settings or Settings.from_env(
            env, address=address, registry_address=registry_address, governance_address=governance_address,
            telemetry_address=telemetry_address, api_key=api_key, instance_id=instance_id,
            legacy_agent_id=legacy_agent_id, timeout_s=timeout_s)
        self.fail_open = fail_open
        self.approval_timeout_s = approval_timeout_s
        self.close_timeout_s = close_timeout_s
        self._stubs: ArmClient | None = None
        self._sender = EventSender(self._ingest, max_queue=event_queue_size, batch_size=event_batch_size,
                                   flush_interval_s=flush_interval_s)
        self._closed = False
        self._managed = False  # True when an ArmSync owns it (and its exit)
        self._clock_lock = threading.Lock()
        self._last_us = 0
        self._event_prefix = f"ev-{secrets.token_hex(6)}"
        self._event_seq = itertools.count(1)
        self._local: LocalDecider | None = None
        self._local_options: dict[str, Any] | None = None
        if local_decisions:
            spool_dir = local_spool_dir or (env if env is not None else os.environ).get("ARM_SPOOL_DIR") or ".arm/spool"
            if not self.settings.instance_id:
                raise ValueError("local_decisions=True needs the agent's instance id (instance_id= or ARM_INSTANCE_ID)")
            self._inputs_address = local_inputs_address or self.settings.governance_address
            self._local_options = dict(spool_dir=spool_dir, stale_after_s=local_stale_after_s,
                                       max_spool=local_max_spool, heartbeat_ms=local_heartbeat_ms,
                                       fsync_interval_ms=local_fsync_interval_ms)
        atexit.register(_flush_at_exit, weakref.ref(self))

    # --- connection ------------------------------------------------------------------------------

    @property
    def stubs(self) -> ArmClient:
        """The raw typed stubs (`.decisions`, `.approvals`, `.telemetry`, …) on this Arm's channels;
        they raise grpc errors, not the SDK's."""
        if self._stubs is None:
            self._stubs = ArmClient(settings=self.settings)
        return self._stubs

    async def _ensure_started(self) -> None:
        if self._sender._task is None and not self._closed:
            self._sender.start()
        if self._local_options is not None and self._local is None and not self._closed:
            self._inputs_channel = open_channel(self._inputs_address, self.settings)
            self._local = LocalDecider(self.stubs.governance_channel,
                                       decision_pb2_grpc.DecisionServiceStub(self._inputs_channel),
                                       self.settings.instance_id, **self._local_options)
            await self._local.start()

    async def wait_local_ready(self, timeout_s: float = 10.0) -> bool:
        """With `local_decisions`: waits until governance's inputs arrived (calls are decided
        locally from then on); False on timeout."""
        await self._ensure_started()
        if self._local is None:
            raise ValueError("this Arm was made without local_decisions=True")
        return await self._local.wait_ready(timeout_s)

    @property
    def local(self) -> LocalDecider | None:
        """The local decider (`local_decisions=True`): its counters `local`, `remote`,
        `shipped`, its spool (`spool.pending`) and `drain(timeout_s)`."""
        return self._local

    async def __aenter__(self) -> Arm:
        await self._ensure_started()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(self, rpc: Callable[..., Awaitable[T]], request: Any, *, timeout_s: float | None = None) -> T:
        """Calls one unary RPC of `self.stubs` with the deadline, mapping a failure to a typed
        `ArmError`: `await arm.call(arm.stubs.approvals.GetApproval, GetApprovalRequest(...))`."""
        request_id = new_request_id()
        try:
            return await rpc(request, timeout=timeout_s or self.settings.timeout_s,
                             metadata=(("x-request-id", request_id),))
        except grpc.RpcError as exc:
            _reraise_cancellation(exc)
            raise from_rpc_error(exc, request_id) from None

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Waits until every event queued so far is acknowledged by telemetry; False on timeout."""
        await self._ensure_started()
        return await self._sender.flush(self.close_timeout_s if timeout_s is None else timeout_s)

    async def close(self) -> None:
        """Flushes the queued events (bounded by `close_timeout_s`; the rest is counted as
        dropped) and closes the channels."""
        if self._closed:
            return
        self._closed = True
        if self._sender._task is not None:
            await self._sender.close(self.close_timeout_s)
        elif self._sender.pending():
            self._sender.start()
            await self._sender.close(self.close_timeout_s)
        if self._local is not None:
            await self._local.close(self.close_timeout_s)
            await self._inputs_channel.close()
        if self._stubs is not None:
            await self._stubs.close()

    @property
    def events_dropped(self) -> int:
        """Events that could not be kept (queue full, refused by telemetry, left at close)."""
        return self._sender.dropped

    @property
    def events_sent(self) -> int:
        """Events telemetry acknowledged."""
        return self._sender.sent

    # --- decisions -------------------------------------------------------------------------------

    def _agent_ref(self) -> dict[str, str]:
        if self.settings.instance_id:
            return {"instance_id": self.settings.instance_id}
        if self.settings.legacy_agent_id:
            return {"legacy_agent_id": self.settings.legacy_agent_id}
        raise ValueError("no agent to check calls for: pass instance_id= (or legacy_agent_id=) "
                         "or set ARM_INSTANCE_ID (or ARM_LEGACY_AGENT_ID)")

    async def check(self, tool: str, arguments: Mapping[str, Any] | None = None, *,
                    risk: str | int | None = None, cost_usd: float = 0.0, run_id: str | None = None,
                    tool_call_id: str | None = None, approval_id: str | None = None,
                    context: Mapping[str, Any] | None = None, is_run_start: bool = False,
                    timeout_s: float | None = None) -> Decision:
        """One `Check`, no waiting and no events: the building block for adapters.

        `run_id` defaults to the current run's; `tool_call_id` to a fresh id (a NEEDS_APPROVAL
        re-checked under the same tool call id answers with the same approval). With
        `approval_id`, an APPROVED, unused approval for the same agent, tool and arguments allows
        the call once. One still PENDING or ESCALATED is answered NEEDS_APPROVAL with the same
        approval id (nothing new is created); wait for it with `wait_for_approval`.

        Raises GovernanceUnavailable when governance cannot be reached (after the channel's
        retries), other `ArmError`s for refused requests."""
        await self._ensure_started()
        run = _current_run.get()
        tcid = tool_call_id or f"tc-{secrets.token_hex(8)}"
        plain = jsonable(arguments) if arguments is not None else None  # what the Struct holds
        req = decision_pb2.CheckRequest(
            tool_name=tool, arguments=to_struct(plain, plain=True), declared_risk=risk_level(risk),  # type: ignore[arg-type]
            estimated_cost_usd=cost_usd, run_id=run_id if run_id is not None else (run.run_id if run else ""),
            tool_call_id=tcid, approval_id=approval_id or "", context=to_struct(context),
            is_run_start=is_run_start, **self._agent_ref())
        if self._local is not None and not approval_id:
            try:
                local = await self._local.decide(req, plain)
            except SpoolError:
                log.exception("local decision not durable; asking governance")
                local = None
            if local is not None:
                resp, parts = local
                return Decision(parts.decision, resp.decision_id, parts.reasons, "",
                                tcid, parts.risk, resp)
        request_id = req.request_id = new_request_id()
        try:
            resp = await self.stubs.decisions.Check(req, timeout=timeout_s or self.settings.timeout_s,
                                                    metadata=(("x-request-id", request_id),))
        except grpc.RpcError as exc:
            _reraise_cancellation(exc)
            err = from_rpc_error(exc, request_id)
            if isinstance(err, Unavailable):
                raise from_rpc_error(exc, request_id, as_type=GovernanceUnavailable) from None
            raise err from None
        return Decision.from_response(resp, tcid)

    async def get_approval(self, approval_id: str) -> approvals_pb2.Approval:
        """The approval as governance has it now."""
        resp = await self.call(self.stubs.approvals.GetApproval,
                               approvals_pb2.GetApprovalRequest(approval_id=approval_id))
        return resp.approval

    async def wait_for_approval(self, approval_id: str, timeout_s: float | None = None) -> approvals_pb2.Approval:
        """Waits until the approval is decided and returns it once APPROVED.

        Follows `WatchApproval`, re-opening it after a lost connection or a governance restart
        (the stream always starts with the current state, so nothing decided meanwhile is
        missed). Raises ApprovalRejected (DENIED, CANCELLED), ApprovalExpired, or ApprovalTimeout
        when `timeout_s` (default: the Arm's `approval_timeout_s`) passes first."""
        timeout = self.approval_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        backoff = 0.05
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ApprovalTimeout("", approval_id)
            try:
                stream = self.stubs.approvals.WatchApproval(
                    approvals_pb2.WatchApprovalRequest(approval_id=approval_id), timeout=remaining)
                try:
                    async for msg in stream:
                        backoff = 0.05
                        final = _final(msg.approval)
                        if final is not None:
                            return final
                finally:
                    stream.cancel()
                # The stream ended without a final state (the server is going away): re-open.
            except grpc.RpcError as exc:
                _reraise_cancellation(exc)
                code = exc.code()  # type: ignore[attr-defined]
                if code not in WATCH_RETRYABLE:
                    raise from_rpc_error(exc) from None
                log.info("watching approval %s: %s; re-opening", approval_id, code.name)
            await asyncio.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
            backoff = min(backoff * 2, 2.0)

    @staticmethod
    def approval(approval_id: str) -> contextlib.AbstractContextManager[None]:
        """`with arm.approval(approval_id): await tool(...)` — resumes a governed call that
        raised ApprovalPending: the call presents that approval instead of asking anew (if it is
        for the same tool; otherwise it is ignored). Still open: the call waits for it
        (`wait=True`) or raises ApprovalPending again (`wait=False`, without a Check, so no DENY
        is logged); approved: checked with it and run; denied/expired: raises."""
        return resume_with_approval(approval_id)

    async def authorize(self, opts: ToolOptions, arguments: Mapping[str, Any] | None,
                        run_id: str = "", approval_id: str | None = None) -> Authorization:
        """The decision part of a governed call (see the module docstring), without running the
        tool: returns how it was allowed or raises ToolDenied / ApprovalPending /
        ApprovalRejected / ApprovalExpired / GovernanceUnavailable."""
        tool_call_id = f"tc-{secrets.token_hex(8)}"
        timeout = opts.approval_timeout_s if opts.approval_timeout_s is not None else self.approval_timeout_s
        fail_open = opts.fail_open if opts.fail_open is not None else self.fail_open

        async def ask(approval: str | None, tcid: str) -> Decision:
            try:
                return await self.check(opts.name, arguments, risk=opts.risk, cost_usd=opts.cost_usd, run_id=run_id,
                                        tool_call_id=tcid, approval_id=approval, context=opts.context)
            except GovernanceUnavailable as exc:
                if not fail_open:
                    raise
                log.warning("governance unreachable (%s); running %s fail-open", exc.reason, opts.name)
                return Decision("ALLOW", "", (Reason("GOVERNANCE_UNAVAILABLE_FAIL_OPEN", str(exc)),), "", tcid)

        decision: Decision | None = None
        if approval_id:
            approval = await self.get_approval(approval_id)
            if approval.tool_name == opts.name:
                tool_call_id = approval.tool_call_id or tool_call_id
                if approval.status in OPEN_STATUSES:
                    if not opts.wait:
                        raise ApprovalPending(opts.name, approval_id, approval.decision_id)
                    approval = await self._wait(opts, approval_id, timeout)
                else:
                    approval = _final(approval) or approval
                decision = await ask(approval_id, tool_call_id)
        if decision is None:
            decision = await ask(None, tool_call_id)
            if decision.needs_approval:
                if not opts.wait:
                    raise ApprovalPending(opts.name, decision.approval_id, decision.decision_id, decision.reasons)
                await self._wait(opts, decision.approval_id, timeout)
                decision = await ask(decision.approval_id, tool_call_id)
        if decision.denied:
            raise ToolDenied(opts.name, decision.decision_id, decision.reasons)
        if decision.needs_approval:  # governance asked again: a new approval for a changed policy
            raise ApprovalPending(opts.name, decision.approval_id, decision.decision_id, decision.reasons)
        return Authorization(tool_call_id, decision)

    async def _wait(self, opts: ToolOptions, approval_id: str, timeout_s: float) -> approvals_pb2.Approval:
        if opts.on_pending is not None:
            try:
                opts.on_pending(approval_id)
            except Exception:
                log.exception("on_pending of %s failed", opts.name)
        tool = opts.name
        try:
            return await self.wait_for_approval(approval_id, timeout_s)
        except ApprovalTimeout:
            raise ApprovalTimeout(tool, approval_id) from None

    # --- governed tools --------------------------------------------------------------------------

    @overload
    def governed(self, fn: F, /, *, name: str | None = None, risk: str | int | None = None,
                 cost_usd: float = 0.0, wait: bool = True, approval_timeout_s: float | None = None,
                 fail_open: bool | None = None, context: Mapping[str, Any] | None = None,
                 on_pending: Callable[[str], None] | None = None) -> F: ...

    @overload
    def governed(self, fn: None = None, /, *, name: str | None = None, risk: str | int | None = None,
                 cost_usd: float = 0.0, wait: bool = True, approval_timeout_s: float | None = None,
                 fail_open: bool | None = None, context: Mapping[str, Any] | None = None,
                 on_pending: Callable[[str], None] | None = None) -> Callable[[F], F]: ...

    def governed(self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
                 risk: str | int | None = None, cost_usd: float = 0.0, wait: bool = True,
                 approval_timeout_s: float | None = None, fail_open: bool | None = None,
                 context: Mapping[str, Any] | None = None, on_pending: Callable[[str], None] | None = None) -> Any:
        """Wraps a tool so each call is governed: `@arm.governed`, `@arm.governed(risk="HIGH")`
        or `arm.governed(fn, name="payments.send")`.

        With `Arm` the wrapped tool is awaited (`await tool(...)`), whether `fn` is async or
        plain (a plain one runs on the event loop; use `ArmSync` for tools called from threads).
        Keywords: see `ToolOptions`. The wrapper carries its options as `.arm_tool`."""
        def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
            opts = ToolOptions(name or str(getattr(f, "__name__", "tool")), risk, cost_usd, wait,
                               approval_timeout_s, fail_open, context, on_pending)
            sig = _signature(f)

            @functools.wraps(f)
            async def governed_call(*args: Any, **kwargs: Any) -> Any:
                arguments = bind_arguments(sig, args, kwargs)
                run = _current_run.get()
                auth = await self.authorize(opts, arguments, run.run_id if run else "", _resume_approval.get())
                started = self._tool_started(opts, auth, run)
                try:
                    result = f(*args, **kwargs)
                    if inspect.isawaitable(result):
                        result = await result
                except BaseException as exc:
                    self._tool_finished(opts, auth, run, started, exc)
                    raise
                self._tool_finished(opts, auth, run, started, None)
                return result

            governed_call.arm_tool = opts  # type: ignore[attr-defined]
            return governed_call

        return wrap if fn is None else wrap(fn)

    def _tool_started(self, opts: ToolOptions, auth: Authorization, run: Run | None) -> float:
        payload: dict[str, Any] = {"tool_name": opts.name}
        if auth.decision.decision_id:
            payload["decision_id"] = auth.decision.decision_id
        else:
            payload["governance"] = "unavailable"
        if auth.decision.approval_id:
            payload["approval_id"] = auth.decision.approval_id
        self._emit(events_pb2.OP_EVENT_TYPE_TOOL_CALL_STARTED, run_id=run.run_id if run else "",
                   tool_call_id=auth.tool_call_id, payload=payload)
        return time.perf_counter()

    def _tool_finished(self, opts: ToolOptions, auth: Authorization, run: Run | None, started: float,
                       exc: BaseException | None) -> None:
        payload: dict[str, Any] = {"tool_name": opts.name, "duration_ms": (time.perf_counter() - started) * 1000}
        kind = events_pb2.OP_EVENT_TYPE_TOOL_CALL_COMPLETED
        if exc is not None:
            kind = events_pb2.OP_EVENT_TYPE_TOOL_CALL_FAILED
            payload.update(error_type=type(exc).__name__, error=str(exc)[:1000])
        self._emit(kind, run_id=run.run_id if run else "", tool_call_id=auth.tool_call_id, payload=payload)

    # --- runs and events -------------------------------------------------------------------------

    def run(self, name: str = "run", *, run_id: str | None = None, metadata: Mapping[str, Any] | None = None) -> Run:
        """A run context manager (`async with arm.run("triage") as run:`; plain `with` works too).
        `run_id` defaults to a fresh id; `metadata` goes into RUN_STARTED's payload."""
        return Run(self, name, run_id, metadata)

    def report_cost(self, usd: float, *, run_id: str | None = None, tool_call_id: str = "",
                    note: str = "") -> None:
        """Sends a COST_TICK of `usd` (≥ 0) for the current run (or `run_id`); telemetry feeds it
        into governance's spend ledger, which budgets are checked against. Never blocks."""
        if not usd >= 0 or usd == float("inf"):
            raise ValueError(f"cost must be a finite number >= 0, got {usd!r}")
        run = _current_run.get()
        payload: dict[str, Any] = {"amount_usd": float(usd), **({"note": note} if note else {})}
        self._emit(events_pb2.OP_EVENT_TYPE_COST_TICK,
                   run_id=run_id if run_id is not None else (run.run_id if run else ""),
                   tool_call_id=tool_call_id, payload=payload)

    def emit(self, event_type: int, *, run_id: str | None = None, tool_call_id: str = "",
             payload: Mapping[str, Any] | None = None, event_id: str | None = None) -> str:
        """Queues any opEvent (e.g. RUN_STEP, MESSAGE_SENT) for the current run; returns its id.
        `event_id`: the event's id (default a new one); telemetry stores one event per id."""
        run = _current_run.get()
        return self._emit(event_type, run_id=run_id if run_id is not None else (run.run_id if run else ""),
                          tool_call_id=tool_call_id, payload=payload, event_id=event_id)

    def _emit(self, event_type: int, *, run_id: str = "", tool_call_id: str = "",
              payload: Mapping[str, Any] | None = None, event_id: str | None = None) -> str:
        # Strictly increasing microseconds: a run trace orders by time, and these are one
        # process's events in the order they happened.
        now_us = time.time_ns() // 1000
        with self._clock_lock:
            now_us = max(now_us, self._last_us + 1)
            self._last_us = now_us
        event_id = event_id or f"{self._event_prefix}-{next(self._event_seq):010d}"
        ev = events_pb2.OpEvent(event_id=event_id, type=event_type,  # type: ignore[arg-type]
                                run_id=run_id, tool_call_id=tool_call_id, **self._event_agent())
        ev.occur_time.FromMicroseconds(now_us)
        if payload:
            ev.payload.update(jsonable(payload))
        self._sender.emit(ev)
        return event_id

    def _event_agent(self) -> dict[str, str]:
        s = self.settings
        return {k: v for k, v in (("instance_id", s.instance_id), ("legacy_agent_id", s.legacy_agent_id)) if v}

    async def _ingest(self, events: list[events_pb2.OpEvent], batch_id: str) -> telemetry_pb2.IngestEventsResponse:
        return await self.call(self.stubs.telemetry.IngestEvents,
                               telemetry_pb2.IngestEventsRequest(request_id=batch_id, events=events))

    async def run_trace(self, run_id: str) -> list[events_pb2.OpEvent]:
        """Every event of a run, in order (`GetRunTrace`, all pages; needs `telemetry:read`)."""
        out: list[events_pb2.OpEvent] = []
        token = ""
        while True:
            resp = await self.call(self.stubs.telemetry.GetRunTrace, telemetry_pb2.GetRunTraceRequest(
                run_id=run_id, page_size=500, page_token=token))
            out.extend(resp.events)
            token = resp.next_page_token
            if not token:
                return out

    def _drain_at_exit(self) -> None:
        if self._closed or self._managed or not self._sender.pending():
            return
        self._closed = True
        metadata = [("authorization", f"Bearer {self.settings.api_key}")] if self.settings.api_key else []
        self._sender.drain_blocking(target(self.settings.telemetry_address), metadata, self.close_timeout_s)


def _reraise_cancellation(exc: grpc.RpcError) -> None:
    """grpc.aio may report the cancellation of the awaiting task as an RpcError CANCELLED; it
    must stay a cancellation (never retried, never mapped to an ArmError)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling() and exc.code() == grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
        raise asyncio.CancelledError() from exc


def _final(approval: approvals_pb2.Approval) -> approvals_pb2.Approval | None:
    """The approval when APPROVED; raises for the other final states; None while open."""
    status = approval.status
    if status == approvals_pb2.APPROVAL_STATUS_APPROVED:
        return approval
    if status == approvals_pb2.APPROVAL_STATUS_EXPIRED:
        raise ApprovalExpired(approval.approval_id)
    if status in (approvals_pb2.APPROVAL_STATUS_DENIED, approvals_pb2.APPROVAL_STATUS_CANCELLED):
        reasons = [d.reason for d in approval.decisions if d.reason] or \
            ([approval.cancellation_reason] if approval.cancellation_reason else [])
        raise ApprovalRejected(approval.approval_id, approvals_pb2.ApprovalStatus.Name(status).removeprefix(
            "APPROVAL_STATUS_"), "; ".join(reasons))
    return None


def _flush_at_exit(ref: weakref.ReferenceType[Arm]) -> None:
    arm = ref()
    if arm is not None:
        try:
            arm._drain_at_exit()
        except Exception:  # exit must go on
            log.exception("flushing opEvents at exit failed")


__all__ = ["Arm", "ArmError", "Authorization", "Decision", "Run", "ToolOptions", "current_run"]
