"""The console's security, against the real console and services: no access without a session;
another tenant's ids are not-found pages; forged, altered, foreign and expired cookies are
refused, and so is a signed-out one; cross-site form posts are refused (in a real browser too);
the key is never in a page, a cookie in clear, a URL or a log line."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import re
import secrets
import time
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet

from arm.governance.v1 import policy_pb2
from arm.registry.v1 import access_pb2, agents_pb2
from arm_console.server import ConsoleServer
from arm_console.sessions import SESSION_COOKIE, SessionCodec, _derive
from tests.conftest import RegistryServer, TenantContext, make_tenant
from tests.console.conftest import ConsoleStack, Ui, new_ui
from tests.helpers import approved_version, operator_key


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


async def signed_in(console: ConsoleStack, key: str) -> httpx.AsyncClient:
    """An HTTP client with a session, signed in through the sign-in form like a browser."""
    client = httpx.AsyncClient(base_url=console.url, headers={"Origin": console.url})
    form = await client.get("/signin")
    resp = await client.post("/signin", data={"api_key": key, "csrf_token": csrf_of(form.text)})
    assert resp.status_code == 303 and resp.headers["location"] == "/directory", resp.text
    assert client.cookies.get(SESSION_COOKIE)
    return client


async def control_mode(console: ConsoleStack, key: str, project_id: str = "") -> int:
    scope = policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT if project_id else policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT
    async with console.governance.client(key) as gov:
        return (await gov.policies.GetOperatorControl(policy_pb2.GetOperatorControlRequest(
            scope=scope, scope_id=project_id))).control.mode


def session_cookie_header(resp: httpx.Response) -> str:
    return next(v for k, v in resp.headers.multi_items() if k == "set-cookie" and v.startswith(SESSION_COOKIE))


async def test_no_access_without_a_session(console: ConsoleStack, tenant: TenantContext) -> None:
    async with httpx.AsyncClient(base_url=console.url) as anon:
        for path in ("/directory/templates", "/approvals", "/controls", "/policies", "/directory/instances"):
            resp = await anon.get(path)
            assert resp.status_code == 303 and resp.headers["location"].startswith("/signin?next="), path
        assert (await anon.get("/approvals/events", headers={"Accept": "text/event-stream"})).status_code == 401
        resp = await anon.post("/controls/apply", data={"scope": "tenant", "mode": "PAUSED", "reason": "x",
                                                        "confirmed": "yes"})
        assert resp.status_code == 303 and resp.headers["location"].startswith("/signin")
        assert await control_mode(console, tenant.admin_key) == policy_pb2.OPERATOR_CONTROL_MODE_NORMAL
        assert (await anon.get("/")).headers["location"] == "/signin"


async def test_sign_in_cookie_flags_and_refused_keys(console: ConsoleStack, tenant: TenantContext) -> None:
    async with httpx.AsyncClient(base_url=console.url) as anon:
        form = await anon.get("/signin")
        token = csrf_of(form.text)
        bad = await anon.post("/signin", data={"api_key": "arm_key_nope_nope", "csrf_token": token})
        assert bad.status_code == 401 and "not accepted" in bad.text and "arm_key_nope_nope" not in bad.text
        # The sign-in form itself is CSRF-protected: a token of another browser is refused.
        async with httpx.AsyncClient(base_url=console.url) as other:
            resp = await other.post("/signin", data={"api_key": tenant.admin_key, "csrf_token": token})
            assert resp.status_code == 403 and SESSION_COOKIE not in resp.cookies
        good = await anon.post("/signin", data={"api_key": tenant.admin_key, "csrf_token": token})
        assert good.status_code == 303
        header = session_cookie_header(good).lower()
        assert "httponly" in header and "samesite=strict" in header and "max-age=28800" in header
        assert "secure" not in header  # plain HTTP on loopback; Secure under TLS (test below)


async def test_an_agent_key_does_not_sign_in(console: ConsoleStack, tenant: TenantContext) -> None:
    agents = await approved_version(tenant.admin)
    inst = (await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="a"))).agent_instance
    key = (await tenant.admin.access.CreateApiKey(access_pb2.CreateApiKeyRequest(instance_id=inst.id))).secret
    async with httpx.AsyncClient(base_url=console.url) as anon:
        token = csrf_of((await anon.get("/signin")).text)
        resp = await anon.post("/signin", data={"api_key": key, "csrf_token": token})
        assert resp.status_code == 403 and "agent" in resp.text and SESSION_COOKIE not in resp.cookies


async def test_another_tenants_ids_are_not_found(console: ConsoleStack, tenant: TenantContext,
                                                 registry: RegistryServer, system_admin: Any) -> None:
    theirs = await approved_version(tenant.admin)
    inst = (await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=theirs.version.id, environment_id=theirs.environment.id, name="theirs"))).agent_instance
    gov = console.governance.client(tenant.admin_key)
    try:
        from arm.governance.v1 import approvals_pb2
        approval = (await gov.approvals.RequestApproval(approvals_pb2.RequestApprovalRequest(
            action_type=approvals_pb2.APPROVAL_ACTION_TYPE_INSTANCE_QUARANTINE, instance_id=inst.id,
            risk=1))).approval
    finally:
        await gov.close()
    other = await make_tenant(registry, system_admin)
    client = await signed_in(console, other.admin_key)
    try:
        for path in (f"/directory/templates/{theirs.template.id}",
                     f"/directory/templates/{theirs.template.id}?version={theirs.version.id}",
                     f"/directory/instances?instance={inst.id}",
                     f"/approvals/{approval.approval_id}",
                     f"/approvals?approval={approval.approval_id}"):
            resp = await client.get(path)
            assert resp.status_code == 404, path
            assert "Not found" in resp.text and theirs.template.slug not in resp.text
        # A post naming their version changes nothing there.
        page = await client.get("/directory/templates")
        resp = await client.post(f"/directory/versions/{theirs.version.id}/transition",
                                 data={"to_state": "DEPRECATED", "csrf_token": csrf_of(page.text)})
        assert resp.status_code == 404 and "Not found" in resp.text
        after = (await tenant.admin.agents.GetAgentVersion(agents_pb2.GetAgentVersionRequest(id=theirs.version.id))
                 ).agent_version
        assert after.state == agents_pb2.VERSION_STATE_APPROVED
        # Their project's kill switch cannot be set either.
        page = await client.get("/controls")
        resp = await client.post("/controls/apply", data={"scope": "project", "scope_id": theirs.project.id,
                                                          "mode": "PAUSED", "reason": "x", "confirmed": "yes",
                                                          "csrf_token": csrf_of(page.text)})
        assert resp.status_code == 404
        assert await control_mode(console, tenant.admin_key, theirs.project.id) == \
            policy_pb2.OPERATOR_CONTROL_MODE_NORMAL
    finally:
        await client.aclose()
        await other.admin.close()


def _cookie_for(console: ConsoleStack, issued_at: float, **fields: Any) -> str:
    """A session cookie made with the console's own secret, as if issued at `issued_at`."""
    fernet = Fernet(base64.urlsafe_b64encode(_derive(console.server.config.session_secret, b"session")))
    data = {"sid": secrets.token_urlsafe(8), "issued_at": issued_at, **fields}
    return fernet.encrypt_at_time(json.dumps(data).encode(), int(issued_at)).decode()


async def test_forged_altered_foreign_expired_and_signed_out_cookies_are_refused(
        console: ConsoleStack, tenant: TenantContext) -> None:
    client = await signed_in(console, tenant.admin_key)
    try:
        good = client.cookies[SESSION_COOKIE]
        assert (await client.get("/directory/templates")).status_code == 200
        fields = {"api_key": tenant.admin_key, "tenant_id": tenant.tenant.id,
                  "actor_id": tenant.admin_operator_id, "display_name": "x"}
        foreign = Fernet(Fernet.generate_key()).encrypt(json.dumps(
            {"sid": "s", "issued_at": time.time(), **fields}).encode()).decode()
        altered = good[:40] + ("A" if good[40] != "A" else "B") + good[41:]
        expired = _cookie_for(console, time.time() - console.server.config.session_ttl_s - 60, **fields)
        fresh = _cookie_for(console, time.time(), **fields)
        for name, value in (("forged", "hello"), ("altered", altered), ("foreign", foreign), ("expired", expired)):
            async with httpx.AsyncClient(base_url=console.url, cookies={SESSION_COOKIE: value}) as c:
                resp = await c.get("/directory/templates")
                assert resp.status_code == 303 and resp.headers["location"].startswith("/signin"), name
        async with httpx.AsyncClient(base_url=console.url, cookies={SESSION_COOKIE: fresh}) as c:
            assert (await c.get("/directory/templates")).status_code == 200  # the same making, in time: accepted
        # Signing out ends the session for a copy of the cookie as well.
        page = await client.get("/directory/templates")
        out = await client.post("/signout", data={"csrf_token": csrf_of(page.text)})
        assert out.status_code == 303 and out.headers["location"] == "/signin"
        landed = await client.get("/signin")  # says so, once
        assert "You are signed out." in landed.text
        assert "You are signed out." not in (await client.get("/signin")).text
        async with httpx.AsyncClient(base_url=console.url, cookies={SESSION_COOKIE: good}) as c:
            assert (await c.get("/directory/templates")).status_code == 303
    finally:
        await client.aclose()


async def until_signed_out(client: httpx.AsyncClient, what: str) -> None:
    """Bounded wait: the services refuse a revoked key at once in their own process, and within
    their auth cache's lifetime (a change notice, or ARM_AUTH_CACHE_TTL_S) elsewhere."""
    deadline = time.monotonic() + 30
    while True:
        resp = await client.get("/directory/templates")
        if resp.status_code == 303 and resp.headers["location"].startswith("/signin"):
            return
        assert resp.status_code == 200, resp.text
        assert time.monotonic() < deadline, f"still signed in 30 s after {what}"
        await asyncio.sleep(0.1)


async def test_signing_out_on_one_replica_ends_the_session_on_every_replica(
        console: ConsoleStack, tenant: TenantContext) -> None:
    """The session holds a key made for it (CreateSessionKey), not the operator's: signing out
    revokes that key, so a copy of the cookie stops working on another replica sharing the secret
    too; the operator's own key keeps working; and revoking the operator's key ends its sessions."""
    other = ConsoleServer(dataclasses.replace(console.server.config, listen="127.0.0.1:0"))
    await other.start()
    op_id, key = await operator_key(tenant.admin, "admin")
    client = await signed_in(console, key)
    try:
        cookie = client.cookies[SESSION_COOKIE]
        config = console.server.config
        session = SessionCodec(config.session_secret, config.session_ttl_s).read(cookie.strip("\""))
        assert session is not None and session.api_key != key and session.actor_id == op_id
        async with httpx.AsyncClient(base_url=other.url, cookies={SESSION_COOKIE: cookie}) as copy:
            assert (await copy.get("/directory/templates")).status_code == 200
            page = await client.get("/directory/templates")
            assert (await client.post("/signout", data={"csrf_token": csrf_of(page.text)})).status_code == 303
            await until_signed_out(copy, "signing out on the other replica")
        async with console.registry.client(key) as own:  # the operator's key is untouched
            assert (await own.access.Authenticate(access_pb2.AuthenticateRequest())).principal.actor.id == op_id
        # Revoking the operator's key ends the sessions made with it.
        second = await signed_in(ConsoleStack(console.registry, console.governance, console.telemetry, other), key)
        try:
            assert (await second.get("/directory/templates")).status_code == 200
            keys = (await tenant.admin.access.ListApiKeys(access_pb2.ListApiKeysRequest(operator_id=op_id))).api_keys
            parent = next(k.id for k in keys if not k.parent_key_id)
            await tenant.admin.access.RevokeApiKey(access_pb2.RevokeApiKeyRequest(id=parent))
            await until_signed_out(second, "revoking the operator's key")
        finally:
            await second.aclose()
    finally:
        await client.aclose()
        await other.stop()


async def test_cross_site_and_tokenless_posts_are_refused(console: ConsoleStack, tenant: TenantContext) -> None:
    client = await signed_in(console, tenant.admin_key)
    try:
        token = csrf_of((await client.get("/controls")).text)
        form = {"scope": "tenant", "mode": "PAUSED", "reason": "attack", "confirmed": "yes"}
        cases = [({"Origin": "http://evil.example"}, {**form, "csrf_token": token}),
                 ({"Sec-Fetch-Site": "cross-site"}, {**form, "csrf_token": token}),
                 ({}, form),
                 ({}, {**form, "csrf_token": "forged"})]
        for headers, data in cases:
            resp = await client.post("/controls/apply", data=data, headers=headers)
            assert resp.status_code == 403, (headers, resp.text)
        assert await control_mode(console, tenant.admin_key) == policy_pb2.OPERATOR_CONTROL_MODE_NORMAL
        # Another session's token is no good either.
        other = await signed_in(console, tenant.admin_key)
        try:
            resp = await other.post("/controls/apply", data={**form, "csrf_token": token})
            assert resp.status_code == 403
        finally:
            await other.aclose()
    finally:
        await client.aclose()


async def test_a_cross_site_form_in_a_real_browser_is_refused(browser: Any, console: ConsoleStack,
                                                              tenant: TenantContext) -> None:
    ui = await new_ui(browser, console)
    try:
        await ui.sign_in(tenant.admin_key)
        evil = ("<form id=f method=post action='" + console.url + "/controls/apply'>"
                "<input name=scope value=tenant><input name=mode value=PAUSED><input name=reason value=pwned>"
                "<input name=confirmed value=yes></form><script>document.getElementById('f').submit()</script>")
        await ui.page.route("http://evil.test/", lambda route: route.fulfill(status=200, content_type="text/html",
                                                                            body=evil))
        await ui.page.goto("http://evil.test/")
        await ui.page.wait_for_url(console.url + "/controls/apply")
        assert "Cross-site request refused" in await ui.page.content()
        assert await control_mode(console, tenant.admin_key) == policy_pb2.OPERATOR_CONTROL_MODE_NORMAL
    finally:
        await ui.context.close()


async def test_the_key_is_never_in_a_page_a_cookie_a_url_or_a_log(ui: Ui, console: ConsoleStack,
                                                                  tenant: TenantContext,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key = tenant.admin_key
    secret_part = key.rsplit("_", 1)[-1]
    agents = await approved_version(tenant.admin)
    bodies: list[str] = []
    urls: list[str] = []

    async def keep(response: Any) -> None:
        urls.append(response.url)
        if "text/html" in (response.headers.get("content-type") or ""):
            try:
                bodies.append(await response.text())
            except Exception:  # a redirect has no body to read
                pass

    ui.page.on("response", keep)
    await ui.sign_in(key)
    for path in ("/directory/templates", f"/directory/templates/{agents.template.id}?version={agents.version.id}",
                 "/directory/instances", "/directory/identities", "/approvals", "/approvals/history", "/controls",
                 "/policies", "/deployments", "/audit", "/telemetry", "/nowhere"):
        await ui.goto(path)
        bodies.append(await ui.page.content())
    ui.allow_errors("404")  # /nowhere is a not-found page
    ui.allow_errors("501")  # the views not built yet answer 501 Not Implemented
    assert len(bodies) > 12
    for body in bodies:
        assert key not in body and secret_part not in body
    assert not any(secret_part in u for u in urls)
    cookies = await ui.context.cookies()
    session = next(c for c in cookies if c["name"] == SESSION_COOKIE)
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    raw = base64.urlsafe_b64decode(session["value"] + "=" * (-len(session["value"]) % 4))
    assert secret_part.encode() not in raw and key.encode() not in raw
    assert all(secret_part not in c["value"] for c in cookies)
    assert not any(secret_part in r.getMessage() for r in caplog.records)


async def test_the_cookie_is_secure_under_tls(console: ConsoleStack, tenant: TenantContext, tmp_path: Any) -> None:
    import ssl

    import trustme

    from arm_console.server import ConsoleServer
    from tests.console.conftest import console_config
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    server = ConsoleServer(console_config(console.registry, console.governance, console.telemetry,
                                          ARM_CONSOLE_TLS_CERT_FILE=str(cert_file),
                                          ARM_CONSOLE_TLS_KEY_FILE=str(key_file)))
    await server.start()
    try:
        assert server.url.startswith("https://")
        context = ssl.create_default_context()
        ca.configure_trust(context)
        async with httpx.AsyncClient(base_url=server.url, verify=context) as client:
            token = csrf_of((await client.get("/signin")).text)
            resp = await client.post("/signin", data={"api_key": tenant.admin_key, "csrf_token": token},
                                     headers={"Origin": server.url})
            assert resp.status_code == 303
            assert "secure" in session_cookie_header(resp).lower().split("; ")
    finally:
        await server.stop()
