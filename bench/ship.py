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
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from check_grpc import cpu_seconds, postgres_cpu_seconds  # noqa: E402
from sdk_local import TOOLS  # noqa: E402
from stack import Backends, analyze, registry_and_governance  # noqa: E402

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

    tmp = Path(tempfile.mkdtemp(prefix="arm-bench-ship-"))
    async with registry_and_governance(args.postgres, "shp", tmp, profile_governance=args.profile_governance,
                                       telemetry=args.telemetry) as stack:
        addr, schemas, gov_pid = stack.addr, stack.schemas, stack.governance_pid
        instance, agent_key = stack.instance, stack.agent_key
        tools = tuple(args.tools.split(","))
        parts = await templates(addr["governance"], agent_key, instance, tools)
        await send(addr["governance"], agent_key, batches(parts, 2, args.batch), args.in_flight)  # warm-up
        payloads = batches(parts, args.batches, args.batch)
        if not args.no_analyze:
            await analyze(args.postgres, schemas["governance"])
        n = args.batches * args.batch
        print(f"# {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; PostgreSQL; "
              f"{args.batches} batches of {args.batch}, {args.in_flight} in flight; tools {','.join(tools)}")
        await settle(gov_pid)
        backends = Backends(args.postgres, gov_pid)
        for label in ("new", "retry (all duplicates)"):
            await backends.mark()
            cpu0, pg0, t0 = cpu_seconds([gov_pid]), postgres_cpu_seconds(), time.perf_counter()
            own0 = time.process_time()
            recorded = await send(addr["governance"], agent_key, payloads, args.in_flight)
            elapsed, cpu_sent = time.perf_counter() - t0, cpu_seconds([gov_pid]) - cpu0
            sender = time.process_time() - own0
            mine_sent = await backends.seconds()
            await settle(gov_pid)
            cpu_all, pg = cpu_seconds([gov_pid]) - cpu0, postgres_cpu_seconds() - pg0
            mine = await backends.seconds()
            print(f"{label:24} {n / elapsed:>8.0f} decisions/s  recorded {recorded}  governance CPU "
                  f"{cpu_sent / n * 1e6:.1f} µs/decision while sending, {cpu_all / n * 1e6:.1f} with its relays; "
                  f"PostgreSQL {pg / n * 1e6:.1f} µs/decision (all its processes; governance's backends "
                  f"{mine_sent / n * 1e6:.1f} while sending, {mine / n * 1e6:.1f} with the relays); "
                  f"the sender (grpc.aio, prebuilt bytes, {len(payloads[0]) / args.batch:.0f} B/decision) "
                  f"{sender / n * 1e6:.1f} µs/decision")
        conn = await asyncpg.connect(args.postgres)
        gov = schemas["governance"]
        rows = await conn.fetchval(f'SELECT count(*) FROM "{gov}".decisions')
        sizes = await conn.fetchrow(f'SELECT avg(octet_length(request)) AS request, avg(octet_length(agent)) AS agent, '
                                    f'avg(octet_length(response)) AS response FROM "{gov}".decisions')
        outbox = await conn.fetchval(f'SELECT avg(octet_length(payload)) FROM "{gov}".outbox_messages')
        if os.environ.get("SHIP_SCANS"):
            for r in await conn.fetch("SELECT relname, seq_scan, seq_tup_read, idx_scan, idx_tup_fetch FROM "
                                      "pg_stat_user_tables WHERE schemaname = $1 AND (seq_scan > 0 OR idx_scan > 0)", gov):
                print(dict(r))
        await conn.close()
        print(f"decision log rows in governance: {rows} (expected {n + 2 * args.batch + len(tools)}); bytes per row: "
              f"request {sizes['request']:.0f}, agent {sizes['agent']:.0f}, response {sizes['response']:.0f}; "
              f"outbox payload {outbox:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default=os.environ.get("ARM_TEST_POSTGRES_URL",
                                                             "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=2)
    parser.add_argument("--tools", default=",".join(TOOLS), help="the tools decided, round robin (default: "
                        "sdk_local's, one in six a DENY)")
    parser.add_argument("--telemetry", action="store_true", help="a telemetry process too: governance's op_event "
                        "relay derives and delivers every decision's opEvent (counted in its CPU)")
    parser.add_argument("--no-analyze", action="store_true", help="measure on the never-analyzed new tables "
                        "(see `analyze`)")
    parser.add_argument("--profile-governance", default="", help="cProfile governance's process to this file")
    asyncio.run(orchestrate(parser.parse_args()))


if __name__ == "__main__":
    main()
