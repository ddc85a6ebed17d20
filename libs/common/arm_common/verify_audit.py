"""Offline verification of an exported audit trail against kept checkpoints:

    python -m arm_common.verify_audit --records trail.jsonl \\
        [--checkpoints checkpoints.jsonl --public-key audit-key.pem ...]

`trail.jsonl` is what ExportChangeRecords streams (one tenant's whole trail, no filter);
`checkpoints.jsonl` holds one AuditCheckpoint per line in proto3 JSON (ListCheckpoints' items,
see arm_common.checkpoints.checkpoint_line); each `--public-key` is a PEM public key (as
GetAuditSigningKey's public_key_pem gives it) or its 32 raw bytes. Every checkpoint must verify
with one of the keys and name the trail's tenant, and the trail must agree with every one: a
record edited, deleted or re-hashed at or before a checkpoint is reported even when every
following hash was recomputed. Prints a JSON report; exit status 0 when intact, 1 when not, 2 on
unusable input."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf import json_format

from arm.common.v1 import common_pb2
from arm_common.chain import CHECKPOINT_INVALID, ChainReport, ChainVerifier
from arm_common.checkpoints import anchor, keyring, load_public_key, parse_checkpoint_lines, signature_problem


def verify_export(records: Iterable[common_pb2.ChangeRecord], checkpoint_lines: Iterable[str | bytes],
                  public_keys: Sequence[Ed25519PublicKey], tenant: str = "") -> ChainReport:
    """Verifies one tenant's exported records against checkpoints signed by `public_keys`. The
    tenant is `tenant`, else the first record's, else the first checkpoint's."""
    checkpoints = parse_checkpoint_lines(checkpoint_lines)
    keys = keyring(public_keys)
    it = iter(records)
    first = next(it, None)
    tenant = tenant or (first.tenant_id if first is not None else "") or \
        (checkpoints[0].tenant_id if checkpoints else "")
    invalid: tuple[int, str] | None = None
    anchors = []
    for i, cp in enumerate(checkpoints):
        problem = signature_problem(cp, keys)
        if problem is None and cp.tenant_id != tenant:
            problem = f"the checkpoint is tenant {cp.tenant_id!r}'s, the trail tenant {tenant!r}'s"
        if problem is None:
            anchors.append(anchor(cp))
        elif invalid is None:
            invalid = (cp.sequence, f"checkpoint {i + 1} (line) at sequence {cp.sequence}: {problem}")
    verifier = ChainVerifier(anchors)
    if invalid is not None:
        verifier.mark_broken(invalid[0], CHECKPOINT_INVALID, invalid[1])
    if first is not None:
        verifier.add(first)
    for record in it:
        verifier.add(record)
    return verifier.finish()


def _records(path: Path) -> Iterable[common_pb2.ChangeRecord]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json_format.Parse(line, common_pb2.ChangeRecord())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arm_common.verify_audit",
                                     description="Verify an exported audit trail against signed checkpoints.")
    parser.add_argument("--records", type=Path, required=True, help="ExportChangeRecords output (JSON lines)")
    parser.add_argument("--checkpoints", type=Path, help="kept checkpoints (JSON lines)")
    parser.add_argument("--public-key", type=Path, action="append", default=[],
                        help="PEM (or raw 32-byte) Ed25519 public key; repeat for older keys")
    parser.add_argument("--tenant", default="", help="the trail's tenant (default: the first record's)")
    args = parser.parse_args(argv)
    try:
        keys = [load_public_key(p.read_bytes()) for p in args.public_key]
        if args.checkpoints is not None and not keys:
            parser.error("--checkpoints needs at least one --public-key")
        lines = args.checkpoints.read_text(encoding="utf-8").splitlines() if args.checkpoints else []
        report = verify_export(_records(args.records), lines, keys, args.tenant)
    except (OSError, ValueError, json_format.ParseError) as exc:
        print(f"verify_audit: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(dataclasses.asdict(report), indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
