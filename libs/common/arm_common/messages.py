"""Small protobuf conversions every service needs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2


def ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp, or None (leaves the field unset)."""
    if value is None:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def struct(value: dict[str, Any] | None) -> struct_pb2.Struct | None:
    """A Struct from a JSON-like dict, or None (leaves the field unset)."""
    if value is None:
        return None
    out = struct_pb2.Struct()
    out.update(value)
    return out
