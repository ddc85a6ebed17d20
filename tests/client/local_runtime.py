"""A runtime process for tests/client/test_local_decisions.py (run with `python -m`; settings from
ARM_* and ARM_SPOOL_DIR). `burst`: decides locally without end, printing "ACTED <decision id>"
once each decision is returned (spooled), i.e. when its tool would run. `replay`: starts (which
ships the spool left by an earlier run), waits until governance acknowledged all of it, exits 0."""

from __future__ import annotations

import asyncio
import sys

from arm_client import Arm


async def burst() -> None:
    async with Arm(local_decisions=True) as arm:
        assert await arm.wait_local_ready(30), "no decision inputs"
        i = 0
        while True:
            decisions = await asyncio.gather(*(arm.check("files.read", {"i": i + k}, risk="LOW") for k in range(16)))
            i += 16
            for decision in decisions:
                assert decision.allowed, decision
                print(f"ACTED {decision.decision_id}", flush=True)


async def replay() -> None:
    arm = Arm(local_decisions=True, close_timeout_s=60)
    await arm.wait_local_ready(30)
    assert arm.local is not None
    ok = await arm.local.drain(60)
    await arm.close()
    print(f"replayed: {ok}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    asyncio.run(burst() if sys.argv[1] == "burst" else replay())
