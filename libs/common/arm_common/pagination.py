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
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select

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


def decode_time_id_token(token: str, filters: dict[str, Any]) -> tuple[datetime, str] | None:
    """For lists ordered newest first by (creation time, id): the previous page's last key."""
    after = decode_token(token, filters)
    if after is None:
        return None
    try:
        if not (isinstance(after, list) and len(after) == 2 and all(isinstance(x, str) for x in after)):
            raise ValueError("not a [time, id] pair")
        return datetime.fromisoformat(after[0]), after[1]
    except ValueError as exc:
        raise InvalidArgument("page_token is malformed", reason="INVALID_PAGE_TOKEN",
                              violations=[FieldViolation("page_token", "is malformed")]) from exc


def newest_first_page(query: Select[Any], time_column: Any, id_column: Any,
                      after: tuple[datetime, str] | None, size: int) -> Select[Any]:
    """Keyset page newest first: rows strictly after `after` in (time, id) descending order,
    `size + 1` of them (see split_page). Stable under concurrent inserts."""
    if after is not None:
        when, last_id = after
        query = query.where((time_column < when) | ((time_column == when) & (id_column < last_id)))
    return query.order_by(time_column.desc(), id_column.desc()).limit(size + 1)


def time_id_token(page: Sequence[Any], more: bool, filters: dict[str, Any], *,
                  time_attr: str = "created_at") -> str:
    """The next-page token of a newest_first_page, or "" at the end."""
    if not (more and page):
        return ""
    return encode_token([getattr(page[-1], time_attr).isoformat(), page[-1].id], filters)
