"""DeploymentService: validate at the edge, check permissions, run the store's transaction
(idempotent on request_id), return protobuf."""

from __future__ import annotations

from typing import Any

from arm.governance.v1 import deployments_pb2 as dpb
from arm.governance.v1 import deployments_pb2_grpc
from arm.registry.v1 import agents_pb2
from arm_common.auth import current_api_key, current_principal
from arm_common.db import Database
from arm_common.errors import FailedPrecondition
from arm_common.outbox import OutboxRelay
from arm_common.server import Ctx
from arm_governance.deployments import service as deployments
from arm_governance.deployments.service import DeploymentStore
from arm_governance.edge import Session, Writes, require_somewhere
from arm_governance.registry_calls import RegistryAgents


class DeploymentServicer(Writes, deployments_pb2_grpc.DeploymentServiceServicer):
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

        async def write(s: Session) -> Any:
            return dpb.CreateDeploymentResponse(deployment=await self.store.create(s, p, request, version))

        return await self._write("CreateDeployment", request, dpb.CreateDeploymentResponse, write)

    async def GetDeployment(self, request: dpb.GetDeploymentRequest, context: Ctx) -> Any:
        deployments.validate_id_request(request, "deployment_id")
        p = current_principal()
        p.require("registry:read")
        return dpb.GetDeploymentResponse(deployment=await self.store.get(p.tenant_id, request.deployment_id))

    async def ListDeployments(self, request: dpb.ListDeploymentsRequest, context: Ctx) -> Any:
        deployments.validate_list(request)
        p = current_principal()
        p.require("registry:read")
        if request.template_id:
            await self.registry.template(current_api_key(), request.template_id)
        if request.environment_id:
            await self.registry.environment(current_api_key(), request.environment_id)
        return await self.store.list(p, request)

    async def ActivateDeployment(self, request: dpb.ActivateDeploymentRequest, context: Ctx) -> Any:
        deployments.validate_id_request(request, "deployment_id")
        p = current_principal()
        require_somewhere(p, "deployments:activate")

        environment_id = await self.store.activation_environment(p.tenant_id, request)
        env = await self.registry.environment(current_api_key(), environment_id)
        return await self._write("ActivateDeployment", request, dpb.ActivateDeploymentResponse,
                                 lambda s: self.store.activate(s, p, request, env))

    async def RollbackDeployment(self, request: dpb.RollbackDeploymentRequest, context: Ctx) -> Any:
        deployments.validate_id_request(request, "deployment_id")
        p = current_principal()
        require_somewhere(p, "deployments:write")

        # Refused before anything changes when the registry would refuse to rebind to it.
        previous_id = (await self.store.get(p.tenant_id, request.deployment_id)).previous_version_id
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
        return dpb.GetActiveDeploymentResponse(deployment=await self.store.get_active(
            p.tenant_id, request.template_id, request.environment_id))
