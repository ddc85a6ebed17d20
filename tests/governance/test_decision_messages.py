"""The decision path builds its response from per-result parts cached by identity; it must equal
the message built field by field, as a reader sees it. The opEvent derived from a logged
decision names what decided field by field."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

from arm.common.v1 import common_pb2
from arm.governance.v1 import decision_pb2, policy_pb2
from arm.registry.v1 import agents_pb2, compat_pb2, tenancy_pb2
from arm.telemetry.v1 import events_pb2
from arm_common.auth import Principal
from arm_common.messages import struct, ts
from arm_engine import engine
from arm_governance import convert
from arm_governance.decisions.log import DecisionLog
from arm_governance.decisions.op_events import op_event
from arm_governance.decisions.service import Decider, argument_digest

E, S, K = engine.Effect, engine.Scope, engine.RuleKind
REASONS = (engine.Reason("LOCKED_RULE", "locked"), engine.Reason("RISK", "high risk"))
SHADOW = engine.ShadowResult("env_s", 3, S.TENANT, "tnt_1", E.DENY, REASONS[:1], K.DEFAULT_EFFECT, None, "")
RESULTS = [
    engine.Result(E.ALLOW, (engine.Reason("RULE", "allowed"),), engine.Risk.LOW, engine.Step.ENVELOPE,
                  S.VERSION, "ver_1", "env_1", 2, K.TOOL_RULE, 0, "fs reads", (SHADOW,)),
    engine.Result(E.NEEDS_APPROVAL, REASONS, engine.Risk.HIGH, engine.Step.LOCKED_RULE, S.TENANT, "tnt_1",
                  "env_2", 5, K.TOOL_RULE, 1, "", ()),
    engine.Result(E.DENY, (), engine.Risk.CRITICAL, engine.Step.BASELINE, None, "", "", 0, None, None, "",
                  (SHADOW, engine.ShadowResult("env_t", 1, S.PROJECT, "prj_1", None, (), None, 4, "d"))),
]
NOW = datetime(2026, 11, 24, 23, 5, 6, 789012, tzinfo=UTC)


def reference_response(result: engine.Result, **per_call: object) -> decision_pb2.CheckResponse:
    resp = decision_pb2.CheckResponse(
        decision=int(result.effect), effective_risk=int(result.risk), step=int(result.step),
        scope=int(result.scope) if result.scope else 0, scope_id=result.scope_id,
        envelope_id=result.envelope_id, envelope_revision=result.envelope_revision,
        rule_kind=int(result.rule_kind) if result.rule_kind else 0,
        rule_description=result.rule_description, approval_id=per_call["approval_id"],
        decision_id=per_call["decision_id"], policy_epoch=per_call["epoch"], request_id=per_call["request_id"],
        decide_time=ts(per_call["decided"]),  # type: ignore[arg-type]
        reasons=[policy_pb2.Reason(code=r.code, message=r.message) for r in result.reasons],
        shadow_results=[decision_pb2.ShadowResult(
            envelope_id=sr.envelope_id, envelope_revision=sr.envelope_revision, scope=int(sr.scope),
            scope_id=sr.scope_id, decision=int(sr.effect) if sr.effect else 0,
            reasons=[policy_pb2.Reason(code=r.code, message=r.message) for r in sr.reasons],
            rule_kind=int(sr.rule_kind) if sr.rule_kind else 0, rule_description=sr.rule_description,
            **({"rule_index": sr.rule_index} if sr.rule_index is not None else {}))
            for sr in result.shadow])
    if result.rule_index is not None:
        resp.rule_index = result.rule_index
    return resp


def test_responses_equal_field_by_field_construction() -> None:
    for n, result in enumerate(RESULTS * 2):  # the second round reads the cache
        per_call = dict(decision_id=f"dec_{n}", approval_id=f"apr_{n}" if n % 2 else "", epoch=n,
                        request_id=f"req_{n}" if n % 3 else "", decided=NOW)
        got = convert.result_to_response(result, **per_call)  # type: ignore[arg-type]
        assert got == reference_response(result, **per_call)
        assert got.HasField("rule_index") == (result.rule_index is not None)


def test_op_event_payload_has_the_same_fields() -> None:
    """The opEvent the relay derives from a logged decision (decision row: request, resolved
    agent, response) names what decided as the pre-derivation opEvent did."""
    principal = Principal(tenant_id="tnt_1", actor_type="OPERATOR", actor_id="usr_1", api_key_id="key_1")
    resolved = compat_pb2.ResolvedAgent(
        tenant_id="tnt_1", tenant_active=True, project_id="prj_1", environment_id="env_1",
        environment_type=tenancy_pb2.ENVIRONMENT_TYPE_DEV, template_id="tpl_1", version_id="ver_1",
        instance_id="ins_1", legacy_agent_id="leg_1", instance_state=agents_pb2.INSTANCE_STATE_ACTIVE,
        version_state=agents_pb2.VERSION_STATE_APPROVED)
    decider = Decider(None, None, None, None, None)  # type: ignore[arg-type]
    for n, result in enumerate(RESULTS * 2):
        request = decision_pb2.CheckRequest(legacy_agent_id="leg_x", tool_name=f"tool.{n}", run_id="r",
                                            tool_call_id="c")
        agent = resolved if n % 2 else None
        pending = decider.pending(principal, request, agent, agent.SerializeToString() if agent else b"", result,
                                  40 + n, "", None, NOW, f"dec_{n}")
        DecisionLog._rows([pending])
        row = SimpleNamespace(**pending.record)
        event = op_event(row)
        expected = {
            "decision_id": f"dec_{n}", "tool_name": f"tool.{n}", "policy_epoch": 40 + n,
            "decision": policy_pb2.Decision.Name(int(result.effect)),
            "risk": common_pb2.RiskLevel.Name(int(result.risk)),
            "step": decision_pb2.DecisionStep.Name(int(result.step)),
            "reasons": [r.code for r in result.reasons],
            # Provenance: what decided (empty / -1 when no envelope or rule did).
            "envelope_id": result.envelope_id, "envelope_revision": result.envelope_revision,
            "scope": policy_pb2.PolicyScope.Name(int(result.scope)) if result.scope else "",
            "scope_id": result.scope_id,
            "rule_kind": policy_pb2.RuleKind.Name(int(result.rule_kind)) if result.rule_kind else "",
            "rule_index": result.rule_index if result.rule_index is not None else -1,
            "rule_description": result.rule_description}
        if pending.record["approval_id"]:
            expected["approval_id"] = pending.record["approval_id"]
        assert event.payload == struct(expected)
        assert event.event_id == f"evt-dec_{n}" and event.occur_time == ts(NOW)
        assert event.type == (events_pb2.OP_EVENT_TYPE_TOOL_CALL_BLOCKED if result.effect == E.DENY
                              else events_pb2.OP_EVENT_TYPE_DECISION_MADE)
        assert (event.tenant_id, event.run_id, event.tool_call_id) == ("tnt_1", "r", "c")
        if agent is not None:
            assert (event.instance_id, event.version_id, event.project_id, event.environment_id,
                    event.template_id, event.legacy_agent_id) == ("ins_1", "ver_1", "prj_1", "env_1", "tpl_1", "leg_1")
        else:
            assert (event.instance_id, event.legacy_agent_id) == ("", "leg_x")


def test_empty_arguments_digest_is_the_canonical_hash_of_an_empty_object() -> None:
    from arm_common.canonical import canonical_hash
    assert argument_digest(None) == argument_digest({}) == canonical_hash({})
    assert argument_digest({"a": 1}) == canonical_hash({"a": 1})
