"""Well-typed but bad input on every service is INVALID_ARGUMENT naming the field (issue 10
item 4): out-of-range Timestamp / Duration, NaN and Infinity in Struct and double fields, NUL
characters, integers past their column, undecodable bytes (a request, or one message of a client
stream). Real servers, real channels, both databases (NUL and INTEGER ranges matter on
PostgreSQL)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from arm.governance.v1 import approvals_pb2, decision_pb2, policy_pb2
from arm.registry.v1 import access_pb2, tenancy_pb2
from arm.telemetry.v1 import telemetry_pb2
from arm_client import ArmClient
from tests.helpers import expect_failure
from tests.telemetry.conftest import event

TOO_LATE = 253_402_300_800  # 10000-01-01T00:00:00Z


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


async def drain(stream: Any) -> None:
    async for _ack in stream:
        pass


def _role_assignment() -> access_pb2.CreateRoleAssignmentRequest:
    request = access_pb2.CreateRoleAssignmentRequest(operator_id="op", role_id="role")
    request.expire_time.seconds = 2**62
    return request


def _approval() -> approvals_pb2.RequestApprovalRequest:
    request = approvals_pb2.RequestApprovalRequest(
        action_type=approvals_pb2.APPROVAL_ACTION_TYPE_TOOL_EXECUTION, instance_id="ins", tool_name="t")
    request.ttl.seconds = -(2**63)
    return request


def _spend() -> decision_pb2.ReportSpendRequest:
    request = decision_pb2.ReportSpendRequest(entry=decision_pb2.SpendEntry(
        instance_id="ins", amount_usd=1.0, idempotency_key="k"))
    request.entry.occur_time.seconds = TOO_LATE
    return request


def _query() -> telemetry_pb2.QueryEventsRequest:
    request = telemetry_pb2.QueryEventsRequest()
    request.filter.start_time.seconds = -(2**40)
    return request


def _list_approvals() -> approvals_pb2.ListApprovalsRequest:
    request = approvals_pb2.ListApprovalsRequest()
    request.created_after.nanos = -1
    return request


# (service, what, call(client) -> awaitable, the fields named)
CASES: list[tuple[str, str, Callable[[ArmClient], Any], set[str]]] = [
    ("registry", "role assignment expiry past year 9999",
     lambda c: c.access.CreateRoleAssignment(_role_assignment()), {"expire_time"}),
    ("registry", "NUL in a project's name and description",
     lambda c: c.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(
         slug="ok-slug", name="a\x00b", description="\x00")), {"name", "description"}),
    ("registry", "NUL in a role's permissions",
     lambda c: c.access.CreateRole(access_pb2.CreateRoleRequest(name="r", permissions=["x\x00"])),
     {"permissions[0]"}),
    ("governance", "NaN and Infinity in Check arguments and cost",
     lambda c: c.decisions.Check(decision_pb2.CheckRequest(
         instance_id="ins", tool_name="t", estimated_cost_usd=math.inf,
         arguments=struct({"x": math.nan, "deep": {"y": [1, -math.inf]}}))),
     {"estimated_cost_usd", "arguments.x", "arguments.deep.y[1]"}),
    ("governance", "approval ttl past the Duration range",
     lambda c: c.approvals.RequestApproval(_approval()), {"ttl"}),
    ("governance", "spend time past year 9999",
     lambda c: c.decisions.ReportSpend(_spend()), {"entry.occur_time"}),
    ("governance", "approval filter time with negative nanos",
     lambda c: c.approvals.ListApprovals(_list_approvals()), {"created_after.nanos"}),
    ("governance", "envelope revision past the INTEGER column",
     lambda c: c.policies.GetPolicyEnvelopeRevision(policy_pb2.GetPolicyEnvelopeRevisionRequest(
         envelope_id="env", revision=2**31)), {"revision"}),
    ("governance", "NUL in a tool rule",
     lambda c: c.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
         envelope=policy_pb2.PolicyEnvelope(name="n", tool_rules=[policy_pb2.ToolRule(tool="sh\x00")]))),
     {"envelope.tool_rules[0].tool"}),
    ("telemetry", "query filter time before year 1",
     lambda c: c.telemetry.QueryEvents(_query()), {"filter.start_time"}),
    ("telemetry", "NUL in a stream batch id",
     lambda c: drain(c.telemetry.StreamIngestEvents(iter([telemetry_pb2.StreamIngestEventsRequest(batch_id="b\x00")]))),
     {"batch_id"}),
]


@pytest.mark.parametrize(("service", "what", "call", "fields"), CASES, ids=[c[1] for c in CASES])
async def test_bad_values_are_invalid_argument_naming_the_field(
        registry, governance, telemetry, tenant, service: str, what: str,  # type: ignore[no-untyped-def]
        call: Callable[[ArmClient], Any], fields: set[str]) -> None:
    server = {"registry": registry, "governance": governance, "telemetry": telemetry}[service]
    client = server.client(tenant.admin_key)
    try:
        got = await expect_failure(call(client), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELDS")
    finally:
        await client.close()
    assert set(got.violations) == fields, got


@pytest.mark.parametrize("service", ["registry", "governance", "telemetry"])
async def test_undecodable_request_is_invalid_argument(registry, governance, telemetry, tenant,  # type: ignore[no-untyped-def]
                                                       service: str) -> None:
    server = {"registry": registry, "governance": governance, "telemetry": telemetry}[service]
    path = {"registry": "/arm.registry.v1.TenancyService/GetProject",
            "governance": "/arm.governance.v1.DecisionService/Check",
            "telemetry": "/arm.telemetry.v1.TelemetryService/QueryEvents"}[service]
    async with grpc.aio.insecure_channel(server.address) as channel:
        method = channel.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)
        got = await expect_failure(method(b"\x0a\x05ab", metadata=(("authorization", f"Bearer {tenant.admin_key}"),)),
                                   grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
    assert "not a valid protobuf message" in got.message


async def test_bad_events_are_rejected_alone(telemetry, tenant) -> None:  # type: ignore[no-untyped-def]
    """Events are validated one by one by ingest (SPEC: a bad event is rejected alone, the rest
    stored), so hostile values in one event do not fail its batch."""
    client = telemetry.client(tenant.admin_key)
    good = event()
    too_late = event()
    too_late.occur_time.seconds = TOO_LATE
    nul_ref = event(run_id="r\x00")
    nan_payload = event(payload={"deep": [1, math.nan]})
    nul_payload = event(payload={"k\x00": 1})
    try:
        resp = await client.telemetry.IngestEvents(telemetry_pb2.IngestEventsRequest(
            events=[good, too_late, nul_ref, nan_payload, nul_payload]))
    finally:
        await client.close()
    assert resp.accepted_count == 1
    assert [(r.index, r.reason) for r in resp.rejected] == [
        (1, "INVALID_OCCURRED_AT"), (2, "INVALID_FIELD"), (3, "INVALID_PAYLOAD"), (4, "INVALID_PAYLOAD")]
    assert resp.rejected[2].message.startswith("payload.deep[1] must be a finite number")


async def test_an_undecodable_message_in_a_client_stream_is_invalid_argument(telemetry, tenant) -> None:  # type: ignore[no-untyped-def]
    good = telemetry_pb2.StreamIngestEventsRequest(batch_id="b1").SerializeToString()
    async with grpc.aio.insecure_channel(telemetry.address) as channel:
        method = channel.stream_stream("/arm.telemetry.v1.TelemetryService/StreamIngestEvents",
                                       request_serializer=bytes,
                                       response_deserializer=telemetry_pb2.StreamIngestEventsResponse.FromString)
        call = method(iter([good, b"\x0a\x05ab"]), metadata=(("authorization", f"Bearer {tenant.admin_key}"),))
        acks = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for ack in call:
                acks.append(ack.batch_id)
    assert [a for a in acks] == ["b1"]  # the good batch was taken, then the stream was refused
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 1 of the stream" in (caught.value.details() or "")
