"""TLS for servers and channels, and how every channel finds its peers.

Server side: `server_credentials` serves TLS with the certificate and key of `ARM_TLS_CERT_FILE` /
`ARM_TLS_KEY_FILE`, requiring a client certificate signed by `ARM_TLS_CLIENT_CA_FILE` when that is
set (mTLS). The files are re-read when their modification time changes: every new connection's
handshake asks for the current configuration, so a rotated certificate is served without a restart.

Client side: `open_channel` opens a channel to `dns:///host:port` with the `round_robin` policy,
so a client spreads its calls over every address the name resolves to (every replica behind a
headless Service). With `ARM_TLS_CA_FILE` it verifies the server against that CA and, when
`ARM_TLS_CERT_FILE` / `ARM_TLS_KEY_FILE` are set, presents them as its client certificate. Client
certificates are read when a channel is opened: a long-lived inter-service channel keeps the
certificate it started with until the process restarts (only the server side reloads)."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import ssl
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

ROUND_ROBIN_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
"""The service config every channel opened here uses: calls spread over all resolved addresses."""


@dataclass(frozen=True)
class TlsSettings:
    """TLS files of one process (all unset: plaintext)."""

    cert_file: str | None = None
    """PEM certificate chain the server presents, and the client presents under mTLS
    (`ARM_TLS_CERT_FILE`)."""
    key_file: str | None = None
    """PEM private key of `cert_file` (`ARM_TLS_KEY_FILE`)."""
    client_ca_file: str | None = None
    """PEM CA bundle client certificates must chain to; set, the server requires one
    (`ARM_TLS_CLIENT_CA_FILE`)."""
    ca_file: str | None = None
    """PEM CA bundle this process verifies the servers it calls against; set, every outgoing
    channel uses TLS (`ARM_TLS_CA_FILE`)."""
    server_name: str | None = None
    """Name to verify in the server's certificate instead of the host of the address
    (`ARM_TLS_SERVER_NAME`), e.g. when the address is an IP the certificate does not name."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TlsSettings:
        from arm_common.config import ConfigError  # config imports this module

        env = os.environ if env is None else env

        def path(name: str) -> str | None:
            raw = env.get(name) or None
            if raw is not None and not Path(raw).is_file():
                raise ConfigError(f"{name} must name a readable file, got {raw!r}")
            return raw

        settings = cls(cert_file=path("ARM_TLS_CERT_FILE"), key_file=path("ARM_TLS_KEY_FILE"),
                       client_ca_file=path("ARM_TLS_CLIENT_CA_FILE"), ca_file=path("ARM_TLS_CA_FILE"),
                       server_name=env.get("ARM_TLS_SERVER_NAME") or None)
        if bool(settings.cert_file) != bool(settings.key_file):
            raise ConfigError("ARM_TLS_CERT_FILE and ARM_TLS_KEY_FILE must be set together")
        if settings.client_ca_file and not settings.cert_file:
            raise ConfigError("ARM_TLS_CLIENT_CA_FILE needs ARM_TLS_CERT_FILE and ARM_TLS_KEY_FILE "
                              "(mTLS is served over TLS)")
        return settings

    @property
    def serves_tls(self) -> bool:
        return self.cert_file is not None and self.key_file is not None

    @property
    def dials_tls(self) -> bool:
        return self.ca_file is not None


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


class _ReloadingCertificates:
    """The certificate configuration fetcher: grpc calls it at every handshake; it answers a
    new configuration when a file's modification time changed, else None (keep the current)."""

    def __init__(self, settings: TlsSettings) -> None:
        assert settings.cert_file and settings.key_file
        self.files = [f for f in (settings.cert_file, settings.key_file, settings.client_ca_file) if f]
        self.settings = settings
        self.lock = threading.Lock()
        self.stamps = self._stamps()
        self.initial = self._configuration()

    def _stamps(self) -> tuple[int, ...]:
        return tuple(os.stat(f).st_mtime_ns for f in self.files)

    def _configuration(self) -> Any:
        s = self.settings
        assert s.cert_file and s.key_file
        # grpc checks the files only at a handshake; load them here so a broken or mismatched
        # pair (e.g. the certificate replaced, the key not yet) is refused before it is served.
        check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        check.load_cert_chain(s.cert_file, s.key_file)
        if s.client_ca_file:
            check.load_verify_locations(cafile=s.client_ca_file)
        return grpc.ssl_server_certificate_configuration(
            [(_read(s.key_file), _read(s.cert_file))],
            root_certificates=_read(s.client_ca_file) if s.client_ca_file else None)

    def __call__(self) -> Any:
        with self.lock:
            try:
                stamps = self._stamps()
                if stamps == self.stamps:
                    return None
                config = self._configuration()
            except (OSError, ssl.SSLError) as exc:  # mid-rewrite, removed, mismatched: keep the last good one
                log.error("TLS files could not be loaded (%s); still serving the previous certificate", exc)
                return None
            self.stamps = stamps
            log.info("TLS certificate files changed: new connections get the new certificate")
            return config


def server_credentials(settings: TlsSettings) -> grpc.ServerCredentials:
    """Credentials for `add_secure_port` that re-read the files when they change. Files that do
    not load (unreadable, not PEM, a key that does not match the certificate) are a ConfigError."""
    from arm_common.config import ConfigError  # config imports this module

    try:
        fetcher = _ReloadingCertificates(settings)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"ARM_TLS_CERT_FILE, ARM_TLS_KEY_FILE or ARM_TLS_CLIENT_CA_FILE do not load: {exc}") from None
    return grpc.dynamic_ssl_server_credentials(
        fetcher.initial, fetcher, require_client_authentication=settings.client_ca_file is not None)


def channel_credentials(ca_file: str | None = None, cert_file: str | None = None,
                        key_file: str | None = None) -> grpc.ChannelCredentials:
    """TLS credentials verifying the server against `ca_file` (the system's roots when None),
    presenting `cert_file`/`key_file` as the client certificate when given (mTLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file) if ca_file else None,
        private_key=_read(key_file) if key_file else None,
        certificate_chain=_read(cert_file) if cert_file else None)


def dns_target(address: str) -> str:
    """`host:port` as a `dns:///host:port` target (re-resolved, every address used); a target
    that already names its resolver (`dns:`, `ipv4:`, `unix:`, …) is kept as it is."""
    if "://" in address or address.startswith(("unix:", "ipv4:", "ipv6:", "dns:")):
        return address
    return f"dns:///{address}"


def channel_options(settings: TlsSettings | None = None) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [("grpc.service_config", ROUND_ROBIN_SERVICE_CONFIG)]
    if settings is not None and settings.dials_tls and settings.server_name:
        options.append(("grpc.ssl_target_name_override", settings.server_name))
    return options


def open_channel(address: str, settings: TlsSettings | None = None, *,
                 interceptors: Sequence[Any] | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """An asyncio channel to `address` (host:port) through `dns:///` with `round_robin`; TLS
    when `settings.ca_file` is set (plus the client certificate when there is one)."""
    target = dns_target(address)
    opts = [*channel_options(settings), *options]
    if settings is not None and settings.dials_tls:
        creds = channel_credentials(settings.ca_file, settings.cert_file, settings.key_file)
        return grpc.aio.secure_channel(target, creds, options=opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)


def is_loopback(listen: str) -> bool:
    """Whether a listen address (host:port) only accepts connections from this machine."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
