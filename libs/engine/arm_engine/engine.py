"""The policy engine: compiled policy envelopes in, ALLOW / DENY / NEEDS_APPROVAL out (SPEC §3
"The decision"). Pure and synchronous — no I/O, no protobuf — so it can be tested exhaustively
and benchmarked; the service resolves the agent, operator controls, spend and approval first and
converts enums by value (every IntEnum here has the numbers of the proto enum of the same name).

Evaluation order, the first step that decides ends it:
  1. AGENT         unknown agent, inactive tenant, retired version → DENY.
  2. KILL_SWITCH   tenant/project operator control, instance state → DENY.
  3. APPROVAL_GRANT a presented approval: VALID → ALLOW; PENDING (still open, bound to this
                   call) → NEEDS_APPROVAL naming that approval; any other verdict → DENY.
  4. LOCKED_RULE   matching locked DENY of a TENANT/PROJECT envelope → DENY; a matching locked
                   NEEDS_APPROVAL makes the final answer at least NEEDS_APPROVAL.
  5. ENVELOPE      VERSION > PROJECT > TENANT; priority groups, strictest result of a group.
  6. BASELINE      LOW/MEDIUM → ALLOW, HIGH → NEEDS_APPROVAL, CRITICAL → DENY.
  BUDGET (on top)  any exceeded budget of any enforced envelope turns ALLOW — and NEEDS_APPROVAL,
                   and an approval grant — into DENY.

Choices where SPEC is silent (also listed in bench/README.md's engine section):
- Tool globs match case-insensitively; `*` is `[^.]*` (may be empty), `**` is `.*` (may be empty,
  crosses dots), nothing else is special. Specificity: exact name > glob; then more literal
  characters; then fewer `**`; then the strictest effect; then the lower rule index. The globs of
  a compiled policy are matched together by RE2 sets (no backtracking): one pass over the name
  per set of up to 128 globs, so the cost of a name is linear in its length whatever the globs.
- `when.arg_patterns` follow the proto contract: RE2 regular expressions (linear time, so an
  operator's pattern cannot stall decisions on crafted arguments), searched in the canonical
  JSON of the arguments (`{}` when absent), case-sensitive unless the pattern says `(?i)`. The
  service refuses a pattern RE2 cannot compile; here such a pattern matches its text literally.
- Locked rules: every matching locked DENY / NEEDS_APPROVAL rule of an ENFORCE TENANT or PROJECT
  envelope counts, whether or not it is the most specific rule of its envelope. They also act as
  ordinary rules of their envelope in step 5. Locked ALLOW and locked rules at VERSION scope, or
  in SHADOW envelopes, have no special force.
- A budget is exceeded when spent + estimated cost > limit (equal is within budget); a non-finite
  total counts as exceeded. Exceeded budgets also deny NEEDS_APPROVAL results (an approval
  would only lead to a call the budget denies) and VALID grants (money caps are hard).
- Unknown instance states, version states, operator control modes and grant statuses fail
  closed (DENY). An agent whose tenant/project/version is not the one the policy was compiled for
  is denied (`POLICY_AGENT_MISMATCH`): a wrong cache key must not pick someone else's policy.
- Shadow envelopes are reported for every decision past step 1.
- `decide` never raises: an unexpected error is a DENY with reason `ENGINE_ERROR`.
"""

from __future__ import annotations

import enum
import functools
import json
import json.encoder
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import re2

from arm_common.canonical import canonical_json

from .risk import CRITICAL, HIGH, LOW, MEDIUM, Classifier, Risk

__all__ = [
    "DEFAULT_CLASSIFIER",
    "NORMAL_CONTROLS",
    "NO_SPEND",
    "Agent",
    "Budgets",
    "Call",
    "Classifier",
    "CompiledPolicy",
    "Controls",
    "Effect",
    "EffectiveRule",
    "Envelope",
    "Grant",
    "Mode",
    "PolicyError",
    "Reason",
    "Result",
    "Risk",
    "RuleKind",
    "Scope",
    "ShadowResult",
    "Spend",
    "Step",
    "ToolRule",
    "arg_pattern_error",
    "compile_policy",
    "decide",
    "denied_outright",
    "effective_rules",
    "glob_matches",
]


# --- Enums (numbers = proto enum numbers) ------------------------------------------------------


class Effect(enum.IntEnum):
    """arm.governance.v1.Decision."""

    ALLOW = 1
    DENY = 2
    NEEDS_APPROVAL = 3


class Step(enum.IntEnum):
    """arm.governance.v1.DecisionStep."""

    AGENT = 1
    KILL_SWITCH = 2
    APPROVAL_GRANT = 3
    LOCKED_RULE = 4
    ENVELOPE = 5
    BASELINE = 6
    BUDGET = 7


class Scope(enum.IntEnum):
    """arm.governance.v1.PolicyScope."""

    TENANT = 1
    PROJECT = 2
    VERSION = 3


class RuleKind(enum.IntEnum):
    """arm.governance.v1.RuleKind."""

    TOOL_RULE = 1
    DENY_AT_RISK = 2
    REQUIRE_APPROVAL_AT_RISK = 3
    AUTONOMY_TIER = 4
    BUDGET = 5
    DEFAULT_EFFECT = 6


class Mode(enum.IntEnum):
    """arm.governance.v1.PolicyMode."""

    ENFORCE = 1
    SHADOW = 2


ALLOW, DENY, NEEDS_APPROVAL = Effect.ALLOW, Effect.DENY, Effect.NEEDS_APPROVAL
_STRICTNESS = {ALLOW: 0, NEEDS_APPROVAL: 1, DENY: 2}
_BASELINE = {LOW: ALLOW, MEDIUM: ALLOW, HIGH: NEEDS_APPROVAL, CRITICAL: DENY}


class PolicyError(ValueError):
    """An envelope that cannot be compiled (the service validates envelopes on write)."""


# --- Inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolRule:
    """One tool rule of an envelope."""

    tool: str
    """Tool name glob: `*` within one dotted segment, `**` across segments, else literal."""
    effect: Effect
    """Effect when the rule matches."""
    locked: bool = False
    """At TENANT/PROJECT scope, a matching locked DENY/NEEDS_APPROVAL cannot be loosened below."""
    min_risk: Risk | None = None
    """`when.min_risk`: the rule applies only at this effective risk or above."""
    environments: tuple[str, ...] = ()
    """`when.environments`: environment names or types (DEV/STAGING/PROD); empty = all."""
    arg_patterns: tuple[str, ...] = ()
    """`when.arg_patterns`: regexes searched in the arguments' canonical JSON; any may match."""
    description: str = ""
    """Human note, reported as the rule description of decisions the rule makes."""


@dataclass(frozen=True, slots=True)
class Budgets:
    """Spend limits in US dollars; None = no limit."""

    per_run_usd: float | None = None
    daily_usd: float | None = None
    monthly_usd: float | None = None


@dataclass(frozen=True, slots=True)
class Envelope:
    """One revision of a policy envelope, as stored."""

    id: str
    name: str
    revision: int
    scope: Scope
    scope_id: str
    priority: int = 100
    active: bool = True
    shadow: bool = False
    """SHADOW mode: evaluated and reported, never enforced."""
    tool_rules: tuple[ToolRule, ...] = ()
    require_approval_at_risk: Risk | None = None
    deny_at_risk: Risk | None = None
    autonomy_tier: int | None = None
    budgets: Budgets | None = None
    default_effect: Effect | None = None


@dataclass(frozen=True, slots=True)
class Agent:
    """The resolved agent instance (registry's ResolveAgentRef)."""

    tenant_id: str
    tenant_active: bool
    project_id: str
    environment_id: str
    environment_name: str
    environment_type: str
    """DEV, STAGING or PROD."""
    template_id: str
    version_id: str
    instance_id: str
    instance_state: str
    """PROVISIONING, ACTIVE, PAUSED, READONLY, DRAINING, QUARANTINED or RETIRED."""
    version_state: str
    """DRAFT, TESTING, CANDIDATE, APPROVED, DEPRECATED or RETIRED."""


@dataclass(frozen=True, slots=True)
class Controls:
    """Operator controls (kill switches): NORMAL, PAUSED, DRAINING or QUARANTINED."""

    tenant_mode: str = "NORMAL"
    project_mode: str = "NORMAL"


@dataclass(frozen=True, slots=True)
class Spend:
    """Ledger totals already spent by this instance in the current run, UTC day and month."""

    run_usd: float = 0.0
    day_usd: float = 0.0
    month_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class Grant:
    """The service's verdict on a presented approval id: VALID (APPROVED, unexpired, unused,
    bound to this instance, tool and argument digest), PENDING (PENDING or ESCALATED, unexpired,
    bound to this instance, tool and argument digest: the caller is waiting for it), NOT_FOUND,
    NOT_APPROVED, EXPIRED, USED or MISMATCH."""

    status: str


@dataclass(frozen=True, slots=True)
class Call:
    """The tool call to decide."""

    tool: str
    arguments: Mapping[str, Any] | None = None
    declared_risk: Risk | None = None
    estimated_cost_usd: float = 0.0
    is_run_start: bool = False
    grant: Grant | None = None


NORMAL_CONTROLS = Controls()
NO_SPEND = Spend()
DEFAULT_CLASSIFIER = Classifier()


# --- Outputs ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reason:
    """A stable UPPER_SNAKE code and a human sentence."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class ShadowResult:
    """What one SHADOW envelope would have decided (effect None = no opinion)."""

    envelope_id: str
    envelope_revision: int
    scope: Scope
    scope_id: str
    effect: Effect | None
    reasons: tuple[Reason, ...]
    rule_kind: RuleKind | None
    rule_index: int | None
    rule_description: str


@dataclass(frozen=True, slots=True)
class Result:
    """A decision. Results are shared between calls (memoised): never mutate one."""

    effect: Effect
    reasons: tuple[Reason, ...]
    """The deciding reason first, then context (e.g. the result a budget or lock overrode)."""
    risk: Risk
    """Effective risk: max(declared, classified)."""
    step: Step
    scope: Scope | None
    """Scope of the deciding envelope (None when no envelope decided)."""
    scope_id: str
    envelope_id: str
    envelope_revision: int
    rule_kind: RuleKind | None
    rule_index: int | None
    rule_description: str
    shadow: tuple[ShadowResult, ...] = ()


@dataclass(frozen=True, slots=True)
class EffectiveRule:
    """One rule in effect for an agent, tagged with where it came from (GetEffectivePolicy).
    Exactly one of tool_rule / risk_threshold / autonomy_tier / budgets / default_effect is set."""

    scope: Scope
    scope_id: str
    envelope_id: str
    envelope_name: str
    envelope_revision: int
    priority: int
    mode: Mode
    kind: RuleKind
    rule_index: int | None = None
    tool_rule: ToolRule | None = None
    risk_threshold: Risk | None = None
    autonomy_tier: int | None = None
    budgets: Budgets | None = None
    default_effect: Effect | None = None
    locked_stage: bool = False
    """Listed in the locked-rules stage (step 4) rather than at its envelope's position."""


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


# --- Compiled policy ----------------------------------------------------------------------------


class _Env:
    """An envelope, compiled."""

    __slots__ = ("envelope", "id", "name", "revision", "scope", "scope_id", "priority", "shadow",
                 "rules", "gids", "deny_at_risk", "approval_at_risk", "tier", "limits",
                 "default_effect", "label")

    def __init__(self, e: Envelope, patterns: dict[str, int]) -> None:
        self.envelope = e
        self.id, self.name, self.revision = e.id, e.name, e.revision
        self.scope, self.scope_id = Scope(e.scope), e.scope_id
        self.priority, self.shadow = e.priority, bool(e.shadow)
        self.label = (f'envelope "{e.name}" ({e.id}, revision {e.revision}) '
                      f"at {self.scope.name} scope {e.scope_id}")
        rules = [_Rule(self, i, r, patterns) for i, r in enumerate(e.tool_rules)]
        # Most specific first; the first rule whose `when` holds is the one that applies.
        rules.sort(key=lambda r: (not r.exact, -r.literal, r.dstar, -r.strict, r.index))
        self.rules: tuple[_Rule, ...] = tuple(rules)
        self.gids: frozenset[int] = frozenset()  # set by CompiledPolicy
        self.deny_at_risk = None if e.deny_at_risk is None else Risk(e.deny_at_risk)
        self.approval_at_risk = (None if e.require_approval_at_risk is None
                                 else Risk(e.require_approval_at_risk))
        self.tier = e.autonomy_tier
        b = e.budgets
        limits = []
        if b is not None:
            for dim, attr, limit in (("per-run", "run_usd", b.per_run_usd),
                                     ("daily", "day_usd", b.daily_usd),
                                     ("monthly", "month_usd", b.monthly_usd)):
                if limit is not None:
                    limits.append((dim, attr, float(limit)))
        self.limits: tuple[tuple[str, str, float], ...] = tuple(limits)
        self.default_effect = None if e.default_effect is None else Effect(e.default_effect)


class _Rule:
    """A tool rule, compiled."""

    __slots__ = ("env", "index", "rule", "glob", "gid", "exact", "literal", "dstar", "effect",
                 "strict", "locked", "min_risk", "envs", "arg_bits", "description")

    def __init__(self, env: _Env, index: int, rule: ToolRule, patterns: dict[str, int]) -> None:
        self.env, self.index, self.rule, self.glob = env, index, rule, rule.tool
        try:
            self.effect = Effect(rule.effect)
        except ValueError:
            raise PolicyError(f"{env.label}: tool_rules[{index}] has no valid effect") from None
        _regex, self.literal, self.dstar = _glob_parts(rule.tool)
        self.gid = -1  # the glob's id in the policy's _GlobSet, set by CompiledPolicy
        self.exact = "*" not in rule.tool
        self.strict = _STRICTNESS[self.effect]
        self.locked = bool(rule.locked)
        self.min_risk = None if rule.min_risk is None else Risk(rule.min_risk)
        self.envs = frozenset(x.lower() for x in rule.environments)
        bits = 0
        for p in rule.arg_patterns:
            bits |= 1 << patterns.setdefault(p, len(patterns))
        self.arg_bits = bits
        when = []
        if self.min_risk is not None:
            when.append(f"risk ≥ {self.min_risk.name}")
        if rule.environments:
            when.append("environment in " + "/".join(rule.environments))
        if rule.arg_patterns:
            when.append("arguments ~ " + " | ".join(rule.arg_patterns))
        self.description = rule.description or (
            f"{rule.tool} → {self.effect.name}" + (" (locked)" if self.locked else "")
            + (" when " + ", ".join(when) if when else ""))

    def holds(self, risk: Risk, envn: str, envt: str, mask: int) -> bool:
        """Whether the rule's `when` holds (its glob already matched)."""
        if self.min_risk is not None and risk < self.min_risk:
            return False
        if self.envs and envn not in self.envs and envt not in self.envs:
            return False
        return not self.arg_bits or bool(mask & self.arg_bits)


# Memo bounds: tool names come from agents, so the tables must not grow without limit. When one
# is full it is emptied (simpler than LRU, and refilling costs one evaluation per entry).
_PLAN_LIMIT = 4096
_RESULT_LIMIT = 16384


class _ToolPlan:
    """Everything about one tool name that does not depend on the call: candidate rules per
    envelope, matching locked rules, and the memoised results keyed by risk (plus environment
    and argument-pattern matches when some candidate rule looks at them)."""

    __slots__ = ("tool", "cands", "shadow_cands", "locked", "patterns", "pattern_bits",
                 "pattern_set", "keyed", "results")

    def __init__(self, policy: CompiledPolicy, tool: str) -> None:
        self.tool = tool
        hits = policy._globs.match(tool)  # one linear pass per RE2 set, whatever the globs
        self.cands = tuple(_matching(e, hits) for e in policy._enforce)
        self.shadow_cands = tuple(_matching(e, hits) for e in policy._shadow)
        self.locked = tuple(r for r in policy._locked if r.gid in hits)
        every = [r for c in self.cands + self.shadow_cands for r in c] + list(self.locked)
        bits = 0
        for r in every:
            bits |= r.arg_bits
        self.patterns = tuple((1 << i, rx) for i, rx in enumerate(policy._patterns)
                              if bits & (1 << i))
        self.pattern_bits = bits
        # Several patterns: one pass over the arguments for all of them.
        self.pattern_set = policy._pattern_set() if len(self.patterns) > 2 else None
        self.keyed = bool(self.patterns) or any(r.envs for r in every)
        self.results: dict[Any, Result] = {}


def _matching(e: _Env, hits: frozenset[int]) -> tuple[_Rule, ...]:
    """The envelope's rules whose glob matched, most specific first."""
    if hits.isdisjoint(e.gids):
        return ()
    return tuple(r for r in e.rules if r.gid in hits)


class CompiledPolicy:
    """The active envelopes that apply to one (tenant, project, version), ready for `decide`.
    Immutable once built, apart from internal memo tables; share one per agent version."""

    __slots__ = ("tenant_id", "project_id", "version_id", "_enforce", "_groups", "_shadow",
                 "_locked", "_globs", "_patterns", "_pattern_texts", "_all_patterns", "_plans", "_memo_size", "_has_budget", "_min_run",
                 "_min_day", "_min_month")

    def __init__(self, tenant_id: str, project_id: str, version_id: str,
                 envelopes: list[Envelope]) -> None:
        self.tenant_id, self.project_id, self.version_id = tenant_id, project_id, version_id
        patterns: dict[str, int] = {}
        # Evaluation order: VERSION > PROJECT > TENANT, priority high → low, then name and id so
        # that the order (and so every report) does not depend on the order envelopes came in.
        ordered = sorted(envelopes, key=lambda e: (-int(e.scope), -e.priority, e.name, e.id))
        envs = [_Env(e, patterns) for e in ordered]
        self._enforce: tuple[_Env, ...] = tuple(e for e in envs if not e.shadow)
        self._shadow: tuple[_Env, ...] = tuple(e for e in envs if e.shadow)
        groups: list[list[int]] = []
        last: tuple[Scope, int] | None = None
        for i, e in enumerate(self._enforce):
            if (e.scope, e.priority) != last:
                groups.append([])
                last = (e.scope, e.priority)
            groups[-1].append(i)
        self._groups: tuple[tuple[int, ...], ...] = tuple(tuple(g) for g in groups)
        locked = [r for e in sorted(self._enforce, key=lambda e: int(e.scope))
                  if e.scope is not Scope.VERSION
                  for r in sorted(e.rules, key=lambda r: r.index)
                  if r.locked and r.effect is not ALLOW]
        self._locked: tuple[_Rule, ...] = tuple(locked)
        self._globs = _GlobSet(r.glob for e in envs for r in e.rules)
        for e in envs:
            for r in e.rules:
                r.gid = self._globs.ids[r.glob]
            e.gids = frozenset(r.gid for r in e.rules)
        self._patterns = tuple(_compile_arg_pattern(p) for p in patterns)
        self._pattern_texts = tuple(patterns)
        self._all_patterns: _PatternSet | None = None
        self._plans: dict[str, _ToolPlan] = {}
        self._memo_size = 0  # results memoised over all plans
        # The fast budget check: the tightest limit per dimension over every envelope (enforced
        # or shadow); only when one of them is crossed is the exact evaluation needed.
        inf = math.inf
        mins = {"run_usd": inf, "day_usd": inf, "month_usd": inf}
        for e in envs:
            for _dim, attr, limit in e.limits:
                # A NaN limit is crossed by any spend (fail safe); min() would skip it.
                mins[attr] = -inf if math.isnan(limit) else min(mins[attr], limit)
        self._has_budget = any(e.limits for e in envs)
        self._min_run, self._min_day, self._min_month = (
            mins["run_usd"], mins["day_usd"], mins["month_usd"])

    @property
    def envelopes(self) -> tuple[Envelope, ...]:
        """The enforced envelopes in evaluation order."""
        return tuple(e.envelope for e in self._enforce)

    @property
    def shadow_envelopes(self) -> tuple[Envelope, ...]:
        """The shadow envelopes, in the same order."""
        return tuple(e.envelope for e in self._shadow)

    def _pattern_set(self) -> _PatternSet | None:
        if self._all_patterns is None:
            try:
                self._all_patterns = _PatternSet(self._pattern_texts)
            except (re2.error, UnicodeEncodeError):
                return None
        return self._all_patterns

    def _forget(self) -> None:
        self._plans.clear()
        self._memo_size = 0

    def _plan(self, tool: str) -> _ToolPlan:
        plan = self._plans.get(tool)
        if plan is None:
            plan = _ToolPlan(self, tool)
            if len(self._plans) >= _PLAN_LIMIT:
                self._forget()
            self._plans[tool] = plan
        return plan


def compile_policy(envelopes: Iterable[Envelope], *, tenant_id: str, project_id: str,
                   version_id: str) -> CompiledPolicy:
    """Keeps the active envelopes attached to this tenant, project or version and compiles them.
    Raises PolicyError for an envelope that cannot be compiled."""
    wanted = {(Scope.TENANT, tenant_id), (Scope.PROJECT, project_id), (Scope.VERSION, version_id)}
    kept = []
    for e in envelopes:
        try:
            scope = Scope(e.scope)
        except ValueError:
            continue
        if e.active and (scope, e.scope_id) in wanted:
            kept.append(e)
    return CompiledPolicy(tenant_id, project_id, version_id, kept)


def effective_rules(policy: CompiledPolicy) -> list[EffectiveRule]:
    """The merged rules in evaluation order: locked TENANT/PROJECT DENY and NEEDS_APPROVAL rules
    first (listed once, there), then enforced envelopes VERSION > PROJECT > TENANT by priority
    with their tool rules in envelope order, then risk rules, tier, budgets, default effect;
    then the SHADOW envelopes in the same layout."""
    out: list[EffectiveRule] = []

    def tag(e: _Env, kind: RuleKind, **kw: Any) -> EffectiveRule:
        return EffectiveRule(e.scope, e.scope_id, e.id, e.name, e.revision, e.priority,
                             Mode.SHADOW if e.shadow else Mode.ENFORCE, kind, **kw)

    locked = set()
    for r in policy._locked:
        locked.add(id(r))
        out.append(tag(r.env, RuleKind.TOOL_RULE, rule_index=r.index, tool_rule=r.rule,
                       locked_stage=True))
    for e in policy._enforce + policy._shadow:
        for r in sorted(e.rules, key=lambda r: r.index):
            if id(r) not in locked:
                out.append(tag(e, RuleKind.TOOL_RULE, rule_index=r.index, tool_rule=r.rule))
        if e.deny_at_risk is not None:
            out.append(tag(e, RuleKind.DENY_AT_RISK, risk_threshold=e.deny_at_risk))
        if e.approval_at_risk is not None:
            out.append(tag(e, RuleKind.REQUIRE_APPROVAL_AT_RISK, risk_threshold=e.approval_at_risk))
        if e.tier is not None:
            out.append(tag(e, RuleKind.AUTONOMY_TIER, autonomy_tier=e.tier))
        if e.limits:
            out.append(tag(e, RuleKind.BUDGET, budgets=e.envelope.budgets))
        if e.default_effect is not None:
            out.append(tag(e, RuleKind.DEFAULT_EFFECT, default_effect=e.default_effect))
    return out


# --- Evaluation (memoised per tool name; the exact path when budgets are crossed) ----------------


class _Hit(NamedTuple):
    """What one step or envelope decided, before it becomes a Result."""

    effect: Effect
    reasons: tuple[Reason, ...]
    step: Step
    env: _Env | None
    kind: RuleKind | None
    rule_index: int | None
    description: str


def _budget_over(e: _Env, spend: Spend, cost: float) -> tuple[str, float, float] | None:
    for dim, attr, limit in e.limits:
        total = getattr(spend, attr) + cost
        if not total <= limit:  # NaN counts as over
            return dim, total, limit
    return None


def _budget_hit(e: _Env, tool: str, over: tuple[str, float, float], step: Step,
                context: tuple[Reason, ...] = ()) -> _Hit:
    dim, total, limit = over
    reason = Reason("BUDGET_EXCEEDED",
                    f'Tool "{tool}" would bring the {dim} spend to ${total:.4f}, over the {dim} '
                    f"budget of ${limit:.2f} of {e.label}.")
    return _Hit(DENY, (reason, *context), step, e, RuleKind.BUDGET, None,
                f"budgets: {dim} ≤ ${limit:.2f}")


def _first_over(policy: CompiledPolicy, spend: Spend, cost: float
                ) -> tuple[_Env, tuple[str, float, float]] | None:
    for e in policy._enforce:
        if e.limits:
            over = _budget_over(e, spend, cost)
            if over is not None:
                return e, over
    return None


def _envelope(e: _Env, cands: tuple[_Rule, ...], tool: str, risk: Risk, envn: str, envt: str,
              mask: int, spend: Spend | None, cost: float) -> _Hit | None:
    """Steps 5a–f for one envelope; None when it has no opinion."""
    for r in cands:
        if r.holds(risk, envn, envt, mask):
            return _Hit(r.effect, (Reason(
                "TOOL_RULE_MATCHED",
                f'Tool "{tool}" matched rule #{r.index} `{r.glob}` → {r.effect.name}'
                f"{' (locked)' if r.locked else ''} of {e.label}."),),
                Step.ENVELOPE, e, RuleKind.TOOL_RULE, r.index, r.description)
    if e.deny_at_risk is not None and risk >= e.deny_at_risk:
        return _Hit(DENY, (Reason(
            "RISK_AT_OR_ABOVE_DENY_THRESHOLD",
            f'Tool "{tool}" has effective risk {risk.name}, at or above the deny threshold '
            f"{e.deny_at_risk.name} of {e.label}."),),
            Step.ENVELOPE, e, RuleKind.DENY_AT_RISK, None, f"deny_at_risk {e.deny_at_risk.name}")
    if e.approval_at_risk is not None and risk >= e.approval_at_risk:
        return _Hit(NEEDS_APPROVAL, (Reason(
            "RISK_AT_OR_ABOVE_APPROVAL_THRESHOLD",
            f'Tool "{tool}" has effective risk {risk.name}, at or above the approval threshold '
            f"{e.approval_at_risk.name} of {e.label}."),),
            Step.ENVELOPE, e, RuleKind.REQUIRE_APPROVAL_AT_RISK, None,
            f"require_approval_at_risk {e.approval_at_risk.name}")
    tier = e.tier
    if tier is not None:
        if type(tier) is not int or not 0 <= tier <= 5:
            return _Hit(NEEDS_APPROVAL, (Reason(
                "INVALID_AUTONOMY_TIER",
                f"Autonomy tier {tier!r} of {e.label} is outside 0–5, so tool \"{tool}\" needs "
                "approval (fail safe)."),),
                Step.ENVELOPE, e, RuleKind.AUTONOMY_TIER, None, f"autonomy_tier {tier!r}")
        if tier == 0 or (tier == 1 and risk >= HIGH) or (tier == 2 and risk >= CRITICAL):
            return _Hit(NEEDS_APPROVAL, (Reason(
                "AUTONOMY_TIER_REQUIRES_APPROVAL",
                f'Tool "{tool}" at effective risk {risk.name} needs approval under autonomy '
                f"tier {tier} of {e.label}."),),
                Step.ENVELOPE, e, RuleKind.AUTONOMY_TIER, None, f"autonomy_tier {tier}")
    if spend is not None and e.limits:
        over = _budget_over(e, spend, cost)
        if over is not None:
            return _budget_hit(e, tool, over, Step.ENVELOPE)
    if e.default_effect is not None:
        return _Hit(e.default_effect, (Reason(
            "DEFAULT_EFFECT",
            f'No rule of {e.label} decided tool "{tool}"; its default effect is '
            f"{e.default_effect.name}."),),
            Step.ENVELOPE, e, RuleKind.DEFAULT_EFFECT, None,
            f"default_effect {e.default_effect.name}")
    return None


def _enforced(policy: CompiledPolicy, plan: _ToolPlan, risk: Risk, envn: str, envt: str,
              mask: int, spend: Spend | None, cost: float) -> _Hit:
    """Steps 4–6 and budgets on top. `spend` None: no budget is crossed (the memoised case)."""
    tool = plan.tool
    locked_na: _Rule | None = None
    for r in plan.locked:
        if r.holds(risk, envn, envt, mask):
            if r.effect is DENY:
                return _locked_hit(r, tool, ())
            if locked_na is None:
                locked_na = r
    hit: _Hit | None = None
    cands = plan.cands
    enforce = policy._enforce
    for group in policy._groups:
        for i in group:
            h = _envelope(enforce[i], cands[i], tool, risk, envn, envt, mask, spend, cost)
            if h is not None and (hit is None or _STRICTNESS[h.effect] > _STRICTNESS[hit.effect]):
                hit = h
        if hit is not None:
            break
    if hit is None:
        effect = _BASELINE[risk]
        hit = _Hit(effect, (Reason(
            f"BASELINE_{risk.name}",
            f'No envelope decided tool "{tool}"; the baseline for {risk.name} risk is '
            f"{effect.name}."),), Step.BASELINE, None, None, None,
            f"baseline {risk.name} → {effect.name}")
    if spend is not None and hit.effect is not DENY:
        first = _first_over(policy, spend, cost)
        if first is not None:
            hit = _budget_hit(first[0], tool, first[1], Step.BUDGET, hit.reasons)
    if locked_na is not None and hit.effect is not DENY:
        hit = _locked_hit(locked_na, tool, hit.reasons)
    return hit


def _locked_hit(r: _Rule, tool: str, context: tuple[Reason, ...]) -> _Hit:
    reason = Reason("LOCKED_RULE_MATCHED",
                    f'Tool "{tool}" matched locked rule #{r.index} `{r.glob}` → {r.effect.name} '
                    f"of {r.env.label}; lower scopes cannot loosen it.")
    return _Hit(r.effect, (reason, *context), Step.LOCKED_RULE, r.env, RuleKind.TOOL_RULE,
                r.index, r.description)


def _shadows(policy: CompiledPolicy, plan: _ToolPlan, risk: Risk, envn: str, envt: str,
             mask: int, spend: Spend | None, cost: float) -> tuple[ShadowResult, ...]:
    out = []
    for e, cands in zip(policy._shadow, plan.shadow_cands, strict=True):
        h = _envelope(e, cands, plan.tool, risk, envn, envt, mask, spend, cost)
        if h is None:
            out.append(ShadowResult(e.id, e.revision, e.scope, e.scope_id, None, (Reason(
                "NO_DECISION", f'Shadow {e.label} has no opinion on tool "{plan.tool}".'),),
                None, None, ""))
        else:
            out.append(ShadowResult(e.id, e.revision, e.scope, e.scope_id, h.effect, h.reasons,
                                    h.kind, h.rule_index, h.description))
    return tuple(out)


def _result(hit: _Hit, risk: Risk, shadow: tuple[ShadowResult, ...]) -> Result:
    e = hit.env
    if e is None:
        return Result(hit.effect, hit.reasons, risk, hit.step, None, "", "", 0, hit.kind,
                      hit.rule_index, hit.description, shadow)
    return Result(hit.effect, hit.reasons, risk, hit.step, e.scope, e.scope_id, e.id, e.revision,
                  hit.kind, hit.rule_index, hit.description, shadow)


def _evaluate(policy: CompiledPolicy, plan: _ToolPlan, risk: Risk, envn: str, envt: str,
              mask: int, spend: Spend | None, cost: float) -> Result:
    return _result(_enforced(policy, plan, risk, envn, envt, mask, spend, cost), risk,
                   _shadows(policy, plan, risk, envn, envt, mask, spend, cost))


def _mask(plan: _ToolPlan, arguments: Any) -> int:
    if not plan.patterns:
        return 0
    text = _arguments_text(arguments).encode()
    if plan.pattern_set is not None:
        found = plan.pattern_set.match(text)
        if found is not None:
            return found & plan.pattern_bits
    mask = 0
    for bit, rx in plan.patterns:
        if rx.search(text) is not None:
            mask |= bit
    return mask


# --- Steps 1–3 ----------------------------------------------------------------------------------

_LIVE_VERSION_STATES = frozenset({"DRAFT", "TESTING", "CANDIDATE", "APPROVED", "DEPRECATED"})
_INSTANCE_STATES = frozenset({"PROVISIONING", "ACTIVE", "PAUSED", "READONLY", "DRAINING",
                              "QUARANTINED", "RETIRED"})
_CONTROL_MODES = frozenset({"NORMAL", "PAUSED", "DRAINING", "QUARANTINED"})
_GRANT_STATUSES = frozenset({"VALID", "PENDING", "NOT_FOUND", "NOT_APPROVED", "EXPIRED", "USED",
                             "MISMATCH"})


def _norm(value: Any, prefix: str) -> str:
    """Accepts `ACTIVE`, `active` and the proto spelling `INSTANCE_STATE_ACTIVE` alike."""
    text = str(value).strip().upper()
    return text[len(prefix):] if text.startswith(prefix) else text


def _plain(effect: Effect, code: str, message: str, risk: Risk, step: Step,
           shadow: tuple[ShadowResult, ...] = (), context: tuple[Reason, ...] = ()) -> Result:
    return Result(effect, (Reason(code, message), *context), risk, step, None, "", "", 0, None,
                  None, "", shadow)


def _agent_denial(policy: CompiledPolicy, agent: Agent, call: Call, risk: Risk) -> Result | None:
    tool = call.tool
    if not agent.tenant_active:
        return _plain(DENY, "TENANT_INACTIVE",
                      f'Tenant {agent.tenant_id} is inactive; tool "{tool}" is denied.',
                      risk, Step.AGENT)
    state = _norm(agent.version_state, "VERSION_STATE_")
    if state == "RETIRED":
        return _plain(DENY, "VERSION_RETIRED",
                      f'Agent version {agent.version_id} is RETIRED; tool "{tool}" is denied.',
                      risk, Step.AGENT)
    if state not in _LIVE_VERSION_STATES:
        return _plain(DENY, "VERSION_STATE_UNKNOWN",
                      f"Agent version {agent.version_id} is in unknown state "
                      f'{agent.version_state!r}; tool "{tool}" is denied (fail closed).',
                      risk, Step.AGENT)
    if (agent.tenant_id != policy.tenant_id or agent.project_id != policy.project_id
            or agent.version_id != policy.version_id):
        return _plain(DENY, "POLICY_AGENT_MISMATCH",
                      f"The policy was compiled for tenant {policy.tenant_id}, project "
                      f"{policy.project_id}, version {policy.version_id}, not for instance "
                      f'{agent.instance_id}; tool "{tool}" is denied (fail closed).',
                      risk, Step.AGENT)
    return None


def _kill_switch(agent: Agent, call: Call, risk: Risk, controls: Controls,
                 shadow: tuple[ShadowResult, ...]) -> Result | None:
    tool = call.tool
    for scope, raw, scope_id in (("TENANT", controls.tenant_mode, agent.tenant_id),
                                 ("PROJECT", controls.project_mode, agent.project_id)):
        mode = _norm(raw, "OPERATOR_CONTROL_MODE_")
        if mode == "NORMAL":
            continue
        what = f"{scope.capitalize()} {scope_id}"
        if mode in ("PAUSED", "QUARANTINED"):
            return _plain(DENY, f"{scope}_{mode}",
                          f'{what} is {mode} by its operator control; tool "{tool}" is denied.',
                          risk, Step.KILL_SWITCH, shadow)
        if mode == "DRAINING":
            if call.is_run_start:
                return _plain(DENY, f"{scope}_DRAINING",
                              f'{what} is DRAINING: no new runs; tool "{tool}" would start one.',
                              risk, Step.KILL_SWITCH, shadow)
            continue
        return _plain(DENY, f"{scope}_CONTROL_UNKNOWN",
                      f'{what} has unknown operator control mode {raw!r}; tool "{tool}" is '
                      "denied (fail closed).", risk, Step.KILL_SWITCH, shadow)
    state = _norm(agent.instance_state, "INSTANCE_STATE_")
    what = f"Instance {agent.instance_id}"
    if state in ("PAUSED", "QUARANTINED", "PROVISIONING", "RETIRED"):
        return _plain(DENY, f"INSTANCE_{state}", f'{what} is {state}; tool "{tool}" is denied.',
                      risk, Step.KILL_SWITCH, shadow)
    if state == "READONLY":
        if risk >= MEDIUM:
            return _plain(DENY, "INSTANCE_READONLY",
                          f'{what} is READONLY and tool "{tool}" has effective risk {risk.name}; '
                          "only LOW-risk calls are allowed.", risk, Step.KILL_SWITCH, shadow)
    elif state == "DRAINING":
        if call.is_run_start:
            return _plain(DENY, "INSTANCE_DRAINING",
                          f'{what} is DRAINING: no new runs; tool "{tool}" would start one.',
                          risk, Step.KILL_SWITCH, shadow)
    elif state not in _INSTANCE_STATES:
        return _plain(DENY, "INSTANCE_STATE_UNKNOWN",
                      f'{what} is in unknown state {agent.instance_state!r}; tool "{tool}" is '
                      "denied (fail closed).", risk, Step.KILL_SWITCH, shadow)
    return None


def _granted(policy: CompiledPolicy, call: Call, risk: Risk, spend: Spend,
             shadow: tuple[ShadowResult, ...]) -> Result:
    tool, grant = call.tool, call.grant
    status = _norm(getattr(grant, "status", ""), "APPROVAL_")
    if status == "VALID":
        reason = Reason("APPROVAL_GRANTED",
                        f'An approval granted for exactly this call allows tool "{tool}" once.')
        if policy._has_budget:
            first = _first_over(policy, spend, call.estimated_cost_usd)
            if first is not None:
                return _result(_budget_hit(first[0], tool, first[1], Step.BUDGET, (reason,)),
                               risk, shadow)
        return Result(ALLOW, (reason,), risk, Step.APPROVAL_GRANT, None, "", "", 0, None, None,
                      "", shadow)
    if status == "PENDING":
        # The approval this very call asked for is still open: keep waiting for it, rather than
        # deny (which would write a POLICY_DENIED for a call nobody refused) or ask again.
        reason = Reason("APPROVAL_PENDING",
                        f'The presented approval for tool "{tool}" is not decided yet; the call '
                        "waits for it.")
        if policy._has_budget:
            first = _first_over(policy, spend, call.estimated_cost_usd)
            if first is not None:
                return _result(_budget_hit(first[0], tool, first[1], Step.BUDGET, (reason,)),
                               risk, shadow)
        return Result(NEEDS_APPROVAL, (reason,), risk, Step.APPROVAL_GRANT, None, "", "", 0, None,
                      None, "", shadow)
    messages = {
        "NOT_FOUND": "was not found",
        "NOT_APPROVED": "is not approved",
        "EXPIRED": "has expired",
        "USED": "was already used",
        "MISMATCH": "was granted for another instance, tool or arguments",
    }
    if status not in _GRANT_STATUSES:
        return _plain(DENY, "APPROVAL_INVALID",
                      f"The presented approval has unknown status {getattr(grant, 'status', None)!r}; "
                      f'tool "{tool}" is denied (fail closed).', risk, Step.APPROVAL_GRANT, shadow)
    return _plain(DENY, f"APPROVAL_{status}",
                  f'The presented approval {messages[status]}; tool "{tool}" is denied.',
                  risk, Step.APPROVAL_GRANT, shadow)


# --- decide -------------------------------------------------------------------------------------


def decide(policy: CompiledPolicy, agent: Agent | None, call: Call, *,
           controls: Controls = NORMAL_CONTROLS, spend: Spend = NO_SPEND,
           classifier: Classifier = DEFAULT_CLASSIFIER) -> Result:
    """Decides one tool call (SPEC §3 "The decision"). Never raises."""
    try:
        tool = call.tool
        arguments = call.arguments
        risk = classifier.classify(tool, arguments)
        declared = call.declared_risk
        if declared is not None and declared > risk:
            risk = Risk(declared)
        if agent is None:
            return _plain(DENY, "UNKNOWN_AGENT",
                          f'The agent is unknown; tool "{tool}" is denied (fail closed).',
                          risk, Step.AGENT)
        if (not agent.tenant_active or agent.version_state not in _LIVE_VERSION_STATES
                or agent.version_id != policy.version_id or agent.tenant_id != policy.tenant_id
                or agent.project_id != policy.project_id):
            denied = _agent_denial(policy, agent, call, risk)
            if denied is not None:
                return denied

        plan = policy._plans.get(tool) or policy._plan(tool)
        if plan.keyed:
            envn = agent.environment_name.lower()
            envt = agent.environment_type.lower()
            mask = _mask(plan, arguments)
            key: Any = (risk, envn, envt, mask)
        else:
            envn = envt = ""
            mask = 0
            key = risk
        result = plan.results.get(key)
        if result is None:
            result = _evaluate(policy, plan, risk, envn, envt, mask, None, 0.0)
            policy._memo_size += 1
            if policy._memo_size > _RESULT_LIMIT:
                policy._forget()  # this plan stays usable for this call
            plan.results[key] = result
        if policy._has_budget:
            cost = call.estimated_cost_usd
            if not (spend.run_usd + cost <= policy._min_run
                    and spend.day_usd + cost <= policy._min_day
                    and spend.month_usd + cost <= policy._min_month):
                if not plan.keyed:
                    envn = agent.environment_name.lower()
                    envt = agent.environment_type.lower()
                result = _evaluate(policy, plan, risk, envn, envt, mask, spend, cost)

        if (agent.instance_state != "ACTIVE" or controls.tenant_mode != "NORMAL"
                or controls.project_mode != "NORMAL"):
            killed = _kill_switch(agent, call, risk, controls, result.shadow)
            if killed is not None:
                return killed
        if call.grant is not None:
            return _granted(policy, call, risk, spend, result.shadow)
        return result
    except Exception as exc:  # noqa: BLE001 — the hot path fails closed, never open
        return _plain(DENY, "ENGINE_ERROR",
                      f"The policy engine failed on tool {getattr(call, 'tool', '?')!r} "
                      f"({type(exc).__name__}: {exc}); the call is denied (fail closed).",
                      _declared_or(call, HIGH), Step.AGENT)


# --- Denied outright (ListDeniedTools) ------------------------------------------------------------

OUTRIGHT_MAX_PATTERNS = 8
"""More argument patterns than this on one tool's rules: it is never reported denied outright
(2^n combinations would be evaluated)."""


def denied_outright(policy: CompiledPolicy, agent: Agent, tool: str,
                    declared_risk: Risk | None = None) -> Result | None:
    """The DENY that the policy (locked rules, enforced envelopes, baseline: steps 4-6) gives
    every call of `tool` by `agent`, whatever its arguments; None when some call could be allowed
    or need approval. "Whatever its arguments" is taken conservatively: every effective risk from
    the declared one (LOW when none) up, and every combination of the tool's argument-pattern
    matches. Agent and version state, kill switches, budgets and approvals are not considered
    (they change at run time; `decide` still applies them). The result is the one at the
    declared risk with no pattern matching."""
    plan = policy._plans.get(tool) or policy._plan(tool)
    bits = [bit for bit, _rx in plan.patterns]
    if len(bits) > OUTRIGHT_MAX_PATTERNS:
        return None
    envn, envt = agent.environment_name.lower(), agent.environment_type.lower()
    first: Result | None = None
    for risk in Risk:
        if declared_risk is not None and risk < declared_risk:
            continue
        for combo in range(1 << len(bits)):
            mask = 0
            for i, bit in enumerate(bits):
                if combo & (1 << i):
                    mask |= bit
            hit = _enforced(policy, plan, risk, envn, envt, mask, None, 0.0)
            if hit.effect is not DENY:
                return None
            if first is None:
                first = _result(hit, risk, ())
    return first

def _declared_or(call: Any, default: Risk) -> Risk:
    declared = getattr(call, "declared_risk", None)
    try:
        return max(default, Risk(declared)) if declared is not None else default
    except (ValueError, TypeError):
        return default
