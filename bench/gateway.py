"""MCP gateway benchmark, on PostgreSQL: registry, governance and telemetry each in its own
process, the test upstream MCP server (tests/gateway/upstream.py) over streamable HTTP, the
gateway (`python -m arm_gateway`, streamable HTTP) in front of it, and the MCP clients (the `mcp`
SDK's ClientSession) in this process.

Added latency of an allowed call (`up.echo`, LOW → ALLOW) through the gateway against the same
call made to the upstream directly, at 1 and at 16 sessions in flight (each session one call at a
time), measured in alternating rounds with a bare `Check` (the raw stub from this process) so
drift on a shared machine hits all alike. Target: p50 added ≤ 1.5× the bare Check's p50.
Several gateway configurations (`--variants`, see VARIANTS) run side by side, each its own
process in front of the same upstream, measured in the same rounds.

  .venv/bin/python bench/gateway.py [--postgres URL] [--seconds 8] [--rounds 3] [--variants check,local] [--profile]

`--profile` runs the gateways under cProfile and prints their top functions after. Prints
figures; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))



HTTPX = {"ARM_GATEWAY_DIRECT_ON_HTTPX": "1"}
VARIANTS: dict[str, dict[str, Any]] = {
    # before the levers: a Check per call, the SDK's session for the upstream call, the SDK's server
    "check": {"local_decisions": False, "direct_http_calls": False, "fast_http_calls": False},
    "local": {"local_decisions": True, "direct_http_calls": False, "fast_http_calls": False},  # decided in process
    # and the upstream call as a direct POST, on httpx's client (the default until 2026-12-07 evening)
    "local+direct": {"local_decisions": True, "direct_http_calls": True, "fast_http_calls": False, "env": HTTPX},
    # the direct POSTs on aiohttp's client (arm_gateway.direct.AiohttpPosts; until 2026-12-07 21:00
    # UTC on hand-written keep-alive connections, the `local+direct+lean` of the figures before)
    "local+direct+aiohttp": {"local_decisions": True, "direct_http_calls": True, "fast_http_calls": False},
    # the client's tools/call answered beside the SDK's server (arm_gateway.fast), direct POSTs on httpx
    "local+direct+fast": {"local_decisions": True, "direct_http_calls": True, "fast_http_calls": True, "env": HTTPX},
    "default": {"local_decisions": True, "direct_http_calls": True, "fast_http_calls": True},  # all of them (aiohttp)
}
"""The gateway configurations measured side by side (each its own process, same upstream)."""


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def agent_world(reg_address: str, key: str) -> tuple[str, str]:
    """One ACTIVE agent instance in a fresh tenant, and its API key."""
    from arm.registry.v1 import access_pb2, agents_pb2, tenancy_pb2
    from arm_client import ArmClient
    from tests.helpers import approved_version

    async with ArmClient(reg_address, key) as system:
        slug = f"bench-{secrets.token_hex(3)}"
        t = await system.tenancy.CreateTenant(tenancy_pb2.CreateTenantRequest(
            slug=slug, name="bench", admin_email=f"admin@{slug}.example", admin_name="Admin"))
    async with ArmClient(reg_address, t.admin_api_key) as admin:
        agents = await approved_version(admin)
        inst = (await admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
            version_id=agents.version.id, environment_id=agents.environment.id, name="bench"))).agent_instance
        await admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
            id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))
        agent_key = (await admin.access.CreateApiKey(access_pb2.CreateApiKeyRequest(instance_id=inst.id))).secret
    return inst.id, agent_key


async def sessions(url: str, n: int, stack: contextlib.AsyncExitStack) -> list[Any]:
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    out = []
    for _ in range(n):
        read, write = await stack.enter_async_context(streamable_http_client(url))
        session = await stack.enter_async_context(ClientSession(read, write))
        await session.initialize()
        out.append(session)
    return out


async def measure(workers: list[Callable[[], Awaitable[None]]], until: float) -> list[float]:
    """Each worker calls in a loop until `until`; every call's latency."""
    out: list[float] = []

    async def loop(fn: Callable[[], Awaitable[None]]) -> None:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            await fn()
            out.append(time.perf_counter() - t0)

    await asyncio.gather(*(loop(w) for w in workers))
    return out


async def bench(env: dict[str, str], direct_url: str, gateway_urls: dict[str, str], seconds: float, rounds: int,
                pids: dict[str, int]) -> None:
    from google.protobuf import struct_pb2

    from arm.governance.v1 import decision_pb2
    from arm_client import ArmClient

    bare = ArmClient(env["ARM_GOVERNANCE_ADDRESS"], env["ARM_API_KEY"])
    args = {"text": "hello"}
    struct = struct_pb2.Struct()
    struct.update(args)

    def check_worker() -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            await bare.decisions.Check(decision_pb2.CheckRequest(
                instance_id=env["ARM_INSTANCE_ID"], tool_name="up.echo", arguments=struct, declared_risk=1,
                run_id="bench-gateway", tool_call_id=f"tc-{secrets.token_hex(8)}",
                request_id=f"req-{secrets.token_hex(8)}"), timeout=10)
        return call

    def tool_worker(session: Any, name: str) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            result = await session.call_tool(name, args)
            if result.is_error:
                raise RuntimeError(f"{name}: {result.content}")
        return call

    print(f"{'case':34} {'in flight':>9} {'calls':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for n in (1, 16):
        async with contextlib.AsyncExitStack() as stack:
            direct = [tool_worker(s, "echo") for s in await sessions(direct_url, n, stack)]
            checks = [check_worker() for _ in range(n)]
            cases = {"bare Check (raw stub)": checks, "direct to the upstream": direct}
            for variant, url in gateway_urls.items():
                cases[f"gateway: {variant}"] = [tool_worker(s, "up.echo") for s in await sessions(url, n, stack)]
            for workers in cases.values():  # warm up channels, caches, the JIT-less interpreter
                await measure(workers, time.perf_counter() + 0.5)
            times: dict[str, list[float]] = {name: [] for name in cases}
            cpu = {(name, proc): 0.0 for name in cases for proc in pids}
            for _ in range(rounds):
                for name, workers in cases.items():
                    before = {proc: cpu_seconds(pid) for proc, pid in pids.items()}
                    times[name] += await measure(workers, time.perf_counter() + seconds / rounds / len(cases))
                    for proc, pid in pids.items():
                        cpu[name, proc] += cpu_seconds(pid) - before[proc]
        p50 = {name: statistics.median(t) * 1000 for name, t in times.items()}
        for name, t in times.items():
            # CPU per call of the gateway and the upstream processes: steadier than latency on a
            # busy machine (a 10 ms clock tick, so read it over many calls).
            used = "  ".join(f"{proc} CPU {cpu[name, proc] / len(t) * 1e6:6.0f} µs/call" for proc in pids)
            print(f"{name:34} {n:>9} {len(t):>7} {p50[name]:8.2f} {pct(t, 0.99) * 1000:8.2f}   {used}")
        for variant in gateway_urls:
            added = p50[f"gateway: {variant}"] - p50["direct to the upstream"]
            ratio = added / p50["bare Check (raw stub)"]
            print(f"{'→ added, ' + variant:34} {n:>9} {'':>7} {added:8.2f}  = {ratio:.2f}x bare Check p50 "
                  f"(target ≤ 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})")
    await bare.close()


@contextlib.asynccontextmanager
async def services(postgres: str, tmp: Path) -> AsyncIterator[tuple[dict[str, str], str, int]]:
    """Registry, governance and telemetry on PostgreSQL (own schemas, dropped after); yields the
    addresses, the system key and governance's pid."""
    import asyncpg

    from tests.processes import base_env, free_port, wait_serving
    suffix = secrets.token_hex(4)
    schemas = {s: f"bench_gw_{s[:3]}_{suffix}" for s in ("registry", "governance", "telemetry")}
    procs: list[subprocess.Popen[bytes]] = []
    log = tmp / "services.log"
    try:
        addr = {s: f"127.0.0.1:{free_port()}" for s in schemas}
        reg_env = base_env(ARM_REGISTRY_LISTEN=addr["registry"], ARM_LOG_LEVEL="WARNING",
                           ARM_REGISTRY_DATABASE_URL=postgres, ARM_DATABASE_SCHEMA=schemas["registry"])
        for cmd in (["migrate"], ["bootstrap"]):
            with log.open("ab") as out:
                subprocess.run([sys.executable, "-m", "arm_registry", *cmd], env=reg_env, cwd=ROOT, check=True,
                               stdout=out, stderr=subprocess.STDOUT)
        key = log.read_text().split("(shown once): ")[1].split()[0]
        procs.append(spawn(["-m", "arm_registry"], reg_env, log))
        await wait_serving(addr["registry"], procs[-1], log)
        for name in ("governance", "telemetry"):
            env = base_env(**{f"ARM_{name.upper()}_LISTEN": addr[name], f"ARM_{name.upper()}_DATABASE_URL": postgres},
                           ARM_LOG_LEVEL="WARNING", ARM_DATABASE_SCHEMA=schemas[name],
                           ARM_REGISTRY_ADDRESS=addr["registry"], ARM_SERVICE_API_KEY=key)
            with log.open("ab") as out:
                subprocess.run([sys.executable, "-m", f"arm_{name}", "migrate"], env=env, cwd=ROOT, check=True,
                               stdout=out, stderr=subprocess.STDOUT)
            procs.append(spawn(["-m", f"arm_{name}"], env, log))
            await wait_serving(addr[name], procs[-1], log)
        yield addr, key, procs[1].pid
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(30)
        conn = await asyncpg.connect(postgres)
        for schema in schemas.values():
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def orchestrate(args: argparse.Namespace) -> None:
    from tests.gateway.test_gateway import accepting
    from tests.processes import free_port
    tmp = Path(tempfile.mkdtemp(prefix="arm-bench-gateway-"))
    procs: list[subprocess.Popen[bytes]] = []
    async with services(args.postgres, tmp) as (addr, key, governance_pid):
        try:
            instance_id, agent_key = await agent_world(addr["registry"], key)
            (tmp / "agent.key").write_text(agent_key)
            up_port, gw_port = free_port(), free_port()
            env = {**os.environ, "UPSTREAM_CALLS": str(tmp / "calls.jsonl")}
            procs.append(spawn([str(ROOT / "tests" / "gateway" / "upstream.py"), "--http", str(up_port)], env,
                               tmp / "upstream.log"))
            await accepting(up_port, procs[-1], tmp / "upstream.log")
            urls: dict[str, str] = {}
            pids = {"governance": governance_pid, "upstream": procs[0].pid}
            for variant in args.variants.split(","):
                gw_port = free_port()
                config = {"arm": {"registry_address": addr["registry"], "governance_address": addr["governance"],
                                  "telemetry_address": addr["telemetry"]},
                          "http": {"port": gw_port}, **{k: v for k, v in VARIANTS[variant].items() if k != "env"},
                          "spool_dir": str(tmp / f"spool-{variant}"),
                          "upstreams": {"up": {"url": f"http://127.0.0.1:{up_port}/mcp", "risk": "LOW", "agent": {
                              "instance_id": instance_id, "api_key_file": str(tmp / "agent.key")}}}}
                (tmp / f"gateway-{variant}.yaml").write_text(json.dumps(config))
                gateway = ["-m", "arm_gateway", "--config", str(tmp / f"gateway-{variant}.yaml")]
                if args.profile:
                    gateway = ["-m", "cProfile", "-o", str(tmp / f"gateway-{variant}.prof"), *gateway]
                procs.append(spawn(gateway, {**os.environ, **VARIANTS[variant].get("env", {})},
                                   tmp / f"gateway-{variant}.log"))
                await accepting(gw_port, procs[-1], tmp / f"gateway-{variant}.log")
                urls[variant] = f"http://127.0.0.1:{gw_port}/mcp"
                pids[f"gw:{variant}"] = procs[-1].pid
            print(f"# {os.cpu_count()} cores, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
                  f"PostgreSQL; registry, governance, telemetry, the upstream and each gateway in their own "
                  f"processes; the MCP clients and the bare Check in this one")
            await bench({"ARM_GOVERNANCE_ADDRESS": addr["governance"], "ARM_API_KEY": agent_key,
                         "ARM_INSTANCE_ID": instance_id}, f"http://127.0.0.1:{up_port}/mcp",
                        urls, args.seconds, args.rounds, pids)
            print(f"# load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    p.terminate()
                    p.wait(30)
    if args.profile:
        import pstats
        for variant in args.variants.split(","):
            print(f"# gateway: {variant}")
            pstats.Stats(str(tmp / f"gateway-{variant}.prof")).sort_stats("cumulative").print_stats(40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default=os.environ.get("ARM_TEST_POSTGRES_URL",
                                                             "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--seconds", type=float, default=8.0, help="per concurrency level, over all cases")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="profile the gateways (cProfile)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"the gateways to measure, side by side (of {', '.join(VARIANTS)})")
    asyncio.run(orchestrate(parser.parse_args()))


if __name__ == "__main__":
    main()
