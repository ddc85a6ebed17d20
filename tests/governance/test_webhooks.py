"""Notification webhooks (issue 13, item 4) on real servers and databases, with a real HTTP
receiver on port 0: every approval request, escalation and decision arrives once with a valid
signature and a console link; a failing receiver gets retries until it answers 2xx; a slow one
holds up no other tenant; the API validates, checks RBAC and tenancy, and is idempotent."""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.fernet import Fernet
from google.protobuf import struct_pb2
from sqlalchemy import select, update

from arm.common.v1 import common_pb2
from arm.governance.v1 import approvals_pb2 as apb
from arm.governance.v1 import decision_pb2, policy_pb2
from arm.governance.v1 import webhooks_pb2 as wpb
from arm_client import ArmClient
from arm_common.tables import utcnow
from arm_governance import models
from arm_governance.webhooks import service as webhooks
from tests.conftest import (
    GovernanceServer,
    TenantContext,
    make_tenant,
    new_database_spec,
    start_governance,
    stop_governance,
)
from tests.governance.test_approvals import active_instance
from tests.helpers import approved_version, expect_failure, governance_change_records, operator_key
from tests.webhook_receiver import Receiver, assert_signed

E = wpb.WebhookEventType
ALL_EVENTS = [E.WEBHOOK_EVENT_TYPE_APPROVAL_REQUESTED, E.WEBHOOK_EVENT_TYPE_APPROVAL_ESCALATED,
              E.WEBHOOK_EVENT_TYPE_APPROVAL_DECIDED, E.WEBHOOK_EVENT_TYPE_APPROVAL_EXPIRED,
              E.WEBHOOK_EVENT_TYPE_APPROVAL_CANCELLED]
CONSOLE = "https://console.example.test:8443/arm"


@pytest.fixture(scope="module")
async def gov(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GovernanceServer]:
    """A governance of its own: retries back off briefly and notifications link to CONSOLE."""
    folder = tmp_path_factory.mktemp(f"webhooks-{registry.backend}")
    spec = new_database_spec(registry.backend, folder, "governance")
    server = await start_governance(spec, registry, {
        "ARM_CONSOLE_URL": CONSOLE, "ARM_WEBHOOK_MAX_BACKOFF_S": "0.3", "ARM_WEBHOOK_TIMEOUT_S": "30",
        "ARM_OUTBOX_POLL_S": "0.1", "ARM_DATA_DIR": str(folder)})
    yield server
    await stop_governance(server)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


async def create(client: ArmClient, url: str, events: list[int] | None = None, **kw: Any) -> wpb.CreateWebhookResponse:
    return await client.webhooks.CreateWebhook(wpb.CreateWebhookRequest(
        webhook=wpb.Webhook(url=url, event_types=events or ALL_EVENTS, description="tests"), **kw))


class Setup:
    def __init__(self, gov: GovernanceServer, tenant: TenantContext) -> None:
        self.gov = gov
        self.tenant = tenant
        self.admin = gov.client(tenant.admin_key)
        self.clients = [self.admin]

    async def instance(self) -> str:
        return (await active_instance(self.tenant.admin, await approved_version(self.tenant.admin))).id

    async def approver(self) -> ArmClient:
        _, key = await operator_key(self.tenant.admin, "approver")
        client = self.gov.client(key)
        self.clients.append(client)
        return client

    async def request(self, instance: str, **kw: Any) -> apb.Approval:
        return (await self.admin.approvals.RequestApproval(apb.RequestApprovalRequest(
            action_type=apb.APPROVAL_ACTION_TYPE_INSTANCE_REACTIVATION, instance_id=instance,
            risk=common_pb2.RISK_LEVEL_LOW, justification="tests", **kw))).approval

    async def close(self) -> None:
        for c in self.clients:
            await c.close()


async def set_approval(gov: GovernanceServer, approval_id: str, **values: Any) -> None:
    async def write(s: Any) -> None:
        await s.execute(update(models.Approval).where(models.Approval.id == approval_id).values(**values))
    await gov.db.run(write)


async def pending(client: ArmClient, webhook_id: str) -> list[wpb.WebhookDelivery]:
    return list((await client.webhooks.ListWebhookDeliveries(wpb.ListWebhookDeliveriesRequest(
        webhook_id=webhook_id, pending_only=True))).deliveries)


async def test_every_notification_arrives_once_signed_with_a_console_link(
        gov: GovernanceServer, registry: Any, system_admin: ArmClient, receiver: Receiver) -> None:
    url = receiver.start()
    a = Setup(gov, await make_tenant(registry, system_admin))
    b = Setup(gov, await make_tenant(registry, system_admin))  # its receiver must get none of a's
    other = Receiver()
    try:
        made = await create(a.admin, url)
        secret = made.secret
        assert secret.startswith("whsec_") and made.webhook.secret_hint == secret[-4:]
        await create(b.admin, other.start())
        instance = await a.instance()
        # Requested by Check (NEEDS_APPROVAL), then approved: requested + decided.
        args = struct_pb2.Struct()
        args.update({"amount": 120, "to": "acct-7"})
        asked = await a.admin.decisions.Check(decision_pb2.CheckRequest(
            instance_id=instance, tool_name="payments.send", tool_call_id="tc-1", arguments=args))
        assert asked.decision == policy_pb2.DECISION_NEEDS_APPROVAL
        again = await a.admin.decisions.Check(decision_pb2.CheckRequest(  # the same call: no second request
            instance_id=instance, tool_name="payments.send", tool_call_id="tc-1", arguments=args))
        assert again.approval_id == asked.approval_id
        approver = await a.approver()
        await approver.approvals.DecideApproval(apb.DecideApprovalRequest(
            approval_id=asked.approval_id, verdict=apb.APPROVAL_VERDICT_APPROVE, reason="looks fine"))
        # Requested, then cancelled.
        cancelled = await a.request(instance)
        await a.admin.approvals.CancelApproval(apb.CancelApprovalRequest(approval_id=cancelled.approval_id,
                                                                         reason="not needed"))
        # Requested, escalated, then expired by the sweep (time moved in the database).
        swept = await a.request(instance)
        await set_approval(gov, swept.approval_id, escalate_at=utcnow() - timedelta(seconds=1))
        assert await gov.component.approvals.sweep() == (0, 1)
        await set_approval(gov, swept.approval_id, expires_at=utcnow() - timedelta(seconds=1))
        assert await gov.component.approvals.sweep() == (1, 0)
        expected = Counter({(asked.approval_id, "approval.requested"): 1, (asked.approval_id, "approval.decided"): 1,
                            (cancelled.approval_id, "approval.requested"): 1,
                            (cancelled.approval_id, "approval.cancelled"): 1,
                            (swept.approval_id, "approval.requested"): 1, (swept.approval_id, "approval.escalated"): 1,
                            (swept.approval_id, "approval.expired"): 1})

        def seen(got: list[Any]) -> Counter[tuple[str, str]]:
            return Counter((r.json["approval"]["approval_id"], r.json["type"]) for r in got)

        await receiver.wait_for(lambda got: seen(got) == expected)
        # Everything is marked delivered, so nothing more will be sent: each arrived exactly once.
        for _ in range(300):
            if not await pending(a.admin, made.webhook.webhook_id):
                break
            await asyncio.sleep(0.05)
        assert not await pending(a.admin, made.webhook.webhook_id)
        got = receiver.snapshot()
        assert seen(got) == expected and len({r.delivery_id for r in got}) == len(got) == 7
        for r in got:
            assert_signed(r, secret)
            body = r.json
            assert r.path == "/hook" and r.headers["user-agent"].startswith("ARM-Webhooks/")
            assert r.headers["x-arm-webhook-id"] == body["webhook_id"] == made.webhook.webhook_id
            assert body["tenant_id"] == a.tenant.tenant.id and body["id"].startswith("ntf_")
            assert body["console_url"] == f"{CONSOLE}/approvals/{body['approval']['approval_id']}"
            assert body["console_url"] in body["text"]
            assert "arguments" not in body["approval"]  # call arguments never leave ARM this way
        by_type = {r.json["type"]: r.json for r in got if r.json["approval"]["approval_id"] == asked.approval_id}
        assert by_type["approval.requested"]["approval"]["tool_name"] == "payments.send"
        assert by_type["approval.requested"]["approval"]["argument_digest"]
        decided = by_type["approval.decided"]
        # payments.send is HIGH risk: the first of two approvals leaves it PENDING, and says so.
        assert decided["approval"]["status"] == "APPROVAL_STATUS_PENDING" and decided["reason"] == "looks fine"
        assert len(decided["approval"]["decisions"]) == 1 and "(PENDING, 1/2 approvals)" in decided["text"]
        assert decided["actor"]["type"] == "OPERATOR"
        expired = [r.json for r in got if r.json["type"] == "approval.expired"][0]
        assert expired["actor"]["type"] == "SYSTEM" and expired["approval"]["status"] == "APPROVAL_STATUS_EXPIRED"
        assert not other.snapshot(), "another tenant's receiver got this tenant's notifications"
        # A receiver that checks with another secret refuses them.
        assert not webhooks.verify_signature("whsec_" + "x" * 43, got[0].headers["x-arm-signature"], got[0].body)
    finally:
        other.stop()
        await a.close()
        await b.close()


async def test_only_subscribed_events_and_a_failing_receiver_is_retried_until_2xx(
        gov: GovernanceServer, tenant: TenantContext, receiver: Receiver) -> None:
    failures: Counter[str] = Counter()

    def answer(r: Any) -> int:
        if failures[r.delivery_id] < 3:
            failures[r.delivery_id] += 1
            return (500, 503, 302)[failures[r.delivery_id] - 1]  # a redirect is not a delivery either
        return 204

    receiver.answer = answer
    t = Setup(gov, tenant)
    try:
        made = await create(t.admin, receiver.start(), [E.WEBHOOK_EVENT_TYPE_APPROVAL_DECIDED],
                            secret="my-own-secret-of-24-chars!")
        assert made.secret == "my-own-secret-of-24-chars!"
        instance = await t.instance()
        a = await t.request(instance)
        approver = await t.approver()
        await approver.approvals.DecideApproval(apb.DecideApprovalRequest(
            approval_id=a.approval_id, verdict=apb.APPROVAL_VERDICT_DENY, reason="no"))
        got = await receiver.wait_for(lambda got: any(r.status == 204 for r in got))
        assert [r.status for r in got] == [500, 503, 302, 204]
        assert len({r.delivery_id for r in got}) == 1 and len({r.body for r in got}) == 1
        for r in got:
            assert_signed(r, made.secret)
            assert r.json["type"] == "approval.decided"  # the request itself was not subscribed
        # The receiver answered; governance records it right after (wait for that, boundedly).
        for _ in range(600):
            [d] = (await t.admin.webhooks.ListWebhookDeliveries(wpb.ListWebhookDeliveriesRequest(
                webhook_id=made.webhook.webhook_id))).deliveries
            if d.HasField("deliver_time"):
                break
            await asyncio.sleep(0.05)
        assert (d.attempts, d.last_status, d.last_error) == (4, 204, "")
        assert d.HasField("deliver_time") and not d.HasField("next_attempt_time")
        assert d.delivery_id == got[0].delivery_id and d.approval_id == a.approval_id
        # Delivered rows are pruned after a while (here: at once); undelivered ones never are.
        assert await gov.component.webhooks.prune(older_than=timedelta(0)) >= 1
        assert not (await t.admin.webhooks.ListWebhookDeliveries(wpb.ListWebhookDeliveriesRequest(
            webhook_id=made.webhook.webhook_id))).deliveries
    finally:
        await t.close()


async def test_a_slow_receiver_does_not_hold_up_another_tenant(
        gov: GovernanceServer, registry: Any, system_admin: ArmClient, receiver: Receiver) -> None:
    entered, fast_got = threading.Event(), threading.Event()
    released_by_other: list[bool] = []

    def slow(r: Any) -> int:
        entered.set()
        released_by_other.append(fast_got.wait(20))
        return 200

    def fast(r: Any) -> int:
        fast_got.set()
        return 200

    receiver.answer = slow
    other = Receiver(answer=fast)
    a = Setup(gov, await make_tenant(registry, system_admin))
    b = Setup(gov, await make_tenant(registry, system_admin))
    try:
        await create(a.admin, receiver.start(), [E.WEBHOOK_EVENT_TYPE_APPROVAL_REQUESTED])
        await create(b.admin, other.start(), [E.WEBHOOK_EVENT_TYPE_APPROVAL_REQUESTED])
        await a.request(await a.instance())
        await receiver.wait_for(lambda got: entered.is_set() or bool(got))
        await b.request(await b.instance())
        await receiver.wait_for(lambda got: len(got) == 1)
        assert released_by_other == [True], "the other tenant's notification waited for the slow receiver"
        assert len(other.snapshot()) == 1
    finally:
        other.stop()
        await a.close()
        await b.close()


async def test_validation_rbac_tenancy_and_idempotency(
        gov: GovernanceServer, registry: Any, system_admin: ArmClient, tenant: TenantContext) -> None:
    t = Setup(gov, tenant)
    stranger = Setup(gov, await make_tenant(registry, system_admin))
    try:
        bad = await expect_failure(t.admin.webhooks.CreateWebhook(wpb.CreateWebhookRequest(
            webhook=wpb.Webhook(url="ftp://example.com/x", event_types=[0, 99, 1, 1],  # type: ignore[list-item]
                                description="d" * 501), secret="short")),
            grpc.StatusCode.INVALID_ARGUMENT)
        assert {"webhook.url", "webhook.event_types[0]", "webhook.event_types[1]", "webhook.event_types",
                "webhook.description", "secret"} <= bad.violations.keys()
        for url in ("", "https://user:pw@example.com/", "/relative", "http:///nohost",
                    "https://example.com/" + "a" * 2048, "https://exa mple.com/", "https://example.com:99999/"):
            got = await expect_failure(create(t.admin, url), grpc.StatusCode.INVALID_ARGUMENT)
            assert "webhook.url" in got.violations, url
        none = await expect_failure(t.admin.webhooks.CreateWebhook(wpb.CreateWebhookRequest(
            webhook=wpb.Webhook(url="https://example.com/"))), grpc.StatusCode.INVALID_ARGUMENT)
        assert "webhook.event_types" in none.violations
        await expect_failure(t.admin.webhooks.CreateWebhook(wpb.CreateWebhookRequest()),
                             grpc.StatusCode.INVALID_ARGUMENT)
        await expect_failure(t.admin.webhooks.GetWebhook(wpb.GetWebhookRequest()), grpc.StatusCode.INVALID_ARGUMENT)
        await expect_failure(t.admin.webhooks.ListWebhooks(wpb.ListWebhooksRequest(page_size=-1)),
                             grpc.StatusCode.INVALID_ARGUMENT)
        # RBAC: only the tenant admin (operators:admin).
        for role in ("approver", "operator", "auditor"):
            _, key = await operator_key(tenant.admin, role)
            async with gov.client(key) as client:
                await expect_failure(create(client, "https://example.com/"), grpc.StatusCode.PERMISSION_DENIED)
                await expect_failure(client.webhooks.ListWebhooks(wpb.ListWebhooksRequest()),
                                     grpc.StatusCode.PERMISSION_DENIED)
        # Idempotent: a retried create returns the first webhook, without the secret.
        rid = f"req-{secrets.token_hex(4)}"
        first = await create(t.admin, "https://example.com/hook", request_id=rid)
        replay = await create(t.admin, "https://example.com/hook", request_id=rid)
        assert first.secret and replay.secret == "" and replay.webhook == first.webhook
        await expect_failure(create(t.admin, "https://example.com/other", request_id=rid),
                             grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
        hook_id = first.webhook.webhook_id
        listed = (await t.admin.webhooks.ListWebhooks(wpb.ListWebhooksRequest())).webhooks
        assert [w.webhook_id for w in listed] == [hook_id]
        # Another tenant's id is NOT_FOUND, exactly like an unknown one.
        s = stranger.admin.webhooks
        for call in (s.GetWebhook(wpb.GetWebhookRequest(webhook_id=hook_id)),
                     s.DeleteWebhook(wpb.DeleteWebhookRequest(webhook_id=hook_id)),
                     s.RotateWebhookSecret(wpb.RotateWebhookSecretRequest(webhook_id=hook_id)),
                     s.ListWebhookDeliveries(wpb.ListWebhookDeliveriesRequest(webhook_id=hook_id)),
                     t.admin.webhooks.GetWebhook(wpb.GetWebhookRequest(webhook_id="whk_unknown"))):
            await expect_failure(call, grpc.StatusCode.NOT_FOUND, "WEBHOOK_NOT_FOUND")
        assert not (await s.ListWebhooks(wpb.ListWebhooksRequest())).webhooks
        # Rotation: a new secret, once; a stale etag is refused.
        rotated = await t.admin.webhooks.RotateWebhookSecret(wpb.RotateWebhookSecretRequest(
            webhook_id=hook_id, etag="1"))
        assert rotated.secret.startswith("whsec_") and rotated.secret != first.secret
        assert rotated.webhook.etag == "2" and rotated.webhook.secret_hint == rotated.secret[-4:]
        await expect_failure(t.admin.webhooks.RotateWebhookSecret(wpb.RotateWebhookSecretRequest(
            webhook_id=hook_id, etag="1")), grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
        # The secret is stored encrypted and in no change record.
        async def stored(session: Any) -> bytes:
            return bytes((await session.execute(select(models.Webhook.secret).where(
                models.Webhook.id == hook_id))).scalar_one())
        sealed = await gov.db.read(stored)
        assert rotated.secret.encode() not in sealed and gov.component.secret_box.open(sealed) == rotated.secret
        mine = await governance_change_records(gov.db)
        mine = [r for r in mine if r.target_id == hook_id]
        assert not any(first.secret in str(r) or rotated.secret in str(r) for r in mine)
        # Deleted: gone, with a record of each change.
        await t.admin.webhooks.DeleteWebhook(wpb.DeleteWebhookRequest(webhook_id=hook_id))
        await expect_failure(t.admin.webhooks.GetWebhook(wpb.GetWebhookRequest(webhook_id=hook_id)),
                             grpc.StatusCode.NOT_FOUND)
        _, trail = await _records(gov)
        types = [r.type for r in trail if r.target_id == hook_id]
        assert types == [common_pb2.CHANGE_RECORD_TYPE_WEBHOOK_CREATED, common_pb2.CHANGE_RECORD_TYPE_WEBHOOK_UPDATED,
                         common_pb2.CHANGE_RECORD_TYPE_WEBHOOK_DELETED]
        # At most MAX_WEBHOOKS_PER_TENANT per tenant.
        for i in range(webhooks.MAX_WEBHOOKS_PER_TENANT):
            await create(t.admin, f"https://example.com/{i}")
        full = await expect_failure(create(t.admin, "https://example.com/one-more"), grpc.StatusCode.INVALID_ARGUMENT)
        assert "webhook" in full.violations
        page = await t.admin.webhooks.ListWebhooks(wpb.ListWebhooksRequest(page_size=15))
        rest = await t.admin.webhooks.ListWebhooks(wpb.ListWebhooksRequest(page_size=15, page_token=page.next_page_token))
        assert len(page.webhooks) == 15 and len(rest.webhooks) == 5 and not rest.next_page_token
    finally:
        await t.close()
        await stranger.close()


async def _records(gov: GovernanceServer) -> tuple[None, list[common_pb2.ChangeRecord]]:
    return None, await governance_change_records(gov.db)


def test_signature_scheme() -> None:
    body = b'{"id":"ntf_1"}'
    header = webhooks.signature_header("whsec_abc", body, timestamp=1_700_000_000)
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    assert webhooks.verify_signature("whsec_abc", header, body, now=1_700_000_100)
    assert not webhooks.verify_signature("whsec_abc", header, body + b" ", now=1_700_000_100)
    assert not webhooks.verify_signature("whsec_abd", header, body, now=1_700_000_100)
    assert not webhooks.verify_signature("whsec_abc", header, body, now=1_700_000_000 + 301)  # replayed late
    assert not webhooks.verify_signature("whsec_abc", "v1=00", body)


def test_secret_box_key_is_kept_outside_the_database(tmp_path: Path) -> None:
    from arm_common.config import ServiceConfig
    config = ServiceConfig.from_env("governance", {"ARM_DATA_DIR": str(tmp_path)})
    box = webhooks.load_secret_box(config)
    key_file = tmp_path / webhooks.KEY_FILE_NAME
    assert key_file.stat().st_mode & 0o777 == 0o600
    sealed = box.seal("whsec_x")
    assert webhooks.load_secret_box(config).open(sealed) == "whsec_x"  # the same key on restart


async def test_a_secret_that_does_not_decrypt_fails_visibly_until_rotated(
        gov: GovernanceServer, tenant: TenantContext, receiver: Receiver) -> None:
    t = Setup(gov, tenant)
    try:
        made = await create(t.admin, receiver.start(), [E.WEBHOOK_EVENT_TYPE_APPROVAL_REQUESTED])
        hook_id = made.webhook.webhook_id
        foreign = webhooks.SecretBox(Fernet.generate_key()).seal("whsec_sealed_under_another_key_0000")

        async def replace(s: Any) -> None:
            await s.execute(update(models.Webhook).where(models.Webhook.id == hook_id).values(secret=foreign))
        await gov.db.run(replace)
        await t.request(await t.instance())
        for _ in range(600):  # fanned out, then tried: boundedly
            rows = await pending(t.admin, hook_id)
            if rows and rows[0].attempts:
                break
            await asyncio.sleep(0.05)
        [d] = rows
        assert d.attempts >= 1 and "does not decrypt" in d.last_error and d.last_status == 0
        assert not receiver.snapshot(), "sent without a valid signature"
        rotated = await t.admin.webhooks.RotateWebhookSecret(wpb.RotateWebhookSecretRequest(webhook_id=hook_id))
        [got] = await receiver.wait_for(lambda got: len(got) == 1)
        assert_signed(got, rotated.secret)
    finally:
        await t.close()


def test_console_url_setting() -> None:
    from arm_common.config import ConfigError, ServiceConfig
    assert ServiceConfig.from_env("governance", {}).console_url == "http://127.0.0.1:8080"
    assert ServiceConfig.from_env("governance", {"ARM_CONSOLE_URL": "https://arm.example.com/console/"}
                                  ).console_url == "https://arm.example.com/console"
    for bad in ("ftp://arm.example.com", "arm.example.com", "https://arm.example.com/?q=1"):
        with pytest.raises(ConfigError, match="ARM_CONSOLE_URL"):
            ServiceConfig.from_env("governance", {"ARM_CONSOLE_URL": bad})
