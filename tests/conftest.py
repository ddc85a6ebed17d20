"""Test harness: real servers on port 0, real channels, real databases.

Every test that takes `backend` runs on SQLite and on PostgreSQL. PostgreSQL comes from
ARM_TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test); it is skipped when
unreachable, except with CI=true, where an unreachable PostgreSQL fails the run. Each test run
works in its own PostgreSQL schema, dropped at the end."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from arm.registry.v1 import tenancy_pb2
from arm_client import ArmClient
from arm_common.config import ServiceConfig
from arm_common.db import Database
from arm_common.server import Host
from arm_governance import app as governance_app
from arm_registry import app as registry_app

PG_URL = os.environ.get("ARM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"
_pg_reachable: bool | None = None


def pg_reachable() -> bool:
    global _pg_reachable
    if _pg_reachable is None:
        async def probe() -> bool:
            try:
                conn = await asyncpg.connect(PG_URL, timeout=3)
            except (TimeoutError, OSError, asyncpg.PostgresError):
                return False
            await conn.close()
            return True
        _pg_reachable = asyncio.run(probe())
    return _pg_reachable


def pytest_report_header(config: pytest.Config) -> str:
    state = "reachable" if pg_reachable() else ("UNREACHABLE (required: CI=true)" if IN_CI else "unreachable, skipped")
    return f"ARM test backends: sqlite, postgresql at {PG_URL} ({state})"


def require_backend(name: str) -> None:
    if name == "postgres" and not pg_reachable():
        if IN_CI:
            pytest.fail(f"CI=true needs PostgreSQL at {PG_URL} (ARM_TEST_POSTGRES_URL), and it is unreachable")
        pytest.skip(f"PostgreSQL at {PG_URL} is unreachable")


@dataclass
class DatabaseSpec:
    """Where one service's database lives for a test: a URL and, on PostgreSQL, a schema."""

    backend: str
    url: str
    schema: str | None

    def env(self, service: str) -> dict[str, str]:
        env = {f"ARM_{service.upper()}_DATABASE_URL": self.url}
        if self.schema:
            env["ARM_DATABASE_SCHEMA"] = self.schema
        return env


async def drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def new_database_spec(backend: str, folder: Path, service: str) -> DatabaseSpec:
    require_backend(backend)
    if backend == "sqlite":
        return DatabaseSpec(backend, f"sqlite+aiosqlite:///{folder / (service + '.db')}", None)
    return DatabaseSpec(backend, PG_URL, f"arm_test_{service}_{secrets.token_hex(4)}")


@dataclass
class RegistryServer:
    """A running registry on 127.0.0.1:<port> with its system admin key."""

    backend: str
    address: str
    admin_key: str
    system_tenant_id: str
    component: registry_app.RegistryComponent
    host: Host
    db: Database
    spec: DatabaseSpec

    def client(self, key: str | None) -> ArmClient:
        return ArmClient(self.address, key)


async def start_registry(spec: DatabaseSpec, extra_env: dict[str, str] | None = None) -> RegistryServer:
    env = {"ARM_REGISTRY_LISTEN": "127.0.0.1:0", **spec.env("registry"), **(extra_env or {})}
    config = ServiceConfig.from_env("registry", env)
    db = registry_app.database(config)
    await registry_app.migrate(db)
    component = registry_app.RegistryComponent(db, config)
    boot = await registry_app.bootstrap(component.store, new_key_if_exists=True)
    assert boot.api_key
    host = Host([component], component.authenticator, config.listen, tls_settings=config.tls)
    port = await host.start()
    return RegistryServer(spec.backend, f"127.0.0.1:{port}", boot.api_key, boot.tenant_id,
                          component, host, db, spec)


async def stop_registry(server: RegistryServer, *, drop: bool = True) -> None:
    await server.host.stop(0)
    await server.db.dispose()
    if drop and server.spec.schema:
        await drop_schema(server.spec.schema)


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    require_backend(request.param)
    return request.param


@pytest.fixture(scope="session")
async def registry(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RegistryServer]:
    """One registry per backend for the whole run; tests isolate themselves with fresh tenants."""
    spec = new_database_spec(backend, tmp_path_factory.mktemp(f"registry-{backend}"), "registry")
    server = await start_registry(spec)
    yield server
    await stop_registry(server)


@pytest.fixture(scope="session")
async def system_admin(registry: RegistryServer) -> AsyncIterator[ArmClient]:
    client = registry.client(registry.admin_key)
    yield client
    await client.close()


@dataclass
class TenantContext:
    """A fresh tenant with its first admin's key and client."""

    tenant: tenancy_pb2.Tenant
    admin_operator_id: str
    admin_key: str
    admin: ArmClient
    server: RegistryServer


@pytest.fixture
async def tenant(registry: RegistryServer, system_admin: ArmClient) -> AsyncIterator[TenantContext]:
    ctx = await make_tenant(registry, system_admin)
    yield ctx
    await ctx.admin.close()


async def make_tenant(registry: RegistryServer, system_admin: ArmClient) -> TenantContext:
    slug = f"t-{secrets.token_hex(5)}"
    resp = await system_admin.tenancy.CreateTenant(tenancy_pb2.CreateTenantRequest(
        slug=slug, name=f"Tenant {slug}", admin_email=f"admin@{slug}.example",
        admin_name="Tenant Admin"))
    return TenantContext(resp.tenant, resp.admin_operator_id, resp.admin_api_key,
                         registry.client(resp.admin_api_key), registry)


@dataclass
class GovernanceServer:
    """A running governance on 127.0.0.1:<port>, resolving agents through `registry`."""

    backend: str
    address: str
    component: governance_app.GovernanceComponent
    host: Host
    db: Database
    spec: DatabaseSpec

    def client(self, key: str | None) -> ArmClient:
        return ArmClient(self.address, key)


async def start_governance(spec: DatabaseSpec, registry: RegistryServer,
                           extra_env: dict[str, str] | None = None) -> GovernanceServer:
    env = {"ARM_GOVERNANCE_LISTEN": "127.0.0.1:0", "ARM_REGISTRY_ADDRESS": registry.address,
           "ARM_SERVICE_API_KEY": registry.admin_key, "ARM_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
           **spec.env("governance"), **(extra_env or {})}
    config = ServiceConfig.from_env("governance", env)
    db = governance_app.database(config)
    await governance_app.migrate(db)
    component = governance_app.GovernanceComponent(db, config)
    assert component.authenticator is not None
    host = Host([component], component.authenticator, config.listen, tls_settings=config.tls)
    port = await host.start()
    assert component.agents is not None
    assert await component.agents.wait_live(), "governance never connected to the agent change feed"
    return GovernanceServer(spec.backend, f"127.0.0.1:{port}", component, host, db, spec)


async def stop_governance(server: GovernanceServer, *, drop: bool = True) -> None:
    await server.host.stop(0)
    await server.db.dispose()
    if drop and server.spec.schema:
        await drop_schema(server.spec.schema)


@pytest.fixture(scope="session")
async def governance(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GovernanceServer]:
    """One governance per backend for the run, on its own database, talking to `registry` over gRPC."""
    spec = new_database_spec(registry.backend, tmp_path_factory.mktemp(f"governance-{registry.backend}"), "governance")
    server = await start_governance(spec, registry)
    # The shared registry's change records go to this governance's audit trail.
    await registry.component.deliver_change_records_to(server.address, registry.admin_key)
    yield server
    await stop_governance(server)
