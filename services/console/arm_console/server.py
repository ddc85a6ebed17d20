"""Serving the console with uvicorn, standalone (`python -m arm_console`) or beside the all-in-one
gRPC server in the same event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

from arm_common.config import ConfigError
from arm_console.app import create_app
from arm_console.config import ConsoleConfig

log = logging.getLogger("arm_console")


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: the process owns SIGTERM/SIGINT (the all-in-one
    host's graceful stop, or `python -m arm_console`'s) and stops the console itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ConsoleServer:
    """A started console: `url` is where it serves (the real port when the configured one is 0)."""

    def __init__(self, config: ConsoleConfig) -> None:
        self.config = config
        self.app = create_app(config)
        host, _, port = config.listen.rpartition(":")
        self._host = host.strip("[]")
        self._sock = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((self._host, int(port)))
        except OSError as exc:
            self._sock.close()
            raise ConfigError(f"ARM_CONSOLE_LISTEN: cannot listen on {config.listen} ({exc.strerror})") from None
        self.port = int(self._sock.getsockname()[1])
        scheme = "https" if config.serves_tls else "http"
        shown = f"[{self._host}]" if ":" in self._host else self._host
        self.url = f"{scheme}://{shown}:{self.port}"
        self._server = _Server(uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="on", proxy_headers=False,
            ssl_certfile=config.tls_cert_file, ssl_keyfile=config.tls_key_file, timeout_graceful_shutdown=5))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the console stopped while starting")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._sock.close()
