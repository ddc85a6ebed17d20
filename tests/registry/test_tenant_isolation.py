"""Tenant isolation over gRPC (SPEC §5): a caller never sees or changes another tenant's data.

Two ordinary tenants, A and B, each with a full set of registry rows. A's admin key gets
NOT_FOUND (never PERMISSION_DENIED, never B's data) for every read of B's ids, none of A's lists
contain B's rows, and every mutation that names one of B's ids is NOT_FOUND and leaves B
exactly as it was, as B's own admin sees it."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from arm.registry.v1 import access_pb2, agents_pb2, compat_pb2, tenancy_pb2
from arm_client import ArmClient
from tests.conftest import RegistryServer, TenantContext, make_tenant
from tests.helpers import approved_version, expect_failure, genome

NOT_FOUND = grpc.StatusCode.NOT_FOUND


@dataclass
class World:
    """One tenant with a row of every registry kind, created by its admin."""

    ctx: TenantContext
    project: tenancy_pb2.Project
    environment: tenancy_pb2.Environment
    template: agents_pb2.AgentTemplate
    version: agents_pb2.AgentVersion
    instance: agents_pb2.AgentInstance
    identity: agents_pb2.AgentIdentity
    operator: access_pb2.Operator
    operator_key_id: str
    role: access_pb2.Role
    assignment: access_pb2.RoleAssignment
    admin_key_id: str
    legacy_id: str

    @property
    def admin(self) -> ArmClient:
        return self.ctx.admin

    @property
    def tenant_id(self) -> str:
        return self.ctx.tenant.id


async def build_world(ctx: TenantContext) -> World:
    admin = ctx.admin
    agents = await approved_version(admin)
    legacy_id = f"mc-{secrets.token_hex(4)}"
    instance = (await admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="worker",
        legacy_agent_id=legacy_id))).agent_instance
    identity = (await admin.agents.UpsertAgentIdentity(agents_pb2.UpsertAgentIdentityRequest(
        agent_identity=agents_pb2.AgentIdentity(
            name=f"ident-{secrets.token_hex(4)}", soul_content="be helpful", tools_notes="none",
            template_id=agents.template.id, instance_id=instance.id,
            legacy_agent_id=legacy_id)))).agent_identity
    operator = (await admin.access.CreateOperator(access_pb2.CreateOperatorRequest(
        email=f"op-{secrets.token_hex(4)}@example.com", name="Operator"))).operator
    operator_key = (await admin.access.CreateApiKey(access_pb2.CreateApiKeyRequest(
        operator_id=operator.id, display_name="ops"))).api_key
    role = (await admin.access.CreateRole(access_pb2.CreateRoleRequest(
        name=f"readers-{secrets.token_hex(3)}", permissions=["registry:read"]))).role
    assignment = (await admin.access.CreateRoleAssignment(access_pb2.CreateRoleAssignmentRequest(
        operator_id=operator.id, role_id=role.id))).role_assignment
    principal = (await admin.access.Authenticate(access_pb2.AuthenticateRequest())).principal
    return World(ctx, agents.project, agents.environment, agents.template, agents.version,
                 instance, identity, operator, operator_key.id, role, assignment,
                 principal.api_key_id, legacy_id)


@pytest.fixture(scope="module")
async def worlds(registry: RegistryServer, system_admin: ArmClient) -> AsyncIterator[tuple[World, World]]:
    """Two ordinary (non-system) tenants A and B, fully populated, shared by this module."""
    a_ctx = await make_tenant(registry, system_admin)
    b_ctx = await make_tenant(registry, system_admin)
    assert not a_ctx.tenant.system and not b_ctx.tenant.system
    a, b = await build_world(a_ctx), await build_world(b_ctx)
    yield a, b
    await a_ctx.admin.close()
    await b_ctx.admin.close()


# --- reads -----------------------------------------------------------------------------------

Call = Callable[[ArmClient, World], Any]

# (name, call made with a client against world B's ids, reason A must get)
READS: list[tuple[str, Call, str]] = [
    ("GetTenant", lambda c, w: c.tenancy.GetTenant(tenancy_pb2.GetTenantRequest(id=w.tenant_id)),
     "TENANT_NOT_FOUND"),
    ("GetEnvironment", lambda c, w: c.tenancy.GetEnvironment(
        tenancy_pb2.GetEnvironmentRequest(id=w.environment.id)), "ENVIRONMENT_NOT_FOUND"),
    ("GetProject", lambda c, w: c.tenancy.GetProject(tenancy_pb2.GetProjectRequest(id=w.project.id)),
     "PROJECT_NOT_FOUND"),
    ("GetOperator", lambda c, w: c.access.GetOperator(access_pb2.GetOperatorRequest(id=w.operator.id)),
     "OPERATOR_NOT_FOUND"),
    ("GetOperator(admin)", lambda c, w: c.access.GetOperator(
        access_pb2.GetOperatorRequest(id=w.ctx.admin_operator_id)), "OPERATOR_NOT_FOUND"),
    ("GetRole", lambda c, w: c.access.GetRole(access_pb2.GetRoleRequest(id=w.role.id)),
     "ROLE_NOT_FOUND"),
    ("GetAgentTemplate", lambda c, w: c.agents.GetAgentTemplate(
        agents_pb2.GetAgentTemplateRequest(id=w.template.id)), "AGENT_TEMPLATE_NOT_FOUND"),
    ("GetAgentVersion", lambda c, w: c.agents.GetAgentVersion(
        agents_pb2.GetAgentVersionRequest(id=w.version.id)), "AGENT_VERSION_NOT_FOUND"),
    ("GetAgentInstance", lambda c, w: c.agents.GetAgentInstance(
        agents_pb2.GetAgentInstanceRequest(id=w.instance.id)), "AGENT_INSTANCE_NOT_FOUND"),
    ("GetAgentIdentity", lambda c, w: c.agents.GetAgentIdentity(
        agents_pb2.GetAgentIdentityRequest(id=w.identity.id)), "AGENT_IDENTITY_NOT_FOUND"),
    ("ResolveAgentRef(instance_id)", lambda c, w: c.compat.ResolveAgentRef(
        compat_pb2.ResolveAgentRefRequest(instance_id=w.instance.id)), "AGENT_NOT_FOUND"),
    ("ResolveAgentRef(legacy_agent_id)", lambda c, w: c.compat.ResolveAgentRef(
        compat_pb2.ResolveAgentRefRequest(legacy_agent_id=w.legacy_id)), "AGENT_NOT_FOUND"),
    ("ResolveAgentRef(agent_ref=instance)", lambda c, w: c.compat.ResolveAgentRef(
        compat_pb2.ResolveAgentRefRequest(agent_ref=w.instance.id)), "AGENT_NOT_FOUND"),
    ("ResolveAgentRef(agent_ref=legacy)", lambda c, w: c.compat.ResolveAgentRef(
        compat_pb2.ResolveAgentRefRequest(agent_ref=w.legacy_id)), "AGENT_NOT_FOUND"),
    ("GetAgentByLegacyId", lambda c, w: c.compat.GetAgentByLegacyId(
        compat_pb2.GetAgentByLegacyIdRequest(legacy_agent_id=w.legacy_id)), "AGENT_NOT_FOUND"),
]


@pytest.mark.parametrize(("name", "call", "reason"), READS, ids=[r[0] for r in READS])
async def test_read_of_another_tenants_resource_is_not_found(
        worlds: tuple[World, World], name: str, call: Call, reason: str) -> None:
    a, b = worlds
    # The id is real: B's own admin reads it.
    assert (await call(b.admin, b)).ByteSize() > 0
    got = await expect_failure(call(a.admin, b), NOT_FOUND, reason)
    assert b.tenant_id not in got.message or name == "GetTenant"


async def test_own_reads_still_work_for_each_tenant(worlds: tuple[World, World]) -> None:
    """Control for the table above: the same calls succeed for a tenant's own rows."""
    for w in worlds:
        for name, call, _ in READS:
            resp = await call(w.admin, w)
            assert resp.ByteSize() > 0, name
        resolved = (await w.admin.compat.ResolveAgentRef(
            compat_pb2.ResolveAgentRefRequest(legacy_agent_id=w.legacy_id))).agent
        assert (resolved.tenant_id, resolved.instance_id) == (w.tenant_id, w.instance.id)


# --- lists -----------------------------------------------------------------------------------

ListCase = tuple[str, Callable[[ArmClient], Any], Callable[[World], Any], str]

# (name, method, request built from the world whose ids filter it, repeated field)
LISTS_UNFILTERED: list[ListCase] = [
    ("ListTenants", lambda c: c.tenancy.ListTenants, lambda w: tenancy_pb2.ListTenantsRequest(),
     "tenants"),
    ("ListEnvironments", lambda c: c.tenancy.ListEnvironments,
     lambda w: tenancy_pb2.ListEnvironmentsRequest(), "environments"),
    ("ListProjects", lambda c: c.tenancy.ListProjects, lambda w: tenancy_pb2.ListProjectsRequest(),
     "projects"),
    ("ListOperators", lambda c: c.access.ListOperators, lambda w: access_pb2.ListOperatorsRequest(),
     "operators"),
    ("ListRoles", lambda c: c.access.ListRoles, lambda w: access_pb2.ListRolesRequest(), "roles"),
    ("ListRoleAssignments", lambda c: c.access.ListRoleAssignments,
     lambda w: access_pb2.ListRoleAssignmentsRequest(), "role_assignments"),
    ("ListApiKeys", lambda c: c.access.ListApiKeys, lambda w: access_pb2.ListApiKeysRequest(),
     "api_keys"),
    ("ListAgentTemplates", lambda c: c.agents.ListAgentTemplates,
     lambda w: agents_pb2.ListAgentTemplatesRequest(), "agent_templates"),
    ("ListAgentVersions", lambda c: c.agents.ListAgentVersions,
     lambda w: agents_pb2.ListAgentVersionsRequest(), "agent_versions"),
    ("ListAgentInstances", lambda c: c.agents.ListAgentInstances,
     lambda w: agents_pb2.ListAgentInstancesRequest(), "agent_instances"),
    ("ListAgentIdentities", lambda c: c.agents.ListAgentIdentities,
     lambda w: agents_pb2.ListAgentIdentitiesRequest(), "agent_identities"),
]

# Lists filtered by one of B's ids: B sees rows, A gets NOT_FOUND (or, for a search, nothing).
LISTS_FILTERED_BY_B: list[ListCase] = [
    ("ListRoleAssignments(operator_id)", lambda c: c.access.ListRoleAssignments,
     lambda w: access_pb2.ListRoleAssignmentsRequest(operator_id=w.operator.id), "role_assignments"),
    ("ListApiKeys(operator_id)", lambda c: c.access.ListApiKeys,
     lambda w: access_pb2.ListApiKeysRequest(operator_id=w.operator.id), "api_keys"),
    ("ListAgentTemplates(project_id)", lambda c: c.agents.ListAgentTemplates,
     lambda w: agents_pb2.ListAgentTemplatesRequest(project_id=w.project.id), "agent_templates"),
    ("ListAgentVersions(template_id)", lambda c: c.agents.ListAgentVersions,
     lambda w: agents_pb2.ListAgentVersionsRequest(template_id=w.template.id), "agent_versions"),
    ("ListAgentInstances(version_id)", lambda c: c.agents.ListAgentInstances,
     lambda w: agents_pb2.ListAgentInstancesRequest(version_id=w.version.id), "agent_instances"),
    ("ListAgentInstances(environment_id)", lambda c: c.agents.ListAgentInstances,
     lambda w: agents_pb2.ListAgentInstancesRequest(environment_id=w.environment.id),
     "agent_instances"),
    ("ListAgentInstances(project_id)", lambda c: c.agents.ListAgentInstances,
     lambda w: agents_pb2.ListAgentInstancesRequest(project_id=w.project.id), "agent_instances"),
    ("ListAgentInstances(agent_ref=instance)", lambda c: c.agents.ListAgentInstances,
     lambda w: agents_pb2.ListAgentInstancesRequest(agent_ref=w.instance.id), "agent_instances"),
    ("ListAgentInstances(agent_ref=legacy)", lambda c: c.agents.ListAgentInstances,
     lambda w: agents_pb2.ListAgentInstancesRequest(agent_ref=w.legacy_id), "agent_instances"),
    ("ListAgentIdentities(template_id)", lambda c: c.agents.ListAgentIdentities,
     lambda w: agents_pb2.ListAgentIdentitiesRequest(template_id=w.template.id), "agent_identities"),
]


async def list_all(method: Any, req: Any, field: str) -> list[Any]:
    """Every row of a list, following next_page_token (small pages, to cross page borders)."""
    rows: list[Any] = []
    req.page_size = 2
    for _ in range(1000):
        resp = await method(req)
        rows.extend(getattr(resp, field))
        if not resp.next_page_token:
            return rows
        req.page_token = resp.next_page_token
    raise AssertionError("pagination did not end")


def row_tenant(row: Any) -> str:
    return row.id if isinstance(row, tenancy_pb2.Tenant) else row.tenant_id


@pytest.mark.parametrize(("name", "method", "build", "field"), LISTS_UNFILTERED,
                         ids=[c[0] for c in LISTS_UNFILTERED])
async def test_list_never_contains_another_tenants_rows(
        worlds: tuple[World, World], name: str, method: Any, build: Any, field: str) -> None:
    a, b = worlds
    rows_a = await list_all(method(a.admin), build(a), field)
    rows_b = await list_all(method(b.admin), build(b), field)
    assert rows_a and rows_b, f"{name}: each tenant has rows of its own"
    assert {row_tenant(r) for r in rows_a} == {a.tenant_id}
    assert {row_tenant(r) for r in rows_b} == {b.tenant_id}
    assert not {r.id for r in rows_a} & {r.id for r in rows_b}


@pytest.mark.parametrize(("name", "method", "build", "field"), LISTS_FILTERED_BY_B,
                         ids=[c[0] for c in LISTS_FILTERED_BY_B])
async def test_list_filtered_by_another_tenants_id_is_not_found(
        worlds: tuple[World, World], name: str, method: Any, build: Any, field: str) -> None:
    """A filter naming a resource is a reference like any other: B's id is NOT_FOUND for A. An
    agent_ref is a search (a legacy id is only unique within a tenant): it finds nothing."""
    a, b = worlds
    rows_b = await list_all(method(b.admin), build(b), field)
    assert rows_b and {row_tenant(r) for r in rows_b} == {b.tenant_id}
    if "agent_ref" in name:
        assert await list_all(method(a.admin), build(b), field) == []
    else:
        await expect_failure(method(a.admin)(build(b)), NOT_FOUND)


# --- mutations -------------------------------------------------------------------------------

async def snapshot(w: World) -> dict[str, Any]:
    """Everything B's admin can see of B, as plain data, for before/after comparison."""
    c = w.admin
    out: dict[str, Any] = {}

    def put(name: str, message: Any) -> None:
        out[name] = json_format.MessageToDict(message)

    put("tenant", (await c.tenancy.GetTenant(tenancy_pb2.GetTenantRequest(id=w.tenant_id))).tenant)
    put("project", (await c.tenancy.GetProject(tenancy_pb2.GetProjectRequest(id=w.project.id))).project)
    put("environment", (await c.tenancy.GetEnvironment(
        tenancy_pb2.GetEnvironmentRequest(id=w.environment.id))).environment)
    put("template", (await c.agents.GetAgentTemplate(
        agents_pb2.GetAgentTemplateRequest(id=w.template.id))).agent_template)
    put("version", (await c.agents.GetAgentVersion(
        agents_pb2.GetAgentVersionRequest(id=w.version.id))).agent_version)
    put("instance", (await c.agents.GetAgentInstance(
        agents_pb2.GetAgentInstanceRequest(id=w.instance.id))).agent_instance)
    put("identity", (await c.agents.GetAgentIdentity(
        agents_pb2.GetAgentIdentityRequest(id=w.identity.id))).agent_identity)
    put("operator", (await c.access.GetOperator(
        access_pb2.GetOperatorRequest(id=w.operator.id))).operator)
    for name, method, build, field in LISTS_UNFILTERED:
        out[name] = [json_format.MessageToDict(r) for r in await list_all(method(c), build(w), field)]
    principal = (await c.access.Authenticate(access_pb2.AuthenticateRequest())).principal
    out["principal"] = (principal.actor.id, principal.api_key_id,
                        sorted((g.permission, g.scope_type, g.scope_id) for g in principal.grants))
    return out


Mutation = Callable[[ArmClient, World, World], Any]
# (name, call made by A's admin (a: A's world, b: B's world), reason)
MUTATIONS: list[tuple[str, Mutation, str]] = [
    ("UpdateTenant", lambda c, a, b: c.tenancy.UpdateTenant(tenancy_pb2.UpdateTenantRequest(
        id=b.tenant_id, name="hijacked")), "TENANT_NOT_FOUND"),
    ("UpdateEnvironment", lambda c, a, b: c.tenancy.UpdateEnvironment(
        tenancy_pb2.UpdateEnvironmentRequest(id=b.environment.id, name="hijacked")),
     "ENVIRONMENT_NOT_FOUND"),
    ("UpdateProject", lambda c, a, b: c.tenancy.UpdateProject(tenancy_pb2.UpdateProjectRequest(
        id=b.project.id, name="hijacked", description="hijacked")), "PROJECT_NOT_FOUND"),
    ("UpdateOperator", lambda c, a, b: c.access.UpdateOperator(access_pb2.UpdateOperatorRequest(
        id=b.operator.id, active=False)), "OPERATOR_NOT_FOUND"),
    ("CreateApiKey(operator_id)", lambda c, a, b: c.access.CreateApiKey(access_pb2.CreateApiKeyRequest(
        operator_id=b.operator.id)), "OPERATOR_NOT_FOUND"),
    ("CreateApiKey(admin operator_id)", lambda c, a, b: c.access.CreateApiKey(
        access_pb2.CreateApiKeyRequest(operator_id=b.ctx.admin_operator_id)), "OPERATOR_NOT_FOUND"),
    ("CreateApiKey(instance_id)", lambda c, a, b: c.access.CreateApiKey(access_pb2.CreateApiKeyRequest(
        instance_id=b.instance.id)), "AGENT_INSTANCE_NOT_FOUND"),
    ("RevokeApiKey", lambda c, a, b: c.access.RevokeApiKey(access_pb2.RevokeApiKeyRequest(
        id=b.admin_key_id)), "API_KEY_NOT_FOUND"),
    ("CreateRoleAssignment(role of B)", lambda c, a, b: c.access.CreateRoleAssignment(
        access_pb2.CreateRoleAssignmentRequest(operator_id=a.operator.id, role_id=b.role.id)),
     "ROLE_NOT_FOUND"),
    ("CreateRoleAssignment(operator of B)", lambda c, a, b: c.access.CreateRoleAssignment(
        access_pb2.CreateRoleAssignmentRequest(operator_id=b.operator.id, role_id=a.role.id)),
     "OPERATOR_NOT_FOUND"),
    ("CreateRoleAssignment(project scope of B)", lambda c, a, b: c.access.CreateRoleAssignment(
        access_pb2.CreateRoleAssignmentRequest(
            operator_id=a.operator.id, role_id=a.role.id,
            scope_type=access_pb2.ROLE_SCOPE_TYPE_PROJECT, scope_id=b.project.id)),
     "PROJECT_NOT_FOUND"),
    ("DeleteRoleAssignment", lambda c, a, b: c.access.DeleteRoleAssignment(
        access_pb2.DeleteRoleAssignmentRequest(id=b.assignment.id)), "ROLE_ASSIGNMENT_NOT_FOUND"),
    ("CreateAgentTemplate", lambda c, a, b: c.agents.CreateAgentTemplate(
        agents_pb2.CreateAgentTemplateRequest(project_id=b.project.id,
                                              slug=f"x-{secrets.token_hex(3)}", name="x")),
     "PROJECT_NOT_FOUND"),
    ("UpdateAgentTemplate", lambda c, a, b: c.agents.UpdateAgentTemplate(
        agents_pb2.UpdateAgentTemplateRequest(id=b.template.id, name="hijacked", active=False)),
     "AGENT_TEMPLATE_NOT_FOUND"),
    ("CreateAgentVersion", lambda c, a, b: c.agents.CreateAgentVersion(
        agents_pb2.CreateAgentVersionRequest(template_id=b.template.id, genome=genome())),
     "AGENT_TEMPLATE_NOT_FOUND"),
    ("CreateAgentVersion(parent of B)", lambda c, a, b: c.agents.CreateAgentVersion(
        agents_pb2.CreateAgentVersionRequest(template_id=a.template.id, genome=genome(),
                                             parent_version_id=b.version.id)),
     "AGENT_VERSION_NOT_FOUND"),
    ("TransitionAgentVersion", lambda c, a, b: c.agents.TransitionAgentVersion(
        agents_pb2.TransitionAgentVersionRequest(id=b.version.id, to_state=agents_pb2.VERSION_STATE_DEPRECATED)),
     "AGENT_VERSION_NOT_FOUND"),
    ("RecordEvaluation", lambda c, a, b: c.agents.RecordEvaluation(agents_pb2.RecordEvaluationRequest(
        id=b.version.id, eval_status=agents_pb2.EVAL_STATUS_FAIL)), "AGENT_VERSION_NOT_FOUND"),
    ("CreateAgentInstance(version of B)", lambda c, a, b: c.agents.CreateAgentInstance(
        agents_pb2.CreateAgentInstanceRequest(version_id=b.version.id,
                                              environment_id=a.environment.id, name="x")),
     "AGENT_VERSION_NOT_FOUND"),
    ("CreateAgentInstance(environment of B)", lambda c, a, b: c.agents.CreateAgentInstance(
        agents_pb2.CreateAgentInstanceRequest(version_id=a.version.id,
                                              environment_id=b.environment.id, name="x")),
     "ENVIRONMENT_NOT_FOUND"),
    ("TransitionAgentInstance", lambda c, a, b: c.agents.TransitionAgentInstance(
        agents_pb2.TransitionAgentInstanceRequest(id=b.instance.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE)),
     "AGENT_INSTANCE_NOT_FOUND"),
    ("RecordHeartbeat", lambda c, a, b: c.agents.RecordHeartbeat(agents_pb2.RecordHeartbeatRequest(
        id=b.instance.id)), "AGENT_INSTANCE_NOT_FOUND"),
    ("UpsertAgentIdentity(template of B)", lambda c, a, b: c.agents.UpsertAgentIdentity(
        agents_pb2.UpsertAgentIdentityRequest(agent_identity=agents_pb2.AgentIdentity(
            name=f"x-{secrets.token_hex(3)}", template_id=b.template.id))),
     "AGENT_TEMPLATE_NOT_FOUND"),
    ("UpsertAgentIdentity(instance of B)", lambda c, a, b: c.agents.UpsertAgentIdentity(
        agents_pb2.UpsertAgentIdentityRequest(agent_identity=agents_pb2.AgentIdentity(
            name=f"x-{secrets.token_hex(3)}", instance_id=b.instance.id))),
     "AGENT_INSTANCE_NOT_FOUND"),
    ("EnsureInstanceForLegacyAgent(project of B)", lambda c, a, b: c.compat.EnsureInstanceForLegacyAgent(
        compat_pb2.EnsureInstanceForLegacyAgentRequest(legacy_agent_id=f"mc-{secrets.token_hex(4)}",
                                                       project_id=b.project.id,
                                                       environment_id=a.environment.id)),
     "PROJECT_NOT_FOUND"),
    ("EnsureInstanceForLegacyAgent(environment of B)", lambda c, a, b: c.compat.EnsureInstanceForLegacyAgent(
        compat_pb2.EnsureInstanceForLegacyAgentRequest(legacy_agent_id=f"mc-{secrets.token_hex(4)}",
                                                       project_id=a.project.id,
                                                       environment_id=b.environment.id)),
     "ENVIRONMENT_NOT_FOUND"),
    ("RebindAgentInstances(template of B)", lambda c, a, b: c.agents.RebindAgentInstances(
        agents_pb2.RebindAgentInstancesRequest(template_id=b.template.id, environment_id=a.environment.id,
                                               version_id=a.version.id, reason="x")),
     "AGENT_TEMPLATE_NOT_FOUND"),
    ("RebindAgentInstances(version of B)", lambda c, a, b: c.agents.RebindAgentInstances(
        agents_pb2.RebindAgentInstancesRequest(template_id=a.template.id, environment_id=a.environment.id,
                                               version_id=b.version.id, reason="x")),
     "AGENT_VERSION_NOT_FOUND"),
    ("RebindAgentInstances(environment of B)", lambda c, a, b: c.agents.RebindAgentInstances(
        agents_pb2.RebindAgentInstancesRequest(template_id=a.template.id, environment_id=b.environment.id,
                                               version_id=a.version.id, reason="x")),
     "ENVIRONMENT_NOT_FOUND"),
]


@pytest.mark.parametrize(("name", "call", "reason"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
async def test_mutation_naming_another_tenants_id_is_not_found_and_changes_nothing(
        worlds: tuple[World, World], name: str, call: Mutation, reason: str) -> None:
    a, b = worlds
    before_b, before_a = await snapshot(b), await snapshot(a)
    await expect_failure(call(a.admin, a, b), NOT_FOUND, reason)
    assert await snapshot(b) == before_b
    assert await snapshot(a) == before_a  # nothing half-written on A's side either


async def test_same_request_id_in_two_tenants_is_two_separate_writes(worlds: tuple[World, World]) -> None:
    """Idempotency keys are per tenant: B replaying A's request_id gets B's own new project,
    never A's stored response."""
    a, b = worlds
    rid = f"rid-{secrets.token_hex(4)}"
    slug = f"same-{secrets.token_hex(3)}"
    pa = (await a.admin.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
        request_id=rid, slug=slug, name="Same"))).project
    pb = (await b.admin.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
        request_id=rid, slug=slug, name="Same"))).project
    assert pa.id != pb.id
    assert (pa.tenant_id, pb.tenant_id) == (a.tenant_id, b.tenant_id)
    got = (await b.admin.tenancy.GetProject(tenancy_pb2.GetProjectRequest(id=pb.id))).project
    assert got.tenant_id == b.tenant_id
    await expect_failure(a.admin.tenancy.GetProject(tenancy_pb2.GetProjectRequest(id=pb.id)),
                         NOT_FOUND, "PROJECT_NOT_FOUND")
