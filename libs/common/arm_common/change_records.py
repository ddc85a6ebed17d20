"""The one builder of audit change records (`arm.common.v1.ChangeRecord`) that registry and
governance write to their outbox: a fresh record id, the actor, the JSON-like before / after /
payload as Structs, the time it happened (now unless given) and the emitting service."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf import struct_pb2

from arm.common.v1 import common_pb2
from arm_common.ids import new_id
from arm_common.messages import struct, ts
from arm_common.tables import utcnow


def change_record(type_: int, *, tenant_id: str, actor: common_pb2.Actor, target_type: str, target_id: str,
                  summary: str, source: str, reason: str = "", project_id: str = "", template_id: str = "",
                  version_id: str = "", instance_id: str = "", before: dict[str, Any] | None = None,
                  after: dict[str, Any] | None = None, payload: dict[str, Any] | struct_pb2.Struct | None = None,
                  occur_time: datetime | None = None) -> common_pb2.ChangeRecord:
    """A change record; `before`, `after` and `payload` left unset when None (a payload may come
    as a ready Struct, as the decision path builds it from cached parts)."""
    return common_pb2.ChangeRecord(
        record_id=new_id("chg"), tenant_id=tenant_id, type=type_,  # type: ignore[arg-type]
        actor=actor, target_type=target_type, target_id=target_id, project_id=project_id,
        template_id=template_id, version_id=version_id, instance_id=instance_id, summary=summary,
        reason=reason, before=struct(before), after=struct(after), payload=payload if isinstance(payload, struct_pb2.Struct) else struct(payload),
        occur_time=ts(occur_time or utcnow()), source=source)
