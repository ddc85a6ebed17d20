"""Connection settings and channels: addresses and key from arguments or the environment, one
channel per distinct address, `round_robin` over every address a DNS name resolves to, retries
of idempotent calls on UNAVAILABLE through the gRPC service config, a request id on every call."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from arm_common.tls import TlsSettings
from arm_common.tls import open_channel as open_tls_channel

DEFAULT_ADDRESS = "127.0.0.1:50051"

# Calls that are safe to send twice: reads, and writes the server deduplicates (Check and
# ReportSpend on their request id / idempotency key, IngestEvents on event ids).
IDEMPOTENT_METHODS: dict[str, tuple[str, ...]] = {
    "arm.governance.v1.DecisionService": ("Check", "CheckBatch", "ReportSpend"),
    "arm.governance.v1.ApprovalService": ("GetApproval", "ListApprovals"),
    "arm.telemetry.v1.TelemetryService": ("IngestEvents", "QueryEvents", "GetRunTrace", "GetEventStats"),
    "arm.registry.v1.CompatService": ("ResolveAgentRef",),
}


def service_config(max_attempts: int = 4) -> str:
    """The gRPC service config: round_robin across resolved addresses; idempotent methods
    retried on UNAVAILABLE with exponential backoff."""
    names = [{"service": svc, "method": m} for svc, methods in IDEMPOTENT_METHODS.items() for m in methods]
    return json.dumps({
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{
            "name": names,
            "retryPolicy": {
                "maxAttempts": max_attempts, "initialBackoff": "0.05s", "maxBackoff": "1s",
                "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }],
    })


def target(address: str) -> str:
    """`host:port` → `dns:///host:port`, so every address behind one name is balanced; explicit
    schemes (`dns:`, `ipv4:`, `unix:` …) are kept."""
    if "://" in address or address.startswith(("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")):
        return address
    return f"dns:///{address}"


@dataclass(frozen=True)
class Settings:
    """Where the services are and how to call them. `from_env` reads, for each field not given:

    - `ARM_ADDRESS`: all three services (the all-in-one dev server); default 127.0.0.1:50051.
    - `ARM_REGISTRY_ADDRESS`, `ARM_GOVERNANCE_ADDRESS`, `ARM_TELEMETRY_ADDRESS`: per service,
      when the services run apart (each falls back to `ARM_ADDRESS`).
    - `ARM_API_KEY`: the key sent as `authorization: Bearer <key>` (an agent instance's key for a
      runtime; an operator's for admin tools).
    - `ARM_INSTANCE_ID` / `ARM_LEGACY_AGENT_ID`: the agent the runtime checks calls for.
    - `ARM_TIMEOUT_S`: the deadline of each unary call (default 10).
    - `ARM_TLS_CA_FILE`: verify the servers against this CA bundle (TLS); with
      `ARM_TLS_CERT_FILE` / `ARM_TLS_KEY_FILE`, also present a client certificate (mTLS);
      `ARM_TLS_SERVER_NAME` overrides the name checked in the server's certificate.
    """

    registry_address: str = DEFAULT_ADDRESS
    governance_address: str = DEFAULT_ADDRESS
    telemetry_address: str = DEFAULT_ADDRESS
    api_key: str | None = None
    instance_id: str = ""
    legacy_agent_id: str = ""
    timeout_s: float = 10.0
    extra_channel_options: tuple[tuple[str, Any], ...] = field(default=())
    tls: TlsSettings | None = None
    tracer_provider: Any = None
    """An OpenTelemetry TracerProvider for the SDK's client spans; None: the global one, when the
    application has set one (`trace.set_tracer_provider`). Either way, calls carry the W3C trace
    context of the caller's current span, so the agent's trace continues in ARM's services."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, address: str | None = None,
                 registry_address: str | None = None, governance_address: str | None = None,
                 telemetry_address: str | None = None, api_key: str | None = None,
                 instance_id: str | None = None, legacy_agent_id: str | None = None,
                 timeout_s: float | None = None, tls: TlsSettings | None = None) -> Settings:
        e = os.environ if env is None else env
        base = address or e.get("ARM_ADDRESS") or DEFAULT_ADDRESS
        raw_timeout = timeout_s if timeout_s is not None else e.get("ARM_TIMEOUT_S", "10")
        try:
            timeout = float(raw_timeout)
        except ValueError:
            raise ValueError(f"ARM_TIMEOUT_S must be a number of seconds, got {raw_timeout!r}") from None
        if timeout <= 0:
            raise ValueError(f"ARM_TIMEOUT_S must be positive, got {timeout}")
        return cls(
            registry_address=registry_address or e.get("ARM_REGISTRY_ADDRESS") or base,
            governance_address=governance_address or e.get("ARM_GOVERNANCE_ADDRESS") or base,
            telemetry_address=telemetry_address or e.get("ARM_TELEMETRY_ADDRESS") or base,
            api_key=api_key if api_key is not None else (e.get("ARM_API_KEY") or None),
            instance_id=instance_id if instance_id is not None else e.get("ARM_INSTANCE_ID", ""),
            legacy_agent_id=legacy_agent_id if legacy_agent_id is not None else e.get("ARM_LEGACY_AGENT_ID", ""),
            timeout_s=timeout,
            tls=tls if tls is not None else _client_tls(e))

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.service_config", service_config()), ("grpc.enable_retries", 1),
                ("grpc.keepalive_time_ms", 30_000), *self.extra_channel_options]


def _client_tls(env: Mapping[str, str]) -> TlsSettings | None:
    if not env.get("ARM_TLS_CA_FILE"):
        return None  # plaintext (the dev server on loopback)
    return TlsSettings(ca_file=env["ARM_TLS_CA_FILE"], cert_file=env.get("ARM_TLS_CERT_FILE") or None,
                       key_file=env.get("ARM_TLS_KEY_FILE") or None,
                       server_name=env.get("ARM_TLS_SERVER_NAME") or None)


def new_request_id() -> str:
    return f"req-{secrets.token_hex(8)}"


class _Metadata:
    """Adds the key and an `x-request-id` (kept when the caller set one) to every call."""

    def __init__(self, api_key: str | None) -> None:
        self._auth = ("authorization", f"Bearer {api_key}") if api_key else None

    def _details(self, details: Any) -> Any:
        metadata = list(details.metadata or ())
        if self._auth is not None:
            metadata.append(self._auth)
        if not any(k == "x-request-id" for k, _ in metadata):
            metadata.append(("x-request-id", new_request_id()))
        return details._replace(metadata=metadata)


# grpc.aio files an interceptor under the first call kind it implements only, so each kind
# gets its own class.
class _UnaryUnary(_Metadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_Metadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnary(_Metadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


class _StreamStream(_Metadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def metadata_interceptors(api_key: str | None) -> list[Any]:
    """Client interceptors that send the key (when given) and a request id on every kind of call."""
    return [cls(api_key) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def trace_interceptors(tracer_provider: Any = None) -> list[Any]:
    """OpenTelemetry client interceptors (a span per call, the W3C trace context sent along) when
    the application traces: a provider is given, or a real one is set globally. None otherwise
    (nothing to propagate, no cost), nor when the process already instruments every channel."""
    try:
        from opentelemetry import trace
        from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, aio_client_interceptors
    except ImportError:  # the application does not use OpenTelemetry
        return []
    if GrpcAioInstrumentorClient().is_instrumented_by_opentelemetry:
        return []  # every channel already carries them (ARM's own services)
    if tracer_provider is None:
        tracer_provider = trace.get_tracer_provider()
        if isinstance(tracer_provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return []
    return list(aio_client_interceptors(tracer_provider=tracer_provider))


def open_channel(address: str, settings: Settings) -> grpc.aio.Channel:
    """A channel to `address` (plaintext, or TLS/mTLS per `settings.tls`) with the SDK's service
    config (round_robin, retries), the key and request id on every call, and the caller's trace
    context when the application uses OpenTelemetry."""
    interceptors = [*trace_interceptors(settings.tracer_provider), *metadata_interceptors(settings.api_key)]
    return open_tls_channel(target(address), settings.tls, options=settings.channel_options(),
                            interceptors=interceptors)
