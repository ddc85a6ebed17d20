"""Keys pre-provisioned from files (issue 14 item 2): `arm_registry genkey` mints key strings, the
registry provisions ARM_BOOTSTRAP_ADMIN_KEY(_FILE) and ARM_SERVICE_API_KEY(_FILE) as system
admin keys on its first start (hashes only), governance and telemetry use the service key file,
and a restart changes nothing — so `docker compose up` works in one go."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from arm.common.v1 import common_pb2
from arm.governance.v1 import audit_pb2
from arm.registry.v1 import tenancy_pb2
from arm.telemetry.v1 import telemetry_pb2
from arm_client import ArmClient
from arm_common.config import ConfigError, ServiceConfig
from arm_registry import app as registry_app
from arm_registry import models
from tests.conftest import drop_schema, new_database_spec
from tests.processes import ROOT, base_env, free_port, spawn, stop, wait_serving


def genkey() -> str:
    out = subprocess.run([sys.executable, "-m", "arm_registry", "genkey"], cwd=ROOT, env=base_env(),
                         capture_output=True, text=True, check=True).stdout
    assert out.endswith("\n") and out.count("\n") == 1
    return out.strip()


async def test_provisioning_is_idempotent_and_checks_the_secret(backend: str, tmp_path: Path) -> None:
    spec = new_database_spec(backend, tmp_path, "registry")
    config = ServiceConfig.from_env("registry", spec.env("registry"))
    db = registry_app.database(config)
    try:
        await registry_app.migrate(db)
        store = registry_app.RegistryStore(db)
        admin, service = registry_app.genkey(), registry_app.genkey()
        config = dataclasses.replace(config, bootstrap_admin_key=admin, service_api_key=service)
        assert await registry_app.provision_keys(store, config) == ["ARM_BOOTSTRAP_ADMIN_KEY",
                                                                    "ARM_SERVICE_API_KEY"]
        assert await registry_app.provision_keys(store, config) == []

        async def counts(s):  # type: ignore[no-untyped-def]
            return [(await s.execute(select(func.count()).select_from(m))).scalar_one()
                    for m in (models.ApiKey, models.Tenant, models.Operator)]
        assert await db.read(counts) == [2, 1, 1]
        rows = await db.read(lambda s: s.execute(select(models.ApiKey.key_hash)))
        assert admin not in str(list(rows))
        # Both are admin keys of the system tenant.
        for key in (admin, service):
            principal = await registry_app.LocalAuthenticator(db, 0).authenticate(key)
            assert principal.system_tenant and "tenants:admin" in {g.permission for g in principal.grants}
        # The bootstrap command now finds the system tenant there.
        assert (await registry_app.bootstrap(store)).api_key is None
        # Same key id, another secret: refused, naming the variable and not the key.
        forged = admin.rsplit("_", 1)[0] + "_" + "x" * 43
        with pytest.raises(ConfigError) as caught:
            await registry_app.provision_keys(store, dataclasses.replace(config, bootstrap_admin_key=forged))
        assert "ARM_BOOTSTRAP_ADMIN_KEY" in str(caught.value) and forged not in str(caught.value)
        with pytest.raises(ConfigError) as caught:
            await registry_app.provision_keys(store, dataclasses.replace(config, service_api_key="arm_key_x_y"))
        assert "ARM_SERVICE_API_KEY is not a key minted by" in str(caught.value)
        assert await db.read(counts) == [2, 1, 1]
    finally:
        await db.dispose()
        if spec.schema:
            await drop_schema(spec.schema)


async def _change_record_arrives(gov: ArmClient, project_id: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        page = await gov.audit.ListChangeRecords(audit_pb2.ListChangeRecordsRequest(
            page_size=100, filter=audit_pb2.ChangeRecordFilter(target_id=project_id)))
        if any(r.type == common_pb2.CHANGE_RECORD_TYPE_PROJECT_CREATED for r in page.records):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the project's change record never reached governance:\n{log.read_text()[-3000:]}")


async def test_compose_bootstrap_in_one_go_from_key_files(tmp_path: Path) -> None:
    # What compose's one-shot `keys` step runs; run twice, it keeps the keys it wrote first.
    paths = [str(tmp_path / "admin.key"), str(tmp_path / "service.key")]
    log = tmp_path / "services.log"
    for run in range(2):
        assert spawn("arm_registry", "genkey", *paths, env=base_env(), log=log).wait(60) == 0
        if run == 0:
            admin_key, service_key = ((tmp_path / n).read_text().strip() for n in ("admin.key", "service.key"))
    assert (tmp_path / "admin.key").read_text() == admin_key + "\n"
    assert (tmp_path / "admin.key").stat().st_mode & 0o077 == 0
    assert admin_key != service_key != genkey()
    reg_db = tmp_path / "registry.db"
    addr = {s: f"127.0.0.1:{free_port()}" for s in ("registry", "governance", "telemetry")}
    common = {"ARM_SERVICE_API_KEY_FILE": str(tmp_path / "service.key"), "ARM_OUTBOX_POLL_S": "0.1",
              "ARM_REGISTRY_ADDRESS": addr["registry"], "ARM_GOVERNANCE_ADDRESS": addr["governance"],
              "ARM_TELEMETRY_ADDRESS": addr["telemetry"]}
    envs = {s: base_env(**common, **{f"ARM_{s.upper()}_LISTEN": addr[s],
                                     f"ARM_{s.upper()}_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / s}.db"})
            for s in addr}
    envs["registry"]["ARM_BOOTSTRAP_ADMIN_KEY_FILE"] = str(tmp_path / "admin.key")
    for service, env in envs.items():
        assert spawn(f"arm_{service}", "migrate", env=env, log=log).wait(60) == 0, log.read_text()
    procs = {s: spawn(f"arm_{s}", env=envs[s], log=log) for s in addr}
    try:
        for service, proc in procs.items():
            await wait_serving(addr[service], proc, log)
        async with ArmClient(addr["registry"], admin_key) as reg, ArmClient(addr["governance"], admin_key) as gov, \
                ArmClient(addr["telemetry"], admin_key) as tel:
            project = (await reg.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
                slug="first-start", name="made with the bootstrap key"))).project
            # The registry delivered its change record to governance with the service key.
            await _change_record_arrives(gov, project.id, log)
            await tel.telemetry.QueryEvents(telemetry_pb2.QueryEventsRequest(page_size=1))

        # Restart: nothing is provisioned twice, the keys still work.
        assert stop(procs["registry"]) == 0
        procs["registry"] = spawn("arm_registry", env=envs["registry"], log=log)
        await wait_serving(addr["registry"], procs["registry"], log)
        async with ArmClient(addr["registry"], admin_key) as reg:
            listed = await reg.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest(page_size=10))
            assert project.id in {p.id for p in listed.projects}
        with sqlite3.connect(reg_db) as conn:
            assert conn.execute("select count(*) from api_keys").fetchone()[0] == 2
            assert conn.execute("select count(*) from tenants where system").fetchone()[0] == 1
    finally:
        for proc in procs.values():
            stop(proc, signal.SIGKILL)
    text = log.read_text()
    assert text.count("ARM_BOOTSTRAP_ADMIN_KEY provisioned") == 1, text
    assert "unset" not in text and "is not set" not in text, text  # every service read the key file
    secrets = (admin_key.rsplit("_", 1)[1], service_key.rsplit("_", 1)[1])
    assert not any(s in text for s in secrets)
    stored = reg_db.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("registry.db-*"))
    assert not any(s.encode() in stored for s in secrets)
