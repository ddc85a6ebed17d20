"""The runtime SDK against real servers: registry, governance and telemetry on port 0 (the
session's, per backend), a fresh tenant with one ACTIVE agent instance and its agent key, and two
approvers."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import update

from arm.governance.v1 import approvals_pb2 as apb
from arm.registry.v1 import access_pb2, agents_pb2
from arm_client import Arm, ArmClient, ArmSync, Settings
from arm_common.db import rowcount
from arm_governance import models
from tests.conftest import GovernanceServer, TenantContext
from tests.helpers import AgentSet, approved_version, operator_key
from tests.telemetry.conftest import TelemetryServer, telemetry  # noqa: F401  (the fixture)


@dataclass
class Agent:
    """One ACTIVE agent instance in a fresh tenant, its key, an admin and two approvers."""

    tenant: TenantContext
    agents: AgentSet
    instance_id: str
    key: str
    registry_address: str
    governance: GovernanceServer
    telemetry: TelemetryServer
    admin: ArmClient  # the tenant admin, on all three services
    approvers: list[ArmClient] = field(default_factory=list)
    _open: list[Any] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {"ARM_REGISTRY_ADDRESS": self.registry_address, "ARM_GOVERNANCE_ADDRESS": self.governance.address,
                "ARM_TELEMETRY_ADDRESS": self.telemetry.address, "ARM_API_KEY": self.key,
                "ARM_INSTANCE_ID": self.instance_id}

    def arm(self, **kw: Any) -> Arm:
        arm = Arm(env=self.env(), **kw)
        self._open.append(arm)
        return arm

    def arm_sync(self, **kw: Any) -> ArmSync:
        arm = ArmSync(env=self.env(), **kw)
        self._open.append(arm)
        return arm

    async def decide(self, approval_id: str, verdict: int = apb.APPROVAL_VERDICT_APPROVE, *,
                     approvers: int | None = None) -> apb.Approval:
        """The approvers decide (all of them by default, one after the other)."""
        approval = apb.Approval()
        for client in self.approvers[:approvers]:
            approval = (await client.approvals.DecideApproval(apb.DecideApprovalRequest(
                approval_id=approval_id, verdict=verdict, reason="looked at it"))).approval
        return approval

    async def set_approval(self, approval_id: str, **values: Any) -> None:
        """Moves time for an approval (e.g. expires_at in the past) in governance's database."""
        async def write(s: Any) -> None:
            result = await s.execute(update(models.Approval).where(models.Approval.id == approval_id).values(**values))
            assert rowcount(result) == 1
        await self.governance.db.run(write)


async def make_agent(tenant: TenantContext, governance: GovernanceServer,
                     telemetry: TelemetryServer) -> Agent:  # noqa: F811
    agents = await approved_version(tenant.admin)
    inst = (await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name=f"agent-{secrets.token_hex(3)}"))
            ).agent_instance
    await tenant.admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
        id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))
    key = (await tenant.admin.access.CreateApiKey(access_pb2.CreateApiKeyRequest(instance_id=inst.id))).secret
    admin = ArmClient(settings=Settings.from_env({}, registry_address=tenant.server.address,
                                                 governance_address=governance.address,
                                                 telemetry_address=telemetry.address, api_key=tenant.admin_key))
    approvers = []
    for _ in range(2):
        _, approver_key = await operator_key(tenant.admin, "approver")
        approvers.append(ArmClient(governance.address, approver_key))
    return Agent(tenant, agents, inst.id, key, tenant.server.address, governance, telemetry, admin, approvers)


@pytest.fixture
async def agent(tenant: TenantContext, governance: GovernanceServer,
                telemetry: TelemetryServer) -> AsyncIterator[Agent]:  # noqa: F811
    a = await make_agent(tenant, governance, telemetry)
    yield a
    for thing in reversed(a._open):
        if isinstance(thing, ArmSync):
            thing.close()
        else:
            await thing.close()
    for client in [a.admin, *a.approvers]:
        await client.close()
