"""Kill -9 of governance, then of registry, in the middle of streams of mutations to both: after
restart (and retries of every request with its request_id) every committed mutation has exactly
one change record in the audit trail, no record exists without its mutation, and the chain
verifies."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import grpc

from arm.common.v1 import common_pb2
from arm.governance.v1 import audit_pb2, policy_pb2
from arm.registry.v1 import tenancy_pb2
from arm_client import ArmClient
from tests.conftest import drop_schema, new_database_spec
from tests.processes import base_env, free_port, spawn, stop, wait_serving

CREATED = {common_pb2.CHANGE_RECORD_TYPE_PROJECT_CREATED, common_pb2.CHANGE_RECORD_TYPE_POLICY_CREATED}


def project_request(rid: str) -> tenancy_pb2.CreateProjectRequest:
    return tenancy_pb2.CreateProjectRequest(request_id=rid, slug=f"p-{rid}", name="crash test")


def policy_request(rid: str) -> policy_pb2.CreatePolicyEnvelopeRequest:
    return policy_pb2.CreatePolicyEnvelopeRequest(request_id=rid, envelope=policy_pb2.PolicyEnvelope(
        # Inactive: the test makes hundreds, past the active envelopes a scope may hold.
        name=f"crash-{rid}", scope=policy_pb2.POLICY_SCOPE_TENANT, mode=policy_pb2.POLICY_MODE_SHADOW,
        active=False, default_effect=policy_pb2.DECISION_ALLOW))


async def listed(call, field: str) -> list:  # type: ignore[no-untyped-def, type-arg]
    out, token = [], ""
    while True:
        page = await call(token)
        out += getattr(page, field)
        token = page.next_page_token
        if not token:
            return out


async def test_kill_9_of_either_service_leaves_exactly_one_record_per_mutation(
        backend: str, tmp_path: Path) -> None:
    reg_spec = new_database_spec(backend, tmp_path, "registry")
    gov_spec = new_database_spec(backend, tmp_path, "governance")
    reg_addr, gov_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    log = tmp_path / "services.log"
    reg_env = base_env(ARM_REGISTRY_LISTEN=reg_addr, ARM_GOVERNANCE_ADDRESS=gov_addr,
                       ARM_OUTBOX_POLL_S="0.1", **reg_spec.env("registry"))
    assert spawn("arm_registry", "migrate", env=reg_env, log=log).wait(60) == 0
    assert spawn("arm_registry", "bootstrap", env=reg_env, log=log).wait(60) == 0
    key = log.read_text().split("(shown once): ")[1].split()[0]
    reg_env["ARM_SERVICE_API_KEY"] = key
    gov_env = base_env(ARM_GOVERNANCE_LISTEN=gov_addr, ARM_REGISTRY_ADDRESS=reg_addr, ARM_SERVICE_API_KEY=key,
                       ARM_OUTBOX_POLL_S="0.1", **gov_spec.env("governance"))
    assert spawn("arm_governance", "migrate", env=gov_env, log=log).wait(60) == 0
    procs = {"registry": spawn("arm_registry", env=reg_env, log=log),
             "governance": spawn("arm_governance", env=gov_env, log=log)}
    await wait_serving(reg_addr, procs["registry"], log)
    await wait_serving(gov_addr, procs["governance"], log)

    sent: dict[str, list[str]] = {"registry": [], "governance": []}
    acked: Counter[str] = Counter()

    async def writer(service: str, n: int) -> None:
        async with ArmClient(reg_addr if service == "registry" else gov_addr, key) as client:
            for i in range(10_000):
                rid = f"{service[0]}{n}-{i}"
                sent[service].append(rid)
                try:
                    if service == "registry":
                        await client.tenancy.CreateProject(project_request(rid), timeout=5)
                    else:
                        await client.policies.CreatePolicyEnvelope(policy_request(rid), timeout=5)
                except grpc.aio.AioRpcError:
                    return
                acked[service] += 1

    async def kill_after(service: str, count: int, writers: list[asyncio.Task[None]]) -> None:
        deadline = time.monotonic() + 60
        while acked[service] < count:
            assert time.monotonic() < deadline and not all(w.done() for w in writers), log.read_text()[-3000:]
            await asyncio.sleep(0.02)
        procs[service].send_signal(signal.SIGKILL)
        procs[service].wait(30)

    try:
        writers = [asyncio.create_task(writer(s, n)) for s in ("registry", "governance") for n in range(2)]
        # Governance first (it authenticates callers through the registry, so its writers stop
        # when the registry goes); the registry's relay meanwhile retries against a dead receiver.
        await kill_after("governance", 30, writers[2:])
        await kill_after("registry", acked["registry"] + 20, writers[:2])
        await asyncio.gather(*writers)

        procs = {"registry": spawn("arm_registry", env=reg_env, log=log),
                 "governance": spawn("arm_governance", env=gov_env, log=log)}
        await wait_serving(reg_addr, procs["registry"], log)
        await wait_serving(gov_addr, procs["governance"], log)
        async with ArmClient(reg_addr, key) as reg, ArmClient(gov_addr, key) as gov:
            for rid in sent["registry"]:
                await reg.tenancy.CreateProject(project_request(rid))
            for rid in sent["governance"]:
                await gov.policies.CreatePolicyEnvelope(policy_request(rid))
            projects = {p.id for p in await listed(lambda t: reg.tenancy.ListProjects(
                tenancy_pb2.ListProjectsRequest(page_size=500, page_token=t)), "projects")}
            envelopes = {e.envelope_id for e in await listed(lambda t: gov.policies.ListPolicyEnvelopes(
                policy_pb2.ListPolicyEnvelopesRequest(page_size=500, page_token=t)), "envelopes")}
            assert len(projects) == len(sent["registry"]) and len(envelopes) == len(sent["governance"])

            flt = audit_pb2.ChangeRecordFilter(types=sorted(CREATED))  # type: ignore[arg-type]
            deadline = time.monotonic() + 60
            while True:  # both outboxes drain into the trail
                records = await listed(lambda t: gov.audit.ListChangeRecords(audit_pb2.ListChangeRecordsRequest(
                    page_size=500, page_token=t, filter=flt)), "records")
                if len(records) >= len(projects) + len(envelopes) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            per_target = Counter(r.target_id for r in records)
            assert set(per_target) == projects | envelopes, "every mutation has a record, every record a mutation"
            assert set(per_target.values()) == {1}, "no mutation has two records"
            report = await gov.audit.VerifyChain(audit_pb2.VerifyChainRequest())
            assert report.ok, report.message
    finally:
        for proc in procs.values():
            stop(proc)
        for spec in (reg_spec, gov_spec):
            if spec.schema:
                await drop_schema(spec.schema)
