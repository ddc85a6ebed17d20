"""The few `mcp` SDK internals the fast path (arm_gateway.fast) reads, in one place.

mcp 2.3 gives no public way to ask its streamable HTTP session manager whether a session id is
live, nor to hold a session's idle timer while a request is served outside its transport. These
helpers read the manager's session table and the transport's idle bookkeeping exactly as
`StreamableHTTPSessionManager._handle_stateful_request` and
`StreamableHTTPServerTransport.handle_request` do. tests/gateway/test_fast_path.py
(`test_the_sdk_internals_the_fast_path_reads_are_there`) fails if the SDK changes under them; any
of them missing at run time turns the fast path off (every request goes to the SDK)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import anyio
from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager


def usable(manager: StreamableHTTPSessionManager) -> bool:
    """Whether this SDK has the internals below (else the fast path stays off)."""
    probe = StreamableHTTPServerTransport(mcp_session_id="probe", idle_timeout=1.0)
    return (isinstance(getattr(manager, "_server_instances", None), dict)
            and isinstance(getattr(manager, "_session_owners", None), dict)
            and all(hasattr(probe, a) for a in ("_requests_in_flight", "_idle_timeout", "idle_scope", "is_terminated")))


def live_transport(manager: StreamableHTTPSessionManager, session_id: str) -> StreamableHTTPServerTransport | None:
    """The session's transport when the manager would serve a request for it as an existing,
    live session with no credential (the gateway configures no auth); None otherwise."""
    transport: StreamableHTTPServerTransport | None = manager._server_instances.get(session_id)
    if transport is None or transport.is_terminated or manager._session_owners.get(session_id) is not None:
        return None
    idle = transport.idle_scope
    if idle is not None and idle.cancel_called:  # expiring: the SDK answers it as terminated
        return None
    return transport


@contextlib.contextmanager
def request_in_flight(transport: StreamableHTTPServerTransport) -> Iterator[None]:
    """Holds the session's idle timer while a request is served, as the transport's
    `handle_request` does for the requests it serves."""
    idle: Any = transport.idle_scope
    timeout = transport._idle_timeout
    if idle is None or timeout is None:
        yield
        return
    transport._requests_in_flight += 1
    idle.deadline = math.inf
    try:
        yield
    finally:
        transport._requests_in_flight -= 1
        if not transport._requests_in_flight:
            idle.deadline = anyio.current_time() + timeout


def only_sdk_tracing(server: Any) -> bool:
    """Whether the server's middleware is only the SDK's OpenTelemetry span (the default): the
    fast path runs no middleware, so it is taken only then (and with no tracer configured)."""
    from mcp.server._otel import OpenTelemetryMiddleware

    return all(type(m) is OpenTelemetryMiddleware for m in server.middleware)
