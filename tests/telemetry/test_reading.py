"""Reading: pages stay stable while events are ingested, TailEvents delivers new matching events
live and in order and resumes from a cursor, stats count by type, run traces carry decisions."""

from __future__ import annotations

import asyncio
import secrets

from arm.registry.v1 import tenancy_pb2
from arm.telemetry.v1 import events_pb2, telemetry_pb2
from tests.telemetry.conftest import ago, event
from tests.telemetry.test_ingest import stored_ids

T = events_pb2


async def ingest(client, events) -> telemetry_pb2.IngestEventsResponse:  # type: ignore[no-untyped-def]
    resp = await client.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=events))
    assert not resp.rejected, resp.rejected
    return resp


async def test_pages_are_stable_under_concurrent_ingest(telemetry, tenant) -> None:  # type: ignore[no-untyped-def]
    client = telemetry.client(tenant.admin_key)
    project = (await tenant.admin.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
        slug=f"p-{secrets.token_hex(4)}", name="Paged"))).project.id
    # Same-second timestamps on purpose: ties are broken by event_id.
    before = [event(project_id=project, when=ago(minutes=i % 7)) for i in range(230)]
    await ingest(client, before)
    stop = asyncio.Event()

    async def keep_ingesting() -> int:
        n = 0
        while not stop.is_set():
            # New events everywhere in time: newer, older, and in the middle of the pages.
            await ingest(client, [event(project_id=project, when=ago(minutes=m, seconds=n)) for m in (0, 3, 10)])
            n += 1
        return n

    writer: asyncio.Task[int] | None = None
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        resp = await client.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(
            page_size=17, page_token=token, filter=telemetry_pb2.EventFilter(project_id=project)))
        seen += [e.event_id for e in resp.events]
        keys = [(e.occur_time.ToNanoseconds(), e.event_id) for e in resp.events]
        assert keys == sorted(keys, reverse=True), "newest first"
        pages += 1
        if writer is None:  # from the second page on, events are ingested while paging
            writer = asyncio.create_task(keep_ingesting())
        await asyncio.sleep(0.01)  # let ingest happen between pages
        token = resp.next_page_token
        if not token:
            break
    stop.set()
    assert writer is not None
    extra = await writer
    assert extra > 0 and pages > 10
    assert len(seen) == len(set(seen)), "an event was repeated across pages"
    assert set(seen) == {e.event_id for e in before}, "an event was skipped (or one ingested later slipped in)"


async def test_tail_delivers_new_matching_events_in_order_and_resumes(telemetry, tenant) -> None:  # type: ignore[no-untyped-def]
    client = telemetry.client(tenant.admin_key)
    run = f"run-{secrets.token_hex(4)}"
    await ingest(client, [event(T.OP_EVENT_TYPE_RUN_STEP, run_id=run)])  # before the tail: not sent
    filt = telemetry_pb2.EventFilter(run_id=run, types=[T.OP_EVENT_TYPE_RUN_STEP, T.OP_EVENT_TYPE_RUN_COMPLETED])
    stream = client.telemetry.TailEvents(telemetry_pb2.TailEventsRequest(filter=filt))
    got: list[telemetry_pb2.TailEventsResponse] = []
    want: list[str] = []
    probes = 0
    arrived = asyncio.Event()

    async def read(n: int) -> None:
        async for item in stream:
            if item.event.event_id.startswith("probe-"):
                arrived.set()
                continue
            got.append(item)
            if len(got) == n:
                return

    reader = asyncio.create_task(read(12))
    # A probe the tail delivers proves it is live (no wall-clock guess at when it started).
    while not arrived.is_set():
        probes += 1
        await ingest(client, [event(T.OP_EVENT_TYPE_RUN_STEP, run_id=run, event_id=f"probe-{run}-{probes}")])
        try:
            await asyncio.wait_for(arrived.wait(), 1)
        except TimeoutError:
            pass
    for i in range(6):
        batch = [event(T.OP_EVENT_TYPE_RUN_STEP, run_id=run, event_id=f"{run}-{i}-a"),
                 event(T.OP_EVENT_TYPE_HEARTBEAT, run_id=run),  # other type: filtered out
                 event(T.OP_EVENT_TYPE_RUN_STEP, run_id="other-run"),  # other run: filtered out
                 event(T.OP_EVENT_TYPE_RUN_COMPLETED, run_id=run, event_id=f"{run}-{i}-b")]
        want += [f"{run}-{i}-a", f"{run}-{i}-b"]
        await ingest(client, batch)
    await asyncio.wait_for(reader, 20)
    stream.cancel()
    assert [g.event.event_id for g in got] == want
    cursors = [int(g.cursor) for g in got]
    assert cursors == sorted(cursors)

    # Resume after the 5th: the rest come again, then new ones live.
    resumed = client.telemetry.TailEvents(telemetry_pb2.TailEventsRequest(filter=filt, after_cursor=got[4].cursor))
    more = [event(T.OP_EVENT_TYPE_RUN_STEP, run_id=run, event_id=f"{run}-late")]
    await ingest(client, more)
    again: list[str] = []
    async for item in resumed:
        again.append(item.event.event_id)
        if len(again) == 8:
            break
    resumed.cancel()
    assert again == want[5:] + [f"{run}-late"]


async def test_stats_count_by_type_in_window(telemetry, tenant) -> None:  # type: ignore[no-untyped-def]
    client = telemetry.client(tenant.admin_key)  # a fresh tenant: its counts are this test's
    await ingest(client, [event(T.OP_EVENT_TYPE_RUN_STARTED, when=ago(hours=2))] * 1
                 + [event(T.OP_EVENT_TYPE_RUN_STEP, when=ago(minutes=5)) for _ in range(3)]
                 + [event(T.OP_EVENT_TYPE_HEARTBEAT, when=ago(minutes=1)) for _ in range(2)])
    window = telemetry_pb2.GetEventStatsRequest()
    window.start_time.FromDatetime(ago(hours=1))
    resp = await client.telemetry.GetEventStats(window)
    assert {(c.type, c.count) for c in resp.counts} == {(T.OP_EVENT_TYPE_RUN_STEP, 3), (T.OP_EVENT_TYPE_HEARTBEAT, 2)}
    assert resp.total == 5
    everything = await client.telemetry.GetEventStats(telemetry_pb2.GetEventStatsRequest())
    assert everything.total == 6


async def test_run_trace_in_order_with_decisions(telemetry, tenant) -> None:  # type: ignore[no-untyped-def]
    client = telemetry.client(tenant.admin_key)
    run = f"run-{secrets.token_hex(4)}"
    evs = [event(T.OP_EVENT_TYPE_RUN_STARTED, run_id=run, when=ago(seconds=50)),
           event(T.OP_EVENT_TYPE_DECISION_MADE, run_id=run, when=ago(seconds=40), tool_call_id="tc1",
                 payload={"decision_id": "dec_1", "decision": "DECISION_ALLOW", "tool_name": "fs.read"}),
           event(T.OP_EVENT_TYPE_TOOL_CALL_COMPLETED, run_id=run, when=ago(seconds=30), tool_call_id="tc1"),
           event(T.OP_EVENT_TYPE_TOOL_CALL_BLOCKED, run_id=run, when=ago(seconds=20), tool_call_id="tc2",
                 payload={"decision_id": "dec_2", "decision": "DECISION_DENY", "tool_name": "db.drop"}),
           event(T.OP_EVENT_TYPE_RUN_COMPLETED, run_id=run, when=ago(seconds=10))]
    await ingest(client, list(reversed(evs)))
    await ingest(client, [event(run_id="another")])
    first = await client.telemetry.GetRunTrace(telemetry_pb2.GetRunTraceRequest(run_id=run, page_size=3))
    rest = await client.telemetry.GetRunTrace(telemetry_pb2.GetRunTraceRequest(
        run_id=run, page_size=3, page_token=first.next_page_token))
    assert not rest.next_page_token
    assert [e.event_id for e in [*first.events, *rest.events]] == [e.event_id for e in evs]
    decisions = [*first.decisions, *rest.decisions]
    assert [(d.decision_id, d.outcome, d.tool_name, d.tool_call_id) for d in decisions] == [
        ("dec_1", telemetry_pb2.DECISION_OUTCOME_ALLOW, "fs.read", "tc1"),
        ("dec_2", telemetry_pb2.DECISION_OUTCOME_DENY, "db.drop", "tc2")]
    assert await stored_ids(client, run_id=run, types=[T.OP_EVENT_TYPE_DECISION_MADE]) == [evs[1].event_id]
