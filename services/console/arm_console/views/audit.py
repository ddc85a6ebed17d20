"""Audit: the tenant's change records filtered by type, actor, target and date range, newest
first, each in a drawer with its payload and hashes; the chain's verification (VerifyChain, also
against the stored signed checkpoints) shown at the top of the page; and an export of the filtered
trail as JSON lines, as `arm audit export` writes it."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import grpc
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from arm.common.v1 import common_pb2
from arm.governance.v1 import audit_pb2
from arm_console.view import View
from arm_console.views.shared import console_of, parse_time
from arm_console.web import Refused, enum_name, url_with

PAGE_SIZE = 50
VERIFY_TTL_S = 60.0
"""How long a session reuses its chain verification: VerifyChain reads the whole trail, so the
page does not run it on every load (filtering, paging, opening a record); "Verify now" forces it."""
MAX_VERIFICATIONS = 1000
_verifications: OrderedDict[str, tuple[float, audit_pb2.VerifyChainResponse, audit_pb2.AuditCheckpoint | None]] = (
    OrderedDict())
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
    if q.get("verify") == "1":  # "Verify now": verify, then show the page without the parameter
        await _verification(page, force=True)
        return RedirectResponse(url_with(request, verify=None), status_code=303)
    verified_at, verification, last_checkpoint = await _verification(page, force=False)
    selected = None
    if q.get("record"):
        selected = (await page.client.audit.GetChangeRecord(audit_pb2.GetChangeRecordRequest(
            record_id=q["record"]))).record
    filters = {k: v for k, v in q.items() if k not in ("page", "record") and v}
    return await console.render(
        page, "audit/index.html", active="audit", title="Audit", items=resp.records,
        next_token=resp.next_page_token, verification=verification,
        last_checkpoint=last_checkpoint, verified_ago_s=int(time.monotonic() - verified_at),
        verify_url=url_with(request, verify="1"),
        selected=selected, filters=filters, types=TYPES, actor_types=ACTOR_TYPES,
        export_url="/audit/export" + (f"?{urlencode(filters)}" if filters else ""),
        close_url=url_with(request, record=None),
        rtype=lambda t: enum_name(t, common_pb2.ChangeRecordType),
        atype=lambda t: enum_name(t, common_pb2.ActorType),
        chain_break=lambda r: enum_name(r, audit_pb2.ChainBreak).replace("_", " ").lower())


async def _verification(page: Any, *, force: bool
                        ) -> tuple[float, audit_pb2.VerifyChainResponse, audit_pb2.AuditCheckpoint | None]:
    """The session's chain verification and last signed checkpoint, at most VERIFY_TTL_S old.
    Kept per session (not per tenant), so a result is only shown to a key that was allowed it."""
    key = page.session.sid
    now = time.monotonic()
    kept = _verifications.get(key)
    if kept is not None and not force and now - kept[0] < VERIFY_TTL_S:
        return kept
    verification = await page.client.audit.VerifyChain(audit_pb2.VerifyChainRequest())
    last, token = None, ""
    while True:  # checkpoints come oldest first: the last page holds the newest
        resp = await page.client.audit.ListCheckpoints(audit_pb2.ListCheckpointsRequest(
            page_size=1000, page_token=token))
        if resp.checkpoints:
            last = resp.checkpoints[-1]
        token = resp.next_page_token
        if not token:
            break
    _verifications[key] = kept = (now, verification, last)
    _verifications.move_to_end(key)
    while len(_verifications) > MAX_VERIFICATIONS:
        _verifications.popitem(last=False)
    return kept


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
