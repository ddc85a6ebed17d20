"""The generic edge check every request passes before its handler: what is well-typed protobuf
but no service can store or compute with. Driven by the message descriptors, so it covers every
field of every RPC, nested messages, maps and `Struct` values included:

- `Timestamp` outside 0001-01-01..9999-12-31 (or nanos outside 0..999999999), `Duration` outside
  ±10000 years (or nanos of the wrong sign or size): what datetime, the databases and
  `ToDatetime()` cannot represent.
- NaN and ±Infinity in `double` / `float` fields and in `Struct` / `Value` numbers (JSON has no
  such numbers and comparisons with them are always false).
- NUL characters in strings, map keys and `Struct` keys and strings (PostgreSQL refuses them in
  text and JSON columns).
- Unsigned integers past the signed 64-bit range (a BIGINT column). Fields stored in narrower
  columns are bounded by their own validators.
- Bytes that do not decode as the request message (a request body or one message of a client
  stream): the deserializer returns an `Undecodable` marker instead of raising, which grpc would
  answer with UNKNOWN.

Messages a service validates item by item (telemetry's events: a bad event is rejected alone,
the rest stored) are left to it: see `validated_per_item`.

Every problem is an `INVALID_ARGUMENT` violation named by its dotted path (`expire_time`,
`arguments.tool.args[2]`, `labels.team`), the same paths the services' own validators use."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from arm_common.errors import FieldViolation, InvalidArgument, Violations

TIMESTAMP_MIN_S = -62_135_596_800  # 0001-01-01T00:00:00Z
TIMESTAMP_MAX_S = 253_402_300_799  # 9999-12-31T23:59:59Z
DURATION_MAX_S = 315_576_000_000  # about 10000 years, the bound google.protobuf.Duration states
NANOS_MAX = 999_999_999
BIGINT_MAX = 2**63 - 1
MAX_REPORTED = 20  # violations listed per request; the rest are summed up in the message

_UNSIGNED = {FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64}
_FLOATING = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}
_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE
_NUL = "must not contain NUL characters"
_FINITE = "must be a finite number (not NaN or infinity)"


_PER_ITEM: set[str] = set()


def validated_per_item(*full_names: str) -> None:
    """Leaves messages of these types to the service, which checks each one itself and rejects a
    bad one alone (instead of the whole request failing here)."""
    _PER_ITEM.update(full_names)


class Undecodable:
    """What the tolerant deserializer hands the handler for bytes that are not the message."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Wraps a request deserializer so undecodable bytes become an `Undecodable` marker (the
    interceptor answers INVALID_ARGUMENT) rather than an exception grpc would answer UNKNOWN."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return Undecodable(str(exc) or type(exc).__name__)
    return deserialize


def screen(request: Any, streaming: bool) -> Any:
    """Checks a unary request (raising InvalidArgument) or wraps a request stream so that each
    message is checked as the handler reads it."""
    if streaming:
        return _screened_stream(request)
    check(request)
    return request


async def _screened_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    index = 0
    async for request in requests:
        check(request, f"message {index} of the stream")
        index += 1
        yield request


def violations(msg: Message, path: str = "") -> list[FieldViolation]:
    """What `check` would name in `msg` (a part of a request a service checks itself)."""
    v = Violations()
    _message(v, msg, path)
    return v.items


def check(request: Any, where: str = "the request") -> None:
    """Raises InvalidArgument naming every field of `request` no service can take."""
    if isinstance(request, Undecodable):
        raise InvalidArgument(f"{where} is not a valid protobuf message of the expected type: "
                              f"{request.error}", reason="MALFORMED_REQUEST")
    if not isinstance(request, Message):
        return
    v = Violations()
    _message(v, request, "")
    if v:
        extra = len(v.items) - MAX_REPORTED
        if extra > 0:
            v.items = v.items[:MAX_REPORTED]
        v.raise_if_any(f"{where} has values out of range" + (f" ({extra} more)" if extra > 0 else ""))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _message(v: Violations, msg: Message, path: str) -> None:
    full_name = msg.DESCRIPTOR.full_name
    if full_name in _PER_ITEM:
        return
    special = _WELL_KNOWN.get(full_name)
    if special is not None:
        special(v, msg, path)
        return
    for fd, value in msg.ListFields():
        kind = fd.type
        if kind == _STRING:  # the most common case, kept inline
            if fd.is_repeated:
                for i, item in enumerate(value):
                    if "\x00" in item:
                        v.add(f"{_join(path, fd.name)}[{i}]", _NUL)
            elif "\x00" in value:
                v.add(_join(path, fd.name), _NUL)
        elif kind == _MESSAGE:
            field_path = _join(path, fd.name)
            entry = fd.message_type
            if entry is not None and _is_map(entry):
                _map(v, entry, value, field_path)
            elif fd.is_repeated:
                for i, item in enumerate(value):
                    _message(v, item, f"{field_path}[{i}]")
            else:
                _message(v, value, field_path)
        elif fd.is_repeated:
            for i, item in enumerate(value):
                _scalar(v, fd, item, f"{_join(path, fd.name)}[{i}]")
        else:
            _scalar(v, fd, value, _join(path, fd.name))


_MAP_ENTRY: dict[str, bool] = {}


def _is_map(descriptor: Descriptor) -> bool:
    known = _MAP_ENTRY.get(descriptor.full_name)
    if known is None:
        known = _MAP_ENTRY[descriptor.full_name] = descriptor.GetOptions().map_entry
    return known


def _map(v: Violations, entry: Descriptor, value: Any, path: str) -> None:
    key_fd = entry.fields_by_name["key"]
    value_fd = entry.fields_by_name["value"]
    for key, item in value.items():
        item_path = f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"
        if key_fd.type == _STRING and "\x00" in key:
            v.add(path, "keys must not contain NUL characters")
            continue
        if value_fd.type == _MESSAGE:
            _message(v, item, item_path)
        else:
            _scalar(v, value_fd, item, item_path)


def _scalar(v: Violations, fd: FieldDescriptor, value: Any, path: str) -> None:
    kind = fd.type
    if kind == _STRING:
        if "\x00" in value:
            v.add(path, _NUL)
    elif kind in _FLOATING:
        if not math.isfinite(value):
            v.add(path, _FINITE)
    elif kind in _UNSIGNED:
        if value > BIGINT_MAX:
            v.add(path, f"must be at most {BIGINT_MAX}")


def _timestamp(v: Violations, msg: Any, path: str) -> None:
    if not TIMESTAMP_MIN_S <= msg.seconds <= TIMESTAMP_MAX_S:
        v.add(path or "timestamp", "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z")
    elif not 0 <= msg.nanos <= NANOS_MAX:
        v.add(_join(path, "nanos"), f"must be from 0 to {NANOS_MAX}")


def _duration(v: Violations, msg: Any, path: str) -> None:
    if not -DURATION_MAX_S <= msg.seconds <= DURATION_MAX_S:
        v.add(path or "duration", f"must be within ±{DURATION_MAX_S} seconds")
    elif not -NANOS_MAX <= msg.nanos <= NANOS_MAX or (msg.seconds * msg.nanos < 0):
        v.add(_join(path, "nanos"), "must be within ±999999999 and of the same sign as seconds")


def _struct(v: Violations, msg: Any, path: str) -> None:
    fields = msg.fields
    for key in fields:  # iterating keys and indexing stays in C; .items() does not
        if "\x00" in key:
            v.add(path or "struct", "keys must not contain NUL characters")
            continue
        _value(v, fields[key], path, key)


def _list_value(v: Violations, msg: Any, path: str) -> None:
    for i, value in enumerate(msg.values):
        _value(v, value, path, i)


def _value(v: Violations, msg: Any, path: str, at: str | int | None = None) -> None:
    """A Value at `path` (plus `.key` or `[index]` when `at` is given, joined only if needed)."""
    kind = msg.WhichOneof("kind")
    if kind == "number_value":
        if not math.isfinite(msg.number_value):
            v.add(_at(path, at), _FINITE)
    elif kind == "string_value":
        if "\x00" in msg.string_value:
            v.add(_at(path, at), _NUL)
    elif kind == "struct_value":
        _struct(v, msg.struct_value, _at(path, at))
    elif kind == "list_value":
        _list_value(v, msg.list_value, _at(path, at))


def _at(path: str, at: str | int | None) -> str:
    if at is None:
        return path
    return f"{path}[{at}]" if isinstance(at, int) else _join(path, at)


def _wrapper(v: Violations, msg: Any, path: str) -> None:
    fd = msg.DESCRIPTOR.fields_by_name["value"]
    _scalar(v, fd, msg.value, path)


_WELL_KNOWN: dict[str, Callable[[Violations, Any, str], None]] = {
    "google.protobuf.Timestamp": _timestamp,
    "google.protobuf.Duration": _duration,
    "google.protobuf.Struct": _struct,
    "google.protobuf.ListValue": _list_value,
    "google.protobuf.Value": _value,
    **{f"google.protobuf.{name}Value": _wrapper
       for name in ("Double", "Float", "String", "UInt64")},
}
