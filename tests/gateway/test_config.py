"""The gateway's configuration: what it accepts and the field each refusal names."""

from __future__ import annotations

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
