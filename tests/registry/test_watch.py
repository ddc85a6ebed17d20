"""WatchAgentChanges: the feed governance uses to drop cached agent resolutions on change."""

from __future__ import annotations

import asyncio

import pytest

from arm.registry.v1 import agents_pb2, compat_pb2, tenancy_pb2
from tests.conftest import start_registry, stop_registry
from tests.helpers import approved_version

KIND = compat_pb2.AgentChangeKind


async def next_change(stream, want_kind: int, timeout: float = 10) -> compat_pb2.AgentChange:  # type: ignore[no-untyped-def]
    """The next change of the given kind (other notices, e.g. other tests' changes, are skipped)."""
    async def read() -> compat_pb2.AgentChange:
        async for msg in stream:
            if msg.change.kind == want_kind:
                return msg.change
        raise AssertionError("stream ended")
    return await asyncio.wait_for(read(), timeout)


async def test_instance_version_and_tenant_changes_are_streamed(registry, system_admin, tenant) -> None:  # type: ignore[no-untyped-def]
    stream = tenant.admin.compat.WatchAgentChanges(compat_pb2.WatchAgentChangesRequest())
    first = await asyncio.wait_for(stream.read(), 10)
    assert first.change.kind == KIND.AGENT_CHANGE_KIND_RESET
    agents = await approved_version(tenant.admin)
    inst = (await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="w",
        legacy_agent_id="legacy-watch"))).agent_instance
    created = await next_change(stream, KIND.AGENT_CHANGE_KIND_INSTANCE)
    assert (created.tenant_id, created.instance_id, created.legacy_agent_id) == (
        tenant.tenant.id, inst.id, "legacy-watch")
    await tenant.admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
        id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))
    moved = await next_change(stream, KIND.AGENT_CHANGE_KIND_INSTANCE)
    assert moved.instance_id == inst.id and moved.version_id == agents.version.id
    await tenant.admin.agents.TransitionAgentVersion(agents_pb2.TransitionAgentVersionRequest(
        id=agents.version.id, to_state=agents_pb2.VERSION_STATE_DEPRECATED))
    assert (await next_change(stream, KIND.AGENT_CHANGE_KIND_VERSION)).version_id == agents.version.id
    await system_admin.tenancy.UpdateTenant(tenancy_pb2.UpdateTenantRequest(id=tenant.tenant.id, active=False))
    assert (await next_change(stream, KIND.AGENT_CHANGE_KIND_TENANT)).tenant_id == tenant.tenant.id
    stream.cancel()


async def test_a_tenant_sees_only_its_own_changes_and_services_see_all(registry, system_admin, tenant) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import make_tenant
    other = await make_tenant(registry, system_admin)
    mine = tenant.admin.compat.WatchAgentChanges(compat_pb2.WatchAgentChangesRequest())
    everything = system_admin.compat.WatchAgentChanges(compat_pb2.WatchAgentChangesRequest())
    assert (await mine.read()).change.kind == KIND.AGENT_CHANGE_KIND_RESET
    assert (await everything.read()).change.kind == KIND.AGENT_CHANGE_KIND_RESET
    theirs = await approved_version(other.admin)
    await other.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=theirs.version.id, environment_id=theirs.environment.id, name="theirs"))
    ours = await approved_version(tenant.admin)
    await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=ours.version.id, environment_id=ours.environment.id, name="ours"))
    seen_by_service = {(await next_change(everything, KIND.AGENT_CHANGE_KIND_INSTANCE)).tenant_id,
                       (await next_change(everything, KIND.AGENT_CHANGE_KIND_INSTANCE)).tenant_id}
    assert {tenant.tenant.id, other.tenant.id} <= seen_by_service
    # The tenant's own stream skips the other tenant's change and shows its own.
    assert (await next_change(mine, KIND.AGENT_CHANGE_KIND_INSTANCE)).tenant_id == tenant.tenant.id
    mine.cancel()
    everything.cancel()
    await other.admin.close()


async def test_changes_made_through_another_replica_arrive(registry, system_admin, tenant) -> None:  # type: ignore[no-untyped-def]
    if registry.backend != "postgres":
        pytest.skip("replicas share a database on PostgreSQL; SQLite is one process")
    replica = await start_registry(registry.spec)
    try:
        stream = tenant.admin.compat.WatchAgentChanges(compat_pb2.WatchAgentChangesRequest())
        assert (await stream.read()).change.kind == KIND.AGENT_CHANGE_KIND_RESET
        via_replica = replica.client(tenant.admin_key)
        agents = await approved_version(via_replica)
        inst = (await via_replica.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
            version_id=agents.version.id, environment_id=agents.environment.id, name="r"))).agent_instance
        assert (await next_change(stream, KIND.AGENT_CHANGE_KIND_INSTANCE)).instance_id == inst.id
        stream.cancel()
        await via_replica.close()
    finally:
        await stop_registry(replica, drop=False)
