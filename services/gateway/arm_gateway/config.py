"""The gateway's configuration (YAML).

    arm:                                  # optional; else ARM_ADDRESS / ARM_*_ADDRESS from the env
      governance_address: 127.0.0.1:50052
      telemetry_address: 127.0.0.1:50053
    http: {host: 127.0.0.1, port: 8765}   # optional: serve clients over streamable HTTP at /mcp
    approval_wait_s: 30                   # how long a call waits for an approval (default 30)
    call_timeout_s: 300                   # how long a forwarded call may take (default 300)
    max_argument_bytes: 262144            # larger arguments (as JSON) are refused, unchecked
    hide_denied_tools: false              # leave tools the policy denies outright out of tools/list
    policy_refresh_s: 10                  # how often hidden tools are recomputed (with hide_denied_tools)
    local_decisions: true                 # decide ALLOW/DENY in process, spooled and shipped (default true)
    spool_dir: /var/lib/arm-gateway/spool # the local decisions' spool (default ARM_SPOOL_DIR, else ~/.arm/spool)
    direct_http_calls: true               # tools/call to an HTTP upstream as one POST beside the SDK session
    fast_http_calls: true                 # HTTP clients' tools/call answered beside the SDK's server
    upstreams:
      files:                              # tools appear as "files.<tool>" (or "<prefix>.<tool>")
        command: python                   # a stdio server …
        args: [-m, my_mcp_server]
        env: {ROOT: /srv}
        # url: http://127.0.0.1:9000/mcp  # … or a streamable HTTP one
        prefix: files                     # default: the upstream's name
        agent:
          instance_id: ai-…
          api_key_file: /run/secrets/files-agent.key   # or api_key_env: FILES_AGENT_KEY
        risk: LOW                         # declared risk of its tools (default MEDIUM)
        tools:                            # per tool overrides
          delete: {risk: CRITICAL}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RISKS = ("LOW", "MEDIUM", "HIGH", "CRITICAL")


class ConfigError(ValueError):
    """A configuration the gateway cannot run with (the message names the field)."""


@dataclass(frozen=True)
class AgentConfig:
    instance_id: str
    api_key: str


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    prefix: str
    agent: AgentConfig
    command: str = ""
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    url: str = ""
    risk: str = "MEDIUM"
    tool_risks: dict[str, str] = field(default_factory=dict)

    def risk_of(self, tool: str) -> str:
        return self.tool_risks.get(tool, self.risk)


@dataclass(frozen=True)
class GatewayConfig:
    upstreams: tuple[UpstreamConfig, ...]
    approval_wait_s: float = 30.0
    registry_address: str | None = None
    governance_address: str | None = None
    telemetry_address: str | None = None
    address: str | None = None
    max_argument_bytes: int = 256 * 1024
    """Calls whose arguments (as JSON) are larger are refused at the gateway, unchecked."""
    call_timeout_s: float = 300.0
    """How long a forwarded call may take before the client gets an error result."""
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    """Serve clients over streamable HTTP on this port (None: over stdio)."""
    hide_denied_tools: bool = False
    """Leave the tools that the agent's policy denies whatever the arguments out of tools/list."""
    policy_refresh_s: float = 10.0
    """How often the hidden tools are recomputed; clients are sent tools/list_changed on a change."""
    local_decisions: bool = True
    """Decide calls in the gateway's process with governance's engine (`Arm(local_decisions=True)`):
    ALLOW / DENY spooled and shipped to governance; approvals, grants, budgets and a stale inputs
    stream still go to `Check`."""
    spool_dir: str = ""
    """The local decisions' spool directory ("": ARM_SPOOL_DIR, else ~/.arm/spool)."""
    direct_http_calls: bool = True
    """Send a streamable HTTP upstream's tools/call as a direct POST beside the SDK's session
    (arm_gateway.direct); False: through the SDK's ClientSession."""
    fast_http_calls: bool = True
    """Answer a streamable HTTP client's `tools/call` (a single request, in a session already
    started) in the gateway's own ASGI app, beside the SDK's server, with the same checks and the
    same answers (arm_gateway.fast); False: every request through the SDK's server."""

    def spool_path(self, env: dict[str, str] | None = None) -> str:
        env = dict(os.environ) if env is None else env
        return os.path.expanduser(self.spool_dir or env.get("ARM_SPOOL_DIR") or "~/.arm/spool")


def _str(d: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = d.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}: a non-empty string is required")
    return value


def _risk(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.upper() not in RISKS:
        raise ConfigError(f"{where}: one of {', '.join(RISKS)} is required, got {value!r}")
    return value.upper()


def _agent(d: Any, where: str, env: dict[str, str]) -> AgentConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: a mapping with instance_id and api_key_file or api_key_env is required")
    instance_id = _str(d, "instance_id", where)
    if "api_key_file" in d:
        path = Path(_str(d, "api_key_file", where))
        try:
            key = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{where}.api_key_file: cannot read {path}: {exc.strerror}") from None
    elif "api_key_env" in d:
        var = _str(d, "api_key_env", where)
        key = env.get(var, "")
        if not key:
            raise ConfigError(f"{where}.api_key_env: the environment variable {var} is not set")
    else:
        raise ConfigError(f"{where}: api_key_file or api_key_env is required")
    if not key:
        raise ConfigError(f"{where}: the agent API key is empty")
    return AgentConfig(instance_id, key)


def parse_config(raw: Any, env: dict[str, str] | None = None) -> GatewayConfig:
    env = dict(os.environ) if env is None else env
    if not isinstance(raw, dict):
        raise ConfigError("the configuration must be a mapping")
    ups = raw.get("upstreams")
    if not isinstance(ups, dict) or not ups:
        raise ConfigError("upstreams: at least one upstream is required")
    upstreams = []
    prefixes: set[str] = set()
    for name, u in ups.items():
        where = f"upstreams.{name}"
        if not isinstance(u, dict):
            raise ConfigError(f"{where}: a mapping is required")
        prefix = _str(u, "prefix", where, str(name))
        if "." in prefix or prefix in prefixes:
            raise ConfigError(f"{where}.prefix: must be unique and contain no '.', got {prefix!r}")
        prefixes.add(prefix)
        if ("command" in u) == ("url" in u):
            raise ConfigError(f"{where}: exactly one of command (stdio) or url (streamable HTTP) is required")
        args = u.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ConfigError(f"{where}.args: a list of strings is required")
        upenv = u.get("env", {})
        if not isinstance(upenv, dict):
            raise ConfigError(f"{where}.env: a mapping is required")
        tools = u.get("tools", {}) or {}
        if not isinstance(tools, dict):
            raise ConfigError(f"{where}.tools: a mapping of tool name to options is required")
        tool_risks = {str(t): _risk((o or {}).get("risk"), f"{where}.tools.{t}.risk") for t, o in tools.items()}
        upstreams.append(UpstreamConfig(
            name=str(name), prefix=prefix, agent=_agent(u.get("agent"), f"{where}.agent", env),
            command=_str(u, "command", where) if "command" in u else "", args=tuple(args),
            env={str(k): str(v) for k, v in upenv.items()}, url=_str(u, "url", where) if "url" in u else "",
            risk=_risk(u.get("risk", "MEDIUM"), f"{where}.risk"), tool_risks=tool_risks))
    arm = raw.get("arm", {}) or {}
    if not isinstance(arm, dict):
        raise ConfigError("arm: a mapping is required")
    wait = raw.get("approval_wait_s", 30.0)
    if not isinstance(wait, int | float) or isinstance(wait, bool) or wait < 0:
        raise ConfigError("approval_wait_s: a number of seconds >= 0 is required")
    http = raw.get("http")
    host, port = "127.0.0.1", None
    if http is not None:
        if not isinstance(http, dict):
            raise ConfigError("http: a mapping with port (and host) is required")
        host = _str(http, "host", "http", "127.0.0.1")
        port = http.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ConfigError("http.port: a TCP port number is required")
    call_timeout = raw.get("call_timeout_s", 300.0)
    if not isinstance(call_timeout, int | float) or isinstance(call_timeout, bool) or call_timeout <= 0:
        raise ConfigError("call_timeout_s: a number of seconds > 0 is required")
    max_bytes = raw.get("max_argument_bytes", 256 * 1024)
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
        raise ConfigError("max_argument_bytes: a number of bytes > 0 is required")
    hide = raw.get("hide_denied_tools", False)
    if not isinstance(hide, bool):
        raise ConfigError("hide_denied_tools: true or false is required")
    refresh = raw.get("policy_refresh_s", 10.0)
    if not isinstance(refresh, int | float) or isinstance(refresh, bool) or refresh <= 0:
        raise ConfigError("policy_refresh_s: a number of seconds > 0 is required")
    local = raw.get("local_decisions", True)
    if not isinstance(local, bool):
        raise ConfigError("local_decisions: true or false is required")
    spool = raw.get("spool_dir", "")
    if not isinstance(spool, str):
        raise ConfigError("spool_dir: a directory path is required")
    direct = raw.get("direct_http_calls", True)
    if not isinstance(direct, bool):
        raise ConfigError("direct_http_calls: true or false is required")
    fast = raw.get("fast_http_calls", True)
    if not isinstance(fast, bool):
        raise ConfigError("fast_http_calls: true or false is required")
    return GatewayConfig(tuple(upstreams), float(wait), arm.get("registry_address"), arm.get("governance_address"),
                         arm.get("telemetry_address"), arm.get("address"), max_bytes, float(call_timeout), host,
                         port, hide, float(refresh), local, spool, direct, fast)


def load_config(path: str | Path) -> GatewayConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_config(raw)
