"""The gateway: an MCP server to its client, an MCP client to each configured upstream.

- `tools/list` is the union of the upstreams' tools, each named `<prefix>.<tool>`. With
  `hide_denied_tools`, the tools that the agent's policy denies whatever the arguments
  (governance's `ListDeniedTools`) are left out; they are recomputed every `policy_refresh_s`
  and whenever an upstream's tools change, and connected clients are sent
  `notifications/tools/list_changed` when the list changes (they list again).
- Every `tools/call` is a `Check` for the upstream's ARM agent (tool `<prefix>.<tool>`, the
  arguments, the upstream's declared risk, the session's run id, a fresh tool call id):
  ALLOW forwards the call and returns the upstream's result unchanged; DENY returns a tool error
  result (`isError`) whose text gives governance's reasons, and the upstream never sees the call;
  NEEDS_APPROVAL waits up to `approval_wait_s` for the approval: approved → checked again with
  it and forwarded once; still open → an error result naming the approval id and telling the
  model it may retry later. The approval is remembered per (tool, canonical arguments) for the
  session, so a retry of the same call picks the same approval up instead of opening another.
- Arguments larger than `max_argument_bytes` (as JSON), or that do not match the tool's input
  schema, are refused at the gateway, unchecked: an error result saying why.
- With `local_decisions` (the default) the `Arm` decides calls in the gateway's process with
  governance's engine and its streamed inputs, spooling each ALLOW / DENY and shipping it to
  governance, which logs it as a `Check`; approvals, grants, budgets and a stale stream go to
  `Check` (README, "Local decisions"). The answers, texts and events are the same either way.
- Governance unreachable fails closed: an error result, the upstream is not called (deciding
  locally: once the inputs stream has been silent for `local_stale_after_s`, 3 s). An upstream
  that fails, dies or takes longer than `call_timeout_s` gives an error result (TOOL_CALL_FAILED).
- A streamable HTTP upstream's calls are direct POSTs beside the SDK's session
  (`direct_http_calls`, arm_gateway.direct); a stdio upstream's go through the session.
- Events (through each agent's `Arm` event sender): the session is a run (RUN_STARTED …
  RUN_COMPLETED); each call sends TOOL_CALL_STARTED and TOOL_CALL_COMPLETED / TOOL_CALL_FAILED
  when forwarded, TOOL_CALL_BLOCKED when refused, with durations.

Clients connect over stdio (one client, the process's) or streamable HTTP (`http:` in the
config; any number of sessions, each its own run, served concurrently).
An upstream whose call failed is reconnected (a stdio server restarted) for the next call.
Not built: change notifications to clients of the 2026-07-28 protocol era (`subscriptions/listen`);
handshake-era clients (the SDKs' `initialize`) get them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import jsonschema
import mcp_types as types
import uvicorn
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import NotificationOptions, Server
from mcp.server.models import InitializationOptions
from mcp.server.session import ServerSession
from mcp.server.stdio import stdio_server

from arm.governance.v1 import approvals_pb2 as apb
from arm.governance.v1 import decision_pb2
from arm.telemetry.v1 import events_pb2
from arm_client import Arm
from arm_client.errors import (
    ApprovalExpired,
    ApprovalRejected,
    ApprovalTimeout,
    ArmError,
    GovernanceUnavailable,
)
from arm_client.local import SpoolError
from arm_client.sdk import OPEN_STATUSES, Decision, risk_level
from arm_common.decision_inputs import decision_event_id
from arm_gateway.config import GatewayConfig, UpstreamConfig
from arm_gateway.direct import DirectCalls
from arm_gateway.fast import FastCalls

log = logging.getLogger("arm_gateway")


class UpstreamStartError(Exception):
    """An upstream could not be connected when the gateway started (the gateway does not start)."""

    def __init__(self, name: str, where: str, cause: BaseException) -> None:
        super().__init__(f"upstream {name!r} ({where}) did not start: {_leaf(cause)}. Check its command or URL; a "
                         "stdio upstream gets only a default environment, so give the variables it needs in `env:`.")
        self.name = name


def _leaf(exc: BaseException) -> str:
    """The innermost error of an exception group, as "Type: message"."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

EV = events_pb2
RECONNECT_WAIT_S = 30.0
"""How long a call waits for an upstream that is being reconnected before failing."""
DENIED_TOOLS_BATCH = 500
"""Tools per ListDeniedTools request (governance's limit)."""
AIOHTTP_POSTS = os.environ.get("ARM_GATEWAY_DIRECT_ON_HTTPX", "") != "1"
"""Direct calls to a plain-HTTP upstream on aiohttp's client (arm_gateway.direct.AiohttpPosts);
with ARM_GATEWAY_DIRECT_ON_HTTPX=1 on httpx's, as the SDK's own requests (for A/B in
bench/gateway.py)."""
POLICY_CATCH_UP_S = 2.0
"""How long a hidden-tools refresh waits for the local decision inputs to reach its policy epoch."""


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
    on_tools_changed: Callable[[], None] | None = None
    """Called when a reconnection finds other tools than before."""
    validators: dict[str, Any] = field(default_factory=dict)
    """Per tool, a JSON Schema validator of its input schema (None: the schema is unusable)."""
    direct: DirectCalls | None = None
    """A streamable HTTP upstream's calls as direct POSTs on the session's HTTP client (with
    `direct_http_calls`; see arm_gateway.direct); None: through the SDK's session."""
    direct_calls: bool = True

    @contextlib.asynccontextmanager
    async def transport(self) -> AsyncIterator[Any]:
        uc = self.config
        if not uc.url:
            async with stdio_client(StdioServerParameters(command=uc.command, args=list(uc.args),
                                                          env=uc.env or None)) as streams:
                yield streams
            return
        if not self.direct_calls:
            async with streamable_http_client(uc.url) as streams:
                yield streams
            return
        direct = DirectCalls(uc.url, aiohttp_posts=AIOHTTP_POSTS)
        log.info("upstream %s: tools/call as direct POSTs on %s", uc.name,
                 "aiohttp's client" if direct.posts is not None else "httpx's client")
        async with direct.client, streamable_http_client(uc.url, http_client=direct.client) as streams:
            self.direct = direct
            try:
                yield streams
            finally:
                self.direct = None
                with anyio.CancelScope(shield=True):
                    await direct.aclose()

    async def call_tool(self, tool: str, arguments: dict[str, Any], timeout_s: float) -> types.CallToolResult:
        """One call on the current connection: a direct POST to a streamable HTTP upstream, else
        (stdio, or after a redirect) through the SDK's session."""
        session, direct = self.session, self.direct
        assert session is not None
        if direct is not None and direct.usable:
            result = await direct.call_tool(session, tool, arguments, timeout_s)
            if result is not None:
                return result
        return await session.call_tool(tool, arguments, read_timeout_seconds=timeout_s)

    async def keep_connected(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connects, and reconnects whenever a call marks the connection broken. The first
        connection's failure is raised (the gateway does not start); later ones are retried."""
        first = True
        backoff = 0.1
        while True:
            try:
                async with self.transport() as (read, write), ClientSession(read, write) as session:
                    await session.initialize()
                    tools = await list_all_tools(session)
                    changed = [t.model_dump() for t in tools] != [t.model_dump() for t in self.tools]
                    self.tools, self.validators = tools, {}
                    self.session = session
                    log.info("upstream %s: connected, %d tools", self.config.name, len(self.tools))
                    self.ready.set()
                    if first:
                        first = False
                        task_status.started()
                    elif changed and self.on_tools_changed is not None:
                        self.on_tools_changed()
                    backoff = 0.1
                    await self.broken.wait()
            except Exception as exc:
                if first:
                    uc = self.config
                    raise UpstreamStartError(uc.name, uc.url or " ".join([uc.command, *uc.args]), exc) from exc
                log.warning("upstream %s: reconnecting failed (%s); retrying in %.1fs", self.config.name, exc, backoff)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                self.session = None
            if self.broken.is_set():
                self.broken = anyio.Event()

    def argument_error(self, tool: str, arguments: dict[str, Any]) -> str | None:
        """Why the arguments do not match the tool's input schema; None when they do (or the
        upstream's schema is not a usable JSON Schema: then the upstream judges)."""
        if tool not in self.validators:
            schema = next((t.input_schema for t in self.tools if t.name == tool), None)
            try:
                cls = jsonschema.validators.validator_for(schema)
                cls.check_schema(schema)
                self.validators[tool] = cls(schema)
            except (jsonschema.SchemaError, TypeError) as exc:
                log.warning("upstream %s: tool %s has an unusable input schema (%s); arguments are not "
                            "checked against it", self.config.name, tool, exc)
                self.validators[tool] = None
        validator = self.validators[tool]
        if validator is None:
            return None
        error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path)
        return f"{error.message}" + (f" (at {where})" if where else "")

    def restart(self) -> None:
        """Marks the connection broken after a failed call: the supervisor reconnects."""
        if self.ready.is_set():
            self.ready = anyio.Event()
            self.broken.set()
            log.warning("upstream %s: a call failed; restarting the connection", self.config.name)


@dataclass(eq=False)
class GatewaySession:
    """One client session: its run id and the approvals it is waiting for, per call."""

    run_id: str
    pending: dict[tuple[str, str], str] = field(default_factory=dict)
    notifier: ServerSession | None = None
    """The MCP session of its latest request: its connection-scoped channel carries list_changed."""
    started: float = field(default_factory=time.perf_counter)
    ended: bool = False
    http_session_id: str | None = None
    """Its streamable HTTP `Mcp-Session-Id` (None over stdio)."""


class Gateway:
    """The MCP server handlers over connected upstreams (see the module docstring)."""

    def __init__(self, config: GatewayConfig, upstreams: list[Upstream]) -> None:
        self.config = config
        self.upstreams = upstreams
        self.by_prefix = {up.config.prefix: up for up in upstreams}
        self.arms: list[Arm] = list({id(up.arm): up.arm for up in upstreams}.values())
        self._fallback: GatewaySession | None = None
        self.sessions: set[GatewaySession] = set()
        """The connected client sessions (list_changed goes to each)."""
        self.http_sessions: dict[str, tuple[GatewaySession, Any]] = {}
        """Per streamable HTTP `Mcp-Session-Id`: its session and its SDK `Connection` (for
        arm_gateway.fast: a session is answered there once a request through the SDK started it)."""
        self.hidden: dict[str, str] = {}
        """Prefixed tool name → why it is hidden (with hide_denied_tools)."""
        self.upstream_changed = anyio.Event()
        """Set when an upstream's tools changed (after a reconnection)."""
        for up in upstreams:
            up.on_tools_changed = self.tools_changed
        self.server: Server[Any] = _Server("arm-gateway", on_list_tools=self.list_tools, on_call_tool=self.call_tool)

    def session_of(self, ctx: ServerRequestContext[Any]) -> GatewaySession:
        """The client session (MCP connection) the request belongs to; its run starts with its
        first request and completes when the connection is torn down."""
        connection = _connection_of(ctx)
        state: dict[str, Any] | None = getattr(connection, "state", None)
        if connection is None or state is None:
            if self._fallback is None:
                self._fallback = self.start_session()
            session = self._fallback
        else:
            found: GatewaySession | None = state.get("arm_gateway")
            if found is None:
                found = state["arm_gateway"] = self.start_session()
                connection.exit_stack.callback(self.end_session, found)
                session_id = getattr(connection, "session_id", None)
                if isinstance(session_id, str):
                    found.http_session_id = session_id
                    self.http_sessions[session_id] = (found, connection)
            session = found
        session.notifier = ctx.session
        return session

    def start_session(self) -> GatewaySession:
        session = GatewaySession(run_id=f"mcp-{secrets.token_hex(8)}")
        self.sessions.add(session)
        for arm in self.arms:  # the session is a run of each agent the gateway acts as
            arm.emit(EV.OP_EVENT_TYPE_RUN_STARTED, run_id=session.run_id, payload={"name": "mcp-gateway-session"})
        log.info("client session started: run id %s", session.run_id)
        return session

    def end_session(self, session: GatewaySession) -> None:
        if session.ended:
            return
        session.ended = True
        self.sessions.discard(session)
        if session.http_session_id is not None:
            self.http_sessions.pop(session.http_session_id, None)
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
        if self.config.hide_denied_tools:
            tools = [t for t in tools if t.name not in self.hidden]
        return types.ListToolsResult(tools=tools)

    # --- hidden tools -----------------------------------------------------------------------------

    def tools_changed(self) -> None:
        self.upstream_changed.set()

    async def denied_tools(self) -> dict[str, str]:
        """Asks governance, per agent, which of its upstreams' tools its policy denies whatever
        the arguments. Raises ArmError when governance cannot answer."""
        hidden: dict[str, str] = {}
        for arm in self.arms:
            queries = [decision_pb2.ToolQuery(tool_name=f"{up.config.prefix}.{t.name}",
                                              declared_risk=risk_level(up.config.risk_of(t.name)))  # type: ignore[arg-type]
                       for up in self.upstreams if up.arm is arm for t in up.tools]
            for i in range(0, len(queries), DENIED_TOOLS_BATCH):
                resp = await arm.call(arm.stubs.decisions.ListDeniedTools, decision_pb2.ListDeniedToolsRequest(
                    instance_id=arm.settings.instance_id, tools=queries[i:i + DENIED_TOOLS_BATCH]))
                for d in resp.denied:
                    hidden[d.tool_name] = "; ".join(f"{r.code}: {r.message}" for r in d.reasons)
                # Deciding in process: the list a client is sent must not run ahead of the
                # decisions, so wait (briefly) for the local inputs to reach the answer's epoch.
                if arm.local is not None and not await arm.local.caught_up(resp.policy_epoch, POLICY_CATCH_UP_S):
                    log.warning("local decision inputs are behind governance's policy epoch %d", resp.policy_epoch)
        return hidden

    async def refresh_hidden(self) -> bool:
        """Recomputes the hidden tools. Governance unreachable: the previous ones are kept
        (calls still fail closed). Returns whether they changed."""
        try:
            hidden = await self.denied_tools()
        except ArmError as exc:
            log.warning("hidden tools not refreshed: %s", exc)
            return False
        if hidden == self.hidden:
            return False
        log.info("hidden tools now: %s", ", ".join(sorted(hidden)) or "none")
        self.hidden = hidden
        return True

    async def tools_list_changed(self) -> None:
        """Tells every connected client that tools/list changed (they list again)."""
        for session in list(self.sessions):
            if session.notifier is not None:
                try:
                    await session.notifier.send_tool_list_changed()
                except Exception as exc:  # a client that went away: its session ends on its own
                    log.info("run %s: tools/list_changed not sent: %s", session.run_id, exc)

    async def watch_tools(self) -> None:
        """Sends tools/list_changed when the list changes: an upstream's tools changed, or (with
        hide_denied_tools, recomputed every `policy_refresh_s`) the hidden tools did."""
        while True:
            with anyio.move_on_after(self.config.policy_refresh_s if self.config.hide_denied_tools else math.inf):
                await self.upstream_changed.wait()
            upstream = self.upstream_changed.is_set()
            self.upstream_changed = anyio.Event()
            hidden = self.config.hide_denied_tools and await self.refresh_hidden()
            if upstream or hidden:
                await self.tools_list_changed()

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
        bad = up.argument_error(tool, arguments)
        if bad is not None:
            return error_result(f'The call to "{name}" was not run: its arguments do not match the tool\'s input '
                                f"schema: {bad}. Fix the arguments (see tools/list) and call again.")
        started = time.perf_counter()
        tcid = f"tc-{secrets.token_hex(8)}"
        risk = up.config.risk_of(tool)

        def blocked(text: str, event_id: str | None = None, **payload: Any) -> types.CallToolResult:
            arm.emit(EV.OP_EVENT_TYPE_TOOL_CALL_BLOCKED, run_id=session.run_id, tool_call_id=tcid, event_id=event_id,
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
            # Governance derives a TOOL_CALL_BLOCKED from the logged DENY too: under the id it
            # gives it (decision_event_id), telemetry keeps one of the two.
            return blocked(f'ARM policy denied the call to "{name}"; it was not run. Reason: {reasons} '
                           "Do not retry it unchanged.", event_id=decision_event_id(decision.decision_id),
                           decision="DENY", decision_id=decision.decision_id, reasons=[r.code for r in decision.reasons])
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
            result = await up.call_tool(tool, arguments, self.config.call_timeout_s)
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
                arms[agent_key] = await _open_arm(stack, config, uc)
            upstreams.append(Upstream(uc, arms[agent_key], direct_calls=config.direct_http_calls))
        supervisors = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(supervisors.cancel_scope.cancel)  # on exit: close every upstream
        for up in upstreams:
            await supervisors.start(up.keep_connected)
        gateway = Gateway(config, upstreams)
        if config.hide_denied_tools:
            await gateway.refresh_hidden()  # before the first tools/list
        supervisors.start_soon(gateway.watch_tools)
        try:
            yield gateway
        finally:
            if gateway._fallback is not None:
                gateway.end_session(gateway._fallback)


async def _open_arm(stack: contextlib.AsyncExitStack, config: GatewayConfig, uc: UpstreamConfig) -> Arm:
    """The `Arm` of the upstream's agent, deciding locally with `local_decisions`. A spool that
    cannot be opened (another process holds it, or it is not writable) leaves that agent's calls
    to `Check`, with a warning, rather than not starting."""

    def make(local: bool) -> Arm:
        return Arm(config.address, uc.agent.api_key, instance_id=uc.agent.instance_id,
                   registry_address=config.registry_address, governance_address=config.governance_address,
                   telemetry_address=config.telemetry_address, approval_timeout_s=config.approval_wait_s,
                   local_decisions=local, local_spool_dir=config.spool_path() if local else None)

    if config.local_decisions:
        arm = make(True)
        try:
            return await stack.enter_async_context(arm)
        except (SpoolError, OSError) as exc:
            await arm.close()
            log.warning("agent %s: local decisions off, every call goes to Check: %s", uc.agent.instance_id, exc)
    return await stack.enter_async_context(make(False))


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
        # Plain JSON answers to POSTs rather than an SSE stream per call: the gateway sends no
        # request-scoped messages, and it costs about a third less of the gateway's CPU per call
        # (bench/gateway.py). Notifications (tools/list_changed) ride the session's GET stream.
        app: Any = gateway.server.streamable_http_app(host=config.http_host, json_response=True)
        fast = FastCalls(app, gateway, gateway.server.session_manager) if config.fast_http_calls else None
        if fast is not None:
            app = fast
        server = _HttpServer(uvicorn.Config(app, host=config.http_host, port=config.http_port,
                                            log_level="warning", lifespan="on"))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        log.info("serving MCP over streamable HTTP at http://%s:%d/mcp", config.http_host, config.http_port)
        await server.serve()
        if fast is not None:
            log.info("fast_http_calls: %d tools/call answered beside the SDK's server", fast.answered)
    log.info("stopped; events flushed")


def _connection_of(ctx: ServerRequestContext[Any]) -> Any:
    """The MCP connection (`mcp.server.connection.Connection`: per-connection `state` and
    `exit_stack`) the request came in on. mcp 2.3 documents these as the place for per-connection
    state and cleanup but hands lowlevel handlers no public way to reach them
    (`ServerRequestContext` has no `connection` yet; the SDK's own TODO L54), so this reads the
    per-request session's reference; None (all requests one session) if the SDK moves it."""
    return getattr(ctx.session, "_connection", None)


class _Server(Server[Any]):
    """Advertises `tools.listChanged` on every transport (the streamable HTTP manager builds the
    initialization options itself, with no notification options)."""

    def create_initialization_options(self, notification_options: NotificationOptions | None = None,
                                      experimental_capabilities: dict[str, dict[str, Any]] | None = None,
                                      extensions: dict[str, dict[str, Any]] | None = None) -> InitializationOptions:
        return super().create_initialization_options(notification_options or NotificationOptions(tools_changed=True),
                                                     experimental_capabilities, extensions)


class _HttpServer(uvicorn.Server):
    """uvicorn re-raises the signal it caught once it has stopped, which would end the process
    before the sessions' RUN_COMPLETED and the queued events are flushed: the gateway handles
    SIGTERM / SIGINT itself (a graceful stop, then the flush, then exit 0)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def stop(self) -> None:
        self.should_exit = True
