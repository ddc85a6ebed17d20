"""The policy limits' numbers and the glob cost measure (pure: no I/O, no protobuf), shared by the
engine's users: governance validates what a tenant writes against them (arm_governance/limits.py,
which explains what each bound protects), and the CLI checks policy files offline with them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import re2

from .risk import DEFAULT_ARGUMENT_TRIGGERS

__all__ = [
    "MAX_ARGUMENT_TRIGGERS",
    "MAX_TRIGGER_LABEL",
    "MAX_TRIGGER_PATTERN_CHARS",
    "MAX_TRIGGER_PROGRAM",
    "MAX_ACTIVE_ARG_PATTERNS_PER_SCOPE",
    "MAX_ACTIVE_ENVELOPES_PER_SCOPE",
    "MAX_ACTIVE_RULES_PER_SCOPE",
    "MAX_ARG_PATTERNS_PER_RULE",
    "MAX_ARG_PATTERN_CHARS",
    "MAX_ARG_PATTERN_PROGRAM",
    "MAX_ENVIRONMENTS_PER_RULE",
    "MAX_GLOB_COST",
    "MAX_GLOB_COST_PER_SCOPE",
    "MAX_GLOB_WILDCARDS",
    "MAX_RULES_PER_ENVELOPE",
    "MAX_TOOL_NAME",
    "TOOL_CHARS",
    "glob_cost",
    "trigger_violations",
    "wildcard_runs",
]

MAX_TOOL_NAME = 200
"""Characters of a tool name (`CheckRequest.tool_name`) and of a tool-rule glob."""
MAX_GLOB_WILDCARDS = 4
"""Wildcard runs (`*`, `**`) per glob."""
MAX_GLOB_COST = 24
"""`glob_cost` of one glob: the glob positions that can be alive at once while a name is read."""
MAX_GLOB_COST_PER_SCOPE = 600
"""Sum of `glob_cost` over the tool rules of the active envelopes attached to one scope (a rule
like `github.*` costs 2, `**.read` 3, an exact name 1)."""
MAX_RULES_PER_ENVELOPE = 200
"""Tool rules per envelope."""
MAX_ACTIVE_ENVELOPES_PER_SCOPE = 20
"""Active envelopes (ENFORCE and SHADOW) attached to one tenant, project or agent version."""
MAX_ACTIVE_RULES_PER_SCOPE = 200
"""Tool rules over the active envelopes attached to one scope; an agent's policy spans three."""
MAX_ARG_PATTERNS_PER_RULE = 20
MAX_ARG_PATTERN_CHARS = 200
MAX_ARG_PATTERN_PROGRAM = 200
"""RE2 program size (instructions) of one argument pattern: `a{1000}` is short but large."""
MAX_ACTIVE_ARG_PATTERNS_PER_SCOPE = 32
"""Distinct argument patterns over the active envelopes attached to one scope."""
MAX_ENVIRONMENTS_PER_RULE = 20
MAX_ARGUMENT_TRIGGERS = 32
"""A tenant's argument-trigger changes (replaced, disabled or added triggers)."""
MAX_TRIGGER_LABEL = 64
MAX_TRIGGER_PATTERN_CHARS = 300
MAX_TRIGGER_PROGRAM = 600
"""RE2 program size of one trigger pattern (the largest default trigger compiles to about 200)."""

TOOL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.*:/@")


def wildcard_runs(glob: str) -> list[int]:
    """Start positions of the wildcard runs of a glob."""
    return [i for i, c in enumerate(glob) if c == "*" and (i == 0 or glob[i - 1] != "*")]


def _alive(piece: str) -> int:
    """The most prefixes of `piece` that can end at one character of a name: 1 + the borders of
    its most bordered prefix (KMP failure function). `create_pull_request` → 1, `aaaa` → 4."""
    border = [0] * len(piece)
    depth = [1] * len(piece)
    k = 0
    for i in range(1, len(piece)):
        while k and piece[i] != piece[k]:
            k = border[k - 1]
        if piece[i] == piece[k]:
            k += 1
        border[i] = k
        depth[i] = 1 + depth[k - 1] if k else 1
    return max(depth, default=0)


def glob_cost(glob: str) -> int:
    """An upper bound on the glob's positions alive at once while RE2 reads a name, which is what
    each name character costs: 1 for the anchored start, and for each wildcard run 1 plus `_alive`
    of the literal piece after it."""
    cost = 1
    for part in re.split(r"(\*+)", glob.lower()):
        if part.startswith("*"):
            cost += 1
        elif part and cost > 1:
            cost += _alive(part)
    return cost


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False
_RE2_OPTIONS.case_sensitive = False
_RE2_OPTIONS.dot_nl = True


def trigger_violations(triggers: Sequence[Any]) -> list[tuple[str, str]]:
    """What is wrong with a tenant's argument-trigger changes (`risk.ArgumentTrigger` or its proto
    message: label, pattern, risk as a number, 0 = HIGH, disabled), as (field path relative to
    the list, e.g. `[2].pattern`, description); empty when they are valid."""
    defaults = {label for label, _ in DEFAULT_ARGUMENT_TRIGGERS}
    if len(triggers) > MAX_ARGUMENT_TRIGGERS:
        return [("", f"must have at most {MAX_ARGUMENT_TRIGGERS} items")]
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, t in enumerate(triggers):
        label, pattern, risk = t.label, t.pattern, int(t.risk or 0)
        if not label or len(label) > MAX_TRIGGER_LABEL or not label.isprintable():
            out.append((f"[{i}].label", f"is required: 1-{MAX_TRIGGER_LABEL} printable characters"))
        elif label in seen:
            out.append((f"[{i}].label", f"{label!r} is given twice"))
        seen.add(label)
        if t.disabled:
            if label and label not in defaults:
                out.append((f"[{i}].label", f"disabled: {label!r} is not a default trigger "
                                            "(see docs/policies.md for their labels)"))
            if pattern:
                out.append((f"[{i}].disabled", "a disabled trigger has no pattern"))
            continue
        if risk not in (0, 2, 3, 4):
            out.append((f"[{i}].risk", "must be MEDIUM, HIGH or CRITICAL (what a match raises the call to)"))
        if not pattern:
            if label not in defaults:
                out.append((f"[{i}].pattern", "is required for a trigger that is not a default one"))
            continue
        if len(pattern) > MAX_TRIGGER_PATTERN_CHARS:
            out.append((f"[{i}].pattern", f"must be at most {MAX_TRIGGER_PATTERN_CHARS} characters"))
            continue
        try:
            compiled = re2.compile(pattern, _RE2_OPTIONS)
        except re2.error as exc:
            out.append((f"[{i}].pattern", f"is not an RE2 regular expression: {exc}"))
            continue
        if compiled.programsize > MAX_TRIGGER_PROGRAM:
            out.append((f"[{i}].pattern", f"compiles to {compiled.programsize} RE2 instructions, more than "
                                          f"{MAX_TRIGGER_PROGRAM}"))
    return out
