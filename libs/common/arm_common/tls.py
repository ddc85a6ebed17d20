"""TLS for servers and channels, and how every channel finds its peers.

Server side: `server_credentials` serves TLS with the certificate and key of `ARM_TLS_CERT_FILE` /
`ARM_TLS_KEY_FILE`, requiring a client certificate signed by `ARM_TLS_CLIENT_CA_FILE` when that is
set (mTLS). The files are re-read when their modification time changes: every new connection's
handshake asks for the current configuration, so a rotated certificate is served without a restart.

Client side: `open_channel` opens a channel to `dns:///host:port` with the `round_robin` policy,
so a client spreads its calls over every address the name resolves to (every replica behind a
headless Service). With `ARM_TLS_CA_FILE` it verifies the server against that CA and, when
`ARM_TLS_CERT_FILE` / `ARM_TLS_KEY_FILE` are set, presents them as its client certificate. Client
certificate, key and CA files are followed too (ReloadingChannel): after they change, new calls
go through a new connection that presents the new certificate."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

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
    when `settings.ca_file` is set (plus the client certificate when there is one: then the
    channel follows changes of the certificate, key and CA files, see ReloadingChannel)."""
    if settings is not None and settings.dials_tls and settings.cert_file:
        return cast(grpc.aio.Channel, ReloadingChannel(address, settings, interceptors=interceptors,
                                                       options=options))
    return _open(address, settings, interceptors, options)


def _open(address: str, settings: TlsSettings | None, interceptors: Sequence[Any] | None,
          options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
    target = dns_target(address)
    given = {name for name, _ in options}  # the caller's service config (retries) wins
    opts = [*(o for o in channel_options(settings) if o[0] not in given), *options]
    if settings is not None and settings.dials_tls:
        creds = channel_credentials(settings.ca_file, settings.cert_file, settings.key_file)
        return grpc.aio.secure_channel(target, creds, options=opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)


class _LazyCall:
    """A multicallable bound to whichever channel is current at each call."""

    def __init__(self, owner: ReloadingChannel, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.owner, self.kind, self.args, self.kwargs = owner, kind, args, kwargs
        self.bound: tuple[grpc.aio.Channel, Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self.owner.current()
        if self.bound is None or self.bound[0] is not channel:
            self.bound = (channel, getattr(channel, self.kind)(*self.args, **self.kwargs))
        return self.bound[1](*args, **kwargs)


class ReloadingChannel:
    """A client channel with a client certificate (mTLS) that follows the certificate, key and
    CA files: at most every `check_interval_s`, a call looks at their modification times and,
    when they changed, the calls from then on go through a new channel (a new connection, a new
    handshake with the new certificate). Calls and streams already open finish on the previous
    channel, which is closed with this one (the server's connection age ends its connection)."""

    def __init__(self, address: str, settings: TlsSettings, *, interceptors: Sequence[Any] | None = None,
                 options: Sequence[tuple[str, Any]] = (), check_interval_s: float = 5.0) -> None:
        self.address, self.settings, self.interceptors, self.options = address, settings, interceptors, options
        self.check_interval_s = check_interval_s
        self.files = [f for f in (settings.cert_file, settings.key_file, settings.ca_file) if f]
        self.stamps = self._stamps()
        self.channel = _open(address, settings, interceptors, options)
        self.retired: list[grpc.aio.Channel] = []
        self.checked = time.monotonic()

    def _stamps(self) -> tuple[int, ...]:
        return tuple(os.stat(f).st_mtime_ns for f in self.files)

    def current(self) -> grpc.aio.Channel:
        now = time.monotonic()
        if now - self.checked >= self.check_interval_s:
            self.checked = now
            try:
                stamps = self._stamps()
                if stamps != self.stamps:
                    assert self.settings.cert_file and self.settings.key_file
                    # A half-rotated pair (certificate replaced, key not yet) is not used.
                    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(self.settings.cert_file,
                                                                            self.settings.key_file)
                    channel = _open(self.address, self.settings, self.interceptors, self.options)
                    self.retired.append(self.channel)
                    self.channel, self.stamps = channel, stamps
                    log.info("TLS client files changed: new calls to %s use a new connection", self.address)
            except (OSError, ValueError) as exc:  # mid-rewrite or removed: keep the current channel
                log.error("TLS client files could not be re-read (%s); keeping the current channel", exc)
        return self.channel

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _LazyCall(self, "unary_unary", args, kwargs)

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _LazyCall(self, "unary_stream", args, kwargs)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _LazyCall(self, "stream_unary", args, kwargs)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _LazyCall(self, "stream_stream", args, kwargs)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.current().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.current().wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current().channel_ready()

    async def close(self, grace: float | None = None) -> None:
        for channel in [*self.retired, self.channel]:
            await channel.close(grace)
        self.retired.clear()

    async def __aenter__(self) -> ReloadingChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def is_loopback(listen: str) -> bool:
    """Whether a listen address (host:port) only accepts connections from this machine."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
