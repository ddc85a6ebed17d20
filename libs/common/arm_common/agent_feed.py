"""Following the registry's agent change feed (`CompatService.WatchAgentChanges`) with the
service key: each change is handed to the owner's cache as it arrives; the feed is `live` once the
registry's RESET (sent first on every connection) has arrived; when the stream breaks the owner is
told (its cache can no longer be trusted beyond its own fallback) and the feed reconnects with
backoff (0.2 s doubling to 5 s). Used by governance's agent directory and by the remote
authenticator of governance and telemetry."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from arm.registry.v1 import compat_pb2, compat_pb2_grpc
from arm_common.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class AgentChangeFeed:
    def __init__(self, stub: compat_pb2_grpc.CompatServiceStub, *, apply: Callable[[compat_pb2.AgentChange], object],
                 on_lost: Callable[[], object], lost_message: str, task_name: str) -> None:
        """`apply(change)` for every change; `on_lost()` after the stream broke, before
        reconnecting; `lost_message` is logged (a warning, with the status code) at each break."""
        self.stub = stub
        self.apply = apply
        self.on_lost = on_lost
        self.lost_message = lost_message
        self.task_name = task_name
        self.live = False
        self._live_event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, service_key: str) -> None:
        self._task = asyncio.create_task(self._follow(service_key), name=self.task_name)

    async def stop(self) -> None:
        self.live = False
        await cancel_and_wait(self._task)
        self._task = None

    async def wait_live(self, timeout_s: float = 10) -> bool:
        """Waits until the feed is connected (at most `timeout_s`); whether it is."""
        try:
            await asyncio.wait_for(self._live_event.wait(), timeout_s)
        except TimeoutError:
            pass
        return self.live

    async def _follow(self, service_key: str) -> None:
        delay = 0.2
        while True:
            try:
                stream = self.stub.WatchAgentChanges(
                    compat_pb2.WatchAgentChangesRequest(),
                    metadata=(("authorization", f"Bearer {service_key}"),))
                async for msg in stream:
                    self.apply(msg.change)
                    if msg.change.kind == compat_pb2.AGENT_CHANGE_KIND_RESET:
                        self.live = True
                        self._live_event.set()
                        delay = 0.2
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.warning("%s (%s)", self.lost_message, exc.code().name)
            self.live = False
            self._live_event.clear()
            self.on_lost()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
