"""`tools/call` to a streamable HTTP upstream as one POST, beside the SDK's session.

The `mcp` SDK's `ClientSession` keeps the session: `initialize`, `tools/list`, the server's
notifications on its GET stream, the reconnections. Its per-request machinery (a task group and
two tasks per request, the message passed through several anyio memory streams, with about 18
cancel scopes) costs the gateway more CPU per forwarded call than everything else it does
(bench/README.md). So a call is sent here as a direct POST on the same persistent HTTP client,
carrying the SDK session's `Mcp-Session-Id` (seen on its `initialize` answer) and the negotiated
protocol version; its answer, plain JSON or an event stream (read with httpx2's `EventSource`),
is parsed into the SDK's own JSON-RPC and `CallToolResult` models and checked against the tool's
output schema by the session (`validate_tool_result`), as `ClientSession.call_tool` does.

Failures raise `MCPError` as the SDK would for the same answer (a JSON-RPC error, a 404 once a
session exists: "Session terminated", a timeout), or the HTTP client's own errors; the gateway
treats them as before (error result, the connection restarted). A call that times out or that
the caller cancels is followed, as in the SDK, by a `notifications/cancelled` for it. A server request inside the
call's stream (ping, sampling, elicitation, roots) is answered as the SDK's default callbacks
would: `ping` with an empty result, the others with an error. A redirect is not followed here:
the call goes through the SDK (which follows same-origin ones) and so do later calls."""

from __future__ import annotations

import itertools
import json
from typing import Any

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
DRAIN_S = 0.2
"""After the answer, how long the rest of an event stream is read (the server ends it right
after the answer; read to its end the connection is kept for the next call)."""


class DirectCalls:
    """Direct `tools/call` POSTs for one connection (one SDK session) to a streamable HTTP
    upstream. `client` is the HTTP client to give the SDK's transport too (`http_client=`), with
    the SDK's transport timeouts (30 s; reads 300 s, as streams stay open); close it after."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx2.AsyncClient(timeout=httpx2.Timeout(30.0, read=300.0),
                                         event_hooks={"response": [self._seen]})
        self.session_id: str | None = None
        self.usable = True
        """False once a call met a redirect: calls go through the SDK session."""
        self._ids = itertools.count(1)
        self._prefix = f"arm-gw-{id(self):x}-"  # never one of the SDK's (integer) request ids

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
                async with self.client.stream("POST", self.url, content=body.model_dump_json(
                        by_alias=True, exclude_unset=True), headers=headers) as response:
                    if response.is_redirect:
                        self.usable = False
                        return None
                    answer = await self._answer(response, request_id, headers)
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

    async def _answer(self, response: httpx2.Response, request_id: str,
                      headers: dict[str, str]) -> JSONRPCResponse | JSONRPCError:
        if response.status_code == 202:
            raise MCPError(INVALID_REQUEST, "server answered a request with 202 Accepted")
        if response.status_code >= 400:
            if response.headers.get("content-type", "").lower().startswith("application/json"):
                try:
                    parsed = jsonrpc_message_adapter.validate_json(await response.aread(), by_name=False)
                except ValueError:
                    parsed = None
                if isinstance(parsed, JSONRPCError):
                    raise MCPError.from_jsonrpc_error(parsed)
            if response.status_code == 404 and self.session_id:
                raise MCPError(INVALID_REQUEST, "Session terminated")
            raise MCPError(INTERNAL_ERROR, f"Server returned an error response ({response.status_code})")
        content_type = response.headers.get("content-type", "").lower()
        if content_type.startswith("application/json"):
            message = jsonrpc_message_adapter.validate_json(await response.aread(), by_name=False)
            if isinstance(message, JSONRPCResponse | JSONRPCError) and message.id == request_id:
                return message
            raise MCPError(INVALID_REQUEST, "the server's JSON answer is not the call's response")
        if not content_type.startswith("text/event-stream"):
            raise MCPError(INVALID_REQUEST, f"Unexpected content type: {content_type}")
        answer: JSONRPCResponse | JSONRPCError | None = None
        events = httpx2.EventSource(response).__aiter__()
        async for event in events:
            if not event.data:
                continue  # a priming event (an id, no message)
            message = jsonrpc_message_adapter.validate_json(event.data, by_name=False)
            if isinstance(message, JSONRPCResponse | JSONRPCError) and message.id == request_id:
                answer = message
                break
            if isinstance(message, JSONRPCRequest):
                await self._refuse(message, headers)
            # notifications (progress, logging): the gateway passes none on, as before
        if answer is None:
            raise MCPError(INVALID_REQUEST, "SSE stream ended without a response")
        with anyio.move_on_after(DRAIN_S):
            async for _ in events:
                pass
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
