"""Telemetry: stored events filtered by type, instance, version, project, run and time (newest
first, each in a drawer with its payload); a live tail of new events (TailEvents relayed to the
browser as server-sent events, resuming from the last event's cursor when the browser
reconnects); and a run's trace as a timeline with the governance decisions found in it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import grpc
from google.protobuf import json_format
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from arm.registry.v1 import agents_pb2
from arm.telemetry.v1 import events_pb2, telemetry_pb2
from arm_console.view import View
from arm_console.views.shared import console_of, not_found, parse_time
from arm_console.web import Page, Refused, enum_name, format_ts, url_with

PAGE_SIZE = 50
TYPES = [n.removeprefix("OP_EVENT_TYPE_") for n in events_pb2.OpEventType.keys() if not n.endswith("UNSPECIFIED")]
FILTER_KEYS = ("type", "instance", "version", "project", "run", "since", "until")


def etype(value: int) -> str:
    return enum_name(value, events_pb2.OpEventType)


async def event_filter(page: Page, params: Any, *, times: bool = True) -> telemetry_pb2.EventFilter:
    """The filter of a query: `instance` is an instance id or a legacy agent id."""
    f = telemetry_pb2.EventFilter(version_id=params.get("version", "").strip(),
                                  project_id=params.get("project", "").strip(), run_id=params.get("run", "").strip())
    kind = params.get("type", "")
    if kind:
        if kind not in TYPES:
            raise Refused(f"Unknown event type {kind!r}.", 400)
        f.types.append(events_pb2.OpEventType.Value(f"OP_EVENT_TYPE_{kind}"))
    ref = params.get("instance", "").strip()
    if ref:
        found = await page.client.agents.ListAgentInstances(agents_pb2.ListAgentInstancesRequest(
            agent_ref=ref, page_size=1))
        if found.agent_instances:
            f.instance_id = found.agent_instances[0].id
        else:
            f.legacy_agent_id = ref  # events of a legacy agent not (yet) linked to an instance
    if times:
        start = parse_time(params.get("since", ""), "Since")
        end = parse_time(params.get("until", ""), "Until", end=True)
        if start is not None:
            f.start_time.CopyFrom(start)
        if end is not None:
            f.end_time.CopyFrom(end)
    return f


def payload_text(e: events_pb2.OpEvent) -> str:
    if not e.HasField("payload"):
        return ""
    return json.dumps(json_format.MessageToDict(e.payload), sort_keys=True, ensure_ascii=False)


def _helpers() -> dict[str, Any]:
    return {"etype": etype, "payload_text": payload_text,
            "outcome": lambda o: enum_name(o, telemetry_pb2.DecisionOutcome)}


async def index(request: Request) -> Response:
    console = console_of(request)
    page = await console.page(request)
    q = request.query_params
    flt = await event_filter(page, q)
    resp = await page.client.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(
        filter=flt, page_size=PAGE_SIZE, page_token=q.get("page", "")))
    selected = next((e for e in resp.events if e.event_id == q.get("event")), None)
    filters = {k: q[k] for k in FILTER_KEYS if q.get(k)}
    return await console.render(
        page, "telemetry/index.html", active="telemetry", title="Telemetry", tab="events", items=resp.events,
        next_token=resp.next_page_token, selected=selected, filters=filters, types=TYPES,
        projects=await page.project_names(), close_url=url_with(request, event=None), **_helpers())


async def tail(request: Request) -> Response:
    console = console_of(request)
    page = await console.page(request)
    q = request.query_params
    await event_filter(page, q, times=False)  # refuses a bad filter here rather than in the stream
    filters = {k: q[k] for k in ("type", "instance", "project", "run") if q.get(k)}

    return await console.render(
        page, "telemetry/tail.html", active="telemetry", title="Telemetry", tab="tail", filters=filters,
        types=TYPES, projects=await page.project_names(),
        stream_url="/telemetry/stream" + (f"?{urlencode(filters)}" if filters else ""))


def event_json(e: events_pb2.OpEvent) -> dict[str, str]:
    return {"id": e.event_id, "time": format_ts(e.occur_time), "type": etype(e.type),
            "instance": e.instance_id or e.legacy_agent_id, "run": e.run_id, "tool_call": e.tool_call_id,
            "payload": payload_text(e)}


async def stream(request: Request) -> Response:
    """Server-sent events: one `op_event` per new matching event (its id the tail cursor, so a
    reconnecting browser resumes after the last one it got)."""
    console = console_of(request)
    page = await console.page(request)
    flt = await event_filter(page, request.query_params, times=False)
    call = page.client.telemetry.TailEvents(telemetry_pb2.TailEventsRequest(
        filter=flt, after_cursor=request.headers.get("last-event-id", "")))

    async def events() -> AsyncIterator[dict[str, str]]:
        yield {"event": "ready", "data": "{}"}
        try:
            async for item in call:
                yield {"event": "op_event", "id": item.cursor, "data": json.dumps(event_json(item.event))}
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                yield {"event": "failed", "data": json.dumps({"message": exc.details() or exc.code().name})}
        finally:
            call.cancel()

    return EventSourceResponse(events(), ping=15, headers={"Cache-Control": "no-store"})


async def run_trace(request: Request) -> Response:
    console = console_of(request)
    page = await console.page(request)
    run_id = request.path_params["run_id"]
    events: list[events_pb2.OpEvent] = []
    decisions: list[telemetry_pb2.RunDecision] = []
    token = ""
    while len(events) < 2000:
        resp = await page.client.telemetry.GetRunTrace(telemetry_pb2.GetRunTraceRequest(
            run_id=run_id, page_size=500, page_token=token))
        events += resp.events
        decisions += resp.decisions
        token = resp.next_page_token
        if not token:
            break
    if not events:
        return await not_found(console, page, f"No events of run {run_id!r} in your tenant. Check the run id, "
                                              "or find runs under Telemetry → Events.")
    by_event = {d.event_id: d for d in decisions}
    start = events[0].occur_time.ToDatetime()
    end = events[-1].occur_time.ToDatetime()
    span = max((end - start).total_seconds(), 0.001)
    rows = []
    for e in events:
        offset = (e.occur_time.ToDatetime() - start).total_seconds()
        rows.append({"event": e, "offset": offset, "pct": round(100 * offset / span, 2),
                     "decision": by_event.get(e.event_id)})
    counts = {"ALLOW": 0, "DENY": 0, "NEEDS_APPROVAL": 0}
    for d in decisions:
        name = enum_name(d.outcome, telemetry_pb2.DecisionOutcome)
        counts[name] = counts.get(name, 0) + 1
    return await console.render(
        page, "telemetry/run.html", active="telemetry", title=f"Run {run_id}", tab="events", run_id=run_id,
        rows=rows, decisions=decisions, counts=counts, duration=(end - start).total_seconds(),
        truncated=bool(token), instance=events[0].instance_id or events[0].legacy_agent_id, **_helpers())


VIEW = View(slug="telemetry", title="Telemetry", routes=[
    Route("/telemetry", index),
    Route("/telemetry/tail", tail),
    Route("/telemetry/stream", stream),
    Route("/telemetry/runs/{run_id}", run_trace),
])
