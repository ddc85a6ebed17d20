"""Service configuration from environment variables: a frozen dataclass, validated at start.
A bad value fails fast with a message naming the variable."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from arm_common.tls import TlsSettings


class ConfigError(Exception):
    """A configuration variable is missing or malformed; the message names it."""


class FileSettings(Mapping[str, str]):
    """The environment, where a setting X may also be given as X_FILE: the path of a file holding
    the value (a Docker or Kubernetes secret), stripped of one trailing newline. Setting both is
    an error. Names that end in _FILE themselves (e.g. TLS key paths) are paths already. A value
    read from a file is never logged nor put in an error message."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def __getitem__(self, name: str) -> str:
        file_name = f"{name}_FILE"
        path = None if name.endswith("_FILE") else self.env.get(file_name)
        if not path:
            return self.env[name]
        if self.env.get(name):
            raise ConfigError(f"{name} and {file_name} are both set: set one of them")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file_name}: cannot read {path!r} ({type(exc).__name__})") from None
        return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text

    def __iter__(self) -> Iterator[str]:
        names = set(self.env)
        names.update(n[:-5] for n in self.env if n.endswith("_FILE") and self.env[n])
        return iter(names)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def settings(env: Mapping[str, str] | None = None) -> Mapping[str, str]:
    """The process environment (or `env`), with X_FILE forms resolved (see FileSettings)."""
    env = os.environ if env is None else env
    return env if isinstance(env, FileSettings) else FileSettings(env)


DEFAULT_PORTS = {"registry": 50051, "governance": 50052, "telemetry": 50053, "allinone": 50051}


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(env: Mapping[str, str], name: str) -> tuple[Network, ...]:
    """Comma-separated CIDRs (or single addresses)."""
    out: list[Network] = []
    for part in (p.strip() for p in (env.get(name) or "").split(",")):
        if part:
            try:
                out.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ConfigError(f"{name}: {part!r} is not a network (a CIDR such as 10.0.0.0/8) "
                                  "or an address") from None
    return tuple(out)


def _workers(env: Mapping[str, str], share_port: bool) -> int:
    raw = env.get("ARM_WORKERS")
    if raw is None or raw == "":
        return 1
    if not raw.strip().isdigit() or not 1 <= int(raw) <= 256:
        raise ConfigError(f"ARM_WORKERS must be a whole number from 1 to 256, got {raw!r}")
    workers = int(raw)
    if workers > 1 and not share_port and env.get("ARM_SHARE_PORT"):
        raise ConfigError("ARM_WORKERS > 1 shares the port among the workers: unset ARM_SHARE_PORT=false")
    return workers


def _address(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    raw = env.get(name) or default
    if raw is None:
        return None
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name} must be host:port, got {raw!r}")
    return raw


def _database_url(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name) or default
    if not raw.startswith(("sqlite", "postgresql", "postgres")):
        shown = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", raw)  # never the password
        raise ConfigError(f"{name} must be a sqlite:// or postgresql:// URL, got {shown!r}")
    return raw


def _console_url(env: Mapping[str, str]) -> str:
    raw = (env.get("ARM_CONSOLE_URL") or "http://127.0.0.1:8080").rstrip("/")
    if not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?", raw):
        raise ConfigError(f"ARM_CONSOLE_URL must be an http:// or https:// URL, got {raw!r}")
    return raw


@dataclass(frozen=True)
class ServiceConfig:
    """Settings of one service process (or of the all-in-one dev server)."""

    service: str
    """Which service: registry, governance, telemetry or allinone."""
    listen: str
    """host:port to serve on (`ARM_<SERVICE>_LISTEN`, then `ARM_LISTEN`); port 0 picks one."""
    database_url: str
    """SQLAlchemy URL (`ARM_<SERVICE>_DATABASE_URL`, then `ARM_DATABASE_URL`); default a SQLite
    file under `ARM_DATA_DIR` (default `.arm`)."""
    database_schema: str | None
    """PostgreSQL schema to use (`ARM_DATABASE_SCHEMA`); default the server's search_path."""
    data_dir: str
    """Folder for SQLite files and the dev admin key (`ARM_DATA_DIR`, default `.arm`)."""
    compat_mode: bool
    """`ARM_COMPAT_MODE` (default true): prefer legacy agent ids over instance ids in lookups."""
    registry_address: str | None
    """Where registry serves (`ARM_REGISTRY_ADDRESS`), for the other services."""
    governance_address: str | None
    """Where governance serves (`ARM_GOVERNANCE_ADDRESS`): the outbox delivers change records there."""
    telemetry_address: str | None
    """Where telemetry serves (`ARM_TELEMETRY_ADDRESS`): the outbox delivers opEvents there."""
    service_api_key: str | None
    """Key the service presents when it calls another service (`ARM_SERVICE_API_KEY`). The
    registry provisions it as a system-tenant admin key on start (see `bootstrap_admin_key`)."""
    auth_cache_ttl_s: float
    """How long an authenticated key is trusted before it is looked up again
    (`ARM_AUTH_CACHE_TTL_S`, default 5)."""
    shutdown_grace_s: float
    """Seconds in-flight calls get to finish on SIGTERM (`ARM_SHUTDOWN_GRACE_S`, default 10)."""
    outbox_poll_s: float
    """How often the outbox relay looks for undelivered messages (`ARM_OUTBOX_POLL_S`, default 1)."""
    approval_sweep_s: float = 30.0
    """How often governance expires and escalates due approvals (`ARM_APPROVAL_SWEEP_S`,
    default 30); every replica sweeps, each change is made once."""
    share_port: bool = False
    """`ARM_SHARE_PORT` (default false): let several processes serve the same port (SO_REUSEPORT,
    the kernel spreads new connections among them), for identical workers of one deployment only.
    Off, starting on a port already in use fails with a message naming the address."""
    audit_signing_key_file: str | None = None
    """Ed25519 private key (PEM, PKCS#8) governance signs audit checkpoints with
    (`ARM_AUDIT_SIGNING_KEY_FILE`); unset, one is generated at `<data_dir>/audit-signing-key.pem`
    (development only: the key must live outside the database's reach)."""
    migrate_database_url: str | None = None
    """URL `migrate` connects with, as the schema's owner (`ARM_<SERVICE>_MIGRATE_DATABASE_URL`,
    then `ARM_MIGRATE_DATABASE_URL`); unset = `database_url`. When its PostgreSQL user differs
    from `database_url`'s, migrate grants that (application) role only the DML the service needs."""
    audit_checkpoint_interval_s: float = 300.0
    """How often governance signs every tenant's moved chain head (`ARM_AUDIT_CHECKPOINT_INTERVAL_S`,
    default 300; 0 = only on demand through CreateCheckpoint)."""
    workers: int = 1
    """`ARM_WORKERS` (default 1): processes of this service serving its one port. Above 1,
    `python -m arm_<service>` starts that many workers sharing the port (implies
    ARM_SHARE_PORT; the kernel spreads new connections among them) and stops them together."""
    bootstrap_admin_key: str | None = None
    """`ARM_BOOTSTRAP_ADMIN_KEY` (registry): a key minted with `python -m arm_registry genkey`
    that the registry provisions, on start, as the system tenant's admin key (only its hash is
    stored; the system tenant is created if missing). Like every setting, also as `..._FILE`."""
    tls: TlsSettings = field(default_factory=TlsSettings)
    """TLS files (`ARM_TLS_*`, see arm_common.tls); all unset, plaintext."""
    health_probe_s: float = 5.0
    """How often readiness probes the database and required peers (`ARM_HEALTH_PROBE_S`,
    default 5); health turns NOT_SERVING at once when a call meets a dead database."""
    console_url: str = "http://127.0.0.1:8080"
    """Where the web console serves (`ARM_CONSOLE_URL`, default http://127.0.0.1:8080): webhook
    notifications link to `<console_url>/approvals/<approval_id>`."""
    webhook_secret_key_file: str | None = None
    """Fernet key (urlsafe base64 of 32 bytes) governance encrypts stored webhook secrets with
    (`ARM_WEBHOOK_SECRET_KEY_FILE`); unset, one derived from `ARM_SERVICE_API_KEY`, or without
    that one generated at `<data_dir>/webhook-secret-key` (development). Every replica needs the
    same key."""
    webhook_timeout_s: float = 10.0
    """Seconds one webhook delivery attempt may take, connecting included (`ARM_WEBHOOK_TIMEOUT_S`,
    default 10)."""
    webhook_max_backoff_s: float = 600.0
    """Longest wait between attempts of a failing delivery (`ARM_WEBHOOK_MAX_BACKOFF_S`, default
    600); the wait doubles from 1 s up to it."""
    decision_gather_ms: float = 1.0
    """Governance: how long a busy decision log may hold a group commit open for more decisions
    (`ARM_DECISION_GATHER_MS`, default 1; 0 = never wait). It waits only while the process has
    other work to run (calls being decided that may join the batch), so a lone caller, or a few
    callers all waiting on the log, never waits; see
    arm_governance.decisions.log.DecisionLog._gather."""
    webhook_allowed_networks: tuple[Network, ...] = ()
    """Networks webhook deliveries may reach besides public addresses (`ARM_WEBHOOK_ALLOWED_NETWORKS`,
    comma-separated CIDRs; default none: loopback, private, link-local and reserved addresses are
    refused, so a tenant's webhook cannot reach into governance's own network)."""

    @classmethod
    def from_env(cls, service: str, env: Mapping[str, str] | None = None) -> ServiceConfig:
        env = settings(env)
        prefix = f"ARM_{service.upper()}_"
        data_dir = env.get("ARM_DATA_DIR") or ".arm"
        default_db = f"sqlite+aiosqlite:///{data_dir}/{service}.db"
        listen_name = f"{prefix}LISTEN" if env.get(f"{prefix}LISTEN") else "ARM_LISTEN"
        db_name = f"{prefix}DATABASE_URL" if env.get(f"{prefix}DATABASE_URL") else "ARM_DATABASE_URL"
        migrate_name = f"{prefix}MIGRATE_DATABASE_URL" if env.get(f"{prefix}MIGRATE_DATABASE_URL") \
            else "ARM_MIGRATE_DATABASE_URL"
        listen = _address(env, listen_name, f"127.0.0.1:{DEFAULT_PORTS.get(service, 50051)}")
        assert listen is not None
        share_port = _bool(env, "ARM_SHARE_PORT", False)
        workers = _workers(env, share_port)
        if workers > 1 and listen.endswith(":0"):
            raise ConfigError(f"ARM_WORKERS > 1 needs a fixed port to share, not {listen!r}")
        return cls(
            service=service,
            listen=listen,
            database_url=_database_url(env, db_name, default_db),
            database_schema=env.get("ARM_DATABASE_SCHEMA") or None,
            data_dir=data_dir,
            compat_mode=_bool(env, "ARM_COMPAT_MODE", True),
            registry_address=_address(env, "ARM_REGISTRY_ADDRESS", None),
            governance_address=_address(env, "ARM_GOVERNANCE_ADDRESS", None),
            telemetry_address=_address(env, "ARM_TELEMETRY_ADDRESS", None),
            service_api_key=env.get("ARM_SERVICE_API_KEY") or None,
            auth_cache_ttl_s=_float(env, "ARM_AUTH_CACHE_TTL_S", 5.0),
            shutdown_grace_s=_float(env, "ARM_SHUTDOWN_GRACE_S", 10.0),
            outbox_poll_s=_float(env, "ARM_OUTBOX_POLL_S", 1.0, minimum=0.01),
            approval_sweep_s=_float(env, "ARM_APPROVAL_SWEEP_S", 30.0, minimum=0.01),
            audit_signing_key_file=env.get("ARM_AUDIT_SIGNING_KEY_FILE") or None,
            migrate_database_url=_database_url(env, migrate_name, "") if env.get(migrate_name) else None,
            audit_checkpoint_interval_s=_float(env, "ARM_AUDIT_CHECKPOINT_INTERVAL_S", 300.0),
            share_port=share_port or workers > 1,
            workers=workers,
            bootstrap_admin_key=env.get("ARM_BOOTSTRAP_ADMIN_KEY") or None,
            tls=TlsSettings.from_env(env),
            health_probe_s=_float(env, "ARM_HEALTH_PROBE_S", 5.0, minimum=0.01),
            decision_gather_ms=_float(env, "ARM_DECISION_GATHER_MS", 1.0),
            console_url=_console_url(env),
            webhook_secret_key_file=env.get("ARM_WEBHOOK_SECRET_KEY_FILE") or None,
            webhook_timeout_s=_float(env, "ARM_WEBHOOK_TIMEOUT_S", 10.0, minimum=0.1),
            webhook_max_backoff_s=_float(env, "ARM_WEBHOOK_MAX_BACKOFF_S", 600.0, minimum=0.01),
            webhook_allowed_networks=_networks(env, "ARM_WEBHOOK_ALLOWED_NETWORKS"),
        )
