"""The one actor-from-principal mapping and the one change-record builder (arm_common), used by
registry and governance alike. Before, governance mapped with `ActorType.Value(...)` (an unknown
type raised) and the registry with a table defaulting to SYSTEM (an unknown type was recorded as
the system): the mapping kept is the strict one, pinned here."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from arm.common.v1 import common_pb2
from arm_common.auth import Grant, Principal, act_for_tenant, actor_of
from arm_common.change_records import change_record


def principal(actor_type: str, actor_id: str = "opr_1") -> Principal:
    return Principal(tenant_id="tnt_1", actor_type=actor_type, actor_id=actor_id, api_key_id="key_1")


@pytest.mark.parametrize(("actor_type", "want"), [
    ("OPERATOR", common_pb2.ACTOR_TYPE_OPERATOR),
    ("AGENT", common_pb2.ACTOR_TYPE_AGENT),
    ("SYSTEM", common_pb2.ACTOR_TYPE_SYSTEM),
])
def test_actor_of_maps_every_principal_type(actor_type: str, want: int) -> None:
    assert actor_of(principal(actor_type, "x_9")) == common_pb2.Actor(type=want, id="x_9")  # type: ignore[arg-type]


def test_an_unknown_actor_type_is_an_error_not_the_system() -> None:
    with pytest.raises(ValueError, match="unknown actor type"):
        actor_of(principal("ROBOT"))


def test_a_service_key_acting_for_a_tenant_is_recorded_as_the_system() -> None:
    admin = Principal(tenant_id="tnt_sys", actor_type="OPERATOR", actor_id="opr_svc", api_key_id="key_svc",
                      grants=(Grant("tenants:admin", "TENANT", ""),), system_tenant=True)
    assert actor_of(act_for_tenant(admin, "tnt_1")) == common_pb2.Actor(type=common_pb2.ACTOR_TYPE_SYSTEM,
                                                                         id="opr_svc")


def test_change_record_builder() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC)
    rec = change_record(common_pb2.CHANGE_RECORD_TYPE_APPROVAL_DECIDED, tenant_id="tnt_1",
                        actor=actor_of(principal("OPERATOR")), target_type="approval", target_id="apr_1",
                        summary="approved", source="governance", reason="ok", project_id="prj_1",
                        after={"status": "APPROVED"}, payload={"n": 1}, occur_time=when)
    assert rec.record_id.startswith("chg_") and rec.tenant_id == "tnt_1"
    assert (rec.target_type, rec.target_id, rec.project_id, rec.summary, rec.reason, rec.source) == (
        "approval", "apr_1", "prj_1", "approved", "ok", "governance")
    assert not rec.HasField("before") and dict(rec.after) == {"status": "APPROVED"} and rec.payload["n"] == 1
    assert rec.occur_time.ToDatetime(tzinfo=UTC) == when
    other = change_record(1, tenant_id="t", actor=rec.actor, target_type="x", target_id="y", summary="s",
                          source="registry")
    assert other.record_id != rec.record_id and other.HasField("occur_time")
