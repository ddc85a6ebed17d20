"""A console view: its slug (URL prefix, template folder, nav entry), title and routes."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.routing import BaseRoute


@dataclass(frozen=True)
class View:
    slug: str
    """URL prefix `/<slug>` and template folder `templates/<slug>/`."""
    title: str
    """The nav label and page title."""
    routes: list[BaseRoute] = field(default_factory=list)
    """The view's routes, paths starting with `/<slug>`."""
    summary: str = ""
    """What the view is for (shown on its not-built page)."""
    built: bool = True

    @property
    def path(self) -> str:
        return f"/{self.slug}"
