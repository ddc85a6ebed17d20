"""Protobuf wire-format pieces, for messages put together from parts already serialized (the
SDK's spool records and shipped batches, telemetry requests of stored opEvents): concatenating a
field's tag, its length and its bytes is what serializing the message would write, without
parsing the parts again."""

from __future__ import annotations

from collections.abc import Iterable


def encode_varint(n: int) -> bytes:
    """`n` (≥ 0) as a protobuf varint."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


SMALL_VARINTS = [encode_varint(n) for n in range(1 << 14)]
"""The varints of 0 … 16383 (lengths and small numbers: one or two bytes), looked up."""


def varint(n: int) -> bytes:
    return SMALL_VARINTS[n] if n < 16384 else encode_varint(n)


def repeated(tag: bytes, items: Iterable[bytes]) -> bytes:
    """A repeated length-delimited field of these serialized items; `tag` is the field's key
    (field number << 3 | 2) as a varint, e.g. b"\\x12" for field 2."""
    return b"".join(b"%s%s%s" % (tag, varint(len(item)), item) for item in items)
