"""Authentication and RBAC over gRPC (SPEC §5): every call carries `authorization: Bearer <key>`;
keys belong to an operator or an agent instance; every admin call checks a permission."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from arm.common.v1 import common_pb2
from arm.registry.v1 import access_pb2, agents_pb2, compat_pb2, tenancy_pb2
from arm_client import ArmClient
from arm_registry import domain
from tests.conftest import RegistryServer, TenantContext, make_tenant
from tests.helpers import approved_version, expect_failure, genome, operator_with_roles, walk_version

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


def whoami(client: ArmClient, **kwargs: Any) -> Any:
    return client.access.Authenticate(access_pb2.AuthenticateRequest(), **kwargs)


def list_projects(client: ArmClient, **kwargs: Any) -> Any:
    return client.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest(), **kwargs)


async def new_operator_key(admin: ArmClient, operator_id: str) -> tuple[str, str]:
    """Returns (key id, secret) of a fresh key for the operator."""
    resp = await admin.access.CreateApiKey(access_pb2.CreateApiKeyRequest(operator_id=operator_id))
    return resp.api_key.id, resp.secret


async def role_ids(admin: ArmClient) -> dict[str, str]:
    return {r.name: r.id for r in (await admin.access.ListRoles(access_pb2.ListRolesRequest())).roles}


# --- authentication --------------------------------------------------------------------------

async def test_health_check_needs_no_key(registry: RegistryServer) -> None:
    anonymous = registry.client(None)
    try:
        health = health_pb2_grpc.HealthStub(anonymous.channel)
        for service in ("", "arm.registry.v1.TenancyService", "arm.registry.v1.AccessService",
                        "arm.registry.v1.AgentService", "arm.registry.v1.CompatService"):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
        # Only health is public: the same channel without a key cannot call the registry.
        await expect_failure(list_projects(anonymous), UNAUTHENTICATED, "MISSING_API_KEY")
    finally:
        await anonymous.close()


@pytest.mark.parametrize("call", [
    whoami,
    list_projects,
    lambda c: c.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(slug="no-key", name="x")),
    lambda c: c.agents.ListAgentInstances(agents_pb2.ListAgentInstancesRequest()),
    lambda c: c.compat.ResolveAgentRef(compat_pb2.ResolveAgentRefRequest(legacy_agent_id="x")),
], ids=["Authenticate", "ListProjects", "CreateProject", "ListAgentInstances", "ResolveAgentRef"])
async def test_call_without_key_is_unauthenticated(registry: RegistryServer, call: Any) -> None:
    anonymous = registry.client(None)
    try:
        got = await expect_failure(call(anonymous), UNAUTHENTICATED, "MISSING_API_KEY")
        assert "request_id" in got.metadata
    finally:
        await anonymous.close()


def _split_key(key: str) -> tuple[str, str]:
    """`arm_key_<id>_<secret>` → ("arm_key_<id>", "<secret>"); the secret may contain "_"."""
    arm, kind, ident, secret = key.split("_", 3)
    return f"{arm}_{kind}_{ident}", secret


def _wrong_secret(key: str) -> str:
    prefix, secret = _split_key(key)
    return f"{prefix}_{'A' if secret[0] != 'A' else 'B'}{secret[1:]}"


@pytest.mark.parametrize(("name", "make_key"), [
    ("garbage", lambda real: "garbage"),
    ("garbage with underscores", lambda real: "a_b_c_d"),
    ("arm prefix, empty secret", lambda real: _split_key(real)[0] + "_"),
    ("unknown key id", lambda real: f"arm_key_{'0' * 32}_{_split_key(real)[1]}"),
    ("right id, wrong secret", _wrong_secret),
    ("right id, truncated secret", lambda real: real[:-1]),
    ("right key plus a character", lambda real: real + "x"),
], ids=lambda v: v if isinstance(v, str) else None)
async def test_invalid_key_is_unauthenticated(registry: RegistryServer, tenant: TenantContext,
                                              name: str, make_key: Callable[[str], str]) -> None:
    bad = make_key(tenant.admin_key)
    assert bad != tenant.admin_key
    async with registry.client(bad) as client:
        await expect_failure(whoami(client), UNAUTHENTICATED, "INVALID_API_KEY")
        await expect_failure(list_projects(client), UNAUTHENTICATED, "INVALID_API_KEY")
    # The genuine key still works.
    assert (await whoami(tenant.admin)).principal.tenant_id == tenant.tenant.id


@pytest.mark.parametrize("header", [
    "Basic dXNlcjpwYXNz",
    "Token {key}",
    "{key}",            # the key itself, without a scheme
    "Bearer",
    "Bearer    ",
], ids=["basic", "token-scheme", "bare-key", "bearer-no-key", "bearer-blank"])
async def test_non_bearer_authorization_header_is_unauthenticated(
        registry: RegistryServer, tenant: TenantContext, header: str) -> None:
    async with registry.client(None) as anonymous:
        got = await expect_failure(
            whoami(anonymous, metadata=(("authorization", header.format(key=tenant.admin_key)),)),
            UNAUTHENTICATED, "INVALID_AUTHORIZATION_HEADER")
        assert "Bearer" in got.message
        # The scheme is case-insensitive: the same key as "bearer <key>" works.
        ok = await whoami(anonymous, metadata=(("authorization", f"bearer {tenant.admin_key}"),))
        assert ok.principal.tenant_id == tenant.tenant.id


async def a_project(admin: ArmClient) -> tenancy_pb2.Project:
    return (await admin.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
        slug=f"p-{secrets.token_hex(4)}", name="P"))).project


async def test_revoked_key_stops_working_at_once(registry: RegistryServer, tenant: TenantContext) -> None:
    project = await a_project(tenant.admin)
    op_id, client = await operator_with_roles(tenant.admin, registry.address, "auditor")
    async with client:
        key_id = (await whoami(client)).principal.api_key_id  # also warms the auth cache
        assert [p.id for p in (await list_projects(client)).projects] == [project.id]
        revoked = (await tenant.admin.access.RevokeApiKey(
            access_pb2.RevokeApiKeyRequest(id=key_id))).api_key
        assert revoked.id == key_id and revoked.HasField("revoke_time")
        await expect_failure(list_projects(client), UNAUTHENTICATED, "API_KEY_REVOKED")
        await expect_failure(whoami(client), UNAUTHENTICATED, "API_KEY_REVOKED")
    # Revoking one key leaves the operator's other keys alone.
    _, secret = await new_operator_key(tenant.admin, op_id)
    async with registry.client(secret) as other:
        assert (await whoami(other)).principal.actor.id == op_id


async def test_deactivated_operator_is_unauthenticated_until_reactivated(
        registry: RegistryServer, tenant: TenantContext) -> None:
    op_id, client = await operator_with_roles(tenant.admin, registry.address, "auditor")
    async with client:
        assert (await whoami(client)).principal.actor.id == op_id
        await tenant.admin.access.UpdateOperator(access_pb2.UpdateOperatorRequest(id=op_id, active=False))
        await expect_failure(list_projects(client), UNAUTHENTICATED, "OPERATOR_INACTIVE")
        # A key created while inactive does not work either.
        _, secret = await new_operator_key(tenant.admin, op_id)
        async with registry.client(secret) as fresh:
            await expect_failure(whoami(fresh), UNAUTHENTICATED, "OPERATOR_INACTIVE")
        await tenant.admin.access.UpdateOperator(access_pb2.UpdateOperatorRequest(id=op_id, active=True))
        assert (await whoami(client)).principal.actor.id == op_id


async def test_operator_cannot_deactivate_itself(tenant: TenantContext) -> None:
    await expect_failure(tenant.admin.access.UpdateOperator(access_pb2.UpdateOperatorRequest(
        id=tenant.admin_operator_id, active=False)), grpc.StatusCode.FAILED_PRECONDITION,
        "SELF_DEACTIVATION")
    assert (await whoami(tenant.admin)).principal.actor.id == tenant.admin_operator_id


async def test_retired_instance_key_stops_working_at_once(registry: RegistryServer,
                                                          tenant: TenantContext) -> None:
    agents = await approved_version(tenant.admin)
    inst = (await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="w"))).agent_instance
    secret = (await tenant.admin.access.CreateApiKey(
        access_pb2.CreateApiKeyRequest(instance_id=inst.id))).secret
    async with registry.client(secret) as agent:
        await agent.agents.RecordHeartbeat(agents_pb2.RecordHeartbeatRequest(id=inst.id))
        await tenant.admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
            id=inst.id, to_state=agents_pb2.INSTANCE_STATE_RETIRED))
        await expect_failure(agent.agents.RecordHeartbeat(agents_pb2.RecordHeartbeatRequest(id=inst.id)),
                             UNAUTHENTICATED, "INSTANCE_RETIRED")


async def test_key_of_retired_instance_is_unauthenticated(registry: RegistryServer,
                                                          tenant: TenantContext) -> None:
    """A key first used after its instance retired is refused (no cache involved)."""
    agents = await approved_version(tenant.admin)
    inst = (await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="w"))).agent_instance
    secret = (await tenant.admin.access.CreateApiKey(
        access_pb2.CreateApiKeyRequest(instance_id=inst.id))).secret
    await tenant.admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
        id=inst.id, to_state=agents_pb2.INSTANCE_STATE_RETIRED))
    async with registry.client(secret) as agent:
        await expect_failure(whoami(agent), UNAUTHENTICATED, "INSTANCE_RETIRED")


# --- Authenticate ----------------------------------------------------------------------------

def grant_set(principal: access_pb2.Principal) -> set[tuple[str, int, str]]:
    return {(g.permission, g.scope_type, g.scope_id) for g in principal.grants}


async def test_authenticate_returns_the_operator_principal(tenant: TenantContext) -> None:
    p = (await whoami(tenant.admin)).principal
    assert p.tenant_id == tenant.tenant.id
    assert p.actor.type == common_pb2.ACTOR_TYPE_OPERATOR
    assert p.actor.id == tenant.admin_operator_id
    assert tenant.admin_key.startswith(f"arm_{p.api_key_id}_")
    assert p.tenant_active and not p.system_tenant
    admin_perms = set(domain.BUILT_IN_ROLES["admin"][1])
    assert grant_set(p) == {(perm, access_pb2.ROLE_SCOPE_TYPE_TENANT, "") for perm in admin_perms}
    assert "tenants:admin" not in {g.permission for g in p.grants}


async def test_authenticate_system_admin_holds_tenants_admin(registry: RegistryServer,
                                                             system_admin: ArmClient) -> None:
    p = (await whoami(system_admin)).principal
    assert p.tenant_id == registry.system_tenant_id
    assert p.system_tenant
    assert ("tenants:admin", access_pb2.ROLE_SCOPE_TYPE_TENANT, "") in grant_set(p)


async def test_authenticate_agent_key_returns_the_agent_principal(registry: RegistryServer,
                                                                  tenant: TenantContext) -> None:
    agents = await approved_version(tenant.admin)
    inst = (await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="w"))).agent_instance
    key = await tenant.admin.access.CreateApiKey(access_pb2.CreateApiKeyRequest(instance_id=inst.id))
    assert key.api_key.instance_id == inst.id and not key.api_key.operator_id
    async with registry.client(key.secret) as agent:
        p = (await whoami(agent)).principal
    assert p.tenant_id == tenant.tenant.id
    assert (p.actor.type, p.actor.id) == (common_pb2.ACTOR_TYPE_AGENT, inst.id)
    assert p.api_key_id == key.api_key.id
    assert {g.permission for g in p.grants} == set(domain.BUILT_IN_ROLES["agent"][1])


async def test_authenticate_reports_scoped_grants(registry: RegistryServer, tenant: TenantContext) -> None:
    project = (await tenant.admin.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
        slug=f"p-{secrets.token_hex(3)}", name="P"))).project
    op_id, client = await operator_with_roles(tenant.admin, registry.address, "approver",
                                              scope_type=access_pb2.ROLE_SCOPE_TYPE_PROJECT,
                                              scope_id=project.id)
    async with client:
        p = (await whoami(client)).principal
    assert p.actor.id == op_id
    assert grant_set(p) == {(perm, access_pb2.ROLE_SCOPE_TYPE_PROJECT, project.id)
                            for perm in domain.BUILT_IN_ROLES["approver"][1]}


# --- RBAC: the auditor can read but not write ------------------------------------------------

@dataclass
class World:
    """A tenant with one of everything, its admin, and an auditor operator."""

    ctx: TenantContext
    auditor_id: str
    auditor: ArmClient
    project: tenancy_pb2.Project
    environment: tenancy_pb2.Environment
    template: agents_pb2.AgentTemplate
    approved: agents_pb2.AgentVersion
    draft: agents_pb2.AgentVersion
    instance: agents_pb2.AgentInstance
    identity: agents_pb2.AgentIdentity
    other_operator_id: str
    other_key_id: str
    auditor_role_id: str
    assignment_id: str
    legacy_id: str

    @property
    def admin(self) -> ArmClient:
        return self.ctx.admin


@pytest.fixture(scope="module")
async def world(registry: RegistryServer, system_admin: ArmClient) -> AsyncIterator[World]:
    ctx = await make_tenant(registry, system_admin)
    admin = ctx.admin
    agents = await approved_version(admin)
    draft = (await admin.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(
        template_id=agents.template.id, genome=genome()))).agent_version
    legacy_id = f"mc-{secrets.token_hex(4)}"
    instance = (await admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="w",
        legacy_agent_id=legacy_id))).agent_instance
    identity = (await admin.agents.UpsertAgentIdentity(agents_pb2.UpsertAgentIdentityRequest(
        agent_identity=agents_pb2.AgentIdentity(name="ident", soul_content="soul")))).agent_identity
    auditor_id, auditor = await operator_with_roles(admin, registry.address, "auditor")
    other = (await admin.access.CreateOperator(access_pb2.CreateOperatorRequest(
        email=f"other-{secrets.token_hex(3)}@example.com", name="Other"))).operator
    other_key_id, _ = await new_operator_key(admin, other.id)
    roles = await role_ids(admin)
    assignment = (await admin.access.CreateRoleAssignment(access_pb2.CreateRoleAssignmentRequest(
        operator_id=other.id, role_id=roles["auditor"]))).role_assignment
    yield World(ctx, auditor_id, auditor, agents.project, agents.environment, agents.template,
                agents.version, draft, instance, identity, other.id, other_key_id,
                roles["auditor"], assignment.id, legacy_id)
    await auditor.close()
    await admin.close()


Call = Callable[[ArmClient, World], Any]

# Every mutating RPC of the registry, with a request that is valid (so the permission check,
# not validation or a missing row, is what refuses it) and the permission it needs.
MUTATIONS: list[tuple[str, Call, str]] = [
    ("CreateTenant", lambda c, w: c.tenancy.CreateTenant(tenancy_pb2.CreateTenantRequest(
        slug=f"t-{secrets.token_hex(4)}", name="T")), "tenants:admin"),
    ("UpdateTenant", lambda c, w: c.tenancy.UpdateTenant(tenancy_pb2.UpdateTenantRequest(
        id=w.ctx.tenant.id, name="renamed")), "operators:admin"),
    ("CreateEnvironment", lambda c, w: c.tenancy.CreateEnvironment(tenancy_pb2.CreateEnvironmentRequest(
        name="e2", type=tenancy_pb2.ENVIRONMENT_TYPE_DEV)), "registry:write"),
    ("UpdateEnvironment", lambda c, w: c.tenancy.UpdateEnvironment(tenancy_pb2.UpdateEnvironmentRequest(
        id=w.environment.id, name="renamed")), "registry:write"),
    ("CreateProject", lambda c, w: c.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
        slug="p2", name="P2")), "registry:write"),
    ("UpdateProject", lambda c, w: c.tenancy.UpdateProject(tenancy_pb2.UpdateProjectRequest(
        id=w.project.id, name="renamed")), "registry:write"),
    ("CreateOperator", lambda c, w: c.access.CreateOperator(access_pb2.CreateOperatorRequest(
        email="new@example.com", name="New")), "operators:admin"),
    ("UpdateOperator", lambda c, w: c.access.UpdateOperator(access_pb2.UpdateOperatorRequest(
        id=w.other_operator_id, active=False)), "operators:admin"),
    ("CreateRole", lambda c, w: c.access.CreateRole(access_pb2.CreateRoleRequest(
        name="custom", permissions=["registry:write"])), "operators:admin"),
    ("CreateRoleAssignment", lambda c, w: c.access.CreateRoleAssignment(
        access_pb2.CreateRoleAssignmentRequest(operator_id=w.auditor_id, role_id=w.auditor_role_id)),
     "operators:admin"),
    ("DeleteRoleAssignment", lambda c, w: c.access.DeleteRoleAssignment(
        access_pb2.DeleteRoleAssignmentRequest(id=w.assignment_id)), "operators:admin"),
    ("CreateApiKey", lambda c, w: c.access.CreateApiKey(access_pb2.CreateApiKeyRequest(
        operator_id=w.auditor_id)), "operators:admin"),
    ("RevokeApiKey", lambda c, w: c.access.RevokeApiKey(access_pb2.RevokeApiKeyRequest(
        id=w.other_key_id)), "operators:admin"),
    ("CreateAgentTemplate", lambda c, w: c.agents.CreateAgentTemplate(
        agents_pb2.CreateAgentTemplateRequest(project_id=w.project.id, slug="tpl2", name="T2")),
     "registry:write"),
    ("UpdateAgentTemplate", lambda c, w: c.agents.UpdateAgentTemplate(
        agents_pb2.UpdateAgentTemplateRequest(id=w.template.id, active=False)), "registry:write"),
    ("CreateAgentVersion", lambda c, w: c.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(
        template_id=w.template.id, genome=genome())), "registry:write"),
    ("TransitionAgentVersion", lambda c, w: c.agents.TransitionAgentVersion(
        agents_pb2.TransitionAgentVersionRequest(id=w.draft.id, to_state=agents_pb2.VERSION_STATE_TESTING)),
     "registry:write"),
    ("RecordEvaluation", lambda c, w: c.agents.RecordEvaluation(agents_pb2.RecordEvaluationRequest(
        id=w.draft.id, eval_status=agents_pb2.EVAL_STATUS_PASS)), "registry:write"),
    ("CreateAgentInstance", lambda c, w: c.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=w.approved.id, environment_id=w.environment.id, name="w2")), "registry:write"),
    ("TransitionAgentInstance", lambda c, w: c.agents.TransitionAgentInstance(
        agents_pb2.TransitionAgentInstanceRequest(id=w.instance.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE)),
     "instances:transition"),
    ("RecordHeartbeat", lambda c, w: c.agents.RecordHeartbeat(agents_pb2.RecordHeartbeatRequest(
        id=w.instance.id)), "registry:write"),
    ("RebindAgentInstances", lambda c, w: c.agents.RebindAgentInstances(agents_pb2.RebindAgentInstancesRequest(
        template_id=w.template.id, environment_id=w.environment.id, version_id=w.approved.id)),
     "registry:write"),
    ("UpsertAgentIdentity", lambda c, w: c.agents.UpsertAgentIdentity(agents_pb2.UpsertAgentIdentityRequest(
        agent_identity=agents_pb2.AgentIdentity(name="ident", soul_content="changed"))), "registry:write"),
    ("EnsureInstanceForLegacyAgent", lambda c, w: c.compat.EnsureInstanceForLegacyAgent(
        compat_pb2.EnsureInstanceForLegacyAgentRequest(legacy_agent_id="mc-new", name="New")),
     "registry:write"),
]


async def list_all(method: Any, req: Any, field: str) -> list[Any]:
    rows: list[Any] = []
    while True:
        resp = await method(req)
        rows.extend(getattr(resp, field))
        if not resp.next_page_token:
            return rows
        req.page_token = resp.next_page_token


async def tenant_state(w: World) -> dict[str, Any]:
    """What the admin sees of the tenant, as plain data (to prove a refused call changed nothing)."""
    c = w.admin
    lists = {
        "tenant": [(await c.tenancy.GetTenant(tenancy_pb2.GetTenantRequest(id=w.ctx.tenant.id))).tenant],
        "environments": await list_all(c.tenancy.ListEnvironments, tenancy_pb2.ListEnvironmentsRequest(), "environments"),
        "projects": await list_all(c.tenancy.ListProjects, tenancy_pb2.ListProjectsRequest(), "projects"),
        "operators": await list_all(c.access.ListOperators, access_pb2.ListOperatorsRequest(), "operators"),
        "roles": await list_all(c.access.ListRoles, access_pb2.ListRolesRequest(), "roles"),
        "assignments": await list_all(c.access.ListRoleAssignments, access_pb2.ListRoleAssignmentsRequest(), "role_assignments"),
        "keys": await list_all(c.access.ListApiKeys, access_pb2.ListApiKeysRequest(), "api_keys"),
        "templates": await list_all(c.agents.ListAgentTemplates, agents_pb2.ListAgentTemplatesRequest(), "agent_templates"),
        "versions": await list_all(c.agents.ListAgentVersions, agents_pb2.ListAgentVersionsRequest(), "agent_versions"),
        "instances": await list_all(c.agents.ListAgentInstances, agents_pb2.ListAgentInstancesRequest(), "agent_instances"),
        "identities": await list_all(c.agents.ListAgentIdentities, agents_pb2.ListAgentIdentitiesRequest(), "agent_identities"),
    }
    return {k: [json_format.MessageToDict(r) for r in v] for k, v in lists.items()}


@pytest.mark.parametrize(("name", "call", "permission"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
async def test_auditor_is_denied_every_mutation(world: World, name: str, call: Call,
                                                permission: str) -> None:
    before = await tenant_state(world)
    got = await expect_failure(call(world.auditor, world), PERMISSION_DENIED, "MISSING_PERMISSION")
    assert got.metadata["permission"] == permission
    assert got.metadata["actor_id"] == world.auditor_id
    assert await tenant_state(world) == before


async def test_mutation_table_covers_every_mutating_rpc() -> None:
    """A new write RPC must be added to the table above (or be an operator's own session key's,
    which needs no permission: tests/registry/test_session_keys.py)."""
    reads = ("Get", "List", "Resolve", "Authenticate", "Watch", "CreateSessionKey", "RevokeCallerKey")
    writes = {meth.name for mod, svc in ((tenancy_pb2, "TenancyService"), (access_pb2, "AccessService"),
                                         (agents_pb2, "AgentService"), (compat_pb2, "CompatService"))
              for meth in mod.DESCRIPTOR.services_by_name[svc].methods
              if not meth.name.startswith(reads)}
    assert writes == {name for name, _, _ in MUTATIONS}


READS: list[tuple[str, Call]] = [
    ("GetTenant", lambda c, w: c.tenancy.GetTenant(tenancy_pb2.GetTenantRequest(id=w.ctx.tenant.id))),
    ("ListTenants", lambda c, w: c.tenancy.ListTenants(tenancy_pb2.ListTenantsRequest())),
    ("GetEnvironment", lambda c, w: c.tenancy.GetEnvironment(tenancy_pb2.GetEnvironmentRequest(id=w.environment.id))),
    ("ListEnvironments", lambda c, w: c.tenancy.ListEnvironments(tenancy_pb2.ListEnvironmentsRequest())),
    ("GetProject", lambda c, w: c.tenancy.GetProject(tenancy_pb2.GetProjectRequest(id=w.project.id))),
    ("ListProjects", lambda c, w: c.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest())),
    ("GetOperator", lambda c, w: c.access.GetOperator(access_pb2.GetOperatorRequest(id=w.other_operator_id))),
    ("ListOperators", lambda c, w: c.access.ListOperators(access_pb2.ListOperatorsRequest())),
    ("ListPermissions", lambda c, w: c.access.ListPermissions(access_pb2.ListPermissionsRequest())),
    ("GetRole", lambda c, w: c.access.GetRole(access_pb2.GetRoleRequest(id=w.auditor_role_id))),
    ("ListRoles", lambda c, w: c.access.ListRoles(access_pb2.ListRolesRequest())),
    ("ListRoleAssignments", lambda c, w: c.access.ListRoleAssignments(access_pb2.ListRoleAssignmentsRequest())),
    ("GetAgentTemplate", lambda c, w: c.agents.GetAgentTemplate(agents_pb2.GetAgentTemplateRequest(id=w.template.id))),
    ("ListAgentTemplates", lambda c, w: c.agents.ListAgentTemplates(agents_pb2.ListAgentTemplatesRequest())),
    ("GetAgentVersion", lambda c, w: c.agents.GetAgentVersion(agents_pb2.GetAgentVersionRequest(id=w.approved.id))),
    ("ListAgentVersions", lambda c, w: c.agents.ListAgentVersions(agents_pb2.ListAgentVersionsRequest())),
    ("GetAgentInstance", lambda c, w: c.agents.GetAgentInstance(agents_pb2.GetAgentInstanceRequest(id=w.instance.id))),
    ("ListAgentInstances", lambda c, w: c.agents.ListAgentInstances(agents_pb2.ListAgentInstancesRequest())),
    ("GetAgentIdentity", lambda c, w: c.agents.GetAgentIdentity(agents_pb2.GetAgentIdentityRequest(id=w.identity.id))),
    ("ListAgentIdentities", lambda c, w: c.agents.ListAgentIdentities(agents_pb2.ListAgentIdentitiesRequest())),
    ("ResolveAgentRef", lambda c, w: c.compat.ResolveAgentRef(compat_pb2.ResolveAgentRefRequest(instance_id=w.instance.id))),
    ("GetAgentByLegacyId", lambda c, w: c.compat.GetAgentByLegacyId(compat_pb2.GetAgentByLegacyIdRequest(legacy_agent_id=w.legacy_id))),
    ("Authenticate", lambda c, w: c.access.Authenticate(access_pb2.AuthenticateRequest())),
]


@pytest.mark.parametrize(("name", "call"), READS, ids=[r[0] for r in READS])
async def test_auditor_can_read(world: World, name: str, call: Call) -> None:
    as_auditor = await call(world.auditor, world)
    as_admin = await call(world.admin, world)
    if name != "Authenticate":
        assert as_auditor == as_admin
    assert as_auditor.ByteSize() > 0


async def test_auditor_cannot_list_api_keys(world: World) -> None:
    got = await expect_failure(world.auditor.access.ListApiKeys(access_pb2.ListApiKeysRequest()),
                               PERMISSION_DENIED, "MISSING_PERMISSION")
    assert got.metadata["permission"] == "operators:admin"


# --- RBAC: approving versions ----------------------------------------------------------------

async def _candidate(client: ArmClient) -> agents_pb2.AgentVersion:
    suffix = secrets.token_hex(4)
    project = (await client.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
        slug=f"p-{suffix}", name="P"))).project
    tpl = (await client.agents.CreateAgentTemplate(agents_pb2.CreateAgentTemplateRequest(
        project_id=project.id, slug=f"tpl-{suffix}", name="T"))).agent_template
    version = (await client.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(
        template_id=tpl.id, genome=genome()))).agent_version
    return await walk_version(client, version.id, agents_pb2.VERSION_STATE_CANDIDATE)


async def test_operator_cannot_approve_a_version(registry: RegistryServer, tenant: TenantContext) -> None:
    op_id, op = await operator_with_roles(tenant.admin, registry.address, "operator")
    async with op:
        candidate = await _candidate(op)  # the operator role may do everything up to CANDIDATE
        assert candidate.created_by == op_id
        got = await expect_failure(op.agents.TransitionAgentVersion(agents_pb2.TransitionAgentVersionRequest(
            id=candidate.id, to_state=agents_pb2.VERSION_STATE_APPROVED)), PERMISSION_DENIED,
            "MISSING_PERMISSION")
        assert got.metadata["permission"] == "versions:approve"
    after = (await tenant.admin.agents.GetAgentVersion(
        agents_pb2.GetAgentVersionRequest(id=candidate.id))).agent_version
    assert after.state == agents_pb2.VERSION_STATE_CANDIDATE
    assert after.approved_by == ""
    assert after.etag == candidate.etag


async def test_approver_operator_approves_and_is_recorded(registry: RegistryServer,
                                                          tenant: TenantContext) -> None:
    _, author = await operator_with_roles(tenant.admin, registry.address, "operator")
    approver_id, approver = await operator_with_roles(tenant.admin, registry.address,
                                                      "approver", "operator")
    async with author, approver:
        candidate = await _candidate(author)
        approved = (await approver.agents.TransitionAgentVersion(agents_pb2.TransitionAgentVersionRequest(
            id=candidate.id, to_state=agents_pb2.VERSION_STATE_APPROVED, reason="lgtm"))).agent_version
    assert approved.state == agents_pb2.VERSION_STATE_APPROVED
    assert approved.approved_by == approver_id
    assert approved.created_by != approver_id
    stored = (await tenant.admin.agents.GetAgentVersion(
        agents_pb2.GetAgentVersionRequest(id=candidate.id))).agent_version
    assert (stored.state, stored.approved_by) == (agents_pb2.VERSION_STATE_APPROVED, approver_id)


# --- RBAC: agent keys ------------------------------------------------------------------------

async def test_agent_key_acts_only_for_its_own_instance(registry: RegistryServer,
                                                        tenant: TenantContext) -> None:
    agents = await approved_version(tenant.admin)

    async def instance(legacy: str) -> agents_pb2.AgentInstance:
        return (await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
            version_id=agents.version.id, environment_id=agents.environment.id, name=legacy,
            legacy_agent_id=legacy))).agent_instance

    own, other = await instance(f"mc-{secrets.token_hex(3)}"), await instance(f"mc-{secrets.token_hex(3)}")
    secret = (await tenant.admin.access.CreateApiKey(
        access_pb2.CreateApiKeyRequest(instance_id=own.id))).secret
    async with registry.client(secret) as agent:
        beat = (await agent.agents.RecordHeartbeat(agents_pb2.RecordHeartbeatRequest(id=own.id))).agent_instance
        assert beat.id == own.id and beat.HasField("last_heartbeat_time")
        got = (await agent.agents.GetAgentInstance(agents_pb2.GetAgentInstanceRequest(id=own.id))).agent_instance
        assert (got.id, got.last_heartbeat_time) == (own.id, beat.last_heartbeat_time)
        for ref in (compat_pb2.ResolveAgentRefRequest(instance_id=own.id),
                    compat_pb2.ResolveAgentRefRequest(legacy_agent_id=own.legacy_agent_id),
                    compat_pb2.ResolveAgentRefRequest(agent_ref=own.id)):
            resolved = (await agent.compat.ResolveAgentRef(ref)).agent
            assert (resolved.instance_id, resolved.tenant_id) == (own.id, tenant.tenant.id)
        legacy_view = await agent.compat.GetAgentByLegacyId(
            compat_pb2.GetAgentByLegacyIdRequest(legacy_agent_id=own.legacy_agent_id))
        assert legacy_view.agent_instance.id == own.id

        denied: list[tuple[str, Any, str]] = [
            ("GetAgentInstance(other)", agent.agents.GetAgentInstance(
                agents_pb2.GetAgentInstanceRequest(id=other.id)), "registry:read"),
            ("RecordHeartbeat(other)", agent.agents.RecordHeartbeat(
                agents_pb2.RecordHeartbeatRequest(id=other.id)), "registry:write"),
            ("ResolveAgentRef(other id)", agent.compat.ResolveAgentRef(
                compat_pb2.ResolveAgentRefRequest(instance_id=other.id)), "registry:read"),
            ("ResolveAgentRef(other legacy)", agent.compat.ResolveAgentRef(
                compat_pb2.ResolveAgentRefRequest(legacy_agent_id=other.legacy_agent_id)), "registry:read"),
            ("GetAgentByLegacyId(other)", agent.compat.GetAgentByLegacyId(
                compat_pb2.GetAgentByLegacyIdRequest(legacy_agent_id=other.legacy_agent_id)), "registry:read"),
            ("ListAgentInstances", agent.agents.ListAgentInstances(
                agents_pb2.ListAgentInstancesRequest()), "registry:read"),
            ("ListProjects", agent.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest()), "registry:read"),
            ("CreateProject", agent.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
                slug="by-agent", name="x")), "registry:write"),
            ("TransitionAgentInstance(own)", agent.agents.TransitionAgentInstance(
                agents_pb2.TransitionAgentInstanceRequest(id=own.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE)),
             "instances:transition"),
            ("CreateApiKey(own)", agent.access.CreateApiKey(access_pb2.CreateApiKeyRequest(
                instance_id=own.id)), "operators:admin"),
        ]
        for name, call, permission in denied:
            failure = await expect_failure(call, PERMISSION_DENIED, "MISSING_PERMISSION")
            assert failure.metadata["permission"] == permission, name
            assert failure.metadata["actor_id"] == own.id, name
    untouched = (await tenant.admin.agents.GetAgentInstance(
        agents_pb2.GetAgentInstanceRequest(id=other.id))).agent_instance
    assert not untouched.HasField("last_heartbeat_time")
    own_after = (await tenant.admin.agents.GetAgentInstance(
        agents_pb2.GetAgentInstanceRequest(id=own.id))).agent_instance
    assert own_after.state == agents_pb2.INSTANCE_STATE_PROVISIONING
    projects = (await tenant.admin.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest())).projects
    assert "by-agent" not in {p.slug for p in projects}


# --- RBAC: scopes and expiry -----------------------------------------------------------------

async def test_project_scoped_role_applies_only_in_that_project(registry: RegistryServer,
                                                                 tenant: TenantContext) -> None:
    p1, p2 = [(await tenant.admin.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
        slug=f"{n}-{secrets.token_hex(3)}", name=n))).project for n in ("one", "two")]
    _, scoped = await operator_with_roles(tenant.admin, registry.address, "operator",
                                          scope_type=access_pb2.ROLE_SCOPE_TYPE_PROJECT, scope_id=p1.id)
    async with scoped:
        tpl = (await scoped.agents.CreateAgentTemplate(agents_pb2.CreateAgentTemplateRequest(
            project_id=p1.id, slug=f"in-{secrets.token_hex(3)}", name="In"))).agent_template
        assert tpl.project_id == p1.id
        got = await expect_failure(scoped.agents.CreateAgentTemplate(agents_pb2.CreateAgentTemplateRequest(
            project_id=p2.id, slug=f"out-{secrets.token_hex(3)}", name="Out")),
            PERMISSION_DENIED, "MISSING_PERMISSION")
        assert got.metadata["permission"] == "registry:write"
        # Reads follow the same scope: its own project yes, the other one no.
        assert (await scoped.tenancy.GetProject(tenancy_pb2.GetProjectRequest(id=p1.id))).project.id == p1.id
        await expect_failure(scoped.tenancy.GetProject(tenancy_pb2.GetProjectRequest(id=p2.id)),
                             PERMISSION_DENIED, "MISSING_PERMISSION")
        # Tenant-wide writes are not covered by a project grant.
        await expect_failure(scoped.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
            slug=f"new-{secrets.token_hex(3)}", name="New")), PERMISSION_DENIED, "MISSING_PERMISSION")
    templates = (await tenant.admin.agents.ListAgentTemplates(
        agents_pb2.ListAgentTemplatesRequest(project_id=p2.id))).agent_templates
    assert list(templates) == []


async def test_expired_role_assignment_is_not_honoured(registry: RegistryServer,
                                                       tenant: TenantContext) -> None:
    """The assignment is granted for 1.5 s. A key used before expiry may write; a key first
    used after expiry may not (the auth cache holds a principal per key, so a separate key
    observes the expiry without waiting for the cache)."""
    admin = tenant.admin
    op_id, reader = await operator_with_roles(admin, registry.address, "auditor")
    await reader.close()
    _, early_secret = await new_operator_key(admin, op_id)
    _, late_secret = await new_operator_key(admin, op_id)
    expires = datetime.now(UTC) + timedelta(seconds=1.5)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(expires)
    roles = await role_ids(admin)
    assignment = (await admin.access.CreateRoleAssignment(access_pb2.CreateRoleAssignmentRequest(
        operator_id=op_id, role_id=roles["operator"], expire_time=stamp))).role_assignment
    assert assignment.expire_time == stamp
    async with registry.client(early_secret) as early:
        made = (await early.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
            slug=f"early-{secrets.token_hex(3)}", name="Early"))).project
        assert made.tenant_id == tenant.tenant.id
    await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.1)
    async with registry.client(late_secret) as late:
        got = await expect_failure(late.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
            slug=f"late-{secrets.token_hex(3)}", name="Late")), PERMISSION_DENIED, "MISSING_PERMISSION")
        assert got.metadata["permission"] == "registry:write"
        # The unexpired auditor role still applies, and the expired grant is not reported.
        assert (await late.tenancy.GetProject(tenancy_pb2.GetProjectRequest(id=made.id))).project.id == made.id
        perms = {g.permission for g in (await whoami(late)).principal.grants}
        assert perms == set(domain.BUILT_IN_ROLES["auditor"][1])


async def test_role_assignment_expiry_must_be_in_the_future(tenant: TenantContext) -> None:
    past = timestamp_pb2.Timestamp()
    past.FromDatetime(datetime.now(UTC) - timedelta(minutes=1))
    roles = await role_ids(tenant.admin)
    got = await expect_failure(tenant.admin.access.CreateRoleAssignment(access_pb2.CreateRoleAssignmentRequest(
        operator_id=tenant.admin_operator_id, role_id=roles["auditor"], expire_time=past)),
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELDS")
    assert "expire_time" in got.violations


async def test_removed_role_assignment_stops_applying_at_once(registry: RegistryServer,
                                                              tenant: TenantContext) -> None:
    project = await a_project(tenant.admin)
    op_id, client = await operator_with_roles(tenant.admin, registry.address, "auditor")
    async with client:
        assert [p.id for p in (await list_projects(client)).projects] == [project.id]
        assignments = (await tenant.admin.access.ListRoleAssignments(
            access_pb2.ListRoleAssignmentsRequest(operator_id=op_id))).role_assignments
        assert len(assignments) == 1
        await tenant.admin.access.DeleteRoleAssignment(
            access_pb2.DeleteRoleAssignmentRequest(id=assignments[0].id))
        got = await expect_failure(list_projects(client), PERMISSION_DENIED, "MISSING_PERMISSION")
        assert got.metadata["permission"] == "registry:read"
        assert list((await whoami(client)).principal.grants) == []


async def test_ordinary_tenant_admin_cannot_create_tenants(tenant: TenantContext) -> None:
    got = await expect_failure(tenant.admin.tenancy.CreateTenant(tenancy_pb2.CreateTenantRequest(
        slug=f"t-{secrets.token_hex(4)}", name="Nope")), PERMISSION_DENIED, "MISSING_PERMISSION")
    assert got.metadata["permission"] == "tenants:admin"
    # …and cannot grant itself tenants:admin through a custom role.
    await expect_failure(tenant.admin.access.CreateRole(access_pb2.CreateRoleRequest(
        name="sneaky", permissions=["tenants:admin"])), grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_PERMISSION")
