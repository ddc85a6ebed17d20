"""Bounds on everything a tenant writes or sends that costs decision time, checked at the edge in
one place (INVALID_ARGUMENT with field violations), so that no tenant's policy can make `Check`
slow on governance's event loop, for itself or for anyone else (issue 10, item 1).

Where the cost goes, and what bounds it:
- Tool globs are matched by RE2 sets (arm_engine.engine.globs): one pass over the name per set, with work per
  name character proportional to the glob positions alive at once. So the tool name's length, the
  number of rules a compiled policy holds (three scopes: tenant, project, version) and the
  literal characters after a glob's first wildcard (those are the positions that stay alive) are
  bounded, as are the wildcards per glob.
- Argument patterns are RE2 (linear in the argument text, itself bounded by the request size):
  each pattern's compiled program and the number of distinct patterns per scope are bounded.
- Envelopes per scope are bounded (each is one step of the evaluation); budgets and risk
  thresholds cost a comparison each. The risk classifier's table is the operator's configuration,
  not a tenant's.

The numbers and the glob cost measure live in the pure engine library (arm_engine.limits,
re-exported here); the numbers are generous for real policies (hundreds of rules) and documented in the proto
comments and README.md ("Policy limits").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import re2

from arm.governance.v1 import policy_pb2
from arm_common.errors import Violations
from arm_engine.limits import (
    MAX_ACTIVE_ARG_PATTERNS_PER_SCOPE,
    MAX_ACTIVE_ENVELOPES_PER_SCOPE,
    MAX_ACTIVE_RULES_PER_SCOPE,
    MAX_ARG_PATTERN_CHARS,
    MAX_ARG_PATTERN_PROGRAM,
    MAX_ARG_PATTERNS_PER_RULE,
    MAX_ENVIRONMENTS_PER_RULE,
    MAX_GLOB_COST,
    MAX_GLOB_COST_PER_SCOPE,
    MAX_GLOB_WILDCARDS,
    MAX_RULES_PER_ENVELOPE,
    MAX_TOOL_NAME,
    TOOL_CHARS,
    glob_cost,
    trigger_violations,
    wildcard_runs,
)

__all__ = [
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
    "MAX_ARGUMENT_BOUNDS",
    "MAX_RISK_OVERRIDES",
    "arg_pattern",
    "glob_cost",
    "scope_totals",
    "tool_glob",
    "tool_name",
    "validate_argument_triggers",
    "validate_risk_overrides",
]

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


def tool_name(v: Violations, path: str, name: str) -> None:
    """A tool name an agent asks about."""
    if not name or not name.strip():
        v.add(path, "is required")
    elif len(name) > MAX_TOOL_NAME:
        v.add(path, f"must be at most {MAX_TOOL_NAME} characters")
    elif "\x00" in name:
        v.add(path, "must not contain NUL characters")


def tool_glob(v: Violations, path: str, glob: str) -> None:
    """A tool-rule glob."""
    if not glob or len(glob) > MAX_TOOL_NAME or not set(glob) <= TOOL_CHARS:
        v.add(path, f"must be 1-{MAX_TOOL_NAME} characters of letters, digits and _-.*:/@")
        return
    runs = wildcard_runs(glob)
    if len(runs) > MAX_GLOB_WILDCARDS:
        v.add(path, f"must have at most {MAX_GLOB_WILDCARDS} wildcard runs (`*` or `**`), "
                    f"not {len(runs)}")
    elif (cost := glob_cost(glob)) > MAX_GLOB_COST:
        v.add(path, f"costs {cost} to match, more than {MAX_GLOB_COST}: literals after a wildcard "
                    "that repeat themselves (like `*aaaaaaaa`) keep many match positions alive; "
                    "shorten them or use fewer wildcards")


def arg_pattern(v: Violations, path: str, pattern: str) -> None:
    """An argument pattern: RE2 syntax, bounded text and compiled program."""
    if not pattern or len(pattern) > MAX_ARG_PATTERN_CHARS or "\x00" in pattern:
        v.add(path, f"must be 1 to {MAX_ARG_PATTERN_CHARS} characters, without NUL")
        return
    try:
        compiled = re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        problem = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        v.add(path, f"is not a valid regular expression: {problem}")
        return
    if compiled.programsize > MAX_ARG_PATTERN_PROGRAM:
        v.add(path, f"compiles to {compiled.programsize} RE2 instructions, more than "
                    f"{MAX_ARG_PATTERN_PROGRAM}; simplify it (e.g. fewer or smaller counted "
                    "repetitions)")


def rules(v: Violations, prefix: str, env: policy_pb2.PolicyEnvelope) -> None:
    """The tool rules of one envelope (`prefix` ends with a dot)."""
    if len(env.tool_rules) > MAX_RULES_PER_ENVELOPE:
        v.add(f"{prefix}tool_rules", f"must have at most {MAX_RULES_PER_ENVELOPE} rules")
    for i, rule in enumerate(env.tool_rules):
        path = f"{prefix}tool_rules[{i}]"
        tool_glob(v, f"{path}.tool", rule.tool)
        environments = list(rule.when.environments)
        if len(environments) > MAX_ENVIRONMENTS_PER_RULE:
            v.add(f"{path}.when.environments", f"must have at most {MAX_ENVIRONMENTS_PER_RULE} items")
        for j, name in enumerate(environments):
            if not name or len(name) > MAX_TOOL_NAME or "\x00" in name:
                v.add(f"{path}.when.environments[{j}]",
                      f"must be 1 to {MAX_TOOL_NAME} characters, without NUL")
        patterns = list(rule.when.arg_patterns)
        if len(patterns) > MAX_ARG_PATTERNS_PER_RULE:
            v.add(f"{path}.when.arg_patterns", f"must have at most {MAX_ARG_PATTERNS_PER_RULE} items")
        for j, pattern in enumerate(patterns):
            arg_pattern(v, f"{path}.when.arg_patterns[{j}]", pattern)


def scope_totals(v: Violations, path: str, envelopes: Iterable[policy_pb2.PolicyEnvelope]) -> None:
    """Totals over the active envelopes attached to one scope (the one being written included)."""
    active = [e for e in envelopes if e.active]
    if len(active) > MAX_ACTIVE_ENVELOPES_PER_SCOPE:
        v.add(path, f"its scope would have {len(active)} active envelopes, more than "
                    f"{MAX_ACTIVE_ENVELOPES_PER_SCOPE}; deactivate or merge some")
    total = sum(len(e.tool_rules) for e in active)
    if total > MAX_ACTIVE_RULES_PER_SCOPE:
        v.add(f"{path}.tool_rules", f"its scope would have {total} tool rules over its active "
                                    f"envelopes, more than {MAX_ACTIVE_RULES_PER_SCOPE}")
    cost = sum(glob_cost(r.tool) for e in active for r in e.tool_rules)
    if cost > MAX_GLOB_COST_PER_SCOPE:
        v.add(f"{path}.tool_rules", f"the globs of its scope's active envelopes would cost {cost} to "
                                    f"match, more than {MAX_GLOB_COST_PER_SCOPE} (see glob_cost)")
    patterns = {p for e in active for r in e.tool_rules for p in r.when.arg_patterns}
    if len(patterns) > MAX_ACTIVE_ARG_PATTERNS_PER_SCOPE:
        v.add(f"{path}.tool_rules", f"its scope would have {len(patterns)} distinct argument "
                                    f"patterns, more than {MAX_ACTIVE_ARG_PATTERNS_PER_SCOPE}")


def worst_legal_rules(salt: int = 0) -> list[policy_pb2.ToolRule]:
    """The most expensive tool rules one scope may legally hold (for the adversarial test and
    bench/noisy_neighbour.py): MAX_ACTIVE_ARG_PATTERNS_PER_SCOPE distinct argument patterns near
    the program bound on rules that match every tool, then distinct globs of MAX_GLOB_WILDCARDS
    wildcards and MAX_GLOB_COST each (runs of `a`, every position of which stays alive on a name
    of `a`s) up to MAX_GLOB_COST_PER_SCOPE, then exact names up to MAX_ACTIVE_RULES_PER_SCOPE
    while the cost allows. `salt` makes another scope's rules distinct."""
    per_rule = MAX_ARG_PATTERNS_PER_RULE
    patterns = [f"(?:[a-z]|[0-9]){{0,28}}x{salt}_{i}(?:[a-z]|[0-9]){{0,28}}y"
                for i in range(MAX_ACTIVE_ARG_PATTERNS_PER_SCOPE)]
    out = [policy_pb2.ToolRule(tool="**", effect=policy_pb2.DECISION_DENY,
                               when=policy_pb2.ToolRuleCondition(arg_patterns=patterns[k:k + per_rule]))
           for k in range(0, len(patterns), per_rule)]
    budget = MAX_GLOB_COST_PER_SCOPE - sum(glob_cost(r.tool) for r in out)
    # Pieces of `a` whose alive positions add up to the cost bound.
    alive = MAX_GLOB_COST - 1 - MAX_GLOB_WILDCARDS
    shapes = [(a, b, c, alive - a - b - c) for a in range(1, alive) for b in range(1, alive)
              for c in range(1, alive) if alive - a - b - c >= 1]
    n = salt * 1000
    while budget >= MAX_GLOB_COST and len(out) < MAX_ACTIVE_RULES_PER_SCOPE:
        pieces = shapes[(n // 16) % len(shapes)]
        glob = "".join(("**" if (n >> bit) & 1 else "*") + "a" * k for bit, k in enumerate(pieces))
        n += 1
        # ALLOW: the matching work is the same whatever the effect, and a NEEDS_APPROVAL would
        # add an approval write per call that one `**` rule could cause as well.
        out.append(policy_pb2.ToolRule(tool=glob, effect=policy_pb2.DECISION_ALLOW))
        budget -= glob_cost(glob)
    while budget >= 1 and len(out) < MAX_ACTIVE_RULES_PER_SCOPE:
        out.append(policy_pb2.ToolRule(tool=f"exact.s{salt}.n{len(out)}", effect=policy_pb2.DECISION_ALLOW))
        budget -= 1
    return out


MAX_RISK_OVERRIDES = 100
MAX_ARGUMENT_BOUNDS = 10

def validate_risk_overrides(v: Violations, path: str, overrides: Any) -> None:
    """RiskOverride entries: a tool glob within the policy limits, a risk, bounded numeric bounds."""
    if len(overrides) > MAX_RISK_OVERRIDES:
        v.add(path, f"must have at most {MAX_RISK_OVERRIDES} items")
        return
    for i, o in enumerate(overrides):
        tool_glob(v, f"{path}[{i}].tool", o.tool)
        if o.risk not in (1, 2, 3, 4):
            v.add(f"{path}[{i}].risk", "must be LOW, MEDIUM, HIGH or CRITICAL")
        if len(o.arguments_below) > MAX_ARGUMENT_BOUNDS:
            v.add(f"{path}[{i}].arguments_below", f"must have at most {MAX_ARGUMENT_BOUNDS} entries")
        for name, bound in o.arguments_below.items():
            if not name or len(name) > 100 or not math.isfinite(bound):
                v.add(f"{path}[{i}].arguments_below[{name!r}]", "needs a name of 1-100 characters and a finite bound")


def validate_argument_triggers(v: Violations, path: str, triggers: Any) -> None:
    """ArgumentTrigger entries: the engine's trigger limits (RE2 only, bounded count and size)."""
    for where, problem in trigger_violations(triggers):
        v.add(f"{path}{where}", problem)
