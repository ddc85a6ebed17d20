"""Where webhook deliveries may connect: public addresses only, unless the operator allows more.

A webhook's URL is a tenant's to choose; without this guard a tenant admin could make governance
POST into the network it runs in (the database, a cloud metadata endpoint, another service's
admin port). Every address a delivery would connect to must be globally routable, or inside
one of the networks the operator lists in `ARM_WEBHOOK_ALLOWED_NETWORKS` (CIDRs, e.g.
`10.20.0.0/16` for an in-house receiver; the all-in-one dev server allows loopback).

The check happens where the connection is made (httpcore's network backend): the host name is
resolved once, every address it resolves to is checked, and the connection goes to a checked
address — so a name that resolves to a public address when checked and a private one when
connecting (DNS rebinding) cannot slip through. A URL naming a refused address literally is
refused when the webhook is created (INVALID_ARGUMENT)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


class EgressPolicy:
    """Public addresses, plus the operator's allowed networks."""

    def __init__(self, allowed: Iterable[Network] = ()) -> None:
        self.allowed = tuple(allowed)

    def refusal(self, address: Address) -> str | None:
        """Why a delivery may not connect to `address`; None when it may."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in net for net in self.allowed):
            return None
        if address.is_global and not address.is_multicast:
            return None
        return (f"{address} is not a public address (loopback, private, link-local or reserved); "
                "webhook deliveries go to public addresses unless the operator allows the network "
                "(ARM_WEBHOOK_ALLOWED_NETWORKS)")

    def literal_refusal(self, url: str) -> str | None:
        """The refusal of a URL whose host is an address literal or `localhost` (other host
        names are checked at delivery, where they are resolved)."""
        host = (urlsplit(url).hostname or "").lower()
        if host == "localhost" or host.endswith(".localhost"):
            host = "127.0.0.1"
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return None
        return self.refusal(address)

    def transport(self, **kwargs: Any) -> httpx.AsyncHTTPTransport:
        """An httpx transport whose connections go only where this policy allows."""
        transport = httpx.AsyncHTTPTransport(**kwargs)
        # httpx takes no network backend; the httpcore pool under it does (tests/governance/
        # test_webhook_egress.py fails if a new httpx moves it).
        transport._pool._network_backend = GuardedBackend(self)  # noqa: SLF001
        return transport


class EgressRefused(httpcore.ConnectError):
    """Every address the host resolves to is refused by the policy."""


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's default backend, connecting only to addresses the policy allows."""

    def __init__(self, policy: EgressPolicy, backend: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.policy = policy
        self.backend = backend or httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109 - httpcore's
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        addresses = await _resolve(host, port)
        refusals: list[str] = []
        for address in addresses:
            refusal = self.policy.refusal(address)
            if refusal is None:
                # TLS still verifies (and sends SNI for) the URL's host name: httpcore passes it
                # to start_tls apart from the address connected to here.
                return await self.backend.connect_tcp(str(address), port, timeout=timeout,
                                                      local_address=local_address, socket_options=socket_options)
            refusals.append(refusal)
        raise EgressRefused(f"{host} resolves to no allowed address: {refusals[0]}" if refusals
                            else f"{host} resolves to no address")

    async def connect_unix_socket(self, path: str, timeout: float | None = None,  # noqa: ASYNC109
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise EgressRefused("webhook deliveries do not use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.backend.sleep(seconds)


async def _resolve(host: str, port: int) -> Sequence[Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
    seen: dict[Address, None] = {}
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            seen[ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])] = None
    return list(seen)
