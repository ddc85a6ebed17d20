"""Telemetry in a real browser: events ingested through the gRPC API listed and filtered (type,
instance, run, time), a run's trace as a timeline with its decisions, and the live tail showing an
event ingested while the page is open (server-sent events from TailEvents). Another tenant's run
is not found."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import struct_pb2

from arm.telemetry.v1 import events_pb2, telemetry_pb2
from arm_client import ArmClient
from tests.conftest import TenantContext, make_tenant
from tests.console.conftest import ConsoleStack, Ui
from tests.console.view_helpers import active_agent, api, assert_not_found

T = events_pb2


def event(type_: int, when: datetime, payload: dict[str, Any] | None = None, **fields: str) -> events_pb2.OpEvent:
    ev = events_pb2.OpEvent(event_id=f"e-{secrets.token_hex(8)}", type=type_, **fields)  # type: ignore[arg-type]
    ev.occur_time.FromDatetime(when)
    if payload is not None:
        s = struct_pb2.Struct()
        s.update(payload)
        ev.payload.CopyFrom(s)
    return ev


async def ingest(client: ArmClient, events: list[events_pb2.OpEvent]) -> None:
    resp = await client.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=events))
    assert not resp.rejected, resp.rejected


async def test_telemetry_events_trace_and_live_tail(ui: Ui, tenant: TenantContext, console: ConsoleStack,
                                                    system_admin) -> None:  # type: ignore[no-untyped-def]
    client = api(console, tenant.admin_key)
    agent = await active_agent(client)
    run = f"run-{secrets.token_hex(4)}"
    start = datetime.now(UTC) - timedelta(minutes=5)
    at = {"instance_id": agent.instance.id, "run_id": run}
    evs = [event(T.OP_EVENT_TYPE_RUN_STARTED, start, {"goal": "refund order 42"}, **at),
           event(T.OP_EVENT_TYPE_DECISION_MADE, start + timedelta(seconds=1),
                 {"decision_id": "dec_1", "decision": "DECISION_ALLOW", "tool_name": "orders.read"},
                 tool_call_id="tc-1", **at),
           event(T.OP_EVENT_TYPE_TOOL_CALL_COMPLETED, start + timedelta(seconds=2), tool_call_id="tc-1", **at),
           event(T.OP_EVENT_TYPE_TOOL_CALL_BLOCKED, start + timedelta(seconds=3),
                 {"decision_id": "dec_2", "decision": "DECISION_DENY", "tool_name": "payments.refund"},
                 tool_call_id="tc-2", **at),
           event(T.OP_EVENT_TYPE_RUN_FAILED, start + timedelta(seconds=4), {"error": "refund denied"}, **at)]
    other_run = event(T.OP_EVENT_TYPE_HEARTBEAT, start, legacy_agent_id="someone-else")
    await ingest(client, [*evs, other_run])

    await ui.sign_in(tenant.admin_key)
    await ui.goto("/telemetry")
    table = ui.page.get_by_test_id("events")
    await table.get_by_text("TOOL CALL BLOCKED").wait_for()
    assert await table.locator("tbody tr").count() == 6
    await ui.screenshot("telemetry-events")

    # Filters: type, then instance (by its legacy id) and run, then a time window before them.
    await ui.page.select_option("select[name=type]", "TOOL_CALL_BLOCKED")
    await ui.page.get_by_role("button", name="Filter").click()
    await ui.page.wait_for_url("**type=TOOL_CALL_BLOCKED**")
    assert await ui.page.get_by_test_id("events").locator("tbody tr").count() == 1
    await ui.goto(f"/telemetry?instance={agent.legacy_id}&run={run}")
    assert await ui.page.get_by_test_id("events").locator("tbody tr").count() == 5
    until = (start - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M")
    await ui.goto(f"/telemetry?run={run}&until={until}")
    assert "No events match these filters" in await ui.page.inner_text("main")

    # An event's drawer, and from it the run's trace: a timeline with its two decisions.
    await ui.goto(f"/telemetry?run={run}&type=RUN_STARTED")
    await ui.page.get_by_test_id("events").locator("tbody tr a").first.click()
    drawer = ui.page.get_by_test_id("drawer")
    assert "refund order 42" in await drawer.inner_text()
    await drawer.get_by_role("link", name="The run's trace").click()
    timeline = ui.page.get_by_test_id("timeline")
    await timeline.wait_for()
    items = await timeline.locator("li").all_inner_texts()
    assert len(items) == 5 and "RUN STARTED" in items[0] and "RUN FAILED" in items[-1]
    assert "ALLOW" in items[1] and "orders.read" in items[1]
    assert "DENY" in items[3] and "payments.refund" in items[3]
    assert "1 allowed, 1 denied" in await ui.page.inner_text("main")
    await ui.screenshot("telemetry-run-trace")

    # The live tail: an event ingested while the page is open appears without a reload.
    await ui.goto(f"/telemetry/tail?run={run}")
    await ui.page.locator("[data-tail-ready=yes]").wait_for()
    live = event(T.OP_EVENT_TYPE_TOOL_CALL_STARTED, datetime.now(UTC), {"tool_name": "mail.send"},
                 tool_call_id="tc-3", **at)
    elsewhere = event(T.OP_EVENT_TYPE_TOOL_CALL_STARTED, datetime.now(UTC), run_id="another-run",
                      instance_id=agent.instance.id)
    await ingest(client, [elsewhere, live])
    row = ui.page.locator(f"[data-event-id='{live.event_id}']")
    await row.wait_for()
    assert "mail.send" in await row.inner_text()
    assert await ui.page.get_by_test_id("tail").locator("tbody tr").count() == 1  # the other run's is filtered out
    assert "Live" in await ui.page.get_by_test_id("tail-status").inner_text()
    await ui.screenshot("telemetry-live-tail")

    # Another tenant's run is not found.
    other = await make_tenant(console.registry, system_admin)
    other_client = api(console, other.admin_key)
    try:
        their_run = f"run-{secrets.token_hex(4)}"
        await ingest(other_client, [event(T.OP_EVENT_TYPE_RUN_STARTED, start, legacy_agent_id="theirs",
                                          run_id=their_run)])
        await assert_not_found(ui, f"/telemetry/runs/{their_run}")
    finally:
        await other_client.close()
        await other.admin.close()
        await client.close()


async def test_telemetry_empty_state_says_what_to_do(ui: Ui, tenant: TenantContext) -> None:
    await ui.sign_in(tenant.admin_key)
    await ui.goto("/telemetry")
    assert "IngestEvents" in await ui.page.inner_text("main")
