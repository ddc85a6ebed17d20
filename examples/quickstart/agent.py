"""A scripted agent with three governed tools — one allowed, one denied, one that needs a human
approval — inside one run, ending with the run's trace from telemetry.

    python examples/quickstart/agent.py            # approve from a second terminal: approve.py
    python examples/quickstart/agent.py --approve  # or let the approver approve right away
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import load_env  # noqa: E402

from arm.governance.v1 import approvals_pb2  # noqa: E402
from arm.telemetry.v1 import events_pb2  # noqa: E402
from arm_client import ArmError, ArmSync, ToolDenied  # noqa: E402


def approve_in_background(approval_id: str) -> None:
    """--approve: the approvers (other operators, with their own keys) approve."""
    def approve() -> None:
        for n, key in enumerate(os.environ["ARM_QUICKSTART_APPROVER_KEYS"].split(","), 1):
            with ArmSync(api_key=key) as approver:
                approver.call(lambda s: s.approvals.DecideApproval, approvals_pb2.DecideApprovalRequest(
                    approval_id=approval_id, verdict=approvals_pb2.APPROVAL_VERDICT_APPROVE, reason="--approve"))
            print(f"  [approver {n}] approved {approval_id}", flush=True)
    threading.Thread(target=approve, daemon=True).start()


def settled_trace(admin: ArmSync, run_id: str, *, decisions: int, wait_s: float = 10.0) -> list[events_pb2.OpEvent]:
    """The run's trace once it holds its decisions' events. The SDK's own events are flushed
    above; governance forwards each decision's event (DECISION_MADE, or TOOL_CALL_BLOCKED for a
    DENY) from its decision log a few times a second, so they may arrive a moment later."""
    decided = (events_pb2.OP_EVENT_TYPE_DECISION_MADE, events_pb2.OP_EVENT_TYPE_TOOL_CALL_BLOCKED)
    deadline = time.monotonic() + wait_s
    while True:
        trace = admin.run_trace(run_id)
        if sum(e.type in decided for e in trace) >= decisions or time.monotonic() > deadline:
            return trace
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--approve", action="store_true", help="approve the refund as the approver")
    args = parser.parse_args()
    load_env()
    arm = ArmSync()  # ARM_ADDRESS, ARM_API_KEY and ARM_INSTANCE_ID from the environment

    def waiting(approval_id: str) -> None:
        print(f"  waiting for approval {approval_id}"
              + ("" if args.approve else " — run `python examples/quickstart/approve.py` in another terminal"),
              flush=True)
        if args.approve:
            approve_in_background(approval_id)

    @arm.governed(name="docs.search")
    def search_docs(query: str) -> str:
        return f"3 articles about {query!r}"

    @arm.governed(name="db.drop_table")
    def drop_table(table: str) -> None:
        raise AssertionError("governance never lets this run")

    @arm.governed(name="orders.refund", approval_timeout_s=600, on_pending=waiting)
    def refund(order: str, amount_usd: float) -> str:
        return f"refunded {amount_usd:.2f} USD on {order}"

    try:
        with arm.run("quickstart") as run:
            print("docs.search     →", search_docs("refund policy"))
            try:
                drop_table("customers")
            except ToolDenied as denied:
                print("db.drop_table   → DENIED:", denied.sentences)
            print("orders.refund   → needs approval")
            print("orders.refund   →", refund("order-17", 30.0))
            arm.report_cost(0.02, note="model tokens")
        arm.flush()
        admin = ArmSync(api_key=os.environ["ARM_QUICKSTART_ADMIN_KEY"])
        print(f"\ntrace of {run.run_id}:")
        for event in settled_trace(admin, run.run_id, decisions=4):
            kind = events_pb2.OpEventType.Name(event.type).removeprefix("OP_EVENT_TYPE_")
            tool = event.payload["tool_name"] if "tool_name" in event.payload else ""
            print(f"  {event.occur_time.ToDatetime():%H:%M:%S.%f}  {kind:<20} {tool}")
        admin.close()
    except ArmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        arm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
