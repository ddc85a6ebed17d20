"""Bounded tables stay bounded: delivered outbox messages are kept for a week (for inspection),
idempotency records for a day (a retry after that is a new request, as AIP-155 allows). Runs in
the background in every process; deleting is idempotent, so replicas need no coordination."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import Table, delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from arm_common.db import Database
from arm_common.errors import DatabaseUnavailable
from arm_common.tables import utcnow
from arm_common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

OUTBOX_RETENTION = timedelta(days=7)
IDEMPOTENCY_RETENTION = timedelta(days=1)
BATCH = 1000


async def delete_in_batches(db: Database, table: Table, key: Any, condition: Any, *,
                            batch: int = BATCH) -> int:
    """Deletes the rows matching `condition`, one bounded transaction of at most `batch` rows at a
    time (so no long lock, no huge transaction); returns how many went."""
    removed = 0
    while True:
        async def one(s: AsyncSession) -> int:
            keys = (await s.execute(select(key).where(condition).limit(batch))).scalars().all()
            if keys:
                await s.execute(delete(table).where(condition, key.in_(keys)))
            return len(keys)
        n = await db.run(one)
        removed += n
        if n < batch:
            return removed
        await asyncio.sleep(0)  # let other work in between batches


class Periodic:
    """Runs `work` in the background every `interval_s`; a failed round is logged and tried again
    the next round. `work` returns how many rows it removed (logged when not zero)."""

    def __init__(self, name: str, work: Callable[[], Awaitable[int]], interval_s: float) -> None:
        self.name = name
        self.work = work
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        async def loop() -> None:
            while True:
                try:
                    removed = await self.work()
                    if removed:
                        log.info("%s removed %d rows", self.name, removed)
                except asyncio.CancelledError:
                    raise
                except DatabaseUnavailable:
                    pass  # said once by the database's outage log; try again next round
                except Exception:  # noqa: BLE001 - try again next round
                    log.exception("%s failed", self.name)
                await asyncio.sleep(self.interval_s)

        self._task = asyncio.create_task(loop(), name=self.name)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)


class Housekeeping(Periodic):
    def __init__(self, db: Database, outbox: Table, idempotency: Table, *,
                 interval_s: float = 600.0) -> None:
        super().__init__("housekeeping", self.run_once, interval_s)
        self.db = db
        self.outbox = outbox
        self.idempotency = idempotency

    async def run_once(self) -> int:
        """Deletes what has expired, in batches of BATCH rows; returns how many rows went."""
        now = utcnow()
        o, i = self.outbox, self.idempotency
        return (await delete_in_batches(self.db, o, o.c.position, o.c.delivered_at < now - OUTBOX_RETENTION)
                + await delete_in_batches(self.db, i, i.c.request_id,
                                          i.c.created_at < now - IDEMPOTENCY_RETENTION))
