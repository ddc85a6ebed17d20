"""Idempotent writes keyed by the request's `request_id` (AIP-155).

The first call runs the write and stores its response in the same transaction; a retry with the
same id gets that stored response without writing again. Reusing an id for a different request is
INVALID_ARGUMENT. Concurrent first calls race on the primary key: the loser re-reads the winner's
response."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import Message
from sqlalchemy import Table, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from arm_common.canonical import sha256_hex
from arm_common.db import Database
from arm_common.errors import AlreadyExists, FieldViolation, InvalidArgument
from arm_common.tables import utcnow

R = TypeVar("R", bound=Message)


def _request_hash(request: Message) -> str:
    return sha256_hex(request.SerializeToString(deterministic=True))


def request_hash(request: Message) -> str:
    """The fingerprint kept with a request_id, for writers that store their own records: a
    reuse of the id with other fields is REQUEST_ID_REUSED."""
    return _request_hash(request)


async def run_idempotent(
    db: Database,
    table: Table,
    *,
    tenant_id: str,
    method: str,
    request: Message,
    response_type: type[R],
    write: Callable[[AsyncSession], Awaitable[R]],
    stored_form: Callable[[R], R] | None = None,
) -> R:
    """Runs `write` in a transaction once per (tenant, method, request_id).

    stored_form: what to keep for replays, e.g. the response with a one-time secret removed."""
    request_id: str = getattr(request, "request_id", "")
    if not request_id:
        return await db.run(write)
    if len(request_id) > 128:
        raise InvalidArgument("request_id is too long", reason="INVALID_FIELDS",
                              violations=[FieldViolation("request_id", "must be at most 128 characters")])
    req_hash = _request_hash(request)
    key = (table.c.tenant_id == tenant_id) & (table.c.method == method) & (
        table.c.request_id == request_id)

    async def replay(session: AsyncSession) -> R | None:
        row = (await session.execute(select(table.c.request_hash, table.c.response).where(key))).first()
        if row is None:
            return None
        if row.request_hash != req_hash:
            raise InvalidArgument(
                "request_id was already used for a different request",
                reason="REQUEST_ID_REUSED",
                violations=[FieldViolation("request_id", "was used before with other fields")])
        return response_type.FromString(row.response)

    async def attempt(session: AsyncSession) -> R:
        earlier = await replay(session)
        if earlier is not None:
            return earlier
        response = await write(session)
        kept = stored_form(response) if stored_form else response
        await session.execute(table.insert().values(
            tenant_id=tenant_id, method=method, request_id=request_id, request_hash=req_hash,
            response=kept.SerializeToString(), created_at=utcnow()))
        return response

    try:
        return await db.run(attempt)
    except (IntegrityError, AlreadyExists):
        # Either a concurrent twin won the race for this request_id (its write then collides with
        # ours on a unique key, or on the idempotency key itself), or the write hit a unique
        # constraint on its own. Replay the twin's response if there is one; otherwise re-raise.
        earlier = await db.read(replay)
        if earlier is None:
            raise
        return earlier
