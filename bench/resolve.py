"""ResolveAgentRef benchmark: latency and throughput of the registry's hot path for governance.

Starts a standalone registry process (SQLite by default, or PostgreSQL with --postgres URL),
creates one agent, then calls ResolveAgentRef at 1 and at N calls in flight from this process.
The gRPC health Check on the same server is measured alongside as the floor (no auth, no DB).
Prints figures; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from arm.registry.v1 import agents_pb2, compat_pb2  # noqa: E402
from arm_client import ArmClient  # noqa: E402
from tests.helpers import approved_version  # noqa: E402
from tests.processes import base_env, free_port, spawn, stop, wait_serving  # noqa: E402


async def measure(call: Callable[[], Awaitable[object]], in_flight: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    for _ in range(50):  # warm-up
        await call()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"calls/s": len(latencies) / elapsed, "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--postgres", help="PostgreSQL URL (default: SQLite in a temp folder)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--in-flight", type=int, default=32)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="arm-bench-"))
    port = free_port()
    env = base_env(ARM_REGISTRY_LISTEN=f"127.0.0.1:{port}", ARM_LOG_LEVEL="WARNING")
    if args.postgres:
        env["ARM_REGISTRY_DATABASE_URL"] = args.postgres
        env["ARM_DATABASE_SCHEMA"] = f"arm_bench_{secrets.token_hex(4)}"
    else:
        env["ARM_REGISTRY_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp}/registry.db"
    log = tmp / "registry.log"
    assert spawn("arm_registry", "migrate", env=env, log=log).wait(60) == 0
    assert spawn("arm_registry", "bootstrap", env=env, log=log).wait(60) == 0
    key = log.read_text().split("(shown once): ")[1].split()[0]
    proc = spawn("arm_registry", env=env, log=log)
    address = f"127.0.0.1:{port}"
    try:
        await wait_serving(address, proc, log)
        async with ArmClient(address, key) as client:
            agents = await approved_version(client)
            inst = (await client.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
                version_id=agents.version.id, environment_id=agents.environment.id, name="bench",
                legacy_agent_id="bench-legacy"))).agent_instance
            health = health_pb2_grpc.HealthStub(client.channel)
            resolve_req = compat_pb2.ResolveAgentRefRequest(instance_id=inst.id)
            legacy_req = compat_pb2.ResolveAgentRefRequest(legacy_agent_id="bench-legacy")
            cases = {
                "health Check (floor)": lambda: health.Check(health_pb2.HealthCheckRequest()),
                "ResolveAgentRef(instance_id)": lambda: client.compat.ResolveAgentRef(resolve_req),
                "ResolveAgentRef(legacy_agent_id)": lambda: client.compat.ResolveAgentRef(legacy_req),
            }
            backend = "postgresql" if args.postgres else "sqlite"
            print(f"registry on {backend}, {os.cpu_count()} cores, {args.seconds:.0f}s per case")
            print(f"{'case':36} {'in flight':>9} {'calls/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
            for name, call in cases.items():
                for in_flight in (1, args.in_flight):
                    r = await measure(call, in_flight, args.seconds)
                    print(f"{name:36} {in_flight:>9} {r['calls/s']:>10.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}")
    finally:
        stop(proc)
        if args.postgres:
            import asyncpg
            conn = await asyncpg.connect(args.postgres)
            await conn.execute(f'DROP SCHEMA IF EXISTS "{env["ARM_DATABASE_SCHEMA"]}" CASCADE')
            await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
