"""Checkpoints of the audit trail: governance signs each tenant's chain head with an Ed25519 key
kept outside the database, at intervals and on demand, after checking that the records since
its previous checkpoint link up to the head (nothing is signed over a broken chain). VerifyChain
compares the history with the stored checkpoints and those an auditor kept (see
arm_common.checkpoints for the format)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from datetime import UTC
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from arm.governance.v1 import audit_pb2
from arm_common.chain import CHECKPOINT_INVALID, ChainReport, ChainVerifier
from arm_common.checkpoints import SigningKey, anchor, signature_problem
from arm_common.config import ConfigError, ServiceConfig
from arm_common.errors import FailedPrecondition
from arm_common.merkle import RangeFolder, TreeBuilder, leaf_of
from arm_common.messages import ts
from arm_common.tables import utcnow
from arm_common.tasks import cancel_and_wait
from arm_governance import models
from arm_governance.audit.trail import AuditTrail, Filter

log = logging.getLogger(__name__)
C = models.AuditCheckpoint
M = models.ChangeRecord
KEY_FILE_NAME = "audit-signing-key.pem"
_BATCH = 1000
_LEAF_BATCH = 10_000


def load_signing_key(config: ServiceConfig) -> SigningKey:
    """The key from ARM_AUDIT_SIGNING_KEY_FILE, or (unset) one kept under the data dir, generated
    on first start. The key itself is never logged, only its id."""
    if config.audit_signing_key_file:
        path = Path(config.audit_signing_key_file)
        try:
            key = SigningKey.load(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"ARM_AUDIT_SIGNING_KEY_FILE: cannot read an Ed25519 private key from "
                              f"{path}: {exc}") from None
        log.info("audit checkpoints signed with key %s from %s", key.key_id, path)
        return key
    path = Path(config.data_dir) / KEY_FILE_NAME
    key, created = SigningKey.load_or_create(path)
    if created:
        log.warning("generated audit signing key %s at %s; outside development set "
                    "ARM_AUDIT_SIGNING_KEY_FILE to a key the database's administrators cannot read",
                    key.key_id, path)
    return key


def to_proto(row: models.AuditCheckpoint) -> audit_pb2.AuditCheckpoint:
    return audit_pb2.AuditCheckpoint(tenant_id=row.tenant_id, sequence=row.sequence, head_hash=row.head_hash,
                                     sign_time=ts(row.sign_time), key_id=row.key_id, signature=row.signature,
                                     tree_root=row.tree_root)


class Checkpoints:
    """Signs, stores, lists and checks one database's checkpoints."""

    def __init__(self, trail: AuditTrail, key: SigningKey, interval_s: float) -> None:
        self.trail = trail
        self.db = trail.db
        self.key = key
        self.keys = {key.key_id: key.public}
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    # --- signing ---------------------------------------------------------------------------

    async def _latest(self, tenant: str) -> tuple[audit_pb2.AuditCheckpoint, str] | None:
        """The latest checkpoint signed with the current key, and its tree state."""
        async def read(s: AsyncSession) -> tuple[audit_pb2.AuditCheckpoint, str] | None:
            row = (await s.execute(select(C).where(C.tenant_id == tenant, C.key_id == self.key.key_id)
                                   .order_by(C.sequence.desc()).limit(1))).scalar_one_or_none()
            return None if row is None else (to_proto(row), row.tree_state)
        return await self.db.read(read)

    async def _head(self, tenant: str) -> tuple[int, str]:
        async def read(s: AsyncSession) -> tuple[int, str]:
            row = (await s.execute(select(models.ChainHead.last_sequence, models.ChainHead.last_hash)
                                   .where(models.ChainHead.tenant_id == tenant))).one_or_none()
            return (0, "") if row is None else (int(row[0]), str(row[1]))
        return await self.db.read(read)

    async def _check_since(self, tenant: str, since: audit_pb2.AuditCheckpoint | None, tree: TreeBuilder,
                           upto: int, head_hash: str) -> ChainVerifier:
        """Verifies the records after `since` (or from the first) up to the head, linking from
        the checkpointed hash and ending at the head's hash, and grows the Merkle tree."""
        after = 0 if since is None else since.sequence
        verifier = ChainVerifier(start=None if since is None else (since.sequence, since.head_hash), tree=tree)
        while True:
            batch = await self.trail.page(tenant, Filter(), after=after, size=_BATCH, newest_first=False, upto=upto)
            if not batch:
                break
            for record in batch:
                verifier.add(record)
            after = batch[-1].sequence
        report = verifier.finish(upto)
        if report.ok and report.last_hash != head_hash:
            verifier.mark_broken(upto, "HASH_MISMATCH", "the head row's hash is not the last record's hash")
        return verifier

    async def create(self, tenant: str) -> tuple[audit_pb2.AuditCheckpoint, bool]:
        """Signs the tenant's current head (see CreateCheckpoint); returns it and whether it is new."""
        sequence, head_hash = await self._head(tenant)
        if sequence == 0:
            raise FailedPrecondition("the tenant's audit trail is empty: there is no head to sign",
                                     reason="EMPTY_TRAIL")
        found = await self._latest(tenant)
        latest, tree = None, TreeBuilder()
        if found is not None:
            latest = found[0]
            if signature_problem(latest, self.keys) is not None:
                raise FailedPrecondition("the latest stored checkpoint's signature does not verify",
                                         reason="CHAIN_BROKEN")
            try:
                tree = TreeBuilder.resume(json.loads(found[1]))
            except (ValueError, TypeError):
                tree = TreeBuilder()
            if tree.size != latest.sequence or tree.root().hex() != latest.tree_root:
                raise FailedPrecondition("the latest checkpoint's stored tree state does not match its "
                                         "signed tree root", reason="CHAIN_BROKEN")
        if latest is not None and latest.sequence == sequence:
            if latest.head_hash != head_hash:
                raise FailedPrecondition(f"the head at sequence {sequence} disagrees with its checkpoint",
                                         reason="CHAIN_BROKEN")
            return latest, False
        if latest is not None and latest.sequence > sequence:
            raise FailedPrecondition(f"the head is at sequence {sequence}, before the checkpoint at "
                                     f"{latest.sequence}", reason="CHAIN_BROKEN")
        verifier = await self._check_since(tenant, latest, tree, sequence, head_hash)
        report = verifier.report
        if not report.ok:
            log.error("audit chain of tenant %s broken at sequence %d (%s); not signing its head",
                      tenant, report.first_broken_sequence, report.reason)
            raise FailedPrecondition(f"the trail does not verify at sequence {report.first_broken_sequence}: "
                                     f"{report.message}", reason="CHAIN_BROKEN")
        cp = audit_pb2.AuditCheckpoint(tenant_id=tenant, sequence=sequence, head_hash=head_hash,
                                       tree_root=verifier.tree.root().hex())
        tree_state = json.dumps(verifier.tree.state())
        cp.sign_time.FromDatetime(utcnow())
        self.key.sign(cp)

        async def write(s: AsyncSession) -> audit_pb2.AuditCheckpoint:
            insert = postgresql.insert if self.db.is_postgres else sqlite.insert
            values = dict(tenant_id=tenant, sequence=sequence, key_id=cp.key_id, head_hash=head_hash,
                          sign_time=cp.sign_time.ToDatetime(tzinfo=UTC), signature=cp.signature,
                          tree_root=cp.tree_root, tree_state=tree_state)
            await s.execute(insert(C).values(**values).on_conflict_do_nothing(
                index_elements=["tenant_id", "sequence", "key_id"]))
            # Another replica may have signed the same head a moment earlier: return the stored one.
            row = (await s.execute(select(C).where(C.tenant_id == tenant, C.sequence == sequence,
                                                   C.key_id == cp.key_id))).scalar_one()
            return to_proto(row)
        stored = await self.db.run(write)
        return stored, stored.signature == cp.signature

    async def sign_moved_heads(self) -> int:
        """Checkpoints every tenant whose head moved since its last checkpoint; returns how many."""
        async def read(s: AsyncSession) -> list[str]:
            latest = (select(C.tenant_id, func.max(C.sequence).label("seq"))
                      .where(C.key_id == self.key.key_id).group_by(C.tenant_id).subquery())
            q = (select(models.ChainHead.tenant_id)
                 .outerjoin(latest, latest.c.tenant_id == models.ChainHead.tenant_id)
                 .where(models.ChainHead.last_sequence > func.coalesce(latest.c.seq, 0)))
            return [str(t) for t in (await s.execute(q)).scalars()]
        signed = 0
        for tenant in await self.db.read(read):
            try:
                _, created = await self.create(tenant)
                signed += created
            except FailedPrecondition:
                pass  # logged by create(); the next round tries again
        return signed

    async def start(self) -> None:
        if self.interval_s > 0:
            self._task = asyncio.create_task(self._loop(), name="audit-checkpoints")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sign_moved_heads()
            except Exception:
                log.exception("signing audit checkpoints failed; retrying next round")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    # --- Merkle proofs --------------------------------------------------------------------------

    async def prove(self, tenant: str, ranges: Sequence[tuple[int, int]], size: int) -> list[str]:
        """The roots of the leaf ranges of a proof over the tenant's first `size` records, in one
        streaming pass. FAILED_PRECONDITION CHAIN_BROKEN when the stored records are not a
        well-formed trail (a gap, a malformed hash)."""
        folder = RangeFolder(ranges)
        after = 0
        while after < size:
            async def read(s: AsyncSession, after: int = after) -> list[tuple[int, str]]:
                q = (select(M.sequence, M.hash).where(M.tenant_id == tenant, M.sequence > after, M.sequence <= size)
                     .order_by(M.sequence).limit(_LEAF_BATCH))
                return [(int(a), str(b)) for a, b in (await s.execute(q)).all()]
            batch = await self.db.read(read)
            for sequence, hash_ in batch:
                if sequence != after + 1:
                    raise FailedPrecondition(f"the trail has no record {after + 1}", reason="CHAIN_BROKEN")
                try:
                    folder.add(leaf_of(hash_))
                except ValueError:
                    raise FailedPrecondition(f"record {sequence}'s hash is malformed", reason="CHAIN_BROKEN") from None
                after = sequence
            if not batch:
                raise FailedPrecondition(f"the trail has no record {after + 1}", reason="CHAIN_BROKEN")
        return [h.hex() for h in folder.roots()]

    # --- reading and checking ----------------------------------------------------------------

    async def page(self, tenant: str, *, after: tuple[int, str] | None, size: int) -> list[audit_pb2.AuditCheckpoint]:
        async def read(s: AsyncSession) -> list[audit_pb2.AuditCheckpoint]:
            q = select(C).where(C.tenant_id == tenant)
            if after is not None:
                q = q.where((C.sequence > after[0]) | ((C.sequence == after[0]) & (C.key_id > after[1])))
            rows = (await s.execute(q.order_by(C.sequence, C.key_id).limit(size))).scalars()
            return [to_proto(r) for r in rows]
        return await self.db.read(read)

    async def stored(self, tenant: str) -> list[audit_pb2.AuditCheckpoint]:
        out: list[audit_pb2.AuditCheckpoint] = []
        after: tuple[int, str] | None = None
        while batch := await self.page(tenant, after=after, size=_BATCH):
            out += batch
            after = (batch[-1].sequence, batch[-1].key_id)
        return out

    async def verify(self, tenant: str, kept: Sequence[audit_pb2.AuditCheckpoint]) -> ChainReport:
        """Walks the tenant's chain comparing it with the checkpoints kept by the caller (their
        signatures already checked) and the stored ones. A stored checkpoint whose signature
        does not verify is reported as CHECKPOINT_INVALID; one by another (older) key is skipped.
        Checkpoints are read before the head, so none is beyond it unless records were removed."""
        anchors = [anchor(cp) for cp in kept]
        forged: audit_pb2.AuditCheckpoint | None = None
        for cp in await self.stored(tenant):
            if cp.key_id not in self.keys:
                continue
            if signature_problem(cp, self.keys) is None:
                anchors.append(anchor(cp))
            elif forged is None:
                forged = cp
        report = await self.trail.verify(tenant, anchors)
        if forged is not None and report.ok:
            report.ok = False
            report.first_broken_sequence = forged.sequence
            report.reason = CHECKPOINT_INVALID
            report.message = (f"the stored checkpoint at sequence {forged.sequence} has a signature that "
                              f"does not verify with key {forged.key_id}: it was forged")
        return report

