"""Telemetry as a real process, killed with SIGKILL while clients ingest and retry every batch
not acknowledged: afterwards the stored events are exactly the events sent — none lost, none
stored twice."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
from sqlalchemy import text

from arm.telemetry.v1 import telemetry_pb2
from arm_client import ArmClient
from arm_common.db import Database
from tests.conftest import RegistryServer, drop_schema, new_database_spec
from tests.processes import base_env, free_port, spawn, stop, wait_serving
from tests.telemetry.conftest import event


async def test_kill_9_during_ingest_loses_and_duplicates_nothing(registry: RegistryServer, tenant, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = new_database_spec(registry.backend, tmp_path, "telemetry")
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = base_env(ARM_TELEMETRY_LISTEN=address, ARM_REGISTRY_ADDRESS=registry.address,
                   ARM_SERVICE_API_KEY=registry.admin_key, **spec.env("telemetry"))
    log = tmp_path / "telemetry.log"
    assert spawn("arm_telemetry", "migrate", env=env, log=log).wait(60) == 0
    proc = spawn("arm_telemetry", env=env, log=log)
    await wait_serving(address, proc, log)
    sent: set[str] = set()
    acked = 0
    killed = asyncio.Event()
    restarted = asyncio.Event()

    async def producer(n: int, batches: int, stream: bool) -> None:
        nonlocal acked
        async with ArmClient(address, tenant.admin_key) as client:
            for b in range(batches):
                batch = [event(event_id=f"w{n}-b{b}-{i}", run_id=f"w{n}") for i in range(100)]
                sent.update(e.event_id for e in batch)
                while True:  # resend until acknowledged: dedupe makes that safe
                    try:
                        if stream:
                            async def one(batch=batch, b=b):  # type: ignore[no-untyped-def]
                                yield telemetry_pb2.StreamIngestEventsRequest(batch_id=f"b{b}", events=batch)
                            acks = [a async for a in client.telemetry.StreamIngestEvents(one(), timeout=10)]
                            assert [a.batch_id for a in acks] == [f"b{b}"]
                        else:
                            await client.telemetry.IngestEvents(
                                telemetry_pb2.IngestEventsRequest(events=batch), timeout=10)
                        acked += 1
                        break
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                              grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                                              grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), exc
                        if killed.is_set():
                            await restarted.wait()
                        await asyncio.sleep(0.05)

    workers = [asyncio.create_task(producer(n, 40, stream=n % 2 == 1)) for n in range(6)]
    try:
        deadline = time.monotonic() + 120
        while acked < 30:
            assert time.monotonic() < deadline and not all(w.done() for w in workers), log.read_text()[-3000:]
            await asyncio.sleep(0.01)
        killed.set()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert acked < 240, "the kill came after all batches were acknowledged"
        proc = spawn("arm_telemetry", env=env, log=log)
        await wait_serving(address, proc, log)
        restarted.set()
        await asyncio.wait_for(asyncio.gather(*workers), 300)
        db = Database(spec.url, schema=spec.schema)
        try:
            async with db.transaction() as s:
                stored = list((await s.execute(text("select event_id from events where tenant_id = :t"),
                                              {"t": tenant.tenant.id})).scalars())
        finally:
            await db.dispose()
        assert len(stored) == len(set(stored)), "an event was stored twice"
        assert set(stored) == sent, f"{len(sent - set(stored))} sent events are missing"
        assert len(sent) == 6 * 40 * 100
    finally:
        for w in workers:
            w.cancel()
        stop(proc)
        if spec.schema:
            await drop_schema(spec.schema)
