"""Registry basics by name or slug: tenants, projects, operators, role assignments, API keys
(shown once), templates, versions from a genome file promoted to APPROVED step by step, and the
kill switches; each against a real registry and governance, with refusals."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import yaml

from arm.governance.v1 import policy_pb2
from arm.registry.v1 import access_pb2, agents_pb2
from tests.cli.conftest import Terminal, ok
from tests.conftest import GovernanceServer, RegistryServer, TenantContext


async def login(term: Terminal, registry: RegistryServer, governance: GovernanceServer, key: str) -> None:
    ok(await term.arm("login", "--address", registry.address, "--key", key,
                      "--governance-address", governance.address))


async def test_tenants_create_and_list(registry: RegistryServer, governance: GovernanceServer,
                                       tmp_path: Path) -> None:
    system = Terminal(tmp_path / "system.yaml")
    await login(system, registry, governance, registry.admin_key)
    slug = f"t-{secrets.token_hex(4)}"
    created = json.loads(ok(await system.arm("tenants", "create", slug, "--admin-email", f"boss@{slug}.example",
                                             "-o", "json")).stdout)
    key = created["admin_api_key"]
    assert key and created["tenant"]["slug"] == slug
    listed = json.loads(ok(await system.arm("tenants", "list", "-o", "json")).stdout)
    assert slug in [t["slug"] for t in listed]
    # The new tenant's admin logs in with the key shown once, and may not create tenants.
    admin = Terminal(tmp_path / "admin.yaml")
    await login(admin, registry, governance, key)
    refused = await admin.arm("tenants", "create", f"{slug}-2", "--admin-email", "x@y.example")
    assert refused.exit_code == 1 and "code:       PERMISSION_DENIED" in refused.stderr
    again = await system.arm("tenants", "create", slug, "--admin-email", f"boss@{slug}.example")
    assert again.exit_code == 1 and "code:       ALREADY_EXISTS" in again.stderr


async def test_projects_operators_roles_and_keys_by_name(terminal: Terminal, tenant: TenantContext,
                                                         governance: GovernanceServer, tmp_path: Path) -> None:
    await login(terminal, tenant.server, governance, tenant.admin_key)
    ok(await terminal.arm("projects", "create", "payments", "--name", "Payments"))
    projects = json.loads(ok(await terminal.arm("projects", "list", "-o", "json")).stdout)
    project_id = next(p["id"] for p in projects if p["slug"] == "payments")
    twice = await terminal.arm("projects", "create", "payments")
    assert twice.exit_code == 1 and "code:       ALREADY_EXISTS" in twice.stderr and "request id:" in twice.stderr
    email = f"alice-{secrets.token_hex(3)}@x.example"
    ok(await terminal.arm("operators", "create", email, "--name", "Alice"))
    assert email in ok(await terminal.arm("operators", "list")).stdout

    roles_listed = json.loads(ok(await terminal.arm("roles", "list", "-o", "json")).stdout)
    assert {"admin", "approver", "auditor"} <= {r["name"] for r in roles_listed}
    ok(await terminal.arm("roles", "assign", email, "approver", "--project", "payments"))
    op_id = json.loads(ok(await terminal.arm("operators", "list", "-o", "json")).stdout)
    op_id = next(o["id"] for o in op_id if o["email"] == email)
    roles = {r.id: r.name for r in (await tenant.admin.access.ListRoles(access_pb2.ListRolesRequest())).roles}
    assignments = (await tenant.admin.access.ListRoleAssignments(access_pb2.ListRoleAssignmentsRequest(
        operator_id=op_id))).role_assignments
    assert [(roles[a.role_id], a.scope_type, a.scope_id) for a in assignments] == [
        ("approver", access_pb2.ROLE_SCOPE_TYPE_PROJECT, project_id)]

    unknown = await terminal.arm("roles", "assign", "nobody@x.example", "approver")
    assert unknown.exit_code == 1
    assert "no operator named 'nobody@x.example'" in unknown.stderr and "OPERATOR_NOT_FOUND" in unknown.stderr
    bad_role = await terminal.arm("roles", "assign", email, "overlord")
    assert bad_role.exit_code == 1 and "ROLE_NOT_FOUND" in bad_role.stderr

    created = ok(await terminal.arm("keys", "create", "--operator", email, "-o", "json"))
    secret = json.loads(created.stdout)["secret"]
    assert secret and "shown once" in created.stderr
    alice = Terminal(tmp_path / "alice.yaml")
    who = ok(await alice.arm("login", "--address", tenant.server.address, "--key", secret, "-o", "json"))
    assert op_id in json.loads(who.stdout)["actor"]
    neither = await terminal.arm("keys", "create")
    assert neither.exit_code == 2
    nobody = await terminal.arm("keys", "create", "--operator", "nobody@x.example")
    assert nobody.exit_code == 1 and "code:       NOT_FOUND\n  reason:     OPERATOR_NOT_FOUND" in nobody.stderr

    # A script keeps the shown-once secret out of the terminal: --key-file writes it 0600 (an
    # existing file's looser mode too) and shows only where it went; `login --key-file` reads it.
    key_file = tmp_path / "alice.key"
    key_file.write_text("old")
    key_file.chmod(0o644)
    kept = ok(await terminal.arm("keys", "create", "--operator", email, "--key-file", str(key_file), "-o", "json"))
    shown = json.loads(kept.stdout)
    stored = key_file.read_text().strip()
    assert shown["secret"] == f"written to {key_file}" and stored.startswith("arm_") and stored not in kept.output
    assert key_file.stat().st_mode & 0o777 == 0o600
    bob = Terminal(tmp_path / "bob.yaml")
    who = ok(await bob.arm("login", "--address", tenant.server.address, "--key-file", str(key_file), "-o", "json"))
    assert op_id in json.loads(who.stdout)["actor"] and stored not in who.output


async def test_template_version_from_a_file_promoted_to_approved(terminal: Terminal, tenant: TenantContext,
                                                                 governance: GovernanceServer,
                                                                 tmp_path: Path) -> None:
    await login(terminal, tenant.server, governance, tenant.admin_key)
    ok(await terminal.arm("projects", "create", "billing"))
    ok(await terminal.arm("templates", "create", "billing-agent", "--project", "billing", "--name", "Billing"))
    assert "billing-agent" in ok(await terminal.arm("templates", "list", "--project", "billing")).stdout
    no_project = await terminal.arm("templates", "create", "other-agent", "--project", "nope")
    assert no_project.exit_code == 1 and "PROJECT_NOT_FOUND" in no_project.stderr
    twice = await terminal.arm("templates", "create", "billing-agent", "--project", "billing")
    assert twice.exit_code == 1 and "code:       ALREADY_EXISTS" in twice.stderr
    genome = tmp_path / "genome.yaml"
    genome.write_text(yaml.safe_dump({
        "model_config": {"provider": "openai", "model_id": "gpt-4.1", "temperature": 0.2, "max_tokens": 4096},
        "prompt_bundle_hash": f"prompt-{secrets.token_hex(4)}", "tool_manifest_hash": "tools-123456",
        "provenance": {"created_by": "cli-test", "source": "pytest", "created_at": 1700000000000}}))
    created = json.loads(ok(await terminal.arm("versions", "create", "-f", str(genome), "--template", "billing-agent",
                                               "-o", "json")).stdout)
    assert created["state"] == "VERSION_STATE_DRAFT" and created["number"] == "1"

    no_eval = await terminal.arm("versions", "promote", "billing-agent@1")
    assert no_eval.exit_code == 2 and "--eval-summary" in no_eval.output, (no_eval.output, no_eval.exception)
    version = (await tenant.admin.agents.GetAgentVersion(agents_pb2.GetAgentVersionRequest(id=created["id"]))
               ).agent_version
    assert version.state == agents_pb2.VERSION_STATE_TESTING  # it got as far as the evaluation needed

    walked = ok(await terminal.arm("versions", "promote", "billing-agent@1", "--eval-summary", "42/42 passed"))
    steps = [line.split()[0:2] for line in walked.stdout.splitlines()]
    assert steps == [["evaluation", "recorded"], ["→", "CANDIDATE"], ["→", "APPROVED"]], walked.stdout
    version = (await tenant.admin.agents.GetAgentVersion(agents_pb2.GetAgentVersionRequest(id=created["id"]))
               ).agent_version
    assert version.state == agents_pb2.VERSION_STATE_APPROVED and version.eval_summary == "42/42 passed"
    listed = json.loads(ok(await terminal.arm("versions", "list", "billing-agent", "-o", "json")).stdout)
    assert [v["state"] for v in listed] == ["VERSION_STATE_APPROVED"]

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model_config": {"provider": "openai"}}))
    refused = await terminal.arm("versions", "create", "-f", str(bad), "--template", "billing-agent")
    assert refused.exit_code == 1 and "code:       INVALID_ARGUMENT" in refused.stderr
    assert "field:      genome." in refused.stderr


async def test_pause_and_resume_a_project_and_the_tenant(terminal: Terminal, tenant: TenantContext,
                                                         governance: GovernanceServer) -> None:
    await login(terminal, tenant.server, governance, tenant.admin_key)
    ok(await terminal.arm("projects", "create", "ops"))
    paused = json.loads(ok(await terminal.arm("pause", "project", "ops", "-r", "incident", "-o", "json")).stdout)
    assert paused["mode"] == "OPERATOR_CONTROL_MODE_PAUSED" and paused["reason"] == "incident"
    gov = governance.client(tenant.admin_key)
    try:
        ctl = (await gov.policies.GetOperatorControl(policy_pb2.GetOperatorControlRequest(
            scope=policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT, scope_id=paused["scope_id"]))).control
        assert ctl.mode == policy_pb2.OPERATOR_CONTROL_MODE_PAUSED
        ok(await terminal.arm("resume", "project", "ops"))
        ctl = (await gov.policies.GetOperatorControl(policy_pb2.GetOperatorControlRequest(
            scope=policy_pb2.OPERATOR_CONTROL_SCOPE_PROJECT, scope_id=paused["scope_id"]))).control
        assert ctl.mode == policy_pb2.OPERATOR_CONTROL_MODE_NORMAL
        assert "PAUSED" in ok(await terminal.arm("pause", "tenant", "-r", "drill")).stdout
        ctl = (await gov.policies.GetOperatorControl(policy_pb2.GetOperatorControlRequest(
            scope=policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT))).control
        assert ctl.mode == policy_pb2.OPERATOR_CONTROL_MODE_PAUSED
        ok(await terminal.arm("resume", "tenant"))
    finally:
        await gov.close()
    missing = await terminal.arm("pause", "project", "nope")
    assert missing.exit_code == 1 and "PROJECT_NOT_FOUND" in missing.stderr
    missing = await terminal.arm("resume", "project", "nope")
    assert missing.exit_code == 1 and "code:       NOT_FOUND\n  reason:     PROJECT_NOT_FOUND" in missing.stderr
