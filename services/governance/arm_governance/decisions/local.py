"""Decisions made in the agent runtime (the SDK's `local_decisions=True`), governance's side.

`WatchDecisionInputs` streams to an agent the inputs `Check` decides its calls from — built from
the same in-memory caches `Check` reads (agent resolution, the tenant's compiled policies) —
and a fresh snapshot whenever the change feeds that invalidate those caches say something of
the agent's may have changed: a tenant notice (envelopes, operator controls, risk overrides, the
epoch; on every replica via LISTEN/NOTIFY) or an agent change from the registry's
WatchAgentChanges (instance, version, tenant state). Between changes it sends heartbeats, so the
runtime knows its inputs are current.

`RecordLocalDecisions` logs what the runtime decided: the rows `Decider.pending` would build (the
decision row, its opEvent, a DENY's POLICY_DENIED record), built per batch from parts cached per
(agent, result) by `local_log.LocalRows`, and written in one transaction (COPY on PostgreSQL,
see `local_log.write_pg`), skipping decision ids already logged."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
from google.protobuf import timestamp_pb2
from sqlalchemy import Table, select, text
from sqlalchemy import insert as sa_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from arm.governance.v1 import decision_pb2, policy_pb2
from arm.registry.v1 import compat_pb2
from arm_common import edge
from arm_common import validation as val
from arm_common.auth import Authenticator, Principal, current_api_key, current_principal
from arm_common.db import driver_connection
from arm_common.decision_inputs import envelope_from_engine, result_from_response
from arm_common.errors import InvalidArgument, NotFound, PermissionDenied, Violations
from arm_common.outbox import enqueue_many
from arm_common.tables import utcnow
from arm_engine import engine
from arm_governance import convert, models
from arm_governance.approvals.rules import RISK_LEVELS
from arm_governance.decisions import local_log, responses
from arm_governance.decisions.service import MAX_ARGUMENT_BYTES, Decider, validate_check
from arm_governance.models import OUTBOX
from arm_governance.policy import limits

MAX_BATCH = 1000
DECISION_ID = re.compile(r"dec_[A-Za-z0-9_-]{16,60}")
_LOCAL_EFFECTS = (policy_pb2.DECISION_ALLOW, policy_pb2.DECISION_DENY)
_DECISIONS = cast(Table, models.DecisionRecord.__table__)
_CLOCK_SKEW = timedelta(minutes=5)
_MAX_FLOAT = sys.float_info.max
_STEPS = frozenset(int(x) for x in engine.Step) - {int(engine.Step.APPROVAL_GRANT)}
_RISKS = frozenset(int(x) for x in engine.Risk)
_SCOPES = frozenset(int(x) for x in engine.Scope)
_RULE_KINDS = frozenset(int(x) for x in engine.RuleKind)
_EFFECTS = frozenset(int(x) for x in engine.Effect)


def _own_instance(p: Principal, instance_id: str) -> None:
    p.require("decisions:check")
    if not p.is_agent or p.actor_id != instance_id:
        raise PermissionDenied("only the instance's own agent key may decide its calls locally",
                               reason="NOT_YOUR_AGENT", metadata={"instance_id": instance_id})


def validate_watch(request: decision_pb2.WatchDecisionInputsRequest) -> None:
    v = Violations()
    val.resource_id(v, "instance_id", request.instance_id)
    if request.heartbeat_interval_ms and not 100 <= request.heartbeat_interval_ms <= 60_000:
        v.add("heartbeat_interval_ms", "must be 0 (1000) or 100 to 60000")
    v.raise_if_any()


# The generic edge check (arm_common.edge) would walk every LocalDecision of a batch; the parts of
# a response that depend on the engine's result alone recur, so validate_record checks each
# distinct one once (with the same field paths) and the request of every item.
edge.validated_per_item(decision_pb2.LocalDecision.DESCRIPTOR.full_name)
_PER_DECISION = ("decision_id", "decide_time", "policy_epoch", "request_id", "approval_id")
_PART_CHECKS: dict[bytes, list[tuple[str, str]]] = {}


def result_key(response: decision_pb2.CheckResponse) -> bytes:
    """The response without what differs per decision, serialized: one per distinct result."""
    part = decision_pb2.CheckResponse()
    part.CopyFrom(response)
    for name in _PER_DECISION:
        part.ClearField(name)  # type: ignore[arg-type]
    return part.SerializeToString(deterministic=True)


def _part_checks(key: bytes) -> list[tuple[str, str]]:
    """What is wrong with a response's result part: (path below `response`, description)."""
    checks = _PART_CHECKS.get(key)
    if checks is not None:
        return checks
    r = decision_pb2.CheckResponse.FromString(key)
    v = Violations()
    v.items.extend(edge.violations(r))
    if r.decision not in _LOCAL_EFFECTS:
        v.add("decision", "must be ALLOW or DENY (NEEDS_APPROVAL is decided by Check)")
    if r.step not in _STEPS:
        v.add("step", "must be a decision step other than APPROVAL_GRANT")
    if r.effective_risk not in _RISKS:
        v.add("effective_risk", "must be LOW, MEDIUM, HIGH or CRITICAL")
    if r.scope and r.scope not in _SCOPES:
        v.add("scope", f"unknown enum value {r.scope}")
    if r.rule_kind and r.rule_kind not in _RULE_KINDS:
        v.add("rule_kind", f"unknown enum value {r.rule_kind}")
    for j, s in enumerate(r.shadow_results):
        if s.scope not in _SCOPES:
            v.add(f"shadow_results[{j}].scope", f"unknown enum value {s.scope}")
        if s.decision and s.decision not in _EFFECTS:
            v.add(f"shadow_results[{j}].decision", f"unknown enum value {s.decision}")
        if s.rule_kind and s.rule_kind not in _RULE_KINDS:
            v.add(f"shadow_results[{j}].rule_kind", f"unknown enum value {s.rule_kind}")
    if len(r.reasons) > 50:
        v.add("", "must be at most 64 KiB with at most 50 reasons")
    checks = [(item.field, item.description) for item in v.items]
    if len(_PART_CHECKS) >= 4096:
        _PART_CHECKS.clear()
    _PART_CHECKS[key] = checks
    return checks


def validate_record(request: decision_pb2.RecordLocalDecisionsRequest) -> list[bytes]:
    """Raises InvalidArgument naming every bad field; returns each response's `result_key`.
    An item `_fine` finds nothing wrong with is not checked further; any other item is checked
    field by field (`_check_item`), which names what is wrong."""
    v = Violations()
    n = len(request.decisions)
    if not 1 <= n <= MAX_BATCH:
        v.add("decisions", f"must hold 1 to {MAX_BATCH} decisions")
        v.raise_if_any()
    instance = request.decisions[0].request.instance_id
    probe = Violations()
    val.resource_id(probe, "", instance)
    instance_ok = not probe and "\x00" not in instance
    latest = int((datetime.now(UTC) + _CLOCK_SKEW).timestamp())
    keys = []
    for i, item in enumerate(request.decisions):
        key = result_key(item.response)
        keys.append(key)
        if not (instance_ok and _fine(item, instance, latest, key)):
            _check_item(v, i, item, instance, latest, key)
    v.raise_if_any()
    return keys


_GOOD_TOOLS: set[str] = set()
_MAX_REQUEST = MAX_ARGUMENT_BYTES + 4096


def _good_tool(name: str) -> bool:
    if name in _GOOD_TOOLS:
        return True
    v = Violations()
    limits.tool_name(v, "", name)
    if v:
        return False
    if len(_GOOD_TOOLS) >= 4096:
        _GOOD_TOOLS.clear()
    _GOOD_TOOLS.add(name)
    return True


def _fine(item: decision_pb2.LocalDecision, instance: str, latest: int, key: bytes) -> bool:
    """True only when `_check_item` would find nothing wrong with the item (given a valid
    `instance`): the same checks, without building paths and messages, the tool name and the
    result part each checked once per distinct value."""
    req, r = item.request, item.response
    return bool(
        DECISION_ID.fullmatch(item.decision_id)
        and req.instance_id == instance and req.WhichOneof("agent") == "instance_id"
        and not req.approval_id and not req.request_id
        and _good_tool(req.tool_name)
        and len(req.run_id) <= 128 and "\x00" not in req.run_id
        and len(req.tool_call_id) <= 128 and "\x00" not in req.tool_call_id
        and (not req.declared_risk or req.declared_risk in RISK_LEVELS)
        and 0.0 <= req.estimated_cost_usd <= _MAX_FLOAT
        and (not req.HasField("arguments") or not edge.violations(req.arguments))
        and (not req.HasField("context") or not edge.violations(req.context))
        and req.ByteSize() <= _MAX_REQUEST
        and not _part_checks(key)
        and "\x00" not in r.request_id and "\x00" not in r.approval_id
        and r.HasField("decide_time")
        and edge.TIMESTAMP_MIN_S <= r.decide_time.seconds <= latest and 0 <= r.decide_time.nanos <= edge.NANOS_MAX
        and r.policy_epoch >= 0 and len(key) <= 64 * 1024)


def _check_item(v: Violations, i: int, item: decision_pb2.LocalDecision, instance: str, latest: int,
                key: bytes) -> None:
    at = f"decisions[{i}]."
    if not DECISION_ID.fullmatch(item.decision_id):
        v.add(f"{at}decision_id", 'must be "dec_" then 16 to 60 letters, digits, "_" or "-"')
    req = item.request
    v.items.extend(edge.violations(req, f"{at}request"))
    if req.WhichOneof("agent") != "instance_id":
        v.add(f"{at}request.instance_id", "is required (local decisions are made for an instance)")
    elif req.instance_id != instance:
        v.add(f"{at}request.instance_id", "all decisions of a batch must be of one instance")
    if req.approval_id:
        v.add(f"{at}request.approval_id", "must be empty: grants are decided by Check")
    if req.request_id:
        v.add(f"{at}request.request_id", "must be empty: the decision id is the idempotency key")
    try:
        validate_check(req, f"{at}request.")
    except InvalidArgument as exc:
        v.items.extend(exc.violations)
    r = item.response
    for field, description in _part_checks(key):
        v.add(f"{at}response.{field}" if field else f"{at}response", description)
    for name in ("request_id", "approval_id"):
        if "\x00" in getattr(r, name):
            v.add(f"{at}response.{name}", "must not contain NUL characters")
    if not r.HasField("decide_time"):
        v.add(f"{at}response.decide_time", "is required")
    else:
        bad = edge.violations(r.decide_time, f"{at}response.decide_time")
        if bad:
            v.items.extend(bad)
        elif r.decide_time.seconds > latest:  # (whole seconds: the skew allowed is minutes)
            v.add(f"{at}response.decide_time", "must not be in the future")
    if r.policy_epoch < 0:
        v.add(f"{at}response.policy_epoch", "must be >= 0")
    if len(key) > 64 * 1024:
        v.add(f"{at}response", "must be at most 64 KiB with at most 50 reasons")


class LocalDecisions:
    """The two RPCs' logic, on the decision path's caches and log."""

    def __init__(self, decider: Decider, changes: Any, authenticator: Authenticator | None = None) -> None:
        self.decider = decider
        self.changes = changes
        self.authenticator = authenticator
        self._results: dict[bytes, engine.Result] = {}
        self.rows = local_log.LocalRows()

    # --- WatchDecisionInputs --------------------------------------------------------------------

    async def inputs(self, p: Principal, api_key: str, instance_id: str) -> decision_pb2.DecisionInputs:
        resolved = await self.decider.agents.resolve(api_key, p.tenant_id, "instance_id", instance_id)
        if resolved is None:
            raise NotFound.of("agent_instance", instance_id)
        tenant = await self.decider.policies.tenant(p.tenant_id)
        agent = convert.agent_to_engine(resolved)
        _, budgets_apply = tenant.compiled(agent.project_id, agent.version_id)
        chain = {(engine.Scope.TENANT, p.tenant_id), (engine.Scope.PROJECT, agent.project_id),
                 (engine.Scope.VERSION, agent.version_id)}
        controls = tenant.controls
        return decision_pb2.DecisionInputs(
            agent=decision_pb2.DecisionAgent(
                tenant_id=agent.tenant_id, tenant_active=agent.tenant_active, project_id=agent.project_id,
                environment_id=agent.environment_id, environment_name=agent.environment_name,
                environment_type=agent.environment_type, template_id=agent.template_id,
                version_id=agent.version_id, instance_id=agent.instance_id, instance_state=agent.instance_state,
                version_state=agent.version_state, legacy_agent_id=resolved.legacy_agent_id),
            envelopes=[envelope_from_engine(e) for e in tenant.envelopes if (e.scope, e.scope_id) in chain],
            tenant_control=controls.get((policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT, p.tenant_id), 0),  # type: ignore[arg-type]
            project_control=controls.get((policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT, agent.project_id), 0),  # type: ignore[arg-type]
            risk_overrides=tenant.risk.overrides, argument_triggers=tenant.risk.argument_triggers,
            policy_epoch=tenant.epoch, budgets_apply=budgets_apply,
            spend=await self.decider.spend.snapshot(p.tenant_id, agent.instance_id, utcnow())
            if budgets_apply else None)

    async def watch(self, request: decision_pb2.WatchDecisionInputsRequest
                    ) -> AsyncIterator[decision_pb2.WatchDecisionInputsResponse]:
        validate_watch(request)
        p = current_principal()
        _own_instance(p, request.instance_id)
        api_key = current_api_key()
        interval = (request.heartbeat_interval_ms or 1000) / 1000
        wake = asyncio.Event()
        tenant_id = p.tenant_id

        def on_agent(change: compat_pb2.AgentChange) -> None:
            if change.kind == compat_pb2.AGENT_CHANGE_KIND_RESET or change.tenant_id == tenant_id:
                wake.set()

        queue = self.changes.subscribe()

        async def follow() -> None:
            while True:
                notice = await queue.get()
                if notice.get("reset") or notice.get("tenant") == tenant_id:
                    # The service's own follower drops the cache too, but maybe after we reload.
                    self.decider.policies.invalidate(None if notice.get("reset") else tenant_id)
                    wake.set()
                elif notice.get("spend") == request.instance_id:
                    self.decider.spend.invalidate(request.instance_id)
                    wake.set()

        follower = asyncio.create_task(follow(), name="watch-decision-inputs")
        self.decider.agents.on_change.append(on_agent)
        try:
            sent = b""
            while True:
                wake.clear()
                if self.authenticator is not None:
                    # The stream outlives its authentication: a key revoked (or a tenant
                    # deactivated) since ends it here, at the next change or heartbeat.
                    await self.authenticator.authenticate(api_key)
                inputs = await self.inputs(p, api_key, request.instance_id)
                data = inputs.SerializeToString(deterministic=True)
                now = timestamp_pb2.Timestamp()
                now.GetCurrentTime()
                if data != sent:
                    sent = data
                    yield decision_pb2.WatchDecisionInputsResponse(inputs=inputs, send_time=now)
                else:
                    yield decision_pb2.WatchDecisionInputsResponse(send_time=now)
                try:
                    await asyncio.wait_for(wake.wait(), interval)
                except TimeoutError:
                    pass
        finally:
            self.decider.agents.on_change.remove(on_agent)
            self.changes.unsubscribe(queue)
            follower.cancel()

    # --- RecordLocalDecisions -------------------------------------------------------------------

    def _result(self, key: bytes) -> engine.Result:
        """The engine result a response states (its `result_key`), one object per distinct
        result: the decision path's per-result caches (response bytes, opEvent payload,
        provenance) key on identity."""
        result = self._results.get(key)
        if result is None:
            if len(self._results) >= 4096:
                self._results.clear()
            result = self._results[key] = result_from_response(decision_pb2.CheckResponse.FromString(key))
        return result

    async def record(self, request: decision_pb2.RecordLocalDecisionsRequest
                     ) -> decision_pb2.RecordLocalDecisionsResponse:
        keys = validate_record(request)
        p = current_principal()
        instance_id = request.decisions[0].request.instance_id
        _own_instance(p, instance_id)
        resolved = await self.decider.agents.resolve(current_api_key(), p.tenant_id, "instance_id", instance_id)
        if resolved is None:
            raise NotFound.of("agent_instance", instance_id)
        # The argument digest binds approvals only: a local decision creates none.
        rows, messages, parts = self.rows.build(p, resolved, resolved.SerializeToString(), request.decisions,
                                                keys, [self._result(key) for key in keys], _naive_now())
        db = self.decider.log.db
        write = self._write_pg if db.is_postgres else self._write_sqlite
        try:
            recorded, topics = await db.run(lambda s: write(s, p.tenant_id, rows, messages, parts))
        except (IntegrityError, asyncpg.UniqueViolationError):
            # A concurrent call logged some of these ids first: now they are skipped.
            recorded, topics = await db.run(lambda s: write(s, p.tenant_id, rows, messages, parts))
        if parts:  # committed: the next batches need not write them
            self.rows.stored.update(parts)
            responses.remember(parts)
        for relay in self.decider.log.relays:
            if relay.topic in topics:
                relay.notify()
        return decision_pb2.RecordLocalDecisionsResponse(recorded=recorded,
                                                         duplicates=len(request.decisions) - recorded)

    @staticmethod
    async def _write_pg(s: AsyncSession, tenant_id: str, rows: list[tuple[Any, ...]],
                        messages: list[list[tuple[Any, ...]]], parts: dict[str, bytes]) -> tuple[int, set[str]]:
        # Through the session first: that opens the transaction the COPYs then join.
        await s.execute(text("SELECT 1"))
        return await local_log.write_pg(await driver_connection(s), tenant_id, rows, messages, parts)

    @staticmethod
    async def _write_sqlite(s: AsyncSession, tenant_id: str, rows: list[tuple[Any, ...]],
                            messages: list[list[tuple[Any, ...]]], parts: dict[str, bytes]) -> tuple[int, set[str]]:
        if parts:
            t = models.DecisionResponsePart
            have = set((await s.execute(select(t.id).where(t.id.in_(sorted(parts))))).scalars())
            new = [{"id": i, "tenant_id": tenant_id, "response": parts[i]} for i in sorted(parts) if i not in have]
            if new:
                await s.execute(sa_insert(cast(Table, t.__table__)), new)
        d = models.DecisionRecord
        ids = [row[0] for row in rows]
        logged: dict[str, str] = {}
        for start in range(0, len(ids), 500):
            logged.update((r.id, r.tenant_id) for r in (await s.execute(
                select(d.id, d.tenant_id).where(d.id.in_(ids[start:start + 500])))).all())
        if any(tenant != tenant_id for tenant in logged.values()):
            raise InvalidArgument("a decision id is taken", reason="DECISION_ID_TAKEN")
        decisions, outbox = [], []
        for row, rows_of in zip(rows, messages, strict=True):
            if row[0] in logged:
                continue
            decision = dict(zip(local_log.DECISION_COLUMNS, row, strict=True))
            decision["decided_at"] = decision["decided_at"].replace(tzinfo=UTC)
            decisions.append(decision)
            for m in rows_of:
                message = dict(zip(local_log.OUTBOX_COLUMNS, m, strict=True))
                message["created_at"] = message["next_attempt_at"] = message["created_at"].replace(tzinfo=UTC)
                outbox.append(message)
        if decisions:
            await s.execute(sa_insert(_DECISIONS), decisions)
            now = _naive_now()
            marker = local_log.op_events_marker(tenant_id, [d["id"] for d in decisions], now)
            message = dict(zip(local_log.OUTBOX_COLUMNS, marker, strict=True))
            message["created_at"] = message["next_attempt_at"] = now.replace(tzinfo=UTC)
            outbox.append(message)
        await enqueue_many(s, OUTBOX, outbox)
        return len(decisions), {row["topic"] for row in outbox}


def _naive_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class LocalDecisionRpcs:
    """The two RPCs, mixed into DecisionServicer (which holds `decider` and `changes`)."""

    decider: Decider
    changes: Any
    authenticator: Authenticator | None = None  # set by the wiring (app.py)
    _local: LocalDecisions | None = None

    @property
    def local(self) -> LocalDecisions:
        if self._local is None:
            self._local = LocalDecisions(self.decider, self.changes, self.authenticator)
        return self._local

    async def WatchDecisionInputs(self, request: decision_pb2.WatchDecisionInputsRequest,
                                  context: Any) -> AsyncIterator[decision_pb2.WatchDecisionInputsResponse]:
        async for message in self.local.watch(request):
            yield message

    async def RecordLocalDecisions(self, request: decision_pb2.RecordLocalDecisionsRequest, context: Any) -> Any:
        return await self.local.record(request)
