"""Authentication of API keys against the registry's own tables, with an in-memory cache so the
hot path does not query the database per call (see arm_common.auth_cache for what bounds an
entry's life)."""

from __future__ import annotations

import hmac
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from arm_common.auth import Grant, Principal, hash_api_key, parse_api_key
from arm_common.auth_cache import PrincipalCache
from arm_common.db import Database
from arm_common.errors import Unauthenticated
from arm_common.tables import utcnow
from arm_registry import domain, models


class LocalAuthenticator:
    """Looks a key up by its id, compares hashes in constant time, and builds the principal:
    an operator's grants come from their unexpired role assignments; an agent key gets the
    built-in `agent` role. A key of an inactive tenant is refused (TENANT_INACTIVE); the system
    tenant, whose admins reactivate tenants, cannot be deactivated. A revoked key, an inactive
    operator or tenant, a retired instance stops working at once on this process when the change
    was made here, and on other registry processes when its change notice arrives (`apply_notice`);
    `ttl_s` is the fallback. An expired key is refused from its expiry time on."""

    def __init__(self, db: Database, ttl_s: float = 5.0) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self._cache = PrincipalCache(ttl_s)

    def invalidate(self) -> None:
        self._cache.clear()

    def apply_notice(self, notice: dict[str, Any]) -> int:
        """Drops what a registry change notice (RegistryStore.agent_changed) makes stale."""
        if notice.get("reset"):
            self._cache.clear()
            return 0
        return self._cache.apply_change(int(notice.get("k", 0)), str(notice.get("t", "")),
                                        instance_id=str(notice.get("i", "")),
                                        api_key_id=str(notice.get("a", "")),
                                        operator_id=str(notice.get("o", "")))

    async def authenticate(self, api_key: str) -> Principal:
        answer = self._cache.get(api_key)
        if isinstance(answer, Principal):
            return answer
        if answer is not None:
            raise Unauthenticated(answer.message, reason=answer.reason)
        key_id = parse_api_key(api_key)
        generation = self._cache.generation
        principal = await self.db.read(lambda s: self._load(s, key_id, api_key))
        self._cache.put(api_key, principal, generation)
        return principal

    async def _load(self, s: AsyncSession, key_id: str, api_key: str) -> Principal:
        row = (await s.execute(select(models.ApiKey, models.Tenant)
                               .join(models.Tenant, models.Tenant.id == models.ApiKey.tenant_id)
                               .where(models.ApiKey.id == key_id))).first()
        invalid = Unauthenticated("the API key is not valid", reason="INVALID_API_KEY")
        if row is None:
            raise invalid
        key, tenant = row
        if not hmac.compare_digest(key.key_hash, hash_api_key(api_key)):
            raise invalid
        now = utcnow()
        if key.revoked_at is not None:
            raise Unauthenticated("the API key was revoked", reason="API_KEY_REVOKED")
        if key.expires_at is not None and key.expires_at <= now:
            raise Unauthenticated("the API key has expired", reason="API_KEY_EXPIRED")
        if not tenant.active:
            raise Unauthenticated("the key's tenant is inactive", reason="TENANT_INACTIVE",
                                  metadata={"tenant_id": tenant.id})
        key_expires_at = key.expires_at.timestamp() if key.expires_at is not None else None
        if key.operator_id:
            op = await s.get(models.Operator, key.operator_id)
            if op is None or not op.active:
                raise Unauthenticated("the key's operator is inactive", reason="OPERATOR_INACTIVE")
            rows = (await s.execute(select(models.RoleAssignment, models.Role)
                                    .join(models.Role, models.Role.id == models.RoleAssignment.role_id)
                                    .where(models.RoleAssignment.operator_id == op.id))).all()
            live = [(ra, role) for ra, role in rows if ra.expires_at is None or ra.expires_at > now]
            grants = tuple(Grant(perm, ra.scope_type, ra.scope_id)
                           for ra, role in live for perm in role.permissions)
            expiries = [ra.expires_at.timestamp() for ra, _ in live if ra.expires_at is not None]
            return Principal(tenant_id=tenant.id, actor_type="OPERATOR", actor_id=op.id,
                             api_key_id=key.id, grants=grants, tenant_active=tenant.active,
                             system_tenant=tenant.system, key_expires_at=key_expires_at,
                             grants_expire_at=min(expiries, default=None))
        inst = await s.get(models.AgentInstance, key.instance_id)
        if inst is None or inst.state == "RETIRED":
            raise Unauthenticated("the key's agent instance is retired", reason="INSTANCE_RETIRED")
        perms = domain.BUILT_IN_ROLES["agent"][1]
        return Principal(tenant_id=tenant.id, actor_type="AGENT", actor_id=inst.id, api_key_id=key.id,
                         grants=tuple(Grant(p) for p in perms), tenant_active=tenant.active,
                         system_tenant=tenant.system, key_expires_at=key_expires_at)
