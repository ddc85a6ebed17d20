"""The gateway's configuration: what it accepts and the field each refusal names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from arm_gateway.config import ConfigError, load_config, parse_config


def upstream(**kw: Any) -> dict[str, Any]:
    return {"command": "srv", "agent": {"instance_id": "ai-1", "api_key_env": "KEY"}, **kw}


def test_a_full_config_is_read(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("secret-key\n")
    cfg = parse_config({"approval_wait_s": 5, "arm": {"governance_address": "g:1"}, "upstreams": {
        "files": upstream(args=["-x"], risk="low", tools={"rm": {"risk": "CRITICAL"}}),
        "web": {"url": "http://h/mcp", "prefix": "w", "agent": {"instance_id": "ai-2", "api_key_file": str(key)}},
    }}, env={"KEY": "env-key"})
    files, web = cfg.upstreams
    assert (files.prefix, files.command, files.args, files.agent.api_key) == ("files", "srv", ("-x",), "env-key")
    assert (files.risk_of("rm"), files.risk_of("ls")) == ("CRITICAL", "LOW")
    assert (web.prefix, web.url, web.agent.api_key, web.risk) == ("w", "http://h/mcp", "secret-key", "MEDIUM")
    assert cfg.approval_wait_s == 5 and cfg.governance_address == "g:1"
    assert cfg.local_decisions and cfg.spool_path({}) == str(Path.home() / ".arm" / "spool")
    assert cfg.spool_path({"ARM_SPOOL_DIR": "/s"}) == "/s"
    off = parse_config({"local_decisions": False, "spool_dir": "/x", "upstreams": {"a": upstream()}}, env={"KEY": "k"})
    assert not off.local_decisions and off.spool_path({"ARM_SPOOL_DIR": "/s"}) == "/x"


@pytest.mark.parametrize(("raw", "field"), [
    ({}, "upstreams"),
    ({"upstreams": {"a": upstream(url="http://x")}}, "upstreams.a: exactly one of command"),
    ({"upstreams": {"a": upstream(risk="SEVERE")}}, "upstreams.a.risk"),
    ({"upstreams": {"a": upstream(tools={"t": {"risk": "x"}})}}, "upstreams.a.tools.t.risk"),
    ({"upstreams": {"a": upstream(prefix="a.b")}}, "upstreams.a.prefix"),
    ({"upstreams": {"a": upstream(), "b": upstream(prefix="a")}}, "upstreams.b.prefix"),
    ({"upstreams": {"a": upstream(agent={"instance_id": "ai-1", "api_key_env": "NOPE"})}},
     "upstreams.a.agent.api_key_env"),
    ({"upstreams": {"a": upstream(agent={"instance_id": "ai-1"})}}, "upstreams.a.agent"),
    ({"upstreams": {"a": upstream()}, "approval_wait_s": -1}, "approval_wait_s"),
    ({"upstreams": {"a": upstream()}, "call_timeout_s": 0}, "call_timeout_s"),
    ({"upstreams": {"a": upstream()}, "max_argument_bytes": 0}, "max_argument_bytes"),
    ({"upstreams": {"a": upstream()}, "http": {"port": "x"}}, "http.port"),
    ({"upstreams": {"a": upstream()}, "hide_denied_tools": "yes"}, "hide_denied_tools"),
    ({"upstreams": {"a": upstream()}, "policy_refresh_s": 0}, "policy_refresh_s"),
    ({"upstreams": {"a": upstream()}, "local_decisions": "on"}, "local_decisions"),
    ({"upstreams": {"a": upstream()}, "spool_dir": 3}, "spool_dir"),
    ({"upstreams": {"a": upstream()}, "direct_http_calls": 1}, "direct_http_calls"),
    ({"upstreams": {"a": upstream()}, "fast_http_calls": "no"}, "fast_http_calls"),
])
def test_bad_configs_are_refused_naming_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(raw, env={"KEY": "k"})
    assert str(exc.value).startswith(field)


def test_unreadable_or_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


DOC = Path(__file__).resolve().parents[2] / "docs" / "gateway.md"


def blocks(lang: str) -> list[str]:
    parts = DOC.read_text().split(f"```{lang}\n")[1:]
    return [p.split("```", 1)[0] for p in parts]


def test_the_documented_config_is_what_the_gateway_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/gateway.md's configuration example is valid and means what its comments say."""
    (yaml_text,) = blocks("yaml")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml_text.replace("/run/secrets/search-agent.key", str(tmp_path / "search.key")))
    (tmp_path / "search.key").write_text("search-key\n")
    monkeypatch.setenv("FILES_AGENT_KEY", "files-key")
    cfg = load_config(path)
    files, search = cfg.upstreams
    assert (cfg.http_port, cfg.hide_denied_tools, cfg.policy_refresh_s, cfg.approval_wait_s) == (8765, True, 10, 30)
    assert (cfg.local_decisions, cfg.direct_http_calls, cfg.fast_http_calls, cfg.spool_path({})) == (
        True, True, True, str(Path.home() / ".arm" / "spool"))
    assert (files.prefix, files.command, files.agent.api_key, files.risk_of("move_file")) == (
        "files", "npx", "files-key", "CRITICAL")
    assert (search.prefix, search.url, search.agent.api_key, search.risk) == (
        "search", "http://127.0.0.1:9000/mcp", "search-key", "MEDIUM")


def test_the_documented_client_configs_are_json() -> None:
    configs = [json.loads(b) for b in blocks("json")]
    assert configs[0]["mcpServers"]["arm-gateway"]["args"][:2] == ["-m", "arm_gateway"]
    assert configs[1]["servers"]["arm-gateway-http"]["url"].endswith("/mcp")


def test_an_upstream_that_does_not_start_is_one_clear_line_and_exit_code_1(tmp_path: Path) -> None:
    """A newcomer's first mistake (a wrong command, a variable the stdio upstream does not get):
    the gateway does not start, and says which upstream and why in one line, not a traceback."""
    import os
    import subprocess
    import sys

    config = tmp_path / "gateway.yaml"
    config.write_text(json.dumps({"arm": {"governance_address": "127.0.0.1:9"}, "upstreams": {"docs": {
        "command": sys.executable, "args": ["-c", "import sys; sys.exit(3)"],
        "agent": {"instance_id": "ins_x", "api_key_env": "GW_TEST_KEY"}}}}))
    done = subprocess.run([sys.executable, "-m", "arm_gateway", "--config", str(config)], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, "GW_TEST_KEY": "arm_key_x_y", "ARM_SPOOL_DIR": str(tmp_path / "spool")})
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("arm_gateway: ")]
    assert len(lines) == 1 and "upstream 'docs'" in lines[0] and "did not start" in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert (tmp_path / "spool" / "decisions-ins_x").is_dir()  # local decisions (the default) spool in ARM_SPOOL_DIR
