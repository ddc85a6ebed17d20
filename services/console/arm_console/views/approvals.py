"""Approvals: the inbox of open requests (risk, tool, arguments digest, justification, rollback
plan, expiry countdown, who has decided, two-person progress), approve or deny with a reason,
live updates as decisions arrive (server-sent events: governance's WatchApproval for the open
approval, ListApprovals polled server-side for the list), and the history of decided ones."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from arm.common.v1 import common_pb2
from arm.governance.v1 import approvals_pb2
from arm.registry.v1 import access_pb2
from arm_client.connection import new_request_id
from arm_client.stubs import ArmClient
from arm_console.view import View
from arm_console.web import Console, Page, Refused, enum_name, redirect, url_with

log = logging.getLogger("arm_console")

OPEN = [approvals_pb2.APPROVAL_STATUS_PENDING, approvals_pb2.APPROVAL_STATUS_ESCALATED]
FINAL = {"APPROVED": approvals_pb2.APPROVAL_STATUS_APPROVED, "DENIED": approvals_pb2.APPROVAL_STATUS_DENIED,
         "EXPIRED": approvals_pb2.APPROVAL_STATUS_EXPIRED, "CANCELLED": approvals_pb2.APPROVAL_STATUS_CANCELLED}
ACTION_TYPES = [n for n in approvals_pb2.ApprovalActionType.keys() if not n.endswith("UNSPECIFIED")]
RISKS = ["LOW", "MEDIUM", "HIGH", "CRITICAL"]
PAGE_SIZE = 25
POLL_S = 1.0
"""How often the live stream re-reads the open approvals for the list."""


def _console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def _helpers() -> dict[str, Any]:
    return {
        "status_name": lambda s: enum_name(s, approvals_pb2.ApprovalStatus),
        "action_name": lambda a: enum_name(a, approvals_pb2.ApprovalActionType),
        "risk_name": lambda r: enum_name(r, common_pb2.RiskLevel),
        "verdict_name": lambda v: enum_name(v, approvals_pb2.ApprovalVerdict),
        "approvals_count": lambda a: sum(d.verdict == approvals_pb2.APPROVAL_VERDICT_APPROVE for d in a.decisions),
        "is_open": lambda a: a.status in OPEN,
        "actor_type": lambda t: enum_name(t, common_pb2.ActorType),
        "action_types": [t.removeprefix("APPROVAL_ACTION_TYPE_") for t in ACTION_TYPES], "risks": RISKS,
    }


async def _operator_names(page: Page) -> dict[str, str]:
    """Operator id → name, when the user may list operators (else ids are shown)."""
    try:
        resp = await page.client.access.ListOperators(access_pb2.ListOperatorsRequest(page_size=500))
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
            return {}
        raise
    return {o.id: o.name or o.email for o in resp.operators}


def _filters(request: Request, statuses: list[int]) -> approvals_pb2.ListApprovalsRequest:
    q = request.query_params
    action = q.get("type", "")
    if action and f"APPROVAL_ACTION_TYPE_{action}" not in ACTION_TYPES:
        raise Refused(f"Unknown action type {action!r}.", 400)
    risk = q.get("risk", "")
    if risk and risk not in RISKS:
        raise Refused(f"Unknown risk {risk!r}.", 400)
    request = approvals_pb2.ListApprovalsRequest(
        statuses=statuses, instance_id=q.get("instance", "").strip(),
        action_type=approvals_pb2.ApprovalActionType.Value(f"APPROVAL_ACTION_TYPE_{action}") if action else 0,
        min_risk=common_pb2.RiskLevel.Value(f"RISK_LEVEL_{risk}") if risk else 0,
        page_size=PAGE_SIZE, page_token=q.get("page", ""))
    # Dates (YYYY-MM-DD, UTC): from the start of `from` to the end of `to`.
    for name, field, shift in (("from", "created_after", 0), ("to", "created_before", 1)):
        if q.get(name):
            try:
                day = datetime.strptime(q[name], "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(days=shift)
            except ValueError:
                raise Refused(f"{name!r} must be a date like 2026-01-31.", 400) from None
            getattr(request, field).FromDatetime(day)
    return request


async def _render(request: Request, tab: str) -> Response:
    console = _console(request)
    page = await console.page(request)
    selected = None
    if request.query_params.get("approval"):
        selected = (await page.client.approvals.GetApproval(approvals_pb2.GetApprovalRequest(
            approval_id=request.query_params["approval"]))).approval
    if tab == "inbox":
        statuses = OPEN
    else:
        status = request.query_params.get("status", "")
        if status and status not in FINAL:
            raise Refused(f"Unknown status {status!r}.", 400)
        statuses = [FINAL[status]] if status else list(FINAL.values())
    resp = await page.client.approvals.ListApprovals(_filters(request, statuses))
    live = f"/approvals/events?approval={selected.approval_id}" if selected else "/approvals/events"
    return await console.render(
        page, "approvals/index.html", active="approvals", title="Approvals", tab=tab, items=resp.approvals,
        next_token=resp.next_page_token, selected=selected, filters=dict(request.query_params),
        operators=await _operator_names(page), me=page.session.actor_id, projects=await page.project_names(),
        live_src=live, close_url=url_with(request, approval=None), final_statuses=list(FINAL), **_helpers())


async def inbox(request: Request) -> Response:
    return await _render(request, "inbox")


async def history(request: Request) -> Response:
    return await _render(request, "history")


async def detail(request: Request) -> Response:
    """One approval (the link a notification carries): its list, Inbox or History, with its
    drawer open."""
    console = _console(request)
    page = await console.page(request)
    approval = (await page.client.approvals.GetApproval(approvals_pb2.GetApprovalRequest(
        approval_id=request.path_params["approval_id"]))).approval
    base = "/approvals" if approval.status in OPEN else "/approvals/history"
    return RedirectResponse(f"{base}?approval={approval.approval_id}", status_code=303)


async def decide(request: Request) -> Response:
    console = _console(request)
    page = await console.page(request)
    form = await page.form()
    approval_id = request.path_params["approval_id"]
    verdict = {"approve": approvals_pb2.APPROVAL_VERDICT_APPROVE,
               "deny": approvals_pb2.APPROVAL_VERDICT_DENY}.get(str(form.get("verdict", "")))
    reason = str(form.get("reason", "")).strip()
    back = f"/approvals/{approval_id}"
    if verdict is None:
        raise Refused("Choose approve or deny.", 400)
    if not reason:
        return redirect(back, ("error", "Give a reason for your decision: it is recorded with it."),
                        secure=console.secure(request))
    try:
        approval = (await page.client.approvals.DecideApproval(approvals_pb2.DecideApprovalRequest(
            request_id=new_request_id(), approval_id=approval_id, verdict=verdict, reason=reason))).approval
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                          grpc.StatusCode.ABORTED, grpc.StatusCode.ALREADY_EXISTS):
            return redirect(back, ("error", f"Not recorded: {exc.details()}"), secure=console.secure(request))
        raise
    status = enum_name(approval.status, approvals_pb2.ApprovalStatus)
    if approval.status in OPEN:
        text = (f"Your decision is recorded; {approval.required_decisions - _approvals(approval)} more approval(s) "
                "needed.")
    else:
        text = f"Your decision is recorded: the request is {status}."
    return redirect(back, ("ok", text), secure=console.secure(request))


def _approvals(approval: approvals_pb2.Approval) -> int:
    return sum(d.verdict == approvals_pb2.APPROVAL_VERDICT_APPROVE for d in approval.decisions)


async def events(request: Request) -> Response:
    """Server-sent events: `changed` whenever the open approvals (first page) or the watched
    approval change; the page then fetches itself again and swaps its live regions."""
    console = _console(request)
    page = await console.page(request)
    approval_id = request.query_params.get("approval", "")
    return EventSourceResponse(_changes(page.client, approval_id), ping=15, send_timeout=30)


async def _changes(client: ArmClient, approval_id: str) -> AsyncIterator[dict[str, str]]:
    queue: asyncio.Queue[str] = asyncio.Queue()

    async def poll_list() -> None:
        last: tuple[tuple[str, str], ...] | None = None
        while True:
            try:
                resp = await client.approvals.ListApprovals(approvals_pb2.ListApprovalsRequest(
                    statuses=OPEN, page_size=100))
                now = tuple((a.approval_id, a.etag) for a in resp.approvals)
                if last is not None and now != last:
                    queue.put_nowait("list")
                last = now
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    queue.put_nowait("end")
                    return
                log.debug("approvals live list: %s", exc.code().name)
            await asyncio.sleep(POLL_S)

    async def watch() -> None:
        while True:
            try:
                first = True
                async for _ in client.approvals.WatchApproval(approvals_pb2.WatchApprovalRequest(
                        approval_id=approval_id)):
                    if not first:
                        queue.put_nowait("approval")
                    first = False
                return  # the approval reached a final status: the stream ended
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    return
                await asyncio.sleep(POLL_S)

    tasks = [asyncio.create_task(poll_list())]
    if approval_id:
        tasks.append(asyncio.create_task(watch()))
    try:
        while True:
            what = await queue.get()
            if what == "end":
                return
            yield {"event": "changed", "data": what}
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task


VIEW = View(slug="approvals", title="Approvals", routes=[
    Route("/approvals", inbox),
    Route("/approvals/history", history),
    Route("/approvals/events", events),
    Route("/approvals/{approval_id}", detail),
    Route("/approvals/{approval_id}/decide", decide, methods=["POST"]),
])
