"""Check benchmark: throughput and p50/p99 latency of governance's `Check` over gRPC, next to a
bare grpc.aio echo server measured in the same run as the reference, and to the floor of
floor.py (grpc.aio plus one durable group-committed INSERT per batch, no ARM code).

Registry and governance run as their own processes on PostgreSQL; the load generator runs in
its own process. Each configuration is measured at 1 and at 64 calls in flight; with --workers N,
N governance processes serve one port (SO_REUSEPORT) and the load generator opens two channels
per worker so the kernel spreads connections over them (one channel with one process, as to the
echo and the floor; --check-channels overrides).

With `--cerbos` (or when bench/peers holds it: `make bench-peers` installs it), Cerbos's PDP
from the npm package @cerbos/cerbos-linux-x64 serves the same ten-case policy as scoped resource
policies (bench/peers/cerbos/) and is loaded by the same load generator through its gRPC
CheckResources; before measuring, each of the ten tools is asked of both and the run stops
unless every decision agrees. Cerbos's gRPC client (the PyPI package `cerbos`, pinned by
bench/peers/requirements.txt) is not in .venv: `make bench-peers` installs it into
bench/peers/.python, which this script puts on sys.path only when it measures Cerbos.

  .venv/bin/python bench/check_grpc.py [--postgres URL] [--seconds 5] [--workers 1 2] [--tools a,b] [--cerbos]

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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from arm.governance.v1 import decision_pb2, policy_pb2  # noqa: E402
from arm.registry.v1 import agents_pb2  # noqa: E402
from arm_common.outbox import TOPIC_OP_EVENT  # noqa: E402

ECHO_METHOD = "/bench.Echo/Echo"
PEERS = ROOT / "bench" / "peers"
CERBOS_BIN = PEERS / "node_modules" / "@cerbos" / "cerbos-linux-x64" / "cerbos-linux-x64"
CERBOS_CLIENT = PEERS / ".python"  # `make bench-peers`: pip install --no-deps --target (not .venv)
CERBOS_SCOPE = "acme.proj.ver"  # tenant acme, project proj, version ver: bench/peers/cerbos/*.yaml


# --- processes spawned by this script --------------------------------------------------------

class PassThrough(grpc.aio.ServerInterceptor):
    """A server interceptor that does nothing: what grpc.aio's interceptor machinery costs."""

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        return await continuation(handler_call_details)


async def echo_server(port: int, interceptor: bool = False) -> None:
    """A bare grpc.aio server that returns the request bytes: the floor for any unary RPC.
    With `interceptor`, a pass-through grpc.aio server interceptor runs on every call."""
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.aio.server(interceptors=[PassThrough()] if interceptor else None,
                             options=[("grpc.so_reuseport", 1)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


TOOLS = ("fs.read", "web.search", "db.write", "payments.send", "git.push", "docs.get",
         "shell.exec", "email.send", "deploy.prod", "kb.query")


def use_cerbos_client() -> None:
    """Puts Cerbos's gRPC client (bench/peers/.python) on sys.path, after .venv's site-packages,
    so the venv's googleapis-common-protos files win over any copy the client brought."""
    if not (CERBOS_CLIENT / "cerbos" / "svc" / "v1" / "svc_pb2_grpc.py").exists():
        raise SystemExit(f"Cerbos's Python gRPC client is not installed in {CERBOS_CLIENT}: run `make bench-peers` "
                         "(it installs bench/peers/requirements.txt there, never into .venv)")
    if str(CERBOS_CLIENT) not in sys.path:
        sys.path.append(str(CERBOS_CLIENT))


def cerbos_request(tool: str, risk: int, principal: str) -> Any:
    """Cerbos's question for one call: may agent `principal` `call` tool `tool` (kind `tool`, in
    the version's scope, with the risk ARM rated it), and else `request_approval` for it."""
    from cerbos.engine.v1 import engine_pb2
    from cerbos.request.v1 import request_pb2
    from google.protobuf import struct_pb2

    return request_pb2.CheckResourcesRequest(
        request_id="bench", principal=engine_pb2.Principal(id=principal, roles=["agent"]),
        resources=[request_pb2.CheckResourcesRequest.ResourceEntry(
            actions=["call", "request_approval"],
            resource=engine_pb2.Resource(kind="tool", id=tool, scope=CERBOS_SCOPE,
                                         attr={"risk": struct_pb2.Value(number_value=risk)}))])


def cerbos_decision(response: Any) -> str:
    """ARM's decision name for Cerbos's answer: `call` allowed is ALLOW, else `request_approval`
    allowed is NEEDS_APPROVAL, else DENY."""
    from cerbos.effect.v1 import effect_pb2

    actions = response.results[0].actions
    if actions["call"] == effect_pb2.EFFECT_ALLOW:
        return "ALLOW"
    return "NEEDS_APPROVAL" if actions["request_approval"] == effect_pb2.EFFECT_ALLOW else "DENY"


def cerbos_stub(channel: grpc.aio.Channel) -> Any:
    from cerbos.svc.v1 import svc_pb2_grpc

    return svc_pb2_grpc.CerbosServiceStub(channel).CheckResources


async def load(address: str, key: str, instance: str, in_flight: int, seconds: float,
               channels: int, echo: bool, client_interceptors: bool = False,
               tools: tuple[str, ...] = TOOLS, cerbos_risks: dict[str, int] | None = None) -> dict[str, float]:
    """Runs `in_flight` concurrent callers for `seconds`; returns calls/s, p50 and p99 in ms.
    Echo and Check clients are the same: no client interceptors, the key sent as call metadata.
    `client_interceptors` instead adds the key through arm_client's grpc.aio client
    interceptors (how the load generator worked until 2026-11-24), for comparison.
    With `cerbos_risks` (tool -> risk), the calls are Cerbos CheckResources instead."""
    from arm_client import auth_interceptors

    chans = [grpc.aio.insecure_channel(address, interceptors=auth_interceptors(key) if client_interceptors else None,
                                       options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(channels)]
    metadata = None if client_interceptors else (("authorization", f"Bearer {key}"),)
    requests = [decision_pb2.CheckRequest(instance_id=instance, tool_name=t, run_id="bench-run",
                                          arguments=None) for t in tools]
    if cerbos_risks is not None:
        metadata = None
        requests = [cerbos_request(t, cerbos_risks[t], instance or "agent") for t in tools]
    calls = []
    for ch in chans:
        if cerbos_risks is not None:
            calls.append(cerbos_stub(ch))
        elif echo:
            calls.append(ch.unary_unary(ECHO_METHOD, request_serializer=None, response_deserializer=None))
        else:
            from arm.governance.v1 import decision_pb2_grpc
            calls.append(decision_pb2_grpc.DecisionServiceStub(ch).Check)
    payloads = [r.SerializeToString() for r in requests] if echo else requests
    latencies: list[float] = []

    async def worker(n: int) -> None:
        call = calls[n % len(calls)]
        i = n
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await call(payloads[i % len(payloads)], metadata=metadata)
            latencies.append(time.perf_counter() - t0)
            i += 1

    deadline = time.perf_counter() + min(1.0, seconds / 5)  # warm-up
    await asyncio.gather(*(worker(n) for n in range(in_flight)))
    warm_up_calls = len(latencies)
    latencies.clear()
    deadline = time.perf_counter() + seconds
    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(n) for n in range(in_flight)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    for ch in chans:
        await ch.close()
    latencies.sort()
    return {"calls_per_s": len(latencies) / elapsed, "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000, "calls": len(latencies),
            "all_calls": len(latencies) + warm_up_calls, "client_cpu_us": cpu / max(1, len(latencies)) * 1e6}


# --- orchestration ---------------------------------------------------------------------------

def start_cerbos(grpc_port: int, http_port: int, log: Path) -> subprocess.Popen[bytes]:
    """Cerbos's PDP on the policies of bench/peers/cerbos (disk store, no audit log: its default),
    from the npm package that `make bench-peers` installs."""
    if not CERBOS_BIN.exists():
        raise SystemExit(f"{CERBOS_BIN} is missing: run `make bench-peers` (or `npm ci --prefix bench/peers`)")
    return subprocess.Popen([str(CERBOS_BIN), "server", f"--set=server.grpcListenAddr=127.0.0.1:{grpc_port}",
                             f"--set=server.httpListenAddr=127.0.0.1:{http_port}", "--set=storage.driver=disk",
                             f"--set=storage.disk.directory={PEERS / 'cerbos'}",
                             "--set=storage.disk.watchForChanges=false"],
                            env={**os.environ, "CERBOS_NO_TELEMETRY": "1"}, cwd=PEERS,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115


async def compare_decisions(gov_address: str, key: str, instance: str, cerbos_address: str,
                            tools: tuple[str, ...]) -> dict[str, int]:
    """Asks ARM's Check and then Cerbos about each tool (Cerbos with the risk ARM rated the
    call); returns tool -> risk, or stops the run when a decision differs."""
    from arm.governance.v1 import decision_pb2_grpc

    risks: dict[str, int] = {}
    rows = []
    async with grpc.aio.insecure_channel(gov_address) as arm_ch, grpc.aio.insecure_channel(cerbos_address) as c_ch:
        check, cerbos = decision_pb2_grpc.DecisionServiceStub(arm_ch).Check, cerbos_stub(c_ch)
        for tool in tools:
            answer = await check(decision_pb2.CheckRequest(instance_id=instance, tool_name=tool, run_id="bench-run"),
                                 metadata=(("authorization", f"Bearer {key}"),))
            risks[tool] = answer.effective_risk
            rows.append((tool, policy_pb2.Decision.Name(answer.decision).removeprefix("DECISION_"),
                         cerbos_decision(await cerbos(cerbos_request(tool, answer.effective_risk, instance)))))
    print("# decisions, ARM / Cerbos: " + ", ".join(f"{t} {a}" + ("" if a == c else f" / {c} (DIFFERS)")
                                                  for t, a, c in rows))
    if any(a != c for _, a, c in rows):
        raise SystemExit("ARM and Cerbos decide differently: the two policies are not the same")
    return risks


def check_channels(args: argparse.Namespace, workers: int) -> int:
    """The load generator's channels to governance: one, as to the echo and the floor, with one
    process; two per process with several, so the kernel spreads connections over them."""
    return args.check_channels or (1 if workers == 1 else 2 * workers)


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=open(log, "ab"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)


def _proc_stat(stat: Path) -> tuple[str, list[int]] | None:
    """A process's name and its CPU clock ticks (utime, stime, cutime, cstime) from /proc; None
    when it is gone or there is no /proc."""
    try:
        name, rest = stat.read_text().split(" (", 1)[1].rsplit(")", 1)
    except (OSError, IndexError, ValueError):
        return None
    return name, [int(v) for v in rest.split()[11:15]]


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time the processes have used so far (Linux /proc; 0 elsewhere)."""
    stats = [_proc_stat(Path(f"/proc/{pid}/stat")) for pid in pids]
    if any(s is None for s in stats):
        return 0.0
    return sum(ticks[0] + ticks[1] for _, ticks in filter(None, stats)) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float:
    """CPU time of the local PostgreSQL server's processes, exited backends included (the
    postmaster's children's times); 0 when PostgreSQL is not on this machine (Linux /proc)."""
    stats = filter(None, map(_proc_stat, Path("/proc").glob("[0-9]*/stat")))
    return sum(sum(ticks) for name, ticks in stats if name == "postgres") / os.sysconf("SC_CLK_TCK")


def run_load(address: str, key: str, instance: str, in_flight: int, seconds: float, channels: int,
             echo: bool, server_pids: list[int], client_interceptors: bool = False,
             tools: tuple[str, ...] = TOOLS, cerbos_risks: dict[str, int] | None = None) -> dict[str, float]:
    """Runs the load generator; adds the servers' CPU microseconds per call (warm-up included)."""
    cpu0, pg0 = cpu_seconds(server_pids), postgres_cpu_seconds()
    out = subprocess.run([sys.executable, __file__, "--load", address, "--key", key, "--instance", instance,
                          "--in-flight", str(in_flight), "--seconds", str(seconds),
                          "--channels", str(channels), "--tools", ",".join(tools)] + (["--echo"] if echo else [])
                         + (["--client-interceptors"] if client_interceptors else [])
                         + (["--cerbos-risks", json.dumps(cerbos_risks)] if cerbos_risks is not None else []),
                         check=True, capture_output=True, text=True, cwd=ROOT)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    result["cpu_us"] = (cpu_seconds(server_pids) - cpu0) / max(1, result["all_calls"]) * 1e6
    result["pg_cpu_us"] = (postgres_cpu_seconds() - pg0) / max(1, result["all_calls"]) * 1e6
    return result


async def setup_world(address: str, key: str, gov_address: str) -> str:
    """A tenant policy set of ten cases over tenant, project and version scopes; one ACTIVE agent."""
    from arm_client import ArmClient
    from tests.helpers import approved_version

    async with ArmClient(address, key) as reg, ArmClient(gov_address, key) as gov:
        agents = await approved_version(reg)
        inst = (await reg.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
            version_id=agents.version.id, environment_id=agents.environment.id, name="bench"))).agent_instance
        await reg.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
            id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))
        P = policy_pb2
        envelopes = [
            P.PolicyEnvelope(name="tenant guard", scope=P.POLICY_SCOPE_TENANT, mode=P.POLICY_MODE_ENFORCE,
                             deny_at_risk=4, tool_rules=[
                                 P.ToolRule(tool="db.drop*", effect=P.DECISION_DENY, locked=True),
                                 P.ToolRule(tool="payments.**", effect=P.DECISION_NEEDS_APPROVAL, locked=True)]),
            P.PolicyEnvelope(name="project rules", scope=P.POLICY_SCOPE_PROJECT, scope_id=agents.project.id,
                             mode=P.POLICY_MODE_ENFORCE, require_approval_at_risk=3, tool_rules=[
                                 P.ToolRule(tool="git.*", effect=P.DECISION_ALLOW),
                                 P.ToolRule(tool="shell.exec", effect=P.DECISION_NEEDS_APPROVAL)]),
            P.PolicyEnvelope(name="version rules", scope=P.POLICY_SCOPE_VERSION, scope_id=agents.version.id,
                             mode=P.POLICY_MODE_ENFORCE, autonomy_tier=3, tool_rules=[
                                 P.ToolRule(tool="fs.read", effect=P.DECISION_ALLOW),
                                 P.ToolRule(tool="**", effect=P.DECISION_ALLOW,
                                            when=P.ToolRuleCondition(min_risk=1))]),
            P.PolicyEnvelope(name="shadow", scope=P.POLICY_SCOPE_TENANT, mode=P.POLICY_MODE_SHADOW,
                             default_effect=P.DECISION_DENY),
        ]
        for env in envelopes:
            await gov.policies.CreatePolicyEnvelope(P.CreatePolicyEnvelopeRequest(envelope=env))
        return inst.id


async def logged(postgres: str, schema: str) -> tuple[int, int]:
    """Decisions logged and group commits so far: without telemetry here, each commit's op_event
    marker row (one per tenant and batch, decisions/op_events.py) stays in the outbox."""
    import asyncpg
    conn = await asyncpg.connect(postgres)
    try:
        row = await conn.fetchrow(f'SELECT (SELECT count(*) FROM "{schema}".decisions), '
                                  f'(SELECT count(*) FROM "{schema}".outbox_messages WHERE topic = $1)', TOPIC_OP_EVENT)
        return int(row[0]), int(row[1])
    finally:
        await conn.close()


async def orchestrate(args: argparse.Namespace) -> None:
    import asyncpg

    from tests.processes import base_env, free_port, wait_serving
    tmp = Path(tempfile.mkdtemp(prefix="arm-bench-check-"))
    suffix = secrets.token_hex(4)
    schemas = {"registry": f"bench_reg_{suffix}", "governance": f"bench_gov_{suffix}"}
    procs: list[subprocess.Popen[bytes]] = []
    log = tmp / "services.log"
    try:
        reg_port = free_port()
        reg_env = base_env(ARM_REGISTRY_LISTEN=f"127.0.0.1:{reg_port}", ARM_LOG_LEVEL="WARNING",
                           ARM_REGISTRY_DATABASE_URL=args.postgres, ARM_DATABASE_SCHEMA=schemas["registry"])
        for cmd in (["migrate"], ["bootstrap"]):
            subprocess.run([sys.executable, "-m", "arm_registry", *cmd], env=reg_env, cwd=ROOT, check=True,
                           stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        key = log.read_text().split("(shown once): ")[1].split()[0]
        procs.append(spawn(["-m", "arm_registry"], reg_env, log))
        await wait_serving(f"127.0.0.1:{reg_port}", procs[-1], log)
        echo_port = free_port()
        procs.append(spawn([__file__, "--echo-server", str(echo_port)], base_env(), log))
        echo_pid = procs[-1].pid
        floor_port = free_port()
        procs.append(spawn([str(ROOT / "bench" / "floor.py"), "--serve", "commit", "--port", str(floor_port),
                            "--postgres", args.postgres, "--table", f"{schemas['governance']}_floor"],
                           base_env(), log))
        floor_pid = procs[-1].pid
        use_cerbos = CERBOS_BIN.exists() and CERBOS_CLIENT.exists() if args.cerbos is None else args.cerbos
        if use_cerbos:
            use_cerbos_client()
            cerbos_port = free_port()
            procs.append(start_cerbos(cerbos_port, free_port(), log))
            cerbos_pid = procs[-1].pid
            await wait_serving(f"127.0.0.1:{cerbos_port}", procs[-1], log)
        if args.echo_interceptor:
            icpt_port = free_port()
            procs.append(spawn([__file__, "--echo-server", str(icpt_port), "--with-interceptor"], base_env(), log))
            icpt_pid = procs[-1].pid
        print(f"# {os.cpu_count()} cores; PostgreSQL {args.postgres}; {args.seconds:.0f}s per point; "
              f"load generator in its own process; tools {args.tools}")
        print(f"{'target':34} {'in flight':>9} {'calls/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'CPU us':>7} {'client':>7} {'pg':>5}"
              "   (CPU us per call: the server processes'; client: the load generator's; pg: PostgreSQL's)")
        await asyncio.sleep(1)
        echo, floor = {}, {}
        for n in args.points:
            echo[n] = run_load(f"127.0.0.1:{echo_port}", key, "", n, args.seconds, 1, True, [echo_pid])
            r = echo[n]
            print(f"{'grpc.aio echo (reference)':34} {n:>9} {r['calls_per_s']:>9.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}"
                  f" {r['cpu_us']:>7.0f} {r['client_cpu_us']:>7.0f} {r['pg_cpu_us']:>5.0f}")
            floor[n] = r = run_load(f"127.0.0.1:{floor_port}", key, "", n, args.seconds, 1, False, [floor_pid])
            print(f"{'floor (floor.py commit)':34} {n:>9} {r['calls_per_s']:>9.0f} {r['p50_ms']:>7.2f}"
                  f" {r['p99_ms']:>7.2f} {r['cpu_us']:>7.0f} {r['client_cpu_us']:>7.0f} {r['pg_cpu_us']:>5.0f}"
                  f"   ({r['calls_per_s'] / echo[n]['calls_per_s']:.2f}x echo throughput,"
                  f" {r['p50_ms'] / echo[n]['p50_ms']:.2f}x echo p50)")
            if args.echo_interceptor:
                r = run_load(f"127.0.0.1:{icpt_port}", key, "", n, args.seconds, 1, True, [icpt_pid])
                print(f"{'echo + pass-through interceptor':34} {n:>9} {r['calls_per_s']:>9.0f} {r['p50_ms']:>7.2f}"
                      f" {r['p99_ms']:>7.2f} {r['cpu_us']:>7.0f} {r['client_cpu_us']:>7.0f} {r['pg_cpu_us']:>5.0f}")
        instance = None
        risks: dict[str, int] | None = None
        tools = tuple(args.tools.split(","))
        # With --compare-gather MS..., each worker count also runs with ARM_DECISION_GATHER_MS set to
        # each MS (0: the decision log's gathering off), right after the default: all in one run.
        variants = [(w, gather) for w in args.workers for gather in [None, *args.compare_gather]]
        for workers, gather in variants:
            gov_port = free_port()
            gov_env = base_env(ARM_GOVERNANCE_LISTEN=f"127.0.0.1:{gov_port}", ARM_LOG_LEVEL="WARNING",
                               ARM_GOVERNANCE_DATABASE_URL=args.postgres,
                               ARM_DATABASE_SCHEMA=schemas["governance"],
                               ARM_REGISTRY_ADDRESS=f"127.0.0.1:{reg_port}", ARM_SERVICE_API_KEY=key,
                               **({"ARM_DECISION_GATHER_MS": gather} if gather is not None else {}))
            subprocess.run([sys.executable, "-m", "arm_governance", "migrate"], env=gov_env, cwd=ROOT,
                           check=True, stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
            gov_procs = [spawn(["-m", "arm_governance"], gov_env, log) for _ in range(workers)]
            procs.extend(gov_procs)
            for p in gov_procs:
                await wait_serving(f"127.0.0.1:{gov_port}", p, log)
            if instance is None:
                instance = await setup_world(f"127.0.0.1:{reg_port}", key, f"127.0.0.1:{gov_port}")
                if use_cerbos:
                    risks = await compare_decisions(f"127.0.0.1:{gov_port}", key, instance,
                                                    f"127.0.0.1:{cerbos_port}", tools)
            for n, old_client in [(n, old) for n in args.points for old in (False, True)
                                  if not old or args.compare_client]:
                spy = None
                if args.profile and n == args.profile_at and not old_client:
                    # py-spy (not a dependency: pip install it into the venv) samples the first
                    # governance process while the load runs.
                    spy = subprocess.Popen(  # noqa: ASYNC220 - the load below blocks anyway
                        [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(gov_procs[0].pid),
                         "--duration", str(int(args.seconds)), "--rate", "250",
                         *(["--native"] if args.profile_native else ["--nonblocking"]), "--format", "raw",
                         "-o", f"{args.profile}-w{workers}.txt"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                logged0 = await logged(args.postgres, schemas["governance"])
                r = run_load(f"127.0.0.1:{gov_port}", key, instance, n, args.seconds, check_channels(args, workers), False,
                             [p.pid for p in gov_procs], old_client, tools)
                logged1 = await logged(args.postgres, schemas["governance"])
                if spy is not None:
                    spy.wait(60)
                label = f"Check, {workers} governance process{'es' if workers > 1 else ''}"
                label += " (client icpt)" if old_client else ""
                label += f" (gather {gather} ms)" if gather is not None else ""
                print(f"{label:34} {n:>9} {r['calls_per_s']:>9.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}"
                      f" {r['cpu_us']:>7.0f} {r['client_cpu_us']:>7.0f} {r['pg_cpu_us']:>5.0f}"
                      f"   ({r['calls_per_s'] / echo[n]['calls_per_s']:.2f}x echo throughput,"
                      f" {r['p50_ms'] / echo[n]['p50_ms']:.2f}x echo p50;"
                      f" {r['calls_per_s'] / floor[n]['calls_per_s']:.2f}x / {r['p50_ms'] / floor[n]['p50_ms']:.2f}x floor;"
                      f" {(logged1[0] - logged0[0]) / max(1, logged1[1] - logged0[1]):.1f} per commit)")
            for p in gov_procs:
                p.terminate()
                p.wait(30)
        if use_cerbos and risks is not None:
            for n in args.points:
                r = run_load(f"127.0.0.1:{cerbos_port}", key, instance or "", n, args.seconds, 1, False,
                             [cerbos_pid], tools=tools, cerbos_risks=risks)
                print(f"{'Cerbos 0.55 PDP (peer, no log)':34} {n:>9} {r['calls_per_s']:>9.0f} {r['p50_ms']:>7.2f}"
                      f" {r['p99_ms']:>7.2f} {r['cpu_us']:>7.0f} {r['client_cpu_us']:>7.0f} {r['pg_cpu_us']:>5.0f}"
                      f"   ({r['calls_per_s'] / echo[n]['calls_per_s']:.2f}x echo throughput,"
                      f" {r['p50_ms'] / echo[n]['p50_ms']:.2f}x echo p50;"
                      f" {r['calls_per_s'] / floor[n]['calls_per_s']:.2f}x / {r['p50_ms'] / floor[n]['p50_ms']:.2f}x floor)")
        conn = await asyncpg.connect(args.postgres)
        mix = await conn.fetch(f'SELECT decision, count(*) AS n FROM "{schemas["governance"]}".decisions GROUP BY 1')
        await conn.close()
        names = {1: "ALLOW", 2: "DENY", 3: "NEEDS_APPROVAL"}
        total = sum(row["n"] for row in mix) or 1
        print("# decisions logged: " + ", ".join(f"{names.get(row['decision'], row['decision'])} "
                                                 f"{row['n'] * 100 / total:.0f}%" for row in sorted(mix)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(30)
        conn = await asyncpg.connect(args.postgres)
        await conn.execute(f'DROP TABLE IF EXISTS {schemas["governance"]}_floor')
        for schema in schemas.values():
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default=os.environ.get("ARM_TEST_POSTGRES_URL",
                                                             "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--check-channels", type=int, default=0,
                        help="channels to governance (default: 1 with one process, 2 per process with more)")
    parser.add_argument("--echo-interceptor", action="store_true",
                        help="also measure the echo with a pass-through grpc.aio server interceptor")
    parser.add_argument("--points", type=lambda v: [int(x) for x in v.split(",")], default=[1, 64],
                        help="calls in flight to measure at, comma-separated (default 1,64; the issue's targets are at these)")
    parser.add_argument("--compare-gather", nargs="+", default=[], metavar="MS",
                        help="also measure Check with ARM_DECISION_GATHER_MS=MS for each MS (0: gathering off)")
    parser.add_argument("--compare-client", action="store_true",
                        help="also measure Check with the key added by client interceptors (the old load generator)")
    parser.add_argument("--tools", default=",".join(TOOLS),
                        help="comma-separated tool names the load generator rotates (default: the ten of the mix)")
    parser.add_argument("--cerbos", action=argparse.BooleanOptionalAction, default=None,
                        help="measure Cerbos's PDP with the same policy (default: when bench/peers is installed)")
    parser.add_argument("--profile", help="py-spy raw samples of governance to PREFIX-wN.txt (see --profile-at)")
    parser.add_argument("--profile-at", type=int, choices=(1, 64), default=64,
                        help="with --profile, the number of calls in flight to sample at (default 64)")
    parser.add_argument("--profile-native", action="store_true", help="with --profile, include native frames")
    parser.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client-interceptors", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--with-interceptor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--key", default="", help=argparse.SUPPRESS)
    parser.add_argument("--instance", default="", help=argparse.SUPPRESS)
    parser.add_argument("--in-flight", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--channels", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cerbos-risks", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        asyncio.run(echo_server(args.echo_server, args.with_interceptor))
    elif args.load:
        if args.cerbos_risks:
            use_cerbos_client()
        result = asyncio.run(load(args.load, args.key, args.instance, args.in_flight, args.seconds,
                                  args.channels, args.echo, args.client_interceptors, tuple(args.tools.split(",")),
                                  json.loads(args.cerbos_risks) if args.cerbos_risks else None))
        print(json.dumps(result))
    else:
        if args.cerbos:
            use_cerbos_client()  # before any server starts: a missing client stops the run at once
        asyncio.run(orchestrate(args))


if __name__ == "__main__":
    main()
