"""Per-tenant risk overrides (issue 12, item 3): a payments team says `payments.refund` under $50
is MEDIUM; its decisions change, another tenant's do not; the write is etag-guarded, validated and
recorded; EvaluatePolicy classifies with overrides it is given."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import struct_pb2

from arm.common.v1 import common_pb2
from arm.governance.v1 import decision_pb2, policy_pb2
from arm_client.stubs import ArmClient
from tests.conftest import TenantContext
from tests.governance.test_policy_admin import active_agent, change_records, check, gov, other  # noqa: F401
from tests.helpers import expect_failure

SMALL_REFUND = policy_pb2.RiskOverride(tool="payments.refund", risk=common_pb2.RISK_LEVEL_MEDIUM,
                                       arguments_below={"amount": 50})


def args(**kw: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(kw)
    return s


async def test_an_override_changes_decisions_for_its_tenant_only(
        gov: ArmClient, tenant: TenantContext, other: tuple[TenantContext, ArmClient], governance: Any) -> None:  # noqa: F811
    other_ctx, other_gov = other
    mine = await active_agent(tenant.admin)
    theirs = await active_agent(other_ctx.admin)
    # Today's table: a refund is HIGH, so the baseline asks for approval, in both tenants.
    for client, agent in ((gov, mine), (other_gov, theirs)):
        r = await check(client, agent.instance.id, "payments.refund", arguments=args(amount=20))
        assert (r.decision, r.effective_risk) == (policy_pb2.DECISION_NEEDS_APPROVAL, common_pb2.RISK_LEVEL_HIGH)

    got = (await gov.policies.GetRiskOverrides(policy_pb2.GetRiskOverridesRequest())).risk_overrides
    assert (list(got.overrides), got.revision) == ([], 0)
    set_ = (await gov.policies.SetRiskOverrides(policy_pb2.SetRiskOverridesRequest(
        overrides=[SMALL_REFUND], etag="0", reason="refunds under 50 are routine"))).risk_overrides
    assert set_.revision == 1 and set_.etag == "1" and list(set_.overrides) == [SMALL_REFUND]

    small = await check(gov, mine.instance.id, "payments.refund", arguments=args(amount=20))
    assert (small.decision, small.effective_risk, small.step) == (
        policy_pb2.DECISION_ALLOW, common_pb2.RISK_LEVEL_MEDIUM, decision_pb2.DECISION_STEP_BASELINE)
    big = await check(gov, mine.instance.id, "payments.refund", arguments=args(amount=80))
    assert (big.decision, big.effective_risk) == (policy_pb2.DECISION_NEEDS_APPROVAL, common_pb2.RISK_LEVEL_HIGH)
    # The other tenant keeps today's table.
    r = await check(other_gov, theirs.instance.id, "payments.refund", arguments=args(amount=20))
    assert (r.decision, r.effective_risk) == (policy_pb2.DECISION_NEEDS_APPROVAL, common_pb2.RISK_LEVEL_HIGH)
    assert list((await other_gov.policies.GetRiskOverrides(policy_pb2.GetRiskOverridesRequest())
                 ).risk_overrides.overrides) == []

    # A stale etag is ABORTED; a glob over the limits and a missing risk are INVALID_ARGUMENT.
    await expect_failure(gov.policies.SetRiskOverrides(policy_pb2.SetRiskOverridesRequest(etag="0")),
                         grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    bad = await expect_failure(gov.policies.SetRiskOverrides(policy_pb2.SetRiskOverridesRequest(overrides=[
        policy_pb2.RiskOverride(tool="*a*a*a*a*a", risk=1), policy_pb2.RiskOverride(tool="x")])),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert {"overrides[0].tool", "overrides[1].risk"} <= set(bad.violations)

    got = (await gov.policies.GetRiskOverrides(policy_pb2.GetRiskOverridesRequest())).risk_overrides
    assert (list(got.overrides), got.revision, got.etag) == ([SMALL_REFUND], 1, "1")

    # Removing them restores today's classification; both writes are recorded.
    await gov.policies.SetRiskOverrides(policy_pb2.SetRiskOverridesRequest(etag="1"))
    again = await check(gov, mine.instance.id, "payments.refund", arguments=args(amount=20))
    assert again.effective_risk == common_pb2.RISK_LEVEL_HIGH
    records = [r for r in await change_records(governance, tenant.tenant.id) if r.target_type == "risk_overrides"]
    assert [r.summary for r in records] == ["risk overrides: 1 entries", "risk overrides: 0 entries"]


async def test_evaluate_policy_classifies_with_the_overrides_given(gov: ArmClient) -> None:  # noqa: F811
    call = decision_pb2.EvaluationCall(tool_name="payments.refund", arguments=args(amount=20),
                                       context=decision_pb2.EvaluationContext(project="p", version="v"))
    plain = (await gov.decisions.EvaluatePolicy(decision_pb2.EvaluatePolicyRequest(calls=[call]))).results[0]
    with_ = (await gov.decisions.EvaluatePolicy(decision_pb2.EvaluatePolicyRequest(
        calls=[call], risk_overrides=[SMALL_REFUND]))).results[0]
    assert (plain.decision, plain.effective_risk) == (policy_pb2.DECISION_NEEDS_APPROVAL, common_pb2.RISK_LEVEL_HIGH)
    assert (with_.decision, with_.effective_risk) == (policy_pb2.DECISION_ALLOW, common_pb2.RISK_LEVEL_MEDIUM)



def trigger(label: str, pattern: str = "", risk: int = 0, disabled: bool = False) -> policy_pb2.ArgumentTrigger:
    return policy_pb2.ArgumentTrigger(label=label, pattern=pattern, risk=risk, disabled=disabled)  # type: ignore[arg-type]


async def test_argument_triggers_change_decisions_for_their_tenant_only(
        gov: ArmClient, tenant: TenantContext, other: tuple[TenantContext, ArmClient], governance: Any) -> None:  # noqa: F811
    other_ctx, other_gov = other
    mine = await active_agent(tenant.admin)
    theirs = await active_agent(other_ctx.admin)
    staging = args(target="production replica")
    for client, agent in ((gov, mine), (other_gov, theirs)):  # the default "production" trigger: HIGH
        r = await check(client, agent.instance.id, "db.read", arguments=staging)
        assert (r.decision, r.effective_risk) == (policy_pb2.DECISION_NEEDS_APPROVAL, common_pb2.RISK_LEVEL_HIGH)

    # This tenant: "production" raises only to MEDIUM, "deploy" is off, its own crown jewels DENY.
    triggers = [trigger("production", risk=common_pb2.RISK_LEVEL_MEDIUM), trigger("deploy", disabled=True),
                trigger("crown jewels", r"customers?[_ ]table", common_pb2.RISK_LEVEL_CRITICAL)]
    set_ = (await gov.policies.SetRiskOverrides(policy_pb2.SetRiskOverridesRequest(
        overrides=[SMALL_REFUND], argument_triggers=triggers, etag="0", reason="our own triggers"))).risk_overrides
    assert (list(set_.argument_triggers), list(set_.overrides), set_.revision) == (triggers, [SMALL_REFUND], 1)
    got = (await gov.policies.GetRiskOverrides(policy_pb2.GetRiskOverridesRequest())).risk_overrides
    assert list(got.argument_triggers) == triggers

    r = await check(gov, mine.instance.id, "db.read", arguments=staging)
    assert (r.decision, r.effective_risk) == (policy_pb2.DECISION_ALLOW, common_pb2.RISK_LEVEL_MEDIUM)
    r = await check(gov, mine.instance.id, "db.read", arguments=args(note="deploy notes"))
    assert (r.decision, r.effective_risk) == (policy_pb2.DECISION_ALLOW, common_pb2.RISK_LEVEL_LOW)
    r = await check(gov, mine.instance.id, "db.read", arguments=args(q="SELECT * FROM Customers_Table"))
    assert (r.decision, r.effective_risk) == (policy_pb2.DECISION_DENY, common_pb2.RISK_LEVEL_CRITICAL)
    r = await check(gov, mine.instance.id, "db.read", arguments=args(key="api_key"))  # other defaults stay
    assert r.effective_risk == common_pb2.RISK_LEVEL_HIGH
    # The other tenant keeps the default triggers.
    r = await check(other_gov, theirs.instance.id, "db.read", arguments=staging)
    assert (r.decision, r.effective_risk) == (policy_pb2.DECISION_NEEDS_APPROVAL, common_pb2.RISK_LEVEL_HIGH)
    r = await check(other_gov, theirs.instance.id, "db.read", arguments=args(q="SELECT * FROM Customers_Table"))
    assert r.effective_risk == common_pb2.RISK_LEVEL_LOW

    # Refused: field paths for each mistake, nothing stored.
    bad = await expect_failure(gov.policies.SetRiskOverrides(policy_pb2.SetRiskOverridesRequest(
        argument_triggers=[trigger("x", r"(?<=a)b"), trigger("nope", disabled=True), trigger("y"),
                           trigger("z", "z", common_pb2.RISK_LEVEL_LOW)] + [trigger(f"t{i}", "t") for i in range(2)])),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert {"argument_triggers[0].pattern", "argument_triggers[1].label", "argument_triggers[2].pattern",
            "argument_triggers[3].risk"} == set(bad.violations), bad.violations
    many = await expect_failure(gov.policies.SetRiskOverrides(policy_pb2.SetRiskOverridesRequest(
        argument_triggers=[trigger(f"t{i}", "t") for i in range(33)])), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(many.violations) == {"argument_triggers"}
    assert (await gov.policies.GetRiskOverrides(policy_pb2.GetRiskOverridesRequest())).risk_overrides.revision == 1

    # Recorded with the triggers; clearing them restores the defaults.
    await gov.policies.SetRiskOverrides(policy_pb2.SetRiskOverridesRequest(etag="1"))
    r = await check(gov, mine.instance.id, "db.read", arguments=staging)
    assert r.effective_risk == common_pb2.RISK_LEVEL_HIGH
    records = [r for r in await change_records(governance, tenant.tenant.id) if r.target_type == "risk_overrides"]
    assert [r.summary for r in records] == ["risk overrides: 1 entries, 3 argument triggers",
                                            "risk overrides: 0 entries"]
    assert len(records[1].before["argument_triggers"]) == 3


async def test_evaluate_policy_classifies_with_the_triggers_given(gov: ArmClient) -> None:  # noqa: F811
    call = decision_pb2.EvaluationCall(tool_name="db.read", arguments=args(target="production"),
                                       context=decision_pb2.EvaluationContext(project="p", version="v"))
    plain = (await gov.decisions.EvaluatePolicy(decision_pb2.EvaluatePolicyRequest(calls=[call]))).results[0]
    with_ = (await gov.decisions.EvaluatePolicy(decision_pb2.EvaluatePolicyRequest(
        calls=[call], argument_triggers=[trigger("production", disabled=True)]))).results[0]
    assert (plain.decision, plain.effective_risk) == (policy_pb2.DECISION_NEEDS_APPROVAL, common_pb2.RISK_LEVEL_HIGH)
    assert (with_.decision, with_.effective_risk) == (policy_pb2.DECISION_ALLOW, common_pb2.RISK_LEVEL_LOW)
    bad = await expect_failure(gov.decisions.EvaluatePolicy(decision_pb2.EvaluatePolicyRequest(
        calls=[call], argument_triggers=[trigger("new")])), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(bad.violations) == {"argument_triggers[0].pattern"}
