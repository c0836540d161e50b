"""The outbound URL guard: private, loopback, link-local and reserved addresses are refused
(IPv4-mapped and NAT64 forms too) unless allow-listed; only http(s), no credentials."""

from __future__ import annotations

import ipaddress

import pytest

from app.config import Settings
from app.kit.outbound import Allowed, Refused, check

NOBODY = Allowed.parse(None)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://127.8.9.10:8080/",
        "http://10.1.2.3/",
        "http://172.16.0.1/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",  # IPv4-mapped loopback
        "http://[::ffff:a9fe:a9fe]/",  # IPv4-mapped metadata address
        "http://[64:ff9b::a00:1]/",  # NAT64 form of 10.0.0.1
        "http://[fc00::1]/",
        "http://[fe80::1]/",
        "http://localhost:9000/",  # a name that resolves to loopback
    ],
)
async def test_private_and_special_addresses_are_refused(url: str) -> None:
    with pytest.raises(Refused, match="PORTOLAN_OUTBOUND_ALLOW"):
        await check(url, NOBODY)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("http://user:pw@93.184.216.34/", "credentials"),
        ("http://93.184.216.34:99999/", "port"),
        ("http:///nohost", "no host"),
    ],
)
async def test_urls_that_are_not_plain_http_are_refused(url: str, reason: str) -> None:
    with pytest.raises(Refused, match=reason):
        await check(url, NOBODY)


async def test_public_addresses_pass_and_the_checked_address_is_kept() -> None:
    target = await check("https://93.184.216.34/hooks?x=1", NOBODY)
    assert target.address == ipaddress.ip_address("93.184.216.34")
    assert (target.scheme, target.port) == ("https", 443)
    target = await check("http://[2606:4700::1111]:8080/", NOBODY)
    assert target.port == 8080


async def test_operators_allow_hosts_and_networks() -> None:
    allowed = Allowed.parse("127.0.0.1/32, localhost, 10.0.0.0/8")
    assert (await check("http://127.0.0.1:8123/", allowed)).port == 8123
    assert (await check("http://localhost:8123/", allowed)).host == "localhost"
    assert (await check("http://10.9.8.7/", allowed)).address == ipaddress.ip_address("10.9.8.7")
    with pytest.raises(Refused):
        await check("http://192.168.0.1/", allowed)
    with pytest.raises(Refused):
        await check("http://127.0.0.2/", allowed)


def test_the_allow_list_is_a_setting() -> None:
    settings = Settings(_env_file=None, outbound_allow="127.0.0.1/32,hooks.internal")  # type: ignore[call-arg]
    allowed = Allowed.parse(settings.outbound_allow)
    assert "hooks.internal" in allowed.hosts
    assert allowed.covers(ipaddress.ip_address("127.0.0.1"))
