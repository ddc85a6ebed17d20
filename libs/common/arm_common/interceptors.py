"""The one server interceptor every service uses: request id, authentication, and mapping of
domain errors (and unexpected ones) to gRPC statuses with `google.rpc` details."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from arm_common import edge, otel
from arm_common.auth import (
    ACT_FOR_TENANT_HEADER,
    Authenticator,
    Principal,
    _api_key,
    _current,
    _request_id,
    act_for_tenant,
)
from arm_common.db import is_connection_error
from arm_common.errors import (
    ERROR_DOMAIN,
    ArmError,
    DatabaseUnavailable,
    Unauthenticated,
    Unimplemented,
)

log = logging.getLogger(__name__)

# Calls that need no key: health checks and reflection.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def to_status(err: ArmError, request_id: str) -> grpc.Status:
    details = []
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN,
                                       metadata={**err.metadata, "request_id": request_id})
    details.append(info)
    if err.violations:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in err.violations]))
    if err.retry_delay_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(err.retry_delay_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    return rpc_status.to_status(status_pb2.Status(
        code=getattr(code_pb2, err.code.name), message=err.message, details=packed))


_last_unavailable_warning = 0.0


def database_unavailable(exc: BaseException) -> DatabaseUnavailable | None:
    """A database connection or timeout error that reached the interceptor without passing a
    Database (whose own outage log says it once, see Database.unavailable): UNAVAILABLE with
    RetryInfo, not INTERNAL with a traceback; warned about at most once a minute."""
    global _last_unavailable_warning
    if not is_connection_error(exc):
        return None
    now = time.monotonic()
    if now - _last_unavailable_warning >= 60:
        _last_unavailable_warning = now
        log.warning("a database is unavailable (%s: %s); answering UNAVAILABLE",
                    type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
    return DatabaseUnavailable()


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization must be 'Bearer <api key>'",
                                      reason="INVALID_AUTHORIZATION_HEADER")
            return token.strip()
    return None


def _new_request_id() -> str:
    """32 random hex digits (uuid4().hex without its version bits, at a fifth of the cost)."""
    return os.urandom(16).hex()


def _metadata_value(metadata: Any, name: str) -> str:
    for key, value in metadata or ():
        if key == name:
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return ""


class ArmServerInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every non-public call, sets the principal and request id for the handler,
    and turns ArmError into a status with ErrorInfo/BadRequest/RetryInfo details. Anything else
    becomes INTERNAL with the request id to look up in the logs; the server keeps serving."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator
        # A method's wrapped handler is built once: servers hand out the same method handler
        # for every call, so per call only the wrapper's own work remains.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        entry = self._wrapped.get(method)
        if entry is None or entry[0] is not handler:
            entry = self._wrapped[method] = (handler, self._wrap(method, handler))
        return entry[1]

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        authenticator = self.authenticator

        async def prepare(metadata: Any, request_id: str) -> Principal:
            key = _bearer(metadata)
            if key is None:
                raise Unauthenticated("this call needs 'authorization: Bearer <api key>'",
                                      reason="MISSING_API_KEY")
            _request_id.set(request_id)
            principal = await authenticator.authenticate(key)
            acting_for = _metadata_value(metadata, ACT_FOR_TENANT_HEADER)
            if acting_for:
                principal = act_for_tenant(principal, acting_for)
            _current.set(principal)
            _api_key.set(key)
            return principal

        def done(started: float, exc: BaseException | None) -> None:
            if exc is None:
                code = "OK"
            elif isinstance(exc, ArmError):
                code = exc.code.name
            elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                code = "CANCELLED"
                log.debug("%s cancelled by the client", method)
            elif isinstance(exc, grpc.aio.AbortError):
                code = "ABORTED_BY_HANDLER"
            elif isinstance(exc, NotImplementedError):
                code = "UNIMPLEMENTED"
            else:
                code = "INTERNAL"
            otel.record_rpc(method, code, (time.perf_counter() - started) * 1000)

        async def fail(context: grpc.aio.ServicerContext, exc: BaseException, request_id: str) -> None:
            if isinstance(exc, NotImplementedError):
                # Generated servicer bases raise this for RPCs a later release implements.
                exc = Unimplemented(f"{method} is not implemented yet", reason="NOT_IMPLEMENTED",
                                    metadata={"method": method})
            exc = database_unavailable(exc) or exc
            if isinstance(exc, ArmError):
                status = to_status(exc, request_id)
                await context.abort(status.code, status.details, status.trailing_metadata)
            log.exception("unexpected error in %s (request %s)", method, request_id)
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"internal error; request id {request_id}")

        def passthrough(exc: BaseException) -> bool:
            # Aborts raised by handlers themselves, and cancellation, propagate unchanged. A client
            # cancelling a stream while grpc sends a response closes the handler's generator at its
            # `yield` (GeneratorExit) rather than cancelling a task: that too is quiet.
            return isinstance(exc, (asyncio.CancelledError, GeneratorExit, grpc.aio.AbortError))

        def unary_response(inner: Any) -> Any:
            """Wraps a handler returning one response (unary-unary and stream-unary alike)."""
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                metadata = context.invocation_metadata()
                request_id = _metadata_value(metadata, "x-request-id") or _new_request_id()
                try:
                    await prepare(metadata, request_id)
                    result = await inner(edge.screen(request, streaming), context)
                except BaseException as exc:
                    done(started, exc)
                    if passthrough(exc):
                        raise
                    await fail(context, exc, request_id)
                done(started, None)
                return result
            return wrapper

        def stream_response(inner: Any) -> Any:
            """Wraps a handler yielding responses (unary-stream and stream-stream alike)."""
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                started = time.perf_counter()
                metadata = context.invocation_metadata()
                request_id = _metadata_value(metadata, "x-request-id") or _new_request_id()
                try:
                    await prepare(metadata, request_id)
                    async for item in inner(edge.screen(request, streaming), context):
                        yield item
                except BaseException as exc:
                    done(started, exc)
                    if passthrough(exc):
                        raise
                    await fail(context, exc, request_id)
                done(started, None)
            return wrapper

        # Bad bytes and out-of-range values are the caller's mistake: INVALID_ARGUMENT (arm_common.edge).
        streaming = handler.request_streaming
        ser = (edge.tolerant(handler.request_deserializer), handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary), *ser)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary), *ser)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(stream_response(handler.unary_stream), *ser)
        return grpc.stream_stream_rpc_method_handler(stream_response(handler.stream_stream), *ser)


