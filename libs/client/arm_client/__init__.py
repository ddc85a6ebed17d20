"""Python client for ARM: one channel with the API key attached to every call, and typed stubs
for each service. Talks gRPC only."""

from __future__ import annotations

from typing import Any

import grpc

from arm.governance.v1 import (
    approvals_pb2_grpc,
    audit_pb2_grpc,
    decision_pb2_grpc,
    deployments_pb2_grpc,
    policy_pb2_grpc,
)
from arm.registry.v1 import access_pb2_grpc, agents_pb2_grpc, compat_pb2_grpc, tenancy_pb2_grpc
from arm.telemetry.v1 import telemetry_pb2_grpc
from arm_common import tls


class _Auth:
    """Adds `authorization: Bearer <key>` to every call's metadata."""

    def __init__(self, api_key: str) -> None:
        self._pair = ("authorization", f"Bearer {api_key}")

    def _details(self, details: Any) -> Any:
        metadata = list(details.metadata or ())
        metadata.append(self._pair)
        return details._replace(metadata=metadata)


# grpc.aio files an interceptor under the first call kind it implements only, so each kind
# gets its own class.
class _UnaryUnaryAuth(_Auth, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStreamAuth(_Auth, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnaryAuth(_Auth, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


class _StreamStreamAuth(_Auth, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def auth_interceptors(api_key: str) -> list[Any]:
    """Client interceptors that send the key on every kind of call."""
    return [cls(api_key) for cls in (_UnaryUnaryAuth, _UnaryStreamAuth, _StreamUnaryAuth, _StreamStreamAuth)]


class ArmClient:
    """`ArmClient("127.0.0.1:50051", key)`; registry: `.tenancy`, `.access`, `.agents`,
    `.compat`; governance: `.policies`, `.decisions`, `.approvals`, `.deployments`, `.audit`;
    telemetry: `.telemetry`.
    Without a key, calls go out unauthenticated (useful for health checks and tests)."""

    def __init__(self, address: str, api_key: str | None = None, *, tls_ca_file: str | None = None,
                 tls_cert_file: str | None = None, tls_key_file: str | None = None) -> None:
        """`tls_ca_file` set: TLS, verifying the server against that CA bundle; `tls_cert_file`
        and `tls_key_file` add a client certificate (servers that require mTLS)."""
        interceptors = auth_interceptors(api_key) if api_key else []
        self.channel = tls.open_channel(
            address, tls.TlsSettings(ca_file=tls_ca_file, cert_file=tls_cert_file, key_file=tls_key_file),
            interceptors=interceptors)
        self.tenancy = tenancy_pb2_grpc.TenancyServiceStub(self.channel)
        self.access = access_pb2_grpc.AccessServiceStub(self.channel)
        self.agents = agents_pb2_grpc.AgentServiceStub(self.channel)
        self.compat = compat_pb2_grpc.CompatServiceStub(self.channel)
        self.policies = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self.decisions = decision_pb2_grpc.DecisionServiceStub(self.channel)
        self.approvals = approvals_pb2_grpc.ApprovalServiceStub(self.channel)
        self.deployments = deployments_pb2_grpc.DeploymentServiceStub(self.channel)
        self.audit = audit_pb2_grpc.AuditServiceStub(self.channel)
        self.telemetry = telemetry_pb2_grpc.TelemetryServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> ArmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
