"""A real HTTP receiver for webhook tests: a threaded http.server on 127.0.0.1, port 0. It records
every request (headers, body, the status it answered) and answers what `answer` says."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from arm_governance.webhooks.service import verify_signature


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]

    @property
    def delivery_id(self) -> str:
        return self.headers.get("x-arm-delivery", "")


@dataclass
class Receiver:
    answer: Callable[[Received], int] = lambda r: 200
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    def start(self) -> str:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("content-length") or 0)
                got = Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                               self.rfile.read(length), 0)
                got.status = receiver.answer(got)
                with receiver.lock:
                    receiver.received.append(got)
                self.send_response(got.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def snapshot(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def accepted(self) -> list[Received]:
        return [r for r in self.snapshot() if 200 <= r.status < 300]

    async def wait_for(self, check: Callable[[list[Received]], bool], limit_s: float = 30) -> list[Received]:
        """Waits (boundedly) until `check(all requests so far)` holds; returns them."""
        deadline = time.monotonic() + limit_s
        while True:
            got = self.snapshot()
            if check(got):
                return got
            seen = [(r.headers.get("x-arm-event"), r.status, r.json.get("approval", {}).get("approval_id"))
                    for r in got]
            assert time.monotonic() < deadline, f"the receiver never saw what was expected; it got {seen}"
            await asyncio.sleep(0.05)


def assert_signed(r: Received, secret: str) -> None:
    assert verify_signature(secret, r.headers["x-arm-signature"], r.body), "bad signature"
    body = r.json
    assert r.headers["x-arm-delivery"] == body["delivery_id"]
    assert r.headers["x-arm-event"] == body["type"]
    assert r.headers["content-type"] == "application/json"
