"""gRPC server bootstrap shared by every service and the all-in-one dev server: `grpc.aio`,
health checking, reflection, the ARM interceptor, OpenTelemetry, graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from collections.abc import Sequence
from typing import Protocol, TypeAlias

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from arm_common import otel, tls
from arm_common.auth import Authenticator
from arm_common.config import ConfigError
from arm_common.health import HealthPublisher
from arm_common.interceptors import ArmServerInterceptor

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_CONNECTION_AGE_S = 300.0

# The context every servicer method receives.
Ctx: TypeAlias = grpc.aio.ServicerContext


class AddressInUse(ConfigError):
    """The address to serve on is taken by another process that does not share it with us."""

    def __init__(self, listen: str, *, share_port: bool = False) -> None:
        if share_port:
            advice = ("ARM_SHARE_PORT=true shares a port only with processes that set it too: "
                      "stop that process or pick another port (ARM_LISTEN or ARM_<SERVICE>_LISTEN).")
        else:
            advice = ("Stop that process, pick another port (ARM_LISTEN or ARM_<SERVICE>_LISTEN), "
                      "or, to run several identical workers on one port on purpose, set "
                      "ARM_SHARE_PORT=true in every one of them.")
        super().__init__(f"cannot serve on {listen}: the address is already in use, by another "
                         f"ARM server or a stale process. {advice}")
        self.listen = listen


def _address_in_use(listen: str) -> bool:
    """True if some address `listen` resolves to cannot be bound because it is in use. Catches
    the case gRPC lets pass: `localhost:P` binds [::1]:P when only 127.0.0.1:P is taken."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return False
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError:
        return False  # let gRPC report the unresolvable name
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def bind(server: grpc.aio.Server, listen: str, *, share_port: bool,
         credentials: grpc.ServerCredentials | None = None) -> int:
    """Adds the port `listen` to `server` (TLS with `credentials`, else plaintext); returns the
    bound port. Without port sharing an address in use raises AddressInUse instead of quietly
    splitting clients between servers."""
    if not share_port and _address_in_use(listen):
        raise AddressInUse(listen)
    try:
        port = (server.add_secure_port(listen, credentials) if credentials is not None
                else server.add_insecure_port(listen))
    except RuntimeError:
        port = 0
    if port == 0:
        if _address_in_use(listen):
            raise AddressInUse(listen, share_port=share_port)
        raise ConfigError(f"cannot serve on {listen}: gRPC could not bind it (is the host an "
                          "address of this machine?)")
    return port
REFLECTION_V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"


def _describe_reflection_v1() -> None:
    """Adds grpc/reflection/v1/reflection.proto to the default descriptor pool (v1alpha's file
    under v1's package), so reflection can describe its own v1 service."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName("grpc/reflection/v1/reflection.proto")
        return
    except KeyError:
        pass
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    proto.options.Clear()
    for message in proto.message_type:
        for f in message.field:
            if f.HasField("type_name"):
                f.type_name = f.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.Add(proto)


def enable_reflection_v1(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serves `grpc.reflection.v1` (what current grpcurl and buf curl ask first) beside v1alpha.
    grpcio-reflection ships only v1alpha; the two protocols differ in their package name alone
    (same messages, same field numbers), so v1alpha's servicer answers v1 calls byte for byte."""
    _describe_reflection_v1()
    servicer = reflection_aio.ReflectionServicer(service_names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        REFLECTION_V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),))


class Component(Protocol):
    """A part hosted by a server: registers its servicers, runs background work."""

    def attach(self, server: grpc.aio.Server) -> list[str]:
        """Adds servicers; returns their full service names (for health and reflection)."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Host:
    """One gRPC server on one address hosting one or more components."""

    def __init__(self, components: Sequence[Component], authenticator: Authenticator,
                 listen: str, *, service_name: str = "arm", share_port: bool = False,
                 tls_settings: tls.TlsSettings | None = None,
                 max_connection_age_s: float = MAX_CONNECTION_AGE_S) -> None:
        otel.configure(service_name)
        self.components = list(components)
        self.listen = listen
        self.share_port = share_port
        self.tls = tls_settings or tls.TlsSettings()
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            interceptors=[*([otel.server_interceptor()] if otel.enabled() else []),
                          ArmServerInterceptor(authenticator)],
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                     # Port sharing only when asked for (ARM_SHARE_PORT): by default
                     # a second server on a port in use must fail, not take half the clients.
                     ("grpc.so_reuseport", 1 if share_port else 0),
                     # Clients reconnect (and re-resolve their dns:/// target) at least this often,
                     # so replicas added later get calls too; calls and streams in flight are not
                     # cut (the grace after the age is unlimited).
                     ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000))])
        self.service_names: list[str] = []
        self.port = 0
        self.readiness: HealthPublisher | None = None

    async def start(self) -> int:
        """Starts serving; returns the bound port (useful with port 0)."""
        credentials = tls.server_credentials(self.tls) if self.tls.serves_tls else None
        self.port = bind(self.server, self.listen, share_port=self.share_port, credentials=credentials)
        if credentials is None and not tls.is_loopback(self.listen):
            log.warning("!!! SERVING PLAINTEXT ON %s, A NON-LOOPBACK ADDRESS: API keys cross the "
                        "network in clear. Set ARM_TLS_CERT_FILE and ARM_TLS_KEY_FILE (and "
                        "ARM_TLS_CLIENT_CA_FILE for mTLS) to serve TLS. !!!", self.listen)
        address = f"{self.listen.rpartition(':')[0]}:{self.port}"
        parts = []
        for component in self.components:
            bound = getattr(component, "bound", None)
            if bound is not None:  # e.g. a component that calls another hosted here
                bound(address)
            names = component.attach(self.server)
            self.service_names.extend(names)
            parts.append((getattr(component, "readiness", None), names))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection_names = [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME,
                            REFLECTION_V1_SERVICE_NAME]
        reflection.enable_server_reflection(reflection_names, self.server)
        enable_reflection_v1(reflection_names, self.server)
        for component in self.components:
            await component.start()
        # Not ready until the first probes say so (the servicer starts with "" SERVING).
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        # Readiness ("" and the service names) follows each component's database and peers;
        # `liveness` stays SERVING (see arm_common/health.py).
        self.readiness = HealthPublisher(self.health, parts)
        await self.readiness.start()
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        """Reports NOT_SERVING, lets in-flight calls finish for `grace` seconds, then stops
        background work."""
        if self.readiness is not None:
            await self.readiness.stop()
        await self.health.enter_graceful_shutdown()
        for component in self.components:
            draining = getattr(component, "draining", None)
            if draining is not None:  # e.g. close long-lived streams it holds open to a peer
                await draining()
        await self.server.stop(grace)
        for component in reversed(self.components):
            await component.stop()

    async def serve_until_signal(self, grace: float, stop: asyncio.Event | None = None) -> None:
        """Serves until SIGTERM or SIGINT (`stop`, from `stop_on_signal()` called before the
        process announced itself, or handlers installed now), then shuts down gracefully."""
        if stop is None:
            stop = stop_on_signal()
        await stop.wait()
        log.info("shutting down (grace %.1fs)", grace)
        await self.stop(grace)


def stop_on_signal() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT. Call it before a process prints that it is listening:
    a supervisor (or test) that signals as soon as it reads the line gets a graceful stop, not the
    default handler's kill."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
