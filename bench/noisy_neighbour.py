"""Noisy neighbour: tenant B's `Check` latency while tenant A hammers `Check` under the worst
policy the policy limits allow (arm_governance/limits.py, issue 10 item 1), next to the
references measured in the same run: B alone, and B while tenant C hammers at the same
concurrency with an ordinary policy, first with the ordinary tool mix, then with exactly A's kind
of calls (so the difference between the last two rows is what A's policy costs).

Registry and one governance process run on PostgreSQL; B's probe and the hammering tenant each
run in their own load-generator process. B calls `Check` one at a time (in flight 1) over a mix
of ordinary tools. A's worst legal policy: on each of its three scopes, the rule and argument
pattern maximums, globs of four wildcards with the maximum periodic literal tail, argument
patterns near the program bound on rules that match every tool; A's calls use 200-character
tool names of `a`, `b` and `.` that are new on every call (no memoised plan helps), with
arguments of --arg-bytes bytes (searched by every pattern).

  .venv/bin/python bench/noisy_neighbour.py [--postgres URL] [--seconds 10] [--in-flight 16]

Prints figures; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from arm.governance.v1 import decision_pb2, decision_pb2_grpc, policy_pb2  # noqa: E402
from arm.registry.v1 import agents_pb2, tenancy_pb2  # noqa: E402

ORDINARY = ("fs.read", "web.search", "db.write", "payments.send", "git.push", "docs.get",
            "shell.exec", "email.send", "deploy.prod", "kb.query")


MAX_TOOL_NAME = 200  # limits.MAX_TOOL_NAME; not imported, so --policy issue runs on older code


def hostile_name(rng: random.Random, n: int, issue: bool) -> str:
    if issue:  # the names of issue 10: `a`s, new on every call
        return "a" * (n - 6) + "".join(rng.choice("ab") for _ in range(6))
    return "".join(rng.choice("aaaab.") for _ in range(n - 6)) + f"{rng.randrange(16**6):06x}"


async def load(address: str, key: str, instance: str, in_flight: int, seconds: float,
               hostile: bool, arg_bytes: int, issue: bool = False) -> dict[str, float]:
    """`in_flight` concurrent callers for `seconds`; calls/s, p50 and p99 in ms."""
    from google.protobuf import struct_pb2

    channel = grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    check = decision_pb2_grpc.DecisionServiceStub(channel).Check
    metadata = (("authorization", f"Bearer {key}"),)
    rng = random.Random(os.getpid())
    arguments = None
    if hostile and arg_bytes:
        arguments = struct_pb2.Struct()
        arguments.update({"cmd": "".join(rng.choice("abcxyz0123456789") for _ in range(arg_bytes))})
    latencies: list[float] = []

    async def worker(n: int) -> None:
        i = n
        while time.perf_counter() < deadline:
            tool = hostile_name(rng, MAX_TOOL_NAME, issue) if hostile else ORDINARY[i % len(ORDINARY)]
            t0 = time.perf_counter()
            await check(decision_pb2.CheckRequest(instance_id=instance, tool_name=tool, arguments=arguments,
                                                  run_id="bench-run"), metadata=metadata)
            latencies.append(time.perf_counter() - t0)
            i += 1

    deadline = time.perf_counter() + min(1.0, seconds / 5)  # warm-up
    await asyncio.gather(*(worker(n) for n in range(in_flight)))
    latencies.clear()
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(in_flight)))
    elapsed = time.perf_counter() - started
    await channel.close()
    latencies.sort()
    return {"calls_per_s": len(latencies) / elapsed, "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000, "calls": len(latencies)}


def load_process(address: str, key: str, instance: str, in_flight: int, seconds: float,
                 hostile: bool, arg_bytes: int, issue: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, "--load", address, "--key", key, "--instance", instance,
                             "--in-flight", str(in_flight), "--seconds", str(seconds), "--arg-bytes", str(arg_bytes)]
                            + (["--hostile"] if hostile else []) + (["--policy", "issue"] if issue else []),
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)


def result(proc: subprocess.Popen[str]) -> dict[str, float]:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    parsed: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return parsed


async def new_tenant(reg_address: str, system_key: str) -> str:
    from arm_client import ArmClient
    async with ArmClient(reg_address, system_key) as admin:
        slug = f"bench-{secrets.token_hex(4)}"
        resp = await admin.tenancy.CreateTenant(tenancy_pb2.CreateTenantRequest(
            slug=slug, name=slug, admin_email=f"admin@{slug}.example", admin_name="Bench Admin"))
        return str(resp.admin_api_key)


async def agent_with_policy(reg_address: str, gov_address: str, key: str, worst: bool, issue: bool = False) -> str:
    from arm_client import ArmClient
    from tests.helpers import approved_version

    P = policy_pb2
    async with ArmClient(reg_address, key) as reg, ArmClient(gov_address, key) as gov:
        agents = await approved_version(reg)
        inst = (await reg.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
            version_id=agents.version.id, environment_id=agents.environment.id, name="bench"))).agent_instance
        await reg.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
            id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))
        scopes = ((P.POLICY_SCOPE_TENANT, ""), (P.POLICY_SCOPE_PROJECT, agents.project.id),
                  (P.POLICY_SCOPE_VERSION, agents.version.id))
        if worst and issue:
            # Issue 10's policy: 100 rules `a*a*a*` + `a`×i + `c`, spread over the three scopes so
            # that it is legal under today's limits too.
            rules = [P.ToolRule(tool="a*a*a*" + "a" * i + "c", effect=P.DECISION_DENY) for i in range(100)]
            per_scope = [rules[k::3] for k in range(3)]
            try:  # today's limits refuse most of them: keep what a tenant may still write
                from arm_governance.policy import limits
            except ImportError:  # the code before the fix: everything is accepted
                pass
            else:
                for k, kept in enumerate(per_scope):
                    ok = [r for r in kept if limits.glob_cost(r.tool) <= limits.MAX_GLOB_COST]
                    while sum(limits.glob_cost(r.tool) for r in ok) > limits.MAX_GLOB_COST_PER_SCOPE:
                        ok.pop()
                    per_scope[k] = ok
            print(f"# A's policy: {sum(map(len, per_scope))} of issue 10's 100 rules accepted")
            envelopes = [P.PolicyEnvelope(name=f"issue-{k}", scope=scope, scope_id=scope_id,
                                          mode=P.POLICY_MODE_ENFORCE, tool_rules=per_scope[k])
                         for k, (scope, scope_id) in enumerate(scopes)]
        elif worst:
            from arm_governance.policy import limits
            envelopes = [P.PolicyEnvelope(name=f"worst-{salt}", scope=scope, scope_id=scope_id,
                                          mode=P.POLICY_MODE_ENFORCE, tool_rules=limits.worst_legal_rules(salt))
                         for salt, (scope, scope_id) in enumerate(scopes)]
        else:  # the ordinary policy of bench/check_grpc.py
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
                                     P.ToolRule(tool="fs.read", effect=P.DECISION_ALLOW)]),
            ]
        for env in envelopes:
            await gov.policies.CreatePolicyEnvelope(P.CreatePolicyEnvelopeRequest(envelope=env))
        return str(inst.id)


async def orchestrate(args: argparse.Namespace) -> None:
    import asyncpg

    from tests.processes import base_env, free_port, wait_serving
    tmp = Path(tempfile.mkdtemp(prefix="arm-bench-noisy-"))
    suffix = secrets.token_hex(4)
    schemas = {"registry": f"bench_reg_{suffix}", "governance": f"bench_gov_{suffix}"}
    procs: list[subprocess.Popen[bytes]] = []
    log = tmp / "services.log"

    def spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, *cmd], env=env, cwd=ROOT, stdout=open(log, "ab"),  # noqa: SIM115
                                stderr=subprocess.STDOUT)

    try:
        reg_port, gov_port = free_port(), free_port()
        reg, gov = f"127.0.0.1:{reg_port}", f"127.0.0.1:{gov_port}"
        reg_env = base_env(ARM_REGISTRY_LISTEN=reg, ARM_LOG_LEVEL="WARNING",
                           ARM_REGISTRY_DATABASE_URL=args.postgres, ARM_DATABASE_SCHEMA=schemas["registry"])
        for cmd in (["migrate"], ["bootstrap"]):
            subprocess.run([sys.executable, "-m", "arm_registry", *cmd], env=reg_env, cwd=ROOT, check=True,
                           stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        system_key = log.read_text().split("(shown once): ")[1].split()[0]
        procs.append(spawn(["-m", "arm_registry"], reg_env))
        await wait_serving(reg, procs[-1], log)
        gov_env = base_env(ARM_GOVERNANCE_LISTEN=gov, ARM_LOG_LEVEL="WARNING",
                           ARM_GOVERNANCE_DATABASE_URL=args.postgres, ARM_DATABASE_SCHEMA=schemas["governance"],
                           ARM_REGISTRY_ADDRESS=reg, ARM_SERVICE_API_KEY=system_key)
        subprocess.run([sys.executable, "-m", "arm_governance", "migrate"], env=gov_env, cwd=ROOT, check=True,
                       stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        procs.append(spawn(["-m", "arm_governance"], gov_env))
        await wait_serving(gov, procs[-1], log)

        keys = {t: await new_tenant(reg, system_key) for t in "ABC"}
        issue = args.policy == "issue"
        instance = {"A": await agent_with_policy(reg, gov, keys["A"], worst=True, issue=issue),
                    "B": await agent_with_policy(reg, gov, keys["B"], worst=False),
                    "C": await agent_with_policy(reg, gov, keys["C"], worst=False)}
        print(f"# {os.cpu_count()} cores; PostgreSQL {args.postgres}; {args.seconds:.0f}s per row; one governance "
              f"process; B probes at 1 in flight; hammering tenants at {args.in_flight} in flight; "
              f"A's arguments {args.arg_bytes} bytes")
        print(f"{'tenant B Check while':46} {'B p50 ms':>9} {'B p99 ms':>9} {'B calls/s':>10}"
              f" {'hammer calls/s':>15} {'hammer p50 ms':>14}")
        rows = [("nobody else calls (reference)", None, False),
                ("C hammers, ordinary policy, mix (reference)", "C", False),
                ("C hammers, ordinary policy, A's calls (ref.)", "C", True),
                ("A hammers, issue 10's policy, A's calls" if issue
                 else "A hammers, worst legal policy, A's calls", "A", True)]
        for label, who, hostile in rows:
            hammer = None
            if who is not None:
                hammer = load_process(gov, keys[who], instance[who], args.in_flight, args.seconds + 2,
                                      hostile, args.arg_bytes if hostile and not issue else 0, issue)
                await asyncio.sleep(1.5)  # past the hammer's warm-up
            probe = load_process(gov, keys["B"], instance["B"], 1, args.seconds, False, 0)
            b = result(probe)
            h = result(hammer) if hammer is not None else None
            print(f"{label:46} {b['p50_ms']:>9.2f} {b['p99_ms']:>9.2f} {b['calls_per_s']:>10.0f}"
                  + (f" {h['calls_per_s']:>15.0f} {h['p50_ms']:>14.2f}" if h else f" {'-':>15} {'-':>14}"))
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
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--arg-bytes", type=int, default=4096)
    parser.add_argument("--policy", choices=("worst", "issue"), default="worst",
                        help="A's policy: the worst the limits allow, or issue 10's `a*a*a*c` rules "
                             "(which also runs on the code before the fix, for a before/after)")
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--key", default="", help=argparse.SUPPRESS)
    parser.add_argument("--instance", default="", help=argparse.SUPPRESS)
    parser.add_argument("--hostile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        print(json.dumps(asyncio.run(load(args.load, args.key, args.instance, args.in_flight, args.seconds,
                                          args.hostile, args.arg_bytes, args.policy == "issue"))))
    else:
        asyncio.run(orchestrate(args))


if __name__ == "__main__":
    main()
