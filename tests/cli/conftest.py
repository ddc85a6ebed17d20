"""The `arm` command against real servers (the session's registry and governance on port 0):
run in-process through typer's CliRunner in a worker thread (the servers keep running on the
test's event loop), or as the installed `.venv/bin/arm` in a subprocess."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from arm_cli.main import app
from tests.conftest import GovernanceServer, TenantContext

ARM_VARS = ("ARM_ADDRESS", "ARM_API_KEY", "ARM_REGISTRY_ADDRESS", "ARM_GOVERNANCE_ADDRESS",
            "ARM_TELEMETRY_ADDRESS", "ARM_CONTEXT", "ARM_CONFIG", "ARM_TIMEOUT_S", "XDG_CONFIG_HOME")
ARM_BIN = Path(sys.executable).parent / "arm"


@dataclass
class Terminal:
    """An operator's terminal: its own config file, optional ARM_* variables."""

    config: Path
    env: dict[str, str] = field(default_factory=dict)

    def environ(self, extra: dict[str, str] | None) -> dict[str, str | None]:
        out: dict[str, str | None] = dict.fromkeys(ARM_VARS)
        out.update({"ARM_CONFIG": str(self.config), **self.env, **(extra or {})})
        return out

    async def arm(self, *args: str, env: dict[str, str] | None = None, input: str | None = None) -> Result:
        """`arm ARGS…` in-process, in a worker thread."""
        runner = CliRunner()
        environ = self.environ(env)
        return await asyncio.to_thread(lambda: runner.invoke(app, list(args), env=environ, input=input,
                                                             catch_exceptions=True))

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        """`.venv/bin/arm ARGS…` as a process."""
        env = {k: v for k, v in os.environ.items() if k not in ARM_VARS}
        env.update({k: v for k, v in self.environ(None).items() if v is not None})
        return subprocess.Popen([str(ARM_BIN), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)


@pytest.fixture
def terminal(tmp_path: Path) -> Terminal:
    return Terminal(tmp_path / "arm" / "config.yaml")


async def logged_in(terminal: Terminal, tenant: TenantContext, governance: GovernanceServer, key: str,
                    name: str = "default") -> Result:
    """`arm login` with the services apart (registry and governance on their own ports)."""
    result = await terminal.arm("login", "--address", tenant.server.address, "--key", key, "--name", name,
                                "--registry-address", tenant.server.address,
                                "--governance-address", governance.address)
    assert result.exit_code == 0, result.output
    return result


def ok(result: Result) -> Result:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 0, result.output
    return result
