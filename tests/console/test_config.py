"""The console's settings: like every service's (environment, `X_FILE` secrets), failing fast
with the variable's name; the development session secret is generated once, owner-only."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from arm_common.config import ConfigError
from arm_console.config import ConsoleConfig


def test_settings_from_the_environment_and_files(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 40 + "\n")
    config = ConsoleConfig.from_env({"ARM_CONSOLE_SESSION_SECRET_FILE": str(secret),
                                     "ARM_CONSOLE_LISTEN": "0.0.0.0:9000", "ARM_CONSOLE_SESSION_TTL_S": "60",
                                     "ARM_ADDRESS": "10.0.0.1:50051", "ARM_API_KEY": "arm_key_x_y"})
    assert config.session_secret == "s" * 40 and config.listen == "0.0.0.0:9000" and config.session_ttl_s == 60
    assert config.services.registry_address == "10.0.0.1:50051"
    assert config.services.api_key is None  # never a key of its own, whatever ARM_API_KEY says
    assert not config.secure_cookie and not config.serves_tls


@pytest.mark.parametrize(("env", "name"), [
    ({"ARM_CONSOLE_LISTEN": "nonsense"}, "ARM_CONSOLE_LISTEN"),
    ({"ARM_CONSOLE_SESSION_SECRET": "short"}, "ARM_CONSOLE_SESSION_SECRET"),
    ({"ARM_CONSOLE_SESSION_TTL_S": "0"}, "ARM_CONSOLE_SESSION_TTL_S"),
    ({"ARM_CONSOLE_SESSION_TTL_S": "soon"}, "ARM_CONSOLE_SESSION_TTL_S"),
    ({"ARM_CONSOLE_TLS_CERT_FILE": "/x.pem"}, "ARM_CONSOLE_TLS_KEY_FILE"),
    ({"ARM_CONSOLE_SECURE_COOKIE": "maybe"}, "ARM_CONSOLE_SECURE_COOKIE"),
    ({"ARM_CONSOLE_SESSION_SECRET": "s" * 40, "ARM_CONSOLE_SESSION_SECRET_FILE": "/x"}, "ARM_CONSOLE_SESSION_SECRET"),
])
def test_bad_settings_name_their_variable(env: dict[str, str], name: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=name):
        ConsoleConfig.from_env({"ARM_DATA_DIR": str(tmp_path), **env})


def test_the_development_secret_is_generated_once_owner_only(tmp_path: Path) -> None:
    first = ConsoleConfig.from_env({"ARM_DATA_DIR": str(tmp_path)}).session_secret
    path = tmp_path / "console-session-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(first) >= 32
    assert ConsoleConfig.from_env({"ARM_DATA_DIR": str(tmp_path)}).session_secret == first
