"""The audit trail: change records appended exactly once (idempotent on record id), numbered and
hash-chained per tenant, read back, verified and exported. The chain format is
`arm_common.chain`, shared with offline verifiers."""

from __future__ import annotations

import json
import operator
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from google.protobuf import json_format
from sqlalchemy import Select, Table, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from arm.common.v1 import common_pb2
from arm.governance.v1 import audit_pb2
from arm_common.canonical import canonical_json, sha256_hex
from arm_common.chain import (
    SEQUENCE_GAP,
    Anchor,
    ChainReport,
    ChainVerifier,
    chain_text,
    chain_time,
    raise_on_rejected,
)
from arm_common.db import Database, driver_connection
from arm_common.errors import NotFound
from arm_common.messages import canonical_struct, struct, ts
from arm_common.outbox import OutboxMessage
from arm_common.tables import utcnow
from arm_governance import models

MAX_APPEND = 1000
VALID_TYPES = set(common_pb2.ChangeRecordType.values()) - {0}
VALID_ACTORS = set(common_pb2.ActorType.values()) - {0}
# Column sizes bound the fields a producer may send.
_LIMITS = {"record_id": 128, "actor.id": 128, "target_type": 64, "target_id": 128,
           "project_id": 64, "template_id": 64, "version_id": 64, "instance_id": 64,
           "source": 64, "summary": 2000, "reason": 10_000}
_READ_BATCH = 1000

M = models.ChangeRecord
# PostgreSQL's append (AuditTrail._append_tenant): the head created if new, then locked (the
# tenant's append lock), the records already stored (one = ANY statement), the new ones by COPY,
# the head moved. Unqualified names: the connection's search_path is the service's schema.
_PG_HEAD_INSERT = text("INSERT INTO change_record_heads (tenant_id, last_sequence, last_hash) "
                       "VALUES (:tenant, 0, '') ON CONFLICT (tenant_id) DO NOTHING")
_PG_HEAD_LOCK = "SELECT last_sequence, last_hash FROM change_record_heads WHERE tenant_id = $1 FOR UPDATE"
_PG_HEAD_UPDATE = "UPDATE change_record_heads SET last_sequence = $2, last_hash = $3 WHERE tenant_id = $1"
_PG_STORED = "SELECT record_id, sequence, hash FROM change_records WHERE tenant_id = $1 AND record_id = ANY($2::text[])"
APPENDED = audit_pb2.APPEND_STATUS_APPENDED
DUPLICATE = audit_pb2.APPEND_STATUS_DUPLICATE
REJECTED = audit_pb2.APPEND_STATUS_REJECTED


def rejection(record: common_pb2.ChangeRecord, tenant_id: str) -> tuple[str, str] | None:
    """Why a record cannot be appended (reason code, message), or None when it can."""
    for path, limit in _LIMITS.items():
        value = record.actor.id if path == "actor.id" else getattr(record, path)
        if len(value) > limit or "\x00" in value:
            return "FIELD_TOO_LONG", f"{path} must be at most {limit} characters, without NUL"
    if not record.record_id.strip() or not record.record_id.isprintable():
        return "MISSING_RECORD_ID", "record_id is required and must be printable"
    if record.type not in VALID_TYPES:
        return "INVALID_TYPE", "type must be a defined ChangeRecordType other than UNSPECIFIED"
    if record.actor.type not in VALID_ACTORS or not record.actor.id:
        return "INVALID_ACTOR", "actor.type and actor.id are required"
    if not tenant_id:
        return "MISSING_TENANT", "tenant_id is required"
    return None


def _json(value: Any) -> str | None:
    return None if value is None else canonical_json(value)


def to_proto(row: models.ChangeRecord) -> common_pb2.ChangeRecord:
    """The stored record as the API (and the hash) sees it."""
    return common_pb2.ChangeRecord(
        record_id=row.record_id, tenant_id=row.tenant_id, sequence=row.sequence,
        type=row.type,  # type: ignore[arg-type]
        actor=common_pb2.Actor(type=row.actor_type, id=row.actor_id),  # type: ignore[arg-type]
        target_type=row.target_type, target_id=row.target_id, project_id=row.project_id,
        template_id=row.template_id, version_id=row.version_id, instance_id=row.instance_id,
        summary=row.summary, reason=row.reason, source=row.source,
        payload=struct(None if row.payload is None else json.loads(row.payload)),
        before=struct(None if row.before is None else json.loads(row.before)),
        after=struct(None if row.after is None else json.loads(row.after)),
        occur_time=ts(row.occur_time), record_time=ts(row.record_time),
        prev_hash=row.prev_hash, hash=row.hash)


def _row(record: common_pb2.ChangeRecord, tenant_id: str) -> models.ChangeRecord:
    def _struct(name: str) -> str | None:
        return _json(json_format.MessageToDict(getattr(record, name))) if record.HasField(name) else None

    return models.ChangeRecord(
        tenant_id=tenant_id, record_id=record.record_id, type=record.type,
        actor_type=record.actor.type, actor_id=record.actor.id, target_type=record.target_type,
        target_id=record.target_id, project_id=record.project_id, template_id=record.template_id,
        version_id=record.version_id, instance_id=record.instance_id, summary=record.summary,
        payload=_struct("payload"), before=_struct("before"), after=_struct("after"),
        reason=record.reason, source=record.source,
        occur_time=record.occur_time.ToDatetime(tzinfo=UTC) if record.HasField("occur_time") else None)


_STRUCTS = ("payload", "before", "after")
_TABLE = cast(Table, M.__table__)
_COLUMNS = tuple(c.name for c in _TABLE.columns)
_in_columns = operator.itemgetter(*_COLUMNS)  # a row (dict) as the tuple COPY takes


def _naive_utc(value: Any) -> Any:
    return value.astimezone(UTC).replace(tzinfo=None) if isinstance(value, datetime) else value


def _new_row(record: common_pb2.ChangeRecord, tenant_id: str, sequence: int, now: datetime,
             prev_hash: str) -> dict[str, Any]:
    """The change_records row appending `record` writes, its hash included: what `_row` then
    `record_hash(to_proto(row))` give, with each Struct encoded once (`canonical_struct`), the
    text both stored and embedded in the hashed content (`chain_text`), and the occurrence time
    converted once (tests/governance/test_audit.py compares the two)."""
    structs = {name: canonical_struct(getattr(record, name)) if record.HasField(name) else None
               for name in _STRUCTS}
    occur = record.occur_time.ToDatetime(tzinfo=UTC) if record.HasField("occur_time") else None
    text = chain_text(record, tenant_id=tenant_id, sequence=sequence, prev_hash=prev_hash,
                      occur_time=chain_time(occur), record_time=chain_time(now), structs=structs)
    actor = record.actor
    return {
        "tenant_id": tenant_id, "sequence": sequence, "record_id": record.record_id, "type": record.type,
        "actor_type": actor.type, "actor_id": actor.id, "target_type": record.target_type,
        "target_id": record.target_id, "project_id": record.project_id, "template_id": record.template_id,
        "version_id": record.version_id, "instance_id": record.instance_id, "summary": record.summary,
        **structs, "reason": record.reason, "source": record.source,
        "occur_time": occur, "record_time": now, "prev_hash": prev_hash, "hash": sha256_hex(text)}


@dataclass(frozen=True)
class Filter:
    """ChangeRecordFilter, validated."""

    types: tuple[int, ...] = ()
    target_type: str = ""
    target_id: str = ""
    actor_type: int = 0
    actor_id: str = ""
    start: Any = None
    end: Any = None

    @classmethod
    def of(cls, f: audit_pb2.ChangeRecordFilter) -> Filter:
        return cls(tuple(f.types), f.target_type, f.target_id, f.actor_type, f.actor_id,
                   f.start_time.ToDatetime(tzinfo=UTC) if f.HasField("start_time") else None,
                   f.end_time.ToDatetime(tzinfo=UTC) if f.HasField("end_time") else None)

    def fingerprint(self) -> dict[str, Any]:
        return {"types": ",".join(map(str, self.types)), "target_type": self.target_type,
                "target_id": self.target_id, "actor_type": self.actor_type, "actor_id": self.actor_id,
                "start": self.start.isoformat() if self.start else "",
                "end": self.end.isoformat() if self.end else ""}

    def apply(self, q: Select[Any]) -> Select[Any]:
        if self.types:
            q = q.where(M.type.in_(self.types))
        if self.target_type:
            q = q.where(M.target_type == self.target_type)
        if self.target_id:
            q = q.where(M.target_id == self.target_id)
        if self.actor_type:
            q = q.where(M.actor_type == self.actor_type)
        if self.actor_id:
            q = q.where(M.actor_id == self.actor_id)
        if self.start is not None:
            q = q.where(M.occur_time >= self.start)
        if self.end is not None:
            q = q.where(M.occur_time < self.end)
        return q


class AuditTrail:
    """Appends and reads one database's change records. The reads and `append` own their session;
    `append_in` takes the session of the caller's idempotent write; private `_x(s, ...)` combine."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def append(self, records: Sequence[common_pb2.ChangeRecord], *, caller_tenant: str,
                     any_tenant: bool) -> list[audit_pb2.AppendChangeRecordResult]:
        """Appends a batch in one transaction (see append_in)."""
        async def write(s: AsyncSession) -> list[audit_pb2.AppendChangeRecordResult]:
            return await self.append_in(s, records, caller_tenant=caller_tenant, any_tenant=any_tenant)
        return await self.db.run(write)

    async def append_in(self, s: AsyncSession, records: Sequence[common_pb2.ChangeRecord], *,
                        caller_tenant: str, any_tenant: bool) -> list[audit_pb2.AppendChangeRecordResult]:
        """Appends a batch in the caller's transaction; one result per record, in order. A record
        names its tenant; empty means the caller's. Only `any_tenant` callers (services, the
        system tenant) write other tenants' records. A bad record is rejected alone."""
        results: list[audit_pb2.AppendChangeRecordResult | None] = [None] * len(records)
        by_tenant: dict[str, list[tuple[int, common_pb2.ChangeRecord]]] = {}
        for i, rec in enumerate(records):
            tenant = rec.tenant_id or caller_tenant
            why = rejection(rec, tenant)
            if why is None and tenant != caller_tenant and not any_tenant:
                why = ("TENANT_MISMATCH", "a record may only be appended to the caller's own tenant")
            if why is not None:
                results[i] = audit_pb2.AppendChangeRecordResult(
                    record_id=rec.record_id, status=REJECTED, reason=why[0], message=why[1])
            else:
                by_tenant.setdefault(tenant, []).append((i, rec))
        # Tenants in a fixed order, so two batches never wait on each other's heads crosswise.
        for tenant in sorted(by_tenant):
            for i, result in await self._append_tenant(s, tenant, by_tenant[tenant]):
                results[i] = result
        return [r for r in results if r is not None]

    async def _lock_head(self, s: AsyncSession, tenant: str) -> models.ChainHead:
        insert = postgresql.insert if self.db.is_postgres else sqlite.insert
        await s.execute(insert(models.ChainHead).values(tenant_id=tenant, last_sequence=0, last_hash="")
                        .on_conflict_do_nothing(index_elements=["tenant_id"]))
        # The head row is the tenant's append lock (SQLite already serialises writers).
        return (await s.execute(select(models.ChainHead).where(models.ChainHead.tenant_id == tenant)
                                .with_for_update())).scalar_one()

    async def _append_tenant(self, s: AsyncSession, tenant: str,
                             items: list[tuple[int, common_pb2.ChangeRecord]]
                             ) -> list[tuple[int, audit_pb2.AppendChangeRecordResult]]:
        ids = list({rec.record_id for _, rec in items})
        apg = None
        if self.db.is_postgres:
            # The statements on the transaction's asyncpg connection, each prepared once: the
            # ORM's unit of work and SQL compilation cost ~3.5 ms of CPU per append of one record.
            # The first statement goes through SQLAlchemy: its asyncpg adapter sends BEGIN only
            # then, and the lock below must be held until the transaction ends. The stored ids
            # are looked up with one statement whatever their number (= ANY, not an IN list).
            await s.execute(_PG_HEAD_INSERT, {"tenant": tenant})
            apg = await driver_connection(s)
            assert apg.is_in_transaction()
            head = await apg.fetchrow(_PG_HEAD_LOCK, tenant)
            stored = {r["record_id"]: (r["sequence"], r["hash"]) for r in await apg.fetch(_PG_STORED, tenant, ids)}
            seq, prev = head["last_sequence"], head["last_hash"]
        else:
            head_row = await self._lock_head(s, tenant)
            stored = {r.record_id: (r.sequence, r.hash) for r in (await s.execute(
                select(M.record_id, M.sequence, M.hash).where(M.tenant_id == tenant, M.record_id.in_(ids)))).all()}
            seq, prev = head_row.last_sequence, head_row.last_hash
        now = utcnow()
        rows, out = [], []
        for i, rec in items:
            if rec.record_id in stored:
                sequence, hash_ = stored[rec.record_id]
                out.append((i, audit_pb2.AppendChangeRecordResult(
                    record_id=rec.record_id, status=DUPLICATE, sequence=sequence, hash=hash_)))
                continue
            seq += 1
            row = _new_row(rec, tenant, seq, now, prev)
            rows.append(row)
            prev = row["hash"]
            stored[rec.record_id] = (seq, prev)
            out.append((i, audit_pb2.AppendChangeRecordResult(
                record_id=rec.record_id, status=APPENDED, sequence=seq, hash=prev)))
        if rows and apg is not None:
            # COPY (in the transaction the head lock opened): a multi-row INSERT would be a new
            # statement for every batch size. It bypasses UtcDateTime: times go as naive UTC.
            for row in rows:
                row["occur_time"], row["record_time"] = _naive_utc(row["occur_time"]), _naive_utc(row["record_time"])
            await apg.copy_records_to_table("change_records", columns=_COLUMNS, records=map(_in_columns, rows))
            await apg.execute(_PG_HEAD_UPDATE, tenant, seq, prev)
        elif rows:
            await s.execute(insert(_TABLE), rows)  # Core: no ORM bulk-insert bookkeeping per row
            await s.execute(update(models.ChainHead).where(models.ChainHead.tenant_id == tenant)
                            .values(last_sequence=seq, last_hash=prev))
        return out

    async def get(self, tenant: str, record_id: str) -> common_pb2.ChangeRecord:
        async def read(s: AsyncSession) -> common_pb2.ChangeRecord:
            row = (await s.execute(select(M).where(M.tenant_id == tenant, M.record_id == record_id))
                   ).scalar_one_or_none()
            if row is None:
                raise NotFound.of("change_record", record_id)
            return to_proto(row)
        return await self.db.read(read)

    async def page(self, tenant: str, flt: Filter, *, after: int | None, size: int,
                   newest_first: bool, upto: int | None = None) -> list[common_pb2.ChangeRecord]:
        """Up to `size` records after sequence `after` (keyset), in the order asked for, none
        beyond sequence `upto` when given."""
        async def read(s: AsyncSession) -> list[common_pb2.ChangeRecord]:
            q = flt.apply(select(M).where(M.tenant_id == tenant))
            if upto is not None:
                q = q.where(M.sequence <= upto)
            if after is not None:
                q = q.where(M.sequence < after if newest_first else M.sequence > after)
            q = q.order_by(M.sequence.desc() if newest_first else M.sequence).limit(size)
            return [to_proto(r) for r in (await s.execute(q)).scalars()]
        return await self.db.read(read)

    async def head(self, tenant: str) -> int:
        """The tenant's last sequence number (0 before its first record)."""
        async def read(s: AsyncSession) -> int:
            value = (await s.execute(select(models.ChainHead.last_sequence)
                                     .where(models.ChainHead.tenant_id == tenant))).scalar_one_or_none()
            return int(value or 0)
        return await self.db.read(read)

    async def scan(self, tenant: str, flt: Filter = Filter(), *,
                   upto: int | None = None) -> AsyncIterator[list[common_pb2.ChangeRecord]]:
        """The tenant's matching records in sequence order, in batches (bounded memory), up to
        the head as it was when the scan began: records appended meanwhile are left out, so a
        scan is a consistent prefix of the trail."""
        if upto is None:
            upto = await self.head(tenant)
        after = 0
        while True:
            batch = await self.page(tenant, flt, after=after, size=_READ_BATCH, newest_first=False, upto=upto)
            if not batch:
                return
            yield batch
            after = batch[-1].sequence

    async def verify(self, tenant: str, anchors: Iterable[Anchor] = ()) -> ChainReport:
        """Walks the trail up to the head as it was when the walk began (a head row and its
        records commit together, so every record up to it is there unless removed), comparing
        it with the anchors (verified checkpoints) given."""
        verifier = ChainVerifier(anchors)
        # Read before the head: records appended meanwhile move the head past it, so a stored
        # record beyond the head means the head row was rewound to hide the records after it.
        stored = await self.last_stored(tenant)
        upto = await self.head(tenant)
        async for batch in self.scan(tenant, upto=upto):
            for record in batch:
                verifier.add(record)
        report = verifier.finish(upto)
        if stored > upto:
            verifier.mark_broken(upto + 1, SEQUENCE_GAP, f"records up to sequence {stored} lie beyond the "
                                 f"head row's sequence {upto}: the head was rewound")
        return report

    async def last_stored(self, tenant: str) -> int:
        """The highest sequence number stored for the tenant (0 when none)."""
        async def read(s: AsyncSession) -> int:
            value = (await s.execute(select(func.max(M.sequence)).where(M.tenant_id == tenant))).scalar()
            return int(value or 0)
        return await self.db.read(read)

    async def deliver(self, messages: Sequence[OutboxMessage]) -> None:
        """Receiver of governance's own change-record outbox: appends locally, exactly once."""
        records = [common_pb2.ChangeRecord.FromString(m.payload) for m in messages]
        results = await self.append(records, caller_tenant="", any_tenant=True)
        raise_on_rejected(results)


def export_line(record: common_pb2.ChangeRecord) -> str:
    """One record as a proto3 JSON line (what ExportChangeRecords streams)."""
    return json.dumps(json_format.MessageToDict(record), ensure_ascii=False, separators=(",", ":")) + "\n"
