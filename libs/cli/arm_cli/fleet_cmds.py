"""The fleet by name: environments, agent instances (create, show, the lifecycle transitions of
the API), identities (upsert by name), and deployments (governance's DeploymentService: create,
activate, rollback, list)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from arm.common.v1 import common_pb2
from arm.governance.v1 import deployments_pb2
from arm.registry.v1 import agents_pb2, tenancy_pb2
from arm_cli.main import Output, app, call, instance_id
from arm_cli.output import Format, as_dict, emit_object, emit_rows, short_enum
from arm_cli.registry_cmds import _missing, _time, pages, template, version
from arm_client.stubs import ArmClient

environments_app = typer.Typer(help="Environments (release channels): list, create.", no_args_is_help=True)
instances_app = typer.Typer(help="Agent instances: list, create, show, transition.", no_args_is_help=True)
identities_app = typer.Typer(help="Agent identities (presentation and soul): list, upsert.", no_args_is_help=True)
deployments_app = typer.Typer(help="Deployments: create, activate, rollback, list.", no_args_is_help=True)
for sub, name in ((environments_app, "environments"), (instances_app, "instances"),
                  (identities_app, "identities"), (deployments_app, "deployments")):
    app.add_typer(sub, name=name)

_ENV_TYPES = {"dev": tenancy_pb2.ENVIRONMENT_TYPE_DEV, "staging": tenancy_pb2.ENVIRONMENT_TYPE_STAGING,
              "prod": tenancy_pb2.ENVIRONMENT_TYPE_PROD}
_INSTANCE_STATES = {short_enum(n, "INSTANCE_STATE_").lower(): v for n, v in agents_pb2.InstanceState.items() if v}
_ROLLOUTS = {"all-at-once": deployments_pb2.ROLLOUT_POLICY_ALL_AT_ONCE, "canary": deployments_pb2.ROLLOUT_POLICY_CANARY,
             "rolling": deployments_pb2.ROLLOUT_POLICY_ROLLING}
_DEPLOY_STATUSES = {short_enum(n, "DEPLOYMENT_STATUS_").lower(): v
                    for n, v in deployments_pb2.DeploymentStatus.items() if v}


def _choice(value: str, table: dict[str, int], option: str) -> int:
    if value.lower() not in table:
        raise typer.BadParameter(f"one of {', '.join(table)}", param_hint=option)
    return table[value.lower()]


async def environments(c: ArmClient) -> list[Any]:
    return await pages(lambda t: c.tenancy.ListEnvironments(tenancy_pb2.ListEnvironmentsRequest(
        page_size=500, page_token=t)), "environments")


async def environment_id(c: ArmClient, ref: str) -> str:
    """An environment's id from its name (an id is accepted as is)."""
    for e in await environments(c):
        if ref in (e.name, e.id):
            return str(e.id)
    raise _missing("environment", ref)


# --- environments ------------------------------------------------------------------------------

def _env_row(e: tenancy_pb2.Environment) -> dict[str, Any]:
    return {"id": e.id, "name": e.name, "type": short_enum(tenancy_pb2.EnvironmentType.Name(e.type),
                                                           "ENVIRONMENT_TYPE_"),
            "require_active_deployment": e.require_active_deployment, "created": _time(e, "create_time")}


@environments_app.command("list")
def environments_list(ctx: typer.Context, output: Output = Format.table) -> None:
    items = call(ctx, environments)
    emit_rows([_env_row(e) for e in items], output, ["id", "name", "type", "require_active_deployment", "created"],
              raw=[as_dict(e) for e in items])


@environments_app.command("create")
def environments_create(ctx: typer.Context, name: str,
                        type_: Annotated[str, typer.Option("--type", help="dev, staging or prod")] = "dev",
                        require_active_deployment: Annotated[bool, typer.Option(
                            help="Instances may only run a version with an ACTIVE deployment here")] = False,
                        output: Output = Format.table) -> None:
    env_type = _choice(type_, _ENV_TYPES, "--type")
    e = call(ctx, lambda c: c.tenancy.CreateEnvironment(tenancy_pb2.CreateEnvironmentRequest(
        name=name, type=env_type, require_active_deployment=require_active_deployment))).environment  # type: ignore[arg-type]
    emit_object(_env_row(e), output, title="Environment created", raw=as_dict(e))


# --- instances ---------------------------------------------------------------------------------

def _instance_row(i: agents_pb2.AgentInstance) -> dict[str, Any]:
    return {"id": i.id, "name": i.name, "state": short_enum(agents_pb2.InstanceState.Name(i.state), "INSTANCE_STATE_"),
            "version": i.version_id, "environment": i.environment_id, "project": i.project_id,
            "heartbeat": _time(i, "last_heartbeat_time")}


_INSTANCE_COLUMNS = ["id", "name", "state", "version", "environment", "project", "heartbeat"]


@instances_app.command("list")
def instances_list(ctx: typer.Context,
                   env: Annotated[str | None, typer.Option(help="Environment name")] = None,
                   state: Annotated[str | None, typer.Option(help=f"One of {', '.join(_INSTANCE_STATES)}")] = None,
                   output: Output = Format.table) -> None:
    st = _choice(state, _INSTANCE_STATES, "--state") if state else 0

    async def fetch(c: ArmClient) -> list[Any]:
        eid = await environment_id(c, env) if env else ""
        return await pages(lambda t: c.agents.ListAgentInstances(agents_pb2.ListAgentInstancesRequest(
            environment_id=eid, state=st, page_size=500, page_token=t)), "agent_instances")  # type: ignore[arg-type]

    items = call(ctx, fetch)
    emit_rows([_instance_row(i) for i in items], output, _INSTANCE_COLUMNS, raw=[as_dict(i) for i in items])


@instances_app.command("create")
def instances_create(ctx: typer.Context, name: str,
                     version_ref: Annotated[str, typer.Option("--version", help="Version id or TEMPLATE@NUMBER")],
                     env: Annotated[str, typer.Option(help="Environment name (or id)")],
                     project: Annotated[str | None, typer.Option(help="Project slug, to find the template")] = None,
                     output: Output = Format.table) -> None:
    """An instance NAME of a version in an environment (PROVISIONING until activated)."""

    async def create(c: ArmClient) -> agents_pb2.AgentInstance:
        v = await version(c, version_ref, project)
        eid = await environment_id(c, env)
        return (await c.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
            version_id=v.id, environment_id=eid, name=name))).agent_instance

    i = call(ctx, create)
    emit_object(_instance_row(i), output, title="Instance created", raw=as_dict(i))


@instances_app.command("show")
def instances_show(ctx: typer.Context, ref: Annotated[str, typer.Argument(metavar="INSTANCE", help="Name or id")],
                   output: Output = Format.table) -> None:
    async def fetch(c: ArmClient) -> agents_pb2.AgentInstance:
        return (await c.agents.GetAgentInstance(agents_pb2.GetAgentInstanceRequest(
            id=await instance_id(c, ref)))).agent_instance

    i = call(ctx, fetch)
    row = _instance_row(i)
    row.update({"template": i.template_id, "legacy_agent_id": i.legacy_agent_id,
                "activated": _time(i, "activate_time"), "retired": _time(i, "retire_time"),
                "created": _time(i, "create_time"), "etag": i.etag})
    emit_object({k: v for k, v in row.items() if v != ""}, output, title=f"Instance {i.name}", raw=as_dict(i))


@instances_app.command("transition")
def instances_transition(ctx: typer.Context,
                         ref: Annotated[str, typer.Argument(metavar="INSTANCE", help="Name or id")],
                         to: Annotated[str, typer.Argument(metavar="STATE", help=", ".join(_INSTANCE_STATES))],
                         reason: Annotated[str, typer.Option("--reason", "-r")] = "",
                         approval: Annotated[str, typer.Option(help="An approval id, where the move needs one")] = "",
                         output: Output = Format.table) -> None:
    """Moves an instance along its lifecycle (e.g. provisioning → active → paused → retired); a
    move the lifecycle does not allow is refused with the allowed targets."""
    target = _choice(to, _INSTANCE_STATES, "STATE")

    async def move(c: ArmClient) -> tuple[str, agents_pb2.AgentInstance]:
        current = (await c.agents.GetAgentInstance(agents_pb2.GetAgentInstanceRequest(
            id=await instance_id(c, ref)))).agent_instance
        before = short_enum(agents_pb2.InstanceState.Name(current.state), "INSTANCE_STATE_")
        moved = (await c.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
            id=current.id, to_state=target, reason=reason, approval_id=approval,  # type: ignore[arg-type]
            etag=current.etag))).agent_instance
        return before, moved

    before, i = call(ctx, move)
    row = _instance_row(i)
    emit_object({"id": i.id, "name": i.name, "from": before, "to": row["state"]}, output,
                title="Instance moved", raw=as_dict(i))


# --- identities --------------------------------------------------------------------------------

def _identity_row(i: agents_pb2.AgentIdentity) -> dict[str, Any]:
    return {"id": i.id, "name": i.name,
            "validation": short_enum(agents_pb2.IdentityValidationStatus.Name(i.validation_status),
                                     "IDENTITY_VALIDATION_STATUS_"),
            "soul_hash": i.soul_hash[:16], "template": i.template_id, "instance": i.instance_id,
            "description": i.description}


@identities_app.command("list")
def identities_list(ctx: typer.Context, template_slug: Annotated[str | None, typer.Option(
                        "--template", help="Only this template's (slug)")] = None,
                    output: Output = Format.table) -> None:
    async def fetch(c: ArmClient) -> list[Any]:
        tid = (await template(c, template_slug, None)).id if template_slug else ""
        return await pages(lambda t: c.agents.ListAgentIdentities(agents_pb2.ListAgentIdentitiesRequest(
            template_id=tid, page_size=500, page_token=t)), "agent_identities")

    items = call(ctx, fetch)
    emit_rows([_identity_row(i) for i in items], output,
              ["id", "name", "validation", "soul_hash", "template", "instance", "description"],
              raw=[as_dict(i) for i in items])


@identities_app.command("upsert")
def identities_upsert(ctx: typer.Context, name: str,
                      soul_file: Annotated[Path | None, typer.Option(help="The soul (text or markdown file)")] = None,
                      tools_notes: Annotated[str, typer.Option(help="Notes on the agent's tools")] = "",
                      description: Annotated[str, typer.Option()] = "",
                      template_slug: Annotated[str | None, typer.Option("--template", help="Template slug")] = None,
                      instance: Annotated[str | None, typer.Option(help="Instance name or id")] = None,
                      output: Output = Format.table) -> None:
    """Creates identity NAME or replaces its content (the server hashes the soul and grades it:
    VALID, PARTIAL without tools notes, MISSING without a soul)."""
    try:
        soul = soul_file.read_text() if soul_file is not None else ""
    except OSError as exc:
        raise typer.BadParameter(str(exc), param_hint="--soul-file") from None

    async def upsert(c: ArmClient) -> agents_pb2.UpsertAgentIdentityResponse:
        ident = agents_pb2.AgentIdentity(name=name, soul_content=soul, tools_notes=tools_notes,
                                         description=description)
        if template_slug:
            ident.template_id = (await template(c, template_slug, None)).id
        if instance:
            ident.instance_id = await instance_id(c, instance)
        return await c.agents.UpsertAgentIdentity(agents_pb2.UpsertAgentIdentityRequest(agent_identity=ident))

    r = call(ctx, upsert)
    emit_object({**_identity_row(r.agent_identity), "created": r.created}, output,
                title=f"Identity {'created' if r.created else 'updated'}", raw=as_dict(r))


# --- deployments -------------------------------------------------------------------------------

def _deployment_row(d: deployments_pb2.Deployment) -> dict[str, Any]:
    return {"id": d.deployment_id,
            "status": short_enum(deployments_pb2.DeploymentStatus.Name(d.status), "DEPLOYMENT_STATUS_"),
            "template": d.template_id, "environment": d.environment_id, "target": d.target_version_id,
            "previous": d.previous_version_id,
            "rollout": short_enum(deployments_pb2.RolloutPolicy.Name(d.rollout_policy), "ROLLOUT_POLICY_"),
            "rollback_of": d.rollback_of, "approval": d.approval_id,
            "by": f"{short_enum(common_pb2.ActorType.Name(d.created_by.type), 'ACTOR_TYPE_').lower()} "
                  f"{d.created_by.id}".strip(), "created": _time(d, "create_time")}


_DEPLOYMENT_COLUMNS = ["id", "status", "template", "environment", "target", "previous", "rollout", "rollback_of",
                       "created"]


@deployments_app.command("list")
def deployments_list(ctx: typer.Context,
                     template_slug: Annotated[str | None, typer.Option("--template", help="Template slug")] = None,
                     env: Annotated[str | None, typer.Option(help="Environment name")] = None,
                     status: Annotated[list[str] | None, typer.Option(
                         help=f"Repeatable: {', '.join(_DEPLOY_STATUSES)}")] = None,
                     output: Output = Format.table) -> None:
    statuses = [_choice(s, _DEPLOY_STATUSES, "--status") for s in status or []]

    async def fetch(c: ArmClient) -> list[Any]:
        tid = (await template(c, template_slug, None)).id if template_slug else ""
        eid = await environment_id(c, env) if env else ""
        return await pages(lambda t: c.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest(
            template_id=tid, environment_id=eid, statuses=statuses,  # type: ignore[arg-type]
            page_size=500, page_token=t)), "deployments")

    items = call(ctx, fetch)
    emit_rows([_deployment_row(d) for d in items], output, _DEPLOYMENT_COLUMNS, raw=[as_dict(d) for d in items])


@deployments_app.command("create")
def deployments_create(ctx: typer.Context,
                       version_ref: Annotated[str, typer.Argument(metavar="VERSION",
                                                                  help="An APPROVED version: TEMPLATE@NUMBER or id")],
                       env: Annotated[str, typer.Option(help="Environment name (or id)")],
                       rollout: Annotated[str, typer.Option(help=", ".join(_ROLLOUTS))] = "all-at-once",
                       canary_percent: Annotated[int, typer.Option(min=0, max=100)] = 0,
                       batch_size: Annotated[int, typer.Option(min=0)] = 0,
                       reason: Annotated[str, typer.Option("--reason", "-r")] = "",
                       project: Annotated[str | None, typer.Option(help="Project slug, to find the template")] = None,
                       output: Output = Format.table) -> None:
    """A PENDING deployment of VERSION to an environment (activate it with `arm deployments activate`)."""
    policy = _choice(rollout, _ROLLOUTS, "--rollout")

    async def create(c: ArmClient) -> deployments_pb2.Deployment:
        v = await version(c, version_ref, project)
        eid = await environment_id(c, env)
        return (await c.deployments.CreateDeployment(deployments_pb2.CreateDeploymentRequest(
            deployment=deployments_pb2.Deployment(
                template_id=v.template_id, environment_id=eid, target_version_id=v.id,
                rollout_policy=policy, canary_percent=canary_percent, batch_size=batch_size),  # type: ignore[arg-type]
            reason=reason))).deployment

    d = call(ctx, create)
    emit_object(_deployment_row(d), output, title="Deployment created", raw=as_dict(d))


@deployments_app.command("activate")
def deployments_activate(ctx: typer.Context, deployment_id: str,
                         approval: Annotated[str, typer.Option(
                             help="An approved DEPLOYMENT_ACTIVATION approval (PROD environments)")] = "",
                         reason: Annotated[str, typer.Option("--reason", "-r")] = "",
                         output: Output = Format.table) -> None:
    """Makes a PENDING deployment ACTIVE (retiring the template's ACTIVE one in that environment)."""

    async def activate(c: ArmClient) -> deployments_pb2.ActivateDeploymentResponse:
        current = (await c.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(
            deployment_id=deployment_id))).deployment
        return await c.deployments.ActivateDeployment(deployments_pb2.ActivateDeploymentRequest(
            deployment_id=deployment_id, approval_id=approval, etag=current.etag, reason=reason))

    r = call(ctx, activate)
    row = _deployment_row(r.deployment)
    if r.HasField("retired_deployment"):
        row["retired"] = r.retired_deployment.deployment_id
    emit_object(row, output, title="Deployment activated", raw=as_dict(r))


@deployments_app.command("rollback")
def deployments_rollback(ctx: typer.Context, deployment_id: str,
                         reason: Annotated[str, typer.Option("--reason", "-r")] = "",
                         output: Output = Format.table) -> None:
    """Rolls an ACTIVE deployment back to its previous version (its instances are rebound)."""

    async def rollback(c: ArmClient) -> deployments_pb2.RollbackDeploymentResponse:
        current = (await c.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(
            deployment_id=deployment_id))).deployment
        return await c.deployments.RollbackDeployment(deployments_pb2.RollbackDeploymentRequest(
            deployment_id=deployment_id, etag=current.etag, reason=reason))

    r = call(ctx, rollback)
    row = _deployment_row(r.deployment)
    row.update({"rolled_back": r.rolled_back_deployment.deployment_id, "rebound_instances": r.rebound_instance_count})
    emit_object(row, output, title="Deployment rolled back", raw=as_dict(r))
    if r.rebound_instance_count:
        sys.stderr.write(f"{r.rebound_instance_count} instances rebound to {r.deployment.target_version_id}\n")

