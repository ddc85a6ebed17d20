"""Reading the decision log: GetDecision, ListDecisions (newest first, keyset pages) and
ExportDecisions (oldest first, JSON lines). Every read is scoped to the caller's tenant."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from arm.governance.v1 import decision_pb2, policy_pb2
from arm_common import pagination
from arm_common import validation as val
from arm_common.db import Database
from arm_common.errors import NotFound, Violations
from arm_common.messages import ts
from arm_governance import models
from arm_governance.decisions.responses import parts, response_bytes

_READ_BATCH = 500
_VALID_DECISIONS = set(policy_pb2.Decision.values()) - {0}


@dataclass(frozen=True)
class DecisionFilter:
    instance_id: str = ""
    tool_name: str = ""
    decision: int = 0
    run_id: str = ""
    start: datetime | None = None
    end: datetime | None = None

    @classmethod
    def of(cls, v: Violations, f: decision_pb2.DecisionFilter, path: str) -> DecisionFilter:
        """Validates `f` (violations go to `v`) and returns it as a DecisionFilter."""
        val.resource_id(v, f"{path}.instance_id", f.instance_id, required_=False)
        val.optional(v, f"{path}.tool_name", f.tool_name, 200)
        val.optional(v, f"{path}.run_id", f.run_id, 128)
        if f.decision:
            val.enum_set(v, f"{path}.decision", f.decision, _VALID_DECISIONS)
        start = f.start_time.ToDatetime(tzinfo=UTC) if f.HasField("start_time") else None
        end = f.end_time.ToDatetime(tzinfo=UTC) if f.HasField("end_time") else None
        if start is not None and end is not None and end <= start:
            v.add(f"{path}.end_time", "must be after start_time")
        return cls(f.instance_id, f.tool_name, f.decision, f.run_id, start, end)

    def fingerprint(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "tool_name": self.tool_name, "decision": self.decision,
                "run_id": self.run_id, "start": self.start.isoformat() if self.start else "",
                "end": self.end.isoformat() if self.end else ""}

    def apply(self, query: Select[Any]) -> Select[Any]:
        m = models.DecisionRecord
        if self.instance_id:
            query = query.where(m.instance_id == self.instance_id)
        if self.tool_name:
            query = query.where(m.tool_name == self.tool_name)
        if self.decision:
            query = query.where(m.decision == self.decision)
        if self.run_id:
            query = query.where(m.run_id == self.run_id)
        if self.start is not None:
            query = query.where(m.decided_at >= self.start)
        if self.end is not None:
            query = query.where(m.decided_at < self.end)
        return query


def logged(row: models.DecisionRecord, parts: dict[str, bytes]) -> decision_pb2.LoggedDecision:
    """`parts`: the response parts the row may name (responses.parts)."""
    return decision_pb2.LoggedDecision(
        decision_id=row.id, tenant_id=row.tenant_id, instance_id=row.instance_id,
        legacy_agent_id=row.legacy_agent_id, project_id=row.project_id, version_id=row.version_id,
        run_id=row.run_id, tool_call_id=row.tool_call_id, tool_name=row.tool_name,
        request=decision_pb2.CheckRequest.FromString(row.request),
        response=decision_pb2.CheckResponse.FromString(response_bytes(row, parts)), decide_time=ts(row.decided_at))


def export_line(decision: decision_pb2.LoggedDecision) -> str:
    """One decision as a proto3 JSON line (what ExportDecisions streams)."""
    return json.dumps(json_format.MessageToDict(decision), ensure_ascii=False, separators=(",", ":")) + "\n"


class DecisionReader:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, tenant_id: str, decision_id: str) -> decision_pb2.LoggedDecision:
        async def read(s: AsyncSession) -> decision_pb2.LoggedDecision | None:
            m = models.DecisionRecord
            row = (await s.execute(select(m).where(m.tenant_id == tenant_id, m.id == decision_id))).scalar_one_or_none()
            if row is None:
                return None
            return logged(row, await parts(s, [row.response_part]))

        found = await self.db.read(read)
        if found is None:  # another tenant's decision is as absent as one that never was
            raise NotFound(f"no decision {decision_id!r}", reason="DECISION_NOT_FOUND",
                           metadata={"decision_id": decision_id})
        return found

    async def page(self, tenant_id: str, flt: DecisionFilter, size: int,
                   page_token: str) -> decision_pb2.ListDecisionsResponse:
        fingerprint = flt.fingerprint()
        after = pagination.decode_time_id_token(page_token, fingerprint)
        m = models.DecisionRecord

        async def read(s: AsyncSession) -> decision_pb2.ListDecisionsResponse:
            query = flt.apply(select(m).where(m.tenant_id == tenant_id))
            query = pagination.newest_first_page(query, m.decided_at, m.id, after, size)
            rows = list((await s.execute(query)).scalars())
            page, more = pagination.split_page(rows, size)
            stored = await parts(s, [r.response_part for r in page])
            return decision_pb2.ListDecisionsResponse(
                decisions=[logged(r, stored) for r in page],
                next_page_token=pagination.time_id_token(page, more, fingerprint, time_attr="decided_at"))

        return await self.db.read(read)

    async def scan(self, tenant_id: str, flt: DecisionFilter) -> AsyncIterator[list[decision_pb2.LoggedDecision]]:
        """The tenant's matching decisions oldest first, in batches (bounded memory)."""
        m = models.DecisionRecord
        after: tuple[datetime, str] | None = None
        while True:
            def read(s: AsyncSession, after: tuple[datetime, str] | None = after) -> Any:
                query = flt.apply(select(m).where(m.tenant_id == tenant_id))
                if after is not None:
                    query = query.where((m.decided_at > after[0]) |
                                        ((m.decided_at == after[0]) & (m.id > after[1])))
                return s.execute(query.order_by(m.decided_at, m.id).limit(_READ_BATCH))

            async def run(s: AsyncSession, read: Any = read) -> tuple[list[decision_pb2.LoggedDecision], Any]:
                rows = list((await read(s)).scalars())
                stored = await parts(s, [r.response_part for r in rows])
                return [logged(r, stored) for r in rows], ((rows[-1].decided_at, rows[-1].id) if rows else None)

            batch, last = await self.db.read(run)
            if not batch:
                return
            yield batch
            if len(batch) < _READ_BATCH:
                return
            after = last
