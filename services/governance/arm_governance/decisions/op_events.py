"""opEvents derived from the decision log. A decision's opEvent (DECISION_MADE, or
TOOL_CALL_BLOCKED for a DENY) is not built and written per call: the decision log's statement
adds, per tenant of a batch, one `op_event` outbox row naming the batch's decision ids (a
marker, committed with the decisions), and the relay's deliverer reads those decision rows and
builds their opEvents from them (`op_event`). A crash loses nothing (the marker commits with the
decisions, or neither does) and a redelivery duplicates nothing (telemetry deduplicates on the
event id, `evt-<decision id>`), as with one outbox row per decision, which rows enqueued before
this change still are (delivered as they are)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from google.protobuf import struct_pb2
from sqlalchemy import and_, select
from sqlalchemy.ext.asyncio import AsyncSession

from arm.governance.v1 import decision_pb2, policy_pb2
from arm.registry.v1 import compat_pb2
from arm.telemetry.v1 import events_pb2
from arm_common.db import Database, driver_connection
from arm_common.decision_inputs import decision_event_id, result_from_response
from arm_common.messages import ts
from arm_common.outbox import TOPIC_OP_EVENT, Deliver, OutboxMessage
from arm_governance import models
from arm_governance.decisions.log import OP_EVENTS_MARKER
from arm_governance.decisions.responses import parts
from arm_governance.decisions.service import provenance
from arm_governance.models import OUTBOX

log = logging.getLogger(__name__)
_READ_CHUNK = 500


def marker_ids(message: OutboxMessage) -> list[str]:
    """The decision ids a marker names (empty for an opEvent enqueued as itself)."""
    if not message.message_id.startswith(OP_EVENTS_MARKER):
        return []
    return message.payload.decode().split("\n") if message.payload else []


_PAYLOADS: dict[tuple[Any, ...], bytes] = {}  # what decided → the payload fields it alone sets
_PART_PAYLOADS: dict[str, bytes] = {}  # a stored response part's id → the same (responses.py)
_AGENTS: dict[bytes, tuple[str, str]] = {}  # resolved agent → (environment id, template id)
_LIMIT = 4096  # entries per cache (cleared when full)


def _payload_fields(response: decision_pb2.CheckResponse) -> bytes:
    """The payload fields that depend on what decided alone (provenance, reason codes),
    serialized; cached, as a relay pass sees the same few results over and over."""
    key = (response.decision, response.effective_risk, response.step, response.scope, response.scope_id,
           response.envelope_id, response.envelope_revision, response.rule_kind,
           response.rule_index if response.HasField("rule_index") else None, response.rule_description,
           tuple(r.code for r in response.reasons))
    fields = _PAYLOADS.get(key)
    if fields is None:
        payload = struct_pb2.Struct()
        payload.update(provenance(result_from_response(response)))
        payload.fields["reasons"].list_value.values.extend(
            struct_pb2.Value(string_value=r.code) for r in response.reasons)
        if len(_PAYLOADS) >= _LIMIT:
            _PAYLOADS.clear()
        fields = _PAYLOADS[key] = payload.SerializeToString()
    return fields


def _part_fields(part: str, parts: Mapping[str, bytes]) -> bytes:
    """`_payload_fields` of a stored response part (what decided is all in the part), by its id:
    parts are content-addressed, so the id is as good a key as the content."""
    fields = _PART_PAYLOADS.get(part)
    if fields is None:
        if len(_PART_PAYLOADS) >= _LIMIT:
            _PART_PAYLOADS.clear()
        fields = _PART_PAYLOADS[part] = _payload_fields(decision_pb2.CheckResponse.FromString(parts[part]))
    return fields


def _agent_ids(agent: bytes) -> tuple[str, str]:
    ids = _AGENTS.get(agent)
    if ids is None:
        resolved = compat_pb2.ResolvedAgent.FromString(agent)
        if len(_AGENTS) >= _LIMIT:
            _AGENTS.clear()
        ids = _AGENTS[agent] = (resolved.environment_id, resolved.template_id)
    return ids


def op_event(row: Any, parts: Mapping[str, bytes] | None = None) -> events_pb2.OpEvent:
    """A logged decision's opEvent, from its row (a DecisionRecord or its columns): ids, tool and
    agent from the row's columns and resolved agent, the payload from its response (what decided,
    the reason codes; the shared part of a split response from `parts`, see responses.py) and
    columns (policy epoch, approval)."""
    part = getattr(row, "response_part", None)
    if part:
        fields = _part_fields(part, parts or {})
    else:
        fields = _payload_fields(decision_pb2.CheckResponse.FromString(row.response))
    blocked = row.decision == policy_pb2.DECISION_DENY
    event = events_pb2.OpEvent(
        event_id=decision_event_id(row.id), tenant_id=row.tenant_id, occur_time=ts(row.decided_at),
        type=events_pb2.OP_EVENT_TYPE_TOOL_CALL_BLOCKED if blocked else events_pb2.OP_EVENT_TYPE_DECISION_MADE,
        run_id=row.run_id, tool_call_id=row.tool_call_id, legacy_agent_id=row.legacy_agent_id)
    payload = event.payload
    payload.MergeFromString(fields)
    fields = payload.fields
    fields["decision_id"].string_value = row.id
    fields["tool_name"].string_value = row.tool_name
    fields["policy_epoch"].number_value = row.policy_epoch
    if row.approval_id:
        fields["approval_id"].string_value = row.approval_id
    if row.agent:
        event.environment_id, event.template_id = _agent_ids(row.agent)
        event.project_id, event.version_id, event.instance_id = row.project_id, row.version_id, row.instance_id
    return event


class _Row(NamedTuple):
    """The decision columns an opEvent is made of."""

    id: str
    tenant_id: str
    run_id: str
    tool_call_id: str
    tool_name: str
    legacy_agent_id: str
    instance_id: str
    version_id: str
    project_id: str
    decision: int
    policy_epoch: int
    approval_id: str
    decided_at: datetime
    agent: bytes
    response: bytes
    response_part: str | None


_PG_ROWS = f"SELECT {', '.join(_Row._fields)} FROM decisions WHERE id = ANY($1::text[])"


async def decision_rows(s: AsyncSession, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    """The decision rows of (tenant id, decision id) pairs, by that pair (`decided_at` in UTC,
    aware). On PostgreSQL one statement prepared once, on the transaction's asyncpg connection
    (through the ORM a relay pass spent about a third of its CPU compiling and wrapping)."""
    d = models.DecisionRecord
    wanted = sorted(set(keys))
    found: dict[tuple[str, str], Any] = {}
    if s.get_bind().dialect.name == "postgresql":
        apg = await driver_connection(s)
        for r in await apg.fetch(_PG_ROWS, [k[1] for k in wanted]):
            row = _Row(*r)
            found[(row.tenant_id, row.id)] = row._replace(decided_at=row.decided_at.replace(tzinfo=UTC))
        return found
    for start in range(0, len(wanted), _READ_CHUNK):
        chunk = wanted[start:start + _READ_CHUNK]
        rows = (await s.execute(select(*(getattr(d, c) for c in _Row._fields)).where(
            d.id.in_([k[1] for k in chunk])))).all()
        found.update(((r.tenant_id, r.id), r) for r in rows)
    return found


async def expand(s: AsyncSession, messages: Sequence[OutboxMessage]) -> list[OutboxMessage]:
    """The messages with each marker replaced by its decisions' opEvents (in the marker's order,
    carrying its position and attempts); a decision no longer in the log is skipped, said once."""
    keys = [(m.tenant_id, i) for m in messages for i in marker_ids(m)]
    if not keys:
        return list(messages)
    rows = await decision_rows(s, keys)
    stored = await parts(s, [r.response_part for r in rows.values()])
    out: list[OutboxMessage] = []
    missing = 0
    for m in messages:
        ids = marker_ids(m)
        if not ids:
            out.append(m)
            continue
        for decision_id in ids:
            row = rows.get((m.tenant_id, decision_id))  # the marker's own tenant only
            if row is None:
                missing += 1
                continue
            out.append(OutboxMessage(m.position, decision_event_id(decision_id), m.topic, m.tenant_id,
                                     op_event(row, stored).SerializeToString(), m.attempts))
    if missing:
        log.warning("%d opEvents not sent: their decisions are no longer in the decision log", missing)
    return out


class DerivedOpEvents:
    """The `deliver` of governance's op_event relay: markers expanded (see `expand`), then
    everything handed to `forward` (telemetry's IngestEvents)."""

    def __init__(self, db: Database, forward: Deliver) -> None:
        self.db = db
        self.forward = forward

    async def __call__(self, messages: Sequence[OutboxMessage]) -> None:
        events = messages
        if any(m.message_id.startswith(OP_EVENTS_MARKER) for m in messages):
            events = await self.db.read(lambda s: expand(s, messages))
        if events:
            await self.forward(events)


async def waiting_op_events(s: AsyncSession, tenant_id: str | None = None) -> list[events_pb2.OpEvent]:
    """The opEvents still in the outbox (undelivered or not), in order: for tests and tools."""
    t = OUTBOX
    where = [t.c.topic == TOPIC_OP_EVENT]
    if tenant_id is not None:
        where.append(t.c.tenant_id == tenant_id)
    rows = (await s.execute(select(t).where(and_(*where)).order_by(t.c.position))).mappings().all()
    messages = [OutboxMessage(r["position"], r["message_id"], r["topic"], r["tenant_id"], r["payload"],
                              r["attempts"]) for r in rows]
    return [events_pb2.OpEvent.FromString(m.payload) for m in await expand(s, messages)]
