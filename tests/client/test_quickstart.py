"""The README's quickstart, run as written (issue 11 item 6): `make run` is the dev server on a
free port with its own data folder; the other lines run as they are, the agent and the approvers'
terminal at the same time."""

from __future__ import annotations

import asyncio
import re
import shlex
import signal
import subprocess
from pathlib import Path

from tests.processes import ROOT, base_env, free_port, spawn, stop, wait_serving


def quickstart_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart: a governed agent", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip()]


async def run(command: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    args = shlex.split(command.split("#", 1)[0])
    return await asyncio.create_subprocess_exec(*args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT)


async def test_the_readme_quickstart_runs(tmp_path: Path) -> None:
    lines = quickstart_lines()
    assert len(lines) <= 10
    assert lines[0].startswith("make run")
    address = f"127.0.0.1:{free_port()}"
    env = base_env(ARM_DATA_DIR=str(tmp_path / "arm"), ARM_LISTEN=address, ARM_ADDRESS=address)
    log = tmp_path / "dev.log"
    server = spawn("arm_allinone", env=env, log=log)
    try:
        await wait_serving(address, server, log)
        load, agent_line, approve_line = lines[1:]
        loaded = await run(load, env)
        out, _ = await asyncio.wait_for(loaded.communicate(), 120)
        assert loaded.returncode == 0, out.decode()
        agent = await run(agent_line, env)
        approver = await run(approve_line, env)
        agent_out, _ = await asyncio.wait_for(agent.communicate(), 180)
        approver_out, _ = await asyncio.wait_for(approver.communicate(), 60)
        text = agent_out.decode()
        assert agent.returncode == 0 and approver.returncode == 0, text + approver_out.decode()
        assert "docs.search     → 3 articles" in text
        assert "db.drop_table   → DENIED" in text and "company-guardrails" in text
        assert "orders.refund   → refunded 30.00 USD on order-17" in text
        assert approver_out.decode().count("approved apr_") == 2
        trace = text.split("trace of run-", 1)[1]
        kinds = re.findall(r"^\s+\S+\s+([A-Z_]+)", trace, re.M)
        # Governance's events of the four decisions (allowed, denied, pending, granted) are in too.
        assert kinds.count("DECISION_MADE") == 3 and kinds.count("TOOL_CALL_BLOCKED") == 1, trace
        sdk_kinds = [k for k in kinds if k not in ("DECISION_MADE", "TOOL_CALL_BLOCKED")]
        assert sdk_kinds == ["RUN_STARTED", "TOOL_CALL_STARTED", "TOOL_CALL_COMPLETED", "TOOL_CALL_STARTED",
                             "TOOL_CALL_COMPLETED", "COST_TICK", "RUN_COMPLETED"], trace
    finally:
        stop(server, signal.SIGKILL)
