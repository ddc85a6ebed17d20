"""The authenticated caller (principal), permission checks, and API key format.

API keys look like `arm_<key id>_<secret>`; only SHA-256 of the whole key is stored, so a key is
shown once and cannot be recovered."""

from __future__ import annotations

import contextvars
import secrets
from dataclasses import dataclass, field
from typing import Protocol

from arm.common.v1 import common_pb2
from arm_common.canonical import sha256_hex
from arm_common.errors import PermissionDenied, Unauthenticated
from arm_common.ids import new_id

SCOPE_TENANT = "TENANT"
SCOPE_PROJECT = "PROJECT"
SCOPE_ENVIRONMENT = "ENVIRONMENT"


@dataclass(frozen=True)
class Grant:
    """A permission and where it applies (tenant-wide, or one project or environment)."""

    permission: str
    scope_type: str = SCOPE_TENANT
    scope_id: str = ""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant of their key, operator or agent, and their grants."""

    tenant_id: str
    actor_type: str  # "OPERATOR" | "AGENT" | "SYSTEM"
    actor_id: str
    api_key_id: str
    grants: tuple[Grant, ...] = ()
    tenant_active: bool = True
    system_tenant: bool = False
    acting_for_tenant: bool = False
    """A system-tenant service key acting in another tenant (see ACT_FOR_TENANT_HEADER)."""
    key_expires_at: float | None = None
    """Unix time the key expires (None: never); a cached principal is refused from then on."""
    grants_expire_at: float | None = None
    """Unix time the earliest role assignment behind `grants` expires; a cached principal is
    looked up again from then on."""
    _index: dict[str, list[Grant]] = field(init=False, default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for g in self.grants:
            self._index.setdefault(g.permission, []).append(g)

    def has(self, permission: str, *, project_id: str = "", environment_id: str = "") -> bool:
        """True when a grant covers the permission at the tenant, or at the given project or
        environment."""
        for g in self._index.get(permission, ()):
            if g.scope_type == SCOPE_TENANT:
                return True
            if g.scope_type == SCOPE_PROJECT and project_id and g.scope_id == project_id:
                return True
            if g.scope_type == SCOPE_ENVIRONMENT and environment_id and g.scope_id == environment_id:
                return True
        return False

    def require(self, permission: str, *, project_id: str = "", environment_id: str = "") -> None:
        if not self.has(permission, project_id=project_id, environment_id=environment_id):
            raise PermissionDenied(
                f"the caller lacks the permission {permission!r}",
                reason="MISSING_PERMISSION",
                metadata={"permission": permission, "actor_id": self.actor_id})

    @property
    def is_agent(self) -> bool:
        return self.actor_type == "AGENT"


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("arm_principal",
                                                                            default=None)
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("arm_request_id", default="")
_api_key: contextvars.ContextVar[str] = contextvars.ContextVar("arm_api_key", default="")


def current_principal() -> Principal:
    """The caller of the RPC being served (set by the auth interceptor)."""
    principal = _current.get()
    if principal is None:
        raise Unauthenticated("no authenticated caller", reason="UNAUTHENTICATED")
    return principal


# A service calling another service on behalf of a tenant (governance delivering a tenant's
# opEvents to telemetry, telemetry reporting a tenant's spend to governance) presents its
# system-tenant key and names the tenant in this header. Only a system-tenant principal holding
# tenants:admin may do so; the call then runs as that tenant, with the key's tenant-wide grants.
ACT_FOR_TENANT_HEADER = "x-arm-act-for-tenant"


def act_for_tenant(principal: Principal, tenant_id: str) -> Principal:
    """The principal a service key becomes when it acts in `tenant_id`."""
    if not (principal.system_tenant and principal.has("tenants:admin")):
        raise PermissionDenied(f"only a system administrator key may use {ACT_FOR_TENANT_HEADER}",
                               reason="ACT_FOR_TENANT_NOT_ALLOWED",
                               metadata={"actor_id": principal.actor_id})
    grants = tuple(g for g in principal.grants if g.permission != "tenants:admin")
    return Principal(tenant_id=tenant_id, actor_type="SYSTEM", actor_id=principal.actor_id,
                     api_key_id=principal.api_key_id, grants=grants, tenant_active=True,
                     system_tenant=False, acting_for_tenant=True)


def auth_metadata(api_key: str, tenant_id: str | None = None) -> tuple[tuple[str, str], ...]:
    """Metadata for a call to another service with `api_key`: acting for `tenant_id` when given,
    else for the tenant the current call acts for (if it does)."""
    if tenant_id is None:
        current = _current.get()
        tenant_id = current.tenant_id if current is not None and current.acting_for_tenant else None
    pairs: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),)
    if tenant_id:
        pairs += ((ACT_FOR_TENANT_HEADER, tenant_id),)
    return pairs


def current_api_key() -> str:
    """The bearer key of the RPC being served, for calls made on the caller's behalf."""
    return _api_key.get()


class Authenticator(Protocol):
    """Turns the bearer key of a call into a principal, or raises Unauthenticated."""

    async def authenticate(self, api_key: str) -> Principal: ...


def new_api_key() -> tuple[str, str, str]:
    """Returns (key id, full key to show once, hash to store)."""
    key_id = new_id("key")
    full = f"arm_{key_id}_{secrets.token_urlsafe(32)}"
    return key_id, full, hash_api_key(full)


def hash_api_key(full_key: str) -> str:
    return sha256_hex(full_key)


def parse_api_key(full_key: str) -> str:
    """Returns the key id of a well-formed key, or raises Unauthenticated."""
    parts = full_key.split("_", 3)  # "arm", "key", "<id part>", "<secret>"
    if len(parts) != 4 or parts[0] != "arm" or parts[1] != "key" or not parts[2] or not parts[3]:
        raise Unauthenticated("the API key is malformed", reason="INVALID_API_KEY")
    return f"{parts[1]}_{parts[2]}"


_ACTOR_TYPES = {"OPERATOR": common_pb2.ACTOR_TYPE_OPERATOR, "AGENT": common_pb2.ACTOR_TYPE_AGENT,
                "SYSTEM": common_pb2.ACTOR_TYPE_SYSTEM}


def actor_of(principal: Principal) -> common_pb2.Actor:
    """Who the principal is, as change records and approvals name it. An actor type outside
    OPERATOR / AGENT / SYSTEM is a programming error (ValueError), never recorded as SYSTEM: the
    trail must not disguise who acted."""
    try:
        kind = _ACTOR_TYPES[principal.actor_type]
    except KeyError:
        raise ValueError(f"unknown actor type {principal.actor_type!r}") from None
    return common_pb2.Actor(type=kind, id=principal.actor_id)
