"""The standard reads the service modules share: one tenant-scoped row by id, and a tenant-scoped,
id-ordered page with equality filters, each behind its permission check."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from google.protobuf.message import Message
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from arm_common import pagination
from arm_common.auth import Principal
from arm_registry import models
from arm_registry.store import RegistryStore

# Filter columns that name another resource: a list filtered by an id outside the caller's tenant
# (or unknown) is NOT_FOUND, like a read of that id, not an empty page.
REFERENCE_FILTERS: dict[str, tuple[Any, str]] = {
    "operator_id": (models.Operator, "operator"),
    "instance_id": (models.AgentInstance, "agent_instance"),
    "project_id": (models.Project, "project"),
    "template_id": (models.AgentTemplate, "agent_template"),
    "version_id": (models.AgentVersion, "agent_version"),
    "environment_id": (models.Environment, "environment"),
}

R = TypeVar("R", bound=Message)


async def get_one(store: RegistryStore, p: Principal, model: Any, ident: str, kind: str,
                  build: Callable[[Any], R], *, permission: str = "registry:read",
                  scope: Callable[[Any], dict[str, str]] | None = None) -> R:
    """The standard tenant-scoped read by id. With `scope` (row → project/environment ids) the
    permission is checked against the row, so project- and environment-scoped grants apply."""
    if scope is None:
        p.require(permission)

    async def read(s: AsyncSession) -> R:
        row = await store.get(s, model, ident, p.tenant_id, kind)
        if scope is not None:
            p.require(permission, **scope(row))
        return build(row)

    return await store.read(read)


async def list_page(store: RegistryStore, p: Principal, request: Any, permission: str, model: Any,
                    filters: dict[str, Any], build: Callable[[Sequence[Any], str], R], *,
                    project_id: str = "", token_scope: dict[str, Any] | None = None) -> R:
    """The standard tenant-scoped, id-ordered, paginated list with equality filters; a filter
    naming a resource (REFERENCE_FILTERS) must name one of the caller's tenant.
    token_scope: what a page token is bound to, when it differs from the column filters."""
    p.require(permission, project_id=project_id)
    size = pagination.page_size(request.page_size)
    fingerprint = {"m": model.__tablename__, **(filters if token_scope is None else token_scope)}
    after = pagination.decode_token(request.page_token, fingerprint)

    async def read(s: AsyncSession) -> R:
        for column, value in filters.items():
            if column in REFERENCE_FILTERS and value:
                ref_model, kind = REFERENCE_FILTERS[column]
                await store.get(s, ref_model, value, p.tenant_id, kind)
        q = select(model).where(model.tenant_id == p.tenant_id)
        for column, value in filters.items():
            if value not in ("", None, 0):
                q = q.where(getattr(model, column) == value)
        rows, last = await store.page(s, q, model.id, size, after)
        return build(rows, pagination.encode_token(last, fingerprint) if last else "")

    return await store.read(read)
