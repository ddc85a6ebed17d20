"""Opaque page tokens and page sizes (AIP-158).

A token is base64url JSON holding the last key of the page (a scalar, or a flat list of scalars for composite keys) and a fingerprint of the
filters: a token used with other filters, or one that does not decode to that shape, is
INVALID_ARGUMENT. Tokens are not signed: a hand-made one can only name another position in the
caller's own, tenant-scoped results."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any, TypeVar

from arm_common.canonical import canonical_hash
from arm_common.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

T = TypeVar("T")


def page_size(value: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    """0 → default, above maximum → maximum, negative → INVALID_ARGUMENT."""
    if value < 0:
        raise InvalidArgument("page_size must not be negative", reason="INVALID_PAGE_SIZE",
                              violations=[FieldViolation("page_size", "must not be negative")])
    if value == 0:
        return default
    return min(value, maximum)


def _fingerprint(filters: dict[str, Any]) -> str:
    return canonical_hash({k: v for k, v in filters.items() if v not in (None, "", 0)})[:16]


def encode_token(last_key: Any, filters: dict[str, Any]) -> str:
    raw = json.dumps({"k": last_key, "f": _fingerprint(filters)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def decode_token(token: str, filters: dict[str, Any]) -> Any:
    """Returns the last key of the previous page, or None for the first page."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        key, fp = data["k"], data["f"]
        if not (_scalar(key) or (isinstance(key, list) and all(map(_scalar, key)))) or not isinstance(fp, str):
            raise TypeError("page token fields have the wrong types")
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError) as exc:
        raise InvalidArgument("page_token is malformed", reason="INVALID_PAGE_TOKEN",
                              violations=[FieldViolation("page_token", "is malformed")]) from exc
    if fp != _fingerprint(filters):
        raise InvalidArgument("page_token was issued for other filters", reason="INVALID_PAGE_TOKEN",
                              violations=[FieldViolation("page_token",
                                                         "does not match the request's filters")])
    return key


def split_page(rows: Sequence[T], size: int) -> tuple[Sequence[T], bool]:
    """Callers fetch size + 1 rows; returns the page and whether there is a next one."""
    return rows[:size], len(rows) > size
