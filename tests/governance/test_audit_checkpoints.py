"""Signed checkpoints anchor the audit trail outside the database: someone with full database
access (here the test's own superuser connection, triggers switched off) who edits or deletes a
record and recomputes every following hash and the head row gets a trail that verifies on its
own, but not against a checkpoint — neither in VerifyChain nor in the offline verifier. Forged
checkpoints and checkpoints by another key are refused; heads are signed at intervals too."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select, text

from arm.common.v1 import common_pb2
from arm.governance.v1 import audit_pb2
from arm_client import ArmClient
from arm_common import checkpoints, merkle, pagination
from arm_common.chain import parse_export_lines, record_hash, verify_records
from arm_common.checkpoints import SigningKey, checkpoint_line, load_public_key, signed_bytes
from arm_common.config import ServiceConfig
from arm_common.errors import FailedPrecondition
from arm_common.verify_audit import verify_export
from arm_governance import models
from arm_governance.audit import checkpoints as checkpointing
from arm_governance.audit import trail as audit
from tests.conftest import (
    GovernanceServer,
    TenantContext,
    make_tenant,
    new_database_spec,
    start_governance,
    stop_governance,
)
from tests.governance.test_audit import all_records, task_record, wait_for_record
from tests.helpers import expect_failure, operator_with_roles

CR = common_pb2
MISMATCH, INVALID = audit_pb2.CHAIN_BREAK_CHECKPOINT_MISMATCH, audit_pb2.CHAIN_BREAK_CHECKPOINT_INVALID
Rewrite = Callable[[list[common_pb2.ChangeRecord]], list[common_pb2.ChangeRecord]]


async def superuser(governance: GovernanceServer, fn):  # type: ignore[no-untyped-def]
    """Runs fn(session) in one transaction as the database's superuser with the append-only
    triggers switched off (session_replication_role = replica), as an attacker with database
    access could."""
    async def run(s):  # type: ignore[no-untyped-def]
        if governance.db.is_postgres:
            await s.execute(text("SET LOCAL session_replication_role = replica"))
        return await fn(s)
    return await governance.db.run(run)


async def rewrite_history(governance: GovernanceServer, tenant: str, rewrite: Rewrite) -> None:
    """Replaces the tenant's trail by `rewrite(records)` and re-chains it perfectly: every hash
    after the change recomputed, the head row set to the new last record. The head row is
    locked first, so no append interleaves."""
    async def tamper(s):  # type: ignore[no-untyped-def]
        await s.execute(select(models.ChainHead).where(models.ChainHead.tenant_id == tenant).with_for_update())
        rows = (await s.execute(select(models.ChangeRecord).where(models.ChangeRecord.tenant_id == tenant)
                                .order_by(models.ChangeRecord.sequence))).scalars().all()
        new = rewrite([audit.to_proto(r) for r in rows])
        s.expunge_all()
        prev = ""
        for i, rec in enumerate(new):
            rec.sequence, rec.prev_hash = i + 1, prev
            rec.hash = prev = record_hash(rec)
        await s.execute(text("DELETE FROM change_records WHERE tenant_id = :t"), {"t": tenant})
        await s.flush()
        for rec in new:
            row = audit._row(rec, tenant)
            row.sequence, row.prev_hash, row.hash = rec.sequence, rec.prev_hash, rec.hash
            row.record_time = rec.record_time.ToDatetime(tzinfo=UTC)
            s.add(row)
        await s.flush()
        await s.execute(text("UPDATE change_record_heads SET last_sequence = :n, last_hash = :h WHERE tenant_id = :t"),
                        {"n": len(new), "h": prev, "t": tenant})
    await superuser(governance, tamper)


def edit(victim: int) -> Rewrite:
    def run(records: list[common_pb2.ChangeRecord]) -> list[common_pb2.ChangeRecord]:
        records[victim - 1].summary = "nothing happened"
        return records
    return run


def delete(victim: int) -> Rewrite:
    return lambda records: records[:victim - 1] + records[victim:]


def truncate(keep: int) -> Rewrite:
    return lambda records: records[:keep]


async def export(client: ArmClient) -> list[bytes]:
    return [line async for chunk in client.audit.ExportChangeRecords(audit_pb2.ExportChangeRecordsRequest())
            for line in chunk.data.splitlines(keepends=True)]


async def kept_checkpoints(client: ArmClient) -> list[audit_pb2.AuditCheckpoint]:
    out: list[audit_pb2.AuditCheckpoint] = []
    token = ""
    while True:
        page = await client.audit.ListCheckpoints(audit_pb2.ListCheckpointsRequest(page_size=2, page_token=token))
        out += page.checkpoints
        if not (token := page.next_page_token):
            return out


async def verify_cli(*args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    """Runs the offline verifier in its own process, as an auditor would."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "arm_common.verify_audit", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, json.loads(out) if out else {"stderr": err.decode()}


async def fetch_cli(address: str, api_key: str, out: Path) -> tuple[int, dict]:  # type: ignore[type-arg]
    """Runs the auditor's fetch-and-verify tool in its own process (key from the environment)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "arm_common.audit_fetch", "--address", address, "--out", str(out),
        env={**os.environ, "ARM_API_KEY": api_key}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, json.loads(stdout) if stdout else {"stderr": err.decode()}


async def offline_cli(tmp: Path, lines: list[bytes], cps: list[audit_pb2.AuditCheckpoint],
                      pem: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    """Writes the export, the kept checkpoints and the public key to files and verifies them."""
    (tmp / "trail.jsonl").write_bytes(b"".join(lines))
    (tmp / "checkpoints.jsonl").write_text("".join(checkpoint_line(cp) for cp in cps))
    (tmp / "key.pem").write_text(pem)
    return await verify_cli("--records", str(tmp / "trail.jsonl"), "--checkpoints", str(tmp / "checkpoints.jsonl"),
                            "--public-key", str(tmp / "key.pem"))


@pytest.mark.parametrize("how", ["edit", "delete", "truncate"])
async def test_a_rehashed_rewrite_passes_the_chain_but_not_a_checkpoint(
        governance: GovernanceServer, registry, system_admin, tmp_path: Path, how: str) -> None:  # type: ignore[no-untyped-def]
    ctx = await make_tenant(registry, system_admin)
    tid = ctx.tenant.id
    async with governance.client(ctx.admin_key) as client:
        await wait_for_record(client, CR.CHANGE_RECORD_TYPE_TENANT_CREATED, tid)
        await client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(
            records=[task_record(i) for i in range(12)]))
        first = (await client.audit.CreateCheckpoint(audit_pb2.CreateCheckpointRequest()))
        assert first.created and first.checkpoint.tenant_id == tid
        again = await client.audit.CreateCheckpoint(audit_pb2.CreateCheckpointRequest())
        assert not again.created and again.checkpoint == first.checkpoint, "an unmoved head is not re-signed"
        await client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(
            records=[task_record(100 + i) for i in range(3)]))
        second = (await client.audit.CreateCheckpoint(audit_pb2.CreateCheckpointRequest())).checkpoint
        assert second.sequence >= first.checkpoint.sequence + 3

        # The checkpoint signs the head governance shows, with the published key.
        key = await client.audit.GetAuditSigningKey(audit_pb2.GetAuditSigningKeyRequest())
        assert key.algorithm == "Ed25519" and key.key_id == second.key_id and len(key.public_key) == 32
        Ed25519PublicKey.from_public_bytes(key.public_key).verify(second.signature, signed_bytes(second))
        records = await all_records(client)
        cp = first.checkpoint
        assert records[cp.sequence - 1].hash == cp.head_hash

        # What an auditor keeps outside the database.
        kept = await kept_checkpoints(client)
        assert [c.sequence for c in kept] == [cp.sequence, second.sequence]
        intact = await client.audit.VerifyChain(audit_pb2.VerifyChainRequest(checkpoints=kept))
        assert intact.ok and intact.checkpoints_checked == 4, intact.message  # kept + stored
        assert intact.last_checkpoint_sequence == second.sequence
        code, report = await offline_cli(tmp_path, await export(client), kept, key.public_key_pem)
        assert code == 0 and report["ok"] and report["checkpoints_checked"] == 2, report
        auditor = tmp_path / "auditor"  # the auditor's own tool, run regularly from outside
        code, report = await fetch_cli(governance.address, ctx.admin_key, auditor)
        assert code == 0 and report["ok"] and report["checkpoints_added"] == 2, report

        victim = cp.sequence - 4  # before the first checkpoint
        rewrite = {"edit": edit(victim), "delete": delete(victim), "truncate": truncate(victim)}[how]
        await rewrite_history(governance, tid, rewrite)

        # Every link of the rewritten trail checks out: only the checkpoints tell.
        tampered = await export(client)
        assert verify_records(verify_line for verify_line in __import__("arm_common.chain", fromlist=["x"])
                              .parse_export_lines(tampered)).ok
        report_ = await client.audit.VerifyChain(audit_pb2.VerifyChainRequest())
        assert not report_.ok and report_.reason == MISMATCH, report_
        assert report_.first_broken_sequence == cp.sequence, "the first checkpoint the history disagrees with"
        # Nor is a head that disagrees with the last checkpoint signed.
        await expect_failure(client.audit.CreateCheckpoint(audit_pb2.CreateCheckpointRequest()),
                             grpc.StatusCode.FAILED_PRECONDITION, "CHAIN_BROKEN")

        # The attacker deletes the stored checkpoints too: the trail now verifies on its own…
        await superuser(governance, lambda s: s.execute(text("DELETE FROM audit_checkpoints WHERE tenant_id = :t"),
                                                        {"t": tid}))
        alone = await client.audit.VerifyChain(audit_pb2.VerifyChainRequest())
        assert alone.ok and alone.checkpoints_checked == 0, "without an anchor the rewrite is invisible"
        # …but not against the checkpoints the auditor kept, online or offline.
        anchored = await client.audit.VerifyChain(audit_pb2.VerifyChainRequest(checkpoints=kept))
        assert not anchored.ok and (anchored.first_broken_sequence, anchored.reason) == (cp.sequence, MISMATCH)
        offline = verify_export(
            parse_export_lines(tampered),
            [checkpoint_line(c) for c in kept], [load_public_key(key.public_key_pem.encode())])
        assert not offline.ok and (offline.first_broken_sequence, offline.reason) == (cp.sequence, "CHECKPOINT_MISMATCH")
        code, report = await offline_cli(tmp_path, tampered, kept, key.public_key_pem)
        assert code == 1 and report["reason"] == "CHECKPOINT_MISMATCH", report
        # The auditor's next run keeps its checkpoints (the server has none left) and finds it.
        code, report = await fetch_cli(governance.address, ctx.admin_key, auditor)
        assert code == 1 and report["checkpoints_added"] == 0, report
        assert (report["reason"], report["first_broken_sequence"]) == ("CHECKPOINT_MISMATCH", cp.sequence), report
        assert len((auditor / "checkpoints.jsonl").read_text().splitlines()) == 2
    await ctx.admin.close()


async def test_forged_and_foreign_checkpoints_are_refused(governance: GovernanceServer, registry, system_admin,
                                                          tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a = await make_tenant(registry, system_admin)
    b = await make_tenant(registry, system_admin)
    async with governance.client(a.admin_key) as client, governance.client(b.admin_key) as other:
        await client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(
            records=[task_record(i) for i in range(5)]))
        await other.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(records=[task_record(1)]))
        good = (await client.audit.CreateCheckpoint(audit_pb2.CreateCheckpointRequest())).checkpoint
        foreign = (await other.audit.CreateCheckpoint(audit_pb2.CreateCheckpointRequest())).checkpoint
        key = await client.audit.GetAuditSigningKey(audit_pb2.GetAuditSigningKeyRequest())

        edited = audit_pb2.AuditCheckpoint()
        edited.CopyFrom(good)
        edited.head_hash = "0" * 64  # a different head under the real signature
        impostor = SigningKey.generate()
        by_other_key = audit_pb2.AuditCheckpoint()
        by_other_key.CopyFrom(good)
        impostor.sign(by_other_key)
        posing = audit_pb2.AuditCheckpoint()
        posing.CopyFrom(by_other_key)
        posing.key_id = good.key_id  # another key's signature under the real key's id
        for cp, field in ((edited, "checkpoints[1].signature"), (by_other_key, "checkpoints[1].key_id"),
                          (posing, "checkpoints[1].signature"), (foreign, "checkpoints[1].tenant_id")):
            bad = await expect_failure(client.audit.VerifyChain(audit_pb2.VerifyChainRequest(checkpoints=[good, cp])),
                                       grpc.StatusCode.INVALID_ARGUMENT)
            assert field in bad.violations, bad.violations
        assert (await client.audit.VerifyChain(audit_pb2.VerifyChainRequest(checkpoints=[good]))).ok

        # Offline: a checkpoint that does not verify with the given key fails the verification.
        lines = await export(client)
        right = load_public_key(key.public_key_pem.encode())
        for cps, keys in (([edited], [right]), ([good], [impostor.public]), ([posing], [right]),
                          ([foreign], [right])):
            report = verify_export(parse_export_lines(lines),
                                   [checkpoint_line(c) for c in cps], keys)
            assert not report.ok and report.reason == "CHECKPOINT_INVALID", report
        code, out = await offline_cli(tmp_path, lines, [good], key.public_key_pem)
        assert code == 0 and out["ok"], out
        (tmp_path / "wrong.pem").write_bytes(impostor.public.public_bytes_raw())
        code, out = await verify_cli("--records", str(tmp_path / "trail.jsonl"), "--checkpoints",
                                     str(tmp_path / "checkpoints.jsonl"), "--public-key", str(tmp_path / "wrong.pem"))
        assert code == 1 and out["reason"] == "CHECKPOINT_INVALID", out

        # A forged checkpoint slipped into the database is reported, not trusted.
        async def insert(s):  # type: ignore[no-untyped-def]
            await s.execute(text("INSERT INTO audit_checkpoints (tenant_id, sequence, key_id, head_hash, sign_time, "
                                 "signature, tree_root, tree_state) VALUES (:t, 2, :k, :h, :w, :sig, :h, '[]')"),
                            {"t": a.tenant.id, "k": good.key_id, "h": "f" * 64, "w": good.sign_time.ToDatetime(),
                             "sig": b"\x00" * 64})
        await superuser(governance, insert)
        report_ = await client.audit.VerifyChain(audit_pb2.VerifyChainRequest())
        assert not report_.ok and (report_.reason, report_.first_broken_sequence) == (INVALID, 2), report_
    await a.admin.close()
    await b.admin.close()


async def test_checkpoint_rbac_and_bad_input(governance: GovernanceServer, tenant: TenantContext) -> None:
    async with governance.client(tenant.admin_key) as client:
        await expect_failure(client.audit.ListCheckpoints(audit_pb2.ListCheckpointsRequest(page_size=-1)),
                             grpc.StatusCode.INVALID_ARGUMENT)
        await expect_failure(client.audit.ListCheckpoints(audit_pb2.ListCheckpointsRequest(page_token="%%")),
                             grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
        bad = await expect_failure(client.audit.VerifyChain(audit_pb2.VerifyChainRequest(
            checkpoints=[audit_pb2.AuditCheckpoint()] * 10_001)), grpc.StatusCode.INVALID_ARGUMENT)
        assert "checkpoints" in bad.violations
        # Well-typed but impossible values are the caller's mistake, never INTERNAL.
        for token in (pagination.encode_token([2**70, "k"], {}), pagination.encode_token([1, "a\x00"], {})):
            await expect_failure(client.audit.ListCheckpoints(audit_pb2.ListCheckpointsRequest(page_token=token)),
                                 grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
        key = await client.audit.GetAuditSigningKey(audit_pb2.GetAuditSigningKeyRequest())
        far = audit_pb2.AuditCheckpoint(tenant_id=tenant.tenant.id, sequence=1, head_hash="a" * 64,
                                        key_id=key.key_id, signature=b"\x01" * 64)
        far.sign_time.seconds = 2**62
        bad = await expect_failure(client.audit.VerifyChain(audit_pb2.VerifyChainRequest(checkpoints=[far])),
                                   grpc.StatusCode.INVALID_ARGUMENT)
        assert "checkpoints[0].sign_time" in bad.violations  # the edge check names the field
    # A tenant without records has no head to sign (every real tenant has its TENANT_CREATED).
    with pytest.raises(FailedPrecondition, match="empty"):
        await governance.component.checkpoints.create("tnt_without_records")
    _, auditor = await operator_with_roles(tenant.admin, governance.address, "auditor")
    _, runtime = await operator_with_roles(tenant.admin, governance.address, "agent")
    async with auditor, runtime:
        await auditor.audit.GetAuditSigningKey(audit_pb2.GetAuditSigningKeyRequest())
        await auditor.audit.ListCheckpoints(audit_pb2.ListCheckpointsRequest())
        await expect_failure(auditor.audit.CreateCheckpoint(audit_pb2.CreateCheckpointRequest()),
                             grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION")
        for call in (runtime.audit.ListCheckpoints(audit_pb2.ListCheckpointsRequest()),
                     runtime.audit.GetAuditSigningKey(audit_pb2.GetAuditSigningKeyRequest())):
            await expect_failure(call, grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION")


async def test_heads_are_signed_at_intervals_with_the_configured_key(
        registry, system_admin, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    key_file = tmp_path / "audit-key.pem"
    key, created = SigningKey.load_or_create(key_file)
    assert created and key_file.stat().st_mode & 0o077 == 0, "the key file is its owner's only"
    spec = new_database_spec(registry.backend, tmp_path, "governance")
    server = await start_governance(spec, registry, {"ARM_AUDIT_SIGNING_KEY_FILE": str(key_file),
                                                     "ARM_AUDIT_CHECKPOINT_INTERVAL_S": "0.05"})
    try:
        ctx = await make_tenant(registry, system_admin)
        async with server.client(ctx.admin_key) as client:
            published = await client.audit.GetAuditSigningKey(audit_pb2.GetAuditSigningKeyRequest())
            assert published.key_id == key.key_id
            resp = await client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(
                records=[task_record(i) for i in range(3)]))
            head = resp.results[-1]
            deadline = time.monotonic() + 20
            while not [c for c in await kept_checkpoints(client) if c.sequence == head.sequence]:
                assert time.monotonic() < deadline, "the head was never signed"
                await asyncio.sleep(0.05)
            cp = [c for c in await kept_checkpoints(client) if c.sequence == head.sequence][0]
            assert cp.head_hash == head.hash and cp.key_id == key.key_id
            key.public.verify(cp.signature, signed_bytes(cp))
        await ctx.admin.close()
    finally:
        await stop_governance(server)

    # Unset, a key is generated under the data dir once and reused; never logged.
    caplog.set_level(logging.INFO)
    config = ServiceConfig.from_env("governance", {"ARM_DATA_DIR": str(tmp_path / "data")})
    generated = checkpointing.load_signing_key(config)
    assert checkpointing.load_signing_key(config).key_id == generated.key_id
    pem = (tmp_path / "data" / checkpointing.KEY_FILE_NAME).read_text()
    assert "PRIVATE KEY" in pem and generated.key_id in caplog.text
    assert "PRIVATE KEY" not in caplog.text and pem.splitlines()[1] not in caplog.text


def test_a_bad_signing_key_file_stops_governance_naming_the_variable(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from arm_common.config import ConfigError
    not_ed25519 = tmp_path / "ec.pem"
    not_ed25519.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    for path in (tmp_path / "missing.pem", not_ed25519, garbage):
        config = ServiceConfig.from_env("governance", {"ARM_AUDIT_SIGNING_KEY_FILE": str(path)})
        with pytest.raises(ConfigError, match="ARM_AUDIT_SIGNING_KEY_FILE"):
            checkpointing.load_signing_key(config)


async def test_merkle_proofs_prove_one_record_and_append_only_growth_without_an_export(
        governance: GovernanceServer, registry, system_admin) -> None:  # type: ignore[no-untyped-def]
    ctx = await make_tenant(registry, system_admin)
    tid = ctx.tenant.id
    async with governance.client(ctx.admin_key) as client:
        await wait_for_record(client, CR.CHANGE_RECORD_TYPE_TENANT_CREATED, tid)
        await client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(
            records=[task_record(i) for i in range(20)]))
        cp1 = (await client.audit.CreateCheckpoint(audit_pb2.CreateCheckpointRequest())).checkpoint
        await client.audit.AppendChangeRecords(audit_pb2.AppendChangeRecordsRequest(
            records=[task_record(100 + i) for i in range(13)]))
        cp2 = (await client.audit.CreateCheckpoint(audit_pb2.CreateCheckpointRequest())).checkpoint
        records = await all_records(client)
        # The signed roots are the RFC 9162 tree over the record hashes (the second one grown
        # incrementally from the first's stored state).
        for cp in (cp1, cp2):
            assert cp.tree_root == merkle.root_of(merkle.leaf_of(r.hash) for r in records[:cp.sequence]).hex()

        async def inclusion(record_id: str, size: int) -> audit_pb2.GetInclusionProofResponse:
            return await client.audit.GetInclusionProof(audit_pb2.GetInclusionProofRequest(
                record_id=record_id, tree_size=size))

        for r in (records[0], records[7], records[cp1.sequence - 1]):
            assert checkpoints.verify_inclusion_proof(await inclusion(r.record_id, cp1.sequence), cp1) is None
            assert checkpoints.verify_inclusion_proof(await inclusion(r.record_id, cp2.sequence), cp2) is None
        later = records[cp2.sequence - 1]
        assert checkpoints.verify_inclusion_proof(await inclusion(later.record_id, cp2.sequence), cp2) is None
        assert "another tree size" in str(checkpoints.verify_inclusion_proof(
            await inclusion(records[3].record_id, cp1.sequence), cp2))
        growth = await client.audit.GetConsistencyProof(audit_pb2.GetConsistencyProofRequest(
            first_size=cp1.sequence, second_size=cp2.sequence))
        assert checkpoints.verify_consistency_proof(growth, cp1, cp2)
        assert not checkpoints.verify_consistency_proof(growth, cp2, cp1)

        # Bad sizes are the caller's mistake, an unknown record is NOT_FOUND.
        for req, field in ((audit_pb2.GetInclusionProofRequest(record_id=later.record_id, tree_size=0), "tree_size"),
                           (audit_pb2.GetInclusionProofRequest(record_id=later.record_id, tree_size=10**12),
                            "tree_size"),
                           (audit_pb2.GetInclusionProofRequest(record_id=later.record_id, tree_size=cp1.sequence),
                            "tree_size"),
                           (audit_pb2.GetInclusionProofRequest(record_id="", tree_size=1), "record_id")):
            bad = await expect_failure(client.audit.GetInclusionProof(req), grpc.StatusCode.INVALID_ARGUMENT)
            assert field in bad.violations, (req, bad.violations)
        await expect_failure(client.audit.GetInclusionProof(audit_pb2.GetInclusionProofRequest(
            record_id="no-such-record", tree_size=1)), grpc.StatusCode.NOT_FOUND)
        for req, field in ((audit_pb2.GetConsistencyProofRequest(first_size=0, second_size=3), "first_size"),
                           (audit_pb2.GetConsistencyProofRequest(first_size=5, second_size=3), "second_size"),
                           (audit_pb2.GetConsistencyProofRequest(first_size=1, second_size=10**12), "second_size")):
            bad = await expect_failure(client.audit.GetConsistencyProof(req), grpc.StatusCode.INVALID_ARGUMENT)
            assert field in bad.violations, (req, bad.violations)

        # A superuser rewrites record 3 and re-chains everything, and deletes the stored
        # checkpoints so governance signs the new history: no proof reaches the kept roots.
        await rewrite_history(governance, tid, edit(3))
        await superuser(governance, lambda s: s.execute(text("DELETE FROM audit_checkpoints WHERE tenant_id = :t"),
                                                        {"t": tid}))
        for r in (records[2], records[10]):  # the edited record, and an untouched one after it
            assert checkpoints.verify_inclusion_proof(await inclusion(r.record_id, cp1.sequence), cp1) is not None
        forged = (await client.audit.CreateCheckpoint(audit_pb2.CreateCheckpointRequest())).checkpoint
        assert forged.sequence >= cp2.sequence and forged.tree_root != cp2.tree_root
        growth = await client.audit.GetConsistencyProof(audit_pb2.GetConsistencyProofRequest(
            first_size=cp1.sequence, second_size=forged.sequence))
        assert not checkpoints.verify_consistency_proof(growth, cp1, forged), "the new history does not extend cp1"
    await ctx.admin.close()


def test_offline_a_signed_tree_root_that_disagrees_with_the_records_is_a_mismatch() -> None:
    """A head hash alone is not all a checkpoint pins: its tree root must be the records' too."""
    from datetime import datetime

    records = []
    prev = ""
    for i in range(1, 8):
        rec = task_record(i, tenant_id="tnt_x", sequence=i, prev_hash=prev)
        rec.record_time.FromDatetime(datetime(2026, 1, 1, tzinfo=UTC))
        rec.hash = prev = record_hash(rec)
        records.append(rec)
    key = SigningKey.generate()

    def signed(size: int, tree_root: str) -> str:
        cp = audit_pb2.AuditCheckpoint(tenant_id="tnt_x", sequence=size, head_hash=records[size - 1].hash,
                                       tree_root=tree_root)
        cp.sign_time.FromDatetime(datetime(2026, 1, 2, tzinfo=UTC))
        key.sign(cp)
        return checkpoint_line(cp)

    honest = merkle.root_of(merkle.leaf_of(r.hash) for r in records[:5]).hex()
    assert verify_export(records, [signed(5, honest)], [key.public]).ok
    wrong = merkle.root_of(merkle.leaf_of(r.hash) for r in records[:4]).hex()
    report = verify_export(records, [signed(5, wrong)], [key.public])
    assert not report.ok and (report.reason, report.first_broken_sequence) == ("CHECKPOINT_MISMATCH", 5)
