"""Governance authenticates every call through the registry (AccessService.Authenticate)."""

from __future__ import annotations

import grpc

from arm.governance.v1 import decision_pb2, policy_pb2
from tests.helpers import expect_failure


async def test_calls_without_a_valid_key_are_refused(governance, tenant) -> None:  # type: ignore[no-untyped-def]
    anonymous = governance.client(None)
    await expect_failure(anonymous.decisions.Check(decision_pb2.CheckRequest(
        instance_id="ins_x", tool_name="fs.read")), grpc.StatusCode.UNAUTHENTICATED, "MISSING_API_KEY")
    forged = governance.client("arm_key_0123456789abcdef_not-the-secret")
    for _ in range(2):  # the second refusal comes from the cache, and must be the same
        await expect_failure(forged.policies.ListPolicyEnvelopes(policy_pb2.ListPolicyEnvelopesRequest()),
                             grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY")
    await anonymous.close()
    await forged.close()

