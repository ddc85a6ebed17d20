"""Webhook deliveries reach public addresses only, unless the operator allows a network
(`ARM_WEBHOOK_ALLOWED_NETWORKS`): a tenant's webhook cannot make governance POST into its own
network. A URL naming a refused address is INVALID_ARGUMENT at creation; a host name is checked
where the connection is made, against every address it resolves to; a stored webhook whose
address the operator no longer allows fails its deliveries with the reason, and sends nothing."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import grpc
import httpx
import pytest

from arm.governance.v1 import webhooks_pb2 as wpb
from arm_common.config import ConfigError, ServiceConfig
from arm_governance.webhooks.egress import LOOPBACK, EgressPolicy
from tests.conftest import make_tenant, new_database_spec, start_governance, stop_governance
from tests.governance.test_webhooks import ALL_EVENTS, Setup, create
from tests.helpers import expect_failure
from tests.webhook_receiver import Receiver

REFUSED = ["127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
           "0.0.0.0", "224.0.0.1", "::1", "::", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1"]
PUBLIC = ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111"]


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_refused_unless_allowed(address: str) -> None:
    ip = ipaddress.ip_address(address)
    refusal = EgressPolicy().refusal(ip)
    assert refusal is not None and "ARM_WEBHOOK_ALLOWED_NETWORKS" in refusal
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
    assert EgressPolicy([ipaddress.ip_network(f"{mapped}/{mapped.max_prefixlen}")]).refusal(ip) is None


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    assert EgressPolicy().refusal(ipaddress.ip_address(address)) is None


def test_allowed_networks_setting() -> None:
    config = ServiceConfig.from_env("governance", {"ARM_WEBHOOK_ALLOWED_NETWORKS": "10.20.0.0/16, fd00::1"})
    assert [str(n) for n in config.webhook_allowed_networks] == ["10.20.0.0/16", "fd00::1/128"]
    assert ServiceConfig.from_env("governance", {}).webhook_allowed_networks == ()
    with pytest.raises(ConfigError, match="ARM_WEBHOOK_ALLOWED_NETWORKS: 'intranet'"):
        ServiceConfig.from_env("governance", {"ARM_WEBHOOK_ALLOWED_NETWORKS": "10.0.0.0/8,intranet"})


async def test_host_names_are_checked_on_every_address_they_resolve_to() -> None:
    """`localhost` resolves to loopback: refused where the connection is made, before any byte is
    sent; with loopback allowed the same request reaches the receiver."""
    receiver = Receiver()
    url = receiver.start().replace("127.0.0.1", "localhost")
    try:
        async with httpx.AsyncClient(transport=EgressPolicy().transport()) as client:
            with pytest.raises(httpx.ConnectError, match="localhost resolves to no allowed address"):
                await client.post(url, content=b"{}")
        assert not receiver.snapshot()
        async with httpx.AsyncClient(transport=EgressPolicy(LOOPBACK).transport()) as client:
            assert (await client.post(url, content=b"{}")).status_code == 200
        assert len(receiver.snapshot()) == 1
    finally:
        receiver.stop()


async def test_governance_refuses_internal_webhooks(registry: Any, system_admin: Any, tmp_path: Any) -> None:
    """On a governance with the default setting: a literal internal URL is INVALID_ARGUMENT with
    the field; a webhook stored while the operator allowed loopback fails its deliveries with the
    reason once loopback is no longer allowed, and the receiver gets nothing."""
    spec = new_database_spec(registry.backend, tmp_path, "governance")
    settings = {"ARM_WEBHOOK_MAX_BACKOFF_S": "0.3", "ARM_OUTBOX_POLL_S": "0.1", "ARM_DATA_DIR": str(tmp_path)}
    receiver = Receiver()
    url = receiver.start()
    gov = await start_governance(spec, registry, settings)  # the test default: loopback allowed
    tenant = await make_tenant(registry, system_admin)
    a = Setup(gov, tenant)
    try:
        hook = (await create(a.admin, url, ALL_EVENTS)).webhook
        await a.close()
        await stop_governance(gov, drop=False)
        gov = await start_governance(spec, registry, {**settings, "ARM_WEBHOOK_ALLOWED_NETWORKS": ""})
        a = Setup(gov, tenant)
        for bad in ("http://127.0.0.1:9/hook", "http://localhost/hook", "https://169.254.169.254/latest/meta-data",
                    "http://[::1]:8080/", "http://10.0.0.7/hook"):
            failure = await expect_failure(create(a.admin, bad), grpc.StatusCode.INVALID_ARGUMENT)
            assert "not a public address" in failure.violations.get("webhook.url", ""), (bad, failure)
        await a.request(await a.instance())  # an approval request: one delivery to the stored hook
        deliveries: list[wpb.WebhookDelivery] = []
        for _ in range(600):
            deliveries = list((await a.admin.webhooks.ListWebhookDeliveries(
                wpb.ListWebhookDeliveriesRequest(webhook_id=hook.webhook_id))).deliveries)
            if deliveries and deliveries[0].attempts >= 2:
                break
            await asyncio.sleep(0.05)
        assert deliveries and deliveries[0].attempts >= 2, deliveries
        assert "not a public address" in deliveries[0].last_error, deliveries[0]
        assert not receiver.snapshot(), "a refused address was sent a delivery"
    finally:
        receiver.stop()
        await a.close()
        await stop_governance(gov)
