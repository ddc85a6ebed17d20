"""The honest page of a view that is not built yet."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from arm_console.view import View


def not_built(slug: str, title: str, summary: str) -> View:
    """A view whose page says it is not built yet (HTTP 501), in the layout and the nav."""

    async def page(request: Request) -> Response:
        console = request.app.state.console
        p = await console.page(request)
        return await console.render(p, "common/not_built.html", active=slug, title=title, status=501,
                                    summary=summary)

    return View(slug=slug, title=title, summary=summary, built=False,
                routes=[Route(f"/{slug}", page), Route(f"/{slug}/{{rest:path}}", page)])
