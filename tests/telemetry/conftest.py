"""Telemetry servers for tests: real gRPC on port 0, real databases (the `backend` fixture)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf import struct_pb2

from arm.telemetry.v1 import events_pb2
from arm_client import ArmClient
from arm_common.config import ServiceConfig
from arm_common.db import Database
from arm_common.server import Host
from arm_telemetry import app as telemetry_app
from tests.conftest import DatabaseSpec, GovernanceServer, RegistryServer, drop_schema, new_database_spec


@dataclass
class TelemetryServer:
    backend: str
    address: str
    component: telemetry_app.TelemetryComponent
    host: Host
    db: Database
    spec: DatabaseSpec

    def client(self, key: str | None) -> ArmClient:
        return ArmClient(self.address, key)


async def start_telemetry(spec: DatabaseSpec, registry: RegistryServer, governance: GovernanceServer | None = None,
                          extra_env: dict[str, str] | None = None, *, migrate: bool = True) -> TelemetryServer:
    env = {"ARM_TELEMETRY_LISTEN": "127.0.0.1:0", "ARM_REGISTRY_ADDRESS": registry.address,
           "ARM_SERVICE_API_KEY": registry.admin_key, "ARM_OUTBOX_POLL_S": "0.05",
           **({"ARM_GOVERNANCE_ADDRESS": governance.address} if governance else {}),
           **spec.env("telemetry"), **(extra_env or {})}
    config = ServiceConfig.from_env("telemetry", env)
    db = telemetry_app.database(config)
    if migrate:
        await telemetry_app.migrate(db)
    component = telemetry_app.TelemetryComponent(db, config, telemetry_app.TelemetrySettings.from_env(env))
    assert component.authenticator is not None
    host = Host([component], component.authenticator, config.listen, tls_settings=config.tls)
    port = await host.start()
    return TelemetryServer(spec.backend, f"127.0.0.1:{port}", component, host, db, spec)


async def stop_telemetry(server: TelemetryServer, *, drop: bool = True) -> None:
    await server.host.stop(0)
    await server.db.dispose()
    if drop and server.spec.schema:
        await drop_schema(server.spec.schema)


@pytest.fixture(scope="session")
async def telemetry(registry: RegistryServer, governance: GovernanceServer,
                    tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TelemetryServer]:
    """One telemetry per backend for the run, feeding spend to `governance`."""
    spec = new_database_spec(registry.backend, tmp_path_factory.mktemp(f"telemetry-{registry.backend}"), "telemetry")
    server = await start_telemetry(spec, registry, governance)
    yield server
    await stop_telemetry(server)


def event(type_: int = events_pb2.OP_EVENT_TYPE_RUN_STEP, *, when: datetime | None = None,
          payload: dict[str, Any] | None = None, **fields: str) -> events_pb2.OpEvent:
    """A valid event with a fresh id (override with event_id=...)."""
    fields.setdefault("event_id", f"e-{secrets.token_hex(8)}")
    ev = events_pb2.OpEvent(type=type_, **fields)
    ev.occur_time.FromDatetime(when or datetime.now(UTC))
    if payload is not None:
        s = struct_pb2.Struct()
        s.update(payload)
        ev.payload.CopyFrom(s)
    return ev


def ago(**delta: float) -> datetime:
    return datetime.now(UTC) - timedelta(**delta)

