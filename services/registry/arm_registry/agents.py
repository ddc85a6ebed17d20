"""Agent templates, versions and their evaluations, instances (with heartbeats and rebinding) and
identities: the permission checks, lifecycle rules, governance questions and change records of
each operation."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from arm.governance.v1 import approvals_pb2
from arm.registry.v1 import agents_pb2, compat_pb2
from arm_common.auth import Principal
from arm_common.errors import FailedPrecondition, FieldViolation, InvalidArgument
from arm_common.ids import new_id
from arm_common.tables import utcnow
from arm_registry import convert, domain, models
from arm_registry.governance import Governance
from arm_registry.reads import get_one, list_page
from arm_registry.store import CR, RegistryStore


class Agents:
    """Each method takes the caller and a validated request and returns the response message.
    Calls to governance are made before the write transaction, never inside it."""

    def __init__(self, store: RegistryStore, compat_mode: bool, authenticator: Any = None,
                 governance: Governance | None = None) -> None:
        self.store = store
        self.compat_mode = compat_mode
        self.authenticator = authenticator
        self.governance = governance or Governance(None)

    # templates

    async def create_template(self, p: Principal, request: agents_pb2.CreateAgentTemplateRequest
                              ) -> agents_pb2.CreateAgentTemplateResponse:
        p.require("registry:write", project_id=request.project_id)

        async def write(s: AsyncSession) -> agents_pb2.CreateAgentTemplateResponse:
            await self.store.get(s, models.Project, request.project_id, p.tenant_id, "project")
            now = utcnow()
            row = models.AgentTemplate(
                id=new_id("tpl"), tenant_id=p.tenant_id, project_id=request.project_id,
                slug=request.slug, name=request.name, description=request.description,
                owners=list(request.owners), tags=list(request.tags), active=True,
                version_count=0, created_at=now, updated_at=now, revision=1)
            s.add(row)
            await self.store.flush_unique(s, "template", {"slug": request.slug})
            await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_TEMPLATE_CREATED,
                                    target_type="agent_template", target_id=row.id,
                                    project_id=row.project_id, template_id=row.id,
                                    summary=f"template {row.slug} created",
                                    after={"slug": row.slug, "name": row.name})
            return agents_pb2.CreateAgentTemplateResponse(agent_template=convert.template(row))

        return await self.store.write(p, "CreateAgentTemplate", request,
                                      agents_pb2.CreateAgentTemplateResponse, write)

    async def get_template(self, p: Principal, request: agents_pb2.GetAgentTemplateRequest
                           ) -> agents_pb2.GetAgentTemplateResponse:
        return await get_one(self.store, p, models.AgentTemplate, request.id, "agent_template",
                             lambda row: agents_pb2.GetAgentTemplateResponse(agent_template=convert.template(row)),
                             scope=lambda row: {"project_id": row.project_id})

    async def list_templates(self, p: Principal, request: agents_pb2.ListAgentTemplatesRequest
                             ) -> agents_pb2.ListAgentTemplatesResponse:
        return await list_page(self.store, p, request, "registry:read", models.AgentTemplate,
                               {"project_id": request.project_id},
                               lambda rows, tok: agents_pb2.ListAgentTemplatesResponse(
                                   agent_templates=[convert.template(r) for r in rows], next_page_token=tok),
                               project_id=request.project_id)

    async def update_template(self, p: Principal, request: agents_pb2.UpdateAgentTemplateRequest
                              ) -> agents_pb2.UpdateAgentTemplateResponse:
        async def write(s: AsyncSession) -> agents_pb2.UpdateAgentTemplateResponse:
            row = await self.store.get(s, models.AgentTemplate, request.id, p.tenant_id,
                                       "agent_template", for_update=True)
            p.require("registry:write", project_id=row.project_id)
            self.store.check_etag(row, request.etag)
            before = {"name": row.name, "description": row.description, "owners": row.owners,
                      "tags": row.tags, "active": row.active}
            self.store.apply_present(row, request, "name", "description")
            if request.update_owners:
                row.owners = list(request.owners)
            if request.update_tags:
                row.tags = list(request.tags)
            if request.HasField("active"):
                row.active = request.active
            self.store.touch(row)
            await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_TEMPLATE_UPDATED,
                                    target_type="agent_template", target_id=row.id,
                                    project_id=row.project_id, template_id=row.id,
                                    summary=f"template {row.slug} updated", before=before,
                                    after={"name": row.name, "description": row.description,
                                           "owners": row.owners, "tags": row.tags, "active": row.active})
            return agents_pb2.UpdateAgentTemplateResponse(agent_template=convert.template(row))

        return await self.store.write(p, "UpdateAgentTemplate", request,
                                      agents_pb2.UpdateAgentTemplateResponse, write)

    # versions

    async def create_version(self, p: Principal, request: agents_pb2.CreateAgentVersionRequest,
                             genome_text: str, genome_hash: str) -> agents_pb2.CreateAgentVersionResponse:
        """`genome_text` and `genome_hash`: the request's genome, validated and normalised."""
        async def write(s: AsyncSession) -> agents_pb2.CreateAgentVersionResponse:
            tpl = await self.store.get(s, models.AgentTemplate, request.template_id, p.tenant_id,
                                       "agent_template", for_update=True)
            p.require("registry:write", project_id=tpl.project_id)
            if not tpl.active:
                raise FailedPrecondition(f"template {tpl.slug} is inactive", reason="TEMPLATE_INACTIVE")
            if request.parent_version_id:
                parent = await self.store.get(s, models.AgentVersion, request.parent_version_id,
                                              p.tenant_id, "agent_version")
                if parent.template_id != tpl.id:
                    raise InvalidArgument("the parent version belongs to another template",
                                          reason="INVALID_FIELDS", violations=[FieldViolation(
                                              "parent_version_id", "must be a version of the same template")])
            tpl.version_count += 1  # serialised by the row lock: numbers are 1, 2, 3 … per template
            now = utcnow()
            row = models.AgentVersion(
                id=new_id("ver"), tenant_id=p.tenant_id, template_id=tpl.id,
                project_id=tpl.project_id, number=tpl.version_count, genome_json=genome_text,
                genome_hash=genome_hash, state="DRAFT", eval_status="NOT_RUN", eval_summary="",
                parent_version_id=request.parent_version_id, notes=request.notes,
                created_by=p.actor_id, approved_by="", created_at=now, updated_at=now, revision=1)
            s.add(row)
            await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_VERSION_CREATED,
                                    target_type="agent_version", target_id=row.id,
                                    project_id=row.project_id, template_id=tpl.id, version_id=row.id,
                                    summary=f"version {row.number} of {tpl.slug} created",
                                    after={"number": row.number, "genome_hash": genome_hash,
                                           "state": "DRAFT"})
            return agents_pb2.CreateAgentVersionResponse(agent_version=convert.version(row))

        return await self.store.write(p, "CreateAgentVersion", request,
                                      agents_pb2.CreateAgentVersionResponse, write)

    async def get_version(self, p: Principal, request: agents_pb2.GetAgentVersionRequest
                          ) -> agents_pb2.GetAgentVersionResponse:
        return await get_one(self.store, p, models.AgentVersion, request.id, "agent_version",
                             lambda row: agents_pb2.GetAgentVersionResponse(agent_version=convert.version(row)),
                             scope=lambda row: {"project_id": row.project_id})

    async def list_versions(self, p: Principal, request: agents_pb2.ListAgentVersionsRequest
                            ) -> agents_pb2.ListAgentVersionsResponse:
        state = convert.version_state_name(request.state) if request.state else ""
        return await list_page(self.store, p, request, "registry:read", models.AgentVersion,
                               {"template_id": request.template_id, "state": state},
                               lambda rows, tok: agents_pb2.ListAgentVersionsResponse(
                                   agent_versions=[convert.version(r) for r in rows], next_page_token=tok))

    async def transition_version(self, p: Principal, request: agents_pb2.TransitionAgentVersionRequest,
                                 target: str, *, api_key: str) -> agents_pb2.TransitionAgentVersionResponse:
        """`target`: the request's to_state by its stored name; `api_key`: the caller's key, for
        asking governance about the approval on the caller's behalf."""
        approval = None
        if request.approval_id:
            # Checked before the transaction: the call goes to another service.
            approval = await self.governance.approved(
                api_key, request.approval_id, approvals_pb2.APPROVAL_ACTION_TYPE_VERSION_PROMOTION,
                version_id=request.id)
        deciders = [d.operator_id for d in approval.decisions
                    if d.verdict == approvals_pb2.APPROVAL_VERDICT_APPROVE] if approval else []

        async def write(s: AsyncSession) -> agents_pb2.TransitionAgentVersionResponse:
            row = await self.store.get(s, models.AgentVersion, request.id, p.tenant_id,
                                       "agent_version", for_update=True)
            # Approving is the approver's permission, unless an approved VERSION_PROMOTION
            # approval carries it (its deciders had approvals:decide); every other move is a
            # registry write.
            direct_approval = target == "APPROVED" and approval is None
            p.require("versions:approve" if direct_approval else "registry:write", project_id=row.project_id)
            self.store.check_etag(row, request.etag)
            domain.check_transition("version", domain.VERSION_TRANSITIONS, row.state, target)
            if target == "CANDIDATE" and row.eval_status != "PASS":
                raise FailedPrecondition(
                    f"TESTING → CANDIDATE needs eval_status PASS, the version has {row.eval_status}",
                    reason="EVALUATION_NOT_PASSED", metadata={"eval_status": row.eval_status})
            if direct_approval:
                row.approved_by = p.actor_id
            elif target == "APPROVED":
                row.approved_by = deciders[-1]  # the decision that completed the approval
            before = row.state
            row.state = target
            self.store.touch(row)
            await self.store.agent_changed(s, compat_pb2.AGENT_CHANGE_KIND_VERSION, row.tenant_id,
                                           version_id=row.id)
            await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_VERSION_TRANSITIONED,
                                    target_type="agent_version", target_id=row.id,
                                    project_id=row.project_id, template_id=row.template_id,
                                    version_id=row.id, summary=f"version {before} → {target}",
                                    before={"state": before}, after={"state": target},
                                    reason=request.reason,
                                    payload={"approval_id": request.approval_id, "approved_by": deciders}
                                    if approval else None)
            return agents_pb2.TransitionAgentVersionResponse(agent_version=convert.version(row))

        return await self.store.write(p, "TransitionAgentVersion", request,
                                      agents_pb2.TransitionAgentVersionResponse, write)

    async def record_evaluation(self, p: Principal, request: agents_pb2.RecordEvaluationRequest
                                ) -> agents_pb2.RecordEvaluationResponse:
        status = convert.eval_status_name(request.eval_status)

        async def write(s: AsyncSession) -> agents_pb2.RecordEvaluationResponse:
            row = await self.store.get(s, models.AgentVersion, request.id, p.tenant_id,
                                       "agent_version", for_update=True)
            p.require("registry:write", project_id=row.project_id)
            if row.state != "TESTING":
                raise FailedPrecondition(
                    f"evaluations are recorded in TESTING, the version is {row.state}",
                    reason="VERSION_NOT_IN_TESTING", metadata={"state": row.state})
            before = row.eval_status
            row.eval_status = status
            row.eval_summary = request.summary
            self.store.touch(row)
            await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_REGISTRY_UPDATED,
                                    target_type="agent_version", target_id=row.id,
                                    project_id=row.project_id, template_id=row.template_id,
                                    version_id=row.id, summary=f"evaluation {status}",
                                    before={"eval_status": before}, after={"eval_status": status},
                                    payload={"summary": request.summary})
            return agents_pb2.RecordEvaluationResponse(agent_version=convert.version(row))

        return await self.store.write(p, "RecordEvaluation", request,
                                      agents_pb2.RecordEvaluationResponse, write)

    # instances

    async def create_instance(self, p: Principal, request: agents_pb2.CreateAgentInstanceRequest, *,
                              api_key: str) -> agents_pb2.CreateAgentInstanceResponse:
        """`api_key`: the caller's key, for asking governance on the caller's behalf."""
        async def lookup(s: AsyncSession) -> tuple[str, bool]:
            ver = await self.store.get(s, models.AgentVersion, request.version_id, p.tenant_id, "agent_version")
            env = await self.store.get(s, models.Environment, request.environment_id, p.tenant_id, "environment")
            return ver.template_id, env.require_active_deployment

        template_id, gated = await self.store.read(lookup)
        active_version = None
        if gated:  # asked before the transaction: the call goes to another service
            active_version = await self.governance.active_version(api_key, template_id,
                                                                  request.environment_id)

        async def write(s: AsyncSession) -> agents_pb2.CreateAgentInstanceResponse:
            ver = await self.store.get(s, models.AgentVersion, request.version_id, p.tenant_id,
                                       "agent_version")
            env = await self.store.get(s, models.Environment, request.environment_id, p.tenant_id,
                                       "environment")
            p.require("registry:write", project_id=ver.project_id)
            if not (ver.state == "APPROVED" or (ver.state == "CANDIDATE" and env.type == "DEV")):
                raise FailedPrecondition(
                    f"instances need an APPROVED version (or CANDIDATE in a DEV environment); "
                    f"version {ver.number} is {ver.state} and {env.name} is {env.type}",
                    reason="VERSION_NOT_DEPLOYABLE",
                    metadata={"version_state": ver.state, "environment_type": env.type})
            if env.require_active_deployment and not gated:
                raise FailedPrecondition(  # the flag was set between our two reads: ask again
                    f"environment {env.name} now requires an active deployment; retry",
                    reason="DEPLOYMENT_CHECK_STALE")
            if env.require_active_deployment and active_version != ver.id:
                raise FailedPrecondition(
                    f"environment {env.name} requires an active deployment, and "
                    + ("the template has none there" if active_version is None
                       else f"its ACTIVE deployment targets version {active_version}, not {ver.id}"),
                    reason="NOT_ACTIVE_DEPLOYMENT_VERSION",
                    metadata={"active_version_id": active_version or "", "version_id": ver.id})
            row = await self.create_instance_row(s, p, ver, env, request.name,
                                                 request.legacy_agent_id or None, "PROVISIONING")
            return agents_pb2.CreateAgentInstanceResponse(agent_instance=convert.instance(row))

        return await self.store.write(p, "CreateAgentInstance", request,
                                      agents_pb2.CreateAgentInstanceResponse, write)

    async def create_instance_row(self, s: AsyncSession, p: Principal, ver: models.AgentVersion,
                                  env: models.Environment, name: str, legacy_agent_id: str | None,
                                  state: str) -> models.AgentInstance:
        now = utcnow()
        row = models.AgentInstance(
            id=new_id("ins"), tenant_id=p.tenant_id, template_id=ver.template_id, version_id=ver.id,
            environment_id=env.id, project_id=ver.project_id, name=name, state=state,
            legacy_agent_id=legacy_agent_id, last_heartbeat_at=None,
            activated_at=now if state == "ACTIVE" else None, retired_at=None, created_at=now,
            updated_at=now, revision=1)
        s.add(row)
        if legacy_agent_id:
            await self.store.flush_unique(s, "legacy agent", {"legacy_agent_id": legacy_agent_id})
        await self.store.agent_changed(s, compat_pb2.AGENT_CHANGE_KIND_INSTANCE, row.tenant_id,
                                       instance_id=row.id, version_id=ver.id,
                                       legacy_agent_id=legacy_agent_id)
        await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_INSTANCE_CREATED,
                                target_type="agent_instance", target_id=row.id,
                                project_id=row.project_id, template_id=row.template_id,
                                version_id=ver.id, instance_id=row.id,
                                summary=f"instance {name} created in {env.name}",
                                after={"state": state, "environment_id": env.id,
                                       "legacy_agent_id": legacy_agent_id or ""})
        return row

    async def get_instance(self, p: Principal, request: agents_pb2.GetAgentInstanceRequest
                           ) -> agents_pb2.GetAgentInstanceResponse:
        async def read(s: AsyncSession) -> agents_pb2.GetAgentInstanceResponse:
            row = await self.store.get(s, models.AgentInstance, request.id, p.tenant_id, "agent_instance")
            if not (p.is_agent and p.actor_id == row.id):
                p.require("registry:read", project_id=row.project_id, environment_id=row.environment_id)
            return agents_pb2.GetAgentInstanceResponse(agent_instance=convert.instance(row))

        return await self.store.read(read)

    async def list_instances(self, p: Principal, request: agents_pb2.ListAgentInstancesRequest
                             ) -> agents_pb2.ListAgentInstancesResponse:
        filters: dict[str, Any] = {
            "template_id": request.template_id, "version_id": request.version_id,
            "environment_id": request.environment_id, "project_id": request.project_id,
            "state": convert.instance_state_name(request.state) if request.state else ""}
        if request.agent_ref:
            p.require("registry:read", project_id=request.project_id)
            ref = await self._match_ref(p, request.agent_ref)
            if ref is None:
                return agents_pb2.ListAgentInstancesResponse()
            filters["id"] = ref
            filters["agent_ref"] = request.agent_ref  # part of the page-token fingerprint only

        def build(rows: Sequence[Any], tok: str) -> agents_pb2.ListAgentInstancesResponse:
            return agents_pb2.ListAgentInstancesResponse(
                agent_instances=[convert.instance(r) for r in rows], next_page_token=tok)

        columns = {k: v for k, v in filters.items() if k != "agent_ref"}
        return await list_page(self.store, p, request, "registry:read", models.AgentInstance, columns,
                               build, project_id=request.project_id, token_scope=filters)

    async def _match_ref(self, p: Principal, agent_ref: str) -> str | None:
        """Instance id for a reference that may be either id; ARM_COMPAT_MODE picks which first."""
        async def read(s: AsyncSession) -> str | None:
            by_legacy = select(models.AgentInstance.id).where(
                models.AgentInstance.tenant_id == p.tenant_id,
                models.AgentInstance.legacy_agent_id == agent_ref)
            by_id = select(models.AgentInstance.id).where(
                models.AgentInstance.tenant_id == p.tenant_id, models.AgentInstance.id == agent_ref)
            for q in ((by_legacy, by_id) if self.compat_mode else (by_id, by_legacy)):
                found = (await s.execute(q)).scalar_one_or_none()
                if found:
                    return found
            return None

        return await self.store.read(read)

    async def transition_instance(self, p: Principal, request: agents_pb2.TransitionAgentInstanceRequest,
                                  *, api_key: str) -> agents_pb2.TransitionAgentInstanceResponse:
        """`api_key`: the caller's key, for asking governance about the approval on the caller's
        behalf."""
        target = convert.instance_state_name(request.to_state)

        async def current_state(s: AsyncSession) -> str:
            return (await self.store.get(s, models.AgentInstance, request.id, p.tenant_id, "agent_instance")).state

        approval = None
        if target == "ACTIVE" and await self.store.read(current_state) == "QUARANTINED":
            if not request.approval_id:
                raise FailedPrecondition(
                    "QUARANTINED → ACTIVE needs an approved INSTANCE_REACTIVATION approval (approval_id)",
                    reason="APPROVAL_REQUIRED", metadata={"action_type": "INSTANCE_REACTIVATION"})
            approval = await self.governance.approved(
                api_key, request.approval_id, approvals_pb2.APPROVAL_ACTION_TYPE_INSTANCE_REACTIVATION,
                instance_id=request.id)

        async def write(s: AsyncSession) -> agents_pb2.TransitionAgentInstanceResponse:
            row = await self.store.get(s, models.AgentInstance, request.id, p.tenant_id,
                                       "agent_instance", for_update=True)
            p.require("instances:transition", project_id=row.project_id,
                      environment_id=row.environment_id)
            self.store.check_etag(row, request.etag)
            domain.check_transition("instance", domain.INSTANCE_TRANSITIONS, row.state, target)
            if row.state == "QUARANTINED" and target == "ACTIVE":
                # The approval must belong to this quarantine: requested after the instance last
                # changed (entered QUARANTINED), so one approval reactivates at most once.
                if approval is None or approval.create_time.ToDatetime(tzinfo=UTC) < row.updated_at:
                    raise FailedPrecondition(
                        "QUARANTINED → ACTIVE needs an INSTANCE_REACTIVATION approval requested during "
                        "this quarantine", reason="APPROVAL_STALE" if approval else "APPROVAL_REQUIRED",
                        metadata={"action_type": "INSTANCE_REACTIVATION", "approval_id": request.approval_id})
            before = row.state
            row.state = target
            if target == "ACTIVE" and row.activated_at is None:
                row.activated_at = utcnow()
            if target == "RETIRED":
                row.retired_at = utcnow()
            self.store.touch(row)
            await self.store.agent_changed(s, compat_pb2.AGENT_CHANGE_KIND_INSTANCE, row.tenant_id,
                                           instance_id=row.id, version_id=row.version_id,
                                           legacy_agent_id=row.legacy_agent_id)
            await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_INSTANCE_TRANSITIONED,
                                    target_type="agent_instance", target_id=row.id,
                                    project_id=row.project_id, template_id=row.template_id,
                                    version_id=row.version_id, instance_id=row.id,
                                    summary=f"instance {before} → {target}",
                                    before={"state": before}, after={"state": target},
                                    reason=request.reason,
                                    payload={"approval_id": request.approval_id} if approval else None)
            return agents_pb2.TransitionAgentInstanceResponse(agent_instance=convert.instance(row))

        result = await self.store.write(p, "TransitionAgentInstance", request,
                                        agents_pb2.TransitionAgentInstanceResponse, write)
        if self.authenticator is not None:  # a retired instance's keys stop working at once
            self.authenticator.apply_notice({"k": compat_pb2.AGENT_CHANGE_KIND_INSTANCE, "t": p.tenant_id,
                                             "i": request.id})
        return result

    async def record_heartbeat(self, p: Principal, request: agents_pb2.RecordHeartbeatRequest
                               ) -> agents_pb2.RecordHeartbeatResponse:
        async def write(s: AsyncSession) -> agents_pb2.RecordHeartbeatResponse:
            row = await self.store.get(s, models.AgentInstance, request.id, p.tenant_id,
                                       "agent_instance", for_update=True)
            if not (p.is_agent and p.actor_id == row.id):
                p.require("registry:write", project_id=row.project_id)
            row.last_heartbeat_at = utcnow()  # liveness, not a change: no revision bump or record
            return agents_pb2.RecordHeartbeatResponse(agent_instance=convert.instance(row))

        return await self.store.db.run(write)

    async def rebind_instances(self, p: Principal, request: agents_pb2.RebindAgentInstancesRequest
                               ) -> agents_pb2.RebindAgentInstancesResponse:
        async def write(s: AsyncSession) -> agents_pb2.RebindAgentInstancesResponse:
            ver = await self.store.get(s, models.AgentVersion, request.version_id, p.tenant_id, "agent_version")
            env = await self.store.get(s, models.Environment, request.environment_id, p.tenant_id, "environment")
            if not (p.has("registry:write", project_id=ver.project_id, environment_id=env.id)
                    or p.has("deployments:activate", project_id=ver.project_id, environment_id=env.id)
                    or p.has("deployments:write", project_id=ver.project_id, environment_id=env.id)):
                p.require("registry:write", project_id=ver.project_id)
            if ver.template_id != request.template_id:
                # NOT_FOUND for a template outside the caller's tenant, like any other id.
                await self.store.get(s, models.AgentTemplate, request.template_id, p.tenant_id, "agent_template")
                raise InvalidArgument("the version belongs to another template", reason="INVALID_FIELDS",
                                      violations=[FieldViolation("version_id", "must be a version of template_id")])
            if ver.state not in ("APPROVED", "DEPRECATED"):
                raise FailedPrecondition(f"instances are rebound to APPROVED (or DEPRECATED) versions; "
                                         f"version {ver.number} is {ver.state}", reason="VERSION_NOT_DEPLOYABLE",
                                         metadata={"version_state": ver.state})
            m = models.AgentInstance
            rows = (await s.execute(select(m).where(
                m.tenant_id == p.tenant_id, m.template_id == request.template_id,
                m.environment_id == env.id, m.state != "RETIRED", m.version_id != ver.id)
                .order_by(m.id).with_for_update())).scalars().all()
            for row in rows:
                before = row.version_id
                row.version_id = ver.id
                self.store.touch(row)
                await self.store.agent_changed(s, compat_pb2.AGENT_CHANGE_KIND_INSTANCE, row.tenant_id,
                                               instance_id=row.id, version_id=ver.id,
                                               legacy_agent_id=row.legacy_agent_id)
                await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_REGISTRY_UPDATED,
                                        target_type="agent_instance", target_id=row.id,
                                        project_id=row.project_id, template_id=row.template_id,
                                        version_id=ver.id, instance_id=row.id,
                                        summary=f"instance rebound to version {ver.number}",
                                        before={"version_id": before}, after={"version_id": ver.id},
                                        reason=request.reason)
            return agents_pb2.RebindAgentInstancesResponse(agent_instances=[convert.instance(r) for r in rows])

        return await self.store.write(p, "RebindAgentInstances", request,
                                      agents_pb2.RebindAgentInstancesResponse, write)

    # identities

    async def upsert_identity(self, p: Principal, request: agents_pb2.UpsertAgentIdentityRequest
                              ) -> agents_pb2.UpsertAgentIdentityResponse:
        ident = request.agent_identity
        p.require("registry:write")
        status, soul_hash = domain.identity_status(ident.soul_content, ident.soul_hash, ident.tools_notes)

        async def write(s: AsyncSession) -> agents_pb2.UpsertAgentIdentityResponse:
            if ident.template_id:
                await self.store.get(s, models.AgentTemplate, ident.template_id, p.tenant_id, "agent_template")
            if ident.instance_id:
                await self.store.get(s, models.AgentInstance, ident.instance_id, p.tenant_id, "agent_instance")
            row = (await s.execute(select(models.AgentIdentity).where(
                models.AgentIdentity.tenant_id == p.tenant_id,
                models.AgentIdentity.name == ident.name).with_for_update())).scalar_one_or_none()
            created = row is None
            now = utcnow()
            before = None
            if row is None:
                row = models.AgentIdentity(id=new_id("idn"), tenant_id=p.tenant_id, name=ident.name,
                                           created_at=now, updated_at=now, revision=1,
                                           validation_status=status)
                s.add(row)
            else:
                self.store.check_etag(row, ident.etag)
                before = {"soul_hash": row.soul_hash, "validation_status": row.validation_status}
                self.store.touch(row)
            row.soul_content, row.soul_hash, row.tools_notes = ident.soul_content, soul_hash, ident.tools_notes
            row.validation_status = status
            row.template_id, row.instance_id = ident.template_id, ident.instance_id
            row.legacy_agent_id, row.description = ident.legacy_agent_id, ident.description
            await self.store.flush_unique(s, "identity", {"name": ident.name})
            await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_IDENTITY_UPDATED,
                                    target_type="agent_identity", target_id=row.id,
                                    template_id=row.template_id, instance_id=row.instance_id,
                                    summary=f"identity {row.name} {'created' if created else 'updated'}",
                                    before=before, after={"soul_hash": soul_hash,
                                                          "validation_status": status})
            return agents_pb2.UpsertAgentIdentityResponse(agent_identity=convert.identity(row),
                                                          created=created)

        return await self.store.write(p, "UpsertAgentIdentity", request,
                                      agents_pb2.UpsertAgentIdentityResponse, write)

    async def get_identity(self, p: Principal, request: agents_pb2.GetAgentIdentityRequest
                           ) -> agents_pb2.GetAgentIdentityResponse:
        return await get_one(self.store, p, models.AgentIdentity, request.id, "agent_identity",
                             lambda row: agents_pb2.GetAgentIdentityResponse(agent_identity=convert.identity(row)))

    async def list_identities(self, p: Principal, request: agents_pb2.ListAgentIdentitiesRequest
                              ) -> agents_pb2.ListAgentIdentitiesResponse:
        return await list_page(self.store, p, request, "registry:read", models.AgentIdentity,
                               {"template_id": request.template_id},
                               lambda rows, tok: agents_pb2.ListAgentIdentitiesResponse(
                                   agent_identities=[convert.identity(r) for r in rows], next_page_token=tok))
