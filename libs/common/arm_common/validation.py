"""Edge validation helpers: each check appends a field violation instead of raising, so a request
reports all its bad fields at once (`Violations.raise_if_any`)."""

from __future__ import annotations

import re

from google.protobuf.message import Message

from arm_common.errors import Violations

SLUG_RE = re.compile(r"^[a-z0-9-]{2,63}$")
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
MAX_NAME = 200
MAX_TEXT = 10_000
MAX_ID = 100
INTEGER_MAX = 2**31 - 1  # the largest number an INTEGER column (revisions, counters) holds


def required(v: Violations, path: str, value: str, max_len: int = MAX_NAME) -> None:
    """A non-blank string no longer than max_len."""
    if not value or not value.strip():
        v.add(path, "is required")
    elif len(value) > max_len:
        v.add(path, f"must be at most {max_len} characters")
    elif "\x00" in value:
        v.add(path, "must not contain NUL characters")


def optional(v: Violations, path: str, value: str | None, max_len: int = MAX_NAME) -> None:
    """A string that may be empty but not longer than max_len."""
    if value is not None and len(value) > max_len:
        v.add(path, f"must be at most {max_len} characters")
    elif value and "\x00" in value:
        v.add(path, "must not contain NUL characters")


def slug(v: Violations, path: str, value: str) -> None:
    if not value:
        v.add(path, "is required")
    elif not SLUG_RE.match(value):
        v.add(path, "must match [a-z0-9-]{2,63}")


def email(v: Violations, path: str, value: str) -> None:
    if not value:
        v.add(path, "is required")
    elif len(value) > 254 or not EMAIL_RE.match(value):
        v.add(path, "must be an e-mail address")


def resource_id(v: Violations, path: str, value: str, *, required_: bool = True) -> None:
    """Ids are opaque, but bounded in size and printable."""
    if not value:
        if required_:
            v.add(path, "is required")
    elif len(value) > MAX_ID or not value.isprintable():
        v.add(path, f"must be a printable id of at most {MAX_ID} characters")


def enum_set(v: Violations, path: str, value: int, valid: set[int] | None = None) -> None:
    """Enum fields may not be 0 (`*_UNSPECIFIED`) or a number the contract does not define."""
    if value == 0:
        v.add(path, "must be set (the UNSPECIFIED value is not allowed)")
    elif valid is not None and value not in valid:
        v.add(path, f"unknown enum value {value}")


def string_list(v: Violations, path: str, values: list[str], *, max_items: int = 100,
                max_len: int = MAX_NAME) -> None:
    if len(values) > max_items:
        v.add(path, f"must have at most {max_items} items")
    for i, item in enumerate(values):
        if not item or len(item) > max_len or "\x00" in item:
            v.add(f"{path}[{i}]", f"must be 1 to {max_len} characters, without NUL")


def standard_fields(v: Violations, request: Message) -> None:
    """Bounds of the AIP fields many requests carry: request_id, etag, reason, page_token,
    page_size (negative is refused)."""
    fields = request.DESCRIPTOR.fields_by_name
    for name, limit in (("request_id", 128), ("etag", 64), ("page_token", 1000), ("reason", MAX_TEXT)):
        if name in fields:
            optional(v, name, getattr(request, name), limit)
    if "page_size" in fields and getattr(request, "page_size") < 0:  # noqa: B009
        v.add("page_size", "must not be negative")
