"""Bounded tables stay bounded: delivered outbox messages are kept for a week (for inspection),
idempotency records for a day (a retry after that is a new request, as AIP-155 allows). Runs in
the background in every process; deleting is idempotent, so replicas need no coordination."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from sqlalchemy import Table, delete, select

from arm_common.db import Database
from arm_common.tables import utcnow
from arm_common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

OUTBOX_RETENTION = timedelta(days=7)
IDEMPOTENCY_RETENTION = timedelta(days=1)
BATCH = 1000


class Housekeeping:
    def __init__(self, db: Database, outbox: Table, idempotency: Table, *,
                 interval_s: float = 600.0) -> None:
        self.db = db
        self.outbox = outbox
        self.idempotency = idempotency
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> int:
        """Deletes what has expired, in batches of BATCH rows; returns how many rows went."""
        now = utcnow()
        removed = 0
        o, i = self.outbox, self.idempotency
        for table, key, condition in (
            (o, o.c.position, o.c.delivered_at < now - OUTBOX_RETENTION),
            (i, i.c.request_id, i.c.created_at < now - IDEMPOTENCY_RETENTION),
        ):
            while True:
                async def batch(s, table=table, key=key, condition=condition):  # type: ignore[no-untyped-def]
                    keys = (await s.execute(select(key).where(condition).limit(BATCH))).scalars().all()
                    if keys:
                        await s.execute(delete(table).where(condition, key.in_(keys)))
                    return len(keys)
                n = await self.db.run(batch)
                removed += n
                if n < BATCH:
                    break
        return removed

    async def start(self) -> None:
        async def loop() -> None:
            while True:
                try:
                    removed = await self.run_once()
                    if removed:
                        log.info("housekeeping removed %d expired rows", removed)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - try again next round
                    log.exception("housekeeping failed")
                await asyncio.sleep(self.interval_s)

        self._task = asyncio.create_task(loop(), name="housekeeping")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
