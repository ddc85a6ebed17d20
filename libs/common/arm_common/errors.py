"""Typed domain errors. Services raise these; one interceptor maps them to a gRPC status with
`google.rpc` details (an `ErrorInfo` with a stable UPPER_SNAKE reason, `BadRequest` field
violations, `RetryInfo`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

ERROR_DOMAIN = "arm.dev"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: its path (e.g. `genome.model_config.provider`) and why."""

    field: str
    description: str


class ArmError(Exception):
    """Base of all domain errors: a gRPC code, a stable reason and a human message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, object] | None = None,
        violations: list[FieldViolation] | None = None,
        retry_delay_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self.violations = list(violations or [])
        self.retry_delay_s = retry_delay_s


class InvalidArgument(ArmError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(ArmError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"

    @classmethod
    def of(cls, kind: str, ident: str) -> NotFound:
        """The standard "no such resource" error. Also what another tenant's resource looks like."""
        return cls(f"{kind} {ident!r} not found", reason=f"{kind.upper()}_NOT_FOUND",
                   metadata={"resource": kind, "id": ident})


class AlreadyExists(ArmError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(ArmError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(ArmError):
    code = grpc.StatusCode.ABORTED
    default_reason = "ETAG_MISMATCH"


class PermissionDenied(ArmError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(ArmError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(ArmError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(ArmError):
    """Try again later: always carries a RetryInfo delay (1 s unless given)."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"

    def __init__(self, message: str, *, retry_delay_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, retry_delay_s=1.0 if retry_delay_s is None else retry_delay_s, **kwargs)


class DatabaseUnavailable(Unavailable):
    """The service's database cannot be reached (down, restarting, unreachable, out of
    connections): the caller retries after the RetryInfo delay; nothing was changed."""

    default_reason = "DATABASE_UNAVAILABLE"

    def __init__(self, message: str = "the database is unavailable; retry later", *,
                 retry_delay_s: float = 2.0) -> None:
        super().__init__(message, retry_delay_s=retry_delay_s)


class Unimplemented(ArmError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "NOT_IMPLEMENTED"


@dataclass
class Violations:
    """Collects field violations of one request and raises them together."""

    items: list[FieldViolation] = field(default_factory=list)

    def add(self, field_path: str, description: str) -> None:
        self.items.append(FieldViolation(field_path, description))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, message: str = "the request has invalid fields") -> None:
        if self.items:
            fields = ", ".join(v.field for v in self.items)
            raise InvalidArgument(f"{message}: {fields}", reason="INVALID_FIELDS",
                                  violations=self.items)
