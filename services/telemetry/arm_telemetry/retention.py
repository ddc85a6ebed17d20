"""Retention: events that occurred longer ago than the retention period are deleted in bounded
batches, in the background, by every replica (deleting is idempotent). The (tenant, event_id)
dedupe key is the event row itself, so it goes with the event; ingest refuses events older than
the period (OCCURRED_BEFORE_RETENTION), so a late retry cannot store a pruned event again."""

from __future__ import annotations

from datetime import timedelta

from arm_common.db import Database
from arm_common.housekeeping import Periodic, delete_in_batches
from arm_common.tables import utcnow
from arm_telemetry.models import EVENTS

E = EVENTS.c


class Retention(Periodic):
    def __init__(self, db: Database, period: timedelta, *, batch: int = 5000,
                 interval_s: float = 300.0) -> None:
        super().__init__("event-retention", self.run_once, interval_s)
        self.db = db
        self.period = period
        self.batch = batch

    async def run_once(self) -> int:
        """Deletes expired events, one bounded transaction per batch; returns how many went."""
        return await delete_in_batches(self.db, EVENTS, E.seq, E.occur_time < utcnow() - self.period,
                                       batch=self.batch)
