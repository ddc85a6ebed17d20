"""Every setting X may be given as X_FILE (issue 14 item 2): secrets come from files (Docker or
Kubernetes secrets) and are never echoed in error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from arm_common.config import ConfigError, FileSettings, ServiceConfig


def _file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_secret_settings_from_files(tmp_path: Path) -> None:
    env = {"ARM_SERVICE_API_KEY_FILE": _file(tmp_path, "key", "arm_key_abc_secret\n"),
           "ARM_REGISTRY_DATABASE_URL_FILE": _file(tmp_path, "url", "postgresql://u:pw@h/db\n"),
           "ARM_BOOTSTRAP_ADMIN_KEY_FILE": _file(tmp_path, "admin", "arm_key_def_other")}
    config = ServiceConfig.from_env("registry", env)
    assert config.service_api_key == "arm_key_abc_secret"
    assert config.database_url == "postgresql://u:pw@h/db"
    assert config.bootstrap_admin_key == "arm_key_def_other"
    # The generic form counts as set, so it does not hide the service-specific one.
    env["ARM_DATABASE_URL"] = "sqlite+aiosqlite:///other.db"
    assert ServiceConfig.from_env("registry", env).database_url == "postgresql://u:pw@h/db"


@pytest.mark.parametrize(("text", "value"), [("v\n", "v"), ("v\r\n", "v"), ("v\n\n", "v\n"), ("v", "v"),
                                             ("  v \n", "  v ")])
def test_exactly_one_trailing_newline_is_stripped(tmp_path: Path, text: str, value: str) -> None:
    assert FileSettings({"X_FILE": _file(tmp_path, "x", text)})["X"] == value


def test_both_forms_set_is_an_error(tmp_path: Path) -> None:
    env = {"ARM_SERVICE_API_KEY": "arm_key_a_b", "ARM_SERVICE_API_KEY_FILE": _file(tmp_path, "k", "arm_key_c_d")}
    with pytest.raises(ConfigError) as caught:
        ServiceConfig.from_env("registry", env)
    message = str(caught.value)
    assert "ARM_SERVICE_API_KEY and ARM_SERVICE_API_KEY_FILE are both set" in message
    assert "arm_key_a_b" not in message and "arm_key_c_d" not in message


def test_unreadable_file_names_the_variable_and_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError) as caught:
        ServiceConfig.from_env("registry", {"ARM_SERVICE_API_KEY_FILE": missing})
    assert "ARM_SERVICE_API_KEY_FILE" in str(caught.value) and missing in str(caught.value)


def test_a_bad_database_url_from_a_file_is_not_echoed(tmp_path: Path) -> None:
    env = {"ARM_DATABASE_URL_FILE": _file(tmp_path, "url", "mysql://user:hunter2@h/db\n")}
    with pytest.raises(ConfigError) as caught:
        ServiceConfig.from_env("registry", env)
    assert "ARM_DATABASE_URL" in str(caught.value) and "hunter2" not in str(caught.value)


def test_names_ending_in_FILE_are_paths_not_file_forms(tmp_path: Path) -> None:
    path = _file(tmp_path, "cert.pem", "PEM")
    settings = FileSettings({"ARM_TLS_CERT_FILE": path, "ARM_TLS_CERT_FILE_FILE": path})
    assert settings["ARM_TLS_CERT_FILE"] == path
    assert "ARM_TLS_CERT_FILE" in set(settings)


def test_empty_file_variable_is_unset() -> None:
    config = ServiceConfig.from_env("registry", {"ARM_SERVICE_API_KEY_FILE": "", "ARM_SERVICE_API_KEY": "k"})
    assert config.service_api_key == "k"


def test_service_specific_settings_take_the_file_form_too(tmp_path: Path) -> None:
    from arm_telemetry.app import TelemetrySettings

    env = {"ARM_TELEMETRY_RETENTION_DAYS_FILE": _file(tmp_path, "days", "7\n")}
    assert TelemetrySettings.from_env(env).retention_days == 7.0
