"""Hypothesis strategies and settings shared by the unit tests."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# No example database: failures are reproduced from the printed example, and concurrent runs do
# not share a .hypothesis/examples store. No deadline: CI machines and xdist workers are slow.
PROPERTY = settings(database=None, deadline=None, max_examples=300,
                    suppress_health_check=[HealthCheck.too_slow])

# JavaScript can only represent integers up to 2**53 exactly; genomes come from a JS platform.
JS_SAFE_INT = 2**53 - 1

finite_floats = st.floats(allow_nan=False, allow_infinity=False)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-JS_SAFE_INT, max_value=JS_SAFE_INT)
    | finite_floats
    | st.text(max_size=20)  # hypothesis text includes non-ASCII and control characters
)

json_keys = st.text(max_size=12)


def json_values(max_leaves: int = 25) -> st.SearchStrategy[Any]:
    """JSON-like values: nested dicts and lists of strings, ints, finite floats, bools and None."""
    return st.recursive(
        json_scalars,
        lambda children: st.lists(children, max_size=5)
        | st.dictionaries(json_keys, children, max_size=5),
        max_leaves=max_leaves,
    )


def json_objects(max_leaves: int = 25) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(json_keys, json_values(max_leaves), min_size=1, max_size=6)
