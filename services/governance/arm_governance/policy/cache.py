"""Compiled policies in memory. A tenant's envelopes, kill switches and epoch are loaded once and
kept until a change notice (on every replica, via LISTEN/NOTIFY) drops them; compiled policies
per (project, version) are memoised on top. The decision path reads only memory."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from arm.governance.v1 import policy_pb2
from arm_common.db import Database
from arm_common.notify import ChangeChannel
from arm_engine import engine
from arm_governance import convert, models

log = logging.getLogger(__name__)


@dataclass
class TenantPolicies:
    tenant_id: str
    epoch: int
    envelopes: list[engine.Envelope]
    controls: dict[tuple[int, str], int]  # (control scope, scope id) -> OperatorControlMode
    classifier: engine.Classifier | None = None
    """The tenant's risk overrides and argument-trigger changes on the default classifier; None =
    none set."""
    risk: policy_pb2.RiskOverrides = field(default_factory=policy_pb2.RiskOverrides)
    """The stored overrides and triggers `classifier` is built from (sent to runtimes deciding
    locally)."""
    _compiled: dict[tuple[str, str], tuple[engine.CompiledPolicy, bool]] = field(default_factory=dict)
    _controls: dict[str, engine.Controls] = field(default_factory=dict)

    def compiled(self, project_id: str, version_id: str) -> tuple[engine.CompiledPolicy, bool]:
        """The agent's compiled policy, and whether any budget applies to it (then the decision
        needs spend totals)."""
        key = (project_id, version_id)
        hit = self._compiled.get(key)
        if hit is None:
            policy = engine.compile_policy(self.envelopes, tenant_id=self.tenant_id,
                                           project_id=project_id, version_id=version_id)
            scopes = {(engine.Scope.TENANT, self.tenant_id), (engine.Scope.PROJECT, project_id),
                      (engine.Scope.VERSION, version_id)}
            # Shadow envelopes count too: their budget verdicts are reported beside the decision.
            has_budgets = any(e.budgets is not None and (e.scope, e.scope_id) in scopes
                              for e in self.envelopes)
            hit = self._compiled[key] = (policy, has_budgets)
        return hit

    def controls_for(self, project_id: str) -> engine.Controls:
        hit = self._controls.get(project_id)  # memoised like `compiled`: both live until a change notice
        if hit is None:
            tenant_mode = self.controls.get((policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT, self.tenant_id))
            project_mode = self.controls.get((policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT, project_id))
            hit = self._controls[project_id] = engine.Controls(
                tenant_mode=convert.control_mode_name(tenant_mode),
                project_mode=convert.control_mode_name(project_mode))
        return hit


class PolicyCache:
    def __init__(self, db: Database, changes: ChangeChannel) -> None:
        self.db = db
        self.changes = changes
        self._tenants: dict[str, TenantPolicies] = {}
        self._generation = 0

    async def tenant(self, tenant_id: str) -> TenantPolicies:
        cached = self._tenants.get(tenant_id)
        if cached is not None and self.changes.live:
            return cached
        generation = self._generation
        loaded = await self.db.read(lambda s: self._load(s, tenant_id))
        if self.changes.live and generation == self._generation:
            self._tenants[tenant_id] = loaded
        return loaded

    @staticmethod
    async def _load(s: AsyncSession, tenant_id: str) -> TenantPolicies:
        rows = (await s.execute(select(models.PolicyEnvelope.body).where(
            models.PolicyEnvelope.tenant_id == tenant_id, models.PolicyEnvelope.active.is_(True)))).scalars().all()
        envelopes = [convert.envelope_to_engine(policy_pb2.PolicyEnvelope.FromString(b)) for b in rows]
        controls = {(c.scope, c.scope_id): c.mode for c in (await s.execute(select(models.OperatorControl).where(
            models.OperatorControl.tenant_id == tenant_id))).scalars()}
        epoch = (await s.execute(select(models.PolicyEpoch.epoch).where(
            models.PolicyEpoch.tenant_id == tenant_id))).scalar_one_or_none() or 0
        body = (await s.execute(select(models.RiskOverrides.body).where(
            models.RiskOverrides.tenant_id == tenant_id))).scalar_one_or_none()
        risk = policy_pb2.RiskOverrides.FromString(body) if body else policy_pb2.RiskOverrides()
        classifier = convert.risk_classifier(risk.overrides, risk.argument_triggers)
        return TenantPolicies(tenant_id, epoch, envelopes, controls, classifier, risk)

    def invalidate(self, tenant_id: str | None) -> None:
        self._generation += 1
        if tenant_id is None:
            self._tenants.clear()
        else:
            self._tenants.pop(tenant_id, None)
