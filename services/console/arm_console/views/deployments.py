"""Deployments: per template and environment, the active version and the history; a pending
deployment activated (with the approved DEPLOYMENT_ACTIVATION approval a PROD environment needs)
and an active one rolled back to its previous version, each behind a confirmation page."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from arm.governance.v1 import deployments_pb2 as dpb
from arm.registry.v1 import agents_pb2, tenancy_pb2
from arm_client.connection import new_request_id
from arm_console.view import View
from arm_console.views.shared import all_pages, console_of, not_found
from arm_console.web import Page, Refused, enum_name, redirect, rpc_message, url_with

PAGE_SIZE = 25
STATUSES = ["PENDING", "ACTIVE", "ROLLING_BACK", "RETIRED"]
ACTIONS = {"activate": "Activate", "rollback": "Roll back"}
NO_SUCH_DEPLOYMENT = "No deployment with that id exists in your tenant. Go back to Deployments and pick one from the list."


def status(value: int) -> str:
    return enum_name(value, dpb.DeploymentStatus)


async def _versions(page: Page, ids: set[str]) -> dict[str, agents_pb2.AgentVersion]:
    async def one(vid: str) -> agents_pb2.AgentVersion | None:
        try:
            return (await page.client.agents.GetAgentVersion(agents_pb2.GetAgentVersionRequest(id=vid))).agent_version
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
    found = await asyncio.gather(*(one(v) for v in sorted(i for i in ids if i)))
    return {v.id: v for v in found if v is not None}


async def _lookups(page: Page) -> tuple[dict[str, agents_pb2.AgentTemplate], dict[str, tenancy_pb2.Environment]]:
    templates = (await page.client.agents.ListAgentTemplates(agents_pb2.ListAgentTemplatesRequest(page_size=500))
                 ).agent_templates
    envs = (await page.client.tenancy.ListEnvironments(tenancy_pb2.ListEnvironmentsRequest(page_size=500))
            ).environments
    return {t.id: t for t in templates}, {e.id: e for e in envs}


def _helpers(versions: dict[str, agents_pb2.AgentVersion]) -> dict[str, Any]:
    def vlabel(vid: str) -> str:
        return f"v{versions[vid].number}" if vid in versions else (vid[:12] + "…" if vid else "—")
    return {"dstatus": status, "vlabel": vlabel,
            "env_type": lambda t: enum_name(t, tenancy_pb2.EnvironmentType),
            "rollout": lambda r: enum_name(r, dpb.RolloutPolicy).replace("_", " ").lower() if r else "all at once"}


async def index(request: Request) -> Response:
    console = console_of(request)
    page = await console.page(request)
    q = request.query_params
    state = q.get("status", "")
    if state and state not in STATUSES:
        raise Refused(f"Unknown deployment status {state!r}.", 400)
    template, environment = q.get("template", ""), q.get("environment", "")

    async def active_page(token: str) -> tuple[list[dpb.Deployment], str]:
        resp = await page.client.deployments.ListDeployments(dpb.ListDeploymentsRequest(
            page_size=500, page_token=token, template_id=template, environment_id=environment,
            statuses=[dpb.DEPLOYMENT_STATUS_ACTIVE]))
        return list(resp.deployments), resp.next_page_token
    active = await all_pages(active_page, limit=1000)
    history = await page.client.deployments.ListDeployments(dpb.ListDeploymentsRequest(
        page_size=PAGE_SIZE, page_token=q.get("page", ""), template_id=template, environment_id=environment,
        statuses=[dpb.DeploymentStatus.Value(f"DEPLOYMENT_STATUS_{state}")] if state else []))
    selected = None
    if q.get("deployment"):
        selected = (await page.client.deployments.GetDeployment(dpb.GetDeploymentRequest(
            deployment_id=q["deployment"]))).deployment
    templates, envs = await _lookups(page)
    shown = [*active, *history.deployments, *([selected] if selected else [])]
    versions = await _versions(page, {d.target_version_id for d in shown} | {d.previous_version_id for d in shown})
    active.sort(key=lambda d: (templates[d.template_id].slug if d.template_id in templates else d.template_id,
                               envs[d.environment_id].name if d.environment_id in envs else d.environment_id))
    return await console.render(
        page, "deployments/index.html", active="deployments", title="Deployments", active_deployments=active,
        items=history.deployments, next_token=history.next_page_token, selected=selected, templates=templates,
        environments=envs, filters=dict(q), statuses=STATUSES, close_url=url_with(request, deployment=None),
        **_helpers(versions))


def _form_values(form: Any) -> tuple[str, str, str]:
    action, reason, approval = (str(form.get(k, "")).strip() for k in ("action", "reason", "approval_id"))
    if action not in ACTIONS:
        raise Refused("Choose activate or roll back.", 400)
    return action, reason, approval


async def confirm(request: Request) -> Response:
    """Step one: say exactly what will change, and ask."""
    console = console_of(request)
    page = await console.page(request)
    action, reason, approval = _form_values(await page.form())
    try:
        d = (await page.client.deployments.GetDeployment(dpb.GetDeploymentRequest(
            deployment_id=request.path_params["deployment_id"]))).deployment
    except grpc.aio.AioRpcError as exc:
        if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
            raise
        return await not_found(console, page, NO_SUCH_DEPLOYMENT)
    templates, envs = await _lookups(page)
    env = envs.get(d.environment_id)
    prod = env is not None and env.type == tenancy_pb2.ENVIRONMENT_TYPE_PROD
    if action == "activate" and status(d.status) != "PENDING":
        raise Refused("Only a pending deployment can be activated.", 409)
    if action == "rollback" and (status(d.status) != "ACTIVE" or not d.previous_version_id):
        raise Refused("Only an active deployment with a previous version can be rolled back.", 409)
    versions = await _versions(page, {d.target_version_id, d.previous_version_id})
    return await console.render(
        page, "deployments/confirm.html", active="deployments", title="Confirm deployment change", d=d,
        action=action, verb=ACTIONS[action], reason=reason, approval_id=approval, prod=prod, env=env,
        template=templates.get(d.template_id), **_helpers(versions))


async def apply(request: Request) -> Response:
    """Step two, after the confirmation: activate or roll back."""
    console = console_of(request)
    page = await console.page(request)
    form = await page.form()
    action, reason, approval = _form_values(form)
    deployment_id = request.path_params["deployment_id"]
    back = f"/deployments?deployment={deployment_id}"
    if form.get("confirmed") != "yes":
        raise Refused("The change was not confirmed.", 400)
    try:
        if action == "activate":
            resp = await page.client.deployments.ActivateDeployment(dpb.ActivateDeploymentRequest(
                request_id=new_request_id(), deployment_id=deployment_id, approval_id=approval,
                etag=str(form.get("etag", "")), reason=reason or "from the console"))
            text = "Deployment activated." + (" The one it replaces is retired." if resp.HasField("retired_deployment")
                                              and resp.retired_deployment.deployment_id else "")
            target = resp.deployment.deployment_id
        else:
            rb = await page.client.deployments.RollbackDeployment(dpb.RollbackDeploymentRequest(
                request_id=new_request_id(), deployment_id=deployment_id, etag=str(form.get("etag", "")),
                reason=reason or "from the console"))
            text = (f"Rolled back: the previous version is active again; {rb.rebound_instance_count} "
                    f"instance{'' if rb.rebound_instance_count == 1 else 's'} rebound.")
            target = rb.deployment.deployment_id
    except grpc.aio.AioRpcError as exc:
        if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED,
                              grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED):
            raise
        return redirect(back, ("error", rpc_message(exc)), secure=console.secure(request))
    return redirect(f"/deployments?deployment={target}", ("ok", text), secure=console.secure(request))


VIEW = View(slug="deployments", title="Deployments", routes=[
    Route("/deployments", index),
    Route("/deployments/{deployment_id}/confirm", confirm, methods=["POST"]),
    Route("/deployments/{deployment_id}/apply", apply, methods=["POST"]),
])
