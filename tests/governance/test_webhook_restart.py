"""Webhook notifications across a governance crash: governance as a real process, killed with
SIGKILL while notifications are still undelivered (the receiver refusing them, one just
committed), then restarted. The receiver ends with every notification accepted exactly once,
each with a valid signature; the one accepted before the crash is not sent again."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

import grpc

from arm.common.v1 import common_pb2
from arm.governance.v1 import approvals_pb2 as apb
from arm.governance.v1 import webhooks_pb2 as wpb
from arm_client import ArmClient
from tests.conftest import RegistryServer, TenantContext, drop_schema, new_database_spec
from tests.governance.test_processes import active_instance, governance_env
from tests.processes import free_port, spawn, stop, wait_serving
from tests.webhook_receiver import Received, Receiver, assert_signed


async def test_pending_notifications_are_delivered_once_after_kill_9(
        registry: RegistryServer, tenant: TenantContext, tmp_path: Path) -> None:
    spec = new_database_spec(registry.backend, tmp_path, "governance")
    port = free_port()
    env = governance_env(spec, port, registry)
    env.update(ARM_DATA_DIR=str(tmp_path), ARM_WEBHOOK_MAX_BACKOFF_S="0.3", ARM_WEBHOOK_ALLOWED_NETWORKS="127.0.0.1/32", ARM_WEBHOOK_TIMEOUT_S="2",
               ARM_OUTBOX_POLL_S="0.1", ARM_CONSOLE_URL="http://console.test:8080")
    log = tmp_path / "gov.log"
    assert spawn("arm_governance", "migrate", env=env, log=log).wait(60) == 0
    proc = spawn("arm_governance", env=env, log=log)
    refusing = False
    receiver = Receiver(answer=lambda r: 503 if refusing else 200)
    url = receiver.start()
    client = ArmClient(f"127.0.0.1:{port}", tenant.admin_key)
    try:
        await wait_serving(f"127.0.0.1:{port}", proc, log)
        made = await client.webhooks.CreateWebhook(wpb.CreateWebhookRequest(webhook=wpb.Webhook(
            url=url, event_types=[wpb.WEBHOOK_EVENT_TYPE_APPROVAL_REQUESTED, wpb.WEBHOOK_EVENT_TYPE_APPROVAL_CANCELLED])))
        instance = await active_instance(tenant.admin)

        async def request() -> str:
            return (await client.approvals.RequestApproval(apb.RequestApprovalRequest(
                action_type=apb.APPROVAL_ACTION_TYPE_INSTANCE_REACTIVATION, instance_id=instance,
                risk=common_pb2.RISK_LEVEL_LOW, justification="restart test"))).approval.approval_id

        def approvals_of(got: list[Received], accepted: bool = True) -> Counter[tuple[str, str]]:
            return Counter((r.json["approval"]["approval_id"], r.json["type"]) for r in got
                           if not accepted or r.status == 200)

        first = await request()
        await receiver.wait_for(lambda got: approvals_of(got) == Counter({(first, "approval.requested"): 1}))
        # Now the receiver refuses: the next notifications stay undelivered, retried.
        refusing = True
        second = await request()
        await client.approvals.CancelApproval(apb.CancelApprovalRequest(approval_id=second, reason="changed my mind"))
        await receiver.wait_for(lambda got: (second, "approval.requested") in approvals_of(got, accepted=False))
        third = await request()  # committed; maybe not even fanned out when the process dies
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        refusing = False
        proc = spawn("arm_governance", env=env, log=log)
        await wait_serving(f"127.0.0.1:{port}", proc, log)
        await client.close()  # a fresh channel, not one backing off from the dead process
        client = ArmClient(f"127.0.0.1:{port}", tenant.admin_key)
        want = Counter({(first, "approval.requested"): 1, (second, "approval.requested"): 1,
                        (second, "approval.cancelled"): 1, (third, "approval.requested"): 1})
        await receiver.wait_for(lambda got: set(approvals_of(got)) == set(want), limit_s=60)
        # Wait until governance has marked everything delivered: then nothing more can come.
        # (A channel to the restarted port may still be in its reconnect backoff from the killed
        # process and answer UNAVAILABLE at once: that is retried, within the same bound.)
        left = [None]
        for _ in range(600):
            try:
                left = (await client.webhooks.ListWebhookDeliveries(wpb.ListWebhookDeliveriesRequest(
                    webhook_id=made.webhook.webhook_id, pending_only=True))).deliveries
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            else:
                if not left:
                    break
            await asyncio.sleep(0.05)
        assert not left
        got = receiver.snapshot()
        assert approvals_of(got) == want, "a notification was accepted twice, or never"
        accepted = [r for r in got if r.status == 200]
        assert len({r.delivery_id for r in accepted}) == len(accepted) == 4
        for r in got:
            assert_signed(r, made.secret)  # the stored secret still decrypts after the restart
        # The second approval's two notifications arrived in order.
        order = [r.json["type"] for r in accepted if r.json["approval"]["approval_id"] == second]
        assert order == ["approval.requested", "approval.cancelled"]
    finally:
        await client.close()
        receiver.stop()
        stop(proc)
        if spec.schema:
            await drop_schema(spec.schema)
