"""Named contexts in a 0600 YAML file: where the services are and which key to send.

The file is `$ARM_CONFIG`, else `$XDG_CONFIG_HOME/arm/config.yaml`, else
`~/.config/arm/config.yaml`. `ARM_ADDRESS`, `ARM_REGISTRY_ADDRESS`, `ARM_GOVERNANCE_ADDRESS`,
`ARM_TELEMETRY_ADDRESS` and `ARM_API_KEY` override the context's values."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from arm_client.connection import DEFAULT_ADDRESS, Settings


class ConfigError(Exception):
    """The config file or a context in it is unusable (a usage error: exit code 2)."""


@dataclass
class Context:
    """One named context. Per-service addresses are empty when all three run behind `address`."""

    address: str = DEFAULT_ADDRESS
    api_key: str = ""
    registry_address: str = ""
    governance_address: str = ""
    telemetry_address: str = ""

    def public(self, name: str, current: bool) -> dict[str, Any]:
        """What `arm context list` shows: never the key itself, only its last characters."""
        return {"name": name, "current": current, "address": self.address,
                "registry": self.registry_address or self.address,
                "governance": self.governance_address or self.address,
                "telemetry": self.telemetry_address or self.address,
                "key": f"…{self.api_key[-4:]}" if self.api_key else ""}


@dataclass
class Config:
    current: str = ""
    contexts: dict[str, Context] = field(default_factory=dict)


def config_path(env: Mapping[str, str] | None = None) -> Path:
    e = os.environ if env is None else env
    if e.get("ARM_CONFIG"):
        return Path(e["ARM_CONFIG"])
    base = Path(e["XDG_CONFIG_HOME"]) if e.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "arm" / "config.yaml"


def load(path: Path) -> Config:
    if not path.exists():
        return Config()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("contexts", {}), dict):
        raise ConfigError(f"the config file {path} is not an arm config (expected `current` and `contexts`)")
    contexts: dict[str, Context] = {}
    known = set(Context.__dataclass_fields__)
    for name, values in (raw.get("contexts") or {}).items():
        if not isinstance(values, dict):
            raise ConfigError(f"context {name!r} in {path} is not a mapping")
        contexts[str(name)] = Context(**{k: str(v) for k, v in values.items() if k in known})
    return Config(str(raw.get("current") or ""), contexts)


def save(path: Path, config: Config) -> None:
    """Writes the file readable by its owner only (it holds API keys), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = {"current": config.current,
            "contexts": {name: {k: v for k, v in asdict(c).items() if v} for name, c in config.contexts.items()}}
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def settings(config: Config, name: str | None, env: Mapping[str, str] | None = None) -> Settings:
    """The connection settings of context `name` (else the current one), with the environment's
    `ARM_*` variables on top. Without any context, the environment (or the defaults) alone."""
    e = os.environ if env is None else env
    ctx = Context()
    chosen = name or config.current
    if chosen:
        if chosen not in config.contexts:
            raise ConfigError(f"no context named {chosen!r} (see `arm context list`)")
        ctx = config.contexts[chosen]
    address = e.get("ARM_ADDRESS") or ctx.address
    def pick(var: str, own: str) -> str:
        return e.get(var) or (address if e.get("ARM_ADDRESS") else "") or own or address
    return Settings.from_env(
        {k: v for k, v in e.items() if k == "ARM_TIMEOUT_S" or k.startswith("ARM_TLS_")},
        registry_address=pick("ARM_REGISTRY_ADDRESS", ctx.registry_address),
        governance_address=pick("ARM_GOVERNANCE_ADDRESS", ctx.governance_address),
        telemetry_address=pick("ARM_TELEMETRY_ADDRESS", ctx.telemetry_address),
        api_key=e.get("ARM_API_KEY") or ctx.api_key)
