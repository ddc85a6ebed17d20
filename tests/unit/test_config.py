"""Service configuration from environment variables (SPEC §5 "configuration from environment
variables"; STYLE: validated at start, fails fast with a message naming the variable)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from arm_common.config import ConfigError, ServiceConfig

SERVICES = ["registry", "governance", "telemetry", "allinone"]


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    assert host and re.fullmatch(r"\d+", port), address
    return host, int(port)


@pytest.mark.parametrize("service", SERVICES)
def test_defaults(service: str) -> None:
    config = ServiceConfig.from_env(service, env={})
    assert config.service == service
    host, port = _host_port(config.listen)
    assert host in ("127.0.0.1", "localhost")  # nothing exposed by default
    assert 0 < port <= 65535
    assert config.data_dir == ".arm"
    assert config.database_url.startswith("sqlite")
    assert f"{config.data_dir}/{service}" in config.database_url
    assert config.database_schema is None
    assert config.compat_mode is True  # SPEC §2: ARM_COMPAT_MODE defaults to true
    assert config.registry_address is None
    assert config.governance_address is None
    assert config.telemetry_address is None
    assert config.service_api_key is None
    assert config.auth_cache_ttl_s == 5.0
    assert config.shutdown_grace_s == 10.0
    assert config.outbox_poll_s == 1.0
    assert config.approval_sweep_s == 30.0


def test_services_default_to_different_ports() -> None:
    # The three services run side by side on one machine in development.
    ports = {_host_port(ServiceConfig.from_env(s, env={}).listen)[1]
             for s in ("registry", "governance", "telemetry")}
    assert len(ports) == 3


def test_services_default_to_different_databases() -> None:
    urls = {ServiceConfig.from_env(s, env={}).database_url for s in ("registry", "governance", "telemetry")}
    assert len(urls) == 3


def test_data_dir_moves_the_default_database() -> None:
    config = ServiceConfig.from_env("registry", env={"ARM_DATA_DIR": "/var/lib/arm"})
    assert config.data_dir == "/var/lib/arm"
    assert config.database_url.startswith("sqlite")
    assert "/var/lib/arm/registry" in config.database_url


def test_config_is_frozen() -> None:
    config = ServiceConfig.from_env("registry", env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen = "0.0.0.0:1"  # type: ignore[misc]


def test_reads_os_environ_when_no_env_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARM_REGISTRY_LISTEN", "127.0.0.1:6123")
    monkeypatch.setenv("ARM_COMPAT_MODE", "false")
    config = ServiceConfig.from_env("registry")
    assert config.listen == "127.0.0.1:6123"
    assert config.compat_mode is False


# --- per-service variables beat generic ones -------------------------------------------------------

def test_service_database_url_beats_generic() -> None:
    env = {"ARM_DATABASE_URL": "postgresql+asyncpg://u@h/generic",
           "ARM_REGISTRY_DATABASE_URL": "postgresql+asyncpg://u@h/registry"}
    assert ServiceConfig.from_env("registry", env=env).database_url == "postgresql+asyncpg://u@h/registry"
    # Another service's variable is ignored.
    assert ServiceConfig.from_env("governance", env=env).database_url == "postgresql+asyncpg://u@h/generic"


def test_generic_database_url_is_used_alone() -> None:
    env = {"ARM_DATABASE_URL": "sqlite+aiosqlite:///tmp/x.db"}
    assert ServiceConfig.from_env("telemetry", env=env).database_url == "sqlite+aiosqlite:///tmp/x.db"


def test_service_listen_beats_generic() -> None:
    env = {"ARM_LISTEN": "0.0.0.0:7000", "ARM_REGISTRY_LISTEN": "0.0.0.0:7001"}
    assert ServiceConfig.from_env("registry", env=env).listen == "0.0.0.0:7001"
    assert ServiceConfig.from_env("governance", env=env).listen == "0.0.0.0:7000"


def test_empty_service_variable_falls_back_to_generic() -> None:
    env = {"ARM_LISTEN": "0.0.0.0:7000", "ARM_REGISTRY_LISTEN": "",
           "ARM_DATABASE_URL": "sqlite:///g.db", "ARM_REGISTRY_DATABASE_URL": ""}
    config = ServiceConfig.from_env("registry", env=env)
    assert config.listen == "0.0.0.0:7000"
    assert config.database_url == "sqlite:///g.db"


def test_good_service_value_hides_a_bad_generic_one() -> None:
    env = {"ARM_LISTEN": "nonsense", "ARM_REGISTRY_LISTEN": "127.0.0.1:7001"}
    assert ServiceConfig.from_env("registry", env=env).listen == "127.0.0.1:7001"


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:50051", "[::1]:0", "localhost:65535",
                                    "my-host.internal:8080"])
def test_listen_addresses_accepted(listen: str) -> None:
    assert ServiceConfig.from_env("registry", env={"ARM_LISTEN": listen}).listen == listen


@pytest.mark.parametrize("url", ["sqlite+aiosqlite:///./x.db", "sqlite:///:memory:",
                                 "postgresql+asyncpg://arm:pw@db:5432/arm",
                                 "postgresql://arm@db/arm"])
def test_database_urls_accepted(url: str) -> None:
    assert ServiceConfig.from_env("registry", env={"ARM_DATABASE_URL": url}).database_url == url


def test_other_variables_are_read() -> None:
    env = {"ARM_DATABASE_SCHEMA": "test_123", "ARM_REGISTRY_ADDRESS": "reg:1",
           "ARM_GOVERNANCE_ADDRESS": "gov:2", "ARM_TELEMETRY_ADDRESS": "tel:3",
           "ARM_SERVICE_API_KEY": "arm_key_x_y", "ARM_AUTH_CACHE_TTL_S": "0",
           "ARM_SHUTDOWN_GRACE_S": "2.5", "ARM_OUTBOX_POLL_S": "0.05", "ARM_APPROVAL_SWEEP_S": "0.5"}
    config = ServiceConfig.from_env("governance", env=env)
    assert config.database_schema == "test_123"
    assert (config.registry_address, config.governance_address, config.telemetry_address) == (
        "reg:1", "gov:2", "tel:3")
    assert config.service_api_key == "arm_key_x_y"
    assert config.auth_cache_ttl_s == 0.0
    assert config.shutdown_grace_s == 2.5
    assert config.outbox_poll_s == 0.05
    assert config.approval_sweep_s == 0.5


@pytest.mark.parametrize(("raw", "expected"), [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True), (" True ", True),
    ("false", False), ("False", False), ("0", False), ("no", False), ("off", False),
    ("", True),
])
def test_compat_mode_values(raw: str, expected: bool) -> None:
    assert ServiceConfig.from_env("registry", env={"ARM_COMPAT_MODE": raw}).compat_mode is expected


# --- bad values fail fast, naming the variable ----------------------------------------------------

BAD = [
    ({"ARM_COMPAT_MODE": "maybe"}, "ARM_COMPAT_MODE"),
    ({"ARM_COMPAT_MODE": "2"}, "ARM_COMPAT_MODE"),
    ({"ARM_REGISTRY_LISTEN": "nonsense"}, "ARM_REGISTRY_LISTEN"),
    ({"ARM_REGISTRY_LISTEN": "nonsense", "ARM_LISTEN": "127.0.0.1:1"}, "ARM_REGISTRY_LISTEN"),
    ({"ARM_LISTEN": "nonsense"}, "ARM_LISTEN"),
    ({"ARM_LISTEN": ":50051"}, "ARM_LISTEN"),
    ({"ARM_LISTEN": "host:"}, "ARM_LISTEN"),
    ({"ARM_LISTEN": "host:http"}, "ARM_LISTEN"),
    ({"ARM_LISTEN": "host:65536"}, "ARM_LISTEN"),
    ({"ARM_LISTEN": "host:-1"}, "ARM_LISTEN"),
    ({"ARM_DATABASE_URL": "mysql://x"}, "ARM_DATABASE_URL"),
    ({"ARM_DATABASE_URL": "/tmp/arm.db"}, "ARM_DATABASE_URL"),
    ({"ARM_REGISTRY_DATABASE_URL": "mysql://x"}, "ARM_REGISTRY_DATABASE_URL"),
    ({"ARM_REGISTRY_DATABASE_URL": "mysql://x", "ARM_DATABASE_URL": "sqlite:///ok.db"},
     "ARM_REGISTRY_DATABASE_URL"),
    ({"ARM_AUTH_CACHE_TTL_S": "abc"}, "ARM_AUTH_CACHE_TTL_S"),
    ({"ARM_AUTH_CACHE_TTL_S": "-1"}, "ARM_AUTH_CACHE_TTL_S"),
    ({"ARM_AUTH_CACHE_TTL_S": "5s"}, "ARM_AUTH_CACHE_TTL_S"),
    ({"ARM_SHUTDOWN_GRACE_S": "soon"}, "ARM_SHUTDOWN_GRACE_S"),
    ({"ARM_SHUTDOWN_GRACE_S": "-0.5"}, "ARM_SHUTDOWN_GRACE_S"),
    ({"ARM_OUTBOX_POLL_S": "0"}, "ARM_OUTBOX_POLL_S"),
    ({"ARM_OUTBOX_POLL_S": "x"}, "ARM_OUTBOX_POLL_S"),
    ({"ARM_APPROVAL_SWEEP_S": "0"}, "ARM_APPROVAL_SWEEP_S"),
    ({"ARM_APPROVAL_SWEEP_S": "often"}, "ARM_APPROVAL_SWEEP_S"),
    ({"ARM_REGISTRY_ADDRESS": "registry"}, "ARM_REGISTRY_ADDRESS"),
    ({"ARM_GOVERNANCE_ADDRESS": "gov:port"}, "ARM_GOVERNANCE_ADDRESS"),
    ({"ARM_TELEMETRY_ADDRESS": ":1"}, "ARM_TELEMETRY_ADDRESS"),
]


@pytest.mark.parametrize(("env", "variable"), BAD, ids=[f"{v}={e[v]}" for e, v in BAD])
def test_bad_value_names_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ServiceConfig.from_env("registry", env=env)
    message = str(caught.value)
    assert variable in message
    # The offending value is shown too, so the operator can see what was read.
    assert env[variable] in message


@pytest.mark.parametrize("variable", ["ARM_AUTH_CACHE_TTL_S", "ARM_SHUTDOWN_GRACE_S",
                                      "ARM_OUTBOX_POLL_S", "ARM_APPROVAL_SWEEP_S"])
def test_nan_seconds_are_refused(variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ServiceConfig.from_env("registry", env={variable: "nan"})
    assert variable in str(caught.value)


def test_migrate_url_and_audit_checkpoint_settings() -> None:
    config = ServiceConfig.from_env("governance", env={})
    assert config.migrate_database_url is None and config.audit_signing_key_file is None
    assert config.audit_checkpoint_interval_s == 300.0
    config = ServiceConfig.from_env("governance", env={
        "ARM_MIGRATE_DATABASE_URL": "postgresql://owner@db/arm",
        "ARM_GOVERNANCE_MIGRATE_DATABASE_URL": "postgresql://gov_owner@db/arm_gov",
        "ARM_AUDIT_SIGNING_KEY_FILE": "/etc/arm/key.pem", "ARM_AUDIT_CHECKPOINT_INTERVAL_S": "0"})
    assert config.migrate_database_url == "postgresql://gov_owner@db/arm_gov"  # the service's own first
    assert config.audit_signing_key_file == "/etc/arm/key.pem" and config.audit_checkpoint_interval_s == 0
    assert ServiceConfig.from_env("registry", env={"ARM_MIGRATE_DATABASE_URL": "postgresql://owner@db/arm"}
                                  ).migrate_database_url == "postgresql://owner@db/arm"
    with pytest.raises(ConfigError, match="ARM_GOVERNANCE_MIGRATE_DATABASE_URL"):
        ServiceConfig.from_env("governance", env={"ARM_GOVERNANCE_MIGRATE_DATABASE_URL": "mysql://x"})
    with pytest.raises(ConfigError, match="ARM_AUDIT_CHECKPOINT_INTERVAL_S"):
        ServiceConfig.from_env("governance", env={"ARM_AUDIT_CHECKPOINT_INTERVAL_S": "-1"})
