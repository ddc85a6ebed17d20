"""ApprovalService: validate at the edge, check permissions, run the store's transaction
(idempotent on request_id), return protobuf."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from arm.governance.v1 import approvals_pb2 as apb
from arm.governance.v1 import approvals_pb2_grpc
from arm_common import validation as val
from arm_common.auth import Principal, current_api_key, current_principal
from arm_common.db import Database
from arm_common.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Violations,
)
from arm_common.outbox import OutboxRelay
from arm_common.server import Ctx
from arm_governance.agent_cache import AgentDirectory
from arm_governance.approvals import service as approvals
from arm_governance.approvals.service import ApprovalStore, Subject
from arm_governance.deployments.service import DeploymentStore
from arm_governance.edge import Session, Writes, require_somewhere
from arm_governance.policy.store import PolicyStore
from arm_governance.registry_calls import RegistryAgents

A = apb.ApprovalActionType


class ApprovalServicer(Writes, approvals_pb2_grpc.ApprovalServiceServicer):
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
            d_project, d_version = await self.db.read(
                lambda s: DeploymentStore.project_and_version(s, p.tenant_id, r.target_id))
            return project or d_project, version or d_version
        if t == A.APPROVAL_ACTION_TYPE_POLICY_AUTONOMY_INCREASE:
            await self.db.read(lambda s: PolicyStore.check_exists(s, p.tenant_id, r.target_id))
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

        async def write(s: Session) -> Any:
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

        async def write(s: Session) -> Any:
            return apb.DecideApprovalResponse(approval=await self.store.decide(s, p, request))

        return await self._write("DecideApproval", request, apb.DecideApprovalResponse, write)

    async def CancelApproval(self, request: apb.CancelApprovalRequest, context: Ctx) -> Any:
        approvals.validate_cancel(request)
        p = current_principal()

        async def write(s: Session) -> Any:
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
