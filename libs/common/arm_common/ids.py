"""Resource ids: a type prefix and a time-ordered random part, so ids sort by creation time
(keyset pagination on the id alone is stable)."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    """Returns e.g. `ins_0190a1b2c3d4e5f6a7b8c9d0e1f2a3b4`: 12 hex digits of milliseconds,
    then 80 random bits."""
    return f"{prefix}_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"
