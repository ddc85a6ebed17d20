"""Shipping benchmark (issue 16 part 2): how fast governance logs local decisions
(`RecordLocalDecisions`) on PostgreSQL, and its CPU per decision, without a runtime deciding at
the same time (bench/sdk_local.py measures both together).

Registry and governance run as their own processes on PostgreSQL with `check_grpc.py`'s policy
set (`setup_world`). This process asks `Check` once per tool of `sdk_local.TOOLS` for the
response template (five ALLOW, one locked DENY), then sends prebuilt batches of 1,000 local
decisions (fresh decision ids, the SDK's default batch and `ship_in_flight=2`) as serialized
bytes, so it spends next to nothing per decision itself; then the same batches once more (all
duplicates). It prints decisions/s, governance's CPU per decision while sending, and once more
counting until its relays settled (the change-record relay writes each DENY's `POLICY_DENIED`
to the audit trail), and PostgreSQL's CPU per decision.

  .venv/bin/python bench/ship.py [--postgres URL] [--batches 40] [--profile-governance FILE]

Prints figures; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from check_grpc import cpu_seconds, postgres_cpu_seconds, setup_world, spawn  # noqa: E402
from sdk_local import TOOLS  # noqa: E402

METHOD = "/arm.governance.v1.DecisionService/RecordLocalDecisions"


async def templates(gov: str, key: str, instance: str, tools: tuple[str, ...]) -> list[tuple[bytes, bytes]]:
    """(request, response) per tool: the response as Check answered it, less its decision id."""
    import grpc

    from arm.governance.v1 import decision_pb2, decision_pb2_grpc

    out = []
    async with grpc.aio.insecure_channel(gov) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        for tool in tools:
            request = decision_pb2.CheckRequest(instance_id=instance, tool_name=tool, declared_risk=1,
                                                run_id="bench-run")
            request.arguments.update({"path": f"/srv/{tool}"})
            response = await stub.Check(request, metadata=(("authorization", f"Bearer {key}"),))
            response.ClearField("decision_id")
            out.append((request.SerializeToString(), response.SerializeToString()))
    return out


def batches(parts: list[tuple[bytes, bytes]], n: int, size: int) -> list[bytes]:
    from arm.governance.v1 import decision_pb2

    now = time.time()
    out = []
    for b in range(n):
        request = decision_pb2.RecordLocalDecisionsRequest()
        for i in range(size):
            request_bytes, response_bytes = parts[(b * size + i) % len(parts)]
            item = request.decisions.add(decision_id=f"dec_{secrets.token_urlsafe(16)}")
            item.request.MergeFromString(request_bytes)
            item.request.tool_call_id = f"tc-{b}-{i}"
            item.response.MergeFromString(response_bytes)
            item.response.decision_id = item.decision_id
            item.response.decide_time.FromNanoseconds(int((now + i * 1e-5) * 1e9))
        out.append(request.SerializeToString())
    return out


async def send(gov: str, key: str, payloads: list[bytes], in_flight: int) -> int:
    import grpc

    from arm.governance.v1 import decision_pb2

    recorded = 0
    async with grpc.aio.insecure_channel(gov) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        queue = list(reversed(payloads))

        async def worker() -> None:
            nonlocal recorded
            while queue:
                payload = queue.pop()
                raw = await call(payload, metadata=(("authorization", f"Bearer {key}"),), timeout=120)
                recorded += decision_pb2.RecordLocalDecisionsResponse.FromString(raw).recorded

        await asyncio.gather(*(worker() for _ in range(in_flight)))
    return recorded


async def settle(pid: int) -> float:
    """Waits until governance stops using CPU (its relays are done); returns the time it took."""
    t0 = time.perf_counter()
    last = cpu_seconds([pid])
    while True:
        await asyncio.sleep(0.5)
        now = cpu_seconds([pid])
        if now - last < 0.02:
            return time.perf_counter() - t0
        last = now


async def orchestrate(args: argparse.Namespace) -> None:
    import asyncpg

    from arm.registry.v1 import access_pb2
    from arm_client import ArmClient
    from tests.processes import base_env, free_port, wait_serving
    tmp = Path(tempfile.mkdtemp(prefix="arm-bench-ship-"))
    suffix = secrets.token_hex(4)
    schemas = {s: f"bench_shp_{s[:3]}_{suffix}" for s in ("registry", "governance")}
    procs: list[subprocess.Popen[bytes]] = []
    log = tmp / "services.log"
    try:
        addr = {s: f"127.0.0.1:{free_port()}" for s in schemas}
        reg_env = base_env(ARM_REGISTRY_LISTEN=addr["registry"], ARM_LOG_LEVEL="WARNING",
                           ARM_REGISTRY_DATABASE_URL=args.postgres, ARM_DATABASE_SCHEMA=schemas["registry"])
        for cmd in (["migrate"], ["bootstrap"]):
            subprocess.run([sys.executable, "-m", "arm_registry", *cmd], env=reg_env, cwd=ROOT, check=True,
                           stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        key = log.read_text().split("(shown once): ")[1].split()[0]
        procs.append(spawn(["-m", "arm_registry"], reg_env, log))
        await wait_serving(addr["registry"], procs[-1], log)
        gov_env = base_env(ARM_GOVERNANCE_LISTEN=addr["governance"], ARM_GOVERNANCE_DATABASE_URL=args.postgres,
                           ARM_LOG_LEVEL="WARNING", ARM_DATABASE_SCHEMA=schemas["governance"],
                           ARM_REGISTRY_ADDRESS=addr["registry"], ARM_SERVICE_API_KEY=key)
        subprocess.run([sys.executable, "-m", "arm_governance", "migrate"], env=gov_env, cwd=ROOT, check=True,
                       stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        profile = ["-m", "cProfile", "-o", args.profile_governance] if args.profile_governance else []
        procs.append(spawn([*profile, "-m", "arm_governance"], gov_env, log))
        gov_pid = procs[-1].pid
        await wait_serving(addr["governance"], procs[-1], log)
        instance = await setup_world(addr["registry"], key, addr["governance"])
        async with ArmClient(addr["registry"], key) as reg:
            agent_key = (await reg.access.CreateApiKey(access_pb2.CreateApiKeyRequest(instance_id=instance))).secret
        tools = tuple(args.tools.split(","))
        parts = await templates(addr["governance"], agent_key, instance, tools)
        await send(addr["governance"], agent_key, batches(parts, 2, args.batch), args.in_flight)  # warm-up
        payloads = batches(parts, args.batches, args.batch)
        n = args.batches * args.batch
        print(f"# {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; PostgreSQL; "
              f"{args.batches} batches of {args.batch}, {args.in_flight} in flight; tools {','.join(tools)}")
        await settle(gov_pid)
        for label in ("new", "retry (all duplicates)"):
            cpu0, pg0, t0 = cpu_seconds([gov_pid]), postgres_cpu_seconds(), time.perf_counter()
            recorded = await send(addr["governance"], agent_key, payloads, args.in_flight)
            elapsed, cpu_sent = time.perf_counter() - t0, cpu_seconds([gov_pid]) - cpu0
            await settle(gov_pid)
            cpu_all, pg = cpu_seconds([gov_pid]) - cpu0, postgres_cpu_seconds() - pg0
            print(f"{label:24} {n / elapsed:>8.0f} decisions/s  recorded {recorded}  governance CPU "
                  f"{cpu_sent / n * 1e6:.1f} µs/decision while sending, {cpu_all / n * 1e6:.1f} with its relays; "
                  f"PostgreSQL {pg / n * 1e6:.1f} µs/decision")
        conn = await asyncpg.connect(args.postgres)
        gov = schemas["governance"]
        rows = await conn.fetchval(f'SELECT count(*) FROM "{gov}".decisions')
        sizes = await conn.fetchrow(f'SELECT avg(octet_length(request)) AS request, avg(octet_length(agent)) AS agent, '
                                    f'avg(octet_length(response)) AS response FROM "{gov}".decisions')
        outbox = await conn.fetchval(f'SELECT avg(octet_length(payload)) FROM "{gov}".outbox_messages')
        await conn.close()
        print(f"decision log rows in governance: {rows} (expected {n + 2 * args.batch + len(tools)}); bytes per row: "
              f"request {sizes['request']:.0f}, agent {sizes['agent']:.0f}, response {sizes['response']:.0f}; "
              f"outbox payload {outbox:.0f}")
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
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=2)
    parser.add_argument("--tools", default=",".join(TOOLS), help="the tools decided, round robin (default: "
                        "sdk_local's, one in six a DENY)")
    parser.add_argument("--profile-governance", default="", help="cProfile governance's process to this file")
    asyncio.run(orchestrate(parser.parse_args()))


if __name__ == "__main__":
    main()
