"""A revoked key, a deactivated operator or tenant, an expired key: refused by every service, and
not after the auth cache's TTL but as soon as the registry's change feed (or, for expiry, the
clock) says so. The servers here cache principals for 60 s, so only the feed or the per-call expiry
check can make the refusals below happen within the bounded waits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory

from arm.governance.v1 import policy_pb2
from arm.registry.v1 import access_pb2, agents_pb2, compat_pb2, tenancy_pb2
from arm.telemetry.v1 import telemetry_pb2
from arm_client import ArmClient
from arm_governance import app as governance_app
from arm_telemetry import app as telemetry_app
from tests.conftest import (
    GovernanceServer,
    RegistryServer,
    TenantContext,
    make_tenant,
    new_database_spec,
    start_governance,
    start_registry,
    stop_governance,
    stop_registry,
)
from tests.helpers import approved_version, expect_failure, failure, operator_key, refused_within
from tests.telemetry.conftest import TelemetryServer, start_telemetry, stop_telemetry

LONG_TTL = {"ARM_AUTH_CACHE_TTL_S": "60"}
FEED_BOUND_S = 15.0  # well under the TTL: a refusal within it came from the feed
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
REGISTRY_SERVICES = ["arm.registry.v1.TenancyService", "arm.registry.v1.AccessService",
                     "arm.registry.v1.AgentService", "arm.registry.v1.CompatService"]


@dataclass
class Stack:
    registry: RegistryServer
    governance: GovernanceServer
    telemetry: TelemetryServer
    system_admin: ArmClient
    clients: list[ArmClient]

    def probes(self, key: str) -> dict[str, Callable[[], Awaitable[Any]]]:
        """One authenticated read per service with `key`."""
        reg, gov, tel = (ArmClient(s.address, key) for s in (self.registry, self.governance, self.telemetry))
        self.clients += [reg, gov, tel]
        return {
            "registry": lambda: reg.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest()),
            "governance": lambda: gov.policies.ListPolicyEnvelopes(policy_pb2.ListPolicyEnvelopesRequest()),
            "telemetry": lambda: tel.telemetry.GetMigrationHealth(telemetry_pb2.GetMigrationHealthRequest()),
        }


@pytest.fixture(scope="module")
async def stack(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    folder = tmp_path_factory.mktemp(f"authprop-{backend}")
    registry = await start_registry(new_database_spec(backend, folder, "registry"), LONG_TTL)
    governance = await start_governance(new_database_spec(backend, folder, "governance"), registry, LONG_TTL)
    telemetry = await start_telemetry(new_database_spec(backend, folder, "telemetry"), registry, governance,
                                      LONG_TTL)
    for remote in (governance.component.authenticator, telemetry.component.authenticator):
        assert remote is not None and await remote.wait_live(), "the auth change feed never connected"
    admin = registry.client(registry.admin_key)
    built = Stack(registry, governance, telemetry, admin, [])
    yield built
    for client in [admin, *built.clients]:
        await client.close()
    await stop_telemetry(telemetry)
    await stop_governance(governance)
    await stop_registry(registry)


@pytest.fixture
async def tenant_ctx(stack: Stack) -> AsyncIterator[TenantContext]:
    ctx = await make_tenant(stack.registry, stack.system_admin)
    yield ctx
    await ctx.admin.close()


async def warm(probes: dict[str, Callable[[], Awaitable[Any]]]) -> None:
    """Every service accepts the key (and caches its principal)."""
    for call in probes.values():
        await call()


async def test_a_revoked_key_is_refused_everywhere_through_the_feed(stack: Stack, tenant_ctx: TenantContext) -> None:
    _, key = await operator_key(tenant_ctx.admin, "admin")
    probes = stack.probes(key)
    await warm(probes)
    keys = await tenant_ctx.admin.access.ListApiKeys(access_pb2.ListApiKeysRequest())
    key_id = next(k.id for k in keys.api_keys if key.startswith(f"arm_{k.id}_"))
    await tenant_ctx.admin.access.RevokeApiKey(access_pb2.RevokeApiKeyRequest(id=key_id))
    await expect_failure(probes["registry"](), UNAUTH, "API_KEY_REVOKED")  # at once where it was made
    for call in probes.values():
        await refused_within(call, UNAUTH, "API_KEY_REVOKED", FEED_BOUND_S)


async def test_a_deactivated_operator_is_refused_everywhere_and_back_on_reactivation(
        stack: Stack, tenant_ctx: TenantContext) -> None:
    op_id, key = await operator_key(tenant_ctx.admin, "admin")
    probes = stack.probes(key)
    await warm(probes)
    await tenant_ctx.admin.access.UpdateOperator(access_pb2.UpdateOperatorRequest(id=op_id, active=False))
    await expect_failure(probes["registry"](), UNAUTH, "OPERATOR_INACTIVE")
    for call in probes.values():
        await refused_within(call, UNAUTH, "OPERATOR_INACTIVE", FEED_BOUND_S)
    await tenant_ctx.admin.access.UpdateOperator(access_pb2.UpdateOperatorRequest(id=op_id, active=True))
    for call in probes.values():  # the cached refusals were dropped by the feed too
        await accepted_within(call, FEED_BOUND_S)


async def test_a_lost_role_reaches_other_services_through_the_feed(stack: Stack, tenant_ctx: TenantContext) -> None:
    op_id, key = await operator_key(tenant_ctx.admin, "auditor")
    probes = stack.probes(key)
    await warm(probes)
    assignments = await tenant_ctx.admin.access.ListRoleAssignments(
        access_pb2.ListRoleAssignmentsRequest(operator_id=op_id))
    for ra in assignments.role_assignments:
        await tenant_ctx.admin.access.DeleteRoleAssignment(access_pb2.DeleteRoleAssignmentRequest(id=ra.id))
    await refused_within(probes["governance"], grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION",
                         FEED_BOUND_S)


async def test_an_expired_key_is_refused_at_its_expiry_on_every_service(stack: Stack, tenant_ctx: TenantContext) -> None:
    op = (await tenant_ctx.admin.access.CreateOperator(access_pb2.CreateOperatorRequest(
        email="expiring@example.com", name="Expiring"))).operator
    roles = {r.name: r.id for r in (await tenant_ctx.admin.access.ListRoles(access_pb2.ListRolesRequest())).roles}
    await tenant_ctx.admin.access.CreateRoleAssignment(access_pb2.CreateRoleAssignmentRequest(
        operator_id=op.id, role_id=roles["admin"]))
    request = access_pb2.CreateApiKeyRequest(operator_id=op.id)
    expiry = datetime.now(UTC) + timedelta(seconds=3)
    request.expire_time.FromDatetime(expiry)
    key = (await tenant_ctx.admin.access.CreateApiKey(request)).secret
    probes = stack.probes(key)
    await warm(probes)
    # Wait out the expiry (by the same clock the servers read), then the very first call on each
    # service is refused: the cached principals (TTL 60 s) carry the key's expiry.
    while datetime.now(UTC) <= expiry:
        await asyncio.sleep(0.05)
    for name, call in probes.items():
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call()
        got = failure(refused.value)
        assert (got.code, got.reason) == (UNAUTH, "API_KEY_EXPIRED"), name


def _every_rpc(services: list[str]) -> list[tuple[str, Any]]:
    """(full method path, method descriptor) of every RPC of the named services."""
    pool = descriptor_pool.Default()
    return [(f"/{name}/{m.name}", m) for name in services
            for m in pool.FindServiceByName(name).methods]


async def _call_empty(channel: grpc.aio.Channel, path: str, method: Any, key: str) -> None:
    """Calls `path` with an empty request (authentication comes before validation)."""
    request_type = message_factory.GetMessageClass(method.input_type)
    response_type = message_factory.GetMessageClass(method.output_type)
    metadata = (("authorization", f"Bearer {key}"),)
    kwargs = {"request_serializer": request_type.SerializeToString,
              "response_deserializer": response_type.FromString}

    async def one() -> AsyncIterator[Any]:
        yield request_type()

    if not method.client_streaming and not method.server_streaming:
        await channel.unary_unary(path, **kwargs)(request_type(), metadata=metadata, timeout=10)
    elif not method.client_streaming:
        async for _ in channel.unary_stream(path, **kwargs)(request_type(), metadata=metadata, timeout=10):
            break
    elif not method.server_streaming:
        await channel.stream_unary(path, **kwargs)(one(), metadata=metadata, timeout=10)
    else:
        async for _ in channel.stream_stream(path, **kwargs)(one(), metadata=metadata, timeout=10):
            break


async def accepted_within(make_call: Callable[[], Awaitable[Any]], timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            await make_call()
            return
        except grpc.aio.AioRpcError as exc:
            if loop.time() > deadline:
                raise AssertionError(f"still refused after {timeout_s} s: {failure(exc)}") from None
        await asyncio.sleep(0.02)


async def test_an_inactive_tenants_keys_are_refused_on_every_rpc(stack: Stack, tenant_ctx: TenantContext) -> None:
    _, key = await operator_key(tenant_ctx.admin, "admin")
    probes = stack.probes(key)
    admin_probes = stack.probes(tenant_ctx.admin_key)
    await warm(probes)
    await warm(admin_probes)
    tenant_id = tenant_ctx.tenant.id
    await stack.system_admin.tenancy.UpdateTenant(tenancy_pb2.UpdateTenantRequest(id=tenant_id, active=False))
    try:
        await expect_failure(probes["registry"](), UNAUTH, "TENANT_INACTIVE")
        for call in [*probes.values(), *admin_probes.values()]:
            await refused_within(call, UNAUTH, "TENANT_INACTIVE", FEED_BOUND_S)
        servers = [(stack.registry.address, REGISTRY_SERVICES),
                   (stack.governance.address, governance_app.SERVICES),
                   (stack.telemetry.address, telemetry_app.SERVICES)]
        count = 0
        for address, services in servers:
            async with grpc.aio.insecure_channel(address) as channel:
                for path, method in _every_rpc(services):
                    try:
                        await _call_empty(channel, path, method, key)
                    except grpc.aio.AioRpcError as exc:
                        got = failure(exc)
                        assert (got.code, got.reason) == (UNAUTH, "TENANT_INACTIVE"), (path, got)
                    else:
                        raise AssertionError(f"{path} accepted an inactive tenant's key")
                    count += 1
        assert count >= 40
        # The system tenant's admin still works, and reactivates the tenant.
        got = await stack.system_admin.tenancy.GetTenant(tenancy_pb2.GetTenantRequest(id=tenant_id))
        assert not got.tenant.active
    finally:
        await stack.system_admin.tenancy.UpdateTenant(tenancy_pb2.UpdateTenantRequest(id=tenant_id, active=True))
    for call in probes.values():
        await accepted_within(call, FEED_BOUND_S)


async def test_the_system_tenant_cannot_be_deactivated(stack: Stack) -> None:
    await expect_failure(stack.system_admin.tenancy.UpdateTenant(tenancy_pb2.UpdateTenantRequest(
        id=stack.registry.system_tenant_id, active=False)), grpc.StatusCode.FAILED_PRECONDITION)


async def test_a_revocation_reaches_another_registry_process(stack: Stack, tenant_ctx: TenantContext) -> None:
    if stack.registry.backend != "postgres":
        pytest.skip("registry processes share a database on PostgreSQL; SQLite is one process")
    replica = await start_registry(stack.registry.spec, LONG_TTL)
    try:
        _, key = await operator_key(tenant_ctx.admin, "admin")
        via_replica = replica.client(key)
        await via_replica.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest())  # cached there
        keys = await tenant_ctx.admin.access.ListApiKeys(access_pb2.ListApiKeysRequest())
        key_id = next(k.id for k in keys.api_keys if key.startswith(f"arm_{k.id}_"))
        await tenant_ctx.admin.access.RevokeApiKey(access_pb2.RevokeApiKeyRequest(id=key_id))
        await refused_within(lambda: via_replica.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest()),
                             UNAUTH, "API_KEY_REVOKED", FEED_BOUND_S)
        await via_replica.close()
    finally:
        await stop_registry(replica, drop=False)


async def test_a_tenant_watcher_does_not_hear_key_and_operator_changes(stack: Stack, tenant_ctx: TenantContext) -> None:
    """Key ids and operator changes are for the services' auth caches (tenants:admin) only: a
    tenant's own watcher gets the next agent change without them in between."""
    agents = await approved_version(tenant_ctx.admin)
    op_id, key = await operator_key(tenant_ctx.admin, "auditor")
    stream = tenant_ctx.admin.compat.WatchAgentChanges(compat_pb2.WatchAgentChangesRequest())
    assert (await stream.read()).change.kind == compat_pb2.AGENT_CHANGE_KIND_RESET
    keys = await tenant_ctx.admin.access.ListApiKeys(access_pb2.ListApiKeysRequest(operator_id=op_id))
    await tenant_ctx.admin.access.RevokeApiKey(access_pb2.RevokeApiKeyRequest(id=keys.api_keys[0].id))
    await tenant_ctx.admin.access.UpdateOperator(access_pb2.UpdateOperatorRequest(id=op_id, active=False))
    inst = (await tenant_ctx.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="w"))).agent_instance
    change = (await stream.read()).change
    assert (change.kind, change.instance_id) == (compat_pb2.AGENT_CHANGE_KIND_INSTANCE, inst.id), change
    stream.cancel()
