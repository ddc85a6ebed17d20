"""Mapping of domain errors to gRPC statuses with google.rpc details (SPEC §5 "Errors")."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from arm_common import errors
from arm_common.errors import ArmError, FieldViolation, InvalidArgument
from arm_common.interceptors import to_status

DETAILS_KEY = "grpc-status-details-bin"


def decode(status: grpc.Status) -> status_pb2.Status:
    """Reads the google.rpc.Status a client would read from the trailing metadata."""
    values = [v for k, v in status.trailing_metadata if k == DETAILS_KEY]
    assert len(values) == 1, status.trailing_metadata
    decoded = status_pb2.Status()
    decoded.ParseFromString(values[0])
    return decoded


def details_of(decoded: status_pb2.Status) -> dict[str, list[object]]:
    kinds: dict[str, list[object]] = {}
    for any_detail in decoded.details:
        for message_type in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest,
                             error_details_pb2.RetryInfo):
            if any_detail.Is(message_type.DESCRIPTOR):
                message = message_type()
                assert any_detail.Unpack(message)
                kinds.setdefault(message_type.__name__, []).append(message)
                break
        else:
            pytest.fail(f"unexpected detail {any_detail.type_url}")
    return kinds


def test_full_error_round_trip() -> None:
    err = InvalidArgument(
        "the genome is invalid: genome.model_config.provider",
        reason="INVALID_FIELDS",
        metadata={"template_id": "tpl_1", "attempt": 3},
        violations=[FieldViolation("genome.model_config.provider", "is required"),
                    FieldViolation("genome.provenance.created_at", "must be a timestamp")],
        retry_delay_s=1.5,
    )
    status = to_status(err, "req-123")
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.details == err.message

    decoded = decode(status)
    assert decoded.code == code_pb2.INVALID_ARGUMENT == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert decoded.message == err.message
    kinds = details_of(decoded)
    assert sorted(kinds) == ["BadRequest", "ErrorInfo", "RetryInfo"]
    assert all(len(v) == 1 for v in kinds.values())

    info = kinds["ErrorInfo"][0]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "INVALID_FIELDS"
    assert info.domain == "arm.dev"
    assert dict(info.metadata) == {"template_id": "tpl_1", "attempt": "3", "request_id": "req-123"}

    bad = kinds["BadRequest"][0]
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("genome.model_config.provider", "is required"),
        ("genome.provenance.created_at", "must be a timestamp")]

    retry = kinds["RetryInfo"][0]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == (1, 500_000_000)


def test_plain_error_has_only_error_info() -> None:
    err = errors.NotFound.of("agent_instance", "ins_1")
    decoded = decode(to_status(err, "req-9"))
    kinds = details_of(decoded)
    assert list(kinds) == ["ErrorInfo"]
    info = kinds["ErrorInfo"][0]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "AGENT_INSTANCE_NOT_FOUND"
    assert info.metadata["request_id"] == "req-9"
    assert info.metadata["id"] == "ins_1"
    assert decoded.code == code_pb2.NOT_FOUND


def test_zero_retry_delay_is_still_sent() -> None:
    err = errors.Unavailable("try again", retry_delay_s=0.0)
    kinds = details_of(decode(to_status(err, "r")))
    retry = kinds["RetryInfo"][0]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == (0, 0)


def test_request_id_is_the_served_one() -> None:
    err = errors.Aborted("etag mismatch", metadata={"request_id": "spoofed", "etag": "4"})
    info = details_of(decode(to_status(err, "real-id")))["ErrorInfo"][0]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.metadata["request_id"] == "real-id"
    assert info.metadata["etag"] == "4"
    assert info.reason == "ETAG_MISMATCH"


def test_non_ascii_message_survives() -> None:
    err = errors.FailedPrecondition("version « v2 » can’t go from RETIRED to DRAFT",
                                    reason="INVALID_TRANSITION")
    status = to_status(err, "r")
    assert status.details == err.message
    assert decode(status).message == err.message


ERROR_CLASSES = [
    (errors.ArmError, grpc.StatusCode.INTERNAL),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Aborted, grpc.StatusCode.ABORTED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
]


@pytest.mark.parametrize(("cls", "code"), ERROR_CLASSES, ids=[c.__name__ for c, _ in ERROR_CLASSES])
def test_every_error_class_maps_to_its_code(cls: type[ArmError], code: grpc.StatusCode) -> None:
    err = cls("boom")
    status = to_status(err, "r")
    assert status.code == code
    decoded = decode(status)
    assert decoded.code == code.value[0]
    info = details_of(decoded)["ErrorInfo"][0]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    # The default reason is a stable UPPER_SNAKE string.
    assert info.reason == err.reason
    assert info.reason and info.reason == info.reason.upper() and " " not in info.reason


def test_violations_collector_raises_all_fields() -> None:
    v = errors.Violations()
    assert not v
    v.raise_if_any()  # nothing collected: no error
    v.add("a.b", "is required")
    v.add("c", "is too long")
    with pytest.raises(InvalidArgument) as caught:
        v.raise_if_any("bad request")
    err = caught.value
    assert err.reason == "INVALID_FIELDS"
    assert [(x.field, x.description) for x in err.violations] == [("a.b", "is required"),
                                                                  ("c", "is too long")]
    assert "a.b" in err.message and "c" in err.message
    bad = details_of(decode(to_status(err, "r")))["BadRequest"][0]
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [x.field for x in bad.field_violations] == ["a.b", "c"]
