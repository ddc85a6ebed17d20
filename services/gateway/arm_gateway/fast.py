"""A streamable HTTP client's `tools/call`, answered beside the SDK's server (`fast_http_calls`).

The `mcp` SDK's server side costs the gateway most of its CPU per call (bench/README.md): for
each POST, Starlette's routing and middleware, the session manager, the transport's memory
streams and response stream, the JSON-RPC dispatcher's task, `ServerSession` and the
OpenTelemetry middleware, around a handler that is a small part of it. This ASGI app, in front
of the SDK's, answers one kind of request itself: a POST to the MCP endpoint carrying a single
JSON-RPC `tools/call` request for a session the SDK's session manager serves and the gateway
has already seen (its run started by an earlier request through the SDK). It checks what the
SDK checks (DNS-rebinding Host/Origin and Content-Type, Accept, the protocol version header, the
body size limit, the session being live and initialized, the params against the negotiated
protocol version's schema), runs the gateway's own call handler (`Gateway.governed_call`: the
same decision, events, approvals and error results) and answers as the SDK's JSON-response mode
does: the same status, headers and body, the result shaped by the SDK's own serializer. A
`notifications/cancelled` for a call in flight here cancels it (answered "Request cancelled", as
the SDK answers on this wire) before the SDK gets the notification.

Anything else goes to the SDK's app untouched (with the body it sent, replayed): initialize,
tools/list, notifications, GET and DELETE, batches, unknown or missing session ids, a session's
first request, anything malformed or refused (the SDK gives its own answer), and every request
while an OpenTelemetry tracer is configured or the server has other middleware (the fast path
opens no span). The SDK internals it needs are read in arm_gateway._sdk; if they are missing
the fast path stays off."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio
import pydantic_core
from mcp.server.streamable_http import (
    MCP_SESSION_ID_HEADER,
    REQUEST_CANCELLED,
    check_accept_headers,
)
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware
from mcp.shared.dispatcher import coerce_request_id
from mcp.shared.jsonrpc_dispatcher import cancelled_request_id_from_params, handler_exception_to_error_data
from mcp_types import (
    INTERNAL_ERROR,
    CallToolRequestParams,
    ErrorData,
    JSONRPCError,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
    RequestId,
    jsonrpc_message_adapter,
)
from mcp_types import methods as spec_methods
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from opentelemetry import trace
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from arm_gateway import _sdk

if TYPE_CHECKING:
    from arm_gateway.gateway import Gateway

log = logging.getLogger("arm_gateway")

_SESSION = MCP_SESSION_ID_HEADER.encode()
_VERSION = b"mcp-protocol-version"
_CONTENT_LENGTH = b"content-length"
_TOOLS_CALL = "tools/call"
_CANCELLED = "notifications/cancelled"


class FastCalls:
    """The ASGI app: `tools/call` POSTs answered here, everything else by `app` (the SDK's)."""

    def __init__(self, app: ASGIApp, gateway: Gateway, manager: StreamableHTTPSessionManager,
                 path: str = "/mcp") -> None:
        self.app = app
        self.gateway = gateway
        self.manager = manager
        self.path = path
        self.on = _sdk.usable(manager) and _sdk.only_sdk_tracing(gateway.server)
        if not self.on:
            log.warning("fast_http_calls: this mcp SDK does not have what the fast path reads; every "
                        "request goes through the SDK's server")
        self.security = TransportSecurityMiddleware(manager.security_settings)
        self.in_flight: dict[tuple[str, RequestId], anyio.CancelScope] = {}
        self.answered = 0
        """tools/call requests answered here (logged when the gateway stops)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path or not self.on
                or not self.manager.json_response or self.manager.stateless):
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key, value)  # the first of each, as Starlette's Headers.get reads
        raw_id = headers.get(_SESSION)
        session_id = raw_id.decode("latin-1") if raw_id is not None else None
        version = headers.get(_VERSION)
        if (session_id is None or session_id not in self.gateway.http_sessions
                or (version is not None and version.decode("latin-1") not in HANDSHAKE_PROTOCOL_VERSIONS)
                or not self._declared_size_ok(headers.get(_CONTENT_LENGTH))):
            await self.app(scope, receive, send)
            return
        body, replay = await self._read_body(receive)
        if body is None or not await self._answer(scope, session_id, body, send):
            await self.app(scope, replay, send)

    def _declared_size_ok(self, value: bytes | None) -> bool:
        try:
            return value is None or int(value) <= self.manager.max_request_body_size
        except ValueError:
            return True  # the SDK ignores an unparsable Content-Length too

    async def _read_body(self, receive: Receive) -> tuple[bytes | None, Receive]:
        """The whole body (None: too large, or the client went away: the SDK answers), and a
        `receive` replaying what was read, for the SDK's app."""
        read: list[Message] = []
        size = 0
        complete = False
        while True:
            message = await receive()
            read.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.manager.max_request_body_size:
                break
            if not message.get("more_body", False):
                complete = True
                break

        async def replay() -> Message:
            if read:
                return read.pop(0)
            return await receive()

        return (b"".join(m.get("body", b"") for m in read) if complete else None), replay

    async def _answer(self, scope: Scope, session_id: str, body: bytes, send: Send) -> bool:
        """Answers the request if it is a `tools/call` the fast path takes; False: not taken
        (nothing was sent, nothing run)."""
        try:
            raw = pydantic_core.from_json(body)
        except ValueError:
            return False
        if not isinstance(raw, dict) or raw.get("method") not in (_TOOLS_CALL, _CANCELLED):
            return False
        if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            return False  # a tracer is configured: the SDK's path opens the call's span
        request = Request(scope)
        if (await self.security.validate_request(request, is_post=True) is not None
                or not _json_content_type(request.headers.get("content-type", ""))
                or not check_accept_headers(request)[0]):
            return False
        try:
            message = jsonrpc_message_adapter.validate_python(raw, by_name=False)
        except ValidationError:
            return False
        if isinstance(message, JSONRPCNotification):
            self._cancel(session_id, message)
            return False  # and the SDK takes the notification as ever
        if not isinstance(message, JSONRPCRequest):
            return False
        known = self.gateway.http_sessions.get(session_id)
        transport = _sdk.live_transport(self.manager, session_id)
        if known is None or transport is None:
            return False
        session, connection = known
        protocol = connection.protocol_version
        key = (session_id, coerce_request_id(message.id))
        if not connection.initialize_accepted or key in self.in_flight:
            return False
        try:
            spec_methods.validate_client_request(_TOOLS_CALL, protocol, message.params)
            params = CallToolRequestParams.model_validate(message.params or {}, by_name=False)
        except (ValueError, KeyError):  # pydantic's ValidationError is a ValueError
            return False
        self.answered += 1
        with _sdk.request_in_flight(transport):
            answer = await self._call(key, message, session, params, protocol)
        if transport.is_terminated:  # the client ended the session meanwhile: as the SDK answers
            response = _response(JSONRPCError(jsonrpc="2.0", id=None, error=ErrorData(
                code=INTERNAL_ERROR, message="Session terminated before the request completed")), session_id, 500)
        else:
            response = _response(answer, session_id, 200)
        await response(scope, _no_receive, send)
        return True

    async def _call(self, key: tuple[str, RequestId], message: JSONRPCRequest, session: Any,
                    params: CallToolRequestParams, protocol: str) -> JSONRPCResponse | JSONRPCError:
        """Runs the call as the SDK's runner and dispatcher would around the gateway's handler."""
        error: ErrorData | None = None
        result: dict[str, Any] = {}
        with anyio.CancelScope() as cancel:
            self.in_flight[key] = cancel
            try:
                called = await self.gateway.governed_call(session, params.name, params.arguments or {})
                try:
                    result = spec_methods.serialize_server_result(
                        _TOOLS_CALL, protocol, called.model_dump(by_alias=True, mode="json", exclude_none=True))
                except ValidationError:
                    log.exception("handler for %r returned an invalid result", _TOOLS_CALL)
                    error = ErrorData(code=INTERNAL_ERROR, message="Handler returned an invalid result")
            except Exception as exc:
                error = handler_exception_to_error_data(exc)
                if error is None:
                    log.exception("handler for %r raised", _TOOLS_CALL)
                    error = ErrorData(code=0, message=str(exc))  # the SDK dispatcher's answer
            finally:
                del self.in_flight[key]
        if cancel.cancelled_caught:
            error = ErrorData(code=REQUEST_CANCELLED, message="Request cancelled")
        if error is not None:
            return JSONRPCError(jsonrpc="2.0", id=message.id, error=error)
        return JSONRPCResponse(jsonrpc="2.0", id=message.id, result=result)

    def _cancel(self, session_id: str, notice: JSONRPCNotification) -> None:
        if notice.method != _CANCELLED:
            return
        request_id = cancelled_request_id_from_params(notice.params)
        if request_id is not None and (scope := self.in_flight.get((session_id, coerce_request_id(request_id)))):
            scope.cancel()


def _json_content_type(content_type: str) -> bool:
    """The transport's own Content-Type check (beside the security middleware's)."""
    return any(part.strip() == "application/json" for part in content_type.split(";")[0].split(","))


def _response(message: JSONRPCResponse | JSONRPCError, session_id: str, status: int) -> Response:
    """As the SDK's transport builds its JSON answers (`_create_json_response`)."""
    return Response(message.model_dump_json(by_alias=True, exclude_unset=True), status_code=status,
                    headers={"Content-Type": "application/json", MCP_SESSION_ID_HEADER: session_id})


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}

