"""Policies in a real browser: envelopes made through the gRPC API show by scope, two revisions
are compared rule by rule, an agent's effective policy says where each rule came from, a call is
evaluated (explained, and not logged), and a draft is simulated against logged decisions showing
the one that would flip. Another tenant's envelope is not found."""

from __future__ import annotations

import secrets

from arm.governance.v1 import decision_pb2, policy_pb2
from tests.conftest import TenantContext, make_tenant
from tests.console.conftest import ConsoleStack, Ui
from tests.console.view_helpers import active_agent, api, assert_not_found

ALLOW, DENY, NA = policy_pb2.DECISION_ALLOW, policy_pb2.DECISION_DENY, policy_pb2.DECISION_NEEDS_APPROVAL


async def decision_count(client, instance_id: str) -> int:  # type: ignore[no-untyped-def]
    resp = await client.decisions.ListDecisions(decision_pb2.ListDecisionsRequest(
        filter=decision_pb2.DecisionFilter(instance_id=instance_id), page_size=500))
    return len(resp.decisions)


async def test_policies_envelopes_diff_effective_evaluate_simulate(ui: Ui, tenant: TenantContext,
                                                                   console: ConsoleStack, system_admin) -> None:  # type: ignore[no-untyped-def]
    client = api(console, tenant.admin_key)
    agent = await active_agent(client)
    name = f"payments-guard-{secrets.token_hex(3)}"
    env = (await client.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(
            name=name, description="Money moves need a human", scope=policy_pb2.POLICY_SCOPE_TENANT,
            tool_rules=[policy_pb2.ToolRule(tool="payments.*", effect=NA, description="refunds and payouts")]),
        reason="first cut"))).envelope
    env = (await client.policies.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(envelope_id=env.envelope_id, tool_rules=[
            *env.tool_rules, policy_pb2.ToolRule(tool="db.drop*", effect=DENY, locked=True)]),
        update_mask={"paths": ["tool_rules"]}, etag=env.etag, reason="no dropping tables"))).envelope
    assert env.revision == 2
    project_env = (await client.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(
            name=f"reads-{secrets.token_hex(3)}", scope=policy_pb2.POLICY_SCOPE_PROJECT,
            scope_id=agent.agents.project.id,
            tool_rules=[policy_pb2.ToolRule(tool="fs.read", effect=ALLOW)])))).envelope
    # A logged decision the simulation replays: payments.refund needed approval.
    logged = await client.decisions.Check(decision_pb2.CheckRequest(
        instance_id=agent.instance.id, tool_name="payments.refund", tool_call_id="tc-1"))
    assert logged.decision == NA

    await ui.sign_in(tenant.admin_key)
    await ui.goto("/policies")
    tenant_table = ui.page.get_by_test_id("envelopes-tenant")
    await tenant_table.get_by_text(name).wait_for()
    assert project_env.name in await ui.page.get_by_test_id("envelopes-project").inner_text()
    await ui.screenshot("policies-envelopes")

    # The drawer, then the revisions: r1 → r2 adds the locked db.drop* rule.
    await tenant_table.get_by_role("link", name=name).click()
    drawer = ui.page.get_by_test_id("drawer")
    assert "payments.* → NEEDS_APPROVAL" in await drawer.get_by_test_id("envelope-rules").inner_text()
    await drawer.get_by_role("link", name="Revisions & diff").click()
    diff = ui.page.get_by_test_id("diff")
    await diff.wait_for()
    text = await diff.inner_text()
    assert "+ rule: db.drop* → DENY (locked)" in text and "payments.*" in text
    assert "no dropping tables" in await ui.page.get_by_test_id("revisions").inner_text()
    await ui.screenshot("policies-revisions-diff")

    # The effective policy of the agent, by its legacy id: each rule with the envelope it came from.
    await ui.goto(f"/policies/effective?agent={agent.legacy_id}")
    rules = ui.page.get_by_test_id("effective-rules")
    rows = await rules.locator("tbody tr").all_inner_texts()
    assert any("db.drop* → DENY (locked)" in r and name in r for r in rows), rows
    assert any("fs.read → ALLOW" in r and project_env.name in r for r in rows), rows
    await ui.screenshot("policies-effective")

    # The evaluator: db.drop_users is denied by the locked rule; nothing is logged.
    before = await decision_count(client, agent.instance.id)
    await ui.goto("/policies/evaluate")
    form = ui.page.get_by_test_id("evaluate-form")
    await form.locator("#agent").fill(agent.instance.id)
    await form.locator("#tool").fill("db.drop_users")
    await form.locator("#arguments").fill('{"table": "users"}')
    await form.get_by_role("button", name="Evaluate").click()
    result = ui.page.get_by_test_id("evaluation")
    await result.locator(".verdict").wait_for()
    text = await result.inner_text()
    assert "DENY" in text and name in text and "db.drop*" in text, text
    assert agent.agents.environment.name in text
    assert await decision_count(client, agent.instance.id) == before
    await ui.screenshot("policies-evaluate")

    # A hypothetical agent of the project: the project's envelope decides fs.read.
    await form.locator("#agent").fill("")
    await form.locator("#tool").fill("fs.read")
    await form.locator("#arguments").fill("{}")
    await form.locator("select[name=project]").select_option(agent.agents.project.id)
    await form.get_by_role("button", name="Evaluate").click()
    text = await ui.page.get_by_test_id("evaluation").inner_text()
    assert "ALLOW" in text and project_env.name in text, text
    assert await decision_count(client, agent.instance.id) == before

    # A bad argument is explained, not a crash.
    await form.locator("#arguments").fill("[1, 2")
    await form.get_by_role("button", name="Evaluate").click()
    assert "Arguments: a JSON object" in await ui.page.get_by_test_id("errors").inner_text()

    # Simulation: the draft makes payments.* a DENY; the logged NEEDS_APPROVAL would flip.
    await ui.goto(f"/policies/simulate?envelope={env.envelope_id}")
    draft = ui.page.locator("#draft")
    yaml_text = await draft.input_value()
    assert "payments.*" in yaml_text and "scope" not in yaml_text
    await draft.fill(yaml_text.replace("effect: NEEDS_APPROVAL", "effect: DENY"))
    await ui.page.get_by_role("button", name="Simulate").click()
    sim = ui.page.get_by_test_id("simulation")
    await sim.wait_for()
    assert "1 of" in await sim.locator("h2").inner_text()
    flips = await sim.get_by_test_id("flips").inner_text()
    assert "payments.refund" in flips and "NEEDS_APPROVAL" in flips and "DENY" in flips
    await ui.screenshot("policies-simulate")
    stored = (await client.policies.GetPolicyEnvelope(policy_pb2.GetPolicyEnvelopeRequest(
        envelope_id=env.envelope_id))).envelope
    assert stored.revision == 2 and stored.tool_rules[0].effect == NA  # simulating changed nothing

    # A draft with an error says which field.
    await ui.page.locator("#draft").fill("name: x\ntool_rules:\n  - tool: a.b\n    effect: MAYBE\n")
    await ui.page.get_by_role("button", name="Simulate").click()
    assert "effect" in await ui.page.get_by_test_id("errors").inner_text()

    # Another tenant's envelope is not found, by path or by drawer.
    other = await make_tenant(console.registry, system_admin)
    other_client = api(console, other.admin_key)
    try:
        theirs = (await other_client.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
            envelope=policy_pb2.PolicyEnvelope(name="theirs", scope=policy_pb2.POLICY_SCOPE_TENANT,
                                               default_effect=ALLOW)))).envelope
        await assert_not_found(ui, f"/policies/envelopes/{theirs.envelope_id}")
        await assert_not_found(ui, f"/policies?envelope={theirs.envelope_id}")
        await assert_not_found(ui, f"/policies/simulate?envelope={theirs.envelope_id}")
        token = await ui.page.locator("input[name=csrf_token]").first.input_value()
        posted = await ui.context.request.post(f"{ui.base}/policies/simulate", form={
            "csrf_token": token, "envelope": theirs.envelope_id, "draft": "name: x\n", "hours": "24",
            "limit": "10"})
        assert posted.status == 404
        refused = await ui.context.request.post(f"{ui.base}/policies/evaluate", form={"tool": "fs.read"})
        assert refused.status == 403  # no CSRF token
    finally:
        await other_client.close()
        await other.admin.close()
        await client.close()


async def test_policies_empty_states_say_what_to_do(ui: Ui, tenant: TenantContext) -> None:
    await ui.sign_in(tenant.admin_key)
    await ui.goto("/policies")
    assert "arm policy apply" in await ui.page.inner_text("main")
    await ui.goto("/policies/effective")
    assert "Enter an instance id" in await ui.page.inner_text("main")
    await ui.goto("/policies/effective?agent=nobody-here")
    assert "No such agent" in await ui.page.inner_text("main")
