"""Policies as files (docs/policies.md): the YAML form of policy envelopes, read into a normal form
(`Spec`) that both sides of `arm policy apply` compare — the files and the live envelopes — and
turned into the API's message or into the engine's dataclasses for offline tests.

One envelope per YAML document, several documents per file. Scope by slug: `scope: tenant`,
`scope: {project: payments}`, `scope: {version: billing-agent@3}` (add `project:` beside `version`
when the template slug is in several projects). Unknown keys are errors, so a typo never silently
drops a rule.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from arm.governance.v1 import policy_pb2
from arm_engine import engine, limits
from arm_engine.risk import ArgumentTrigger, Risk, RiskOverride, tenant_triggers

EFFECTS = {"ALLOW": 1, "DENY": 2, "NEEDS_APPROVAL": 3}
RISKS = {"LOW": 1, "MEDIUM": 2, "HIGH": 3, "CRITICAL": 4}
MODES = {"ENFORCE": 1, "SHADOW": 2}
_ENVELOPE_KEYS = {"name", "description", "scope", "priority", "mode", "active", "tool_rules",
                  "require_approval_at_risk", "deny_at_risk", "autonomy_tier", "budgets", "default_effect"}
_RULE_KEYS = {"tool", "effect", "locked", "when", "description"}
_WHEN_KEYS = {"min_risk", "environments", "arg_patterns"}
_BUDGET_KEYS = {"per_run_usd", "daily_usd", "monthly_usd"}


class FileError(ValueError):
    """A policy file that cannot be read: the message names the file, document and field."""


@dataclass(frozen=True)
class ScopeRef:
    """`kind` is tenant, project or version; `ref` the project slug or `TEMPLATE@NUMBER`;
    `project` the template's project slug for an ambiguous version (optional)."""

    kind: str
    ref: str = ""
    project: str = field(default="", compare=False)
    """Only where to look the version's template up: not part of the scope's identity."""

    def to_yaml(self) -> Any:
        if self.kind == "tenant":
            return "tenant"
        out = {self.kind: self.ref}
        if self.project:
            out["project"] = self.project
        return out

    def __str__(self) -> str:
        return "tenant" if self.kind == "tenant" else f"{self.kind} {self.ref}"


@dataclass(frozen=True)
class Spec:
    """One envelope in normal form: every default filled in, so equal specs mean equal policies."""

    name: str
    scope: ScopeRef
    description: str = ""
    priority: int = 100
    mode: str = "ENFORCE"
    active: bool = True
    tool_rules: tuple[dict[str, Any], ...] = ()
    require_approval_at_risk: str | None = None
    deny_at_risk: str | None = None
    autonomy_tier: int | None = None
    budgets: dict[str, float] | None = None
    default_effect: str | None = None
    source: str = field(default="", compare=False)
    """Where it was read from (file and document), for messages."""

    def to_yaml(self) -> dict[str, Any]:
        """The document form, in a stable key order, leaving out defaults."""
        out: dict[str, Any] = {"name": self.name, "scope": self.scope.to_yaml()}
        if self.description:
            out["description"] = self.description
        if self.priority != 100:
            out["priority"] = self.priority
        if self.mode != "ENFORCE":
            out["mode"] = self.mode
        if not self.active:
            out["active"] = False
        for key in ("require_approval_at_risk", "deny_at_risk", "autonomy_tier", "default_effect"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.budgets:
            out["budgets"] = dict(self.budgets)
        if self.tool_rules:
            out["tool_rules"] = [_rule_yaml(r) for r in self.tool_rules]
        return out


def _rule_yaml(rule: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"tool": rule["tool"], "effect": rule["effect"]}
    if rule["locked"]:
        out["locked"] = True
    when = {k: v for k, v in rule["when"].items() if v}
    if when:
        out["when"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in when.items()}
    if rule["description"]:
        out["description"] = rule["description"]
    return out


def _enum(value: Any, table: dict[str, int], where: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    text = str(value).upper() if value is not None else ""
    if text not in table:
        raise FileError(f"{where}: must be one of {', '.join(table)}, not {value!r}")
    return text


def _keys(doc: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise FileError(f"{where}: must be a mapping")
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise FileError(f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    return doc


def parse_scope(value: Any, where: str) -> ScopeRef:
    if value == "tenant" or value == {"tenant": None} or value == {"tenant": True}:
        return ScopeRef("tenant")
    if isinstance(value, dict):
        if set(value) == {"project"} and isinstance(value["project"], str) and value["project"]:
            return ScopeRef("project", value["project"])
        if "version" in value and set(value) <= {"version", "project"}:
            ref = str(value["version"])
            slug, _, number = ref.rpartition("@")
            if not slug or not number.isdigit():
                raise FileError(f"{where}.scope.version: expected TEMPLATE@NUMBER, not {ref!r}")
            return ScopeRef("version", ref, str(value.get("project") or ""))
    raise FileError(f"{where}.scope: expected `tenant`, `{{project: SLUG}}` or `{{version: TEMPLATE@N}}`, "
                    f"not {value!r}")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FileError(f"{where}: must be a number, not {value!r}")
    return float(value)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FileError(f"{where}: must be a list of strings")
    return tuple(value)


def parse_rule(doc: Any, where: str) -> dict[str, Any]:
    d = _keys(doc, _RULE_KEYS, where)
    if not isinstance(d.get("tool"), str) or not d["tool"]:
        raise FileError(f"{where}.tool: is required (a tool name or glob)")
    when = _keys(d.get("when") or {}, _WHEN_KEYS, f"{where}.when")
    locked = d.get("locked", False)
    if not isinstance(locked, bool):
        raise FileError(f"{where}.locked: must be true or false")
    return {"tool": d["tool"], "effect": _enum(d.get("effect"), EFFECTS, f"{where}.effect"), "locked": locked,
            "when": {"min_risk": _enum(when.get("min_risk"), RISKS, f"{where}.when.min_risk", optional=True),
                     "environments": _strings(when.get("environments"), f"{where}.when.environments"),
                     "arg_patterns": _strings(when.get("arg_patterns"), f"{where}.when.arg_patterns")},
            "description": str(d.get("description") or "")}


def parse_envelope(doc: Any, where: str) -> Spec:
    d = _keys(doc, _ENVELOPE_KEYS, where)
    name = d.get("name")
    if not isinstance(name, str) or not name.strip():
        raise FileError(f"{where}.name: is required")
    priority = d.get("priority", 100)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise FileError(f"{where}.priority: must be an integer")
    tier = d.get("autonomy_tier")
    if tier is not None and (isinstance(tier, bool) or not isinstance(tier, int)):
        raise FileError(f"{where}.autonomy_tier: must be an integer 0-5")
    active = d.get("active", True)
    if not isinstance(active, bool):
        raise FileError(f"{where}.active: must be true or false")
    budgets = None
    if d.get("budgets") is not None:
        b = _keys(d["budgets"], _BUDGET_KEYS, f"{where}.budgets")
        budgets = {k: _number(v, f"{where}.budgets.{k}") for k, v in b.items() if v is not None} or None
    rules = d.get("tool_rules") or []
    if not isinstance(rules, list):
        raise FileError(f"{where}.tool_rules: must be a list")
    return Spec(
        name=name, scope=parse_scope(d.get("scope"), where), description=str(d.get("description") or ""),
        priority=priority, mode=_enum(d.get("mode", "ENFORCE"), MODES, f"{where}.mode") or "ENFORCE",
        active=active, tool_rules=tuple(parse_rule(r, f"{where}.tool_rules[{i}]") for i, r in enumerate(rules)),
        require_approval_at_risk=_enum(d.get("require_approval_at_risk"), RISKS,
                                       f"{where}.require_approval_at_risk", optional=True),
        deny_at_risk=_enum(d.get("deny_at_risk"), RISKS, f"{where}.deny_at_risk", optional=True),
        autonomy_tier=tier, budgets=budgets,
        default_effect=_enum(d.get("default_effect"), EFFECTS, f"{where}.default_effect", optional=True),
        source=where)


_OVERRIDE_KEYS = {"tool", "risk", "arguments_below"}
_TRIGGER_KEYS = {"label", "pattern", "risk", "disabled"}


@dataclass(frozen=True)
class RiskSpec:
    """The tenant's risk classification in normal form (`kind: risk_overrides`): tool-table
    overrides `{tool, risk, arguments_below: ((name, bound), …)}` and argument-trigger changes
    `{label, pattern, risk, disabled}` (risk "HIGH" when not given; "" when disabled)."""

    overrides: tuple[dict[str, Any], ...] = ()
    triggers: tuple[dict[str, Any], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.overrides or self.triggers)


def _trigger(label: str, pattern: str, risk: str, disabled: bool) -> dict[str, Any]:
    return {"label": label, "pattern": pattern, "risk": "" if disabled else (risk or "HIGH"), "disabled": disabled}


def parse_risk_overrides(doc: dict[str, Any], where: str) -> RiskSpec:
    """`kind: risk_overrides` with `overrides: [{tool, risk, arguments_below: {name: bound}}]` and
    `argument_triggers: [{label, pattern, risk, disabled}]`."""
    d = _keys(doc, {"kind", "overrides", "argument_triggers"}, where)
    items = d.get("overrides") or []
    if not isinstance(items, list):
        raise FileError(f"{where}.overrides: must be a list")
    out = []
    for i, raw in enumerate(items):
        w = f"{where}.overrides[{i}]"
        o = _keys(raw, _OVERRIDE_KEYS, w)
        if not isinstance(o.get("tool"), str) or not o["tool"]:
            raise FileError(f"{w}.tool: is required (a tool name or glob)")
        below = _keys(o.get("arguments_below") or {}, set(o.get("arguments_below") or {}), f"{w}.arguments_below")
        out.append({"tool": o["tool"], "risk": _enum(o.get("risk"), RISKS, f"{w}.risk"),
                    "arguments_below": tuple(sorted((str(k), _number(v, f"{w}.arguments_below.{k}"))
                                                    for k, v in below.items()))})
    raw_triggers = d.get("argument_triggers") or []
    if not isinstance(raw_triggers, list):
        raise FileError(f"{where}.argument_triggers: must be a list")
    triggers = []
    for i, raw in enumerate(raw_triggers):
        w = f"{where}.argument_triggers[{i}]"
        t = _keys(raw, _TRIGGER_KEYS, w)
        disabled = t.get("disabled", False)
        if not isinstance(disabled, bool):
            raise FileError(f"{w}.disabled: must be true or false")
        for key in ("label", "pattern"):
            if not isinstance(t.get(key, ""), str):
                raise FileError(f"{w}.{key}: must be a string")
        risk = _enum(t.get("risk"), RISKS, f"{w}.risk", optional=True) or ""
        triggers.append(_trigger(t.get("label", ""), t.get("pattern", ""), risk, disabled))
    problems = limits.trigger_violations([ArgumentTrigger(t["label"], t["pattern"], Risk(RISKS[t["risk"]]) if
                                                          t["risk"] else Risk.HIGH, t["disabled"]) for t in triggers])
    if problems:  # the checks governance makes, offline
        raise FileError("; ".join(f"{where}.argument_triggers{path}: {msg}" for path, msg in problems))
    return RiskSpec(tuple(out), tuple(triggers))


def risk_overrides_yaml(risk: RiskSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "risk_overrides"}
    items = []
    for o in risk.overrides:
        item: dict[str, Any] = {"tool": o["tool"], "risk": o["risk"]}
        if o["arguments_below"]:
            item["arguments_below"] = dict(o["arguments_below"])
        items.append(item)
    if items:
        out["overrides"] = items
    triggers = []
    for t in risk.triggers:
        item = {"label": t["label"]}
        if t["disabled"]:
            item["disabled"] = True
        else:
            if t["pattern"]:
                item["pattern"] = t["pattern"]
            item["risk"] = t["risk"]
        triggers.append(item)
    if triggers:
        out["argument_triggers"] = triggers
    return out


def risk_overrides_to_proto(overrides: tuple[dict[str, Any], ...]) -> list[policy_pb2.RiskOverride]:
    return [policy_pb2.RiskOverride(tool=o["tool"], risk=RISKS[o["risk"]],  # type: ignore[arg-type]
                                    arguments_below=dict(o["arguments_below"])) for o in overrides]


def argument_triggers_to_proto(triggers: tuple[dict[str, Any], ...]) -> list[policy_pb2.ArgumentTrigger]:
    return [policy_pb2.ArgumentTrigger(label=t["label"], pattern=t["pattern"],  # type: ignore[arg-type]
                                       risk=RISKS.get(t["risk"], 0), disabled=t["disabled"]) for t in triggers]


def risk_from_proto(risk: policy_pb2.RiskOverrides) -> RiskSpec:
    return RiskSpec(
        tuple({"tool": o.tool, "risk": _name(RISKS, o.risk) or "UNSPECIFIED",
               "arguments_below": tuple(sorted(o.arguments_below.items()))} for o in risk.overrides),
        tuple(_trigger(t.label, t.pattern, _name(RISKS, t.risk) or "", t.disabled) for t in risk.argument_triggers))


def risk_classifier(risk: RiskSpec | None) -> engine.Classifier:
    """The classifier governance builds from the same overrides and triggers."""
    if not risk:
        return engine.DEFAULT_CLASSIFIER
    return engine.Classifier(
        overrides=tuple(RiskOverride(o["tool"], Risk(RISKS[o["risk"]]), o["arguments_below"]) for o in risk.overrides),
        triggers=tenant_triggers(tuple(ArgumentTrigger(t["label"], t["pattern"], Risk(RISKS.get(t["risk"], 3)),
                                                       t["disabled"]) for t in risk.triggers)))


def policy_files(path: Path) -> list[Path]:
    """The policy files of a file or a folder (recursively): `*.yaml` / `*.yml` except tests."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileError(f"{path}: no such file or folder")
    return sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()
                  and not p.stem.endswith("_test"))


def load(path: Path) -> list[Spec]:
    """Every envelope of the files under `path`; names must be unique."""
    return load_all(path)[0]


def load_all(path: Path) -> tuple[list[Spec], RiskSpec | None]:
    """The envelopes and the risk overrides (None: no `kind: risk_overrides` document) of the
    files under `path`."""
    out: list[Spec] = []
    risk: RiskSpec | None = None
    risk_where = ""
    seen: dict[str, str] = {}
    for f in policy_files(path):
        try:
            docs = list(yaml.safe_load_all(f.read_text()))
        except (OSError, yaml.YAMLError) as exc:
            raise FileError(f"{f}: {exc}") from None
        for i, doc in enumerate(docs):
            if doc is None:
                continue
            if isinstance(doc, dict) and doc.get("kind") == "risk_overrides":
                if risk is not None:
                    raise FileError(f"{f}#{i + 1}: a second risk_overrides document (the first is {risk_where})")
                risk, risk_where = parse_risk_overrides(doc, f"{f}#{i + 1}"), f"{f}#{i + 1}"
                continue
            spec = parse_envelope(doc, f"{f}#{i + 1}")
            if spec.name in seen:
                raise FileError(f"{spec.source}: envelope name {spec.name!r} is also in {seen[spec.name]}")
            seen[spec.name] = spec.source
            out.append(spec)
    return out, risk


def dump(specs: Iterable[Spec], risk: RiskSpec | None = None) -> str:
    """The YAML text of envelopes, one document each (and the risk overrides, if any)."""
    docs = [s.to_yaml() for s in specs] + ([risk_overrides_yaml(risk)] if risk else [])
    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, explicit_start=True)


# --- the API's message ----------------------------------------------------------------------------

_SCOPES = {"tenant": policy_pb2.POLICY_SCOPE_TENANT, "project": policy_pb2.POLICY_SCOPE_PROJECT,
           "version": policy_pb2.POLICY_SCOPE_VERSION}


def to_proto(spec: Spec, scope_id: str) -> policy_pb2.PolicyEnvelope:
    env = policy_pb2.PolicyEnvelope(
        name=spec.name, description=spec.description, scope=_SCOPES[spec.scope.kind], scope_id=scope_id,
        priority=spec.priority, active=spec.active, mode=MODES[spec.mode],
        require_approval_at_risk=RISKS.get(spec.require_approval_at_risk or "", 0),
        deny_at_risk=RISKS.get(spec.deny_at_risk or "", 0),
        default_effect=EFFECTS.get(spec.default_effect or "", 0))
    if spec.autonomy_tier is not None:
        env.autonomy_tier = spec.autonomy_tier
    if spec.budgets:
        env.budgets.CopyFrom(policy_pb2.Budgets(**spec.budgets))
    for r in spec.tool_rules:
        w = r["when"]
        env.tool_rules.append(policy_pb2.ToolRule(
            tool=r["tool"], effect=EFFECTS[r["effect"]], locked=r["locked"], description=r["description"],
            when=policy_pb2.ToolRuleCondition(min_risk=RISKS.get(w["min_risk"] or "", 0),
                                              environments=list(w["environments"]),
                                              arg_patterns=list(w["arg_patterns"]))))
    return env


def _name(table: dict[str, int], value: int) -> str | None:
    return next((k for k, v in table.items() if v == value), None)


def from_proto(env: policy_pb2.PolicyEnvelope, scope: ScopeRef) -> Spec:
    budgets = None
    if env.HasField("budgets"):
        budgets = {k: getattr(env.budgets, k) for k in ("per_run_usd", "daily_usd", "monthly_usd")
                   if env.budgets.HasField(k)} or None
    rules = tuple({"tool": r.tool, "effect": _name(EFFECTS, r.effect) or "UNSPECIFIED", "locked": r.locked,
                   "when": {"min_risk": _name(RISKS, r.when.min_risk),
                            "environments": tuple(r.when.environments),
                            "arg_patterns": tuple(r.when.arg_patterns)},
                   "description": r.description} for r in env.tool_rules)
    return Spec(name=env.name, scope=scope, description=env.description,
                priority=env.priority if env.HasField("priority") else 100,
                mode=_name(MODES, env.mode) or "ENFORCE", active=env.active if env.HasField("active") else True,
                tool_rules=rules, require_approval_at_risk=_name(RISKS, env.require_approval_at_risk),
                deny_at_risk=_name(RISKS, env.deny_at_risk),
                autonomy_tier=env.autonomy_tier if env.HasField("autonomy_tier") else None,
                budgets=budgets, default_effect=_name(EFFECTS, env.default_effect),
                source=f"live envelope {env.envelope_id}")


# --- diffs ----------------------------------------------------------------------------------------

def rule_line(rule: dict[str, Any]) -> str:
    """One rule on one line: `payments.* → NEEDS_APPROVAL (locked) when min_risk=HIGH`."""
    text = f"{rule['tool']} → {rule['effect']}"
    if rule["locked"]:
        text += " (locked)"
    when = [f"{k}={v if isinstance(v, str) else ','.join(v)}" for k, v in rule["when"].items() if v]
    if when:
        text += " when " + " ".join(when)
    if rule["description"]:
        text += f"  # {rule['description']}"
    return text


def diff(live: Spec, wanted: Spec) -> list[str]:
    """What changes from `live` to `wanted`: a line per changed field, and the tool rules as a
    unified diff of one rule per line (`-` removed, `+` added)."""
    out = []
    for key in ("scope", "description", "priority", "mode", "active", "require_approval_at_risk", "deny_at_risk",
                "autonomy_tier", "budgets", "default_effect"):
        a, b = getattr(live, key), getattr(wanted, key)
        if a != b:
            out.append(f"~ {key}: {a} → {b}")
    if live.tool_rules != wanted.tool_rules:
        old = [rule_line(r) for r in live.tool_rules]
        new = [rule_line(r) for r in wanted.tool_rules]
        for line in difflib.unified_diff(old, new, lineterm="", n=1):
            if line.startswith(("---", "+++")):
                continue
            out.append(f"  tool_rules {line}" if line.startswith("@@") else f"{line[0]} rule: {line[1:]}")
    return out


# --- the engine's dataclasses (offline tests) -----------------------------------------------------

def to_engine(spec: Spec, scope_id: str, index: int) -> engine.Envelope:
    """The engine's envelope of a file's spec; offline, scope ids are the slugs themselves."""
    def risk(name: str | None) -> Risk | None:
        return Risk(RISKS[name]) if name else None

    b = spec.budgets or {}
    return engine.Envelope(
        id=f"file:{spec.name}", name=spec.name, revision=1, scope=engine.Scope(_SCOPES[spec.scope.kind]),
        scope_id=scope_id, priority=spec.priority, active=spec.active, shadow=spec.mode == "SHADOW",
        tool_rules=tuple(engine.ToolRule(
            tool=r["tool"], effect=engine.Effect(EFFECTS[r["effect"]]), locked=r["locked"],
            min_risk=risk(r["when"]["min_risk"]), environments=r["when"]["environments"],
            arg_patterns=r["when"]["arg_patterns"], description=r["description"]) for r in spec.tool_rules),
        require_approval_at_risk=risk(spec.require_approval_at_risk), deny_at_risk=risk(spec.deny_at_risk),
        autonomy_tier=spec.autonomy_tier,
        budgets=engine.Budgets(**b) if spec.budgets else None,
        default_effect=engine.Effect(EFFECTS[spec.default_effect]) if spec.default_effect else None)


__all__ = ["FileError", "ScopeRef", "Spec", "diff", "dump", "from_proto", "load", "to_engine",
           "to_proto"]
