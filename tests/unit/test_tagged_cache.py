"""TaggedCache against a plain model (a dict and a linear scan over the tags), under random
sequences of put, drop, drop_tagged and clear, with a limit small enough to be reached."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from arm_common.tagged_cache import TaggedCache
from tests.unit._strategies import PROPERTY

LIMIT = 6
keys = st.integers(0, 9)
tags = st.lists(st.sampled_from(["a", "b", "c", ("t", 1), ("t", 2)]), max_size=3)


class Machine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cache: TaggedCache[int, str | None] = TaggedCache(LIMIT)
        self.model: dict[int, tuple[str | None, set[object]]] = {}

    @rule(key=keys, value=st.one_of(st.none(), st.text(max_size=2)), tags=tags)
    def put(self, key: int, value: str | None, tags: list[object]) -> None:
        self.cache.put(key, value, tags)
        if key not in self.model and len(self.model) >= LIMIT:
            self.model.clear()  # full: start afresh
        self.model[key] = (value, set(tags))

    @rule(key=keys)
    def drop(self, key: int) -> None:
        assert self.cache.drop(key) == (key in self.model)
        self.model.pop(key, None)

    @rule(tags=tags)
    def drop_tagged(self, tags: list[object]) -> None:
        doomed = [k for k, (_, own) in self.model.items() if own & set(tags)]
        assert self.cache.drop_tagged(*tags) == len(doomed)
        for key in doomed:
            del self.model[key]

    @rule()
    def clear(self) -> None:
        self.cache.clear()
        self.model.clear()

    @invariant()
    def same_entries(self) -> None:
        assert len(self.cache) == len(self.model) <= LIMIT
        for key in range(10):
            expected = (True, self.model[key][0]) if key in self.model else (False, None)
            assert self.cache.get(key) == expected
            assert (key in self.cache) == (key in self.model)

    @invariant()
    def no_dangling_tags(self) -> None:
        # A tag that names only dropped entries is gone, so the index does not grow without bound.
        filed = {tag for _, own in self.model.values() for tag in own}
        assert set(self.cache._tagged) == filed


TestTaggedCache = Machine.TestCase
TestTaggedCache.settings = PROPERTY


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TaggedCache(0)


def test_a_cached_none_is_a_hit() -> None:
    cache: TaggedCache[str, int | None] = TaggedCache(10)
    cache.put("unknown agent", None, ["tenant-1"])
    assert cache.get("unknown agent") == (True, None)
    assert cache.get("never asked") == (False, None)
    assert cache.drop_tagged("tenant-1") == 1
    assert cache.get("unknown agent") == (False, None)
