"""Audit: the tenant's change records filtered by type, actor, target and date range, newest
first, each in a drawer with its payload and hashes; the chain's verification (VerifyChain, also
against the stored signed checkpoints) shown at the top of the page; and an export of the filtered
trail as JSON lines, as `arm audit export` writes it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from urllib.parse import urlencode

import grpc
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from arm.common.v1 import common_pb2
from arm.governance.v1 import audit_pb2
from arm_console.view import View
from arm_console.views.shared import console_of, parse_time
from arm_console.web import Refused, enum_name, url_with

PAGE_SIZE = 50
TYPES = [n.removeprefix("CHANGE_RECORD_TYPE_") for n in common_pb2.ChangeRecordType.keys()
         if not n.endswith("UNSPECIFIED")]
ACTOR_TYPES = [n.removeprefix("ACTOR_TYPE_") for n in common_pb2.ActorType.keys() if not n.endswith("UNSPECIFIED")]


def record_filter(request: Request) -> audit_pb2.ChangeRecordFilter:
    """The filter of the page's query: type, actor, target, from/to dates."""
    q = request.query_params
    f = audit_pb2.ChangeRecordFilter(target_type=q.get("target_type", "").strip(),
                                     target_id=q.get("target", "").strip(), actor_id=q.get("actor", "").strip())
    kind = q.get("type", "")
    if kind:
        if kind not in TYPES:
            raise Refused(f"Unknown change record type {kind!r}.", 400)
        f.types.append(common_pb2.ChangeRecordType.Value(f"CHANGE_RECORD_TYPE_{kind}"))
    actor_type = q.get("actor_type", "")
    if actor_type:
        if actor_type not in ACTOR_TYPES:
            raise Refused(f"Unknown actor type {actor_type!r}.", 400)
        f.actor_type = common_pb2.ActorType.Value(f"ACTOR_TYPE_{actor_type}")
    start = parse_time(q.get("from", ""), "From")
    end = parse_time(q.get("to", ""), "To", end=True)
    if start is not None:
        f.start_time.CopyFrom(start)
    if end is not None:
        f.end_time.CopyFrom(end)
    return f


async def index(request: Request) -> Response:
    console = console_of(request)
    page = await console.page(request)
    q = request.query_params
    flt = record_filter(request)
    resp = await page.client.audit.ListChangeRecords(audit_pb2.ListChangeRecordsRequest(
        page_size=PAGE_SIZE, page_token=q.get("page", ""), filter=flt, newest_first=True))
    verification = await page.client.audit.VerifyChain(audit_pb2.VerifyChainRequest())
    checkpoints = await page.client.audit.ListCheckpoints(audit_pb2.ListCheckpointsRequest(page_size=100))
    selected = None
    if q.get("record"):
        selected = (await page.client.audit.GetChangeRecord(audit_pb2.GetChangeRecordRequest(
            record_id=q["record"]))).record
    filters = {k: v for k, v in q.items() if k not in ("page", "record") and v}
    return await console.render(
        page, "audit/index.html", active="audit", title="Audit", items=resp.records,
        next_token=resp.next_page_token, verification=verification,
        last_checkpoint=checkpoints.checkpoints[-1] if checkpoints.checkpoints else None,
        selected=selected, filters=filters, types=TYPES, actor_types=ACTOR_TYPES,
        export_url="/audit/export" + (f"?{urlencode(filters)}" if filters else ""),
        close_url=url_with(request, record=None),
        rtype=lambda t: enum_name(t, common_pb2.ChangeRecordType),
        atype=lambda t: enum_name(t, common_pb2.ActorType),
        chain_break=lambda r: enum_name(r, audit_pb2.ChainBreak).replace("_", " ").lower())


async def export(request: Request) -> Response:
    """The filtered trail as JSON lines, oldest first (ExportChangeRecords), as a download."""
    console = console_of(request)
    page = await console.page(request)
    flt = record_filter(request)
    stream = page.client.audit.ExportChangeRecords(audit_pb2.ExportChangeRecordsRequest(filter=flt))
    # The first chunk is read before answering, so a refused call is an error page, not a broken file.
    first = await stream.read()

    async def body() -> AsyncIterator[bytes]:
        chunk = first
        try:
            while chunk is not grpc.aio.EOF:
                yield chunk.data
                chunk = await stream.read()
        finally:
            stream.cancel()

    name = f"audit-{page.session.tenant_id}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.jsonl"
    return StreamingResponse(body(), media_type="application/x-ndjson",
                             headers={"Content-Disposition": f'attachment; filename="{name}"'})


VIEW = View(slug="audit", title="Audit", routes=[
    Route("/audit", index),
    Route("/audit/export", export),
])
