"""Tenants, environments and projects: the permission checks, rules and change records of each
operation, run through the store in one transaction per write."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from arm.registry.v1 import compat_pb2, tenancy_pb2
from arm_common import pagination
from arm_common.auth import Principal
from arm_common.errors import FailedPrecondition, NotFound
from arm_common.ids import new_id
from arm_common.messages import without
from arm_common.tables import utcnow
from arm_registry import convert, models
from arm_registry.reads import get_one, list_page
from arm_registry.store import CR, RegistryStore


class Tenancy:
    """Each method takes the caller and a validated request and returns the response message."""

    def __init__(self, store: RegistryStore, authenticator: Any = None) -> None:
        self.store = store
        self.authenticator = authenticator  # drops a tenant's cached principals on its update

    # tenants

    async def create_tenant(self, p: Principal, request: tenancy_pb2.CreateTenantRequest
                            ) -> tenancy_pb2.CreateTenantResponse:
        p.require("tenants:admin")
        store = self.store

        async def write(s: AsyncSession) -> tenancy_pb2.CreateTenantResponse:
            tenant = await store.create_tenant_rows(s, p, slug=request.slug, name=request.name,
                                                    description=request.description)
            resp = tenancy_pb2.CreateTenantResponse(tenant=convert.tenant(tenant))
            if request.admin_email:
                op = await store.create_operator_row(s, p, tenant.id, email=request.admin_email,
                                                     name=request.admin_name)
                admin = await store.role_by_name(s, tenant.id, "admin")
                await store.assign_role_row(s, p, tenant.id, op.id, admin)
                _, secret = await store.create_key_row(s, p, tenant.id, operator_id=op.id,
                                                       display_name="first admin key")
                resp.admin_operator_id = op.id
                resp.admin_api_key = secret
            return resp

        return await store.write(p, "CreateTenant", request, tenancy_pb2.CreateTenantResponse,
                                 write, lambda resp: without(resp, "admin_api_key"))

    @staticmethod
    def _tenant_scope(p: Principal) -> str:
        """Tenant id to filter on: the caller's own, or "" (all) for tenant administrators."""
        if p.has("tenants:admin"):
            return ""
        p.require("registry:read")
        return p.tenant_id

    async def get_tenant(self, p: Principal, request: tenancy_pb2.GetTenantRequest
                         ) -> tenancy_pb2.GetTenantResponse:
        scope = self._tenant_scope(p)
        if scope and request.id != scope:
            raise NotFound.of("tenant", request.id)

        async def read(s: AsyncSession) -> tenancy_pb2.GetTenantResponse:
            row = await self.store.get(s, models.Tenant, request.id, scope, "tenant")
            return tenancy_pb2.GetTenantResponse(tenant=convert.tenant(row))

        return await self.store.read(read)

    async def list_tenants(self, p: Principal, request: tenancy_pb2.ListTenantsRequest
                           ) -> tenancy_pb2.ListTenantsResponse:
        scope = self._tenant_scope(p)
        size = pagination.page_size(request.page_size)
        after = pagination.decode_token(request.page_token, {"m": "tenants"})

        async def read(s: AsyncSession) -> tenancy_pb2.ListTenantsResponse:
            q = select(models.Tenant)
            if scope:
                q = q.where(models.Tenant.id == scope)
            rows, last = await self.store.page(s, q, models.Tenant.id, size, after)
            return tenancy_pb2.ListTenantsResponse(
                tenants=[convert.tenant(r) for r in rows],
                next_page_token=pagination.encode_token(last, {"m": "tenants"}) if last else "")

        return await self.store.read(read)

    async def update_tenant(self, p: Principal, request: tenancy_pb2.UpdateTenantRequest
                            ) -> tenancy_pb2.UpdateTenantResponse:
        admin = p.has("tenants:admin")
        if not admin:
            p.require("operators:admin")
            if request.HasField("active"):
                p.require("tenants:admin")
        scope = "" if admin else p.tenant_id

        async def write(s: AsyncSession) -> tenancy_pb2.UpdateTenantResponse:
            row = await self.store.get(s, models.Tenant, request.id, scope, "tenant", for_update=True)
            self.store.check_etag(row, request.etag)
            before = {"name": row.name, "active": row.active}
            self.store.apply_present(row, request, "name", "description")
            if request.HasField("active"):
                if row.system and not request.active:
                    raise FailedPrecondition("the system tenant cannot be deactivated",
                                             reason="SYSTEM_TENANT")
                row.active = request.active
            self.store.touch(row)
            await self.store.agent_changed(s, compat_pb2.AGENT_CHANGE_KIND_TENANT, row.id)
            await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_REGISTRY_UPDATED, target_type="tenant",
                                    target_id=row.id, tenant_id=row.id, summary="tenant updated",
                                    before=before, after={"name": row.name, "active": row.active})
            return tenancy_pb2.UpdateTenantResponse(tenant=convert.tenant(row))

        result = await self.store.write(p, "UpdateTenant", request, tenancy_pb2.UpdateTenantResponse, write)
        if self.authenticator is not None:  # a deactivated tenant's keys stop working here at once
            self.authenticator.apply_notice({"k": compat_pb2.AGENT_CHANGE_KIND_TENANT, "t": request.id})
        return result

    # environments

    async def create_environment(self, p: Principal, request: tenancy_pb2.CreateEnvironmentRequest
                                 ) -> tenancy_pb2.CreateEnvironmentResponse:
        p.require("registry:write")

        async def write(s: AsyncSession) -> tenancy_pb2.CreateEnvironmentResponse:
            now = utcnow()
            row = models.Environment(id=new_id("env"), tenant_id=p.tenant_id, name=request.name,
                                     type=convert.env_type_name(request.type),
                                     require_active_deployment=request.require_active_deployment,
                                     created_at=now, updated_at=now, revision=1)
            s.add(row)
            await self.store.flush_unique(s, "environment", {"name": request.name})
            await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_ENVIRONMENT_CREATED,
                                    target_type="environment", target_id=row.id,
                                    summary=f"environment {row.name} ({row.type}) created",
                                    after={"name": row.name, "type": row.type,
                                           "require_active_deployment": row.require_active_deployment})
            return tenancy_pb2.CreateEnvironmentResponse(environment=convert.environment(row))

        return await self.store.write(p, "CreateEnvironment", request,
                                      tenancy_pb2.CreateEnvironmentResponse, write)

    async def get_environment(self, p: Principal, request: tenancy_pb2.GetEnvironmentRequest
                              ) -> tenancy_pb2.GetEnvironmentResponse:
        return await get_one(self.store, p, models.Environment, request.id, "environment",
                             lambda row: tenancy_pb2.GetEnvironmentResponse(environment=convert.environment(row)),
                             scope=lambda row: {"environment_id": row.id})

    async def list_environments(self, p: Principal, request: tenancy_pb2.ListEnvironmentsRequest
                                ) -> tenancy_pb2.ListEnvironmentsResponse:
        return await list_page(self.store, p, request, "registry:read", models.Environment, {},
                               lambda rows, tok: tenancy_pb2.ListEnvironmentsResponse(
                                   environments=[convert.environment(r) for r in rows], next_page_token=tok))

    async def update_environment(self, p: Principal, request: tenancy_pb2.UpdateEnvironmentRequest
                                 ) -> tenancy_pb2.UpdateEnvironmentResponse:
        p.require("registry:write")

        async def write(s: AsyncSession) -> tenancy_pb2.UpdateEnvironmentResponse:
            row = await self.store.get(s, models.Environment, request.id, p.tenant_id, "environment",
                                       for_update=True)
            self.store.check_etag(row, request.etag)
            before = {"name": row.name, "require_active_deployment": row.require_active_deployment}
            self.store.apply_present(row, request, "name", "require_active_deployment")
            self.store.touch(row)
            await self.store.flush_unique(s, "environment", {"name": row.name})
            await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_REGISTRY_UPDATED,
                                    target_type="environment", target_id=row.id,
                                    summary="environment updated", before=before,
                                    after={"name": row.name,
                                           "require_active_deployment": row.require_active_deployment})
            return tenancy_pb2.UpdateEnvironmentResponse(environment=convert.environment(row))

        return await self.store.write(p, "UpdateEnvironment", request,
                                      tenancy_pb2.UpdateEnvironmentResponse, write)

    # projects

    async def create_project(self, p: Principal, request: tenancy_pb2.CreateProjectRequest
                             ) -> tenancy_pb2.CreateProjectResponse:
        p.require("registry:write")

        async def write(s: AsyncSession) -> tenancy_pb2.CreateProjectResponse:
            now = utcnow()
            row = models.Project(id=new_id("prj"), tenant_id=p.tenant_id, slug=request.slug,
                                 name=request.name, description=request.description,
                                 created_at=now, updated_at=now, revision=1)
            s.add(row)
            await self.store.flush_unique(s, "project", {"slug": request.slug})
            await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_PROJECT_CREATED, target_type="project",
                                    target_id=row.id, project_id=row.id,
                                    summary=f"project {row.slug} created",
                                    after={"slug": row.slug, "name": row.name})
            return tenancy_pb2.CreateProjectResponse(project=convert.project(row))

        return await self.store.write(p, "CreateProject", request, tenancy_pb2.CreateProjectResponse,
                                      write)

    async def get_project(self, p: Principal, request: tenancy_pb2.GetProjectRequest
                          ) -> tenancy_pb2.GetProjectResponse:
        return await get_one(self.store, p, models.Project, request.id, "project",
                             lambda row: tenancy_pb2.GetProjectResponse(project=convert.project(row)),
                             scope=lambda row: {"project_id": row.id})

    async def list_projects(self, p: Principal, request: tenancy_pb2.ListProjectsRequest
                            ) -> tenancy_pb2.ListProjectsResponse:
        return await list_page(self.store, p, request, "registry:read", models.Project, {},
                               lambda rows, tok: tenancy_pb2.ListProjectsResponse(
                                   projects=[convert.project(r) for r in rows], next_page_token=tok))

    async def update_project(self, p: Principal, request: tenancy_pb2.UpdateProjectRequest
                             ) -> tenancy_pb2.UpdateProjectResponse:
        async def write(s: AsyncSession) -> tenancy_pb2.UpdateProjectResponse:
            row = await self.store.get(s, models.Project, request.id, p.tenant_id, "project",
                                       for_update=True)
            p.require("registry:write", project_id=row.id)
            self.store.check_etag(row, request.etag)
            before = {"name": row.name}
            self.store.apply_present(row, request, "name", "description")
            self.store.touch(row)
            await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_REGISTRY_UPDATED, target_type="project",
                                    target_id=row.id, project_id=row.id, summary="project updated",
                                    before=before, after={"name": row.name})
            return tenancy_pb2.UpdateProjectResponse(project=convert.project(row))

        return await self.store.write(p, "UpdateProject", request, tenancy_pb2.UpdateProjectResponse,
                                      write)
