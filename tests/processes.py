"""Starting ARM services as real processes for tests (dev server, standalone services)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(**extra: str) -> dict[str, str]:
    """The test process's environment without ARM_* / OTEL_* settings; the all-in-one server's
    web console on a free port (its default, 8080, would collide between tests run in parallel)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARM_", "OTEL_"))}
    env["ARM_CONSOLE_LISTEN"] = "127.0.0.1:0"
    env.update(extra)
    return env


def spawn(module: str, *args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - the process owns it until it exits
    return subprocess.Popen([sys.executable, "-m", module, *args], env=env, cwd=ROOT,
                            stdout=out, stderr=subprocess.STDOUT)


async def health_status(address: str, service: str = "") -> int | None:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            resp = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1)
            return int(resp.status)
        except grpc.aio.AioRpcError:
            return None


async def wait_serving(address: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}:\n{log.read_text()}")
        if await health_status(address) == health_pb2.HealthCheckResponse.SERVING:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{address} never became SERVING:\n{log.read_text()}")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout_s)
