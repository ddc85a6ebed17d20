"""Housekeeping deletes only what has expired: delivered outbox messages past a week, idempotency
records past a day; undelivered messages stay whatever their age."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from arm_common.db import Database
from arm_common.housekeeping import Housekeeping
from arm_common.tables import utcnow
from tests.common.test_outbox import METADATA, OUTBOX, db  # noqa: F401  (the db fixture)

IDEMPOTENCY = METADATA.tables["idempotency_keys"]


async def test_only_expired_rows_are_removed(db: Database) -> None:  # noqa: F811
    now = utcnow()
    old, recent = now - timedelta(days=8), now - timedelta(hours=1)

    def message(mid: str, created, delivered):  # type: ignore[no-untyped-def]
        return dict(message_id=mid, topic="t", tenant_id="t1", payload=b"", created_at=created,
                    attempts=0, next_attempt_at=created, delivered_at=delivered)

    async def seed(s):  # type: ignore[no-untyped-def]
        await s.execute(OUTBOX.insert(), [message("old-delivered", old, old),
                                          message("old-pending", old, None),
                                          message("recent-delivered", recent, recent)])
        await s.execute(IDEMPOTENCY.insert(), [
            dict(tenant_id="t1", method="M", request_id="old", request_hash="h", response=b"",
                 created_at=now - timedelta(days=2)),
            dict(tenant_id="t1", method="M", request_id="recent", request_hash="h", response=b"",
                 created_at=recent)])
    await db.run(seed)
    removed = await Housekeeping(db, OUTBOX, IDEMPOTENCY).run_once()
    assert removed == 2
    async with db.transaction() as s:
        messages = set((await s.execute(select(OUTBOX.c.message_id))).scalars())
        requests = set((await s.execute(select(IDEMPOTENCY.c.request_id))).scalars())
    assert messages == {"old-pending", "recent-delivered"}
    assert requests == {"recent"}
    assert await Housekeeping(db, OUTBOX, IDEMPOTENCY).run_once() == 0
