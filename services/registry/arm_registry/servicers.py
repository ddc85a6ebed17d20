"""gRPC servicers of the registry: validate each request at the edge, then hand it with the caller
to one method of the service layer (tenancy, access, agents, compat), which returns the response."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, timestamp_pb2

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
from arm_common.auth import SCOPE_TENANT, current_api_key, current_principal
from arm_common.errors import FailedPrecondition, FieldViolation, InvalidArgument
from arm_common.server import Ctx
from arm_common.tables import utcnow
from arm_registry import convert, domain
from arm_registry.access import Access
from arm_registry.agents import Agents
from arm_registry.compat import Compat
from arm_registry.store import RegistryStore
from arm_registry.tenancy import Tenancy
from arm_registry.validate import check, check_present


def _future_time(field: str, value: timestamp_pb2.Timestamp | None) -> datetime | None:
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

    async def CreateSessionKey(self, request: access_pb2.CreateSessionKeyRequest, context: Ctx) -> Any:
        check(request, ("session_ttl", "ttl"), ("name?", "display_name"))
        return await self.access.create_session_key(current_principal(), request,
                                                    request.ttl.ToTimedelta().total_seconds())

    async def RevokeCallerKey(self, request: access_pb2.RevokeCallerKeyRequest, context: Ctx) -> Any:
        return await self.access.revoke_caller_key(current_principal(), request)


class AgentServicer(agents_pb2_grpc.AgentServiceServicer):
    def __init__(self, agents: Agents) -> None:
        self.agents = agents

    # templates

    async def CreateAgentTemplate(self, request: agents_pb2.CreateAgentTemplateRequest, context: Ctx) -> Any:
        check(request, ("id", "project_id"), ("slug", "slug"), ("name", "name"),
              ("text?", "description"), ("list", "owners"), ("list", "tags"))
        return await self.agents.create_template(current_principal(), request)

    async def GetAgentTemplate(self, request: agents_pb2.GetAgentTemplateRequest, context: Ctx) -> Any:
        check(request, ("id", "id"))
        return await self.agents.get_template(current_principal(), request)

    async def ListAgentTemplates(self, request: agents_pb2.ListAgentTemplatesRequest, context: Ctx) -> Any:
        check(request, ("id?", "project_id"))
        return await self.agents.list_templates(current_principal(), request)

    async def UpdateAgentTemplate(self, request: agents_pb2.UpdateAgentTemplateRequest, context: Ctx) -> Any:
        check(request, ("id", "id"), ("list", "owners"), ("list", "tags"))
        check_present(request, ("name", "name"), ("text?", "description"))
        return await self.agents.update_template(current_principal(), request)

    # versions

    async def CreateAgentVersion(self, request: agents_pb2.CreateAgentVersionRequest, context: Ctx) -> Any:
        check(request, ("id", "template_id"), ("id?", "parent_version_id"), ("text?", "notes"))
        if not request.HasField("genome"):
            raise InvalidArgument("genome is required", reason="INVALID_FIELDS",
                                  violations=[FieldViolation("genome", "is required")])
        genome_text, genome_hash = RegistryStore.genome_text(json_format.MessageToDict(request.genome))
        return await self.agents.create_version(current_principal(), request, genome_text, genome_hash)

    async def GetAgentVersion(self, request: agents_pb2.GetAgentVersionRequest, context: Ctx) -> Any:
        check(request, ("id", "id"))
        return await self.agents.get_version(current_principal(), request)

    async def ListAgentVersions(self, request: agents_pb2.ListAgentVersionsRequest, context: Ctx) -> Any:
        check(request, ("id?", "template_id"), ("enum?", "state"))
        return await self.agents.list_versions(current_principal(), request)

    async def TransitionAgentVersion(self, request: agents_pb2.TransitionAgentVersionRequest, context: Ctx) -> Any:
        check(request, ("id", "id"), ("enum", "to_state"), ("id?", "approval_id"))
        target = convert.version_state_name(request.to_state)
        p = current_principal()
        if request.approval_id and target != "APPROVED":
            raise InvalidArgument("approval_id is only used for CANDIDATE → APPROVED",
                                  reason="INVALID_FIELDS", violations=[FieldViolation(
                                      "approval_id", "only for to_state APPROVED")])
        return await self.agents.transition_version(p, request, target, api_key=current_api_key())

    async def RecordEvaluation(self, request: agents_pb2.RecordEvaluationRequest, context: Ctx) -> Any:
        check(request, ("id", "id"), ("enum", "eval_status"), ("text?", "summary"))
        return await self.agents.record_evaluation(current_principal(), request)

    # instances

    async def CreateAgentInstance(self, request: agents_pb2.CreateAgentInstanceRequest, context: Ctx) -> Any:
        check(request, ("id", "version_id"), ("id", "environment_id"), ("name", "name"),
              ("id?", "legacy_agent_id"))
        return await self.agents.create_instance(current_principal(), request, api_key=current_api_key())

    async def GetAgentInstance(self, request: agents_pb2.GetAgentInstanceRequest, context: Ctx) -> Any:
        check(request, ("id", "id"))
        return await self.agents.get_instance(current_principal(), request)

    async def ListAgentInstances(self, request: agents_pb2.ListAgentInstancesRequest, context: Ctx) -> Any:
        check(request, ("id?", "template_id"), ("id?", "version_id"), ("id?", "environment_id"),
              ("id?", "project_id"), ("enum?", "state"), ("id?", "agent_ref"))
        return await self.agents.list_instances(current_principal(), request)

    async def TransitionAgentInstance(self, request: agents_pb2.TransitionAgentInstanceRequest, context: Ctx) -> Any:
        check(request, ("id", "id"), ("enum", "to_state"), ("id?", "approval_id"))
        return await self.agents.transition_instance(current_principal(), request, api_key=current_api_key())

    async def RecordHeartbeat(self, request: agents_pb2.RecordHeartbeatRequest, context: Ctx) -> Any:
        check(request, ("id", "id"))
        return await self.agents.record_heartbeat(current_principal(), request)

    async def RebindAgentInstances(self, request: agents_pb2.RebindAgentInstancesRequest, context: Ctx) -> Any:
        check(request, ("id", "template_id"), ("id", "environment_id"), ("id", "version_id"), ("text?", "reason"))
        return await self.agents.rebind_instances(current_principal(), request)

    # identities

    async def UpsertAgentIdentity(self, request: agents_pb2.UpsertAgentIdentityRequest, context: Ctx) -> Any:
        check(request)
        check(request.agent_identity, ("name", "name"), ("id?", "template_id"), ("id?", "instance_id"),
              ("id?", "legacy_agent_id"), ("name?", "soul_hash"), ("long?", "soul_content"),
              ("text?", "tools_notes"), ("text?", "description"), prefix="agent_identity.")
        return await self.agents.upsert_identity(current_principal(), request)

    async def GetAgentIdentity(self, request: agents_pb2.GetAgentIdentityRequest, context: Ctx) -> Any:
        check(request, ("id", "id"))
        return await self.agents.get_identity(current_principal(), request)

    async def ListAgentIdentities(self, request: agents_pb2.ListAgentIdentitiesRequest, context: Ctx) -> Any:
        check(request, ("id?", "template_id"))
        return await self.agents.list_identities(current_principal(), request)


_AUTH_KINDS = (compat_pb2.AGENT_CHANGE_KIND_API_KEY, compat_pb2.AGENT_CHANGE_KIND_OPERATOR)


class CompatServicer(compat_pb2_grpc.CompatServiceServicer):
    def __init__(self, compat: Compat, store: RegistryStore) -> None:
        self.compat = compat
        self.store = store  # for its change notices, which WatchAgentChanges streams

    async def ResolveAgentRef(self, request: compat_pb2.ResolveAgentRefRequest, context: Ctx) -> Any:
        which = request.WhichOneof("ref")
        if which is None:
            raise InvalidArgument("one of instance_id, legacy_agent_id, agent_ref is required",
                                  reason="INVALID_FIELDS",
                                  violations=[FieldViolation("ref", "set one of instance_id, legacy_agent_id, agent_ref")])
        check(request, ("id", which))
        return await self.compat.resolve_agent_ref(current_principal(), request, which)

    async def EnsureInstanceForLegacyAgent(self, request: compat_pb2.EnsureInstanceForLegacyAgentRequest, context: Ctx) -> Any:
        check(request, ("id", "legacy_agent_id"), ("name?", "name"), ("id?", "project_id"),
              ("id?", "environment_id"), ("name?", "legacy_status"))
        return await self.compat.ensure_instance_for_legacy_agent(current_principal(), request)

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
                elif not every_tenant and notice["k"] in _AUTH_KINDS:
                    continue  # key and operator changes are for the services' auth caches only
                elif every_tenant or notice.get("t") == p.tenant_id:
                    change = compat_pb2.AgentChange(
                        kind=notice["k"], tenant_id=notice["t"], instance_id=notice["i"],
                        version_id=notice["v"], legacy_agent_id=notice["l"],
                        api_key_id=notice.get("a", ""), operator_id=notice.get("o", ""))
                else:
                    continue
                yield compat_pb2.WatchAgentChangesResponse(change=change)
        finally:
            self.store.changes.unsubscribe(queue)

    async def GetAgentByLegacyId(self, request: compat_pb2.GetAgentByLegacyIdRequest, context: Ctx) -> Any:
        check(request, ("id", "legacy_agent_id"))
        return await self.compat.get_agent_by_legacy_id(current_principal(), request)
