"""The authenticators' cache of principals by API key (the registry's own, and the one governance
and telemetry keep of the registry's answers).

An entry is trusted until the first of: its TTL (the fallback), the key's expiry (checked against
the clock on every hit, so an expired key is refused at once), the earliest expiry of the role
assignments behind its grants (looked up again), and a change notice naming its key, operator,
instance or tenant (the registry's change feed; see `apply_change`)."""

from __future__ import annotations

import time
from collections.abc import Hashable

from arm.registry.v1 import compat_pb2
from arm_common.auth import Principal
from arm_common.errors import Unauthenticated
from arm_common.tagged_cache import TaggedCache

_LIMIT = 10_000
_REFUSED = ("refused",)

Answer = Principal | Unauthenticated


def _key_id(api_key: str) -> str:
    """The key id part of `arm_<key id>_<secret>`, or "" for a malformed key."""
    parts = api_key.split("_", 3)
    return f"{parts[1]}_{parts[2]}" if len(parts) == 4 else ""


class PrincipalCache:
    """Answers (principals, and refusals when the caller caches them) by API key, tagged by
    tenant, key id and actor, so that a change notice drops exactly the entries it concerns.
    `generation` changes with every drop: an answer fetched across a drop is not cached (it may
    predate the change)."""

    def __init__(self, ttl_s: float, limit: int = _LIMIT) -> None:
        self.ttl_s = ttl_s
        self.generation = 0
        self._cache: TaggedCache[str, tuple[float, Answer]] = TaggedCache(limit)

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, api_key: str) -> Answer | None:
        """The cached answer, or None when the key must be looked up."""
        hit, entry = self._cache.get(api_key)
        if not hit or entry is None:
            return None
        deadline, answer = entry
        if deadline <= time.monotonic():
            self._cache.drop(api_key)
            return None
        if isinstance(answer, Principal):
            now = time.time()
            if answer.key_expires_at is not None and now >= answer.key_expires_at:
                return Unauthenticated("the API key has expired", reason="API_KEY_EXPIRED")
            if answer.grants_expire_at is not None and now >= answer.grants_expire_at:
                self._cache.drop(api_key)
                return None
        return answer

    def put(self, api_key: str, answer: Answer, generation: int) -> None:
        """Caches `answer`, unless a change was applied since `generation` was read."""
        if generation != self.generation:
            return
        tags: list[Hashable] = [("key", _key_id(api_key))]
        if isinstance(answer, Principal):
            tags += [("tenant", answer.tenant_id), ("actor", answer.actor_id)]
        else:
            tags.append(_REFUSED)
        self._cache.put(api_key, (time.monotonic() + self.ttl_s, answer), tags)

    def clear(self) -> None:
        self.generation += 1
        self._cache.clear()

    def apply_change(self, kind: int, tenant_id: str = "", *, instance_id: str = "",
                     api_key_id: str = "", operator_id: str = "") -> int:
        """Drops what a registry change makes stale; returns how many entries. Refusals are
        dropped on every change of a tenant, operator or instance (one may have been
        reactivated); a revoked key's refusal is found again at the next lookup."""
        k = compat_pb2
        if kind == k.AGENT_CHANGE_KIND_RESET:
            dropped = len(self._cache)
            self.clear()
            return dropped
        tags: list[Hashable] = []
        if kind == k.AGENT_CHANGE_KIND_TENANT:
            tags = [("tenant", tenant_id), _REFUSED]
        elif kind == k.AGENT_CHANGE_KIND_API_KEY:
            tags = [("key", api_key_id)]
        elif kind == k.AGENT_CHANGE_KIND_OPERATOR:
            tags = [("actor", operator_id), _REFUSED]
        elif kind == k.AGENT_CHANGE_KIND_INSTANCE:
            tags = [("actor", instance_id), _REFUSED]
        if not tags:
            return 0
        self.generation += 1
        return self._cache.drop_tagged(*tags)
