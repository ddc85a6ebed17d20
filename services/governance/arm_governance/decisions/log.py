"""The decision log with group commit: every decision is committed before its answer is sent,
and the decisions of many concurrent Checks share one transaction. The same transaction writes
the approval a NEEDS_APPROVAL creates (one per instance and tool call id), the POLICY_DENIED
change record of a DENY through the outbox, and per tenant one outbox row naming the batch's
decisions, from which the relay derives their opEvents (decisions/op_events.py).
No decision is answered that is not logged: with the database unavailable, Check fails closed
(UNAVAILABLE with RetryInfo, never ALLOW), whatever its caches could have decided."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from google.protobuf.message import Message
from opentelemetry import context as otel_context
from opentelemetry import trace
from sqlalchemy import DateTime, String, Table, select, update
from sqlalchemy import insert as sa_insert
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from arm.governance.v1 import approvals_pb2, decision_pb2
from arm_common import otel
from arm_common.db import Database, driver_connection, is_connection_error, rowcount
from arm_common.errors import DatabaseUnavailable, Unavailable
from arm_common.outbox import TOPIC_OP_EVENT, OutboxRelay, enqueue_many, outbox_row
from arm_common.tables import utcnow
from arm_common.tasks import cancel_and_wait
from arm_governance import models
from arm_governance.models import OUTBOX
from arm_governance.webhooks.service import TOPIC_NOTIFICATION

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("arm.governance")


def _naive_utc(value: Any) -> Any:
    """COPY bypasses the UtcDateTime column type: store UTC without a zone as it does."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


# The message id prefix of an op_event outbox row that names decisions (its payload: their ids,
# one a line) instead of holding one opEvent; decisions/op_events.py expands it.
OP_EVENTS_MARKER = "opd-"


def marker_id(first_decision_id: str) -> str:
    """A marker's message id (unique: it names its batch's first decision), within the outbox's
    64 characters (a runtime's decision ids may be longer than Check's)."""
    mid = OP_EVENTS_MARKER + first_decision_id
    if len(mid) > 64:
        mid = OP_EVENTS_MARKER + hashlib.sha256(first_decision_id.encode()).hexdigest()[:40]
    return mid


_OUTBOX_COLUMNS = ("message_id", "topic", "tenant_id", "payload", "created_at", "attempts", "next_attempt_at")
_APPROVALS = cast(Table, models.Approval.__table__)
_DECISIONS = cast(Table, models.DecisionRecord.__table__)
_APPROVAL_COLUMNS = frozenset(c.name for c in _APPROVALS.columns)
# A Check's response is logged whole: `response_part` (local decisions, responses.py) stays NULL.
_DECISION_COLUMNS = frozenset(c.name for c in _DECISIONS.columns) - {"response_part"}


def _pg_insert(*, approvals: bool) -> tuple[str, list[tuple[list[str], list[bool]]]]:
    """The statement of _insert_pg, and per table its columns and which of them are timestamps:
    [approvals,] decisions, outbox rows, each an INSERT ... SELECT FROM unnest() of one array
    per column, chained as data-modifying CTEs."""
    dialect = postgresql.dialect()
    tables: list[tuple[Any, Any]] = [(_DECISIONS, _DECISION_COLUMNS), (OUTBOX, _OUTBOX_COLUMNS)]
    if approvals:
        tables.insert(0, (_APPROVALS, None))
    shape, inserts, n = [], [], 0
    for table, names in tables:
        columns = [c for c in table.columns if names is None or c.name in names]
        casts = []
        for c in columns:
            n += 1
            # text, not varchar(n): an explicit cast to varchar(n) truncates silently, while the
            # INSERT's own assignment to the column rejects an overlong value as COPY did.
            kind = "TEXT" if isinstance(c.type, String) else c.type.compile(dialect=dialect)
            casts.append(f"${n}::{kind}[]")
        inserts.append(f"INSERT INTO {table.name} ({', '.join(c.name for c in columns)}) "
                       f"SELECT * FROM unnest({', '.join(casts)})")
        shape.append(([c.name for c in columns],
                      [isinstance(getattr(c.type, "impl", c.type), DateTime) for c in columns]))
    ctes = ", ".join(f"{table.name}_rows AS ({sql})" for (table, _), sql in zip(tables[:-1], inserts, strict=False))
    return f"WITH {ctes} {inserts[-1]}", shape


_PG_INSERT = {approvals: _pg_insert(approvals=approvals) for approvals in (False, True)}


def _nothing_to_look_up(item: PendingDecision) -> bool:
    """No request id (a retry would be answered from the log) and no approval that needs a
    lookup (a tool call id may have one already) or ORM defaults (an incomplete row)."""
    approval = item.approval
    return not item.record["request_id"] and not item.consume and (
        approval is None or (not approval["tool_call_id"] and _APPROVAL_COLUMNS <= approval.keys()))


# How many decisions a busy writer waits for (DecisionLog._gather), at most `gather_s`
# (ARM_DECISION_GATHER_MS; default 1 ms; 0: it never waits).
GATHER_BATCH = 16


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass
class PendingDecision:
    """One decision waiting for its commit."""

    record: dict[str, Any]  # DecisionRecord columns (response is filled from `response`)
    response: decision_pb2.CheckResponse
    approval: dict[str, Any] | None = None  # Approval columns, for NEEDS_APPROVAL
    messages: list[tuple[str, str, Message]] = field(default_factory=list)  # (topic, id, message)
    approval_record: str = ""  # id of the APPROVAL_REQUESTED message, dropped when deduplicated
    consume: str = ""
    """An approval this decision uses up (an ALLOW from a grant): marked used in the transaction
    that logs the decision, so a crash cannot use a grant up without logging its decision."""
    if_used: PendingDecision | None = None
    """What to log instead when another call used `consume` first (the decision with the grant USED)."""
    future: asyncio.Future[decision_pb2.CheckResponse] | None = None
    trace_context: otel_context.Context | None = None  # the Check's, with OpenTelemetry on


async def _consume(s: AsyncSession, tenant_id: str, approval_id: str) -> bool:
    """Marks an APPROVED, unused approval used; False when it is not (any more)."""
    a = models.Approval
    result = await s.execute(update(a).where(
        a.id == approval_id, a.tenant_id == tenant_id, a.consumed_at.is_(None),
        a.status == approvals_pb2.APPROVAL_STATUS_APPROVED,
    ).values(consumed_at=utcnow(), revision=a.revision + 1))
    return bool(rowcount(result))


class DecisionLog:
    def __init__(self, db: Database, relays: list[OutboxRelay], *, max_batch: int = 500,
                 gather_s: float = 0.0) -> None:
        self.db = db
        self.relays = relays
        self.max_batch = max_batch
        self.gather_s = gather_s
        self._queue: asyncio.Queue[PendingDecision] = asyncio.Queue()
        # Gathering (see _gather): while the writer waits for more decisions, how many it waits
        # for and the future that append() resolves on reaching it.
        self._want = 0
        self._gathered: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        # PostgreSQL: the writer's pooled connection, kept between batches (a checkout and
        # return per batch cost ~55 µs of CPU); dropped on any error.
        self._conn: AsyncConnection | None = None
        self._apg: Any = None  # its asyncpg connection (looked up through a greenlet: once)
        self.traced = otel.enabled()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._writer(), name="decision-log")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        await self._release()

    async def _release(self, *, invalidate: bool = False) -> None:
        conn, self._conn, self._apg = self._conn, None, None
        if conn is not None:
            try:
                if invalidate:
                    await conn.invalidate()
                await conn.close()
            except Exception:  # noqa: BLE001 - a dead connection: nothing to give back
                log.debug("closing the decision log's connection failed", exc_info=True)

    async def append(self, pending: PendingDecision) -> decision_pb2.CheckResponse:
        """Returns once the decision is committed: the response to send (for a retried
        request_id, the first decision's response; for a repeated tool call id, the response
        names the existing approval)."""
        pending.future = asyncio.get_running_loop().create_future()
        if self.traced:
            pending.trace_context = otel_context.get_current()
        self._queue.put_nowait(pending)
        gathered = self._gathered
        if gathered is not None and self._queue.qsize() >= self._want and not gathered.done():
            gathered.set_result(None)
        return await pending.future

    async def _writer(self) -> None:
        while True:
            busy = not self._queue.empty()  # decisions queued while the last batch was written
            batch = [await self._queue.get()]
            if busy:
                await self._gather(batch)
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                topics = await self._commit_traced(batch)
            except DatabaseUnavailable as exc:
                # Nothing was logged, so nothing may be answered but UNAVAILABLE (fail closed);
                # said once by the database's outage log, and no use trying one by one.
                topics = set()
                for item in batch:
                    if item.future and not item.future.done():
                        item.future.set_exception(DatabaseUnavailable(
                            "the decision could not be logged (the database is unavailable); retry",
                            retry_delay_s=exc.retry_delay_s or 1.0))
            except Exception:  # noqa: BLE001 - isolate the item that breaks the batch
                log.exception("decision batch of %d failed; writing one by one", len(batch))
                topics = set()
                for item in batch:
                    try:
                        topics |= await self._commit([item])
                    except Exception as exc:  # noqa: BLE001
                        log.exception("decision %s could not be logged", item.record["id"])
                        if item.future and not item.future.done():
                            item.future.set_exception(Unavailable(
                                "the decision could not be logged; retry", reason="DECISION_LOG_UNAVAILABLE"))
                        del exc
                        continue
                    self._resolve([item])
            else:
                self._resolve(batch)
            # Only the relays with something new: a pass of an idle one is a transaction for nothing.
            for relay in self.relays:
                if relay.topic in topics:
                    relay.notify()

    async def _gather(self, batch: list[PendingDecision]) -> None:
        """Called when decisions queued up while the last batch was being written (the process is
        busy): waits, at most `gather_s`, until GATHER_BATCH decisions are queued, so that a
        batch's fixed cost (about 200 µs of this process's CPU for the statement, its round trip
        and the commit, against ~15 µs per decision in it; bench/decision_log.py) is shared by
        more of them. Without it, a process deciding as fast as it can writes batches of two or
        three at 64 calls in flight: a commit takes about as long as deciding a call or two, so
        that is all that queues behind it. A writer that found nothing waiting (a lone caller,
        light load) writes at once.

        It waits only while the process has something else to run: each loop iteration a probe
        looks at what is runnable, and two iterations in a row with nothing (the second one
        polled I/O: no call arrived either) end the wait, since then no decision is being made
        that could join. So a few busy callers, all waiting on the log, are written at once (a
        fixed wait lost about a third of the calls/s at 4 in flight), while at 64 in flight,
        where calls keep arriving and being decided, batches grow (bench/check_grpc.py with
        --compare-gather, six runs: at 64 in flight a median 1.09x the calls/s of not gathering,
        with less CPU per call in five; at 4 in flight a median 1.08x; bench/README.md). On an
        event loop without asyncio's runnable queue to look at, it waits the fixed window.
        """
        want = min(GATHER_BATCH, self.max_batch) - len(batch)
        if self.gather_s <= 0 or self._queue.qsize() >= want:
            return
        loop = asyncio.get_running_loop()
        gathered = loop.create_future()
        self._want, self._gathered = want, gathered
        ready = getattr(loop, "_ready", None)  # asyncio's runnable callbacks (CPython's loop)
        deadline = loop.time() + self.gather_s
        quiet = 0

        def probe() -> None:
            # Runs once a loop iteration, after what was runnable: the wait ends when two
            # iterations in a row found nothing else to run (no I/O either: the second polled
            # for it), since then no decision is being made that could join this batch.
            nonlocal quiet
            if gathered.done():
                return
            quiet = quiet + 1 if not ready else 0
            if quiet >= 2 or loop.time() >= deadline:
                gathered.set_result(None)
            else:
                loop.call_soon(probe)
        timer = None
        if ready is None:
            timer = loop.call_later(self.gather_s, _settle, gathered)
        else:
            loop.call_soon(probe)
        try:
            await gathered
        finally:
            if timer is not None:
                timer.cancel()
            self._gathered = None

    async def _commit_traced(self, batch: list[PendingDecision]) -> set[str]:
        """_commit, in a `governance.decision_log.commit` span when tracing: a child of the first
        decision's span (so of its Check), linked to the other decisions of the batch."""
        if not self.traced:
            return await self._commit(batch)
        links = [trace.Link(trace.get_current_span(item.trace_context).get_span_context())
                 for item in batch[1:] if item.trace_context is not None]
        with _tracer.start_as_current_span("governance.decision_log.commit", context=batch[0].trace_context,
                                           links=links, attributes={"arm.decisions": len(batch)}):
            return await self._commit(batch)

    async def _commit(self, batch: list[PendingDecision]) -> set[str]:
        """Writes a batch; returns the outbox topics it wrote to."""
        if self.db.is_postgres and all(map(_nothing_to_look_up, batch)):
            # The common case on PostgreSQL: the one statement on a pooled connection, without
            # an ORM session around it (~0.13 ms of CPU per batch).
            try:
                return await self._commit_pg(batch)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                # A pooled connection found dead (a database restart, a killed backend): the
                # other idle ones likely are too. Drop them and write through the general path
                # on a fresh connection; if the database is down, that answers UNAVAILABLE.
                await self.db.engine.dispose()
        return await self.db.run(lambda s: self._write(s, batch))

    async def _commit_pg(self, batch: list[PendingDecision]) -> set[str]:
        try:
            if self._conn is None:
                self._conn = await self.db.engine.connect()
                self._apg = await driver_connection(self._conn)
            apg = self._apg
            decisions, messages = self._rows(batch)
            approvals = [item.approval for item in batch if item.approval is not None]
            await self._execute_pg(apg, approvals, decisions, messages)
        except BaseException:
            # Whatever went wrong (rare: the batch is then written the general way), the next
            # batch starts on a fresh connection, and this one, maybe dead under SQLAlchemy's
            # feet, is not returned to the pool.
            await self._release(invalidate=True)
            raise
        return {row["topic"] for row in messages}

    @staticmethod
    def _rows(fresh: list[PendingDecision]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The decision rows (with their responses) and outbox rows of the items to log."""
        decisions: list[dict[str, Any]] = []
        messages: list[dict[str, Any]] = []
        by_tenant: dict[str, list[str]] = {}
        for item in fresh:
            record = item.record
            record["response"] = item.response.SerializeToString()
            decisions.append(record)
            by_tenant.setdefault(record["tenant_id"], []).append(record["id"])
            if item.messages:
                messages.extend(outbox_row(topic=topic, tenant_id=record["tenant_id"], message_id=mid,
                                           message=message) for topic, mid, message in item.messages)
        if by_tenant:
            # Their opEvents: one row per tenant naming the decisions (decisions/op_events.py).
            now = utcnow()
            messages.extend({"message_id": marker_id(ids[0]), "topic": TOPIC_OP_EVENT,
                             "tenant_id": tenant_id, "payload": "\n".join(ids).encode(), "created_at": now,
                             "attempts": 0, "next_attempt_at": now} for tenant_id, ids in by_tenant.items())
        return decisions, messages

    @staticmethod
    def _resolve(batch: list[PendingDecision]) -> None:
        for item in batch:
            if item.future and not item.future.done():
                item.future.set_result(item.response)

    async def _write(self, s: AsyncSession, batch: list[PendingDecision]) -> set[str]:
        """One transaction, a handful of statements whatever the batch size; returns the outbox
        topics it wrote to."""
        earlier = await self._earlier_responses(s, batch)
        by_request: dict[tuple[str, str], PendingDecision] = {}
        fresh: list[PendingDecision] = []
        for item in batch:
            rid = item.record["request_id"]
            key = (item.record["tenant_id"], rid)
            if rid and key in earlier:  # a retry: answer with the logged decision
                item.response = decision_pb2.CheckResponse.FromString(earlier[key])
            elif rid and key in by_request:  # a twin in this very batch
                item.response = by_request[key].response
            else:
                if rid:
                    by_request[key] = item
                fresh.append(item)
        for item in fresh:
            if item.consume and not await _consume(s, item.record["tenant_id"], item.consume):
                used = item.if_used  # another call (here or on another replica) used the grant first
                assert used is not None, "a decision consuming a grant comes with its alternative"
                item.record, item.response, item.approval = used.record, used.response, used.approval
                item.messages, item.approval_record, item.consume = used.messages, used.approval_record, ""
        approvals = await self._approvals(s, [item for item in fresh if item.approval is not None],
                                          insert=not self.db.is_postgres)
        decisions, messages = self._rows(fresh)
        if self.db.is_postgres:
            await self._insert_pg(s, approvals, decisions, messages)
        else:
            if decisions:
                await s.execute(sa_insert(_DECISIONS), decisions)
            await enqueue_many(s, OUTBOX, messages)
        return {row["topic"] for row in messages}

    @staticmethod
    async def _insert_pg(s: AsyncSession, approvals: list[dict[str, Any]], decisions: list[dict[str, Any]],
                         messages: list[dict[str, Any]]) -> None:
        """PostgreSQL: new approvals, decisions and outbox rows in ONE statement (data-modifying
        CTEs over unnest() of one array per column), sent on the transaction's own asyncpg
        connection and prepared once. One statement is atomic by itself, so when nothing earlier
        in the batch opened a transaction it commits on its own in one round trip; otherwise it
        joins that transaction. (BEGIN, the approvals INSERT, two COPYs and COMMIT were up to
        seven round trips; and without an earlier statement each COPY committed on its own, so
        a crash between them could keep a decision without its opEvent.)"""
        if approvals and not all(_APPROVAL_COLUMNS <= row.keys() for row in approvals):
            # A row leaving a column to its ORM default: let SQLAlchemy insert it.
            await s.execute(sa_insert(_APPROVALS), approvals)
            approvals = []
        await DecisionLog._execute_pg(await driver_connection(s), approvals, decisions, messages)

    @staticmethod
    async def _execute_pg(apg: Any, approvals: list[dict[str, Any]], decisions: list[dict[str, Any]],
                          messages: list[dict[str, Any]]) -> None:
        if not approvals and not decisions and not messages:
            return
        sql, shape = _PG_INSERT[bool(approvals)]
        tables = (approvals, decisions, messages) if approvals else (decisions, messages)
        args: list[list[Any]] = []
        for (columns, stamps), rows in zip(shape, tables, strict=True):
            for column, stamp in zip(columns, stamps, strict=True):
                args.append([_naive_utc(row[column]) for row in rows] if stamp else [row[column] for row in rows])
        await apg.execute(sql, *args)

    @staticmethod
    async def _earlier_responses(s: AsyncSession, batch: list[PendingDecision]) -> dict[tuple[str, str], bytes]:
        ids = [p.record["request_id"] for p in batch if p.record["request_id"]]
        if not ids:
            return {}
        d = models.DecisionRecord
        rows = (await s.execute(select(d.tenant_id, d.request_id, d.response).where(d.request_id.in_(ids)))).all()
        return {(r.tenant_id, r.request_id): r.response for r in rows}

    @staticmethod
    async def _approvals(s: AsyncSession, items: list[PendingDecision], *, insert: bool = True) -> list[dict[str, Any]]:
        """Creates the approvals of NEEDS_APPROVAL decisions; a tool call id that already has
        one (logged earlier, or earlier in this batch) gets that one instead. Returns the new
        rows; with insert=False the caller inserts them (PostgreSQL: with the decisions)."""
        if not items:
            return []
        a = models.Approval
        call_ids = [i.approval["tool_call_id"] for i in items if i.approval and i.approval["tool_call_id"]]
        existing: dict[tuple[str, str, str], str] = {}
        if call_ids:
            rows = (await s.execute(select(a.id, a.tenant_id, a.instance_id, a.tool_call_id)
                                    .where(a.tool_call_id.in_(call_ids)))).all()
            existing = {(r.tenant_id, r.instance_id, r.tool_call_id): r.id for r in rows}
        new_rows = []
        for item in items:
            approval = item.approval
            assert approval is not None
            key = (approval["tenant_id"], approval["instance_id"], approval["tool_call_id"])
            if approval["tool_call_id"] and key in existing:
                item.response.approval_id = existing[key]
                item.record["approval_id"] = existing[key]
                # The existing approval was announced when it was made: no second
                # APPROVAL_REQUESTED record, and no second notification.
                item.messages = [m for m in item.messages
                                 if m[1] != item.approval_record and m[0] != TOPIC_NOTIFICATION]
                continue
            if approval["tool_call_id"]:
                existing[key] = approval["id"]
            new_rows.append(approval)
        if new_rows and insert:
            await s.execute(sa_insert(_APPROVALS), new_rows)
        return new_rows
