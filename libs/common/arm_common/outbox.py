"""The transactional outbox: change records and opEvents are written in the same database
transaction as the change they describe, then relayed to their receiver with retries and backoff.
A crash loses nothing (the row is committed with the change) and a retry duplicates nothing (the
receiver deduplicates on the message id)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from google.protobuf.message import Message
from sqlalchemy import and_, delete, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import Executable

from arm_common.db import Database, driver_connection
from arm_common.errors import DatabaseUnavailable
from arm_common.tables import utcnow

log = logging.getLogger(__name__)

TOPIC_CHANGE_RECORD = "change_record"
TOPIC_OP_EVENT = "op_event"


@dataclass(frozen=True)
class OutboxMessage:
    """One undelivered message as the relay hands it to a deliverer."""

    position: int
    message_id: str
    topic: str
    tenant_id: str
    payload: bytes
    attempts: int


async def enqueue(session: AsyncSession, outbox_table, *, topic: str, tenant_id: str,  # type: ignore[no-untyped-def]
                  message_id: str, message: Message) -> None:
    """Adds a message to the outbox inside the caller's transaction."""
    now = utcnow()
    await session.execute(outbox_table.insert().values(
        message_id=message_id, topic=topic, tenant_id=tenant_id,
        payload=message.SerializeToString(), created_at=now, attempts=0, next_attempt_at=now))


def outbox_row(*, topic: str, tenant_id: str, message_id: str, message: Message) -> dict[str, object]:
    """The row enqueue() writes, for callers that insert many in one statement."""
    now = utcnow()
    return {"message_id": message_id, "topic": topic, "tenant_id": tenant_id,
            "payload": message.SerializeToString(), "created_at": now, "attempts": 0,
            "next_attempt_at": now}


async def enqueue_many(session: AsyncSession, outbox_table, rows: list[dict[str, object]]) -> None:  # type: ignore[no-untyped-def]
    """Adds many messages (see outbox_row) in one statement, inside the caller's transaction."""
    if rows:
        await session.execute(outbox_table.insert(), rows)


Deliver = Callable[[Sequence[OutboxMessage]], Awaitable[None]]


class OutboxRelay:
    """Delivers one topic's messages in insertion order. Any number of replicas may run a relay:
    on PostgreSQL one of them at a time holds the topic's advisory lock and delivers; elsewhere
    one process owns the database. A failed batch is retried with exponential backoff (capped) and jitter."""

    def __init__(self, db: Database, outbox_table, topic: str, deliver: Deliver | None, *,  # type: ignore[no-untyped-def]
                 batch_size: int = 200, poll_interval_s: float = 1.0,
                 first_backoff_s: float = 0.2, max_backoff_s: float = 60.0,
                 min_interval_s: float = 0.05, keep_delivered: bool = True) -> None:
        self.db = db
        self.table = outbox_table
        self.topic = topic
        self.deliver = deliver
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.first_backoff_s = first_backoff_s  # doubled each further failure, up to max_backoff_s
        self.max_backoff_s = max_backoff_s
        # Under steady load every commit notifies; passes at most this often (unless the last
        # one was full) let one pass carry what several commits enqueued.
        self.min_interval_s = min_interval_s
        # Delivered rows are kept (marked `delivered_at`, deleted by housekeeping after
        # OUTBOX_RETENTION) unless the receiver keeps them itself: then a delivered row is deleted
        # in the pass that delivered it, which costs PostgreSQL a fraction of rewriting the row
        # (and later deleting it). A crash before that pass commits leaves the rows, delivered
        # again: the receiver deduplicates, as for any redelivery.
        self.keep_delivered = keep_delivered
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._failing = 0  # deliveries failed in a row: the first is warned about, not each

    def notify(self) -> None:
        """Called after a commit that enqueued messages, so they go out without waiting a poll."""
        self._wake.set()

    async def start(self) -> None:
        if self._task is not None:
            return
        if self.deliver is None:
            log.info("outbox %s: no receiver configured; messages wait in the outbox", self.topic)
            return
        self._task = asyncio.create_task(self._loop(), name=f"outbox-{self.topic}")

    async def stop(self, grace_s: float = 5.0) -> None:
        """Lets a delivery under way finish (and be marked) before stopping; a pass still
        running after `grace_s` is cancelled, and its messages are delivered again later."""
        self._stopping = True
        if self._task:
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace_s)
            except TimeoutError:
                self._task.cancel()
                try:
                    await self._task
                except asyncio.CancelledError:
                    pass

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            started = loop.time()
            # A notify that arrives during the pass wakes the next one.
            self._wake.clear()
            try:
                moved = await self.relay_once()
            except asyncio.CancelledError:
                raise
            except DatabaseUnavailable:  # said once by the database's outage log; try again later
                moved = 0
            except Exception:  # a broken database must not kill the relay; try again later
                log.exception("outbox %s: relay pass failed", self.topic)
                moved = 0
            if moved == self.batch_size:
                continue
            rest = started + self.min_interval_s - loop.time()
            if rest > 0 and not self._stopping:
                await asyncio.sleep(rest)
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
            except TimeoutError:
                pass

    async def relay_once(self) -> int:
        """Delivers at most one batch; returns how many messages were delivered."""
        if self.db.is_postgres:
            # Claim, deliver and mark in one transaction: other replicas skip the locked rows.
            return await self.db.run(self._claim_and_deliver)
        # SQLite: one process owns the file; don't hold its write lock during the network call.
        ready = await self.db.read(self._claim)
        if not ready:
            return 0
        return await self._deliver_and_mark(ready)

    async def _claim(self, session: AsyncSession) -> list[OutboxMessage]:
        t = self.table
        now = utcnow()
        query = (select(t).where(and_(t.c.topic == self.topic, t.c.delivered_at.is_(None)))
                 .order_by(t.c.position).limit(self.batch_size))
        rows = (await session.execute(query)).mappings().all()
        # Keep order: stop at the first message still backing off, so nothing overtakes it.
        ready = []
        for row in rows:
            if row["next_attempt_at"] > now:
                break
            ready.append(OutboxMessage(row["position"], row["message_id"], row["topic"],
                                       row["tenant_id"], row["payload"], row["attempts"]))
        return ready

    async def _claim_and_deliver(self, session: AsyncSession) -> int:
        # One relay per topic at a time (a transaction-scoped advisory lock), so messages leave in
        # commit order even with many replicas; the others find the lock taken and wait a poll.
        # Keyed by schema, table and topic: advisory locks are per database, and services (or test
        # runs) that share a database in separate schemas must not wait on each other's relays.
        lock_key = int.from_bytes(hashlib.sha256(
            f"arm-outbox:{self.db.schema or ''}:{self.table.name}:{self.topic}".encode()).digest()[:8],
            "big", signed=True)
        if not (await session.execute(text("select pg_try_advisory_xact_lock(:k)"), {"k": lock_key})).scalar():
            return 0
        # That statement began the transaction; the claim and the mark run on its asyncpg
        # connection as statements prepared once (through SQLAlchemy Core a pass cost ~1.8 ms of
        # CPU, most of it compiling and wrapping).
        apg = await driver_connection(session)
        name = self.table.name
        rows = await apg.fetch(
            f"SELECT position, message_id, topic, tenant_id, payload, attempts, next_attempt_at FROM {name} "
            "WHERE topic = $1 AND delivered_at IS NULL ORDER BY position LIMIT $2", self.topic, self.batch_size)
        now = utcnow().replace(tzinfo=None)  # the column holds UTC without a zone
        ready = []
        for row in rows:  # in order, up to the first message still backing off (see _claim)
            if row["next_attempt_at"] > now:
                break
            ready.append(OutboxMessage(row["position"], row["message_id"], row["topic"], row["tenant_id"],
                                       row["payload"], row["attempts"]))
        if not ready:
            return 0
        return await self._deliver_and_mark(ready, session, apg)

    async def _deliver_and_mark(self, ready: list[OutboxMessage],
                                session: AsyncSession | None = None, apg: Any = None) -> int:
        """Delivers and marks the messages, in `session` when given (on PostgreSQL, a delivery
        is marked through `apg`, the asyncpg connection of that session's transaction)."""
        assert self.deliver is not None
        t = self.table
        positions = [m.position for m in ready]
        try:
            await self.deliver(ready)
        except Exception as exc:  # noqa: BLE001 - any failure means "retry later"
            attempts = ready[0].attempts + 1
            delay = min(self.max_backoff_s, self.first_backoff_s * 2**(attempts - 1)) * random.uniform(0.5, 1.0)
            self._failing += 1
            if self._failing == 1:
                log.warning("outbox %s: delivery of %d failed (attempt %d): %s; retrying with "
                            "backoff", self.topic, len(ready), attempts, exc)
            else:
                log.debug("outbox %s: delivery of %d failed (attempt %d): %s", self.topic,
                          len(ready), attempts, exc)
            stmt: Executable = update(t).where(t.c.position.in_(positions)).values(
                attempts=t.c.attempts + 1, last_error=str(exc)[:2000],
                next_attempt_at=utcnow() + timedelta(seconds=delay))
            delivered = 0
        else:
            if self._failing:
                log.info("outbox %s: delivering again after %d failed attempts", self.topic, self._failing)
                self._failing = 0
            if apg is not None and not self.keep_delivered:
                await apg.execute(f"DELETE FROM {t.name} WHERE position = ANY($1::bigint[])", positions)
                return len(ready)
            if apg is not None:
                await apg.execute(f"UPDATE {t.name} SET delivered_at = $1, attempts = attempts + 1, "
                                  "last_error = NULL WHERE position = ANY($2::bigint[])",
                                  utcnow().replace(tzinfo=None), positions)  # UTC without a zone
                return len(ready)
            if self.keep_delivered:
                stmt = update(t).where(t.c.position.in_(positions)).values(
                    delivered_at=utcnow(), attempts=t.c.attempts + 1, last_error=None)
            else:
                stmt = delete(t).where(t.c.position.in_(positions))
            delivered = len(ready)
        if session is not None:
            await session.execute(stmt)
        else:
            async def mark(s: AsyncSession) -> None:
                await s.execute(stmt)
            await self.db.run(mark)
        return delivered
