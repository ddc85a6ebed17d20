"""A registry and a governance, each its own process, on PostgreSQL schemas of their own, with
check_grpc.py's policy world and one agent with its key: what sdk_local.py and ship.py measure
against. The schemas are dropped and the processes stopped on exit."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from check_grpc import ROOT, setup_world, spawn


@dataclass
class Stack:
    addr: dict[str, str]
    """"registry" and "governance" addresses."""
    key: str
    """The system administrator's key."""
    schemas: dict[str, str]
    procs: list[subprocess.Popen[bytes]]
    log: Path
    instance: str
    agent_key: str

    @property
    def governance_pid(self) -> int:
        return self.procs[1].pid


@contextlib.asynccontextmanager
async def registry_and_governance(postgres: str, prefix: str, tmp: Path, *,
                                  profile_governance: str = "") -> AsyncIterator[Stack]:
    import asyncpg

    from arm.registry.v1 import access_pb2
    from arm_client import ArmClient
    from tests.processes import base_env, free_port, wait_serving

    suffix = secrets.token_hex(4)
    schemas = {s: f"bench_{prefix}_{s[:3]}_{suffix}" for s in ("registry", "governance")}
    procs: list[subprocess.Popen[bytes]] = []
    log = tmp / "services.log"
    try:
        addr = {s: f"127.0.0.1:{free_port()}" for s in schemas}
        reg_env = base_env(ARM_REGISTRY_LISTEN=addr["registry"], ARM_LOG_LEVEL="WARNING",
                           ARM_REGISTRY_DATABASE_URL=postgres, ARM_DATABASE_SCHEMA=schemas["registry"])
        for cmd in (["migrate"], ["bootstrap"]):
            subprocess.run([sys.executable, "-m", "arm_registry", *cmd], env=reg_env, cwd=ROOT, check=True,
                           stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        key = log.read_text().split("(shown once): ")[1].split()[0]
        procs.append(spawn(["-m", "arm_registry"], reg_env, log))
        await wait_serving(addr["registry"], procs[-1], log)
        gov_env = base_env(ARM_GOVERNANCE_LISTEN=addr["governance"], ARM_GOVERNANCE_DATABASE_URL=postgres,
                           ARM_LOG_LEVEL="WARNING", ARM_DATABASE_SCHEMA=schemas["governance"],
                           ARM_REGISTRY_ADDRESS=addr["registry"], ARM_SERVICE_API_KEY=key)
        subprocess.run([sys.executable, "-m", "arm_governance", "migrate"], env=gov_env, cwd=ROOT, check=True,
                       stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        profile = ["-m", "cProfile", "-o", profile_governance] if profile_governance else []
        procs.append(spawn([*profile, "-m", "arm_governance"], gov_env, log))
        await wait_serving(addr["governance"], procs[-1], log)
        instance = await setup_world(addr["registry"], key, addr["governance"])
        async with ArmClient(addr["registry"], key) as reg:
            agent_key = (await reg.access.CreateApiKey(access_pb2.CreateApiKeyRequest(instance_id=instance))).secret
        yield Stack(addr, key, schemas, procs, log, instance, agent_key)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(30)
        conn = await asyncpg.connect(postgres)
        for schema in schemas.values():
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
