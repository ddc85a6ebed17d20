"""`arm environments|instances|identities|deployments` by name against a real registry and
governance: happy paths checked through the API, refusals printed as the error block (exit 1)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from arm.governance.v1 import deployments_pb2
from arm.registry.v1 import agents_pb2
from tests.cli.conftest import Terminal, logged_in, ok
from tests.conftest import GovernanceServer, TenantContext
from tests.helpers import approved_version, genome, walk_version


async def test_environments_and_instance_lifecycle(terminal: Terminal, tenant: TenantContext,
                                                   governance: GovernanceServer) -> None:
    agents = await approved_version(tenant.admin)
    await logged_in(terminal, tenant, governance, tenant.admin_key)
    env = f"staging-{secrets.token_hex(3)}"
    created = json.loads(ok(await terminal.arm("environments", "create", env, "--type", "staging",
                                               "-o", "json")).stdout)
    assert created["type"] == "ENVIRONMENT_TYPE_STAGING"
    assert env in ok(await terminal.arm("environments", "list")).stdout
    bad_type = await terminal.arm("environments", "create", "x", "--type", "moon")
    assert bad_type.exit_code == 2
    again = await terminal.arm("environments", "create", env)
    assert again.exit_code == 1 and "code:       ALREADY_EXISTS" in again.stderr and "request id:" in again.stderr

    ref = f"{agents.template.slug}@{agents.version.number}"
    made = json.loads(ok(await terminal.arm("instances", "create", "worker-1", "--version", ref, "--env", env,
                                            "-o", "json")).stdout)
    assert made["state"] == "INSTANCE_STATE_PROVISIONING" and made["version_id"] == agents.version.id
    assert made["environment_id"] == created["id"]
    listed = json.loads(ok(await terminal.arm("instances", "list", "--env", env, "-o", "json")).stdout)
    assert [i["name"] for i in listed] == ["worker-1"]

    moved = ok(await terminal.arm("instances", "transition", "worker-1", "active", "-r", "go"))
    assert "PROVISIONING" in moved.stdout and "ACTIVE" in moved.stdout
    ok(await terminal.arm("instances", "transition", made["id"], "paused"))  # by id too
    shown = ok(await terminal.arm("instances", "show", "worker-1")).stdout
    assert "PAUSED" in shown and made["id"] in shown
    instance = (await tenant.admin.agents.GetAgentInstance(agents_pb2.GetAgentInstanceRequest(
        id=made["id"]))).agent_instance
    assert instance.state == agents_pb2.INSTANCE_STATE_PAUSED

    refused = await terminal.arm("instances", "transition", "worker-1", "draining")
    assert refused.exit_code == 1, refused.output
    assert "code:       FAILED_PRECONDITION" in refused.stderr and "reason:     INVALID_TRANSITION" in refused.stderr
    assert "allowed:" in refused.stderr and "Traceback" not in refused.output
    unknown = await terminal.arm("instances", "show", "nobody")
    assert unknown.exit_code == 1 and "INSTANCE_NOT_FOUND" in unknown.stderr
    no_env = await terminal.arm("instances", "create", "w2", "--version", ref, "--env", "nowhere")
    assert no_env.exit_code == 1 and "ENVIRONMENT_NOT_FOUND" in no_env.stderr


async def test_identities_upsert_and_list(terminal: Terminal, tenant: TenantContext,
                                          governance: GovernanceServer, tmp_path: Path) -> None:
    agents = await approved_version(tenant.admin)
    await logged_in(terminal, tenant, governance, tenant.admin_key)
    soul = tmp_path / "soul.md"
    soul.write_text("I am careful with money.\n")
    first = json.loads(ok(await terminal.arm("identities", "upsert", "billing-bot", "--soul-file", str(soul),
                                             "--template", agents.template.slug, "-o", "json")).stdout)
    assert first["created"] is True and first["agent_identity"]["validation_status"] == "IDENTITY_VALIDATION_STATUS_PARTIAL"
    second = ok(await terminal.arm("identities", "upsert", "billing-bot", "--soul-file", str(soul),
                                   "--tools-notes", "payments.* only", "--template", agents.template.slug))
    assert "Identity updated" in second.stdout and "VALID" in second.stdout
    listed = json.loads(ok(await terminal.arm("identities", "list", "--template", agents.template.slug,
                                              "-o", "json")).stdout)
    assert [(i["name"], i["validation_status"]) for i in listed] == [
        ("billing-bot", "IDENTITY_VALIDATION_STATUS_VALID")]
    refused = await terminal.arm("identities", "upsert", "ghost", "--instance", "ins_doesnotexist")
    assert refused.exit_code == 1 and "code:       NOT_FOUND" in refused.stderr


async def test_deployments_create_activate_rollback_list(terminal: Terminal, tenant: TenantContext,
                                                         governance: GovernanceServer) -> None:
    agents = await approved_version(tenant.admin)
    v2 = (await tenant.admin.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(
        template_id=agents.template.id, genome=genome()))).agent_version
    v2 = await walk_version(tenant.admin, v2.id, agents_pb2.VERSION_STATE_APPROVED)
    await logged_in(terminal, tenant, governance, tenant.admin_key)
    env, slug = agents.environment.name, agents.template.slug

    first = json.loads(ok(await terminal.arm("deployments", "create", f"{slug}@{agents.version.number}",
                                             "--env", env, "-r", "first", "-o", "json")).stdout)
    assert first["status"] == "DEPLOYMENT_STATUS_PENDING"
    ok(await terminal.arm("deployments", "activate", first["deployment_id"], "-r", "ship"))
    second = json.loads(ok(await terminal.arm("deployments", "create", f"{slug}@{v2.number}", "--env", env,
                                              "-o", "json")).stdout)
    assert second["previous_version_id"] == agents.version.id
    activated = json.loads(ok(await terminal.arm("deployments", "activate", second["deployment_id"],
                                                 "-o", "json")).stdout)
    assert activated["retired_deployment"]["deployment_id"] == first["deployment_id"]

    active = json.loads(ok(await terminal.arm("deployments", "list", "--template", slug, "--status", "active",
                                              "-o", "json")).stdout)
    assert [d["deployment_id"] for d in active] == [second["deployment_id"]]
    rolled = json.loads(ok(await terminal.arm("deployments", "rollback", second["deployment_id"], "-r", "bad",
                                              "-o", "json")).stdout)
    assert rolled["deployment"]["target_version_id"] == agents.version.id
    assert rolled["rolled_back_deployment"]["deployment_id"] == second["deployment_id"]
    async with governance.client(tenant.admin_key) as gov:
        got = (await gov.deployments.GetActiveDeployment(deployments_pb2.GetActiveDeploymentRequest(
            template_id=agents.template.id, environment_id=agents.environment.id))).deployment
    assert got.target_version_id == agents.version.id and got.rollback_of == second["deployment_id"]
    table = ok(await terminal.arm("deployments", "list", "--env", env)).stdout
    assert second["deployment_id"] in table and "RETIRED" in table

    draft = (await tenant.admin.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(
        template_id=agents.template.id, genome=genome()))).agent_version
    refused = await terminal.arm("deployments", "create", f"{slug}@{draft.number}", "--env", env)
    assert refused.exit_code == 1, refused.output
    assert "code:       FAILED_PRECONDITION" in refused.stderr and "request id:" in refused.stderr
    again = await terminal.arm("deployments", "activate", first["deployment_id"])
    assert again.exit_code == 1 and "code:" in again.stderr and "Traceback" not in again.output

    # PROD: activation needs an approved DEPLOYMENT_ACTIVATION approval.
    prod = f"prod-{secrets.token_hex(3)}"
    ok(await terminal.arm("environments", "create", prod, "--type", "prod"))
    pending = json.loads(ok(await terminal.arm("deployments", "create", f"{slug}@{v2.number}", "--env", prod,
                                               "-o", "json")).stdout)
    gated = await terminal.arm("deployments", "activate", pending["deployment_id"])
    assert gated.exit_code == 1, gated.output
    assert "reason:     APPROVAL_REQUIRED" in gated.stderr and "request id:" in gated.stderr


async def test_agents_and_envelopes_from_files(terminal: Terminal, tenant: TenantContext,
                                               governance: GovernanceServer, tmp_path: Path) -> None:
    await logged_in(terminal, tenant, governance, tenant.admin_key)
    examples = Path(__file__).resolve().parents[2] / "examples" / "terminal"
    made = json.loads(ok(await terminal.arm("agents", "create", "-f", str(examples / "agent.yaml"),
                                            "-o", "json")).stdout)
    assert made["instance"]["state"] == "INSTANCE_STATE_ACTIVE"
    assert [s["step"] for s in made["steps"]][-4:] == ["  → TESTING", "  → CANDIDATE", "  → APPROVED",
                                                       "instance support-bot ACTIVE"]
    made = json.loads(ok(await terminal.arm("envelopes", "create", "-f", str(examples / "policy.yaml"),
                                            "-o", "json")).stdout)
    assert [(e["name"], e["scope"]) for e in made] == [("company-guardrails", "POLICY_SCOPE_TENANT"),
                                                        ("support-bot-tools", "POLICY_SCOPE_PROJECT")]
    decided = ok(await terminal.arm("check", "docs.read", "--instance", "support-bot")).stdout
    assert "ALLOW" in decided and made[1]["envelope_id"] in decided

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nproject: nowhere\n")
    missing = await terminal.arm("envelopes", "create", "-f", str(bad))
    assert missing.exit_code == 1 and "PROJECT_NOT_FOUND" in missing.stderr
    bad.write_text("name: x\nscope: tenant\ntool_rules: [{tool: a.b, effect: maybe}]\n")
    assert (await terminal.arm("envelopes", "create", "-f", str(bad))).exit_code == 2
    bad.write_text("name: x\nscope: tenant\nbudgets: {per_call_usd: 1}\n")
    assert (await terminal.arm("envelopes", "create", "-f", str(bad))).exit_code == 2
    bad.write_text("project: p\ntemplate: t\nname: n\n")
    no_genome = await terminal.arm("agents", "create", "-f", str(bad))
    assert no_genome.exit_code == 2 and "genome" in no_genome.output
    refused = await terminal.arm("operators", "create", "carol@x.example", "--role", "overlord")
    assert refused.exit_code == 1 and "ROLE_NOT_FOUND" in refused.stderr
    key = tmp_path / "carol.key"
    ok(await terminal.arm("operators", "create", "carol@x.example", "--role", "approver", "--key-file", str(key)))
    assert key.read_text().strip() and key.stat().st_mode & 0o077 == 0
