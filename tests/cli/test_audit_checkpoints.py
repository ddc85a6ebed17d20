"""`arm audit checkpoints list|create`, `arm audit key`, `arm audit export --checkpoints
--public-key` and `arm audit verify --file --checkpoints --public-key` against a real governance:
the kept checkpoints verify the export offline; a history rewritten with every hash recomputed
passes the plain chain check but not the checkpoints; a forged checkpoint or another key fails."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from arm.governance.v1 import audit_pb2
from tests.cli.conftest import Terminal, logged_in, ok
from tests.conftest import GovernanceServer, TenantContext
from tests.governance.test_audit import task_record
from tests.governance.test_audit_checkpoints import edit, rewrite_history
from tests.helpers import operator_key


async def test_checkpoints_kept_and_verified_offline(terminal: Terminal, tenant: TenantContext,
                                                     governance: GovernanceServer, tmp_path: Path) -> None:
    async with governance.client(tenant.admin_key) as client:
        await client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(
            records=[task_record(i) for i in range(10)]))
    await logged_in(terminal, tenant, governance, tenant.admin_key)
    made = json.loads(ok(await terminal.arm("audit", "checkpoints", "create", "-o", "json")).stdout)
    assert made["created"] is True
    # A create while the head stands still changes nothing. Records the registry relays through
    # its outbox (the operators and keys made above) may still move the head once or twice first.
    for _ in range(20):
        same = ok(await terminal.arm("audit", "checkpoints", "create")).stdout
        if "unchanged" in same:
            break
        await asyncio.sleep(0.2)
    assert "unchanged" in same
    listed = json.loads(ok(await terminal.arm("audit", "checkpoints", "list", "-o", "json")).stdout)
    assert made["checkpoint"]["sequence"] in [c["sequence"] for c in listed]
    assert made["checkpoint"]["head_hash"] in ok(await terminal.arm("audit", "checkpoints", "list")).stdout
    key_info = json.loads(ok(await terminal.arm("audit", "key", "-o", "json")).stdout)
    assert key_info["algorithm"] == "Ed25519" and "BEGIN PUBLIC KEY" in key_info["public_key_pem"]

    trail, kept, key = tmp_path / "trail.jsonl", tmp_path / "checkpoints.jsonl", tmp_path / "audit-key.pem"
    exported = ok(await terminal.arm("audit", "export", "--file", str(trail), "--checkpoints", str(kept),
                                     "--public-key", str(key)))
    assert "checkpoints written" in exported.stderr and key.read_text() == key_info["public_key_pem"]
    assert len(kept.read_text().splitlines()) == len(listed)
    report = json.loads(ok(await terminal.arm("audit", "verify", "--file", str(trail), "--checkpoints", str(kept),
                                              "--public-key", str(key), "-o", "json")).stdout)
    assert report["ok"] is True and report["checkpoints_checked"] == len(listed) >= 1
    online = json.loads(ok(await terminal.arm("audit", "verify", "-o", "json")).stdout)
    assert online["ok"] is True and online["checkpoints_checked"] >= 1

    # Another key: every checkpoint is refused, exit 1.
    other = tmp_path / "other.pem"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    wrong_key = await terminal.arm("audit", "verify", "--file", str(trail), "--checkpoints", str(kept),
                                   "--public-key", str(other))
    assert wrong_key.exit_code == 1 and "CHECKPOINT_INVALID" in wrong_key.stdout
    # A forged checkpoint (its head changed): refused.
    forged = tmp_path / "forged.jsonl"
    lines = kept.read_text().splitlines()
    first = json.loads(lines[0])
    first["headHash"] = "0" * 64
    forged.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    bad = await terminal.arm("audit", "verify", "--file", str(trail), "--checkpoints", str(forged),
                             "--public-key", str(key))
    assert bad.exit_code == 1 and "CHECKPOINT_INVALID" in bad.stdout
    usage = await terminal.arm("audit", "verify", "--file", str(trail), "--checkpoints", str(kept))
    assert usage.exit_code == 2

    # A history rewritten with every hash recomputed: the plain chain check passes, the kept
    # checkpoints do not.
    victim = int(made["checkpoint"]["sequence"]) - 3
    await rewrite_history(governance, tenant.tenant.id, edit(victim))
    rewritten = tmp_path / "rewritten.jsonl"
    ok(await terminal.arm("audit", "export", "--file", str(rewritten)))
    plain = json.loads(ok(await terminal.arm("audit", "verify", "--file", str(rewritten), "-o", "json")).stdout)
    assert plain["ok"] is True
    caught = await terminal.arm("audit", "verify", "--file", str(rewritten), "--checkpoints", str(kept),
                                "--public-key", str(key), "-o", "json")
    assert caught.exit_code == 1, caught.output
    assert json.loads(caught.stdout)["reason"] == "CHECKPOINT_MISMATCH"


async def test_checkpoints_need_the_permission(terminal: Terminal, tenant: TenantContext,
                                               governance: GovernanceServer) -> None:
    _, key = await operator_key(tenant.admin, "agent")
    await logged_in(terminal, tenant, governance, key)
    refused = await terminal.arm("audit", "checkpoints", "create")
    assert refused.exit_code == 1, refused.output
    assert "code:       PERMISSION_DENIED" in refused.stderr and "request id: req-" in refused.stderr
