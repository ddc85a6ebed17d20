"""`ListDeniedTools`: of the tools an agent offers, those its policy denies whatever the call's
arguments (`engine.denied_outright`), so that a gateway can hide them from the model; with the
policy epoch and an etag that changes whenever the answer may (a policy change, or the agent
moving to another project, version or environment). Read from memory like `Check`; nothing is
logged."""

from __future__ import annotations

import hashlib

from arm.governance.v1 import decision_pb2, policy_pb2
from arm_common import validation as val
from arm_common.auth import Principal
from arm_common.errors import NotFound, Violations
from arm_engine import engine
from arm_governance import convert
from arm_governance.agent_cache import AgentDirectory
from arm_governance.decisions.service import resolve_caller_agent
from arm_governance.policy import limits
from arm_governance.policy.cache import PolicyCache

MAX_TOOLS = 500
_RISKS = {0, 1, 2, 3, 4}


def validate(request: decision_pb2.ListDeniedToolsRequest) -> None:
    v = Violations()
    kind = request.WhichOneof("agent")
    if kind is None:
        v.add("agent", "set instance_id or legacy_agent_id")
    else:
        val.resource_id(v, kind, getattr(request, kind))
    if not 1 <= len(request.tools) <= MAX_TOOLS:
        v.add("tools", f"must have 1 to {MAX_TOOLS} items")
    seen: set[str] = set()
    for i, tool in enumerate(request.tools[:MAX_TOOLS]):
        limits.tool_name(v, f"tools[{i}].tool_name", tool.tool_name)
        if tool.tool_name in seen:
            v.add(f"tools[{i}].tool_name", "is listed twice")
        seen.add(tool.tool_name)
        if tool.declared_risk not in _RISKS:
            v.add(f"tools[{i}].declared_risk", f"unknown enum value {tool.declared_risk}")
    v.raise_if_any()


async def list_denied_tools(agents: AgentDirectory, policies: PolicyCache, principal: Principal, api_key: str,
                            request: decision_pb2.ListDeniedToolsRequest) -> decision_pb2.ListDeniedToolsResponse:
    """The answer for a validated request (see `validate`), for the caller's tenant only."""
    principal.require("decisions:check")
    resolved = await resolve_caller_agent(agents, principal, api_key, request)
    if resolved is None:
        kind = request.WhichOneof("agent")
        ref = getattr(request, kind)
        raise NotFound(f"no agent {ref!r}", reason="AGENT_NOT_FOUND", metadata={kind: ref})
    agent = convert.agent_to_engine(resolved)
    tenant = await policies.tenant(principal.tenant_id)
    policy, _ = tenant.compiled(agent.project_id, agent.version_id)
    denied = []
    for tool in request.tools:
        declared = engine.Risk(tool.declared_risk) if tool.declared_risk else None
        result = engine.denied_outright(policy, agent, tool.tool_name, declared)
        if result is not None:
            denied.append(decision_pb2.DeniedTool(
                tool_name=tool.tool_name, rule_description=result.rule_description,
                reasons=[policy_pb2.Reason(code=r.code, message=r.message) for r in result.reasons]))
    basis = f"{tenant.epoch}\x00{agent.project_id}\x00{agent.version_id}\x00{agent.environment_id}"
    return decision_pb2.ListDeniedToolsResponse(
        denied=denied, policy_epoch=tenant.epoch, etag=hashlib.sha256(basis.encode()).hexdigest()[:16])
