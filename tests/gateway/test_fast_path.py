"""`fast_http_calls` (arm_gateway.fast): a streamable HTTP client's `tools/call` answered beside
the SDK's server gets exactly the answers the SDK's server gives. Two real gateway processes,
one with the fast path and one without, each in front of its own test upstream, are sent the
same raw HTTP requests (allowed, denied, refused, malformed, for unknown sessions, cancelled);
every answer's status, headers and body must be the same, and each run's events arrive once
each. The other gateway tests run over HTTP both ways too (test_transports.py, "http-sdk")."""

from __future__ import annotations

import asyncio
import json
import math
import re
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp.server.connection import Connection
from mcp.server.lowlevel import Server
from mcp.server.streamable_http import StreamableHTTPServerTransport

from arm_gateway import _sdk
from arm_gateway.direct import AiohttpPosts, DirectCalls, _AiohttpAnswer
from tests.client.conftest import Agent
from tests.gateway.test_gateway import EV, run_trace, upstream_calls, write_config
from tests.gateway.test_transports import http_gateway
from tests.processes import free_port

PROTOCOL = "2025-11-25"
ACCEPT = "application/json, text/event-stream"


def test_the_sdk_internals_the_fast_path_reads_are_there() -> None:
    """arm_gateway._sdk reads the session manager's table and the transport's idle timer: if the
    mcp SDK changes them, this fails (and the fast path would turn itself off)."""
    server: Server[Any] = Server("probe")
    server.streamable_http_app(json_response=True)
    manager = server.session_manager
    assert _sdk.usable(manager) and _sdk.only_sdk_tracing(server)
    assert manager.json_response and not manager.stateless and manager.max_request_body_size > 0
    # What the fast path reads off the session's SDK `Connection` (kept by the gateway).
    assert {"protocol_version", "session_id"} <= set(Connection.__annotations__)
    assert isinstance(Connection.initialize_accepted, property)
    transport = StreamableHTTPServerTransport(mcp_session_id="abc", idle_timeout=60.0)
    manager._server_instances["abc"] = transport
    assert _sdk.live_transport(manager, "abc") is transport and _sdk.live_transport(manager, "other") is None

    async def idle_timer() -> None:
        async with transport.connect():
            idle = transport.idle_scope
            assert idle is not None
            with idle:
                with _sdk.request_in_flight(transport):
                    assert idle.deadline == math.inf and transport._requests_in_flight == 1
                assert transport._requests_in_flight == 0 and idle.deadline < math.inf
                idle.cancel()
            assert _sdk.live_transport(manager, "abc") is None  # expiring: left to the SDK

    anyio.run(idle_timer)


class Raw:
    """Raw JSON-RPC over HTTP to one gateway: what the `mcp` client would send, byte for byte
    the same to both gateways."""

    def __init__(self, url: str, client: httpx2.AsyncClient) -> None:
        self.url, self.client, self.session_id = url, client, ""

    async def post(self, body: Any, *, raw: bytes | None = None, session: str | None = None,
                   headers: dict[str, str] | None = None) -> httpx2.Response:
        sent = {"accept": ACCEPT, "content-type": "application/json", "mcp-protocol-version": PROTOCOL,
                "mcp-session-id": self.session_id if session is None else session, **(headers or {})}
        sent = {k: v for k, v in sent.items() if v}
        return await self.client.post(self.url, content=raw if raw is not None else json.dumps(body), headers=sent)

    async def call(self, request_id: Any, params: Any, **kw: Any) -> httpx2.Response:
        return await self.post({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}, **kw)


def seen(response: httpx2.Response, session_id: str) -> tuple[int, list[tuple[str, str]], str]:
    """What a client sees of an answer; the session id and run-specific values normalized."""
    headers = sorted((k, re.sub("[0-9a-f]{32}", "<another>", v.replace(session_id, "<session>")))
                     for k, v in response.headers.items() if k not in ("date", "server"))
    body = response.text.replace(session_id, "<session>")
    return response.status_code, headers, re.sub(r"\b(ap|dec)[-_][0-9A-Za-z-]+", "<id>", body)


async def exchange(raw: Raw, calls: Path) -> list[tuple[int, list[tuple[str, str]], str]]:
    """The same sequence to a gateway; the answers as seen."""
    init = await raw.post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}, session="")
    raw.session_id = init.headers["mcp-session-id"]
    answers = [init, await raw.post({"jsonrpc": "2.0", "method": "notifications/initialized"})]
    answers.append(await raw.call(2, {"name": "up.echo", "arguments": {"text": "first"}}))  # starts the run
    for request_id, params in [
            ("s-3", {"name": "up.echo", "arguments": {"text": "allowed"}}),
            (4, {"name": "up.delete", "arguments": {"path": "/etc/passwd"}}),  # denied
            (5, {"name": "up.nope", "arguments": {}}),  # unknown tool
            (6, {"name": "up.echo", "arguments": {"text": 5}}),  # not the tool's schema
            (7, {"name": "up.echo", "arguments": {"text": "x" * 300_000}}),  # oversized arguments
            (8, {"name": "up.echo"}),  # no arguments
            (9, {"arguments": {"text": "no name"}}),  # invalid params
            (10, {"name": "up.echo", "arguments": ["not", "an", "object"]}),
            (11, None)]:
        answers.append(await raw.call(request_id, params))
    echo = {"name": "up.echo", "arguments": {"text": "again"}}
    answers += [
        await raw.call(12, echo, session="0123456789abcdef"),  # unknown session
        await raw.call(13, echo, session=""),  # none
        await raw.call(14, echo, headers={"accept": "text/event-stream"}),
        await raw.call(15, echo, headers={"content-type": "text/plain"}),
        await raw.call(16, echo, headers={"mcp-protocol-version": "1999-01-01"}),
        await raw.call(17, echo, headers={"host": "evil.example:80"}),
        await raw.call(18, echo, headers={"origin": "http://evil.example"}),
        await raw.post(None, raw=b'{"jsonrpc": "2.0", "id": 19, "method": "tools/call", "params": {'),
        await raw.post(None, raw=b"[" + json.dumps({"jsonrpc": "2.0", "id": 20, "method": "tools/call",
                                                    "params": echo}).encode() + b"]"),
        await raw.post({"jsonrpc": "2.0", "id": 21, "method": "tools/list"}),
        await raw.post({"jsonrpc": "1.0", "id": 22, "method": "tools/call", "params": echo}),
        await raw.call(23, echo, raw=json.dumps({"jsonrpc": "2.0", "id": 23, "method": "tools/call",
                                                 "params": echo}).encode() + b" " * 5_000_000)]  # > 4 MiB

    # A call the client cancels (notifications/cancelled) while it waits in the upstream.
    hanging = asyncio.create_task(raw.call(24, {"name": "up.hang", "arguments": {}}))
    with anyio.fail_after(30):
        while "hang" not in [c["tool"] for c in upstream_calls(calls)]:
            await asyncio.sleep(0.05)
    answers.append(await raw.post({"jsonrpc": "2.0", "method": "notifications/cancelled",
                                   "params": {"requestId": 24, "reason": "changed my mind"}}))
    with anyio.fail_after(30):
        answers.append(await hanging)
    answers.append(await raw.call(25, {"name": "up.echo", "arguments": {"text": "after the cancel"}}))
    answers.append(await raw.client.delete(raw.url, headers={"mcp-session-id": raw.session_id,
                                                             "mcp-protocol-version": PROTOCOL}))
    answers.append(await raw.call(26, echo))  # a session that ended
    return [seen(a, raw.session_id) for a in answers]


async def test_the_fast_path_answers_as_the_sdk_does(agent: Agent, tmp_path: Path) -> None:
    results = {}
    for fast in (True, False):
        tmp = tmp_path / ("fast" if fast else "sdk")
        tmp.mkdir()
        calls = tmp / "calls.jsonl"
        port = free_port()
        config = write_config(agent, tmp, calls, 0.2, http_port=port, extra={"fast_http_calls": fast})
        log = tmp / "gateway.log"
        async with http_gateway(config, port, log) as url, httpx2.AsyncClient(timeout=60) as client:
            answers = await exchange(Raw(url, client), calls)
        run_ids = re.findall(r"started: run id (mcp-[0-9a-f]+)", log.read_text())
        assert len(run_ids) == 1, log.read_text()
        events = [EV.Name(e.type).removeprefix("OP_EVENT_TYPE_") for e in await run_trace(agent, run_ids[0])]
        answered = re.findall(r"fast_http_calls: (\d+) tools/call answered", log.read_text())
        results[fast] = answers, events, upstream_calls(calls), answered
    (fast_answers, fast_events, fast_calls, fast_count), (sdk_answers, sdk_events, sdk_calls, sdk_count) = (
        results[True], results[False])
    for i, (a, b) in enumerate(zip(fast_answers, sdk_answers, strict=True)):
        assert a == b, f"answer {i} differs"
    # Allowed, allowed, denied (the refusals at the gateway send none), the cancelled call (started,
    # never completed), the call after it.
    assert fast_events == sdk_events == [
        "RUN_STARTED", "TOOL_CALL_STARTED", "TOOL_CALL_COMPLETED", "TOOL_CALL_STARTED", "TOOL_CALL_COMPLETED",
        "TOOL_CALL_BLOCKED", "TOOL_CALL_STARTED", "TOOL_CALL_STARTED", "TOOL_CALL_COMPLETED", "RUN_COMPLETED"]
    assert fast_calls == sdk_calls
    # The fast path was taken (for the calls after the first), and only with the flag.
    assert sdk_count == [] and int(fast_count[0]) >= 5, fast_count


def test_aiohttp_posts_only_for_plain_http_without_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Direct calls go on aiohttp's client to an http:// upstream; to an https:// one, or with a
    proxy in the environment (which httpx honours), on httpx's client."""
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert AiohttpPosts.fits("http://127.0.0.1:9000/mcp") and not AiohttpPosts.fits("https://example.com/mcp")
    assert DirectCalls("http://127.0.0.1:9000/mcp").posts is not None
    assert DirectCalls("http://127.0.0.1:9000/mcp", aiohttp_posts=False).posts is None
    assert DirectCalls("https://example.com/mcp").posts is None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert not AiohttpPosts.fits("http://127.0.0.1:9000/mcp")
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.setenv("ALL_PROXY", "http://proxy.example:3128")
    assert not AiohttpPosts.fits("http://127.0.0.1:9000/mcp")


async def test_aiohttp_answers_event_streams_as_httpx_does() -> None:
    """The event-stream reading of aiohttp answers (httpx2's SSE parser, a private class of the
    pinned httpx2) gives each event's data, split anywhere, with any line ending."""

    class Content:
        def __init__(self, pieces: list[bytes]) -> None:
            self.pieces = pieces

        async def readany(self) -> bytes:
            return self.pieces.pop(0) if self.pieces else b""  # (b"" only at the end, as aiohttp's)

    class Response:
        status, headers = 200, {"content-type": "text/event-stream"}

        def __init__(self, pieces: list[bytes]) -> None:
            self.content = Content(pieces)

    stream = 'event: message\r\nid: 1\r\ndata: \r\n\r\ndata: {"a": "h\u00e9"}\r\n\r\ndata: x\ndata: y\n\n: note\rdata: z\r\r'
    raw = stream.encode()
    for cut in range(len(raw) + 1):
        answer = _AiohttpAnswer(Response([p for p in (raw[:cut], raw[cut:]) if p]))  # type: ignore[arg-type]
        got = []
        while (data := await answer.next_event()) is not None:
            got.append(data)
        assert got == ["", '{"a": "hé"}', "x\ny", "z"], (cut, got)
