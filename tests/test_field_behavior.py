"""Field rules are in the contract (`google.api.field_behavior`), not in prose: no proto comment
says "(output only)" any more, and every server-set timestamp and server-assigned id of a resource
is OUTPUT_ONLY, every resource id a request names is REQUIRED, across registry, governance and
telemetry; REQUIRED marks what the servers refuse when empty (the registry's exactly, governance's
as a sample through the server, telemetry's event fields)."""

from __future__ import annotations

import ast
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


# The registry's servicers validate with rule tables (`check(request, ("id", "id"), ...)`); these
# kinds refuse an empty value.
REFUSES_EMPTY = {"id", "name", "slug", "email", "enum", "session_ttl"}


def registry_checked_required() -> set[tuple[str, str]]:
    """(request message, field) for every rule a registry servicer method checks on every call
    (a `check(request, ...)` statement at the top of the method, not under an `if`)."""
    out: set[tuple[str, str]] = set()
    tree = ast.parse((ROOT / "services" / "registry" / "arm_registry" / "servicers.py").read_text())
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.AsyncFunctionDef) or len(fn.args.args) < 2:
            continue
        ann = fn.args.args[1].annotation
        if not (isinstance(ann, ast.Attribute) and ann.attr.endswith("Request")):
            continue
        lists = {st.targets[0].id: st.value.elts for st in fn.body if isinstance(st, ast.Assign)
                 and isinstance(st.value, ast.List) and isinstance(st.targets[0], ast.Name)}
        for st in fn.body:
            call = st.value if isinstance(st, ast.Expr) else None
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "check"
                    and isinstance(call.args[0], ast.Name) and call.args[0].id == "request"):
                continue
            rules: list[ast.expr] = []
            for a in call.args[1:]:
                rules += lists.get(a.value.id, []) if isinstance(a, ast.Starred) and isinstance(a.value, ast.Name) else [a]
            for r in rules:
                if isinstance(r, ast.Tuple) and all(isinstance(e, ast.Constant) for e in r.elts):
                    kind, name = (e.value for e in r.elts)  # type: ignore[attr-defined]
                    if kind in REFUSES_EMPTY:
                        out.add((ann.attr, name))
    return out


def test_registry_requests_mark_exactly_the_fields_the_server_requires() -> None:
    """REQUIRED in the registry's request messages is what its servicers refuse when empty, both
    ways (fields required only together with another are not REQUIRED; their comments say so)."""
    checked = registry_checked_required()
    assert len(checked) > 40, checked
    marked = {(m.name, f.name) for m in messages() if m.full_name.startswith("arm.registry.")
              and m.name.endswith("Request") for f in m.fields if REQUIRED in behaviors(f)}
    assert sorted(checked - marked) == [], "checked by the server, not REQUIRED in the contract"
    assert sorted(marked - checked) == [], "REQUIRED in the contract, not checked by the server"


def test_telemetry_marks_what_ingest_and_reads_require() -> None:
    event = events_pb2.OpEvent.DESCRIPTOR
    assert [f.name for f in event.fields if REQUIRED in behaviors(f)] == ["event_id", "type", "occur_time"]
    assert REQUIRED in behaviors(telemetry_pb2.GetRunTraceRequest.DESCRIPTOR.fields_by_name["run_id"])


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
    ("approvals", "RequestApproval", approvals_pb2.RequestApprovalRequest),
    ("approvals", "GetApproval", approvals_pb2.GetApprovalRequest),
    ("approvals", "DecideApproval", approvals_pb2.DecideApprovalRequest),
    ("approvals", "CancelApproval", approvals_pb2.CancelApprovalRequest),
    ("deployments", "GetDeployment", deployments_pb2.GetDeploymentRequest),
    ("deployments", "ActivateDeployment", deployments_pb2.ActivateDeploymentRequest),
    ("deployments", "RollbackDeployment", deployments_pb2.RollbackDeploymentRequest),
    ("deployments", "GetActiveDeployment", deployments_pb2.GetActiveDeploymentRequest),
    ("deployments", "CreateDeployment", deployments_pb2.CreateDeploymentRequest),
    ("decisions", "Check", decision_pb2.CheckRequest),
    ("decisions", "GetDecision", decision_pb2.GetDecisionRequest),
    ("decisions", "EvaluatePolicy", decision_pb2.EvaluatePolicyRequest),
    ("decisions", "ReportSpend", decision_pb2.ReportSpendRequest),
    ("webhooks", "CreateWebhook", webhooks_pb2.CreateWebhookRequest),
    ("webhooks", "GetWebhook", webhooks_pb2.GetWebhookRequest),
    ("webhooks", "RotateWebhookSecret", webhooks_pb2.RotateWebhookSecretRequest),
    ("webhooks", "DeleteWebhook", webhooks_pb2.DeleteWebhookRequest),
    ("webhooks", "ListWebhookDeliveries", webhooks_pb2.ListWebhookDeliveriesRequest),
    ("audit", "GetChangeRecord", audit_pb2.GetChangeRecordRequest),
    ("audit", "GetInclusionProof", audit_pb2.GetInclusionProofRequest),
    ("audit", "AppendChangeRecords", audit_pb2.AppendChangeRecordsRequest),
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
