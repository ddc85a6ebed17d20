"""Retention: events that occurred longer ago than the retention period are deleted in bounded
batches, in the background, by every replica (deleting is idempotent). The (tenant, event_id)
dedupe key is the event row itself, so it goes with the event; ingest refuses events older than
the period (OCCURRED_BEFORE_RETENTION), so a late retry cannot store a pruned event again."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from arm_common.db import Database
from arm_common.tables import utcnow
from arm_common.tasks import cancel_and_wait
from arm_telemetry.models import EVENTS

log = logging.getLogger(__name__)
E = EVENTS.c


class Retention:
    def __init__(self, db: Database, period: timedelta, *, batch: int = 5000,
                 interval_s: float = 300.0) -> None:
        self.db = db
        self.period = period
        self.batch = batch
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> int:
        """Deletes expired events, one bounded transaction per batch; returns how many went."""
        cutoff = utcnow() - self.period
        removed = 0
        while True:
            async def one(s: AsyncSession) -> int:
                seqs = list((await s.execute(select(E.seq).where(E.occur_time < cutoff)
                                             .limit(self.batch))).scalars())
                if seqs:
                    await s.execute(delete(EVENTS).where(E.seq.in_(seqs)))
                return len(seqs)
            n = await self.db.run(one)
            removed += n
            if n < self.batch:
                return removed
            await asyncio.sleep(0)  # let ingest in between batches

    async def start(self) -> None:
        async def loop() -> None:
            while True:
                try:
                    removed = await self.run_once()
                    if removed:
                        log.info("retention removed %d events", removed)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - try again next round
                    log.exception("retention pass failed")
                await asyncio.sleep(self.interval_s)

        self._task = asyncio.create_task(loop(), name="event-retention")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
