"""Evaluation: the steps of `decide`, memoised per tool name, exact when budgets are crossed.
`decide` never raises."""

from __future__ import annotations

from typing import Any, NamedTuple

from ..risk import CRITICAL, HIGH, MEDIUM, Classifier, Risk
from .compile import CompiledPolicy, _Env, _Rule, _ToolPlan
from .globs import _arguments_text
from .types import (
    _BASELINE,
    _STRICTNESS,
    ALLOW,
    DEFAULT_CLASSIFIER,
    DENY,
    NEEDS_APPROVAL,
    NO_SPEND,
    NORMAL_CONTROLS,
    Agent,
    Call,
    Controls,
    Effect,
    Reason,
    Result,
    RuleKind,
    ShadowResult,
    Spend,
    Step,
)

# --- Evaluation (memoised per tool name; the exact path when budgets are crossed) ----------------


_RESULT_LIMIT = 16384  # memoised results per compiled policy (see compile._PLAN_LIMIT)

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
