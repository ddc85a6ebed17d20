"""`arm policy test`: `*_test.yaml` files (docs/policies.md) — an agent context and calls with their
expected decision — run offline with the very engine governance decides with (arm_engine).

Offline, scope ids are the slugs: an envelope of `scope: {project: payments}` applies to a context
whose `project` is `payments`, one of `scope: {version: billing-agent@3}` to a context whose
`version` is `billing-agent@3`, and `scope: tenant` to every context.
"""

from __future__ import annotations

import difflib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from arm.governance.v1 import decision_pb2, policy_pb2
from arm_cli import policy_files as pf
from arm_cli.output import Format, console, emit_rows
from arm_engine import engine
from arm_engine.risk import Risk

_CONTEXT_KEYS = {"known", "tenant", "tenant_active", "project", "version", "environment", "instance_state",
                 "version_state", "controls", "spend"}
_CASE_KEYS = {"name", "tool", "arguments", "declared_risk", "estimated_cost_usd", "is_run_start", "grant",
              "context", "expect"}
_EXPECT_KEYS = {"decision", "reason", "scope", "step"}
DEFAULT_CONTEXT: dict[str, Any] = {
    "known": True, "tenant": "tenant", "tenant_active": True, "project": "project", "version": "agent@1",
    "environment": {"name": "prod", "type": "PROD"}, "instance_state": "ACTIVE", "version_state": "APPROVED",
    "controls": {"tenant": "NORMAL", "project": "NORMAL"}, "spend": {"run_usd": 0, "day_usd": 0, "month_usd": 0}}


class TestFileError(ValueError):
    """A test file that cannot be read (names the file and case)."""


@dataclass
class Case:
    file: str
    name: str
    context: dict[str, Any]
    call: engine.Call
    expect: dict[str, str]


@dataclass
class Outcome:
    """What a case got: decision, first reason code, deciding scope kind, step, rule."""

    decision: str
    reason: str
    scope: str
    step: str
    rule: str
    reasons: list[str]


@dataclass
class CaseResult:
    case: Case
    got: Outcome
    mismatches: dict[str, tuple[str, str]]

    @property
    def passed(self) -> bool:
        return not self.mismatches


def _merge(base: dict[str, Any], over: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(over) - _CONTEXT_KEYS)
    if unknown:
        raise TestFileError(f"{where}: unknown context field(s) {', '.join(unknown)}")
    out = dict(base)
    for k, v in over.items():
        out[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _keys(doc: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise TestFileError(f"{where}: must be a mapping")
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise TestFileError(f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    return doc


def load_cases(f: Path) -> tuple[list[Case], Path | None]:
    """The cases of one test file, and the policies path it names (relative to itself), if any."""
    try:
        doc = yaml.safe_load(f.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TestFileError(f"{f}: {exc}") from None
    d = _keys(doc, {"name", "policies", "context", "cases"}, str(f))
    base = _merge(DEFAULT_CONTEXT, d.get("context") or {}, f"{f}: context")
    cases = []
    for i, raw in enumerate(d.get("cases") or []):
        where = f"{f}: cases[{i}]"
        c = _keys(raw, _CASE_KEYS, where)
        if not isinstance(c.get("tool"), str):
            raise TestFileError(f"{where}.tool: is required")
        expect = c.get("expect")
        if isinstance(expect, str):
            expect = {"decision": expect}
        expect = {k: str(v).upper() for k, v in _keys(expect, _EXPECT_KEYS, f"{where}.expect").items()}
        if expect.get("decision") not in pf.EFFECTS:
            raise TestFileError(f"{where}.expect.decision: must be one of {', '.join(pf.EFFECTS)}")
        declared = c.get("declared_risk")
        if declared is not None and str(declared).upper() not in pf.RISKS:
            raise TestFileError(f"{where}.declared_risk: must be one of {', '.join(pf.RISKS)}")
        args = c.get("arguments")
        if args is not None and not isinstance(args, dict):
            raise TestFileError(f"{where}.arguments: must be a mapping")
        call = engine.Call(
            tool=c["tool"], arguments=args,
            declared_risk=Risk(pf.RISKS[str(declared).upper()]) if declared is not None else None,
            estimated_cost_usd=float(c.get("estimated_cost_usd") or 0), is_run_start=bool(c.get("is_run_start")),
            grant=engine.Grant(str(c["grant"]).upper()) if c.get("grant") else None)
        cases.append(Case(str(f), str(c.get("name") or f"case {i + 1}"),
                          _merge(base, c.get("context") or {}, f"{where}.context"), call, expect))
    pol = d.get("policies")
    return cases, (f.parent / pol) if pol else None


def _outcome(r: engine.Result) -> Outcome:
    scope = r.scope.name.lower() if r.scope is not None else "none"
    return Outcome(r.effect.name, r.reasons[0].code if r.reasons else "", scope.upper(), r.step.name,
                   r.rule_description, [f"{x.code}: {x.message}" for x in r.reasons])


def decide_offline(policies: Policies, case: Case) -> Outcome:
    ctx = case.context
    envelopes = []
    for i, s in enumerate(policies.specs):
        scope_id = {"tenant": str(ctx["tenant"]), "project": s.scope.ref, "version": s.scope.ref}[s.scope.kind]
        envelopes.append(pf.to_engine(s, scope_id, i))
    policy = engine.compile_policy(envelopes, tenant_id=str(ctx["tenant"]), project_id=str(ctx["project"]),
                                   version_id=str(ctx["version"]))
    env = ctx["environment"]
    agent = engine.Agent(
        tenant_id=str(ctx["tenant"]), tenant_active=bool(ctx["tenant_active"]), project_id=str(ctx["project"]),
        environment_id=str(env.get("name", "")), environment_name=str(env.get("name", "")),
        environment_type=str(env.get("type", "DEV")).upper(), template_id=str(ctx["version"]).split("@")[0],
        version_id=str(ctx["version"]), instance_id="test-instance",
        instance_state=str(ctx["instance_state"]).upper(),
        version_state=str(ctx["version_state"]).upper()) if ctx["known"] else None
    spend = ctx["spend"]
    result = engine.decide(
        policy, agent, case.call,
        controls=engine.Controls(str(ctx["controls"].get("tenant", "NORMAL")).upper(),
                                 str(ctx["controls"].get("project", "NORMAL")).upper()),
        spend=engine.Spend(float(spend.get("run_usd", 0)), float(spend.get("day_usd", 0)),
                           float(spend.get("month_usd", 0))),
        classifier=policies.classifier)
    return _outcome(result)


def compare(case: Case, got: Outcome) -> CaseResult:
    fields = {"decision": got.decision, "reason": got.reason, "scope": got.scope, "step": got.step}
    mismatches = {k: (v, fields[k]) for k, v in case.expect.items() if v != fields[k]}
    return CaseResult(case, got, mismatches)


def test_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*_test.y*ml") if p.is_file())


@dataclass
class Policies:
    """The policy files a test file runs against: envelopes and risk overrides."""

    specs: list[pf.Spec]
    risk: pf.RiskSpec
    classifier: engine.Classifier


def load_suite(path: Path) -> list[tuple[Policies, Case]]:
    """Every case of the test files under `path`, with the policy files it runs against: those
    under `path`, or the `policies:` path its test file names."""
    files = test_files(path)
    if not files:
        raise TestFileError(f"{path}: no *_test.yaml files")
    default_root = path if path.is_dir() else path.parent
    cache: dict[Path, Policies] = {}
    out = []
    for f in files:
        cases, pol = load_cases(f)
        root = (pol or default_root).resolve()
        if root not in cache:
            specs, risk = pf.load_all(root)
            cache[root] = Policies(specs, risk or pf.RiskSpec(), pf.risk_classifier(risk))
        out += [(cache[root], case) for case in cases]
    return out


def run_offline(path: Path) -> list[CaseResult]:
    """The suite decided here, by arm_engine."""
    return [compare(case, decide_offline(specs, case)) for specs, case in load_suite(path)]


def _label(spec: pf.Spec) -> str:
    return "" if spec.scope.kind == "tenant" else spec.scope.ref


def evaluation_call(case: Case) -> decision_pb2.EvaluationCall:
    ctx, env, call = case.context, case.context["environment"], case.call
    controls, spend = ctx["controls"], ctx["spend"]
    mode = {"NORMAL": 1, "PAUSED": 2, "DRAINING": 3, "QUARANTINED": 4}
    out = decision_pb2.EvaluationCall(
        context=decision_pb2.EvaluationContext(
            unknown_agent=not ctx["known"], tenant_inactive=not ctx["tenant_active"], project=str(ctx["project"]),
            version=str(ctx["version"]), environment_name=str(env.get("name", "")),
            environment_type=str(env.get("type", "DEV")).upper(), instance_state=str(ctx["instance_state"]).upper(),
            version_state=str(ctx["version_state"]).upper(),
            tenant_control=mode.get(str(controls.get("tenant", "NORMAL")).upper(), 0),
            project_control=mode.get(str(controls.get("project", "NORMAL")).upper(), 0),
            run_spent_usd=float(spend.get("run_usd", 0)), day_spent_usd=float(spend.get("day_usd", 0)),
            month_spent_usd=float(spend.get("month_usd", 0))),
        tool_name=call.tool, declared_risk=int(call.declared_risk or 0), estimated_cost_usd=call.estimated_cost_usd,
        is_run_start=call.is_run_start, grant_status=call.grant.status if call.grant else "")
    if call.arguments is not None:
        out.arguments.update(dict(call.arguments))
    return out


def _server_outcome(r: decision_pb2.CheckResponse) -> Outcome:
    scope = policy_pb2.PolicyScope.Name(r.scope).removeprefix("POLICY_SCOPE_") if r.scope else "NONE"
    return Outcome(policy_pb2.Decision.Name(r.decision).removeprefix("DECISION_"),
                   r.reasons[0].code if r.reasons else "", scope,
                   decision_pb2.DecisionStep.Name(r.step).removeprefix("DECISION_STEP_"), r.rule_description,
                   [f"{x.code}: {x.message}" for x in r.reasons])


async def run_server(path: Path, decisions: Any) -> list[CaseResult]:
    """The same suite decided by a live governance (DecisionService.EvaluatePolicy: nothing is
    logged, no approval is created), `decisions` being its stub."""
    suite = load_suite(path)
    out: list[CaseResult] = []
    start = 0
    while start < len(suite):
        policies = suite[start][0]
        end = start
        while end < len(suite) and suite[end][0] is policies and end - start < 500:
            end += 1
        resp = await decisions.EvaluatePolicy(decision_pb2.EvaluatePolicyRequest(
            envelopes=[pf.to_proto(s, _label(s)) for s in policies.specs],
            risk_overrides=pf.risk_overrides_to_proto(policies.risk.overrides),
            argument_triggers=pf.argument_triggers_to_proto(policies.risk.triggers),
            calls=[evaluation_call(case) for _, case in suite[start:end]]))
        out += [compare(case, _server_outcome(r)) for (_, case), r in zip(suite[start:end], resp.results, strict=True)]
        start = end
    return out


def explain(r: CaseResult) -> str:
    """A failed case as a readable diff: expected vs got per field, then why the engine decided."""
    lines = [f"FAIL {r.case.name}  ({r.case.file})", f"  call: {r.case.call.tool} {r.case.call.arguments or {}}"]
    exp = [f"{k}: {v}" for k, (v, _) in r.mismatches.items()]
    got = [f"{k}: {g}" for k, (_, g) in r.mismatches.items()]
    for line in difflib.unified_diff(exp, got, "expected", "got", lineterm="", n=0):
        if not line.startswith("@@"):
            lines.append("  " + line)
    lines.append(f"  decided at step {r.got.step}, scope {r.got.scope}" +
                 (f", rule {r.got.rule!r}" if r.got.rule else ""))
    lines += [f"  reason {x}" for x in r.got.reasons]
    return "\n".join(lines)


def report(results: list[CaseResult], fmt: Format) -> None:
    rows = [{"result": "pass" if r.passed else "FAIL", "case": r.case.name, "tool": r.case.call.tool,
             "expected": " ".join(r.case.expect.values()), "got": r.got.decision, "reason": r.got.reason,
             "scope": r.got.scope, "step": r.got.step} for r in results]
    emit_rows(rows, fmt, ["result", "case", "tool", "expected", "got", "reason", "scope", "step"])
    if fmt is not Format.table:
        return
    out = console()
    for r in results:
        if not r.passed:
            out.print(explain(r), markup=False)
    failed = sum(1 for r in results if not r.passed)
    out.print(f"{len(results) - failed} passed, {failed} failed", markup=False)


def junit_xml(results: list[CaseResult]) -> str:
    suite = ET.Element("testsuite", name="arm policy test", tests=str(len(results)),
                       failures=str(sum(1 for r in results if not r.passed)))
    for r in results:
        tc = ET.SubElement(suite, "testcase", classname=Path(r.case.file).stem, name=r.case.name)
        if not r.passed:
            fail = ET.SubElement(tc, "failure", message="; ".join(
                f"{k}: expected {e}, got {g}" for k, (e, g) in r.mismatches.items()))
            fail.text = explain(r)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"
