"""Canonical JSON and SHA-256 hashing, byte-compatible with the older TypeScript platform.

Canonical form: object keys sorted recursively, no whitespace, UTF-8 without escaping non-ASCII,
array order kept, numbers written as JavaScript's `Number.prototype.toString` writes them.
"""

from __future__ import annotations

import hashlib
import math
from json.encoder import encode_basestring  # what json.dumps(s, ensure_ascii=False) calls, in C
from typing import Any


def js_number(value: float | int) -> str:
    """Formats a number the way JavaScript does (`String(x)`): `1` not `1.0`, `1e+21`, `1e-7`."""
    if type(value) is float and value.is_integer() and -(2**53) <= value <= 2**53:
        return str(int(value))  # what the digits below give for it (JavaScript writes 7.0 as "7", -0 as "0")
    if isinstance(value, bool):
        raise TypeError("booleans are not numbers here")
    if isinstance(value, int):
        if abs(value) <= 2**53:
            return str(value)
        value = float(value)  # JavaScript numbers are doubles: big integers round like them
    if math.isnan(value) or math.isinf(value):
        raise ValueError("NaN and Infinity have no JSON form")
    if value == 0:
        return "0"  # JavaScript writes -0 as "0" too.
    # repr gives the shortest digits that round-trip, as JavaScript does; only the layout differs.
    digits_repr = repr(abs(value))
    if "e" in digits_repr:
        coeff, _, exp_part = digits_repr.partition("e")
        exponent = int(exp_part)
    else:
        coeff, exponent = digits_repr, 0
    int_part, _, frac_part = coeff.partition(".")
    if frac_part == "0":
        frac_part = ""
    digits = (int_part + frac_part).lstrip("0")
    # Decimal exponent n such that value = 0.d1d2... × 10^n (ECMAScript's "n").
    lead_zeros = len(int_part + frac_part) - len((int_part + frac_part).lstrip("0"))
    n = len(int_part) - lead_zeros + exponent
    digits = digits.rstrip("0") or "0"
    k = len(digits)
    sign = "-" if value < 0 else ""
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * (-n) + digits
    e = n - 1
    exp_str = f"e+{e}" if e >= 0 else f"e-{-e}"
    if k == 1:
        return sign + digits + exp_str
    return sign + digits[0] + "." + digits[1:] + exp_str


def _object(value: dict[Any, Any], out: list[str]) -> None:
    out.append("{")
    for i, key in enumerate(sorted(value)):
        if not isinstance(key, str):
            raise TypeError(f"object keys must be strings, got {type(key).__name__}")
        if i:
            out.append(",")
        out.append(encode_basestring(key))
        out.append(":")
        item = value[key]
        if type(item) is str:  # the common case without a call
            out.append(encode_basestring(item))
        else:
            _encode(item, out)
    out.append("}")


def _encode(value: Any, out: list[str]) -> None:
    kind = type(value)
    if kind is str:  # the common cases first (exact types; subclasses take the general branches)
        out.append(encode_basestring(value))
    elif kind is dict:
        _object(value, out)
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, (int, float)):
        out.append(js_number(value))
    elif isinstance(value, str):
        out.append(encode_basestring(value))
    elif isinstance(value, dict):
        _object(value, out)
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"{type(value).__name__} has no canonical JSON form")


def canonical_json(value: Any) -> str:
    """Returns the canonical JSON text of a JSON-like value."""
    out: list[str] = []
    _encode(value, out)
    return "".join(out)


def sha256_hex(data: str | bytes) -> str:
    """Lowercase hex SHA-256 of text (UTF-8) or bytes."""
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def canonical_hash(value: Any) -> str:
    """SHA-256 of the canonical JSON of a value."""
    return sha256_hex(canonical_json(value))
