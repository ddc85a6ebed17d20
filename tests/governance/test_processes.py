"""Governance as real processes: replicas on one PostgreSQL enforce each other's changes, and
kill -9 under load loses no answered decision."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text

from arm.governance.v1 import decision_pb2, policy_pb2
from arm.registry.v1 import agents_pb2
from arm_client import ArmClient
from arm_common.db import Database
from tests.conftest import DatabaseSpec, RegistryServer, drop_schema, new_database_spec
from tests.helpers import approved_version
from tests.processes import base_env, free_port, spawn, stop, wait_serving


def governance_env(spec: DatabaseSpec, port: int, registry: RegistryServer) -> dict[str, str]:
    return base_env(ARM_GOVERNANCE_LISTEN=f"127.0.0.1:{port}", ARM_REGISTRY_ADDRESS=registry.address,
                    ARM_SERVICE_API_KEY=registry.admin_key, **spec.env("governance"))


async def active_instance(client: ArmClient) -> str:
    agents = await approved_version(client)
    inst = (await client.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="p"))).agent_instance
    await client.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
        id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))
    return inst.id


async def decision_becomes(client: ArmClient, instance_id: str, tool: str, want: int,
                           limit_s: float = 10) -> int:
    """Checks until the decision is `want` or the limit passes; returns the last decision."""
    deadline = time.monotonic() + limit_s
    while True:
        got = (await client.decisions.Check(decision_pb2.CheckRequest(instance_id=instance_id,
                                                                      tool_name=tool))).decision
        if got == want or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.05)


async def test_replicas_enforce_each_others_changes(registry, tenant, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if registry.backend != "postgres":
        pytest.skip("replicas share one PostgreSQL; SQLite serves one process")
    spec = new_database_spec("postgres", tmp_path, "governance")
    log = tmp_path / "gov.log"
    ports = [free_port(), free_port()]
    assert spawn("arm_governance", "migrate", env=governance_env(spec, ports[0], registry), log=log).wait(60) == 0
    procs = [spawn("arm_governance", env=governance_env(spec, p, registry), log=log) for p in ports]
    clients: list[ArmClient] = []
    try:
        for port, proc in zip(ports, procs, strict=True):
            await wait_serving(f"127.0.0.1:{port}", proc, log)
        clients = [ArmClient(f"127.0.0.1:{p}", tenant.admin_key) for p in ports]
        a, b = clients
        instance = await active_instance(tenant.admin)
        for c in clients:  # both replicas now hold the tenant's policies and the agent in memory
            assert await decision_becomes(c, instance, "fs.read", policy_pb2.DECISION_ALLOW, 0) == policy_pb2.DECISION_ALLOW
        await a.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(envelope=policy_pb2.PolicyEnvelope(
            name="deny fs", scope=policy_pb2.POLICY_SCOPE_TENANT, mode=policy_pb2.POLICY_MODE_ENFORCE,
            tool_rules=[policy_pb2.ToolRule(tool="fs.**", effect=policy_pb2.DECISION_DENY)])))
        assert await decision_becomes(b, instance, "fs.read", policy_pb2.DECISION_DENY) == policy_pb2.DECISION_DENY
        # A kill switch set through B is enforced by A.
        assert await decision_becomes(a, instance, "web.search", policy_pb2.DECISION_ALLOW, 0) == policy_pb2.DECISION_ALLOW
        await b.policies.SetOperatorControl(policy_pb2.SetOperatorControlRequest(
            scope=policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT, mode=policy_pb2.OPERATOR_CONTROL_MODE_PAUSED))
        assert await decision_becomes(a, instance, "web.search", policy_pb2.DECISION_DENY) == policy_pb2.DECISION_DENY
        await b.policies.SetOperatorControl(policy_pb2.SetOperatorControlRequest(
            scope=policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT, mode=policy_pb2.OPERATOR_CONTROL_MODE_NORMAL))
        for c in clients:
            assert await decision_becomes(c, instance, "web.search", policy_pb2.DECISION_ALLOW) == policy_pb2.DECISION_ALLOW
        # An instance paused in the registry is denied by both (the registry's change feed).
        await tenant.admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
            id=instance, to_state=agents_pb2.INSTANCE_STATE_PAUSED))
        for c in clients:
            assert await decision_becomes(c, instance, "web.search", policy_pb2.DECISION_DENY) == policy_pb2.DECISION_DENY
    finally:
        for c in clients:
            await c.close()
        for proc in procs:
            stop(proc)
        await drop_schema(spec.schema or "")


async def test_kill_9_under_load_loses_no_answered_decision(registry, tenant, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = new_database_spec(registry.backend, tmp_path, "governance")
    port = free_port()
    env = governance_env(spec, port, registry)
    log = tmp_path / "gov.log"
    assert spawn("arm_governance", "migrate", env=env, log=log).wait(60) == 0
    proc = spawn("arm_governance", env=env, log=log)
    await wait_serving(f"127.0.0.1:{port}", proc, log)
    instance = await active_instance(tenant.admin)
    answered: list[str] = []

    async def load(n: int) -> None:
        async with ArmClient(f"127.0.0.1:{port}", tenant.admin_key) as client:
            for i in range(100_000):
                tool = ("fs.read", "payments.send", "db.drop")[i % 3]
                try:
                    resp = await client.decisions.Check(decision_pb2.CheckRequest(
                        instance_id=instance, tool_name=tool, tool_call_id=f"w{n}-{i}",
                        declared_risk=4 if tool == "db.drop" else 0), timeout=5)
                except grpc.aio.AioRpcError:
                    return
                answered.append(resp.decision_id)

    workers = [asyncio.create_task(load(n)) for n in range(16)]
    deadline = time.monotonic() + 60
    while len(answered) < 300:
        assert time.monotonic() < deadline and not all(w.done() for w in workers), (
            f"only {len(answered)} decisions answered:\n{log.read_text()[-3000:]}")
        await asyncio.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    await asyncio.gather(*workers)
    proc = spawn("arm_governance", env=env, log=log)
    try:
        await wait_serving(f"127.0.0.1:{port}", proc, log)
        db = Database(spec.url, schema=spec.schema)
        try:
            async with db.transaction() as s:
                logged = set((await s.execute(text("select id from decisions"))).scalars())
                answered_set = set(answered)
                approvals = (await s.execute(text(
                    "select count(*) from approvals where decision_id in "
                    "(select id from decisions where decision = 3)"))).scalar_one()
                needs_approval = (await s.execute(text(
                    "select count(*) from decisions where decision = 3"))).scalar_one()
        finally:
            await db.dispose()
        assert answered_set <= logged, f"{len(answered_set - logged)} answered decisions are not in the log"
        assert approvals == needs_approval, "every logged NEEDS_APPROVAL has its approval"
    finally:
        stop(proc)
        if spec.schema:
            await drop_schema(spec.schema)
