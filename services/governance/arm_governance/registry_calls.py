"""Calls governance makes to the registry on a caller's behalf (the caller's own key, so the
registry applies the caller's tenant and permissions): versions for deployments and approvals,
instance rebinding on rollback."""

from __future__ import annotations

import grpc

from arm.registry.v1 import agents_pb2, agents_pb2_grpc, tenancy_pb2, tenancy_pb2_grpc
from arm_common.errors import ArmError, FailedPrecondition, NotFound, PermissionDenied, Unavailable


def _md(api_key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),)


def _error(exc: grpc.aio.AioRpcError, what: str, kind: str, ident: str) -> ArmError:
    code = exc.code()
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound.of(kind, ident)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(exc.details() or f"the registry refused to {what}", reason="REGISTRY_PERMISSION_DENIED")
    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
        return FailedPrecondition(exc.details() or f"the registry refused to {what}", reason="REGISTRY_REFUSED")
    return Unavailable(f"the registry could not {what}: {code.name}", reason="REGISTRY_UNAVAILABLE")


class RegistryAgents:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = agents_pb2_grpc.AgentServiceStub(channel)
        self.tenancy = tenancy_pb2_grpc.TenancyServiceStub(channel)

    async def environment(self, api_key: str, environment_id: str) -> tenancy_pb2.Environment:
        try:
            resp = await self.tenancy.GetEnvironment(tenancy_pb2.GetEnvironmentRequest(id=environment_id),
                                                     metadata=_md(api_key), timeout=5)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, "read the environment", "environment", environment_id) from None
        return resp.environment

    async def project(self, api_key: str, project_id: str) -> tenancy_pb2.Project:
        try:
            resp = await self.tenancy.GetProject(tenancy_pb2.GetProjectRequest(id=project_id),
                                                 metadata=_md(api_key), timeout=5)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, "read the project", "project", project_id) from None
        return resp.project

    async def template(self, api_key: str, template_id: str) -> agents_pb2.AgentTemplate:
        try:
            resp = await self.stub.GetAgentTemplate(agents_pb2.GetAgentTemplateRequest(id=template_id),
                                                    metadata=_md(api_key), timeout=5)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, "read the template", "agent_template", template_id) from None
        return resp.agent_template

    async def version(self, api_key: str, version_id: str) -> agents_pb2.AgentVersion:
        try:
            resp = await self.stub.GetAgentVersion(agents_pb2.GetAgentVersionRequest(id=version_id),
                                                   metadata=_md(api_key), timeout=5)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, "read the version", "agent_version", version_id) from None
        return resp.agent_version

    async def rebind(self, api_key: str, *, request_id: str, template_id: str, environment_id: str,
                     version_id: str, reason: str) -> list[agents_pb2.AgentInstance]:
        try:
            resp = await self.stub.RebindAgentInstances(agents_pb2.RebindAgentInstancesRequest(
                request_id=request_id, template_id=template_id, environment_id=environment_id,
                version_id=version_id, reason=reason), metadata=_md(api_key), timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, "rebind the instances", "agent_version", version_id) from None
        return list(resp.agent_instances)
