"""Cost of the generic edge check (arm_common.edge) per request, next to the cost of decoding
the same request's bytes (what grpc does anyway before any handler), measured in the same run.

  .venv/bin/python bench/edge.py [--rounds 20000]

Prints figures; asserts nothing."""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from google.protobuf import struct_pb2  # noqa: E402

from arm.governance.v1 import decision_pb2  # noqa: E402
from arm.registry.v1 import agents_pb2  # noqa: E402
from arm_common import edge  # noqa: E402
from tests.helpers import genome  # noqa: E402


def requests() -> dict[str, object]:
    args = struct_pb2.Struct()
    args.update({"cmd": "ls -la /tmp", "path": "/var/data", "n": 3, "opts": {"recursive": True, "depth": 2},
                 "files": ["a", "b", "c"]})
    check = decision_pb2.CheckRequest(instance_id="ins_0123456789", tool_name="shell", arguments=args,
                                      run_id="run-1", tool_call_id="call-1", estimated_cost_usd=0.01)
    small = decision_pb2.CheckRequest(instance_id="ins_0123456789", tool_name="shell")
    batch = decision_pb2.CheckBatchRequest(checks=[check] * 100)
    version = agents_pb2.CreateAgentVersionRequest(template_id="tpl_1", genome=genome())
    return {"Check, no arguments": small, "Check, 5 arguments": check, "CheckBatch of 100": batch,
            "CreateAgentVersion (genome)": version}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20000)
    rounds = parser.parse_args().rounds
    print(f"{'request':32} {'edge check µs':>14} {'decode µs (ref)':>16} {'ratio':>6}")
    for name, msg in requests().items():
        data = msg.SerializeToString()  # type: ignore[attr-defined]
        cls: Any = type(msg)
        n = max(1, rounds // (100 if "Batch" in name else 1))
        check_us = timeit.timeit(lambda: edge.check(msg), number=n) / n * 1e6  # noqa: B023
        decode_us = timeit.timeit(lambda: cls.FromString(data), number=n) / n * 1e6  # noqa: B023
        print(f"{name:32} {check_us:14.1f} {decode_us:16.1f} {check_us / decode_us:6.1f}")


if __name__ == "__main__":
    main()
