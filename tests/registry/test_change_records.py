"""Change records in the registry's outbox: one record per mutation, written in the mutation's
transaction, with the right type, tenant, actor and target; none for a refused mutation and none
for a replayed request_id."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from sqlalchemy import text

from arm.common.v1 import common_pb2
from arm.registry.v1 import access_pb2, agents_pb2, tenancy_pb2
from tests.conftest import RegistryServer, TenantContext
from tests.helpers import approved_version, expect_failure, genome

CR = common_pb2.ChangeRecordType


@dataclass
class Outboxed:
    """One outbox row: its message id and the decoded change record."""

    message_id: str
    record: common_pb2.ChangeRecord


async def outbox(registry: RegistryServer, tenant_id: str) -> list[Outboxed]:
    """The tenant's change records as the registry wrote them to its outbox, in order."""
    async with registry.db.transaction() as s:
        rows = (await s.execute(text(
            "select message_id, payload from outbox_messages "
            "where tenant_id = :t and topic = 'change_record' order by position"), {"t": tenant_id})).all()
    return [Outboxed(r.message_id, common_pb2.ChangeRecord.FromString(bytes(r.payload))) for r in rows]


class Ledger:
    """Follows a tenant's outbox: `new()` returns what was added since the last call."""

    def __init__(self, registry: RegistryServer, tenant_id: str) -> None:
        self.registry = registry
        self.tenant_id = tenant_id
        self.seen = 0

    async def start(self) -> Ledger:
        self.seen = len(await outbox(self.registry, self.tenant_id))
        return self

    async def new(self) -> list[Outboxed]:
        rows = await outbox(self.registry, self.tenant_id)
        added = rows[self.seen:]
        self.seen = len(rows)
        return added


def record_type(name: str) -> int:
    return CR.Value(f"CHANGE_RECORD_TYPE_{name}")


async def test_one_record_per_mutation(tenant: TenantContext, registry: RegistryServer) -> None:
    admin = tenant.admin
    ledger = await Ledger(registry, tenant.tenant.id).start()
    suffix = secrets.token_hex(4)
    created: dict[str, Any] = {}

    async def env() -> str:
        created["env"] = (await admin.tenancy.CreateEnvironment(tenancy_pb2.CreateEnvironmentRequest(
            name=f"dev-{suffix}", type=tenancy_pb2.ENVIRONMENT_TYPE_DEV))).environment
        return created["env"].id

    async def project() -> str:
        created["project"] = (await admin.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
            slug=f"p-{suffix}", name="Project"))).project
        return created["project"].id

    async def template() -> str:
        created["template"] = (await admin.agents.CreateAgentTemplate(agents_pb2.CreateAgentTemplateRequest(
            project_id=created["project"].id, slug=f"tpl-{suffix}", name="Agent"))).agent_template
        return created["template"].id

    async def version() -> str:
        created["version"] = (await admin.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(
            template_id=created["template"].id, genome=genome()))).agent_version
        return created["version"].id

    async def version_to_testing() -> str:
        await admin.agents.TransitionAgentVersion(agents_pb2.TransitionAgentVersionRequest(
            id=created["version"].id, to_state=agents_pb2.VERSION_STATE_TESTING, reason="evaluate"))
        return created["version"].id

    async def instance() -> str:
        agents = await approved_version(admin)
        await ledger.new()  # the approved version's own records are not this step's
        created["instance"] = (await admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
            version_id=agents.version.id, environment_id=agents.environment.id,
            name="worker"))).agent_instance
        return created["instance"].id

    async def instance_to_active() -> str:
        await admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
            id=created["instance"].id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE, reason="go live"))
        return created["instance"].id

    async def identity() -> str:
        resp = await admin.agents.UpsertAgentIdentity(agents_pb2.UpsertAgentIdentityRequest(
            agent_identity=agents_pb2.AgentIdentity(name=f"ident-{suffix}", soul_content="soul",
                                                    tools_notes="notes")))
        return resp.agent_identity.id

    async def operator() -> str:
        created["operator"] = (await admin.access.CreateOperator(access_pb2.CreateOperatorRequest(
            email=f"op-{suffix}@example.com", name="Operator"))).operator
        return created["operator"].id

    async def role_assignment() -> str:
        roles = {r.name: r.id for r in (await admin.access.ListRoles(access_pb2.ListRolesRequest())).roles}
        await admin.access.CreateRoleAssignment(access_pb2.CreateRoleAssignmentRequest(
            operator_id=created["operator"].id, role_id=roles["auditor"]))
        # The operator whose access changed is the target.
        return created["operator"].id

    steps: list[tuple[str, Callable[[], Awaitable[str]]]] = [
        ("ENVIRONMENT_CREATED", env), ("PROJECT_CREATED", project), ("TEMPLATE_CREATED", template),
        ("VERSION_CREATED", version), ("VERSION_TRANSITIONED", version_to_testing),
        ("INSTANCE_CREATED", instance), ("INSTANCE_TRANSITIONED", instance_to_active),
        ("IDENTITY_UPDATED", identity), ("OPERATOR_CREATED", operator),
        ("ROLE_ASSIGNED", role_assignment),
    ]
    for kind, step in steps:
        target_id = await step()
        added = await ledger.new()
        assert len(added) == 1, (kind, [CR.Name(a.record.type) for a in added])
        rec = added[0].record
        assert rec.type == record_type(kind), (kind, CR.Name(rec.type))
        assert rec.tenant_id == tenant.tenant.id
        assert rec.actor.type == common_pb2.ACTOR_TYPE_OPERATOR
        assert rec.actor.id == tenant.admin_operator_id
        assert rec.target_id == target_id, kind
        assert rec.record_id == added[0].message_id
        assert rec.record_id

    every = await outbox(registry, tenant.tenant.id)
    ids = [o.record.record_id for o in every]
    assert len(set(ids)) == len(ids)
    assert all(o.record.record_id == o.message_id for o in every)
    assert all(o.record.tenant_id == tenant.tenant.id for o in every)


async def test_records_carry_the_related_ids(tenant: TenantContext, registry: RegistryServer) -> None:
    agents = await approved_version(tenant.admin)
    ledger = await Ledger(registry, tenant.tenant.id).start()
    inst = (await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="w"))).agent_instance
    [created] = await ledger.new()
    rec = created.record
    assert (rec.project_id, rec.template_id, rec.version_id, rec.instance_id) == (
        agents.project.id, agents.template.id, agents.version.id, inst.id)
    assert rec.after["state"] == "PROVISIONING"
    assert rec.after["environment_id"] == agents.environment.id


async def test_refused_mutations_write_no_record(tenant: TenantContext, registry: RegistryServer) -> None:
    admin = tenant.admin
    agents = await approved_version(admin)
    inst = (await admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="w"))).agent_instance
    ledger = await Ledger(registry, tenant.tenant.id).start()

    await expect_failure(admin.agents.TransitionAgentVersion(agents_pb2.TransitionAgentVersionRequest(
        id=agents.version.id, to_state=agents_pb2.VERSION_STATE_DRAFT, reason="no")),
        grpc.StatusCode.FAILED_PRECONDITION, "INVALID_TRANSITION")
    await expect_failure(admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
        id=inst.id, to_state=agents_pb2.INSTANCE_STATE_PAUSED, reason="no")),
        grpc.StatusCode.FAILED_PRECONDITION, "INVALID_TRANSITION")
    await expect_failure(admin.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
        slug=agents.project.slug, name="Again")), grpc.StatusCode.ALREADY_EXISTS, "PROJECT_EXISTS")
    await expect_failure(admin.agents.CreateAgentTemplate(agents_pb2.CreateAgentTemplateRequest(
        project_id=agents.project.id, slug=agents.template.slug, name="Again")),
        grpc.StatusCode.ALREADY_EXISTS, "TEMPLATE_EXISTS")
    await expect_failure(admin.tenancy.CreateEnvironment(tenancy_pb2.CreateEnvironmentRequest(
        name=agents.environment.name, type=tenancy_pb2.ENVIRONMENT_TYPE_PROD)),
        grpc.StatusCode.ALREADY_EXISTS, "ENVIRONMENT_EXISTS")
    await expect_failure(admin.access.CreateOperator(access_pb2.CreateOperatorRequest(
        email=f"admin@{tenant.tenant.slug}.example", name="Twin")),
        grpc.StatusCode.ALREADY_EXISTS, "OPERATOR_EXISTS")
    await expect_failure(admin.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(
        template_id=agents.template.id, genome=genome(model_config={"provider": "openai"}))),
        grpc.StatusCode.INVALID_ARGUMENT)
    await expect_failure(admin.agents.RecordEvaluation(agents_pb2.RecordEvaluationRequest(
        id=agents.version.id, eval_status=agents_pb2.EVAL_STATUS_PASS)),
        grpc.StatusCode.FAILED_PRECONDITION, "VERSION_NOT_IN_TESTING")

    assert await ledger.new() == []


async def test_request_id_replay_writes_no_second_record(tenant: TenantContext,
                                                         registry: RegistryServer) -> None:
    admin = tenant.admin
    ledger = await Ledger(registry, tenant.tenant.id).start()
    request = tenancy_pb2.CreateProjectRequest(request_id=f"req-{secrets.token_hex(6)}",
                                               slug=f"p-{secrets.token_hex(4)}", name="Once")
    first = (await admin.tenancy.CreateProject(request)).project
    again = (await admin.tenancy.CreateProject(request)).project
    assert again == first
    added = await ledger.new()
    assert [(a.record.type, a.record.target_id) for a in added] == [
        (CR.CHANGE_RECORD_TYPE_PROJECT_CREATED, first.id)]
    projects = (await admin.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest())).projects
    assert [p.id for p in projects] == [first.id]

    # A replayed transition is answered from the first response: no second move, no second record.
    template = (await admin.agents.CreateAgentTemplate(agents_pb2.CreateAgentTemplateRequest(
        project_id=first.id, slug=f"tpl-{secrets.token_hex(4)}", name="Agent"))).agent_template
    version_request = agents_pb2.CreateAgentVersionRequest(
        request_id=f"req-{secrets.token_hex(6)}", template_id=template.id, genome=genome())
    version = (await admin.agents.CreateAgentVersion(version_request)).agent_version
    assert (await admin.agents.CreateAgentVersion(version_request)).agent_version == version
    move = agents_pb2.TransitionAgentVersionRequest(
        request_id=f"req-{secrets.token_hex(6)}", id=version.id,
        to_state=agents_pb2.VERSION_STATE_TESTING, reason="once")
    moved = (await admin.agents.TransitionAgentVersion(move)).agent_version
    assert (await admin.agents.TransitionAgentVersion(move)).agent_version == moved
    added = await ledger.new()
    assert [(CR.Name(a.record.type), a.record.target_id) for a in added] == [
        ("CHANGE_RECORD_TYPE_TEMPLATE_CREATED", template.id),
        ("CHANGE_RECORD_TYPE_VERSION_CREATED", version.id),
        ("CHANGE_RECORD_TYPE_VERSION_TRANSITIONED", version.id)]
    # The replayed create did not use up a version number either.
    second = (await admin.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(
        template_id=template.id, genome=genome()))).agent_version
    assert (version.number, second.number) == (1, 2)


async def test_request_id_reused_for_another_request_writes_nothing(tenant: TenantContext,
                                                                    registry: RegistryServer) -> None:
    admin = tenant.admin
    request_id = f"req-{secrets.token_hex(6)}"
    await admin.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
        request_id=request_id, slug=f"p-{secrets.token_hex(4)}", name="First"))
    ledger = await Ledger(registry, tenant.tenant.id).start()
    await expect_failure(admin.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
        request_id=request_id, slug=f"p-{secrets.token_hex(4)}", name="Other")),
        grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
    assert await ledger.new() == []


async def test_identity_upsert_replay_writes_one_record(tenant: TenantContext,
                                                        registry: RegistryServer) -> None:
    ledger = await Ledger(registry, tenant.tenant.id).start()
    request = agents_pb2.UpsertAgentIdentityRequest(
        request_id=f"req-{secrets.token_hex(6)}",
        agent_identity=agents_pb2.AgentIdentity(name=f"ident-{secrets.token_hex(3)}", soul_content="s"))
    first = await tenant.admin.agents.UpsertAgentIdentity(request)
    again = await tenant.admin.agents.UpsertAgentIdentity(request)
    assert again == first
    assert again.created
    added = await ledger.new()
    assert [(a.record.type, a.record.target_id) for a in added] == [
        (CR.CHANGE_RECORD_TYPE_IDENTITY_UPDATED, first.agent_identity.id)]
