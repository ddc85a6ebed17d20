"""Logging a batch of local decisions (`RecordLocalDecisions`) at the rate runtimes make them.

`Decider.pending` builds what a `Check` logs one decision at a time, through the general
machinery (the engine result turned into a response message, the opEvent and its payload built
field by field, the row as a dict, timestamps converted twice). A batch of local decisions is
all of one agent and repeats a handful of results, so `LocalRows` builds the same rows from
parts computed once per (agent, result): per decision it only sets the fields that differ
(decision id, time, epoch, run and tool call, tool name). The response is stored in two parts
(decisions/responses.py): the row holds the decision's own fields (~50 bytes), and names the
`decision_responses` row holding the rest of the result's CheckResponse (~650 bytes), written
once. What it logs is what `Decider.pending` would (tests/client/test_local_log.py compares the
two).

On PostgreSQL the rows go in by COPY (`write_pg`): the decisions into `decisions` in a
savepoint — the common case, no id logged before — else, when the primary key refuses them (a
batch shipped again after a lost acknowledgment), through a per-connection temporary table and
one INSERT … SELECT … ON CONFLICT (id) DO NOTHING RETURNING id, which names the ones that went
in; then the outbox rows of those decisions only (a DENY's POLICY_DENIED record, and one row
from which the relay derives their opEvents), by COPY, in the same transaction."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from arm.common.v1 import common_pb2
from arm.governance.v1 import decision_pb2
from arm.registry.v1 import compat_pb2
from arm_common.auth import Principal
from arm_common.errors import InvalidArgument
from arm_common.ids import new_id
from arm_common.outbox import TOPIC_CHANGE_RECORD, TOPIC_OP_EVENT
from arm_engine import engine
from arm_governance import convert
from arm_governance.decisions.log import marker_id
from arm_governance.decisions.responses import part_id
from arm_governance.decisions.service import Decider

DECISION_COLUMNS = ("id", "tenant_id", "request_id", "instance_id", "legacy_agent_id", "version_id", "project_id",
                    "run_id", "tool_call_id", "tool_name", "decision", "step", "risk", "policy_epoch",
                    "approval_id", "request", "agent", "response", "decided_at", "response_part")
OUTBOX_COLUMNS = ("message_id", "topic", "tenant_id", "payload", "created_at", "attempts", "next_attempt_at")
_DECIDED_AT = DECISION_COLUMNS.index("decided_at")
_PER_DENIAL = ("record_id", "target_id", "occur_time")  # with the payload's decision_id and policy_epoch
_EPOCH_NAIVE = datetime(1970, 1, 1)  # noqa: DTZ001 - COPY stores UTC without a zone (see log._naive_utc)


@dataclass(frozen=True)
class _Part:
    """What the rows of one result (for one agent) share."""

    result: engine.Result
    decision: int
    step: int
    risk: int
    response: bytes  # CheckResponse without the per-decision fields
    deny: bool
    part_id: str  # its id in `decision_responses` (responses.part_id)
    denials: dict[tuple[str, str, str, str], bytes] = field(default_factory=dict)
    """A DENY's POLICY_DENIED record less its per-decision fields, serialized, per (actor type,
    actor id, agent ref, tool name): see `LocalRows._denied`."""


class LocalRows:
    """Builds the decision rows and outbox rows of local decisions; caches per (agent, result)."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._denials = 0  # records cached in the parts' `denials`
        self._parts: dict[tuple[bytes, str, bytes], _Part] = {}
        self.stored: set[str] = set()
        """Ids of response parts known to be in `decision_responses` (committed): the caller adds
        a batch's `build` returned once its transaction committed."""

    def _part(self, agent: bytes, tenant_id: str, resolved: compat_pb2.ResolvedAgent, key: bytes,
              result: engine.Result) -> _Part:
        part = self._parts.get((agent, tenant_id, key))
        if part is None:
            response = convert._RESPONSE_FIELDS.get(result)
            part = _Part(result, int(result.effect), int(result.step), int(result.risk), response,
                         result.effect == engine.Effect.DENY, part_id(tenant_id, response))
            if len(self._parts) >= self.limit:
                self._parts.clear()
                self._denials = 0
                self.stored.clear()
            self._parts[(agent, tenant_id, key)] = part
        return part

    def build(self, p: Principal, resolved: compat_pb2.ResolvedAgent, agent: bytes,
              items: Any, keys: list[bytes], results: list[engine.Result], now: datetime
              ) -> tuple[list[tuple[Any, ...]], list[list[tuple[Any, ...]]], dict[str, bytes]]:
        """Per decision (duplicate ids within the batch left out): its row (DECISION_COLUMNS,
        `decided_at` naive UTC, `response` the decision's own fields, `response_part` the id of
        the rest) and its outbox rows (OUTBOX_COLUMNS: a DENY's POLICY_DENIED record; timestamps
        naive UTC; the opEvents come from the log, see `op_events_marker`); and the response
        parts the rows name that are not known to be stored (`stored`), by id. `now` (naive
        UTC) is the outbox rows' `created_at`."""
        tenant_id = p.tenant_id
        instance_id, legacy_agent_id = resolved.instance_id, resolved.legacy_agent_id
        version_id, project_id = resolved.version_id, resolved.project_id
        own = decision_pb2.CheckResponse()  # the decision's own fields, all set for every row
        mine = common_pb2.ChangeRecord()  # a DENY's POLICY_DENIED record: the decision's own fields
        occur, mine_payload = mine.occur_time, mine.payload.fields
        stamp = own.decide_time
        serialize = own.SerializeToString
        rows: list[tuple[Any, ...]] = []
        messages: list[list[tuple[Any, ...]]] = []
        parts: dict[str, bytes] = {}
        stored = self.stored
        seen: set[str] = set()
        for item, key, result in zip(items, keys, results, strict=True):
            decision_id = item.decision_id
            if decision_id in seen:
                continue
            seen.add(decision_id)
            part = self._part(agent, tenant_id, resolved, key, result)
            if part.part_id not in stored:
                parts[part.part_id] = part.response
            req, given = item.request, item.response
            epoch = given.policy_epoch
            seconds, nanos = given.decide_time.seconds, given.decide_time.nanos // 1000 * 1000
            decided = _EPOCH_NAIVE + timedelta(seconds=seconds, microseconds=nanos // 1000)
            own.decision_id = decision_id
            own.policy_epoch = epoch
            stamp.seconds, stamp.nanos = seconds, nanos
            rows.append((decision_id, tenant_id, None, instance_id, legacy_agent_id, version_id, project_id,
                         req.run_id, req.tool_call_id, req.tool_name, part.decision, part.step, part.risk, epoch,
                         "", req.SerializeToString(), agent, serialize(), decided, part.part_id))
            out: list[tuple[Any, ...]] = []
            if part.deny:
                record_id = new_id("chg")
                mine.record_id, mine.target_id = record_id, req.tool_call_id or decision_id
                occur.seconds, occur.nanos = seconds, nanos
                mine_payload["decision_id"].string_value = decision_id
                mine_payload["policy_epoch"].number_value = epoch
                out.append((record_id, TOPIC_CHANGE_RECORD, tenant_id,
                            self._denied(part, p, resolved, req) + mine.SerializeToString(), now, 0, now))
            messages.append(out)
        return rows, messages, parts

    def _denied(self, part: _Part, p: Principal, resolved: compat_pb2.ResolvedAgent,
                req: decision_pb2.CheckRequest) -> bytes:
        """What `Decider._denied_record` builds for a DENY of `part`'s result, less the fields a
        decision sets itself (record id, target id, occurrence time, the payload's decision id
        and policy epoch), serialized once per (actor, agent ref, tool): `build` appends those
        fields' serialization, and protobuf's concatenation is the merge (the Struct's map
        entries included), so the two parse to the very record `_denied_record` gives."""
        kind = req.WhichOneof("agent") or "instance_id"
        key = (p.actor_type, p.actor_id, getattr(req, kind), req.tool_name)
        prefix = part.denials.get(key)
        if prefix is None:
            record = Decider._denied_record(p, req, resolved, part.result, "dec_", 0, _EPOCH_NAIVE)
            for name in _PER_DENIAL:
                record.ClearField(name)  # type: ignore[arg-type]
            del record.payload.fields["decision_id"]
            del record.payload.fields["policy_epoch"]
            if self._denials >= self.limit:  # bounded over all parts (~0.7 kB each), not per part
                for cached in self._parts.values():
                    cached.denials.clear()
                self._denials = 0
            self._denials += 1
            prefix = part.denials[key] = record.SerializeToString()
        return prefix


def op_events_marker(tenant_id: str, decision_ids: list[str], now: datetime) -> tuple[Any, ...]:
    """The outbox row (OUTBOX_COLUMNS) from which the relay derives the opEvents of these logged
    decisions, as the decision log writes for a Check's (decisions/op_events.py)."""
    return (marker_id(decision_ids[0]), TOPIC_OP_EVENT, tenant_id, "\n".join(decision_ids).encode(), now, 0, now)


async def write_pg(apg: Any, tenant_id: str, rows: list[tuple[Any, ...]],
                   messages: list[list[tuple[Any, ...]]], parts: dict[str, bytes]) -> tuple[int, set[str]]:
    """Writes the response parts not stored yet, the decisions not logged yet and their outbox
    rows, inside the caller's transaction on `apg` (asyncpg; the transaction must be open
    already, else each COPY commits alone); returns how many decisions it logged and the outbox
    topics written to. Raises InvalidArgument DECISION_ID_TAKEN when an id is logged for another
    tenant."""
    if parts:
        ids = sorted(parts)
        await apg.execute("INSERT INTO decision_responses (id, tenant_id, response) "
                          "SELECT id, $2, response FROM unnest($1::text[], $3::bytea[]) AS p (id, response) "
                          "ON CONFLICT (id) DO NOTHING", ids, tenant_id, [parts[i] for i in ids])
    fresh = rows
    try:
        async with apg.transaction():  # a savepoint inside the caller's transaction
            await apg.copy_records_to_table("decisions", columns=DECISION_COLUMNS, records=rows)
        out = [row for rows_of in messages for row in rows_of]
    except asyncpg.UniqueViolationError:
        cols = ", ".join(DECISION_COLUMNS)
        await apg.execute(f"CREATE TEMPORARY TABLE IF NOT EXISTS decisions_in ON COMMIT DELETE ROWS "
                          f"AS SELECT {cols} FROM decisions WITH NO DATA")
        await apg.copy_records_to_table("decisions_in", columns=DECISION_COLUMNS, records=rows)
        inserted = {r[0] for r in await apg.fetch(
            f"INSERT INTO decisions ({cols}) SELECT {cols} FROM decisions_in "
            f"ON CONFLICT (id) DO NOTHING RETURNING id")}
        skipped = [row[0] for row in rows if row[0] not in inserted]
        if skipped and await apg.fetchval("SELECT count(*) FROM decisions WHERE id = ANY($1::text[]) "
                                          "AND tenant_id <> $2", skipped, tenant_id):
            raise InvalidArgument("a decision id is taken", reason="DECISION_ID_TAKEN") from None
        fresh = [row for row in rows if row[0] in inserted]
        out = [m for row, rows_of in zip(rows, messages, strict=True) if row[0] in inserted for m in rows_of]
    if fresh:
        out.append(op_events_marker(tenant_id, [row[0] for row in fresh],
                                    datetime.now(UTC).replace(tzinfo=None)))
    if out:
        await apg.copy_records_to_table("outbox_messages", columns=OUTBOX_COLUMNS, records=out)
    return len(fresh), {row[1] for row in out}
