"""The principal cache: a key's expiry is checked on every hit, a grant's expiry forces a lookup,
change notices drop exactly the entries they concern, and an answer fetched across a change is
not cached."""

from __future__ import annotations

import time

from arm.registry.v1 import compat_pb2
from arm_common.auth import Principal
from arm_common.auth_cache import PrincipalCache
from arm_common.errors import Unauthenticated

K = compat_pb2


def principal(tenant: str, actor: str, key_id: str, **kw: float | None) -> Principal:
    return Principal(tenant_id=tenant, actor_type="OPERATOR", actor_id=actor, api_key_id=key_id, **kw)  # type: ignore[arg-type]


def test_expired_key_is_refused_from_the_cache() -> None:
    cache = PrincipalCache(ttl_s=60)
    cache.put("arm_key_a_s", principal("t1", "op1", "key_a", key_expires_at=time.time() - 0.001), cache.generation)
    got = cache.get("arm_key_a_s")
    assert isinstance(got, Unauthenticated) and got.reason == "API_KEY_EXPIRED"
    cache.put("arm_key_b_s", principal("t1", "op1", "key_b", key_expires_at=time.time() + 60), cache.generation)
    assert isinstance(cache.get("arm_key_b_s"), Principal)


def test_expired_grant_forces_a_lookup() -> None:
    cache = PrincipalCache(ttl_s=60)
    cache.put("arm_key_a_s", principal("t1", "op1", "key_a", grants_expire_at=time.time() - 0.001), cache.generation)
    assert cache.get("arm_key_a_s") is None


def test_changes_drop_exactly_their_entries() -> None:
    cache = PrincipalCache(ttl_s=60)
    g = cache.generation
    cache.put("arm_key_a_s", principal("t1", "op1", "key_a"), g)
    cache.put("arm_key_b_s", principal("t1", "op2", "key_b"), g)
    cache.put("arm_key_c_s", principal("t2", "op3", "key_c"), g)
    cache.put("arm_key_d_s", Unauthenticated("no", reason="OPERATOR_INACTIVE"), g)
    assert cache.apply_change(K.AGENT_CHANGE_KIND_API_KEY, "t1", api_key_id="key_a") == 1
    assert cache.get("arm_key_a_s") is None and cache.get("arm_key_b_s") is not None
    assert cache.apply_change(K.AGENT_CHANGE_KIND_OPERATOR, "t1", operator_id="op2") == 2  # and the refusal
    assert cache.get("arm_key_b_s") is None and cache.get("arm_key_d_s") is None
    assert cache.apply_change(K.AGENT_CHANGE_KIND_VERSION, "t2") == 0
    assert cache.apply_change(K.AGENT_CHANGE_KIND_TENANT, "t2") == 1
    assert len(cache) == 0


def test_an_answer_fetched_across_a_change_is_not_cached() -> None:
    cache = PrincipalCache(ttl_s=60)
    before = cache.generation
    cache.apply_change(K.AGENT_CHANGE_KIND_API_KEY, "t1", api_key_id="key_a")
    cache.put("arm_key_a_s", principal("t1", "op1", "key_a"), before)
    assert cache.get("arm_key_a_s") is None
