"""`arm events query|tail|stats|trace` and `arm backfill start|status --follow` against a real
telemetry (with registry and governance): events ingested through the API come out filtered, in
order, counted and followed live; the legacy back-fill is followed to COMPLETED; refusals print
the error block."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
from pathlib import Path

from arm.registry.v1 import compat_pb2
from arm.telemetry.v1 import events_pb2, telemetry_pb2
from tests.cli.conftest import Terminal, ok
from tests.conftest import GovernanceServer, TenantContext
from tests.helpers import operator_key
from tests.telemetry.conftest import TelemetryServer, ago, event
from tests.telemetry.conftest import telemetry as telemetry  # noqa: F401  (the fixture)

E = events_pb2


async def login(term: Terminal, tenant: TenantContext, governance: GovernanceServer, telemetry: TelemetryServer,
                key: str) -> None:
    ok(await term.arm("login", "--address", tenant.server.address, "--key", key,
                      "--governance-address", governance.address, "--telemetry-address", telemetry.address))


async def ingest(telemetry: TelemetryServer, key: str, events: list[events_pb2.OpEvent]) -> None:
    async with telemetry.client(key) as c:
        r = await c.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=events))
        assert r.accepted_count == len(events), r


async def test_query_stats_and_trace(terminal: Terminal, tenant: TenantContext, governance: GovernanceServer,
                                     telemetry: TelemetryServer) -> None:  # noqa: F811
    run = f"run-{secrets.token_hex(4)}"
    evs = [event(E.OP_EVENT_TYPE_RUN_STARTED, run_id=run, when=ago(seconds=30)),
           event(E.OP_EVENT_TYPE_TOOL_CALL_STARTED, run_id=run, tool_call_id="tc-1", when=ago(seconds=20),
                 payload={"tool": "payments.send"}),
           event(E.OP_EVENT_TYPE_TOOL_CALL_COMPLETED, run_id=run, tool_call_id="tc-1", when=ago(seconds=10)),
           event(E.OP_EVENT_TYPE_RUN_COMPLETED, run_id=run, when=ago(seconds=5)),
           event(E.OP_EVENT_TYPE_HEARTBEAT, when=ago(seconds=3))]
    await ingest(telemetry, tenant.admin_key, evs)
    await login(terminal, tenant, governance, telemetry, tenant.admin_key)

    got = json.loads(ok(await terminal.arm("events", "query", "--run", run, "-o", "json")).stdout)
    assert [e["event_id"] for e in got] == [e.event_id for e in reversed(evs[:4])]  # newest first
    tools = json.loads(ok(await terminal.arm("events", "query", "-t", "tool_call_started", "-t", "tool_call_completed",
                                             "--since", "1h", "-o", "json")).stdout)
    assert [e["event_id"] for e in tools] == [evs[2].event_id, evs[1].event_id]
    table = ok(await terminal.arm("events", "query", "--run", run, "--limit", "2")).stdout
    assert evs[3].event_id in table and evs[2].event_id in table and evs[1].event_id not in table

    stats = json.loads(ok(await terminal.arm("events", "stats", "--since", "1h", "-o", "json")).stdout)
    counts = {c["type"]: int(c["count"]) for c in stats["counts"]}
    assert counts["OP_EVENT_TYPE_TOOL_CALL_STARTED"] == 1 and counts["OP_EVENT_TYPE_HEARTBEAT"] == 1
    assert int(stats["total"]) == 5
    assert "TOOL_CALL_STARTED" in ok(await terminal.arm("events", "stats")).stdout

    trace = ok(await terminal.arm("events", "trace", run)).stdout
    positions = [trace.index(e.event_id) for e in evs[:4]]
    assert positions == sorted(positions) and evs[4].event_id not in trace
    assert "payments.send" in trace

    bad = await terminal.arm("events", "query", "--since", "yesterday-ish")
    assert bad.exit_code == 2
    unknown = await terminal.arm("events", "query", "-t", "nonsense")
    assert unknown.exit_code == 2
    _, no_roles = await operator_key(tenant.admin)
    stranger = Terminal(terminal.config.parent / "stranger.yaml")
    await login(stranger, tenant, governance, telemetry, no_roles)
    refused = await stranger.arm("events", "query")
    assert refused.exit_code == 1, refused.output
    assert "code:       PERMISSION_DENIED" in refused.stderr and "request id:" in refused.stderr


async def test_tail_follows_until_interrupted(terminal: Terminal, tenant: TenantContext,
                                              governance: GovernanceServer, telemetry: TelemetryServer,  # noqa: F811
                                              ) -> None:
    await login(terminal, tenant, governance, telemetry, tenant.admin_key)
    run = f"run-{secrets.token_hex(4)}"
    tail = terminal.spawn("events", "tail", "-o", "json")
    try:
        assert tail.stdout is not None
        first = asyncio.ensure_future(asyncio.to_thread(tail.stdout.readline))
        # The stream takes only events stored after it opened: send a warm-up event until one shows.
        while not first.done():
            await ingest(telemetry, tenant.admin_key, [event(E.OP_EVENT_TYPE_HEARTBEAT, run_id="warm-up")])
            await asyncio.wait([first], timeout=0.3)
        assert json.loads(first.result())["run_id"] == "warm-up"
        wanted = [event(E.OP_EVENT_TYPE_RUN_STARTED, run_id=run), event(E.OP_EVENT_TYPE_RUN_COMPLETED, run_id=run)]
        await ingest(telemetry, tenant.admin_key, wanted)
        seen: list[str] = []
        while len(seen) < 2:
            line = await asyncio.wait_for(asyncio.to_thread(tail.stdout.readline), 60)
            assert line, tail.stderr.read() if tail.stderr else ""
            item = json.loads(line)
            if item["run_id"] == run:
                seen.append(item["event_id"])
        assert seen == [e.event_id for e in wanted]
        tail.send_signal(signal.SIGINT)
        _, err = await asyncio.to_thread(tail.communicate, timeout=60)
        assert tail.returncode == 130, err
        assert "Traceback" not in err
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()

    # --count stops by itself (in-process): the stream is filtered by run.
    other = f"run-{secrets.token_hex(4)}"

    async def feed() -> None:
        while not counted.done():
            await ingest(telemetry, tenant.admin_key, [event(E.OP_EVENT_TYPE_RUN_STEP, run_id=other)])
            await asyncio.sleep(0.2)

    counted = asyncio.ensure_future(terminal.arm("events", "tail", "--run", other, "--count", "2"))
    await feed()
    lines = ok(counted.result()).stdout.splitlines()
    assert len(lines) == 2 and all(other in line for line in lines)


async def test_backfill_followed_to_completion(terminal: Terminal, tenant: TenantContext,
                                               governance: GovernanceServer, telemetry: TelemetryServer,  # noqa: F811
                                               tmp_path: Path) -> None:
    await login(terminal, tenant, governance, telemetry, tenant.admin_key)
    none_yet = await terminal.arm("backfill", "status")
    assert none_yet.exit_code == 1 and "code:       NOT_FOUND" in none_yet.stderr

    legacy = f"legacy-{secrets.token_hex(4)}"
    await ingest(telemetry, tenant.admin_key, [event(legacy_agent_id=legacy) for _ in range(25)])
    known = await tenant.admin.compat.EnsureInstanceForLegacyAgent(
        compat_pb2.EnsureInstanceForLegacyAgentRequest(legacy_agent_id=legacy, name=legacy))
    started = ok(await terminal.arm("backfill", "start", "--follow", "--interval", "0.05"))
    assert "back-fill" in started.stderr  # the progress bar
    assert "COMPLETED" in started.stdout and "updated" in started.stdout
    status = json.loads(ok(await terminal.arm("backfill", "status", "--follow", "-o", "json")).stdout)
    assert status["state"] == "BACKFILL_STATE_COMPLETED"
    assert int(status["processed_count"]) == 25 and int(status["updated_count"]) == 25
    async with telemetry.client(tenant.admin_key) as c:
        stored = (await c.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(page_size=100))).events
    assert {e.instance_id for e in stored} == {known.agent_instance.id}
    wrong = await terminal.arm("backfill", "status", "bf_nonexistent")
    assert wrong.exit_code == 1 and "code:" in wrong.stderr and "Traceback" not in wrong.output
