"""The web console against real services, driven by a real headless Chromium.

One console per backend for the run (in this event loop, on a free port), in front of the
session's registry and governance and a telemetry of its own; one browser per test session
(Playwright driving Debian's chromium at /usr/bin/chromium through its executable path: no
browser download; `make setup` / `make test` install the package); a fresh browser context (its
own cookies) per `ui` fixture. Every page's console errors and failed requests are collected, and
a test ends with none unless it says which it expects. Screenshots go to `.artifacts/console/`."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from arm_client.connection import Settings
from arm_console.config import ConsoleConfig
from arm_console.server import ConsoleServer
from tests.conftest import GovernanceServer, RegistryServer, new_database_spec
from tests.processes import ROOT
from tests.telemetry.conftest import TelemetryServer, start_telemetry, stop_telemetry

CHROMIUM = os.environ.get("ARM_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / ".artifacts" / "console"


@dataclass
class ConsoleStack:
    registry: RegistryServer
    governance: GovernanceServer
    telemetry: TelemetryServer
    server: ConsoleServer

    @property
    def url(self) -> str:
        return self.server.url


def console_config(registry: RegistryServer, governance: GovernanceServer, telemetry: TelemetryServer,
                   **env: str) -> ConsoleConfig:
    services = Settings(registry_address=registry.address, governance_address=governance.address,
                        telemetry_address=telemetry.address)
    return ConsoleConfig.from_env({"ARM_CONSOLE_LISTEN": "127.0.0.1:0",
                                   "ARM_CONSOLE_SESSION_SECRET": secrets.token_urlsafe(40), **env},
                                  services=services)


@pytest.fixture(scope="session")
async def console(registry: RegistryServer, governance: GovernanceServer,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ConsoleStack]:
    spec = new_database_spec(registry.backend, tmp_path_factory.mktemp(f"console-telemetry-{registry.backend}"),
                             "telemetry")
    telemetry = await start_telemetry(spec, registry, governance)
    server = ConsoleServer(console_config(registry, governance, telemetry))
    await server.start()
    try:
        yield ConsoleStack(registry, governance, telemetry, server)
    finally:
        await server.stop()
        await stop_telemetry(telemetry)


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make setup` installs Debian's chromium package (apt-get install chromium)")
    from playwright.async_api import async_playwright
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        await browser.close()


@dataclass
class Ui:
    """One browser context (one user's cookies) and its page, recording console errors."""

    context: Any
    page: Any
    base: str
    errors: list[str] = field(default_factory=list)
    allowed: list[re.Pattern[str]] = field(default_factory=list)

    async def goto(self, path: str) -> Any:
        return await self.page.goto(self.base + path)

    async def sign_in(self, key: str) -> None:
        await self.goto("/signin")
        await self.page.fill("#api_key", key)
        await self.page.click("button[type=submit]")
        await self.page.wait_for_load_state()
        assert "/signin" not in self.page.url, await self.page.content()

    async def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path

    def allow_errors(self, pattern: str) -> None:
        """Console errors matching `pattern` are expected (e.g. a 404 page's own status)."""
        self.allowed.append(re.compile(pattern))

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not any(p.search(e) for p in self.allowed)]


@pytest.fixture
async def ui(browser: Any, console: ConsoleStack) -> AsyncIterator[Ui]:
    ui = await new_ui(browser, console)
    try:
        yield ui
    finally:
        await ui.context.close()
    assert not ui.unexpected_errors(), f"browser console errors: {ui.unexpected_errors()}"


async def new_ui(browser: Any, console: ConsoleStack) -> Ui:
    context = await browser.new_context(viewport={"width": 1360, "height": 860})
    page = await context.new_page()
    ui = Ui(context, page, console.url)
    page.on("console", lambda msg: ui.errors.append(f"console {msg.type}: {msg.text}")
            if msg.type in ("error", "warning") else None)
    page.on("pageerror", lambda exc: ui.errors.append(f"page error: {exc}"))
    # A request the browser itself abandons when the page navigates away (ERR_ABORTED: a live
    # stream, an icon still loading) is not a failure of the console.
    page.on("requestfailed", lambda req: ui.errors.append(f"request failed: {req.url} {req.failure}")
            if "ERR_ABORTED" not in (req.failure or "") else None)
    return ui
