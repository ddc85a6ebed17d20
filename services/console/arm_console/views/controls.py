"""Kill switches: the tenant's and each project's operator control (NORMAL, PAUSED, DRAINING,
QUARANTINED), changed behind a confirmation page. The banner on every page (web.py) shows the
ones that are not NORMAL."""

from __future__ import annotations

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from arm.governance.v1 import policy_pb2
from arm.registry.v1 import tenancy_pb2
from arm_client.connection import new_request_id
from arm_console.view import View
from arm_console.web import Console, Page, Refused, enum_name, redirect

MODES = {
    "NORMAL": policy_pb2.OPERATOR_CONTROL_MODE_NORMAL,
    "PAUSED": policy_pb2.OPERATOR_CONTROL_MODE_PAUSED,
    "DRAINING": policy_pb2.OPERATOR_CONTROL_MODE_DRAINING,
    "QUARANTINED": policy_pb2.OPERATOR_CONTROL_MODE_QUARANTINED,
}
MODE_EFFECT = {
    "NORMAL": "checks are decided by policy again",
    "PAUSED": "every Check is denied",
    "DRAINING": "new runs are denied; running work may finish",
    "QUARANTINED": "every Check is denied and the agents are isolated pending review",
}
SCOPES = {"tenant": policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT, "project": policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT}


def _console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


async def controls_page(request: Request) -> Response:
    console = _console(request)
    page = await console.page(request)
    tenant = (await page.client.policies.GetOperatorControl(policy_pb2.GetOperatorControlRequest(
        scope=policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT))).control
    token = request.query_params.get("page", "")
    projects = await page.client.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest(page_size=50, page_token=token))
    set_controls: dict[str, policy_pb2.OperatorControl] = {}
    next_control = ""
    while True:
        resp = await page.client.policies.ListOperatorControls(policy_pb2.ListOperatorControlsRequest(
            page_size=500, page_token=next_control))
        set_controls.update({c.scope_id: c for c in resp.controls if c.scope == policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT})
        next_control = resp.next_page_token
        if not next_control:
            break
    rows = [(p, set_controls.get(p.id)) for p in projects.projects]
    return await console.render(page, "controls/index.html", active="controls", title="Kill switches",
                                tenant=tenant, rows=rows, next_token=projects.next_page_token, modes=list(MODES),
                                mode_name=lambda m: enum_name(m, policy_pb2.OperatorControlMode))


async def _target(page: Page, scope: str, scope_id: str) -> tuple[int, str, str]:
    """(scope enum, scope id, label) of a form's target, checked against the user's tenant."""
    if scope == "tenant":
        return SCOPES["tenant"], "", "the whole tenant"
    if scope == "project" and scope_id:
        project = (await page.client.tenancy.GetProject(tenancy_pb2.GetProjectRequest(id=scope_id))).project
        return SCOPES["project"], project.id, f"project {project.name or project.slug}"
    raise Refused("Choose the tenant or a project.", 400)


def _fields(form: FormData) -> tuple[str, str, str, str]:
    scope, scope_id, mode, reason = (form.get(name) for name in ("scope", "scope_id", "mode", "reason"))
    return tuple(v.strip() if isinstance(v, str) else "" for v in (scope, scope_id, mode, reason))  # type: ignore[return-value]


async def confirm(request: Request) -> Response:
    """Step one: say exactly what will change and ask for confirmation."""
    console = _console(request)
    page = await console.page(request)
    scope, scope_id, mode, reason = _fields(await page.form())
    if mode not in MODES:
        raise Refused("Choose a mode.", 400)
    if not reason:
        return redirect("/controls", ("error", "Give a reason: it is recorded on the control and in the audit trail."),
                        secure=console.secure(request))
    _, scope_id, label = await _target(page, scope, scope_id)
    return await console.render(page, "controls/confirm.html", active="controls", title="Confirm kill switch",
                                scope=scope, scope_id=scope_id, mode=mode, reason=reason, label=label,
                                effect=MODE_EFFECT[mode])


async def apply(request: Request) -> Response:
    """Step two, after the confirmation: set the control."""
    console = _console(request)
    page = await console.page(request)
    form = await page.form()
    scope, scope_id, mode, reason = _fields(form)
    if mode not in MODES or not reason or form.get("confirmed") != "yes":
        raise Refused("The change was not confirmed.", 400)
    scope_enum, scope_id, label = await _target(page, scope, scope_id)
    await page.client.policies.SetOperatorControl(policy_pb2.SetOperatorControlRequest(
        request_id=new_request_id(), scope=scope_enum, scope_id=scope_id, mode=MODES[mode], reason=reason))
    return redirect("/controls", ("ok", f"{label[0].upper()}{label[1:]} is now {mode}."), secure=console.secure(request))


VIEW = View(slug="controls", title="Kill switches", routes=[
    Route("/controls", controls_page, methods=["GET"]),
    Route("/controls/confirm", confirm, methods=["POST"]),
    Route("/controls/apply", apply, methods=["POST"]),
])
