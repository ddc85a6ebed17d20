"""Policies: envelopes by scope; an envelope's revisions with a rule-level diff between any two;
the effective policy of an agent with where each rule came from; a live evaluator (a call decided
under the tenant's stored envelopes by EvaluatePolicy: nothing logged, no approval created); and
simulation of a draft envelope against recent logged decisions (SimulatePolicy), listing what
would flip. Drafts are written in the YAML of `arm policy apply` (docs/policies.md), read by the
CLI's own parser, and rule diffs are the ones `arm policy apply` prints."""

from __future__ import annotations

import json
from typing import Any

import grpc
import yaml
from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from arm.common.v1 import common_pb2
from arm.governance.v1 import decision_pb2, policy_pb2
from arm.registry.v1 import agents_pb2, tenancy_pb2
from arm_cli import policy_files as pf
from arm_console.view import View
from arm_console.views.shared import all_pages, console_of, not_found, problems
from arm_console.web import Page, Refused, enum_name, url_with

PAGE_SIZE = 25
SCOPES = {"TENANT": policy_pb2.POLICY_SCOPE_TENANT, "PROJECT": policy_pb2.POLICY_SCOPE_PROJECT,
          "VERSION": policy_pb2.POLICY_SCOPE_VERSION}
SCOPE_KIND = {policy_pb2.POLICY_SCOPE_TENANT: "tenant", policy_pb2.POLICY_SCOPE_PROJECT: "project",
              policy_pb2.POLICY_SCOPE_VERSION: "version"}
MODES = {"ENFORCE": policy_pb2.POLICY_MODE_ENFORCE, "SHADOW": policy_pb2.POLICY_MODE_SHADOW}
RISKS = ["LOW", "MEDIUM", "HIGH", "CRITICAL"]
ENV_TYPES = ["DEV", "STAGING", "PROD"]
MAX_EVALUATION_ENVELOPES = 60
DRAFT_EXAMPLE = """name: draft
description: What this envelope is for
tool_rules:
  - tool: "payments.**"
    effect: NEEDS_APPROVAL
  - tool: "db.drop*"
    effect: DENY
    locked: true
default_effect: ALLOW
"""


def decision(value: int) -> str:
    return enum_name(value, policy_pb2.Decision) if value else "NO OPINION"


def _helpers() -> dict[str, Any]:
    return {"scope_name": lambda s: enum_name(s, policy_pb2.PolicyScope),
            "mode_name": lambda m: enum_name(m, policy_pb2.PolicyMode) if m else "ENFORCE",
            "kind_name": lambda k: enum_name(k, policy_pb2.RuleKind).replace("_", " ").lower(),
            "risk_name": lambda r: enum_name(r, common_pb2.RiskLevel),
            "step_name": lambda s: enum_name(s, decision_pb2.DecisionStep).replace("_", " ").lower(),
            "decision": decision, "decision_class": lambda d: decision(d).lower().replace(" ", "-")}


def spec_of(env: policy_pb2.PolicyEnvelope) -> pf.Spec:
    return pf.from_proto(env, pf.ScopeRef(SCOPE_KIND.get(env.scope, "tenant"), env.scope_id))


def rule_lines(env: policy_pb2.PolicyEnvelope) -> list[str]:
    """The envelope's rules, a line each, in evaluation order within the envelope."""
    spec = spec_of(env)
    lines = [pf.rule_line(r) for r in spec.tool_rules]
    if spec.deny_at_risk:
        lines.append(f"deny at risk ≥ {spec.deny_at_risk}")
    if spec.require_approval_at_risk:
        lines.append(f"approval at risk ≥ {spec.require_approval_at_risk}")
    if spec.autonomy_tier is not None:
        lines.append(f"autonomy tier {spec.autonomy_tier}")
    if spec.budgets:
        lines.append("budgets " + ", ".join(f"{k} {v:g}" for k, v in spec.budgets.items()))
    if spec.default_effect:
        lines.append(f"default → {spec.default_effect}")
    return lines


def effective_rule_text(rule: policy_pb2.EffectiveRule) -> str:
    which = rule.WhichOneof("rule")
    if which == "tool_rule":
        return pf.rule_line(pf.from_proto(policy_pb2.PolicyEnvelope(tool_rules=[rule.tool_rule]),
                                          pf.ScopeRef("tenant")).tool_rules[0])
    if which == "risk_threshold":
        verb = "deny" if rule.kind == policy_pb2.RULE_KIND_DENY_AT_RISK else "approval"
        return f"{verb} at risk ≥ {enum_name(rule.risk_threshold, common_pb2.RiskLevel)}"
    if which == "autonomy_tier":
        return f"autonomy tier {rule.autonomy_tier}"
    if which == "budgets":
        b = rule.budgets
        return "budgets " + ", ".join(f"{k} {getattr(b, k):g}" for k in ("per_run_usd", "daily_usd", "monthly_usd")
                                      if b.HasField(k))
    if which == "default_effect":
        return f"default → {decision(rule.default_effect)}"
    return "—"


async def scope_labels(page: Page, envelopes: list[policy_pb2.PolicyEnvelope]) -> dict[str, str]:
    """scope id → a readable label (project name; version as template vN)."""
    projects = await page.project_names()
    out: dict[str, str] = {}
    for env in envelopes:
        if env.scope == policy_pb2.POLICY_SCOPE_TENANT:
            out[env.scope_id] = "whole tenant"
        elif env.scope == policy_pb2.POLICY_SCOPE_PROJECT:
            out[env.scope_id] = projects.get(env.scope_id, env.scope_id)
        elif env.scope_id not in out:
            try:
                v = (await page.client.agents.GetAgentVersion(agents_pb2.GetAgentVersionRequest(id=env.scope_id))
                     ).agent_version
                t = (await page.client.agents.GetAgentTemplate(agents_pb2.GetAgentTemplateRequest(id=v.template_id))
                     ).agent_template
                out[env.scope_id] = f"{t.slug} v{v.number}"
            except grpc.aio.AioRpcError:
                out[env.scope_id] = env.scope_id
    return out


async def envelopes(request: Request) -> Response:
    console = console_of(request)
    page = await console.page(request)
    q = request.query_params
    scope, mode, active = q.get("scope", ""), q.get("mode", ""), q.get("active", "")
    if scope and scope not in SCOPES or mode and mode not in MODES or active not in ("", "yes", "no"):
        raise Refused("Unknown filter value.", 400)
    req = policy_pb2.ListPolicyEnvelopesRequest(page_size=PAGE_SIZE, page_token=q.get("page", ""),
                                                scope=SCOPES.get(scope, 0), scope_id=q.get("scope_id", "").strip(),
                                                mode=MODES.get(mode, 0))
    if active:
        req.active = active == "yes"
    resp = await page.client.policies.ListPolicyEnvelopes(req)
    items = list(resp.envelopes)
    selected = None
    if q.get("envelope"):
        selected = (await page.client.policies.GetPolicyEnvelope(policy_pb2.GetPolicyEnvelopeRequest(
            envelope_id=q["envelope"]))).envelope
    labels = await scope_labels(page, items + ([selected] if selected else []))
    by_scope: dict[str, list[policy_pb2.PolicyEnvelope]] = {}
    for env in items:
        by_scope.setdefault(enum_name(env.scope, policy_pb2.PolicyScope), []).append(env)
    return await console.render(
        page, "policies/envelopes.html", active="policies", title="Policies", tab="envelopes", items=items,
        by_scope=[(s, by_scope[s]) for s in SCOPES if s in by_scope], next_token=resp.next_page_token,
        selected=selected, selected_rules=rule_lines(selected) if selected else [], labels=labels,
        filters=dict(q), close_url=url_with(request, envelope=None), scopes=list(SCOPES), modes=list(MODES),
        **_helpers())


async def envelope_detail(request: Request) -> Response:
    """One envelope: its revisions, and the rule-level diff between two of them (`a` → `b`)."""
    console = console_of(request)
    page = await console.page(request)
    envelope_id = request.path_params["envelope_id"]
    env = (await page.client.policies.GetPolicyEnvelope(policy_pb2.GetPolicyEnvelopeRequest(
        envelope_id=envelope_id))).envelope
    revisions = await all_pages(lambda token: _revisions(page, env.envelope_id, token), limit=500)
    q = request.query_params
    numbers = [r.revision for r in revisions]
    try:
        b = int(q.get("b") or env.revision)
        a = int(q.get("a") or (b - 1 if b > 1 else b))
    except ValueError:
        raise Refused("Revisions are numbers.", 400) from None
    if a not in numbers or b not in numbers:
        return await not_found(console, page, f"Envelope {env.name} has revisions 1 to {env.revision}.")
    rev_a = next(r for r in revisions if r.revision == a)
    rev_b = next(r for r in revisions if r.revision == b)
    changes = pf.diff(spec_of(rev_a.envelope), spec_of(rev_b.envelope))
    return await console.render(
        page, "policies/envelope.html", active="policies", title=f"Envelope {env.name}", tab="envelopes", env=env,
        revisions=revisions, a=a, b=b, rev_a=rev_a, rev_b=rev_b, changes=changes, rules=rule_lines(env),
        rules_b=rule_lines(rev_b.envelope), labels=await scope_labels(page, [env]), **_helpers())


async def _revisions(page: Page, envelope_id: str, token: str) -> tuple[list[policy_pb2.PolicyEnvelopeRevision], str]:
    resp = await page.client.policies.ListPolicyEnvelopeRevisions(policy_pb2.ListPolicyEnvelopeRevisionsRequest(
        envelope_id=envelope_id, page_size=100, page_token=token))
    return list(resp.envelope_revisions), resp.next_page_token


async def _instance_by_ref(page: Page, ref: str) -> agents_pb2.AgentInstance | None:
    resp = await page.client.agents.ListAgentInstances(agents_pb2.ListAgentInstancesRequest(agent_ref=ref, page_size=1))
    return resp.agent_instances[0] if resp.agent_instances else None


async def effective(request: Request) -> Response:
    console = console_of(request)
    page = await console.page(request)
    ref = request.query_params.get("agent", "").strip()
    result = None
    missing = False
    if ref:
        instance = await _instance_by_ref(page, ref)
        if instance is None:
            missing = True
        else:
            result = await page.client.policies.GetEffectivePolicy(policy_pb2.GetEffectivePolicyRequest(
                instance_id=instance.id))
    return await console.render(
        page, "policies/effective.html", active="policies", title="Policies", tab="effective", agent=ref,
        result=result, missing=missing, projects=await page.project_names(), rule_text=effective_rule_text,
        **_helpers())


async def _stored_envelopes(page: Page) -> list[policy_pb2.PolicyEnvelope]:
    async def fetch(token: str) -> tuple[list[policy_pb2.PolicyEnvelope], str]:
        req = policy_pb2.ListPolicyEnvelopesRequest(page_size=100, page_token=token, active=True)
        resp = await page.client.policies.ListPolicyEnvelopes(req)
        return list(resp.envelopes), resp.next_page_token
    return await all_pages(fetch, limit=500)


def _evaluate_defaults() -> dict[str, str]:
    return {"agent": "", "tool": "", "arguments": "{}", "declared_risk": "", "cost": "", "environment_type": "DEV",
            "project": "", "run_start": ""}


async def evaluate(request: Request) -> Response:
    """The live evaluator: a call decided under the tenant's active envelopes, nothing logged."""
    console = console_of(request)
    page = await console.page(request)
    values = _evaluate_defaults()
    errors: list[str] = []
    result = None
    context: dict[str, str] = {}
    stored: list[policy_pb2.PolicyEnvelope] = []
    if request.method == "POST":
        form = await page.form()
        values.update({k: str(form.get(k, "")).strip() for k in values})
        call = decision_pb2.EvaluationCall(tool_name=values["tool"], is_run_start=values["run_start"] == "yes")
        if not values["tool"]:
            errors.append("Tool: enter the tool the agent would call, e.g. payments.refund.")
        try:
            args = json.loads(values["arguments"] or "{}")
            if not isinstance(args, dict):
                raise ValueError("not an object")
            call.arguments.CopyFrom(_struct(args))
        except ValueError:
            errors.append("Arguments: a JSON object, e.g. {\"amount\": 120}.")
        if values["declared_risk"]:
            if values["declared_risk"] not in RISKS:
                errors.append("Declared risk: LOW, MEDIUM, HIGH or CRITICAL.")
            else:
                call.declared_risk = common_pb2.RiskLevel.Value(f"RISK_LEVEL_{values['declared_risk']}")
        if values["cost"]:
            try:
                call.estimated_cost_usd = float(values["cost"])
            except ValueError:
                errors.append("Estimated cost: a number of US dollars.")
        if values["environment_type"] not in ENV_TYPES:
            errors.append("Environment type: DEV, STAGING or PROD.")
        call.context.environment_type = values["environment_type"]
        if values["project"] and not values["agent"]:
            if values["project"] not in await page.project_names():
                errors.append("Project: choose one of your tenant's projects.")
            call.context.project = values["project"]  # its envelopes apply to the hypothetical agent
        if values["agent"]:
            instance = await _instance_by_ref(page, values["agent"])
            if instance is None:
                errors.append(f"Agent: no instance or legacy id {values['agent']!r} in your tenant.")
            else:
                await _agent_context(page, instance, call.context, context)
        if not errors:
            stored = await _stored_envelopes(page)
            overrides = (await page.client.policies.GetRiskOverrides(policy_pb2.GetRiskOverridesRequest())
                         ).risk_overrides.overrides
            try:
                resp = await page.client.decisions.EvaluatePolicy(decision_pb2.EvaluatePolicyRequest(
                    envelopes=stored[:MAX_EVALUATION_ENVELOPES], calls=[call], risk_overrides=overrides))
                result = resp.results[0]
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                errors = problems(exc)
    names = {e.envelope_id: e for e in stored}
    return await console.render(
        page, "policies/evaluate.html", active="policies", title="Policies", tab="evaluate", values=values,
        errors=errors, result=result, context=context, envelopes_by_id=names, envelope_count=len(stored),
        cut=len(stored) > MAX_EVALUATION_ENVELOPES, risks=RISKS, env_types=ENV_TYPES,
        projects=await page.project_names(), **_helpers())


async def _agent_context(page: Page, instance: agents_pb2.AgentInstance, ctx: decision_pb2.EvaluationContext,
                         shown: dict[str, str]) -> None:
    """The evaluation context of a real agent: its project, version, environment, states and kill switches."""
    env = (await page.client.tenancy.GetEnvironment(tenancy_pb2.GetEnvironmentRequest(id=instance.environment_id))
           ).environment
    version = (await page.client.agents.GetAgentVersion(agents_pb2.GetAgentVersionRequest(id=instance.version_id))
               ).agent_version
    ctx.project, ctx.version = instance.project_id, instance.version_id
    ctx.environment_name = env.name
    ctx.environment_type = enum_name(env.type, tenancy_pb2.EnvironmentType)
    ctx.instance_state = enum_name(instance.state, agents_pb2.InstanceState)
    ctx.version_state = enum_name(version.state, agents_pb2.VersionState)
    tenant = (await page.client.policies.GetOperatorControl(policy_pb2.GetOperatorControlRequest(
        scope=policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT))).control
    project = (await page.client.policies.GetOperatorControl(policy_pb2.GetOperatorControlRequest(
        scope=policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT, scope_id=instance.project_id))).control
    ctx.tenant_control, ctx.project_control = tenant.mode, project.mode
    shown.update({"Instance": instance.name or instance.id, "Environment": f"{env.name} ({ctx.environment_type})",
                  "Instance state": ctx.instance_state, "Version": f"v{version.number} ({ctx.version_state})",
                  "Project": (await page.project_names()).get(instance.project_id, instance.project_id),
                  "Kill switches": f"tenant {enum_name(tenant.mode, policy_pb2.OperatorControlMode)}, project "
                                   f"{enum_name(project.mode, policy_pb2.OperatorControlMode)}"})


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


def draft_yaml(env: policy_pb2.PolicyEnvelope) -> str:
    doc = spec_of(env).to_yaml()
    doc.pop("scope", None)
    return str(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, allow_unicode=True))


async def simulate(request: Request) -> Response:
    """A draft envelope replayed against recent logged decisions: what would flip."""
    console = console_of(request)
    page = await console.page(request)
    values = {"envelope": request.query_params.get("envelope", ""), "scope": "TENANT", "scope_id": "",
              "draft": DRAFT_EXAMPLE, "hours": "24", "limit": "1000"}
    replaced = None
    if values["envelope"]:
        replaced = (await page.client.policies.GetPolicyEnvelope(policy_pb2.GetPolicyEnvelopeRequest(
            envelope_id=values["envelope"]))).envelope
        values["draft"] = draft_yaml(replaced)
    errors: list[str] = []
    result = None
    if request.method == "POST":
        form = await page.form()
        values.update({k: str(form.get(k, "")).strip() for k in values})
        values["draft"] = str(form.get("draft", ""))
        replaced = None
        if values["envelope"]:
            try:
                replaced = (await page.client.policies.GetPolicyEnvelope(policy_pb2.GetPolicyEnvelopeRequest(
                    envelope_id=values["envelope"]))).envelope
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                    raise
                return await not_found(console, page, "No policy envelope with that id exists in your tenant. "
                                                      "Choose the draft's envelope from the list.")
        candidate = _candidate(values, replaced, errors)
        hours = _int(values["hours"], 1, 720, "Look back (hours)", errors)
        limit = _int(values["limit"], 1, 10000, "At most (decisions)", errors)
        if candidate is not None and not errors:
            try:
                result = await page.client.policies.SimulatePolicy(policy_pb2.SimulatePolicyRequest(
                    candidate=candidate, lookback=Duration(seconds=hours * 3600), limit=limit))
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                    raise
                errors = problems(exc)
    stored = await _stored_envelopes(page)
    return await console.render(
        page, "policies/simulate.html", active="policies", title="Policies", tab="simulate", values=values,
        replaced=replaced, errors=errors, result=result, stored=stored, scopes=list(SCOPES),
        projects=await page.project_names(), **_helpers())


def _int(text: str, low: int, high: int, name: str, errors: list[str]) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        errors.append(f"{name}: a whole number from {low} to {high}.")
    return value


def _candidate(values: dict[str, str], replaced: policy_pb2.PolicyEnvelope | None,
               errors: list[str]) -> policy_pb2.PolicyEnvelope | None:
    try:
        doc = yaml.safe_load(values["draft"] or "")
    except yaml.YAMLError as exc:
        errors.append(f"Draft: not valid YAML ({str(exc).splitlines()[0]}).")
        return None
    if not isinstance(doc, dict):
        errors.append("Draft: one envelope as a YAML mapping (name, tool_rules, …), as in docs/policies.md.")
        return None
    if "scope" in doc:
        errors.append("Draft: leave `scope` out; choose the scope with the fields above.")
        return None
    try:
        spec = pf.parse_envelope({**doc, "scope": "tenant"}, "draft")
    except pf.FileError as exc:
        errors.append(f"Draft: {str(exc).removeprefix('draft')}".replace(": .", ": ").replace(": :", ":"))
        return None
    if replaced is not None:
        env = pf.to_proto(spec, replaced.scope_id)
        env.scope, env.envelope_id = replaced.scope, replaced.envelope_id
        return env
    if values["scope"] not in SCOPES:
        errors.append("Scope: tenant, project or version.")
        return None
    if values["scope"] != "TENANT" and not values["scope_id"]:
        errors.append("Scope: choose the project, or enter the version id.")
        return None
    env = pf.to_proto(spec, values["scope_id"] if values["scope"] != "TENANT" else "")
    env.scope = SCOPES[values["scope"]]
    return env


VIEW = View(slug="policies", title="Policies", routes=[
    Route("/policies", envelopes),
    Route("/policies/envelopes/{envelope_id}", envelope_detail),
    Route("/policies/effective", effective),
    Route("/policies/evaluate", evaluate, methods=["GET", "POST"]),
    Route("/policies/simulate", simulate, methods=["GET", "POST"]),
])

