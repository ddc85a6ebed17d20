"""TelemetryService over gRPC: validate, check permissions, call the writer / reader / backfill,
convert. Reads need telemetry:read (tenant-wide, or for the project the filter names); ingest
needs telemetry:write (agent keys have it); everything is scoped to the caller's tenant."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from arm.telemetry.v1 import events_pb2, telemetry_pb2, telemetry_pb2_grpc
from arm_common import validation as val
from arm_common.auth import Principal, current_api_key, current_principal
from arm_common.db import Database
from arm_common.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    Violations,
)
from arm_common.idempotency import request_hash, run_idempotent
from arm_common.server import Ctx
from arm_common.tables import utcnow
from arm_telemetry import ingest
from arm_telemetry.backfill import Backfills
from arm_telemetry.models import IDEMPOTENCY
from arm_telemetry.queries import EventReader
from arm_telemetry.references import CHECKED_COLUMNS, ReferenceChecker, ReferenceResolver, RegistryUnavailable

_TYPES = set(events_pb2.OpEventType.values()) - {0}


def _require_read(p: Principal, project_id: str = "") -> None:
    if p.has("telemetry:read") or (project_id and p.has("telemetry:read", project_id=project_id)):
        return
    raise PermissionDenied("the caller lacks the permission 'telemetry:read'"
                           + (" for this project" if project_id else " tenant-wide; filter by a project"),
                           reason="MISSING_PERMISSION", metadata={"permission": "telemetry:read",
                                                                  "actor_id": p.actor_id})


def _check_filter(v: Violations, f: telemetry_pb2.EventFilter, prefix: str = "filter") -> None:
    for i, t in enumerate(f.types):
        if t not in _TYPES:
            v.add(f"{prefix}.types[{i}]", "must be a known OpEventType (not UNSPECIFIED)")
    if len(f.types) > 20:
        v.add(f"{prefix}.types", "must have at most 20 items")
    for name in ("instance_id", "legacy_agent_id", "version_id", "project_id", "run_id"):
        val.optional(v, f"{prefix}.{name}", getattr(f, name), ingest.MAX_ID)
    for name in ("start_time", "end_time"):
        if f.HasField(name) and not 0 <= getattr(f, name).nanos < 1_000_000_000:
            v.add(f"{prefix}.{name}", "is not a valid timestamp")
    if (f.HasField("start_time") and f.HasField("end_time")
            and f.end_time.ToNanoseconds() < f.start_time.ToNanoseconds()):
        v.add(f"{prefix}.end_time", "must not be before start_time")


class TelemetryServicer(telemetry_pb2_grpc.TelemetryServiceServicer):
    def __init__(self, db: Database, writer: ingest.EventWriter, reader: EventReader,
                 resolver: ReferenceResolver | None, backfills: Backfills, retention: timedelta,
                 checker: ReferenceChecker | None = None) -> None:
        self.db = db
        self.checker = checker
        self.writer = writer
        self.reader = reader
        self.resolver = resolver
        self.backfills = backfills
        self.retention = retention

    # --- ingest -------------------------------------------------------------------------------

    async def _ingest(self, events: Any, request: telemetry_pb2.IngestEventsRequest | None = None,
                      ) -> tuple[int, int, list[telemetry_pb2.RejectedEvent]]:
        p = current_principal()
        p.require("telemetry:write")
        if len(events) > ingest.MAX_BATCH:
            raise InvalidArgument(f"a batch holds at most {ingest.MAX_BATCH} events", reason="BATCH_TOO_LARGE",
                                  violations=[FieldViolation("events", f"must hold at most {ingest.MAX_BATCH} events")])
        try:
            rows, rejected = await ingest.prepare(events, p, self.retention, self.resolver, current_api_key(),
                                                  self.checker)
        except RegistryUnavailable as exc:
            raise Unavailable(f"the registry could not check the events' references: {exc}",
                              reason="REGISTRY_UNAVAILABLE", retry_delay_s=1.0) from None
        remember = None
        if request is not None and request.request_id:
            def remember(accepted: int, duplicates: int) -> dict[str, Any]:
                response = telemetry_pb2.IngestEventsResponse(
                    accepted_count=accepted, duplicate_count=duplicates, rejected=rejected)
                return {"tenant_id": p.tenant_id, "method": "IngestEvents", "request_id": request.request_id,
                        "request_hash": request_hash(request), "response": response.SerializeToString(),
                        "created_at": utcnow()}
        accepted, duplicates = await self.writer.write(rows, remember)
        return accepted, duplicates, rejected

    async def IngestEvents(self, request: telemetry_pb2.IngestEventsRequest, context: Ctx) -> Any:
        v = Violations()
        val.standard_fields(v, request)
        v.raise_if_any()
        if request.request_id:
            # A retry with the same request_id gets the first answer (AIP-155); without one,
            # a resent batch is answered with its events counted as duplicates.
            earlier = await self._earlier_answer(request)
            if earlier is not None:
                return earlier
        accepted, duplicates, rejected = await self._ingest(request.events, request)
        return telemetry_pb2.IngestEventsResponse(accepted_count=accepted, duplicate_count=duplicates,
                                                  rejected=rejected)

    async def _earlier_answer(self, request: telemetry_pb2.IngestEventsRequest) -> telemetry_pb2.IngestEventsResponse | None:
        p = current_principal()
        t = IDEMPOTENCY.c

        async def read(s: AsyncSession) -> Any:
            return (await s.execute(select(t.request_hash, t.response).where(
                t.tenant_id == p.tenant_id, t.method == "IngestEvents",
                t.request_id == request.request_id))).first()

        row = await self.db.read(read)
        if row is None:
            return None
        if row.request_hash != request_hash(request):
            raise InvalidArgument("request_id was already used for a different request", reason="REQUEST_ID_REUSED",
                                  violations=[FieldViolation("request_id", "was used before with other fields")])
        return telemetry_pb2.IngestEventsResponse.FromString(row.response)

    async def StreamIngestEvents(self, request_iterator: AsyncIterator[telemetry_pb2.StreamIngestEventsRequest],
                                 context: Ctx) -> AsyncIterator[telemetry_pb2.StreamIngestEventsResponse]:
        async for batch in request_iterator:
            v = Violations()
            val.optional(v, "batch_id", batch.batch_id, 128)
            v.raise_if_any()
            accepted, duplicates, rejected = await self._ingest(batch.events)
            yield telemetry_pb2.StreamIngestEventsResponse(
                batch_id=batch.batch_id, accepted_count=accepted, duplicate_count=duplicates, rejected=rejected)

    # --- reading ------------------------------------------------------------------------------

    async def _check_filter_refs(self, p: Principal, f: telemetry_pb2.EventFilter) -> None:
        """NOT_FOUND for a filter naming a project, version or instance outside the caller's
        tenant (run and legacy agent ids are the caller's own free-form strings)."""
        if self.checker is None or p.system_tenant or p.acting_for_tenant:
            return
        wanted = {(c, getattr(f, c)) for c in ("project_id", "version_id", "instance_id") if getattr(f, c)}
        if not wanted:
            return
        try:
            missing = await self.checker.unknown(p.tenant_id, wanted, current_api_key())
        except RegistryUnavailable as exc:
            raise Unavailable(f"the registry could not check the filter: {exc}", reason="REGISTRY_UNAVAILABLE",
                              retry_delay_s=1.0) from None
        if missing:
            column, ident = min(missing)
            raise NotFound.of(CHECKED_COLUMNS[column], ident)

    async def QueryEvents(self, request: telemetry_pb2.QueryEventsRequest, context: Ctx) -> Any:
        v = Violations()
        val.standard_fields(v, request)
        _check_filter(v, request.filter)
        v.raise_if_any()
        p = current_principal()
        _require_read(p, request.filter.project_id)
        await self._check_filter_refs(p, request.filter)
        return await self.reader.query(p.tenant_id, request)

    async def TailEvents(self, request: telemetry_pb2.TailEventsRequest,
                         context: Ctx) -> AsyncIterator[telemetry_pb2.TailEventsResponse]:
        v = Violations()
        _check_filter(v, request.filter)
        val.optional(v, "after_cursor", request.after_cursor, 32)
        v.raise_if_any()
        p = current_principal()
        _require_read(p, request.filter.project_id)
        await self._check_filter_refs(p, request.filter)
        async for item in self.reader.tail(p.tenant_id, request):
            yield item

    async def GetEventStats(self, request: telemetry_pb2.GetEventStatsRequest, context: Ctx) -> Any:
        v = Violations()
        for name in ("start_time", "end_time"):
            if request.HasField(name) and not 0 <= getattr(request, name).nanos < 1_000_000_000:
                v.add(name, "is not a valid timestamp")
        if (request.HasField("start_time") and request.HasField("end_time")
                and request.end_time.ToNanoseconds() < request.start_time.ToNanoseconds()):
            v.add("end_time", "must not be before start_time")
        v.raise_if_any()
        p = current_principal()
        _require_read(p)
        return await self.reader.stats(p.tenant_id, request)

    async def GetRunTrace(self, request: telemetry_pb2.GetRunTraceRequest, context: Ctx) -> Any:
        v = Violations()
        val.standard_fields(v, request)
        val.required(v, "run_id", request.run_id, ingest.MAX_ID)
        v.raise_if_any()
        p = current_principal()
        _require_read(p)
        return await self.reader.run_trace(p.tenant_id, request)

    # --- legacy references ----------------------------------------------------------------------

    async def GetMigrationHealth(self, request: telemetry_pb2.GetMigrationHealthRequest, context: Ctx) -> Any:
        p = current_principal()
        _require_read(p)
        return await self.reader.migration_health(p.tenant_id)

    async def StartBackfill(self, request: telemetry_pb2.StartBackfillRequest, context: Ctx) -> Any:
        v = Violations()
        val.standard_fields(v, request)
        v.raise_if_any()
        p = current_principal()
        if p.is_agent:
            raise PermissionDenied("agent keys may not start a backfill", reason="MISSING_PERMISSION",
                                   metadata={"permission": "telemetry:write", "actor_id": p.actor_id})
        p.require("telemetry:write")

        async def write(s: AsyncSession) -> telemetry_pb2.StartBackfillResponse:
            backfill_id = await self.backfills.start_or_resume(s, p.tenant_id, request.from_start)
            return telemetry_pb2.StartBackfillResponse(backfill=telemetry_pb2.Backfill(backfill_id=backfill_id))

        started = await run_idempotent(self.db, IDEMPOTENCY, tenant_id=p.tenant_id, method="StartBackfill",
                                       request=request, response_type=telemetry_pb2.StartBackfillResponse,
                                       write=write)
        backfill_id = started.backfill.backfill_id
        self.backfills.ensure_running(backfill_id)
        return telemetry_pb2.StartBackfillResponse(backfill=await self.backfills.status(p.tenant_id, backfill_id))

    async def GetBackfillStatus(self, request: telemetry_pb2.GetBackfillStatusRequest, context: Ctx) -> Any:
        v = Violations()
        val.resource_id(v, "backfill_id", request.backfill_id, required_=False)
        v.raise_if_any()
        p = current_principal()
        _require_read(p)
        return telemetry_pb2.GetBackfillStatusResponse(backfill=await self.backfills.status(p.tenant_id, request.backfill_id))
