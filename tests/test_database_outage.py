"""A database outage (issue 10 item 3): with PostgreSQL down, registry RPCs, governance reads,
`Check` and telemetry answer UNAVAILABLE with a RetryInfo delay (never INTERNAL, never ALLOW), each
service logs the outage once (not a traceback per call), background work survives, and once the
database is back the same calls succeed without restarting anything.

The database is a private PostgreSQL instance of this test (tests/private_postgres.py); the shared
one is never stopped."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from arm.common.v1 import common_pb2
from arm.governance.v1 import audit_pb2, decision_pb2, policy_pb2
from arm.registry.v1 import agents_pb2, tenancy_pb2
from arm.telemetry.v1 import telemetry_pb2
from tests import private_postgres
from tests.conftest import (
    DatabaseSpec,
    make_tenant,
    new_database_spec,
    start_governance,
    start_registry,
    stop_governance,
    stop_registry,
)
from tests.helpers import approved_version
from tests.processes import base_env, free_port, spawn
from tests.telemetry.conftest import event, start_telemetry, stop_telemetry

needs_private_postgres = pytest.mark.skipif(not private_postgres.available(),
                                reason="needs PostgreSQL 15 binaries (initdb, pg_ctl) for a private instance")

OUTAGE_WARNING = "is unavailable ("
RECOVERED_INFO = "is available again"


def unavailable_with_retry(exc: grpc.aio.AioRpcError) -> tuple[str, float]:
    """The ErrorInfo reason and RetryInfo delay of an UNAVAILABLE failure (asserts both exist)."""
    assert exc.code() == grpc.StatusCode.UNAVAILABLE, f"{exc.code()}: {exc.details()}"
    reason, delay = "", None
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason = info.reason
                elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    retry = error_details_pb2.RetryInfo()
                    detail.Unpack(retry)
                    delay = retry.retry_delay.ToNanoseconds() / 1e9
    assert delay is not None and delay > 0, f"no RetryInfo on {exc.details()}"
    assert reason, f"no ErrorInfo on {exc.details()}"
    return reason, delay


async def expect_unavailable(call: Awaitable[Any]) -> str:
    try:
        result = await call
    except grpc.aio.AioRpcError as exc:
        return unavailable_with_retry(exc)[0]
    raise AssertionError(f"the call succeeded during the outage: {result}")


@needs_private_postgres
async def test_outage_answers_unavailable_logs_once_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    pg = private_postgres.PrivatePostgres()
    pg.init()
    registry = governance = telemetry = None
    try:
        fast = {"ARM_OUTBOX_POLL_S": "0.05"}
        registry = await start_registry(DatabaseSpec("postgres", pg.url, "arm_registry"), fast)
        governance = await start_governance(DatabaseSpec("postgres", pg.url, "arm_governance"), registry, fast)
        await registry.component.deliver_change_records_to(governance.address, registry.admin_key)
        telemetry = await start_telemetry(DatabaseSpec("postgres", pg.url, "arm_telemetry"), registry, governance)

        admin = registry.client(registry.admin_key)
        tenant = await make_tenant(registry, admin)
        agents = await approved_version(tenant.admin)
        inst = (await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
            version_id=agents.version.id, environment_id=agents.environment.id, name="w"))).agent_instance
        await tenant.admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
            id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))
        gov = governance.client(tenant.admin_key)
        tel = telemetry.client(tenant.admin_key)
        check = decision_pb2.CheckRequest(instance_id=inst.id, tool_name="fs.read")
        assert (await gov.decisions.Check(check)).decision == policy_pb2.DECISION_ALLOW

        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "registry GetProject": lambda: tenant.admin.tenancy.GetProject(
                tenancy_pb2.GetProjectRequest(id=agents.project.id)),
            "registry ListProjects": lambda: tenant.admin.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest()),
            "registry CreateProject": lambda: tenant.admin.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
                slug=f"p-{secrets.token_hex(4)}", name="during")),
            "governance ListPolicyEnvelopes": lambda: gov.policies.ListPolicyEnvelopes(
                policy_pb2.ListPolicyEnvelopesRequest()),
            "governance Check": lambda: gov.decisions.Check(check),
            "telemetry IngestEvents": lambda: tel.telemetry.IngestEvents(
                telemetry_pb2.IngestEventsRequest(events=[event(instance_id=inst.id)])),
            "telemetry QueryEvents": lambda: tel.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest()),
        }
        for call in calls.values():
            await call()  # all answer while the database is up

        caplog.clear()
        caplog.set_level(logging.INFO)
        pg.stop()
        reasons: dict[str, set[str]] = {}
        for _ in range(5):  # several rounds: the log must not grow with the calls
            for name, call in calls.items():
                reasons.setdefault(name, set()).add(await expect_unavailable(call()))
        # The services' own databases are DATABASE_UNAVAILABLE; governance and telemetry may
        # instead hear it from the registry they authenticate callers through.
        assert reasons["registry GetProject"] == {"DATABASE_UNAVAILABLE"}
        assert reasons["registry CreateProject"] == {"DATABASE_UNAVAILABLE"}
        for name, seen in reasons.items():
            assert seen <= {"DATABASE_UNAVAILABLE", "REGISTRY_UNAVAILABLE"}, (name, seen)

        outage = [r for r in caplog.records if r.levelno >= logging.WARNING]
        per_database = [r.getMessage() for r in outage if OUTAGE_WARNING in r.getMessage()]
        for schema in ("arm_registry", "arm_governance", "arm_telemetry"):
            assert sum(f"(schema {schema})" in m for m in per_database) == 1, per_database
        assert len(per_database) == 3, per_database
        assert not [r for r in outage if r.exc_info or r.levelno >= logging.ERROR], \
            [r.getMessage() for r in outage if r.exc_info or r.levelno >= logging.ERROR]

        # Background work lived through it.
        for component_tasks in (
                [r._task for r in governance.component.relays if r.deliver is not None] + [governance.component.log._task,
                                                                  governance.component.housekeeping._task],
                [registry.component.relay._task, registry.component.housekeeping._task],
                [telemetry.component.writer._task, telemetry.component.relay._task]):
            for task in component_tasks:
                assert task is not None and not task.done(), task

        caplog.clear()
        pg.start()  # same port, same data; no service restarts
        for call in calls.values():
            await call()
        assert (await gov.decisions.Check(check)).decision == policy_pb2.DECISION_ALLOW
        recovered = [r.getMessage() for r in caplog.records if RECOVERED_INFO in r.getMessage()]
        for schema in ("arm_registry", "arm_governance", "arm_telemetry"):
            assert sum(f"(schema {schema})" in m for m in recovered) == 1, recovered

        # The outbox relays resume: a project created now reaches governance's audit trail.
        project = (await tenant.admin.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
            slug=f"p-{secrets.token_hex(4)}", name="after"))).project
        audit = governance.client(registry.admin_key)
        found: list[common_pb2.ChangeRecord] = []
        for _ in range(600):
            found = list((await audit.audit.ListChangeRecords(audit_pb2.ListChangeRecordsRequest(
                filter=audit_pb2.ChangeRecordFilter(target_id=project.id)),
                metadata=(("x-arm-act-for-tenant", tenant.tenant.id),))).records)
            if found:
                break
            await asyncio.sleep(0.05)
        assert found, "the registry's change record never reached governance after the outage"
        # Governance follows change notices again (its LISTEN connection came back).
        for _ in range(600):
            if governance.component.changes.live:
                break
            await asyncio.sleep(0.05)
        assert governance.component.changes.live

        # A restart no call noticed: the pooled connections are all dead, and the first calls
        # after it are answered anyway (the dead connections are dropped and the call retried).
        pg.stop()
        pg.start()
        for name, call in sorted(calls.items(), key=lambda item: item[0] != "governance Check"):
            try:
                await call()
            except grpc.aio.AioRpcError as exc:
                raise AssertionError(f"{name} after a quick restart: {exc.code()} {exc.details()}") from None
        for client in (admin, tenant.admin, gov, tel, audit):
            await client.close()
    finally:
        if telemetry is not None:
            await stop_telemetry(telemetry, drop=False)
        if governance is not None:
            await stop_governance(governance, drop=False)
        if registry is not None:
            await stop_registry(registry, drop=False)
        pg.destroy()


@pytest.fixture
def shared_registry_spec(tmp_path: Path) -> DatabaseSpec:
    """A registry schema on the shared PostgreSQL (skipped when it is unreachable)."""
    return new_database_spec("postgres", tmp_path, "registry")


@needs_private_postgres
async def test_check_fails_closed_when_its_decision_cannot_be_logged(shared_registry_spec: DatabaseSpec) -> None:
    """Only governance's database goes down; the registry (on the shared PostgreSQL) stays up and
    the caller's key and the agent's resolution are cached. Check still never answers without a
    durable decision record: UNAVAILABLE with RetryInfo, never ALLOW; and ALLOW again once the
    database is back."""
    pg = private_postgres.PrivatePostgres()
    pg.init()
    registry = governance = None
    try:
        registry = await start_registry(shared_registry_spec)
        governance = await start_governance(DatabaseSpec("postgres", pg.url, "arm_governance"), registry,
                                            {"ARM_AUTH_CACHE_TTL_S": "600", "ARM_OUTBOX_POLL_S": "600",
                                             "ARM_APPROVAL_SWEEP_S": "600"})
        admin = registry.client(registry.admin_key)
        tenant = await make_tenant(registry, admin)
        agents = await approved_version(tenant.admin)
        inst = (await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
            version_id=agents.version.id, environment_id=agents.environment.id, name="w"))).agent_instance
        await tenant.admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
            id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))
        gov = governance.client(tenant.admin_key)
        check = decision_pb2.CheckRequest(instance_id=inst.id, tool_name="fs.read")
        for _ in range(2):  # the second decision is made from the caches
            assert (await gov.decisions.Check(check)).decision == policy_pb2.DECISION_ALLOW

        pg.stop()
        for _ in range(3):
            assert await expect_unavailable(gov.decisions.Check(check)) == "DATABASE_UNAVAILABLE"
        assert await expect_unavailable(gov.policies.ListPolicyEnvelopes(
            policy_pb2.ListPolicyEnvelopesRequest())) == "DATABASE_UNAVAILABLE"
        # The registry, on its own database, is not affected.
        await tenant.admin.tenancy.GetProject(tenancy_pb2.GetProjectRequest(id=agents.project.id))

        pg.start()
        assert (await gov.decisions.Check(check)).decision == policy_pb2.DECISION_ALLOW
        # A restart between two Checks, with nothing else using the database meanwhile: the
        # decision log meets only dead pooled connections, takes fresh ones, and answers.
        pg.stop()
        pg.start()
        answers = await asyncio.gather(*(gov.decisions.Check(check) for _ in range(5)))
        assert {a.decision for a in answers} == {policy_pb2.DECISION_ALLOW}
        for client in (admin, tenant.admin, gov):
            await client.close()
    finally:
        if governance is not None:
            await stop_governance(governance, drop=False)
        if registry is not None:
            await stop_registry(registry)
        pg.destroy()


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_service_started_without_its_database_exits_with_a_message(tmp_path: Path, command: str) -> None:
    log = tmp_path / "registry.log"
    proc = spawn("arm_registry", command, env=base_env(
        ARM_REGISTRY_LISTEN=f"127.0.0.1:{free_port()}",
        ARM_REGISTRY_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/arm"), log=log)
    assert proc.wait(60) == 2, log.read_text()
    text = log.read_text()
    assert "arm_registry: cannot reach the database (ConnectionRefusedError" in text, text
    assert "ARM_REGISTRY_DATABASE_URL" in text and "Traceback" not in text, text
