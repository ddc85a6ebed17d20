"""Field rules are in the contract (`google.api.field_behavior`), not in prose: no proto comment
says "(output only)" any more, and every server-set timestamp and server-assigned id of a resource
is OUTPUT_ONLY, every resource id a request names is REQUIRED, across registry, governance and
telemetry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, FileDescriptor

from arm.common.v1 import common_pb2
from arm.governance.v1 import (
    approvals_pb2,
    audit_pb2,
    decision_pb2,
    deployments_pb2,
    policy_pb2,
    webhooks_pb2,
)
from arm.registry.v1 import access_pb2, agents_pb2, compat_pb2, tenancy_pb2
from arm.telemetry.v1 import events_pb2, telemetry_pb2
from tests.helpers import expect_failure

ROOT = Path(__file__).resolve().parents[1]
FILES: list[FileDescriptor] = [m.DESCRIPTOR for m in (
    common_pb2, approvals_pb2, audit_pb2, decision_pb2, deployments_pb2, policy_pb2, webhooks_pb2, access_pb2, agents_pb2,
    compat_pb2, tenancy_pb2, events_pb2, telemetry_pb2)]
OUTPUT_ONLY = field_behavior_pb2.OUTPUT_ONLY
REQUIRED = field_behavior_pb2.REQUIRED


def behaviors(field) -> list[int]:  # type: ignore[no-untyped-def]
    return list(field.GetOptions().Extensions[field_behavior_pb2.field_behavior])


def messages() -> list[Descriptor]:
    out: list[Descriptor] = []
    for f in FILES:
        stack = list(f.message_types_by_name.values())
        while stack:
            m = stack.pop()
            out.append(m)
            stack.extend(m.nested_types)
    return out


def test_no_output_only_prose_is_left() -> None:
    left = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "proto" / "arm").rglob("*.proto"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if "(output only)" in line]
    assert left == []


def test_resources_mark_server_set_fields_output_only() -> None:
    resources = [m for m in messages() if not m.name.endswith(("Request", "Response"))]
    checked = 0
    for m in resources:
        for f in m.fields:
            if f.name in ("create_time", "update_time"):
                assert OUTPUT_ONLY in behaviors(f), f.full_name
                checked += 1
    assert checked > 20
    for name in ("arm.registry.v1.Tenant.id", "arm.registry.v1.AgentInstance.id", "arm.governance.v1.Approval.approval_id",
                 "arm.governance.v1.PolicyEnvelope.revision", "arm.common.v1.ChangeRecord.hash"):
        message, field = name.rsplit(".", 1)
        desc = next(m for m in messages() if m.full_name == message)
        assert OUTPUT_ONLY in behaviors(desc.fields_by_name[field]), name


def test_requests_mark_the_resource_id_required() -> None:
    got = [m.full_name for m in messages() if m.name.startswith("Get") and m.name.endswith("Request")
           and "id" in m.fields_by_name and m.full_name.startswith("arm.registry.")]
    assert got and all(REQUIRED in behaviors(next(x for x in messages() if x.full_name == n).fields_by_name["id"])
                       for n in got), got


# (client attribute, RPC, request) sent empty: the server refuses it INVALID_ARGUMENT and names a
# field the contract marks REQUIRED (a sample of the governance RPCs whose requests carry one).
EMPTY_REQUESTS = [
    ("policies", "CreatePolicyEnvelope", policy_pb2.CreatePolicyEnvelopeRequest),
    ("policies", "GetPolicyEnvelope", policy_pb2.GetPolicyEnvelopeRequest),
    ("policies", "UpdatePolicyEnvelope", policy_pb2.UpdatePolicyEnvelopeRequest),
    ("policies", "DeactivatePolicyEnvelope", policy_pb2.DeactivatePolicyEnvelopeRequest),
    ("policies", "GetPolicyEnvelopeRevision", policy_pb2.GetPolicyEnvelopeRevisionRequest),
    ("policies", "ListPolicyEnvelopeRevisions", policy_pb2.ListPolicyEnvelopeRevisionsRequest),
    ("policies", "SimulatePolicy", policy_pb2.SimulatePolicyRequest),
    ("policies", "SetOperatorControl", policy_pb2.SetOperatorControlRequest),
    ("policies", "GetOperatorControl", policy_pb2.GetOperatorControlRequest),
    ("approvals", "GetApproval", approvals_pb2.GetApprovalRequest),
    ("approvals", "DecideApproval", approvals_pb2.DecideApprovalRequest),
    ("approvals", "CancelApproval", approvals_pb2.CancelApprovalRequest),
    ("deployments", "GetDeployment", deployments_pb2.GetDeploymentRequest),
    ("deployments", "ActivateDeployment", deployments_pb2.ActivateDeploymentRequest),
    ("deployments", "RollbackDeployment", deployments_pb2.RollbackDeploymentRequest),
    ("deployments", "GetActiveDeployment", deployments_pb2.GetActiveDeploymentRequest),
    ("deployments", "CreateDeployment", deployments_pb2.CreateDeploymentRequest),
]


@pytest.mark.parametrize(("stub", "rpc", "request_type"), EMPTY_REQUESTS, ids=[r for _, r, _ in EMPTY_REQUESTS])
async def test_the_server_refuses_a_request_without_its_required_fields(governance: Any, tenant: Any, stub: str,
                                                                       rpc: str, request_type: Any) -> None:
    required = [f.name for f in request_type.DESCRIPTOR.fields if REQUIRED in behaviors(f)]
    assert required, f"{request_type.DESCRIPTOR.full_name} marks no field REQUIRED"
    client = governance.client(tenant.admin_key)
    try:
        got = await expect_failure(getattr(getattr(client, stub), rpc)(request_type()), grpc.StatusCode.INVALID_ARGUMENT)
    finally:
        await client.close()
    named = {path.split(".")[0].split("[")[0] for path in got.violations}
    assert named & set(required), (got.violations, required)
