"""Runs and events through the SDK (issue 11 item 3), read back with telemetry's GetRunTrace:
each event once, in order, with durations; nested runs; cost ticks; telemetry down for a while
then back; a full queue counted and logged; the flush at interpreter exit."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from arm.telemetry.v1 import events_pb2 as ev
from arm_client import Arm, ToolDenied
from tests.client.conftest import Agent
from tests.conftest import RegistryServer, new_database_spec
from tests.processes import ROOT, base_env, free_port
from tests.telemetry.conftest import start_telemetry, stop_telemetry

T = ev.OpEventType


async def trace(agent: Agent, run_id: str, address: str | None = None) -> list[ev.OpEvent]:
    arm = Arm(env={**agent.env(), "ARM_API_KEY": agent.tenant.admin_key,
                   **({"ARM_TELEMETRY_ADDRESS": address} if address else {})})
    try:
        return await arm.run_trace(run_id)
    finally:
        await arm.close()


def sdk_events(events: list[ev.OpEvent], arm: Arm) -> list[ev.OpEvent]:
    """The events this Arm sent (governance's own DECISION_MADE etc. left out)."""
    return [e for e in events if e.event_id.startswith(arm._event_prefix)]


async def test_a_runs_events_arrive_once_each_in_order(agent: Agent) -> None:
    arm = agent.arm()

    @arm.governed(risk="LOW")
    async def search(q: str) -> str:
        return q

    @arm.governed(risk="LOW")
    async def broken() -> None:
        raise RuntimeError("disk full")

    @arm.governed(name="db.drop", risk="CRITICAL")
    async def drop() -> None: ...

    async with arm.run("triage", metadata={"ticket": "T-1"}) as run:
        await search("a")
        with pytest.raises(RuntimeError):
            await broken()
        with pytest.raises(ToolDenied):
            await drop()
        arm.report_cost(0.25, note="tokens")
        async with arm.run("sub-step") as inner:
            await search("b")
    assert await arm.flush()
    assert arm.events_dropped == 0

    events = sdk_events(await trace(agent, run.run_id), arm)
    assert [T.Name(e.type) for e in events] == [
        "OP_EVENT_TYPE_RUN_STARTED", "OP_EVENT_TYPE_TOOL_CALL_STARTED", "OP_EVENT_TYPE_TOOL_CALL_COMPLETED",
        "OP_EVENT_TYPE_TOOL_CALL_STARTED", "OP_EVENT_TYPE_TOOL_CALL_FAILED", "OP_EVENT_TYPE_COST_TICK",
        "OP_EVENT_TYPE_RUN_COMPLETED"]
    assert len({e.event_id for e in events}) == len(events)
    assert all(e.instance_id == agent.instance_id and e.run_id == run.run_id for e in events)
    started = events[0].payload
    assert started["name"] == "triage" and started["metadata"]["ticket"] == "T-1"
    completed, failed = events[2].payload, events[4].payload
    assert completed["tool_name"] == "search" and completed["duration_ms"] >= 0
    assert failed["error_type"] == "RuntimeError" and failed["error"] == "disk full"
    assert events[1].tool_call_id == events[2].tool_call_id and events[1].payload["decision_id"]
    assert events[5].payload["amount_usd"] == 0.25
    assert events[6].payload["duration_ms"] >= 0

    inner_events = sdk_events(await trace(agent, inner.run_id), arm)
    assert [T.Name(e.type) for e in inner_events] == [
        "OP_EVENT_TYPE_RUN_STARTED", "OP_EVENT_TYPE_TOOL_CALL_STARTED", "OP_EVENT_TYPE_TOOL_CALL_COMPLETED",
        "OP_EVENT_TYPE_RUN_COMPLETED"]
    assert inner_events[0].payload["parent_run_id"] == run.run_id


async def test_a_failed_run_and_concurrent_runs_stay_apart(agent: Agent) -> None:
    arm = agent.arm()

    @arm.governed(risk="LOW")
    async def step(n: int) -> int:
        await asyncio.sleep(0)
        return n

    async def one(name: str) -> str:
        async with arm.run(name) as run:
            for n in range(3):
                await step(n)
        return run.run_id

    runs = await asyncio.gather(*(one(f"r{i}") for i in range(4)))
    with pytest.raises(ValueError):
        async with arm.run("doomed") as doomed:
            raise ValueError("bad plan")
    assert await arm.flush()
    for run_id in runs:
        events = sdk_events(await trace(agent, run_id), arm)
        assert [e.type for e in events] == [T.Value("OP_EVENT_TYPE_RUN_STARTED")] + [
            T.Value("OP_EVENT_TYPE_TOOL_CALL_STARTED"), T.Value("OP_EVENT_TYPE_TOOL_CALL_COMPLETED")] * 3 + [
            T.Value("OP_EVENT_TYPE_RUN_COMPLETED")]
    failed = sdk_events(await trace(agent, doomed.run_id), arm)
    assert [T.Name(e.type) for e in failed] == ["OP_EVENT_TYPE_RUN_STARTED", "OP_EVENT_TYPE_RUN_FAILED"]
    assert failed[1].payload["error_type"] == "ValueError"


async def test_events_given_one_id_are_stored_once(agent: Agent) -> None:
    """`emit(event_id=...)`: two reports of one outcome under one id (the gateway's
    TOOL_CALL_BLOCKED of a DENY and the one governance derives from the logged decision) are
    one event in telemetry."""
    arm = agent.arm()
    blocked = T.Value("OP_EVENT_TYPE_TOOL_CALL_BLOCKED")
    try:
        async with arm.run("one id") as run:
            given = f"evt-once-{run.run_id}"
            first = arm.emit(blocked, payload={"report": 1}, event_id=given)
            second = arm.emit(blocked, payload={"report": 2}, event_id=given)
            other = arm.emit(blocked, payload={"report": 3})
        assert first == second == given != other
        assert await arm.flush()
        events = [e for e in await trace(agent, run.run_id) if e.type == blocked]
        assert sorted(e.event_id for e in events) == sorted([given, other])
    finally:
        await arm.close()


async def test_telemetry_down_for_a_while_then_back(agent: Agent, registry: RegistryServer,
                                                    tmp_path: Path) -> None:
    port = free_port()
    spec = new_database_spec(registry.backend, tmp_path, "telemetry")
    env = {"ARM_TELEMETRY_LISTEN": f"127.0.0.1:{port}"}
    server = await start_telemetry(spec, registry, None, env)
    address = server.address
    arm = Arm(env={**agent.env(), "ARM_TELEMETRY_ADDRESS": address}, timeout_s=2)
    try:
        async with arm.run("through an outage") as run:
            arm.emit(T.Value("OP_EVENT_TYPE_RUN_STEP"), payload={"step": 1})
            assert await arm.flush()
            await stop_telemetry(server, drop=False)
            for step in range(2, 7):
                arm.emit(T.Value("OP_EVENT_TYPE_RUN_STEP"), payload={"step": step})
            while arm._sender.failed_attempts < 2:  # it tried, and failed, at least twice
                await asyncio.sleep(0.02)
            server = await start_telemetry(spec, registry, None, env, migrate=False)
            arm.emit(T.Value("OP_EVENT_TYPE_RUN_STEP"), payload={"step": 7})
        assert await arm.flush(30)
        assert arm.events_dropped == 0
        events = sdk_events(await trace(agent, run.run_id, address), arm)
        steps = [int(e.payload["step"]) for e in events if e.type == T.Value("OP_EVENT_TYPE_RUN_STEP")]
        assert steps == list(range(1, 8))
        assert [e.type for e in events][0] == T.Value("OP_EVENT_TYPE_RUN_STARTED")
        assert events[-1].type == T.Value("OP_EVENT_TYPE_RUN_COMPLETED")
        assert len({e.event_id for e in events}) == len(events) == 9
    finally:
        await arm.close()
        await stop_telemetry(server)


async def test_a_full_queue_is_counted_and_logged(agent: Agent, caplog: pytest.LogCaptureFixture) -> None:
    arm = Arm(env={**agent.env(), "ARM_TELEMETRY_ADDRESS": f"127.0.0.1:{free_port()}"}, event_queue_size=5,
              close_timeout_s=0.2, timeout_s=0.5)
    with caplog.at_level(logging.WARNING, logger="arm_client.events"):
        ids = [arm.emit(T.Value("OP_EVENT_TYPE_HEARTBEAT")) for _ in range(8)]
    assert len(set(ids)) == 8
    assert arm.events_dropped == 3
    assert any("event queue is full" in r.getMessage() for r in caplog.records)
    await arm.close()  # telemetry unreachable: what was kept is counted too
    assert arm.events_dropped == 8


async def test_events_are_flushed_at_interpreter_exit(agent: Agent, tmp_path: Path) -> None:
    """A script that never closes its Arm: the atexit hook sends what is queued."""
    script = tmp_path / "agent.py"
    script.write_text(
        "import sys\n"
        "from arm_client import Arm\n"
        "arm = Arm()\n"
        "with arm.run('short-lived', run_id=sys.argv[1]):\n"
        "    arm.report_cost(0.5)\n"
        "print(arm._event_prefix)\n")
    run_id = "run-exit-" + tmp_path.name[-8:]
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), run_id, env=base_env(**agent.env()),
                                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    prefix = out.decode().strip()
    events = [e for e in await trace(agent, run_id) if e.event_id.startswith(prefix)]
    assert [T.Name(e.type) for e in events] == ["OP_EVENT_TYPE_RUN_STARTED", "OP_EVENT_TYPE_COST_TICK",
                                                "OP_EVENT_TYPE_RUN_COMPLETED"], err.decode()


async def test_overload_is_retried_after_the_servers_delay(agent: Agent, registry: RegistryServer,
                                                           tmp_path: Path) -> None:
    """Telemetry answers RESOURCE_EXHAUSTED with a RetryInfo delay while saturated (its limit set
    below the batch); the batch is resent until it is taken, and stored once."""
    server = await start_telemetry(new_database_spec(registry.backend, tmp_path, "telemetry"), registry)
    arm = Arm(env={**agent.env(), "ARM_TELEMETRY_ADDRESS": server.address}, event_batch_size=10)
    server.component.writer.max_pending = 2
    try:
        async with arm.run("under load") as run:
            for n in range(5):
                arm.emit(T.Value("OP_EVENT_TYPE_RUN_STEP"), payload={"step": n})
        while arm._sender.failed_attempts < 2:
            await asyncio.sleep(0.02)
        err = arm._sender.last_error
        assert err is not None and err.reason == "INGEST_SATURATED" and err.retry_delay_s == 0.5
        server.component.writer.max_pending = 50_000
        assert await arm.flush(30)
        events = sdk_events(await trace(agent, run.run_id, server.address), arm)
        assert [int(e.payload["step"]) for e in events if e.type == T.Value("OP_EVENT_TYPE_RUN_STEP")] == [
            0, 1, 2, 3, 4]
        assert len(events) == 7 and arm.events_dropped == 0
    finally:
        await arm.close()
        await stop_telemetry(server)
