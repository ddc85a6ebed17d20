"""The console's ASGI application: sign-in and sign-out, the views, vendored static files,
security headers, cross-site post refusal, and gRPC errors turned into pages."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import grpc
from google.protobuf import duration_pb2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from arm.common.v1 import common_pb2
from arm.registry.v1 import access_pb2
from arm_console.config import ConsoleConfig
from arm_console.sessions import PRESESSION_COOKIE, PRESESSION_TTL_S, SESSION_COOKIE
from arm_console.views import VIEWS
from arm_console.web import (
    FLASH_COOKIE,
    PACKAGE_DIR,
    Console,
    NavItem,
    Refused,
    SignInRequired,
    local_path,
    read_flash,
    redirect,
    rpc_message,
)

log = logging.getLogger("arm_console")

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
REFUSALS = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ABORTED,
            grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.OUT_OF_RANGE}


class SecurityHeaders:
    """Adds the security headers to every response and refuses cross-site state-changing requests
    (a browser's `Sec-Fetch-Site: cross-site`, or an `Origin` that is not this console's) before
    any handler runs; CSRF tokens are checked on top of this by every form handler."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if request.method in UNSAFE_METHODS and not same_origin(request):
            response = PlainTextResponse("Cross-site request refused.", status_code=403)
            await response(scope, receive, self._with_headers(send))
            return
        await self.app(scope, receive, self._with_headers(send))

    @staticmethod
    def _with_headers(send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = {
                    b"content-security-policy": CSP.encode(),
                    b"x-content-type-options": b"nosniff",
                    b"x-frame-options": b"DENY",
                    b"referrer-policy": b"same-origin",
                    b"cross-origin-opener-policy": b"same-origin",
                }
                headers += [(k, v) for k, v in extra.items() if k not in names]
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)
        return wrapped


def same_origin(request: Request) -> bool:
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser's cross-site form (those always send Origin); CSRF tokens still apply
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


def create_app(config: ConsoleConfig) -> Starlette:
    nav = [NavItem(v.slug, v.title, v.path) for v in VIEWS]
    console = Console(config, nav)

    async def home(request: Request) -> Response:
        if console.session_of(request) is None:
            return RedirectResponse("/signin", status_code=303)
        return RedirectResponse(VIEWS[0].path, status_code=303)

    async def signin_page(request: Request, error: str = "", status: int = 200) -> Response:
        if console.session_of(request) is not None and not error:
            return RedirectResponse(local_path(request.query_params.get("next"), VIEWS[0].path), status_code=303)
        nonce, token = console.presession_token(request)
        flash = None if error else read_flash(request)
        notice = flash["text"] if flash and flash["kind"] == "info" else ""
        response = console.render_bare("common/signin.html", status=status, title="Sign in", csrf_token=token,
                                       error=error, notice=notice,
                                       next=local_path(request.query_params.get("next"), ""))
        if flash:
            response.delete_cookie(FLASH_COOKIE, path="/")
        response.set_cookie(PRESESSION_COOKIE, nonce, max_age=PRESESSION_TTL_S, path="/signin", httponly=True,
                            samesite="strict", secure=console.secure(request))
        return response

    async def signin(request: Request) -> Response:
        form = await request.form()
        token = form.get("csrf_token")
        nonce = request.cookies.get(PRESESSION_COOKIE, "")
        if not console.sessions.csrf_valid(token if isinstance(token, str) else None, nonce, PRESESSION_TTL_S):
            return await signin_page(request, "The sign-in form expired. Please try again.", 403)
        key = form.get("api_key")
        key = key.strip() if isinstance(key, str) else ""
        if not key:
            return await signin_page(request, "Enter an API key.", 400)
        client = console.client_with_key(key)
        try:
            principal = (await client.access.Authenticate(access_pb2.AuthenticateRequest())).principal
            if principal.actor.type != common_pb2.ACTOR_TYPE_OPERATOR:
                return await signin_page(request, "This is an agent's key. The console is for operators' keys.", 403)
            name = principal.actor.id
            with contextlib.suppress(grpc.aio.AioRpcError):  # a key without operators:read still signs in
                op = (await client.access.GetOperator(access_pb2.GetOperatorRequest(id=principal.actor.id))).operator
                name = op.name or op.email or name
            # The session holds a key of its own, made from the operator's and revoked at sign-out
            # (so on every replica, and with the operator's key), never the operator's key itself.
            ttl = duration_pb2.Duration()
            ttl.FromTimedelta(timedelta(seconds=config.session_ttl_s))
            session_key = (await client.access.CreateSessionKey(access_pb2.CreateSessionKeyRequest(
                ttl=ttl, display_name="web console session"))).secret
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                              grpc.StatusCode.INVALID_ARGUMENT):
                log.info("console sign-in refused: %s", exc.code().name)
                return await signin_page(request, "That key was not accepted (unknown, revoked, expired or its "
                                                  "tenant is inactive).", 401)
            log.warning("console sign-in failed: %s %s", exc.code().name, exc.details())
            return await signin_page(request, "The registry could not be reached. Try again shortly.", 503)
        finally:
            await client.close()
        session, cookie = console.sessions.new_session(session_key, principal.tenant_id, principal.actor.id, name)
        log.info("console sign-in: operator %s of tenant %s", principal.actor.id, principal.tenant_id)
        next_path = form.get("next")
        response = RedirectResponse(local_path(next_path if isinstance(next_path, str) else None, VIEWS[0].path),
                                    status_code=303)
        response.set_cookie(SESSION_COOKIE, cookie, max_age=int(config.session_ttl_s), path="/", httponly=True,
                            samesite="strict", secure=console.secure(request))
        response.delete_cookie(PRESESSION_COOKIE, path="/signin")
        return response

    async def signout(request: Request) -> Response:
        page = await console.page(request)
        await page.form()
        try:  # the session's key: refused from now on by every service, whichever replica is asked
            await console.client_for(page.session).access.RevokeCallerKey(access_pb2.RevokeCallerKeyRequest())
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED:  # else revoked or expired already
                log.warning("console sign-out could not revoke the session key: %s %s", exc.code().name,
                            exc.details())
        console.sessions.revoke(page.session)
        await console.drop_client(page.session.sid)
        response = redirect("/signin", ("info", "You are signed out."), secure=console.secure(request))
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    async def sign_in_required(request: Request, exc: Exception) -> Response:
        if request.method == "GET" and request.headers.get("accept", "").startswith("text/event-stream"):
            return PlainTextResponse("Sign in first.", status_code=401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        from urllib.parse import quote
        response = RedirectResponse(f"/signin?next={quote(target, safe='')}", status_code=303)
        if request.cookies.get(SESSION_COOKIE):
            response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        return await error_page(request, exc.status, "Refused", str(exc))

    async def rpc_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, grpc.aio.AioRpcError)
        code = exc.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            session = console.session_of(request)
            if session is not None:
                console.sessions.revoke(session)
                await console.drop_client(session.sid)
            return await sign_in_required(request, exc)
        if request.method == "POST" and code in REFUSALS:
            # A form the service refused (a stale etag, a step the lifecycle does not allow, …):
            # back to the page it came from, saying why.
            back = urlsplit(request.headers.get("referer", ""))
            origin_ok = not back.netloc or back.netloc == request.headers.get("host")
            target = local_path(back.path + (f"?{back.query}" if back.query else ""), "/") if origin_ok else "/"
            return redirect(target, ("error", rpc_message(exc)), secure=console.secure(request))
        if code == grpc.StatusCode.NOT_FOUND or (code == grpc.StatusCode.INVALID_ARGUMENT and request.method == "GET"):
            return await error_page(request, 404, "Not found",
                                    "Nothing with that id exists in your tenant. Check the link, or go back to the list.")
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return await error_page(request, 403, "Not allowed",
                                    f"Your key's roles do not allow this: {exc.details()}")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return await error_page(request, 503, "Service unavailable",
                                    "An ARM service did not answer. Try again shortly.")
        log.warning("console: %s on %s %s: %s", code.name, request.method, request.url.path, exc.details())
        return await error_page(request, 502, "The request failed", f"{code.name}: {exc.details()}")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return await error_page(request, 404, "Not found", "There is no page at this address.")
        return await error_page(request, exc.status_code, "Error", str(exc.detail))

    async def error_page(request: Request, status: int, title: str, message: str) -> Response:
        session = console.session_of(request)
        if session is None:
            if status == 404:
                return await sign_in_required(request, SignInRequired())
            return console.render_bare("common/error.html", status=status, title=title, message=message)
        try:
            page = await console.page(request)
            return await console.render(page, "common/error.html", active="", title=title, status=status,
                                        message=message)
        except grpc.aio.AioRpcError:
            return console.render_bare("common/error.html", status=status, title=title, message=message)

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await console.close()

    routes: list[Any] = [
        Route("/", home),
        Route("/signin", signin_page, methods=["GET"]),
        Route("/signin", signin, methods=["POST"]),
        Route("/signout", signout, methods=["POST"]),
        Route("/healthz", health),
        Mount("/static", StaticFiles(directory=PACKAGE_DIR / "static"), name="static"),
    ]
    for view in VIEWS:
        routes.extend(view.routes)
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        SignInRequired: sign_in_required, Refused: refused, grpc.aio.AioRpcError: rpc_error,
        HTTPException: http_error})
    app.state.console = console
    app.add_middleware(SecurityHeaders)
    return app


__all__ = ["create_app", "HTMLResponse"]
