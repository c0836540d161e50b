"""The one place that makes and checks access tokens (JWT, python-jose).

The algorithm is pinned (the header's `alg` must be on our allow-list before anything is
decoded, and decoding is told the same list), and `exp`, `iat`, `aud`, `iss` and `sub`
are required: a token missing any of them is refused, not half-trusted.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard, get_args

from jose import ExpiredSignatureError, JWTError, jwt

from app.config import Settings
from app.kit import fairloop
from app.kit.errors import Unauthorized

# Who a token speaks for: a machine credential ("app": checked against its credential on
# every request) or a person ("user": checked against the users table on every request).
# Nothing else is a caller: a token of any other kind, or of none, is refused.
Kind = Literal["app", "user"]
KINDS: tuple[Kind, ...] = get_args(Kind)

ALGORITHM = "HS256"
ALLOWED_ALGORITHMS = (ALGORITHM,)
_REQUIRED = {
    "require_exp": True,
    "require_iat": True,
    "require_aud": True,
    "require_iss": True,
    "require_sub": True,
    "verify_exp": True,
    "verify_iat": True,
    "verify_aud": True,
    "verify_iss": True,
    "verify_signature": True,
    "leeway": 0,
}


@dataclass(frozen=True, slots=True)
class TokenClaims:
    org_id: uuid.UUID
    subject: str
    kind: Kind
    roles: tuple[str, ...]
    expires_at: int
    issued_at: int = 0


_CACHE_SIZE = 10_000


def is_kind(value: object) -> TypeGuard[Kind]:
    return isinstance(value, str) and value in KINDS


class TokenService:
    def __init__(self, settings: Settings) -> None:
        self._key = settings.secret_key.get_secret_value()
        self._issuer = settings.token_issuer
        self._audience = settings.token_audience
        self.ttl = settings.token_ttl_seconds
        # Clients reuse a token for its whole life (Ocean, CI, the SPA), so a verified
        # token's claims are remembered until it expires. The key is the whole token,
        # signature included: a forged or altered token is never a hit.
        self._verified: OrderedDict[str, TokenClaims] = OrderedDict()

    def issue(self, *, org_id: uuid.UUID, subject: str, kind: Kind, roles: list[str]) -> str:
        if not is_kind(kind):
            raise ValueError(f"not a kind of caller: {kind!r}")
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": subject,
            "iat": now,
            "nbf": now,
            "exp": now + self.ttl,
            "jti": uuid.uuid4().hex,
            "org": str(org_id),
            "kind": kind,
            "roles": roles,
            # Port's claim, read (unverified) by Ocean: only a machine credential's token
            # runs an integration's actions processor. Verification does not use it.
            "isMachine": kind == "app",
        }
        return str(jwt.encode(claims, self._key, algorithm=ALGORITHM))

    def verify(self, token: str) -> TokenClaims:
        """The token's claims (raises Unauthorized). From here on, the request's turns on
        the event loop count for the token's org (app/kit/fairloop.py)."""
        cached = self._verified.get(token)
        if cached is not None:
            if cached.expires_at > time.time():
                fairloop.charge_to(cached.org_id)
                return cached
            del self._verified[token]
            raise Unauthorized("The access token has expired", code="token_expired")
        claims = self._verify_uncached(token)
        fairloop.charge_to(claims.org_id)
        self._verified[token] = claims
        if len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)
        return claims

    def _verify_uncached(self, token: str) -> TokenClaims:
        try:
            header = jwt.get_unverified_header(token)
        except JWTError as exc:
            raise Unauthorized("The access token is malformed", code="invalid_token") from exc
        if header.get("alg") not in ALLOWED_ALGORITHMS:
            raise Unauthorized("The access token's algorithm is not accepted", code="invalid_token")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=list(ALLOWED_ALGORITHMS),
                audience=self._audience,
                issuer=self._issuer,
                options=_REQUIRED,
            )
        except ExpiredSignatureError as exc:
            raise Unauthorized("The access token has expired", code="token_expired") from exc
        except JWTError as exc:
            raise Unauthorized("The access token is invalid", code="invalid_token") from exc
        try:
            org_id = uuid.UUID(str(claims["org"]))
            roles = claims.get("roles") or []
            if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
                raise ValueError("roles")
            kind = claims.get("kind")
            if not is_kind(kind):
                raise ValueError("kind")
            return TokenClaims(
                org_id=org_id,
                subject=str(claims["sub"]),
                kind=kind,
                roles=tuple(roles),
                expires_at=int(claims["exp"]),
                issued_at=int(claims["iat"]),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise Unauthorized("The access token is invalid", code="invalid_token") from exc
