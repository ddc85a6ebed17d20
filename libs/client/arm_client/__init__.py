"""ARM's Python SDK (talks gRPC only).

- `Arm` (asyncio) and `ArmSync` (plain threads): the runtime SDK — governed tools, runs, events,
  approvals; configured from arguments or `ARM_ADDRESS`, `ARM_API_KEY`, `ARM_INSTANCE_ID` … (see
  `arm_client.connection.Settings`).
- Typed errors (`arm_client.errors`): `ArmError` and its kinds, `ToolDenied`, `ApprovalPending`,
  `ApprovalRejected`, `ApprovalExpired`, `GovernanceUnavailable`; `from_rpc_error` decodes any
  failed call's `google.rpc` details (reason, metadata, field violations, retry delay).
- `ArmClient`: the raw typed stubs of every service, for admin tools and tests."""

from __future__ import annotations

from arm_client.connection import Settings
from arm_client.errors import (
    Aborted,
    AlreadyExists,
    ApprovalExpired,
    ApprovalPending,
    ApprovalRejected,
    ApprovalTimeout,
    ArmError,
    FailedPrecondition,
    FieldViolation,
    GovernanceUnavailable,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Reason,
    ResourceExhausted,
    ToolDenied,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from arm_client.sdk import Arm, Authorization, Decision, Run, ToolOptions, current_run
from arm_client.stubs import ArmClient, auth_interceptors
from arm_client.sync import ArmSync

__all__ = [
    "Aborted", "AlreadyExists", "ApprovalExpired", "ApprovalPending", "ApprovalRejected", "ApprovalTimeout",
    "Arm", "ArmClient", "ArmError", "ArmSync", "Authorization", "Decision", "FailedPrecondition",
    "FieldViolation", "GovernanceUnavailable", "InvalidArgument", "NotFound", "PermissionDenied", "Reason",
    "ResourceExhausted", "Run", "Settings", "ToolDenied", "ToolOptions", "Unauthenticated", "Unavailable",
    "auth_interceptors", "current_run", "from_rpc_error",
]
