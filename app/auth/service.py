"""Machine credentials: create them, and exchange a client id + secret for a token."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from dataclasses import dataclass

from app.auth.tokens import TokenService
from app.db.database import Tx
from app.kit.errors import Unauthorized
from app.kit.ids import new_client_id, new_secret, org_of_client_id

ADMIN_ROLE = "Admin"


@dataclass(frozen=True, slots=True)
class NewCredential:
    client_id: str
    client_secret: str


def _hash_secret(secret: str) -> bytes:
    # Secrets are 256 random bits, so a fast digest is enough (as for GitHub tokens);
    # a slow KDF would only slow down every token exchange.
    return hashlib.sha256(secret.encode()).digest()


async def create_credential(
    tx: Tx, *, org_id: uuid.UUID, name: str, roles: list[str]
) -> NewCredential:
    client_id = new_client_id(org_id)
    secret = new_secret()
    await tx.execute(
        "INSERT INTO credentials (org_id, client_id, name, secret_hash, roles) "
        "VALUES ($1, $2, $3, $4, $5)",
        org_id,
        client_id,
        name,
        _hash_secret(secret),
        roles,
    )
    return NewCredential(client_id=client_id, client_secret=secret)


def org_for_client_id(client_id: str) -> uuid.UUID:
    org_id = org_of_client_id(client_id)
    if org_id is None:
        raise Unauthorized("Invalid client credentials", code="invalid_credentials")
    return org_id


async def exchange_credentials(
    tx: Tx,
    tokens: TokenService,
    *,
    org_id: uuid.UUID,
    client_id: str,
    client_secret: str,
) -> str:
    """`tx` must already be bound to `org_id` (see org_for_client_id)."""
    row = await tx.fetchrow(
        "SELECT secret_hash, roles FROM credentials WHERE org_id = $1 AND client_id = $2",
        org_id,
        client_id,
    )
    presented = _hash_secret(client_secret)
    expected = bytes(row["secret_hash"]) if row is not None else b"\0" * len(presented)
    if not hmac.compare_digest(presented, expected) or row is None:
        raise Unauthorized("Invalid client credentials", code="invalid_credentials")
    return tokens.issue(org_id=org_id, subject=client_id, kind="app", roles=list(row["roles"]))
