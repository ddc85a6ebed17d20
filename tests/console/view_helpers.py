"""What the Policies, Deployments, Audit and Telemetry browser tests share: a client of all three
services for a key (the data is made through the gRPC API), an active agent, and the check that
another tenant's id gives the console's not-found page."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from arm.registry.v1 import agents_pb2
from arm_client import ArmClient
from arm_client.connection import Settings
from tests.console.conftest import ConsoleStack, Ui
from tests.helpers import AgentSet, approved_version


def api(console: ConsoleStack, key: str) -> ArmClient:
    return ArmClient(settings=Settings(registry_address=console.registry.address,
                                       governance_address=console.governance.address,
                                       telemetry_address=console.telemetry.address, api_key=key))


@dataclass
class Agent:
    agents: AgentSet
    instance: agents_pb2.AgentInstance
    legacy_id: str


async def active_agent(client: ArmClient, agents: AgentSet | None = None, name: str = "billing-bot") -> Agent:
    agents = agents or await approved_version(client)
    legacy = f"legacy-{secrets.token_hex(4)}"
    inst = (await client.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name=name,
        legacy_agent_id=legacy))).agent_instance
    inst = (await client.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
        id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))).agent_instance
    return Agent(agents, inst, legacy)


async def assert_not_found(ui: Ui, path: str) -> None:
    """The console answers `path` with its not-found page (HTTP 404), not data and not a crash."""
    ui.allow_errors(r"status of 404")
    response = await ui.goto(path)
    assert response is not None and response.status == 404, (path, response and response.status)
    assert "Not found" in await ui.page.inner_text("main")
