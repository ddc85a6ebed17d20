"""opEvents derived from the decision log across a governance crash: governance as a real process
sending opEvents to telemetry, killed with SIGKILL in the middle of a burst of concurrent Checks
(some batches' opEvents delivered, some committed but not yet relayed, maybe one delivered but
not marked), then restarted. Telemetry ends with exactly one opEvent per logged decision: none
lost, none twice, none for a decision that was not logged; every answered decision is logged."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
from sqlalchemy import func, select

from arm.governance.v1 import decision_pb2
from arm.telemetry.v1 import events_pb2, telemetry_pb2
from arm_client import ArmClient
from arm_common.db import open_database
from arm_common.outbox import TOPIC_OP_EVENT
from arm_governance import models
from arm_governance.models import OUTBOX
from tests.conftest import RegistryServer, TenantContext, drop_schema, new_database_spec
from tests.governance.test_processes import active_instance, governance_env
from tests.processes import free_port, spawn, stop, wait_serving
from tests.telemetry.conftest import TelemetryServer

T = events_pb2
TOOLS = ("fs.read", "web.search", "db.write", "shell.exec")


async def telemetry_decision_events(c: ArmClient, instance_id: str) -> list[events_pb2.OpEvent]:
    filt = telemetry_pb2.EventFilter(instance_id=instance_id, types=[
        T.OP_EVENT_TYPE_DECISION_MADE, T.OP_EVENT_TYPE_TOOL_CALL_BLOCKED])
    events: list[events_pb2.OpEvent] = []
    token = ""
    while True:
        page = await c.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(
            filter=filt, page_size=500, page_token=token))
        events.extend(page.events)
        token = page.next_page_token
        if not token:
            return events


async def test_every_logged_decision_reaches_telemetry_once_after_kill_9(
        registry: RegistryServer, telemetry: TelemetryServer, tenant: TenantContext, tmp_path: Path) -> None:
    spec = new_database_spec(registry.backend, tmp_path, "governance")
    port = free_port()
    env = governance_env(spec, port, registry)
    env.update(ARM_TELEMETRY_ADDRESS=telemetry.address, ARM_OUTBOX_POLL_S="0.05")
    log = tmp_path / "gov.log"
    assert spawn("arm_governance", "migrate", env=env, log=log).wait(60) == 0
    proc = spawn("arm_governance", env=env, log=log)
    client = ArmClient(f"127.0.0.1:{port}", tenant.admin_key)
    db = open_database(spec.url, spec.schema)
    answered: list[str] = []
    try:
        await wait_serving(f"127.0.0.1:{port}", proc, log)
        instance_id = await active_instance(tenant.admin)

        async def caller(n: int) -> None:
            i = 0
            while True:
                i += 1
                try:
                    resp = await client.decisions.Check(decision_pb2.CheckRequest(
                        instance_id=instance_id, tool_name=TOOLS[(n + i) % len(TOOLS)], run_id=f"run-{n}"),
                        timeout=10)
                except grpc.aio.AioRpcError:
                    return  # governance is gone
                answered.append(resp.decision_id)

        callers = [asyncio.create_task(caller(n)) for n in range(16)]
        # Kill in the middle of the burst: decisions committing, their opEvents being relayed.
        while len(answered) < 150:
            await asyncio.sleep(0.005)
        stop(proc, signal.SIGKILL)
        await asyncio.gather(*callers)
        before_restart = len(answered)

        proc = spawn("arm_governance", env=env, log=log)
        await wait_serving(f"127.0.0.1:{port}", proc, log)
        await client.close()
        client = ArmClient(f"127.0.0.1:{port}", tenant.admin_key)
        for tool in TOOLS:  # and it keeps deciding
            for attempt in range(100):
                # gRPC may hand the fresh channel the killed process's subchannel, still in
                # reconnect backoff: UNAVAILABLE, retried within a bound.
                try:
                    answered.append((await client.decisions.Check(decision_pb2.CheckRequest(
                        instance_id=instance_id, tool_name=tool), timeout=10)).decision_id)
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == 99:
                        raise
                    await asyncio.sleep(0.1)

        async def logged_ids(s):  # type: ignore[no-untyped-def]
            d = models.DecisionRecord
            return set((await s.execute(select(d.id).where(d.instance_id == instance_id))).scalars())

        async def undelivered(s):  # type: ignore[no-untyped-def]
            return (await s.execute(select(func.count()).select_from(OUTBOX).where(
                OUTBOX.c.topic == TOPIC_OP_EVENT, OUTBOX.c.delivered_at.is_(None)))).scalar_one()

        logged = await db.read(logged_ids)
        assert set(answered) <= logged and len(answered) > before_restart
        for _ in range(600):
            if await db.read(undelivered) == 0:
                break
            await asyncio.sleep(0.05)
        assert await db.read(undelivered) == 0
        async with ArmClient(telemetry.address, tenant.admin_key) as c:
            events = await telemetry_decision_events(c, instance_id)
        ids = [e.event_id for e in events]
        assert len(ids) == len(set(ids)), "an opEvent reached telemetry twice"
        assert set(ids) == {f"evt-{i}" for i in logged}
        for e in events:
            assert e.payload["decision_id"] == e.event_id.removeprefix("evt-") and e.instance_id == instance_id
    finally:
        await client.close()
        stop(proc)
        await db.dispose()
        if spec.schema:
            await drop_schema(spec.schema)
