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

The package: `types` (the enums, numbered as their proto enums, and the frozen inputs and
outputs), `globs` (tool globs and argument patterns as RE2 sets, the arguments' canonical text),
`compile` (`compile_policy`, `CompiledPolicy`, `effective_rules`) and `decide` (the steps above).
Everything public is importable from `arm_engine.engine`.
"""

from __future__ import annotations

from ..risk import Classifier, Risk
from .compile import CompiledPolicy, compile_policy, effective_rules
from .decide import decide, denied_outright
from .globs import arg_pattern_error, glob_matches
from .types import (
    DEFAULT_CLASSIFIER,
    NO_SPEND,
    NORMAL_CONTROLS,
    Agent,
    Budgets,
    Call,
    Controls,
    Effect,
    EffectiveRule,
    Envelope,
    Grant,
    Mode,
    PolicyError,
    Reason,
    Result,
    RuleKind,
    Scope,
    ShadowResult,
    Spend,
    Step,
    ToolRule,
)

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

