"""The audit trail's hash chain: what a change record's hash covers, and how a tenant's chain is
verified. Governance uses it to append and to answer VerifyChain; the client uses the very same
code to re-verify an export offline, so the two can never disagree on the format.

A record's hash is the lowercase hex SHA-256 of the canonical JSON (see `canonical`) of
`chain_content(record)`: every field of the record except `hash` itself, with enum values by name,
absent strings as "", absent structs as null and times as RFC 3339 in UTC with microseconds.
`prev_hash` is part of the content, which is what chains the records; the first record of a tenant
has `prev_hash` "".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Any

from google.protobuf import json_format

from arm.common.v1 import common_pb2
from arm.governance.v1 import audit_pb2
from arm_common.canonical import canonical_json, js_number, sha256_hex
from arm_common.merkle import TreeBuilder, leaf_hash, leaf_of

HASH_MISMATCH = "HASH_MISMATCH"
PREV_HASH_MISMATCH = "PREV_HASH_MISMATCH"
SEQUENCE_GAP = "SEQUENCE_GAP"
CHECKPOINT_MISMATCH = "CHECKPOINT_MISMATCH"
CHECKPOINT_INVALID = "CHECKPOINT_INVALID"


def chain_time(value: datetime | None) -> str:
    """The form of a time in the hashed content: UTC, microseconds, `Z` (\"\" when unset)."""
    if value is None:
        return ""
    value = value.astimezone(UTC)
    if value.year >= 1000:  # isoformat writes the same text, faster; strftime pads no year below 1000
        return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _time(record: common_pb2.ChangeRecord, name: str) -> str:
    if not record.HasField(name):
        return ""
    return chain_time(getattr(record, name).ToDatetime(tzinfo=UTC))


def _struct(record: common_pb2.ChangeRecord, name: str) -> Any:
    if not record.HasField(name):
        return None
    return json_format.MessageToDict(getattr(record, name))


def chain_content(record: common_pb2.ChangeRecord, structs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a record's hash covers. `structs`: payload, before and after already converted
    (`json_format.MessageToDict`, None when unset), for a caller that has them."""
    if structs is None:
        structs = {name: _struct(record, name) for name in ("payload", "before", "after")}
    return {
        "record_id": record.record_id,
        "tenant_id": record.tenant_id,
        "sequence": record.sequence,
        "type": common_pb2.ChangeRecordType.Name(record.type),
        "actor_type": common_pb2.ActorType.Name(record.actor.type),
        "actor_id": record.actor.id,
        "target_type": record.target_type,
        "target_id": record.target_id,
        "project_id": record.project_id,
        "template_id": record.template_id,
        "version_id": record.version_id,
        "instance_id": record.instance_id,
        "summary": record.summary,
        "payload": structs["payload"],
        "before": structs["before"],
        "after": structs["after"],
        "reason": record.reason,
        "occur_time": _time(record, "occur_time"),
        "record_time": _time(record, "record_time"),
        "source": record.source,
        "prev_hash": record.prev_hash,
    }


_TYPE_NAMES = {number: common_pb2.ChangeRecordType.Name(number) for number in common_pb2.ChangeRecordType.values()}
_ACTOR_NAMES = {number: common_pb2.ActorType.Name(number) for number in common_pb2.ActorType.values()}
# chain_content's keys in canonical (sorted) order, as chain_text writes them.
_TEXT_KEYS = ("actor_id", "actor_type", "after", "before", "instance_id", "occur_time", "payload", "prev_hash",
              "project_id", "reason", "record_id", "record_time", "sequence", "source", "summary", "target_id",
              "target_type", "template_id", "tenant_id", "type", "version_id")
assert list(_TEXT_KEYS) == sorted(chain_content(common_pb2.ChangeRecord()))


def chain_text(record: common_pb2.ChangeRecord, *, tenant_id: str, sequence: int, prev_hash: str,
               occur_time: str, record_time: str, structs: dict[str, str | None]) -> str:
    """`canonical_json(chain_content(r))` for `r` = `record` with the tenant, sequence, previous
    hash and record time given (as the trail appends it), written directly: `occur_time` and
    `record_time` already in `chain_time` form, `structs` the payload, before and after already
    in canonical JSON (None when unset), so the appender encodes each Struct once for both the
    stored column and the hash. tests/common/test_chain_text.py holds the two equal."""
    actor = record.actor
    s = encode_basestring
    return "".join((
        '{"actor_id":', s(actor.id), ',"actor_type":', s(_ACTOR_NAMES.get(actor.type) or common_pb2.ActorType.Name(actor.type)),
        ',"after":', structs["after"] or "null", ',"before":', structs["before"] or "null",
        ',"instance_id":', s(record.instance_id), ',"occur_time":', s(occur_time),
        ',"payload":', structs["payload"] or "null", ',"prev_hash":', s(prev_hash),
        ',"project_id":', s(record.project_id), ',"reason":', s(record.reason), ',"record_id":', s(record.record_id),
        ',"record_time":', s(record_time), ',"sequence":', js_number(sequence), ',"source":', s(record.source),
        ',"summary":', s(record.summary), ',"target_id":', s(record.target_id),
        ',"target_type":', s(record.target_type), ',"template_id":', s(record.template_id),
        ',"tenant_id":', s(tenant_id),
        ',"type":', s(_TYPE_NAMES.get(record.type) or common_pb2.ChangeRecordType.Name(record.type)),
        ',"version_id":', s(record.version_id), "}"))


def record_hash(record: common_pb2.ChangeRecord) -> str:
    """The hash a record must carry, given all its other fields (prev_hash included)."""
    return sha256_hex(canonical_json(chain_content(record)))


@dataclass(frozen=True)
class Anchor:
    """A signed checkpoint (see arm_common.checkpoints), its signature already verified: the
    record at `sequence` must carry `head_hash`."""

    sequence: int
    head_hash: str
    key_id: str = ""
    sign_time: str = ""
    tree_root: str = ""
    """The Merkle tree hash over records 1..sequence (arm_common.merkle); "" = not compared."""


@dataclass
class ChainReport:
    """The outcome of walking one tenant's chain from its first record."""

    ok: bool = True
    records_checked: int = 0
    first_broken_sequence: int = 0
    reason: str = ""
    message: str = ""
    last_sequence: int = 0
    last_hash: str = ""
    checkpoints_checked: int = 0
    """Anchors the history was compared with."""
    last_checkpoint_sequence: int = 0
    """The highest sequence an anchor the walk compared covers."""


class ChainVerifier:
    """Walks one tenant's records in sequence order, one at a time (so an export of any size is
    verified in constant memory), and remembers the first broken link. Given anchors (verified
    checkpoints), it also compares the record at each anchor's sequence with the signed hash: a
    record edited, deleted or re-hashed at or before an anchor changes the hash at the anchor
    (every hash after an edit depends on it), so such a history is caught even when every
    following hash and the head were recomputed. A disagreement is reported at the anchor's
    sequence, with the range the tampered record lies in."""

    def __init__(self, anchors: Iterable[Anchor] = (), *, start: tuple[int, str] | None = None,
                 tree: TreeBuilder | None = None) -> None:
        """`start` (sequence, hash): walk on from a trusted point instead of the first record;
        `tree`: the Merkle tree state at that point."""
        self.report = ChainReport()
        self.tree = tree or TreeBuilder()
        if start is not None:
            self.report.last_sequence, self.report.last_hash = start
        self._anchors: dict[int, list[Anchor]] = {}
        for a in anchors:
            self._anchors.setdefault(a.sequence, []).append(a)
        self._agreed = 0  # the highest anchored sequence the history agrees with so far

    def mark_broken(self, sequence: int, reason: str, message: str) -> None:
        """Records a break, unless an earlier one is already recorded (the first one wins)."""
        if self.report.ok:
            self.report.ok = False
            self.report.first_broken_sequence = sequence
            self.report.reason = reason
            self.report.message = message

    def add(self, record: common_pb2.ChangeRecord) -> None:
        r = self.report
        expected = r.last_sequence + 1
        if record.sequence != expected:
            # A deleted record shows as a gap at its own number; a repeated one where it repeats.
            self.mark_broken(expected if record.sequence > expected else record.sequence, SEQUENCE_GAP,
                        f"expected sequence {expected}, found {record.sequence}")
        elif record.prev_hash != r.last_hash:
            self.mark_broken(record.sequence, PREV_HASH_MISMATCH,
                        f"record {record.sequence} does not link to the hash of record {r.last_sequence}")
        elif record_hash(record) != record.hash:
            self.mark_broken(record.sequence, HASH_MISMATCH,
                        f"record {record.sequence}'s content does not match its hash")
        r.records_checked += 1
        r.last_sequence = max(r.last_sequence, record.sequence)
        r.last_hash = record.hash
        try:
            self.tree.add(leaf_of(record.hash))
        except ValueError:  # not hex: already a HASH_MISMATCH
            self.tree.add(leaf_hash(record.hash.encode()))
        for a in self._anchors.pop(record.sequence, ()):
            r.checkpoints_checked += 1
            r.last_checkpoint_sequence = max(r.last_checkpoint_sequence, a.sequence)
            if record.hash != a.head_hash or (a.tree_root and a.tree_root != self.tree.root().hex()):
                self.mark_broken(a.sequence, CHECKPOINT_MISMATCH,
                            f"record {a.sequence} does not carry the hash signed by checkpoint "
                            f"{a.sign_time} (key {a.key_id}): a record after {self._agreed} and "
                            f"at or before {a.sequence} was edited, deleted or re-hashed")
            else:
                self._agreed = max(self._agreed, a.sequence)

    def finish(self, head_sequence: int | None = None) -> ChainReport:
        """Ends the walk; `head_sequence` is the last sequence number the trail claims to hold
        (so a deleted last record is found too)."""
        r = self.report
        if head_sequence is not None and head_sequence > r.last_sequence:
            self.mark_broken(r.last_sequence + 1, SEQUENCE_GAP,
                        f"the trail's head is at sequence {head_sequence} but the records end at "
                        f"{r.last_sequence}")
        for sequence in sorted(self._anchors):
            a = self._anchors[sequence][0]
            r.checkpoints_checked += len(self._anchors[sequence])
            r.last_checkpoint_sequence = max(r.last_checkpoint_sequence, sequence)
            self.mark_broken(sequence, CHECKPOINT_MISMATCH,
                        f"checkpoint {a.sign_time} (key {a.key_id}) signed a trail of {sequence} "
                        f"records, but it ends at {r.last_sequence}: records were removed")
        self._anchors.clear()
        return r


def verify_records(records: Iterable[common_pb2.ChangeRecord],
                   anchors: Iterable[Anchor] = ()) -> ChainReport:
    """Verifies one tenant's records given in sequence order (e.g. parsed from an export),
    against the anchors (verified checkpoints) given."""
    verifier = ChainVerifier(anchors)
    for record in records:
        verifier.add(record)
    return verifier.finish()


def parse_export_lines(lines: Iterable[str | bytes]) -> Iterable[common_pb2.ChangeRecord]:
    """Parses ExportChangeRecords JSON lines back into records, for offline verification."""
    for line in lines:
        text = line.decode() if isinstance(line, bytes) else line
        if text.strip():
            yield json_format.Parse(text, common_pb2.ChangeRecord())


def raise_on_rejected(results: Iterable[audit_pb2.AppendChangeRecordResult]) -> None:
    """For producers' outbox relays: a rejected record stays in the producer's outbox (retried,
    the error recorded there) rather than being dropped, so an audit record is never silently lost."""
    bad = [r for r in results if r.status == audit_pb2.APPEND_STATUS_REJECTED]
    if bad:
        raise RuntimeError(f"{len(bad)} change record(s) rejected by the audit trail, first "
                           f"{bad[0].record_id!r}: {bad[0].reason} {bad[0].message}")
