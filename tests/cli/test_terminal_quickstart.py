"""The README's terminal quickstart, run as written: the block between the
`<!-- terminal-quickstart -->` markers, line by line through bash with the installed `arm`,
against the all-in-one dev server (its own data dir and port). Only the address and APPROVAL_ID
(the id the first check printed) are substituted."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.processes import ROOT, base_env, free_port, spawn, stop, wait_serving

README = ROOT / "README.md"


def quickstart_lines() -> list[str]:
    text = README.read_text()
    block = text.split("<!-- terminal-quickstart -->", 1)[1].split("<!-- /terminal-quickstart -->", 1)[0]
    lines = [ln.strip() for ln in block.strip().strip("`").removeprefix("sh").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


async def test_the_terminal_quickstart_runs_as_written(tmp_path: Path) -> None:
    lines = quickstart_lines()
    assert 6 <= len(lines) <= 12, lines
    assert all(ln.startswith("arm ") or " arm " in ln for ln in lines), lines  # arm commands only
    assert any(ln.startswith("arm policy apply -f examples/") for ln in lines), lines  # policy from files
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "examples" / "terminal", work / "examples" / "terminal")
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "dev.log"
    proc = spawn("arm_allinone", env=base_env(ARM_DATA_DIR=str(work / ".arm"), ARM_LISTEN=address,
                                              ARM_OUTBOX_POLL_S="0.05"), log=log)
    env = base_env(ARM_CONFIG=str(tmp_path / "arm-config.yaml"),
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    outputs: list[str] = []
    try:
        await wait_serving(address, proc, log)
        approval = ""
        for line in lines:
            if "APPROVAL_ID" in line:
                assert approval, "the first check named no approval"
            command = line.replace("127.0.0.1:50051", address).replace("APPROVAL_ID", approval)
            done = await asyncio.to_thread(subprocess.run, ["bash", "-c", command], cwd=work, env=env,
                                           capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, (line, done.stdout, done.stderr)
            assert "Traceback" not in done.stderr
            outputs.append(done.stdout)
            found = re.search(r"^approval\s+(\S+)\s*$", done.stdout, re.M)
            if found and not approval:
                approval = found.group(1)
        checks = [out for ln, out in zip(lines, outputs, strict=True) if ln.startswith("arm check")]
        assert len(checks) == 2
        assert re.search(r"^decision\s+NEEDS_APPROVAL\s*$", checks[0], re.M), checks[0]
        assert re.search(r"^decision\s+ALLOW\s*$", checks[1], re.M), checks[1]
        applied = next(out for ln, out in zip(lines, outputs, strict=True) if ln.startswith("arm policy apply -f"))
        assert "Plan: 2 to create, 0 to update" in applied and "Applied: 2 envelope(s) written." in applied, applied
        approved = next(out for ln, out in zip(lines, outputs, strict=True) if "approvals approve" in ln)
        assert "APPROVED" in approved and "bob@acme.example" in approved, approved
        verified = outputs[-1]
        assert re.search(r"^ok\s+yes\s*$", verified, re.M), verified
        checked = re.search(r"^checkpoints checked\s+(\d+)", verified, re.M)
        assert checked and int(checked.group(1)) >= 1, verified
        assert (work / "acme.key").stat().st_mode & 0o077 == 0
        assert stop(proc) == 0, log.read_text()
    finally:
        stop(proc, signal.SIGKILL)
