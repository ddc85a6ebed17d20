"""Delivery of opEvents from a service's outbox (topic `op_event`) to telemetry's IngestEvents.

The outbox relay hands over batches in insertion order; they are sent per tenant with the
service key acting for that tenant (ACT_FOR_TENANT_HEADER). Telemetry deduplicates on event_id,
so a batch resent after a crash or a lost answer is stored once. An event telemetry rejects
(permanently bad) is logged and not resent; overload and outages raise, so the relay retries.

The outbox holds each opEvent serialized; a request is their concatenation as field 2
(`IngestEventsRequest.events`), which is that message's wire form, so the events are not parsed,
copied and serialized again on the way (a quarter of the op_event relay's CPU)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

from arm.telemetry.v1 import telemetry_pb2
from arm_common import tls, wire
from arm_common.auth import auth_metadata
from arm_common.outbox import OutboxMessage

log = logging.getLogger(__name__)
MAX_BATCH = 1000
_INGEST = "/arm.telemetry.v1.TelemetryService/IngestEvents"
_EVENTS_TAG = b"\x12"  # IngestEventsRequest.events: field 2, length-delimited


def ingest_request(payloads: Sequence[bytes]) -> bytes:
    """The serialized IngestEventsRequest of these serialized OpEvents."""
    return wire.repeated(_EVENTS_TAG, payloads)


class OpEventForwarder:
    """The `deliver` callback of an `op_event` outbox relay. `address` may be set after
    construction (the all-in-one server learns its own address once bound); until then
    deliveries fail and are retried."""

    def __init__(self, address: str | None, api_key: str | None,
                 tls_settings: tls.TlsSettings | None = None) -> None:
        self.address = address
        self.tls = tls_settings
        self.api_key = api_key
        self._channel: grpc.aio.Channel | None = None
        self._ingest: grpc.aio.UnaryUnaryMultiCallable | None = None

    def _telemetry(self) -> grpc.aio.UnaryUnaryMultiCallable:
        """IngestEvents taking the request's serialized bytes."""
        if not self.address:
            raise RuntimeError("telemetry's address is not known yet")
        if not self.api_key:
            raise RuntimeError("ARM_SERVICE_API_KEY is not set: opEvents cannot be sent to telemetry")
        if self._ingest is None:
            self._channel = tls.open_channel(self.address, self.tls)
            self._ingest = self._channel.unary_unary(
                _INGEST, request_serializer=None, response_deserializer=telemetry_pb2.IngestEventsResponse.FromString)
        return self._ingest

    async def __call__(self, messages: Sequence[OutboxMessage]) -> None:
        ingest = self._telemetry()
        assert self.api_key is not None
        by_tenant: dict[str, list[bytes]] = {}
        for m in messages:
            by_tenant.setdefault(m.tenant_id, []).append(m.payload)
        for tenant_id, events in by_tenant.items():
            for start in range(0, len(events), MAX_BATCH):
                resp = await ingest(ingest_request(events[start:start + MAX_BATCH]),
                                    metadata=auth_metadata(self.api_key, tenant_id), timeout=30)
                for bad in resp.rejected:
                    log.error("telemetry rejected opEvent %s of tenant %s: %s %s (not resent)",
                              bad.event_id, tenant_id, bad.reason, bad.message)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
