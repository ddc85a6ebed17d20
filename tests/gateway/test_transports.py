"""The gateway's must-shows over both client transports (stdio and streamable HTTP), beyond
test_gateway.py: hidden tools that follow policy changes (tools/list_changed), bad and oversized
arguments refused at the gateway, a slow approval that holds up no other call, an upstream that
dies or hangs, and governance stopped and started again while the gateway serves on (issue 15).
The gateway is a real process, the upstream a real MCP server counting its calls, ARM real."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from arm.governance.v1 import approvals_pb2 as apb
from arm.governance.v1 import policy_pb2
from tests.client.conftest import Agent, make_agent
from tests.conftest import RegistryServer, TenantContext, new_database_spec, start_governance, stop_governance
from tests.gateway.test_gateway import (
    EV,
    LOCAL_DECISIONS,
    accepting,
    pending_approval,
    run_id_of,
    run_trace,
    text,
    upstream_calls,
    write_config,
)
from tests.processes import free_port, stop
from tests.telemetry.conftest import TelemetryServer

TRANSPORTS = ["stdio", "http", "http-sdk"]
"""Over streamable HTTP with the fast path (`fast_http_calls`, the default) and without it."""
HTTP = ["http", "http-sdk"]
LIST_CHANGED = "notifications/tools/list_changed"
ALL_TOOLS = ["up.crash", "up.delete", "up.echo", "up.hang", "up.pay"]


@dataclass
class Client:
    session: ClientSession
    init: types.InitializeResult
    log: Path
    notices: list[str] = field(default_factory=list)

    async def names(self) -> list[str]:
        return sorted(t.name for t in (await self.session.list_tools()).tools)

    async def notified(self, method: str) -> None:
        """Waits (boundedly) until the gateway sent `method`."""
        with anyio.fail_after(30):
            while method not in self.notices:
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def session_at(transport: str, config: Path, log: Path, url: str = "") -> AsyncIterator[Client]:
    """An MCP client session with the gateway: over stdio (the gateway is its child process) or
    over streamable HTTP at `url` (a gateway already running)."""
    notices: list[str] = []

    async def on_message(message: Any) -> None:
        method = getattr(getattr(message, "root", message), "method", None)
        if isinstance(method, str):
            notices.append(method)

    if transport == "stdio":
        with log.open("a") as err:
            params = StdioServerParameters(command=sys.executable, args=["-m", "arm_gateway", "--config", str(config)])
            async with (stdio_client(params, errlog=err) as (read, write),
                        ClientSession(read, write, message_handler=on_message) as session):
                yield Client(session, await session.initialize(), log, notices)
    else:
        async with (streamable_http_client(url) as (read, write),
                    ClientSession(read, write, message_handler=on_message) as session):
            yield Client(session, await session.initialize(), log, notices)


@contextlib.asynccontextmanager
async def http_gateway(config: Path, port: int, log: Path) -> AsyncIterator[str]:
    """A gateway process serving streamable HTTP; yields its URL, stops it (SIGTERM) after."""
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "arm_gateway", "--config", str(config)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        await accepting(port, proc, log)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        # In a thread: the test's loop serves telemetry, which the stopping gateway flushes to.
        assert await asyncio.to_thread(stop, proc) == 0, log.read_text()


@contextlib.asynccontextmanager
async def client(transport: str, agent: Agent, tmp: Path, calls: Path, approval_wait_s: float = 30.0,
                 **kw: Any) -> AsyncIterator[Client]:
    """A gateway for `agent` in front of the test upstream, and one client session with it."""
    log = tmp / "gateway.log"
    if transport == "stdio":
        config = write_config(agent, tmp, calls, approval_wait_s, **kw)
        async with session_at("stdio", config, log) as c:
            yield c
        return
    port = free_port()
    if transport == "http-sdk":
        kw["extra"] = {**kw.get("extra", {}), "fast_http_calls": False}
    config = write_config(agent, tmp, calls, approval_wait_s, http_port=port, **kw)
    async with http_gateway(config, port, log) as url, session_at("http", config, log, url) as c:
        yield c


async def gateway_policy(agent: Agent) -> None:
    """up.echo DENY outright; up.delete ALLOW (over the CRITICAL baseline); up.pay DENY only
    when the arguments mention bob (so not outright)."""
    await agent.admin.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(
            name="gateway", scope=policy_pb2.POLICY_SCOPE_VERSION, scope_id=agent.agents.version.id,
            mode=policy_pb2.POLICY_MODE_ENFORCE, active=True, tool_rules=[
                policy_pb2.ToolRule(tool="up.echo", effect=policy_pb2.DECISION_DENY),
                policy_pb2.ToolRule(tool="up.delete", effect=policy_pb2.DECISION_ALLOW),
                policy_pb2.ToolRule(tool="up.pay", effect=policy_pb2.DECISION_DENY,
                                    when=policy_pb2.ToolRuleCondition(arg_patterns=["bob"]))])))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_hidden_tools_follow_policy_changes(transport: str, agent: Agent, tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    async with client(transport, agent, tmp_path, calls,
                      extra={"hide_denied_tools": True, "policy_refresh_s": 0.2}) as c:
        tools = c.init.capabilities.tools
        assert tools is not None and tools.list_changed
        # The baseline denies CRITICAL outright: up.delete is hidden; up.pay (HIGH) needs approval.
        assert await c.names() == ["up.crash", "up.echo", "up.hang", "up.pay"]
        assert LIST_CHANGED not in c.notices

        await gateway_policy(agent)
        await c.notified(LIST_CHANGED)
        assert await c.names() == ["up.crash", "up.delete", "up.hang", "up.pay"]

        # A hidden tool called anyway is still decided (denied), never forwarded.
        hidden = await c.session.call_tool("up.echo", {"text": "hi"})
        assert hidden.is_error and "TOOL_RULE_MATCHED" in text(hidden)
        shown = await c.session.call_tool("up.delete", {"path": "/tmp/x"})
        assert not shown.is_error
        assert upstream_calls(calls) == [{"tool": "delete", "arguments": {"path": "/tmp/x"}}]


async def test_without_hiding_every_tool_is_listed(agent: Agent, tmp_path: Path) -> None:
    async with client("stdio", agent, tmp_path, tmp_path / "calls.jsonl") as c:
        assert await c.names() == ALL_TOOLS


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_bad_or_oversized_arguments_are_refused_at_the_gateway(transport: str, agent: Agent,
                                                                    tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    async with client(transport, agent, tmp_path, calls) as c:
        missing = await c.session.call_tool("up.pay", {"to": "bob"})
        assert missing.is_error and "'amount' is a required property" in text(missing)
        assert "input schema" in text(missing)
        wrong = await c.session.call_tool("up.echo", {"text": 5})
        assert wrong.is_error and "is not of type 'string'" in text(wrong) and "(at text)" in text(wrong)
        big = await c.session.call_tool("up.echo", {"text": "x" * 300_000})
        assert big.is_error and "more than this gateway accepts" in text(big)
        fine = await c.session.call_tool("up.echo", {"text": "ok"})
        assert not fine.is_error
    # Refused calls reach neither governance (no approval was opened for up.pay) nor the upstream.
    assert upstream_calls(calls) == [{"tool": "echo", "arguments": {"text": "ok"}}]
    resp = await agent.admin.approvals.ListApprovals(apb.ListApprovalsRequest(instance_id=agent.instance_id))
    assert not resp.approvals
    events = await run_trace(agent, run_id_of(tmp_path / "gateway.log"))
    assert [EV.Name(e.type).removeprefix("OP_EVENT_TYPE_") for e in events] == [
        "RUN_STARTED", "TOOL_CALL_STARTED", "TOOL_CALL_COMPLETED", "RUN_COMPLETED"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_slow_approval_holds_up_no_other_call_of_the_session(transport: str, agent: Agent,
                                                                     tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    async with client(transport, agent, tmp_path, calls) as c:
        waiting = asyncio.create_task(c.session.call_tool("up.pay", {"to": "fay", "amount": 2}))
        approval = await pending_approval(agent, "up.pay")
        echoed = await c.session.call_tool("up.echo", {"text": "meanwhile"})
        assert text(echoed) == "echo: meanwhile" and not waiting.done()
        await agent.decide(approval.approval_id)
        assert text(await waiting) == "paid 2 to fay"
    assert [c["tool"] for c in upstream_calls(calls)] == ["echo", "pay"]


@pytest.mark.parametrize("transport", HTTP)
async def test_deny_and_an_approval_retried_after_timing_out_over_http(transport: str, agent: Agent,
                                                                       tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    async with client(transport, agent, tmp_path, calls, approval_wait_s=0.3) as c:
        denied = await c.session.call_tool("up.delete", {"path": "/etc/passwd"})
        assert denied.is_error and "BASELINE_CRITICAL" in text(denied)
        first = await c.session.call_tool("up.pay", {"to": "gus", "amount": 4})
        approval = await pending_approval(agent, "up.pay")
        assert first.is_error and approval.approval_id in text(first) and "retry" in text(first)
        assert upstream_calls(calls) == []
        await agent.decide(approval.approval_id)
        done = await c.session.call_tool("up.pay", {"amount": 4, "to": "gus"})
        assert not done.is_error and text(done) == "paid 4 to gus"
    assert upstream_calls(calls) == [{"tool": "pay", "arguments": {"amount": 4, "to": "gus"}}]
    events = await run_trace(agent, run_id_of(tmp_path / "gateway.log"))
    assert [EV.Name(e.type).removeprefix("OP_EVENT_TYPE_") for e in events] == [
        "RUN_STARTED", "TOOL_CALL_BLOCKED", "TOOL_CALL_BLOCKED", "TOOL_CALL_STARTED", "TOOL_CALL_COMPLETED",
        "RUN_COMPLETED"]
    assert events[3].payload["approval_id"] == approval.approval_id


@pytest.mark.parametrize("transport", HTTP)
async def test_an_upstream_that_dies_or_hangs_over_http(transport: str, agent: Agent, tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    async with client(transport, agent, tmp_path, calls, call_timeout_s=0.5) as c:
        crashed = await c.session.call_tool("up.crash", {})
        assert crashed.is_error and 'upstream server "up" failed' in text(crashed)
        assert text(await c.session.call_tool("up.echo", {"text": "a"})) == "echo: a"  # restarted
        hung = await c.session.call_tool("up.hang", {})
        assert hung.is_error and 'upstream server "up" failed' in text(hung)
        assert text(await c.session.call_tool("up.echo", {"text": "b"})) == "echo: b"
    assert [c["tool"] for c in upstream_calls(calls)] == ["crash", "echo", "hang", "echo"]


async def test_governance_stopped_gives_error_results_and_the_gateway_serves_on(
        registry: RegistryServer, tenant: TenantContext, telemetry: TelemetryServer, tmp_path: Path) -> None:
    """A governance of its own, stopped while two HTTP sessions and one stdio session are
    connected: every call is an error result (no hang), tools/list still answers, and once
    governance is back on its address the same sessions' calls are allowed again."""
    spec = new_database_spec(registry.backend, tmp_path / "gov", "governance")
    (tmp_path / "gov").mkdir()
    governance = await start_governance(spec, registry)
    agent = await make_agent(tenant, governance, telemetry)
    calls = tmp_path / "calls.jsonl"
    port = free_port()
    config = write_config(agent, tmp_path, calls, 30.0, http_port=port)
    stdio_config = write_config(agent, tmp_path / "gov", calls, 30.0)
    try:
        async with (http_gateway(config, port, tmp_path / "gateway.log") as url,
                    session_at("http", config, tmp_path / "gateway.log", url) as a,
                    session_at("http", config, tmp_path / "gateway.log", url) as b,
                    session_at("stdio", stdio_config, tmp_path / "stdio.log") as s):
            for c in (a, b, s):
                assert text(await c.session.call_tool("up.echo", {"text": "up"})) == "echo: up"
            await stop_governance(governance, drop=False)
            for c in (a, b, s):
                with anyio.fail_after(60):
                    # Deciding locally, calls are still allowed until the inputs stream has been
                    # silent for local_stale_after_s (3 s); then they go to Check, which fails.
                    while not (down := await c.session.call_tool("up.echo", {"text": "down"})).is_error:
                        assert LOCAL_DECISIONS and text(down) == "echo: down"
                        await asyncio.sleep(0.2)
                assert down.is_error and "governance cannot be reached" in text(down), text(down)
                assert await c.names() == ALL_TOOLS
            governance = await start_governance(spec, registry, {"ARM_GOVERNANCE_LISTEN": agent.governance.address})
            for c in (b, a, s):
                with anyio.fail_after(60):
                    while (again := await c.session.call_tool("up.echo", {"text": "back"})).is_error:
                        assert "governance cannot be reached" in text(again)
                        await asyncio.sleep(0.2)
                assert text(again) == "echo: back"
        texts = [c["arguments"]["text"] for c in upstream_calls(calls) if c["arguments"]["text"] != "down"]
        assert texts == ["up"] * 3 + ["back"] * 3
    finally:
        await agent.admin.close()
        for approver in agent.approvers:
            await approver.close()
        await stop_governance(governance)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_upstream_killed_mid_call(transport: str, agent: Agent, tmp_path: Path) -> None:
    """SIGKILL to the stdio upstream while a call hangs in it: the call's client gets an error
    result at once (not after call_timeout_s), and the next call reaches a new upstream process."""
    calls = tmp_path / "calls.jsonl"
    pids = Path(f"{calls}.pid")
    async with client(transport, agent, tmp_path, calls) as c:
        hanging = asyncio.create_task(c.session.call_tool("up.hang", {}))
        with anyio.fail_after(30):
            while [x["tool"] for x in upstream_calls(calls)] != ["hang"]:
                await asyncio.sleep(0.05)
        first = int(pids.read_text().split()[0])
        os.kill(first, signal.SIGKILL)
        with anyio.fail_after(30):  # call_timeout_s is 60: an answer before it is the death noticed
            killed = await hanging
        assert killed.is_error and 'upstream server "up" failed' in text(killed)
        after = await c.session.call_tool("up.echo", {"text": "new process"})
        assert text(after) == "echo: new process"
        assert len(set(pids.read_text().split())) == 2
    events = await run_trace(agent, run_id_of(tmp_path / "gateway.log"))
    assert [EV.Name(e.type).removeprefix("OP_EVENT_TYPE_") for e in events] == [
        "RUN_STARTED", "TOOL_CALL_STARTED", "TOOL_CALL_FAILED", "TOOL_CALL_STARTED", "TOOL_CALL_COMPLETED",
        "RUN_COMPLETED"]
