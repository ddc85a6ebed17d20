"""Page sizes and opaque page tokens (SPEC §5 "lists paginate with opaque page tokens", AIP-158)."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from arm_common.errors import InvalidArgument
from arm_common.pagination import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    decode_token,
    encode_token,
    page_size,
    split_page,
)

from ._strategies import JS_SAFE_INT, PROPERTY, json_values


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def assert_invalid_token(token: str, filters: dict[str, Any]) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        decode_token(token, filters)
    err = caught.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == "INVALID_PAGE_TOKEN"
    assert [v.field for v in err.violations] == ["page_token"]
    assert err.violations[0].description
    return err


# --- page size -------------------------------------------------------------------------------------

def test_defaults_are_sane() -> None:
    assert 1 <= DEFAULT_PAGE_SIZE <= MAX_PAGE_SIZE


@pytest.mark.parametrize(("requested", "expected"), [
    (0, DEFAULT_PAGE_SIZE),
    (1, 1),
    (DEFAULT_PAGE_SIZE, DEFAULT_PAGE_SIZE),
    (MAX_PAGE_SIZE - 1, MAX_PAGE_SIZE - 1),
    (MAX_PAGE_SIZE, MAX_PAGE_SIZE),
    (MAX_PAGE_SIZE + 1, MAX_PAGE_SIZE),
    (2**31 - 1, MAX_PAGE_SIZE),
])
def test_page_size(requested: int, expected: int) -> None:
    assert page_size(requested) == expected


def test_page_size_with_own_default_and_maximum() -> None:
    assert page_size(0, default=7, maximum=20) == 7
    assert page_size(5, default=7, maximum=20) == 5
    assert page_size(21, default=7, maximum=20) == 20


@pytest.mark.parametrize("requested", [-1, -50, -(2**31)])
def test_negative_page_size_is_invalid(requested: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        page_size(requested)
    err = caught.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == "INVALID_PAGE_SIZE"
    assert [v.field for v in err.violations] == ["page_size"]


@PROPERTY
@given(st.integers(min_value=0, max_value=2**63))
def test_page_size_is_always_within_bounds(requested: int) -> None:
    size = page_size(requested)
    assert 1 <= size <= MAX_PAGE_SIZE
    if 0 < requested <= MAX_PAGE_SIZE:
        assert size == requested


# --- tokens: round trip ----------------------------------------------------------------------------

@pytest.mark.parametrize("last_key", [
    "ins_0190a1b2c3d4e5f6a7b8c9d0e1f2a3b4", 42, ["2024-01-01T00:00:00Z", "ins_1"], "ключ", "",
])
def test_round_trip(last_key: Any) -> None:
    filters = {"tenant_id": "t1", "state": "ACTIVE"}
    token = encode_token(last_key, filters)
    assert decode_token(token, filters) == last_key


def test_token_is_opaque_url_safe_text() -> None:
    token = encode_token("ins_1", {"tenant_id": "t1"})
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert "ins_1" not in token  # not readable as-is


def test_empty_token_is_the_first_page() -> None:
    assert decode_token("", {"tenant_id": "t1"}) is None


def test_filter_order_does_not_matter() -> None:
    token = encode_token("k", {"a": "1", "b": "2"})
    assert decode_token(token, {"b": "2", "a": "1"}) == "k"


def test_unset_filters_equal_absent_ones() -> None:
    # proto3 has no "unset" for scalars: "" and 0 mean "no filter".
    token = encode_token("k", {"tenant_id": "t1", "state": "", "limit": 0, "x": None})
    assert decode_token(token, {"tenant_id": "t1"}) == "k"


@PROPERTY
@given(st.text(max_size=20) | st.integers(-JS_SAFE_INT, JS_SAFE_INT)
       | st.lists(st.text(max_size=8) | st.integers(-JS_SAFE_INT, JS_SAFE_INT), max_size=4),
       st.dictionaries(st.text(max_size=8),
                       st.text(max_size=8) | st.integers(-JS_SAFE_INT, JS_SAFE_INT) | st.booleans(),
                       max_size=4))
def test_round_trip_property(last_key: Any, filters: dict[str, Any]) -> None:
    token = encode_token(last_key, filters)
    assert re.fullmatch(r"[A-Za-z0-9_-]*", token)
    assert decode_token(token, dict(reversed(list(filters.items())))) == last_key


# --- tokens: refused -------------------------------------------------------------------------------

@pytest.mark.parametrize(("issued_for", "used_with"), [
    ({"tenant_id": "t1"}, {"tenant_id": "t2"}),
    ({"tenant_id": "t1"}, {"tenant_id": "t1", "state": "ACTIVE"}),
    ({"tenant_id": "t1", "state": "ACTIVE"}, {"tenant_id": "t1"}),
    ({"tenant_id": "t1", "state": "ACTIVE"}, {"tenant_id": "t1", "state": "PAUSED"}),
    ({"limit": 1}, {"limit": 2}),
    ({"flag": True}, {"flag": "true"}),
    ({}, {"tenant_id": "t1"}),
])
def test_token_reused_with_other_filters(issued_for: dict[str, Any], used_with: dict[str, Any]) -> None:
    token = encode_token("ins_1", issued_for)
    assert decode_token(token, issued_for) == "ins_1"
    assert_invalid_token(token, used_with)


_GOOD = encode_token("ins_0190a1b2c3d4e5f6a7b8c9d0e1f2a3b4", {"tenant_id": "t1"})

MALFORMED = {
    "garbage": "!!!!",
    "one char": "a",
    "one char too many": "abcde",
    "percent": "%%%%%%",
    "spaces": "    ",
    "non ascii": "éèà中文",
    "truncated by one": _GOOD[:-1],
    "truncated by three": _GOOD[:-3],
    "truncated to half": _GOOD[: len(_GOOD) // 2],
    "first char changed": ("B" if _GOOD[0] != "B" else "C") + _GOOD[1:],
    "standard base64 padding in the middle": _GOOD[:8] + "==" + _GOOD[8:],
    "base64 of text": b64(b"not json at all"),
    "base64 of invalid utf-8": b64(b"\xff\xfe\xfd\xfc"),
    "base64 of a list": b64(b"[1, 2, 3]"),
    "base64 of a string": b64(b'"ins_1"'),
    "base64 of a number": b64(b"123"),
    "base64 of null": b64(b"null"),
    "base64 of an empty object": b64(b"{}"),
    "missing fingerprint": b64(b'{"k":"ins_1"}'),
    "missing key": b64(b'{"f":"0123456789abcdef"}'),
    "wrong fingerprint": b64(b'{"k":"ins_1","f":"0123456789abcdef"}'),
    "fingerprint of another type": b64(b'{"k":"ins_1","f":5}'),
    "null fingerprint": b64(b'{"k":"ins_1","f":null}'),
}


@pytest.mark.parametrize("token", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_token(token: str) -> None:
    assert_invalid_token(token, {"tenant_id": "t1"})


def test_deeply_nested_token_is_invalid_argument() -> None:
    assert_invalid_token(b64(b"[" * 100_000), {"tenant_id": "t1"})


def test_token_with_forged_key_is_refused() -> None:
    filters = {"tenant_id": "t1"}
    data = json.loads(base64.urlsafe_b64decode(_GOOD + "=" * (-len(_GOOD) % 4)))
    forged = b64(json.dumps({"k": {"injected": True}, "f": data["f"]}).encode())
    assert_invalid_token(forged, filters)


@PROPERTY
@given(st.text(max_size=80))
def test_arbitrary_text_is_a_page_key_or_invalid_argument(token: str) -> None:
    try:
        decode_token(token, {"tenant_id": "t1"})
    except InvalidArgument as err:
        assert err.reason == "INVALID_PAGE_TOKEN"
        assert [v.field for v in err.violations] == ["page_token"]


@PROPERTY
@given(st.binary(max_size=80))
def test_arbitrary_bytes_encoded_are_invalid_argument(raw: bytes) -> None:
    try:
        decode_token(b64(raw), {"tenant_id": "t1"})
    except InvalidArgument as err:
        assert err.reason == "INVALID_PAGE_TOKEN"


@PROPERTY
@given(json_values(max_leaves=10))
def test_arbitrary_json_encoded_is_invalid_argument(value: Any) -> None:
    # Any JSON that was not made by encode_token for these filters is refused.
    with pytest.raises(InvalidArgument) as caught:
        decode_token(b64(json.dumps(value).encode()), {"tenant_id": "t1"})
    assert caught.value.reason == "INVALID_PAGE_TOKEN"


# --- splitting a page ------------------------------------------------------------------------------

@pytest.mark.parametrize(("rows", "size", "page", "more"), [
    ([], 3, [], False),
    ([1, 2], 3, [1, 2], False),
    ([1, 2, 3], 3, [1, 2, 3], False),
    ([1, 2, 3, 4], 3, [1, 2, 3], True),
])
def test_split_page(rows: list[int], size: int, page: list[int], more: bool) -> None:
    got, has_more = split_page(rows, size)
    assert list(got) == page
    assert has_more is more
