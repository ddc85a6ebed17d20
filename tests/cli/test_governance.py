"""`arm check` and `arm approvals …` against a real registry and governance: an agent's call that
needs approval, seen, shown, decided by two approvers from their terminals, watched; refusals."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from arm.governance.v1 import policy_pb2
from arm.registry.v1 import access_pb2, agents_pb2
from tests.cli.conftest import Terminal, logged_in, ok
from tests.conftest import GovernanceServer, TenantContext
from tests.helpers import approved_version, operator_key


@dataclass
class Fleet:
    instance_id: str
    instance_name: str
    version_id: str
    admin: Terminal
    approvers: list[Terminal]
    approver_ids: list[str]
    approver_emails: list[str]


@pytest.fixture
async def fleet(tenant: TenantContext, governance: GovernanceServer, tmp_path: Path) -> Fleet:
    agents = await approved_version(tenant.admin)
    inst = (await tenant.admin.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(
        version_id=agents.version.id, environment_id=agents.environment.id, name=f"a-{secrets.token_hex(3)}"))
            ).agent_instance
    await tenant.admin.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(
        id=inst.id, to_state=agents_pb2.INSTANCE_STATE_ACTIVE))
    admin = Terminal(tmp_path / "admin.yaml")
    await logged_in(admin, tenant, governance, tenant.admin_key)
    approvers, ids, emails = [], [], []
    for i in range(2):
        op_id, key = await operator_key(tenant.admin, "approver")
        emails.append((await tenant.admin.access.GetOperator(access_pb2.GetOperatorRequest(id=op_id))).operator.email)
        term = Terminal(tmp_path / f"approver{i}.yaml")
        await logged_in(term, tenant, governance, key)
        approvers.append(term)
        ids.append(op_id)
    return Fleet(inst.id, inst.name, agents.version.id, admin, approvers, ids, emails)


async def needs_approval(fleet: Fleet, tool: str = "payments.send") -> dict:  # type: ignore[type-arg]
    result = ok(await fleet.admin.arm("check", tool, "--instance", fleet.instance_id,
                                      "--args", '{"amount": 120, "to": "acme"}', "-o", "json"))
    decision = json.loads(result.stdout)
    assert decision["decision"] == "DECISION_NEEDS_APPROVAL", decision
    return decision  # type: ignore[no-any-return]


async def test_check_prints_the_decision_with_its_explanation(fleet: Fleet, governance: GovernanceServer,
                                                              tenant: TenantContext) -> None:
    baseline = ok(await fleet.admin.arm("check", "fs.read", "--instance", fleet.instance_name)).stdout  # by name
    assert "ALLOW" in baseline and "BASELINE" in baseline
    gov = governance.client(tenant.admin_key)
    env = (await gov.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(
            name="no fs", scope=policy_pb2.POLICY_SCOPE_VERSION, scope_id=fleet.version_id,
            mode=policy_pb2.POLICY_MODE_ENFORCE,
            tool_rules=[policy_pb2.ToolRule(tool="fs.*", effect=policy_pb2.DECISION_DENY,
                                            description="no file access")])))).envelope
    await gov.close()
    denied = ok(await fleet.admin.arm("check", "fs.read", "--instance", fleet.instance_id)).stdout
    pairs = [re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in denied.splitlines()[1:]]
    lines = {p[0]: p[1] for p in pairs if len(p) == 2}
    assert lines["decision"] == "DENY"
    assert lines["step"] == "ENVELOPE"
    assert lines["scope"] == f"VERSION {fleet.version_id}"
    assert lines["envelope"] == env.envelope_id
    assert lines["revision"] == "1"
    assert lines["rule"] == "TOOL_RULE #0: no file access"
    as_json = json.loads(ok(await fleet.admin.arm("check", "fs.read", "--instance", fleet.instance_id,
                                                  "-o", "json")).stdout)
    assert as_json["decision"] == "DECISION_DENY" and as_json["envelope_id"] == env.envelope_id
    assert as_json["reasons"], as_json
    declared = json.loads(ok(await fleet.admin.arm("check", "notes.read", "--instance", fleet.instance_id,
                                                   "--risk", "critical", "-o", "json")).stdout)
    assert declared["effective_risk"] == "RISK_LEVEL_CRITICAL", declared
    bad_risk = await fleet.admin.arm("check", "notes.read", "--instance", fleet.instance_id, "--risk", "extreme")
    assert bad_risk.exit_code == 2 and "--risk" in bad_risk.output


async def test_an_approval_listed_shown_and_approved_by_two_approvers(fleet: Fleet) -> None:
    decision = await needs_approval(fleet)
    approval_id = decision["approval_id"]
    inbox = ok(await fleet.approvers[0].arm("approvals", "list")).stdout
    assert approval_id in inbox and "payments.send" in inbox and "PENDING" in inbox
    listed = json.loads(ok(await fleet.approvers[0].arm("approvals", "list", "-o", "json")).stdout)
    mine = [a for a in listed if a["approval_id"] == approval_id]
    assert len(mine) == 1 and mine[0]["argument_digest"]
    shown = ok(await fleet.approvers[0].arm("approvals", "show", approval_id)).stdout
    assert mine[0]["argument_digest"] in shown and '"amount": 120' in shown
    first = ok(await fleet.approvers[0].arm("approvals", "approve", approval_id, "-r", "fine", "-o", "json"))
    after_one = json.loads(first.stdout)
    assert [d["operator_id"] for d in after_one["decisions"]] == [fleet.approver_ids[0]]
    # A HIGH-risk payment needs two decisions: still open after the first; the second settles it.
    assert after_one["status"] == "APPROVAL_STATUS_PENDING" and after_one["required_decisions"] == 2
    assert f"1/2 ({fleet.approver_emails[0]} approve)" in ok(await fleet.admin.arm("approvals", "list")).stdout
    second = ok(await fleet.approvers[1].arm("approvals", "approve", approval_id, "-r", "ok too"))
    assert "APPROVED" in second.stdout and fleet.approver_emails[1] in second.stdout
    shown = json.loads(ok(await fleet.admin.arm("approvals", "show", approval_id, "-o", "json")).stdout)
    assert shown["status"] == "APPROVAL_STATUS_APPROVED"
    pending = json.loads(ok(await fleet.approvers[0].arm("approvals", "list", "-o", "json")).stdout)
    assert approval_id not in [a["approval_id"] for a in pending]
    approved = json.loads(ok(await fleet.approvers[0].arm("approvals", "list", "--status", "approved",
                                                          "-o", "json")).stdout)
    assert approval_id in [a["approval_id"] for a in approved]


async def test_deny_and_cancel(fleet: Fleet) -> None:
    denied_id = (await needs_approval(fleet))["approval_id"]
    denied = ok(await fleet.approvers[1].arm("approvals", "deny", denied_id, "--reason", "too much"))
    assert "DENIED" in denied.stdout and "too much" in denied.stdout
    cancelled_id = (await needs_approval(fleet, "payments.refund"))["approval_id"]
    assert cancelled_id != denied_id
    cancelled = json.loads(ok(await fleet.admin.arm("approvals", "cancel", cancelled_id, "-r", "not needed",
                                                    "-o", "json")).stdout)
    assert cancelled["status"] == "APPROVAL_STATUS_CANCELLED"
    # Deciding a settled approval is refused: one error block, exit 1.
    again = await fleet.approvers[0].arm("approvals", "approve", denied_id)
    assert again.exit_code == 1 and again.stderr.startswith("Error: ")
    assert "code:       FAILED_PRECONDITION" in again.stderr and "request id: req-" in again.stderr


async def test_approving_without_the_role_is_refused(fleet: Fleet, tenant: TenantContext,
                                                     governance: GovernanceServer, tmp_path: Path) -> None:
    approval_id = (await needs_approval(fleet))["approval_id"]
    _, key = await operator_key(tenant.admin, "auditor")
    auditor = Terminal(tmp_path / "auditor.yaml")
    await logged_in(auditor, tenant, governance, key)
    refused = await auditor.arm("approvals", "approve", approval_id)
    assert refused.exit_code == 1
    assert "code:       PERMISSION_DENIED" in refused.stderr and "request id: req-" in refused.stderr
    assert "Traceback" not in refused.output
    nameless = await fleet.admin.arm("check", "fs.read", "--instance", "no-such-agent")
    assert nameless.exit_code == 1 and "INSTANCE_NOT_FOUND" in nameless.stderr
    missing = await fleet.approvers[0].arm("approvals", "show", "apr_doesnotexist")
    assert missing.exit_code == 1 and "code:       NOT_FOUND" in missing.stderr


async def test_watch_follows_an_approval_until_decided(fleet: Fleet, governance: GovernanceServer,
                                                       tenant: TenantContext) -> None:
    approval_id = (await needs_approval(fleet))["approval_id"]
    watcher = fleet.approvers[0].spawn("approvals", "watch", approval_id, "-o", "json")
    try:
        assert watcher.stdout is not None
        # Read in a thread: the servers run on this test's event loop.
        first = json.loads(await asyncio.to_thread(watcher.stdout.readline))  # the current state first
        assert first["approval_id"] == approval_id and first["status"] == "APPROVAL_STATUS_PENDING"
        for term in fleet.approvers:
            result = ok(await term.arm("approvals", "deny", approval_id, "-r", "no"))
            if "DENIED" in result.stdout:
                break
        out, err = await asyncio.to_thread(watcher.communicate, timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 0, err
    last = json.loads(out.strip().splitlines()[-1])
    assert last["status"] == "APPROVAL_STATUS_DENIED"


async def test_watch_without_an_id_follows_the_inbox(fleet: Fleet) -> None:
    watcher = fleet.approvers[0].spawn("approvals", "watch", "--interval", "0.2", "-o", "json")
    try:
        assert watcher.stdout is not None

        async def line() -> dict:  # type: ignore[type-arg]
            text = await asyncio.wait_for(asyncio.to_thread(watcher.stdout.readline), 60)  # type: ignore[union-attr]
            assert text, watcher.stderr.read() if watcher.stderr else ""
            return json.loads(text)  # type: ignore[no-any-return]

        approval_id = (await needs_approval(fleet))["approval_id"]
        opened = await line()
        assert (opened["approval_id"], opened["status"]) == (approval_id, "APPROVAL_STATUS_PENDING")
        assert "decisions" not in opened
        ok(await fleet.approvers[0].arm("approvals", "approve", approval_id))
        one = await line()
        assert one["approval_id"] == approval_id and len(one["decisions"]) == 1
        ok(await fleet.approvers[1].arm("approvals", "approve", approval_id))
        resolved = await line()
        assert (resolved["approval_id"], resolved["status"]) == (approval_id, "APPROVAL_STATUS_APPROVED")
        watcher.send_signal(signal.SIGINT)
        _, err = await asyncio.to_thread(watcher.communicate, timeout=60)
        assert watcher.returncode == 130, err
        assert "Traceback" not in err
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
