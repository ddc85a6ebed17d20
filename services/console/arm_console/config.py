"""The console's settings, from the environment like every ARM service (each also as `X_FILE`).

- `ARM_CONSOLE_LISTEN`: host:port of the web server (default 127.0.0.1:8080; port 0 picks one).
- `ARM_CONSOLE_SESSION_SECRET`: the secret session cookies are encrypted and signed with (at
  least 32 characters). Unset: one is generated once into `<ARM_DATA_DIR>/console-session-secret`
  (mode 0600), for development; replicas behind one address must share the same secret.
- `ARM_CONSOLE_SESSION_TTL_S`: how long a sign-in lasts (default 28800, 8 hours).
- `ARM_CONSOLE_TLS_CERT_FILE` / `ARM_CONSOLE_TLS_KEY_FILE`: serve HTTPS with them.
- `ARM_CONSOLE_SECURE_COOKIE`: mark the cookie `Secure` even on plain HTTP (behind a proxy that
  terminates TLS); it is always `Secure` when the console serves HTTPS itself.
- Where the services are: `ARM_ADDRESS` or `ARM_REGISTRY_ADDRESS` / `ARM_GOVERNANCE_ADDRESS` /
  `ARM_TELEMETRY_ADDRESS`, `ARM_TLS_CA_FILE` … exactly as for the SDK (`arm_client.Settings`).
  The console has no key of its own: every call carries the signed-in user's key."""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from arm_client.connection import Settings
from arm_common.config import ConfigError, settings

log = logging.getLogger("arm_console")

DEFAULT_LISTEN = "127.0.0.1:8080"
MIN_SECRET_CHARS = 32


@dataclass(frozen=True)
class ConsoleConfig:
    listen: str
    session_secret: str
    session_ttl_s: float
    services: Settings
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    secure_cookie: bool = False

    @property
    def serves_tls(self) -> bool:
        return bool(self.tls_cert_file)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, services: Settings | None = None) -> ConsoleConfig:
        e = settings(env)
        listen = e.get("ARM_CONSOLE_LISTEN") or DEFAULT_LISTEN
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"ARM_CONSOLE_LISTEN must be host:port, got {listen!r}")
        raw_ttl = e.get("ARM_CONSOLE_SESSION_TTL_S") or "28800"
        try:
            ttl = float(raw_ttl)
        except ValueError:
            raise ConfigError(f"ARM_CONSOLE_SESSION_TTL_S must be a number of seconds, got {raw_ttl!r}") from None
        if not 1 <= ttl <= 30 * 86400:
            raise ConfigError(f"ARM_CONSOLE_SESSION_TTL_S must be from 1 to 2592000, got {raw_ttl!r}")
        secret = e.get("ARM_CONSOLE_SESSION_SECRET") or ""
        if secret and len(secret) < MIN_SECRET_CHARS:
            raise ConfigError(f"ARM_CONSOLE_SESSION_SECRET must be at least {MIN_SECRET_CHARS} characters")
        if not secret:
            path = Path(e.get("ARM_DATA_DIR") or ".arm") / "console-session-secret"
            secret = dev_secret(path)
            log.warning("console session secret from %s (development only: set ARM_CONSOLE_SESSION_SECRET_FILE, "
                        "the same for every console replica)", path)
        cert, key = e.get("ARM_CONSOLE_TLS_CERT_FILE") or None, e.get("ARM_CONSOLE_TLS_KEY_FILE") or None
        if bool(cert) != bool(key):
            raise ConfigError("ARM_CONSOLE_TLS_CERT_FILE and ARM_CONSOLE_TLS_KEY_FILE go together")
        secure = (e.get("ARM_CONSOLE_SECURE_COOKIE") or "false").strip().lower()
        if secure not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"ARM_CONSOLE_SECURE_COOKIE must be true or false, got {secure!r}")
        if services is None:
            try:
                services = Settings.from_env(e, api_key="")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        # The console never calls with a key of its own, whatever ARM_API_KEY says.
        services = dataclasses.replace(services, api_key=None)
        return cls(listen=listen, session_secret=secret, session_ttl_s=ttl, services=services,
                   tls_cert_file=cert, tls_key_file=key, secure_cookie=secure in ("true", "1", "yes"))


def dev_secret(path: Path) -> str:
    """The development session secret: read from `path`, or generated into it (0600) once."""
    try:
        text = path.read_text().strip()
        if len(text) >= MIN_SECRET_CHARS:
            return text
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.chmod(path, 0o600)
    return secret
