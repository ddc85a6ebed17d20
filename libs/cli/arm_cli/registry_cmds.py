"""Registry basics by name or slug where the API takes an id: tenants, projects, operators, roles
and role assignments, API keys, templates, versions (create from a genome file, promote along
TESTING → CANDIDATE → APPROVED), and the kill switches (`arm pause|resume tenant|project`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
import yaml
from google.protobuf import struct_pb2

from arm.common.v1 import common_pb2
from arm.governance.v1 import policy_pb2
from arm.registry.v1 import access_pb2, agents_pb2, tenancy_pb2
from arm_cli.main import Output, app, call
from arm_cli.output import Format, as_dict, emit_object, emit_rows, short_enum
from arm_client.errors import NotFound
from arm_client.stubs import ArmClient

T = TypeVar("T")

tenants_app = typer.Typer(help="Tenants (system admins).", no_args_is_help=True)
projects_app = typer.Typer(help="Projects of your tenant.", no_args_is_help=True)
operators_app = typer.Typer(help="Operators (people) of your tenant.", no_args_is_help=True)
roles_app = typer.Typer(help="Roles and role assignments.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (the secret is shown once).", no_args_is_help=True)
templates_app = typer.Typer(help="Agent templates.", no_args_is_help=True)
versions_app = typer.Typer(help="Agent versions: create from a genome file, promote.", no_args_is_help=True)
pause_app = typer.Typer(help="Kill switches: pause a tenant or a project (agents' calls are denied).",
                        no_args_is_help=True)
resume_app = typer.Typer(help="Lift a kill switch.", no_args_is_help=True)
for sub, name in ((tenants_app, "tenants"), (projects_app, "projects"), (operators_app, "operators"),
                  (roles_app, "roles"), (keys_app, "keys"), (templates_app, "templates"),
                  (versions_app, "versions"), (pause_app, "pause"), (resume_app, "resume")):
    app.add_typer(sub, name=name)


async def pages(fetch: Callable[[str], Awaitable[Any]], field: str) -> list[Any]:
    """Every item of a paged List call (`fetch(page_token)`)."""
    out: list[Any] = []
    token = ""
    while True:
        page = await fetch(token)
        out += list(getattr(page, field))
        token = page.next_page_token
        if not token:
            return out


def _missing(what: str, name: str) -> NotFound:
    return NotFound(f"no {what} named {name!r} in your tenant", code=grpc.StatusCode.NOT_FOUND,
                    reason=f"{what.upper()}_NOT_FOUND")


async def project_id(c: ArmClient, slug: str) -> str:
    """A project's id from its slug (an id is accepted as is)."""
    items = await pages(lambda t: c.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest(page_size=500, page_token=t)),
                        "projects")
    for p in items:
        if slug in (p.slug, p.id):
            return str(p.id)
    raise _missing("project", slug)


async def operator_id(c: ArmClient, email: str) -> str:
    items = await pages(lambda t: c.access.ListOperators(access_pb2.ListOperatorsRequest(page_size=500, page_token=t)),
                        "operators")
    for o in items:
        if email.lower() in (o.email.lower(), o.id):
            return str(o.id)
    raise _missing("operator", email)


async def role_id(c: ArmClient, name: str) -> str:
    items = await pages(lambda t: c.access.ListRoles(access_pb2.ListRolesRequest(page_size=500, page_token=t)),
                        "roles")
    for r in items:
        if name in (r.name, r.id):
            return str(r.id)
    raise _missing("role", name)


async def template(c: ArmClient, slug: str, project: str | None) -> agents_pb2.AgentTemplate:
    """A template by slug (within --project when given; an id is accepted as is)."""
    pid = await project_id(c, project) if project else ""
    items = await pages(lambda t: c.agents.ListAgentTemplates(agents_pb2.ListAgentTemplatesRequest(
        project_id=pid, page_size=500, page_token=t)), "agent_templates")
    found = [t for t in items if slug in (t.slug, t.id)]
    if not found:
        raise _missing("template", slug)
    if len(found) > 1:
        raise NotFound(f"template slug {slug!r} is in several projects; add --project", reason="AMBIGUOUS_TEMPLATE")
    return found[0]  # type: ignore[no-any-return]


async def version(c: ArmClient, ref: str, project: str | None) -> agents_pb2.AgentVersion:
    """A version by id, or by `TEMPLATE_SLUG@NUMBER`."""
    if "@" not in ref:
        return (await c.agents.GetAgentVersion(agents_pb2.GetAgentVersionRequest(id=ref))).agent_version
    slug, _, number = ref.rpartition("@")
    if not number.isdigit():
        raise typer.BadParameter(f"{ref!r}: expected TEMPLATE@NUMBER or a version id", param_hint="VERSION")
    tpl = await template(c, slug, project)
    items = await pages(lambda t: c.agents.ListAgentVersions(agents_pb2.ListAgentVersionsRequest(
        template_id=tpl.id, page_size=500, page_token=t)), "agent_versions")
    for v in items:
        if v.number == int(number):
            return v  # type: ignore[no-any-return]
    raise _missing("version", ref)


def _time(msg: Any, name: str) -> str:
    return getattr(msg, name).ToDatetime().isoformat(timespec="seconds") + "Z" if msg.HasField(name) else ""


KeyFile = Annotated[Path | None, typer.Option(help="Write the new API key to this file (mode 0600) instead of showing it")]


def _keep(secret: str, path: Path | None) -> str:
    """Writes a new key to `path` (0600) and answers what to show in its place."""
    if path is None or not secret:
        return secret
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT: tighten it before writing
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return f"written to {path}"


# --- tenants, projects, operators --------------------------------------------------------------

@tenants_app.command("list")
def tenants_list(ctx: typer.Context, output: Output = Format.table) -> None:
    """Every tenant (system admins only)."""
    items = call(ctx, lambda c: pages(lambda t: c.tenancy.ListTenants(tenancy_pb2.ListTenantsRequest(
        page_size=500, page_token=t)), "tenants"))
    emit_rows([{"id": t.id, "slug": t.slug, "name": t.name, "active": t.active, "system": t.system} for t in items],
              output, ["id", "slug", "name", "active", "system"], raw=[as_dict(t) for t in items])


@tenants_app.command("create")
def tenants_create(ctx: typer.Context, slug: str,
                   admin_email: Annotated[str, typer.Option(help="The tenant's first admin")],
                   name: Annotated[str, typer.Option()] = "", admin_name: Annotated[str, typer.Option()] = "",
                   key_file: KeyFile = None, output: Output = Format.table) -> None:
    """A tenant and its first admin; the admin's API key is shown once (or written to --key-file)."""
    r = call(ctx, lambda c: c.tenancy.CreateTenant(tenancy_pb2.CreateTenantRequest(
        slug=slug, name=name or slug, admin_email=admin_email, admin_name=admin_name or admin_email)))
    secret = _keep(r.admin_api_key, key_file)
    emit_object({"id": r.tenant.id, "slug": r.tenant.slug, "admin_operator": r.admin_operator_id,
                 "admin_api_key": secret}, output, title="Tenant created", raw=as_dict(r) if not key_file else None)
    if not key_file:
        sys.stderr.write("The admin's API key is shown once: store it now.\n")


@projects_app.command("list")
def projects_list(ctx: typer.Context, output: Output = Format.table) -> None:
    items = call(ctx, lambda c: pages(lambda t: c.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest(
        page_size=500, page_token=t)), "projects"))
    emit_rows([{"id": p.id, "slug": p.slug, "name": p.name, "created": _time(p, "create_time")} for p in items],
              output, ["id", "slug", "name", "created"], raw=[as_dict(p) for p in items])


@projects_app.command("create")
def projects_create(ctx: typer.Context, slug: str, name: Annotated[str, typer.Option()] = "",
                    description: Annotated[str, typer.Option()] = "", output: Output = Format.table) -> None:
    p = call(ctx, lambda c: c.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
        slug=slug, name=name or slug, description=description))).project
    emit_object({"id": p.id, "slug": p.slug, "name": p.name}, output, title="Project created", raw=as_dict(p))


@operators_app.command("list")
def operators_list(ctx: typer.Context, output: Output = Format.table) -> None:
    items = call(ctx, lambda c: pages(lambda t: c.access.ListOperators(access_pb2.ListOperatorsRequest(
        page_size=500, page_token=t)), "operators"))
    emit_rows([{"id": o.id, "email": o.email, "name": o.name, "active": o.active} for o in items],
              output, ["id", "email", "name", "active"], raw=[as_dict(o) for o in items])


@operators_app.command("create")
def operators_create(ctx: typer.Context, email: str, name: Annotated[str, typer.Option()] = "",
                     role: Annotated[list[str] | None, typer.Option(
                         help="Also assign this role (by name) tenant-wide; repeatable")] = None,
                     key_file: KeyFile = None, output: Output = Format.table) -> None:
    """An operator; with --role, its roles; with --key-file, an API key for it written there."""

    async def create(c: ArmClient) -> tuple[access_pb2.Operator, str]:
        rids = [await role_id(c, r) for r in role or []]  # unknown role names refused before any write
        op = (await c.access.CreateOperator(access_pb2.CreateOperatorRequest(email=email, name=name or email))).operator
        for rid in rids:
            await c.access.CreateRoleAssignment(access_pb2.CreateRoleAssignmentRequest(
                operator_id=op.id, role_id=rid, scope_type=access_pb2.ROLE_SCOPE_TYPE_TENANT))
        secret = ""
        if key_file is not None:
            secret = (await c.access.CreateApiKey(access_pb2.CreateApiKeyRequest(operator_id=op.id))).secret
        return op, secret

    o, secret = call(ctx, create)
    _keep(secret, key_file)
    emit_object({"id": o.id, "email": o.email, "name": o.name, "roles": ", ".join(role or []),
                 "api_key": f"written to {key_file}" if key_file else ""}, output, title="Operator created",
                raw=as_dict(o))


# --- roles and keys ----------------------------------------------------------------------------

@roles_app.command("list")
def roles_list(ctx: typer.Context, output: Output = Format.table) -> None:
    items = call(ctx, lambda c: pages(lambda t: c.access.ListRoles(access_pb2.ListRolesRequest(
        page_size=500, page_token=t)), "roles"))
    emit_rows([{"name": r.name, "id": r.id, "built_in": r.built_in, "permissions": ", ".join(r.permissions)}
               for r in items], output, ["name", "id", "built_in", "permissions"], raw=[as_dict(r) for r in items])


@roles_app.command("assign")
def roles_assign(ctx: typer.Context, email: str, role: str,
                 project: Annotated[str | None, typer.Option(help="Only in this project (slug); default the tenant")] = None,
                 output: Output = Format.table) -> None:
    """Gives operator EMAIL the role ROLE (by name), tenant-wide or in --project."""

    async def assign(c: ArmClient) -> access_pb2.RoleAssignment:
        op, rid = await operator_id(c, email), await role_id(c, role)
        scope, scope_id = access_pb2.ROLE_SCOPE_TYPE_TENANT, ""
        if project:
            scope, scope_id = access_pb2.ROLE_SCOPE_TYPE_PROJECT, await project_id(c, project)
        return (await c.access.CreateRoleAssignment(access_pb2.CreateRoleAssignmentRequest(
            operator_id=op, role_id=rid, scope_type=scope, scope_id=scope_id))).role_assignment

    a = call(ctx, assign)
    emit_object({"id": a.id, "operator": email, "role": role, "scope": f"project {project}" if project else "tenant"},
                output, title="Role assigned", raw=as_dict(a))


@keys_app.command("create")
def keys_create(ctx: typer.Context,
                operator: Annotated[str, typer.Option(help="Operator e-mail (or id)")] = "",
                instance: Annotated[str, typer.Option(help="Agent instance id")] = "",
                name: Annotated[str, typer.Option(help="Display name")] = "",
                key_file: KeyFile = None, output: Output = Format.table) -> None:
    """An API key for an operator or an agent instance. The secret is shown once (or written to
    --key-file, mode 0600, and not shown)."""
    if bool(operator) == bool(instance):
        raise typer.BadParameter("give exactly one of --operator and --instance", param_hint="--operator")

    async def create(c: ArmClient) -> access_pb2.CreateApiKeyResponse:
        op = await operator_id(c, operator) if operator else ""
        return await c.access.CreateApiKey(access_pb2.CreateApiKeyRequest(
            operator_id=op, instance_id=instance, display_name=name))

    r = call(ctx, create)
    secret = _keep(r.secret, key_file)
    emit_object({"id": r.api_key.id, "operator": r.api_key.operator_id, "instance": r.api_key.instance_id,
                 "secret": secret}, output, title="API key created", raw=as_dict(r) if not key_file else None)
    if not key_file:
        sys.stderr.write("The secret is shown once: store it now.\n")


# --- templates and versions --------------------------------------------------------------------

@templates_app.command("list")
def templates_list(ctx: typer.Context, project: Annotated[str | None, typer.Option(help="Project slug")] = None,
                   output: Output = Format.table) -> None:
    async def fetch(c: ArmClient) -> list[Any]:
        pid = await project_id(c, project) if project else ""
        return await pages(lambda t: c.agents.ListAgentTemplates(agents_pb2.ListAgentTemplatesRequest(
            project_id=pid, page_size=500, page_token=t)), "agent_templates")

    items = call(ctx, fetch)
    emit_rows([{"id": t.id, "slug": t.slug, "name": t.name, "project": t.project_id, "active": t.active}
               for t in items], output, ["id", "slug", "name", "project", "active"], raw=[as_dict(t) for t in items])


@templates_app.command("create")
def templates_create(ctx: typer.Context, slug: str,
                     project: Annotated[str, typer.Option(help="Project slug")],
                     name: Annotated[str, typer.Option()] = "", output: Output = Format.table) -> None:
    async def create(c: ArmClient) -> agents_pb2.AgentTemplate:
        pid = await project_id(c, project)
        return (await c.agents.CreateAgentTemplate(agents_pb2.CreateAgentTemplateRequest(
            project_id=pid, slug=slug, name=name or slug))).agent_template

    t = call(ctx, create)
    emit_object({"id": t.id, "slug": t.slug, "project": project}, output, title="Template created", raw=as_dict(t))


def _version_row(v: agents_pb2.AgentVersion) -> dict[str, Any]:
    return {"id": v.id, "number": v.number,
            "state": short_enum(agents_pb2.VersionState.Name(v.state), "VERSION_STATE_"),
            "eval": short_enum(agents_pb2.EvalStatus.Name(v.eval_status), "EVAL_STATUS_"),
            "genome_hash": v.genome_hash[:16], "approved_by": v.approved_by}


@versions_app.command("list")
def versions_list(ctx: typer.Context, template_slug: Annotated[str, typer.Argument(metavar="TEMPLATE")],
                  project: Annotated[str | None, typer.Option(help="Project slug")] = None,
                  output: Output = Format.table) -> None:
    async def fetch(c: ArmClient) -> list[Any]:
        tpl = await template(c, template_slug, project)
        return await pages(lambda t: c.agents.ListAgentVersions(agents_pb2.ListAgentVersionsRequest(
            template_id=tpl.id, page_size=500, page_token=t)), "agent_versions")

    items = call(ctx, fetch)
    emit_rows([_version_row(v) for v in items], output, ["id", "number", "state", "eval", "genome_hash", "approved_by"],
              raw=[as_dict(v) for v in items])


@versions_app.command("create")
def versions_create(ctx: typer.Context,
                    file: Annotated[Path, typer.Option("--file", "-f", help="The genome, YAML or JSON")],
                    template_slug: Annotated[str, typer.Option("--template", help="Template slug")],
                    project: Annotated[str | None, typer.Option(help="Project slug")] = None,
                    notes: Annotated[str, typer.Option()] = "", output: Output = Format.table) -> None:
    """A DRAFT version of TEMPLATE from a genome file."""
    try:
        genome = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--file") from None
    if not isinstance(genome, dict):
        raise typer.BadParameter("the genome must be a mapping", param_hint="--file")
    struct = struct_pb2.Struct()
    struct.update(genome)

    async def create(c: ArmClient) -> agents_pb2.AgentVersion:
        tpl = await template(c, template_slug, project)
        return (await c.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(
            template_id=tpl.id, genome=struct, notes=notes))).agent_version

    v = call(ctx, create)
    emit_object(_version_row(v), output, title=f"Version {template_slug}@{v.number} created", raw=as_dict(v))


_STATES = {"testing": agents_pb2.VERSION_STATE_TESTING, "candidate": agents_pb2.VERSION_STATE_CANDIDATE,
           "approved": agents_pb2.VERSION_STATE_APPROVED}


@versions_app.command("promote")
def versions_promote(ctx: typer.Context,
                     ref: Annotated[str, typer.Argument(metavar="VERSION", help="Version id or TEMPLATE@NUMBER")],
                     to: Annotated[str, typer.Option(help="testing, candidate or approved")] = "approved",
                     eval_summary: Annotated[str, typer.Option(
                         help="The evaluation record (PASS) needed to reach CANDIDATE")] = "",
                     reason: Annotated[str, typer.Option()] = "",
                     approval: Annotated[str, typer.Option(
                         help="An approved VERSION_PROMOTION approval, where promotions need one")] = "",
                     project: Annotated[str | None, typer.Option(help="Project slug")] = None,
                     output: Output = Format.table) -> None:
    """Walks a version DRAFT → TESTING → CANDIDATE (recording a PASS evaluation) → APPROVED, up
    to --to, printing each step."""
    if to.lower() not in _STATES:
        raise typer.BadParameter(f"one of {', '.join(_STATES)}", param_hint="--to")
    target = _STATES[to.lower()]
    path = [agents_pb2.VERSION_STATE_TESTING, agents_pb2.VERSION_STATE_CANDIDATE, agents_pb2.VERSION_STATE_APPROVED]
    steps: list[dict[str, Any]] = []

    def step(what: str, v: agents_pb2.AgentVersion) -> None:
        row = {"step": what, **_version_row(v)}
        steps.append(row)
        if output is Format.table:
            sys.stdout.write(f"{what:<28} {row['state']:<10} eval {row['eval']}\n")
            sys.stdout.flush()

    async def walk(c: ArmClient) -> None:
        v = await version(c, ref, project)
        for state in path:
            if v.state >= state or v.state > target or state > target:
                continue
            if state == agents_pb2.VERSION_STATE_CANDIDATE and v.eval_status != agents_pb2.EVAL_STATUS_PASS:
                if not eval_summary:
                    raise typer.BadParameter("reaching CANDIDATE needs a passing evaluation: give --eval-summary",
                                             param_hint="--eval-summary")
                v = (await c.agents.RecordEvaluation(agents_pb2.RecordEvaluationRequest(
                    id=v.id, eval_status=agents_pb2.EVAL_STATUS_PASS, summary=eval_summary))).agent_version
                step("evaluation recorded", v)
            v = (await c.agents.TransitionAgentVersion(agents_pb2.TransitionAgentVersionRequest(
                id=v.id, to_state=state, reason=reason, etag=v.etag,
                approval_id=approval if state == agents_pb2.VERSION_STATE_APPROVED else ""))).agent_version
            step(f"→ {short_enum(agents_pb2.VersionState.Name(state), 'VERSION_STATE_')}", v)
        if not steps:
            step("already there", v)

    call(ctx, walk)
    if output is not Format.table:
        emit_rows(steps, output, [], raw=steps)


# --- kill switches -----------------------------------------------------------------------------

def _control(ctx: typer.Context, scope: str, slug: str | None, mode: int, reason: str, output: Format) -> None:
    async def set_mode(c: ArmClient) -> policy_pb2.OperatorControl:
        if scope == "project":
            assert slug is not None
            sc, sid = policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT, await project_id(c, slug)
        else:
            sc, sid = policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT, ""
        return (await c.policies.SetOperatorControl(policy_pb2.SetOperatorControlRequest(
            scope=sc, scope_id=sid, mode=mode, reason=reason))).control  # type: ignore[arg-type]

    ctl = call(ctx, set_mode)
    emit_object({"scope": f"{scope} {slug or ''}".strip(),
                 "mode": short_enum(policy_pb2.OperatorControlMode.Name(ctl.mode), "OPERATOR_CONTROL_MODE_"),
                 "reason": ctl.reason,
                 "by": f"{short_enum(common_pb2.ActorType.Name(ctl.updated_by.type), 'ACTOR_TYPE_').lower()} "
                       f"{ctl.updated_by.id}"}, output, title="Kill switch", raw=as_dict(ctl))


Why = Annotated[str, typer.Option("--reason", "-r", help="Why (kept in the audit trail)")]


@pause_app.command("tenant")
def pause_tenant(ctx: typer.Context, reason: Why = "", output: Output = Format.table) -> None:
    """Pauses your whole tenant: every agent's call is denied until `arm resume tenant`."""
    _control(ctx, "tenant", None, policy_pb2.OPERATOR_CONTROL_MODE_PAUSED, reason, output)


@pause_app.command("project")
def pause_project(ctx: typer.Context, slug: str, reason: Why = "", output: Output = Format.table) -> None:
    """Pauses one project (by slug)."""
    _control(ctx, "project", slug, policy_pb2.OPERATOR_CONTROL_MODE_PAUSED, reason, output)


@resume_app.command("tenant")
def resume_tenant(ctx: typer.Context, reason: Why = "", output: Output = Format.table) -> None:
    _control(ctx, "tenant", None, policy_pb2.OPERATOR_CONTROL_MODE_NORMAL, reason, output)


@resume_app.command("project")
def resume_project(ctx: typer.Context, slug: str, reason: Why = "", output: Output = Format.table) -> None:
    _control(ctx, "project", slug, policy_pb2.OPERATOR_CONTROL_MODE_NORMAL, reason, output)
