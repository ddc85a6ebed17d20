"""The generic edge check (arm_common.edge): values no service can store are INVALID_ARGUMENT
naming the field by its dotted path, wherever they sit in the request."""

from __future__ import annotations

import math
from typing import Any

import pytest
from google.protobuf import struct_pb2

from arm.common.v1 import common_pb2
from arm.governance.v1 import approvals_pb2, audit_pb2, decision_pb2, policy_pb2
from arm.registry.v1 import access_pb2
from arm.telemetry.v1 import events_pb2, telemetry_pb2
from arm_common import edge
from arm_common.errors import InvalidArgument


def violations(request: object) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        edge.check(request)
    return {v.field: v.description for v in caught.value.violations}


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def test_a_valid_request_passes() -> None:
    request = decision_pb2.CheckRequest(tool_name="shell", estimated_cost_usd=0.5,
                                        arguments=struct({"cmd": "ls", "n": [1, 2.5, {"deep": "x"}]}))
    edge.check(request)


@pytest.mark.parametrize("seconds", [-62_135_596_801, 253_402_300_800, 2**63 - 1, -(2**63)])
def test_out_of_range_timestamps_are_named(seconds: int) -> None:
    request = access_pb2.CreateRoleAssignmentRequest(operator_id="op")
    request.expire_time.seconds = seconds
    assert list(violations(request)) == ["expire_time"]


def test_timestamp_nanos_out_of_range() -> None:
    request = telemetry_pb2.QueryEventsRequest()
    request.filter.start_time.nanos = -1
    assert list(violations(request)) == ["filter.start_time.nanos"]


@pytest.mark.parametrize(("seconds", "nanos", "field"), [
    (315_576_000_001, 0, "ttl"), (-(2**63), 0, "ttl"), (1, -5, "ttl.nanos"), (0, 1_000_000_000, "ttl.nanos")])
def test_out_of_range_durations_are_named(seconds: int, nanos: int, field: str) -> None:
    request = approvals_pb2.RequestApprovalRequest()
    request.ttl.seconds, request.ttl.nanos = seconds, nanos
    assert list(violations(request)) == [field]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_in_structs_and_doubles(bad: float) -> None:
    request = decision_pb2.CheckRequest(estimated_cost_usd=bad, arguments=struct(
        {"x": bad, "list": [1, bad], "nested": {"y": bad}}))
    assert set(violations(request)) == {"estimated_cost_usd", "arguments.x", "arguments.list[1]",
                                        "arguments.nested.y"}


def test_nul_characters_anywhere() -> None:
    request = audit_pb2.AppendChangeRecordsRequest(records=[
        common_pb2.ChangeRecord(record_id="r\x00", payload=struct({"k\x00": 1, "s": "a\x00b"}))])
    assert set(violations(request)) == {"records[0].record_id", "records[0].payload", "records[0].payload.s"}


def test_messages_validated_per_item_are_left_to_their_service() -> None:
    import arm_telemetry.ingest  # noqa: F401 - registers OpEvent as validated per event

    request = telemetry_pb2.IngestEventsRequest(events=[events_pb2.OpEvent(event_id="e\x00")])
    edge.check(request)


def test_nul_in_map_keys_and_repeated_strings() -> None:
    request = policy_pb2.CreatePolicyEnvelopeRequest(envelope=policy_pb2.PolicyEnvelope(
        tool_rules=[policy_pb2.ToolRule(tool="a\x00")]))
    assert list(violations(request)) == ["envelope.tool_rules[0].tool"]
    role = access_pb2.CreateRoleRequest(permissions=["ok", "bad\x00"])
    assert list(violations(role)) == ["permissions[1]"]


def test_undecodable_bytes_become_a_marker_then_invalid_argument() -> None:
    deserialize = edge.tolerant(decision_pb2.CheckRequest.FromString)
    assert deserialize is not None
    assert deserialize(decision_pb2.CheckRequest(tool_name="x").SerializeToString()).tool_name == "x"
    marker = deserialize(b"\x0a\x05ab")  # a length past the end
    assert isinstance(marker, edge.Undecodable)
    assert isinstance(deserialize(b"\x12\x01\xff"), edge.Undecodable)  # a string that is not UTF-8
    with pytest.raises(InvalidArgument) as caught:
        edge.check(marker)
    assert caught.value.reason == "MALFORMED_REQUEST"


async def test_a_stream_checks_each_message_as_it_is_read() -> None:
    async def messages():  # type: ignore[no-untyped-def]
        yield telemetry_pb2.StreamIngestEventsRequest(batch_id="ok")
        yield telemetry_pb2.StreamIngestEventsRequest(batch_id="b\x00")

    read = []
    with pytest.raises(InvalidArgument) as caught:
        async for message in edge.screen(messages(), streaming=True):
            read.append(message.batch_id)
    assert read == ["ok"]
    assert [v.field for v in caught.value.violations] == ["batch_id"]
    assert "message 1 of the stream" in caught.value.message
