"""The one verifier of bearer tokens: Portolan's own (TokenService) and those of each
organization's OpenID Connect identity provider.

An identity-provider token is trusted only after, in this order: its header's `alg` is on
the allow-list of asymmetric algorithms (never HS*, never `none`, so a provider's public
key can never serve as an HMAC secret); its unverified `iss` and `aud` name exactly one
org's settings (looked up across orgs as the operator, remembered briefly); its `kid`
names a key of that org's JWKS whose type fits the algorithm (an unknown `kid` fetches
the set again, at most once per interval); the signature verifies with that key; and
`iss`, `aud`, `exp` (required), `nbf` and `iat` (when present) hold, with a small leeway.

A verified token is remembered until it expires, keyed by the whole token (signature
included), together with the version of the settings it was verified under: a change of
the settings (seen by every process within PORTOLAN_OIDC_CONFIG_CACHE_SECONDS, at once in
the process that made it) sends the token through verification and provisioning again.
The user's roles and teams are never remembered here; the request reads them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jose import ExpiredSignatureError, JWTError, jwk, jws, jwt
from jose.backends.base import Key
from jose.exceptions import JOSEError

from app.auth import provisioning
from app.auth.jwks import KEY_TYPES, Jwk, JwksCache
from app.auth.jwks import fetch as fetch_jwks
from app.auth.oidc import Provider, lookup
from app.auth.tokens import ALLOWED_ALGORITHMS as OWN_ALGORITHMS
from app.auth.tokens import Kind, TokenService
from app.config import Settings
from app.db.database import Database
from app.dispatch import outbound
from app.dispatch.client import Client
from app.kit.errors import Unauthorized, Unavailable

ALLOWED_ALGORITHMS = tuple(KEY_TYPES)
_CACHE_SIZE = 10_000
_MAX_AUDIENCES = 10
_MAX_CLAIM_CHARS = 500


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token speaks for. `roles` are the token's own (machine credentials);
    a user's are read per request. `issued_at`: the token's `iat` (0 when it has none)."""

    org_id: uuid.UUID
    subject: str
    kind: Kind
    roles: tuple[str, ...]
    email: str | None
    issued_at: int = 0


@dataclass(frozen=True, slots=True)
class _Remembered:
    identity: Identity
    expires_at: int
    issuer: str
    audiences: tuple[str, ...]
    version: datetime


def _invalid(message: str = "The access token is invalid") -> Unauthorized:
    return Unauthorized(message, code="invalid_token")


def _audiences(claims: dict[str, Any]) -> tuple[str, ...]:
    aud = claims.get("aud")
    values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not values or len(values) > _MAX_AUDIENCES:
        raise _invalid("The access token has no usable audience")
    if not all(isinstance(a, str) and 0 < len(a) <= _MAX_CLAIM_CHARS for a in values):
        raise _invalid("The access token has no usable audience")
    return tuple(values)


class Verifier:
    def __init__(
        self, settings: Settings, tokens: TokenService, db: Database, client: Client
    ) -> None:
        self._tokens = tokens
        self._db = db
        self._client = client
        self._allowed = outbound.Allowed.parse(settings.outbound_allow)
        self._timeout = settings.oidc_timeout_seconds
        self._leeway = settings.oidc_leeway_seconds
        self._config_ttl = settings.oidc_config_cache_seconds
        self.jwks = JwksCache(
            client,
            self._allowed,
            ttl=settings.oidc_jwks_cache_seconds,
            interval=settings.oidc_jwks_refetch_seconds,
            timeout=settings.oidc_timeout_seconds,
        )
        # Portolan's tokens all start with the same encoded header: the common case is
        # told apart without decoding anything.
        sample = tokens.issue(org_id=uuid.UUID(int=0), subject="-", kind="app", roles=[])
        self._own_header = sample.partition(".")[0] + "."
        self._providers: OrderedDict[tuple[str, tuple[str, ...]], tuple[float, Provider | None]]
        self._providers = OrderedDict()
        self._verified: OrderedDict[str, _Remembered] = OrderedDict()
        self._pending: dict[str, asyncio.Task[Identity]] = {}

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- settings changes -------------------------------------------------------------------

    async def fetch_keys(self, uri: str) -> tuple[Jwk, ...]:
        """Fetch a JWKS now (raises outbound.Refused or JwksError) and keep it."""
        keys = await fetch_jwks(self._client, uri, allowed=self._allowed, timeout=self._timeout)
        self.jwks.remember(uri, keys)
        return keys

    def forget(self, stale: Provider | None = None) -> None:
        """An org's settings changed: drop the settings this process remembers (and the
        key set of `stale`). Tokens verified under the old settings are verified and
        provisioned again on their next use."""
        self._providers.clear()
        if stale is not None:
            self.jwks.forget(stale.jwks_uri)

    # -- verification ---------------------------------------------------------------------

    async def verify(self, token: str) -> Identity:
        if token.startswith(self._own_header):
            return self._own(token)
        remembered = self._verified.get(token)
        if remembered is not None:
            if await self._still_valid(token, remembered):
                return remembered.identity
        try:
            header = jwt.get_unverified_header(token)
        except JWTError as exc:
            raise _invalid("The access token is malformed") from exc
        alg = header.get("alg")
        if alg in OWN_ALGORITHMS:
            return self._own(token)
        if alg not in ALLOWED_ALGORITHMS:
            raise _invalid("The access token's algorithm is not accepted")
        return await self._once(token, header)

    def _own(self, token: str) -> Identity:
        claims = self._tokens.verify(token)
        return Identity(
            org_id=claims.org_id,
            subject=claims.subject,
            kind=claims.kind,
            roles=claims.roles,
            email=claims.subject if claims.kind == "user" else None,
            issued_at=claims.issued_at,
        )

    async def _still_valid(self, token: str, remembered: _Remembered) -> bool:
        if remembered.expires_at <= time.time():
            self._verified.pop(token, None)
            raise Unauthorized("The access token has expired", code="token_expired")
        provider = await self._provider(remembered.issuer, remembered.audiences)
        if (
            provider is None
            or provider.org_id != remembered.identity.org_id
            or provider.version != remembered.version
        ):
            self._verified.pop(token, None)
            return False
        return True

    async def _once(self, token: str, header: dict[str, Any]) -> Identity:
        """Verify and provision a token once however many requests bring it at once."""
        task = self._pending.get(token)
        if task is None:
            task = asyncio.ensure_future(self._verify_new(token, header))
            self._pending[token] = task
            task.add_done_callback(lambda done: self._settle(token, done))
        return await asyncio.shield(task)

    def _settle(self, token: str, task: asyncio.Task[Identity]) -> None:
        self._pending.pop(token, None)
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every waiter went away

    async def _verify_new(self, token: str, header: dict[str, Any]) -> Identity:
        alg = str(header["alg"])
        if "crit" in header:
            raise _invalid("The access token has critical header parameters")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _invalid("The access token's key id is not a string")
        try:
            unverified = jwt.get_unverified_claims(token)
        except JWTError as exc:
            raise _invalid("The access token is malformed") from exc
        issuer = unverified.get("iss")
        if not isinstance(issuer, str) or not 0 < len(issuer) <= _MAX_CLAIM_CHARS:
            raise _invalid("The access token has no usable issuer")
        audiences = _audiences(unverified)
        provider = await self._provider(issuer, audiences)
        if provider is None:
            raise _invalid("No organization signs in with the access token's issuer and audience")
        keys = await self.jwks.keys(provider.jwks_uri, kid, alg)
        if keys is None:
            raise Unavailable(
                "The identity provider's signing keys could not be fetched",
                code="idp_unavailable",
            )
        if not keys:
            raise _invalid("The access token's signing key is not one of the identity provider's")
        claims = self._decode(token, alg, keys, provider)
        expires_at = int(claims["exp"])
        seen = await provisioning.sign_in(self._db, provider, claims)
        iat = claims.get("iat")
        identity = Identity(
            org_id=provider.org_id,
            subject=seen.email,
            kind="user",
            roles=(),
            email=seen.email,
            issued_at=int(iat) if isinstance(iat, int | float) else 0,
        )
        self._verified[token] = _Remembered(
            identity, expires_at, issuer, audiences, provider.version
        )
        if len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)
        return identity

    def _decode(self, token: str, alg: str, keys: list[Jwk], provider: Provider) -> dict[str, Any]:
        """The token's claims, once its signature verifies with one of `keys` and its
        claims hold."""
        public = _signer(token, alg, keys)
        options = {
            "verify_signature": True,
            "verify_aud": True,
            "verify_iss": True,
            "verify_exp": True,
            "verify_nbf": True,
            "verify_iat": True,
            # An ID token's at_hash binds it to an access token we are not shown.
            "verify_at_hash": False,
            "require_exp": True,
            "require_aud": True,
            "require_iss": True,
            "leeway": self._leeway,
        }
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                public,
                algorithms=[alg],
                audience=provider.audience,
                issuer=provider.issuer,
                options=options,
            )
        except ExpiredSignatureError as exc:
            raise Unauthorized("The access token has expired", code="token_expired") from exc
        except JWTError as exc:
            raise _invalid(f"The access token is invalid: {exc}") from exc
        if not isinstance(claims.get("exp"), int | float):
            raise _invalid("The access token's exp is not a number")
        iat = claims.get("iat")
        if isinstance(iat, int | float) and iat > time.time() + self._leeway:
            raise _invalid("The access token is issued in the future (iat)")
        return claims

    async def _provider(self, issuer: str, audiences: tuple[str, ...]) -> Provider | None:
        key = (issuer, audiences)
        cached = self._providers.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self._db.system() as tx:
            provider = await lookup(tx, issuer, list(audiences))
        self._providers[key] = (now + self._config_ttl, provider)
        self._providers.move_to_end(key)
        if len(self._providers) > _CACHE_SIZE:
            self._providers.popitem(last=False)
        return provider


def _signer(token: str, alg: str, keys: list[Jwk]) -> Key:
    """The key among `keys` whose signature the token carries."""
    for key in keys:
        try:
            public = jwk.construct(key, alg)
        except (JOSEError, ValueError, TypeError):
            continue  # a malformed key in the provider's set
        try:
            jws.verify(token, public, algorithms=[alg])
        except JOSEError:
            continue
        return public
    raise _invalid("The access token's signature does not verify")
