"""A test OpenID Connect identity provider: RSA and EC signing keys made in the test, the
key set (JWKS) served by a real HTTP server on 127.0.0.1, and tokens signed with them.

`publish=False` keeps a key out of the served set (a key the provider has not announced
yet, or an attacker's); `jwks_requests` counts the fetches of the set.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk, jwt

from tests.receivers import Answer, Receiver, Request

JWKS_PATH = "/.well-known/jwks.json"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class SigningKey:
    kid: str
    alg: str
    private_pem: str
    public_pem: str

    @property
    def public_jwk(self) -> dict[str, Any]:
        doc: dict[str, Any] = jwk.construct(self.public_pem, self.alg).to_dict()
        doc.update(kid=self.kid, use="sig")
        return doc


def _pems(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private_pem, public_pem


def rsa_key(kid: str, alg: str = "RS256") -> SigningKey:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return SigningKey(kid, alg, *_pems(private))


def ec_key(kid: str, alg: str = "ES256") -> SigningKey:
    curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1()}[alg]
    return SigningKey(kid, alg, *_pems(ec.generate_private_key(curve)))


class IdentityProvider(Receiver):
    """Serves `GET /.well-known/jwks.json` with the published keys; anything else is
    404. `jwks_body` replaces the answer (a provider that does not serve a key set)."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: dict[str, SigningKey] = {}
        self.published: list[str] = []
        self.jwks_body: Any = None
        # Ports are reused within a run while earlier tests' settings stay in the database:
        # each provider names itself uniquely, as real tenants of one provider do.
        self.realm = uuid.uuid4().hex[:12]

    def add(self, key: SigningKey, *, publish: bool = True) -> SigningKey:
        self.keys[key.kid] = key
        if publish:
            self.publish(key.kid)
        return key

    def publish(self, kid: str) -> None:
        with self._lock:
            self.published.append(kid)

    def serve(self, request: Request) -> Answer:
        if request.method != "GET" or request.path != JWKS_PATH:
            return Answer(404, {"error": "not found"})
        if self.jwks_body is not None:
            return Answer(200, self.jwks_body)
        with self._lock:
            keys = [self.keys[kid].public_jwk for kid in self.published]
        return Answer(200, {"keys": keys})

    @property
    def issuer(self) -> str:
        return f"{self.url}/realms/{self.realm}"

    @property
    def jwks_uri(self) -> str:
        return self.url + JWKS_PATH

    @property
    def jwks_requests(self) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.path == JWKS_PATH)

    def claims(self, audience: str | list[str], email: str, /, **overrides: Any) -> dict[str, Any]:
        """Claims of an ID token for `email`; an override of None leaves the claim out."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": audience,
            "sub": uuid.uuid4().hex,
            "email": email,
            "email_verified": True,
            "name": "Ada Lovelace King",
            "iat": now,
            "exp": now + 600,
            "jti": uuid.uuid4().hex,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self,
        audience: str | list[str],
        email: str,
        /,
        *,
        kid: str | None = None,
        key: SigningKey | None = None,
        **overrides: Any,
    ) -> str:
        """A token signed with `key` (default: the key `kid`, else the first key), its
        header naming `kid` (default: the signing key's)."""
        if key is not None:
            signer = key
        elif kid is not None and kid in self.keys:
            signer = self.keys[kid]
        else:
            signer = next(iter(self.keys.values()))
        return jwt.encode(
            self.claims(audience, email, **overrides),
            signer.private_pem,
            algorithm=signer.alg,
            headers={"kid": kid or signer.kid},
        )


def unsigned(claims: dict[str, Any], header: dict[str, Any]) -> str:
    """A token with the given header and no signature (`alg: none`)."""
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(claims).encode())
    return f"{head}.{body}."


def hmac_signed(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    """An HS256 token: the algorithm-confusion attack signs with the public key as secret."""
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64url(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(signature)}"
