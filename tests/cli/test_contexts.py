"""`arm login`, `arm context list|use`, the ARM_* overrides, output formats, exit codes and the
error block."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import yaml

from tests.cli.conftest import Terminal, logged_in, ok
from tests.conftest import GovernanceServer, TenantContext


async def test_login_stores_a_private_context_and_use_switches(terminal: Terminal, tenant: TenantContext,
                                                               governance: GovernanceServer) -> None:
    first = await logged_in(terminal, tenant, governance, tenant.admin_key, name="admin")
    assert tenant.tenant.id in first.stdout and tenant.admin_operator_id in first.stdout
    assert stat.S_IMODE(terminal.config.stat().st_mode) == 0o600
    stored = yaml.safe_load(terminal.config.read_text())
    assert stored["current"] == "admin"
    assert stored["contexts"]["admin"]["api_key"] == tenant.admin_key
    assert stored["contexts"]["admin"]["governance_address"] == governance.address

    key_file = terminal.config.parent / "key"
    key_file.write_text(tenant.admin_key + "\n")
    ok(await terminal.arm("login", "--address", tenant.server.address, "--key-file", str(key_file),
                          "--name", "other", "--governance-address", governance.address))
    listed = json.loads(ok(await terminal.arm("context", "list", "-o", "json")).stdout)
    assert [(c["name"], c["current"]) for c in listed] == [("admin", False), ("other", True)]
    assert all(tenant.admin_key not in json.dumps(c) for c in listed)  # the key is never printed
    table = ok(await terminal.arm("context", "list")).stdout
    assert "admin" in table and "other" in table and governance.address in table

    ok(await terminal.arm("context", "use", "admin"))
    assert yaml.safe_load(terminal.config.read_text())["current"] == "admin"
    as_yaml = yaml.safe_load(ok(await terminal.arm("context", "list", "-o", "yaml")).stdout)
    assert [c["name"] for c in as_yaml if c["current"]] == ["admin"]

    unknown = await terminal.arm("context", "use", "nope")
    assert unknown.exit_code == 2 and "no context named 'nope'" in unknown.stderr
    assert yaml.safe_load(terminal.config.read_text())["current"] == "admin"


async def test_a_refused_login_prints_the_error_block_and_stores_nothing(
        terminal: Terminal, tenant: TenantContext) -> None:
    result = await terminal.arm("login", "--address", tenant.server.address, "--key", "arm_not-a-real-key")
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.stderr.startswith("Error: ")
    assert "code:       UNAUTHENTICATED" in result.stderr
    assert "request id: req-" in result.stderr
    assert not terminal.config.exists()


async def test_environment_overrides_the_context(terminal: Terminal, tenant: TenantContext,
                                                 governance: GovernanceServer) -> None:
    await logged_in(terminal, tenant, governance, tenant.admin_key)
    fine = ok(await terminal.arm("approvals", "list", "-o", "json"))
    assert json.loads(fine.stdout) == []
    # ARM_API_KEY wins over the context's key: refused, with the server's reason and request id.
    refused = await terminal.arm("approvals", "list", env={"ARM_API_KEY": "arm_wrong"})
    assert refused.exit_code == 1 and "UNAUTHENTICATED" in refused.stderr and "request id:" in refused.stderr
    # ARM_ADDRESS wins over the context's addresses: nothing listens there.
    gone = await terminal.arm("approvals", "list", env={"ARM_ADDRESS": "127.0.0.1:1", "ARM_TIMEOUT_S": "2"})
    assert gone.exit_code == 1 and "code:       UNAVAILABLE" in gone.stderr
    assert "Traceback" not in gone.output


async def test_usage_errors_exit_2_and_server_field_violations_exit_1(terminal: Terminal, tenant: TenantContext,
                                                                      governance: GovernanceServer) -> None:
    await logged_in(terminal, tenant, governance, tenant.admin_key)
    bad_option = await terminal.arm("approvals", "list", "--min-risk", "extreme")
    assert bad_option.exit_code == 2 and "--min-risk" in bad_option.output
    bad_json = await terminal.arm("check", "fs.read", "--instance", "ins_x", "--args", "[1]")
    assert bad_json.exit_code == 2 and "JSON object" in bad_json.output
    both_keys = await terminal.arm("login", "--address", "x:1")
    assert both_keys.exit_code == 2
    unknown_context = await terminal.arm("--context", "ghost", "approvals", "list")
    assert unknown_context.exit_code == 2 and "no context named 'ghost'" in unknown_context.stderr
    # The server refuses a bad field: one block with the field violation and the request id.
    refused = await terminal.arm("check", "fs.read", "--instance", "ins_x", "--cost", "-1")
    assert refused.exit_code == 1, refused.output
    assert "code:       INVALID_ARGUMENT" in refused.stderr
    assert "field:      estimated_cost_usd: must be a finite number >= 0" in refused.stderr
    assert "request id: req-" in refused.stderr
    assert "Traceback" not in refused.output


async def test_the_config_goes_under_xdg_config_home_and_a_key_comes_from_stdin(
        terminal: Terminal, tenant: TenantContext, tmp_path: Path) -> None:
    home = tmp_path / "xdg"
    runner_env = {"ARM_CONFIG": "", "XDG_CONFIG_HOME": str(home)}
    result = await terminal.arm("login", "--address", tenant.server.address, "--key-file", "-", "--name", "piped",
                                env=runner_env, input=tenant.admin_key + "\n")
    assert result.exit_code == 0, result.output
    path = home / "arm" / "config.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert yaml.safe_load(path.read_text())["contexts"]["piped"]["api_key"] == tenant.admin_key
    assert not terminal.config.exists()


async def test_the_installed_command_prints_the_block_not_a_traceback(terminal: Terminal, tenant: TenantContext,
                                                                      governance: GovernanceServer) -> None:
    await logged_in(terminal, tenant, governance, tenant.admin_key)
    terminal.env["ARM_API_KEY"] = "arm_wrong"
    proc = terminal.spawn("approvals", "list")
    out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 1, (out, err)
    assert err.startswith("Error: ") and "code:       UNAUTHENTICATED" in err and "request id: req-" in err
    assert "Traceback" not in err
    del terminal.env["ARM_API_KEY"]
    usage = terminal.spawn("approvals", "list", "--limit", "0")
    out, err = await asyncio.to_thread(usage.communicate, timeout=60)
    assert usage.returncode == 2 and "--limit" in err
