"""arm_common.wire against protobuf's own serialization."""

from __future__ import annotations

from google.protobuf import wrappers_pb2

from arm.telemetry.v1 import events_pb2, telemetry_pb2
from arm_common import wire


def test_varints_are_protobufs() -> None:
    # UInt64Value's field 1 is a varint: its serialization is the key byte then the varint.
    for n in (0, 1, 127, 128, 300, 16383, 16384, 2**21, 2**32 + 5, 2**63 - 1):
        expected = wrappers_pb2.UInt64Value(value=n).SerializeToString()[1:] if n else b"\x00"
        assert wire.varint(n) == wire.encode_varint(n) == expected, n


def test_a_repeated_field_of_serialized_items_is_the_message() -> None:
    events = [events_pb2.OpEvent(event_id=f"evt-{i}", run_id="r" * (i * 70)) for i in range(4)]
    request = wire.repeated(b"\x12", [e.SerializeToString() for e in events])  # IngestEventsRequest.events
    assert request == telemetry_pb2.IngestEventsRequest(events=events).SerializeToString()
    assert list(telemetry_pb2.IngestEventsRequest.FromString(request).events) == events
    assert wire.repeated(b"\x12", []) == b""
