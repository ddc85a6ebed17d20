"""Loads arm.yaml into the dev server through the SDK: the tenant (with its admin), the approvers,
the project, environment and agent (template, a version walked to APPROVED, an ACTIVE instance
and its key), and the policy envelopes. Writes the keys to .arm/quickstart.env.

    python examples/quickstart/load.py [arm.yaml]     # ARM_ADDRESS (default 127.0.0.1:50051)
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import struct_pb2

sys.path.insert(0, str(Path(__file__).parent))
from common import ENV_FILE, dev_admin_key, write_env  # noqa: E402

from arm.common.v1 import common_pb2  # noqa: E402
from arm.governance.v1 import policy_pb2  # noqa: E402
from arm.registry.v1 import access_pb2, agents_pb2, tenancy_pb2  # noqa: E402
from arm_client import AlreadyExists, Arm, ArmError  # noqa: E402


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def envelope(spec: dict[str, Any], scope_ids: dict[str, str]) -> policy_pb2.PolicyEnvelope:
    scope = spec["scope"].upper()
    env = policy_pb2.PolicyEnvelope(
        name=spec["name"], description=spec.get("description", ""),
        scope=policy_pb2.PolicyScope.Value(f"POLICY_SCOPE_{scope}"), scope_id=scope_ids[scope],
        tool_rules=[policy_pb2.ToolRule(
            tool=r["tool"], effect=policy_pb2.Decision.Value(f"DECISION_{r['effect']}"), locked=r.get("locked", False),
            description=r.get("description", "")) for r in spec.get("tool_rules", [])])
    for field in ("deny_at_risk", "require_approval_at_risk"):
        if field in spec:
            setattr(env, field, common_pb2.RiskLevel.Value(f"RISK_LEVEL_{spec[field]}"))
    if "default_effect" in spec:
        env.default_effect = policy_pb2.Decision.Value(f"DECISION_{spec['default_effect']}")
    for name, value in (spec.get("budgets") or {}).items():
        setattr(env.budgets, name, float(value))
    return env


async def load(world: dict[str, Any]) -> dict[str, str]:
    t = world["tenant"]
    async with Arm(api_key=dev_admin_key()) as system:
        slug = t["slug"]
        for _ in range(5):
            try:
                created = await system.call(system.stubs.tenancy.CreateTenant, tenancy_pb2.CreateTenantRequest(
                    slug=slug, name=t["name"], admin_email=t["admin_email"], admin_name="Admin"))
                break
            except AlreadyExists:
                slug = f"{t['slug']}-{secrets.token_hex(2)}"
        else:
            raise SystemExit("could not find a free tenant slug")
    async with Arm(api_key=created.admin_api_key) as admin:
        call, s = admin.call, admin.stubs
        roles = {r.name: r.id for r in (await call(s.access.ListRoles, access_pb2.ListRolesRequest())).roles}
        approver_keys = []
        for a in world["approvers"]:
            approver = (await call(s.access.CreateOperator, access_pb2.CreateOperatorRequest(
                email=a["email"], name=a["name"]))).operator
            await call(s.access.CreateRoleAssignment, access_pb2.CreateRoleAssignmentRequest(
                operator_id=approver.id, role_id=roles["approver"]))
            approver_keys.append((await call(s.access.CreateApiKey, access_pb2.CreateApiKeyRequest(
                operator_id=approver.id, display_name=f"quickstart approver {a['name']}"))).secret)

        p, e, g = world["project"], world["environment"], world["agent"]
        project = (await call(s.tenancy.CreateProject, tenancy_pb2.CreateProjectRequest(
            slug=p["slug"], name=p["name"]))).project
        environment = (await call(s.tenancy.CreateEnvironment, tenancy_pb2.CreateEnvironmentRequest(
            name=e["name"], type=tenancy_pb2.EnvironmentType.Value(f"ENVIRONMENT_TYPE_{e['type']}")))).environment
        template = (await call(s.agents.CreateAgentTemplate, agents_pb2.CreateAgentTemplateRequest(
            project_id=project.id, slug=g["template"], name=g["name"]))).agent_template
        version = (await call(s.agents.CreateAgentVersion, agents_pb2.CreateAgentVersionRequest(
            template_id=template.id, genome=struct(g["genome"])))).agent_version
        for state in ("TESTING", "CANDIDATE", "APPROVED"):
            if state == "CANDIDATE":
                await call(s.agents.RecordEvaluation, agents_pb2.RecordEvaluationRequest(
                    id=version.id, eval_status=agents_pb2.EVAL_STATUS_PASS, summary="quickstart"))
            await call(s.agents.TransitionAgentVersion, agents_pb2.TransitionAgentVersionRequest(
                id=version.id, to_state=agents_pb2.VersionState.Value(f"VERSION_STATE_{state}"), reason="quickstart"))
        instance = (await call(s.agents.CreateAgentInstance, agents_pb2.CreateAgentInstanceRequest(
            version_id=version.id, environment_id=environment.id, name=g["name"]))).agent_instance
        await call(s.agents.TransitionAgentInstance, agents_pb2.TransitionAgentInstanceRequest(
            id=instance.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))
        agent_key = (await call(s.access.CreateApiKey, access_pb2.CreateApiKeyRequest(
            instance_id=instance.id, display_name="quickstart agent"))).secret

        scope_ids = {"TENANT": created.tenant.id, "PROJECT": project.id, "VERSION": version.id}
        for spec in world["envelopes"]:
            await call(s.policies.CreatePolicyEnvelope, policy_pb2.CreatePolicyEnvelopeRequest(
                envelope=envelope(spec, scope_ids), reason="quickstart"))
    print(f"tenant {slug}: agent instance {instance.id}, {len(approver_keys)} approvers, "
          f"{len(world['envelopes'])} envelopes")
    return {"ARM_INSTANCE_ID": instance.id, "ARM_API_KEY": agent_key,
            "ARM_QUICKSTART_ADMIN_KEY": created.admin_api_key, "ARM_QUICKSTART_APPROVER_KEYS": ",".join(approver_keys)}


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "arm.yaml"
    try:
        values = asyncio.run(load(yaml.safe_load(path.read_text())))
    except ArmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_env(values)
    print(f"keys written to {ENV_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
