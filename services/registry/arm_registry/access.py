"""Operators, roles, role assignments and API keys: the permission checks, rules and change
records of each operation, and the authenticator's cache drops after a change of grants."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from arm.registry.v1 import access_pb2, compat_pb2
from arm_common.auth import SCOPE_TENANT, Principal, actor_of
from arm_common.errors import FailedPrecondition, PermissionDenied
from arm_common.ids import new_id
from arm_common.messages import without
from arm_common.tables import utcnow
from arm_registry import convert, domain, models
from arm_registry.reads import get_one, list_page
from arm_registry.store import CR, RegistryStore


class Access:
    """Each method takes the caller and a validated request and returns the response message."""

    def __init__(self, store: RegistryStore, authenticator: Any) -> None:
        self.store = store
        self.authenticator = authenticator

    def authenticate(self, p: Principal) -> access_pb2.AuthenticateResponse:
        out = access_pb2.Principal(
            tenant_id=p.tenant_id, actor=actor_of(p),
            grants=[access_pb2.Grant(permission=g.permission,
                                     scope_type=access_pb2.RoleScopeType.Value(f"ROLE_SCOPE_TYPE_{g.scope_type}"),
                                     scope_id=g.scope_id) for g in p.grants],
            api_key_id=p.api_key_id, tenant_active=p.tenant_active, system_tenant=p.system_tenant)
        if p.key_expires_at is not None:
            out.key_expire_time.FromNanoseconds(int(p.key_expires_at * 1e9))
        if p.grants_expire_at is not None:
            out.grants_expire_time.FromNanoseconds(int(p.grants_expire_at * 1e9))
        return access_pb2.AuthenticateResponse(principal=out)

    def _dropped(self, kind: int, p: Principal, *, operator_id: str = "", api_key_id: str = "") -> None:
        """Once committed, a change takes effect on this process at once: the cached principals it
        concerns are dropped (other processes hear of it through the change feed)."""
        self.authenticator.apply_notice({"k": kind, "t": p.tenant_id, "o": operator_id, "a": api_key_id})

    async def _operator_changed(self, s: AsyncSession, tenant_id: str, operator_id: str) -> None:
        """Tells every service's auth cache (on commit) that an operator's principal changed."""
        await self.store.agent_changed(s, compat_pb2.AGENT_CHANGE_KIND_OPERATOR, tenant_id,
                                       operator_id=operator_id)

    # operators

    async def create_operator(self, p: Principal, request: access_pb2.CreateOperatorRequest
                              ) -> access_pb2.CreateOperatorResponse:
        p.require("operators:admin")

        async def write(s: AsyncSession) -> access_pb2.CreateOperatorResponse:
            op = await self.store.create_operator_row(s, p, p.tenant_id, email=request.email,
                                                      name=request.name,
                                                      external_subject=request.external_subject)
            return access_pb2.CreateOperatorResponse(operator=convert.operator(op))

        return await self.store.write(p, "CreateOperator", request, access_pb2.CreateOperatorResponse,
                                      write)

    async def get_operator(self, p: Principal, request: access_pb2.GetOperatorRequest
                           ) -> access_pb2.GetOperatorResponse:
        return await get_one(self.store, p, models.Operator, request.id, "operator",
                             lambda row: access_pb2.GetOperatorResponse(operator=convert.operator(row)))

    async def list_operators(self, p: Principal, request: access_pb2.ListOperatorsRequest
                             ) -> access_pb2.ListOperatorsResponse:
        return await list_page(self.store, p, request, "registry:read", models.Operator, {},
                               lambda rows, tok: access_pb2.ListOperatorsResponse(
                                   operators=[convert.operator(r) for r in rows], next_page_token=tok))

    async def update_operator(self, p: Principal, request: access_pb2.UpdateOperatorRequest
                              ) -> access_pb2.UpdateOperatorResponse:
        p.require("operators:admin")

        async def write(s: AsyncSession) -> access_pb2.UpdateOperatorResponse:
            row = await self.store.get(s, models.Operator, request.id, p.tenant_id, "operator",
                                       for_update=True)
            self.store.check_etag(row, request.etag)
            before = {"name": row.name, "active": row.active}
            self.store.apply_present(row, request, "name", "external_subject")
            if request.HasField("active"):
                if not request.active and row.id == p.actor_id:
                    raise FailedPrecondition("operators cannot deactivate themselves",
                                             reason="SELF_DEACTIVATION")
                row.active = request.active
            self.store.touch(row)
            await self._operator_changed(s, p.tenant_id, row.id)
            await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_REGISTRY_UPDATED, target_type="operator",
                                    target_id=row.id, summary="operator updated", before=before,
                                    after={"name": row.name, "active": row.active})
            return access_pb2.UpdateOperatorResponse(operator=convert.operator(row))

        result = await self.store.write(p, "UpdateOperator", request,
                                        access_pb2.UpdateOperatorResponse, write)
        self._dropped(compat_pb2.AGENT_CHANGE_KIND_OPERATOR, p, operator_id=request.id)
        return result

    # permissions and roles

    def list_permissions(self, p: Principal) -> access_pb2.ListPermissionsResponse:
        p.require("registry:read")
        return access_pb2.ListPermissionsResponse(permissions=[
            access_pb2.Permission(name=name, resource=name.split(":")[0], action=name.split(":")[1],
                                  description=desc) for name, desc in sorted(domain.PERMISSIONS.items())])

    async def create_role(self, p: Principal, request: access_pb2.CreateRoleRequest
                          ) -> access_pb2.CreateRoleResponse:
        p.require("operators:admin")

        async def write(s: AsyncSession) -> access_pb2.CreateRoleResponse:
            row = models.Role(id=new_id("rol"), tenant_id=p.tenant_id, name=request.name,
                              description=request.description,
                              permissions=sorted(set(request.permissions)), built_in=False,
                              created_at=utcnow())
            s.add(row)
            await self.store.flush_unique(s, "role", {"name": request.name})
            await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_REGISTRY_UPDATED, target_type="role",
                                    target_id=row.id, summary=f"role {row.name} created",
                                    after={"permissions": row.permissions})
            return access_pb2.CreateRoleResponse(role=convert.role(row))

        return await self.store.write(p, "CreateRole", request, access_pb2.CreateRoleResponse, write)

    async def get_role(self, p: Principal, request: access_pb2.GetRoleRequest) -> access_pb2.GetRoleResponse:
        return await get_one(self.store, p, models.Role, request.id, "role",
                             lambda row: access_pb2.GetRoleResponse(role=convert.role(row)))

    async def list_roles(self, p: Principal, request: access_pb2.ListRolesRequest
                         ) -> access_pb2.ListRolesResponse:
        return await list_page(self.store, p, request, "registry:read", models.Role, {},
                               lambda rows, tok: access_pb2.ListRolesResponse(
                                   roles=[convert.role(r) for r in rows], next_page_token=tok))

    # role assignments

    async def create_role_assignment(self, p: Principal, request: access_pb2.CreateRoleAssignmentRequest,
                                     scope: str, expires: datetime | None
                                     ) -> access_pb2.CreateRoleAssignmentResponse:
        """`scope` is the request's scope type by its stored name; `expires` its expire_time."""
        p.require("operators:admin")

        async def write(s: AsyncSession) -> access_pb2.CreateRoleAssignmentResponse:
            await self.store.get(s, models.Operator, request.operator_id, p.tenant_id, "operator")
            role = await self.store.get(s, models.Role, request.role_id, p.tenant_id, "role")
            if scope == "PROJECT":
                await self.store.get(s, models.Project, request.scope_id, p.tenant_id, "project")
            elif scope == "ENVIRONMENT":
                await self.store.get(s, models.Environment, request.scope_id, p.tenant_id, "environment")
            row = await self.store.assign_role_row(s, p, p.tenant_id, request.operator_id, role,
                                                   scope_type=scope,
                                                   scope_id=request.scope_id if scope != SCOPE_TENANT else "",
                                                   expires_at=expires)
            await self._operator_changed(s, p.tenant_id, request.operator_id)
            return access_pb2.CreateRoleAssignmentResponse(role_assignment=convert.role_assignment(row))

        result = await self.store.write(p, "CreateRoleAssignment", request,
                                        access_pb2.CreateRoleAssignmentResponse, write)
        self._dropped(compat_pb2.AGENT_CHANGE_KIND_OPERATOR, p, operator_id=request.operator_id)
        return result

    async def list_role_assignments(self, p: Principal, request: access_pb2.ListRoleAssignmentsRequest
                                    ) -> access_pb2.ListRoleAssignmentsResponse:
        return await list_page(self.store, p, request, "registry:read", models.RoleAssignment,
                               {"operator_id": request.operator_id},
                               lambda rows, tok: access_pb2.ListRoleAssignmentsResponse(
                                   role_assignments=[convert.role_assignment(r) for r in rows],
                                   next_page_token=tok))

    async def delete_role_assignment(self, p: Principal, request: access_pb2.DeleteRoleAssignmentRequest
                                     ) -> access_pb2.DeleteRoleAssignmentResponse:
        p.require("operators:admin")

        deleted_for: list[str] = []  # the operator whose grants changed (a replay changes none)

        async def write(s: AsyncSession) -> access_pb2.DeleteRoleAssignmentResponse:
            row = await self.store.get(s, models.RoleAssignment, request.id, p.tenant_id,
                                       "role_assignment", for_update=True)
            await s.delete(row)
            await self._operator_changed(s, p.tenant_id, row.operator_id)
            deleted_for.append(row.operator_id)
            await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_REGISTRY_UPDATED,
                                    target_type="operator", target_id=row.operator_id,
                                    summary="role assignment removed",
                                    before={"role_id": row.role_id, "scope_type": row.scope_type,
                                            "scope_id": row.scope_id})
            return access_pb2.DeleteRoleAssignmentResponse()

        result = await self.store.write(p, "DeleteRoleAssignment", request,
                                        access_pb2.DeleteRoleAssignmentResponse, write)
        if deleted_for:
            self._dropped(compat_pb2.AGENT_CHANGE_KIND_OPERATOR, p, operator_id=deleted_for[0])
        return result

    # API keys

    async def create_api_key(self, p: Principal, request: access_pb2.CreateApiKeyRequest,
                             expires: datetime | None) -> access_pb2.CreateApiKeyResponse:
        """`expires` is the request's expire_time."""
        p.require("operators:admin")

        async def write(s: AsyncSession) -> access_pb2.CreateApiKeyResponse:
            if request.operator_id:
                await self.store.get(s, models.Operator, request.operator_id, p.tenant_id, "operator")
            else:
                await self.store.get(s, models.AgentInstance, request.instance_id, p.tenant_id,
                                     "agent_instance")
            row, secret = await self.store.create_key_row(
                s, p, p.tenant_id, operator_id=request.operator_id or None,
                instance_id=request.instance_id or None, display_name=request.display_name,
                expires_at=expires)
            return access_pb2.CreateApiKeyResponse(api_key=convert.api_key(row), secret=secret)

        return await self.store.write(p, "CreateApiKey", request, access_pb2.CreateApiKeyResponse,
                                      write, lambda resp: without(resp, "secret"))

    async def list_api_keys(self, p: Principal, request: access_pb2.ListApiKeysRequest
                            ) -> access_pb2.ListApiKeysResponse:
        return await list_page(self.store, p, request, "operators:admin", models.ApiKey,
                               {"operator_id": request.operator_id, "instance_id": request.instance_id},
                               lambda rows, tok: access_pb2.ListApiKeysResponse(
                                   api_keys=[convert.api_key(r) for r in rows], next_page_token=tok))

    async def revoke_api_key(self, p: Principal, request: access_pb2.RevokeApiKeyRequest
                             ) -> access_pb2.RevokeApiKeyResponse:
        p.require("operators:admin")

        dropped: list[str] = []

        async def write(s: AsyncSession) -> access_pb2.RevokeApiKeyResponse:
            row = await self.store.get(s, models.ApiKey, request.id, p.tenant_id, "api_key",
                                       for_update=True)
            dropped[:] = await self._revoke(s, p, row, "API key revoked")
            return access_pb2.RevokeApiKeyResponse(api_key=convert.api_key(row))

        result = await self.store.write(p, "RevokeApiKey", request, access_pb2.RevokeApiKeyResponse,
                                        write)
        for key_id in dropped or [request.id]:
            self._dropped(compat_pb2.AGENT_CHANGE_KIND_API_KEY, p, api_key_id=key_id)
        return result

    async def _revoke(self, s: AsyncSession, p: Principal, row: models.ApiKey, summary: str) -> list[str]:
        """Revokes the key and the session keys made from it; the ids revoked now."""
        now = utcnow()
        revoked = []
        children = (await s.execute(select(models.ApiKey).where(
            models.ApiKey.tenant_id == row.tenant_id, models.ApiKey.parent_key_id == row.id,
            models.ApiKey.revoked_at.is_(None)).with_for_update())).scalars().all()
        for key in ([row] if row.revoked_at is None else []) + list(children):
            key.revoked_at = now
            revoked.append(key.id)
            await self.store.agent_changed(s, compat_pb2.AGENT_CHANGE_KIND_API_KEY, row.tenant_id,
                                           api_key_id=key.id)
            await self.store.record(s, p, CR.CHANGE_RECORD_TYPE_REGISTRY_UPDATED, target_type="api_key",
                                    target_id=key.id, summary=summary if key is row else
                                    f"session key revoked with the key it was made from ({row.id})")
        return revoked

    # session keys

    async def create_session_key(self, p: Principal, request: access_pb2.CreateSessionKeyRequest,
                                 ttl_s: float) -> access_pb2.CreateSessionKeyResponse:
        """A key of the caller's own operator, expiring after `ttl_s` and no later than the
        caller's key; its parent is the caller's key (or, for a session key, that key's parent)."""
        if p.actor_type != "OPERATOR" or p.acting_for_tenant:
            raise PermissionDenied("session keys are for operators' own keys", reason="OPERATOR_KEY_REQUIRED")
        expires = utcnow() + timedelta(seconds=ttl_s)
        if p.key_expires_at is not None:
            expires = min(expires, datetime.fromtimestamp(p.key_expires_at, UTC))

        async def write(s: AsyncSession) -> access_pb2.CreateSessionKeyResponse:
            caller = await self.store.get(s, models.ApiKey, p.api_key_id, p.tenant_id, "api_key")
            row, secret = await self.store.create_key_row(
                s, p, p.tenant_id, operator_id=p.actor_id, display_name=request.display_name or "session",
                expires_at=expires, parent_key_id=caller.parent_key_id or caller.id)
            return access_pb2.CreateSessionKeyResponse(api_key=convert.api_key(row), secret=secret)

        return await self.store.write(p, "CreateSessionKey", request, access_pb2.CreateSessionKeyResponse,
                                      write, lambda resp: without(resp, "secret"))

    async def revoke_caller_key(self, p: Principal, request: access_pb2.RevokeCallerKeyRequest
                                ) -> access_pb2.RevokeCallerKeyResponse:
        dropped: list[str] = []

        async def write(s: AsyncSession) -> access_pb2.RevokeCallerKeyResponse:
            row = await self.store.get(s, models.ApiKey, p.api_key_id, p.tenant_id, "api_key", for_update=True)
            dropped[:] = await self._revoke(s, p, row, "API key revoked by its holder")
            return access_pb2.RevokeCallerKeyResponse(api_key=convert.api_key(row))

        result = await self.store.write(p, "RevokeCallerKey", request, access_pb2.RevokeCallerKeyResponse, write)
        for key_id in dropped or [p.api_key_id]:
            self._dropped(compat_pb2.AGENT_CHANGE_KIND_API_KEY, p, api_key_id=key_id)
        return result
