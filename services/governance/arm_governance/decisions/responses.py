"""The logged response of a decision, whole or in two parts. A `Check` logs its CheckResponse
whole in `decisions.response`. A local decision (`RecordLocalDecisions`) logs only the fields
that are its own — decision id, policy epoch, decide time, ~50 bytes — in `decisions.response`,
and names in `decisions.response_part` the `decision_responses` row holding the rest (what
decided, reasons, shadow results: ~650 bytes, the same for every decision of that result and
tenant), written once. Protobuf's concatenation of two serialized messages is their merge, and
the two parts set disjoint fields, so the part's bytes followed by the row's parse to the same
CheckResponse as one message with all the fields (tests/client/test_local_log.py).

Parts are content-addressed (`part_id`: a digest of tenant and bytes) and never change, so each
process caches the ones it read or wrote."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from arm_governance import models

_CACHE: dict[str, bytes] = {}
_LIMIT = 4096
_READ_CHUNK = 500


def part_id(tenant_id: str, response: bytes) -> str:
    """The id of a shared response part: SHA-256 of the tenant id and the bytes, hex."""
    return hashlib.sha256(tenant_id.encode() + b"\x00" + response).hexdigest()


def remember(parts: dict[str, bytes]) -> None:
    """Caches parts known to be stored (committed)."""
    if len(_CACHE) + len(parts) > _LIMIT:
        _CACHE.clear()
    _CACHE.update(parts)


async def parts(s: AsyncSession, ids: Iterable[str | None]) -> dict[str, bytes]:
    """The stored parts of these ids (None and "" ignored), from the cache or the database."""
    wanted = {i for i in ids if i}
    found = {i: _CACHE[i] for i in wanted if i in _CACHE}
    missing = sorted(wanted - found.keys())
    t = models.DecisionResponsePart
    for start in range(0, len(missing), _READ_CHUNK):
        rows = (await s.execute(select(t.id, t.response).where(
            t.id.in_(missing[start:start + _READ_CHUNK])))).all()
        found.update((r.id, r.response) for r in rows)
    if missing:
        remember({i: found[i] for i in missing if i in found})
    return found


def response_bytes(row: Any, parts: dict[str, bytes]) -> bytes:
    """A logged row's whole CheckResponse, serialized (`parts` from `parts`); a row naming a part
    that is not there raises KeyError rather than answering with half a response."""
    part = getattr(row, "response_part", None)
    return parts[part] + row.response if part else row.response
