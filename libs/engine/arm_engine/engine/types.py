"""The engine's inputs and outputs: enums numbered as their proto enums, the frozen dataclasses
`decide` takes and returns."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..risk import CRITICAL, HIGH, LOW, MEDIUM, Classifier, Risk

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
