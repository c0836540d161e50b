"""Identity providers' signing keys (JSON Web Key Sets): fetched through the outbound guard
and client, kept per JWKS URI, and fetched again when a token names a key id the set does
not hold, at most once per interval per URI.

The interval applies to every fetch of a URI, failed or not, and concurrent callers share
one fetch: however many tokens with made-up key ids arrive, the provider sees at most one
request per interval from this process. A set that cannot be fetched again is kept (the
provider being down does not sign everyone out); a set never fetched is an outage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.kit import outbound
from app.kit.client import Client

log = logging.getLogger("portolan.oidc")

Jwk = dict[str, Any]
# The key type and, for elliptic curves, the curve each accepted algorithm needs.
KEY_TYPES: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
}
MAX_KEYS = 100
READ_LIMIT_BYTES = 256 * 1024


class JwksError(Exception):
    """A JWKS URI that did not answer a key set; the message says why."""


def parse(body: bytes) -> tuple[Jwk, ...]:
    """The keys of a JWKS document (`{"keys": [...]}`), or JwksError."""
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise JwksError("the answer is not JSON") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksError('the answer is not a JSON Web Key Set ({"keys": [...]})')
    keys = tuple(
        k for k in doc["keys"][:MAX_KEYS] if isinstance(k, dict) and isinstance(k.get("kty"), str)
    )
    if not any(k["kty"] in ("RSA", "EC") for k in keys):
        raise JwksError("the key set holds no RSA or EC key")
    return keys


async def fetch(
    client: Client,
    url: str,
    *,
    allowed: outbound.Allowed,
    timeout: float,  # noqa: ASYNC109 - bounds the lookup and the call
) -> tuple[Jwk, ...]:
    """GET a JWKS through the guard. Raises outbound.Refused or JwksError."""
    try:
        async with asyncio.timeout(timeout):
            response = await client.send(
                "GET", url, headers={"Accept": "application/json"}, allowed=allowed, timeout=timeout
            )
    except TimeoutError as exc:
        raise JwksError(f"no answer within {timeout:g} s") from exc
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        raise JwksError(f"the request failed ({type(exc).__name__})") from exc
    if response.status_code != 200:
        raise JwksError(f"the answer was HTTP {response.status_code}, not 200")
    if len(response.content) >= READ_LIMIT_BYTES:
        raise JwksError(f"the answer is larger than {READ_LIMIT_BYTES // 1024} KiB")
    return parse(response.content)


def fits(key: Jwk, alg: str) -> bool:
    """May `key` verify a signature made with `alg`? Its type (and curve) must be the
    algorithm's, it must be meant for signatures, and a key that names its algorithm must
    name this one."""
    kty, crv = KEY_TYPES[alg]
    return (
        key.get("kty") == kty
        and (crv is None or key.get("crv") == crv)
        and key.get("use", "sig") == "sig"
        and key.get("alg", alg) == alg
    )


def matching(keys: tuple[Jwk, ...], kid: str | None, alg: str) -> list[Jwk]:
    """The keys that may have signed a token with this `kid` and `alg`. A token without a
    `kid` matches only when the set holds exactly one key for its algorithm."""
    usable = [k for k in keys if fits(k, alg)]
    if kid is None:
        return usable if len(usable) == 1 else []
    return [k for k in usable if k.get("kid") == kid]


@dataclass(slots=True)
class _Entry:
    keys: tuple[Jwk, ...] | None = None
    fetched_at: float = 0.0
    attempted_at: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class JwksCache:
    """Key sets by URI: fresh for `ttl` seconds, fetched at most once per `interval`."""

    def __init__(
        self,
        client: Client,
        allowed: outbound.Allowed,
        *,
        ttl: float,
        interval: float,
        timeout: float,
        max_uris: int = 1000,
    ) -> None:
        self._client = client
        self._allowed = allowed
        self._ttl = ttl
        self._interval = interval
        self._timeout = timeout
        self._max_uris = max_uris
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def _entry(self, uri: str) -> _Entry:
        entry = self._entries.get(uri)
        if entry is None:
            entry = self._entries[uri] = _Entry()
            while len(self._entries) > self._max_uris:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(uri)
        return entry

    async def keys(self, uri: str, kid: str | None, alg: str) -> list[Jwk] | None:
        """The keys that may have signed the token; [] when none does (after one refetch
        if the interval allows it); None when the set was never fetched."""
        entry = self._entry(uri)
        if entry.keys is None or time.monotonic() - entry.fetched_at > self._ttl:
            await self._refresh(uri, entry)
        if entry.keys is None:
            return None
        found = matching(entry.keys, kid, alg)
        if not found and kid is not None:
            # Perhaps the provider rotated its keys since the last fetch.
            await self._refresh(uri, entry)
            assert entry.keys is not None  # a refresh never forgets keys
            found = matching(entry.keys, kid, alg)
        return found

    async def _refresh(self, uri: str, entry: _Entry) -> None:
        async with entry.lock:
            started = time.monotonic()
            if started - entry.attempted_at < self._interval:
                return  # fetched (or tried) a moment ago, possibly by the caller we waited on
            entry.attempted_at = started
            try:
                keys = await fetch(self._client, uri, allowed=self._allowed, timeout=self._timeout)
            except (outbound.Refused, JwksError) as exc:
                log.warning("JWKS %s could not be fetched: %s", uri, exc)
                return
            entry.keys, entry.fetched_at = keys, started

    def remember(self, uri: str, keys: tuple[Jwk, ...]) -> None:
        """Keys just fetched elsewhere (when the settings were saved)."""
        entry = self._entry(uri)
        entry.keys = keys
        entry.fetched_at = entry.attempted_at = time.monotonic()

    def forget(self, uri: str) -> None:
        self._entries.pop(uri, None)
