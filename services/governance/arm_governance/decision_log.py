"""The decision log with group commit: every decision is committed before its answer is sent,
and the decisions of many concurrent Checks share one transaction. The same transaction writes
the approval a NEEDS_APPROVAL creates (one per instance and tool call id), the POLICY_DENIED
change record of a DENY, and each decision's opEvent, the latter two through the outbox."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import Message
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from arm.governance.v1 import decision_pb2
from arm_common.db import Database
from arm_common.errors import Unavailable
from arm_common.outbox import OutboxRelay, enqueue_many, outbox_row
from arm_common.tasks import cancel_and_wait
from arm_governance import models
from arm_governance.models import OUTBOX

log = logging.getLogger(__name__)


def _naive_utc(value: Any) -> Any:
    """COPY bypasses the UtcDateTime column type: store UTC without a zone as it does."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


@dataclass
class PendingDecision:
    """One decision waiting for its commit."""

    record: dict[str, Any]  # DecisionRecord columns (response is filled from `response`)
    response: decision_pb2.CheckResponse
    approval: dict[str, Any] | None = None  # Approval columns, for NEEDS_APPROVAL
    messages: list[tuple[str, str, Message]] = field(default_factory=list)  # (topic, id, message)
    approval_record: str = ""  # id of the APPROVAL_REQUESTED message, dropped when deduplicated
    future: asyncio.Future[decision_pb2.CheckResponse] | None = None


class DecisionLog:
    def __init__(self, db: Database, relays: list[OutboxRelay], *, max_batch: int = 500) -> None:
        self.db = db
        self.relays = relays
        self.max_batch = max_batch
        self._queue: asyncio.Queue[PendingDecision] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._writer(), name="decision-log")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def append(self, pending: PendingDecision) -> decision_pb2.CheckResponse:
        """Returns once the decision is committed: the response to send (for a retried
        request_id, the first decision's response; for a repeated tool call id, the response
        names the existing approval)."""
        pending.future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(pending)
        return await pending.future

    async def _writer(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self.db.run(lambda s, batch=batch: self._write(s, batch))
            except Exception:  # noqa: BLE001 - isolate the item that breaks the batch
                log.exception("decision batch of %d failed; writing one by one", len(batch))
                for item in batch:
                    try:
                        await self.db.run(lambda s, item=item: self._write(s, [item]))
                    except Exception as exc:  # noqa: BLE001
                        log.exception("decision %s could not be logged", item.record["id"])
                        if item.future and not item.future.done():
                            item.future.set_exception(Unavailable(
                                "the decision could not be logged; retry", reason="DECISION_LOG_UNAVAILABLE"))
                        del exc
                        continue
                    self._resolve([item])
                continue
            self._resolve(batch)
            for relay in self.relays:
                relay.notify()

    @staticmethod
    def _resolve(batch: list[PendingDecision]) -> None:
        for item in batch:
            if item.future and not item.future.done():
                item.future.set_result(item.response)

    async def _write(self, s: AsyncSession, batch: list[PendingDecision]) -> None:
        """One transaction, a handful of statements whatever the batch size."""
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
        await self._approvals(s, [item for item in fresh if item.approval is not None])
        decisions, messages = [], []
        for item in fresh:
            item.record["response"] = item.response.SerializeToString()
            decisions.append(item.record)
            messages.extend(outbox_row(topic=topic, tenant_id=item.record["tenant_id"], message_id=mid,
                                       message=message) for topic, mid, message in item.messages)
        if self.db.is_postgres:
            await self._copy(s, decisions, messages)
            return
        if decisions:
            await s.execute(insert(models.DecisionRecord.__table__), decisions)
        await enqueue_many(s, OUTBOX, messages)

    @staticmethod
    async def _copy(s: AsyncSession, decisions: list[dict[str, Any]], messages: list[dict[str, Any]]) -> None:
        """PostgreSQL: the rows go in with COPY on the transaction's own connection, skipping the
        ORM's per-row work (the decision log is the hot path's one database write)."""
        raw = await (await s.connection()).get_raw_connection()
        apg = raw.driver_connection
        for table, rows in ((models.DecisionRecord.__table__, decisions), (OUTBOX, messages)):
            if not rows:
                continue
            columns = [c.name for c in table.columns if c.name in rows[0]]
            records = [tuple(_naive_utc(row[c]) for c in columns) for row in rows]
            await apg.copy_records_to_table(table.name, records=records, columns=columns)

    @staticmethod
    async def _earlier_responses(s: AsyncSession, batch: list[PendingDecision]) -> dict[tuple[str, str], bytes]:
        ids = [p.record["request_id"] for p in batch if p.record["request_id"]]
        if not ids:
            return {}
        d = models.DecisionRecord
        rows = (await s.execute(select(d.tenant_id, d.request_id, d.response).where(d.request_id.in_(ids)))).all()
        return {(r.tenant_id, r.request_id): r.response for r in rows}

    @staticmethod
    async def _approvals(s: AsyncSession, items: list[PendingDecision]) -> None:
        """Creates the approvals of NEEDS_APPROVAL decisions; a tool call id that already has
        one (logged earlier, or earlier in this batch) gets that one instead."""
        if not items:
            return
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
                item.messages = [m for m in item.messages if m[1] != item.approval_record]
                continue
            if approval["tool_call_id"]:
                existing[key] = approval["id"]
            new_rows.append(approval)
        if new_rows:
            await s.execute(insert(a.__table__), new_rows)
