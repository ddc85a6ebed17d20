"""Typed exceptions of the SDK. Every failed call surfaces as an `ArmError` (never a bare
`grpc.RpcError`) carrying the gRPC code, the server's `google.rpc.ErrorInfo` (reason and
metadata, the reason also decoded to the catalogue `arm.common.v1.ErrorReason`), the `BadRequest`
field violations, the `RetryInfo` delay and the request id (`from_rpc_error` decodes any failed
call, SDK-made or not); the
outcomes of a governed call (`ToolDenied`, `ApprovalPending`, `ApprovalRejected`,
`ApprovalExpired`, `GovernanceUnavailable`) are `ArmError`s too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from arm.common.v1 import error_reason_pb2


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, as the server named it (e.g. `checks[3].tool_name`)."""

    field: str
    description: str


@dataclass(frozen=True)
class Reason:
    """One reason of a governance decision: a stable code and a human sentence."""

    code: str
    message: str


class ArmError(Exception):
    """Base of every SDK error.

    Attributes:
        code: the gRPC status code (None for outcomes that are not a failed call, e.g. `ToolDenied`).
        reason: the stable UPPER_SNAKE reason (`ErrorInfo.reason`), or the SDK's own for local outcomes.
        error_info: the server's full `google.rpc.ErrorInfo`, when it sent one.
        metadata: `ErrorInfo.metadata` (the values the reason is about).
        field_violations: `BadRequest` field violations, for INVALID_ARGUMENT.
        retry_delay_s: the server's `RetryInfo` delay, when it sent one.
        request_id: the request id the server logged the call under.
    """

    code: grpc.StatusCode | None = None
    default_reason = "ARM_ERROR"

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, reason: str | None = None,
                 error_info: error_details_pb2.ErrorInfo | None = None,
                 field_violations: tuple[FieldViolation, ...] = (), retry_delay_s: float | None = None,
                 request_id: str = "") -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.error_info = error_info
        self.reason = reason or (error_info.reason if error_info is not None and error_info.reason else "") \
            or self.default_reason
        self.metadata: dict[str, str] = dict(error_info.metadata) if error_info is not None else {}
        self.field_violations = field_violations
        self.retry_delay_s = retry_delay_s
        self.request_id = request_id or self.metadata.get("request_id", "")

    @property
    def error_reason(self) -> error_reason_pb2.ErrorReason.ValueType:
        """`reason` decoded against the contract's catalogue (`arm.common.v1.ErrorReason`, whose
        comments say when each is raised); ERROR_REASON_UNSPECIFIED for a reason this client's
        catalogue does not know (a newer server)."""
        try:
            return error_reason_pb2.ErrorReason.Value("ERROR_REASON_" + self.reason)
        except ValueError:
            return error_reason_pb2.ERROR_REASON_UNSPECIFIED

    def __str__(self) -> str:
        parts = [self.message]
        if self.reason and self.reason != self.message:
            parts.append(f"[{self.reason}]")
        for v in self.field_violations:
            parts.append(f"{v.field}: {v.description}")
        if self.request_id:
            parts.append(f"(request {self.request_id})")
        return " ".join(parts)


class InvalidArgument(ArmError):
    default_reason = "INVALID_ARGUMENT"


class NotFound(ArmError):
    default_reason = "NOT_FOUND"


class AlreadyExists(ArmError):
    default_reason = "ALREADY_EXISTS"


class PermissionDenied(ArmError):
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(ArmError):
    default_reason = "UNAUTHENTICATED"


class FailedPrecondition(ArmError):
    default_reason = "FAILED_PRECONDITION"


class Aborted(ArmError):
    default_reason = "ABORTED"


class ResourceExhausted(ArmError):
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(ArmError):
    """The service could not be reached (or answered UNAVAILABLE / DEADLINE_EXCEEDED) after the
    channel's own retries."""

    default_reason = "UNAVAILABLE"


class GovernanceUnavailable(Unavailable):
    """Governance could not be asked about a governed call; raised instead of running the tool
    (fail closed) unless the tool was declared `fail_open=True`."""

    default_reason = "GOVERNANCE_UNAVAILABLE"


class ToolDenied(ArmError):
    """Governance answered DENY. `reasons` are the codes and sentences it gave (the deciding one
    first); `sentences` joins them for a message the model can act on."""

    default_reason = "TOOL_DENIED"

    def __init__(self, tool: str, decision_id: str, reasons: tuple[Reason, ...]) -> None:
        self.tool = tool
        self.decision_id = decision_id
        self.reasons = reasons
        self.sentences = " ".join(r.message for r in reasons) or "denied by policy"
        super().__init__(f"{tool} denied: {self.sentences}",
                         reason=reasons[0].code if reasons else None)


class ApprovalPending(ArmError):
    """The call needs a human approval that is not decided yet (non-blocking mode, or the wait
    timed out). Re-invoke the governed call inside `arm.approval(approval_id)` (or pass
    `approval_id=` to `arm.check`) once it is decided."""

    default_reason = "APPROVAL_PENDING"

    def __init__(self, tool: str, approval_id: str, decision_id: str = "", reasons: tuple[Reason, ...] = ()) -> None:
        self.tool = tool
        self.approval_id = approval_id
        self.decision_id = decision_id
        self.reasons = reasons
        super().__init__(f"{tool} needs approval {approval_id}")


class ApprovalTimeout(ApprovalPending):
    """`wait_for_approval` gave up after its timeout; the approval is still open on the server."""

    default_reason = "APPROVAL_WAIT_TIMEOUT"


class ApprovalRejected(ArmError):
    """The approval was denied or cancelled. `status` is the final status name."""

    default_reason = "APPROVAL_REJECTED"

    def __init__(self, approval_id: str, status: str, detail: str = "") -> None:
        self.approval_id = approval_id
        self.status = status
        super().__init__(f"approval {approval_id} was {status.lower()}" + (f": {detail}" if detail else ""))


class ApprovalExpired(ArmError):
    """The approval expired before enough operators decided (a timeout, not a human denial)."""

    default_reason = "APPROVAL_EXPIRED"

    def __init__(self, approval_id: str) -> None:
        self.approval_id = approval_id
        super().__init__(f"approval {approval_id} expired")


_BY_CODE: dict[grpc.StatusCode, type[ArmError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def from_rpc_error(exc: grpc.RpcError, request_id: str = "", *, as_type: type[ArmError] | None = None) -> ArmError:
    """The typed error for a failed call, with the `google.rpc` details decoded from the
    `grpc-status-details-bin` trailer."""
    call: Any = exc
    code: grpc.StatusCode = call.code()
    info: error_details_pb2.ErrorInfo | None = None
    violations: list[FieldViolation] = []
    retry: float | None = None
    for key, value in call.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                ri = error_details_pb2.RetryInfo()
                detail.Unpack(ri)
                retry = ri.retry_delay.ToTimedelta().total_seconds()
    cls = as_type or _BY_CODE.get(code, ArmError)
    err = cls(call.details() or code.name, code=code, error_info=info, field_violations=tuple(violations),
              retry_delay_s=retry, request_id=request_id)
    err.__cause__ = exc
    return err
