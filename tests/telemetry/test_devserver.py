"""The all-in-one dev server hosts telemetry too, and its governance feeds it opEvents."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from arm.governance.v1 import decision_pb2
from arm.telemetry.v1 import events_pb2, telemetry_pb2
from arm_client import ArmClient
from tests.processes import base_env, free_port, spawn, stop, wait_serving
from tests.telemetry.test_services import active_instance


async def test_dev_server_hosts_telemetry_fed_by_governance(tmp_path: Path) -> None:
    data = tmp_path / "arm-data"
    log = tmp_path / "dev.log"
    address = f"127.0.0.1:{free_port()}"
    proc = spawn("arm_allinone", env=base_env(ARM_DATA_DIR=str(data), ARM_LISTEN=address,
                                              ARM_OUTBOX_POLL_S="0.05"), log=log)
    try:
        await wait_serving(address, proc, log)
        assert (data / "telemetry.db").exists()
        key = (data / "dev-admin-key").read_text().strip()
        async with ArmClient(address, key) as client:
            inst = await active_instance(client)
            resp = await client.decisions.Check(decision_pb2.CheckRequest(instance_id=inst.id, tool_name="fs.read",
                                                                          run_id="dev-run"))
            filt = telemetry_pb2.EventFilter(run_id="dev-run")
            events: list[events_pb2.OpEvent] = []
            for _ in range(200):
                events = list((await client.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(filter=filt))).events)
                if events:
                    break
                await asyncio.sleep(0.05)
            assert [(e.type, e.instance_id, e.version_id, e.payload["decision_id"]) for e in events] == [
                (events_pb2.OP_EVENT_TYPE_DECISION_MADE, inst.id, inst.version_id, resp.decision_id)]
        assert stop(proc) == 0, log.read_text()
    finally:
        stop(proc, signal.SIGKILL)
