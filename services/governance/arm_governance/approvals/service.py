"""Approvals: the state machine (pure functions over the Approval message), and the store that
requests, decides, cancels, expires and escalates them, each change in one transaction with its
change record in the outbox and a change notice for watchers on every replica.

Rules (SPEC §3 Approvals): PENDING → ESCALATED | APPROVED | DENIED | EXPIRED | CANCELLED;
ESCALATED → APPROVED | DENIED | EXPIRED | CANCELLED. HIGH and CRITICAL need two approving
decisions by two different operators; one DENY is final. The requester never decides their own
request. A decision after the expiry time first records EXPIRED (never a denial), then the call
fails FAILED_PRECONDITION / APPROVAL_EXPIRED."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import json_format
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from arm.common.v1 import common_pb2
from arm.governance.v1 import approvals_pb2 as apb
from arm_common import pagination
from arm_common import validation as val
from arm_common.auth import Principal, actor_of
from arm_common.change_records import change_record as build_change_record
from arm_common.db import Database, rowcount
from arm_common.errors import (
    Aborted,
    DatabaseUnavailable,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Violations,
)
from arm_common.ids import new_id
from arm_common.messages import ts
from arm_common.notify import ChangeChannel
from arm_common.outbox import TOPIC_CHANGE_RECORD, enqueue
from arm_common.tables import utcnow
from arm_common.tasks import cancel_and_wait
from arm_governance import models
from arm_governance.approvals.rules import (
    ESCALATE_EVERY,
    MAX_TTL,
    RISK_LEVELS,
    default_ttl,
    required_decisions,
)
from arm_governance.decisions.service import argument_digest
from arm_governance.models import OUTBOX
from arm_governance.webhooks import service as webhooks

log = logging.getLogger(__name__)
CR = common_pb2.ChangeRecordType
A = apb.ApprovalActionType
S = apb.ApprovalStatus
W = webhooks.E

OPEN = (S.APPROVAL_STATUS_PENDING, S.APPROVAL_STATUS_ESCALATED)
FINAL = (S.APPROVAL_STATUS_APPROVED, S.APPROVAL_STATUS_DENIED, S.APPROVAL_STATUS_EXPIRED,
         S.APPROVAL_STATUS_CANCELLED)
TRANSITIONS: dict[int, tuple[int, ...]] = {
    S.APPROVAL_STATUS_PENDING: (S.APPROVAL_STATUS_ESCALATED, *FINAL),
    # ESCALATED → ESCALATED is a further escalation (level + 1).
    S.APPROVAL_STATUS_ESCALATED: (S.APPROVAL_STATUS_ESCALATED, *FINAL),
}
# Who may read approvals besides an agent reading its own.
READ_PERMISSIONS = ("approvals:request", "approvals:decide", "audit:read")
_ACTIONS = set(A.values()) - {0}


def status_name(status: int) -> str:
    return S.Name(status).removeprefix("APPROVAL_STATUS_")


# --- the state machine (pure) --------------------------------------------------------------------

def check_transition(current: int, target: int) -> None:
    """FAILED_PRECONDITION naming the allowed targets when current → target is not allowed."""
    allowed = TRANSITIONS.get(current, ())
    if target not in allowed:
        names = ", ".join(status_name(s) for s in allowed) or "none (final status)"
        raise FailedPrecondition(
            f"an approval cannot go from {status_name(current)} to {status_name(target)}; "
            f"allowed from {status_name(current)}: {names}",
            reason="APPROVAL_NOT_OPEN" if current in FINAL else "INVALID_APPROVAL_TRANSITION",
            metadata={"status": status_name(current), "target": status_name(target)})


def _set_status(a: apb.Approval, target: int, now: datetime) -> None:
    check_transition(a.status, target)
    a.status = target  # type: ignore[assignment]
    a.update_time.CopyFrom(ts(now))
    if target in FINAL:
        a.resolve_time.CopyFrom(ts(now))


def decide(a: apb.Approval, operator_id: str, verdict: int, reason: str, now: datetime) -> apb.Approval:
    """The approval after one operator's verdict (a copy). Raises when the verdict is not
    allowed: final status, expired, the requester deciding, or an operator deciding twice."""
    if a.status == S.APPROVAL_STATUS_EXPIRED:
        raise FailedPrecondition(f"approval {a.approval_id} expired; request a new one",
                                 reason="APPROVAL_EXPIRED", metadata={"approval_id": a.approval_id})
    if a.status in FINAL:
        check_transition(a.status, S.APPROVAL_STATUS_APPROVED)
    if a.expire_time.ToDatetime(tzinfo=UTC) <= now:
        raise FailedPrecondition(f"approval {a.approval_id} expired; request a new one",
                                 reason="APPROVAL_EXPIRED", metadata={"approval_id": a.approval_id})
    if a.requester.id == operator_id:
        raise PermissionDenied("the requester may not decide their own approval",
                               reason="SELF_APPROVAL", metadata={"approval_id": a.approval_id})
    if any(d.operator_id == operator_id for d in a.decisions):
        raise FailedPrecondition(
            "this operator already decided; a two-decision approval needs a different operator",
            reason="ALREADY_DECIDED", metadata={"approval_id": a.approval_id, "operator_id": operator_id})
    out = apb.Approval()
    out.CopyFrom(a)
    out.decisions.append(apb.ApprovalDecision(operator_id=operator_id, verdict=verdict,  # type: ignore[arg-type]
                                              reason=reason, decide_time=ts(now)))
    approvals = sum(1 for d in out.decisions if d.verdict == apb.APPROVAL_VERDICT_APPROVE)
    if verdict == apb.APPROVAL_VERDICT_DENY:
        _set_status(out, S.APPROVAL_STATUS_DENIED, now)
    elif approvals >= out.required_decisions:
        _set_status(out, S.APPROVAL_STATUS_APPROVED, now)
    else:
        out.update_time.CopyFrom(ts(now))
    return out


def cancel(a: apb.Approval, reason: str, now: datetime) -> apb.Approval:
    out = apb.Approval()
    out.CopyFrom(a)
    _set_status(out, S.APPROVAL_STATUS_CANCELLED, now)
    out.cancellation_reason = reason
    return out


def expire(a: apb.Approval, now: datetime) -> apb.Approval:
    out = apb.Approval()
    out.CopyFrom(a)
    _set_status(out, S.APPROVAL_STATUS_EXPIRED, now)
    return out


def escalate(a: apb.Approval, levels: int, now: datetime) -> apb.Approval:
    out = apb.Approval()
    out.CopyFrom(a)
    _set_status(out, S.APPROVAL_STATUS_ESCALATED, now)
    out.escalation_level += levels
    return out


# --- conversions -----------------------------------------------------------------------------------

def to_proto(row: models.Approval) -> apb.Approval:
    """The stored message with the columns other writers change without rewriting the body
    (consumption by Check) laid over it."""
    a = apb.Approval.FromString(row.body)
    a.status = row.status  # type: ignore[assignment]
    a.escalation_level = row.escalation_level
    a.expire_time.CopyFrom(ts(row.expires_at))
    if row.consumed_at is not None:
        a.consume_time.CopyFrom(ts(row.consumed_at))
    if row.resolved_at is not None:
        a.resolve_time.CopyFrom(ts(row.resolved_at))
    a.etag = str(row.revision)
    return a


SYSTEM_ACTOR = common_pb2.Actor(type=common_pb2.ACTOR_TYPE_SYSTEM, id="approval-expiry")


def change_record(tenant_id: str, type_: int, actor: common_pb2.Actor, a: apb.Approval, summary: str, *,
                  before: str = "", reason: str = "", payload: dict[str, Any] | None = None
                  ) -> common_pb2.ChangeRecord:
    return build_change_record(
        type_, tenant_id=tenant_id, actor=actor, target_type="approval", target_id=a.approval_id,
        project_id=a.project_id, version_id=a.version_id, instance_id=a.instance_id, summary=summary,
        reason=reason, before={"status": before} if before else None,
        after={"status": status_name(a.status), "decisions": len(a.decisions),
               "escalation_level": a.escalation_level},
        payload={"action_type": A.Name(a.action_type), "target_id": a.target_id,
                 "risk": common_pb2.RiskLevel.Name(a.risk), **(payload or {})},
        source="governance")


# --- validation ------------------------------------------------------------------------------------

def validate_request(r: apb.RequestApprovalRequest) -> None:
    v = Violations()
    val.standard_fields(v, r)
    val.enum_set(v, "action_type", r.action_type, _ACTIONS)
    val.enum_set(v, "risk", r.risk, RISK_LEVELS)
    for name in ("project_id", "instance_id", "version_id", "target_id"):
        val.resource_id(v, name, getattr(r, name), required_=False)
    val.optional(v, "tool_name", r.tool_name, 200)
    val.optional(v, "justification", r.justification, val.MAX_TEXT)
    val.optional(v, "rollback_plan", r.rollback_plan, val.MAX_TEXT)
    val.optional(v, "run_id", r.run_id, 128)
    val.optional(v, "tool_call_id", r.tool_call_id, 128)
    if not math.isfinite(r.estimated_cost_usd) or r.estimated_cost_usd < 0:
        v.add("estimated_cost_usd", "must be a finite number >= 0")
    if r.HasField("ttl"):
        ttl = r.ttl.ToTimedelta()
        if ttl <= timedelta(0) or ttl > MAX_TTL:
            v.add("ttl", "must be positive and at most 30 days")
    needs = {A.APPROVAL_ACTION_TYPE_TOOL_EXECUTION: ("instance_id", "tool_name"),
             A.APPROVAL_ACTION_TYPE_VERSION_PROMOTION: ("version_id",),
             A.APPROVAL_ACTION_TYPE_INSTANCE_REACTIVATION: ("instance_id",),
             A.APPROVAL_ACTION_TYPE_INSTANCE_QUARANTINE: ("instance_id",),
             A.APPROVAL_ACTION_TYPE_DEPLOYMENT_ACTIVATION: ("target_id",),
             A.APPROVAL_ACTION_TYPE_POLICY_AUTONOMY_INCREASE: ("target_id",)}.get(r.action_type, ())
    for name in needs:
        if not getattr(r, name):
            v.add(name, f"is required for {A.Name(r.action_type).removeprefix('APPROVAL_ACTION_TYPE_')}")
    if r.ByteSize() > 128 * 1024:
        v.add("arguments", "the request must be at most 128 KiB")
    v.raise_if_any()


def validate_list(r: apb.ListApprovalsRequest) -> None:
    v = Violations()
    val.standard_fields(v, r)
    for i, status in enumerate(r.statuses):
        val.enum_set(v, f"statuses[{i}]", status, set(S.values()) - {0})
    val.resource_id(v, "instance_id", r.instance_id, required_=False)
    if r.action_type and r.action_type not in _ACTIONS:
        v.add("action_type", f"unknown enum value {r.action_type}")
    if r.min_risk and r.min_risk not in RISK_LEVELS:
        v.add("min_risk", f"unknown enum value {r.min_risk}")
    v.raise_if_any()


def validate_decide(r: apb.DecideApprovalRequest) -> None:
    v = Violations()
    val.standard_fields(v, r)
    val.resource_id(v, "approval_id", r.approval_id)
    val.enum_set(v, "verdict", r.verdict, {1, 2})
    v.raise_if_any()


def validate_cancel(r: apb.CancelApprovalRequest) -> None:
    v = Violations()
    val.standard_fields(v, r)
    val.resource_id(v, "approval_id", r.approval_id)
    v.raise_if_any()


def can_read(p: Principal) -> None:
    if p.is_agent or any(p.has(name) for name in READ_PERMISSIONS):
        return
    raise PermissionDenied("reading approvals needs approvals:request, approvals:decide or audit:read",
                           reason="MISSING_PERMISSION", metadata={"permission": "|".join(READ_PERMISSIONS),
                                                                  "actor_id": p.actor_id})


# --- the store ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Subject:
    """What registry said about the agent or version an approval concerns."""

    project_id: str = ""
    version_id: str = ""


class ApprovalStore:
    def __init__(self, db: Database, changes: ChangeChannel) -> None:
        self.db = db
        self.changes = changes

    async def _notify(self, s: AsyncSession, approval_id: str) -> None:
        await self.changes.send(s, {"approval": approval_id})

    async def _changed(self, s: AsyncSession, approval_id: str, rec: common_pb2.ChangeRecord) -> None:
        """In the change's transaction: its change record to the outbox, and a notice that wakes
        watchers on every replica once it commits."""
        await enqueue(s, OUTBOX, topic=TOPIC_CHANGE_RECORD, tenant_id=rec.tenant_id,
                      message_id=rec.record_id, message=rec)
        await self._notify(s, approval_id)

    @staticmethod
    async def check_exists(s: AsyncSession, tenant_id: str, approval_id: str) -> None:
        """NOT_FOUND unless the approval is one of the tenant's (whoever it is for)."""
        a = models.Approval
        if (await s.execute(select(a.id).where(a.id == approval_id, a.tenant_id == tenant_id))).first() is None:
            raise NotFound.of("approval", approval_id)

    async def row(self, s: AsyncSession, p: Principal, approval_id: str, *,
                  for_update: bool = False) -> models.Approval:
        """The approval of the caller's tenant; an agent sees only its own instance's."""
        q = select(models.Approval).where(models.Approval.id == approval_id,
                                          models.Approval.tenant_id == p.tenant_id)
        if for_update:
            q = q.with_for_update()
        row = (await s.execute(q)).scalar_one_or_none()
        if row is None or (p.is_agent and row.instance_id != p.actor_id):
            raise NotFound.of("approval", approval_id)
        return row

    async def get(self, p: Principal, approval_id: str) -> apb.Approval:
        async def read(s: AsyncSession) -> apb.Approval:
            return to_proto(await self.row(s, p, approval_id))
        return await self.db.read(read)

    async def request(self, s: AsyncSession, p: Principal, r: apb.RequestApprovalRequest,
                      subject: Subject) -> apb.Approval:
        a = models.Approval
        if r.action_type == A.APPROVAL_ACTION_TYPE_TOOL_EXECUTION and r.tool_call_id:
            existing = (await s.execute(select(a).where(
                a.tenant_id == p.tenant_id, a.instance_id == r.instance_id,
                a.tool_call_id == r.tool_call_id))).scalar_one_or_none()
            if existing is not None:
                return to_proto(existing)
        now = utcnow()
        expires = now + (r.ttl.ToTimedelta() if r.HasField("ttl") else default_ttl(r.action_type))
        args = json_format.MessageToDict(r.arguments) if r.HasField("arguments") else None
        digest = argument_digest(args) if r.action_type == A.APPROVAL_ACTION_TYPE_TOOL_EXECUTION else ""
        msg = apb.Approval(
            approval_id=new_id("apr"), tenant_id=p.tenant_id,
            project_id=subject.project_id or r.project_id, instance_id=r.instance_id,
            version_id=r.version_id or subject.version_id, action_type=r.action_type,
            target_id=r.target_id, tool_name=r.tool_name, argument_digest=digest,
            arguments=r.arguments if r.HasField("arguments") else None, risk=r.risk,
            justification=r.justification, rollback_plan=r.rollback_plan,
            estimated_cost_usd=r.estimated_cost_usd, escalation_level=0,
            required_decisions=required_decisions(r.risk), status=S.APPROVAL_STATUS_PENDING,
            expire_time=ts(expires), requester=actor_of(p), run_id=r.run_id, tool_call_id=r.tool_call_id,
            create_time=ts(now), update_time=ts(now), etag="1")
        s.add(models.Approval(
            id=msg.approval_id, tenant_id=p.tenant_id, project_id=msg.project_id,
            instance_id=msg.instance_id, version_id=msg.version_id, action_type=msg.action_type,
            tool_name=msg.tool_name, tool_call_id=r.tool_call_id or None, run_id=r.run_id,
            argument_digest=digest, risk=msg.risk, estimated_cost_usd=msg.estimated_cost_usd,
            required_decisions=msg.required_decisions, escalation_level=0, status=msg.status,
            decision_id="", requested_by=p.actor_id, body=msg.SerializeToString(), created_at=now,
            expires_at=expires, consumed_at=None, revision=1, target_id=r.target_id,
            escalate_at=now + ESCALATE_EVERY, resolved_at=None))
        await s.flush()
        rec = change_record(p.tenant_id, CR.CHANGE_RECORD_TYPE_APPROVAL_REQUESTED, actor_of(p), msg,
                            f"{A.Name(msg.action_type).removeprefix('APPROVAL_ACTION_TYPE_')} approval requested",
                            reason=r.justification)
        await self._changed(s, msg.approval_id, rec)
        await webhooks.enqueue_notification(s, W.WEBHOOK_EVENT_TYPE_APPROVAL_REQUESTED, msg, actor_of(p),
                                            r.justification)
        return msg

    def _save(self, row: models.Approval, a: apb.Approval, now: datetime) -> None:
        row.revision += 1
        a.etag = str(row.revision)
        row.status = a.status
        row.escalation_level = a.escalation_level
        row.body = a.SerializeToString()
        if a.status in FINAL:
            row.resolved_at = now
            row.escalate_at = None

    async def expire_if_due(self, p: Principal, approval_id: str) -> None:
        """Records EXPIRED now if the approval is open and past its expiry (what a late
        decision finds); a no-op otherwise."""
        async def write(s: AsyncSession) -> None:
            row = await self.row(s, p, approval_id, for_update=True)
            await self._expire_row(s, row, utcnow())
        await self.db.run(write)

    async def _expire_row(self, s: AsyncSession, row: models.Approval, now: datetime) -> bool:
        if row.status not in OPEN or row.expires_at > now:
            return False
        before = row.status
        a = expire(to_proto(row), now)
        self._save(row, a, now)
        rec = change_record(row.tenant_id, CR.CHANGE_RECORD_TYPE_APPROVAL_DECIDED, SYSTEM_ACTOR, a,
                            "approval expired (timeout, not a denial)", before=status_name(before))
        await self._changed(s, row.id, rec)
        await webhooks.enqueue_notification(s, W.WEBHOOK_EVENT_TYPE_APPROVAL_EXPIRED, a, SYSTEM_ACTOR)
        return True

    async def decide(self, s: AsyncSession, p: Principal, r: apb.DecideApprovalRequest) -> apb.Approval:
        row = await self.row(s, p, r.approval_id, for_update=True)
        p.require("approvals:decide", project_id=row.project_id)
        if r.etag and r.etag != str(row.revision):
            raise Aborted(f"etag {r.etag!r} does not match the current {row.revision}; re-read and retry",
                          reason="ETAG_MISMATCH", metadata={"current_etag": str(row.revision)})
        now = utcnow()
        before = row.status
        a = decide(to_proto(row), p.actor_id, r.verdict, r.reason, now)
        self._save(row, a, now)
        verdict = apb.ApprovalVerdict.Name(r.verdict).removeprefix("APPROVAL_VERDICT_")
        rec = change_record(p.tenant_id, CR.CHANGE_RECORD_TYPE_APPROVAL_DECIDED, actor_of(p), a,
                            f"{verdict} by {p.actor_id}: approval {status_name(a.status)}",
                            before=status_name(before), reason=r.reason, payload={"verdict": verdict})
        await self._changed(s, row.id, rec)
        await webhooks.enqueue_notification(s, W.WEBHOOK_EVENT_TYPE_APPROVAL_DECIDED, a, actor_of(p), r.reason)
        return a

    async def cancel(self, s: AsyncSession, p: Principal, r: apb.CancelApprovalRequest) -> apb.Approval:
        row = await self.row(s, p, r.approval_id, for_update=True)
        if row.requested_by != p.actor_id and not p.has("operators:admin"):
            raise PermissionDenied("only the requester or an admin may cancel an approval",
                                   reason="NOT_REQUESTER", metadata={"approval_id": row.id})
        if r.etag and r.etag != str(row.revision):
            raise Aborted(f"etag {r.etag!r} does not match the current {row.revision}; re-read and retry",
                          reason="ETAG_MISMATCH", metadata={"current_etag": str(row.revision)})
        now = utcnow()
        before = row.status
        a = cancel(to_proto(row), r.reason, now)
        self._save(row, a, now)
        rec = change_record(p.tenant_id, CR.CHANGE_RECORD_TYPE_APPROVAL_CANCELLED, actor_of(p), a,
                            "approval cancelled", before=status_name(before), reason=r.reason)
        await self._changed(s, row.id, rec)
        await webhooks.enqueue_notification(s, W.WEBHOOK_EVENT_TYPE_APPROVAL_CANCELLED, a, actor_of(p), r.reason)
        return a

    async def list(self, p: Principal, r: apb.ListApprovalsRequest) -> apb.ListApprovalsResponse:
        size = pagination.page_size(r.page_size)
        instance = p.actor_id if p.is_agent else r.instance_id
        filters = {"statuses": sorted(r.statuses), "instance": instance, "action": r.action_type,
                   "risk": r.min_risk,
                   "after": r.created_after.ToJsonString() if r.HasField("created_after") else "",
                   "before": r.created_before.ToJsonString() if r.HasField("created_before") else ""}
        after = pagination.decode_time_id_token(r.page_token, filters)
        m = models.Approval

        async def read(s: AsyncSession) -> apb.ListApprovalsResponse:
            q = select(m).where(m.tenant_id == p.tenant_id)
            if r.statuses:
                q = q.where(m.status.in_(list(r.statuses)))
            if instance:
                q = q.where(m.instance_id == instance)
            if r.action_type:
                q = q.where(m.action_type == r.action_type)
            if r.min_risk:
                q = q.where(m.risk >= r.min_risk)
            if r.HasField("created_after"):
                q = q.where(m.created_at >= r.created_after.ToDatetime(tzinfo=UTC))
            if r.HasField("created_before"):
                q = q.where(m.created_at < r.created_before.ToDatetime(tzinfo=UTC))
            rows = (await s.execute(pagination.newest_first_page(q, m.created_at, m.id, after, size))).scalars().all()
            page, more = pagination.split_page(rows, size)
            return apb.ListApprovalsResponse(approvals=[to_proto(row) for row in page],
                                             next_page_token=pagination.time_id_token(page, more, filters))

        return await self.db.read(read)

    async def approved_for(self, s: AsyncSession, tenant_id: str, approval_id: str, action_type: int,
                           target_id: str) -> models.Approval:
        """An APPROVED approval of this type and target (deployment activation), or
        FAILED_PRECONDITION saying what is wrong with it."""
        row = (await s.execute(select(models.Approval).where(
            models.Approval.id == approval_id, models.Approval.tenant_id == tenant_id))).scalar_one_or_none()
        if row is None:
            raise NotFound.of("approval", approval_id)
        if row.action_type != action_type or row.target_id != target_id:
            raise FailedPrecondition(
                f"approval {approval_id} is not a {A.Name(action_type)} approval for {target_id}",
                reason="APPROVAL_MISMATCH", metadata={"approval_id": approval_id, "target_id": target_id})
        if row.status != S.APPROVAL_STATUS_APPROVED:
            raise FailedPrecondition(f"approval {approval_id} is {status_name(row.status)}, not APPROVED",
                                     reason="APPROVAL_NOT_APPROVED",
                                     metadata={"approval_id": approval_id, "status": status_name(row.status)})
        if row.expires_at <= utcnow():
            raise FailedPrecondition(f"approval {approval_id} expired", reason="APPROVAL_EXPIRED",
                                     metadata={"approval_id": approval_id})
        return row

    # --- background: expiry and escalation --------------------------------------------------------

    async def sweep(self, now: datetime | None = None, *, limit: int = 500) -> tuple[int, int]:
        """Expires and escalates due approvals; returns (expired, escalated). Safe on every
        replica at once: each row changes under a conditional UPDATE on its revision, so a row
        another replica already moved is skipped, and its change record is written once."""
        now = now or utcnow()
        m = models.Approval

        async def due(s: AsyncSession) -> list[tuple[str, int]]:
            rows = (await s.execute(select(m.id, m.revision).where(
                m.status.in_(OPEN), (m.expires_at <= now) | (m.escalate_at <= now)).limit(limit))).all()
            return [(r.id, r.revision) for r in rows]

        expired = escalated = 0
        for approval_id, revision in await self.db.read(due):
            outcome = await self.db.run(functools.partial(self._sweep_one, approval_id=approval_id,
                                                          revision=revision, now=now))
            expired += outcome == "expired"
            escalated += outcome == "escalated"
        return expired, escalated

    async def _sweep_one(self, s: AsyncSession, approval_id: str, revision: int, now: datetime) -> str:
        m = models.Approval
        row = (await s.execute(select(m).where(m.id == approval_id))).scalar_one()
        if row.revision != revision or row.status not in OPEN:
            return ""
        before = row.status
        if row.expires_at <= now:
            a = expire(to_proto(row), now)
            kind, summary, actor = "expired", "approval expired (timeout, not a denial)", SYSTEM_ACTOR
        elif row.escalate_at is not None and row.escalate_at <= now:
            levels = int((now - row.escalate_at) / ESCALATE_EVERY) + 1
            a = escalate(to_proto(row), levels, now)
            kind, summary, actor = "escalated", f"approval escalated to level {a.escalation_level}", SYSTEM_ACTOR
        else:
            return ""
        a.etag = str(revision + 1)
        values: dict[str, Any] = {"status": a.status, "escalation_level": a.escalation_level,
                                  "body": a.SerializeToString(), "revision": revision + 1}
        if kind == "expired":
            values.update(resolved_at=now, escalate_at=None)
        else:
            values["escalate_at"] = row.escalate_at + ESCALATE_EVERY * (a.escalation_level - row.escalation_level)
        result = await s.execute(update(m).where(m.id == approval_id, m.revision == revision,
                                                 m.status.in_(OPEN)).values(**values)
                                 .execution_options(synchronize_session=False))
        if not rowcount(result):
            return ""
        if kind == "expired":  # escalations are not in the audit trail's record types
            rec = change_record(row.tenant_id, CR.CHANGE_RECORD_TYPE_APPROVAL_DECIDED, actor, a, summary,
                                before=status_name(before))
            await enqueue(s, OUTBOX, topic=TOPIC_CHANGE_RECORD, tenant_id=row.tenant_id,
                          message_id=rec.record_id, message=rec)
        await webhooks.enqueue_notification(s, W.WEBHOOK_EVENT_TYPE_APPROVAL_EXPIRED if kind == "expired"
                                            else W.WEBHOOK_EVENT_TYPE_APPROVAL_ESCALATED, a, SYSTEM_ACTOR)
        await self._notify(s, approval_id)
        return kind

    # --- watching --------------------------------------------------------------------------------

    async def watch(self, p: Principal, approval_id: str, recheck_s: float) -> AsyncIterator[apb.Approval]:
        """The approval now, then after each change, until a final status. Change notices wake
        it on every replica; a re-read every `recheck_s` covers a notice that never came."""
        queue = self.changes.subscribe()
        try:
            current = await self.get(p, approval_id)
            yield current
            while current.status not in FINAL:
                try:
                    notice = await asyncio.wait_for(queue.get(), recheck_s)
                    if not (notice.get("reset") or notice.get("approval") == approval_id):
                        continue
                except TimeoutError:
                    pass
                fresh = await self.get(p, approval_id)
                if fresh.etag != current.etag:
                    yield fresh
                current = fresh
        finally:
            self.changes.unsubscribe(queue)


class ApprovalSweeper:
    """Runs ApprovalStore.sweep every `interval_s` in the background."""

    def __init__(self, store: ApprovalStore, interval_s: float) -> None:
        self.store = store
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="approval-sweeper")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            try:
                await self.store.sweep()
            except asyncio.CancelledError:
                raise
            except DatabaseUnavailable:
                pass  # said once by the database's outage log; sweep again next round
            except Exception:  # noqa: BLE001 - keep sweeping through outages
                log.exception("approval sweep failed; retrying")
            await asyncio.sleep(self.interval_s)
