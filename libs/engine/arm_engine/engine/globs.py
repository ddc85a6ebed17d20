"""Tool globs and argument patterns, matched by RE2 sets in linear time, and the canonical text of
a call's arguments that the patterns search."""

from __future__ import annotations

import functools
import json
import json.encoder
import re
from collections.abc import Iterable, Mapping
from typing import Any

import re2

from arm_common.canonical import canonical_json

# --- Globs and patterns -------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _glob_parts(glob: str) -> tuple[str, int, int]:
    """(RE2 regex, literal character count, `**` count) of a tool glob. Every literal character
    is written as an escape RE2 reads literally, so nothing but `*` is ever special."""
    out: list[str] = []
    literal = dstar = 0
    for part in _WILDCARD_RUN.split(glob):
        if not part:
            continue
        if part[0] == "*":
            if len(part) >= 2:
                out.append(".*")
                dstar += 1
            else:
                out.append("[^.]*")
        else:
            out.append(part.translate(_RE2_ESCAPES))
            literal += len(part)
    return "".join(out), literal, dstar


_WILDCARD_RUN = re.compile(r"(\*+)")


# ASCII other than letters, digits and `_` is written as a hex escape; other characters stand for
# themselves in RE2's UTF-8 syntax (a lone surrogate cannot be encoded: the automaton takes it).
_RE2_ESCAPES = {c: f"\\x{c:02x}" for c in range(128) if not (chr(c).isalnum() or chr(c) == "_")}


def glob_wildcard_runs(glob: str) -> int:
    """How many wildcard runs (`*`, `**`, `***`…) a glob has; the service bounds it."""
    return sum(1 for part in _WILDCARD_RUN.split(glob) if part.startswith("*"))


class _GlobAutomaton:
    """Matches a glob by simulating its automaton in Python: time linear in the name's length.
    Only a fallback, for the globs and names RE2 cannot take (lone surrogates, which no protobuf
    string carries)."""

    __slots__ = ("tokens",)

    def __init__(self, glob: str) -> None:
        tokens: list[str] = []  # a lower-case character, "*" or "**"
        for part in _WILDCARD_RUN.split(glob.lower()):
            if part.startswith("*"):
                tokens.append("**" if len(part) >= 2 else "*")
            else:
                tokens.extend(part)
        self.tokens = tuple(tokens)

    def _closure(self, states: set[int]) -> set[int]:
        todo = list(states)
        while todo:
            i = todo.pop()
            if i < len(self.tokens) and self.tokens[i] in ("*", "**") and i + 1 not in states:
                states.add(i + 1)
                todo.append(i + 1)
        return states

    def fullmatch(self, tool: str) -> bool:
        tokens, end = self.tokens, len(self.tokens)
        states = self._closure({0})
        for ch in tool.lower():
            nxt = set()
            for i in states:
                if i == end:
                    continue
                tok = tokens[i]
                if tok == "**" or (tok == "*" and ch != "."):
                    nxt.add(i)
                elif tok == ch:
                    nxt.add(i + 1)
            if not nxt:
                return False
            states = self._closure(nxt)
        return end in states


_GLOB_OPTIONS = re2.Options()
_GLOB_OPTIONS.case_sensitive = False
_GLOB_OPTIONS.dot_nl = True  # `**` crosses every character, newlines included
_GLOB_OPTIONS.log_errors = False
_GLOB_OPTIONS.max_mem = 8 << 20  # RE2's default: per set, program and automaton cache together
# Globs per RE2 set: one pass over the name per set. Smaller sets keep each set's automaton (and
# so the work per name character) small; the service bounds the rules of a policy, so the number
# of sets is bounded too.
_GLOBS_PER_SET = 128
# Every set also holds this pattern, which matches every name: a set whose answer lacks it ran out
# of automaton memory (RE2 reports that as "no match"), and its globs are then matched one by one.
_EVERYTHING = ".*"


class _GlobMatcher:
    """One glob alone: RE2 (linear in the name), or the automaton when RE2 cannot compile it."""

    __slots__ = ("glob", "_re2", "_automaton")

    def __init__(self, glob: str) -> None:
        self.glob = glob
        self._automaton: _GlobAutomaton | None = None
        try:
            self._re2: Any = re2.compile(_glob_parts(glob)[0].encode(), _GLOB_OPTIONS)
        except (re2.error, UnicodeEncodeError):
            self._re2 = None
            self._automaton = _GlobAutomaton(glob)

    def fullmatch(self, tool: str, data: bytes | None = None) -> bool:
        """`data`: the name in UTF-8, or None when it has none (lone surrogates)."""
        if self._re2 is not None and data is not None:
            return self._re2.fullmatch(data) is not None
        automaton = self._automaton or _GlobAutomaton(self.glob)
        return automaton.fullmatch(tool)


class _GlobSet:
    """The distinct tool globs of a compiled policy, compiled into RE2 sets (anchored at both
    ends): `match` finds every glob that matches a name in one pass over the name per set, in time
    linear in the name whatever the globs (no backtracking)."""

    __slots__ = ("ids", "_globs", "_sets", "_alone", "_matchers")

    def __init__(self, globs: Iterable[str]) -> None:
        self.ids: dict[str, int] = {}
        for glob in globs:
            self.ids.setdefault(glob, len(self.ids))
        self._globs = list(self.ids)
        self._matchers: dict[int, _GlobMatcher] = {}
        self._alone: list[int] = []  # globs no set could take
        self._sets: list[tuple[Any, tuple[int, ...]]] = []  # (set, set index → glob id)
        pending = list(self.ids.items())
        for start in range(0, len(pending), _GLOBS_PER_SET):
            self._add_set(pending[start:start + _GLOBS_PER_SET])

    def _add_set(self, chunk: list[tuple[str, int]]) -> None:
        rx_set = re2.Set.FullMatchSet(_GLOB_OPTIONS)
        local = [-1]
        rx_set.Add(_EVERYTHING)
        for glob, gid in chunk:
            try:
                rx_set.Add(_glob_parts(glob)[0].encode())
            except (re2.error, UnicodeEncodeError):
                self._alone.append(gid)
                continue
            local.append(gid)
        try:
            rx_set.Compile()
        except re2.error:  # too large for its memory budget: each glob on its own
            self._alone.extend(local[1:])
            return
        self._sets.append((rx_set, tuple(local)))

    def _matcher(self, gid: int) -> _GlobMatcher:
        m = self._matchers.get(gid)
        if m is None:
            m = self._matchers[gid] = _GlobMatcher(self._globs[gid])
        return m

    def match(self, tool: str) -> frozenset[int]:
        """Ids of the globs that match the name (case-insensitive)."""
        try:
            data: bytes | None = tool.encode()
        except UnicodeEncodeError:
            data = None
        out: set[int] = set()
        for rx_set, local in self._sets:
            hits = rx_set.Match(data) if data is not None else None
            if hits and 0 in hits:
                out.update(local[i] for i in hits if i)
            else:  # out of automaton memory, or a name RE2 cannot read: one by one
                out.update(gid for gid in local[1:] if self._matcher(gid).fullmatch(tool, data))
        out.update(gid for gid in self._alone if self._matcher(gid).fullmatch(tool, data))
        return frozenset(out)


@functools.lru_cache(maxsize=256)
def _single(glob: str) -> _GlobMatcher:
    return _GlobMatcher(glob)


def glob_matches(glob: str, tool: str) -> bool:
    """Whether a tool-rule glob matches a tool name (case-insensitive)."""
    try:
        data: bytes | None = tool.encode()
    except UnicodeEncodeError:
        data = None
    return _single(glob).fullmatch(tool, data)


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # errors are reported to the caller, not to stderr


def arg_pattern_error(pattern: str) -> str | None:
    """Why an arg pattern does not compile as RE2, or None; for the service's input validation."""
    try:
        re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        return exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
    return None


def _compile_arg_pattern(pattern: str) -> Any:
    # RE2, as the contract promises: matching is linear in the argument text, so an operator's
    # pattern such as (a+)+$ cannot stall the decision path on a crafted argument.
    # Compiled for UTF-8 bytes: the wrapper then skips a conversion on every search.
    try:
        return re2.compile(pattern.encode(), _RE2_OPTIONS)
    except re2.error:
        return re2.compile(re2.escape(pattern.encode()), _RE2_OPTIONS)


class _PatternSet:
    """Every argument pattern of a compiled policy in one RE2 set: `match` searches the argument
    text once for all of them (linear in the text), where one search per pattern reads it once
    per pattern. A sentinel that matches only at the end of the text tells an automaton that ran
    out of memory (RE2 reports "no match") from a real answer; then `match` returns None and the
    caller searches pattern by pattern."""

    __slots__ = ("_set",)

    def __init__(self, patterns: Iterable[str]) -> None:
        rx_set = re2.Set.SearchSet(_RE2_OPTIONS)
        rx_set.Add(rb"\z")
        for p in patterns:
            try:
                rx_set.Add(p.encode())
            except re2.error:  # as _compile_arg_pattern: an invalid pattern matches literally
                rx_set.Add(re2.escape(p.encode()))
        rx_set.Compile()
        self._set = rx_set

    def match(self, text: bytes) -> int | None:
        """Bit i set when pattern i is found; None when the set could not answer."""
        hits = self._set.Match(text)
        if not hits or 0 not in hits:
            return None
        mask = 0
        for i in hits:
            if i:
                mask |= 1 << (i - 1)
        return mask


_MAX_SAFE_INT = 2**53
# The C encoder writes exactly the canonical form when the value holds no floats and no integers
# beyond 2**53 (JSON-safe integers, strings, booleans, null), at a fraction of the cost.
try:
    _fast_encoder: Any = json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        None, None, json.encoder.encode_basestring, None, ":", ",", True, False, False)
except TypeError:  # no C accelerator, or another signature: canonical_json does it all
    _fast_encoder = None


def _fast_json(value: Any, depth: int) -> bool:
    """Whether the value is JSON the fast encoder writes canonically."""
    t = type(value)
    if t is str or t is bool or value is None:
        return True
    if t is int:
        return -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT
    if depth > 32:
        return False
    if t is dict:
        return all(type(k) is str and _fast_json(v, depth + 1) for k, v in value.items())
    if t is list or t is tuple:
        return all(_fast_json(v, depth + 1) for v in value)
    return False


def _arguments_text(arguments: Any) -> str:
    """Canonical JSON of the arguments, as arg patterns see it; never raises."""
    if not arguments:
        return "{}"
    if _fast_encoder is not None and type(arguments) is dict and _fast_json(arguments, 0):
        return "".join(_fast_encoder(arguments, 0))
    try:
        return canonical_json(arguments if type(arguments) is dict else dict(arguments))
    except (TypeError, ValueError, RecursionError):
        pass

    def default(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return dict(obj)
        if isinstance(obj, (set, frozenset)):
            return sorted(obj, key=repr)
        return str(obj)

    try:
        return json.dumps(arguments, default=default, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return str(arguments)
