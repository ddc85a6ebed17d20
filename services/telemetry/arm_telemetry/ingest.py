"""Ingest: per-event validation (a bad event is rejected alone, with its index and reason), and
the event writer, which commits the batches of concurrent calls together (group commit) and
answers each call only once its events are committed.

Writers are serialized (one writer task per process; on PostgreSQL also a transaction-scoped
advisory lock across replicas), which makes `events.seq` follow commit order: TailEvents can
resume from a seq without missing an event committed late. On PostgreSQL the rows go in with
COPY (and, when some were stored before, through a temporary table and one INSERT … ON CONFLICT
DO NOTHING RETURNING); on SQLite, whose one writer holds the file, by looking the keys up and
inserting the rest in one multi-row INSERT.
COST_TICK events enqueue their spend report to governance in the same transaction (outbox).

Memory is bounded: events waiting for the writer are counted, and a call that would pass
`max_pending` is refused with RESOURCE_EXHAUSTED and a retry delay; nothing of it is stored."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any

import asyncpg
from google.protobuf import struct_pb2
from sqlalchemy import and_, insert, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from arm.governance.v1 import decision_pb2
from arm.telemetry.v1 import events_pb2, telemetry_pb2
from arm_common import edge
from arm_common.auth import Principal
from arm_common.db import Database, driver_connection
from arm_common.errors import DatabaseUnavailable, ResourceExhausted, Unavailable
from arm_common.outbox import outbox_row
from arm_common.tables import utcnow
from arm_common.tasks import cancel_and_wait
from arm_telemetry.models import EVENTS, IDEMPOTENCY, OUTBOX, REF_COLUMNS
from arm_telemetry.references import CHECKED_COLUMNS, ReferenceChecker, ReferenceResolver

log = logging.getLogger(__name__)

TOPIC_SPEND = "spend"
MAX_BATCH = 1000
MAX_ID = 128
MAX_PAYLOAD_BYTES = 64 * 1024
FUTURE_SKEW = timedelta(days=1)
_VALID_TYPES = set(events_pb2.OpEventType.values()) - {0}
COLUMNS = ["tenant_id", "event_id", "type", "occur_time", "receive_time", *REF_COLUMNS, "payload"]
# A validated event is a list in COLUMNS order (times in UTC without a zone, as stored): COPY
# takes it as it is, and no per-event dict is built on the hot path.
Row = list[Any]
COL = {name: i for i, name in enumerate(COLUMNS)}
TENANT, EVENT_ID, TYPE, OCCUR, RECEIVE, PAYLOAD = (COL[n] for n in (
    "tenant_id", "event_id", "type", "occur_time", "receive_time", "payload"))
INSTANCE, VERSION, LEGACY = COL["instance_id"], COL["version_id"], COL["legacy_agent_id"]
FILLED = tuple(COL[n] for n in ("project_id", "environment_id", "template_id", "version_id", "instance_id"))
_EPOCH = datetime(1970, 1, 1)


_refs = attrgetter(*REF_COLUMNS)


def _reject(index: int, event_id: str, reason: str, message: str) -> telemetry_pb2.RejectedEvent:
    return telemetry_pb2.RejectedEvent(index=index, event_id=event_id[:MAX_ID], reason=reason,
                                       message=message)


def cost_amount(ev: events_pb2.OpEvent) -> float | None:
    """The amount_usd of a COST_TICK payload, or None when missing or not a number."""
    if not ev.HasField("payload"):
        return None
    value = ev.payload.fields.get("amount_usd")
    if value is None or value.WhichOneof("kind") != "number_value":
        return None
    return value.number_value


# `validate` checks every field of an event, so a bad one is rejected alone (SPEC: the rest are
# stored) rather than failing the whole batch at the edge.
edge.validated_per_item(events_pb2.OpEvent.DESCRIPTOR.full_name)


def validate(index: int, ev: events_pb2.OpEvent, principal: Principal, now: datetime,
             oldest: datetime) -> Row | telemetry_pb2.RejectedEvent:
    """The row to store for one event, or why it is rejected. tenant_id and receive_time of the
    event are ignored (the caller's tenant, the server's clock). `now` and `oldest` are UTC
    without a zone (see now_and_oldest)."""
    eid = ev.event_id
    if not eid:
        return _reject(index, eid, "MISSING_EVENT_ID", "event_id is required")
    if len(eid) > MAX_ID or not eid.isprintable():
        return _reject(index, eid, "INVALID_EVENT_ID", f"event_id must be printable, at most {MAX_ID} characters")
    if ev.type not in _VALID_TYPES:
        return _reject(index, eid, "UNKNOWN_TYPE", f"type {ev.type} is not a known OpEventType")
    if not ev.HasField("occur_time"):
        return _reject(index, eid, "MISSING_OCCURRED_AT", "occur_time is required")
    seconds, nanos = ev.occur_time.seconds, ev.occur_time.nanos
    if not 0 <= nanos < 1_000_000_000 or not -62135596800 <= seconds <= 253402300799:
        return _reject(index, eid, "INVALID_OCCURRED_AT", "occur_time is not a valid timestamp")
    occurred = _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)
    if occurred < oldest:
        return _reject(index, eid, "OCCURRED_BEFORE_RETENTION",
                       "occur_time is older than the retention period")
    if occurred > now + FUTURE_SKEW:
        return _reject(index, eid, "OCCURRED_IN_FUTURE", "occur_time is more than a day ahead")
    refs = _refs(ev)
    if max(map(len, refs)) > MAX_ID or "\x00" in "".join(refs):
        bad = next(n for n, v in zip(REF_COLUMNS, refs, strict=True) if len(v) > MAX_ID or "\x00" in v)
        return _reject(index, eid, "INVALID_FIELD", f"{bad} must be at most {MAX_ID} characters, without NUL")
    if ev.HasField("payload"):
        problems = edge.violations(ev.payload, "payload")
        if problems:  # NaN, ±Infinity or NUL: JSON and PostgreSQL readers of the payload choke
            return _reject(index, eid, "INVALID_PAYLOAD", f"{problems[0].field} {problems[0].description}")
    payload = ev.payload.SerializeToString() if ev.HasField("payload") else None
    if payload is not None and len(payload) > MAX_PAYLOAD_BYTES:
        return _reject(index, eid, "PAYLOAD_TOO_LARGE", f"payload must be at most {MAX_PAYLOAD_BYTES} bytes")
    row: Row = [principal.tenant_id, eid, ev.type, occurred, now, *refs, payload]
    if principal.is_agent:
        # An agent key reports for itself only.
        if row[INSTANCE] and row[INSTANCE] != principal.actor_id:
            return _reject(index, eid, "NOT_YOUR_AGENT", "an agent key may only report its own events")
        if not row[INSTANCE] and not row[LEGACY]:
            row[INSTANCE] = principal.actor_id
    if ev.type == events_pb2.OP_EVENT_TYPE_COST_TICK:
        amount = cost_amount(ev)
        if amount is None or not math.isfinite(amount) or amount < 0:
            return _reject(index, eid, "INVALID_COST", "a COST_TICK needs payload.amount_usd, a finite number >= 0")
        if not row[INSTANCE] and not row[LEGACY]:
            return _reject(index, eid, "MISSING_AGENT", "a COST_TICK needs instance_id or legacy_agent_id")
    return row


async def prepare(events: Sequence[events_pb2.OpEvent], principal: Principal, retention: timedelta,
                  resolver: ReferenceResolver | None, caller_key: str,
                  checker: ReferenceChecker | None = None,
                  ) -> tuple[list[Row], list[telemetry_pb2.RejectedEvent]]:
    """Validates a batch, rejects events naming registry ids outside the caller's tenant, and
    fills the references of events that carry only a legacy agent id."""
    now, oldest = now_and_oldest(retention)
    rows: list[Row] = []
    indexes: list[int] = []
    rejected: list[telemetry_pb2.RejectedEvent] = []
    for i, ev in enumerate(events):
        out = validate(i, ev, principal, now, oldest)
        if isinstance(out, list):
            rows.append(out)
            indexes.append(i)
        else:
            rejected.append(out)
    # Every registry id an event names must be the caller's tenant's. System-tenant keys (the
    # services, acting for a tenant after checking the ids themselves) are trusted.
    if checker is not None and rows and not (principal.system_tenant or principal.acting_for_tenant):
        own = principal.actor_id if principal.is_agent else None
        wanted = {(column, r[COL[column]]) for r in rows for column in CHECKED_COLUMNS
                  if r[COL[column]] and not (column == "instance_id" and r[COL[column]] == own)}
        missing = await checker.unknown(principal.tenant_id, wanted, caller_key) if wanted else set()
        if missing:
            kept: list[Row] = []
            for index, r in zip(indexes, rows, strict=True):
                bad = next(((c, r[COL[c]]) for c in CHECKED_COLUMNS if (c, r[COL[c]]) in missing), None)
                if bad is None:
                    kept.append(r)
                else:
                    kind = CHECKED_COLUMNS[bad[0]]
                    rejected.append(_reject(index, r[EVENT_ID], f"{kind.upper()}_NOT_FOUND",
                                            f"{bad[0]} {bad[1]!r} is not a {kind} of the caller's tenant"))
            rows = kept
            rejected.sort(key=lambda x: x.index)
    if resolver is not None:
        legacy = {r[LEGACY] for r in rows if r[LEGACY] and not (r[INSTANCE] and r[VERSION])}
        if legacy:
            found = await resolver.resolve_many(principal.tenant_id, legacy, caller_key=caller_key)
            for r in rows:
                refs = found.get(r[LEGACY]) if r[LEGACY] else None
                if refs is not None:
                    for i in FILLED:
                        if not r[i]:
                            r[i] = getattr(refs, COLUMNS[i])
    return rows, rejected


def spend_message(row: Row, amount: float) -> tuple[str, decision_pb2.ReportSpendRequest]:
    """The outbox message id and ReportSpend request of a stored COST_TICK: idempotent on the
    event (the ledger's idempotency key is the event_id)."""
    message_id = "spd-" + hashlib.sha256(f"{row[TENANT]}\x00{row[EVENT_ID]}".encode()).hexdigest()[:40]
    entry = decision_pb2.SpendEntry(
        instance_id=row[INSTANCE], legacy_agent_id="" if row[INSTANCE] else row[LEGACY],
        run_id=row[COL["run_id"]], tool_call_id=row[COL["tool_call_id"]], amount_usd=amount,
        idempotency_key=row[EVENT_ID])
    entry.occur_time.FromDatetime(row[OCCUR])  # naive = UTC
    return message_id, decision_pb2.ReportSpendRequest(request_id=message_id, entry=entry)


# Given (accepted, duplicates), the idempotency record to store with the batch's events.
Remember = Callable[[int, int], dict[str, Any]]


@dataclass
class _Pending:
    rows: list[Row]
    future: asyncio.Future[tuple[int, int]]
    remember: Remember | None = None
    accepted: int = 0
    duplicates: int = 0


@dataclass
class EventWriter:
    """Group commit of validated rows. `write` returns (accepted, duplicates) once committed."""

    db: Database
    max_pending: int = 50_000
    max_group: int = 10_000
    on_commit: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Advisory locks are per database: the key names the schema, so telemetry databases
        # sharing a PostgreSQL database in different schemas do not serialize each other.
        digest = hashlib.sha256(f"arm-telemetry-writer:{self.db.schema or ''}".encode()).digest()
        self._lock_key = int.from_bytes(digest[:8], "big", signed=True)
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._pending_events = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._writer(), name="event-writer")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    @property
    def pending(self) -> int:
        return self._pending_events

    async def write(self, rows: list[Row], remember: Remember | None = None) -> tuple[int, int]:
        """Returns (accepted, duplicates) once committed. `remember` adds the call's
        idempotency record (its response) to the same transaction."""
        if not rows:
            return 0, 0
        if self._pending_events + len(rows) > self.max_pending:
            raise ResourceExhausted(
                f"telemetry is saturated ({self._pending_events} events waiting); retry later",
                reason="INGEST_SATURATED", retry_delay_s=0.5,
                metadata={"pending_events": str(self._pending_events)})
        item = _Pending(rows, asyncio.get_running_loop().create_future(), remember)
        self._pending_events += len(rows)
        self._queue.put_nowait(item)
        # Shielded: a caller that goes away does not undo a write already under way.
        return await asyncio.shield(item.future)

    async def _writer(self) -> None:
        while True:
            group = [await self._queue.get()]
            size = len(group[0].rows)
            while size < self.max_group and not self._queue.empty():
                item = self._queue.get_nowait()
                group.append(item)
                size += len(item.rows)
            try:
                await self._commit(group)
            except DatabaseUnavailable as exc:
                # Nothing stored: every call answers UNAVAILABLE (said once by the database's
                # outage log; no use trying one by one).
                for item in group:
                    self._finish(item, DatabaseUnavailable(
                        "the events could not be stored (the database is unavailable); retry",
                        retry_delay_s=exc.retry_delay_s or 1.0))
            except Exception:  # noqa: BLE001 - isolate the call that breaks the group
                log.exception("event group of %d calls failed; writing them one by one", len(group))
                for item in group:
                    try:
                        await self._commit([item])
                    except Exception:  # noqa: BLE001
                        log.exception("an ingest batch of %d events could not be stored", len(item.rows))
                        self._finish(item, Unavailable("the events could not be stored; retry",
                                                       reason="EVENT_STORE_UNAVAILABLE", retry_delay_s=1.0))
            finally:
                for item in group:
                    if not item.future.done():  # cancelled mid-way: nothing was acknowledged
                        self._finish(item, Unavailable("telemetry is stopping; retry",
                                                       reason="EVENT_STORE_UNAVAILABLE"))

    def _finish(self, item: _Pending, error: Exception | None) -> None:
        if item.future.done():  # answered already; its events left the count then
            return
        self._pending_events -= len(item.rows)
        if error is None:
            item.future.set_result((item.accepted, item.duplicates))
        else:
            item.future.set_exception(error)

    async def _commit(self, group: list[_Pending]) -> None:
        await self.db.run(lambda s: self._write(s, group))
        for item in group:
            self._finish(item, None)
        for callback in self.on_commit:
            callback()

    async def _write(self, s: AsyncSession, group: list[_Pending]) -> None:
        # First occurrence of a key in the group is the candidate; later twins are duplicates.
        candidates: dict[tuple[str, str], Row] = {}
        for item in group:
            for row in item.rows:
                candidates.setdefault((row[TENANT], row[EVENT_ID]), row)
        if self.db.is_postgres:
            stored = await self._insert_postgres(s, candidates)
        else:
            stored = await self._insert_sqlite(s, candidates)
        claimed: set[tuple[str, str]] = set()
        spend: list[dict[str, object]] = []
        for item in group:
            item.accepted = item.duplicates = 0
            for row in item.rows:
                key = (row[TENANT], row[EVENT_ID])
                if key not in stored or key in claimed:
                    item.duplicates += 1
                    continue
                claimed.add(key)
                item.accepted += 1
                if row[TYPE] == events_pb2.OP_EVENT_TYPE_COST_TICK:
                    amount = struct_pb2.Struct.FromString(row[PAYLOAD]).fields["amount_usd"].number_value
                    message_id, request = spend_message(row, amount)
                    spend.append(outbox_row(topic=TOPIC_SPEND, tenant_id=row[TENANT],
                                            message_id=message_id, message=request))
        remembered = [item.remember(item.accepted, item.duplicates) for item in group if item.remember]
        if remembered:
            # A concurrent twin of the same request may have stored its answer first: keep that one.
            dialect_insert = pg_insert if self.db.is_postgres else sqlite_insert
            await s.execute(dialect_insert(IDEMPOTENCY).on_conflict_do_nothing(), remembered)
        if not spend:
            return
        if self.db.is_postgres:
            columns = list(spend[0])
            await (await driver_connection(s)).copy_records_to_table(
                OUTBOX.name, columns=columns, records=[tuple(_naive(r[c]) for c in columns) for r in spend])
        else:
            await s.execute(insert(OUTBOX), spend)

    async def _insert_postgres(self, s: AsyncSession, candidates: dict[tuple[str, str], Row]) -> set[tuple[str, str]]:
        """The common case, no event stored before, is a plain COPY into events (in a savepoint).
        When the unique key refuses it (a resent batch), the savepoint is rolled back and the
        rows go through a per-connection temporary table and one INSERT … SELECT … ON CONFLICT DO
        NOTHING RETURNING, which names the rows that went in. The writers' advisory lock keeps
        seq in commit order across replicas."""
        # Through the session first: that opens the transaction the raw statements then join.
        await s.execute(text("select pg_advisory_xact_lock(:k)"), {"k": self._lock_key})
        apg = await driver_connection(s)
        records = [tuple(row) for row in candidates.values()]
        try:
            async with apg.transaction():  # a savepoint inside the session's transaction
                await apg.copy_records_to_table(EVENTS.name, columns=COLUMNS, records=records)
            return set(candidates)
        except asyncpg.UniqueViolationError:
            pass
        cols = ", ".join(COLUMNS)
        await apg.execute(f"create temporary table if not exists events_in on commit delete rows "
                          f"as select {cols} from events with no data")
        await apg.copy_records_to_table("events_in", columns=COLUMNS, records=records)
        inserted = await apg.fetch(f"insert into events ({cols}) select {cols} from events_in "
                                   f"on conflict (tenant_id, event_id) do nothing returning tenant_id, event_id")
        return {(r[0], r[1]) for r in inserted}

    @staticmethod
    async def _insert_sqlite(s: AsyncSession, candidates: dict[tuple[str, str], Row]) -> set[tuple[str, str]]:
        """SQLite has one writer (this transaction holds it): look the keys up, insert the rest."""
        by_tenant: dict[str, list[str]] = {}
        for tenant_id, event_id in candidates:
            by_tenant.setdefault(tenant_id, []).append(event_id)
        existing: set[tuple[str, str]] = set()
        for tenant_id, ids in by_tenant.items():
            for start in range(0, len(ids), 500):
                result = await s.execute(select(EVENTS.c.event_id).where(
                    and_(EVENTS.c.tenant_id == tenant_id, EVENTS.c.event_id.in_(ids[start:start + 500]))))
                existing.update((tenant_id, e) for e in result.scalars())
        new = [_as_dict(row) for key, row in candidates.items() if key not in existing]
        if new:
            await s.execute(insert(EVENTS), new)
        return {key for key in candidates if key not in existing}


def _as_dict(row: Row) -> dict[str, Any]:
    """A row for SQLAlchemy's insert (whose UtcDateTime columns take aware datetimes)."""
    out = dict(zip(COLUMNS, row, strict=True))
    out["occur_time"] = row[OCCUR].replace(tzinfo=UTC)
    out["receive_time"] = row[RECEIVE].replace(tzinfo=UTC)
    return out


def _naive(value: Any) -> Any:
    """COPY bypasses the UtcDateTime column type: UTC without a zone, as it stores."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def now_and_oldest(retention: timedelta) -> tuple[datetime, datetime]:
    """Now and the oldest occur_time kept, in UTC without a zone (as validate takes them)."""
    now = utcnow().replace(tzinfo=None)
    return now, now - retention
