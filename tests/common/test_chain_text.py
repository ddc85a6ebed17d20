"""arm_common.chain: `chain_text` (what the audit trail hashes when it appends) is the canonical
JSON of `chain_content` (what every verifier hashes), and `chain_time` writes what strftime did."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from arm.common.v1 import common_pb2
from arm_common.canonical import canonical_json, sha256_hex
from arm_common.chain import chain_content, chain_text, chain_time, record_hash
from arm_common.messages import canonical_struct, struct

_TEXT = st.text(max_size=12)
_JSON = st.recursive(st.none() | st.booleans() | _TEXT | st.floats(allow_nan=False, allow_infinity=False),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
                     max_leaves=10)
_STRUCT = st.none() | st.dictionaries(_TEXT, _JSON, max_size=5)
_TIME = st.none() | st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 30),  # noqa: DTZ001
                                 timezones=st.just(UTC))


@settings(max_examples=300, deadline=None)
@given(type_=st.sampled_from(common_pb2.ChangeRecordType.values()), actor=st.sampled_from(common_pb2.ActorType.values()),
       strings=st.lists(_TEXT, min_size=13, max_size=13), sequence=st.integers(0, 2**62),
       payload=_STRUCT, before=_STRUCT, after=_STRUCT, occur=_TIME, recorded=_TIME)
def test_chain_text_is_the_canonical_content(type_: int, actor: int, strings: list[str], sequence: int,
                                             payload: dict[str, Any] | None, before: dict[str, Any] | None,
                                             after: dict[str, Any] | None, occur: datetime | None,
                                             recorded: datetime | None) -> None:
    record = common_pb2.ChangeRecord(
        record_id=strings[0], type=type_, actor=common_pb2.Actor(type=actor, id=strings[1]),  # type: ignore[arg-type]
        target_type=strings[2], target_id=strings[3], project_id=strings[4], template_id=strings[5],
        version_id=strings[6], instance_id=strings[7], summary=strings[8], reason=strings[9], source=strings[10],
        payload=struct(payload), before=struct(before), after=struct(after), hash="not hashed")
    if occur is not None:
        record.occur_time.FromDatetime(occur)
    # What the trail appends: the record with its tenant, sequence, previous hash and record time.
    full = common_pb2.ChangeRecord()
    full.CopyFrom(record)
    full.tenant_id, full.sequence, full.prev_hash = strings[11], sequence, strings[12]
    if recorded is not None:
        full.record_time.FromDatetime(recorded)
    texts = {name: canonical_struct(getattr(record, name)) if record.HasField(name) else None
             for name in ("payload", "before", "after")}
    got = chain_text(record, tenant_id=strings[11], sequence=sequence, prev_hash=strings[12],
                     occur_time=chain_time(occur), record_time=chain_time(recorded), structs=texts)
    assert got == canonical_json(chain_content(full))
    assert sha256_hex(got) == record_hash(full)


@settings(max_examples=300, deadline=None)
@given(st.datetimes(min_value=datetime(1, 1, 1, 12), max_value=datetime(9999, 12, 31, 11),  # noqa: DTZ001
                    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5)), timezone(timedelta(hours=-11))])))
def test_chain_time_is_what_strftime_writes(value: datetime) -> None:
    assert chain_time(value) == value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert chain_time(None) == ""
