"""arm_common.messages: `plain` is `json_format.MessageToDict` for a Struct (the audit trail
hashes what it gives), and `canonical_struct` is the canonical JSON of what `plain` gives."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from arm_common.canonical import canonical_json
from arm_common.messages import canonical_struct, plain, struct

_SCALARS = st.none() | st.booleans() | st.text(max_size=8) | st.integers(-(2**60), 2**60) | st.floats(
    allow_nan=False, allow_infinity=False)
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=6), inner, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=6), _JSON, max_size=6))
def test_plain_is_message_to_dict(value: dict[str, Any]) -> None:
    s = struct(value)
    assert s is not None
    got, expected = plain(s), json_format.MessageToDict(s)
    assert got == expected
    # The same types all the way down (1.0 is not 1 to the canonical JSON of a hash).
    assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)
    assert canonical_struct(s) == canonical_json(got)


def test_canonical_struct_of_unset_and_null_values() -> None:
    s = struct_pb2.Struct()
    s.fields["unset"]  # an entry whose Value has no kind: null, as `plain` gives None
    s.fields["null"].null_value = struct_pb2.NULL_VALUE
    s.fields["empty"].struct_value.SetInParent()
    s.fields["list"].list_value.SetInParent()
    s.fields["é"].string_value = "\u2028 \"q\" ✓"
    assert canonical_struct(s) == canonical_json(plain(s)) == (
        '{"empty":{},"list":[],"null":null,"unset":null,"é":"\u2028 \\"q\\" ✓"}')


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_plain_refuses_what_json_has_no_form_for(number: float) -> None:
    s = struct_pb2.Struct()
    s.fields["n"].list_value.values.add().number_value = number
    with pytest.raises(ValueError):
        json_format.MessageToDict(s)
    with pytest.raises(ValueError):
        plain(s)
    with pytest.raises(ValueError):
        canonical_struct(s)
