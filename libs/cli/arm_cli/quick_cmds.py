"""Two short paths for the terminal quickstart:

- `arm agents create -f agent.yaml`: one running agent from one file (project, environment and
  template made when missing, a version from the genome walked to APPROVED, an instance made
  ACTIVE), each step printed.
- `arm envelopes create -f policy.yaml`: policy envelopes from YAML, one per document, scope by
  slug. Deliberately minimal (create only, no plan, no diff, no etags): `arm policy apply`
  (policies as files, issue 12 item 2) is the full form and supersedes it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from google.protobuf import struct_pb2

from arm.common.v1 import common_pb2
from arm.governance.v1 import policy_pb2
from arm.registry.v1 import agents_pb2, tenancy_pb2
from arm_cli.fleet_cmds import _ENV_TYPES, environments
from arm_cli.main import Output, app, call
from arm_cli.output import Format, as_dict, emit_object, emit_rows, short_enum
from arm_cli.registry_cmds import pages, project_id, version
from arm_client.stubs import ArmClient

agents_app = typer.Typer(help="One running agent from one file.", no_args_is_help=True)
envelopes_app = typer.Typer(help="Policy envelopes from YAML (minimal; see `arm policy apply`).",
                            no_args_is_help=True)
app.add_typer(agents_app, name="agents")
app.add_typer(envelopes_app, name="envelopes")


def _load(file: Path, many: bool = False) -> list[dict[str, Any]]:
    try:
        docs = [d for d in yaml.safe_load_all(file.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--file") from None
    if not docs or not all(isinstance(d, dict) for d in docs) or (len(docs) > 1 and not many):
        raise typer.BadParameter("expected " + ("mappings, one per document" if many else "one mapping"),
                                 param_hint="--file")
    return docs


def _need(spec: dict[str, Any], key: str) -> Any:
    if not spec.get(key):
        raise typer.BadParameter(f"{key!r} is required", param_hint="--file")
    return spec[key]


@agents_app.command("create")
def agents_create(ctx: typer.Context,
                  file: Annotated[Path, typer.Option("--file", "-f", help="project, environment, template, "
                                                     "name, genome, eval_summary")],
                  output: Output = Format.table) -> None:
    """Project, environment and template (made when missing), a version from the genome walked
    DRAFT → TESTING → CANDIDATE (eval_summary recorded as a PASS) → APPROVED, and an ACTIVE
    instance NAME of it."""
    spec = _load(file)[0]
    project_slug, tpl_slug, name = _need(spec, "project"), _need(spec, "template"), _need(spec, "name")
    genome_spec, env_spec = _need(spec, "genome"), spec.get("environment") or {"name": "dev", "type": "dev"}
    env_name, env_type = env_spec.get("name", "dev"), str(env_spec.get("type", "dev")).lower()
    if env_type not in _ENV_TYPES:
        raise typer.BadParameter(f"environment.type: one of {', '.join(_ENV_TYPES)}", param_hint="--file")
    genome = struct_pb2.Struct()
    genome.update(genome_spec)
    steps: list[dict[str, str]] = []

    def step(what: str, ident: str) -> None:
        steps.append({"step": what, "id": ident})
        if output is Format.table:
            sys.stdout.write(f"{what:<34} {ident}\n")
            sys.stdout.flush()

    async def create(c: ArmClient) -> agents_pb2.AgentInstance:
        projects = await pages(lambda t: c.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest(
            page_size=500, page_token=t)), "projects")
        project = next((p for p in projects if p.slug == project_slug), None)
        if project is None:
            project = (await c.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
                slug=project_slug, name=project_slug))).project
            step(f"project {project_slug} created", project.id)
        env = next((e for e in await environments(c) if e.name == env_name), None)
        if env is None:
            env = (await c.tenancy.CreateEnvironment(tenancy_pb2.CreateEnvironmentRequest(
                name=env_name, type=_ENV_TYPES[env_type]))).environment  # type: ignore[arg-type]
            step(f"environment {env_name} created", env.id)
        templates = await pages(lambda t: c.agents.ListAgentTemplates(agents_pb2.ListAgentTemplatesRequest(
            project_id=project.id, page_size=500, page_token=t)), "agent_templates")
        tpl = next((t for t in templates if t.slug == tpl_slug), None)
        if tpl is None:
            tpl = (await c.agents.CreateAgentTemplate(agents_pb2.CreateAgentTemplateRequest(
                project_id=project.id, slug=tpl_slug, name=spec.get("template_name", tpl_slug)))).agent_template
            step(f"template {tpl_slug} created", tpl.id)
        v = (await c.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(
            template_id=tpl.id, genome=genome))).agent_version
        step(f"version {tpl_slug}@{v.number} DRAFT", v.id)
        for state in (agents_pb2.VERSION_STATE_TESTING, agents_pb2.VERSION_STATE_CANDIDATE,
                      agents_pb2.VERSION_STATE_APPROVED):
            if state == agents_pb2.VERSION_STATE_CANDIDATE:
                v = (await c.agents.RecordEvaluation(agents_pb2.RecordEvaluationRequest(
                    id=v.id, eval_status=agents_pb2.EVAL_STATUS_PASS,
                    summary=str(spec.get("eval_summary", "evaluated"))))).agent_version
            v = (await c.agents.TransitionAgentVersion(agents_pb2.TransitionAgentVersionRequest(
                id=v.id, to_state=state, etag=v.etag))).agent_version  # type: ignore[arg-type]
            step(f"  → {short_enum(agents_pb2.VersionState.Name(state), 'VERSION_STATE_')}", v.id)
        inst = (await c.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
            version_id=v.id, environment_id=env.id, name=name))).agent_instance
        inst = (await c.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
            id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE, etag=inst.etag))).agent_instance
        step(f"instance {name} ACTIVE", inst.id)
        return inst  # type: ignore[no-any-return]

    inst = call(ctx, create)
    if output is not Format.table:
        emit_object({}, output, raw={"steps": steps, "instance": as_dict(inst)})


_SCOPES = {"tenant": policy_pb2.POLICY_SCOPE_TENANT, "project": policy_pb2.POLICY_SCOPE_PROJECT,
           "version": policy_pb2.POLICY_SCOPE_VERSION}


def _enum(enum: Any, prefix: str, value: Any, where: str) -> int:
    try:
        return int(enum.Value(prefix + str(value).upper()))
    except ValueError:
        names = [short_enum(n, prefix) for n, v in enum.items() if v]
        raise typer.BadParameter(f"{where}: {value!r} is not one of {', '.join(names)}", param_hint="--file") from None


async def _envelope(c: ArmClient, spec: dict[str, Any]) -> policy_pb2.PolicyEnvelope:
    """One YAML document → an envelope. Scope: `scope: tenant`, `project: SLUG` or
    `version: TEMPLATE@NUMBER`."""
    where = f"envelope {spec.get('name', '?')!r}"
    env = policy_pb2.PolicyEnvelope(name=_need(spec, "name"), description=spec.get("description", ""))
    if "project" in spec:
        env.scope, env.scope_id = policy_pb2.POLICY_SCOPE_PROJECT, await project_id(c, str(spec["project"]))
    elif "version" in spec:
        env.scope, env.scope_id = policy_pb2.POLICY_SCOPE_VERSION, (await version(c, str(spec["version"]), None)).id
    elif str(spec.get("scope", "")).lower() == "tenant":
        env.scope = policy_pb2.POLICY_SCOPE_TENANT
    else:
        raise typer.BadParameter(f"{where}: give scope: tenant, project: SLUG or version: TEMPLATE@N",
                                 param_hint="--file")
    if "mode" in spec:
        env.mode = _enum(policy_pb2.PolicyMode, "POLICY_MODE_", spec["mode"], where)  # type: ignore[assignment]
    for rule in spec.get("tool_rules") or []:
        env.tool_rules.add(tool=str(rule.get("tool", "")), locked=bool(rule.get("locked", False)),
                           description=str(rule.get("description", "")),
                           effect=_enum(policy_pb2.Decision, "DECISION_", rule.get("effect", ""), where))  # type: ignore[arg-type]
    for field in ("deny_at_risk", "require_approval_at_risk"):
        if field in spec:
            setattr(env, field, _enum(common_pb2.RiskLevel, "RISK_LEVEL_", spec[field], where))
    if "default_effect" in spec:
        env.default_effect = _enum(policy_pb2.Decision, "DECISION_", spec["default_effect"], where)  # type: ignore[assignment]
    if "autonomy_tier" in spec:
        env.autonomy_tier = int(spec["autonomy_tier"])
    if "priority" in spec:
        env.priority = int(spec["priority"])
    for key, value in (spec.get("budgets") or {}).items():
        if key not in ("per_run_usd", "daily_usd", "monthly_usd"):
            raise typer.BadParameter(f"{where}: budgets.{key} is not per_run_usd, daily_usd or monthly_usd",
                                     param_hint="--file")
        setattr(env.budgets, key, float(value))
    return env


@envelopes_app.command("create")
def envelopes_create(ctx: typer.Context,
                     file: Annotated[Path, typer.Option("--file", "-f", help="YAML, one envelope per document")],
                     reason: Annotated[str, typer.Option("--reason", "-r")] = "",
                     output: Output = Format.table) -> None:
    """Creates each envelope of the file (nothing is updated: use `arm policy apply` for that)."""
    specs = _load(file, many=True)

    async def create(c: ArmClient) -> list[policy_pb2.PolicyEnvelope]:
        envelopes = [await _envelope(c, spec) for spec in specs]  # every document checked before any write
        return [(await c.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
            envelope=e, reason=reason))).envelope for e in envelopes]

    made = call(ctx, create)
    emit_rows([{"id": e.envelope_id, "name": e.name,
                "scope": f"{short_enum(policy_pb2.PolicyScope.Name(e.scope), 'POLICY_SCOPE_')} {e.scope_id}".strip(),
                "revision": e.revision, "rules": len(e.tool_rules)} for e in made],
              output, ["id", "name", "scope", "revision", "rules"], raw=[as_dict(e) for e in made])
