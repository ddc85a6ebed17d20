"""The reference backfill: fills instance, version, template, project and environment of stored
events that carry only a legacy agent id, walking a tenant's events in store order.

Each batch — the events' updates and the backfill's cursor and counts — commits in one
transaction, and the cursor moves only from the value this runner read (compare-and-set), so a
restart resumes exactly after the last committed batch and no event is processed twice. An
update only fills empty columns, so running a pass again changes nothing already filled."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from arm.telemetry.v1 import telemetry_pb2
from arm_common.db import Database, rowcount
from arm_common.errors import DatabaseUnavailable, FailedPrecondition, NotFound
from arm_common.ids import new_id
from arm_common.tables import utcnow
from arm_common.tasks import cancel_and_wait
from arm_telemetry.models import BACKFILLS, EVENTS
from arm_telemetry.references import ReferenceResolver

log = logging.getLogger(__name__)
B, E = BACKFILLS.c, EVENTS.c
PENDING, RUNNING = telemetry_pb2.BACKFILL_STATE_PENDING, telemetry_pb2.BACKFILL_STATE_RUNNING
COMPLETED, FAILED = telemetry_pb2.BACKFILL_STATE_COMPLETED, telemetry_pb2.BACKFILL_STATE_FAILED
_FILLED = ("project_id", "environment_id", "template_id", "version_id", "instance_id")


class CursorMoved(Exception):
    """Another runner advanced this backfill; this one stops."""


def to_proto(row: Any, remaining: int) -> telemetry_pb2.Backfill:
    out = telemetry_pb2.Backfill(
        backfill_id=row.id, tenant_id=row.tenant_id, state=row.state, cursor=str(row.cursor),
        processed_count=row.processed_count, updated_count=row.updated_count,
        remaining_count=remaining, unresolved_count=row.unresolved_count,
        error_message=row.error_message)
    out.start_time.FromDatetime(row.start_time)
    out.update_time.FromDatetime(row.update_time)
    if row.complete_time is not None:
        out.complete_time.FromDatetime(row.complete_time)
    return out


class Backfills:
    def __init__(self, db: Database, resolver: ReferenceResolver | None, *, batch_size: int = 500,
                 pause_s: float = 0.0) -> None:
        self.db = db
        self.resolver = resolver
        self.batch_size = batch_size
        self.pause_s = pause_s
        self._tasks: dict[str, asyncio.Task[None]] = {}

    # --- API ----------------------------------------------------------------------------------

    async def start_or_resume(self, s: AsyncSession, tenant_id: str, from_start: bool) -> str:
        """In the caller's transaction: the running backfill of the tenant, or the latest one
        resumed (FAILED, or RUNNING without a runner after a restart), or a new one (from the
        first event with from_start, else from where the latest one got)."""
        if self.resolver is None or not self.resolver.service_key:
            raise FailedPrecondition("the backfill needs ARM_SERVICE_API_KEY to ask the registry",
                                     reason="BACKFILL_UNAVAILABLE")
        latest = (await s.execute(select(BACKFILLS).where(B.tenant_id == tenant_id)
                                  .order_by(B.start_time.desc(), B.id.desc()).limit(1))).first()
        now = utcnow()
        if latest is not None and latest.state in (PENDING, RUNNING, FAILED) and not from_start:
            if latest.state == FAILED:
                await s.execute(update(BACKFILLS).where(B.id == latest.id).values(
                    state=RUNNING, error_message="", update_time=now))
            return str(latest.id)
        if latest is not None and latest.state in (PENDING, RUNNING):
            # from_start while one runs: that one stops (its cursor no longer moves), a new one begins.
            await s.execute(update(BACKFILLS).where(B.id == latest.id).values(
                state=FAILED, error_message="superseded by a backfill from the start", update_time=now))
        cursor = 0 if from_start or latest is None else latest.cursor
        backfill_id = new_id("bkf")
        await s.execute(BACKFILLS.insert().values(
            id=backfill_id, tenant_id=tenant_id, state=RUNNING, cursor=cursor, processed_count=0,
            updated_count=0, unresolved_count=0, error_message="", start_time=now, update_time=now,
            complete_time=None))
        return backfill_id

    def ensure_running(self, backfill_id: str) -> None:
        task = self._tasks.get(backfill_id)
        if task is None or task.done():
            self._tasks[backfill_id] = asyncio.create_task(self._run(backfill_id), name=f"backfill-{backfill_id}")

    async def status(self, tenant_id: str, backfill_id: str) -> telemetry_pb2.Backfill:
        async def read(s: AsyncSession) -> telemetry_pb2.Backfill:
            q = select(BACKFILLS).where(B.tenant_id == tenant_id)
            q = q.where(B.id == backfill_id) if backfill_id else q.order_by(B.start_time.desc(), B.id.desc()).limit(1)
            row = (await s.execute(q)).first()
            if row is None:
                raise NotFound.of("backfill", backfill_id or "(latest)")
            remaining = 0
            if row.state not in (COMPLETED,):
                remaining = int((await s.execute(select(func.count()).where(
                    E.tenant_id == tenant_id, E.seq > row.cursor))).scalar() or 0)
            return to_proto(row, remaining)

        return await self.db.read(read)

    async def resume_all(self) -> None:
        """At start: runners for backfills left RUNNING by a stopped or killed process."""
        async def read(s: AsyncSession) -> list[str]:
            return list((await s.execute(select(B.id).where(B.state.in_([PENDING, RUNNING])))).scalars())

        if self.resolver is None or not self.resolver.service_key:
            return
        for backfill_id in await self.db.read(read):
            self.ensure_running(backfill_id)

    async def stop(self) -> None:
        for task in list(self._tasks.values()):
            await cancel_and_wait(task)

    # --- the runner ---------------------------------------------------------------------------

    async def _run(self, backfill_id: str) -> None:
        try:
            more = True
            while more:
                try:
                    more = await self.step(backfill_id)
                except DatabaseUnavailable as exc:
                    # Said once by the database's outage log; resume from the cursor when it is back.
                    await asyncio.sleep(exc.retry_delay_s or 1.0)
                    continue
                if more and self.pause_s:
                    await asyncio.sleep(self.pause_s)
        except asyncio.CancelledError:
            raise
        except CursorMoved:
            log.info("backfill %s: another runner took over", backfill_id)
        except Exception as exc:  # noqa: BLE001 - recorded; StartBackfill resumes from the cursor
            log.exception("backfill %s failed", backfill_id)
            message = str(exc)[:2000] or type(exc).__name__

            async def fail(s: AsyncSession) -> None:
                await s.execute(update(BACKFILLS).where(B.id == backfill_id, B.state == RUNNING).values(
                    state=FAILED, error_message=message, update_time=utcnow()))
            await self.db.run(fail)

    async def step(self, backfill_id: str) -> bool:
        """Processes one batch; returns False when the backfill is done (or not running)."""
        assert self.resolver is not None

        async def read(s: AsyncSession) -> tuple[Any, list[Any]]:
            bf = (await s.execute(select(BACKFILLS).where(B.id == backfill_id))).first()
            if bf is None or bf.state != RUNNING:
                return bf, []
            rows = (await s.execute(select(E.seq, E.legacy_agent_id, *(E[c] for c in _FILLED))
                                    .where(E.tenant_id == bf.tenant_id, E.seq > bf.cursor)
                                    .order_by(E.seq).limit(self.batch_size))).all()
            return bf, list(rows)

        bf, rows = await self.db.read(read)
        if bf is None or bf.state != RUNNING:
            return False
        wanted = [r for r in rows if r.legacy_agent_id and (not r.instance_id or not r.version_id)]
        resolved = {}
        for legacy in sorted({r.legacy_agent_id for r in wanted}):
            found = await self.resolver.resolve(bf.tenant_id, legacy, use_negative=False)
            if found is not None:
                resolved[legacy] = found
        updates = []
        unresolved = 0
        for r in wanted:
            refs = resolved.get(r.legacy_agent_id)
            if refs is None:
                unresolved += 1
                continue
            values = {c: getattr(refs, c) for c in _FILLED if not getattr(r, c)}
            if values:
                updates.append((r.seq, values))
        new_cursor = rows[-1].seq if rows else bf.cursor
        done = len(rows) < self.batch_size

        async def write(s: AsyncSession) -> None:
            now = utcnow()
            moved = await s.execute(update(BACKFILLS).where(
                B.id == backfill_id, B.cursor == bf.cursor, B.state == RUNNING).values(
                cursor=new_cursor, processed_count=B.processed_count + len(rows),
                updated_count=B.updated_count + len(updates),
                unresolved_count=B.unresolved_count + unresolved, update_time=now,
                **({"state": COMPLETED, "complete_time": now} if done else {})))
            if rowcount(moved) != 1:
                raise CursorMoved(backfill_id)
            for seq, values in updates:
                # Fill only what is still empty: a concurrent fill (ingest does not touch stored
                # rows, but a second pass might) is never overwritten.
                await s.execute(update(EVENTS).where(E.seq == seq, or_(
                    *(and_(E[c] == "") for c in values))).values(**{
                        c: func.coalesce(func.nullif(E[c], ""), v) for c, v in values.items()}))

        await self.db.run(write)
        return not done
