"""What every view uses: the signed-in user's gRPC client, page rendering in the layout, forms
checked for CSRF, flash messages, pagination links and gRPC errors turned into pages."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from arm.governance.v1 import policy_pb2
from arm_client.stubs import ArmClient
from arm_console.config import ConsoleConfig
from arm_console.sessions import PRESESSION_COOKIE, SESSION_COOKIE, Session, SessionCodec

log = logging.getLogger("arm_console")

PACKAGE_DIR = Path(__file__).resolve().parent
FLASH_COOKIE = "arm_console_flash"
MAX_CLIENTS = 256


class SignInRequired(Exception):
    """No valid session: the browser goes to the sign-in page."""


class Refused(Exception):
    """A request the console refuses outright (bad CSRF token, cross-site post)."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class NavItem:
    slug: str
    title: str
    path: str


@dataclass
class Page:
    """One request's signed-in context."""

    request: Request
    session: Session
    client: ArmClient
    csrf_token: str
    console: Console
    flash: dict[str, str] | None = None
    _projects: dict[str, str] | None = field(default=None, repr=False)

    async def project_names(self) -> dict[str, str]:
        """Project id → name of the user's tenant (first 500), for labels and filters."""
        if self._projects is None:
            from arm.registry.v1 import tenancy_pb2
            resp = await self.client.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest(page_size=500))
            self._projects = {p.id: p.name or p.slug for p in resp.projects}
        return self._projects

    async def form(self) -> FormData:
        """The posted form, after its CSRF token and origin are checked."""
        form = await self.request.form()
        token = form.get("csrf_token")
        if not self.console.sessions.csrf_valid(token if isinstance(token, str) else None, self.session.sid,
                                                self.console.sessions.ttl_s):
            raise Refused("This form has expired or did not come from this console. Reload the page and try again.")
        return form


class Console:
    """The application's state: configuration, session codec, templates, gRPC clients per session."""

    def __init__(self, config: ConsoleConfig, nav: list[NavItem]) -> None:
        self.config = config
        self.sessions = SessionCodec(config.session_secret, config.session_ttl_s)
        self.nav = nav
        self.templates = Environment(loader=FileSystemLoader(PACKAGE_DIR / "templates"),
                                     autoescape=select_autoescape(default=True, default_for_string=True))
        self.templates.filters.update(ts=format_ts, ago=format_ago, iso=format_iso, enum=enum_name,
                                      pretty=pretty_json, short=short_id)
        self.templates.globals["url_with"] = url_with
        self._clients: OrderedDict[str, ArmClient] = OrderedDict()

    def client_for(self, session: Session) -> ArmClient:
        """A client (channels) acting with this session's key; kept per session, oldest closed first."""
        client = self._clients.get(session.sid)
        if client is None:
            client = ArmClient(settings=replace(self.config.services, api_key=session.api_key))
            self._clients[session.sid] = client
            while len(self._clients) > MAX_CLIENTS:
                _, old = self._clients.popitem(last=False)
                _close_later(old)
        else:
            self._clients.move_to_end(session.sid)
        return client

    def client_with_key(self, api_key: str) -> ArmClient:
        """A one-off client for a key (sign-in); the caller closes it."""
        return ArmClient(settings=replace(self.config.services, api_key=api_key))

    async def drop_client(self, sid: str) -> None:
        client = self._clients.pop(sid, None)
        if client is not None:
            await client.close()

    async def close(self) -> None:
        while self._clients:
            _, client = self._clients.popitem()
            await client.close()

    def secure(self, request: Request) -> bool:
        return self.config.secure_cookie or request.url.scheme == "https"

    def session_of(self, request: Request) -> Session | None:
        return self.sessions.read(request.cookies.get(SESSION_COOKIE))

    async def page(self, request: Request) -> Page:
        session = self.session_of(request)
        if session is None:
            raise SignInRequired()
        # A live region's refresh (console.js) leaves the one-time message to the page itself.
        flash = None if request.headers.get("x-live-refresh") else read_flash(request)
        return Page(request, session, self.client_for(session), self.sessions.csrf_token(session.sid), self, flash)

    async def render(self, page: Page, template_name: str, /, *, active: str, title: str, status: int = 200,
                     **context: Any) -> HTMLResponse:
        banners = await kill_switch_banners(page)
        html = self.templates.get_template(template_name).render(
            request=page.request, user=page.session.public(), csrf_token=page.csrf_token, nav=self.nav,
            active=active, title=title, flash=page.flash, banners=banners, **context)
        response = HTMLResponse(html, status_code=status)
        if page.flash:
            response.delete_cookie(FLASH_COOKIE, path="/")
        return response

    def render_bare(self, template_name: str, /, status: int = 200, **context: Any) -> HTMLResponse:
        """A page outside the signed-in layout (sign-in, errors without a session)."""
        html = self.templates.get_template(template_name).render(nav=[], user=None, banners=[], **context)
        return HTMLResponse(html, status_code=status)

    def presession_token(self, request: Request) -> tuple[str, str]:
        """(nonce for the sign-in cookie, CSRF token bound to it)."""
        nonce = request.cookies.get(PRESESSION_COOKIE) or secrets.token_urlsafe(18)
        return nonce, self.sessions.csrf_token(nonce)


def _close_later(client: ArmClient) -> None:
    task = asyncio.get_running_loop().create_task(client.close())
    _background.add(task)
    task.add_done_callback(_background.discard)


_background: set[Any] = set()


def read_flash(request: Request) -> dict[str, str] | None:
    """The one-time message `redirect` left for this page ({"kind", "text"}), if any."""
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    return {"kind": str(data.get("kind", "info")), "text": str(data.get("text", ""))}


def redirect(url: str, flash: tuple[str, str] | None = None, *, secure: bool = False) -> RedirectResponse:
    """303 to `url` (after a form), with an optional one-time message shown on the next page."""
    response = RedirectResponse(url, status_code=303)
    if flash:
        response.set_cookie(FLASH_COOKIE, json.dumps({"kind": flash[0], "text": flash[1]}), max_age=60,
                            path="/", httponly=True, samesite="strict", secure=secure)
    return response


def local_path(value: str | None, default: str) -> str:
    """`value` when it is a path on this site (never another origin), else `default`."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return default


def url_with(request: Request, **changes: str | None) -> str:
    """The current URL with some query parameters changed (None removes one)."""
    params = dict(request.query_params)
    for name, value in changes.items():
        if value is None or value == "":
            params.pop(name, None)
        else:
            params[name] = value
    query = urlencode(params)
    return f"{request.url.path}?{query}" if query else request.url.path


def rpc_message(exc: grpc.aio.AioRpcError) -> str:
    """A short sentence for a refused call, for a flash message."""
    return f"{exc.code().name.replace('_', ' ').capitalize()}: {exc.details() or 'no details'}"


RpcHandler = Callable[[Request], Awaitable[Response]]


# --- Template filters ----------------------------------------------------------------------------------


def _dt(value: Timestamp | datetime | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, Timestamp):
        if not value.seconds and not value.nanos:
            return None
        return value.ToDatetime(tzinfo=UTC)
    return value


def format_ts(value: Timestamp | datetime | None) -> str:
    dt = _dt(value)
    return dt.strftime("%Y-%m-%d %H:%M:%S UTC") if dt else "—"


def format_iso(value: Timestamp | datetime | None) -> str:
    dt = _dt(value)
    return dt.isoformat() if dt else ""


def format_ago(value: Timestamp | datetime | None) -> str:
    dt = _dt(value)
    if dt is None:
        return "never"
    seconds = int((datetime.now(UTC) - dt).total_seconds())
    future = seconds < 0
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            text = f"{seconds // size} {unit}"
            break
    else:
        text = f"{seconds} s"
    return f"in {text}" if future else f"{text} ago"


def enum_name(value: int, enum: Any) -> str:
    """`VERSION_STATE_APPROVED` → `APPROVED` for a proto enum wrapper and a number."""
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    prefix = _enum_prefix(enum)
    return name[len(prefix):] if name.startswith(prefix) else name


def _enum_prefix(enum: Any) -> str:
    names = [v.name for v in enum.DESCRIPTOR.values]
    first = names[0]
    return first[: first.rfind("_UNSPECIFIED") + 1] if "_UNSPECIFIED" in first else ""


def pretty_json(value: Message | Mapping[str, Any] | None) -> str:
    if value is None:
        return "{}"
    data = json_format.MessageToDict(value) if isinstance(value, Message) else value
    return json.dumps(_whole_numbers(data), indent=2, sort_keys=True, ensure_ascii=False)


def _whole_numbers(value: Any) -> Any:
    """Struct numbers are doubles: 4096.0 is shown as 4096."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def short_id(value: str, n: int = 12) -> str:
    return value if len(value) <= n else value[:n] + "…"


# --- Kill-switch banner --------------------------------------------------------------------------------


async def kill_switch_banners(page: Page) -> list[dict[str, str]]:
    """Every tenant or project control that is not NORMAL, for the banner on every page."""
    try:
        resp = await page.client.policies.ListOperatorControls(policy_pb2.ListOperatorControlsRequest(page_size=100))
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE,
                          grpc.StatusCode.DEADLINE_EXCEEDED):
            return []  # the banner is best effort; the page itself says what failed
        raise
    out = []
    names: dict[str, str] | None = None
    for control in resp.controls:
        if control.mode in (policy_pb2.OPERATOR_CONTROL_MODE_NORMAL, policy_pb2.OPERATOR_CONTROL_MODE_UNSPECIFIED):
            continue
        if control.scope == policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT:
            where = "The whole tenant"
        else:
            if names is None:
                names = await page.project_names()
            where = f"Project {names.get(control.scope_id, control.scope_id)}"
        out.append({"where": where, "mode": enum_name(control.mode, policy_pb2.OperatorControlMode),
                    "reason": control.reason})
    return out
