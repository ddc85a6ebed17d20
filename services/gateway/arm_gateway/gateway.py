"""The gateway: an MCP server to its client, an MCP client to each configured upstream.

- `tools/list` is the union of the upstreams' tools, each named `<prefix>.<tool>`.
- Every `tools/call` is a `Check` for the upstream's ARM agent (tool `<prefix>.<tool>`, the
  arguments, the upstream's declared risk, the session's run id, a fresh tool call id):
  ALLOW forwards the call and returns the upstream's result unchanged; DENY returns a tool error
  result (`isError`) whose text gives governance's reasons, and the upstream never sees the call;
  NEEDS_APPROVAL waits up to `approval_wait_s` for the approval: approved → checked again with
  it and forwarded once; still open → an error result naming the approval id and telling the
  model it may retry later. The approval is remembered per (tool, canonical arguments) for the
  session, so a retry of the same call picks the same approval up instead of opening another.
- Arguments larger than `max_argument_bytes` (as JSON) are refused at the gateway, unchecked.
- Governance unreachable fails closed: an error result, the upstream is not called. An upstream
  that fails, dies or takes longer than `call_timeout_s` gives an error result (TOOL_CALL_FAILED).
- Events (through each agent's `Arm` event sender): the session is a run (RUN_STARTED …
  RUN_COMPLETED); each call sends TOOL_CALL_STARTED and TOOL_CALL_COMPLETED / TOOL_CALL_FAILED
  when forwarded, TOOL_CALL_BLOCKED when refused, with durations.

Clients connect over stdio (one client, the process's) or streamable HTTP (`http:` in the
config; any number of sessions, each its own run, served concurrently).
An upstream whose call failed is reconnected (a stdio server restarted) for the next call.
Not built yet (issue 15): hiding denied tools."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import mcp_types as types
import uvicorn
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

from arm.governance.v1 import approvals_pb2 as apb
from arm.telemetry.v1 import events_pb2
from arm_client import Arm
from arm_client.errors import (
    ApprovalExpired,
    ApprovalRejected,
    ApprovalTimeout,
    ArmError,
    GovernanceUnavailable,
)
from arm_client.sdk import OPEN_STATUSES, Decision
from arm_gateway.config import GatewayConfig, UpstreamConfig

log = logging.getLogger("arm_gateway")

EV = events_pb2
RECONNECT_WAIT_S = 30.0
"""How long a call waits for an upstream that is being reconnected before failing."""


def canonical(arguments: Mapping[str, Any] | None) -> str:
    """The arguments as one stable string: a retry with the same arguments maps to the same key."""
    return json.dumps(arguments or {}, sort_keys=True, separators=(",", ":"), default=str)


def error_result(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)


@dataclass
class Upstream:
    """One upstream: its configuration, its agent's `Arm`, and its MCP session, kept by a
    supervising task (`keep_connected`) that reconnects (restarting a stdio server) after a
    failed call."""

    config: UpstreamConfig
    arm: Arm
    session: ClientSession | None = None
    tools: list[types.Tool] = field(default_factory=list)
    ready: anyio.Event = field(default_factory=anyio.Event)
    broken: anyio.Event = field(default_factory=anyio.Event)

    def transport(self) -> contextlib.AbstractAsyncContextManager[Any]:
        uc = self.config
        if uc.url:
            return streamable_http_client(uc.url)
        return stdio_client(StdioServerParameters(command=uc.command, args=list(uc.args), env=uc.env or None))

    async def keep_connected(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connects, and reconnects whenever a call marks the connection broken. The first
        connection's failure is raised (the gateway does not start); later ones are retried."""
        first = True
        backoff = 0.1
        while True:
            try:
                async with self.transport() as (read, write), ClientSession(read, write) as session:
                    await session.initialize()
                    self.tools = await list_all_tools(session)
                    self.session = session
                    log.info("upstream %s: connected, %d tools", self.config.name, len(self.tools))
                    self.ready.set()
                    if first:
                        first = False
                        task_status.started()
                    backoff = 0.1
                    await self.broken.wait()
            except Exception as exc:
                if first:
                    raise
                log.warning("upstream %s: reconnecting failed (%s); retrying in %.1fs", self.config.name, exc, backoff)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                self.session = None
            if self.broken.is_set():
                self.broken = anyio.Event()

    def restart(self) -> None:
        """Marks the connection broken after a failed call: the supervisor reconnects."""
        if self.ready.is_set():
            self.ready = anyio.Event()
            self.broken.set()
            log.warning("upstream %s: a call failed; restarting the connection", self.config.name)


@dataclass
class GatewaySession:
    """One client session: its run id and the approvals it is waiting for, per call."""

    run_id: str
    pending: dict[tuple[str, str], str] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    ended: bool = False


class Gateway:
    """The MCP server handlers over connected upstreams (see the module docstring)."""

    def __init__(self, config: GatewayConfig, upstreams: list[Upstream]) -> None:
        self.config = config
        self.upstreams = upstreams
        self.by_prefix = {up.config.prefix: up for up in upstreams}
        self.arms: list[Arm] = list({id(up.arm): up.arm for up in upstreams}.values())
        self._fallback: GatewaySession | None = None
        self.server: Server[Any] = Server("arm-gateway", on_list_tools=self.list_tools, on_call_tool=self.call_tool)

    def session_of(self, ctx: ServerRequestContext[Any]) -> GatewaySession:
        """The client session (MCP connection) the request belongs to; its run starts with its
        first request and completes when the connection is torn down."""
        connection = getattr(ctx.session, "_connection", None)  # mcp 2.x: the per-connection state
        state: dict[str, Any] | None = getattr(connection, "state", None)
        if connection is None or state is None:
            if self._fallback is None:
                self._fallback = self.start_session()
            return self._fallback
        session = state.get("arm_gateway")
        if session is None:
            session = state["arm_gateway"] = self.start_session()
            connection.exit_stack.callback(self.end_session, session)
        return session  # type: ignore[no-any-return]

    def start_session(self) -> GatewaySession:
        session = GatewaySession(run_id=f"mcp-{secrets.token_hex(8)}")
        for arm in self.arms:  # the session is a run of each agent the gateway acts as
            arm.emit(EV.OP_EVENT_TYPE_RUN_STARTED, run_id=session.run_id, payload={"name": "mcp-gateway-session"})
        log.info("client session started: run id %s", session.run_id)
        return session

    def end_session(self, session: GatewaySession) -> None:
        if session.ended:
            return
        session.ended = True
        duration_ms = (time.perf_counter() - session.started) * 1000
        for arm in self.arms:
            arm.emit(EV.OP_EVENT_TYPE_RUN_COMPLETED, run_id=session.run_id,
                     payload={"name": "mcp-gateway-session", "duration_ms": duration_ms})
        log.info("client session ended: run id %s", session.run_id)

    async def list_tools(self, ctx: ServerRequestContext[Any],
                         params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        self.session_of(ctx)
        tools = [tool.model_copy(update={"name": f"{up.config.prefix}.{tool.name}"})
                 for up in self.upstreams for tool in up.tools]
        return types.ListToolsResult(tools=tools)

    async def call_tool(self, ctx: ServerRequestContext[Any],
                        params: types.CallToolRequestParams) -> types.CallToolResult:
        return await self.governed_call(self.session_of(ctx), params.name, params.arguments or {})

    async def governed_call(self, session: GatewaySession, name: str,
                            arguments: dict[str, Any]) -> types.CallToolResult:
        prefix, _, tool = name.partition(".")
        up = self.by_prefix.get(prefix)
        if up is None or not any(t.name == tool for t in up.tools):
            return error_result(f'Unknown tool "{name}": call tools/list for the tools this gateway offers.')
        arm = up.arm
        key = (name, canonical(arguments))
        if len(key[1].encode()) > self.config.max_argument_bytes:
            return error_result(f'The call to "{name}" was not run: its arguments are {len(key[1].encode())} '
                                f"bytes as JSON, more than this gateway accepts ({self.config.max_argument_bytes}).")
        started = time.perf_counter()
        tcid = f"tc-{secrets.token_hex(8)}"
        risk = up.config.risk_of(tool)

        def blocked(text: str, **payload: Any) -> types.CallToolResult:
            arm.emit(EV.OP_EVENT_TYPE_TOOL_CALL_BLOCKED, run_id=session.run_id, tool_call_id=tcid,
                     payload={"tool_name": name, "duration_ms": (time.perf_counter() - started) * 1000, **payload})
            return error_result(text)

        try:
            approval_id = session.pending.get(key)
            decision: Decision | None = None
            if approval_id:  # a retry of a call that is waiting for an approval: pick it up
                approval = await arm.get_approval(approval_id)
                tcid = approval.tool_call_id or tcid
                if approval.status in OPEN_STATUSES:
                    await arm.wait_for_approval(approval_id, self.config.approval_wait_s)
                elif approval.status == apb.APPROVAL_STATUS_EXPIRED:
                    raise ApprovalExpired(approval_id)
                elif approval.status != apb.APPROVAL_STATUS_APPROVED:
                    raise ApprovalRejected(approval_id, apb.ApprovalStatus.Name(approval.status).removeprefix(
                        "APPROVAL_STATUS_"))
                decision = await arm.check(name, arguments, risk=risk, run_id=session.run_id,
                                           tool_call_id=tcid, approval_id=approval_id)
            else:
                decision = await arm.check(name, arguments, risk=risk, run_id=session.run_id, tool_call_id=tcid)
                if decision.needs_approval:
                    approval_id = decision.approval_id
                    session.pending[key] = approval_id
                    await arm.wait_for_approval(approval_id, self.config.approval_wait_s)
                    decision = await arm.check(name, arguments, risk=risk, run_id=session.run_id,
                                               tool_call_id=tcid, approval_id=approval_id)
        except ApprovalTimeout as exc:
            return blocked(
                f'The call to "{name}" needs a human approval (approval id {exc.approval_id}), which is not '
                f"decided yet. It was not run. You may retry the same call, with the same arguments, later: "
                f"it will run once the approval is granted.",
                decision="NEEDS_APPROVAL", approval_id=exc.approval_id)
        except (ApprovalRejected, ApprovalExpired) as exc:
            session.pending.pop(key, None)
            return blocked(f'The call to "{name}" was not run: {exc}. Do not retry it unchanged.',
                           decision="DENY", approval_id=exc.approval_id)
        except GovernanceUnavailable as exc:
            return blocked(f'The call to "{name}" was not run: ARM governance cannot be reached to '
                           f"authorize it ({exc.reason}). Try again later.", governance="unavailable")
        except ArmError as exc:
            log.warning("checking %s failed: %s", name, exc)
            return blocked(f'The call to "{name}" was not run: ARM refused to check it ({exc.reason}: {exc}).',
                           error_type=type(exc).__name__)
        if decision.needs_approval:  # the policy changed meanwhile: a new approval
            session.pending[key] = decision.approval_id
            return blocked(f'The call to "{name}" needs a human approval (approval id {decision.approval_id}). '
                           "It was not run. You may retry the same call later.",
                           decision="NEEDS_APPROVAL", approval_id=decision.approval_id)
        if decision.denied:
            session.pending.pop(key, None)
            reasons = "; ".join(f"{r.code}: {r.message}" for r in decision.reasons) or "no reason given"
            return blocked(f'ARM policy denied the call to "{name}"; it was not run. Reason: {reasons} '
                           "Do not retry it unchanged.", decision="DENY", decision_id=decision.decision_id,
                           reasons=[r.code for r in decision.reasons])
        session.pending.pop(key, None)
        return await self.forward(session, up, name, tool, arguments, decision, tcid)

    async def forward(self, session: GatewaySession, up: Upstream, name: str, tool: str,
                      arguments: dict[str, Any], decision: Decision, tcid: str) -> types.CallToolResult:
        arm = up.arm
        payload: dict[str, Any] = {"tool_name": name, "decision_id": decision.decision_id}
        if decision.approval_id:
            payload["approval_id"] = decision.approval_id
        arm.emit(EV.OP_EVENT_TYPE_TOOL_CALL_STARTED, run_id=session.run_id, tool_call_id=tcid, payload=payload)
        started = time.perf_counter()
        try:
            with anyio.fail_after(RECONNECT_WAIT_S):  # an upstream being restarted
                await up.ready.wait()
            assert up.session is not None
            result = await up.session.call_tool(tool, arguments, read_timeout_seconds=self.config.call_timeout_s)
        except Exception as exc:
            up.restart()
            arm.emit(EV.OP_EVENT_TYPE_TOOL_CALL_FAILED, run_id=session.run_id, tool_call_id=tcid, payload={
                "tool_name": name, "duration_ms": (time.perf_counter() - started) * 1000,
                "error_type": type(exc).__name__, "error": str(exc)[:1000]})
            return error_result(f'The upstream server "{up.config.name}" failed to run "{name}": {exc}')
        done: dict[str, Any] = {"tool_name": name, "duration_ms": (time.perf_counter() - started) * 1000}
        if result.is_error:
            done["error_type"] = "ToolError"
            arm.emit(EV.OP_EVENT_TYPE_TOOL_CALL_FAILED, run_id=session.run_id, tool_call_id=tcid, payload=done)
        else:
            arm.emit(EV.OP_EVENT_TYPE_TOOL_CALL_COMPLETED, run_id=session.run_id, tool_call_id=tcid, payload=done)
        return result


async def list_all_tools(session: ClientSession) -> list[types.Tool]:
    tools: list[types.Tool] = []
    cursor: str | None = None
    while True:
        result = await session.list_tools(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        tools.extend(result.tools)
        cursor = result.next_cursor
        if not cursor:
            return tools


@contextlib.asynccontextmanager
async def connected(config: GatewayConfig) -> AsyncIterator[Gateway]:
    """Connects every upstream (and its agent's `Arm`), lists their tools and yields the gateway;
    on exit closes the upstreams and flushes the events."""
    async with contextlib.AsyncExitStack() as stack:
        arms: dict[tuple[str, str], Arm] = {}
        upstreams = []
        for uc in config.upstreams:
            agent_key = (uc.agent.instance_id, uc.agent.api_key)
            if agent_key not in arms:
                arm = Arm(config.address, uc.agent.api_key, instance_id=uc.agent.instance_id,
                          registry_address=config.registry_address, governance_address=config.governance_address,
                          telemetry_address=config.telemetry_address,
                          approval_timeout_s=config.approval_wait_s)
                await stack.enter_async_context(arm)
                arms[agent_key] = arm
            upstreams.append(Upstream(uc, arms[agent_key]))
        supervisors = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(supervisors.cancel_scope.cancel)  # on exit: close every upstream
        for up in upstreams:
            await supervisors.start(up.keep_connected)
        gateway = Gateway(config, upstreams)
        try:
            yield gateway
        finally:
            if gateway._fallback is not None:
                gateway.end_session(gateway._fallback)


async def serve_stdio(config: GatewayConfig) -> None:
    """Serves one MCP client over stdin/stdout until it closes the connection."""
    async with connected(config) as gateway, stdio_server() as (read, write):
        log.info("serving MCP over stdio")
        await gateway.server.run(read, write, gateway.server.create_initialization_options())


async def serve_http(config: GatewayConfig) -> None:
    """Serves MCP clients over streamable HTTP at http://<http_host>:<http_port>/mcp until
    SIGTERM / SIGINT; each MCP session is its own run."""
    async with connected(config) as gateway:
        assert config.http_port is not None
        app = gateway.server.streamable_http_app(host=config.http_host)
        server = _HttpServer(uvicorn.Config(app, host=config.http_host, port=config.http_port,
                                            log_level="warning", lifespan="on"))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        log.info("serving MCP over streamable HTTP at http://%s:%d/mcp", config.http_host, config.http_port)
        await server.serve()
    log.info("stopped; events flushed")


class _HttpServer(uvicorn.Server):
    """uvicorn re-raises the signal it caught once it has stopped, which would end the process
    before the sessions' RUN_COMPLETED and the queued events are flushed: the gateway handles
    SIGTERM / SIGINT itself (a graceful stop, then the flush, then exit 0)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def stop(self) -> None:
        self.should_exit = True
