"""Every enum of the pure engine has the numbers and names of its proto enum, value for value
(the engine converts by value; a new proto value without an engine value, or a renumbering,
fails here rather than in a decision)."""

from __future__ import annotations

import enum

import pytest
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from arm.common.v1 import common_pb2
from arm.governance.v1 import decision_pb2, policy_pb2
from arm_engine import engine, risk

PAIRS: list[tuple[type[enum.IntEnum], EnumTypeWrapper, str]] = [
    (engine.Effect, policy_pb2.Decision, "DECISION_"),
    (engine.Step, decision_pb2.DecisionStep, "DECISION_STEP_"),
    (engine.Scope, policy_pb2.PolicyScope, "POLICY_SCOPE_"),
    (engine.RuleKind, policy_pb2.RuleKind, "RULE_KIND_"),
    (engine.Mode, policy_pb2.PolicyMode, "POLICY_MODE_"),
    (risk.Risk, common_pb2.RiskLevel, "RISK_LEVEL_"),
]


@pytest.mark.parametrize(("ours", "proto", "prefix"), PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_engine_enum_matches_its_proto_enum(ours: type[enum.IntEnum], proto: EnumTypeWrapper, prefix: str) -> None:
    theirs = {name.removeprefix(prefix): number for name, number in proto.items() if number != 0}
    assert all(name.startswith(prefix) for name in proto.keys())
    assert {m.name: int(m) for m in ours} == theirs
    assert proto.Name(0) == f"{prefix}UNSPECIFIED"  # 0 is "not set", never an engine value


def test_every_engine_enum_is_paired() -> None:
    mine = {v for v in vars(engine).values() if isinstance(v, type) and issubclass(v, enum.IntEnum)}
    assert mine - {p[0] for p in PAIRS} == set()
