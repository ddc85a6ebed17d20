"""The decision path (`Check`): resolve the agent and its compiled policy from memory, evaluate
with the pure engine, log durably (group commit), answer. Database work per call is limited to
the commit of the decision log, plus a lookup when an approval id is presented or a budget
applies and the spend is not cached."""

from __future__ import annotations

import dataclasses
import math
import time
from datetime import datetime
from typing import Any

from google.protobuf import struct_pb2
from opentelemetry import trace
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from arm.common.v1 import common_pb2
from arm.governance.v1 import approvals_pb2, decision_pb2, policy_pb2
from arm_common import otel
from arm_common import validation as val
from arm_common.auth import Principal, actor_of
from arm_common.canonical import canonical_hash
from arm_common.change_records import change_record
from arm_common.db import Database
from arm_common.errors import FieldViolation, InvalidArgument, PermissionDenied, Violations
from arm_common.ids import new_id
from arm_common.messages import struct, ts
from arm_common.outbox import TOPIC_CHANGE_RECORD
from arm_common.tables import utcnow
from arm_common.tagged_cache import TaggedCache
from arm_engine import engine
from arm_governance import convert, models
from arm_governance.agent_cache import AgentDirectory
from arm_governance.approvals.rules import ESCALATE_EVERY, RISK_LEVELS, TOOL_APPROVAL_TTL, required_decisions
from arm_governance.decisions.log import DecisionLog, PendingDecision
from arm_governance.policy import limits
from arm_governance.policy.cache import PolicyCache
from arm_governance.webhooks import service as webhooks

MAX_ARGUMENT_BYTES = 64 * 1024
_OPEN = (approvals_pb2.APPROVAL_STATUS_PENDING, approvals_pb2.APPROVAL_STATUS_ESCALATED)


def validate_check(request: decision_pb2.CheckRequest, prefix: str = "") -> None:
    v = Violations()
    kind = request.WhichOneof("agent")
    if kind is None:
        v.add(f"{prefix}agent", "set instance_id or legacy_agent_id")
    else:
        val.resource_id(v, f"{prefix}{kind}", getattr(request, kind))
    limits.tool_name(v, f"{prefix}tool_name", request.tool_name)
    if request.declared_risk and request.declared_risk not in RISK_LEVELS:
        v.add(f"{prefix}declared_risk", f"unknown enum value {request.declared_risk}")
    if not math.isfinite(request.estimated_cost_usd) or request.estimated_cost_usd < 0:
        v.add(f"{prefix}estimated_cost_usd", "must be a finite number >= 0")
    for name in ("run_id", "tool_call_id", "request_id"):
        val.optional(v, f"{prefix}{name}", getattr(request, name), 128)
    val.resource_id(v, f"{prefix}approval_id", request.approval_id, required_=False)
    if request.ByteSize() > MAX_ARGUMENT_BYTES + 4096:
        v.add(f"{prefix}arguments", f"the request must be at most {MAX_ARGUMENT_BYTES} bytes")
    v.raise_if_any()


def argument_digest(arguments: dict[str, Any] | None) -> str:
    return canonical_hash(arguments) if arguments else _EMPTY_DIGEST


_EMPTY_DIGEST = canonical_hash({})


def provenance(result: engine.Result) -> dict[str, Any]:
    """What decided, as opEvent payloads (op_events.py), POLICY_DENIED records and decision spans name it:
    the deciding envelope's id, revision, scope and rule, and the step (envelope fields empty
    when no envelope decided). The policy epoch is added per call."""
    return {
        "decision": policy_pb2.Decision.Name(int(result.effect)),
        "risk": common_pb2.RiskLevel.Name(int(result.risk)),
        "step": decision_pb2.DecisionStep.Name(int(result.step)),
        "envelope_id": result.envelope_id,
        "envelope_revision": result.envelope_revision,
        "scope": policy_pb2.PolicyScope.Name(int(result.scope)) if result.scope else "",
        "scope_id": result.scope_id,
        "rule_kind": policy_pb2.RuleKind.Name(int(result.rule_kind)) if result.rule_kind else "",
        "rule_index": result.rule_index if result.rule_index is not None else -1,
        "rule_description": result.rule_description,
    }


PROVENANCE = convert.ResultCache(provenance)


def _payload_fields(result: engine.Result) -> bytes:
    """The POLICY_DENIED payload fields that depend on the result alone (provenance and reason
    codes, as in the opEvent payload), serialized (a Struct's fields are map entries, so the
    per-call ones are added after parsing these)."""
    payload = struct_pb2.Struct()
    payload.update(PROVENANCE.get(result))
    payload.fields["reasons"].list_value.values.extend(
        struct_pb2.Value(string_value=r.code) for r in result.reasons)
    return payload.SerializeToString()


_PAYLOAD_FIELDS = convert.ResultCache(_payload_fields)


_tracer = trace.get_tracer("arm.governance")


def span_attributes(response: decision_pb2.CheckResponse, tenant_id: str) -> dict[str, Any]:
    """A decision span's attributes: the decision, risk, step, deciding envelope (id, revision,
    scope, rule) and policy epoch, as in the opEvent payload and the decision log."""
    attributes: dict[str, Any] = {
        "arm.tenant_id": tenant_id,
        "arm.decision_id": response.decision_id,
        "arm.decision": policy_pb2.Decision.Name(response.decision),
        "arm.decision.risk": common_pb2.RiskLevel.Name(response.effective_risk),
        "arm.decision.step": decision_pb2.DecisionStep.Name(response.step),
        "arm.policy.epoch": response.policy_epoch,
        "arm.policy.envelope_id": response.envelope_id,
        "arm.policy.envelope_revision": response.envelope_revision,
        "arm.policy.scope": policy_pb2.PolicyScope.Name(response.scope),
        "arm.policy.scope_id": response.scope_id,
        "arm.policy.rule_kind": policy_pb2.RuleKind.Name(response.rule_kind),
        "arm.policy.rule_description": response.rule_description,
    }
    if response.HasField("rule_index"):
        attributes["arm.policy.rule_index"] = response.rule_index
    return attributes


class _AgentForms:
    """A resolved agent as the decision path needs it: the engine's dataclass and the serialized
    message for the log, computed once per resolution object (the agent directory hands out the
    same object until the agent changes). Keyed by identity; entries hold their object."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._entries: dict[int, tuple[Any, engine.Agent, bytes]] = {}

    def get(self, resolved: Any) -> tuple[engine.Agent, bytes]:
        entry = self._entries.get(id(resolved))
        if entry is None or entry[0] is not resolved:
            if len(self._entries) >= self.limit:
                self._entries.clear()
            entry = self._entries[id(resolved)] = (resolved, convert.agent_to_engine(resolved),
                                                   resolved.SerializeToString())
        return entry[1], entry[2]


MAX_SNAPSHOT_RUNS = 1000
"""Runs listed in a local-decision spend snapshot; a runtime asks Check for the calls of others."""


class SpendBook:
    """Spend totals per instance for budget checks, cached until a spend notice."""

    def __init__(self, db: Database, *, limit: int = 100_000) -> None:
        self.db = db
        # (tenant, instance, run, day, month) → totals; tagged by instance.
        self._cache: TaggedCache[tuple[str, str, str, str, str], engine.Spend] = TaggedCache(limit)
        self._snapshots: TaggedCache[tuple[str, str, str, str, str], decision_pb2.AgentSpend] = TaggedCache(
            max(1, limit // 10))
        self._generation = 0  # bumped by every spend notice: totals read across one are not cached

    def invalidate(self, instance_id: str | None) -> None:
        self._generation += 1
        if instance_id is None:
            self._cache.clear()
            self._snapshots.clear()
        else:
            self._cache.drop_tagged(("instance", instance_id))
            self._snapshots.drop_tagged(("instance", instance_id))

    async def totals(self, tenant_id: str, instance_id: str, run_id: str, now: datetime) -> engine.Spend:
        day = now.strftime("%Y-%m-%d")
        month = now.strftime("%Y-%m")
        key = (tenant_id, instance_id, run_id, day, month)
        _, hit = self._cache.get(key)
        if hit is not None:
            return hit
        generation = self._generation
        day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        month_start = day_start.replace(day=1)
        e = models.SpendEntry

        async def read(s: AsyncSession) -> engine.Spend:
            base = (e.tenant_id == tenant_id) & (e.instance_id == instance_id)
            month_total = (await s.execute(select(func.coalesce(func.sum(e.amount_usd), 0.0)).where(
                base, e.occurred_at >= month_start))).scalar_one()
            day_total = (await s.execute(select(func.coalesce(func.sum(e.amount_usd), 0.0)).where(
                base, e.occurred_at >= day_start))).scalar_one()
            run_total = 0.0
            if run_id:
                run_total = (await s.execute(select(func.coalesce(func.sum(e.amount_usd), 0.0)).where(
                    base, e.run_id == run_id))).scalar_one()
            return engine.Spend(run_usd=float(run_total), day_usd=float(day_total), month_usd=float(month_total))

        spend = await self.db.read(read)
        if generation == self._generation:
            # Else spend was reported while we read: these totals may miss it, so the next
            # decision reads again rather than letting a budget be overrun from the cache.
            self._cache.put(key, spend, [("instance", instance_id)])
        return spend

    async def snapshot(self, tenant_id: str, instance_id: str, now: datetime) -> decision_pb2.AgentSpend:
        """The instance's totals for the runtime's local decisions (`DecisionInputs.spend`): its
        UTC day's and month's, as `totals` reads them, and every run's (up to MAX_SNAPSHOT_RUNS,
        most recently spent first). Cached like `totals`, until a spend notice or the next day."""
        day = now.strftime("%Y-%m-%d")
        key = (tenant_id, instance_id, "\x00runs", day, "")
        _, hit = self._snapshots.get(key)
        if hit is not None:
            return hit
        generation = self._generation
        totals = await self.totals(tenant_id, instance_id, "", now)
        e = models.SpendEntry

        async def read(s: AsyncSession) -> list[tuple[str, float]]:
            rows = await s.execute(
                select(e.run_id, func.sum(e.amount_usd)).where(
                    e.tenant_id == tenant_id, e.instance_id == instance_id, e.run_id != "")
                .group_by(e.run_id).order_by(func.max(e.occurred_at).desc(), e.run_id)
                .limit(MAX_SNAPSHOT_RUNS + 1))
            return [(run, float(total)) for run, total in rows]

        runs = await self.db.read(read)
        spend = decision_pb2.AgentSpend(day=day, day_usd=totals.day_usd, month_usd=totals.month_usd,
                                        run_usd=dict(runs[:MAX_SNAPSHOT_RUNS]),
                                        runs_complete=len(runs) <= MAX_SNAPSHOT_RUNS)
        if generation == self._generation:
            self._snapshots.put(key, spend, [("instance", instance_id)])
        return spend

    async def record(self, tenant_id: str, instance_id: str, legacy_agent_id: str,
                     e: decision_pb2.SpendEntry, changes: Any) -> decision_pb2.ReportSpendResponse:
        """ReportSpend's write: one ledger entry per (tenant, idempotency key); a repeat returns the
        first entry with `duplicate`. A spend notice drops the cached totals everywhere."""
        now = utcnow()
        occurred = e.occur_time.ToDatetime(tzinfo=now.tzinfo) if e.HasField("occur_time") else now

        async def write(s: AsyncSession) -> Any:
            m = models.SpendEntry
            row = (await s.execute(select(m).where(m.tenant_id == tenant_id,
                                                   m.idempotency_key == e.idempotency_key))).scalar_one_or_none()
            duplicate = row is not None
            if row is None:
                row = m(id=new_id("spd"), tenant_id=tenant_id, instance_id=instance_id,
                        run_id=e.run_id, tool_call_id=e.tool_call_id, amount_usd=e.amount_usd,
                        idempotency_key=e.idempotency_key, occurred_at=occurred, recorded_at=now)
                s.add(row)
                await changes.send(s, {"spend": instance_id})
            return decision_pb2.ReportSpendResponse(entry=convert.spend_entry(row, legacy_agent_id),
                                                    duplicate=duplicate)

        try:
            result = await self.db.run(write)
        except IntegrityError:  # a concurrent report with the same key won: this one is its duplicate
            result = await self.db.run(write)
        self.invalidate(instance_id)
        return result


class Approvals:
    """Grant checks and single-use consumption of tool-execution approvals."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def grant_status(self, tenant_id: str, approval_id: str, instance_id: str, tool: str,
                           digest: str) -> str:
        async def read(s: AsyncSession) -> str:
            row = (await s.execute(select(models.Approval).where(
                models.Approval.id == approval_id, models.Approval.tenant_id == tenant_id))).scalar_one_or_none()
            if row is None:
                return "NOT_FOUND"
            if row.status == approvals_pb2.APPROVAL_STATUS_EXPIRED or row.expires_at <= utcnow():
                return "EXPIRED"
            bound = (row.action_type == approvals_pb2.APPROVAL_ACTION_TYPE_TOOL_EXECUTION
                     and row.instance_id == instance_id and row.tool_name == tool and row.argument_digest == digest)
            if row.status in _OPEN:
                # Still being decided: the caller waits for it when it is this call's approval.
                return "PENDING" if bound else "NOT_APPROVED"
            if row.status != approvals_pb2.APPROVAL_STATUS_APPROVED:
                return "NOT_APPROVED"
            if row.consumed_at is not None:
                return "USED"
            return "VALID" if bound else "MISMATCH"
        return await self.db.read(read)

    async def logged_response(self, tenant_id: str, request_id: str) -> decision_pb2.CheckResponse | None:
        """The logged answer to an earlier request with this request id, if any."""
        async def read(s: AsyncSession) -> bytes | None:
            d = models.DecisionRecord
            return (await s.execute(select(d.response).where(
                d.tenant_id == tenant_id, d.request_id == request_id))).scalar_one_or_none()
        raw = await self.db.read(read)
        return decision_pb2.CheckResponse.FromString(raw) if raw is not None else None



class Decider:
    def __init__(self, agents: AgentDirectory, policies: PolicyCache, log: DecisionLog,
                 spend: SpendBook, approvals: Approvals,
                 classifier: engine.Classifier | None = None) -> None:
        self.agents = agents
        self.policies = policies
        self.log = log
        self.spend = spend
        self.approvals = approvals
        self.classifier = classifier or engine.DEFAULT_CLASSIFIER
        self._agent_forms = _AgentForms()
        self.traced = otel.enabled()

    async def check(self, principal: Principal, api_key: str,
                    request: decision_pb2.CheckRequest) -> decision_pb2.CheckResponse:
        """Decides and logs one call. With OpenTelemetry on, inside a `governance.decide` span
        (attributes: what decided, see span_attributes) and counted in the decision metrics;
        off, none of that is built."""
        if not self.traced:
            return await self._check(principal, api_key, request)
        started = time.perf_counter()
        with _tracer.start_as_current_span("governance.decide") as span:
            response = await self._check(principal, api_key, request)
            if span.is_recording():
                span.set_attributes(span_attributes(response, principal.tenant_id))
        otel.record_decision(policy_pb2.Decision.Name(response.decision), principal.tenant_id,
                             decision_pb2.DecisionStep.Name(response.step),
                             (time.perf_counter() - started) * 1000)
        return response

    async def _check(self, principal: Principal, api_key: str,
                     request: decision_pb2.CheckRequest) -> decision_pb2.CheckResponse:
        principal.require("decisions:check")
        resolved = await resolve_caller_agent(self.agents, principal, api_key, request)
        tenant = await self.policies.tenant(principal.tenant_id)
        now = utcnow()
        args = convert.arguments(request)
        digest = argument_digest(args)
        agent, agent_bytes = self._agent_forms.get(resolved) if resolved is not None else (None, b"")
        if agent is not None:
            policy, has_budgets = tenant.compiled(agent.project_id, agent.version_id)
            controls = tenant.controls_for(agent.project_id)
        else:
            policy, has_budgets = tenant.compiled("", "")
            controls = engine.Controls()
        spend = engine.Spend()
        if agent is not None and has_budgets:
            spend = await self.spend.totals(principal.tenant_id, agent.instance_id, request.run_id, now)
        grant = None
        if request.approval_id and request.request_id:
            # A retry presenting an approval is answered from the log before the grant is looked
            # at: else an approval granted since the first answer (say, NEEDS_APPROVAL while it
            # was pending) would be used up here while the log answers with the first response.
            earlier = await self.approvals.logged_response(principal.tenant_id, request.request_id)
            if earlier is not None:
                return earlier
        if request.approval_id and agent is not None:
            grant = engine.Grant(await self.approvals.grant_status(
                principal.tenant_id, request.approval_id, agent.instance_id, request.tool_name, digest))
        elif request.approval_id:
            grant = engine.Grant("NOT_FOUND")
        call = engine.Call(tool=request.tool_name, arguments=args,
                           declared_risk=engine.Risk(request.declared_risk) if request.declared_risk else None,
                           estimated_cost_usd=request.estimated_cost_usd, is_run_start=request.is_run_start,
                           grant=grant)
        classifier = tenant.classifier or self.classifier
        result = engine.decide(policy, agent, call, controls=controls, spend=spend, classifier=classifier)
        decision_id = new_id("dec")
        pending = self.pending(principal, request, resolved, agent_bytes, result, tenant.epoch, digest, args, now,
                               decision_id)
        if (grant is not None and grant.status == "VALID" and result.step == engine.Step.APPROVAL_GRANT
                and result.effect == engine.Effect.ALLOW):
            # The grant is used up in the transaction that logs this decision; if another call
            # used it first (read and use are apart), the decision with the grant USED is logged.
            used = engine.decide(policy, agent, dataclasses.replace(call, grant=engine.Grant("USED")),
                                 controls=controls, spend=spend, classifier=classifier)
            pending.consume = request.approval_id
            pending.if_used = self.pending(principal, request, resolved, agent_bytes, used, tenant.epoch, digest,
                                           args, now, decision_id)
        return await self.log.append(pending)

    def pending(self, principal: Principal, request: decision_pb2.CheckRequest, resolved: Any,
                agent_bytes: bytes, result: engine.Result, epoch: int, digest: str,
                args: dict[str, Any] | None, now: datetime, decision_id: str) -> PendingDecision:
        """What logging one decision writes (the decision row, a POLICY_DENIED or APPROVAL_CONSUMED
        record, a NEEDS_APPROVAL's approval; its opEvent is derived from the row, see
        op_events.py); also used for the decisions runtimes make locally (local.py)."""
        approval_row = None
        # An ALLOW from a grant names the approval it used up; a NEEDS_APPROVAL from a presented
        # approval still open names that approval (no new one).
        granted = result.step == engine.Step.APPROVAL_GRANT and result.effect != engine.Effect.DENY
        approval_id = request.approval_id if granted else ""
        if result.effect == engine.Effect.NEEDS_APPROVAL and resolved is not None and not granted:
            approval_id = new_id("apr")
            approval_row = self._approval_row(principal, request, resolved, result, approval_id,
                                              decision_id, digest, args, now)
        response = convert.result_to_response(result, decision_id=decision_id, approval_id=approval_id,
                                              epoch=epoch, request_id=request.request_id, decided=now)
        record = dict(
            id=decision_id, tenant_id=principal.tenant_id, request_id=request.request_id or None,
            instance_id=resolved.instance_id if resolved is not None else "",
            legacy_agent_id=(resolved.legacy_agent_id if resolved is not None else request.legacy_agent_id),
            version_id=resolved.version_id if resolved is not None else "",
            project_id=resolved.project_id if resolved is not None else "",
            run_id=request.run_id, tool_call_id=request.tool_call_id, tool_name=request.tool_name,
            decision=int(result.effect), step=int(result.step), risk=int(result.risk), policy_epoch=epoch,
            approval_id=approval_id, request=request.SerializeToString(), agent=agent_bytes, decided_at=now)
        pending = PendingDecision(record=record, response=response, approval=approval_row)
        if approval_row is not None:
            requested = self._requested_record(principal, resolved, approval_row, now)
            pending.approval_record = requested.record_id
            pending.messages.append((TOPIC_CHANGE_RECORD, requested.record_id, requested))
            pending.messages.append(webhooks.notification_message(
                webhooks.E.WEBHOOK_EVENT_TYPE_APPROVAL_REQUESTED,
                approvals_pb2.Approval.FromString(approval_row["body"]), requested.actor,
                "; ".join(r.message for r in result.reasons)))
        if result.effect == engine.Effect.DENY:
            change = self._denied_record(principal, request, resolved, result, decision_id, epoch, now)
            pending.messages.append((TOPIC_CHANGE_RECORD, change.record_id, change))
        elif granted and result.effect == engine.Effect.ALLOW:
            consumed = self._consumed_record(principal, request, resolved, decision_id, now)
            pending.messages.append((TOPIC_CHANGE_RECORD, consumed.record_id, consumed))
        return pending

    def _approval_row(self, principal: Principal, request: decision_pb2.CheckRequest, resolved: Any,
                      result: engine.Result, approval_id: str, decision_id: str, digest: str,
                      args: dict[str, Any] | None, now: datetime) -> dict[str, Any]:
        required = required_decisions(int(result.risk))
        expires = now + TOOL_APPROVAL_TTL
        body = approvals_pb2.Approval(
            approval_id=approval_id, tenant_id=principal.tenant_id, project_id=resolved.project_id,
            instance_id=resolved.instance_id, version_id=resolved.version_id,
            action_type=approvals_pb2.APPROVAL_ACTION_TYPE_TOOL_EXECUTION, tool_name=request.tool_name,
            argument_digest=digest, arguments=struct(args), risk=int(result.risk),
            justification="; ".join(r.message for r in result.reasons),
            estimated_cost_usd=request.estimated_cost_usd, required_decisions=required,
            status=approvals_pb2.APPROVAL_STATUS_PENDING, expire_time=ts(expires),
            requester=actor_of(principal),
            run_id=request.run_id, tool_call_id=request.tool_call_id, decision_id=decision_id,
            create_time=ts(now), update_time=ts(now), etag="1")
        return dict(
            id=approval_id, tenant_id=principal.tenant_id, project_id=resolved.project_id,
            instance_id=resolved.instance_id, version_id=resolved.version_id,
            action_type=approvals_pb2.APPROVAL_ACTION_TYPE_TOOL_EXECUTION, tool_name=request.tool_name,
            tool_call_id=request.tool_call_id or None, run_id=request.run_id, argument_digest=digest,
            risk=int(result.risk), estimated_cost_usd=request.estimated_cost_usd,
            required_decisions=required, escalation_level=0,
            status=approvals_pb2.APPROVAL_STATUS_PENDING, decision_id=decision_id,
            requested_by=principal.actor_id, body=body.SerializeToString(), created_at=now,
            expires_at=expires, consumed_at=None, revision=1, target_id="",
            escalate_at=now + ESCALATE_EVERY, resolved_at=None)

    @staticmethod
    def _requested_record(principal: Principal, resolved: Any, row: dict[str, Any],
                          now: datetime) -> common_pb2.ChangeRecord:
        return change_record(
            common_pb2.CHANGE_RECORD_TYPE_APPROVAL_REQUESTED, tenant_id=principal.tenant_id,
            actor=actor_of(principal), target_type="approval", target_id=row["id"], project_id=resolved.project_id,
            template_id=resolved.template_id, version_id=resolved.version_id,
            instance_id=resolved.instance_id, summary=f"TOOL_EXECUTION approval requested for {row['tool_name']}",
            after={"status": "PENDING", "decisions": 0, "escalation_level": 0},
            payload={"action_type": "APPROVAL_ACTION_TYPE_TOOL_EXECUTION", "decision_id": row["decision_id"],
                     "risk": common_pb2.RiskLevel.Name(row["risk"])},
            occur_time=now, source="governance")

    @staticmethod
    def _consumed_record(principal: Principal, request: decision_pb2.CheckRequest, resolved: Any,
                         decision_id: str, now: datetime) -> common_pb2.ChangeRecord:
        """APPROVAL_CONSUMED: the ALLOW that used a grant up, linking the decision to the approval
        (whose APPROVAL_DECIDED records name who approved), so the trail alone answers "who
        approved this call"."""
        return change_record(
            common_pb2.CHANGE_RECORD_TYPE_APPROVAL_CONSUMED, tenant_id=principal.tenant_id,
            actor=actor_of(principal), target_type="approval", target_id=request.approval_id,
            project_id=resolved.project_id, template_id=resolved.template_id, version_id=resolved.version_id,
            instance_id=resolved.instance_id,
            summary=f"approval {request.approval_id} used by decision {decision_id} to allow {request.tool_name}",
            before={"consumed": False}, after={"consumed": True},
            payload={"decision_id": decision_id, "tool_name": request.tool_name,
                     "tool_call_id": request.tool_call_id, "run_id": request.run_id},
            occur_time=now, source="governance")

    @staticmethod
    def _denied_record(principal: Principal, request: decision_pb2.CheckRequest, resolved: Any,
                       result: engine.Result, decision_id: str, epoch: int,
                       now: datetime) -> common_pb2.ChangeRecord:
        kind = request.WhichOneof("agent") or "instance_id"
        # Payload: the provenance and reason codes (cached per result, as the opEvent's), then
        # decision_id, agent_ref, tool_name, policy_epoch.
        payload = struct_pb2.Struct()
        payload.MergeFromString(_PAYLOAD_FIELDS.get(result))
        fields = payload.fields
        fields["decision_id"].string_value = decision_id
        fields["agent_ref"].string_value = getattr(request, kind)
        fields["tool_name"].string_value = request.tool_name
        fields["policy_epoch"].number_value = epoch
        return change_record(
            common_pb2.CHANGE_RECORD_TYPE_POLICY_DENIED, tenant_id=principal.tenant_id, actor=actor_of(principal),
            target_type="tool_call", target_id=request.tool_call_id or decision_id,
            project_id=resolved.project_id if resolved is not None else "",
            template_id=resolved.template_id if resolved is not None else "",
            version_id=resolved.version_id if resolved is not None else "",
            instance_id=resolved.instance_id if resolved is not None else "",
            summary=f"{request.tool_name} denied: {result.reasons[0].code if result.reasons else 'DENY'}",
            payload=payload, occur_time=now, source="governance")


async def resolve_caller_agent(agents: AgentDirectory, principal: Principal, api_key: str, request: Any) -> Any:
    """The agent a request names (its `agent` oneof) as the registry resolves it for the caller;
    None when unknown. An agent key may only name its own instance (else PERMISSION_DENIED
    NOT_YOUR_AGENT, whether or not the other agent exists)."""
    kind = request.WhichOneof("agent")
    assert kind is not None
    ref = getattr(request, kind)
    try:
        resolved = await agents.resolve(api_key, principal.tenant_id, kind, ref)
    except PermissionDenied:
        if not principal.is_agent:
            raise
        resolved = None  # the registry hides other agents from an agent key
    if principal.is_agent and (resolved is None or resolved.instance_id != principal.actor_id):
        raise PermissionDenied("an agent key may only ask about its own instance",
                               reason="NOT_YOUR_AGENT", metadata={kind: ref})
    return resolved


def check_batch_limit(n: int) -> None:
    if n == 0 or n > 100:
        raise InvalidArgument("checks must hold 1 to 100 items", reason="INVALID_FIELDS",
                              violations=[FieldViolation("checks", "must hold 1 to 100 items")])


