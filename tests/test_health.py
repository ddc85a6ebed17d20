"""Health that means something (issue 14 item 5): each service reports NOT_SERVING on the gRPC
health service ("" and its own service names) while its database, or the registry it needs, is
unreachable, and SERVING again once it is back, without a restart; `liveness` stays SERVING
throughout. The database is a private PostgreSQL of the test (tests/private_postgres.py)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from grpc_health.v1 import health_pb2

from arm.governance.v1 import policy_pb2
from arm.registry.v1 import tenancy_pb2
from arm.telemetry.v1 import telemetry_pb2
from arm_common.health import LIVENESS
from tests import private_postgres
from tests.conftest import (
    DatabaseSpec,
    new_database_spec,
    start_governance,
    start_registry,
    stop_governance,
    stop_registry,
)
from tests.processes import ROOT, health_status
from tests.telemetry.conftest import start_telemetry, stop_telemetry
from tests.test_database_outage import expect_unavailable, needs_private_postgres

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FAST = {"ARM_HEALTH_PROBE_S": "0.1"}


async def wait_status(address: str, service: str, want: int) -> None:
    """Waits (bounded) until `address` reports `want` for `service`; asserts it did."""
    seen = None
    for _ in range(600):
        seen = await health_status(address, service)
        if seen == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{address} {service or '(server)'}: {seen}, wanted {want}")


async def healthcheck_script(*args: str) -> int:
    """Exit status of deploy/grpc_healthcheck.py (run without blocking the servers' loop)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, str(ROOT / "deploy" / "grpc_healthcheck.py"), *args,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    return await asyncio.wait_for(proc.wait(), 60)


async def statuses(address: str, names: list[str]) -> dict[str, int | None]:
    return {name: await health_status(address, name) for name in names}


@needs_private_postgres
async def test_not_serving_while_the_database_is_down_and_serving_after(tmp_path: Path) -> None:
    pg = private_postgres.PrivatePostgres()
    pg.init()
    registry = governance = telemetry = None
    try:
        registry = await start_registry(DatabaseSpec("postgres", pg.url, "arm_registry"), FAST)
        governance = await start_governance(DatabaseSpec("postgres", pg.url, "arm_governance"), registry, FAST)
        telemetry = await start_telemetry(DatabaseSpec("postgres", pg.url, "arm_telemetry"), registry,
                                          governance, FAST)
        hosts = {"registry": registry.host, "governance": governance.host, "telemetry": telemetry.host}
        addresses = {"registry": registry.address, "governance": governance.address,
                     "telemetry": telemetry.address}
        names = {service: ["", LIVENESS, *host.service_names] for service, host in hosts.items()}
        for service, address in addresses.items():
            assert set((await statuses(address, names[service])).values()) == {SERVING}, service

        admin = registry.client(registry.admin_key)
        gov = governance.client(registry.admin_key)
        tel = telemetry.client(registry.admin_key)

        pg.stop()
        # No call is needed: the periodic probe finds the database gone.
        for service, address in addresses.items():
            await wait_status(address, "", NOT_SERVING)
            now = await statuses(address, names[service])
            assert now.pop(LIVENESS) == SERVING, service
            assert set(now.values()) == {NOT_SERVING}, (service, now)
        # Meanwhile clients get UNAVAILABLE (with a retry delay), not a crash.
        await expect_unavailable(admin.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest()))
        await expect_unavailable(gov.policies.ListPolicyEnvelopes(policy_pb2.ListPolicyEnvelopesRequest()))
        await expect_unavailable(tel.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest()))
        for service, address in addresses.items():
            assert await health_status(address, "") == NOT_SERVING, service

        pg.start()  # same port and data; nothing restarted, no call made
        for service, address in addresses.items():
            await wait_status(address, "", SERVING)
            assert set((await statuses(address, names[service])).values()) == {SERVING}, service
        await admin.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest())
        await gov.policies.ListPolicyEnvelopes(policy_pb2.ListPolicyEnvelopesRequest())
        await tel.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest())
        # The readiness watchers lived through it.
        for host in hosts.values():
            assert host.readiness is not None and host.readiness._tasks
            assert not any(task.done() for task in host.readiness._tasks)
        for client in (admin, gov, tel):
            await client.close()
    finally:
        if telemetry is not None:
            await stop_telemetry(telemetry, drop=False)
        if governance is not None:
            await stop_governance(governance, drop=False)
        if registry is not None:
            await stop_registry(registry, drop=False)
        pg.destroy()


@needs_private_postgres
async def test_a_failed_call_turns_health_not_serving_before_the_next_probe() -> None:
    """With a probe interval far longer than the test, the first call that meets the dead
    database is what turns health NOT_SERVING."""
    pg = private_postgres.PrivatePostgres()
    pg.init()
    registry = None
    try:
        registry = await start_registry(DatabaseSpec("postgres", pg.url, "arm_registry"),
                                        {"ARM_HEALTH_PROBE_S": "3600"})
        admin = registry.client(registry.admin_key)
        pg.stop()
        assert await health_status(registry.address, "") == SERVING  # nothing has noticed yet
        await expect_unavailable(admin.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest()))
        await wait_status(registry.address, "", NOT_SERVING)
        assert await health_status(registry.address, LIVENESS) == SERVING
        # The container check: readiness fails, liveness passes.
        assert (await healthcheck_script(registry.address), await healthcheck_script(registry.address, LIVENESS)) == (1, 0)
        pg.start()
        await admin.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest())  # ends the outage
        await wait_status(registry.address, "", SERVING)
        await admin.close()
    finally:
        if registry is not None:
            await stop_registry(registry, drop=False)
        pg.destroy()


@needs_private_postgres
async def test_governance_and_telemetry_not_serving_while_the_registry_is_unreachable(tmp_path: Path) -> None:
    """Only the registry's database goes down: governance and telemetry, on databases that stay
    up, report NOT_SERVING because the registry they need does, and SERVING after."""
    pg = private_postgres.PrivatePostgres()
    pg.init()
    registry = governance = telemetry = None
    try:
        registry = await start_registry(DatabaseSpec("postgres", pg.url, "arm_registry"), FAST)
        governance = await start_governance(new_database_spec("sqlite", tmp_path, "governance"), registry, FAST)
        telemetry = await start_telemetry(new_database_spec("sqlite", tmp_path, "telemetry"), registry,
                                          governance, FAST)
        for server in (governance, telemetry):
            assert await health_status(server.address, "") == SERVING

        pg.stop()
        for address in (registry.address, governance.address, telemetry.address):
            await wait_status(address, "", NOT_SERVING)
            assert await health_status(address, LIVENESS) == SERVING
        # Their own databases never went down: the registry is why.
        assert not governance.db.outage.down and not telemetry.db.outage.down

        pg.start()
        for address in (registry.address, governance.address, telemetry.address):
            await wait_status(address, "", SERVING)
    finally:
        if telemetry is not None:
            await stop_telemetry(telemetry, drop=False)
        if governance is not None:
            await stop_governance(governance, drop=False)
        if registry is not None:
            await stop_registry(registry, drop=False)
        pg.destroy()
