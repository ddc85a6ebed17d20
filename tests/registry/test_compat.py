"""The compatibility layer for the older platform over gRPC: EnsureInstanceForLegacyAgent under
concurrency, legacy status mapping both ways, ResolveAgentRef / GetAgentByLegacyId, the
ARM_COMPAT_MODE preference when an instance id and a legacy id collide, and agent identities."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from arm.common.v1 import common_pb2
from arm.registry.v1 import agents_pb2, compat_pb2, tenancy_pb2
from arm_client import ArmClient
from tests.conftest import (
    RegistryServer,
    TenantContext,
    make_tenant,
    new_database_spec,
    start_registry,
    stop_registry,
)
from tests.helpers import AgentSet, approved_version, expect_failure

CR = common_pb2.ChangeRecordType


async def change_records(registry: RegistryServer, tenant_id: str) -> list[common_pb2.ChangeRecord]:
    """The tenant's change records as the registry wrote them to its outbox, in order."""
    async with registry.db.transaction() as s:
        rows = (await s.execute(text(
            "select payload from outbox_messages where tenant_id = :t and topic = 'change_record' "
            "order by position"), {"t": tenant_id})).all()
    return [common_pb2.ChangeRecord.FromString(bytes(r.payload)) for r in rows]


async def count_rows(registry: RegistryServer, table: str, tenant_id: str, where: str = "",
                     **params: str) -> int:
    assert table in ("agent_templates", "agent_versions", "agent_instances", "projects", "environments")
    async with registry.db.transaction() as s:
        return (await s.execute(text(
            f"select count(*) from {table} where tenant_id = :t {where}"),
            {"t": tenant_id, **params})).scalar_one()


def legacy_id() -> str:
    return f"mc-agent-{secrets.token_hex(5)}"


async def ensure(client: ArmClient, legacy: str, **fields: str) -> compat_pb2.EnsureInstanceForLegacyAgentResponse:
    return await client.compat.EnsureInstanceForLegacyAgent(
        compat_pb2.EnsureInstanceForLegacyAgentRequest(legacy_agent_id=legacy, **fields))


async def transition(client: ArmClient, instance_id: str, state: str) -> agents_pb2.AgentInstance:
    return (await client.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
        id=instance_id, to_state=agents_pb2.InstanceState.Value(f"INSTANCE_STATE_{state}"),
        reason="test"))).agent_instance


async def linked_instance(ctx: TenantContext, legacy: str, agents: AgentSet | None = None,
                          name: str = "linked") -> tuple[AgentSet, agents_pb2.AgentInstance]:
    """An instance linked to a legacy id through CreateAgentInstance (not the compat layer)."""
    agents = agents or await approved_version(ctx.admin)
    inst = (await ctx.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name=name,
        legacy_agent_id=legacy))).agent_instance
    assert inst.legacy_agent_id == legacy
    return agents, inst


async def gather_all(calls: list[Any]) -> list[Any]:
    """Awaits every call (none is left running past the test) and fails on the first error."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return results


async def ensure_once_elsewhere(registry: RegistryServer, system_admin: ArmClient) -> None:
    """One EnsureInstanceForLegacyAgent in a throwaway tenant. When even that fails, a burst of
    concurrent failing calls would only add their retries (and, on SQLite, lock waits) to the run."""
    scratch = await make_tenant(registry, system_admin)
    try:
        assert (await ensure(scratch.admin, legacy_id())).created
    finally:
        await scratch.admin.close()


# --- EnsureInstanceForLegacyAgent ------------------------------------------------------------

async def test_concurrent_ensure_creates_one_set(tenant: TenantContext, registry: RegistryServer,
                                                 system_admin: ArmClient) -> None:
    await ensure_once_elsewhere(registry, system_admin)
    tid = tenant.tenant.id
    legacy = legacy_id()
    clients = [registry.client(tenant.admin_key) for _ in range(20)]
    try:
        responses = await gather_all([ensure(c, legacy, name="Legacy One") for c in clients])
    finally:
        await asyncio.gather(*(c.close() for c in clients))

    assert len({r.agent_instance.id for r in responses}) == 1
    assert len({r.agent_version.id for r in responses}) == 1
    assert len({r.agent_template.id for r in responses}) == 1
    assert sum(r.created for r in responses) == 1
    first = responses[0]
    assert first.agent_instance.legacy_agent_id == legacy

    admin = tenant.admin
    templates = (await admin.agents.ListAgentTemplates(agents_pb2.ListAgentTemplatesRequest())).agent_templates
    versions = (await admin.agents.ListAgentVersions(agents_pb2.ListAgentVersionsRequest())).agent_versions
    instances = (await admin.agents.ListAgentInstances(agents_pb2.ListAgentInstancesRequest())).agent_instances
    assert [t.id for t in templates] == [first.agent_template.id]
    assert [v.id for v in versions] == [first.agent_version.id]
    assert [i.id for i in instances] == [first.agent_instance.id]
    for table in ("agent_templates", "agent_versions", "agent_instances"):
        assert await count_rows(registry, table, tid) == 1, table
    assert await count_rows(registry, "projects", tid, "and slug = 'legacy'") == 1
    assert await count_rows(registry, "environments", tid, "and name = 'legacy'") == 1

    # The losers' transactions rolled back with their change records: one record per entity.
    kinds = Counter(CR.Name(r.type) for r in await change_records(registry, tid))
    for kind in ("PROJECT_CREATED", "ENVIRONMENT_CREATED", "TEMPLATE_CREATED", "VERSION_CREATED",
                 "INSTANCE_CREATED"):
        assert kinds[f"CHANGE_RECORD_TYPE_{kind}"] == 1, kinds

    # A second legacy id gets its own set, in the same legacy project and environment.
    other = await ensure(admin, legacy_id(), name="Legacy Two")
    assert other.created
    assert other.agent_instance.id != first.agent_instance.id
    assert other.agent_version.id != first.agent_version.id
    assert other.agent_template.id != first.agent_template.id
    assert other.agent_instance.environment_id == first.agent_instance.environment_id
    assert other.agent_template.project_id == first.agent_template.project_id
    for table in ("agent_templates", "agent_versions", "agent_instances"):
        assert await count_rows(registry, table, tid) == 2, table
    again = await ensure(admin, legacy)
    assert not again.created
    assert again.agent_instance.id == first.agent_instance.id


async def test_concurrent_ensure_of_distinct_agents_shares_the_legacy_project(
        tenant: TenantContext, registry: RegistryServer, system_admin: ArmClient) -> None:
    await ensure_once_elsewhere(registry, system_admin)
    tid = tenant.tenant.id
    ids = [legacy_id() for _ in range(8)]
    clients = [registry.client(tenant.admin_key) for _ in ids]
    try:
        responses = await gather_all([ensure(c, i) for c, i in zip(clients, ids, strict=True)])
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    assert all(r.created for r in responses)
    assert [r.agent_instance.legacy_agent_id for r in responses] == ids
    assert len({r.agent_instance.id for r in responses}) == 8
    assert len({r.agent_template.project_id for r in responses}) == 1
    assert len({r.agent_instance.environment_id for r in responses}) == 1
    assert await count_rows(registry, "projects", tid) == 1
    envs = (await tenant.admin.tenancy.ListEnvironments(tenancy_pb2.ListEnvironmentsRequest())).environments
    assert [(e.name, e.type) for e in envs] == [("legacy", tenancy_pb2.ENVIRONMENT_TYPE_PROD)]
    assert await count_rows(registry, "agent_instances", tid) == 8


async def test_new_legacy_agent_is_active_and_approved(tenant: TenantContext) -> None:
    legacy = legacy_id()
    resp = await ensure(tenant.admin, legacy, name="Scout")
    assert resp.created
    inst, ver, tpl = resp.agent_instance, resp.agent_version, resp.agent_template
    assert inst.state == agents_pb2.INSTANCE_STATE_ACTIVE
    assert inst.HasField("activate_time")
    assert inst.legacy_agent_id == legacy
    assert ver.state == agents_pb2.VERSION_STATE_APPROVED
    assert ver.number == 1
    assert ver.integrity == agents_pb2.INTEGRITY_VERIFIED
    assert (inst.version_id, inst.template_id, ver.template_id) == (ver.id, tpl.id, tpl.id)
    assert tpl.name == "Scout"
    stored = (await tenant.admin.agents.GetAgentInstance(
        agents_pb2.GetAgentInstanceRequest(id=inst.id))).agent_instance
    assert stored.state == agents_pb2.INSTANCE_STATE_ACTIVE
    stored_version = (await tenant.admin.agents.GetAgentVersion(
        agents_pb2.GetAgentVersionRequest(id=ver.id))).agent_version
    assert stored_version.state == agents_pb2.VERSION_STATE_APPROVED
    assert stored_version.integrity == agents_pb2.INTEGRITY_VERIFIED


@pytest.mark.parametrize(("legacy_status", "state"), [
    ("ACTIVE", "ACTIVE"), ("PAUSED", "PAUSED"), ("DRAINED", "DRAINING"),
    ("QUARANTINED", "QUARANTINED"), ("OFFLINE", "READONLY"), ("SLEEPING", "PROVISIONING"),
    ("RETIRED", "PROVISIONING"), ("DRAINING", "PROVISIONING"),
])
async def test_legacy_status_maps_to_the_new_instance_state(tenant: TenantContext, legacy_status: str,
                                                            state: str) -> None:
    legacy = legacy_id()
    resp = await ensure(tenant.admin, legacy, legacy_status=legacy_status)
    assert resp.created
    expected = agents_pb2.InstanceState.Value(f"INSTANCE_STATE_{state}")
    assert resp.agent_instance.state == expected
    by_legacy = await tenant.admin.compat.GetAgentByLegacyId(
        compat_pb2.GetAgentByLegacyIdRequest(legacy_agent_id=legacy))
    assert by_legacy.agent_instance.state == expected


async def test_legacy_status_applies_only_to_new_instances(tenant: TenantContext) -> None:
    legacy = legacy_id()
    first = await ensure(tenant.admin, legacy, legacy_status="PAUSED")
    again = await ensure(tenant.admin, legacy, legacy_status="OFFLINE")
    assert not again.created
    assert again.agent_instance.id == first.agent_instance.id
    assert again.agent_instance.state == agents_pb2.INSTANCE_STATE_PAUSED


async def test_ensure_finds_an_instance_linked_through_the_agents_api(tenant: TenantContext,
                                                                      registry: RegistryServer) -> None:
    legacy = legacy_id()
    agents, inst = await linked_instance(tenant, legacy)
    before = await change_records(registry, tenant.tenant.id)
    resp = await ensure(tenant.admin, legacy, name="ignored", legacy_status="OFFLINE")
    assert not resp.created
    assert resp.agent_instance.id == inst.id
    assert resp.agent_instance.state == agents_pb2.INSTANCE_STATE_PROVISIONING
    assert resp.agent_version.id == agents.version.id
    assert resp.agent_template.id == agents.template.id
    assert await change_records(registry, tenant.tenant.id) == before


async def test_concurrent_ensure_of_a_linked_agent_creates_nothing(tenant: TenantContext,
                                                                   registry: RegistryServer) -> None:
    legacy = legacy_id()
    _, inst = await linked_instance(tenant, legacy)
    before = await change_records(registry, tenant.tenant.id)
    clients = [registry.client(tenant.admin_key) for _ in range(10)]
    try:
        responses = await gather_all([ensure(c, legacy) for c in clients])
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    assert {r.agent_instance.id for r in responses} == {inst.id}
    assert not any(r.created for r in responses)
    assert await count_rows(registry, "agent_instances", tenant.tenant.id) == 1
    assert await change_records(registry, tenant.tenant.id) == before


# --- ResolveAgentRef and GetAgentByLegacyId ---------------------------------------------------

async def test_resolve_by_every_kind_of_reference(tenant: TenantContext) -> None:
    legacy = legacy_id()
    agents, inst = await linked_instance(tenant, legacy)
    refs = [compat_pb2.ResolveAgentRefRequest(legacy_agent_id=legacy),
            compat_pb2.ResolveAgentRefRequest(instance_id=inst.id),
            compat_pb2.ResolveAgentRefRequest(agent_ref=legacy),
            compat_pb2.ResolveAgentRefRequest(agent_ref=inst.id)]
    resolved = [(await tenant.admin.compat.ResolveAgentRef(r)).agent for r in refs]
    assert all(r == resolved[0] for r in resolved), resolved
    agent = resolved[0]
    assert agent.tenant_id == tenant.tenant.id
    assert agent.tenant_active
    assert agent.instance_id == inst.id
    assert agent.legacy_agent_id == legacy
    assert agent.version_id == agents.version.id
    assert agent.template_id == agents.template.id
    assert agent.project_id == agents.project.id
    assert agent.environment_id == agents.environment.id
    assert agent.environment_name == agents.environment.name
    assert agent.environment_type == tenancy_pb2.ENVIRONMENT_TYPE_DEV
    assert agent.instance_state == agents_pb2.INSTANCE_STATE_PROVISIONING
    assert agent.version_state == agents_pb2.VERSION_STATE_APPROVED
    # The resolution follows the instance's state.
    await transition(tenant.admin, inst.id, "ACTIVE")
    for ref in refs:
        assert (await tenant.admin.compat.ResolveAgentRef(ref)).agent.instance_state == \
            agents_pb2.INSTANCE_STATE_ACTIVE


async def test_get_agent_by_legacy_id(tenant: TenantContext) -> None:
    legacy = legacy_id()
    agents, inst = await linked_instance(tenant, legacy)

    async def view() -> compat_pb2.GetAgentByLegacyIdResponse:
        return await tenant.admin.compat.GetAgentByLegacyId(
            compat_pb2.GetAgentByLegacyIdRequest(legacy_agent_id=legacy))

    got = await view()
    assert got.agent_instance.id == inst.id
    assert got.agent_instance.legacy_agent_id == legacy
    assert got.name == agents.template.name
    assert got.legacy_status == "PROVISIONING"
    for state, legacy_status in [("ACTIVE", "ACTIVE"), ("DRAINING", "DRAINED"), ("ACTIVE", "ACTIVE"),
                                 ("READONLY", "OFFLINE"), ("ACTIVE", "ACTIVE"), ("PAUSED", "PAUSED"),
                                 ("ACTIVE", "ACTIVE"), ("QUARANTINED", "QUARANTINED"),
                                 ("RETIRED", "RETIRED")]:
        await transition(tenant.admin, inst.id, state)
        got = await view()
        assert got.agent_instance.state == agents_pb2.InstanceState.Value(f"INSTANCE_STATE_{state}")
        assert got.legacy_status == legacy_status, state


async def test_unknown_legacy_agent_is_not_found(tenant: TenantContext) -> None:
    missing = legacy_id()
    await linked_instance(tenant, legacy_id())  # a tenant that has legacy agents, just not this one
    await expect_failure(tenant.admin.compat.GetAgentByLegacyId(
        compat_pb2.GetAgentByLegacyIdRequest(legacy_agent_id=missing)),
        grpc.StatusCode.NOT_FOUND, "AGENT_NOT_FOUND")
    for ref in (compat_pb2.ResolveAgentRefRequest(legacy_agent_id=missing),
                compat_pb2.ResolveAgentRefRequest(agent_ref=missing),
                compat_pb2.ResolveAgentRefRequest(instance_id=f"ins_{secrets.token_hex(8)}")):
        await expect_failure(tenant.admin.compat.ResolveAgentRef(ref),
                             grpc.StatusCode.NOT_FOUND, "AGENT_NOT_FOUND")


async def test_legacy_agents_of_another_tenant_are_not_found(tenant: TenantContext, registry: RegistryServer,
                                                             system_admin: ArmClient) -> None:
    legacy = legacy_id()
    _, inst = await linked_instance(tenant, legacy)
    other = await make_tenant(registry, system_admin)
    try:
        await expect_failure(other.admin.compat.GetAgentByLegacyId(
            compat_pb2.GetAgentByLegacyIdRequest(legacy_agent_id=legacy)),
            grpc.StatusCode.NOT_FOUND, "AGENT_NOT_FOUND")
        for ref in (compat_pb2.ResolveAgentRefRequest(instance_id=inst.id),
                    compat_pb2.ResolveAgentRefRequest(legacy_agent_id=legacy),
                    compat_pb2.ResolveAgentRefRequest(agent_ref=legacy)):
            await expect_failure(other.admin.compat.ResolveAgentRef(ref),
                                 grpc.StatusCode.NOT_FOUND, "AGENT_NOT_FOUND")
        # The same legacy id is free in another tenant.
        _, theirs = await linked_instance(other, legacy)
        assert theirs.id != inst.id
        resolved = (await other.admin.compat.ResolveAgentRef(
            compat_pb2.ResolveAgentRefRequest(legacy_agent_id=legacy))).agent
        assert (resolved.instance_id, resolved.tenant_id) == (theirs.id, other.tenant.id)
    finally:
        await other.admin.close()


# --- ARM_COMPAT_MODE ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
async def compat_off(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RegistryServer]:
    """A second registry, on a fresh database, with ARM_COMPAT_MODE=false."""
    folder: Path = tmp_path_factory.mktemp(f"registry-compat-off-{backend}")
    server = await start_registry(new_database_spec(backend, folder, "registry"),
                                  extra_env={"ARM_COMPAT_MODE": "false"})
    yield server
    await stop_registry(server)


async def collision(server: RegistryServer) -> tuple[TenantContext, agents_pb2.AgentInstance,
                                                     agents_pb2.AgentInstance]:
    """A tenant with instance Y and instance X whose legacy id is Y's instance id."""
    system = server.client(server.admin_key)
    try:
        ctx = await make_tenant(server, system)
    finally:
        await system.close()
    agents = await approved_version(ctx.admin)

    async def instance(name: str, legacy: str = "") -> agents_pb2.AgentInstance:
        return (await ctx.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
            version_id=agents.version.id, environment_id=agents.environment.id, name=name,
            legacy_agent_id=legacy))).agent_instance

    y = await instance("y")
    x = await instance("x", legacy=y.id)
    assert x.legacy_agent_id == y.id
    return ctx, x, y


async def refs_resolve_to(ctx: TenantContext, ref: str) -> tuple[str, list[str]]:
    resolved = (await ctx.admin.compat.ResolveAgentRef(
        compat_pb2.ResolveAgentRefRequest(agent_ref=ref))).agent.instance_id
    listed = (await ctx.admin.agents.ListAgentInstances(
        agents_pb2.ListAgentInstancesRequest(agent_ref=ref))).agent_instances
    return resolved, [i.id for i in listed]


async def test_compat_mode_on_prefers_the_legacy_id(registry: RegistryServer) -> None:
    ctx, x, y = await collision(registry)
    try:
        assert await refs_resolve_to(ctx, y.id) == (x.id, [x.id])
        # Explicit references are not affected by the preference.
        assert (await ctx.admin.compat.ResolveAgentRef(compat_pb2.ResolveAgentRefRequest(
            instance_id=y.id))).agent.instance_id == y.id
        assert (await ctx.admin.compat.ResolveAgentRef(compat_pb2.ResolveAgentRefRequest(
            legacy_agent_id=y.id))).agent.instance_id == x.id
        # Without a collision, either reference finds its instance.
        assert await refs_resolve_to(ctx, x.id) == (x.id, [x.id])
    finally:
        await ctx.admin.close()


async def test_compat_mode_off_prefers_the_instance_id(compat_off: RegistryServer) -> None:
    ctx, x, y = await collision(compat_off)
    try:
        assert await refs_resolve_to(ctx, y.id) == (y.id, [y.id])
        assert (await ctx.admin.compat.ResolveAgentRef(compat_pb2.ResolveAgentRefRequest(
            instance_id=y.id))).agent.instance_id == y.id
        assert (await ctx.admin.compat.ResolveAgentRef(compat_pb2.ResolveAgentRefRequest(
            legacy_agent_id=y.id))).agent.instance_id == x.id
        assert await refs_resolve_to(ctx, x.id) == (x.id, [x.id])
        # A legacy id that is nobody's instance id still resolves when compat mode is off.
        legacy = legacy_id()
        _, made = await linked_instance(ctx, legacy)
        assert await refs_resolve_to(ctx, legacy) == (made.id, [made.id])
    finally:
        await ctx.admin.close()


# --- identities --------------------------------------------------------------------------------

def sha256(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


async def upsert(ctx: TenantContext, **fields: str) -> agents_pb2.UpsertAgentIdentityResponse:
    return await ctx.admin.agents.UpsertAgentIdentity(agents_pb2.UpsertAgentIdentityRequest(
        agent_identity=agents_pb2.AgentIdentity(**fields)))


async def identity_records(registry: RegistryServer, ctx: TenantContext,
                           identity_id: str) -> list[common_pb2.ChangeRecord]:
    return [r for r in await change_records(registry, ctx.tenant.id) if r.target_id == identity_id]


async def test_identity_upsert_creates_then_updates_by_name(tenant: TenantContext,
                                                            registry: RegistryServer) -> None:
    name = f"scout-{secrets.token_hex(3)}"
    soul = "I am Scout. I find things — carefully. 🔎"
    first = await upsert(tenant, name=name, soul_content=soul, tools_notes="search, fetch",
                         description="finder")
    assert first.created
    ident = first.agent_identity
    assert ident.name == name
    assert ident.soul_hash == sha256(soul)
    assert ident.validation_status == agents_pb2.IDENTITY_VALIDATION_STATUS_VALID
    records = await identity_records(registry, tenant, ident.id)
    assert [r.type for r in records] == [CR.CHANGE_RECORD_TYPE_IDENTITY_UPDATED]
    assert records[0].actor.id == tenant.admin_operator_id

    new_soul = "I am Scout, second edition."
    second = await upsert(tenant, name=name, soul_content=new_soul, tools_notes="search")
    assert not second.created
    assert second.agent_identity.id == ident.id
    assert second.agent_identity.soul_hash == sha256(new_soul)
    stored = (await tenant.admin.agents.GetAgentIdentity(
        agents_pb2.GetAgentIdentityRequest(id=ident.id))).agent_identity
    assert (stored.soul_content, stored.soul_hash, stored.tools_notes) == (new_soul, sha256(new_soul), "search")
    records = await identity_records(registry, tenant, ident.id)
    assert [r.type for r in records] == [CR.CHANGE_RECORD_TYPE_IDENTITY_UPDATED] * 2
    listed = (await tenant.admin.agents.ListAgentIdentities(
        agents_pb2.ListAgentIdentitiesRequest())).agent_identities
    assert [i.id for i in listed] == [ident.id]


@pytest.mark.parametrize(("fields", "status"), [
    ({"soul_content": "soul", "tools_notes": "notes"}, "VALID"),
    ({"soul_content": "soul", "tools_notes": "notes", "soul_hash": sha256("soul")}, "VALID"),
    ({"soul_content": "soul"}, "PARTIAL"),
    ({"tools_notes": "notes"}, "MISSING"),
    ({}, "MISSING"),
    ({"soul_content": "soul", "tools_notes": "notes", "soul_hash": sha256("another soul")}, "INVALID"),
], ids=["valid", "valid-with-matching-hash", "partial", "missing", "missing-empty", "invalid"])
async def test_identity_validation_status(tenant: TenantContext, registry: RegistryServer,
                                          fields: dict[str, str], status: str) -> None:
    resp = await upsert(tenant, name=f"agent-{secrets.token_hex(3)}", **fields)
    ident = resp.agent_identity
    assert ident.validation_status == agents_pb2.IdentityValidationStatus.Value(
        f"IDENTITY_VALIDATION_STATUS_{status}")
    if fields.get("soul_content"):
        assert ident.soul_hash == sha256(fields["soul_content"])
    records = await identity_records(registry, tenant, ident.id)
    assert [r.type for r in records] == [CR.CHANGE_RECORD_TYPE_IDENTITY_UPDATED]
    assert records[0].after["validation_status"] == status


async def test_identity_status_is_recomputed_on_update(tenant: TenantContext,
                                                       registry: RegistryServer) -> None:
    name = f"agent-{secrets.token_hex(3)}"
    statuses = []
    for fields in ({"soul_content": "soul"},
                   {"soul_content": "soul", "tools_notes": "notes"},
                   {"soul_content": "soul", "tools_notes": "notes", "soul_hash": "f" * 64},
                   {}):
        statuses.append((await upsert(tenant, name=name, **fields)).agent_identity.validation_status)
    assert statuses == [agents_pb2.IDENTITY_VALIDATION_STATUS_PARTIAL,
                        agents_pb2.IDENTITY_VALIDATION_STATUS_VALID,
                        agents_pb2.IDENTITY_VALIDATION_STATUS_INVALID,
                        agents_pb2.IDENTITY_VALIDATION_STATUS_MISSING]
    ident_id = (await tenant.admin.agents.ListAgentIdentities(
        agents_pb2.ListAgentIdentitiesRequest())).agent_identities[0].id
    records = await identity_records(registry, tenant, ident_id)
    assert [r.type for r in records] == [CR.CHANGE_RECORD_TYPE_IDENTITY_UPDATED] * 4
    assert [r.after["validation_status"] for r in records] == ["PARTIAL", "VALID", "INVALID", "MISSING"]
