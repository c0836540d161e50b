"""The guard on every outbound URL (webhooks, GitHub, GitLab, identity providers' key
sets): no request to the service's own network unless an operator allowed it.

A URL's host is resolved, and every address it resolves to must be public: loopback,
private, link-local, unique-local, multicast, reserved and unspecified addresses are
refused, IPv4-mapped and NAT64 IPv6 forms included, unless the host or the address is in
`PORTOLAN_OUTBOUND_ALLOW` (comma-separated host names or CIDRs, e.g. `127.0.0.1/32`). The
caller connects to the address that was checked (a second lookup could answer otherwise)
and follows no redirects. A refusal says why, for the run's log.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class Refused(Exception):
    """An outbound URL that may not be called; the message says why."""


@dataclass(frozen=True)
class Allowed:
    hosts: frozenset[str]
    networks: tuple[Network, ...]

    @classmethod
    def parse(cls, raw: str | list[str] | None) -> Allowed:
        items = raw.split(",") if isinstance(raw, str) else list(raw or [])
        hosts: set[str] = set()
        networks: list[Network] = []
        for item in (i.strip() for i in items):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def covers(self, address: Address) -> bool:
        return any(address in network for network in self.networks)


def _embedded_v4(address: Address) -> Address:
    """The IPv4 address inside an IPv4-mapped or NAT64 IPv6 address (else the address)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def is_public(address: Address) -> bool:
    inner = _embedded_v4(address)
    return not (
        inner.is_loopback
        or inner.is_private
        or inner.is_link_local
        or inner.is_multicast
        or inner.is_reserved
        or inner.is_unspecified
        or (isinstance(inner, ipaddress.IPv6Address) and inner.is_site_local)
    )


@dataclass(frozen=True)
class Target:
    """A checked URL: its scheme, host, port, and the address to connect to."""

    url: str
    scheme: str
    host: str
    port: int
    address: Address


async def check(url: str, allowed: Allowed) -> Target:
    """The URL's target, or Refused (with the reason) when it may not be called."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise Refused(f"only http and https URLs are called, not {parts.scheme or 'none'!r}")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise Refused("the URL has no host")
    if parts.username or parts.password:
        raise Refused("credentials in the URL are not sent; use a secret in a header")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise Refused("the URL's port is not a number from 1 to 65535") from exc
    try:
        literal: Address | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses: list[Address] = [literal]
    else:
        try:
            found = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except (socket.gaierror, UnicodeError) as exc:
            raise Refused(f"{host!r} does not resolve") from exc
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in found]
        if not addresses:
            raise Refused(f"{host!r} does not resolve")
    named = host in allowed.hosts
    for address in addresses:
        if not (named or allowed.covers(address) or is_public(address)):
            raise Refused(
                f"{host!r} resolves to {address}, a private, loopback or reserved address; "
                "an operator can allow it with PORTOLAN_OUTBOUND_ALLOW"
            )
    return Target(url, parts.scheme, host, port, addresses[0])
