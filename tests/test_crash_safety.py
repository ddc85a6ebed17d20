"""Kill -9 of the registry in the middle of a stream of mutations: after restart every
acknowledged mutation exists with exactly one change record, no record exists without its
mutation, and retrying the unacknowledged requests (same request_id) duplicates nothing."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import grpc
from sqlalchemy import text

from arm.common.v1 import common_pb2
from arm.registry.v1 import tenancy_pb2
from arm_client import ArmClient
from arm_common.db import Database
from tests.conftest import drop_schema, new_database_spec
from tests.processes import free_port, spawn, stop, wait_serving
from tests.test_devserver import registry_env


async def test_kill_9_during_mutations_loses_and_duplicates_nothing(backend: str, tmp_path: Path) -> None:
    spec = new_database_spec(backend, tmp_path, "registry")
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = registry_env(spec, port)
    log = tmp_path / "registry.log"
    assert spawn("arm_registry", "migrate", env=env, log=log).wait(60) == 0
    assert spawn("arm_registry", "bootstrap", env=env, log=log).wait(60) == 0
    key = log.read_text().split("(shown once): ")[1].split()[0]
    proc = spawn("arm_registry", env=env, log=log)
    await wait_serving(address, proc, log)

    acked: dict[str, str] = {}  # request_id -> project id
    sent: list[str] = []

    async def writer(n: int) -> None:
        async with ArmClient(address, key) as client:
            for i in range(10_000):
                rid = f"w{n}-{i}"
                sent.append(rid)
                try:
                    resp = await client.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
                        request_id=rid, slug=f"p-{n}-{i}", name="crash test"), timeout=5)
                except grpc.aio.AioRpcError:
                    return
                acked[rid] = resp.project.id

    writers = [asyncio.create_task(writer(n)) for n in range(4)]
    deadline = time.monotonic() + 60
    while len(acked) < 40:
        assert time.monotonic() < deadline and not all(w.done() for w in writers), log.read_text()[-3000:]
        await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    await asyncio.gather(*writers)

    proc = spawn("arm_registry", env=env, log=log)
    try:
        await wait_serving(address, proc, log)
        async with ArmClient(address, key) as client:
            # Retry everything sent (acknowledged or not) with the same request ids.
            for rid in sent:
                n, i = rid[1:].split("-")
                resp = await client.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
                    request_id=rid, slug=f"p-{n}-{i}", name="crash test"))
                if rid in acked:
                    assert resp.project.id == acked[rid], "a retry must return the first response"
            projects = []
            token = ""
            while True:
                page = await client.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest(
                    page_size=500, page_token=token))
                projects += page.projects
                token = page.next_page_token
                if not token:
                    break
        project_ids = {p.id for p in projects}
        assert len(projects) == len(sent) == len(project_ids)
        assert set(acked.values()) <= project_ids

        db = Database(spec.url, schema=spec.schema)
        try:
            async with db.transaction() as s:
                payloads = (await s.execute(text(
                    "select payload from outbox_messages where topic = 'change_record'"))).scalars().all()
        finally:
            await db.dispose()
        created = Counter(
            r.target_id for r in map(common_pb2.ChangeRecord.FromString, payloads)
            if r.type == common_pb2.CHANGE_RECORD_TYPE_PROJECT_CREATED)
        assert set(created) == project_ids, "every project has a record and every record a project"
        assert set(created.values()) == {1}, "no project has two records"
    finally:
        stop(proc)
        if spec.schema:
            await drop_schema(spec.schema)
