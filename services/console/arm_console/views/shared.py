"""Small helpers of the Policies, Deployments, Audit and Telemetry views: the console of a request,
dates from filter forms, a refused call's field problems, and every page of a list."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from starlette.requests import Request
from starlette.responses import Response

from arm_client.errors import from_rpc_error
from arm_console.web import Console, Refused

T = TypeVar("T")


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def parse_time(value: str, name: str, *, end: bool = False) -> Timestamp | None:
    """A filter's date (`2026-01-31`, the whole day) or date and time (`2026-01-31T12:30`), in UTC;
    with `end`, the first instant after it (a day's end is the next midnight). Empty: None."""
    value = value.strip()
    if not value:
        return None
    try:
        if len(value) == 10:
            dt = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
            step = timedelta(days=1)
        else:
            dt = datetime.fromisoformat(value)
            dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
            step = timedelta(minutes=1) if len(value) <= 16 else timedelta(seconds=1)
    except ValueError:
        raise Refused(f"{name}: expected a date (YYYY-MM-DD) or a date and time, not {value!r}.", 400) from None
    ts = Timestamp()
    ts.FromDatetime(dt + step if end else dt)
    return ts


def problems(exc: grpc.aio.AioRpcError) -> list[str]:
    """What was wrong with a refused request, a line per field (or the status message)."""
    err = from_rpc_error(exc)
    lines = [f"{v.field}: {v.description}" for v in err.field_violations]
    return lines or [f"{exc.code().name.replace('_', ' ').capitalize()}: {exc.details() or 'no details'}"]


async def all_pages(fetch: Callable[[str], Awaitable[tuple[Sequence[T], str]]], limit: int = 2000) -> list[T]:
    """Every item of a paginated list (at most `limit`): `fetch(token)` returns (items, next token)."""
    out: list[T] = []
    token = ""
    while len(out) < limit:
        items, token = await fetch(token)
        out.extend(items)
        if not token:
            break
    return out[:limit]


def nonempty(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v not in ("", None)}


async def not_found(console: Console, page: Any, message: str) -> Response:
    """The console's not-found page (404) with a sentence saying what to do."""
    return await console.render(page, "common/error.html", active="", title="Not found", status=404, message=message)
