"""Telemetry from a terminal: `arm events query|tail|stats|trace RUN_ID` and the legacy
back-fill, `arm backfill start|status --follow` (a progress bar until it completes)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from google.protobuf import timestamp_pb2
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from arm.telemetry.v1 import events_pb2, telemetry_pb2
from arm_cli.main import Output, app, call, instance_id
from arm_cli.output import Format, as_dict, console, emit_object, emit_rows, short_enum
from arm_client.stubs import ArmClient

events_app = typer.Typer(help="Operational events: query, tail (follow), stats, trace a run.", no_args_is_help=True)
backfill_app = typer.Typer(help="The legacy back-fill (fills instance and version on old events).",
                           no_args_is_help=True)
app.add_typer(events_app, name="events")
app.add_typer(backfill_app, name="backfill")

_TYPES = {short_enum(n, "OP_EVENT_TYPE_").lower(): v for n, v in events_pb2.OpEventType.items() if v}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _when(text: str | None, option: str) -> timestamp_pb2.Timestamp | None:
    """`30m`, `2h`, `7d` (that long ago) or an ISO time (UTC when it names no zone)."""
    if not text:
        return None
    m = _DURATION.match(text)
    try:
        if m:
            moment = datetime.now(UTC) - timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
        else:
            moment = datetime.fromisoformat(text)
            moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected e.g. 30m, 2h, 7d or an ISO time", param_hint=option) from None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(moment)
    return ts


def _types(names: list[str] | None) -> list[int]:
    out = []
    for n in names or []:
        if n.lower() not in _TYPES:
            raise typer.BadParameter(f"unknown type {n!r}; one of {', '.join(_TYPES)}", param_hint="--type")
        out.append(_TYPES[n.lower()])
    return out


def _ts(msg: Any, name: str) -> str:
    if not msg.HasField(name):
        return ""
    return str(getattr(msg, name).ToDatetime().isoformat(timespec="milliseconds")) + "Z"


def _event_row(e: events_pb2.OpEvent) -> dict[str, Any]:
    return {"time": _ts(e, "occur_time"), "type": short_enum(events_pb2.OpEventType.Name(e.type), "OP_EVENT_TYPE_"),
            "instance": e.instance_id or e.legacy_agent_id, "run": e.run_id, "tool_call": e.tool_call_id,
            "id": e.event_id,
            "payload": json.dumps(as_dict(e.payload), sort_keys=True) if e.HasField("payload") else ""}


_EVENT_COLUMNS = ["time", "type", "instance", "run", "tool_call", "id", "payload"]

Types = Annotated[list[str] | None, typer.Option("--type", "-t", help=f"Repeatable: {', '.join(_TYPES)}")]
Instance = Annotated[str, typer.Option(help="Agent instance name or id")]
Run = Annotated[str, typer.Option(help="Only this run's events")]


async def _filter(c: ArmClient, types: list[int], instance: str, run: str, since: timestamp_pb2.Timestamp | None,
                  until: timestamp_pb2.Timestamp | None) -> telemetry_pb2.EventFilter:
    f = telemetry_pb2.EventFilter(types=types, run_id=run,  # type: ignore[arg-type]
                                  instance_id=await instance_id(c, instance) if instance else "")
    if since is not None:
        f.start_time.CopyFrom(since)
    if until is not None:
        f.end_time.CopyFrom(until)
    return f


@events_app.command("query")
def events_query(ctx: typer.Context, type_: Types = None, instance: Instance = "", run: Run = "",
                 since: Annotated[str | None, typer.Option(help="e.g. 30m, 2h, 7d or an ISO time")] = None,
                 until: Annotated[str | None, typer.Option(help="e.g. 5m or an ISO time")] = None,
                 limit: Annotated[int, typer.Option(min=1, max=10000)] = 100,
                 output: Output = Format.table) -> None:
    """Stored events matching the filters, newest first, at most --limit."""
    types, start, end = _types(type_), _when(since, "--since"), _when(until, "--until")

    async def fetch(c: ArmClient) -> list[events_pb2.OpEvent]:
        f = await _filter(c, types, instance, run, start, end)
        out: list[events_pb2.OpEvent] = []
        token = ""
        while len(out) < limit:
            page = await c.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(
                filter=f, page_size=min(500, limit - len(out)), page_token=token))
            out += list(page.events)
            token = page.next_page_token
            if not token:
                break
        return out[:limit]

    items = call(ctx, fetch)
    emit_rows([_event_row(e) for e in items], output, _EVENT_COLUMNS, raw=[as_dict(e) for e in items])


@events_app.command("tail")
def events_tail(ctx: typer.Context, type_: Types = None, instance: Instance = "", run: Run = "",
                count: Annotated[int, typer.Option(min=0, help="Stop after this many events (0: follow until Ctrl-C)")] = 0,
                output: Output = Format.table) -> None:
    """Follows new events as they arrive, a line each (JSON lines with -o json), until Ctrl-C
    (exit 130) or --count events."""
    types = _types(type_)

    async def follow(c: ArmClient) -> None:
        f = await _filter(c, types, instance, run, None, None)
        stream = c.telemetry.TailEvents(telemetry_pb2.TailEventsRequest(filter=f))
        seen = 0
        async for item in stream:
            e = item.event
            if output is Format.table:
                row = _event_row(e)
                sys.stdout.write(" ".join(str(row[k]) for k in ("time", "type", "instance", "run", "tool_call", "id"))
                                 + (f" {row['payload']}" if row["payload"] else "") + "\n")
            else:
                sys.stdout.write(json.dumps(as_dict(e), sort_keys=True) + "\n")
            sys.stdout.flush()
            seen += 1
            if count and seen >= count:
                stream.cancel()
                return

    try:
        call(ctx, follow)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@events_app.command("stats")
def events_stats(ctx: typer.Context,
                 since: Annotated[str | None, typer.Option(help="e.g. 24h (default: the server's window)")] = None,
                 until: Annotated[str | None, typer.Option(help="e.g. 5m or an ISO time")] = None,
                 output: Output = Format.table) -> None:
    """Event counts by type over a window."""
    request = telemetry_pb2.GetEventStatsRequest()
    start, end = _when(since, "--since"), _when(until, "--until")
    if start is not None:
        request.start_time.CopyFrom(start)
    if end is not None:
        request.end_time.CopyFrom(end)
    r = call(ctx, lambda c: c.telemetry.GetEventStats(request))
    rows = [{"type": short_enum(events_pb2.OpEventType.Name(x.type), "OP_EVENT_TYPE_"), "count": x.count}
            for x in r.counts]
    rows.append({"type": "total", "count": r.total})
    emit_rows(rows, output, ["type", "count"], title=f"events {_ts(r, 'start_time')} → {_ts(r, 'end_time')}",
              raw=as_dict(r))


@events_app.command("trace")
def events_trace(ctx: typer.Context, run_id: str, output: Output = Format.table) -> None:
    """Every event of one run in order, with the governance decisions taken during it."""

    async def fetch(c: ArmClient) -> tuple[list[Any], list[Any]]:
        evs: list[Any] = []
        decisions: list[Any] = []
        token = ""
        while True:
            page = await c.telemetry.GetRunTrace(telemetry_pb2.GetRunTraceRequest(
                run_id=run_id, page_size=500, page_token=token))
            evs += list(page.events)
            decisions += list(page.decisions)
            token = page.next_page_token
            if not token:
                return evs, decisions

    evs, decisions = call(ctx, fetch)
    if output is not Format.table:
        emit_rows([], output, [], raw={"events": [as_dict(e) for e in evs],
                                       "decisions": [as_dict(d) for d in decisions]})
        return
    emit_rows([_event_row(e) for e in evs], output, ["time", "type", "instance", "tool_call", "id", "payload"],
              title=f"run {run_id}: {len(evs)} events")
    if decisions:
        emit_rows([{"time": _ts(d, "occur_time"), "decision": d.decision_id,
                    "outcome": short_enum(telemetry_pb2.DecisionOutcome.Name(d.outcome), "DECISION_OUTCOME_"),
                    "tool": d.tool_name, "tool_call": d.tool_call_id, "approval": d.approval_id} for d in decisions],
                  output, ["time", "decision", "outcome", "tool", "tool_call", "approval"], title="decisions")


# --- back-fill ---------------------------------------------------------------------------------

_DONE = {telemetry_pb2.BACKFILL_STATE_COMPLETED, telemetry_pb2.BACKFILL_STATE_FAILED}


def _backfill_row(b: telemetry_pb2.Backfill) -> dict[str, Any]:
    return {"id": b.backfill_id, "state": short_enum(telemetry_pb2.BackfillState.Name(b.state), "BACKFILL_STATE_"),
            "processed": b.processed_count, "updated": b.updated_count, "remaining": b.remaining_count,
            "unresolved": b.unresolved_count, "error": b.error_message, "started": _ts(b, "start_time"),
            "completed": _ts(b, "complete_time")}


async def _follow(c: ArmClient, first: telemetry_pb2.Backfill, interval: float) -> telemetry_pb2.Backfill:
    """Polls the back-fill until it completes or fails, drawing a progress bar (on stderr)."""
    b = first
    with Progress(TextColumn("back-fill {task.fields[state]}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("updated {task.fields[updated]}"), TimeElapsedColumn(),
                  console=console(stderr=True), transient=False) as bar:
        task = bar.add_task("backfill", total=max(1, b.processed_count + b.remaining_count),
                            state="", updated=0)
        while True:
            row = _backfill_row(b)
            bar.update(task, completed=b.processed_count, total=max(1, b.processed_count + b.remaining_count),
                       state=row["state"], updated=b.updated_count)
            if b.state in _DONE:
                return b
            await asyncio.sleep(interval)
            b = (await c.telemetry.GetBackfillStatus(telemetry_pb2.GetBackfillStatusRequest(
                backfill_id=b.backfill_id))).backfill


def _finish(b: telemetry_pb2.Backfill, output: Format, title: str) -> None:
    emit_object({k: v for k, v in _backfill_row(b).items() if v != ""}, output, title=title, raw=as_dict(b))
    if b.state == telemetry_pb2.BACKFILL_STATE_FAILED:
        raise typer.Exit(1)


Follow = Annotated[bool, typer.Option("--follow", "-f", help="Show a progress bar until it completes")]
Interval = Annotated[float, typer.Option(min=0.05, help="Poll interval when following, seconds")]


@backfill_app.command("start")
def backfill_start(ctx: typer.Context,
                   from_start: Annotated[bool, typer.Option(help="A new pass over every event")] = False,
                   follow: Follow = False, interval: Interval = 0.5, output: Output = Format.table) -> None:
    """Starts the tenant's back-fill (a running one is returned, not doubled). Exit 1 if it fails."""

    async def start(c: ArmClient) -> telemetry_pb2.Backfill:
        b = (await c.telemetry.StartBackfill(telemetry_pb2.StartBackfillRequest(from_start=from_start))).backfill
        return await _follow(c, b, interval) if follow else b

    _finish(call(ctx, start), output, "back-fill")


@backfill_app.command("status")
def backfill_status(ctx: typer.Context,
                    backfill_id: Annotated[str, typer.Argument(help="Default: the tenant's latest")] = "",
                    follow: Follow = False, interval: Interval = 0.5, output: Output = Format.table) -> None:
    """The back-fill's progress (the latest one without an id). Exit 1 if it failed."""

    async def status(c: ArmClient) -> telemetry_pb2.Backfill:
        b = (await c.telemetry.GetBackfillStatus(telemetry_pb2.GetBackfillStatusRequest(
            backfill_id=backfill_id))).backfill
        return await _follow(c, b, interval) if follow else b

    try:
        b = call(ctx, status)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    _finish(b, output, "back-fill")
