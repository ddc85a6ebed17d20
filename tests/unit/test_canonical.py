"""Canonical JSON and hashing (SPEC §2 "Genome and genome hash"): byte-compatible with the older
TypeScript platform, i.e. sorted keys, no whitespace, raw UTF-8, JavaScript number formatting."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import subprocess
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from arm_common.canonical import canonical_hash, canonical_json, js_number, sha256_hex

from ._strategies import JS_SAFE_INT, PROPERTY, finite_floats, json_objects, json_scalars, json_values

# SPEC §2 test vector, as the older platform writes it.
VECTOR_TEXT = (
    '{"modelConfig":{"provider":"openai","modelId":"gpt-4.1","temperature":0.2,"maxTokens":4096},'
    '"promptBundleHash":"prompt-123456","toolManifestHash":"tools-123456",'
    '"provenance":{"createdBy":"mission-control-ui","source":"directory.bootstrap",'
    '"createdAt":1700000000000}}'
)
VECTOR_HASH = "759d5f5e7b9fb9419f35aa9aa8ad5f9c874fa42a05ecb958490fdc9d87095688"
# The canonical form of the vector, sorted by hand.
VECTOR_CANONICAL = (
    '{"modelConfig":{"maxTokens":4096,"modelId":"gpt-4.1","provider":"openai","temperature":0.2},'
    '"promptBundleHash":"prompt-123456",'
    '"provenance":{"createdAt":1700000000000,"createdBy":"mission-control-ui",'
    '"source":"directory.bootstrap"},'
    '"toolManifestHash":"tools-123456"}'
)
# The same genome with keys in another order, indentation, spaces and newlines.
VECTOR_REORDERED_TEXT = """
{
  "provenance" : { "createdAt" : 1700000000000 , "source" : "directory.bootstrap",
                   "createdBy" : "mission-control-ui" },
  "toolManifestHash" : "tools-123456",
  "promptBundleHash":"prompt-123456",
  "modelConfig": {
      "maxTokens": 4096,
      "temperature": 0.2,
      "modelId": "gpt-4.1",
      "provider": "openai"
  }
}
"""


# --- the SPEC test vector -----------------------------------------------------------------------

def test_spec_vector_hash() -> None:
    assert canonical_hash(json.loads(VECTOR_TEXT)) == VECTOR_HASH


def test_spec_vector_canonical_text_is_sorted_and_compact() -> None:
    assert canonical_json(json.loads(VECTOR_TEXT)) == VECTOR_CANONICAL
    # The hand-sorted text really is what the vector hash is computed over.
    assert hashlib.sha256(VECTOR_CANONICAL.encode()).hexdigest() == VECTOR_HASH


def test_spec_vector_needs_sorting() -> None:
    # The vector as written is not canonical, so the hash above proves the keys get sorted.
    assert sha256_hex(VECTOR_TEXT) != VECTOR_HASH


def test_spec_vector_reordered_with_whitespace_hashes_the_same() -> None:
    assert canonical_hash(json.loads(VECTOR_REORDERED_TEXT)) == VECTOR_HASH
    assert canonical_json(json.loads(VECTOR_REORDERED_TEXT)) == VECTOR_CANONICAL


def test_spec_vector_with_integral_floats_hashes_the_same() -> None:
    # google.protobuf.Struct carries every number as a double: 4096 arrives as 4096.0.
    genome = json.loads(VECTOR_TEXT)
    genome["modelConfig"]["maxTokens"] = 4096.0
    genome["provenance"]["createdAt"] = 1700000000000.0
    assert canonical_hash(genome) == VECTOR_HASH


def test_spec_vector_built_in_python_in_any_insertion_order() -> None:
    genome = {
        "toolManifestHash": "tools-123456",
        "provenance": {"source": "directory.bootstrap", "createdAt": 1700000000000,
                       "createdBy": "mission-control-ui"},
        "promptBundleHash": "prompt-123456",
        "modelConfig": {"temperature": 0.2, "maxTokens": 4096, "provider": "openai",
                        "modelId": "gpt-4.1"},
    }
    assert canonical_hash(genome) == VECTOR_HASH


def test_spec_vector_hash_changes_with_any_value() -> None:
    genome = json.loads(VECTOR_TEXT)
    genome["modelConfig"]["temperature"] = 0.3
    assert canonical_hash(genome) != VECTOR_HASH


# --- JavaScript number formatting --------------------------------------------------------------

# Outputs of JavaScript's String(x), as a browser or node prints them.
JS_STRINGS = [
    (1.0, "1"),
    (0.1 + 0.2, "0.30000000000000004"),
    (1e21, "1e+21"),
    (1e20, "100000000000000000000"),
    (1e-7, "1e-7"),
    (0.000001, "0.000001"),
    (1.5e-6, "0.0000015"),
    (-0.0, "0"),
    (0.0, "0"),
    (5e-324, "5e-324"),
    (1.7976931348623157e308, "1.7976931348623157e+308"),
    (123456789.125, "123456789.125"),
    (float(2**53), "9007199254740992"),
    (-1e-7, "-1e-7"),
    (0.2, "0.2"),
    (-1.5, "-1.5"),
    (100.0, "100"),
    (1.5e21, "1.5e+21"),
    (1.2345e-10, "1.2345e-10"),
    (123e-20, "1.23e-18"),
    (999999999999999900000.0, "999999999999999900000"),
    (2.5e-7, "2.5e-7"),
    (1e100, "1e+100"),
    (-1e21, "-1e+21"),
    (0.1, "0.1"),
    (1 / 3, "0.3333333333333333"),
]


@pytest.mark.parametrize(("value", "expected"), JS_STRINGS, ids=[s for _, s in JS_STRINGS])
def test_js_number_matches_javascript_string(value: float, expected: str) -> None:
    assert js_number(value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    (0, "0"), (7, "7"), (-42, "-42"), (4096, "4096"), (1700000000000, "1700000000000"),
    (2**53, "9007199254740992"), (-(2**53), "-9007199254740992"),
    (10**21, "1e+21"), (10**22, "1e+22"), (-(10**21), "-1e+21"),
])
def test_js_number_integers(value: int, expected: str) -> None:
    assert js_number(value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    (12345678901234567890, "12345678901234567000"),
    (2**53 + 1, "9007199254740992"),
])
def test_js_number_integers_beyond_double_precision_like_javascript(value: int, expected: str) -> None:
    assert js_number(value) == expected


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_js_number_rejects_non_finite(value: float) -> None:
    with pytest.raises(ValueError):
        js_number(value)


@pytest.mark.parametrize("value", [True, False])
def test_js_number_rejects_booleans(value: bool) -> None:
    with pytest.raises(TypeError):
        js_number(value)


_JS_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]*[1-9])?(e[+-][1-9][0-9]*)?")


@PROPERTY
@given(finite_floats)
def test_js_number_round_trips_floats(x: float) -> None:
    text = js_number(x)
    assert float(text) == x
    assert _JS_NUMBER.fullmatch(text), text


@PROPERTY
@given(finite_floats)
def test_js_number_uses_exponent_exactly_where_javascript_does(x: float) -> None:
    # ECMAScript Number::toString: plain decimals for 1e-6 <= |x| < 1e21, exponent form otherwise.
    text = js_number(x)
    if x == 0 or 1e-6 <= abs(x) < 1e21:
        assert "e" not in text
    else:
        assert "e" in text


@PROPERTY
@given(st.integers(min_value=-(2**53), max_value=2**53))
def test_js_number_safe_integers_as_python_writes_them(n: int) -> None:
    assert js_number(n) == str(n)
    assert js_number(float(n)) == str(n)


@PROPERTY
@given(finite_floats)
def test_js_number_is_shortest_round_trip(x: float) -> None:
    # JavaScript picks the fewest significant digits that round-trip, as Python's repr does.
    significant = re.sub(r"e.*$", "", js_number(abs(x))).replace(".", "").strip("0") or "0"
    expected = re.sub(r"e.*$", "", repr(abs(x))).replace(".", "").strip("0") or "0"
    assert significant == expected


# --- canonical JSON ------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    (None, "null"),
    (True, "true"),
    (False, "false"),
    ("", '""'),
    ([], "[]"),
    ({}, "{}"),
    ({"b": 1, "a": 2}, '{"a":2,"b":1}'),
    ({"a": {"z": [3, 2, 1], "y": None}}, '{"a":{"y":null,"z":[3,2,1]}}'),
    ([{"b": 1, "a": 1.0}, "x"], '[{"a":1,"b":1},"x"]'),
    ((1, 2), "[1,2]"),
    ({"B": 1, "a": 2, "_": 3}, '{"B":1,"_":3,"a":2}'),
    ({"aa": 1, "a": 2, "ab": 3}, '{"a":2,"aa":1,"ab":3}'),
    ([0.5, -0.0, 1e21, 1e-7], "[0.5,0,1e+21,1e-7]"),
])
def test_canonical_json_layout(value: Any, expected: str) -> None:
    assert canonical_json(value) == expected


def test_canonical_json_writes_non_ascii_raw() -> None:
    text = canonical_json({"name": "café", "emoji": "😀", "ключ": "значение"})
    assert text == '{"emoji":"😀","name":"café","ключ":"значение"}'
    assert "\\u" not in text
    assert sha256_hex(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_canonical_json_escapes_like_json_stringify() -> None:
    # JSON.stringify escapes quote, backslash and control characters, and nothing else.
    value = 'q"b\\n\nt\tc\x01d\x7f/\u2028'
    assert canonical_json(value) == '"q\\"b\\\\n\\nt\\tc\\u0001d\x7f/\u2028"'


def test_canonical_json_does_not_modify_its_input() -> None:
    value = {"b": [1.0, {"d": 1, "c": 2}], "a": "x"}
    before = json.dumps(value)
    canonical_json(value)
    assert json.dumps(value) == before


@pytest.mark.parametrize("value", [
    {1: "a"},
    {"a": {2: "b"}},
    {"a": {1, 2}},
    {"a": b"bytes"},
    {"a": object()},
])
def test_canonical_json_rejects_non_json_values(value: Any) -> None:
    with pytest.raises(TypeError):
        canonical_json(value)


@pytest.mark.parametrize("value", [{"a": math.nan}, [math.inf], {"a": [{"b": -math.inf}]}])
def test_canonical_json_rejects_non_finite_numbers(value: Any) -> None:
    with pytest.raises(ValueError):
        canonical_json(value)


# --- hashing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("data", "expected"), [
    ("", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
    ("abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
    (b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
])
def test_sha256_hex_known_digests(data: str | bytes, expected: str) -> None:
    assert sha256_hex(data) == expected


def test_sha256_hex_hashes_text_as_utf8() -> None:
    assert sha256_hex("é") == hashlib.sha256(b"\xc3\xa9").hexdigest()
    assert sha256_hex("é") != hashlib.sha256("é".encode("latin-1")).hexdigest()


@PROPERTY
@given(json_values())
def test_canonical_hash_is_lowercase_hex_sha256_of_canonical_json(value: Any) -> None:
    digest = canonical_hash(value)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest == hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


# --- properties ----------------------------------------------------------------------------------

def _js_int(text: str) -> int | float:
    # JavaScript reads every number as a double; Python's json reads "67100034096779450" (the
    # JavaScript form of the double 6.710003409677945e16) as an int that is 2 more than it.
    n = int(text)
    return n if abs(n) <= 2**53 else float(n)


@PROPERTY
@given(json_values())
def test_canonical_json_parses_back_to_an_equal_value(value: Any) -> None:
    text = canonical_json(value)
    assert json.loads(text, parse_int=_js_int) == value


@PROPERTY
@given(json_values())
def test_canonical_json_is_a_fixed_point(value: Any) -> None:
    text = canonical_json(value)
    assert canonical_json(json.loads(text)) == text


_NO_FLOATS = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-JS_SAFE_INT, max_value=JS_SAFE_INT)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)


@PROPERTY
@given(_NO_FLOATS)
def test_canonical_json_without_floats_equals_sorted_compact_json(value: Any) -> None:
    # Without floats the standard library, told the same rules, is an independent oracle.
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert canonical_json(value) == expected


def _shuffled(value: Any, rnd: random.Random) -> Any:
    """The same value with every object's keys inserted in a random order."""
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: _shuffled(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rnd) for v in value]
    return value


@PROPERTY
@given(json_objects(), st.booleans(), st.sampled_from([None, 0, 1, 2, 4, "\t", " \n "]),
       st.sampled_from([None, (",", ":"), (", ", ": "), (" ,  ", " :\t")]), st.randoms())
def test_key_order_and_whitespace_never_change_the_hash(
    value: dict[str, Any], sort_keys: bool, indent: int | str | None,
    separators: tuple[str, str] | None, rnd: random.Random,
) -> None:
    text = json.dumps(_shuffled(value, rnd), sort_keys=sort_keys, indent=indent,
                      separators=separators, ensure_ascii=rnd.random() < 0.5)
    assert canonical_hash(json.loads(text)) == canonical_hash(value)


def _leaf_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict) and value:
        return [p for k, v in value.items() for p in _leaf_paths(v, (*path, k))]
    if isinstance(value, list) and value:
        return [p for i, v in enumerate(value) for p in _leaf_paths(v, (*path, i))]
    return [path]


def _replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {k: (_replaced(v, rest, new) if k == head else v) for k, v in value.items()}
    return [(_replaced(v, rest, new) if i == head else v) for i, v in enumerate(value)]


@PROPERTY
@given(json_objects(), st.data())
def test_changing_any_leaf_changes_the_hash(value: dict[str, Any], data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(_leaf_paths(value)), label="path")
    old = value
    for step in path:
        old = old[step]
    new: Any = data.draw(json_scalars | st.just([]) | st.just({}), label="new leaf")
    # 1 and 1.0 (or 0 and -0.0) are the same JSON number, and so the same genome: skip those.
    assume(canonical_json(new) != canonical_json(old))
    changed = _replaced(value, path, new)
    assert canonical_hash(changed) != canonical_hash(value)


@PROPERTY
@given(json_objects(), st.data())
def test_renaming_any_key_changes_the_hash(value: dict[str, Any], data: st.DataObject) -> None:
    old_key = data.draw(st.sampled_from(sorted(value)), label="key")
    new_key = data.draw(st.text(max_size=12).filter(lambda k: k not in value), label="new key")
    renamed = {(new_key if k == old_key else k): v for k, v in value.items()}
    assert canonical_hash(renamed) != canonical_hash(value)


@PROPERTY
@given(st.lists(json_scalars, min_size=2, max_size=6, unique_by=canonical_json), st.randoms())
def test_array_order_is_kept(items: list[Any], rnd: random.Random) -> None:
    shuffled = list(items)
    rnd.shuffle(shuffled)
    assume(shuffled != items)
    assert canonical_hash(shuffled) != canonical_hash(items)


# --- differential check against JavaScript itself (when node is installed) ------------------------

_NODE = shutil.which("node")

# A reference canonicaliser in JavaScript, as the older platform would write one.
_JS_CANON = r"""
const canon = v => v === null || typeof v !== 'object' ? JSON.stringify(v)
  : Array.isArray(v) ? '[' + v.map(canon).join(',') + ']'
  : '{' + Object.keys(v).sort().map(k => JSON.stringify(k) + ':' + canon(v[k])).join(',') + '}';
let s = '';
process.stdin.on('data', d => s += d).on('end', () => {
  const input = JSON.parse(s);
  process.stdout.write(JSON.stringify({numbers: input.numbers.map(String),
                                       values: input.values.map(canon)}));
});
"""


def _random_float(rnd: random.Random) -> float:
    while True:
        kind = rnd.random()
        if kind < 0.4:
            x = float.fromhex(f"{rnd.choice('+-')}0x1.{rnd.getrandbits(52):013x}p{rnd.randint(-1074, 1023)}")
        elif kind < 0.8:
            x = rnd.uniform(-1, 1) * 10.0 ** rnd.randint(-30, 30)
        else:
            x = round(rnd.uniform(-1e6, 1e6), rnd.randint(0, 10)) * 10.0 ** rnd.choice(
                [-25, -21, -7, -6, -5, 0, 15, 16, 20, 21, 22])
        if math.isfinite(x):
            return x


def _random_value(rnd: random.Random, depth: int = 0) -> Any:
    kind = rnd.randrange(8 if depth < 3 else 6)
    # Keys stay in the Basic Multilingual Plane: JavaScript sorts keys by UTF-16 code unit and
    # Python by code point, which only differ above U+FFFF (see the report).
    bmp = "aZ_-09 éß中\u2028\x00\x1f\"\\/\uffff"
    if kind == 0:
        return None
    if kind == 1:
        return rnd.random() < 0.5
    if kind == 2:
        return rnd.randint(-JS_SAFE_INT, JS_SAFE_INT)
    if kind == 3:
        return _random_float(rnd)
    if kind in (4, 5):
        return "".join(rnd.choice(bmp + "😀\U0010ffff") for _ in range(rnd.randrange(6)))
    if kind == 6:
        return [_random_value(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    return {"".join(rnd.choice(bmp) for _ in range(rnd.randrange(4))): _random_value(rnd, depth + 1)
            for _ in range(rnd.randrange(5))}


@pytest.mark.skipif(_NODE is None, reason="node is not installed")
def test_matches_a_javascript_canonicaliser() -> None:
    rnd = random.Random(20240601)
    numbers = [_random_float(rnd) for _ in range(20000)] + [x for x, _ in JS_STRINGS]
    values = [_random_value(rnd) for _ in range(2000)] + [json.loads(VECTOR_TEXT)]
    payload = json.dumps({"numbers": numbers, "values": values})
    assert _NODE is not None
    done = subprocess.run([_NODE, "-e", _JS_CANON], input=payload, capture_output=True,
                          text=True, encoding="utf-8", check=True, timeout=120)
    js = json.loads(done.stdout)
    number_mismatches = [(x, js_number(x), j) for x, j in zip(numbers, js["numbers"], strict=True)
                         if js_number(x) != j]
    assert number_mismatches == []
    value_mismatches = [(canonical_json(v), j) for v, j in zip(values, js["values"], strict=True)
                        if canonical_json(v) != j]
    assert value_mismatches == []
    assert sha256_hex(js["values"][-1]) == VECTOR_HASH
