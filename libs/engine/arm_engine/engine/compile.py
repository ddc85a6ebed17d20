"""Compiling envelopes into a `CompiledPolicy`: rules sorted by specificity, one RE2 set of globs,
per-tool plans memoised; `effective_rules` lists what is in effect."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import re2

from ..risk import Risk
from .globs import _compile_arg_pattern, _glob_parts, _GlobSet, _PatternSet
from .types import (
    _STRICTNESS,
    ALLOW,
    Effect,
    EffectiveRule,
    Envelope,
    Mode,
    PolicyError,
    Result,
    RuleKind,
    Scope,
    ToolRule,
)

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
# is full it is emptied (simpler than LRU, and refilling costs one evaluation per entry). The
# results' bound, _RESULT_LIMIT, is decide's.
_PLAN_LIMIT = 4096


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
