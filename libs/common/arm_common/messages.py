"""Small protobuf conversions every service needs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE = datetime(1970, 1, 1)


def ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp, or None (leaves the field unset). A naive datetime is taken as UTC, as
    Timestamp.FromDatetime does; this is the same value without its struct_time round trip
    (a few microseconds, on every decision)."""
    if value is None:
        return None
    delta = value - (_EPOCH if value.utcoffset() is not None else _EPOCH_NAIVE)
    return timestamp_pb2.Timestamp(seconds=delta.days * 86_400 + delta.seconds,
                                   nanos=delta.microseconds * 1000)


def struct(value: dict[str, Any] | None) -> struct_pb2.Struct | None:
    """A Struct from a JSON-like dict, or None (leaves the field unset)."""
    if value is None:
        return None
    out = struct_pb2.Struct()
    out.update(value)
    return out
