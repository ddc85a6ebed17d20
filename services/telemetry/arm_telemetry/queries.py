"""Reading stored events: QueryEvents (newest first, keyset pages), TailEvents (live, resumable
by store sequence), GetEventStats, GetRunTrace and GetMigrationHealth. Every query is scoped
to the caller's tenant.

Query pages are keyset pages on (occur_time, event_id) and pinned to the store sequence seen
by the first page: events ingested while a client pages through are neither shown twice nor
make another event move between pages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import ColumnElement

from arm.telemetry.v1 import telemetry_pb2
from arm_common import pagination
from arm_common.db import Database
from arm_common.errors import FieldViolation, InvalidArgument
from arm_common.tables import utcnow
from arm_telemetry import convert
from arm_telemetry.models import EVENTS

E = EVENTS.c
MAX_PAGE = 1000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(value: datetime) -> int:
    return (value - _EPOCH) // timedelta(microseconds=1)


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def filter_scope(f: telemetry_pb2.EventFilter) -> dict[str, Any]:
    """The filter as the page-token fingerprint sees it."""
    return {"types": sorted(set(f.types)), "instance_id": f.instance_id,
            "legacy_agent_id": f.legacy_agent_id, "version_id": f.version_id,
            "project_id": f.project_id, "run_id": f.run_id,
            "start": micros(f.start_time.ToDatetime(tzinfo=UTC)) if f.HasField("start_time") else 0,
            "end": micros(f.end_time.ToDatetime(tzinfo=UTC)) if f.HasField("end_time") else 0}


def conditions(tenant_id: str, f: telemetry_pb2.EventFilter) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = [E.tenant_id == tenant_id]
    if f.types:
        where.append(E.type.in_(sorted(set(f.types))))
    for name in ("instance_id", "legacy_agent_id", "version_id", "project_id", "run_id"):
        value = getattr(f, name)
        if value:
            where.append(E[name] == value)
    if f.HasField("start_time"):
        where.append(E.occur_time >= f.start_time.ToDatetime(tzinfo=UTC))
    if f.HasField("end_time"):
        where.append(E.occur_time < f.end_time.ToDatetime(tzinfo=UTC))
    return where


def _bad_token() -> InvalidArgument:
    return InvalidArgument("page_token is malformed", reason="INVALID_PAGE_TOKEN",
                           violations=[FieldViolation("page_token", "is malformed")])


def _page_key(token: str, scope: dict[str, Any]) -> tuple[int, str, int] | None:
    key = pagination.decode_token(token, scope)
    if key is None:
        return None
    if not (isinstance(key, list) and len(key) == 3 and isinstance(key[0], int)
            and isinstance(key[1], str) and isinstance(key[2], int)):
        raise _bad_token()
    return key[0], key[1], key[2]


class EventReader:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._committed = asyncio.Event()

    def committed(self) -> None:
        """Called by the writer after each commit: wakes the live tails."""
        self._committed.set()
        self._committed = asyncio.Event()

    async def query(self, tenant_id: str, request: telemetry_pb2.QueryEventsRequest) -> telemetry_pb2.QueryEventsResponse:
        size = pagination.page_size(request.page_size, maximum=MAX_PAGE)
        scope = filter_scope(request.filter)
        key = _page_key(request.page_token, scope)
        where = conditions(tenant_id, request.filter)

        async def read(s: AsyncSession) -> telemetry_pb2.QueryEventsResponse:
            if key is None:
                snapshot = (await s.execute(select(func.max(E.seq)).where(E.tenant_id == tenant_id))).scalar() or 0
            else:
                at, eid, snapshot = key
                t = from_micros(at)
                where.append(or_(E.occur_time < t, and_(E.occur_time == t, E.event_id < eid)))
            where.append(E.seq <= snapshot)
            rows = (await s.execute(select(EVENTS).where(*where)
                                    .order_by(E.occur_time.desc(), E.event_id.desc()).limit(size + 1))).all()
            page, more = pagination.split_page(rows, size)
            token = ""
            if more:
                last = page[-1]
                token = pagination.encode_token([micros(last.occur_time), last.event_id, snapshot], scope)
            return telemetry_pb2.QueryEventsResponse(events=[convert.event(r) for r in page],
                                                     next_page_token=token)

        return await self.db.read(read)

    async def tail(self, tenant_id: str, request: telemetry_pb2.TailEventsRequest,
                   *, poll_s: float = 1.0) -> AsyncIterator[telemetry_pb2.TailEventsResponse]:
        """Matching events stored after the cursor (or from now), in store order, forever.
        Wakes on this process's commits, and polls for other replicas' every `poll_s`."""
        where = conditions(tenant_id, request.filter)
        if request.after_cursor:
            try:
                cursor = int(request.after_cursor)
                if cursor < 0:
                    raise ValueError(cursor)
            except ValueError:
                raise InvalidArgument("after_cursor is malformed", reason="INVALID_CURSOR",
                                      violations=[FieldViolation("after_cursor", "is malformed")]) from None
        else:
            async def last(s: AsyncSession) -> int:
                return int((await s.execute(select(func.max(E.seq)))).scalar() or 0)
            cursor = await self.db.read(last)
        while True:
            wake = self._committed

            async def batch(s: AsyncSession, after: int = cursor) -> list[Any]:
                q = select(EVENTS).where(*where, E.seq > after).order_by(E.seq).limit(500)
                return list((await s.execute(q)).all())

            rows = await self.db.read(batch)
            for row in rows:
                cursor = row.seq
                yield telemetry_pb2.TailEventsResponse(event=convert.event(row), cursor=str(row.seq))
            if len(rows) == 500:
                continue
            try:
                await asyncio.wait_for(wake.wait(), poll_s)
            except TimeoutError:
                pass

    async def stats(self, tenant_id: str, request: telemetry_pb2.GetEventStatsRequest) -> telemetry_pb2.GetEventStatsResponse:
        end = request.end_time.ToDatetime(tzinfo=UTC) if request.HasField("end_time") else utcnow()
        start = request.start_time.ToDatetime(tzinfo=UTC) if request.HasField("start_time") else None

        async def read(s: AsyncSession) -> telemetry_pb2.GetEventStatsResponse:
            where = [E.tenant_id == tenant_id, E.occur_time < end]
            if start is not None:
                where.append(E.occur_time >= start)
            rows = (await s.execute(select(E.type, func.count()).where(*where).group_by(E.type)
                                    .order_by(E.type))).all()
            first = start
            if first is None:
                first = (await s.execute(select(func.min(E.occur_time)).where(*where))).scalar() or end
            out = telemetry_pb2.GetEventStatsResponse(
                counts=[telemetry_pb2.EventTypeCount(type=t, count=n) for t, n in rows],
                total=sum(n for _, n in rows))
            out.start_time.FromDatetime(first)
            out.end_time.FromDatetime(end)
            return out

        return await self.db.read(read)

    async def run_trace(self, tenant_id: str, request: telemetry_pb2.GetRunTraceRequest) -> telemetry_pb2.GetRunTraceResponse:
        size = pagination.page_size(request.page_size, maximum=MAX_PAGE)
        scope = {"run_id": request.run_id}
        raw = pagination.decode_token(request.page_token, scope)
        if raw is not None and not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], int)
                                    and isinstance(raw[1], str)):
            raise _bad_token()

        async def read(s: AsyncSession) -> telemetry_pb2.GetRunTraceResponse:
            where = [E.tenant_id == tenant_id, E.run_id == request.run_id]
            if raw is not None:
                t = from_micros(raw[0])
                where.append(or_(E.occur_time > t, and_(E.occur_time == t, E.event_id > raw[1])))
            rows = (await s.execute(select(EVENTS).where(*where)
                                    .order_by(E.occur_time, E.event_id).limit(size + 1))).all()
            page, more = pagination.split_page(rows, size)
            events = [convert.event(r) for r in page]
            out = telemetry_pb2.GetRunTraceResponse(events=events)
            out.decisions.extend(d for d in map(convert.decision, events) if d is not None)
            if more:
                out.next_page_token = pagination.encode_token(
                    [micros(page[-1].occur_time), page[-1].event_id], scope)
            return out

        return await self.db.read(read)

    async def migration_health(self, tenant_id: str) -> telemetry_pb2.GetMigrationHealthResponse:
        async def read(s: AsyncSession) -> telemetry_pb2.GetMigrationHealthResponse:
            legacy = E.legacy_agent_id != ""
            agent = or_(E.instance_id != "", legacy)
            row = (await s.execute(select(
                func.count(),
                func.coalesce(func.sum(case((legacy, 1), else_=0)), 0),
                func.coalesce(func.sum(case((and_(legacy, E.instance_id == ""), 1), else_=0)), 0),
                func.coalesce(func.sum(case((and_(agent, E.version_id == ""), 1), else_=0)), 0),
            ).where(E.tenant_id == tenant_id))).one()
            out = telemetry_pb2.GetMigrationHealthResponse(
                total_events=row[0], legacy_events=row[1], missing_instance_count=row[2],
                missing_version_count=row[3])
            out.compute_time.FromDatetime(utcnow())
            return out

        return await self.db.read(read)

