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
the POST goes on aiohttp's client (`AiohttpPosts`: its keep-alive pool and C HTTP parser), which
costs the gateway much less CPU per call than httpx's client (bench/README.md); to an HTTPS one
(TLS stays configured in one place, the SDK's httpx client), or through a proxy named in the
environment (httpx honours it), on the SDK's httpx client.

Failures raise `MCPError` as the SDK would for the same answer (a JSON-RPC error, a 404 once a
session exists: "Session terminated", a timeout), or the HTTP client's own errors; the gateway
treats them as before (error result, the connection restarted). A call that times out or that
the caller cancels is followed, as in the SDK, by a `notifications/cancelled` for it. A server request inside the
call's stream (ping, sampling, elicitation, roots) is answered as the SDK's default callbacks
would: `ping` with an empty result, the others with an error. A redirect is not followed here:
the call goes through the SDK (which follows same-origin ones) and so do later calls."""

from __future__ import annotations

import codecs
import itertools
import json
import urllib.request
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import anyio
import httpx2
import mcp_types as types
from httpx2._config import DEFAULT_MAX_EVENT_SIZE_BYTES
from httpx2._sse import _SSEParser  # (private, as EventSource's parser: tests/gateway checks it)
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

    def __init__(self, url: str, aiohttp_posts: bool = True) -> None:
        self.url = url
        self.client = httpx2.AsyncClient(timeout=httpx2.Timeout(30.0, read=300.0),
                                         event_hooks={"response": [self._seen]})
        self.session_id: str | None = None
        self.usable = True
        """False once a call met a redirect: calls go through the SDK session."""
        self.posts = AiohttpPosts(url) if aiohttp_posts and AiohttpPosts.fits(url) else None
        """The calls' POSTs on aiohttp's client (see AiohttpPosts); None: on `client`."""
        self._ids = itertools.count(1)
        self._prefix = f"arm-gw-{id(self):x}-"  # never one of the SDK's (integer) request ids

    async def aclose(self) -> None:
        """Closes aiohttp's connections (`client` is closed by its owner)."""
        if self.posts is not None:
            await self.posts.aclose()

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
                if self.posts is not None:
                    async with self.posts.post(content.encode(), headers) as received:
                        answer = await self._answer(_AiohttpAnswer(received), request_id, headers)
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


KEEPALIVE_S = 4.0
"""An idle connection older than this is closed rather than used (uvicorn, the SDK's server,
closes them after 5 s)."""
MAX_CONNECTIONS = 100
"""Connections open at once (more calls wait): httpx's default limit."""


class AiohttpPosts:
    """The direct calls' POSTs to a plain-HTTP upstream on aiohttp's client: a keep-alive pool
    (at most MAX_CONNECTIONS, idle ones kept KEEPALIVE_S) and aiohttp's C HTTP parser, which cost
    the gateway much less CPU per call than httpx's client (its request, auth, redirect and pool
    layers, h11); the SDK's own requests (initialize, tools/list, the GET stream) stay on httpx.
    Not used for HTTPS, or when the environment names an HTTP proxy (httpx honours it; aiohttp
    is left without `trust_env`). Its session is made at the first call (it needs the running
    event loop)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session: aiohttp.ClientSession | None = None

    @staticmethod
    def fits(url: str) -> bool:
        proxies = urllib.request.getproxies()
        return urlsplit(url).scheme == "http" and not ("http" in proxies or "all" in proxies)

    def post(self, body: bytes, headers: dict[str, str]) -> Any:
        """The POST, as aiohttp's request context manager (the answer's ClientResponse)."""
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE_S),
                # the SDK's (httpx's) timeouts; the call's own (call_timeout_s) is the caller's
                timeout=aiohttp.ClientTimeout(total=None, connect=30.0, sock_read=300.0))
        return self.session.post(self.url, data=body, headers=headers, allow_redirects=False)

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


class _AiohttpAnswer:
    """An aiohttp answer; its event stream parsed by httpx2's SSE parser (the one the SDK's
    transport uses, through httpx2.EventSource)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.status = response.status
        self.content_type = response.headers.get("content-type", "")
        self.parser: Any = None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.events: list[Any] = []
        self.ended = False

    async def body(self) -> bytes:
        return await self.response.read()

    async def next_event(self) -> str | None:
        if self.parser is None:
            self.parser = _SSEParser(DEFAULT_MAX_EVENT_SIZE_BYTES)
        while not self.events:
            if self.ended:
                return None
            data = await self.response.content.readany()
            if data:
                self.events.extend(self.parser.decode(self.decoder.decode(data)))
            else:
                self.ended = True
                self.events.extend(self.parser.flush())
        return str(self.events.pop(0).data)

    async def drain(self) -> None:
        while await self.response.content.readany():
            pass
