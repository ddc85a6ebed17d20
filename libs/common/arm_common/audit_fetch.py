"""What an auditor runs regularly, from outside ARM, to keep the anchors of a tenant's audit trail:

    ARM_API_KEY=<an auditor's key> python -m arm_common.audit_fetch --address HOST:PORT --out DIR

Into DIR it writes the current export (`trail.jsonl`), the signing public key
(`audit-key-<key id>.pem`, kept once fetched) and appends to `checkpoints.jsonl` every checkpoint
it has not kept yet: checkpoints already kept are never replaced or dropped, so a history
rewritten (and its stored checkpoints deleted) afterwards still disagrees with them. It then
verifies the export against every kept checkpoint with every kept key, as
`python -m arm_common.verify_audit` does, prints the JSON report and exits 0 when the trail is
intact, 1 when not (or when the server's checkpoint differs from a kept one at the same
position), 2 on unusable input. The key is read from the environment, never from arguments."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from arm.governance.v1 import audit_pb2
from arm_client import ArmClient
from arm_common.chain import parse_export_lines
from arm_common.checkpoints import checkpoint_line, load_public_key, parse_checkpoint_lines
from arm_common.verify_audit import verify_export

CHECKPOINTS = "checkpoints.jsonl"
TRAIL = "trail.jsonl"


@dataclasses.dataclass
class Fetched:
    key_id: str
    public_key_pem: str
    checkpoints: list[audit_pb2.AuditCheckpoint]


async def fetch(address: str, api_key: str, trail: Path) -> Fetched:
    """Fetches the key and every checkpoint, and streams the export into `trail`. (A command
    line tool: its event loop serves nothing else, so plain file writes are fine here.)"""
    async with ArmClient(address, api_key) as client:
        key = await client.audit.GetAuditSigningKey(audit_pb2.GetAuditSigningKeyRequest())
        checkpoints: list[audit_pb2.AuditCheckpoint] = []
        token = ""
        while True:
            page = await client.audit.ListCheckpoints(audit_pb2.ListCheckpointsRequest(page_token=token))
            checkpoints += page.checkpoints
            if not (token := page.next_page_token):
                break
        with open(trail, "wb") as f:  # noqa: ASYNC230 - see above
            async for chunk in client.audit.ExportChangeRecords(audit_pb2.ExportChangeRecordsRequest()):
                f.write(chunk.data)
    return Fetched(key.key_id, key.public_key_pem, checkpoints)


def keep(out: Path, fetched: Fetched) -> tuple[int, list[str]]:
    """Keeps the key and the checkpoints not kept yet; returns how many were added and the
    server's checkpoints that differ from a kept one at the same position."""
    key_file = out / f"audit-key-{fetched.key_id}.pem"
    if not key_file.exists():
        key_file.write_text(fetched.public_key_pem)
    path = out / CHECKPOINTS
    kept = {(c.sequence, c.key_id): c for c in
            parse_checkpoint_lines(path.read_text().splitlines() if path.exists() else [])}
    new: list[audit_pb2.AuditCheckpoint] = []
    conflicts: list[str] = []
    for cp in fetched.checkpoints:
        old = kept.get((cp.sequence, cp.key_id))
        if old is None:
            new.append(cp)
            kept[(cp.sequence, cp.key_id)] = cp
        elif old != cp:
            conflicts.append(f"the server's checkpoint at sequence {cp.sequence} (key {cp.key_id}) "
                             f"differs from the one kept")
    with path.open("a", encoding="utf-8") as f:
        f.writelines(checkpoint_line(cp) for cp in new)
    return len(new), conflicts


def run(address: str, out: Path) -> int:
    api_key = os.environ.get("ARM_API_KEY", "")
    if not api_key:
        print("audit_fetch: set ARM_API_KEY to a key with audit:read", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{TRAIL}.tmp"
    try:
        fetched = asyncio.run(fetch(address, api_key, tmp))
    except grpc.aio.AioRpcError as exc:
        print(f"audit_fetch: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    tmp.replace(out / TRAIL)
    added, conflicts = keep(out, fetched)
    keys = [load_public_key(p.read_bytes()) for p in sorted(out.glob("audit-key-*.pem"))]
    lines = (out / CHECKPOINTS).read_text().splitlines()
    with (out / TRAIL).open(encoding="utf-8") as f:
        report = verify_export(parse_export_lines(f), lines, keys)
    print(json.dumps({**dataclasses.asdict(report), "checkpoints_added": added, "conflicts": conflicts}, indent=2))
    return 0 if report.ok and not conflicts else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arm_common.audit_fetch",
                                     description="Keep a tenant's audit checkpoints and verify its trail.")
    parser.add_argument("--address", required=True, help="governance host:port")
    parser.add_argument("--out", type=Path, required=True, help="the auditor's folder (kept between runs)")
    args = parser.parse_args(argv)
    return run(args.address, args.out)


if __name__ == "__main__":
    sys.exit(main())
