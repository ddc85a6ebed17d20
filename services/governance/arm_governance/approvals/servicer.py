"""gRPC servicers of approvals and deployments: validate at the edge, check permissions, run the
store's transaction (idempotent on request_id), return protobuf."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from arm.governance.v1 import approvals_pb2 as apb
from arm.governance.v1 import approvals_pb2_grpc, deployments_pb2_grpc
from arm.governance.v1 import deployments_pb2 as dpb
from arm.registry.v1 import agents_pb2
from arm_common import validation as val
from arm_common.auth import Principal, current_api_key, current_principal
from arm_common.db import Database
from arm_common.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Violations,
)
from arm_common.idempotency import run_idempotent
from arm_common.outbox import OutboxRelay
from arm_common.server import Ctx
from arm_governance import models
from arm_governance.agent_cache import AgentDirectory
from arm_governance.approvals import service as approvals
from arm_governance.approvals.service import ApprovalStore, Subject
from arm_governance.deployments import service as deployments
from arm_governance.deployments.service import DeploymentStore
from arm_governance.models import IDEMPOTENCY
from arm_governance.registry_calls import RegistryAgents

A = apb.ApprovalActionType


def require_somewhere(p: Principal, permission: str) -> None:
    """PERMISSION_DENIED unless the caller holds the permission at some scope; the store then
    checks it at the resource's project or environment."""
    if not any(g.permission == permission for g in p.grants):
        p.require(permission)


class _Writes:
    db: Database
    relays: list[OutboxRelay]

    async def _write(self, method: str, request: Any, response_type: Any, fn: Any) -> Any:
        p = current_principal()
        result = await run_idempotent(self.db, IDEMPOTENCY, tenant_id=p.tenant_id, method=method,
                                      request=request, response_type=response_type, write=fn)
        for relay in self.relays:
            relay.notify()
        return result


class ApprovalServicer(_Writes, approvals_pb2_grpc.ApprovalServiceServicer):
    def __init__(self, db: Database, store: ApprovalStore, agents: AgentDirectory, registry: RegistryAgents,
                 relays: list[OutboxRelay], watch_recheck_s: float = 5.0) -> None:
        self.db = db
        self.store = store
        self.agents = agents
        self.registry = registry
        self.relays = relays
        self.watch_recheck_s = watch_recheck_s

    async def _subject(self, r: apb.RequestApprovalRequest) -> Subject:
        """Checks that every id the request names (instance, version, target, project) exists in
        the caller's tenant (NOT_FOUND otherwise) and finds the project and version the approval
        concerns."""
        p = current_principal()
        key = current_api_key()
        project = version = ""
        if r.instance_id:
            if p.is_agent and r.instance_id != p.actor_id:
                raise PermissionDenied("an agent key may only request approvals for its own instance",
                                       reason="NOT_YOUR_AGENT", metadata={"instance_id": r.instance_id})
            resolved = await self.agents.resolve(key, p.tenant_id, "instance_id", r.instance_id)
            if resolved is None:
                raise NotFound.of("agent_instance", r.instance_id)
            project, version = resolved.project_id, resolved.version_id
        elif p.is_agent:
            raise PermissionDenied("an agent key may only request approvals for its own instance",
                                   reason="NOT_YOUR_AGENT", metadata={"instance_id": ""})
        if r.version_id and r.version_id != version:
            named = await self.registry.version(key, r.version_id)
            project = project or named.project_id
        if r.target_id:
            project, version = await self._target(r, p, key, project, version)
        if r.project_id and r.project_id != project:
            if p.is_agent:  # an agent's approvals concern its own instance's project only
                raise NotFound.of("project", r.project_id)
            await self.registry.project(key, r.project_id)
            if project:
                raise InvalidArgument(
                    f"project {r.project_id!r} is not the project of what the approval concerns ({project!r})",
                    reason="PROJECT_MISMATCH",
                    violations=[FieldViolation("project_id", "must be empty or the subject's project")])
            project = r.project_id
        return Subject(project_id=project, version_id=version)

    async def _target(self, r: apb.RequestApprovalRequest, p: Principal, key: str, project: str,
                      version: str) -> tuple[str, str]:
        """Checks `target_id` by what the action type says it names: a deployment, a policy
        envelope, a version (VERSION_PROMOTION) or an instance (the other types)."""
        t = r.action_type
        if t == A.APPROVAL_ACTION_TYPE_DEPLOYMENT_ACTIVATION:
            async def deployment(s: AsyncSession) -> tuple[str, str]:
                row = await DeploymentStore.row(s, p.tenant_id, r.target_id)
                return row.project_id, row.target_version_id
            d_project, d_version = await self.db.read(deployment)
            return project or d_project, version or d_version
        if t == A.APPROVAL_ACTION_TYPE_POLICY_AUTONOMY_INCREASE:
            async def envelope(s: AsyncSession) -> None:
                e = models.PolicyEnvelope
                if (await s.execute(select(e.id).where(e.id == r.target_id, e.tenant_id == p.tenant_id))).first() is None:
                    raise NotFound.of("policy_envelope", r.target_id)
            await self.db.read(envelope)
            return project, version
        if t == A.APPROVAL_ACTION_TYPE_VERSION_PROMOTION:
            if r.target_id not in (r.version_id, version):
                named = await self.registry.version(key, r.target_id)
                project = project or named.project_id
            return project, version
        if r.target_id != r.instance_id:
            if p.is_agent:
                raise NotFound.of("agent_instance", r.target_id)
            resolved = await self.agents.resolve(key, p.tenant_id, "instance_id", r.target_id)
            if resolved is None:
                raise NotFound.of("agent_instance", r.target_id)
            project = project or resolved.project_id
        return project, version

    async def RequestApproval(self, request: apb.RequestApprovalRequest, context: Ctx) -> Any:
        approvals.validate_request(request)
        p = current_principal()
        p.require("approvals:request")
        subject = await self._subject(request)

        async def write(s: AsyncSession) -> Any:
            return apb.RequestApprovalResponse(approval=await self.store.request(s, p, request, subject))

        return await self._write("RequestApproval", request, apb.RequestApprovalResponse, write)

    async def GetApproval(self, request: apb.GetApprovalRequest, context: Ctx) -> Any:
        v = Violations()
        val.resource_id(v, "approval_id", request.approval_id)
        v.raise_if_any()
        p = current_principal()
        approvals.can_read(p)
        return apb.GetApprovalResponse(approval=await self.store.get(p, request.approval_id))

    async def ListApprovals(self, request: apb.ListApprovalsRequest, context: Ctx) -> Any:
        approvals.validate_list(request)
        p = current_principal()
        approvals.can_read(p)
        if request.instance_id and not (p.is_agent and request.instance_id == p.actor_id):
            if await self.agents.resolve(current_api_key(), p.tenant_id, "instance_id", request.instance_id) is None:
                raise NotFound.of("agent_instance", request.instance_id)
        return await self.store.list(p, request)

    async def DecideApproval(self, request: apb.DecideApprovalRequest, context: Ctx) -> Any:
        approvals.validate_decide(request)
        p = current_principal()
        require_somewhere(p, "approvals:decide")
        # A verdict that comes too late first records EXPIRED (committed), then is refused.
        await self.store.expire_if_due(p, request.approval_id)

        async def write(s: AsyncSession) -> Any:
            return apb.DecideApprovalResponse(approval=await self.store.decide(s, p, request))

        return await self._write("DecideApproval", request, apb.DecideApprovalResponse, write)

    async def CancelApproval(self, request: apb.CancelApprovalRequest, context: Ctx) -> Any:
        approvals.validate_cancel(request)
        p = current_principal()

        async def write(s: AsyncSession) -> Any:
            return apb.CancelApprovalResponse(approval=await self.store.cancel(s, p, request))

        return await self._write("CancelApproval", request, apb.CancelApprovalResponse, write)

    async def WatchApproval(self, request: apb.WatchApprovalRequest, context: Ctx
                            ) -> AsyncIterator[apb.WatchApprovalResponse]:
        v = Violations()
        val.resource_id(v, "approval_id", request.approval_id)
        v.raise_if_any()
        p = current_principal()
        approvals.can_read(p)
        async for approval in self.store.watch(p, request.approval_id, self.watch_recheck_s):
            yield apb.WatchApprovalResponse(approval=approval)


class DeploymentServicer(_Writes, deployments_pb2_grpc.DeploymentServiceServicer):
    def __init__(self, db: Database, store: DeploymentStore, registry: RegistryAgents,
                 relays: list[OutboxRelay]) -> None:
        self.db = db
        self.store = store
        self.registry = registry
        self.relays = relays

    async def CreateDeployment(self, request: dpb.CreateDeploymentRequest, context: Ctx) -> Any:
        deployments.validate_create(request)
        p = current_principal()
        require_somewhere(p, "deployments:write")
        key = current_api_key()
        version = await self.registry.version(key, request.deployment.target_version_id)
        await self.registry.environment(key, request.deployment.environment_id)  # exists, in the tenant
        if version.template_id != request.deployment.template_id:  # NOT_FOUND outside the tenant
            await self.registry.template(key, request.deployment.template_id)

        async def write(s: AsyncSession) -> Any:
            return dpb.CreateDeploymentResponse(deployment=await self.store.create(s, p, request, version))

        return await self._write("CreateDeployment", request, dpb.CreateDeploymentResponse, write)

    async def GetDeployment(self, request: dpb.GetDeploymentRequest, context: Ctx) -> Any:
        deployments.validate_id_request(request, "deployment_id")
        p = current_principal()
        p.require("registry:read")

        async def read(s: AsyncSession) -> Any:
            row = await self.store.row(s, p.tenant_id, request.deployment_id)
            return dpb.GetDeploymentResponse(deployment=deployments.to_proto(row))

        return await self.db.read(read)

    async def ListDeployments(self, request: dpb.ListDeploymentsRequest, context: Ctx) -> Any:
        deployments.validate_list(request)
        p = current_principal()
        p.require("registry:read")
        if request.template_id:
            await self.registry.template(current_api_key(), request.template_id)
        if request.environment_id:
            await self.registry.environment(current_api_key(), request.environment_id)
        return await self.db.read(lambda s: self.store.list(s, p, request))

    async def ActivateDeployment(self, request: dpb.ActivateDeploymentRequest, context: Ctx) -> Any:
        deployments.validate_id_request(request, "deployment_id")
        p = current_principal()
        require_somewhere(p, "deployments:activate")

        async def environment_id(s: AsyncSession) -> str:
            row = await self.store.row(s, p.tenant_id, request.deployment_id)
            if request.approval_id:  # named: must be an approval of the caller's tenant
                a = models.Approval
                if (await s.execute(select(a.id).where(a.id == request.approval_id,
                                                       a.tenant_id == p.tenant_id))).first() is None:
                    raise NotFound.of("approval", request.approval_id)
            return row.environment_id

        env = await self.registry.environment(current_api_key(), await self.db.read(environment_id))

        async def write(s: AsyncSession) -> Any:
            return await self.store.activate(s, p, request, env)

        return await self._write("ActivateDeployment", request, dpb.ActivateDeploymentResponse, write)

    async def RollbackDeployment(self, request: dpb.RollbackDeploymentRequest, context: Ctx) -> Any:
        deployments.validate_id_request(request, "deployment_id")
        p = current_principal()
        require_somewhere(p, "deployments:write")

        async def previous(s: AsyncSession) -> str:
            return (await self.store.row(s, p.tenant_id, request.deployment_id)).previous_version_id

        # Refused before anything changes when the registry would refuse to rebind to it.
        previous_id = await self.db.read(previous)
        if previous_id:
            version = await self.registry.version(current_api_key(), previous_id)
            if version.state not in (agents_pb2.VERSION_STATE_APPROVED, agents_pb2.VERSION_STATE_DEPRECATED):
                state = agents_pb2.VersionState.Name(version.state).removeprefix("VERSION_STATE_")
                raise FailedPrecondition(f"the previous version {version.number} is {state}; rollbacks go to "
                                         "APPROVED or DEPRECATED versions", reason="PREVIOUS_VERSION_NOT_DEPLOYABLE",
                                         metadata={"version_id": previous_id, "version_state": state})
        begun = await self._write("RollbackDeployment.begin", request, dpb.RollbackDeploymentResponse,
                                  lambda s: self.store.begin_rollback(s, p, request))
        new = begun.deployment
        rebound = await self.registry.rebind(
            current_api_key(), request_id=f"rollback-{new.deployment_id}", template_id=new.template_id,
            environment_id=new.environment_id, version_id=new.target_version_id,
            # Fixed for the rollback (not the caller's reason): a resumed rollback repeats the
            # registry call with the same request_id, which must carry the same fields.
            reason=f"deployment {request.deployment_id} rolled back to version {new.target_version_id}")
        return await self._write("RollbackDeployment", request, dpb.RollbackDeploymentResponse,
                                 lambda s: self.store.finish_rollback(s, p, request, new.deployment_id,
                                                                      len(rebound)))

    async def GetActiveDeployment(self, request: dpb.GetActiveDeploymentRequest, context: Ctx) -> Any:
        deployments.validate_id_request(request, "template_id", "environment_id")
        p = current_principal()
        p.require("registry:read")

        async def read(s: AsyncSession) -> Any:
            row = await self.store.active_row(s, p.tenant_id, request.template_id, request.environment_id)
            if row is None:
                raise NotFound(f"template {request.template_id} has no ACTIVE deployment in environment "
                               f"{request.environment_id}", reason="NO_ACTIVE_DEPLOYMENT",
                               metadata={"template_id": request.template_id,
                                         "environment_id": request.environment_id})
            return dpb.GetActiveDeploymentResponse(deployment=deployments.to_proto(row))

        return await self.db.read(read)
