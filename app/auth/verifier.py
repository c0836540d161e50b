"""The one verifier of bearer tokens: Portolan's own (TokenService) and those of each
organization's OpenID Connect identity provider.

An identity-provider token is trusted only after, in this order: its header's `alg` is on
the allow-list of asymmetric algorithms (never HS*, never `none`, so a provider's public
key can never serve as an HMAC secret); its org is found (below); its `kid` names a key of
that org's JWKS whose type fits the algorithm (an unknown `kid` fetches the set again, at
most once per interval); the signature verifies with that key; and `iss`, `aud`, `exp`
(required), `nbf` and `iat` (when present) hold, with a small leeway.

Its org. Several orgs may use one issuer and audience, so a token's claims alone may not
name one, and no org's settings may decide another's sign-in:

- A request that names its org (the `X-Portolan-Org` header, the org's id) is verified
  against that org's settings only; no other org's are read.
- Otherwise the candidates are the orgs whose settings name the token's `iss` and one of
  its `aud` (read across orgs as the operator, at most MAX_CANDIDATES, remembered
  briefly), and the token's org is the one candidate under whose key set its signature
  verifies. None, or several (orgs that trust the very same keys), or more candidates than
  the bound: refused, and the request must name its org.

Every refusal before a signature verifies has the same answer, whether no org uses the
issuer, another org does, or the key or signature is wrong: an answer never tells of
another org's settings.

A verified token is remembered until it expires, keyed by the whole token (signature
included) and the org the request named, together with the candidates' settings versions
it was verified under: a change of any of them (seen by every process within
PORTOLAN_OIDC_CONFIG_CACHE_SECONDS, at once in the process that made it) sends the token
through verification and provisioning again. The user's roles and teams are never
remembered here; the request reads them.
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
from app.auth.oidc import Provider, matching
from app.auth.tokens import ALLOWED_ALGORITHMS as OWN_ALGORITHMS
from app.auth.tokens import Kind, TokenService
from app.config import Settings
from app.db.database import Database
from app.kit import outbound
from app.kit.client import Client
from app.kit.errors import Unauthorized, Unavailable

ALLOWED_ALGORITHMS = tuple(KEY_TYPES)
ORG_HEADER = "x-portolan-org"
# Orgs a token without X-Portolan-Org is tried against (each a key-set look-up).
MAX_CANDIDATES = 10
_CACHE_SIZE = 10_000
_MAX_AUDIENCES = 10
_MAX_CLAIM_CHARS = 500
# The one answer to every token no org's settings verify (no org uses its issuer and
# audience, or another org does, or the key or the signature is wrong).
NOT_SIGNED_IN = (
    "No organization signs in with the access token (its issuer, audience, signing key or "
    "signature); when organizations share an identity provider, name yours with the "
    "X-Portolan-Org header"
)


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


# What a token's org was settled by: the org the request named (None: none), the issuer
# and the audiences.
_Lookup = tuple[uuid.UUID | None, str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class _Remembered:
    identity: Identity
    expires_at: int
    lookup: _Lookup
    versions: tuple[tuple[uuid.UUID, datetime], ...]  # the candidates' settings then


def _versions(candidates: tuple[Provider, ...]) -> tuple[tuple[uuid.UUID, datetime], ...]:
    return tuple((provider.org_id, provider.version) for provider in candidates)


def org_hint(value: str | None) -> uuid.UUID | None:
    """The org a request names (X-Portolan-Org: its id), or None."""
    if value is None or not value.strip():
        return None
    try:
        return uuid.UUID(value.strip())
    except ValueError as exc:
        raise _invalid("X-Portolan-Org must be an organization's id") from exc


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
        self._providers: OrderedDict[_Lookup, tuple[float, tuple[Provider, ...]]]
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

    async def verify(self, token: str, org: uuid.UUID | None = None) -> Identity:
        """Who the token speaks for; `org`: the org the request names (X-Portolan-Org)."""
        if token.startswith(self._own_header):
            return self._own(token, org)
        key = token if org is None else f"{org}:{token}"
        remembered = self._verified.get(key)
        if remembered is not None:
            if await self._still_valid(key, remembered):
                return remembered.identity
        try:
            header = jwt.get_unverified_header(token)
        except JWTError as exc:
            raise _invalid("The access token is malformed") from exc
        alg = header.get("alg")
        if alg in OWN_ALGORITHMS:
            return self._own(token, org)
        if alg not in ALLOWED_ALGORITHMS:
            raise _invalid("The access token's algorithm is not accepted")
        return await self._once(key, token, header, org)

    def _own(self, token: str, org: uuid.UUID | None) -> Identity:
        claims = self._tokens.verify(token)
        if org is not None and claims.org_id != org:
            raise _invalid("The access token is not one of the organization X-Portolan-Org names")
        return Identity(
            org_id=claims.org_id,
            subject=claims.subject,
            kind=claims.kind,
            roles=claims.roles,
            email=claims.subject if claims.kind == "user" else None,
            issued_at=claims.issued_at,
        )

    async def _still_valid(self, key: str, remembered: _Remembered) -> bool:
        if remembered.expires_at <= time.time():
            self._verified.pop(key, None)
            raise Unauthorized("The access token has expired", code="token_expired")
        candidates = await self._candidates(remembered.lookup)
        if _versions(candidates) != remembered.versions:
            self._verified.pop(key, None)
            return False
        return True

    async def _once(
        self, key: str, token: str, header: dict[str, Any], org: uuid.UUID | None
    ) -> Identity:
        """Verify and provision a token once however many requests bring it at once."""
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(self._verify_new(key, token, header, org))
            self._pending[key] = task
            task.add_done_callback(lambda done: self._settle(key, done))
        return await asyncio.shield(task)

    def _settle(self, key: str, task: asyncio.Task[Identity]) -> None:
        self._pending.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every waiter went away

    async def _verify_new(
        self, key: str, token: str, header: dict[str, Any], org: uuid.UUID | None
    ) -> Identity:
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
        lookup: _Lookup = (org, issuer, audiences)
        candidates = await self._candidates(lookup)
        if len(candidates) > MAX_CANDIDATES:
            raise _invalid(NOT_SIGNED_IN)
        signed: list[tuple[Provider, Key]] = []
        unavailable = False
        for candidate in candidates:
            keys = await self.jwks.keys(candidate.jwks_uri, kid, alg)
            if keys is None:
                unavailable = True
                continue
            public = _signer(token, alg, keys)
            if public is not None:
                signed.append((candidate, public))
        if not signed and unavailable:
            raise Unavailable(
                "The identity provider's signing keys could not be fetched",
                code="idp_unavailable",
            )
        if len(signed) != 1:
            raise _invalid(NOT_SIGNED_IN)
        provider, public = signed[0]
        claims = self._decode(token, alg, public, provider)
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
        self._verified[key] = _Remembered(identity, expires_at, lookup, _versions(candidates))
        if len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)
        return identity

    def _decode(self, token: str, alg: str, public: Key, provider: Provider) -> dict[str, Any]:
        """The token's claims, once its signature verifies with `public` and its claims
        hold for the provider's settings."""
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

    async def _candidates(self, lookup: _Lookup) -> tuple[Provider, ...]:
        """The settings a token may be verified under: the named org's when it matches,
        else every org's that names the issuer and one of the audiences (one more than
        MAX_CANDIDATES at most, so the caller sees when there are too many)."""
        cached = self._providers.get(lookup)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        org, issuer, audiences = lookup
        if org is None:
            async with self._db.system() as tx:
                found = await matching(tx, issuer, list(audiences), limit=MAX_CANDIDATES + 1)
        else:
            async with self._db.tenant(org) as tx:
                found = await matching(tx, issuer, list(audiences), limit=1)
        candidates = tuple(found)
        self._providers[lookup] = (now + self._config_ttl, candidates)
        self._providers.move_to_end(lookup)
        if len(self._providers) > _CACHE_SIZE:
            self._providers.popitem(last=False)
        return candidates


def _signer(token: str, alg: str, keys: list[Jwk]) -> Key | None:
    """The key among `keys` whose signature the token carries (None: none)."""
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
    return None
