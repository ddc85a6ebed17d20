"""Fuzzing every governance RPC with random well-typed requests (see tests/fuzz.py): no INTERNAL,
no UNKNOWN, and undecodable bytes are INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor

from tests import fuzz
from tests.conftest import require_backend

SERVICES = fuzz.service_descriptors("arm.governance.v1.PolicyService", "arm.governance.v1.DecisionService",
                                    "arm.governance.v1.ApprovalService", "arm.governance.v1.DeploymentService",
                                    "arm.governance.v1.AuditService", "arm.governance.v1.WebhookService")
METHODS = [m for s in SERVICES for m in fuzz.methods(s)]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[fuzz.Stack]:
    require_backend(request.param)
    started = fuzz.start_stack(request.param, tmp_path_factory.mktemp(f"fuzz-governance-{request.param}"))
    yield started
    started.stop()


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_random_requests_never_fail_internally(stack: fuzz.Stack, method: MethodDescriptor) -> None:
    fuzz.fuzz_method(stack, "governance", method)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_undecodable_request_is_invalid_argument(stack: fuzz.Stack, method: MethodDescriptor) -> None:
    outcome = fuzz.undecodable_is_invalid_argument(stack, "governance", method)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
