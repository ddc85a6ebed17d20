"""The approval rules every part of governance applies, in one place: how often an unanswered
approval escalates, how long each kind lives, how many approving decisions a risk needs, which
risk levels exist. A leaf module (decisions and approvals both import it; it imports neither)."""

from __future__ import annotations

from datetime import timedelta

from arm.common.v1 import common_pb2
from arm.governance.v1 import approvals_pb2 as apb

A = apb.ApprovalActionType

ESCALATE_EVERY = timedelta(minutes=30)
MAX_TTL = timedelta(days=30)
DEFAULT_TTL: dict[int, timedelta] = {
    A.APPROVAL_ACTION_TYPE_TOOL_EXECUTION: timedelta(hours=1),
    A.APPROVAL_ACTION_TYPE_INSTANCE_REACTIVATION: timedelta(hours=12),
    A.APPROVAL_ACTION_TYPE_INSTANCE_QUARANTINE: timedelta(hours=2),
    A.APPROVAL_ACTION_TYPE_VERSION_PROMOTION: timedelta(hours=48),
    A.APPROVAL_ACTION_TYPE_POLICY_AUTONOMY_INCREASE: timedelta(hours=72),
}
OTHER_TTL = timedelta(hours=24)  # DEPLOYMENT_ACTIVATION and anything added later
TOOL_APPROVAL_TTL = DEFAULT_TTL[A.APPROVAL_ACTION_TYPE_TOOL_EXECUTION]  # what Check creates
RISK_LEVELS: set[int] = set(common_pb2.RiskLevel.values()) - {common_pb2.RISK_LEVEL_UNSPECIFIED}
"""LOW, MEDIUM, HIGH, CRITICAL: the values a required risk field takes (0 = unset, where optional)."""


def default_ttl(action_type: int) -> timedelta:
    return DEFAULT_TTL.get(action_type, OTHER_TTL)


def required_decisions(risk: int) -> int:
    return 2 if risk >= common_pb2.RISK_LEVEL_HIGH else 1
