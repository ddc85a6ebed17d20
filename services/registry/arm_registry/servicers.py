"""gRPC servicers of the registry: validate at the edge, check the caller's permission, run the
operation in one transaction through the store (with its change record), convert to protobuf."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from google.protobuf import json_format
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from arm.governance.v1 import approvals_pb2
from arm.registry.v1 import (
    access_pb2,
    access_pb2_grpc,
    agents_pb2,
    agents_pb2_grpc,
    compat_pb2,
    compat_pb2_grpc,
    tenancy_pb2,
    tenancy_pb2_grpc,
)
from arm_common import pagination
from arm_common.auth import SCOPE_TENANT, Principal, current_api_key, current_principal
from arm_common.errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from arm_common.ids import new_id
from arm_common.server import Ctx
from arm_common.tables import utcnow
from arm_registry import convert, domain, models
from arm_registry.access import Access
from arm_registry.governance import Governance
from arm_registry.store import CR, RegistryStore
from arm_registry.tenancy import Tenancy
from arm_registry.validate import check, check_present


def _version_state(value: int) -> str:
    return agents_pb2.VersionState.Name(value).removeprefix("VERSION_STATE_")


def _instance_state(value: int) -> str:
    return agents_pb2.InstanceState.Name(value).removeprefix("INSTANCE_STATE_")


def _future_time(field: str, value: Any) -> Any:
    if value is None:
        return None
    when = value.ToDatetime(tzinfo=UTC)
    if when <= utcnow():
        raise InvalidArgument(f"{field} must be in the future", reason="INVALID_FIELDS",
                              violations=[FieldViolation(field, "must be in the future")])
    return when


class TenancyServicer(tenancy_pb2_grpc.TenancyServiceServicer):
    def __init__(self, tenancy: Tenancy) -> None:
        self.tenancy = tenancy

    async def CreateTenant(self, request: tenancy_pb2.CreateTenantRequest, context: Ctx) -> Any:
        rules = [("slug", "slug"), ("name", "name"), ("text?", "description")]
        if request.admin_email or request.admin_name:
            rules += [("email", "admin_email"), ("name", "admin_name")]
        check(request, *rules)
        return await self.tenancy.create_tenant(current_principal(), request)

    async def GetTenant(self, request: tenancy_pb2.GetTenantRequest, context: Ctx) -> Any:
        check(request, ("id", "id"))
        return await self.tenancy.get_tenant(current_principal(), request)

    async def ListTenants(self, request: tenancy_pb2.ListTenantsRequest, context: Ctx) -> Any:
        check(request)
        return await self.tenancy.list_tenants(current_principal(), request)

    async def UpdateTenant(self, request: tenancy_pb2.UpdateTenantRequest, context: Ctx) -> Any:
        check(request, ("id", "id"))
        check_present(request, ("name", "name"), ("text?", "description"))
        return await self.tenancy.update_tenant(current_principal(), request)

    # environments

    async def CreateEnvironment(self, request: tenancy_pb2.CreateEnvironmentRequest, context: Ctx) -> Any:
        check(request, ("name", "name"), ("enum", "type"))
        return await self.tenancy.create_environment(current_principal(), request)

    async def GetEnvironment(self, request: tenancy_pb2.GetEnvironmentRequest, context: Ctx) -> Any:
        check(request, ("id", "id"))
        return await self.tenancy.get_environment(current_principal(), request)

    async def ListEnvironments(self, request: tenancy_pb2.ListEnvironmentsRequest, context: Ctx) -> Any:
        check(request)
        return await self.tenancy.list_environments(current_principal(), request)

    async def UpdateEnvironment(self, request: tenancy_pb2.UpdateEnvironmentRequest, context: Ctx) -> Any:
        check(request, ("id", "id"))
        check_present(request, ("name", "name"))
        return await self.tenancy.update_environment(current_principal(), request)

    # projects

    async def CreateProject(self, request: tenancy_pb2.CreateProjectRequest, context: Ctx) -> Any:
        check(request, ("slug", "slug"), ("name", "name"), ("text?", "description"))
        return await self.tenancy.create_project(current_principal(), request)

    async def GetProject(self, request: tenancy_pb2.GetProjectRequest, context: Ctx) -> Any:
        check(request, ("id", "id"))
        return await self.tenancy.get_project(current_principal(), request)

    async def ListProjects(self, request: tenancy_pb2.ListProjectsRequest, context: Ctx) -> Any:
        check(request)
        return await self.tenancy.list_projects(current_principal(), request)

    async def UpdateProject(self, request: tenancy_pb2.UpdateProjectRequest, context: Ctx) -> Any:
        check(request, ("id", "id"))
        check_present(request, ("name", "name"), ("text?", "description"))
        return await self.tenancy.update_project(current_principal(), request)


async def _list(store: RegistryStore, request: Any, permission: str, model: Any,
                filters: dict[str, Any], build: Any, *, project_id: str = "",
                token_scope: dict[str, Any] | None = None) -> Any:
    """The standard tenant-scoped, id-ordered, paginated list with equality filters.
    token_scope: what a page token is bound to, when it differs from the column filters."""
    check(request)
    p = current_principal()
    p.require(permission, project_id=project_id)
    size = pagination.page_size(request.page_size)
    fingerprint = {"m": model.__tablename__, **(filters if token_scope is None else token_scope)}
    after = pagination.decode_token(request.page_token, fingerprint)

    async def read(s: AsyncSession) -> Any:
        q = select(model).where(model.tenant_id == p.tenant_id)
        for column, value in filters.items():
            if value not in ("", None, 0):
                q = q.where(getattr(model, column) == value)
        rows, last = await store.page(s, q, model.id, size, after)
        return build(rows, pagination.encode_token(last, fingerprint) if last else "")

    return await store.read(read)


async def _get(store: RegistryStore, request: Any, model: Any, kind: str, build: Any, *,
               permission: str = "registry:read", scope: Any = None) -> Any:
    """The standard tenant-scoped read by id. With `scope` (row → project/environment ids) the
    permission is checked against the row, so project- and environment-scoped grants apply."""
    check(request, ("id", "id"))
    p = current_principal()
    if scope is None:
        p.require(permission)

    async def read(s: AsyncSession) -> Any:
        row = await store.get(s, model, request.id, p.tenant_id, kind)
        if scope is not None:
            p.require(permission, **scope(row))
        return build(row)

    return await store.read(read)


class AccessServicer(access_pb2_grpc.AccessServiceServicer):
    def __init__(self, access: Access) -> None:
        self.access = access

    async def Authenticate(self, request: access_pb2.AuthenticateRequest, context: Ctx) -> Any:
        return self.access.authenticate(current_principal())

    async def CreateOperator(self, request: access_pb2.CreateOperatorRequest, context: Ctx) -> Any:
        check(request, ("email", "email"), ("name", "name"), ("name?", "external_subject"))
        return await self.access.create_operator(current_principal(), request)

    async def GetOperator(self, request: access_pb2.GetOperatorRequest, context: Ctx) -> Any:
        check(request, ("id", "id"))
        return await self.access.get_operator(current_principal(), request)

    async def ListOperators(self, request: access_pb2.ListOperatorsRequest, context: Ctx) -> Any:
        check(request)
        return await self.access.list_operators(current_principal(), request)

    async def UpdateOperator(self, request: access_pb2.UpdateOperatorRequest, context: Ctx) -> Any:
        check(request, ("id", "id"))
        check_present(request, ("name", "name"), ("name?", "external_subject"))
        return await self.access.update_operator(current_principal(), request)

    async def ListPermissions(self, request: access_pb2.ListPermissionsRequest, context: Ctx) -> Any:
        return self.access.list_permissions(current_principal())

    async def CreateRole(self, request: access_pb2.CreateRoleRequest, context: Ctx) -> Any:
        check(request, ("name", "name"), ("text?", "description"), ("list", "permissions"))
        unknown = [(i, n) for i, n in enumerate(request.permissions)
                   if n not in domain.PERMISSIONS or n == "tenants:admin"]
        if unknown:
            raise InvalidArgument("unknown permissions: " + ", ".join(n for _, n in unknown),
                                  reason="UNKNOWN_PERMISSION", violations=[
                                      FieldViolation(f"permissions[{i}]", f"{n!r} is not in the catalogue")
                                      for i, n in unknown])
        return await self.access.create_role(current_principal(), request)

    async def GetRole(self, request: access_pb2.GetRoleRequest, context: Ctx) -> Any:
        check(request, ("id", "id"))
        return await self.access.get_role(current_principal(), request)

    async def ListRoles(self, request: access_pb2.ListRolesRequest, context: Ctx) -> Any:
        check(request)
        return await self.access.list_roles(current_principal(), request)

    async def CreateRoleAssignment(self, request: access_pb2.CreateRoleAssignmentRequest, context: Ctx) -> Any:
        check(request, ("id", "operator_id"), ("id", "role_id"), ("enum?", "scope_type"))
        scope = convert.scope_type_name(request.scope_type)
        if scope != SCOPE_TENANT:
            check(request, ("id", "scope_id"))
        expires = _future_time("expire_time", request.expire_time if request.HasField("expire_time") else None)
        return await self.access.create_role_assignment(current_principal(), request, scope, expires)

    async def ListRoleAssignments(self, request: access_pb2.ListRoleAssignmentsRequest, context: Ctx) -> Any:
        check(request, ("id?", "operator_id"))
        return await self.access.list_role_assignments(current_principal(), request)

    async def DeleteRoleAssignment(self, request: access_pb2.DeleteRoleAssignmentRequest, context: Ctx) -> Any:
        check(request, ("id", "id"))
        return await self.access.delete_role_assignment(current_principal(), request)

    async def CreateApiKey(self, request: access_pb2.CreateApiKeyRequest, context: Ctx) -> Any:
        check(request, ("id?", "operator_id"), ("id?", "instance_id"), ("name?", "display_name"))
        if bool(request.operator_id) == bool(request.instance_id):
            raise InvalidArgument("exactly one of operator_id and instance_id must be set",
                                  reason="INVALID_FIELDS", violations=[
                                      FieldViolation("operator_id", "set exactly one of operator_id, instance_id")])
        expires = _future_time("expire_time", request.expire_time if request.HasField("expire_time") else None)
        return await self.access.create_api_key(current_principal(), request, expires)

    async def ListApiKeys(self, request: access_pb2.ListApiKeysRequest, context: Ctx) -> Any:
        check(request, ("id?", "operator_id"), ("id?", "instance_id"))
        return await self.access.list_api_keys(current_principal(), request)

    async def RevokeApiKey(self, request: access_pb2.RevokeApiKeyRequest, context: Ctx) -> Any:
        check(request, ("id", "id"))
        return await self.access.revoke_api_key(current_principal(), request)


class AgentServicer(agents_pb2_grpc.AgentServiceServicer):
    def __init__(self, store: RegistryStore, compat_mode: bool, authenticator: Any = None,
                 governance: Governance | None = None) -> None:
        self.store = store
        self.compat_mode = compat_mode
        self.authenticator = authenticator
        self.governance = governance or Governance(None)

    # templates

    async def CreateAgentTemplate(self, request: agents_pb2.CreateAgentTemplateRequest, context: Ctx) -> Any:
        check(request, ("id", "project_id"), ("slug", "slug"), ("name", "name"),
              ("text?", "description"), ("list", "owners"), ("list", "tags"))
        p = current_principal()
        p.require("registry:write", project_id=request.project_id)

        async def write(s: AsyncSession) -> Any:
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

    async def GetAgentTemplate(self, request: agents_pb2.GetAgentTemplateRequest, context: Ctx) -> Any:
        return await _get(self.store, request, models.AgentTemplate, "agent_template",
                          lambda row: agents_pb2.GetAgentTemplateResponse(agent_template=convert.template(row)),
                          scope=lambda row: {"project_id": row.project_id})

    async def ListAgentTemplates(self, request: agents_pb2.ListAgentTemplatesRequest, context: Ctx) -> Any:
        check(request, ("id?", "project_id"))
        return await _list(self.store, request, "registry:read", models.AgentTemplate,
                           {"project_id": request.project_id},
                           lambda rows, tok: agents_pb2.ListAgentTemplatesResponse(
                               agent_templates=[convert.template(r) for r in rows], next_page_token=tok),
                           project_id=request.project_id)

    async def UpdateAgentTemplate(self, request: agents_pb2.UpdateAgentTemplateRequest, context: Ctx) -> Any:
        check(request, ("id", "id"), ("list", "owners"), ("list", "tags"))
        check_present(request, ("name", "name"), ("text?", "description"))
        p = current_principal()

        async def write(s: AsyncSession) -> Any:
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

    async def CreateAgentVersion(self, request: agents_pb2.CreateAgentVersionRequest, context: Ctx) -> Any:
        check(request, ("id", "template_id"), ("id?", "parent_version_id"), ("text?", "notes"))
        if not request.HasField("genome"):
            raise InvalidArgument("genome is required", reason="INVALID_FIELDS",
                                  violations=[FieldViolation("genome", "is required")])
        genome_text, genome_hash = self.store.genome_text(json_format.MessageToDict(request.genome))
        p = current_principal()

        async def write(s: AsyncSession) -> Any:
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

    async def GetAgentVersion(self, request: agents_pb2.GetAgentVersionRequest, context: Ctx) -> Any:
        return await _get(self.store, request, models.AgentVersion, "agent_version",
                          lambda row: agents_pb2.GetAgentVersionResponse(agent_version=convert.version(row)),
                          scope=lambda row: {"project_id": row.project_id})

    async def ListAgentVersions(self, request: agents_pb2.ListAgentVersionsRequest, context: Ctx) -> Any:
        check(request, ("id?", "template_id"), ("enum?", "state"))
        state = _version_state(request.state) if request.state else ""
        return await _list(self.store, request, "registry:read", models.AgentVersion,
                           {"template_id": request.template_id, "state": state},
                           lambda rows, tok: agents_pb2.ListAgentVersionsResponse(
                               agent_versions=[convert.version(r) for r in rows], next_page_token=tok))

    async def TransitionAgentVersion(self, request: agents_pb2.TransitionAgentVersionRequest, context: Ctx) -> Any:
        check(request, ("id", "id"), ("enum", "to_state"), ("id?", "approval_id"))
        target = _version_state(request.to_state)
        p = current_principal()
        approval = None
        if request.approval_id:
            if target != "APPROVED":
                raise InvalidArgument("approval_id is only used for CANDIDATE → APPROVED",
                                      reason="INVALID_FIELDS", violations=[FieldViolation(
                                          "approval_id", "only for to_state APPROVED")])
            # Checked before the transaction: the call goes to another service.
            approval = await self.governance.approved(
                current_api_key(), request.approval_id, approvals_pb2.APPROVAL_ACTION_TYPE_VERSION_PROMOTION,
                version_id=request.id)
        deciders = [d.operator_id for d in approval.decisions
                    if d.verdict == approvals_pb2.APPROVAL_VERDICT_APPROVE] if approval else []

        async def write(s: AsyncSession) -> Any:
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

    async def RecordEvaluation(self, request: agents_pb2.RecordEvaluationRequest, context: Ctx) -> Any:
        check(request, ("id", "id"), ("enum", "eval_status"), ("text?", "summary"))
        status = agents_pb2.EvalStatus.Name(request.eval_status).removeprefix("EVAL_STATUS_")
        p = current_principal()

        async def write(s: AsyncSession) -> Any:
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

    async def CreateAgentInstance(self, request: agents_pb2.CreateAgentInstanceRequest, context: Ctx) -> Any:
        check(request, ("id", "version_id"), ("id", "environment_id"), ("name", "name"),
              ("id?", "legacy_agent_id"))
        p = current_principal()

        async def lookup(s: AsyncSession) -> Any:
            ver = await self.store.get(s, models.AgentVersion, request.version_id, p.tenant_id, "agent_version")
            env = await self.store.get(s, models.Environment, request.environment_id, p.tenant_id, "environment")
            return ver.template_id, env.require_active_deployment

        template_id, gated = await self.store.read(lookup)
        active_version = None
        if gated:  # asked before the transaction: the call goes to another service
            active_version = await self.governance.active_version(current_api_key(), template_id,
                                                                  request.environment_id)

        async def write(s: AsyncSession) -> Any:
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

    async def GetAgentInstance(self, request: agents_pb2.GetAgentInstanceRequest, context: Ctx) -> Any:
        check(request, ("id", "id"))
        p = current_principal()

        async def read(s: AsyncSession) -> Any:
            row = await self.store.get(s, models.AgentInstance, request.id, p.tenant_id, "agent_instance")
            if not (p.is_agent and p.actor_id == row.id):
                p.require("registry:read", project_id=row.project_id, environment_id=row.environment_id)
            return agents_pb2.GetAgentInstanceResponse(agent_instance=convert.instance(row))

        return await self.store.read(read)

    async def ListAgentInstances(self, request: agents_pb2.ListAgentInstancesRequest, context: Ctx) -> Any:
        check(request, ("id?", "template_id"), ("id?", "version_id"), ("id?", "environment_id"),
              ("id?", "project_id"), ("enum?", "state"), ("id?", "agent_ref"))
        filters: dict[str, Any] = {
            "template_id": request.template_id, "version_id": request.version_id,
            "environment_id": request.environment_id, "project_id": request.project_id,
            "state": _instance_state(request.state) if request.state else ""}
        if request.agent_ref:
            current_principal().require("registry:read", project_id=request.project_id)
            ref = await self._match_ref(request.agent_ref)
            if ref is None:
                return agents_pb2.ListAgentInstancesResponse()
            filters["id"] = ref
            filters["agent_ref"] = request.agent_ref  # part of the page-token fingerprint only

        def build(rows: Any, tok: str) -> Any:
            return agents_pb2.ListAgentInstancesResponse(
                agent_instances=[convert.instance(r) for r in rows], next_page_token=tok)

        columns = {k: v for k, v in filters.items() if k != "agent_ref"}
        return await _list(self.store, request, "registry:read", models.AgentInstance, columns,
                           build, project_id=request.project_id, token_scope=filters)

    async def _match_ref(self, agent_ref: str) -> str | None:
        """Instance id for a reference that may be either id; ARM_COMPAT_MODE picks which first."""
        p = current_principal()

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

    async def TransitionAgentInstance(self, request: agents_pb2.TransitionAgentInstanceRequest, context: Ctx) -> Any:
        check(request, ("id", "id"), ("enum", "to_state"), ("id?", "approval_id"))
        target = _instance_state(request.to_state)
        p = current_principal()

        async def current_state(s: AsyncSession) -> str:
            return (await self.store.get(s, models.AgentInstance, request.id, p.tenant_id, "agent_instance")).state

        approval = None
        if target == "ACTIVE" and await self.store.read(current_state) == "QUARANTINED":
            if not request.approval_id:
                raise FailedPrecondition(
                    "QUARANTINED → ACTIVE needs an approved INSTANCE_REACTIVATION approval (approval_id)",
                    reason="APPROVAL_REQUIRED", metadata={"action_type": "INSTANCE_REACTIVATION"})
            approval = await self.governance.approved(
                current_api_key(), request.approval_id, approvals_pb2.APPROVAL_ACTION_TYPE_INSTANCE_REACTIVATION,
                instance_id=request.id)

        async def write(s: AsyncSession) -> Any:
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
            self.authenticator.invalidate()
        return result

    async def RecordHeartbeat(self, request: agents_pb2.RecordHeartbeatRequest, context: Ctx) -> Any:
        check(request, ("id", "id"))
        p = current_principal()

        async def write(s: AsyncSession) -> Any:
            row = await self.store.get(s, models.AgentInstance, request.id, p.tenant_id,
                                       "agent_instance", for_update=True)
            if not (p.is_agent and p.actor_id == row.id):
                p.require("registry:write", project_id=row.project_id)
            row.last_heartbeat_at = utcnow()  # liveness, not a change: no revision bump or record
            return agents_pb2.RecordHeartbeatResponse(agent_instance=convert.instance(row))

        return await self.store.db.run(write)

    async def RebindAgentInstances(self, request: agents_pb2.RebindAgentInstancesRequest, context: Ctx) -> Any:
        check(request, ("id", "template_id"), ("id", "environment_id"), ("id", "version_id"), ("text?", "reason"))
        p = current_principal()

        async def write(s: AsyncSession) -> Any:
            ver = await self.store.get(s, models.AgentVersion, request.version_id, p.tenant_id, "agent_version")
            env = await self.store.get(s, models.Environment, request.environment_id, p.tenant_id, "environment")
            if not (p.has("registry:write", project_id=ver.project_id, environment_id=env.id)
                    or p.has("deployments:activate", project_id=ver.project_id, environment_id=env.id)
                    or p.has("deployments:write", project_id=ver.project_id, environment_id=env.id)):
                p.require("registry:write", project_id=ver.project_id)
            if ver.template_id != request.template_id:
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

    async def UpsertAgentIdentity(self, request: agents_pb2.UpsertAgentIdentityRequest, context: Ctx) -> Any:
        check(request)
        ident = request.agent_identity
        check(ident, ("name", "name"), ("id?", "template_id"), ("id?", "instance_id"),
              ("id?", "legacy_agent_id"), ("name?", "soul_hash"), ("long?", "soul_content"),
              ("text?", "tools_notes"), ("text?", "description"), prefix="agent_identity.")
        p = current_principal()
        p.require("registry:write")
        status, soul_hash = domain.identity_status(ident.soul_content, ident.soul_hash, ident.tools_notes)

        async def write(s: AsyncSession) -> Any:
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

    async def GetAgentIdentity(self, request: agents_pb2.GetAgentIdentityRequest, context: Ctx) -> Any:
        return await _get(self.store, request, models.AgentIdentity, "agent_identity",
                          lambda row: agents_pb2.GetAgentIdentityResponse(agent_identity=convert.identity(row)))

    async def ListAgentIdentities(self, request: agents_pb2.ListAgentIdentitiesRequest, context: Ctx) -> Any:
        check(request, ("id?", "template_id"))
        return await _list(self.store, request, "registry:read", models.AgentIdentity,
                           {"template_id": request.template_id},
                           lambda rows, tok: agents_pb2.ListAgentIdentitiesResponse(
                               agent_identities=[convert.identity(r) for r in rows], next_page_token=tok))


class CompatServicer(compat_pb2_grpc.CompatServiceServicer):
    def __init__(self, store: RegistryStore, agents: AgentServicer, compat_mode: bool) -> None:
        self.store = store
        self.agents = agents
        self.compat_mode = compat_mode

    async def _resolve(self, s: AsyncSession, tenant_id: str, column: Any, value: str) -> Any:
        row = (await s.execute(
            select(models.AgentInstance, models.AgentVersion, models.Environment, models.Tenant)
            .join(models.AgentVersion, models.AgentVersion.id == models.AgentInstance.version_id)
            .join(models.Environment, models.Environment.id == models.AgentInstance.environment_id)
            .join(models.Tenant, models.Tenant.id == models.AgentInstance.tenant_id)
            .where(models.AgentInstance.tenant_id == tenant_id, column == value))).first()
        return None if row is None else convert.resolved(*row)

    async def ResolveAgentRef(self, request: compat_pb2.ResolveAgentRefRequest, context: Ctx) -> Any:
        which = request.WhichOneof("ref")
        if which is None:
            raise InvalidArgument("one of instance_id, legacy_agent_id, agent_ref is required",
                                  reason="INVALID_FIELDS",
                                  violations=[FieldViolation("ref", "set one of instance_id, legacy_agent_id, agent_ref")])
        check(request, ("id", which))
        value = getattr(request, which)
        p = current_principal()
        by_id, by_legacy = models.AgentInstance.id, models.AgentInstance.legacy_agent_id
        by_ref: dict[str, list[Any]] = {"instance_id": [by_id], "legacy_agent_id": [by_legacy],
                                         "agent_ref": [by_legacy, by_id] if self.compat_mode else [by_id, by_legacy]}
        columns = by_ref[which]

        async def read(s: AsyncSession) -> Any:
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

    async def EnsureInstanceForLegacyAgent(self, request: compat_pb2.EnsureInstanceForLegacyAgentRequest, context: Ctx) -> Any:
        check(request, ("id", "legacy_agent_id"), ("name?", "name"), ("id?", "project_id"),
              ("id?", "environment_id"), ("name?", "legacy_status"))
        p = current_principal()
        p.require("registry:write")
        name = request.name or request.legacy_agent_id
        store = self.store

        async def existing(s: AsyncSession) -> Any:
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

        async def get_or_create(s: AsyncSession, model: Any, where: list[Any], make: Any) -> Any:
            row = (await s.execute(select(model).where(*where))).scalar_one_or_none()
            if row is None:
                row = make()
                s.add(row)
                await s.flush()
                return row, True
            return row, False

        async def write(s: AsyncSession) -> Any:
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

    async def WatchAgentChanges(self, request: compat_pb2.WatchAgentChangesRequest, context: Ctx) -> Any:
        p = current_principal()
        every_tenant = p.has("tenants:admin")
        if not every_tenant:
            p.require("registry:read")
        if self.store.changes is None:
            raise FailedPrecondition("change notices are not enabled", reason="WATCH_UNAVAILABLE")
        queue = self.store.changes.subscribe()
        try:
            yield compat_pb2.WatchAgentChangesResponse(
                change=compat_pb2.AgentChange(kind=compat_pb2.AGENT_CHANGE_KIND_RESET))
            while True:
                notice = await queue.get()
                if notice.get("reset"):
                    change = compat_pb2.AgentChange(kind=compat_pb2.AGENT_CHANGE_KIND_RESET)
                elif every_tenant or notice.get("t") == p.tenant_id:
                    change = compat_pb2.AgentChange(
                        kind=notice["k"], tenant_id=notice["t"], instance_id=notice["i"],
                        version_id=notice["v"], legacy_agent_id=notice["l"])
                else:
                    continue
                yield compat_pb2.WatchAgentChangesResponse(change=change)
        finally:
            self.store.changes.unsubscribe(queue)

    async def GetAgentByLegacyId(self, request: compat_pb2.GetAgentByLegacyIdRequest, context: Ctx) -> Any:
        check(request, ("id", "legacy_agent_id"))
        p = current_principal()

        async def read(s: AsyncSession) -> Any:
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
