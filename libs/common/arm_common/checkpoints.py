"""Signed checkpoints of the audit trail: what a checkpoint's signature covers, the Ed25519 keys
that make and check it, and the JSON-lines form auditors keep. Governance signs with it; the
offline verifier (`python -m arm_common.verify_audit`) checks with the very same code.

The hash chain alone cannot stop someone with write access to the database: they can edit a
record and recompute every following hash and the head. A checkpoint is a signature, made with a
key that is not in the database, over (tenant, sequence, head hash, time, key id); a history that
disagrees with a kept checkpoint cannot be re-signed without that key.

Signed bytes: `MESSAGE_PREFIX` followed by the canonical JSON (arm_common.canonical) of
{"head_hash", "key_id", "sequence", "sign_time", "tenant_id", "tree_root"}, sign_time in the chain's time form
(RFC 3339 UTC, microseconds, `Z`). A key id is the first 16 hex digits of the SHA-256 of the
32-byte raw public key.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from datetime import UTC
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf import json_format

from arm.governance.v1 import audit_pb2
from arm_common import merkle
from arm_common.canonical import canonical_json
from arm_common.chain import Anchor, chain_time, record_hash

MESSAGE_PREFIX = b"arm-audit-checkpoint/v1\n"
ALGORITHM = "Ed25519"


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """The id checkpoints name their key by."""
    return hashlib.sha256(raw_public_key(key)).hexdigest()[:16]


def public_key_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def signed_bytes(cp: audit_pb2.AuditCheckpoint) -> bytes:
    """The exact bytes a checkpoint's signature covers."""
    content = {"tenant_id": cp.tenant_id, "sequence": cp.sequence, "head_hash": cp.head_hash,
               "sign_time": chain_time(cp.sign_time.ToDatetime(tzinfo=UTC)) if cp.HasField("sign_time") else "",
               "key_id": cp.key_id, "tree_root": cp.tree_root}
    return MESSAGE_PREFIX + canonical_json(content).encode()


class SigningKey:
    """An Ed25519 private key (never logged, never repr'd) and its public half."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = private.public_key()
        self.key_id = key_id(self.public)

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r})"

    def sign(self, cp: audit_pb2.AuditCheckpoint) -> None:
        """Sets the checkpoint's key id and signature (its other fields must be set)."""
        cp.key_id = self.key_id
        cp.signature = self._private.sign(signed_bytes(cp))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """Reads a PEM (PKCS#8, as `openssl genpkey -algorithm ed25519` writes) private key."""
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path} is not an unencrypted PEM private key") from exc
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError(f"{path} holds a {type(private).__name__}, not an Ed25519 key")
        return cls(private)

    @classmethod
    def load_or_create(cls, path: Path) -> tuple[SigningKey, bool]:
        """Loads the key at `path`, or creates one there (mode 0600) when there is none; two
        processes racing to create it end up with the same key. Returns the key and whether
        this call created it."""
        if path.exists():
            return cls.load(path), False
        key = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = key._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            try:
                os.link(tmp, path)  # atomic, and fails when another process got there first
            except FileExistsError:
                return cls.load(path), False
        finally:
            tmp.unlink()
        return key, True


def load_public_key(data: bytes) -> Ed25519PublicKey:
    """A public key from PEM (SubjectPublicKeyInfo) or from its 32 raw bytes."""
    if len(data) == 32:
        return Ed25519PublicKey.from_public_bytes(data)
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"not an Ed25519 public key but a {type(key).__name__}")
    return key


def keyring(keys: Iterable[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    return {key_id(k): k for k in keys}


def signature_problem(cp: audit_pb2.AuditCheckpoint, keys: Mapping[str, Ed25519PublicKey]) -> str | None:
    """Why a checkpoint cannot be trusted (unknown key, bad signature, malformed), or None."""
    if cp.sequence < 1 or not cp.head_hash or not cp.tenant_id or not cp.HasField("sign_time") \
            or not cp.tree_root:
        return "the checkpoint is incomplete (tenant_id, sequence ≥ 1, head_hash, sign_time, tree_root)"
    key = keys.get(cp.key_id)
    if key is None:
        return f"the checkpoint names key {cp.key_id!r}, which is not a trusted key"
    try:
        message = signed_bytes(cp)
    except (ValueError, OverflowError):
        return "the checkpoint's sign_time is out of range"
    try:
        key.verify(cp.signature, message)
    except InvalidSignature:
        return f"the checkpoint's signature does not verify with key {cp.key_id}"
    return None


def anchor(cp: audit_pb2.AuditCheckpoint) -> Anchor:
    """A checkpoint (its signature already verified) as the chain verifier compares with it."""
    return Anchor(cp.sequence, cp.head_hash, cp.key_id, chain_time(cp.sign_time.ToDatetime(tzinfo=UTC)),
                  cp.tree_root)


def checkpoint_line(cp: audit_pb2.AuditCheckpoint) -> str:
    """One checkpoint as a proto3 JSON line (the form auditors keep)."""
    return json.dumps(json_format.MessageToDict(cp), separators=(",", ":")) + "\n"


def parse_checkpoint_lines(lines: Iterable[str | bytes]) -> list[audit_pb2.AuditCheckpoint]:
    out = []
    for line in lines:
        text = line.decode() if isinstance(line, bytes) else line
        if text.strip():
            out.append(json_format.Parse(text, audit_pb2.AuditCheckpoint()))
    return out


def verify_inclusion_proof(proof: audit_pb2.GetInclusionProofResponse, checkpoint: audit_pb2.AuditCheckpoint) -> str | None:
    """Why a GetInclusionProof answer does not prove its record is in the trail `checkpoint`
    signed (its signature checked separately), or None when it does: the record's content must
    hash to its `hash`, and that leaf's path must lead to the checkpoint's tree_root."""
    record = proof.record
    if record_hash(record) != record.hash:
        return "the record's content does not match its hash"
    if record.tenant_id != checkpoint.tenant_id:
        return "the record is another tenant's"
    if proof.tree_size != checkpoint.sequence or proof.leaf_index != record.sequence - 1:
        return "the proof is for another tree size or position"
    try:
        path = [bytes.fromhex(h) for h in proof.proof]
        ok = merkle.verify_inclusion(merkle.leaf_of(record.hash), proof.leaf_index, proof.tree_size, path,
                                     bytes.fromhex(checkpoint.tree_root))
    except ValueError:
        return "the proof holds something that is not a hex hash"
    return None if ok else "the proof does not lead to the checkpoint's tree root"


def verify_consistency_proof(proof: audit_pb2.GetConsistencyProofResponse, first: audit_pb2.AuditCheckpoint,
                             second: audit_pb2.AuditCheckpoint) -> bool:
    """Whether the proof shows `second`'s trail extends `first`'s unchanged (signatures checked
    separately)."""
    try:
        return merkle.verify_consistency(first.sequence, second.sequence, [bytes.fromhex(h) for h in proof.proof],
                                         bytes.fromhex(first.tree_root), bytes.fromhex(second.tree_root))
    except ValueError:
        return False
