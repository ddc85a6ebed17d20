"""`tools/call` to a streamable HTTP upstream as one POST, beside the SDK's session.

The `mcp` SDK's `ClientSession` keeps the session: `initialize`, `tools/list`, the server's
notifications on its GET stream, the reconnections. Its per-request machinery (a task group and
two tasks per request, the message passed through several anyio memory streams, with about 18
cancel scopes) costs the gateway more CPU per forwarded call than everything else it does
(bench/README.md). So a call is sent here as a direct POST, carrying the SDK session's
`Mcp-Session-Id` (seen on its `initialize` answer, on the HTTP client the SDK's transport shares)
and the negotiated protocol version; its answer, plain JSON or an event stream, is parsed into the
SDK's own JSON-RPC and `CallToolResult` models and checked against the tool's output schema by
the session (`validate_tool_result`), as `ClientSession.call_tool` does. To a plain-HTTP upstream
the POST goes on keep-alive connections of its own (`LeanPosts`: one write per request, the
answer read straight from the socket), which costs the gateway much less CPU than httpx's client
(bench/README.md); to an HTTPS one, or through a proxy named in the environment, on the SDK's
httpx client.

Failures raise `MCPError` as the SDK would for the same answer (a JSON-RPC error, a 404 once a
session exists: "Session terminated", a timeout), or the HTTP client's own errors; the gateway
treats them as before (error result, the connection restarted). A call that times out or that
the caller cancels is followed, as in the SDK, by a `notifications/cancelled` for it. A server request inside the
call's stream (ping, sampling, elicitation, roots) is answered as the SDK's default callbacks
would: `ping` with an empty result, the others with an error. A redirect is not followed here:
the call goes through the SDK (which follows same-origin ones) and so do later calls."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import anyio
import httpx2
import mcp_types as types
from mcp.client.session import ClientSession
from mcp.client.streamable_http import MCP_SESSION_ID
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER
from mcp_types import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    REQUEST_TIMEOUT,
    JSONRPCError,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
    jsonrpc_message_adapter,
)

CANCEL_WRITE_S = 2.0
"""How long the courtesy notifications/cancelled of a timed-out or cancelled call may take."""
REDIRECTS = frozenset({301, 302, 303, 307, 308})
DRAIN_S = 0.2
"""After the answer, how long the rest of an event stream is read (the server ends it right
after the answer; read to its end the connection is kept for the next call)."""


class DirectCalls:
    """Direct `tools/call` POSTs for one connection (one SDK session) to a streamable HTTP
    upstream. `client` is the HTTP client to give the SDK's transport too (`http_client=`), with
    the SDK's transport timeouts (30 s; reads 300 s, as streams stay open); close it after."""

    def __init__(self, url: str, lean: bool = True) -> None:
        self.url = url
        self.client = httpx2.AsyncClient(timeout=httpx2.Timeout(30.0, read=300.0),
                                         event_hooks={"response": [self._seen]})
        self.session_id: str | None = None
        self.usable = True
        """False once a call met a redirect: calls go through the SDK session."""
        self.lean = LeanPosts(url) if lean and LeanPosts.fits(url) else None
        """The calls' POSTs on connections of its own (see LeanPosts); None: on `client`."""
        self._ids = itertools.count(1)
        self._prefix = f"arm-gw-{id(self):x}-"  # never one of the SDK's (integer) request ids

    def close(self) -> None:
        """Closes the connections of its own (`client` is closed by its owner)."""
        if self.lean is not None:
            self.lean.close()

    async def _seen(self, response: httpx2.Response) -> None:
        """The SDK's requests share the client: its `initialize` answer carries the session id."""
        session_id = response.headers.get(MCP_SESSION_ID)
        if session_id:
            self.session_id = session_id

    def _headers(self, session: ClientSession) -> dict[str, str]:
        headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
        if self.session_id:
            headers[MCP_SESSION_ID] = self.session_id
        if session.protocol_version:
            headers[MCP_PROTOCOL_VERSION_HEADER] = session.protocol_version
        return headers

    async def call_tool(self, session: ClientSession, tool: str, arguments: dict[str, Any],
                        timeout_s: float) -> types.CallToolResult | None:
        """The upstream's result; None when the call was not sent (a redirect: use the SDK)."""
        request_id = f"{self._prefix}{next(self._ids)}"
        params = types.CallToolRequestParams(name=tool, arguments=arguments)
        body = JSONRPCRequest(jsonrpc="2.0", id=request_id, method="tools/call",
                              params=params.model_dump(by_alias=True, mode="json", exclude_none=True))
        headers = self._headers(session)
        answer: JSONRPCResponse | JSONRPCError | None = None
        with anyio.move_on_after(timeout_s) as scope:
            try:
                content = body.model_dump_json(by_alias=True, exclude_unset=True)
                if self.lean is not None:
                    answer = await self.lean.post(content.encode(), headers,
                                                  lambda received: self._answer(received, request_id, headers))
                else:
                    async with self.client.stream("POST", self.url, content=content, headers=headers) as response:
                        answer = await self._answer(_HttpxAnswer(response), request_id, headers)
                if answer is None:  # a redirect
                    self.usable = False
                    return None
            except anyio.get_cancelled_exc_class():
                # Timed out, or the caller (the gateway's client) cancelled: as the SDK does, a
                # courtesy notifications/cancelled so that the upstream stops the work.
                reason = "timed out" if scope.cancel_called else "caller cancelled"
                with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_WRITE_S):
                    await self._cancel(request_id, reason, headers)
                raise
        if scope.cancelled_caught:
            raise MCPError(REQUEST_TIMEOUT, "Request 'tools/call' timed out")  # the SDK's words
        if isinstance(answer, JSONRPCError):
            raise MCPError.from_jsonrpc_error(answer)
        assert answer is not None
        result = types.CallToolResult.model_validate(answer.result, by_name=False)
        if not result.is_error:
            await session.validate_tool_result(tool, result)
        return result

    async def _answer(self, response: _Answer, request_id: str,
                      headers: dict[str, str]) -> JSONRPCResponse | JSONRPCError | None:
        """The call's JSON-RPC answer; None for a redirect (the call is then made through the SDK)."""
        status = response.status
        if status in REDIRECTS:
            return None
        if status == 202:
            raise MCPError(INVALID_REQUEST, "server answered a request with 202 Accepted")
        content_type = response.content_type.lower()
        if status >= 400:
            if content_type.startswith("application/json"):
                try:
                    parsed = jsonrpc_message_adapter.validate_json(await response.body(), by_name=False)
                except ValueError:
                    parsed = None
                if isinstance(parsed, JSONRPCError):
                    raise MCPError.from_jsonrpc_error(parsed)
            if status == 404 and self.session_id:
                raise MCPError(INVALID_REQUEST, "Session terminated")
            raise MCPError(INTERNAL_ERROR, f"Server returned an error response ({status})")
        if content_type.startswith("application/json"):
            message = jsonrpc_message_adapter.validate_json(await response.body(), by_name=False)
            if isinstance(message, JSONRPCResponse | JSONRPCError) and message.id == request_id:
                return message
            raise MCPError(INVALID_REQUEST, "the server's JSON answer is not the call's response")
        if not content_type.startswith("text/event-stream"):
            raise MCPError(INVALID_REQUEST, f"Unexpected content type: {content_type}")
        answer: JSONRPCResponse | JSONRPCError | None = None
        while (data := await response.next_event()) is not None:
            if not data:
                continue  # a priming event (an id, no message)
            message = jsonrpc_message_adapter.validate_json(data, by_name=False)
            if isinstance(message, JSONRPCResponse | JSONRPCError) and message.id == request_id:
                answer = message
                break
            if isinstance(message, JSONRPCRequest):
                await self._refuse(message, headers)
            # notifications (progress, logging): the gateway passes none on, as before
        if answer is None:
            raise MCPError(INVALID_REQUEST, "SSE stream ended without a response")
        with anyio.move_on_after(DRAIN_S):
            await response.drain()
        return answer

    async def _cancel(self, request_id: str, reason: str, headers: dict[str, str]) -> None:
        params = types.CancelledNotificationParams(request_id=request_id, reason=reason)
        notice = JSONRPCNotification(jsonrpc="2.0", method="notifications/cancelled",
                                     params=params.model_dump(by_alias=True, mode="json", exclude_none=True))
        try:
            await self.client.post(self.url, content=notice.model_dump_json(by_alias=True, exclude_unset=True),
                                   headers=headers)
        except httpx2.HTTPError:
            pass  # the upstream is gone: nothing to stop

    async def _refuse(self, request: JSONRPCRequest, headers: dict[str, str]) -> None:
        """Answers a server request made inside the call as the SDK's default callbacks do."""
        if request.method == "ping":
            reply: dict[str, Any] = {"jsonrpc": "2.0", "id": request.id, "result": {}}
        else:
            reply = {"jsonrpc": "2.0", "id": request.id, "error": {
                "code": METHOD_NOT_FOUND, "message": f"{request.method} is not supported by the ARM gateway"}}
        await self.client.post(self.url, content=json.dumps(reply), headers=headers)


class _Answer(Protocol):
    """An upstream's HTTP answer as `DirectCalls._answer` reads it."""

    status: int
    content_type: str

    async def body(self) -> bytes: ...

    async def next_event(self) -> str | None:
        """The next server-sent event's data ("" for an event without any); None at the end."""

    async def drain(self) -> None:
        """Reads the rest of the answer."""


class _HttpxAnswer:
    def __init__(self, response: httpx2.Response) -> None:
        self.response = response
        self.status = response.status_code
        self.content_type = response.headers.get("content-type", "")
        self.events: Any = None

    async def body(self) -> bytes:
        return await self.response.aread()

    async def next_event(self) -> str | None:
        if self.events is None:
            self.events = httpx2.EventSource(self.response).__aiter__()
        try:
            return str((await self.events.__anext__()).data)
        except StopAsyncIteration:
            return None

    async def drain(self) -> None:
        if self.events is not None:
            async for _ in self.events:
                pass


T = TypeVar("T")
KEEPALIVE_S = 4.0
"""An idle connection older than this is closed rather than used (uvicorn, the SDK's server,
closes them after 5 s)."""
MAX_CONNECTIONS, MAX_IDLE = 100, 20
"""Connections open at once (more calls wait), and kept idle: httpx's default limits."""
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(r"\r\n|\n|\r")


class LeanPosts:
    """HTTP/1.1 POSTs to a plain-HTTP upstream on keep-alive connections of their own, each
    request sent with one write and its answer (JSON, or an event stream, chunked or not) read
    straight from the socket. It costs the gateway much less CPU per call than httpx's client
    (its request, auth, redirect and pool layers, h11, two writes per request); the SDK's own
    requests (initialize, tools/list, the GET stream) stay on httpx. Not used for HTTPS, or
    when the environment names an HTTP proxy (httpx honours it)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or ""
        self.port = parts.port or 80
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.authority = parts.netloc.rpartition("@")[2]
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.slots = anyio.Semaphore(MAX_CONNECTIONS)

    @staticmethod
    def fits(url: str) -> bool:
        proxies = urllib.request.getproxies()
        return urlsplit(url).scheme == "http" and not ("http" in proxies or "all" in proxies)

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        now = time.monotonic()
        while self.idle:
            reader, writer, since = self.idle.pop()
            if now - since < KEEPALIVE_S and not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        with anyio.fail_after(30.0):  # the SDK's (httpx's) connect timeout
            return await asyncio.open_connection(self.host, self.port)

    async def post(self, body: bytes, headers: dict[str, str],
                   read: Callable[[_Answer], Awaitable[T]]) -> T:
        """Sends the POST and returns what `read` makes of the answer."""
        async with self.slots:
            return await self._post(body, headers, read)

    async def _post(self, body: bytes, headers: dict[str, str], read: Callable[[_Answer], Awaitable[T]]) -> T:
        reader, writer = await self._connection()
        answer: _LeanAnswer | None = None
        try:
            head = [f"POST {self.target} HTTP/1.1", f"host: {self.authority}",
                    *(f"{k}: {v}" for k, v in headers.items()), f"content-length: {len(body)}", "", ""]
            writer.write("\r\n".join(head).encode("latin-1") + body)
            await writer.drain()
            answer = await _LeanAnswer.read_head(reader)
            return await read(answer)
        finally:
            if answer is not None and answer.done and answer.reusable and len(self.idle) < MAX_IDLE:
                self.idle.append((reader, writer, time.monotonic()))
            else:  # failed, cancelled, or not read to its end: the connection's state is unknown
                writer.close()

    def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


class _LeanAnswer:
    def __init__(self, reader: asyncio.StreamReader, status: int, version: str, headers: dict[str, str]) -> None:
        self.reader = reader
        self.status = status
        self.content_type = headers.get("content-type", "")
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self.left: int | None = None if self.chunked else (int(length) if length is not None else None)
        if status in (204, 304) or status < 200:
            self.left, self.chunked = 0, False
        self.reusable = (version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
                         and (self.chunked or self.left is not None))
        self.done = False
        self.buffer = b""

    @classmethod
    async def read_head(cls, reader: asyncio.StreamReader) -> _LeanAnswer:
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        version, status, _ = (lines[0] + " ").split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return cls(reader, int(status), version, headers)

    async def chunk(self) -> bytes:
        """The next piece of the body; b"" at its end."""
        if self.done:
            return b""
        if self.chunked:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await self.reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                self.done = True
                return b""
            data = await self.reader.readexactly(size)
            await self.reader.readexactly(2)
            return data
        if self.left is not None:
            data = await self.reader.readexactly(self.left) if self.left else b""
            self.left = 0
            self.done = True
            return data
        data = await self.reader.read(65536)  # to the end of the connection
        self.done = not data
        return data

    async def body(self) -> bytes:
        parts = []
        while data := await self.chunk():
            parts.append(data)
        return b"".join(parts)

    async def next_event(self) -> str | None:
        while not (found := _EVENT_END.search(self.buffer)):
            data = await self.chunk()
            if not data:
                return None  # (an unterminated last event is dropped, as the SSE spec says)
            self.buffer += data
        event, self.buffer = self.buffer[:found.start()], self.buffer[found.end():]
        data_lines = []
        for line in _LINE.split(event.decode("utf-8", errors="replace")):
            name, sep, value = line.partition(":")
            if name == "data":
                data_lines.append(value[1:] if value.startswith(" ") else value)
        return "\n".join(data_lines)

    async def drain(self) -> None:
        while await self.chunk():
            pass
