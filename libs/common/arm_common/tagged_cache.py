"""A bounded in-memory cache whose entries carry tags, so that a change notice drops every entry
it touches in time proportional to what it drops, not to the cache's size (the decision path's
caches hold up to ~100k agents and see a notice per agent change)."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TaggedCache(Generic[K, V]):
    """Maps keys to values; `put` files each entry under tags, `drop_tagged` drops every entry
    filed under any of the given tags. Full at `limit` entries: the next `put` starts afresh
    (a cache miss costs a lookup, never a wrong answer). Not thread-safe (one event loop)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._entries: dict[K, tuple[V, tuple[Hashable, ...]]] = {}
        self._tagged: dict[Hashable, set[K]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: K) -> tuple[bool, V | None]:
        """(True, value) for a cached key (the value may itself be None), else (False, None)."""
        entry = self._entries.get(key)
        return (False, None) if entry is None else (True, entry[0])

    def put(self, key: K, value: V, tags: Iterable[Hashable] = ()) -> None:
        if key in self._entries:
            self.drop(key)
        elif len(self._entries) >= self.limit:
            self.clear()
        unique = tuple(dict.fromkeys(tags))
        self._entries[key] = (value, unique)
        for tag in unique:
            self._tagged.setdefault(tag, set()).add(key)

    def drop(self, key: K) -> bool:
        """Drops one entry; False when it was not cached."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        for tag in entry[1]:
            keys = self._tagged[tag]
            keys.discard(key)
            if not keys:
                del self._tagged[tag]
        return True

    def drop_tagged(self, *tags: Hashable) -> int:
        """Drops every entry filed under any of `tags`; returns how many."""
        doomed: set[K] = set()
        for tag in tags:
            doomed.update(self._tagged.get(tag, ()))
        for key in doomed:
            self.drop(key)
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()
        self._tagged.clear()
