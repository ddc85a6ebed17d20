"""Typed stubs for every ARM service over one channel per distinct address."""

from __future__ import annotations

from typing import Any

import grpc

from arm.governance.v1 import (
    approvals_pb2_grpc,
    audit_pb2_grpc,
    decision_pb2_grpc,
    deployments_pb2_grpc,
    policy_pb2_grpc,
    webhooks_pb2_grpc,
)
from arm.registry.v1 import access_pb2_grpc, agents_pb2_grpc, compat_pb2_grpc, tenancy_pb2_grpc
from arm.telemetry.v1 import telemetry_pb2_grpc
from arm_client.connection import Settings, metadata_interceptors, open_channel
from arm_common.tls import TlsSettings


class ArmClient:
    """Raw typed stubs: `ArmClient("127.0.0.1:50051", key)`; registry: `.tenancy`, `.access`,
    `.agents`, `.compat`; governance: `.policies`, `.decisions`, `.approvals`, `.deployments`,
    `.audit`, `.webhooks`; telemetry: `.telemetry`. Calls raise `grpc.aio.AioRpcError` (the runtime SDK, `Arm`,
    maps them to typed errors). Without a key, calls go out unauthenticated (health checks, tests).
    With `settings`, each service gets its own address (one channel per distinct address)."""

    def __init__(self, address: str | None = None, api_key: str | None = None, *,
                 settings: Settings | None = None, tls_ca_file: str | None = None,
                 tls_cert_file: str | None = None, tls_key_file: str | None = None) -> None:
        """`tls_ca_file` set: TLS, verifying the server against that CA bundle; `tls_cert_file`
        and `tls_key_file` add a client certificate (servers that require mTLS)."""
        if settings is None:
            tls = TlsSettings(ca_file=tls_ca_file, cert_file=tls_cert_file,
                              key_file=tls_key_file) if tls_ca_file else None
            settings = Settings.from_env({}, address=address, api_key=api_key or "", tls=tls)
        self.settings = settings
        channels: dict[str, grpc.aio.Channel] = {}

        def channel(addr: str) -> grpc.aio.Channel:
            if addr not in channels:
                channels[addr] = open_channel(addr, settings)
            return channels[addr]

        self._channels = channels
        registry = channel(settings.registry_address)
        governance = channel(settings.governance_address)
        telemetry = channel(settings.telemetry_address)
        self.channel = registry
        self.governance_channel = governance
        self.tenancy = tenancy_pb2_grpc.TenancyServiceStub(registry)
        self.access = access_pb2_grpc.AccessServiceStub(registry)
        self.agents = agents_pb2_grpc.AgentServiceStub(registry)
        self.compat = compat_pb2_grpc.CompatServiceStub(registry)
        self.policies = policy_pb2_grpc.PolicyServiceStub(governance)
        self.decisions = decision_pb2_grpc.DecisionServiceStub(governance)
        self.approvals = approvals_pb2_grpc.ApprovalServiceStub(governance)
        self.deployments = deployments_pb2_grpc.DeploymentServiceStub(governance)
        self.audit = audit_pb2_grpc.AuditServiceStub(governance)
        self.webhooks = webhooks_pb2_grpc.WebhookServiceStub(governance)
        self.telemetry = telemetry_pb2_grpc.TelemetryServiceStub(telemetry)

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()

    async def __aenter__(self) -> ArmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def auth_interceptors(api_key: str) -> list[Any]:
    """Client interceptors that send the key (and a request id) on every kind of call."""
    return metadata_interceptors(api_key)
