"""The MCP gateway as a real process (`python -m arm_gateway --config …`) between a real MCP
client session (the `mcp` SDK's ClientSession over stdio) and a real upstream MCP server
(tests/gateway/upstream.py, which appends every call it receives to a file), governed by real
ARM servers (issue 15).

Tools and their declared risks (the baseline decides): `up.echo` LOW → ALLOW, `up.delete`
CRITICAL → DENY, `up.pay` HIGH → NEEDS_APPROVAL (two approvers)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from arm.governance.v1 import approvals_pb2 as apb
from arm.governance.v1 import decision_pb2 as dpb
from arm.telemetry.v1 import events_pb2 as ev
from arm.telemetry.v1 import telemetry_pb2 as tpb
from tests.client.conftest import Agent
from tests.processes import free_port, stop

UPSTREAM = Path(__file__).with_name("upstream.py")
LOCAL_DECISIONS = os.environ.get("ARM_TEST_GATEWAY_LOCAL_DECISIONS", "1") != "0"
"""The gateways the tests start decide locally (the default) unless this is "0": run the suite
both ways (`ARM_TEST_GATEWAY_LOCAL_DECISIONS=0 pytest tests/gateway`)."""
EV = ev.OpEventType


def upstream_calls(path: Path, with_ids: bool = False) -> list[dict[str, Any]]:
    """The calls the upstream received: tool and arguments (and their JSON-RPC request ids)."""
    calls = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return calls if with_ids else [{k: v for k, v in c.items() if k != "request_id"} for c in calls]


def write_config(agent: Agent, tmp: Path, calls: Path, approval_wait_s: float, url: str = "",
                 governance_address: str = "", http_port: int = 0, call_timeout_s: float = 60.0,
                 extra: dict[str, Any] | None = None) -> Path:
    key_file = tmp / "agent.key"
    key_file.write_text(agent.key + "\n")
    serve: dict[str, Any] = {"url": url} if url else {
        "command": sys.executable, "args": [str(UPSTREAM)], "env": {"UPSTREAM_CALLS": str(calls)}}
    config = {
        "arm": {"registry_address": agent.registry_address,
                "governance_address": governance_address or agent.governance.address,
                "telemetry_address": agent.telemetry.address},
        "approval_wait_s": approval_wait_s, "call_timeout_s": call_timeout_s,
        "local_decisions": LOCAL_DECISIONS, "spool_dir": str(tmp / "spool"),
        **({"http": {"port": http_port}} if http_port else {}), **(extra or {}),
        "upstreams": {"up": {
            **serve, "agent": {"instance_id": agent.instance_id, "api_key_file": str(key_file)},
            "risk": "LOW", "tools": {"delete": {"risk": "CRITICAL"}, "pay": {"risk": "HIGH"}}}},
    }
    path = tmp / "gateway.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@contextlib.asynccontextmanager
async def mcp_session(command: list[str], env: dict[str, str], errlog: Path) -> AsyncIterator[ClientSession]:
    with errlog.open("a") as err:
        params = StdioServerParameters(command=command[0], args=command[1:], env=env)
        async with stdio_client(params, errlog=err) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            yield session


def gateway(agent: Agent, tmp: Path, calls: Path, approval_wait_s: float = 30.0, env: dict[str, str] | None = None,
            **kw: Any) -> Any:
    config = write_config(agent, tmp, calls, approval_wait_s, **kw)
    return mcp_session([sys.executable, "-m", "arm_gateway", "--config", str(config)], env or {},
                       tmp / "gateway.log")


def run_id_of(log: Path) -> str:
    found = re.findall(r"started: run id (mcp-[0-9a-f]+)", log.read_text())
    assert len(found) == 1, log.read_text()
    return found[0]


def text(result: types.CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def pending_approval(agent: Agent, tool: str) -> apb.Approval:
    """Waits until the agent's approval for `tool` exists and returns it."""
    while True:
        resp = await agent.admin.approvals.ListApprovals(apb.ListApprovalsRequest(instance_id=agent.instance_id))
        found = [a for a in resp.approvals if a.tool_name == tool]
        if found:
            assert len(found) == 1, found
            return found[0]
        await asyncio.sleep(0.02)


async def run_trace(agent: Agent, run_id: str) -> list[ev.OpEvent]:
    """The run's events once RUN_COMPLETED has arrived (the gateway flushes it at session end)."""
    while True:
        resp = await agent.admin.telemetry.GetRunTrace(tpb.GetRunTraceRequest(run_id=run_id, page_size=500))
        if any(e.type == ev.OP_EVENT_TYPE_RUN_COMPLETED for e in resp.events):
            return list(resp.events)
        await asyncio.sleep(0.05)


async def test_allow_deny_and_approval_through_the_gateway(agent: Agent, tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    direct_calls = tmp_path / "direct.jsonl"
    async with mcp_session([sys.executable, str(UPSTREAM)], {"UPSTREAM_CALLS": str(direct_calls)},
                           tmp_path / "direct.log") as direct:
        expected = await direct.call_tool("echo", {"text": "héllo"})

    async with gateway(agent, tmp_path, calls) as session:
        listed = await session.list_tools()
        assert sorted(t.name for t in listed.tools) == ["up.crash", "up.delete", "up.echo", "up.hang", "up.pay"]
        assert {t.name: t.input_schema for t in listed.tools}["up.pay"]["required"] == ["to", "amount"]

        # ALLOW: forwarded, the upstream's result unchanged.
        allowed = await session.call_tool("up.echo", {"text": "héllo"})
        assert allowed.model_dump() == expected.model_dump()
        assert not allowed.is_error and allowed.structured_content == {"echoed": "héllo", "length": 5}
        assert upstream_calls(calls) == [{"tool": "echo", "arguments": {"text": "héllo"}}]

        # DENY: an error result with the reason; the upstream never sees the call.
        denied = await session.call_tool("up.delete", {"path": "/etc/passwd"})
        assert denied.is_error
        assert "BASELINE_CRITICAL" in text(denied) and "denied" in text(denied)
        assert [c["tool"] for c in upstream_calls(calls)] == ["echo"]

        # NEEDS_APPROVAL granted while the call waits: forwarded once.
        call = asyncio.create_task(session.call_tool("up.pay", {"to": "bob", "amount": 5}))
        approval = await pending_approval(agent, "up.pay")
        assert not call.done() and [c["tool"] for c in upstream_calls(calls)] == ["echo"]
        decided = await agent.decide(approval.approval_id)
        assert decided.status == apb.APPROVAL_STATUS_APPROVED
        paid = await call
        assert not paid.is_error and text(paid) == "paid 5 to bob"
        assert [c["tool"] for c in upstream_calls(calls)] == ["echo", "pay"]

        unknown = await session.call_tool("up.nope", {})
        assert unknown.is_error and "Unknown tool" in text(unknown)
        oversized = await session.call_tool("up.echo", {"text": "x" * 300_000})
        assert oversized.is_error and "more than this gateway accepts" in text(oversized)
        assert [c["tool"] for c in upstream_calls(calls)] == ["echo", "pay"]

    run_id = run_id_of(tmp_path / "gateway.log")
    assert approval.run_id == run_id
    events = await run_trace(agent, run_id)
    kinds = [(EV.Name(e.type).removeprefix("OP_EVENT_TYPE_"), e.payload["tool_name"] if "tool_name" in e.payload
              else "") for e in events]
    assert kinds == [("RUN_STARTED", ""), ("TOOL_CALL_STARTED", "up.echo"), ("TOOL_CALL_COMPLETED", "up.echo"),
                     ("TOOL_CALL_BLOCKED", "up.delete"), ("TOOL_CALL_STARTED", "up.pay"),
                     ("TOOL_CALL_COMPLETED", "up.pay"), ("RUN_COMPLETED", "")]
    assert all(e.instance_id == agent.instance_id for e in events)
    assert events[1].tool_call_id == events[2].tool_call_id != events[4].tool_call_id
    assert events[4].tool_call_id == approval.tool_call_id
    assert events[4].payload["approval_id"] == approval.approval_id
    assert all(events[i].payload["duration_ms"] >= 0 for i in (2, 3, 5, 6))
    assert events[3].payload["decision"] == "DENY"
    # Under the id of the opEvent governance derives from that logged DENY: telemetry keeps one.
    assert events[3].event_id == f"evt-{events[3].payload['decision_id']}"


LOCAL_ID = re.compile(r"dec_[0-9a-f]{12}[0-9]{10}")
"""A decision id made in the gateway's process (arm_client.local); governance's own differ."""


@pytest.mark.skipif(not LOCAL_DECISIONS, reason="the gateways decide through Check (ARM_TEST_GATEWAY_LOCAL_DECISIONS=0)")
async def test_allowed_and_denied_calls_are_decided_in_the_gateway_and_logged_by_governance(
        agent: Agent, tmp_path: Path) -> None:
    """With local_decisions (the default) the gateway decides ALLOW / DENY in its process once
    governance's inputs have arrived: the events carry those decision ids, and governance's
    decision log has each one (shipped from the spool) for the call's run and tool call."""
    calls = tmp_path / "calls.jsonl"
    async with gateway(agent, tmp_path, calls) as session:
        for i in range(20):  # the first calls may go to Check while the inputs are on their way
            assert text(await session.call_tool("up.echo", {"text": str(i)})) == f"echo: {i}"
            await asyncio.sleep(0.05)
        denied = await session.call_tool("up.delete", {"path": "/etc/passwd"})
        assert denied.is_error and "BASELINE_CRITICAL" in text(denied)
    run_id = run_id_of(tmp_path / "gateway.log")
    events = await run_trace(agent, run_id)
    decided = [e for e in events if e.type in (EV.OP_EVENT_TYPE_TOOL_CALL_STARTED, EV.OP_EVENT_TYPE_TOOL_CALL_BLOCKED)]
    assert len(decided) == 21 and decided[-1].payload["decision"] == "DENY"
    assert decided[-1].event_id == f"evt-{decided[-1].payload['decision_id']}"
    assert LOCAL_ID.fullmatch(decided[-1].payload["decision_id"])
    assert any(LOCAL_ID.fullmatch(e.payload["decision_id"]) for e in decided[:-1])
    for e in decided:
        logged = (await agent.admin.decisions.GetDecision(
            dpb.GetDecisionRequest(decision_id=e.payload["decision_id"]))).decision
        assert (logged.run_id, logged.tool_call_id, logged.tool_name) == (run_id, e.tool_call_id, e.payload["tool_name"])
    assert len(upstream_calls(calls)) == 20


async def test_a_spool_that_cannot_be_opened_leaves_the_calls_to_check(agent: Agent, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    calls = tmp_path / "calls.jsonl"
    async with gateway(agent, tmp_path, calls, extra={"local_decisions": True, "spool_dir": str(not_a_dir)}) as session:
        assert text(await session.call_tool("up.echo", {"text": "hi"})) == "echo: hi"
    assert "local decisions off, every call goes to Check" in (tmp_path / "gateway.log").read_text()


async def test_approval_timed_out_then_retried_picks_up_the_same_approval(agent: Agent, tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    async with gateway(agent, tmp_path, calls, approval_wait_s=0.3) as session:
        first = await session.call_tool("up.pay", {"to": "carol", "amount": 7})
        assert first.is_error
        approval = await pending_approval(agent, "up.pay")
        assert approval.approval_id in text(first) and "retry" in text(first)
        assert upstream_calls(calls) == []

        # Still undecided: the retry waits on the same approval, opens no other, runs nothing.
        again = await session.call_tool("up.pay", {"amount": 7, "to": "carol"})  # same args, other order
        assert again.is_error and approval.approval_id in text(again)
        assert (await pending_approval(agent, "up.pay")).approval_id == approval.approval_id
        assert upstream_calls(calls) == []

        await agent.decide(approval.approval_id)
        done = await session.call_tool("up.pay", {"to": "carol", "amount": 7})
        assert not done.is_error and text(done) == "paid 7 to carol"
        assert upstream_calls(calls) == [{"tool": "pay", "arguments": {"to": "carol", "amount": 7}}]

        # The approval was used: the next identical call asks anew (a new approval), runs nothing.
        later = await session.call_tool("up.pay", {"to": "carol", "amount": 7})
        assert later.is_error
        resp = await agent.admin.approvals.ListApprovals(apb.ListApprovalsRequest(instance_id=agent.instance_id))
        ids = {a.approval_id for a in resp.approvals if a.tool_name == "up.pay"}
        assert approval.approval_id in ids and len(ids) == 2
        assert len(upstream_calls(calls)) == 1

    events = await run_trace(agent, run_id_of(tmp_path / "gateway.log"))
    kinds = [EV.Name(e.type).removeprefix("OP_EVENT_TYPE_") for e in events]
    assert kinds == ["RUN_STARTED", "TOOL_CALL_BLOCKED", "TOOL_CALL_BLOCKED", "TOOL_CALL_STARTED",
                     "TOOL_CALL_COMPLETED", "TOOL_CALL_BLOCKED", "RUN_COMPLETED"]
    assert events[3].payload["approval_id"] == approval.approval_id


async def accepting(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Waits until the process listens on the port."""
    while True:
        assert proc.poll() is None, log.read_text()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def http_session(url: str) -> AsyncIterator[ClientSession]:
    async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "sdk-server"])
async def test_http_clients_are_sessions_of_their_own(fast: bool, agent: Agent, tmp_path: Path) -> None:
    """Two MCP clients over streamable HTTP: each its own run and its own calls; one waiting
    for an approval does not hold up the other (with `fast_http_calls` and without)."""
    calls = tmp_path / "calls.jsonl"
    port = free_port()
    config = write_config(agent, tmp_path, calls, 30.0, http_port=port, extra={"fast_http_calls": fast})
    log = tmp_path / "gateway.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "arm_gateway", "--config", str(config)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        await accepting(port, proc, log)
        url = f"http://127.0.0.1:{port}/mcp"
        async with http_session(url) as a, http_session(url) as b:
            for session in (a, b):  # their runs start: their calls can take the fast path
                await session.list_tools()
            waiting = asyncio.create_task(a.call_tool("up.pay", {"to": "dan", "amount": 3}))
            approval = await pending_approval(agent, "up.pay")
            echoed = await b.call_tool("up.echo", {"text": "meanwhile"})
            assert text(echoed) == "echo: meanwhile" and not waiting.done()
            await agent.decide(approval.approval_id)
            assert text(await waiting) == "paid 3 to dan"
        assert [c["tool"] for c in upstream_calls(calls)] == ["echo", "pay"]
    finally:
        # In a thread: the test's loop serves telemetry, which the stopping gateway flushes to.
        assert await asyncio.to_thread(stop, proc) == 0, log.read_text()
    run_ids = re.findall(r"started: run id (mcp-[0-9a-f]+)", log.read_text())
    assert len(set(run_ids)) == 2 and approval.run_id in run_ids
    traces = {r: [EV.Name(e.type).removeprefix("OP_EVENT_TYPE_") for e in await run_trace(agent, r)] for r in run_ids}
    other = next(r for r in run_ids if r != approval.run_id)
    assert traces[approval.run_id] == ["RUN_STARTED", "TOOL_CALL_STARTED", "TOOL_CALL_COMPLETED", "RUN_COMPLETED"]
    assert traces[other] == ["RUN_STARTED", "TOOL_CALL_STARTED", "TOOL_CALL_COMPLETED", "RUN_COMPLETED"]


@pytest.mark.parametrize(("json_answers", "on_aiohttp"), [(False, True), (True, True), (False, False)],
                         ids=["aiohttp", "aiohttp-json-upstream", "httpx"])
async def test_direct_posts_reuse_their_connections(json_answers: bool, on_aiohttp: bool, agent: Agent,
                                                    tmp_path: Path) -> None:
    """Direct POSTs (on aiohttp's client, or on httpx's with ARM_GATEWAY_DIRECT_ON_HTTPX=1) go on
    keep-alive connections: one after another they share one, and 16 at once at most 16."""
    calls = tmp_path / "calls.jsonl"
    port = free_port()
    with (tmp_path / "upstream.log").open("ab") as out:
        upstream = subprocess.Popen([sys.executable, str(UPSTREAM), "--http", str(port),
                                     *(["--json"] if json_answers else [])], stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "UPSTREAM_CALLS": str(calls)})
    ports = Path(f"{calls}.ports")
    try:
        await accepting(port, upstream, tmp_path / "upstream.log")
        async with gateway(agent, tmp_path, calls, url=f"http://127.0.0.1:{port}/mcp",
                           env=None if on_aiohttp else {"ARM_GATEWAY_DIRECT_ON_HTTPX": "1"}) as session:
            for i in range(20):
                assert text(await session.call_tool("up.echo", {"text": f"one {i}"})) == f"echo: one {i}"
            one_by_one = ports.read_text().split()
            for _ in range(3):
                answers = await asyncio.gather(*(session.call_tool("up.echo", {"text": f"many {i}"})
                                                 for i in range(16)))
                assert sorted(text(a) for a in answers) == sorted(f"echo: many {i}" for i in range(16))
            at_once = ports.read_text().split()[len(one_by_one):]
        assert len(one_by_one) == 20 and len(set(one_by_one[1:])) == 1, one_by_one  # (the run's first call: its own)
        assert len(at_once) == 48 and len(set(at_once)) <= 17, at_once
        on = "aiohttp's client" if on_aiohttp else "httpx's client"
        assert f"direct POSTs on {on}" in (tmp_path / "gateway.log").read_text()
    finally:
        upstream.terminate()
        upstream.wait(30)


@pytest.mark.parametrize(("direct", "json_answers", "on_aiohttp"),
                         [(True, False, True), (True, True, True), (True, False, False), (True, True, False),
                          (False, False, True)],
                         ids=["direct-post-aiohttp", "direct-post-aiohttp-json-upstream", "direct-post-httpx",
                              "direct-post-httpx-json-upstream", "sdk-session"])
async def test_a_streamable_http_upstream_is_governed_the_same(direct: bool, json_answers: bool, on_aiohttp: bool,
                                                               agent: Agent, tmp_path: Path) -> None:
    """A streamable HTTP upstream (answering with event streams, or plain JSON), its calls sent
    as direct POSTs beside the SDK's session (the default: on aiohttp's client, or with
    ARM_GATEWAY_DIRECT_ON_HTTPX=1 on httpx's client) or through the session: the
    upstream's result unchanged; an upstream that dies
    mid-call, hangs past call_timeout_s, or was restarted behind the gateway's back (its session
    gone: 404) gives an error result, and the next calls reach it again."""
    calls = tmp_path / "calls.jsonl"
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"

    async def start() -> subprocess.Popen[bytes]:
        with (tmp_path / "upstream.log").open("ab") as log:
            proc = subprocess.Popen([sys.executable, str(UPSTREAM), "--http", str(port),
                                     *(["--json"] if json_answers else [])], stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, "UPSTREAM_CALLS": str(calls)})
        await accepting(port, proc, tmp_path / "upstream.log")
        return proc

    async def recovered(tag: str) -> None:
        with anyio.fail_after(60):  # the gateway reconnects (backing off while the upstream is down)
            while (again := await session.call_tool("up.echo", {"text": tag})).is_error:
                assert 'upstream server "up" failed' in text(again), text(again)
                await asyncio.sleep(0.1)
        assert text(again) == f"echo: {tag}"

    upstream = await start()
    try:
        async with http_session(url) as plain:
            expected = await plain.call_tool("echo", {"text": "over http"})
        async with gateway(agent, tmp_path, calls, url=url, call_timeout_s=1.0, extra={"direct_http_calls": direct},
                           env=None if on_aiohttp else {"ARM_GATEWAY_DIRECT_ON_HTTPX": "1"}) as session:
            assert sorted(t.name for t in (await session.list_tools()).tools) == [
                "up.crash", "up.delete", "up.echo", "up.hang", "up.pay"]
            allowed = await session.call_tool("up.echo", {"text": "over http"})
            assert allowed.model_dump() == expected.model_dump()
            denied = await session.call_tool("up.delete", {"path": "x"})
            assert denied.is_error and "BASELINE_CRITICAL" in text(denied)
            assert upstream_calls(calls)[1:] == [{"tool": "echo", "arguments": {"text": "over http"}}]
            # A log message, a ping and an elicitation on the call's stream before its answer: the
            # ping answered, the elicitation refused (the gateway's client offers none), as the SDK does.
            if not json_answers:  # (a JSON answer has no stream to carry them)
                chatty = await session.call_tool("up.echo", {"text": "chatty"})
                assert text(chatty) == "echo: chatty (pinged; elicitation refused)", text(chatty)

            # A call the client gives up on: the upstream is told (notifications/cancelled) and
            # stops it, and the connection goes on.
            hanging = asyncio.create_task(session.call_tool("up.hang", {}))
            with anyio.fail_after(30):
                while not (hung_calls := [c for c in upstream_calls(calls, with_ids=True) if c["tool"] == "hang"]):
                    await asyncio.sleep(0.05)
            hanging.cancel()
            cancelled = Path(f"{calls}.cancelled")
            with anyio.fail_after(30):
                while not cancelled.exists() or not cancelled.read_text():
                    await asyncio.sleep(0.05)
            assert [json.loads(line) for line in cancelled.read_text().splitlines()] == [hung_calls[0]["request_id"]]
            assert text(await session.call_tool("up.echo", {"text": "after the cancel"})) == "echo: after the cancel"

            crashed = await session.call_tool("up.crash", {})
            assert crashed.is_error and 'upstream server "up" failed' in text(crashed)
            upstream.wait(30)
            upstream = await start()
            await recovered("after the crash")

            hung = await session.call_tool("up.hang", {})
            assert hung.is_error and 'upstream server "up" failed' in text(hung) and "timed out" in text(hung)
            await recovered("after the hang")

            upstream.terminate()
            upstream.wait(30)
            upstream = await start()
            stale = await session.call_tool("up.echo", {"text": "stale"})
            assert stale.is_error and 'upstream server "up" failed' in text(stale), text(stale)
            assert "Session not found" in text(stale)  # the new process's 404, as a JSON-RPC error
            await recovered("after the restart")
        gated = upstream_calls(calls, with_ids=True)[1:]
        chatty_calls = [] if json_answers else ["chatty"]
        assert [c["tool"] for c in gated] == ["echo", *["echo"] * len(chatty_calls), "hang", "echo", "crash", "echo",
                                              "hang", "echo", "echo"]
        assert [c["arguments"].get("text") for c in gated if c["tool"] == "echo"] == [
            "over http", *chatty_calls, "after the cancel", "after the crash", "after the hang", "after the restart"]
        on = "aiohttp's client" if on_aiohttp else "httpx's client"
        assert (f"direct POSTs on {on}" in (tmp_path / "gateway.log").read_text()) == direct
        # Direct POSTs carry the gateway's own request ids; the SDK's are integers.
        assert all(str(c["request_id"]).startswith("arm-gw-") == direct for c in gated)
    finally:
        upstream.terminate()
        upstream.wait(30)


async def test_governance_unreachable_fails_closed(agent: Agent, tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    async with gateway(agent, tmp_path, calls, governance_address=f"127.0.0.1:{free_port()}") as session:
        result = await session.call_tool("up.echo", {"text": "hi"})
        assert result.is_error and "governance cannot be reached" in text(result)
        assert upstream_calls(calls) == []


async def test_an_upstream_that_dies_mid_call_gives_an_error_result_and_is_restarted(agent: Agent, tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    async with gateway(agent, tmp_path, calls) as session:
        result = await session.call_tool("up.crash", {})
        assert result.is_error and 'upstream server "up" failed' in text(result)
        assert [c["tool"] for c in upstream_calls(calls)] == ["crash"]
        # The upstream is restarted: the next call reaches a new process.
        after = await session.call_tool("up.echo", {"text": "again"})
        assert not after.is_error and text(after) == "echo: again"
        assert [c["tool"] for c in upstream_calls(calls)] == ["crash", "echo"]
    events = await run_trace(agent, run_id_of(tmp_path / "gateway.log"))
    kinds = [EV.Name(e.type).removeprefix("OP_EVENT_TYPE_") for e in events]
    assert kinds == ["RUN_STARTED", "TOOL_CALL_STARTED", "TOOL_CALL_FAILED", "TOOL_CALL_STARTED",
                     "TOOL_CALL_COMPLETED", "RUN_COMPLETED"]


async def test_an_upstream_that_hangs_gives_an_error_result_and_the_session_goes_on(agent: Agent,
                                                                                 tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    async with gateway(agent, tmp_path, calls, call_timeout_s=0.5) as session:
        hung = await session.call_tool("up.hang", {})
        assert hung.is_error and 'upstream server "up" failed' in text(hung)
        after = await session.call_tool("up.echo", {"text": "still here"})
        assert not after.is_error and text(after) == "echo: still here"


async def test_an_approval_denied_while_waiting_gives_an_error_result(agent: Agent, tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    async with gateway(agent, tmp_path, calls) as session:
        call = asyncio.create_task(session.call_tool("up.pay", {"to": "eve", "amount": 9}))
        approval = await pending_approval(agent, "up.pay")
        await agent.decide(approval.approval_id, apb.APPROVAL_VERDICT_DENY, approvers=1)
        result = await call
        assert result.is_error and approval.approval_id in text(result)
        assert "was denied: looked at it" in text(result)  # the approver's reason
        assert upstream_calls(calls) == []
    events = await run_trace(agent, run_id_of(tmp_path / "gateway.log"))
    assert [EV.Name(e.type).removeprefix("OP_EVENT_TYPE_") for e in events] == [
        "RUN_STARTED", "TOOL_CALL_BLOCKED", "RUN_COMPLETED"]
    assert events[1].payload["approval_id"] == approval.approval_id
