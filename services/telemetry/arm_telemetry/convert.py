"""Stored event rows to API messages, in one place."""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2

from arm.telemetry.v1 import events_pb2, telemetry_pb2
from arm_telemetry.models import REF_COLUMNS


def event(row: Any) -> events_pb2.OpEvent:
    out = events_pb2.OpEvent(event_id=row.event_id, tenant_id=row.tenant_id, type=row.type,
                             **{name: getattr(row, name) for name in REF_COLUMNS})
    out.occur_time.FromDatetime(row.occur_time)
    out.receive_time.FromDatetime(row.receive_time)
    if row.payload is not None:
        out.payload.ParseFromString(row.payload)
    return out


_OUTCOMES = {"ALLOW": telemetry_pb2.DECISION_OUTCOME_ALLOW, "DENY": telemetry_pb2.DECISION_OUTCOME_DENY,
             "NEEDS_APPROVAL": telemetry_pb2.DECISION_OUTCOME_NEEDS_APPROVAL}
DECISION_TYPES = (events_pb2.OP_EVENT_TYPE_DECISION_MADE, events_pb2.OP_EVENT_TYPE_TOOL_CALL_BLOCKED)


def _text(payload: struct_pb2.Struct, name: str) -> str:
    value = payload.fields.get(name)
    return value.string_value if value is not None and value.WhichOneof("kind") == "string_value" else ""


def decision(ev: events_pb2.OpEvent) -> telemetry_pb2.RunDecision | None:
    """The governance decision a DECISION_MADE / TOOL_CALL_BLOCKED event carries in its payload
    ({"decision_id", "decision": "DECISION_ALLOW" | "ALLOW" | …, "tool_name", "approval_id"})."""
    if ev.type not in DECISION_TYPES:
        return None
    raw = _text(ev.payload, "decision").removeprefix("DECISION_")
    outcome = _OUTCOMES.get(raw, telemetry_pb2.DECISION_OUTCOME_UNSPECIFIED)
    if outcome == telemetry_pb2.DECISION_OUTCOME_UNSPECIFIED and ev.type == events_pb2.OP_EVENT_TYPE_TOOL_CALL_BLOCKED:
        outcome = telemetry_pb2.DECISION_OUTCOME_DENY
    return telemetry_pb2.RunDecision(
        decision_id=_text(ev.payload, "decision_id"), outcome=outcome, event_id=ev.event_id,
        tool_name=_text(ev.payload, "tool_name"), tool_call_id=ev.tool_call_id,
        approval_id=_text(ev.payload, "approval_id"), occur_time=ev.occur_time)
