"""`arm audit list|verify|export` against a real governance: the tenant's trail listed, the chain
verified online, exported as JSON lines and re-verified offline from the file; an edited export
and a tampered trail fail with exit 1."""

from __future__ import annotations

import json
import re
from pathlib import Path

from arm.common.v1 import common_pb2
from arm.governance.v1 import audit_pb2
from tests.cli.conftest import Terminal, logged_in, ok
from tests.conftest import GovernanceServer, TenantContext
from tests.governance.test_audit import tamper, task_record
from tests.helpers import operator_key


async def test_list_verify_export_and_offline_verify(terminal: Terminal, tenant: TenantContext,
                                                     governance: GovernanceServer, tmp_path: Path) -> None:
    async with governance.client(tenant.admin_key) as client:
        await client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(
            records=[task_record(i) for i in range(8)]))
    await logged_in(terminal, tenant, governance, tenant.admin_key)

    listed = json.loads(ok(await terminal.arm("audit", "list", "--limit", "3", "-o", "json")).stdout)
    assert len(listed) == 3
    assert [int(r["sequence"]) for r in listed] == sorted((int(r["sequence"]) for r in listed), reverse=True)
    table = ok(await terminal.arm("audit", "list", "--target", "task-3")).stdout
    assert "task 3 moved" in table and "task 4 moved" not in table

    online = json.loads(ok(await terminal.arm("audit", "verify", "-o", "json")).stdout)
    assert online["ok"] is True and online["records_checked"] >= 8

    export = tmp_path / "trail.jsonl"
    result = ok(await terminal.arm("audit", "export", "--file", str(export)))
    lines = export.read_text().splitlines()
    assert len(lines) == online["records_checked"]
    assert f"{len(lines)} records written" in result.stderr
    offline = json.loads(ok(await terminal.arm("audit", "verify", "--file", str(export), "-o", "json")).stdout)
    assert offline["ok"] is True and offline["last_hash"] == online["last_hash"]
    assert offline["records_checked"] == online["records_checked"]

    # To stdout too: the same lines.
    streamed = ok(await terminal.arm("audit", "export"))
    assert streamed.stdout.splitlines() == lines

    # One edited line in the file: caught offline at that record, exit 1.
    victim = next(i for i, line in enumerate(lines) if '"summary":"task 2 moved"' in line)
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join(lines[:victim] + [lines[victim].replace("task 2 moved", "nothing")]
                                + lines[victim + 1:]) + "\n")
    broken = await terminal.arm("audit", "verify", "--file", str(edited))
    assert broken.exit_code == 1
    assert "HASH_MISMATCH" in broken.stdout and str(victim + 1) in broken.stdout

    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("not json\n")
    bad = await terminal.arm("audit", "verify", "--file", str(garbage))
    assert bad.exit_code == 1 and bad.stderr.startswith("Error: ") and "Traceback" not in bad.output
    missing = await terminal.arm("audit", "verify", "--file", str(tmp_path / "nope.jsonl"))
    assert missing.exit_code == 2


async def test_a_tampered_trail_fails_online_verify(terminal: Terminal, tenant: TenantContext,
                                                    governance: GovernanceServer) -> None:
    async with governance.client(tenant.admin_key) as client:
        await client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(
            records=[task_record(i) for i in range(4)]))
        page = await client.audit.ListChangeRecords(audit_pb2.ListChangeRecordsRequest(
            filter=audit_pb2.ChangeRecordFilter(types=[common_pb2.CHANGE_RECORD_TYPE_TASK_TRANSITIONED])))
    victim = page.records[1].sequence
    await logged_in(terminal, tenant, governance, tenant.admin_key)
    await tamper(governance, "update change_records set summary = 'nothing happened' "
                 "where tenant_id = :t and sequence = :s", t=tenant.tenant.id, s=victim)
    result = await terminal.arm("audit", "verify")
    assert result.exit_code == 1, result.output
    assert "HASH_MISMATCH" in result.stdout
    assert re.search(rf"first broken sequence\s+{victim}\s", result.stdout), result.stdout


async def test_audit_needs_the_permission(terminal: Terminal, tenant: TenantContext,
                                          governance: GovernanceServer) -> None:
    _, key = await operator_key(tenant.admin, "agent")  # an agent runtime's permissions: no audit:read
    await logged_in(terminal, tenant, governance, key)
    refused = await terminal.arm("audit", "list")
    assert refused.exit_code == 1, refused.output
    assert "code:       PERMISSION_DENIED" in refused.stderr and "request id: req-" in refused.stderr
