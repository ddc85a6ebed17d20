"""Directory: templates → versions (genome, hash, integrity, lifecycle with the allowed next steps
as buttons) → instances (state, environment, legacy id, last heartbeat, transitions); identities."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from arm.registry.v1 import agents_pb2, tenancy_pb2
from arm_client.connection import new_request_id
from arm_console.view import View
from arm_console.web import Console, Page, Refused, enum_name, redirect, url_with

# The lifecycles as the registry enforces them (arm_registry.domain; the console may not import a
# service): the buttons offered are these, and the registry still refuses anything else.
VERSION_PATH = ["DRAFT", "TESTING", "CANDIDATE", "APPROVED", "DEPRECATED", "RETIRED"]
VERSION_NEXT: dict[str, list[str]] = {
    "DRAFT": ["TESTING"], "TESTING": ["CANDIDATE", "DRAFT"], "CANDIDATE": ["APPROVED", "DRAFT"],
    "APPROVED": ["DEPRECATED"], "DEPRECATED": ["RETIRED"], "RETIRED": [],
}
VERSION_VERB = {"TESTING": "Start testing", "CANDIDATE": "Make candidate", "DRAFT": "Back to draft",
                "APPROVED": "Approve", "DEPRECATED": "Deprecate", "RETIRED": "Retire"}
INSTANCE_NEXT: dict[str, list[str]] = {
    "PROVISIONING": ["ACTIVE", "RETIRED"], "ACTIVE": ["PAUSED", "READONLY", "DRAINING", "QUARANTINED", "RETIRED"],
    "PAUSED": ["ACTIVE", "RETIRED"], "READONLY": ["ACTIVE", "RETIRED"],
    "QUARANTINED": ["ACTIVE", "READONLY", "RETIRED"], "DRAINING": ["RETIRED", "ACTIVE"], "RETIRED": [],
}
INSTANCE_VERB = {"ACTIVE": "Activate", "PAUSED": "Pause", "READONLY": "Make read-only", "DRAINING": "Drain",
                 "QUARANTINED": "Quarantine", "RETIRED": "Retire"}
DESTRUCTIVE = {"RETIRED", "QUARANTINED", "DEPRECATED"}
VERSION_STATES = VERSION_PATH
INSTANCE_STATES = ["PROVISIONING", "ACTIVE", "PAUSED", "READONLY", "DRAINING", "QUARANTINED", "RETIRED"]
PAGE_SIZE = 25


def _console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def vstate(value: int) -> str:
    return enum_name(value, agents_pb2.VersionState)


def istate(value: int) -> str:
    return enum_name(value, agents_pb2.InstanceState)


async def _environments(page: Page) -> dict[str, tenancy_pb2.Environment]:
    resp = await page.client.tenancy.ListEnvironments(tenancy_pb2.ListEnvironmentsRequest(page_size=500))
    return {e.id: e for e in resp.environments}


async def _template_names(page: Page) -> dict[str, str]:
    resp = await page.client.agents.ListAgentTemplates(agents_pb2.ListAgentTemplatesRequest(page_size=500))
    return {t.id: t.name or t.slug for t in resp.agent_templates}


def _helpers() -> dict[str, Any]:
    return {"vstate": vstate, "istate": istate, "VERSION_PATH": VERSION_PATH, "VERSION_NEXT": VERSION_NEXT,
            "VERSION_VERB": VERSION_VERB, "INSTANCE_NEXT": INSTANCE_NEXT, "INSTANCE_VERB": INSTANCE_VERB,
            "DESTRUCTIVE": DESTRUCTIVE, "env_type": lambda t: enum_name(t, tenancy_pb2.EnvironmentType),
            "integrity": lambda i: enum_name(i, agents_pb2.Integrity),
            "eval_status": lambda s: enum_name(s, agents_pb2.EvalStatus),
            "validation": lambda s: enum_name(s, agents_pb2.IdentityValidationStatus)}


async def index(request: Request) -> Response:
    return RedirectResponse("/directory/templates", status_code=303)


async def templates(request: Request) -> Response:
    console = _console(request)
    page = await console.page(request)
    project = request.query_params.get("project", "")
    resp = await page.client.agents.ListAgentTemplates(agents_pb2.ListAgentTemplatesRequest(
        project_id=project, page_size=PAGE_SIZE, page_token=request.query_params.get("page", "")))
    return await console.render(page, "directory/templates.html", active="directory", title="Directory",
                                tab="templates", items=resp.agent_templates, next_token=resp.next_page_token,
                                projects=await page.project_names(), project=project, **_helpers())


async def template_detail(request: Request) -> Response:
    console = _console(request)
    page = await console.page(request)
    template_id = request.path_params["template_id"]
    template = (await page.client.agents.GetAgentTemplate(agents_pb2.GetAgentTemplateRequest(id=template_id))
                ).agent_template
    state = request.query_params.get("state", "")
    if state and state not in VERSION_STATES:
        raise Refused(f"Unknown version state {state!r}.", 400)
    versions = await page.client.agents.ListAgentVersions(agents_pb2.ListAgentVersionsRequest(
        template_id=template.id, state=agents_pb2.VersionState.Value(f"VERSION_STATE_{state}") if state else 0,
        page_size=PAGE_SIZE, page_token=request.query_params.get("page", "")))
    instances = await page.client.agents.ListAgentInstances(agents_pb2.ListAgentInstancesRequest(
        template_id=template.id, page_size=10))
    selected = None
    selected_instances: list[agents_pb2.AgentInstance] = []
    version_id = request.query_params.get("version", "")
    if version_id:
        selected = (await page.client.agents.GetAgentVersion(agents_pb2.GetAgentVersionRequest(id=version_id))
                    ).agent_version
        if selected.template_id != template.id:
            raise Refused("That version belongs to another template.", 404)
        selected_instances = list((await page.client.agents.ListAgentInstances(agents_pb2.ListAgentInstancesRequest(
            version_id=selected.id, page_size=20))).agent_instances)
    return await console.render(
        page, "directory/template.html", active="directory", title=template.name or template.slug, tab="templates",
        template=template, versions=versions.agent_versions, next_token=versions.next_page_token, state=state,
        instances=instances.agent_instances, more_instances=bool(instances.next_page_token),
        selected=selected, selected_instances=selected_instances, environments=await _environments(page),
        projects=await page.project_names(), close_url=url_with(request, version=None), **_helpers())


async def transition_version(request: Request) -> Response:
    console = _console(request)
    page = await console.page(request)
    form = await page.form()
    version_id = request.path_params["version_id"]
    to_state = str(form.get("to_state", ""))
    if to_state not in VERSION_STATES:
        raise Refused("Choose a state to move the version to.", 400)
    version = (await page.client.agents.TransitionAgentVersion(agents_pb2.TransitionAgentVersionRequest(
        id=version_id, to_state=agents_pb2.VersionState.Value(f"VERSION_STATE_{to_state}"),
        reason=str(form.get("reason", "")).strip() or "from the console", etag=str(form.get("etag", "")),
        request_id=new_request_id()))).agent_version
    return redirect(f"/directory/templates/{version.template_id}?version={version.id}",
                    ("ok", f"Version {version.number} is now {vstate(version.state)}."), secure=console.secure(request))


async def instances(request: Request) -> Response:
    console = _console(request)
    page = await console.page(request)
    q = request.query_params
    state = q.get("state", "")
    if state and state not in INSTANCE_STATES:
        raise Refused(f"Unknown instance state {state!r}.", 400)
    resp = await page.client.agents.ListAgentInstances(agents_pb2.ListAgentInstancesRequest(
        template_id=q.get("template", ""), environment_id=q.get("environment", ""), project_id=q.get("project", ""),
        state=agents_pb2.InstanceState.Value(f"INSTANCE_STATE_{state}") if state else 0,
        agent_ref=q.get("ref", "").strip(), page_size=PAGE_SIZE, page_token=q.get("page", "")))
    selected = None
    if q.get("instance"):
        selected = (await page.client.agents.GetAgentInstance(agents_pb2.GetAgentInstanceRequest(id=q["instance"]))
                    ).agent_instance
    return await console.render(
        page, "directory/instances.html", active="directory", title="Directory", tab="instances",
        items=resp.agent_instances, next_token=resp.next_page_token, selected=selected,
        environments=await _environments(page), projects=await page.project_names(),
        template_names=await _template_names(page), filters=dict(q), states=INSTANCE_STATES,
        close_url=url_with(request, instance=None), **_helpers())


async def transition_instance(request: Request) -> Response:
    console = _console(request)
    page = await console.page(request)
    form = await page.form()
    to_state = str(form.get("to_state", ""))
    if to_state not in INSTANCE_STATES:
        raise Refused("Choose a state to move the instance to.", 400)
    instance = (await page.client.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
        id=request.path_params["instance_id"], to_state=agents_pb2.InstanceState.Value(f"INSTANCE_STATE_{to_state}"),
        reason=str(form.get("reason", "")).strip() or "from the console",
        approval_id=str(form.get("approval_id", "")).strip(), etag=str(form.get("etag", "")),
        request_id=new_request_id()))).agent_instance
    return redirect(f"/directory/instances?instance={instance.id}",
                    ("ok", f"Instance {instance.name or instance.id} is now {istate(instance.state)}."),
                    secure=console.secure(request))


async def identities(request: Request) -> Response:
    console = _console(request)
    page = await console.page(request)
    q = request.query_params
    resp = await page.client.agents.ListAgentIdentities(agents_pb2.ListAgentIdentitiesRequest(
        template_id=q.get("template", ""), page_size=PAGE_SIZE, page_token=q.get("page", "")))
    selected = None
    if q.get("identity"):
        selected = (await page.client.agents.GetAgentIdentity(agents_pb2.GetAgentIdentityRequest(id=q["identity"]))
                    ).agent_identity
    return await console.render(
        page, "directory/identities.html", active="directory", title="Directory", tab="identities",
        items=resp.agent_identities, next_token=resp.next_page_token, selected=selected,
        template_names=await _template_names(page), template=q.get("template", ""),
        close_url=url_with(request, identity=None), **_helpers())


VIEW = View(slug="directory", title="Directory", routes=[
    Route("/directory", index),
    Route("/directory/templates", templates),
    Route("/directory/templates/{template_id}", template_detail),
    Route("/directory/versions/{version_id}/transition", transition_version, methods=["POST"]),
    Route("/directory/instances", instances),
    Route("/directory/instances/{instance_id}/transition", transition_instance, methods=["POST"]),
    Route("/directory/identities", identities),
])
