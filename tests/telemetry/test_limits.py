"""Limits: a saturated telemetry answers RESOURCE_EXHAUSTED with a RetryInfo delay and stores
nothing of that batch (acknowledged ones stay); retention deletes events past their age, and
a late retry of a pruned event is refused rather than stored again."""

from __future__ import annotations

import asyncio

import grpc
from google.rpc import error_details_pb2, status_pb2

from arm.telemetry.v1 import telemetry_pb2
from tests.conftest import new_database_spec
from tests.telemetry.conftest import ago, event, start_telemetry, stop_telemetry
from tests.telemetry.test_ingest import stored_ids


def retry_delay(exc: grpc.aio.AioRpcError) -> float | None:
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return info.retry_delay.ToNanoseconds() / 1e9
    return None


async def test_saturation_is_resource_exhausted_with_retry_info(registry, tenant, tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = new_database_spec(registry.backend, tmp_path, "telemetry")
    server = await start_telemetry(spec, registry, extra_env={"ARM_TELEMETRY_MAX_PENDING_EVENTS": "1000"})
    try:
        async with server.client(tenant.admin_key) as c:
            batches = [[event(run_id="sat") for _ in range(600)] for _ in range(8)]
            results = await asyncio.gather(*(c.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=b))
                                             for b in batches), return_exceptions=True)
            refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert refused, "no batch was refused although at most 1000 events may wait"
            for exc in refused:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                delay = retry_delay(exc)
                assert delay is not None and delay > 0
            acked = [b for b, r in zip(batches, results, strict=True) if not isinstance(r, BaseException)]
            assert all(r.accepted_count == 600 for r in results if not isinstance(r, BaseException))
            # Exactly the acknowledged batches are stored: nothing of a refused one.
            assert sorted(await stored_ids(c, run_id="sat")) == sorted(e.event_id for b in acked for e in b)
            # The refused ones go in when resent.
            for b, r in zip(batches, results, strict=True):
                if isinstance(r, BaseException):
                    resp = await c.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=b))
                    assert resp.accepted_count == 600
            assert len(await stored_ids(c, run_id="sat")) == 8 * 600
    finally:
        await stop_telemetry(server)


async def test_retention_deletes_old_events_and_refuses_their_retries(registry, tenant, tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = new_database_spec(registry.backend, tmp_path, "telemetry")
    server = await start_telemetry(spec, registry)
    old = [event(run_id="ret", when=ago(days=10)) for _ in range(30)]
    recent = [event(run_id="ret", when=ago(days=1)) for _ in range(5)]
    try:
        async with server.client(tenant.admin_key) as c:
            resp = await c.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=old + recent))
            assert resp.accepted_count == 35
        await stop_telemetry(server, drop=False)
        # Restarted with a 5-day retention: its first pass runs at start, in batches of 7.
        server = await start_telemetry(spec, registry, extra_env={"ARM_TELEMETRY_RETENTION_DAYS": "5"}, migrate=False)
        server.component.retention.batch = 7
        await server.component.retention.run_once()
        async with server.client(tenant.admin_key) as c:
            assert sorted(await stored_ids(c, run_id="ret")) == sorted(e.event_id for e in recent)
            again = await c.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(events=old + recent))
            assert again.accepted_count == 0 and again.duplicate_count == 5
            assert {r.reason for r in again.rejected} == {"OCCURRED_BEFORE_RETENTION"} and len(again.rejected) == 30
    finally:
        await stop_telemetry(server)
