"""The decision log's group commit alone, in process, on PostgreSQL: CPU per decision by batch
size, so the fixed cost of a batch (the statement, its round trip, the commit) and the cost of
one more decision in it can be read apart. This is what `ARM_DECISION_GATHER_MS` trades on: a
governance process busy deciding writes small batches unless the writer waits for company.

For each batch size k, `--rounds` bursts of k concurrent `DecisionLog.append`s of Check-sized
ALLOW decisions (nothing else runs in the process, so its CPU time is the log's), then this
process's and PostgreSQL's CPU per decision.

  .venv/bin/python bench/decision_log.py [--postgres URL] [--rounds 2000] [--sizes 1,2,4,8,16,32]

Prints figures; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from check_grpc import postgres_cpu_seconds  # noqa: E402

from arm.governance.v1 import decision_pb2, policy_pb2  # noqa: E402
from arm_common.config import ServiceConfig  # noqa: E402
from arm_common.ids import new_id  # noqa: E402
from arm_common.tables import utcnow  # noqa: E402
from arm_governance import app as governance_app  # noqa: E402
from arm_governance.decisions.log import DecisionLog, PendingDecision  # noqa: E402


def pending(tenant: str) -> PendingDecision:
    """An ALLOW about the size of check_grpc.py's: a reason, the deciding rule, ids, the request."""
    decision_id = new_id("dec")
    now = utcnow()
    response = decision_pb2.CheckResponse(
        decision=policy_pb2.DECISION_ALLOW, effective_risk=1, step=5, scope=3, scope_id="ver_" + "0" * 26,
        envelope_id="pol_" + "0" * 26, envelope_revision=1, rule_kind=1, rule_index=0,
        rule_description="fs.read -> ALLOW", decision_id=decision_id, policy_epoch=7,
        reasons=[policy_pb2.Reason(code="TOOL_RULE", message="fs.read is allowed by the version's envelope")])
    response.decide_time.GetCurrentTime()
    request = decision_pb2.CheckRequest(instance_id="ins_" + "1" * 26, tool_name="fs.read", run_id="run-1",
                                        tool_call_id=secrets.token_hex(8))
    record = dict(
        id=decision_id, tenant_id=tenant, request_id=None, instance_id="ins_" + "1" * 26, legacy_agent_id="",
        version_id="ver_" + "0" * 26, project_id="prj_" + "0" * 26, run_id="run-1",
        tool_call_id=request.tool_call_id, tool_name="fs.read", decision=1, step=5, risk=1, policy_epoch=7,
        approval_id="", request=request.SerializeToString(), agent=b"a" * 250, decided_at=now)
    return PendingDecision(record=record, response=response)


async def main(args: argparse.Namespace) -> None:
    import asyncpg

    schema = f"bench_dlog_{secrets.token_hex(4)}"
    config = ServiceConfig.from_env("governance", {"ARM_GOVERNANCE_DATABASE_URL": args.postgres,
                                                   "ARM_DATABASE_SCHEMA": schema})
    db = governance_app.database(config)
    try:
        await governance_app.migrate(db)
        log = DecisionLog(db, [], gather_s=0)
        await log.start()
        print(f"# PostgreSQL {args.postgres}; {args.rounds} bursts per batch size; load average "
              f"{os.getloadavg()[0]:.1f}")
        print(f"{'batch':>5} {'decisions/s':>12} {'CPU us/decision':>16} {'pg us/decision':>15}")
        for _ in range(2):  # warm up: the statement prepared, the connection open
            await asyncio.gather(*(log.append(pending("ten_bench")) for _ in range(4)))
        for k in args.sizes:
            items = [[pending("ten_bench") for _ in range(k)] for _ in range(args.rounds)]
            cpu0, pg0, t0 = time.process_time(), postgres_cpu_seconds(), time.perf_counter()
            for burst in items:
                await asyncio.gather(*(log.append(p) for p in burst))
            n = k * args.rounds
            cpu, pg, wall = time.process_time() - cpu0, postgres_cpu_seconds() - pg0, time.perf_counter() - t0
            print(f"{k:>5} {n / wall:>12.0f} {cpu / n * 1e6:>16.1f} {pg / n * 1e6:>15.1f}", flush=True)
        await log.stop()
    finally:
        await db.engine.dispose()
        conn = await asyncpg.connect(args.postgres)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default=os.environ.get("ARM_TEST_POSTGRES_URL",
                                                             "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16, 32])
    asyncio.run(main(parser.parse_args()))
