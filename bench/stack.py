"""A registry and a governance, each its own process, on PostgreSQL schemas of their own, with
check_grpc.py's policy world and one agent with its key: what sdk_local.py and ship.py measure
against. The schemas are dropped and the processes stopped on exit."""

from __future__ import annotations

import contextlib
import os
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

    @property
    def telemetry_pid(self) -> int | None:
        """Telemetry's process when started (`telemetry=True`): governance's op_event relay
        derives each logged decision's opEvent and delivers it there."""
        return self.procs[2].pid if len(self.procs) > 2 else None


@contextlib.asynccontextmanager
async def registry_and_governance(postgres: str, prefix: str, tmp: Path, *, profile_governance: str = "",
                                  telemetry: bool = False) -> AsyncIterator[Stack]:
    import asyncpg

    from arm.registry.v1 import access_pb2
    from arm_client import ArmClient
    from tests.processes import base_env, free_port, wait_serving

    suffix = secrets.token_hex(4)
    services = ("registry", "governance", "telemetry") if telemetry else ("registry", "governance")
    schemas = {s: f"bench_{prefix}_{s[:3]}_{suffix}" for s in services}
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
                           ARM_REGISTRY_ADDRESS=addr["registry"], ARM_SERVICE_API_KEY=key,
                           **({"ARM_TELEMETRY_ADDRESS": addr["telemetry"]} if telemetry else {}))
        subprocess.run([sys.executable, "-m", "arm_governance", "migrate"], env=gov_env, cwd=ROOT, check=True,
                       stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        profile = ["-m", "cProfile", "-o", profile_governance] if profile_governance else []
        procs.append(spawn([*profile, "-m", "arm_governance"], gov_env, log))
        await wait_serving(addr["governance"], procs[-1], log)
        if telemetry:
            tel_env = base_env(ARM_TELEMETRY_LISTEN=addr["telemetry"], ARM_TELEMETRY_DATABASE_URL=postgres,
                               ARM_LOG_LEVEL="WARNING", ARM_DATABASE_SCHEMA=schemas["telemetry"],
                               ARM_REGISTRY_ADDRESS=addr["registry"], ARM_GOVERNANCE_ADDRESS=addr["governance"],
                               ARM_SERVICE_API_KEY=key)
            subprocess.run([sys.executable, "-m", "arm_telemetry", "migrate"], env=tel_env, cwd=ROOT, check=True,
                           stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
            procs.append(spawn(["-m", "arm_telemetry"], tel_env, log))
            await wait_serving(addr["telemetry"], procs[-1], log)
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


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def _ports_to(pid: int, port: int) -> list[int]:
    """The local ports of `pid`'s TCP connections to `port` (Linux /proc)."""
    inodes = _socket_inodes(pid)
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) == port:
                    ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


class Backends:
    """CPU of the PostgreSQL backends serving one process's connections (found by their client
    ports), so other sessions on the same PostgreSQL do not count; walwriter, checkpointer and
    autovacuum are left out (`check_grpc.postgres_cpu_seconds` counts every postgres process)."""

    def __init__(self, postgres: str, pid: int) -> None:
        self.postgres, self.pid = postgres, pid
        self.start: dict[int, int] = {}

    async def _backends(self) -> list[int]:
        import asyncpg

        conn = await asyncpg.connect(self.postgres)
        try:
            rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE client_port = ANY($1::int[])",
                                    _ports_to(self.pid, 5432))
        finally:
            await conn.close()
        return [r["pid"] for r in rows]

    async def mark(self) -> None:
        self.start = {b: _ticks(b) for b in await self._backends()}

    async def seconds(self) -> float:
        """CPU seconds since `mark` (backends opened since counted whole)."""
        now = {b: _ticks(b) for b in await self._backends()}
        return sum(t - self.start.get(b, 0) for b, t in now.items()) / os.sysconf("SC_CLK_TCK")


async def analyze(postgres: str, schema: str) -> None:
    """ANALYZE governance's tables, as autovacuum does within a minute of a deployment's start:
    the schema is new, and on never-analyzed tables PostgreSQL plans as if they were nearly
    empty (e.g. the audit trail's lookup of record ids scanning the tenant's whole trail)."""
    import asyncpg

    conn = await asyncpg.connect(postgres)
    try:
        for (table,) in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema):
            await conn.execute(f'ANALYZE "{schema}"."{table}"')
    finally:
        await conn.close()
