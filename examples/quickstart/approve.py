"""The approvers' terminal: each approver approves the agent's pending approvals.

    python examples/quickstart/approve.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import load_env  # noqa: E402

from arm.governance.v1 import approvals_pb2 as apb  # noqa: E402
from arm_client import ArmSync  # noqa: E402


def main() -> int:
    load_env()
    keys = os.environ["ARM_QUICKSTART_APPROVER_KEYS"].split(",")
    with ArmSync(api_key=keys[0]) as approver:
        for _ in range(300):  # wait up to a minute for the agent to ask
            pending = approver.call(lambda s: s.approvals.ListApprovals, apb.ListApprovalsRequest(
                statuses=[apb.APPROVAL_STATUS_PENDING, apb.APPROVAL_STATUS_ESCALATED],
                instance_id=os.environ["ARM_INSTANCE_ID"])).approvals
            if pending:
                break
            time.sleep(0.2)
    if not pending:
        print("nothing to approve")
    for a in pending:
        for n, key in enumerate(keys[:a.required_decisions], 1):
            with ArmSync(api_key=key) as approver:
                approver.call(lambda s: s.approvals.DecideApproval, apb.DecideApprovalRequest(
                    approval_id=a.approval_id, verdict=apb.APPROVAL_VERDICT_APPROVE, reason="looks right"))
            print(f"approver {n} approved {a.approval_id}: {a.tool_name} ({a.justification})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
