"""Readiness for gRPC health checking: a component is ready while what it needs answers — its
database and, for the services that need one, a peer (governance and telemetry need the registry).

Health service names a Host reports (see server.Host):
- `""` (the whole server) and each hosted service name (`arm.registry.v1.AgentService`, ...):
  **readiness**. NOT_SERVING while a dependency is unreachable, SERVING again once it answers.
- `liveness`: SERVING as long as the process serves at all (NOT_SERVING only in a graceful
  shutdown). A liveness probe that restarted a process because its database is down would not
  bring the database back.

Two things drive readiness, neither on a call's path:
- the database's outage state (`Database.outage`): the first call that meets a dead database
  turns readiness NOT_SERVING at once, without waiting for the next probe;
- a periodic cheap probe every `ARM_HEALTH_PROBE_S` seconds (default 5): `SELECT 1` on the
  database, a health check (`""`) of the peer. A probe that succeeds ends the outage, so the
  service reports SERVING again without a call having to succeed first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from arm_common.db import Database
from arm_common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

LIVENESS = "liveness"
# A probe that has not answered in this time counts as failed.
PROBE_TIMEOUT_S = 3.0


class Probe(Protocol):
    """One dependency of a component's readiness."""

    what: str
    """Names the dependency in log lines."""

    def down_now(self) -> bool:
        """Whether the dependency is known to be down without asking it (no I/O)."""
        ...

    def on_change(self, wake: Callable[[], None]) -> None:
        """Registers `wake`, called when the dependency is seen going down or coming back."""
        ...

    async def check(self) -> bool:
        """Asks the dependency, cheaply; True if it answers."""
        ...


async def _select_one(session: AsyncSession) -> None:
    await session.execute(text("SELECT 1"))


class DatabaseProbe:
    """The component's database: down while its outage lasts; probed with `SELECT 1`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.what = db.outage.what

    def down_now(self) -> bool:
        return self.db.outage.down

    def on_change(self, wake: Callable[[], None]) -> None:
        self.db.outage.listeners.append(wake)

    async def check(self) -> bool:
        try:
            # read() notes the outage (or its end) on the database itself, logged once there.
            await asyncio.wait_for(self.db.read(_select_one), PROBE_TIMEOUT_S)
        except TimeoutError:
            return False
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; read() logged an outage
            log.debug("database probe failed: %s", exc)
            return False
        return True


class PeerProbe:
    """A service this one needs (e.g. the registry), asked through the standard health service
    on the channel the component already has to it."""

    def __init__(self, what: str, channel: Callable[[], grpc.aio.Channel | None]) -> None:
        self.what = what
        self._channel = channel
        self._down = False

    def down_now(self) -> bool:
        return self._down

    def on_change(self, wake: Callable[[], None]) -> None:
        pass  # known only by asking

    async def check(self) -> bool:
        channel = self._channel()
        if channel is None:
            return True
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT_S)
            self._down = reply.status != health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            self._down = True
        return not self._down


class Readiness:
    """A component's dependencies, probed every `interval_s` seconds and whenever one is seen to
    change; `watch` publishes True (ready) or False."""

    def __init__(self, probes: Sequence[Probe], interval_s: float) -> None:
        self.probes = list(probes)
        self.interval_s = interval_s
        self.ready = True
        self._wake = asyncio.Event()
        for probe in self.probes:
            probe.on_change(self._wake.set)

    async def evaluate(self) -> bool:
        results = await asyncio.gather(*(probe.check() for probe in self.probes))
        down = [probe.what for probe, ok in zip(self.probes, results, strict=True) if not ok]
        self._note(down)
        return not down

    def _note(self, down: list[str]) -> None:
        if down and self.ready:
            log.warning("not ready (health NOT_SERVING): %s unreachable", ", ".join(down))
        elif not down and not self.ready:
            log.info("ready again (health SERVING)")
        self.ready = not down

    async def watch(self, publish: Callable[[bool], Awaitable[None]]) -> None:
        """Publishes readiness until cancelled: at once when a dependency is seen going down,
        and after every probe."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            down = [probe.what for probe in self.probes if probe.down_now()]
            if down and self.ready:
                self._note(down)
                await publish(False)
            await publish(await self.evaluate())


class HealthPublisher:
    """Runs the readiness of each component of a Host and sets the health statuses: a
    component's own service names follow its readiness, `""` needs every component ready,
    `liveness` stays SERVING."""

    def __init__(self, servicer: object, parts: Sequence[tuple[Readiness | None, Sequence[str]]]) -> None:
        self.servicer = servicer
        self.parts = list(parts)
        self.ready = [True] * len(self.parts)
        self.status: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def _set(self, name: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        if self.status.get(name) != status:
            self.status[name] = status
            await self.servicer.set(name, status)  # type: ignore[attr-defined]

    async def _publish(self, index: int, ready: bool) -> None:
        self.ready[index] = ready
        for name in self.parts[index][1]:
            await self._set(name, ready)
        await self._set("", all(self.ready))

    async def start(self) -> None:
        """Sets every status from a first round of probes, then follows changes."""
        await self._set(LIVENESS, True)
        for index, (readiness, names) in enumerate(self.parts):
            if readiness is None:
                for name in names:
                    await self._set(name, True)
                continue
            self.ready[index] = await readiness.evaluate()
            for name in names:
                await self._set(name, self.ready[index])
        await self._set("", all(self.ready))
        for index, (readiness, _) in enumerate(self.parts):
            if readiness is not None:
                self._tasks.append(asyncio.create_task(
                    readiness.watch(lambda ready, i=index: self._publish(i, ready)),  # type: ignore[misc]
                    name="health-readiness"))

    async def stop(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)
        self._tasks.clear()
