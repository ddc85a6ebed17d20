"""Input validation, idempotent writes, unique constraints, etags and pagination over gRPC
(SPEC §5): bad input is INVALID_ARGUMENT with `BadRequest` field violations naming the field,
never a crash; writes replay by request_id; updates check etags; lists paginate with opaque
tokens."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, timestamp_pb2

from arm.registry.v1 import access_pb2, agents_pb2, compat_pb2, tenancy_pb2
from arm_client import ArmClient
from tests.conftest import RegistryServer, TenantContext, make_tenant
from tests.helpers import approved_version, expect_failure, genome

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass
class World:
    """A tenant with a row of each kind the bad requests point at."""

    ctx: TenantContext
    system: ArmClient
    project: tenancy_pb2.Project
    environment: tenancy_pb2.Environment
    template: agents_pb2.AgentTemplate
    version: agents_pb2.AgentVersion
    instance: agents_pb2.AgentInstance
    role_id: str

    @property
    def admin(self) -> ArmClient:
        return self.ctx.admin


@pytest.fixture(scope="module")
async def world(registry: RegistryServer, system_admin: ArmClient) -> AsyncIterator[World]:
    ctx = await make_tenant(registry, system_admin)
    agents = await approved_version(ctx.admin)
    await ctx.admin.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(slug="second", name="Second"))
    instance = (await ctx.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="w"))).agent_instance
    roles = (await ctx.admin.access.ListRoles(access_pb2.ListRolesRequest())).roles
    yield World(ctx, system_admin, agents.project, agents.environment, agents.template,
                agents.version, instance, next(r.id for r in roles if r.name == "auditor"))
    await ctx.admin.close()


def bad_genome(*, drop: tuple[str, ...] = (), **overrides: Any) -> Any:
    """A genome (snake_case) with a nested field removed, e.g. drop=("model_config", "provider")."""
    value = json_format.MessageToDict(genome(**overrides))
    if drop:
        parent = value
        for key in drop[:-1]:
            parent = parent[key]
        del parent[drop[-1]]
    out = genome()
    out.Clear()
    out.update(value)
    return out


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


Call = Callable[[World], Any]
T, A, G, C = tenancy_pb2, access_pb2, agents_pb2, compat_pb2

# (case, call, violated fields exactly, reason)
CASES: list[Any] = [
    ("CreateProject slug missing", lambda w: w.admin.tenancy.CreateProject(T.CreateProjectRequest(
        name="x")), {"slug"}, "INVALID_FIELDS"),
    ("CreateProject slug malformed", lambda w: w.admin.tenancy.CreateProject(T.CreateProjectRequest(
        slug="Bad Slug!", name="x")), {"slug"}, "INVALID_FIELDS"),
    ("CreateProject slug too short", lambda w: w.admin.tenancy.CreateProject(T.CreateProjectRequest(
        slug="a", name="x")), {"slug"}, "INVALID_FIELDS"),
    ("CreateProject slug too long", lambda w: w.admin.tenancy.CreateProject(T.CreateProjectRequest(
        slug="a" * 64, name="x")), {"slug"}, "INVALID_FIELDS"),
    ("CreateProject name missing", lambda w: w.admin.tenancy.CreateProject(T.CreateProjectRequest(
        slug="ok-slug")), {"name"}, "INVALID_FIELDS"),
    ("CreateProject name blank", lambda w: w.admin.tenancy.CreateProject(T.CreateProjectRequest(
        slug="ok-slug", name="   ")), {"name"}, "INVALID_FIELDS"),
    ("CreateProject name 10000 chars", lambda w: w.admin.tenancy.CreateProject(T.CreateProjectRequest(
        slug="ok-slug", name="n" * 10_000)), {"name"}, "INVALID_FIELDS"),
    ("CreateProject description too long", lambda w: w.admin.tenancy.CreateProject(
        T.CreateProjectRequest(slug="ok-slug", name="x", description="d" * 10_001)),
     {"description"}, "INVALID_FIELDS"),
    ("CreateProject request_id 500 chars", lambda w: w.admin.tenancy.CreateProject(
        T.CreateProjectRequest(slug="ok-slug", name="x", request_id="r" * 500)),
     {"request_id"}, "INVALID_FIELDS"),
    ("CreateProject all fields bad at once", lambda w: w.admin.tenancy.CreateProject(
        T.CreateProjectRequest(slug="Bad Slug!", name="", request_id="r" * 500)),
     {"slug", "name", "request_id"}, "INVALID_FIELDS"),
    pytest.param("CreateProject name with NUL", lambda w: w.admin.tenancy.CreateProject(
        T.CreateProjectRequest(slug=f"nul-{secrets.token_hex(3)}", name="a\x00b")),
        {"name"}, "INVALID_FIELDS", id="CreateProject name with NUL"),
    ("CreateEnvironment type unspecified", lambda w: w.admin.tenancy.CreateEnvironment(
        T.CreateEnvironmentRequest(name="e")), {"type"}, "INVALID_FIELDS"),
    ("CreateEnvironment type 99", lambda w: w.admin.tenancy.CreateEnvironment(
        T.CreateEnvironmentRequest(name="e", type=99)), {"type"}, "INVALID_FIELDS"),
    ("CreateEnvironment name missing", lambda w: w.admin.tenancy.CreateEnvironment(
        T.CreateEnvironmentRequest(type=T.ENVIRONMENT_TYPE_DEV)), {"name"}, "INVALID_FIELDS"),
    ("UpdateProject etag too long", lambda w: w.admin.tenancy.UpdateProject(T.UpdateProjectRequest(
        id=w.project.id, name="x", etag="e" * 65)), {"etag"}, "INVALID_FIELDS"),
    ("UpdateProject empty name", lambda w: w.admin.tenancy.UpdateProject(T.UpdateProjectRequest(
        id=w.project.id, name="")), {"name"}, "INVALID_FIELDS"),
    ("GetProject id missing", lambda w: w.admin.tenancy.GetProject(T.GetProjectRequest()),
     {"id"}, "INVALID_FIELDS"),
    ("GetProject id too long", lambda w: w.admin.tenancy.GetProject(T.GetProjectRequest(id="p" * 101)),
     {"id"}, "INVALID_FIELDS"),
    ("GetProject id unprintable", lambda w: w.admin.tenancy.GetProject(T.GetProjectRequest(id="p\x00\n")),
     {"id"}, "INVALID_FIELDS"),
    ("CreateTenant slug malformed", lambda w: w.system.tenancy.CreateTenant(T.CreateTenantRequest(
        slug="Bad Slug!", name="x")), {"slug"}, "INVALID_FIELDS"),
    ("CreateTenant admin email malformed", lambda w: w.system.tenancy.CreateTenant(
        T.CreateTenantRequest(slug=f"t-{secrets.token_hex(4)}", name="x", admin_email="nope",
                              admin_name="Admin")), {"admin_email"}, "INVALID_FIELDS"),
    ("CreateOperator email malformed", lambda w: w.admin.access.CreateOperator(
        A.CreateOperatorRequest(email="nope", name="x")), {"email"}, "INVALID_FIELDS"),
    ("CreateOperator email missing", lambda w: w.admin.access.CreateOperator(
        A.CreateOperatorRequest(name="x")), {"email"}, "INVALID_FIELDS"),
    ("CreateOperator email too long", lambda w: w.admin.access.CreateOperator(
        A.CreateOperatorRequest(email="a" * 300 + "@example.com", name="x")), {"email"}, "INVALID_FIELDS"),
    ("CreateRole unknown permission", lambda w: w.admin.access.CreateRole(A.CreateRoleRequest(
        name="r", permissions=["registry:read", "nope:nope"])), {"permissions[1]"}, "UNKNOWN_PERMISSION"),
    ("CreateRoleAssignment scope type 99", lambda w: w.admin.access.CreateRoleAssignment(
        A.CreateRoleAssignmentRequest(operator_id=w.ctx.admin_operator_id, role_id=w.role_id,
                                      scope_type=99)), {"scope_type"}, "INVALID_FIELDS"),
    ("CreateRoleAssignment project scope without id", lambda w: w.admin.access.CreateRoleAssignment(
        A.CreateRoleAssignmentRequest(operator_id=w.ctx.admin_operator_id, role_id=w.role_id,
                                      scope_type=A.ROLE_SCOPE_TYPE_PROJECT)), {"scope_id"}, "INVALID_FIELDS"),
    ("CreateApiKey neither operator nor instance", lambda w: w.admin.access.CreateApiKey(
        A.CreateApiKeyRequest()), {"operator_id"}, "INVALID_FIELDS"),
    ("CreateApiKey both operator and instance", lambda w: w.admin.access.CreateApiKey(
        A.CreateApiKeyRequest(operator_id=w.ctx.admin_operator_id, instance_id=w.instance.id)),
     {"operator_id"}, "INVALID_FIELDS"),
    ("CreateAgentTemplate project missing", lambda w: w.admin.agents.CreateAgentTemplate(
        G.CreateAgentTemplateRequest(slug="tpl-x", name="x")), {"project_id"}, "INVALID_FIELDS"),
    ("CreateAgentTemplate empty tag", lambda w: w.admin.agents.CreateAgentTemplate(
        G.CreateAgentTemplateRequest(project_id=w.project.id, slug="tpl-x", name="x", tags=["ok", ""])),
     {"tags[1]"}, "INVALID_FIELDS"),
    ("CreateAgentTemplate too many owners", lambda w: w.admin.agents.CreateAgentTemplate(
        G.CreateAgentTemplateRequest(project_id=w.project.id, slug="tpl-x", name="x",
                                     owners=[f"o{i}" for i in range(101)])), {"owners"}, "INVALID_FIELDS"),
    ("CreateAgentVersion genome missing", lambda w: w.admin.agents.CreateAgentVersion(
        G.CreateAgentVersionRequest(template_id=w.template.id)), {"genome"}, "INVALID_FIELDS"),
    ("CreateAgentVersion template missing", lambda w: w.admin.agents.CreateAgentVersion(
        G.CreateAgentVersionRequest(genome=genome())), {"template_id"}, "INVALID_FIELDS"),
    ("genome without model_config.provider", lambda w: w.admin.agents.CreateAgentVersion(
        G.CreateAgentVersionRequest(template_id=w.template.id,
                                    genome=bad_genome(drop=("model_config", "provider")))),
     {"genome.model_config.provider"}, "INVALID_FIELDS"),
    ("genome without model_config", lambda w: w.admin.agents.CreateAgentVersion(
        G.CreateAgentVersionRequest(template_id=w.template.id, genome=bad_genome(drop=("model_config",)))),
     {"genome.model_config"}, "INVALID_FIELDS"),
    ("genome without provenance.source", lambda w: w.admin.agents.CreateAgentVersion(
        G.CreateAgentVersionRequest(template_id=w.template.id,
                                    genome=bad_genome(drop=("provenance", "source")))),
     {"genome.provenance.source"}, "INVALID_FIELDS"),
    ("genome temperature out of range", lambda w: w.admin.agents.CreateAgentVersion(
        G.CreateAgentVersionRequest(template_id=w.template.id, genome=bad_genome(model_config={
            "provider": "openai", "model_id": "m", "temperature": 5}))),
     {"genome.model_config.temperature"}, "INVALID_FIELDS"),
    ("genome max_tokens negative", lambda w: w.admin.agents.CreateAgentVersion(
        G.CreateAgentVersionRequest(template_id=w.template.id, genome=bad_genome(model_config={
            "provider": "openai", "model_id": "m", "max_tokens": -1}))),
     {"genome.model_config.max_tokens"}, "INVALID_FIELDS"),
    ("genome field given twice", lambda w: w.admin.agents.CreateAgentVersion(
        G.CreateAgentVersionRequest(template_id=w.template.id, genome=bad_genome(
            modelConfig={"provider": "openai", "modelId": "m"}))),
     {"genome.model_config"}, "INVALID_FIELDS"),
    ("TransitionAgentVersion to_state unspecified", lambda w: w.admin.agents.TransitionAgentVersion(
        G.TransitionAgentVersionRequest(id=w.version.id)), {"to_state"}, "INVALID_FIELDS"),
    ("TransitionAgentVersion reason too long", lambda w: w.admin.agents.TransitionAgentVersion(
        G.TransitionAgentVersionRequest(id=w.version.id, to_state=G.VERSION_STATE_DEPRECATED,
                                        reason="r" * 10_001)), {"reason"}, "INVALID_FIELDS"),
    ("RecordEvaluation status unspecified", lambda w: w.admin.agents.RecordEvaluation(
        G.RecordEvaluationRequest(id=w.version.id)), {"eval_status"}, "INVALID_FIELDS"),
    ("CreateAgentInstance name missing", lambda w: w.admin.agents.CreateAgentInstance(
        G.CreateAgentInstanceRequest(version_id=w.version.id, environment_id=w.environment.id)),
     {"name"}, "INVALID_FIELDS"),
    ("TransitionAgentInstance to_state unspecified", lambda w: w.admin.agents.TransitionAgentInstance(
        G.TransitionAgentInstanceRequest(id=w.instance.id)), {"to_state"}, "INVALID_FIELDS"),
    ("TransitionAgentInstance to_state 99", lambda w: w.admin.agents.TransitionAgentInstance(
        G.TransitionAgentInstanceRequest(id=w.instance.id, to_state=99)), {"to_state"}, "INVALID_FIELDS"),
    ("ListAgentVersions state 99", lambda w: w.admin.agents.ListAgentVersions(
        G.ListAgentVersionsRequest(state=99)), {"state"}, "INVALID_FIELDS"),
    ("ListAgentInstances state 99", lambda w: w.admin.agents.ListAgentInstances(
        G.ListAgentInstancesRequest(state=99)), {"state"}, "INVALID_FIELDS"),
    ("UpsertAgentIdentity soul too long", lambda w: w.admin.agents.UpsertAgentIdentity(
        G.UpsertAgentIdentityRequest(agent_identity=G.AgentIdentity(name="i", soul_content="s" * 200_001))),
     {"agent_identity.soul_content"}, "INVALID_FIELDS"),
    pytest.param("UpsertAgentIdentity name missing", lambda w: w.admin.agents.UpsertAgentIdentity(
        G.UpsertAgentIdentityRequest(agent_identity=G.AgentIdentity(soul_content="s"))),
        {"agent_identity.name"}, "INVALID_FIELDS", id="UpsertAgentIdentity name missing"),
    pytest.param("UpsertAgentIdentity tools notes too long", lambda w: w.admin.agents.UpsertAgentIdentity(
        G.UpsertAgentIdentityRequest(agent_identity=G.AgentIdentity(name="i", tools_notes="t" * 50_001))),
        {"agent_identity.tools_notes"}, "INVALID_FIELDS",
        id="UpsertAgentIdentity tools notes too long"),
    ("ResolveAgentRef no reference", lambda w: w.admin.compat.ResolveAgentRef(C.ResolveAgentRefRequest()),
     {"ref"}, "INVALID_FIELDS"),
    ("ResolveAgentRef id too long", lambda w: w.admin.compat.ResolveAgentRef(C.ResolveAgentRefRequest(
        legacy_agent_id="x" * 101)), {"legacy_agent_id"}, "INVALID_FIELDS"),
    ("EnsureInstanceForLegacyAgent legacy id missing", lambda w: w.admin.compat.EnsureInstanceForLegacyAgent(
        C.EnsureInstanceForLegacyAgentRequest(name="x")), {"legacy_agent_id"}, "INVALID_FIELDS"),
    # page sizes and tokens
    ("ListProjects negative page_size", lambda w: w.admin.tenancy.ListProjects(T.ListProjectsRequest(
        page_size=-1)), {"page_size"}, "INVALID_FIELDS"),
    ("ListTenants negative page_size", lambda w: w.admin.tenancy.ListTenants(T.ListTenantsRequest(
        page_size=-5)), {"page_size"}, "INVALID_FIELDS"),
    ("ListEnvironments negative page_size", lambda w: w.admin.tenancy.ListEnvironments(
        T.ListEnvironmentsRequest(page_size=-1)), {"page_size"}, "INVALID_FIELDS"),
    ("ListOperators negative page_size", lambda w: w.admin.access.ListOperators(
        A.ListOperatorsRequest(page_size=-1)), {"page_size"}, "INVALID_FIELDS"),
    ("ListApiKeys negative page_size", lambda w: w.admin.access.ListApiKeys(
        A.ListApiKeysRequest(page_size=-2147483648)), {"page_size"}, "INVALID_FIELDS"),
    ("ListAgentInstances negative page_size", lambda w: w.admin.agents.ListAgentInstances(
        G.ListAgentInstancesRequest(page_size=-1)), {"page_size"}, "INVALID_FIELDS"),
    ("page_token '!!!'", lambda w: w.admin.tenancy.ListProjects(T.ListProjectsRequest(page_token="!!!")),
     {"page_token"}, "INVALID_PAGE_TOKEN"),
    ("page_token base64 of garbage", lambda w: w.admin.tenancy.ListProjects(T.ListProjectsRequest(
        page_token=b64(b"\xff\xfe\x00garbage\x80"))), {"page_token"}, "INVALID_PAGE_TOKEN"),
    ("page_token base64 of a JSON list", lambda w: w.admin.tenancy.ListProjects(T.ListProjectsRequest(
        page_token=b64(b"[1,2,3]"))), {"page_token"}, "INVALID_PAGE_TOKEN"),
    ("page_token base64 of JSON without fingerprint", lambda w: w.admin.tenancy.ListProjects(
        T.ListProjectsRequest(page_token=b64(json.dumps({"k": w.project.id}).encode()))),
     {"page_token"}, "INVALID_PAGE_TOKEN"),
    ("page_token non-ASCII", lambda w: w.admin.agents.ListAgentTemplates(G.ListAgentTemplatesRequest(
        page_token="päge-tökén")), {"page_token"}, "INVALID_PAGE_TOKEN"),
    ("page_token too long", lambda w: w.admin.tenancy.ListProjects(T.ListProjectsRequest(
        page_token="A" * 1001)), {"page_token"}, "INVALID_FIELDS"),
]


def case_id(case: Any) -> str:
    return case.id if hasattr(case, "id") else case[0]


@pytest.mark.parametrize(("name", "call", "fields", "reason"), CASES, ids=[case_id(c) for c in CASES])
async def test_bad_input_is_invalid_argument_naming_the_field(
        world: World, name: str, call: Call, fields: set[str], reason: str) -> None:
    got = await expect_failure(call(world), INVALID, reason)
    assert set(got.violations) == fields, got.violations
    assert all(got.violations.values()), "every violation says what is wrong"
    assert "request_id" in got.metadata


async def snapshot(w: World) -> dict[str, Any]:
    c = w.admin
    parts = {
        "projects": (await c.tenancy.ListProjects(T.ListProjectsRequest(page_size=500))).projects,
        "environments": (await c.tenancy.ListEnvironments(T.ListEnvironmentsRequest(page_size=500))).environments,
        "operators": (await c.access.ListOperators(A.ListOperatorsRequest(page_size=500))).operators,
        "roles": (await c.access.ListRoles(A.ListRolesRequest(page_size=500))).roles,
        "assignments": (await c.access.ListRoleAssignments(A.ListRoleAssignmentsRequest(page_size=500))).role_assignments,
        "keys": (await c.access.ListApiKeys(A.ListApiKeysRequest(page_size=500))).api_keys,
        "templates": (await c.agents.ListAgentTemplates(G.ListAgentTemplatesRequest(page_size=500))).agent_templates,
        "versions": (await c.agents.ListAgentVersions(G.ListAgentVersionsRequest(page_size=500))).agent_versions,
        "instances": (await c.agents.ListAgentInstances(G.ListAgentInstancesRequest(page_size=500))).agent_instances,
        "identities": (await c.agents.ListAgentIdentities(G.ListAgentIdentitiesRequest(page_size=500))).agent_identities,
    }
    return {k: [json_format.MessageToDict(r) for r in v] for k, v in parts.items()}


async def test_server_still_serves_after_a_burst_of_bad_input(world: World) -> None:
    """All the bad requests at once: each is refused, nothing is written, and the next valid
    calls succeed."""
    plain = [c for c in CASES if not hasattr(c, "marks")]
    before = await snapshot(world)
    results = await asyncio.gather(*(call(world) for _, call, _, _ in plain), return_exceptions=True)
    for (name, _, _, _), result in zip(plain, results, strict=True):
        assert isinstance(result, grpc.aio.AioRpcError), f"{name} succeeded"
        assert result.code() == INVALID, f"{name}: {result.code()} {result.details()}"
    assert await snapshot(world) == before
    made = (await world.admin.tenancy.CreateProject(T.CreateProjectRequest(
        slug=f"after-{secrets.token_hex(3)}", name="After"))).project
    got = (await world.admin.tenancy.GetProject(T.GetProjectRequest(id=made.id))).project
    assert got == made


# --- page tokens -----------------------------------------------------------------------------

async def test_page_token_of_another_list_is_rejected(world: World) -> None:
    first = await world.admin.tenancy.ListProjects(T.ListProjectsRequest(page_size=1))
    assert first.next_page_token
    for call in (
        world.admin.tenancy.ListEnvironments(T.ListEnvironmentsRequest(page_token=first.next_page_token)),
        world.admin.access.ListOperators(A.ListOperatorsRequest(page_token=first.next_page_token)),
        world.admin.agents.ListAgentTemplates(G.ListAgentTemplatesRequest(page_token=first.next_page_token)),
    ):
        got = await expect_failure(call, INVALID, "INVALID_PAGE_TOKEN")
        assert set(got.violations) == {"page_token"}
    # The token is still good where it came from.
    second = await world.admin.tenancy.ListProjects(T.ListProjectsRequest(
        page_size=1, page_token=first.next_page_token))
    assert len(second.projects) == 1 and second.projects[0].id != first.projects[0].id


async def test_page_token_is_bound_to_the_filters(world: World) -> None:
    other = (await world.admin.tenancy.CreateProject(T.CreateProjectRequest(
        slug=f"flt-{secrets.token_hex(3)}", name="F"))).project
    for i in range(2):
        await world.admin.agents.CreateAgentTemplate(G.CreateAgentTemplateRequest(
            project_id=other.id, slug=f"flt-{i}-{secrets.token_hex(3)}", name="T"))
    first = await world.admin.agents.ListAgentTemplates(G.ListAgentTemplatesRequest(
        project_id=other.id, page_size=1))
    assert first.next_page_token
    await expect_failure(world.admin.agents.ListAgentTemplates(G.ListAgentTemplatesRequest(
        project_id=world.project.id, page_token=first.next_page_token)), INVALID, "INVALID_PAGE_TOKEN")
    await expect_failure(world.admin.agents.ListAgentTemplates(G.ListAgentTemplatesRequest(
        page_token=first.next_page_token)), INVALID, "INVALID_PAGE_TOKEN")


async def test_pagination_returns_every_row_once_in_order(tenant: TenantContext) -> None:
    created = [(await tenant.admin.tenancy.CreateProject(T.CreateProjectRequest(
        slug=f"page-{i}", name=f"Page {i}"))).project.id for i in range(7)]
    pages: list[list[str]] = []
    token = ""
    for _ in range(10):
        resp = await tenant.admin.tenancy.ListProjects(T.ListProjectsRequest(page_size=3, page_token=token))
        pages.append([p.id for p in resp.projects])
        token = resp.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    listed = [i for page in pages for i in page]
    assert sorted(listed) == sorted(created) and len(set(listed)) == 7
    assert listed == sorted(listed)  # stable id order across pages
    # page_size 0 means the default (50) and a huge one is capped, both return everything here.
    for size in (0, 100_000):
        resp = await tenant.admin.tenancy.ListProjects(T.ListProjectsRequest(page_size=size))
        assert [p.id for p in resp.projects] == listed and resp.next_page_token == ""


async def test_exact_multiple_of_page_size_ends_cleanly(tenant: TenantContext) -> None:
    for i in range(4):
        await tenant.admin.tenancy.CreateProject(T.CreateProjectRequest(slug=f"even-{i}", name="E"))
    first = await tenant.admin.tenancy.ListProjects(T.ListProjectsRequest(page_size=2))
    second = await tenant.admin.tenancy.ListProjects(T.ListProjectsRequest(
        page_size=2, page_token=first.next_page_token))
    assert len(first.projects) == len(second.projects) == 2
    if second.next_page_token:  # an empty last page is allowed, a repeated row is not
        third = await tenant.admin.tenancy.ListProjects(T.ListProjectsRequest(
            page_size=2, page_token=second.next_page_token))
        assert list(third.projects) == [] and third.next_page_token == ""
    assert len({p.id for p in [*first.projects, *second.projects]}) == 4


# --- idempotency -----------------------------------------------------------------------------

async def test_create_project_retry_returns_the_same_project(tenant: TenantContext) -> None:
    req = T.CreateProjectRequest(request_id=f"rid-{secrets.token_hex(4)}", slug="retry", name="Retry")
    first = (await tenant.admin.tenancy.CreateProject(req)).project
    second = (await tenant.admin.tenancy.CreateProject(req)).project
    assert second == first
    projects = (await tenant.admin.tenancy.ListProjects(T.ListProjectsRequest())).projects
    assert [p.id for p in projects] == [first.id]
    # Without a request_id the same request is a new write, refused by the unique slug.
    await expect_failure(tenant.admin.tenancy.CreateProject(T.CreateProjectRequest(slug="retry", name="Retry")),
                         grpc.StatusCode.ALREADY_EXISTS, "PROJECT_EXISTS")


async def test_create_agent_version_retry_assigns_one_number(tenant: TenantContext) -> None:
    agents = await approved_version(tenant.admin)
    req = G.CreateAgentVersionRequest(request_id=f"rid-{secrets.token_hex(4)}",
                                      template_id=agents.template.id, genome=genome(), notes="v2")
    first = (await tenant.admin.agents.CreateAgentVersion(req)).agent_version
    second = (await tenant.admin.agents.CreateAgentVersion(req)).agent_version
    assert second == first
    assert first.number == 2
    third = (await tenant.admin.agents.CreateAgentVersion(G.CreateAgentVersionRequest(
        template_id=agents.template.id, genome=genome()))).agent_version
    assert third.number == 3
    versions = (await tenant.admin.agents.ListAgentVersions(G.ListAgentVersionsRequest(
        template_id=agents.template.id))).agent_versions
    assert sorted(v.number for v in versions) == [1, 2, 3]


async def test_transition_instance_retry_transitions_once(tenant: TenantContext) -> None:
    agents = await approved_version(tenant.admin)
    inst = (await tenant.admin.agents.CreateAgentInstance(G.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="w"))).agent_instance
    req = G.TransitionAgentInstanceRequest(id=inst.id, to_state=G.INSTANCE_STATE_ACTIVE,
                                           request_id=f"rid-{secrets.token_hex(4)}", reason="go")
    first = (await tenant.admin.agents.TransitionAgentInstance(req)).agent_instance
    second = (await tenant.admin.agents.TransitionAgentInstance(req)).agent_instance
    assert second == first
    assert first.state == G.INSTANCE_STATE_ACTIVE and first.etag != inst.etag
    stored = (await tenant.admin.agents.GetAgentInstance(G.GetAgentInstanceRequest(id=inst.id))).agent_instance
    assert stored.etag == first.etag  # one transition, not two
    # A genuine second ACTIVE → ACTIVE (no request_id) is refused by the lifecycle.
    await expect_failure(tenant.admin.agents.TransitionAgentInstance(G.TransitionAgentInstanceRequest(
        id=inst.id, to_state=G.INSTANCE_STATE_ACTIVE)), grpc.StatusCode.FAILED_PRECONDITION,
        "INVALID_TRANSITION")


async def _instance(client: ArmClient) -> agents_pb2.AgentInstance:
    agents = await approved_version(client)
    return (await client.agents.CreateAgentInstance(G.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="w"))).agent_instance


@pytest.mark.parametrize("kind", ["CreateProject", "CreateEnvironment", "TransitionAgentInstance",
                                  "CreateAgentVersion"])
async def test_request_id_reused_with_other_fields_is_rejected(tenant: TenantContext, kind: str) -> None:
    c = tenant.admin
    rid = f"rid-{secrets.token_hex(4)}"
    method: Any
    if kind == "CreateProject":
        method = c.tenancy.CreateProject
        first = T.CreateProjectRequest(request_id=rid, slug="one", name="One")
        second = T.CreateProjectRequest(request_id=rid, slug="two", name="One")
    elif kind == "CreateEnvironment":
        method = c.tenancy.CreateEnvironment
        first = T.CreateEnvironmentRequest(request_id=rid, name="env", type=T.ENVIRONMENT_TYPE_DEV)
        second = T.CreateEnvironmentRequest(request_id=rid, name="env", type=T.ENVIRONMENT_TYPE_PROD)
    elif kind == "TransitionAgentInstance":
        inst = await _instance(c)
        method = c.agents.TransitionAgentInstance
        first = G.TransitionAgentInstanceRequest(request_id=rid, id=inst.id,
                                                 to_state=G.INSTANCE_STATE_ACTIVE)
        second = G.TransitionAgentInstanceRequest(request_id=rid, id=inst.id,
                                                  to_state=G.INSTANCE_STATE_PAUSED)
    else:
        agents = await approved_version(c)
        method = c.agents.CreateAgentVersion
        first = G.CreateAgentVersionRequest(request_id=rid, template_id=agents.template.id, genome=genome())
        second = G.CreateAgentVersionRequest(request_id=rid, template_id=agents.template.id, genome=genome())
    await method(first)
    before = await _state(c)
    got = await expect_failure(method(second), INVALID, "REQUEST_ID_REUSED")
    assert set(got.violations) == {"request_id"}
    assert await _state(c) == before
    assert await method(first) is not None  # the original request still replays


async def _state(c: ArmClient) -> dict[str, Any]:
    parts = {
        "projects": (await c.tenancy.ListProjects(T.ListProjectsRequest())).projects,
        "environments": (await c.tenancy.ListEnvironments(T.ListEnvironmentsRequest())).environments,
        "versions": (await c.agents.ListAgentVersions(G.ListAgentVersionsRequest())).agent_versions,
        "instances": (await c.agents.ListAgentInstances(G.ListAgentInstancesRequest())).agent_instances,
    }
    return {k: [json_format.MessageToDict(r) for r in v] for k, v in parts.items()}


async def test_request_ids_are_per_method(tenant: TenantContext) -> None:
    rid = f"rid-{secrets.token_hex(4)}"
    project = (await tenant.admin.tenancy.CreateProject(T.CreateProjectRequest(
        request_id=rid, slug="per-method", name="P"))).project
    env = (await tenant.admin.tenancy.CreateEnvironment(T.CreateEnvironmentRequest(
        request_id=rid, name="per-method", type=T.ENVIRONMENT_TYPE_DEV))).environment
    assert project.id and env.id and project.id != env.id


async def test_concurrent_create_project_with_one_request_id_creates_one(
        request: pytest.FixtureRequest, registry: RegistryServer, tenant: TenantContext) -> None:
    req = T.CreateProjectRequest(request_id=f"rid-{secrets.token_hex(4)}", slug="racy", name="Racy")
    results = await asyncio.gather(*(tenant.admin.tenancy.CreateProject(req) for _ in range(10)),
                                   return_exceptions=True)
    projects = (await tenant.admin.tenancy.ListProjects(T.ListProjectsRequest())).projects
    assert [p.slug for p in projects] == ["racy"]  # exactly one was created, whatever the answers
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [], [(e.code(), e.details()) for e in errors if isinstance(e, grpc.aio.AioRpcError)]
    assert {r.project.id for r in results} == {projects[0].id}  # type: ignore[union-attr]


async def test_concurrent_create_version_with_one_request_id_creates_one(tenant: TenantContext) -> None:
    agents = await approved_version(tenant.admin)
    req = G.CreateAgentVersionRequest(request_id=f"rid-{secrets.token_hex(4)}",
                                      template_id=agents.template.id, genome=genome())
    results = await asyncio.gather(*(tenant.admin.agents.CreateAgentVersion(req) for _ in range(10)))
    assert len({r.agent_version.id for r in results}) == 1
    assert {r.agent_version.number for r in results} == {2}
    versions = (await tenant.admin.agents.ListAgentVersions(G.ListAgentVersionsRequest(
        template_id=agents.template.id))).agent_versions
    assert sorted(v.number for v in versions) == [1, 2]


async def test_create_api_key_replay_returns_metadata_without_the_secret(
        registry: RegistryServer, tenant: TenantContext) -> None:
    op = (await tenant.admin.access.CreateOperator(A.CreateOperatorRequest(
        email=f"k-{secrets.token_hex(3)}@example.com", name="K"))).operator
    req = A.CreateApiKeyRequest(request_id=f"rid-{secrets.token_hex(4)}", operator_id=op.id,
                                display_name="ci")
    first = await tenant.admin.access.CreateApiKey(req)
    replay = await tenant.admin.access.CreateApiKey(req)
    assert first.secret.startswith(f"arm_{first.api_key.id}_")
    assert replay.secret == ""
    assert replay.api_key == first.api_key
    keys = (await tenant.admin.access.ListApiKeys(A.ListApiKeysRequest(operator_id=op.id))).api_keys
    assert [k.id for k in keys] == [first.api_key.id]
    async with registry.client(first.secret) as client:  # the one secret shown works
        principal = (await client.access.Authenticate(A.AuthenticateRequest())).principal
    assert (principal.actor.id, principal.api_key_id) == (op.id, first.api_key.id)


async def test_create_tenant_replay_returns_no_admin_key(system_admin: ArmClient) -> None:
    slug = f"t-{secrets.token_hex(5)}"
    req = T.CreateTenantRequest(request_id=f"rid-{secrets.token_hex(4)}", slug=slug, name="T",
                                admin_email=f"admin@{slug}.example", admin_name="Admin")
    first = await system_admin.tenancy.CreateTenant(req)
    replay = await system_admin.tenancy.CreateTenant(req)
    assert first.admin_api_key and replay.admin_api_key == ""
    assert (replay.tenant, replay.admin_operator_id) == (first.tenant, first.admin_operator_id)


# --- unique constraints ----------------------------------------------------------------------

Dup = Callable[[ArmClient, str], Any]
DUPLICATES: list[tuple[str, Dup, str, str]] = [
    ("project slug", lambda c, v: c.tenancy.CreateProject(T.CreateProjectRequest(slug=v, name="P")),
     "PROJECT_EXISTS", "slug"),
    ("environment name", lambda c, v: c.tenancy.CreateEnvironment(T.CreateEnvironmentRequest(
        name=v, type=T.ENVIRONMENT_TYPE_DEV)), "ENVIRONMENT_EXISTS", "name"),
    ("operator email", lambda c, v: c.access.CreateOperator(A.CreateOperatorRequest(
        email=f"{v}@example.com", name="O")), "OPERATOR_EXISTS", "email"),
    ("role name", lambda c, v: c.access.CreateRole(A.CreateRoleRequest(
        name=v, permissions=["registry:read"])), "ROLE_EXISTS", "name"),
]


@pytest.mark.parametrize(("what", "create", "reason", "key"), DUPLICATES, ids=[d[0] for d in DUPLICATES])
async def test_duplicate_is_already_exists(tenant: TenantContext, what: str, create: Dup,
                                           reason: str, key: str) -> None:
    value = f"dup-{secrets.token_hex(3)}"
    await create(tenant.admin, value)
    before = await _unique_state(tenant.admin)
    got = await expect_failure(create(tenant.admin, value), grpc.StatusCode.ALREADY_EXISTS, reason)
    assert value in got.metadata[key]
    assert await _unique_state(tenant.admin) == before


async def _unique_state(c: ArmClient) -> dict[str, Any]:
    parts = {
        "projects": (await c.tenancy.ListProjects(T.ListProjectsRequest())).projects,
        "environments": (await c.tenancy.ListEnvironments(T.ListEnvironmentsRequest())).environments,
        "operators": (await c.access.ListOperators(A.ListOperatorsRequest())).operators,
        "roles": (await c.access.ListRoles(A.ListRolesRequest())).roles,
    }
    return {k: sorted(r.id for r in v) for k, v in parts.items()}


async def test_operator_email_is_unique_case_insensitively(tenant: TenantContext) -> None:
    local = f"Mixed-{secrets.token_hex(3)}"
    op = (await tenant.admin.access.CreateOperator(A.CreateOperatorRequest(
        email=f"{local}@Example.com", name="O"))).operator
    assert op.email == f"{local}@example.com".lower()
    await expect_failure(tenant.admin.access.CreateOperator(A.CreateOperatorRequest(
        email=f"{local.lower()}@example.COM", name="O")), grpc.StatusCode.ALREADY_EXISTS, "OPERATOR_EXISTS")


async def test_project_slug_is_unique_per_tenant_only(registry: RegistryServer, system_admin: ArmClient,
                                                      tenant: TenantContext) -> None:
    other = await make_tenant(registry, system_admin)
    try:
        a = (await tenant.admin.tenancy.CreateProject(T.CreateProjectRequest(slug="shared", name="A"))).project
        b = (await other.admin.tenancy.CreateProject(T.CreateProjectRequest(slug="shared", name="B"))).project
        assert a.id != b.id and (a.tenant_id, b.tenant_id) == (tenant.tenant.id, other.tenant.id)
    finally:
        await other.admin.close()


async def test_duplicate_template_slug_and_legacy_id(tenant: TenantContext) -> None:
    agents = await approved_version(tenant.admin)
    await expect_failure(tenant.admin.agents.CreateAgentTemplate(G.CreateAgentTemplateRequest(
        project_id=agents.project.id, slug=agents.template.slug, name="Again")),
        grpc.StatusCode.ALREADY_EXISTS, "TEMPLATE_EXISTS")
    legacy = f"mc-{secrets.token_hex(3)}"
    first = (await tenant.admin.agents.CreateAgentInstance(G.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="a",
        legacy_agent_id=legacy))).agent_instance
    await expect_failure(tenant.admin.agents.CreateAgentInstance(G.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="b",
        legacy_agent_id=legacy)), grpc.StatusCode.ALREADY_EXISTS, "LEGACY_AGENT_EXISTS")
    instances = (await tenant.admin.agents.ListAgentInstances(G.ListAgentInstancesRequest())).agent_instances
    assert [i.id for i in instances] == [first.id]


# --- etags -----------------------------------------------------------------------------------

async def test_update_project_with_stale_etag_is_aborted(tenant: TenantContext) -> None:
    project = (await tenant.admin.tenancy.CreateProject(T.CreateProjectRequest(
        slug="etag", name="Original"))).project
    updated = (await tenant.admin.tenancy.UpdateProject(T.UpdateProjectRequest(
        id=project.id, name="First", etag=project.etag))).project
    assert updated.name == "First"
    assert updated.etag and updated.etag != project.etag
    got = await expect_failure(tenant.admin.tenancy.UpdateProject(T.UpdateProjectRequest(
        id=project.id, name="Second", etag=project.etag)), grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    assert got.metadata["current_etag"] == updated.etag
    stored = (await tenant.admin.tenancy.GetProject(T.GetProjectRequest(id=project.id))).project
    assert (stored.name, stored.etag) == ("First", updated.etag)
    again = (await tenant.admin.tenancy.UpdateProject(T.UpdateProjectRequest(
        id=project.id, description="more", etag=stored.etag))).project
    assert (again.name, again.description) == ("First", "more")
    assert again.etag not in (project.etag, updated.etag)


Update = Callable[[ArmClient, Any, str], Any]


async def _etag_targets(c: ArmClient) -> dict[str, tuple[Any, Update]]:
    agents = await approved_version(c)
    inst = (await c.agents.CreateAgentInstance(G.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="w"))).agent_instance
    op = (await c.access.CreateOperator(A.CreateOperatorRequest(
        email=f"e-{secrets.token_hex(3)}@example.com", name="E"))).operator
    return {
        "UpdateEnvironment": (agents.environment, lambda c, row, etag: c.tenancy.UpdateEnvironment(
            T.UpdateEnvironmentRequest(id=row.id, name=f"n-{secrets.token_hex(3)}", etag=etag))),
        "UpdateOperator": (op, lambda c, row, etag: c.access.UpdateOperator(
            A.UpdateOperatorRequest(id=row.id, name=f"n-{secrets.token_hex(3)}", etag=etag))),
        "UpdateAgentTemplate": (agents.template, lambda c, row, etag: c.agents.UpdateAgentTemplate(
            G.UpdateAgentTemplateRequest(id=row.id, name=f"n-{secrets.token_hex(3)}", etag=etag))),
        "TransitionAgentInstance": (inst, lambda c, row, etag: c.agents.TransitionAgentInstance(
            G.TransitionAgentInstanceRequest(id=row.id, to_state=G.INSTANCE_STATE_ACTIVE, etag=etag))),
    }


async def test_other_updates_check_etags(tenant: TenantContext) -> None:
    targets = await _etag_targets(tenant.admin)
    for name, (row, update) in targets.items():
        stale = row.etag
        await expect_failure(update(tenant.admin, row, "999"), grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
        resp = await update(tenant.admin, row, stale)
        fresh = next(v for f, v in resp.ListFields())
        assert fresh.etag != stale, name
        got = await expect_failure(update(tenant.admin, row, stale), grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
        assert got.metadata["current_etag"] == fresh.etag, name


async def test_role_assignment_expiry_in_the_future_is_accepted(tenant: TenantContext) -> None:
    """Control for the expire_time rule: a future expiry is valid input."""
    roles = (await tenant.admin.access.ListRoles(A.ListRolesRequest())).roles
    future = timestamp_pb2.Timestamp()
    future.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    ra = (await tenant.admin.access.CreateRoleAssignment(A.CreateRoleAssignmentRequest(
        operator_id=tenant.admin_operator_id, role_id=next(r.id for r in roles if r.name == "auditor"),
        expire_time=future))).role_assignment
    assert ra.expire_time == future
