"""Local decisions benchmark (issue 16 part 2): decisions per second one runtime process makes with
`Arm(local_decisions=True)` — the engine in process, each decision written to the spool file
(handed to the OS; fdatasync'ed in the background every 5 ms) before it is returned — at 64 and at 1 in flight, with p50/p99; and
whether shipping (`RecordLocalDecisions`) keeps up into governance on PostgreSQL: during those
points, and at a paced point, 64 in flight at the target rate (10x Cerbos's checks/s at 64 in
flight, or --paced-rate) for --paced-seconds.

Registry and governance run as their own processes on PostgreSQL with `check_grpc.py`'s policy
set (`setup_world`); the runtime is this process. The reference, in the same run: Cerbos's PDP
when bench/check_grpc.py provides it (see `cerbos_reference`), else ARM's own remote `Check`
through `check_grpc.py`'s load generator (its own process) at 64 and at 1 in flight.

  .venv/bin/python bench/sdk_local.py [--postgres URL] [--seconds 5] [--spool-dir DIR] [--paced-rate N]

Prints figures; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from check_grpc import cpu_seconds, run_load  # noqa: E402
from stack import Backends, analyze, registry_and_governance  # noqa: E402

# Decided locally under setup_world's policy (ALLOW, and a locked DENY); NEEDS_APPROVAL tools
# (payments.send, shell.exec, deploy.prod) go to Check by design and are left out.
TOOLS = ("fs.read", "web.search", "git.push", "docs.get", "kb.query", "db.drop_table")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def local_rate(env: dict[str, str], spool_dir: str, in_flight: int, seconds: float,
                     gov_pid: int, postgres: str = "", schema: str = "", rate: float = 0.0) -> dict[str, Any]:
    """Decisions at `in_flight`, as fast as they come or, with `rate`, paced to that many a second
    (the calls start on a fixed schedule, shared by the workers); then the spool drained."""
    from arm_client import Arm

    arm = Arm(env=env, local_decisions=True, local_spool_dir=spool_dir, close_timeout_s=120,
              local_max_spool=10_000_000)
    assert await arm.wait_local_ready(30), "no decision inputs"
    local = arm.local
    assert local is not None
    args = [{"path": f"/srv/{t}"} for t in TOOLS]
    latencies: list[float] = []
    deadline = 0.0
    slot, first = 0, 0.0
    backlogs: list[int] = []

    async def worker(n: int) -> None:
        nonlocal slot
        i = n
        while time.perf_counter() < deadline:
            if rate:
                due, slot = first + slot / rate, slot + 1
                if due > time.perf_counter():
                    await asyncio.sleep(due - time.perf_counter())
            t0 = time.perf_counter()
            await arm.check(TOOLS[i % len(TOOLS)], args[i % len(TOOLS)], risk="LOW")
            latencies.append(time.perf_counter() - t0)
            i += 1

    async def sample() -> None:  # the spool's backlog every half second
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.5)
            backlogs.append(local.spool.pending)

    first = time.perf_counter()
    deadline = first + 1.0  # warm-up
    await asyncio.gather(*(worker(n) for n in range(in_flight)))
    if schema:
        await analyze(postgres, schema)
    latencies.clear()
    local_before, remote_before, shipped_before = local.local, local.remote, local.shipped
    started, cpu0 = time.perf_counter(), time.process_time()
    deadline, slot, first = started + seconds, 0, started
    await asyncio.gather(sample(), *(worker(n) for n in range(in_flight)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu0
    made = local.local - local_before
    shipped_during = local.shipped - shipped_before
    backlog = local.spool.pending
    compute = await decide_compute(local) if in_flight == 1 else 0.0
    backends = Backends(postgres, gov_pid) if postgres else None
    if backends is not None:
        await backends.mark()
    t0, gov_cpu0 = time.perf_counter(), cpu_seconds([gov_pid])
    drained = await local.drain(300)
    drain_s, gov_cpu = time.perf_counter() - t0, cpu_seconds([gov_pid]) - gov_cpu0
    pg_cpu = await backends.seconds() if backends is not None else 0.0
    await arm.close()
    return {"per_s": len(latencies) / elapsed, "p50_us": statistics.median(latencies) * 1e6,
            "p99_us": pct(latencies, 0.99) * 1e6, "local": made, "remote": local.remote - remote_before,
            "cpu_us": cpu / max(1, len(latencies)) * 1e6, "shipped_per_s": shipped_during / elapsed,
            "backlog": backlog, "backlogs": backlogs, "drain_s": drain_s, "drained": drained, "compute_us": compute,
            "gov_us": gov_cpu / max(1, backlog) * 1e6, "pg_us": pg_cpu / max(1, backlog) * 1e6}


async def decide_compute(local: Any) -> float:
    """p50 of `LocalDecider.decide` alone (no `Arm.check` around it: request building, the
    Decision): the engine on the streamed inputs, the response and spool record built, the
    record written to the spool file."""
    from arm.governance.v1 import decision_pb2

    instance = local._inputs.agent.instance_id
    times = []
    for i in range(20_000):
        tool = TOOLS[i % len(TOOLS)]
        args = {"path": f"/srv/{tool}"}
        request = decision_pb2.CheckRequest(tool_name=tool, instance_id=instance, declared_risk=1,
                                            tool_call_id=f"tc-{i}")
        request.arguments.update(args)
        t0 = time.perf_counter()
        assert await local.decide(request, args) is not None
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


async def cerbos_reference(gov_address: str, key: str, instance: str, seconds: float, log: Any,
                           pids: list[int]) -> float:
    """The Cerbos reference, in the same run: Cerbos's PDP (the binary of the npm package
    @cerbos/cerbos-linux-x64 that `make bench-peers` installs, on bench/peers/cerbos/), checked to
    decide TOOLS as ARM does (`compare_decisions`), then loaded by check_grpc.py's load generator
    at 64 and 1 in flight; prints its rows and returns its checks/s at 64 in flight. Without the
    binary it returns 0 and the reference is ARM's own remote Check."""
    import check_grpc

    from tests.processes import free_port, wait_serving

    peers: Any = check_grpc
    if not peers.CERBOS_BIN.exists():  # `make bench-peers` installs it
        return 0.0
    peers.use_cerbos_client()
    port = free_port()
    proc = peers.start_cerbos(port, free_port(), log)
    try:
        await wait_serving(f"127.0.0.1:{port}", proc, log)
        risks = await peers.compare_decisions(gov_address, key, instance, f"127.0.0.1:{port}", TOOLS)
        print("## reference: Cerbos's PDP (bench/peers, check_grpc.py's load generator, its own process)")
        at_64 = 0.0
        for in_flight in (64, 1):
            r = peers.run_load(f"127.0.0.1:{port}", key, instance, in_flight, seconds, 1, False,
                               [proc.pid, *pids], tools=TOOLS, cerbos_risks=risks)
            print(f"{'Cerbos PDP':28} {in_flight:>3} in flight {r['calls_per_s']:>9.0f}/s  "
                  f"p50 {r['p50_ms'] * 1000:>8.0f} µs  p99 {r['p99_ms'] * 1000:>8.0f} µs")
            at_64 = at_64 or r["calls_per_s"]
    finally:
        proc.terminate()
        proc.wait(30)
    return float(at_64)


async def orchestrate(args: argparse.Namespace) -> None:
    import asyncpg

    tmp = Path(tempfile.mkdtemp(prefix="arm-bench-local-"))
    async with registry_and_governance(args.postgres, "loc", tmp, profile_governance=args.profile_governance,
                                       telemetry=args.telemetry) as stack:
        addr, schemas, procs, log = stack.addr, stack.schemas, stack.procs, stack.log
        instance, agent_key = stack.instance, stack.agent_key
        env = {"ARM_REGISTRY_ADDRESS": addr["registry"], "ARM_GOVERNANCE_ADDRESS": addr["governance"],
               "ARM_TELEMETRY_ADDRESS": addr["governance"], "ARM_API_KEY": agent_key, "ARM_INSTANCE_ID": instance}
        spool_dir = args.spool_dir or str(tmp / "spool")
        print(f"# {os.cpu_count()} cores; PostgreSQL {args.postgres}; registry and governance in their own "
              f"processes, the runtime in this one; spool in {spool_dir}; tools {','.join(TOOLS)}")
        cerbos = 0.0
        if args.skip_reference:
            pass
        elif not (cerbos := await cerbos_reference(addr["governance"], agent_key, instance, args.seconds, log,
                                                   [p.pid for p in procs])):
            print("## reference: ARM's remote Check (check_grpc.py's load generator, its own process); "
                  "Cerbos is measured by bench/peers (not in this tree)")
            for in_flight in (64, 1):
                r: dict[str, Any] = run_load(addr["governance"], agent_key, instance, in_flight, args.seconds, 1, False,
                             [p.pid for p in procs], tools=TOOLS)
                print(f"{'remote Check':28} {in_flight:>3} in flight {r['calls_per_s']:>9.0f}/s  "
                      f"p50 {r['p50_ms'] * 1000:>8.0f} µs  p99 {r['p99_ms'] * 1000:>8.0f} µs")
        print("## local decisions (durable spool), this process")
        # The paced point: 64 in flight at the target rate (10x Cerbos's checks/s at 64 in flight,
        # measured above; or --paced-rate), to see whether shipping keeps up with it.
        paced = args.paced_rate or 10 * cerbos
        for in_flight, rate in ((64, 0.0), (1, 0.0), *(((64, paced),) if paced else ())):
            profiler = None
            if args.profile_runtime and in_flight == 64:
                import cProfile
                profiler = cProfile.Profile()
                profiler.enable()
            r = await local_rate(env, spool_dir, in_flight, args.seconds if not rate else args.paced_seconds,
                                 procs[1].pid, args.postgres, "" if args.no_analyze else schemas["governance"], rate)
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(args.profile_runtime)
            name = f"paced at {rate:.0f}/s" if rate else "Arm.check, local"
            print(f"{name:28} {in_flight:>3} in flight {r['per_s']:>9.0f}/s  "
                  f"p50 {r['p50_us']:>8.0f} µs  p99 {r['p99_us']:>8.0f} µs  runtime CPU {r['cpu_us']:.0f} µs/decision  "
                  f"({r['local']:.0f} local, {r['remote']:.0f} via Check)")
            if r["compute_us"]:
                print(f"{'':28} LocalDecider.decide alone (engine, response, spool write; no Arm.check "
                      f"around it): p50 {r['compute_us']:.1f} µs")
            print(f"{'':28} shipping: {r['shipped_per_s']:.0f}/s during the run, backlog at its end "
                  f"{r['backlog']:.0f}, drained in {r['drain_s']:.1f} s ({'all' if r['drained'] else 'NOT all'} logged; "
                  f"governance CPU {r['gov_us']:.0f} µs per drained decision, its PostgreSQL backends {r['pg_us']:.0f})")
            if rate:
                print(f"{'':28} backlog every 0.5 s: {', '.join(str(b) for b in r['backlogs'])}; shipping "
                      f"{'kept up' if r['shipped_per_s'] >= 0.95 * r['per_s'] else 'fell behind'} "
                      f"({r['shipped_per_s'] / max(1.0, r['per_s']):.2f}x the decisions made)")
        conn = await asyncpg.connect(args.postgres)
        n = await conn.fetchval(f'SELECT count(*) FROM "{schemas["governance"]}".decisions')
        await conn.close()
        print(f"decision log rows in governance: {n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default=os.environ.get("ARM_TEST_POSTGRES_URL",
                                                             "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--spool-dir", default="")
    parser.add_argument("--profile-governance", default="", help="cProfile governance's process to this file")
    parser.add_argument("--profile-runtime", default="", help="cProfile this process (64 in flight) to this file")
    parser.add_argument("--telemetry", action="store_true", help="a telemetry process too: governance's op_event "
                        "relay derives and delivers every decision's opEvent (counted in its CPU)")
    parser.add_argument("--no-analyze", action="store_true", help="measure on the never-analyzed new tables "
                        "(stack.analyze)")
    parser.add_argument("--skip-reference", action="store_true", help="no reference rows (profiling runs)")
    parser.add_argument("--paced-rate", type=float, default=0.0, help="decisions/s of the paced point (default: "
                        "10x Cerbos's checks/s at 64 in flight, when Cerbos is measured; else no paced point)")
    parser.add_argument("--paced-seconds", type=float, default=20.0, help="length of the paced point (default 20 s)")
    asyncio.run(orchestrate(parser.parse_args()))


if __name__ == "__main__":
    main()
