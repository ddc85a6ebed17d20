"""`arm policy apply|export|test` (docs/policies.md) against a real registry and governance on
port 0 (sqlite and postgres): plan, apply, re-apply with no change, a rule-level diff, --prune,
an etag conflict while another operator edits (nothing half-applied), export → apply round trip;
the offline test runner on the 38-case suite of tests/cli/policies, a wrong expectation's diff."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from arm.governance.v1 import approvals_pb2, audit_pb2, policy_pb2
from arm_cli import policy_files as pf
from arm_client.stubs import ArmClient
from tests.cli.conftest import Terminal, logged_in, ok
from tests.conftest import GovernanceServer, TenantContext
from tests.helpers import approved_version

SUITE = Path(__file__).parent / "policies"


@dataclass
class Workspace:
    tenant: TenantContext
    admin: Terminal
    files: Path
    project: str
    version: str
    gov: ArmClient
    """The admin's client of governance (the other operator of the conflict test)."""


def write_policies(ws: Workspace, *, refund_effect: str = "NEEDS_APPROVAL", with_reports: bool = True,
                   tier: int = 2) -> None:
    (ws.files / "tenant.yaml").write_text(
        "name: guardrails\nscope: tenant\nrequire_approval_at_risk: HIGH\ndeny_at_risk: CRITICAL\n"
        "tool_rules:\n  - tool: secrets.**\n    effect: DENY\n    locked: true\n"
        "---\nname: strict-preview\nscope: tenant\nmode: SHADOW\ndefault_effect: DENY\n")
    (ws.files / "project.yaml").write_text(
        f"name: payments\nscope: {{project: {ws.project}}}\nbudgets: {{per_run_usd: 5, daily_usd: 100}}\n"
        "tool_rules:\n"
        f"  - tool: payments.refund\n    effect: {refund_effect}\n"
        "    when: {arg_patterns: ['\"amount\":[0-9]{3,}'], environments: [PROD]}\n"
        "  - tool: payments.*\n    effect: ALLOW\n"
        "default_effect: DENY\n")
    version = ws.files / "version.yaml"
    if with_reports:
        version.write_text(f"name: agent-v1\nscope: {{version: {ws.version}}}\nautonomy_tier: {tier}\n"
                           "tool_rules:\n  - tool: reports.*\n    effect: ALLOW\n    description: reports\n")
    elif version.exists():
        version.unlink()


@pytest.fixture
async def ws(tenant: TenantContext, governance: GovernanceServer, tmp_path: Path) -> AsyncIterator[Workspace]:
    agents = await approved_version(tenant.admin)
    admin = Terminal(tmp_path / "admin.yaml")
    await logged_in(admin, tenant, governance, tenant.admin_key)
    files = tmp_path / "policies"
    files.mkdir()
    gov = ArmClient(governance.address, tenant.admin_key)
    yield Workspace(tenant, admin, files, agents.project.slug, f"{agents.template.slug}@{agents.version.number}", gov)
    await gov.close()


async def live(ws: Workspace) -> dict[str, policy_pb2.PolicyEnvelope]:
    resp = await ws.gov.policies.ListPolicyEnvelopes(policy_pb2.ListPolicyEnvelopesRequest(page_size=100))
    return {e.name: e for e in resp.envelopes}


async def test_plan_apply_reapply_diff_prune_and_export_round_trip(ws: Workspace, tmp_path: Path) -> None:
    write_policies(ws)
    # The plan alone writes nothing.
    plan = ok(await ws.admin.arm("policy", "apply", "-f", str(ws.files), "--dry-run")).stdout
    assert "+ create     guardrails" in plan and "+ create     agent-v1" in plan, plan
    assert "Plan: 4 to create, 0 to update, 0 to deactivate, 0 unchanged." in plan
    assert await live(ws) == {}

    out = ok(await ws.admin.arm("policy", "apply", "-f", str(ws.files))).stdout
    assert "Applied: 4 envelope(s) written." in out, out
    envs = await live(ws)
    assert set(envs) == {"guardrails", "strict-preview", "payments", "agent-v1"}
    assert envs["payments"].scope == policy_pb2.POLICY_SCOPE_PROJECT
    assert envs["payments"].tool_rules[0].when.environments == ["PROD"]
    assert envs["payments"].budgets.per_run_usd == 5
    assert envs["strict-preview"].mode == policy_pb2.POLICY_MODE_SHADOW
    assert envs["agent-v1"].scope == policy_pb2.POLICY_SCOPE_VERSION and envs["agent-v1"].autonomy_tier == 2
    assert envs["guardrails"].tool_rules[0].locked

    # Re-apply: nothing changes, no revision is written.
    again = ok(await ws.admin.arm("policy", "apply", "-f", str(ws.files))).stdout
    assert "0 to create, 0 to update, 0 to deactivate, 4 unchanged." in again and "Nothing to do." in again, again
    assert {n: e.revision for n, e in (await live(ws)).items()} == {n: 1 for n in envs}

    # A changed rule: the plan shows it rule by rule, and the update is one new revision.
    write_policies(ws, refund_effect="DENY", tier=3)
    diff = ok(await ws.admin.arm("policy", "apply", "-f", str(ws.files), "--dry-run")).stdout
    assert "~ update     payments" in diff and "~ update     agent-v1" in diff, diff
    assert "- rule: payments.refund → NEEDS_APPROVAL when" in diff
    assert "+ rule: payments.refund → DENY when" in diff
    assert "~ autonomy_tier: 2 → 3" in diff
    assert "+ rule: payments.* → ALLOW" not in diff and "- rule: payments.* → ALLOW" not in diff  # context only
    ok(await ws.admin.arm("policy", "apply", "-f", str(ws.files)))
    envs = await live(ws)
    assert envs["payments"].revision == 2 and envs["payments"].tool_rules[0].effect == policy_pb2.DECISION_DENY
    assert envs["guardrails"].revision == 1

    # --prune: the version envelope is no longer in the files → deactivated; without --prune, kept.
    write_policies(ws, refund_effect="DENY", tier=3, with_reports=False)
    kept = ok(await ws.admin.arm("policy", "apply", "-f", str(ws.files))).stdout
    assert "Nothing to do." in kept and (await live(ws))["agent-v1"].active
    # Its scope is not in the files any more: pruning is per scope named in the files, so add the
    # version scope back with another envelope and prune.
    (ws.files / "version.yaml").write_text(f"name: agent-v1-b\nscope: {{version: {ws.version}}}\n"
                                           "default_effect: NEEDS_APPROVAL\n")
    pruned = ok(await ws.admin.arm("policy", "apply", "-f", str(ws.files), "--prune")).stdout
    assert "- deactivate agent-v1" in pruned and "+ create     agent-v1-b" in pruned, pruned
    envs = await live(ws)
    assert not envs["agent-v1"].active and envs["agent-v1-b"].active and envs["guardrails"].active

    # export → apply: a no-op.
    exported = tmp_path / "exported.yaml"
    ok(await ws.admin.arm("policy", "export", "--out", str(exported)))
    text = exported.read_text()
    assert "agent-v1-b" in text and "name: agent-v1\n" not in text  # only active envelopes
    assert f"project: {ws.project}" in text and f"version: {ws.version}\n  project: {ws.project}" in text
    round_trip = ok(await ws.admin.arm("policy", "apply", "-f", str(exported))).stdout
    assert "0 to create, 0 to update, 0 to deactivate, 4 unchanged." in round_trip, round_trip
    assert {n: e.revision for n, e in (await live(ws)).items()} == {n: e.revision for n, e in envs.items()}


async def test_etag_conflict_leaves_nothing_half_applied(ws: Workspace, tmp_path: Path) -> None:
    write_policies(ws)
    ok(await ws.admin.arm("policy", "apply", "-f", str(ws.files)))
    before = await live(ws)
    # Two envelopes change in the files; the plan is saved with the etags it read.
    write_policies(ws, refund_effect="DENY", tier=4)
    saved = tmp_path / "plan.json"
    ok(await ws.admin.arm("policy", "apply", "-f", str(ws.files), "--dry-run", "--save-plan", str(saved)))
    kinds = {a["name"]: a["kind"] for a in json.loads(saved.read_text())}
    assert kinds["payments"] == "update" and kinds["agent-v1"] == "update", kinds
    # Another operator edits the second envelope of the plan meanwhile.
    order = [a["name"] for a in json.loads(saved.read_text()) if a["kind"] == "update"]
    edited = before[order[1]]
    edited.description = "edited by someone else"
    await ws.gov.policies.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
        envelope=edited, etag=edited.etag, update_mask={"paths": ["description"]}))

    result = await ws.admin.arm("policy", "apply", "--plan", str(saved))
    assert result.exit_code == 1, result.output
    assert f"envelope {order[1]!r} changed since the plan was made" in result.output, result.output
    assert "nothing is left half-applied" in result.output and "Traceback" not in result.output
    after = await live(ws)
    # The first update was undone: its content is what it was before the apply.
    first = order[0]
    assert pf.from_proto(after[first], pf.ScopeRef("x")) == pf.from_proto(before[first], pf.ScopeRef("x"))
    assert after[order[1]].description == "edited by someone else"
    # Planned again, the files apply cleanly over the other operator's edit.
    ok(await ws.admin.arm("policy", "apply", "-f", str(ws.files)))
    assert (await live(ws))["payments"].tool_rules[0].effect == policy_pb2.DECISION_DENY


async def test_refused_apply_shows_the_error_block_and_writes_nothing(ws: Workspace) -> None:
    write_policies(ws)
    # A glob over the policy limits: the server refuses it (INVALID_ARGUMENT with the field).
    (ws.files / "zz_bad.yaml").write_text("name: zz-bad\nscope: tenant\ntool_rules:\n"
                                          "  - tool: '*a*a*a*a*a'\n    effect: DENY\n")
    result = await ws.admin.arm("policy", "apply", "-f", str(ws.files))
    assert result.exit_code == 1, result.output
    assert "code:       INVALID_ARGUMENT" in result.output and "field:" in result.output, result.output
    assert "nothing is left half-applied" in result.output
    assert all(not e.active for e in (await live(ws)).values())
    # A file error is a usage error (2) naming file, document and field.
    (ws.files / "zz_bad.yaml").write_text("name: zz-bad\nscope: tenant\ntool_rules:\n  - tool: x\n    efect: DENY\n")
    result = await ws.admin.arm("policy", "apply", "-f", str(ws.files))
    assert result.exit_code == 2 and "zz_bad.yaml#1.tool_rules[0]: unknown field(s) efect" in result.output


async def test_offline_suite_covers_every_step_and_writes_junit(tmp_path: Path) -> None:
    term = Terminal(tmp_path / "none.yaml")  # offline: no context, no server
    junit = tmp_path / "junit.xml"
    result = ok(await term.arm("policy", "test", str(SUITE), "--junit", str(junit), "-o", "json"))
    rows = json.loads(result.stdout)
    assert len(rows) >= 30 and all(r["result"] == "pass" for r in rows)
    assert {r["step"] for r in rows} == {"AGENT", "KILL_SWITCH", "APPROVAL_GRANT", "LOCKED_RULE", "ENVELOPE",
                                         "BASELINE", "BUDGET"}
    assert {r["got"] for r in rows} == {"ALLOW", "DENY", "NEEDS_APPROVAL"}
    suite = ET.parse(junit).getroot()
    assert suite.get("tests") == str(len(rows)) and suite.get("failures") == "0"


async def test_a_wrong_expectation_fails_with_a_readable_diff(tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    shutil.copytree(SUITE, suite)
    test_file = suite / "decisions_test.yaml"
    text = test_file.read_text()
    wrong = text.replace("    tool: secrets.vault.read\n    expect: {decision: DENY, scope: tenant, step: LOCKED_RULE}",
                         "    tool: secrets.vault.read\n    expect: {decision: ALLOW, scope: tenant, step: LOCKED_RULE}")
    assert wrong != text
    test_file.write_text(wrong)
    term = Terminal(tmp_path / "none.yaml")
    junit = tmp_path / "junit.xml"
    result = await term.arm("policy", "test", str(suite), "--junit", str(junit))
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert "FAIL tenant's locked deny on secrets" in out
    assert "-decision: ALLOW\n  +decision: DENY" in out, out
    assert "decided at step LOCKED_RULE, scope TENANT, rule 'no agent reads secrets'" in out
    assert "passed, 1 failed" in out
    failures = ET.parse(junit).getroot().findall(".//failure")
    assert len(failures) == 1 and "decision: expected ALLOW, got DENY" in (failures[0].get("message") or "")


async def test_offline_and_server_agree_on_every_case(tenant: TenantContext, governance: GovernanceServer,
                                                      tmp_path: Path) -> None:
    admin = Terminal(tmp_path / "admin.yaml")
    await logged_in(admin, tenant, governance, tenant.admin_key)
    gov = ArmClient(governance.address, tenant.admin_key)
    try:
        records = (await gov.audit.ListChangeRecords(audit_pb2.ListChangeRecordsRequest(page_size=1000))).records
        offline = json.loads(ok(await admin.arm("policy", "test", str(SUITE), "-o", "json")).stdout)
        server = json.loads(ok(await admin.arm("policy", "test", str(SUITE), "--server", "-o", "json")).stdout)
        assert len(server) == len(offline) >= 30
        assert server == offline  # decision, reason code, scope and step of every case
        # Nothing was logged or opened: no approval for the NEEDS_APPROVAL cases, no new record.
        assert not (await gov.approvals.ListApprovals(approvals_pb2.ListApprovalsRequest(page_size=100))).approvals
        after = (await gov.audit.ListChangeRecords(audit_pb2.ListChangeRecordsRequest(page_size=1000))).records
        # (the registry's records of the tenant's creation arrive on their own schedule: not counted)
        assert [r for r in after if r.source != "registry"] == [r for r in records if r.source != "registry"]

        # A wrong expectation fails the same way on the server.
        suite = tmp_path / "suite"
        shutil.copytree(SUITE, suite)
        f = suite / "decisions_test.yaml"
        f.write_text(f.read_text().replace("expect: {decision: DENY, reason: UNKNOWN_AGENT, step: AGENT}",
                                           "expect: {decision: ALLOW, reason: UNKNOWN_AGENT, step: AGENT}"))
        failed = await admin.arm("policy", "test", str(suite), "--server")
        assert failed.exit_code == 1 and "-decision: ALLOW\n  +decision: DENY" in failed.stdout, failed.output

        # A policy the server refuses (over the policy limits): the error block, exit 1.
        (suite / "zz_bad.yaml").write_text("name: zz\nscope: tenant\ntool_rules:\n  - tool: '*a*a*a*a*a'\n"
                                           "    effect: DENY\n")
        refused = await admin.arm("policy", "test", str(suite), "--server")
        assert refused.exit_code == 1 and "code:       INVALID_ARGUMENT" in refused.output, refused.output
        assert "tool_rules[0].tool" in refused.output
    finally:
        await gov.close()


async def test_risk_overrides_apply_diff_and_round_trip(ws: Workspace, tmp_path: Path) -> None:
    write_policies(ws)
    risk = ws.files / "risk.yaml"
    risk.write_text("kind: risk_overrides\noverrides:\n  - tool: payments.refund\n"
                    "    risk: MEDIUM\n    arguments_below: {amount: 50}\n")
    out = ok(await ws.admin.arm("policy", "apply", "-f", str(ws.files))).stdout
    assert "~ update     (risk overrides)" in out and "+ override: payments.refund → MEDIUM when amount<50" in out
    got = (await ws.gov.policies.GetRiskOverrides(policy_pb2.GetRiskOverridesRequest())).risk_overrides
    assert got.revision == 1 and got.overrides[0].arguments_below == {"amount": 50}
    again = ok(await ws.admin.arm("policy", "apply", "-f", str(ws.files))).stdout
    assert "= unchanged  (risk overrides)" in again and "Nothing to do." in again

    # Argument triggers: a rule-level diff, applied, then unchanged.
    risk.write_text(risk.read_text() + "argument_triggers:\n  - label: production\n    risk: MEDIUM\n"
                    "  - label: deploy\n    disabled: true\n"
                    "  - {label: crown jewels, pattern: 'customers?[_ ]table', risk: CRITICAL}\n")
    out = ok(await ws.admin.arm("policy", "apply", "-f", str(ws.files))).stdout
    assert "+ trigger: production → MEDIUM" in out and "+ trigger: deploy disabled" in out, out
    assert "+ trigger: crown jewels /customers?[_ ]table/ → CRITICAL" in out
    got = (await ws.gov.policies.GetRiskOverrides(policy_pb2.GetRiskOverridesRequest())).risk_overrides
    assert got.revision == 2 and [(t.label, t.risk, t.disabled) for t in got.argument_triggers] == [
        ("production", 2, False), ("deploy", 0, True), ("crown jewels", 4, False)]
    assert "= unchanged  (risk overrides)" in ok(await ws.admin.arm("policy", "apply", "-f", str(ws.files))).stdout

    exported = tmp_path / "exported.yaml"
    ok(await ws.admin.arm("policy", "export", "--out", str(exported)))
    text = exported.read_text()
    assert "kind: risk_overrides" in text and "argument_triggers:" in text and "label: crown jewels" in text
    assert "Nothing to do." in ok(await ws.admin.arm("policy", "apply", "-f", str(exported))).stdout
    assert (await ws.gov.policies.GetRiskOverrides(policy_pb2.GetRiskOverridesRequest())).risk_overrides.revision == 2

    # A trigger the engine's limits refuse is a usage error naming the field; nothing is written.
    risk.write_text("kind: risk_overrides\nargument_triggers:\n  - {label: mine, pattern: '(?<=a)b'}\n")
    refused = await ws.admin.arm("policy", "apply", "-f", str(ws.files))
    assert refused.exit_code == 2 and "risk.yaml#1.argument_triggers[0].pattern: is not an RE2" in refused.output, \
        refused.output
    assert (await ws.gov.policies.GetRiskOverrides(policy_pb2.GetRiskOverridesRequest())).risk_overrides.revision == 2


async def test_the_quickstart_policies_pass_their_own_cases(tmp_path: Path) -> None:
    examples = Path(__file__).parents[2] / "examples" / "terminal" / "policies"
    term = Terminal(tmp_path / "none.yaml")
    rows = json.loads(ok(await term.arm("policy", "test", str(examples), "-o", "json")).stdout)
    assert len(rows) >= 4 and all(r["result"] == "pass" for r in rows)
    assert [s.name for s in pf.load(examples)] == ["company-guardrails", "support-bot-tools"]
