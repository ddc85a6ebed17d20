"""`arm webhooks create|list|show|rotate-secret|deliveries|delete` against real servers: the
secret is printed once, the API sees what the terminal did, refusals are the error block."""

from __future__ import annotations

import json
from pathlib import Path

from arm.governance.v1 import webhooks_pb2 as wpb
from tests.cli.conftest import Terminal, logged_in, ok
from tests.conftest import GovernanceServer, TenantContext
from tests.helpers import operator_key


async def test_webhooks_from_a_terminal(terminal: Terminal, tenant: TenantContext, governance: GovernanceServer,
                                        tmp_path: Path) -> None:
    await logged_in(terminal, tenant, governance, tenant.admin_key)
    made = ok(await terminal.arm("webhooks", "create", "https://hooks.example.com/arm", "-e", "approval.requested",
                                 "--event", "decided", "-d", "Slack relay"))
    assert "Signing secret" in made.stdout and "whsec_" in made.stdout
    async with governance.client(tenant.admin_key) as client:
        [hook] = (await client.webhooks.ListWebhooks(wpb.ListWebhooksRequest())).webhooks
        assert hook.url == "https://hooks.example.com/arm" and hook.description == "Slack relay"
        assert list(hook.event_types) == [wpb.WEBHOOK_EVENT_TYPE_APPROVAL_REQUESTED,
                                          wpb.WEBHOOK_EVENT_TYPE_APPROVAL_DECIDED]
        listed = ok(await terminal.arm("webhooks", "list")).stdout
        assert hook.webhook_id in listed and "approval.decided" in listed
        secret_file = tmp_path / "secret"
        secret_file.write_text("a-secret-from-a-file-of-32-chars\n")
        rotated = json.loads(ok(await terminal.arm("webhooks", "rotate-secret", hook.webhook_id, "--secret-file",
                                                   str(secret_file), "-o", "json")).stdout)
        assert rotated["secret"] == "a-secret-from-a-file-of-32-chars" and rotated["webhook"]["etag"] == "2"
        shown = ok(await terminal.arm("webhooks", "show", hook.webhook_id)).stdout
        assert "…hars" in shown and "a-secret-from" not in shown
        assert json.loads(ok(await terminal.arm("webhooks", "deliveries", hook.webhook_id, "-o", "json")).stdout) == []
        bad = await terminal.arm("webhooks", "create", "ftp://x.example.com/")
        assert bad.exit_code == 1 and "INVALID_ARGUMENT" in bad.stderr and "webhook.url" in bad.stderr
        assert (await terminal.arm("webhooks", "create", "https://x.example.com/", "-e", "moon")).exit_code == 2
        ok(await terminal.arm("webhooks", "delete", hook.webhook_id, "--yes"))
        assert not (await client.webhooks.ListWebhooks(wpb.ListWebhooksRequest())).webhooks
        gone = await terminal.arm("webhooks", "show", hook.webhook_id)
        assert gone.exit_code == 1 and "WEBHOOK_NOT_FOUND" in gone.stderr
    # An approver is not a tenant admin.
    _, key = await operator_key(tenant.admin, "approver")
    other = Terminal(tmp_path / "other" / "config.yaml")
    await logged_in(other, tenant, governance, key)
    refused = await other.arm("webhooks", "list")
    assert refused.exit_code == 1 and "PERMISSION_DENIED" in refused.stderr
