"""Ingest: a bad event is rejected alone with its index and reason, the rest stored; a re-sent
batch stores nothing new and counts the duplicates; the client stream acknowledges each batch."""

from __future__ import annotations

import secrets

import grpc

from arm.telemetry.v1 import events_pb2, telemetry_pb2
from tests.helpers import expect_failure
from tests.telemetry.conftest import ago, event

T = events_pb2


async def stored_ids(client, **filter_fields) -> list[str]:  # type: ignore[no-untyped-def]
    out, token = [], ""
    while True:
        resp = await client.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(
            page_size=500, page_token=token, filter=telemetry_pb2.EventFilter(**filter_fields)))
        out += [e.event_id for e in resp.events]
        token = resp.next_page_token
        if not token:
            return out


async def test_bad_events_are_rejected_alone_and_duplicates_counted(telemetry, tenant) -> None:  # type: ignore[no-untyped-def]
    client = telemetry.client(tenant.admin_key)
    run = f"run-{secrets.token_hex(4)}"
    good = [event(run_id=run) for _ in range(5)]
    no_id = event(run_id=run)
    no_id.event_id = ""
    no_time = event(run_id=run)
    no_time.ClearField("occur_time")
    bad_type = event(events_pb2.OP_EVENT_TYPE_UNSPECIFIED, run_id=run)
    too_old = event(run_id=run, when=ago(days=31))
    bad_cost = event(events_pb2.OP_EVENT_TYPE_COST_TICK, run_id=run, instance_id="ins_x", payload={"amount_usd": "lots"})
    batch = [good[0], no_id, good[1], no_time, good[2], bad_type, good[3], too_old, bad_cost, good[4]]
    resp = await client.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=batch))
    assert resp.accepted_count == 5 and resp.duplicate_count == 0
    assert {(r.index, r.reason) for r in resp.rejected} == {
        (1, "MISSING_EVENT_ID"), (3, "MISSING_OCCURRED_AT"), (5, "UNKNOWN_TYPE"),
        (7, "OCCURRED_BEFORE_RETENTION"), (8, "INVALID_COST")}
    assert sorted(await stored_ids(client, run_id=run)) == sorted(e.event_id for e in good)

    again = await client.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=batch))
    assert again.accepted_count == 0 and again.duplicate_count == 5 and len(again.rejected) == 5
    # A twin inside one batch is stored once too.
    twin = event(run_id=run)
    twins = await client.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=[twin, twin]))
    assert (twins.accepted_count, twins.duplicate_count) == (1, 1)
    assert sorted(await stored_ids(client, run_id=run)) == sorted([e.event_id for e in good] + [twin.event_id])


async def test_stream_acknowledges_each_batch_in_order(telemetry, tenant) -> None:  # type: ignore[no-untyped-def]
    client = telemetry.client(tenant.admin_key)
    run = f"run-{secrets.token_hex(4)}"
    batches = [[event(run_id=run) for _ in range(50)] for _ in range(4)]

    async def requests():  # type: ignore[no-untyped-def]
        for i, b in enumerate(batches):
            yield telemetry_pb2.StreamIngestEventsRequest(batch_id=f"b{i}", events=b)
        yield telemetry_pb2.StreamIngestEventsRequest(batch_id="again", events=batches[0])

    acks = [a async for a in client.telemetry.StreamIngestEvents(requests())]
    assert [a.batch_id for a in acks] == ["b0", "b1", "b2", "b3", "again"]
    assert [a.accepted_count for a in acks] == [50, 50, 50, 50, 0]
    assert acks[-1].duplicate_count == 50
    assert len(await stored_ids(client, run_id=run)) == 200


async def test_batch_over_1000_is_invalid(telemetry, tenant) -> None:  # type: ignore[no-untyped-def]
    client = telemetry.client(tenant.admin_key)
    got = await expect_failure(client.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(
        events=[event() for _ in range(1001)])), grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE")
    assert "events" in got.violations


async def test_a_retried_request_id_gets_the_first_answer(telemetry, tenant) -> None:  # type: ignore[no-untyped-def]
    client = telemetry.client(tenant.admin_key)
    bad = event()
    bad.event_id = ""
    request = telemetry_pb2.IngestEventsRequest(request_id=f"req-{secrets.token_hex(4)}",
                                                events=[event(), event(), bad])
    first = await client.telemetry.IngestEvents(request)
    again = await client.telemetry.IngestEvents(request)
    assert (first.accepted_count, first.duplicate_count, len(first.rejected)) == (2, 0, 1)
    assert again == first
    # Without the request_id the same events are duplicates.
    request.request_id = ""
    plain = await client.telemetry.IngestEvents(request)
    assert (plain.accepted_count, plain.duplicate_count) == (0, 2)
    # The same request_id with other events is refused.
    reused = f"reused-{secrets.token_hex(4)}"
    await client.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(request_id=reused, events=[event()]))
    await expect_failure(client.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(
        request_id=reused, events=[event()])), grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
