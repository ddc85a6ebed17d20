"""End-to-end smoke test of the registry over gRPC: a tenant, an agent walked to an instance."""

from __future__ import annotations

from arm.registry.v1 import agents_pb2, compat_pb2
from tests.helpers import approved_version


async def test_agent_from_template_to_resolved_instance(tenant) -> None:  # type: ignore[no-untyped-def]
    agents = await approved_version(tenant.admin)
    inst = (await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name="worker-1",
        legacy_agent_id="mc-agent-1"))).agent_instance
    assert inst.state == agents_pb2.INSTANCE_STATE_PROVISIONING
    resolved = (await tenant.admin.compat.ResolveAgentRef(
        compat_pb2.ResolveAgentRefRequest(legacy_agent_id="mc-agent-1"))).agent
    assert resolved.instance_id == inst.id
    assert resolved.version_id == agents.version.id
    assert resolved.tenant_id == tenant.tenant.id
    assert resolved.version_state == agents_pb2.VERSION_STATE_APPROVED
    assert agents.version.integrity == agents_pb2.INTEGRITY_VERIFIED
    assert agents.version.number == 1
