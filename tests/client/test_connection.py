"""The SDK's connection (issue 11 item 1): configuration from arguments and the environment,
round_robin across the replicas behind one target, failover when one goes away, deadlines."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from arm_client import Arm, Settings
from arm_client.connection import service_config, target
from tests.client.conftest import make_agent
from tests.client.test_governed import pending_approval
from tests.conftest import RegistryServer, TenantContext, new_database_spec, start_governance, stop_governance
from tests.telemetry.conftest import TelemetryServer


def test_settings_from_the_environment_and_arguments() -> None:
    s = Settings.from_env({"ARM_ADDRESS": "arm.internal:443", "ARM_API_KEY": "k1", "ARM_INSTANCE_ID": "inst_1",
                           "ARM_TELEMETRY_ADDRESS": "telemetry.internal:50053", "ARM_TIMEOUT_S": "2.5"})
    assert (s.registry_address, s.governance_address, s.telemetry_address) == (
        "arm.internal:443", "arm.internal:443", "telemetry.internal:50053")
    assert (s.api_key, s.instance_id, s.timeout_s) == ("k1", "inst_1", 2.5)
    given = Settings.from_env({"ARM_ADDRESS": "a:1", "ARM_API_KEY": "env-key"}, governance_address="g:2",
                              api_key="arg-key")
    assert (given.registry_address, given.governance_address, given.api_key) == ("a:1", "g:2", "arg-key")
    assert Settings.from_env({}).governance_address == "127.0.0.1:50051"
    with pytest.raises(ValueError, match="ARM_TIMEOUT_S"):
        Settings.from_env({"ARM_TIMEOUT_S": "soon"})
    with pytest.raises(ValueError, match="ARM_TIMEOUT_S"):
        Settings.from_env({"ARM_TIMEOUT_S": "0"})


def test_targets_and_service_config() -> None:
    assert target("arm.internal:50051") == "dns:///arm.internal:50051"
    assert target("ipv4:10.0.0.1:1,10.0.0.2:1") == "ipv4:10.0.0.1:1,10.0.0.2:1"
    assert target("dns:///x:1") == "dns:///x:1"
    config = json.loads(service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    [method] = config["methodConfig"]
    assert {"service": "arm.governance.v1.DecisionService", "method": "Check"} in method["name"]
    assert {"service": "arm.telemetry.v1.TelemetryService", "method": "IngestEvents"} in method["name"]
    assert not any(n["method"].startswith(("Decide", "Create")) for n in method["name"])  # not idempotent
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


async def test_no_agent_configured_is_a_clear_error() -> None:
    arm = Arm(env={})
    with pytest.raises(ValueError, match="ARM_INSTANCE_ID"):
        await arm.check("search")
    await arm.close()


async def test_round_robin_across_replicas_and_failover(registry: RegistryServer, tenant: TenantContext,
                                                        telemetry: TelemetryServer, tmp_path: Path) -> None:
    """Two governance replicas on one database behind one target: watches spread over both;
    with one stopped, every Check still succeeds."""
    spec = new_database_spec(registry.backend, tmp_path, "governance")
    first = await start_governance(spec, registry)
    second = await start_governance(spec, registry)
    agent = await make_agent(tenant, first, telemetry)
    both = f"ipv4:{first.address},{second.address}"
    arm = Arm(env={**agent.env(), "ARM_GOVERNANCE_ADDRESS": both}, timeout_s=10)
    try:
        decision = await arm.check("payments.send", {"amount": 1}, risk="HIGH")
        assert decision.needs_approval
        await pending_approval(agent, "payments.send")
        subscribers = [first.component.changes._subscribers, second.component.changes._subscribers]  # type: ignore[attr-defined]
        # Watches opened one at a time (each waits until a replica follows it): round_robin
        # spreads them as soon as both connections are up; pick_first would put all 20 on one.
        base = [len(s) for s in subscribers]  # the replicas' own followers, if any

        def added() -> list[int]:
            return [len(s) - b for s, b in zip(subscribers, base, strict=True)]

        watches = []
        for n in range(1, 21):
            watches.append(asyncio.create_task(arm.wait_for_approval(decision.approval_id, 60)))
            while sum(added()) < n:
                await asyncio.sleep(0.01)
            if min(added()) >= 1:
                break
        assert min(added()) >= 1, added()
        for w in watches:
            w.cancel()
        await stop_governance(second, drop=False)
        for _ in range(10):
            assert (await arm.check("search.web", {"q": "x"}, risk="LOW")).allowed
    finally:
        await arm.close()
        for client in [agent.admin, *agent.approvers]:
            await client.close()
        await stop_governance(first)
        await stop_governance(second, drop=False)
