"""`make run`'s dev server and the standalone registry, as real processes."""

from __future__ import annotations

import signal
import stat
from pathlib import Path

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from arm.registry.v1 import tenancy_pb2
from arm_client import ArmClient
from tests.conftest import DatabaseSpec, new_database_spec
from tests.processes import base_env, free_port, spawn, stop, wait_serving

REGISTRY_SERVICES = {"arm.registry.v1.TenancyService", "arm.registry.v1.AccessService",
                     "arm.registry.v1.AgentService", "arm.registry.v1.CompatService"}


async def reflected_services(address: str) -> set[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        async def requests():  # type: ignore[no-untyped-def]
            yield reflection_pb2.ServerReflectionRequest(list_services="")
        async for resp in stub.ServerReflectionInfo(requests()):
            return {s.name for s in resp.list_services_response.service}
    return set()


async def test_dev_server_serves_registry_and_prints_admin_key(tmp_path: Path) -> None:
    """What `make run` starts: default address 127.0.0.1:50051, SQLite under the data dir,
    the admin key printed and written 0600; health SERVING; reflection lists the registry."""
    data = tmp_path / "arm-data"
    log = tmp_path / "dev.log"
    proc = spawn("arm_allinone", env=base_env(ARM_DATA_DIR=str(data)), log=log)
    try:
        await wait_serving("127.0.0.1:50051", proc, log)
        assert REGISTRY_SERVICES <= await reflected_services("127.0.0.1:50051")
        key_file = data / "dev-admin-key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert key in log.read_text() and "127.0.0.1:50051" in log.read_text()
        await console_answers(log)
        async with ArmClient("127.0.0.1:50051", key) as client:
            tenants = (await client.tenancy.ListTenants(tenancy_pb2.ListTenantsRequest())).tenants
            assert [t.slug for t in tenants if t.system] == ["default"]
        assert stop(proc) == 0, log.read_text()  # graceful SIGTERM exits cleanly
        # A second start reuses the database and the key: no second system tenant.
        proc = spawn("arm_allinone", env=base_env(ARM_DATA_DIR=str(data)), log=log)
        await wait_serving("127.0.0.1:50051", proc, log)
        assert key_file.read_text().strip() == key
        async with ArmClient("127.0.0.1:50051", key) as client:
            tenants = (await client.tenancy.ListTenants(tenancy_pb2.ListTenantsRequest())).tenants
            assert sum(t.system for t in tenants) == 1
    finally:
        stop(proc, signal.SIGKILL)


async def console_answers(log: Path, timeout_s: float = 30) -> str:
    """The web console's URL as the dev server printed it (tests run it on a free port: see
    base_env), once its sign-in page answers."""
    import asyncio
    import re

    import httpx
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        match = re.search(r"web console: (http://127\.0\.0\.1:\d+)", log.read_text())
        if match:
            async with httpx.AsyncClient(base_url=match.group(1)) as web:
                page = await web.get("/signin")
                assert page.status_code == 200 and "API key" in page.text
            return match.group(1)
        assert loop.time() < deadline, f"no console URL printed:\n{log.read_text()}"
        await asyncio.sleep(0.1)


def test_the_console_listens_on_8080_by_default() -> None:
    from arm_console.config import ConsoleConfig
    assert ConsoleConfig.from_env({"ARM_CONSOLE_SESSION_SECRET": "x" * 40}).listen == "127.0.0.1:8080"


def registry_env(spec: DatabaseSpec, port: int) -> dict[str, str]:
    return base_env(ARM_REGISTRY_LISTEN=f"127.0.0.1:{port}", **spec.env("registry"))


async def test_standalone_registry_refuses_unmigrated_database(backend: str, tmp_path: Path) -> None:
    spec = new_database_spec(backend, tmp_path, "registry")
    port = free_port()
    log = tmp_path / "registry.log"
    proc = spawn("arm_registry", env=registry_env(spec, port), log=log)
    assert proc.wait(60) == 2
    assert "python -m arm_registry migrate" in log.read_text()
    # After the explicit migration step it serves, and bootstrap prints a key once.
    assert spawn("arm_registry", "migrate", env=registry_env(spec, port), log=log).wait(60) == 0
    assert spawn("arm_registry", "bootstrap", env=registry_env(spec, port), log=log).wait(60) == 0
    assert "admin API key (shown once)" in log.read_text()
    proc = spawn("arm_registry", env=registry_env(spec, port), log=log)
    try:
        await wait_serving(f"127.0.0.1:{port}", proc, log)
        assert REGISTRY_SERVICES <= await reflected_services(f"127.0.0.1:{port}")
    finally:
        assert stop(proc) == 0, log.read_text()
        if spec.schema:
            from tests.conftest import drop_schema
            await drop_schema(spec.schema)


async def test_make_run_serves_on_the_default_address(tmp_path: Path) -> None:
    """`make run` itself (set-up is a no-op once done): health SERVING on 127.0.0.1:50051 and the
    registry services listed through reflection."""
    import os
    import subprocess

    from tests.processes import ROOT
    log = tmp_path / "make-run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["make", "--no-print-directory", "run"], cwd=ROOT,
                                env=base_env(ARM_DATA_DIR=str(tmp_path / "data")),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        await wait_serving("127.0.0.1:50051", proc, log, timeout_s=300)
        assert REGISTRY_SERVICES <= await reflected_services("127.0.0.1:50051")
        assert "admin API key: arm_key_" in log.read_text()
        await console_answers(log, timeout_s=30)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_bad_configuration_fails_fast_naming_the_variable(tmp_path: Path) -> None:
    log = tmp_path / "bad.log"
    proc = spawn("arm_registry", env=base_env(ARM_REGISTRY_LISTEN="nonsense"), log=log)
    assert proc.wait(60) == 2
    assert "ARM_REGISTRY_LISTEN" in log.read_text()
    proc = spawn("arm_allinone", env=base_env(ARM_COMPAT_MODE="maybe", ARM_DATA_DIR=str(tmp_path)), log=log)
    assert proc.wait(60) == 2
    assert "ARM_COMPAT_MODE" in log.read_text()
