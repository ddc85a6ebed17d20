"""What every governance servicer does at its edge the same way: the standard request fields,
a permission held at some scope, and the idempotent write (one transaction per request_id)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession

from arm_common import validation as val
from arm_common.auth import Principal, current_principal
from arm_common.db import Database
from arm_common.errors import Violations
from arm_common.idempotency import run_idempotent
from arm_common.outbox import OutboxRelay
from arm_governance.models import IDEMPOTENCY

R = TypeVar("R", bound=Message)


def check_common(request: Any) -> None:
    """INVALID_ARGUMENT for a bad request_id / etag / reason (the fields every write shares)."""
    v = Violations()
    val.standard_fields(v, request)
    v.raise_if_any()


def require_somewhere(p: Principal, permission: str) -> None:
    """PERMISSION_DENIED unless the caller holds the permission at some scope; the store then
    checks it at the resource's project or environment."""
    if not any(g.permission == permission for g in p.grants):
        p.require(permission)


# The session a store method takes, named here so that the servicers, which only hand it on,
# need not import SQLAlchemy (a test keeps them free of it).
Session = AsyncSession


async def idempotent_write(db: Database, tenant_id: str, method: str, request: Message,
                           response_type: type[R], write: Callable[[AsyncSession], Awaitable[R]]) -> R:
    """`write` in one transaction, once per (tenant, method, request_id): a retry gets the first
    response (governance's idempotency table)."""
    return await run_idempotent(db, IDEMPOTENCY, tenant_id=tenant_id, method=method, request=request,
                                response_type=response_type, write=write)


class Writes:
    """The idempotent write of a servicer, then `_written` (by default: wake the outbox relays so
    the change records leave at once)."""

    db: Database
    relays: Sequence[OutboxRelay] = ()

    async def _write(self, method: str, request: Any, response_type: Any, fn: Any) -> Any:
        p = current_principal()
        result = await idempotent_write(self.db, p.tenant_id, method, request, response_type, fn)
        self._written(p.tenant_id)
        return result

    def _written(self, tenant_id: str) -> None:
        for relay in self.relays:
            relay.notify()
