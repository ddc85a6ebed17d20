"""Runtime SDK benchmark, on PostgreSQL, with registry, governance and telemetry each in its own
process and the SDK in this one:

1. Overhead of a governed call (`@arm.governed` on a tool that does nothing: Check, the
   TOOL_CALL_STARTED / COMPLETED events queued, the tool) against a bare `Check` through the
   raw stub from the same process, at 1 call in flight; p50 and p99 of each, measured in
   alternating rounds so drift on a shared machine hits both alike. Target: ≤ 1.15× the bare p50.
2. Events per second the SDK's background sender gets acknowledged by telemetry (a queue filled
   up front, then drained), next to `bench/ingest.py`'s load generator (batches of 1000, 1 in
   flight, its own process) into the same telemetry, measured right before. Target: ≥ 0.5×.

  .venv/bin/python bench/sdk.py [--postgres URL] [--seconds 5] [--rounds 3] [--events 100000]

Prints figures; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=open(log, "ab"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


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


async def overhead(env: dict[str, str], seconds: float, rounds: int) -> None:
    from google.protobuf import struct_pb2

    from arm.governance.v1 import decision_pb2
    from arm_client import Arm, ArmClient

    arm = Arm(env=env)
    bare = ArmClient(env["ARM_GOVERNANCE_ADDRESS"], env["ARM_API_KEY"])
    args = {"path": "/srv/app/README.md"}
    struct = struct_pb2.Struct()
    struct.update(args)

    @arm.governed(name="fs.read", risk="LOW")
    async def read_file(path: str) -> None:
        return None

    async def bare_check() -> None:
        await bare.decisions.Check(decision_pb2.CheckRequest(
            instance_id=env["ARM_INSTANCE_ID"], tool_name="fs.read", arguments=struct, declared_risk=1,
            tool_call_id=f"tc-{secrets.token_hex(8)}", request_id=f"req-{secrets.token_hex(8)}"), timeout=10)

    async def governed() -> None:
        await read_file(**args)

    cpu: dict[str, float] = {"bare_check": 0.0, "governed": 0.0}

    async def measure(fn, until: float) -> list[float]:  # type: ignore[no-untyped-def]
        out = []
        c0 = time.process_time()
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            await fn()
            out.append(time.perf_counter() - t0)
        cpu[fn.__name__] += time.process_time() - c0
        return out

    times: dict[str, list[float]] = {"bare": [], "governed": []}
    async with arm.run("bench"):
        for fn in (bare_check, governed):  # warm up channels and caches
            await measure(fn, time.perf_counter() + 0.5)
        for _ in range(rounds):
            times["bare"] += await measure(bare_check, time.perf_counter() + seconds / rounds)
            times["governed"] += await measure(governed, time.perf_counter() + seconds / rounds)
    await arm.close()
    await bare.close()
    base = statistics.median(times["bare"])
    for name, fn_name, label in (("bare", "bare_check", "bare Check (raw stub; reference)"),
                                 ("governed", "governed", "@arm.governed call")):
        t = times[name]
        # This process's CPU per call (client side only, background sender included): steadier
        # than latency on a busy machine, and what the SDK adds is all on this side.
        print(f"{label:40} {len(t):>7} calls  p50 {statistics.median(t) * 1000:6.2f} ms  "
              f"p99 {pct(t, 0.99) * 1000:6.2f} ms  ({statistics.median(t) / base:.2f}x bare p50)  "
              f"client CPU {cpu[fn_name] / len(t) * 1e6:5.0f} µs/call")
    print(f"{'':40} events sent {arm.events_sent}, dropped {arm.events_dropped}")


async def sender_rate(env: dict[str, str], events: int) -> float:
    from arm.telemetry.v1 import events_pb2
    from arm_client import Arm

    arm = Arm(env=env, event_queue_size=events + 10, close_timeout_s=120)
    run = arm.run("bench-events")
    with run:  # not started yet: the queue fills, nothing is sent
        for i in range(events - 2):
            arm.emit(events_pb2.OP_EVENT_TYPE_RUN_STEP, payload={"step": i, "model": "gpt-4.1", "tokens": 512})
    t0 = time.perf_counter()
    await arm.flush(300)
    elapsed = time.perf_counter() - t0
    sent, dropped = arm.events_sent, arm.events_dropped
    await arm.close()
    print(f"{'':40} ({sent} acknowledged, {dropped} dropped, batches of {arm._sender.batch_size})")
    return sent / elapsed


async def orchestrate(args: argparse.Namespace) -> None:
    import asyncpg

    from tests.processes import base_env, free_port, wait_serving
    tmp = Path(tempfile.mkdtemp(prefix="arm-bench-sdk-"))
    suffix = secrets.token_hex(4)
    schemas = {s: f"bench_sdk_{s[:3]}_{suffix}" for s in ("registry", "governance", "telemetry")}
    procs: list[subprocess.Popen[bytes]] = []
    log = tmp / "services.log"
    try:
        ports = {s: free_port() for s in schemas}
        addr = {s: f"127.0.0.1:{p}" for s, p in ports.items()}
        reg_env = base_env(ARM_REGISTRY_LISTEN=addr["registry"], ARM_LOG_LEVEL="WARNING",
                           ARM_REGISTRY_DATABASE_URL=args.postgres, ARM_DATABASE_SCHEMA=schemas["registry"])
        for cmd in (["migrate"], ["bootstrap"]):
            subprocess.run([sys.executable, "-m", "arm_registry", *cmd], env=reg_env, cwd=ROOT, check=True,
                           stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        key = log.read_text().split("(shown once): ")[1].split()[0]
        procs.append(spawn(["-m", "arm_registry"], reg_env, log))
        await wait_serving(addr["registry"], procs[-1], log)
        for name in ("governance", "telemetry"):
            env = base_env(**{f"ARM_{name.upper()}_LISTEN": addr[name], f"ARM_{name.upper()}_DATABASE_URL": args.postgres},
                           ARM_LOG_LEVEL="WARNING", ARM_DATABASE_SCHEMA=schemas[name],
                           ARM_REGISTRY_ADDRESS=addr["registry"], ARM_SERVICE_API_KEY=key)
            subprocess.run([sys.executable, "-m", f"arm_{name}", "migrate"], env=env, cwd=ROOT, check=True,
                           stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
            procs.append(spawn(["-m", f"arm_{name}"], env, log))
            await wait_serving(addr[name], procs[-1], log)
        instance_id, agent_key = await agent_world(addr["registry"], key)
        sdk_env = {"ARM_REGISTRY_ADDRESS": addr["registry"], "ARM_GOVERNANCE_ADDRESS": addr["governance"],
                   "ARM_TELEMETRY_ADDRESS": addr["telemetry"], "ARM_API_KEY": agent_key,
                   "ARM_INSTANCE_ID": instance_id}
        print(f"# {os.cpu_count()} cores; PostgreSQL {args.postgres}; registry, governance, telemetry "
              f"in their own processes; the SDK in this one")
        print("## 1. governed call vs bare Check, 1 in flight")
        await overhead(sdk_env, args.seconds, args.rounds)
        print("## 2. background sender vs bench/ingest.py's load generator, into the same telemetry")
        out = subprocess.run([sys.executable, str(ROOT / "bench" / "ingest.py"), "--load", addr["telemetry"],
                              "--key", key, "--in-flight", "1", "--seconds", str(args.seconds)],
                             check=True, capture_output=True, text=True, cwd=ROOT)
        ingest_rate = json.loads(out.stdout.strip().splitlines()[-1])["events_per_s"]
        print(f"{'bench/ingest.py load, 1 in flight (ref)':40} {ingest_rate:>10.0f} events/s")
        rate = await sender_rate(sdk_env, args.events)
        print(f"{'Arm background sender':40} {rate:>10.0f} events/s   ({rate / ingest_rate:.2f}x ingest.py)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(30)
        conn = await asyncpg.connect(args.postgres)
        for schema in schemas.values():
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default=os.environ.get("ARM_TEST_POSTGRES_URL",
                                                             "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--seconds", type=float, default=5.0, help="per case (split over the rounds)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=100_000)
    asyncio.run(orchestrate(parser.parse_args()))


if __name__ == "__main__":
    main()
