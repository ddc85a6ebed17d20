"""ARM_WORKERS=N (issue 14 item 8): one `python -m arm_<service>` runs N worker processes on one
port (SO_REUSEPORT, implied); new connections are served by both; SIGTERM stops them all; a
worker that dies takes the others down so the orchestrator restarts the whole."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from arm_common.config import ConfigError, ServiceConfig
from tests.processes import base_env, free_port, spawn, stop, wait_serving

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to see which process serves")


def test_workers_setting() -> None:
    assert ServiceConfig.from_env("registry", {}).workers == 1
    config = ServiceConfig.from_env("registry", {"ARM_WORKERS": "3", "ARM_LISTEN": "0.0.0.0:7000"})
    assert config.workers == 3 and config.share_port is True
    for env, text in [({"ARM_WORKERS": "0"}, "ARM_WORKERS must be"), ({"ARM_WORKERS": "two"}, "ARM_WORKERS must be"),
                      ({"ARM_WORKERS": "2", "ARM_LISTEN": "127.0.0.1:0"}, "needs a fixed port"),
                      ({"ARM_WORKERS": "2", "ARM_SHARE_PORT": "false"}, "unset ARM_SHARE_PORT=false")]:
        with pytest.raises(ConfigError, match=text):
            ServiceConfig.from_env("registry", env)


def _children(parent: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            out.add(int(stat.parent.name))
    return out


ESTABLISHED, LISTEN = "01", "0A"


def _sockets(pid: int, port: int, state: str = ESTABLISHED) -> int:
    """How many TCP sockets on local `port` in `state` process `pid` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            local_port, inode = int(cols[1].rsplit(":", 1)[1], 16), cols[9]
            if local_port == port and cols[3] == state and inode in inodes:
                count += 1
    return count


async def test_two_workers_serve_one_port(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    log = tmp_path / "registry.log"
    env = base_env(ARM_REGISTRY_LISTEN=address, ARM_WORKERS="2",
                   ARM_REGISTRY_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    assert spawn("arm_registry", "migrate", env=env, log=log).wait(60) == 0
    parent = spawn("arm_registry", env=env, log=log)
    channels: list[grpc.aio.Channel] = []
    try:
        await wait_serving(address, parent, log)
        workers = _children(parent.pid)
        assert len(workers) == 2, log.read_text()
        deadline = time.monotonic() + 60
        while not all(_sockets(w, port, LISTEN) for w in workers):  # both listen before we connect
            assert time.monotonic() < deadline and parent.poll() is None, log.read_text()
            await asyncio.sleep(0.05)
        # 24 new connections (a private subchannel pool each), every one answered.
        for _ in range(24):
            channel = grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            channels.append(channel)
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            # A worker reports NOT_SERVING until its first readiness probe has answered.
            while reply.status != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        served = {w: _sockets(w, port) for w in workers}
        assert sum(served.values()) == 24 and all(served.values()), served
        assert _sockets(parent.pid, port) == 0  # the parent only supervises
        for channel in channels:
            await channel.close()
        channels.clear()
        # A worker that dies takes the other down; the parent reports it.
        os.kill(min(workers), signal.SIGKILL)
        assert parent.wait(30) == 128 + signal.SIGKILL
        assert "exited with -9: stopping the others" in log.read_text()
        assert not any(Path(f"/proc/{w}/stat").exists() for w in workers)
    finally:
        for channel in channels:
            await channel.close()
        stop(parent, signal.SIGKILL)


async def test_sigterm_stops_every_worker(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    log = tmp_path / "registry.log"
    env = base_env(ARM_REGISTRY_LISTEN=address, ARM_WORKERS="2",
                   ARM_REGISTRY_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    assert spawn("arm_registry", "migrate", env=env, log=log).wait(60) == 0
    parent = spawn("arm_registry", env=env, log=log)
    try:
        await wait_serving(address, parent, log)
        workers = _children(parent.pid)
        assert len(workers) == 2
        assert stop(parent, signal.SIGTERM) == 0, log.read_text()
        assert not any(Path(f"/proc/{w}/stat").exists() for w in workers), log.read_text()
    finally:
        stop(parent, signal.SIGKILL)
