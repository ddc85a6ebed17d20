"""Change notices for cache invalidation: small JSON messages sent inside the transaction that
makes the change and delivered to every subscriber once it commits — in this process, and on
PostgreSQL in every process on the same database (LISTEN/NOTIFY). A subscriber that may have
missed notices (a lost listener connection, a full queue) receives {"reset": true} and must drop
everything it cached."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import asyncpg
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from arm_common.db import Database, is_connection_error
from arm_common.tasks import cancel_and_wait

log = logging.getLogger(__name__)
RESET: dict[str, Any] = {"reset": True}
_QUEUE_LIMIT = 10_000


class ChangeChannel:
    def __init__(self, db: Database, name: str) -> None:
        self.db = db
        # Channels are per database, not per schema: include the schema so that services (or
        # test runs) sharing a database in different schemas never hear each other.
        self.channel = f"arm_{name}_{db.schema or 'public'}"[:63].lower()
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    # --- sending --------------------------------------------------------------------------------

    async def send(self, session: AsyncSession, notice: dict[str, Any]) -> None:
        """Queues a notice in the caller's transaction; it is delivered only if that commits."""
        if self.db.is_postgres:
            await session.execute(text("select pg_notify(:c, :p)"),
                                  {"c": self.channel, "p": json.dumps(notice, separators=(",", ":"))})
            return
        pending: list[dict[str, Any]] | None = session.info.get(self.channel)
        if pending is None:
            pending = session.info[self.channel] = []
            sync_session = session.sync_session

            def after_commit(_session: Any) -> None:
                for item in session.info.pop(self.channel, []):
                    self.publish(item)

            def after_rollback(_session: Any, _previous: Any = None) -> None:  # (session, transaction)
                session.info.pop(self.channel, None)

            event.listen(sync_session, "after_commit", after_commit, once=True)
            event.listen(sync_session, "after_soft_rollback", after_rollback, once=True)
        pending.append(notice)

    def publish(self, notice: dict[str, Any]) -> None:
        """Delivers a notice to this process's subscribers."""
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(notice)
            except asyncio.QueueFull:
                # The subscriber fell behind: it loses detail, so it must start over.
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(RESET)

    # --- receiving ------------------------------------------------------------------------------

    @property
    def live(self) -> bool:
        """True while every committed notice is guaranteed to reach this process's subscribers
        (always on SQLite, whose one process publishes its own commits)."""
        return self._listening.is_set() if self.db.is_postgres else True

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(_QUEUE_LIMIT)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(queue)

    async def start(self) -> None:
        if self.db.is_postgres:
            self._task = asyncio.create_task(self._listen(), name=f"listen-{self.channel}")
            try:
                await asyncio.wait_for(self._listening.wait(), 10)
            except TimeoutError:
                log.warning("%s: LISTEN not established yet; retrying in the background", self.channel)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _listen(self) -> None:
        dsn = make_url(self.db.url).set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(dsn)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())

                def on_notify(_c: Any, _pid: int, _channel: str, payload: str) -> None:
                    try:
                        self.publish(json.loads(payload))
                    except ValueError:
                        self.publish(RESET)

                await conn.add_listener(self.channel, on_notify)
                self.publish(RESET)  # anything sent while we were not listening is unknown
                self._listening.set()
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), 5)
                    except TimeoutError:
                        # A silent connection may be dead; a query proves it is not.
                        await conn.fetchval("select 1", timeout=5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep listening through outages
                if is_connection_error(exc):
                    self.db.outage.failed(exc)  # said once per outage, not per reconnection
                else:
                    log.warning("%s: listener failed (%s); reconnecting", self.channel, exc)
            finally:
                self._listening.clear()
                if conn is not None and not conn.is_closed():
                    await conn.close()
            self.publish(RESET)
            await asyncio.sleep(0.5)
