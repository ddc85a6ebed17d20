"""The older platform's view of agents: resolving either kind of agent reference, finding an
instance by its legacy id, and creating one (with its template and version) on first sight."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from arm.registry.v1 import compat_pb2
from arm_common.auth import Principal
from arm_common.errors import AlreadyExists, FailedPrecondition, NotFound
from arm_common.ids import new_id
from arm_common.tables import utcnow
from arm_registry import convert, domain, models
from arm_registry.agents import Agents
from arm_registry.store import CR, RegistryStore


class Compat:
    """Each method takes the caller and a validated request and returns the response message."""

    def __init__(self, store: RegistryStore, agents: Agents, compat_mode: bool) -> None:
        self.store = store
        self.agents = agents
        self.compat_mode = compat_mode

    async def _resolve(self, s: AsyncSession, tenant_id: str, column: Any, value: str
                       ) -> compat_pb2.ResolvedAgent | None:
        row = (await s.execute(
            select(models.AgentInstance, models.AgentVersion, models.Environment, models.Tenant)
            .join(models.AgentVersion, models.AgentVersion.id == models.AgentInstance.version_id)
            .join(models.Environment, models.Environment.id == models.AgentInstance.environment_id)
            .join(models.Tenant, models.Tenant.id == models.AgentInstance.tenant_id)
            .where(models.AgentInstance.tenant_id == tenant_id, column == value))).first()
        return None if row is None else convert.resolved(*row)

    async def resolve_agent_ref(self, p: Principal, request: compat_pb2.ResolveAgentRefRequest,
                                which: str) -> compat_pb2.ResolveAgentRefResponse:
        """`which`: the field of the request's `ref` oneof that is set."""
        value = getattr(request, which)
        by_id, by_legacy = models.AgentInstance.id, models.AgentInstance.legacy_agent_id
        by_ref: dict[str, list[Any]] = {"instance_id": [by_id], "legacy_agent_id": [by_legacy],
                                         "agent_ref": [by_legacy, by_id] if self.compat_mode else [by_id, by_legacy]}
        columns = by_ref[which]

        async def read(s: AsyncSession) -> compat_pb2.ResolveAgentRefResponse:
            for column in columns:
                found = await self._resolve(s, p.tenant_id, column, value)
                if found is not None:
                    # Agents may resolve only themselves; operators need registry:read.
                    if not (p.is_agent and p.actor_id == found.instance_id):
                        p.require("registry:read", project_id=found.project_id,
                                  environment_id=found.environment_id)
                    return compat_pb2.ResolveAgentRefResponse(agent=found)
            raise NotFound(f"no agent {value!r}", reason="AGENT_NOT_FOUND", metadata={which: value})

        return await self.store.read(read)

    async def ensure_instance_for_legacy_agent(
            self, p: Principal, request: compat_pb2.EnsureInstanceForLegacyAgentRequest
    ) -> compat_pb2.EnsureInstanceForLegacyAgentResponse:
        p.require("registry:write")
        name = request.name or request.legacy_agent_id
        store = self.store

        async def existing(s: AsyncSession) -> compat_pb2.EnsureInstanceForLegacyAgentResponse | None:
            inst = (await s.execute(select(models.AgentInstance).where(
                models.AgentInstance.tenant_id == p.tenant_id,
                models.AgentInstance.legacy_agent_id == request.legacy_agent_id))).scalar_one_or_none()
            if inst is None:
                return None
            tpl = await store.get(s, models.AgentTemplate, inst.template_id, p.tenant_id, "agent_template")
            ver = await store.get(s, models.AgentVersion, inst.version_id, p.tenant_id, "agent_version")
            return compat_pb2.EnsureInstanceForLegacyAgentResponse(
                agent_template=convert.template(tpl), agent_version=convert.version(ver),
                agent_instance=convert.instance(inst), created=False)

        async def get_or_create(s: AsyncSession, model: Any, where: list[Any], make: Callable[[], Any]
                                ) -> tuple[Any, bool]:
            row = (await s.execute(select(model).where(*where))).scalar_one_or_none()
            if row is None:
                row = make()
                s.add(row)
                await s.flush()
                return row, True
            return row, False

        async def write(s: AsyncSession) -> compat_pb2.EnsureInstanceForLegacyAgentResponse:
            found = await existing(s)
            if found is not None:
                return found
            now = utcnow()
            if request.project_id:
                project = await store.get(s, models.Project, request.project_id, p.tenant_id, "project")
            else:
                project, made = await get_or_create(
                    s, models.Project, [models.Project.tenant_id == p.tenant_id, models.Project.slug == "legacy"],
                    lambda: models.Project(id=new_id("prj"), tenant_id=p.tenant_id, slug="legacy",
                                           name="Legacy agents", description="Agents of the older platform",
                                           created_at=now, updated_at=now, revision=1))
                if made:
                    await store.record(s, p, CR.CHANGE_RECORD_TYPE_PROJECT_CREATED, target_type="project",
                                       target_id=project.id, project_id=project.id,
                                       summary="project legacy created for legacy agents")
            if request.environment_id:
                env = await store.get(s, models.Environment, request.environment_id, p.tenant_id, "environment")
            else:
                env, made = await get_or_create(
                    s, models.Environment, [models.Environment.tenant_id == p.tenant_id,
                                            models.Environment.name == "legacy"],
                    lambda: models.Environment(id=new_id("env"), tenant_id=p.tenant_id, name="legacy",
                                               type="PROD", require_active_deployment=False,
                                               created_at=now, updated_at=now, revision=1))
                if made:
                    await store.record(s, p, CR.CHANGE_RECORD_TYPE_ENVIRONMENT_CREATED,
                                       target_type="environment", target_id=env.id,
                                       summary="environment legacy created for legacy agents")
            slug = store.legacy_slug(request.legacy_agent_id)
            tpl = models.AgentTemplate(
                id=new_id("tpl"), tenant_id=p.tenant_id, project_id=project.id, slug=slug, name=name,
                description=f"Legacy agent {request.legacy_agent_id}", owners=[], tags=["legacy"],
                active=True, version_count=1, created_at=now, updated_at=now, revision=1)
            s.add(tpl)
            await s.flush()  # rows are inserted in this order: no relationship() tells SQLAlchemy
            await store.record(s, p, CR.CHANGE_RECORD_TYPE_TEMPLATE_CREATED, target_type="agent_template",
                               target_id=tpl.id, project_id=project.id, template_id=tpl.id,
                               summary=f"template {slug} created for legacy agent")
            genome_text, genome_hash = store.genome_text(store.legacy_genome(request.legacy_agent_id, name))
            ver = models.AgentVersion(
                id=new_id("ver"), tenant_id=p.tenant_id, template_id=tpl.id, project_id=project.id,
                number=1, genome_json=genome_text, genome_hash=genome_hash, state="APPROVED",
                eval_status="NOT_RUN", eval_summary="", parent_version_id="",
                notes="created by EnsureInstanceForLegacyAgent", created_by=p.actor_id,
                approved_by=p.actor_id, created_at=now, updated_at=now, revision=1)
            s.add(ver)
            await s.flush()
            await store.record(s, p, CR.CHANGE_RECORD_TYPE_VERSION_CREATED, target_type="agent_version",
                               target_id=ver.id, project_id=project.id, template_id=tpl.id,
                               version_id=ver.id, summary="version 1 created for legacy agent",
                               after={"state": "APPROVED", "genome_hash": genome_hash})
            state = domain.legacy_status_to_state(request.legacy_status) if request.legacy_status else "ACTIVE"
            inst = await self.agents.create_instance_row(s, p, ver, env, name, request.legacy_agent_id, state)
            return compat_pb2.EnsureInstanceForLegacyAgentResponse(
                agent_template=convert.template(tpl), agent_version=convert.version(ver),
                agent_instance=convert.instance(inst), created=True)

        # Concurrent first calls race on the unique legacy id / template slug: the losers roll
        # back and find the winner's set.
        for _ in range(5):
            try:
                return await store.write(p, "EnsureInstanceForLegacyAgent", request,
                                         compat_pb2.EnsureInstanceForLegacyAgentResponse, write)
            except (IntegrityError, AlreadyExists):
                found = await store.read(existing)
                if found is not None:
                    return found
        raise FailedPrecondition("could not create or find the legacy agent's instance",
                                 reason="LEGACY_ENSURE_CONFLICT")

    async def get_agent_by_legacy_id(self, p: Principal, request: compat_pb2.GetAgentByLegacyIdRequest
                                     ) -> compat_pb2.GetAgentByLegacyIdResponse:
        async def read(s: AsyncSession) -> compat_pb2.GetAgentByLegacyIdResponse:
            row = (await s.execute(select(models.AgentInstance, models.AgentTemplate.name)
                                   .join(models.AgentTemplate, models.AgentTemplate.id == models.AgentInstance.template_id)
                                   .where(models.AgentInstance.tenant_id == p.tenant_id,
                                          models.AgentInstance.legacy_agent_id == request.legacy_agent_id))).first()
            if row is None:
                raise NotFound(f"no agent with legacy id {request.legacy_agent_id!r}",
                               reason="AGENT_NOT_FOUND", metadata={"legacy_agent_id": request.legacy_agent_id})
            inst, tpl_name = row
            if not (p.is_agent and p.actor_id == inst.id):
                p.require("registry:read", project_id=inst.project_id)
            return compat_pb2.GetAgentByLegacyIdResponse(
                agent_instance=convert.instance(inst), legacy_status=domain.INSTANCE_TO_LEGACY[inst.state],
                name=tpl_name)

        return await self.store.read(read)
